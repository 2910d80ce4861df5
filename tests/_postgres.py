"""A real PostgreSQL server for the test session: the machine's own, in a temporary directory.

The server itself is the SDK's development one (:mod:`collateral_sync.dev_postgres`:
:func:`start_postgres`, :class:`PostgresServer`, :func:`postgres_bin`), re-exported
here for the tests that import it from this module. What only the tests need
lives here: :func:`open_database`, a server config's database as the tests read it.

Each reference server under test gets a database of its own
(:meth:`PostgresServer.database`): a name derived from a key (a path), so that
a restarted server finds its data again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from collateral_sync.dev_postgres import USER, PostgresServer, postgres_bin, start_postgres
from collateral_sync.sql import PostgresConnection, SqlConnection, postgres_pool

__all__ = ["USER", "PostgresServer", "open_database", "postgres_bin", "start_postgres"]


@contextmanager
def open_database(storage: Mapping[str, Any], *, read_only: bool = True) -> Iterator[SqlConnection]:
    """The database of a server config's ``storage`` section, as the tests read it.

    SQLite: the file (read-only unless ``read_only`` is False; then committed
    on a normal exit). PostgreSQL: the database, each statement in autocommit.
    Statements use ``?`` parameters on both (:mod:`collateral_sync.sql`).
    """
    if storage.get("engine") == "postgresql":
        password = Path(storage["password_file"]).read_text("utf-8").strip()
        pool = postgres_pool(storage["dsn"], size=2, password=password, name="tests")
        try:
            yield PostgresConnection(pool)
        finally:
            pool.close()
        return
    path = storage["path"]
    uri = f"file:{path}?mode=ro" if read_only else f"file:{path}"
    with closing(sqlite3.connect(uri, uri=True)) as connection:
        yield connection
        if not read_only:
            connection.commit()
