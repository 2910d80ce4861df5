"""The reference exchange's risk policy: the pilot's seed figures, and overrides from config.

The exchange publishes its policy as a signed, versioned ``RiskPolicy``
(docs/PROTOCOL.md §7.1). This module builds the policy *content* (everything
but the header, the version and effective_from) from the ``risk_policy``
section of the exchange's configuration on top of the pilot's seed figures,
and checks it with :func:`collateral_sync.valuation.validate_risk_policy`, so
a bad configuration fails at start, never at the first valuation.

Seed (PROTOCOL.md §7.4): tokenized MMF 0.98, stablecoin 0.95, broad ETF 0.85
capped at 0.4 of the collateral value, single stock 0.6 capped at 0.1, crypto
0.8; leverage cap 2; maintenance ratio 0.5; liquidation ratio 0.4; cure
period 24 h; rounding scale 2; stale prices at 90% after 72 h; two settlement
cycles a day; emergency release after 48 h.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import MalformedError
from collateral_sync.v1 import common_pb2, valuation_pb2
from collateral_sync.valuation import validate_risk_policy
from google.protobuf import duration_pb2

from collateral_sync_reference.common.config import ConfigSection

__all__ = [
    "PILOT_ASSETS",
    "build_policy_content",
    "policy_content_key",
]

_CLASS = common_pb2.AssetClass

#: The pilot's asset list: asset id -> class (the reference custodian's seed assets).
PILOT_ASSETS: Mapping[str, int] = {
    "BTC": _CLASS.ASSET_CLASS_CRYPTO,
    "USDC": _CLASS.ASSET_CLASS_STABLECOIN,
    "BENJI": _CLASS.ASSET_CLASS_TOKENIZED_MMF,
    "SPYx": _CLASS.ASSET_CLASS_TOKENIZED_ETF,
    "TSLAx": _CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK,
}

_PILOT_HAIRCUTS: Mapping[int, str] = {
    _CLASS.ASSET_CLASS_TOKENIZED_MMF: "0.98",
    _CLASS.ASSET_CLASS_STABLECOIN: "0.95",
    _CLASS.ASSET_CLASS_TOKENIZED_ETF: "0.85",
    _CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK: "0.6",
    _CLASS.ASSET_CLASS_CRYPTO: "0.8",
}
_PILOT_CAPS: Mapping[int, str] = {
    _CLASS.ASSET_CLASS_TOKENIZED_ETF: "0.4",
    _CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK: "0.1",
}
_PILOT_DECIMALS = {
    "leverage_cap": "2",
    "maintenance_ratio": "0.5",
    "liquidation_ratio": "0.4",
    "insurance_fund_balance": "1000000",
    "stale_price_factor": "0.9",
}
_PILOT_DURATIONS = {
    "cure_period": 24 * 3600,
    "max_price_age": 72 * 3600,
    "settlement_dispute_window": 24 * 3600,
    "emergency_release_wait": 48 * 3600,
    "custodian_staleness_window": 300,
}


def build_policy_content(section: ConfigSection) -> valuation_pb2.RiskPolicy:
    """The policy content (no header, version 0, no effective_from) from a config section.

    Every key is optional and overrides the seed: ``haircuts`` and
    ``concentration_caps`` map class names (``"STABLECOIN"`` or
    ``"ASSET_CLASS_STABLECOIN"``) to decimal text and replace the seed maps;
    ``assets`` maps asset ids to class names; ``asset_haircuts`` is a list of
    ``{"asset_id", "asset_class", "collateral_factor"}``; durations are
    seconds (``cure_period_seconds``...). The result must pass
    :func:`~collateral_sync.valuation.validate_risk_policy`. Raises
    MalformedError naming the offending key.
    """
    haircuts = _class_map(section, "haircuts", _PILOT_HAIRCUTS)
    caps = _class_map(section, "concentration_caps", _PILOT_CAPS)
    if "assets" in section:
        assets = {
            asset_id: _asset_class(section, f"assets.{asset_id}", name)
            for asset_id, name in section.entries("assets")
        }
    else:
        section.entries("assets")
        assets = dict(PILOT_ASSETS)

    policy = valuation_pb2.RiskPolicy(
        haircuts=[
            valuation_pb2.AssetClassHaircut(asset_class=c, collateral_factor=_decimal(v))  # type: ignore[arg-type]
            for c, v in sorted(haircuts.items())
        ],
        concentration_caps=[
            valuation_pb2.ConcentrationCap(asset_class=c, max_share=_decimal(v))  # type: ignore[arg-type]
            for c, v in sorted(caps.items())
        ],
        assets=[
            common_pb2.Asset(asset_id=a, asset_class=c)  # type: ignore[arg-type]
            for a, c in sorted(assets.items())
        ],
        valuation_currency=section.string("valuation_currency", "USD"),
        price_source=section.string("price_source", "scripted"),
        rounding_scale=section.integer("rounding_scale", 2, minimum=0, maximum=18),
        max_settlement_cycles_per_day=section.integer(
            "max_settlement_cycles_per_day", 2, minimum=0, maximum=2**32 - 1
        ),
        auto_deleveraging_rule=_enum(  # type: ignore[arg-type]
            section,
            "auto_deleveraging_rule",
            valuation_pb2.AutoDeleveragingRule,
            "AUTO_DELEVERAGING_RULE_",
            section.string("auto_deleveraging_rule", "PROFIT_TIMES_LEVERAGE"),
        ),
        stale_price_rule=_enum(  # type: ignore[arg-type]
            section,
            "stale_price_rule",
            valuation_pb2.StalePriceRule,
            "STALE_PRICE_RULE_",
            section.string("stale_price_rule", "LAST_PRICE"),
        ),
    )
    for entry in section.sections("asset_haircuts"):
        policy.asset_haircuts.add(
            asset_id=entry.string("asset_id"),
            asset_class=_asset_class(entry, "asset_class", entry.string("asset_class")),
            collateral_factor=_decimal(entry.amount("collateral_factor")),
        )
        entry.finish()
    for name, default in _PILOT_DECIMALS.items():
        getattr(policy, name).CopyFrom(_decimal(section.amount(name, default)))
    for name, default_seconds in _PILOT_DURATIONS.items():
        key = f"{name}_seconds"
        seconds = section.integer(key, default_seconds, minimum=0, maximum=10 * 366 * 86_400)
        getattr(policy, name).CopyFrom(_duration(seconds))
    section.finish()
    try:
        validate_risk_policy(policy)
    except MalformedError as err:
        raise section.error(
            err.metadata.get("field"),
            err.metadata.get("expected", "a valid policy"),
            err.metadata.get("actual", ""),
        ) from err
    return policy


def policy_content_key(policy: valuation_pb2.RiskPolicy) -> bytes:
    """Bytes that are equal iff two policies say the same (header, version, effective_from aside)."""
    content = valuation_pb2.RiskPolicy()
    content.CopyFrom(policy)
    content.ClearField("header")
    content.ClearField("version")
    content.ClearField("effective_from")
    return content.SerializeToString(deterministic=True)


def _decimal(value: Decimal | str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=value if isinstance(value, str) else format_amount(value))


def _duration(seconds: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


def _enum(section: ConfigSection, key: str, enum: Any, prefix: str, value: str) -> int:
    name = value if value.startswith(prefix) else prefix + value
    try:
        number = int(enum.Value(name))
    except ValueError:
        raise section.error(key, f"a {prefix}* value name", value) from None
    if number == 0:
        raise section.error(key, f"a defined {prefix}* value", value)
    return number


def _asset_class(section: ConfigSection, key: str, value: object) -> int:
    if not isinstance(value, str):
        raise section.error(key, "an asset class name such as STABLECOIN", value)
    return _enum(section, key, _CLASS, "ASSET_CLASS_", value)


def _class_map(section: ConfigSection, key: str, seed: Mapping[int, str]) -> dict[int, str]:
    if key not in section:
        section.entries(key)
        return dict(seed)
    found: dict[int, str] = {}
    for name, value in section.entries(key):
        asset_class = _asset_class(section, f"{key}.{name}", name)
        if not isinstance(value, str):
            raise section.error(f"{key}.{name}", 'a decimal as a JSON string, e.g. "0.95"', value)
        try:
            parse_amount(value, field=f"{key}.{name}")
        except MalformedError:
            raise section.error(f"{key}.{name}", "a canonical decimal", value) from None
        found[asset_class] = value
    return found
