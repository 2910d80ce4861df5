"""Collateral valuation and the figures that follow from it.

Rules 1 to 7 of :mod:`collateral_sync.valuation` turn positions and prices
into a :class:`CollateralValuation`; rules 8 to 11 turn its collateral value
and an exposure into a credit limit, a collateral ratio, a margin call amount
and a liquidation amount.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TypeAlias

from collateral_sync.amounts import format_amount
from collateral_sync.v1 import common_pb2, valuation_pb2
from collateral_sync.valuation._arith import (
    _EXACT,
    _ZERO,
    _amount,
    _checked_input,
    _datetime_ns,
    _divide_down,
    _malformed,
    _non_negative,
    _round_down,
    _round_up,
    _sum,
    _timestamp_ns,
    _wire,
)
from collateral_sync.valuation._policy import (
    _ASSET_CLASS,
    _STALE,
    _UNSPECIFIED_CLASS,
    _parse_policy,
    _Policy,
)

__all__ = [
    "CollateralValuation",
    "CreditLineFigures",
    "PositionValuation",
    "collateral_ratio",
    "credit_line_figures",
    "liquidation_amount",
    "margin_call_amount",
    "needs_liquidation",
    "value_collateral",
]

#: An AssetClass enum value.
AssetClass: TypeAlias = common_pb2.AssetClass.ValueType


# --- valuation ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PositionValuation:
    """One position valued under a policy. Values are exact except ``collateral_value``."""

    asset_id: str
    #: ASSET_CLASS_UNSPECIFIED for an unknown asset.
    asset_class: AssetClass
    eligible_quantity: Decimal
    #: Price counted: 0 if missing or stale under ZERO, times the stale factor under LAST_PRICE.
    price: Decimal
    market_value: Decimal
    collateral_factor: Decimal
    #: market_value * collateral_factor, before any concentration cap.
    haircut_value: Decimal
    #: After the concentration cap, rounded down at the policy's rounding scale.
    collateral_value: Decimal

    def to_proto(self) -> valuation_pb2.PositionValuation:
        """The wire row; price and market value rounded toward zero to 18 decimal places."""
        return valuation_pb2.PositionValuation(
            asset_id=self.asset_id,
            asset_class=self.asset_class,
            eligible_quantity=common_pb2.Decimal(
                value=format_amount(self.eligible_quantity, field="eligible_quantity")
            ),
            price=common_pb2.Decimal(value=_wire(self.price, "price")),
            market_value=common_pb2.Decimal(value=_wire(self.market_value, "market_value")),
            collateral_factor=common_pb2.Decimal(
                value=format_amount(self.collateral_factor, field="collateral_factor")
            ),
            collateral_value=common_pb2.Decimal(
                value=format_amount(self.collateral_value, field="collateral_value")
            ),
        )


@dataclass(frozen=True, slots=True)
class CollateralValuation:
    """The valuation of a set of positions: one row per position, in input order."""

    positions: tuple[PositionValuation, ...]
    #: Sum of the exact haircut values before caps (T in the cap rule).
    haircut_total: Decimal
    #: Sum of the rounded position collateral values.
    collateral_value: Decimal
    valued_at_ns: int

    def rows(self) -> list[valuation_pb2.PositionValuation]:
        """The rows as ``PositionValuation`` messages (e.g. for a CreditLine)."""
        return [row.to_proto() for row in self.positions]


def value_collateral(
    policy: valuation_pb2.RiskPolicy,
    positions: Sequence[common_pb2.Position],
    prices: Sequence[valuation_pb2.PriceQuote],
    *,
    asset_classes: Mapping[str, AssetClass] | None = None,
    valued_at: datetime,
) -> CollateralValuation:
    """Value ``positions`` under ``policy`` at ``valued_at`` (rules 1 to 7)."""
    return _value(
        _parse_policy(policy), positions, prices, asset_classes or {}, _datetime_ns(valued_at)
    )


def _parse_prices(
    prices: Sequence[valuation_pb2.PriceQuote],
) -> dict[str, tuple[Decimal, int]]:
    by_asset: dict[str, tuple[Decimal, int]] = {}
    for i, quote in enumerate(prices):
        field = f"prices[{i}]"
        if not quote.asset_id:
            raise _malformed(f"{field}.asset_id", "a non-empty asset id", "''", "price")
        if quote.asset_id in by_asset:
            # Two prices for one asset would let each side pick a different one.
            raise _malformed(
                f"{field}.asset_id",
                "one price per asset",
                f"a second price for {quote.asset_id!r}",
                "price",
            )
        if not quote.HasField("observed_at"):
            raise _malformed(f"{field}.observed_at", "a timestamp", "unset", "price")
        price = _non_negative(
            _amount(quote, "price", f"{field}.price", "price"), f"{field}.price", "price"
        )
        by_asset[quote.asset_id] = (price, _timestamp_ns(quote.observed_at))
    return by_asset


def _eligible(position: common_pb2.Position, field: str) -> Decimal:
    quantity, locked, pledged = (
        _non_negative(
            _amount(position, name, f"{field}.{name}", "position"), f"{field}.{name}", "position"
        )
        for name in ("quantity", "locked_quantity", "pledged_quantity")
    )
    return max(_ZERO, min(pledged, _EXACT.subtract(quantity, locked)))


def _value(
    policy: _Policy,
    positions: Sequence[common_pb2.Position],
    prices: Sequence[valuation_pb2.PriceQuote],
    asset_classes: Mapping[str, AssetClass],
    valued_at_ns: int,
) -> CollateralValuation:
    quotes = _parse_prices(prices)
    scale = policy.rounding_scale

    # Rules 1 to 5, exactly.
    rows: list[tuple[str, AssetClass, Decimal, Decimal, Decimal, Decimal, Decimal]] = []
    for i, position in enumerate(positions):
        field = f"positions[{i}]"
        if not position.asset_id:
            raise _malformed(f"{field}.asset_id", "a non-empty asset id", "''", "position")
        eligible = _eligible(position, field)
        asset_id = position.asset_id
        override = policy.asset_haircuts.get(asset_id)
        if override is not None:
            asset_class, factor = override
        else:
            asset_class = policy.asset_classes.get(
                asset_id, asset_classes.get(asset_id, _UNSPECIFIED_CLASS)
            )
            factor = policy.class_factors.get(asset_class, _ZERO)
        quote = quotes.get(asset_id)
        if quote is None:
            price = _ZERO
        else:
            price, observed_ns = quote
            if valued_at_ns - observed_ns > policy.max_price_age_ns:
                price = (
                    _EXACT.multiply(price, policy.stale_price_factor)
                    if policy.stale_price_rule == _STALE.STALE_PRICE_RULE_LAST_PRICE
                    else _ZERO
                )
        market_value = _EXACT.multiply(eligible, price)
        haircut_value = _EXACT.multiply(market_value, factor)
        rows.append(
            (
                asset_id,
                _ASSET_CLASS.ValueType(asset_class),
                eligible,
                price,
                market_value,
                factor,
                haircut_value,
            )
        )

    # Rule 6: caps against the uncapped total, once.
    total = _sum(row[6] for row in rows)
    class_totals: dict[int, Decimal] = {}
    for row in rows:
        class_totals[row[1]] = _EXACT.add(class_totals.get(row[1], _ZERO), row[6])
    allowed: dict[int, Decimal] = {}
    for asset_class, cap in policy.caps.items():
        limit = _EXACT.multiply(cap, total)
        if class_totals.get(asset_class, _ZERO) > limit:
            allowed[asset_class] = limit

    # Rule 7: round each position down, then add.
    valued: list[PositionValuation] = []
    for asset_id, asset_class, eligible, price, market_value, factor, haircut_value in rows:
        limit_or_none = allowed.get(asset_class)
        if limit_or_none is None:
            value = _round_down(haircut_value, scale)
        else:
            value = _divide_down(
                _EXACT.multiply(haircut_value, limit_or_none), class_totals[asset_class], scale
            )
        valued.append(
            PositionValuation(
                asset_id=asset_id,
                asset_class=asset_class,
                eligible_quantity=eligible,
                price=price,
                market_value=market_value,
                collateral_factor=factor,
                haircut_value=haircut_value,
                collateral_value=value,
            )
        )
    # Already at scale s: the sum needs no rounding.
    collateral_value = _sum(row.collateral_value for row in valued)
    return CollateralValuation(
        positions=tuple(valued),
        haircut_total=total,
        collateral_value=collateral_value,
        valued_at_ns=valued_at_ns,
    )


# --- credit, margin, liquidation ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreditLineFigures:
    """The figures of a CreditLine."""

    collateral_value: Decimal
    #: collateral_value * leverage_cap, rounded down.
    credit_limit: Decimal
    exposure: Decimal
    #: None when the exposure is 0.
    collateral_ratio: Decimal | None


def _ratio(policy: _Policy, collateral_value: Decimal, exposure: Decimal) -> Decimal | None:
    _checked_input(collateral_value, "collateral_value")
    _checked_input(exposure, "exposure")
    if exposure == 0:
        return None
    return _divide_down(collateral_value, exposure, policy.rounding_scale)


def collateral_ratio(
    policy: valuation_pb2.RiskPolicy, collateral_value: Decimal, exposure: Decimal
) -> Decimal | None:
    """collateral_value / exposure rounded down (rule 9); None when the exposure is 0."""
    return _ratio(_parse_policy(policy), collateral_value, exposure)


def credit_line_figures(
    policy: valuation_pb2.RiskPolicy, valuation: CollateralValuation, exposure: Decimal
) -> CreditLineFigures:
    """Credit limit and collateral ratio of a valuation against an exposure (rules 8, 9)."""
    parsed = _parse_policy(policy)
    value = valuation.collateral_value
    return CreditLineFigures(
        collateral_value=value,
        credit_limit=_round_down(
            _EXACT.multiply(value, parsed.leverage_cap), parsed.rounding_scale
        ),
        exposure=exposure,
        collateral_ratio=_ratio(parsed, value, exposure),
    )


def _call_amount(policy: _Policy, collateral_value: Decimal, exposure: Decimal) -> Decimal | None:
    ratio = _ratio(policy, collateral_value, exposure)
    if ratio is None or ratio >= policy.maintenance_ratio:
        return None
    required = _EXACT.multiply(exposure, policy.maintenance_ratio)
    return _round_up(_EXACT.subtract(required, collateral_value), policy.rounding_scale)


def margin_call_amount(
    policy: valuation_pb2.RiskPolicy, collateral_value: Decimal, exposure: Decimal
) -> Decimal | None:
    """The margin call amount (rule 10), or None when no call is due."""
    return _call_amount(_parse_policy(policy), collateral_value, exposure)


def needs_liquidation(
    policy: valuation_pb2.RiskPolicy, collateral_value: Decimal, exposure: Decimal
) -> bool:
    """Whether the collateral ratio is below the liquidation ratio (rule 11)."""
    parsed = _parse_policy(policy)
    ratio = _ratio(parsed, collateral_value, exposure)
    return ratio is not None and ratio < parsed.liquidation_ratio


def liquidation_amount(
    policy: valuation_pb2.RiskPolicy, collateral_value: Decimal, exposure: Decimal
) -> Decimal | None:
    """The value to raise by liquidation (the whole exposure), or None when none is due."""
    if not needs_liquidation(policy, collateral_value, exposure):
        return None
    return exposure
