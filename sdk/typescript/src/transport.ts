// Mutual-TLS gRPC transport between parties, and the decoding of the errors peers send.
//
// Every connection is gRPC over HTTP/2 with mutual TLS (PROTOCOL.md §13): we trust the
// arrangement's CA, present our own certificate, and check the server's certificate the
// ordinary way (its subjectAltName must name the host we dial, as the Python SDK's
// channels do). Certificates' subject CN is the party id (§4.4), so a caller that knows
// whom it dials can also require that CN (`expectedPartyId`).
//
// Errors arrive as a google.rpc.Status in the grpc-status-details-bin trailer (§12.2):
// ErrorInfo (reason, domain, metadata) and BadRequest (field violations). The few
// google.rpc messages are decoded here with the protobuf wire reader, so no googleapis
// .proto files are needed.

import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { ConnectError, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  CollateralSyncError,
  ERROR_DOMAIN,
  reasonFromName,
  type StatusCodeName,
} from "./errors.js";
import { ErrorReason } from "./gen/collateral_sync/v1/errors_pb.js";

/** Largest gRPC message sent or accepted (§13), the same as the Python SDK's. */
export const MAX_MESSAGE_BYTES = 8 * 1024 * 1024;
/** Default deadline of a unary call (§13). */
export const DEFAULT_TIMEOUT_MS = 10_000;

/** One party's TLS material, as PEM text or bytes. */
export interface TlsMaterial {
  /** Trust anchor for the counterparty (the arrangement's CA). */
  caCert: string | Uint8Array;
  /** Our certificate chain, leaf first. */
  cert: string | Uint8Array;
  /** Our private key. */
  key: string | Uint8Array;
}

export interface TransportOptions extends TlsMaterial {
  /** `host:port` of the server (`[::1]:port` for IPv6). */
  address: string;
  /** When set, the server certificate's subject CN must be this party id (§4.4). */
  expectedPartyId?: string;
  /** Host name to check the server certificate against when `address` is not in its SAN. */
  serverName?: string;
  /** Deadline of calls that set none; default 10 s (§13). */
  defaultTimeoutMs?: number;
  /** Largest message either way; default 8 MiB (§13). */
  maxMessageBytes?: number;
}

/** Read the three PEM files of a party. */
export function loadTlsFiles(paths: { caCert: string; cert: string; key: string }): TlsMaterial {
  return {
    caCert: readFileSync(paths.caCert),
    cert: readFileSync(paths.cert),
    key: readFileSync(paths.key),
  };
}

/** Subject CN of the first certificate in `pem`: the party id of a party certificate (§4.4). */
export function certificatePartyId(pem: string | Uint8Array): string {
  const subject = new X509Certificate(toBuffer(pem)).subject;
  const names = subject
    .split("\n")
    .filter((line) => line.startsWith("CN="))
    .map((line) => line.slice(3));
  const [name, ...others] = names;
  if (name === undefined || others.length > 0) {
    throw new CollateralSyncError(`expected exactly one subject CN, got ${names.length}`, {
      reason: ErrorReason.MALFORMED,
      metadata: { expected: "1", actual: String(names.length) },
    });
  }
  return name;
}

/** A gRPC transport over HTTP/2 with mutual TLS to one server. */
export function createTransport(options: TransportOptions): Transport {
  const maxBytes = options.maxMessageBytes ?? MAX_MESSAGE_BYTES;
  const expected = options.expectedPartyId;
  const serverName = options.serverName;
  return createGrpcTransport({
    baseUrl: `https://${options.address}`,
    defaultTimeoutMs: options.defaultTimeoutMs ?? DEFAULT_TIMEOUT_MS,
    readMaxBytes: maxBytes,
    writeMaxBytes: maxBytes,
    // Pings every 20 s with 10 s to answer, like the Python channels: a silently dead
    // peer on the long-lived SyncPositions stream is noticed within ~30 s. The Python
    // servers accept a ping every 10 s, so they never answer with too_many_pings.
    pingIntervalMs: 20_000,
    pingTimeoutMs: 10_000,
    nodeOptions: {
      ca: toBuffer(options.caCert),
      cert: toBuffer(options.cert),
      key: toBuffer(options.key),
      minVersion: "TLSv1.2",
      ...(serverName === undefined ? {} : { servername: serverName }),
      checkServerIdentity: (host: string, cert: PeerCertificate): Error | undefined => {
        const mismatch = checkServerIdentity(serverName ?? host, cert);
        if (mismatch !== undefined) return mismatch;
        if (expected !== undefined && peerCommonName(cert) !== expected) {
          return new Error(
            `expected the server certificate of party ${JSON.stringify(expected)}, ` +
              `got CN ${JSON.stringify(peerCommonName(cert) ?? "")}`,
          );
        }
        return undefined;
      },
    },
  });
}

function peerCommonName(cert: PeerCertificate): string | undefined {
  const cn: unknown = cert.subject?.CN;
  // Node gives an array when the subject repeats CN; a party certificate has exactly one.
  return typeof cn === "string" ? cn : undefined;
}

function toBuffer(data: string | Uint8Array): Buffer {
  return typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data);
}

// ---------------------------------------------------------------- google.rpc decoding

/** google.protobuf.Any as it travels: the type URL and the packed message bytes. */
export interface PackedAny {
  typeUrl: string;
  value: Uint8Array;
}

/** google.rpc.Status. */
export interface RpcStatus {
  code: number;
  message: string;
  details: PackedAny[];
}

/** google.rpc.ErrorInfo. */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** One google.rpc.BadRequest.FieldViolation (field path and what is wrong with it). */
export interface FieldViolation {
  field: string;
  description: string;
}

const ERROR_INFO_TYPE = "google.rpc.ErrorInfo";
const BAD_REQUEST_TYPE = "google.rpc.BadRequest";
/** The trailer gRPC carries the binary google.rpc.Status in (base64, §12.2). */
export const STATUS_DETAILS_TRAILER = "grpc-status-details-bin";

/** Decode a serialised google.rpc.Status; unknown fields are skipped. */
export function decodeRpcStatus(bytes: Uint8Array): RpcStatus {
  const status: RpcStatus = { code: 0, message: "", details: [] };
  readFields(bytes, "google.rpc.Status", (reader, field, wireType) => {
    if (field === 1 && wireType === WireType.Varint) status.code = reader.int32();
    else if (field === 2 && wireType === WireType.LengthDelimited) status.message = reader.string();
    else if (field === 3 && wireType === WireType.LengthDelimited)
      status.details.push(decodeAny(reader.bytes()));
    else return false;
    return true;
  });
  return status;
}

function decodeAny(bytes: Uint8Array): PackedAny {
  const any: PackedAny = { typeUrl: "", value: new Uint8Array(0) };
  readFields(bytes, "google.protobuf.Any", (reader, field, wireType) => {
    if (field === 1 && wireType === WireType.LengthDelimited) any.typeUrl = reader.string();
    else if (field === 2 && wireType === WireType.LengthDelimited) any.value = reader.bytes();
    else return false;
    return true;
  });
  return any;
}

/** Decode a serialised google.rpc.ErrorInfo. */
export function decodeErrorInfo(bytes: Uint8Array): ErrorInfo {
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  readFields(bytes, ERROR_INFO_TYPE, (reader, field, wireType) => {
    if (field === 1 && wireType === WireType.LengthDelimited) info.reason = reader.string();
    else if (field === 2 && wireType === WireType.LengthDelimited) info.domain = reader.string();
    else if (field === 3 && wireType === WireType.LengthDelimited) {
      // map<string, string>: each entry is a message with key = 1, value = 2.
      const entry = { key: "", value: "" };
      readFields(reader.bytes(), "ErrorInfo.MetadataEntry", (r, f, w) => {
        if (f === 1 && w === WireType.LengthDelimited) entry.key = r.string();
        else if (f === 2 && w === WireType.LengthDelimited) entry.value = r.string();
        else return false;
        return true;
      });
      info.metadata[entry.key] = entry.value;
    } else return false;
    return true;
  });
  return info;
}

/** Decode a serialised google.rpc.BadRequest into its field violations. */
export function decodeBadRequest(bytes: Uint8Array): FieldViolation[] {
  const violations: FieldViolation[] = [];
  readFields(bytes, BAD_REQUEST_TYPE, (reader, field, wireType) => {
    if (field !== 1 || wireType !== WireType.LengthDelimited) return false;
    const violation: FieldViolation = { field: "", description: "" };
    readFields(reader.bytes(), "BadRequest.FieldViolation", (r, f, w) => {
      if (f === 1 && w === WireType.LengthDelimited) violation.field = r.string();
      else if (f === 2 && w === WireType.LengthDelimited) violation.description = r.string();
      else return false;
      return true;
    });
    violations.push(violation);
    return true;
  });
  return violations;
}

type FieldReader = (reader: BinaryReader, field: number, wireType: WireType) => boolean;

/** Walk the fields of one message; `read` consumes the ones it knows, the rest are skipped. */
function readFields(bytes: Uint8Array, message: string, read: FieldReader): void {
  const reader = new BinaryReader(bytes);
  try {
    while (reader.pos < reader.len) {
      const [field, wireType] = reader.tag();
      if (!read(reader, field, wireType)) reader.skip(wireType, field);
    }
  } catch (cause) {
    throw new CollateralSyncError(`undecodable ${message} (${bytes.length} bytes)`, {
      reason: ErrorReason.MALFORMED,
      metadata: { expected: `a serialized ${message}`, actual: `${bytes.length} bytes` },
      cause,
    });
  }
}

// ---------------------------------------------------------------- errors from peers

/** gRPC status names by code number (Connect's Code uses the same numbers). */
const STATUS_NAMES: readonly StatusCodeName[] = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

/** Name of a gRPC status code number; UNKNOWN for a number outside the table. */
export function statusCodeName(code: number): StatusCodeName {
  return STATUS_NAMES[code] ?? "UNKNOWN";
}

export interface RpcErrorOptions {
  /** The status code the peer sent (it may disagree with our table for the reason). */
  statusCode: StatusCodeName;
  reason?: ErrorReason;
  metadata?: Record<string, string>;
  fieldViolations?: Record<string, string>;
  cause?: unknown;
}

/**
 * An error status received from a counterparty (the Python SDK's RPCError).
 *
 * `code` is the code the peer sent; `reason` comes from its ErrorInfo (UNSPECIFIED when it
 * sent none, or a reason name this SDK does not know, §12.2).
 */
export class RpcError extends CollateralSyncError {
  readonly statusCode: StatusCodeName;

  constructor(message: string, options: RpcErrorOptions) {
    super(message, options);
    this.statusCode = options.statusCode;
  }

  override get code(): StatusCodeName {
    return this.statusCode;
  }
}

/** The error a google.rpc.Status describes. */
export function errorFromRpcStatus(status: RpcStatus, cause?: unknown): RpcError {
  let reason = ErrorReason.UNSPECIFIED;
  let metadata: Record<string, string> = {};
  const fieldViolations: Record<string, string> = {};
  for (const detail of status.details) {
    const type = detail.typeUrl.slice(detail.typeUrl.lastIndexOf("/") + 1);
    if (type === ERROR_INFO_TYPE) {
      const info = decodeErrorInfo(detail.value);
      // Only our own domain's reasons mean anything here (§12.2).
      if (info.domain === ERROR_DOMAIN) {
        reason = reasonFromName(info.reason);
        metadata = info.metadata;
      }
    } else if (type === BAD_REQUEST_TYPE) {
      for (const violation of decodeBadRequest(detail.value)) {
        fieldViolations[violation.field] = violation.description;
      }
    }
  }
  return new RpcError(status.message, {
    statusCode: statusCodeName(status.code),
    reason,
    metadata,
    fieldViolations,
    cause,
  });
}

/** Decode the value of a grpc-status-details-bin trailer (base64, padded or not). */
export function decodeStatusDetailsBin(value: string): RpcStatus {
  return decodeRpcStatus(Buffer.from(value, "base64"));
}

/**
 * The SDK error for whatever a call threw.
 *
 * A ConnectError becomes an RpcError with the reason, metadata and field violations of
 * the peer's google.rpc.Status; errors of this SDK pass through unchanged; anything else
 * (a bug, a TLS failure outside the call) becomes an RpcError with status UNKNOWN.
 */
export function errorFromCall(error: unknown): CollateralSyncError {
  if (error instanceof CollateralSyncError) return error;
  if (error instanceof ConnectError) {
    const trailer = error.metadata.get(STATUS_DETAILS_TRAILER);
    if (trailer !== null) {
      try {
        return errorFromRpcStatus(decodeStatusDetailsBin(trailer), error);
      } catch {
        // An undecodable trailer: fall back to the plain status below.
      }
    }
    return new RpcError(error.rawMessage, { statusCode: statusCodeName(error.code), cause: error });
  }
  const message = error instanceof Error ? error.message : String(error);
  return new RpcError(message, { statusCode: "UNKNOWN", cause: error });
}
