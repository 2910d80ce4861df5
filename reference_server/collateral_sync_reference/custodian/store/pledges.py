"""Pledges and the liquidation paths they record.

A path is the client's LiquidationPath envelope with our countersignature;
a pledge row keeps each pledged quantity with the request that asked for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from collateral_sync.amounts import format_amount
from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.custodian.store._sql import Tables, from_us, parse_envelope, to_us

__all__ = ["SCHEMA", "PathRecord", "PledgeTables"]


@dataclass(frozen=True, slots=True)
class PathRecord:
    statement_id: str
    account_id: str
    exchange_id: str
    recorded_at: datetime
    #: The client's LiquidationPath envelope, with our countersignature appended.
    envelope: envelope_pb2.Envelope


SCHEMA = (
    # seq: the order paths were recorded in (two may share an instant).
    """CREATE TABLE IF NOT EXISTS custodian_paths (
        seq INTEGER PRIMARY KEY,
        statement_id TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        exchange_id TEXT NOT NULL,
        recorded_at_us INTEGER NOT NULL,
        envelope BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_pledges (
        id INTEGER PRIMARY KEY,
        statement_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        quantity TEXT NOT NULL,
        payload BLOB NOT NULL
    )""",
)


class PledgeTables(Tables):
    """``custodian_paths`` and ``custodian_pledges``."""

    def add_path(self, path: PathRecord) -> None:
        self._db.execute(
            "INSERT INTO custodian_paths (statement_id, account_id, exchange_id, recorded_at_us, "
            "envelope) VALUES (?, ?, ?, ?, ?)",
            (
                path.statement_id,
                path.account_id,
                path.exchange_id,
                to_us(path.recorded_at),
                path.envelope.SerializeToString(),
            ),
        )

    def _paths(self, rows: Iterable[tuple[str, str, str, int, bytes]]) -> list[PathRecord]:
        return [
            PathRecord(statement_id, account_id, exchange_id, from_us(at), parse_envelope(envelope))
            for statement_id, account_id, exchange_id, at, envelope in rows
        ]

    def path(self, statement_id: str) -> PathRecord | None:
        rows = self._db.execute(
            "SELECT statement_id, account_id, exchange_id, recorded_at_us, envelope "
            "FROM custodian_paths WHERE statement_id = ?",
            (statement_id,),
        ).fetchall()
        found = self._paths(rows)
        return found[0] if found else None

    def paths_for(self, account_id: str, exchange_id: str) -> list[PathRecord]:
        rows = self._db.execute(
            "SELECT statement_id, account_id, exchange_id, recorded_at_us, envelope "
            "FROM custodian_paths WHERE account_id = ? AND exchange_id = ? "
            "ORDER BY recorded_at_us, seq",
            (account_id, exchange_id),
        ).fetchall()
        return self._paths(rows)

    def add_pledge(
        self, statement_id: str, account_id: str, asset_id: str, quantity: Decimal, payload: bytes
    ) -> None:
        self._db.execute(
            "INSERT INTO custodian_pledges (statement_id, account_id, asset_id, quantity, payload) "
            "VALUES (?, ?, ?, ?, ?)",
            (statement_id, account_id, asset_id, format_amount(quantity), payload),
        )
