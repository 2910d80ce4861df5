"""The SQLite engine: one file in WAL mode, the default.

``synchronous=NORMAL`` (the default) keeps every committed transaction across
a killed process (SIGKILL); ``FULL`` also across power loss, at one fsync per
commit. WAL checkpoints run off the commit path (a background thread).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from collateral_sync.attestation import AttestationLog
from collateral_sync.sync import WalCheckpointer

from collateral_sync_reference.common.storage._base import SqlStorage

__all__ = ["SqliteStorage"]


class SqliteStorage(SqlStorage):
    """:class:`~collateral_sync_reference.common.storage.Storage` on one SQLite file."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every transaction is an explicit BEGIN IMMEDIATE, as the
        # sync log expects, so nothing is ever opened implicitly.
        connection = sqlite3.connect(self._path, isolation_level=None)
        super().__init__(connection, synchronous=synchronous.upper())
        self._sqlite = connection
        try:
            _configure(connection, self._synchronous)
            self._create_base_schema()
        except BaseException:
            connection.close()
            raise
        # WAL checkpoints sync the database file: in a background thread, not in
        # whichever commit (say, the one acknowledging a margin call) crosses the limit.
        self._checkpointer = WalCheckpointer(connection).start()

    @property
    def engine(self) -> str:
        return "sqlite"

    @property
    def path(self) -> Path:
        return self._path

    def _table_exists(self, name: str) -> bool:
        row = self._sqlite.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def attestation_log(self, origin: str, *, path: Path | None) -> AttestationLog:
        """The log in a file of its own beside the database (see AttestationLog's durability)."""
        if path is None:
            raise ValueError("a SQLite server keeps its attestation log in a file: give its path")
        return AttestationLog(path, origin=origin)

    def close(self) -> None:
        self._checkpointer.stop()
        self._sqlite.close()


def _configure(connection: sqlite3.Connection, synchronous: str) -> None:
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"expected WAL journal mode, got {mode}")
    connection.execute(f"PRAGMA synchronous = {synchronous}")
