"""The life of a reference server process: the role registry, start-up, serving, shutdown.

``collateral-sync serve <role> --config FILE`` lands in :func:`serve_main`,
which loads and checks everything before it binds (configuration, signing key,
key registry, TLS material, storage), builds the role, serves it over mutual
TLS with health and reflection (:mod:`collateral_sync.server`), and prints one
machine-readable line on stdout once it is serving::

    LISTENING 127.0.0.1:7441

(tests start servers on port 0 and read the real port from that line), followed,
when the configuration has a ``metrics`` section, by ``METRICS host:port``:
where ``GET /metrics`` answers (:mod:`~collateral_sync_reference.common.metrics`). SIGTERM
or SIGINT stops the server gracefully: background work first, then in-flight
calls get a grace period, then the storage is closed.

Every problem found before serving is one error naming the configuration key
and file at fault: a missing or unreadable file, a signing key of another
party or role (or registered for another), a PKCS#11 token or key that cannot
be used (wrong PIN, no such token or label, not Ed25519), a TLS key that does not match its certificate, an address
already in use. A server whose own TLS certificate (``tls.cert``, or every
certificate of ``tls.ca``) has expired or is not yet valid refuses to start
(exit 2, naming the file and its notAfter/notBefore) rather than serve a
certificate every peer would refuse. While serving, replaced TLS files are
picked up by each new connection, in and out, without a restart, and a
certificate expiring within 14 days is a warning
(:mod:`collateral_sync_reference.common.tls`).

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
import contextlib
import errno
import importlib
import inspect
import logging
import signal
import socket
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from collateral_sync.dev_ca import load_certificate_chain_pem, load_private_key_pem
from collateral_sync.errors import CollateralSyncError, MalformedError, SignerError, StorageError
from collateral_sync.keys import KeyRegistry, SigningKey, role_name
from collateral_sync.server import add_servicer, create_server, start_server, stop_server
from collateral_sync.signed_registry import load_key_registry
from collateral_sync.signer import Pkcs11Signer, Signer
from collateral_sync.transport import (
    ReloadableTls,
    TlsConfig,
    grpc_core_log_held,
    peer_party_id,
)
from collateral_sync.v1 import common_pb2, test_control_pb2_grpc

from collateral_sync_reference.common.access import AccessInterceptor
from collateral_sync_reference.common.clock import Clock, SystemClock, TestClock
from collateral_sync_reference.common.config import (
    Pkcs11KeySettings,
    ServerConfig,
    TlsFiles,
    load_config,
)
from collateral_sync_reference.common.keys import KeyFollower, SwitchingSigner
from collateral_sync_reference.common.metrics import ServerMetrics
from collateral_sync_reference.common.storage import PostgresStorage, SqlStorage, open_storage
from collateral_sync_reference.common.storage._health import watch_database
from collateral_sync_reference.common.storage._lease import PostgresLease
from collateral_sync_reference.common.tls import ServerTls, watching
from collateral_sync_reference.common.tracing import JsonLogFormatter, Tracing, start_tracing

__all__ = [
    "DEFAULT_PORTS",
    "ROLE_MODULES",
    "Role",
    "ServerContext",
    "load_signer",
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
#: How often a standby tries to take the database's lease, in seconds.
_LEASE_POLL = 0.5

_T = TypeVar("_T")


@dataclass(slots=True)
class ServerContext:
    """Everything a role is built from."""

    config: ServerConfig
    #: What the role module's ``parse_settings(config)`` returned (None without one).
    settings: object
    storage: SqlStorage
    clock: Clock
    signer: Signer
    registry: KeyRegistry
    #: The server's TLS files, read again when they change (None: plaintext, tests only).
    tls: ReloadableTls | None
    test_mode: bool
    logger: logging.Logger
    _shutdown: Callable[[int, str], None] = field(repr=False)
    #: The server's Prometheus metrics; roles add their readings while they are built.
    metrics: ServerMetrics = field(default_factory=ServerMetrics.off, repr=False)

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
    if config.log_format == "json":
        _log_json_lines()
    # The role's own section is checked before anything is opened or created.
    parse_settings = getattr(module, "parse_settings", None)
    settings = parse_settings(config) if callable(parse_settings) else None
    # A refusal from here on ends the process, and with it a token signer's session.
    token_or_file = load_signer(config)
    signer = SwitchingSigner(token_or_file)
    registry, signed = _config_file(
        config,
        "key_registry",
        config.key_registry,
        "a key registry file",
        lambda path: load_key_registry(path, root_sha256=config.key_registry_root),
    )
    _check_registered(config, registry, signer)
    role_logger = logging.getLogger(f"collateral_sync_reference.{config.role}")
    tls: TlsConfig | None = None
    server_tls: ServerTls | None = None
    if plaintext_for_testing:
        _LOGGER.warning("serving WITHOUT TLS (--plaintext-for-testing): tests only")
    else:
        if config.tls is None:
            raise MalformedError(
                f"config {config.file}: tls is required (ca, cert, key) unless "
                "--plaintext-for-testing is given",
                metadata={"field": "tls", "expected": "an object", "actual": "absent"},
            )
        tls = _load_tls(config, config.tls)
        if tls.party_id != config.party_id:
            raise MalformedError(
                f"config {config.file}: tls.cert: {config.tls.cert}: CN {tls.party_id!r}, "
                f"expected the party id {config.party_id!r}",
                metadata={"field": "tls.cert", "expected": config.party_id, "actual": tls.party_id},
            )
        _check_validity(config, config.tls, tls, datetime.now(UTC))
        server_tls = ServerTls(config.tls, tls, party_id=config.party_id, logger=role_logger)
        server_tls.warn_if_expiring()
    storage = _open_storage(config)
    tracing = Tracing.off()
    try:
        follower = KeyFollower(
            registry=registry,
            signed=signed,
            registry_path=config.key_registry,
            signer=signer,
            key_path=config.signing_key if isinstance(config.signing_key, Path) else None,
            logger=role_logger,
            storage=storage,
            where=f"config {config.file}: key_registry: {config.key_registry}",
        )
        # Before any channel is made: the client instrumentation wraps the channels made after.
        tracing = start_tracing(config)
        clock: Clock = TestClock(storage) if test_mode else SystemClock()
        serving = _serve(
            module,
            config,
            settings=settings,
            storage=storage,
            clock=clock,
            signer=signer,
            registry=registry,
            tls=None if server_tls is None else server_tls.material,
            test_mode=test_mode,
            listen=listen or config.listen,
            tracing=tracing,
        )
        return asyncio.run(watching(server_tls, _following(follower, serving)))
    finally:
        # Flushes the spans still buffered, the last calls' included.
        tracing.shutdown()
        storage.close()
        _close_signer(token_or_file)


async def _following(follower: KeyFollower, work: Awaitable[_T]) -> _T:
    """Await ``work`` while ``follower`` follows the registry and key files."""
    watch = asyncio.create_task(follower.watch(), name="key-follower")
    try:
        return await work
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


def load_signer(config: ServerConfig) -> Signer:
    """The server's signer: its key file, or its key on a PKCS#11 token, of its party and role.

    A problem is one MalformedError naming ``signing_key`` (or
    ``signing_key.pkcs11``) and the file, token or key at fault.
    """
    expected_role = _PARTY_ROLES.get(config.role)
    key = config.signing_key
    if isinstance(key, Pkcs11KeySettings):
        if expected_role is None:
            raise MalformedError(
                f"config {config.file}: signing_key.pkcs11: role {config.role!r} has no "
                "PartyRole for a key on a token",
                metadata={"field": "signing_key.pkcs11", "expected": "a role", "actual": "none"},
            )
        try:
            # The token binds no party or role to a key: the registry does (see serve_main).
            return Pkcs11Signer(
                key.module,
                token=key.token,
                label=key.label,
                pin=key.pin,
                party_id=config.party_id,
                role=expected_role,
            )
        except SignerError as err:
            raise MalformedError(
                f"config {config.file}: signing_key.pkcs11: {err.message}",
                metadata={
                    "field": "signing_key.pkcs11",
                    "expected": "a usable Ed25519 key on the token",
                    "actual": err.message[:200],
                },
            ) from err
    signer = _config_file(config, "signing_key", key, "a signing key file", SigningKey.load)
    if signer.party_id != config.party_id or (
        expected_role is not None and signer.role != expected_role
    ):
        expected = f"{config.party_id}/{role_name(expected_role or 0)}"
        actual = f"{signer.party_id}/{role_name(signer.role)}"
        raise MalformedError(
            f"config {config.file}: signing_key: {key}: expected a key of {expected}, got {actual}",
            metadata={"field": "signing_key", "expected": expected, "actual": actual},
        )
    return signer


def _check_registered(config: ServerConfig, registry: KeyRegistry, signer: Signer) -> None:
    """The server's own key is in the registry, registered for its party and role."""
    entry = registry.get(signer.key_id)
    if entry is None:
        raise MalformedError(
            f"config {config.file}: key_registry: {config.key_registry} does not hold this "
            f"server's own key {signer.key_id} (add it with collateral-sync keygen --registry)",
            metadata={"field": "key_registry", "expected": signer.key_id, "actual": "absent"},
        )
    expected_role = _PARTY_ROLES.get(config.role)
    if entry.party_id != config.party_id or (
        expected_role is not None and entry.role != expected_role
    ):
        expected = f"{config.party_id}/{role_name(expected_role or 0)}"
        actual = f"{entry.party_id}/{role_name(entry.role)}"
        raise MalformedError(
            f"config {config.file}: key_registry: {config.key_registry} registers this "
            f"server's key {signer.key_id} for {actual}, expected {expected}",
            metadata={"field": "key_registry", "expected": expected, "actual": actual},
        )


def _close_signer(signer: Signer) -> None:
    """Log a token signer out of its token; a key file holds nothing open."""
    if isinstance(signer, Pkcs11Signer):
        signer.close()


def _config_file(
    config: ServerConfig, key: str, path: Path, what: str, load: Callable[[Path], _T]
) -> _T:
    """``load(path)`` for the file under ``key``; any problem names the key and the path."""
    where = f"config {config.file}: {key}"
    if not path.exists():
        raise MalformedError(
            f"{where}: {path}: no such file (paths in a config are relative to its directory)",
            metadata={"field": key, "expected": what, "actual": "missing"},
        )
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise MalformedError(
            f"{where}: {path} is {kind}, expected {what}",
            metadata={"field": key, "expected": what, "actual": kind},
        )
    try:
        return load(path)
    except OSError as err:
        raise MalformedError(
            f"{where}: cannot read {path} ({err.strerror or err})",
            metadata={"field": key, "expected": f"a readable file: {what}", "actual": str(err)},
        ) from err
    except (CollateralSyncError, ValueError) as err:
        message = err.message if isinstance(err, CollateralSyncError) else str(err)
        shown = message if str(path) in message else f"{path}: {message}"
        raise MalformedError(
            f"{where}: {shown}",
            metadata={"field": key, "expected": what, "actual": message[:200]},
        ) from err


def _pem_certificates(path: Path) -> bytes:
    data = path.read_bytes()
    load_certificate_chain_pem(data)
    return data


def _pem_private_key(path: Path) -> bytes:
    data = path.read_bytes()
    load_private_key_pem(data)
    return data


def _load_tls(config: ServerConfig, files: TlsFiles) -> TlsConfig:
    """The server's TLS material, each file checked on its own so that errors name it."""
    ca = _config_file(config, "tls.ca", files.ca, "the CA certificate (PEM)", _pem_certificates)
    cert = _config_file(
        config, "tls.cert", files.cert, "this server's certificate (PEM)", _pem_certificates
    )
    key = _config_file(
        config, "tls.key", files.key, "the private key (PEM) of tls.cert", _pem_private_key
    )
    try:
        return TlsConfig(ca, cert, key)
    except MalformedError as err:
        raise MalformedError(
            f"config {config.file}: tls.key: {files.key} is not the private key of tls.cert "
            f"{files.cert}",
            metadata={"field": "tls.key", "expected": "the key of tls.cert", "actual": "another"},
        ) from err


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def _check_validity(config: ServerConfig, files: TlsFiles, tls: TlsConfig, now: datetime) -> None:
    """Refuse to serve a certificate every peer would refuse: expired, or not yet valid.

    Every certificate of ``tls.cert`` (the chain the server presents) must be valid now;
    of ``tls.ca``, at least one (a bundle may keep an old CA beside the current one).
    """

    def problem(cert: Any) -> str | None:
        if now >= cert.not_valid_after_utc:
            return (
                f"expired at {_utc(cert.not_valid_after_utc)} (notAfter; now {_utc(now)}); "
                "issue a new one (development: collateral-sync dev-certs --force)"
            )
        if now < cert.not_valid_before_utc:
            return (
                f"is not valid before {_utc(cert.not_valid_before_utc)} (notBefore; now "
                f"{_utc(now)}); check this machine's clock, or wait"
            )
        return None

    for cert in load_certificate_chain_pem(tls.cert_chain):
        found = problem(cert)
        if found is not None:
            subject = cert.subject.rfc4514_string()
            raise MalformedError(
                f"config {config.file}: tls.cert: the certificate {files.cert} ({subject}) {found}",
                metadata={"field": "tls.cert", "expected": "a valid certificate", "actual": found},
            )
    cas = load_certificate_chain_pem(tls.ca_cert)
    problems = [problem(cert) for cert in cas]
    if all(found is not None for found in problems):
        raise MalformedError(
            f"config {config.file}: tls.ca: the CA certificate {files.ca} {problems[0]}",
            metadata={"field": "tls.ca", "expected": "a valid CA", "actual": str(problems[0])},
        )


def _open_storage(config: ServerConfig) -> SqlStorage:
    settings = config.storage
    if settings.engine == "postgresql":
        return _open_postgres(config)
    path = settings.path
    where = f"config {config.file}: storage.path: {path}"
    if path is not None and path.exists() and not path.is_file():
        raise MalformedError(
            f"{where} is {'a directory' if path.is_dir() else 'not a regular file'}, expected "
            "the SQLite database file (created if absent)",
            metadata={"field": "storage.path", "expected": "a file", "actual": "not a file"},
        )
    try:
        return open_storage(settings)
    except (OSError, sqlite3.Error) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise MalformedError(
            f"{where}: cannot open the database ({detail})",
            metadata={"field": "storage.path", "expected": "an SQLite database", "actual": detail},
        ) from err


def _open_postgres(config: ServerConfig) -> SqlStorage:
    """The PostgreSQL storage, or one line on what is wrong: unreachable, refused, no rights."""
    import psycopg  # noqa: PLC0415  # the [postgresql] extra, checked when the config was read

    where = f"config {config.file}: storage.dsn"
    try:
        return open_storage(config.storage)
    except StorageError as err:
        raise MalformedError(
            f"{where}: {err.message}",
            metadata={"field": "storage.dsn", "expected": "a reachable database", "actual": "none"},
        ) from err
    except psycopg.Error as err:
        # libpq says it (wrong password, no such database, permission denied), over
        # several lines: one line here.
        detail = " ".join(part.strip() for part in str(err).split()) or type(err).__name__
        raise MalformedError(
            f"{where}: cannot use the database ({detail})",
            metadata={"field": "storage.dsn", "expected": "a usable database", "actual": detail},
        ) from err


def _bind_problem(listen: str) -> str:
    """Why ``listen`` could not be bound, found by trying it with a plain socket."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    fix = "stop it, or choose another port (--listen, or listen in the config)"
    try:
        addresses = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as err:
        return f"cannot listen on {listen}: cannot resolve {host!r} ({err})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return (
                        f"cannot listen on {listen}: the address is already in use (another "
                        f"process listens there); {fix}"
                    )
                if err.errno == errno.EADDRNOTAVAIL:
                    return (
                        f"cannot listen on {listen}: {host} is not an address of this machine "
                        "(--listen, or listen in the config)"
                    )
                return f"cannot listen on {listen}: {err.strerror or err}"
    return f"cannot listen on {listen} (in use, or not a local address)"


async def _bind(server: grpc.aio.Server, listen: str, *, serving: bool = True) -> int:
    """Bind and start ``server``; a failure is one clean line, without gRPC's own log."""
    with grpc_core_log_held() as held:
        try:
            return await start_server(server, listen, serving=serving)
        except OSError as err:
            held.drop_core_log = True
            raise OSError(_bind_problem(listen)) from err


@contextlib.contextmanager
def _signals(shutdown: Callable[[int, str], None]) -> Iterator[None]:
    """SIGTERM and SIGINT stop the server (exit code 0) while the block runs."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown, 0, f"signal {signal.Signals(signum).name}")
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _standby_until_active(
    lease: PostgresLease,
    listen: str,
    tls: ReloadableTls | None,
    stopping: asyncio.Event,
    shutdown: Callable[[int, str], None],
) -> str | None:
    """Hold the lease, or serve health NOT_SERVING on ``listen`` until it can be taken.

    Returns the address to serve on once active (the standby's own port, when
    ``listen`` asked for any), or None if stopped while waiting. A standby
    prints ``STANDBY host:port`` where an active server prints ``LISTENING``.
    """
    if await asyncio.to_thread(lease.try_acquire):
        return listen
    standby = create_server(tls=tls, plaintext_for_testing=tls is None, servicers=[])
    port = await _bind(standby, listen, serving=False)
    host = listen.rsplit(":", 1)[0]
    _LOGGER.info("standby on %s:%d: another server holds the database's lease", host, port)
    print(f"STANDBY {host}:{port}", flush=True)
    try:
        with _signals(shutdown):
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), _LEASE_POLL)
                if not stopping.is_set() and await asyncio.to_thread(lease.try_acquire):
                    _LOGGER.warning("took the database's lease: becoming the active server")
                    return f"{host}:{port}"
            return None
    finally:
        await stop_server(standby, grace=0)


async def _serve(
    module: Any,
    config: ServerConfig,
    *,
    settings: object,
    storage: SqlStorage,
    clock: Clock,
    signer: Signer,
    registry: KeyRegistry,
    tls: ReloadableTls | None,
    test_mode: bool,
    listen: str,
    tracing: Tracing,
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
        metrics=ServerMetrics(
            config.metrics,
            role=config.role,
            party_id=config.party_id,
            tls=lambda: None if tls is None else tls.current(),
        ),
    )
    # Before a standby waits: it answers scrapes too (the role's figures come once it serves).
    metrics_at = context.metrics.start()
    lease: PostgresLease | None = None
    if isinstance(storage, PostgresStorage):
        # Two processes of one role may share a database: one serves, the other waits.
        lease = storage.lease()
        active = await _standby_until_active(lease, listen, tls, stopping, shutdown)
        if active is None:
            lease.release()
            context.metrics.stop()
            return outcome["code"]
        listen = active
        storage.fence(lease)
    role: Role = module.create_role(context)
    server = create_server(
        tls=tls,
        plaintext_for_testing=tls is None,
        servicers=role.servicers(),
        # Outside the error mapping: a call's span carries the status the peer got.
        outer_interceptors=tracing.server_interceptors(),
        # The log sees refusals of access too; access runs before the servicer.
        interceptors=[
            # First: it counts what the others refuse too.
            *context.metrics.interceptors(),
            _RequestErrorLog(context.logger),
            AccessInterceptor(context.registry, plaintext=tls is None),
        ],
    )
    if test_mode:
        # Added like the protocol services: the interceptors map its errors,
        # and health and reflection list it (only a test-mode server has it).
        add_servicer(server, role.test_control())
    port = await _bind(server, listen)
    started = False
    watcher: asyncio.Task[None] | None = None
    # A second signal while stopping changes nothing: the first one decided.
    with _signals(shutdown):
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
            if metrics_at is not None:
                print(f"METRICS {metrics_at}", flush=True)
            if isinstance(storage, PostgresStorage):
                watcher = asyncio.create_task(
                    watch_database(storage, server, context.logger, lease=lease, on_lost=shutdown)
                )
            await stopping.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            context.metrics.stop()
            # Calls in flight finish (or are cancelled after the grace) before the
            # role releases what they use.
            await stop_server(server, grace=SHUTDOWN_GRACE)
            if started:
                await role.stop()
    return outcome["code"]


def _log_json_lines() -> None:
    """``logging.format: json``: every stderr log line one JSON object (with trace ids)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonLogFormatter())


def _configure_logging() -> None:
    # stdout carries only the LISTENING (STANDBY, METRICS) lines; logs go to stderr, one line each.
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
