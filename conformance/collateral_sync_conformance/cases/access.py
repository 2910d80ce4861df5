"""Who may read and do what (docs/PROTOCOL.md §4.5), tried as several identities.

The kit calls as each TLS identity it holds (``--identity``): the account's
client, the exchange it is pledged to, a regulator, another client, another
exchange, and a *stranger* whose certificate comes from the same CA but whose
party is not in the registry. Every rule is tried from both sides: the
parties the table names are served (a wrong refusal fails as surely as a
leak), the others are refused with PERMISSION_DENIED ``KEY_ROLE_MISMATCH`` —
the same refusal for data that does not exist, naming none of the account's
parties — and a stranger's write changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from collateral_sync.sync import EXCHANGE_TO_CUSTODIAN
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    errors_pb2,
    exchange_service_pb2,
    position_sync_pb2,
    reconciliation_pb2,
    regulator_service_pb2,
)
from google.protobuf.message import Message

from collateral_sync_conformance._context import CaseContext, PartyClients
from collateral_sync_conformance._expect import (
    CaseFailure,
    Outcome,
    check,
    describe,
    expect_access_denied,
    expect_ok,
    expect_status,
    outcome_from_error,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._checkpoints import latest_checkpoint
from collateral_sync_conformance.cases._kit_account import (
    QUANTUM,
    client_key,
    ensure_pledged,
    exchange_party,
    holdings,
    plan_pledge,
)
from collateral_sync_conformance.cases._raw_stream import KIT_WINDOW
from collateral_sync_conformance.cases._release import pledged_account, release_consent
from collateral_sync_conformance.cases._snapshots import custodian_state, expect_unchanged

__all__: list[str] = []

_R = errors_pb2.ErrorReason
_ROLE = common_pb2.PartyRole
_CUSTODIAN = [Role.CUSTODIAN]
_EXCHANGE = [Role.EXCHANGE]
_REGULATOR = [Role.REGULATOR]
#: How long the kit listens on a sync stream it may not open before it says hello.
_REFUSAL_GRACE = 2.0


async def _call(
    ctx: CaseContext,
    who: PartyClients,
    method: Callable[..., Awaitable[Any]],
    request: Message,
    name: str,
) -> Outcome:
    return await ctx.rpc(method, request, label=f"{name} as {who.party_id}")


# ---------------------------------------------------------------------------- custodian

_Read = tuple[Callable[..., Awaitable[Any]], Message, str, str]


def _custodian_reads(
    who: PartyClients, account_id: str, ref: attestation_pb2.AttestationRef, settlement_id: str
) -> list[_Read]:
    """The custodian's restricted reads of one account, as ``who``: (method, request, name, field)."""
    return [
        (
            who.custodian.get_holdings_statement,
            custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id),
            "GetHoldingsStatement",
            "account_id",
        ),
        (
            who.custodian.get_inclusion_proof,
            custodian_service_pb2.GetInclusionProofRequest(
                leaf_index=ref.leaf_index, tree_size=ref.tree_size
            ),
            "GetInclusionProof",
            "leaf_index",
        ),
        (
            who.custodian.get_settlement,
            custodian_service_pb2.GetSettlementRequest(settlement_id=settlement_id),
            "GetSettlement",
            "settlement_id",
        ),
    ]


@REGISTRY.case(
    "access/custodian/stranger-reads-public-data",
    Level.MUST,
    "a certificate from the CA whose party is not in the registry still gets checkpoints and "
    "consistency proofs",
    roles=_CUSTODIAN,
    clauses=("§4.5/public-served",),
)
async def custodian_stranger_public(ctx: CaseContext) -> None:
    stranger = ctx.as_stranger()
    latest = await latest_checkpoint(ctx)
    expect_ok(
        await _call(
            ctx,
            stranger,
            stranger.custodian.get_checkpoint,
            custodian_service_pb2.GetCheckpointRequest(),
            "GetCheckpoint",
        )
    )
    if latest.tree_size >= 1:
        expect_ok(
            await _call(
                ctx,
                stranger,
                stranger.custodian.get_consistency_proof,
                custodian_service_pb2.GetConsistencyProofRequest(
                    first_tree_size=1, second_tree_size=latest.tree_size
                ),
                "GetConsistencyProof",
            )
        )


@REGISTRY.case(
    "access/custodian/stranger-refused",
    Level.MUST,
    "a stranger (party not in the registry) is refused holdings, proofs, settlements, and a "
    "validly signed redemption and pledge release it relays, with PERMISSION_DENIED naming the "
    "caller; nothing changes",
    roles=_CUSTODIAN,
    clauses=("§4.5/stranger-refused",),
)
async def custodian_stranger_refused(ctx: CaseContext) -> None:
    stranger = ctx.as_stranger()
    account = await ensure_pledged(ctx)
    _, _, ref = await holdings(ctx, account)
    before = await custodian_state(ctx)
    for method, request, name, _ in _custodian_reads(
        stranger, account, ref, ctx.unique("settlement")
    ):
        expect_access_denied(
            await _call(ctx, stranger, method, request, name),
            field="caller",
            caller=stranger.party_id,
            hidden=[client_key(ctx).party_id],
        )
    # A write the account's client really signed, brought by the stranger.
    plan = await plan_pledge(ctx)
    redemption = custodian_service_pb2.RedemptionRequest(
        account_id=account,
        asset_id=plan.asset_id,
        quantity=common_pb2.Decimal(value=plan.quantity),
    )
    outcome = await _call(
        ctx,
        stranger,
        stranger.custodian.request_redemption,
        custodian_service_pb2.RequestRedemptionRequest(
            redemption_request=await ctx.sign(redemption, plan.client)
        ),
        "RequestRedemption",
    )
    expect_access_denied(outcome, field="caller", caller=stranger.party_id)
    # A pledge release the client asked for and the exchange consented to, relayed by the stranger.
    pledged = await pledged_account(ctx)
    asset_id = sorted(pledged.pledged)[0]
    consent = await release_consent(ctx, pledged, [(asset_id, QUANTUM)])
    outcome = await _call(
        ctx,
        stranger,
        stranger.custodian.release_pledge,
        custodian_service_pb2.ReleasePledgeRequest(consent=consent),
        "ReleasePledge",
    )
    expect_access_denied(outcome, field="caller", caller=stranger.party_id)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "access/custodian/account-read-by-its-parties",
    Level.MUST,
    "the account's client, the exchange it is pledged to and a regulator each read its holdings "
    "statement and the inclusion proof of it",
    roles=_CUSTODIAN,
    clauses=("§4.5/readers-served",),
)
async def custodian_parties_read(ctx: CaseContext) -> None:
    account = await ensure_pledged(ctx)
    _, envelope, ref = await holdings(ctx, account)
    readers = [
        ctx.as_party(client_key(ctx).party_id),
        ctx.as_party(exchange_party(ctx)),
        ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR),
    ]
    for who in readers:
        (holdings_read, proof_read, _) = _custodian_reads(who, account, ref, "")
        read = expect_ok(await _call(ctx, who, *holdings_read[:3]))
        check(
            read.holdings_statement.payload == envelope.payload,
            f"{who.party_id} was served another statement than the account's latest",
            expected="the same statement for every party",
            got=f"payload of {len(read.holdings_statement.payload)} bytes",
        )
        expect_ok(await _call(ctx, who, *proof_read[:3]))


async def _others(ctx: CaseContext) -> list[PartyClients]:
    """Another registered exchange and another registered client than the account's."""
    return [
        ctx.as_role(_ROLE.PARTY_ROLE_EXCHANGE, besides=[exchange_party(ctx)]),
        ctx.as_role(_ROLE.PARTY_ROLE_CLIENT, besides=[client_key(ctx).party_id]),
    ]


@REGISTRY.case(
    "access/custodian/account-read-by-others-refused",
    Level.MUST,
    "another exchange and another client are refused the account's holdings statement and its "
    "inclusion proof, and an account that does not exist gets the very same refusal",
    roles=_CUSTODIAN,
    clauses=("§4.5/reader-refused", "§4.5/refusal-hides-existence", "§4.5/refusal-names-nobody"),
)
async def custodian_others_refused(ctx: CaseContext) -> None:
    account = await ensure_pledged(ctx)
    _, _, ref = await holdings(ctx, account)
    hidden = [client_key(ctx).party_id, exchange_party(ctx)]
    missing = ctx.unique("conformance-no-such-account")
    for who in await _others(ctx):
        reads = _custodian_reads(who, account, ref, ctx.unique("settlement"))
        # The very same refusal for an account that does not exist.
        reads += _custodian_reads(who, missing, ref, ctx.unique("settlement"))[:1]
        for method, request, name, field in reads:
            expect_access_denied(
                await _call(ctx, who, method, request, name),
                field=field,
                caller=who.party_id,
                hidden=hidden,
            )


@REGISTRY.case(
    "access/custodian/sync-by-non-exchange-refused",
    Level.MUST,
    "a registered client that opens SyncPositions and says hello as itself is refused with "
    "PERMISSION_DENIED KEY_ROLE_MISMATCH: only exchanges sync (§6.1)",
    roles=_CUSTODIAN,
    clauses=("§6.1/peer-is-registered-exchange",),
)
async def custodian_sync_by_client(ctx: CaseContext) -> None:
    who = ctx.as_role(_ROLE.PARTY_ROLE_CLIENT)
    call = who.custodian.sync_positions(timeout=ctx.config.rpc_timeout)
    hello = position_sync_pb2.SyncHello(
        party_id=who.party_id,
        sending_direction=EXCHANGE_TO_CUSTODIAN,  # type: ignore[arg-type]
        window=KIT_WINDOW,
    )
    started = time.perf_counter()
    # §6.2: the refusal comes "before any frame is exchanged", so listen first. Writing
    # into a stream the server has already ended races its status (gRPC may report
    # INTERNAL instead); only a server still waiting after a moment gets the hello.
    reading = asyncio.ensure_future(call.read())
    await asyncio.wait({reading}, timeout=_REFUSAL_GRACE)
    if not reading.done():
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await call.write(position_sync_pb2.SyncFrame(hello=hello))
    try:
        first = await reading
    except grpc.RpcError as err:
        outcome = outcome_from_error(
            f"SyncPositions as {who.party_id}", hello, err, time.perf_counter() - started
        )
    else:
        call.cancel()
        raise CaseFailure(
            f"the custodian answered a sync stream opened by the client {who.party_id!r}",
            expected="PERMISSION_DENIED KEY_ROLE_MISMATCH",
            got=f"a frame: {describe(first)}"
            if first is not grpc.aio.EOF
            else "the end of the stream, no status",
        )
    ctx.transcript.append(outcome)
    expect_status(outcome, grpc.StatusCode.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH)


# ---------------------------------------------------------------------------- exchange


def _account_reads(
    who: PartyClients, account_id: str
) -> list[tuple[Callable[..., Awaitable[Any]], Message, str]]:
    return [
        (
            who.exchange.get_credit_line,
            exchange_service_pb2.GetCreditLineRequest(account_id=account_id),
            "GetCreditLine",
        ),
        (
            who.exchange.list_margin_calls,
            exchange_service_pb2.ListMarginCallsRequest(account_id=account_id),
            "ListMarginCalls",
        ),
        (
            who.exchange.list_liquidations,
            exchange_service_pb2.ListLiquidationsRequest(account_id=account_id),
            "ListLiquidations",
        ),
    ]


@REGISTRY.case(
    "access/exchange/stranger-refused",
    Level.MUST,
    "a stranger (party not in the registry) gets the public risk policy but is refused an "
    "account's credit line, margin calls and liquidations",
    roles=_EXCHANGE,
    clauses=("§4.5/stranger-refused", "§4.5/public-served"),
)
async def exchange_stranger(ctx: CaseContext) -> None:
    stranger = ctx.as_stranger()
    account = ctx.account()
    expect_ok(
        await _call(
            ctx,
            stranger,
            stranger.exchange.get_risk_policy,
            exchange_service_pb2.GetRiskPolicyRequest(),
            "GetRiskPolicy",
        )
    )
    for method, request, name in _account_reads(stranger, account):
        expect_access_denied(
            await _call(ctx, stranger, method, request, name),
            field="caller",
            caller=stranger.party_id,
        )


@REGISTRY.case(
    "access/exchange/account-read-by-its-parties",
    Level.MUST,
    "the account's client, its custodian and a regulator each read its credit line, margin "
    "calls and liquidations",
    roles=_EXCHANGE,
    clauses=("§4.5/readers-served",),
)
async def exchange_parties_read(ctx: CaseContext) -> None:
    account = ctx.account()
    readers = [
        ctx.as_party(client_key(ctx).party_id),
        ctx.as_role(_ROLE.PARTY_ROLE_CUSTODIAN),
        ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR),
    ]
    for who in readers:
        for method, request, name in _account_reads(who, account):
            expect_ok(await _call(ctx, who, method, request, name))


@REGISTRY.case(
    "access/exchange/account-read-by-others-refused",
    Level.MUST,
    "another client and another exchange are refused the account's credit line, margin calls "
    "and liquidations, with the very same refusal for an account that does not exist; a "
    "regulator is told NOT_FOUND for that one",
    roles=_EXCHANGE,
    clauses=("§4.5/reader-refused", "§4.5/refusal-hides-existence", "§4.5/refusal-names-nobody"),
)
async def exchange_others_refused(ctx: CaseContext) -> None:
    account = ctx.account()
    client = client_key(ctx).party_id
    others = [
        ctx.as_role(_ROLE.PARTY_ROLE_CLIENT, besides=[client]),
        ctx.as_role(_ROLE.PARTY_ROLE_EXCHANGE, besides=[ctx.server_party_id]),
    ]
    missing = ctx.unique("conformance-no-such-account")
    for who in others:
        for account_id in (account, missing):
            for method, request, name in _account_reads(who, account_id):
                expect_access_denied(
                    await _call(ctx, who, method, request, name),
                    field="account_id",
                    caller=who.party_id,
                    hidden=[client],
                )
        for method, request, name, field in (
            (
                who.exchange.get_margin_call,
                exchange_service_pb2.GetMarginCallRequest(margin_call_id=ctx.unique("call")),
                "GetMarginCall",
                "margin_call_id",
            ),
            (
                who.exchange.get_shortfall_allocation,
                exchange_service_pb2.GetShortfallAllocationRequest(
                    liquidation_id=ctx.unique("liquidation")
                ),
                "GetShortfallAllocation",
                "liquidation_id",
            ),
        ):
            expect_access_denied(
                await _call(ctx, who, method, request, name), field=field, caller=who.party_id
            )
    regulator = ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR)
    expect_status(
        await _call(
            ctx,
            regulator,
            regulator.exchange.get_credit_line,
            exchange_service_pb2.GetCreditLineRequest(account_id=missing),
            "GetCreditLine",
        ),
        grpc.StatusCode.NOT_FOUND,
        _R.ERROR_REASON_NOT_FOUND,
    )


# ---------------------------------------------------------------------------- regulator


@REGISTRY.case(
    "access/regulator/stranger-refused",
    Level.MUST,
    "a stranger (party not in the registry) may ask for reconciliation results (public) but may "
    "not submit a reconciliation statement, even one a party it oversees signed",
    roles=_REGULATOR,
    clauses=("§4.5/stranger-refused", "§4.5/public-served"),
)
async def regulator_stranger(ctx: CaseContext) -> None:
    stranger = ctx.as_stranger()
    result = await _call(
        ctx,
        stranger,
        stranger.regulator.get_reconciliation_result,
        regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=ctx.unique("cutoff")),
        "GetReconciliationResult",
    )
    # Public: an unknown cut-off is NOT_FOUND for anyone, never a refusal of the caller.
    if result.code == grpc.StatusCode.PERMISSION_DENIED:
        raise CaseFailure(
            "GetReconciliationResult is public (§4.5): a stranger must not be refused it",
            expected="OK or NOT_FOUND",
            got=str(result.summary()),
        )
    custodian = ctx.key(_ROLE.PARTY_ROLE_CUSTODIAN)
    statement = reconciliation_pb2.ReconciliationStatement(cutoff_id=ctx.unique("cutoff"))
    outcome = await _call(
        ctx,
        stranger,
        stranger.regulator.submit_reconciliation_statement,
        regulator_service_pb2.SubmitReconciliationStatementRequest(
            reconciliation_statement=await ctx.sign(statement, custodian)
        ),
        "SubmitReconciliationStatement",
    )
    expect_access_denied(outcome, field="caller", caller=stranger.party_id)
