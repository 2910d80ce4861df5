// vectors/keys.json (PROTOCOL.md §3.3, §4.1, §4.3, §15.2): keys derived from seeds, their key
// ids and signatures; and registry files that load with exactly the stated key ids, or are
// refused.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { Ed25519VerifyKey } from "../src/ed25519.js";
import { CollateralSyncError } from "../src/errors.js";
import { fromJson } from "@bufbuild/protobuf";
import { KeyRegistryChainSchema } from "../src/gen/collateral_sync/v1/keys_pb.js";
import { KeyRegistry, keyId } from "../src/registry.js";
import { SignedKeyRegistry } from "../src/signedRegistry.js";
import { fromHex, loadVectors, TestSigner, toHex } from "./verification-fixtures.js";

interface KeysFile {
  kind: string;
  vectors: {
    seed_hex: string;
    public_key_hex: string;
    public_key_base64: string;
    key_id: string;
    message_hex: string;
    signature_hex: string;
  }[];
  registries: {
    id: string;
    clause: string;
    description: string;
    registry: unknown;
    expected: { valid: true; key_ids: string[] } | { valid: false };
  }[];
  chains: {
    id: string;
    description: string;
    chain: unknown;
    root_sha256: string | null;
    expected: { valid: true; version: number; key_ids: string[] } | { valid: false };
  }[];
}

const FILE = loadVectors<KeysFile>("keys.json");

test("keys.json declares its kind and holds vectors", () => {
  assert.equal(FILE.kind, "keys");
  assert.ok(FILE.vectors.length > 0 && FILE.registries.length > 0);
});

for (const vector of FILE.vectors) {
  test(`key from seed ${vector.seed_hex.slice(0, 8)}…: public key, key id, signature`, () => {
    const signer = TestSigner.fromHex(vector.seed_hex);
    const message = fromHex(vector.message_hex);
    const signature = fromHex(vector.signature_hex);
    assert.equal(toHex(signer.publicKey), vector.public_key_hex);
    assert.equal(Buffer.from(signer.publicKey).toString("base64"), vector.public_key_base64);
    assert.equal(keyId(signer.publicKey), vector.key_id);
    assert.equal(toHex(signer.sign(message)), vector.signature_hex);
    const verifier = new Ed25519VerifyKey(fromHex(vector.public_key_hex));
    assert.equal(verifier.verify(message, signature), true);
    const altered = Uint8Array.from(message);
    altered[0] = (altered[0] ?? 0) ^ 1;
    assert.equal(verifier.verify(altered, signature), false);
  });
}

const tmp = mkdtempSync(join(tmpdir(), "collateral-sync-keys-"));
process.on("exit", () => rmSync(tmp, { recursive: true, force: true }));

for (const vector of FILE.registries) {
  test(`registry ${vector.id} (${vector.clause}): ${vector.expected.valid ? "loads" : "is refused"}`, () => {
    const text = JSON.stringify(vector.registry);
    const path = join(tmp, `${vector.id}.json`);
    writeFileSync(path, text, "utf-8");
    if (vector.expected.valid) {
      assert.deepEqual(KeyRegistry.fromJson(text).keyIds(), vector.expected.key_ids);
      const loaded = KeyRegistry.load(path);
      assert.deepEqual([...loaded].map((k) => k.keyId), vector.expected.key_ids);
      return;
    }
    // A local refusal: no wire status, but always one of the SDK's errors.
    assert.throws(() => KeyRegistry.fromJson(text), CollateralSyncError);
    assert.throws(() => KeyRegistry.load(path), CollateralSyncError);
  });
}

test("a refused registry differs from a loadable one in one thing only", () => {
  const duplicate = FILE.registries.find((v) => v.id === "duplicate-key-id");
  assert.ok(duplicate !== undefined);
  const keys = (duplicate.registry as { keys: unknown[] }).keys;
  assert.deepEqual(keys[0], keys[keys.length - 1]);
  assert.equal(KeyRegistry.fromJson(JSON.stringify({ keys: keys.slice(0, -1) })).size, 2);
});

test("a registry survives toJson and fromJson", () => {
  const camel = FILE.registries.find((v) => v.id === "camel-case");
  assert.ok(camel !== undefined);
  const registry = KeyRegistry.fromJson(JSON.stringify(camel.registry));
  assert.deepEqual(JSON.parse(registry.toJson()), camel.registry);
  const path = join(tmp, "saved.json");
  registry.save(path);
  assert.deepEqual(KeyRegistry.load(path).keyIds(), registry.keyIds());
});

// Signed key registries (§4.6): the chain verifies with the last version's keys in force, or is refused.
for (const vector of FILE.chains) {
  test(`signed registry ${vector.id}: ${vector.expected.valid ? "in force" : "refused"}`, () => {
    const chain = fromJson(KeyRegistryChainSchema, vector.chain as never);
    const options = { rootSha256: vector.root_sha256 };
    if (vector.expected.valid) {
      const signed = SignedKeyRegistry.verify(chain, options);
      assert.equal(signed.version, vector.expected.version);
      assert.deepEqual(signed.registry().keyIds(), vector.expected.key_ids);
      // The same chain again is no change; a shorter one is a rollback.
      assert.equal(signed.update(chain).version, vector.expected.version);
      if (chain.versions.length > 1) {
        const shorter = { ...chain, versions: chain.versions.slice(0, -1) };
        assert.throws(() => signed.update(shorter), CollateralSyncError);
      }
      return;
    }
    assert.throws(() => SignedKeyRegistry.verify(chain, options), CollateralSyncError);
  });
}
