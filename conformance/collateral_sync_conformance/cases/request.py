"""Requests a server cannot take as they are (docs/PROTOCOL.md §2.4, §12): refused, with details.

A request whose bytes do not parse as the method's request message is
refused with INVALID_ARGUMENT ``MALFORMED`` and the ErrorInfo metadata
``expected``/``actual`` (§12.2) — not UNKNOWN or INTERNAL, which is what a
gRPC server answers when its generated deserializer raises and nothing
catches it. An integer above 2^63 - 1, in a request or inside a signed
statement, is OUT_OF_RANGE — not the INTERNAL of an overflow in storage.
Neither changes anything (§12.3).
"""

from __future__ import annotations

import asyncio
import time

import grpc
from collateral_sync.v1 import custodian_service_pb2, errors_pb2, exchange_service_pb2
from google.protobuf import descriptor_pool, wrappers_pb2
from google.protobuf.message import DecodeError

from collateral_sync_conformance._context import MAIN_SERVICE, CaseContext
from collateral_sync_conformance._expect import CaseFailure, expect_status, outcome_from_error
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._kit_account import (
    liquidation_path,
    plan_pledge,
    pledge_instruction,
)
from collateral_sync_conformance.cases._snapshots import custodian_state, exchange_state

__all__: list[str] = []

#: Field 1, length-delimited, claims 5 bytes and carries 2: no protobuf parser accepts it.
UNDECODABLE = b"\x0a\x05ab"


def _unary_methods(service: str) -> list[str]:
    found = descriptor_pool.Default().FindServiceByName(service)
    return [
        f"/{service}/{method.name}"
        for method in found.methods
        if not method.client_streaming and not method.server_streaming
    ]


async def _snapshot(ctx: CaseContext) -> str:
    """The state a refusal must leave as it was (the regulator's is its results, not read here)."""
    if ctx.role == Role.CUSTODIAN:
        return (await custodian_state(ctx)).text()
    if ctx.role == Role.EXCHANGE:
        return await exchange_state(ctx)
    return ""


@REGISTRY.case(
    "request/undecodable-refused",
    Level.MUST,
    "every unary method of the role's service refuses request bytes that do not parse: "
    "INVALID_ARGUMENT MALFORMED with expected/actual, never UNKNOWN or INTERNAL, "
    "and nothing changes (§12)",
    clauses=("§12.3/undecodable-unary-request",),
)
async def undecodable_refused(ctx: CaseContext) -> None:
    before = await _snapshot(ctx)
    for path in _unary_methods(MAIN_SERVICE[ctx.role]):
        method = ctx.channel.unary_unary(
            path,
            # The transcript records a message; the wire carries its raw bytes.
            request_serializer=lambda raw: raw.value,
            response_deserializer=None,
        )
        outcome = await ctx.rpc(
            method,
            wrappers_pb2.BytesValue(value=UNDECODABLE),
            label=f"{path.rsplit('/', 1)[1]} with {len(UNDECODABLE)} undecodable bytes",
        )
        expect_status(outcome, grpc.StatusCode.INVALID_ARGUMENT, errors_pb2.ERROR_REASON_MALFORMED)
    await _expect_unchanged(ctx, before, "requests refused as undecodable")


async def _expect_unchanged(ctx: CaseContext, before: str, what: str) -> None:
    after = await _snapshot(ctx)
    if after != before:
        raise CaseFailure(f"{what} changed the server's state", expected=before, got=after)


#: Just above the largest protocol integer, and the largest uint64.
_TOO_LARGE = (2**63, 2**64 - 1)


@REGISTRY.case(
    "request/integer-above-2-63-refused",
    Level.MUST,
    "an integer above 2^63 - 1 is OUT_OF_RANGE with expected/actual and changes nothing: "
    "GetRiskPolicy's version at an exchange, a signed pledge's sequence at a custodian (§2.4)",
    roles=[Role.CUSTODIAN, Role.EXCHANGE],
    clauses=("§2.4/integer-range", "§2.4/no-storage-overflow"),
)
async def integer_above_2_63_refused(ctx: CaseContext) -> None:
    # Planned first: planning may deposit, which must not count as a change.
    plan = await plan_pledge(ctx) if ctx.role == Role.CUSTODIAN else None
    before = await _snapshot(ctx)
    for number in _TOO_LARGE:
        if plan is None:
            outcome = await ctx.rpc(
                ctx.exchange.get_risk_policy,
                exchange_service_pb2.GetRiskPolicyRequest(version=number),
                label=f"GetRiskPolicy(version={number})",
            )
        else:
            request = custodian_service_pb2.PledgeCollateralRequest(
                pledge_instruction=await ctx.sign(
                    pledge_instruction(plan), plan.client, sequence=number
                ),
                liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
            )
            outcome = await ctx.rpc(
                ctx.custodian.pledge_collateral,
                request,
                label=f"PledgeCollateral with pledge_instruction.header.sequence={number}",
            )
        expect_status(outcome, grpc.StatusCode.OUT_OF_RANGE, errors_pb2.ERROR_REASON_OUT_OF_RANGE)
    await _expect_unchanged(ctx, before, "requests refused as out of range")


@REGISTRY.case(
    "request/undecodable-stream-message-refused",
    Level.MUST,
    "SyncPositions: a first message whose bytes do not parse ends the stream with "
    "INVALID_ARGUMENT MALFORMED and expected/actual, never UNKNOWN or INTERNAL, and nothing "
    "changes (§12.3)",
    roles=[Role.CUSTODIAN],
    clauses=("§12.3/undecodable-stream-message",),
)
async def undecodable_stream_message_refused(ctx: CaseContext) -> None:
    before = await _snapshot(ctx)
    path = f"/{MAIN_SERVICE[ctx.role]}/SyncPositions"
    call = ctx.channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
        timeout=ctx.config.rpc_timeout
    )
    started = time.perf_counter()
    label = f"SyncPositions with {len(UNDECODABLE)} undecodable bytes"
    try:
        await call.write(UNDECODABLE)
        async with asyncio.timeout(ctx.config.rpc_timeout):
            first = await call.read()
            # A SyncClose saying why may come first (§6.7a); the status is what counts.
            while first is not grpc.aio.EOF and _is_close(first):
                first = await call.read()
    except grpc.RpcError as err:
        outcome = outcome_from_error(
            label, wrappers_pb2.BytesValue(value=UNDECODABLE), err, time.perf_counter() - started
        )
    except TimeoutError:
        raise CaseFailure(
            "the custodian kept the stream open after a message that does not parse",
            expected="the stream ended with INVALID_ARGUMENT MALFORMED",
            got=f"no answer within {ctx.config.rpc_timeout:g} s",
        ) from None
    else:
        raise CaseFailure(
            "the custodian answered a message that does not parse",
            expected="the stream ended with INVALID_ARGUMENT MALFORMED",
            got="end of stream" if first is grpc.aio.EOF else f"{len(first)} bytes",
        )
    finally:
        call.cancel()
    ctx.transcript.append(outcome)
    expect_status(outcome, grpc.StatusCode.INVALID_ARGUMENT, errors_pb2.ERROR_REASON_MALFORMED)
    await _expect_unchanged(ctx, before, "a stream message refused as undecodable")


def _is_close(data: bytes) -> bool:
    try:
        response = custodian_service_pb2.SyncPositionsResponse.FromString(data)
    except DecodeError:
        return False
    return response.frame.WhichOneof("frame") == "close"
