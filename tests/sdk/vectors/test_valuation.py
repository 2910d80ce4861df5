"""vectors/valuation.json: valuation, credit, margin-call and liquidation figures.

Every case is run through the Python SDK (collateral_sync.valuation): valid cases give
exactly the stated figures, invalid ones are refused with the stated reason and field;
the signed margin calls and liquidation instructions are recomputed from their inputs.
The TypeScript SDK checks the same file (sdk/typescript/test/valuation.test.ts).
"""

from __future__ import annotations

import decimal
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import KeyRegistry
from collateral_sync.v1 import common_pb2, envelope_pb2, keys_pb2, valuation_pb2
from collateral_sync.valuation import (
    AdlCandidate,
    allocate_shortfall,
    credit_line_figures,
    liquidation_amount,
    liquidation_shortfall,
    margin_call_amount,
    needs_liquidation,
    recompute_liquidation_instruction,
    recompute_margin_call,
    recompute_pledge_release_consent,
    value_collateral,
)
from google.protobuf import json_format, timestamp_pb2

from ._common import ids_of, load

VALUATION = load("valuation.json")

_CLASS = common_pb2.AssetClass
_EXACT = decimal.Context(prec=2000, traps=[decimal.Inexact])


def _datetime(text: str) -> datetime:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp.ToDatetime(tzinfo=UTC)


def _policy(vector: dict[str, Any]) -> valuation_pb2.RiskPolicy:
    return json_format.ParseDict(vector["policy"], valuation_pb2.RiskPolicy())


def _positions(vector: dict[str, Any]) -> list[common_pb2.Position]:
    positions = []
    for given in vector["positions"]:
        position = common_pb2.Position(asset_id=given["asset_id"])
        for name in ("quantity", "locked_quantity", "pledged_quantity"):
            if given[name] is not None:
                getattr(position, name).CopyFrom(common_pb2.Decimal(value=given[name]))
        positions.append(position)
    return positions


def _prices(vector: dict[str, Any]) -> list[valuation_pb2.PriceQuote]:
    quotes = []
    for given in vector["prices"]:
        quote = valuation_pb2.PriceQuote(asset_id=given["asset_id"])
        if given["price"] is not None:
            quote.price.CopyFrom(common_pb2.Decimal(value=given["price"]))
        if given["observed_at"] is not None:
            quote.observed_at.FromJsonString(given["observed_at"])
        quotes.append(quote)
    return quotes


def _text(value: Decimal) -> str:
    """Plain exact text, as the file writes figures."""
    if value == 0:
        return "0"
    return format(value.normalize(context=_EXACT), "f")


def _figures(vector: dict[str, Any]) -> dict[str, Any]:
    """Every figure of a case from the SDK, in the shape of ``expected``."""
    policy = _policy(vector)
    valuation = value_collateral(
        policy,
        _positions(vector),
        _prices(vector),
        asset_classes={k: _CLASS.Value(v) for k, v in vector["asset_classes"].items()},
        valued_at=_datetime(vector["valued_at"]),
    )
    exposure = Decimal(vector["exposure"])
    credit = credit_line_figures(policy, valuation, exposure)
    call = margin_call_amount(policy, valuation.collateral_value, exposure)
    amount = liquidation_amount(policy, valuation.collateral_value, exposure)
    assert needs_liquidation(policy, valuation.collateral_value, exposure) == (amount is not None)
    liquidation: dict[str, Any] = {"due": amount is not None}
    if amount is not None:
        given = vector["liquidation"]
        shortfall = liquidation_shortfall(amount, Decimal(given["proceeds"]))
        allocation = None
        if shortfall > 0:
            figures = allocate_shortfall(
                policy,
                shortfall,
                [
                    AdlCandidate(
                        c["account_id"], Decimal(c["profit"]), Decimal(c["effective_leverage"])
                    )
                    for c in given["candidates"]
                ],
            )
            wire = figures.to_proto("liquidation")
            allocation = {
                "covered_by_insurance_fund": _text(figures.covered_by_insurance_fund),
                "insurance_fund_balance_after": _text(figures.insurance_fund_balance_after),
                "auto_deleveraging_amount": _text(figures.auto_deleveraging_amount),
                "ranking": [
                    {
                        "account_id": entry.account_id,
                        "score": _text(entry.score),
                        "score_wire": row.score.value,
                        "rank": entry.rank,
                    }
                    for entry, row in zip(figures.ranking, wire.ranking, strict=True)
                ],
            }
        liquidation.update(amount=_text(amount), shortfall=_text(shortfall), allocation=allocation)
    return {
        "valid": True,
        "positions": [
            {
                "asset_id": row.asset_id,
                "asset_class": _CLASS.Name(row.asset_class),
                "eligible_quantity": _text(row.eligible_quantity),
                "price": _text(row.price),
                "market_value": _text(row.market_value),
                "collateral_factor": _text(row.collateral_factor),
                "haircut_value": _text(row.haircut_value),
                "collateral_value": _text(row.collateral_value),
                "price_wire": wire_row.price.value,
                "market_value_wire": wire_row.market_value.value,
            }
            for row, wire_row in zip(valuation.positions, valuation.rows(), strict=True)
        ],
        "haircut_total": _text(valuation.haircut_total),
        "collateral_value": _text(credit.collateral_value),
        "credit_limit": _text(credit.credit_limit),
        "collateral_ratio": None
        if credit.collateral_ratio is None
        else _text(credit.collateral_ratio),
        "margin_call": {
            "due": call is not None,
            "call_amount": None if call is None else _text(call),
        },
        "liquidation": liquidation,
    }


def _registry() -> KeyRegistry:
    return KeyRegistry.from_proto(
        json_format.ParseDict(VALUATION["registry"], keys_pb2.KeyRegistry())
    )


def _envelope(vector: dict[str, Any]) -> envelope_pb2.Envelope:
    envelope = envelope_pb2.Envelope.FromString(bytes.fromhex(vector["envelope_hex"]))
    given = vector["envelope"]
    assert envelope.payload.hex() == given["payload_hex"]
    assert envelope.payload_type == given["payload_type"]
    assert [(s.key_id, s.sig.hex()) for s in envelope.signatures] == [
        (s["key_id"], s["sig_hex"]) for s in given["signatures"]
    ]
    return envelope


# --- what the file covers -------------------------------------------------------------


def test_valuation_file_covers_what_the_spec_requires() -> None:
    assert VALUATION["kind"] == "valuation"
    valid = {v["id"]: v for v in VALUATION["valuations"]}
    ids = [*valid, *ids_of(VALUATION["invalid"])]
    ids += ids_of(VALUATION["margin_calls"]) + ids_of(VALUATION["liquidation_instructions"])
    ids += ids_of(VALUATION["pledge_release_consents"])
    assert len(ids) == len(set(ids))
    expected = [v["expected"] for v in valid.values()]
    classes = {p["asset_class"] for e in expected for p in e["positions"]}
    assert "ASSET_CLASS_UNSPECIFIED" in classes
    assert any(e["collateral_ratio"] is None for e in expected)
    assert {e["margin_call"]["due"] for e in expected} == {True, False}
    allocations = [e["liquidation"].get("allocation") for e in expected]
    assert None in allocations
    assert any(a and a["ranking"] for a in allocations)
    assert any(a and not a["ranking"] for a in allocations)
    reasons = {v["expected"]["reason"] for v in VALUATION["invalid"]}
    assert reasons == {"MALFORMED", "INVALID_AMOUNT"}
    calls = {v["expected"]["valid"] for v in VALUATION["margin_calls"]}
    assert calls == {True, False}
    consents = {v["expected"]["valid"] for v in VALUATION["pledge_release_consents"]}
    assert consents == {True, False}


def test_round_half_even_differs_by_one_quantum() -> None:
    vector = next(v for v in VALUATION["valuations"] if "round_half_even" in v)
    quantum = Decimal(1).scaleb(-int(vector["policy"]["roundingScale"]))
    expected = vector["expected"]
    stated = {
        "collateral_value": expected["positions"][0]["collateral_value"],
        "credit_limit": expected["credit_limit"],
        "collateral_ratio": expected["collateral_ratio"],
        "call_amount": expected["margin_call"]["call_amount"],
    }
    for name, half_even in vector["round_half_even"].items():
        assert abs(Decimal(half_even) - Decimal(stated[name])) == quantum, name


# --- every case against the SDK -------------------------------------------------------


@pytest.mark.parametrize("vector", VALUATION["valuations"], ids=ids_of(VALUATION["valuations"]))
def test_valuation_vector(vector: dict[str, Any]) -> None:
    assert _figures(vector) == vector["expected"]


@pytest.mark.parametrize("vector", VALUATION["invalid"], ids=ids_of(VALUATION["invalid"]))
def test_invalid_valuation_vector(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    with pytest.raises(CollateralSyncError) as refused:
        _figures(vector)
    assert refused.value.reason_name == expected["reason"], refused.value.message
    assert refused.value.code.name == expected["grpc_status"]
    assert refused.value.metadata["field"] == expected["field"]


def _recomputed(check: Any, vector: dict[str, Any]) -> dict[str, Any]:
    try:
        result = check(
            _envelope(vector),
            _registry(),
            audience=vector["verifier_party_id"],
            now=_datetime(vector["now"]),
        )
    except CollateralSyncError as error:
        return {
            "valid": False,
            "reason": error.reason_name,
            "grpc_status": error.code.name,
            "metadata": dict(error.metadata),
        }
    figures: dict[str, Any] = {
        "valid": True,
        "collateral_value": _text(result.collateral_value),
        "collateral_ratio": None
        if result.collateral_ratio is None
        else _text(result.collateral_ratio),
    }
    if hasattr(result, "call_amount"):
        figures["call_amount"] = _text(result.call_amount)
        figures["due_by"] = result.margin_call.due_by.ToJsonString()
    else:
        figures["amount"] = _text(result.amount)
    return figures


@pytest.mark.parametrize("vector", VALUATION["margin_calls"], ids=ids_of(VALUATION["margin_calls"]))
def test_margin_call_vector(vector: dict[str, Any]) -> None:
    assert _recomputed(recompute_margin_call, vector) == vector["expected"]


@pytest.mark.parametrize(
    "vector",
    VALUATION["liquidation_instructions"],
    ids=ids_of(VALUATION["liquidation_instructions"]),
)
def test_liquidation_instruction_vector(vector: dict[str, Any]) -> None:
    assert _recomputed(recompute_liquidation_instruction, vector) == vector["expected"]


@pytest.mark.parametrize(
    "vector",
    VALUATION["pledge_release_consents"],
    ids=ids_of(VALUATION["pledge_release_consents"]),
)
def test_pledge_release_consent_vector(vector: dict[str, Any]) -> None:
    try:
        result = recompute_pledge_release_consent(
            _envelope(vector),
            _registry(),
            audience=vector["verifier_party_id"],
            now=_datetime(vector["now"]),
        )
    except CollateralSyncError as error:
        outcome: dict[str, Any] = {
            "valid": False,
            "reason": error.reason_name,
            "grpc_status": error.code.name,
            "metadata": dict(error.metadata),
        }
    else:
        judged = result.judgement
        ratio = judged.collateral_ratio_after
        outcome = {
            "valid": True,
            "collateral_value_after": _text(judged.collateral_value_after),
            "credit_limit_after": _text(judged.credit_limit_after),
            "collateral_ratio_after": None if ratio is None else _text(ratio),
        }
    assert outcome == vector["expected"]
