"""Server storage: the interface every role writes through, and its SQLite engine.

A server keeps all of its state in one database so that a state change, the
replay record of the statement that caused it and the position-sync entries
announcing it commit together (docs/PROTOCOL.md §3.6 g, §6.5, §12.3).
:class:`Storage` is what the roles rely on: atomic transactions with
post-commit listeners, small named values (``meta``), per-type statement
counters, a durable :class:`~collateral_sync.signing.ReplayGuard` and the
position-sync logs. A role's own tables sit behind a role store of its own
(for instance the custodian's ``CustodianStore``) with one implementation per
engine, so another engine is a new :class:`Storage` plus role stores for it.

:class:`SqliteStorage` is the default engine: one file in WAL mode.
``synchronous=NORMAL`` (the default) keeps every committed transaction across a
killed process (SIGKILL); ``FULL`` also across power loss, at one fsync per
commit. Not thread-safe: servers run on one asyncio event loop and never hold a
transaction across an ``await``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from collateral_sync.errors import VerificationError, sqlite_refusals
from collateral_sync.signing import ReplayGuard, VerifiedStatement
from collateral_sync.sync import SyncLog, WalCheckpointer
from collateral_sync.v1 import errors_pb2

__all__ = [
    "SqliteReplayGuard",
    "SqliteStorage",
    "Storage",
    "open_storage",
]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Last sequence accepted per (issuer, payload type): stage g of every statement acted on.
    """CREATE TABLE IF NOT EXISTS replay_guard (
        issuer TEXT NOT NULL,
        payload_type TEXT NOT NULL,
        last_sequence INTEGER NOT NULL,
        PRIMARY KEY (issuer, payload_type)
    )""",
    # Our own issuing counters: header.sequence per payload type we sign.
    """CREATE TABLE IF NOT EXISTS statement_sequences (
        payload_type TEXT PRIMARY KEY,
        last_sequence INTEGER NOT NULL
    )""",
)


class Storage(Protocol):
    """What a role needs from its storage engine."""

    @property
    def engine(self) -> str:
        """Name of the engine, e.g. ``"sqlite"``."""

    @property
    def in_transaction(self) -> bool: ...

    def transaction(self) -> AbstractContextManager[None]:
        """One atomic unit: commit on success, roll back on any exception.

        Nesting is refused. After the commit the commit listeners run, in the
        order they were added.
        """

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Run ``listener`` after every commit of :meth:`transaction`."""

    def get_meta(self, name: str) -> str | None: ...

    def set_meta(self, name: str, value: str) -> None:
        """Set a named value; inside a transaction."""

    def next_sequence(self, payload_type: str) -> int:
        """Take the next header sequence for a statement type we issue; inside a transaction."""

    def replay_guard(self) -> ReplayGuard:
        """The durable replay guard; its ``record`` must run inside a transaction."""

    def sync_log(self, *, party_id: str, peer_party_id: str, sending_direction: int) -> SyncLog:
        """The position-sync logs with one peer, kept in this storage."""

    def close(self) -> None: ...


class SqliteStorage:
    """:class:`Storage` on one SQLite file in WAL mode."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous.upper()
        # Autocommit mode: every transaction is an explicit BEGIN IMMEDIATE, as the
        # sync log expects, so nothing is ever opened implicitly.
        self._connection = sqlite3.connect(self._path, isolation_level=None)
        self._listeners: list[Callable[[], None]] = []
        self._logs: dict[tuple[str, int], SyncLog] = {}
        try:
            self._configure()
        except BaseException:
            self._connection.close()
            raise
        # WAL checkpoints sync the database file: in a background thread, not in
        # whichever commit (say, the one acknowledging a margin call) crosses the limit.
        self._checkpointer = WalCheckpointer(self._connection).start()

    def _configure(self) -> None:
        mode = self._connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"expected WAL journal mode, got {mode}")
        self._connection.execute(f"PRAGMA synchronous = {self._synchronous}")
        self.execute_schema(_SCHEMA)

    # -- engine specifics for role stores --

    @property
    def engine(self) -> str:
        return "sqlite"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def connection(self) -> sqlite3.Connection:
        """The SQLite connection, for role stores written for this engine."""
        return self._connection

    def execute_schema(self, statements: Sequence[str]) -> None:
        """Create a role's tables (``CREATE ... IF NOT EXISTS``) in one transaction."""
        with self._raw_transaction():
            for statement in statements:
                self._connection.execute(statement)

    # -- transactions --

    @property
    def in_transaction(self) -> bool:
        return self._connection.in_transaction

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._raw_transaction():
            yield
        for listener in list(self._listeners):
            listener()

    @contextmanager
    def _raw_transaction(self) -> Iterator[None]:
        connection = self._connection
        if connection.in_transaction:
            raise RuntimeError("a transaction is already open on this storage")
        # A full or read-only database refuses the request (nothing is written),
        # rather than failing it as INTERNAL.
        with sqlite_refusals(connection):
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.commit()

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the open transaction that is undone alone if it raises (it may nest)."""
        self._require_transaction("savepoint")
        connection = self._connection
        connection.execute("SAVEPOINT part")
        try:
            yield
        except BaseException:
            connection.execute("ROLLBACK TO SAVEPOINT part")
            connection.execute("RELEASE SAVEPOINT part")
            raise
        connection.execute("RELEASE SAVEPOINT part")

    def _require_transaction(self, what: str) -> None:
        if not self._connection.in_transaction:
            raise RuntimeError(f"{what} must run inside a storage transaction")

    # -- named values and counters --

    def get_meta(self, name: str) -> str | None:
        row = self._connection.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        self._require_transaction("set_meta")
        self._connection.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def next_sequence(self, payload_type: str) -> int:
        self._require_transaction("next_sequence")
        row = self._connection.execute(
            "INSERT INTO statement_sequences (payload_type, last_sequence) VALUES (?, 1) "
            "ON CONFLICT (payload_type) DO UPDATE SET last_sequence = last_sequence + 1 "
            "RETURNING last_sequence",
            (payload_type,),
        ).fetchone()
        return int(row[0])

    def last_sequence(self, payload_type: str) -> int:
        """The last sequence :meth:`next_sequence` handed out for ``payload_type`` (0: none)."""
        row = self._connection.execute(
            "SELECT last_sequence FROM statement_sequences WHERE payload_type = ?",
            (payload_type,),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def replay_guard(self) -> SqliteReplayGuard:
        return SqliteReplayGuard(self)

    # -- position sync --

    def sync_log(self, *, party_id: str, peer_party_id: str, sending_direction: int) -> SyncLog:
        key = (peer_party_id, sending_direction)
        log = self._logs.get(key)
        if log is None:
            log = SyncLog(
                self._connection,
                party_id=party_id,
                peer_party_id=peer_party_id,
                sending_direction=sending_direction,
                synchronous=self._synchronous,
            )
            self._logs[key] = log
        return log

    def close(self) -> None:
        self._checkpointer.stop()
        self._connection.close()


class SqliteReplayGuard:
    """A :class:`~collateral_sync.signing.ReplayGuard` kept in the server's database.

    ``record`` writes in the caller's open transaction, so the replay record
    and the state change it belongs to commit (or roll back) together.
    """

    __slots__ = ("_storage",)

    def __init__(self, storage: SqliteStorage) -> None:
        self._storage = storage

    def last_sequence(self, issuer: str, payload_type: str) -> int:
        row = self._storage.connection.execute(
            "SELECT last_sequence FROM replay_guard WHERE issuer = ? AND payload_type = ?",
            (issuer, payload_type),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def check(self, issuer: str, payload_type: str, sequence: int) -> None:
        last = self.last_sequence(issuer, payload_type)
        if sequence <= last:
            raise VerificationError(
                f"sequence {sequence} from {issuer!r} was already accepted "
                f"(last accepted {last}); expected > {last}",
                reason=errors_pb2.ERROR_REASON_REPLAYED,
                metadata={"expected": f"> {last}", "actual": str(sequence)},
            )

    def record(self, statement: VerifiedStatement[Any]) -> None:
        self._storage._require_transaction("ReplayGuard.record")
        self.check(statement.issuer, statement.payload_type, statement.sequence)
        self._storage.connection.execute(
            "INSERT INTO replay_guard (issuer, payload_type, last_sequence) VALUES (?, ?, ?) "
            "ON CONFLICT (issuer, payload_type) DO UPDATE SET last_sequence = excluded.last_sequence",
            (statement.issuer, statement.payload_type, statement.sequence),
        )


def open_storage(engine: str, path: Path, *, synchronous: str) -> SqliteStorage:
    """Open the storage engine named in the configuration."""
    if engine != "sqlite":
        raise ValueError(f"unknown storage engine {engine!r}; expected 'sqlite'")
    return SqliteStorage(path, synchronous=synchronous)
