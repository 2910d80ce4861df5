// Collateral valuation and the figures that follow from it (PROTOCOL.md §7.3, §8.2, §9.2).
//
// Steps 1–7 of §7.3 turn positions and prices into a CollateralValuation; steps 8–11 turn its
// collateral value and an exposure into a credit limit, a collateral ratio, a margin call
// amount and a liquidation amount. Every step before a rounding is exact (bigint), and each
// published figure is rounded once: RD for what counts as collateral or credit, RU for the
// call amount. Mirrors sdk/collateral_sync/valuation/_collateral.py.

import { create } from "@bufbuild/protobuf";
import { type Amount, formatAmount } from "../amounts.js";
import { AssetClass, DecimalSchema, type Position } from "../gen/collateral_sync/v1/common_pb.js";
import {
  type PositionValuation as PositionValuationMessage,
  PositionValuationSchema,
  type PriceQuote,
  type RiskPolicy,
  StalePriceRule,
} from "../gen/collateral_sync/v1/valuation_pb.js";
import { type Instant, instantNs, timestampNs } from "../time.js";
import { checkedInput, divideDown, malformed, requiredNonNegative, wire, ZERO } from "./arith.js";
import { type ParsedPolicy, parsePolicy } from "./policy.js";

/** One position valued under a policy. Values are exact except `collateralValue`. */
export interface ValuedPosition {
  readonly assetId: string;
  /** AssetClass.UNSPECIFIED for an unknown asset. */
  readonly assetClass: AssetClass;
  readonly eligibleQuantity: Amount;
  /** The price counted: 0 if missing or stale under ZERO, × the stale factor under LAST_PRICE. */
  readonly price: Amount;
  readonly marketValue: Amount;
  readonly collateralFactor: Amount;
  /** marketValue × collateralFactor, before any concentration cap. */
  readonly haircutValue: Amount;
  /** After the concentration cap, rounded down at the policy's rounding scale. */
  readonly collateralValue: Amount;
}

/** The valuation of a set of positions: one row per position, in input order. */
export interface CollateralValuation {
  readonly positions: readonly ValuedPosition[];
  /** T of §7.3 step 5: the sum of the exact haircut values before caps. */
  readonly haircutTotal: Amount;
  /** The sum of the rounded position collateral values (step 7). */
  readonly collateralValue: Amount;
  readonly valuedAtNs: bigint;
}

/** The figures of a CreditLine. */
export interface CreditLineFigures {
  readonly collateralValue: Amount;
  /** RD(collateralValue × leverage_cap, s). */
  readonly creditLimit: Amount;
  readonly exposure: Amount;
  /** undefined when the exposure is 0. */
  readonly collateralRatio: Amount | undefined;
}

export interface ValueCollateralOptions {
  /** The valuation time t: the issued_at of the statement publishing the figures. */
  valuedAt: Instant;
  /** The arrangement's asset list (asset id → class), for assets the policy does not list. */
  assetClasses?: ReadonlyMap<string, AssetClass> | Readonly<Record<string, AssetClass>> | undefined;
}

/** The wire row of a position; price and market value rounded toward zero to 18 places. */
export function positionValuationToProto(row: ValuedPosition): PositionValuationMessage {
  const decimal = (value: string) => create(DecimalSchema, { value });
  return create(PositionValuationSchema, {
    assetId: row.assetId,
    assetClass: row.assetClass,
    eligibleQuantity: decimal(formatAmount(row.eligibleQuantity, { field: "eligible_quantity" })),
    price: decimal(wire(row.price, "price")),
    marketValue: decimal(wire(row.marketValue, "market_value")),
    collateralFactor: decimal(formatAmount(row.collateralFactor, { field: "collateral_factor" })),
    collateralValue: decimal(formatAmount(row.collateralValue, { field: "collateral_value" })),
  });
}

/** Value `positions` under `policy` at `valuedAt` (§7.3 steps 1–7). */
export function valueCollateral(
  policy: RiskPolicy,
  positions: readonly Position[],
  prices: readonly PriceQuote[],
  options: ValueCollateralOptions,
): CollateralValuation {
  const given = options.assetClasses ?? {};
  const classes = given instanceof Map ? given : new Map(Object.entries(given));
  return valueParsed(parsePolicy(policy), positions, prices, classes, instantNs(options.valuedAt));
}

function parsePrices(prices: readonly PriceQuote[]): Map<string, readonly [Amount, bigint]> {
  const byAsset = new Map<string, readonly [Amount, bigint]>();
  prices.forEach((quote, i) => {
    const field = `prices[${i}]`;
    if (!quote.assetId) throw malformed(`${field}.asset_id`, "a non-empty asset id", "''", "price");
    if (byAsset.has(quote.assetId)) {
      // Two prices for one asset would let each side pick a different one.
      const actual = `a second price for ${JSON.stringify(quote.assetId)}`;
      throw malformed(`${field}.asset_id`, "one price per asset", actual, "price");
    }
    if (quote.observedAt === undefined) throw malformed(`${field}.observed_at`, "a timestamp", "unset", "price");
    const price = requiredNonNegative(quote.price, `${field}.price`, "price");
    byAsset.set(quote.assetId, [price, timestampNs(quote.observedAt)]);
  });
  return byAsset;
}

/** Step 1: max(0, min(pledged, quantity − locked)). */
function eligible(position: Position, field: string): Amount {
  const quantity = requiredNonNegative(position.quantity, `${field}.quantity`, "position");
  const locked = requiredNonNegative(position.lockedQuantity, `${field}.locked_quantity`, "position");
  const pledged = requiredNonNegative(position.pledgedQuantity, `${field}.pledged_quantity`, "position");
  const free = quantity.subtract(locked);
  const counted = pledged.compare(free) < 0 ? pledged : free;
  return counted.isNegative() ? ZERO : counted;
}

/** §7.3 steps 1–7 under a parsed policy. */
export function valueParsed(
  policy: ParsedPolicy,
  positions: readonly Position[],
  prices: readonly PriceQuote[],
  assetClasses: ReadonlyMap<string, AssetClass>,
  valuedAtNs: bigint,
): CollateralValuation {
  const quotes = parsePrices(prices);
  const scale = policy.roundingScale;

  // Steps 1 to 4, exactly.
  const rows = positions.map((position, i) => {
    const field = `positions[${i}]`;
    if (!position.assetId) throw malformed(`${field}.asset_id`, "a non-empty asset id", "''", "position");
    const eligibleQuantity = eligible(position, field);
    const assetId = position.assetId;
    const override = policy.assetHaircuts.get(assetId);
    let assetClass: AssetClass;
    let factor: Amount;
    if (override !== undefined) {
      [assetClass, factor] = override;
    } else {
      assetClass = policy.assetClasses.get(assetId) ?? assetClasses.get(assetId) ?? AssetClass.UNSPECIFIED;
      factor = policy.classFactors.get(assetClass) ?? ZERO;
    }
    const quote = quotes.get(assetId);
    let price = ZERO;
    if (quote !== undefined) {
      const [quoted, observedNs] = quote;
      const stale = valuedAtNs - observedNs > policy.maxPriceAgeNs;
      price = !stale
        ? quoted
        : policy.stalePriceRule === StalePriceRule.LAST_PRICE
          ? quoted.multiply(policy.stalePriceFactor)
          : ZERO;
    }
    const marketValue = eligibleQuantity.multiply(price);
    const haircutValue = marketValue.multiply(factor);
    return { assetId, assetClass, eligibleQuantity, price, marketValue, collateralFactor: factor, haircutValue };
  });

  // Step 5: caps against the uncapped total, once.
  const total = rows.reduce((sum, row) => sum.add(row.haircutValue), ZERO);
  const classTotals = new Map<AssetClass, Amount>();
  for (const row of rows) {
    classTotals.set(row.assetClass, (classTotals.get(row.assetClass) ?? ZERO).add(row.haircutValue));
  }
  const allowed = new Map<AssetClass, Amount>();
  for (const [assetClass, cap] of policy.caps) {
    const limit = cap.multiply(total);
    if ((classTotals.get(assetClass) ?? ZERO).compare(limit) > 0) allowed.set(assetClass, limit);
  }

  // Steps 6 and 7: round each position down (a capped one from one exact quotient), then add.
  const valued: ValuedPosition[] = rows.map((row) => {
    const limit = allowed.get(row.assetClass);
    const classTotal = classTotals.get(row.assetClass);
    const collateralValue =
      limit === undefined || classTotal === undefined
        ? row.haircutValue.roundDown(scale)
        : divideDown(row.haircutValue.multiply(limit), classTotal, scale);
    return { ...row, collateralValue };
  });
  return {
    positions: valued,
    haircutTotal: total,
    collateralValue: valued.reduce((sum, row) => sum.add(row.collateralValue), ZERO),
    valuedAtNs,
  };
}

/** Step 9 under a parsed policy: RD(collateral / exposure, s), undefined when exposure is 0. */
export function ratioOf(policy: ParsedPolicy, collateralValue: Amount, exposure: Amount): Amount | undefined {
  checkedInput(collateralValue, "collateral_value");
  checkedInput(exposure, "exposure");
  if (exposure.isZero()) return undefined;
  return divideDown(collateralValue, exposure, policy.roundingScale);
}

/** Step 10 under a parsed policy: the call amount, or undefined when no call is due. */
export function callAmountOf(policy: ParsedPolicy, collateralValue: Amount, exposure: Amount): Amount | undefined {
  const ratio = ratioOf(policy, collateralValue, exposure);
  if (ratio === undefined || ratio.compare(policy.maintenanceRatio) >= 0) return undefined;
  return exposure.multiply(policy.maintenanceRatio).subtract(collateralValue).roundUp(policy.roundingScale);
}

/** collateral_value / exposure rounded down (§7.3 step 9); undefined when the exposure is 0. */
export function collateralRatio(policy: RiskPolicy, collateralValue: Amount, exposure: Amount): Amount | undefined {
  return ratioOf(parsePolicy(policy), collateralValue, exposure);
}

/** Credit limit and collateral ratio of a valuation against an exposure (§7.3 steps 8, 9). */
export function creditLineFigures(
  policy: RiskPolicy,
  valuation: CollateralValuation,
  exposure: Amount,
): CreditLineFigures {
  const parsed = parsePolicy(policy);
  const value = valuation.collateralValue;
  return {
    collateralValue: value,
    creditLimit: value.multiply(parsed.leverageCap).roundDown(parsed.roundingScale),
    exposure,
    collateralRatio: ratioOf(parsed, value, exposure),
  };
}

/** The margin call amount (§7.3 step 10, §8.2), or undefined when no call is due. */
export function marginCallAmount(policy: RiskPolicy, collateralValue: Amount, exposure: Amount): Amount | undefined {
  return callAmountOf(parsePolicy(policy), collateralValue, exposure);
}

/** Whether the collateral ratio is below the liquidation ratio (§7.3 step 11). */
export function needsLiquidation(policy: RiskPolicy, collateralValue: Amount, exposure: Amount): boolean {
  const parsed = parsePolicy(policy);
  const ratio = ratioOf(parsed, collateralValue, exposure);
  return ratio !== undefined && ratio.compare(parsed.liquidationRatio) < 0;
}

/** The value to raise by liquidation — the whole exposure (§9.2) — or undefined when none is due. */
export function liquidationAmount(policy: RiskPolicy, collateralValue: Amount, exposure: Amount): Amount | undefined {
  return needsLiquidation(policy, collateralValue, exposure) ? exposure : undefined;
}
