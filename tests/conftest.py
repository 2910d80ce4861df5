"""What every test directory shares: the storage engine the reference servers run on.

``COLLATERAL_SYNC_TEST_STORAGE=postgresql`` (``make test`` runs the storage
tests once more so) puts every reference server the tests start on a real
PostgreSQL: the ``postgres`` fixture starts the machine's own in a temporary
directory for the session (:mod:`_postgres`). Unset, or ``sqlite``, they run
on SQLite files, the default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _postgres import PostgresServer, start_postgres

ENGINE = os.environ.get("COLLATERAL_SYNC_TEST_STORAGE", "sqlite")
if ENGINE not in ("sqlite", "postgresql"):
    raise RuntimeError(f"COLLATERAL_SYNC_TEST_STORAGE must be sqlite or postgresql, not {ENGINE!r}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session, stopped and removed at its end."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_postgres(request: pytest.FixtureRequest) -> PostgresServer | None:
    """The PostgreSQL the reference servers store in, or None when they run on SQLite."""
    if ENGINE != "postgresql":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server
