"""Tests for the typed async clients against real mutual-TLS servers on port 0.

Also covers the server side of the same calls: the error-mapping interceptor
installed by ``create_server``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import typing
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from collateral_sync import clients
from collateral_sync.clients import (
    DEFAULT_SYNC_STREAM_TIMEOUT,
    DEFAULT_TIMEOUT,
    CustodianClient,
    EmergencyReleaseClient,
    ExchangeClient,
    ReconciliationClient,
    RegulatorClient,
    TestControlClient,
)
from collateral_sync.dev_ca import DevPki, create_dev_pki
from collateral_sync.errors import (
    CollateralSyncError,
    RPCError,
    StateError,
    error_from_rpc_error,
)
from collateral_sync.server import create_server, serve
from collateral_sync.transport import SERVICE_MODULES, TlsConfig, secure_channel
from collateral_sync.v1 import (
    custodian_service_pb2,
    custodian_service_pb2_grpc,
    emergency_release_service_pb2,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    exchange_service_pb2_grpc,
    position_sync_pb2,
    reconciliation_service_pb2,
    regulator_service_pb2,
    regulator_service_pb2_grpc,
    test_control_pb2,
)

_T = TypeVar("_T")
SLACK = 0.5
GUARD = 10.0


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("pki"), parties=["custodian-1", "exchange-1"])


class TestExchange(exchange_service_pb2_grpc.ExchangeServiceServicer):
    """One behaviour per method: success, SDK error, crash, hang, echo."""

    __test__ = False  # a servicer, not a pytest class

    def __init__(self) -> None:
        self.never = asyncio.Event()
        self.seen_time_remaining: list[float | None] = []
        self.seen_metadata: list[dict[str, str | bytes]] = []

    async def GetRiskPolicy(
        self, request: exchange_service_pb2.GetRiskPolicyRequest, context: grpc.aio.ServicerContext
    ) -> exchange_service_pb2.GetRiskPolicyResponse:
        self.seen_time_remaining.append(context.time_remaining())
        self.seen_metadata.append(dict(context.invocation_metadata() or ()))
        envelope = envelope_pb2.Envelope(
            payload=b"policy v%d" % request.version,
            payload_type="application/vnd.collateral-sync.v1.risk-policy+proto",
            signatures=[envelope_pb2.Signature(key_id="exchange-1/1", sig=b"\x01" * 64)],
        )
        return exchange_service_pb2.GetRiskPolicyResponse(risk_policy=envelope)

    async def RespondToMarginCall(
        self,
        request: exchange_service_pb2.RespondToMarginCallRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.RespondToMarginCallResponse:
        raise CollateralSyncError(
            "margin call response mc-7 sequence 12 already accepted",
            reason=errors_pb2.ERROR_REASON_REPLAYED,
            metadata={"expected": "sequence > 12", "actual": "12", "statement_id": "mc-7"},
            field_violations={"margin_call_response.header.sequence": "already accepted"},
        )

    async def GetCreditLine(
        self, request: exchange_service_pb2.GetCreditLineRequest, context: grpc.aio.ServicerContext
    ) -> exchange_service_pb2.GetCreditLineResponse:
        raise RuntimeError("database password is hunter2")

    async def GetMarginCall(
        self, request: exchange_service_pb2.GetMarginCallRequest, context: grpc.aio.ServicerContext
    ) -> exchange_service_pb2.GetMarginCallResponse:
        await self.never.wait()
        return exchange_service_pb2.GetMarginCallResponse()

    # ListMarginCalls is left to the generated base class: UNIMPLEMENTED.


class GeneratorSync(custodian_service_pb2_grpc.CustodianServiceServicer):
    """SyncPositions as an async generator."""

    async def SyncPositions(
        self,
        requests: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[custodian_service_pb2.SyncPositionsResponse]:
        async for request in requests:
            yield _answer(request, context)


class WriterSync(custodian_service_pb2_grpc.CustodianServiceServicer):
    """SyncPositions as a coroutine using context.read/write."""

    async def SyncPositions(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            await context.write(_answer(request, context))


def _answer(
    request: custodian_service_pb2.SyncPositionsRequest, context: grpc.aio.ServicerContext
) -> custodian_service_pb2.SyncPositionsResponse:
    frame = request.frame
    if frame.WhichOneof("frame") == "hello":
        # Report the stream deadline the server sees, in whole seconds.
        remaining = context.time_remaining()
        ack = position_sync_pb2.SyncAck(sequence=int(remaining if remaining is not None else 0))
        return custodian_service_pb2.SyncPositionsResponse(
            frame=position_sync_pb2.SyncFrame(ack=ack)
        )
    if frame.ack.sequence == 99:
        raise StateError(
            "expected sequence 5, got 99",
            reason=errors_pb2.ERROR_REASON_SEQUENCE_GAP,
            metadata={"expected": "5", "actual": "99"},
        )
    return custodian_service_pb2.SyncPositionsResponse(frame=frame)


def _tls(pki: DevPki, party: str) -> TlsConfig:
    return TlsConfig.from_dev_pki(pki, party)


def test_success_returns_the_typed_response(pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = TestExchange()
        server = create_server(tls=_tls(pki, "exchange-1"), servicers=[servicer])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "custodian-1")) as channel,
        ):
            client = ExchangeClient(channel)
            response = await client.get_risk_policy(
                exchange_service_pb2.GetRiskPolicyRequest(version=3),
                metadata=[("x-request-id", "r-1"), ("trace-bin", b"\x00\x01")],
            )
        assert isinstance(response, exchange_service_pb2.GetRiskPolicyResponse)
        assert response.risk_policy.payload == b"policy v3"
        assert response.risk_policy.signatures[0].key_id == "exchange-1/1"
        assert servicer.seen_metadata[0]["x-request-id"] == "r-1"
        assert servicer.seen_metadata[0]["trace-bin"] == b"\x00\x01"

    run(scenario())


def test_every_call_carries_the_default_deadline_or_the_given_one(pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = TestExchange()
        server = create_server(tls=_tls(pki, "exchange-1"), servicers=[servicer])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "custodian-1")) as channel,
        ):
            request = exchange_service_pb2.GetRiskPolicyRequest()
            await ExchangeClient(channel).get_risk_policy(request)
            await ExchangeClient(channel, default_timeout=3.0).get_risk_policy(request)
            await ExchangeClient(channel, default_timeout=3.0).get_risk_policy(
                request, timeout=60.0
            )
            # None means "the client default", not "no deadline".
            await ExchangeClient(channel, default_timeout=3.0).get_risk_policy(
                request, timeout=None
            )
        remaining = servicer.seen_time_remaining
        assert all(r is not None for r in remaining)
        default, short, long_, none = typing.cast(list[float], remaining)
        # gRPC rounds the timeout it sends up (to fewer digits), hence the slack.
        assert DEFAULT_TIMEOUT - 1 < default <= DEFAULT_TIMEOUT + SLACK
        assert 2.0 < short <= 3.0 + SLACK
        assert 59.0 < long_ <= 60.0 + SLACK
        assert 2.0 < none <= 3.0 + SLACK

    run(scenario())


def test_sdk_error_arrives_with_reason_code_and_metadata(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=_tls(pki, "exchange-1"), servicers=[TestExchange()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "custodian-1")) as channel,
        ):
            with pytest.raises(RPCError) as info:
                await ExchangeClient(channel).respond_to_margin_call(
                    exchange_service_pb2.RespondToMarginCallRequest()
                )
        err = info.value
        assert err.status_code == grpc.StatusCode.ALREADY_EXISTS
        assert err.code == grpc.StatusCode.ALREADY_EXISTS
        assert err.reason == errors_pb2.ERROR_REASON_REPLAYED
        assert err.reason_name == "REPLAYED"
        assert err.message == "margin call response mc-7 sequence 12 already accepted"
        assert err.metadata == {
            "expected": "sequence > 12",
            "actual": "12",
            "statement_id": "mc-7",
        }
        assert err.field_violations == {"margin_call_response.header.sequence": "already accepted"}
        assert isinstance(err.__cause__, grpc.aio.AioRpcError)

    run(scenario())


def test_unexpected_exception_is_internal_without_its_text(
    pki: DevPki, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> RPCError:
        server = create_server(tls=_tls(pki, "exchange-1"), servicers=[TestExchange()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "custodian-1")) as channel,
        ):
            with pytest.raises(RPCError) as info:
                await ExchangeClient(channel).get_credit_line(
                    exchange_service_pb2.GetCreditLineRequest(account_id="acct-1")
                )
        return info.value

    with caplog.at_level(logging.ERROR, logger="collateral_sync.server"):
        err = run(scenario())
    assert err.status_code == grpc.StatusCode.INTERNAL
    assert err.reason == errors_pb2.ERROR_REASON_UNSPECIFIED
    assert "hunter2" not in err.message
    assert "RuntimeError" not in err.message
    cause = err.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError)
    assert "hunter2" not in (cause.details() or "")
    assert "hunter2" not in str(cause.trailing_metadata())
    # The operator finds the traceback in the local log under the same incident id.
    incident = re.search(r"incident ([0-9a-f]{16})", err.message)
    assert incident is not None
    [record] = [r for r in caplog.records if incident.group(1) in r.getMessage()]
    assert record.exc_info is not None
    assert "hunter2" in str(record.exc_info[1])


def test_unimplemented_stays_unimplemented(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=_tls(pki, "exchange-1"), servicers=[TestExchange()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "custodian-1")) as channel,
        ):
            # A method the servicer inherits from the generated base class.
            with pytest.raises(RPCError) as inherited:
                await ExchangeClient(channel).list_margin_calls(
                    exchange_service_pb2.ListMarginCallsRequest()
                )
            # A service the server does not have at all.
            with pytest.raises(RPCError) as absent:
                await RegulatorClient(channel).get_reconciliation_result(
                    regulator_service_pb2.GetReconciliationResultRequest()
                )
        assert inherited.value.status_code == grpc.StatusCode.UNIMPLEMENTED
        assert "ListMarginCalls" in inherited.value.message
        assert absent.value.status_code == grpc.StatusCode.UNIMPLEMENTED
        assert absent.value.reason == errors_pb2.ERROR_REASON_UNSPECIFIED

    run(scenario())


def test_call_past_its_deadline_raises_deadline_exceeded(pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = TestExchange()
        server = create_server(tls=_tls(pki, "exchange-1"), servicers=[servicer])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "custodian-1")) as channel,
        ):
            request = exchange_service_pb2.GetMarginCallRequest(margin_call_id="mc-1")
            # The outer guard turns a missing deadline into a failure, not a hang.
            with pytest.raises(RPCError) as per_call:
                await asyncio.wait_for(
                    ExchangeClient(channel).get_margin_call(request, timeout=0.1), GUARD
                )
            with pytest.raises(RPCError) as by_default:
                await asyncio.wait_for(
                    ExchangeClient(channel, default_timeout=0.1).get_margin_call(request), GUARD
                )
        assert per_call.value.status_code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert by_default.value.status_code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not servicer.never.is_set()

    run(scenario())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_timeouts_must_be_positive_and_finite(pki: DevPki, bad: float) -> None:
    async def scenario() -> None:
        async with secure_channel("localhost:1", _tls(pki, "custodian-1")) as channel:
            with pytest.raises(ValueError, match="timeout"):
                ExchangeClient(channel, default_timeout=bad)
            client = ExchangeClient(channel)
            with pytest.raises(ValueError, match="timeout"):
                await client.get_risk_policy(
                    exchange_service_pb2.GetRiskPolicyRequest(), timeout=bad
                )
            with pytest.raises(ValueError, match="timeout"):
                CustodianClient(channel).sync_positions(timeout=bad)

    run(scenario())


@pytest.mark.parametrize("servicer_type", [GeneratorSync, WriterSync])
def test_sync_positions_stream_round_trip_and_error(
    pki: DevPki, servicer_type: type[custodian_service_pb2_grpc.CustodianServiceServicer]
) -> None:
    def frame(**kwargs: Any) -> custodian_service_pb2.SyncPositionsRequest:
        return custodian_service_pb2.SyncPositionsRequest(
            frame=position_sync_pb2.SyncFrame(**kwargs)
        )

    async def scenario() -> None:
        server = create_server(tls=_tls(pki, "custodian-1"), servicers=[servicer_type()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "exchange-1")) as channel,
        ):
            call = CustodianClient(channel).sync_positions()
            await call.write(frame(hello=position_sync_pb2.SyncHello(party_id="exchange-1")))
            deadline_ack = await call.read()
            # The stream carries the long session deadline, not the unary default.
            assert (
                DEFAULT_SYNC_STREAM_TIMEOUT - 60
                < deadline_ack.frame.ack.sequence
                <= DEFAULT_SYNC_STREAM_TIMEOUT + 1
            )
            await call.write(frame(ack=position_sync_pb2.SyncAck(sequence=4, entry_hash=b"h")))
            echoed = await call.read()
            assert echoed.frame.ack.sequence == 4
            assert echoed.frame.ack.entry_hash == b"h"
            await call.write(frame(ack=position_sync_pb2.SyncAck(sequence=99)))
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await call.read()
            err = error_from_rpc_error(raw.value)
            assert err.status_code == grpc.StatusCode.OUT_OF_RANGE
            assert err.reason == errors_pb2.ERROR_REASON_SEQUENCE_GAP
            assert err.metadata == {"expected": "5", "actual": "99"}

            # Requests from an async iterator, with a caller-chosen deadline.
            async def hello_only() -> AsyncIterator[custodian_service_pb2.SyncPositionsRequest]:
                yield frame(hello=position_sync_pb2.SyncHello(party_id="exchange-1"))

            responses = [
                r async for r in CustodianClient(channel).sync_positions(hello_only(), timeout=30)
            ]
            assert len(responses) == 1
            assert 20 < responses[0].frame.ack.sequence <= 31

    run(scenario())


_CLIENT_BY_SERVICE = {
    "collateral_sync.v1.CustodianService": (CustodianClient, custodian_service_pb2),
    "collateral_sync.v1.ExchangeService": (ExchangeClient, exchange_service_pb2),
    "collateral_sync.v1.RegulatorService": (RegulatorClient, regulator_service_pb2),
    "collateral_sync.v1.ReconciliationService": (
        ReconciliationClient,
        reconciliation_service_pb2,
    ),
    "collateral_sync.v1.EmergencyReleaseService": (
        EmergencyReleaseClient,
        emergency_release_service_pb2,
    ),
    "collateral_sync.v1.TestControlService": (TestControlClient, test_control_pb2),
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@pytest.mark.parametrize("service_name", sorted(_CLIENT_BY_SERVICE))
def test_each_unary_rpc_has_a_typed_client_method(service_name: str) -> None:
    client_type, module = _CLIENT_BY_SERVICE[service_name]
    service = module.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]]
    public = {
        name
        for name, value in vars(client_type).items()
        if callable(value) and not name.startswith("_")
    }
    expected = {_snake(m.name) for m in service.methods}
    assert public == expected
    for method in service.methods:
        hints = typing.get_type_hints(getattr(client_type, _snake(method.name)))
        if method.client_streaming:
            continue  # sync_positions returns the call object
        assert hints["request"] is getattr(module, method.input_type.name)
        assert hints["return"] is getattr(module, method.output_type.name)


def test_every_service_has_a_client() -> None:
    services = {
        s.full_name for m in SERVICE_MODULES for s in m.DESCRIPTOR.services_by_name.values()
    }
    assert services == set(_CLIENT_BY_SERVICE)
    assert set(clients.__all__) >= {c.__name__ for c, _ in _CLIENT_BY_SERVICE.values()}


def test_client_keeps_its_channel_and_default(pki: DevPki) -> None:
    async def scenario() -> None:
        async with secure_channel("localhost:1", _tls(pki, "custodian-1")) as channel:
            client = RegulatorClient(channel, default_timeout=2.5)
            assert client.channel is channel
            assert client.default_timeout == 2.5
            assert ExchangeClient(channel).default_timeout == DEFAULT_TIMEOUT

    run(scenario())


def test_regulator_servicer_error_mapping_covers_sync_methods(pki: DevPki) -> None:
    # A servicer written with plain (non-async) methods is mapped the same way.
    class SyncRegulator(regulator_service_pb2_grpc.RegulatorServiceServicer):
        def SubmitReconciliationStatement(
            self, request: Any, context: Any
        ) -> regulator_service_pb2.SubmitReconciliationStatementResponse:
            raise StateError(
                "cut-off c-1 already has a statement from exchange-1",
                metadata={"expected": "no statement", "actual": "statement s-9"},
            )

        def GetReconciliationResult(
            self, request: Any, context: Any
        ) -> regulator_service_pb2.GetReconciliationResultResponse:
            return regulator_service_pb2.GetReconciliationResultResponse(
                reconciliation_result=envelope_pb2.Envelope(payload=request.cutoff_id.encode())
            )

    async def scenario() -> None:
        server = create_server(tls=_tls(pki, "exchange-1"), servicers=[SyncRegulator()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", _tls(pki, "custodian-1")) as channel,
        ):
            client = RegulatorClient(channel)
            ok = await client.get_reconciliation_result(
                regulator_service_pb2.GetReconciliationResultRequest(cutoff_id="c-1")
            )
            assert ok.reconciliation_result.payload == b"c-1"
            with pytest.raises(RPCError) as info:
                await client.submit_reconciliation_statement(
                    regulator_service_pb2.SubmitReconciliationStatementRequest()
                )
        assert info.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.reason == errors_pb2.ERROR_REASON_STATE_CONFLICT
        assert info.value.metadata["actual"] == "statement s-9"

    run(scenario())
