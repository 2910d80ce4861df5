"""The life of a reference server process: the role registry, start-up, serving, shutdown.

``collateral-sync serve <role> --config FILE`` lands in :func:`serve_main`,
which loads and checks everything before it binds (configuration, signing key,
key registry, TLS material, storage), builds the role, serves it over mutual
TLS with health and reflection (:mod:`collateral_sync.server`), and prints one
machine-readable line on stdout once it is serving::

    LISTENING 127.0.0.1:7441

(tests start servers on port 0 and read the real port from that line). SIGTERM
or SIGINT stops the server gracefully: background work first, then in-flight
calls get a grace period, then the storage is closed.

Roles
-----
:data:`ROLE_MODULES` names the module of each role. A role module provides
``create_role(context: ServerContext) -> Role`` and may provide
``parse_settings(config: ServerConfig) -> object``, which checks the role's
own configuration section before any file is opened (its result is
``context.settings``). Adding a role is adding its module (the registry
already names ``exchange`` and ``regulator``). The
:class:`Role` builds its servicers from the :class:`ServerContext`, may run
background tasks between :meth:`Role.start` and :meth:`Role.stop`, and in test
mode serves ``TestControlService`` (usually a subclass of
:class:`collateral_sync_reference.common.test_control.TestControlBase`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio
from collateral_sync.errors import CollateralSyncError, MalformedError
from collateral_sync.keys import KeyRegistry, SigningKey, role_name
from collateral_sync.server import add_servicer, create_server, start_server, stop_server
from collateral_sync.transport import TlsConfig, peer_party_id
from collateral_sync.v1 import common_pb2, test_control_pb2_grpc

from collateral_sync_reference.common.access import AccessInterceptor
from collateral_sync_reference.common.clock import Clock, SystemClock, TestClock
from collateral_sync_reference.common.config import ServerConfig, load_config
from collateral_sync_reference.common.storage import SqliteStorage, open_storage

__all__ = [
    "DEFAULT_PORTS",
    "ROLE_MODULES",
    "Role",
    "ServerContext",
    "serve_main",
]

#: Module of each role; each provides ``create_role(context) -> Role``.
ROLE_MODULES: Mapping[str, str] = {
    "custodian": "collateral_sync_reference.custodian",
    "exchange": "collateral_sync_reference.exchange",
    "regulator": "collateral_sync_reference.regulator",
}

#: Port each role listens on (loopback) when the configuration names none.
DEFAULT_PORTS: Mapping[str, int] = {"custodian": 7441, "exchange": 7442, "regulator": 7443}

#: The PartyRole a role's signing key must have.
_PARTY_ROLES: Mapping[str, int] = {
    "custodian": common_pb2.PARTY_ROLE_CUSTODIAN,
    "exchange": common_pb2.PARTY_ROLE_EXCHANGE,
    "regulator": common_pb2.PARTY_ROLE_REGULATOR,
}

#: Seconds in-flight calls get to finish on shutdown.
SHUTDOWN_GRACE = 2.0

_LOGGER = logging.getLogger("collateral_sync_reference")


@dataclass(slots=True)
class ServerContext:
    """Everything a role is built from."""

    config: ServerConfig
    #: What the role module's ``parse_settings(config)`` returned (None without one).
    settings: object
    storage: SqliteStorage
    clock: Clock
    signer: SigningKey
    registry: KeyRegistry
    tls: TlsConfig | None
    test_mode: bool
    logger: logging.Logger
    _shutdown: Callable[[int, str], None] = field(repr=False)

    @property
    def party_id(self) -> str:
        return self.config.party_id

    @property
    def plaintext(self) -> bool:
        """Whether the server runs without TLS (tests only): no peer identities then."""
        return self.tls is None

    @property
    def test_clock(self) -> TestClock | None:
        return self.clock if isinstance(self.clock, TestClock) else None

    def request_shutdown(self, exit_code: int, reason: str) -> None:
        """Stop the server (e.g. on a fatal storage error); the process exits with ``exit_code``."""
        self._shutdown(exit_code, reason)


class Role(Protocol):
    """One party's server behaviour."""

    def servicers(self) -> Sequence[object]:
        """Instances of the generated collateral-sync ``*Servicer`` classes to serve."""

    def test_control(self) -> test_control_pb2_grpc.TestControlServiceServicer:
        """The TestControlService servicer; asked for only in test mode."""

    async def start(self) -> None:
        """Start background work; the server is already accepting calls."""

    async def stop(self) -> None:
        """Stop background work and release resources; called once, after the server stopped."""


def _load_role_module(role: str) -> Any:
    module_name = ROLE_MODULES.get(role)
    if module_name is None:
        raise MalformedError(
            f"unknown role {role!r}; expected one of {', '.join(sorted(ROLE_MODULES))}",
            metadata={"expected": "|".join(sorted(ROLE_MODULES)), "actual": role},
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise MalformedError(
            f"role {role!r} is not available in this installation (no module {module_name})",
            metadata={"expected": module_name, "actual": "missing"},
        ) from err
    if not callable(getattr(module, "create_role", None)):
        raise MalformedError(
            f"role module {module_name} has no create_role(context)",
            metadata={"expected": "create_role", "actual": "missing"},
        )
    return module


def serve_main(
    role: str,
    config_path: str,
    *,
    test_mode: bool = False,
    listen: str | None = None,
    plaintext_for_testing: bool = False,
) -> int:
    """Run a server until SIGTERM/SIGINT; returns the process exit code.

    Problems found before serving (configuration, keys, TLS files, a port
    already in use) raise CollateralSyncError or OSError for the CLI to report.
    """
    _configure_logging()
    module = _load_role_module(role)
    config = load_config(config_path, role=role, default_port=DEFAULT_PORTS.get(role, 0))
    # The role's own section is checked before anything is opened or created.
    parse_settings = getattr(module, "parse_settings", None)
    settings = parse_settings(config) if callable(parse_settings) else None
    signer = SigningKey.load(config.signing_key)
    expected_role = _PARTY_ROLES.get(role)
    if signer.party_id != config.party_id or (
        expected_role is not None and signer.role != expected_role
    ):
        expected = f"{config.party_id}/{role_name(expected_role or 0)}"
        actual = f"{signer.party_id}/{role_name(signer.role)}"
        raise MalformedError(
            f"signing key {config.signing_key}: expected a key of {expected}, got {actual}",
            metadata={"field": "signing_key", "expected": expected, "actual": actual},
        )
    registry = KeyRegistry.load(config.key_registry)
    if signer.key_id not in registry:
        raise MalformedError(
            f"key registry {config.key_registry} does not hold this server's own key "
            f"{signer.key_id}",
            metadata={"field": "key_registry", "expected": signer.key_id, "actual": "absent"},
        )
    tls: TlsConfig | None = None
    if plaintext_for_testing:
        _LOGGER.warning("serving WITHOUT TLS (--plaintext-for-testing): tests only")
    else:
        if config.tls is None:
            raise MalformedError(
                f"config {config.file}: tls is required (ca, cert, key) unless "
                "--plaintext-for-testing is given",
                metadata={"field": "tls", "expected": "an object", "actual": "absent"},
            )
        tls = TlsConfig.from_files(config.tls.ca, config.tls.cert, config.tls.key)
        if tls.party_id != config.party_id:
            raise MalformedError(
                f"TLS certificate {config.tls.cert}: CN {tls.party_id!r}, expected the "
                f"party id {config.party_id!r}",
                metadata={"field": "tls.cert", "expected": config.party_id, "actual": tls.party_id},
            )
    storage = open_storage(
        config.storage.engine, config.storage.path, synchronous=config.storage.synchronous
    )
    try:
        clock: Clock = TestClock(storage) if test_mode else SystemClock()
        return asyncio.run(
            _serve(
                module,
                config,
                settings=settings,
                storage=storage,
                clock=clock,
                signer=signer,
                registry=registry,
                tls=tls,
                test_mode=test_mode,
                listen=listen or config.listen,
            )
        )
    finally:
        storage.close()


async def _serve(
    module: Any,
    config: ServerConfig,
    *,
    settings: object,
    storage: SqliteStorage,
    clock: Clock,
    signer: SigningKey,
    registry: KeyRegistry,
    tls: TlsConfig | None,
    test_mode: bool,
    listen: str,
) -> int:
    stopping = asyncio.Event()
    outcome = {"code": 0}

    def shutdown(code: int, reason: str) -> None:
        if not stopping.is_set():
            log = _LOGGER.error if code else _LOGGER.info
            log("stopping: %s", reason)
            outcome["code"] = code
            stopping.set()

    context = ServerContext(
        config=config,
        settings=settings,
        storage=storage,
        clock=clock,
        signer=signer,
        registry=registry,
        tls=tls,
        test_mode=test_mode,
        logger=logging.getLogger(f"collateral_sync_reference.{config.role}"),
        _shutdown=shutdown,
    )
    role: Role = module.create_role(context)
    server = create_server(
        tls=tls,
        plaintext_for_testing=tls is None,
        servicers=role.servicers(),
        # The log sees refusals of access too; access runs before the servicer.
        interceptors=[
            _RequestErrorLog(context.logger),
            AccessInterceptor(context.registry, plaintext=tls is None),
        ],
    )
    if test_mode:
        # Added like the protocol services: the interceptors map its errors,
        # and health and reflection list it (only a test-mode server has it).
        add_servicer(server, role.test_control())
    port = await start_server(server, listen)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown, 0, f"signal {signal.Signals(signum).name}")
    started = False
    try:
        await role.start()
        started = True
        host = listen.rsplit(":", 1)[0]
        context.logger.info(
            "%s %s serving on %s:%d%s",
            config.role,
            config.party_id,
            host,
            port,
            " (test mode)" if test_mode else "",
        )
        print(f"LISTENING {host}:{port}", flush=True)
        await stopping.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        # Calls in flight finish (or are cancelled after the grace) before the
        # role releases what they use.
        await stop_server(server, grace=SHUTDOWN_GRACE)
        if started:
            await role.stop()
    return outcome["code"]


def _configure_logging() -> None:
    # stdout carries only the LISTENING line; logs go to stderr, one line each.
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


class _RequestErrorLog(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """One log line per refused unary request: method, peer, reason, message.

    Runs inside the SDK's error mapping, which turns the error into the status
    and logs unexpected exceptions with their traceback; streams log their
    own outcome.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._logged(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _logged(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], Any], method: str
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        logger = self._logger

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
            except CollateralSyncError as err:
                logger.warning(
                    "%s from %s refused: %s (%s): %s",
                    method,
                    peer_party_id(context) or context.peer(),
                    err.reason_name,
                    err.code.name,
                    err.message,
                )
                raise
            return result

        return call
