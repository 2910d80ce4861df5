// Decoding of the errors peers send (google.rpc.Status in grpc-status-details-bin, §12.2),
// the party id of a certificate (§4.4), and the typed clients' error mapping and retries (§13).
//
// The two Status fixtures were serialised by the Python SDK (collateral_sync.errors
// .error_to_status, i.e. the googleapis protobuf classes), so they are independent of
// the decoder under test; the others are built field by field with the wire writer.

import assert from "node:assert/strict";
import { test } from "node:test";
import { createServer, type ServerHttp2Session } from "node:http2";
import type { AddressInfo } from "node:net";
import type { DescService } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter, createGrpcTransport } from "@connectrpc/connect-node";
import {
  createCustodianClient,
  createEmergencyReleaseClient,
  createExchangeClient,
  createReconciliationClient,
  createRegulatorClient,
  createTestControlClient,
  isIdempotent,
} from "../src/clients.js";
import { CustodianService } from "../src/gen/collateral_sync/v1/custodian_service_pb.js";
import { EmergencyReleaseService } from "../src/gen/collateral_sync/v1/emergency_release_service_pb.js";
import { ExchangeService } from "../src/gen/collateral_sync/v1/exchange_service_pb.js";
import { ReconciliationService } from "../src/gen/collateral_sync/v1/reconciliation_service_pb.js";
import { RegulatorService } from "../src/gen/collateral_sync/v1/regulator_service_pb.js";
import { TestControlService } from "../src/gen/collateral_sync/v1/test_control_pb.js";
import { CollateralSyncError, MalformedError } from "../src/errors.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import {
  RpcError,
  certificatePartyId,
  decodeErrorInfo,
  decodeRpcStatus,
  decodeStatusDetailsBin,
  errorFromCall,
  errorFromRpcStatus,
  statusCodeName,
} from "../src/transport.js";

// MalformedError("expected a 32-byte hash, got 3 bytes", metadata {field, expected, actual},
// field_violations {hello.received_entry_hash, hello.window}).
const MALFORMED_STATUS = Buffer.from(
  "08031224657870656374656420612033322d6279746520686173682c20676f7420332062797465731a86010a28" +
    "747970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e4572726f72496e666f125a0a094d" +
    "414c464f524d45441212636f6c6c61746572616c2d73796e632e76311a1c0a056669656c64121372656365697665" +
    "645f656e7472795f686173681a0e0a086578706563746564120233321a0b0a0661637475616c1201331a7a0a2974" +
    "7970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e42616452657175657374124d0a2d0a19" +
    "68656c6c6f2e72656365697665645f656e7472795f6861736812106d7573742062652033322062797465730a1c0a" +
    "0c68656c6c6f2e77696e646f77120c6d757374206265203e3d2031",
  "hex",
);

// VerificationError(KEY_ROLE_MISMATCH, "caller may not read acct", {field, actual}).
const DENIED_STATUS = Buffer.from(
  "0807121863616c6c6572206d6179206e6f74207265616420616363741a7c0a28747970652e676f6f676c65617069" +
    "732e636f6d2f676f6f676c652e7270632e4572726f72496e666f12500a114b45595f524f4c455f4d49534d415443" +
    "481212636f6c6c61746572616c2d73796e632e76311a130a056669656c64120a6163636f756e745f69641a120a06" +
    "61637475616c1208636c69656e742d32",
  "hex",
);

function errorInfo(reason: string, domain: string, metadata: Record<string, string>): Uint8Array {
  const writer = new BinaryWriter().tag(1, WireType.LengthDelimited).string(reason);
  writer.tag(2, WireType.LengthDelimited).string(domain);
  for (const [key, value] of Object.entries(metadata)) {
    writer.tag(3, WireType.LengthDelimited).fork();
    writer.tag(1, WireType.LengthDelimited).string(key).tag(2, WireType.LengthDelimited).string(value);
    writer.join();
  }
  return writer.finish();
}

function badRequest(violations: Record<string, string>): Uint8Array {
  const writer = new BinaryWriter();
  for (const [field, description] of Object.entries(violations)) {
    writer.tag(1, WireType.LengthDelimited).fork();
    writer.tag(1, WireType.LengthDelimited).string(field).tag(2, WireType.LengthDelimited).string(description);
    writer.join();
  }
  return writer.finish();
}

function status(code: number, message: string, details: [string, Uint8Array][]): Uint8Array {
  const writer = new BinaryWriter().tag(1, WireType.Varint).int32(code);
  writer.tag(2, WireType.LengthDelimited).string(message);
  for (const [type, value] of details) {
    writer.tag(3, WireType.LengthDelimited).fork();
    writer.tag(1, WireType.LengthDelimited).string(`type.googleapis.com/${type}`);
    writer.tag(2, WireType.LengthDelimited).bytes(value);
    writer.join();
  }
  return writer.finish();
}

test("a Python-encoded MALFORMED status decodes to reason, metadata and field violations", () => {
  const decoded = decodeRpcStatus(MALFORMED_STATUS);
  assert.equal(decoded.code, 3);
  assert.deepEqual(
    decoded.details.map((d) => d.typeUrl),
    ["type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.BadRequest"],
  );
  const error = errorFromRpcStatus(decoded);
  assert.ok(error instanceof RpcError && error instanceof CollateralSyncError);
  assert.equal(error.code, "INVALID_ARGUMENT");
  assert.equal(error.reason, ErrorReason.MALFORMED);
  assert.equal(error.reasonName, "MALFORMED");
  assert.equal(error.message, "expected a 32-byte hash, got 3 bytes");
  assert.deepEqual(error.metadata, { field: "received_entry_hash", expected: "32", actual: "3" });
  assert.deepEqual(error.fieldViolations, {
    "hello.received_entry_hash": "must be 32 bytes",
    "hello.window": "must be >= 1",
  });
});

test("a Python-encoded KEY_ROLE_MISMATCH status keeps the peer's code", () => {
  const error = errorFromRpcStatus(decodeRpcStatus(DENIED_STATUS));
  assert.equal(error.code, "PERMISSION_DENIED");
  assert.equal(error.statusCode, "PERMISSION_DENIED");
  assert.equal(error.reason, ErrorReason.KEY_ROLE_MISMATCH);
  assert.deepEqual(error.metadata, { field: "account_id", actual: "client-2" });
  assert.deepEqual(error.fieldViolations, {});
});

test("the trailer value is base64 with or without padding", () => {
  const padded = Buffer.from(DENIED_STATUS).toString("base64");
  const unpadded = padded.replace(/=+$/, "");
  assert.notEqual(padded, unpadded, "the fixture's base64 should need padding");
  assert.deepEqual(decodeStatusDetailsBin(unpadded), decodeRpcStatus(DENIED_STATUS));
  assert.deepEqual(decodeStatusDetailsBin(padded), decodeRpcStatus(DENIED_STATUS));
});

test("ErrorInfo of another domain is not ours: reason UNSPECIFIED, no metadata", () => {
  const bytes = status(9, "other", [["google.rpc.ErrorInfo", errorInfo("MALFORMED", "example.com", { a: "b" })]]);
  const error = errorFromRpcStatus(decodeRpcStatus(bytes));
  assert.equal(error.code, "FAILED_PRECONDITION");
  assert.equal(error.reason, ErrorReason.UNSPECIFIED);
  assert.deepEqual(error.metadata, {});
});

test("a reason name this SDK does not know is UNSPECIFIED, the code stays the peer's", () => {
  const bytes = status(10, "new", [["google.rpc.ErrorInfo", errorInfo("FUTURE_REASON", "collateral-sync.v1", { expected: "x" })]]);
  const error = errorFromRpcStatus(decodeRpcStatus(bytes));
  assert.equal(error.reason, ErrorReason.UNSPECIFIED);
  assert.equal(error.code, "ABORTED");
  assert.deepEqual(error.metadata, { expected: "x" });
});

test("unknown fields are skipped, a truncated message is MALFORMED", () => {
  const info = errorInfo("EQUIVOCATION", "collateral-sync.v1", { sequence: "7" });
  const extended = new Uint8Array([...info, ...new BinaryWriter().tag(15, WireType.Varint).uint32(300).finish()]);
  assert.deepEqual(decodeErrorInfo(extended), {
    reason: "EQUIVOCATION",
    domain: "collateral-sync.v1",
    metadata: { sequence: "7" },
  });
  assert.throws(
    () => decodeRpcStatus(DENIED_STATUS.subarray(0, DENIED_STATUS.length - 5)),
    (error: unknown) => error instanceof CollateralSyncError && error.reason === ErrorReason.MALFORMED,
  );
});

test("errorFromCall reads grpc-status-details-bin from a ConnectError's trailers", () => {
  const trailers = new Headers({ "grpc-status-details-bin": Buffer.from(DENIED_STATUS).toString("base64") });
  const error = errorFromCall(new ConnectError("caller may not read acct", Code.PermissionDenied, trailers));
  assert.ok(error instanceof RpcError);
  assert.equal(error.reason, ErrorReason.KEY_ROLE_MISMATCH);
  assert.equal(error.metadata["field"], "account_id");
});

test("errorFromCall without details keeps the status; other errors pass or become UNKNOWN", () => {
  const plain = errorFromCall(new ConnectError("down", Code.Unavailable));
  assert.ok(plain instanceof RpcError);
  assert.equal(plain.code, "UNAVAILABLE");
  assert.equal(plain.reason, ErrorReason.UNSPECIFIED);
  assert.equal(plain.message, "down");
  const ours = new MalformedError("bad");
  assert.equal(errorFromCall(ours), ours);
  const bug = errorFromCall(new TypeError("oops"));
  assert.equal(bug.code, "UNKNOWN");
  assert.equal(statusCodeName(16), "UNAUTHENTICATED");
  assert.equal(statusCodeName(99), "UNKNOWN");
});

// A leaf certificate written by `collateral-sync dev-certs --party custodian-1`.
const CUSTODIAN_CERT = `-----BEGIN CERTIFICATE-----
MIIB8DCCAZagAwIBAgIUCmp8ecm6G5EPO9ZttFG8PUZwqVkwCgYIKoZIzj0EAwIw
KTEnMCUGA1UEAwweY29sbGF0ZXJhbC1zeW5jIGRldmVsb3BtZW50IENBMB4XDTI2
MTIwNzA4MTMzMFoXDTI3MDEwNjA4MTgzMFowFjEUMBIGA1UEAwwLY3VzdG9kaWFu
LTEwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQcJ8017p9N5Z8W56pcFT9VmATA
4sGz7NtaEnSXm+aQtqxSKd/BdYwAt3qgAocrwKas+8m5TBucolK/kr92YKKXo4Gu
MIGrMAwGA1UdEwEB/wQCMAAwDgYDVR0PAQH/BAQDAgeAMB0GA1UdJQQWMBQGCCsG
AQUFBwMBBggrBgEFBQcDAjAsBgNVHREEJTAjgglsb2NhbGhvc3SHBH8AAAGHEAAA
AAAAAAAAAAAAAAAAAAEwHQYDVR0OBBYEFEkid14lb7YRkjeoHRSlm6oSwGuoMB8G
A1UdIwQYMBaAFL5bJl2ctpl0oJSwslFuegbzf0n5MAoGCCqGSM49BAMCA0gAMEUC
IQDtv0SRvNGasIR8kxpKx9rr3G0tb6XWIExMuxVxJ98e5gIgG3PwoTW0RuJmO+V7
hDQDy9BiQZTN6Yl5NSu30UCCHLo=
-----END CERTIFICATE-----
`;

test("a party certificate's subject CN is its party id", () => {
  assert.equal(certificatePartyId(CUSTODIAN_CERT), "custodian-1");
});

// ---------------------------------------------------------------- clients over a real server
//
// An in-process gRPC server (Connect's own router on node:http2, plaintext on 127.0.0.1)
// serving CustodianService: what it refuses travels as grpc-status-details-bin, exactly as
// from any gRPC server, and the typed client must turn it into the SDK's error.

async function withServer(
  routes: (router: ConnectRouter) => void,
  body: (transport: ReturnType<typeof createGrpcTransport>) => Promise<void>,
): Promise<void> {
  const server = createServer(connectNodeAdapter({ routes }));
  // The client keeps its HTTP/2 session open; close() waits for sessions, so end them.
  const sessions = new Set<ServerHttp2Session>();
  server.on("session", (session) => sessions.add(session));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  const transport = createGrpcTransport({ baseUrl: `http://127.0.0.1:${port}` });
  try {
    await body(transport);
  } finally {
    for (const session of sessions) session.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

test("a refusal's ErrorInfo and BadRequest reach the caller of a typed client", async () => {
  const info = errorInfo("OUT_OF_RANGE", "collateral-sync.v1", { expected: "0 <= index < 2", actual: "9" });
  let calls = 0;
  await withServer(
    (router) =>
      router.service(CustodianService, {
        getInclusionProof() {
          calls += 1;
          const error = new ConnectError("leaf index beyond the log", Code.OutOfRange);
          // A detail as raw bytes: the server packs it into google.rpc.Status as it is.
          error.details = [
            { type: "google.rpc.ErrorInfo", value: info },
            { type: "google.rpc.BadRequest", value: badRequest({ leaf_index: "must be < 2" }) },
          ];
          throw error;
        },
      }),
    async (transport) => {
      const client = createCustodianClient(transport);
      await assert.rejects(client.getInclusionProof({ leafIndex: 9n }), (error: unknown) => {
        assert.ok(error instanceof RpcError);
        assert.equal(error.code, "OUT_OF_RANGE");
        assert.equal(error.reason, ErrorReason.OUT_OF_RANGE);
        assert.equal(error.message, "leaf index beyond the log");
        assert.deepEqual(error.metadata, { expected: "0 <= index < 2", actual: "9" });
        assert.deepEqual(error.fieldViolations, { leaf_index: "must be < 2" });
        return true;
      });
      assert.equal(calls, 1, "a refusal other than UNAVAILABLE is not retried");
    },
  );
});

test("reads are retried on UNAVAILABLE (at most 4 attempts); submissions never", async () => {
  let reads = 0;
  let pledges = 0;
  await withServer(
    (router) =>
      router.service(CustodianService, {
        getCheckpoint() {
          reads += 1;
          if (reads < 3) throw new ConnectError("starting up", Code.Unavailable);
          return {};
        },
        getHoldingsStatement() {
          reads += 1;
          throw new ConnectError("down", Code.Unavailable);
        },
        pledgeCollateral() {
          pledges += 1;
          throw new ConnectError("down", Code.Unavailable);
        },
      }),
    async (transport) => {
      const client = createCustodianClient(transport, { retry: { maxAttempts: 4, initialBackoffMs: 1, maxBackoffMs: 2 } });
      await client.getCheckpoint({});
      assert.equal(reads, 3);
      reads = 0;
      await assert.rejects(client.getHoldingsStatement({ accountId: "a" }), (e: unknown) => e instanceof RpcError && e.code === "UNAVAILABLE");
      assert.equal(reads, 4);
      await assert.rejects(client.pledgeCollateral({}), (e: unknown) => e instanceof RpcError && e.code === "UNAVAILABLE");
      assert.equal(pledges, 1);
    },
  );
  assert.ok(isIdempotent(CustodianService.method.getConsistencyProof));
  assert.ok(!isIdempotent(CustodianService.method.syncPositions));
  assert.ok(!isIdempotent(CustodianService.method.submitSettlementInstruction));
});

test("every service of the protocol has a typed client with every RPC", () => {
  const transport = createGrpcTransport({ baseUrl: "http://127.0.0.1:9" });
  const clients: [DescService, object][] = [
    [CustodianService, createCustodianClient(transport)],
    [ExchangeService, createExchangeClient(transport)],
    [ReconciliationService, createReconciliationClient(transport)],
    [RegulatorService, createRegulatorClient(transport)],
    [EmergencyReleaseService, createEmergencyReleaseClient(transport)],
    [TestControlService, createTestControlClient(transport)],
  ];
  for (const [service, client] of clients) {
    for (const method of service.methods) {
      assert.equal(typeof (client as Record<string, unknown>)[method.localName], "function", `${service.typeName}.${method.name}`);
    }
  }
});
