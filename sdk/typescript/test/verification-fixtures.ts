// Shared helpers of the verification-core tests: where the vectors are, hex, and Ed25519
// signing from a seed (node:crypto), so tests can build envelopes the vectors do not hold.

import { createPrivateKey, createPublicKey, sign, type KeyObject } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { create, toBinary } from "@bufbuild/protobuf";
import { type Envelope, EnvelopeSchema, SignatureSchema } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import { CollateralSyncError } from "../src/errors.js";
import { keyId } from "../src/registry.js";
import { pae } from "../src/signing.js";

/** The repository root: the first directory above this file that holds vectors/. */
export const REPO_ROOT: string = (() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, "vectors", "statements.json"))) return dir;
    const parent = dirname(dir);
    if (parent === dir) throw new Error("vectors/ not found above the test directory");
    dir = parent;
  }
})();

/** A vector file, parsed. JSON is untyped; each test file declares the shape it reads. */
export function loadVectors<T>(name: string): T {
  return JSON.parse(readFileSync(join(REPO_ROOT, "vectors", name), "utf-8")) as T;
}

export function fromHex(text: string): Uint8Array {
  if (text.length % 2 !== 0 || !/^[0-9a-f]*$/.test(text)) throw new Error(`not lowercase hex: ${text}`);
  return new Uint8Array(Buffer.from(text, "hex"));
}

export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("hex");
}

// PKCS#8 DER prefix of an Ed25519 private key (RFC 8410); the 32-byte seed follows.
const PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");

/** An Ed25519 key derived from a 32-byte seed. */
export class TestSigner {
  readonly publicKey: Uint8Array;
  readonly keyId: string;
  private readonly key: KeyObject;

  constructor(seed: Uint8Array) {
    this.key = createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, seed]), format: "der", type: "pkcs8" });
    const spki = createPublicKey(this.key).export({ format: "der", type: "spki" });
    this.publicKey = new Uint8Array(spki.subarray(spki.length - 32));
    this.keyId = keyId(this.publicKey);
  }

  static fromHex(seedHex: string): TestSigner {
    return new TestSigner(fromHex(seedHex));
  }

  sign(data: Uint8Array): Uint8Array {
    return new Uint8Array(sign(null, data, this.key));
  }
}

/** An envelope of `payload` signed over PAE by each signer in order. */
export function signedEnvelope(payloadType: string, payload: Uint8Array, signers: readonly TestSigner[]): Envelope {
  const signed = pae(payloadType, payload);
  return create(EnvelopeSchema, {
    payloadType,
    payload,
    signatures: signers.map((s) => create(SignatureSchema, { keyId: s.keyId, sig: s.sign(signed) })),
  });
}

/** Serialise an envelope (for equality checks with envelope_hex). */
export function envelopeBytes(envelope: Envelope): Uint8Array {
  return toBinary(EnvelopeSchema, envelope);
}

/** What a call threw, as a CollateralSyncError; fails if it returned or threw anything else. */
export function caught(call: () => unknown): CollateralSyncError {
  try {
    call();
  } catch (err) {
    if (err instanceof CollateralSyncError) return err;
    throw new Error(`expected a CollateralSyncError, got ${String(err)}`);
  }
  throw new Error("expected a CollateralSyncError, got no error");
}
