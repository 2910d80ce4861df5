// Validation of the new entries' updates of a received batch (PROTOCOL.md §6.5 step 5, §6.8).
//
// Each update must parse as a PositionUpdate with a variant allowed in the direction, and
// every statement it carries must verify as §3.6.1 says for a statement inside a verified
// sync batch: stages a–e and g, freshness (f) being judged on the batch. Their issuer must be
// the peer, except the client's liquidation path the custodian relays with a pledge, which is
// checked as the custodian checked it (a–f at the holdings statement's issued_at, the
// custodian as audience) and must authorise this account and this exchange (§9.1). Any
// failure fails the whole batch.

import { fromBinary } from "@bufbuild/protobuf";
import type { Envelope } from "../gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../gen/collateral_sync/v1/errors_pb.js";
import { HoldingsStatementSchema, type HoldingsStatement } from "../gen/collateral_sync/v1/attestation_pb.js";
import {
  LiquidationPathSchema,
  LiquidationReceiptSchema,
  type LiquidationPath,
} from "../gen/collateral_sync/v1/liquidation_pb.js";
import { MarginCallResponseSchema } from "../gen/collateral_sync/v1/margin_pb.js";
import {
  PositionUpdateSchema,
  SyncDirection,
  type PositionUpdate,
} from "../gen/collateral_sync/v1/position_sync_pb.js";
import { CollateralSyncError, MalformedError, VerificationError } from "../errors.js";
import type { KeyRegistry } from "../registry.js";
import { verifyStatement, type VerifiedStatement } from "../signing.js";
import { payloadTypeOf, schemaOf, type StatementMessage } from "../statements.js";
import type { Instant } from "../time.js";
import { directionName } from "./batch.js";
import { replayKey } from "./store.js";

type Variant = NonNullable<PositionUpdate["update"]["case"]>;

/** PositionUpdate variants allowed in each direction (§6.8). */
export const ALLOWED_VARIANTS: Readonly<Record<number, ReadonlySet<Variant>>> = {
  [SyncDirection.CUSTODIAN_TO_EXCHANGE]: new Set<Variant>([
    "holdingsChange",
    "pledgeChange",
    "yieldAccrual",
    "liquidationReceipt",
    "marginCallResponse",
  ]),
  [SyncDirection.EXCHANGE_TO_CUSTODIAN]: new Set<Variant>([
    "creditLine",
    "marginCall",
    "liquidationInstruction",
    "riskPolicy",
  ]),
};

const HOLDINGS_TYPE = payloadTypeOf(HoldingsStatementSchema);
const PATH_TYPE = payloadTypeOf(LiquidationPathSchema);
const RECEIPT_TYPE = payloadTypeOf(LiquidationReceiptSchema);
const RESPONSE_TYPE = payloadTypeOf(MarginCallResponseSchema);

/** One new entry of a batch, parsed, with the statements it carries verified. */
export interface ReceivedUpdate {
  readonly sequence: bigint;
  readonly update: PositionUpdate;
  /** The peer's statement the update carries (holdings statement, receipt, response), if any. */
  readonly statement?: VerifiedStatement;
  /** The client's liquidation path relayed with a pledge (holdings_change only). */
  readonly liquidationPath?: VerifiedStatement<LiquidationPath>;
}

export interface ValidateUpdatesOptions {
  registry: KeyRegistry;
  /** Our party id: the audience of the peer's statements. */
  receiver: string;
  /** The peer's party id: the issuer of every statement it sends (but relayed paths). */
  sender: string;
  direction: SyncDirection;
  /** The batch's verification time. */
  now: Instant;
  maxSkewSeconds?: number;
  /** Last sequence acted on from (issuer, payload type): the stored replay state. */
  lastAccepted: (issuer: string, payloadType: string) => bigint;
}

/** The validated updates and the replay records they would raise (committed with the batch). */
export interface ValidatedUpdates {
  readonly updates: ReceivedUpdate[];
  readonly replay: Map<string, bigint>;
}

/** Parse and check `updates` (serialised, as received) starting at `firstSequence`. */
export function validateUpdates(
  updates: readonly Uint8Array[],
  firstSequence: bigint,
  options: ValidateUpdatesOptions,
): ValidatedUpdates {
  const allowed = ALLOWED_VARIANTS[options.direction] ?? new Set<Variant>();
  const replay = new Map<string, bigint>();
  const result: ReceivedUpdate[] = [];
  let sequence = firstSequence;
  for (const bytes of updates) {
    const update = parseUpdate(bytes, sequence);
    const variant = update.update.case;
    if (variant === undefined || !allowed.has(variant)) {
      throw new MalformedError(
        `entry ${sequence}: update variant ${JSON.stringify(variant ?? "unset")} is not allowed in ${directionName(options.direction)}`,
        { metadata: { expected: [...allowed].sort().join("|"), actual: variant ?? "unset", sequence: String(sequence) } },
      );
    }
    try {
      result.push(checkStatements(sequence, update, options, replay));
    } catch (error) {
      if (error instanceof CollateralSyncError) error.metadata["sequence"] ??= String(sequence);
      throw error;
    }
    sequence += 1n;
  }
  return { updates: result, replay };
}

function parseUpdate(bytes: Uint8Array, sequence: bigint): PositionUpdate {
  try {
    return fromBinary(PositionUpdateSchema, bytes);
  } catch (cause) {
    throw new MalformedError(`entry ${sequence}: update does not parse as PositionUpdate`, {
      metadata: { expected: "a serialized collateral_sync.v1.PositionUpdate", actual: `${bytes.length} undecodable bytes` },
      cause,
    });
  }
}

function checkStatements(
  sequence: bigint,
  update: PositionUpdate,
  options: ValidateUpdatesOptions,
  replay: Map<string, bigint>,
): ReceivedUpdate {
  const kind = update.update;
  switch (kind.case) {
    case "holdingsChange": {
      const change = kind.value;
      const envelope = required(change.holdingsStatement, "holdings_change.holdings_statement");
      required(change.attestation, "holdings_change.attestation");
      const statement = fromPeer(envelope, HOLDINGS_TYPE, options, replay);
      if (change.liquidationPath === undefined) return { sequence, update, statement };
      const liquidationPath = relayedPath(change.liquidationPath, statement as VerifiedStatement<HoldingsStatement>, options);
      return { sequence, update, statement, liquidationPath };
    }
    case "liquidationReceipt":
      return { sequence, update, statement: fromPeer(kind.value, RECEIPT_TYPE, options, replay) };
    case "marginCallResponse":
      return { sequence, update, statement: fromPeer(kind.value, RESPONSE_TYPE, options, replay) };
    default:
      // pledge_change and yield_accrual carry no statement; they point at a holdings statement.
      return { sequence, update };
  }
}

function required<T>(value: T | undefined, field: string): T {
  if (value === undefined) {
    throw new MalformedError(`${field} is missing`, {
      metadata: { field, expected: "present", actual: "absent" },
      fieldViolations: { [field]: "required" },
    });
  }
  return value;
}

/** A statement of the peer inside a verified batch: a–e, issuer the peer, and g. */
function fromPeer(
  envelope: Envelope,
  payloadType: string,
  options: ValidateUpdatesOptions,
  replay: Map<string, bigint>,
): VerifiedStatement {
  const verified = verifyEmbedded(envelope, payloadType, options);
  if (verified.issuer !== options.sender) {
    throw new VerificationError(
      `${payloadType} issued by ${JSON.stringify(verified.issuer)} on the stream of ${JSON.stringify(options.sender)}`,
      { reason: ErrorReason.KEY_ROLE_MISMATCH, metadata: { expected: options.sender, actual: verified.issuer } },
    );
  }
  const key = replayKey(verified.issuer, payloadType);
  // Stage g against what is stored and what this batch already carried.
  const last = replay.get(key) ?? options.lastAccepted(verified.issuer, payloadType);
  if (verified.sequence <= last) {
    throw new VerificationError(
      `${payloadType} sequence ${verified.sequence} from ${JSON.stringify(verified.issuer)} was already accepted (last ${last})`,
      { reason: ErrorReason.REPLAYED, metadata: { expected: `> ${last}`, actual: String(verified.sequence) } },
    );
  }
  replay.set(key, verified.sequence);
  return verified;
}

/**
 * Stages a–e of a statement inside a verified batch (§3.6.1): freshness is the batch's.
 *
 * A statement replayed after an outage may be past its own expiry and still be what the peer
 * said then; so a freshness failure at `now` — reported only after the signature verified,
 * which makes parsing safe — is checked again at the statement's own issued_at, where stage f
 * cannot fail and stages a–e give the same answer.
 */
function verifyEmbedded(envelope: Envelope, payloadType: string, options: ValidateUpdatesOptions): VerifiedStatement {
  const verify = (now: Instant): VerifiedStatement =>
    verifyStatement(envelope, options.registry, {
      audience: options.receiver,
      now,
      maxSkewSeconds: options.maxSkewSeconds,
      expectedPayloadType: payloadType,
    });
  try {
    return verify(options.now);
  } catch (error) {
    const stale =
      error instanceof CollateralSyncError &&
      (error.reason === ErrorReason.STATEMENT_EXPIRED || error.reason === ErrorReason.STATEMENT_NOT_YET_VALID);
    if (!stale) throw error;
    const message = fromBinary(schemaOf(payloadType), envelope.payload) as StatementMessage;
    const issuedAt = message.header?.issuedAt;
    if (issuedAt === undefined) throw error;
    return verify(issuedAt);
  }
}

/** The client's path relayed with a pledge (§9.1): a–f as the custodian checked it, for us. */
function relayedPath(
  envelope: Envelope,
  holdings: VerifiedStatement<HoldingsStatement>,
  options: ValidateUpdatesOptions,
): VerifiedStatement<LiquidationPath> {
  const issuedAt = holdings.header.issuedAt;
  const path = verifyStatement<LiquidationPath>(envelope, options.registry, {
    audience: options.sender,
    now: issuedAt ?? options.now,
    maxSkewSeconds: options.maxSkewSeconds,
    expectedPayloadType: PATH_TYPE,
  });
  const accountId = holdings.message.accountId;
  for (const [field, expected, actual] of [
    ["account_id", accountId, path.message.accountId],
    ["exchange_id", options.receiver, path.message.exchangeId],
  ] as const) {
    if (actual !== expected) {
      throw new VerificationError(
        `holdings_change.liquidation_path.${field} is ${JSON.stringify(actual)}: it does not ` +
          `pre-authorise liquidating ${JSON.stringify(accountId)} by ${JSON.stringify(options.receiver)}`,
        {
          reason: ErrorReason.PATH_NOT_AUTHORISED,
          metadata: { field: `holdings_change.liquidation_path.${field}`, expected, actual },
        },
      );
    }
  }
  return path;
}
