"""Custodian behaviour beyond the envelope (docs/PROTOCOL.md Appendix A, §5.5, §9.1).

A correct pledge must be accepted, attested (a new holdings statement in the
log, reachable by an inclusion proof from a checkpoint that extends the one
before), and change exactly what it says; pledges the custodian cannot honour
are refused with the prescribed reason and change nothing.
"""

from __future__ import annotations

import grpc
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.attestation import statement_leaf
from collateral_sync.merkle import leaf_hash, verify_consistency_proof, verify_inclusion_proof
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import attestation_pb2, custodian_service_pb2, errors_pb2

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    check,
    check_equal,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._custodian import (
    PLEDGE_UNIT,
    PledgePlan,
    checkpoint_at,
    custodian_state,
    expect_unchanged,
    holdings,
    latest_checkpoint,
    liquidation_path,
    plan_pledge,
    pledge_instruction,
)

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_C = grpc.StatusCode
_REASON = attestation_pb2.HoldingsChangeReason


async def _pledge(
    ctx: CaseContext,
    plan: PledgePlan,
    *,
    quantity: str | None = None,
    account_id: str | None = None,
    asset_id: str | None = None,
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
        liquidation_path=await ctx.sign(path, plan.client),
    )


def _pledged(statement: attestation_pb2.HoldingsStatement, asset_id: str) -> str:
    for position in statement.positions:
        if position.asset_id == asset_id:
            return position.pledged_quantity.value or "0"
    return "0"


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

    verified = sdk_check(
        "the holdings statement PledgeCollateral returned",
        verify_statement,
        response.holdings_statement,
        ctx.registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=plan.client.party_id,
        now=await ctx.server_now(),
    )
    statement = verified.message
    check_equal("issuer of the returned statement", ctx.server_party_id, verified.issuer)
    check_equal("account of the returned statement", plan.account_id, statement.account_id)
    check_equal("exchange_id after the pledge", plan.exchange_id, statement.exchange_id)
    check(
        statement.epoch > before_statement.epoch,
        "the pledge's holdings statement must have a later epoch",
        expected=f"> {before_statement.epoch}",
        got=statement.epoch,
    )
    check(
        statement.reason
        in (_REASON.HOLDINGS_CHANGE_REASON_PLEDGE, _REASON.HOLDINGS_CHANGE_REASON_TOP_UP),
        "reason of the pledge's holdings statement",
        expected="PLEDGE or TOP_UP",
        got=_REASON.Name(statement.reason),
    )
    expected_pledged = format_amount(plan.pledged + PLEDGE_UNIT)
    check_equal(
        f"pledged quantity of {plan.asset_id} after pledging {plan.quantity}",
        expected_pledged,
        _pledged(statement, plan.asset_id),
    )

    ref = response.attestation
    check_equal(
        "attestation leaf_hash of the returned statement",
        leaf_hash(statement_leaf(response.holdings_statement)).hex(),
        ref.leaf_hash.hex(),
    )
    latest_after, _, latest_ref = await holdings(ctx, plan.account_id)
    check_equal(
        "epoch of GetHoldingsStatement after the pledge", statement.epoch, latest_after.epoch
    )
    check_equal("attestation of GetHoldingsStatement after the pledge", ref, latest_ref)

    included_in = await checkpoint_at(ctx, ref.tree_size)
    proof_outcome = await ctx.rpc(
        ctx.custodian.get_inclusion_proof,
        custodian_service_pb2.GetInclusionProofRequest(
            leaf_index=ref.leaf_index, tree_size=ref.tree_size
        ),
    )
    proof: custodian_service_pb2.GetInclusionProofResponse = expect_ok(proof_outcome)
    sdk_check(
        "the inclusion proof of the pledge's holdings statement",
        verify_inclusion_proof,
        proof.proof,
        statement_leaf(response.holdings_statement),
        included_in,
    )
    # The log grew from the checkpoint before the pledge, and only grew.
    if before.tree_size:
        consistency = await ctx.rpc(
            ctx.custodian.get_consistency_proof,
            custodian_service_pb2.GetConsistencyProofRequest(
                first_tree_size=before.tree_size, second_tree_size=included_in.tree_size
            ),
        )
        found: custodian_service_pb2.GetConsistencyProofResponse = expect_ok(consistency)
        sdk_check(
            f"consistency from {before.tree_size} (before the pledge) to {included_in.tree_size}",
            verify_consistency_proof,
            found.proof,
            before,
            included_in,
        )


@REGISTRY.case(
    "custodian/pledge-exceeding-available-refused",
    Level.MUST,
    "a pledge above quantity - locked - pledged is refused: FAILED_PRECONDITION STATE_CONFLICT",
    roles=_CUSTODIAN,
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
