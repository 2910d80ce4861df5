// vectors/merkle.json (PROTOCOL.md §5.1, §5.3, §5.4, §15.2): every root is computed, every
// proof verifies and is generated exactly, and every invalid proof fails with its reason.

import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import {
  CheckpointSchema,
  ConsistencyProofSchema,
  InclusionProofSchema,
} from "../src/gen/collateral_sync/v1/attestation_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { ProofError } from "../src/errors.js";
import {
  consistencyPath,
  emptyRoot,
  inclusionPath,
  leafHash,
  merkleRoot,
  verifyConsistency,
  verifyConsistencyProof,
  verifyInclusion,
  verifyInclusionProof,
} from "../src/merkle.js";
import { caught, fromHex, loadVectors, toHex } from "./verification-fixtures.js";

interface Refusal {
  valid: false;
  reason: string;
  grpc_status: string;
}

interface InclusionVector {
  leaf_index: number;
  tree_size: number;
  leaf_hex: string;
  leaf_hash_hex: string;
  audit_path: string[];
  root_hex: string;
}

interface ConsistencyVector {
  first_tree_size: number;
  second_tree_size: number;
  first_root_hex: string;
  second_root_hex: string;
  consistency_path: string[];
}

interface MerkleFile {
  kind: string;
  leaf_rule: string;
  trees: { tree_size: number; root_hex: string }[];
  inclusion: InclusionVector[];
  consistency: ConsistencyVector[];
  invalid_inclusion: (Omit<InclusionVector, "leaf_hex"> & { id: string; description: string; expected: Refusal })[];
  invalid_consistency: (ConsistencyVector & { id: string; description: string; expected: Refusal })[];
}

const FILE = loadVectors<MerkleFile>("merkle.json");
const encoder = new TextEncoder();
const LARGEST = Math.max(...FILE.trees.map((t) => t.tree_size));
/** Leaf i is the ASCII bytes "leaf-<i>" (leaf_rule). */
const LEAVES = Array.from({ length: LARGEST }, (_, i) => encoder.encode(`leaf-${i}`));
const LEAF_HASHES = LEAVES.map(leafHash);

const hexes = (values: readonly string[]): Uint8Array[] => values.map(fromHex);

test("merkle.json declares its kind and leaf rule", () => {
  assert.equal(FILE.kind, "merkle");
  assert.equal(FILE.leaf_rule, "leaf-<i>");
  assert.equal(toHex(emptyRoot()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
});

test(`every tree root (${FILE.trees.length} trees)`, () => {
  const wrong: string[] = [];
  for (const tree of FILE.trees) {
    const root = toHex(merkleRoot(LEAF_HASHES.slice(0, tree.tree_size)));
    if (root !== tree.root_hex) wrong.push(`size ${tree.tree_size}: got ${root}`);
  }
  assert.deepEqual(wrong, []);
});

test(`every inclusion proof verifies and is generated exactly (${FILE.inclusion.length} proofs)`, () => {
  const wrong: string[] = [];
  for (const v of FILE.inclusion) {
    const id = `${v.leaf_index} of ${v.tree_size}`;
    try {
      const leaf = fromHex(v.leaf_hex);
      assert.deepEqual(leaf, LEAVES[v.leaf_index]);
      assert.equal(toHex(leafHash(leaf)), v.leaf_hash_hex);
      const path = hexes(v.audit_path);
      verifyInclusion(fromHex(v.leaf_hash_hex), v.leaf_index, v.tree_size, path, fromHex(v.root_hex));
      const proof = create(InclusionProofSchema, {
        leafIndex: BigInt(v.leaf_index),
        treeSize: BigInt(v.tree_size),
        auditPath: path,
      });
      const checkpoint = create(CheckpointSchema, { treeSize: BigInt(v.tree_size), rootHash: fromHex(v.root_hex) });
      verifyInclusionProof(proof, leaf, checkpoint);
      assert.deepEqual(inclusionPath(v.leaf_index, LEAF_HASHES.slice(0, v.tree_size)).map(toHex), v.audit_path);
    } catch (err) {
      wrong.push(`${id}: ${String(err)}`);
    }
  }
  assert.deepEqual(wrong, []);
});

test(`every consistency proof verifies and is generated exactly (${FILE.consistency.length} proofs)`, () => {
  const wrong: string[] = [];
  for (const v of FILE.consistency) {
    const id = `${v.first_tree_size} to ${v.second_tree_size}`;
    try {
      const path = hexes(v.consistency_path);
      const firstRoot = fromHex(v.first_root_hex);
      const secondRoot = fromHex(v.second_root_hex);
      verifyConsistency(v.first_tree_size, v.second_tree_size, path, firstRoot, secondRoot);
      const origin = "custodian.example/collateral-sync/attestations";
      verifyConsistencyProof(
        create(ConsistencyProofSchema, {
          firstTreeSize: BigInt(v.first_tree_size),
          secondTreeSize: BigInt(v.second_tree_size),
          consistencyPath: path,
        }),
        create(CheckpointSchema, { origin, treeSize: BigInt(v.first_tree_size), rootHash: firstRoot }),
        create(CheckpointSchema, { origin, treeSize: BigInt(v.second_tree_size), rootHash: secondRoot }),
      );
      assert.equal(toHex(merkleRoot(LEAF_HASHES.slice(0, v.first_tree_size))), v.first_root_hex);
      assert.equal(toHex(merkleRoot(LEAF_HASHES.slice(0, v.second_tree_size))), v.second_root_hex);
      const generated = consistencyPath(v.first_tree_size, LEAF_HASHES.slice(0, v.second_tree_size));
      assert.deepEqual(generated.map(toHex), v.consistency_path);
    } catch (err) {
      wrong.push(`${id}: ${String(err)}`);
    }
  }
  assert.deepEqual(wrong, []);
});

for (const v of FILE.invalid_inclusion) {
  test(`invalid inclusion ${v.id} (${v.description}) fails with ${v.expected.reason}`, () => {
    const error = caught(() =>
      verifyInclusion(fromHex(v.leaf_hash_hex), v.leaf_index, v.tree_size, hexes(v.audit_path), fromHex(v.root_hex)),
    );
    assert.ok(error instanceof ProofError);
    assert.equal(error.reasonName, v.expected.reason, error.message);
    assert.equal(error.code, v.expected.grpc_status);
    assert.ok(error.metadata["expected"] !== undefined && error.metadata["actual"] !== undefined);
  });
}

for (const v of FILE.invalid_consistency) {
  test(`invalid consistency ${v.id} (${v.description}) fails with ${v.expected.reason}`, () => {
    const error = caught(() =>
      verifyConsistency(
        v.first_tree_size,
        v.second_tree_size,
        hexes(v.consistency_path),
        fromHex(v.first_root_hex),
        fromHex(v.second_root_hex),
      ),
    );
    assert.ok(error instanceof ProofError);
    assert.equal(error.reasonName, v.expected.reason, error.message);
    assert.equal(error.code, v.expected.grpc_status);
    assert.ok(error.metadata["expected"] !== undefined && error.metadata["actual"] !== undefined);
  });
}

test("proofs are checked against checkpoints of the same sizes and origin", () => {
  const v = FILE.consistency.find((c) => c.first_tree_size === 3 && c.second_tree_size === 7);
  assert.ok(v !== undefined);
  const proof = create(ConsistencyProofSchema, {
    firstTreeSize: 3n,
    secondTreeSize: 7n,
    consistencyPath: hexes(v.consistency_path),
  });
  const first = create(CheckpointSchema, { origin: "a", treeSize: 3n, rootHash: fromHex(v.first_root_hex) });
  const second = create(CheckpointSchema, { origin: "a", treeSize: 7n, rootHash: fromHex(v.second_root_hex) });
  verifyConsistencyProof(proof, first, second);
  const otherLog = caught(() => verifyConsistencyProof(proof, first, { ...second, origin: "b" }));
  assert.equal(otherLog.reason, ErrorReason.PROOF_INVALID);
  assert.deepEqual(otherLog.metadata, { expected: "a", actual: "b" });
  const otherSize = caught(() => verifyConsistencyProof(proof, { ...first, treeSize: 4n }, second));
  assert.equal(otherSize.reason, ErrorReason.PROOF_INVALID);
  assert.match(otherSize.message, /first_tree_size/);

  const inclusion = FILE.inclusion.find((i) => i.leaf_index === 2 && i.tree_size === 5);
  assert.ok(inclusion !== undefined);
  const wrongSize = caught(() =>
    verifyInclusionProof(
      create(InclusionProofSchema, { leafIndex: 2n, treeSize: 5n, auditPath: hexes(inclusion.audit_path) }),
      fromHex(inclusion.leaf_hex),
      create(CheckpointSchema, { treeSize: 6n, rootHash: fromHex(inclusion.root_hex) }),
    ),
  );
  assert.equal(wrongSize.reason, ErrorReason.PROOF_INVALID);
  assert.deepEqual(wrongSize.metadata, { expected: "6", actual: "5" });
});
