"""Verifiable margin calls and liquidation instructions, recomputed from their signed inputs.

A verifier checks the signed statement, then each signed input it carries as
evidence at the statement's issued_at, values the holdings again and compares
every stated figure with the recomputed one. Why a mismatch is PROOF_INVALID
is stated in :mod:`collateral_sync.valuation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from collateral_sync.amounts import format_amount
from collateral_sync.errors import VerificationError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    envelope_pb2,
    liquidation_pb2,
    margin_pb2,
    valuation_pb2,
)
from collateral_sync.valuation._arith import (
    _NS_PER_S,
    _R,
    _amount,
    _duration_ns,
    _malformed,
    _non_negative,
    _timestamp_ns,
)
from collateral_sync.valuation._collateral import (
    AssetClass,
    CollateralValuation,
    _call_amount,
    _ratio,
    _value,
)
from collateral_sync.valuation._policy import _parse_policy, _Policy

__all__ = [
    "LiquidationCheck",
    "MarginCallCheck",
    "recompute_liquidation_instruction",
    "recompute_margin_call",
]


def _refuted(field: str, expected: str, actual: str, why: str) -> VerificationError:
    return VerificationError(
        f"{why}: {field} expected {expected}, got {actual}",
        reason=_R.ERROR_REASON_PROOF_INVALID,
        metadata={"field": field, "expected": expected, "actual": actual},
    )


@dataclass(frozen=True, slots=True)
class MarginCallCheck:
    """A margin call confirmed from its signed inputs, with the recomputed figures."""

    margin_call: margin_pb2.MarginCall
    risk_policy: valuation_pb2.RiskPolicy
    #: The holdings statement valued (the latest epoch among the inputs).
    holdings: attestation_pb2.HoldingsStatement
    valuation: CollateralValuation
    exposure: Decimal
    collateral_value: Decimal
    collateral_ratio: Decimal
    call_amount: Decimal


@dataclass(frozen=True, slots=True)
class LiquidationCheck:
    """A liquidation instruction confirmed from its signed inputs."""

    instruction: liquidation_pb2.LiquidationInstruction
    risk_policy: valuation_pb2.RiskPolicy
    holdings: attestation_pb2.HoldingsStatement
    valuation: CollateralValuation
    #: The value to raise: the whole exposure.
    amount: Decimal
    collateral_value: Decimal
    #: None when the amount is 0 (only possible after an expired call).
    collateral_ratio: Decimal | None


@dataclass(frozen=True, slots=True)
class _Inputs:
    policy: valuation_pb2.RiskPolicy
    parsed: _Policy
    snapshot: valuation_pb2.PriceSnapshot
    holdings: attestation_pb2.HoldingsStatement


def _ns_text(ns: int) -> str:
    seconds, nanos = divmod(ns, _NS_PER_S)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()


def _verify_inputs(
    inputs: valuation_pb2.ValuationInputs,
    registry: KeyRegistry,
    *,
    header: envelope_pb2.StatementHeader,
    account_id: str,
    risk_policy_version: int,
    audience: str,
    what: str,
) -> _Inputs:
    """Verify a statement's ValuationInputs as evidence at its issued_at (PROTOCOL.md 8.2).

    ``header`` is the embedding statement's: its issuer must have issued the
    policy and the snapshot, and be the audience and pledgee of the holdings.
    """
    issuer = header.issuer
    issued_at = header.issued_at.ToDatetime(tzinfo=UTC)
    if not account_id:
        raise _malformed("account_id", "a non-empty account id", "''", what)
    for name in ("risk_policy", "price_snapshot"):
        if not inputs.HasField(name):
            raise _malformed(f"inputs.{name}", "a signed statement", "absent", what)
    if not inputs.holdings_statements:
        raise _malformed(
            "inputs.holdings_statements", "at least one signed statement", "none", what
        )

    policy = verify_statement(
        inputs.risk_policy,
        registry,
        expected_type=valuation_pb2.RiskPolicy,
        audience=audience,
        now=issued_at,
    ).message
    _same_issuer(policy.header.issuer, issuer, "inputs.risk_policy.header.issuer")
    parsed = _parse_policy(policy)
    if risk_policy_version != parsed.version:
        raise _refuted(
            "risk_policy_version",
            str(parsed.version),
            str(risk_policy_version),
            f"the {what} names another policy version than the signed policy it carries",
        )
    issued_ns = _timestamp_ns(header.issued_at)
    if policy.HasField("effective_from") and _timestamp_ns(policy.effective_from) > issued_ns:
        raise _refuted(
            "inputs.risk_policy.effective_from",
            f"<= {_ns_text(issued_ns)}",
            policy.effective_from.ToJsonString(),
            f"the policy was not yet in force when the {what} was issued",
        )

    snapshot = verify_statement(
        inputs.price_snapshot,
        registry,
        expected_type=valuation_pb2.PriceSnapshot,
        audience=audience,
        now=issued_at,
    ).message
    _same_issuer(snapshot.header.issuer, issuer, "inputs.price_snapshot.header.issuer")

    latest: attestation_pb2.HoldingsStatement | None = None
    epochs: set[int] = set()
    for i, holdings_envelope in enumerate(inputs.holdings_statements):
        field = f"inputs.holdings_statements[{i}]"
        holdings = verify_statement(
            holdings_envelope,
            registry,
            expected_type=attestation_pb2.HoldingsStatement,
            audience=issuer,
            now=issued_at,
        ).message
        if holdings.account_id != account_id:
            raise _refuted(
                f"{field}.account_id",
                account_id,
                holdings.account_id,
                "holdings statement of another account",
            )
        if holdings.exchange_id != issuer:
            raise _refuted(
                f"{field}.exchange_id",
                issuer,
                holdings.exchange_id,
                f"holdings not pledged to the exchange that issued the {what}",
            )
        if holdings.epoch in epochs:
            raise _refuted(
                f"{field}.epoch",
                "one statement per epoch",
                str(holdings.epoch),
                "two holdings statements for one epoch",
            )
        epochs.add(holdings.epoch)
        if latest is None or holdings.epoch > latest.epoch:
            latest = holdings
    assert latest is not None  # at least one statement, checked above
    return _Inputs(policy=policy, parsed=parsed, snapshot=snapshot, holdings=latest)


def _same_issuer(issuer: str, expected: str, field: str) -> None:
    if issuer != expected:
        raise _refuted(field, expected, issuer, "an input must be issued by the issuer it backs")


def _compare(field: str, recomputed: Decimal, stated: Decimal) -> Decimal:
    if recomputed != stated:
        raise _refuted(
            field,
            format_amount(recomputed),
            format_amount(stated),
            "the stated figure differs from the one recomputed from the signed inputs",
        )
    return recomputed


def _stated(parent: Message, name: str, what: str, *, field: str | None = None) -> Decimal:
    field = field or name
    return _non_negative(_amount(parent, name, field, what), field, what)


def recompute_margin_call(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    audience: str,
    asset_classes: Mapping[str, AssetClass] | None = None,
    now: datetime,
) -> MarginCallCheck:
    """Verify a signed MarginCall and recompute every figure from its signed inputs.

    ``audience`` is the verifying party's id; the call must be addressed to it
    and fresh at ``now``. Each input is verified as evidence at the call's
    issued_at: the risk policy and the price snapshot issued by the call's
    issuer and addressed to ``audience`` (or ``"*"``), the holdings statements
    issued by a custodian, addressed to the call's issuer, for the call's
    account, pledged to the call's issuer, with distinct epochs (the latest
    counts). The valuation time is the call's issued_at. Then collateral
    value, collateral ratio, call amount and ``due_by`` (issued_at +
    cure_period) are compared with the call.

    Returns the recomputed figures. Raises VerificationError (PROOF_INVALID,
    metadata field/expected/actual) on any mismatch, including a call stated
    where none is due; MalformedError for missing or invalid fields; and
    whatever :func:`~collateral_sync.signing.verify_statement` raises for a
    statement that does not verify.
    """
    call = verify_statement(
        envelope, registry, expected_type=margin_pb2.MarginCall, audience=audience, now=now
    ).message
    what = "margin call"
    inputs = _verify_inputs(
        call.inputs,
        registry,
        header=call.header,
        account_id=call.account_id,
        risk_policy_version=call.risk_policy_version,
        audience=audience,
        what=what,
    )
    policy = inputs.parsed
    exposure = _stated(call, "exposure", what)
    stated_value = _stated(call, "collateral_value", what)
    stated_ratio = _stated(call, "collateral_ratio", what)
    stated_amount = _stated(call, "call_amount", what)

    issued_ns = _timestamp_ns(call.header.issued_at)
    valuation = _value(
        policy, inputs.holdings.positions, inputs.snapshot.prices, asset_classes or {}, issued_ns
    )
    value = _compare("collateral_value", valuation.collateral_value, stated_value)
    ratio = _ratio(policy, value, exposure)
    if ratio is None:
        raise _refuted(
            "exposure", "> 0 (no margin call without exposure)", "0", "margin call not due"
        )
    ratio = _compare("collateral_ratio", ratio, stated_ratio)
    amount = _call_amount(policy, value, exposure)
    if amount is None:
        raise _refuted(
            "call_amount",
            f"no call (collateral_ratio {format_amount(ratio)} >= maintenance_ratio "
            f"{format_amount(policy.maintenance_ratio)})",
            format_amount(stated_amount),
            "margin call not due",
        )
    amount = _compare("call_amount", amount, stated_amount)
    due_ns = issued_ns + _duration_ns(inputs.policy.cure_period)
    stated_due = _ns_text(_timestamp_ns(call.due_by)) if call.HasField("due_by") else "absent"
    if not call.HasField("due_by") or _timestamp_ns(call.due_by) != due_ns:
        raise _refuted(
            "due_by", _ns_text(due_ns), stated_due, "due_by is not issued_at + cure_period"
        )
    return MarginCallCheck(
        margin_call=call,
        risk_policy=inputs.policy,
        holdings=inputs.holdings,
        valuation=valuation,
        exposure=exposure,
        collateral_value=value,
        collateral_ratio=ratio,
        call_amount=amount,
    )


def recompute_liquidation_instruction(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    audience: str,
    asset_classes: Mapping[str, AssetClass] | None = None,
    now: datetime,
    margin_call: margin_pb2.MarginCall | None = None,
) -> LiquidationCheck:
    """Verify a signed LiquidationInstruction and recompute it from its signed inputs.

    Inputs are verified as for :func:`recompute_margin_call`. For a breach
    (empty ``margin_call_id``) the ratio of the valued holdings to ``amount``
    (the exposure) must be below the liquidation ratio. After a margin call,
    pass that call (already verified, e.g. from its MarginCallState): it must
    be the one named, for the same account, and ``amount`` must equal its
    exposure. Whether the call has EXPIRED is state, checked by the caller.
    Mismatches raise VerificationError (PROOF_INVALID, field/expected/actual).
    """
    instruction = verify_statement(
        envelope,
        registry,
        expected_type=liquidation_pb2.LiquidationInstruction,
        audience=audience,
        now=now,
    ).message
    what = "liquidation instruction"
    inputs = _verify_inputs(
        instruction.inputs,
        registry,
        header=instruction.header,
        account_id=instruction.account_id,
        risk_policy_version=instruction.risk_policy_version,
        audience=audience,
        what=what,
    )
    policy = inputs.parsed
    amount = _stated(instruction, "amount", what)
    valuation = _value(
        policy,
        inputs.holdings.positions,
        inputs.snapshot.prices,
        asset_classes or {},
        _timestamp_ns(instruction.header.issued_at),
    )
    ratio = _ratio(policy, valuation.collateral_value, amount)
    if instruction.margin_call_id:
        if margin_call is None:
            raise ValueError(
                f"the instruction follows margin call {instruction.margin_call_id!r}; "
                "pass that call as margin_call"
            )
        if margin_call.margin_call_id != instruction.margin_call_id:
            raise _refuted(
                "margin_call_id",
                margin_call.margin_call_id,
                instruction.margin_call_id,
                "the instruction names another margin call",
            )
        if margin_call.account_id != instruction.account_id:
            raise _refuted(
                "account_id",
                margin_call.account_id,
                instruction.account_id,
                "the margin call is for another account",
            )
        _compare("amount", _stated(margin_call, "exposure", "margin call"), amount)
    elif ratio is None or ratio >= policy.liquidation_ratio:
        shown = "undefined (exposure 0)" if ratio is None else format_amount(ratio)
        raise _refuted(
            "amount",
            f"no liquidation (collateral_ratio {shown}, liquidation_ratio "
            f"{format_amount(policy.liquidation_ratio)})",
            format_amount(amount),
            "liquidation not due",
        )
    return LiquidationCheck(
        instruction=instruction,
        risk_policy=inputs.policy,
        holdings=inputs.holdings,
        valuation=valuation,
        amount=amount,
        collateral_value=valuation.collateral_value,
        collateral_ratio=ratio,
    )
