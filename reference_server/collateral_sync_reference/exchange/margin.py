"""The margin-call lifecycle of the reference exchange, as pure rules (docs/PROTOCOL.md §8).

::

    ISSUED ──AGREE──────────────► AGREED ─────────┐
      │ ──PARTIALLY_AGREE──────► PARTIALLY_AGREED ├─ top-ups reach the amount due ─► SATISFIED
      │ ──DISPUTE──────────────► DISPUTED         └─ due_by passes ───────────────► EXPIRED ─► liquidation
      └─ (ISSUED or DISPUTED) prices recover, or a breach liquidation supersedes ─► WITHDRAWN

The amount due is ``call_amount`` while ISSUED or AGREED, ``agreed_amount``
while PARTIALLY_AGREED (the rest is disputed), and 0 while DISPUTED: a
disputed call neither expires nor is satisfied; it stays until withdrawn.
An AGREED or PARTIALLY_AGREED call is a promise to pay and is not withdrawn
when prices recover: it ends satisfied or expired.

:func:`judge_response` decides what a custodian's ``MarginCallResponse``
does to a call, or raises the error the protocol names for it; the exchange
applies the outcome and publishes a new signed ``MarginCallState``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import MalformedError, StateError
from collateral_sync.v1 import common_pb2, envelope_pb2, errors_pb2, margin_pb2
from google.protobuf import timestamp_pb2

from collateral_sync_reference.exchange.store import MarginCallRow

__all__ = [
    "BLOCKING",
    "EXPIRING",
    "TERMINAL",
    "WITHDRAWABLE_ON_RECOVERY",
    "ResponseOutcome",
    "amount_due",
    "judge_response",
    "state_message",
    "status_name",
]

_R = errors_pb2.ErrorReason
_S = margin_pb2.MarginCallStatus
_K = margin_pb2.MarginCallResponseKind
_ZERO = Decimal(0)
_NS = 1_000_000_000

#: A call in one of these stops a new call for the account (§8.2), can be
#: satisfied by top-ups, and expires at due_by.
BLOCKING = frozenset(
    {
        _S.MARGIN_CALL_STATUS_ISSUED,
        _S.MARGIN_CALL_STATUS_AGREED,
        _S.MARGIN_CALL_STATUS_PARTIALLY_AGREED,
    }
)
EXPIRING = BLOCKING
#: Withdrawn when the account's ratio is back at or above maintenance.
WITHDRAWABLE_ON_RECOVERY = frozenset({_S.MARGIN_CALL_STATUS_ISSUED, _S.MARGIN_CALL_STATUS_DISPUTED})
TERMINAL = frozenset(
    {
        _S.MARGIN_CALL_STATUS_SATISFIED,
        _S.MARGIN_CALL_STATUS_EXPIRED,
        _S.MARGIN_CALL_STATUS_WITHDRAWN,
    }
)


def status_name(status: int) -> str:
    try:
        return _S.Name(status)  # type: ignore[arg-type]
    except ValueError:
        return str(status)


def amount_due(status: int, call_amount: Decimal, agreed_amount: Decimal) -> Decimal:
    """What the account owes on a call in ``status`` (§8.1)."""
    if status in (_S.MARGIN_CALL_STATUS_ISSUED, _S.MARGIN_CALL_STATUS_AGREED):
        return call_amount
    if status == _S.MARGIN_CALL_STATUS_PARTIALLY_AGREED:
        return agreed_amount
    return _ZERO


@dataclass(frozen=True, slots=True)
class ResponseOutcome:
    """What a valid response does: the call's new status and agreed amount."""

    status: int
    agreed_amount: Decimal


def check_response_shape(response: margin_pb2.MarginCallResponse) -> Decimal:
    """Checks that need no call: id present, kind defined, agreed amount canonical.

    Returns the agreed amount. MALFORMED or INVALID_AMOUNT otherwise.
    """
    if not response.margin_call_id:
        raise _malformed("margin_call_id", "a margin call id", "''")
    if response.kind not in (
        _K.MARGIN_CALL_RESPONSE_KIND_AGREE,
        _K.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE,
        _K.MARGIN_CALL_RESPONSE_KIND_DISPUTE,
    ):
        raise _malformed("kind", "AGREE, PARTIALLY_AGREE or DISPUTE", _kind_name(response.kind))
    if not response.HasField("agreed_amount"):
        raise _malformed("agreed_amount", "a Decimal", "absent")
    return parse_amount(response.agreed_amount.value, field="margin_call_response.agreed_amount")


def judge_response(
    call: MarginCallRow, response: margin_pb2.MarginCallResponse, *, now_ns: int
) -> ResponseOutcome:
    """The outcome of ``response`` to ``call`` at ``now_ns`` (§8.3), or the error for it.

    In order: shape (MALFORMED, INVALID_AMOUNT); the amount against the
    call's amount for the kind (INVALID_AMOUNT); a dispute reason for a
    dispute (MALFORMED); then state: the call must be ISSUED and not past
    due_by (STATE_CONFLICT).
    """
    agreed = check_response_shape(response)
    kind = response.kind
    call_amount = call.call_amount
    if kind == _K.MARGIN_CALL_RESPONSE_KIND_AGREE:
        if agreed != call_amount:
            raise _bad_amount(f"= call_amount {format_amount(call_amount)}", agreed)
        status = _S.MARGIN_CALL_STATUS_AGREED
    elif kind == _K.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE:
        if not _ZERO < agreed < call_amount:
            raise _bad_amount(f"> 0 and < call_amount {format_amount(call_amount)}", agreed)
        status = _S.MARGIN_CALL_STATUS_PARTIALLY_AGREED
    else:
        if agreed != _ZERO:
            raise _bad_amount("0 for a dispute", agreed)
        if response.dispute_reason == margin_pb2.DISPUTE_REASON_UNSPECIFIED:
            raise _malformed("dispute_reason", "a dispute reason for DISPUTE", "UNSPECIFIED")
        status = _S.MARGIN_CALL_STATUS_DISPUTED
    if call.status != _S.MARGIN_CALL_STATUS_ISSUED:
        raise StateError(
            f"margin call {call.margin_call_id} is {status_name(call.status)}; only an ISSUED "
            "call takes a response",
            reason=_R.ERROR_REASON_STATE_CONFLICT,
            metadata={"expected": "MARGIN_CALL_STATUS_ISSUED", "actual": status_name(call.status)},
        )
    if now_ns > call.due_by_ns:
        raise StateError(
            f"margin call {call.margin_call_id} was due by {_ns_text(call.due_by_ns)}; "
            f"the response came at {_ns_text(now_ns)}",
            reason=_R.ERROR_REASON_STATE_CONFLICT,
            metadata={"expected": f"<= {_ns_text(call.due_by_ns)}", "actual": _ns_text(now_ns)},
        )
    return ResponseOutcome(status=status, agreed_amount=agreed)


def state_message(
    *,
    margin_call_id: str,
    status: int,
    call_amount: Decimal,
    agreed_amount: Decimal,
    satisfied_amount: Decimal,
    updated_at_ns: int,
    call_envelope: envelope_pb2.Envelope,
) -> margin_pb2.MarginCallState:
    """The unsigned MarginCallState of a call (its header is set when signed)."""
    return margin_pb2.MarginCallState(
        margin_call_id=margin_call_id,
        status=status,  # type: ignore[arg-type]
        call_amount=common_pb2.Decimal(value=format_amount(call_amount)),
        agreed_amount=common_pb2.Decimal(value=format_amount(agreed_amount)),
        satisfied_amount=common_pb2.Decimal(value=format_amount(satisfied_amount)),
        updated_at=_timestamp(updated_at_ns),
        margin_call=call_envelope,
    )


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(ns, _NS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _ns_text(ns: int) -> str:
    return _timestamp(ns).ToJsonString()


def _kind_name(kind: int) -> str:
    try:
        return _K.Name(kind)  # type: ignore[arg-type]
    except ValueError:
        return str(kind)


def _malformed(field: str, expected: str, actual: str) -> MalformedError:
    path = f"margin_call_response.{field}"
    return MalformedError(
        f"{path}: expected {expected}, got {actual}",
        metadata={"field": path, "expected": expected, "actual": actual},
        field_violations={path: f"must be {expected}"},
    )


def _bad_amount(expected: str, actual: Decimal) -> MalformedError:
    path = "margin_call_response.agreed_amount"
    return MalformedError(
        f"{path}: expected {expected}, got {format_amount(actual)}",
        reason=_R.ERROR_REASON_INVALID_AMOUNT,
        metadata={"field": path, "expected": expected, "actual": format_amount(actual)},
        field_violations={path: f"must be {expected}"},
    )
