"""The custodian's tables: accounts and holdings, attested statements, checkpoints, and the
records of pledges, paths, redemptions, liquidations and what the exchange sent.

:class:`CustodianStore` is the interface the custodian uses; every write runs
inside the caller's :meth:`Storage.transaction`, so one operation's changes
commit together with its replay record and its sync-log entries.
:class:`SqliteCustodianStore` implements it on :class:`SqliteStorage`.
Quantities are stored as canonical decimal text, times as integer
microseconds since the epoch, statements as their envelopes' bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import attestation_pb2, envelope_pb2

from collateral_sync_reference.common.storage import SqliteStorage

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

_ZERO = Decimal(0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


@dataclass(slots=True)
class Holding:
    """One asset of one account. ``accrued_yield`` is part of ``quantity`` and never pledged."""

    asset_id: str
    quantity: Decimal = _ZERO
    locked: Decimal = _ZERO
    pledged: Decimal = _ZERO
    accrued_yield: Decimal = _ZERO

    def is_empty(self) -> bool:
        return not (self.quantity or self.locked or self.pledged or self.accrued_yield)


@dataclass(slots=True)
class Account:
    account_id: str
    client_id: str
    #: The exchange the account pledges to; "" while it pledges to none.
    exchange_id: str
    #: Epoch of the latest holdings statement (0: none yet).
    epoch: int
    holdings: dict[str, Holding] = field(default_factory=dict)

    def holding(self, asset_id: str) -> Holding:
        """The account's holding of ``asset_id``, created empty if absent."""
        found = self.holdings.get(asset_id)
        if found is None:
            found = self.holdings[asset_id] = Holding(asset_id)
        return found


@dataclass(frozen=True, slots=True)
class StoredStatement:
    """A holdings statement we issued: one leaf of the attestation log."""

    leaf_index: int
    account_id: str
    epoch: int
    reason: int
    envelope: envelope_pb2.Envelope
    attestation: attestation_pb2.AttestationRef
    #: The last statement of its operation: a checkpoint is signed at leaf_index + 1.
    checkpoint_after: bool
    #: Found in the log after a crash without its database record (never announced).
    orphan: bool = False


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    tree_size: int
    envelope: envelope_pb2.Envelope
    issued_at: datetime


@dataclass(frozen=True, slots=True)
class PathRecord:
    statement_id: str
    account_id: str
    exchange_id: str
    recorded_at: datetime
    #: The client's LiquidationPath envelope, with our countersignature appended.
    envelope: envelope_pb2.Envelope


@dataclass(frozen=True, slots=True)
class Redemption:
    redemption_id: str
    account_id: str
    asset_id: str
    quantity: Decimal
    settle_at: datetime
    settled: bool = False


@dataclass(frozen=True, slots=True)
class LiquidationRecord:
    liquidation_id: str
    account_id: str
    #: Payload of the instruction executed, to tell a repeat from a conflicting reuse of the id.
    instruction_payload: bytes
    receipt: envelope_pb2.Envelope


@dataclass(frozen=True, slots=True)
class MarginCallRecord:
    margin_call_id: str
    account_id: str
    envelope: envelope_pb2.Envelope
    due_by: datetime
    #: MarginCallResponseKind of our answer (0: not answered).
    response_kind: int = 0
    response: envelope_pb2.Envelope | None = None


@dataclass(frozen=True, slots=True)
class RejectedUpdate:
    """An exchange's stream update recorded as rejected instead of applied."""

    exchange_id: str
    sync_sequence: int
    #: The PositionUpdate variant, e.g. "liquidation_instruction".
    kind: str
    #: ErrorReason name of the refusal.
    reason: str
    detail: str
    #: The update's envelope, as received.
    envelope: envelope_pb2.Envelope
    rejected_at: datetime


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


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_accounts (
        account_id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        exchange_id TEXT NOT NULL,
        epoch INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_holdings (
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        quantity TEXT NOT NULL,
        locked TEXT NOT NULL,
        pledged TEXT NOT NULL,
        accrued_yield TEXT NOT NULL,
        PRIMARY KEY (account_id, asset_id)
    )""",
    "CREATE INDEX IF NOT EXISTS custodian_holdings_asset ON custodian_holdings (asset_id)",
    """CREATE TABLE IF NOT EXISTS custodian_statements (
        leaf_index INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        reason INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        attestation BLOB NOT NULL,
        checkpoint_after INTEGER NOT NULL,
        orphan INTEGER NOT NULL
    )""",
    """CREATE INDEX IF NOT EXISTS custodian_statements_account
        ON custodian_statements (account_id, leaf_index)""",
    """CREATE TABLE IF NOT EXISTS custodian_checkpoints (
        id INTEGER PRIMARY KEY,
        tree_size INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        issued_at_us INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS custodian_checkpoints_size ON custodian_checkpoints (tree_size)",
    """CREATE TABLE IF NOT EXISTS custodian_paths (
        statement_id TEXT PRIMARY KEY,
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
    """CREATE TABLE IF NOT EXISTS custodian_redemptions (
        redemption_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        quantity TEXT NOT NULL,
        settle_at_us INTEGER NOT NULL,
        settled INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_liquidations (
        liquidation_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        instruction_payload BLOB NOT NULL,
        receipt BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_margin_calls (
        margin_call_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        envelope BLOB NOT NULL,
        due_by_us INTEGER NOT NULL,
        response_kind INTEGER NOT NULL,
        response BLOB
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_credit_lines (
        account_id TEXT PRIMARY KEY,
        envelope BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS custodian_risk_policies (
        version INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL
    )""",
    # Stream updates whose statement verified but that asked for something we
    # cannot do (PROTOCOL.md §6.5): kept with the reason, never applied.
    """CREATE TABLE IF NOT EXISTS custodian_rejected_updates (
        id INTEGER PRIMARY KEY,
        exchange_id TEXT NOT NULL,
        sync_sequence INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        payload BLOB NOT NULL,
        rejected_at_us INTEGER NOT NULL
    )""",
)


def _envelope(data: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(bytes(data))


class SqliteCustodianStore:
    """:class:`CustodianStore` on the server's SQLite storage."""

    def __init__(self, storage: SqliteStorage) -> None:
        storage.execute_schema(_SCHEMA)
        self._db = storage.connection

    # -- accounts --

    def account(self, account_id: str) -> Account | None:
        row = self._db.execute(
            "SELECT client_id, exchange_id, epoch FROM custodian_accounts WHERE account_id = ?",
            (account_id,),
        ).fetchone()
        if row is None:
            return None
        account = Account(account_id, row[0], row[1], row[2])
        for asset_id, quantity, locked, pledged, accrued in self._db.execute(
            "SELECT asset_id, quantity, locked, pledged, accrued_yield FROM custodian_holdings "
            "WHERE account_id = ? ORDER BY asset_id",
            (account_id,),
        ):
            account.holdings[asset_id] = Holding(
                asset_id,
                parse_amount(quantity),
                parse_amount(locked),
                parse_amount(pledged),
                parse_amount(accrued),
            )
        return account

    def account_ids(self) -> list[str]:
        rows = self._db.execute("SELECT account_id FROM custodian_accounts ORDER BY account_id")
        return [row[0] for row in rows]

    def accounts_holding(self, asset_ids: Collection[str]) -> list[str]:
        if not asset_ids:
            return []
        marks = ",".join("?" * len(asset_ids))
        rows = self._db.execute(
            f"SELECT DISTINCT account_id FROM custodian_holdings WHERE asset_id IN ({marks}) "  # noqa: S608 (only placeholders)
            "AND quantity != '0' ORDER BY account_id",
            tuple(asset_ids),
        )
        return [row[0] for row in rows]

    def add_account(self, account: Account) -> None:
        self._db.execute(
            "INSERT INTO custodian_accounts VALUES (?, ?, ?, ?)",
            (account.account_id, account.client_id, account.exchange_id, account.epoch),
        )
        self._write_holdings(account)

    def save_account(self, account: Account) -> None:
        self._db.execute(
            "UPDATE custodian_accounts SET exchange_id = ?, epoch = ? WHERE account_id = ?",
            (account.exchange_id, account.epoch, account.account_id),
        )
        self._db.execute(
            "DELETE FROM custodian_holdings WHERE account_id = ?", (account.account_id,)
        )
        self._write_holdings(account)

    def _write_holdings(self, account: Account) -> None:
        self._db.executemany(
            "INSERT INTO custodian_holdings VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    account.account_id,
                    h.asset_id,
                    format_amount(h.quantity),
                    format_amount(h.locked),
                    format_amount(h.pledged),
                    format_amount(h.accrued_yield),
                )
                for h in account.holdings.values()
                if not h.is_empty()
            ],
        )

    # -- attested statements --

    def statement_count(self) -> int:
        row = self._db.execute("SELECT MAX(leaf_index) FROM custodian_statements").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def add_statement(self, statement: StoredStatement) -> None:
        self._db.execute(
            "INSERT INTO custodian_statements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                statement.leaf_index,
                statement.account_id,
                statement.epoch,
                statement.reason,
                statement.envelope.SerializeToString(),
                statement.attestation.SerializeToString(),
                int(statement.checkpoint_after),
                int(statement.orphan),
            ),
        )

    _STATEMENT_COLUMNS = (
        "leaf_index, account_id, epoch, reason, envelope, attestation, checkpoint_after, orphan"
    )

    def _statement(self, row: Any) -> StoredStatement | None:
        if row is None:
            return None
        index, account_id, epoch, reason, envelope, attestation, after, orphan = row
        return StoredStatement(
            leaf_index=int(index),
            account_id=str(account_id),
            epoch=int(epoch),
            reason=int(reason),
            envelope=_envelope(envelope),
            attestation=attestation_pb2.AttestationRef.FromString(bytes(attestation)),
            checkpoint_after=bool(after),
            orphan=bool(orphan),
        )

    def statement(self, leaf_index: int) -> StoredStatement | None:
        row = self._db.execute(
            f"SELECT {self._STATEMENT_COLUMNS} FROM custodian_statements WHERE leaf_index = ?",  # noqa: S608 (constant)
            (leaf_index,),
        ).fetchone()
        return self._statement(row)

    def latest_statement(self, account_id: str) -> StoredStatement | None:
        row = self._db.execute(
            f"SELECT {self._STATEMENT_COLUMNS} FROM custodian_statements "  # noqa: S608 (constant)
            "WHERE account_id = ? AND orphan = 0 ORDER BY leaf_index DESC LIMIT 1",
            (account_id,),
        ).fetchone()
        return self._statement(row)

    def statements_from(self, leaf_index: int) -> list[StoredStatement]:
        rows = self._db.execute(
            f"SELECT {self._STATEMENT_COLUMNS} FROM custodian_statements "  # noqa: S608 (constant)
            "WHERE leaf_index >= ? ORDER BY leaf_index",
            (leaf_index,),
        ).fetchall()
        return [s for s in map(self._statement, rows) if s is not None]

    # -- checkpoints --

    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        self._db.execute(
            "INSERT INTO custodian_checkpoints (tree_size, envelope, issued_at_us) VALUES (?, ?, ?)",
            (
                checkpoint.tree_size,
                checkpoint.envelope.SerializeToString(),
                to_us(checkpoint.issued_at),
            ),
        )

    def _checkpoint(self, where: str, parameters: tuple[int, ...]) -> StoredCheckpoint | None:
        row = self._db.execute(
            "SELECT tree_size, envelope, issued_at_us FROM custodian_checkpoints "  # noqa: S608 (callers pass constants)
            f"{where} ORDER BY id DESC LIMIT 1",
            parameters,
        ).fetchone()
        if row is None:
            return None
        return StoredCheckpoint(int(row[0]), _envelope(row[1]), from_us(row[2]))

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        return self._checkpoint("", ())

    def checkpoint_at(self, tree_size: int) -> StoredCheckpoint | None:
        return self._checkpoint("WHERE tree_size = ?", (tree_size,))

    # -- pledges and paths --

    def add_path(self, path: PathRecord) -> None:
        self._db.execute(
            "INSERT INTO custodian_paths VALUES (?, ?, ?, ?, ?)",
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
            PathRecord(statement_id, account_id, exchange_id, from_us(at), _envelope(envelope))
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
            "ORDER BY recorded_at_us, rowid",
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

    # -- redemptions --

    def add_redemption(self, redemption: Redemption, payload: bytes) -> None:
        self._db.execute(
            "INSERT INTO custodian_redemptions VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                redemption.redemption_id,
                redemption.account_id,
                redemption.asset_id,
                format_amount(redemption.quantity),
                to_us(redemption.settle_at),
                int(redemption.settled),
                payload,
            ),
        )

    def _redemptions(self, where: str, parameters: tuple[object, ...]) -> list[Redemption]:
        rows = self._db.execute(
            "SELECT redemption_id, account_id, asset_id, quantity, settle_at_us, settled "  # noqa: S608 (callers pass constants)
            f"FROM custodian_redemptions {where} ORDER BY settle_at_us, redemption_id",
            parameters,
        ).fetchall()
        return [
            Redemption(rid, account, asset, parse_amount(quantity), from_us(at), bool(settled))
            for rid, account, asset, quantity, at, settled in rows
        ]

    def redemption(self, redemption_id: str) -> Redemption | None:
        found = self._redemptions("WHERE redemption_id = ?", (redemption_id,))
        return found[0] if found else None

    def due_redemptions(self, now: datetime) -> list[Redemption]:
        return self._redemptions("WHERE settled = 0 AND settle_at_us <= ?", (to_us(now),))

    def next_settlement(self) -> datetime | None:
        row = self._db.execute(
            "SELECT MIN(settle_at_us) FROM custodian_redemptions WHERE settled = 0"
        ).fetchone()
        return None if row[0] is None else from_us(row[0])

    def mark_settled(self, redemption_id: str) -> None:
        self._db.execute(
            "UPDATE custodian_redemptions SET settled = 1 WHERE redemption_id = ?",
            (redemption_id,),
        )

    # -- liquidations --

    def liquidation(self, liquidation_id: str) -> LiquidationRecord | None:
        row = self._db.execute(
            "SELECT account_id, instruction_payload, receipt FROM custodian_liquidations "
            "WHERE liquidation_id = ?",
            (liquidation_id,),
        ).fetchone()
        if row is None:
            return None
        return LiquidationRecord(liquidation_id, row[0], bytes(row[1]), _envelope(row[2]))

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

    # -- what the exchange sent --

    def margin_call(self, margin_call_id: str) -> MarginCallRecord | None:
        row = self._db.execute(
            "SELECT account_id, envelope, due_by_us, response_kind, response "
            "FROM custodian_margin_calls WHERE margin_call_id = ?",
            (margin_call_id,),
        ).fetchone()
        if row is None:
            return None
        return MarginCallRecord(
            margin_call_id,
            row[0],
            _envelope(row[1]),
            from_us(row[2]),
            int(row[3]),
            None if row[4] is None else _envelope(row[4]),
        )

    def add_margin_call(self, record: MarginCallRecord) -> None:
        self._db.execute(
            "INSERT INTO custodian_margin_calls VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.margin_call_id,
                record.account_id,
                record.envelope.SerializeToString(),
                to_us(record.due_by),
                record.response_kind,
                None if record.response is None else record.response.SerializeToString(),
            ),
        )

    def set_margin_call_response(
        self, margin_call_id: str, kind: int, response: envelope_pb2.Envelope
    ) -> None:
        self._db.execute(
            "UPDATE custodian_margin_calls SET response_kind = ?, response = ? "
            "WHERE margin_call_id = ?",
            (kind, response.SerializeToString(), margin_call_id),
        )

    def answered_margin_calls(self) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM custodian_margin_calls WHERE response_kind != 0"
        ).fetchone()
        return int(row[0])

    def put_credit_line(self, account_id: str, envelope: envelope_pb2.Envelope) -> None:
        self._db.execute(
            "INSERT INTO custodian_credit_lines VALUES (?, ?) "
            "ON CONFLICT (account_id) DO UPDATE SET envelope = excluded.envelope",
            (account_id, envelope.SerializeToString()),
        )

    def credit_line(self, account_id: str) -> envelope_pb2.Envelope | None:
        row = self._db.execute(
            "SELECT envelope FROM custodian_credit_lines WHERE account_id = ?", (account_id,)
        ).fetchone()
        return None if row is None else _envelope(row[0])

    def put_risk_policy(self, version: int, envelope: envelope_pb2.Envelope) -> None:
        self._db.execute(
            "INSERT INTO custodian_risk_policies VALUES (?, ?) "
            "ON CONFLICT (version) DO UPDATE SET envelope = excluded.envelope",
            (version, envelope.SerializeToString()),
        )

    def add_rejected_update(self, update: RejectedUpdate) -> None:
        self._db.execute(
            "INSERT INTO custodian_rejected_updates (exchange_id, sync_sequence, kind, reason, "
            "detail, payload, rejected_at_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                update.exchange_id,
                update.sync_sequence,
                update.kind,
                update.reason,
                update.detail,
                update.envelope.SerializeToString(),
                to_us(update.rejected_at),
            ),
        )

    def rejected_updates(self, exchange_id: str) -> list[RejectedUpdate]:
        """The updates of ``exchange_id`` recorded as rejected, in stream order."""
        rows = self._db.execute(
            "SELECT sync_sequence, kind, reason, detail, payload, rejected_at_us "
            "FROM custodian_rejected_updates WHERE exchange_id = ? ORDER BY id",
            (exchange_id,),
        ).fetchall()
        return [
            RejectedUpdate(
                exchange_id, row[0], row[1], row[2], row[3], _envelope(row[4]), from_us(row[5])
            )
            for row in rows
        ]
