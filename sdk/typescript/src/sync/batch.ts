// Verification of one received SyncBatch on its own (PROTOCOL.md §6.5 steps 1 and 2).
//
// The envelope is checked as a sync-batch statement addressed to us and fresh now (§3.6
// stages a–f); its issuer must be the peer with a key of the role that sends this direction;
// the entries must be non-empty, consecutive, chained, and each entry_hash recomputed from the
// bytes as received (§6.3, verifyChain of ../syncChain.ts). How the batch fits the log stored
// here (duplicates, gaps, equivocation) is the session's business (./session.ts).

import { PartyRole } from "../gen/collateral_sync/v1/common_pb.js";
import type { Envelope } from "../gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../gen/collateral_sync/v1/errors_pb.js";
import { SyncBatchSchema, SyncDirection, type SyncBatch } from "../gen/collateral_sync/v1/position_sync_pb.js";
import { CollateralSyncError, MalformedError, VerificationError } from "../errors.js";
import type { KeyRegistry } from "../registry.js";
import { verifyStatement, type VerifiedStatement } from "../signing.js";
import { payloadTypeOf } from "../statements.js";
import { verifyChain, type VerifiedChain } from "../syncChain.js";
import type { Instant } from "../time.js";

export const SYNC_BATCH_TYPE = payloadTypeOf(SyncBatchSchema);

const SENDER_ROLE: Readonly<Record<number, PartyRole>> = {
  [SyncDirection.CUSTODIAN_TO_EXCHANGE]: PartyRole.CUSTODIAN,
  [SyncDirection.EXCHANGE_TO_CUSTODIAN]: PartyRole.EXCHANGE,
};

/** A batch whose envelope, sender, direction and hash chain checked out. */
export interface VerifiedSyncBatch {
  readonly statement: VerifiedStatement<SyncBatch>;
  /** Sequences and entry hashes of the entries (../syncChain.ts). */
  readonly chain: VerifiedChain;
  /** Serialised PositionUpdate of each entry, as received. */
  readonly updates: readonly Uint8Array[];
}

export interface VerifyBatchOptions {
  /** Our party id (the audience). */
  receiver: string;
  /** The peer's party id (the issuer). */
  sender: string;
  /** The direction the stream carries towards us. */
  direction: SyncDirection;
  now: Instant;
  /** Our window: a batch never holds more entries (LIMIT_EXCEEDED). */
  maxEntries: number;
  maxSkewSeconds?: number;
}

export function directionName(direction: number): string {
  return SyncDirection[direction] ?? String(direction);
}

export function verifySyncBatch(
  envelope: Envelope,
  registry: KeyRegistry,
  options: VerifyBatchOptions,
): VerifiedSyncBatch {
  const { direction } = options;
  const statement = verifyStatement<SyncBatch>(envelope, registry, {
    audience: options.receiver,
    now: options.now,
    maxSkewSeconds: options.maxSkewSeconds,
    expectedPayloadType: SYNC_BATCH_TYPE,
  });
  const batch = statement.message;
  if (statement.issuer !== options.sender) {
    throw new VerificationError(
      `sync batch issued by ${JSON.stringify(statement.issuer)}, expected the peer ${JSON.stringify(options.sender)}`,
      { reason: ErrorReason.KEY_ROLE_MISMATCH, metadata: { expected: options.sender, actual: statement.issuer } },
    );
  }
  const signer = statement.signerKeyIds[0] === undefined ? undefined : registry.get(statement.signerKeyIds[0]);
  const expectedRole = SENDER_ROLE[direction];
  if (signer === undefined || signer.role !== expectedRole) {
    throw new VerificationError(
      `${directionName(direction)} batches are signed by a ${PartyRole[expectedRole ?? 0]} key, ` +
        `got a ${PartyRole[signer?.role ?? 0]} key`,
      {
        reason: ErrorReason.KEY_ROLE_MISMATCH,
        metadata: { expected: PartyRole[expectedRole ?? 0] ?? "", actual: PartyRole[signer?.role ?? 0] ?? "" },
      },
    );
  }
  if (batch.direction !== direction) {
    throw new VerificationError(
      `batch direction ${directionName(batch.direction)}, expected ${directionName(direction)} on this stream`,
      {
        reason: ErrorReason.KEY_ROLE_MISMATCH,
        metadata: { expected: String(direction), actual: String(batch.direction) },
        fieldViolations: { direction: `must be ${directionName(direction)}` },
      },
    );
  }
  if (batch.entries.length > options.maxEntries) {
    throw new CollateralSyncError(
      `sync batch of ${batch.entries.length} entries exceeds the window of ${options.maxEntries}`,
      {
        reason: ErrorReason.LIMIT_EXCEEDED,
        metadata: { expected: `<= ${options.maxEntries}`, actual: String(batch.entries.length) },
      },
    );
  }
  // Non-empty, consecutive, chained, every entry_hash recomputed over the bytes as received.
  const chain = verifyChain(direction, batch.entries);
  const lastSequence = chain.lastSequence;
  const headerSequence = statement.header.sequence;
  if (headerSequence !== lastSequence) {
    throw new MalformedError(
      `header.sequence ${headerSequence}, expected the last entry's sequence ${lastSequence}`,
      {
        metadata: { expected: String(lastSequence), actual: String(headerSequence) },
        fieldViolations: { "header.sequence": "must be the last entry's sequence" },
      },
    );
  }
  return { statement, chain, updates: batch.entries.map((entry) => entry.update) };
}

export function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((value, index) => value === b[index]);
}

export function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("hex");
}
