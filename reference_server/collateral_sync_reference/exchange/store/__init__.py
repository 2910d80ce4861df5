"""The reference exchange's durable state, in SQLite, next to its position-sync log.

Everything the exchange knows lives in the server's one SQLite database
(WAL), on the same connection as its :class:`~collateral_sync.sync.SyncLog`,
so that a state change, the replay record of the statement that caused it and
the sync entries it sends commit in one transaction. This package is the only
place that writes the exchange's own SQL: reads may run anytime, writes only
inside an open transaction (``storage.transaction()`` or the sync session's
apply), which every write method checks.

The tables are grouped by the part of the exchange that owns them, one
module a group: :mod:`.policies`, :mod:`.accounts`, :mod:`.holdings` (with
the custodian's checkpoints and refused stream updates),
:mod:`.margin_calls`, :mod:`.liquidations` and :mod:`.pledge_releases`.

Signed statements are stored as the serialised ``Envelope`` exactly as
issued or received; amounts as canonical decimal text; times as integer
nanoseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

from collateral_sync_reference.common.storage import SqlStorage
from collateral_sync_reference.exchange.store import (
    accounts,
    holdings,
    liquidations,
    margin_calls,
    pledge_releases,
    policies,
)
from collateral_sync_reference.exchange.store.accounts import AccountRow, AccountTable
from collateral_sync_reference.exchange.store.holdings import (
    CheckpointEvidenceRow,
    CheckpointTable,
    HoldingsRow,
    HoldingsTable,
    RejectedUpdateTable,
)
from collateral_sync_reference.exchange.store.liquidations import LiquidationRow, LiquidationTable
from collateral_sync_reference.exchange.store.margin_calls import MarginCallRow, MarginCallTable
from collateral_sync_reference.exchange.store.pledge_releases import (
    ReleaseConsentRow,
    ReleaseConsentTable,
)
from collateral_sync_reference.exchange.store.policies import PolicyTable

__all__ = [
    "AccountRow",
    "CheckpointEvidenceRow",
    "ExchangeStore",
    "HoldingsRow",
    "LiquidationRow",
    "MarginCallRow",
    "ReleaseConsentRow",
]


class ExchangeStore:
    """The exchange's tables in the server's SQLite storage (the role store of this engine).

    Statement counters, the replay guard, the clock offset and the sync logs
    are the storage's own (:class:`~collateral_sync_reference.common.storage.SqlStorage`).
    """

    def __init__(self, storage: SqlStorage) -> None:
        storage.execute_schema(
            "exchange",
            (
                *policies.SCHEMA,
                *accounts.SCHEMA,
                *holdings.SCHEMA,
                *margin_calls.SCHEMA,
                *liquidations.SCHEMA,
            )
        )
        # Added after version 1 of the tables above: its own component, so that
        # a database made before it gains the table at start.
        storage.execute_schema("exchange.pledge_releases", pledge_releases.SCHEMA)
        db = storage.connection
        self.policies = PolicyTable(db)
        self.accounts = AccountTable(db)
        self.holdings = HoldingsTable(db)
        self.checkpoints = CheckpointTable(db)
        self.rejected_updates = RejectedUpdateTable(db)
        self.margin_calls = MarginCallTable(db)
        self.liquidations = LiquidationTable(db)
        self.release_consents = ReleaseConsentTable(db)
