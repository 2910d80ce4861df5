// Ed25519 signature verification as PROTOCOL.md §3.3 requires, on node:crypto.
//
// node:crypto (OpenSSL) verifies pure Ed25519 (RFC 8032 §5.1). Around it this module adds
// the checks the protocol asks of a verifier, so that the result is the same as the Python
// SDK's (libsodium, through PyNaCl):
//   - the scalar S must be below the group order L (RFC 8032 §5.1.7 step 1; MUST);
//   - the public key must be a canonical encoding (y < p) and not of small order, and the
//     signature's R must not be of small order (SHOULD; libsodium refuses both).
// A point has small order iff its y coordinate is one of five values (the 8-torsion of
// the curve); they are derived below from the curve constant rather than listed.

import { createPublicKey, type KeyObject, verify } from "node:crypto";

export const PUBLIC_KEY_BYTES = 32;
export const SIGNATURE_BYTES = 64;

const P = 2n ** 255n - 19n;
/** Order of the prime-order subgroup (RFC 8032 §5.1). */
export const GROUP_ORDER = 2n ** 252n + 27742317777372353535851937790883648493n;

// DER prefix of a SubjectPublicKeyInfo for an Ed25519 key (RFC 8410); the 32 raw bytes follow.
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");

function mod(a: bigint): bigint {
  const r = a % P;
  return r < 0n ? r + P : r;
}

function power(base: bigint, exponent: bigint): bigint {
  let result = 1n;
  let b = mod(base);
  let e = exponent;
  while (e > 0n) {
    if (e & 1n) result = (result * b) % P;
    b = (b * b) % P;
    e >>= 1n;
  }
  return result;
}

function inverse(a: bigint): bigint {
  return power(a, P - 2n);
}

/** A square root mod p (p ≡ 5 mod 8), or undefined if `a` is not a square. */
function squareRoot(a: bigint): bigint | undefined {
  const root = power(a, (P + 3n) / 8n);
  if (mod(root * root - a) === 0n) return root;
  const adjusted = mod(root * power(2n, (P - 1n) / 4n)); // times sqrt(-1)
  return mod(adjusted * adjusted - a) === 0n ? adjusted : undefined;
}

/**
 * The y coordinates of the points of order 1, 2, 4 and 8. Order 1: y = 1; order 2: y = -1;
 * order 4: y = 0. A point of order 8 doubles to one of order 4, so y(2P) = 0, i.e.
 * y² = -x²; with the curve equation -x² + y² = 1 + d·x²·y² this gives
 * d·y⁴ + 2y² − 1 = 0, so y² = (−1 ± √(1 + d)) / d, and y is ± its square root.
 */
function smallOrderYs(): ReadonlySet<bigint> {
  const d = mod(-121665n * inverse(121666n));
  const ys = new Set<bigint>([0n, 1n, P - 1n]);
  const s = squareRoot(mod(1n + d));
  if (s === undefined) throw new Error("Ed25519 constants: 1 + d must be a square");
  for (const candidate of [mod((-1n + s) * inverse(d)), mod((-1n - s) * inverse(d))]) {
    const y = squareRoot(candidate);
    if (y !== undefined) {
      ys.add(y);
      ys.add(P - y);
    }
  }
  if (ys.size !== 5) throw new Error(`Ed25519 constants: expected 5 small-order y values, got ${ys.size}`);
  return ys;
}

/** y coordinates of the small-order points (exported for tests). */
export const SMALL_ORDER_Y: ReadonlySet<bigint> = smallOrderYs();

function littleEndian(bytes: Uint8Array): bigint {
  let value = 0n;
  for (let i = bytes.length - 1; i >= 0; i--) value = (value << 8n) | BigInt(bytes[i] ?? 0);
  return value;
}

/** The y coordinate as encoded (sign bit of x cleared), not reduced mod p. */
function encodedY(point: Uint8Array): bigint {
  return littleEndian(point) & ((1n << 255n) - 1n);
}

/** Whether an encoded point is one of small order, in any encoding (canonical or not). */
export function hasSmallOrder(point: Uint8Array): boolean {
  const y = encodedY(point);
  return SMALL_ORDER_Y.has(y >= P ? y - P : y);
}

/** Whether a public key encoding is canonical (y < p) and not of small order. */
export function isStrongPublicKey(publicKey: Uint8Array): boolean {
  return publicKey.length === PUBLIC_KEY_BYTES && encodedY(publicKey) < P && !hasSmallOrder(publicKey);
}

/** Whether the scalar S of a 64-byte signature is below the group order (canonical). */
export function hasCanonicalScalar(signature: Uint8Array): boolean {
  return signature.length === SIGNATURE_BYTES && littleEndian(signature.subarray(32)) < GROUP_ORDER;
}

/** A 32-byte raw Ed25519 public key, prepared once for many verifications. */
export class Ed25519VerifyKey {
  readonly raw: Uint8Array;
  private readonly key: KeyObject | undefined;
  private readonly strong: boolean;

  constructor(raw: Uint8Array) {
    if (raw.length !== PUBLIC_KEY_BYTES) {
      throw new RangeError(`expected a ${PUBLIC_KEY_BYTES}-byte public key, got ${raw.length} bytes`);
    }
    this.raw = Uint8Array.from(raw);
    this.strong = isStrongPublicKey(this.raw);
    let key: KeyObject | undefined;
    try {
      key = createPublicKey({ key: Buffer.concat([SPKI_PREFIX, this.raw]), format: "der", type: "spki" });
    } catch {
      key = undefined; // not a point on the curve: no signature can verify
    }
    this.key = key;
  }

  /** Whether `signature` is this key's valid Ed25519 signature over `message`. */
  verify(message: Uint8Array, signature: Uint8Array): boolean {
    if (this.key === undefined || !this.strong) return false;
    if (!hasCanonicalScalar(signature) || hasSmallOrder(signature.subarray(0, 32))) return false;
    try {
      return verify(null, message, this.key, signature);
    } catch {
      return false;
    }
  }
}
