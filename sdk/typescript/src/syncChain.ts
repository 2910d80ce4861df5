// The sync log's hash chain (PROTOCOL.md §6.3–§6.5): entry hashes, the checks a receiver makes
// on a batch's entries, and how those entries fit the log it has stored.
//
// Each direction of the sync stream is a log whose entry `sequence` commits to the one before:
//   entry_hash = SHA-256("collateral-sync/v1/sync-entry" || 0x00 || u8(direction)
//                        || u64be(sequence) || prev_entry_hash || update)
// with `update` the serialised PositionUpdate exactly as received. verifyChain is §6.5 steps
// 1–2 for the entries alone (non-empty, consecutive, chained, every hash recomputed);
// fitChain is steps 3–4 against the receiver's stored log (duplicates, SEQUENCE_GAP,
// EQUIVOCATION). Signatures, roles and the batch header are checked elsewhere
// (./sync/batch.ts). Mirrors entry_hash and the chain checks of
// sdk/collateral_sync/sync/_batch.py and SyncLog._fit of sdk/collateral_sync/sync/_log.py.

import { createHash } from "node:crypto";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import { SyncDirection } from "./gen/collateral_sync/v1/position_sync_pb.js";
import { MalformedError, StateError, VerificationError } from "./errors.js";
import { MAX_INTEGER } from "./integers.js";

/** The 29 ASCII bytes that, with a zero byte, start every entry-hash input (§6.3). */
export const ENTRY_HASH_DOMAIN: Uint8Array = new TextEncoder().encode("collateral-sync/v1/sync-entry");
const ENTRY_HASH_BYTES = 32;
/** prev_entry_hash of sequence 1, and the entry hash of an empty log's head. */
export const ZERO_HASH: Uint8Array = new Uint8Array(ENTRY_HASH_BYTES);
const MAX_U64 = 2n ** 64n - 1n;

/** One entry as it travels in a SyncBatch; the generated SyncEntry message is one. */
export interface ChainEntry {
  readonly sequence: bigint;
  readonly prevEntryHash: Uint8Array;
  readonly update: Uint8Array;
  readonly entryHash: Uint8Array;
}

/** The last entry of a stored log: its sequence and entry hash (0 and ZERO_HASH when empty). */
export interface ChainHead {
  readonly sequence: bigint;
  readonly entryHash: Uint8Array;
}

export const EMPTY_CHAIN_HEAD: ChainHead = Object.freeze({ sequence: 0n, entryHash: ZERO_HASH });

/** Entries whose sequences, links and hashes checked out (§6.5 steps 1–2). */
export interface VerifiedChain {
  readonly direction: SyncDirection;
  readonly firstSequence: bigint;
  /** prev_entry_hash of the first entry. */
  readonly firstPrevHash: Uint8Array;
  readonly lastSequence: bigint;
  readonly lastEntryHash: Uint8Array;
  /** entry_hash of each entry, in order (sequence firstSequence + i). */
  readonly entryHashes: readonly Uint8Array[];
}

/** How verified entries fit a stored log (§6.5 steps 3–4). */
export interface ChainFit {
  /** Sequence of the first entry not yet stored; above lastSequence when all are duplicates. */
  readonly firstNewSequence: bigint;
  /** The log's head once the new entries are stored (the old head when there are none). */
  readonly head: ChainHead;
}

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("hex");
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((value, index) => value === b[index]);
}

function directionName(direction: number): string {
  return SyncDirection[direction] ?? String(direction);
}

function checkDirection(direction: number): asserts direction is SyncDirection {
  if (direction !== SyncDirection.CUSTODIAN_TO_EXCHANGE && direction !== SyncDirection.EXCHANGE_TO_CUSTODIAN) {
    throw new MalformedError(
      `direction must be CUSTODIAN_TO_EXCHANGE (1) or EXCHANGE_TO_CUSTODIAN (2), got ${directionName(direction)}`,
      { metadata: { expected: "1|2", actual: String(direction) } },
    );
  }
}

function digest(direction: number, sequence: bigint, prev: Uint8Array, update: Uint8Array): Uint8Array {
  // domain || 0x00 || u8(direction) || u64be(sequence): 29 + 1 + 1 + 8 bytes.
  const fixed = new Uint8Array(ENTRY_HASH_DOMAIN.length + 10);
  fixed.set(ENTRY_HASH_DOMAIN, 0);
  fixed[ENTRY_HASH_DOMAIN.length + 1] = direction;
  new DataView(fixed.buffer).setBigUint64(ENTRY_HASH_DOMAIN.length + 2, sequence, false);
  return new Uint8Array(createHash("sha256").update(fixed).update(prev).update(update).digest());
}

/**
 * SHA-256 of one sync-log entry (§6.3). `update` is the serialised PositionUpdate as sent or
 * received, never re-serialised. Refuses (MALFORMED) a direction other than 1 or 2, a sequence
 * outside 1..2^64−1 and a prev_entry_hash that is not 32 bytes.
 */
export function entryHash(direction: number, sequence: bigint, prevEntryHash: Uint8Array, update: Uint8Array): Uint8Array {
  checkDirection(direction);
  if (sequence < 1n || sequence > MAX_U64) {
    throw new MalformedError(`sequence must be in 1..2^64-1, got ${sequence}`, {
      metadata: { expected: "1..2^64-1", actual: String(sequence) },
    });
  }
  if (prevEntryHash.length !== ENTRY_HASH_BYTES) {
    throw new MalformedError(`prev_entry_hash must be ${ENTRY_HASH_BYTES} bytes, got ${prevEntryHash.length}`, {
      metadata: { expected: String(ENTRY_HASH_BYTES), actual: String(prevEntryHash.length) },
    });
  }
  return digest(direction, sequence, prevEntryHash, update);
}

/**
 * Check a batch's entries received on a stream of `direction` (§6.5 steps 1–2): at least one;
 * consecutive sequences from at least 1; every hash 32 bytes; each entry chained to the one
 * before, and a sequence-1 entry to ZERO_HASH; every entry_hash recomputed. MALFORMED
 * otherwise, naming the entry. A sequence above 2^63 − 1 is OUT_OF_RANGE (§2.4).
 */
export function verifyChain(direction: number, entries: readonly ChainEntry[]): VerifiedChain {
  checkDirection(direction);
  const first = entries[0];
  if (first === undefined) {
    throw new MalformedError("sync batch has no entries, expected at least 1", {
      metadata: { expected: ">= 1", actual: "0" },
      fieldViolations: { entries: "must not be empty" },
    });
  }
  const firstSequence = first.sequence;
  const lastSequence = firstSequence + BigInt(entries.length) - 1n;
  if (firstSequence < 1n) {
    throw new MalformedError(`entries[0].sequence ${firstSequence}, expected at least 1`, {
      metadata: { expected: ">= 1", actual: String(firstSequence) },
      fieldViolations: { "entries[0].sequence": "out of range" },
    });
  }
  if (lastSequence > MAX_INTEGER) {
    throw new MalformedError(`entry sequences ${firstSequence}..${lastSequence} go above ${MAX_INTEGER} (2^63 - 1)`, {
      reason: ErrorReason.OUT_OF_RANGE,
      metadata: { field: "entries.sequence", expected: `<= ${MAX_INTEGER}`, actual: String(lastSequence) },
    });
  }
  const firstPrev = first.prevEntryHash;
  if (firstPrev.length !== ENTRY_HASH_BYTES || (firstSequence === 1n && !sameBytes(firstPrev, ZERO_HASH))) {
    const expected = firstSequence === 1n ? "32 zero bytes" : `${ENTRY_HASH_BYTES} bytes`;
    throw new MalformedError(`entries[0].prev_entry_hash must be ${expected}, got ${hex(firstPrev) || "empty"}`, {
      metadata: { expected, actual: hex(firstPrev) },
      fieldViolations: { "entries[0].prev_entry_hash": `must be ${expected}` },
    });
  }
  const hashes: Uint8Array[] = [];
  let prev = firstPrev;
  let expectedSequence = firstSequence;
  for (const [index, entry] of entries.entries()) {
    if (entry.sequence !== expectedSequence) {
      throw new MalformedError(`entries[${index}].sequence ${entry.sequence}, expected ${expectedSequence} (consecutive)`, {
        metadata: { expected: String(expectedSequence), actual: String(entry.sequence) },
        fieldViolations: { [`entries[${index}].sequence`]: "must be consecutive" },
      });
    }
    if (!sameBytes(entry.prevEntryHash, prev)) {
      throw new MalformedError(`entries[${index}].prev_entry_hash does not chain to the previous entry`, {
        metadata: { expected: hex(prev), actual: hex(entry.prevEntryHash) },
        fieldViolations: { [`entries[${index}].prev_entry_hash`]: "must chain" },
      });
    }
    if (entry.entryHash.length !== ENTRY_HASH_BYTES) {
      throw new MalformedError(`entries[${index}].entry_hash is ${entry.entryHash.length} bytes, expected ${ENTRY_HASH_BYTES}`, {
        metadata: { expected: String(ENTRY_HASH_BYTES), actual: String(entry.entryHash.length) },
        fieldViolations: { [`entries[${index}].entry_hash`]: `must be ${ENTRY_HASH_BYTES} bytes` },
      });
    }
    const computed = digest(direction, entry.sequence, prev, entry.update);
    if (!sameBytes(computed, entry.entryHash)) {
      throw new MalformedError(`entries[${index}] (sequence ${entry.sequence}): entry_hash does not match its content`, {
        metadata: { expected: hex(computed), actual: hex(entry.entryHash) },
        fieldViolations: { [`entries[${index}].entry_hash`]: "must be the entry's hash" },
      });
    }
    hashes.push(entry.entryHash);
    prev = entry.entryHash;
    expectedSequence += 1n;
  }
  return { direction, firstSequence, firstPrevHash: firstPrev, lastSequence, lastEntryHash: prev, entryHashes: hashes };
}

function equivocation(direction: SyncDirection, sequence: bigint, stored: Uint8Array, received: Uint8Array): VerificationError {
  return new VerificationError(
    `equivocation in ${directionName(direction)} at sequence ${sequence}: ` +
      `stored entry hash ${hex(stored)}, peer's ${hex(received)}`,
    {
      reason: ErrorReason.EQUIVOCATION,
      metadata: { sequence: String(sequence), expected: hex(stored), actual: hex(received) },
    },
  );
}

/**
 * Fit verified entries onto the receiver's stored log ending at `head` (§6.5 steps 3–4).
 *
 * A first sequence past head + 1 is SEQUENCE_GAP (metadata expected = head + 1, actual). Entries
 * up to the head are duplicates: the hash of the last of them is compared with the stored one
 * (it commits to every entry before it), and a first new entry must chain to the head's hash;
 * a difference is EQUIVOCATION (metadata sequence, expected = stored, actual = received). The
 * stored hash of the last duplicate is the head's own when the entries reach the head; when
 * they all lie below it, `storedEntryHash(sequence)` must give it (StateError if it cannot).
 */
export function fitChain(
  chain: VerifiedChain,
  head: ChainHead,
  storedEntryHash?: (sequence: bigint) => Uint8Array | undefined,
): ChainFit {
  const { firstSequence: first, lastSequence: last } = chain;
  if (first > head.sequence + 1n) {
    throw new VerificationError(
      `batch starts at sequence ${first}; expected at most ${head.sequence + 1n} (received up to ${head.sequence})`,
      { reason: ErrorReason.SEQUENCE_GAP, metadata: { expected: String(head.sequence + 1n), actual: String(first) } },
    );
  }
  let prev = chain.firstPrevHash;
  if (first <= head.sequence) {
    const overlap = last < head.sequence ? last : head.sequence;
    const received = chain.entryHashes[Number(overlap - first)] as Uint8Array;
    const stored = overlap === head.sequence ? head.entryHash : storedEntryHash?.(overlap);
    if (stored === undefined) {
      throw new StateError(`the stored entry hash at sequence ${overlap} is needed to compare a duplicate`, {
        metadata: { sequence: String(overlap) },
      });
    }
    if (!sameBytes(received, stored)) throw equivocation(chain.direction, overlap, stored, received);
    if (last <= head.sequence) return { firstNewSequence: last + 1n, head };
    prev = chain.entryHashes[Number(head.sequence - first)] as Uint8Array;
  }
  if (!sameBytes(prev, head.entryHash)) throw equivocation(chain.direction, head.sequence, head.entryHash, prev);
  return { firstNewSequence: head.sequence + 1n, head: { sequence: last, entryHash: chain.lastEntryHash } };
}
