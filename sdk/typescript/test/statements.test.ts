// vectors/statements.json (PROTOCOL.md §3.6, §3.7, §15.2): every envelope is verified with the
// file's registry, expected type, verifier, time, skew and replay state; valid ones give the
// stated issuer and signers, invalid ones fail with the stated reason and gRPC status.

import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, type JsonValue, toJson } from "@bufbuild/protobuf";
import { decodeMessage } from "../src/decode.js";
import { CollateralSyncError } from "../src/errors.js";
import { PartyRole } from "../src/gen/collateral_sync/v1/common_pb.js";
import { type Envelope, EnvelopeSchema, SignatureSchema } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import { KeyRegistry } from "../src/registry.js";
import { MemoryReplayGuard, pae, type VerifiedStatement, verifyStatement, verifyThreshold } from "../src/signing.js";
import { schemaOf, type StatementMessage } from "../src/statements.js";
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

interface StatementsFile {
  kind: string;
  max_skew_seconds: number;
  registry: JsonValue;
  signing_keys: { name: string; party_id: string; role: string; seed_hex: string; key_id: string; registered: boolean }[];
  vectors: StatementVector[];
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
    test(`${vector.id}: verifies (issuer ${expected.issuer})`, () => {
      const verified = verify(vector);
      assert.equal(verified.issuer, expected.issuer);
      assert.equal(verified.header.issuer, expected.issuer);
      assert.deepEqual([...verified.signerPartyIds], expected.signer_party_ids);
      assert.equal(verified.payloadType, vector.expected_payload_type);
      assert.equal(toHex(verified.payload), vector.envelope.payload_hex);
      assert.equal(verified.message.$typeName, schemaOf(vector.expected_payload_type).typeName);
    });
  } else {
    test(`${vector.id}: fails with ${expected.reason} (${expected.grpc_status})`, () => {
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
    });
  }
}

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
