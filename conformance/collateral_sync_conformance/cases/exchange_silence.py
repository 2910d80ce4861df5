"""A custodian that falls silent, with the kit as that custodian (PROTOCOL.md §11.2).

Each case falls silent (:meth:`~collateral_sync_conformance._counterpart.KitCustodian.silence`:
the exchange's stream is held without a word, every other RPC answers
UNAVAILABLE) for the exchange's ``custodian_staleness_window`` and a margin
more, checks what the exchange must not do meanwhile, then speaks again and
checks that the exchange does it once it has heard the custodian: a rule kept
by an exchange that never raises credit, never liquidates or never issues a
call again is not kept.

Silence is measured in elapsed time, which the test clock does not move, so
the kit waits it out: a case skips when the exchange's window is longer than
:data:`MAX_WINDOW` (run the exchange under test with a shorter one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import (
    common_pb2,
    liquidation_pb2,
    margin_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import custodian_staleness_window, validate_risk_policy

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import KitCustodian
from collateral_sync_conformance._expect import CaseFailure, CaseSkipped, check, check_equal
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._as_custodian import (
    GRACE,
    SETTLE_TIMEOUT,
    credit_line,
    open_account,
    poll,
    set_exposure,
)
from collateral_sync_conformance.cases._margin import (
    call_state,
    instructions,
    margin_call,
    revalue_at,
    until_status,
)
from collateral_sync_conformance.cases._published import latest_policy

__all__ = ["MAX_WINDOW"]

_EXCHANGE = [Role.EXCHANGE]
_MS = margin_pb2.MarginCallStatus
#: The longest window the kit waits out.
MAX_WINDOW = timedelta(seconds=30)
#: How much longer than the window the kit stays silent before it looks.
_MARGIN = timedelta(seconds=2)
#: Assets the kit's other cases hold, whose price a case must not move.
_SHARED_ASSETS = frozenset({"USDC", "BTC", "BENJI"})


async def _window(ctx: CaseContext) -> timedelta:
    policy = await latest_policy(ctx)
    window = custodian_staleness_window(policy)
    if window > MAX_WINDOW:
        raise CaseSkipped(
            f"the exchange's custodian_staleness_window is {window.total_seconds():g} s; the kit "
            f"waits out at most {MAX_WINDOW.total_seconds():g} s of silence: run the exchange "
            "under test with a shorter window to check §11.2"
        )
    return window


@contextlib.asynccontextmanager
async def _silent(ctx: CaseContext, kit: KitCustodian, window: timedelta) -> AsyncIterator[None]:
    """The kit silent for the window and a margin; on exit, heard again by the exchange."""
    served = kit.sessions_served
    async with kit.silence():
        await asyncio.sleep((window + _MARGIN).total_seconds())
        yield
    if not await kit.wait_heard(served, SETTLE_TIMEOUT):
        raise CaseFailure(
            f"the exchange did not dial its custodian again within {SETTLE_TIMEOUT:.0f} s of it "
            "speaking again (§6.7: re-dial with backoff and resume)",
            expected="a new SyncPositions call",
            got="none",
        )
    await ctx.server_now()  # the kit's statements and heartbeats follow the exchange's clock


async def _run_valuation(ctx: CaseContext, account: str) -> None:
    await ctx.control(
        ctx.test_control.run_valuation, test_control_pb2.RunValuationRequest(account_id=account)
    )


def _limit(line: valuation_pb2.CreditLine | None) -> Decimal:
    return Decimal(0) if line is None else parse_amount(line.credit_limit.value or "0")


def _rising_asset(policy: valuation_pb2.RiskPolicy) -> str:
    """An asset the policy counts that no other case of the kit holds, to move its price."""
    validate_risk_policy(policy)
    factors = {h.asset_class: parse_amount(h.collateral_factor.value) for h in policy.haircuts}
    caps = {c.asset_class: parse_amount(c.max_share.value) for c in policy.concentration_caps}
    classes = {a.asset_id: a.asset_class for a in policy.assets}
    for h in policy.asset_haircuts:
        classes[h.asset_id] = h.asset_class
    overrides = {h.asset_id: parse_amount(h.collateral_factor.value) for h in policy.asset_haircuts}
    for asset_id in sorted(set(classes) - _SHARED_ASSETS):
        asset_class = classes[asset_id]
        factor = overrides.get(asset_id, factors.get(asset_class, Decimal(0)))
        if factor > 0 and caps.get(asset_class, Decimal(1)) > 0:
            return asset_id
    raise CaseSkipped(
        "the exchange's policy counts no asset beyond USDC, BTC and BENJI, whose prices the "
        "kit's other cases rely on"
    )


async def _set_price(ctx: CaseContext, asset_id: str, price: Decimal) -> None:
    source = (await latest_policy(ctx)).price_source
    quote = valuation_pb2.PriceQuote(
        asset_id=asset_id, price=common_pb2.Decimal(value=format_amount(price)), source=source
    )
    quote.observed_at.FromDatetime(await ctx.server_now())
    await ctx.control(ctx.test_control.set_price, test_control_pb2.SetPriceRequest(quote=quote))


@REGISTRY.case(
    "exchange/custodian-silent/credit-not-raised",
    Level.MUST,
    "while the custodian is silent for longer than the policy's custodian_staleness_window, a "
    "price rise of an asset the account holds raises no credit limit the exchange publishes; "
    "once the custodian is heard again, the same valuation raises it (§11.2)",
    roles=_EXCHANGE,
    clauses=("§11.2/silent-no-credit-rise",),
)
async def credit_not_raised(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    window = await _window(ctx)
    asset = _rising_asset(await latest_policy(ctx))
    account, _ = await open_account(ctx, kit, {"USDC": "100000", asset: "37"})
    before = await credit_line(ctx, account)
    limit = _limit(before)
    quoted = [q for q in (before.prices if before else []) if q.asset_id == asset]
    price = parse_amount(quoted[0].price.value) * 3 if quoted else Decimal("401.17")

    async with _silent(ctx, kit, window):
        await _set_price(ctx, asset, price)
        await _run_valuation(ctx, account)
        await asyncio.sleep(GRACE)
        during = _limit(await credit_line(ctx, account))
        check(
            during <= limit,
            f"the exchange raised the credit limit of {account} while its custodian was silent "
            f"(§11.2): {asset} repriced to {format_amount(price)}",
            expected=f"a credit limit of at most {format_amount(limit)}",
            got=format_amount(during),
        )

    async def raised() -> bool:
        await _run_valuation(ctx, account)
        return _limit(await credit_line(ctx, account)) > limit

    await poll(
        ctx,
        raised,
        f"the exchange raises the credit limit of {account} above {format_amount(limit)} once "
        f"its custodian is heard again ({asset} at {format_amount(price)})",
    )


def _instructed(kit: KitCustodian, account: str) -> list[liquidation_pb2.LiquidationInstruction]:
    found = (
        liquidation_pb2.LiquidationInstruction.FromString(e.payload) for e in instructions(kit)
    )
    return [i for i in found if i.account_id == account]


@REGISTRY.case(
    "exchange/custodian-silent/no-liquidation",
    Level.MUST,
    "with the custodian silent for longer than the window, an exposure that puts the account "
    "below the liquidation line leads to no liquidation instruction issued during the silence; "
    "once the custodian is heard again, one is instructed (§11.2)",
    roles=_EXCHANGE,
    clauses=("§11.2/silent-no-liquidation",),
)
async def no_liquidation(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    window = await _window(ctx)
    account, _ = await open_account(ctx, kit, {"USDC": "100000"})
    line = await credit_line(ctx, account)
    value = parse_amount(line.collateral_value.value or "0") if line else Decimal(0)
    if value <= 0:
        raise CaseSkipped("the exchange's policy gives USDC no collateral value")
    liquidation_ratio = parse_amount((await latest_policy(ctx)).liquidation_ratio.value)
    # A ratio of 3/4 of the liquidation line: 0.3 under the pilot's 0.4.
    exposure = (value * 4 / (liquidation_ratio * 3)).quantize(Decimal("0.01"))

    async with _silent(ctx, kit, window):
        await set_exposure(ctx, account, exposure)
        await asyncio.sleep(GRACE)
        spoken = await ctx.server_now()

    async def instructed() -> bool:
        await _run_valuation(ctx, account)
        return bool(_instructed(kit, account))

    await poll(
        ctx,
        instructed,
        f"the exchange instructs a liquidation of {account} (collateral {format_amount(value)}, "
        f"exposure {format_amount(exposure)}) once its custodian is heard again",
    )
    early = [
        i for i in _instructed(kit, account) if i.header.issued_at.ToDatetime(tzinfo=UTC) < spoken
    ]
    check(
        not early,
        f"the exchange instructed a liquidation of {account} while its custodian was silent "
        "(§11.2)",
        expected=f"every instruction for the account issued at or after {spoken.isoformat()}",
        got=", ".join(i.header.issued_at.ToJsonString() for i in early),
    )


@REGISTRY.case(
    "exchange/custodian-silent/call-withdrawn-at-due-by",
    Level.MUST,
    "a margin call issued while the custodian was heard, whose due_by passes while it is "
    "silent, is WITHDRAWN, not EXPIRED, and no liquidation follows; once the custodian is heard "
    "again, the exchange issues a new call for the account, still below maintenance (§11.2)",
    roles=_EXCHANGE,
    clauses=("§11.2/silent-call-withdrawn", "§11.2/silent-no-liquidation"),
)
async def call_withdrawn_at_due_by(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    window = await _window(ctx)
    account, call = await margin_call(ctx, kit)
    due = call.due_by.ToDatetime(tzinfo=UTC)

    async with _silent(ctx, kit, window):
        await revalue_at(ctx, account, due + timedelta(seconds=1))
        state = await until_status(
            ctx,
            call.margin_call_id,
            _MS.MARGIN_CALL_STATUS_WITHDRAWN,
            "the call whose due_by passed while the custodian was silent is WITHDRAWN",
        )
        check_equal(
            "status of the call", _MS.Name(_MS.MARGIN_CALL_STATUS_WITHDRAWN), _MS.Name(state.status)
        )

    def new_call() -> Any:
        return next(
            (
                u
                for u in kit.received
                if u.variant == "margin_call"
                and u.message.account_id == account
                and u.message.margin_call_id != call.margin_call_id
            ),
            None,
        )

    async def called() -> bool:
        await _run_valuation(ctx, account)
        return new_call() is not None

    await poll(
        ctx,
        called,
        f"the exchange issues a new margin call for {account}, still below maintenance, once "
        "its custodian is heard again (§11.2)",
    )
    await asyncio.sleep(GRACE)
    named = [i for i in _instructed(kit, account) if i.margin_call_id == call.margin_call_id]
    check(
        not named,
        f"the exchange instructed a liquidation on {call.margin_call_id}, whose due_by passed "
        "while its custodian was silent (§11.2)",
        expected="no LiquidationInstruction naming the withdrawn call",
        got=f"{len(named)} instruction(s)",
    )
    final = await call_state(ctx, call.margin_call_id)
    check_equal(
        "status of the call after the custodian is heard again",
        _MS.Name(_MS.MARGIN_CALL_STATUS_WITHDRAWN),
        _MS.Name(final.status),
    )
