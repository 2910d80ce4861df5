// RFC 9162 Merkle trees with SHA-256 (PROTOCOL.md §5.1, §5.3, §5.4): hashing, and the
// verification of inclusion and consistency proofs.
//
// Proofs use RFC 9162 conventions on the wire (0-based index, audit path bottom-up,
// consistency path of §2.1.4.1), so any RFC 9162 verifier checks the same bytes. Every
// verifier checks its preconditions (ranges, hash sizes, path length) before hashing anything
// and throws ProofError saying what was expected and what was received. The decomposition
// follows transparency-dev/merkle (decompInclusionProof, chainInner, chainInnerRight,
// chainBorderRight). Mirrors sdk/collateral_sync/merkle.py; the tree-hash and proof
// generation functions (for logs and tests) follow the recursive definitions of §5.1–§5.4.

import { createHash, timingSafeEqual } from "node:crypto";
import type { Checkpoint, ConsistencyProof, InclusionProof } from "./gen/collateral_sync/v1/attestation_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import { ProofError } from "./errors.js";

/** RFC 9162 §2.1.1 domain separation: leaf hashes and node hashes can never collide. */
export const LEAF_PREFIX = 0x00;
export const NODE_PREFIX = 0x01;
/** SHA-256 digest size; every leaf hash, node hash and root is this long. */
export const HASH_SIZE = 32;

/** A tree size or index: a bigint (as in the generated messages) or a safe integer. */
export type Count = bigint | number;

// --------------------------------------------------------------------- hashing

/** RFC 9162 leaf hash: SHA-256(0x00 || data). */
export function leafHash(data: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(Uint8Array.of(LEAF_PREFIX)).update(data).digest());
}

/** RFC 9162 interior node hash: SHA-256(0x01 || left || right). */
export function nodeHash(left: Uint8Array, right: Uint8Array): Uint8Array {
  return new Uint8Array(
    createHash("sha256").update(Uint8Array.of(NODE_PREFIX)).update(left).update(right).digest(),
  );
}

/** Root of the empty tree: SHA-256 of the empty string. */
export function emptyRoot(): Uint8Array {
  return new Uint8Array(createHash("sha256").digest());
}

// --------------------------------------------------------------------- errors

function proofError(what: string, expected: unknown, actual: unknown, reason = ErrorReason.PROOF_INVALID): ProofError {
  return new ProofError(`${what}: expected ${String(expected)}, got ${String(actual)}`, {
    reason,
    metadata: { expected: String(expected), actual: String(actual) },
  });
}

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("hex");
}

function checkHash(name: string, value: Uint8Array): void {
  if (value.length !== HASH_SIZE) {
    throw proofError(`${name} has the wrong length`, `${HASH_SIZE} bytes`, `${value.length} bytes`);
  }
}

function checkPathHashes(name: string, path: readonly Uint8Array[]): void {
  path.forEach((value, position) => checkHash(`${name}[${position}]`, value));
}

function checkRoot(name: string, expected: Uint8Array, actual: Uint8Array, reason: ErrorReason): void {
  // Both are HASH_SIZE long here (checked before hashing), as timingSafeEqual needs.
  if (expected.length !== actual.length || !timingSafeEqual(expected, actual)) {
    throw proofError(`${name} does not match`, hex(expected), hex(actual), reason);
  }
}

function big(value: Count, name: string): bigint {
  if (typeof value === "bigint") return value;
  if (!Number.isSafeInteger(value)) throw new RangeError(`${name} must be an integer, got ${value}`);
  return BigInt(value);
}

/** Number of bits needed to write `value` (bitlen(0) = 0). */
function bitLength(value: bigint): number {
  return value === 0n ? 0 : value.toString(2).length;
}

function popCount(value: bigint): number {
  let count = 0;
  for (const digit of value.toString(2)) if (digit === "1") count += 1;
  return count;
}

// ------------------------------------------------------- inclusion (RFC 9162 §2.1.3.2)

/**
 * Split an inclusion path into its inner part and its right border.
 *
 * The inner part holds the siblings below the level where the paths to `index` and to the
 * last leaf `size - 1` merge; above it the leaf's node is always a right child of a perfect
 * left subtree (the border).
 */
export function decompInclusionProof(index: bigint, size: bigint): [inner: number, border: number] {
  const inner = bitLength(index ^ (size - 1n));
  const border = popCount(index >> BigInt(inner));
  return [inner, border];
}

/** Hash `seed` up through `path`, the side at each level given by the bits of `index`. */
export function chainInner(seed: Uint8Array, path: readonly Uint8Array[], index: bigint): Uint8Array {
  let hash = seed;
  path.forEach((sibling, level) => {
    const isRight = (index >> BigInt(level)) & 1n;
    hash = isRight ? nodeHash(sibling, hash) : nodeHash(hash, sibling);
  });
  return hash;
}

/** Like chainInner, but only the left siblings: the tree that ends at `index`. */
export function chainInnerRight(seed: Uint8Array, path: readonly Uint8Array[], index: bigint): Uint8Array {
  let hash = seed;
  path.forEach((sibling, level) => {
    if ((index >> BigInt(level)) & 1n) hash = nodeHash(sibling, hash);
  });
  return hash;
}

/** Hash `seed` up the right border: every sibling is on the left. */
export function chainBorderRight(seed: Uint8Array, path: readonly Uint8Array[]): Uint8Array {
  let hash = seed;
  for (const sibling of path) hash = nodeHash(sibling, hash);
  return hash;
}

function checkIndex(index: bigint, treeSize: bigint): void {
  if (treeSize <= 0n) throw proofError("tree size must be positive", "tree_size > 0", treeSize);
  if (index < 0n || index >= treeSize) {
    throw proofError("leaf index out of range", `0 <= index < ${treeSize}`, index);
  }
}

/**
 * Root implied by an RFC 9162 inclusion proof (0-based `index`).
 *
 * Throws ProofError if the index, the hash sizes or the path length do not fit
 * (index, treeSize); nothing is hashed before those checks pass.
 */
export function rootFromInclusionProof(
  leaf: Uint8Array,
  index: Count,
  treeSize: Count,
  auditPath: readonly Uint8Array[],
): Uint8Array {
  const i = big(index, "index");
  const n = big(treeSize, "treeSize");
  checkIndex(i, n);
  checkHash("leaf hash", leaf);
  checkPathHashes("audit_path", auditPath);
  const [inner, border] = decompInclusionProof(i, n);
  if (auditPath.length !== inner + border) {
    throw proofError(`audit path length for leaf ${i} of ${n}`, inner + border, auditPath.length);
  }
  const seed = chainInner(leaf, auditPath.slice(0, inner), i);
  return chainBorderRight(seed, auditPath.slice(inner));
}

/**
 * Check an RFC 9162 §2.1.3.2 inclusion proof of the leaf hash `leaf` against `root`.
 * Throws ProofError (PROOF_INVALID) on any failure.
 */
export function verifyInclusion(
  leaf: Uint8Array,
  index: Count,
  treeSize: Count,
  auditPath: readonly Uint8Array[],
  root: Uint8Array,
): void {
  checkHash("root", root);
  const computed = rootFromInclusionProof(leaf, index, treeSize, auditPath);
  checkRoot("root computed from the inclusion proof", root, computed, ErrorReason.PROOF_INVALID);
}

// ----------------------------------------------------- consistency (RFC 9162 §2.1.4.2)

/**
 * Check an RFC 9162 §2.1.4.2 consistency proof between two tree heads.
 *
 * Structural problems (sizes, hash lengths, path length) throw ProofError with
 * PROOF_INVALID before any hashing; a root the proof does not reproduce throws ProofError
 * with CHECKPOINT_INCONSISTENT.
 */
export function verifyConsistency(
  firstSize: Count,
  secondSize: Count,
  consistencyPath: readonly Uint8Array[],
  firstRoot: Uint8Array,
  secondRoot: Uint8Array,
): void {
  const m = big(firstSize, "firstSize");
  const n = big(secondSize, "secondSize");
  if (m <= 0n) throw proofError("first tree size must be positive", "first_size > 0", m);
  if (m > n) throw proofError("first tree size exceeds second tree size", `first_size <= ${n}`, m);
  checkHash("first root", firstRoot);
  checkHash("second root", secondRoot);
  checkPathHashes("consistency_path", consistencyPath);

  if (m === n) {
    if (consistencyPath.length !== 0) {
      throw proofError("consistency path length for equal sizes", 0, consistencyPath.length);
    }
    checkRoot("second root of an equal-size tree", firstRoot, secondRoot, ErrorReason.CHECKPOINT_INCONSISTENT);
    return;
  }

  // The proof is the tail of the inclusion proof of leaf m - 1 in the second tree, from the
  // level of the largest perfect subtree the first tree ends with; that subtree's hash comes
  // first unless it is the whole first tree (then the verifier already has it).
  const [fullInner, border] = decompInclusionProof(m - 1n, n);
  const shift = bitLength(m & -m) - 1;
  const inner = fullInner - shift;
  const wholeFirstTree = m === 1n << BigInt(shift);
  const start = wholeFirstTree ? 0 : 1;
  if (consistencyPath.length !== start + inner + border) {
    throw proofError(`consistency path length from ${m} to ${n}`, start + inner + border, consistencyPath.length);
  }
  const seed = wholeFirstTree ? firstRoot : (consistencyPath[0] as Uint8Array);
  const path = consistencyPath.slice(start);
  const mask = (m - 1n) >> BigInt(shift);

  const computedFirst = chainBorderRight(chainInnerRight(seed, path.slice(0, inner), mask), path.slice(inner));
  checkRoot("first root computed from the consistency proof", firstRoot, computedFirst, ErrorReason.CHECKPOINT_INCONSISTENT);
  const computedSecond = chainBorderRight(chainInner(seed, path.slice(0, inner), mask), path.slice(inner));
  checkRoot("second root computed from the consistency proof", secondRoot, computedSecond, ErrorReason.CHECKPOINT_INCONSISTENT);
}

// ------------------------------------------------------------------ proto wrappers

/** Check that `leaf` (the leaf bytes, not their hash) is in `checkpoint`'s tree (§5.3). */
export function verifyInclusionProof(proof: InclusionProof, leaf: Uint8Array, checkpoint: Checkpoint): void {
  if (proof.treeSize !== checkpoint.treeSize) {
    throw proofError("inclusion proof tree_size differs from the checkpoint", checkpoint.treeSize, proof.treeSize);
  }
  verifyInclusion(leafHash(leaf), proof.leafIndex, proof.treeSize, proof.auditPath, checkpoint.rootHash);
}

/** Check that `second`'s tree extends `first`'s tree, of the same log (§5.4). */
export function verifyConsistencyProof(proof: ConsistencyProof, first: Checkpoint, second: Checkpoint): void {
  if (first.origin !== second.origin) {
    throw proofError("checkpoints come from different logs", first.origin, second.origin);
  }
  if (proof.firstTreeSize !== first.treeSize) {
    throw proofError(
      "consistency proof first_tree_size differs from the first checkpoint",
      first.treeSize,
      proof.firstTreeSize,
    );
  }
  if (proof.secondTreeSize !== second.treeSize) {
    throw proofError(
      "consistency proof second_tree_size differs from the second checkpoint",
      second.treeSize,
      proof.secondTreeSize,
    );
  }
  verifyConsistency(proof.firstTreeSize, proof.secondTreeSize, proof.consistencyPath, first.rootHash, second.rootHash);
}

// ------------------------------------------------- generation (§5.1, §5.3, §5.4)

/** RFC 9162 split point: the largest power of two strictly below `width` (width ≥ 2). */
function split(width: number): number {
  let k = 1;
  while (k * 2 < width) k *= 2;
  return k;
}

/** MTH of a list of leaf hashes (§5.1); the empty list gives emptyRoot(). */
export function merkleRoot(leafHashes: readonly Uint8Array[]): Uint8Array {
  if (leafHashes.length === 0) return emptyRoot();
  if (leafHashes.length === 1) return leafHashes[0] as Uint8Array;
  const k = split(leafHashes.length);
  return nodeHash(merkleRoot(leafHashes.slice(0, k)), merkleRoot(leafHashes.slice(k)));
}

/** PATH(index, D[n]) of §5.3 over leaf hashes: the audit path, bottom-up. */
export function inclusionPath(index: number, leafHashes: readonly Uint8Array[]): Uint8Array[] {
  const n = leafHashes.length;
  if (!Number.isSafeInteger(index) || index < 0 || index >= n) {
    throw new RangeError(`leaf index must be in [0, ${n}), got ${index}`);
  }
  if (n === 1) return [];
  const k = split(n);
  return index < k
    ? [...inclusionPath(index, leafHashes.slice(0, k)), merkleRoot(leafHashes.slice(k))]
    : [...inclusionPath(index - k, leafHashes.slice(k)), merkleRoot(leafHashes.slice(0, k))];
}

/** PROOF(m, D[n]) of §5.4 over leaf hashes (empty for m = n or m = 0). */
export function consistencyPath(firstSize: number, leafHashes: readonly Uint8Array[]): Uint8Array[] {
  const n = leafHashes.length;
  if (!Number.isSafeInteger(firstSize) || firstSize < 0 || firstSize > n) {
    throw new RangeError(`first size must be in [0, ${n}], got ${firstSize}`);
  }
  if (firstSize === 0 || firstSize === n) return [];
  return subproof(firstSize, leafHashes, true);
}

function subproof(m: number, leaves: readonly Uint8Array[], whole: boolean): Uint8Array[] {
  const n = leaves.length;
  if (m === n) return whole ? [] : [merkleRoot(leaves)];
  const k = split(n);
  return m <= k
    ? [...subproof(m, leaves.slice(0, k), whole), merkleRoot(leaves.slice(k))]
    : [...subproof(m - k, leaves.slice(k), false), merkleRoot(leaves.slice(0, k))];
}
