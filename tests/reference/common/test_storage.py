"""The reference servers' storage refuses what it cannot write, whole, with a status a caller can act on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from collateral_sync.errors import STATUS_BY_REASON, StorageError
from collateral_sync.v1 import errors_pb2
from collateral_sync_reference.common.storage import SqliteStorage

_R = errors_pb2.ErrorReason


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SqliteStorage]:
    opened = SqliteStorage(tmp_path / "party.sqlite")
    yield opened
    opened.close()


def test_a_full_database_refuses_the_transaction_and_keeps_what_it_had(
    storage: SqliteStorage,
) -> None:
    with storage.transaction():
        storage.set_meta("kept", "before")
    connection = storage.connection
    # SQLite's own limit: the file may not grow by one more page.
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    connection.execute(f"PRAGMA max_page_count = {pages}")
    committed: list[str] = []
    storage.add_commit_listener(lambda: committed.append("commit"))

    def write_two() -> None:
        with storage.transaction():
            storage.set_meta("kept", "after")
            storage.set_meta("new", "x" * 1_000_000)

    with pytest.raises(StorageError) as full:
        write_two()
    assert full.value.reason == _R.ERROR_REASON_STORAGE_FULL
    assert STATUS_BY_REASON[full.value.reason] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not connection.in_transaction
    # Nothing of it was written, and no listener heard of a commit.
    assert (storage.get_meta("kept"), storage.get_meta("new")) == ("before", None)
    assert committed == []


def test_a_read_only_database_refuses_with_unavailable(storage: SqliteStorage) -> None:
    storage.connection.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageError) as read_only, storage.transaction():
        storage.set_meta("name", "value")
    assert read_only.value.reason == _R.ERROR_REASON_STORAGE_UNAVAILABLE
    assert STATUS_BY_REASON[read_only.value.reason] == grpc.StatusCode.UNAVAILABLE
    assert storage.get_meta("name") is None
    storage.connection.execute("PRAGMA query_only = OFF")
    with storage.transaction():
        storage.set_meta("name", "value")
    assert storage.get_meta("name") == "value"


def test_a_bug_is_not_dressed_up_as_a_storage_refusal(storage: SqliteStorage) -> None:
    with pytest.raises(Exception, match="no such table") as bug, storage.transaction():
        storage.connection.execute("INSERT INTO no_such_table VALUES (1)")
    assert not isinstance(bug.value, StorageError)
    assert not storage.connection.in_transaction
