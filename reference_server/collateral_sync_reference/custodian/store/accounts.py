"""Accounts and their holdings: what the ledger changes and attests.

Quantities are stored as canonical decimal text; an empty holding is not stored.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount

from collateral_sync_reference.custodian.store._sql import Tables

__all__ = ["SCHEMA", "Account", "AccountTables", "Holding"]

_ZERO = Decimal(0)


@dataclass(slots=True)
class Holding:
    """One asset of one account. ``accrued_yield`` is part of ``quantity`` and never pledged."""

    asset_id: str
    quantity: Decimal = _ZERO
    locked: Decimal = _ZERO
    pledged: Decimal = _ZERO
    accrued_yield: Decimal = _ZERO

    def is_empty(self) -> bool:
        return not (self.quantity or self.locked or self.pledged or self.accrued_yield)


@dataclass(slots=True)
class Account:
    account_id: str
    client_id: str
    #: The exchange the account pledges to; "" while it pledges to none.
    exchange_id: str
    #: Epoch of the latest holdings statement (0: none yet).
    epoch: int
    holdings: dict[str, Holding] = field(default_factory=dict)

    def holding(self, asset_id: str) -> Holding:
        """The account's holding of ``asset_id``, created empty if absent."""
        found = self.holdings.get(asset_id)
        if found is None:
            found = self.holdings[asset_id] = Holding(asset_id)
        return found


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_accounts (
        account_id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        exchange_id TEXT NOT NULL,
        epoch INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_holdings (
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        quantity TEXT NOT NULL,
        locked TEXT NOT NULL,
        pledged TEXT NOT NULL,
        accrued_yield TEXT NOT NULL,
        PRIMARY KEY (account_id, asset_id)
    )""",
    "CREATE INDEX IF NOT EXISTS custodian_holdings_asset ON custodian_holdings (asset_id)",
)


class AccountTables(Tables):
    """``custodian_accounts`` and ``custodian_holdings``."""

    def account(self, account_id: str) -> Account | None:
        row = self._db.execute(
            "SELECT client_id, exchange_id, epoch FROM custodian_accounts WHERE account_id = ?",
            (account_id,),
        ).fetchone()
        if row is None:
            return None
        account = Account(account_id, row[0], row[1], row[2])
        for asset_id, quantity, locked, pledged, accrued in self._db.execute(
            "SELECT asset_id, quantity, locked, pledged, accrued_yield FROM custodian_holdings "
            "WHERE account_id = ? ORDER BY asset_id",
            (account_id,),
        ):
            account.holdings[asset_id] = Holding(
                asset_id,
                parse_amount(quantity),
                parse_amount(locked),
                parse_amount(pledged),
                parse_amount(accrued),
            )
        return account

    def account_ids(self) -> list[str]:
        rows = self._db.execute("SELECT account_id FROM custodian_accounts ORDER BY account_id")
        return [row[0] for row in rows]

    def accounts_holding(self, asset_ids: Collection[str]) -> list[str]:
        if not asset_ids:
            return []
        marks = ",".join("?" * len(asset_ids))
        rows = self._db.execute(
            f"SELECT DISTINCT account_id FROM custodian_holdings WHERE asset_id IN ({marks}) "  # noqa: S608 (only placeholders)
            "AND quantity != '0' ORDER BY account_id",
            tuple(asset_ids),
        )
        return [row[0] for row in rows]

    def add_account(self, account: Account) -> None:
        self._db.execute(
            "INSERT INTO custodian_accounts VALUES (?, ?, ?, ?)",
            (account.account_id, account.client_id, account.exchange_id, account.epoch),
        )
        self._write_holdings(account)

    def save_account(self, account: Account) -> None:
        self._db.execute(
            "UPDATE custodian_accounts SET exchange_id = ?, epoch = ? WHERE account_id = ?",
            (account.exchange_id, account.epoch, account.account_id),
        )
        self._db.execute(
            "DELETE FROM custodian_holdings WHERE account_id = ?", (account.account_id,)
        )
        self._write_holdings(account)

    def _write_holdings(self, account: Account) -> None:
        self._db.executemany(
            "INSERT INTO custodian_holdings VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    account.account_id,
                    h.asset_id,
                    format_amount(h.quantity),
                    format_amount(h.locked),
                    format_amount(h.pledged),
                    format_amount(h.accrued_yield),
                )
                for h in account.holdings.values()
                if not h.is_empty()
            ],
        )
