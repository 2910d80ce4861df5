"""Exact decimal amounts: the canonical text form of ``collateral_sync.v1.Decimal``.

Amounts never pass through floats. On the wire a Decimal is text in one
canonical form (see docs/PROTOCOL.md, "Amounts"): optional "-", integer part
without leading zeros, optional "." and 1 to 18 digits not ending in "0";
"-0" is not canonical; at most 60 integer digits. Parsing refuses anything
else, so two parties never disagree about what an amount is.
"""

from __future__ import annotations

import decimal
import re

from collateral_sync.errors import MalformedError
from collateral_sync.v1 import common_pb2, errors_pb2

__all__ = [
    "MAX_FRACTION_DIGITS",
    "MAX_INTEGER_DIGITS",
    "Amount",
    "amount_from_proto",
    "amount_to_proto",
    "check_amount",
    "format_amount",
    "parse_amount",
]

Amount = decimal.Decimal

MAX_FRACTION_DIGITS = 18
MAX_INTEGER_DIGITS = 60

_CANONICAL = re.compile(r"-?(0|[1-9][0-9]{0,59})(\.[0-9]{0,17}[1-9])?")
# Enough precision that no canonical amount, nor a product of two, is rounded.
_CONTEXT = decimal.Context(
    prec=200, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.InvalidOperation]
)
_QUANTUM = decimal.Decimal(1).scaleb(-MAX_FRACTION_DIGITS)


def parse_amount(text: str, *, field: str = "amount") -> Amount:
    """Parse canonical decimal text; refuse anything else with INVALID_AMOUNT."""
    return decimal.Decimal(check_amount(text, field=field), context=_CONTEXT)


def check_amount(text: str, *, field: str = "amount") -> str:
    """``text`` itself if it is a canonical decimal; refuse anything else with INVALID_AMOUNT.

    What ``format_amount(parse_amount(text))`` returns, without the round trip
    through ``Decimal``: canonical text is its own canonical form. For amounts
    that are checked and stored, not computed with (the sync hot path).
    """
    if not isinstance(text, str) or _CANONICAL.fullmatch(text) is None or text == "-0":
        raise MalformedError(
            f"{field}: expected a canonical decimal (e.g. '12.5', at most "
            f"{MAX_FRACTION_DIGITS} fraction digits), got {text!r}",
            reason=errors_pb2.ERROR_REASON_INVALID_AMOUNT,
            metadata={"field": field, "expected": "canonical decimal", "actual": str(text)[:80]},
            field_violations={field: "not a canonical decimal"},
        )
    return text


def format_amount(value: Amount, *, field: str = "amount") -> str:
    """Canonical text of an amount. Refuses values that need more than 18
    fraction digits or 60 integer digits rather than rounding silently."""
    if not value.is_finite():
        raise MalformedError(
            f"{field}: expected a finite amount, got {value}",
            reason=errors_pb2.ERROR_REASON_INVALID_AMOUNT,
            metadata={"field": field, "expected": "finite", "actual": str(value)},
        )
    if value.quantize(_QUANTUM, context=_CONTEXT) != value:
        raise MalformedError(
            f"{field}: expected at most {MAX_FRACTION_DIGITS} fraction digits, got {value}",
            reason=errors_pb2.ERROR_REASON_INVALID_AMOUNT,
            metadata={"field": field, "expected": "<= 18 fraction digits", "actual": str(value)},
        )
    if value.is_zero():
        return "0"
    text = format(value.normalize(context=_CONTEXT), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    integer_digits = len(text.lstrip("-").split(".")[0])
    if integer_digits > MAX_INTEGER_DIGITS:
        raise MalformedError(
            f"{field}: expected at most {MAX_INTEGER_DIGITS} integer digits, got {integer_digits}",
            reason=errors_pb2.ERROR_REASON_INVALID_AMOUNT,
            metadata={
                "field": field,
                "expected": "<= 60 integer digits",
                "actual": str(integer_digits),
            },
        )
    return text


def amount_from_proto(message: common_pb2.Decimal, *, field: str = "amount") -> Amount:
    """Parse a ``collateral_sync.v1.Decimal``."""
    return parse_amount(message.value, field=field)


def amount_to_proto(value: Amount | int | str) -> common_pb2.Decimal:
    """Build a ``collateral_sync.v1.Decimal`` in canonical form."""
    if isinstance(value, str):
        value = parse_amount(value)
    elif isinstance(value, int):
        value = decimal.Decimal(value)
    return common_pb2.Decimal(value=format_amount(value))
