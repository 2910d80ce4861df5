"""The exchange's side of settlement cycles: net what each account owes and instruct the custodian.

There is no trading engine: an account's realised result is its configured
``profit`` (``exchange.profits``). At a cycle (docs/PROTOCOL.md §10.6) the
exchange settles the change of that figure since the account's last cycle, in
the settlement asset (``USDC``): a loss is owed by the client (positive
``net_amount``, paid from the custody account to the exchange), a profit by
the exchange (negative). It signs one :class:`SettlementInstruction` per
account with a non-zero change, records the cycle and the settled figures in
one transaction, and then submits the instructions with
``SubmitSettlementInstruction``. Running the same ``cutoff_id`` again submits
the recorded instructions again (the custodian answers a resubmission from
its record), so a failed delivery is retried without netting twice.

The exchange counts its own cycles per UTC day and refuses one beyond the
policy's ``max_settlement_cycles_per_day`` before signing anything
(RESOURCE_EXHAUSTED, LIMIT_EXCEEDED), as the custodian would. In test mode
``TestControlService.RunSettlementCycle`` runs a cycle now.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc.aio
from collateral_sync.amounts import amount_to_proto, format_amount
from collateral_sync.clients import CustodianClient
from collateral_sync.errors import CollateralSyncError, MalformedError, StateError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import SyncSession
from collateral_sync.v1 import (
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
    test_control_pb2,
    valuation_pb2,
)

from collateral_sync_reference._clock import TestClock
from collateral_sync_reference._exchange_core import ExchangeCore
from collateral_sync_reference._exchange_rpc import ExchangeTestControl
from collateral_sync_reference._exchange_store import ExchangeStore
from collateral_sync_reference._storage import SqliteStorage

__all__ = ["SETTLEMENT_ASSET", "ExchangeSettlement", "SettlingTestControl"]

_R = errors_pb2.ErrorReason
_TYPE = payload_type_of(reconciliation_pb2.SettlementInstruction)
#: The asset settlements move (the exchange's margin currency).
SETTLEMENT_ASSET = "USDC"
_INSTRUCTION_TTL = timedelta(days=1)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_settlement_cycles (
        cutoff_id TEXT PRIMARY KEY,
        day TEXT NOT NULL,
        cycle_of_day INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_settlement_instructions (
        settlement_id TEXT PRIMARY KEY,
        cutoff_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        net_amount TEXT NOT NULL,
        envelope BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_settled_profits (
        account_id TEXT PRIMARY KEY,
        settled TEXT NOT NULL
    )""",
)


class ExchangeSettlement:
    """Nets, records and submits the exchange's settlement cycles."""

    def __init__(
        self,
        storage: SqliteStorage,
        store: ExchangeStore,
        *,
        signer: SigningKey,
        custodian_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        storage.execute_schema(_SCHEMA)
        self._storage = storage
        self._db = storage.connection
        self._store = store
        self._signer = signer
        self._custodian_id = custodian_id
        self._clock = clock

    def _policy(self) -> valuation_pb2.RiskPolicy:
        latest = self._store.latest_policy()
        if latest is None:  # pragma: no cover - the policy is published at start
            raise StateError(
                "no risk policy in force",
                metadata={"expected": "a published risk policy", "actual": "none"},
            )
        return valuation_pb2.RiskPolicy.FromString(latest[1].payload)

    def instructions(self, cutoff_id: str) -> list[envelope_pb2.Envelope]:
        """The recorded instructions of ``cutoff_id``'s cycle, in signing order."""
        return [
            envelope_pb2.Envelope.FromString(bytes(data))
            for (data,) in self._db.execute(
                "SELECT envelope FROM exchange_settlement_instructions WHERE cutoff_id = ? "
                "ORDER BY rowid",
                (cutoff_id,),
            ).fetchall()
        ]

    def issue(self, cutoff_id: str) -> list[envelope_pb2.Envelope]:
        """Net and sign the cycle of ``cutoff_id`` (or return the one recorded)."""
        if not cutoff_id:
            raise MalformedError(
                "cutoff_id is required",
                metadata={"field": "cutoff_id", "expected": "a cut-off id", "actual": ""},
                field_violations={"cutoff_id": "required"},
            )
        known = self._db.execute(
            "SELECT 1 FROM exchange_settlement_cycles WHERE cutoff_id = ?", (cutoff_id,)
        ).fetchone()
        if known is not None:
            return self.instructions(cutoff_id)
        now = self._clock()
        policy = self._policy()
        day = now.astimezone(UTC).date().isoformat()
        (cycles,) = self._db.execute(
            "SELECT COUNT(*) FROM exchange_settlement_cycles WHERE day = ?", (day,)
        ).fetchone()
        if cycles >= policy.max_settlement_cycles_per_day:
            raise CollateralSyncError(
                f"{cycles} settlement cycles on {day} already; the policy allows "
                f"{policy.max_settlement_cycles_per_day} a day",
                reason=_R.ERROR_REASON_LIMIT_EXCEEDED,
                metadata={
                    "field": "cutoff_id",
                    "expected": f"<= {policy.max_settlement_cycles_per_day} cycles on {day}",
                    "actual": str(cycles + 1),
                },
            )
        window = policy.settlement_dispute_window.ToTimedelta()
        settled = {
            account_id: Decimal(value)
            for account_id, value in self._db.execute(
                "SELECT account_id, settled FROM exchange_settled_profits"
            ).fetchall()
        }
        issued: list[envelope_pb2.Envelope] = []
        with self._storage.transaction():
            self._db.execute(
                "INSERT INTO exchange_settlement_cycles VALUES (?, ?, ?)",
                (cutoff_id, day, cycles + 1),
            )
            for account_id in self._store.account_ids():
                account = self._store.account(account_id)
                if account is None:  # pragma: no cover - listed ids exist
                    continue
                change = account.profit - settled.get(account_id, Decimal(0))
                if change == 0:
                    continue
                settlement_id = f"{cutoff_id}/{account_id}"
                message = reconciliation_pb2.SettlementInstruction(
                    settlement_id=settlement_id,
                    cutoff_id=cutoff_id,
                    account_id=account_id,
                    asset_id=SETTLEMENT_ASSET,
                    # A profit is paid by the exchange: the custody account receives.
                    net_amount=amount_to_proto(-change),
                    cycle_of_day=cycles + 1,
                )
                message.dispute_deadline.FromDatetime(now + window)
                envelope = sign_statement(
                    message,
                    self._signer,
                    audience=[self._custodian_id],
                    sequence=self._storage.next_sequence(_TYPE),
                    ttl=_INSTRUCTION_TTL,
                    issued_at=now,
                    statement_id=settlement_id,
                )
                self._db.execute(
                    "INSERT INTO exchange_settlement_instructions VALUES (?, ?, ?, ?, ?)",
                    (
                        settlement_id,
                        cutoff_id,
                        account_id,
                        format_amount(-change),
                        envelope.SerializeToString(),
                    ),
                )
                self._db.execute(
                    "INSERT INTO exchange_settled_profits VALUES (?, ?) ON CONFLICT (account_id) "
                    "DO UPDATE SET settled = excluded.settled",
                    (account_id, format_amount(account.profit)),
                )
                issued.append(envelope)
        return issued

    async def run(
        self, cutoff_id: str, client: CustodianClient | None
    ) -> list[envelope_pb2.Envelope]:
        """Issue the cycle (once) and submit every instruction of it to the custodian."""
        envelopes = self.issue(cutoff_id)
        if client is None:
            raise StateError(
                "the exchange is not connected to its custodian yet",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={"expected": "a custodian connection", "actual": "none"},
            )
        for envelope in envelopes:
            await client.submit_settlement_instruction(
                custodian_service_pb2.SubmitSettlementInstructionRequest(
                    settlement_instruction=envelope
                )
            )
        return envelopes


class SettlingTestControl(ExchangeTestControl):
    """The exchange's TestControlService with RunSettlementCycle."""

    __test__ = False

    def __init__(
        self,
        core: ExchangeCore,
        clock: TestClock | None,
        *,
        sessions: Callable[[], Sequence[SyncSession]],
        on_clock_advanced: Callable[[], Awaitable[None]],
        settlement: ExchangeSettlement,
        custodian: Callable[[], CustodianClient | None],
    ) -> None:
        super().__init__(core, clock, sessions=sessions, on_clock_advanced=on_clock_advanced)
        self._settlement = settlement
        self._custodian = custodian

    async def RunSettlementCycle(
        self,
        request: test_control_pb2.RunSettlementCycleRequest,
        context: grpc.aio.ServicerContext,
    ) -> test_control_pb2.RunSettlementCycleResponse:
        envelopes = await self._settlement.run(request.cutoff_id, self._custodian())
        return test_control_pb2.RunSettlementCycleResponse(settlement_instructions=envelopes)
