// Valuation, credit, margin-call and liquidation arithmetic, and its recomputation from signed
// inputs (PROTOCOL.md §7.1–§7.3, §8.2, §9.2, §9.5). Every figure is computed exactly on bigint
// decimals (amounts.ts) and rounded once where the document says: RD for collateral, credit
// and ratios, RU for the call amount. Written from the document; the vectors in
// vectors/valuation.json check it against the Python SDK (sdk/collateral_sync/valuation).
//
//   valuation/policy.ts      §7.1  a RiskPolicy checked and parsed once
//   valuation/collateral.ts  §7.3  positions and prices → collateral value, credit limit,
//                                  ratio, margin call amount, liquidation amount
//   valuation/shortfall.ts   §9.5  shortfall, insurance fund, auto-deleveraging ranking
//   valuation/recompute.ts   §8.2, §9.2  signed MarginCall / LiquidationInstruction recomputed
//   valuation/release.ts     §5.10  a pledge release judged; a signed consent recomputed
//   valuation/arith.ts       §2.3  exact quotient, wire rounding, the refusals they share

export {
  assetClassName,
  custodianStalenessWindowNs,
  DEFAULT_CUSTODIAN_STALENESS_WINDOW_NS,
  parsePolicy,
  validateRiskPolicy,
  type ParsedPolicy,
} from "./valuation/policy.js";
export {
  collateralRatio,
  creditLineFigures,
  liquidationAmount,
  marginCallAmount,
  needsLiquidation,
  positionValuationToProto,
  valueCollateral,
  type CollateralValuation,
  type CreditLineFigures,
  type ValueCollateralOptions,
  type ValuedPosition,
} from "./valuation/collateral.js";
export {
  allocateShortfall,
  liquidationShortfall,
  shortfallAllocationToProto,
  type AdlCandidate,
  type AdlRank,
  type ShortfallFigures,
} from "./valuation/shortfall.js";
export {
  recomputeLiquidationInstruction,
  recomputeMarginCall,
  type LiquidationCheck,
  type MarginCallCheck,
  type RecomputeLiquidationOptions,
  type RecomputeOptions,
} from "./valuation/recompute.js";
export {
  judgeRelease,
  recomputePledgeReleaseConsent,
  releasedQuantities,
  type JudgeReleaseOptions,
  type PledgeReleaseConsentCheck,
  type Release,
  type ReleaseJudgement,
  type ReleaseRefusal,
} from "./valuation/release.js";
