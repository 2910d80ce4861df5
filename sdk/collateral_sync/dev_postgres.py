"""A throwaway PostgreSQL server for development, tests and benchmarks: the machine's own.

As :mod:`collateral_sync.dev_ca` is a development CA, this is a development
database server; production deployments bring their own PostgreSQL.
:func:`start_postgres` runs the installed ``initdb`` and ``pg_ctl`` (Debian's
``postgresql`` package; ``make setup`` installs it when it is missing) on a
free port on 127.0.0.1, with password (SCRAM) authentication, and
:meth:`PostgresServer.stop` stops it and removes its files. PostgreSQL refuses
to run as root, so as root the server runs as the ``postgres`` user the
package creates.

The server runs in a temporary directory with ``fsync = off``: a commit is
written to the operating system before it returns (``synchronous_commit``
stays on), so it survives the server's processes being killed, as SQLite in
WAL mode with ``synchronous = NORMAL`` (the SDK's default) does, and neither
syncs to disk on commit; unlike SQLite, a power loss or an OS crash may
damage its data, not just lose the last commits. Fine for throwaway data.

Each user gets a database of its own (:meth:`PostgresServer.database`): a name
derived from a key (a path, a party), so that a restarted user finds its data
again. Needs psycopg (the ``postgresql`` extra) to connect.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

__all__ = ["USER", "PostgresServer", "postgres_bin", "start_postgres"]

#: The superuser ``initdb`` creates; every connection logs in as it.
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
        """An autocommit psycopg connection to ``database``."""
        import psycopg  # noqa: PLC0415  # the optional [postgresql] extra

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
        """A reference server config's ``storage`` section on the database for ``key``."""
        return {
            "engine": "postgresql",
            "dsn": self.conninfo(self.database(key), with_password=False),
            "password_file": str(self.password_file),
            "pool_size": 4,
        }

    def pg_ctl(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the installed ``pg_ctl`` on this server's data directory (as postgres when root)."""
        return subprocess.run(  # noqa: S603 - the installed pg_ctl, our own arguments
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
        """Stop it at once (``-m immediate``) and, unless ``remove`` is False, remove its files."""
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
    # Not under a per-user temp dir: as root the server runs as postgres,
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
    subprocess.run(  # noqa: S603 - the installed initdb, our own arguments
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
        # Users kill servers, never the machine: no fsync needed for that (see above).
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
    import psycopg  # noqa: PLC0415  # the optional [postgresql] extra

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
