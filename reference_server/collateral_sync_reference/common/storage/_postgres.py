"""The PostgreSQL engine: a database server the operators back up, replicate and watch.

Every transaction is ``BEGIN`` plus the database's writer lock (a
transaction-scoped advisory lock, :mod:`collateral_sync.sql`), so writers are
serialised as SQLite serialises them and a read-then-write inside one
transaction cannot interleave with another process's. Commits are durable as
the server's ``synchronous_commit`` makes them (on by default: flushed before
the commit returns).
"""

from __future__ import annotations

from pathlib import Path

from collateral_sync.attestation import AttestationLog
from collateral_sync.sql import Fence, PostgresConnection, postgres_pool

from collateral_sync_reference.common.storage._base import SqlStorage
from collateral_sync_reference.common.storage._lease import LEASE_KEY, PostgresLease

__all__ = ["PostgresStorage"]


class PostgresStorage(SqlStorage):
    """:class:`~collateral_sync_reference.common.storage.Storage` on a PostgreSQL database."""

    def __init__(self, conninfo: str, *, password: str | None, pool_size: int) -> None:
        pool = postgres_pool(conninfo, size=pool_size, password=password)
        super().__init__(PostgresConnection(pool))
        self._pool = pool
        self._conninfo = conninfo
        self._password = password
        self._fence: Fence | None = None
        try:
            self._create_base_schema()
        except BaseException:
            pool.close()
            raise

    @property
    def engine(self) -> str:
        return "postgresql"

    def attestation_log(self, origin: str, *, path: Path | None = None) -> AttestationLog:
        """The log in this database, on a connection of its own (``path`` is not used).

        Its appends commit in transactions of their own, before the state that
        refers to them, as the separate SQLite file's do; fenced like the rest.
        """
        connection = PostgresConnection(self._pool)
        connection.fence = self._fence
        return AttestationLog.in_database(connection, origin=origin)

    def lease(self) -> PostgresLease:
        """The database's lease, not yet tried (:mod:`._lease`)."""
        return PostgresLease(self._conninfo, password=self._password)

    def fence(self, lease: PostgresLease) -> None:
        """From now on, refuse every write transaction unless ``lease`` is still held.

        Called again after the lease was taken back on a new connection.
        """
        if self._fence is None:
            self._fence = Fence(lease.backend_pid, LEASE_KEY)
            assert isinstance(self._connection, PostgresConnection)
            self._connection.fence = self._fence
        else:
            self._fence.pid = lease.backend_pid

    def _table_exists(self, name: str) -> bool:
        row = self._connection.execute("SELECT to_regclass(?)", (name,)).fetchone()
        return row is not None and row[0] is not None

    def reachable(self, timeout: float) -> bool:
        """Whether the database answers within ``timeout`` seconds (thread-safe: the pool's)."""
        try:
            with self._pool.connection(timeout=timeout) as connection:
                connection.execute("SELECT 1")
        except Exception:  # noqa: BLE001  # whatever the reason, it does not answer
            return False
        return True

    def close(self) -> None:
        self._connection.rollback()
        self._pool.close()
