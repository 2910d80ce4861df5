"""A real PostgreSQL server for the test session: the machine's own, in a temporary directory.

:func:`start_postgres` runs Debian's ``initdb`` and ``pg_ctl`` (``make setup``
installs the ``postgresql`` package when it is missing) on a free port on
127.0.0.1, with password authentication, and :meth:`PostgresServer.stop`
stops it and removes its files. PostgreSQL refuses to run as root, so as
root the server runs as the ``postgres`` user the package creates.

Each reference server under test gets a database of its own
(:meth:`PostgresServer.database`): a name derived from a key (a path), so that
a restarted server finds its data again.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from collateral_sync.sql import PostgresConnection, SqlConnection, postgres_pool

__all__ = ["PostgresServer", "open_database", "postgres_bin", "start_postgres"]

USER = "collateral"
_START_TIMEOUT = 60


def postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One running PostgreSQL server and how to reach it."""

    directory: Path
    port: int
    password: str
    password_file: Path
    _bin: Path = field(repr=False)
    _as_postgres: list[str] = field(repr=False)
    _databases: set[str] = field(default_factory=set, repr=False)

    def conninfo(self, database: str = "postgres", *, with_password: bool = True) -> str:
        """A libpq connection string (a server config gets it without the password)."""
        info = f"host=127.0.0.1 port={self.port} dbname={database} user={USER}"
        return f"{info} password={self.password}" if with_password else info

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.conninfo(database), autocommit=True)

    def database(self, key: str) -> str:
        """The database for ``key`` (created on first use); its name."""
        name = "t_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        if name not in self._databases:
            with self.connect() as admin:
                exists = admin.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).fetchone()
                if exists is None:
                    admin.execute(f'CREATE DATABASE "{name}"')
            self._databases.add(name)
        return name

    def storage_config(self, key: str) -> dict[str, object]:
        """A server config's ``storage`` section on the database for ``key``."""
        return {
            "engine": "postgresql",
            "dsn": self.conninfo(self.database(key), with_password=False),
            "password_file": str(self.password_file),
            "pool_size": 4,
        }

    def pg_ctl(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *self._as_postgres,
                str(self._bin / "pg_ctl"),
                "-D",
                str(self.directory / "data"),
                *arguments,
            ],
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT,
            check=check,
        )

    def stop(self, *, remove: bool = True) -> None:
        self.pg_ctl("stop", "-m", "immediate", "-w", check=False)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def start(self) -> None:
        """Start it again after :meth:`stop` with ``remove=False`` (same port and data)."""
        self.pg_ctl(
            "start", "-w", "-t", str(_START_TIMEOUT), "-l", str(self.directory / "server.log")
        )


def start_postgres() -> PostgresServer:
    """initdb, then start a server on a free port; raises RuntimeError with its log on failure."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL is not installed (make setup installs Debian's postgresql package)"
        )
    # Not under pytest's per-user temp dir: as root the server runs as postgres,
    # which must reach its directory.
    directory = Path(tempfile.mkdtemp(prefix="collateral-sync-pg-"))
    directory.chmod(0o755)
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(directory, user="postgres", group="postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    password = hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    password_file = directory / "password"
    password_file.write_text(password + "\n", "utf-8")
    password_file.chmod(0o644)
    port = _free_port()
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "initdb"),
            "-D",
            str(directory / "data"),
            "-U",
            USER,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=_START_TIMEOUT,
        check=True,
    )
    settings = (
        f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
        # Tests kill servers under test, never the machine: no fsync needed for that.
        "fsync = off\nmax_connections = 300\n"
    )
    with open(directory / "data" / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(settings)
    server = PostgresServer(directory, port, password, password_file, bindir, as_postgres)
    try:
        server.start()
        _wait_ready(server)
    except BaseException as err:
        log = directory / "server.log"
        text = log.read_text("utf-8", "replace") if log.exists() else ""
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start: {err}\n{text[-2000:]}") from err
    return server


def _wait_ready(server: PostgresServer) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            server.connect().close()
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        else:
            return


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
