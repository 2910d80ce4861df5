"""The shortfall waterfall: what a liquidation failed to raise, and who bears it.

Rule 11 of :mod:`collateral_sync.valuation`: the insurance fund covers what it
can; the rest is auto-deleveraged over a ranking of the candidate accounts,
highest exact profit times effective leverage first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from collateral_sync.amounts import format_amount
from collateral_sync.v1 import common_pb2, liquidation_pb2, valuation_pb2
from collateral_sync.valuation._arith import _EXACT, _ZERO, _checked_input, _malformed, _wire
from collateral_sync.valuation._policy import _parse_policy

__all__ = [
    "AdlCandidate",
    "AdlRank",
    "ShortfallFigures",
    "allocate_shortfall",
    "liquidation_shortfall",
]


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

        Scores are rounded toward zero to 18 decimal places for the wire (a
        negative score too); ranks come from the exact scores.
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
