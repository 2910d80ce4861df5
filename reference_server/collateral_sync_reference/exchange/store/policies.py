"""The exchange's published risk policies, one row a version (the risk-policy part's table)."""

from __future__ import annotations

from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.exchange.store._sql import Tables, required_envelope

__all__ = ["SCHEMA", "PolicyTable"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_policies (
        version INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        content_key BLOB NOT NULL,
        published_at_ns INTEGER NOT NULL
    )""",
)


class PolicyTable(Tables):
    """Every version of the risk policy published, as signed."""

    def add(
        self, version: int, envelope: envelope_pb2.Envelope, content_key: bytes, at_ns: int
    ) -> None:
        self._write(
            "INSERT INTO exchange_policies VALUES (?, ?, ?, ?)",
            (version, envelope.SerializeToString(), content_key, at_ns),
        )

    def replace_envelope(self, version: int, envelope: envelope_pb2.Envelope) -> None:
        """Store a re-signed envelope of the same version (same content, fresh lifetime)."""
        self._write(
            "UPDATE exchange_policies SET envelope = ? WHERE version = ?",
            (envelope.SerializeToString(), version),
        )

    def get(self, version: int) -> envelope_pb2.Envelope | None:
        row = self._one("SELECT envelope FROM exchange_policies WHERE version = ?", (version,))
        return None if row is None else required_envelope(row[0])

    def latest(self) -> tuple[int, envelope_pb2.Envelope, bytes] | None:
        """(version, envelope, content key) of the policy in force, or None."""
        row = self._one(
            "SELECT version, envelope, content_key FROM exchange_policies "
            "ORDER BY version DESC LIMIT 1"
        )
        return None if row is None else (int(row[0]), required_envelope(row[1]), bytes(row[2]))
