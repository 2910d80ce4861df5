"""Custodian behaviour beyond the envelope (docs/PROTOCOL.md Appendix A, §5.5, §5.8, §9.1).

A correct pledge must be accepted, attested (a new holdings statement in the
log, reachable by an inclusion proof from a checkpoint that extends the one
before), and change exactly what it says; pledges the custodian cannot honour
are refused with the prescribed reason and change nothing. Conservation
(§5.8) is checked on both sides of each bound, with uneven amounts: pledged
quantity is never redeemable, and exactly what is redeemable is.
"""

from __future__ import annotations

from datetime import UTC, timedelta

import grpc
from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    test_control_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    describe,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._checkpoints import expect_attested, latest_checkpoint
from collateral_sync_conformance.cases._kit_account import (
    QUANTUM,
    PledgePlan,
    client_key,
    ensure_pledged,
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
_SECOND = timedelta(seconds=1)


async def _pledge(
    ctx: CaseContext,
    plan: PledgePlan,
    *,
    quantity: str | None = None,
    account_id: str | None = None,
    asset_id: str | None = None,
    path_statement_id: str | None = None,
) -> custodian_service_pb2.PledgeCollateralRequest:
    instruction = pledge_instruction(plan, quantity)
    path = liquidation_path(plan)
    if account_id is not None:
        instruction.account_id = account_id
        path.account_id = account_id
    if asset_id is not None:
        instruction.asset_id = asset_id
        path.steps[0].asset_id = asset_id
    return custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=await ctx.sign(instruction, plan.client),
        liquidation_path=await ctx.sign(path, plan.client, statement_id=path_statement_id),
    )


async def _verified_response_statement(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, account_id: str, what: str
) -> attestation_pb2.HoldingsStatement:
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


def _check_change(
    before: attestation_pb2.HoldingsStatement,
    after: attestation_pb2.HoldingsStatement,
    reasons: tuple[int, ...],
    expected: dict[str, tuple[str, str, str]],
) -> None:
    """A later epoch, one of ``reasons``, and (quantity, locked, pledged) per asset as expected."""
    check(
        after.epoch > before.epoch,
        "a change of holdings must have a later epoch",
        expected=f"> {before.epoch}",
        got=after.epoch,
    )
    check(
        after.reason in reasons,
        "reason of the new holdings statement",
        expected=" or ".join(_REASON.Name(r) for r in reasons),  # type: ignore[arg-type]
        got=_REASON.Name(after.reason),
    )
    for asset_id, figures in expected.items():
        check_equal(
            f"(quantity, locked, pledged) of {asset_id}", figures, position_figures(after, asset_id)
        )


@REGISTRY.case(
    "custodian/pledge-accepted",
    Level.MUST,
    "a correct pledge is accepted, attested in the log and raises the pledged quantity by exactly its amount",
    roles=_CUSTODIAN,
)
async def pledge_accepted(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    before_statement, _, _ = await holdings(ctx, plan.account_id)
    before = await latest_checkpoint(ctx)
    request = await _pledge(ctx, plan)
    outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
    response: custodian_service_pb2.PledgeCollateralResponse = expect_ok(outcome)
    statement = await _verified_response_statement(
        ctx, response.holdings_statement, plan.account_id, "the statement PledgeCollateral returned"
    )
    quantity, locked, pledged = position_figures(before_statement, plan.asset_id)
    _check_change(
        before_statement,
        statement,
        (_REASON.HOLDINGS_CHANGE_REASON_PLEDGE, _REASON.HOLDINGS_CHANGE_REASON_TOP_UP),
        {plan.asset_id: (quantity, locked, plus(pledged, plan.quantity))},
    )
    check_equal("exchange_id after the pledge", plan.exchange_id, statement.exchange_id)
    latest, _, latest_ref = await holdings(ctx, plan.account_id)
    check_equal("epoch of GetHoldingsStatement after the pledge", statement.epoch, latest.epoch)
    check_equal(
        "attestation of GetHoldingsStatement after the pledge", response.attestation, latest_ref
    )
    await expect_attested(ctx, response.holdings_statement, response.attestation, since=before)


@REGISTRY.case(
    "custodian/deposit-attested",
    Level.MUST,
    "a deposit (test control) is attested: a DEPOSIT holdings statement with exactly the added quantity, in the log",
    roles=_CUSTODIAN,
)
async def deposit_attested(ctx: CaseContext) -> None:
    account = ctx.account()
    before_statement, _, _ = await holdings(ctx, account)
    if not before_statement.positions:
        raise CaseSkipped(f"account {account!r} holds no asset to deposit more of")
    asset_id = before_statement.positions[0].asset_id
    before = await latest_checkpoint(ctx)
    await ctx.control(
        ctx.test_control.deposit,
        test_control_pb2.DepositRequest(
            account_id=account, asset_id=asset_id, quantity=amount_to_proto("1.5")
        ),
    )
    after_statement, envelope, ref = await holdings(ctx, account)
    quantity, locked, pledged = position_figures(before_statement, asset_id)
    _check_change(
        before_statement,
        after_statement,
        (_REASON.HOLDINGS_CHANGE_REASON_DEPOSIT,),
        {asset_id: (plus(quantity, "1.5"), locked, pledged)},
    )
    await expect_attested(ctx, envelope, ref, since=before)


@REGISTRY.case(
    "custodian/yield-accrual-attested",
    Level.MUST,
    "a yield accrual (test control) is attested with reason YIELD_ACCRUAL, raises quantities only, never pledges",
    roles=_CUSTODIAN,
)
async def yield_accrual_attested(ctx: CaseContext) -> None:
    account = ctx.account()
    before_statement, _, _ = await holdings(ctx, account)
    before = await latest_checkpoint(ctx)
    await ctx.control(ctx.test_control.accrue_yield, test_control_pb2.AccrueYieldRequest())
    after_statement, envelope, ref = await holdings(ctx, account)
    if after_statement.epoch == before_statement.epoch:
        raise CaseSkipped(f"account {account!r} holds no asset that accrues yield")
    check_equal(
        "reason of the accrual's holdings statement",
        "HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL",
        _REASON.Name(after_statement.reason),
    )
    grew = False
    for position in after_statement.positions:
        quantity, locked, pledged = position_figures(after_statement, position.asset_id)
        old_quantity, old_locked, old_pledged = position_figures(
            before_statement, position.asset_id
        )
        check(
            parse_amount(quantity) >= parse_amount(old_quantity),
            f"a yield accrual lowered the quantity of {position.asset_id}",
            expected=f">= {old_quantity}",
            got=quantity,
        )
        # Yield is never pledged (§9.3) and locks nothing.
        check_equal(
            f"(locked, pledged) of {position.asset_id} after the accrual",
            (old_locked, old_pledged),
            (locked, pledged),
        )
        grew = grew or parse_amount(quantity) > parse_amount(old_quantity)
    check(
        grew,
        "the accrual's holdings statement raised no quantity",
        expected="a higher quantity",
        got="none",
    )
    await expect_attested(ctx, envelope, ref, since=before)


async def _redemption(
    ctx: CaseContext, plan: PledgePlan, quantity: str
) -> custodian_service_pb2.RequestRedemptionRequest:
    message = custodian_service_pb2.RedemptionRequest(
        redemption_id=ctx.unique("conformance-redemption"),
        account_id=plan.account_id,
        asset_id=plan.asset_id,
        quantity=common_pb2.Decimal(value=quantity),
    )
    return custodian_service_pb2.RequestRedemptionRequest(
        redemption_request=await ctx.sign(message, plan.client)
    )


@REGISTRY.case(
    "custodian/redemption-settles-at-its-time",
    Level.MUST,
    "a redemption lock holds until the settles_at RequestRedemption answered — still locked one "
    "second before, settled (REDEMPTION_SETTLED: quantity and locked down by exactly the "
    "amount, the pledge untouched) one second after (§5.8)",
    roles=_CUSTODIAN,
    clauses=("§5.8/lock-holds-until-settles-at",),
)
async def redemption_settles_at_its_time(ctx: CaseContext) -> None:
    # First of the redemption cases: no earlier lock of this run settles in its window.
    plan = await plan_pledge(ctx)
    amount = plus(plan.quantity, "0.000000000123456789")
    now = await ctx.advance_clock(timedelta(0))  # skips the case without test control
    outcome = await ctx.rpc(
        ctx.custodian.request_redemption,
        await _redemption(ctx, plan, amount),
        label=f"RequestRedemption of {amount}",
    )
    response: custodian_service_pb2.RequestRedemptionResponse = expect_ok(outcome)
    check(
        response.HasField("settles_at"),
        "RequestRedemption did not say when the lock ends",
        expected="settles_at set (Appendix A)",
        got="unset",
    )
    settles_at = response.settles_at.ToDatetime(tzinfo=UTC)
    check(
        settles_at > now,
        "the lock ends no later than it began",
        expected=f"settles_at after {now.isoformat()}",
        got=settles_at.isoformat(),
    )
    locked_statement = await _verified_response_statement(
        ctx,
        response.holdings_statement,
        plan.account_id,
        "the statement RequestRedemption returned",
    )
    _, locked, pledged = position_figures(locked_statement, plan.asset_id)

    await ctx.advance_clock(settles_at - await ctx.advance_clock(timedelta(0)) - _SECOND)
    before, _, _ = await holdings(ctx, plan.account_id)
    _, still_locked, still_pledged = position_figures(before, plan.asset_id)
    check_equal(
        f"locked {plan.asset_id} one second before settles_at (the lock must hold)",
        locked,
        still_locked,
    )
    check_equal(f"pledged {plan.asset_id} before settles_at", pledged, still_pledged)

    await ctx.advance_clock(2 * _SECOND)
    after, _, _ = await holdings(ctx, plan.account_id)
    check(
        after.reason == _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_SETTLED,
        "the latest holdings statement one second after settles_at is not the settlement",
        expected="reason REDEMPTION_SETTLED",
        got=_REASON.Name(after.reason),
    )
    before_quantity, _, _ = position_figures(before, plan.asset_id)
    check_equal(
        f"(quantity, locked, pledged) of {plan.asset_id} after settlement",
        (
            format_amount(parse_amount(before_quantity) - parse_amount(amount)),
            format_amount(parse_amount(locked) - parse_amount(amount)),
            pledged,
        ),
        position_figures(after, plan.asset_id),
    )


@REGISTRY.case(
    "custodian/redemption-locks",
    Level.MUST,
    "a correct redemption request locks exactly its quantity (REDEMPTION_LOCK) and is attested",
    roles=_CUSTODIAN,
)
async def redemption_locks(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)  # the same room a pledge needs: unlocked, unpledged quantity
    before_statement, _, _ = await holdings(ctx, plan.account_id)
    before = await latest_checkpoint(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.request_redemption,
        await _redemption(ctx, plan, plan.quantity),
        label="RequestRedemption",
    )
    response: custodian_service_pb2.RequestRedemptionResponse = expect_ok(outcome)
    statement = await _verified_response_statement(
        ctx,
        response.holdings_statement,
        plan.account_id,
        "the statement RequestRedemption returned",
    )
    quantity, locked, pledged = position_figures(before_statement, plan.asset_id)
    _check_change(
        before_statement,
        statement,
        (_REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK,),
        {plan.asset_id: (quantity, plus(locked, plan.quantity), pledged)},
    )
    await expect_attested(ctx, response.holdings_statement, response.attestation, since=before)


#: The smallest positive amount (§2.1): a bound checked one quantum too loosely fails.


async def _pledged_position(ctx: CaseContext) -> tuple[PledgePlan, str, str, str]:
    """The kit's pledged account and an asset with pledged quantity: (plan, Q, L, P)."""
    account_id = await ensure_pledged(ctx)
    statement, _, _ = await holdings(ctx, account_id)
    for position in statement.positions:
        if parse_amount(position.pledged_quantity.value or "0") > 0:
            plan = PledgePlan(
                client=client_key(ctx),
                account_id=account_id,
                exchange_id=statement.exchange_id,
                asset_id=position.asset_id,
                quantity="0",
                free=parse_amount("0"),
                pledged=parse_amount(position.pledged_quantity.value),
            )
            return (plan, *position_figures(statement, position.asset_id))
    raise CaseFailure(
        f"account {account_id!r} was pledged, yet its holdings statement shows no pledged quantity",
        expected="a position with pledged_quantity > 0",
        got=describe(statement),
    )


def _redeemable(quantity: str, locked: str, pledged: str) -> str:
    return format_amount(parse_amount(quantity) - parse_amount(locked) - parse_amount(pledged))


@REGISTRY.case(
    "custodian/redemption-of-pledged-refused",
    Level.MUST,
    "only quantity - locked - pledged is redeemable: a redemption reaching into the pledge, "
    "even by one quantum, is refused FAILED_PRECONDITION STATE_CONFLICT and changes nothing (§5.8)",
    roles=_CUSTODIAN,
    clauses=("§5.8/conservation",),
)
async def redemption_of_pledged(ctx: CaseContext) -> None:
    plan, quantity, locked, pledged = await _pledged_position(ctx)
    redeemable = _redeemable(quantity, locked, pledged)
    unlocked = format_amount(parse_amount(quantity) - parse_amount(locked))
    for too_much in (unlocked, plus(redeemable, QUANTUM)):
        before = await custodian_state(ctx)
        outcome = await ctx.rpc(
            ctx.custodian.request_redemption,
            await _redemption(ctx, plan, too_much),
            label=f"RequestRedemption of {too_much} (redeemable {redeemable})",
        )
        expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
        await expect_unchanged(ctx, before)


@REGISTRY.case(
    "custodian/redemption-up-to-redeemable-accepted",
    Level.MUST,
    "redemptions up to exactly quantity - locked - pledged are accepted, each locking exactly "
    "its quantity and leaving the pledge as it was; one quantum more is then refused (§5.8)",
    roles=_CUSTODIAN,
    clauses=("§5.8/conservation",),
)
async def redemption_up_to_redeemable(ctx: CaseContext) -> None:
    plan, _, _, _ = await _pledged_position(ctx)
    # Everything redeemable gets locked: test control must be able to give the
    # account room again, or the cases after this one would find none.
    await ctx.control(
        ctx.test_control.deposit,
        test_control_pb2.DepositRequest(
            account_id=plan.account_id,
            asset_id=plan.asset_id,
            quantity=amount_to_proto("0.123456789"),
        ),
    )
    statement, _, _ = await holdings(ctx, plan.account_id)
    quantity, locked, pledged = position_figures(statement, plan.asset_id)
    redeemable = parse_amount(_redeemable(quantity, locked, pledged))
    # Two uneven locks that add up to the bound exactly.
    first = format_amount(
        (redeemable / 3).quantize(parse_amount("0.000000001"), rounding="ROUND_DOWN")
    )
    second = format_amount(redeemable - parse_amount(first))
    for part in (first, second):
        if parse_amount(part) <= 0:
            continue
        outcome = await ctx.rpc(
            ctx.custodian.request_redemption,
            await _redemption(ctx, plan, part),
            label=f"RequestRedemption of {part}",
        )
        response: custodian_service_pb2.RequestRedemptionResponse = expect_ok(outcome)
        after = await _verified_response_statement(
            ctx,
            response.holdings_statement,
            plan.account_id,
            "the statement RequestRedemption returned",
        )
        _check_change(
            statement,
            after,
            (_REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK,),
            {plan.asset_id: (quantity, plus(locked, part), pledged)},
        )
        statement, locked = after, plus(locked, part)
    before = await custodian_state(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.request_redemption,
        await _redemption(ctx, plan, QUANTUM),
        label="RequestRedemption of one quantum past the bound",
    )
    expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "custodian/pledge-exceeding-available-refused",
    Level.MUST,
    "a pledge above quantity - locked - pledged is refused: FAILED_PRECONDITION STATE_CONFLICT",
    roles=_CUSTODIAN,
    clauses=("§5.8/conservation",),
)
async def pledge_exceeding(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    too_much = format_amount(plan.free + parse_amount("1"))
    before = await custodian_state(ctx)
    request = await _pledge(ctx, plan, quantity=too_much)
    outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
    expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "custodian/pledge-unknown-account-refused",
    Level.MUST,
    "a pledge for an account the custodian does not hold is refused: NOT_FOUND",
    roles=_CUSTODIAN,
)
async def pledge_unknown_account(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    before = await custodian_state(ctx)
    request = await _pledge(ctx, plan, account_id=ctx.unique("conformance-no-such-account"))
    outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
    expect_status(outcome, _C.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "custodian/pledge-unknown-asset-refused",
    Level.MUST,
    "a pledge of an asset the custodian does not know is refused: NOT_FOUND",
    roles=_CUSTODIAN,
)
async def pledge_unknown_asset(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    before = await custodian_state(ctx)
    request = await _pledge(ctx, plan, asset_id="CONFORMANCE-NO-SUCH-ASSET")
    outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
    expect_status(outcome, _C.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "custodian/path-without-statement-id-refused",
    Level.MUST,
    "a pledge whose liquidation path has no header.statement_id (the id instructions name it "
    "by, §9.1) is refused: INVALID_ARGUMENT MALFORMED",
    roles=_CUSTODIAN,
    clauses=("§9.1/path-statement-id-set",),
)
async def path_without_statement_id(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    before = await custodian_state(ctx)
    # Recorded, it could be named by no instruction, and relayed to the exchange it would
    # fail the whole sync batch carrying it (§9.1).
    request = await _pledge(ctx, plan, path_statement_id="")
    outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
    expect_status(outcome, _C.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED)
    await expect_unchanged(ctx, before)


def _sorting_around(value: str) -> tuple[str, str]:
    """Another id sorting after ``value``, and one sorting before it (a prefix): a custodian
    that compares the two ids by order rather than for equality lets one of them through."""
    return f"{value}-other", value[:-1]


async def _path_naming_another(ctx: CaseContext, name: str) -> None:
    """Pledges whose path's ``name`` (account_id or exchange_id) is not the pledge's: refused."""
    plan = await plan_pledge(ctx)
    for other in _sorting_around(getattr(pledge_instruction(plan), name)):
        path = liquidation_path(plan)
        setattr(path, name, other)
        request = custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=await ctx.sign(pledge_instruction(plan), plan.client),
            liquidation_path=await ctx.sign(path, plan.client),
        )
        before = await custodian_state(ctx)
        outcome = await ctx.rpc(
            ctx.custodian.pledge_collateral,
            request,
            label=f"PledgeCollateral whose path names {name} {other!r}",
        )
        expect_status(outcome, _C.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED)
        await expect_unchanged(ctx, before)


@REGISTRY.case(
    "custodian/path-of-another-account-refused",
    Level.MUST,
    "a pledge whose liquidation path names another account than its pledge instruction — one "
    "id sorting after the account's, one before it — is refused INVALID_ARGUMENT MALFORMED and "
    "changes nothing (§9.1; the matching path: custodian/pledge-accepted)",
    roles=_CUSTODIAN,
)
async def path_of_another_account(ctx: CaseContext) -> None:
    await _path_naming_another(ctx, "account_id")


@REGISTRY.case(
    "custodian/path-for-another-exchange-refused",
    Level.MUST,
    "a pledge whose liquidation path names another exchange than its pledge instruction — one "
    "id sorting after the exchange's, one before it — is refused INVALID_ARGUMENT MALFORMED "
    "and changes nothing (§9.1; the matching path: custodian/pledge-accepted)",
    roles=_CUSTODIAN,
)
async def path_for_another_exchange(ctx: CaseContext) -> None:
    await _path_naming_another(ctx, "exchange_id")


@REGISTRY.case(
    "custodian/path-id-reused-refused",
    Level.MUST,
    "a top-up whose liquidation path reuses the statement_id of the path in force with other "
    "content (another max_quantity) is refused FAILED_PRECONDITION STATE_CONFLICT and changes "
    "nothing; the path in force itself, sent again with the next top-up, is accepted (§9.1)",
    roles=_CUSTODIAN,
)
async def path_id_reused(ctx: CaseContext) -> None:
    plan = await plan_pledge(ctx)
    path_id = ctx.unique("conformance-path")
    in_force = await ctx.sign(liquidation_path(plan), plan.client, statement_id=path_id)
    changed = liquidation_path(plan)
    changed.steps[0].max_quantity.value = plus(plan.quantity, "0.000000000000123457")
    reused = await ctx.sign(changed, plan.client, statement_id=path_id)

    async def pledge(
        quantity: str, path: envelope_pb2.Envelope
    ) -> custodian_service_pb2.PledgeCollateralRequest:
        return custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=await ctx.sign(pledge_instruction(plan, quantity), plan.client),
            liquidation_path=path,
        )

    outcome = await ctx.rpc(
        ctx.custodian.pledge_collateral,
        await pledge("0.000413", in_force),
        label="PledgeCollateral under a new path",
    )
    expect_ok(outcome)
    before = await custodian_state(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.pledge_collateral,
        await pledge("0.000271", reused),
        label=f"PledgeCollateral (a top-up) whose path reuses the id {path_id!r} with other steps",
    )
    expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    await expect_unchanged(ctx, before)
    outcome = await ctx.rpc(
        ctx.custodian.pledge_collateral,
        await pledge("0.000189", in_force),
        label="PledgeCollateral (a top-up) sending the path in force again",
    )
    expect_ok(outcome)
