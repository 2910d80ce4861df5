"""Position sync, storage side: the durable SQLite log of both directions towards one peer.

Public names are re-exported by :mod:`collateral_sync.sync`, which documents
the protocol; this module holds what needs no event loop. What it stores has
passed :func:`~collateral_sync.sync._batch.verify_sync_batch` first.

Besides the entries, the log keeps what a reconciliation statement states as
the sync log heads at a cut-off (docs/PROTOCOL.md §10.2), answered by
:meth:`SyncLog.heads_at`: every batch of the peer's that was stored keeps its
signed ``header.issued_at`` next to its envelope, and every batch we send is
recorded (last sequence, last entry hash, ``issued_at``) before it is written
to the stream. Tables are only ever added to: a database written before these
records existed is migrated when the log opens (a column added; the stored
envelopes are read for its value as needed), and a peer's hello that confirms
entries no recorded batch covered is recorded as a batch issued then.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from opentelemetry import trace

from collateral_sync.errors import CollateralSyncError, VerificationError, sqlite_refusals
from collateral_sync.keys import _datetime_ns, _timestamp_ns
from collateral_sync.signing import MAX_PAYLOAD_BYTES
from collateral_sync.sql import SqlConnection, is_sqlite
from collateral_sync.sync._batch import (
    _PREFIX,
    _VARIANTS,
    CUSTODIAN_TO_EXCHANGE,
    EXCHANGE_TO_CUSTODIAN,
    HASH_SIZE,
    ZERO_HASH,
    EquivocationEvidence,
    LogHead,
    VerifiedSyncBatch,
    _check_direction,
    _equivocation_error,
    _parse_update,
    _parse_updates,
    _variant_error,
    direction_name,
)
from collateral_sync.v1 import envelope_pb2, errors_pb2, position_sync_pb2

__all__ = ["MAX_UPDATE_BYTES", "ApplyUpdates", "SyncLog"]

_R = errors_pb2.ErrorReason
#: Spans that wrote entries not yet sent, kept for the batch span to link to (oldest dropped).
_MAX_TRACED_WRITES = 1024

#: Largest serialised PositionUpdate one entry may carry, so that any single
#: entry fits a batch under the verifier's payload limit with room for the
#: header and entry framing.
MAX_UPDATE_BYTES = MAX_PAYLOAD_BYTES - 64 * 1024
#: Payload budget of one batch; entries are cut at this many bytes.
_BATCH_PAYLOAD_BUDGET = MAX_PAYLOAD_BYTES - 16 * 1024
#: Upper bound of one entry's framing in a batch (tags, lengths, two hashes, sequence).
_ENTRY_OVERHEAD = 2 * (HASH_SIZE + 2) + 11 + 6 + 6
_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")

#: What a receiver hands the new entries of a batch to: (sequence, update) in order.
ApplyUpdates = Callable[[list[tuple[int, position_sync_pb2.PositionUpdate]]], None]

_EMPTY = LogHead(0, ZERO_HASH)

_SCHEMA = (
    # Our own log towards one peer; prev_entry_hash is the previous row's hash.
    """CREATE TABLE IF NOT EXISTS sync_outgoing (
        peer_party_id TEXT NOT NULL,
        direction INTEGER NOT NULL,
        sequence INTEGER NOT NULL,
        entry_hash BLOB NOT NULL,
        update_bytes BLOB NOT NULL,
        PRIMARY KEY (peer_party_id, direction, sequence)
    ) WITHOUT ROWID""",
    # The peer's log as received: each accepted batch envelope, signed, which
    # holds every entry; first_sequence is the first entry that was new here,
    # so the rows' ranges tile 1..head without overlap. issued_at_us is the
    # envelope's header.issued_at (see _issued_at_us); NULL in rows stored
    # before the column existed (_MIGRATIONS).
    """CREATE TABLE IF NOT EXISTS sync_received_batches (
        id INTEGER PRIMARY KEY,
        peer_party_id TEXT NOT NULL,
        direction INTEGER NOT NULL,
        first_sequence INTEGER NOT NULL,
        last_sequence INTEGER NOT NULL,
        last_entry_hash BLOB NOT NULL,
        envelope BLOB NOT NULL,
        received_at TEXT NOT NULL,
        issued_at_us INTEGER,
        UNIQUE (peer_party_id, direction, last_sequence)
    )""",
    # The batches we sent: the last entry of each and when it was issued (the
    # earliest, if the same batch end was sent again on a later stream).
    """CREATE TABLE IF NOT EXISTS sync_sent_batches (
        peer_party_id TEXT NOT NULL,
        direction INTEGER NOT NULL,
        last_sequence INTEGER NOT NULL,
        last_entry_hash BLOB NOT NULL,
        issued_at_us INTEGER NOT NULL,
        PRIMARY KEY (peer_party_id, direction, last_sequence)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS sync_equivocations (
        id INTEGER PRIMARY KEY,
        peer_party_id TEXT NOT NULL,
        direction INTEGER NOT NULL,
        sequence INTEGER NOT NULL,
        kind TEXT NOT NULL,
        stored_entry_hash BLOB NOT NULL,
        received_entry_hash BLOB NOT NULL,
        stored_batch BLOB,
        received BLOB NOT NULL,
        detected_at TEXT NOT NULL
    )""",
)

#: (table, column, declaration) added to databases created before the column existed.
_MIGRATIONS = (("sync_received_batches", "issued_at_us", "INTEGER"),)

_OUT_HEAD = (
    "SELECT sequence, entry_hash FROM sync_outgoing WHERE peer_party_id = ? AND direction = ? "
    "ORDER BY sequence DESC LIMIT 1"
)
_OUT_HASH = (
    "SELECT entry_hash FROM sync_outgoing "
    "WHERE peer_party_id = ? AND direction = ? AND sequence = ?"
)
_OUT_ENTRY = (
    "SELECT entry_hash, update_bytes FROM sync_outgoing "
    "WHERE peer_party_id = ? AND direction = ? AND sequence = ?"
)
_OUT_RANGE = (
    "SELECT sequence, entry_hash, update_bytes FROM sync_outgoing "
    "WHERE peer_party_id = ? AND direction = ? AND sequence > ? ORDER BY sequence LIMIT ?"
)
_OUT_INSERT = "INSERT INTO sync_outgoing VALUES (?, ?, ?, ?, ?)"
_IN_HEAD = (
    "SELECT last_sequence, last_entry_hash FROM sync_received_batches "
    "WHERE peer_party_id = ? AND direction = ? ORDER BY last_sequence DESC LIMIT 1"
)
_IN_BATCH_AT = (
    "SELECT envelope FROM sync_received_batches WHERE peer_party_id = ? AND direction = ? "
    "AND last_sequence >= ? AND first_sequence <= ? ORDER BY last_sequence LIMIT 1"
)
_IN_INSERT = (
    "INSERT INTO sync_received_batches (peer_party_id, direction, first_sequence, "
    "last_sequence, last_entry_hash, envelope, received_at, issued_at_us) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_IN_HEAD_AT = (
    "SELECT last_sequence, last_entry_hash FROM sync_received_batches "
    "WHERE peer_party_id = ? AND direction = ? AND issued_at_us <= ? "
    "ORDER BY last_sequence DESC LIMIT 1"
)
_IN_UNDATED_ABOVE = (
    "SELECT last_sequence, last_entry_hash, envelope FROM sync_received_batches "
    "WHERE peer_party_id = ? AND direction = ? AND last_sequence > ? AND issued_at_us IS NULL "
    "ORDER BY last_sequence DESC"
)
_SENT_HEAD_AT = (
    "SELECT last_sequence, last_entry_hash FROM sync_sent_batches "
    "WHERE peer_party_id = ? AND direction = ? AND issued_at_us <= ? "
    "ORDER BY last_sequence DESC LIMIT 1"
)
_SENT_COVERS = (
    "SELECT 1 FROM sync_sent_batches WHERE peer_party_id = ? AND direction = ? "
    "AND last_sequence >= ? LIMIT 1"
)
_SENT_INSERT = (
    "INSERT INTO sync_sent_batches VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (peer_party_id, direction, last_sequence) "
    # The earlier of the two (min() is SQLite's alone; CASE is both engines').
    "DO UPDATE SET issued_at_us = CASE WHEN excluded.issued_at_us < "
    "sync_sent_batches.issued_at_us THEN excluded.issued_at_us "
    "ELSE sync_sent_batches.issued_at_us END"
)
# The same conflict shown again (a peer re-dialling with its forked history) is
# kept once: the first signed proof of it is enough.
_EVIDENCE_INSERT = (
    "INSERT INTO sync_equivocations (peer_party_id, direction, sequence, kind, "
    "stored_entry_hash, received_entry_hash, stored_batch, received, detected_at) "
    "SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 WHERE NOT EXISTS (SELECT 1 FROM "
    "sync_equivocations WHERE peer_party_id = ?1 AND direction = ?2 AND sequence = ?3 "
    "AND kind = ?4 AND stored_entry_hash = ?5 AND received_entry_hash = ?6)"
)
_EVIDENCE_SELECT = (
    "SELECT kind, direction, sequence, stored_entry_hash, received_entry_hash, stored_batch, "
    "received, detected_at FROM sync_equivocations WHERE peer_party_id = ? ORDER BY id"
)


class SyncLog:
    """Both sync logs between this party and one peer, kept in the caller's database.

    The caller owns ``connection`` and uses it for its own state, so that a
    state change and the log entries it causes commit in one transaction:
    :meth:`append` runs inside the caller's open transaction (for instance
    :meth:`transaction`), and the ``apply`` callback of :meth:`accept_batch`
    runs inside the log's. ``connection`` is SQLite's own or a
    :class:`~collateral_sync.sql.PostgresConnection`. A SQLite database is switched to WAL with
    ``PRAGMA synchronous = synchronous``: ``"NORMAL"`` (default) keeps every
    committed transaction across a process crash (SIGKILL) but may lose the
    last ones on power loss or an OS crash; ``"FULL"`` or ``"EXTRA"`` also
    survive power loss, at one fsync per commit.

    Not thread-safe, like the connection. Never keep a transaction of your own
    open across an ``await`` while a session uses the log: the session reads
    and writes between your transactions.
    """

    __slots__ = (
        "_connection",
        "_listeners",
        "_party_id",
        "_peer_party_id",
        "_receiving_direction",
        "_sending_direction",
        "_traced_writes",
    )

    def __init__(
        self,
        connection: SqlConnection,
        *,
        party_id: str,
        peer_party_id: str,
        sending_direction: int,
        synchronous: str = "NORMAL",
    ) -> None:
        _check_direction(sending_direction)
        if not party_id or not peer_party_id or party_id == peer_party_id:
            raise ValueError(
                f"expected two distinct non-empty party ids, got {party_id!r} and {peer_party_id!r}"
            )
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, got {synchronous!r}")
        if connection.in_transaction:
            raise RuntimeError("SyncLog needs the connection outside a transaction to set it up")
        sqlite = is_sqlite(connection)
        if sqlite:
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ValueError(
                    f"SyncLog needs a database file in WAL mode, got journal mode {mode}"
                )
            connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._connection = connection
        self._party_id = party_id
        self._peer_party_id = peer_party_id
        self._sending_direction = sending_direction
        self._receiving_direction = (
            EXCHANGE_TO_CUSTODIAN
            if sending_direction == CUSTODIAN_TO_EXCHANGE
            else CUSTODIAN_TO_EXCHANGE
        )
        self._listeners: list[Callable[[], None]] = []
        # (first sequence, span context) of appends made inside a span: in memory only.
        self._traced_writes: deque[tuple[int, trace.SpanContext]] = deque(maxlen=_MAX_TRACED_WRITES)
        with self._own_transaction():
            for statement in _SCHEMA:
                connection.execute(statement)
            # Only SQLite files predate these columns (PostgreSQL tables have them all).
            for table, column, declaration in _MIGRATIONS if sqlite else ():
                columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    # -- identity --

    @property
    def connection(self) -> SqlConnection:
        return self._connection

    @property
    def party_id(self) -> str:
        return self._party_id

    @property
    def peer_party_id(self) -> str:
        return self._peer_party_id

    @property
    def sending_direction(self) -> int:
        return self._sending_direction

    @property
    def receiving_direction(self) -> int:
        return self._receiving_direction

    # -- transactions and wake-ups --

    @contextmanager
    def transaction(self) -> Iterator[SqlConnection]:
        """``with log.transaction() as conn:`` change state and :meth:`append`, atomically.

        Begins an immediate transaction, commits it on success, rolls it back
        on any exception, and wakes the sessions after a commit.
        """
        with self._own_transaction():
            yield self._connection
        self.notify()

    def notify(self) -> None:
        """Wake the sessions sending this log; call it after committing an :meth:`append`."""
        for listener in self._listeners:
            listener()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` on every :meth:`notify` (a running session registers here)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``; absent listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    @contextmanager
    def _own_transaction(self) -> Iterator[None]:
        connection = self._connection
        if connection.in_transaction:
            raise RuntimeError(
                "the connection already has an open transaction; the sync log writes "
                "between the caller's transactions"
            )
        with sqlite_refusals(connection):
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.commit()

    # -- our outgoing log --

    def append(self, updates: Iterable[position_sync_pb2.PositionUpdate | bytes]) -> LogHead:
        """Append updates to our outgoing log inside the caller's open transaction.

        Each update is a PositionUpdate (serialised here, once) or its bytes;
        it must carry a variant allowed in our direction and be at most
        :data:`MAX_UPDATE_BYTES`, else MalformedError and nothing is written.
        Returns the new head. The entries are sent once the transaction
        commits and :meth:`notify` runs (:meth:`transaction` does both).
        """
        connection = self._connection
        if not connection.in_transaction:
            raise RuntimeError(
                "append must run inside a transaction (SyncLog.transaction() or your own), "
                "so that the state change and its log entries commit together"
            )
        direction = self._sending_direction
        allowed = _VARIANTS[direction]
        prefix = _PREFIX[direction]
        sha256 = hashlib.sha256
        peer = self._peer_party_id
        sequence, prev = self._outgoing_head()
        rows = []
        # A peer refuses a bad update forever, which would wedge the log behind
        # it: each is checked here, before anything is written.
        for update in updates:
            sequence += 1
            data = (
                update
                if isinstance(update, bytes)
                else update.SerializeToString(deterministic=True)
            )
            if len(data) > MAX_UPDATE_BYTES:
                raise CollateralSyncError(
                    f"update of {len(data)} bytes exceeds the limit of {MAX_UPDATE_BYTES}",
                    reason=_R.ERROR_REASON_TOO_LARGE,
                    metadata={"expected": f"<= {MAX_UPDATE_BYTES}", "actual": str(len(data))},
                )
            # A message is checked as given; bytes only once parsed.
            parsed = _parse_update(data, sequence) if isinstance(update, bytes) else update
            variant = parsed.WhichOneof("update")
            if variant not in allowed:
                raise _variant_error(direction, sequence, variant)
            prev = sha256(prefix + sequence.to_bytes(8, "big") + prev + data).digest()
            rows.append((peer, direction, sequence, prev, data))
        connection.executemany(_OUT_INSERT, rows)
        if rows:
            writer = trace.get_current_span().get_span_context()
            if writer.is_valid:
                self._traced_writes.append((rows[0][2], writer))
        return LogHead(sequence, prev)

    def _writers_up_to(self, sequence: int) -> list[trace.SpanContext]:
        """The spans that appended entries up to ``sequence``, forgotten once returned.

        Best effort, for the batch span's links: a write rolled back leaves
        its span to be linked from the batch that carries its sequence.
        """
        traced = self._traced_writes
        found = []
        while traced and traced[0][0] <= sequence:
            found.append(traced.popleft()[1])
        return found

    def sent_head(self) -> LogHead:
        """Head of our outgoing log as this connection sees it."""
        return self._outgoing_head()

    def outgoing_hash(self, sequence: int) -> bytes | None:
        """Entry hash of our outgoing entry at ``sequence`` (32 zero bytes at 0), or None."""
        if sequence == 0:
            return ZERO_HASH
        row = self._connection.execute(
            _OUT_HASH, (self._peer_party_id, self._sending_direction, sequence)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def outgoing_entry(self, sequence: int) -> position_sync_pb2.SyncEntry | None:
        """Our outgoing entry at ``sequence`` as it is sent, or None."""
        if sequence < 1:
            return None
        row = self._connection.execute(
            _OUT_ENTRY, (self._peer_party_id, self._sending_direction, sequence)
        ).fetchone()
        prev = self.outgoing_hash(sequence - 1)
        if row is None or prev is None:
            return None
        return position_sync_pb2.SyncEntry(
            sequence=sequence, prev_entry_hash=prev, update=row[1], entry_hash=row[0]
        )

    def _outgoing_head(self) -> LogHead:
        row = self._connection.execute(
            _OUT_HEAD, (self._peer_party_id, self._sending_direction)
        ).fetchone()
        return _EMPTY if row is None else LogHead(row[0], bytes(row[1]))

    def _read_outgoing(self, after: int, limit: int) -> list[tuple[int, bytes, bytes]]:
        """Up to ``limit`` entries after ``after`` that fit one batch: (sequence, hash, update).

        Always at least one entry if there is one (append bounds its size).
        """
        rows: list[tuple[int, bytes, bytes]] = self._connection.execute(
            _OUT_RANGE, (self._peer_party_id, self._sending_direction, after, limit)
        ).fetchall()
        budget = _BATCH_PAYLOAD_BUDGET
        for index, row in enumerate(rows):
            budget -= len(row[2]) + _ENTRY_OVERHEAD
            if budget < 0 and index > 0:
                return rows[:index]
        return rows

    # -- the peer's log as received --

    def received_head(self) -> LogHead:
        """Head of the peer's log as durably received here."""
        row = self._connection.execute(
            _IN_HEAD, (self._peer_party_id, self._receiving_direction)
        ).fetchone()
        return _EMPTY if row is None else LogHead(row[0], bytes(row[1]))

    def received_entry(self, sequence: int) -> position_sync_pb2.SyncEntry | None:
        """The peer's entry at ``sequence`` as received (from its stored signed batch)."""
        envelope = self._received_batch_at(sequence)
        if envelope is None:
            return None
        batch = position_sync_pb2.SyncBatch.FromString(envelope.payload)
        offset = sequence - batch.entries[0].sequence
        return batch.entries[offset]

    def _received_batch_at(self, sequence: int) -> envelope_pb2.Envelope | None:
        row = self._connection.execute(
            _IN_BATCH_AT,
            (self._peer_party_id, self._receiving_direction, sequence, sequence),
        ).fetchone()
        return None if row is None else envelope_pb2.Envelope.FromString(row[0])

    def accept_batch(
        self, batch: VerifiedSyncBatch, apply: ApplyUpdates, *, now: datetime
    ) -> LogHead:
        """Store and apply the new entries of a verified batch, atomically; return the new head.

        Against the stored head R (docs/PROTOCOL.md §6.5 steps 3 to 7): entries
        up to R are duplicates, checked at the last one (its hash commits to
        all before it) and skipped; a different hash there, or a first new
        entry that does not chain to R, is equivocation — the evidence is kept
        and VerificationError(EQUIVOCATION) raised; a first new sequence past
        R + 1 is SEQUENCE_GAP. New entries must carry updates allowed in this
        direction (MALFORMED). Then, in one transaction: the signed batch is
        stored, ``apply`` gets the new (sequence, update) pairs in order, and
        the transaction commits. Any exception (from ``apply`` too) rolls it
        all back: nothing stored, nothing applied.
        """
        if batch.direction != self._receiving_direction:
            raise ValueError(
                f"batch of {direction_name(batch.direction)} offered to the "
                f"{direction_name(self._receiving_direction)} log"
            )
        last = batch.last_sequence
        with self._own_transaction():
            head = self.received_head()
            fit = self._fit(batch, head)
            if isinstance(fit, _Conflict):
                conflict = fit
            elif fit > last:
                return head  # duplicates only
            else:
                parsed = _parse_updates(
                    batch.direction, fit, batch.updates[fit - batch.first_sequence :]
                )
                self._connection.execute(
                    _IN_INSERT,
                    (
                        self._peer_party_id,
                        batch.direction,
                        fit,
                        last,
                        batch.last_entry_hash,
                        batch.statement.envelope.SerializeToString(),
                        _rfc3339(now),
                        _issued_at_us(batch.statement.header.issued_at),
                    ),
                )
                apply(parsed)
        if isinstance(fit, _Conflict):
            # The refused batch changed nothing; the evidence outlives the refusal.
            self._keep_evidence(
                kind="batch",
                direction=batch.direction,
                sequence=conflict.sequence,
                stored=conflict.stored,
                received=conflict.received,
                stored_batch=conflict.stored_batch,
                received_message=batch.statement.envelope.SerializeToString(),
                now=now,
            )
            raise _equivocation_error(
                "batch", batch.direction, conflict.sequence, conflict.stored, conflict.received
            )
        # apply may have appended to our outgoing log in the same transaction.
        self.notify()
        return LogHead(last, batch.last_entry_hash)

    def _fit(self, batch: VerifiedSyncBatch, head: LogHead) -> int | _Conflict:
        """First new sequence of ``batch`` on top of ``head``, or the conflict it shows."""
        first, last = batch.first_sequence, batch.last_sequence
        if first > head.sequence + 1:
            raise VerificationError(
                f"batch starts at sequence {first}; expected at most {head.sequence + 1} "
                f"(received up to {head.sequence})",
                reason=_R.ERROR_REASON_SEQUENCE_GAP,
                metadata={"expected": str(head.sequence + 1), "actual": str(first)},
            )
        if first <= head.sequence:
            overlap = min(last, head.sequence)
            received = batch.entry_hashes[overlap - first]
            stored_batch = self._received_batch_at(overlap)
            stored = _entry_hash_in(stored_batch, overlap)
            if received != stored:
                return _Conflict(overlap, stored, received, _serialised(stored_batch))
            if last <= head.sequence:
                return last + 1
            prev = batch.entry_hashes[head.sequence - first]
        else:
            prev = batch.first_prev_hash
        if prev != head.entry_hash:
            stored_batch = self._received_batch_at(head.sequence)
            return _Conflict(head.sequence, head.entry_hash, prev, _serialised(stored_batch))
        return head.sequence + 1

    # -- heads at a cut-off (reconciliation) --

    def heads_at(self, cutoff: datetime) -> dict[int, LogHead]:
        """Both logs' heads at ``cutoff``, by direction number (docs/PROTOCOL.md §10.2).

        Each direction's head is the last entry contained in a batch whose
        signed ``header.issued_at`` is at or before ``cutoff``: of the batches
        we sent (recorded by the session as it sends them) for our direction,
        and of the peer's batches stored here for the other. A duplicates-only
        batch stores nothing and counts through the batch that first brought
        its entries. An empty log, or none issued by then, has head 0 and 32
        zero bytes. ``cutoff`` must be timezone-aware.
        """
        limit = _datetime_us(cutoff)
        heads = {
            self._sending_direction: self._sent_head_at(limit),
            self._receiving_direction: self._received_head_at(limit),
        }
        return dict(sorted(heads.items()))

    def _sent_head_at(self, limit_us: int) -> LogHead:
        row = self._connection.execute(
            _SENT_HEAD_AT, (self._peer_party_id, self._sending_direction, limit_us)
        ).fetchone()
        return _EMPTY if row is None else LogHead(row[0], bytes(row[1]))

    def _received_head_at(self, limit_us: int) -> LogHead:
        key = (self._peer_party_id, self._receiving_direction)
        row = self._connection.execute(_IN_HEAD_AT, (*key, limit_us)).fetchone()
        found = _EMPTY if row is None else LogHead(row[0], bytes(row[1]))
        # Batches stored before issued_at_us existed (newest first, one at a time):
        # their signed envelopes say it.
        for sequence, hash_, envelope in self._connection.execute(
            _IN_UNDATED_ABOVE, (*key, found.sequence)
        ):
            stored = envelope_pb2.Envelope.FromString(envelope)
            header = position_sync_pb2.SyncBatch.FromString(stored.payload).header
            if _issued_at_us(header.issued_at) <= limit_us:
                return LogHead(sequence, bytes(hash_))
        return found

    def _record_sent(self, head: LogHead, issued_at: datetime) -> None:
        """Record, durably, that a batch ending at ``head`` and issued at ``issued_at`` is sent.

        One small transaction of its own: the session calls it before writing
        the batch, outside any transaction (it sends nothing while one is open).
        """
        with self._own_transaction():
            self._connection.execute(
                _SENT_INSERT,
                (
                    self._peer_party_id,
                    self._sending_direction,
                    head.sequence,
                    head.entry_hash,
                    _datetime_us(issued_at),
                ),
            )

    def _record_held_by_peer(self, head: LogHead, now: datetime) -> None:
        """The peer's hello confirmed our log up to ``head``: make sure a sent batch covers it.

        Only batches sent before the sent-batch records existed (or whose record
        a power loss took) are not covered; they were issued at ``now`` at the
        latest, which is recorded.
        """
        if head.sequence == 0:
            return
        covered = self._connection.execute(
            _SENT_COVERS, (self._peer_party_id, self._sending_direction, head.sequence)
        ).fetchone()
        if covered is None:
            self._record_sent(head, now)

    # -- evidence --

    def _keep_evidence(
        self,
        *,
        kind: str,
        direction: int,
        sequence: int,
        stored: bytes,
        received: bytes,
        stored_batch: bytes | None,
        received_message: bytes,
        now: datetime,
    ) -> None:
        """Store equivocation evidence in a transaction of its own (it outlives the refusal)."""
        with self._own_transaction():
            self._connection.execute(
                _EVIDENCE_INSERT,
                (
                    self._peer_party_id,
                    direction,
                    sequence,
                    kind,
                    stored,
                    received,
                    stored_batch,
                    received_message,
                    _rfc3339(now),
                ),
            )

    def evidence(self) -> list[EquivocationEvidence]:
        """Every distinct equivocation kept for this peer, oldest first."""
        rows = self._connection.execute(_EVIDENCE_SELECT, (self._peer_party_id,)).fetchall()
        return [
            EquivocationEvidence(
                kind=kind,
                direction=direction,
                sequence=sequence,
                stored_entry_hash=bytes(stored),
                received_entry_hash=bytes(received),
                stored_batch=None if stored_batch is None else bytes(stored_batch),
                received=bytes(received_message),
                detected_at=datetime.fromisoformat(detected_at),
            )
            for (
                kind,
                direction,
                sequence,
                stored,
                received,
                stored_batch,
                received_message,
                detected_at,
            ) in rows
        ]

    def __repr__(self) -> str:
        return (
            f"SyncLog(party_id={self._party_id!r}, peer_party_id={self._peer_party_id!r}, "
            f"sending_direction={direction_name(self._sending_direction)})"
        )


def _entry_hash_in(envelope: envelope_pb2.Envelope | None, sequence: int) -> bytes:
    """Entry hash at ``sequence`` inside a stored (already verified) batch envelope."""
    if envelope is None:  # pragma: no cover - the stored ranges tile 1..head
        raise RuntimeError(f"no stored batch holds received sequence {sequence}")
    batch = position_sync_pb2.SyncBatch.FromString(envelope.payload)
    return batch.entries[sequence - batch.entries[0].sequence].entry_hash


@dataclass(frozen=True, slots=True)
class _Conflict:
    sequence: int
    stored: bytes
    received: bytes
    stored_batch: bytes | None


def _serialised(envelope: envelope_pb2.Envelope | None) -> bytes | None:
    return None if envelope is None else envelope.SerializeToString()


def _datetime_us(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (ValueError if naive)."""
    return _datetime_ns(moment) // 1_000


def _issued_at_us(stamp: timestamp_pb2.Timestamp) -> int:
    """A Timestamp in microseconds since the epoch, rounded *up*.

    Rounding up keeps ``issued_at <= cutoff`` exact for any datetime cut-off
    (microseconds): an instant 1 ns after the cut-off stays after it.
    """
    return -(-_timestamp_ns(stamp) // 1_000)


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {moment!r}")
    return moment.astimezone(UTC).isoformat()
