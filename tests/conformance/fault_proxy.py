"""A mutual-TLS gRPC proxy that injects one fault between the kit and a real server.

The proxy forwards every call byte for byte (unary and streaming, status and
trailers included) to the server behind it, except where its :class:`Fault`
says otherwise: answer OK to a refusal, drop the error details, change a
status code, corrupt a response, or accept connections without a client
certificate. Put in front of the reference custodian, each fault turns a
conforming server into a broken one, and a test checks that the kit fails
exactly the case meant to catch it.

It runs a synchronous ``grpc.server`` on its own threads, so the kit's asyncio
client can run in the test's own thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from collateral_sync.transport import MAX_MESSAGE_BYTES, TlsConfig, channel_credentials
from collateral_sync.v1 import (
    custodian_service_pb2,
    emergency_release_service_pb2,
    exchange_service_pb2,
    reconciliation_service_pb2,
    regulator_service_pb2,
    test_control_pb2,
)
from google.rpc import error_details_pb2, status_pb2

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
_REFLECTION = "/grpc.reflection.{}.ServerReflection/ServerReflectionInfo"


def _method_kinds() -> dict[str, str]:
    kinds = {
        "/grpc.health.v1.Health/Check": "unary",
        "/grpc.health.v1.Health/Watch": "server_stream",
        _REFLECTION.format("v1"): "bidi",
        _REFLECTION.format("v1alpha"): "bidi",
    }
    for module in (
        custodian_service_pb2,
        emergency_release_service_pb2,
        exchange_service_pb2,
        reconciliation_service_pb2,
        regulator_service_pb2,
        test_control_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                kind = {
                    (False, False): "unary",
                    (False, True): "server_stream",
                    (True, True): "bidi",
                }[(method.client_streaming, method.server_streaming)]
                kinds[f"/{service.full_name}/{method.name}"] = kind
    return kinds


_KINDS = _method_kinds()


@dataclass(frozen=True)
class Refusal:
    """An error status as the proxy forwards it."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]

    @property
    def reason(self) -> str | None:
        """The ErrorInfo reason in the status details, if any."""
        for key, value in self.trailing_metadata:
            if key == "grpc-status-details-bin" and isinstance(value, bytes):
                for detail in status_pb2.Status.FromString(value).details:
                    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                        info = error_details_pb2.ErrorInfo()
                        detail.Unpack(info)
                        return info.reason
        return None


@dataclass(frozen=True)
class Fault:
    """What the proxy does differently from the server behind it. Every hook may pass (None)."""

    name: str
    #: (method, refusal) -> a replacement: response bytes (the call then succeeds) or a Refusal.
    on_refusal: Callable[[str, Refusal], bytes | Refusal | None] | None = None
    #: (method, response bytes) -> replacement response bytes.
    on_response: Callable[[str, bytes], bytes | None] | None = None
    require_client_auth: bool = True
    #: The status a method the proxy does not know is answered with (the server: UNIMPLEMENTED).
    unknown_method: grpc.StatusCode | None = None
    #: Also answer plaintext gRPC on the same port (telling the two apart by the first
    #: byte, as some servers do), forwarding it like any other call.
    answers_plaintext: bool = False
    #: Once a client has abandoned a call (its deadline passed first), answer every later
    #: call UNAVAILABLE: a server whose workers are held by calls nobody waits for.
    wedged_by_abandoned_calls: bool = False


class _Status(grpc.Status):  # type: ignore[misc]
    def __init__(self, refusal: Refusal) -> None:
        self.code = refusal.code
        self.details = refusal.details
        self.trailing_metadata = refusal.trailing_metadata


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(
        self, upstream: grpc.Channel, fault: Fault, as_party: Mapping[str, grpc.Channel]
    ) -> None:
        self._default = upstream
        self._as_party = as_party
        self._fault = fault
        self._wedged = False

    def _upstream(self, context: grpc.ServicerContext) -> grpc.Channel:
        """The upstream channel of the caller's identity, so the server sees who calls (§4.5)."""
        names = context.auth_context().get("x509_common_name", ())
        party = names[0].decode() if len(names) == 1 else ""
        return self._as_party.get(party, self._default)

    def _check_wedged(self, context: grpc.ServicerContext) -> None:
        if self._wedged:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no worker free: held by abandoned calls")

    def _note_abandoned(self, context: grpc.ServicerContext) -> None:
        """A call its client will not wait for: gone, or arrived with under 0.1 s to live.

        (A call arriving with a few milliseconds left is one the client abandons; the
        wedged server holds a worker for it whether or not it could have answered.)
        """
        remaining = context.time_remaining()
        doomed = not context.is_active() or (remaining is not None and remaining < 0.1)
        if self._fault.wedged_by_abandoned_calls and doomed:
            self._wedged = True

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        kind = _KINDS.get(method)
        if kind == "unary":
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: self._unary(method, request, context)
            )
        if kind == "server_stream":
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: self._stream(
                    method, self._upstream(context).unary_stream(method)(request), context
                )
            )
        if kind == "bidi":
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: self._stream(
                    method, self._upstream(context).stream_stream(method)(requests), context
                )
            )
        code = self._fault.unknown_method
        if code is not None:

            def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
                context.abort(code, f"{method}: no such method")
                raise AssertionError("unreachable")

            return grpc.unary_unary_rpc_method_handler(refuse)
        return None  # UNIMPLEMENTED, as the server would answer

    def _timeout(self, context: grpc.ServicerContext) -> float | None:
        remaining: float | None = context.time_remaining()
        return remaining

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._check_wedged(context)
        self._note_abandoned(context)
        try:
            response: bytes = self._upstream(context).unary_unary(method)(
                request, timeout=self._timeout(context)
            )
        except grpc.RpcError as err:
            self._note_abandoned(context)
            replacement = self._refusal(method, err)
            if isinstance(replacement, bytes):
                return replacement
            context.abort_with_status(_Status(replacement))
            raise AssertionError("unreachable") from err
        self._note_abandoned(context)
        if self._fault.on_response is not None:
            changed = self._fault.on_response(method, response)
            if changed is not None:
                return changed
        return response

    def _stream(
        self, method: str, call: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        try:
            for response in call:
                changed = None
                if self._fault.on_response is not None:
                    changed = self._fault.on_response(method, response)
                yield response if changed is None else changed
        except grpc.RpcError as err:
            replacement = self._refusal(method, err)
            if isinstance(replacement, bytes):
                yield replacement
                return
            context.abort_with_status(_Status(replacement))

    def _refusal(self, method: str, err: grpc.RpcError) -> bytes | Refusal:
        refusal = Refusal(
            code=err.code(),
            details=err.details() or "",
            trailing_metadata=tuple(err.trailing_metadata() or ()),
        )
        if self._fault.on_refusal is not None:
            replacement = self._fault.on_refusal(method, refusal)
            if replacement is not None:
                return replacement
        return refusal


class FaultProxy:
    """The proxy's life: ``start()`` returns its address; ``stop()``."""

    def __init__(
        self,
        upstream: str,
        *,
        client_tls: TlsConfig,
        server_tls: TlsConfig,
        fault: Fault,
        identities: Sequence[TlsConfig] = (),
    ) -> None:
        """``identities``: further client identities, passed through as themselves (else
        every call reaches the server as ``client_tls``)."""
        self._channel = grpc.secure_channel(upstream, channel_credentials(client_tls), _OPTIONS)
        self._channels = {
            tls.party_id: grpc.secure_channel(upstream, channel_credentials(tls), _OPTIONS)
            for tls in identities
        }
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            handlers=[_Handler(self._channel, fault, self._channels)],
            options=[*_OPTIONS, ("grpc.so_reuseport", 0)],
        )
        credentials = grpc.ssl_server_credentials(
            [(server_tls.private_key, server_tls.cert_chain)],
            root_certificates=server_tls.ca_cert,
            require_client_auth=fault.require_client_auth,
        )
        self._port = self._server.add_secure_port("127.0.0.1:0", credentials)
        self._sniffer: _Sniffer | None = None
        if fault.answers_plaintext:
            plaintext = self._server.add_insecure_port("127.0.0.1:0")
            self._sniffer = _Sniffer(tls_port=self._port, plaintext_port=plaintext)

    def start(self) -> str:
        self._server.start()
        if self._sniffer is not None:
            return f"127.0.0.1:{self._sniffer.start()}"
        return f"127.0.0.1:{self._port}"

    def stop(self) -> None:
        if self._sniffer is not None:
            self._sniffer.stop()
        self._server.stop(grace=None)
        self._channel.close()
        for channel in self._channels.values():
            channel.close()


#: The first byte of a TLS connection: a handshake record.
_TLS_HANDSHAKE = 0x16


class _Sniffer:
    """One TCP port in front of two: TLS connections to one, anything else to the other."""

    def __init__(self, *, tls_port: int, plaintext_port: int) -> None:
        self._ports = (tls_port, plaintext_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = threading.Event()

    def start(self) -> int:
        threading.Thread(target=self._accept, daemon=True).start()
        port: int = self._listener.getsockname()[1]
        return port

    def stop(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._route, args=(client,), daemon=True).start()

    def _route(self, client: socket.socket) -> None:
        with client:
            first = client.recv(1, socket.MSG_PEEK)
            if not first:
                return
            port = self._ports[0] if first[0] == _TLS_HANDSHAKE else self._ports[1]
            with socket.create_connection(("127.0.0.1", port)) as server:
                back = threading.Thread(target=_pipe, args=(server, client), daemon=True)
                back.start()
                _pipe(client, server)
                back.join()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    """Copy bytes until ``source`` ends, then end ``target``'s writing side."""
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)
