"""Both storage engines mean the same thing: transactions, writers, refusals, schema versions.

Every test runs on SQLite and on a real PostgreSQL (the session's, ``tests/_postgres.py``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from _postgres import PostgresServer
from collateral_sync.attestation import AttestationLog
from collateral_sync.errors import STATUS_BY_REASON, StorageError
from collateral_sync.sql import postgres_ddl
from collateral_sync.v1 import errors_pb2
from collateral_sync_reference.common.storage import (
    PostgresStorage,
    SchemaTooNewError,
    SqliteStorage,
    SqlStorage,
)

_R = errors_pb2.ErrorReason

Opener = Callable[[], SqlStorage]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the same database again on each call (as a second process would), on each engine."""
    opened: list[SqlStorage] = []
    if request.param == "sqlite":

        def open_one() -> SqlStorage:
            storage: SqlStorage = SqliteStorage(tmp_path / "party.sqlite")
            opened.append(storage)
            return storage

    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        conninfo = postgres.conninfo(postgres.database(str(tmp_path)), with_password=False)

        def open_one() -> SqlStorage:
            storage: SqlStorage = PostgresStorage(conninfo, password=postgres.password, pool_size=4)
            opened.append(storage)
            return storage

    yield open_one
    for storage in opened:
        # A storage a test thread opened (and closed) is SQLite's to close in that thread.
        with contextlib.suppress(sqlite3.ProgrammingError):
            storage.close()


def test_a_transaction_commits_whole_or_not_at_all(opener: Opener) -> None:
    storage = opener()
    committed: list[str] = []
    storage.add_commit_listener(lambda: committed.append("commit"))
    with storage.transaction():
        storage.set_meta("a", "1")
        first = storage.next_sequence("type")

    def fail_midway() -> None:
        with storage.transaction():
            storage.set_meta("a", "2")
            storage.next_sequence("type")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert (storage.get_meta("a"), storage.last_sequence("type"), first) == ("1", 1, 1)
    assert committed == ["commit"]
    assert not storage.in_transaction
    # Reopened (a restart), it is all still there.
    again = opener()
    assert (again.get_meta("a"), again.last_sequence("type")) == ("1", 1)


def test_a_savepoint_undoes_its_part_alone(opener: Opener) -> None:
    storage = opener()

    def undone_part() -> None:
        with storage.savepoint():
            storage.set_meta("undone", "yes")
            raise ValueError("part")

    with storage.transaction():
        storage.set_meta("kept", "yes")
        with pytest.raises(ValueError, match="part"):
            undone_part()
        storage.set_meta("after", "yes")
    assert [storage.get_meta(n) for n in ("kept", "undone", "after")] == ["yes", None, "yes"]


def test_concurrent_read_then_write_transactions_lose_no_update(opener: Opener) -> None:
    """Two processes' worth of writers (two storages on one database, in threads), each
    reading a counter and writing it back plus one: the writer lock makes every increment
    count, as two RPCs on one account must not both act on the same balance."""
    opener().close()  # the schema, before two writers race to create it
    rounds = 40
    errors: list[BaseException] = []
    ready = threading.Barrier(2)

    def work() -> None:
        storage = opener()
        try:
            if isinstance(storage, SqliteStorage):
                # SQLite's busy wait is not what is tested here: its BEGIN IMMEDIATE is.
                storage.connection.execute("PRAGMA busy_timeout = 10000")
            ready.wait(30)
            for _ in range(rounds):
                with storage.transaction():
                    value = int(storage.get_meta("counter") or "0")
                    storage.set_meta("counter", str(value + 1))
        except BaseException as err:  # noqa: BLE001  # reported below
            errors.append(err)
        finally:
            storage.close()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert opener().get_meta("counter") == str(2 * rounds)


def test_schema_versions_apply_in_order_and_a_newer_database_is_refused(opener: Opener) -> None:
    storage = opener()
    v1 = ("CREATE TABLE IF NOT EXISTS things (id INTEGER PRIMARY KEY, body BLOB NOT NULL)",)
    v2 = ("ALTER TABLE things ADD COLUMN label TEXT NOT NULL DEFAULT ''",)
    assert storage.migrate("things", ((1, v1),)) == 1
    with storage.transaction():
        storage.connection.execute("INSERT INTO things (body) VALUES (?)", (b"x",))
    assert storage.migrate("things", ((1, v1), (2, v2))) == 2
    assert storage.schema_version("things") == 2
    row = storage.connection.execute("SELECT id, body, label FROM things").fetchone()
    assert (row[0], bytes(row[1]), row[2]) == (1, b"x", "")
    # An older server meets the newer database: refused, and nothing is touched.
    older = opener()
    with pytest.raises(SchemaTooNewError, match="things schema is version 2, newer"):
        older.migrate("things", ((1, v1),))
    assert older.schema_version("things") == 2
    with pytest.raises(ValueError, match=r"versions 1\.\.n"):
        older.migrate("things", ((2, v2),))


def test_a_bug_is_not_dressed_up_as_a_storage_refusal(opener: Opener) -> None:
    storage = opener()
    with pytest.raises(Exception, match="no_such_table") as bug, storage.transaction():
        storage.connection.execute("INSERT INTO no_such_table VALUES (1)")
    assert not isinstance(bug.value, StorageError)
    assert not storage.in_transaction
    with storage.transaction():
        storage.set_meta("after", "ok")
    assert storage.get_meta("after") == "ok"


def test_the_attestation_log_is_the_same_tree_on_both(opener: Opener, tmp_path: Path) -> None:
    storage = opener()
    log = storage.attestation_log("o", path=tmp_path / "log.sqlite")
    leaves = [f"leaf {i}".encode() * (i % 5 + 1) for i in range(37)]
    assert log.append(leaves[0]) == 0
    assert log.append_many(leaves[1:]) == 37
    reference = AttestationLog(tmp_path / "reference.sqlite", origin="o")
    reference.append_many(leaves)
    assert log.root() == reference.root()
    assert log.root(20) == reference.root(20)
    assert log.inclusion_proof(11, 30) == reference.inclusion_proof(11, 30)
    assert log.consistency_proof(13, 37) == reference.consistency_proof(13, 37)
    assert log.leaf(36) == leaves[36]
    log.close()
    reference.close()


def test_the_postgres_attestation_log_refuses_another_origin(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    storage = PostgresStorage(
        postgres.conninfo(postgres.database(str(tmp_path)), with_password=False),
        password=postgres.password,
        pool_size=3,
    )
    try:
        storage.attestation_log("first").close()
        with pytest.raises(Exception, match="another origin"):
            storage.attestation_log("second")
    finally:
        storage.close()


def test_a_lost_database_refuses_with_unavailable_and_recovers(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """The server going away mid-service: UNAVAILABLE, nothing half written, then it works."""
    storage = PostgresStorage(
        postgres.conninfo(postgres.database(str(tmp_path)), with_password=False),
        password=postgres.password,
        pool_size=2,
    )
    try:
        with storage.transaction():
            storage.set_meta("kept", "1")
        # Every connection of this database is cut, as a restart or failover would.
        with postgres.connect() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (postgres.database(str(tmp_path)),),
            )
        with pytest.raises(StorageError) as lost, storage.transaction():
            storage.set_meta("kept", "2")
        assert lost.value.reason == _R.ERROR_REASON_STORAGE_UNAVAILABLE
        assert STATUS_BY_REASON[lost.value.reason] == grpc.StatusCode.UNAVAILABLE
        assert not storage.in_transaction
        # The pool has replaced the connection: the next transaction runs.
        with storage.transaction():
            storage.set_meta("kept", "3")
        assert storage.get_meta("kept") == "3"
    finally:
        storage.close()


def test_ddl_is_translated_to_postgres_types() -> None:
    assert postgres_ddl(
        "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER, b BLOB) WITHOUT ROWID"
    ) == (
        "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT, b BYTEA)"
    )
    # Only schema statements are rewritten; a value that happens to say INTEGER is not.
    assert postgres_ddl("SELECT 'INTEGER' FROM t") == "SELECT 'INTEGER' FROM t"


def test_a_fenced_storage_writes_nothing_once_its_lease_is_gone(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """The lease's connection cut while the process lives on (a partition): the very next
    write transaction is refused, before any watcher notices, and nothing is written."""
    database = postgres.database(str(tmp_path))
    conninfo = postgres.conninfo(database, with_password=False)
    storage = PostgresStorage(conninfo, password=postgres.password, pool_size=3)
    other = PostgresStorage(conninfo, password=postgres.password, pool_size=3)
    lease, rival = storage.lease(), other.lease()
    try:
        assert lease.try_acquire()
        assert not rival.try_acquire()  # one holder at a time
        storage.fence(lease)
        with storage.transaction():
            storage.set_meta("kept", "1")
        with postgres.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (lease.backend_pid,))
        # The lock goes with the connection, once its backend has exited.
        deadline = time.monotonic() + 10
        while not rival.try_acquire():
            assert time.monotonic() < deadline, "the cut lease was never released"
            time.sleep(0.05)
        with (
            pytest.raises(StorageError, match="no longer holds the database's lease"),
            storage.transaction(),
        ):
            storage.set_meta("kept", "2")
        assert storage.get_meta("kept") == "1"
        assert not storage.in_transaction
    finally:
        lease.release()
        rival.release()
        storage.close()
        other.close()


def test_a_bool_is_stored_as_the_integer_it_is(opener: Opener) -> None:
    storage = opener()
    storage.migrate(
        "flags", ((1, ("CREATE TABLE IF NOT EXISTS flags (on_off INTEGER NOT NULL)",)),)
    )
    with storage.transaction():
        storage.connection.execute("INSERT INTO flags VALUES (?)", (True,))
        storage.connection.executemany("INSERT INTO flags VALUES (?)", [(False,), (True,)])
    rows = storage.connection.execute("SELECT on_off FROM flags").fetchall()
    assert sorted(row[0] for row in rows) == [0, 1, 1]
