// Risk policies (PROTOCOL.md §7.1): a RiskPolicy checked and parsed once into the figures the
// arithmetic uses.
//
// A valid policy has canonical Decimals; collateral factors, caps and stale_price_factor in
// [0, 1] (the factor may be absent unless the rule is LAST_PRICE); leverage_cap > 0;
// 0 ≤ liquidation_ratio ≤ maintenance_ratio, both with at most rounding_scale fraction digits;
// insurance_fund_balance ≥ 0; rounding_scale ≤ 18; max_price_age ≥ 0; custodian_staleness_window
// > 0 if set (300 s if not: the exchange's rule of §11.2, not a figure here); defined stale-price and
// auto-deleveraging rules; defined classes; at most one haircut per class, one override per
// asset and one cap per class. Anything else is MALFORMED (INVALID_AMOUNT for a non-canonical
// or negative Decimal), naming the field. Mirrors sdk/collateral_sync/valuation/_policy.py.

import { type Amount, formatAmount, MAX_FRACTION_DIGITS } from "../amounts.js";
import { AssetClass, AssetClassSchema, type Decimal } from "../gen/collateral_sync/v1/common_pb.js";
import { AutoDeleveragingRule, type RiskPolicy, StalePriceRule } from "../gen/collateral_sync/v1/valuation_pb.js";
import { NS_PER_S } from "../time.js";
import { decimalPlaces, durationNs, malformed, ONE, requiredNonNegative, ZERO } from "./arith.js";

const WHAT = "risk policy";

/** A risk policy checked and parsed once. */
export interface ParsedPolicy {
  readonly version: bigint;
  readonly classFactors: ReadonlyMap<AssetClass, Amount>;
  /** asset id → [class, factor] of its own haircut. */
  readonly assetHaircuts: ReadonlyMap<string, readonly [AssetClass, Amount]>;
  /** asset id → class, from the policy's signed asset list. */
  readonly assetClasses: ReadonlyMap<string, AssetClass>;
  readonly caps: ReadonlyMap<AssetClass, Amount>;
  readonly leverageCap: Amount;
  readonly maintenanceRatio: Amount;
  readonly liquidationRatio: Amount;
  readonly insuranceFundBalance: Amount;
  readonly maxPriceAgeNs: bigint;
  readonly stalePriceRule: StalePriceRule;
  /** 0 when absent (only LAST_PRICE uses it, and there it is required). */
  readonly stalePriceFactor: Amount;
  readonly roundingScale: number;
  readonly autoDeleveragingRule: AutoDeleveragingRule;
}

/** The window of a policy that sets none (PROTOCOL.md §7.1, §11.2): 300 s, in nanoseconds. */
export const DEFAULT_CUSTODIAN_STALENESS_WINDOW_NS = 300n * NS_PER_S;

/**
 * How long an exchange under `policy` may hear nothing from a custodian (§11.2), in
 * nanoseconds: the policy's `custodian_staleness_window`, or 300 s if it sets none. The policy
 * is assumed valid (`validateRiskPolicy`). Mirrors `custodian_staleness_window` in Python.
 */
export function custodianStalenessWindowNs(policy: RiskPolicy): bigint {
  const window = policy.custodianStalenessWindow;
  return window === undefined ? DEFAULT_CUSTODIAN_STALENESS_WINDOW_NS : durationNs(window);
}

/** The wire name of an asset class ("ASSET_CLASS_STABLECOIN"), or its number if undefined. */
export function assetClassName(value: number): string {
  return AssetClassSchema.value[value as AssetClass]?.name ?? String(value);
}

function atMost(value: Amount, high: Amount, field: string, what: string): Amount {
  if (value.compare(high) > 0) throw malformed(field, `<= ${formatAmount(high)}`, formatAmount(value), what);
  return value;
}

function checkClass(value: AssetClass, field: string): AssetClass {
  if (value === AssetClass.UNSPECIFIED || AssetClassSchema.value[value] === undefined) {
    throw malformed(field, "a defined AssetClass other than UNSPECIFIED", assetClassName(value), WHAT);
  }
  return value;
}

/** A required Decimal in [0, 1]. */
function fraction(value: Decimal | undefined, field: string): Amount {
  return atMost(requiredNonNegative(value, field, WHAT), ONE, field, WHAT);
}

function nonEmptyId(id: string, field: string): string {
  if (!id) throw malformed(field, "a non-empty asset id", "''", WHAT);
  return id;
}

/** Check and parse a policy (§7.1); throws MalformedError naming the first offending field. */
export function parsePolicy(policy: RiskPolicy): ParsedPolicy {
  const scale = policy.roundingScale;
  if (scale > MAX_FRACTION_DIGITS) {
    throw malformed("rounding_scale", `<= ${MAX_FRACTION_DIGITS}`, String(scale), WHAT);
  }

  const classFactors = new Map<AssetClass, Amount>();
  policy.haircuts.forEach((haircut, i) => {
    const field = `haircuts[${i}]`;
    const assetClass = checkClass(haircut.assetClass, `${field}.asset_class`);
    if (classFactors.has(assetClass)) {
      const actual = `a second haircut for ${assetClassName(assetClass)}`;
      throw malformed(`${field}.asset_class`, "one haircut per class", actual, WHAT);
    }
    classFactors.set(assetClass, fraction(haircut.collateralFactor, `${field}.collateral_factor`));
  });

  const assetHaircuts = new Map<string, readonly [AssetClass, Amount]>();
  policy.assetHaircuts.forEach((haircut, i) => {
    const field = `asset_haircuts[${i}]`;
    const assetId = nonEmptyId(haircut.assetId, `${field}.asset_id`);
    if (assetHaircuts.has(assetId)) {
      const actual = `a second haircut for ${JSON.stringify(assetId)}`;
      throw malformed(`${field}.asset_id`, "one haircut per asset", actual, WHAT);
    }
    const assetClass = checkClass(haircut.assetClass, `${field}.asset_class`);
    assetHaircuts.set(assetId, [assetClass, fraction(haircut.collateralFactor, `${field}.collateral_factor`)]);
  });

  const assetClasses = new Map<string, AssetClass>();
  policy.assets.forEach((asset, i) => {
    const field = `assets[${i}]`;
    const assetId = nonEmptyId(asset.assetId, `${field}.asset_id`);
    if (assetClasses.has(assetId)) {
      const actual = `a second entry for ${JSON.stringify(assetId)}`;
      throw malformed(`${field}.asset_id`, "each asset listed once", actual, WHAT);
    }
    assetClasses.set(assetId, checkClass(asset.assetClass, `${field}.asset_class`));
  });

  const caps = new Map<AssetClass, Amount>();
  policy.concentrationCaps.forEach((cap, i) => {
    const field = `concentration_caps[${i}]`;
    const assetClass = checkClass(cap.assetClass, `${field}.asset_class`);
    if (caps.has(assetClass)) {
      const actual = `a second cap for ${assetClassName(assetClass)}`;
      throw malformed(`${field}.asset_class`, "one cap per class", actual, WHAT);
    }
    caps.set(assetClass, fraction(cap.maxShare, `${field}.max_share`));
  });

  const leverageCap = requiredNonNegative(policy.leverageCap, "leverage_cap", WHAT);
  if (leverageCap.isZero()) throw malformed("leverage_cap", "> 0", "0", WHAT);
  const maintenanceRatio = requiredNonNegative(policy.maintenanceRatio, "maintenance_ratio", WHAT);
  const liquidationRatio = atMost(
    requiredNonNegative(policy.liquidationRatio, "liquidation_ratio", WHAT),
    maintenanceRatio,
    "liquidation_ratio",
    `${WHAT} (liquidation_ratio <= maintenance_ratio)`,
  );
  for (const [field, ratio] of [
    ["maintenance_ratio", maintenanceRatio],
    ["liquidation_ratio", liquidationRatio],
  ] as const) {
    if (decimalPlaces(ratio) > scale) {
      throw malformed(field, `at most rounding_scale=${scale} decimal places`, formatAmount(ratio), WHAT);
    }
  }
  const insuranceFundBalance = requiredNonNegative(policy.insuranceFundBalance, "insurance_fund_balance", WHAT);

  const age = policy.maxPriceAge;
  if (age !== undefined && (age.seconds < 0n || age.nanos < 0 || BigInt(age.nanos) >= NS_PER_S)) {
    throw malformed("max_price_age", "a non-negative duration", `seconds=${age.seconds} nanos=${age.nanos}`, WHAT);
  }
  const window = policy.custodianStalenessWindow;
  if (
    window !== undefined &&
    (window.seconds < 0n ||
      window.nanos < 0 ||
      BigInt(window.nanos) >= NS_PER_S ||
      (window.seconds === 0n && window.nanos === 0))
  ) {
    throw malformed(
      "custodian_staleness_window",
      "a positive duration, or none (300 s)",
      `seconds=${window.seconds} nanos=${window.nanos}`,
      WHAT,
    );
  }
  const rule = policy.stalePriceRule;
  if (rule !== StalePriceRule.ZERO && rule !== StalePriceRule.LAST_PRICE) {
    throw malformed("stale_price_rule", "STALE_PRICE_RULE_ZERO or STALE_PRICE_RULE_LAST_PRICE", String(rule), WHAT);
  }
  // The factor only matters under LAST_PRICE; elsewhere it may be left empty.
  const stalePriceFactor =
    rule === StalePriceRule.LAST_PRICE || policy.stalePriceFactor !== undefined
      ? fraction(policy.stalePriceFactor, "stale_price_factor")
      : ZERO;
  const adlRule = policy.autoDeleveragingRule;
  if (adlRule !== AutoDeleveragingRule.PROFIT_TIMES_LEVERAGE) {
    throw malformed(
      "auto_deleveraging_rule",
      "AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE",
      String(adlRule),
      WHAT,
    );
  }

  return {
    version: policy.version,
    classFactors,
    assetHaircuts,
    assetClasses,
    caps,
    leverageCap,
    maintenanceRatio,
    liquidationRatio,
    insuranceFundBalance,
    maxPriceAgeNs: durationNs(age),
    stalePriceRule: rule,
    stalePriceFactor,
    roundingScale: scale,
    autoDeleveragingRule: adlRule,
  };
}

/** Refuse a policy the arithmetic is not defined for (§7.1); see parsePolicy. */
export function validateRiskPolicy(policy: RiskPolicy): void {
  parsePolicy(policy);
}
