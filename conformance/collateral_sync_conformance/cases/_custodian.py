"""Helpers for the cases that test a custodian: checkpoints, holdings, state, pledges.

Everything the server returns is checked with the SDK's independent
verifiers before a case relies on it. State snapshots (the log's size and
root, the account's latest holdings statement) let negative cases prove that
a refused request changed nothing (docs/PROTOCOL.md §12.3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.attestation import statement_leaf, verify_checkpoint
from collateral_sync.errors import CollateralSyncError, VerificationError
from collateral_sync.keys import SigningKey
from collateral_sync.merkle import leaf_hash, verify_consistency_proof, verify_inclusion_proof
from collateral_sync.signing import VerifiedStatement, verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    test_control_pb2,
)
from google.protobuf.message import DecodeError

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    describe,
    expect_ok,
    sdk_check,
)

__all__ = [
    "PLEDGE_UNIT",
    "CustodianState",
    "PledgePlan",
    "checkpoint_at",
    "client_key",
    "custodian_state",
    "ensure_pledged",
    "exchange_party",
    "expect_attested",
    "expect_unchanged",
    "grow_log",
    "holdings",
    "latest_checkpoint",
    "liquidation_path",
    "log_size_at_least",
    "plan_pledge",
    "pledge_instruction",
    "verify_leaf",
]

_ROLE = common_pb2.PartyRole
#: What the kit pledges at a time: small, so that many runs fit in any test account.
PLEDGE_UNIT = Decimal("0.001")


def client_key(ctx: CaseContext) -> SigningKey:
    return ctx.key(_ROLE.PARTY_ROLE_CLIENT)


def exchange_party(ctx: CaseContext) -> str:
    """The exchange the kit plays: its exchange key's party, else its TLS identity."""
    key = ctx.config.key_for(_ROLE.PARTY_ROLE_EXCHANGE)
    return key.party_id if key is not None else ctx.kit_party_id


# ------------------------------------------------------------------ checkpoints


def _verify_public(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, now: datetime
) -> tuple[VerifiedStatement[attestation_pb2.Checkpoint], str]:
    """Verify a checkpoint statement; it may be addressed to everyone or to the kit."""
    try:
        verified = verify_statement(
            envelope,
            ctx.registry,
            expected_type=attestation_pb2.Checkpoint,
            audience="*",
            now=now,
        )
    except VerificationError as err:
        if err.reason != errors_pb2.ERROR_REASON_AUDIENCE_MISMATCH:
            raise
    else:
        return verified, "*"
    verified = verify_statement(
        envelope,
        ctx.registry,
        expected_type=attestation_pb2.Checkpoint,
        audience=ctx.kit_party_id,
        now=now,
    )
    return verified, ctx.kit_party_id


async def verified_checkpoint(
    ctx: CaseContext, envelope: envelope_pb2.Envelope
) -> attestation_pb2.Checkpoint:
    """Check a checkpoint the server returned: signature, issuer, origin, shape, timestamp."""
    now = await ctx.server_now()
    verified, audience = sdk_check("the checkpoint", _verify_public, ctx, envelope, now)
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
        ctx.custodian.get_inclusion_proof,
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


# ------------------------------------------------------------------ holdings and state


async def holdings(
    ctx: CaseContext, account_id: str
) -> tuple[
    attestation_pb2.HoldingsStatement, envelope_pb2.Envelope, attestation_pb2.AttestationRef
]:
    """The account's latest holdings statement, verified as addressed to the kit's client."""
    outcome = await ctx.rpc(
        ctx.custodian.get_holdings_statement,
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


@dataclass(frozen=True, slots=True)
class CustodianState:
    """What a refused request must leave as it was."""

    tree_size: int
    root_hash: str
    #: Digest of the account's latest holdings statement payload, or how reading it failed.
    holdings: str

    def text(self) -> str:
        return f"tree_size={self.tree_size} root={self.root_hash} holdings={self.holdings}"


async def custodian_state(ctx: CaseContext) -> CustodianState:
    outcome = await ctx.rpc(
        ctx.custodian.get_checkpoint, custodian_service_pb2.GetCheckpointRequest()
    )
    response: custodian_service_pb2.GetCheckpointResponse = expect_ok(outcome)
    checkpoint = attestation_pb2.Checkpoint.FromString(response.checkpoint.payload)
    holdings_text = "(no --account)"
    if ctx.config.account_id:
        read = await ctx.rpc(
            ctx.custodian.get_holdings_statement,
            custodian_service_pb2.GetHoldingsStatementRequest(account_id=ctx.config.account_id),
        )
        if read.ok:
            payload = read.response.holdings_statement.payload
            holdings_text = hashlib.sha256(payload).hexdigest()[:16]
        else:
            holdings_text = read.code.name
    return CustodianState(checkpoint.tree_size, checkpoint.root_hash.hex()[:16], holdings_text)


async def expect_unchanged(ctx: CaseContext, before: CustodianState) -> None:
    """A refused request changes no state (§12.3): the log and the account are as they were."""
    after = await custodian_state(ctx)
    if after != before:
        raise CaseFailure(
            "the refused request changed the server's state (attestation log or holdings)",
            expected=before.text(),
            got=after.text(),
        )


# ------------------------------------------------------------------ pledges


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
