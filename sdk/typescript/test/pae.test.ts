// vectors/pae.json (PROTOCOL.md §3.2, §15.2): PAE(payload_type, payload) equals pae_hex.

import assert from "node:assert/strict";
import { test } from "node:test";
import { pae } from "../src/signing.js";
import { fromHex, loadVectors, toHex } from "./verification-fixtures.js";

interface PaeFile {
  kind: string;
  vectors: { description: string; payload_type: string; payload_hex: string; pae_hex: string }[];
}

const FILE = loadVectors<PaeFile>("pae.json");

test("pae.json declares its kind and holds vectors", () => {
  assert.equal(FILE.kind, "pae");
  assert.ok(FILE.vectors.length > 0);
});

for (const vector of FILE.vectors) {
  test(`PAE: ${vector.description}`, () => {
    assert.equal(toHex(pae(vector.payload_type, fromHex(vector.payload_hex))), vector.pae_hex);
  });
}
