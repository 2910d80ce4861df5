// Exact decimal amounts: the canonical text form of collateral_sync.v1.Decimal (PROTOCOL.md §2).
//
// Amounts never pass through floats. On the wire a Decimal is text in one canonical form:
// optional "-", an integer part without leading zeros, optional "." and 1 to 18 digits not
// ending in "0"; "-0" is not canonical; at most 60 integer digits. Parsing refuses anything
// else, so two parties never disagree about what an amount is. In memory an Amount is a
// bigint of units and a count of fraction digits. Mirrors sdk/collateral_sync/amounts.py.

import { create } from "@bufbuild/protobuf";
import { type Decimal, DecimalSchema } from "./gen/collateral_sync/v1/common_pb.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";
import { MalformedError } from "./errors.js";

export const MAX_FRACTION_DIGITS = 18;
export const MAX_INTEGER_DIGITS = 60;

const CANONICAL = /^-?(0|[1-9][0-9]{0,59})(\.[0-9]{0,17}[1-9])?$/;
// Plain decimal notation in any spelling (leading zeros, trailing zeros, a sign): what
// Amount.fromText accepts. No exponent, no whitespace, no separators.
const PLAIN = /^([+-]?)([0-9]*)(?:\.([0-9]*))?$/;

/** An exact decimal number: `units × 10^-scale` (scale ≥ 0). */
export class Amount {
  readonly units: bigint;
  readonly scale: number;

  constructor(units: bigint, scale = 0) {
    if (!Number.isSafeInteger(scale) || scale < 0) {
      throw new RangeError(`scale must be a non-negative integer, got ${scale}`);
    }
    this.units = units;
    this.scale = scale;
  }

  static readonly ZERO = new Amount(0n, 0);

  /**
   * An exact number written in plain decimal notation, canonical or not ("1.500", "0012",
   * "-0.000"). Not for wire input: use parseAmount, which refuses non-canonical text.
   */
  static fromText(text: string): Amount {
    const match = PLAIN.exec(text);
    const integer = match?.[2] ?? "";
    const fraction = match?.[3] ?? "";
    if (match === null || (integer === "" && fraction === "")) {
      throw new RangeError(`expected a plain decimal number, got ${JSON.stringify(text)}`);
    }
    const units = BigInt((integer || "0") + fraction);
    return new Amount(match[1] === "-" ? -units : units, fraction.length);
  }

  /** An integer amount. */
  static fromBigInt(value: bigint): Amount {
    return new Amount(value, 0);
  }

  /** The same number with the fewest fraction digits (trailing zeros dropped). */
  normalize(): Amount {
    let { units, scale } = this;
    if (units === 0n) return Amount.ZERO;
    while (scale > 0 && units % 10n === 0n) {
      units /= 10n;
      scale -= 1;
    }
    return scale === this.scale ? this : new Amount(units, scale);
  }

  /** The same number written with `scale` fraction digits (scale ≥ this.scale). */
  private rescaled(scale: number): bigint {
    return this.units * 10n ** BigInt(scale - this.scale);
  }

  isZero(): boolean {
    return this.units === 0n;
  }

  isNegative(): boolean {
    return this.units < 0n;
  }

  negate(): Amount {
    return new Amount(-this.units, this.scale);
  }

  abs(): Amount {
    return this.units < 0n ? this.negate() : this;
  }

  add(other: Amount): Amount {
    const scale = Math.max(this.scale, other.scale);
    return new Amount(this.rescaled(scale) + other.rescaled(scale), scale);
  }

  subtract(other: Amount): Amount {
    return this.add(other.negate());
  }

  multiply(other: Amount): Amount {
    return new Amount(this.units * other.units, this.scale + other.scale);
  }

  /** -1, 0 or 1 as this is below, equal to or above `other` (exact). */
  compare(other: Amount): -1 | 0 | 1 {
    const scale = Math.max(this.scale, other.scale);
    const a = this.rescaled(scale);
    const b = other.rescaled(scale);
    return a < b ? -1 : a > b ? 1 : 0;
  }

  equals(other: Amount): boolean {
    return this.compare(other) === 0;
  }

  /** RD(x, s) of §2.3: toward zero to `digits` fraction digits. */
  roundDown(digits: number): Amount {
    return this.round(digits, false);
  }

  /** RU(x, s) of §2.3: away from zero to `digits` fraction digits. */
  roundUp(digits: number): Amount {
    return this.round(digits, true);
  }

  private round(digits: number, awayFromZero: boolean): Amount {
    if (!Number.isSafeInteger(digits) || digits < 0) {
      throw new RangeError(`digits must be a non-negative integer, got ${digits}`);
    }
    if (this.scale <= digits) return this;
    const divisor = 10n ** BigInt(this.scale - digits);
    // bigint division truncates toward zero.
    let units = this.units / divisor;
    if (awayFromZero && units * divisor !== this.units) {
      units += this.units < 0n ? -1n : 1n;
    }
    return new Amount(units, digits);
  }

  /** Plain decimal text of the normalized number (canonical when within the §2.1 limits). */
  toString(): string {
    const { units, scale } = this.normalize();
    const digits = (units < 0n ? -units : units).toString();
    const sign = units < 0n ? "-" : "";
    if (scale === 0) return sign + digits;
    const padded = digits.padStart(scale + 1, "0");
    return `${sign}${padded.slice(0, -scale)}.${padded.slice(-scale)}`;
  }
}

function invalidAmount(message: string, field: string, expected: string, actual: string): MalformedError {
  return new MalformedError(message, {
    reason: ErrorReason.INVALID_AMOUNT,
    metadata: { field, expected, actual },
  });
}

/** Parse canonical decimal text; refuse anything else with INVALID_AMOUNT. */
export function parseAmount(text: string, options: { field?: string } = {}): Amount {
  const field = options.field ?? "amount";
  // typeof guards callers that bypass the type system (JSON input).
  if (typeof text !== "string" || !CANONICAL.test(text) || text === "-0") {
    const shown = String(text);
    throw new MalformedError(
      `${field}: expected a canonical decimal (e.g. '12.5', at most ${MAX_FRACTION_DIGITS} ` +
        `fraction digits), got ${JSON.stringify(shown)}`,
      {
        reason: ErrorReason.INVALID_AMOUNT,
        metadata: { field, expected: "canonical decimal", actual: shown.slice(0, 80) },
        fieldViolations: { [field]: "not a canonical decimal" },
      },
    );
  }
  return Amount.fromText(text);
}

/**
 * Canonical text of an amount. Refuses values that need more than 18 fraction digits or
 * 60 integer digits rather than rounding silently.
 */
export function formatAmount(value: Amount, options: { field?: string } = {}): string {
  const field = options.field ?? "amount";
  const normal = value.normalize();
  if (normal.scale > MAX_FRACTION_DIGITS) {
    throw invalidAmount(
      `${field}: expected at most ${MAX_FRACTION_DIGITS} fraction digits, got ${normal.toString()}`,
      field,
      `<= ${MAX_FRACTION_DIGITS} fraction digits`,
      normal.toString(),
    );
  }
  if (normal.isZero()) return "0";
  const text = normal.toString();
  const integerDigits = (text.startsWith("-") ? text.slice(1) : text).split(".")[0]?.length ?? 0;
  if (integerDigits > MAX_INTEGER_DIGITS) {
    throw invalidAmount(
      `${field}: expected at most ${MAX_INTEGER_DIGITS} integer digits, got ${integerDigits}`,
      field,
      `<= ${MAX_INTEGER_DIGITS} integer digits`,
      String(integerDigits),
    );
  }
  return text;
}

/** Parse a collateral_sync.v1.Decimal. */
export function amountFromProto(message: Decimal, options: { field?: string } = {}): Amount {
  return parseAmount(message.value, options);
}

/** Build a collateral_sync.v1.Decimal in canonical form (a string must already be canonical). */
export function amountToProto(value: Amount | bigint | string): Decimal {
  const amount =
    typeof value === "string" ? parseAmount(value) : typeof value === "bigint" ? Amount.fromBigInt(value) : value;
  return create(DecimalSchema, { value: formatAmount(amount) });
}
