"""Typed async clients, one per collateral-sync service.

Each client wraps a ``grpc.aio.Channel`` (see :func:`collateral_sync.transport.secure_channel`)
and has one method per RPC, named in snake_case, taking and returning the
generated request/response messages::

    async with secure_channel("exchange.example:7443", tls) as channel:
        exchange = ExchangeClient(channel)
        policy = await exchange.get_risk_policy(GetRiskPolicyRequest())

Every call has a deadline: the client's ``default_timeout`` unless the call
passes ``timeout=``. Failures raise :class:`~collateral_sync.errors.RPCError`
(reason, status code, metadata and field violations decoded from the peer's
status), chained to the original ``grpc.aio.AioRpcError``.

Retries are the channel's business: its service config retries idempotent
``Get*``/``List*`` calls on UNAVAILABLE, and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, Awaitable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from collateral_sync.errors import error_from_rpc_error
from collateral_sync.v1 import (
    custodian_service_pb2,
    custodian_service_pb2_grpc,
    emergency_release_service_pb2,
    emergency_release_service_pb2_grpc,
    exchange_service_pb2,
    exchange_service_pb2_grpc,
    reconciliation_service_pb2,
    reconciliation_service_pb2_grpc,
    regulator_service_pb2,
    regulator_service_pb2_grpc,
    test_control_pb2,
    test_control_pb2_grpc,
)

__all__ = [
    "DEFAULT_SYNC_STREAM_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "CustodianClient",
    "EmergencyReleaseClient",
    "ExchangeClient",
    "Metadata",
    "ReconciliationClient",
    "RegulatorClient",
    "TestControlClient",
]

#: Default deadline, in seconds, of a unary call.
DEFAULT_TIMEOUT = 10.0

#: Default lifetime, in seconds, of one SyncPositions stream (see ``sync_positions``).
DEFAULT_SYNC_STREAM_TIMEOUT = 3600.0

#: Call metadata: (key, value) pairs; binary values go under keys ending in "-bin".
Metadata = Sequence[tuple[str, str | bytes]]

_Req_contra = TypeVar("_Req_contra", contravariant=True)
_Resp_co = TypeVar("_Resp_co", covariant=True)


class _UnaryMethod(Protocol[_Req_contra, _Resp_co]):
    def __call__(
        self, request: _Req_contra, *, timeout: float, metadata: Metadata | None
    ) -> Awaitable[_Resp_co]: ...


class _Client:
    """Shared by the service clients: channel, default deadline, error mapping."""

    __slots__ = ("_channel", "_default_timeout")

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float) -> None:
        self._channel = channel
        self._default_timeout = _check_timeout(default_timeout)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    @property
    def default_timeout(self) -> float:
        return self._default_timeout

    async def _unary(
        self,
        method: _UnaryMethod[_Req_contra, _Resp_co],
        request: _Req_contra,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> _Resp_co:
        # None means "the client's default", never "no deadline".
        deadline = self._default_timeout if timeout is None else _check_timeout(timeout)
        try:
            return await method(request, timeout=deadline, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc_error(err) from err


def _check_timeout(timeout: float) -> float:
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"expected a timeout > 0 seconds and finite, got {timeout}")
    return float(timeout)


class CustodianClient(_Client):
    """Client of ``CustodianService`` (served by the custodian)."""

    __slots__ = (
        "_dispute_settlement",
        "_execute_emergency_release",
        "_get_checkpoint",
        "_get_consistency_proof",
        "_get_holdings_statement",
        "_get_inclusion_proof",
        "_get_settlement",
        "_pledge_collateral",
        "_release_pledge",
        "_request_redemption",
        "_submit_liquidation_instruction",
        "_submit_settlement_instruction",
        "_sync_positions",
    )

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float = DEFAULT_TIMEOUT):
        super().__init__(channel, default_timeout=default_timeout)
        stub = custodian_service_pb2_grpc.CustodianServiceStub(channel)
        m = custodian_service_pb2
        self._get_checkpoint: _UnaryMethod[m.GetCheckpointRequest, m.GetCheckpointResponse] = (
            stub.GetCheckpoint
        )
        self._get_inclusion_proof: _UnaryMethod[
            m.GetInclusionProofRequest, m.GetInclusionProofResponse
        ] = stub.GetInclusionProof
        self._get_consistency_proof: _UnaryMethod[
            m.GetConsistencyProofRequest, m.GetConsistencyProofResponse
        ] = stub.GetConsistencyProof
        self._get_holdings_statement: _UnaryMethod[
            m.GetHoldingsStatementRequest, m.GetHoldingsStatementResponse
        ] = stub.GetHoldingsStatement
        self._pledge_collateral: _UnaryMethod[
            m.PledgeCollateralRequest, m.PledgeCollateralResponse
        ] = stub.PledgeCollateral
        self._request_redemption: _UnaryMethod[
            m.RequestRedemptionRequest, m.RequestRedemptionResponse
        ] = stub.RequestRedemption
        self._submit_liquidation_instruction: _UnaryMethod[
            m.SubmitLiquidationInstructionRequest, m.SubmitLiquidationInstructionResponse
        ] = stub.SubmitLiquidationInstruction
        self._release_pledge: _UnaryMethod[m.ReleasePledgeRequest, m.ReleasePledgeResponse] = (
            stub.ReleasePledge
        )
        self._execute_emergency_release: _UnaryMethod[
            m.ExecuteEmergencyReleaseRequest, m.ExecuteEmergencyReleaseResponse
        ] = stub.ExecuteEmergencyRelease
        self._submit_settlement_instruction: _UnaryMethod[
            m.SubmitSettlementInstructionRequest, m.SubmitSettlementInstructionResponse
        ] = stub.SubmitSettlementInstruction
        self._dispute_settlement: _UnaryMethod[
            m.DisputeSettlementRequest, m.DisputeSettlementResponse
        ] = stub.DisputeSettlement
        self._get_settlement: _UnaryMethod[m.GetSettlementRequest, m.GetSettlementResponse] = (
            stub.GetSettlement
        )
        self._sync_positions: Any = stub.SyncPositions

    async def get_checkpoint(
        self,
        request: custodian_service_pb2.GetCheckpointRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.GetCheckpointResponse:
        """Latest signed checkpoint, or the one at ``tree_size``."""
        return await self._unary(self._get_checkpoint, request, timeout, metadata)

    async def get_inclusion_proof(
        self,
        request: custodian_service_pb2.GetInclusionProofRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.GetInclusionProofResponse:
        """RFC 9162 inclusion proof of a leaf, with the leaf itself."""
        return await self._unary(self._get_inclusion_proof, request, timeout, metadata)

    async def get_consistency_proof(
        self,
        request: custodian_service_pb2.GetConsistencyProofRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.GetConsistencyProofResponse:
        """RFC 9162 consistency proof between two tree sizes."""
        return await self._unary(self._get_consistency_proof, request, timeout, metadata)

    async def get_holdings_statement(
        self,
        request: custodian_service_pb2.GetHoldingsStatementRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.GetHoldingsStatementResponse:
        """Latest attested holdings statement of an account."""
        return await self._unary(self._get_holdings_statement, request, timeout, metadata)

    async def pledge_collateral(
        self,
        request: custodian_service_pb2.PledgeCollateralRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.PledgeCollateralResponse:
        """Pledge assets to an exchange with a pre-authorised liquidation path."""
        return await self._unary(self._pledge_collateral, request, timeout, metadata)

    async def request_redemption(
        self,
        request: custodian_service_pb2.RequestRedemptionRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.RequestRedemptionResponse:
        """Ask to redeem; the assets are locked until settlement."""
        return await self._unary(self._request_redemption, request, timeout, metadata)

    async def submit_liquidation_instruction(
        self,
        request: custodian_service_pb2.SubmitLiquidationInstructionRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.SubmitLiquidationInstructionResponse:
        """Instruct a liquidation along the pre-authorised path."""
        return await self._unary(self._submit_liquidation_instruction, request, timeout, metadata)

    async def release_pledge(
        self,
        request: custodian_service_pb2.ReleasePledgeRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.ReleasePledgeResponse:
        """Give part of a pledge back: the client's request with the exchange's consent."""
        return await self._unary(self._release_pledge, request, timeout, metadata)

    async def execute_emergency_release(
        self,
        request: custodian_service_pb2.ExecuteEmergencyReleaseRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.ExecuteEmergencyReleaseResponse:
        """Execute an emergency release signed by two of regulator, custodian, exchange."""
        return await self._unary(self._execute_emergency_release, request, timeout, metadata)

    async def submit_settlement_instruction(
        self,
        request: custodian_service_pb2.SubmitSettlementInstructionRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.SubmitSettlementInstructionResponse:
        """Record a settlement instruction, pending until its dispute deadline."""
        return await self._unary(self._submit_settlement_instruction, request, timeout, metadata)

    async def dispute_settlement(
        self,
        request: custodian_service_pb2.DisputeSettlementRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.DisputeSettlementResponse:
        """Dispute a pending settlement instruction before its deadline."""
        return await self._unary(self._dispute_settlement, request, timeout, metadata)

    async def get_settlement(
        self,
        request: custodian_service_pb2.GetSettlementRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> custodian_service_pb2.GetSettlementResponse:
        """The state of a settlement instruction."""
        return await self._unary(self._get_settlement, request, timeout, metadata)

    def sync_positions(
        self,
        requests: AsyncIterable[custodian_service_pb2.SyncPositionsRequest] | None = None,
        *,
        timeout: float = DEFAULT_SYNC_STREAM_TIMEOUT,
        metadata: Metadata | None = None,
    ) -> grpc.aio.StreamStreamCall:
        """Open the bidirectional position-sync stream; returns the call object.

        Without ``requests`` the caller writes frames with ``await call.write()``
        and ends with ``await call.done_writing()``; responses come from
        ``await call.read()`` or ``async for`` over the call.

        Deadline strategy for a long-lived stream: it still carries a deadline
        (every call does), ``timeout`` seconds — long, so that renewals are
        rare, yet bounded, so that a stream stuck without anyone noticing is
        torn down eventually. Dead peers are detected much sooner by the
        channel's HTTP/2 keepalive (pings every 20 s, 10 s to answer) and by the
        session's own heartbeats. When the stream ends — DEADLINE_EXCEEDED
        included — the session re-dials and resumes from the last durably
        received sequence, the same path as after any disconnect, so nothing
        is lost or applied twice. The channel never retries this RPC.

        Errors surface from ``read``/``write``/``await call`` as
        ``grpc.aio.AioRpcError``; convert them with
        :func:`collateral_sync.errors.error_from_rpc_error`.
        """
        return self._sync_positions(requests, timeout=_check_timeout(timeout), metadata=metadata)


class ExchangeClient(_Client):
    """Client of ``ExchangeService`` (served by the exchange)."""

    __slots__ = (
        "_get_credit_line",
        "_get_margin_call",
        "_get_risk_policy",
        "_get_shortfall_allocation",
        "_list_liquidations",
        "_list_margin_calls",
        "_request_pledge_release",
        "_respond_to_margin_call",
    )

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float = DEFAULT_TIMEOUT):
        super().__init__(channel, default_timeout=default_timeout)
        stub = exchange_service_pb2_grpc.ExchangeServiceStub(channel)
        m = exchange_service_pb2
        self._get_risk_policy: _UnaryMethod[m.GetRiskPolicyRequest, m.GetRiskPolicyResponse] = (
            stub.GetRiskPolicy
        )
        self._get_credit_line: _UnaryMethod[m.GetCreditLineRequest, m.GetCreditLineResponse] = (
            stub.GetCreditLine
        )
        self._get_margin_call: _UnaryMethod[m.GetMarginCallRequest, m.GetMarginCallResponse] = (
            stub.GetMarginCall
        )
        self._list_margin_calls: _UnaryMethod[
            m.ListMarginCallsRequest, m.ListMarginCallsResponse
        ] = stub.ListMarginCalls
        self._respond_to_margin_call: _UnaryMethod[
            m.RespondToMarginCallRequest, m.RespondToMarginCallResponse
        ] = stub.RespondToMarginCall
        self._get_shortfall_allocation: _UnaryMethod[
            m.GetShortfallAllocationRequest, m.GetShortfallAllocationResponse
        ] = stub.GetShortfallAllocation
        self._list_liquidations: _UnaryMethod[
            m.ListLiquidationsRequest, m.ListLiquidationsResponse
        ] = stub.ListLiquidations
        self._request_pledge_release: _UnaryMethod[
            m.RequestPledgeReleaseRequest, m.RequestPledgeReleaseResponse
        ] = stub.RequestPledgeRelease

    async def get_risk_policy(
        self,
        request: exchange_service_pb2.GetRiskPolicyRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.GetRiskPolicyResponse:
        """The signed risk policy in force, or a given version."""
        return await self._unary(self._get_risk_policy, request, timeout, metadata)

    async def get_credit_line(
        self,
        request: exchange_service_pb2.GetCreditLineRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.GetCreditLineResponse:
        """The signed credit line of an account."""
        return await self._unary(self._get_credit_line, request, timeout, metadata)

    async def get_margin_call(
        self,
        request: exchange_service_pb2.GetMarginCallRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.GetMarginCallResponse:
        """The signed state of a margin call."""
        return await self._unary(self._get_margin_call, request, timeout, metadata)

    async def list_margin_calls(
        self,
        request: exchange_service_pb2.ListMarginCallsRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.ListMarginCallsResponse:
        """Margin calls of an account, one page."""
        return await self._unary(self._list_margin_calls, request, timeout, metadata)

    async def respond_to_margin_call(
        self,
        request: exchange_service_pb2.RespondToMarginCallRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.RespondToMarginCallResponse:
        """Agree, partially agree or dispute a margin call."""
        return await self._unary(self._respond_to_margin_call, request, timeout, metadata)

    async def get_shortfall_allocation(
        self,
        request: exchange_service_pb2.GetShortfallAllocationRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.GetShortfallAllocationResponse:
        """The signed allocation of a liquidation's shortfall."""
        return await self._unary(self._get_shortfall_allocation, request, timeout, metadata)

    async def list_liquidations(
        self,
        request: exchange_service_pb2.ListLiquidationsRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.ListLiquidationsResponse:
        """Liquidations of an account (instruction, receipt, allocation), one page."""
        return await self._unary(self._list_liquidations, request, timeout, metadata)

    async def request_pledge_release(
        self,
        request: exchange_service_pb2.RequestPledgeReleaseRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> exchange_service_pb2.RequestPledgeReleaseResponse:
        """The exchange's signed consent to the client's signed pledge-release request."""
        return await self._unary(self._request_pledge_release, request, timeout, metadata)


class RegulatorClient(_Client):
    """Client of ``RegulatorService`` (served by the regulator node)."""

    __slots__ = ("_get_reconciliation_result", "_submit_reconciliation_statement")

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float = DEFAULT_TIMEOUT):
        super().__init__(channel, default_timeout=default_timeout)
        stub = regulator_service_pb2_grpc.RegulatorServiceStub(channel)
        m = regulator_service_pb2
        self._submit_reconciliation_statement: _UnaryMethod[
            m.SubmitReconciliationStatementRequest, m.SubmitReconciliationStatementResponse
        ] = stub.SubmitReconciliationStatement
        self._get_reconciliation_result: _UnaryMethod[
            m.GetReconciliationResultRequest, m.GetReconciliationResultResponse
        ] = stub.GetReconciliationResult

    async def submit_reconciliation_statement(
        self,
        request: regulator_service_pb2.SubmitReconciliationStatementRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> regulator_service_pb2.SubmitReconciliationStatementResponse:
        """Submit this party's signed reconciliation statement."""
        return await self._unary(self._submit_reconciliation_statement, request, timeout, metadata)

    async def get_reconciliation_result(
        self,
        request: regulator_service_pb2.GetReconciliationResultRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> regulator_service_pb2.GetReconciliationResultResponse:
        """The signed result for a cut-off, once both statements are in."""
        return await self._unary(self._get_reconciliation_result, request, timeout, metadata)


class ReconciliationClient(_Client):
    """Client of ``ReconciliationService`` (served by custodian and exchange)."""

    __slots__ = (
        "_get_position_tree_nodes",
        "_get_reconciliation_statement",
        "_list_equivocation_evidence",
    )

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float = DEFAULT_TIMEOUT):
        super().__init__(channel, default_timeout=default_timeout)
        stub = reconciliation_service_pb2_grpc.ReconciliationServiceStub(channel)
        m = reconciliation_service_pb2
        self._get_reconciliation_statement: _UnaryMethod[
            m.GetReconciliationStatementRequest, m.GetReconciliationStatementResponse
        ] = stub.GetReconciliationStatement
        self._get_position_tree_nodes: _UnaryMethod[
            m.GetPositionTreeNodesRequest, m.GetPositionTreeNodesResponse
        ] = stub.GetPositionTreeNodes
        self._list_equivocation_evidence: _UnaryMethod[
            m.ListEquivocationEvidenceRequest, m.ListEquivocationEvidenceResponse
        ] = stub.ListEquivocationEvidence

    async def get_reconciliation_statement(
        self,
        request: reconciliation_service_pb2.GetReconciliationStatementRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> reconciliation_service_pb2.GetReconciliationStatementResponse:
        """The signed reconciliation statement for a cut-off."""
        return await self._unary(self._get_reconciliation_statement, request, timeout, metadata)

    async def get_position_tree_nodes(
        self,
        request: reconciliation_service_pb2.GetPositionTreeNodesRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        """Position-tree node hashes, and account positions for leaf ranges."""
        return await self._unary(self._get_position_tree_nodes, request, timeout, metadata)

    async def list_equivocation_evidence(
        self,
        request: reconciliation_service_pb2.ListEquivocationEvidenceRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> reconciliation_service_pb2.ListEquivocationEvidenceResponse:
        """One page of the equivocation evidence the party keeps (regulators only, §10.7)."""
        return await self._unary(self._list_equivocation_evidence, request, timeout, metadata)


class EmergencyReleaseClient(_Client):
    """Client of ``EmergencyReleaseService`` (served by every party)."""

    __slots__ = ("_co_sign_emergency_release",)

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float = DEFAULT_TIMEOUT):
        super().__init__(channel, default_timeout=default_timeout)
        stub = emergency_release_service_pb2_grpc.EmergencyReleaseServiceStub(channel)
        m = emergency_release_service_pb2
        self._co_sign_emergency_release: _UnaryMethod[
            m.CoSignEmergencyReleaseRequest, m.CoSignEmergencyReleaseResponse
        ] = stub.CoSignEmergencyRelease

    async def co_sign_emergency_release(
        self,
        request: emergency_release_service_pb2.CoSignEmergencyReleaseRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> emergency_release_service_pb2.CoSignEmergencyReleaseResponse:
        """Have the peer verify a release and append its signature."""
        return await self._unary(self._co_sign_emergency_release, request, timeout, metadata)


class TestControlClient(_Client):
    """Client of ``TestControlService`` (served only by servers started in test mode).

    A server not in test mode answers UNIMPLEMENTED, raised as an RPCError
    with that status code.
    """

    __test__ = False  # not a pytest test class
    __slots__ = (
        "_accrue_yield",
        "_advance_clock",
        "_deposit",
        "_get_sync_state",
        "_run_settlement_cycle",
        "_run_valuation",
        "_set_exposure",
        "_set_price",
    )

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float = DEFAULT_TIMEOUT):
        super().__init__(channel, default_timeout=default_timeout)
        stub = test_control_pb2_grpc.TestControlServiceStub(channel)
        m = test_control_pb2
        self._set_exposure: _UnaryMethod[m.SetExposureRequest, m.SetExposureResponse] = (
            stub.SetExposure
        )
        self._set_price: _UnaryMethod[m.SetPriceRequest, m.SetPriceResponse] = stub.SetPrice
        self._advance_clock: _UnaryMethod[m.AdvanceClockRequest, m.AdvanceClockResponse] = (
            stub.AdvanceClock
        )
        self._run_valuation: _UnaryMethod[m.RunValuationRequest, m.RunValuationResponse] = (
            stub.RunValuation
        )
        self._deposit: _UnaryMethod[m.DepositRequest, m.DepositResponse] = stub.Deposit
        self._accrue_yield: _UnaryMethod[m.AccrueYieldRequest, m.AccrueYieldResponse] = (
            stub.AccrueYield
        )
        self._get_sync_state: _UnaryMethod[m.GetSyncStateRequest, m.GetSyncStateResponse] = (
            stub.GetSyncState
        )
        self._run_settlement_cycle: _UnaryMethod[
            m.RunSettlementCycleRequest, m.RunSettlementCycleResponse
        ] = stub.RunSettlementCycle

    async def run_settlement_cycle(
        self,
        request: test_control_pb2.RunSettlementCycleRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.RunSettlementCycleResponse:
        """Exchange: net a settlement cycle now and submit it to the custodian."""
        return await self._unary(self._run_settlement_cycle, request, timeout, metadata)

    async def set_exposure(
        self,
        request: test_control_pb2.SetExposureRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.SetExposureResponse:
        """Exchange: set an account's exposure."""
        return await self._unary(self._set_exposure, request, timeout, metadata)

    async def set_price(
        self,
        request: test_control_pb2.SetPriceRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.SetPriceResponse:
        """Exchange: publish a price on its scripted price source."""
        return await self._unary(self._set_price, request, timeout, metadata)

    async def advance_clock(
        self,
        request: test_control_pb2.AdvanceClockRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.AdvanceClockResponse:
        """Move the server's clock forward; returns its new time."""
        return await self._unary(self._advance_clock, request, timeout, metadata)

    async def run_valuation(
        self,
        request: test_control_pb2.RunValuationRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.RunValuationResponse:
        """Exchange: revalue an account now."""
        return await self._unary(self._run_valuation, request, timeout, metadata)

    async def deposit(
        self,
        request: test_control_pb2.DepositRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.DepositResponse:
        """Custodian: credit assets to a client account."""
        return await self._unary(self._deposit, request, timeout, metadata)

    async def accrue_yield(
        self,
        request: test_control_pb2.AccrueYieldRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.AccrueYieldResponse:
        """Custodian: run the daily yield accrual now."""
        return await self._unary(self._accrue_yield, request, timeout, metadata)

    async def get_sync_state(
        self,
        request: test_control_pb2.GetSyncStateRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> test_control_pb2.GetSyncStateResponse:
        """Sync-log heads in both directions."""
        return await self._unary(self._get_sync_state, request, timeout, metadata)
