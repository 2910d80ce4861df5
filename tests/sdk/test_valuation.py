"""Tests for collateral_sync.valuation: the exact arithmetic and verifiable margin calls.

Expected figures are worked out by hand in the comments next to them (under
the pilot seed policy: MMF 0.98, stablecoin 0.95, broad ETF 0.8, single stock
0.6 capped at 25% of the total, crypto 0.7; leverage 2; maintenance ratio 0.5;
liquidation ratio 0.4; rounding scale 2), never copied from the output.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from collateral_sync import valuation
from collateral_sync.errors import MalformedError, VerificationError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import pae, sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    pledge_release_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    AdlCandidate,
    AdlRank,
    allocate_shortfall,
    collateral_ratio,
    credit_line_figures,
    judge_release,
    liquidation_amount,
    liquidation_shortfall,
    margin_call_amount,
    needs_liquidation,
    recompute_liquidation_instruction,
    recompute_margin_call,
    recompute_pledge_release_consent,
    released_quantities,
    validate_risk_policy,
    value_collateral,
)
from google.protobuf import duration_pb2
from google.protobuf.message import Message

R = errors_pb2.ErrorReason
AC = common_pb2.AssetClass
MMF = AC.ASSET_CLASS_TOKENIZED_MMF
STABLECOIN = AC.ASSET_CLASS_STABLECOIN
ETF = AC.ASSET_CLASS_TOKENIZED_ETF
SINGLE_STOCK = AC.ASSET_CLASS_TOKENIZED_SINGLE_STOCK
CRYPTO = AC.ASSET_CLASS_CRYPTO
UNSPECIFIED = AC.ASSET_CLASS_UNSPECIFIED

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
EXCHANGE = "exchange-1"
CUSTODIAN = "custodian-1"
CLIENT = "client-1"
ACCOUNT = "acct-1"

ASSET_CLASSES = {
    "BENJI": MMF,
    "USDC": STABLECOIN,
    "SPY": ETF,
    "AAPL": SINGLE_STOCK,
    "NVDA": SINGLE_STOCK,
    "BTC": CRYPTO,
}


def D(text: str) -> Decimal:
    return Decimal(text)


def _dec(text: str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=text)


def seed_policy() -> valuation_pb2.RiskPolicy:
    policy = valuation_pb2.RiskPolicy(
        version=7,
        haircuts=[
            valuation_pb2.AssetClassHaircut(asset_class=MMF, collateral_factor=_dec("0.98")),
            valuation_pb2.AssetClassHaircut(asset_class=STABLECOIN, collateral_factor=_dec("0.95")),
            valuation_pb2.AssetClassHaircut(asset_class=ETF, collateral_factor=_dec("0.8")),
            valuation_pb2.AssetClassHaircut(
                asset_class=SINGLE_STOCK, collateral_factor=_dec("0.6")
            ),
            valuation_pb2.AssetClassHaircut(asset_class=CRYPTO, collateral_factor=_dec("0.7")),
        ],
        concentration_caps=[
            valuation_pb2.ConcentrationCap(asset_class=SINGLE_STOCK, max_share=_dec("0.25"))
        ],
        leverage_cap=_dec("2"),
        maintenance_ratio=_dec("0.5"),
        liquidation_ratio=_dec("0.4"),
        insurance_fund_balance=_dec("1000"),
        valuation_currency="USD",
        auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE,
        max_price_age=duration_pb2.Duration(seconds=15 * 60),
        cure_period=duration_pb2.Duration(seconds=24 * 3600),
        stale_price_rule=valuation_pb2.STALE_PRICE_RULE_ZERO,
        rounding_scale=2,
        max_settlement_cycles_per_day=2,
        price_source="pilot-prices",
    )
    policy.effective_from.FromDatetime(T0 - timedelta(days=1))
    return policy


def pos(
    asset_id: str, quantity: str, *, locked: str = "0", pledged: str | None = None
) -> common_pb2.Position:
    return common_pb2.Position(
        account_id=ACCOUNT,
        asset_id=asset_id,
        quantity=_dec(quantity),
        locked_quantity=_dec(locked),
        pledged_quantity=_dec(quantity if pledged is None else pledged),
    )


def quote(asset_id: str, price: str, observed_at: datetime = T0) -> valuation_pb2.PriceQuote:
    message = valuation_pb2.PriceQuote(asset_id=asset_id, price=_dec(price), source="pilot-prices")
    message.observed_at.FromDatetime(observed_at)
    return message


def value(
    positions: list[common_pb2.Position],
    prices: list[valuation_pb2.PriceQuote],
    policy: valuation_pb2.RiskPolicy | None = None,
    at: datetime = T0,
) -> valuation.CollateralValuation:
    return value_collateral(
        policy or seed_policy(), positions, prices, asset_classes=ASSET_CLASSES, valued_at=at
    )


def row(result: valuation.CollateralValuation, asset_id: str) -> valuation.PositionValuation:
    (found,) = [r for r in result.positions if r.asset_id == asset_id]
    return found


# ------------------------------------------------------------------ valuation


def test_seed_policy_is_valid() -> None:
    validate_risk_policy(seed_policy())


def test_locked_and_unpledged_quantity_count_zero() -> None:
    result = value(
        [
            pos("BENJI", "1000", locked="100"),  # min(1000, 1000 - 100) = 900
            pos("USDC", "500", pledged="300"),  # min(300, 500) = 300
            pos("SPY", "10", locked="12"),  # max(0, 10 - 12) = 0
            pos("BTC", "2", locked="0.5", pledged="1.75"),  # min(1.75, 1.5) = 1.5
        ],
        [quote("BENJI", "1"), quote("USDC", "1"), quote("SPY", "500"), quote("BTC", "100")],
    )
    assert [r.eligible_quantity for r in result.positions] == [D("900"), D("300"), 0, D("1.5")]
    # 900*0.98 + 300*0.95 + 0 + 1.5*100*0.7 = 882 + 285 + 105
    assert result.collateral_value == D("1272")


def test_seed_portfolio_rounds_each_position_down() -> None:
    result = value(
        [
            pos("BENJI", "1000", locked="100"),
            pos("USDC", "500", pledged="300"),
            pos("BTC", "0.5"),
            pos("XYZ", "10"),  # in no class and no override: unknown
        ],
        [
            quote("BENJI", "1"),
            quote("USDC", "0.9999"),
            quote("BTC", "60000.123"),
            quote("XYZ", "5"),
        ],
    )
    benji, usdc, btc, xyz = result.positions
    assert (benji.market_value, benji.haircut_value, benji.collateral_value) == (
        D("900"),
        D("882"),
        D("882"),
    )
    # 300 * 0.9999 = 299.97; * 0.95 = 284.9715 -> 284.97
    assert usdc.market_value == D("299.97")
    assert usdc.haircut_value == D("284.9715")
    assert usdc.collateral_value == D("284.97")
    # 0.5 * 60000.123 = 30000.0615; * 0.7 = 21000.04305 -> 21000.04
    assert btc.haircut_value == D("21000.04305")
    assert btc.collateral_value == D("21000.04")
    # The unknown asset is priced but counts 0.
    assert (xyz.asset_class, xyz.market_value, xyz.collateral_factor) == (
        UNSPECIFIED,
        D("50"),
        D("0"),
    )
    assert xyz.collateral_value == 0
    assert result.haircut_total == D("22167.01455")
    # 882 + 284.97 + 21000.04, not floor(22167.01455) computed on the total
    assert result.collateral_value == D("22167.01")


def test_class_without_haircut_counts_zero() -> None:
    policy = seed_policy()
    del policy.haircuts[4]  # crypto
    result = value(
        [pos("BTC", "1"), pos("USDC", "10")], [quote("BTC", "60000"), quote("USDC", "1")], policy
    )
    assert row(result, "BTC").collateral_factor == 0
    assert row(result, "BTC").asset_class == CRYPTO
    assert result.collateral_value == D("9.5")


def test_missing_price_counts_zero() -> None:
    result = value([pos("BTC", "1"), pos("USDC", "10")], [quote("USDC", "1")])
    assert row(result, "BTC").price == 0
    assert row(result, "BTC").collateral_value == 0
    assert result.collateral_value == D("9.5")


def test_asset_haircut_overrides_class_and_supplies_class() -> None:
    policy = seed_policy()
    policy.asset_haircuts.add(
        asset_id="AAPL", asset_class=SINGLE_STOCK, collateral_factor=_dec("0.5")
    )
    # TSLA is absent from ASSET_CLASSES: the override alone makes it known.
    policy.asset_haircuts.add(
        asset_id="TSLA", asset_class=SINGLE_STOCK, collateral_factor=_dec("0.4")
    )
    result = value(
        [pos("SPY", "100"), pos("AAPL", "10"), pos("TSLA", "10")],
        [quote("SPY", "500"), quote("AAPL", "200"), quote("TSLA", "300")],
        policy,
    )
    assert row(result, "AAPL").collateral_factor == D("0.5")  # not the class's 0.6
    assert row(result, "TSLA").asset_class == SINGLE_STOCK
    # 40000 + 2000*0.5 + 3000*0.4 = 40000 + 1000 + 1200; single stock 2200 <= 0.25 * 42200
    assert result.collateral_value == D("42200")


@pytest.mark.parametrize(
    ("observed_at", "stale"),
    [
        (T0 - timedelta(minutes=15), False),  # exactly max_price_age old: still fresh
        (T0 - timedelta(minutes=15, microseconds=1), True),
        (T0 - timedelta(hours=20), True),  # stock market closed overnight
        (T0 + timedelta(seconds=1), False),  # observed after valuation time: not old
    ],
)
def test_stale_price_rule_zero(observed_at: datetime, stale: bool) -> None:
    result = value([pos("SPY", "10")], [quote("SPY", "500", observed_at)])
    assert result.collateral_value == (0 if stale else D("4000"))


def test_stale_price_one_nanosecond_past_the_limit() -> None:
    limit = int((T0 - timedelta(minutes=15)).timestamp())
    at_limit = quote("SPY", "500")
    at_limit.observed_at.seconds, at_limit.observed_at.nanos = limit, 0
    assert value([pos("SPY", "10")], [at_limit]).collateral_value == D("4000")
    past_limit = quote("SPY", "500")
    # 15 minutes and 1 ns before T0
    past_limit.observed_at.seconds, past_limit.observed_at.nanos = limit - 1, 999_999_999
    assert value([pos("SPY", "10")], [past_limit]).collateral_value == 0


def test_stale_price_rule_last_price() -> None:
    policy = seed_policy()
    policy.stale_price_rule = valuation_pb2.STALE_PRICE_RULE_LAST_PRICE
    policy.stale_price_factor.value = "0.9"
    result = value(
        [pos("BTC", "0.5"), pos("SPY", "3")],
        [quote("BTC", "60000", T0 - timedelta(hours=1)), quote("SPY", "500.01")],
        policy,
    )
    # stale BTC: 60000 * 0.9 = 54000; 0.5 * 54000 = 27000; * 0.7 = 18900
    assert row(result, "BTC").price == D("54000")
    assert row(result, "BTC").collateral_value == D("18900")
    # fresh SPY untouched: 3 * 500.01 * 0.8 = 1200.024 -> 1200.02
    assert row(result, "SPY").price == D("500.01")
    assert result.collateral_value == D("20100.02")


def test_concentration_cap_binding_scales_the_class() -> None:
    result = value(
        [pos("SPY", "100"), pos("AAPL", "100"), pos("NVDA", "50")],
        [quote("SPY", "500"), quote("AAPL", "200"), quote("NVDA", "100.01")],
    )
    # haircut: SPY 50000*0.8 = 40000; AAPL 20000*0.6 = 12000; NVDA 5000.5*0.6 = 3000.3
    # T = 55000.3; cap = 0.25 * T = 13750.075 < single stock 15000.3: scale by 13750.075/15000.3
    assert result.haircut_total == D("55000.3")
    assert row(result, "SPY").collateral_value == D("40000")
    # 12000 * 13750.075 / 15000.3 = 10999.84000319... -> 10999.84
    assert row(result, "AAPL").collateral_value == D("10999.84")
    assert row(result, "AAPL").haircut_value == D("12000")  # before the cap
    # 3000.3 * 13750.075 / 15000.3 = 2750.23499680... -> 2750.23
    assert row(result, "NVDA").collateral_value == D("2750.23")
    assert result.collateral_value == D("53750.07")


def test_concentration_cap_not_binding() -> None:
    result = value(
        [pos("SPY", "100"), pos("AAPL", "100")], [quote("SPY", "500"), quote("AAPL", "200")]
    )
    # T = 40000 + 12000 = 52000; cap 13000 >= 12000
    assert row(result, "AAPL").collateral_value == D("12000")
    assert result.collateral_value == D("52000")


def test_concentration_cap_exactly_reached_is_not_scaled() -> None:
    # SPY 90*500*0.8 = 36000; AAPL 100*200*0.6 = 12000; T = 48000, cap = 12000 = V
    exact = value(
        [pos("SPY", "90"), pos("AAPL", "100")], [quote("SPY", "500"), quote("AAPL", "200")]
    )
    assert exact.collateral_value == D("48000")
    # One more cent on AAPL (V = 12000.6, T = 48000.6, cap 12000.15) binds.
    over = value(
        [pos("SPY", "90"), pos("AAPL", "100")], [quote("SPY", "500"), quote("AAPL", "200.01")]
    )
    assert row(over, "AAPL").collateral_value == D("12000.15")
    assert over.collateral_value == D("48000.15")


def test_eighteen_decimals_and_values_beyond_int64_are_exact() -> None:
    policy = seed_policy()
    policy.rounding_scale = 18
    result = value(
        [pos("USDC", "1000000000000.000000000000000001"), pos("BENJI", "0.000000000000000001")],
        [quote("USDC", "1000000000000000000"), quote("BENJI", "0.5")],
        policy,
    )
    usdc, benji = result.positions
    # (10^12 + 10^-18) * 10^18 = 10^30 + 1; * 0.95 = 950000000000000000000000000000.95
    assert usdc.market_value == D("1000000000000000000000000000001")
    assert usdc.collateral_value == D("950000000000000000000000000000.95")
    assert usdc.collateral_value > 2**63
    # 10^-18 * 0.5 = 5e-19; * 0.98 = 4.9e-19 -> 0 at 18 places
    assert benji.market_value == D("5E-19")
    assert benji.collateral_value == 0
    assert result.collateral_value == D("950000000000000000000000000000.95")
    # On the wire the row's market value is cut to 18 places.
    assert benji.to_proto().market_value.value == "0"
    assert usdc.to_proto().collateral_value.value == "950000000000000000000000000000.95"
    figures = credit_line_figures(policy, result, D("0"))
    assert figures.credit_limit == D("1900000000000000000000000000001.9")


def test_arithmetic_ignores_the_thread_decimal_context() -> None:
    policy = seed_policy()
    policy.rounding_scale = 18
    with decimal.localcontext() as ctx:
        ctx.prec = 6
        ctx.rounding = decimal.ROUND_HALF_UP
        result = value(
            [pos("USDC", "1000000000000.000000000000000001")],
            [quote("USDC", "1000000000000000000")],
            policy,
        )
    assert result.collateral_value == D("950000000000000000000000000000.95")


def test_position_rows_convert_to_proto() -> None:
    result = value([pos("USDC", "500", pledged="300")], [quote("USDC", "0.9999")])
    assert result.rows() == [
        valuation_pb2.PositionValuation(
            asset_id="USDC",
            asset_class=STABLECOIN,
            eligible_quantity=_dec("300"),
            price=_dec("0.9999"),
            market_value=_dec("299.97"),
            collateral_factor=_dec("0.95"),
            collateral_value=_dec("284.97"),
        )
    ]


@pytest.mark.parametrize(
    ("position", "field", "reason"),
    [
        (pos("USDC", "-1", pledged="0"), "positions[0].quantity", R.ERROR_REASON_INVALID_AMOUNT),
        (pos("USDC", "1.50"), "positions[0].quantity", R.ERROR_REASON_INVALID_AMOUNT),
        (
            pos("USDC", "1", locked=""),
            "positions[0].locked_quantity",
            R.ERROR_REASON_INVALID_AMOUNT,
        ),
        (
            pos("USDC", "1", pledged="-2"),
            "positions[0].pledged_quantity",
            R.ERROR_REASON_INVALID_AMOUNT,
        ),
        (
            common_pb2.Position(asset_id="USDC", quantity=_dec("1"), pledged_quantity=_dec("1")),
            "positions[0].locked_quantity",
            R.ERROR_REASON_MALFORMED,  # absent, not malformed text
        ),
        (pos("", "1"), "positions[0].asset_id", R.ERROR_REASON_MALFORMED),
    ],
)
def test_malformed_positions_are_refused(
    position: common_pb2.Position, field: str, reason: int
) -> None:
    with pytest.raises(MalformedError) as info:
        value([position], [quote("USDC", "1")])
    assert info.value.reason == reason
    assert info.value.metadata["field"] == field
    assert field in info.value.field_violations


def test_malformed_prices_are_refused() -> None:
    with pytest.raises(MalformedError) as info:
        value([pos("USDC", "1")], [quote("USDC", "1"), quote("USDC", "0.99")])
    assert info.value.metadata["field"] == "prices[1].asset_id"
    with pytest.raises(MalformedError) as info:
        value([pos("USDC", "1")], [quote("USDC", "-1")])
    assert info.value.metadata["field"] == "prices[0].price"
    undated = valuation_pb2.PriceQuote(asset_id="USDC", price=_dec("1"))
    with pytest.raises(MalformedError) as info:
        value([pos("USDC", "1")], [undated])
    assert info.value.metadata["field"] == "prices[0].observed_at"


def test_naive_valuation_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        value([pos("USDC", "1")], [quote("USDC", "1")], at=datetime(2026, 3, 2, 12, 0))


# ------------------------------------------------------------ credit and margin


def test_credit_line_figures() -> None:
    result = value(
        [pos("BENJI", "1000", locked="100"), pos("USDC", "500", pledged="300"), pos("BTC", "0.5")],
        [quote("BENJI", "1"), quote("USDC", "0.9999"), quote("BTC", "60000.123")],
    )
    figures = credit_line_figures(seed_policy(), result, D("30000"))
    assert figures.collateral_value == D("22167.01")
    assert figures.credit_limit == D("44334.02")  # x2
    assert figures.exposure == D("30000")
    # 22167.01 / 30000 = 0.738900333... -> 0.73
    assert figures.collateral_ratio == D("0.73")
    assert credit_line_figures(seed_policy(), result, D("0")).collateral_ratio is None


def test_credit_limit_rounds_down() -> None:
    policy = seed_policy()
    policy.leverage_cap.value = "1.5"
    result = value([pos("USDC", "0.03")], [quote("USDC", "1")], policy)
    # 0.03 * 0.95 = 0.0285 -> 0.02; 0.02 * 1.5 = 0.03
    assert result.collateral_value == D("0.02")
    result = value([pos("USDC", "0.05")], [quote("USDC", "1")], policy)
    # 0.05 * 0.95 = 0.0475 -> 0.04; 0.04 * 1.5 = 0.06
    assert credit_line_figures(policy, result, D("1")).credit_limit == D("0.06")
    policy.leverage_cap.value = "1.25"
    # 0.04 * 1.25 = 0.05; and 0.04 * 1.33 = 0.0532 -> 0.05
    assert credit_line_figures(policy, result, D("1")).credit_limit == D("0.05")
    policy.leverage_cap.value = "1.33"
    assert credit_line_figures(policy, result, D("1")).credit_limit == D("0.05")


@pytest.mark.parametrize(
    ("exposure", "ratio", "call"),
    [
        ("2000", "0.5", None),  # exactly at the maintenance ratio: no call
        ("1999.99", "0.5", None),  # 0.50000250... -> 0.5
        ("2000.01", "0.49", "0.01"),  # 1000/2000.01 = 0.49999750 -> 0.49; 1000.005 - 1000 up
        ("2000.03", "0.49", "0.02"),  # 1000.015 - 1000 = 0.015 -> 0.02 (up)
        ("2400", "0.41", "200"),  # 1200 - 1000
        ("0", None, None),  # no exposure: ratio undefined, no call
    ],
)
def test_margin_call_threshold(exposure: str, ratio: str | None, call: str | None) -> None:
    policy = seed_policy()
    assert collateral_ratio(policy, D("1000"), D(exposure)) == (None if ratio is None else D(ratio))
    assert margin_call_amount(policy, D("1000"), D(exposure)) == (None if call is None else D(call))


def test_margin_call_with_zero_collateral() -> None:
    # ratio 0 < 0.5: the whole maintenance requirement is called, 100.005 -> 100.01
    assert margin_call_amount(seed_policy(), D("0"), D("200.01")) == D("100.01")


@pytest.mark.parametrize(
    ("exposure", "liquidate"),
    [("2500", False), ("2500.01", True), ("2400", False), ("100000", True), ("0", False)],
)
def test_liquidation_threshold(exposure: str, liquidate: bool) -> None:
    # 1000 / 2500 = 0.4 exactly: not below; 1000 / 2500.01 = 0.39999840 -> 0.39: below
    policy = seed_policy()
    assert needs_liquidation(policy, D("1000"), D(exposure)) is liquidate
    assert liquidation_amount(policy, D("1000"), D(exposure)) == (
        D(exposure) if liquidate else None
    )


def test_liquidation_shortfall() -> None:
    assert liquidation_shortfall(D("2500.01"), D("2400")) == D("100.01")
    assert liquidation_shortfall(D("2500.01"), D("2600")) == 0
    assert liquidation_shortfall(D("2500.01"), D("2500.01")) == 0


def test_negative_or_inexact_inputs_are_refused() -> None:
    policy = seed_policy()
    with pytest.raises(MalformedError) as info:
        margin_call_amount(policy, D("1000"), D("-1"))
    assert info.value.metadata["field"] == "exposure"
    assert info.value.reason == R.ERROR_REASON_INVALID_AMOUNT  # a sign error
    with pytest.raises(MalformedError) as info:
        margin_call_amount(policy, D("0.0000000000000000001"), D("1"))  # 19 places
    assert info.value.reason == R.ERROR_REASON_INVALID_AMOUNT
    with pytest.raises(MalformedError):
        needs_liquidation(policy, D("NaN"), D("1"))
    with pytest.raises(TypeError):
        margin_call_amount(policy, 1000, D("1"))  # type: ignore[arg-type]


# ------------------------------------------------------------ shortfall waterfall


CANDIDATES = [
    AdlCandidate("acct-b", profit=D("150"), effective_leverage=D("2")),  # 300
    AdlCandidate("loser", profit=D("-50"), effective_leverage=D("10")),  # -500
    AdlCandidate("acct-c", profit=D("1000"), effective_leverage=D("0.5")),  # 500
    AdlCandidate("acct-a", profit=D("100"), effective_leverage=D("3")),  # 300
    AdlCandidate("Zed", profit=D("60"), effective_leverage=D("5")),  # 300
]


def test_insurance_fund_covers_all() -> None:
    figures = allocate_shortfall(seed_policy(), D("400.5"), CANDIDATES)
    assert figures.shortfall == D("400.5")
    assert figures.covered_by_insurance_fund == D("400.5")
    assert figures.insurance_fund_balance_after == D("599.5")
    assert figures.auto_deleveraging_amount == 0
    assert figures.ranking == ()  # nobody is deleveraged


def test_insurance_fund_covers_exactly_its_balance() -> None:
    figures = allocate_shortfall(seed_policy(), D("1000"), CANDIDATES)
    assert (figures.covered_by_insurance_fund, figures.insurance_fund_balance_after) == (
        D("1000"),
        D("0"),
    )
    assert figures.auto_deleveraging_amount == 0
    assert figures.ranking == ()


def test_insurance_fund_covers_part_and_the_rest_is_deleveraged_by_ranking() -> None:
    figures = allocate_shortfall(seed_policy(), D("1500.25"), CANDIDATES)
    assert figures.covered_by_insurance_fund == D("1000")
    assert figures.insurance_fund_balance_after == 0
    assert figures.auto_deleveraging_amount == D("500.25")
    # 500 first; three ties at 300 by UTF-8 bytes ("Z" 0x5a sorts before "a" 0x61); -500 last
    assert figures.ranking == (
        AdlRank("acct-c", D("500"), 1),
        AdlRank("Zed", D("300"), 2),
        AdlRank("acct-a", D("300"), 3),
        AdlRank("acct-b", D("300"), 4),
        AdlRank("loser", D("-500"), 5),
    )
    message = figures.to_proto("liq-1")
    assert message.liquidation_id == "liq-1"
    assert message.covered_by_insurance_fund.value == "1000"
    assert message.auto_deleveraging_amount.value == "500.25"
    assert [(r.account_id, r.score.value, r.rank) for r in message.ranking][:2] == [
        ("acct-c", "500", 1),
        ("Zed", "300", 2),
    ]


def test_ranking_uses_exact_scores_beyond_the_wire_precision() -> None:
    # 0.000000000000000001 * 0.5 = 5e-19 > 0 = 0 * 9: ranks first though both
    # print as "0" at 18 places.
    figures = allocate_shortfall(
        seed_policy(),
        D("5000"),
        [
            AdlCandidate("a", profit=D("0"), effective_leverage=D("9")),
            AdlCandidate("b", profit=D("0.000000000000000001"), effective_leverage=D("0.5")),
        ],
    )
    assert [r.account_id for r in figures.ranking] == ["b", "a"]
    assert [r.score.value for r in figures.to_proto("liq").ranking] == ["0", "0"]


def test_negative_scores_are_rounded_toward_zero_on_the_wire() -> None:
    # PROTOCOL.md 9.5: the wire score is rounded toward zero, not down (floor),
    # so a negative score keeps its digits instead of gaining a quantum.
    figures = allocate_shortfall(
        seed_policy(),
        D("5000"),
        [
            # -0.123456789012345679 * 1.5 = -0.1851851835185185185 (19 places)
            AdlCandidate("a", profit=D("-0.123456789012345679"), effective_leverage=D("1.5")),
            # -0.000000000000000001 * 0.5 = -5e-19: toward zero is 0
            AdlCandidate("b", profit=D("-0.000000000000000001"), effective_leverage=D("0.5")),
            # 0.123456789012345679 * 1.5: positive, the same either way
            AdlCandidate("c", profit=D("0.123456789012345679"), effective_leverage=D("1.5")),
        ],
    )
    assert [(r.account_id, r.score) for r in figures.ranking] == [
        ("c", D("0.1851851835185185185")),
        ("b", D("-5E-19")),
        ("a", D("-0.1851851835185185185")),
    ]
    assert [r.score.value for r in figures.to_proto("liq").ranking] == [
        "0.185185183518518518",
        "0",
        "-0.185185183518518518",
    ]


def test_malformed_candidates_are_refused() -> None:
    duplicate = [CANDIDATES[0], AdlCandidate("acct-b", D("1"), D("1"))]
    with pytest.raises(MalformedError) as info:
        allocate_shortfall(seed_policy(), D("5000"), duplicate)
    assert info.value.metadata["field"] == "candidates[1].account_id"
    with pytest.raises(MalformedError) as info:
        allocate_shortfall(seed_policy(), D("5000"), [AdlCandidate("x", D("1"), D("-1"))])
    assert info.value.metadata["field"] == "candidates[0].effective_leverage"
    with pytest.raises(MalformedError) as info:
        allocate_shortfall(seed_policy(), D("-1"), [])
    assert info.value.metadata["field"] == "shortfall"


# ------------------------------------------------------------ invalid policies


def _set_decimal(path: str, text: str) -> Callable[[valuation_pb2.RiskPolicy], None]:
    def mutate(policy: valuation_pb2.RiskPolicy) -> None:
        target: Message = policy
        *parents, leaf = path.split(".")
        for part in parents:
            name, _, index = part.partition("[")
            target = getattr(target, name)
            if index:
                target = target[int(index.rstrip("]"))]  # type: ignore[index]
        getattr(target, leaf).value = text

    return mutate


def _set(name: str, value: object) -> Callable[[valuation_pb2.RiskPolicy], None]:
    return lambda policy: setattr(policy, name, value)


def _clear(name: str) -> Callable[[valuation_pb2.RiskPolicy], None]:
    return lambda policy: policy.ClearField(name)  # type: ignore[arg-type]


def _duplicate_class_haircut(policy: valuation_pb2.RiskPolicy) -> None:
    policy.haircuts.add(asset_class=MMF, collateral_factor=_dec("0.5"))


def _duplicate_asset_haircut(policy: valuation_pb2.RiskPolicy) -> None:
    policy.asset_haircuts.add(
        asset_id="AAPL", asset_class=SINGLE_STOCK, collateral_factor=_dec("0.5")
    )
    policy.asset_haircuts.add(
        asset_id="AAPL", asset_class=SINGLE_STOCK, collateral_factor=_dec("0.4")
    )


def _asset_factor_above_one(policy: valuation_pb2.RiskPolicy) -> None:
    policy.asset_haircuts.add(
        asset_id="AAPL", asset_class=SINGLE_STOCK, collateral_factor=_dec("2")
    )


def _unspecified_cap_class(policy: valuation_pb2.RiskPolicy) -> None:
    policy.concentration_caps[0].asset_class = UNSPECIFIED


def _negative_price_age(policy: valuation_pb2.RiskPolicy) -> None:
    policy.max_price_age.seconds = -1


def _last_price_without_factor(policy: valuation_pb2.RiskPolicy) -> None:
    policy.stale_price_rule = valuation_pb2.STALE_PRICE_RULE_LAST_PRICE


def _last_price_factor_above_one(policy: valuation_pb2.RiskPolicy) -> None:
    policy.stale_price_rule = valuation_pb2.STALE_PRICE_RULE_LAST_PRICE
    policy.stale_price_factor.value = "1.1"


MAL = R.ERROR_REASON_MALFORMED
AMOUNT = R.ERROR_REASON_INVALID_AMOUNT


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (
            _set_decimal("haircuts[0].collateral_factor", "1.01"),
            "haircuts[0].collateral_factor",
            MAL,
        ),
        (
            _set_decimal("haircuts[1].collateral_factor", "-0.1"),
            "haircuts[1].collateral_factor",
            AMOUNT,
        ),
        (
            _set_decimal("haircuts[2].collateral_factor", "0.80"),
            "haircuts[2].collateral_factor",
            AMOUNT,
        ),
        (
            _set_decimal("concentration_caps[0].max_share", "1.5"),
            "concentration_caps[0].max_share",
            MAL,
        ),
        (_set_decimal("leverage_cap", "0"), "leverage_cap", MAL),
        (_set_decimal("leverage_cap", "-2"), "leverage_cap", AMOUNT),
        (_clear("leverage_cap"), "leverage_cap", MAL),
        (_clear("maintenance_ratio"), "maintenance_ratio", MAL),
        (_set_decimal("leverage_cap", ""), "leverage_cap", AMOUNT),
        (_set_decimal("liquidation_ratio", "0.6"), "liquidation_ratio", MAL),
        (_set_decimal("liquidation_ratio", "-0.1"), "liquidation_ratio", AMOUNT),
        (_set_decimal("maintenance_ratio", "0.505"), "maintenance_ratio", MAL),
        (_set_decimal("insurance_fund_balance", "-1"), "insurance_fund_balance", AMOUNT),
        (_set("rounding_scale", 19), "rounding_scale", MAL),
        (_set("stale_price_rule", 0), "stale_price_rule", MAL),
        (_set("stale_price_rule", 9), "stale_price_rule", MAL),
        (_set("auto_deleveraging_rule", 0), "auto_deleveraging_rule", MAL),
        (_duplicate_class_haircut, "haircuts[5].asset_class", MAL),
        (_duplicate_asset_haircut, "asset_haircuts[1].asset_id", MAL),
        (_asset_factor_above_one, "asset_haircuts[0].collateral_factor", MAL),
        (_unspecified_cap_class, "concentration_caps[0].asset_class", MAL),
        (_negative_price_age, "max_price_age", MAL),
        (_last_price_without_factor, "stale_price_factor", MAL),
        (_last_price_factor_above_one, "stale_price_factor", MAL),
    ],
)
def test_invalid_policies_are_refused_naming_the_field(
    mutate: Callable[[valuation_pb2.RiskPolicy], None], field: str, reason: int
) -> None:
    policy = seed_policy()
    mutate(policy)
    with pytest.raises(MalformedError) as info:
        validate_risk_policy(policy)
    error = info.value
    assert error.reason == reason
    assert error.metadata["field"] == field
    assert field in error.field_violations
    assert {"expected", "actual"} <= error.metadata.keys()


def test_every_function_refuses_an_invalid_policy() -> None:
    policy = seed_policy()
    policy.rounding_scale = 19
    calls: list[Callable[[], object]] = [
        lambda: value([pos("USDC", "1")], [quote("USDC", "1")], policy),
        lambda: collateral_ratio(policy, D("1"), D("1")),
        lambda: margin_call_amount(policy, D("1"), D("1")),
        lambda: needs_liquidation(policy, D("1"), D("1")),
        lambda: allocate_shortfall(policy, D("1"), []),
    ]
    for call in calls:
        with pytest.raises(MalformedError, match="rounding_scale"):
            call()


def test_ratios_finer_than_the_scale_are_allowed_at_a_finer_scale() -> None:
    policy = seed_policy()
    policy.maintenance_ratio.value = "0.505"
    policy.rounding_scale = 3
    validate_risk_policy(policy)
    # 1000 / 1990 = 0.50251... -> 0.502 < 0.505: 1990 * 0.505 - 1000 = 4.95
    assert margin_call_amount(policy, D("1000"), D("1990")) == D("4.95")


# ------------------------------------------------------------ verifiable margin calls


class Parties:
    def __init__(self) -> None:
        self.exchange = SigningKey.generate(EXCHANGE, common_pb2.PARTY_ROLE_EXCHANGE)
        self.other_exchange = SigningKey.generate("exchange-2", common_pb2.PARTY_ROLE_EXCHANGE)
        self.custodian = SigningKey.generate(CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN)
        # A key the custodian party holds in the wrong role.
        self.custodian_as_exchange = SigningKey.generate(CUSTODIAN, common_pb2.PARTY_ROLE_EXCHANGE)
        self.client = SigningKey.generate(CLIENT, common_pb2.PARTY_ROLE_CLIENT)
        self.registry = KeyRegistry()
        for key in (
            self.exchange,
            self.other_exchange,
            self.custodian,
            self.custodian_as_exchange,
            self.client,
        ):
            self.registry.add(key.party_key(valid_from=T0 - timedelta(days=30)))
        self.sequence = 0

    def sign(
        self, message: Message, signer: SigningKey, audience: list[str], issued_at: datetime
    ) -> envelope_pb2.Envelope:
        self.sequence += 1
        return sign_statement(
            message,
            signer,
            audience=audience,
            sequence=self.sequence,
            ttl=timedelta(days=2),
            issued_at=issued_at,
        )


def forge(
    message: Message, signer: SigningKey, audience: list[str], issued_at: datetime
) -> envelope_pb2.Envelope:
    """Sign as sign_statement would, but without its role check: a forgery."""
    message.header.CopyFrom(  # type: ignore[attr-defined]
        envelope_pb2.StatementHeader(
            issuer=signer.party_id, audience=audience, sequence=99, statement_id="forged"
        )
    )
    message.header.issued_at.FromDatetime(issued_at)  # type: ignore[attr-defined]
    message.header.expires_at.FromDatetime(issued_at + timedelta(days=2))  # type: ignore[attr-defined]
    payload = message.SerializeToString(deterministic=True)
    payload_type = payload_type_of(message)
    return envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[
            envelope_pb2.Signature(
                key_id=signer.key_id, sig=signer.sign(pae(payload_type, payload))
            )
        ],
    )


def holdings(
    account_id: str = ACCOUNT, epoch: int = 3, benji: str = "1000"
) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement(
        account_id=account_id,
        exchange_id=EXCHANGE,
        epoch=epoch,
        positions=[pos("BENJI", benji, locked="100"), pos("USDC", "500", pledged="300")],
        reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
    )


# Hand figures of holdings() with BENJI at 1 and USDC at 0.9999, exposure 2400:
# BENJI 900 * 0.98 = 882; USDC 300 * 0.9999 * 0.95 = 284.9715 -> 284.97;
# collateral 1166.97; ratio 1166.97 / 2400 = 0.486237... -> 0.48 < 0.5;
# call 2400 * 0.5 - 1166.97 = 33.03.
CALL_FIGURES = {
    "exposure": "2400",
    "collateral_value": "1166.97",
    "collateral_ratio": "0.48",
    "call_amount": "33.03",
}


def issue_call(
    parties: Parties,
    *,
    figures: dict[str, str] | None = None,
    policy_envelope: envelope_pb2.Envelope | None = None,
    snapshot_envelope: envelope_pb2.Envelope | None = None,
    holdings_envelopes: list[envelope_pb2.Envelope] | None = None,
    risk_policy_version: int = 7,
    audience: str = CUSTODIAN,
    observed_at: datetime = T0 - timedelta(minutes=2),
    due_in: timedelta = timedelta(hours=24),  # the seed's cure period
) -> envelope_pb2.Envelope:
    if policy_envelope is None:
        policy_envelope = parties.sign(
            seed_policy(), parties.exchange, ["*"], T0 - timedelta(days=1)
        )
    if snapshot_envelope is None:
        snapshot = valuation_pb2.PriceSnapshot(
            prices=[quote("BENJI", "1", observed_at), quote("USDC", "0.9999", observed_at)]
        )
        snapshot_envelope = parties.sign(
            snapshot, parties.exchange, ["*"], T0 - timedelta(minutes=1)
        )
    if holdings_envelopes is None:
        holdings_envelopes = [
            parties.sign(holdings(), parties.custodian, [EXCHANGE], T0 - timedelta(hours=1))
        ]
    stated = {**CALL_FIGURES, **(figures or {})}
    call = margin_pb2.MarginCall(
        margin_call_id="mc-1",
        account_id=ACCOUNT,
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=policy_envelope,
            holdings_statements=holdings_envelopes,
            price_snapshot=snapshot_envelope,
        ),
        risk_policy_version=risk_policy_version,
        exposure=_dec(stated["exposure"]),
        collateral_value=_dec(stated["collateral_value"]),
        collateral_ratio=_dec(stated["collateral_ratio"]),
        call_amount=_dec(stated["call_amount"]),
    )
    call.due_by.FromDatetime(T0 + due_in)
    return parties.sign(call, parties.exchange, [audience], T0)


def check(parties: Parties, envelope: envelope_pb2.Envelope) -> valuation.MarginCallCheck:
    return recompute_margin_call(
        envelope,
        parties.registry,
        audience=CUSTODIAN,
        asset_classes=ASSET_CLASSES,
        now=T0 + timedelta(minutes=1),
    )


@pytest.fixture
def parties() -> Parties:
    return Parties()


def test_correct_margin_call_is_confirmed(parties: Parties) -> None:
    result = check(parties, issue_call(parties))
    assert result.collateral_value == D("1166.97")
    assert result.collateral_ratio == D("0.48")
    assert result.call_amount == D("33.03")
    assert result.exposure == D("2400")
    assert result.margin_call.margin_call_id == "mc-1"
    assert result.risk_policy.version == 7
    assert [r.collateral_value for r in result.valuation.positions] == [D("882"), D("284.97")]


def _refuted(parties: Parties, envelope: envelope_pb2.Envelope) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        check(parties, envelope)
    return info.value


@pytest.mark.parametrize(
    ("field", "stated", "expected"),
    [
        ("call_amount", "33.04", "33.03"),  # inflated by 0.01
        ("call_amount", "33.02", "33.03"),
        ("collateral_value", "1166.96", "1166.97"),
        ("collateral_ratio", "0.49", "0.48"),
    ],
)
def test_misstated_figure_is_refuted(
    parties: Parties, field: str, stated: str, expected: str
) -> None:
    error = _refuted(parties, issue_call(parties, figures={field: stated}))
    assert error.reason == R.ERROR_REASON_PROOF_INVALID
    assert error.metadata == {"field": field, "expected": expected, "actual": stated}


def test_call_where_none_is_due_is_refuted(parties: Parties) -> None:
    # 1166.97 / 2000 = 0.583485 -> 0.58 >= 0.5: no call is due.
    figures = {"exposure": "2000", "collateral_ratio": "0.58", "call_amount": "1"}
    error = _refuted(parties, issue_call(parties, figures=figures))
    assert error.metadata["field"] == "call_amount"
    assert error.metadata["expected"].startswith("no call")
    assert error.metadata["actual"] == "1"


def test_holdings_resigned_by_a_wrong_role_key_are_refused(parties: Parties) -> None:
    # The exchange forges the custodian's statement with its own key.
    forged = forge(holdings(benji="5000"), parties.exchange, [EXCHANGE], T0 - timedelta(hours=1))
    error = _refuted(parties, issue_call(parties, holdings_envelopes=[forged]))
    assert error.reason == R.ERROR_REASON_KEY_ROLE_MISMATCH


def test_policy_signed_by_a_non_exchange_key_is_refused(parties: Parties) -> None:
    # The custodian's own (custodian-role) key may not issue a risk policy.
    policy = forge(seed_policy(), parties.custodian, ["*"], T0 - timedelta(days=1))
    error = _refuted(parties, issue_call(parties, policy_envelope=policy))
    assert error.reason == R.ERROR_REASON_KEY_ROLE_MISMATCH
    # A key of the custodian party registered in the exchange role passes the
    # role check, but the policy is then not the calling exchange's.
    policy = parties.sign(
        seed_policy(), parties.custodian_as_exchange, ["*"], T0 - timedelta(days=1)
    )
    error = _refuted(parties, issue_call(parties, policy_envelope=policy))
    assert error.reason == R.ERROR_REASON_PROOF_INVALID
    assert error.metadata == {
        "field": "inputs.risk_policy.header.issuer",
        "expected": EXCHANGE,
        "actual": CUSTODIAN,
    }


def test_price_snapshot_of_another_exchange_is_refused(parties: Parties) -> None:
    snapshot = valuation_pb2.PriceSnapshot(prices=[quote("BENJI", "1"), quote("USDC", "0.9999")])
    envelope = parties.sign(snapshot, parties.other_exchange, ["*"], T0 - timedelta(minutes=1))
    error = _refuted(parties, issue_call(parties, snapshot_envelope=envelope))
    assert error.metadata["field"] == "inputs.price_snapshot.header.issuer"


def test_holdings_of_another_account_are_refused(parties: Parties) -> None:
    other = parties.sign(holdings("acct-2"), parties.custodian, [EXCHANGE], T0 - timedelta(hours=1))
    error = _refuted(parties, issue_call(parties, holdings_envelopes=[other]))
    assert error.reason == R.ERROR_REASON_PROOF_INVALID
    assert error.metadata == {
        "field": "inputs.holdings_statements[0].account_id",
        "expected": ACCOUNT,
        "actual": "acct-2",
    }


def test_holdings_pledged_to_another_exchange_are_refused(parties: Parties) -> None:
    statement = holdings()
    statement.exchange_id = "exchange-2"
    envelope = parties.sign(statement, parties.custodian, [EXCHANGE], T0 - timedelta(hours=1))
    error = _refuted(parties, issue_call(parties, holdings_envelopes=[envelope]))
    assert error.metadata["field"] == "inputs.holdings_statements[0].exchange_id"


def test_holdings_not_addressed_to_the_calling_exchange_are_refused(parties: Parties) -> None:
    envelope = parties.sign(holdings(), parties.custodian, ["exchange-2"], T0 - timedelta(hours=1))
    error = _refuted(parties, issue_call(parties, holdings_envelopes=[envelope]))
    assert error.reason == R.ERROR_REASON_AUDIENCE_MISMATCH


def test_policy_version_mismatch_is_refused(parties: Parties) -> None:
    error = _refuted(parties, issue_call(parties, risk_policy_version=6))
    assert error.reason == R.ERROR_REASON_PROOF_INVALID
    assert error.metadata == {"field": "risk_policy_version", "expected": "7", "actual": "6"}


def test_policy_not_yet_in_force_is_refused(parties: Parties) -> None:
    policy = seed_policy()
    policy.effective_from.FromDatetime(T0 + timedelta(minutes=5))
    envelope = parties.sign(policy, parties.exchange, ["*"], T0 - timedelta(days=1))
    error = _refuted(parties, issue_call(parties, policy_envelope=envelope))
    assert error.metadata["field"] == "inputs.risk_policy.effective_from"


def test_invalid_signed_policy_is_refused(parties: Parties) -> None:
    policy = seed_policy()
    policy.leverage_cap.value = "0"
    envelope = parties.sign(policy, parties.exchange, ["*"], T0 - timedelta(days=1))
    with pytest.raises(MalformedError) as info:
        check(parties, issue_call(parties, policy_envelope=envelope))
    assert info.value.metadata["field"] == "leverage_cap"


def test_call_addressed_to_someone_else_is_refused(parties: Parties) -> None:
    error = _refuted(parties, issue_call(parties, audience="custodian-2"))
    assert error.reason == R.ERROR_REASON_AUDIENCE_MISMATCH


def test_input_expired_when_the_call_was_issued_is_refused(parties: Parties) -> None:
    # Signed with a 2-day ttl three days before the call.
    old = parties.sign(holdings(), parties.custodian, [EXCHANGE], T0 - timedelta(days=3))
    error = _refuted(parties, issue_call(parties, holdings_envelopes=[old]))
    assert error.reason == R.ERROR_REASON_STATEMENT_EXPIRED


def test_latest_epoch_counts_and_duplicate_epochs_are_refused(parties: Parties) -> None:
    richer_older = parties.sign(
        holdings(epoch=2, benji="9000"), parties.custodian, [EXCHANGE], T0 - timedelta(hours=2)
    )
    latest = parties.sign(holdings(epoch=3), parties.custodian, [EXCHANGE], T0 - timedelta(hours=1))
    result = check(parties, issue_call(parties, holdings_envelopes=[latest, richer_older]))
    assert result.holdings.epoch == 3
    assert result.collateral_value == D("1166.97")

    same_epoch = parties.sign(
        holdings(epoch=3, benji="9000"), parties.custodian, [EXCHANGE], T0 - timedelta(hours=1)
    )
    error = _refuted(parties, issue_call(parties, holdings_envelopes=[latest, same_epoch]))
    assert error.metadata["field"] == "inputs.holdings_statements[1].epoch"


def test_prices_are_judged_stale_at_the_call_time(parties: Parties) -> None:
    # Observed exactly 15 minutes before the call: fresh at the call's issued_at,
    # although the custodian checks a minute later.
    fresh = issue_call(parties, observed_at=T0 - timedelta(minutes=15))
    assert check(parties, fresh).collateral_value == D("1166.97")
    # One second older: both prices count 0 under STALE_PRICE_RULE_ZERO,
    # so the exchange's figures are refuted.
    stale = issue_call(parties, observed_at=T0 - timedelta(minutes=15, seconds=1))
    error = _refuted(parties, stale)
    assert error.metadata == {
        "field": "collateral_value",
        "expected": "0",
        "actual": "1166.97",
    }


def test_margin_call_without_inputs_is_malformed(parties: Parties) -> None:
    call = margin_pb2.MarginCall(margin_call_id="mc-2", account_id=ACCOUNT, risk_policy_version=7)
    envelope = parties.sign(call, parties.exchange, [CUSTODIAN], T0)
    with pytest.raises(MalformedError) as info:
        check(parties, envelope)
    assert info.value.metadata["field"] == "inputs.risk_policy"


def test_due_by_must_be_issued_at_plus_cure_period(parties: Parties) -> None:
    error = _refuted(parties, issue_call(parties, due_in=timedelta(hours=23)))
    assert error.metadata == {
        "field": "due_by",
        "expected": "2026-03-03T12:00:00Z",
        "actual": "2026-03-03T11:00:00Z",
    }


def test_call_without_exposure_is_refuted(parties: Parties) -> None:
    figures = {"exposure": "0", "collateral_ratio": "0", "call_amount": "0"}
    error = _refuted(parties, issue_call(parties, figures=figures))
    assert error.reason == R.ERROR_REASON_PROOF_INVALID
    assert error.metadata["field"] == "exposure"


# ------------------------------------------------------------ liquidation instructions


def issue_instruction(
    parties: Parties, amount: str, *, margin_call_id: str = "", policy_version: int = 7
) -> envelope_pb2.Envelope:
    inputs = valuation_pb2.ValuationInputs(
        risk_policy=parties.sign(seed_policy(), parties.exchange, ["*"], T0 - timedelta(days=1)),
        holdings_statements=[
            parties.sign(holdings(), parties.custodian, [EXCHANGE], T0 - timedelta(hours=1))
        ],
        price_snapshot=parties.sign(
            valuation_pb2.PriceSnapshot(prices=[quote("BENJI", "1"), quote("USDC", "0.9999")]),
            parties.exchange,
            ["*"],
            T0 - timedelta(minutes=1),
        ),
    )
    instruction = liquidation_pb2.LiquidationInstruction(
        liquidation_id="liq-1",
        account_id=ACCOUNT,
        margin_call_id=margin_call_id,
        amount=_dec(amount),
        liquidation_path_id="path-1",
        inputs=inputs,
        risk_policy_version=policy_version,
    )
    return parties.sign(instruction, parties.exchange, [CUSTODIAN], T0)


def check_instruction(
    parties: Parties,
    envelope: envelope_pb2.Envelope,
    margin_call: margin_pb2.MarginCall | None = None,
) -> valuation.LiquidationCheck:
    return recompute_liquidation_instruction(
        envelope,
        parties.registry,
        audience=CUSTODIAN,
        asset_classes=ASSET_CLASSES,
        now=T0 + timedelta(minutes=1),
        margin_call=margin_call,
    )


# Collateral value of holdings() is 1166.97; 1166.97 / 0.4 = 2917.425, so the
# liquidation line lies between exposures 2917.42 (ratio 0.400001... -> 0.4)
# and 2917.43 (ratio 0.399998... -> 0.39).


def test_breach_liquidation_is_confirmed(parties: Parties) -> None:
    result = check_instruction(parties, issue_instruction(parties, "2917.43"))
    assert result.amount == D("2917.43")
    assert result.collateral_value == D("1166.97")
    assert result.collateral_ratio == D("0.39")


@pytest.mark.parametrize(("amount", "ratio"), [("2917.42", "0.4"), ("2400", "0.48")])
def test_breach_liquidation_above_the_line_is_refuted(
    parties: Parties, amount: str, ratio: str
) -> None:
    with pytest.raises(VerificationError) as info:
        check_instruction(parties, issue_instruction(parties, amount))
    error = info.value
    assert error.reason == R.ERROR_REASON_PROOF_INVALID
    assert error.metadata["field"] == "amount"
    assert f"collateral_ratio {ratio}," in error.metadata["expected"]
    assert error.metadata["actual"] == amount


def _expired_call(exposure: str = "2400") -> margin_pb2.MarginCall:
    return margin_pb2.MarginCall(margin_call_id="mc-1", account_id=ACCOUNT, exposure=_dec(exposure))


def test_liquidation_after_an_expired_call_raises_the_call_exposure(parties: Parties) -> None:
    # Ratio 0.48 is above the line, but the call expired: the exposure is raised.
    envelope = issue_instruction(parties, "2400", margin_call_id="mc-1")
    result = check_instruction(parties, envelope, _expired_call())
    assert result.amount == D("2400")
    assert result.collateral_ratio == D("0.48")

    with pytest.raises(VerificationError) as info:
        check_instruction(
            parties, issue_instruction(parties, "2400.01", margin_call_id="mc-1"), _expired_call()
        )
    assert info.value.metadata == {"field": "amount", "expected": "2400", "actual": "2400.01"}

    other = margin_pb2.MarginCall(margin_call_id="mc-9", account_id=ACCOUNT, exposure=_dec("2400"))
    with pytest.raises(VerificationError) as info:
        check_instruction(parties, envelope, other)
    assert info.value.metadata["field"] == "margin_call_id"

    with pytest.raises(ValueError, match="margin_call"):
        check_instruction(parties, envelope)


def test_liquidation_inputs_are_verified_like_a_margin_call(parties: Parties) -> None:
    with pytest.raises(VerificationError) as info:
        check_instruction(parties, issue_instruction(parties, "3000", policy_version=8))
    assert info.value.metadata == {"field": "risk_policy_version", "expected": "7", "actual": "8"}


def _policy_listing_assets() -> valuation_pb2.RiskPolicy:
    policy = seed_policy()
    policy.assets.extend(
        common_pb2.Asset(asset_id=asset_id, asset_class=asset_class)
        for asset_id, asset_class in ASSET_CLASSES.items()
    )
    return policy


def test_signed_policy_assets_supply_the_class_without_a_map() -> None:
    positions = [pos("BENJI", "900"), pos("USDC", "300")]
    prices = [quote("BENJI", "1"), quote("USDC", "1")]
    listed = valuation.value_collateral(_policy_listing_assets(), positions, prices, valued_at=T0)
    mapped = value(positions, prices)
    # BENJI at 0.98 and USDC at 0.95, as with the caller's map.
    assert listed.collateral_value == mapped.collateral_value == D("1167")
    # Without the policy's list and without a map, both assets are unknown: 0.
    unknown = valuation.value_collateral(seed_policy(), positions, prices, valued_at=T0)
    assert unknown.collateral_value == D("0")


def test_margin_call_recomputes_from_signed_inputs_alone(parties: Parties) -> None:
    policy_envelope = parties.sign(
        _policy_listing_assets(), parties.exchange, ["*"], T0 - timedelta(days=1)
    )
    envelope = issue_call(parties, policy_envelope=policy_envelope)
    result = recompute_margin_call(
        envelope, parties.registry, audience=CUSTODIAN, now=T0 + timedelta(minutes=1)
    )
    assert result.call_amount == D("33.03")


def test_policy_listing_an_asset_twice_is_refused() -> None:
    policy = _policy_listing_assets()
    policy.assets.add(asset_id="BENJI", asset_class=STABLECOIN)
    with pytest.raises(MalformedError) as raised:
        valuation.validate_risk_policy(policy)
    assert "assets[6].asset_id" in raised.value.field_violations


# ------------------------------------------------- pledge releases (PROTOCOL.md 5.10)
#
# Hand figures on holdings() (BENJI 1000, 100 locked, all pledged; USDC 500, 300
# pledged) with BENJI at 1 and USDC at 0.9999, before any release: 1166.97 (see
# CALL_FIGURES), credit limit 2333.94.

RELEASE_PRICES = [quote("BENJI", "1"), quote("USDC", "0.9999")]


def judge(
    releases: list[tuple[str, str]],
    exposure: str = "0",
    policy: valuation_pb2.RiskPolicy | None = None,
) -> valuation.ReleaseJudgement:
    return judge_release(
        policy or seed_policy(),
        list(holdings().positions),
        RELEASE_PRICES,
        [(asset, D(quantity)) for asset, quantity in releases],
        D(exposure),
        valued_at=T0,
        asset_classes=ASSET_CLASSES,
    )


def test_release_of_the_whole_usdc_pledge() -> None:
    # USDC eligible 300 -> 0: 882 left, limit 1764.
    judged = judge([("USDC", "300")])
    assert (judged.collateral_value_after, judged.credit_limit_after) == (D("882"), D("1764"))
    assert judged.refusal is None
    (usdc,) = [p for p in judged.positions if p.asset_id == "USDC"]
    assert (usdc.quantity.value, usdc.pledged_quantity.value) == ("500", "0")


def test_releasing_the_pledge_over_locked_quantity_costs_nothing() -> None:
    # BENJI pledged 1000, eligible min(1000, 1000 - 100) = 900: releasing 100 leaves 900.
    assert judge([("BENJI", "100")]).collateral_value_after == D("1166.97")
    # One more unit and the eligible quantity falls: 899 * 0.98 = 881.02; + 284.97.
    assert judge([("BENJI", "101")]).collateral_value_after == D("1165.99")


def test_release_beyond_the_pledge_is_refused_per_asset() -> None:
    refusal = judge([("BENJI", "1"), ("USDC", "300.000000000000000001")]).refusal
    assert refusal is not None
    assert (refusal.field, refusal.expected, refusal.actual) == (
        "releases[1].quantity",
        "300",
        "300.000000000000000001",
    )
    refusal = judge([("BTC", "1")]).refusal
    assert refusal is not None
    assert (refusal.field, refusal.expected) == (
        "releases[0].quantity",
        "0",
    )


def test_credit_limit_edge_is_inclusive() -> None:
    # After releasing USDC 300: limit 1764, ratio 882 / 1764 = 0.5.
    assert judge([("USDC", "300")], exposure="1764").refusal is None
    refusal = judge([("USDC", "300")], exposure="1764.01").refusal
    assert refusal is not None
    assert (refusal.field, refusal.expected, refusal.actual) == (
        "credit_limit_after",
        ">= 1764.01",
        "1764",
    )


def test_a_release_well_within_the_policy_is_allowed() -> None:
    # After releasing USDC 300 against an exposure of 1000: limit 1764, ratio 0.88.
    judged = judge([("USDC", "300")], exposure="1000")
    assert judged.refusal is None
    assert judged.collateral_ratio_after == D("0.88")


def test_maintenance_edge_is_inclusive_when_leverage_allows_more() -> None:
    # Leverage 3: the limit (2646) is not what binds; 882 / 1764 = 0.5 and
    # 882 / 1764.02 = 0.49999... -> 0.49 < 0.5.
    policy = seed_policy()
    policy.leverage_cap.value = "3"
    assert judge([("USDC", "300")], exposure="1764", policy=policy).refusal is None
    refusal = judge([("USDC", "300")], exposure="1764.02", policy=policy).refusal
    assert refusal is not None
    assert (refusal.field, refusal.expected, refusal.actual) == (
        "collateral_ratio_after",
        ">= 0.5",
        "0.49",
    )


def _request(**fields: object) -> pledge_release_pb2.PledgeReleaseRequest:
    request = pledge_release_pb2.PledgeReleaseRequest(
        release_id="rel-1",
        account_id=ACCOUNT,
        exchange_id=EXCHANGE,
        releases=[
            pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("300")),
            pledge_release_pb2.ReleasedQuantity(asset_id="BENJI", quantity=_dec("0.5")),
        ],
    )
    for name, value in fields.items():
        if name == "releases":
            del request.releases[:]
            request.releases.extend(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    return request


def test_released_quantities_in_request_order() -> None:
    assert released_quantities(_request()) == [("USDC", D("300")), ("BENJI", D("0.5"))]


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"release_id": ""}, R.ERROR_REASON_MALFORMED, "request.release_id"),
        ({"account_id": ""}, R.ERROR_REASON_MALFORMED, "request.account_id"),
        ({"releases": []}, R.ERROR_REASON_MALFORMED, "request.releases"),
        (
            {"releases": [pledge_release_pb2.ReleasedQuantity(quantity=_dec("1"))]},
            R.ERROR_REASON_MALFORMED,
            "request.releases[0].asset_id",
        ),
        (
            {
                "releases": [
                    pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("1")),
                    pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("2")),
                ]
            },
            R.ERROR_REASON_MALFORMED,
            "request.releases[1].asset_id",
        ),
        (
            {"releases": [pledge_release_pb2.ReleasedQuantity(asset_id="USDC")]},
            R.ERROR_REASON_MALFORMED,
            "request.releases[0].quantity",
        ),
        (
            {
                "releases": [
                    pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("-1"))
                ]
            },
            R.ERROR_REASON_INVALID_AMOUNT,
            "request.releases[0].quantity",
        ),
        (
            {
                "releases": [
                    pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("0"))
                ]
            },
            R.ERROR_REASON_INVALID_AMOUNT,
            "request.releases[0].quantity",
        ),
        (
            {
                "releases": [
                    pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("1.10"))
                ]
            },
            R.ERROR_REASON_INVALID_AMOUNT,
            "request.releases[0].quantity",
        ),
    ],
)
def test_malformed_release_requests_are_refused(
    fields: dict[str, object], reason: int, field: str
) -> None:
    with pytest.raises(MalformedError) as raised:
        released_quantities(_request(**fields))
    assert raised.value.reason == reason
    assert raised.value.metadata["field"] == field


def give_consent(
    parties: Parties,
    *,
    request: pledge_release_pb2.PledgeReleaseRequest | None = None,
    request_audience: list[str] | None = None,
    exposure: str = "1764",
    figures: tuple[str, str] = ("882", "1764"),
) -> envelope_pb2.Envelope:
    """The exchange's consent to releasing USDC 300 (figures after: 882, 1764)."""
    asked = request or _request(
        releases=[pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("300"))]
    )
    request_envelope = parties.sign(
        asked,
        parties.client,
        request_audience or [EXCHANGE, CUSTODIAN],
        T0 - timedelta(minutes=1),
    )
    consent = pledge_release_pb2.PledgeReleaseConsent(
        request=request_envelope,
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=parties.sign(
                seed_policy(), parties.exchange, ["*"], T0 - timedelta(days=1)
            ),
            holdings_statements=[
                parties.sign(holdings(), parties.custodian, [EXCHANGE], T0 - timedelta(hours=1))
            ],
            price_snapshot=parties.sign(
                valuation_pb2.PriceSnapshot(prices=RELEASE_PRICES),
                parties.exchange,
                ["*"],
                T0 - timedelta(minutes=1),
            ),
        ),
        risk_policy_version=7,
        exposure=_dec(exposure),
        collateral_value_after=_dec(figures[0]),
        credit_limit_after=_dec(figures[1]),
    )
    return parties.sign(consent, parties.exchange, [CUSTODIAN, CLIENT], T0)


def recompute_consent(
    parties: Parties, envelope: envelope_pb2.Envelope
) -> valuation.PledgeReleaseConsentCheck:
    return recompute_pledge_release_consent(
        envelope,
        parties.registry,
        audience=CUSTODIAN,
        asset_classes=ASSET_CLASSES,
        now=T0 + timedelta(minutes=1),
    )


def test_a_consent_at_the_edge_recomputes() -> None:
    parties = Parties()
    checked = recompute_consent(parties, give_consent(parties))
    assert checked.client_id == CLIENT
    assert checked.releases == (("USDC", D("300")),)
    assert (checked.judgement.collateral_value_after, checked.judgement.exposure) == (
        D("882"),
        D("1764"),
    )
    assert checked.holdings.epoch == 3


@pytest.mark.parametrize(
    ("figures", "field", "expected"),
    [
        (("1166.97", "1764"), "collateral_value_after", "882"),  # the value before the release
        (("882", "2333.94"), "credit_limit_after", "1764"),
    ],
)
def test_a_consent_with_figures_that_do_not_recompute_is_refuted(
    figures: tuple[str, str], field: str, expected: str
) -> None:
    parties = Parties()
    with pytest.raises(VerificationError) as raised:
        recompute_consent(parties, give_consent(parties, figures=figures))
    assert raised.value.reason == R.ERROR_REASON_PROOF_INVALID
    assert (raised.value.metadata["field"], raised.value.metadata["expected"]) == (field, expected)


def test_a_consent_outside_the_policy_is_refuted() -> None:
    parties = Parties()
    with pytest.raises(VerificationError) as raised:
        recompute_consent(parties, give_consent(parties, exposure="1764.01"))
    assert raised.value.reason == R.ERROR_REASON_PROOF_INVALID
    assert raised.value.metadata["field"] == "credit_limit_after"


def test_a_consent_to_a_request_for_another_exchange_is_refuted() -> None:
    parties = Parties()
    request = _request(
        exchange_id="exchange-2",
        releases=[pledge_release_pb2.ReleasedQuantity(asset_id="USDC", quantity=_dec("300"))],
    )
    with pytest.raises(VerificationError) as raised:
        recompute_consent(
            parties,
            give_consent(parties, request=request, request_audience=[EXCHANGE, "exchange-2"]),
        )
    assert raised.value.reason == R.ERROR_REASON_PROOF_INVALID
    assert raised.value.metadata["field"] == "request.exchange_id"


def test_a_consent_to_a_request_not_addressed_to_the_exchange_is_refused() -> None:
    parties = Parties()
    with pytest.raises(VerificationError) as raised:
        recompute_consent(parties, give_consent(parties, request_audience=[CUSTODIAN]))
    assert raised.value.reason == R.ERROR_REASON_AUDIENCE_MISMATCH
