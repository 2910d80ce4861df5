// The signed key registry (PROTOCOL.md §4.6): versions a threshold of registry keys signs.
//
// A KeyRegistryChain holds every KeyRegistryVersion from the first. Version 1 is signed by
// its own threshold of its registry keys (and may be pinned by the SHA-256 of its bytes);
// each next version is numbered and issued after its predecessor and signed by the
// predecessor's threshold of the predecessor's registry keys and by its own threshold of its
// own, and rewrites no history (every key kept, valid_from unchanged, ends and revocations
// only brought earlier). Mirrors sdk/collateral_sync/signed_registry.py.

import { createHash } from "node:crypto";
import { PartyRole } from "./gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import {
  type KeyRegistryChain,
  type KeyRegistryVersion,
  KeyRegistryVersionSchema,
  type PartyKey,
  type SignedKeyRegistryVersion,
} from "./gen/collateral_sync/v1/keys_pb.js";
import { decodeMessage } from "./decode.js";
import { CollateralSyncError, MalformedError, StateError, VerificationError } from "./errors.js";
import { KeyRegistry, roleName } from "./registry.js";
import { pae } from "./signing.js";
import { formatTimestamp, timestampIsValid, timestampNs } from "./time.js";

/** The payload type registry keys sign a KeyRegistryVersion under (§3.2 PAE). */
export const REGISTRY_PAYLOAD_TYPE = "application/vnd.collateral-sync.v1.key-registry-version+proto";
/** Most signatures one version may carry. */
export const MAX_REGISTRY_SIGNATURES = 32;

interface Verified {
  signed: SignedKeyRegistryVersion;
  version: KeyRegistryVersion;
  registryKeys: KeyRegistry;
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

/** A verified chain of registry versions; the last one is in force. */
export class SignedKeyRegistry {
  private constructor(private readonly chain: readonly Verified[]) {}

  /** Verify every version from the first; `rootSha256` pins version 1's bytes. */
  static verify(chain: KeyRegistryChain, options: { rootSha256?: string | null } = {}): SignedKeyRegistry {
    const first = chain.versions[0];
    if (first === undefined) {
      throw new MalformedError("a signed key registry holds at least one version", {
        metadata: { field: "versions", expected: ">= 1 version", actual: "0" },
      });
    }
    const root = options.rootSha256 ?? null;
    if (root !== null && sha256Hex(first.version) !== root) {
      throw new VerificationError(
        `version 1 of the key registry is not the pinned root: SHA-256 ${sha256Hex(first.version)}, expected ${root}`,
        { reason: ErrorReason.SIGNATURE_INVALID, metadata: { field: "versions[0]", expected: root } },
      );
    }
    const verified = [parseVersion(first, 0)];
    const rootVersion = verified[0] as Verified;
    if (rootVersion.version.version !== 1n) {
      throw new MalformedError(`versions[0]: the first version is 1, got ${rootVersion.version.version}`);
    }
    requireThreshold(rootVersion, rootVersion, 0, "its own");
    for (let index = 1; index < chain.versions.length; index++) {
      verified.push(successor(verified[verified.length - 1] as Verified, chain.versions[index] as SignedKeyRegistryVersion, index));
    }
    return new SignedKeyRegistry(verified);
  }

  /** The registry `chain` makes if it extends this one; a rollback or a fork is refused. */
  update(chain: KeyRegistryChain): SignedKeyRegistry {
    const held = this.chain.length;
    if (chain.versions.length < held) {
      throw new StateError(
        `the key registry offered ends at version ${chain.versions.length}, before version ${held} in force: a rollback is refused`,
        { reason: ErrorReason.STATE_CONFLICT },
      );
    }
    this.chain.forEach((ours, index) => {
      if (!sameBytes((chain.versions[index] as SignedKeyRegistryVersion).version, ours.signed.version)) {
        throw new StateError(
          `version ${index + 1} of the key registry offered differs from the one in force: two histories of the registry`,
          { reason: ErrorReason.STATE_CONFLICT },
        );
      }
    });
    const verified = [...this.chain];
    for (let index = held; index < chain.versions.length; index++) {
      verified.push(successor(verified[verified.length - 1] as Verified, chain.versions[index] as SignedKeyRegistryVersion, index));
    }
    return new SignedKeyRegistry(verified);
  }

  private get last(): Verified {
    return this.chain[this.chain.length - 1] as Verified;
  }

  /** The number of the version in force. */
  get version(): number {
    return Number(this.last.version.version);
  }

  /** SHA-256 of version 1's bytes: what a party pins as its trust root. */
  get rootSha256(): string {
    return sha256Hex((this.chain[0] as Verified).signed.version);
  }

  /** The party keys of the version in force. */
  registry(): KeyRegistry {
    return new KeyRegistry(this.last.version.keys);
  }
}

function parseVersion(signed: SignedKeyRegistryVersion, index: number): Verified {
  const field = `versions[${index}]`;
  let version: KeyRegistryVersion;
  try {
    version = decodeMessage(KeyRegistryVersionSchema, signed.version);
  } catch (err) {
    throw new MalformedError(`${field}.version: not a KeyRegistryVersion`, { cause: err });
  }
  if (version.issuedAt === undefined || !timestampIsValid(version.issuedAt)) {
    throw new MalformedError(`${field}: issued_at is required`);
  }
  new KeyRegistry(version.keys); // the loader's own checks
  const registryKeys = new KeyRegistry(version.registryKeys);
  version.keys.forEach((key, i) => {
    if (key.role === PartyRole.KEY_REGISTRY) {
      throw new MalformedError(`${field}.keys[${i}]: a registry key is listed in registry_keys, not keys`);
    }
  });
  version.registryKeys.forEach((key, i) => {
    if (key.role !== PartyRole.KEY_REGISTRY) {
      throw new MalformedError(
        `${field}.registry_keys[${i}]: role ${roleName(key.role)}, expected PARTY_ROLE_KEY_REGISTRY`,
      );
    }
  });
  if (version.threshold < 1 || version.threshold > version.registryKeys.length) {
    throw new MalformedError(`${field}: threshold ${version.threshold} of ${version.registryKeys.length} registry keys`);
  }
  return { signed, version, registryKeys };
}

function requireThreshold(subject: Verified, signers: Verified, index: number, whose: string): void {
  const { signed } = subject;
  if (signed.signatures.length > MAX_REGISTRY_SIGNATURES) {
    throw new MalformedError(`versions[${index}]: ${signed.signatures.length} signatures, at most ${MAX_REGISTRY_SIGNATURES}`);
  }
  const data = pae(REGISTRY_PAYLOAD_TYPE, signed.version);
  const good = new Set<string>();
  for (const signature of signed.signatures) {
    if (good.has(signature.keyId) || signers.registryKeys.get(signature.keyId) === undefined) continue;
    try {
      signers.registryKeys.resolve(signature.keyId, {
        at: subject.version.issuedAt as NonNullable<KeyRegistryVersion["issuedAt"]>,
        roles: [PartyRole.KEY_REGISTRY],
      });
      if (signers.registryKeys.verifySignature(signature.keyId, data, signature.signature)) good.add(signature.keyId);
    } catch (err) {
      if (!(err instanceof CollateralSyncError)) throw err;
    }
  }
  const needed = signers.version.threshold;
  if (good.size < needed) {
    throw new VerificationError(
      `version ${subject.version.version} of the key registry carries ${good.size} valid signatures of ${whose} registry keys, ${needed} needed`,
      { reason: ErrorReason.SIGNATURE_INVALID },
    );
  }
}

function successor(previous: Verified, signed: SignedKeyRegistryVersion, index: number): Verified {
  const next = parseVersion(signed, index);
  const field = `versions[${index}]`;
  const expected = previous.version.version + 1n;
  if (next.version.version !== expected) {
    throw new MalformedError(`${field}: version ${next.version.version} follows version ${previous.version.version}, expected ${expected}`);
  }
  const at = next.version.issuedAt as NonNullable<KeyRegistryVersion["issuedAt"]>;
  const before = previous.version.issuedAt as NonNullable<KeyRegistryVersion["issuedAt"]>;
  if (timestampNs(at) <= timestampNs(before)) {
    throw new MalformedError(`${field}: issued_at ${formatTimestamp(at)} is not after version ${previous.version.version}'s ${formatTimestamp(before)}`);
  }
  requireThreshold(next, previous, index, `version ${previous.version.version}'s`);
  requireThreshold(next, next, index, "its own");
  checkHistory(previous.version.keys, next.version.keys, field);
  return next;
}

function checkHistory(previous: readonly PartyKey[], next: readonly PartyKey[], field: string): void {
  const kept = new Map(next.map((key) => [key.keyId, key]));
  for (const old of previous) {
    const key = kept.get(old.keyId);
    let problem: string | undefined;
    if (key === undefined) problem = "is missing";
    else if (key.partyId !== old.partyId || key.role !== old.role || !sameBytes(key.publicKey, old.publicKey)) {
      problem = "changed party, role or public key";
    } else if (old.validFrom === undefined || key.validFrom === undefined || timestampNs(key.validFrom) !== timestampNs(old.validFrom)) {
      problem = "changed valid_from";
    } else if (later(old.validUntil, key.validUntil) || later(old.revokedAt, key.revokedAt)) {
      problem = "has a later or no valid_until or revoked_at than before";
    }
    if (problem !== undefined) {
      throw new StateError(`${field}: key ${old.keyId} (${old.partyId}, ${roleName(old.role)}) ${problem}: a registry version never rewrites history`, {
        reason: ErrorReason.STATE_CONFLICT,
      });
    }
  }
}

function later(old: PartyKey["validUntil"], next: PartyKey["validUntil"]): boolean {
  if (old === undefined) return false;
  if (next === undefined) return true;
  return timestampNs(next) > timestampNs(old);
}
