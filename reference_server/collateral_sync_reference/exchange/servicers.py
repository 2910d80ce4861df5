"""gRPC faces of the reference exchange: ExchangeService, and TestControlService in test mode.

The servicers only translate: request fields in, signed statements out.
Every rule lives in a part of :class:`~collateral_sync_reference.exchange.core.ExchangeCore`,
who may read the part's data included: its ``readers_of_...``, which a
servicer checks with :func:`~collateral_sync_reference.common.access.require_reader`
after the required fields and before the lookup (PROTOCOL.md §4.5);
every failure is a :class:`~collateral_sync.errors.CollateralSyncError`
that the SDK's error-mapping interceptor turns into the status and details
the protocol names, and a refused request changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc.aio
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import MalformedError
from collateral_sync.sync import SyncSession
from collateral_sync.v1 import (
    common_pb2,
    exchange_service_pb2,
    exchange_service_pb2_grpc,
    test_control_pb2,
)

from collateral_sync_reference.common.access import Caller, require_reader
from collateral_sync_reference.common.clock import TestClock
from collateral_sync_reference.common.test_control import TestControlBase
from collateral_sync_reference.exchange.core import ExchangeCore

__all__ = ["ExchangeServicer", "ExchangeTestControl"]


def _required(present: bool, field: str, expected: str) -> None:
    if not present:
        raise MalformedError(
            f"{field}: expected {expected}, got nothing",
            metadata={"field": field, "expected": expected, "actual": "absent"},
            field_violations={field: "required"},
        )


class ExchangeServicer(exchange_service_pb2_grpc.ExchangeServiceServicer):
    """ExchangeService over an :class:`ExchangeCore`.

    ``caller`` says who is calling (the role knows the registry and whether
    the server runs without TLS).
    """

    def __init__(
        self, core: ExchangeCore, caller: Callable[[grpc.aio.ServicerContext], Caller]
    ) -> None:
        self._core = core
        self._caller = caller

    def _require_account_reader(self, context: grpc.aio.ServicerContext, account_id: str) -> None:
        """An account's data: its parties and a regulator may read it (PROTOCOL.md §4.5)."""
        _required(bool(account_id), "account_id", "an account id")
        require_reader(
            self._caller(context),
            self._core.holdings.readers_of_account(account_id),
            field="account_id",
        )

    async def GetRiskPolicy(
        self,
        request: exchange_service_pb2.GetRiskPolicyRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.GetRiskPolicyResponse:
        return exchange_service_pb2.GetRiskPolicyResponse(
            risk_policy=self._core.policies.risk_policy(request.version)
        )

    async def GetCreditLine(
        self,
        request: exchange_service_pb2.GetCreditLineRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.GetCreditLineResponse:
        self._require_account_reader(context, request.account_id)
        return exchange_service_pb2.GetCreditLineResponse(
            credit_line=self._core.credit_lines.credit_line(request.account_id)
        )

    async def GetMarginCall(
        self,
        request: exchange_service_pb2.GetMarginCallRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.GetMarginCallResponse:
        _required(bool(request.margin_call_id), "margin_call_id", "a margin call id")
        require_reader(
            self._caller(context),
            self._core.margin_calls.readers_of_call(request.margin_call_id),
            field="margin_call_id",
        )
        return exchange_service_pb2.GetMarginCallResponse(
            margin_call_state=self._core.margin_calls.margin_call_state(request.margin_call_id)
        )

    async def ListMarginCalls(
        self,
        request: exchange_service_pb2.ListMarginCallsRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.ListMarginCallsResponse:
        self._require_account_reader(context, request.account_id)
        states, token = self._core.margin_calls.list_margin_calls(
            request.account_id, request.page_size, request.page_token
        )
        return exchange_service_pb2.ListMarginCallsResponse(
            margin_call_states=states, next_page_token=token
        )

    async def RespondToMarginCall(
        self,
        request: exchange_service_pb2.RespondToMarginCallRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.RespondToMarginCallResponse:
        # The response authenticates itself: any registered party may relay it.
        _required(
            request.HasField("margin_call_response"),
            "margin_call_response",
            "an Envelope of a MarginCallResponse",
        )
        state = self._core.margin_calls.respond_to_margin_call(request.margin_call_response)
        return exchange_service_pb2.RespondToMarginCallResponse(margin_call_state=state)

    async def GetShortfallAllocation(
        self,
        request: exchange_service_pb2.GetShortfallAllocationRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.GetShortfallAllocationResponse:
        _required(bool(request.liquidation_id), "liquidation_id", "a liquidation id")
        require_reader(
            self._caller(context),
            self._core.liquidations.readers_of_liquidation(request.liquidation_id),
            field="liquidation_id",
        )
        return exchange_service_pb2.GetShortfallAllocationResponse(
            shortfall_allocation=self._core.liquidations.shortfall_allocation(
                request.liquidation_id
            )
        )

    async def ListLiquidations(
        self,
        request: exchange_service_pb2.ListLiquidationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.ListLiquidationsResponse:
        self._require_account_reader(context, request.account_id)
        records, token = self._core.liquidations.list_liquidations(
            request.account_id, request.page_size, request.page_token
        )
        return exchange_service_pb2.ListLiquidationsResponse(
            liquidations=records, next_page_token=token
        )

    async def RequestPledgeRelease(
        self,
        request: exchange_service_pb2.RequestPledgeReleaseRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.RequestPledgeReleaseResponse:
        # The request authenticates itself: any registered party may relay it.
        _required(
            request.HasField("pledge_release_request"),
            "pledge_release_request",
            "an Envelope of a PledgeReleaseRequest",
        )
        consent = self._core.release_consents.consent(request.pledge_release_request)
        return exchange_service_pb2.RequestPledgeReleaseResponse(consent=consent)


class ExchangeTestControl(TestControlBase):
    """TestControlService of the exchange: exposure, prices and valuation on demand."""

    __test__ = False

    def __init__(
        self,
        core: ExchangeCore,
        clock: TestClock | None,
        *,
        sessions: Callable[[], Sequence[SyncSession]],
        on_clock_advanced: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(clock, sessions=sessions, on_clock_advanced=on_clock_advanced)
        self._core = core

    async def SetExposure(
        self, request: test_control_pb2.SetExposureRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.SetExposureResponse:
        _required(bool(request.account_id), "account_id", "an account id")
        _required(request.HasField("exposure"), "exposure", "a Decimal")
        exposure = parse_amount(request.exposure.value, field="exposure")
        self._core.revaluer.set_exposure(request.account_id, exposure)
        return test_control_pb2.SetExposureResponse()

    async def SetPrice(
        self, request: test_control_pb2.SetPriceRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.SetPriceResponse:
        _required(request.HasField("quote"), "quote", "a PriceQuote")
        self._core.revaluer.set_price(request.quote)
        return test_control_pb2.SetPriceResponse()

    async def RunValuation(
        self, request: test_control_pb2.RunValuationRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.RunValuationResponse:
        _required(bool(request.account_id), "account_id", "an account id")
        result = self._core.revaluer.run_valuation(request.account_id)
        response = test_control_pb2.RunValuationResponse(
            margin_call_id=result.margin_call_id, liquidation_id=result.liquidation_id
        )
        if result.collateral_ratio is not None:
            response.collateral_ratio.CopyFrom(
                common_pb2.Decimal(value=format_amount(result.collateral_ratio))
            )
        return response
