"""Position sync, storage side: entry hashes, batch verification, the durable SQLite log.

Public names are re-exported by :mod:`collateral_sync.sync`, which documents
the protocol; this module holds what needs no event loop.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from google.protobuf.message import DecodeError

from collateral_sync.errors import CollateralSyncError, MalformedError, VerificationError
from collateral_sync.keys import KeyRegistry, role_name
from collateral_sync.signing import (
    DEFAULT_MAX_SKEW,
    MAX_PAYLOAD_BYTES,
    VerifiedStatement,
    verify_statement,
)
from collateral_sync.v1 import common_pb2, envelope_pb2, errors_pb2, position_sync_pb2

_R = errors_pb2.ErrorReason
_ROLE = common_pb2.PartyRole

CUSTODIAN_TO_EXCHANGE: int = position_sync_pb2.SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE
EXCHANGE_TO_CUSTODIAN: int = position_sync_pb2.SYNC_DIRECTION_EXCHANGE_TO_CUSTODIAN

ENTRY_HASH_DOMAIN = b"collateral-sync/v1/sync-entry"
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)

#: Largest serialised PositionUpdate one entry may carry, so that any single
#: entry fits a batch under the verifier's payload limit with room for the
#: header and entry framing.
MAX_UPDATE_BYTES = MAX_PAYLOAD_BYTES - 64 * 1024
#: Payload budget of one batch; entries are cut at this many bytes.
_BATCH_PAYLOAD_BUDGET = MAX_PAYLOAD_BYTES - 16 * 1024
#: Upper bound of one entry's framing in a batch (tags, lengths, two hashes, sequence).
_ENTRY_OVERHEAD = 2 * (HASH_SIZE + 2) + 11 + 6 + 6
_MAX_SEQUENCE = 2**63 - 1  # SQLite INTEGER

_SENDER_ROLE = {
    CUSTODIAN_TO_EXCHANGE: _ROLE.PARTY_ROLE_CUSTODIAN,
    EXCHANGE_TO_CUSTODIAN: _ROLE.PARTY_ROLE_EXCHANGE,
}
# PositionUpdate variants allowed in each direction (docs/PROTOCOL.md §6.8).
_VARIANTS = {
    CUSTODIAN_TO_EXCHANGE: frozenset(
        {
            "holdings_change",
            "pledge_change",
            "yield_accrual",
            "liquidation_receipt",
            "margin_call_response",
        }
    ),
    EXCHANGE_TO_CUSTODIAN: frozenset(
        {"credit_line", "margin_call", "liquidation_instruction", "risk_policy"}
    ),
}
# The hash input starts with the same 31 bytes for every entry of a direction.
_PREFIX = {d: ENTRY_HASH_DOMAIN + b"\x00" + bytes([d]) for d in _SENDER_ROLE}
_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")

#: What a receiver hands the new entries of a batch to: (sequence, update) in order.
ApplyUpdates = Callable[[list[tuple[int, position_sync_pb2.PositionUpdate]]], None]


def direction_name(direction: int) -> str:
    """Enum name of a SyncDirection value, or the number if it is not one."""
    try:
        return position_sync_pb2.SyncDirection.Name(direction)  # type: ignore[arg-type]
    except ValueError:
        return str(direction)


def _check_direction(direction: int) -> None:
    if direction not in _PREFIX:
        raise MalformedError(
            f"direction must be CUSTODIAN_TO_EXCHANGE (1) or EXCHANGE_TO_CUSTODIAN (2), "
            f"got {direction_name(direction)}",
            metadata={"expected": "1|2", "actual": str(direction)},
        )


def entry_hash(direction: int, sequence: int, prev_entry_hash: bytes, update: bytes) -> bytes:
    """SHA-256 of one sync-log entry (docs/PROTOCOL.md §6.3).

    ``H("collateral-sync/v1/sync-entry" || 0x00 || u8(direction) ||
    u64be(sequence) || prev_entry_hash || update)``, with ``update`` the
    serialised PositionUpdate exactly as sent or received.
    """
    _check_direction(direction)
    if not 1 <= sequence < 2**64:
        raise MalformedError(
            f"sequence must be in 1..2^64-1, got {sequence}",
            metadata={"expected": "1..2^64-1", "actual": str(sequence)},
        )
    if len(prev_entry_hash) != HASH_SIZE:
        raise MalformedError(
            f"prev_entry_hash must be {HASH_SIZE} bytes, got {len(prev_entry_hash)}",
            metadata={"expected": str(HASH_SIZE), "actual": str(len(prev_entry_hash))},
        )
    return hashlib.sha256(
        _PREFIX[direction] + sequence.to_bytes(8, "big") + prev_entry_hash + update
    ).digest()


class LogHead(NamedTuple):
    """The last entry of a log: its sequence and entry hash (0 and 32 zero bytes if empty)."""

    sequence: int
    entry_hash: bytes


_EMPTY = LogHead(0, ZERO_HASH)


# --- batch verification ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedSyncBatch:
    """A SyncBatch whose envelope, sender, direction and hash chain checked out.

    Says nothing yet about how it fits the receiver's log (duplicates, gaps,
    equivocation): that is :meth:`SyncLog.accept_batch`.
    """

    statement: VerifiedStatement[position_sync_pb2.SyncBatch]
    direction: int
    first_sequence: int
    #: prev_entry_hash of the first entry.
    first_prev_hash: bytes
    #: entry_hash of each entry, in order (sequence first_sequence + i).
    entry_hashes: tuple[bytes, ...]
    #: Serialised PositionUpdate of each entry, as received.
    updates: tuple[bytes, ...]

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + len(self.entry_hashes) - 1

    @property
    def last_entry_hash(self) -> bytes:
        return self.entry_hashes[-1]


def verify_sync_batch(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    receiver_party_id: str,
    sender_party_id: str,
    direction: int,
    now: datetime,
    max_entries: int,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
) -> VerifiedSyncBatch:
    """Verify a received sync batch (docs/PROTOCOL.md §6.5 steps 1 and 2).

    In order: the envelope as a ``sync-batch`` statement addressed to
    ``receiver_party_id`` and fresh at ``now`` (signing stages a to f); the issuer
    is ``sender_party_id``, its key's role and the batch direction match
    ``direction`` (KEY_ROLE_MISMATCH); at most ``max_entries`` entries
    (LIMIT_EXCEEDED: the receiver's window); then the entries: non-empty,
    consecutive, every hash 32 bytes, chained, a sequence-1 entry chained to
    32 zero bytes, every ``entry_hash`` recomputed, and ``header.sequence``
    the last entry's sequence (MALFORMED).
    """
    _check_direction(direction)
    statement = verify_statement(
        envelope,
        registry,
        expected_type=position_sync_pb2.SyncBatch,
        audience=receiver_party_id,
        now=now,
        max_skew=max_skew,
    )
    batch = statement.message
    if statement.issuer != sender_party_id:
        raise VerificationError(
            f"sync batch issued by {statement.issuer!r}, expected the peer {sender_party_id!r}",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": sender_party_id, "actual": statement.issuer},
        )
    signer = registry.get(statement.signer_key_ids[0])
    signer_role = _ROLE.PARTY_ROLE_UNSPECIFIED if signer is None else signer.role
    expected_role = _SENDER_ROLE[direction]
    if signer_role != expected_role:
        raise VerificationError(
            f"{direction_name(direction)} batches are signed by a {role_name(expected_role)} "
            f"key, got a {role_name(signer_role)} key",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": role_name(expected_role), "actual": role_name(signer_role)},
        )
    if batch.direction != direction:
        raise VerificationError(
            f"batch direction {direction_name(batch.direction)}, expected "
            f"{direction_name(direction)} on this stream",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": str(direction), "actual": str(batch.direction)},
            field_violations={"direction": f"must be {direction_name(direction)}"},
        )
    entries = batch.entries
    count = len(entries)
    if count == 0:
        raise MalformedError(
            "sync batch has no entries, expected at least 1",
            metadata={"expected": ">= 1", "actual": "0"},
            field_violations={"entries": "must not be empty"},
        )
    if count > max_entries:
        raise CollateralSyncError(
            f"sync batch of {count} entries exceeds the window of {max_entries}",
            reason=_R.ERROR_REASON_LIMIT_EXCEEDED,
            metadata={"expected": f"<= {max_entries}", "actual": str(count)},
        )
    first = entries[0]
    first_sequence = first.sequence
    last_sequence = first_sequence + count - 1
    if first_sequence < 1 or last_sequence > _MAX_SEQUENCE:
        raise MalformedError(
            f"entry sequences {first_sequence}..{last_sequence} are outside 1..{_MAX_SEQUENCE}",
            metadata={"expected": f"1..{_MAX_SEQUENCE}", "actual": str(first_sequence)},
            field_violations={"entries[0].sequence": "out of range"},
        )
    first_prev = first.prev_entry_hash
    if len(first_prev) != HASH_SIZE or (first_sequence == 1 and first_prev != ZERO_HASH):
        expected = "32 zero bytes" if first_sequence == 1 else f"{HASH_SIZE} bytes"
        raise MalformedError(
            f"entries[0].prev_entry_hash must be {expected}, got {first_prev.hex() or 'empty'}",
            metadata={"expected": expected, "actual": first_prev.hex()},
            field_violations={"entries[0].prev_entry_hash": f"must be {expected}"},
        )

    prefix = _PREFIX[direction]
    sha256 = hashlib.sha256
    hashes: list[bytes] = []
    updates: list[bytes] = []
    expected_sequence = first_sequence
    prev = first_prev
    for index, entry in enumerate(entries):
        sequence = entry.sequence
        if sequence != expected_sequence:
            raise MalformedError(
                f"entries[{index}].sequence {sequence}, expected {expected_sequence} (consecutive)",
                metadata={"expected": str(expected_sequence), "actual": str(sequence)},
                field_violations={f"entries[{index}].sequence": "must be consecutive"},
            )
        if entry.prev_entry_hash != prev:
            raise MalformedError(
                f"entries[{index}].prev_entry_hash does not chain to the previous entry",
                metadata={"expected": prev.hex(), "actual": entry.prev_entry_hash.hex()},
                field_violations={f"entries[{index}].prev_entry_hash": "must chain"},
            )
        claimed = entry.entry_hash
        if len(claimed) != HASH_SIZE:
            raise MalformedError(
                f"entries[{index}].entry_hash is {len(claimed)} bytes, expected {HASH_SIZE}",
                metadata={"expected": str(HASH_SIZE), "actual": str(len(claimed))},
                field_violations={f"entries[{index}].entry_hash": "must be 32 bytes"},
            )
        update = entry.update
        computed = sha256(prefix + sequence.to_bytes(8, "big") + prev + update).digest()
        if computed != claimed:
            raise MalformedError(
                f"entries[{index}] (sequence {sequence}): entry_hash does not match its content",
                metadata={"expected": computed.hex(), "actual": claimed.hex()},
                field_violations={f"entries[{index}].entry_hash": "must be the entry's hash"},
            )
        hashes.append(claimed)
        updates.append(update)
        prev = claimed
        expected_sequence += 1
    if batch.header.sequence != last_sequence:
        raise MalformedError(
            f"header.sequence {batch.header.sequence}, expected the last entry's "
            f"sequence {last_sequence}",
            metadata={"expected": str(last_sequence), "actual": str(batch.header.sequence)},
            field_violations={"header.sequence": "must be the last entry's sequence"},
        )
    return VerifiedSyncBatch(
        statement=statement,
        direction=direction,
        first_sequence=first_sequence,
        first_prev_hash=first_prev,
        entry_hashes=tuple(hashes),
        updates=tuple(updates),
    )


def _parse_updates(
    direction: int, first_sequence: int, updates: Sequence[bytes]
) -> list[tuple[int, position_sync_pb2.PositionUpdate]]:
    """Parse updates and check each carries a variant allowed in ``direction`` (§6.8)."""
    allowed = _VARIANTS[direction]
    parsed: list[tuple[int, position_sync_pb2.PositionUpdate]] = []
    sequence = first_sequence
    for data in updates:
        update = _parse_update(data, sequence)
        variant = update.WhichOneof("update")
        if variant not in allowed:
            raise _variant_error(direction, sequence, variant)
        parsed.append((sequence, update))
        sequence += 1
    return parsed


def _parse_update(data: bytes, sequence: int) -> position_sync_pb2.PositionUpdate:
    try:
        return position_sync_pb2.PositionUpdate.FromString(data)
    except DecodeError as err:
        raise MalformedError(
            f"entry {sequence}: update does not parse as PositionUpdate: {err}",
            metadata={"expected": "PositionUpdate", "actual": "undecodable bytes"},
        ) from err


def _variant_error(direction: int, sequence: int, variant: str | None) -> MalformedError:
    allowed = _VARIANTS[direction]
    return MalformedError(
        f"entry {sequence}: update variant {variant or 'unset'!r} is not allowed in "
        f"{direction_name(direction)}",
        metadata={"expected": "|".join(sorted(allowed)), "actual": variant or "unset"},
    )


# --- evidence -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EquivocationEvidence:
    """Two different entries claimed at one sequence of one log, as detected and kept.

    ``kind`` says where the conflict showed: ``"batch"`` (a received batch
    contradicts the stored log), ``"hello"`` or ``"ack"`` (the peer claims a
    hash of our own outgoing log that we never wrote).
    """

    kind: str
    direction: int
    sequence: int
    stored_entry_hash: bytes
    received_entry_hash: bytes
    #: Serialised Envelope (signed SyncBatch) that carried the stored entry;
    #: None for our own outgoing log, whose entries are not kept signed.
    stored_batch: bytes | None
    #: Serialised Envelope of the conflicting batch (kind "batch"), or the
    #: serialised SyncFrame of the hello or ack.
    received: bytes
    detected_at: datetime


def _equivocation_error(
    kind: str, direction: int, sequence: int, stored: bytes, received: bytes
) -> VerificationError:
    return VerificationError(
        f"equivocation in {direction_name(direction)} at sequence {sequence} ({kind}): "
        f"stored entry hash {stored.hex()}, peer's {received.hex()}",
        reason=_R.ERROR_REASON_EQUIVOCATION,
        metadata={"sequence": str(sequence), "expected": stored.hex(), "actual": received.hex()},
    )


# --- the durable log --------------------------------------------------------------

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
    # so the rows' ranges tile 1..head without overlap.
    """CREATE TABLE IF NOT EXISTS sync_received_batches (
        id INTEGER PRIMARY KEY,
        peer_party_id TEXT NOT NULL,
        direction INTEGER NOT NULL,
        first_sequence INTEGER NOT NULL,
        last_sequence INTEGER NOT NULL,
        last_entry_hash BLOB NOT NULL,
        envelope BLOB NOT NULL,
        received_at TEXT NOT NULL,
        UNIQUE (peer_party_id, direction, last_sequence)
    )""",
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
    "last_sequence, last_entry_hash, envelope, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
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
    """Both sync logs between this party and one peer, kept in the caller's SQLite database.

    The caller owns ``connection`` and uses it for its own state, so that a
    state change and the log entries it causes commit in one transaction:
    :meth:`append` runs inside the caller's open transaction (for instance
    :meth:`transaction`), and the ``apply`` callback of :meth:`accept_batch`
    runs inside the log's. The database is switched to WAL with
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
    )

    def __init__(
        self,
        connection: sqlite3.Connection,
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
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ValueError(f"SyncLog needs a database file in WAL mode, got journal mode {mode}")
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
        with self._own_transaction():
            for statement in _SCHEMA:
                connection.execute(statement)

    # -- identity --

    @property
    def connection(self) -> sqlite3.Connection:
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
    def transaction(self) -> Iterator[sqlite3.Connection]:
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
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            connection.rollback()
            raise
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
        return LogHead(sequence, prev)

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


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {moment!r}")
    return moment.astimezone(UTC).isoformat()
