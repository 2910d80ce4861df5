"""Properties of a pledge release judged by collateral_sync.valuation (PROTOCOL.md §5.10).

Random holdings (quantity, locked and pledged per asset, uneven to the last of 18
digits), prices, exposures and releases, under a policy with caps and a leverage cap
that differs from 1 / maintenance, so that either limit may bind:

- releasing takes value away, never adds it: the collateral value after a release is
  at most the value before it;
- the rule is monotone: if a release is within the pledge and the policy, so is every
  smaller one (each quantity scaled down);
- a consent stating what ``judge_release`` found recomputes to the same figures, and
  one stated for a release the rule refuses does not.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

from collateral_sync.errors import VerificationError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    errors_pb2,
    pledge_release_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import judge_release, recompute_pledge_release_consent
from google.protobuf import duration_pb2
from hypothesis import event, given, settings
from hypothesis import strategies as st

AT = datetime(2026, 6, 1, 12, tzinfo=UTC)
ASSETS = {
    "USDC": common_pb2.ASSET_CLASS_STABLECOIN,
    "BENJI": common_pb2.ASSET_CLASS_TOKENIZED_MMF,
    "BTC": common_pb2.ASSET_CLASS_CRYPTO,
}
QUANTUM = Decimal("1e-18")


def _d(value: Decimal | str) -> common_pb2.Decimal:
    text = value if isinstance(value, str) else format(value.normalize(), "f")
    return common_pb2.Decimal(value="0" if text in ("-0", "0E-18") else text)


def _policy(leverage: str) -> valuation_pb2.RiskPolicy:
    policy = valuation_pb2.RiskPolicy(
        version=3,
        haircuts=[
            valuation_pb2.AssetClassHaircut(
                asset_class=common_pb2.ASSET_CLASS_STABLECOIN, collateral_factor=_d("0.95")
            ),
            valuation_pb2.AssetClassHaircut(
                asset_class=common_pb2.ASSET_CLASS_TOKENIZED_MMF, collateral_factor=_d("0.98")
            ),
            valuation_pb2.AssetClassHaircut(
                asset_class=common_pb2.ASSET_CLASS_CRYPTO, collateral_factor=_d("0.7")
            ),
        ],
        concentration_caps=[
            valuation_pb2.ConcentrationCap(
                asset_class=common_pb2.ASSET_CLASS_CRYPTO, max_share=_d("0.5")
            )
        ],
        assets=[common_pb2.Asset(asset_id=a, asset_class=c) for a, c in ASSETS.items()],
        leverage_cap=_d(leverage),
        maintenance_ratio=_d("0.5"),
        liquidation_ratio=_d("0.4"),
        insurance_fund_balance=_d("0"),
        valuation_currency="USD",
        auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE,
        max_price_age=duration_pb2.Duration(seconds=3600),
        cure_period=duration_pb2.Duration(seconds=86400),
        stale_price_rule=valuation_pb2.STALE_PRICE_RULE_ZERO,
        rounding_scale=2,
        max_settlement_cycles_per_day=2,
        price_source="prices",
    )
    policy.effective_from.FromDatetime(AT - timedelta(days=1))
    return policy


_amounts = st.integers(10**18, 10**24).map(lambda units: Decimal(units) * QUANTUM)


@st.composite
def _holding(draw: st.DrawFn, asset: str) -> tuple[common_pb2.Position, valuation_pb2.PriceQuote]:
    quantity = draw(_amounts)
    locked = (quantity * Decimal(draw(st.integers(0, 50))) / 100).quantize(QUANTUM, ROUND_FLOOR)
    pledged = (quantity * Decimal(draw(st.integers(1, 100))) / 100).quantize(QUANTUM, ROUND_FLOOR)
    price = Decimal(draw(st.integers(1, 10**10))) / 10**4
    position = common_pb2.Position(
        account_id="acct-1",
        asset_id=asset,
        quantity=_d(quantity),
        locked_quantity=_d(locked),
        pledged_quantity=_d(pledged),
    )
    quote = valuation_pb2.PriceQuote(asset_id=asset, price=_d(price), source="prices")
    quote.observed_at.FromDatetime(AT - timedelta(minutes=1))
    return position, quote


@st.composite
def _case(
    draw: st.DrawFn,
) -> tuple[
    valuation_pb2.RiskPolicy,
    list[common_pb2.Position],
    list[valuation_pb2.PriceQuote],
    list[tuple[str, Decimal]],
    Decimal,
]:
    assets = draw(st.lists(st.sampled_from(sorted(ASSETS)), min_size=1, max_size=3, unique=True))
    holdings = [draw(_holding(asset)) for asset in assets]
    positions = [p for p, _ in holdings]
    quotes = [q for _, q in holdings]
    releases = []
    for position in positions:
        if draw(st.booleans()):
            pledged = Decimal(position.pledged_quantity.value)
            # Mostly within the pledge; sometimes up to a fifth beyond it.
            share = Decimal(draw(st.one_of(st.integers(1, 100), st.integers(1, 120)))) / 100
            quantity = max(QUANTUM, (pledged * share).quantize(QUANTUM, ROUND_FLOOR))
            releases.append((position.asset_id, quantity))
    if not releases:
        releases.append((positions[0].asset_id, QUANTUM))
    policy = _policy(draw(st.sampled_from(["2", "3", "1.5"])))
    # An exposure around what the account supports: none, part of its limit, or beyond it.
    limit = judge_release(
        policy, positions, quotes, [], Decimal(0), valued_at=AT
    ).credit_limit_after
    exposure = (limit * Decimal(draw(st.integers(0, 150))) / 100).quantize(Decimal("0.01"))
    return policy, positions, quotes, releases, exposure


@settings(max_examples=300, deadline=None)
@given(case=_case(), scale=st.integers(0, 100))
def test_a_release_lowers_value_and_smaller_releases_stay_allowed(
    case: tuple[
        valuation_pb2.RiskPolicy,
        list[common_pb2.Position],
        list[valuation_pb2.PriceQuote],
        list[tuple[str, Decimal]],
        Decimal,
    ],
    scale: int,
) -> None:
    policy, positions, quotes, releases, exposure = case
    before = judge_release(policy, positions, quotes, [], exposure, valued_at=AT)
    judged = judge_release(policy, positions, quotes, releases, exposure, valued_at=AT)
    event("allowed" if judged.refusal is None else f"refused on {judged.refusal.field[:8]}")
    assert judged.collateral_value_after <= before.collateral_value_after
    assert judged.credit_limit_after <= before.credit_limit_after
    smaller = [
        (asset, (quantity * scale / 100).quantize(QUANTUM, ROUND_FLOOR))
        for asset, quantity in releases
    ]
    smaller = [(asset, quantity) for asset, quantity in smaller if quantity > 0]
    less = judge_release(policy, positions, quotes, smaller, exposure, valued_at=AT)
    assert less.collateral_value_after >= judged.collateral_value_after
    if judged.refusal is None:
        assert less.refusal is None, (less.refusal, smaller)


_EXCHANGE = SigningKey.generate("exchange-1", common_pb2.PARTY_ROLE_EXCHANGE)
_CUSTODIAN = SigningKey.generate("custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
_CLIENT = SigningKey.generate("client-1", common_pb2.PARTY_ROLE_CLIENT)
_REGISTRY = KeyRegistry(
    k.party_key(valid_from=AT - timedelta(days=30)) for k in (_EXCHANGE, _CUSTODIAN, _CLIENT)
)


def _sign(
    message: object, key: SigningKey, audience: list[str], sequence: int, at: datetime
) -> object:
    return sign_statement(
        message, key, audience=audience, sequence=sequence, ttl=timedelta(hours=1), issued_at=at
    )  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(case=_case())
def test_a_consent_stating_the_judgement_recomputes_exactly_when_it_is_allowed(
    case: tuple[
        valuation_pb2.RiskPolicy,
        list[common_pb2.Position],
        list[valuation_pb2.PriceQuote],
        list[tuple[str, Decimal]],
        Decimal,
    ],
) -> None:
    policy, positions, quotes, releases, exposure = case
    judged = judge_release(policy, positions, quotes, releases, exposure, valued_at=AT)
    request = pledge_release_pb2.PledgeReleaseRequest(
        release_id="r-1",
        account_id="acct-1",
        exchange_id="exchange-1",
        releases=[
            pledge_release_pb2.ReleasedQuantity(asset_id=a, quantity=_d(q)) for a, q in releases
        ],
    )
    holdings = attestation_pb2.HoldingsStatement(
        account_id="acct-1", exchange_id="exchange-1", epoch=2, positions=positions
    )
    consent = pledge_release_pb2.PledgeReleaseConsent(
        request=_sign(
            request, _CLIENT, ["exchange-1", "custodian-1"], 1, AT - timedelta(seconds=5)
        ),  # type: ignore[arg-type]
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=_sign(policy, _EXCHANGE, ["*"], 2, AT - timedelta(hours=1)),  # type: ignore[arg-type]
            holdings_statements=[
                _sign(holdings, _CUSTODIAN, ["exchange-1"], 3, AT - timedelta(minutes=5))
            ],  # type: ignore[list-item]
            price_snapshot=_sign(
                valuation_pb2.PriceSnapshot(prices=quotes), _EXCHANGE, ["*"], 4, AT
            ),  # type: ignore[arg-type]
        ),
        risk_policy_version=policy.version,
        exposure=_d(exposure),
        collateral_value_after=_d(judged.collateral_value_after),
        credit_limit_after=_d(judged.credit_limit_after),
    )
    envelope = _sign(consent, _EXCHANGE, ["custodian-1", "client-1"], 5, AT)
    refusal: VerificationError | None = None
    try:
        checked = recompute_pledge_release_consent(
            envelope, _REGISTRY, audience="custodian-1", now=AT
        )  # type: ignore[arg-type]
    except VerificationError as err:
        refusal = err
    event("consent recomputes" if refusal is None else "consent refuted")
    if refusal is not None:
        assert judged.refusal is not None
        assert refusal.reason == errors_pb2.ERROR_REASON_PROOF_INVALID
        assert refusal.metadata["field"].removeprefix("request.") == judged.refusal.field
        return
    assert judged.refusal is None
    assert checked.judgement.collateral_value_after == judged.collateral_value_after
    assert checked.judgement.credit_limit_after == judged.credit_limit_after
