// A pledge release judged by the exchange, and its consent recomputed by anyone (PROTOCOL.md
// §5.9, §5.10).
//
// judgeRelease is the exchange's rule: the figures of §7.3 with each released quantity taken
// out of the asset's pledge, and whether the account stays within the policy after it.
// recomputePledgeReleaseConsent runs the same function on the signed inputs a
// PledgeReleaseConsent carries, so a custodian, a client or an auditor confirms the figures and
// that the exchange consented only within its policy. Mirrors
// sdk/collateral_sync/valuation/_release.py.

import { create } from "@bufbuild/protobuf";
import { type Amount, formatAmount } from "../amounts.js";
import type { HoldingsStatement } from "../gen/collateral_sync/v1/attestation_pb.js";
import { type AssetClass, DecimalSchema, type Position, PositionSchema } from "../gen/collateral_sync/v1/common_pb.js";
import type { Envelope } from "../gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../gen/collateral_sync/v1/errors_pb.js";
import {
  type PledgeReleaseConsent,
  PledgeReleaseConsentSchema,
  type PledgeReleaseRequest,
  PledgeReleaseRequestSchema,
} from "../gen/collateral_sync/v1/pledge_release_pb.js";
import type { PriceQuote, RiskPolicy } from "../gen/collateral_sync/v1/valuation_pb.js";
import type { KeyRegistry } from "../registry.js";
import { verifyStatement } from "../signing.js";
import { payloadTypeOf } from "../statements.js";
import { type Instant, instantNs, timestampNs } from "../time.js";
import { checkedInput, malformed, requiredAmount, ZERO } from "./arith.js";
import { type CollateralValuation, ratioOf, valueParsed } from "./collateral.js";
import { type ParsedPolicy, parsePolicy } from "./policy.js";
import { compare, headerOf, type RecomputeOptions, refuted, stated, verifyInputs } from "./recompute.js";

/** One released asset and its quantity. */
export type Release = readonly [assetId: string, quantity: Amount];

/**
 * The request's releases, in order, once its fields are checked (§5.9 step 2): release_id,
 * account_id and at least one release required, each asset id non-empty and at most once
 * (MALFORMED); each quantity present (MALFORMED), canonical and > 0 (INVALID_AMOUNT). `field`
 * prefixes the field named in the error.
 */
export function releasedQuantities(request: PledgeReleaseRequest, field = "request"): Release[] {
  if (!request.releaseId) throw malformed(`${field}.release_id`, "a release id", "''");
  if (!request.accountId) throw malformed(`${field}.account_id`, "an account id", "''");
  if (request.releases.length === 0) throw malformed(`${field}.releases`, "at least one asset and quantity", "none");
  const seen = new Set<string>();
  return request.releases.map((item, index): Release => {
    const path = `${field}.releases[${index}]`;
    if (!item.assetId) throw malformed(`${path}.asset_id`, "an asset id", "''");
    if (seen.has(item.assetId)) throw malformed(`${path}.asset_id`, "each asset at most once", item.assetId);
    seen.add(item.assetId);
    const quantity = requiredAmount(item.quantity, `${path}.quantity`, "");
    if (quantity.compare(ZERO) <= 0) {
      throw malformed(`${path}.quantity`, "> 0", formatAmount(quantity), "", ErrorReason.INVALID_AMOUNT);
    }
    return [item.assetId, quantity];
  });
}

/** Why an exchange must not consent: the first rule of §5.10 the release breaks. */
export interface ReleaseRefusal {
  readonly message: string;
  readonly field: string;
  readonly expected: string;
  readonly actual: string;
}

/** The account's figures after a release, and whether the policy allows it. */
export interface ReleaseJudgement {
  /** The positions with each released quantity taken out of its pledge. */
  readonly positions: readonly Position[];
  readonly valuation: CollateralValuation;
  readonly collateralValueAfter: Amount;
  readonly creditLimitAfter: Amount;
  readonly exposure: Amount;
  /** undefined when the exposure is 0. */
  readonly collateralRatioAfter: Amount | undefined;
  /** undefined when the release is within the pledge and the policy. */
  readonly refusal: ReleaseRefusal | undefined;
}

export interface JudgeReleaseOptions {
  valuedAt: Instant;
  assetClasses?: ReadonlyMap<string, AssetClass> | undefined;
}

/**
 * Value `positions` after `releases` at `valuedAt` and judge them (§5.10). Refused, in this
 * order: a quantity above the asset's pledged quantity (field `releases[i].quantity`); a credit
 * limit after the release below the exposure (`credit_limit_after`); with exposure > 0, a
 * collateral ratio after it below the maintenance ratio (`collateral_ratio_after`).
 */
export function judgeRelease(
  policy: RiskPolicy,
  positions: readonly Position[],
  prices: readonly PriceQuote[],
  releases: readonly Release[],
  exposure: Amount,
  options: JudgeReleaseOptions,
): ReleaseJudgement {
  return judgeParsed(
    parsePolicy(policy),
    positions,
    prices,
    releases,
    checkedInput(exposure, "exposure"),
    options.assetClasses ?? new Map(),
    instantNs(options.valuedAt),
  );
}

function judgeParsed(
  policy: ParsedPolicy,
  positions: readonly Position[],
  prices: readonly PriceQuote[],
  releases: readonly Release[],
  exposure: Amount,
  assetClasses: ReadonlyMap<string, AssetClass>,
  valuedAtNs: bigint,
): ReleaseJudgement {
  const [after, beyond] = positionsAfter(positions, releases);
  let refusal = beyond;
  const valuation = valueParsed(policy, after, prices, assetClasses, valuedAtNs);
  const value = valuation.collateralValue;
  const limit = value.multiply(policy.leverageCap).roundDown(policy.roundingScale);
  const ratio = ratioOf(policy, value, exposure);
  if (refusal === undefined && limit.compare(exposure) < 0) {
    refusal = {
      message:
        `after the release the credit limit ${formatAmount(limit)} is below the exposure ` +
        formatAmount(exposure),
      field: "credit_limit_after",
      expected: `>= ${formatAmount(exposure)}`,
      actual: formatAmount(limit),
    };
  }
  if (refusal === undefined && ratio !== undefined && ratio.compare(policy.maintenanceRatio) < 0) {
    const maintenance = formatAmount(policy.maintenanceRatio);
    refusal = {
      message: `after the release the collateral ratio ${formatAmount(ratio)} is below the maintenance ratio ${maintenance}`,
      field: "collateral_ratio_after",
      expected: `>= ${maintenance}`,
      actual: formatAmount(ratio),
    };
  }
  return {
    positions: after,
    valuation,
    collateralValueAfter: value,
    creditLimitAfter: limit,
    exposure,
    collateralRatioAfter: ratio,
    refusal,
  };
}

/** The positions with each release taken out of its pledge; the first release beyond it. */
function positionsAfter(
  positions: readonly Position[],
  releases: readonly Release[],
): [Position[], ReleaseRefusal | undefined] {
  const taken = new Map(releases);
  const pledgedOf = new Map<string, Amount>();
  const after = positions.map((position, index) => {
    const pledged = requiredAmount(position.pledgedQuantity, `positions[${index}].pledged_quantity`, "holdings");
    pledgedOf.set(position.assetId, pledged);
    const copy = create(PositionSchema, { ...position });
    const released = taken.get(position.assetId);
    if (released !== undefined) {
      const left = pledged.subtract(released);
      copy.pledgedQuantity = create(DecimalSchema, { value: formatAmount(left.isNegative() ? ZERO : left) });
    }
    return copy;
  });
  for (const [index, [assetId, quantity]] of releases.entries()) {
    const pledged = pledgedOf.get(assetId) ?? ZERO;
    if (quantity.compare(pledged) > 0) {
      return [
        after,
        {
          message: `the release of ${formatAmount(quantity)} ${assetId} exceeds the ${formatAmount(pledged)} pledged`,
          field: `releases[${index}].quantity`,
          expected: formatAmount(pledged),
          actual: formatAmount(quantity),
        },
      ];
    }
  }
  return [after, undefined];
}

/** A consent confirmed from its signed inputs, with the recomputed figures. */
export interface PledgeReleaseConsentCheck {
  readonly consent: PledgeReleaseConsent;
  readonly request: PledgeReleaseRequest;
  /** The client who signed the request. */
  readonly clientId: string;
  readonly releases: readonly Release[];
  readonly riskPolicy: RiskPolicy;
  /** The holdings statement judged (the latest epoch among the inputs). */
  readonly holdings: HoldingsStatement;
  readonly judgement: ReleaseJudgement;
}

/**
 * Verify a signed PledgeReleaseConsent and recompute it from its signed inputs (§5.10).
 *
 * The consent must be addressed to `audience` and fresh at `now`; the client's request inside
 * it is verified as evidence at the consent's issued_at, addressed to the consent's issuer, and
 * must name that issuer as its exchange_id; the inputs are verified as a margin call's, for the
 * request's account. The latest holdings statement among them is judged with judgeRelease at
 * the consent's issued_at on its stated exposure: collateral_value_after and credit_limit_after
 * must equal the recomputed figures, and the release must be within the pledge and the policy.
 * Anything else throws VerificationError (PROOF_INVALID, metadata field/expected/actual),
 * MalformedError, or what verifyStatement throws.
 */
export function recomputePledgeReleaseConsent(
  envelope: Envelope,
  registry: KeyRegistry,
  options: RecomputeOptions,
): PledgeReleaseConsentCheck {
  const consent = verifyStatement<PledgeReleaseConsent>(envelope, registry, {
    audience: options.audience,
    now: options.now,
    expectedPayloadType: payloadTypeOf(PledgeReleaseConsentSchema),
    maxSkewSeconds: options.maxSkewSeconds,
  }).message;
  const what = "pledge release consent";
  const { issuer, issuedAt } = headerOf(consent.header, what);
  if (consent.request === undefined) {
    throw malformed("request", "the client's signed PledgeReleaseRequest", "absent", what);
  }
  const request = verifyStatement<PledgeReleaseRequest>(consent.request, registry, {
    audience: issuer,
    now: issuedAt,
    expectedPayloadType: payloadTypeOf(PledgeReleaseRequestSchema),
    maxSkewSeconds: options.maxSkewSeconds,
  });
  const asked = request.message;
  const releases = releasedQuantities(asked);
  if (asked.exchangeId !== issuer) {
    const why = "the request asks another exchange than the one that consented";
    throw refuted("request.exchange_id", issuer, asked.exchangeId, why);
  }
  const inputs = verifyInputs(consent.inputs, registry, {
    issuer,
    issuedAt,
    accountId: asked.accountId,
    riskPolicyVersion: consent.riskPolicyVersion,
    audience: options.audience,
    maxSkewSeconds: options.maxSkewSeconds,
    what,
  });
  const exposure = stated(consent.exposure, "exposure", what);
  const statedValue = stated(consent.collateralValueAfter, "collateral_value_after", what);
  const statedLimit = stated(consent.creditLimitAfter, "credit_limit_after", what);
  const judgement = judgeParsed(
    inputs.parsed,
    inputs.holdings.positions,
    inputs.snapshot.prices,
    releases,
    exposure,
    options.assetClasses ?? new Map(),
    timestampNs(issuedAt),
  );
  compare("collateral_value_after", judgement.collateralValueAfter, statedValue);
  compare("credit_limit_after", judgement.creditLimitAfter, statedLimit);
  const refusal = judgement.refusal;
  if (refusal !== undefined) {
    const why = `the exchange consented outside its policy (${refusal.message})`;
    // A release's quantity is the request's, inside the consent.
    const field = refusal.field.startsWith("releases[") ? `request.${refusal.field}` : refusal.field;
    throw refuted(field, refusal.expected, refusal.actual, why);
  }
  return {
    consent,
    request: asked,
    clientId: request.header.issuer,
    releases,
    riskPolicy: inputs.policy,
    holdings: inputs.holdings,
    judgement,
  };
}
