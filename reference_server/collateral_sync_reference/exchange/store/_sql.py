"""What the exchange's table groups share: one connection, guarded writes, stored encodings.

Reads may run anytime; writes only inside an open transaction
(``storage.transaction()`` or the sync session's apply), which every write
checks. Signed statements are stored as serialised ``Envelope`` bytes,
amounts as canonical decimal text.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import parse_amount
from collateral_sync.sql import SqlConnection, SqlCursor
from collateral_sync.v1 import envelope_pb2

__all__ = ["Tables", "amount_or_none", "envelope_or_none", "required_envelope"]


class Tables:
    """A group of the exchange's tables on the storage's one connection."""

    def __init__(self, db: SqlConnection) -> None:
        self._db = db

    def _write(self, sql: str, parameters: Iterable[Any] = ()) -> SqlCursor:
        if not self._db.in_transaction:
            raise RuntimeError("exchange state is written only inside an open transaction")
        return self._db.execute(sql, tuple(parameters))

    def _one(self, sql: str, parameters: Iterable[Any] = ()) -> Any:
        return self._db.execute(sql, tuple(parameters)).fetchone()


def envelope_or_none(data: bytes | None) -> envelope_pb2.Envelope | None:
    return None if data is None else envelope_pb2.Envelope.FromString(data)


def required_envelope(data: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(data)


def amount_or_none(text: str | None) -> Decimal | None:
    return None if text is None else parse_amount(text)
