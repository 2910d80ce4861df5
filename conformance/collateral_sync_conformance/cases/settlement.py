"""Settlement cycles at the custodian (docs/PROTOCOL.md §10.6): window, dispute, execution, daily cap.

The kit plays the exchange: it signs settlement instructions for the kit's
``--account`` (pledged to the kit's exchange) paying a tiny amount out of the
pledge into ``<exchange_id>/settlement``, which the custodian must hold. The
daily cap counts cycles per UTC day, and the kit cannot know what an earlier
run opened today, so each case first moves the server's clock to 01:00 of the
next UTC day with TestControlService.AdvanceClock; without test control the
cases are skipped. Instructions left pending execute when the clock passes
their deadline, moving that tiny amount; nothing after these cases counts on it. The
cases of repeats and reused ids (§12.4) move two days on, to 13:00, so that nothing
left pending falls due while they watch the state.

The window is checked on both sides of its end, one second apart: still
PENDING (and open to disputes) one second before the effective deadline,
closed to disputes at it, executed one second after it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
    test_control_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseSkipped,
    Outcome,
    check,
    check_equal,
    expect_ok,
    expect_status,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._checkpoints import (
    expect_attested,
    latest_checkpoint,
    verify_leaf,
)
from collateral_sync_conformance.cases._kit_account import (
    PLEDGE_UNIT,
    QUANTUM,
    ensure_pledged,
    exchange_party,
    holdings,
)
from collateral_sync_conformance.cases._release import pledge_back, pledged_account, release_consent
from collateral_sync_conformance.cases._snapshots import custodian_state, expect_unchanged

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_STATUS = reconciliation_pb2.SettlementStatus
#: The pilot's dispute window (§7.1); the custodian may apply a longer one, never a shorter.
_WINDOW = timedelta(hours=24)
#: The daily cap of the kit's exchange's policy (the pilot's, §7.4).
_CAP = 2
#: Far above any sane daily cap: the kit stops opening cycles here.
_MAX_CYCLES_TRIED = 24
_AMOUNT = format_amount(PLEDGE_UNIT / 10)
#: Below _AMOUNT and uneven, so that a move off by any digit shows.
_UNEVEN = "0.000012345678901234"
_SECOND = timedelta(seconds=1)
#: How late the kit delivers an instruction (issued this long before it is submitted).
_LATE = timedelta(minutes=30)
#: The most clock skew a verifier may allow past expires_at (§3.6 f).
_MAX_SKEW = timedelta(minutes=5)
#: The lifetime of the instruction whose repeats are sent either side of its expiry.
_REPEAT_LIFETIME = timedelta(minutes=20)
#: How long (real time) the kit waits for a settlement that fell due to be executed.
_EXECUTION_WAIT = 5.0


async def _fresh_day(ctx: CaseContext) -> datetime:
    """Move the server's clock to 01:00 UTC of the next day: no cycle opened on it yet."""
    now = await ctx.advance_clock(timedelta(0))
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return await ctx.advance_clock(midnight + timedelta(hours=1) - now)


async def _pledged_asset(ctx: CaseContext) -> tuple[str, str]:
    """(account, asset) with at least the settled amount pledged to the kit's exchange."""
    account_id = await ensure_pledged(ctx)
    statement, _, _ = await holdings(ctx, account_id)
    for position in statement.positions:
        if parse_amount(position.pledged_quantity.value or "0") >= Decimal(_AMOUNT):
            return account_id, position.asset_id
    raise CaseSkipped(f"account {account_id!r} pledges less than {_AMOUNT} of every asset")


async def _instruction(
    ctx: CaseContext,
    account_id: str,
    asset_id: str,
    *,
    cutoff_id: str,
    cycle: int,
    now: datetime,
    amount: str = _AMOUNT,
    expires_at: datetime | None = None,
    settlement_id: str | None = None,
    sequence: int | None = None,
) -> envelope_pb2.Envelope:
    """An instruction issued at ``now``, its dispute deadline ``now`` + the window; a fresh
    ``settlement_id`` unless one is given (and a fresh header sequence unless one is)."""
    message = reconciliation_pb2.SettlementInstruction(
        settlement_id=settlement_id or ctx.unique("conformance-settlement"),
        cutoff_id=cutoff_id,
        account_id=account_id,
        asset_id=asset_id,
        cycle_of_day=cycle,
    )
    message.net_amount.value = amount
    message.dispute_deadline.FromDatetime(now + _WINDOW)
    return await ctx.sign(
        message,
        ctx.key(common_pb2.PARTY_ROLE_EXCHANGE),
        issued_at=now,
        expires_at=expires_at,
        sequence=sequence,
    )


async def _pledged(ctx: CaseContext, account_id: str, asset_id: str) -> str:
    """The account's attested pledge of ``asset_id``: what an executed settlement lowers.

    Not the whole statement nor the log: a server may re-attest as its clock
    moves (yield accrues, statements expire), which is no settlement.
    """
    statement, _, _ = await holdings(ctx, account_id)
    for position in statement.positions:
        if position.asset_id == asset_id:
            return position.pledged_quantity.value or "0"
    return "0"


def _settlement_id(envelope: envelope_pb2.Envelope) -> str:
    return reconciliation_pb2.SettlementInstruction.FromString(envelope.payload).settlement_id


async def _send(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, label: str = "SubmitSettlementInstruction"
) -> Outcome:
    return await ctx.rpc(
        ctx.custodian.submit_settlement_instruction,
        custodian_service_pb2.SubmitSettlementInstructionRequest(settlement_instruction=envelope),
        label=label,
    )


async def _submit(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, label: str = "SubmitSettlementInstruction"
) -> custodian_service_pb2.SubmitSettlementInstructionResponse:
    outcome = await _send(ctx, envelope, label)
    response: custodian_service_pb2.SubmitSettlementInstructionResponse = expect_ok(outcome)
    check_equal(
        "status of a submitted instruction",
        _STATUS.Name(_STATUS.SETTLEMENT_STATUS_PENDING),
        _STATUS.Name(response.status),
    )
    return response


async def _get(ctx: CaseContext, settlement_id: str) -> custodian_service_pb2.GetSettlementResponse:
    outcome = await ctx.rpc(
        ctx.custodian.get_settlement,
        custodian_service_pb2.GetSettlementRequest(settlement_id=settlement_id),
        label="GetSettlement",
    )
    response: custodian_service_pb2.GetSettlementResponse = expect_ok(outcome)
    return response


def _deadline(
    response: custodian_service_pb2.GetSettlementResponse
    | custodian_service_pb2.SubmitSettlementInstructionResponse,
) -> datetime:
    check(
        response.HasField("dispute_deadline"),
        "no dispute_deadline",
        expected="the effective dispute deadline",
        got="none",
    )
    deadline: datetime = response.dispute_deadline.ToDatetime(tzinfo=UTC)
    return deadline


@REGISTRY.case(
    "settlement/instruction-pending-until-window",
    Level.MUST,
    "a settlement instruction stays PENDING, unexecuted, until its dispute deadline (no earlier than the one it names)",
    roles=_CUSTODIAN,
)
async def pending_until_window(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    envelope = await _instruction(
        ctx, account_id, asset_id, cutoff_id="conformance-cutoff-1", cycle=1, now=now
    )
    submitted = await _submit(ctx, envelope)
    deadline = _deadline(submitted)
    check(
        deadline >= now + _WINDOW,
        "the effective dispute deadline is earlier than the instruction's",
        expected=f">= {(now + _WINDOW).isoformat()}",
        got=deadline.isoformat(),
    )
    before = await _pledged(ctx, account_id, asset_id)
    # Just short of the deadline: still pending, nothing moved.
    await ctx.advance_clock(deadline - now - timedelta(minutes=1))
    found = await _get(ctx, _settlement_id(envelope))
    check_equal(
        "status just before the dispute deadline",
        _STATUS.Name(_STATUS.SETTLEMENT_STATUS_PENDING),
        _STATUS.Name(found.status),
    )
    check_equal("dispute_deadline of GetSettlement", deadline, _deadline(found))
    check_equal(
        "the instruction GetSettlement returns",
        envelope.SerializeToString(),
        found.settlement_instruction.SerializeToString(),
    )
    check(
        not found.HasField("attestation"),
        "a pending settlement has an attestation: it was executed",
        expected="no attestation",
        got=str(found.attestation),
    )
    check_equal(
        f"pledged {asset_id} before the deadline", before, await _pledged(ctx, account_id, asset_id)
    )


@REGISTRY.case(
    "settlement/dispute-within-window",
    Level.MUST,
    "a dispute within the window makes the instruction DISPUTED, and it is never executed",
    roles=_CUSTODIAN,
)
async def dispute_within_window(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    envelope = await _instruction(
        ctx, account_id, asset_id, cutoff_id="conformance-cutoff-1", cycle=1, now=now
    )
    deadline = _deadline(await _submit(ctx, envelope))
    settlement_id = _settlement_id(envelope)
    later = await ctx.advance_clock(timedelta(hours=1))
    dispute = reconciliation_pb2.SettlementDispute(
        settlement_id=settlement_id, reason="conformance: the netting does not match"
    )
    outcome = await ctx.rpc(
        ctx.custodian.dispute_settlement,
        custodian_service_pb2.DisputeSettlementRequest(
            settlement_dispute=await ctx.sign(
                dispute, ctx.key(common_pb2.PARTY_ROLE_EXCHANGE), issued_at=later
            )
        ),
        label="DisputeSettlement",
    )
    answer: custodian_service_pb2.DisputeSettlementResponse = expect_ok(outcome)
    disputed = _STATUS.Name(_STATUS.SETTLEMENT_STATUS_DISPUTED)
    check_equal("status DisputeSettlement answers", disputed, _STATUS.Name(answer.status))
    before = await _pledged(ctx, account_id, asset_id)
    # Well past the deadline: a disputed instruction stays unexecuted.
    await ctx.advance_clock(deadline - later + timedelta(hours=1))
    found = await _get(ctx, settlement_id)
    check_equal("status after the deadline", disputed, _STATUS.Name(found.status))
    check(
        found.HasField("settlement_dispute"),
        "GetSettlement of a disputed settlement has no dispute",
        expected="the dispute as received",
        got="none",
    )
    check(
        not found.HasField("attestation"),
        "a disputed settlement was executed",
        expected="no attestation",
        got=str(found.attestation),
    )
    check_equal(
        f"pledged {asset_id} after the deadline of a disputed settlement",
        before,
        await _pledged(ctx, account_id, asset_id),
    )


async def _signed_dispute(
    ctx: CaseContext, settlement_id: str, reason: str = "conformance: the netting does not match"
) -> envelope_pb2.Envelope:
    """A SettlementDispute of the exchange, signed at the server's time."""
    dispute = reconciliation_pb2.SettlementDispute(settlement_id=settlement_id, reason=reason)
    return await ctx.sign(dispute, ctx.key(common_pb2.PARTY_ROLE_EXCHANGE))


async def _send_dispute(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, label: str = "DisputeSettlement"
) -> Outcome:
    return await ctx.rpc(
        ctx.custodian.dispute_settlement,
        custodian_service_pb2.DisputeSettlementRequest(settlement_dispute=envelope),
        label=label,
    )


async def _dispute(ctx: CaseContext, settlement_id: str) -> Outcome:
    """DisputeSettlement as the exchange, signed at the server's time."""
    return await _send_dispute(ctx, await _signed_dispute(ctx, settlement_id))


async def _advance_to(ctx: CaseContext, moment: datetime) -> datetime:
    """Move the server's clock to ``moment`` (not back, if it is already past)."""
    now = await ctx.server_now()
    return await ctx.advance_clock(max(moment - now, timedelta(0)))


async def _executed(
    ctx: CaseContext, settlement_id: str
) -> custodian_service_pb2.GetSettlementResponse:
    """The settlement once EXECUTED with an attestation (the clock just passed its deadline).

    A server may execute in the background rather than before AdvanceClock answers: the
    kit gives it a few (real) seconds.
    """
    found = await _get(ctx, settlement_id)
    waited = time.monotonic() + _EXECUTION_WAIT
    while found.status == _STATUS.SETTLEMENT_STATUS_PENDING and time.monotonic() < waited:
        await asyncio.sleep(0.1)
        found = await _get(ctx, settlement_id)
    check_equal(
        "status one second after the dispute deadline",
        _STATUS.Name(_STATUS.SETTLEMENT_STATUS_EXECUTED),
        _STATUS.Name(found.status),
    )
    check(
        found.HasField("attestation"),
        "an executed settlement has no attestation of the move",
        expected="the AttestationRef of the client's SETTLEMENT holdings statement",
        got="none",
    )
    return found


async def _attested_move(
    ctx: CaseContext, ref: attestation_pb2.AttestationRef
) -> tuple[envelope_pb2.Envelope, attestation_pb2.HoldingsStatement]:
    """The client's holdings statement at the settlement's leaf, verified as a log leaf."""
    outcome = await ctx.rpc(
        ctx.owner.custodian.get_inclusion_proof,
        custodian_service_pb2.GetInclusionProofRequest(
            leaf_index=ref.leaf_index, tree_size=ref.tree_size
        ),
        label="GetInclusionProof of the settlement's attestation",
    )
    leaf: custodian_service_pb2.GetInclusionProofResponse = expect_ok(outcome)
    return leaf.holdings_statement, verify_leaf(ctx, leaf.holdings_statement)


def _amounts(statement: attestation_pb2.HoldingsStatement, asset_id: str) -> tuple[str, str]:
    """(quantity, pledged) of ``asset_id`` in a holdings statement, canonical text."""
    for position in statement.positions:
        if position.asset_id == asset_id:
            return (
                format_amount(parse_amount(position.quantity.value or "0")),
                format_amount(parse_amount(position.pledged_quantity.value or "0")),
            )
    return "0", "0"


@REGISTRY.case(
    "settlement/executed-after-window",
    Level.MUST,
    "an undisputed instruction is still PENDING, unexecuted, one second before its effective "
    "dispute deadline, and EXECUTED one second after: its attestation is the client's SETTLEMENT "
    "holdings statement, issued no earlier than the deadline, quantity and pledge down by exactly "
    "the amount",
    roles=_CUSTODIAN,
)
async def executed_after_window(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    envelope = await _instruction(
        ctx,
        account_id,
        asset_id,
        cutoff_id="conformance-cutoff-1",
        cycle=1,
        now=now,
        amount=_UNEVEN,
    )
    deadline = _deadline(await _submit(ctx, envelope))
    settlement_id = _settlement_id(envelope)

    # One second before the deadline: pending, not executed.
    await _advance_to(ctx, deadline - _SECOND)
    found = await _get(ctx, settlement_id)
    check_equal(
        "status one second before the dispute deadline",
        _STATUS.Name(_STATUS.SETTLEMENT_STATUS_PENDING),
        _STATUS.Name(found.status),
    )
    check(
        not found.HasField("attestation"),
        "a settlement has an attestation one second before its dispute deadline: it was executed",
        expected="no attestation",
        got=str(found.attestation),
    )
    before, _, _ = await holdings(ctx, account_id)
    since = await latest_checkpoint(ctx)

    # One second after: executed, and attested.
    await ctx.advance_clock(2 * _SECOND)
    found = await _executed(ctx, settlement_id)
    # The account's client may read its settlement too (§4.5).
    as_client = await ctx.rpc(
        ctx.owner.custodian.get_settlement,
        custodian_service_pb2.GetSettlementRequest(settlement_id=settlement_id),
        label="GetSettlement as the account's client",
    )
    check_equal(
        "the settlement as the account's client reads it",
        found.SerializeToString(),
        expect_ok(as_client).SerializeToString(),
    )
    envelope_of_move, statement = await _attested_move(ctx, found.attestation)
    await expect_attested(ctx, envelope_of_move, found.attestation, since=since)
    check_equal("account of the settlement's holdings statement", account_id, statement.account_id)
    check_equal(
        "reason of the settlement's holdings statement",
        attestation_pb2.HoldingsChangeReason.Name(
            attestation_pb2.HOLDINGS_CHANGE_REASON_SETTLEMENT
        ),
        attestation_pb2.HoldingsChangeReason.Name(statement.reason),
    )
    executed_at = statement.header.issued_at.ToDatetime(tzinfo=UTC)
    check(
        executed_at >= deadline,
        "the settlement was executed before its dispute deadline",
        expected=f"issued_at >= {deadline.isoformat()}",
        got=executed_at.isoformat(),
    )
    quantity, pledged = _amounts(before, asset_id)
    amount = parse_amount(_UNEVEN)
    check_equal(
        f"(quantity, pledged) of {asset_id} after the settlement of {_UNEVEN}",
        (
            format_amount(parse_amount(quantity) - amount),
            format_amount(parse_amount(pledged) - amount),
        ),
        _amounts(statement, asset_id),
    )


@REGISTRY.case(
    "settlement/dispute-at-deadline-refused",
    Level.MUST,
    "an instruction delivered late keeps the whole window from its receipt; a dispute one second "
    "before that effective deadline is accepted (DISPUTED), one at the deadline is refused: "
    "FAILED_PRECONDITION STATE_CONFLICT, and the instruction is not disputed",
    roles=_CUSTODIAN,
)
async def dispute_at_deadline(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    # Issued half an hour before the kit delivers them: their own dispute_deadline is half an
    # hour short of receipt + window, which the custodian must give them all the same (§10.6).
    issued = now - _LATE
    first, second = [
        await _instruction(
            ctx,
            account_id,
            asset_id,
            cutoff_id=f"conformance-cutoff-{cycle}",
            cycle=cycle,
            now=issued,
            amount=_UNEVEN,
            expires_at=now + _LATE,
        )
        for cycle in (1, 2)
    ]
    deadlines = []
    for envelope in (first, second):
        deadline = _deadline(await _submit(ctx, envelope))
        check(
            deadline >= now + _WINDOW,
            "the effective dispute deadline of a late instruction is earlier than its receipt "
            "plus the dispute window: the late delivery shortened the window",
            expected=f">= {(now + _WINDOW).isoformat()}",
            got=deadline.isoformat(),
        )
        deadlines.append(deadline)

    # One second before the first's deadline: disputed.
    await _advance_to(ctx, deadlines[0] - _SECOND)
    answer: custodian_service_pb2.DisputeSettlementResponse = expect_ok(
        await _dispute(ctx, _settlement_id(first))
    )
    check_equal(
        "status DisputeSettlement answers one second before the deadline",
        _STATUS.Name(_STATUS.SETTLEMENT_STATUS_DISPUTED),
        _STATUS.Name(answer.status),
    )

    # At the second's deadline: refused, and not recorded.
    await _advance_to(ctx, deadlines[1])
    expect_status(
        await _dispute(ctx, _settlement_id(second)),
        grpc.StatusCode.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATE_CONFLICT,
    )
    found = await _get(ctx, _settlement_id(second))
    check(
        found.status != _STATUS.SETTLEMENT_STATUS_DISPUTED
        and not found.HasField("settlement_dispute"),
        "a dispute refused at the deadline was recorded",
        expected="PENDING or EXECUTED, no dispute",
        got=f"{_STATUS.Name(found.status)}, dispute "
        + ("recorded" if found.HasField("settlement_dispute") else "none"),
    )


# ------------------------------------------------------------------ repeats and reused ids (§12.4)

#: Uneven, unlike _UNEVEN: the figure of the other instruction that reuses a settlement_id.
_OTHER_UNEVEN = "0.000023456789012345"
_DISPUTED = _STATUS.Name(_STATUS.SETTLEMENT_STATUS_DISPUTED)
#: Twelve hours from the 01:00 of a fresh day, where the other settlement cases work.
_MIDDAY = timedelta(hours=12)


async def _pending(ctx: CaseContext) -> tuple[envelope_pb2.Envelope, datetime]:
    """Two fresh days on, at 13:00, an instruction of an uneven amount submitted (PENDING); and
    its deadline.

    What earlier cases left pending falls due within the day after theirs: the second move
    passes it, so it is executed while the clock moves, not while this case watches the state.
    What this case leaves falls due at 13:00, twelve hours from where other cases start.
    """
    await _fresh_day(ctx)
    await _fresh_day(ctx)
    now = await ctx.advance_clock(_MIDDAY)
    account_id, asset_id = await _pledged_asset(ctx)
    envelope = await _instruction(
        ctx,
        account_id,
        asset_id,
        cutoff_id="conformance-cutoff-1",
        cycle=1,
        now=now,
        amount=_UNEVEN,
    )
    return envelope, _deadline(await _submit(ctx, envelope))


async def _disputed(ctx: CaseContext, envelope: envelope_pb2.Envelope, label: str) -> None:
    """``envelope``, a dispute, is answered DISPUTED."""
    answer: custodian_service_pb2.DisputeSettlementResponse = expect_ok(
        await _send_dispute(ctx, envelope, label)
    )
    check_equal(f"status {label} answers", _DISPUTED, _STATUS.Name(answer.status))


async def _expect_recorded(
    ctx: CaseContext,
    settlement_id: str,
    instruction: envelope_pb2.Envelope,
    dispute: envelope_pb2.Envelope | None = None,
) -> None:
    """GetSettlement returns ``instruction`` and ``dispute`` (if any) as first sent."""
    found = await _get(ctx, settlement_id)
    check_equal(
        "the instruction GetSettlement returns (the one first submitted)",
        instruction.SerializeToString(),
        found.settlement_instruction.SerializeToString(),
    )
    if dispute is not None:
        check_equal(
            "the dispute GetSettlement returns (the one first accepted)",
            dispute.SerializeToString(),
            found.settlement_dispute.SerializeToString(),
        )


@REGISTRY.case(
    "settlement/repeat-returns-recorded",
    Level.MUST,
    "a pending instruction submitted again, the same envelope, is answered from the record — "
    "PENDING with the same effective dispute deadline, not REPLAYED — and changes nothing; "
    "GetSettlement returns it as first sent (§12.4)",
    roles=_CUSTODIAN,
    clauses=("§12.4/repeat-answered-from-record",),
)
async def repeat_returns_recorded(ctx: CaseContext) -> None:
    envelope, deadline = await _pending(ctx)
    before = await custodian_state(ctx)
    again = await _submit(ctx, envelope, "SubmitSettlementInstruction (the same instruction again)")
    check_equal("dispute_deadline answered to the repeat", deadline, _deadline(again))
    await expect_unchanged(ctx, before)
    await _expect_recorded(ctx, _settlement_id(envelope), envelope)


@REGISTRY.case(
    "settlement/expired-repeat-refused",
    Level.MUST,
    "a pending instruction sent again one second before its expires_at is answered from the "
    "record; sent again past expires_at + 5 minutes (any skew a verifier may allow), the same "
    "bytes are refused FAILED_PRECONDITION STATEMENT_EXPIRED, not answered from the record; "
    "neither changes anything and GetSettlement still returns the instruction (§12.4 step 1)",
    roles=_CUSTODIAN,
    clauses=("§12.4/stale-repeat-refused",),
)
async def expired_repeat_refused(ctx: CaseContext) -> None:
    await _fresh_day(ctx)
    await _fresh_day(ctx)
    now = await ctx.advance_clock(_MIDDAY)
    account_id, asset_id = await _pledged_asset(ctx)
    expires = now + _REPEAT_LIFETIME
    envelope = await _instruction(
        ctx,
        account_id,
        asset_id,
        cutoff_id="conformance-cutoff-1",
        cycle=1,
        now=now,
        amount=_UNEVEN,
        expires_at=expires,
    )
    deadline = _deadline(await _submit(ctx, envelope))

    await _advance_to(ctx, expires - _SECOND)
    before = await custodian_state(ctx)
    again = await _submit(ctx, envelope, "SubmitSettlementInstruction (again, 1 s before expiry)")
    check_equal("dispute_deadline answered to the fresh repeat", deadline, _deadline(again))
    await expect_unchanged(ctx, before)

    await _advance_to(ctx, expires + _MAX_SKEW + _SECOND)
    before = await custodian_state(ctx)
    expect_status(
        await _send(ctx, envelope, "SubmitSettlementInstruction (again, past expiry and skew)"),
        grpc.StatusCode.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATEMENT_EXPIRED,
    )
    await expect_unchanged(ctx, before)
    await _expect_recorded(ctx, _settlement_id(envelope), envelope)


@REGISTRY.case(
    "settlement/reused-id-refused",
    Level.MUST,
    "another instruction under the settlement_id of a pending one (the same account, asset and "
    "cycle, another uneven amount) is refused: FAILED_PRECONDITION STATE_CONFLICT, field "
    "settlement_id, under a fresh sequence, under the first one's own and under sequence 1 (the "
    "id before replay, §12.4 steps 3, 4); nothing changes and GetSettlement returns the first (§10.6, "
    "§12.4)",
    roles=_CUSTODIAN,
    clauses=("§12.4/reused-id-refused",),
)
async def reused_id_refused(ctx: CaseContext) -> None:
    first, _ = await _pending(ctx)
    instruction = reconciliation_pb2.SettlementInstruction.FromString(first.payload)
    for label, sequence in (
        ("a fresh sequence", None),
        (f"its sequence {instruction.header.sequence}", instruction.header.sequence),
        ("sequence 1", 1),
    ):
        other = await _instruction(
            ctx,
            instruction.account_id,
            instruction.asset_id,
            cutoff_id=instruction.cutoff_id,
            cycle=instruction.cycle_of_day,
            now=await ctx.server_now(),
            amount=_OTHER_UNEVEN,
            settlement_id=instruction.settlement_id,
            sequence=sequence,
        )
        before = await custodian_state(ctx)
        expect_status(
            await _send(
                ctx,
                other,
                f"SubmitSettlementInstruction (another under a used settlement_id, {label})",
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            _R.ERROR_REASON_STATE_CONFLICT,
            metadata_field="settlement_id",
        )
        await expect_unchanged(ctx, before)
    await _expect_recorded(ctx, instruction.settlement_id, first)


@REGISTRY.case(
    "settlement/dispute-repeat-returns-recorded",
    Level.MUST,
    "the dispute of a pending instruction sent again, the same envelope, is answered from the "
    "record — DISPUTED, not REPLAYED — and changes nothing; GetSettlement returns the dispute as "
    "first sent (§12.4)",
    roles=_CUSTODIAN,
    clauses=("§12.4/repeat-answered-from-record",),
)
async def dispute_repeat_returns_recorded(ctx: CaseContext) -> None:
    instruction, _ = await _pending(ctx)
    settlement_id = _settlement_id(instruction)
    dispute = await _signed_dispute(ctx, settlement_id)
    await _disputed(ctx, dispute, "DisputeSettlement")
    before = await custodian_state(ctx)
    await _disputed(ctx, dispute, "DisputeSettlement (the same dispute again)")
    await expect_unchanged(ctx, before)
    await _expect_recorded(ctx, settlement_id, instruction, dispute)


@REGISTRY.case(
    "settlement/second-dispute-refused",
    Level.MUST,
    "a different dispute of a settlement already disputed, within its window, is refused: "
    "FAILED_PRECONDITION STATE_CONFLICT, field settlement_id; nothing changes and GetSettlement "
    "returns the first dispute (§12.4)",
    roles=_CUSTODIAN,
    clauses=("§12.4/reused-id-refused",),
)
async def second_dispute_refused(ctx: CaseContext) -> None:
    instruction, _ = await _pending(ctx)
    settlement_id = _settlement_id(instruction)
    first = await _signed_dispute(ctx, settlement_id)
    await _disputed(ctx, first, "DisputeSettlement")
    # Different disputes, their bytes sorting below and above the recorded one's: only
    # "the same bytes" answers from the record, not an order.
    sides: dict[str, envelope_pb2.Envelope] = {}
    sequence = reconciliation_pb2.SettlementDispute.FromString(first.payload).header.sequence
    for offset in range(1, 64):
        for claimed in (sequence + offset, max(1, sequence - offset)):
            other = await ctx.sign(
                reconciliation_pb2.SettlementDispute(
                    settlement_id=settlement_id, reason=f"conformance: another reason {offset}"
                ),
                ctx.key(common_pb2.PARTY_ROLE_EXCHANGE),
                sequence=claimed,
            )
            sides.setdefault("below" if other.payload < first.payload else "above", other)
        if len(sides) == 2:
            break
    before = await custodian_state(ctx)
    for side, second in sorted(sides.items()):
        expect_status(
            await _send_dispute(
                ctx, second, f"DisputeSettlement (a different dispute, bytes {side})"
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            _R.ERROR_REASON_STATE_CONFLICT,
            metadata_field="settlement_id",
        )
    await expect_unchanged(ctx, before)
    await _expect_recorded(ctx, settlement_id, instruction, first)


async def _quiet_statement(ctx: CaseContext, account_id: str) -> attestation_pb2.HoldingsStatement:
    """The account's latest statement once no new one has come for a second: instructions
    earlier cases left pending fall due as the clock moves a day, and execute meanwhile."""
    statement, _, _ = await holdings(ctx, account_id)
    deadline = time.monotonic() + _EXECUTION_WAIT
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        again, _, _ = await holdings(ctx, account_id)
        if again.epoch == statement.epoch:
            return again
        statement = again
    return statement


async def _house_holdings(ctx: CaseContext, house_id: str) -> attestation_pb2.HoldingsStatement:
    """The exchange's settlement account as its owner, the exchange, reads it (§4.5)."""
    exchange = exchange_party(ctx)
    reader = ctx.as_party(exchange) if exchange in ctx.identity_parties else ctx.auditor
    outcome = await ctx.rpc(
        reader.custodian.get_holdings_statement,
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=house_id),
        label=f"GetHoldingsStatement of {house_id}",
    )
    response: custodian_service_pb2.GetHoldingsStatementResponse = expect_ok(outcome)
    statement: attestation_pb2.HoldingsStatement = attestation_pb2.HoldingsStatement.FromString(
        response.holdings_statement.payload
    )
    return statement


def _position_of(statement: attestation_pb2.HoldingsStatement, asset_id: str) -> str:
    """An asset's quantity, locked and pledged quantity in a statement, as text ("none")."""
    for p in statement.positions:
        if p.asset_id == asset_id:
            return (
                f"quantity {p.quantity.value}, locked {p.locked_quantity.value or '0'}, "
                f"pledged {p.pledged_quantity.value or '0'}"
            )
    return "none"


def _quantity(position: common_pb2.Position, name: str) -> Decimal:
    return parse_amount(getattr(position, name).value or "0")


@REGISTRY.case(
    "settlement/payer-funds-bound",
    Level.MUST,
    "the client pays at most min(pledged, quantity - locked) of the asset: exactly that is "
    "accepted and one quantum more refused with STATE_CONFLICT naming net_amount; the "
    "exchange pays at most its settlement account's free quantity, the same way; a net of 0 "
    "is INVALID_AMOUNT; every accepted instruction is disputed at once, so nothing moves "
    "(§10.6)",
    roles=_CUSTODIAN,
    clauses=("§10.6/settlement-payer-holds-amount", "§10.6/settlement-net-not-zero"),
)
async def payer_funds_bound(ctx: CaseContext) -> None:
    await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    statement = await _quiet_statement(ctx, account_id)
    [position] = [p for p in statement.positions if p.asset_id == asset_id]
    free = _quantity(position, "quantity") - _quantity(position, "locked_quantity")
    available = min(_quantity(position, "pledged_quantity"), free)
    quantum = Decimal(QUANTUM)

    async def instruct(amount: Decimal | str, label: str, asset: str = asset_id) -> Outcome:
        text = amount if isinstance(amount, str) else format_amount(amount)
        envelope = await _instruction(
            ctx,
            account_id,
            asset,
            cutoff_id="conformance-cutoff-funds",
            cycle=1,
            now=await ctx.server_now(),
            amount=text,
        )
        return await _send(ctx, envelope, f"SubmitSettlementInstruction {label}")

    async def accepted_then_disputed(outcome: Outcome) -> None:
        response: custodian_service_pb2.SubmitSettlementInstructionResponse = expect_ok(outcome)
        check_equal(
            "status of an instruction within the payer's funds",
            _STATUS.Name(_STATUS.SETTLEMENT_STATUS_PENDING),
            _STATUS.Name(response.status),
        )
        request = outcome.request
        assert isinstance(request, custodian_service_pb2.SubmitSettlementInstructionRequest)
        expect_ok(await _dispute(ctx, _settlement_id(request.settlement_instruction)))

    def refused(outcome: Outcome, bound: Decimal) -> None:
        expect_status(
            outcome,
            grpc.StatusCode.FAILED_PRECONDITION,
            _R.ERROR_REASON_STATE_CONFLICT,
            metadata_field="net_amount",
        )
        info = outcome.error_info
        assert info is not None
        check_equal(
            "the refusal's expected (what the payer holds)",
            f"<= {format_amount(bound)}",
            info.metadata["expected"],
        )

    expect_status(
        await instruct("0", "of net 0"),
        grpc.StatusCode.INVALID_ARGUMENT,
        _R.ERROR_REASON_INVALID_AMOUNT,
        metadata_field="net_amount",
    )
    before = await custodian_state(ctx)
    refused(
        await instruct(available + quantum, "one quantum above what the client can pay"), available
    )
    await expect_unchanged(ctx, before)
    await accepted_then_disputed(await instruct(available, "of exactly what the client can pay"))

    # The other way: the exchange's own account pays, out of what it holds free.
    house_id = f"{exchange_party(ctx)}/settlement"
    house = await _house_holdings(ctx, house_id)
    house_free = {
        p.asset_id: _quantity(p, "quantity")
        - _quantity(p, "locked_quantity")
        - _quantity(p, "pledged_quantity")
        for p in house.positions
    }
    paid = max(house_free, key=lambda a: (house_free[a], a)) if house_free else asset_id
    bound = house_free.get(paid, Decimal(0))
    before = await custodian_state(ctx)
    refused(
        await instruct(
            -(bound + quantum), f"where {house_id} pays one quantum above its free {paid}", paid
        ),
        bound,
    )
    await expect_unchanged(ctx, before)
    if bound > 0:
        await accepted_then_disputed(
            await instruct(-bound, f"where {house_id} pays exactly its free {paid}", paid)
        )


@REGISTRY.case(
    "settlement/cycle-of-day-counted",
    Level.MUST,
    "cycle_of_day is the custodian's count of the day's cut-offs: on a fresh day the first "
    "cut-off as cycle 2 is refused with STATE_CONFLICT naming cycle_of_day and accepted as 1, "
    "a second instruction of it as 2 is refused; the next cut-off as 1 is refused and "
    "accepted as 2; every accepted instruction is disputed at once (§10.6)",
    roles=_CUSTODIAN,
    clauses=("§10.6/cycle-of-day-counted",),
)
async def cycle_of_day_counted(ctx: CaseContext) -> None:
    await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)

    async def instruct(cutoff_id: str, cycle: int) -> Outcome:
        envelope = await _instruction(
            ctx,
            account_id,
            asset_id,
            cutoff_id=cutoff_id,
            cycle=cycle,
            now=await ctx.server_now(),
            amount=_UNEVEN,
        )
        return await _send(
            ctx, envelope, f"SubmitSettlementInstruction of {cutoff_id} as cycle {cycle}"
        )

    async def refused(outcome: Outcome, count: int) -> None:
        expect_status(
            outcome,
            grpc.StatusCode.FAILED_PRECONDITION,
            _R.ERROR_REASON_STATE_CONFLICT,
            metadata_field="cycle_of_day",
        )
        info = outcome.error_info
        assert info is not None
        check_equal(
            "the refusal's expected (the custodian's count)", str(count), info.metadata["expected"]
        )

    async def accepted(outcome: Outcome) -> None:
        expect_ok(outcome)
        request = outcome.request
        assert isinstance(request, custodian_service_pb2.SubmitSettlementInstructionRequest)
        expect_ok(await _dispute(ctx, _settlement_id(request.settlement_instruction)))

    first, second = "conformance-cutoff-first", "conformance-cutoff-second"
    before = await custodian_state(ctx)
    await refused(await instruct(first, 2), 1)
    await expect_unchanged(ctx, before)
    await accepted(await instruct(first, 1))
    await refused(await instruct(first, 2), 1)
    await refused(await instruct(second, 1), 2)
    await accepted(await instruct(second, 2))


@REGISTRY.case(
    "settlement/payer-short-at-execution-disputed",
    Level.MUST,
    "an instruction for exactly what the client could pay is accepted; when the client's "
    "pledge has since fallen below it (a pledge release), the custodian does not execute it "
    "at its deadline: it is DISPUTED, with no attestation of a move, and the client's pledge "
    "stays as the release left it (§10.6)",
    roles=_CUSTODIAN,
    clauses=("§10.6/settlement-never-partial",),
)
async def payer_short_at_execution(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    statement = await _quiet_statement(ctx, account_id)
    [position] = [p for p in statement.positions if p.asset_id == asset_id]
    pledged = _quantity(position, "pledged_quantity")
    free = _quantity(position, "quantity") - _quantity(position, "locked_quantity")
    available = min(pledged, free)
    short = Decimal(_UNEVEN)
    if available <= short:
        raise CaseSkipped(f"account {account_id!r} can pay too little {asset_id} to fall short")
    envelope = await _instruction(
        ctx,
        account_id,
        asset_id,
        cutoff_id="conformance-cutoff-short",
        cycle=1,
        now=now,
        amount=format_amount(available),
    )
    deadline = _deadline(
        await _submit(ctx, envelope, "SubmitSettlementInstruction of all it can pay")
    )

    # The exchange consents to releasing enough of the pledge that the client can pay less.
    released = pledged - available + short
    account = await pledged_account(ctx)
    consent = await release_consent(ctx, account, [(asset_id, format_amount(released))])
    expect_ok(
        await ctx.rpc(
            ctx.custodian.release_pledge,
            custodian_service_pb2.ReleasePledgeRequest(consent=consent),
            label=f"ReleasePledge of {format_amount(released)} {asset_id}",
        )
    )
    before, _, _ = await holdings(ctx, account_id)

    # Well past the deadline: when exactly it executes is executed-after-window's.
    await _advance_to(ctx, deadline + timedelta(hours=1))
    settlement_id = _settlement_id(envelope)
    status = _STATUS.SETTLEMENT_STATUS_PENDING
    waited = time.monotonic() + _EXECUTION_WAIT
    while status == _STATUS.SETTLEMENT_STATUS_PENDING and time.monotonic() < waited:
        await asyncio.sleep(0.2)
        status = (await _get(ctx, settlement_id)).status
    check_equal(
        "status of an instruction the payer can no longer pay, past its deadline",
        _STATUS.Name(_STATUS.SETTLEMENT_STATUS_DISPUTED),
        _STATUS.Name(status),
    )
    # And it stays so: a disputed instruction is never executed, also on a later sweep.
    await ctx.advance_clock(_SECOND)
    await asyncio.sleep(0.5)
    check_equal(
        "status of that instruction a second later",
        _STATUS.Name(_STATUS.SETTLEMENT_STATUS_DISPUTED),
        _STATUS.Name((await _get(ctx, settlement_id)).status),
    )
    # The pledge (the yield a fund token earns as the clock moves a day may raise quantity).
    after, _, _ = await holdings(ctx, account_id)
    check_equal(
        f"{account_id}'s pledged {asset_id} after the unpaid settlement",
        _quantity(next(p for p in before.positions if p.asset_id == asset_id), "pledged_quantity"),
        _quantity(next(p for p in after.positions if p.asset_id == asset_id), "pledged_quantity"),
    )
    found = await _get(ctx, settlement_id)
    check(
        not found.HasField("attestation"),
        "a settlement the payer could not pay has an attestation of its move",
        expected="no attestation: nothing moved",
        got=str(found.attestation),
    )

    # What was released is pledged back, for the cases after this one.
    await pledge_back(ctx, account_id, asset_id, released)


@REGISTRY.case(
    "settlement/malformed-refused",
    Level.MUST,
    "an instruction without a settlement id, cut-off, account, asset or net amount, or with a "
    "net amount that is not canonical, is refused with INVALID_ARGUMENT naming the field, "
    "and records nothing (§10.6, §12)",
    roles=_CUSTODIAN,
)
async def malformed_refused(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    before = await custodian_state(ctx)
    for field, reason in (
        ("settlement_id", _R.ERROR_REASON_MALFORMED),
        ("cutoff_id", _R.ERROR_REASON_MALFORMED),
        ("account_id", _R.ERROR_REASON_MALFORMED),
        ("asset_id", _R.ERROR_REASON_MALFORMED),
        ("net_amount", _R.ERROR_REASON_MALFORMED),
        ("net_amount=1.50", _R.ERROR_REASON_INVALID_AMOUNT),
    ):
        message = reconciliation_pb2.SettlementInstruction(
            settlement_id=ctx.unique("conformance-settlement"),
            cutoff_id="conformance-cutoff-malformed",
            account_id=account_id,
            asset_id=asset_id,
            cycle_of_day=1,
        )
        message.net_amount.value = _AMOUNT
        message.dispute_deadline.FromDatetime(now + _WINDOW)
        name = field.split("=")[0]
        if "=" in field:
            message.net_amount.value = field.split("=")[1]
        elif name == "net_amount":
            message.ClearField("net_amount")
        else:
            setattr(message, name, "")
        envelope = await ctx.sign(message, ctx.key(common_pb2.PARTY_ROLE_EXCHANGE), issued_at=now)
        expect_status(
            await _send(ctx, envelope, f"SubmitSettlementInstruction without a good {name}"),
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
            metadata_field=name,
        )
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "settlement/exchange-pays-executed",
    Level.MUST,
    "an instruction with a negative net amount (the exchange pays the client) is executed "
    "after its window: the client's quantity rises by exactly the amount, unpledged, and the "
    "exchange's settlement account falls by it, both in SETTLEMENT holdings statements (§10.6)",
    roles=_CUSTODIAN,
)
async def exchange_pays_executed(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    house_id = f"{exchange_party(ctx)}/settlement"
    # The exchange's account gets what it pays (test control): an uneven deposit.
    await ctx.control(
        ctx.test_control.deposit,
        test_control_pb2.DepositRequest(
            account_id=house_id, asset_id=asset_id, quantity=amount_to_proto("0.5")
        ),
    )
    envelope = await _instruction(
        ctx,
        account_id,
        asset_id,
        cutoff_id="conformance-cutoff-pays",
        cycle=1,
        now=now,
        amount=f"-{_UNEVEN}",
    )
    deadline = _deadline(
        await _submit(ctx, envelope, "SubmitSettlementInstruction the exchange pays")
    )
    await _advance_to(ctx, deadline - _SECOND)
    before, _, _ = await holdings(ctx, account_id)
    house_before = await _house_holdings(ctx, house_id)
    await ctx.advance_clock(2 * _SECOND)
    settlement_id = _settlement_id(envelope)
    found = await _executed(ctx, settlement_id)
    _, statement = await _attested_move(ctx, found.attestation)
    check_equal(
        "reason of the client's settlement statement",
        attestation_pb2.HoldingsChangeReason.Name(
            attestation_pb2.HOLDINGS_CHANGE_REASON_SETTLEMENT
        ),
        attestation_pb2.HoldingsChangeReason.Name(statement.reason),
    )
    quantity, pledged = _amounts(before, asset_id)
    amount = parse_amount(_UNEVEN)
    check_equal(
        f"(quantity, pledged) of {asset_id} after the exchange paid {_UNEVEN}",
        (format_amount(parse_amount(quantity) + amount), pledged),
        _amounts(statement, asset_id),
    )
    house_after = await _house_holdings(ctx, house_id)
    check_equal(
        f"{house_id}'s {asset_id} after it paid {_UNEVEN}",
        format_amount(parse_amount(_amounts(house_before, asset_id)[0]) - amount),
        _amounts(house_after, asset_id)[0],
    )
    check_equal(
        f"reason of {house_id}'s latest statement",
        attestation_pb2.HoldingsChangeReason.Name(
            attestation_pb2.HOLDINGS_CHANGE_REASON_SETTLEMENT
        ),
        attestation_pb2.HoldingsChangeReason.Name(house_after.reason),
    )


# Last: where no cap is kept, it opens many cycles whose amounts leave the pledge later.
@REGISTRY.case(
    "settlement/third-cycle-refused",
    Level.MUST,
    "opening a cycle beyond max_settlement_cycles_per_day is refused: the first two cycles of a day are accepted, the third RESOURCE_EXHAUSTED LIMIT_EXCEEDED, and so is a further cut-off claiming cycle 1 or 2; nothing changed",
    roles=_CUSTODIAN,
)
async def cycle_beyond_cap(ctx: CaseContext) -> None:
    now = await _fresh_day(ctx)
    account_id, asset_id = await _pledged_asset(ctx)
    # The cap is the exchange's policy's (2 in the pilot): open cycles until refused.
    for cycle in range(1, _MAX_CYCLES_TRIED + 1):
        envelope = await _instruction(
            ctx, account_id, asset_id, cutoff_id=f"conformance-cutoff-{cycle}", cycle=cycle, now=now
        )
        before = await custodian_state(ctx)
        outcome = await ctx.rpc(
            ctx.custodian.submit_settlement_instruction,
            custodian_service_pb2.SubmitSettlementInstructionRequest(
                settlement_instruction=envelope
            ),
            label="SubmitSettlementInstruction",
        )
        if outcome.ok:
            continue
        check(
            cycle > 1,
            "the first cycle of a fresh day was refused",
            expected="PENDING",
            got=outcome.summary(),
        )
        expect_status(outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, _R.ERROR_REASON_LIMIT_EXCEEDED)
        # The cap is the one the kit's exchange publishes (the pilot's, which a custodian
        # without any policy applies too): the cycle after it is the first refused.
        check_equal("the first cycle refused (max_settlement_cycles_per_day + 1)", _CAP + 1, cycle)
        # Nothing recorded: a regulator, who may read every settlement, is told NOT_FOUND.
        regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
        expect_status(
            await ctx.rpc(
                regulator.custodian.get_settlement,
                custodian_service_pb2.GetSettlementRequest(settlement_id=_settlement_id(envelope)),
                label="GetSettlement",
            ),
            grpc.StatusCode.NOT_FOUND,
            _R.ERROR_REASON_NOT_FOUND,
        )
        await expect_unchanged(ctx, before)
        # Opening a further cycle is refused whatever number it claims: an allowed one too.
        for claimed in range(1, _CAP + 1):
            further = await _instruction(
                ctx,
                account_id,
                asset_id,
                cutoff_id=f"conformance-cutoff-further-{claimed}",
                cycle=claimed,
                now=now,
            )
            expect_status(
                await _send(
                    ctx, further, f"SubmitSettlementInstruction of a further cycle as {claimed}"
                ),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                _R.ERROR_REASON_LIMIT_EXCEEDED,
            )
        await expect_unchanged(ctx, before)
        return
    check(
        False,
        "no daily cap on settlement cycles",
        expected=f"LIMIT_EXCEEDED within {_MAX_CYCLES_TRIED} cycles of one day",
        got=f"{_MAX_CYCLES_TRIED} cycles accepted",
    )
