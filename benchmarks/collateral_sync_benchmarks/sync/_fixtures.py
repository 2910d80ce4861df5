"""Fixtures both processes of the sync benchmark share.

The parties' keys and registry (fixed seeds), their TLS files, the updates,
statements and prices they exchange, the constants both sides agree on, and
the small statistics both report with.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from collateral_sync.amounts import amount_to_proto
from collateral_sync.errors import MalformedError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.transport import TlsConfig
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import validate_risk_policy
from google.protobuf import duration_pb2

# Helpers for the sibling modules only: nothing here is API.
__all__: list[str] = []

#: Updates the custodian appends per transaction.
TRANSACTION_UPDATES = 1_000

_CUSTODIAN = "custodian-1"
_EXCHANGE = "exchange-1"
_POSITION_ACCOUNTS = 5_000
_MARGIN_ACCOUNTS = 20
_ASSETS = ("USDC", "BENJI", "BTC")
_KEYS_VALID_FROM = datetime(2025, 1, 1, tzinfo=UTC)
_STATEMENT_TTL = timedelta(days=1)

# Every wait is bounded, so that a broken peer fails the run instead of hanging it.
_START_TIMEOUT = 120.0
_ACK_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def _party_keys() -> tuple[SigningKey, SigningKey, KeyRegistry]:
    """Custodian key, exchange key, and the registry both processes trust (fixed seeds)."""
    custodian = SigningKey.from_seed(
        hashlib.sha256(b"collateral-sync bench custodian").digest(),
        _CUSTODIAN,
        common_pb2.PARTY_ROLE_CUSTODIAN,
    )
    exchange = SigningKey.from_seed(
        hashlib.sha256(b"collateral-sync bench exchange").digest(),
        _EXCHANGE,
        common_pb2.PARTY_ROLE_EXCHANGE,
    )
    registry = KeyRegistry(k.party_key(valid_from=_KEYS_VALID_FROM) for k in (custodian, exchange))
    return custodian, exchange, registry


def _tls(workdir: Path, party_id: str) -> TlsConfig:
    pki = workdir / "pki"
    return TlsConfig.from_files(pki / "ca.pem", pki / f"{party_id}.pem", pki / f"{party_id}.key")


def _pledge_update(index: int) -> position_sync_pb2.PositionUpdate:
    """A custodian -> exchange pledge change with its attestation reference."""
    return position_sync_pb2.PositionUpdate(
        pledge_change=position_sync_pb2.PledgeChange(
            account_id=f"acct-{index % _POSITION_ACCOUNTS:05d}",
            asset_id=_ASSETS[index % len(_ASSETS)],
            pledged_quantity=amount_to_proto(f"{1000 + index}.25"),
            attestation=attestation_pb2.AttestationRef(
                log_origin=f"{_CUSTODIAN}/attestations",
                leaf_index=index,
                leaf_hash=hashlib.sha256(index.to_bytes(8, "big")).digest(),
                tree_size=index + 1,
            ),
        )
    )


def _raw_message(custodian: SigningKey) -> custodian_service_pb2.SyncPositionsResponse:
    """One update as a per-message protocol would send it: a signed one-entry batch."""
    update = _pledge_update(0).SerializeToString(deterministic=True)
    batch = position_sync_pb2.SyncBatch(
        direction=position_sync_pb2.SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE
    )
    batch.entries.add(sequence=1, prev_entry_hash=bytes(32), update=update, entry_hash=bytes(32))
    envelope = sign_statement(
        batch,
        custodian,
        audience=[_EXCHANGE],
        sequence=1,
        ttl=_STATEMENT_TTL,
        issued_at=datetime.now(UTC),
    )
    return custodian_service_pb2.SyncPositionsResponse(
        frame=position_sync_pb2.SyncFrame(batch=envelope)
    )


def _margin_account(index: int) -> str:
    return f"margin-{index % _MARGIN_ACCOUNTS:03d}"


def _position(account_id: str, asset_id: str, quantity: str) -> common_pb2.Position:
    return common_pb2.Position(
        account_id=account_id,
        asset_id=asset_id,
        quantity=amount_to_proto(quantity),
        locked_quantity=amount_to_proto("0"),
        pledged_quantity=amount_to_proto(quantity),
    )


def _holdings_change(
    custodian: SigningKey, account_id: str, now: datetime
) -> position_sync_pb2.PositionUpdate:
    """The custodian's signed holdings of a margin account: 1 BTC, 10,000 USDC, 5,000 BENJI."""
    statement = attestation_pb2.HoldingsStatement(
        account_id=account_id,
        exchange_id=_EXCHANGE,
        epoch=1,
        positions=[
            _position(account_id, "BTC", "1"),
            _position(account_id, "USDC", "10000"),
            _position(account_id, "BENJI", "5000"),
        ],
        reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
    )
    envelope = sign_statement(
        statement,
        custodian,
        audience=[_EXCHANGE],
        sequence=1,
        ttl=_STATEMENT_TTL,
        issued_at=now,
    )
    return position_sync_pb2.PositionUpdate(
        holdings_change=position_sync_pb2.HoldingsChange(holdings_statement=envelope)
    )


def _breach_price(number: int) -> str:
    # With 1 BTC, 10,000 USDC and 5,000 BENJI against an exposure of 60,000,
    # BTC at 18,000..18,999 puts the ratio near 0.45: under maintenance (0.5),
    # above liquidation (0.4), so every breach is a margin call.
    return f"{18_000 + number % 1_000}.5"


def _risk_policy(now: datetime) -> valuation_pb2.RiskPolicy:
    def dec(text: str) -> common_pb2.Decimal:
        return common_pb2.Decimal(value=text)

    classes = common_pb2.AssetClass
    policy = valuation_pb2.RiskPolicy(
        version=1,
        haircuts=[
            valuation_pb2.AssetClassHaircut(
                asset_class=classes.ASSET_CLASS_TOKENIZED_MMF, collateral_factor=dec("0.98")
            ),
            valuation_pb2.AssetClassHaircut(
                asset_class=classes.ASSET_CLASS_STABLECOIN, collateral_factor=dec("0.95")
            ),
            valuation_pb2.AssetClassHaircut(
                asset_class=classes.ASSET_CLASS_CRYPTO, collateral_factor=dec("0.7")
            ),
        ],
        assets=[
            common_pb2.Asset(asset_id="BTC", asset_class=classes.ASSET_CLASS_CRYPTO),
            common_pb2.Asset(asset_id="USDC", asset_class=classes.ASSET_CLASS_STABLECOIN),
            common_pb2.Asset(asset_id="BENJI", asset_class=classes.ASSET_CLASS_TOKENIZED_MMF),
        ],
        leverage_cap=dec("2"),
        maintenance_ratio=dec("0.5"),
        liquidation_ratio=dec("0.4"),
        insurance_fund_balance=dec("1000000"),
        valuation_currency="USD",
        auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE,
        max_price_age=duration_pb2.Duration(seconds=15 * 60),
        cure_period=duration_pb2.Duration(seconds=24 * 3600),
        stale_price_rule=valuation_pb2.STALE_PRICE_RULE_ZERO,
        rounding_scale=2,
        max_settlement_cycles_per_day=2,
        price_source="bench-prices",
    )
    policy.effective_from.FromDatetime(now - timedelta(days=1))
    validate_risk_policy(policy)
    return policy


def _quote(asset_id: str, price: str, now: datetime) -> valuation_pb2.PriceQuote:
    quote = valuation_pb2.PriceQuote(
        asset_id=asset_id, price=amount_to_proto(price), source="bench-prices"
    )
    quote.observed_at.FromDatetime(now)
    return quote


def _unexpected_variant(side: str, expected: str, update: position_sync_pb2.PositionUpdate) -> None:
    actual = update.WhichOneof("update") or "unset"
    raise MalformedError(
        f"the bench {side} expects {expected} updates, got {actual}",
        metadata={"expected": expected, "actual": actual},
    )


def _nearest_rank(sorted_values: Sequence[float], fraction: float) -> float:
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
