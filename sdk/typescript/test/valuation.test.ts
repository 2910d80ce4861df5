// vectors/valuation.json (PROTOCOL.md §7.3, §8.2, §9.2, §9.5): every valuation case gives
// exactly the stated figures, every invalid case is refused with the stated reason naming the
// stated field, and every signed margin call and liquidation instruction recomputes from its
// signed inputs to the stated figures or refusal. The figures were computed by the Python SDK;
// this implementation was written from the document.

import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, fromJson, type JsonValue } from "@bufbuild/protobuf";
import { DurationSchema, type Timestamp, TimestampSchema } from "@bufbuild/protobuf/wkt";
import { Amount, parseAmount } from "../src/amounts.js";
import { CollateralSyncError } from "../src/errors.js";
import {
  type AssetClass,
  AssetClassSchema,
  DecimalSchema,
  type Position,
  PositionSchema,
} from "../src/gen/collateral_sync/v1/common_pb.js";
import { EnvelopeSchema } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import {
  type PriceQuote,
  PriceQuoteSchema,
  type RiskPolicy,
  RiskPolicySchema,
} from "../src/gen/collateral_sync/v1/valuation_pb.js";
import { KeyRegistry } from "../src/registry.js";
import { formatTimestamp } from "../src/time.js";
import {
  allocateShortfall,
  assetClassName,
  creditLineFigures,
  custodianStalenessWindowNs,
  liquidationAmount,
  liquidationShortfall,
  marginCallAmount,
  needsLiquidation,
  positionValuationToProto,
  recomputeLiquidationInstruction,
  recomputeMarginCall,
  recomputePledgeReleaseConsent,
  shortfallAllocationToProto,
  validateRiskPolicy,
  valueCollateral,
} from "../src/valuation.js";
import { caught, fromHex, loadVectors, toHex } from "./verification-fixtures.js";

interface PositionJson {
  asset_id: string;
  quantity: string | null;
  locked_quantity: string | null;
  pledged_quantity: string | null;
}

interface ValuationCase {
  id: string;
  clause: string;
  description: string;
  policy: JsonValue;
  asset_classes: Record<string, string>;
  positions: PositionJson[];
  prices: { asset_id: string; price: string | null; observed_at: string | null }[];
  valued_at: string;
  exposure: string;
  liquidation: {
    proceeds: string;
    candidates: { account_id: string; profit: string; effective_leverage: string }[];
  } | null;
  round_half_even?: Record<string, string>;
  expected: JsonValue;
}

interface Refusal {
  valid: false;
  reason: string;
  grpc_status: string;
  field?: string;
  metadata?: Record<string, string>;
}

interface StatementCase {
  id: string;
  clause: string;
  verifier_party_id: string;
  now: string;
  envelope: { payload_type: string; payload_hex: string; signatures: { key_id: string; sig_hex: string }[] };
  envelope_hex: string;
  stated: Record<string, string>;
  expected: JsonValue;
}

interface ValuationFile {
  kind: string;
  valuations: ValuationCase[];
  invalid: (Omit<ValuationCase, "expected"> & { expected: Refusal })[];
  max_skew_seconds: number;
  registry: JsonValue;
  margin_calls: StatementCase[];
  liquidation_instructions: StatementCase[];
  pledge_release_consents: StatementCase[];
}

const FILE = loadVectors<ValuationFile>("valuation.json");

function stamp(text: string): Timestamp {
  return fromJson(TimestampSchema, text);
}

function assetClass(name: string): AssetClass {
  const value = AssetClassSchema.values.find((v) => v.name === name);
  if (value === undefined) throw new Error(`unknown asset class ${name}`);
  return value.number as AssetClass;
}

function policyOf(vector: Pick<ValuationCase, "policy">): RiskPolicy {
  return fromJson(RiskPolicySchema, vector.policy);
}

function positionsOf(vector: Pick<ValuationCase, "positions">): Position[] {
  const decimal = (value: string | null) => (value === null ? undefined : create(DecimalSchema, { value }));
  return vector.positions.map((p) =>
    create(PositionSchema, {
      assetId: p.asset_id,
      quantity: decimal(p.quantity),
      lockedQuantity: decimal(p.locked_quantity),
      pledgedQuantity: decimal(p.pledged_quantity),
    }),
  );
}

function pricesOf(vector: Pick<ValuationCase, "prices">): PriceQuote[] {
  return vector.prices.map((q) =>
    create(PriceQuoteSchema, {
      assetId: q.asset_id,
      price: q.price === null ? undefined : create(DecimalSchema, { value: q.price }),
      observedAt: q.observed_at === null ? undefined : stamp(q.observed_at),
    }),
  );
}

/** An amount the caller passes in: canonical text of the file (the SDK checks its sign). */
function given(text: string): Amount {
  return parseAmount(text);
}

const text = (value: Amount): string => value.toString();

/** Every figure of a case with this SDK, in the shape of `expected`. */
function figures(vector: Omit<ValuationCase, "expected">): JsonValue {
  const policy = policyOf(vector);
  const valuation = valueCollateral(policy, positionsOf(vector), pricesOf(vector), {
    valuedAt: stamp(vector.valued_at),
    assetClasses: new Map(Object.entries(vector.asset_classes).map(([id, name]) => [id, assetClass(name)])),
  });
  const exposure = given(vector.exposure);
  const credit = creditLineFigures(policy, valuation, exposure);
  const call = marginCallAmount(policy, valuation.collateralValue, exposure);
  const amount = liquidationAmount(policy, valuation.collateralValue, exposure);
  assert.equal(needsLiquidation(policy, valuation.collateralValue, exposure), amount !== undefined);
  let liquidation: JsonValue = { due: false };
  if (amount !== undefined) {
    assert.ok(vector.liquidation !== null, "a liquidation case gives its proceeds");
    const shortfall = liquidationShortfall(amount, given(vector.liquidation.proceeds));
    let allocation: JsonValue = null;
    if (!shortfall.isZero()) {
      const waterfall = allocateShortfall(
        policy,
        shortfall,
        vector.liquidation.candidates.map((c) => ({
          accountId: c.account_id,
          profit: given(c.profit),
          effectiveLeverage: given(c.effective_leverage),
        })),
      );
      const wire = shortfallAllocationToProto(waterfall, "liquidation");
      allocation = {
        covered_by_insurance_fund: text(waterfall.coveredByInsuranceFund),
        insurance_fund_balance_after: text(waterfall.insuranceFundBalanceAfter),
        auto_deleveraging_amount: text(waterfall.autoDeleveragingAmount),
        ranking: waterfall.ranking.map((entry, i) => ({
          account_id: entry.accountId,
          score: text(entry.score),
          score_wire: wire.ranking[i]?.score?.value ?? null,
          rank: entry.rank,
        })),
      };
    }
    liquidation = { due: true, amount: text(amount), shortfall: text(shortfall), allocation };
  }
  return {
    valid: true,
    positions: valuation.positions.map((row) => {
      const wire = positionValuationToProto(row);
      return {
        asset_id: row.assetId,
        asset_class: assetClassName(row.assetClass),
        eligible_quantity: text(row.eligibleQuantity),
        price: text(row.price),
        market_value: text(row.marketValue),
        collateral_factor: text(row.collateralFactor),
        haircut_value: text(row.haircutValue),
        collateral_value: text(row.collateralValue),
        price_wire: wire.price?.value ?? null,
        market_value_wire: wire.marketValue?.value ?? null,
      };
    }),
    haircut_total: text(valuation.haircutTotal),
    collateral_value: text(credit.collateralValue),
    credit_limit: text(credit.creditLimit),
    collateral_ratio: credit.collateralRatio === undefined ? null : text(credit.collateralRatio),
    margin_call: { due: call !== undefined, call_amount: call === undefined ? null : text(call) },
    liquidation,
  };
}

function refusal(error: CollateralSyncError): JsonValue {
  return { valid: false, reason: error.reasonName, grpc_status: error.code, metadata: error.metadata };
}

function registry(): KeyRegistry {
  return KeyRegistry.fromJson(JSON.stringify(FILE.registry));
}

function envelopeOf(vector: StatementCase) {
  const envelope = fromBinary(EnvelopeSchema, fromHex(vector.envelope_hex));
  assert.equal(toHex(envelope.payload), vector.envelope.payload_hex);
  assert.equal(envelope.payloadType, vector.envelope.payload_type);
  assert.deepEqual(
    envelope.signatures.map((s) => ({ key_id: s.keyId, sig_hex: toHex(s.sig) })),
    vector.envelope.signatures,
  );
  return envelope;
}

function recomputeOptions(vector: StatementCase) {
  return { audience: vector.verifier_party_id, now: stamp(vector.now), maxSkewSeconds: FILE.max_skew_seconds };
}

// --- what the file covers -----------------------------------------------------------------

test("valuation.json declares its kind and has valid and invalid cases of each family", () => {
  assert.equal(FILE.kind, "valuation");
  assert.ok(FILE.valuations.length > 0 && FILE.invalid.length > 0);
  const ids = [
    ...FILE.valuations,
    ...FILE.invalid,
    ...FILE.margin_calls,
    ...FILE.liquidation_instructions,
    ...FILE.pledge_release_consents,
  ].map((v) => v.id);
  assert.equal(new Set(ids).size, ids.length);
  for (const family of [FILE.margin_calls, FILE.liquidation_instructions, FILE.pledge_release_consents]) {
    const outcomes = new Set(family.map((v) => (v.expected as { valid: boolean }).valid));
    assert.deepEqual([...outcomes].sort(), [false, true]);
  }
});

test("round-half-even would land one quantum away from RD/RU", () => {
  const vector = FILE.valuations.find((v) => v.round_half_even !== undefined);
  assert.ok(vector?.round_half_even !== undefined);
  const policy = policyOf(vector);
  const quantum = new Amount(1n, policy.roundingScale);
  const expected = figures(vector) as {
    positions: { collateral_value: string }[];
    credit_limit: string;
    collateral_ratio: string;
    margin_call: { call_amount: string };
  };
  const ours: Record<string, string> = {
    collateral_value: expected.positions[0]?.collateral_value ?? "",
    credit_limit: expected.credit_limit,
    collateral_ratio: expected.collateral_ratio,
    call_amount: expected.margin_call.call_amount,
  };
  for (const [name, halfEven] of Object.entries(vector.round_half_even)) {
    const apart = Amount.fromText(halfEven).subtract(Amount.fromText(ours[name] ?? "")).abs();
    assert.ok(apart.equals(quantum), `${name}: ${halfEven} vs ${ours[name]}`);
  }
});

test("a policy's custodian staleness window: its own, or 300 s when it sets none (§11.2)", () => {
  const first = FILE.valuations[0];
  assert.ok(first !== undefined);
  const policy = policyOf(first);
  policy.custodianStalenessWindow = undefined;
  assert.equal(custodianStalenessWindowNs(policy), 300_000_000_000n);
  policy.custodianStalenessWindow = create(DurationSchema, { seconds: 8n, nanos: 5 });
  assert.equal(custodianStalenessWindowNs(policy), 8_000_000_005n);
});

// --- every case ---------------------------------------------------------------------------

for (const vector of FILE.valuations) {
  test(`valuation ${vector.id}`, () => {
    validateRiskPolicy(policyOf(vector));
    assert.deepEqual(figures(vector), vector.expected);
  });
}

for (const vector of FILE.invalid) {
  test(`invalid valuation ${vector.id}`, () => {
    const error = caught(() => figures(vector));
    assert.equal(error.reasonName, vector.expected.reason, error.message);
    assert.equal(error.code, vector.expected.grpc_status);
    assert.equal(error.metadata.field, vector.expected.field);
    assert.equal(error.fieldViolations[vector.expected.field ?? ""] !== undefined, true);
  });
}

for (const vector of FILE.margin_calls) {
  test(`margin call ${vector.id}`, () => {
    let outcome: JsonValue;
    try {
      const check = recomputeMarginCall(envelopeOf(vector), registry(), recomputeOptions(vector));
      outcome = {
        valid: true,
        collateral_value: text(check.collateralValue),
        collateral_ratio: text(check.collateralRatio),
        call_amount: text(check.callAmount),
        due_by: check.marginCall.dueBy === undefined ? null : formatTimestamp(check.marginCall.dueBy),
      };
    } catch (err) {
      if (!(err instanceof CollateralSyncError)) throw err;
      outcome = refusal(err);
    }
    assert.deepEqual(outcome, vector.expected);
  });
}

for (const vector of FILE.liquidation_instructions) {
  test(`liquidation instruction ${vector.id}`, () => {
    let outcome: JsonValue;
    try {
      const check = recomputeLiquidationInstruction(envelopeOf(vector), registry(), recomputeOptions(vector));
      outcome = {
        valid: true,
        collateral_value: text(check.collateralValue),
        collateral_ratio: check.collateralRatio === undefined ? null : text(check.collateralRatio),
        amount: text(check.amount),
      };
    } catch (err) {
      if (!(err instanceof CollateralSyncError)) throw err;
      outcome = refusal(err);
    }
    assert.deepEqual(outcome, vector.expected);
  });
}

for (const vector of FILE.pledge_release_consents) {
  test(`pledge release consent ${vector.id}`, () => {
    let outcome: JsonValue;
    try {
      const check = recomputePledgeReleaseConsent(envelopeOf(vector), registry(), recomputeOptions(vector));
      const judged = check.judgement;
      outcome = {
        valid: true,
        collateral_value_after: text(judged.collateralValueAfter),
        credit_limit_after: text(judged.creditLimitAfter),
        collateral_ratio_after: judged.collateralRatioAfter === undefined ? null : text(judged.collateralRatioAfter),
      };
    } catch (err) {
      if (!(err instanceof CollateralSyncError)) throw err;
      outcome = refusal(err);
    }
    assert.deepEqual(outcome, vector.expected);
  });
}
