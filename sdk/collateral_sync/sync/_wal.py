"""WAL checkpoints off the commit path: :class:`WalCheckpointer`.

In WAL mode SQLite copies the write-ahead log back into the database file
(a *checkpoint*) automatically, inside the commit that takes the log past
``wal_autocheckpoint`` pages — and a checkpoint syncs the database file to disk
even with ``synchronous=NORMAL``. Whichever transaction crosses the threshold
pays those milliseconds: on the position-sync stream that may be the batch
carrying a margin call, whose acknowledgement then waits. Measured with
``collateral-sync bench sync`` on the development machine, those stalls were the
whole idle margin-call tail (p99 7-10 ms with automatic checkpoints, 2.7-3.9 ms
without).

:class:`WalCheckpointer` turns automatic checkpoints off on the caller's
connection and runs ``PRAGMA wal_checkpoint(PASSIVE)`` from a thread of its own,
on a connection of its own, every ``interval`` seconds (a run with nothing to
copy costs microseconds).
Durability is unchanged: a commit is durable when it is in the log, whoever
copies it into the database afterwards. A PASSIVE checkpoint never waits for,
or blocks, a writer; pages a reader still needs stay in the log for the next one.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["WalCheckpointer"]


class WalCheckpointer:
    """Checkpoints one SQLite database's write-ahead log from a background thread.

    ``connection`` is the caller's connection to the database in WAL mode (its
    automatic checkpoints are turned off here); ``interval`` is how often, in
    seconds, the log is copied back. :meth:`stop` (or leaving the ``with`` block)
    runs a last checkpoint and joins the thread.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        interval: float = 0.5,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"expected an interval > 0 seconds, got {interval}")
        row = connection.execute("PRAGMA database_list").fetchone()
        path = row[2] if row is not None else ""
        mode = str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if not path or mode != "wal":
            raise ValueError(
                f"expected a database file in WAL mode, got {path or 'memory'} ({mode})"
            )
        self._path = Path(path)
        self._interval = interval
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: Checkpoints run, and the last error one met (None if none), for operators.
        self.checkpoints = 0
        self.last_error: sqlite3.Error | None = None

    def start(self) -> WalCheckpointer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"wal-checkpoint {self._path.name}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> WalCheckpointer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        # mode=rw: never create the file (a database removed under us just ends the thread).
        try:
            connection = sqlite3.connect(
                f"file:{self._path}?mode=rw", uri=True, isolation_level=None
            )
        except sqlite3.Error as err:
            self.last_error = err
            return
        try:
            while not self._stopping.wait(self._interval):
                self._checkpoint(connection)
            self._checkpoint(connection)
        finally:
            connection.close()

    def _checkpoint(self, connection: sqlite3.Connection) -> None:
        try:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as err:  # e.g. the file went away: reported, retried next time
            self.last_error = err
        else:
            self.checkpoints += 1
            self.last_error = None
