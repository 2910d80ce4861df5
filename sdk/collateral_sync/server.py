"""Server helpers for grpc.aio: mutual TLS, health, reflection, error mapping.

A party's server is built in three steps::

    server = create_server(tls=tls, servicers=[MyExchangeServicer()])
    port = await start_server(server, "0.0.0.0:7443")
    ...
    await stop_server(server, grace=5.0)

or ``async with serve(server, address) as port:`` for the same with a
guaranteed stop.

:func:`create_server` always installs :class:`ErrorMappingInterceptor`, the
gRPC health service and server reflection; :func:`start_server` announces every
added collateral-sync service in both and marks it SERVING.

Errors are mapped by a server interceptor rather than a decorator on each
servicer method: the protocol promises a clear status "never a crash" on every
RPC of every server, and an interceptor installed by :func:`create_server`
keeps that promise for methods nobody remembered to decorate, including the
streaming ones. Its cost is one wrapped handler per method, built once.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from collateral_sync._integers import check_integers
from collateral_sync.errors import CollateralSyncError, MalformedError, to_grpc_status
from collateral_sync.transport import (
    MAX_MESSAGE_BYTES,
    SERVICE_MODULES,
    ChannelOption,
    ReloadableTls,
    TlsConfig,
    server_credentials,
    server_options,
)
from collateral_sync.v1 import (
    custodian_service_pb2_grpc,
    emergency_release_service_pb2_grpc,
    exchange_service_pb2_grpc,
    reconciliation_service_pb2_grpc,
    regulator_service_pb2_grpc,
    test_control_pb2_grpc,
)

__all__ = [
    "ErrorMappingInterceptor",
    "add_servicer",
    "create_server",
    "serve",
    "service_names",
    "set_service_status",
    "start_server",
    "stop_server",
]

_LOGGER = logging.getLogger(__name__)

_GRPC_MODULES = (
    custodian_service_pb2_grpc,
    emergency_release_service_pb2_grpc,
    exchange_service_pb2_grpc,
    reconciliation_service_pb2_grpc,
    regulator_service_pb2_grpc,
    test_control_pb2_grpc,
)


@dataclass(frozen=True, slots=True)
class _Service:
    full_name: str
    servicer_base: type
    add_to_server: Callable[[object, grpc.aio.Server], None]


def _known_services() -> tuple[_Service, ...]:
    # Pair each generated servicer base class with its registration function,
    # from the descriptors, so a new service needs no change here.
    by_module = {m.__name__.removesuffix("_grpc"): m for m in _GRPC_MODULES}
    found: list[_Service] = []
    for pb2 in SERVICE_MODULES:
        grpc_module = by_module[pb2.__name__]
        for name, service in pb2.DESCRIPTOR.services_by_name.items():
            found.append(
                _Service(
                    full_name=service.full_name,
                    servicer_base=getattr(grpc_module, f"{name}Servicer"),
                    add_to_server=getattr(grpc_module, f"add_{name}Servicer_to_server"),
                )
            )
    return tuple(found)


_SERVICES = _known_services()


@dataclass(slots=True)
class _ServerState:
    credentials: grpc.ServerCredentials | None
    health: health.aio.HealthServicer
    services: list[str] = field(default_factory=list)
    started: bool = False


# Server objects are grpc's own; state lives beside them, gone with the server.
_STATE: weakref.WeakKeyDictionary[grpc.aio.Server, _ServerState] = weakref.WeakKeyDictionary()


def create_server(
    *,
    tls: TlsConfig | ReloadableTls | None,
    plaintext_for_testing: bool = False,
    servicers: Iterable[object] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[ChannelOption] = (),
    maximum_concurrent_rpcs: int | None = None,
    outer_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A grpc.aio server with mutual TLS, health, reflection and error mapping.

    ``tls`` is required unless ``plaintext_for_testing`` is set (and then it
    must be None): parties only ever talk over mutual TLS. With
    :class:`~collateral_sync.transport.ReloadableTls`, each new connection is
    served with the certificate and trust bundle its files hold at that moment
    (rotation without restart). ``servicers`` are
    instances of the generated ``*Servicer`` classes; more can be added with
    :func:`add_servicer` before :func:`start_server`. ``interceptors`` run
    inside the error mapping, so their exceptions are mapped too;
    ``outer_interceptors`` run outside it and so see every call as the peer
    does, already mapped (OpenTelemetry's server span: the mapping marks the
    current span with the status it sends).
    """
    if tls is None and not plaintext_for_testing:
        raise ValueError("tls is required: parties talk over mutual TLS only")
    if tls is not None and plaintext_for_testing:
        raise ValueError("plaintext_for_testing=True conflicts with tls; pass one of them")
    server = grpc.aio.server(
        interceptors=[*outer_interceptors, ErrorMappingInterceptor(), *interceptors],
        options=server_options(max_message_bytes=max_message_bytes, extra=options),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _STATE[server] = _ServerState(
        credentials=None if tls is None else server_credentials(tls), health=health_servicer
    )
    for servicer in servicers:
        add_servicer(server, servicer)
    return server


def add_servicer(server: grpc.aio.Server, servicer: object) -> str:
    """Add a collateral-sync servicer before start; returns its full service name."""
    state = _state(server)
    if state.started:
        raise RuntimeError("add_servicer after start_server: gRPC fixes services at start")
    matches = [s for s in _SERVICES if isinstance(servicer, s.servicer_base)]
    if len(matches) != 1:
        raise TypeError(
            f"expected an instance of exactly one generated collateral-sync *Servicer class, "
            f"got {type(servicer).__name__} matching {len(matches)}"
        )
    service = matches[0]
    if service.full_name in state.services:
        raise ValueError(f"{service.full_name} is already added to this server")
    service.add_to_server(servicer, server)
    state.services.append(service.full_name)
    return service.full_name


async def start_server(
    server: grpc.aio.Server, address: str = "127.0.0.1:0", *, serving: bool = True
) -> int:
    """Bind ``address``, register reflection, mark services SERVING (or NOT_SERVING), start.

    Returns the bound port (useful with port 0). Binds with the mutual-TLS
    credentials given to :func:`create_server`; OSError if ``address`` cannot
    be bound (servers never share a port: SO_REUSEPORT is off).
    """
    state = _state(server)
    if state.started:
        raise RuntimeError("server already started")
    # Bind first: if the address is taken, nothing else has changed.
    try:
        if state.credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, state.credentials)
    except RuntimeError as err:
        raise OSError(f"could not bind {address} (in use, or not a local address)") from err
    if not port:
        raise OSError(f"could not bind {address}")
    _enable_reflection(server, (*state.services, health.SERVICE_NAME))
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in state.services:
        await state.health.set(name, status)
    await state.health.set(health.OVERALL_HEALTH, status)
    await server.start()
    state.started = True
    return int(port)


#: The current reflection service; grpcio-reflection ships only v1alpha.
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Serve reflection as v1alpha (older tools) and v1 (current tools, the spec's §13)."""
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE)
    reflection.enable_server_reflection(names, server)
    # v1 and v1alpha differ only in their proto package: the messages are the same
    # on the wire, so the same servicer answers on the v1 path.
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.method_handlers_generic_handler(
        REFLECTION_V1_SERVICE,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


async def stop_server(server: grpc.aio.Server, grace: float | None = None) -> None:
    """Report NOT_SERVING to health watchers, then stop within ``grace`` seconds."""
    state = _STATE.get(server)
    if state is not None:
        await state.health.enter_graceful_shutdown()
    await server.stop(grace)


@asynccontextmanager
async def serve(
    server: grpc.aio.Server, address: str = "127.0.0.1:0", *, grace: float | None = None
) -> AsyncIterator[int]:
    """``async with serve(server) as port:`` — start, yield the port, always stop."""
    port = await start_server(server, address)
    try:
        yield port
    finally:
        await stop_server(server, grace)


async def set_service_status(
    server: grpc.aio.Server, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
) -> None:
    """Set the health status of ``service`` ("" is the whole server)."""
    state = _state(server)
    if service != health.OVERALL_HEALTH and service not in state.services:
        raise KeyError(f"{service!r} is not a service of this server")
    await state.health.set(service, status)


def service_names(server: grpc.aio.Server) -> tuple[str, ...]:
    """Full names of the collateral-sync services added to ``server``."""
    return tuple(_state(server).services)


def _state(server: grpc.aio.Server) -> _ServerState:
    state = _STATE.get(server)
    if state is None:
        raise ValueError("server was not made by collateral_sync.server.create_server")
    return state


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns exceptions escaping a servicer into gRPC statuses.

    - :class:`~collateral_sync.errors.CollateralSyncError`: its status code
      (from the reason table) with ErrorInfo and BadRequest details.
    - request bytes that do not parse as the method's request message:
      INVALID_ARGUMENT ``MALFORMED``; an integer above 2^63 - 1 in it:
      OUT_OF_RANGE; both with details and before the servicer runs (a
      deserializer that raised would leave gRPC to answer UNKNOWN; an overflow
      would reach storage and come back as INTERNAL).
    - ``NotImplementedError``: UNIMPLEMENTED (what generated base classes raise).
    - anything else: INTERNAL with a generic message and an incident id; the
      traceback is logged here and never sent to the peer.
    """

    def __init__(self) -> None:
        # method -> (handler grpc returned, wrapped handler); handlers are
        # static per method, so each is wrapped once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    serializers = {
        "request_deserializer": _never_raising(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, method), **serializers
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(handler.stream_unary, method, streaming=True), **serializers
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response(handler.unary_stream, method), **serializers
        )
    return grpc.stream_stream_rpc_method_handler(
        _stream_response(handler.stream_stream, method, streaming=True), **serializers
    )


class _Undecodable:
    """Request bytes that did not parse: stands in for the message, to be refused."""

    __slots__ = ("message_name", "reason", "size")

    def __init__(self, message_name: str, size: int, reason: str) -> None:
        self.message_name = message_name
        self.size = size
        self.reason = reason

    def refusal(self) -> MalformedError:
        return MalformedError(
            f"request bytes do not parse as {self.message_name}: {self.reason}",
            metadata={
                "field": "request",
                "expected": f"a serialized {self.message_name}",
                "actual": f"{self.size} undecodable bytes",
            },
        )


def _never_raising(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, returning :class:`_Undecodable` instead of raising."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_name = getattr(descriptor, "full_name", "the request message")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as err:  # noqa: BLE001 — DecodeError, or anything a parser raises
            return _Undecodable(message_name, len(data), str(err) or type(err).__name__)

    return parse


def _checked(request: Any, *, streaming: bool) -> Any:
    """The request, or each request of a stream, refused if it did not parse or overflows."""
    if not streaming:
        return _parsed(request)

    async def frames() -> AsyncIterator[Any]:
        async for item in request:
            yield _parsed(item)

    return frames()


def _parsed(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise request.refusal()
    if isinstance(request, Message):
        check_integers(request)
    return request


_Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def _unary_response(behavior: _Behavior, method: str, *, streaming: bool = False) -> _Behavior:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(_checked(request, streaming=streaming), context)
            if inspect.isawaitable(result):
                result = await result
        except Exception as err:  # noqa: BLE001 — mapped, never re-raised raw
            await _abort(err, context, method)
        return result

    return call


def _stream_response(behavior: _Behavior, method: str, *, streaming: bool = False) -> _Behavior:
    # Servicers may stream by yielding (sync or async generator) or by
    # awaiting context.write() in a coroutine; one async generator covers all.
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            result = behavior(_checked(request, streaming=streaming), context)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                return
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:
                for response in result:
                    yield response
        except Exception as err:  # noqa: BLE001 — mapped, never re-raised raw
            await _abort(err, context, method)

    return call


async def _abort(err: Exception, context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    if isinstance(err, grpc.aio.AbortError):
        # The servicer already chose a status with context.abort().
        raise err
    if isinstance(err, CollateralSyncError):
        status = to_grpc_status(err)
        _mark_span(status.code, status.details)
        await context.abort_with_status(status)
    if isinstance(err, NotImplementedError):
        _mark_span(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    incident = secrets.token_hex(8)
    _LOGGER.error("unhandled error in %s (incident %s)", method, incident, exc_info=err)
    _mark_span(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
    raise AssertionError("grpc.aio context.abort returned instead of raising")


#: Codes that make a server span an error (OpenTelemetry's semantic conventions for
#: gRPC servers: a refusal of the caller's input is the caller's error, not ours).
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _mark_span(code: grpc.StatusCode, details: str) -> None:
    """Record on the current (server) span the status about to be sent; a no-op untraced.

    grpc's ``abort_with_status`` bypasses the instrumentation's context
    wrapper, so the span would otherwise say OK for every refusal.
    """
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
