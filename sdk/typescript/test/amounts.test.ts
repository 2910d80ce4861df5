// vectors/amounts.json (PROTOCOL.md §2, §15.2): every canonical text parses and formats back
// to itself, every non-canonical text is refused with INVALID_AMOUNT, formatting gives the
// canonical text, and unformattable values are refused rather than rounded.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Amount, amountFromProto, amountToProto, formatAmount, parseAmount } from "../src/amounts.js";
import { create } from "@bufbuild/protobuf";
import { MalformedError } from "../src/errors.js";
import { DecimalSchema } from "../src/gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { caught, loadVectors } from "./verification-fixtures.js";

interface Refusal {
  valid: false;
  reason: string;
  grpc_status: string;
}

interface AmountsFile {
  kind: string;
  canonical: string[];
  non_canonical: { text: string; why: string; expected: Refusal }[];
  formatting: { value: string; canonical: string }[];
  unformattable: { value: string; why: string; expected: Refusal }[];
}

const FILE = loadVectors<AmountsFile>("amounts.json");

test("amounts.json declares its kind and holds vectors", () => {
  assert.equal(FILE.kind, "amounts");
  assert.ok(FILE.canonical.length > 0 && FILE.non_canonical.length > 0);
  assert.ok(FILE.formatting.length > 0 && FILE.unformattable.length > 0);
});

for (const text of FILE.canonical) {
  test(`canonical ${JSON.stringify(text)} parses and formats back`, () => {
    assert.equal(formatAmount(parseAmount(text)), text);
    assert.equal(parseAmount(text).toString(), text);
  });
}

for (const vector of FILE.non_canonical) {
  test(`non-canonical ${JSON.stringify(vector.text)} (${vector.why}) is refused`, () => {
    const error = caught(() => parseAmount(vector.text, { field: "quantity" }));
    assert.ok(error instanceof MalformedError);
    assert.equal(error.reasonName, vector.expected.reason);
    assert.equal(error.code, vector.expected.grpc_status);
    assert.equal(error.metadata["field"], "quantity");
    assert.equal(error.metadata["expected"], "canonical decimal");
    assert.equal(error.metadata["actual"], vector.text);
    assert.deepEqual(error.fieldViolations, { quantity: "not a canonical decimal" });
  });
}

for (const vector of FILE.formatting) {
  test(`formatting ${vector.value} gives ${vector.canonical}`, () => {
    const value = Amount.fromText(vector.value);
    assert.equal(formatAmount(value), vector.canonical);
    assert.ok(value.equals(parseAmount(vector.canonical)));
  });
}

for (const vector of FILE.unformattable) {
  test(`unformattable ${vector.value} (${vector.why}) is refused`, () => {
    const error = caught(() => formatAmount(Amount.fromText(vector.value)));
    assert.equal(error.reason, ErrorReason.INVALID_AMOUNT);
    assert.equal(error.reasonName, vector.expected.reason);
    assert.equal(error.code, vector.expected.grpc_status);
    assert.ok(error.metadata["expected"]?.startsWith("<= "));
  });
}

test("Amount arithmetic is exact", () => {
  const a = parseAmount("0.1");
  const b = parseAmount("0.2");
  assert.equal(formatAmount(a.add(b)), "0.3");
  assert.equal(formatAmount(a.subtract(b)), "-0.1");
  assert.equal(formatAmount(parseAmount("1.5").multiply(parseAmount("-2.25"))), "-3.375");
  assert.equal(a.compare(b), -1);
  assert.equal(parseAmount("2").compare(Amount.fromText("2.000")), 0);
  assert.equal(formatAmount(parseAmount("1.005").roundDown(2)), "1");
  assert.equal(formatAmount(parseAmount("1.005").roundUp(2)), "1.01");
  assert.equal(formatAmount(parseAmount("-1.005").roundUp(2)), "-1.01");
  assert.equal(formatAmount(parseAmount("-1.005").roundDown(2)), "-1");
});

test("Decimal messages round-trip through canonical text", () => {
  assert.equal(amountToProto("500000.25").value, "500000.25");
  assert.equal(amountToProto(10n ** 59n).value, "1" + "0".repeat(59));
  assert.equal(amountToProto(Amount.fromText("-2.50")).value, "-2.5");
  assert.equal(formatAmount(amountFromProto(amountToProto("0.000000000000000001"))), "0.000000000000000001");
  // §2.1: a present Decimal with an empty value is INVALID_AMOUNT.
  const empty = caught(() => amountFromProto(create(DecimalSchema, { value: "" }), { field: "price" }));
  assert.equal(empty.reason, ErrorReason.INVALID_AMOUNT);
  assert.equal(empty.metadata["field"], "price");
});
