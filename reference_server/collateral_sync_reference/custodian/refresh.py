"""Holdings statements refreshed before they expire (docs/PROTOCOL.md §5.8, "Refresh").

A holdings statement is a leaf of the attestation log and is never re-signed;
once it has expired nothing may cite it as evidence (§3.6.1), so an exchange
could rest no credit line and no margin call on an account that nothing else
changes. A sweep therefore re-attests every account whose latest statement has
used half its lifetime or more: the same positions, reason REFRESH, the next
epoch, in the log and on the sync log of the exchange the account is pledged
to, like any other change (:meth:`Ledger._attest`).

Sweeps run every min(1 day, statement_ttl / 4) (:meth:`Custodian.run_due`), so a
statement is refreshed between half and three quarters of its lifetime. A
sweep is one transaction that reads each account's latest statement once and
records its own time, so a restart neither skips a sweep nor repeats one; the
first start sweeps at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from collateral_sync.v1 import attestation_pb2

from collateral_sync_reference.custodian.ledger import _REASON, Ledger, _Change
from collateral_sync_reference.custodian.store import StoredStatement, from_us, to_us

__all__ = ["HoldingsRefresh", "refresh_due"]

_SWEEP_KEY = "custodian_refresh_last_sweep_us"
#: Sweeps are at most this far apart, however long statements live.
_MAX_INTERVAL = timedelta(days=1)


def refresh_due(statement: StoredStatement) -> datetime:
    """When ``statement`` has used half its lifetime: from then on a sweep refreshes it."""
    header = attestation_pb2.HoldingsStatement.FromString(statement.envelope.payload).header
    issued_at = header.issued_at.ToDatetime(tzinfo=UTC)
    expires_at = header.expires_at.ToDatetime(tzinfo=UTC)
    return issued_at + (expires_at - issued_at) / 2


class HoldingsRefresh:
    """The sweep that re-attests the accounts whose latest holdings statement is half used."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        #: Time between two sweeps.
        self.interval = min(_MAX_INTERVAL, ledger.settings.statement_ttl / 4)

    def next_sweep(self) -> datetime:
        """When the next sweep is due: an interval after the last one; before the first, at once."""
        stored = self._ledger.storage.get_meta(_SWEEP_KEY)
        if stored is None:
            return from_us(0)
        return from_us(int(stored)) + self.interval

    def sweep(self) -> int:
        """Refresh every account whose latest statement is half used; returns how many."""
        ledger = self._ledger
        now = ledger.clock.now()
        with ledger.storage.transaction():
            changes: list[_Change] = []
            for account_id in ledger.store.account_ids():
                latest = ledger.store.latest_statement(account_id)
                if latest is None or refresh_due(latest) > now:
                    continue
                account = ledger.store.account(account_id)
                if account is None:  # pragma: no cover - listed from the same table
                    continue
                changes.append(_Change(account, _REASON.HOLDINGS_CHANGE_REASON_REFRESH))
            ledger._attest(changes, now)
            ledger.storage.set_meta(_SWEEP_KEY, str(to_us(now)))
        return len(changes)
