"""Pledge preconditions and the change a pledge attests (docs/PROTOCOL.md §2.1, §2.2, §5.8, §9.1).

Run right after the custodian/ cases, with the kit's account pledged to the
kit's exchange: a pledge of exactly the pledgeable quantity (Q - P - L - Y)
is accepted and one quantum more is refused; a pledge's holdings statement
says PLEDGE for an unpledged account's first pledge and TOP_UP for a further
one; a liquidation path is checked step by step, not only its first step; and
(last: a custodian that wrongly accepts it moves the account to the other
exchange) a pledge of the account to another exchange is refused.
"""

from __future__ import annotations

from datetime import timedelta

import grpc
from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    test_control_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseSkipped,
    check,
    check_equal,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._kit_account import (
    QUANTUM,
    PledgePlan,
    client_key,
    ensure_pledged,
    exchange_party,
    holdings,
    liquidation_path,
    plan_pledge,
    pledge_instruction,
    plus,
    position_figures,
)
from collateral_sync_conformance.cases._snapshots import custodian_state, expect_unchanged

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_C = grpc.StatusCode
_REASON = attestation_pb2.HoldingsChangeReason
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE
#: The smallest positive amount (§2.1).


async def _request(
    ctx: CaseContext,
    plan: PledgePlan,
    quantity: str,
    path: liquidation_pb2.LiquidationPath | None = None,
) -> custodian_service_pb2.PledgeCollateralRequest:
    return custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=await ctx.sign(pledge_instruction(plan, quantity), plan.client),
        liquidation_path=await ctx.sign(
            liquidation_path(plan) if path is None else path, plan.client
        ),
    )


async def _pledged(
    ctx: CaseContext, plan: PledgePlan, quantity: str, what: str
) -> attestation_pb2.HoldingsStatement:
    """Pledge ``quantity`` (must be accepted); the verified statement PledgeCollateral returned."""
    outcome = await ctx.rpc(
        ctx.custodian.pledge_collateral,
        await _request(ctx, plan, quantity),
        label=f"PledgeCollateral of {quantity} {plan.asset_id} ({what})",
    )
    response: custodian_service_pb2.PledgeCollateralResponse = expect_ok(outcome)
    return await _verified(ctx, response.holdings_statement, plan.account_id)


async def _verified(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, account_id: str
) -> attestation_pb2.HoldingsStatement:
    what = "the statement PledgeCollateral returned"
    verified = sdk_check(
        what,
        verify_statement,
        envelope,
        ctx.registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=client_key(ctx).party_id,
        now=await ctx.server_now(),
    )
    check_equal(f"issuer of {what}", ctx.server_party_id, verified.issuer)
    check_equal(f"account of {what}", account_id, verified.message.account_id)
    statement: attestation_pb2.HoldingsStatement = verified.message
    return statement


async def _room_of_exactly(ctx: CaseContext, amount: str) -> PledgePlan:
    """The kit's pledged account with an asset whose pledgeable quantity is exactly ``amount``.

    The account's pledged asset is first left with nothing redeemable (a redemption of all
    of Q - P - L, which also ends its accrued yield: Y ≤ Q - P - L = 0), then ``amount`` is
    deposited into it, so that Q - P - L - Y = ``amount`` whatever yield had accrued.
    """
    account_id = await ensure_pledged(ctx)
    statement, _, _ = await holdings(ctx, account_id)
    pledged = [p for p in statement.positions if parse_amount(p.pledged_quantity.value or "0") > 0]
    check(
        bool(pledged),
        f"account {account_id!r} was pledged, yet its holdings statement shows no pledged quantity",
        expected="a position with pledged_quantity > 0",
        got="none",
    )
    asset_id = pledged[0].asset_id
    plan = PledgePlan(
        client=client_key(ctx),
        account_id=account_id,
        exchange_id=exchange_party(ctx),
        asset_id=asset_id,
        quantity=amount,
        free=parse_amount(amount),
        pledged=parse_amount(pledged[0].pledged_quantity.value),
    )
    quantity, locked, pledged_text = position_figures(statement, asset_id)
    redeemable = parse_amount(quantity) - parse_amount(locked) - parse_amount(pledged_text)
    # Test control first: without it the case skips before locking anything.
    await ctx.advance_clock(timedelta(0))
    if redeemable > 0:
        message = custodian_service_pb2.RedemptionRequest(
            redemption_id=ctx.unique("conformance-redemption"),
            account_id=account_id,
            asset_id=asset_id,
            quantity=common_pb2.Decimal(value=format_amount(redeemable)),
        )
        expect_ok(
            await ctx.rpc(
                ctx.custodian.request_redemption,
                custodian_service_pb2.RequestRedemptionRequest(
                    redemption_request=await ctx.sign(message, plan.client)
                ),
                label=f"RequestRedemption of all {format_amount(redeemable)} {asset_id} redeemable",
            )
        )
    await ctx.control(
        ctx.test_control.deposit,
        test_control_pb2.DepositRequest(
            account_id=account_id, asset_id=asset_id, quantity=amount_to_proto(amount)
        ),
    )
    return plan


@REGISTRY.case(
    "custodian/pledge-of-exactly-available-accepted",
    Level.MUST,
    "a pledge of exactly quantity - locked - pledged - accrued yield (an uneven amount, after "
    "a deposit into an asset with nothing else free) is accepted and raises the pledged "
    "quantity by exactly it; one quantum more is then refused FAILED_PRECONDITION "
    "STATE_CONFLICT and changes nothing (§5.8)",
    roles=_CUSTODIAN,
)
async def pledge_of_exactly_available(ctx: CaseContext) -> None:
    amount = "0.731000000000000077"
    plan = await _room_of_exactly(ctx, amount)
    before, _, _ = await holdings(ctx, plan.account_id)
    quantity, locked, pledged = position_figures(before, plan.asset_id)
    check_equal(
        f"quantity - locked - pledged of {plan.asset_id} before the pledge",
        amount,
        format_amount(parse_amount(quantity) - parse_amount(locked) - parse_amount(pledged)),
    )
    after = await _pledged(ctx, plan, amount, "exactly what is available")
    check_equal(
        f"(quantity, locked, pledged) of {plan.asset_id} after the pledge",
        (quantity, locked, plus(pledged, amount)),
        position_figures(after, plan.asset_id),
    )
    state = await custodian_state(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.pledge_collateral,
        await _request(ctx, plan, QUANTUM),
        label=f"PledgeCollateral of one quantum of {plan.asset_id} past the bound",
    )
    expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    await expect_unchanged(ctx, state)


@REGISTRY.case(
    "custodian/pledge-reason-pledge-then-top-up",
    Level.MUST,
    "the holdings statement a pledge returns has reason PLEDGE for the first pledge of an "
    "unpledged account and TOP_UP for a further pledge to the same exchange (§5.8, §6.8)",
    roles=_CUSTODIAN,
)
async def pledge_reason(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    statement, _, _ = await holdings(ctx, plan.account_id)
    if not statement.exchange_id:
        first = await _pledged(ctx, plan, plan.quantity, "the account's first pledge")
        check_equal(
            "reason of the first pledge's holdings statement",
            _REASON.Name(_REASON.HOLDINGS_CHANGE_REASON_PLEDGE),
            _REASON.Name(first.reason),
        )
    further = await _pledged(ctx, plan, plan.quantity, "a further pledge to the same exchange")
    check_equal(
        "reason of a further pledge's holdings statement",
        _REASON.Name(_REASON.HOLDINGS_CHANGE_REASON_TOP_UP),
        _REASON.Name(further.reason),
    )


@REGISTRY.case(
    "custodian/path-with-bad-step-refused",
    Level.MUST,
    "a pledge whose liquidation path has a correct first step and a second whose max_quantity "
    "is negative, or not canonical, is refused INVALID_ARGUMENT INVALID_AMOUNT and changes "
    "nothing: every step is checked (§2.1, §2.2, §9.1)",
    roles=_CUSTODIAN,
)
async def path_with_bad_step(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    for bad in ("-0.001", "0.0010"):
        path = liquidation_path(plan)
        path.steps.add(
            asset_id=plan.asset_id,
            venue="conformance-otc-desk-2",
            max_quantity=common_pb2.Decimal(value=bad),
        )
        before = await custodian_state(ctx)
        outcome = await ctx.rpc(
            ctx.custodian.pledge_collateral,
            await _request(ctx, plan, plan.quantity, path),
            label=f"PledgeCollateral whose path's steps[1].max_quantity is {bad!r}",
        )
        expect_status(outcome, _C.INVALID_ARGUMENT, _R.ERROR_REASON_INVALID_AMOUNT)
        await expect_unchanged(ctx, before)


@REGISTRY.case(
    "custodian/pledge-to-another-exchange-refused",
    Level.MUST,
    "a pledge of an account pledged to one exchange to another registered exchange (every "
    "other exchange the kit has a key of) is refused FAILED_PRECONDITION STATE_CONFLICT — or "
    "NOT_FOUND if the custodian serves no such exchange — and changes nothing (§5.8: the account "
    "is pledged to no other exchange)",
    roles=_CUSTODIAN,
)
async def pledge_to_another_exchange(ctx: CaseContext) -> None:
    await ensure_pledged(ctx)
    plan = await plan_pledge(ctx)
    others = sorted(
        {
            key.party_id
            for key in ctx.config.kit_keys
            if key.role == _EXCHANGE_ROLE and key.party_id != plan.exchange_id
        }
    )
    if not others:
        raise CaseSkipped("needs a --kit-key of a second exchange party, registered at the server")
    for other in others:
        elsewhere = PledgePlan(
            client=plan.client,
            account_id=plan.account_id,
            exchange_id=other,
            asset_id=plan.asset_id,
            quantity=plan.quantity,
            free=plan.free,
            pledged=plan.pledged,
        )
        before = await custodian_state(ctx)
        outcome = await ctx.rpc(
            ctx.custodian.pledge_collateral,
            await _request(ctx, elsewhere, plan.quantity),
            label=f"PledgeCollateral to {other!r} of an account pledged to {plan.exchange_id!r}",
        )
        if outcome.code == _C.NOT_FOUND:
            # The custodian does not serve that exchange: refused all the same.
            expect_status(outcome, _C.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)
        else:
            expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
        await expect_unchanged(ctx, before)
