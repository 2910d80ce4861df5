// Typed clients, one per collateral-sync service, over a transport from ./transport.ts.
//
// Each client is the Connect v2 client of the generated service descriptor (one method per
// RPC, lowerCamelCase, taking and returning the generated messages) with the SDK's rules
// added: every call has a deadline (10 s for unary calls, 1 h for SyncPositions, §13),
// failures are thrown as the SDK's errors (RpcError with the peer's reason, metadata and
// field violations), and idempotent reads — unary Get*/List* methods — are retried on
// UNAVAILABLE with exponential backoff, at most 4 attempts (§13). Nothing else is ever
// retried: a second delivery of a signed statement must be the caller's decision.

import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { createClient, type CallOptions, type Client, type Transport } from "@connectrpc/connect";
import { setTimeout as sleep } from "node:timers/promises";
import { CustodianService } from "./gen/collateral_sync/v1/custodian_service_pb.js";
import { EmergencyReleaseService } from "./gen/collateral_sync/v1/emergency_release_service_pb.js";
import { ExchangeService } from "./gen/collateral_sync/v1/exchange_service_pb.js";
import { ReconciliationService } from "./gen/collateral_sync/v1/reconciliation_service_pb.js";
import { RegulatorService } from "./gen/collateral_sync/v1/regulator_service_pb.js";
import { TestControlService } from "./gen/collateral_sync/v1/test_control_pb.js";
import { DEFAULT_TIMEOUT_MS, RpcError, errorFromCall } from "./transport.js";

/** Default lifetime of one SyncPositions stream; the exchange re-dials after it (§13). */
export const DEFAULT_SYNC_STREAM_TIMEOUT_MS = 3_600_000;

/** Retry of idempotent reads on UNAVAILABLE (§13). */
export interface RetryPolicy {
  /** Attempts in all, the first included; at most 4 by §13. */
  maxAttempts: number;
  /** Backoff before the second attempt; doubled each time, with full jitter. */
  initialBackoffMs: number;
  maxBackoffMs: number;
}

export const DEFAULT_RETRY_POLICY: Readonly<RetryPolicy> = Object.freeze({
  maxAttempts: 4,
  initialBackoffMs: 100,
  maxBackoffMs: 2_000,
});

export interface ClientOptions {
  /** Deadline of a unary call that sets none; default 10 s. */
  defaultTimeoutMs?: number;
  /** Deadline of a streaming call that sets none; default 1 h. */
  streamTimeoutMs?: number;
  retry?: RetryPolicy;
}

export type CustodianClient = Client<typeof CustodianService>;
export type ExchangeClient = Client<typeof ExchangeService>;
export type ReconciliationClient = Client<typeof ReconciliationService>;
export type RegulatorClient = Client<typeof RegulatorService>;
export type EmergencyReleaseClient = Client<typeof EmergencyReleaseService>;
/** Only servers started in test mode serve TestControlService. */
export type TestControlClient = Client<typeof TestControlService>;

export function createCustodianClient(t: Transport, o?: ClientOptions): CustodianClient {
  return createSdkClient(CustodianService, t, o);
}
export function createExchangeClient(t: Transport, o?: ClientOptions): ExchangeClient {
  return createSdkClient(ExchangeService, t, o);
}
export function createReconciliationClient(t: Transport, o?: ClientOptions): ReconciliationClient {
  return createSdkClient(ReconciliationService, t, o);
}
export function createRegulatorClient(t: Transport, o?: ClientOptions): RegulatorClient {
  return createSdkClient(RegulatorService, t, o);
}
export function createEmergencyReleaseClient(
  t: Transport,
  o?: ClientOptions,
): EmergencyReleaseClient {
  return createSdkClient(EmergencyReleaseService, t, o);
}
export function createTestControlClient(t: Transport, o?: ClientOptions): TestControlClient {
  return createSdkClient(TestControlService, t, o);
}

/** Whether the channel may retry `method`: a unary read (Get*, List*), §13. */
export function isIdempotent(method: DescMethod): boolean {
  return method.methodKind === "unary" && /^(Get|List)/.test(method.name);
}

type AnyFn = (request: unknown, options?: CallOptions) => unknown;

/** The Connect client of any service, with deadlines, error mapping and read retries. */
export function createSdkClient<S extends DescService>(
  service: S,
  transport: Transport,
  options: ClientOptions = {},
): Client<S> {
  const unaryTimeout = options.defaultTimeoutMs ?? DEFAULT_TIMEOUT_MS;
  const streamTimeout = options.streamTimeoutMs ?? DEFAULT_SYNC_STREAM_TIMEOUT_MS;
  const retry = options.retry ?? DEFAULT_RETRY_POLICY;
  const raw = createClient(service, transport) as unknown as Record<string, AnyFn>;
  const client: Record<string, AnyFn> = {};
  for (const method of service.methods) {
    const call = raw[method.localName];
    if (call === undefined) continue;
    if (method.methodKind === "unary" || method.methodKind === "client_streaming") {
      const attempts = isIdempotent(method) ? retry.maxAttempts : 1;
      client[method.localName] = (request, callOptions) =>
        callWithRetry(
          () => call(request, withDeadline(callOptions, unaryTimeout)) as Promise<unknown>,
          attempts,
          retry,
        );
    } else {
      client[method.localName] = (request, callOptions) =>
        mapStreamErrors(call(request, withDeadline(callOptions, streamTimeout)) as AsyncIterable<unknown>);
    }
  }
  return client as unknown as Client<S>;
}

function withDeadline(options: CallOptions | undefined, timeoutMs: number): CallOptions {
  // An explicit timeoutMs wins; otherwise the default — never "no deadline".
  return { ...options, timeoutMs: options?.timeoutMs ?? timeoutMs };
}

async function callWithRetry(
  attempt: () => Promise<unknown>,
  attempts: number,
  policy: RetryPolicy,
): Promise<unknown> {
  for (let n = 1; ; n += 1) {
    try {
      return await attempt();
    } catch (thrown) {
      const error = errorFromCall(thrown);
      const unavailable = error instanceof RpcError && error.statusCode === "UNAVAILABLE";
      if (!unavailable || n >= attempts) throw error;
      const ceiling = Math.min(policy.initialBackoffMs * 2 ** (n - 1), policy.maxBackoffMs);
      // Full jitter, so that many clients of a restarting server do not retry in step.
      await sleep(Math.random() * ceiling);
    }
  }
}

async function* mapStreamErrors(stream: AsyncIterable<unknown>): AsyncGenerator<unknown> {
  try {
    yield* stream;
  } catch (thrown) {
    throw errorFromCall(thrown);
  }
}
