// One error hierarchy for the SDK and its one mapping to gRPC status (PROTOCOL.md §12.1).
//
// Every failure the SDK reports is a CollateralSyncError carrying an ErrorReason; the
// reason decides the gRPC status code through STATUS_BY_REASON, so a server that raises
// an error and a client that receives it agree on both. Mirrors sdk/collateral_sync/errors.py.

import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";

/** google.rpc.ErrorInfo.domain of every error of this protocol. */
export const ERROR_DOMAIN = "collateral-sync.v1";

/** gRPC status code names (the canonical upper-case spelling). */
export type StatusCodeName =
  | "OK"
  | "CANCELLED"
  | "UNKNOWN"
  | "INVALID_ARGUMENT"
  | "DEADLINE_EXCEEDED"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "PERMISSION_DENIED"
  | "RESOURCE_EXHAUSTED"
  | "FAILED_PRECONDITION"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "UNIMPLEMENTED"
  | "INTERNAL"
  | "UNAVAILABLE"
  | "DATA_LOSS"
  | "UNAUTHENTICATED";

/** The one table from reason to gRPC status code (§12.1). */
export const STATUS_BY_REASON: Readonly<Record<ErrorReason, StatusCodeName>> = Object.freeze({
  [ErrorReason.UNSPECIFIED]: "UNKNOWN",
  [ErrorReason.MALFORMED]: "INVALID_ARGUMENT",
  [ErrorReason.INVALID_AMOUNT]: "INVALID_ARGUMENT",
  [ErrorReason.PAYLOAD_TYPE_MISMATCH]: "INVALID_ARGUMENT",
  [ErrorReason.TOO_LARGE]: "RESOURCE_EXHAUSTED",
  [ErrorReason.SIGNATURE_INVALID]: "UNAUTHENTICATED",
  [ErrorReason.KEY_UNKNOWN]: "UNAUTHENTICATED",
  [ErrorReason.KEY_REVOKED]: "UNAUTHENTICATED",
  [ErrorReason.KEY_NOT_VALID]: "UNAUTHENTICATED",
  [ErrorReason.KEY_ROLE_MISMATCH]: "PERMISSION_DENIED",
  [ErrorReason.AUDIENCE_MISMATCH]: "PERMISSION_DENIED",
  [ErrorReason.THRESHOLD_NOT_MET]: "PERMISSION_DENIED",
  [ErrorReason.STATEMENT_EXPIRED]: "FAILED_PRECONDITION",
  [ErrorReason.STATEMENT_NOT_YET_VALID]: "FAILED_PRECONDITION",
  [ErrorReason.REPLAYED]: "ALREADY_EXISTS",
  [ErrorReason.EQUIVOCATION]: "ABORTED",
  [ErrorReason.SEQUENCE_GAP]: "OUT_OF_RANGE",
  [ErrorReason.PROOF_INVALID]: "INVALID_ARGUMENT",
  [ErrorReason.CHECKPOINT_INCONSISTENT]: "FAILED_PRECONDITION",
  [ErrorReason.OUT_OF_RANGE]: "OUT_OF_RANGE",
  [ErrorReason.NOT_FOUND]: "NOT_FOUND",
  [ErrorReason.STATE_CONFLICT]: "FAILED_PRECONDITION",
  [ErrorReason.LIMIT_EXCEEDED]: "RESOURCE_EXHAUSTED",
  [ErrorReason.PATH_NOT_AUTHORISED]: "PERMISSION_DENIED",
  [ErrorReason.STORAGE_FULL]: "RESOURCE_EXHAUSTED",
  [ErrorReason.STORAGE_UNAVAILABLE]: "UNAVAILABLE",
  [ErrorReason.SIGNER_UNAVAILABLE]: "UNAVAILABLE",
});

/** Wire name of a reason: the enum value name without ERROR_REASON_ (e.g. "SIGNATURE_INVALID"). */
export function reasonName(reason: ErrorReason): string {
  // The generated TS enum already drops the ERROR_REASON_ prefix; reverse mapping gives the name.
  return ErrorReason[reason] ?? "UNSPECIFIED";
}

/** The reason for a wire name ("SIGNATURE_INVALID"); an unknown name is UNSPECIFIED (§12.2). */
export function reasonFromName(name: string): ErrorReason {
  const value: unknown = (ErrorReason as unknown as Record<string, unknown>)[name];
  return typeof value === "number" ? (value as ErrorReason) : ErrorReason.UNSPECIFIED;
}

/** The gRPC status code name a reason maps to. */
export function statusCodeFor(reason: ErrorReason): StatusCodeName {
  return STATUS_BY_REASON[reason] ?? "UNKNOWN";
}

export interface ErrorOptions {
  /** Overrides the class's default reason. */
  reason?: ErrorReason;
  /** Short string facts (expected, actual, field…) for google.rpc.ErrorInfo.metadata. */
  metadata?: Record<string, string>;
  /** Request field path → what is wrong with it (google.rpc.BadRequest). */
  fieldViolations?: Record<string, string>;
  /** The underlying error, if any. */
  cause?: unknown;
}

/** Root of every error the SDK raises; `code` follows from `reason`. */
export class CollateralSyncError extends Error {
  static readonly defaultReason: ErrorReason = ErrorReason.UNSPECIFIED;

  readonly reason: ErrorReason;
  readonly metadata: Record<string, string>;
  readonly fieldViolations: Record<string, string>;

  constructor(message: string, options: ErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    // new.target is the concrete subclass, so its static defaultReason applies.
    const defaultReason = (new.target as unknown as { defaultReason: ErrorReason }).defaultReason;
    this.reason = options.reason ?? defaultReason;
    this.metadata = { ...(options.metadata ?? {}) };
    this.fieldViolations = { ...(options.fieldViolations ?? {}) };
  }

  /** gRPC status code name, from the one table. */
  get code(): StatusCodeName {
    return statusCodeFor(this.reason);
  }

  /** Wire name of the reason (without ERROR_REASON_). */
  get reasonName(): string {
    return reasonName(this.reason);
  }

  override toString(): string {
    return `${this.name}(${this.reasonName}: ${this.message})`;
  }
}

/** Bytes or fields that do not form a valid message (INVALID_ARGUMENT). */
export class MalformedError extends CollateralSyncError {
  static override readonly defaultReason: ErrorReason = ErrorReason.MALFORMED;
}

/** A signature, key, audience, freshness, sequence or threshold check failed. */
export class VerificationError extends CollateralSyncError {
  static override readonly defaultReason: ErrorReason = ErrorReason.SIGNATURE_INVALID;
}

/** A Merkle inclusion or consistency proof, or a checkpoint, did not verify. */
export class ProofError extends VerificationError {
  static override readonly defaultReason: ErrorReason = ErrorReason.PROOF_INVALID;
}

/** The operation does not fit the current state (unknown id, conflict, limit). */
export class StateError extends CollateralSyncError {
  static override readonly defaultReason: ErrorReason = ErrorReason.STATE_CONFLICT;
}

/** Our own storage refused a write (full, read-only, failing); nothing was written. */
export class StorageError extends CollateralSyncError {
  static override readonly defaultReason: ErrorReason = ErrorReason.STORAGE_UNAVAILABLE;
}
