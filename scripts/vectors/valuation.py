"""vectors/valuation.json: valuation, credit, margin-call and liquidation figures (§7-§9).

Each case gives the inputs of §7.2 as the spec names them (the risk policy as proto3
JSON, positions, price quotes, the valuation time, the exposure; for a liquidation the
proceeds and the auto-deleveraging candidates) and the figures they determine; invalid
inputs must be refused with their reason. Margin calls and liquidation instructions are
signed statements embedding their signed inputs, to recompute (§8.2, §9.2).

The expected figures are computed here with the Python SDK's own functions
(collateral_sync.valuation), never typed in by hand; the figures of the worked example
of §7.4 are also checked against the document when the file is built. The TypeScript
SDK, written from the document, checks every case (sdk/typescript/test/valuation.test.ts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Context, Decimal, Inexact, InvalidOperation
from typing import Any

from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    liquidation_pb2,
    margin_pb2,
    pledge_release_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    AdlCandidate,
    allocate_shortfall,
    credit_line_figures,
    judge_release,
    liquidation_amount,
    liquidation_shortfall,
    margin_call_amount,
    recompute_liquidation_instruction,
    recompute_margin_call,
    recompute_pledge_release_consent,
    value_collateral,
)
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from ._common import (
    CLIENT_ID,
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    MAX_SKEW_SECONDS,
    NOW,
    TTL,
    NamedKey,
    decimal,
    envelope_json,
    rfc3339,
    status,
    timestamp,
)

__all__ = ["valuation_file"]

_CLASS = common_pb2.AssetClass
_MMF = _CLASS.ASSET_CLASS_TOKENIZED_MMF
_STABLE = _CLASS.ASSET_CLASS_STABLECOIN
_ETF = _CLASS.ASSET_CLASS_TOKENIZED_ETF
_STOCK = _CLASS.ASSET_CLASS_TOKENIZED_SINGLE_STOCK
_CRYPTO = _CLASS.ASSET_CLASS_CRYPTO
_UNSPECIFIED = _CLASS.ASSET_CLASS_UNSPECIFIED
_ZERO_RULE = valuation_pb2.STALE_PRICE_RULE_ZERO
_LAST_PRICE = valuation_pb2.STALE_PRICE_RULE_LAST_PRICE
_PROFIT_TIMES_LEVERAGE = valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE

#: The valuation time of every case: the issued_at of the statement publishing the figures.
VALUED_AT = ISSUED
_FRESH = VALUED_AT - timedelta(minutes=2)
_PRICE_SOURCE = "exchange-index"
_ACCOUNT = "acct-0001"

#: Enough digits for every exact figure (§2.3); quantize never rounds silently here.
_TEXT_CONTEXT = Context(prec=2000, traps=[Inexact, InvalidOperation])


def _text(value: Decimal) -> str:
    """Exact plain decimal text: no exponent, no trailing fraction zeros, zero as "0".

    Canonical (§2.1) whenever the value has at most 18 fraction digits; a price counted
    or a market value may have up to 36, written out in full.
    """
    if value == 0:
        return "0"
    return format(value.normalize(context=_TEXT_CONTEXT), "f")


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _stamp(value: datetime, nanos: int = 0) -> timestamp_pb2.Timestamp:
    """``value`` moved by ``nanos`` nanoseconds (a Timestamp carries nanoseconds)."""
    stamp = timestamp(value)
    total = stamp.seconds * 1_000_000_000 + stamp.nanos + nanos
    return timestamp_pb2.Timestamp(seconds=total // 1_000_000_000, nanos=total % 1_000_000_000)


# --- policies ------------------------------------------------------------------------

#: One asset class haircut, asset override or cap: (class, factor) / (asset, class, factor).
_ClassFigure = tuple[int, str | None]
_AssetFigure = tuple[str, int, str | None]


def _policy(
    *,
    haircuts: Sequence[_ClassFigure] = ((_MMF, "0.98"), (_STABLE, "0.95"), (_ETF, "0.85")),
    asset_haircuts: Sequence[_AssetFigure] = (),
    caps: Sequence[_ClassFigure] = (),
    assets: Sequence[tuple[str, int]] = (("BENJI", _MMF), ("USDC", _STABLE), ("SPY-T", _ETF)),
    leverage_cap: str | None = "2",
    maintenance_ratio: str | None = "0.5",
    liquidation_ratio: str | None = "0.4",
    insurance_fund_balance: str | None = "1000000",
    rounding_scale: int = 2,
    max_price_age: duration_pb2.Duration | None = None,
    stale_price_rule: int = _LAST_PRICE,
    stale_price_factor: str | None = "0.9",
    auto_deleveraging_rule: int = _PROFIT_TIMES_LEVERAGE,
    version: int = 3,
    custodian_staleness_window: duration_pb2.Duration | None = None,
) -> valuation_pb2.RiskPolicy:
    """A risk policy of the pilot's shape; every figure can be replaced (None: absent)."""

    def optional(text: str | None) -> common_pb2.Decimal | None:
        return None if text is None else decimal(text)

    return valuation_pb2.RiskPolicy(
        version=version,
        effective_from=timestamp(VALUED_AT - timedelta(days=1)),
        haircuts=[
            valuation_pb2.AssetClassHaircut(
                asset_class=asset_class,  # type: ignore[arg-type]
                collateral_factor=optional(factor),
            )
            for asset_class, factor in haircuts
        ],
        asset_haircuts=[
            valuation_pb2.AssetHaircut(
                asset_id=asset_id,
                asset_class=asset_class,  # type: ignore[arg-type]
                collateral_factor=optional(factor),
            )
            for asset_id, asset_class, factor in asset_haircuts
        ],
        concentration_caps=[
            valuation_pb2.ConcentrationCap(
                asset_class=asset_class,  # type: ignore[arg-type]
                max_share=optional(share),
            )
            for asset_class, share in caps
        ],
        leverage_cap=optional(leverage_cap),
        maintenance_ratio=optional(maintenance_ratio),
        liquidation_ratio=optional(liquidation_ratio),
        cure_period=_duration(timedelta(hours=24)),
        insurance_fund_balance=optional(insurance_fund_balance),
        valuation_currency="USD",
        auto_deleveraging_rule=auto_deleveraging_rule,  # type: ignore[arg-type]
        max_price_age=max_price_age or _duration(timedelta(minutes=5)),
        stale_price_rule=stale_price_rule,  # type: ignore[arg-type]
        rounding_scale=rounding_scale,
        max_settlement_cycles_per_day=2,
        settlement_dispute_window=_duration(timedelta(hours=24)),
        emergency_release_wait=_duration(timedelta(hours=48)),
        price_source=_PRICE_SOURCE,
        stale_price_factor=optional(stale_price_factor),
        assets=[
            common_pb2.Asset(asset_id=asset_id, asset_class=asset_class)  # type: ignore[arg-type]
            for asset_id, asset_class in assets
        ],
        custodian_staleness_window=custodian_staleness_window,
    )


def _worked_example_policy() -> valuation_pb2.RiskPolicy:
    """The pilot's seed policy of §7.4 (no per-asset override)."""
    return _policy(
        haircuts=((_MMF, "0.98"), (_STABLE, "0.95"), (_ETF, "0.85"), (_STOCK, "0.6")),
        caps=((_ETF, "0.4"), (_STOCK, "0.1")),
        assets=(("BENJI", _MMF), ("USDC", _STABLE), ("SPY-T", _ETF), ("AAPL-T", _STOCK)),
    )


# --- inputs ------------------------------------------------------------------------

#: asset_id, quantity, locked_quantity, pledged_quantity (None: the Decimal is absent).
_PositionRow = tuple[str, str | None, str | None, str | None]
#: asset_id, price (None: absent), observed_at (None: unset).
_QuoteRow = tuple[str, str | None, timestamp_pb2.Timestamp | None]


def _positions(rows: Sequence[_PositionRow]) -> list[common_pb2.Position]:
    positions = []
    for asset_id, *amounts in rows:
        position = common_pb2.Position(account_id=_ACCOUNT, asset_id=asset_id)
        for name, text in zip(
            ("quantity", "locked_quantity", "pledged_quantity"), amounts, strict=True
        ):
            if text is not None:
                getattr(position, name).CopyFrom(decimal(text))
        positions.append(position)
    return positions


def _quotes(rows: Sequence[_QuoteRow]) -> list[valuation_pb2.PriceQuote]:
    quotes = []
    for asset_id, price, observed_at in rows:
        quote = valuation_pb2.PriceQuote(asset_id=asset_id, source=_PRICE_SOURCE)
        if price is not None:
            quote.price.CopyFrom(decimal(price))
        if observed_at is not None:
            quote.observed_at.CopyFrom(observed_at)
        quotes.append(quote)
    return quotes


def _fresh(*rows: tuple[str, str]) -> list[_QuoteRow]:
    return [(asset_id, price, _stamp(_FRESH)) for asset_id, price in rows]


@dataclass(frozen=True)
class _Liquidation:
    """What a liquidation case adds: the proceeds raised and the exchange's ADL candidates."""

    proceeds: str
    #: account_id, profit, effective_leverage.
    candidates: Sequence[tuple[str, str, str]] = ()


@dataclass(frozen=True)
class _Case:
    id: str
    clause: str
    description: str
    policy: valuation_pb2.RiskPolicy
    positions: Sequence[_PositionRow]
    prices: Sequence[_QuoteRow]
    exposure: str
    asset_classes: Mapping[str, int] = field(default_factory=dict)
    valued_at: datetime = VALUED_AT
    liquidation: _Liquidation | None = None


def _inputs_json(case: _Case) -> dict[str, Any]:
    return {
        "policy": json_format.MessageToDict(case.policy),
        "asset_classes": {
            asset_id: _CLASS.Name(asset_class)  # type: ignore[arg-type]
            for asset_id, asset_class in case.asset_classes.items()
        },
        "positions": [
            {
                "asset_id": asset_id,
                "quantity": quantity,
                "locked_quantity": locked,
                "pledged_quantity": pledged,
            }
            for asset_id, quantity, locked, pledged in case.positions
        ],
        "prices": [
            {
                "asset_id": asset_id,
                "price": price,
                "observed_at": None if observed_at is None else observed_at.ToJsonString(),
            }
            for asset_id, price, observed_at in case.prices
        ],
        "valued_at": rfc3339(case.valued_at),
        "exposure": case.exposure,
        "liquidation": None
        if case.liquidation is None
        else {
            "proceeds": case.liquidation.proceeds,
            "candidates": [
                {"account_id": account_id, "profit": profit, "effective_leverage": leverage}
                for account_id, profit, leverage in case.liquidation.candidates
            ],
        },
    }


# --- the figures, with the SDK -------------------------------------------------------


def _figures(case: _Case) -> dict[str, Any]:
    """Every figure of ``case`` computed with collateral_sync.valuation (raises if refused)."""
    policy = case.policy
    valuation = value_collateral(
        policy,
        _positions(case.positions),
        _quotes(case.prices),
        asset_classes=dict(case.asset_classes),  # type: ignore[arg-type]
        valued_at=case.valued_at,
    )
    exposure = Decimal(case.exposure)
    credit = credit_line_figures(policy, valuation, exposure)
    call = margin_call_amount(policy, valuation.collateral_value, exposure)
    amount = liquidation_amount(policy, valuation.collateral_value, exposure)
    liquidation: dict[str, Any] = {"due": amount is not None}
    if amount is not None:
        if case.liquidation is None:
            raise AssertionError(f"{case.id}: liquidation due but no proceeds given")
        shortfall = liquidation_shortfall(amount, Decimal(case.liquidation.proceeds))
        allocation: dict[str, Any] | None = None
        if shortfall > 0:
            figures = allocate_shortfall(
                policy,
                shortfall,
                [
                    AdlCandidate(account_id, Decimal(profit), Decimal(leverage))
                    for account_id, profit, leverage in case.liquidation.candidates
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
    elif case.liquidation is not None:
        raise AssertionError(f"{case.id}: proceeds given but no liquidation due")
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


def _refusal(case: _Case) -> dict[str, Any]:
    """The SDK's refusal of ``case``: reason, status and the field it names."""
    try:
        _figures(case)
    except CollateralSyncError as error:
        return {**status(error.reason_name), "field": error.metadata["field"]}
    raise AssertionError(f"{case.id}: the SDK accepted an input that must be refused")


def _vector(case: _Case, expected: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": case.id,
        "clause": case.clause,
        "description": case.description,
        **_inputs_json(case),
        **extra,
        "expected": expected,
    }


# --- valid cases ---------------------------------------------------------------------


def _worked_example() -> _Case:
    return _Case(
        "worked-example",
        "§7.4",
        "The pilot's seed policy and positions of section 7.4: the ETF cap (0.4) binds, the "
        "single-stock cap (0.1) does not, XYZ is unknown; exposure 5200000 gives ratio 0.48 "
        "and a call of 94800, above the liquidation line.",
        _worked_example_policy(),
        [
            ("BENJI", "1000000", "0", "1000000"),
            ("USDC", "500000", "0", "400000"),
            ("SPY-T", "2000", "0", "2000"),
            ("AAPL-T", "1500", "500", "1500"),
            ("XYZ", "100", "0", "100"),
        ],
        _fresh(("AAPL-T", "230"), ("BENJI", "1"), ("SPY-T", "600"), ("USDC", "1"), ("XYZ", "10")),
        "5200000",
    )


def _check_worked_example(figures: dict[str, Any]) -> None:
    """The SDK reproduces the figures section 7.4 prints."""
    values = [p["collateral_value"] for p in figures["positions"]]
    assert values == ["980000", "380000", "1007200", "138000", "0"], values
    assert figures["haircut_total"] == "2518000"
    assert figures["collateral_value"] == "2505200"
    assert figures["credit_limit"] == "5010400"
    assert figures["collateral_ratio"] == "0.48"
    assert figures["margin_call"] == {"due": True, "call_amount": "94800"}
    assert figures["liquidation"] == {"due": False}


def _valid_cases() -> list[_Case]:
    stock_policy = _policy(
        haircuts=((_MMF, "0.98"), (_STABLE, "0.95"), (_ETF, "0.85"), (_STOCK, "0.6")),
        asset_haircuts=(("AAPL-T", _STOCK, "0.55"),),
        assets=(
            ("BENJI", _MMF),
            ("USDC", _STABLE),
            ("SPY-T", _ETF),
            ("TSLA-T", _STOCK),
            ("BTC", _CRYPTO),
        ),
    )
    capped = _policy(
        haircuts=((_MMF, "0.98"), (_STABLE, "0.95"), (_ETF, "0.85"), (_STOCK, "0.6")),
        caps=((_ETF, "0.3"), (_STOCK, "0.04"), (_STABLE, "0.5")),
        assets=(
            ("BENJI", _MMF),
            ("USDC", _STABLE),
            ("SPY-T", _ETF),
            ("QQQ-T", _ETF),
            ("VTI-T", _ETF),
            ("AAPL-T", _STOCK),
        ),
        rounding_scale=4,
    )
    at_share = _policy(caps=((_ETF, "0.25"),))
    # Collateral value 1000.83 for the ratio cases below: RD(1053.4 x 1.0001 x 0.95, 2).
    ratio_positions: list[_PositionRow] = [("USDC", "1100", "46.6", "1100")]
    ratio_prices = _fresh(("USDC", "1.0001"))
    liquidation_policy = _policy(insurance_fund_balance="250000.25")
    waterfall_positions: list[_PositionRow] = [
        ("BENJI", "250000.5", "0", "250000.5"),
        ("USDC", "70000.75", "1000", "69000.25"),
    ]
    waterfall_prices = _fresh(("BENJI", "1.0001"), ("USDC", "0.9998"))
    return [
        _worked_example(),
        _Case(
            "eligible-quantity",
            "§7.3 step 1",
            "Eligible quantity = max(0, min(pledged, quantity - locked)): BENJI pledged less "
            "than quantity - locked (the pledge limits), USDC pledged more than quantity - "
            "locked (the lock limits), SPY-T locked more than held (0), BENJI-B nothing "
            "pledged (0).",
            _policy(
                assets=(("BENJI", _MMF), ("BENJI-B", _MMF), ("USDC", _STABLE), ("SPY-T", _ETF))
            ),
            [
                ("BENJI", "1234.5678", "200.25", "1000.125"),
                ("USDC", "98765.4321", "12345.6789", "90000"),
                ("SPY-T", "10", "12.5", "10"),
                ("BENJI-B", "500", "0", "0"),
            ],
            _fresh(("BENJI", "1.0001"), ("BENJI-B", "1.0001"), ("SPY-T", "601.37"), ("USDC", "1")),
            "123456.78",
        ),
        _Case(
            "missing-price",
            "§7.3 step 3",
            "SPY-T has no quote in the snapshot: it counts price 0 and adds nothing; the quote "
            "for an asset not held (QQQ-T) is unused.",
            _policy(),
            [("BENJI", "1000.5", "0", "1000.5"), ("SPY-T", "25", "0", "25")],
            _fresh(("BENJI", "1.0001"), ("QQQ-T", "480.25")),
            "1500",
        ),
        _Case(
            "stale-price-zero",
            "§7.3 step 3",
            "STALE_PRICE_RULE_ZERO, max_price_age 300 s: USDC observed exactly 300 s before the "
            "valuation time is fresh (t - observed_at = max_price_age is not stale), BENJI "
            "observed 300 s + 1 ns before is stale and counts 0, SPY-T observed after t is "
            "fresh.",
            _policy(stale_price_rule=_ZERO_RULE, stale_price_factor=None),
            [
                ("BENJI", "1000", "0", "1000"),
                ("USDC", "2500.5", "0", "2500.5"),
                ("SPY-T", "3", "0", "3"),
            ],
            [
                ("BENJI", "1.0001", _stamp(VALUED_AT - timedelta(seconds=300), -1)),
                ("USDC", "0.9999", _stamp(VALUED_AT - timedelta(seconds=300))),
                ("SPY-T", "600.125", _stamp(VALUED_AT + timedelta(seconds=1))),
            ],
            "8000",
        ),
        _Case(
            "stale-price-last-price",
            "§7.3 step 3, §7.3 PositionValuation",
            "STALE_PRICE_RULE_LAST_PRICE with factor 0.9: the stale BENJI quote "
            "1.000123456789012347 counts 0.9001111111101111123 (19 fraction digits) and its "
            "market value has more still; on the wire both are cut toward zero to 18 digits. "
            "USDC observed 300 s + 1 ns before is stale too; SPY-T is fresh.",
            _policy(),
            [
                ("BENJI", "1234.567", "0", "1234.567"),
                ("USDC", "1000", "0", "1000"),
                ("SPY-T", "2", "0", "2"),
            ],
            [
                ("BENJI", "1.000123456789012347", _stamp(VALUED_AT - timedelta(hours=2))),
                ("USDC", "1", _stamp(VALUED_AT - timedelta(seconds=300), -1)),
                ("SPY-T", "600.125", _stamp(_FRESH)),
            ],
            "2500",
        ),
        _Case(
            "factor-sources",
            "§7.3 step 2",
            "AAPL-T has its own haircut (0.55, overriding the single-stock class factor 0.6); "
            "TSLA-T is listed as a single stock and takes the class factor 0.6; BTC is listed "
            "as crypto, a class without a haircut (factor 0); XYZ is listed nowhere (unknown: "
            "class ASSET_CLASS_UNSPECIFIED, factor 0).",
            stock_policy,
            [
                ("AAPL-T", "120.5", "0", "120.5"),
                ("TSLA-T", "33.3", "0", "33.3"),
                ("BTC", "0.25", "0", "0.25"),
                ("XYZ", "1000", "0", "1000"),
                ("USDC", "1000", "0", "1000"),
            ],
            _fresh(
                ("AAPL-T", "230.17"),
                ("TSLA-T", "251.33"),
                ("BTC", "67890.12"),
                ("USDC", "1"),
                ("XYZ", "10"),
            ),
            "50000",
        ),
        _Case(
            "asset-classes-from-configuration",
            "§7.2, §7.3 step 2",
            "A policy that lists no assets: the classes of BENJI and SPY-T come from the "
            "arrangement's asset list (asset_classes); XYZ is in neither and is unknown.",
            _policy(assets=()),
            [
                ("BENJI", "1000", "0", "1000"),
                ("SPY-T", "3", "0", "3"),
                ("XYZ", "50", "0", "50"),
            ],
            _fresh(("BENJI", "1"), ("SPY-T", "600.125"), ("XYZ", "10")),
            "4000",
            asset_classes={"BENJI": _MMF, "SPY-T": _ETF},
        ),
        _Case(
            "concentration-caps",
            "§7.3 steps 5-7",
            "Caps against the uncapped total T, once: the ETF class (three positions) is above "
            "0.3 x T and each of its positions becomes RD(w x (0.3 x T) / V_ETF, 4), a quotient "
            "that does not terminate; the single-stock cap 0.04 binds too; the stablecoin cap "
            "0.5 does not bind; the reduced total is not capped again.",
            capped,
            [
                ("BENJI", "10000", "0", "10000"),
                ("SPY-T", "7", "0", "7"),
                ("QQQ-T", "11", "0", "11"),
                ("VTI-T", "13", "0", "13"),
                ("AAPL-T", "9", "0", "9"),
                ("USDC", "3333.33", "0", "3333.33"),
            ],
            _fresh(
                ("AAPL-T", "230.17"),
                ("BENJI", "1.0001"),
                ("QQQ-T", "480.25"),
                ("SPY-T", "600.125"),
                ("USDC", "1"),
                ("VTI-T", "290.01"),
            ),
            "20000",
        ),
        _Case(
            "cap-at-exactly-its-share",
            "§7.3 step 5",
            "The ETF class is exactly 0.25 x T: a class is capped only if V_c > max_share x T, "
            "so nothing is removed (at this boundary the capped figure w x (0.25 x T) / V_c "
            "would equal w anyway).",
            at_share,
            [("BENJI", "3000", "0", "3000"), ("SPY-T", "1.225", "0", "1.225")],
            _fresh(("BENJI", "0.85"), ("SPY-T", "800")),
            "1000",
        ),
        _Case(
            "rounding-down-and-up",
            "§2.3, §7.3 steps 6, 8-10",
            "rounding_scale 3: the exact haircut value 1234.5675 counts 1234.567, the credit "
            "limit 3086.4175 is 3086.417, the ratio 0.49999...95 is 0.499 (a call, although "
            "half-even would give 0.5 and no call) and the call amount 0.0011 is 0.002; "
            "round_half_even shows each figure rounded half-even instead, one quantum away.",
            _policy(
                haircuts=((_STABLE, "1"),),
                leverage_cap="2.5",
                maintenance_ratio="0.5",
                liquidation_ratio="0.25",
                rounding_scale=3,
            ),
            [("USDC", "493.827", "0", "493.827")],
            _fresh(("USDC", "2.5")),
            "2469.1362",
        ),
        _Case(
            "exposure-zero",
            "§7.3 step 9",
            "Exposure 0: a credit limit, but no collateral ratio (null), no margin call and no "
            "liquidation.",
            _policy(),
            [("BENJI", "1000.5", "0", "1000.5")],
            _fresh(("BENJI", "1.0001")),
            "0",
        ),
        _Case(
            "ratio-at-maintenance",
            "§7.3 step 10, §8.2",
            "Collateral value 1000.83 against exposure 2001.66: the ratio is exactly 0.5, the "
            "maintenance ratio, so no margin call is due.",
            _policy(),
            ratio_positions,
            ratio_prices,
            "2001.66",
        ),
        _Case(
            "ratio-one-quantum-below-maintenance",
            "§7.3 step 10, §8.2",
            "The same collateral against exposure 2001.67: the ratio 0.49999... counts 0.49, "
            "one quantum below the maintenance ratio, so a call of RU(1000.835 - 1000.83, 2) = "
            "0.01 is due.",
            _policy(),
            ratio_positions,
            ratio_prices,
            "2001.67",
        ),
        _Case(
            "ratio-at-liquidation-line",
            "§7.3 steps 10-11, §9.2",
            "The same collateral against exposure 2502.075: the ratio is exactly 0.4, the "
            "liquidation ratio: a margin call is due, a liquidation is not.",
            _policy(),
            ratio_positions,
            ratio_prices,
            "2502.075",
        ),
        _Case(
            "liquidation-shortfall-waterfall",
            "§9.2, §9.4, §9.5",
            "Ratio 0.31 < 0.4: the whole exposure 1000000.5 is to be raised; proceeds "
            "412345.678 leave a shortfall the insurance fund (250000.25) covers in part, and "
            "the rest is auto-deleveraged: scores profit x effective leverage, exact, highest "
            "first; four accounts tie at 2500 and are ordered by their UTF-8 bytes (acct-B < "
            "acct-a < acct-\uff21 < acct-\U0001f600, which UTF-16 order would swap at the "
            "end); a negative score ranks below zero, and -3.5 x 0 ties with 0 x 7.",
            liquidation_policy,
            waterfall_positions,
            waterfall_prices,
            "1000000.5",
            liquidation=_Liquidation(
                "412345.678",
                (
                    ("acct-0007", "-1234.56", "1.5"),
                    ("acct-\U0001f600", "1250", "2"),
                    ("acct-a", "500", "5"),
                    ("acct-0042", "12500.5", "3.25"),
                    ("acct-0100", "0", "7"),
                    ("acct-\uff21", "250", "10"),
                    ("acct-0500", "0.123456789012345678", "1.25"),
                    ("acct-B", "1000", "2.5"),
                    ("acct-0099", "-3.5", "0"),
                ),
            ),
        ),
        _Case(
            "liquidation-negative-scores-toward-zero",
            "§9.5",
            "Auto-deleveraging scores with more than 18 fraction digits, on the wire rounded "
            "toward zero (not down): -0.123456789012345679 x 1.5 = -0.1851851835185185185 is "
            "-0.185185183518518518 (rounding down would give ...519), -0.000000000000000001 x "
            "0.5 = -0.0000000000000000005 is 0 (down: -0.000000000000000001) and the positive "
            "0.1851851835185185185 is 0.185185183518518518; 0 x 3 ranks above -5e-19 although "
            "both are 0 on the wire, as the order comes from the exact scores.",
            liquidation_policy,
            waterfall_positions,
            waterfall_prices,
            "1000000.5",
            liquidation=_Liquidation(
                "412345.678",
                (
                    ("acct-0200", "-0.123456789012345679", "1.5"),
                    ("acct-0201", "-0.000000000000000001", "0.5"),
                    ("acct-0202", "0.123456789012345679", "1.5"),
                    ("acct-0203", "0", "3"),
                ),
            ),
        ),
        _Case(
            "liquidation-fund-covers-shortfall",
            "§9.5",
            "A shortfall of 100.5 within the insurance fund: it covers all of it, nothing is "
            "auto-deleveraged and the ranking is empty although there are candidates.",
            liquidation_policy,
            waterfall_positions,
            waterfall_prices,
            "1000000.5",
            liquidation=_Liquidation("999900", (("acct-0042", "12500.5", "3.25"),)),
        ),
        _Case(
            "liquidation-without-shortfall",
            "§9.4, §9.5",
            "Proceeds above the amount to raise: the shortfall is 0 (never negative) and there "
            "is no shortfall allocation (null).",
            liquidation_policy,
            waterfall_positions,
            waterfall_prices,
            "1000000.5",
            liquidation=_Liquidation("1000000.75"),
        ),
    ]


def _half_even(case: _Case, figures: dict[str, Any]) -> dict[str, str]:
    """What the rounded figures of ``case`` would be under round-half-even (informative)."""
    policy = case.policy
    scale = policy.rounding_scale
    quantum = Decimal(1).scaleb(-scale)
    context = Context(prec=2000, rounding=ROUND_HALF_EVEN)

    def half_even(value: Decimal) -> str:
        return _text(value.quantize(quantum, context=context))

    [position] = figures["positions"]
    value = Decimal(figures["collateral_value"])
    exposure = Decimal(case.exposure)
    leverage = Decimal(policy.leverage_cap.value)
    maintenance = Decimal(policy.maintenance_ratio.value)
    return {
        "collateral_value": half_even(Decimal(position["haircut_value"])),
        "credit_limit": half_even(value * leverage),
        "collateral_ratio": half_even(context.divide(value, exposure)),
        "call_amount": half_even(exposure * maintenance - value),
    }


def _valuation_vectors() -> list[dict[str, Any]]:
    vectors = []
    for case in _valid_cases():
        figures = _figures(case)
        extra: dict[str, Any] = {}
        if case.id == "worked-example":
            _check_worked_example(figures)
        if case.id == "rounding-down-and-up":
            extra["round_half_even"] = _half_even(case, figures)
        vectors.append(_vector(case, figures, **extra))
    return vectors


# --- invalid cases -------------------------------------------------------------------


def _invalid_cases() -> list[_Case]:
    positions: list[_PositionRow] = [
        ("BENJI", "1000", "0", "1000"),
        ("USDC", "2500.5", "0", "2500"),
    ]
    prices = _fresh(("BENJI", "1.0001"), ("USDC", "1"))
    waterfall = _Liquidation("100", (("acct-0042", "12500.5", "3.25"), ("acct-0007", "10", "2")))

    def policy_case(case_id: str, clause: str, description: str, **changes: Any) -> _Case:
        return _Case(case_id, clause, description, _policy(**changes), positions, prices, "5000")

    def input_case(
        case_id: str,
        clause: str,
        description: str,
        *,
        rows: Sequence[_PositionRow] = positions,
        quotes: Sequence[_QuoteRow] = prices,
        exposure: str = "5000",
        liquidation: _Liquidation | None = None,
    ) -> _Case:
        return _Case(
            case_id, clause, description, _policy(), rows, quotes, exposure, liquidation=liquidation
        )

    return [
        policy_case(
            "policy/liquidation-above-maintenance",
            "§7.1",
            "liquidation_ratio 0.55 above maintenance_ratio 0.5.",
            liquidation_ratio="0.55",
        ),
        policy_case(
            "policy/factor-above-one",
            "§7.1",
            "A class collateral_factor of 1.05 (factors are in [0, 1]).",
            haircuts=((_MMF, "0.98"), (_STABLE, "1.05")),
        ),
        policy_case(
            "policy/override-factor-above-one",
            "§7.1",
            "A per-asset collateral_factor of 1.000000000000000001.",
            asset_haircuts=(("AAPL-T", _STOCK, "1.000000000000000001"),),
        ),
        policy_case(
            "policy/cap-above-one",
            "§7.1",
            "A concentration cap max_share of 1.5.",
            caps=((_ETF, "1.5"),),
        ),
        policy_case(
            "policy/stale-factor-above-one",
            "§7.1",
            "stale_price_factor 1.1 under LAST_PRICE.",
            stale_price_factor="1.1",
        ),
        policy_case(
            "policy/non-canonical-factor",
            "§2.1, §7.1",
            "A collateral_factor written '0.950' (trailing zero).",
            haircuts=((_MMF, "0.98"), (_STABLE, "0.950")),
        ),
        policy_case(
            "policy/non-canonical-leverage-cap",
            "§2.1, §7.1",
            "leverage_cap written '+2'.",
            leverage_cap="+2",
        ),
        policy_case(
            "policy/negative-insurance-fund",
            "§2.2, §7.1",
            "insurance_fund_balance -1.",
            insurance_fund_balance="-1",
        ),
        policy_case(
            "policy/negative-liquidation-ratio",
            "§2.2, §7.1",
            "liquidation_ratio -0.1.",
            liquidation_ratio="-0.1",
        ),
        policy_case(
            "policy/leverage-cap-zero",
            "§7.1",
            "leverage_cap 0 (it must be > 0).",
            leverage_cap="0",
        ),
        policy_case(
            "policy/leverage-cap-absent",
            "§2.1, §7.1",
            "No leverage_cap: a required Decimal that is absent.",
            leverage_cap=None,
        ),
        policy_case(
            "policy/ratio-finer-than-scale",
            "§7.1",
            "maintenance_ratio 0.505 with rounding_scale 2: the ratios may have at most "
            "rounding_scale fraction digits.",
            maintenance_ratio="0.505",
        ),
        policy_case(
            "policy/rounding-scale-19",
            "§2.3, §7.1",
            "rounding_scale 19 (at most 18).",
            rounding_scale=19,
        ),
        policy_case(
            "policy/stale-rule-unspecified",
            "§7.1",
            "stale_price_rule STALE_PRICE_RULE_UNSPECIFIED.",
            stale_price_rule=valuation_pb2.STALE_PRICE_RULE_UNSPECIFIED,
        ),
        policy_case(
            "policy/last-price-without-factor",
            "§7.1",
            "STALE_PRICE_RULE_LAST_PRICE with no stale_price_factor.",
            stale_price_factor=None,
        ),
        policy_case(
            "policy/adl-rule-unspecified",
            "§7.1",
            "auto_deleveraging_rule AUTO_DELEVERAGING_RULE_UNSPECIFIED.",
            auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_UNSPECIFIED,
        ),
        policy_case(
            "policy/duplicate-class-haircut",
            "§7.1",
            "Two haircuts for the stablecoin class.",
            haircuts=((_STABLE, "0.95"), (_MMF, "0.98"), (_STABLE, "0.9")),
        ),
        policy_case(
            "policy/duplicate-asset-override",
            "§7.1",
            "Two per-asset haircuts for AAPL-T.",
            asset_haircuts=(("AAPL-T", _STOCK, "0.55"), ("AAPL-T", _STOCK, "0.5")),
        ),
        policy_case(
            "policy/cap-class-unspecified",
            "§7.1",
            "A concentration cap for ASSET_CLASS_UNSPECIFIED.",
            caps=((_UNSPECIFIED, "0.5"),),
        ),
        policy_case(
            "policy/negative-max-price-age",
            "§7.1",
            "max_price_age of -5 s.",
            max_price_age=duration_pb2.Duration(seconds=-5),
        ),
        policy_case(
            "policy/zero-custodian-staleness-window",
            "§7.1, §11.2",
            "custodian_staleness_window present and zero (absent means 300 s; present, it must "
            "be positive).",
            custodian_staleness_window=duration_pb2.Duration(),
        ),
        policy_case(
            "policy/negative-custodian-staleness-window",
            "§7.1, §11.2",
            "custodian_staleness_window of -1 ns.",
            custodian_staleness_window=duration_pb2.Duration(nanos=-1),
        ),
        input_case(
            "prices/two-quotes-for-one-asset",
            "§7.2",
            "Two quotes for BENJI in one snapshot.",
            quotes=[*prices, ("BENJI", "1.0002", _stamp(_FRESH))],
        ),
        input_case(
            "prices/observed-at-unset",
            "§7.2",
            "A quote without observed_at.",
            quotes=[("BENJI", "1.0001", None), ("USDC", "1", _stamp(_FRESH))],
        ),
        input_case(
            "prices/negative-price",
            "§2.2, §7.2",
            "A quote with price -1.",
            quotes=_fresh(("BENJI", "-1"), ("USDC", "1")),
        ),
        input_case(
            "prices/non-canonical-price",
            "§2.1",
            "A quote with price '1.0' (trailing zero).",
            quotes=_fresh(("BENJI", "1.0001"), ("USDC", "1.0")),
        ),
        input_case(
            "positions/non-canonical-quantity",
            "§2.1",
            "A quantity written '1000.50'.",
            rows=[("BENJI", "1000.50", "0", "1000")],
        ),
        input_case(
            "positions/negative-locked-quantity",
            "§2.2, §7.2",
            "locked_quantity -1.",
            rows=[("BENJI", "1000", "-1", "1000")],
        ),
        input_case(
            "positions/pledged-quantity-absent",
            "§2.1",
            "A position without pledged_quantity: a required Decimal that is absent.",
            rows=[("BENJI", "1000", "0", None)],
        ),
        input_case(
            "positions/empty-asset-id",
            "§7.2",
            "A position whose asset_id is empty.",
            rows=[("BENJI", "1000", "0", "1000"), ("", "1", "0", "1")],
        ),
        input_case(
            "exposure/negative",
            "§2.2, §7.2",
            "Exposure -0.01.",
            exposure="-0.01",
        ),
        input_case(
            "shortfall/duplicate-candidate",
            "§9.5",
            "A liquidation whose ADL candidates name acct-0042 twice.",
            exposure="1000000",
            liquidation=_Liquidation(
                "100",
                (
                    ("acct-0042", "12500.5", "3.25"),
                    ("acct-0007", "10", "2"),
                    ("acct-0042", "1", "1"),
                ),
            ),
        ),
        input_case(
            "shortfall/negative-effective-leverage",
            "§9.5",
            "An ADL candidate with effective leverage -2 (profit may be negative, leverage not).",
            exposure="1000000",
            liquidation=_Liquidation("100", (("acct-0042", "12500.5", "-2"),)),
        ),
        input_case(
            "shortfall/negative-proceeds",
            "§9.4",
            "Liquidation proceeds of -100.",
            exposure="1000000",
            liquidation=_Liquidation("-100", waterfall.candidates),
        ),
    ]


def _invalid_vectors() -> list[dict[str, Any]]:
    return [_vector(case, _refusal(case)) for case in _invalid_cases()]


# --- signed margin calls and liquidation instructions --------------------------------

_CALL_ID = "margin-call-acct-0001-0002"
_INSTRUCTION_ID = "liquidation-acct-0001-0002"
_PATH_ID = "path-acct-0001-v1"
_CALL_POLICY_VERSION = 4


def _sign(
    message: Any,
    signer: SigningKey,
    audience: Sequence[str],
    sequence: int,
    statement_id: str,
    *,
    issued_at: datetime,
) -> envelope_pb2.Envelope:
    return sign_statement(
        message,
        signer,
        audience=audience,
        sequence=sequence,
        ttl=TTL,
        issued_at=issued_at,
        statement_id=statement_id,
    )


@dataclass(frozen=True)
class _SignedInputs:
    inputs: valuation_pb2.ValuationInputs
    policy: valuation_pb2.RiskPolicy
    positions: list[common_pb2.Position]
    prices: list[valuation_pb2.PriceQuote]


def _signed_inputs(keys: dict[str, NamedKey]) -> _SignedInputs:
    """The policy, two holdings statements (epoch 5 first, then epoch 4) and a snapshot."""
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    policy = _policy(
        haircuts=((_MMF, "0.98"), (_STABLE, "0.95"), (_ETF, "0.85"), (_STOCK, "0.6")),
        asset_haircuts=(("AAPL-T", _STOCK, "0.55"),),
        caps=((_ETF, "0.4"), (_STOCK, "0.1")),
        assets=(("BENJI", _MMF), ("USDC", _STABLE), ("SPY-T", _ETF)),
        version=_CALL_POLICY_VERSION,
    )
    older: list[_PositionRow] = [("BENJI", "1000000", "0", "1000000")]
    latest: list[_PositionRow] = [
        ("BENJI", "800000.125", "0", "800000.125"),
        ("USDC", "150000.37", "2500", "150000"),
        ("SPY-T", "1500.5", "0", "1500.5"),
        ("AAPL-T", "310", "10", "300"),
    ]
    quotes = [
        ("AAPL-T", "230.17", _stamp(_FRESH)),
        ("BENJI", "1.0001", _stamp(_FRESH)),
        # Stale at the call's issued_at: it counts 600.125 x 0.9 under LAST_PRICE.
        ("SPY-T", "600.125", _stamp(VALUED_AT - timedelta(minutes=20))),
        ("USDC", "0.9998", _stamp(_FRESH)),
    ]

    def holdings(epoch: int, rows: Sequence[_PositionRow]) -> attestation_pb2.HoldingsStatement:
        return attestation_pb2.HoldingsStatement(
            account_id=_ACCOUNT,
            exchange_id=EXCHANGE_ID,
            epoch=epoch,
            positions=_positions(rows),
            reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
        )

    policy_envelope = _sign(
        policy,
        exchange,
        ["*"],
        _CALL_POLICY_VERSION,
        f"risk-policy-{_CALL_POLICY_VERSION}",
        issued_at=VALUED_AT - timedelta(minutes=30),
    )
    older_envelope = _sign(
        holdings(4, older),
        custodian,
        [EXCHANGE_ID],
        11,
        "holdings-acct-0001-epoch-4",
        issued_at=VALUED_AT - timedelta(minutes=20),
    )
    latest_envelope = _sign(
        holdings(5, latest),
        custodian,
        [EXCHANGE_ID],
        12,
        "holdings-acct-0001-epoch-5",
        issued_at=VALUED_AT - timedelta(minutes=10),
    )
    snapshot_envelope = _sign(
        valuation_pb2.PriceSnapshot(prices=_quotes(quotes)),
        exchange,
        ["*"],
        130,
        "price-snapshot-130",
        issued_at=VALUED_AT - timedelta(minutes=1),
    )
    return _SignedInputs(
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=policy_envelope,
            holdings_statements=[latest_envelope, older_envelope],
            price_snapshot=snapshot_envelope,
        ),
        policy=policy,
        positions=_positions(latest),
        prices=_quotes(quotes),
    )


def _statement_vector(
    vector_id: str,
    clause: str,
    description: str,
    envelope: envelope_pb2.Envelope,
    *,
    stated: dict[str, str],
    expected: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": vector_id,
        "clause": clause,
        "description": description,
        "verifier_party_id": CUSTODIAN_ID,
        "now": rfc3339(NOW),
        "envelope": envelope_json(envelope),
        "envelope_hex": envelope.SerializeToString(deterministic=True).hex(),
        "stated": stated,
        "expected": expected,
    }


def _checked(check: Any, registry: KeyRegistry, envelope: envelope_pb2.Envelope) -> dict[str, Any]:
    """The outcome of recomputing ``envelope`` with the SDK: its figures, or its refusal."""
    try:
        result = check(envelope, registry, audience=CUSTODIAN_ID, now=NOW)
    except CollateralSyncError as error:
        return {**status(error.reason_name), "metadata": dict(error.metadata)}
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


def _margin_call_vectors(
    keys: dict[str, NamedKey], registry: KeyRegistry, signed: _SignedInputs
) -> list[dict[str, Any]]:
    exchange = keys["exchange"].key
    policy = signed.policy
    scale = policy.rounding_scale
    quantum = Decimal(1).scaleb(-scale)
    valuation = value_collateral(policy, signed.positions, signed.prices, valued_at=VALUED_AT)
    exposure = Decimal("3500000.5")
    credit = credit_line_figures(policy, valuation, exposure)
    call_amount = margin_call_amount(policy, valuation.collateral_value, exposure)
    assert call_amount is not None
    assert credit.collateral_ratio is not None

    def call(
        statement_id: str, sequence: int, ratio: Decimal, amount: Decimal
    ) -> tuple[envelope_pb2.Envelope, dict[str, str]]:
        stated = {
            "exposure": _text(exposure),
            "collateral_value": _text(valuation.collateral_value),
            "collateral_ratio": _text(ratio),
            "call_amount": _text(amount),
            "due_by": rfc3339(VALUED_AT + timedelta(hours=24)),
        }
        message = margin_pb2.MarginCall(
            margin_call_id=statement_id,
            account_id=_ACCOUNT,
            inputs=signed.inputs,
            risk_policy_version=policy.version,
            exposure=decimal(stated["exposure"]),
            collateral_value=decimal(stated["collateral_value"]),
            collateral_ratio=decimal(stated["collateral_ratio"]),
            call_amount=decimal(stated["call_amount"]),
            due_by=timestamp(VALUED_AT + timedelta(hours=24)),
        )
        envelope = _sign(
            message, exchange, [CUSTODIAN_ID], sequence, statement_id, issued_at=VALUED_AT
        )
        return envelope, stated

    cases = [
        (
            "margin-call/valid",
            "§8.2",
            "A margin call whose figures are the ones its signed inputs give: the latest of two "
            "holdings statements (epoch 5, listed first) valued at the call's issued_at, one "
            "quote stale under LAST_PRICE, the ETF cap binding.",
            call(_CALL_ID, 21, credit.collateral_ratio, call_amount),
        ),
        (
            "margin-call/call-amount-one-quantum-high",
            "§8.2",
            "The same call with a call_amount one quantum (0.01) above the recomputed one: "
            "refused with PROOF_INVALID naming call_amount, the recomputed figure as expected "
            "and the stated one as actual.",
            call(_CALL_ID + "-b", 22, credit.collateral_ratio, call_amount + quantum),
        ),
        (
            "margin-call/ratio-rounded-up",
            "§8.2, §2.3",
            "The same call with the collateral ratio rounded up instead of down (one quantum "
            "above): refused with PROOF_INVALID naming collateral_ratio.",
            call(_CALL_ID + "-c", 23, credit.collateral_ratio + quantum, call_amount),
        ),
    ]
    return [
        _statement_vector(
            vector_id,
            clause,
            description,
            envelope,
            stated=stated,
            expected=_checked(recompute_margin_call, registry, envelope),
        )
        for vector_id, clause, description, (envelope, stated) in cases
    ]


def _liquidation_instruction_vectors(
    keys: dict[str, NamedKey], registry: KeyRegistry, signed: _SignedInputs
) -> list[dict[str, Any]]:
    exchange = keys["exchange"].key

    def instruction(
        statement_id: str, sequence: int, amount: str
    ) -> tuple[envelope_pb2.Envelope, dict[str, str]]:
        message = liquidation_pb2.LiquidationInstruction(
            liquidation_id=statement_id,
            account_id=_ACCOUNT,
            amount=decimal(amount),
            liquidation_path_id=_PATH_ID,
            inputs=signed.inputs,
            risk_policy_version=signed.policy.version,
        )
        envelope = _sign(
            message, exchange, [CUSTODIAN_ID], sequence, statement_id, issued_at=VALUED_AT
        )
        return envelope, {"amount": amount, "margin_call_id": ""}

    cases = [
        (
            "liquidation-instruction/breach",
            "§9.2",
            "A liquidation for a breach (no margin call): the collateral ratio of the signed "
            "inputs against the whole exposure 5000000.25 is below the liquidation ratio.",
            instruction(_INSTRUCTION_ID, 31, "5000000.25"),
        ),
        (
            "liquidation-instruction/not-below-line",
            "§9.2",
            "A breach liquidation for exposure 3500000.5, where the ratio (a margin call's) is "
            "not below the liquidation ratio: refused with PROOF_INVALID naming amount.",
            instruction(_INSTRUCTION_ID + "-b", 32, "3500000.5"),
        ),
    ]
    return [
        _statement_vector(
            vector_id,
            clause,
            description,
            envelope,
            stated=stated,
            expected=_checked(recompute_liquidation_instruction, registry, envelope),
        )
        for vector_id, clause, description, (envelope, stated) in cases
    ]


_RELEASE_ID = "release-acct-0001-0001"


def _checked_consent(registry: KeyRegistry, envelope: envelope_pb2.Envelope) -> dict[str, Any]:
    """The outcome of recomputing a consent with the SDK: its figures, or its refusal."""
    try:
        result = recompute_pledge_release_consent(
            envelope, registry, audience=CUSTODIAN_ID, now=NOW
        )
    except CollateralSyncError as error:
        return {**status(error.reason_name), "metadata": dict(error.metadata)}
    judged = result.judgement
    return {
        "valid": True,
        "collateral_value_after": _text(judged.collateral_value_after),
        "credit_limit_after": _text(judged.credit_limit_after),
        "collateral_ratio_after": None
        if judged.collateral_ratio_after is None
        else _text(judged.collateral_ratio_after),
    }


def _pledge_release_consent_vectors(
    keys: dict[str, NamedKey], registry: KeyRegistry, signed: _SignedInputs
) -> list[dict[str, Any]]:
    """Consents judged on the call's signed inputs (epoch 5 latest): USDC pledged 150000."""
    exchange = keys["exchange"].key
    client = keys["client"].key
    policy = signed.policy
    quantum = Decimal(1).scaleb(-policy.rounding_scale)
    releases = [("USDC", Decimal("100000.000000000000000001")), ("BENJI", Decimal("0.125"))]
    after = judge_release(
        policy, signed.positions, signed.prices, releases, Decimal(0), valued_at=VALUED_AT
    )
    maintenance = Decimal(policy.maintenance_ratio.value)
    # The largest exposure the release leaves within the policy: the limit, or maintenance.
    exposure = min(
        after.credit_limit_after,
        (after.collateral_value_after / maintenance).quantize(quantum, rounding=ROUND_FLOOR),
    )
    before = judge_release(
        policy, signed.positions, signed.prices, [], Decimal(0), valued_at=VALUED_AT
    )
    beyond_pledge = [("USDC", Decimal("150000.000000000000000001"))]
    beyond = judge_release(
        policy, signed.positions, signed.prices, beyond_pledge, Decimal(0), valued_at=VALUED_AT
    )
    sequences = iter(range(41, 99))

    def consent(
        statement_id: str,
        *,
        quantities: Sequence[tuple[str, Decimal]] = releases,
        exposure: Decimal = exposure,
        figures: tuple[Decimal, Decimal] = (after.collateral_value_after, after.credit_limit_after),
        exchange_id: str = EXCHANGE_ID,
    ) -> tuple[envelope_pb2.Envelope, dict[str, str]]:
        request = pledge_release_pb2.PledgeReleaseRequest(
            release_id=f"{_RELEASE_ID}-{statement_id}",
            account_id=_ACCOUNT,
            exchange_id=exchange_id,
            releases=[
                pledge_release_pb2.ReleasedQuantity(asset_id=asset, quantity=decimal(_text(q)))
                for asset, q in quantities
            ],
        )
        request_envelope = _sign(
            request,
            client,
            [EXCHANGE_ID, CUSTODIAN_ID],
            next(sequences),
            f"request-{statement_id}",
            issued_at=VALUED_AT - timedelta(minutes=1),
        )
        stated = {
            "exposure": _text(exposure),
            "collateral_value_after": _text(figures[0]),
            "credit_limit_after": _text(figures[1]),
        }
        message = pledge_release_pb2.PledgeReleaseConsent(
            request=request_envelope,
            inputs=signed.inputs,
            risk_policy_version=policy.version,
            exposure=decimal(stated["exposure"]),
            collateral_value_after=decimal(stated["collateral_value_after"]),
            credit_limit_after=decimal(stated["credit_limit_after"]),
        )
        envelope = _sign(
            message,
            exchange,
            [CUSTODIAN_ID, CLIENT_ID],
            next(sequences),
            statement_id,
            issued_at=VALUED_AT,
        )
        return envelope, stated

    cases = [
        (
            "pledge-release-consent/valid-at-the-edge",
            "§5.10",
            "USDC 100000.000000000000000001 of its 150000 pledge and BENJI 0.125 released, judged "
            "on the latest of two holdings statements at the consent's issued_at; the exposure "
            "is the largest the account supports after the release (credit limit or "
            "maintenance, both inclusive).",
            consent("consent-a"),
        ),
        (
            "pledge-release-consent/value-before-release",
            "§5.10",
            "The same consent stating the collateral value and credit limit before the release: "
            "refused with PROOF_INVALID naming collateral_value_after.",
            consent(
                "consent-b",
                figures=(before.collateral_value_after, before.credit_limit_after),
            ),
        ),
        (
            "pledge-release-consent/exposure-one-quantum-over",
            "§5.10",
            "The same release with an exposure one quantum above what the account supports after "
            "it: the figures recompute, but the exchange consented outside its policy "
            "(PROOF_INVALID naming credit_limit_after or collateral_ratio_after).",
            consent("consent-c", exposure=exposure + quantum),
        ),
        (
            "pledge-release-consent/beyond-pledge",
            "§5.10",
            "A release of one quantum more than the USDC pledge, its figures as recomputed: "
            "refused with PROOF_INVALID naming request.releases[0].quantity, the pledge as "
            "expected.",
            consent(
                "consent-d",
                quantities=beyond_pledge,
                exposure=Decimal(0),
                figures=(beyond.collateral_value_after, beyond.credit_limit_after),
            ),
        ),
        (
            "pledge-release-consent/request-for-another-exchange",
            "§5.10",
            "A consent to a request that names another exchange: PROOF_INVALID naming "
            "request.exchange_id.",
            consent("consent-e", exchange_id="exchange-2.example"),
        ),
    ]
    return [
        _statement_vector(
            vector_id,
            clause,
            description,
            envelope,
            stated=stated,
            expected=_checked_consent(registry, envelope),
        )
        for vector_id, clause, description, (envelope, stated) in cases
    ]


def valuation_file(keys: dict[str, NamedKey]) -> dict[str, Any]:
    signing = [keys["custodian"], keys["exchange"], keys["client"]]
    registry = KeyRegistry(k.party_key() for k in signing)
    signed = _signed_inputs(keys)
    return {
        "description": (
            "Valuation, credit, margin-call and liquidation figures (docs/PROTOCOL.md sections "
            "7.3, 8.2, 9.2, 9.5). Each 'valuations' case gives the risk policy (proto3 JSON of "
            "RiskPolicy), the arrangement's asset_classes, the positions of the holdings "
            "statement in order, the price quotes, valued_at, the exposure and, when a "
            "liquidation is due, its proceeds and the auto-deleveraging candidates; "
            "'expected' gives every figure as exact plain decimal text (canonical, except "
            "that price, market_value, haircut_value and score may have more than 18 fraction "
            "digits; *_wire is the 18-digit wire value). A null amount is an absent Decimal, "
            "a null observed_at an unset one. Every 'invalid' case must be refused with its "
            "reason, naming 'field'. 'margin_calls' and 'liquidation_instructions' are signed "
            "statements embedding their signed inputs: verify each with 'registry' as "
            "verifier_party_id at 'now' and recompute it from its inputs (sections 8.2, 9.2); "
            "'pledge_release_consents' likewise (section 5.10: the client's request inside, "
            "the figures after the release, within the pledge and the policy); "
            "a refusal gives the ErrorInfo metadata."
        ),
        "valuations": _valuation_vectors(),
        "invalid": _invalid_vectors(),
        "max_skew_seconds": MAX_SKEW_SECONDS,
        "registry": json_format.MessageToDict(registry.to_proto()),
        "margin_calls": _margin_call_vectors(keys, registry, signed),
        "liquidation_instructions": _liquidation_instruction_vectors(keys, registry, signed),
        "pledge_release_consents": _pledge_release_consent_vectors(keys, registry, signed),
    }
