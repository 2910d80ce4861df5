"""Margin calls the exchange sent, each with our answer once we gave one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.custodian.store._sql import Tables, from_us, parse_envelope, to_us

__all__ = ["SCHEMA", "MarginCallRecord", "MarginCallTables"]


@dataclass(frozen=True, slots=True)
class MarginCallRecord:
    margin_call_id: str
    account_id: str
    envelope: envelope_pb2.Envelope
    due_by: datetime
    #: MarginCallResponseKind of our answer (0: not answered).
    response_kind: int = 0
    response: envelope_pb2.Envelope | None = None


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_margin_calls (
        margin_call_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        envelope BLOB NOT NULL,
        due_by_us INTEGER NOT NULL,
        response_kind INTEGER NOT NULL,
        response BLOB
    )""",
)


class MarginCallTables(Tables):
    """``custodian_margin_calls``."""

    def margin_call(self, margin_call_id: str) -> MarginCallRecord | None:
        row = self._db.execute(
            "SELECT account_id, envelope, due_by_us, response_kind, response "
            "FROM custodian_margin_calls WHERE margin_call_id = ?",
            (margin_call_id,),
        ).fetchone()
        if row is None:
            return None
        return MarginCallRecord(
            margin_call_id,
            row[0],
            parse_envelope(row[1]),
            from_us(row[2]),
            int(row[3]),
            None if row[4] is None else parse_envelope(row[4]),
        )

    def add_margin_call(self, record: MarginCallRecord) -> None:
        self._db.execute(
            "INSERT INTO custodian_margin_calls VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.margin_call_id,
                record.account_id,
                record.envelope.SerializeToString(),
                to_us(record.due_by),
                record.response_kind,
                None if record.response is None else record.response.SerializeToString(),
            ),
        )

    def set_margin_call_response(
        self, margin_call_id: str, kind: int, response: envelope_pb2.Envelope
    ) -> None:
        self._db.execute(
            "UPDATE custodian_margin_calls SET response_kind = ?, response = ? "
            "WHERE margin_call_id = ?",
            (kind, response.SerializeToString(), margin_call_id),
        )

    def answered_margin_calls(self) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM custodian_margin_calls WHERE response_kind != 0"
        ).fetchone()
        return int(row[0])
