// Signed checkpoints of a custodian's attestation log, and the monitor a counterparty keeps
// (PROTOCOL.md §5.1, §5.2, §5.6).
//
// A log leaf is the exact signed bytes of a statement, PAE(payload_type, payload), so anyone
// holding the envelope rebuilds the leaf without re-serialising anything (statementLeaf).
// A counterparty checks a checkpoint's signature and origin with verifyCheckpoint, and keeps
// a CheckpointMonitor that only moves forward along consistency proofs: a smaller tree
// (rollback), a different root at the same size (fork) or a rewritten history is refused, and
// a fork is kept as evidence. Mirrors the verifying half of sdk/collateral_sync/attestation.py.

import { clone } from "@bufbuild/protobuf";
import {
  type Checkpoint,
  CheckpointSchema,
  type ConsistencyProof,
} from "./gen/collateral_sync/v1/attestation_pb.js";
import type { Envelope } from "./gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import { MalformedError, ProofError } from "./errors.js";
import { emptyRoot, HASH_SIZE, verifyConsistencyProof } from "./merkle.js";
import type { KeyRegistry } from "./registry.js";
import { pae, verifyStatement } from "./signing.js";
import { PAYLOAD_TYPES } from "./statements.js";
import type { Instant } from "./time.js";

const CHECKPOINT_PAYLOAD_TYPE = PAYLOAD_TYPES["checkpoint"] as string;

/**
 * Leaf bytes of a statement: the exact bytes its signatures cover, PAE(payload_type, payload)
 * of the envelope as received. Binds the payload type as well as the payload.
 */
export function statementLeaf(envelope: Envelope): Uint8Array {
  return pae(envelope.payloadType, envelope.payload);
}

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("hex");
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

/** Options of verifyCheckpoint. */
export interface VerifyCheckpointOptions {
  /** The configured origin of the custodian's log. */
  origin: string;
  now: Instant;
  maxSkewSeconds?: number | undefined;
  /** The verifier's party id; only needed when the checkpoint names its audience. Default "*". */
  audience?: string | undefined;
}

/**
 * Verify a signed checkpoint of the log named `origin` and return it.
 *
 * Stages: the signed statement (§3.6: type checkpoint, signature by a custodian key,
 * audience, freshness), then the origin (CHECKPOINT_INCONSISTENT, §5.6 step 2), then the root's
 * shape (32 bytes; H("") for an empty tree).
 */
export function verifyCheckpoint(envelope: Envelope, registry: KeyRegistry, opts: VerifyCheckpointOptions): Checkpoint {
  const verified = verifyStatement<Checkpoint>(envelope, registry, {
    expectedPayloadType: CHECKPOINT_PAYLOAD_TYPE,
    audience: opts.audience ?? "*",
    now: opts.now,
    maxSkewSeconds: opts.maxSkewSeconds,
  });
  const checkpoint = verified.message;
  if (checkpoint.origin !== opts.origin) {
    throw new ProofError(
      `checkpoint origin: expected ${JSON.stringify(opts.origin)}, got ${JSON.stringify(checkpoint.origin)}`,
      { reason: ErrorReason.CHECKPOINT_INCONSISTENT, metadata: { expected: opts.origin, actual: checkpoint.origin } },
    );
  }
  checkCheckpointShape(checkpoint);
  return checkpoint;
}

function checkCheckpointShape(checkpoint: Checkpoint): void {
  if (checkpoint.rootHash.length !== HASH_SIZE) {
    throw new MalformedError(
      `checkpoint root_hash: expected ${HASH_SIZE} bytes, got ${checkpoint.rootHash.length}`,
      {
        metadata: { expected: `${HASH_SIZE} bytes`, actual: `${checkpoint.rootHash.length} bytes` },
        fieldViolations: { root_hash: `must be ${HASH_SIZE} bytes` },
      },
    );
  }
  const empty = emptyRoot();
  if (checkpoint.treeSize === 0n && !sameBytes(checkpoint.rootHash, empty)) {
    throw new ProofError(`root of an empty tree: expected ${hex(empty)}, got ${hex(checkpoint.rootHash)}`, {
      metadata: { expected: hex(empty), actual: hex(checkpoint.rootHash) },
    });
  }
}

/** Two checkpoints of one log with the same size and different roots. */
export interface CheckpointFork {
  readonly held: Checkpoint;
  readonly received: Checkpoint;
}

/**
 * What a counterparty keeps: the last verified checkpoint of each log.
 *
 * Feed it checkpoints that passed verifyCheckpoint. It moves forward only along consistency
 * proofs, and its state changes only when every check passes. A fork (same size, different
 * root) is refused and both checkpoints are kept in `evidence`: signed checkpoints that
 * contradict each other prove the log misbehaved. A consistency proof that fails is refused
 * without evidence, since a bad proof alone proves nothing.
 */
export class CheckpointMonitor {
  private readonly held = new Map<string, Checkpoint>();
  private readonly forks: CheckpointFork[] = [];

  /** A copy of the checkpoint held for `origin`, or undefined. */
  latest(origin: string): Checkpoint | undefined {
    const held = this.held.get(origin);
    return held === undefined ? undefined : clone(CheckpointSchema, held);
  }

  /** Forks seen so far, oldest first (copies). */
  get evidence(): readonly CheckpointFork[] {
    return this.forks.map((fork) => ({
      held: clone(CheckpointSchema, fork.held),
      received: clone(CheckpointSchema, fork.received),
    }));
  }

  /**
   * Accept `checkpoint` as the latest of its log, or throw and change nothing.
   *
   * `proof` must prove consistency from the held checkpoint when the new one is larger; it is
   * not needed for the first checkpoint of a log, for one of the same size, or after an empty
   * tree.
   */
  advance(checkpoint: Checkpoint, proof: ConsistencyProof | undefined): void {
    if (!checkpoint.origin) {
      throw new MalformedError("checkpoint origin must be non-empty", {
        metadata: { expected: "non-empty origin", actual: "" },
        fieldViolations: { origin: "required" },
      });
    }
    checkCheckpointShape(checkpoint);
    const received = clone(CheckpointSchema, checkpoint);
    const held = this.held.get(received.origin);
    if (held !== undefined) this.checkExtends(held, received, proof);
    if (held === undefined || received.treeSize > held.treeSize) {
      this.held.set(received.origin, received);
    }
  }

  private checkExtends(held: Checkpoint, received: Checkpoint, proof: ConsistencyProof | undefined): void {
    const origin = JSON.stringify(received.origin);
    if (received.treeSize < held.treeSize) {
      throw new ProofError(
        `checkpoint of ${origin} rolls back: expected tree size >= ${held.treeSize}, got ${received.treeSize}`,
        {
          reason: ErrorReason.CHECKPOINT_INCONSISTENT,
          metadata: { expected: `>= ${held.treeSize}`, actual: String(received.treeSize) },
        },
      );
    }
    if (received.treeSize === held.treeSize) {
      if (!sameBytes(received.rootHash, held.rootHash)) {
        this.forks.push({ held: clone(CheckpointSchema, held), received });
        throw new ProofError(
          `fork of ${origin} at tree size ${held.treeSize}: expected root ${hex(held.rootHash)}, ` +
            `got ${hex(received.rootHash)}`,
          {
            reason: ErrorReason.CHECKPOINT_INCONSISTENT,
            metadata: { expected: hex(held.rootHash), actual: hex(received.rootHash) },
          },
        );
      }
      return;
    }
    // The empty tree is a prefix of every tree; there is nothing to prove.
    if (held.treeSize === 0n) return;
    if (proof === undefined) {
      throw new ProofError(
        `checkpoint of ${origin} grows from ${held.treeSize} to ${received.treeSize}: ` +
          "expected a consistency proof, got none",
        { metadata: { expected: "consistency proof", actual: "none" } },
      );
    }
    verifyConsistencyProof(proof, held, received);
  }
}
