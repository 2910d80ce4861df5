"""What a case sends, what it expects, what came back: outcomes and the checks on them.

Every RPC a case makes yields an :class:`Outcome` (the request, the response or
the error status with its decoded ``google.rpc`` details, the time taken).
The checks raise :class:`CaseFailure` carrying three texts for the report:
what was sent, what was expected and what came back. :class:`CaseSkipped`
ends a case that cannot run against this server (no test-control service,
no account to use); a skipped case never counts as passed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from collateral_sync.errors import ERROR_DOMAIN, STATUS_BY_REASON, CollateralSyncError, RPCError
from collateral_sync.signing import VerifiedStatement
from collateral_sync.statements import message_class_of
from collateral_sync.v1 import envelope_pb2, errors_pb2
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "CaseFailure",
    "CaseSkipped",
    "ErrorDetail",
    "Outcome",
    "check",
    "check_equal",
    "describe",
    "expect_access_denied",
    "expect_ok",
    "expect_status",
    "outcome_from_error",
    "sdk_check",
]

_T = TypeVar("_T")
_MAX_TEXT = 4000
_MAX_BYTES_SHOWN = 48


class CaseFailure(Exception):  # noqa: N818 (a verdict, like pytest's Failed, not an error)
    """The server under test did not behave as the case requires."""

    def __init__(
        self,
        message: str,
        *,
        sent: str | None = None,
        expected: str | None = None,
        got: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.expected = expected
        self.got = got


class CaseSkipped(Exception):  # noqa: N818 (a verdict, like pytest's Skipped)
    """The case cannot run against this server or with this kit configuration."""


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """A ``google.rpc.ErrorInfo`` as received (any domain)."""

    reason: str
    domain: str
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one RPC: a response, or a status with its details."""

    rpc: str
    request: Message | None
    response: Any
    code: grpc.StatusCode
    message: str = ""
    error_infos: tuple[ErrorDetail, ...] = ()
    field_violations: Mapping[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    @property
    def error_info(self) -> ErrorDetail | None:
        """The ErrorInfo of the collateral-sync domain, if the status carries one."""
        for info in self.error_infos:
            if info.domain == ERROR_DOMAIN:
                return info
        return None

    def summary(self) -> dict[str, Any]:
        """What came back, as JSON-able data for reports."""
        if self.ok:
            return {"status": "OK", "response": describe(self.response)}
        shown: dict[str, Any] = {"status": self.code.name, "message": self.message}
        if self.error_infos:
            shown["error_info"] = [
                {"reason": i.reason, "domain": i.domain, "metadata": dict(i.metadata)}
                for i in self.error_infos
            ]
        else:
            shown["error_info"] = None
        if self.field_violations:
            shown["field_violations"] = dict(self.field_violations)
        return shown


def outcome_from_error(
    rpc: str, request: Message | None, error: BaseException, elapsed: float
) -> Outcome:
    """Decode a failed call: an SDK ``RPCError`` (chained to the gRPC error) or a gRPC error."""
    raw: BaseException | None = error
    while raw is not None and not isinstance(raw, grpc.RpcError):
        raw = raw.__cause__
    if raw is None:
        if not isinstance(error, RPCError):
            raise TypeError(f"not an RPC error: {error!r}")
        # Already decoded, without the original status: keep what the SDK kept.
        known = error.reason != errors_pb2.ERROR_REASON_UNSPECIFIED
        return Outcome(
            rpc=rpc,
            request=request,
            response=None,
            code=error.status_code,
            message=error.message,
            error_infos=(ErrorDetail(error.reason_name, ERROR_DOMAIN, error.metadata),)
            if known
            else (),
            field_violations=dict(error.field_violations),
            elapsed=elapsed,
        )
    code = raw.code() if hasattr(raw, "code") else grpc.StatusCode.UNKNOWN
    message = raw.details() if hasattr(raw, "details") else str(raw)
    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(raw)
    except ValueError:
        # The details trailer disagrees with the status line: keep the line, drop the details.
        status = None
    infos: list[ErrorDetail] = []
    violations: dict[str, str] = {}
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                infos.append(ErrorDetail(info.reason, info.domain, dict(info.metadata)))
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.update({v.field: v.description for v in bad.field_violations})
    return Outcome(
        rpc=rpc,
        request=request,
        response=None,
        code=code,
        message=message or "",
        error_infos=tuple(infos),
        field_violations=violations,
        elapsed=elapsed,
    )


# ------------------------------------------------------------------ describing messages


def describe(message: Any) -> Any:
    """A JSON-able view of a protobuf message for reports.

    Envelopes show their payload decoded (when it parses as its payload type),
    its size and digest, and the signing key ids; long bytes are abbreviated.
    """
    if message is None:
        return None
    if not isinstance(message, Message):
        return repr(message)
    if isinstance(message, envelope_pb2.Envelope):
        return _describe_envelope(message)
    if isinstance(message, timestamp_pb2.Timestamp):
        return message.ToJsonString()
    shown: dict[str, Any] = {}
    for fd, value in message.ListFields():
        if _is_repeated(fd) and not _is_map(fd):
            shown[fd.name] = [_describe_value(fd, v) for v in value]
        else:
            shown[fd.name] = _describe_value(fd, value)
    return shown


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _is_map(fd: FieldDescriptor) -> bool:
    # A map is a repeated entry message on the wire, but a mapping in Python.
    return bool(
        fd.type == FieldDescriptor.TYPE_MESSAGE
        and fd.message_type is not None
        and fd.message_type.GetOptions().map_entry
    )


def _describe_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
        if _is_map(fd):
            return {str(k): describe(v) if isinstance(v, Message) else v for k, v in value.items()}
        if fd.message_type.full_name == "collateral_sync.v1.Decimal":
            return value.value
        return describe(value)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return _bytes_text(value)
    if fd.type == FieldDescriptor.TYPE_ENUM and fd.enum_type is not None:
        named = fd.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    return value


def _bytes_text(data: bytes) -> str:
    if len(data) <= _MAX_BYTES_SHOWN // 2:
        return data.hex()
    return f"{data[: _MAX_BYTES_SHOWN // 2].hex()}… ({len(data)} bytes)"


def _describe_envelope(envelope: envelope_pb2.Envelope) -> dict[str, Any]:
    payload = envelope.payload
    shown: dict[str, Any] = {
        "payload_type": envelope.payload_type,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest()[:16],
    }
    try:
        parsed = message_class_of(envelope.payload_type)()
        parsed.ParseFromString(payload)
        shown["payload"] = describe(parsed)
    except (CollateralSyncError, DecodeError):
        shown["payload"] = f"(does not parse as its type) {_bytes_text(payload)}"
    shown["signatures"] = [
        {"key_id": s.key_id, "sig_bytes": len(s.sig)} for s in envelope.signatures
    ]
    return shown


def _text(data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data, indent=2, ensure_ascii=False)
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT] + f"\n… ({len(text) - _MAX_TEXT} more characters)"
    return text


def _sent(outcome: Outcome) -> str:
    return _text({"rpc": outcome.rpc, "request": describe(outcome.request)})


# ------------------------------------------------------------------ checks


def expect_ok(outcome: Outcome) -> Any:
    """The response of a call that must succeed; otherwise the case fails."""
    if outcome.ok:
        return outcome.response
    info = outcome.error_info
    reason = f" {info.reason}" if info is not None else ""
    raise CaseFailure(
        f"{outcome.rpc} failed with {outcome.code.name}{reason}: {outcome.message}",
        sent=_sent(outcome),
        expected="OK",
        got=_text(outcome.summary()),
    )


def _reason_name(reason: int) -> str:
    return errors_pb2.ErrorReason.Name(reason).removeprefix("ERROR_REASON_")  # type: ignore[arg-type]


def expect_status(
    outcome: Outcome,
    code: grpc.StatusCode,
    reason: int | None,
    *,
    require_expected_actual: bool = True,
    field_violation: str | None = None,
    metadata_field: str | None = None,
) -> None:
    """Require the refusal the protocol prescribes (docs/PROTOCOL.md §12).

    The status code must be ``code``; with ``reason`` (an ``ErrorReason``
    value) the status must carry a ``google.rpc.ErrorInfo`` of domain
    ``collateral-sync.v1`` with that reason, the code must be the one §12.1
    maps the reason to, and (unless ``require_expected_actual`` is False) its
    metadata must hold ``expected`` and ``actual``. ``field_violation`` asks
    for a ``google.rpc.BadRequest`` violation whose field path ends with it;
    ``metadata_field`` for that value of the ErrorInfo's metadata ``field``.
    """
    wanted = (
        code.name if reason is None else f"{code.name} with ErrorInfo reason {_reason_name(reason)}"
    )
    wanted += f" (domain {ERROR_DOMAIN})" if reason is not None else ""

    def fail(why: str) -> CaseFailure:
        return CaseFailure(
            f"{outcome.rpc}: {why}",
            sent=_sent(outcome),
            expected=wanted,
            got=_text(outcome.summary()),
        )

    if outcome.ok:
        raise fail(f"expected a refusal with {code.name}, but the call succeeded")
    if reason is not None:
        mapped = STATUS_BY_REASON.get(reason)
        if mapped != code:  # a kit bug, not the server's
            raise ValueError(f"reason {_reason_name(reason)} maps to {mapped}, not {code.name}")
    if outcome.code != code:
        raise fail(f"expected status {code.name}, got {outcome.code.name}")
    if reason is None:
        return
    info = outcome.error_info
    if info is None:
        domains = ", ".join(i.domain for i in outcome.error_infos) or "none"
        raise fail(
            f"expected a google.rpc.ErrorInfo with domain {ERROR_DOMAIN} in the status details, "
            f"got ErrorInfo domains: {domains}"
        )
    if info.reason != _reason_name(reason):
        raise fail(f"expected reason {_reason_name(reason)}, got {info.reason or '(empty)'}")
    if require_expected_actual:
        missing = [key for key in ("expected", "actual") if key not in info.metadata]
        if missing:
            raise fail(f"ErrorInfo metadata lacks {', '.join(missing)} (docs/PROTOCOL.md §12.2)")
    if field_violation is not None and not any(
        path == field_violation or path.endswith("." + field_violation)
        for path in outcome.field_violations
    ):
        raise fail(f"expected a BadRequest field violation for '{field_violation}'")
    if metadata_field is not None and info.metadata.get("field") != metadata_field:
        raise fail(
            f"expected ErrorInfo metadata field = '{metadata_field}', got "
            f"{info.metadata.get('field', '(absent)')!r} (docs/PROTOCOL.md §12.2)"
        )


def expect_access_denied(
    outcome: Outcome, *, field: str, caller: str, hidden: Sequence[str] = ()
) -> None:
    """An access refusal as §4.5 shapes it: PERMISSION_DENIED ``KEY_ROLE_MISMATCH``.

    Its metadata ``field`` names what was refused (``caller`` when the caller
    itself is), its ``actual`` is the ``caller``'s party id — the refused party
    learns who the server took it for — and neither the message nor the
    metadata names any of ``hidden`` (the data's parties).
    """
    expect_status(
        outcome,
        grpc.StatusCode.PERMISSION_DENIED,
        errors_pb2.ErrorReason.ERROR_REASON_KEY_ROLE_MISMATCH,
    )
    info = outcome.error_info
    assert info is not None  # expect_status required it
    check(
        info.metadata.get("field") == field,
        f"{outcome.rpc}: the refusal's ErrorInfo metadata 'field' must name {field!r} (§4.5)",
        expected=field,
        got=info.metadata.get("field", "(absent)"),
    )
    check(
        info.metadata.get("actual") == caller,
        f"{outcome.rpc}: the refusal's ErrorInfo metadata 'actual' must be the caller's party "
        "id (§4.5)",
        expected=caller,
        got=info.metadata.get("actual") or "(absent or empty)",
    )
    said = " ".join([outcome.message, *info.metadata.values()])
    leaked = [party for party in hidden if party and party in said]
    check(
        not leaked,
        f"{outcome.rpc}: the refusal names a party of the account to a caller who may not "
        "read it (§4.5)",
        expected="no party of the account in the message or metadata",
        got=said,
    )


def check(condition: bool, message: str, *, expected: Any = None, got: Any = None) -> None:
    """Fail the case with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CaseFailure(
            message,
            expected=None if expected is None else _text(expected),
            got=None if got is None else _text(got),
        )


def check_equal(what: str, expected: Any, actual: Any) -> None:
    """Fail the case unless ``actual == expected``."""
    if actual != expected:
        raise CaseFailure(
            f"{what}: expected {expected!r}, got {actual!r}",
            expected=_text(expected if isinstance(expected, str) else repr(expected)),
            got=_text(actual if isinstance(actual, str) else repr(actual)),
        )


def sdk_check(what: str, verify: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run one of the SDK's independent verifiers; its refusal fails the case.

    A statement it verified must also carry a ``statement_id``: issuers MUST set
    one (PROTOCOL.md §3.4), though verifiers do not check it, so the SDK does not.
    """
    try:
        result = verify(*args, **kwargs)
    except CollateralSyncError as err:
        raise CaseFailure(
            f"{what} does not verify: {err.reason_name}: {err.message}",
            expected=_text(err.metadata.get("expected", "a value that verifies")),
            got=_text(err.metadata.get("actual", err.message)),
        ) from err
    _require_statement_ids(what, result)
    return result


def _require_statement_ids(what: str, result: Any) -> None:
    """Fail if a statement in a verifier's result has no ``header.statement_id`` (§3.4).

    Verifiers return a verified statement, a tuple holding one (with the audience
    it verified for), or a verified sync batch (its ``statement``).
    """
    for item in result if isinstance(result, tuple) else (result,):
        statement = getattr(item, "statement", item)
        if isinstance(statement, VerifiedStatement) and not statement.header.statement_id:
            raise CaseFailure(
                f"{what} ({statement.payload_type}, issued by {statement.issuer!r}, sequence "
                f"{statement.sequence}) has no header.statement_id: issuers MUST set it (§3.4)",
                expected="a non-empty statement_id",
                got="''",
            )
