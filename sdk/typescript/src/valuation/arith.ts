// Exact arithmetic and errors shared by the valuation modules (PROTOCOL.md §2.1–§2.3).
//
// Amounts are bigint-exact (amounts.ts): sums and products never round. The only roundings
// are the two deliberate ones of §2.3 — RD (down) and RU (up) at the policy's scale — and a
// quotient rounded down once from its exact rational value. Every figure they are applied to
// is non-negative, so "down" and "toward zero" agree. Mirrors
// sdk/collateral_sync/valuation/_arith.py.

import type { Duration } from "@bufbuild/protobuf/wkt";
import { Amount, formatAmount, MAX_FRACTION_DIGITS, parseAmount } from "../amounts.js";
import { MalformedError } from "../errors.js";
import type { Decimal } from "../gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "../gen/collateral_sync/v1/errors_pb.js";
import { NS_PER_S } from "../time.js";

export const ZERO = Amount.ZERO;
export const ONE = Amount.fromBigInt(1n);

/** A refusal naming `field`: metadata field/expected/actual and a field violation (§12.2). */
export function malformed(
  field: string,
  expected: string,
  actual: string,
  what = "",
  reason: ErrorReason = ErrorReason.MALFORMED,
): MalformedError {
  const subject = what ? `${what} ${field}` : field;
  return new MalformedError(`${subject}: expected ${expected}, got ${actual}`, {
    reason,
    metadata: { field, expected, actual },
    fieldViolations: { [field]: `must be ${expected}` },
  });
}

/** A required Decimal: absent is MALFORMED, present but not canonical INVALID_AMOUNT (§2.1). */
export function requiredAmount(value: Decimal | undefined, field: string, what: string): Amount {
  if (value === undefined) throw malformed(field, "a Decimal", "absent", what);
  return parseAmount(value.value, { field });
}

/** Refuse a negative amount with INVALID_AMOUNT (§2.2). */
export function nonNegative(value: Amount, field: string, what: string): Amount {
  if (value.isNegative()) {
    throw malformed(field, ">= 0", formatAmount(value), what, ErrorReason.INVALID_AMOUNT);
  }
  return value;
}

/** A required non-negative Decimal. */
export function requiredNonNegative(value: Decimal | undefined, field: string, what: string): Amount {
  return nonNegative(requiredAmount(value, field, what), field, what);
}

/** An amount the caller passes in (exposure, proceeds…): one the wire could carry. */
export function checkedInput(value: Amount, field: string, options: { nonNegative?: boolean } = {}): Amount {
  formatAmount(value, { field }); // at most 18 fraction and 60 integer digits
  if (options.nonNegative ?? true) nonNegative(value, field, "");
  return value;
}

/** RD(numerator / denominator, scale) from the exact quotient (both ≥ 0, denominator > 0). */
export function divideDown(numerator: Amount, denominator: Amount, scale: number): Amount {
  // n·10^-a / (d·10^-b) scaled by 10^s = n·10^(b+s) / (d·10^a); bigint division truncates.
  const top = numerator.units * 10n ** BigInt(denominator.scale + scale);
  const bottom = denominator.units * 10n ** BigInt(numerator.scale);
  return new Amount(top / bottom, scale);
}

/** Fraction digits of the normalized number ("0.50" has 1). */
export function decimalPlaces(value: Amount): number {
  return value.normalize().scale;
}

/** Canonical text of a reported figure, rounded toward zero to the wire's 18 places (§7.3). */
export function wire(value: Amount, field: string): string {
  return formatAmount(value.roundDown(MAX_FRACTION_DIGITS), { field });
}

/** Exact plain text of any amount (may exceed 18 fraction digits); for messages. */
export function plain(value: Amount): string {
  return value.toString();
}

export function durationNs(value: Duration | undefined): bigint {
  return value === undefined ? 0n : value.seconds * NS_PER_S + BigInt(value.nanos);
}

/** Bytewise order of the UTF-8 encodings (code point order, not UTF-16 code unit order). */
export function compareUtf8(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8"));
}
