// vectors/position_tree.json (PROTOCOL.md §10.3, §15.2): every account's leaf bytes and leaf
// hash, and every tree's root, from the accounts in the order given; every invalid input is
// refused with its reason.

import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { DecimalSchema, PositionSchema, type Position } from "../src/gen/collateral_sync/v1/common_pb.js";
import { merkleRoot } from "../src/merkle.js";
import {
  POSITION_LEAF_PREFIX,
  positionLeaf,
  positionTreeLeaves,
  positionTreeRoot,
  type PositionValues,
} from "../src/positionTree.js";
import { caught, fromHex, loadVectors, toHex } from "./verification-fixtures.js";

interface Refusal {
  valid: false;
  reason: string;
  grpc_status: string;
}

interface PositionJson {
  asset_id: string;
  quantity: string | null;
  locked_quantity: string | null;
  pledged_quantity: string | null;
}

interface AccountJson {
  account_id: string;
  positions: PositionJson[];
}

interface PositionTreeFile {
  kind: string;
  leaf_prefix_hex: string;
  trees: {
    id: string;
    accounts: AccountJson[];
    leaves: { account_id: string; leaf_hex: string; leaf_hash_hex: string }[];
    account_count: number;
    root_hex: string;
  }[];
  invalid: { id: string; clause: string; accounts: AccountJson[]; expected: Refusal }[];
}

const FILE = loadVectors<PositionTreeFile>("position_tree.json");

/** Positions as Position messages; a null amount is an absent Decimal. */
function messages(account: AccountJson): Position[] {
  return account.positions.map((p) => {
    const decimal = (value: string | null) => (value === null ? undefined : create(DecimalSchema, { value }));
    return create(PositionSchema, {
      assetId: p.asset_id,
      quantity: decimal(p.quantity),
      lockedQuantity: decimal(p.locked_quantity),
      pledgedQuantity: decimal(p.pledged_quantity),
    });
  });
}

/** Positions as plain values (only for vectors where every amount is present). */
function values(account: AccountJson): PositionValues[] {
  return account.positions.map((p) => {
    assert.ok(p.quantity !== null && p.locked_quantity !== null && p.pledged_quantity !== null);
    return {
      assetId: p.asset_id,
      quantity: p.quantity,
      lockedQuantity: p.locked_quantity,
      pledgedQuantity: p.pledged_quantity,
    };
  });
}

test("position_tree.json declares its kind and the leaf prefix", () => {
  assert.equal(FILE.kind, "position_tree");
  assert.equal(toHex(POSITION_LEAF_PREFIX), FILE.leaf_prefix_hex);
  assert.equal(POSITION_LEAF_PREFIX.length, 33);
  assert.ok(FILE.trees.length > 0 && FILE.invalid.length > 0);
});

for (const vector of FILE.trees) {
  test(`position tree ${vector.id}`, () => {
    assert.equal(vector.accounts.length, vector.account_count);
    for (const account of vector.accounts) {
      const expected = vector.leaves.find((leaf) => leaf.account_id === account.account_id);
      assert.ok(expected !== undefined);
      assert.equal(toHex(positionLeaf(account.account_id, values(account))), expected.leaf_hex);
      assert.equal(toHex(positionLeaf(account.account_id, messages(account))), expected.leaf_hex);
    }
    const pairs = vector.accounts.map((a) => [a.account_id, messages(a)] as const);
    const leaves = positionTreeLeaves(pairs);
    assert.deepEqual(
      leaves.map((l) => [l.accountId, toHex(l.leaf), toHex(l.leafHash)]),
      vector.leaves.map((l) => [l.account_id, l.leaf_hex, l.leaf_hash_hex]),
    );
    assert.equal(toHex(positionTreeRoot(pairs)), vector.root_hex);
    assert.equal(toHex(positionTreeRoot(new Map(pairs))), vector.root_hex);
    assert.equal(toHex(merkleRoot(vector.leaves.map((l) => fromHex(l.leaf_hash_hex)))), vector.root_hex);
  });
}

for (const vector of FILE.invalid) {
  test(`invalid position tree ${vector.id} (${vector.clause})`, () => {
    const pairs = vector.accounts.map((a) => [a.account_id, messages(a)] as const);
    const err = caught(() => positionTreeRoot(pairs));
    assert.equal(err.reasonName, vector.expected.reason, err.message);
    assert.equal(err.code, vector.expected.grpc_status);
  });
}
