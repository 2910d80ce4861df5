// The table of statement types (PROTOCOL.md §3.5): payload type, message schema, which
// party roles may issue it, and whether it is public (audience "*" allowed).
//
// Every protocol message whose field 1 is a StatementHeader is a statement and travels inside
// a signed Envelope whose payload_type names the message
// (application/vnd.collateral-sync.v1.<kebab-name>+proto). This module is the one place that
// maps payload types to schemas. Mirrors sdk/collateral_sync/statements.py.

import type { DescMessage, Message } from "@bufbuild/protobuf";
import { CheckpointSchema, HoldingsStatementSchema } from "./gen/collateral_sync/v1/attestation_pb.js";
import { PartyRole } from "./gen/collateral_sync/v1/common_pb.js";
import { PledgeInstructionSchema, RedemptionRequestSchema } from "./gen/collateral_sync/v1/custodian_service_pb.js";
import { EmergencyReleaseReceiptSchema, EmergencyReleaseSchema } from "./gen/collateral_sync/v1/emergency_pb.js";
import type { StatementHeader } from "./gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import {
  LiquidationInstructionSchema,
  LiquidationPathSchema,
  LiquidationReceiptSchema,
  ShortfallAllocationSchema,
} from "./gen/collateral_sync/v1/liquidation_pb.js";
import {
  MarginCallResponseSchema,
  MarginCallSchema,
  MarginCallStateSchema,
} from "./gen/collateral_sync/v1/margin_pb.js";
import {
  PledgeReleaseConsentSchema,
  PledgeReleaseReceiptSchema,
  PledgeReleaseRequestSchema,
} from "./gen/collateral_sync/v1/pledge_release_pb.js";
import { SyncBatchSchema } from "./gen/collateral_sync/v1/position_sync_pb.js";
import {
  ReconciliationResultSchema,
  ReconciliationStatementSchema,
  SettlementDisputeSchema,
  SettlementInstructionSchema,
} from "./gen/collateral_sync/v1/reconciliation_pb.js";
import { CreditLineSchema, PriceSnapshotSchema, RiskPolicySchema } from "./gen/collateral_sync/v1/valuation_pb.js";
import { MalformedError } from "./errors.js";

export const PAYLOAD_TYPE_PREFIX = "application/vnd.collateral-sync.v1.";
export const PAYLOAD_TYPE_SUFFIX = "+proto";

/** A statement message: any message with `StatementHeader header = 1`. */
export type StatementMessage = Message & { header?: StatementHeader | undefined };

/** One row of the table. */
export interface StatementType {
  /** The kebab-case name inside the payload type, e.g. "holdings-statement". */
  readonly name: string;
  readonly payloadType: string;
  readonly schema: DescMessage;
  /** PartyRole values whose keys may issue (sign as issuer) this type. */
  readonly issuerRoles: ReadonlySet<PartyRole>;
  /** Whether the audience may be "*" (anyone). */
  readonly public: boolean;
}

const { CUSTODIAN, EXCHANGE, REGULATOR, CLIENT } = PartyRole;

function row(name: string, schema: DescMessage, roles: PartyRole[], isPublic = false): StatementType {
  return Object.freeze({
    name,
    payloadType: `${PAYLOAD_TYPE_PREFIX}${name}${PAYLOAD_TYPE_SUFFIX}`,
    schema,
    issuerRoles: new Set(roles),
    public: isPublic,
  });
}

/** Every statement type of collateral_sync.v1, in the order of the §3.5 table. */
export const STATEMENT_TYPES: readonly StatementType[] = Object.freeze([
  row("holdings-statement", HoldingsStatementSchema, [CUSTODIAN]),
  row("checkpoint", CheckpointSchema, [CUSTODIAN], true),
  row("sync-batch", SyncBatchSchema, [CUSTODIAN, EXCHANGE]),
  row("risk-policy", RiskPolicySchema, [EXCHANGE], true),
  row("price-snapshot", PriceSnapshotSchema, [EXCHANGE], true),
  row("credit-line", CreditLineSchema, [EXCHANGE]),
  row("margin-call", MarginCallSchema, [EXCHANGE]),
  row("margin-call-response", MarginCallResponseSchema, [CUSTODIAN]),
  row("margin-call-state", MarginCallStateSchema, [EXCHANGE]),
  row("liquidation-path", LiquidationPathSchema, [CLIENT]),
  row("liquidation-instruction", LiquidationInstructionSchema, [EXCHANGE]),
  row("liquidation-receipt", LiquidationReceiptSchema, [CUSTODIAN]),
  row("shortfall-allocation", ShortfallAllocationSchema, [EXCHANGE]),
  row("reconciliation-statement", ReconciliationStatementSchema, [CUSTODIAN, EXCHANGE]),
  row("reconciliation-result", ReconciliationResultSchema, [REGULATOR], true),
  row("settlement-instruction", SettlementInstructionSchema, [EXCHANGE]),
  row("settlement-dispute", SettlementDisputeSchema, [CUSTODIAN, EXCHANGE]),
  row("emergency-release", EmergencyReleaseSchema, [REGULATOR, CUSTODIAN, EXCHANGE]),
  row("emergency-release-receipt", EmergencyReleaseReceiptSchema, [CUSTODIAN]),
  row("pledge-instruction", PledgeInstructionSchema, [CLIENT]),
  row("redemption-request", RedemptionRequestSchema, [CLIENT]),
  row("pledge-release-request", PledgeReleaseRequestSchema, [CLIENT]),
  row("pledge-release-consent", PledgeReleaseConsentSchema, [EXCHANGE]),
  row("pledge-release-receipt", PledgeReleaseReceiptSchema, [CUSTODIAN]),
]);

const BY_PAYLOAD_TYPE: ReadonlyMap<string, StatementType> = new Map(STATEMENT_TYPES.map((t) => [t.payloadType, t]));
const BY_TYPE_NAME: ReadonlyMap<string, StatementType> = new Map(STATEMENT_TYPES.map((t) => [t.schema.typeName, t]));

/** Payload types by kebab name, e.g. `PAYLOAD_TYPES["holdings-statement"]`. */
export const PAYLOAD_TYPES: Readonly<Record<string, string>> = Object.freeze(
  Object.fromEntries(STATEMENT_TYPES.map((t) => [t.name, t.payloadType])),
);

/** The table row for a payload type string, or for a statement message schema. */
export function statementTypeOf(statement: string | DescMessage): StatementType {
  if (typeof statement === "string") {
    const found = BY_PAYLOAD_TYPE.get(statement);
    if (found === undefined) {
      throw new MalformedError(`unknown payload type: expected a collateral-sync v1 payload type, got ${JSON.stringify(statement)}`, {
        reason: ErrorReason.PAYLOAD_TYPE_MISMATCH,
        metadata: { expected: "a collateral-sync v1 payload type", actual: statement },
      });
    }
    return found;
  }
  const found = BY_TYPE_NAME.get(statement.typeName);
  if (found === undefined) {
    throw new MalformedError(`not a statement message: expected a message with a StatementHeader, got ${statement.typeName}`, {
      reason: ErrorReason.PAYLOAD_TYPE_MISMATCH,
      metadata: { expected: "a statement message", actual: statement.typeName },
    });
  }
  return found;
}

/** Payload type string of a statement message schema. */
export function payloadTypeOf(schema: DescMessage): string {
  return statementTypeOf(schema).payloadType;
}

/** Message schema for a payload type; unknown types raise PAYLOAD_TYPE_MISMATCH. */
export function schemaOf(payloadType: string): DescMessage {
  return statementTypeOf(payloadType).schema;
}

/** PartyRole values that may issue statements of this payload type. */
export function issuerRolesOf(payloadType: string): ReadonlySet<PartyRole> {
  return statementTypeOf(payloadType).issuerRoles;
}

/** Whether statements of this type may be addressed to everyone ("*"). */
export function isPublic(payloadType: string): boolean {
  return statementTypeOf(payloadType).public;
}
