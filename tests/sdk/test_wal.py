"""WalCheckpointer: WAL checkpoints from a background thread, none inside the caller's commits."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from collateral_sync.sync import WalCheckpointer


def _wal_database(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, blob BLOB)")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the table, in the file itself
    return connection


def _rows_in_the_database_file(path: Path, scratch: Path) -> int:
    """Rows in the main database file alone: what checkpoints have copied out of the log."""
    copy = scratch / "main-file-only.sqlite"
    shutil.copyfile(path, copy)  # without its -wal file, only the copied pages are there
    with contextlib.closing(sqlite3.connect(copy)) as reader:
        count: int = reader.execute("SELECT count(*) FROM t").fetchone()[0]
    copy.unlink()
    return count


def test_the_callers_commits_never_checkpoint_and_the_thread_does(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    connection = _wal_database(path)
    checkpointer = WalCheckpointer(connection, interval=0.05)
    assert connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    # Far past the default threshold (1,000 pages) with the thread not yet running: the
    # caller's commits never checkpoint (one would restart the log at ~1,000 pages), so
    # the log grows, and none of it is in the database file yet.
    for n in range(600):
        connection.execute("INSERT INTO t VALUES (?, ?)", (n, bytes(8192)))
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 1500 * 4096
    assert _rows_in_the_database_file(path, tmp_path) == 0
    with checkpointer:
        deadline = time.monotonic() + 10
        while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checkpointer.checkpoints > 0
        assert checkpointer.last_error is None
        assert _rows_in_the_database_file(path, tmp_path) == 600
    # stop() runs a last checkpoint: with no periodic one due for an hour, the row
    # committed just before it still reaches the database file.
    with WalCheckpointer(connection, interval=3600):
        connection.execute("INSERT INTO t VALUES (1000, x'00')")
        assert _rows_in_the_database_file(path, tmp_path) == 600
    assert _rows_in_the_database_file(path, tmp_path) == 601
    connection.close()


def test_it_needs_a_database_file_in_wal_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="WAL"):
        WalCheckpointer(sqlite3.connect(":memory:"))
    rollback = sqlite3.connect(tmp_path / "rollback.sqlite")
    with pytest.raises(ValueError, match="WAL"):
        WalCheckpointer(rollback)
    rollback.close()
    with pytest.raises(ValueError, match="interval"):
        WalCheckpointer(_wal_database(tmp_path / "db.sqlite"), interval=0)


def test_a_database_removed_underneath_is_not_recreated(tmp_path: Path) -> None:
    path = tmp_path / "gone.sqlite"
    connection = _wal_database(path)
    checkpointer = WalCheckpointer(connection, interval=0.05)
    connection.close()
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    checkpointer.start()
    checkpointer.stop()
    assert not path.exists()
    assert checkpointer.last_error is not None
