"""Who may call what: the access table of PROTOCOL.md §4.5, enforced.

Two layers, each rule in one place:

- :class:`AccessInterceptor` refuses every restricted RPC to a *stranger* (a
  certificate from the CA whose party has no key in the registry) before any
  of the RPC's own work runs. Public RPCs (:data:`PUBLIC_METHODS`), health,
  reflection and test control pass.
- :func:`require_reader` is what a servicer calls for restricted data: the
  registered caller must be one of the data's readers or a regulator. The
  refusal is the same whether or not the data exists, and names nobody.
- :func:`require_regulator` is for what only regulators read: the evidence
  of equivocation a party keeps (PROTOCOL.md §10.7).

Plaintext servers (tests only) have no certificates to tell callers apart:
there :func:`caller_of` returns :data:`UNCHECKED`, which may read everything.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from collateral_sync.errors import VerificationError
from collateral_sync.keys import KeyRegistry
from collateral_sync.transport import peer_party_id
from collateral_sync.v1 import common_pb2, errors_pb2

__all__ = [
    "PUBLIC_METHODS",
    "UNCHECKED",
    "AccessInterceptor",
    "Caller",
    "caller_of",
    "require_reader",
    "require_regulator",
]

_PACKAGE = "/collateral_sync.v1."

#: RPCs every caller with a certificate from the CA may call (PROTOCOL.md §4.5).
PUBLIC_METHODS = frozenset(
    {
        "/collateral_sync.v1.CustodianService/GetCheckpoint",
        "/collateral_sync.v1.CustodianService/GetConsistencyProof",
        "/collateral_sync.v1.ExchangeService/GetRiskPolicy",
        "/collateral_sync.v1.RegulatorService/GetReconciliationResult",
    }
)

#: Outside the protocol (test mode only): not subject to the access table.
_TEST_CONTROL = "/collateral_sync.v1.TestControlService/"

_REGISTRY_EXPECTED = "a party in the key registry"


@dataclass(frozen=True, slots=True)
class Caller:
    """The party on the other end of a call, as the registry knows it."""

    #: The certificate's party id; None on a plaintext server (tests only).
    party_id: str | None
    #: The roles of the party's registered keys (empty for a stranger).
    roles: frozenset[int]

    @property
    def checked(self) -> bool:
        """Whether there is an identity to check (False only without TLS)."""
        return self.party_id is not None

    @property
    def registered(self) -> bool:
        return not self.checked or bool(self.roles)

    @property
    def reads_everything(self) -> bool:
        """A regulator reads every account's data (oversight), as does a plaintext test caller."""
        return not self.checked or common_pb2.PARTY_ROLE_REGULATOR in self.roles


#: The caller on a plaintext server.
UNCHECKED = Caller(party_id=None, roles=frozenset())


def caller_of(
    context: grpc.aio.ServicerContext, registry: KeyRegistry, *, plaintext: bool
) -> Caller:
    """The caller of ``context``: its certificate's party and that party's registered roles."""
    if plaintext:
        return UNCHECKED
    party = peer_party_id(context) or ""
    return Caller(party_id=party, roles=frozenset(k.role for k in registry.keys_for(party)))


def require_reader(caller: Caller, readers: Collection[str] | None, *, field: str) -> None:
    """Refuse ``caller`` unless it is one of ``readers`` or reads everything.

    ``readers`` is None when the data does not exist: a caller who may not read
    everything gets the same refusal as for data that is not theirs, so it
    learns nothing about what exists; the others go on to the NOT_FOUND of the
    lookup that follows.
    """
    if caller.reads_everything or (readers is not None and caller.party_id in readers):
        return
    raise VerificationError(
        f"{caller.party_id!r} may not read this {field}: only the parties it concerns and a "
        "regulator may (PROTOCOL.md §4.5)",
        reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
        metadata={
            "field": field,
            "expected": "a party of the account or a regulator",
            "actual": caller.party_id or "",
        },
    )


def require_regulator(caller: Caller, *, what: str) -> None:
    """Refuse ``caller`` unless it is a regulator (or the plaintext test caller).

    Nothing names the data here, so the refusal is about the caller, like a
    stranger's; ``what`` says what was asked for.
    """
    if caller.reads_everything:
        return
    raise VerificationError(
        f"{caller.party_id!r} may not read {what}: only a regulator may (PROTOCOL.md §4.5)",
        reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
        metadata={"field": "caller", "expected": "a regulator", "actual": caller.party_id or ""},
    )


def _refuse_stranger(caller: Caller) -> None:
    if caller.registered:
        return
    raise VerificationError(
        f"the certificate's party {caller.party_id!r} is not in the key registry: it may read "
        "only public data (PROTOCOL.md §4.5)",
        reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
        metadata={
            "field": "caller",
            "expected": _REGISTRY_EXPECTED,
            "actual": caller.party_id or "",
        },
    )


def restricted(method: str) -> bool:
    """Whether ``method`` (``/package.Service/Method``) is restricted to registered callers."""
    return (
        method.startswith(_PACKAGE)
        and not method.startswith(_TEST_CONTROL)
        and method not in PUBLIC_METHODS
    )


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses restricted RPCs to strangers before the servicer runs.

    Installed inside the SDK's error mapping, so the refusal becomes
    PERMISSION_DENIED with its ErrorInfo like any other.
    """

    def __init__(self, registry: KeyRegistry, *, plaintext: bool) -> None:
        self._registry = registry
        self._plaintext = plaintext
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or self._plaintext or not restricted(method):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _check(self, context: grpc.aio.ServicerContext) -> None:
        _refuse_stranger(caller_of(context, self._registry, plaintext=False))

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        check = self._check
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for kind, make in kinds:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue

            # The SDK's error mapping around this awaits a coroutine and iterates
            # a response stream, whichever the servicer returns.
            async def call(
                request: Any,
                context: grpc.aio.ServicerContext,
                behavior: Callable[[Any, grpc.aio.ServicerContext], Any] = behavior,
            ) -> Any:
                check(context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

            return make(
                call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"a method handler without behaviour: {handler!r}")
