"""Margin calls with the kit as the exchange's custodian (PROTOCOL.md §8, §9.2).

These cases need ``--listen``: the exchange under test dials the kit's
custodian (:mod:`collateral_sync_conformance._counterpart`), so the kit
decides what the custodian says — a partial agreement, a dispute, top-ups
worth exactly or one quantum less than the amount due, no answer at all — and
watches what the exchange does about it. Each case opens accounts of its own,
so that calls of one case never touch another's.

What the kit checks is what the exchange publishes (GetMarginCall,
ListLiquidations) and what it sends the custodian (margin calls and
liquidation instructions on the stream), every figure recomputed by the SDK
from the signed inputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

import grpc
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    errors_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    margin_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    recompute_liquidation_instruction,
    value_collateral,
)
from google.protobuf import duration_pb2

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import KitCustodian
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._as_custodian import (
    GRACE,
    HOLDINGS,
    SETTLE_TIMEOUT,
    poll,
)
from collateral_sync_conformance.cases._kit_account import client_key
from collateral_sync_conformance.cases._margin import (
    call_state,
    instructions,
    margin_call,
    revalue_at,
    until_status,
)

__all__: list[str] = []

_EXCHANGE = [Role.EXCHANGE]
_MS = margin_pb2.MarginCallStatus
_H = attestation_pb2.HoldingsChangeReason


def _increase_under_call(call: margin_pb2.MarginCall, account: str) -> Callable[[Decimal], Decimal]:
    """What a USDC top-up of ``extra`` adds to the account's collateral value, as §8.4 measures
    it: the account's holdings (``HOLDINGS`` plus ``extra``) valued under the call's own
    policy and price snapshot at its issued_at, minus the call's ``collateral_value``."""
    policy = valuation_pb2.RiskPolicy.FromString(call.inputs.risk_policy.payload)
    snapshot = valuation_pb2.PriceSnapshot.FromString(call.inputs.price_snapshot.payload)
    at = call.header.issued_at.ToDatetime(tzinfo=UTC)
    base = parse_amount(HOLDINGS["USDC"])
    called = parse_amount(call.collateral_value.value)

    def increase(extra: Decimal) -> Decimal:
        quantity = common_pb2.Decimal(value=format_amount(base + extra))
        position = common_pb2.Position(
            account_id=account,
            asset_id="USDC",
            quantity=quantity,
            locked_quantity=common_pb2.Decimal(value="0"),
            pledged_quantity=quantity,
        )
        valued = value_collateral(policy, [position], snapshot.prices, valued_at=at)
        return valued.collateral_value - called

    return increase


def _value_per_unit(increase: Callable[[Decimal], Decimal]) -> Decimal:
    per_unit = increase(Decimal(1000)) / 1000
    if per_unit <= 0:
        raise CaseSkipped("USDC adds no collateral value under the call's policy")
    return per_unit


def _extra_for(increase: Callable[[Decimal], Decimal], target: Decimal) -> Decimal:
    """The smallest USDC top-up that raises the collateral value by exactly ``target``.

    Searched on ever finer quantity grids (down to 18 fraction digits, the Decimal
    limit), since the valuation rounds each position down to the policy's scale.
    """
    per_unit = _value_per_unit(increase)
    for places in range(19):
        unit = Decimal(1).scaleb(-places)
        low, high = 0, int(target / per_unit / unit) + 1
        while increase(high * unit) < target:
            high *= 2
        while low < high:  # the first multiple of unit that reaches the target
            middle = (low + high) // 2
            if increase(middle * unit) < target:
                low = middle + 1
            else:
                high = middle
        if increase(low * unit) == target:
            return low * unit
    raise CaseSkipped(
        f"no USDC top-up raises the collateral value by exactly {format_amount(target)} under "
        "the call's policy"
    )


async def _top_up(
    ctx: CaseContext,
    kit: KitCustodian,
    call: margin_pb2.MarginCall,
    target: Decimal,
    *,
    epoch: int,
    reason: attestation_pb2.HoldingsChangeReason.ValueType = _H.HOLDINGS_CHANGE_REASON_TOP_UP,
) -> None:
    """Attest the call's account holding what makes its collateral value ``target`` more than
    the call's (under the call's own inputs), and announce it on the stream."""
    increase = _increase_under_call(call, call.account_id)
    extra = _extra_for(increase, target)
    await ctx.server_now()  # the kit signs on the exchange's clock
    change, _ = kit.holdings_change(
        call.account_id,
        client_key(ctx),
        {"USDC": format_amount(parse_amount(HOLDINGS["USDC"]) + extra)},
        epoch=epoch,
        reason=reason,
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))


async def _until_satisfied(
    ctx: CaseContext,
    call: margin_pb2.MarginCall,
    amount: Decimal,
    what: str,
    *,
    open_status: margin_pb2.MarginCallStatus.ValueType = _MS.MARGIN_CALL_STATUS_ISSUED,
) -> margin_pb2.MarginCallState:
    """The call's state once it says ``satisfied_amount`` = ``amount``, or leaves
    ``open_status``."""
    last: list[margin_pb2.MarginCallState] = []

    async def settled() -> bool:
        state = await call_state(ctx, call.margin_call_id)
        last[:] = [state]
        satisfied = parse_amount(state.satisfied_amount.value or "0")
        return satisfied == amount or state.status != open_status

    try:
        await poll(ctx, settled, what)
    except CaseFailure as failure:
        got = (
            f"{_MS.Name(last[0].status)}, satisfied_amount {last[0].satisfied_amount.value!r}"
            if last
            else "no state"
        )
        raise CaseFailure(
            failure.message, expected=f"satisfied_amount {format_amount(amount)}", got=got
        ) from None
    return last[0]


def _check_open_with(
    state: margin_pb2.MarginCallState,
    amount: Decimal,
    what: str,
    *,
    open_status: margin_pb2.MarginCallStatus.ValueType = _MS.MARGIN_CALL_STATUS_ISSUED,
) -> None:
    check_equal(
        f"status and satisfied_amount of the call {what} (§8.4)",
        (_MS.Name(open_status), format_amount(amount)),
        (_MS.Name(state.status), state.satisfied_amount.value),
    )


def _response(
    call: margin_pb2.MarginCall, kind: int, agreed: str, reason: int
) -> margin_pb2.MarginCallResponse:
    return margin_pb2.MarginCallResponse(
        margin_call_id=call.margin_call_id,
        kind=kind,  # type: ignore[arg-type]
        agreed_amount=common_pb2.Decimal(value=agreed),
        dispute_reason=reason,  # type: ignore[arg-type]
        dispute_detail="sent by the collateral-sync conformance kit",
    )


async def _advance_past_due(ctx: CaseContext, call: margin_pb2.MarginCall) -> None:
    """Move the exchange's clock past the call's due_by and revalue the account."""
    now = await ctx.server_now()
    due = call.due_by.ToDatetime(tzinfo=now.tzinfo)
    step = max(due - now, timedelta(0)) + timedelta(minutes=1)
    by = duration_pb2.Duration()
    by.FromTimedelta(step)
    await ctx.control(ctx.test_control.advance_clock, test_control_pb2.AdvanceClockRequest(by=by))
    await ctx.server_now()  # the kit follows the exchange's clock
    await ctx.control(
        ctx.test_control.run_valuation,
        test_control_pb2.RunValuationRequest(account_id=call.account_id),
    )


@REGISTRY.case(
    "exchange/margin-call/partial-agreement-then-top-up",
    Level.MUST,
    "a PARTIALLY_AGREE response on the stream makes the call PARTIALLY_AGREED with that amount "
    "due, and a top-up worth at least the agreed part, though less than the call, satisfies it "
    "(§8.1, §8.3, §8.4)",
    roles=_EXCHANGE,
)
async def partial_agreement(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, call = await margin_call(ctx, kit)
    call_amount = parse_amount(call.call_amount.value)
    agreed = (call_amount / 2).quantize(Decimal("0.01"))
    check(
        0 < agreed < call_amount,
        "call too small to agree in part",
        expected="> 0.02",
        got=str(call_amount),
    )
    response = kit.sign(
        _response(
            call,
            margin_pb2.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE,
            format_amount(agreed),
            margin_pb2.DISPUTE_REASON_VALUATION,
        )
    )
    kit.announce(position_sync_pb2.PositionUpdate(margin_call_response=response))
    state = await until_status(
        ctx,
        call.margin_call_id,
        _MS.MARGIN_CALL_STATUS_PARTIALLY_AGREED,
        "the call is PARTIALLY_AGREED after the custodian's partial agreement",
    )
    check_equal("agreed_amount of the call state", format_amount(agreed), state.agreed_amount.value)

    # A top-up between the agreed part and the whole call, valued as §8.4 says:
    # under the call's own policy and price snapshot.
    increase = _increase_under_call(call, account)
    base = parse_amount(HOLDINGS["USDC"])
    target = (agreed + call_amount) / 2
    extra = (target / _value_per_unit(increase)).quantize(Decimal(1))
    check(
        agreed <= increase(extra) < call_amount,
        "the kit could not size a top-up between the agreed part and the call",
        expected=f"an increase in [{agreed}, {call_amount})",
        got=str(increase(extra)),
    )
    await ctx.server_now()
    top_up, _ = kit.holdings_change(
        account,
        client_key(ctx),
        {"USDC": format_amount(base + extra)},
        epoch=2,
        reason=_H.HOLDINGS_CHANGE_REASON_TOP_UP,
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=top_up))
    state = await until_status(
        ctx,
        call.margin_call_id,
        _MS.MARGIN_CALL_STATUS_SATISFIED,
        f"a top-up worth {increase(extra)} (agreed {agreed}, call {call_amount}) satisfies the call",
    )
    satisfied = parse_amount(state.satisfied_amount.value or "0")
    check(
        satisfied >= agreed,
        "satisfied_amount is below the agreed amount of a SATISFIED call",
        expected=f">= {agreed}",
        got=str(satisfied),
    )


def _quantum(call: margin_pb2.MarginCall) -> Decimal:
    """The smallest step of a published figure: 10^-rounding_scale of the call's policy."""
    policy = valuation_pb2.RiskPolicy.FromString(call.inputs.risk_policy.payload)
    return Decimal(1).scaleb(-policy.rounding_scale)


@REGISTRY.case(
    "exchange/margin-call/satisfied-at-amount-due",
    Level.MUST,
    "a top-up worth, under the call's own inputs, one quantum (10^-rounding_scale) less than "
    "the amount due leaves the call ISSUED with exactly that satisfied_amount; the next one, "
    "worth exactly the amount due, makes it SATISFIED with satisfied_amount = the amount due "
    "(§8.4)",
    roles=_EXCHANGE,
)
async def satisfied_at_amount_due(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    _, call = await margin_call(ctx, kit)
    due = parse_amount(call.call_amount.value)  # ISSUED: the whole call is due (§8.1)
    short = due - _quantum(call)
    check(short > 0, "call too small to fall short of", expected="> one quantum", got=str(due))

    await _top_up(ctx, kit, call, short, epoch=2)
    state = await _until_satisfied(
        ctx, call, short, f"the call records a top-up worth {short} (amount due {due})"
    )
    _check_open_with(state, short, f"after a top-up worth one quantum less than the {due} due")

    await _top_up(ctx, kit, call, due, epoch=3)
    state = await until_status(
        ctx,
        call.margin_call_id,
        _MS.MARGIN_CALL_STATUS_SATISFIED,
        f"a top-up worth exactly the amount due ({due}) satisfies the call",
    )
    check_equal(
        "satisfied_amount of the SATISFIED call", format_amount(due), state.satisfied_amount.value
    )


@REGISTRY.case(
    "exchange/margin-call/partial-agreement-below-one-unit",
    Level.MUST,
    "with 0.73 agreed (less than one unit of the currency), a top-up worth one quantum less "
    "leaves the call PARTIALLY_AGREED with exactly that satisfied_amount, and the next, worth "
    "exactly 0.73, makes it SATISFIED with satisfied_amount 0.73 (§8.1, §8.4)",
    roles=_EXCHANGE,
)
async def partial_agreement_below_one_unit(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    _, call = await margin_call(ctx, kit)
    call_amount = parse_amount(call.call_amount.value)
    quantum = _quantum(call)
    agreed = Decimal("0.73")
    check(
        agreed < call_amount and agreed % quantum == 0 and agreed - quantum > 0,
        "the call cannot be agreed in part at 0.73",
        expected=f"a call above 0.73, figures in steps of at most 0.01 (step {quantum})",
        got=f"call {call_amount}",
    )
    response = kit.sign(
        _response(
            call,
            margin_pb2.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE,
            format_amount(agreed),
            margin_pb2.DISPUTE_REASON_VALUATION,
        )
    )
    kit.announce(position_sync_pb2.PositionUpdate(margin_call_response=response))
    partial = _MS.MARGIN_CALL_STATUS_PARTIALLY_AGREED
    await until_status(ctx, call.margin_call_id, partial, "the call is PARTIALLY_AGREED at 0.73")

    short = agreed - quantum
    await _top_up(ctx, kit, call, short, epoch=2)
    state = await _until_satisfied(
        ctx,
        call,
        short,
        f"the call records a top-up worth {short} (0.73 agreed)",
        open_status=partial,
    )
    _check_open_with(
        state, short, "after a top-up one quantum short of 0.73 agreed", open_status=partial
    )

    await _top_up(ctx, kit, call, agreed, epoch=3)
    state = await until_status(
        ctx,
        call.margin_call_id,
        _MS.MARGIN_CALL_STATUS_SATISFIED,
        f"a top-up worth exactly the 0.73 agreed satisfies the call (call {call_amount})",
    )
    check_equal(
        "satisfied_amount of the SATISFIED call",
        format_amount(agreed),
        state.satisfied_amount.value,
    )


@REGISTRY.case(
    "exchange/margin-call/satisfied-amount-follows-holdings",
    Level.MUST,
    "satisfied_amount is the increase, under the call's own inputs, of the collateral value of "
    "the account's latest attested holdings, never below zero: two partial top-ups, then a "
    "statement that lowers the holdings (a settlement), then one that takes them 0.37 below what "
    "the call valued, each publish a MarginCallState with exactly the new figure (0 for the "
    "last), the call still ISSUED (§8.1, §8.4)",
    roles=_EXCHANGE,
)
async def satisfied_amount_follows_holdings(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    _, call = await margin_call(ctx, kit)
    due = parse_amount(call.call_amount.value)
    quantum = _quantum(call)
    # Uneven parts of the amount due, each a multiple of the quantum: up, further up, down.
    steps = [
        (due * Decimal(fraction)).quantize(quantum, rounding=ROUND_DOWN)
        for fraction in ("0.2917", "0.7331", "0.4589")
    ]
    check(
        0 < steps[0] < steps[2] < steps[1] < due,
        "call too small to be satisfied in three distinct parts",
        expected="a call amount of many quanta",
        got=str(due),
    )
    for epoch, (amount, reason, what) in enumerate(
        [
            (steps[0], _H.HOLDINGS_CHANGE_REASON_TOP_UP, "a first partial top-up"),
            (steps[1], _H.HOLDINGS_CHANGE_REASON_TOP_UP, "a second partial top-up"),
            (steps[2], _H.HOLDINGS_CHANGE_REASON_SETTLEMENT, "a settlement that lowers it"),
        ],
        start=2,
    ):
        await _top_up(ctx, kit, call, amount, epoch=epoch, reason=reason)
        state = await _until_satisfied(
            ctx,
            call,
            amount,
            f"the call's satisfied_amount is {amount} after {what} (amount due {due})",
        )
        _check_open_with(state, amount, f"after {what}")
    # Below the holdings the call valued: the increase is negative, satisfied_amount is 0.
    await ctx.server_now()
    below, _ = kit.holdings_change(
        call.account_id,
        client_key(ctx),
        {"USDC": format_amount(parse_amount(HOLDINGS["USDC"]) - Decimal("0.37"))},
        epoch=5,
        reason=_H.HOLDINGS_CHANGE_REASON_SETTLEMENT,
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=below))
    what = "a settlement that takes the holdings 0.37 below what the call valued"
    state = await _until_satisfied(
        ctx, call, Decimal(0), f"the call's satisfied_amount is 0 after {what}"
    )
    _check_open_with(state, Decimal(0), f"after {what}")


@REGISTRY.case(
    "exchange/margin-call/dispute-does-not-expire",
    Level.MUST,
    "a DISPUTE response makes the call DISPUTED; past its due_by it stays DISPUTED and no "
    "liquidation names it (§8.1)",
    roles=_EXCHANGE,
)
async def dispute_does_not_expire(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    _, call = await margin_call(ctx, kit)
    response = kit.sign(
        _response(
            call,
            margin_pb2.MARGIN_CALL_RESPONSE_KIND_DISPUTE,
            "0",
            margin_pb2.DISPUTE_REASON_POSITIONS,
        )
    )
    outcome = await ctx.rpc(
        ctx.exchange.respond_to_margin_call,
        exchange_service_pb2.RespondToMarginCallRequest(margin_call_response=response),
    )
    answered: exchange_service_pb2.RespondToMarginCallResponse = expect_ok(outcome)
    state = margin_pb2.MarginCallState.FromString(answered.margin_call_state.payload)
    check_equal(
        "status after a DISPUTE", _MS.Name(_MS.MARGIN_CALL_STATUS_DISPUTED), _MS.Name(state.status)
    )
    await _advance_past_due(ctx, call)
    await asyncio.sleep(GRACE)
    state = await call_state(ctx, call.margin_call_id)
    check_equal(
        "status of a disputed call past its due_by",
        _MS.Name(_MS.MARGIN_CALL_STATUS_DISPUTED),
        _MS.Name(state.status),
    )
    named = [
        e
        for e in instructions(kit)
        if liquidation_pb2.LiquidationInstruction.FromString(e.payload).margin_call_id
        == call.margin_call_id
    ]
    check(
        not named,
        "the exchange instructed a liquidation for a disputed call",
        expected="no liquidation instruction naming the call",
        got=f"{len(named)} instruction(s)",
    )


#: A MarginCallResponseKind number v1 does not define (§1.3: read as UNSPECIFIED).
_UNKNOWN_KIND = 99


@REGISTRY.case(
    "exchange/margin-call/unknown-response-kind-refused",
    Level.MUST,
    "a response whose kind is a number the enum does not define is read as UNSPECIFIED (§1.3) "
    "and refused INVALID_ARGUMENT MALFORMED (§8.3); the call stays ISSUED",
    roles=_EXCHANGE,
    clauses=("§1.3/unknown-enum-as-unspecified",),
)
async def unknown_response_kind(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    _, call = await margin_call(ctx, kit)
    before = await call_state(ctx, call.margin_call_id)
    check_equal(
        "status of the call before any response",
        _MS.Name(_MS.MARGIN_CALL_STATUS_ISSUED),
        _MS.Name(before.status),
    )
    # Shaped as a dispute (nothing agreed, a reason), so that a receiver taking any kind
    # it does not know for DISPUTE finds nothing else wrong with it.
    response = kit.sign(_response(call, _UNKNOWN_KIND, "0", margin_pb2.DISPUTE_REASON_POSITIONS))
    outcome = await ctx.rpc(
        ctx.exchange.respond_to_margin_call,
        exchange_service_pb2.RespondToMarginCallRequest(margin_call_response=response),
    )
    expect_status(outcome, grpc.StatusCode.INVALID_ARGUMENT, errors_pb2.ERROR_REASON_MALFORMED)
    after = await call_state(ctx, call.margin_call_id)
    check_equal(
        "status and agreed_amount of the call after the refused response (§12.3)",
        (_MS.Name(before.status), before.agreed_amount.value),
        (_MS.Name(after.status), after.agreed_amount.value),
    )


@REGISTRY.case(
    "exchange/margin-call/expiry-instructs-liquidation",
    Level.MUST,
    "an unanswered call past its due_by becomes EXPIRED and the exchange instructs the custodian "
    "to liquidate the call's exposure along the client's pre-authorised path (§8.1, §9.2)",
    roles=_EXCHANGE,
)
async def expiry_instructs_liquidation(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, call = await margin_call(ctx, kit)
    await _advance_past_due(ctx, call)
    await until_status(
        ctx,
        call.margin_call_id,
        _MS.MARGIN_CALL_STATUS_EXPIRED,
        "an unanswered call is EXPIRED once its due_by has passed",
    )

    def instructed() -> Any:
        for envelope in instructions(kit):
            message = liquidation_pb2.LiquidationInstruction.FromString(envelope.payload)
            if message.margin_call_id == call.margin_call_id:
                return envelope
        return None

    envelope = await kit.wait_for(instructed, SETTLE_TIMEOUT)
    check(
        envelope is not None,
        "the exchange did not instruct the custodian to liquidate after the call expired",
        expected=f"a LiquidationInstruction naming {call.margin_call_id}",
        got=f"{len(instructions(kit))} instruction(s), none naming the call",
    )
    checked = sdk_check(
        "the liquidation instruction, recomputed from its signed inputs",
        recompute_liquidation_instruction,
        envelope,
        ctx.registry,
        audience=kit.party_id,
        now=kit.now(),
        margin_call=call,
    )
    check_equal("account of the instruction", account, checked.instruction.account_id)
    check_equal(
        "liquidation_path_id: the client's path the pledge carried",
        f"path-{account}-1",
        checked.instruction.liquidation_path_id,
    )


_SECOND = timedelta(seconds=1)


@REGISTRY.case(
    "exchange/margin-call/open-until-due-by",
    Level.MUST,
    "an unanswered call runs until its due_by (issued_at + the policy's cure_period, which the "
    "SDK recomputes): revalued one second before it, the call is still ISSUED and no liquidation "
    "names it; revalued one second after it, the call is EXPIRED and a liquidation instruction "
    "names it (§8.1, §8.2)",
    roles=_EXCHANGE,
)
async def open_until_due_by(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, call = await margin_call(ctx, kit)
    due = call.due_by.ToDatetime(tzinfo=UTC)

    def naming() -> list[Any]:
        return [
            envelope
            for envelope in instructions(kit)
            if liquidation_pb2.LiquidationInstruction.FromString(envelope.payload).margin_call_id
            == call.margin_call_id
        ]

    # One second before due_by: the cure period is still running. No grace wait here:
    # the exchange's clock runs on while the kit waits, into the due time.
    await revalue_at(ctx, account, due - _SECOND)
    state = await call_state(ctx, call.margin_call_id)
    check_equal(
        "status of the unanswered call one second before its due_by",
        _MS.Name(_MS.MARGIN_CALL_STATUS_ISSUED),
        _MS.Name(state.status),
    )
    check(
        not naming(),
        "the exchange instructed a liquidation for a call before its due_by",
        expected="no liquidation instruction naming the call",
        got=f"{len(naming())} instruction(s)",
    )

    # One second after: expired, and liquidated.
    await revalue_at(ctx, account, due + _SECOND)
    await until_status(
        ctx,
        call.margin_call_id,
        _MS.MARGIN_CALL_STATUS_EXPIRED,
        "the unanswered call is EXPIRED one second after its due_by",
    )
    envelope = await kit.wait_for(lambda: next(iter(naming()), None), SETTLE_TIMEOUT)
    check(
        envelope is not None,
        "the exchange did not instruct the custodian to liquidate one second after the call's "
        "due_by",
        expected=f"a LiquidationInstruction naming {call.margin_call_id}",
        got=f"{len(instructions(kit))} instruction(s), none naming the call",
    )
