// The shortfall waterfall (PROTOCOL.md §9.4, §9.5): what a liquidation failed to raise, and who
// bears it. The insurance fund covers what it can; the rest is auto-deleveraged over the
// ranking of AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE: highest exact profit × effective
// leverage first, ties by ascending bytewise UTF-8 account id. Mirrors
// sdk/collateral_sync/valuation/_shortfall.py.

import { create } from "@bufbuild/protobuf";
import { type Amount, formatAmount } from "../amounts.js";
import { DecimalSchema } from "../gen/collateral_sync/v1/common_pb.js";
import {
  AutoDeleveragingRankSchema,
  type ShortfallAllocation,
  ShortfallAllocationSchema,
} from "../gen/collateral_sync/v1/liquidation_pb.js";
import type { RiskPolicy } from "../gen/collateral_sync/v1/valuation_pb.js";
import { checkedInput, compareUtf8, malformed, wire, ZERO } from "./arith.js";
import { parsePolicy } from "./policy.js";

/** max(0, amount − proceeds): what the liquidation failed to raise (§9.4). */
export function liquidationShortfall(amount: Amount, proceeds: Amount): Amount {
  checkedInput(amount, "amount");
  checkedInput(proceeds, "proceeds");
  const shortfall = amount.subtract(proceeds);
  return shortfall.isNegative() ? ZERO : shortfall;
}

/** An account that may be auto-deleveraged, with the exchange's figures for it. */
export interface AdlCandidate {
  readonly accountId: string;
  /** May be negative. */
  readonly profit: Amount;
  readonly effectiveLeverage: Amount;
}

/** One entry of the auto-deleveraging ranking; `score` is exact. */
export interface AdlRank {
  readonly accountId: string;
  readonly score: Amount;
  readonly rank: number;
}

/** The figures of a ShortfallAllocation. */
export interface ShortfallFigures {
  readonly shortfall: Amount;
  readonly coveredByInsuranceFund: Amount;
  readonly insuranceFundBalanceAfter: Amount;
  readonly autoDeleveragingAmount: Amount;
  /** Empty when nothing is left to deleverage. */
  readonly ranking: readonly AdlRank[];
}

/** Run the published waterfall (§9.5): the insurance fund first, then the ADL ranking. */
export function allocateShortfall(
  policy: RiskPolicy,
  shortfall: Amount,
  candidates: readonly AdlCandidate[],
): ShortfallFigures {
  const parsed = parsePolicy(policy);
  checkedInput(shortfall, "shortfall");
  const seen = new Set<string>();
  candidates.forEach((candidate, i) => {
    const field = `candidates[${i}]`;
    if (!candidate.accountId) throw malformed(`${field}.account_id`, "a non-empty account id", "''");
    if (seen.has(candidate.accountId)) {
      const actual = `a second entry for ${JSON.stringify(candidate.accountId)}`;
      throw malformed(`${field}.account_id`, "one entry per account", actual);
    }
    seen.add(candidate.accountId);
    checkedInput(candidate.profit, `${field}.profit`, { nonNegative: false });
    checkedInput(candidate.effectiveLeverage, `${field}.effective_leverage`);
  });

  const balance = parsed.insuranceFundBalance;
  const covered = shortfall.compare(balance) <= 0 ? shortfall : balance;
  const remainder = shortfall.subtract(covered);
  let ranking: AdlRank[] = [];
  if (remainder.compare(ZERO) > 0) {
    const scored = candidates.map((c) => ({ accountId: c.accountId, score: c.profit.multiply(c.effectiveLeverage) }));
    scored.sort((a, b) => b.score.compare(a.score) || compareUtf8(a.accountId, b.accountId));
    ranking = scored.map((entry, i) => ({ ...entry, rank: i + 1 }));
  }
  return {
    shortfall,
    coveredByInsuranceFund: covered,
    insuranceFundBalanceAfter: balance.subtract(covered),
    autoDeleveragingAmount: remainder,
    ranking,
  };
}

/**
 * The unsigned ShortfallAllocation (its header is set when it is signed). Scores are rounded
 * toward zero to 18 fraction digits for the wire (§9.5); the ranks come from the exact scores.
 */
export function shortfallAllocationToProto(figures: ShortfallFigures, liquidationId: string): ShortfallAllocation {
  const decimal = (value: Amount) => create(DecimalSchema, { value: formatAmount(value) });
  return create(ShortfallAllocationSchema, {
    liquidationId,
    shortfall: decimal(figures.shortfall),
    coveredByInsuranceFund: decimal(figures.coveredByInsuranceFund),
    insuranceFundBalanceAfter: decimal(figures.insuranceFundBalanceAfter),
    autoDeleveragingAmount: decimal(figures.autoDeleveragingAmount),
    ranking: figures.ranking.map((entry) =>
      create(AutoDeleveragingRankSchema, {
        accountId: entry.accountId,
        score: create(DecimalSchema, { value: wire(entry.score, "score") }),
        rank: entry.rank,
      }),
    ),
  });
}
