"""The exchange's margin calls, and every signed state each has had (the margin-call part's tables)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.exchange.store._sql import (
    Tables,
    envelope_or_none,
    required_envelope,
)

__all__ = ["SCHEMA", "MarginCallRow", "MarginCallTable"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_margin_calls (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        margin_call_id TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        call_amount TEXT NOT NULL,
        agreed_amount TEXT NOT NULL,
        satisfied_amount TEXT NOT NULL,
        collateral_value TEXT NOT NULL,
        exposure TEXT NOT NULL,
        holdings_epoch INTEGER NOT NULL,
        issued_at_ns INTEGER NOT NULL,
        due_by_ns INTEGER NOT NULL,
        updated_at_ns INTEGER NOT NULL,
        call_envelope BLOB NOT NULL,
        state_envelope BLOB NOT NULL,
        response_envelope BLOB
    )""",
    "CREATE INDEX IF NOT EXISTS exchange_margin_calls_account ON exchange_margin_calls "
    "(account_id, seq)",
    # Every MarginCallState published, oldest first: the call's signed history.
    """CREATE TABLE IF NOT EXISTS exchange_margin_call_states (
        id INTEGER PRIMARY KEY,
        margin_call_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        envelope BLOB NOT NULL
    )""",
)

#: LIMIT for "all rows": -1 means that to SQLite alone.
_ALL = 2**63 - 1


@dataclass(frozen=True, slots=True)
class MarginCallRow:
    seq: int
    margin_call_id: str
    account_id: str
    status: int
    call_amount: Decimal
    agreed_amount: Decimal
    satisfied_amount: Decimal
    collateral_value: Decimal
    exposure: Decimal
    holdings_epoch: int
    issued_at_ns: int
    due_by_ns: int
    updated_at_ns: int
    call_envelope: envelope_pb2.Envelope
    state_envelope: envelope_pb2.Envelope
    response_envelope: envelope_pb2.Envelope | None


_COLUMNS = (
    "seq, margin_call_id, account_id, status, call_amount, agreed_amount, satisfied_amount, "
    "collateral_value, exposure, holdings_epoch, issued_at_ns, due_by_ns, updated_at_ns, "
    "call_envelope, state_envelope, response_envelope"
)


class MarginCallTable(Tables):
    """Margin calls in issue order, with their current and past signed states."""

    def add(
        self,
        *,
        margin_call_id: str,
        account_id: str,
        status: int,
        call_amount: Decimal,
        collateral_value: Decimal,
        exposure: Decimal,
        holdings_epoch: int,
        issued_at_ns: int,
        due_by_ns: int,
        call_envelope: envelope_pb2.Envelope,
        state_envelope: envelope_pb2.Envelope,
    ) -> None:
        self._write(
            "INSERT INTO exchange_margin_calls (margin_call_id, account_id, status, call_amount, "
            "agreed_amount, satisfied_amount, collateral_value, exposure, holdings_epoch, "
            "issued_at_ns, due_by_ns, updated_at_ns, call_envelope, state_envelope) "
            "VALUES (?, ?, ?, ?, '0', '0', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                margin_call_id,
                account_id,
                status,
                format_amount(call_amount),
                format_amount(collateral_value),
                format_amount(exposure),
                holdings_epoch,
                issued_at_ns,
                due_by_ns,
                issued_at_ns,
                call_envelope.SerializeToString(),
                state_envelope.SerializeToString(),
            ),
        )
        self._add_state(margin_call_id, status, state_envelope)

    def update(
        self,
        margin_call_id: str,
        *,
        status: int,
        agreed_amount: Decimal,
        satisfied_amount: Decimal,
        updated_at_ns: int,
        state_envelope: envelope_pb2.Envelope,
        response_envelope: envelope_pb2.Envelope | None = None,
    ) -> None:
        self._write(
            "UPDATE exchange_margin_calls SET status = ?, agreed_amount = ?, satisfied_amount = ?, "
            "updated_at_ns = ?, state_envelope = ?, "
            "response_envelope = COALESCE(?, response_envelope) WHERE margin_call_id = ?",
            (
                status,
                format_amount(agreed_amount),
                format_amount(satisfied_amount),
                updated_at_ns,
                state_envelope.SerializeToString(),
                None if response_envelope is None else response_envelope.SerializeToString(),
                margin_call_id,
            ),
        )
        self._add_state(margin_call_id, status, state_envelope)

    def refresh_state(self, margin_call_id: str, state_envelope: envelope_pb2.Envelope) -> None:
        """Store a re-signed state of an unchanged call (a fresh lifetime, same content)."""
        self._write(
            "UPDATE exchange_margin_calls SET state_envelope = ? WHERE margin_call_id = ?",
            (state_envelope.SerializeToString(), margin_call_id),
        )

    def _add_state(
        self, margin_call_id: str, status: int, state_envelope: envelope_pb2.Envelope
    ) -> None:
        self._write(
            "INSERT INTO exchange_margin_call_states (margin_call_id, status, envelope) "
            "VALUES (?, ?, ?)",
            (margin_call_id, status, state_envelope.SerializeToString()),
        )

    def get(self, margin_call_id: str) -> MarginCallRow | None:
        row = self._one(
            f"SELECT {_COLUMNS} FROM exchange_margin_calls "  # noqa: S608
            "WHERE margin_call_id = ?",
            (margin_call_id,),
        )
        return None if row is None else _row(row)

    def of_account(
        self, account_id: str, *, after_seq: int = 0, limit: int = -1
    ) -> list[MarginCallRow]:
        """Calls of an account in issue order, from after ``after_seq``; ``limit`` -1: all."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM exchange_margin_calls "  # noqa: S608
            "WHERE account_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (account_id, after_seq, limit if limit >= 0 else _ALL),
        ).fetchall()
        return [_row(row) for row in rows]

    def in_statuses(self, statuses: Iterable[int]) -> list[MarginCallRow]:
        wanted = sorted(set(statuses))
        marks = ", ".join("?" for _ in wanted)
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM exchange_margin_calls "  # noqa: S608
            f"WHERE status IN ({marks}) ORDER BY seq",
            wanted,
        ).fetchall()
        return [_row(row) for row in rows]

    def count_by_status(self) -> dict[int, int]:
        """How many margin calls are in each status now (statuses with none left out)."""
        rows = self._db.execute(
            "SELECT status, COUNT(*) FROM exchange_margin_calls GROUP BY status"
        ).fetchall()
        return {int(status): int(count) for status, count in rows}

    def history(self, margin_call_id: str) -> list[envelope_pb2.Envelope]:
        rows = self._db.execute(
            "SELECT envelope FROM exchange_margin_call_states WHERE margin_call_id = ? ORDER BY id",
            (margin_call_id,),
        ).fetchall()
        return [required_envelope(row[0]) for row in rows]


def _row(row: Any) -> MarginCallRow:
    return MarginCallRow(
        seq=row[0],
        margin_call_id=row[1],
        account_id=row[2],
        status=row[3],
        call_amount=parse_amount(row[4]),
        agreed_amount=parse_amount(row[5]),
        satisfied_amount=parse_amount(row[6]),
        collateral_value=parse_amount(row[7]),
        exposure=parse_amount(row[8]),
        holdings_epoch=row[9],
        issued_at_ns=row[10],
        due_by_ns=row[11],
        updated_at_ns=row[12],
        call_envelope=required_envelope(row[13]),
        state_envelope=required_envelope(row[14]),
        response_envelope=envelope_or_none(row[15]),
    )
