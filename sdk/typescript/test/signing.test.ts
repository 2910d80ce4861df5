// verifyStatement / verifyThreshold beyond the vectors (PROTOCOL.md §3.3, §3.6, §3.7, §2.4):
// size and count limits, the S < L and small-order checks, integers above 2^63 - 1,
// wire-type misfits, skew, replay, and the choice of error in stage d.

import assert from "node:assert/strict";
import { verify as nodeVerify, createPublicKey } from "node:crypto";
import { test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { decodeMessage } from "../src/decode.js";
import { Ed25519VerifyKey, GROUP_ORDER, hasSmallOrder, SMALL_ORDER_Y } from "../src/ed25519.js";
import { CollateralSyncError, MalformedError, VerificationError } from "../src/errors.js";
import { CheckpointSchema, HoldingsStatementSchema } from "../src/gen/collateral_sync/v1/attestation_pb.js";
import { PartyRole } from "../src/gen/collateral_sync/v1/common_pb.js";
import { EmergencyReleaseSchema } from "../src/gen/collateral_sync/v1/emergency_pb.js";
import { type Envelope, EnvelopeSchema, SignatureSchema, StatementHeaderSchema } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { LiquidationPathSchema } from "../src/gen/collateral_sync/v1/liquidation_pb.js";
import { SyncBatchSchema, SyncEntrySchema } from "../src/gen/collateral_sync/v1/position_sync_pb.js";
import { KeyRegistry } from "../src/registry.js";
import { MAX_PAYLOAD_BYTES, MAX_SIGNATURES, MemoryReplayGuard, pae, verifyStatement, verifyThreshold } from "../src/signing.js";
import { PAYLOAD_TYPES } from "../src/statements.js";
import { timestampFromDate } from "../src/time.js";
import { caught, fromHex, loadVectors, signedEnvelope, TestSigner } from "./verification-fixtures.js";

interface StatementsFile {
  registry: unknown;
  signing_keys: { name: string; party_id: string; seed_hex: string }[];
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
const REGULATOR = signer("regulator");
const CLIENT = signer("client");

const NOW = new Date("2026-06-01T12:00:00Z");
const HOLDINGS = PAYLOAD_TYPES["holdings-statement"] as string;

function header(options: { issuer?: string; audience?: string[]; sequence?: bigint; issuedAt?: Date } = {}) {
  const issued = options.issuedAt ?? new Date(NOW.getTime() - 60_000);
  return create(StatementHeaderSchema, {
    issuer: options.issuer ?? "custodian.example",
    audience: options.audience ?? ["exchange.example"],
    sequence: options.sequence ?? 7n,
    issuedAt: timestampFromDate(issued),
    expiresAt: timestampFromDate(new Date(issued.getTime() + 3_600_000)),
    statementId: "test",
  });
}

function holdings(options: { epoch?: bigint; sequence?: bigint; issuedAt?: Date } = {}, signers = [CUSTODIAN]): Envelope {
  const message = create(HoldingsStatementSchema, {
    header: header(options),
    accountId: "acct-0001",
    exchangeId: "exchange.example",
    epoch: options.epoch ?? 3n,
  });
  return signedEnvelope(HOLDINGS, toBinary(HoldingsStatementSchema, message), signers);
}

const OPTS = { expectedPayloadType: HOLDINGS, audience: "exchange.example", now: NOW };

test("a holdings statement built here verifies", () => {
  const verified = verifyStatement(holdings(), REGISTRY, OPTS);
  assert.equal(verified.issuer, "custodian.example");
  assert.deepEqual(verified.signerKeyIds, [CUSTODIAN.keyId]);
  assert.equal(verified.sequence, 7n);
});

test("a1-a5: type, size, signature count and shapes are checked before anything else", () => {
  const big = signedEnvelope(HOLDINGS, new Uint8Array(MAX_PAYLOAD_BYTES + 1), [CUSTODIAN]);
  const tooLarge = caught(() => verifyStatement(big, REGISTRY, OPTS));
  assert.equal(tooLarge.reason, ErrorReason.TOO_LARGE);
  assert.equal(tooLarge.code, "RESOURCE_EXHAUSTED");
  assert.deepEqual(tooLarge.metadata, { expected: `<= ${MAX_PAYLOAD_BYTES}`, actual: String(MAX_PAYLOAD_BYTES + 1) });
  // The limit is the payload's: a mismatched type is reported first.
  const wrongType = caught(() => verifyStatement(big, REGISTRY, { ...OPTS, expectedPayloadType: PAYLOAD_TYPES["checkpoint"] }));
  assert.equal(wrongType.reason, ErrorReason.PAYLOAD_TYPE_MISMATCH);
  const small = caught(() => verifyStatement(holdings(), REGISTRY, { ...OPTS, maxPayloadBytes: 10 }));
  assert.equal(small.reason, ErrorReason.TOO_LARGE);

  const one = holdings();
  const many = (n: number) => create(EnvelopeSchema, { ...one, signatures: Array.from({ length: n }, () => one.signatures[0]!) });
  verifyStatement(many(MAX_SIGNATURES), REGISTRY, OPTS); // the same key 16 times counts once
  const tooMany = caught(() => verifyStatement(many(MAX_SIGNATURES + 1), REGISTRY, OPTS));
  assert.ok(tooMany instanceof MalformedError);
  assert.deepEqual(tooMany.metadata, { expected: "1..16", actual: "17" });

  const shortKeyId = create(EnvelopeSchema, { ...one, signatures: [create(SignatureSchema, { keyId: "ab", sig: one.signatures[0]!.sig })] });
  const badKeyId = caught(() => verifyStatement(shortKeyId, REGISTRY, OPTS));
  assert.equal(badKeyId.reason, ErrorReason.MALFORMED);
  assert.deepEqual(badKeyId.fieldViolations, { "signatures[0].key_id": "must be 64 lowercase hex" });
});

test("without expectedPayloadType the envelope's own type is used, and must be one of §3.5", () => {
  assert.equal(verifyStatement(holdings(), REGISTRY, { audience: "exchange.example", now: NOW }).payloadType, HOLDINGS);
  const unknown = create(EnvelopeSchema, { ...holdings(), payloadType: "application/octet-stream" });
  const error = caught(() => verifyStatement(unknown, REGISTRY, { audience: "exchange.example", now: NOW }));
  assert.equal(error.reason, ErrorReason.PAYLOAD_TYPE_MISMATCH);
});

test("§3.3: a signature whose S is not below L is refused, though S - L would verify", () => {
  const envelope = holdings();
  const sig = envelope.signatures[0]!.sig;
  let s = 0n;
  for (let i = 63; i >= 32; i--) s = (s << 8n) | BigInt(sig[i]!);
  const bumped = s + GROUP_ORDER;
  assert.ok(bumped < 2n ** 256n);
  const altered = Uint8Array.from(sig);
  for (let i = 0, rest = bumped; i < 32; i++, rest >>= 8n) altered[32 + i] = Number(rest & 0xffn);
  const key = new Ed25519VerifyKey(CUSTODIAN.publicKey);
  const signed = pae(envelope.payloadType, envelope.payload);
  assert.equal(key.verify(signed, sig), true);
  assert.equal(key.verify(signed, altered), false);
});

test("§3.3: small-order keys never verify (node:crypto alone accepts a forgery with one)", () => {
  // libsodium's blocklist (the order-8 points) and the values derived from the curve agree.
  const p = 2n ** 255n - 19n;
  const yOf = (hexText: string) => BigInt("0x" + Buffer.from(fromHex(hexText)).reverse().toString("hex"));
  const order8 = [
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
  ].map(yOf);
  assert.deepEqual([...SMALL_ORDER_Y].sort(), [0n, 1n, p - 1n, ...order8].sort());

  const identity = new Uint8Array(32);
  identity[0] = 1;
  const forged = new Uint8Array(64);
  forged[0] = 1; // R = identity, S = 0: [S]B = R + [k]A for every message when A = identity
  const spki = Buffer.concat([Buffer.from("302a300506032b6570032100", "hex"), identity]);
  const raw = createPublicKey({ key: spki, format: "der", type: "spki" });
  const message = new TextEncoder().encode("anything");
  assert.equal(nodeVerify(null, message, raw, forged), true);
  assert.equal(hasSmallOrder(identity), true);
  assert.equal(new Ed25519VerifyKey(identity).verify(message, forged), false);
  assert.equal(hasSmallOrder(CUSTODIAN.publicKey), false);
});

test("c3: integers above 2^63 - 1 are OUT_OF_RANGE, naming the field", () => {
  const epoch = caught(() => verifyStatement(holdings({ epoch: 2n ** 63n }), REGISTRY, OPTS));
  assert.equal(epoch.reason, ErrorReason.OUT_OF_RANGE);
  assert.equal(epoch.code, "OUT_OF_RANGE");
  assert.deepEqual(epoch.metadata, { field: "epoch", expected: "<= 9223372036854775807", actual: "9223372036854775808" });
  verifyStatement(holdings({ epoch: 2n ** 63n - 1n }), REGISTRY, OPTS);
  const sequence = caught(() => verifyStatement(holdings({ sequence: 2n ** 64n - 1n }), REGISTRY, OPTS));
  assert.equal(sequence.metadata["field"], "header.sequence");

  const batch = create(SyncBatchSchema, {
    header: header(),
    entries: [create(SyncEntrySchema, { sequence: 1n }), create(SyncEntrySchema, { sequence: 2n ** 63n })],
  });
  const type = PAYLOAD_TYPES["sync-batch"] as string;
  const envelope = signedEnvelope(type, toBinary(SyncBatchSchema, batch), [CUSTODIAN]);
  const entries = caught(() => verifyStatement(envelope, REGISTRY, { ...OPTS, expectedPayloadType: type }));
  assert.equal(entries.metadata["field"], "entries[1].sequence");
  assert.deepEqual(entries.fieldViolations, { "entries[1].sequence": "must be <= 9223372036854775807" });
});

test("c1: a record whose wire type does not fit its field is an unknown field (as upb)", () => {
  const base = toBinary(CheckpointSchema, create(CheckpointSchema, { origin: "log", treeSize: 5n }));
  // Field 3 (tree_size, a varint) again, as a length-delimited record; then field 2 as a varint.
  const misfit = Uint8Array.from([...base, 0x1a, 0x02, 0x08, 0x01, 0x10, 0x05]);
  const decoded = decodeMessage(CheckpointSchema, misfit);
  assert.equal(decoded.treeSize, 5n);
  assert.equal(decoded.origin, "log");
  // The same inside a nested message (the header's sequence as length-delimited).
  const nested = toBinary(CheckpointSchema, create(CheckpointSchema, { header: header(), origin: "log" }));
  const headerBytes = toBinary(StatementHeaderSchema, header());
  const withMisfit = Uint8Array.from([...headerBytes, 0x1a, 0x01, 0x00]);
  const rebuilt = Uint8Array.from([0x0a, withMisfit.length, ...withMisfit, ...nested.subarray(2 + headerBytes.length)]);
  assert.equal(decodeMessage(CheckpointSchema, rebuilt).header?.sequence, 7n);
  assert.equal(decodeMessage(CheckpointSchema, nested).origin, "log");
  assert.throws(() => decodeMessage(CheckpointSchema, Uint8Array.from([0x0a, 0x05, 0x01])));
});

test("e: the verifier never matches '*', and '*' is only for public types", () => {
  const starVerifier = caught(() => verifyStatement(holdings(), REGISTRY, { ...OPTS, audience: "*" }));
  assert.equal(starVerifier.reason, ErrorReason.AUDIENCE_MISMATCH);
  assert.deepEqual(starVerifier.metadata, { expected: "*", actual: "exchange.example" });
});

test("f: 30 seconds of skew by default, both ways; another skew when asked", () => {
  const at = (offsetMs: number) => holdings({ issuedAt: new Date(NOW.getTime() + offsetMs) });
  verifyStatement(at(30_000), REGISTRY, OPTS);
  const early = caught(() => verifyStatement(at(30_001), REGISTRY, OPTS));
  assert.equal(early.reason, ErrorReason.STATEMENT_NOT_YET_VALID);
  assert.deepEqual(early.metadata, { expected: "<= 2026-06-01T12:00:30Z", actual: "2026-06-01T12:00:30.001Z" });
  verifyStatement(at(30_001), REGISTRY, { ...OPTS, maxSkewSeconds: 31 });
  // expires_at is issued_at + 1 h: expired once now passes it plus skew.
  const late = new Date(NOW.getTime() + 3_600_000 - 60_000 + 30_001);
  assert.equal(caught(() => verifyStatement(holdings(), REGISTRY, { ...OPTS, now: late })).reason, ErrorReason.STATEMENT_EXPIRED);
  assert.throws(() => verifyStatement(holdings(), REGISTRY, { ...OPTS, maxSkewSeconds: -1 }), RangeError);
});

test("g: a replay guard refuses what it recorded, and records only forward", () => {
  const guard = new MemoryReplayGuard();
  const verified = verifyStatement(holdings(), REGISTRY, { ...OPTS, replayGuard: guard });
  guard.record(verified);
  assert.equal(guard.lastSequence("custodian.example", HOLDINGS), 7n);
  const again = caught(() => verifyStatement(holdings(), REGISTRY, { ...OPTS, replayGuard: guard }));
  assert.equal(again.reason, ErrorReason.REPLAYED);
  assert.equal(again.code, "ALREADY_EXISTS");
  assert.deepEqual(again.metadata, { expected: "> 7", actual: "7" });
  verifyStatement(holdings({ sequence: 9n }), REGISTRY, { ...OPTS, replayGuard: guard });
  assert.equal(caught(() => guard.record(verified)).reason, ErrorReason.REPLAYED);
});

test("d: with no usable signature, the issuer's own key's error wins (as the Python SDK)", () => {
  // A client key revoked before the statement; the custodian's countersignature comes first.
  const registry = KeyRegistry.fromJson(
    JSON.stringify({
      keys: [
        { partyId: "custodian.example", role: "PARTY_ROLE_CUSTODIAN", publicKey: Buffer.from(CUSTODIAN.publicKey).toString("base64"), keyId: CUSTODIAN.keyId, validFrom: "2026-01-01T00:00:00Z" },
        { partyId: "client-0001.example", role: "PARTY_ROLE_CLIENT", publicKey: Buffer.from(CLIENT.publicKey).toString("base64"), keyId: CLIENT.keyId, validFrom: "2026-01-01T00:00:00Z", revokedAt: "2026-05-01T00:00:00Z" },
      ],
    }),
  );
  const type = PAYLOAD_TYPES["liquidation-path"] as string;
  const path = create(LiquidationPathSchema, { header: header({ issuer: "client-0001.example", audience: ["custodian.example"] }) });
  const envelope = signedEnvelope(type, toBinary(LiquidationPathSchema, path), [CUSTODIAN, CLIENT]);
  const error = caught(() => verifyStatement(envelope, registry, { expectedPayloadType: type, audience: "custodian.example", now: NOW }));
  assert.ok(error instanceof VerificationError);
  assert.equal(error.reason, ErrorReason.KEY_REVOKED);
});

test("§3.7: threshold statements count distinct parties with allowed, valid keys", () => {
  const type = PAYLOAD_TYPES["emergency-release"] as string;
  const release = create(EmergencyReleaseSchema, { header: header({ issuer: "regulator.example", audience: ["custodian.example"] }) });
  const payload = toBinary(EmergencyReleaseSchema, release);
  const roles = [PartyRole.REGULATOR, PartyRole.CUSTODIAN, PartyRole.EXCHANGE];
  const opts = { expectedPayloadType: type, audience: "custodian.example", now: NOW, threshold: 2, roles };
  const three = verifyThreshold(signedEnvelope(type, payload, [REGULATOR, EXCHANGE, CUSTODIAN]), REGISTRY, opts);
  assert.deepEqual(three.signerPartyIds, ["regulator.example", "exchange.example", "custodian.example"]);
  const notMet = caught(() => verifyThreshold(signedEnvelope(type, payload, [REGULATOR]), REGISTRY, opts));
  assert.equal(notMet.reason, ErrorReason.THRESHOLD_NOT_MET);
  assert.deepEqual(notMet.metadata, { expected: "2", actual: "1" });
  // Counted roles narrower than the issuing roles: the issuer is not among the counted.
  const narrow = caught(() =>
    verifyThreshold(signedEnvelope(type, payload, [REGULATOR, EXCHANGE, CUSTODIAN]), REGISTRY, {
      ...opts,
      roles: [PartyRole.CUSTODIAN, PartyRole.EXCHANGE],
    }),
  );
  assert.equal(narrow.reason, ErrorReason.KEY_ROLE_MISMATCH);
  assert.throws(() => verifyThreshold(signedEnvelope(type, payload, [REGULATOR]), REGISTRY, { ...opts, threshold: 0 }), RangeError);
});

test("errors from verification are CollateralSyncErrors that say what was expected", () => {
  const tampered = holdings();
  tampered.payload = Uint8Array.from(tampered.payload);
  const last = tampered.payload.length - 1;
  tampered.payload[last] = (tampered.payload[last] ?? 0) ^ 1;
  const error = caught(() => verifyStatement(tampered, REGISTRY, OPTS));
  assert.ok(error instanceof CollateralSyncError && error instanceof VerificationError);
  assert.equal(error.reason, ErrorReason.SIGNATURE_INVALID);
  assert.deepEqual(error.metadata, { expected: "a valid signature", actual: "1 invalid" });
});
