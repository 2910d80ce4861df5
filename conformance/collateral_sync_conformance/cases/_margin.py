"""Margin calls as the kit's custodian sees them, for the cases that follow one (§8, §9.2).

A call issued on an account of the case's own, as it reached the custodian on
the stream and recomputed by the SDK; its signed state as the exchange serves
it; the liquidation instructions the exchange sent; the exchange's clock moved
to a moment and the account revalued there.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import parse_amount
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import exchange_service_pb2, margin_pb2, test_control_pb2
from collateral_sync.valuation import recompute_margin_call
from google.protobuf import duration_pb2

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import KitCustodian
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    expect_ok,
    sdk_check,
)
from collateral_sync_conformance.cases._as_custodian import (
    SETTLE_TIMEOUT,
    credit_line,
    open_account,
    poll,
    set_exposure,
)
from collateral_sync_conformance.cases._published import latest_policy

__all__ = ["call_state", "instructions", "margin_call", "revalue_at", "until_status"]

_MS = margin_pb2.MarginCallStatus


async def margin_call(ctx: CaseContext, kit: KitCustodian) -> tuple[str, margin_pb2.MarginCall]:
    """A credited account and an exposure between the liquidation line and maintenance.

    Returns the account and the margin call the exchange issued, as it reached
    the custodian on the stream (verified and recomputed by the SDK).
    """
    account, _ = await open_account(ctx, kit)
    line = await credit_line(ctx, account)
    assert line is not None
    value = parse_amount(line.collateral_value.value or "0")
    if value <= 0:
        raise CaseSkipped("the exchange's policy gives USDC no collateral value")
    policy = await latest_policy(ctx)
    maintenance = parse_amount(policy.maintenance_ratio.value)
    liquidation = parse_amount(policy.liquidation_ratio.value)
    exposure = (value * 2 / (maintenance + liquidation)).quantize(Decimal("0.01"))
    await set_exposure(ctx, account, exposure)

    def sent() -> Any:
        return next(
            (
                u
                for u in kit.received
                if u.variant == "margin_call" and u.message.account_id == account
            ),
            None,
        )

    received = await kit.wait_for(sent, SETTLE_TIMEOUT)
    check(
        received is not None,
        "the exchange did not send the custodian its margin call on the stream (§6.8)",
        expected=f"a margin_call update for {account} (collateral {value}, exposure {exposure})",
        got=f"{len(kit.received)} updates, none a call for the account",
    )
    recomputed = sdk_check(
        "the margin call sent to the custodian, recomputed from its signed inputs",
        recompute_margin_call,
        received.envelope,
        ctx.registry,
        audience=kit.party_id,
        now=kit.now(),
    )
    check_equal("exposure the call was computed on", exposure, recomputed.exposure)
    return account, recomputed.margin_call


async def call_state(ctx: CaseContext, call_id: str) -> margin_pb2.MarginCallState:
    outcome = await ctx.rpc(
        ctx.exchange.get_margin_call,
        exchange_service_pb2.GetMarginCallRequest(margin_call_id=call_id),
    )
    response: exchange_service_pb2.GetMarginCallResponse = expect_ok(outcome)
    verified = sdk_check(
        "the margin call state",
        verify_statement,
        response.margin_call_state,
        ctx.registry,
        expected_type=margin_pb2.MarginCallState,
        audience=ctx.kit_party_id,
        now=await ctx.server_now(),
    )
    state: margin_pb2.MarginCallState = verified.message
    return state


async def until_status(
    ctx: CaseContext, call_id: str, status: margin_pb2.MarginCallStatus.ValueType, what: str
) -> margin_pb2.MarginCallState:
    last: list[margin_pb2.MarginCallState] = []

    async def reached() -> bool:
        state = await call_state(ctx, call_id)
        last[:] = [state]
        return state.status == status

    try:
        await poll(ctx, reached, what)
    except CaseFailure as failure:
        got = _MS.Name(last[0].status) if last else "no state"
        raise CaseFailure(failure.message, expected=_MS.Name(status), got=got) from None
    return last[0]


def instructions(kit: KitCustodian) -> list[Any]:
    """Every liquidation instruction the exchange sent, by RPC or on the stream."""
    return [
        *kit.instructions,
        *(u.envelope for u in kit.received if u.variant == "liquidation_instruction"),
    ]


async def revalue_at(ctx: CaseContext, account: str, moment: datetime) -> None:
    """Move the exchange's clock to ``moment`` (not back) and revalue the account there."""
    now = await ctx.server_now()
    by = duration_pb2.Duration()
    by.FromTimedelta(max(moment - now, timedelta(0)))
    await ctx.control(ctx.test_control.advance_clock, test_control_pb2.AdvanceClockRequest(by=by))
    await ctx.server_now()  # the kit follows the exchange's clock
    await ctx.control(
        ctx.test_control.run_valuation, test_control_pb2.RunValuationRequest(account_id=account)
    )
