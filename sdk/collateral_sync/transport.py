"""gRPC transport between parties: mutual TLS, channel options, retry policy.

Every connection between custodian, exchange and regulator is mutual TLS: the
server requires a client certificate from the shared CA, and the subject CN of
each side's certificate is its party id (see :mod:`collateral_sync.dev_ca`).
A plaintext channel exists only for tests and is named so.

Channels carry one service config. Its retry policy covers *only* idempotent
RPCs — every unary ``Get*``/``List*`` method found in the generated service
descriptors — and retries them on ``UNAVAILABLE`` with bounded attempts and
backoff. Everything else (``Submit*``, ``Pledge*``, ``Respond*``,
``Execute*``, ``CoSign*``, ``RequestRedemption``, the ``SyncPositions``
stream) is never retried by the channel: a second delivery of a signed
statement must be a deliberate decision of the caller (and the receiver then
answers REPLAYED). gRPC's *transparent* retry still applies to all RPCs, which
is safe: it only resends calls that never reached the server application.

Certificates can be rotated without a restart: :class:`ReloadableTls` reads a
party's three PEM files again when they change (and keeps what it had if the
new files are half-written or inconsistent). Server credentials made from it
give every new TLS handshake the current certificate and trust bundle; a
channel made from it dials with the current client certificate on every new
connection (grpc itself fixes a channel's certificate when the channel is
made, so a new channel is made per version; see :mod:`collateral_sync._reloading_channel`).
A client certificate out of its validity dates is refused here, before any
connection, with an error naming it, rather than by the server's handshake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from collateral_sync._reloading_channel import ReloadingChannel
from collateral_sync.dev_ca import (
    DevPki,
    certificate_common_name,
    load_certificate_chain_pem,
    load_private_key_pem,
)
from collateral_sync.errors import CollateralSyncError, MalformedError, VerificationError
from collateral_sync.v1 import (
    custodian_service_pb2,
    emergency_release_service_pb2,
    errors_pb2,
    exchange_service_pb2,
    reconciliation_service_pb2,
    regulator_service_pb2,
    test_control_pb2,
)

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "MAX_MESSAGE_BYTES",
    "SERVICE_MODULES",
    "ChannelOption",
    "HeldStderr",
    "ReloadableTls",
    "RetryPolicy",
    "TlsConfig",
    "certificate_validity_problem",
    "channel_credentials",
    "channel_options",
    "check_client_certificate",
    "check_peer_party",
    "describe_certificate",
    "grpc_core_log_held",
    "idempotent_methods",
    "peer_party_id",
    "plaintext_channel_for_testing",
    "secure_channel",
    "server_credentials",
    "server_options",
    "service_config_json",
]

#: Largest message either side sends or accepts; the same on clients and servers.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

#: The generated modules whose services this SDK speaks (source of the retry policy
#: and of the services a server can add). TestControlService is among them: only
#: test-mode servers serve it, but those must announce it like any other service.
SERVICE_MODULES: tuple[ModuleType, ...] = (
    custodian_service_pb2,
    emergency_release_service_pb2,
    exchange_service_pb2,
    reconciliation_service_pb2,
    regulator_service_pb2,
    test_control_pb2,
)

ChannelOption = tuple[str, str | int]

_IDEMPOTENT_PREFIXES = ("Get", "List")

# Client pings every 20 s on an open call and gives the peer 10 s to answer, so
# a silently dead counterparty on the long-lived SyncPositions stream is noticed
# within ~30 s instead of at the next write. Pings keep going on a quiet stream
# (max_pings_without_data=0); servers accept pings every 10 s (server_options),
# below the client's interval, so they never answer with GOAWAY too_many_pings.
_CLIENT_KEEPALIVE: tuple[ChannelOption, ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
)
_SERVER_KEEPALIVE: tuple[ChannelOption, ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry of idempotent RPCs on UNAVAILABLE (gRPC service-config semantics).

    ``max_attempts`` counts the first attempt; gRPC caps it at 5. Backoff before
    attempt n is random in [0, min(initial * multiplier**(n-2), max)).
    """

    max_attempts: int = 4
    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"expected 2 <= max_attempts <= 5, got {self.max_attempts}")
        for name in ("initial_backoff_seconds", "max_backoff_seconds", "backoff_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"expected {name} > 0 and finite, got {value}")
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError(
                f"expected max_backoff_seconds >= {self.initial_backoff_seconds}, "
                f"got {self.max_backoff_seconds}"
            )


DEFAULT_RETRY_POLICY = RetryPolicy()


def idempotent_methods() -> tuple[tuple[str, str], ...]:
    """(full service name, method name) of every RPC the channel may retry.

    Unary methods whose name starts with ``Get`` or ``List``: reads that change
    no state, so a retry cannot apply anything twice. Derived from the
    descriptors so that a new read RPC is covered without touching this module.
    """
    found: list[tuple[str, str]] = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.client_streaming or method.server_streaming:
                    continue
                if method.name.startswith(_IDEMPOTENT_PREFIXES):
                    found.append((service.full_name, method.name))
    return tuple(sorted(found))


def service_config_json(retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY) -> str:
    """The gRPC service config (JSON) every channel of this SDK carries."""
    names = [{"service": s, "method": m} for s, m in idempotent_methods()]
    config = {
        "methodConfig": [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": retry_policy.max_attempts,
                    "initialBackoff": _duration(retry_policy.initial_backoff_seconds),
                    "maxBackoff": _duration(retry_policy.max_backoff_seconds),
                    "backoffMultiplier": retry_policy.backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # Stops retrying when most recent calls failed, so a down server is
        # not hit with max_attempts times the load.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    return json.dumps(config, separators=(",", ":"), sort_keys=True)


def channel_options(
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    server_name_override: str | None = None,
    extra: Sequence[ChannelOption] = (),
) -> list[ChannelOption]:
    """Channel arguments for a client channel; ``extra`` entries replace defaults."""
    _check_message_bytes(max_message_bytes)
    options: dict[str, str | int] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.enable_retries": 1,
        "grpc.service_config": service_config_json(retry_policy),
        **dict(_CLIENT_KEEPALIVE),
    }
    if server_name_override is not None:
        options["grpc.ssl_target_name_override"] = server_name_override
    options.update(dict(extra))
    return list(options.items())


def server_options(
    *, max_message_bytes: int = MAX_MESSAGE_BYTES, extra: Sequence[ChannelOption] = ()
) -> list[ChannelOption]:
    """Server arguments matching :func:`channel_options`; ``extra`` replaces defaults."""
    _check_message_bytes(max_message_bytes)
    options: dict[str, str | int] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        # Without this a second server can bind the same port and silently
        # take half of the connections.
        "grpc.so_reuseport": 0,
        **dict(_SERVER_KEEPALIVE),
    }
    options.update(dict(extra))
    return list(options.items())


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """One party's TLS material, as PEM bytes.

    ``ca_cert`` is the trust anchor for the counterparty; ``cert_chain`` is this
    party's certificate (leaf first), ``private_key`` its key. Checked on
    construction so that a wrong file fails here with a clear error rather
    than inside the TLS handshake. ``cert_file``, when known, is where
    ``cert_chain`` was read from; errors name it.
    """

    ca_cert: bytes
    cert_chain: bytes
    private_key: bytes
    cert_file: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        load_certificate_chain_pem(self.ca_cert)
        leaf = load_certificate_chain_pem(self.cert_chain)[0]
        key = load_private_key_pem(self.private_key)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            raise MalformedError(
                "expected the private key of the leaf certificate, got a different key",
                metadata={
                    "expected": f"key of {leaf.subject.rfc4514_string()}",
                    "actual": "another key",
                },
            )

    @classmethod
    def from_files(
        cls,
        ca_cert: str | os.PathLike[str],
        cert_chain: str | os.PathLike[str],
        private_key: str | os.PathLike[str],
    ) -> TlsConfig:
        """Read the three PEM files."""
        return cls(
            _read(ca_cert), _read(cert_chain), _read(private_key), cert_file=os.fspath(cert_chain)
        )

    @classmethod
    def from_dev_pki(cls, pki: DevPki, party_id: str) -> TlsConfig:
        """The material of ``party_id`` in a development PKI."""
        files = pki.party(party_id)
        return cls.from_files(pki.ca_cert, files.cert, files.key)

    @property
    def party_id(self) -> str:
        """Subject CN of this party's certificate."""
        return certificate_common_name(load_certificate_chain_pem(self.cert_chain)[0])


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def describe_certificate(cert: x509.Certificate) -> str:
    """Subject, serial and notAfter of ``cert``, as log lines and errors show it."""
    return (
        f"{cert.subject.rfc4514_string()}, serial {cert.serial_number:x}, "
        f"notAfter {_utc(cert.not_valid_after_utc)}"
    )


def certificate_validity_problem(cert: x509.Certificate, now: datetime) -> str | None:
    """What is wrong with ``cert``'s dates at ``now``, or None when it is valid.

    "expired at <notAfter> (notAfter; now <now>)", or "is not valid before
    <notBefore> (notBefore; now <now>)".
    """
    if now >= cert.not_valid_after_utc:
        return f"expired at {_utc(cert.not_valid_after_utc)} (notAfter; now {_utc(now)})"
    if now < cert.not_valid_before_utc:
        return f"is not valid before {_utc(cert.not_valid_before_utc)} (notBefore; now {_utc(now)})"
    return None


def check_client_certificate(tls: TlsConfig, *, now: datetime | None = None) -> None:
    """Refuse a client certificate that any server would refuse for its dates.

    Every certificate of ``tls.cert_chain`` must be valid at ``now`` (default:
    the system clock). A server refuses an expired certificate inside the TLS
    handshake, and all the client then sees is UNAVAILABLE "Socket closed";
    this says which file and when, without a connection. VerificationError
    with reason KEY_NOT_VALID.
    """
    moment = datetime.now(UTC) if now is None else now
    chain = load_certificate_chain_pem(tls.cert_chain)
    for position, cert in enumerate(chain):
        problem = certificate_validity_problem(cert, moment)
        if problem is None:
            continue
        where = tls.cert_file or "in cert_chain"
        which = (
            "client certificate" if position == 0 else f"certificate {position + 1} of the chain"
        )
        name = cert.subject.rfc4514_string()
        fix = (
            "check this machine's clock, or wait"
            if moment < cert.not_valid_before_utc
            else "renew it (development: collateral-sync dev-certs --force)"
        )
        raise VerificationError(
            f"{which} {where} ({name}) {problem}: a server would refuse the TLS handshake; {fix}",
            reason=errors_pb2.ERROR_REASON_KEY_NOT_VALID,
            metadata={
                "field": "cert_chain",
                "expected": "a certificate valid now",
                "actual": problem,
            },
        )


#: What tells that a file changed without reading it: device, inode (a file
#: renamed into place is another inode), size, modification and change times.
_Stamp = tuple[int, int, int, int, int]

_LOGGER = logging.getLogger(__name__)


class ReloadableTls:
    """One party's TLS material in three PEM files, read again when they change.

    :meth:`current` looks at the three files (``os.stat``); when one changed
    (another inode, size or time: a file renamed into place counts), all three are read
    again. The new material replaces the old only if it is whole and
    consistent: every PEM block complete (a half-written file is not), each
    file parses, the key is that of the certificate, and ``accept`` (e.g. the
    certificate's party and dates) raises no CollateralSyncError. Otherwise the
    old material stays and one warning is logged per unusable version of the
    files; the files are read again at the next call until they are usable.

    ``initial``, when given, is taken as the material read from the files (the
    caller checked it); the first :meth:`current` reads them again and keeps
    it if nothing changed. ``on_change`` is called with each new material,
    possibly from a grpc thread. Thread-safe: grpc asks for a server's material
    from its own threads before each TLS handshake.
    """

    def __init__(
        self,
        ca_cert: str | os.PathLike[str],
        cert_chain: str | os.PathLike[str],
        private_key: str | os.PathLike[str],
        *,
        accept: Callable[[TlsConfig], None] | None = None,
        on_change: Callable[[TlsConfig], None] | None = None,
        initial: TlsConfig | None = None,
    ) -> None:
        self.ca_cert = Path(ca_cert)
        self.cert_chain = Path(cert_chain)
        self.private_key = Path(private_key)
        self._accept = accept
        self._on_change = on_change
        self._lock = threading.Lock()
        self._refused: bytes | None = None
        self._stamps: tuple[_Stamp, ...] | None
        if initial is None:
            self._stamps = self._stat()
            contents = self._read()
            self._current = self._material(contents)
        else:
            # Read again at the first call: the files may have changed since.
            self._stamps = None
            contents = (initial.ca_cert, initial.cert_chain, initial.private_key)
            self._current = initial
        self._digest = _digest(contents)

    def current(self) -> TlsConfig:
        """The material to use now: the files as last read successfully."""
        with self._lock:
            previous = self._current
            try:
                stamps = self._stat()
                if stamps == self._stamps:
                    return previous
                contents = self._read()
            except OSError as err:
                self._refuse(
                    f"cannot read {err.filename}: {err.strerror or err}", str(err).encode()
                )
                return previous
            digest = _digest(contents)
            if digest == self._digest:
                self._stamps, self._refused = stamps, None
                return previous
            try:
                material = self._material(contents)
            except CollateralSyncError as err:
                self._refuse(err.message, digest)
                return previous
            self._current, self._digest, self._stamps = material, digest, stamps
            self._refused = None
        leaf = load_certificate_chain_pem(material.cert_chain)[0]
        cas = len(load_certificate_chain_pem(material.ca_cert))
        _LOGGER.info(
            "TLS files reloaded: certificate %s (%s), trust bundle %s (%d certificate%s)",
            self.cert_chain,
            describe_certificate(leaf),
            self.ca_cert,
            cas,
            "" if cas == 1 else "s",
        )
        if self._on_change is not None:
            self._on_change(material)
        return material

    def _stat(self) -> tuple[_Stamp, ...]:
        stamps = []
        for path in (self.ca_cert, self.cert_chain, self.private_key):
            st = os.stat(path)
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return _read(self.ca_cert), _read(self.cert_chain), _read(self.private_key)

    def _material(self, contents: tuple[bytes, bytes, bytes]) -> TlsConfig:
        ca, cert, key = contents
        for path, data, parse in (
            (self.ca_cert, ca, load_certificate_chain_pem),
            (self.cert_chain, cert, load_certificate_chain_pem),
            (self.private_key, key, load_private_key_pem),
        ):
            begins, ends = data.count(b"-----BEGIN "), data.count(b"-----END ")
            if begins != ends:
                raise MalformedError(
                    f"{path}: {begins} PEM BEGIN line(s) but {ends} END line(s): "
                    "the file is half-written or cut short",
                    metadata={"expected": f"{begins} END lines", "actual": str(ends)},
                )
            try:
                parse(data)
            except MalformedError as err:
                raise MalformedError(f"{path}: {err.message}", metadata=err.metadata) from err
        try:
            material = TlsConfig(ca, cert, key, cert_file=str(self.cert_chain))
        except MalformedError as err:
            raise MalformedError(
                f"{self.private_key} is not the private key of the certificate {self.cert_chain}",
                metadata=err.metadata,
            ) from err
        if self._accept is not None:
            self._accept(material)
        return material

    def _refuse(self, reason: str, version: bytes) -> None:
        # Once per unusable version: a file being written is read again at every call.
        if version == self._refused:
            return
        self._refused = version
        leaf = load_certificate_chain_pem(self._current.cert_chain)[0]
        _LOGGER.warning(
            "TLS files changed but cannot be used, so the previous ones stay in use "
            "(certificate %s): %s. Write new files under a temporary name and rename "
            "them into place.",
            describe_certificate(leaf),
            reason,
        )


def _digest(contents: tuple[bytes, bytes, bytes]) -> bytes:
    digest = hashlib.sha256()
    for data in contents:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


class _UsableMaterial:
    """A reloading channel's material, refused while its certificate is out of its dates."""

    def __init__(self, tls: ReloadableTls) -> None:
        self._tls = tls
        self._checked: TlsConfig | None = None
        self._window = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))

    def __call__(self) -> TlsConfig:
        material = self._tls.current()
        if material is not self._checked:
            chain = load_certificate_chain_pem(material.cert_chain)
            self._window = (
                max(cert.not_valid_before_utc for cert in chain),
                min(cert.not_valid_after_utc for cert in chain),
            )
            self._checked = material
        now = datetime.now(UTC)
        if not self._window[0] <= now < self._window[1]:
            check_client_certificate(material, now=now)
        return material


def _certificate_configuration(tls: TlsConfig) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.private_key, tls.cert_chain)], root_certificates=tls.ca_cert
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Client credentials: trust ``tls.ca_cert``, present our certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_cert,
        private_key=tls.private_key,
        certificate_chain=tls.cert_chain,
    )


def server_credentials(tls: TlsConfig | ReloadableTls) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate from ``tls.ca_cert``.

    From :class:`ReloadableTls`, every new connection's TLS handshake uses the
    certificate, key and trust bundle of that moment (grpc asks before each
    handshake): replaced files take effect without a restart, and connections
    already open keep what they were opened with.
    """
    if isinstance(tls, TlsConfig):
        return grpc.ssl_server_credentials(
            [(tls.private_key, tls.cert_chain)],
            root_certificates=tls.ca_cert,
            require_client_auth=True,
        )
    served = tls.current()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # None keeps grpc's configuration; a new one is built only on a change.
        nonlocal served
        material = tls.current()
        if material is served:
            return None
        served = material
        return _certificate_configuration(material)

    return grpc.dynamic_ssl_server_credentials(
        _certificate_configuration(served), fetch, require_client_authentication=True
    )


def secure_channel(
    target: str,
    tls: TlsConfig | ReloadableTls,
    *,
    server_name_override: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    options: Sequence[ChannelOption] = (),
) -> grpc.aio.Channel:
    """A mutual-TLS channel to ``target`` (``host:port``).

    ``server_name_override`` names the certificate SAN to check when ``target``
    is an address that is not in it (e.g. dialling an IP of a host whose
    certificate names only its DNS name).

    A client certificate out of its dates is refused here
    (:func:`check_client_certificate`). From :class:`ReloadableTls`, the
    channel also checks before each call, and calls made after the files
    changed go over new connections presenting the new certificate; calls
    already running keep theirs.
    """
    arguments = channel_options(
        max_message_bytes=max_message_bytes,
        retry_policy=retry_policy,
        server_name_override=server_name_override,
        extra=options,
    )

    def dial(material: TlsConfig) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, channel_credentials(material), options=arguments)

    if isinstance(tls, TlsConfig):
        check_client_certificate(tls)
        return dial(tls)
    return ReloadingChannel(_UsableMaterial(tls), dial)


def plaintext_channel_for_testing(
    target: str,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    options: Sequence[ChannelOption] = (),
) -> grpc.aio.Channel:
    """An unencrypted, unauthenticated channel. Tests only: parties use mutual TLS."""
    return grpc.aio.insecure_channel(
        target,
        options=channel_options(
            max_message_bytes=max_message_bytes, retry_policy=retry_policy, extra=options
        ),
    )


def peer_party_id(context: grpc.aio.ServicerContext) -> str | None:
    """Party id (certificate subject CN) of the peer of a server call.

    None when the call did not arrive over mutual TLS with a certificate that
    has exactly one CN.
    """
    names = context.auth_context().get("x509_common_name", ())
    if len(names) != 1:
        return None
    name: bytes = names[0]
    return name.decode("utf-8", errors="replace")


def check_peer_party(context: grpc.aio.ServicerContext, expected_party_id: str) -> str:
    """Require the TLS peer to be ``expected_party_id`` (e.g. a statement's issuer).

    A party may only present statements it issued over its own connection; a
    mismatch is reported as KEY_ROLE_MISMATCH (PERMISSION_DENIED): the signing
    key belongs to another party than the one on the wire.
    """
    actual = peer_party_id(context)
    if actual != expected_party_id:
        raise VerificationError(
            f"expected TLS peer {expected_party_id!r}, got {actual or 'no client certificate'!r}",
            reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": expected_party_id, "actual": actual or ""},
        )
    return expected_party_id


def _read(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _duration(seconds: float) -> str:
    # Service-config durations are protobuf JSON Durations: decimal seconds + "s".
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _check_message_bytes(value: int) -> None:
    if not 1024 <= value <= 2**31 - 1:
        raise ValueError(f"expected 1024 <= max_message_bytes <= 2**31-1, got {value}")


#: The start of a gRPC core log line: severity, date, time, thread, file:line].
_CORE_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\s\]]+:\d+\]")


@dataclass(slots=True)
class HeldStderr:
    """What :func:`grpc_core_log_held` yields: a way to speak now, and a choice for later."""

    #: Drop gRPC core's own log lines from what was held (the caller reports the
    #: problem itself); everything else is written out again either way.
    drop_core_log: bool = False
    _fd: int | None = None

    def say(self, text: str) -> None:
        """Write one line to the real stderr at once, while the rest is held."""
        if self._fd is None:
            print(text, file=sys.stderr, flush=True)
            return
        sys.stderr.flush()
        os.write(self._fd, f"{text}\n".encode())


@contextlib.contextmanager
def grpc_core_log_held() -> Iterator[HeldStderr]:
    """Hold back what is written to file descriptor 2 meanwhile, where gRPC core logs.

    gRPC core's log (a failed bind, a failed TLS handshake) cannot be silenced
    once grpc is imported, and a CLI that explains the failure in one line of
    its own should not print core's line first. On leaving, the held output is
    written out again, less core's lines if ``drop_core_log`` was set.
    """
    held = HeldStderr()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to hold back
        yield held
        return
    try:
        on_fd_2 = sys.stderr.fileno() == 2
    except (OSError, ValueError, AttributeError):  # replaced, e.g. by a test's capture
        on_fd_2 = False
    held._fd = saved if on_fd_2 else None
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held._fd = None
            buffer.seek(0)
            text = buffer.read().decode(errors="replace")
            if held.drop_core_log:
                lines = text.splitlines(keepends=True)
                text = "".join(line for line in lines if not _CORE_LOG.search(line))
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
