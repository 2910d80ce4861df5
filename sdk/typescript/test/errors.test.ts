// The error hierarchy and its one table (PROTOCOL.md §12.1): every reason maps to the status
// the specification names, classes carry their default reasons, and fields are copies.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import {
  CollateralSyncError,
  ERROR_DOMAIN,
  MalformedError,
  ProofError,
  reasonFromName,
  reasonName,
  STATUS_BY_REASON,
  StateError,
  StorageError,
  VerificationError,
} from "../src/errors.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { REPO_ROOT } from "./verification-fixtures.js";

const REASONS = Object.values(ErrorReason).filter((v): v is ErrorReason => typeof v === "number");

test("STATUS_BY_REASON is the table of §12.1, row for row", () => {
  const text = readFileSync(join(REPO_ROOT, "docs", "PROTOCOL.md"), "utf-8");
  const section = text.slice(text.indexOf("### 12.1"), text.indexOf("### 12.2"));
  const rows = [...section.matchAll(/^\| `([A-Z_]+)` \| (\d+) \| ([A-Z_]+) \|/gm)];
  assert.equal(rows.length, REASONS.length);
  for (const [, name, number, status] of rows) {
    const reason = reasonFromName(name ?? "");
    assert.equal(reason, Number(number), name);
    assert.equal(STATUS_BY_REASON[reason], status, name);
  }
});

test("every reason has a status and a wire name", () => {
  for (const reason of REASONS) {
    assert.ok(STATUS_BY_REASON[reason] !== undefined, String(reason));
    assert.equal(reasonFromName(reasonName(reason)), reason);
  }
  assert.equal(reasonName(ErrorReason.SIGNATURE_INVALID), "SIGNATURE_INVALID");
  assert.equal(reasonFromName("NOT_A_REASON"), ErrorReason.UNSPECIFIED);
  assert.equal(ERROR_DOMAIN, "collateral-sync.v1");
});

test("classes carry their default reasons and codes", () => {
  const cases: [CollateralSyncError, ErrorReason, string][] = [
    [new CollateralSyncError("x"), ErrorReason.UNSPECIFIED, "UNKNOWN"],
    [new MalformedError("x"), ErrorReason.MALFORMED, "INVALID_ARGUMENT"],
    [new VerificationError("x"), ErrorReason.SIGNATURE_INVALID, "UNAUTHENTICATED"],
    [new ProofError("x"), ErrorReason.PROOF_INVALID, "INVALID_ARGUMENT"],
    [new StateError("x"), ErrorReason.STATE_CONFLICT, "FAILED_PRECONDITION"],
    [new StorageError("x"), ErrorReason.STORAGE_UNAVAILABLE, "UNAVAILABLE"],
  ];
  for (const [error, reason, code] of cases) {
    assert.equal(error.reason, reason, error.name);
    assert.equal(error.code, code, error.name);
    assert.ok(error instanceof CollateralSyncError && error instanceof Error);
  }
  const proof = new ProofError("x", { reason: ErrorReason.CHECKPOINT_INCONSISTENT });
  assert.ok(proof instanceof VerificationError);
  assert.equal(proof.code, "FAILED_PRECONDITION");
  assert.equal(proof.name, "ProofError");
  assert.equal(String(proof), "ProofError(CHECKPOINT_INCONSISTENT: x)");
});

test("metadata and field violations are the error's own copies", () => {
  const metadata = { expected: "32 bytes", actual: "31 bytes" };
  const violations = { root_hash: "must be 32 bytes" };
  const cause = new Error("inner");
  const error = new MalformedError("checkpoint root_hash: expected 32 bytes, got 31", {
    metadata,
    fieldViolations: violations,
    cause,
  });
  metadata.actual = "changed";
  violations.root_hash = "changed";
  assert.deepEqual(error.metadata, { expected: "32 bytes", actual: "31 bytes" });
  assert.deepEqual(error.fieldViolations, { root_hash: "must be 32 bytes" });
  assert.equal(error.cause, cause);
  assert.deepEqual(new StateError("x").metadata, {});
  assert.deepEqual(new StateError("x").fieldViolations, {});
});
