"""The exchange's liquidations and each account's pre-authorised path (the liquidation part's tables)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.exchange.store._sql import (
    Tables,
    amount_or_none,
    envelope_or_none,
    required_envelope,
)

__all__ = ["SCHEMA", "LiquidationRow", "LiquidationTable"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_liquidations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        liquidation_id TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        margin_call_id TEXT NOT NULL,
        amount TEXT NOT NULL,
        liquidation_path_id TEXT NOT NULL,
        instruction BLOB NOT NULL,
        instructed_at_ns INTEGER NOT NULL,
        status TEXT NOT NULL,
        receipt BLOB,
        total_proceeds TEXT,
        shortfall TEXT,
        allocation BLOB,
        executed_at_ns INTEGER,
        refusal_reason TEXT,
        refusal_detail TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_liquidation_paths (
        account_id TEXT PRIMARY KEY,
        liquidation_path_id TEXT NOT NULL
    )""",
)

#: LIMIT for "all rows": -1 means that to SQLite alone.
_ALL = 2**63 - 1


@dataclass(frozen=True, slots=True)
class LiquidationRow:
    seq: int
    liquidation_id: str
    account_id: str
    margin_call_id: str
    amount: Decimal
    liquidation_path_id: str
    instruction: envelope_pb2.Envelope
    instructed_at_ns: int
    status: str
    receipt: envelope_pb2.Envelope | None
    total_proceeds: Decimal | None
    shortfall: Decimal | None
    allocation: envelope_pb2.Envelope | None
    refusal_reason: str | None
    refusal_detail: str | None


_COLUMNS = (
    "seq, liquidation_id, account_id, margin_call_id, amount, liquidation_path_id, instruction, "
    "instructed_at_ns, status, receipt, total_proceeds, shortfall, allocation, refusal_reason, "
    "refusal_detail"
)


class LiquidationTable(Tables):
    """Liquidation instructions in order, with the custodian's answer to each."""

    def add(
        self,
        *,
        liquidation_id: str,
        account_id: str,
        margin_call_id: str,
        amount: Decimal,
        liquidation_path_id: str,
        instruction: envelope_pb2.Envelope,
        instructed_at_ns: int,
    ) -> None:
        self._write(
            "INSERT INTO exchange_liquidations (liquidation_id, account_id, margin_call_id, amount, "
            "liquidation_path_id, instruction, instructed_at_ns, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'instructed')",
            (
                liquidation_id,
                account_id,
                margin_call_id,
                format_amount(amount),
                liquidation_path_id,
                instruction.SerializeToString(),
                instructed_at_ns,
            ),
        )

    def record_receipt(
        self,
        liquidation_id: str,
        *,
        receipt: envelope_pb2.Envelope,
        total_proceeds: Decimal,
        shortfall: Decimal,
        allocation: envelope_pb2.Envelope | None,
        executed_at_ns: int,
    ) -> None:
        self._write(
            "UPDATE exchange_liquidations SET status = 'executed', receipt = ?, total_proceeds = ?, "
            "shortfall = ?, allocation = ?, executed_at_ns = ? WHERE liquidation_id = ?",
            (
                receipt.SerializeToString(),
                format_amount(total_proceeds),
                format_amount(shortfall),
                None if allocation is None else allocation.SerializeToString(),
                executed_at_ns,
                liquidation_id,
            ),
        )

    def refuse(self, liquidation_id: str, *, reason: str, detail: str, at_ns: int) -> None:
        """The custodian refused the instruction (or its receipt did not add up)."""
        self._write(
            "UPDATE exchange_liquidations SET status = 'refused', refusal_reason = ?, "
            "refusal_detail = ?, executed_at_ns = ? WHERE liquidation_id = ? "
            "AND status = 'instructed'",
            (reason, detail, at_ns, liquidation_id),
        )

    def in_status(self, status: str) -> list[LiquidationRow]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM exchange_liquidations "  # noqa: S608
            "WHERE status = ? ORDER BY seq",
            (status,),
        ).fetchall()
        return [_row(row) for row in rows]

    def count(self) -> int:
        """Liquidations instructed, whatever became of them."""
        row = self._one("SELECT COUNT(*) FROM exchange_liquidations")
        return int(row[0])

    def get(self, liquidation_id: str) -> LiquidationRow | None:
        row = self._one(
            f"SELECT {_COLUMNS} FROM exchange_liquidations "  # noqa: S608
            "WHERE liquidation_id = ?",
            (liquidation_id,),
        )
        return None if row is None else _row(row)

    def of_account(
        self, account_id: str, *, after_seq: int = 0, limit: int = -1
    ) -> list[LiquidationRow]:
        """Liquidations of an account in instruction order, from after ``after_seq``; ``limit`` -1: all."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM exchange_liquidations "  # noqa: S608
            "WHERE account_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (account_id, after_seq, limit if limit >= 0 else _ALL),
        ).fetchall()
        return [_row(row) for row in rows]

    def replace_allocation(self, liquidation_id: str, allocation: envelope_pb2.Envelope) -> None:
        """The same allocation signed afresh (served long after the liquidation)."""
        self._write(
            "UPDATE exchange_liquidations SET allocation = ? WHERE liquidation_id = ? "
            "AND allocation IS NOT NULL",
            (allocation.SerializeToString(), liquidation_id),
        )

    def set_path(self, account_id: str, liquidation_path_id: str) -> None:
        self._write(
            "INSERT INTO exchange_liquidation_paths VALUES (?, ?) ON CONFLICT (account_id) "
            "DO UPDATE SET liquidation_path_id = excluded.liquidation_path_id",
            (account_id, liquidation_path_id),
        )

    def path(self, account_id: str) -> str | None:
        row = self._one(
            "SELECT liquidation_path_id FROM exchange_liquidation_paths WHERE account_id = ?",
            (account_id,),
        )
        return None if row is None else str(row[0])


def _row(row: Any) -> LiquidationRow:
    return LiquidationRow(
        seq=row[0],
        liquidation_id=row[1],
        account_id=row[2],
        margin_call_id=row[3],
        amount=parse_amount(row[4]),
        liquidation_path_id=row[5],
        instruction=required_envelope(row[6]),
        instructed_at_ns=row[7],
        status=row[8],
        receipt=envelope_or_none(row[9]),
        total_proceeds=amount_or_none(row[10]),
        shortfall=amount_or_none(row[11]),
        allocation=envelope_or_none(row[12]),
        refusal_reason=row[13],
        refusal_detail=row[14],
    )
