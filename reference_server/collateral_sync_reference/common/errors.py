"""Error constructors the reference servers share, so every role words alike."""

from __future__ import annotations

from collateral_sync.errors import MalformedError, StateError
from collateral_sync.v1 import envelope_pb2, errors_pb2
from google.protobuf.message import Message


def required(field: str, what: str) -> MalformedError:
    """``field`` is absent: INVALID_ARGUMENT / MALFORMED naming it."""
    return MalformedError(
        f"{field} is required: {what}",
        metadata={"field": field, "expected": what, "actual": "absent"},
        field_violations={field: "required"},
    )


def conflict(message: str, field: str, expected: str, actual: str) -> StateError:
    """The request does not fit the current state: FAILED_PRECONDITION / STATE_CONFLICT."""
    return StateError(
        message,
        reason=errors_pb2.ERROR_REASON_STATE_CONFLICT,
        metadata={"field": field, "expected": expected, "actual": actual},
    )


def require_statement(request: Message, field: str, what: str) -> envelope_pb2.Envelope:
    """The signed statement carried in ``request.field``, or MALFORMED when absent."""
    if not request.HasField(field):
        raise required(field, what)
    envelope: envelope_pb2.Envelope = getattr(request, field)
    return envelope
