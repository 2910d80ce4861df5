"""Attested statements and checkpoints: the database's side of the attestation log.

Every holdings statement we issue is one leaf of the log, stored with its
envelope and attestation; every checkpoint we sign is stored with the tree
size it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from collateral_sync.v1 import attestation_pb2, envelope_pb2

from collateral_sync_reference.custodian.store._sql import Tables, from_us, parse_envelope, to_us

__all__ = ["SCHEMA", "AttestationTables", "StoredCheckpoint", "StoredStatement"]


@dataclass(frozen=True, slots=True)
class StoredStatement:
    """A holdings statement we issued: one leaf of the attestation log."""

    leaf_index: int
    account_id: str
    epoch: int
    reason: int
    envelope: envelope_pb2.Envelope
    attestation: attestation_pb2.AttestationRef
    #: The last statement of its operation: a checkpoint is signed at leaf_index + 1.
    checkpoint_after: bool
    #: Found in the log after a crash without its database record (never announced).
    orphan: bool = False


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    tree_size: int
    envelope: envelope_pb2.Envelope
    issued_at: datetime


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_statements (
        leaf_index INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        reason INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        attestation BLOB NOT NULL,
        checkpoint_after INTEGER NOT NULL,
        orphan INTEGER NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS custodian_statements_account
        ON custodian_statements (account_id, leaf_index)""",
    """CREATE TABLE IF NOT EXISTS custodian_checkpoints (
        id INTEGER PRIMARY KEY,
        tree_size INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        issued_at_us INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS custodian_checkpoints_size ON custodian_checkpoints (tree_size)",
)


class AttestationTables(Tables):
    """``custodian_statements`` and ``custodian_checkpoints``."""

    # -- attested statements --

    def statement_count(self) -> int:
        row = self._db.execute("SELECT MAX(leaf_index) FROM custodian_statements").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def add_statement(self, statement: StoredStatement) -> None:
        self._db.execute(
            "INSERT INTO custodian_statements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                statement.leaf_index,
                statement.account_id,
                statement.epoch,
                statement.reason,
                statement.envelope.SerializeToString(),
                statement.attestation.SerializeToString(),
                int(statement.checkpoint_after),
                int(statement.orphan),
            ),
        )

    _STATEMENT_COLUMNS = (
        "leaf_index, account_id, epoch, reason, envelope, attestation, checkpoint_after, orphan"
    )

    def _statement(self, row: Any) -> StoredStatement | None:
        if row is None:
            return None
        index, account_id, epoch, reason, envelope, attestation, after, orphan = row
        return StoredStatement(
            leaf_index=int(index),
            account_id=str(account_id),
            epoch=int(epoch),
            reason=int(reason),
            envelope=parse_envelope(envelope),
            attestation=attestation_pb2.AttestationRef.FromString(bytes(attestation)),
            checkpoint_after=bool(after),
            orphan=bool(orphan),
        )

    def statement(self, leaf_index: int) -> StoredStatement | None:
        row = self._db.execute(
            f"SELECT {self._STATEMENT_COLUMNS} FROM custodian_statements WHERE leaf_index = ?",  # noqa: S608 (constant)
            (leaf_index,),
        ).fetchone()
        return self._statement(row)

    def latest_statement(self, account_id: str) -> StoredStatement | None:
        row = self._db.execute(
            f"SELECT {self._STATEMENT_COLUMNS} FROM custodian_statements "  # noqa: S608 (constant)
            "WHERE account_id = ? AND orphan = 0 ORDER BY leaf_index DESC LIMIT 1",
            (account_id,),
        ).fetchone()
        return self._statement(row)

    def statements_from(self, leaf_index: int) -> list[StoredStatement]:
        rows = self._db.execute(
            f"SELECT {self._STATEMENT_COLUMNS} FROM custodian_statements "  # noqa: S608 (constant)
            "WHERE leaf_index >= ? ORDER BY leaf_index",
            (leaf_index,),
        ).fetchall()
        return [s for s in map(self._statement, rows) if s is not None]

    # -- checkpoints --

    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        self._db.execute(
            "INSERT INTO custodian_checkpoints (tree_size, envelope, issued_at_us) VALUES (?, ?, ?)",
            (
                checkpoint.tree_size,
                checkpoint.envelope.SerializeToString(),
                to_us(checkpoint.issued_at),
            ),
        )

    def _checkpoint(self, where: str, parameters: tuple[int, ...]) -> StoredCheckpoint | None:
        row = self._db.execute(
            "SELECT tree_size, envelope, issued_at_us FROM custodian_checkpoints "  # noqa: S608 (callers pass constants)
            f"{where} ORDER BY id DESC LIMIT 1",
            parameters,
        ).fetchone()
        if row is None:
            return None
        return StoredCheckpoint(int(row[0]), parse_envelope(row[1]), from_us(row[2]))

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        return self._checkpoint("", ())

    def checkpoint_at(self, tree_size: int) -> StoredCheckpoint | None:
        return self._checkpoint("WHERE tree_size = ?", (tree_size,))
