"""Requests that are not messages (docs/PROTOCOL.md §12): refused with details, never a crash.

A request whose bytes do not parse as the method's request message is
refused with INVALID_ARGUMENT ``MALFORMED`` and the ErrorInfo metadata
``expected``/``actual`` (§12.2) — not UNKNOWN or INTERNAL, which is what a
gRPC server answers when its generated deserializer raises and nothing
catches it — and it changes nothing (§12.3).
"""

from __future__ import annotations

import grpc
from collateral_sync.v1 import errors_pb2
from google.protobuf import descriptor_pool, wrappers_pb2

from collateral_sync_conformance._context import MAIN_SERVICE, CaseContext
from collateral_sync_conformance._expect import CaseFailure, expect_status
from collateral_sync_conformance._registry import REGISTRY, Level, Role
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
    after = await _snapshot(ctx)
    if after != before:
        raise CaseFailure(
            "requests that were refused as undecodable changed the server's state",
            expected=before,
            got=after,
        )
