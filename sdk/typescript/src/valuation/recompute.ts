// Verifiable margin calls and liquidation instructions, recomputed from their signed inputs
// (PROTOCOL.md §8.2, §9.2).
//
// The verifier checks the signed statement, then each signed input it carries as evidence at
// the statement's issued_at, values the latest-epoch holdings again at that time and compares
// every stated figure with the recomputed one. A mismatch is VerificationError with reason
// PROOF_INVALID and metadata field / expected (recomputed) / actual (stated): the inputs are
// evidence that does not prove the figure claimed. Mirrors
// sdk/collateral_sync/valuation/_recompute.py.

import type { Message } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { type Amount, formatAmount } from "../amounts.js";
import { VerificationError } from "../errors.js";
import type { AssetClass } from "../gen/collateral_sync/v1/common_pb.js";
import { type HoldingsStatement, HoldingsStatementSchema } from "../gen/collateral_sync/v1/attestation_pb.js";
import type { Envelope, StatementHeader } from "../gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../gen/collateral_sync/v1/errors_pb.js";
import { type LiquidationInstruction, LiquidationInstructionSchema } from "../gen/collateral_sync/v1/liquidation_pb.js";
import { type MarginCall, MarginCallSchema } from "../gen/collateral_sync/v1/margin_pb.js";
import {
  type PriceSnapshot,
  PriceSnapshotSchema,
  type RiskPolicy,
  RiskPolicySchema,
  type ValuationInputs,
} from "../gen/collateral_sync/v1/valuation_pb.js";
import type { KeyRegistry } from "../registry.js";
import { verifyStatement } from "../signing.js";
import { payloadTypeOf } from "../statements.js";
import { formatNs, type Instant, timestampNs } from "../time.js";
import { durationNs, malformed, requiredNonNegative } from "./arith.js";
import { type CollateralValuation, callAmountOf, ratioOf, valueParsed } from "./collateral.js";
import { type ParsedPolicy, parsePolicy } from "./policy.js";

export interface RecomputeOptions {
  /** The verifying party's id: the statement must be addressed to it. */
  audience: string;
  /** The time of verification of the statement itself. */
  now: Instant;
  /** The arrangement's asset list, for a policy that lists no assets. */
  assetClasses?: ReadonlyMap<string, AssetClass> | undefined;
  maxSkewSeconds?: number | undefined;
}

/** A margin call confirmed from its signed inputs, with the recomputed figures. */
export interface MarginCallCheck {
  readonly marginCall: MarginCall;
  readonly riskPolicy: RiskPolicy;
  /** The holdings statement valued (the latest epoch among the inputs). */
  readonly holdings: HoldingsStatement;
  readonly valuation: CollateralValuation;
  readonly exposure: Amount;
  readonly collateralValue: Amount;
  readonly collateralRatio: Amount;
  readonly callAmount: Amount;
}

/** A liquidation instruction confirmed from its signed inputs. */
export interface LiquidationCheck {
  readonly instruction: LiquidationInstruction;
  readonly riskPolicy: RiskPolicy;
  readonly holdings: HoldingsStatement;
  readonly valuation: CollateralValuation;
  /** The value to raise: the whole exposure. */
  readonly amount: Amount;
  readonly collateralValue: Amount;
  /** undefined when the amount is 0. */
  readonly collateralRatio: Amount | undefined;
}

export function refuted(field: string, expected: string, actual: string, why: string): VerificationError {
  return new VerificationError(`${why}: ${field} expected ${expected}, got ${actual}`, {
    reason: ErrorReason.PROOF_INVALID,
    metadata: { field, expected, actual },
  });
}

export function compare(field: string, recomputed: Amount, stated: Amount): Amount {
  if (!recomputed.equals(stated)) {
    const why = "the stated figure differs from the one recomputed from the signed inputs";
    throw refuted(field, formatAmount(recomputed), formatAmount(stated), why);
  }
  return recomputed;
}

function sameIssuer(issuer: string, expected: string, field: string): void {
  if (issuer !== expected) throw refuted(field, expected, issuer, "an input must be issued by the issuer it backs");
}

interface Inputs {
  policy: RiskPolicy;
  parsed: ParsedPolicy;
  snapshot: PriceSnapshot;
  holdings: HoldingsStatement;
}

interface InputsContext {
  issuer: string;
  issuedAt: Timestamp;
  accountId: string;
  riskPolicyVersion: bigint;
  audience: string;
  maxSkewSeconds: number | undefined;
  what: string;
}

function verifyInput<M extends Message>(
  envelope: Envelope,
  registry: KeyRegistry,
  expectedPayloadType: string,
  audience: string,
  context: InputsContext,
): M {
  return verifyStatement<M>(envelope, registry, {
    audience,
    now: context.issuedAt,
    expectedPayloadType,
    maxSkewSeconds: context.maxSkewSeconds,
  }).message;
}

/** Verify a statement's ValuationInputs as evidence at its issued_at (§8.2 steps 1–3). */
export function verifyInputs(inputs: ValuationInputs | undefined, registry: KeyRegistry, context: InputsContext): Inputs {
  const { issuer, what } = context;
  if (!context.accountId) throw malformed("account_id", "a non-empty account id", "''", what);
  if (inputs?.riskPolicy === undefined) throw malformed("inputs.risk_policy", "a signed statement", "absent", what);
  if (inputs.priceSnapshot === undefined) {
    throw malformed("inputs.price_snapshot", "a signed statement", "absent", what);
  }
  if (inputs.holdingsStatements.length === 0) {
    throw malformed("inputs.holdings_statements", "at least one signed statement", "none", what);
  }

  const policyType = payloadTypeOf(RiskPolicySchema);
  const policy = verifyInput<RiskPolicy>(inputs.riskPolicy, registry, policyType, context.audience, context);
  sameIssuer(policy.header?.issuer ?? "", issuer, "inputs.risk_policy.header.issuer");
  const parsed = parsePolicy(policy);
  if (context.riskPolicyVersion !== parsed.version) {
    const why = `the ${what} names another policy version than the signed policy it carries`;
    throw refuted("risk_policy_version", String(parsed.version), String(context.riskPolicyVersion), why);
  }
  const issuedNs = timestampNs(context.issuedAt);
  if (policy.effectiveFrom !== undefined && timestampNs(policy.effectiveFrom) > issuedNs) {
    const why = `the policy was not yet in force when the ${what} was issued`;
    const actual = formatNs(timestampNs(policy.effectiveFrom));
    throw refuted("inputs.risk_policy.effective_from", `<= ${formatNs(issuedNs)}`, actual, why);
  }

  const snapshotType = payloadTypeOf(PriceSnapshotSchema);
  const snapshot = verifyInput<PriceSnapshot>(inputs.priceSnapshot, registry, snapshotType, context.audience, context);
  sameIssuer(snapshot.header?.issuer ?? "", issuer, "inputs.price_snapshot.header.issuer");

  const holdingsType = payloadTypeOf(HoldingsStatementSchema);
  let latest: HoldingsStatement | undefined;
  const epochs = new Set<bigint>();
  inputs.holdingsStatements.forEach((envelope, i) => {
    const field = `inputs.holdings_statements[${i}]`;
    const holdings = verifyInput<HoldingsStatement>(envelope, registry, holdingsType, issuer, context);
    if (holdings.accountId !== context.accountId) {
      throw refuted(`${field}.account_id`, context.accountId, holdings.accountId, "holdings statement of another account");
    }
    if (holdings.exchangeId !== issuer) {
      const why = `holdings not pledged to the exchange that issued the ${what}`;
      throw refuted(`${field}.exchange_id`, issuer, holdings.exchangeId, why);
    }
    if (epochs.has(holdings.epoch)) {
      const why = "two holdings statements for one epoch";
      throw refuted(`${field}.epoch`, "one statement per epoch", String(holdings.epoch), why);
    }
    epochs.add(holdings.epoch);
    if (latest === undefined || holdings.epoch > latest.epoch) latest = holdings;
  });
  if (latest === undefined) throw new Error("unreachable: at least one holdings statement");
  return { policy, parsed, snapshot, holdings: latest };
}

export const stated = requiredNonNegative;

/** The issuer and issued_at of a verified statement (verification requires both). */
export function headerOf(header: StatementHeader | undefined, what: string): { issuer: string; issuedAt: Timestamp } {
  if (header?.issuedAt === undefined) throw malformed("header.issued_at", "a timestamp", "unset", what);
  return { issuer: header.issuer, issuedAt: header.issuedAt };
}

/**
 * Verify a signed MarginCall and recompute every figure from its signed inputs (§8.2).
 *
 * The call must be addressed to `audience` and fresh at `now`; each input is verified as
 * evidence at the call's issued_at, the latest-epoch holdings are valued at that time, and
 * collateral value, collateral ratio, call amount and due_by (issued_at + cure_period) are
 * compared with the call. Throws VerificationError (PROOF_INVALID) on any mismatch, including
 * a call stated where none is due; MalformedError for missing or invalid fields; and whatever
 * verifyStatement throws for a statement that does not verify.
 */
export function recomputeMarginCall(envelope: Envelope, registry: KeyRegistry, options: RecomputeOptions): MarginCallCheck {
  const call = verifyStatement<MarginCall>(envelope, registry, {
    audience: options.audience,
    now: options.now,
    expectedPayloadType: payloadTypeOf(MarginCallSchema),
    maxSkewSeconds: options.maxSkewSeconds,
  }).message;
  const what = "margin call";
  const { issuer, issuedAt } = headerOf(call.header, what);
  const inputs = verifyInputs(call.inputs, registry, {
    issuer,
    issuedAt,
    accountId: call.accountId,
    riskPolicyVersion: call.riskPolicyVersion,
    audience: options.audience,
    maxSkewSeconds: options.maxSkewSeconds,
    what,
  });
  const policy = inputs.parsed;
  const exposure = stated(call.exposure, "exposure", what);
  const statedValue = stated(call.collateralValue, "collateral_value", what);
  const statedRatio = stated(call.collateralRatio, "collateral_ratio", what);
  const statedAmount = stated(call.callAmount, "call_amount", what);

  const issuedNs = timestampNs(issuedAt);
  const valuation = valueParsed(
    policy,
    inputs.holdings.positions,
    inputs.snapshot.prices,
    options.assetClasses ?? new Map(),
    issuedNs,
  );
  const value = compare("collateral_value", valuation.collateralValue, statedValue);
  const exact = ratioOf(policy, value, exposure);
  if (exact === undefined) {
    throw refuted("exposure", "> 0 (no margin call without exposure)", "0", "margin call not due");
  }
  const ratio = compare("collateral_ratio", exact, statedRatio);
  const due = callAmountOf(policy, value, exposure);
  if (due === undefined) {
    const expected =
      `no call (collateral_ratio ${formatAmount(ratio)} >= maintenance_ratio ` +
      `${formatAmount(policy.maintenanceRatio)})`;
    throw refuted("call_amount", expected, formatAmount(statedAmount), "margin call not due");
  }
  const amount = compare("call_amount", due, statedAmount);
  const dueNs = issuedNs + durationNs(inputs.policy.curePeriod);
  if (call.dueBy === undefined || timestampNs(call.dueBy) !== dueNs) {
    const actual = call.dueBy === undefined ? "absent" : formatNs(timestampNs(call.dueBy));
    throw refuted("due_by", formatNs(dueNs), actual, "due_by is not issued_at + cure_period");
  }
  return {
    marginCall: call,
    riskPolicy: inputs.policy,
    holdings: inputs.holdings,
    valuation,
    exposure,
    collateralValue: value,
    collateralRatio: ratio,
    callAmount: amount,
  };
}

export interface RecomputeLiquidationOptions extends RecomputeOptions {
  /** The margin call the instruction follows (already verified), when it names one. */
  marginCall?: MarginCall | undefined;
}

/**
 * Verify a signed LiquidationInstruction and recompute it from its signed inputs (§9.2).
 *
 * For a breach (empty margin_call_id) the ratio of the valued holdings to `amount` (the
 * exposure) must be below the liquidation ratio. After a margin call, pass that call: it must
 * be the one named, for the same account, and `amount` must equal its exposure. Whether the
 * call has EXPIRED is state, checked by the caller.
 */
export function recomputeLiquidationInstruction(
  envelope: Envelope,
  registry: KeyRegistry,
  options: RecomputeLiquidationOptions,
): LiquidationCheck {
  const instruction = verifyStatement<LiquidationInstruction>(envelope, registry, {
    audience: options.audience,
    now: options.now,
    expectedPayloadType: payloadTypeOf(LiquidationInstructionSchema),
    maxSkewSeconds: options.maxSkewSeconds,
  }).message;
  const what = "liquidation instruction";
  const { issuer, issuedAt } = headerOf(instruction.header, what);
  const inputs = verifyInputs(instruction.inputs, registry, {
    issuer,
    issuedAt,
    accountId: instruction.accountId,
    riskPolicyVersion: instruction.riskPolicyVersion,
    audience: options.audience,
    maxSkewSeconds: options.maxSkewSeconds,
    what,
  });
  const policy = inputs.parsed;
  const amount = stated(instruction.amount, "amount", what);
  const valuation = valueParsed(
    policy,
    inputs.holdings.positions,
    inputs.snapshot.prices,
    options.assetClasses ?? new Map(),
    timestampNs(issuedAt),
  );
  const ratio = ratioOf(policy, valuation.collateralValue, amount);
  if (instruction.marginCallId) {
    const call = options.marginCall;
    if (call === undefined) {
      throw new TypeError(
        `the instruction follows margin call ${JSON.stringify(instruction.marginCallId)}; pass that call as marginCall`,
      );
    }
    if (call.marginCallId !== instruction.marginCallId) {
      const why = "the instruction names another margin call";
      throw refuted("margin_call_id", call.marginCallId, instruction.marginCallId, why);
    }
    if (call.accountId !== instruction.accountId) {
      throw refuted("account_id", call.accountId, instruction.accountId, "the margin call is for another account");
    }
    compare("amount", stated(call.exposure, "exposure", "margin call"), amount);
  } else if (ratio === undefined || ratio.compare(policy.liquidationRatio) >= 0) {
    const shown = ratio === undefined ? "undefined (exposure 0)" : formatAmount(ratio);
    const expected = `no liquidation (collateral_ratio ${shown}, liquidation_ratio ${formatAmount(policy.liquidationRatio)})`;
    throw refuted("amount", expected, formatAmount(amount), "liquidation not due");
  }
  return {
    instruction,
    riskPolicy: inputs.policy,
    holdings: inputs.holdings,
    valuation,
    amount,
    collateralValue: valuation.collateralValue,
    collateralRatio: ratio,
  };
}
