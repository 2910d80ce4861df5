"""Valuation, credit, margin-call and liquidation arithmetic, and their recomputation.

Every figure an exchange derives from attested collateral — collateral value,
credit limit, collateral ratio, margin call amount, liquidation amount,
shortfall allocation — is computed here by pure functions over exact
``decimal.Decimal`` values (never floats), so a custodian running the same
functions on the same signed inputs gets the same figures to the last digit.
:func:`recompute_margin_call` and :func:`recompute_liquidation_instruction`
do exactly that for a signed ``MarginCall`` or ``LiquidationInstruction``;
:func:`judge_release` decides whether an exchange may consent to a pledge
release, and :func:`recompute_pledge_release_consent` recomputes a signed
``PledgeReleaseConsent`` (PROTOCOL.md §5.10).

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
max_price_age >= 0; custodian_staleness_window > 0 if set (300 s if not,
:func:`custodian_staleness_window`); defined stale-price and auto-deleveraging rules; defined
classes; at most one haircut per class, one override per asset and one cap
per class. :func:`validate_risk_policy` refuses anything else with
:class:`~collateral_sync.errors.MalformedError` naming the field in metadata
``field`` and in ``field_violations``.

Error reasons for amounts (PROTOCOL.md 2.1, 2.2): a required Decimal that is
absent is MALFORMED; one that is present but not canonical, or negative where
the protocol says non-negative, is INVALID_AMOUNT; a value outside its range
for another reason (a factor above 1, a zero leverage cap) is MALFORMED.

On the wire, ``PositionValuation.price`` and ``market_value`` and ADL scores
are rounded toward zero to 18 decimal places (a product of two 18-place
amounts can have 36; a score may be negative, and -0.1851851835185185185
becomes -0.185185183518518518); they are reported, never used to recompute.

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

from collateral_sync.valuation._collateral import (
    CollateralValuation,
    CreditLineFigures,
    PositionValuation,
    collateral_ratio,
    credit_line_figures,
    liquidation_amount,
    margin_call_amount,
    needs_liquidation,
    value_collateral,
)
from collateral_sync.valuation._policy import (
    DEFAULT_CUSTODIAN_STALENESS_WINDOW,
    custodian_staleness_window,
    validate_risk_policy,
)
from collateral_sync.valuation._recompute import (
    LiquidationCheck,
    MarginCallCheck,
    recompute_liquidation_instruction,
    recompute_margin_call,
)
from collateral_sync.valuation._release import (
    PledgeReleaseConsentCheck,
    ReleaseJudgement,
    ReleaseRefusal,
    judge_release,
    recompute_pledge_release_consent,
    released_quantities,
)
from collateral_sync.valuation._shortfall import (
    AdlCandidate,
    AdlRank,
    ShortfallFigures,
    allocate_shortfall,
    liquidation_shortfall,
)

__all__ = [
    "DEFAULT_CUSTODIAN_STALENESS_WINDOW",
    "AdlCandidate",
    "AdlRank",
    "CollateralValuation",
    "CreditLineFigures",
    "LiquidationCheck",
    "MarginCallCheck",
    "PledgeReleaseConsentCheck",
    "PositionValuation",
    "ReleaseJudgement",
    "ReleaseRefusal",
    "ShortfallFigures",
    "allocate_shortfall",
    "collateral_ratio",
    "credit_line_figures",
    "custodian_staleness_window",
    "judge_release",
    "liquidation_amount",
    "liquidation_shortfall",
    "margin_call_amount",
    "needs_liquidation",
    "recompute_liquidation_instruction",
    "recompute_margin_call",
    "recompute_pledge_release_consent",
    "released_quantities",
    "validate_risk_policy",
    "value_collateral",
]
