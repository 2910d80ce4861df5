"""The reference custodian assembled: one ledger, and one part per responsibility working on it.

Every part receives the same :class:`~collateral_sync_reference.custodian.ledger.Ledger`
(the storage and the store, the clock, the keys, the settings, the replay
guard, the sync logs, and the operation every change of holdings goes
through) and nothing else, except where one part acts through another:

- ``attestation``: the attestation log, its checkpoints and proofs, and crash
  recovery between the log and the database;
- ``pledges``: PledgeCollateral and the liquidation paths it records;
- ``pledge_releases``: ReleasePledge, part of a pledge given back on the
  client's request and the exchange's consent;
- ``redemptions``: RequestRedemption, and settling each redemption when its lock ends;
- ``yield_accrual``: deposits, and the daily yield on fund holdings;
- ``refresh``: holdings statements re-attested before they expire;
- ``liquidations``: liquidation instructions, executed along the pre-authorised path;
- ``exchange_stream``: the sync session with each exchange and what arrives on
  it (it hands liquidation instructions to ``liquidations``);
- ``settlement`` and ``emergency``: settlement cycles and emergency release,
  which the role builds on the same ledger.

:class:`Custodian` builds the parts in the order a start needs and runs the
time-driven work; the servicers (``role``) call the parts.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from collateral_sync.sync import SyncSession

from collateral_sync_reference.common.runner import ServerContext
from collateral_sync_reference.custodian.attestation import Attestation
from collateral_sync_reference.custodian.config import CustodianSettings
from collateral_sync_reference.custodian.exchange_stream import ExchangeStream
from collateral_sync_reference.custodian.ledger import Ledger
from collateral_sync_reference.custodian.liquidations import Liquidations
from collateral_sync_reference.custodian.pledge_releases import PledgeReleases
from collateral_sync_reference.custodian.pledges import Pledges
from collateral_sync_reference.custodian.redemptions import Redemptions
from collateral_sync_reference.custodian.refresh import HoldingsRefresh
from collateral_sync_reference.custodian.yield_accrual import YieldAccrual

__all__ = ["Custodian"]


class Custodian:
    """The reference custodian's parts, built on one ledger (the servicers are thin wrappers)."""

    def __init__(self, context: ServerContext, settings: CustodianSettings) -> None:
        self.ledger = ledger = Ledger(context, settings)
        # First: it brings the log and the database into step before anything else runs.
        self.attestation = Attestation(ledger)
        self.pledges = Pledges(ledger)
        self.pledge_releases = PledgeReleases(ledger)
        self.redemptions = Redemptions(ledger)
        self.yield_accrual = YieldAccrual(ledger)
        self.refresh = HoldingsRefresh(ledger)
        self.liquidations = Liquidations(ledger)
        self.stream = ExchangeStream(ledger, self.liquidations, context.config.sync)
        ledger._open_accounts()

    @property
    def exchanges(self) -> tuple[str, ...]:
        """The exchanges this custodian serves: the peers with an exchange key."""
        return self.ledger.exchanges

    @property
    def sessions(self) -> dict[str, SyncSession]:
        """The sync session of each exchange."""
        return self.stream.sessions

    def close(self) -> None:
        self.attestation.close()

    # ------------------------------------------------------------------ time-driven work

    def run_due(self) -> None:
        """Do the time-driven work that is due: settlements, each missed yield day, then a
        refresh sweep (last: an account the others just changed needs no refresh)."""
        now = self.ledger.clock.now()
        for redemption in self.ledger.store.due_redemptions(now):
            self.redemptions._settle(redemption, now)
        boundary = self.yield_accrual._last_yield_boundary() + timedelta(days=1)
        while boundary <= now:
            self.yield_accrual.accrue_yield(boundary, boundary=boundary)
            boundary += timedelta(days=1)
        if self.refresh.next_sweep() <= now:
            self.refresh.sweep()

    def next_due(self) -> datetime:
        """When :meth:`run_due` next has work (a settlement, the next yield time or sweep)."""
        due = min(
            self.yield_accrual._last_yield_boundary() + timedelta(days=1),
            self.refresh.next_sweep(),
        )
        settlement = self.ledger.store.next_settlement()
        return due if settlement is None else min(due, settlement)
