// The key registry: which Ed25519 key speaks for which party, in which role, when
// (PROTOCOL.md §4.1–§4.3).
//
// A KeyRegistry holds PartyKey entries by key id (lowercase hex SHA-256 of the 32-byte raw
// public key) with their validity window, rotation and revocation, and answers one question
// for verifiers: may this key sign for this party, in this role, at this instant (resolve)?
// A registry file is the proto3 JSON of collateral_sync.v1.KeyRegistry; loading refuses what
// §4.1 and §4.3 refuse. Mirrors the registry half of sdk/collateral_sync/keys.py.

import { createHash } from "node:crypto";
import { readFileSync, renameSync, writeFileSync, unlinkSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { clone, create, fromJsonString, toJsonString } from "@bufbuild/protobuf";
import { PartyRole } from "./gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import {
  type KeyRegistry as KeyRegistryMessage,
  KeyRegistrySchema,
  type PartyKey,
  PartyKeySchema,
} from "./gen/collateral_sync/v1/keys_pb.js";
import { Ed25519VerifyKey, PUBLIC_KEY_BYTES, SIGNATURE_BYTES } from "./ed25519.js";
import { MalformedError, StateError, VerificationError } from "./errors.js";
import {
  type Instant,
  formatNs,
  formatTimestamp,
  instantNs,
  timestampFromDate,
  timestampIsValid,
  timestampNs,
} from "./time.js";

/** Lowercase hex SHA-256 of a 32-byte raw Ed25519 public key (§3.3). */
export function keyId(publicKey: Uint8Array): string {
  if (publicKey.length !== PUBLIC_KEY_BYTES) {
    throw new MalformedError(`public key must be ${PUBLIC_KEY_BYTES} bytes, got ${publicKey.length}`, {
      metadata: { expected: String(PUBLIC_KEY_BYTES), actual: String(publicKey.length) },
    });
  }
  return createHash("sha256").update(publicKey).digest("hex");
}

/** Enum name of a PartyRole value ("PARTY_ROLE_CUSTODIAN"), or the number if it is not one. */
export function roleName(role: number): string {
  const name = (PartyRole as unknown as Record<number, string | undefined>)[role];
  return name === undefined ? String(role) : `PARTY_ROLE_${name}`;
}

function isKnownRole(role: number): boolean {
  return (PartyRole as unknown as Record<number, string | undefined>)[role] !== undefined;
}

function checkRole(role: number, what: string): void {
  if (role === PartyRole.UNSPECIFIED || !isKnownRole(role)) {
    throw new MalformedError(
      `${what}: role must be a PartyRole other than PARTY_ROLE_UNSPECIFIED, got ${roleName(role)}`,
      { metadata: { expected: "PARTY_ROLE_CUSTODIAN..KEY_REGISTRY", actual: roleName(role) } },
    );
  }
}

interface Entry {
  key: PartyKey; // the registry's own copy; never handed out
  verifyKey: Ed25519VerifyKey; // built once: verification is on the hot path
}

/** Options of KeyRegistry.resolve. */
export interface ResolveOptions {
  /** The instant the key must be valid at (a statement's issued_at). */
  at: Instant;
  /** Roles the key must hold one of; any role if omitted. */
  roles?: Iterable<PartyRole> | undefined;
  /** Party the key must belong to; any party if omitted. */
  partyId?: string | undefined;
}

/** Public keys of the parties, by key id, with validity, rotation and revocation. */
export class KeyRegistry implements Iterable<PartyKey> {
  private readonly entries = new Map<string, Entry>();

  constructor(keys: Iterable<PartyKey> = []) {
    for (const partyKey of keys) this.add(partyKey);
  }

  // -- loading --

  /** Build a registry from a KeyRegistry message, checking every entry as add() does. */
  static fromProto(message: KeyRegistryMessage): KeyRegistry {
    return new KeyRegistry(message.keys);
  }

  /**
   * Parse a registry file's text (proto3 JSON of KeyRegistry; lowerCamelCase or snake_case
   * names). Refuses invalid JSON, unknown or repeated fields and every inconsistent entry.
   */
  static fromJson(text: string): KeyRegistry {
    return parseRegistry(text, "key registry");
  }

  /** Read a registry file (UTF-8 proto3 JSON); refuse malformed JSON or an inconsistent entry. */
  static load(path: string): KeyRegistry {
    const where = `key registry file ${path}`;
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(readFileSync(path));
    } catch (err) {
      if (!(err instanceof TypeError)) throw err; // I/O errors surface as they are
      throw new MalformedError(`${where} is not UTF-8 text`, {
        metadata: { expected: "UTF-8 JSON", actual: "undecodable bytes" },
        cause: err,
      });
    }
    return parseRegistry(text, where);
  }

  // -- changes --

  /** Register a key; refuse an inconsistent entry or a key id already present. */
  add(partyKey: PartyKey): void {
    const entry = checkedEntry(partyKey);
    if (this.entries.has(entry.key.keyId)) {
      throw new StateError(`key ${entry.key.keyId} is already registered`, {
        metadata: { expected: "new key id", actual: entry.key.keyId },
      });
    }
    this.entries.set(entry.key.keyId, entry);
  }

  /**
   * Replace a key: the old one stops being valid at `at`; the new one is added. The new key
   * must belong to the same party and role as the old one (§4.2).
   */
  rotate(oldKeyId: string, newKey: PartyKey, at: Date): void {
    const old = this.existing(oldKeyId);
    const entry = checkedEntry(newKey);
    if (this.entries.has(entry.key.keyId)) {
      throw new StateError(`key ${entry.key.keyId} is already registered`, {
        metadata: { expected: "new key id", actual: entry.key.keyId },
      });
    }
    if (entry.key.partyId !== old.key.partyId || entry.key.role !== old.key.role) {
      const expected = `${old.key.partyId}/${roleName(old.key.role)}`;
      const actual = `${entry.key.partyId}/${roleName(entry.key.role)}`;
      throw new StateError(`rotation must keep party and role: expected ${expected}, got ${actual}`, {
        metadata: { expected, actual },
      });
    }
    const atNs = instantNs(at);
    const validFrom = old.key.validFrom;
    if (validFrom !== undefined && atNs <= timestampNs(validFrom)) {
      const from = formatTimestamp(validFrom);
      throw new StateError(
        `rotation time must be after the old key's valid_from ${from}, got ${formatNs(atNs)}`,
        { metadata: { expected: `after ${from}`, actual: formatNs(atNs) } },
      );
    }
    // An earlier end already in force stays: rotation never extends a key's life.
    if (old.key.validUntil === undefined || atNs < timestampNs(old.key.validUntil)) {
      old.key.validUntil = timestampFromDate(at);
    }
    this.entries.set(entry.key.keyId, entry);
  }

  /** Revoke a key: statements issued at or after `at` are refused. Never undone. */
  revoke(keyIdToRevoke: string, at: Date): void {
    const entry = this.existing(keyIdToRevoke);
    const atNs = instantNs(at);
    if (entry.key.revokedAt === undefined || atNs < timestampNs(entry.key.revokedAt)) {
      entry.key.revokedAt = timestampFromDate(at);
    }
  }

  // -- queries --

  /** A copy of the entry for `keyId`, or undefined. */
  get(id: string): PartyKey | undefined {
    const entry = this.entries.get(id);
    return entry === undefined ? undefined : clone(PartyKeySchema, entry.key);
  }

  /** Whether `keyId` is registered (any party, any role, any validity). */
  has(id: string): boolean {
    return this.entries.has(id);
  }

  get size(): number {
    return this.entries.size;
  }

  /** Copies of every key registered for `partyId`, in registration order. */
  keysFor(partyId: string): PartyKey[] {
    return [...this.entries.values()]
      .filter((e) => e.key.partyId === partyId)
      .map((e) => clone(PartyKeySchema, e.key));
  }

  /** Copies of every entry, in registration order. */
  *[Symbol.iterator](): Iterator<PartyKey> {
    for (const entry of [...this.entries.values()]) yield clone(PartyKeySchema, entry.key);
  }

  /** Key ids in registration order. */
  keyIds(): string[] {
    return [...this.entries.keys()];
  }

  /**
   * The key `keyId` if it may sign, at instant `at`, for `partyId` in `roles`.
   *
   * Checks identity before time: unknown key (KEY_UNKNOWN), another party or a role not in
   * `roles` (KEY_ROLE_MISMATCH), revoked at or before `at` (KEY_REVOKED), `at` outside
   * [valid_from, valid_until) (KEY_NOT_VALID).
   */
  resolve(id: string, options: ResolveOptions): PartyKey {
    const entry = this.entries.get(id);
    if (entry === undefined) {
      throw new VerificationError(`key ${id} is not in the registry: expected a registered key id, got ${id}`, {
        reason: ErrorReason.KEY_UNKNOWN,
        metadata: { expected: "registered key id", actual: id },
      });
    }
    const key = entry.key;
    if (options.partyId !== undefined && key.partyId !== options.partyId) {
      throw new VerificationError(
        `key ${id} belongs to party ${JSON.stringify(key.partyId)}, expected ${JSON.stringify(options.partyId)}`,
        { reason: ErrorReason.KEY_ROLE_MISMATCH, metadata: { expected: options.partyId, actual: key.partyId } },
      );
    }
    if (options.roles !== undefined) {
      const roles = new Set(options.roles);
      if (!roles.has(key.role)) {
        const expected = [...roles].map(roleName).sort().join("|");
        throw new VerificationError(`key ${id} has role ${roleName(key.role)}, expected one of ${expected}`, {
          reason: ErrorReason.KEY_ROLE_MISMATCH,
          metadata: { expected, actual: roleName(key.role) },
        });
      }
    }
    const atNs = instantNs(options.at);
    if (key.revokedAt !== undefined && atNs >= timestampNs(key.revokedAt)) {
      const revoked = formatTimestamp(key.revokedAt);
      throw new VerificationError(`key ${id} was revoked at ${revoked}: expected a statement issued before ${revoked}, got ${formatNs(atNs)}`, {
        reason: ErrorReason.KEY_REVOKED,
        metadata: { expected: `before ${revoked}`, actual: formatNs(atNs) },
      });
    }
    // valid_from is always set: checkedEntry refuses an entry without it.
    const validFrom = key.validFrom === undefined ? 0n : timestampNs(key.validFrom);
    const until = key.validUntil;
    if (atNs < validFrom || (until !== undefined && atNs >= timestampNs(until))) {
      const from = key.validFrom === undefined ? "unset" : formatTimestamp(key.validFrom);
      const window = `[${from}, ${until !== undefined ? formatTimestamp(until) : "no end"})`;
      throw new VerificationError(`key ${id} is not valid then: expected an instant in ${window}, got ${formatNs(atNs)}`, {
        reason: ErrorReason.KEY_NOT_VALID,
        metadata: { expected: window, actual: formatNs(atNs) },
      });
    }
    return clone(PartyKeySchema, key);
  }

  /**
   * Whether `signature` is the registered key's Ed25519 signature over `data` (§3.3,
   * with the S < L check). Says nothing about validity windows or roles (that is resolve).
   * Unknown key ids raise KEY_UNKNOWN; a signature not 64 bytes is MALFORMED.
   */
  verifySignature(id: string, data: Uint8Array, signature: Uint8Array): boolean {
    const entry = this.entries.get(id);
    if (entry === undefined) {
      throw new VerificationError(`key ${id} is not in the registry: expected a registered key id, got ${id}`, {
        reason: ErrorReason.KEY_UNKNOWN,
        metadata: { expected: "registered key id", actual: id },
      });
    }
    if (signature.length !== SIGNATURE_BYTES) {
      throw new MalformedError(`signature must be ${SIGNATURE_BYTES} bytes, got ${signature.length}`, {
        metadata: { expected: String(SIGNATURE_BYTES), actual: String(signature.length) },
      });
    }
    return entry.verifyKey.verify(data, signature);
  }

  // -- serialisation --

  toProto(): KeyRegistryMessage {
    return create(KeyRegistrySchema, { keys: [...this] });
  }

  /** The registry file's text (proto3 JSON, lowerCamelCase names). */
  toJson(): string {
    return toJsonString(KeyRegistrySchema, this.toProto(), { prettySpaces: 2 }) + "\n";
  }

  /** Write the registry file atomically: a crash leaves the old file or the new one. */
  save(path: string): void {
    const temporary = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
    try {
      writeFileSync(temporary, this.toJson(), { encoding: "utf-8", mode: 0o644, flush: true });
      renameSync(temporary, path);
    } catch (err) {
      try {
        unlinkSync(temporary);
      } catch {
        // already gone
      }
      throw err;
    }
  }

  // -- helpers --

  private existing(id: string): Entry {
    const entry = this.entries.get(id);
    if (entry === undefined) {
      throw new StateError(`key ${id} is not in the registry: expected a registered key id, got ${id}`, {
        reason: ErrorReason.NOT_FOUND,
        metadata: { expected: "registered key id", actual: id },
      });
    }
    return entry;
  }
}

function parseRegistry(text: string, where: string): KeyRegistry {
  let message: KeyRegistryMessage;
  try {
    // Strict: unknown fields are refused (§4.3), and so are repeated keys.
    message = fromJsonString(KeyRegistrySchema, text, { ignoreUnknownFields: false });
  } catch (err) {
    const detail = err instanceof Error ? err.message : String(err);
    throw new MalformedError(`${where}: ${detail}`, {
      metadata: { expected: "collateral_sync.v1.KeyRegistry JSON", actual: detail },
      cause: err,
    });
  }
  return KeyRegistry.fromProto(message);
}

function stampText(value: { seconds: bigint; nanos: number }): string {
  return `seconds=${value.seconds} nanos=${value.nanos}`;
}

/** §4.1: refuse an entry a registry must not hold; return the registry's own copy. */
function checkedEntry(partyKey: PartyKey): Entry {
  const what = `party key ${partyKey.keyId || "(no key id)"}`;
  if (!partyKey.partyId) {
    throw new MalformedError(`${what}: party_id must be non-empty`, {
      metadata: { expected: "non-empty", actual: "" },
    });
  }
  checkRole(partyKey.role, what);
  const computed = keyId(partyKey.publicKey);
  if (partyKey.keyId !== computed) {
    throw new MalformedError(`${what}: key_id must be SHA-256 of the public key, expected ${computed}`, {
      metadata: { expected: computed, actual: partyKey.keyId },
    });
  }
  if (partyKey.validFrom === undefined) {
    throw new MalformedError(`${what}: valid_from must be set`, {
      metadata: { expected: "timestamp", actual: "unset" },
    });
  }
  const stamps = [
    ["valid_from", partyKey.validFrom],
    ["valid_until", partyKey.validUntil],
    ["revoked_at", partyKey.revokedAt],
  ] as const;
  for (const [name, stamp] of stamps) {
    if (stamp !== undefined && !timestampIsValid(stamp)) {
      const actual = stampText(stamp);
      throw new MalformedError(`${what}: ${name} is not a valid timestamp (${actual})`, {
        metadata: { expected: "0001-01-01..9999-12-31", actual },
      });
    }
  }
  if (partyKey.validUntil !== undefined && timestampNs(partyKey.validUntil) <= timestampNs(partyKey.validFrom)) {
    const expected = `after ${formatTimestamp(partyKey.validFrom)}`;
    const actual = formatTimestamp(partyKey.validUntil);
    throw new MalformedError(`${what}: valid_until must be ${expected}, got ${actual}`, {
      metadata: { expected, actual },
    });
  }
  const key = clone(PartyKeySchema, partyKey);
  return { key, verifyKey: new Ed25519VerifyKey(key.publicKey) };
}
