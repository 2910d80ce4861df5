"""Redemptions: assets locked now, paid out at their settlement time.

Each redemption is kept with the request that asked for it; ``settled``
turns 1 once it is paid out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount

from collateral_sync_reference.custodian.store._sql import Tables, from_us, to_us

__all__ = ["SCHEMA", "Redemption", "RedemptionTables"]


@dataclass(frozen=True, slots=True)
class Redemption:
    redemption_id: str
    account_id: str
    asset_id: str
    quantity: Decimal
    settle_at: datetime
    settled: bool = False


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_redemptions (
        redemption_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        quantity TEXT NOT NULL,
        settle_at_us INTEGER NOT NULL,
        settled INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
)


class RedemptionTables(Tables):
    """``custodian_redemptions``."""

    def add_redemption(self, redemption: Redemption, payload: bytes) -> None:
        self._db.execute(
            "INSERT INTO custodian_redemptions VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                redemption.redemption_id,
                redemption.account_id,
                redemption.asset_id,
                format_amount(redemption.quantity),
                to_us(redemption.settle_at),
                int(redemption.settled),
                payload,
            ),
        )

    def _redemptions(self, where: str, parameters: tuple[object, ...]) -> list[Redemption]:
        rows = self._db.execute(
            "SELECT redemption_id, account_id, asset_id, quantity, settle_at_us, settled "  # noqa: S608 (callers pass constants)
            f"FROM custodian_redemptions {where} ORDER BY settle_at_us, redemption_id",
            parameters,
        ).fetchall()
        return [
            Redemption(rid, account, asset, parse_amount(quantity), from_us(at), bool(settled))
            for rid, account, asset, quantity, at, settled in rows
        ]

    def redemption(self, redemption_id: str) -> Redemption | None:
        found = self._redemptions("WHERE redemption_id = ?", (redemption_id,))
        return found[0] if found else None

    def due_redemptions(self, now: datetime) -> list[Redemption]:
        return self._redemptions("WHERE settled = 0 AND settle_at_us <= ?", (to_us(now),))

    def next_settlement(self) -> datetime | None:
        row = self._db.execute(
            "SELECT MIN(settle_at_us) FROM custodian_redemptions WHERE settled = 0"
        ).fetchone()
        return None if row[0] is None else from_us(row[0])

    def mark_settled(self, redemption_id: str) -> None:
        self._db.execute(
            "UPDATE custodian_redemptions SET settled = 1 WHERE redemption_id = ?",
            (redemption_id,),
        )
