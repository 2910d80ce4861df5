"""Server configuration: one JSON file per server, checked completely before anything starts.

Every reference server reads one JSON object (paths in it are relative to the
file's directory)::

    {
      "party_id": "custodian-1",
      "role": "custodian",
      "listen": "127.0.0.1:7441",
      "storage": {"engine": "sqlite", "path": "custodian-1.sqlite", "synchronous": "NORMAL"},
      (or "storage": {"engine": "postgresql", "dsn": "host=db port=5432 dbname=custodian
                      user=custodian", "password_env": "CUSTODIAN_DB_PASSWORD", "pool_size": 4})
      "signing_key": "keys/custodian-1.key.json",
      (or "signing_key": {"pkcs11": {"module": "/usr/lib/softhsm/libsofthsm2.so",
                          "token": "custodian-hsm", "label": "custodian-1",
                          "pin_env": "CUSTODIAN_HSM_PIN"}})
      "key_registry": "keys/registry.json",
      "key_registry_root": "<SHA-256 of a signed registry's version 1>",
      "tls": {"ca": "pki/ca.pem", "cert": "pki/custodian-1.pem", "key": "pki/custodian-1.key"},
      "peers": {"exchange-1": "127.0.0.1:7442"},
      "max_skew_seconds": 30,
      "sync": {"window": 8000, "batch_size": 250, "heartbeat_interval_ms": 5000},
      "metrics": {"listen": "127.0.0.1:9464"},
      "tracing": {"exporter": "otlp", "endpoint": "http://127.0.0.1:4317"},
      "logging": {"format": "json"},
      "custodian": {...}
    }

``party_id``, ``role``, ``signing_key`` and ``key_registry`` are required.
``key_registry`` is a plain registry (read once) or a signed one (PROTOCOL.md
§4.6), whose new versions the server takes while it runs; ``key_registry_root``
(optional) pins the signed registry's version 1 by its SHA-256.
``signing_key`` is a key file, or a key on a PKCS#11 token (an HSM): the
module, the token's label, the key's label, and the token's user PIN from
``pin_env`` or ``pin_file``, never from the configuration itself.
``tls`` is required
``tls`` is required unless the server runs with ``--plaintext-for-testing``
(and a server refuses to start with a ``tls.cert`` that has expired or is not
yet valid: see :mod:`~collateral_sync_reference.common.runner`).
``peers`` maps each counterparty's party id to its address (``null`` for a
peer that dials us). ``metrics`` (optional; off when absent) is where the
server serves its Prometheus metrics over HTTP, ``{"listen": "host:port"}``
(see :mod:`~collateral_sync_reference.common.metrics`). ``tracing``
(optional; off when absent) exports OpenTelemetry spans, ``{"exporter":
"console" | "otlp", "endpoint": "...", "service_name": "..."}`` (``endpoint``
only for otlp), and ``logging`` says how stderr log lines look, ``{"format":
"text" | "json"}`` (see :mod:`~collateral_sync_reference.common.tracing`). The object named after the role holds the role's own
settings; its module reads it through :class:`ConfigSection`. Unknown keys are
refused at every level, so a typo never silently falls back to a default.
Every problem is a :class:`~collateral_sync.errors.MalformedError` naming the
file and the key path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from collateral_sync.amounts import Amount, parse_amount
from collateral_sync.errors import CollateralSyncError, MalformedError
from collateral_sync.sync import DEFAULT_BATCH_SIZE

__all__ = [
    "DEFAULT_LISTEN_HOST",
    "ConfigSection",
    "MetricsSettings",
    "Pkcs11KeySettings",
    "ServerConfig",
    "StorageSettings",
    "SyncSettings",
    "TlsFiles",
    "TracingSettings",
    "check_address",
    "load_config",
]

DEFAULT_LISTEN_HOST = "127.0.0.1"
_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_ENGINES = ("sqlite", "postgresql")
_EXPORTERS = ("console", "otlp")
_LOG_FORMATS = ("text", "json")
_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()


def check_address(text: str) -> str:
    """``host:port`` (``[v6]:port`` for IPv6) with a port in 0..65535, or ValueError."""
    match = _ADDRESS.fullmatch(text)
    if match is None or int(match["port"]) > 65535:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:7441), got {text!r}")
    return text


class ConfigSection:
    """One JSON object of the configuration, read key by key.

    Readers record which keys they consumed; :meth:`finish` refuses the rest,
    so every key in the file is either understood or reported.
    """

    __slots__ = ("_data", "_file", "_read", "_where")

    def __init__(self, data: Mapping[str, Any], *, file: Path, where: str = "") -> None:
        self._data = data
        self._file = file
        self._where = where
        self._read: set[str] = set()

    @property
    def file(self) -> Path:
        return self._file

    def error(self, key: str | None, expected: str, actual: object) -> MalformedError:
        where = self._key_path(key) or "(top level)"
        shown = actual if isinstance(actual, str) else json.dumps(actual)[:80]
        return MalformedError(
            f"config {self._file}: {where}: expected {expected}, got {shown}",
            metadata={"field": where, "expected": expected, "actual": str(shown)},
        )

    def _key_path(self, key: str | None) -> str:
        if key is None:
            return self._where
        return f"{self._where}.{key}" if self._where else key

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> Iterator[str]:
        return iter(self._data)

    def _get(self, key: str, default: object) -> object:
        self._read.add(key)
        if key not in self._data or self._data[key] is None:
            if default is _MISSING:
                raise self.error(key, "a value", "nothing (required)")
            return default
        return self._data[key]

    def string(self, key: str, default: str | _Missing = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, "a non-empty string", value)
        return value

    def integer(
        self,
        key: str,
        default: int | _Missing = _MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "an integer", value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.error(key, f"an integer in [{minimum}, {maximum}]", value)
        return value

    def boolean(self, key: str, default: bool | _Missing = _MISSING) -> bool:
        """A JSON ``true`` or ``false`` (never a string or a number)."""
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "true or false", value)
        return value

    def seconds(self, key: str, default: float | _Missing = _MISSING) -> timedelta:
        """A positive duration given in seconds (integer or decimal)."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(key, "a positive number of seconds", value)
        return timedelta(seconds=value)

    def path(self, key: str, default: str | _Missing = _MISSING) -> Path:
        """A file path, relative to the configuration file's directory."""
        text = self.string(key, default)
        return (self._file.parent / os.path.expanduser(text)).resolve()

    def amount(self, key: str, default: str | _Missing = _MISSING) -> Amount:
        """An exact decimal in canonical text form (never a JSON number: no floats)."""
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.error(key, 'a decimal as a JSON string, e.g. "0.0001"', value)
        try:
            return parse_amount(value, field=self._key_path(key))
        except CollateralSyncError as err:
            raise self.error(key, "a canonical decimal", value) from err

    def section(self, key: str, *, required: bool = False) -> ConfigSection:
        """The object under ``key``; an empty section if absent and not required."""
        value = self._get(key, _MISSING if required else {})
        if not isinstance(value, dict):
            raise self.error(key, "an object", value)
        return ConfigSection(value, file=self._file, where=self._key_path(key))

    def sections(self, key: str, *, required: bool = False) -> list[ConfigSection]:
        """A list of objects under ``key``; empty if absent and not required."""
        value = self._get(key, _MISSING if required else [])
        if not isinstance(value, list):
            raise self.error(key, "a list of objects", value)
        found = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{key}[{index}]", "an object", item)
            found.append(
                ConfigSection(item, file=self._file, where=self._key_path(f"{key}[{index}]"))
            )
        return found

    def entries(self, key: str) -> list[tuple[str, object]]:
        """The (name, value) pairs of the object under ``key`` (empty if absent)."""
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "an object", value)
        return list(value.items())

    def finish(self) -> None:
        """Refuse keys nobody read: a typo must not fall back to a default silently."""
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise self.error(unknown[0], "a known key", f"unknown key {unknown[0]!r}")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of this party's mutual-TLS identity."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where a server keeps its state: ``sqlite`` (a file) or ``postgresql`` (a server)."""

    engine: str
    #: SQLite: the database file. None on PostgreSQL.
    path: Path | None
    #: SQLite ``PRAGMA synchronous``: NORMAL survives a killed process, FULL also power loss.
    synchronous: str = "NORMAL"
    #: PostgreSQL: the connection string (libpq key=value or URI), never with a password.
    dsn: str | None = None
    #: PostgreSQL: the password, read at start from ``password_env`` or ``password_file``.
    password: str | None = field(default=None, repr=False)
    #: PostgreSQL: the most connections the server opens.
    pool_size: int = 4


@dataclass(frozen=True, slots=True)
class Pkcs11KeySettings:
    """A signing key on a PKCS#11 token (see :class:`collateral_sync.signer.Pkcs11Signer`)."""

    #: The token's PKCS#11 library (the HSM vendor's).
    module: Path
    #: The token's label.
    token: str
    #: The key's label (CKA_LABEL) on the token.
    label: str
    #: The token's user PIN, read at start from ``pin_env`` or ``pin_file``.
    pin: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Position-sync stream tuning (see :class:`collateral_sync.sync.SyncSession`)."""

    window: int
    batch_size: int
    heartbeat_interval: timedelta


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Where the server serves its Prometheus metrics (``GET /metrics``, plain HTTP)."""

    #: ``host:port``; port 0 picks a free one (the server prints ``METRICS host:port``).
    listen: str


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Where the server's OpenTelemetry spans go (see :mod:`.tracing`)."""

    #: ``console`` (JSON lines on stderr) or ``otlp`` (OTLP over gRPC).
    exporter: str
    #: The OTLP collector's address; None: the exporter's default (or OTEL_EXPORTER_OTLP_*).
    endpoint: str | None = None
    #: The spans' ``service.name``; None: ``collateral-sync-<role>``.
    service_name: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The settings every role shares; the role's own section is :attr:`role_settings`."""

    file: Path
    party_id: str
    role: str
    listen: str
    storage: StorageSettings
    #: A key file, or a key on a PKCS#11 token.
    signing_key: Path | Pkcs11KeySettings
    key_registry: Path
    tls: TlsFiles | None
    #: Counterparty party id -> address it serves on (None: it dials us).
    peers: Mapping[str, str | None]
    max_skew: timedelta
    sync: SyncSettings
    role_settings: ConfigSection
    #: None: no metrics are served.
    metrics: MetricsSettings | None = None
    #: None: no spans are made or exported.
    tracing: TracingSettings | None = None
    #: How log lines on stderr look: ``text`` or ``json`` (one object per line).
    log_format: str = "text"
    #: SHA-256 (hex) of version 1 of a signed key registry, pinned; None: not pinned.
    key_registry_root: str | None = None


def _storage_settings(section: ConfigSection, party_id: str) -> StorageSettings:
    """The ``storage`` section: each engine reads its own keys, and refuses the other's."""
    engine = section.string("engine", "sqlite")
    if engine not in _ENGINES:
        raise section.error("engine", " or ".join(_ENGINES), engine)
    if engine == "sqlite":
        synchronous = section.string("synchronous", "NORMAL").upper()
        if synchronous not in _SYNCHRONOUS:
            raise section.error("synchronous", "|".join(_SYNCHRONOUS), synchronous)
        settings = StorageSettings(
            engine=engine,
            path=section.path("path", f"{party_id}.sqlite"),
            synchronous=synchronous,
        )
    else:
        dsn = section.string("dsn")
        if "password" in _conninfo(section, dsn):
            raise section.error(
                "dsn",
                "a connection string without a password (give password_env or password_file)",
                "a password in the connection string",
            )
        settings = StorageSettings(
            engine=engine,
            path=None,
            dsn=dsn,
            password=_password(section),
            pool_size=section.integer("pool_size", 4, minimum=2, maximum=100),
        )
    section.finish()
    return settings


def _conninfo(section: ConfigSection, dsn: str) -> Mapping[str, object]:
    try:
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415  # [postgresql] extra
    except ImportError:
        raise section.error(
            "engine",
            "an installed engine (pip install 'collateral-sync[postgresql]')",
            "postgresql",
        ) from None
    try:
        return conninfo_to_dict(dsn)
    except Exception as err:  # noqa: BLE001  # psycopg's ProgrammingError names the problem
        raise section.error("dsn", "a libpq connection string or URI", str(err)) from None


def _password(section: ConfigSection) -> str | None:
    """The database password, from the environment or a file: never from the config itself."""
    return _secret(section, "password", "a password")


def _secret(section: ConfigSection, name: str, what: str) -> str | None:
    """``<name>_env`` (a variable's name) or ``<name>_file`` (a file holding it), or None."""
    env_key, file_key = f"{name}_env", f"{name}_file"
    if env_key in section and file_key in section:
        raise section.error(file_key, f"either {env_key} or {file_key}", "both")
    if env_key in section:
        variable = section.string(env_key)
        value = os.environ.get(variable)
        if not value:
            raise section.error(env_key, f"the environment variable {variable} set", "unset")
        return value
    if file_key in section:
        path = section.path(file_key)
        try:
            text = path.read_text("utf-8")
        except OSError as err:
            raise section.error(
                file_key, f"a readable file {path}", err.strerror or str(err)
            ) from None
        value = text.rstrip("\r\n")
        if not value:
            raise section.error(file_key, f"{what} in {path}", "an empty file")
        return value
    return None


def _signing_key(top: ConfigSection, value: object) -> Path | Pkcs11KeySettings:
    """``signing_key``: a key file's path, or ``{"pkcs11": {...}}`` for a key on a token."""
    if isinstance(value, list | int | float | bool):
        raise top.error("signing_key", 'a key file path, or {"pkcs11": {...}}', value)
    if not isinstance(value, dict):
        return top.path("signing_key")
    outer = top.section("signing_key")
    section = outer.section("pkcs11", required=True)
    outer.finish()
    if importlib.util.find_spec("pkcs11") is None:
        raise outer.error(
            "pkcs11",
            "an installed python-pkcs11 (pip install 'collateral-sync[pkcs11]')",
            "python-pkcs11 is not installed",
        )
    if "pin" in section:
        raise section.error(
            "pin", "pin_env or pin_file (the PIN never goes in the config)", "the PIN itself"
        )
    module = section.path("module")
    token = section.string("token")
    label = section.string("label")
    pin = _secret(section, "pin", "a PIN")
    if pin is None:
        raise section.error(
            "pin_env", "pin_env or pin_file: where the token's user PIN is", "neither"
        )
    section.finish()
    return Pkcs11KeySettings(module=module, token=token, label=label, pin=pin)


def load_config(
    path: str | os.PathLike[str], *, role: str | None = None, default_port: int = 0
) -> ServerConfig:
    """Read and check a server configuration file (see the module docstring).

    ``role``, when given, is the role the server was started as; a file for
    another role is refused before anything else is read.
    """
    file = Path(path).resolve()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise MalformedError(
            f"config {file}: no such file",
            metadata={"expected": "a readable file", "actual": "missing"},
        ) from err
    except IsADirectoryError as err:
        raise MalformedError(
            f"config {file}: is a directory; --config wants the server's JSON configuration file",
            metadata={"expected": "a readable file", "actual": "a directory"},
        ) from err
    except UnicodeDecodeError as err:
        raise MalformedError(
            f"config {file}: not UTF-8 text (byte {err.start}); expected a JSON object",
            metadata={"expected": "a readable UTF-8 file", "actual": type(err).__name__},
        ) from err
    except OSError as err:
        raise MalformedError(
            f"config {file}: cannot read it ({err.strerror or err})",
            metadata={"expected": "a readable UTF-8 file", "actual": type(err).__name__},
        ) from err
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedError(
            f"config {file}: not JSON ({err.msg} at line {err.lineno} column {err.colno})",
            metadata={"expected": "a JSON object", "actual": "invalid JSON"},
        ) from err
    top = ConfigSection(document if isinstance(document, dict) else {}, file=file)
    if not isinstance(document, dict):
        raise top.error(None, "a JSON object", type(document).__name__)

    party_id = top.string("party_id")
    configured_role = top.string("role")
    if role is not None and configured_role != role:
        raise top.error(
            "role", f"{role!r} (the server was started as {role})", f"role is {configured_role!r}"
        )
    role = configured_role
    listen = top.string("listen", f"{DEFAULT_LISTEN_HOST}:{default_port}")
    try:
        check_address(listen)
    except ValueError:
        raise top.error("listen", "host:port", listen) from None

    storage = _storage_settings(top.section("storage"), party_id)

    tls: TlsFiles | None = None
    if "tls" in top:
        tls_section = top.section("tls")
        tls = TlsFiles(
            ca=tls_section.path("ca"), cert=tls_section.path("cert"), key=tls_section.path("key")
        )
        tls_section.finish()

    peers: dict[str, str | None] = {}
    for peer, address in top.entries("peers"):
        if address is not None:
            if not isinstance(address, str):
                raise top.error(f"peers.{peer}", "host:port or null", address)
            try:
                check_address(address)
            except ValueError:
                raise top.error(f"peers.{peer}", "host:port or null", address) from None
        if peer == party_id:
            raise top.error(f"peers.{peer}", "another party than this server's", peer)
        peers[peer] = address

    sync_section = top.section("sync")
    sync = SyncSettings(
        window=sync_section.integer("window", 8000, minimum=1, maximum=2**32 - 1),
        batch_size=sync_section.integer(
            "batch_size", DEFAULT_BATCH_SIZE, minimum=1, maximum=100_000
        ),
        heartbeat_interval=timedelta(
            milliseconds=sync_section.integer(
                "heartbeat_interval_ms", 5000, minimum=1, maximum=2**32 - 1
            )
        ),
    )
    sync_section.finish()

    max_skew = timedelta(seconds=top.integer("max_skew_seconds", 30, minimum=0, maximum=300))
    config = ServerConfig(
        file=file,
        party_id=party_id,
        role=role,
        listen=listen,
        storage=storage,
        signing_key=_signing_key(top, document.get("signing_key")),
        key_registry=top.path("key_registry"),
        key_registry_root=_registry_root(top),
        tls=tls,
        peers=peers,
        max_skew=max_skew,
        sync=sync,
        role_settings=top.section(role),
        metrics=_metrics_settings(top),
        tracing=_tracing_settings(top),
        log_format=_log_format(top),
    )
    top.finish()
    return config


def _registry_root(top: ConfigSection) -> str | None:
    """``key_registry_root``: the SHA-256 of a signed registry's version 1, 64 hex digits."""
    if "key_registry_root" not in top:
        return None
    root = top.string("key_registry_root")
    if not re.fullmatch(r"[0-9a-f]{64}", root):
        raise top.error("key_registry_root", "64 lowercase hex digits (a SHA-256)", root)
    return root


def _metrics_settings(top: ConfigSection) -> MetricsSettings | None:
    """The optional ``metrics`` section: ``{"listen": "host:port"}``, or None when absent."""
    if "metrics" not in top:
        return None
    section = top.section("metrics")
    listen = section.string("listen")
    try:
        check_address(listen)
    except ValueError:
        raise section.error("listen", "host:port (e.g. 127.0.0.1:9464)", listen) from None
    section.finish()
    return MetricsSettings(listen=listen)


def _tracing_settings(top: ConfigSection) -> TracingSettings | None:
    """The optional ``tracing`` section, or None when absent (no spans)."""
    if "tracing" not in top:
        return None
    section = top.section("tracing")
    exporter = section.string("exporter")
    if exporter not in _EXPORTERS:
        raise section.error("exporter", " or ".join(_EXPORTERS), exporter)
    endpoint: str | None = None
    if "endpoint" in section:
        if exporter != "otlp":
            raise section.error("endpoint", "no endpoint with the console exporter", "an endpoint")
        endpoint = section.string("endpoint")
    service_name = section.string("service_name") if "service_name" in section else None
    section.finish()
    missing = [
        name
        for name in ("opentelemetry.sdk", "opentelemetry.instrumentation.grpc")
        if not _installed(name)
    ]
    if missing:
        raise top.error(
            "tracing",
            "an installed OpenTelemetry SDK (pip install 'collateral-sync[tracing]')",
            f"{missing[0]} is not installed",
        )
    return TracingSettings(exporter=exporter, endpoint=endpoint, service_name=service_name)


def _log_format(top: ConfigSection) -> str:
    """``logging.format``: ``text`` (the default) or ``json``."""
    section = top.section("logging")
    log_format = section.string("format", "text")
    if log_format not in _LOG_FORMATS:
        raise section.error("format", " or ".join(_LOG_FORMATS), log_format)
    section.finish()
    return log_format


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
