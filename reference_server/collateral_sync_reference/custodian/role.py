"""The reference custodian: holds client assets, attests them, and acts only on authorised input.

Serves ``CustodianService`` (and ``TestControlService`` in test mode):

- checkpoints, inclusion and consistency proofs of the attestation log, and the
  latest holdings statement of each account;
- ``PledgeCollateral``: a client pledges assets to an exchange together with
  its pre-authorised liquidation path, which the holdings change announcing
  the pledge carries to the exchange;
- ``RequestRedemption``: the assets are locked until settlement (24 h by
  default), then leave the account;
- ``SubmitLiquidationInstruction`` (or the same instruction on the sync
  stream): executed only along the pre-authorised path, accrued yield paid out
  first, a signed receipt returned; repeating an executed instruction returns
  the same receipt;
- ``SyncPositions``: the position-sync stream the exchange dials; credit
  lines, risk policies and margin calls arriving on it are recorded, and each
  margin call is recomputed from its signed inputs and answered (DISPUTE with
  reason ARITHMETIC when it does not recompute). A statement that does not
  verify fails its batch; one that verifies but asks for what cannot be done
  (a liquidation off the path in force, a reused margin-call id, an unusable
  policy) is recorded as rejected and the batch goes on (PROTOCOL.md §6.5).

Yield accrues daily on fund tokens at the configured UTC time; every change of
holdings is a signed holdings statement appended to the attestation log and
announced to the account's exchange. The behaviour lives in one module per
responsibility, assembled by ``core``; this module wires it to gRPC.

``ReleasePledge`` gives part of a pledge back on the client's request and the
exchange's consent (``pledge_releases``, PROTOCOL.md §5.9).

``ExecuteEmergencyRelease`` executes a release signed by two of regulator,
custodian and the account's exchange (``emergency``); the custodian
also serves ``EmergencyReleaseService.CoSignEmergencyRelease`` and co-signs
releases of accounts it holds that name the account's exchange.

``SubmitSettlementInstruction``, ``DisputeSettlement`` and ``GetSettlement``
run the settlement cycles (``settlement``): an instruction waits
out its dispute window, then executes when the scheduler or AdvanceClock
passes its deadline.

``ReconciliationService``: at each cut-off the custodian freezes its view of
the accounts pledged to its exchange, signs a reconciliation statement and
submits it to the regulator (``common.reconciliation``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from functools import partial

import grpc
import grpc.aio
from collateral_sync.errors import CollateralSyncError, VerificationError
from collateral_sync.sync import SyncSession, serve_sync_stream
from collateral_sync.transport import peer_party_id
from collateral_sync.v1 import (
    custodian_service_pb2,
    custodian_service_pb2_grpc,
    errors_pb2,
    test_control_pb2,
)

from collateral_sync_reference.common.access import Caller, caller_of, require_reader
from collateral_sync_reference.common.config import ServerConfig
from collateral_sync_reference.common.emergency import EmergencyReleaseCoSigner
from collateral_sync_reference.common.errors import require_statement
from collateral_sync_reference.common.evidence import KeptEvidence, sync_log_evidence
from collateral_sync_reference.common.reconciliation import (
    PartyReconciliation,
    ReconciliationServicer,
    custodian_holdings,
    parse_reconciliation_settings,
)
from collateral_sync_reference.common.runner import ServerContext
from collateral_sync_reference.common.test_control import TestControlBase
from collateral_sync_reference.custodian.config import CustodianSettings, parse_custodian_settings
from collateral_sync_reference.custodian.core import Custodian
from collateral_sync_reference.custodian.emergency import CustodianEmergencyRelease
from collateral_sync_reference.custodian.metrics import custodian_figures
from collateral_sync_reference.custodian.settlement import CustodianSettlement

__all__ = ["CustodianRole", "create_role", "parse_settings"]

#: Longest the scheduler sleeps before it looks at the clock again (the test
#: clock can be moved while it sleeps; AdvanceClock also wakes it).
_MAX_SLEEP = 60.0
_MIN_SLEEP = 0.05


class _CustodianService(custodian_service_pb2_grpc.CustodianServiceServicer):
    def __init__(self, role: CustodianRole) -> None:
        self._role = role
        custodian = role.custodian
        self._attestation = custodian.attestation
        self._pledges = custodian.pledges
        self._pledge_releases = custodian.pledge_releases
        self._redemptions = custodian.redemptions
        self._liquidations = custodian.liquidations

    async def GetCheckpoint(
        self, request: custodian_service_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> custodian_service_pb2.GetCheckpointResponse:
        return custodian_service_pb2.GetCheckpointResponse(
            checkpoint=self._attestation.checkpoint(request.tree_size)
        )

    async def GetInclusionProof(
        self,
        request: custodian_service_pb2.GetInclusionProofRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.GetInclusionProofResponse:
        # OUT_OF_RANGE first: it tells a caller only the log's size, which checkpoints publish.
        envelope, proof = self._attestation.inclusion_proof(request.leaf_index, request.tree_size)
        require_reader(
            self._role.caller(context),
            self._attestation.readers_of_leaf(request.leaf_index),
            field="leaf_index",
        )
        return custodian_service_pb2.GetInclusionProofResponse(
            holdings_statement=envelope, proof=proof
        )

    async def GetConsistencyProof(
        self,
        request: custodian_service_pb2.GetConsistencyProofRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.GetConsistencyProofResponse:
        return custodian_service_pb2.GetConsistencyProofResponse(
            proof=self._attestation.consistency_proof(
                request.first_tree_size, request.second_tree_size
            )
        )

    async def GetHoldingsStatement(
        self,
        request: custodian_service_pb2.GetHoldingsStatementRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.GetHoldingsStatementResponse:
        require_reader(
            self._role.caller(context),
            self._attestation.readers_of_account(request.account_id),
            field="account_id",
        )
        envelope, ref = self._attestation.holdings_statement(request.account_id)
        return custodian_service_pb2.GetHoldingsStatementResponse(
            holdings_statement=envelope, attestation=ref
        )

    async def PledgeCollateral(
        self,
        request: custodian_service_pb2.PledgeCollateralRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.PledgeCollateralResponse:
        # Client statements authenticate themselves: any registered party may relay them.
        envelope, ref = self._pledges.pledge(request)
        return custodian_service_pb2.PledgeCollateralResponse(
            holdings_statement=envelope, attestation=ref
        )

    async def RequestRedemption(
        self,
        request: custodian_service_pb2.RequestRedemptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.RequestRedemptionResponse:
        return self._redemptions.redeem(request)

    async def SubmitLiquidationInstruction(
        self,
        request: custodian_service_pb2.SubmitLiquidationInstructionRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.SubmitLiquidationInstructionResponse:
        require_statement(request, "liquidation_instruction", "a signed LiquidationInstruction")
        # The exchange's instructions come over the exchange's own connection.
        tls_peer = None if self._role.plaintext else (peer_party_id(context) or "")
        receipt = self._liquidations.liquidate(
            request.liquidation_instruction, now=self._role.now(), tls_peer=tls_peer
        )
        return custodian_service_pb2.SubmitLiquidationInstructionResponse(
            liquidation_receipt=receipt
        )

    async def SyncPositions(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # Writes with context.write (the SDK session) instead of yielding responses.
        session = self._role.session_for(context)
        logger = self._role.logger
        logger.info("sync stream with %s opened", session.peer_party_id)
        try:
            await serve_sync_stream(
                session, request_iterator, context, require_tls_peer=not self._role.plaintext
            )
        except grpc.aio.AbortError:
            code = context.code()
            logger.warning(
                "sync stream with %s refused: %s %s",
                session.peer_party_id,
                code.name if isinstance(code, grpc.StatusCode) else code,
                context.details(),
            )
            raise
        logger.info(
            "sync stream with %s closed (acknowledged up to %d)",
            session.peer_party_id,
            session.acknowledged_sequence,
        )

    async def ReleasePledge(
        self,
        request: custodian_service_pb2.ReleasePledgeRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.ReleasePledgeResponse:
        require_statement(request, "consent", "a signed PledgeReleaseConsent")
        # Any registered party may relay it: the client's and the exchange's signatures authorise it.
        return self._pledge_releases.release(request.consent)

    async def ExecuteEmergencyRelease(
        self,
        request: custodian_service_pb2.ExecuteEmergencyReleaseRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.ExecuteEmergencyReleaseResponse:
        require_statement(request, "emergency_release", "a signed EmergencyRelease")
        # Any registered party may bring the release: its signatures authorise it.
        receipt = self._role.emergency.execute(request.emergency_release)
        return custodian_service_pb2.ExecuteEmergencyReleaseResponse(
            emergency_release_receipt=receipt
        )

    async def SubmitSettlementInstruction(
        self,
        request: custodian_service_pb2.SubmitSettlementInstructionRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.SubmitSettlementInstructionResponse:
        require_statement(request, "settlement_instruction", "a signed SettlementInstruction")
        response = self._role.settlement.submit(request.settlement_instruction)
        self._role.wake()
        return response

    async def DisputeSettlement(
        self,
        request: custodian_service_pb2.DisputeSettlementRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.DisputeSettlementResponse:
        require_statement(request, "settlement_dispute", "a signed SettlementDispute")
        return self._role.settlement.dispute(request.settlement_dispute)

    async def GetSettlement(
        self,
        request: custodian_service_pb2.GetSettlementRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.GetSettlementResponse:
        settlement = self._role.settlement
        require_reader(
            self._role.caller(context),
            settlement.readers(request.settlement_id),
            field="settlement_id",
        )
        return settlement.get(request.settlement_id)


class _CustodianTestControl(TestControlBase):
    __test__ = False

    def __init__(self, role: CustodianRole) -> None:
        super().__init__(
            role.context.test_clock,
            sessions=lambda: list(role.custodian.sessions.values()),
            on_clock_advanced=role.on_clock_advanced,
        )
        self._role = role

    async def Deposit(
        self, request: test_control_pb2.DepositRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.DepositResponse:
        self._role.custodian.yield_accrual.deposit(request)
        return test_control_pb2.DepositResponse()

    async def AccrueYield(
        self, request: test_control_pb2.AccrueYieldRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.AccrueYieldResponse:
        # Runs now, beside the daily schedule (which it does not move).
        accounts = self._role.custodian.yield_accrual.accrue_yield(self._role.now())
        return test_control_pb2.AccrueYieldResponse(accounts=accounts)


class CustodianRole:
    """The custodian as the runner drives it (see :class:`collateral_sync_reference.common.runner.Role`)."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.logger = context.logger
        settings = context.settings
        if not isinstance(settings, CustodianSettings):
            settings = parse_settings(context.config)
        self.custodian = Custodian(context, settings)
        context.metrics.add_source(custodian_figures(self.custodian))
        exchanges = self.custodian.exchanges
        self.reconciliation = PartyReconciliation(
            storage=context.storage,
            signer=context.signer,
            clock=context.clock,
            settings=parse_reconciliation_settings(context.config, context.registry),
            counterparty_id=exchanges[0] if len(exchanges) == 1 else None,
            exchange_id=exchanges[0] if len(exchanges) == 1 else "",
            holdings=lambda: custodian_holdings(context.storage),
            tls=context.tls,
            test_mode=context.test_mode,
            logger=self.logger,
        )
        evidence = KeptEvidence(
            [partial(sync_log_evidence, log) for log in self.custodian.ledger.sync_logs.values()],
            self.caller,
        )
        self._reconciliation_service = ReconciliationServicer(self.reconciliation, evidence)
        self.emergency = CustodianEmergencyRelease(self.custodian.ledger)
        self.settlement = CustodianSettlement(self.custodian.ledger)
        self._service = _CustodianService(self)
        self._cosigner = EmergencyReleaseCoSigner(
            signer=context.signer,
            registry=context.registry,
            clock=context.clock.now,
            policy=self.emergency.cosign_policy,
            max_skew=context.config.max_skew,
        )
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None

    @property
    def plaintext(self) -> bool:
        return self.context.plaintext

    def now(self) -> datetime:
        return self.context.clock.now()

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who is calling, as the key registry knows them (PROTOCOL.md §4.5)."""
        return caller_of(context, self.context.registry, plaintext=self.plaintext)

    def session_for(self, context: grpc.aio.ServicerContext) -> SyncSession:
        """The sync session of the exchange on the other end of the call."""
        sessions = self.custodian.sessions
        if self.plaintext:
            # No certificate to tell exchanges apart: only one can be served.
            if len(sessions) != 1:
                raise VerificationError(
                    f"plaintext sync needs exactly one exchange peer, {len(sessions)} configured",
                    reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
                    metadata={"expected": "1 exchange", "actual": str(len(sessions))},
                )
            return next(iter(sessions.values()))
        peer = peer_party_id(context)
        session = sessions.get(peer or "")
        if session is None:
            expected = "|".join(sessions) or "a configured exchange"
            raise VerificationError(
                f"SyncPositions is for the exchanges this custodian serves ({expected}), "
                f"not {peer or 'an unidentified peer'!r}",
                reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": expected, "actual": peer or ""},
            )
        return session

    def servicers(self) -> Sequence[object]:
        return [self._service, self._cosigner, self._reconciliation_service]

    def test_control(self) -> _CustodianTestControl:
        return _CustodianTestControl(self)

    def wake(self) -> None:
        """Have the scheduler look at its due times again (a new one may be earlier)."""
        self._wake.set()

    async def on_clock_advanced(self) -> None:
        self.custodian.run_due()
        self.settlement.run_due()
        # A cut-off the clock passed is frozen before AdvanceClock answers.
        self.reconciliation.run_due()
        self._wake.set()

    async def start(self) -> None:
        self.custodian.run_due()
        self._scheduler = asyncio.create_task(self._schedule(), name="custodian-scheduler")
        self.reconciliation.start()

    async def stop(self) -> None:
        await self.reconciliation.stop()
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        self.custodian.close()

    async def _schedule(self) -> None:
        """Settle redemptions, accrue yield and refresh statements when the (possibly test)
        clock says so."""
        while True:
            try:
                self.custodian.run_due()
                self.settlement.run_due()
                due = self.custodian.next_due()
                settlement_due = self.settlement.next_due()
                if settlement_due is not None:
                    due = min(due, settlement_due)
                wait = (due - self.now()).total_seconds()
            except CollateralSyncError as err:
                self.logger.exception("scheduled work failed: %s: %s", err.reason_name, err.message)
                wait = _MAX_SLEEP
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(wait, _MIN_SLEEP), _MAX_SLEEP)):
                    await self._wake.wait()
            self._wake.clear()


def parse_settings(config: ServerConfig) -> CustodianSettings:
    """Check the ``custodian`` section of the configuration (before anything is opened)."""
    # Read first: the custodian's own parser refuses keys it does not know.
    parse_reconciliation_settings(config)
    return parse_custodian_settings(config)


def create_role(context: ServerContext) -> CustodianRole:
    """Entry point for the runner's role registry."""
    return CustodianRole(context)
