// KeyRegistry semantics (PROTOCOL.md §4.1, §4.2): resolve's order of checks, validity windows,
// rotation and revocation, copies, and signature checks.

import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { MalformedError, StateError, VerificationError } from "../src/errors.js";
import { PartyRole } from "../src/gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { type PartyKey, PartyKeySchema } from "../src/gen/collateral_sync/v1/keys_pb.js";
import { KeyRegistry, keyId, roleName } from "../src/registry.js";
import { timestampFromDate } from "../src/time.js";
import { caught, TestSigner } from "./verification-fixtures.js";

const seed = (byte: number) => new Uint8Array(32).fill(byte);
const A = new TestSigner(seed(1));
const B = new TestSigner(seed(2));
const C = new TestSigner(seed(3));

const at = (text: string) => new Date(text);

function partyKey(
  signer: TestSigner,
  options: { party?: string; role?: PartyRole; from?: string; until?: string; revoked?: string } = {},
): PartyKey {
  return create(PartyKeySchema, {
    partyId: options.party ?? "custodian.example",
    role: options.role ?? PartyRole.CUSTODIAN,
    publicKey: signer.publicKey,
    keyId: signer.keyId,
    validFrom: timestampFromDate(at(options.from ?? "2026-01-01T00:00:00Z")),
    validUntil: options.until === undefined ? undefined : timestampFromDate(at(options.until)),
    revokedAt: options.revoked === undefined ? undefined : timestampFromDate(at(options.revoked)),
  });
}

test("resolve checks identity before time, each with its reason", () => {
  const registry = new KeyRegistry([
    partyKey(A, { until: "2027-01-01T00:00:00Z" }),
    partyKey(B, { party: "exchange.example", role: PartyRole.EXCHANGE, revoked: "2026-06-01T00:00:00Z" }),
  ]);
  const when = at("2026-03-01T00:00:00Z");
  assert.equal(registry.resolve(A.keyId, { at: when }).partyId, "custodian.example");
  assert.equal(caught(() => registry.resolve(C.keyId, { at: when })).reason, ErrorReason.KEY_UNKNOWN);
  const party = caught(() => registry.resolve(A.keyId, { at: when, partyId: "exchange.example" }));
  assert.equal(party.reason, ErrorReason.KEY_ROLE_MISMATCH);
  assert.deepEqual(party.metadata, { expected: "exchange.example", actual: "custodian.example" });
  const role = caught(() => registry.resolve(A.keyId, { at: when, roles: [PartyRole.EXCHANGE, PartyRole.CLIENT] }));
  assert.equal(role.reason, ErrorReason.KEY_ROLE_MISMATCH);
  assert.deepEqual(role.metadata, { expected: "PARTY_ROLE_CLIENT|PARTY_ROLE_EXCHANGE", actual: "PARTY_ROLE_CUSTODIAN" });
  // Revoked at or before the instant; a role mismatch is reported before the revocation.
  const revoked = caught(() => registry.resolve(B.keyId, { at: at("2026-06-01T00:00:00Z") }));
  assert.equal(revoked.reason, ErrorReason.KEY_REVOKED);
  assert.equal(revoked.code, "UNAUTHENTICATED");
  assert.deepEqual(revoked.metadata, { expected: "before 2026-06-01T00:00:00Z", actual: "2026-06-01T00:00:00Z" });
  registry.resolve(B.keyId, { at: at("2026-05-31T23:59:59.999Z") });
  // [valid_from, valid_until)
  const before = caught(() => registry.resolve(A.keyId, { at: at("2025-12-31T23:59:59Z") }));
  assert.equal(before.reason, ErrorReason.KEY_NOT_VALID);
  assert.deepEqual(before.metadata, {
    expected: "[2026-01-01T00:00:00Z, 2027-01-01T00:00:00Z)",
    actual: "2025-12-31T23:59:59Z",
  });
  registry.resolve(A.keyId, { at: at("2026-01-01T00:00:00Z") });
  assert.equal(caught(() => registry.resolve(A.keyId, { at: at("2027-01-01T00:00:00Z") })).reason, ErrorReason.KEY_NOT_VALID);
});

test("rotation ends the old key at T and adds the new one; it never extends a key's life", () => {
  const registry = new KeyRegistry([partyKey(A)]);
  registry.rotate(A.keyId, partyKey(B, { from: "2026-06-01T00:00:00Z" }), at("2026-06-01T00:00:00Z"));
  registry.resolve(A.keyId, { at: at("2026-05-31T23:59:59Z") });
  assert.equal(caught(() => registry.resolve(A.keyId, { at: at("2026-06-01T00:00:00Z") })).reason, ErrorReason.KEY_NOT_VALID);
  registry.resolve(B.keyId, { at: at("2026-06-01T00:00:00Z") });
  // A later rotation of B with an earlier end already in force keeps the earlier end.
  const withEnd = new KeyRegistry([partyKey(A, { until: "2026-03-01T00:00:00Z" })]);
  withEnd.rotate(A.keyId, partyKey(B), at("2026-06-01T00:00:00Z"));
  assert.equal(withEnd.get(A.keyId)?.validUntil?.seconds, BigInt(Date.parse("2026-03-01T00:00:00Z") / 1000));

  const refused = new KeyRegistry([partyKey(A)]);
  const otherParty = caught(() => refused.rotate(A.keyId, partyKey(B, { party: "other" }), at("2026-06-01T00:00:00Z")));
  assert.ok(otherParty instanceof StateError);
  assert.deepEqual(otherParty.metadata, { expected: "custodian.example/PARTY_ROLE_CUSTODIAN", actual: "other/PARTY_ROLE_CUSTODIAN" });
  assert.ok(caught(() => refused.rotate(A.keyId, partyKey(B), at("2026-01-01T00:00:00Z"))) instanceof StateError);
  assert.ok(caught(() => refused.rotate(A.keyId, partyKey(A), at("2026-06-01T00:00:00Z"))) instanceof StateError);
  assert.equal(caught(() => refused.rotate(C.keyId, partyKey(B), at("2026-06-01T00:00:00Z"))).reason, ErrorReason.NOT_FOUND);
  assert.deepEqual(refused.keyIds(), [A.keyId]);
});

test("revocation keeps the earliest time and is never undone", () => {
  const registry = new KeyRegistry([partyKey(A)]);
  registry.revoke(A.keyId, at("2026-06-01T00:00:00Z"));
  registry.revoke(A.keyId, at("2026-07-01T00:00:00Z"));
  assert.equal(caught(() => registry.resolve(A.keyId, { at: at("2026-06-15T00:00:00Z") })).reason, ErrorReason.KEY_REVOKED);
  registry.revoke(A.keyId, at("2026-05-01T00:00:00Z"));
  assert.equal(caught(() => registry.resolve(A.keyId, { at: at("2026-05-15T00:00:00Z") })).reason, ErrorReason.KEY_REVOKED);
  assert.equal(caught(() => registry.revoke(C.keyId, at("2026-05-01T00:00:00Z"))).reason, ErrorReason.NOT_FOUND);
});

test("the registry hands out copies", () => {
  const registry = new KeyRegistry([partyKey(A), partyKey(B, { party: "exchange.example", role: PartyRole.EXCHANGE })]);
  const copy = registry.get(A.keyId);
  assert.ok(copy !== undefined);
  copy.partyId = "mallory";
  assert.equal(registry.get(A.keyId)?.partyId, "custodian.example");
  assert.deepEqual(registry.keysFor("exchange.example").map((k) => k.keyId), [B.keyId]);
  assert.deepEqual(registry.keysFor("nobody"), []);
  assert.equal(registry.get(C.keyId), undefined);
  assert.equal(roleName(PartyRole.REGULATOR), "PARTY_ROLE_REGULATOR");
  assert.equal(roleName(99), "99");
});

test("add refuses what §4.1 refuses, and a key id twice", () => {
  const registry = new KeyRegistry([partyKey(A)]);
  assert.ok(caught(() => registry.add(partyKey(A))) instanceof StateError);
  const mismatch = create(PartyKeySchema, { ...partyKey(B), keyId: A.keyId });
  const error = caught(() => registry.add(mismatch));
  assert.ok(error instanceof MalformedError);
  assert.deepEqual(error.metadata, { expected: B.keyId, actual: A.keyId });
  assert.ok(caught(() => registry.add(create(PartyKeySchema, { ...partyKey(B), validFrom: undefined }))) instanceof MalformedError);
  assert.ok(caught(() => registry.add(partyKey(B, { role: PartyRole.UNSPECIFIED }))) instanceof MalformedError);
  assert.ok(caught(() => keyId(new Uint8Array(31))) instanceof MalformedError);
  assert.equal(registry.size, 1);
});

test("verifySignature: unknown keys, wrong lengths, and small-order keys that load but never verify", () => {
  const registry = new KeyRegistry([partyKey(A)]);
  const data = new TextEncoder().encode("data");
  assert.equal(registry.verifySignature(A.keyId, data, A.sign(data)), true);
  assert.equal(registry.verifySignature(A.keyId, data, B.sign(data)), false);
  assert.ok(caught(() => registry.verifySignature(C.keyId, data, A.sign(data))) instanceof VerificationError);
  assert.equal(caught(() => registry.verifySignature(A.keyId, data, new Uint8Array(63))).reason, ErrorReason.MALFORMED);
  // The identity point: loaded (as the Python SDK does), refused at every verification.
  const identity = new Uint8Array(32);
  identity[0] = 1;
  const weak = create(PartyKeySchema, { ...partyKey(A), publicKey: identity, keyId: keyId(identity) });
  registry.add(weak);
  const forged = new Uint8Array(64);
  forged[0] = 1;
  assert.equal(registry.verifySignature(keyId(identity), data, forged), false);
});
