"""Server storage: the interface every role writes through, and its two engines.

A server keeps all of its state in one database so that a state change, the
replay record of the statement that caused it and the position-sync entries
announcing it commit together (docs/PROTOCOL.md §3.6 g, §6.5, §12.3).
:class:`Storage` is what the roles rely on: atomic transactions with
post-commit listeners, small named values (``meta``), per-type statement
counters, a durable :class:`~collateral_sync.signing.ReplayGuard`, the
position-sync logs and versioned schemas. Role stores write their SQL once,
through :attr:`SqlStorage.connection` (:mod:`collateral_sync.sql`), and it
runs on either engine:

- :class:`SqliteStorage` (``"engine": "sqlite"``, the default): one file;
- :class:`PostgresStorage` (``"engine": "postgresql"``): a database server.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from collateral_sync.signing import ReplayGuard
from collateral_sync.sync import SyncLog

from collateral_sync_reference.common.config import StorageSettings
from collateral_sync_reference.common.storage._base import (
    Migration,
    SchemaTooNewError,
    SqlReplayGuard,
    SqlStorage,
)
from collateral_sync_reference.common.storage._postgres import PostgresStorage
from collateral_sync_reference.common.storage._sqlite import SqliteStorage

__all__ = [
    "Migration",
    "PostgresStorage",
    "SchemaTooNewError",
    "SqlReplayGuard",
    "SqlStorage",
    "SqliteStorage",
    "Storage",
    "open_storage",
]


class Storage(Protocol):
    """What a role needs from its storage engine."""

    @property
    def engine(self) -> str:
        """Name of the engine: ``"sqlite"`` or ``"postgresql"``."""

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


def open_storage(settings: StorageSettings) -> SqlStorage:
    """Open the engine the configuration names, its base schema applied."""
    if settings.engine == "postgresql":
        assert settings.dsn is not None
        return PostgresStorage(
            settings.dsn, password=settings.password, pool_size=settings.pool_size
        )
    assert settings.path is not None
    return SqliteStorage(settings.path, synchronous=settings.synchronous)
