"""TestControlService parts every role shares: moving the clock, reporting sync heads.

A role subclasses :class:`TestControlBase` and adds the RPCs that are its own
(the custodian's Deposit and AccrueYield, the exchange's SetExposure, SetPrice
and RunValuation); the RPCs a role does not override answer UNIMPLEMENTED, as
the generated base class does, which the conformance kit reports as skipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import grpc.aio
from collateral_sync.errors import MalformedError, StateError
from collateral_sync.sync import SyncSession
from collateral_sync.v1 import test_control_pb2, test_control_pb2_grpc

from collateral_sync_reference.common.clock import TestClock

__all__ = ["TestControlBase", "sync_direction_states"]

_MAX_ADVANCE = timedelta(days=3660)


def sync_direction_states(session: SyncSession) -> list[test_control_pb2.SyncDirectionState]:
    """Both directions of one peer's sync logs as GetSyncState reports them."""
    log = session.log
    sent = log.sent_head()
    received = log.received_head()
    return [
        test_control_pb2.SyncDirectionState(
            direction=log.sending_direction,  # type: ignore[arg-type]
            sequence=sent.sequence,
            entry_hash=sent.entry_hash,
            acknowledged_sequence=session.acknowledged_sequence,
        ),
        test_control_pb2.SyncDirectionState(
            direction=log.receiving_direction,  # type: ignore[arg-type]
            sequence=received.sequence,
            entry_hash=received.entry_hash,
            # Entries are applied in the transaction that stores them.
            applied_count=received.sequence,
        ),
    ]


class TestControlBase(test_control_pb2_grpc.TestControlServiceServicer):
    """AdvanceClock and GetSyncState; the role adds its own RPCs."""

    __test__ = False  # a servicer, not a pytest class

    def __init__(
        self,
        clock: TestClock | None,
        *,
        sessions: Callable[[], Sequence[SyncSession]],
        on_clock_advanced: Callable[[], Awaitable[None]],
    ) -> None:
        self._clock = clock
        self._sessions = sessions
        self._on_clock_advanced = on_clock_advanced

    async def AdvanceClock(
        self, request: test_control_pb2.AdvanceClockRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.AdvanceClockResponse:
        if self._clock is None:
            raise StateError(
                "this server's clock is the real one; AdvanceClock needs --test-mode",
                metadata={"expected": "test mode", "actual": "production clock"},
            )
        if not request.HasField("by"):
            raise MalformedError(
                "AdvanceClock needs 'by', the duration to move forward",
                metadata={"field": "by", "expected": "a duration", "actual": "absent"},
                field_violations={"by": "required"},
            )
        if not 0 <= request.by.seconds <= _MAX_ADVANCE.total_seconds() or not (
            0 <= request.by.nanos < 1_000_000_000
        ):
            raise MalformedError(
                f"by must be between 0 and {_MAX_ADVANCE.days} days, got "
                f"{request.by.seconds}s {request.by.nanos}ns",
                metadata={
                    "field": "by",
                    "expected": f"0..{_MAX_ADVANCE.days} days",
                    "actual": f"{request.by.seconds}s",
                },
                field_violations={"by": "out of range"},
            )
        now = self._clock.advance(request.by.ToTimedelta())
        # Time-driven work that fell due (settlements, yield) is done before we answer.
        await self._on_clock_advanced()
        response = test_control_pb2.AdvanceClockResponse()
        response.now.FromDatetime(now)
        return response

    async def GetSyncState(
        self, request: test_control_pb2.GetSyncStateRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.GetSyncStateResponse:
        directions: list[test_control_pb2.SyncDirectionState] = []
        for session in self._sessions():
            directions.extend(sync_direction_states(session))
        return test_control_pb2.GetSyncStateResponse(directions=directions)

    # The role-specific RPCs: UNIMPLEMENTED unless the role overrides them.

    async def SetExposure(
        self, request: test_control_pb2.SetExposureRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.SetExposureResponse:
        raise NotImplementedError("SetExposure is served by the exchange")

    async def SetPrice(
        self, request: test_control_pb2.SetPriceRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.SetPriceResponse:
        raise NotImplementedError("SetPrice is served by the exchange")

    async def RunValuation(
        self, request: test_control_pb2.RunValuationRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.RunValuationResponse:
        raise NotImplementedError("RunValuation is served by the exchange")

    async def Deposit(
        self, request: test_control_pb2.DepositRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.DepositResponse:
        raise NotImplementedError("Deposit is served by the custodian")

    async def AccrueYield(
        self, request: test_control_pb2.AccrueYieldRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.AccrueYieldResponse:
        raise NotImplementedError("AccrueYield is served by the custodian")

    async def RunSettlementCycle(
        self,
        request: test_control_pb2.RunSettlementCycleRequest,
        context: grpc.aio.ServicerContext,
    ) -> test_control_pb2.RunSettlementCycleResponse:
        raise NotImplementedError("RunSettlementCycle is served by the exchange")
