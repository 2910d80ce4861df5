"""Helpers that check what the custodian's attestation log shows: checkpoints, leaves, proofs.

Everything the server returns is checked with the SDK's independent
verifiers before a case relies on it (§5).
"""

from __future__ import annotations

from datetime import UTC

from collateral_sync.attestation import statement_leaf, verify_checkpoint
from collateral_sync.merkle import leaf_hash, verify_consistency_proof, verify_inclusion_proof
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import attestation_pb2, custodian_service_pb2, envelope_pb2
from google.protobuf.message import DecodeError

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    check,
    check_equal,
    describe,
    expect_ok,
    sdk_check,
)
from collateral_sync_conformance.cases._published import verify_public

__all__ = [
    "checkpoint_at",
    "expect_attested",
    "latest_checkpoint",
    "verified_checkpoint",
    "verify_leaf",
]


async def verified_checkpoint(
    ctx: CaseContext, envelope: envelope_pb2.Envelope
) -> attestation_pb2.Checkpoint:
    """Check a checkpoint the server returned: signature, issuer, origin, shape, timestamp."""
    now = await ctx.server_now()
    verified, audience = sdk_check(
        "the checkpoint", verify_public, ctx, envelope, now, attestation_pb2.Checkpoint
    )
    check_equal("checkpoint issuer", ctx.server_party_id, verified.issuer)
    origin = verified.message.origin
    check(bool(origin), "the checkpoint has no origin", expected="a non-empty origin", got="")
    if ctx.session.log_origin is None:
        ctx.session.log_origin = origin
    checkpoint = sdk_check(
        "the checkpoint",
        verify_checkpoint,
        envelope,
        ctx.registry,
        origin=ctx.session.log_origin,
        now=now,
        audience=audience,
    )
    check(
        checkpoint.HasField("timestamp")
        and (checkpoint.timestamp.seconds, checkpoint.timestamp.nanos)
        <= (verified.header.issued_at.seconds, verified.header.issued_at.nanos),
        "checkpoint timestamp must be set and not later than the header's issued_at (§5.2)",
        expected=f"<= {verified.header.issued_at.ToJsonString()}",
        got=checkpoint.timestamp.ToJsonString() if checkpoint.HasField("timestamp") else "unset",
    )
    return checkpoint


async def latest_checkpoint(ctx: CaseContext) -> attestation_pb2.Checkpoint:
    outcome = await ctx.rpc(
        ctx.custodian.get_checkpoint, custodian_service_pb2.GetCheckpointRequest()
    )
    response: custodian_service_pb2.GetCheckpointResponse = expect_ok(outcome)
    check(
        response.HasField("checkpoint"),
        "GetCheckpoint returned no checkpoint",
        expected="a signed checkpoint",
        got="none",
    )
    return await verified_checkpoint(ctx, response.checkpoint)


async def checkpoint_at(ctx: CaseContext, tree_size: int) -> attestation_pb2.Checkpoint:
    outcome = await ctx.rpc(
        ctx.custodian.get_checkpoint,
        custodian_service_pb2.GetCheckpointRequest(tree_size=tree_size),
    )
    response: custodian_service_pb2.GetCheckpointResponse = expect_ok(outcome)
    checkpoint = await verified_checkpoint(ctx, response.checkpoint)
    check_equal(
        f"tree_size of GetCheckpoint(tree_size={tree_size})", tree_size, checkpoint.tree_size
    )
    return checkpoint


def verify_leaf(
    ctx: CaseContext, envelope: envelope_pb2.Envelope
) -> attestation_pb2.HoldingsStatement:
    """Check a log leaf: a holdings statement signed by the server.

    A leaf is evidence, not a statement to act on: it is verified as of its
    own issued_at and for its first addressee (§3.6.1), so old leaves and
    leaves of other parties' accounts verify too.
    """
    try:
        parsed = attestation_pb2.HoldingsStatement.FromString(envelope.payload)
    except DecodeError as err:
        raise CaseFailure(
            f"a log leaf does not parse as a HoldingsStatement: {err}",
            expected="a HoldingsStatement",
            got=f"{len(envelope.payload)} undecodable bytes",
        ) from err
    audience = parsed.header.audience[0] if parsed.header.audience else ""
    issued = parsed.header.issued_at.ToDatetime(tzinfo=UTC)
    verified = sdk_check(
        "the log leaf (holdings statement)",
        verify_statement,
        envelope,
        ctx.registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=audience,
        now=issued,
    )
    check_equal("leaf issuer", ctx.server_party_id, verified.issuer)
    statement: attestation_pb2.HoldingsStatement = verified.message
    return statement


async def expect_attested(
    ctx: CaseContext,
    envelope: envelope_pb2.Envelope,
    ref: attestation_pb2.AttestationRef,
    *,
    since: attestation_pb2.Checkpoint,
) -> attestation_pb2.Checkpoint:
    """A new holdings statement is in the log (§5.5) and the log grew consistently from ``since``.

    Checks the reference's leaf hash, that a checkpoint was signed at its
    tree size, the inclusion proof against that checkpoint, and the
    consistency proof from ``since`` to it. Returns that checkpoint.
    """
    check_equal(
        "attestation leaf_hash (H(0x00 || PAE(type, payload)), §5.5)",
        leaf_hash(statement_leaf(envelope)).hex(),
        ref.leaf_hash.hex(),
    )
    if ctx.session.log_origin is not None:
        check_equal("attestation log_origin", ctx.session.log_origin, ref.log_origin)
    check(
        since.tree_size <= ref.leaf_index < ref.tree_size,
        "a new statement's leaf must come after the log's earlier size",
        expected=f"{since.tree_size} <= leaf_index < tree_size ({ref.tree_size})",
        got=ref.leaf_index,
    )
    included_in = await checkpoint_at(ctx, ref.tree_size)
    outcome = await ctx.rpc(
        ctx.owner.custodian.get_inclusion_proof,
        custodian_service_pb2.GetInclusionProofRequest(
            leaf_index=ref.leaf_index, tree_size=ref.tree_size
        ),
    )
    response: custodian_service_pb2.GetInclusionProofResponse = expect_ok(outcome)
    check(
        response.holdings_statement.payload == envelope.payload,
        f"the leaf at index {ref.leaf_index} is not the statement that references it",
        expected="the same payload bytes",
        got=describe(response.holdings_statement),
    )
    sdk_check(
        f"the inclusion proof of leaf {ref.leaf_index}",
        verify_inclusion_proof,
        response.proof,
        statement_leaf(envelope),
        included_in,
    )
    if since.tree_size:
        outcome = await ctx.rpc(
            ctx.custodian.get_consistency_proof,
            custodian_service_pb2.GetConsistencyProofRequest(
                first_tree_size=since.tree_size, second_tree_size=included_in.tree_size
            ),
        )
        consistency: custodian_service_pb2.GetConsistencyProofResponse = expect_ok(outcome)
        sdk_check(
            f"the consistency proof from {since.tree_size} to {included_in.tree_size}",
            verify_consistency_proof,
            consistency.proof,
            since,
            included_in,
        )
    return included_in
