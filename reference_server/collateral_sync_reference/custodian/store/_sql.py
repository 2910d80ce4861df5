"""What the custodian's table groups share: one connection and the stored encodings.

Times are stored as integer microseconds since the epoch, statements as
their envelopes' bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from collateral_sync.sql import SqlConnection
from collateral_sync.v1 import envelope_pb2

__all__ = ["Tables", "from_us", "parse_envelope", "to_us"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def parse_envelope(data: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(bytes(data))


class Tables:
    """A part of the custodian's store: the SQL of some of its tables.

    :class:`~collateral_sync_reference.custodian.store.SqliteCustodianStore`
    is made of these parts and sets their one connection, the storage's.
    """

    _db: SqlConnection
