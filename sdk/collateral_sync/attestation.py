"""The custodian's append-only attestation log, its signed checkpoints, and their monitor.

The custodian appends every statement it attests to an RFC 9162 Merkle tree
kept durably in SQLite through pymerkle (:class:`AttestationLog`). A leaf is
the exact signed bytes of a statement, ``PAE(payload_type, payload)``
(:func:`statement_leaf`), so anyone holding the envelope can rebuild the leaf
without re-serialising anything. The log publishes signed checkpoints (origin,
tree size, root, time; the C2SP tlog-checkpoint is the model) and serves RFC
9162 inclusion and consistency proofs against them.

A counterparty checks a checkpoint's signature and origin with
:func:`verify_checkpoint`, and keeps a :class:`CheckpointMonitor` that only
moves forward along consistency proofs: a smaller tree (rollback), a different
root at the same size (fork) or a rewritten history is refused, and a fork is
kept as evidence.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, cast

from pymerkle import InvalidChallenge

from collateral_sync._leaves import SqliteLeaves, SqlLeaves
from collateral_sync.errors import MalformedError, ProofError, StateError
from collateral_sync.keys import KeyRegistry
from collateral_sync.merkle import (
    HASH_SIZE,
    consistency_proof_from_pymerkle,
    empty_root,
    inclusion_proof_from_pymerkle,
    verify_consistency_proof,
)
from collateral_sync.signer import Signer
from collateral_sync.signing import DEFAULT_MAX_SKEW, pae, sign_statement, verify_statement
from collateral_sync.sql import SqlConnection
from collateral_sync.v1 import attestation_pb2, envelope_pb2, errors_pb2

__all__ = [
    "AttestationLog",
    "CheckpointFork",
    "CheckpointMonitor",
    "statement_leaf",
    "verify_checkpoint",
]

_R = errors_pb2.ErrorReason

#: Perfect subtrees at least this many leaves wide are kept in memory once
#: computed (about 66/threshold bytes a leaf: 4 MB at 1M leaves). Narrower
#: ones a proof recomputes from one block of this many leaf hashes.
_SUBROOT_CACHE_THRESHOLD = 16


def statement_leaf(envelope: envelope_pb2.Envelope) -> bytes:
    """Leaf bytes of a statement: the exact bytes its signatures cover.

    ``PAE(payload_type, payload)`` of the envelope as received. It binds the
    payload type as well as the payload, and needs no re-serialisation.
    """
    return pae(envelope.payload_type, envelope.payload)


def _out_of_range(what: str, expected: str, actual: int) -> StateError:
    return StateError(
        f"{what}: expected {expected}, got {actual}",
        reason=_R.ERROR_REASON_OUT_OF_RANGE,
        metadata={"expected": expected, "actual": str(actual)},
    )


class AttestationLog:
    """An append-only RFC 9162 log of attested statements, in one SQLite file or a database.

    Indexes are 0-based; sizes count leaves. Reopening the same file (or
    database) restores the log. The origin names the log in its checkpoints
    and is recorded beside the leaves: reopening it under another origin is
    refused. :meth:`in_database` keeps the log in a table reached through a
    connection of its own (for instance on PostgreSQL).
    """

    def __init__(self, path: str | os.PathLike[str], *, origin: str) -> None:
        self._open(origin, lambda: SqliteLeaves(os.fspath(path), threshold=_SUBROOT_CACHE_THRESHOLD))

    @classmethod
    def in_database(cls, connection: SqlConnection, *, origin: str) -> AttestationLog:
        """The log in ``connection``'s database; the connection must be the log's alone."""
        log = cls.__new__(cls)
        log._open(origin, lambda: SqlLeaves(connection, threshold=_SUBROOT_CACHE_THRESHOLD))
        return log

    def _open(self, origin: str, tree: Callable[[], Any]) -> None:
        if not origin:
            raise MalformedError(
                "log origin must be non-empty",
                metadata={"expected": "non-empty origin", "actual": ""},
            )
        self._origin = origin
        self._closed = False
        self._tree: Any = tree()
        try:
            if isinstance(self._tree, SqlLeaves):
                self._record_origin(origin)
            else:
                self._configure(origin)
        except BaseException:
            self._tree.close()
            raise

    def _record_origin(self, origin: str) -> None:
        tree: SqlLeaves = self._tree
        with tree.transaction():
            tree.con.execute(
                "CREATE TABLE IF NOT EXISTS attestation_log_meta"
                "(name TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = tree.con.execute(
                "SELECT value FROM attestation_log_meta WHERE name = 'origin'"
            ).fetchone()
            if row is None:
                tree.con.execute("INSERT INTO attestation_log_meta VALUES ('origin', ?)", (origin,))
            elif row[0] != origin:
                raise _other_origin(origin, str(row[0]))

    def _configure(self, origin: str) -> None:
        con: sqlite3.Connection = self._tree.con
        # Rollback journal with a full sync on every commit: an append is on
        # disk, even across power loss, once it returns. That matters more than
        # for most logs, because a signed checkpoint commits the custodian to
        # every leaf below it; losing one would look like a fork. WAL with
        # synchronous=NORMAL survives a killed process but not power loss, and
        # writes every page twice (WAL, then the database), which made bulk
        # appends 40-50% slower at 1M leaves here; in rollback mode new pages go
        # straight to the database file. The price is one fsync per commit, so
        # high-rate writers batch with append_many.
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute("PRAGMA synchronous=FULL")
        with con:
            # The log's own table beside pymerkle's: the origin the file belongs to.
            con.execute(
                "CREATE TABLE IF NOT EXISTS attestation_log_meta"
                "(name TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            # pymerkle's row factory returns the first column of each row.
            stored = con.execute(
                "SELECT value FROM attestation_log_meta WHERE name = 'origin'"
            ).fetchone()
            if stored is None:
                con.execute("INSERT INTO attestation_log_meta VALUES ('origin', ?)", (origin,))
            elif stored != origin:
                raise _other_origin(origin, str(stored))

    # -- lifecycle --

    def close(self) -> None:
        """Close the database; further use raises StateError."""
        if not self._closed:
            self._closed = True
            self._tree.close()

    def __enter__(self) -> AttestationLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _open_tree(self) -> Any:
        if self._closed:
            raise StateError(
                "attestation log is closed",
                metadata={"expected": "open log", "actual": "closed"},
            )
        return self._tree

    # -- appending --

    @property
    def origin(self) -> str:
        return self._origin

    def append(self, leaf: bytes) -> int:
        """Append one leaf durably; returns its 0-based index."""
        tree = self._open_tree()
        _check_leaf(leaf, 0)
        return cast(int, tree.append_entry(leaf)) - 1

    def append_many(self, leaves: Iterable[bytes]) -> int:
        """Append leaves in order in one transaction; returns the new size.

        Either all of them are appended or, if one is refused, none is.
        """
        tree = self._open_tree()
        try:
            return cast(int, tree.append_entries(leaves))
        except ValueError as err:
            # pymerkle refuses non-bytes entries this way, inside the transaction.
            raise MalformedError(
                f"leaves must be bytes: {err}",
                metadata={"expected": "bytes", "actual": "another type"},
            ) from err

    # -- reading --

    @property
    def size(self) -> int:
        """Number of leaves."""
        return cast(int, self._open_tree().get_size())

    def root(self, size: int | None = None) -> bytes:
        """RFC 9162 root of the first ``size`` leaves (default: all of them)."""
        tree = self._open_tree()
        with tree.lock:
            current = tree.get_size()
            if size is None:
                size = current
            if not 0 <= size <= current:
                raise _out_of_range("tree size", f"0 <= size <= {current}", size)
            return cast(bytes, tree.get_root(size))

    def leaf(self, index: int) -> bytes:
        """The leaf bytes stored at ``index``."""
        tree = self._open_tree()
        with tree.lock:
            current = tree.get_size()
            if not 0 <= index < current:
                raise _out_of_range("leaf index", f"0 <= index < {current}", index)
            return cast(bytes, tree.get_entry(index + 1))

    # -- proofs --

    def inclusion_proof(self, index: int, tree_size: int) -> attestation_pb2.InclusionProof:
        """RFC 9162 inclusion proof of leaf ``index`` in the tree of ``tree_size`` leaves."""
        tree = self._open_tree()
        with tree.lock:
            if 0 <= index < tree_size:
                try:
                    return inclusion_proof_from_pymerkle(tree.prove_inclusion(index + 1, tree_size))
                except InvalidChallenge:
                    pass  # tree_size beyond the log: reported below
            # Off the hot path: pymerkle already reads the size once per proof.
            current = tree.get_size()
            if not 0 < tree_size <= current:
                raise _out_of_range("tree size", f"0 < tree_size <= {current}", tree_size)
            raise _out_of_range("leaf index", f"0 <= index < {tree_size}", index)

    def consistency_proof(
        self, first_size: int, second_size: int
    ) -> attestation_pb2.ConsistencyProof:
        """RFC 9162 consistency proof from the tree of ``first_size`` leaves to ``second_size``."""
        tree = self._open_tree()
        with tree.lock:
            if 0 < first_size <= second_size:
                try:
                    return consistency_proof_from_pymerkle(
                        tree.prove_consistency(first_size, second_size)
                    )
                except InvalidChallenge:
                    pass  # second_size beyond the log: reported below
            current = tree.get_size()
            if not 0 < second_size <= current:
                raise _out_of_range(
                    "second tree size", f"0 < second_size <= {current}", second_size
                )
            raise _out_of_range("first tree size", f"0 < first_size <= {second_size}", first_size)

    # -- checkpoints --

    def checkpoint(
        self, signer: Signer, *, now: datetime, sequence: int, ttl: timedelta
    ) -> envelope_pb2.Envelope:
        """Sign a checkpoint of the whole log as it is now, addressed to everyone."""
        tree = self._open_tree()
        with tree.lock:
            size = cast(int, tree.get_size())
            root = cast(bytes, tree.get_root(size))
        message = attestation_pb2.Checkpoint(origin=self._origin, tree_size=size, root_hash=root)
        message.timestamp.FromDatetime(now)
        return sign_statement(
            message, signer, audience=["*"], sequence=sequence, ttl=ttl, issued_at=now
        )


def _other_origin(origin: str, stored: str) -> StateError:
    return StateError(
        f"log file belongs to another origin: expected {origin!r}, got {stored!r}",
        metadata={"expected": origin, "actual": stored},
    )


def _check_leaf(leaf: object, position: int) -> bytes:
    if not isinstance(leaf, bytes):
        raise MalformedError(
            f"leaf {position} must be bytes, got {type(leaf).__name__}",
            metadata={"expected": "bytes", "actual": type(leaf).__name__},
        )
    return leaf


# ------------------------------------------------------------- verification


def verify_checkpoint(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    origin: str,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    audience: str = "*",
) -> attestation_pb2.Checkpoint:
    """Verify a signed checkpoint of the log named ``origin``.

    Stages: the signed statement (signature by a custodian key, type,
    audience, freshness), then the origin, then the root's shape. Checkpoints
    are public, so ``audience`` need only be given when the checkpoint was
    addressed to named parties.
    """
    verified = verify_statement(
        envelope,
        registry,
        expected_type=attestation_pb2.Checkpoint,
        audience=audience,
        now=now,
        max_skew=max_skew,
    )
    checkpoint = verified.message
    if checkpoint.origin != origin:
        # Not this custodian's log (§5.6 step 2): refused like a rollback or a fork.
        raise ProofError(
            f"checkpoint origin: expected {origin!r}, got {checkpoint.origin!r}",
            reason=_R.ERROR_REASON_CHECKPOINT_INCONSISTENT,
            metadata={"expected": origin, "actual": checkpoint.origin},
        )
    _check_checkpoint_shape(checkpoint)
    return checkpoint


def _check_checkpoint_shape(checkpoint: attestation_pb2.Checkpoint) -> None:
    if len(checkpoint.root_hash) != HASH_SIZE:
        raise MalformedError(
            f"checkpoint root_hash: expected {HASH_SIZE} bytes, got {len(checkpoint.root_hash)}",
            metadata={
                "expected": f"{HASH_SIZE} bytes",
                "actual": f"{len(checkpoint.root_hash)} bytes",
            },
            field_violations={"root_hash": f"must be {HASH_SIZE} bytes"},
        )
    if checkpoint.tree_size == 0 and checkpoint.root_hash != empty_root():
        raise ProofError(
            f"root of an empty tree: expected {empty_root().hex()}, "
            f"got {checkpoint.root_hash.hex()}",
            metadata={"expected": empty_root().hex(), "actual": checkpoint.root_hash.hex()},
        )


@dataclass(frozen=True, slots=True)
class CheckpointFork:
    """Two checkpoints of one log with the same size and different roots."""

    held: attestation_pb2.Checkpoint
    received: attestation_pb2.Checkpoint


class CheckpointMonitor:
    """What a counterparty keeps: the last verified checkpoint of each log.

    Feed it checkpoints that passed :func:`verify_checkpoint`. It moves
    forward only along consistency proofs, and its state changes only when
    every check passes. A fork (same size, different root) is refused and
    both checkpoints are kept in :attr:`evidence`: signed checkpoints that
    contradict each other prove the log misbehaved. A consistency proof that
    fails is refused without evidence, since a bad proof alone proves nothing.
    """

    def __init__(self) -> None:
        self._latest: dict[str, attestation_pb2.Checkpoint] = {}
        self._evidence: list[CheckpointFork] = []
        self._lock = threading.Lock()

    def latest(self, origin: str) -> attestation_pb2.Checkpoint | None:
        """A copy of the checkpoint held for ``origin``, or None."""
        with self._lock:
            held = self._latest.get(origin)
            return None if held is None else _copy(held)

    @property
    def evidence(self) -> tuple[CheckpointFork, ...]:
        """Forks seen so far, oldest first."""
        with self._lock:
            return tuple(self._evidence)

    def advance(
        self,
        checkpoint: attestation_pb2.Checkpoint,
        proof: attestation_pb2.ConsistencyProof | None,
    ) -> None:
        """Accept ``checkpoint`` as the latest of its log, or raise and change nothing.

        ``proof`` must prove consistency from the held checkpoint when the new
        one is larger; it is not needed for the first checkpoint of a log,
        for one of the same size, or after an empty tree.
        """
        if not checkpoint.origin:
            raise MalformedError(
                "checkpoint origin must be non-empty",
                metadata={"expected": "non-empty origin", "actual": ""},
                field_violations={"origin": "required"},
            )
        _check_checkpoint_shape(checkpoint)
        received = _copy(checkpoint)
        with self._lock:
            held = self._latest.get(received.origin)
            if held is not None:
                self._check_extends(held, received, proof)
            if held is None or received.tree_size > held.tree_size:
                self._latest[received.origin] = received

    def _check_extends(
        self,
        held: attestation_pb2.Checkpoint,
        received: attestation_pb2.Checkpoint,
        proof: attestation_pb2.ConsistencyProof | None,
    ) -> None:
        if received.tree_size < held.tree_size:
            raise ProofError(
                f"checkpoint of {received.origin!r} rolls back: expected tree size "
                f">= {held.tree_size}, got {received.tree_size}",
                reason=_R.ERROR_REASON_CHECKPOINT_INCONSISTENT,
                metadata={"expected": f">= {held.tree_size}", "actual": str(received.tree_size)},
            )
        if received.tree_size == held.tree_size:
            if received.root_hash != held.root_hash:
                self._evidence.append(CheckpointFork(held=_copy(held), received=received))
                raise ProofError(
                    f"fork of {received.origin!r} at tree size {held.tree_size}: expected root "
                    f"{held.root_hash.hex()}, got {received.root_hash.hex()}",
                    reason=_R.ERROR_REASON_CHECKPOINT_INCONSISTENT,
                    metadata={"expected": held.root_hash.hex(), "actual": received.root_hash.hex()},
                )
            return
        if held.tree_size == 0:
            # The empty tree is a prefix of every tree; there is nothing to prove.
            return
        if proof is None:
            raise ProofError(
                f"checkpoint of {received.origin!r} grows from {held.tree_size} to "
                f"{received.tree_size}: expected a consistency proof, got none",
                metadata={"expected": "consistency proof", "actual": "none"},
            )
        verify_consistency_proof(proof, held, received)


def _copy(checkpoint: attestation_pb2.Checkpoint) -> attestation_pb2.Checkpoint:
    copied = attestation_pb2.Checkpoint()
    copied.CopyFrom(checkpoint)
    return copied
