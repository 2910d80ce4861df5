// Instants as integer nanoseconds since the epoch, for the verification core.
//
// Comparisons run on bigint nanoseconds: exact for google.protobuf.Timestamp (which carries
// nanoseconds) and for Date (milliseconds). Mirrors the time helpers of
// sdk/collateral_sync/keys.py (_timestamp_ns, _timestamp_is_valid, _format_ns).

import { create } from "@bufbuild/protobuf";
import { type Timestamp, TimestampSchema } from "@bufbuild/protobuf/wkt";

export const NS_PER_S = 1_000_000_000n;
const NS_PER_MS = 1_000_000n;
// Range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
export const TIMESTAMP_MIN_SECONDS = -62_135_596_800n;
export const TIMESTAMP_MAX_SECONDS = 253_402_300_799n;

/** An instant the SDK accepts: a JS Date or a protobuf Timestamp. */
export type Instant = Date | Timestamp;

export function timestampNs(value: Timestamp): bigint {
  return value.seconds * NS_PER_S + BigInt(value.nanos);
}

export function dateNs(value: Date): bigint {
  const ms = value.getTime();
  if (!Number.isFinite(ms)) {
    throw new RangeError("expected a valid Date, got an invalid one");
  }
  return BigInt(ms) * NS_PER_MS;
}

export function instantNs(value: Instant): bigint {
  return value instanceof Date ? dateNs(value) : timestampNs(value);
}

/** Whether a Timestamp is within 0001-01-01..9999-12-31 with 0 ≤ nanos < 10⁹ (§3.6 c2). */
export function timestampIsValid(value: Timestamp): boolean {
  return (
    value.seconds >= TIMESTAMP_MIN_SECONDS &&
    value.seconds <= TIMESTAMP_MAX_SECONDS &&
    value.nanos >= 0 &&
    BigInt(value.nanos) < NS_PER_S
  );
}

/** A Timestamp for an instant given in nanoseconds since the epoch. */
export function timestampFromNs(ns: bigint): Timestamp {
  let seconds = ns / NS_PER_S;
  let nanos = ns % NS_PER_S;
  if (nanos < 0n) {
    seconds -= 1n;
    nanos += NS_PER_S;
  }
  return create(TimestampSchema, { seconds, nanos: Number(nanos) });
}

/** A Timestamp for a Date. */
export function timestampFromDate(value: Date): Timestamp {
  return timestampFromNs(dateNs(value));
}

/**
 * RFC 3339 text of an instant, as protobuf's Timestamp JSON writes it (0, 3, 6 or 9 fraction
 * digits, "Z"); raw nanoseconds if out of the Timestamp range. For error messages.
 */
export function formatNs(ns: bigint): string {
  const stamp = timestampFromNs(ns);
  if (stamp.seconds < TIMESTAMP_MIN_SECONDS || stamp.seconds > TIMESTAMP_MAX_SECONDS) {
    return `${ns}ns since epoch`;
  }
  const base = new Date(Number(stamp.seconds) * 1000).toISOString().slice(0, 19);
  const nanos = stamp.nanos;
  let fraction = "";
  if (nanos !== 0) {
    const digits = String(nanos).padStart(9, "0");
    fraction = "." + (nanos % 1_000_000 === 0 ? digits.slice(0, 3) : nanos % 1_000 === 0 ? digits.slice(0, 6) : digits);
  }
  return `${base}${fraction}Z`;
}

/** RFC 3339 text of a Timestamp (see formatNs). */
export function formatTimestamp(value: Timestamp): string {
  return formatNs(timestampNs(value));
}
