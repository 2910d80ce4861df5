"""Who may write: one active server per database, the others on standby.

Two processes of one role may run on one PostgreSQL database, for failover.
The active one holds a lease: a session-level advisory lock on a connection of
its own (not the pool's), which PostgreSQL releases the moment that connection
ends — the process killed, its host gone, the network cut. A standby waits for
the lease and then starts serving.

Each time a server takes the lease it counts one more in the table ``lease``
(its *epoch*). A server whose lease connection broke (the database restarted,
say) may take the lease back and go on only if the epoch is still its own:
then nobody else was active in between and what it holds in memory is still
true. Otherwise it stops, and restarts as a standby.

The lease also fences: every write transaction checks, in the same statement
that takes the writer lock, that the lease's backend still holds the lease
(:class:`~collateral_sync.sql.PostgresConnection`'s ``fence``). A server that
has lost its lease — a network cut long enough for a standby to take over —
can therefore write nothing more, even before it notices.
"""

from __future__ import annotations

import psycopg
from collateral_sync.sql import postgres_connect

__all__ = ["LEASE_KEY", "PostgresLease"]

#: The session-level advisory lock of the lease ("lease" in the high bits).
LEASE_KEY = 0x6C656173_00000001


class PostgresLease:
    """The lease on one database, tried and held on a dedicated connection."""

    def __init__(self, conninfo: str, *, password: str | None) -> None:
        self._conninfo = conninfo
        self._password = password
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None
        self._held = False
        #: The epoch this server took the lease at (0: never).
        self.epoch = 0

    @property
    def held(self) -> bool:
        return self._held

    @property
    def backend_pid(self) -> int:
        """The PostgreSQL backend holding our lease (for the write fence)."""
        assert self._connection is not None
        return int(self._connection.info.backend_pid)

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it (a new epoch); True once held. Never waits."""
        if self._held:
            return True
        try:
            if not self._lock():
                return False
            self.epoch = self._bump()
        except psycopg.Error:
            self._drop()
            return False
        self._held = True
        return True

    def take_back(self) -> bool | None:
        """After losing the lease: take it again if nobody else held it meanwhile.

        True: taken back, same history (the epoch is still ours, now one more).
        False: another server held it since (or holds it now): stop. None: the
        database cannot be reached yet; ask again later.
        """
        if self._held:
            return True
        try:
            if not self._lock():
                return False
            assert self._connection is not None
            row = self._connection.execute("SELECT epoch FROM lease WHERE id = 1").fetchone()
            if row is None or row[0] != self.epoch:
                self._drop()
                return False
            self.epoch = self._bump()
        except psycopg.Error:
            self._drop()
            return None
        self._held = True
        return True

    def _lock(self) -> bool:
        if self._connection is None or self._connection.closed:
            self._connection = postgres_connect(
                self._conninfo, password=self._password, name="collateral-sync lease"
            )
        row = self._connection.execute("SELECT pg_try_advisory_lock(%s)", (LEASE_KEY,)).fetchone()
        return bool(row and row[0])

    def _bump(self) -> int:
        assert self._connection is not None
        row = self._connection.execute(
            "INSERT INTO lease (id, epoch) VALUES (1, 1) "
            "ON CONFLICT (id) DO UPDATE SET epoch = lease.epoch + 1 RETURNING epoch"
        ).fetchone()
        assert row is not None
        epoch = row[0]
        assert isinstance(epoch, int)
        return epoch

    def still_held(self) -> bool:
        """Whether the lease connection is alive (so the lock is still ours)."""
        if not self._held or self._connection is None:
            return False
        try:
            self._connection.execute("SELECT 1")
        except psycopg.Error:
            self._drop()
            return False
        return True

    def release(self) -> None:
        self._drop()

    def _drop(self) -> None:
        self._held = False
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
