"""vectors/amounts.json: canonical amounts.

Checked with a character-level checker written from docs/PROTOCOL.md §2.1 and with the
SDK's parse_amount, format_amount and check_amount.
"""

from __future__ import annotations

import decimal
from typing import Any

import pytest
from collateral_sync.amounts import check_amount, format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError
from collateral_sync.v1 import errors_pb2

from ._common import load

AMOUNTS = load("amounts.json")


_DIGITS = set("0123456789")


def _own_is_canonical(text: str) -> bool:
    """docs/PROTOCOL.md §2.1, character by character."""
    body = text.removeprefix("-")
    integer, dot, fraction = body.partition(".")
    if not integer or not set(integer) <= _DIGITS or len(integer) > 60:
        return False
    if len(integer) > 1 and integer[0] == "0":
        return False
    if dot and (
        not fraction or not set(fraction) <= _DIGITS or len(fraction) > 18 or fraction[-1] == "0"
    ):
        return False
    return text != "-0"


@pytest.mark.parametrize("text", AMOUNTS["canonical"])
def test_canonical_amount(text: str) -> None:
    assert _own_is_canonical(text)
    assert format_amount(parse_amount(text)) == text
    assert check_amount(text) == text


@pytest.mark.parametrize(
    "vector", AMOUNTS["non_canonical"], ids=[repr(v["text"]) for v in AMOUNTS["non_canonical"]]
)
def test_non_canonical_amount(vector: dict[str, Any]) -> None:
    assert not _own_is_canonical(vector["text"])
    for check in (parse_amount, check_amount):
        with pytest.raises(CollateralSyncError) as sdk:
            check(vector["text"], field="quantity")
        assert sdk.value.reason_name == vector["expected"]["reason"]
        assert sdk.value.code.name == vector["expected"]["grpc_status"]
        assert "quantity" in sdk.value.message


@pytest.mark.parametrize("vector", AMOUNTS["formatting"], ids=lambda v: v["value"])
def test_amount_formatting(vector: dict[str, Any]) -> None:
    canonical = vector["canonical"]
    assert _own_is_canonical(canonical)
    assert decimal.Decimal(vector["value"]) == decimal.Decimal(canonical)
    assert format_amount(decimal.Decimal(vector["value"])) == canonical


@pytest.mark.parametrize("vector", AMOUNTS["unformattable"], ids=lambda v: v["why"])
def test_unformattable_amount(vector: dict[str, Any]) -> None:
    with pytest.raises(CollateralSyncError) as sdk:
        format_amount(decimal.Decimal(vector["value"]))
    assert sdk.value.reason == errors_pb2.ERROR_REASON_INVALID_AMOUNT
    assert sdk.value.reason_name == vector["expected"]["reason"]
