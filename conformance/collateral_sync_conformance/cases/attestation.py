"""Attestation-log cases (docs/PROTOCOL.md §5): checkpoints, RFC 9162 proofs, holdings.

Proofs are checked with the SDK's independent RFC 9162 verifier
(:mod:`collateral_sync.merkle`) against checkpoints whose signatures were
verified first; a server whose log was rewritten cannot produce proofs that
pass. Cases that need more leaves than the log has grow it with
``TestControlService.Deposit`` and are skipped when that is not offered.
"""

from __future__ import annotations

import grpc
from collateral_sync.attestation import CheckpointMonitor, statement_leaf
from collateral_sync.merkle import leaf_hash, verify_consistency_proof, verify_inclusion_proof
from collateral_sync.v1 import attestation_pb2, common_pb2, custodian_service_pb2, errors_pb2

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
from collateral_sync_conformance.cases._checkpoints import (
    checkpoint_at,
    latest_checkpoint,
    verify_leaf,
)
from collateral_sync_conformance.cases._kit_account import grow_log, holdings, log_size_at_least

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_OUT_OF_RANGE = (grpc.StatusCode.OUT_OF_RANGE, _R.ERROR_REASON_OUT_OF_RANGE)
_MAX_UINT64 = 2**64 - 1


@REGISTRY.case(
    "attestation/checkpoint-signed-by-custodian",
    Level.MUST,
    "the latest checkpoint verifies: custodian key of the server's party, origin, 32-byte root, timestamp",
    roles=_CUSTODIAN,
    clauses=("§3.4/statement-id-set", "§5.2/checkpoint-timestamp"),
)
async def checkpoint_signed(ctx: CaseContext) -> None:
    await latest_checkpoint(ctx)


@REGISTRY.case(
    "attestation/checkpoint-at-size",
    Level.MUST,
    "GetCheckpoint(tree_size=n) of the latest size n returns a checkpoint of exactly n with the same root",
    roles=_CUSTODIAN,
)
async def checkpoint_at_size(ctx: CaseContext) -> None:
    latest = await log_size_at_least(ctx, 1)
    again = await checkpoint_at(ctx, latest.tree_size)
    check_equal("root at the latest size", latest.root_hash.hex(), again.root_hash.hex())


@REGISTRY.case(
    "attestation/checkpoint-origin-stable",
    Level.MUST,
    "every checkpoint and attestation reference names the same log origin, also after the log grows",
    roles=_CUSTODIAN,
)
async def checkpoint_origin_stable(ctx: CaseContext) -> None:
    first = await latest_checkpoint(ctx)
    # verified_checkpoint holds every checkpoint to the origin the run saw first.
    if first.tree_size:
        await checkpoint_at(ctx, first.tree_size)
    if ctx.config.account_id:
        _, _, ref = await holdings(ctx, ctx.config.account_id)
        check_equal(
            "log_origin of the account's attestation reference", first.origin, ref.log_origin
        )
        await grow_log(ctx)
        later = await latest_checkpoint(ctx)
        check(
            later.tree_size > first.tree_size,
            "the log did not grow after a deposit",
            expected=f"> {first.tree_size}",
            got=later.tree_size,
        )


async def _inclusion(
    ctx: CaseContext, index: int, checkpoint: attestation_pb2.Checkpoint, *, tree_size: int
) -> attestation_pb2.HoldingsStatement:
    # Leaves of any account: read as a regulator, who may read every leaf (§4.5).
    outcome = await ctx.rpc(
        ctx.auditor.custodian.get_inclusion_proof,
        custodian_service_pb2.GetInclusionProofRequest(leaf_index=index, tree_size=tree_size),
    )
    response: custodian_service_pb2.GetInclusionProofResponse = expect_ok(outcome)
    proof = response.proof
    check_equal(f"proof leaf_index (leaf {index})", index, proof.leaf_index)
    check_equal(f"proof tree_size (leaf {index})", checkpoint.tree_size, proof.tree_size)
    statement = verify_leaf(ctx, response.holdings_statement)
    sdk_check(
        f"the inclusion proof of leaf {index} in the tree of {checkpoint.tree_size}",
        verify_inclusion_proof,
        proof,
        statement_leaf(response.holdings_statement),
        checkpoint,
    )
    return statement


@REGISTRY.case(
    "attestation/inclusion-proof-verifies",
    Level.MUST,
    "inclusion proofs of the first, middle and last leaves verify against the signed checkpoint (RFC 9162)",
    roles=_CUSTODIAN,
)
async def inclusion_proof_verifies(ctx: CaseContext) -> None:
    checkpoint = await log_size_at_least(ctx, 2)
    size = checkpoint.tree_size
    for index in sorted({0, size // 2, size - 1}):
        await _inclusion(ctx, index, checkpoint, tree_size=size)
    # tree_size 0 means the latest checkpoint's size (§5.4); the log did not change meanwhile.
    latest = await latest_checkpoint(ctx)
    if latest.tree_size == size:
        await _inclusion(ctx, size - 1, latest, tree_size=0)


async def _earlier_checkpoint(
    ctx: CaseContext, latest: attestation_pb2.Checkpoint
) -> attestation_pb2.Checkpoint:
    """A signed checkpoint smaller than ``latest``: grow the log, or find one that exists."""
    candidates: list[int] = []
    if ctx.config.account_id:
        _, _, ref = await holdings(ctx, ctx.config.account_id)
        candidates.append(ref.tree_size)
    candidates += [latest.tree_size - 1, latest.tree_size // 2, 1]
    for size in candidates:
        if not 0 < size < latest.tree_size:
            continue
        outcome = await ctx.rpc(
            ctx.custodian.get_checkpoint, custodian_service_pb2.GetCheckpointRequest(tree_size=size)
        )
        if outcome.code == grpc.StatusCode.NOT_FOUND:
            continue  # no checkpoint was signed at that size: allowed
        return await checkpoint_at(ctx, size)
    raise CaseSkipped("found no signed checkpoint smaller than the latest one")


@REGISTRY.case(
    "attestation/consistency-proof-verifies",
    Level.MUST,
    "a consistency proof between two signed checkpoints verifies (RFC 9162 §2.1.4): the log only grew",
    roles=_CUSTODIAN,
)
async def consistency_proof_verifies(ctx: CaseContext) -> None:
    first = await log_size_at_least(ctx, 1)
    try:
        await grow_log(ctx)
    except CaseSkipped:
        second = first
        first = await _earlier_checkpoint(ctx, second)
    else:
        second = await latest_checkpoint(ctx)
    check(
        second.tree_size > first.tree_size,
        "the log did not grow",
        expected=f"> {first.tree_size}",
        got=second.tree_size,
    )
    proof = await _consistency_proof(ctx, first.tree_size, second.tree_size)
    check_equal("proof first_tree_size", first.tree_size, proof.first_tree_size)
    check_equal("proof second_tree_size", second.tree_size, proof.second_tree_size)
    sdk_check(
        f"the consistency proof from {first.tree_size} to {second.tree_size}",
        verify_consistency_proof,
        proof,
        first,
        second,
    )
    # The same check as a counterparty's monitor makes it (§5.6).
    monitor = CheckpointMonitor()
    monitor.advance(first, None)
    sdk_check("advancing a checkpoint monitor", monitor.advance, second, proof)

    # second_tree_size 0 means the latest checkpoint's size (§5.4): one was signed there.
    to_latest = await _consistency_proof(ctx, first.tree_size, 0)
    check(
        to_latest.second_tree_size >= second.tree_size,
        "GetConsistencyProof(second_tree_size=0) must prove up to the latest checkpoint",
        expected=f">= {second.tree_size}",
        got=to_latest.second_tree_size,
    )
    latest = await checkpoint_at(ctx, to_latest.second_tree_size)
    sdk_check(
        f"the consistency proof from {first.tree_size} to the latest size",
        verify_consistency_proof,
        to_latest,
        first,
        latest,
    )


async def _consistency_proof(
    ctx: CaseContext, first: int, second: int
) -> attestation_pb2.ConsistencyProof:
    outcome = await ctx.rpc(
        ctx.custodian.get_consistency_proof,
        custodian_service_pb2.GetConsistencyProofRequest(
            first_tree_size=first, second_tree_size=second
        ),
    )
    response: custodian_service_pb2.GetConsistencyProofResponse = expect_ok(outcome)
    return response.proof


@REGISTRY.case(
    "attestation/consistency-same-size-empty",
    Level.MUST,
    "a consistency proof between equal sizes is empty (§5.4)",
    roles=_CUSTODIAN,
)
async def consistency_same_size(ctx: CaseContext) -> None:
    latest = await log_size_at_least(ctx, 1)
    outcome = await ctx.rpc(
        ctx.custodian.get_consistency_proof,
        custodian_service_pb2.GetConsistencyProofRequest(
            first_tree_size=latest.tree_size, second_tree_size=latest.tree_size
        ),
    )
    response: custodian_service_pb2.GetConsistencyProofResponse = expect_ok(outcome)
    check_equal("consistency_path length for equal sizes", 0, len(response.proof.consistency_path))
    sdk_check("the equal-size proof", verify_consistency_proof, response.proof, latest, latest)


@REGISTRY.case(
    "attestation/inclusion-index-out-of-range",
    Level.MUST,
    "GetInclusionProof with leaf_index >= tree_size is refused with OUT_OF_RANGE",
    roles=_CUSTODIAN,
)
async def inclusion_index_out_of_range(ctx: CaseContext) -> None:
    latest = await log_size_at_least(ctx, 1)
    for index in (latest.tree_size, latest.tree_size + 7, _MAX_UINT64):
        outcome = await ctx.rpc(
            ctx.custodian.get_inclusion_proof,
            custodian_service_pb2.GetInclusionProofRequest(
                leaf_index=index, tree_size=latest.tree_size
            ),
        )
        expect_status(outcome, *_OUT_OF_RANGE)


@REGISTRY.case(
    "attestation/consistency-sizes-reversed-refused",
    Level.MUST,
    "GetConsistencyProof with first_tree_size > second_tree_size is refused with OUT_OF_RANGE",
    roles=_CUSTODIAN,
)
async def consistency_reversed(ctx: CaseContext) -> None:
    latest = await log_size_at_least(ctx, 2)
    outcome = await ctx.rpc(
        ctx.custodian.get_consistency_proof,
        custodian_service_pb2.GetConsistencyProofRequest(
            first_tree_size=latest.tree_size, second_tree_size=latest.tree_size - 1
        ),
    )
    expect_status(outcome, *_OUT_OF_RANGE)


@REGISTRY.case(
    "attestation/consistency-from-empty-refused",
    Level.MUST,
    "GetConsistencyProof with first_tree_size 0 is refused with OUT_OF_RANGE (§5.4)",
    roles=_CUSTODIAN,
)
async def consistency_from_empty(ctx: CaseContext) -> None:
    latest = await log_size_at_least(ctx, 1)
    outcome = await ctx.rpc(
        ctx.custodian.get_consistency_proof,
        custodian_service_pb2.GetConsistencyProofRequest(
            first_tree_size=0, second_tree_size=latest.tree_size
        ),
    )
    expect_status(outcome, *_OUT_OF_RANGE)


@REGISTRY.case(
    "attestation/tree-size-beyond-log-refused",
    Level.MUST,
    "checkpoints and proofs for a tree size beyond the log are refused with OUT_OF_RANGE",
    roles=_CUSTODIAN,
)
async def tree_size_beyond_log(ctx: CaseContext) -> None:
    latest = await log_size_at_least(ctx, 1)
    for beyond in (latest.tree_size + 1_000_000, _MAX_UINT64):
        for method, request in (
            (
                ctx.custodian.get_checkpoint,
                custodian_service_pb2.GetCheckpointRequest(tree_size=beyond),
            ),
            (
                ctx.custodian.get_inclusion_proof,
                custodian_service_pb2.GetInclusionProofRequest(leaf_index=0, tree_size=beyond),
            ),
            (
                ctx.custodian.get_consistency_proof,
                custodian_service_pb2.GetConsistencyProofRequest(
                    first_tree_size=1, second_tree_size=beyond
                ),
            ),
        ):
            expect_status(await ctx.rpc(method, request), *_OUT_OF_RANGE)


@REGISTRY.case(
    "attestation/holdings-statement-unknown-account",
    Level.MUST,
    "a regulator asking for the holdings statement of an account the custodian does not hold "
    "gets NOT_FOUND (any other caller gets PERMISSION_DENIED: access/ cases)",
    roles=_CUSTODIAN,
)
async def holdings_unknown_account(ctx: CaseContext) -> None:
    regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
    outcome = await ctx.rpc(
        regulator.custodian.get_holdings_statement,
        custodian_service_pb2.GetHoldingsStatementRequest(
            account_id=ctx.unique("conformance-no-such-account")
        ),
    )
    expect_status(outcome, grpc.StatusCode.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)


@REGISTRY.case(
    "attestation/holdings-statement-account-required",
    Level.SHOULD,
    "GetHoldingsStatement without an account id is refused with INVALID_ARGUMENT MALFORMED",
    roles=_CUSTODIAN,
)
async def holdings_account_required(ctx: CaseContext) -> None:
    outcome = await ctx.rpc(
        ctx.custodian.get_holdings_statement, custodian_service_pb2.GetHoldingsStatementRequest()
    )
    expect_status(outcome, grpc.StatusCode.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED)


@REGISTRY.case(
    "attestation/holdings-statement-attested",
    Level.MUST,
    "an account's latest holdings statement is signed, and its attestation reference and inclusion proof verify",
    roles=_CUSTODIAN,
    clauses=("§3.4/audience-not-empty", "§3.4/statement-id-set"),
)
async def holdings_attested(ctx: CaseContext) -> None:
    account = ctx.account()
    statement, envelope, ref = await holdings(ctx, account)
    check(
        statement.epoch >= 1,
        "holdings statement epoch must be >= 1",
        expected=">= 1",
        got=statement.epoch,
    )
    latest = await latest_checkpoint(ctx)
    check_equal("attestation log_origin", latest.origin, ref.log_origin)
    check_equal(
        "attestation leaf_hash (H(0x00 || PAE(type, payload)), §5.5)",
        leaf_hash(statement_leaf(envelope)).hex(),
        ref.leaf_hash.hex(),
    )
    check(
        ref.leaf_index < ref.tree_size <= latest.tree_size,
        "attestation reference sizes: leaf_index < tree_size <= the latest checkpoint's size",
        expected=f"{ref.leaf_index} < tree_size <= {latest.tree_size}",
        got=ref.tree_size,
    )
    # The reference names the first checkpoint that includes the leaf: one was signed there.
    first = await checkpoint_at(ctx, ref.tree_size)
    outcome = await ctx.rpc(
        ctx.owner.custodian.get_inclusion_proof,
        custodian_service_pb2.GetInclusionProofRequest(
            leaf_index=ref.leaf_index, tree_size=ref.tree_size
        ),
    )
    response: custodian_service_pb2.GetInclusionProofResponse = expect_ok(outcome)
    check(
        response.holdings_statement.payload == envelope.payload,
        "the leaf at the reference's index is not the account's holdings statement",
        expected=f"the statement of {account} epoch {statement.epoch}",
        got=verify_leaf(ctx, response.holdings_statement).account_id,
    )
    sdk_check(
        "the inclusion proof of the account's holdings statement",
        verify_inclusion_proof,
        response.proof,
        statement_leaf(envelope),
        first,
    )
