// An exchange written with the TypeScript SDK, against a real custodian.
//
// It dials the custodian over mutual TLS as the party of its certificate (e.g. exchange-1) and:
//   - fetches the custodian's checkpoint and verifies it (signature, origin), keeping the
//     checkpoints it accepts consistent with one another (consistency proofs, §5.6) and on
//     disk, so that a restart continues from the checkpoint it trusted, not from scratch;
//   - fetches the holdings statements of the accounts given with --account, verifies them and
//     proves each in the custodian's log (leaf hash, inclusion proof, §5.5);
//   - runs the position-sync stream (§6): every batch verified, applied once, stored durably
//     with the received head under --state-dir, acknowledged; re-dials and resumes from the
//     stored head after any disconnect or restart; and proves every holdings statement the
//     stream announces.
// Every event is one JSON line on stdout ({"event": ..., ...}), so a test can follow it.
//
//   node dist/examples/exchange.js --address 127.0.0.1:7443 --ca ca.pem --cert exchange-1.pem \
//     --key exchange-1.key --registry registry.json --state-dir state/ [--account acct-1 ...]
//
// SIGTERM or SIGINT stops it (exit 0). The exchange signs nothing: the stream's hello, acks and
// heartbeats are unsigned (§6.2, §6.6, §6.7) and it sends no entries of its own.

import { parseArgs } from "node:util";
import { readFile } from "node:fs/promises";
import { dirname, basename, join } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  AttestationRefSchema,
  HoldingsChangeReason,
  HoldingsStatementSchema,
  type AttestationRef,
  type Checkpoint,
  type HoldingsStatement,
} from "../src/gen/collateral_sync/v1/attestation_pb.js";
import { EnvelopeSchema, type Envelope } from "../src/gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../src/gen/collateral_sync/v1/errors_pb.js";
import { CheckpointMonitor, statementLeaf, verifyCheckpoint } from "../src/checkpoints.js";
import { createCustodianClient, type CustodianClient } from "../src/clients.js";
import { CollateralSyncError, ProofError } from "../src/errors.js";
import { leafHash, verifyInclusionProof } from "../src/merkle.js";
import { formatAmount, parseAmount } from "../src/amounts.js";
import { KeyRegistry } from "../src/registry.js";
import { verifyStatement } from "../src/signing.js";
import { payloadTypeOf } from "../src/statements.js";
import { certificatePartyId, createTransport, loadTlsFiles } from "../src/transport.js";
import { ExchangeSyncSession, type ApplyResult, type SyncEvent } from "../src/sync/session.js";
import { FileSyncStore, writeDurably } from "../src/sync/store.js";
import type { ReceivedUpdate } from "../src/sync/updates.js";

const HOLDINGS_TYPE = payloadTypeOf(HoldingsStatementSchema);

// ------------------------------------------------------------------ output

/** One JSON line per event; bigints as numbers while exact, else as decimal strings. */
function emit(event: string, fields: Record<string, unknown> = {}): void {
  const line = JSON.stringify({ event, ...fields }, (_key, value: unknown) =>
    typeof value === "bigint" ? (value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value.toString()) : value,
  );
  process.stdout.write(`${line}\n`);
}

function errorFields(error: unknown): Record<string, unknown> {
  if (error instanceof CollateralSyncError) {
    return { reason: error.reasonName, code: error.code, message: error.message, metadata: error.metadata };
  }
  return { reason: "UNSPECIFIED", code: "UNKNOWN", message: error instanceof Error ? error.message : String(error) };
}

const hex = (bytes: Uint8Array): string => Buffer.from(bytes).toString("hex");

// ------------------------------------------------------------------ command line

interface Options {
  address: string;
  ca: string;
  cert: string;
  key: string;
  registry: string;
  stateDir: string;
  custodian: string;
  origin: string;
  accounts: string[];
  window: number;
  heartbeatMs: number;
  checkpointIntervalMs: number;
  maxSkewSeconds: number;
}

function parseCommandLine(): Options {
  const { values } = parseArgs({
    options: {
      address: { type: "string" },
      ca: { type: "string" },
      cert: { type: "string" },
      key: { type: "string" },
      registry: { type: "string" },
      "state-dir": { type: "string" },
      custodian: { type: "string", default: "custodian-1" },
      origin: { type: "string" },
      account: { type: "string", multiple: true, default: [] },
      window: { type: "string", default: "8000" },
      "heartbeat-ms": { type: "string", default: "5000" },
      "checkpoint-interval-ms": { type: "string", default: "5000" },
      "max-skew-seconds": { type: "string", default: "30" },
    },
    strict: true,
  });
  const required = (name: string, value: string | undefined): string => {
    if (value === undefined || value === "") throw new Error(`--${name} is required`);
    return value;
  };
  const integer = (name: string, value: string): number => {
    const parsed = Number(value);
    if (!Number.isSafeInteger(parsed) || parsed < 1) throw new Error(`--${name} must be a positive integer, got ${value}`);
    return parsed;
  };
  const custodian = values.custodian;
  return {
    address: required("address", values.address),
    ca: required("ca", values.ca),
    cert: required("cert", values.cert),
    key: required("key", values.key),
    registry: required("registry", values.registry),
    stateDir: required("state-dir", values["state-dir"]),
    custodian,
    origin: values.origin ?? `${custodian}/collateral-sync/attestations`,
    accounts: values.account,
    window: integer("window", values.window),
    heartbeatMs: integer("heartbeat-ms", values["heartbeat-ms"]),
    checkpointIntervalMs: integer("checkpoint-interval-ms", values["checkpoint-interval-ms"]),
    maxSkewSeconds: integer("max-skew-seconds", values["max-skew-seconds"]),
  };
}

// ------------------------------------------------------------------ checkpoints

/**
 * The custodian's log as this exchange trusts it: the latest accepted checkpoint, moved
 * forward only along consistency proofs (CheckpointMonitor) and kept on disk with the time
 * it was accepted, so that a restart re-verifies it as of then and goes on from it.
 */
class CheckpointKeeper {
  private readonly monitor = new CheckpointMonitor();

  constructor(
    private readonly client: CustodianClient,
    private readonly registry: KeyRegistry,
    private readonly partyId: string,
    private readonly options: Options,
    private readonly file: string,
  ) {}

  get latest(): Checkpoint | undefined {
    return this.monitor.latest(this.options.origin);
  }

  async restore(): Promise<void> {
    let text: string;
    try {
      text = await readFile(this.file, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
      throw error;
    }
    const stored = JSON.parse(text) as { envelope: string; acceptedAt: string };
    const envelope = fromBinary(EnvelopeSchema, Buffer.from(stored.envelope, "base64"));
    // Verified as of when we relied on it (§3.6.1, auditor row): it may have expired since.
    const checkpoint = this.verify(envelope, new Date(stored.acceptedAt));
    this.monitor.advance(checkpoint, undefined);
    emit("checkpoint_restored", { treeSize: checkpoint.treeSize, rootHash: hex(checkpoint.rootHash) });
  }

  /** Fetch the latest checkpoint and accept it if it extends the held one (§5.6). */
  async refresh(): Promise<Checkpoint> {
    const response = await this.client.getCheckpoint({ treeSize: 0n });
    const envelope = required(response.checkpoint, "checkpoint");
    const now = new Date();
    const checkpoint = this.verify(envelope, now);
    const held = this.latest;
    if (held !== undefined && checkpoint.treeSize === held.treeSize) {
      this.monitor.advance(checkpoint, undefined); // a fork is refused (and kept) here
      return held;
    }
    let proof;
    if (held !== undefined && held.treeSize > 0n && checkpoint.treeSize > held.treeSize) {
      const answer = await this.client.getConsistencyProof({
        firstTreeSize: held.treeSize,
        secondTreeSize: checkpoint.treeSize,
      });
      proof = answer.proof;
    }
    this.monitor.advance(checkpoint, proof);
    await writeDurably(
      dirname(this.file),
      basename(this.file),
      Buffer.from(JSON.stringify({ envelope: Buffer.from(toBinary(EnvelopeSchema, envelope)).toString("base64"), acceptedAt: now.toISOString() })),
    );
    emit("checkpoint_accepted", {
      treeSize: checkpoint.treeSize,
      rootHash: hex(checkpoint.rootHash),
      consistentFrom: proof === undefined ? null : held?.treeSize,
    });
    return checkpoint;
  }

  /** An accepted checkpoint of at least `size` leaves. */
  async atLeast(size: bigint): Promise<Checkpoint> {
    const held = this.latest;
    if (held !== undefined && held.treeSize >= size) return held;
    const fresh = await this.refresh();
    if (fresh.treeSize < size) {
      throw new ProofError(`the custodian's latest checkpoint has ${fresh.treeSize} leaves, expected at least ${size}`, {
        reason: ErrorReason.OUT_OF_RANGE,
        metadata: { expected: `>= ${size}`, actual: String(fresh.treeSize) },
      });
    }
    return fresh;
  }

  private verify(envelope: Envelope, now: Date): Checkpoint {
    return verifyCheckpoint(envelope, this.registry, {
      origin: this.options.origin,
      now,
      maxSkewSeconds: this.options.maxSkewSeconds,
      audience: this.partyId,
    });
  }
}

function required<T>(value: T | undefined, field: string): T {
  if (value === undefined) {
    throw new ProofError(`response without ${field}`, { reason: ErrorReason.MALFORMED, metadata: { field, expected: "present", actual: "absent" } });
  }
  return value;
}

/**
 * Prove a holdings statement is in the custodian's log (§5.5): its leaf hash is the one the
 * attestation names, and an inclusion proof ties it to an accepted checkpoint.
 */
async function prove(
  client: CustodianClient,
  keeper: CheckpointKeeper,
  origin: string,
  envelope: Envelope,
  attestation: AttestationRef,
): Promise<Checkpoint> {
  if (attestation.logOrigin !== origin) {
    throw new ProofError(`attestation of log ${JSON.stringify(attestation.logOrigin)}, expected ${JSON.stringify(origin)}`, {
      metadata: { expected: origin, actual: attestation.logOrigin },
    });
  }
  const leaf = statementLeaf(envelope);
  if (hex(leafHash(leaf)) !== hex(attestation.leafHash)) {
    throw new ProofError("the attestation's leaf hash is not the statement's", {
      metadata: { expected: hex(leafHash(leaf)), actual: hex(attestation.leafHash) },
    });
  }
  const checkpoint = await keeper.atLeast(attestation.treeSize);
  const answer = await client.getInclusionProof({ leafIndex: attestation.leafIndex, treeSize: checkpoint.treeSize });
  const proof = required(answer.proof, "proof");
  if (proof.leafIndex !== attestation.leafIndex) {
    throw new ProofError(`inclusion proof of leaf ${proof.leafIndex}, expected ${attestation.leafIndex}`, {
      metadata: { expected: String(attestation.leafIndex), actual: String(proof.leafIndex) },
    });
  }
  verifyInclusionProof(proof, leaf, checkpoint);
  return checkpoint;
}

// ------------------------------------------------------------------ what the stream applies

/** The latest holdings statement of an account, as the stream announced it. */
interface KnownHoldings {
  epoch: string;
  statementSequence: string;
  entry: string;
  reason: string;
  /** The signed statement and its attestation, kept to prove it again after a restart. */
  envelope: string;
  attestation: { logOrigin: string; leafIndex: string; leafHash: string; treeSize: string };
  liquidationPathId: string | null;
}

/** The exchange's state, persisted with the received head (so applied exactly once). */
interface ExchangeState {
  /** Every entry applied, in order: a second application would show twice. */
  applied: string[];
  holdings: Record<string, KnownHoldings>;
  /** account → asset → pledged quantity (canonical decimal), from pledge changes. */
  pledged: Record<string, Record<string, string>>;
  /** account → asset → yield accrued, from yield accruals. */
  accrued: Record<string, Record<string, string>>;
  rejected: { entry: string; kind: string; reason: string; message: string }[];
}

const INITIAL_STATE: ExchangeState = { applied: [], holdings: {}, pledged: {}, accrued: {}, rejected: [] };

/** What the last apply produced, printed and proven once its batch is stored. */
let appliedLines: Record<string, unknown>[] = [];
let toProve: [account: string, holdings: KnownHoldings][] = [];

function applyUpdates(updates: readonly ReceivedUpdate[], previous: ExchangeState): ApplyResult<ExchangeState> {
  const state = structuredClone(previous);
  const rejected: bigint[] = [];
  appliedLines = [];
  toProve = [];
  for (const received of updates) {
    const entry = String(received.sequence);
    state.applied.push(entry);
    const update = received.update.update;
    const line: Record<string, unknown> = { entry: received.sequence, kind: update.case };
    switch (update.case) {
      case "holdingsChange": {
        const statement = received.statement?.message as HoldingsStatement;
        const attestation = update.value.attestation as AttestationRef;
        const known = state.holdings[statement.accountId];
        Object.assign(line, { account: statement.accountId, epoch: statement.epoch, statementSequence: received.statement?.sequence });
        if (known !== undefined && BigInt(known.epoch) >= statement.epoch) {
          // Signed and valid, but older than what we hold: business, not integrity (§6.5).
          const message = `epoch ${statement.epoch} of ${statement.accountId} is not after ${known.epoch}`;
          state.rejected.push({ entry, kind: "holdingsChange", reason: "STATE_CONFLICT", message });
          rejected.push(received.sequence);
          appliedLines.push({ ...line, rejected: "STATE_CONFLICT", message });
          continue;
        }
        const holdings: KnownHoldings = {
          epoch: String(statement.epoch),
          statementSequence: String(received.statement?.sequence ?? 0n),
          entry,
          reason: HoldingsChangeReason[statement.reason] ?? String(statement.reason),
          envelope: Buffer.from(toBinary(EnvelopeSchema, update.value.holdingsStatement as Envelope)).toString("base64"),
          attestation: {
            logOrigin: attestation.logOrigin,
            leafIndex: String(attestation.leafIndex),
            leafHash: hex(attestation.leafHash),
            treeSize: String(attestation.treeSize),
          },
          liquidationPathId: received.liquidationPath?.header.statementId ?? null,
        };
        state.holdings[statement.accountId] = holdings;
        // Each statement the stream announces is proven, once its batch is stored.
        toProve.push([statement.accountId, holdings]);
        break;
      }
      case "pledgeChange": {
        const change = update.value;
        // A non-canonical amount is a malformed update: it fails the batch (§6.5).
        const quantity = formatAmount(parseAmount(change.pledgedQuantity?.value ?? "", { field: "pledge_change.pledged_quantity" }));
        (state.pledged[change.accountId] ??= {})[change.assetId] = quantity;
        Object.assign(line, { account: change.accountId, asset: change.assetId, pledged: quantity });
        break;
      }
      case "yieldAccrual": {
        const accrual = update.value;
        const quantity = formatAmount(parseAmount(accrual.accruedQuantity?.value ?? "", { field: "yield_accrual.accrued_quantity" }));
        (state.accrued[accrual.accountId] ??= {})[accrual.assetId] = quantity;
        Object.assign(line, { account: accrual.accountId, asset: accrual.assetId, accrued: quantity });
        break;
      }
      default:
        // Receipts and margin-call responses: verified by the session; this example has no
        // margin calls or liquidations of its own to match them with.
        if (received.statement !== undefined) line["statementId"] = received.statement.header.statementId;
    }
    appliedLines.push(line);
  }
  return { state, rejected };
}

// ------------------------------------------------------------------ main

async function main(): Promise<number> {
  const options = parseCommandLine();
  const tls = loadTlsFiles({ caCert: options.ca, cert: options.cert, key: options.key });
  const partyId = certificatePartyId(tls.cert);
  const registry = KeyRegistry.load(options.registry);
  const transport = createTransport({ address: options.address, expectedPartyId: options.custodian, ...tls });
  const client = createCustodianClient(transport);
  const store = await FileSyncStore.open<ExchangeState>(join(options.stateDir, "sync"), options.custodian, INITIAL_STATE);
  const keeper = new CheckpointKeeper(client, registry, partyId, options, join(options.stateDir, "checkpoint.json"));
  emit("started", { partyId, custodian: options.custodian, origin: options.origin, storedHead: store.head().sequence });

  // Network work after a stored batch (proofs, checkpoints) runs one task at a time.
  let work: Promise<void> = Promise.resolve();
  const enqueue = (task: () => Promise<void>): void => {
    work = work.then(task).catch((error: unknown) => emit("task_failed", errorFields(error)));
  };
  const proveKnown = (account: string, known: KnownHoldings, source: string): void =>
    enqueue(async () => {
      const envelope = fromBinary(EnvelopeSchema, Buffer.from(known.envelope, "base64"));
      const attestation = create(AttestationRefSchema, {
        logOrigin: known.attestation.logOrigin,
        leafIndex: BigInt(known.attestation.leafIndex),
        leafHash: Buffer.from(known.attestation.leafHash, "hex"),
        treeSize: BigInt(known.attestation.treeSize),
      });
      const fields = { source, account, epoch: BigInt(known.epoch), entry: BigInt(known.entry) };
      try {
        const checkpoint = await prove(client, keeper, options.origin, envelope, attestation);
        emit("statement_proven", { ...fields, leafIndex: attestation.leafIndex, treeSize: checkpoint.treeSize });
      } catch (error) {
        emit("statement_unproven", { ...fields, ...errorFields(error) });
      }
    });

  try {
    await keeper.restore();
    await keeper.refresh();
  } catch (error) {
    emit("fatal", { stage: "checkpoint", ...errorFields(error) });
    return 1;
  }

  for (const account of options.accounts) {
    try {
      const answer = await client.getHoldingsStatement({ accountId: account });
      const envelope = required(answer.holdingsStatement, "holdings_statement");
      const verified = verifyStatement<HoldingsStatement>(envelope, registry, {
        audience: partyId,
        now: new Date(),
        maxSkewSeconds: options.maxSkewSeconds,
        expectedPayloadType: HOLDINGS_TYPE,
      });
      if (verified.issuer !== options.custodian) {
        throw new ProofError(`holdings statement issued by ${verified.issuer}`, {
          reason: ErrorReason.KEY_ROLE_MISMATCH,
          metadata: { expected: options.custodian, actual: verified.issuer },
        });
      }
      emit("holdings_verified", { account, epoch: verified.message.epoch, statementSequence: verified.sequence });
      const attestation = required(answer.attestation, "attestation");
      const checkpoint = await prove(client, keeper, options.origin, envelope, attestation);
      emit("statement_proven", { source: "fetch", account, epoch: verified.message.epoch, leafIndex: attestation.leafIndex, treeSize: checkpoint.treeSize });
    } catch (error) {
      emit("holdings_refused", { account, ...errorFields(error) });
    }
  }
  // What the stream announced before a restart is proven again (the proofs are not stored).
  for (const [account, known] of Object.entries(store.state().holdings)) proveKnown(account, known, "restored");

  const onEvent = (event: SyncEvent): void => {
    const { type, ...fields } = event;
    emit(type, fields);
    if (type === "batch_stored") {
      for (const line of appliedLines) emit("update_applied", line);
      for (const [account, known] of toProve) proveKnown(account, known, "stream");
      appliedLines = [];
      toProve = [];
    }
  };
  const session = new ExchangeSyncSession<ExchangeState>({
    partyId,
    custodianId: options.custodian,
    registry,
    store,
    apply: applyUpdates,
    window: options.window,
    heartbeatIntervalMs: options.heartbeatMs,
    maxSkewSeconds: options.maxSkewSeconds,
    onEvent,
  });

  const stop = new AbortController();
  for (const signal of ["SIGTERM", "SIGINT"] as const) process.once(signal, () => stop.abort());
  const refresher = setInterval(() => enqueue(async () => void (await keeper.refresh())), options.checkpointIntervalMs);
  try {
    await session.maintain(client, stop.signal);
  } catch (error) {
    // Only an equivocation ends maintain: two histories of one log need an operator.
    emit("fatal", { stage: "sync", ...errorFields(error) });
    return 3;
  } finally {
    clearInterval(refresher);
  }
  await work;
  emit("stopped", { head: store.head().sequence, applied: store.state().applied.length });
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    emit("fatal", { stage: "startup", ...errorFields(error) });
    process.exit(1);
  },
);
