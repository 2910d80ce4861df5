// The exchange's sync session (src/sync/session.ts) driven frame by frame (PROTOCOL.md §6).
//
// A scripted custodian signs real batches with an Ed25519 key from the test registry and
// feeds them to the session over an in-memory channel; the session stores what it accepts in
// a real FileSyncStore under a temporary directory. What a real custodian cannot be made to
// send — a tampered signature, a broken chain, a gap, a second history, a replayed or
// misaddressed statement — is sent here, and each must be refused with its reason, told to
// the custodian in a SyncClose, and leave the stored log exactly as it was. Resume is checked
// by reopening the store from disk: the hello names the stored head, duplicates are skipped.

import assert from "node:assert/strict";
import { mkdtemp, readFile, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import {
  AttestationRefSchema,
  HoldingsChangeReason,
  HoldingsStatementSchema,
  type HoldingsStatement,
} from "../src/gen/collateral_sync/v1/attestation_pb.js";
import { PartyRole } from "../src/gen/collateral_sync/v1/common_pb.js";
import { StatementHeaderSchema, type Envelope } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { PartyKeySchema } from "../src/gen/collateral_sync/v1/keys_pb.js";
import {
  PositionUpdateSchema,
  SyncBatchSchema,
  SyncCloseSchema,
  SyncDirection,
  SyncFrameSchema,
  SyncHelloSchema,
  type PositionUpdate,
  type SyncFrame,
} from "../src/gen/collateral_sync/v1/position_sync_pb.js";
import { CollateralSyncError, StateError } from "../src/errors.js";
import { leafHash } from "../src/merkle.js";
import { KeyRegistry } from "../src/registry.js";
import { pae } from "../src/signing.js";
import { payloadTypeOf } from "../src/statements.js";
import { ZERO_HASH, entryHash } from "../src/syncChain.js";
import { timestampFromDate } from "../src/time.js";
import { RpcError } from "../src/transport.js";
import { PushQueue } from "../src/sync/queue.js";
import { ExchangeSyncSession, PeerSilentError, type ApplyResult, type FrameChannel } from "../src/sync/session.js";
import { FileSyncStore } from "../src/sync/store.js";
import type { ReceivedUpdate } from "../src/sync/updates.js";
import { TestSigner, signedEnvelope } from "./verification-fixtures.js";

const CUSTODIAN = "custodian-1";
const EXCHANGE = "exchange-1";
const OTHER_EXCHANGE = "exchange-2";
const BATCH_TYPE = payloadTypeOf(SyncBatchSchema);
const HOLDINGS_TYPE = payloadTypeOf(HoldingsStatementSchema);
const DIRECTION = SyncDirection.CUSTODIAN_TO_EXCHANGE;
const ORIGIN = `${CUSTODIAN}/collateral-sync/attestations`;

const custodianKey = TestSigner.fromHex("01".repeat(32));
const exchangeKey = TestSigner.fromHex("02".repeat(32));
const registry = new KeyRegistry(
  [
    [CUSTODIAN, PartyRole.CUSTODIAN, custodianKey],
    [EXCHANGE, PartyRole.EXCHANGE, exchangeKey],
  ].map(([partyId, role, key]) =>
    create(PartyKeySchema, {
      partyId: partyId as string,
      role: role as PartyRole,
      publicKey: (key as TestSigner).publicKey,
      keyId: (key as TestSigner).keyId,
      validFrom: timestampFromDate(new Date("2020-01-01T00:00:00Z")),
    }),
  ),
);

const directories: string[] = [];
after(async () => {
  for (const directory of directories) await rm(directory, { recursive: true, force: true });
});

async function temporaryDirectory(): Promise<string> {
  const directory = await mkdtemp(join(tmpdir(), "cs-session-"));
  directories.push(directory);
  return directory;
}

// ------------------------------------------------------------------ a scripted custodian

interface Statement {
  sequence: bigint;
  audience?: string[];
  issuedAt?: Date;
  ttlMs?: number;
}

/** The custodian's side: its log of entries and the batches and statements it signs. */
class Custodian {
  readonly updates: Uint8Array[] = [];
  readonly hashes: Uint8Array[] = [];
  private statementSequence = 0n;

  header(options: Statement) {
    const issuedAt = options.issuedAt ?? new Date();
    return create(StatementHeaderSchema, {
      issuer: CUSTODIAN,
      audience: options.audience ?? [EXCHANGE],
      sequence: options.sequence,
      issuedAt: timestampFromDate(issuedAt),
      expiresAt: timestampFromDate(new Date(issuedAt.getTime() + (options.ttlMs ?? 300_000))),
      statementId: `stmt-${options.sequence}`,
    });
  }

  /** A holdings change of `account` at `epoch`, its statement signed and attested. */
  holdings(
    account: string,
    epoch: bigint,
    options: Partial<Statement> = {},
    reason = HoldingsChangeReason.UNSPECIFIED,
  ): PositionUpdate {
    this.statementSequence += 1n;
    const statement: HoldingsStatement = create(HoldingsStatementSchema, {
      header: this.header({ sequence: options.sequence ?? this.statementSequence, ...options }),
      accountId: account,
      exchangeId: EXCHANGE,
      epoch,
      reason,
    });
    const payload = toBinary(HoldingsStatementSchema, statement);
    const envelope = signedEnvelope(HOLDINGS_TYPE, payload, [custodianKey]);
    const attestation = create(AttestationRefSchema, {
      logOrigin: ORIGIN,
      leafIndex: epoch,
      leafHash: leafHash(pae(HOLDINGS_TYPE, payload)),
      treeSize: epoch + 1n,
    });
    return create(PositionUpdateSchema, {
      update: { case: "holdingsChange", value: { holdingsStatement: envelope, attestation } },
    });
  }

  pledge(account: string, quantity: string): PositionUpdate {
    return create(PositionUpdateSchema, {
      update: { case: "pledgeChange", value: { accountId: account, assetId: "USDC", pledgedQuantity: { value: quantity } } },
    });
  }

  /** Append updates to the log (entry hashes chained from the last). */
  append(...updates: PositionUpdate[]): void {
    for (const update of updates) this.appendBytes(toBinary(PositionUpdateSchema, update));
  }

  appendBytes(bytes: Uint8Array): void {
    const sequence = BigInt(this.updates.length + 1);
    const prev = this.hashes[this.hashes.length - 1] ?? ZERO_HASH;
    this.updates.push(bytes);
    this.hashes.push(entryHash(DIRECTION, sequence, prev, bytes));
  }

  /** A signed batch of entries first..last of the log (1-based, inclusive). */
  batch(first: number, last: number, tamper: (entries: { update: Uint8Array; entryHash: Uint8Array }[]) => void = () => {}): SyncFrame {
    const entries = [];
    for (let sequence = first; sequence <= last; sequence += 1) {
      entries.push({
        sequence: BigInt(sequence),
        prevEntryHash: this.hashes[sequence - 2] ?? ZERO_HASH,
        update: this.updates[sequence - 1] as Uint8Array,
        entryHash: this.hashes[sequence - 1] as Uint8Array,
      });
    }
    tamper(entries);
    const batch = create(SyncBatchSchema, {
      header: this.header({ sequence: BigInt(last) }),
      direction: DIRECTION,
      entries,
    });
    return frame({ case: "batch", value: signedEnvelope(BATCH_TYPE, toBinary(SyncBatchSchema, batch), [custodianKey]) });
  }

  hello(overrides: { partyId?: string; receivedSequence?: bigint; heartbeatIntervalMs?: number } = {}): SyncFrame {
    return frame({
      case: "hello",
      value: create(SyncHelloSchema, {
        partyId: overrides.partyId ?? CUSTODIAN,
        sendingDirection: DIRECTION,
        receivedSequence: overrides.receivedSequence ?? 0n,
        receivedEntryHash: ZERO_HASH,
        sentSequence: BigInt(this.updates.length),
        window: 100,
        heartbeatIntervalMs: overrides.heartbeatIntervalMs ?? 60_000,
      }),
    });
  }
}

function frame(value: SyncFrame["frame"]): SyncFrame {
  return create(SyncFrameSchema, { frame: value });
}

// ------------------------------------------------------------------ the channel

/** Frames both ways in memory; `sent` waits (on events, not time) for the session's frames. */
class Wire implements FrameChannel {
  readonly sent: SyncFrame[] = [];
  ended = false;
  private readonly incoming = new PushQueue<SyncFrame>();
  readonly frames = this.incoming[Symbol.asyncIterator]();
  private waiters: (() => void)[] = [];

  send(f: SyncFrame): void {
    this.sent.push(f);
    for (const wake of this.waiters.splice(0)) wake();
  }

  end(): void {
    this.ended = true;
  }

  deliver(...frames: SyncFrame[]): void {
    for (const f of frames) this.incoming.push(f);
  }

  finish(): void {
    this.incoming.end();
  }

  /** The `count`-th frame of kind `kind` the session sent (1-based). */
  async nth(kind: NonNullable<SyncFrame["frame"]["case"]>, count = 1): Promise<SyncFrame> {
    for (;;) {
      const found = this.sent.filter((f) => f.frame.case === kind);
      const hit = found[count - 1];
      if (hit !== undefined) return hit;
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  kinds(): string[] {
    return this.sent.map((f) => f.frame.case ?? "unset");
  }
}

// ------------------------------------------------------------------ the application

interface State {
  applied: string[];
  epochs: Record<string, string>;
}
const INITIAL: State = { applied: [], epochs: {} };

function apply(updates: readonly ReceivedUpdate[], state: State): ApplyResult<State> {
  const next = structuredClone(state);
  for (const update of updates) {
    next.applied.push(String(update.sequence));
    if (update.update.update.case === "holdingsChange") {
      const statement = update.statement?.message as HoldingsStatement;
      next.epochs[statement.accountId] = String(statement.epoch);
    }
  }
  return { state: next };
}

async function openSession(directory: string, applyUpdates = apply, heartbeatIntervalMs = 60_000) {
  const store = await FileSyncStore.open<State>(directory, CUSTODIAN, INITIAL);
  const session = new ExchangeSyncSession<State>({
    partyId: EXCHANGE,
    custodianId: CUSTODIAN,
    registry,
    store,
    apply: applyUpdates,
    window: 4,
    heartbeatIntervalMs,
  });
  return { store, session };
}

function ackOf(f: SyncFrame): bigint {
  assert.equal(f.frame.case, "ack");
  return f.frame.case === "ack" ? f.frame.value.sequence : -1n;
}

function helloOf(f: SyncFrame) {
  assert.equal(f.frame.case, "hello");
  if (f.frame.case !== "hello") throw new Error("not a hello");
  return f.frame.value;
}

/** Run a stream that the session must refuse; returns the error and the SyncClose it sent. */
async function refused(directory: string, custodian: Custodian, frames: SyncFrame[], applyUpdates = apply) {
  const { store, session } = await openSession(directory, applyUpdates);
  const before = await readFile(join(directory, "received-log.json"), "utf8").catch(() => "");
  const wire = new Wire();
  const running = session.runStream(wire);
  await wire.nth("hello");
  wire.deliver(custodian.hello(), ...frames);
  const error = await running.then(
    () => assert.fail("the session accepted what it must refuse"),
    (e: unknown) => e,
  );
  assert.ok(error instanceof CollateralSyncError, String(error));
  const close = wire.sent[wire.sent.length - 1];
  assert.equal(close?.frame.case, "close", `last frame sent: ${wire.kinds().join(",")}`);
  assert.ok(wire.ended);
  const after = await readFile(join(directory, "received-log.json"), "utf8").catch(() => "");
  assert.equal(after, before, "a refused batch changed the stored log");
  return { error, close: close?.frame.case === "close" ? close.frame.value : undefined, store };
}

/** Store entries 1..n (two batches) on a fresh directory; returns it and the custodian. */
async function storedLog(): Promise<{ directory: string; custodian: Custodian }> {
  const directory = await temporaryDirectory();
  const custodian = new Custodian();
  custodian.append(custodian.holdings("acct-1", 1n), custodian.pledge("acct-1", "10.5"), custodian.holdings("acct-1", 2n));
  const { session } = await openSession(directory);
  const wire = new Wire();
  const running = session.runStream(wire);
  await wire.nth("hello");
  wire.deliver(custodian.hello(), custodian.batch(1, 2), custodian.batch(3, 3));
  await wire.nth("ack", 2);
  wire.finish();
  await running;
  return { directory, custodian };
}

// ------------------------------------------------------------------ tests

test("batches are verified, applied once, stored, acknowledged; a new session resumes from the stored head", async () => {
  const { directory, custodian } = await storedLog();

  // A restarted exchange: the store is reopened from disk.
  const { store, session } = await openSession(directory);
  assert.equal(store.head().sequence, 3n);
  assert.deepEqual(store.state(), { applied: ["1", "2", "3"], epochs: { "acct-1": "2" } });
  assert.equal(store.lastAccepted(CUSTODIAN, HOLDINGS_TYPE), 2n);

  custodian.append(custodian.pledge("acct-1", "20"), custodian.holdings("acct-1", 3n));
  const wire = new Wire();
  const running = session.runStream(wire);
  const hello = helloOf(await wire.nth("hello"));
  assert.equal(hello.partyId, EXCHANGE);
  assert.equal(hello.sendingDirection, SyncDirection.EXCHANGE_TO_CUSTODIAN);
  assert.equal(hello.receivedSequence, 3n);
  assert.deepEqual(hello.receivedEntryHash, custodian.hashes[2]);
  assert.equal(hello.sentSequence, 0n);
  assert.equal(hello.window, 4);
  // A custodian that did not see our last ack sends entries we have again, with new ones.
  wire.deliver(custodian.hello(), custodian.batch(2, 4));
  assert.equal(ackOf(await wire.nth("ack", 1)), 4n);
  // Only duplicates: dropped, and the ack repeated.
  wire.deliver(custodian.batch(1, 3));
  assert.equal(ackOf(await wire.nth("ack", 2)), 4n);
  wire.deliver(custodian.batch(5, 5));
  const ack = await wire.nth("ack", 3);
  assert.equal(ackOf(ack), 5n);
  assert.deepEqual(ack.frame.case === "ack" ? ack.frame.value.entryHash : undefined, custodian.hashes[4]);
  wire.finish();
  await running;
  assert.deepEqual(store.state().applied, ["1", "2", "3", "4", "5"]);
  assert.deepEqual(store.state().epochs, { "acct-1": "3" });
  assert.equal(store.head().sequence, 5n);
  assert.deepEqual(await store.entryHashAt(2n), custodian.hashes[1]);
  assert.deepEqual((await readdir(join(directory, "batches"))).sort(), ["2.envelope", "3.envelope", "5.envelope", "4.envelope"].sort());
});

test("a holdings change that refreshes a statement (reason REFRESH) is applied like any other (§5.8)", async () => {
  const directory = await temporaryDirectory();
  const custodian = new Custodian();
  custodian.append(
    custodian.holdings("acct-1", 1n, {}, HoldingsChangeReason.DEPOSIT),
    custodian.holdings("acct-1", 2n, {}, HoldingsChangeReason.REFRESH),
  );
  const reasons: string[] = [];
  const recording = (updates: readonly ReceivedUpdate[], state: State): ApplyResult<State> => {
    for (const update of updates) {
      const statement = update.statement?.message as HoldingsStatement;
      reasons.push(HoldingsChangeReason[statement.reason] ?? String(statement.reason));
    }
    return apply(updates, state);
  };
  const { store, session } = await openSession(directory, recording);
  const wire = new Wire();
  const running = session.runStream(wire);
  await wire.nth("hello");
  wire.deliver(custodian.hello(), custodian.batch(1, 2));
  assert.equal(ackOf(await wire.nth("ack")), 2n);
  wire.finish();
  await running;
  assert.deepEqual(reasons, ["DEPOSIT", "REFRESH"]);
  assert.deepEqual(store.state(), { applied: ["1", "2"], epochs: { "acct-1": "2" } });
});

test("a batch whose signature does not verify is refused with SIGNATURE_INVALID and stores nothing", async () => {
  const { directory, custodian } = await storedLog();
  custodian.append(custodian.pledge("acct-1", "1"));
  const tampered = custodian.batch(4, 4);
  const envelope = (tampered.frame.value as Envelope);
  const signature = envelope.signatures[0];
  assert.ok(signature !== undefined);
  signature.sig = Uint8Array.from(signature.sig, (byte, index) => (index === 0 ? byte ^ 1 : byte));
  const { error, close, store } = await refused(directory, custodian, [tampered]);
  assert.equal(error.reason, ErrorReason.SIGNATURE_INVALID);
  assert.equal(close?.reason, ErrorReason.SIGNATURE_INVALID);
  assert.equal(store.head().sequence, 3n);
});

test("an entry whose hash does not match its content is refused MALFORMED", async () => {
  const { directory, custodian } = await storedLog();
  custodian.append(custodian.pledge("acct-1", "1"));
  const forged = custodian.batch(4, 4, (entries) => {
    // Another update under the old hash, re-signed: the signature holds, the chain does not.
    (entries[0] as { update: Uint8Array }).update = toBinary(PositionUpdateSchema, custodian.pledge("acct-1", "1000000"));
  });
  const { error, close } = await refused(directory, custodian, [forged]);
  assert.equal(error.reason, ErrorReason.MALFORMED);
  assert.equal(close?.metadata["expected"]?.length, 64);
});

test("a batch past the stored head is SEQUENCE_GAP", async () => {
  const { directory, custodian } = await storedLog();
  custodian.append(custodian.pledge("acct-1", "1"), custodian.pledge("acct-1", "2"));
  const { error } = await refused(directory, custodian, [custodian.batch(5, 5)]);
  assert.equal(error.reason, ErrorReason.SEQUENCE_GAP);
  assert.deepEqual(error.metadata, { expected: "4", actual: "5" });
});

test("a second history of stored entries is EQUIVOCATION, and the evidence is kept", async () => {
  const { directory, custodian } = await storedLog();
  const fork = new Custodian();
  fork.append(custodian.holdings("acct-1", 1n), fork.pledge("acct-1", "99"));
  const { error, close } = await refused(directory, custodian, [fork.batch(1, 2)]);
  assert.equal(error.reason, ErrorReason.EQUIVOCATION);
  assert.equal(close?.reason, ErrorReason.EQUIVOCATION);
  assert.equal(error.metadata["sequence"], "2");
  const evidence = await readdir(join(directory, "evidence"));
  assert.equal(evidence.length, 1);
  const kept = JSON.parse(await readFile(join(directory, "evidence", evidence[0] as string), "utf8")) as Record<string, string>;
  assert.equal(kept["sequence"], "2");
  assert.equal(kept["storedBatchFile"], join("batches", "2.envelope"));
});

test("statements inside entries: misaddressed, replayed or from another issuer fail the batch", async () => {
  const cases: [string, (c: Custodian) => PositionUpdate, ErrorReason][] = [
    ["addressed to another exchange", (c) => c.holdings("acct-1", 9n, { audience: [OTHER_EXCHANGE] }), ErrorReason.AUDIENCE_MISMATCH],
    ["a sequence already acted on", (c) => c.holdings("acct-1", 9n, { sequence: 2n }), ErrorReason.REPLAYED],
  ];
  for (const [what, update, reason] of cases) {
    const { directory, custodian } = await storedLog();
    custodian.append(update(custodian));
    const { error } = await refused(directory, custodian, [custodian.batch(4, 4)]);
    assert.equal(error.reason, reason, what);
    assert.equal(error.metadata["sequence"], "4", what);
  }
  // Signed by the exchange's own key: a holdings statement only a custodian may issue.
  const { directory, custodian } = await storedLog();
  const statement = create(HoldingsStatementSchema, { header: custodian.header({ sequence: 50n }), accountId: "acct-1", exchangeId: EXCHANGE, epoch: 9n });
  const envelope = signedEnvelope(HOLDINGS_TYPE, toBinary(HoldingsStatementSchema, statement), [exchangeKey]);
  custodian.append(create(PositionUpdateSchema, { update: { case: "holdingsChange", value: { holdingsStatement: envelope, attestation: {} } } }));
  const { error } = await refused(directory, custodian, [custodian.batch(4, 4)]);
  assert.equal(error.reason, ErrorReason.KEY_ROLE_MISMATCH);
});

test("a statement past its own expiry is accepted inside a fresh batch (freshness is the batch's)", async () => {
  const directory = await temporaryDirectory();
  const custodian = new Custodian();
  const longAgo = new Date(Date.now() - 3_600_000);
  custodian.append(custodian.holdings("acct-1", 1n, { issuedAt: longAgo, ttlMs: 60_000 }));
  const { store, session } = await openSession(directory);
  const wire = new Wire();
  const running = session.runStream(wire);
  await wire.nth("hello");
  wire.deliver(custodian.hello(), custodian.batch(1, 1));
  assert.equal(ackOf(await wire.nth("ack")), 1n);
  wire.finish();
  await running;
  assert.deepEqual(store.state().epochs, { "acct-1": "1" });
});

test("an update variant the custodian may not send, and an undecodable update, are MALFORMED", async () => {
  const { directory, custodian } = await storedLog();
  custodian.append(create(PositionUpdateSchema, { update: { case: "creditLine", value: signedEnvelope(HOLDINGS_TYPE, new Uint8Array(), [custodianKey]) } }));
  const wrong = await refused(directory, custodian, [custodian.batch(4, 4)]);
  assert.equal(wrong.error.reason, ErrorReason.MALFORMED);
  assert.equal(wrong.error.metadata["actual"], "creditLine");

  const second = await storedLog();
  second.custodian.appendBytes(Uint8Array.of(0x0a, 0xff)); // a length beyond the bytes
  const undecodable = await refused(second.directory, second.custodian, [second.custodian.batch(4, 4)]);
  assert.equal(undecodable.error.reason, ErrorReason.MALFORMED);
});

test("more entries than the window is LIMIT_EXCEEDED", async () => {
  const directory = await temporaryDirectory();
  const custodian = new Custodian();
  for (let i = 0; i < 5; i += 1) custodian.append(custodian.pledge("acct-1", String(i + 1)));
  const { error } = await refused(directory, custodian, [custodian.batch(1, 5)]);
  assert.equal(error.reason, ErrorReason.LIMIT_EXCEEDED);
});

test("an application refusal fails the batch with its reason; nothing is stored", async () => {
  const { directory, custodian } = await storedLog();
  custodian.append(custodian.pledge("acct-1", "5"));
  const { error } = await refused(directory, custodian, [custodian.batch(4, 4)], () => {
    throw new StateError("no room for it", { reason: ErrorReason.STORAGE_FULL });
  });
  assert.equal(error.reason, ErrorReason.STORAGE_FULL);
});

test("the custodian's hello is checked: its party, and no claim on our empty log", async () => {
  for (const [hello, reason] of [
    [new Custodian().hello({ partyId: "custodian-2" }), ErrorReason.KEY_ROLE_MISMATCH],
    [new Custodian().hello({ receivedSequence: 1n }), ErrorReason.OUT_OF_RANGE],
  ] as const) {
    const { session } = await openSession(await temporaryDirectory());
    const wire = new Wire();
    const running = session.runStream(wire);
    await wire.nth("hello");
    wire.deliver(hello);
    await assert.rejects(running, (e: unknown) => e instanceof CollateralSyncError && e.reason === reason);
    const close = await wire.nth("close");
    assert.equal(close.frame.case === "close" ? close.frame.value.reason : undefined, reason);
  }
  // Anything but a hello first is MALFORMED.
  const { session } = await openSession(await temporaryDirectory());
  const wire = new Wire();
  const running = session.runStream(wire);
  await wire.nth("hello");
  wire.deliver(new Custodian().batch(1, 0));
  await assert.rejects(running, (e: unknown) => e instanceof CollateralSyncError && e.reason === ErrorReason.MALFORMED);
});

test("the custodian's SyncClose ends the stream as its error, without a close back", async () => {
  const { session } = await openSession(await temporaryDirectory());
  const wire = new Wire();
  const running = session.runStream(wire);
  await wire.nth("hello");
  wire.deliver(
    new Custodian().hello(),
    frame({
      case: "close",
      value: create(SyncCloseSchema, { reason: ErrorReason.EQUIVOCATION, message: "two histories", metadata: { sequence: "7" } }),
    }),
  );
  await assert.rejects(running, (e: unknown) => {
    assert.ok(e instanceof RpcError);
    assert.equal(e.reason, ErrorReason.EQUIVOCATION);
    assert.equal(e.code, "ABORTED");
    assert.deepEqual(e.metadata, { sequence: "7" });
    return true;
  });
  assert.deepEqual(wire.kinds(), ["hello"]);
});

test("heartbeats go out when idle; a custodian silent for three of its intervals is dead", async () => {
  const { session } = await openSession(await temporaryDirectory(), apply, 20);
  const wire = new Wire();
  const running = session.runStream(wire);
  await wire.nth("hello");
  wire.deliver(new Custodian().hello({ heartbeatIntervalMs: 40 }));
  const heartbeat = await wire.nth("heartbeat", 2);
  assert.equal(heartbeat.frame.case === "heartbeat" ? heartbeat.frame.value.sentSequence : -1n, 0n);
  await assert.rejects(running, (e: unknown) => e instanceof PeerSilentError && e.silentMs === 120);
  assert.ok(wire.ended);
});
