"""Exact arithmetic shared by the valuation modules.

Decimal contexts in which an unintended rounding fails loudly, the two
deliberate roundings (down and up at the policy's scale), the wire's cut
(toward zero at 18 places) and an exact quotient, required and
caller-supplied amounts with the errors they raise, and instants as integer
nanoseconds. The rules they serve are stated in
:mod:`collateral_sync.valuation`.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from collateral_sync.amounts import MAX_FRACTION_DIGITS, format_amount, parse_amount
from collateral_sync.errors import MalformedError
from collateral_sync.v1 import common_pb2, errors_pb2

# Helpers for the sibling modules only: nothing here is API.
__all__: list[str] = []

Decimal = decimal.Decimal

_R = errors_pb2.ErrorReason

# Canonical amounts have at most 60 + 18 digits, so products of a few of them
# stay far below this precision; trapping Inexact turns any silent rounding of
# an "exact" step into a loud failure instead of a wrong figure.
_EXACT = decimal.Context(
    prec=2000,
    rounding=decimal.ROUND_FLOOR,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow, decimal.Inexact],
)
# Deliberate rounding (quantize) signals Inexact; only this context allows it.
_ROUNDING = decimal.Context(
    prec=2000,
    rounding=decimal.ROUND_FLOOR,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)
_ZERO = Decimal(0)
_ONE = Decimal(1)
_NS_PER_S = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- rounding -------------------------------------------------------------------


def _quantum(scale: int) -> Decimal:
    return _ONE.scaleb(-scale, context=_EXACT)


def _round_down(value: Decimal, scale: int) -> Decimal:
    return value.quantize(_quantum(scale), rounding=decimal.ROUND_FLOOR, context=_ROUNDING)


def _round_up(value: Decimal, scale: int) -> Decimal:
    return value.quantize(_quantum(scale), rounding=decimal.ROUND_CEILING, context=_ROUNDING)


def _divide_down(numerator: Decimal, denominator: Decimal, scale: int) -> Decimal:
    """``numerator / denominator`` rounded down at ``scale``, exactly (both >= 0).

    Integer division of the scaled numerator is exact at any length, unlike a
    Decimal quotient, which is rounded to the context's precision first.
    """
    whole = _EXACT.divide_int(numerator.scaleb(scale, context=_EXACT), denominator)
    return whole.scaleb(-scale, context=_EXACT)


def _wire(value: Decimal, field: str) -> str:
    """Canonical text of a reported figure, rounded toward zero to the wire's 18 places.

    Toward zero, not down: a negative figure (an ADL score, docs/PROTOCOL.md
    section 9.5) keeps its digits; for a non-negative one (price, market value)
    the two are the same.
    """
    wire = value.quantize(
        _quantum(MAX_FRACTION_DIGITS), rounding=decimal.ROUND_DOWN, context=_ROUNDING
    )
    return format_amount(wire, field=field)


# --- errors -----------------------------------------------------------------------


def _malformed(
    field: str,
    expected: str,
    actual: str,
    what: str = "",
    *,
    reason: int = _R.ERROR_REASON_MALFORMED,
) -> MalformedError:
    subject = f"{what} {field}" if what else field
    return MalformedError(
        f"{subject}: expected {expected}, got {actual}",
        reason=reason,
        metadata={"field": field, "expected": expected, "actual": actual},
        field_violations={field: f"must be {expected}"},
    )


def _amount(parent: Message, name: str, field: str, what: str) -> Decimal:
    """A required Decimal field: absent is MALFORMED, present but not canonical INVALID_AMOUNT."""
    if not parent.HasField(name):
        raise _malformed(field, "a Decimal", "absent", what)
    message: common_pb2.Decimal = getattr(parent, name)
    return parse_amount(message.value, field=field)


def _non_negative(value: Decimal, field: str, what: str) -> Decimal:
    # A sign error is an unacceptable amount (docs/PROTOCOL.md section 2.2).
    if value < 0:
        raise _malformed(
            field, ">= 0", format_amount(value), what, reason=_R.ERROR_REASON_INVALID_AMOUNT
        )
    return value


def _sum(values: Iterable[Decimal]) -> Decimal:
    # Explicit context: the thread's default (28 digits) would round silently.
    total = _ZERO
    for value in values:
        total = _EXACT.add(total, value)
    return total


def _checked_input(value: Decimal, field: str, *, non_negative: bool = True) -> Decimal:
    """An amount passed in by the caller: a Decimal the wire could carry."""
    if not isinstance(value, Decimal):
        raise TypeError(f"{field} must be a decimal.Decimal, got {type(value).__name__}")
    format_amount(value, field=field)  # finite, <= 18 places, <= 60 integer digits
    if non_negative:
        _non_negative(value, field, "")
    return value


# --- time -------------------------------------------------------------------------


def _datetime_ns(value: datetime) -> int:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {value!r}")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * _NS_PER_S + delta.microseconds * 1_000


def _timestamp_ns(value: timestamp_pb2.Timestamp) -> int:
    return value.seconds * _NS_PER_S + value.nanos


def _duration_ns(value: duration_pb2.Duration) -> int:
    return value.seconds * _NS_PER_S + value.nanos
