// Verifying signed statements (PROTOCOL.md §3): PAE, the stage order of §3.6, and the
// threshold rule of §3.7.
//
// A verifier checks signatures over the payload bytes *as received*, before parsing them, and
// never re-serialises: protobuf serialisation is not canonical across languages.
// verifyStatement runs the stages in a fixed order and stops at the first failure: structure
// (a), signatures (b), parse and header shape (c), issuer key (d), audience (e), freshness (f),
// replay (g). verifyThreshold replaces stage d with a count of distinct parties. Neither records
// anything: once the caller has acted on a statement it calls replayGuard.record(verified), so
// input refused later changes no state. Mirrors sdk/collateral_sync/signing.py.

import type { Message } from "@bufbuild/protobuf";
import type { PartyRole } from "./gen/collateral_sync/v1/common_pb.js";
import type { Envelope, StatementHeader } from "./gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import { decodeMessage } from "./decode.js";
import { SIGNATURE_BYTES } from "./ed25519.js";
import { CollateralSyncError, MalformedError, VerificationError } from "./errors.js";
import { checkIntegers } from "./integers.js";
import type { KeyRegistry } from "./registry.js";
import { type StatementMessage, type StatementType, statementTypeOf } from "./statements.js";
import { type Instant, formatNs, formatTimestamp, instantNs, timestampIsValid, timestampNs } from "./time.js";

/** Largest payload a verifier accepts by default (4 MiB, stage a2). */
export const MAX_PAYLOAD_BYTES = 4 * 1024 * 1024;
/** Most signatures one envelope may carry (stage a3); bounds the work a sender can demand. */
export const MAX_SIGNATURES = 16;
/** Default allowed clock skew, both directions (stage f). */
export const DEFAULT_MAX_SKEW_SECONDS = 30;

const KEY_ID = /^[0-9a-f]{64}$/;
const ANYONE = "*";
const encoder = new TextEncoder();

/**
 * DSSE v1 pre-authentication encoding of `payload` under `payloadType` (§3.2):
 * "DSSEv1" SP LEN(type) SP type SP LEN(payload) SP payload, lengths as ASCII decimal byte
 * counts of the UTF-8 type and of the payload.
 */
export function pae(payloadType: string, payload: Uint8Array): Uint8Array {
  const type = encoder.encode(payloadType);
  const head = encoder.encode(`DSSEv1 ${type.length} `);
  const middle = encoder.encode(` ${payload.length} `);
  const out = new Uint8Array(head.length + type.length + middle.length + payload.length);
  out.set(head, 0);
  out.set(type, head.length);
  out.set(middle, head.length + type.length);
  out.set(payload, head.length + type.length + middle.length);
  return out;
}

// --- results and replay -------------------------------------------------------------

/** A statement that passed verification, with what it was verified from. */
export interface VerifiedStatement<M extends Message = StatementMessage> {
  readonly payloadType: string;
  readonly header: StatementHeader;
  /** The payload decoded with the generated schema of its payload type. */
  readonly message: M;
  /** The envelope as received. */
  readonly envelope: Envelope;
  /** The payload bytes exactly as received and signed. */
  readonly payload: Uint8Array;
  /** Key ids of the signatures that counted (the issuer's first), and their parties. */
  readonly signerKeyIds: readonly string[];
  readonly signerPartyIds: readonly string[];
  readonly issuer: string;
  readonly sequence: bigint;
}

/** Remembers the last sequence accepted per (issuer, payload type) (stage g). */
export interface ReplayGuard {
  /** Throw VerificationError(REPLAYED) if `sequence` was already passed. */
  check(issuer: string, payloadType: string, sequence: bigint): void;
  /** Remember that `statement` was acted on. */
  record(statement: Pick<VerifiedStatement<Message>, "issuer" | "payloadType" | "sequence">): void;
}

function checkFreshSequence(last: bigint, issuer: string, sequence: bigint): void {
  if (sequence <= last) {
    throw new VerificationError(
      `sequence ${sequence} from ${JSON.stringify(issuer)} was already accepted ` +
        `(last accepted ${last}); expected > ${last}`,
      { reason: ErrorReason.REPLAYED, metadata: { expected: `> ${last}`, actual: String(sequence) } },
    );
  }
}

/** An in-memory ReplayGuard. */
export class MemoryReplayGuard implements ReplayGuard {
  private readonly last = new Map<string, bigint>();

  private static key(issuer: string, payloadType: string): string {
    return JSON.stringify([issuer, payloadType]);
  }

  /** Highest sequence recorded for (issuer, payload type); 0 if none. */
  lastSequence(issuer: string, payloadType: string): bigint {
    return this.last.get(MemoryReplayGuard.key(issuer, payloadType)) ?? 0n;
  }

  check(issuer: string, payloadType: string, sequence: bigint): void {
    checkFreshSequence(this.lastSequence(issuer, payloadType), issuer, sequence);
  }

  /** Remember `statement`; refuse it (REPLAYED) if a later one was recorded meanwhile. */
  record(statement: Pick<VerifiedStatement<Message>, "issuer" | "payloadType" | "sequence">): void {
    checkFreshSequence(this.lastSequence(statement.issuer, statement.payloadType), statement.issuer, statement.sequence);
    this.last.set(MemoryReplayGuard.key(statement.issuer, statement.payloadType), statement.sequence);
  }
}

// --- verification ---------------------------------------------------------------------

/** Options of verifyStatement. */
export interface VerifyOptions {
  /** The verifier's own party id (stage e); never "*". */
  audience: string;
  /** The time of verification (stage f). */
  now: Instant;
  /** Allowed clock skew in seconds, both directions; default 30. */
  maxSkewSeconds?: number | undefined;
  /**
   * The payload type the RPC field or stream expects (stage a1). When omitted, the envelope's
   * own payload type is used and only has to be one of §3.5; callers acting on a statement
   * should always name the type they expect.
   */
  expectedPayloadType?: string | undefined;
  /** Replay state (stage g); stage g is skipped without one (fetched or embedded statements). */
  replayGuard?: ReplayGuard | undefined;
  /** Payload size limit (stage a2); default 4 MiB. */
  maxPayloadBytes?: number | undefined;
}

/** Options of verifyThreshold: those of verifyStatement plus the threshold rule. */
export interface ThresholdOptions extends VerifyOptions {
  /** Number of distinct parties whose valid signatures are required (k). */
  threshold: number;
  /** Roles whose keys count towards the threshold. */
  roles: Iterable<PartyRole>;
}

/**
 * Verify a statement signed by its issuer, addressed to `audience`, fresh at `now` (§3.6).
 *
 * Throws MalformedError, VerificationError or CollateralSyncError(TOO_LARGE) at the first
 * stage that fails. `M` is the generated message type of the expected payload type.
 */
export function verifyStatement<M extends Message = StatementMessage>(
  envelope: Envelope,
  registry: KeyRegistry,
  opts: VerifyOptions,
): VerifiedStatement<M> {
  const row = expectedRow(envelope, opts);
  const [payload, verified] = verifySignatures(envelope, registry, row, opts.maxPayloadBytes ?? MAX_PAYLOAD_BYTES);
  const [message, header] = parse(row, payload);
  const issuerKeyId = issuerKey(registry, verified, header, row.issuerRoles);
  return accept<M>(envelope, row, payload, message, header, [[issuerKeyId, header.issuer]], opts);
}

/**
 * Verify a statement that needs valid signatures from `threshold` distinct parties (§3.7).
 *
 * A signature counts if it verifies and its key is registered in one of `roles` and valid at
 * the statement's issued_at; several signatures by one party count once; invalid or unknown
 * signatures count for nothing but do not fail the statement by themselves. The issuer must be
 * one of the counted parties, with a key allowed to issue this type. Fewer than `threshold`
 * parties throw THRESHOLD_NOT_MET.
 */
export function verifyThreshold<M extends Message = StatementMessage>(
  envelope: Envelope,
  registry: KeyRegistry,
  opts: ThresholdOptions,
): VerifiedStatement<M> {
  if (!Number.isSafeInteger(opts.threshold) || opts.threshold < 1) {
    throw new RangeError(`threshold must be an integer >= 1, got ${opts.threshold}`);
  }
  const roles = new Set(opts.roles);
  const row = expectedRow(envelope, opts);
  const [payload, verified] = verifySignatures(envelope, registry, row, opts.maxPayloadBytes ?? MAX_PAYLOAD_BYTES);
  const [message, header] = parse(row, payload);
  const counted = new Map<string, string>(); // party id -> key id of its first counted signature
  for (const kid of verified) {
    let partyId: string;
    try {
      partyId = registry.resolve(kid, { at: issuedAt(header), roles }).partyId;
    } catch (err) {
      if (err instanceof VerificationError) continue;
      throw err;
    }
    if (!counted.has(partyId)) counted.set(partyId, kid);
  }
  if (counted.size < opts.threshold) {
    throw new VerificationError(
      `valid signatures from ${counted.size} distinct parties, expected ${opts.threshold}`,
      {
        reason: ErrorReason.THRESHOLD_NOT_MET,
        metadata: { expected: String(opts.threshold), actual: String(counted.size) },
      },
    );
  }
  issuerKey(registry, verified, header, row.issuerRoles);
  const issuerKeyId = counted.get(header.issuer);
  if (issuerKeyId === undefined) {
    // The issuer signed with a key fit to issue, but not in one of `roles`.
    const parties = [...counted.keys()].sort().join(",");
    throw new VerificationError(
      `issuer is not among the counted signers: expected ${JSON.stringify(header.issuer)}, got [${parties}]`,
      { reason: ErrorReason.KEY_ROLE_MISMATCH, metadata: { expected: header.issuer, actual: parties } },
    );
  }
  // Issuer first, then the other parties in signature order.
  const signers: [string, string][] = [[issuerKeyId, header.issuer]];
  for (const [party, kid] of counted) if (party !== header.issuer) signers.push([kid, party]);
  return accept<M>(envelope, row, payload, message, header, signers, opts);
}

/** The table row of the expected type (stage a1 compares it with the envelope's). */
function expectedRow(envelope: Envelope, opts: VerifyOptions): StatementType {
  return statementTypeOf(opts.expectedPayloadType ?? envelope.payloadType);
}

function issuedAt(header: StatementHeader): NonNullable<StatementHeader["issuedAt"]> {
  // parse() refuses a header without issued_at; this narrows the type for the compiler.
  if (header.issuedAt === undefined) throw new MalformedError("header.issued_at is unset");
  return header.issuedAt;
}

/**
 * Stage d: the first verified key that may issue for `header.issuer` at issued_at.
 *
 * If none may, the error reported is about the issuer's own key when it signed (revoked,
 * not valid, wrong role), else about the first signer (as the Python SDK does).
 */
function issuerKey(
  registry: KeyRegistry,
  verified: readonly string[],
  header: StatementHeader,
  issuerRoles: ReadonlySet<PartyRole>,
): string {
  let ownError: VerificationError | undefined;
  let otherError: VerificationError | undefined;
  for (const kid of verified) {
    try {
      registry.resolve(kid, { at: issuedAt(header), roles: issuerRoles, partyId: header.issuer });
      return kid;
    } catch (err) {
      if (!(err instanceof VerificationError)) throw err;
      if (registry.get(kid)?.partyId === header.issuer) ownError ??= err;
      else otherError ??= err;
    }
  }
  // verifySignatures never returns an empty list; the last fallback is for the compiler.
  throw ownError ?? otherError ?? new VerificationError("no verified signature");
}

/**
 * Stages a and b: structure, then signatures over the received bytes.
 * Returns the payload and the key ids whose signatures verified (at least one).
 */
function verifySignatures(
  envelope: Envelope,
  registry: KeyRegistry,
  row: StatementType,
  maxPayloadBytes: number,
): [Uint8Array, string[]] {
  const payloadType = envelope.payloadType;
  if (payloadType !== row.payloadType) {
    throw new MalformedError(
      `payload type ${JSON.stringify(payloadType)}, expected ${JSON.stringify(row.payloadType)}`,
      { reason: ErrorReason.PAYLOAD_TYPE_MISMATCH, metadata: { expected: row.payloadType, actual: payloadType } },
    );
  }
  const payload = envelope.payload;
  if (payload.length > maxPayloadBytes) {
    throw new CollateralSyncError(`payload too large: expected <= ${maxPayloadBytes} bytes, got ${payload.length}`, {
      reason: ErrorReason.TOO_LARGE,
      metadata: { expected: `<= ${maxPayloadBytes}`, actual: String(payload.length) },
    });
  }
  const signatures = envelope.signatures;
  if (signatures.length < 1 || signatures.length > MAX_SIGNATURES) {
    throw new MalformedError(
      `envelope carries ${signatures.length} signatures, expected 1..${MAX_SIGNATURES}`,
      { metadata: { expected: `1..${MAX_SIGNATURES}`, actual: String(signatures.length) } },
    );
  }
  signatures.forEach(({ keyId: kid, sig }, index) => {
    if (sig.length !== SIGNATURE_BYTES) {
      throw new MalformedError(`signature ${index} is ${sig.length} bytes, expected ${SIGNATURE_BYTES}`, {
        metadata: { expected: String(SIGNATURE_BYTES), actual: String(sig.length) },
        fieldViolations: { [`signatures[${index}].sig`]: "must be 64 bytes" },
      });
    }
    if (!KEY_ID.test(kid)) {
      throw new MalformedError(`signature ${index} key id ${JSON.stringify(kid)} is not 64 lowercase hex digits`, {
        metadata: { expected: "64 lowercase hex digits", actual: kid },
        fieldViolations: { [`signatures[${index}].key_id`]: "must be 64 lowercase hex" },
      });
    }
  });

  const signed = pae(payloadType, payload);
  const verified: string[] = [];
  let known = 0;
  for (const { keyId: kid, sig } of signatures) {
    if (!registry.has(kid)) continue;
    known += 1;
    // The same key id twice counts once.
    if (!verified.includes(kid) && registry.verifySignature(kid, signed, sig)) verified.push(kid);
  }
  if (known === 0) {
    const kids = signatures.map((s) => s.keyId).join(",");
    throw new VerificationError(`no signature is by a registered key: expected a registered key id, got ${kids}`, {
      reason: ErrorReason.KEY_UNKNOWN,
      metadata: { expected: "a registered key id", actual: kids },
    });
  }
  if (verified.length === 0) {
    throw new VerificationError(`no signature by a registered key verifies over the payload: expected a valid signature, got ${known} invalid`, {
      reason: ErrorReason.SIGNATURE_INVALID,
      metadata: { expected: "a valid signature", actual: `${known} invalid` },
    });
  }
  return [payload, verified];
}

function stampText(stamp: StatementHeader["issuedAt"]): string {
  return stamp === undefined ? "unset" : `seconds=${stamp.seconds} nanos=${stamp.nanos}`;
}

/** Stage c: parse the (already authenticated) payload and check the header's shape. */
function parse(row: StatementType, payload: Uint8Array): [StatementMessage, StatementHeader] {
  let message: StatementMessage;
  try {
    // Wire-type misfits are unknown fields, as in upb (see decode.ts).
    message = decodeMessage(row.schema, payload) as StatementMessage;
  } catch (err) {
    const detail = err instanceof Error ? err.message : String(err);
    throw new MalformedError(`payload does not parse as ${row.schema.name}: ${detail}`, {
      metadata: { expected: row.schema.name, actual: "undecodable bytes" },
      cause: err,
    });
  }
  const header = message.header;
  if (header === undefined) {
    throw new MalformedError("statement has no header: expected header, got unset", {
      metadata: { expected: "header", actual: "unset" },
      fieldViolations: { header: "required" },
    });
  }
  let problem: [string, string, string] | undefined; // field, expected, actual
  if (!header.issuer) {
    problem = ["header.issuer", "non-empty party id", ""];
  } else if (header.sequence < 1n) {
    problem = ["header.sequence", ">= 1", String(header.sequence)];
  } else if (header.issuedAt === undefined || !timestampIsValid(header.issuedAt)) {
    problem = ["header.issued_at", "valid timestamp", stampText(header.issuedAt)];
  } else if (header.expiresAt === undefined || !timestampIsValid(header.expiresAt)) {
    problem = ["header.expires_at", "valid timestamp", stampText(header.expiresAt)];
  } else if (timestampNs(header.expiresAt) <= timestampNs(header.issuedAt)) {
    problem = ["header.expires_at", `after issued_at ${formatTimestamp(header.issuedAt)}`, formatTimestamp(header.expiresAt)];
  }
  if (problem !== undefined) {
    const [field, expected, actual] = problem;
    throw new MalformedError(`${field} must be ${expected}, got ${JSON.stringify(actual)}`, {
      metadata: { expected, actual },
      fieldViolations: { [field]: `must be ${expected}` },
    });
  }
  // Last in stage c: no integer above 2^63 - 1 may reach anyone's storage (§2.4).
  checkIntegers(row.schema, message);
  return [message, header];
}

function skewNs(seconds: number | undefined): bigint {
  const value = seconds ?? DEFAULT_MAX_SKEW_SECONDS;
  if (!Number.isFinite(value) || value < 0) {
    throw new RangeError(`maxSkewSeconds must be a non-negative number, got ${value}`);
  }
  return BigInt(Math.round(value * 1e9));
}

/** Stages e to g (audience, freshness, replay), then the result. */
function accept<M extends Message>(
  envelope: Envelope,
  row: StatementType,
  payload: Uint8Array,
  message: StatementMessage,
  header: StatementHeader,
  signers: readonly (readonly [string, string])[],
  opts: VerifyOptions,
): VerifiedStatement<M> {
  const addressed = header.audience;
  const audience = opts.audience;
  // A non-public statement addressed to everyone is refused even if it also names us.
  const matched = addressed.includes(ANYONE) ? row.public : audience !== ANYONE && addressed.includes(audience);
  if (!matched) {
    const actual = addressed.join(",");
    const why = addressed.includes(ANYONE)
      ? `'*' is not allowed for ${row.payloadType}: expected explicit party ids including ${JSON.stringify(audience)}, got [${actual}]`
      : `verifier not in the audience: expected ${JSON.stringify(audience)}, got [${actual}]`;
    throw new VerificationError(why, {
      reason: ErrorReason.AUDIENCE_MISMATCH,
      metadata: { expected: audience, actual },
    });
  }

  const nowNs = instantNs(opts.now);
  const skew = skewNs(opts.maxSkewSeconds);
  const issuedNs = timestampNs(issuedAt(header));
  if (issuedNs > nowNs + skew) {
    const limit = formatNs(nowNs + skew);
    throw new VerificationError(`statement not yet valid: expected issued_at <= ${limit} (now plus skew), got ${formatNs(issuedNs)}`, {
      reason: ErrorReason.STATEMENT_NOT_YET_VALID,
      metadata: { expected: `<= ${limit}`, actual: formatNs(issuedNs) },
    });
  }
  // parse() refuses a header without expires_at.
  const expiresNs = header.expiresAt === undefined ? 0n : timestampNs(header.expiresAt);
  if (nowNs > expiresNs + skew) {
    const limit = formatNs(expiresNs + skew);
    throw new VerificationError(
      `statement expired at ${formatNs(expiresNs)}: expected now <= ${limit} (expiry plus skew), got ${formatNs(nowNs)}`,
      { reason: ErrorReason.STATEMENT_EXPIRED, metadata: { expected: `<= ${limit}`, actual: formatNs(nowNs) } },
    );
  }

  opts.replayGuard?.check(header.issuer, row.payloadType, header.sequence);
  return Object.freeze({
    payloadType: row.payloadType,
    header,
    message: message as unknown as M,
    envelope,
    payload,
    signerKeyIds: Object.freeze(signers.map(([kid]) => kid)),
    signerPartyIds: Object.freeze(signers.map(([, party]) => party)),
    issuer: header.issuer,
    sequence: header.sequence,
  });
}
