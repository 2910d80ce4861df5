"""What both engines share: transactions, named values, counters, the replay guard, migrations.

Every statement here (and in the role stores) is written once, in the SQL
both engines run through :class:`~collateral_sync.sql.SqlConnection`:
``?`` parameters, ``INSERT ... ON CONFLICT``, ``RETURNING``, schemas in
SQLite's types that PostgreSQL's connection translates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from collateral_sync.attestation import AttestationLog
from collateral_sync.errors import (
    CollateralSyncError,
    StateError,
    VerificationError,
    sqlite_refusals,
)
from collateral_sync.signing import VerifiedStatement
from collateral_sync.sql import SqlConnection
from collateral_sync.sync import SyncLog
from collateral_sync.v1 import errors_pb2

__all__ = ["Migration", "SchemaTooNewError", "SqlReplayGuard", "SqlStorage"]

#: One schema version of a component: (version, statements run in one transaction).
Migration = tuple[int, Sequence[str]]

_SCHEMA: Sequence[str] = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Last sequence accepted per (issuer, payload type): stage g of every statement acted on.
    """CREATE TABLE IF NOT EXISTS replay_guard (
        issuer TEXT NOT NULL,
        payload_type TEXT NOT NULL,
        last_sequence INTEGER NOT NULL,
        PRIMARY KEY (issuer, payload_type)
    )""",
    # Each time a server takes the database's lease, one more (PostgreSQL; _lease.py).
    "CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY, epoch INTEGER NOT NULL)",
    # Our own issuing counters: header.sequence per payload type we sign.
    """CREATE TABLE IF NOT EXISTS statement_sequences (
        payload_type TEXT PRIMARY KEY,
        last_sequence INTEGER NOT NULL
    )""",
)
_VERSIONS = """CREATE TABLE IF NOT EXISTS schema_versions (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)"""


class SchemaTooNewError(StateError):
    """The database was written by a newer server: this one must not touch it."""


class SqlStorage:
    """The engine-independent part of a server's storage, on one :class:`SqlConnection`.

    Not thread-safe: servers run on one asyncio event loop and never hold a
    transaction across an ``await``.
    """

    def __init__(self, connection: SqlConnection, *, synchronous: str = "NORMAL") -> None:
        self._connection = connection
        self._synchronous = synchronous
        self._listeners: list[Callable[[], None]] = []
        self._logs: dict[tuple[str, int], SyncLog] = {}

    def _create_base_schema(self) -> None:
        # A database an operator migrated ahead may grant this server no CREATE right.
        if not self._table_exists("schema_versions"):
            with self._raw_transaction():
                self._connection.execute(_VERSIONS)
        self.migrate("storage", ((1, _SCHEMA),))

    def _table_exists(self, name: str) -> bool:
        raise NotImplementedError

    @property
    def engine(self) -> str:
        raise NotImplementedError

    @property
    def connection(self) -> SqlConnection:
        """The connection, for role stores: one SQL for both engines."""
        return self._connection

    # -- schema versions --

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Bring ``component``'s tables to the last of ``migrations``; returns that version.

        Versions run in order, each in one transaction with its version record,
        from the one after the stored version. A database at a version newer
        than any in ``migrations`` was written by a newer server:
        :class:`SchemaTooNewError`, and nothing is touched. Version 1 of every
        component is written with ``IF NOT EXISTS``, so a database from before
        versions were recorded adopts it.
        """
        known = [version for version, _ in migrations]
        if known != list(range(1, len(known) + 1)):
            raise ValueError(f"{component}: migrations must be versions 1..n in order, got {known}")
        current = self.schema_version(component)
        latest = len(known)
        if current > latest:
            raise SchemaTooNewError(
                f"the database's {component} schema is version {current}, newer than this "
                f"server knows ({latest}): run the server version that wrote it, or a later one",
                metadata={"field": component, "expected": f"<= {latest}", "actual": str(current)},
            )
        for version, statements in migrations[current:]:
            try:
                with self._raw_transaction():
                    for statement in statements:
                        self._connection.execute(statement)
                    self._connection.execute(
                        "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                        "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                        (component, version),
                    )
            except CollateralSyncError:
                raise
            except Exception as err:
                # Missing privileges, most often: one line for the operator, not a traceback.
                detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise StateError(
                    f"cannot apply version {version} of the {component} schema ({detail}); "
                    "nothing of it was applied",
                    metadata={
                        "field": component,
                        "expected": f"version {version}",
                        "actual": detail,
                    },
                ) from err
        return latest

    def schema_version(self, component: str) -> int:
        """The stored schema version of ``component`` (0: none yet)."""
        row = self._connection.execute(
            "SELECT version FROM schema_versions WHERE component = ?", (component,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def execute_schema(self, component: str, statements: Sequence[str]) -> None:
        """Version 1 of a component's tables: ``migrate(component, ((1, statements),))``."""
        self.migrate(component, ((1, statements),))

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
        # A full, read-only or unreachable database refuses the request (nothing is
        # written), rather than failing it as INTERNAL.
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
            "ON CONFLICT (payload_type) DO UPDATE "
            "SET last_sequence = statement_sequences.last_sequence + 1 "
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

    def replay_guard(self) -> SqlReplayGuard:
        return SqlReplayGuard(self)

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

    def attestation_log(self, origin: str, *, path: Path | None) -> AttestationLog:
        """An attestation log kept by this engine (``path``: its own SQLite file, if any)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqlReplayGuard:
    """A :class:`~collateral_sync.signing.ReplayGuard` kept in the server's database.

    ``record`` writes in the caller's open transaction, so the replay record
    and the state change it belongs to commit (or roll back) together.
    """

    __slots__ = ("_storage",)

    def __init__(self, storage: SqlStorage) -> None:
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
