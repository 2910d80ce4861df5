"""Where the attestation log's leaves live: a SQLite file, or a table on any SQL connection.

Both are pymerkle trees (RFC 9162 hashing, proofs) with subtree hashes kept
once computed (:class:`_Subroots`):

- :class:`SqliteLeaves`: pymerkle's own SQLite backend, one file of its own;
- :class:`SqlLeaves`: a table ``attestation_leaves`` reached through a
  :class:`~collateral_sync.sql.SqlConnection` of the log's own (on PostgreSQL,
  the server's database), appended in transactions of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import TYPE_CHECKING

from pymerkle import SqliteTree
from pymerkle.core import BaseMerkleTree

from collateral_sync.errors import StateError, sqlite_refusals
from collateral_sync.merkle import HASH_SIZE, NODE_PREFIX
from collateral_sync.sql import SqlConnection

__all__ = ["SqlLeaves", "SqliteLeaves"]


class _NodeStore:
    """Perfect-subtree hashes of one width and up, in one flat array per width.

    A node of width ``w`` at leaf ``offset`` (a multiple of ``w``) is slot
    ``offset // w`` of its width's array. 33 bytes a node and no per-entry
    objects: at the default threshold the whole tree costs about 4 bytes of
    memory per leaf, and a level filled in one pass is stored with two slice
    assignments.
    """

    __slots__ = ("_levels",)

    def __init__(self) -> None:
        # width -> (hashes, presence flags)
        self._levels: dict[int, tuple[bytearray, bytearray]] = {}

    def get(self, offset: int, width: int) -> bytes | None:
        level = self._levels.get(width)
        slot = offset // width
        if level is None or slot >= len(level[1]) or not level[1][slot]:
            return None
        return bytes(level[0][slot * HASH_SIZE : (slot + 1) * HASH_SIZE])

    def put(self, offset: int, width: int, hashes: list[bytes]) -> None:
        """Store ``hashes`` of consecutive nodes of ``width``, the first at ``offset``."""
        level = self._levels.setdefault(width, (bytearray(), bytearray()))
        first = offset // width
        end = first + len(hashes)
        missing = end - len(level[1])
        if missing > 0:
            level[0].extend(bytes(missing * HASH_SIZE))
            level[1].extend(bytes(missing))
        level[0][first * HASH_SIZE : end * HASH_SIZE] = b"".join(hashes)
        level[1][first:end] = b"\x01" * len(hashes)


class _Subroots:
    """Subtree hashes that are computed once, for a pymerkle tree.

    pymerkle caches the perfect subtree roots it is asked for, but computes a
    missing one from all of its leaves, ignoring cached descendants; random
    inclusion proofs on a large tree then keep reading and hashing hundreds of
    thousands of leaves (measured: 1.4 ms median per proof at 1M leaves after
    2,000 proofs, still 0.25 ms once warm). Here a missing subroot is composed
    from stored children when there are some, and otherwise computed
    bottom-up in one pass that stores every node of width ``threshold`` and
    up. Computing the root once (as every checkpoint does) therefore prepares
    the whole tree for proofs, for about the cost of computing the root.
    """

    threshold: int
    hits: int
    misses: int

    def _init_subroots(self) -> None:
        self._nodes = _NodeStore()
        # Leaf hashes of the last aligned block of ``threshold`` leaves read.
        self._block: tuple[int, list[bytes]] | None = None

    if TYPE_CHECKING:  # the tree class it is mixed into reads the leaves

        def _get_leaves(self, offset: int, width: int) -> Iterable[bytes]: ...

    def _get_subroot(self, offset: int, width: int) -> bytes:
        if width < self.threshold:
            return self._small_subroot(offset, width)
        nodes = self._nodes
        found = nodes.get(offset, width)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        half = width >> 1
        if half >= self.threshold and (
            nodes.get(offset, half) is not None or nodes.get(offset + half, half) is not None
        ):
            value = _node(self._get_subroot(offset, half), self._get_subroot(offset + half, half))
            nodes.put(offset, width, [value])
            return value
        return self._fill(offset, width)

    def _small_subroot(self, offset: int, width: int) -> bytes:
        # The unstored siblings of one inclusion proof, and its leaf, all lie
        # in the aligned block of ``threshold`` leaves around the leaf: one
        # read serves them all. Leaves never change; a block read while it
        # was still filling is read again once more leaves are needed.
        start = offset - offset % self.threshold
        block = self._block
        if block is None or block[0] != start or offset + width > start + len(block[1]):
            block = self._block = (start, list(self._get_leaves(start, self.threshold)))
        level = _stored(block[1][offset - start : offset - start + width], offset, width)
        while len(level) > 1:
            level = _pairs(level)
        return level[0]

    def _fill(self, offset: int, width: int) -> bytes:
        level = _stored(list(self._get_leaves(offset, width)), offset, width)
        node_width = 1
        while node_width < width:
            level = _pairs(level)
            node_width <<= 1
            if node_width >= self.threshold:
                self._nodes.put(offset, node_width, level)
        return level[0]


def _stored(leaf_hashes: list[bytes], offset: int, width: int) -> list[bytes]:
    if len(leaf_hashes) != width:
        # pymerkle asks only for subtrees inside the log; anything else is a bug.
        raise StateError(
            f"leaves [{offset}, {offset + width}) of the log: expected {width} stored, "
            f"got {len(leaf_hashes)}",
            metadata={"expected": str(width), "actual": str(len(leaf_hashes))},
        )
    return leaf_hashes


def _pairs(level: list[bytes]) -> list[bytes]:
    sha256, prefix = hashlib.sha256, NODE_PREFIX
    return [sha256(prefix + a + b).digest() for a, b in zip(level[::2], level[1::2], strict=True)]


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class SqliteLeaves(_Subroots, SqliteTree):  # type: ignore[misc]  # pymerkle ships no type hints
    """pymerkle's SqliteTree (one file) with :class:`_Subroots`."""

    def __init__(self, dbfile: str, *, threshold: int) -> None:
        SqliteTree.__init__(self, dbfile, threshold=threshold)
        self._init_subroots()


_LEAVES = """CREATE TABLE IF NOT EXISTS attestation_leaves (
    id INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    hash BLOB NOT NULL
)"""
#: Rows hashed and inserted at a time by append_entries.
_CHUNK = 10_000


class SqlLeaves(_Subroots, BaseMerkleTree):  # type: ignore[misc]  # pymerkle ships no type hints
    """Leaves in the table ``attestation_leaves``, 1-based ids with no gaps, append-only.

    Every append is one transaction of ``connection`` (which must be the
    log's alone): the next ids are read and written under the writer lock of
    ``BEGIN IMMEDIATE``, so the ids stay contiguous whoever else writes the
    database. Nothing here updates or deletes a row.
    """

    def __init__(self, connection: SqlConnection, *, threshold: int) -> None:
        BaseMerkleTree.__init__(self, "sha256", threshold=threshold)
        self._init_subroots()
        self.con = connection
        with self.transaction():
            connection.execute(_LEAVES)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... commit; rolled back (and refused, if storage failed) on error."""
        with sqlite_refusals(self.con):
            self.con.execute("BEGIN IMMEDIATE")
            yield
            self.con.commit()

    def close(self) -> None:
        self.con.rollback()

    def _encode_entry(self, data: bytes) -> bytes:
        return data

    def _store_leaf(self, data: bytes, digest: bytes) -> int:
        if not isinstance(data, bytes):
            raise ValueError("Provided data is not binary")  # noqa: TRY004  # as pymerkle raises it
        with self.transaction():
            index = self._get_size() + 1
            self.con.execute(
                "INSERT INTO attestation_leaves (id, entry, hash) VALUES (?, ?, ?)",
                (index, data, digest),
            )
        return index

    def append_entries(self, entries: Iterable[bytes]) -> int:
        with self.lock, self.transaction():
            size = self._get_size()
            iterator = iter(entries)
            while chunk := list(islice(iterator, _CHUNK)):
                rows = []
                for data in chunk:
                    if not isinstance(data, bytes):
                        raise ValueError("Provided data is not binary")  # noqa: TRY004  # as pymerkle raises it
                    size += 1
                    rows.append((size, data, self.hash_buff(data)))
                self.con.executemany(
                    "INSERT INTO attestation_leaves (id, entry, hash) VALUES (?, ?, ?)", rows
                )
        return size

    def _get_leaf(self, index: int) -> bytes | None:
        row = self.con.execute(
            "SELECT hash FROM attestation_leaves WHERE id = ?", (index,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _get_leaves(self, offset: int, width: int) -> list[bytes]:
        rows = self.con.execute(
            "SELECT hash FROM attestation_leaves WHERE id BETWEEN ? AND ? ORDER BY id",
            (offset + 1, offset + width),
        ).fetchall()
        return [bytes(row[0]) for row in rows]

    def _get_size(self) -> int:
        row = self.con.execute("SELECT COALESCE(MAX(id), 0) FROM attestation_leaves").fetchone()
        return int(row[0])

    def get_entry(self, index: int) -> bytes | None:
        with self.lock:
            row = self.con.execute(
                "SELECT entry FROM attestation_leaves WHERE id = ?", (index,)
            ).fetchone()
        return None if row is None else bytes(row[0])
