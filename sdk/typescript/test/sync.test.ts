// vectors/sync.json (PROTOCOL.md §6.3–§6.5, §15.2): every entry hash reproduces and its
// invalid inputs are refused; every chain verifies with the first and last facts given, every
// invalid chain is refused with its reason; receiving checks fit a chain to a stored log
// (duplicates, SEQUENCE_GAP, EQUIVOCATION); signed batches verify as a whole or fail with
// their reason.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";
import { create, fromBinary, toBinary, toJson } from "@bufbuild/protobuf";
import { EnvelopeSchema, SignatureSchema, type Envelope } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import {
  PositionUpdateSchema,
  SyncBatchSchema,
  SyncDirection,
} from "../src/gen/collateral_sync/v1/position_sync_pb.js";
import { CollateralSyncError } from "../src/errors.js";
import { KeyRegistry } from "../src/registry.js";
import { verifySyncBatch } from "../src/sync/batch.js";
import {
  ENTRY_HASH_DOMAIN,
  EMPTY_CHAIN_HEAD,
  ZERO_HASH,
  entryHash,
  fitChain,
  verifyChain,
  type ChainEntry,
  type ChainHead,
} from "../src/syncChain.js";
import { caught, fromHex, loadVectors, toHex } from "./verification-fixtures.js";

interface Refusal {
  valid: false;
  reason: string;
  grpc_status: string;
  metadata?: Record<string, string>;
}

interface EntryJson {
  sequence: number;
  prev_entry_hash_hex: string;
  update_hex: string;
  entry_hash_hex: string;
  update_json?: unknown;
}

interface ChainVector {
  id: string;
  direction: number;
  direction_name: string;
  entries: EntryJson[];
  first_sequence: number;
  first_prev_hash_hex: string;
  last_sequence: number;
  last_entry_hash_hex: string;
}

interface Received {
  valid: true;
  new_sequences: number[];
  head_sequence: number;
  head_entry_hash_hex: string;
}

interface BatchFacts {
  valid: true;
  first_sequence: number;
  first_prev_hash_hex: string;
  last_sequence: number;
  last_entry_hash_hex: string;
  entry_hashes: string[];
}

interface SyncFile {
  kind: string;
  entry_hash_prefix_hex: string;
  zero_hash_hex: string;
  entry_hash: {
    id: string;
    direction: number;
    sequence: number;
    prev_entry_hash_hex: string;
    update_hex: string;
    hash_input_hex: string;
    entry_hash_hex: string;
  }[];
  invalid_entry_hash: {
    id: string;
    direction: number;
    sequence: number;
    prev_entry_hash_hex: string;
    update_hex: string;
    expected: Refusal;
  }[];
  chains: ChainVector[];
  invalid_chains: { id: string; direction: number; entries: EntryJson[]; expected: Refusal }[];
  receiving: {
    id: string;
    direction: number;
    receiver_log: { entries_of: string | null; sequence: number; entry_hash_hex: string };
    entries: EntryJson[];
    expected: Received | Refusal;
  }[];
  max_skew_seconds: number;
  registry: unknown;
  batches: {
    id: string;
    sender_party_id: string;
    receiver_party_id: string;
    direction: number;
    now: string;
    max_entries: number;
    envelope: { payload_type: string; payload_hex: string; signatures: { key_id: string; sig_hex: string }[] };
    envelope_hex: string;
    expected: BatchFacts | Refusal;
  }[];
}

const FILE = loadVectors<SyncFile>("sync.json");

function entries(json: readonly EntryJson[]): ChainEntry[] {
  return json.map((e) => ({
    sequence: BigInt(e.sequence),
    prevEntryHash: fromHex(e.prev_entry_hash_hex),
    update: fromHex(e.update_hex),
    entryHash: fromHex(e.entry_hash_hex),
  }));
}

function assertRefused(err: CollateralSyncError, expected: Refusal): void {
  assert.equal(err.reasonName, expected.reason, err.message);
  assert.equal(err.code, expected.grpc_status);
  for (const [key, value] of Object.entries(expected.metadata ?? {})) {
    assert.equal(err.metadata[key], value, `metadata ${key}`);
  }
}

test("sync.json declares its kind, prefix and zero hash", () => {
  assert.equal(FILE.kind, "sync");
  assert.equal(toHex(ENTRY_HASH_DOMAIN) + "00", FILE.entry_hash_prefix_hex);
  assert.equal(ENTRY_HASH_DOMAIN.length, 29);
  assert.equal(toHex(ZERO_HASH), FILE.zero_hash_hex);
  assert.deepEqual(EMPTY_CHAIN_HEAD, { sequence: 0n, entryHash: ZERO_HASH });
  assert.deepEqual(new Set(FILE.chains.map((c) => c.direction)), new Set([1, 2]));
});

for (const vector of FILE.entry_hash) {
  test(`entry hash ${vector.id}`, () => {
    const sequence = BigInt(vector.sequence);
    assert.ok(Number.isSafeInteger(vector.sequence) || BigInt(Number(sequence)) === sequence);
    const input = fromHex(vector.hash_input_hex);
    // The input is prefix || u8(direction) || u64be(sequence) || prev || update.
    assert.equal(toHex(input.subarray(0, 30)), FILE.entry_hash_prefix_hex);
    assert.equal(input[30], vector.direction);
    assert.equal(new DataView(input.buffer, input.byteOffset + 31, 8).getBigUint64(0, false), sequence);
    assert.equal(toHex(input.subarray(39)), vector.prev_entry_hash_hex + vector.update_hex);
    assert.equal(createHash("sha256").update(input).digest("hex"), vector.entry_hash_hex);
    const hash = entryHash(vector.direction, sequence, fromHex(vector.prev_entry_hash_hex), fromHex(vector.update_hex));
    assert.equal(toHex(hash), vector.entry_hash_hex);
  });
}

for (const vector of FILE.invalid_entry_hash) {
  test(`invalid entry hash input ${vector.id}`, () => {
    const err = caught(() =>
      entryHash(vector.direction, BigInt(vector.sequence), fromHex(vector.prev_entry_hash_hex), fromHex(vector.update_hex)),
    );
    assertRefused(err, vector.expected);
  });
}

for (const vector of FILE.chains) {
  test(`chain ${vector.id}`, () => {
    assert.equal(SyncDirection[vector.direction], vector.direction_name.replace("SYNC_DIRECTION_", ""));
    const given = entries(vector.entries);
    for (const [index, entry] of given.entries()) {
      const json = vector.entries[index] as EntryJson;
      assert.equal(toHex(entryHash(vector.direction, entry.sequence, entry.prevEntryHash, entry.update)), json.entry_hash_hex);
      // The update bytes are a PositionUpdate whose proto3 JSON is the informative update_json.
      assert.deepEqual(toJson(PositionUpdateSchema, fromBinary(PositionUpdateSchema, entry.update)), json.update_json);
    }
    const chain = verifyChain(vector.direction, given);
    assert.equal(chain.direction, vector.direction);
    assert.equal(chain.firstSequence, BigInt(vector.first_sequence));
    assert.equal(toHex(chain.firstPrevHash), vector.first_prev_hash_hex);
    assert.equal(chain.lastSequence, BigInt(vector.last_sequence));
    assert.equal(toHex(chain.lastEntryHash), vector.last_entry_hash_hex);
    assert.deepEqual(chain.entryHashes.map(toHex), vector.entries.map((e) => e.entry_hash_hex));
  });
}

for (const vector of FILE.invalid_chains) {
  test(`invalid chain ${vector.id}`, () => {
    assertRefused(caught(() => verifyChain(vector.direction, entries(vector.entries))), vector.expected);
  });
}

for (const vector of FILE.receiving) {
  test(`receiving ${vector.id}`, () => {
    const log = vector.receiver_log;
    const stored = new Map<bigint, Uint8Array>();
    if (log.entries_of !== null) {
      const chain = FILE.chains.find((c) => c.id === log.entries_of);
      assert.ok(chain !== undefined, `chain ${log.entries_of}`);
      for (const entry of entries(chain.entries).filter((e) => e.sequence <= BigInt(log.sequence))) {
        stored.set(entry.sequence, entry.entryHash);
      }
    }
    const head: ChainHead = { sequence: BigInt(log.sequence), entryHash: fromHex(log.entry_hash_hex) };
    assert.deepEqual(stored.get(head.sequence) ?? ZERO_HASH, head.entryHash);
    const chain = verifyChain(vector.direction, entries(vector.entries));
    const expected = vector.expected;
    if (expected.valid) {
      const fit = fitChain(chain, head, (sequence) => stored.get(sequence));
      const fresh: number[] = [];
      for (let s = fit.firstNewSequence; s <= chain.lastSequence; s++) fresh.push(Number(s));
      assert.deepEqual(fresh, expected.new_sequences);
      assert.equal(fit.head.sequence, BigInt(expected.head_sequence));
      assert.equal(toHex(fit.head.entryHash), expected.head_entry_hash_hex);
    } else {
      assertRefused(
        caught(() => fitChain(chain, head, (sequence) => stored.get(sequence))),
        expected,
      );
    }
  });
}

test("fitChain asks for the stored hash it cannot know from the head", () => {
  const stale = FILE.receiving.find((v) => v.id === "duplicates-only");
  assert.ok(stale !== undefined);
  const chain = verifyChain(stale.direction, entries(stale.entries));
  const head = { sequence: BigInt(stale.receiver_log.sequence), entryHash: fromHex(stale.receiver_log.entry_hash_hex) };
  assert.equal(caught(() => fitChain(chain, head)).reasonName, "STATE_CONFLICT");
});

function envelopeOf(json: SyncFile["batches"][number]["envelope"]): Envelope {
  return create(EnvelopeSchema, {
    payloadType: json.payload_type,
    payload: fromHex(json.payload_hex),
    signatures: json.signatures.map((s) => create(SignatureSchema, { keyId: s.key_id, sig: fromHex(s.sig_hex) })),
  });
}

const registry = KeyRegistry.fromJson(JSON.stringify(FILE.registry));

for (const vector of FILE.batches) {
  test(`signed batch ${vector.id}`, () => {
    const envelope = envelopeOf(vector.envelope);
    assert.equal(toHex(toBinary(EnvelopeSchema, envelope)), vector.envelope_hex);
    const verify = () =>
      verifySyncBatch(envelope, registry, {
        receiver: vector.receiver_party_id,
        sender: vector.sender_party_id,
        direction: vector.direction as SyncDirection,
        now: new Date(vector.now),
        maxEntries: vector.max_entries,
        maxSkewSeconds: FILE.max_skew_seconds,
      });
    const expected = vector.expected;
    if (!expected.valid) {
      assertRefused(caught(verify), expected);
      return;
    }
    const batch = fromBinary(SyncBatchSchema, envelope.payload);
    // The whole verification, and the chain checks alone, give the same facts.
    for (const chain of [verify().chain, verifyChain(batch.direction, batch.entries)]) {
      assert.equal(chain.firstSequence, BigInt(expected.first_sequence));
      assert.equal(toHex(chain.firstPrevHash), expected.first_prev_hash_hex);
      assert.equal(chain.lastSequence, BigInt(expected.last_sequence));
      assert.equal(toHex(chain.lastEntryHash), expected.last_entry_hash_hex);
      assert.deepEqual(chain.entryHashes.map(toHex), expected.entry_hashes);
    }
  });
}
