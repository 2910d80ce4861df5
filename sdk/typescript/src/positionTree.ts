// Position leaves and the positions root of a reconciliation statement (PROTOCOL.md §10.3).
//
// A party's view at a cut-off is one leaf per account, accounts sorted bytewise by the UTF-8
// of account_id, hashed into an RFC 9162 tree:
//   position_leaf = "collateral-sync/v1/position-leaf" || 0x00 || LP(account_id)
//                   || u32be(number of positions)
//                   || for each position, sorted bytewise by the UTF-8 of asset_id:
//                        LP(asset_id) || LP(quantity) || LP(locked_quantity) || LP(pledged_quantity)
// with LP(x) = u32be(byte length) || UTF-8 bytes, and the amounts in canonical decimal text.
// Ids are compared as UTF-8 bytes, never as JavaScript strings: UTF-16 code-unit order differs
// for characters beyond U+FFFF. Amounts are checked as exact decimals (./amounts.ts), never
// floats. Mirrors position_leaf and the root of sdk/collateral_sync/reconciliation/_tree.py.

import type { Position } from "./gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import { parseAmount } from "./amounts.js";
import { MalformedError } from "./errors.js";
import { leafHash, merkleRoot } from "./merkle.js";

/** The leaf prefix: 32 ASCII bytes and a zero byte. */
export const POSITION_LEAF_PREFIX: Uint8Array = new TextEncoder().encode("collateral-sync/v1/position-leaf\u0000");

/** One position as canonical decimal text. */
export interface PositionValues {
  readonly assetId: string;
  readonly quantity: string;
  readonly lockedQuantity: string;
  readonly pledgedQuantity: string;
}

/** A position: plain values, or a Position message (whose Decimals must be present). */
export type PositionInput = PositionValues | Position;

/** Accounts of a view: pairs of account id and positions (a Map is one), in any order. */
export type AccountsInput = Iterable<readonly [string, readonly PositionInput[]]>;

/** One leaf of the tree, in tree order. */
export interface PositionTreeLeaf {
  readonly accountId: string;
  readonly leaf: Uint8Array;
  readonly leafHash: Uint8Array;
}

const U32_MAX = 0xffffffff;
const AMOUNT_FIELDS = [
  ["quantity", "quantity"],
  ["lockedQuantity", "locked_quantity"],
  ["pledgedQuantity", "pledged_quantity"],
] as const;
// A high surrogate not followed by a low one, or a low one not preceded by a high one.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const encoder = new TextEncoder();

function malformed(what: string, expected: string, actual: string): MalformedError {
  return new MalformedError(`${what}: expected ${expected}, got ${actual}`, {
    metadata: { expected, actual: actual.slice(0, 120) },
  });
}

/** UTF-8 bytes of `text`; refuses text that has none (a lone surrogate). */
function utf8(text: string, what: string): Uint8Array {
  if (LONE_SURROGATE.test(text)) throw malformed(what, "valid UTF-8 text", JSON.stringify(text));
  return encoder.encode(text);
}

/** Bytewise order of UTF-8, which is code point order (not UTF-16 code unit order). */
function compareBytes(a: Uint8Array, b: Uint8Array): number {
  return Buffer.compare(a, b);
}

function isMessage(position: PositionInput): position is Position {
  return "$typeName" in position;
}

function valuesOf(accountId: string, position: PositionInput): PositionValues {
  if (!isMessage(position)) return position;
  if (position.accountId !== "" && position.accountId !== accountId) {
    throw malformed("position.account_id", accountId, position.accountId);
  }
  const text = (field: "quantity" | "lockedQuantity" | "pledgedQuantity", name: string): string => {
    const decimal = position[field];
    if (decimal === undefined) throw malformed(`position ${JSON.stringify(position.assetId)} ${name}`, "a Decimal", "absent");
    return decimal.value;
  };
  return {
    assetId: position.assetId,
    quantity: text("quantity", "quantity"),
    lockedQuantity: text("lockedQuantity", "locked_quantity"),
    pledgedQuantity: text("pledgedQuantity", "pledged_quantity"),
  };
}

function checkAmount(accountId: string, assetId: string, name: string, text: string): void {
  const field = `positions[${accountId}][${assetId}].${name}`;
  if (parseAmount(text, { field }).isNegative()) {
    throw new MalformedError(`${field}: expected a non-negative quantity, got ${text}`, {
      reason: ErrorReason.INVALID_AMOUNT,
      metadata: { field, expected: ">= 0", actual: text },
      fieldViolations: { [field]: "negative quantity" },
    });
  }
}

function lengthPrefixed(data: Uint8Array): Uint8Array[] {
  if (data.length > U32_MAX) throw malformed("length-prefixed field", `<= ${U32_MAX} bytes`, String(data.length));
  return [u32(data.length), data];
}

function u32(value: number): Uint8Array {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value, false);
  return bytes;
}

/**
 * The leaf bytes of one account (§10.3). Positions come in any order and are sorted bytewise
 * by asset id. Refuses (MALFORMED) an empty account or asset id, a duplicate asset, an absent
 * Decimal and an id with no UTF-8 encoding; (INVALID_AMOUNT) a non-canonical or negative amount.
 */
export function positionLeaf(accountId: string, positions: readonly PositionInput[]): Uint8Array {
  const values = positions.map((position) => valuesOf(accountId, position));
  const keyed = values.map((value) => ({ value, key: utf8(value.assetId, `account ${JSON.stringify(accountId)} asset_id`) }));
  keyed.sort((a, b) => compareBytes(a.key, b.key));
  for (let i = 1; i < keyed.length; i++) {
    const before = keyed[i - 1] as (typeof keyed)[number];
    const after = keyed[i] as (typeof keyed)[number];
    if (compareBytes(before.key, after.key) === 0) {
      throw malformed(`account ${JSON.stringify(accountId)} positions`, "distinct asset ids", JSON.stringify(after.value.assetId));
    }
  }
  if (accountId === "") throw malformed("account_id", "a non-empty string", '""');
  for (const { value } of keyed) {
    if (value.assetId === "") throw malformed(`account ${JSON.stringify(accountId)} asset_id`, "a non-empty string", '""');
    for (const [field, name] of AMOUNT_FIELDS) checkAmount(accountId, value.assetId, name, value[field]);
  }
  const parts: Uint8Array[] = [POSITION_LEAF_PREFIX, ...lengthPrefixed(utf8(accountId, "account_id")), u32(keyed.length)];
  for (const { value, key } of keyed) {
    parts.push(...lengthPrefixed(key));
    for (const [field] of AMOUNT_FIELDS) parts.push(...lengthPrefixed(encoder.encode(value[field])));
  }
  return new Uint8Array(Buffer.concat(parts));
}

/**
 * The leaves of a view in tree order: accounts sorted bytewise by the UTF-8 of their ids.
 * Refuses a duplicate account (MALFORMED) and whatever positionLeaf refuses.
 */
export function positionTreeLeaves(accounts: AccountsInput): PositionTreeLeaf[] {
  const keyed: { accountId: string; key: Uint8Array; leaf: Uint8Array }[] = [];
  for (const [accountId, positions] of accounts) {
    const leaf = positionLeaf(accountId, positions);
    keyed.push({ accountId, key: utf8(accountId, "account_id"), leaf });
  }
  keyed.sort((a, b) => compareBytes(a.key, b.key));
  for (let i = 1; i < keyed.length; i++) {
    const before = keyed[i - 1] as (typeof keyed)[number];
    const after = keyed[i] as (typeof keyed)[number];
    if (compareBytes(before.key, after.key) === 0) {
      throw malformed("accounts", "distinct account ids", JSON.stringify(after.accountId));
    }
  }
  return keyed.map(({ accountId, leaf }) => ({ accountId, leaf, leafHash: leafHash(leaf) }));
}

/** The positions root (§10.3): the RFC 9162 tree head over the leaves; SHA-256("") for none. */
export function positionTreeRoot(accounts: AccountsInput): Uint8Array {
  return merkleRoot(positionTreeLeaves(accounts).map((leaf) => leaf.leafHash));
}
