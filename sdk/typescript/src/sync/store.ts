// Durable storage of the custodian's sync log as the exchange received it (PROTOCOL.md §6.5).
//
// What must survive a crash, and change together: the received head (sequence and entry
// hash, what the hello resumes from), the replay record of the statements the entries
// carried (§3.6 stage g), and the application state the entries were applied to. They live
// in one small JSON file replaced atomically (write a temporary file, fsync, rename, fsync
// the directory), so after a crash either all of a batch's effects are there or none are:
// nothing acknowledged is lost and nothing is applied twice. Each accepted batch envelope —
// the signed evidence of its entries — is written to a file of its own, flushed, before
// the head that names it.

import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { mkdir, open, readFile, rename } from "node:fs/promises";
import { join } from "node:path";
import { StorageError } from "../errors.js";
import { EnvelopeSchema, type Envelope } from "../gen/collateral_sync/v1/envelope_pb.js";
import { ErrorReason } from "../gen/collateral_sync/v1/errors_pb.js";
import { SyncBatchSchema } from "../gen/collateral_sync/v1/position_sync_pb.js";
import { EMPTY_CHAIN_HEAD, type ChainHead } from "../syncChain.js";

/** The last entry of a log: its sequence and entry hash (0 and 32 zero bytes when empty). */
export type LogHead = ChainHead;

export const EMPTY_HEAD: LogHead = EMPTY_CHAIN_HEAD;

/** One stored batch: the entries it added here, `[first, last]`, and its envelope file. */
interface BatchRecord {
  first: bigint;
  last: bigint;
  file: string;
}

/** Everything a batch changes, committed as one. */
export interface ReceivedCommit<S> {
  /** The verified batch envelope as received. */
  envelope: Envelope;
  /** First sequence of the batch that was new here (earlier ones were duplicates). */
  firstNew: bigint;
  /** The new head: the batch's last entry. */
  head: LogHead;
  /** Stage g records to raise: `issuer|payloadType` → sequence of the statement acted on. */
  replay: ReadonlyMap<string, bigint>;
  /** The application state after applying the new entries. */
  state: S;
}

/** Where a session keeps the peer's log as received; see FileSyncStore. */
export interface ReceivedLogStore<S> {
  head(): LogHead;
  state(): S;
  /** Last sequence acted on from (issuer, payload type), 0 when none (stage g). */
  lastAccepted(issuer: string, payloadType: string): bigint;
  /** Stored entry hash at `sequence` (1 ≤ sequence ≤ head), read from its signed batch. */
  entryHashAt(sequence: bigint): Promise<Uint8Array>;
  /** Persist a batch's effects durably and atomically; resolves once they are on disk. */
  commit(change: ReceivedCommit<S>): Promise<void>;
  /** Keep the proof that the peer sent two histories (§6.5, §10.7); it outlives the refusal. */
  keepEvidence(evidence: EquivocationEvidence): Promise<void>;
}

/** Two different entries claimed at one sequence of the peer's log. */
export interface EquivocationEvidence {
  readonly sequence: bigint;
  readonly storedEntryHash: Uint8Array;
  readonly receivedEntryHash: Uint8Array;
  /** The signed batch that carried the conflicting entry, as received. */
  readonly receivedBatch: Envelope;
  readonly detectedAt: Date;
}

export function replayKey(issuer: string, payloadType: string): string {
  return `${issuer}|${payloadType}`;
}

const FORMAT = "collateral-sync/ts-received-log/1";
const STATE_FILE = "received-log.json";
const BATCH_DIR = "batches";
const EVIDENCE_DIR = "evidence";

interface StoredFile {
  format: string;
  peer: string;
  head: { sequence: string; entryHash: string };
  batches: { first: string; last: string; file: string }[];
  replay: Record<string, string>;
  state: unknown;
}

/**
 * The received log in a directory: `received-log.json` plus `batches/<last>.envelope`.
 *
 * One writer at a time (one session per peer); `S` must survive JSON.stringify/parse.
 */
export class FileSyncStore<S> implements ReceivedLogStore<S> {
  private constructor(
    private readonly directory: string,
    private readonly peer: string,
    private current: LogHead,
    private batches: BatchRecord[],
    private replay: Map<string, bigint>,
    private appState: S,
  ) {}

  /** Open the store in `directory` for the log of `peer`, creating it with `initialState`. */
  static async open<S>(directory: string, peer: string, initialState: S): Promise<FileSyncStore<S>> {
    await mkdir(join(directory, BATCH_DIR), { recursive: true });
    let text: string;
    try {
      text = await readFile(join(directory, STATE_FILE), "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") {
        return new FileSyncStore(directory, peer, EMPTY_HEAD, [], new Map(), initialState);
      }
      throw storageError(`cannot read ${join(directory, STATE_FILE)}`, error);
    }
    const stored = JSON.parse(text) as StoredFile;
    if (stored.format !== FORMAT || stored.peer !== peer) {
      throw new StorageError(
        `${join(directory, STATE_FILE)} is not the received log of ${peer} (format ${FORMAT})`,
        { metadata: { expected: `${FORMAT} of ${peer}`, actual: `${stored.format} of ${stored.peer}` } },
      );
    }
    return new FileSyncStore(
      directory,
      peer,
      { sequence: BigInt(stored.head.sequence), entryHash: new Uint8Array(Buffer.from(stored.head.entryHash, "hex")) },
      stored.batches.map((b) => ({ first: BigInt(b.first), last: BigInt(b.last), file: b.file })),
      new Map(Object.entries(stored.replay).map(([key, value]) => [key, BigInt(value)])),
      stored.state as S,
    );
  }

  head(): LogHead {
    return this.current;
  }

  state(): S {
    return this.appState;
  }

  lastAccepted(issuer: string, payloadType: string): bigint {
    return this.replay.get(replayKey(issuer, payloadType)) ?? 0n;
  }

  async entryHashAt(sequence: bigint): Promise<Uint8Array> {
    const record = this.batches.find((b) => b.first <= sequence && sequence <= b.last);
    if (record === undefined) {
      throw new StorageError(`no stored batch holds received sequence ${sequence}`, {
        metadata: { expected: `1..${this.current.sequence}`, actual: String(sequence) },
      });
    }
    const bytes = await readFile(join(this.directory, BATCH_DIR, record.file));
    const batch = fromBinary(SyncBatchSchema, fromBinary(EnvelopeSchema, bytes).payload);
    const first = batch.entries[0]?.sequence ?? 0n;
    const entry = batch.entries[Number(sequence - first)];
    if (entry === undefined) {
      throw new StorageError(`stored batch ${record.file} lacks sequence ${sequence}`);
    }
    return new Uint8Array(entry.entryHash); // a plain copy, not a view of the file's Buffer
  }

  async commit(change: ReceivedCommit<S>): Promise<void> {
    const file = `${change.head.sequence}.envelope`;
    const batches = [...this.batches, { first: change.firstNew, last: change.head.sequence, file }];
    const replay = new Map(this.replay);
    for (const [key, sequence] of change.replay) {
      if (sequence > (replay.get(key) ?? 0n)) replay.set(key, sequence);
    }
    const document: StoredFile = {
      format: FORMAT,
      peer: this.peer,
      head: {
        sequence: String(change.head.sequence),
        entryHash: Buffer.from(change.head.entryHash).toString("hex"),
      },
      batches: batches.map((b) => ({ first: String(b.first), last: String(b.last), file: b.file })),
      replay: Object.fromEntries([...replay].map(([key, value]) => [key, String(value)])),
      state: change.state,
    };
    try {
      // The evidence first: a crash after it and before the head leaves a harmless orphan.
      await writeDurably(join(this.directory, BATCH_DIR), file, toBinary(EnvelopeSchema, change.envelope));
      await writeDurably(this.directory, STATE_FILE, Buffer.from(`${JSON.stringify(document)}\n`));
    } catch (error) {
      throw storageError(`cannot persist received batch up to ${change.head.sequence}`, error);
    }
    this.current = change.head;
    this.batches = batches;
    this.replay = replay;
    this.appState = change.state;
  }

  /**
   * Writes `evidence/<sequence>-<received hash>.json`: both hashes, the stored batch file that
   * holds our entry and the conflicting signed batch (base64 of the serialised Envelope).
   */
  async keepEvidence(evidence: EquivocationEvidence): Promise<void> {
    const stored = this.batches.find((b) => b.first <= evidence.sequence && evidence.sequence <= b.last);
    const document = {
      sequence: String(evidence.sequence),
      storedEntryHash: Buffer.from(evidence.storedEntryHash).toString("hex"),
      receivedEntryHash: Buffer.from(evidence.receivedEntryHash).toString("hex"),
      storedBatchFile: stored === undefined ? null : join(BATCH_DIR, stored.file),
      receivedBatch: Buffer.from(toBinary(EnvelopeSchema, evidence.receivedBatch)).toString("base64"),
      detectedAt: evidence.detectedAt.toISOString(),
    };
    const directory = join(this.directory, EVIDENCE_DIR);
    await mkdir(directory, { recursive: true });
    const name = `${evidence.sequence}-${document.receivedEntryHash}.json`;
    await writeDurably(directory, name, Buffer.from(`${JSON.stringify(document, null, 2)}\n`));
  }
}

/** Replace the file `directory/name` with `data` atomically and durably. */
export async function writeDurably(directory: string, name: string, data: Uint8Array): Promise<void> {
  const target = join(directory, name);
  const temporary = `${target}.tmp-${process.pid}`;
  const handle = await open(temporary, "w", 0o600);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temporary, target);
  // The rename itself is durable only once the directory is flushed.
  const dir = await open(directory, "r");
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

function storageError(message: string, cause: unknown): StorageError {
  const code = (cause as NodeJS.ErrnoException | undefined)?.code;
  const full = code === "ENOSPC" || code === "EDQUOT";
  return new StorageError(`${message}: ${cause instanceof Error ? cause.message : String(cause)}`, {
    // Nothing of the batch counts as stored, so it is not acknowledged and comes again (§12.3).
    reason: full ? ErrorReason.STORAGE_FULL : ErrorReason.STORAGE_UNAVAILABLE,
    metadata: { expected: "a writable store", actual: code ?? "error" },
    cause,
  });
}
