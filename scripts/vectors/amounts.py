"""vectors/amounts.json: canonical decimal text (§2).

Amounts that must parse, texts that must be refused, values in any plain notation with
their canonical text, and values that cannot be written canonically.
"""

from __future__ import annotations

from typing import Any

__all__ = ["amounts_file"]


def amounts_file() -> dict[str, Any]:
    canonical = [
        "0",
        "1",
        "12",
        "-3.5",
        "0.5",
        "-0.5",
        "0.000000000000000001",
        "-0.000000000000000001",
        "1000000",
        "123456789012345678901234567890.25",
        "9223372036854775808",
        "9" * 60,
        "-" + "9" * 60 + "." + "9" * 18,
        "1.000000000000000001",
    ]
    non_canonical = [
        ("-0", "negative zero"),
        ("0.0", "trailing zero in the fraction"),
        ("1.50", "trailing zero in the fraction"),
        ("1.", "empty fraction"),
        (".5", "empty integer part"),
        ("01", "leading zero"),
        ("00", "leading zero"),
        ("-01.5", "leading zero"),
        ("+1", "plus sign"),
        ("1e3", "exponent"),
        ("1E3", "exponent"),
        (" 1", "leading space"),
        ("1 ", "trailing space"),
        ("1,000", "thousands separator"),
        ("1_000", "digit separator"),
        ("", "empty"),
        ("-", "sign only"),
        ("NaN", "not a number"),
        ("Infinity", "not a number"),
        ("0.0000000000000000001", "19 fraction digits"),
        ("1" * 61, "61 integer digits"),
        ("\u0661", "non-ASCII digit (ARABIC-INDIC DIGIT ONE)"),
        ("0x10", "hexadecimal"),
        ("--1", "double sign"),
    ]
    formatting = [
        ("1.500", "1.5"),
        ("-0.000", "0"),
        ("0012", "12"),
        ("100", "100"),
        ("1000.000000000000000000", "1000"),
        ("-2.50", "-2.5"),
        ("0.000000000000000001000", "0.000000000000000001"),
    ]
    unformattable = [
        ("0.0000000000000000001", "19 significant fraction digits would need rounding"),
        ("1" * 61, "61 integer digits"),
    ]
    return {
        "description": (
            "Canonical decimal text (docs/PROTOCOL.md section 2). 'canonical' must parse; "
            "'non_canonical' must be refused with reason INVALID_AMOUNT; 'formatting' maps an "
            "exact value written in any plain decimal notation to its canonical text; "
            "'unformattable' values cannot be written canonically and must be refused with "
            "INVALID_AMOUNT rather than rounded."
        ),
        "canonical": canonical,
        "non_canonical": [
            {"text": text, "why": why, "expected": _reason_amount()} for text, why in non_canonical
        ],
        "formatting": [{"value": value, "canonical": text} for value, text in formatting],
        "unformattable": [
            {"value": value, "why": why, "expected": _reason_amount()}
            for value, why in unformattable
        ],
    }


def _reason_amount() -> dict[str, Any]:
    return {"valid": False, "reason": "INVALID_AMOUNT", "grpc_status": "INVALID_ARGUMENT"}
