"""The custodian's tables: accounts and holdings, attested statements, checkpoints, and the
records of pledges, paths, redemptions, liquidations and what the exchange sent.

:class:`CustodianStore` is the interface the custodian uses; every write runs
inside the caller's :meth:`Storage.transaction`, so one operation's changes
commit together with its replay record and its sync-log entries.
:class:`SqliteCustodianStore` implements it on :class:`SqlStorage`.
Quantities are stored as canonical decimal text, times as integer
microseconds since the epoch, statements as their envelopes' bytes.

The tables are grouped by the part of the custodian that owns them, one
module a group, each with its records, its ``CREATE`` statements and
its SQL: ``accounts`` (accounts and holdings), ``attestation`` (attested
statements and checkpoints), ``pledges`` (pledges and liquidation paths),
``redemptions``, ``liquidations``, ``margin_calls`` and
``exchange_stream`` (credit lines, risk policies, rejected updates);
``_sql`` holds what they share.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from collateral_sync.v1 import envelope_pb2

from collateral_sync_reference.common.storage import SqlStorage
from collateral_sync_reference.custodian.store import (
    accounts,
    attestation,
    exchange_stream,
    liquidations,
    margin_calls,
    pledges,
    redemptions,
)
from collateral_sync_reference.custodian.store._sql import from_us, to_us
from collateral_sync_reference.custodian.store.accounts import Account, AccountTables, Holding
from collateral_sync_reference.custodian.store.attestation import (
    AttestationTables,
    StoredCheckpoint,
    StoredStatement,
)
from collateral_sync_reference.custodian.store.exchange_stream import (
    ExchangeStreamTables,
    RejectedUpdate,
)
from collateral_sync_reference.custodian.store.liquidations import (
    LiquidationRecord,
    LiquidationTables,
)
from collateral_sync_reference.custodian.store.margin_calls import (
    MarginCallRecord,
    MarginCallTables,
)
from collateral_sync_reference.custodian.store.pledges import PathRecord, PledgeTables
from collateral_sync_reference.custodian.store.redemptions import Redemption, RedemptionTables

__all__ = [
    "Account",
    "CustodianStore",
    "Holding",
    "LiquidationRecord",
    "MarginCallRecord",
    "PathRecord",
    "Redemption",
    "RejectedUpdate",
    "SqliteCustodianStore",
    "StoredCheckpoint",
    "StoredStatement",
    "from_us",
    "to_us",
]

# In the order the tables were always created.
_SCHEMA = (
    *accounts.SCHEMA,
    *attestation.SCHEMA,
    *pledges.SCHEMA,
    *redemptions.SCHEMA,
    *liquidations.SCHEMA,
    *margin_calls.SCHEMA,
    *exchange_stream.SCHEMA,
)


class CustodianStore(Protocol):
    """The custodian's state; writes run inside the storage's open transaction."""

    def account(self, account_id: str) -> Account | None: ...
    def account_ids(self) -> list[str]: ...
    def accounts_holding(self, asset_ids: Collection[str]) -> list[str]: ...
    def add_account(self, account: Account) -> None: ...
    def save_account(self, account: Account) -> None: ...

    def statement_count(self) -> int: ...
    def add_statement(self, statement: StoredStatement) -> None: ...
    def statement(self, leaf_index: int) -> StoredStatement | None: ...
    def latest_statement(self, account_id: str) -> StoredStatement | None: ...
    def statements_from(self, leaf_index: int) -> list[StoredStatement]: ...

    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None: ...
    def latest_checkpoint(self) -> StoredCheckpoint | None: ...
    def checkpoint_at(self, tree_size: int) -> StoredCheckpoint | None: ...

    def add_path(self, path: PathRecord) -> None: ...
    def path(self, statement_id: str) -> PathRecord | None: ...
    def paths_for(self, account_id: str, exchange_id: str) -> list[PathRecord]: ...
    def add_pledge(
        self, statement_id: str, account_id: str, asset_id: str, quantity: Decimal, payload: bytes
    ) -> None: ...

    def add_redemption(self, redemption: Redemption, payload: bytes) -> None: ...
    def redemption(self, redemption_id: str) -> Redemption | None: ...
    def due_redemptions(self, now: datetime) -> list[Redemption]: ...
    def next_settlement(self) -> datetime | None: ...
    def mark_settled(self, redemption_id: str) -> None: ...

    def liquidation(self, liquidation_id: str) -> LiquidationRecord | None: ...
    def add_liquidation(self, record: LiquidationRecord) -> None: ...
    def liquidation_count(self) -> int: ...

    def margin_call(self, margin_call_id: str) -> MarginCallRecord | None: ...
    def add_margin_call(self, record: MarginCallRecord) -> None: ...
    def set_margin_call_response(
        self, margin_call_id: str, kind: int, response: envelope_pb2.Envelope
    ) -> None: ...
    def answered_margin_calls(self) -> int: ...

    def put_credit_line(self, account_id: str, envelope: envelope_pb2.Envelope) -> None: ...
    def credit_line(self, account_id: str) -> envelope_pb2.Envelope | None: ...
    def put_risk_policy(self, version: int, envelope: envelope_pb2.Envelope) -> None: ...

    def add_rejected_update(self, update: RejectedUpdate) -> None: ...
    def rejected_updates(self, exchange_id: str) -> list[RejectedUpdate]: ...


class SqliteCustodianStore(
    AccountTables,
    AttestationTables,
    PledgeTables,
    RedemptionTables,
    LiquidationTables,
    MarginCallTables,
    ExchangeStreamTables,
):
    """:class:`CustodianStore` on the server's SQLite storage, one part a table group."""

    def __init__(self, storage: SqlStorage) -> None:
        storage.execute_schema("custodian", _SCHEMA)
        self._db = storage.connection
