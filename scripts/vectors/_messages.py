"""Realistic bodies of every statement type, for the vectors of statements.json.

One scenario runs through them: the client's account acct-0001 at the custodian holds
BENJI and USDC pledged to the exchange; the exchange publishes its policy and prices,
grants a credit line, calls for margin, instructs a liquidation along the client's
pre-authorised path, and allocates the shortfall; both sides state their views at a
cut-off and the regulator compares them; an instruction is settled and disputed; the
account is released in an emergency. The figures follow the rules of docs/PROTOCOL.md
(§7.3 valuation, §8.2 call amount, §9.4 receipt, §9.5 waterfall) so that a reader can
recompute them, although statement verification (§3.6) does not look at them.

Each builder returns the message without its header: the caller signs it (which sets the
header). Statements that embed other statements take the signed envelopes as arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    emergency_pb2,
    envelope_pb2,
    liquidation_pb2,
    margin_pb2,
    pledge_release_pb2,
    position_sync_pb2,
    reconciliation_pb2,
    valuation_pb2,
)
from google.protobuf import duration_pb2

from ._common import EXCHANGE_ID, LOG_ORIGIN, NOW, decimal, timestamp
from .position_tree import _position_leaf

__all__ = [
    "ACCOUNT",
    "CUTOFF",
    "CUTOFF_ID",
    "LIQUIDATION_ID",
    "MARGIN_CALL_ID",
    "RELEASE_ID",
    "SETTLEMENT_ID",
    "attestation_ref",
    "credit_line",
    "emergency_release",
    "emergency_release_receipt",
    "holdings",
    "liquidation_instruction",
    "liquidation_path",
    "liquidation_receipt",
    "margin_call",
    "margin_call_response",
    "margin_call_state",
    "pledge_instruction",
    "price_snapshot",
    "reconciliation_result",
    "reconciliation_statement",
    "redemption_request",
    "risk_policy",
    "settlement_dispute",
    "settlement_instruction",
    "shortfall_allocation",
    "sync_batch",
    "valuation_inputs",
]

ACCOUNT = "acct-0001"
MARGIN_CALL_ID = "margin-call-acct-0001-0001"
LIQUIDATION_ID = "liquidation-acct-0001-0001"
RELEASE_ID = "release-0001"
#: The cut-off of the reconciliation and settlement statements: 00:00 UTC of NOW's day.
CUTOFF = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
CUTOFF_ID = "2026-06-01T00:00:00Z"
SETTLEMENT_ID = f"{CUTOFF_ID}/{ACCOUNT}"
#: The statement id of the client's liquidation path (statements.json's
#: liquidation-path/valid-countersigned), which instructions name.
LIQUIDATION_PATH_ID = "path-acct-0001-v1"
_PRICE_SOURCE = "exchange-index"

_CLASS = common_pb2.AssetClass
#: (asset_id, quantity, locked_quantity, pledged_quantity) of acct-0001 at epoch 3.
_HOLDINGS: tuple[tuple[str, str, str, str], ...] = (
    ("BENJI", "1000000", "0", "1000000"),
    ("USDC", "500000.25", "0", "400000"),
)


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _position(asset: str, quantity: str, locked: str, pledged: str) -> common_pb2.Position:
    return common_pb2.Position(
        account_id=ACCOUNT,
        asset_id=asset,
        quantity=decimal(quantity),
        locked_quantity=decimal(locked),
        pledged_quantity=decimal(pledged),
    )


def holdings(
    epoch: int = 3,
    reason: int = attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
    rows: Sequence[tuple[str, str, str, str]] = _HOLDINGS,
) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement(
        account_id=ACCOUNT,
        exchange_id=EXCHANGE_ID,
        epoch=epoch,
        positions=[_position(*row) for row in rows],
        reason=reason,  # type: ignore[arg-type]
    )


def attestation_ref(leaf_bytes: bytes, leaf_index: int) -> attestation_pb2.AttestationRef:
    """Where a statement sits in the custodian's log: its RFC 9162 leaf hash (§5.1, §5.5)."""
    return attestation_pb2.AttestationRef(
        log_origin=LOG_ORIGIN,
        leaf_index=leaf_index,
        leaf_hash=hashlib.sha256(b"\x00" + leaf_bytes).digest(),
        tree_size=leaf_index + 1,
    )


def risk_policy(effective_from: datetime) -> valuation_pb2.RiskPolicy:
    """The pilot's policy of §7.4, version 3."""
    return valuation_pb2.RiskPolicy(
        version=3,
        effective_from=timestamp(effective_from),
        haircuts=[
            valuation_pb2.AssetClassHaircut(
                asset_class=_CLASS.ASSET_CLASS_TOKENIZED_MMF, collateral_factor=decimal("0.98")
            ),
            valuation_pb2.AssetClassHaircut(
                asset_class=_CLASS.ASSET_CLASS_STABLECOIN, collateral_factor=decimal("0.95")
            ),
            valuation_pb2.AssetClassHaircut(
                asset_class=_CLASS.ASSET_CLASS_TOKENIZED_ETF, collateral_factor=decimal("0.85")
            ),
            valuation_pb2.AssetClassHaircut(
                asset_class=_CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK,
                collateral_factor=decimal("0.6"),
            ),
        ],
        asset_haircuts=[
            valuation_pb2.AssetHaircut(
                asset_id="AAPL-T",
                asset_class=_CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK,
                collateral_factor=decimal("0.55"),
            )
        ],
        concentration_caps=[
            valuation_pb2.ConcentrationCap(
                asset_class=_CLASS.ASSET_CLASS_TOKENIZED_ETF, max_share=decimal("0.4")
            ),
            valuation_pb2.ConcentrationCap(
                asset_class=_CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK, max_share=decimal("0.1")
            ),
        ],
        leverage_cap=decimal("2"),
        maintenance_ratio=decimal("0.5"),
        liquidation_ratio=decimal("0.4"),
        cure_period=_duration(timedelta(hours=24)),
        insurance_fund_balance=decimal("1000000"),
        valuation_currency="USD",
        auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE,
        max_price_age=_duration(timedelta(minutes=5)),
        stale_price_rule=valuation_pb2.STALE_PRICE_RULE_LAST_PRICE,
        rounding_scale=2,
        max_settlement_cycles_per_day=2,
        settlement_dispute_window=_duration(timedelta(hours=24)),
        emergency_release_wait=_duration(timedelta(hours=48)),
        price_source=_PRICE_SOURCE,
        stale_price_factor=decimal("0.9"),
        assets=[
            common_pb2.Asset(
                asset_id="AAPL-T", asset_class=_CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK
            ),
            common_pb2.Asset(asset_id="BENJI", asset_class=_CLASS.ASSET_CLASS_TOKENIZED_MMF),
            common_pb2.Asset(asset_id="SPY-T", asset_class=_CLASS.ASSET_CLASS_TOKENIZED_ETF),
            common_pb2.Asset(asset_id="USDC", asset_class=_CLASS.ASSET_CLASS_STABLECOIN),
        ],
    )


def _quotes(observed_at: datetime) -> list[valuation_pb2.PriceQuote]:
    return [
        valuation_pb2.PriceQuote(
            asset_id=asset,
            price=decimal(price),
            observed_at=timestamp(observed_at),
            source=_PRICE_SOURCE,
        )
        for asset, price in (("AAPL-T", "230"), ("BENJI", "1"), ("SPY-T", "600.125"), ("USDC", "1"))
    ]


def price_snapshot(observed_at: datetime) -> valuation_pb2.PriceSnapshot:
    return valuation_pb2.PriceSnapshot(prices=_quotes(observed_at))


# Valuation of acct-0001 under risk_policy() at the snapshot's prices (§7.3): BENJI
# 1000000 x 1 x 0.98 = 980000, USDC min(400000, 500000.25) x 1 x 0.95 = 380000; no cap binds.
_COLLATERAL_VALUE = "1360000"


def _valuations() -> list[valuation_pb2.PositionValuation]:
    return [
        valuation_pb2.PositionValuation(
            asset_id="BENJI",
            asset_class=_CLASS.ASSET_CLASS_TOKENIZED_MMF,
            eligible_quantity=decimal("1000000"),
            price=decimal("1"),
            market_value=decimal("1000000"),
            collateral_factor=decimal("0.98"),
            collateral_value=decimal("980000"),
        ),
        valuation_pb2.PositionValuation(
            asset_id="USDC",
            asset_class=_CLASS.ASSET_CLASS_STABLECOIN,
            eligible_quantity=decimal("400000"),
            price=decimal("1"),
            market_value=decimal("400000"),
            collateral_factor=decimal("0.95"),
            collateral_value=decimal("380000"),
        ),
    ]


def credit_line(
    holdings_leaf: bytes, holdings_leaf_index: int, observed_at: datetime
) -> valuation_pb2.CreditLine:
    return valuation_pb2.CreditLine(
        account_id=ACCOUNT,
        risk_policy_version=3,
        attestations=[attestation_ref(holdings_leaf, holdings_leaf_index)],
        prices=[q for q in _quotes(observed_at) if q.asset_id in {"BENJI", "USDC"}],
        valuations=_valuations(),
        collateral_value=decimal(_COLLATERAL_VALUE),
        credit_limit=decimal("2720000"),  # 1360000 x leverage_cap 2
        exposure=decimal("1200000.5"),
    )


def valuation_inputs(
    policy: envelope_pb2.Envelope,
    holdings_statements: Sequence[envelope_pb2.Envelope],
    snapshot: envelope_pb2.Envelope,
) -> valuation_pb2.ValuationInputs:
    return valuation_pb2.ValuationInputs(
        risk_policy=policy, holdings_statements=holdings_statements, price_snapshot=snapshot
    )


# The margin call (§8.2) at exposure 2800000: ratio RD(1360000 / 2800000, 2) = 0.48 < 0.5,
# call amount RU(2800000 x 0.5 - 1360000, 2) = 40000.
_EXPOSURE = "2800000"
_CALL_AMOUNT = "40000"


def margin_call(inputs: valuation_pb2.ValuationInputs, due_by: datetime) -> margin_pb2.MarginCall:
    return margin_pb2.MarginCall(
        margin_call_id=MARGIN_CALL_ID,
        account_id=ACCOUNT,
        inputs=inputs,
        risk_policy_version=3,
        exposure=decimal(_EXPOSURE),
        collateral_value=decimal(_COLLATERAL_VALUE),
        collateral_ratio=decimal("0.48"),
        call_amount=decimal(_CALL_AMOUNT),
        due_by=timestamp(due_by),
    )


def margin_call_response() -> margin_pb2.MarginCallResponse:
    return margin_pb2.MarginCallResponse(
        margin_call_id=MARGIN_CALL_ID,
        kind=margin_pb2.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE,
        agreed_amount=decimal("25000"),
        dispute_reason=margin_pb2.DISPUTE_REASON_VALUATION,
        dispute_detail="BENJI priced at 1; the fund's published NAV for the day is 1.0001",
    )


def margin_call_state(
    call: envelope_pb2.Envelope, updated_at: datetime
) -> margin_pb2.MarginCallState:
    return margin_pb2.MarginCallState(
        margin_call_id=MARGIN_CALL_ID,
        status=margin_pb2.MARGIN_CALL_STATUS_PARTIALLY_AGREED,
        call_amount=decimal(_CALL_AMOUNT),
        agreed_amount=decimal("25000"),
        satisfied_amount=decimal("10000.5"),
        updated_at=timestamp(updated_at),
        margin_call=call,
    )


_PATH_STEPS = (("USDC", "otc-desk", "400000"), ("BENJI", "fund-redemption", "1000000"))


def liquidation_path() -> liquidation_pb2.LiquidationPath:
    return liquidation_pb2.LiquidationPath(
        account_id=ACCOUNT,
        exchange_id=EXCHANGE_ID,
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id=asset, venue=venue, max_quantity=decimal(quantity)
            )
            for asset, venue, quantity in _PATH_STEPS
        ],
        proceeds_account_id="exchange-settlement-0001",
    )


def liquidation_instruction(
    inputs: valuation_pb2.ValuationInputs,
) -> liquidation_pb2.LiquidationInstruction:
    """After the margin call expired: the whole exposure is to be raised (§9.2)."""
    return liquidation_pb2.LiquidationInstruction(
        liquidation_id=LIQUIDATION_ID,
        account_id=ACCOUNT,
        margin_call_id=MARGIN_CALL_ID,
        amount=decimal(_EXPOSURE),
        liquidation_path_id=LIQUIDATION_PATH_ID,
        inputs=inputs,
        risk_policy_version=3,
    )


# The receipt (§9.3, §9.4): yield first, then the path's steps in order, each at most its
# max_quantity: USDC 400000 at 1, BENJI 1000000 at 0.9995; shortfall 2800000 - 1399500.
_SHORTFALL = "1400500"


def liquidation_receipt(
    after_leaf: bytes, after_leaf_index: int
) -> liquidation_pb2.LiquidationReceipt:
    return liquidation_pb2.LiquidationReceipt(
        liquidation_id=LIQUIDATION_ID,
        account_id=ACCOUNT,
        yield_distributions=[
            liquidation_pb2.YieldDistribution(asset_id="BENJI", quantity=decimal("12.5"))
        ],
        fills=[
            liquidation_pb2.LiquidationFill(
                asset_id="USDC",
                quantity=decimal("400000"),
                price=decimal("1"),
                proceeds=decimal("400000"),
                venue="otc-desk",
            ),
            liquidation_pb2.LiquidationFill(
                asset_id="BENJI",
                quantity=decimal("1000000"),
                price=decimal("0.9995"),
                proceeds=decimal("999500"),
                venue="fund-redemption",
            ),
        ],
        total_proceeds=decimal("1399500"),
        shortfall=decimal(_SHORTFALL),
        attestation=attestation_ref(after_leaf, after_leaf_index),
    )


def shortfall_allocation() -> liquidation_pb2.ShortfallAllocation:
    """§9.5: the insurance fund (1000000) first, the remainder by auto-deleveraging."""
    return liquidation_pb2.ShortfallAllocation(
        liquidation_id=LIQUIDATION_ID,
        shortfall=decimal(_SHORTFALL),
        covered_by_insurance_fund=decimal("1000000"),
        insurance_fund_balance_after=decimal("0"),
        auto_deleveraging_amount=decimal("400500"),
        ranking=[
            liquidation_pb2.AutoDeleveragingRank(
                account_id="acct-0042", score=decimal("1875000.125"), rank=1
            ),
            liquidation_pb2.AutoDeleveragingRank(
                account_id="acct-0007", score=decimal("96000"), rank=2
            ),
            liquidation_pb2.AutoDeleveragingRank(
                account_id="acct-0019", score=decimal("96000"), rank=3
            ),
        ],
    )


def sync_batch(
    direction: int, entries: Sequence[position_sync_pb2.SyncEntry]
) -> position_sync_pb2.SyncBatch:
    return position_sync_pb2.SyncBatch(direction=direction, entries=entries)  # type: ignore[arg-type]


def _positions_root(rows: Sequence[tuple[str, str, str, str]]) -> bytes:
    """The positions root of §10.3 over the one account acct-0001: its leaf hash."""
    return hashlib.sha256(b"\x00" + _position_leaf(ACCOUNT, rows)).digest()


#: The exchange's view of acct-0001 at the cut-off: a USDC pledge it has not yet applied.
_EXCHANGE_VIEW: tuple[tuple[str, str, str, str], ...] = (
    ("BENJI", "1000000", "0", "1000000"),
    ("USDC", "500000.25", "0", "399999.75"),
)


def reconciliation_statement(
    role: int, heads: Sequence[tuple[int, int, bytes]]
) -> reconciliation_pb2.ReconciliationStatement:
    """A party's view at CUTOFF (§10.2); ``heads`` are (direction, sequence, entry hash)."""
    rows = _HOLDINGS if role == common_pb2.PARTY_ROLE_CUSTODIAN else _EXCHANGE_VIEW
    return reconciliation_pb2.ReconciliationStatement(
        cutoff_id=CUTOFF_ID,
        cutoff_time=timestamp(CUTOFF),
        party_role=role,  # type: ignore[arg-type]
        sync_log_heads=[
            reconciliation_pb2.SyncLogHead(
                direction=direction,  # type: ignore[arg-type]
                sequence=sequence,
                entry_hash=entry_hash,
            )
            for direction, sequence, entry_hash in heads
        ],
        account_count=1,
        positions_root=_positions_root(rows),
        totals=[
            reconciliation_pb2.AssetTotal(
                asset_id=asset,
                quantity=decimal(quantity),
                locked_quantity=decimal(locked),
                pledged_quantity=decimal(pledged),
            )
            for asset, quantity, locked, pledged in rows
        ],
    )


def reconciliation_result(
    custodian_statement: envelope_pb2.Envelope, exchange_statement: envelope_pb2.Envelope
) -> reconciliation_pb2.ReconciliationResult:
    return reconciliation_pb2.ReconciliationResult(
        cutoff_id=CUTOFF_ID,
        outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS,
        breaks=[
            reconciliation_pb2.ReconciliationBreak(
                account_id=ACCOUNT,
                asset_id="USDC",
                field=reconciliation_pb2.BREAK_FIELD_PLEDGED_QUANTITY,
                custodian_value=decimal("400000"),
                exchange_value=decimal("399999.75"),
            )
        ],
        custodian_statement=custodian_statement,
        exchange_statement=exchange_statement,
    )


def settlement_instruction(dispute_deadline: datetime) -> reconciliation_pb2.SettlementInstruction:
    """The exchange's loss on acct-0001 since its last cycle: the client pays in USDC."""
    return reconciliation_pb2.SettlementInstruction(
        settlement_id=SETTLEMENT_ID,
        cutoff_id=CUTOFF_ID,
        account_id=ACCOUNT,
        asset_id="USDC",
        net_amount=decimal("1250.5"),
        dispute_deadline=timestamp(dispute_deadline),
        cycle_of_day=1,
    )


def settlement_dispute(reason: str) -> reconciliation_pb2.SettlementDispute:
    return reconciliation_pb2.SettlementDispute(settlement_id=SETTLEMENT_ID, reason=reason)


def emergency_release(
    unresponsive_since: datetime | None,
    release_id: str = RELEASE_ID,
    reason: int = emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE,
) -> emergency_pb2.EmergencyRelease:
    """A release of acct-0001's pledge; ``unresponsive_since`` is set when the exchange failed."""
    release = emergency_pb2.EmergencyRelease(
        release_id=release_id,
        account_id=ACCOUNT,
        exchange_id=EXCHANGE_ID,
        reason=reason,  # type: ignore[arg-type]
    )
    if unresponsive_since is not None:
        release.exchange_unresponsive_since.CopyFrom(timestamp(unresponsive_since))
    return release


def emergency_release_receipt(
    release: envelope_pb2.Envelope, executed_at: datetime
) -> emergency_pb2.EmergencyReleaseReceipt:
    return emergency_pb2.EmergencyReleaseReceipt(
        release_id=RELEASE_ID,
        account_id=ACCOUNT,
        executed_at=timestamp(executed_at),
        release=release,
    )


def pledge_instruction() -> custodian_service_pb2.PledgeInstruction:
    return custodian_service_pb2.PledgeInstruction(
        account_id=ACCOUNT, exchange_id=EXCHANGE_ID, asset_id="BENJI", quantity=decimal("250000")
    )


def redemption_request() -> custodian_service_pb2.RedemptionRequest:
    return custodian_service_pb2.RedemptionRequest(
        redemption_id="redemption-acct-0001-0001",
        account_id=ACCOUNT,
        asset_id="USDC",
        quantity=decimal("100000.25"),
    )


# The pledge release (§5.9): the client takes 100000.25 USDC of its 400000 pledged back; the
# exchange consents on the epoch-3 holdings at an exposure of 1000000.
PLEDGE_RELEASE_ID = "pledge-release-acct-0001-0001"
RELEASE_EXPOSURE = "1000000"
RELEASED = (("USDC", "100000.25"),)


def pledge_release_request() -> pledge_release_pb2.PledgeReleaseRequest:
    return pledge_release_pb2.PledgeReleaseRequest(
        release_id=PLEDGE_RELEASE_ID,
        account_id=ACCOUNT,
        exchange_id=EXCHANGE_ID,
        releases=[
            pledge_release_pb2.ReleasedQuantity(asset_id=asset, quantity=decimal(quantity))
            for asset, quantity in RELEASED
        ],
    )


def holdings_after_release() -> list[common_pb2.Position]:
    """The epoch-3 positions with the released quantities taken out of their pledge."""
    released = dict(RELEASED)
    positions = []
    for asset, quantity, locked, pledged in _HOLDINGS:
        left = str(Decimal(pledged) - Decimal(released[asset])) if asset in released else pledged
        positions.append(_position(asset, quantity, locked, left))
    return positions


def pledge_release_consent(
    request: envelope_pb2.Envelope,
    inputs: valuation_pb2.ValuationInputs,
    collateral_value_after: str,
    credit_limit_after: str,
) -> pledge_release_pb2.PledgeReleaseConsent:
    return pledge_release_pb2.PledgeReleaseConsent(
        request=request,
        inputs=inputs,
        risk_policy_version=3,
        exposure=decimal(RELEASE_EXPOSURE),
        collateral_value_after=decimal(collateral_value_after),
        credit_limit_after=decimal(credit_limit_after),
    )


def pledge_release_receipt(
    consent: envelope_pb2.Envelope, executed_at: datetime, holdings: attestation_pb2.AttestationRef
) -> pledge_release_pb2.PledgeReleaseReceipt:
    return pledge_release_pb2.PledgeReleaseReceipt(
        release_id=PLEDGE_RELEASE_ID,
        account_id=ACCOUNT,
        executed_at=timestamp(executed_at),
        consent=consent,
        holdings=holdings,
    )
