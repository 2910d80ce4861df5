// vectors/statements.json (PROTOCOL.md §3.6, §3.7, §15.2): every envelope is verified with the
// file's registry, expected type, verifier, time, skew and replay state; valid ones give the
// stated issuer and signers, invalid ones fail with the stated reason and gRPC status.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";
import { create, fromBinary, type JsonValue, toBinary, toJson } from "@bufbuild/protobuf";
import { decodeMessage } from "../src/decode.js";
import { CollateralSyncError } from "../src/errors.js";
import { PartyRole } from "../src/gen/collateral_sync/v1/common_pb.js";
import { type Envelope, EnvelopeSchema, SignatureSchema } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import { KeyRegistry } from "../src/registry.js";
import { MemoryReplayGuard, pae, type VerifiedStatement, verifyStatement, verifyThreshold } from "../src/signing.js";
import { schemaOf, STATEMENT_TYPES, type StatementMessage } from "../src/statements.js";
import { fromHex, loadVectors, TestSigner, toHex } from "./verification-fixtures.js";

interface StatementVector {
  id: string;
  description: string;
  expected_payload_type: string;
  envelope: { payload_type: string; payload_hex: string; signatures: { key_id: string; sig_hex: string }[] };
  envelope_hex: string;
  pae_hex: string;
  payload_json: JsonValue | null;
  verifier_party_id: string;
  now: string;
  last_accepted_sequence: number;
  threshold: { k: number; roles: string[] } | null;
  expected:
    | { valid: true; issuer: string; signer_party_ids: string[] }
    | { valid: false; reason: string; grpc_status: string };
}

/** A vector whose payload is too large to write out: prefix_hex, then fill_count fill_hex bytes. */
interface LargePayloadVector extends Omit<StatementVector, "envelope" | "envelope_hex" | "pae_hex"> {
  envelope: { payload_type: string; signatures: { key_id: string; sig_hex: string }[] };
  payload_rule: { prefix_hex: string; fill_hex: string; fill_count: number };
  payload_length: number;
  payload_sha256_hex: string;
  envelope_sha256_hex: string;
  pae_sha256_hex: string;
}

interface StatementsFile {
  kind: string;
  max_skew_seconds: number;
  registry: JsonValue;
  signing_keys: { name: string; party_id: string; role: string; seed_hex: string; key_id: string; registered: boolean }[];
  vectors: StatementVector[];
  large_payloads: LargePayloadVector[];
}

const FILE = loadVectors<StatementsFile>("statements.json");

function registry(): KeyRegistry {
  return KeyRegistry.fromJson(JSON.stringify(FILE.registry));
}

function envelopeOf(vector: StatementVector): Envelope {
  return create(EnvelopeSchema, {
    payloadType: vector.envelope.payload_type,
    payload: fromHex(vector.envelope.payload_hex),
    signatures: vector.envelope.signatures.map((s) =>
      create(SignatureSchema, { keyId: s.key_id, sig: fromHex(s.sig_hex) }),
    ),
  });
}

function role(name: string): PartyRole {
  const value = (PartyRole as unknown as Record<string, number | undefined>)[name.replace(/^PARTY_ROLE_/, "")];
  if (value === undefined) throw new Error(`unknown role ${name}`);
  return value;
}

/** The verifier's replay state: (issuer, expected type) -> last_accepted_sequence. */
function replayGuard(vector: StatementVector, envelope: Envelope): MemoryReplayGuard {
  const guard = new MemoryReplayGuard();
  if (vector.last_accepted_sequence > 0) {
    const message = fromBinary(schemaOf(vector.expected_payload_type), envelope.payload) as StatementMessage;
    guard.record({
      issuer: message.header?.issuer ?? "",
      payloadType: vector.expected_payload_type,
      sequence: BigInt(vector.last_accepted_sequence),
    });
  }
  return guard;
}

function verify(vector: StatementVector): VerifiedStatement {
  const envelope = envelopeOf(vector);
  const opts = {
    expectedPayloadType: vector.expected_payload_type,
    audience: vector.verifier_party_id,
    now: new Date(vector.now),
    maxSkewSeconds: FILE.max_skew_seconds,
    replayGuard: replayGuard(vector, envelope),
  };
  if (vector.threshold === null) return verifyStatement(envelope, registry(), opts);
  return verifyThreshold(envelope, registry(), {
    ...opts,
    threshold: vector.threshold.k,
    roles: vector.threshold.roles.map(role),
  });
}

test("statements.json declares its kind and holds vectors", () => {
  assert.equal(FILE.kind, "statements");
  assert.equal(FILE.max_skew_seconds, 30);
  assert.ok(FILE.vectors.some((v) => v.expected.valid) && FILE.vectors.some((v) => !v.expected.valid));
  assert.equal(new Set(FILE.vectors.map((v) => v.id)).size, FILE.vectors.length);
});

test("the registry and the signing keys agree", () => {
  const loaded = registry();
  for (const key of FILE.signing_keys) {
    const signer = TestSigner.fromHex(key.seed_hex);
    assert.equal(signer.keyId, key.key_id, key.name);
    assert.equal(loaded.has(key.key_id), key.registered, key.name);
    if (key.registered) {
      const entry = loaded.get(key.key_id);
      assert.equal(entry?.partyId, key.party_id);
      assert.equal(entry?.role, role(key.role));
    }
  }
});

for (const vector of FILE.vectors) {
  test(`${vector.id}: bytes are consistent (envelope_hex, pae_hex, payload_json)`, () => {
    const envelope = envelopeOf(vector);
    const decoded = fromBinary(EnvelopeSchema, fromHex(vector.envelope_hex));
    assert.equal(decoded.payloadType, envelope.payloadType);
    assert.deepEqual(decoded.payload, envelope.payload);
    assert.deepEqual(
      decoded.signatures.map((s) => [s.keyId, toHex(s.sig)]),
      envelope.signatures.map((s) => [s.keyId, toHex(s.sig)]),
    );
    assert.equal(toHex(pae(envelope.payloadType, envelope.payload)), vector.pae_hex);
    if (vector.payload_json !== null) {
      const schema = schemaOf(vector.expected_payload_type);
      assert.deepEqual(toJson(schema, decodeMessage(schema, envelope.payload)), vector.payload_json);
    }
  });

  const expected = vector.expected;
  if (expected.valid) {
    test(`${vector.id}: verifies (issuer ${expected.issuer})`, () => checkValid(vector));
  } else {
    test(`${vector.id}: fails with ${expected.reason} (${expected.grpc_status})`, () => checkInvalid(vector));
  }
}

function checkValid(vector: StatementVector): void {
  const expected = vector.expected;
  assert.ok(expected.valid);
  const verified = verify(vector);
  assert.equal(verified.issuer, expected.issuer);
  assert.equal(verified.header.issuer, expected.issuer);
  assert.deepEqual([...verified.signerPartyIds], expected.signer_party_ids);
  assert.equal(verified.payloadType, vector.expected_payload_type);
  assert.equal(toHex(verified.payload), vector.envelope.payload_hex);
  assert.equal(verified.message.$typeName, schemaOf(vector.expected_payload_type).typeName);
}

function checkInvalid(vector: StatementVector): void {
  const expected = vector.expected;
  assert.ok(!expected.valid);
  let error: unknown;
  try {
    verify(vector);
  } catch (err) {
    error = err;
  }
  assert.ok(error instanceof CollateralSyncError, `expected a CollateralSyncError, got ${String(error)}`);
  assert.equal(error.reasonName, expected.reason, error.message);
  assert.equal(error.code, expected.grpc_status);
  assert.notEqual(error.metadata["expected"], undefined);
  assert.notEqual(error.metadata["actual"], undefined);
}

// ------------------------------------------------------------------ large payloads (§15.2)

function largePayload(vector: LargePayloadVector): Uint8Array {
  const prefix = fromHex(vector.payload_rule.prefix_hex);
  const fill = fromHex(vector.payload_rule.fill_hex);
  assert.equal(fill.length, 1);
  const payload = new Uint8Array(prefix.length + vector.payload_rule.fill_count).fill(fill[0] ?? 0);
  payload.set(prefix, 0);
  return payload;
}

/** A large_payloads vector in the shape of vectors[]: its payload, envelope and PAE written out. */
function expanded(vector: LargePayloadVector): StatementVector {
  const payload = largePayload(vector);
  const envelope = { ...vector.envelope, payload_hex: toHex(payload) };
  const statement = { ...vector, envelope, envelope_hex: "", pae_hex: "" };
  statement.envelope_hex = toHex(toBinary(EnvelopeSchema, envelopeOf(statement)));
  statement.pae_hex = toHex(pae(envelope.payload_type, payload));
  return statement;
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

for (const vector of FILE.large_payloads) {
  test(`${vector.id}: the payload rule gives the stated bytes`, () => {
    const payload = largePayload(vector);
    assert.equal(payload.length, vector.payload_length);
    assert.equal(sha256Hex(payload), vector.payload_sha256_hex);
    const envelope = envelopeOf(expanded(vector));
    assert.equal(sha256Hex(toBinary(EnvelopeSchema, envelope)), vector.envelope_sha256_hex);
    assert.equal(sha256Hex(pae(envelope.payloadType, payload)), vector.pae_sha256_hex);
    const schema = schemaOf(vector.expected_payload_type);
    assert.deepEqual(toJson(schema, decodeMessage(schema, payload)), vector.payload_json);
  });

  const expected = vector.expected;
  if (expected.valid) {
    test(`${vector.id}: verifies (issuer ${expected.issuer})`, () => checkValid(expanded(vector)));
  } else {
    test(`${vector.id}: fails with ${expected.reason} (${expected.grpc_status})`, () => checkInvalid(expanded(vector)));
  }
}

test("the 4 MiB limit is pinned from both sides", () => {
  const byLength = new Map(FILE.large_payloads.map((v) => [v.payload_length, v.expected]));
  assert.equal(byLength.get(4 * 1024 * 1024)?.valid, true);
  const over = byLength.get(4 * 1024 * 1024 + 1);
  assert.ok(over !== undefined && !over.valid && over.reason === "TOO_LARGE");
});

// ------------------------------------------------------------------ coverage

test("every statement type of §3.5 has a valid and an invalid vector", () => {
  const every = [...FILE.vectors, ...FILE.large_payloads];
  assert.equal(STATEMENT_TYPES.length, 24);
  for (const row of STATEMENT_TYPES) {
    const ofType = every.filter((v) => v.expected_payload_type === row.payloadType && v.envelope.payload_type === row.payloadType);
    assert.ok(ofType.some((v) => v.expected.valid), `${row.name}: no valid vector`);
    assert.ok(ofType.some((v) => !v.expected.valid), `${row.name}: no invalid vector`);
  }
});

test("16 signatures verify, 17 are MALFORMED (stage a3)", () => {
  const bySignatures = new Map(FILE.vectors.map((v) => [v.envelope.signatures.length, v.expected]));
  assert.equal(bySignatures.get(16)?.valid, true);
  const over = bySignatures.get(17);
  assert.ok(over !== undefined && !over.valid && over.reason === "MALFORMED");
});

test("the tampered vector is the valid one with one byte changed", () => {
  const valid = FILE.vectors.find((v) => v.id === "holdings-statement/valid");
  const tampered = FILE.vectors.find((v) => v.id === "holdings-statement/tampered-payload");
  assert.ok(valid !== undefined && tampered !== undefined);
  const good = fromHex(valid.envelope.payload_hex);
  const bad = fromHex(tampered.envelope.payload_hex);
  assert.equal(good.length, bad.length);
  assert.equal(good.filter((byte, i) => byte !== bad[i]).length, 1);
  const restored: StatementVector = { ...tampered, envelope: { ...tampered.envelope, payload_hex: valid.envelope.payload_hex } };
  assert.equal(verify(restored).issuer, "custodian.example");
});
