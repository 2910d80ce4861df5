"""The consents the exchange gave to pledge releases (the pledge-release part's table)."""

from __future__ import annotations

from dataclasses import dataclass

from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.exchange.store._sql import Tables, required_envelope

__all__ = ["SCHEMA", "ReleaseConsentRow", "ReleaseConsentTable"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_release_consents (
        release_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        request_payload BLOB NOT NULL,
        consent BLOB NOT NULL,
        consented_at_ns INTEGER NOT NULL
    )""",
)


@dataclass(frozen=True, slots=True)
class ReleaseConsentRow:
    release_id: str
    account_id: str
    #: The payload bytes of the client's request, to tell a retry from a reused id.
    request_payload: bytes
    consent: envelope_pb2.Envelope
    consented_at_ns: int


class ReleaseConsentTable(Tables):
    """One row per release id the exchange consented to; refused requests leave none."""

    def add(self, row: ReleaseConsentRow) -> None:
        self._write(
            "INSERT INTO exchange_release_consents "
            "(release_id, account_id, request_payload, consent, consented_at_ns) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                row.release_id,
                row.account_id,
                row.request_payload,
                row.consent.SerializeToString(),
                row.consented_at_ns,
            ),
        )

    def get(self, release_id: str) -> ReleaseConsentRow | None:
        found = self._one(
            "SELECT release_id, account_id, request_payload, consent, consented_at_ns "
            "FROM exchange_release_consents WHERE release_id = ?",
            (release_id,),
        )
        if found is None:
            return None
        return ReleaseConsentRow(
            release_id=found[0],
            account_id=found[1],
            request_payload=bytes(found[2]),
            consent=required_envelope(bytes(found[3])),
            consented_at_ns=int(found[4]),
        )
