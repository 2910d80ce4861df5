// The exchange's side of the SyncPositions stream (PROTOCOL.md §6): receive the custodian's
// log, verified, stored durably, applied once, acknowledged; resume after any disconnect.
//
// The exchange dials. On each stream it sends its hello with the head it has durably stored
// (§6.2), checks the custodian's hello, then for every SyncBatch: verifies it (§6.5 steps 1–2,
// ./batch.ts), fits it to the stored head (duplicates skipped, a gap or a second history
// refused), validates the new updates and the statements they carry (step 5, ./updates.ts),
// applies them and persists the result together with the new head (steps 6–7, ./store.ts),
// and only then acknowledges. It sends a heartbeat when it has been silent for its interval,
// considers the custodian gone after three of the custodian's intervals of silence (§6.7),
// and refuses bad input with a SyncClose saying why (§6.7a). `maintain` re-dials with
// exponential backoff and resumes, except after an equivocation, which needs an operator.
//
// This exchange sends no entries of its own (its log towards the custodian stays empty, so
// its hello says sent_sequence 0 and no batch is ever signed).

import { create } from "@bufbuild/protobuf";
import { setTimeout as sleep } from "node:timers/promises";
import type { CustodianClient } from "../clients.js";
import { CollateralSyncError, MalformedError, STATUS_BY_REASON, VerificationError } from "../errors.js";
import type { Envelope } from "../gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../gen/collateral_sync/v1/errors_pb.js";
import {
  SyncAckSchema,
  SyncCloseSchema,
  SyncDirection,
  SyncFrameSchema,
  SyncHeartbeatSchema,
  SyncHelloSchema,
  type SyncClose,
  type SyncFrame,
  type SyncHello,
} from "../gen/collateral_sync/v1/position_sync_pb.js";
import { SyncPositionsRequestSchema, type SyncPositionsRequest } from "../gen/collateral_sync/v1/custodian_service_pb.js";
import type { KeyRegistry } from "../registry.js";
import { DEFAULT_MAX_SKEW_SECONDS } from "../signing.js";
import { timestampFromDate } from "../time.js";
import { RpcError } from "../transport.js";
import { fitChain, type ChainFit } from "../syncChain.js";
import { equalBytes, hex, verifySyncBatch, type VerifiedSyncBatch } from "./batch.js";
import { PushQueue } from "./queue.js";
import { EMPTY_HEAD, replayKey, type LogHead, type ReceivedLogStore } from "./store.js";
import { validateUpdates, type ReceivedUpdate } from "./updates.js";

export const DEFAULT_WINDOW = 8_000;
export const DEFAULT_HEARTBEAT_INTERVAL_MS = 5_000;
/** A peer silent for this many of its heartbeat intervals is considered gone (§6.7). */
export const LIVENESS_INTERVALS = 3;
/** Re-dial backoff (§6.7): initial, factor 2, maximum, with jitter. */
const DIAL_INITIAL_MS = 100;
const DIAL_MAX_MS = 10_000;
/** A stream that lasted this long was healthy: the next re-dial starts from the initial delay. */
const HEALTHY_STREAM_MS = 2_000;
/** How long a refusal's SyncClose gets to reach the custodian before the call is torn down. */
const CLOSE_GRACE_MS = 1_000;

/** What the application makes of the new entries of one batch. */
export interface ApplyResult<S> {
  /** The application state after the batch; persisted together with the new head. */
  state: S;
  /**
   * Entries whose update the application could not act on for business reasons (§6.5):
   * recorded as rejected in `state` by the application, and not recorded for replay.
   */
  rejected?: readonly bigint[];
}

/**
 * Apply verified new entries, in order, to the application state: a pure function of its
 * arguments (the session persists what it returns). Throwing a CollateralSyncError refuses
 * the whole batch with that reason; nothing of it is stored.
 */
export type ApplyUpdates<S> = (updates: readonly ReceivedUpdate[], state: S) => ApplyResult<S>;

/** What happened on the stream, for logs and tests; sequences are bigint. */
export type SyncEvent =
  | { type: "hello_sent"; receivedSequence: bigint; receivedEntryHash: string; window: number }
  | { type: "hello_received"; receivedSequence: bigint; sentSequence: bigint; window: number; heartbeatIntervalMs: number }
  | { type: "batch_stored"; firstSequence: bigint; lastSequence: bigint; firstNew: bigint; entries: number }
  | { type: "batch_duplicate"; firstSequence: bigint; lastSequence: bigint }
  | { type: "ack_sent"; sequence: bigint; entryHash: string }
  | { type: "heartbeat_sent" }
  | { type: "heartbeat_received"; sentSequence: bigint }
  | { type: "refused"; reason: string; code: string; message: string; metadata: Record<string, string> }
  | { type: "peer_closed"; reason: string; message: string; metadata: Record<string, string> }
  | { type: "stream_ended" }
  | { type: "stream_failed"; error: string; reason: string; code: string }
  | { type: "redial"; delayMs: number };

export interface ExchangeSessionOptions<S> {
  /** Our party id (the exchange; our TLS CN). */
  partyId: string;
  /** The custodian's party id. */
  custodianId: string;
  registry: KeyRegistry;
  store: ReceivedLogStore<S>;
  apply: ApplyUpdates<S>;
  /** Custodian entries we accept unacknowledged (≥ 1). */
  window?: number;
  /** We send a frame at least this often. */
  heartbeatIntervalMs?: number;
  maxSkewSeconds?: number;
  clock?: () => Date;
  onEvent?: (event: SyncEvent) => void;
}

/** One stream as the session sees it: frames out, frames in, and the half-close. */
export interface FrameChannel {
  send(frame: SyncFrame): void;
  readonly frames: AsyncIterator<SyncFrame>;
  /** No more frames from us (after those already sent). */
  end(): void;
}

/** The custodian said nothing for three of its heartbeat intervals (§6.7). */
export class PeerSilentError extends Error {
  constructor(readonly silentMs: number) {
    super(`the custodian sent nothing for ${silentMs} ms; the stream is considered dead`);
    this.name = "PeerSilentError";
  }
}

/** An error this side raised about the peer's input: it ends the stream with a SyncClose. */
function isRefusal(error: unknown): error is CollateralSyncError {
  return error instanceof CollateralSyncError && !(error instanceof RpcError);
}

export class ExchangeSyncSession<S> {
  private readonly window: number;
  private readonly intervalMs: number;
  private readonly maxSkewSeconds: number;
  private readonly clock: () => Date;
  private readonly emit: (event: SyncEvent) => void;
  /** Highest sequence we told the custodian is durable here (hello or ack) on this stream. */
  private acknowledged = 0n;
  private peerSent = 0n;

  constructor(private readonly options: ExchangeSessionOptions<S>) {
    this.window = options.window ?? DEFAULT_WINDOW;
    this.intervalMs = options.heartbeatIntervalMs ?? DEFAULT_HEARTBEAT_INTERVAL_MS;
    if (!Number.isInteger(this.window) || this.window < 1 || this.window >= 2 ** 32) {
      throw new RangeError(`expected 1 <= window < 2**32, got ${this.window}`);
    }
    if (!Number.isInteger(this.intervalMs) || this.intervalMs < 1 || this.intervalMs >= 2 ** 32) {
      throw new RangeError(`expected a heartbeat interval of 1 ms or more, got ${this.intervalMs}`);
    }
    this.maxSkewSeconds = options.maxSkewSeconds ?? DEFAULT_MAX_SKEW_SECONDS;
    this.clock = options.clock ?? (() => new Date());
    this.emit = options.onEvent ?? (() => undefined);
  }

  /** Head of the custodian's log as durably received (and applied) here. */
  get receivedHead(): LogHead {
    return this.options.store.head();
  }

  /** Head of the custodian's own log, as it last said (hello or heartbeat). */
  get peerSentSequence(): bigint {
    return this.peerSent;
  }

  /**
   * Keep the stream up until `signal` aborts: dial, run, and after every end re-dial with
   * backoff and resume from the stored head (§6.7). Returns when aborted; throws only an
   * EQUIVOCATION (two histories of one log: resuming cannot fix it, §6.5).
   */
  async maintain(client: CustodianClient, signal: AbortSignal): Promise<void> {
    let delay = DIAL_INITIAL_MS;
    while (!signal.aborted) {
      const started = Date.now();
      try {
        await this.dial(client, signal);
        this.emit({ type: "stream_ended" });
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof CollateralSyncError && error.reason === ErrorReason.EQUIVOCATION) throw error;
        this.emit({
          type: "stream_failed",
          error: error instanceof Error ? error.message : String(error),
          reason: error instanceof CollateralSyncError ? error.reasonName : "",
          code: error instanceof CollateralSyncError ? error.code : "",
        });
      }
      if (Date.now() - started >= HEALTHY_STREAM_MS) delay = DIAL_INITIAL_MS;
      const wait = Math.round(delay * (0.5 + Math.random() / 2));
      this.emit({ type: "redial", delayMs: wait });
      try {
        await sleep(wait, undefined, { signal });
      } catch {
        return; // aborted while waiting
      }
      delay = Math.min(delay * 2, DIAL_MAX_MS);
    }
  }

  /**
   * Run one SyncPositions call through `client` until the custodian ends it (returns) or
   * something fails: RpcError for the custodian's status or SyncClose, a CollateralSyncError
   * when we refused its input (after telling it), PeerSilentError when it went silent.
   */
  async dial(client: CustodianClient, signal?: AbortSignal): Promise<void> {
    const requests = new PushQueue<SyncPositionsRequest>();
    const call = new AbortController();
    const onAbort = (): void => call.abort();
    signal?.addEventListener("abort", onAbort, { once: true });
    const responses = client.syncPositions(requests, { signal: call.signal })[Symbol.asyncIterator]();
    const frames: AsyncIterator<SyncFrame> = {
      next: async () => {
        const result = await responses.next();
        if (result.done === true) return { done: true, value: undefined };
        const frame = result.value.frame;
        if (frame === undefined) {
          throw new MalformedError("SyncPositionsResponse without a frame", {
            metadata: { field: "frame", expected: "a SyncFrame", actual: "absent" },
          });
        }
        return { done: false, value: frame };
      },
    };
    try {
      await this.runStream({
        send: (frame) => requests.push(create(SyncPositionsRequestSchema, { frame })),
        frames,
        end: () => requests.end(),
      });
    } catch (error) {
      if (isRefusal(error)) {
        // Let the SyncClose reach the custodian before the call is torn down: wait (briefly)
        // for it to end the call.
        await drain(responses, CLOSE_GRACE_MS);
      }
      throw error;
    } finally {
      requests.end();
      signal?.removeEventListener("abort", onAbort);
      call.abort();
    }
  }

  /** Run the protocol over one stream (see FrameChannel). */
  async runStream(channel: FrameChannel): Promise<void> {
    let lastSentAt = Date.now();
    const send = (frame: SyncFrame): void => {
      channel.send(frame);
      lastSentAt = Date.now();
    };
    let heartbeat: NodeJS.Timeout | undefined;
    try {
      const head = this.options.store.head();
      send(this.hello(head));
      this.acknowledged = head.sequence;
      this.emit({ type: "hello_sent", receivedSequence: head.sequence, receivedEntryHash: hex(head.entryHash), window: this.window });

      const first = await nextWithin(channel.frames, LIVENESS_INTERVALS * this.intervalMs);
      if (first.done === true) return; // the custodian ended the stream before saying anything
      const frame = first.value.frame;
      if (frame.case === "close") throw this.peerClosed(frame.value);
      if (frame.case !== "hello") {
        throw new MalformedError(`first frame must be a hello, got ${frame.case ?? "an empty frame"}`, {
          metadata: { expected: "hello", actual: frame.case ?? "unset" },
        });
      }
      const peerIntervalMs = this.acceptHello(frame.value);

      // Heartbeats only after the hello exchange (§6.2): a frame at least every interval.
      const beat = (): void => {
        const idle = Date.now() - lastSentAt;
        if (idle >= this.intervalMs) {
          send(create(SyncFrameSchema, {
            frame: {
              case: "heartbeat",
              value: create(SyncHeartbeatSchema, { sentAt: timestampFromDate(this.clock()), sentSequence: 0n }),
            },
          }));
          this.emit({ type: "heartbeat_sent" });
        }
        heartbeat = setTimeout(beat, Math.max(1, this.intervalMs - (Date.now() - lastSentAt)));
      };
      heartbeat = setTimeout(beat, this.intervalMs);

      const deadAfter = LIVENESS_INTERVALS * peerIntervalMs;
      for (;;) {
        const next = await nextWithin(channel.frames, deadAfter);
        if (next.done === true) return; // the custodian ended the stream
        const current = next.value.frame;
        switch (current.case) {
          case "batch":
            await this.onBatch(current.value, send);
            break;
          case "ack":
            // Our log towards the custodian is empty: any ack beyond 0 claims entries we never sent.
            if (current.value.sequence > 0n) {
              throw new CollateralSyncError(`ack of sequence ${current.value.sequence}, but only up to 0 was sent`, {
                reason: ErrorReason.OUT_OF_RANGE,
                metadata: { expected: "<= 0", actual: String(current.value.sequence) },
              });
            }
            break;
          case "heartbeat":
            this.peerSent = current.value.sentSequence;
            this.emit({ type: "heartbeat_received", sentSequence: current.value.sentSequence });
            break;
          case "close":
            throw this.peerClosed(current.value);
          default:
            throw new MalformedError(`unexpected ${current.case ?? "empty"} frame after the hello exchange`, {
              metadata: { expected: "batch|ack|heartbeat|close", actual: current.case ?? "unset" },
            });
        }
      }
    } catch (error) {
      if (isRefusal(error)) {
        const close = create(SyncCloseSchema, { reason: error.reason, message: error.message, metadata: error.metadata });
        send(create(SyncFrameSchema, { frame: { case: "close", value: close } }));
        this.emit({ type: "refused", reason: error.reasonName, code: error.code, message: error.message, metadata: error.metadata });
      }
      throw error;
    } finally {
      clearTimeout(heartbeat);
      channel.end();
    }
  }

  private hello(head: LogHead): SyncFrame {
    const hello = create(SyncHelloSchema, {
      partyId: this.options.partyId,
      sendingDirection: SyncDirection.EXCHANGE_TO_CUSTODIAN,
      receivedSequence: head.sequence,
      receivedEntryHash: head.entryHash,
      sentSequence: 0n,
      window: this.window,
      heartbeatIntervalMs: this.intervalMs,
    });
    return create(SyncFrameSchema, { frame: { case: "hello", value: hello } });
  }

  /** Check the custodian's hello (§6.2 step 3); returns its heartbeat interval. */
  private acceptHello(hello: SyncHello): number {
    const custodian = this.options.custodianId;
    if (hello.partyId !== custodian) {
      throw new VerificationError(`hello from party ${JSON.stringify(hello.partyId)}, expected ${JSON.stringify(custodian)}`, {
        reason: ErrorReason.KEY_ROLE_MISMATCH,
        metadata: { expected: custodian, actual: hello.partyId },
      });
    }
    if (hello.sendingDirection !== SyncDirection.CUSTODIAN_TO_EXCHANGE) {
      throw new VerificationError(`peer says it sends direction ${hello.sendingDirection}, expected CUSTODIAN_TO_EXCHANGE`, {
        reason: ErrorReason.KEY_ROLE_MISMATCH,
        metadata: { expected: String(SyncDirection.CUSTODIAN_TO_EXCHANGE), actual: String(hello.sendingDirection) },
      });
    }
    if (hello.window < 1) {
      throw new MalformedError("hello window must be >= 1, got 0", {
        metadata: { expected: ">= 1", actual: String(hello.window) },
        fieldViolations: { "hello.window": "must be >= 1" },
      });
    }
    if (hello.receivedEntryHash.length !== 32) {
      throw new MalformedError(`hello received_entry_hash must be 32 bytes, got ${hello.receivedEntryHash.length}`, {
        metadata: { expected: "32", actual: String(hello.receivedEntryHash.length) },
        fieldViolations: { "hello.received_entry_hash": "must be 32 bytes" },
      });
    }
    // Our own log is empty: the custodian cannot have received anything of it.
    if (hello.receivedSequence > 0n) {
      throw new CollateralSyncError(
        `peer claims to have received our entries up to ${hello.receivedSequence}, but our log ends at 0`,
        { reason: ErrorReason.OUT_OF_RANGE, metadata: { expected: "<= 0", actual: String(hello.receivedSequence) } },
      );
    }
    if (!equalBytes(hello.receivedEntryHash, EMPTY_HEAD.entryHash)) {
      throw new VerificationError("peer claims a hash of our empty log other than 32 zero bytes", {
        reason: ErrorReason.EQUIVOCATION,
        metadata: { sequence: "0", expected: hex(EMPTY_HEAD.entryHash), actual: hex(hello.receivedEntryHash) },
      });
    }
    this.peerSent = hello.sentSequence;
    const interval = hello.heartbeatIntervalMs === 0 ? DEFAULT_HEARTBEAT_INTERVAL_MS : hello.heartbeatIntervalMs;
    this.emit({
      type: "hello_received",
      receivedSequence: hello.receivedSequence,
      sentSequence: hello.sentSequence,
      window: hello.window,
      heartbeatIntervalMs: interval,
    });
    return interval;
  }

  /** §6.5: verify, fit, validate, apply and persist, then acknowledge. */
  private async onBatch(envelope: Envelope, send: (frame: SyncFrame) => void): Promise<void> {
    const { store, registry, partyId, custodianId } = this.options;
    const now = this.clock();
    const batch = verifySyncBatch(envelope, registry, {
      receiver: partyId,
      sender: custodianId,
      direction: SyncDirection.CUSTODIAN_TO_EXCHANGE,
      now,
      maxEntries: this.window,
      maxSkewSeconds: this.maxSkewSeconds,
    });
    const { chain } = batch;
    // The window counts what was sent and not acknowledged (§6.6), duplicates included.
    const unacknowledged = chain.lastSequence - this.acknowledged;
    if (unacknowledged > BigInt(this.window)) {
      throw new CollateralSyncError(
        `${unacknowledged} entries unacknowledged, more than our window of ${this.window}`,
        { reason: ErrorReason.LIMIT_EXCEEDED, metadata: { expected: `<= ${this.window}`, actual: String(unacknowledged) } },
      );
    }
    const head = store.head();
    const fit = await this.fit(batch, head, now);
    if (fit.firstNewSequence > chain.lastSequence) {
      // Only entries stored already: dropped, and our ack repeated in case the last was lost.
      this.emit({ type: "batch_duplicate", firstSequence: chain.firstSequence, lastSequence: chain.lastSequence });
      this.ack(head, send);
      return;
    }
    const firstNew = fit.firstNewSequence;
    const validated = validateUpdates(batch.updates.slice(Number(firstNew - chain.firstSequence)), firstNew, {
      registry,
      receiver: partyId,
      sender: custodianId,
      direction: SyncDirection.CUSTODIAN_TO_EXCHANGE,
      now,
      maxSkewSeconds: this.maxSkewSeconds,
      lastAccepted: (issuer, payloadType) => store.lastAccepted(issuer, payloadType),
    });
    const result = this.options.apply(validated.updates, store.state());
    // A statement the application rejected is not recorded for replay (§6.5).
    const rejected = new Set(result.rejected ?? []);
    const replay = new Map<string, bigint>();
    for (const update of validated.updates) {
      const statement = update.statement;
      if (statement === undefined || rejected.has(update.sequence)) continue;
      const key = replayKey(statement.issuer, statement.payloadType);
      if (statement.sequence > (replay.get(key) ?? 0n)) replay.set(key, statement.sequence);
    }
    await store.commit({ envelope, firstNew, head: fit.head, replay, state: result.state });
    this.emit({
      type: "batch_stored",
      firstSequence: chain.firstSequence,
      lastSequence: chain.lastSequence,
      firstNew,
      entries: chain.entryHashes.length,
    });
    this.ack(fit.head, send);
  }

  private ack(head: LogHead, send: (frame: SyncFrame) => void): void {
    const ack = create(SyncAckSchema, { sequence: head.sequence, entryHash: head.entryHash });
    send(create(SyncFrameSchema, { frame: { case: "ack", value: ack } }));
    this.acknowledged = head.sequence;
    this.emit({ type: "ack_sent", sequence: head.sequence, entryHash: hex(head.entryHash) });
  }

  /**
   * How `batch` fits the stored log ending at `head` (§6.5 steps 3–4, fitChain of
   * ../syncChain.ts). On equivocation the evidence is kept before the batch is refused.
   */
  private async fit(batch: VerifiedSyncBatch, head: LogHead, now: Date): Promise<ChainFit> {
    const { chain } = batch;
    // fitChain compares duplicates at the last of them; below the head that hash is on disk.
    const stored =
      chain.firstSequence <= head.sequence && chain.lastSequence < head.sequence
        ? await this.options.store.entryHashAt(chain.lastSequence)
        : undefined;
    try {
      return fitChain(chain, head, (sequence) => (sequence === chain.lastSequence ? stored : undefined));
    } catch (error) {
      if (error instanceof CollateralSyncError && error.reason === ErrorReason.EQUIVOCATION) {
        await this.options.store.keepEvidence({
          sequence: BigInt(error.metadata["sequence"] ?? "0"),
          storedEntryHash: Buffer.from(error.metadata["expected"] ?? "", "hex"),
          receivedEntryHash: Buffer.from(error.metadata["actual"] ?? "", "hex"),
          receivedBatch: batch.statement.envelope,
          detectedAt: now,
        });
      }
      throw error;
    }
  }

  /** The custodian's SyncClose as the error it reports (as a call status would, §6.7a). */
  private peerClosed(close: SyncClose): RpcError {
    this.emit({ type: "peer_closed", reason: ErrorReason[close.reason] ?? "UNSPECIFIED", message: close.message, metadata: { ...close.metadata } });
    return new RpcError(close.message || "peer closed the sync stream", {
      statusCode: STATUS_BY_REASON[close.reason] ?? "UNKNOWN",
      reason: ErrorReason[close.reason] === undefined ? ErrorReason.UNSPECIFIED : close.reason,
      metadata: { ...close.metadata },
    });
  }
}

/** The next value of `iterator`, or PeerSilentError if none comes within `ms`. */
async function nextWithin<T>(iterator: AsyncIterator<T>, ms: number): Promise<IteratorResult<T>> {
  let timer: NodeJS.Timeout | undefined;
  const silence = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new PeerSilentError(ms)), ms);
  });
  const next = iterator.next();
  // If silence wins, the pending read still settles later (the call is aborted): that
  // outcome is not news, and must not surface as an unhandled rejection.
  next.catch(() => undefined);
  try {
    return await Promise.race([next, silence]);
  } finally {
    clearTimeout(timer);
  }
}

/** Read and drop what is left of a call for at most `ms`, so that it can end on its own terms. */
async function drain(iterator: AsyncIterator<unknown>, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  try {
    for (;;) {
      const next = await nextWithin(iterator, Math.max(1, deadline - Date.now()));
      if (next.done === true) return;
    }
  } catch {
    // The call's own end status (or silence) is not news: we already know why it ends.
  }
}
