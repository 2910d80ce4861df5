"""Where the sync benchmark's parties keep their state, and the raw-storage baseline.

Each party keeps its sync log and its own tables in a database of its own:
a SQLite file (WAL, ``synchronous = NORMAL``, WAL checkpoints off the commit
path), or a PostgreSQL database reached through the SDK's
:class:`~collateral_sync.sql.PostgresConnection` (the same SQL), both
databases on one server: a throwaway one (:mod:`collateral_sync.dev_postgres`)
or one the caller names (``--dsn``).

The storage ceiling (:class:`_RawStorage`) is both parties' storage work and
nothing else, through the engine's own driver on connections of its own, one
per party's database, batched as the protocol batches it: the sender inserts
its log rows (:data:`TRANSACTION_UPDATES` a transaction, as the custodian
appends), and per batch of :data:`~collateral_sync.sync.DEFAULT_BATCH_SIZE`
reads them back and records the batch as sent (its own transaction, as the
session does); the receiver, per batch, inserts the signed batch into a log
table shaped as the sync log's and upserts every position (``executemany``)
in one transaction, as the exchange's apply does. No hash chain, no
signature, no parsing, no stream.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collateral_sync.amounts import check_amount
from collateral_sync.dev_postgres import start_postgres
from collateral_sync.signing import sign_statement
from collateral_sync.sql import PostgresConnection, SqlConnection, postgres_ddl, postgres_pool
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, DEFAULT_BATCH_SIZE, WalCheckpointer
from collateral_sync.v1 import position_sync_pb2

from collateral_sync_benchmarks.sync._fixtures import (
    _CUSTODIAN,
    _EXCHANGE,
    _STATEMENT_TTL,
    TRANSACTION_UPDATES,
    _party_keys,
    _pledge_update,
)

if TYPE_CHECKING:
    import psycopg

# Helpers for the sibling modules only: nothing here is API.
__all__: list[str] = []

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
ENGINES = (SQLITE, POSTGRESQL)
#: The two parties' databases, by role.
PARTIES = ("custodian", "exchange")
_SPEC_FILE = "storage.json"

#: The exchange's positions; the raw baseline writes a table of the same shape.
POSITIONS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {table} (account_id TEXT NOT NULL, "
    "asset_id TEXT NOT NULL, pledged_quantity TEXT NOT NULL, sequence INTEGER NOT NULL, "
    "attestation BLOB NOT NULL, PRIMARY KEY (account_id, asset_id))"
)
#: How the exchange applies a pledge change; the raw baseline upserts the same way.
POSITION_UPSERT = (
    "INSERT INTO {table} VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, asset_id) "
    "DO UPDATE SET pledged_quantity = excluded.pledged_quantity, "
    "sequence = excluded.sequence, attestation = excluded.attestation"
)
# The shape of the sync log's table of received batches (collateral_sync.sync), and its insert.
_RAW_LOG_SCHEMA = """CREATE TABLE IF NOT EXISTS raw_received_batches (
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
)"""
_RAW_LOG_INSERT = (
    "INSERT INTO raw_received_batches (peer_party_id, direction, first_sequence, "
    "last_sequence, last_entry_hash, envelope, received_at, issued_at_us) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_RAW_POSITIONS = "raw_positions"
#: The sender's side, shaped as the sync log's sync_outgoing and sync_sent_batches.
_RAW_OUT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS raw_outgoing (
    direction INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    entry_hash BLOB NOT NULL,
    update_bytes BLOB NOT NULL,
    PRIMARY KEY (direction, sequence)
)""",
    """CREATE TABLE IF NOT EXISTS raw_sent_batches (
    direction INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL,
    last_entry_hash BLOB NOT NULL,
    issued_at_us INTEGER NOT NULL,
    PRIMARY KEY (direction, last_sequence)
)""",
)
_RAW_OUT_INSERT = "INSERT INTO raw_outgoing VALUES (?, ?, ?, ?)"
_RAW_OUT_READ = (
    "SELECT sequence, entry_hash, update_bytes FROM raw_outgoing "
    "WHERE direction = ? AND sequence > ? ORDER BY sequence LIMIT ?"
)
_RAW_SENT_INSERT = "INSERT INTO raw_sent_batches VALUES (?, ?, ?, ?)"


class _NoStorageError(Exception):
    """The engine's databases cannot be had: no PostgreSQL to start, or none at ``--dsn``."""


@dataclass(frozen=True)
class _StorageSpec:
    """One party's database: the engine, and for PostgreSQL how to reach it."""

    engine: str
    #: libpq connection string of the party's database (PostgreSQL only).
    conninfo: str = ""
    #: Passed apart from ``conninfo``; None: libpq finds it (conninfo, PGPASSWORD, ~/.pgpass).
    password: str | None = None

    def save(self, workdir: Path) -> None:
        """Hand it to the custodian process (a file only we can read: it may hold a password)."""
        path = workdir / _SPEC_FILE
        path.touch(mode=0o600)
        path.write_text(json.dumps(asdict(self)), "utf-8")

    @classmethod
    def load(cls, workdir: Path) -> _StorageSpec:
        return cls(**json.loads((workdir / _SPEC_FILE).read_text("utf-8")))


@dataclass(frozen=True)
class _Storage:
    """Both parties' databases on one engine, and a line that says what they are."""

    engine: str
    parties: dict[str, _StorageSpec]
    description: str

    @property
    def driver(self) -> str:
        return "sqlite3" if self.engine == SQLITE else "psycopg"


class _Database:
    """A party's connection (the sqlite3-like protocol) and what it takes to keep it."""

    def __init__(self, spec: _StorageSpec, workdir: Path, party: str) -> None:
        self._checkpointer: WalCheckpointer | None = None
        self.connection: SqlConnection
        if spec.engine == SQLITE:
            connection = sqlite3.connect(workdir / f"{party}.sqlite", isolation_level=None)
            connection.execute("PRAGMA journal_mode = WAL")
            # As the reference servers' storage does: WAL checkpoints off the commit
            # path (a daemon thread, gone with the process).
            self._checkpointer = WalCheckpointer(connection).start()
            self.connection = connection
            self._pool = None
        else:
            # One owner, one transaction at a time (see PostgresConnection): 2 is plenty.
            self._pool = postgres_pool(
                spec.conninfo, size=2, password=spec.password, name=f"bench-{party}"
            )
            self.connection = PostgresConnection(self._pool)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._pool is not None:
            self._pool.close()
        elif isinstance(self.connection, sqlite3.Connection):
            self.connection.close()


# ------------------------------------------------------------------ where the databases live


def _sqlite_storage() -> _Storage:
    return _Storage(
        SQLITE,
        {party: _StorageSpec(SQLITE) for party in PARTIES},
        f"SQLite {sqlite3.sqlite_version}, a file a party, WAL synchronous=NORMAL (a commit "
        "reaches the OS, no fsync), WAL checkpoints off the commit path",
    )


def _describe_postgres(connection: psycopg.Connection[Any], where: str) -> str:
    version, fsync, synchronous = (
        connection.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
        for name in ("server_version", "fsync", "synchronous_commit")
    )
    return (
        f"PostgreSQL {version} ({where}; fsync={fsync}, synchronous_commit={synchronous}), "
        "a database a party, through the SDK's PostgresConnection over a psycopg pool"
    )


@contextmanager
def _throwaway_postgres() -> Iterator[_Storage]:
    try:
        server = start_postgres()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        raise _NoStorageError(f"cannot start a throwaway PostgreSQL: {err}") from err
    try:
        parties = {
            party: _StorageSpec(
                POSTGRESQL,
                server.conninfo(server.database(f"bench-sync/{party}"), with_password=False),
                server.password,
            )
            for party in PARTIES
        }
        with server.connect() as admin:
            where = f"a throwaway server on 127.0.0.1:{server.port}"
            description = _describe_postgres(admin, where)
        yield _Storage(POSTGRESQL, parties, description)
    finally:
        server.stop()


@contextmanager
def _existing_postgres(dsn: str) -> Iterator[_Storage]:
    import psycopg  # noqa: PLC0415  # the optional [postgresql] extra
    from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: PLC0415

    names = {party: f"collateral_sync_bench_{party}" for party in PARTIES}
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            for name in names.values():
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                admin.execute(f'CREATE DATABASE "{name}"')
            host = conninfo_to_dict(dsn).get("host") or "the default host"
            description = _describe_postgres(admin, f"--dsn, {host}")
    except psycopg.Error as err:
        raise _NoStorageError(f"--dsn: cannot create the bench's two databases: {err}") from err
    try:
        yield _Storage(
            POSTGRESQL,
            {
                party: _StorageSpec(POSTGRESQL, make_conninfo(dsn, dbname=name))
                for party, name in names.items()
            },
            description,
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            for name in names.values():
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _open_storage(engine: str, dsn: str | None) -> Iterator[_Storage]:
    """Both parties' databases on ``engine``, for one run; removed at its end.

    Raises :class:`_NoStorageError` when there are none to be had.
    """
    if engine == SQLITE:
        yield _sqlite_storage()
    elif dsn is None:
        with _throwaway_postgres() as storage:
            yield storage
    else:
        with _existing_postgres(dsn) as storage:
            yield storage


# ------------------------------------------------------------------ the raw-storage baseline


def _raw_batch_envelope(size: int) -> bytes:
    """A signed batch of ``size`` pledge changes, as the receiver stores it (bytes)."""
    custodian, _, _ = _party_keys()
    batch = position_sync_pb2.SyncBatch(
        direction=position_sync_pb2.SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE
    )
    for sequence in range(1, size + 1):
        batch.entries.add(
            sequence=sequence,
            prev_entry_hash=bytes(32),
            update=_pledge_update(sequence).SerializeToString(deterministic=True),
            entry_hash=bytes(32),
        )
    envelope = sign_statement(
        batch,
        custodian,
        audience=[_EXCHANGE],
        sequence=1,
        ttl=_STATEMENT_TTL,
        issued_at=datetime.now(UTC),
    )
    return envelope.SerializeToString()


def _position_rows(count: int) -> list[tuple[str, str, str, int, bytes]]:
    """The rows the exchange's apply writes for the first ``count`` pledge changes."""
    rows = []
    for index in range(count):
        change = _pledge_update(index).pledge_change
        quantity = check_amount(change.pledged_quantity.value, field="pledged_quantity")
        rows.append(
            (
                change.account_id,
                change.asset_id,
                quantity,
                index + 1,
                change.attestation.SerializeToString(),
            )
        )
    return rows


class _RawStorage:
    """The storage ceiling: both parties' storage work, batched as the protocol batches it.

    On connections of its own, to tables of its own: SQLite files of its own,
    or the two parties' PostgreSQL databases. Each :meth:`run` moves
    ``updates`` updates from the sender's log to the receiver's positions
    (module docstring); blocking (run it in a thread, so that the exchange's
    event loop keeps its stream).
    """

    def __init__(self, storage: _Storage, workdir: Path, updates: int) -> None:
        self.batch_size = DEFAULT_BATCH_SIZE
        self.envelope = _raw_batch_envelope(self.batch_size)
        self._rows = _position_rows(updates)
        self._updates = [
            _pledge_update(i).SerializeToString(deterministic=True) for i in range(updates)
        ]
        self._sequence = 0
        upsert = POSITION_UPSERT.format(table=_RAW_POSITIONS)
        receiver_schema = (POSITIONS_SCHEMA.format(table=_RAW_POSITIONS), _RAW_LOG_SCHEMA)
        self._checkpointers: list[WalCheckpointer] = []
        self._sqlite: list[sqlite3.Connection] = []
        self._postgres: list[psycopg.Connection[Any]] = []
        sql = (_RAW_OUT_INSERT, _RAW_OUT_READ, _RAW_SENT_INSERT, _RAW_LOG_INSERT, upsert)
        if storage.engine == SQLITE:
            for name, schema in (("raw-sender", _RAW_OUT_SCHEMA), ("raw", receiver_schema)):
                # The same settings as the parties' files (_Database and SyncLog).
                connection = sqlite3.connect(
                    workdir / f"{name}.sqlite", isolation_level=None, check_same_thread=False
                )
                connection.execute("PRAGMA journal_mode = WAL")
                connection.execute("PRAGMA synchronous = NORMAL")
                self._checkpointers.append(WalCheckpointer(connection).start())
                for statement in schema:
                    connection.execute(statement)
                self._sqlite.append(connection)
            self._sql = sql
        else:
            import psycopg  # noqa: PLC0415  # the optional [postgresql] extra

            for party, schema in (("custodian", _RAW_OUT_SCHEMA), ("exchange", receiver_schema)):
                spec = storage.parties[party]
                # A None password is left out: libpq finds it (PGPASSWORD, ~/.pgpass).
                database = psycopg.connect(spec.conninfo, autocommit=True, password=spec.password)
                for statement in schema:
                    database.execute(postgres_ddl(statement))
                self._postgres.append(database)
            # No '?' or '%' in these but the parameters.
            out_insert, out_read, sent_insert, log_insert, upsert = (
                statement.replace("?", "%s") for statement in sql
            )
            self._sql = (out_insert, out_read, sent_insert, log_insert, upsert)

    def run(self, updates: int) -> float:
        """Move ``updates`` updates from the sender's log to the receiver; updates per second."""
        rows = self._rows[:updates]
        size = self.batch_size
        received_at = datetime.now(UTC).isoformat()
        issued_at_us = time.time_ns() // 1_000
        after = self._sequence
        first = after + 1
        entries = [
            (CUSTODIAN_TO_EXCHANGE, first + index, bytes(32), update)
            for index, update in enumerate(self._updates[:updates])
        ]
        logs = []
        for start in range(0, len(rows), size):
            last = first + min(size, len(rows) - start) - 1
            logs.append(
                (
                    _CUSTODIAN,
                    CUSTODIAN_TO_EXCHANGE,
                    first,
                    last,
                    bytes(32),
                    self.envelope,
                    received_at,
                    issued_at_us,
                )
            )
            first = last + 1
        self._sequence = first - 1
        work: dict[str, Any] = {
            "entries": entries,
            "after": after,
            "issued_at_us": issued_at_us,
            "rows": rows,
            "logs": logs,
        }
        begin = time.perf_counter()
        if self._sqlite:
            sender, receiver = self._sqlite
            self._run(sender, receiver, "BEGIN IMMEDIATE", **work)
        else:
            sending, receiving = (connection.cursor() for connection in self._postgres)
            self._run(sending, receiving, "BEGIN", **work)
        return len(rows) / (time.perf_counter() - begin)

    def _run(
        self,
        sender: Any,
        receiver: Any,
        begin: str,
        *,
        entries: Sequence[Any],
        after: int,
        issued_at_us: int,
        rows: Sequence[Any],
        logs: Sequence[Any],
    ) -> None:
        """The work itself, on either driver: a sqlite3 connection or a psycopg cursor (both
        take ``execute`` and ``executemany``), in autocommit, each transaction ``begin`` ...
        COMMIT."""
        out_insert, out_read, sent_insert, log_insert, upsert = self._sql
        size = self.batch_size
        for start in range(0, len(entries), TRANSACTION_UPDATES):
            sender.execute(begin)
            sender.executemany(out_insert, entries[start : start + TRANSACTION_UPDATES])
            sender.execute("COMMIT")
        for number, log in enumerate(logs):
            sent = sender.execute(
                out_read, (CUSTODIAN_TO_EXCHANGE, after + number * size, size)
            ).fetchall()
            sender.execute(begin)
            sender.execute(
                sent_insert, (CUSTODIAN_TO_EXCHANGE, sent[-1][0], bytes(32), issued_at_us)
            )
            sender.execute("COMMIT")
            receiver.execute(begin)
            receiver.execute(log_insert, log)
            receiver.executemany(upsert, rows[number * size : (number + 1) * size])
            receiver.execute("COMMIT")

    def close(self) -> None:
        for checkpointer in self._checkpointers:
            checkpointer.stop()
        for connection in self._sqlite:
            connection.close()
        for postgres in self._postgres:
            postgres.close()
