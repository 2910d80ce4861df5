"""The reference exchange's durable state, in SQLite, next to its position-sync log.

Everything the exchange knows lives in the server's one SQLite database
(WAL), on the same connection as its :class:`~collateral_sync.sync.SyncLog`,
so that a state change, the replay record of the statement that caused it and
the sync entries it sends commit in one transaction. This module is the only
place that writes the exchange's own SQL: reads may run anytime, writes only
inside an open transaction (``storage.transaction()`` or the sync session's
apply), which every write method checks.

Signed statements are stored as the serialised ``Envelope`` exactly as
issued or received; amounts as canonical decimal text; times as integer
nanoseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.v1 import attestation_pb2, envelope_pb2

from collateral_sync_reference.common.storage import SqliteStorage

__all__ = [
    "AccountRow",
    "ExchangeStore",
    "HoldingsRow",
    "LiquidationRow",
    "MarginCallRow",
]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_policies (
        version INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        content_key BLOB NOT NULL,
        published_at_ns INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_accounts (
        account_id TEXT PRIMARY KEY,
        exposure TEXT NOT NULL DEFAULT '0',
        profit TEXT NOT NULL DEFAULT '0',
        credited_holdings_id INTEGER,
        credit_line BLOB,
        credit_key BLOB
    )""",
    # Every holdings statement received, with what became of it: 'pending'
    # until its attestation is checked, then 'credited' or 'rejected'.
    """CREATE TABLE IF NOT EXISTS exchange_holdings (
        id INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        exchange_id TEXT NOT NULL,
        envelope BLOB NOT NULL,
        attestation BLOB NOT NULL,
        sync_sequence INTEGER NOT NULL,
        received_at_ns INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',
        decided_at_ns INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS exchange_holdings_status ON exchange_holdings (status, id)",
    "CREATE INDEX IF NOT EXISTS exchange_holdings_account ON exchange_holdings (account_id, id)",
    """CREATE TABLE IF NOT EXISTS exchange_pledge_changes (
        id INTEGER PRIMARY KEY,
        sync_sequence INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        pledged_quantity TEXT NOT NULL,
        attestation BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_yield_accruals (
        id INTEGER PRIMARY KEY,
        sync_sequence INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        accrued_quantity TEXT NOT NULL,
        accrual_time_ns INTEGER NOT NULL,
        attestation BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_margin_calls (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        margin_call_id TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        call_amount TEXT NOT NULL,
        agreed_amount TEXT NOT NULL,
        satisfied_amount TEXT NOT NULL,
        collateral_value TEXT NOT NULL,
        exposure TEXT NOT NULL,
        holdings_epoch INTEGER NOT NULL,
        issued_at_ns INTEGER NOT NULL,
        due_by_ns INTEGER NOT NULL,
        updated_at_ns INTEGER NOT NULL,
        call_envelope BLOB NOT NULL,
        state_envelope BLOB NOT NULL,
        response_envelope BLOB
    )""",
    "CREATE INDEX IF NOT EXISTS exchange_margin_calls_account ON exchange_margin_calls "
    "(account_id, seq)",
    # Every MarginCallState published, oldest first: the call's signed history.
    """CREATE TABLE IF NOT EXISTS exchange_margin_call_states (
        id INTEGER PRIMARY KEY,
        margin_call_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        envelope BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_liquidations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        liquidation_id TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        margin_call_id TEXT NOT NULL,
        amount TEXT NOT NULL,
        liquidation_path_id TEXT NOT NULL,
        instruction BLOB NOT NULL,
        instructed_at_ns INTEGER NOT NULL,
        status TEXT NOT NULL,
        receipt BLOB,
        total_proceeds TEXT,
        shortfall TEXT,
        allocation BLOB,
        executed_at_ns INTEGER,
        refusal_reason TEXT,
        refusal_detail TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_liquidation_paths (
        account_id TEXT PRIMARY KEY,
        liquidation_path_id TEXT NOT NULL
    )""",
    # The last checkpoint of the custodian's log this exchange trusts (§5.6).
    """CREATE TABLE IF NOT EXISTS exchange_checkpoints (
        origin TEXT PRIMARY KEY,
        envelope BLOB NOT NULL,
        tree_size INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_checkpoint_evidence (
        id INTEGER PRIMARY KEY,
        origin TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        held BLOB,
        received BLOB NOT NULL,
        proof BLOB,
        detected_at_ns INTEGER NOT NULL
    )""",
    # Stream updates refused for what they ask rather than for their
    # signature (e.g. a response to an expired call): kept, not applied.
    """CREATE TABLE IF NOT EXISTS exchange_rejected_updates (
        id INTEGER PRIMARY KEY,
        sync_sequence INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        payload BLOB NOT NULL,
        rejected_at_ns INTEGER NOT NULL
    )""",
)


@dataclass(frozen=True, slots=True)
class AccountRow:
    account_id: str
    exposure: Decimal
    profit: Decimal
    credited_holdings_id: int | None
    credit_line: envelope_pb2.Envelope | None
    credit_key: bytes | None


@dataclass(frozen=True, slots=True)
class HoldingsRow:
    id: int
    account_id: str
    epoch: int
    exchange_id: str
    envelope: envelope_pb2.Envelope
    attestation: attestation_pb2.AttestationRef
    sync_sequence: int
    received_at_ns: int
    status: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class MarginCallRow:
    seq: int
    margin_call_id: str
    account_id: str
    status: int
    call_amount: Decimal
    agreed_amount: Decimal
    satisfied_amount: Decimal
    collateral_value: Decimal
    exposure: Decimal
    holdings_epoch: int
    issued_at_ns: int
    due_by_ns: int
    updated_at_ns: int
    call_envelope: envelope_pb2.Envelope
    state_envelope: envelope_pb2.Envelope
    response_envelope: envelope_pb2.Envelope | None


@dataclass(frozen=True, slots=True)
class LiquidationRow:
    seq: int
    liquidation_id: str
    account_id: str
    margin_call_id: str
    amount: Decimal
    liquidation_path_id: str
    instruction: envelope_pb2.Envelope
    instructed_at_ns: int
    status: str
    receipt: envelope_pb2.Envelope | None
    total_proceeds: Decimal | None
    shortfall: Decimal | None
    allocation: envelope_pb2.Envelope | None
    refusal_reason: str | None
    refusal_detail: str | None


def _envelope(data: bytes | None) -> envelope_pb2.Envelope | None:
    return None if data is None else envelope_pb2.Envelope.FromString(data)


def _required_envelope(data: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(data)


def _amount(text: str | None) -> Decimal | None:
    return None if text is None else parse_amount(text)


_MARGIN_COLUMNS = (
    "seq, margin_call_id, account_id, status, call_amount, agreed_amount, satisfied_amount, "
    "collateral_value, exposure, holdings_epoch, issued_at_ns, due_by_ns, updated_at_ns, "
    "call_envelope, state_envelope, response_envelope"
)
_LIQUIDATION_COLUMNS = (
    "seq, liquidation_id, account_id, margin_call_id, amount, liquidation_path_id, instruction, "
    "instructed_at_ns, status, receipt, total_proceeds, shortfall, allocation, refusal_reason, "
    "refusal_detail"
)
_HOLDINGS_COLUMNS = (
    "id, account_id, epoch, exchange_id, envelope, attestation, sync_sequence, received_at_ns, "
    "status, reason, detail"
)


class ExchangeStore:
    """The exchange's tables in the server's SQLite storage (the role store of this engine).

    Statement counters, the replay guard, the clock offset and the sync logs
    are the storage's own (:class:`~collateral_sync_reference.common.storage.SqliteStorage`).
    """

    def __init__(self, storage: SqliteStorage) -> None:
        storage.execute_schema(_SCHEMA)
        self._db = storage.connection

    def _write(self, sql: str, parameters: Iterable[Any] = ()) -> sqlite3.Cursor:
        if not self._db.in_transaction:
            raise RuntimeError("exchange state is written only inside an open transaction")
        return self._db.execute(sql, tuple(parameters))

    def _one(self, sql: str, parameters: Iterable[Any] = ()) -> Any:
        return self._db.execute(sql, tuple(parameters)).fetchone()

    # -- risk policies --

    def add_policy(
        self, version: int, envelope: envelope_pb2.Envelope, content_key: bytes, at_ns: int
    ) -> None:
        self._write(
            "INSERT INTO exchange_policies VALUES (?, ?, ?, ?)",
            (version, envelope.SerializeToString(), content_key, at_ns),
        )

    def replace_policy_envelope(self, version: int, envelope: envelope_pb2.Envelope) -> None:
        """Store a re-signed envelope of the same version (same content, fresh lifetime)."""
        self._write(
            "UPDATE exchange_policies SET envelope = ? WHERE version = ?",
            (envelope.SerializeToString(), version),
        )

    def policy(self, version: int) -> envelope_pb2.Envelope | None:
        row = self._one("SELECT envelope FROM exchange_policies WHERE version = ?", (version,))
        return None if row is None else _required_envelope(row[0])

    def latest_policy(self) -> tuple[int, envelope_pb2.Envelope, bytes] | None:
        """(version, envelope, content key) of the policy in force, or None."""
        row = self._one(
            "SELECT version, envelope, content_key FROM exchange_policies "
            "ORDER BY version DESC LIMIT 1"
        )
        return None if row is None else (int(row[0]), _required_envelope(row[1]), bytes(row[2]))

    # -- accounts --

    def ensure_account(self, account_id: str) -> None:
        self._write(
            "INSERT INTO exchange_accounts (account_id) VALUES (?) ON CONFLICT DO NOTHING",
            (account_id,),
        )

    def account(self, account_id: str) -> AccountRow | None:
        row = self._one(
            "SELECT account_id, exposure, profit, credited_holdings_id, credit_line, credit_key "
            "FROM exchange_accounts WHERE account_id = ?",
            (account_id,),
        )
        if row is None:
            return None
        return AccountRow(
            account_id=row[0],
            exposure=parse_amount(row[1]),
            profit=parse_amount(row[2]),
            credited_holdings_id=row[3],
            credit_line=_envelope(row[4]),
            credit_key=None if row[5] is None else bytes(row[5]),
        )

    def account_ids(self) -> list[str]:
        rows = self._db.execute(
            "SELECT account_id FROM exchange_accounts ORDER BY account_id"
        ).fetchall()
        return [row[0] for row in rows]

    def set_exposure(self, account_id: str, exposure: Decimal) -> None:
        self.ensure_account(account_id)
        self._write(
            "UPDATE exchange_accounts SET exposure = ? WHERE account_id = ?",
            (format_amount(exposure), account_id),
        )

    def set_profit(self, account_id: str, profit: Decimal) -> None:
        self.ensure_account(account_id)
        self._write(
            "UPDATE exchange_accounts SET profit = ? WHERE account_id = ?",
            (format_amount(profit), account_id),
        )

    def set_credited_holdings(self, account_id: str, holdings_id: int) -> None:
        self.ensure_account(account_id)
        self._write(
            "UPDATE exchange_accounts SET credited_holdings_id = ? WHERE account_id = ?",
            (holdings_id, account_id),
        )

    def set_credit_line(
        self, account_id: str, envelope: envelope_pb2.Envelope, credit_key: bytes
    ) -> None:
        self._write(
            "UPDATE exchange_accounts SET credit_line = ?, credit_key = ? WHERE account_id = ?",
            (envelope.SerializeToString(), credit_key, account_id),
        )

    # -- holdings statements --

    def add_holdings(
        self,
        *,
        account_id: str,
        epoch: int,
        exchange_id: str,
        envelope: envelope_pb2.Envelope,
        attestation: attestation_pb2.AttestationRef,
        sync_sequence: int,
        received_at_ns: int,
    ) -> int:
        cursor = self._write(
            "INSERT INTO exchange_holdings (account_id, epoch, exchange_id, envelope, attestation, "
            "sync_sequence, received_at_ns, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
            (
                account_id,
                epoch,
                exchange_id,
                envelope.SerializeToString(),
                attestation.SerializeToString(),
                sync_sequence,
                received_at_ns,
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def decide_holdings(
        self, holdings_id: int, *, status: str, reason: str, detail: str, at_ns: int
    ) -> None:
        if status not in ("credited", "rejected"):
            raise ValueError(f"expected status credited or rejected, got {status!r}")
        self._write(
            "UPDATE exchange_holdings SET status = ?, reason = ?, detail = ?, decided_at_ns = ? "
            "WHERE id = ? AND status = 'pending'",
            (status, reason, detail, at_ns, holdings_id),
        )

    def holdings(self, holdings_id: int) -> HoldingsRow | None:
        row = self._one(
            f"SELECT {_HOLDINGS_COLUMNS} FROM exchange_holdings WHERE id = ?",  # noqa: S608
            (holdings_id,),
        )
        return None if row is None else _holdings_row(row)

    def pending_holdings(self) -> list[HoldingsRow]:
        rows = self._db.execute(
            f"SELECT {_HOLDINGS_COLUMNS} FROM exchange_holdings "  # noqa: S608
            "WHERE status = 'pending' ORDER BY id"
        ).fetchall()
        return [_holdings_row(row) for row in rows]

    def holdings_of(self, account_id: str) -> list[HoldingsRow]:
        """Every holdings statement received for an account, oldest first."""
        rows = self._db.execute(
            f"SELECT {_HOLDINGS_COLUMNS} FROM exchange_holdings "  # noqa: S608
            "WHERE account_id = ? ORDER BY id",
            (account_id,),
        ).fetchall()
        return [_holdings_row(row) for row in rows]

    def max_holdings_epoch(self, account_id: str) -> int:
        """Highest epoch received for an account (any status); 0 if none."""
        row = self._one(
            "SELECT MAX(epoch) FROM exchange_holdings WHERE account_id = ?", (account_id,)
        )
        return 0 if row is None or row[0] is None else int(row[0])

    # -- pledges and yield (recorded; credit follows the attested holdings) --

    def add_pledge_change(
        self,
        *,
        sync_sequence: int,
        account_id: str,
        asset_id: str,
        pledged_quantity: str,
        attestation: attestation_pb2.AttestationRef,
    ) -> None:
        self._write(
            "INSERT INTO exchange_pledge_changes (sync_sequence, account_id, asset_id, "
            "pledged_quantity, attestation) VALUES (?, ?, ?, ?, ?)",
            (
                sync_sequence,
                account_id,
                asset_id,
                pledged_quantity,
                attestation.SerializeToString(),
            ),
        )

    def add_yield_accrual(
        self,
        *,
        sync_sequence: int,
        account_id: str,
        asset_id: str,
        accrued_quantity: str,
        accrual_time_ns: int,
        attestation: attestation_pb2.AttestationRef,
    ) -> None:
        self._write(
            "INSERT INTO exchange_yield_accruals (sync_sequence, account_id, asset_id, "
            "accrued_quantity, accrual_time_ns, attestation) VALUES (?, ?, ?, ?, ?, ?)",
            (
                sync_sequence,
                account_id,
                asset_id,
                accrued_quantity,
                accrual_time_ns,
                attestation.SerializeToString(),
            ),
        )

    def pledge_changes(self, account_id: str) -> list[tuple[str, str]]:
        """(asset id, pledged quantity) of each pledge change of an account, oldest first."""
        rows = self._db.execute(
            "SELECT asset_id, pledged_quantity FROM exchange_pledge_changes "
            "WHERE account_id = ? ORDER BY id",
            (account_id,),
        ).fetchall()
        return [(row[0], row[1]) for row in rows]

    def yield_accruals(self, account_id: str) -> list[tuple[str, str]]:
        """(asset id, accrued quantity) of each accrual of an account, oldest first."""
        rows = self._db.execute(
            "SELECT asset_id, accrued_quantity FROM exchange_yield_accruals "
            "WHERE account_id = ? ORDER BY id",
            (account_id,),
        ).fetchall()
        return [(row[0], row[1]) for row in rows]

    # -- margin calls --

    def add_margin_call(
        self,
        *,
        margin_call_id: str,
        account_id: str,
        status: int,
        call_amount: Decimal,
        collateral_value: Decimal,
        exposure: Decimal,
        holdings_epoch: int,
        issued_at_ns: int,
        due_by_ns: int,
        call_envelope: envelope_pb2.Envelope,
        state_envelope: envelope_pb2.Envelope,
    ) -> None:
        self._write(
            "INSERT INTO exchange_margin_calls (margin_call_id, account_id, status, call_amount, "
            "agreed_amount, satisfied_amount, collateral_value, exposure, holdings_epoch, "
            "issued_at_ns, due_by_ns, updated_at_ns, call_envelope, state_envelope) "
            "VALUES (?, ?, ?, ?, '0', '0', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                margin_call_id,
                account_id,
                status,
                format_amount(call_amount),
                format_amount(collateral_value),
                format_amount(exposure),
                holdings_epoch,
                issued_at_ns,
                due_by_ns,
                issued_at_ns,
                call_envelope.SerializeToString(),
                state_envelope.SerializeToString(),
            ),
        )
        self._add_state(margin_call_id, status, state_envelope)

    def update_margin_call(
        self,
        margin_call_id: str,
        *,
        status: int,
        agreed_amount: Decimal,
        satisfied_amount: Decimal,
        updated_at_ns: int,
        state_envelope: envelope_pb2.Envelope,
        response_envelope: envelope_pb2.Envelope | None = None,
    ) -> None:
        self._write(
            "UPDATE exchange_margin_calls SET status = ?, agreed_amount = ?, satisfied_amount = ?, "
            "updated_at_ns = ?, state_envelope = ?, "
            "response_envelope = COALESCE(?, response_envelope) WHERE margin_call_id = ?",
            (
                status,
                format_amount(agreed_amount),
                format_amount(satisfied_amount),
                updated_at_ns,
                state_envelope.SerializeToString(),
                None if response_envelope is None else response_envelope.SerializeToString(),
                margin_call_id,
            ),
        )
        self._add_state(margin_call_id, status, state_envelope)

    def refresh_margin_call_state(
        self, margin_call_id: str, state_envelope: envelope_pb2.Envelope
    ) -> None:
        """Store a re-signed state of an unchanged call (a fresh lifetime, same content)."""
        self._write(
            "UPDATE exchange_margin_calls SET state_envelope = ? WHERE margin_call_id = ?",
            (state_envelope.SerializeToString(), margin_call_id),
        )

    def _add_state(
        self, margin_call_id: str, status: int, state_envelope: envelope_pb2.Envelope
    ) -> None:
        self._write(
            "INSERT INTO exchange_margin_call_states (margin_call_id, status, envelope) "
            "VALUES (?, ?, ?)",
            (margin_call_id, status, state_envelope.SerializeToString()),
        )

    def margin_call(self, margin_call_id: str) -> MarginCallRow | None:
        row = self._one(
            f"SELECT {_MARGIN_COLUMNS} FROM exchange_margin_calls "  # noqa: S608
            "WHERE margin_call_id = ?",
            (margin_call_id,),
        )
        return None if row is None else _margin_row(row)

    def margin_calls_of(
        self, account_id: str, *, after_seq: int = 0, limit: int = -1
    ) -> list[MarginCallRow]:
        """Calls of an account in issue order, from after ``after_seq``; ``limit`` -1: all."""
        rows = self._db.execute(
            f"SELECT {_MARGIN_COLUMNS} FROM exchange_margin_calls "  # noqa: S608
            "WHERE account_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (account_id, after_seq, limit),
        ).fetchall()
        return [_margin_row(row) for row in rows]

    def margin_calls_in(self, statuses: Iterable[int]) -> list[MarginCallRow]:
        wanted = sorted(set(statuses))
        marks = ", ".join("?" for _ in wanted)
        rows = self._db.execute(
            f"SELECT {_MARGIN_COLUMNS} FROM exchange_margin_calls "  # noqa: S608
            f"WHERE status IN ({marks}) ORDER BY seq",
            wanted,
        ).fetchall()
        return [_margin_row(row) for row in rows]

    def margin_call_history(self, margin_call_id: str) -> list[envelope_pb2.Envelope]:
        rows = self._db.execute(
            "SELECT envelope FROM exchange_margin_call_states WHERE margin_call_id = ? ORDER BY id",
            (margin_call_id,),
        ).fetchall()
        return [_required_envelope(row[0]) for row in rows]

    # -- liquidations --

    def add_liquidation(
        self,
        *,
        liquidation_id: str,
        account_id: str,
        margin_call_id: str,
        amount: Decimal,
        liquidation_path_id: str,
        instruction: envelope_pb2.Envelope,
        instructed_at_ns: int,
    ) -> None:
        self._write(
            "INSERT INTO exchange_liquidations (liquidation_id, account_id, margin_call_id, amount, "
            "liquidation_path_id, instruction, instructed_at_ns, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'instructed')",
            (
                liquidation_id,
                account_id,
                margin_call_id,
                format_amount(amount),
                liquidation_path_id,
                instruction.SerializeToString(),
                instructed_at_ns,
            ),
        )

    def record_liquidation_receipt(
        self,
        liquidation_id: str,
        *,
        receipt: envelope_pb2.Envelope,
        total_proceeds: Decimal,
        shortfall: Decimal,
        allocation: envelope_pb2.Envelope | None,
        executed_at_ns: int,
    ) -> None:
        self._write(
            "UPDATE exchange_liquidations SET status = 'executed', receipt = ?, total_proceeds = ?, "
            "shortfall = ?, allocation = ?, executed_at_ns = ? WHERE liquidation_id = ?",
            (
                receipt.SerializeToString(),
                format_amount(total_proceeds),
                format_amount(shortfall),
                None if allocation is None else allocation.SerializeToString(),
                executed_at_ns,
                liquidation_id,
            ),
        )

    def refuse_liquidation(
        self, liquidation_id: str, *, reason: str, detail: str, at_ns: int
    ) -> None:
        """The custodian refused the instruction (or its receipt did not add up)."""
        self._write(
            "UPDATE exchange_liquidations SET status = 'refused', refusal_reason = ?, "
            "refusal_detail = ?, executed_at_ns = ? WHERE liquidation_id = ? "
            "AND status = 'instructed'",
            (reason, detail, at_ns, liquidation_id),
        )

    def liquidations_in(self, status: str) -> list[LiquidationRow]:
        rows = self._db.execute(
            f"SELECT {_LIQUIDATION_COLUMNS} FROM exchange_liquidations "  # noqa: S608
            "WHERE status = ? ORDER BY seq",
            (status,),
        ).fetchall()
        return [_liquidation_row(row) for row in rows]

    def liquidation(self, liquidation_id: str) -> LiquidationRow | None:
        row = self._one(
            f"SELECT {_LIQUIDATION_COLUMNS} FROM exchange_liquidations "  # noqa: S608
            "WHERE liquidation_id = ?",
            (liquidation_id,),
        )
        return None if row is None else _liquidation_row(row)

    def liquidations_of(
        self, account_id: str, *, after_seq: int = 0, limit: int = -1
    ) -> list[LiquidationRow]:
        """Liquidations of an account in instruction order, from after ``after_seq``; ``limit`` -1: all."""
        rows = self._db.execute(
            f"SELECT {_LIQUIDATION_COLUMNS} FROM exchange_liquidations "  # noqa: S608
            "WHERE account_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (account_id, after_seq, limit),
        ).fetchall()
        return [_liquidation_row(row) for row in rows]

    def replace_allocation(self, liquidation_id: str, allocation: envelope_pb2.Envelope) -> None:
        """The same allocation signed afresh (served long after the liquidation)."""
        self._write(
            "UPDATE exchange_liquidations SET allocation = ? WHERE liquidation_id = ? "
            "AND allocation IS NOT NULL",
            (allocation.SerializeToString(), liquidation_id),
        )

    def set_liquidation_path(self, account_id: str, liquidation_path_id: str) -> None:
        self._write(
            "INSERT INTO exchange_liquidation_paths VALUES (?, ?) ON CONFLICT (account_id) "
            "DO UPDATE SET liquidation_path_id = excluded.liquidation_path_id",
            (account_id, liquidation_path_id),
        )

    def liquidation_path(self, account_id: str) -> str | None:
        row = self._one(
            "SELECT liquidation_path_id FROM exchange_liquidation_paths WHERE account_id = ?",
            (account_id,),
        )
        return None if row is None else str(row[0])

    # -- the custodian's checkpoints --

    def trusted_checkpoint(self, origin: str) -> envelope_pb2.Envelope | None:
        row = self._one("SELECT envelope FROM exchange_checkpoints WHERE origin = ?", (origin,))
        return None if row is None else _required_envelope(row[0])

    def set_trusted_checkpoint(
        self, origin: str, envelope: envelope_pb2.Envelope, tree_size: int
    ) -> None:
        self._write(
            "INSERT INTO exchange_checkpoints VALUES (?, ?, ?) ON CONFLICT (origin) "
            "DO UPDATE SET envelope = excluded.envelope, tree_size = excluded.tree_size",
            (origin, envelope.SerializeToString(), tree_size),
        )

    def add_checkpoint_evidence(
        self,
        *,
        origin: str,
        reason: str,
        detail: str,
        held: envelope_pb2.Envelope | None,
        received: envelope_pb2.Envelope,
        proof: bytes | None,
        at_ns: int,
    ) -> None:
        self._write(
            "INSERT INTO exchange_checkpoint_evidence (origin, reason, detail, held, received, "
            "proof, detected_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                origin,
                reason,
                detail,
                None if held is None else held.SerializeToString(),
                received.SerializeToString(),
                proof,
                at_ns,
            ),
        )

    def checkpoint_evidence(self) -> list[tuple[str, str]]:
        """(reason, detail) of each refused checkpoint kept as evidence, oldest first."""
        rows = self._db.execute(
            "SELECT reason, detail FROM exchange_checkpoint_evidence ORDER BY id"
        ).fetchall()
        return [(row[0], row[1]) for row in rows]

    # -- refused stream updates --

    def add_rejected_update(
        self, *, sync_sequence: int, kind: str, reason: str, detail: str, payload: bytes, at_ns: int
    ) -> None:
        self._write(
            "INSERT INTO exchange_rejected_updates (sync_sequence, kind, reason, detail, payload, "
            "rejected_at_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (sync_sequence, kind, reason, detail, payload, at_ns),
        )

    def rejected_updates(self) -> list[tuple[int, str, str, str]]:
        """(sync sequence, kind, reason, detail) of each refused update, oldest first."""
        rows = self._db.execute(
            "SELECT sync_sequence, kind, reason, detail FROM exchange_rejected_updates ORDER BY id"
        ).fetchall()
        return [(row[0], row[1], row[2], row[3]) for row in rows]


def _holdings_row(row: Any) -> HoldingsRow:
    return HoldingsRow(
        id=row[0],
        account_id=row[1],
        epoch=row[2],
        exchange_id=row[3],
        envelope=_required_envelope(row[4]),
        attestation=attestation_pb2.AttestationRef.FromString(row[5]),
        sync_sequence=row[6],
        received_at_ns=row[7],
        status=row[8],
        reason=row[9],
        detail=row[10],
    )


def _margin_row(row: Any) -> MarginCallRow:
    return MarginCallRow(
        seq=row[0],
        margin_call_id=row[1],
        account_id=row[2],
        status=row[3],
        call_amount=parse_amount(row[4]),
        agreed_amount=parse_amount(row[5]),
        satisfied_amount=parse_amount(row[6]),
        collateral_value=parse_amount(row[7]),
        exposure=parse_amount(row[8]),
        holdings_epoch=row[9],
        issued_at_ns=row[10],
        due_by_ns=row[11],
        updated_at_ns=row[12],
        call_envelope=_required_envelope(row[13]),
        state_envelope=_required_envelope(row[14]),
        response_envelope=_envelope(row[15]),
    )


def _liquidation_row(row: Any) -> LiquidationRow:
    return LiquidationRow(
        seq=row[0],
        liquidation_id=row[1],
        account_id=row[2],
        margin_call_id=row[3],
        amount=parse_amount(row[4]),
        liquidation_path_id=row[5],
        instruction=_required_envelope(row[6]),
        instructed_at_ns=row[7],
        status=row[8],
        receipt=_envelope(row[9]),
        total_proceeds=_amount(row[10]),
        shortfall=_amount(row[11]),
        allocation=_envelope(row[12]),
        refusal_reason=row[13],
        refusal_detail=row[14],
    )
