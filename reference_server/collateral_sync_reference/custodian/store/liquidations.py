"""Liquidations we executed, each with the receipt we signed for it."""

from __future__ import annotations

from dataclasses import dataclass

from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.custodian.store._sql import Tables, parse_envelope

__all__ = ["SCHEMA", "LiquidationRecord", "LiquidationTables"]


@dataclass(frozen=True, slots=True)
class LiquidationRecord:
    liquidation_id: str
    account_id: str
    #: Payload of the instruction executed, to tell a repeat from a conflicting reuse of the id.
    instruction_payload: bytes
    receipt: envelope_pb2.Envelope


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_liquidations (
        liquidation_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        instruction_payload BLOB NOT NULL,
        receipt BLOB NOT NULL
    )""",
)


class LiquidationTables(Tables):
    """``custodian_liquidations``."""

    def liquidation(self, liquidation_id: str) -> LiquidationRecord | None:
        row = self._db.execute(
            "SELECT account_id, instruction_payload, receipt FROM custodian_liquidations "
            "WHERE liquidation_id = ?",
            (liquidation_id,),
        ).fetchone()
        if row is None:
            return None
        return LiquidationRecord(liquidation_id, row[0], bytes(row[1]), parse_envelope(row[2]))

    def add_liquidation(self, record: LiquidationRecord) -> None:
        self._db.execute(
            "INSERT INTO custodian_liquidations VALUES (?, ?, ?, ?)",
            (
                record.liquidation_id,
                record.account_id,
                record.instruction_payload,
                record.receipt.SerializeToString(),
            ),
        )

    def liquidation_count(self) -> int:
        """Liquidations executed (each once, however often its instruction was repeated)."""
        row = self._db.execute("SELECT COUNT(*) FROM custodian_liquidations").fetchone()
        return int(row[0])
