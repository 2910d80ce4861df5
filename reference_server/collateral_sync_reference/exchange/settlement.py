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

After reconciliation (:class:`SettlementAfterReconciliation`, the exchange's
``settlement.after_reconciliation``): once the exchange has handed its
statement of a cut-off to the regulator, it fetches the regulator's result
(``GetReconciliationResult``, retried with backoff while the result is not
there yet, for at most ``settlement.result_wait_seconds``), checks it
(:func:`check_reconciliation_result`) and runs the cycle of that cut-off only
if the outcome is MATCHED. Every cut-off ends with one recorded decision
(``exchange_settlement_after_reconciliation``): settled, breaks, capped,
refused, unverified or no_result, with the reason; a restart resumes with the
cut-offs that have none, and the cycle record keeps a cut-off from being
netted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc.aio
from collateral_sync.amounts import amount_to_proto, format_amount
from collateral_sync.clients import CustodianClient, RegulatorClient
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    RPCError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import KeyRegistry
from collateral_sync.signer import Signer
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import SyncSession
from collateral_sync.transport import (
    ReloadableTls,
    TlsConfig,
    plaintext_channel_for_testing,
    secure_channel,
)
from collateral_sync.v1 import (
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
    regulator_service_pb2,
    test_control_pb2,
    valuation_pb2,
)

from collateral_sync_reference.common.clock import TestClock
from collateral_sync_reference.common.storage import SqlStorage
from collateral_sync_reference.exchange.core import ExchangeCore
from collateral_sync_reference.exchange.servicers import ExchangeTestControl
from collateral_sync_reference.exchange.store import ExchangeStore

__all__ = [
    "SETTLEMENT_ASSET",
    "ExchangeSettlement",
    "SettlementAfterReconciliation",
    "SettlingTestControl",
    "check_reconciliation_result",
]

_R = errors_pb2.ErrorReason
_TYPE = payload_type_of(reconciliation_pb2.SettlementInstruction)
#: The asset settlements move (the exchange's margin currency).
SETTLEMENT_ASSET = "USDC"
_INSTRUCTION_TTL = timedelta(days=1)
_MATCHED = reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED
_BREAKS = reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS
#: Result fetch backoff (seconds): initial delay, doubled up to the ceiling.
_FETCH_INITIAL = 0.1
_FETCH_MAX = 5.0
#: Answers that mean "not yet": a statement missing, a party not asked yet, the regulator down.
_NOT_YET = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
#: Delay before a cut-off whose cycle could not be delivered is tried again.
_RETRY_SECONDS = 1.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exchange_settlement_cycles (
        cutoff_id TEXT PRIMARY KEY,
        day TEXT NOT NULL,
        cycle_of_day INTEGER NOT NULL
    )""",
    # seq: the order the instructions were signed in.
    """CREATE TABLE IF NOT EXISTS exchange_settlement_instructions (
        seq INTEGER PRIMARY KEY,
        settlement_id TEXT NOT NULL UNIQUE,
        cutoff_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        net_amount TEXT NOT NULL,
        envelope BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS exchange_settled_profits (
        account_id TEXT PRIMARY KEY,
        settled TEXT NOT NULL
    )""",
    # One decision per reconciled cut-off: whether its cycle ran, and why not.
    """CREATE TABLE IF NOT EXISTS exchange_settlement_after_reconciliation (
        cutoff_id TEXT PRIMARY KEY,
        decision TEXT NOT NULL,
        detail TEXT NOT NULL,
        result BLOB
    )""",
)


class ExchangeSettlement:
    """Nets, records and submits the exchange's settlement cycles."""

    def __init__(
        self,
        storage: SqlStorage,
        store: ExchangeStore,
        *,
        signer: Signer,
        custodian_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        storage.execute_schema("exchange.settlement", _SCHEMA)
        self._storage = storage
        self._db = storage.connection
        self._store = store
        self._signer = signer
        self._custodian_id = custodian_id
        self._clock = clock

    def _policy(self) -> valuation_pb2.RiskPolicy:
        latest = self._store.policies.latest()
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
                "ORDER BY seq",
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
            for account_id in self._store.accounts.ids():
                account = self._store.accounts.get(account_id)
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
                    "INSERT INTO exchange_settlement_instructions (settlement_id, cutoff_id, "
                    "account_id, net_amount, envelope) VALUES (?, ?, ?, ?, ?)",
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


def check_reconciliation_result(
    envelope: envelope_pb2.Envelope,
    *,
    registry: KeyRegistry,
    exchange_id: str,
    regulator_id: str,
    cutoff_id: str,
    own_statement: envelope_pb2.Envelope,
    now: datetime,
    max_skew: timedelta,
) -> reconciliation_pb2.ReconciliationResult:
    """The regulator's result for ``cutoff_id``, checked before the exchange settles on it.

    It must be signed by ``regulator_id`` (a regulator key), public (audience
    exactly ``"*"``), fresh at ``now``, name ``cutoff_id``, embed
    ``own_statement`` byte for byte as the exchange's statement, and have an
    outcome that agrees with its breaks.
    """
    if not cutoff_id:
        raise MalformedError(
            "cutoff_id: expected a cut-off id, got nothing",
            metadata={"field": "cutoff_id", "expected": "a cut-off id", "actual": ""},
        )
    verified = verify_statement(
        envelope,
        registry,
        expected_type=reconciliation_pb2.ReconciliationResult,
        audience=exchange_id,
        now=now,
        max_skew=max_skew,
    )
    if verified.issuer != regulator_id:
        raise VerificationError(
            f"reconciliation result: expected one issued by {regulator_id!r}, "
            f"got one by {verified.issuer!r}",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": regulator_id, "actual": verified.issuer},
        )
    audience = ",".join(verified.header.audience)
    if audience != "*":
        raise VerificationError(
            f"reconciliation result: expected a public result (audience '*'), got [{audience}]",
            reason=_R.ERROR_REASON_AUDIENCE_MISMATCH,
            metadata={"expected": "*", "actual": audience},
        )
    result = verified.message
    if result.cutoff_id != cutoff_id:
        raise VerificationError(
            f"reconciliation result: expected cut-off {cutoff_id}, got {result.cutoff_id!r}",
            reason=_R.ERROR_REASON_STATE_CONFLICT,
            metadata={"field": "cutoff_id", "expected": cutoff_id, "actual": result.cutoff_id},
        )
    # The regulator must have compared what this exchange signed, not something else.
    ours = own_statement.SerializeToString(deterministic=True)
    embedded = result.exchange_statement.SerializeToString(deterministic=True)
    if embedded != ours:
        raise VerificationError(
            "reconciliation result: expected the exchange's own statement embedded byte for "
            f"byte ({len(ours)} bytes), got a different one ({len(embedded)} bytes)",
            reason=_R.ERROR_REASON_STATE_CONFLICT,
            metadata={
                "field": "exchange_statement",
                "expected": own_statement.payload.hex()[:32],
                "actual": result.exchange_statement.payload.hex()[:32],
            },
        )
    expected_outcome = _BREAKS if result.breaks else _MATCHED
    if result.outcome != expected_outcome:
        expected_name = reconciliation_pb2.ReconciliationOutcome.Name(expected_outcome)
        actual_name = str(result.outcome)
        with contextlib.suppress(ValueError):
            actual_name = reconciliation_pb2.ReconciliationOutcome.Name(result.outcome)
        raise MalformedError(
            f"reconciliation result: {len(result.breaks)} breaks need outcome "
            f"{expected_name}, got {actual_name}",
            metadata={"field": "outcome", "expected": expected_name, "actual": actual_name},
        )
    return result


def _break_name(found: reconciliation_pb2.ReconciliationBreak) -> str:
    field = str(found.field)
    with contextlib.suppress(ValueError):
        field = reconciliation_pb2.BreakField.Name(found.field).removeprefix("BREAK_FIELD_")
    return f"{found.account_id or '-'}/{found.asset_id or '-'}/{field}"


class SettlementAfterReconciliation:
    """Runs a cut-off's settlement cycle once the regulator has published it MATCHED.

    Woken whenever the exchange's reconciliation statement of a cut-off has
    been handed to the regulator; works through the cut-offs with no recorded
    decision, oldest first, so a cycle never overtakes an earlier cut-off.
    """

    def __init__(
        self,
        settlement: ExchangeSettlement,
        storage: SqlStorage,
        *,
        exchange_id: str,
        regulator_id: str,
        regulator_address: str,
        registry: KeyRegistry,
        tls: TlsConfig | ReloadableTls | None,
        statements: Callable[[], Sequence[tuple[str, envelope_pb2.Envelope]]],
        custodian: Callable[[], CustodianClient | None],
        clock: Callable[[], datetime],
        max_skew: timedelta,
        result_wait: timedelta,
        logger: logging.Logger,
    ) -> None:
        storage.execute_schema("exchange.settlement", _SCHEMA)
        self._settlement = settlement
        self._storage = storage
        self._db = storage.connection
        self._exchange_id = exchange_id
        self._regulator_id = regulator_id
        self._regulator_address = regulator_address
        self._registry = registry
        self._tls = tls
        self._statements = statements
        self._custodian = custodian
        self._clock = clock
        self._max_skew = max_skew
        self._result_wait = result_wait
        self._logger = logger
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def decision(self, cutoff_id: str) -> tuple[str, str] | None:
        """(decision, why) recorded for ``cutoff_id``, or None while it is undecided."""
        row = self._db.execute(
            "SELECT decision, detail FROM exchange_settlement_after_reconciliation "
            "WHERE cutoff_id = ?",
            (cutoff_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def wake(self, cutoff_id: str = "") -> None:
        """A statement was submitted (``cutoff_id``): look for cut-offs to decide."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(
            self._run_forever(), name="settlement-after-reconciliation"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _undecided(self) -> list[tuple[str, envelope_pb2.Envelope]]:
        decided = {
            cutoff_id
            for (cutoff_id,) in self._db.execute(
                "SELECT cutoff_id FROM exchange_settlement_after_reconciliation"
            ).fetchall()
        }
        return [(c, e) for c, e in self._statements() if c not in decided]

    async def _run_forever(self) -> None:
        address = self._regulator_address
        channel = (
            plaintext_channel_for_testing(address)
            if self._tls is None
            else secure_channel(address, self._tls)
        )
        try:
            client = RegulatorClient(channel)
            while True:
                # Cleared before the scan: a submission during it brings another pass.
                self._wake.clear()
                retry = False
                for cutoff_id, statement in self._undecided():
                    try:
                        done = await self.settle(client, cutoff_id, statement)
                    except Exception:  # the task must outlive any bug: log, try again later
                        self._logger.exception("settlement after %s broke unexpectedly", cutoff_id)
                        done = False
                    if not done:
                        retry = True
                        break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RETRY_SECONDS if retry else None):
                        await self._wake.wait()
        finally:
            await channel.close()

    async def _fetch(
        self, client: RegulatorClient, cutoff_id: str
    ) -> tuple[envelope_pb2.Envelope | None, str]:
        """The published result, or (None, why) once the wait is over or the answer is final."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._result_wait.total_seconds()
        delay = _FETCH_INITIAL
        request = regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=cutoff_id)
        while True:
            try:
                response = await client.get_reconciliation_result(request)
            except RPCError as err:
                last = f"{err.reason_name}: {err.message}"
                if err.code not in _NOT_YET:
                    return None, f"the regulator refused: {last}"
            else:
                return response.reconciliation_result, ""
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None, (
                    f"no result within {self._result_wait.total_seconds():g} s; last answer {last}"
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _FETCH_MAX)

    async def settle(
        self, client: RegulatorClient, cutoff_id: str, statement: envelope_pb2.Envelope
    ) -> bool:
        """Decide the cut-off (running its cycle if MATCHED); False: try again later."""
        envelope, why = await self._fetch(client, cutoff_id)
        if envelope is None:
            self._decide(cutoff_id, "no_result", why, None)
            return True
        try:
            result = check_reconciliation_result(
                envelope,
                registry=self._registry,
                exchange_id=self._exchange_id,
                regulator_id=self._regulator_id,
                cutoff_id=cutoff_id,
                own_statement=statement,
                now=self._clock(),
                max_skew=self._max_skew,
            )
        except CollateralSyncError as err:
            self._decide(cutoff_id, "unverified", f"{err.reason_name}: {err.message}", envelope)
            return True
        if result.outcome != _MATCHED:
            shown = ", ".join(_break_name(b) for b in result.breaks[:3])
            more = ", ..." if len(result.breaks) > 3 else ""
            self._decide(
                cutoff_id,
                "breaks",
                f"{len(result.breaks)} reconciliation breaks ({shown}{more}): no cycle until "
                "they are resolved; the next matched cut-off nets the change",
                envelope,
            )
            return True
        custodian = self._custodian()
        if custodian is None:
            return False
        try:
            issued = await self._settlement.run(cutoff_id, custodian)
        except CollateralSyncError as err:
            if isinstance(err, RPCError) and err.code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                # Recorded before delivery: the retry resubmits the same instructions.
                self._logger.warning("settlement cycle %s not delivered yet: %s", cutoff_id, err)
                return False
            decision = "capped" if err.reason == _R.ERROR_REASON_LIMIT_EXCEEDED else "refused"
            self._decide(cutoff_id, decision, f"{err.reason_name}: {err.message}", envelope)
            return True
        self._decide(cutoff_id, "settled", f"{len(issued)} settlement instructions", envelope)
        return True

    def _decide(
        self, cutoff_id: str, decision: str, detail: str, result: envelope_pb2.Envelope | None
    ) -> None:
        with self._storage.transaction():
            self._db.execute(
                "INSERT INTO exchange_settlement_after_reconciliation VALUES (?, ?, ?, ?) "
                "ON CONFLICT (cutoff_id) DO NOTHING",
                (
                    cutoff_id,
                    decision,
                    detail,
                    None if result is None else result.SerializeToString(),
                ),
            )
        log = self._logger.info if decision == "settled" else self._logger.warning
        log("settlement after reconciliation of %s: %s (%s)", cutoff_id, decision, detail)
