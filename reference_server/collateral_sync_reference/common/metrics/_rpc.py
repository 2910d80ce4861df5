"""The RPC figures: one server interceptor counting every call by method and final status.

Each call registers a done callback on its context, so the figure is the
status the peer received, whatever set it: the servicer, the access check,
the SDK's error mapping, a cancellation. Unary calls are timed into a
histogram; a stream (SyncPositions lives for hours) is counted when it ends
and shown while open in a gauge instead.

The wrapped behaviours return what the servicer's return (a coroutine, an
async generator): they run inside :class:`collateral_sync.server.ErrorMappingInterceptor`,
which :func:`collateral_sync.server.create_server` installs outermost and
which adapts every shape, so that this interceptor adds no await of its own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from collateral_sync.errors import STATUS_BY_REASON, error_from_status
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from prometheus_client import Counter, Gauge, Histogram

__all__ = ["RpcMetricsInterceptor"]

_Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
_DETAILS_KEY = "grpc-status-details-bin"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts finished RPCs by service, method and code; times unary ones; gauges open streams.

    ``on_refusal(reason)`` gets the ErrorInfo reason of every refusal whose
    status code is one of ``refusal_codes`` (decoding the details of every
    failure would cost for nothing).
    """

    def __init__(
        self,
        *,
        rpcs: Counter,
        duration: Histogram,
        streams_open: Gauge,
        on_refusal: Callable[[int], None],
        refusal_reasons: frozenset[int],
    ) -> None:
        self._rpcs = rpcs
        self._duration = duration
        self._streams_open = streams_open
        self._on_refusal = on_refusal
        self._refusal_codes = frozenset(STATUS_BY_REASON[reason] for reason in refusal_reasons)
        # method -> (handler grpc returned, wrapped handler); handlers are static per method.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED, no label for it
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service, _, name = method.lstrip("/").rpartition("/")
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._timed(handler.unary_unary, service, name), **serializers
            )
        if handler.stream_unary is not None:
            behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.unary_stream is not None:
            behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        return make(self._streamed(behavior, service, name), **serializers)

    def _timed(self, behavior: _Behavior, service: str, name: str) -> _Behavior:
        duration = self._duration.labels(service, name)
        finished = self._finisher(service, name)

        def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()

            def done(ended: grpc.aio.ServicerContext) -> None:
                duration.observe(time.perf_counter() - started)
                finished(ended)

            context.add_done_callback(done)
            return behavior(request, context)

        return call

    def _streamed(self, behavior: _Behavior, service: str, name: str) -> _Behavior:
        streams_open = self._streams_open.labels(service, name)
        finished = self._finisher(service, name)

        def done(ended: grpc.aio.ServicerContext) -> None:
            streams_open.dec()
            finished(ended)

        def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            streams_open.inc()
            context.add_done_callback(done)
            return behavior(request, context)

        return call

    def _finisher(self, service: str, name: str) -> Callable[[grpc.aio.ServicerContext], None]:
        rpcs = self._rpcs
        ok = rpcs.labels(service, name, grpc.StatusCode.OK.name)

        def finished(context: grpc.aio.ServicerContext) -> None:
            code = _final_code(context)
            if code is grpc.StatusCode.OK:
                ok.inc()
                return
            rpcs.labels(service, name, code.name).inc()
            if code in self._refusal_codes:
                reason = _refusal_reason(context)
                if reason is not None:
                    self._on_refusal(reason)

        return finished


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status the call ended with: the one set on it, else OK (or CANCELLED)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if code is not None:  # an integer, when set as one
        found = next((c for c in grpc.StatusCode if c.value[0] == code), None)
        return found or grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.OK


def _refusal_reason(context: grpc.aio.ServicerContext) -> int | None:
    """The ErrorInfo reason in the call's rich status details, if it carried any."""
    for key, value in context.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return error_from_status(status_pb2.Status.FromString(value)).reason
            except DecodeError:
                return None
    return None
