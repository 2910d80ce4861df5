"""The rest of what the exchange's stream sent: credit lines, risk policies, refused updates.

Credit lines and risk policies are kept as the exchange signed them, the
latest per account and per version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.custodian.store._sql import Tables, from_us, parse_envelope, to_us

__all__ = ["SCHEMA", "ExchangeStreamTables", "RejectedUpdate"]


@dataclass(frozen=True, slots=True)
class RejectedUpdate:
    """An exchange's stream update recorded as rejected instead of applied."""

    exchange_id: str
    sync_sequence: int
    #: The PositionUpdate variant, e.g. "liquidation_instruction".
    kind: str
    #: ErrorReason name of the refusal.
    reason: str
    detail: str
    #: The update's envelope, as received.
    envelope: envelope_pb2.Envelope
    rejected_at: datetime


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_credit_lines (
        account_id TEXT PRIMARY KEY,
        envelope BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_risk_policies (
        version INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL
    )""",
    # Stream updates whose statement verified but that asked for something we
    # cannot do (PROTOCOL.md §6.5): kept with the reason, never applied.
    """CREATE TABLE IF NOT EXISTS custodian_rejected_updates (
        id INTEGER PRIMARY KEY,
        exchange_id TEXT NOT NULL,
        sync_sequence INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        payload BLOB NOT NULL,
        rejected_at_us INTEGER NOT NULL
    )""",
)


class ExchangeStreamTables(Tables):
    """``custodian_credit_lines``, ``custodian_risk_policies``, ``custodian_rejected_updates``."""

    def put_credit_line(self, account_id: str, envelope: envelope_pb2.Envelope) -> None:
        self._db.execute(
            "INSERT INTO custodian_credit_lines VALUES (?, ?) "
            "ON CONFLICT (account_id) DO UPDATE SET envelope = excluded.envelope",
            (account_id, envelope.SerializeToString()),
        )

    def credit_line(self, account_id: str) -> envelope_pb2.Envelope | None:
        row = self._db.execute(
            "SELECT envelope FROM custodian_credit_lines WHERE account_id = ?", (account_id,)
        ).fetchone()
        return None if row is None else parse_envelope(row[0])

    def put_risk_policy(self, version: int, envelope: envelope_pb2.Envelope) -> None:
        self._db.execute(
            "INSERT INTO custodian_risk_policies VALUES (?, ?) "
            "ON CONFLICT (version) DO UPDATE SET envelope = excluded.envelope",
            (version, envelope.SerializeToString()),
        )

    def add_rejected_update(self, update: RejectedUpdate) -> None:
        self._db.execute(
            "INSERT INTO custodian_rejected_updates (exchange_id, sync_sequence, kind, reason, "
            "detail, payload, rejected_at_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                update.exchange_id,
                update.sync_sequence,
                update.kind,
                update.reason,
                update.detail,
                update.envelope.SerializeToString(),
                to_us(update.rejected_at),
            ),
        )

    def rejected_updates(self, exchange_id: str) -> list[RejectedUpdate]:
        """The updates of ``exchange_id`` recorded as rejected, in stream order."""
        rows = self._db.execute(
            "SELECT sync_sequence, kind, reason, detail, payload, rejected_at_us "
            "FROM custodian_rejected_updates WHERE exchange_id = ? ORDER BY id",
            (exchange_id,),
        ).fetchall()
        return [
            RejectedUpdate(
                exchange_id, row[0], row[1], row[2], row[3], parse_envelope(row[4]), from_us(row[5])
            )
            for row in rows
        ]
