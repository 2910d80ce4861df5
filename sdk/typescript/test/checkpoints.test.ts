// Checkpoints (PROTOCOL.md §5.1, §5.2, §5.6): statement leaves, verifyCheckpoint, and the
// CheckpointMonitor that only moves forward along consistency proofs.

import assert from "node:assert/strict";
import { test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { CheckpointMonitor, statementLeaf, verifyCheckpoint } from "../src/checkpoints.js";
import { MalformedError, ProofError, VerificationError } from "../src/errors.js";
import {
  type Checkpoint,
  CheckpointSchema,
  type ConsistencyProof,
  ConsistencyProofSchema,
} from "../src/gen/collateral_sync/v1/attestation_pb.js";
import { type Envelope, EnvelopeSchema, SignatureSchema, StatementHeaderSchema } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { consistencyPath, emptyRoot, leafHash, merkleRoot } from "../src/merkle.js";
import { KeyRegistry } from "../src/registry.js";
import { pae } from "../src/signing.js";
import { PAYLOAD_TYPES } from "../src/statements.js";
import { timestampFromDate } from "../src/time.js";
import { caught, fromHex, loadVectors, signedEnvelope, TestSigner, toHex } from "./verification-fixtures.js";

interface StatementsFile {
  registry: unknown;
  signing_keys: { name: string; seed_hex: string }[];
  vectors: {
    id: string;
    envelope: { payload_type: string; payload_hex: string; signatures: { key_id: string; sig_hex: string }[] };
    pae_hex: string;
    payload_json: { origin?: string } | null;
    now: string;
  }[];
}

const STATEMENTS = loadVectors<StatementsFile>("statements.json");
const REGISTRY = KeyRegistry.fromJson(JSON.stringify(STATEMENTS.registry));
const signer = (name: string): TestSigner => {
  const key = STATEMENTS.signing_keys.find((k) => k.name === name);
  if (key === undefined) throw new Error(`no signing key ${name}`);
  return TestSigner.fromHex(key.seed_hex);
};
const CUSTODIAN = signer("custodian");
const EXCHANGE = signer("exchange");

const ORIGIN = "custodian.example/collateral-sync/attestations";
const NOW = new Date("2026-06-01T12:00:00Z");
const TTL_MS = 10 * 60 * 1000;
const CHECKPOINT_TYPE = PAYLOAD_TYPES["checkpoint"] as string;
const encoder = new TextEncoder();

const leaves = (count: number, prefix = "entry"): Uint8Array[] =>
  Array.from({ length: count }, (_, i) => leafHash(encoder.encode(`${prefix}-${i}`)));

function checkpointOf(hashes: readonly Uint8Array[], size = hashes.length, origin = ORIGIN): Checkpoint {
  return create(CheckpointSchema, {
    origin,
    treeSize: BigInt(size),
    rootHash: merkleRoot(hashes.slice(0, size)),
  });
}

function proofOf(hashes: readonly Uint8Array[], first: number, second: number): ConsistencyProof {
  return create(ConsistencyProofSchema, {
    firstTreeSize: BigInt(first),
    secondTreeSize: BigInt(second),
    consistencyPath: consistencyPath(first, hashes.slice(0, second)),
  });
}

function signedCheckpoint(
  options: { origin?: string; size?: bigint; root?: Uint8Array; audience?: string[]; by?: TestSigner; issuer?: string } = {},
): Envelope {
  const message = create(CheckpointSchema, {
    header: create(StatementHeaderSchema, {
      issuer: options.issuer ?? "custodian.example",
      audience: options.audience ?? ["*"],
      sequence: 1n,
      issuedAt: timestampFromDate(NOW),
      expiresAt: timestampFromDate(new Date(NOW.getTime() + TTL_MS)),
      statementId: "checkpoint-1",
    }),
    origin: options.origin ?? ORIGIN,
    treeSize: options.size ?? 3n,
    rootHash: options.root ?? new Uint8Array(32).fill(7),
    timestamp: timestampFromDate(NOW),
  });
  return signedEnvelope(CHECKPOINT_TYPE, toBinary(CheckpointSchema, message), [options.by ?? CUSTODIAN]);
}

// ------------------------------------------------------------------ leaves

test("statementLeaf is PAE of the payload type and payload as received", () => {
  for (const vector of STATEMENTS.vectors) {
    const envelope = create(EnvelopeSchema, {
      payloadType: vector.envelope.payload_type,
      payload: fromHex(vector.envelope.payload_hex),
      signatures: vector.envelope.signatures.map((s) => create(SignatureSchema, { keyId: s.key_id, sig: fromHex(s.sig_hex) })),
    });
    assert.equal(toHex(statementLeaf(envelope)), vector.pae_hex, vector.id);
  }
  // A countersignature never changes a leaf.
  const once = signedCheckpoint();
  const twice = create(EnvelopeSchema, {
    ...once,
    signatures: [...once.signatures, create(SignatureSchema, { keyId: EXCHANGE.keyId, sig: EXCHANGE.sign(pae(once.payloadType, once.payload)) })],
  });
  assert.deepEqual(statementLeaf(twice), statementLeaf(once));
});

// ------------------------------------------------------------------ verifyCheckpoint

test("the checkpoint vector verifies as a checkpoint of its origin", () => {
  const vector = STATEMENTS.vectors.find((v) => v.id === "checkpoint/valid-public");
  assert.ok(vector !== undefined && vector.payload_json?.origin !== undefined);
  const envelope = create(EnvelopeSchema, {
    payloadType: vector.envelope.payload_type,
    payload: fromHex(vector.envelope.payload_hex),
    signatures: vector.envelope.signatures.map((s) => create(SignatureSchema, { keyId: s.key_id, sig: fromHex(s.sig_hex) })),
  });
  const checkpoint = verifyCheckpoint(envelope, REGISTRY, { origin: vector.payload_json.origin, now: new Date(vector.now) });
  assert.equal(checkpoint.origin, vector.payload_json.origin);
  assert.equal(checkpoint.rootHash.length, 32);
});

test("verifyCheckpoint refuses another origin (CHECKPOINT_INCONSISTENT, §5.6 step 2)", () => {
  const error = caught(() => verifyCheckpoint(signedCheckpoint({ origin: "other.example/log" }), REGISTRY, { origin: ORIGIN, now: NOW }));
  assert.ok(error instanceof ProofError);
  assert.equal(error.reason, ErrorReason.CHECKPOINT_INCONSISTENT);
  assert.deepEqual(error.metadata, { expected: ORIGIN, actual: "other.example/log" });
});

test("verifyCheckpoint refuses a tampered root, an exchange's checkpoint and an expired one", () => {
  const signed = signedCheckpoint();
  const payload = Uint8Array.from(signed.payload);
  const at = payload.findIndex((_, i) => payload.subarray(i, i + 32).every((b) => b === 7));
  payload[at] = 6;
  const tampered = create(EnvelopeSchema, { ...signed, payload });
  assert.equal(caught(() => verifyCheckpoint(tampered, REGISTRY, { origin: ORIGIN, now: NOW })).reason, ErrorReason.SIGNATURE_INVALID);

  const byExchange = signedCheckpoint({ by: EXCHANGE, issuer: "exchange.example" });
  const role = caught(() => verifyCheckpoint(byExchange, REGISTRY, { origin: ORIGIN, now: NOW }));
  assert.ok(role instanceof VerificationError);
  assert.equal(role.reason, ErrorReason.KEY_ROLE_MISMATCH);

  const later = new Date(NOW.getTime() + 2 * TTL_MS);
  assert.equal(caught(() => verifyCheckpoint(signed, REGISTRY, { origin: ORIGIN, now: later })).reason, ErrorReason.STATEMENT_EXPIRED);
});

test("verifyCheckpoint checks the root's shape", () => {
  const short = caught(() => verifyCheckpoint(signedCheckpoint({ root: new Uint8Array(31).fill(7) }), REGISTRY, { origin: ORIGIN, now: NOW }));
  assert.ok(short instanceof MalformedError);
  assert.deepEqual(short.metadata, { expected: "32 bytes", actual: "31 bytes" });
  const empty = caught(() => verifyCheckpoint(signedCheckpoint({ size: 0n }), REGISTRY, { origin: ORIGIN, now: NOW }));
  assert.ok(empty instanceof ProofError);
  assert.equal(empty.metadata["expected"], toHex(emptyRoot()));
  const checkpoint = verifyCheckpoint(signedCheckpoint({ size: 0n, root: emptyRoot() }), REGISTRY, { origin: ORIGIN, now: NOW });
  assert.equal(checkpoint.treeSize, 0n);
});

test("verifyCheckpoint with a named audience", () => {
  const signed = signedCheckpoint({ audience: ["exchange.example"] });
  verifyCheckpoint(signed, REGISTRY, { origin: ORIGIN, now: NOW, audience: "exchange.example" });
  assert.equal(caught(() => verifyCheckpoint(signed, REGISTRY, { origin: ORIGIN, now: NOW })).reason, ErrorReason.AUDIENCE_MISMATCH);
});

// ------------------------------------------------------------------ monitor

const GROWN = leaves(20);

test("monitor: first checkpoint, consistent growth, same tree again", () => {
  const monitor = new CheckpointMonitor();
  assert.equal(monitor.latest(ORIGIN), undefined);
  const first = checkpointOf(GROWN, 8);
  monitor.advance(first, undefined);
  assert.deepEqual(monitor.latest(ORIGIN), first);
  const second = checkpointOf(GROWN, 20);
  monitor.advance(second, proofOf(GROWN, 8, 20));
  assert.deepEqual(monitor.latest(ORIGIN), second);
  // The same tree again, even with a later timestamp, changes nothing.
  const again = create(CheckpointSchema, { ...checkpointOf(GROWN, 20), timestamp: timestampFromDate(NOW) });
  monitor.advance(again, undefined);
  assert.deepEqual(monitor.latest(ORIGIN), second);
  assert.deepEqual(monitor.evidence, []);
});

test("monitor: growth needs a proof of the held size", () => {
  const monitor = new CheckpointMonitor();
  monitor.advance(checkpointOf(GROWN, 8), undefined);
  const none = caught(() => monitor.advance(checkpointOf(GROWN, 20), undefined));
  assert.ok(none instanceof ProofError);
  assert.equal(none.reason, ErrorReason.PROOF_INVALID);
  assert.deepEqual(none.metadata, { expected: "consistency proof", actual: "none" });
  const other = caught(() => monitor.advance(checkpointOf(GROWN, 20), proofOf(GROWN, 9, 20)));
  assert.equal(other.reason, ErrorReason.PROOF_INVALID);
  assert.match(other.message, /first_tree_size/);
  assert.deepEqual(monitor.latest(ORIGIN), checkpointOf(GROWN, 8));
});

test("monitor: refuses a rollback", () => {
  const monitor = new CheckpointMonitor();
  monitor.advance(checkpointOf(GROWN, 20), undefined);
  const error = caught(() => monitor.advance(checkpointOf(GROWN, 19), proofOf(GROWN, 19, 20)));
  assert.equal(error.reason, ErrorReason.CHECKPOINT_INCONSISTENT);
  assert.equal(error.code, "FAILED_PRECONDITION");
  assert.deepEqual(error.metadata, { expected: ">= 20", actual: "19" });
  assert.deepEqual(monitor.latest(ORIGIN), checkpointOf(GROWN, 20));
  assert.deepEqual(monitor.evidence, []);
});

test("monitor: refuses a fork and keeps both checkpoints as evidence (copies)", () => {
  const monitor = new CheckpointMonitor();
  const held = checkpointOf(GROWN, 20);
  monitor.advance(held, undefined);
  const forkedRoot = merkleRoot(leaves(20, "forged"));
  const forked = create(CheckpointSchema, { ...held, rootHash: forkedRoot });
  const error = caught(() => monitor.advance(forked, undefined));
  assert.ok(error instanceof ProofError);
  assert.equal(error.reason, ErrorReason.CHECKPOINT_INCONSISTENT);
  assert.deepEqual(error.metadata, { expected: toHex(held.rootHash), actual: toHex(forkedRoot) });
  assert.deepEqual(monitor.latest(ORIGIN), held);
  assert.deepEqual(monitor.evidence, [{ held, received: forked }]);
  // The caller's objects cannot change what the monitor holds.
  forked.rootHash = new Uint8Array(32);
  held.treeSize = 1n;
  assert.deepEqual(monitor.evidence[0]?.received.rootHash, forkedRoot);
  assert.deepEqual(monitor.latest(ORIGIN), checkpointOf(GROWN, 20));
});

test("monitor: refuses a rewritten history", () => {
  const monitor = new CheckpointMonitor();
  monitor.advance(checkpointOf(GROWN, 20), undefined);
  const rewritten = leaves(30);
  rewritten[3] = leafHash(encoder.encode("rewritten"));
  const error = caught(() => monitor.advance(checkpointOf(rewritten, 30), proofOf(rewritten, 20, 30)));
  assert.equal(error.reason, ErrorReason.CHECKPOINT_INCONSISTENT);
  assert.deepEqual(monitor.latest(ORIGIN), checkpointOf(GROWN, 20));
  assert.deepEqual(monitor.evidence, []);
});

test("monitor: refuses malformed checkpoints", () => {
  const monitor = new CheckpointMonitor();
  const short = create(CheckpointSchema, { ...checkpointOf(GROWN, 5), rootHash: checkpointOf(GROWN, 5).rootHash.slice(0, 31) });
  assert.ok(caught(() => monitor.advance(short, undefined)) instanceof MalformedError);
  const unnamed = create(CheckpointSchema, { ...checkpointOf(GROWN, 5), origin: "" });
  const error = caught(() => monitor.advance(unnamed, undefined));
  assert.ok(error instanceof MalformedError);
  assert.deepEqual(error.fieldViolations, { origin: "required" });
  assert.equal(monitor.latest(ORIGIN), undefined);
});

test("monitor: keeps logs apart and grows from the empty tree without a proof", () => {
  const monitor = new CheckpointMonitor();
  const a = leaves(8, "a");
  const b = leaves(3, "b");
  monitor.advance(checkpointOf(a, 0, "a.example/log"), undefined);
  monitor.advance(checkpointOf(a, 6, "a.example/log"), undefined); // anything extends the empty tree
  monitor.advance(checkpointOf(b, 3, "b.example/log"), undefined);
  assert.deepEqual(monitor.latest("a.example/log"), checkpointOf(a, 6, "a.example/log"));
  assert.deepEqual(monitor.latest("b.example/log"), checkpointOf(b, 3, "b.example/log"));
  // A proof from the other log does not match this log's checkpoint.
  const error = caught(() => monitor.advance(checkpointOf(a, 8, "a.example/log"), proofOf(b, 3, 3)));
  assert.ok(error instanceof ProofError);
  assert.deepEqual(monitor.latest("a.example/log"), checkpointOf(a, 6, "a.example/log"));
  monitor.advance(checkpointOf(a, 8, "a.example/log"), proofOf(a, 6, 8));
  assert.deepEqual(monitor.latest("a.example/log"), checkpointOf(a, 8, "a.example/log"));
});
