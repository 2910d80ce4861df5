"""The custodian's own configuration section (``"custodian": {...}`` in the server's file).

::

    "custodian": {
      "log_origin": "custodian-1/collateral-sync/attestations",
      "attestation_log": "custodian-1.attestations.sqlite",
      "checkpoint_interval_seconds": 60,
      "checkpoint_ttl_seconds": 86400,
      "statement_ttl_seconds": 2592000,
      "yield_time_utc": "08:00",
      "redemption_lock_seconds": 86400,
      "assets": [
        {"asset_id": "BENJI", "asset_class": "TOKENIZED_MMF", "daily_yield_rate": "0.000118"}
      ],
      "accounts": [
        {"account_id": "acct-1", "client_id": "client-1",
         "holdings": {"BTC": "10", "USDC": "250000", "BENJI": "1000000"}}
      ],
      "margin_call_responses": [
        {"kind": "PARTIALLY_AGREE", "agreed_fraction": "0.5", "dispute_reason": "VALUATION"},
        {"kind": "AGREE"}
      ]
    }

Every key is optional. Without ``assets`` the seed list is used (BTC, USDC,
BENJI with a daily yield, SPYx, TSLAx). Amounts and rates are decimal strings,
never JSON numbers. ``client_id`` is the party whose client key must sign the
account's pledges and redemptions. ``margin_call_responses`` is the answer
policy for margin calls: the n-th call gets the n-th entry, the last one
repeats (default: AGREE to everything that recomputes). Accounts are created at
the first start; after that the database is the truth and only accounts new to
the file are added.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import time, timedelta
from decimal import Decimal
from pathlib import Path

from collateral_sync.v1 import common_pb2, margin_pb2

from collateral_sync_reference.common.config import ConfigSection, ServerConfig

__all__ = [
    "DEFAULT_ASSETS",
    "AccountSettings",
    "AssetSettings",
    "CustodianSettings",
    "MarginCallAnswer",
    "parse_custodian_settings",
]

_CLASS = common_pb2.AssetClass
_KIND = margin_pb2.MarginCallResponseKind
_DISPUTE = margin_pb2.DisputeReason
_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


@dataclass(frozen=True, slots=True)
class AssetSettings:
    asset_id: str
    asset_class: int
    #: Daily yield as a fraction of the quantity held (tokenized funds), or None.
    daily_yield_rate: Decimal | None = None


@dataclass(frozen=True, slots=True)
class AccountSettings:
    account_id: str
    client_id: str
    holdings: Mapping[str, Decimal]


@dataclass(frozen=True, slots=True)
class MarginCallAnswer:
    """How the custodian answers a margin call that recomputes."""

    kind: int
    #: PARTIALLY_AGREE: the agreed part, as a fraction of the call amount...
    agreed_fraction: Decimal | None = None
    #: ...or as an amount (a value at or above the call amount agrees in full).
    agreed_amount: Decimal | None = None
    dispute_reason: int = _DISPUTE.DISPUTE_REASON_VALUATION


@dataclass(frozen=True, slots=True)
class CustodianSettings:
    log_origin: str
    #: The log's SQLite file; None on PostgreSQL (a table of the server's database).
    attestation_log: Path | None
    #: A checkpoint older than this is re-signed when the latest one is asked for.
    checkpoint_interval: timedelta
    checkpoint_ttl: timedelta
    #: Lifetime of holdings statements, receipts and margin-call responses.
    statement_ttl: timedelta
    yield_time: time
    redemption_lock: timedelta
    assets: Mapping[str, AssetSettings]
    accounts: tuple[AccountSettings, ...]
    margin_call_answers: tuple[MarginCallAnswer, ...]

    def asset_classes(self) -> dict[str, common_pb2.AssetClass.ValueType]:
        """Asset id -> class: the arrangement's asset list for valuations."""
        return {a.asset_id: a.asset_class for a in self.assets.values()}  # type: ignore[misc]


DEFAULT_ASSETS: tuple[AssetSettings, ...] = (
    AssetSettings("BTC", _CLASS.ASSET_CLASS_CRYPTO),
    AssetSettings("USDC", _CLASS.ASSET_CLASS_STABLECOIN),
    # About 4.3% a year, accrued daily.
    AssetSettings("BENJI", _CLASS.ASSET_CLASS_TOKENIZED_MMF, Decimal("0.000118")),
    AssetSettings("SPYx", _CLASS.ASSET_CLASS_TOKENIZED_ETF),
    AssetSettings("TSLAx", _CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK),
)


def _enum_value(
    section: ConfigSection, key: str, enum: object, prefix: str, default: str | None
) -> int:
    text = section.string(key) if default is None else section.string(key, default)
    names = enum.keys()  # type: ignore[attr-defined]
    name = text if text.startswith(prefix) else prefix + text
    if name not in names or name.endswith("_UNSPECIFIED"):
        choices = "|".join(n.removeprefix(prefix) for n in names if not n.endswith("UNSPECIFIED"))
        raise section.error(key, choices, text)
    return int(enum.Value(name))  # type: ignore[attr-defined]


def _assets(section: ConfigSection) -> dict[str, AssetSettings]:
    if "assets" not in section:
        section.sections("assets")  # mark as read
        return {a.asset_id: a for a in DEFAULT_ASSETS}
    assets: dict[str, AssetSettings] = {}
    for item in section.sections("assets", required=True):
        asset_id = item.string("asset_id")
        if asset_id in assets:
            raise item.error("asset_id", "a unique asset id", asset_id)
        asset_class = _enum_value(item, "asset_class", _CLASS, "ASSET_CLASS_", None)
        rate = item.amount("daily_yield_rate") if "daily_yield_rate" in item else None
        if rate is not None and not Decimal(0) < rate < Decimal(1):
            raise item.error("daily_yield_rate", "a fraction between 0 and 1", str(rate))
        item.finish()
        assets[asset_id] = AssetSettings(asset_id, asset_class, rate)
    if not assets:
        raise section.error("assets", "at least one asset", [])
    return assets


def _accounts(
    section: ConfigSection, assets: Mapping[str, AssetSettings]
) -> tuple[AccountSettings, ...]:
    accounts: dict[str, AccountSettings] = {}
    for item in section.sections("accounts"):
        account_id = item.string("account_id")
        if account_id in accounts:
            raise item.error("account_id", "a unique account id", account_id)
        client_id = item.string("client_id")
        holdings: dict[str, Decimal] = {}
        holdings_section = item.section("holdings")
        for asset_id in list(holdings_section.keys()):
            if asset_id not in assets:
                raise holdings_section.error(asset_id, "an asset of the asset list", asset_id)
            quantity = holdings_section.amount(asset_id)
            if quantity < 0:
                raise holdings_section.error(asset_id, "a quantity >= 0", str(quantity))
            holdings[asset_id] = quantity
        holdings_section.finish()
        item.finish()
        accounts[account_id] = AccountSettings(account_id, client_id, holdings)
    return tuple(accounts.values())


def _answers(section: ConfigSection) -> tuple[MarginCallAnswer, ...]:
    answers: list[MarginCallAnswer] = []
    for item in section.sections("margin_call_responses"):
        kind = _enum_value(item, "kind", _KIND, "MARGIN_CALL_RESPONSE_KIND_", "AGREE")
        fraction = item.amount("agreed_fraction") if "agreed_fraction" in item else None
        amount = item.amount("agreed_amount") if "agreed_amount" in item else None
        reason = _enum_value(item, "dispute_reason", _DISPUTE, "DISPUTE_REASON_", "VALUATION")
        if kind == _KIND.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE:
            if (fraction is None) == (amount is None):
                raise item.error(
                    "agreed_fraction", "one of agreed_fraction or agreed_amount", "neither or both"
                )
            if fraction is not None and not Decimal(0) < fraction < Decimal(1):
                raise item.error("agreed_fraction", "a fraction between 0 and 1", str(fraction))
            if amount is not None and amount <= 0:
                raise item.error("agreed_amount", "an amount > 0", str(amount))
        elif fraction is not None or amount is not None:
            raise item.error("kind", "PARTIALLY_AGREE when an agreed part is given", kind)
        item.finish()
        answers.append(MarginCallAnswer(kind, fraction, amount, reason))
    if not answers:
        answers.append(MarginCallAnswer(_KIND.MARGIN_CALL_RESPONSE_KIND_AGREE))
    return tuple(answers)


def parse_custodian_settings(config: ServerConfig) -> CustodianSettings:
    """Read and check the ``custodian`` section of a server configuration."""
    section = config.role_settings
    yield_text = section.string("yield_time_utc", "08:00")
    match = _TIME.fullmatch(yield_text)
    if match is None:
        raise section.error("yield_time_utc", "HH:MM (UTC, 24-hour)", yield_text)
    assets = _assets(section)
    storage = config.storage.path
    settings = CustodianSettings(
        log_origin=section.string("log_origin", f"{config.party_id}/collateral-sync/attestations"),
        # On PostgreSQL the log's leaves are in the database, in a table of their own.
        attestation_log=None
        if storage is None
        else section.path(
            "attestation_log", str(storage.with_name(storage.stem + ".attestations.sqlite"))
        ),
        checkpoint_interval=section.seconds("checkpoint_interval_seconds", 60),
        checkpoint_ttl=section.seconds("checkpoint_ttl_seconds", 86_400),
        statement_ttl=section.seconds("statement_ttl_seconds", 30 * 86_400),
        yield_time=time(int(match[1]), int(match[2])),
        redemption_lock=section.seconds("redemption_lock_seconds", 86_400),
        assets=assets,
        accounts=_accounts(section, assets),
        margin_call_answers=_answers(section),
    )
    if settings.checkpoint_ttl <= settings.checkpoint_interval:
        raise section.error(
            "checkpoint_ttl_seconds",
            "longer than checkpoint_interval_seconds (a refreshed checkpoint must still be valid)",
            settings.checkpoint_ttl.total_seconds(),
        )
    section.finish()
    return settings
