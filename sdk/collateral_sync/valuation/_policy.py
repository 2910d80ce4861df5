"""Risk policies: a RiskPolicy checked and parsed once into the figures the arithmetic uses.

:func:`validate_risk_policy` refuses a policy the arithmetic is not defined
for; what a valid policy is, is stated in :mod:`collateral_sync.valuation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from google.protobuf.message import Message

from collateral_sync.amounts import MAX_FRACTION_DIGITS, format_amount
from collateral_sync.v1 import common_pb2, valuation_pb2
from collateral_sync.valuation._arith import (
    _EXACT,
    _NS_PER_S,
    _ONE,
    _ZERO,
    _amount,
    _duration_ns,
    _malformed,
    _non_negative,
)

__all__ = [
    "DEFAULT_CUSTODIAN_STALENESS_WINDOW",
    "custodian_staleness_window",
    "validate_risk_policy",
]

_ASSET_CLASS = common_pb2.AssetClass
_UNSPECIFIED_CLASS = _ASSET_CLASS.ASSET_CLASS_UNSPECIFIED
_STALE = valuation_pb2.StalePriceRule
_ADL = valuation_pb2.AutoDeleveragingRule

MAX_ROUNDING_SCALE = MAX_FRACTION_DIGITS
#: The window of a policy that sets none (PROTOCOL.md §7.1, §11.2).
DEFAULT_CUSTODIAN_STALENESS_WINDOW = timedelta(seconds=300)


def _at_most(value: Decimal, high: Decimal, field: str, what: str) -> Decimal:
    if value > high:
        raise _malformed(field, f"<= {format_amount(high)}", format_amount(value), what)
    return value


def _class_name(asset_class: int) -> str:
    try:
        return _ASSET_CLASS.Name(asset_class)  # type: ignore[arg-type]
    except ValueError:
        return str(asset_class)


@dataclass(frozen=True, slots=True)
class _Policy:
    """A risk policy checked and parsed once."""

    version: int
    class_factors: Mapping[int, Decimal]
    asset_haircuts: Mapping[str, tuple[int, Decimal]]
    asset_classes: Mapping[str, int]
    caps: Mapping[int, Decimal]
    leverage_cap: Decimal
    maintenance_ratio: Decimal
    liquidation_ratio: Decimal
    insurance_fund_balance: Decimal
    max_price_age_ns: int
    stale_price_rule: int
    stale_price_factor: Decimal
    rounding_scale: int
    auto_deleveraging_rule: int


def _check_class(asset_class: int, field: str) -> int:
    if asset_class == _UNSPECIFIED_CLASS or asset_class not in _ASSET_CLASS.values():
        raise _malformed(
            field,
            "a defined AssetClass other than UNSPECIFIED",
            _class_name(asset_class),
            "risk policy",
        )
    return asset_class


def _fraction(parent: Message, name: str, field: str) -> Decimal:
    """A required Decimal in [0, 1] of the policy."""
    value = _non_negative(_amount(parent, name, field, "risk policy"), field, "risk policy")
    return _at_most(value, _ONE, field, "risk policy")


def _policy_amount(policy: valuation_pb2.RiskPolicy, name: str) -> Decimal:
    """A required non-negative Decimal of the policy, named by its field."""
    return _non_negative(_amount(policy, name, name, "risk policy"), name, "risk policy")


def _decimal_places(value: Decimal) -> int:
    exponent = value.normalize(context=_EXACT).as_tuple().exponent
    assert isinstance(exponent, int)  # finite: parse_amount refuses the rest
    return max(0, -exponent)


def _parse_policy(policy: valuation_pb2.RiskPolicy) -> _Policy:
    what = "risk policy"
    scale = policy.rounding_scale
    if scale > MAX_ROUNDING_SCALE:
        raise _malformed("rounding_scale", f"<= {MAX_ROUNDING_SCALE}", str(scale), what)

    class_factors: dict[int, Decimal] = {}
    for i, class_haircut in enumerate(policy.haircuts):
        field = f"haircuts[{i}]"
        asset_class = _check_class(class_haircut.asset_class, f"{field}.asset_class")
        if asset_class in class_factors:
            raise _malformed(
                f"{field}.asset_class",
                "one haircut per class",
                f"a second haircut for {_class_name(asset_class)}",
                what,
            )
        class_factors[asset_class] = _fraction(
            class_haircut, "collateral_factor", f"{field}.collateral_factor"
        )

    asset_haircuts: dict[str, tuple[int, Decimal]] = {}
    for i, asset_haircut in enumerate(policy.asset_haircuts):
        field = f"asset_haircuts[{i}]"
        if not asset_haircut.asset_id:
            raise _malformed(f"{field}.asset_id", "a non-empty asset id", "''", what)
        if asset_haircut.asset_id in asset_haircuts:
            raise _malformed(
                f"{field}.asset_id",
                "one haircut per asset",
                f"a second haircut for {asset_haircut.asset_id!r}",
                what,
            )
        asset_class = _check_class(asset_haircut.asset_class, f"{field}.asset_class")
        factor = _fraction(asset_haircut, "collateral_factor", f"{field}.collateral_factor")
        asset_haircuts[asset_haircut.asset_id] = (asset_class, factor)

    asset_classes: dict[str, int] = {}
    for i, asset in enumerate(policy.assets):
        field = f"assets[{i}]"
        if not asset.asset_id:
            raise _malformed(f"{field}.asset_id", "a non-empty asset id", "''", what)
        if asset.asset_id in asset_classes:
            raise _malformed(
                f"{field}.asset_id",
                "each asset listed once",
                f"a second entry for {asset.asset_id!r}",
                what,
            )
        asset_classes[asset.asset_id] = _check_class(asset.asset_class, f"{field}.asset_class")

    caps: dict[int, Decimal] = {}
    for i, cap in enumerate(policy.concentration_caps):
        field = f"concentration_caps[{i}]"
        asset_class = _check_class(cap.asset_class, f"{field}.asset_class")
        if asset_class in caps:
            raise _malformed(
                f"{field}.asset_class",
                "one cap per class",
                f"a second cap for {_class_name(asset_class)}",
                what,
            )
        caps[asset_class] = _fraction(cap, "max_share", f"{field}.max_share")

    leverage_cap = _policy_amount(policy, "leverage_cap")
    if leverage_cap == 0:
        raise _malformed("leverage_cap", "> 0", "0", what)
    maintenance = _policy_amount(policy, "maintenance_ratio")
    liquidation = _at_most(
        _policy_amount(policy, "liquidation_ratio"),
        maintenance,
        "liquidation_ratio",
        f"{what} (liquidation_ratio <= maintenance_ratio)",
    )
    for field, ratio in (("maintenance_ratio", maintenance), ("liquidation_ratio", liquidation)):
        if _decimal_places(ratio) > scale:
            raise _malformed(
                field,
                f"at most rounding_scale={scale} decimal places",
                format_amount(ratio),
                what,
            )
    insurance = _policy_amount(policy, "insurance_fund_balance")

    age = policy.max_price_age
    if age.seconds < 0 or age.nanos < 0 or age.nanos >= _NS_PER_S:
        raise _malformed(
            "max_price_age",
            "a non-negative duration",
            f"seconds={age.seconds} nanos={age.nanos}",
            what,
        )
    if policy.HasField("custodian_staleness_window"):
        window = policy.custodian_staleness_window
        if (
            window.seconds < 0
            or window.nanos < 0
            or window.nanos >= _NS_PER_S
            or not (window.seconds or window.nanos)
        ):
            raise _malformed(
                "custodian_staleness_window",
                "a positive duration, or none (300 s)",
                f"seconds={window.seconds} nanos={window.nanos}",
                what,
            )
    rule = policy.stale_price_rule
    if rule not in (_STALE.STALE_PRICE_RULE_ZERO, _STALE.STALE_PRICE_RULE_LAST_PRICE):
        raise _malformed(
            "stale_price_rule",
            "STALE_PRICE_RULE_ZERO or STALE_PRICE_RULE_LAST_PRICE",
            str(rule),
            what,
        )
    # The factor only matters under LAST_PRICE; elsewhere it may be left empty.
    stale_factor = _ZERO
    if rule == _STALE.STALE_PRICE_RULE_LAST_PRICE or policy.HasField("stale_price_factor"):
        stale_factor = _fraction(policy, "stale_price_factor", "stale_price_factor")
    adl_rule = policy.auto_deleveraging_rule
    if adl_rule != _ADL.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE:
        raise _malformed(
            "auto_deleveraging_rule",
            "AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE",
            str(adl_rule),
            what,
        )

    return _Policy(
        version=policy.version,
        class_factors=class_factors,
        asset_haircuts=asset_haircuts,
        asset_classes=asset_classes,
        caps=caps,
        leverage_cap=leverage_cap,
        maintenance_ratio=maintenance,
        liquidation_ratio=liquidation,
        insurance_fund_balance=insurance,
        max_price_age_ns=_duration_ns(age),
        stale_price_rule=rule,
        stale_price_factor=stale_factor,
        rounding_scale=scale,
        auto_deleveraging_rule=adl_rule,
    )


def custodian_staleness_window(policy: valuation_pb2.RiskPolicy) -> timedelta:
    """How long an exchange under ``policy`` may hear nothing from a custodian (§11.2).

    The policy's ``custodian_staleness_window``, or 300 s if it sets none;
    the policy is assumed valid (:func:`validate_risk_policy`).
    """
    if not policy.HasField("custodian_staleness_window"):
        return DEFAULT_CUSTODIAN_STALENESS_WINDOW
    return timedelta(microseconds=_duration_ns(policy.custodian_staleness_window) // 1000)


def validate_risk_policy(policy: valuation_pb2.RiskPolicy) -> None:
    """Refuse a policy the arithmetic is not defined for (see :mod:`collateral_sync.valuation`).

    Raises MalformedError (reason MALFORMED, or INVALID_AMOUNT for a
    non-canonical Decimal) naming the first offending field.
    """
    _parse_policy(policy)
