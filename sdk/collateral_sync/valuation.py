"""Valuation, credit, margin-call and liquidation arithmetic, and their recomputation.

Every figure an exchange derives from attested collateral — collateral value,
credit limit, collateral ratio, margin call amount, liquidation amount,
shortfall allocation — is computed here by pure functions over exact
``decimal.Decimal`` values (never floats), so a custodian running the same
functions on the same signed inputs gets the same figures to the last digit.
:func:`recompute_margin_call` and :func:`recompute_liquidation_instruction`
do exactly that for a signed ``MarginCall`` or ``LiquidationInstruction``.

Rules (docs/PROTOCOL.md sections 2.3, 7.1-7.3, 8.2, 9.2 and 9.5 state the same)
------------------------------------------------------------------------------
1. Eligible quantity of a position =
   ``max(0, min(pledged_quantity, quantity - locked_quantity))``: locked
   quantity counts 0, and only pledged quantity counts.
2. Collateral factor = the asset's ``AssetHaircut`` if the policy has one,
   else the ``AssetClassHaircut`` of the asset's class, else 0. The class comes
   from the ``AssetHaircut``, else from the signed policy's ``assets`` list,
   else from the caller's optional ``asset_classes`` map (for policies that
   list no assets); an asset in none of them is unknown
   (ASSET_CLASS_UNSPECIFIED) and counts 0. Recomputing a margin call needs no
   map when the policy lists its assets: every input is then signed.
3. Price of an asset: its ``PriceQuote`` (at most one per asset). A price is
   stale when ``valued_at - observed_at > policy.max_price_age``. Under
   ``STALE_PRICE_RULE_ZERO`` a stale price counts 0; under
   ``STALE_PRICE_RULE_LAST_PRICE`` it counts ``price * stale_price_factor``.
   A missing price counts 0.
4. Market value = eligible quantity * price; haircut value w = market value *
   collateral factor.
5. Concentration caps, applied once against the uncapped total
   ``T = sum of w``: a class with cap ``c`` whose ``V_c = sum of its w`` is
   ``> c * T`` is capped. No iteration.
6. Position collateral value = ``RD(w, s)``, or for a capped class
   ``RD(w * (c * T) / V_c, s)`` (one exact quotient, rounded once).
7. Collateral value = the sum of the position collateral values.
8. Credit limit = ``RD(collateral value * leverage_cap, s)``.
9. Collateral ratio = ``RD(collateral value / exposure, s)``; none when the
   exposure is 0 (then there is no margin call and no liquidation).
10. Margin call iff ratio < maintenance_ratio; call amount =
    ``RU(exposure * maintenance_ratio - collateral value, s)``.
11. Liquidation iff ratio < liquidation_ratio: the account is closed out and
    the amount to raise is the whole exposure; shortfall =
    ``max(0, amount - proceeds)``. Waterfall: the insurance fund covers
    ``min(shortfall, insurance_fund_balance)``; the rest is auto-deleveraged
    over the ranking of ``AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE``:
    score = profit * effective leverage (profit may be negative), highest
    exact score first, ties by account id bytes ascending, ranks from 1.
    Nothing left to deleverage means an empty ranking.

``s`` is the policy's rounding_scale (<= 18); RD is ``ROUND_FLOOR`` and RU
``ROUND_CEILING`` at ``10**-s`` (every rounded figure is non-negative, so
these are "toward zero" and "away from zero"). Everything before a rounding
is exact: products run in a context that traps Inexact, and quotients are
integer divisions, so no figure is ever rounded twice.

A valid risk policy has: canonical Decimals; collateral factors, caps and
stale_price_factor in [0, 1] (the factor may be absent unless the rule is
LAST_PRICE); leverage_cap > 0; 0 <= liquidation_ratio <= maintenance_ratio,
both with at most rounding_scale decimal places (so that comparing the
rounded ratio equals comparing the exact one, and a due call amount is
always positive); insurance_fund_balance >= 0; rounding_scale <= 18;
max_price_age >= 0; defined stale-price and auto-deleveraging rules; defined
classes; at most one haircut per class, one override per asset and one cap
per class. :func:`validate_risk_policy` refuses anything else with
:class:`~collateral_sync.errors.MalformedError` naming the field in metadata
``field`` and in ``field_violations``.

Error reasons for amounts (PROTOCOL.md 2.1, 2.2): a required Decimal that is
absent is MALFORMED; one that is present but not canonical, or negative where
the protocol says non-negative, is INVALID_AMOUNT; a value outside its range
for another reason (a factor above 1, a zero leverage cap) is MALFORMED.

On the wire, ``PositionValuation.price`` and ``market_value`` and ADL scores
are cut down to 18 decimal places (a product of two 18-place amounts can
have 36); they are reported, never used to recompute.

Verifiable margin calls
-----------------------
:func:`recompute_margin_call` verifies the call (addressed to the verifier),
then each signed input as evidence at the call's issued_at, checks that the
inputs are the ones the call claims (policy version and effective_from,
account, issuer, pledgee), values the latest holdings statement at the call's
issued_at and compares collateral value, collateral ratio, call amount and
due_by with the call. A figure that does not match raises
``VerificationError`` with reason ``ERROR_REASON_PROOF_INVALID`` and metadata
``{"field", "expected" (recomputed), "actual" (stated)}``. Why PROOF_INVALID:
the signed inputs are evidence and the call's figures a claim this evidence
does not prove; STATE_CONFLICT would say our state disagrees, which is not
the point, and MALFORMED would say the message is ill-formed, which it is not.
PROOF_INVALID maps to INVALID_ARGUMENT, as a refused statement should.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from collateral_sync.amounts import MAX_FRACTION_DIGITS, format_amount, parse_amount
from collateral_sync.errors import MalformedError, VerificationError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    valuation_pb2,
)

__all__ = [
    "AdlCandidate",
    "AdlRank",
    "CollateralValuation",
    "CreditLineFigures",
    "LiquidationCheck",
    "MarginCallCheck",
    "PositionValuation",
    "ShortfallFigures",
    "allocate_shortfall",
    "collateral_ratio",
    "credit_line_figures",
    "liquidation_amount",
    "liquidation_shortfall",
    "margin_call_amount",
    "needs_liquidation",
    "recompute_liquidation_instruction",
    "recompute_margin_call",
    "validate_risk_policy",
    "value_collateral",
]

Decimal = decimal.Decimal
#: An AssetClass enum value.
AssetClass: TypeAlias = common_pb2.AssetClass.ValueType

_R = errors_pb2.ErrorReason
_ASSET_CLASS = common_pb2.AssetClass
_UNSPECIFIED_CLASS = _ASSET_CLASS.ASSET_CLASS_UNSPECIFIED
_STALE = valuation_pb2.StalePriceRule
_ADL = valuation_pb2.AutoDeleveragingRule

MAX_ROUNDING_SCALE = MAX_FRACTION_DIGITS

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
    """Canonical text of a reported figure, cut (down) to the wire's 18 places."""
    return format_amount(_round_down(value, MAX_FRACTION_DIGITS), field=field)


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


def _refuted(field: str, expected: str, actual: str, why: str) -> VerificationError:
    return VerificationError(
        f"{why}: {field} expected {expected}, got {actual}",
        reason=_R.ERROR_REASON_PROOF_INVALID,
        metadata={"field": field, "expected": expected, "actual": actual},
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


def _at_most(value: Decimal, high: Decimal, field: str, what: str) -> Decimal:
    if value > high:
        raise _malformed(field, f"<= {format_amount(high)}", format_amount(value), what)
    return value


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


def _class_name(asset_class: int) -> str:
    try:
        return _ASSET_CLASS.Name(asset_class)  # type: ignore[arg-type]
    except ValueError:
        return str(asset_class)


# --- policy -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Policy:
    """A risk policy checked and parsed once."""

    version: int
    class_factors: Mapping[int, Decimal]
    asset_haircuts: Mapping[str, tuple[int, Decimal]]
    asset_classes: Mapping[str, int]
    caps: Mapping[int, Decimal]
    leverage_cap: Decimal
    maintenance_ratio: Decimal
    liquidation_ratio: Decimal
    insurance_fund_balance: Decimal
    max_price_age_ns: int
    stale_price_rule: int
    stale_price_factor: Decimal
    rounding_scale: int
    auto_deleveraging_rule: int


def _check_class(asset_class: int, field: str) -> int:
    if asset_class == _UNSPECIFIED_CLASS or asset_class not in _ASSET_CLASS.values():
        raise _malformed(
            field,
            "a defined AssetClass other than UNSPECIFIED",
            _class_name(asset_class),
            "risk policy",
        )
    return asset_class


def _fraction(parent: Message, name: str, field: str) -> Decimal:
    """A required Decimal in [0, 1] of the policy."""
    value = _non_negative(_amount(parent, name, field, "risk policy"), field, "risk policy")
    return _at_most(value, _ONE, field, "risk policy")


def _policy_amount(policy: valuation_pb2.RiskPolicy, name: str) -> Decimal:
    """A required non-negative Decimal of the policy, named by its field."""
    return _non_negative(_amount(policy, name, name, "risk policy"), name, "risk policy")


def _decimal_places(value: Decimal) -> int:
    exponent = value.normalize(context=_EXACT).as_tuple().exponent
    assert isinstance(exponent, int)  # finite: parse_amount refuses the rest
    return max(0, -exponent)


def _parse_policy(policy: valuation_pb2.RiskPolicy) -> _Policy:
    what = "risk policy"
    scale = policy.rounding_scale
    if scale > MAX_ROUNDING_SCALE:
        raise _malformed("rounding_scale", f"<= {MAX_ROUNDING_SCALE}", str(scale), what)

    class_factors: dict[int, Decimal] = {}
    for i, class_haircut in enumerate(policy.haircuts):
        field = f"haircuts[{i}]"
        asset_class = _check_class(class_haircut.asset_class, f"{field}.asset_class")
        if asset_class in class_factors:
            raise _malformed(
                f"{field}.asset_class",
                "one haircut per class",
                f"a second haircut for {_class_name(asset_class)}",
                what,
            )
        class_factors[asset_class] = _fraction(
            class_haircut, "collateral_factor", f"{field}.collateral_factor"
        )

    asset_haircuts: dict[str, tuple[int, Decimal]] = {}
    for i, asset_haircut in enumerate(policy.asset_haircuts):
        field = f"asset_haircuts[{i}]"
        if not asset_haircut.asset_id:
            raise _malformed(f"{field}.asset_id", "a non-empty asset id", "''", what)
        if asset_haircut.asset_id in asset_haircuts:
            raise _malformed(
                f"{field}.asset_id",
                "one haircut per asset",
                f"a second haircut for {asset_haircut.asset_id!r}",
                what,
            )
        asset_class = _check_class(asset_haircut.asset_class, f"{field}.asset_class")
        factor = _fraction(asset_haircut, "collateral_factor", f"{field}.collateral_factor")
        asset_haircuts[asset_haircut.asset_id] = (asset_class, factor)

    asset_classes: dict[str, int] = {}
    for i, asset in enumerate(policy.assets):
        field = f"assets[{i}]"
        if not asset.asset_id:
            raise _malformed(f"{field}.asset_id", "a non-empty asset id", "''", what)
        if asset.asset_id in asset_classes:
            raise _malformed(
                f"{field}.asset_id",
                "each asset listed once",
                f"a second entry for {asset.asset_id!r}",
                what,
            )
        asset_classes[asset.asset_id] = _check_class(asset.asset_class, f"{field}.asset_class")

    caps: dict[int, Decimal] = {}
    for i, cap in enumerate(policy.concentration_caps):
        field = f"concentration_caps[{i}]"
        asset_class = _check_class(cap.asset_class, f"{field}.asset_class")
        if asset_class in caps:
            raise _malformed(
                f"{field}.asset_class",
                "one cap per class",
                f"a second cap for {_class_name(asset_class)}",
                what,
            )
        caps[asset_class] = _fraction(cap, "max_share", f"{field}.max_share")

    leverage_cap = _policy_amount(policy, "leverage_cap")
    if leverage_cap == 0:
        raise _malformed("leverage_cap", "> 0", "0", what)
    maintenance = _policy_amount(policy, "maintenance_ratio")
    liquidation = _at_most(
        _policy_amount(policy, "liquidation_ratio"),
        maintenance,
        "liquidation_ratio",
        f"{what} (liquidation_ratio <= maintenance_ratio)",
    )
    for field, ratio in (("maintenance_ratio", maintenance), ("liquidation_ratio", liquidation)):
        if _decimal_places(ratio) > scale:
            raise _malformed(
                field,
                f"at most rounding_scale={scale} decimal places",
                format_amount(ratio),
                what,
            )
    insurance = _policy_amount(policy, "insurance_fund_balance")

    age = policy.max_price_age
    if age.seconds < 0 or age.nanos < 0 or age.nanos >= _NS_PER_S:
        raise _malformed(
            "max_price_age",
            "a non-negative duration",
            f"seconds={age.seconds} nanos={age.nanos}",
            what,
        )
    rule = policy.stale_price_rule
    if rule not in (_STALE.STALE_PRICE_RULE_ZERO, _STALE.STALE_PRICE_RULE_LAST_PRICE):
        raise _malformed(
            "stale_price_rule",
            "STALE_PRICE_RULE_ZERO or STALE_PRICE_RULE_LAST_PRICE",
            str(rule),
            what,
        )
    # The factor only matters under LAST_PRICE; elsewhere it may be left empty.
    stale_factor = _ZERO
    if rule == _STALE.STALE_PRICE_RULE_LAST_PRICE or policy.HasField("stale_price_factor"):
        stale_factor = _fraction(policy, "stale_price_factor", "stale_price_factor")
    adl_rule = policy.auto_deleveraging_rule
    if adl_rule != _ADL.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE:
        raise _malformed(
            "auto_deleveraging_rule",
            "AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE",
            str(adl_rule),
            what,
        )

    return _Policy(
        version=policy.version,
        class_factors=class_factors,
        asset_haircuts=asset_haircuts,
        asset_classes=asset_classes,
        caps=caps,
        leverage_cap=leverage_cap,
        maintenance_ratio=maintenance,
        liquidation_ratio=liquidation,
        insurance_fund_balance=insurance,
        max_price_age_ns=_duration_ns(age),
        stale_price_rule=rule,
        stale_price_factor=stale_factor,
        rounding_scale=scale,
        auto_deleveraging_rule=adl_rule,
    )


def validate_risk_policy(policy: valuation_pb2.RiskPolicy) -> None:
    """Refuse a policy the arithmetic is not defined for (see the module docstring).

    Raises MalformedError (reason MALFORMED, or INVALID_AMOUNT for a
    non-canonical Decimal) naming the first offending field.
    """
    _parse_policy(policy)


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
        """The wire row; price and market value cut down to 18 decimal places."""
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


def liquidation_shortfall(amount: Decimal, proceeds: Decimal) -> Decimal:
    """max(0, amount - proceeds): what the liquidation failed to raise."""
    _checked_input(amount, "amount")
    _checked_input(proceeds, "proceeds")
    return max(_ZERO, _EXACT.subtract(amount, proceeds))


@dataclass(frozen=True, slots=True)
class AdlCandidate:
    """An account that may be auto-deleveraged, with the exchange's figures for it."""

    account_id: str
    profit: Decimal
    effective_leverage: Decimal


@dataclass(frozen=True, slots=True)
class AdlRank:
    """One entry of the auto-deleveraging ranking; ``score`` is exact."""

    account_id: str
    score: Decimal
    rank: int


@dataclass(frozen=True, slots=True)
class ShortfallFigures:
    """The figures of a ShortfallAllocation."""

    shortfall: Decimal
    covered_by_insurance_fund: Decimal
    insurance_fund_balance_after: Decimal
    auto_deleveraging_amount: Decimal
    ranking: tuple[AdlRank, ...]

    def to_proto(self, liquidation_id: str) -> liquidation_pb2.ShortfallAllocation:
        """The unsigned message (its header is set when it is signed).

        Scores are cut down to 18 decimal places for the wire; ranks come from
        the exact scores.
        """
        return liquidation_pb2.ShortfallAllocation(
            liquidation_id=liquidation_id,
            shortfall=common_pb2.Decimal(value=format_amount(self.shortfall)),
            covered_by_insurance_fund=common_pb2.Decimal(
                value=format_amount(self.covered_by_insurance_fund)
            ),
            insurance_fund_balance_after=common_pb2.Decimal(
                value=format_amount(self.insurance_fund_balance_after)
            ),
            auto_deleveraging_amount=common_pb2.Decimal(
                value=format_amount(self.auto_deleveraging_amount)
            ),
            ranking=[
                liquidation_pb2.AutoDeleveragingRank(
                    account_id=entry.account_id,
                    score=common_pb2.Decimal(value=_wire(entry.score, "score")),
                    rank=entry.rank,
                )
                for entry in self.ranking
            ],
        )


def allocate_shortfall(
    policy: valuation_pb2.RiskPolicy, shortfall: Decimal, candidates: Sequence[AdlCandidate]
) -> ShortfallFigures:
    """Run the published waterfall (rule 11): insurance fund first, then the ADL ranking."""
    parsed = _parse_policy(policy)
    _checked_input(shortfall, "shortfall")
    seen: set[str] = set()
    for i, candidate in enumerate(candidates):
        field = f"candidates[{i}]"
        if not candidate.account_id:
            raise _malformed(f"{field}.account_id", "a non-empty account id", "''")
        if candidate.account_id in seen:
            raise _malformed(
                f"{field}.account_id",
                "one entry per account",
                f"a second entry for {candidate.account_id!r}",
            )
        seen.add(candidate.account_id)
        _checked_input(candidate.profit, f"{field}.profit", non_negative=False)
        _checked_input(candidate.effective_leverage, f"{field}.effective_leverage")

    covered = min(shortfall, parsed.insurance_fund_balance)
    remainder = _EXACT.subtract(shortfall, covered)
    ranking: tuple[AdlRank, ...] = ()
    if remainder > 0:
        scored = sorted(
            ((_EXACT.multiply(c.profit, c.effective_leverage), c.account_id) for c in candidates),
            key=lambda item: (_EXACT.minus(item[0]), item[1].encode("utf-8")),
        )
        ranking = tuple(
            AdlRank(account_id=account_id, score=score, rank=rank)
            for rank, (score, account_id) in enumerate(scored, start=1)
        )
    return ShortfallFigures(
        shortfall=shortfall,
        covered_by_insurance_fund=covered,
        insurance_fund_balance_after=_EXACT.subtract(parsed.insurance_fund_balance, covered),
        auto_deleveraging_amount=remainder,
        ranking=ranking,
    )


# --- verifiable margin calls and liquidation instructions ------------------------------


@dataclass(frozen=True, slots=True)
class MarginCallCheck:
    """A margin call confirmed from its signed inputs, with the recomputed figures."""

    margin_call: margin_pb2.MarginCall
    risk_policy: valuation_pb2.RiskPolicy
    #: The holdings statement valued (the latest epoch among the inputs).
    holdings: attestation_pb2.HoldingsStatement
    valuation: CollateralValuation
    exposure: Decimal
    collateral_value: Decimal
    collateral_ratio: Decimal
    call_amount: Decimal


@dataclass(frozen=True, slots=True)
class LiquidationCheck:
    """A liquidation instruction confirmed from its signed inputs."""

    instruction: liquidation_pb2.LiquidationInstruction
    risk_policy: valuation_pb2.RiskPolicy
    holdings: attestation_pb2.HoldingsStatement
    valuation: CollateralValuation
    #: The value to raise: the whole exposure.
    amount: Decimal
    collateral_value: Decimal
    #: None when the amount is 0 (only possible after an expired call).
    collateral_ratio: Decimal | None


@dataclass(frozen=True, slots=True)
class _Inputs:
    policy: valuation_pb2.RiskPolicy
    parsed: _Policy
    snapshot: valuation_pb2.PriceSnapshot
    holdings: attestation_pb2.HoldingsStatement


def _ns_text(ns: int) -> str:
    seconds, nanos = divmod(ns, _NS_PER_S)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()


def _verify_inputs(
    inputs: valuation_pb2.ValuationInputs,
    registry: KeyRegistry,
    *,
    header: envelope_pb2.StatementHeader,
    account_id: str,
    risk_policy_version: int,
    audience: str,
    what: str,
) -> _Inputs:
    """Verify a statement's ValuationInputs as evidence at its issued_at (PROTOCOL.md 8.2).

    ``header`` is the embedding statement's: its issuer must have issued the
    policy and the snapshot, and be the audience and pledgee of the holdings.
    """
    issuer = header.issuer
    issued_at = header.issued_at.ToDatetime(tzinfo=UTC)
    if not account_id:
        raise _malformed("account_id", "a non-empty account id", "''", what)
    for name in ("risk_policy", "price_snapshot"):
        if not inputs.HasField(name):
            raise _malformed(f"inputs.{name}", "a signed statement", "absent", what)
    if not inputs.holdings_statements:
        raise _malformed(
            "inputs.holdings_statements", "at least one signed statement", "none", what
        )

    policy = verify_statement(
        inputs.risk_policy,
        registry,
        expected_type=valuation_pb2.RiskPolicy,
        audience=audience,
        now=issued_at,
    ).message
    _same_issuer(policy.header.issuer, issuer, "inputs.risk_policy.header.issuer")
    parsed = _parse_policy(policy)
    if risk_policy_version != parsed.version:
        raise _refuted(
            "risk_policy_version",
            str(parsed.version),
            str(risk_policy_version),
            f"the {what} names another policy version than the signed policy it carries",
        )
    issued_ns = _timestamp_ns(header.issued_at)
    if policy.HasField("effective_from") and _timestamp_ns(policy.effective_from) > issued_ns:
        raise _refuted(
            "inputs.risk_policy.effective_from",
            f"<= {_ns_text(issued_ns)}",
            policy.effective_from.ToJsonString(),
            f"the policy was not yet in force when the {what} was issued",
        )

    snapshot = verify_statement(
        inputs.price_snapshot,
        registry,
        expected_type=valuation_pb2.PriceSnapshot,
        audience=audience,
        now=issued_at,
    ).message
    _same_issuer(snapshot.header.issuer, issuer, "inputs.price_snapshot.header.issuer")

    latest: attestation_pb2.HoldingsStatement | None = None
    epochs: set[int] = set()
    for i, holdings_envelope in enumerate(inputs.holdings_statements):
        field = f"inputs.holdings_statements[{i}]"
        holdings = verify_statement(
            holdings_envelope,
            registry,
            expected_type=attestation_pb2.HoldingsStatement,
            audience=issuer,
            now=issued_at,
        ).message
        if holdings.account_id != account_id:
            raise _refuted(
                f"{field}.account_id",
                account_id,
                holdings.account_id,
                "holdings statement of another account",
            )
        if holdings.exchange_id != issuer:
            raise _refuted(
                f"{field}.exchange_id",
                issuer,
                holdings.exchange_id,
                f"holdings not pledged to the exchange that issued the {what}",
            )
        if holdings.epoch in epochs:
            raise _refuted(
                f"{field}.epoch",
                "one statement per epoch",
                str(holdings.epoch),
                "two holdings statements for one epoch",
            )
        epochs.add(holdings.epoch)
        if latest is None or holdings.epoch > latest.epoch:
            latest = holdings
    assert latest is not None  # at least one statement, checked above
    return _Inputs(policy=policy, parsed=parsed, snapshot=snapshot, holdings=latest)


def _same_issuer(issuer: str, expected: str, field: str) -> None:
    if issuer != expected:
        raise _refuted(field, expected, issuer, "an input must be issued by the issuer it backs")


def _compare(field: str, recomputed: Decimal, stated: Decimal) -> Decimal:
    if recomputed != stated:
        raise _refuted(
            field,
            format_amount(recomputed),
            format_amount(stated),
            "the stated figure differs from the one recomputed from the signed inputs",
        )
    return recomputed


def _stated(parent: Message, name: str, what: str, *, field: str | None = None) -> Decimal:
    field = field or name
    return _non_negative(_amount(parent, name, field, what), field, what)


def recompute_margin_call(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    audience: str,
    asset_classes: Mapping[str, AssetClass] | None = None,
    now: datetime,
) -> MarginCallCheck:
    """Verify a signed MarginCall and recompute every figure from its signed inputs.

    ``audience`` is the verifying party's id; the call must be addressed to it
    and fresh at ``now``. Each input is verified as evidence at the call's
    issued_at: the risk policy and the price snapshot issued by the call's
    issuer and addressed to ``audience`` (or ``"*"``), the holdings statements
    issued by a custodian, addressed to the call's issuer, for the call's
    account, pledged to the call's issuer, with distinct epochs (the latest
    counts). The valuation time is the call's issued_at. Then collateral
    value, collateral ratio, call amount and ``due_by`` (issued_at +
    cure_period) are compared with the call.

    Returns the recomputed figures. Raises VerificationError (PROOF_INVALID,
    metadata field/expected/actual) on any mismatch, including a call stated
    where none is due; MalformedError for missing or invalid fields; and
    whatever :func:`~collateral_sync.signing.verify_statement` raises for a
    statement that does not verify.
    """
    call = verify_statement(
        envelope, registry, expected_type=margin_pb2.MarginCall, audience=audience, now=now
    ).message
    what = "margin call"
    inputs = _verify_inputs(
        call.inputs,
        registry,
        header=call.header,
        account_id=call.account_id,
        risk_policy_version=call.risk_policy_version,
        audience=audience,
        what=what,
    )
    policy = inputs.parsed
    exposure = _stated(call, "exposure", what)
    stated_value = _stated(call, "collateral_value", what)
    stated_ratio = _stated(call, "collateral_ratio", what)
    stated_amount = _stated(call, "call_amount", what)

    issued_ns = _timestamp_ns(call.header.issued_at)
    valuation = _value(
        policy, inputs.holdings.positions, inputs.snapshot.prices, asset_classes or {}, issued_ns
    )
    value = _compare("collateral_value", valuation.collateral_value, stated_value)
    ratio = _ratio(policy, value, exposure)
    if ratio is None:
        raise _refuted(
            "exposure", "> 0 (no margin call without exposure)", "0", "margin call not due"
        )
    ratio = _compare("collateral_ratio", ratio, stated_ratio)
    amount = _call_amount(policy, value, exposure)
    if amount is None:
        raise _refuted(
            "call_amount",
            f"no call (collateral_ratio {format_amount(ratio)} >= maintenance_ratio "
            f"{format_amount(policy.maintenance_ratio)})",
            format_amount(stated_amount),
            "margin call not due",
        )
    amount = _compare("call_amount", amount, stated_amount)
    due_ns = issued_ns + _duration_ns(inputs.policy.cure_period)
    stated_due = _ns_text(_timestamp_ns(call.due_by)) if call.HasField("due_by") else "absent"
    if not call.HasField("due_by") or _timestamp_ns(call.due_by) != due_ns:
        raise _refuted(
            "due_by", _ns_text(due_ns), stated_due, "due_by is not issued_at + cure_period"
        )
    return MarginCallCheck(
        margin_call=call,
        risk_policy=inputs.policy,
        holdings=inputs.holdings,
        valuation=valuation,
        exposure=exposure,
        collateral_value=value,
        collateral_ratio=ratio,
        call_amount=amount,
    )


def recompute_liquidation_instruction(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    audience: str,
    asset_classes: Mapping[str, AssetClass] | None = None,
    now: datetime,
    margin_call: margin_pb2.MarginCall | None = None,
) -> LiquidationCheck:
    """Verify a signed LiquidationInstruction and recompute it from its signed inputs.

    Inputs are verified as for :func:`recompute_margin_call`. For a breach
    (empty ``margin_call_id``) the ratio of the valued holdings to ``amount``
    (the exposure) must be below the liquidation ratio. After a margin call,
    pass that call (already verified, e.g. from its MarginCallState): it must
    be the one named, for the same account, and ``amount`` must equal its
    exposure. Whether the call has EXPIRED is state, checked by the caller.
    Mismatches raise VerificationError (PROOF_INVALID, field/expected/actual).
    """
    instruction = verify_statement(
        envelope,
        registry,
        expected_type=liquidation_pb2.LiquidationInstruction,
        audience=audience,
        now=now,
    ).message
    what = "liquidation instruction"
    inputs = _verify_inputs(
        instruction.inputs,
        registry,
        header=instruction.header,
        account_id=instruction.account_id,
        risk_policy_version=instruction.risk_policy_version,
        audience=audience,
        what=what,
    )
    policy = inputs.parsed
    amount = _stated(instruction, "amount", what)
    valuation = _value(
        policy,
        inputs.holdings.positions,
        inputs.snapshot.prices,
        asset_classes or {},
        _timestamp_ns(instruction.header.issued_at),
    )
    ratio = _ratio(policy, valuation.collateral_value, amount)
    if instruction.margin_call_id:
        if margin_call is None:
            raise ValueError(
                f"the instruction follows margin call {instruction.margin_call_id!r}; "
                "pass that call as margin_call"
            )
        if margin_call.margin_call_id != instruction.margin_call_id:
            raise _refuted(
                "margin_call_id",
                margin_call.margin_call_id,
                instruction.margin_call_id,
                "the instruction names another margin call",
            )
        if margin_call.account_id != instruction.account_id:
            raise _refuted(
                "account_id",
                margin_call.account_id,
                instruction.account_id,
                "the margin call is for another account",
            )
        _compare("amount", _stated(margin_call, "exposure", "margin call"), amount)
    elif ratio is None or ratio >= policy.liquidation_ratio:
        shown = "undefined (exposure 0)" if ratio is None else format_amount(ratio)
        raise _refuted(
            "amount",
            f"no liquidation (collateral_ratio {shown}, liquidation_ratio "
            f"{format_amount(policy.liquidation_ratio)})",
            format_amount(amount),
            "liquidation not due",
        )
    return LiquidationCheck(
        instruction=instruction,
        risk_policy=inputs.policy,
        holdings=inputs.holdings,
        valuation=valuation,
        amount=amount,
        collateral_value=valuation.collateral_value,
        collateral_ratio=ratio,
    )
