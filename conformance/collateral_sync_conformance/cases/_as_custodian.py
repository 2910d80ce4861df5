"""What the kit does as the exchange's custodian in every case that needs one (``--listen``).

An account opened at the kit's custodian and credited by the exchange under
test, the exchange's credit line of an account, and the check that a statement
the exchange must not credit was not credited — judged only after a later,
good statement was, so that a slow exchange is not taken for a correct one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import KitCustodian, credit_line_of, relies_on
from collateral_sync_conformance._expect import CaseFailure, check
from collateral_sync_conformance.cases._kit_account import client_key

__all__ = [
    "GRACE",
    "HOLDINGS",
    "SETTLE_TIMEOUT",
    "check_not_credited",
    "credit_line",
    "not_credited",
    "open_account",
    "poll",
    "set_exposure",
]

#: How long the exchange may take to prove and credit a statement, or to act on an answer.
SETTLE_TIMEOUT = 20.0
#: After a good statement sent later is credited, how long the kit still watches a bad one.
GRACE = 1.0
#: What an account opened by :func:`open_account` holds, unless the case says otherwise.
HOLDINGS = {"USDC": "100000"}


async def poll(
    ctx: CaseContext,
    probe: Callable[[], Awaitable[Any]],
    what: str,
    timeout: float = SETTLE_TIMEOUT,
) -> Any:
    """Call the coroutine function ``probe`` until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        if loop.time() > deadline:
            raise CaseFailure(f"{what} within {timeout:.0f} s", expected=what, got="not yet")
        await asyncio.sleep(0.1)


async def credit_line(ctx: CaseContext, account: str) -> valuation_pb2.CreditLine | None:
    return await credit_line_of(ctx.exchange, account, ctx.config.rpc_timeout)


async def open_account(
    ctx: CaseContext,
    kit: KitCustodian,
    holdings: dict[str, str] | None = None,
    *,
    prefix: str = "kit",
) -> tuple[str, attestation_pb2.AttestationRef]:
    """A fresh account at the kit's custodian, pledged to the exchange, and credited there."""
    await ctx.server_now()  # the kit signs on the exchange's clock
    account = ctx.unique(prefix)
    change, ref = kit.holdings_change(account, client_key(ctx), holdings or dict(HOLDINGS), epoch=1)
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))

    async def credited() -> bool:
        return relies_on(await credit_line(ctx, account), ref)

    await poll(ctx, credited, f"the exchange credits {account!r} once its statement is proven")
    return account, ref


async def not_credited(ctx: CaseContext, kit: KitCustodian, account: str, what: str) -> None:
    """``account`` holds nothing the exchange counts, even after a later good statement counts."""
    await open_account(ctx, kit)  # a later, proven statement: the exchange has caught up
    await asyncio.sleep(GRACE)
    await check_not_credited(ctx, account, what)


async def check_not_credited(ctx: CaseContext, account: str, what: str) -> None:
    line = await credit_line(ctx, account)
    value = parse_amount(line.collateral_value.value or "0") if line is not None else Decimal(0)
    check(
        line is None or (not line.attestations and value == 0),
        f"the exchange credited {what}",
        expected="no credit line, or one relying on no statement and valuing nothing",
        got=f"collateral value {value}, attestations "
        + ", ".join(f"leaf {a.leaf_index}" for a in (line.attestations if line else [])),
    )


async def set_exposure(ctx: CaseContext, account: str, exposure: Decimal) -> str:
    """SetExposure, then RunValuation, on the exchange under test (test control); returns the
    margin call the valuation issued, if any ("" otherwise)."""
    await ctx.control(
        ctx.test_control.set_exposure,
        test_control_pb2.SetExposureRequest(
            account_id=account, exposure=common_pb2.Decimal(value=format_amount(exposure))
        ),
    )
    valued = await ctx.control(
        ctx.test_control.run_valuation, test_control_pb2.RunValuationRequest(account_id=account)
    )
    call_id: str = valued.margin_call_id
    return call_id
