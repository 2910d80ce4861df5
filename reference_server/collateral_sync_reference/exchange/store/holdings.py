"""What the custodian sent that the exchange keeps: holdings, pledges, yield, checkpoints, refusals.

The attested-holdings part's tables: every holdings statement received with
what became of it, the pledge changes and yield accruals recorded beside
them, the custodian checkpoint the exchange trusts and the refused ones kept
as evidence; and the stream updates refused for what they ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from collateral_sync.v1 import attestation_pb2, envelope_pb2

from collateral_sync_reference.exchange.store._sql import (
    Tables,
    envelope_or_none,
    required_envelope,
)

__all__ = [
    "SCHEMA",
    "CheckpointEvidenceRow",
    "CheckpointTable",
    "HoldingsRow",
    "HoldingsTable",
    "RejectedUpdateTable",
]

SCHEMA = (
    # Every holdings statement received, with what became of it: 'pending'
    # until its attestation is checked, then 'credited' or 'rejected'.
    """CREATE TABLE IF NOT EXISTS exchange_holdings (
        id INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        exchange_id TEXT NOT NULL,
        envelope BLOB NOT NULL,
        attestation BLOB NOT NULL,
        sync_sequence INTEGER NOT NULL,
        received_at_ns INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        decided_at_ns INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS exchange_holdings_status ON exchange_holdings (status, id)",
    "CREATE INDEX IF NOT EXISTS exchange_holdings_account ON exchange_holdings (account_id, id)",
    """CREATE TABLE IF NOT EXISTS exchange_pledge_changes (
        id INTEGER PRIMARY KEY,
        sync_sequence INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        pledged_quantity TEXT NOT NULL,
        attestation BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_yield_accruals (
        id INTEGER PRIMARY KEY,
        sync_sequence INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        accrued_quantity TEXT NOT NULL,
        accrual_time_ns INTEGER NOT NULL,
        attestation BLOB NOT NULL
    )""",
    # The last checkpoint of the custodian's log this exchange trusts (§5.6).
    """CREATE TABLE IF NOT EXISTS exchange_checkpoints (
        origin TEXT PRIMARY KEY,
        envelope BLOB NOT NULL,
        tree_size INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_checkpoint_evidence (
        id INTEGER PRIMARY KEY,
        origin TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        held BLOB,
        received BLOB NOT NULL,
        proof BLOB,
        detected_at_ns INTEGER NOT NULL
    )""",
    # Stream updates refused for what they ask rather than for their
    # signature (e.g. a response to an expired call): kept, not applied.
    """CREATE TABLE IF NOT EXISTS exchange_rejected_updates (
        id INTEGER PRIMARY KEY,
        sync_sequence INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        payload BLOB NOT NULL,
        rejected_at_ns INTEGER NOT NULL
    )""",
)


@dataclass(frozen=True, slots=True)
class CheckpointEvidenceRow:
    """A custodian checkpoint the attestation checker refused, kept with the one it trusted."""

    origin: str
    #: The refusal's reason name (CHECKPOINT_INCONSISTENT, PROOF_INVALID...).
    reason: str
    #: The checkpoint trusted when it was refused (None: none yet).
    held: envelope_pb2.Envelope | None
    received: envelope_pb2.Envelope
    #: The serialised ConsistencyProof the custodian served with it, if any.
    proof: bytes | None
    detected_at_ns: int


@dataclass(frozen=True, slots=True)
class HoldingsRow:
    id: int
    account_id: str
    epoch: int
    exchange_id: str
    envelope: envelope_pb2.Envelope
    attestation: attestation_pb2.AttestationRef
    sync_sequence: int
    received_at_ns: int
    status: str
    reason: str
    detail: str


_COLUMNS = (
    "id, account_id, epoch, exchange_id, envelope, attestation, sync_sequence, received_at_ns, "
    "status, reason, detail"
)


class HoldingsTable(Tables):
    """Holdings statements received, and the pledge changes and yield accruals beside them."""

    def add(
        self,
        *,
        account_id: str,
        epoch: int,
        exchange_id: str,
        envelope: envelope_pb2.Envelope,
        attestation: attestation_pb2.AttestationRef,
        sync_sequence: int,
        received_at_ns: int,
    ) -> int:
        cursor = self._write(
            "INSERT INTO exchange_holdings (account_id, epoch, exchange_id, envelope, attestation, "
            "sync_sequence, received_at_ns, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending') "
            "RETURNING id",
            (
                account_id,
                epoch,
                exchange_id,
                envelope.SerializeToString(),
                attestation.SerializeToString(),
                sync_sequence,
                received_at_ns,
            ),
        )
        return int(cursor.fetchone()[0])

    def decide(
        self, holdings_id: int, *, status: str, reason: str, detail: str, at_ns: int
    ) -> None:
        if status not in ("credited", "rejected"):
            raise ValueError(f"expected status credited or rejected, got {status!r}")
        self._write(
            "UPDATE exchange_holdings SET status = ?, reason = ?, detail = ?, decided_at_ns = ? "
            "WHERE id = ? AND status = 'pending'",
            (status, reason, detail, at_ns, holdings_id),
        )

    def get(self, holdings_id: int) -> HoldingsRow | None:
        row = self._one(
            f"SELECT {_COLUMNS} FROM exchange_holdings WHERE id = ?",  # noqa: S608
            (holdings_id,),
        )
        return None if row is None else _row(row)

    def pending(self) -> list[HoldingsRow]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM exchange_holdings "  # noqa: S608
            "WHERE status = 'pending' ORDER BY id"
        ).fetchall()
        return [_row(row) for row in rows]

    def of_account(self, account_id: str) -> list[HoldingsRow]:
        """Every holdings statement received for an account, oldest first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM exchange_holdings "  # noqa: S608
            "WHERE account_id = ? ORDER BY id",
            (account_id,),
        ).fetchall()
        return [_row(row) for row in rows]

    def latest(self, account_id: str) -> HoldingsRow | None:
        """The account's holdings statement of the highest epoch received (any status)."""
        row = self._one(
            f"SELECT {_COLUMNS} FROM exchange_holdings "  # noqa: S608
            "WHERE account_id = ? ORDER BY epoch DESC, id DESC LIMIT 1",
            (account_id,),
        )
        return None if row is None else _row(row)

    def max_epoch(self, account_id: str) -> int:
        """Highest epoch received for an account (any status); 0 if none."""
        row = self._one(
            "SELECT MAX(epoch) FROM exchange_holdings WHERE account_id = ?", (account_id,)
        )
        return 0 if row is None or row[0] is None else int(row[0])

    # -- pledges and yield (recorded; credit follows the attested holdings) --

    def add_pledge_change(
        self,
        *,
        sync_sequence: int,
        account_id: str,
        asset_id: str,
        pledged_quantity: str,
        attestation: attestation_pb2.AttestationRef,
    ) -> None:
        self._write(
            "INSERT INTO exchange_pledge_changes (sync_sequence, account_id, asset_id, "
            "pledged_quantity, attestation) VALUES (?, ?, ?, ?, ?)",
            (
                sync_sequence,
                account_id,
                asset_id,
                pledged_quantity,
                attestation.SerializeToString(),
            ),
        )

    def add_yield_accrual(
        self,
        *,
        sync_sequence: int,
        account_id: str,
        asset_id: str,
        accrued_quantity: str,
        accrual_time_ns: int,
        attestation: attestation_pb2.AttestationRef,
    ) -> None:
        self._write(
            "INSERT INTO exchange_yield_accruals (sync_sequence, account_id, asset_id, "
            "accrued_quantity, accrual_time_ns, attestation) VALUES (?, ?, ?, ?, ?, ?)",
            (
                sync_sequence,
                account_id,
                asset_id,
                accrued_quantity,
                accrual_time_ns,
                attestation.SerializeToString(),
            ),
        )

    def pledge_changes(self, account_id: str) -> list[tuple[str, str]]:
        """(asset id, pledged quantity) of each pledge change of an account, oldest first."""
        rows = self._db.execute(
            "SELECT asset_id, pledged_quantity FROM exchange_pledge_changes "
            "WHERE account_id = ? ORDER BY id",
            (account_id,),
        ).fetchall()
        return [(row[0], row[1]) for row in rows]

    def yield_accruals(self, account_id: str) -> list[tuple[str, str]]:
        """(asset id, accrued quantity) of each accrual of an account, oldest first."""
        rows = self._db.execute(
            "SELECT asset_id, accrued_quantity FROM exchange_yield_accruals "
            "WHERE account_id = ? ORDER BY id",
            (account_id,),
        ).fetchall()
        return [(row[0], row[1]) for row in rows]


class CheckpointTable(Tables):
    """The custodian checkpoint the exchange trusts, and refused ones kept as evidence."""

    def trusted(self, origin: str) -> envelope_pb2.Envelope | None:
        row = self._one("SELECT envelope FROM exchange_checkpoints WHERE origin = ?", (origin,))
        return None if row is None else required_envelope(row[0])

    def set_trusted(self, origin: str, envelope: envelope_pb2.Envelope, tree_size: int) -> None:
        self._write(
            "INSERT INTO exchange_checkpoints VALUES (?, ?, ?) ON CONFLICT (origin) "
            "DO UPDATE SET envelope = excluded.envelope, tree_size = excluded.tree_size",
            (origin, envelope.SerializeToString(), tree_size),
        )

    def add_evidence(
        self,
        *,
        origin: str,
        reason: str,
        detail: str,
        held: envelope_pb2.Envelope | None,
        received: envelope_pb2.Envelope,
        proof: bytes | None,
        at_ns: int,
    ) -> None:
        self._write(
            "INSERT INTO exchange_checkpoint_evidence (origin, reason, detail, held, received, "
            "proof, detected_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                origin,
                reason,
                detail,
                None if held is None else held.SerializeToString(),
                received.SerializeToString(),
                proof,
                at_ns,
            ),
        )

    def evidence(self, origin: str | None = None) -> list[CheckpointEvidenceRow]:
        """Each refused checkpoint kept (of ``origin``, or of every log), oldest first."""
        select = (
            "SELECT origin, reason, held, received, proof, detected_at_ns "
            "FROM exchange_checkpoint_evidence "
        )
        rows = (
            self._db.execute(select + "ORDER BY id")
            if origin is None
            else self._db.execute(select + "WHERE origin = ? ORDER BY id", (origin,))
        ).fetchall()
        return [
            CheckpointEvidenceRow(
                origin=row[0],
                reason=row[1],
                held=envelope_or_none(row[2]),
                received=required_envelope(row[3]),
                proof=None if row[4] is None else bytes(row[4]),
                detected_at_ns=row[5],
            )
            for row in rows
        ]


class RejectedUpdateTable(Tables):
    """Stream updates refused for what they ask: kept with the reason, not applied."""

    def add(
        self, *, sync_sequence: int, kind: str, reason: str, detail: str, payload: bytes, at_ns: int
    ) -> None:
        self._write(
            "INSERT INTO exchange_rejected_updates (sync_sequence, kind, reason, detail, payload, "
            "rejected_at_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (sync_sequence, kind, reason, detail, payload, at_ns),
        )

    def entries(self) -> list[tuple[int, str, str, str]]:
        """(sync sequence, kind, reason, detail) of each refused update, oldest first."""
        rows = self._db.execute(
            "SELECT sync_sequence, kind, reason, detail FROM exchange_rejected_updates ORDER BY id"
        ).fetchall()
        return [(row[0], row[1], row[2], row[3]) for row in rows]


def _row(row: Any) -> HoldingsRow:
    return HoldingsRow(
        id=row[0],
        account_id=row[1],
        epoch=row[2],
        exchange_id=row[3],
        envelope=required_envelope(row[4]),
        attestation=attestation_pb2.AttestationRef.FromString(row[5]),
        sync_sequence=row[6],
        received_at_ns=row[7],
        status=row[8],
        reason=row[9],
        detail=row[10],
    )
