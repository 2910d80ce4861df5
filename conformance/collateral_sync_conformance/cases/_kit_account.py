"""Helpers for the kit's own account at the custodian: its holdings, pledges from it, log growth.

The kit acts as the account's client (its ``--kit-key`` of role client) and
as the exchange it pledges to. Holdings statements are verified as addressed
to the client before a case relies on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    liquidation_pb2,
    test_control_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    expect_ok,
    sdk_check,
)
from collateral_sync_conformance.cases._checkpoints import latest_checkpoint

__all__ = [
    "PLEDGE_UNIT",
    "QUANTUM",
    "PledgePlan",
    "client_key",
    "ensure_pledged",
    "exchange_party",
    "grow_log",
    "holdings",
    "liquidation_path",
    "log_size_at_least",
    "plan_pledge",
    "pledge_instruction",
    "plus",
    "position_figures",
]

_ROLE = common_pb2.PartyRole
#: What the kit pledges at a time: small, so that many runs fit in any test account.
PLEDGE_UNIT = Decimal("0.001")
#: The smallest positive amount (§2.1), as canonical text.
QUANTUM = "0.000000000000000001"


def client_key(ctx: CaseContext) -> SigningKey:
    return ctx.key(_ROLE.PARTY_ROLE_CLIENT)


def exchange_party(ctx: CaseContext) -> str:
    """The exchange the kit plays: its exchange key's party, else its TLS identity."""
    key = ctx.config.key_for(_ROLE.PARTY_ROLE_EXCHANGE)
    return key.party_id if key is not None else ctx.kit_party_id


async def holdings(
    ctx: CaseContext, account_id: str
) -> tuple[
    attestation_pb2.HoldingsStatement, envelope_pb2.Envelope, attestation_pb2.AttestationRef
]:
    """The account's latest holdings statement, verified as addressed to the kit's client."""
    outcome = await ctx.rpc(
        ctx.owner.custodian.get_holdings_statement,
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id),
    )
    response: custodian_service_pb2.GetHoldingsStatementResponse = expect_ok(outcome)
    audience = client_key(ctx).party_id
    verified = sdk_check(
        "the holdings statement",
        verify_statement,
        response.holdings_statement,
        ctx.registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=audience,
        now=await ctx.server_now(),
    )
    check_equal("holdings statement issuer", ctx.server_party_id, verified.issuer)
    check_equal("holdings statement account_id", account_id, verified.message.account_id)
    return verified.message, response.holdings_statement, response.attestation


async def log_size_at_least(ctx: CaseContext, size: int) -> attestation_pb2.Checkpoint:
    """The latest checkpoint, after growing the log to ``size`` leaves if it is smaller."""
    checkpoint = await latest_checkpoint(ctx)
    while checkpoint.tree_size < size:
        await grow_log(ctx)
        grown = await latest_checkpoint(ctx)
        check(
            grown.tree_size > checkpoint.tree_size,
            "a deposit (TestControlService.Deposit) did not grow the attestation log",
            expected=f"tree size > {checkpoint.tree_size}",
            got=grown.tree_size,
        )
        checkpoint = grown
    return checkpoint


async def grow_log(ctx: CaseContext) -> None:
    """Append a leaf to the log: a deposit (test control) into the kit's account, else a pledge.

    A pledge is an ordinary protocol action, so a server without a test mode
    can still be grown; it needs the kit's client key and free holdings.
    """
    if not ctx.config.account_id:
        raise CaseSkipped("the attestation log is too small and the kit has no --account to use")
    statement, _, _ = await holdings(ctx, ctx.config.account_id)
    if not statement.positions:
        raise CaseSkipped(f"account {statement.account_id!r} holds no asset the kit could use")
    try:
        await ctx.control(
            ctx.test_control.deposit,
            test_control_pb2.DepositRequest(
                account_id=statement.account_id,
                asset_id=statement.positions[0].asset_id,
                quantity=amount_to_proto("1"),
            ),
        )
    except CaseSkipped as no_deposit:
        try:
            plan = await plan_pledge(ctx)
        except CaseSkipped as no_pledge:
            raise CaseSkipped(f"cannot grow the log: {no_deposit}; {no_pledge}") from no_pledge
        request = custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=await ctx.sign(pledge_instruction(plan), plan.client),
            liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
        )
        expect_ok(await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral"))


@dataclass(frozen=True, slots=True)
class PledgePlan:
    """A pledge the server would accept: the kit's client pledges PLEDGE_UNIT of a free asset."""

    client: SigningKey
    account_id: str
    exchange_id: str
    asset_id: str
    quantity: str
    #: Quantity not yet locked or pledged, before the pledge.
    free: Decimal
    pledged: Decimal


def _free(position: common_pb2.Position) -> Decimal:
    try:
        quantity = parse_amount(position.quantity.value)
        locked = parse_amount(position.locked_quantity.value or "0")
        pledged = parse_amount(position.pledged_quantity.value or "0")
    except CollateralSyncError as err:
        raise CaseFailure(
            f"the holdings statement has a non-canonical amount: {err.message}",
            expected="canonical decimals (§2.1)",
            got=err.metadata.get("actual", ""),
        ) from err
    return quantity - locked - pledged


async def plan_pledge(ctx: CaseContext) -> PledgePlan:
    """Find an asset of the kit's account with room for a pledge (depositing if it can)."""
    client = client_key(ctx)
    account_id = ctx.account()
    exchange_id = exchange_party(ctx)
    statement, _, _ = await holdings(ctx, account_id)
    if statement.exchange_id and statement.exchange_id != exchange_id:
        raise CaseSkipped(
            f"account {account_id!r} is pledged to {statement.exchange_id!r}, not to the "
            f"kit's exchange {exchange_id!r}"
        )
    candidates = sorted(
        ((_free(p), p) for p in statement.positions), key=lambda item: item[0], reverse=True
    )
    if not candidates or candidates[0][0] < 2 * PLEDGE_UNIT:
        if not statement.positions:
            raise CaseSkipped(f"account {account_id!r} holds nothing the kit could pledge")
        await ctx.control(
            ctx.test_control.deposit,
            test_control_pb2.DepositRequest(
                account_id=account_id,
                asset_id=statement.positions[0].asset_id,
                quantity=amount_to_proto("1"),
            ),
        )
        return await plan_pledge(ctx)
    free, position = candidates[0]
    return PledgePlan(
        client=client,
        account_id=account_id,
        exchange_id=exchange_id,
        asset_id=position.asset_id,
        quantity=format_amount(PLEDGE_UNIT),
        free=free,
        pledged=parse_amount(position.pledged_quantity.value or "0"),
    )


def pledge_instruction(
    plan: PledgePlan, quantity: str | None = None
) -> custodian_service_pb2.PledgeInstruction:
    return custodian_service_pb2.PledgeInstruction(
        account_id=plan.account_id,
        exchange_id=plan.exchange_id,
        asset_id=plan.asset_id,
        quantity=common_pb2.Decimal(value=plan.quantity if quantity is None else quantity),
    )


def liquidation_path(plan: PledgePlan) -> liquidation_pb2.LiquidationPath:
    return liquidation_pb2.LiquidationPath(
        account_id=plan.account_id,
        exchange_id=plan.exchange_id,
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id=plan.asset_id,
                venue="conformance-otc-desk",
                max_quantity=common_pb2.Decimal(value=plan.quantity),
            )
        ],
        proceeds_account_id=f"{plan.exchange_id}-settlement",
    )


async def ensure_pledged(ctx: CaseContext) -> str:
    """The kit's account, pledged to the kit's exchange (pledging a unit if it is not)."""
    client_key(ctx)
    account_id = ctx.account()
    statement, _, _ = await holdings(ctx, account_id)
    if statement.exchange_id == exchange_party(ctx) and any(
        p.pledged_quantity.value not in ("", "0") for p in statement.positions
    ):
        return account_id
    plan = await plan_pledge(ctx)
    request = custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=await ctx.sign(pledge_instruction(plan), plan.client),
        liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
    )
    expect_ok(await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral"))
    return account_id


def position_figures(
    statement: attestation_pb2.HoldingsStatement, asset_id: str
) -> tuple[str, str, str]:
    """(quantity, locked, pledged) of an asset as canonical text; zeros if absent."""
    for position in statement.positions:
        if position.asset_id == asset_id:
            return (
                position.quantity.value or "0",
                position.locked_quantity.value or "0",
                position.pledged_quantity.value or "0",
            )
    return ("0", "0", "0")


def plus(text: str, amount: str) -> str:
    """The canonical sum of two canonical amounts."""
    return format_amount(parse_amount(text) + parse_amount(amount))
