"""One exception hierarchy for the SDK, and its one mapping to gRPC status.

Every failure the SDK reports is a :class:`CollateralSyncError` carrying an
:class:`~collateral_sync.v1.errors_pb2.ErrorReason`. The reason decides the
gRPC status code through one table (:data:`STATUS_BY_REASON`), so a server
that raises an error and a client that receives it agree on both.

On the wire an error is a ``google.rpc.Status`` whose details hold a
``google.rpc.ErrorInfo`` (domain :data:`ERROR_DOMAIN`, reason without the
``ERROR_REASON_`` prefix, string metadata such as ``expected``/``actual``)
and, for field-level problems, a ``google.rpc.BadRequest``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from collateral_sync.v1 import errors_pb2

if TYPE_CHECKING:
    from collateral_sync.sql import SqlConnection

__all__ = [
    "ERROR_DOMAIN",
    "STATUS_BY_REASON",
    "CollateralSyncError",
    "MalformedError",
    "ProofError",
    "RPCError",
    "SignerError",
    "StateError",
    "StorageError",
    "VerificationError",
    "error_from_rpc_error",
    "error_from_status",
    "error_to_status",
    "reason_name",
    "sqlite_refusal",
    "sqlite_refusals",
    "to_grpc_status",
]

ERROR_DOMAIN = "collateral-sync.v1"

_R = errors_pb2.ErrorReason
_C = grpc.StatusCode

#: The one table from reason to gRPC status code.
STATUS_BY_REASON: Mapping[int, grpc.StatusCode] = {
    _R.ERROR_REASON_UNSPECIFIED: _C.UNKNOWN,
    _R.ERROR_REASON_MALFORMED: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_INVALID_AMOUNT: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_PAYLOAD_TYPE_MISMATCH: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_TOO_LARGE: _C.RESOURCE_EXHAUSTED,
    _R.ERROR_REASON_SIGNATURE_INVALID: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_KEY_UNKNOWN: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_KEY_REVOKED: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_KEY_NOT_VALID: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_KEY_ROLE_MISMATCH: _C.PERMISSION_DENIED,
    _R.ERROR_REASON_AUDIENCE_MISMATCH: _C.PERMISSION_DENIED,
    _R.ERROR_REASON_THRESHOLD_NOT_MET: _C.PERMISSION_DENIED,
    _R.ERROR_REASON_STATEMENT_EXPIRED: _C.FAILED_PRECONDITION,
    _R.ERROR_REASON_STATEMENT_NOT_YET_VALID: _C.FAILED_PRECONDITION,
    _R.ERROR_REASON_REPLAYED: _C.ALREADY_EXISTS,
    _R.ERROR_REASON_EQUIVOCATION: _C.ABORTED,
    _R.ERROR_REASON_SEQUENCE_GAP: _C.OUT_OF_RANGE,
    _R.ERROR_REASON_PROOF_INVALID: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_CHECKPOINT_INCONSISTENT: _C.FAILED_PRECONDITION,
    _R.ERROR_REASON_OUT_OF_RANGE: _C.OUT_OF_RANGE,
    _R.ERROR_REASON_NOT_FOUND: _C.NOT_FOUND,
    _R.ERROR_REASON_STATE_CONFLICT: _C.FAILED_PRECONDITION,
    _R.ERROR_REASON_LIMIT_EXCEEDED: _C.RESOURCE_EXHAUSTED,
    _R.ERROR_REASON_PATH_NOT_AUTHORISED: _C.PERMISSION_DENIED,
    _R.ERROR_REASON_STORAGE_FULL: _C.RESOURCE_EXHAUSTED,
    _R.ERROR_REASON_STORAGE_UNAVAILABLE: _C.UNAVAILABLE,
    _R.ERROR_REASON_SIGNER_UNAVAILABLE: _C.UNAVAILABLE,
}

_PREFIX = "ERROR_REASON_"


def reason_name(reason: int) -> str:
    """Wire name of a reason: the enum value name without ``ERROR_REASON_``."""
    return errors_pb2.ErrorReason.Name(reason).removeprefix(_PREFIX)  # type: ignore[arg-type]


class CollateralSyncError(Exception):
    """Root of every error the SDK raises.

    ``reason`` is an ``ErrorReason`` value; ``code`` follows from it.
    ``metadata`` holds short string facts (``expected``, ``actual``, ``field``…)
    that travel in ``google.rpc.ErrorInfo.metadata``. ``field_violations``
    maps a request field path to what is wrong with it (``google.rpc.BadRequest``).
    """

    default_reason: int = _R.ERROR_REASON_UNSPECIFIED

    def __init__(
        self,
        message: str,
        *,
        reason: int | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason: int = self.default_reason if reason is None else reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: dict[str, str] = dict(field_violations or {})

    @property
    def code(self) -> grpc.StatusCode:
        return STATUS_BY_REASON.get(self.reason, grpc.StatusCode.UNKNOWN)

    @property
    def reason_name(self) -> str:
        return reason_name(self.reason)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason_name}: {self.message!r})"


class MalformedError(CollateralSyncError):
    """Bytes or fields that do not form a valid message (INVALID_ARGUMENT)."""

    default_reason = _R.ERROR_REASON_MALFORMED


class VerificationError(CollateralSyncError):
    """A signature, key, audience, freshness, sequence or threshold check failed."""

    default_reason = _R.ERROR_REASON_SIGNATURE_INVALID


class ProofError(VerificationError):
    """A Merkle inclusion or consistency proof, or a checkpoint, did not verify."""

    default_reason = _R.ERROR_REASON_PROOF_INVALID


class StateError(CollateralSyncError):
    """The operation does not fit the current state (unknown id, conflict, limit)."""

    default_reason = _R.ERROR_REASON_STATE_CONFLICT


class StorageError(CollateralSyncError):
    """Our own storage refused a write (full, read-only, failing); nothing was written."""

    default_reason = _R.ERROR_REASON_STORAGE_UNAVAILABLE


class SignerError(CollateralSyncError):
    """A signing key could not be used: its PKCS#11 module, token, PIN or key; nothing was signed.

    At start a server reports it as a configuration error; while serving, the
    request that needed a signature is refused UNAVAILABLE and writes nothing.
    """

    default_reason = _R.ERROR_REASON_SIGNER_UNAVAILABLE


# SQLite primary result codes (the low byte of an extended code) a caller can do nothing
# about but wait: https://www.sqlite.org/rescode.html
_SQLITE_FULL = 13
_SQLITE_UNAVAILABLE = {
    5: "SQLITE_BUSY",
    6: "SQLITE_LOCKED",
    8: "SQLITE_READONLY",
    10: "SQLITE_IOERR",
    14: "SQLITE_CANTOPEN",
}


def sqlite_refusal(err: sqlite3.Error) -> StorageError | None:
    """What a SQLite error means to the caller of the write it broke, if not a bug.

    A full disk is STORAGE_FULL (RESOURCE_EXHAUSTED); a database that cannot
    be written now (read-only, locked, an I/O error) is STORAGE_UNAVAILABLE
    (UNAVAILABLE). Anything else is a bug, left to surface as INTERNAL.
    The caller must have rolled the transaction back: the error promises that
    nothing was written.
    """
    code = getattr(err, "sqlite_errorcode", None)
    if code is None:
        return None
    primary = code & 0xFF
    name = getattr(err, "sqlite_errorname", str(code))
    if primary == _SQLITE_FULL:
        return StorageError(
            "storage is full: nothing was written",
            reason=_R.ERROR_REASON_STORAGE_FULL,
            metadata={"expected": "room to write", "actual": name},
        )
    if primary in _SQLITE_UNAVAILABLE:
        return StorageError(
            f"storage cannot be written now ({name}): nothing was written; retry later",
            metadata={"expected": "writable storage", "actual": name},
        )
    return None


@contextmanager
def sqlite_refusals(connection: SqlConnection) -> Iterator[None]:
    """Around a write transaction: on any error roll back, and raise :func:`sqlite_refusal`'s error.

    ``with sqlite_refusals(conn): conn.execute("BEGIN IMMEDIATE"); ...; conn.commit()``
    — a failed commit is rolled back too, so nothing is half written. On a
    PostgreSQL connection (:mod:`collateral_sync.sql`) the connection itself
    raises the refusal; this rolls back.
    """
    try:
        yield
    except BaseException as err:
        if connection.in_transaction:
            connection.rollback()
        refusal = sqlite_refusal(err) if isinstance(err, sqlite3.Error) else None
        if refusal is not None:
            raise refusal from err
        raise


class RPCError(CollateralSyncError):
    """An error status received from a counterparty.

    ``status_code`` is the code the peer sent (it may disagree with what our
    table maps its reason to; conformance checks compare the two).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: grpc.StatusCode,
        reason: int | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            message, reason=reason, metadata=metadata, field_violations=field_violations
        )
        self.status_code = status_code

    @property
    def code(self) -> grpc.StatusCode:
        return self.status_code


def error_to_status(error: CollateralSyncError) -> status_pb2.Status:
    """Encode an error as ``google.rpc.Status`` with ErrorInfo (and BadRequest)."""
    code = error.code
    info = error_details_pb2.ErrorInfo(
        reason=error.reason_name, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details = [_pack(info)]
    if error.field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in sorted(error.field_violations.items())
            ]
        )
        details.append(_pack(bad))
    return status_pb2.Status(code=code.value[0], message=error.message, details=details)


def to_grpc_status(error: CollateralSyncError) -> grpc.Status:
    """The grpc.Status to pass to ``context.abort_with_status``."""
    return rpc_status.to_status(error_to_status(error))


_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def error_from_status(status: status_pb2.Status) -> RPCError:
    """Decode a received ``google.rpc.Status`` into an :class:`RPCError`."""
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    reason: int | None = None
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                try:
                    reason = errors_pb2.ErrorReason.Value(_PREFIX + info.reason)
                except ValueError:
                    reason = _R.ERROR_REASON_UNSPECIFIED
                metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update({v.field: v.description for v in bad.field_violations})
    return RPCError(
        status.message,
        status_code=code,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
    )


def error_from_rpc_error(error: grpc.RpcError) -> RPCError:
    """Decode a ``grpc.RpcError`` / ``grpc.aio.AioRpcError`` with its rich details.

    A connection the server closed while it was being set up gets a hint: it is
    what a refused client certificate looks like from the client.
    """
    status: status_pb2.Status | None = None
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    if status is None:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        message = str(details or "")
        if code == grpc.StatusCode.UNAVAILABLE and _closed_while_connecting(message):
            message += f" ({_CLOSED_WHILE_CONNECTING})"
        return RPCError(message, status_code=code)
    return error_from_status(status)


_CLOSED_WHILE_CONNECTING = (
    "the server closed the connection during the TLS handshake: it may refuse this "
    "client's certificate (expired, or not issued by a CA it trusts); the server's log "
    "says why"
)


def _closed_while_connecting(details: str) -> bool:
    # grpc's words for a connection that never carried a call and was closed by the
    # peer; in TLS 1.3 a server refuses a client certificate only after its own
    # handshake messages, so the client sees just a closed socket.
    low = details.lower()
    return "failed to connect" in low and any(
        words in low for words in ("socket closed", "connection reset", "end of file")
    )


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed

