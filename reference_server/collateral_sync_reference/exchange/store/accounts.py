"""The exchange's accounts: exposure, profit, credited holdings and latest credit line.

Every part reads an account; the row is written by the parts that own each
column: exposure (requests, liquidation), profit (configuration), credited
holdings (attested holdings), credit line (credit lines).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.exchange.store._sql import Tables, envelope_or_none

__all__ = ["SCHEMA", "AccountRow", "AccountTable"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_accounts (
        account_id TEXT PRIMARY KEY,
        exposure TEXT NOT NULL DEFAULT '0',
        profit TEXT NOT NULL DEFAULT '0',
        credited_holdings_id INTEGER,
        credit_line BLOB,
        credit_key BLOB
    )""",
)


@dataclass(frozen=True, slots=True)
class AccountRow:
    account_id: str
    exposure: Decimal
    profit: Decimal
    credited_holdings_id: int | None
    credit_line: envelope_pb2.Envelope | None
    credit_key: bytes | None


class AccountTable(Tables):
    """One row an account the exchange has heard of."""

    def ensure(self, account_id: str) -> None:
        self._write(
            "INSERT INTO exchange_accounts (account_id) VALUES (?) ON CONFLICT DO NOTHING",
            (account_id,),
        )

    def get(self, account_id: str) -> AccountRow | None:
        row = self._one(
            "SELECT account_id, exposure, profit, credited_holdings_id, credit_line, credit_key "
            "FROM exchange_accounts WHERE account_id = ?",
            (account_id,),
        )
        if row is None:
            return None
        return AccountRow(
            account_id=row[0],
            exposure=parse_amount(row[1]),
            profit=parse_amount(row[2]),
            credited_holdings_id=row[3],
            credit_line=envelope_or_none(row[4]),
            credit_key=None if row[5] is None else bytes(row[5]),
        )

    def ids(self) -> list[str]:
        rows = self._db.execute(
            "SELECT account_id FROM exchange_accounts ORDER BY account_id"
        ).fetchall()
        return [row[0] for row in rows]

    def set_exposure(self, account_id: str, exposure: Decimal) -> None:
        self.ensure(account_id)
        self._write(
            "UPDATE exchange_accounts SET exposure = ? WHERE account_id = ?",
            (format_amount(exposure), account_id),
        )

    def set_profit(self, account_id: str, profit: Decimal) -> None:
        self.ensure(account_id)
        self._write(
            "UPDATE exchange_accounts SET profit = ? WHERE account_id = ?",
            (format_amount(profit), account_id),
        )

    def set_credited_holdings(self, account_id: str, holdings_id: int) -> None:
        self.ensure(account_id)
        self._write(
            "UPDATE exchange_accounts SET credited_holdings_id = ? WHERE account_id = ?",
            (holdings_id, account_id),
        )

    def set_credit_line(
        self, account_id: str, envelope: envelope_pb2.Envelope, credit_key: bytes
    ) -> None:
        self._write(
            "UPDATE exchange_accounts SET credit_line = ?, credit_key = ? WHERE account_id = ?",
            (envelope.SerializeToString(), credit_key, account_id),
        )
