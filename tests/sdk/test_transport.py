"""Tests for mutual TLS, channel options, retry policy and the server helpers.

Real grpc.aio servers on port 0; every test runs its own event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from collateral_sync import v1 as v1_package
from collateral_sync.clients import ExchangeClient
from collateral_sync.dev_ca import DevPki, create_dev_pki
from collateral_sync.errors import MalformedError, RPCError, error_from_rpc_error
from collateral_sync.server import (
    add_servicer,
    create_server,
    serve,
    service_names,
    set_service_status,
    start_server,
    stop_server,
)
from collateral_sync.transport import (
    MAX_MESSAGE_BYTES,
    SERVICE_MODULES,
    RetryPolicy,
    TlsConfig,
    channel_options,
    check_peer_party,
    idempotent_methods,
    peer_party_id,
    plaintext_channel_for_testing,
    secure_channel,
    server_options,
    service_config_json,
)
from collateral_sync.v1 import (
    custodian_service_pb2,
    custodian_service_pb2_grpc,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    exchange_service_pb2_grpc,
    regulator_service_pb2,
    regulator_service_pb2_grpc,
    test_control_pb2,
    test_control_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

_T = TypeVar("_T")

EXCHANGE = "collateral_sync.v1.ExchangeService"
REGULATOR = "collateral_sync.v1.RegulatorService"
TEST_CONTROL = "collateral_sync.v1.TestControlService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.02)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(
        tmp_path_factory.mktemp("pki"), parties=["custodian-1", "exchange-1", "regulator"]
    )


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    # Same party names, same CA name, different keys.
    return create_dev_pki(tmp_path_factory.mktemp("foreign"), parties=["custodian-1"])


class FlakyExchange(exchange_service_pb2_grpc.ExchangeServiceServicer):
    """Counts calls; fails the first ``fail_first`` with UNAVAILABLE."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: dict[str, int] = {}
        self.fail_first = fail_first

    async def _count(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.fail_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    async def GetRiskPolicy(
        self, request: exchange_service_pb2.GetRiskPolicyRequest, context: grpc.aio.ServicerContext
    ) -> exchange_service_pb2.GetRiskPolicyResponse:
        await self._count("GetRiskPolicy", context)
        envelope = envelope_pb2.Envelope(payload=b"policy", payload_type="risk-policy")
        return exchange_service_pb2.GetRiskPolicyResponse(risk_policy=envelope)

    async def GetCreditLine(
        self, request: exchange_service_pb2.GetCreditLineRequest, context: grpc.aio.ServicerContext
    ) -> exchange_service_pb2.GetCreditLineResponse:
        # Echo the TLS identity so the client can see what the server saw.
        await self._count("GetCreditLine", context)
        peer = peer_party_id(context)
        envelope = envelope_pb2.Envelope(payload_type=peer or "")
        if request.account_id:
            check_peer_party(context, request.account_id)
        return exchange_service_pb2.GetCreditLineResponse(credit_line=envelope)

    async def RespondToMarginCall(
        self,
        request: exchange_service_pb2.RespondToMarginCallRequest,
        context: grpc.aio.ServicerContext,
    ) -> exchange_service_pb2.RespondToMarginCallResponse:
        await self._count("RespondToMarginCall", context)
        return exchange_service_pb2.RespondToMarginCallResponse()


class AlwaysUnavailableRegulator(regulator_service_pb2_grpc.RegulatorServiceServicer):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def _fail(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down")

    async def SubmitReconciliationStatement(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> regulator_service_pb2.SubmitReconciliationStatementResponse:
        await self._fail("SubmitReconciliationStatement", context)
        return regulator_service_pb2.SubmitReconciliationStatementResponse()

    async def GetReconciliationResult(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> regulator_service_pb2.GetReconciliationResultResponse:
        await self._fail("GetReconciliationResult", context)
        return regulator_service_pb2.GetReconciliationResultResponse()


def tls(pki: DevPki, party: str) -> TlsConfig:
    return TlsConfig.from_dev_pki(pki, party)


# --- TlsConfig -------------------------------------------------------------


def test_tls_config_from_files_reads_pem_and_names_the_party(pki: DevPki) -> None:
    files = pki.party("exchange-1")
    config = TlsConfig.from_files(pki.ca_cert, files.cert, files.key)
    assert config.ca_cert == pki.ca_cert.read_bytes()
    assert config.cert_chain == files.cert.read_bytes()
    assert config.private_key == files.key.read_bytes()
    assert config.party_id == "exchange-1"
    with pytest.raises(AttributeError):
        config.ca_cert = b""  # type: ignore[misc]


def test_tls_config_rejects_a_key_that_is_not_the_certificates(pki: DevPki) -> None:
    with pytest.raises(MalformedError) as info:
        TlsConfig.from_files(
            pki.ca_cert, pki.party("exchange-1").cert, pki.party("custodian-1").key
        )
    assert info.value.metadata["actual"] == "another key"


def test_tls_config_rejects_non_pem(pki: DevPki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello")
    files = pki.party("exchange-1")
    with pytest.raises(MalformedError):
        TlsConfig.from_files(garbage, files.cert, files.key)
    with pytest.raises(MalformedError):
        TlsConfig.from_files(pki.ca_cert, garbage, files.key)
    with pytest.raises(MalformedError):
        TlsConfig.from_files(pki.ca_cert, files.cert, garbage)


# --- service config and options ------------------------------------------


def test_service_modules_are_every_generated_module_that_defines_a_service() -> None:
    with_services = set()
    for info in pkgutil.iter_modules(v1_package.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"{v1_package.__name__}.{info.name}")
            if module.DESCRIPTOR.services_by_name:
                with_services.add(info.name)
    assert {m.__name__.rsplit(".", 1)[1] for m in SERVICE_MODULES} == with_services
    # Test control is served only in test mode, but it is a service like the others.
    assert "test_control_pb2" in with_services
    assert "custodian_service_pb2" in with_services


def test_idempotent_methods_are_exactly_the_unary_reads() -> None:
    methods = set(idempotent_methods())
    every_rpc = {
        (service.full_name, method.name): method
        for module in SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    reads = {
        key
        for key, method in every_rpc.items()
        if key[1].startswith(("Get", "List"))
        and not (method.client_streaming or method.server_streaming)
    }
    assert methods == reads
    assert (EXCHANGE, "GetRiskPolicy") in methods
    assert (EXCHANGE, "ListMarginCalls") in methods
    assert ("collateral_sync.v1.CustodianService", "GetInclusionProof") in methods
    for never in [
        ("collateral_sync.v1.CustodianService", "SyncPositions"),
        ("collateral_sync.v1.CustodianService", "PledgeCollateral"),
        ("collateral_sync.v1.CustodianService", "RequestRedemption"),
        ("collateral_sync.v1.CustodianService", "SubmitLiquidationInstruction"),
        ("collateral_sync.v1.CustodianService", "ExecuteEmergencyRelease"),
        ("collateral_sync.v1.EmergencyReleaseService", "CoSignEmergencyRelease"),
        (EXCHANGE, "RespondToMarginCall"),
        (REGULATOR, "SubmitReconciliationStatement"),
    ]:
        assert never in every_rpc
        assert never not in methods


def test_service_config_retries_only_on_unavailable_with_bounds() -> None:
    config = json.loads(service_config_json(FAST_RETRY))
    [method_config] = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == set(idempotent_methods())
    assert all("method" in n for n in method_config["name"])  # no service-wide entry
    assert method_config["retryPolicy"] == {
        "maxAttempts": 3,
        "initialBackoff": "0.01s",
        "maxBackoff": "0.02s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 1},
        {"max_attempts": 6},
        {"initial_backoff_seconds": 0.0},
        {"max_backoff_seconds": float("inf")},
        {"initial_backoff_seconds": 1.0, "max_backoff_seconds": 0.5},
    ],
)
def test_retry_policy_rejects_unbounded_or_invalid(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_channel_and_server_options_agree_on_message_size() -> None:
    client = dict(channel_options())
    server = dict(server_options())
    for key in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
        assert client[key] == server[key] == MAX_MESSAGE_BYTES
    # The client's keepalive interval must not be shorter than what servers accept.
    assert (
        client["grpc.keepalive_time_ms"]
        >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    )
    overridden = dict(channel_options(extra=[("grpc.keepalive_time_ms", 60_000)]))
    assert overridden["grpc.keepalive_time_ms"] == 60_000
    assert len(channel_options(extra=[("grpc.keepalive_time_ms", 1)])) == len(channel_options())
    with pytest.raises(ValueError):
        channel_options(max_message_bytes=0)


# --- mutual TLS ------------------------------------------------------------


def test_mutual_tls_call_sees_the_client_party(pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = FlakyExchange()
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[servicer])
        async with serve(server) as port:
            # Both names are SANs of the server certificate.
            for target in (f"localhost:{port}", f"127.0.0.1:{port}"):
                async with secure_channel(target, tls(pki, "custodian-1")) as channel:
                    response = await ExchangeClient(channel).get_credit_line(
                        exchange_service_pb2.GetCreditLineRequest()
                    )
                    assert response.credit_line.payload_type == "custodian-1"

    run(scenario())


def test_check_peer_party_refuses_another_party(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", tls(pki, "custodian-1")) as channel,
        ):
            client = ExchangeClient(channel)
            ok = await client.get_credit_line(
                exchange_service_pb2.GetCreditLineRequest(account_id="custodian-1")
            )
            assert ok.credit_line.payload_type == "custodian-1"
            with pytest.raises(RPCError) as info:
                await client.get_credit_line(
                    exchange_service_pb2.GetCreditLineRequest(account_id="regulator")
                )
        assert info.value.status_code == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.reason == errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH
        assert info.value.metadata == {"expected": "regulator", "actual": "custodian-1"}

    run(scenario())


def test_client_without_certificate_is_refused(pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = FlakyExchange()
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[servicer])
        async with serve(server) as port:
            no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
            async with grpc.aio.secure_channel(
                f"localhost:{port}", no_cert, options=channel_options()
            ) as channel:
                with pytest.raises(RPCError) as info:
                    await ExchangeClient(channel).respond_to_margin_call(
                        exchange_service_pb2.RespondToMarginCallRequest(), timeout=5
                    )
            assert info.value.status_code == grpc.StatusCode.UNAVAILABLE
            assert servicer.calls == {}

    run(scenario())


def test_client_from_another_ca_is_refused(pki: DevPki, foreign_pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = FlakyExchange()
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[servicer])
        async with serve(server) as port:
            # Trusts the server's CA but presents a certificate the server does not trust.
            outsider = TlsConfig(
                ca_cert=pki.ca_cert.read_bytes(),
                cert_chain=foreign_pki.party("custodian-1").cert.read_bytes(),
                private_key=foreign_pki.party("custodian-1").key.read_bytes(),
            )
            async with secure_channel(f"localhost:{port}", outsider) as channel:
                with pytest.raises(RPCError) as info:
                    await ExchangeClient(channel).respond_to_margin_call(
                        exchange_service_pb2.RespondToMarginCallRequest(), timeout=5
                    )
            assert info.value.status_code == grpc.StatusCode.UNAVAILABLE
            assert servicer.calls == {}

    run(scenario())


def test_client_trusting_another_ca_refuses_the_server(pki: DevPki, foreign_pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = FlakyExchange()
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[servicer])
        async with serve(server) as port:
            # A certificate the server would accept, but the wrong trust anchor.
            misled = TlsConfig(
                ca_cert=foreign_pki.ca_cert.read_bytes(),
                cert_chain=pki.party("custodian-1").cert.read_bytes(),
                private_key=pki.party("custodian-1").key.read_bytes(),
            )
            async with secure_channel(f"localhost:{port}", misled) as channel:
                with pytest.raises(RPCError) as info:
                    await ExchangeClient(channel).respond_to_margin_call(
                        exchange_service_pb2.RespondToMarginCallRequest(), timeout=5
                    )
            assert info.value.status_code == grpc.StatusCode.UNAVAILABLE
            assert servicer.calls == {}

    run(scenario())


def test_server_name_must_match_certificate(pki: DevPki, tmp_path: Path) -> None:
    # A server whose certificate names only exchange.test: dialling 127.0.0.1
    # fails the hostname check unless the expected name is given.
    named = create_dev_pki(tmp_path, parties=["exchange-1", "custodian-1"], hosts=["exchange.test"])

    async def scenario() -> None:
        server = create_server(tls=tls(named, "exchange-1"), servicers=[FlakyExchange()])
        async with serve(server) as port:
            async with secure_channel(
                f"127.0.0.1:{port}", tls(named, "custodian-1"), retry_policy=FAST_RETRY
            ) as channel:
                with pytest.raises(RPCError) as info:
                    await ExchangeClient(channel).get_risk_policy(
                        exchange_service_pb2.GetRiskPolicyRequest(), timeout=5
                    )
                assert info.value.status_code == grpc.StatusCode.UNAVAILABLE
            async with secure_channel(
                f"127.0.0.1:{port}", tls(named, "custodian-1"), server_name_override="exchange.test"
            ) as channel:
                response = await ExchangeClient(channel).get_risk_policy(
                    exchange_service_pb2.GetRiskPolicyRequest()
                )
                assert response.risk_policy.payload == b"policy"

    run(scenario())


def test_plaintext_needs_explicit_opt_in(pki: DevPki) -> None:
    with pytest.raises(ValueError, match="mutual TLS"):
        create_server(tls=None)
    with pytest.raises(ValueError, match="conflicts"):
        create_server(tls=tls(pki, "exchange-1"), plaintext_for_testing=True)

    async def scenario() -> None:
        server = create_server(tls=None, plaintext_for_testing=True, servicers=[FlakyExchange()])
        async with serve(server) as port:
            async with plaintext_channel_for_testing(f"127.0.0.1:{port}") as channel:
                response = await ExchangeClient(channel).get_credit_line(
                    exchange_service_pb2.GetCreditLineRequest()
                )
                # No certificate, no party.
                assert response.credit_line.payload_type == ""
            # A TLS client does not talk to a plaintext server.
            async with secure_channel(
                f"localhost:{port}", tls(pki, "custodian-1"), retry_policy=FAST_RETRY
            ) as channel:
                with pytest.raises(RPCError) as info:
                    await ExchangeClient(channel).get_credit_line(
                        exchange_service_pb2.GetCreditLineRequest(), timeout=5
                    )
                assert info.value.status_code == grpc.StatusCode.UNAVAILABLE

    run(scenario())


# --- message size ------------------------------------------------------------


def test_oversized_messages_are_refused_on_both_sides(pki: DevPki) -> None:
    big = exchange_service_pb2.GetCreditLineRequest(account_id="x" * (MAX_MESSAGE_BYTES + 1))

    async def scenario() -> None:
        servicer = FlakyExchange()
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[servicer])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", tls(pki, "custodian-1")) as channel,
        ):
            with pytest.raises(RPCError) as info:
                await ExchangeClient(channel).get_credit_line(big)
            assert info.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A client that allows itself more still hits the server's limit.
            async with secure_channel(
                f"localhost:{port}",
                tls(pki, "custodian-1"),
                max_message_bytes=2 * MAX_MESSAGE_BYTES,
            ) as generous:
                with pytest.raises(RPCError) as info:
                    await ExchangeClient(generous).get_credit_line(big)
                assert info.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert servicer.calls == {}

    run(scenario())


# --- retry policy --------------------------------------------------------------


def test_idempotent_read_is_retried_after_unavailable(pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = FlakyExchange(fail_first=1)
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[servicer])
        async with (
            serve(server) as port,
            secure_channel(
                f"localhost:{port}", tls(pki, "custodian-1"), retry_policy=FAST_RETRY
            ) as channel,
        ):
            response = await ExchangeClient(channel).get_risk_policy(
                exchange_service_pb2.GetRiskPolicyRequest()
            )
        assert response.risk_policy.payload == b"policy"
        assert servicer.calls == {"GetRiskPolicy": 2}

    run(scenario())


def test_retries_are_bounded(pki: DevPki) -> None:
    async def scenario() -> None:
        servicer = FlakyExchange(fail_first=100)
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[servicer])
        async with (
            serve(server) as port,
            secure_channel(
                f"localhost:{port}", tls(pki, "custodian-1"), retry_policy=FAST_RETRY
            ) as channel,
        ):
            with pytest.raises(RPCError) as info:
                await ExchangeClient(channel).get_risk_policy(
                    exchange_service_pb2.GetRiskPolicyRequest()
                )
        assert info.value.status_code == grpc.StatusCode.UNAVAILABLE
        assert servicer.calls == {"GetRiskPolicy": FAST_RETRY.max_attempts}

    run(scenario())


def test_non_idempotent_calls_are_never_retried(pki: DevPki) -> None:
    async def scenario() -> None:
        exchange = FlakyExchange(fail_first=1)
        regulator = AlwaysUnavailableRegulator()
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[exchange, regulator])
        async with (
            serve(server) as port,
            secure_channel(
                f"localhost:{port}", tls(pki, "custodian-1"), retry_policy=FAST_RETRY
            ) as channel,
        ):
            with pytest.raises(RPCError) as info:
                await ExchangeClient(channel).respond_to_margin_call(
                    exchange_service_pb2.RespondToMarginCallRequest()
                )
            assert info.value.status_code == grpc.StatusCode.UNAVAILABLE
            regulator_stub = regulator_service_pb2_grpc.RegulatorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await regulator_stub.SubmitReconciliationStatement(
                    regulator_service_pb2.SubmitReconciliationStatementRequest(), timeout=5
                )
            assert raw.value.code() == grpc.StatusCode.UNAVAILABLE
            # Same server, same channel: the read next to it is retried.
            with pytest.raises(grpc.aio.AioRpcError):
                await regulator_stub.GetReconciliationResult(
                    regulator_service_pb2.GetReconciliationResultRequest(), timeout=5
                )
        assert exchange.calls == {"RespondToMarginCall": 1}
        assert regulator.calls == {
            "SubmitReconciliationStatement": 1,
            "GetReconciliationResult": FAST_RETRY.max_attempts,
        }

    run(scenario())


# --- server helpers: health, reflection, lifecycle -------------------------


async def _reflection_request(
    channel: grpc.aio.Channel,
    request: reflection_pb2.ServerReflectionRequest,
    *,
    version: str = "v1alpha",
) -> reflection_pb2.ServerReflectionResponse:
    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield request

    if version == "v1alpha":
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            requests(), timeout=5
        )
    else:
        # v1 messages are wire-identical to v1alpha; only the method path differs.
        method = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = method(requests(), timeout=5)
    responses = [r async for r in call]
    assert len(responses) == 1
    response: reflection_pb2.ServerReflectionResponse = responses[0]
    return response


def test_health_and_reflection_list_the_added_services(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
        assert add_servicer(server, AlwaysUnavailableRegulator()) == REGULATOR
        assert service_names(server) == (EXCHANGE, REGULATOR)
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", tls(pki, "custodian-1")) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", EXCHANGE, REGULATOR):
                response = await health.Check(
                    health_pb2.HealthCheckRequest(service=name), timeout=5
                )
                assert response.status == health_pb2.HealthCheckResponse.SERVING, name
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(
                    health_pb2.HealthCheckRequest(service="collateral_sync.v1.CustodianService"),
                    timeout=5,
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            await set_service_status(server, REGULATOR, health_pb2.HealthCheckResponse.NOT_SERVING)
            response = await health.Check(
                health_pb2.HealthCheckRequest(service=REGULATOR), timeout=5
            )
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING

            listed = await _reflection_request(
                channel, reflection_pb2.ServerReflectionRequest(list_services="")
            )
            assert sorted(s.name for s in listed.list_services_response.service) == sorted(
                [EXCHANGE, REGULATOR, HEALTH, REFLECTION, REFLECTION_V1]
            )
            # Current tools (grpcurl) ask reflection v1: it answers the same.
            listed_v1 = await _reflection_request(
                channel, reflection_pb2.ServerReflectionRequest(list_services=""), version="v1"
            )
            assert listed_v1 == listed
            described_v1 = await _reflection_request(
                channel,
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=EXCHANGE),
                version="v1",
            )
            assert described_v1.file_descriptor_response.file_descriptor_proto
            described = await _reflection_request(
                channel,
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=EXCHANGE),
            )
            assert described.file_descriptor_response.file_descriptor_proto

    run(scenario())


class SyncStateOnlyTestControl(test_control_pb2_grpc.TestControlServiceServicer):
    """A test-mode server's TestControlService; GetSyncState answers, the rest UNIMPLEMENTED."""

    async def GetSyncState(
        self, request: test_control_pb2.GetSyncStateRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.GetSyncStateResponse:
        return test_control_pb2.GetSyncStateResponse(
            directions=[test_control_pb2.SyncDirectionState(sequence=7)]
        )


def test_test_control_is_added_and_announced_like_any_other_service(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
        assert add_servicer(server, SyncStateOnlyTestControl()) == TEST_CONTROL
        assert service_names(server) == (EXCHANGE, TEST_CONTROL)
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", tls(pki, "custodian-1")) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(
                health_pb2.HealthCheckRequest(service=TEST_CONTROL), timeout=5
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            listed = await _reflection_request(
                channel, reflection_pb2.ServerReflectionRequest(list_services="")
            )
            assert sorted(s.name for s in listed.list_services_response.service) == sorted(
                [EXCHANGE, TEST_CONTROL, HEALTH, REFLECTION, REFLECTION_V1]
            )
            described = await _reflection_request(
                channel,
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=TEST_CONTROL),
            )
            assert described.file_descriptor_response.file_descriptor_proto
            # Served through the same interceptors: an unimplemented RPC is mapped, not a crash.
            stub = test_control_pb2_grpc.TestControlServiceStub(channel)
            state = await stub.GetSyncState(test_control_pb2.GetSyncStateRequest(), timeout=5)
            assert [d.sequence for d in state.directions] == [7]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Deposit(test_control_pb2.DepositRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(scenario())


def test_set_service_status_rejects_unknown_service(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
        with pytest.raises(KeyError):
            await set_service_status(server, REGULATOR, health_pb2.HealthCheckResponse.SERVING)

    run(scenario())


def test_server_lifecycle_misuse_is_refused(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
        with pytest.raises(ValueError, match="already added"):
            add_servicer(server, FlakyExchange())
        with pytest.raises(TypeError):
            add_servicer(server, object())
        port = await start_server(server)
        assert port > 0
        try:
            with pytest.raises(RuntimeError):
                add_servicer(server, AlwaysUnavailableRegulator())
            with pytest.raises(RuntimeError):
                await start_server(server)
            # Binding a port another server holds fails instead of sharing it.
            other = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
            with pytest.raises(OSError, match="could not bind"):
                await start_server(other, f"127.0.0.1:{port}")
            await other.stop(None)
        finally:
            await stop_server(server)
        foreign = grpc.aio.server()
        with pytest.raises(ValueError, match="create_server"):
            await start_server(foreign)
        await foreign.stop(None)

    run(scenario())


def test_stop_server_reports_not_serving_to_watchers(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
        port = await start_server(server)
        async with secure_channel(f"localhost:{port}", tls(pki, "custodian-1")) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=EXCHANGE), timeout=5
            )
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.ensure_future(stop_server(server, grace=5.0))
            second = await watch.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Ending the last call lets the graceful stop finish before its grace.
            watch.cancel()
            await stopping

    run(scenario())


class _EchoStream(custodian_service_pb2_grpc.CustodianServiceServicer):
    """SyncPositions that answers each frame it can read: to see refusals mid-stream."""

    async def SyncPositions(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[custodian_service_pb2.SyncPositionsResponse]:
        async for request in request_iterator:
            yield custodian_service_pb2.SyncPositionsResponse(frame=request.frame)


# Field 1, length-delimited, claims 5 bytes and has 2: no protobuf parser accepts it.
UNDECODABLE = b"\x0a\x05ab"


def test_undecodable_request_bytes_get_invalid_argument_with_details(pki: DevPki) -> None:
    # Left to gRPC, a deserializer that raises answers UNKNOWN with no details.
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "exchange-1"), servicers=[FlakyExchange()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", tls(pki, "custodian-1")) as channel,
        ):
            method = channel.unary_unary(
                "/collateral_sync.v1.ExchangeService/GetCreditLine",
                request_serializer=None,
                response_deserializer=None,
            )
            with pytest.raises(grpc.RpcError) as caught:
                await method(UNDECODABLE, timeout=5)
            error = error_from_rpc_error(caught.value)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.reason_name == "MALFORMED"
            assert error.metadata == {
                "field": "request",
                "expected": "a serialized collateral_sync.v1.GetCreditLineRequest",
                "actual": "4 undecodable bytes",
            }
            # The server still serves well-formed calls.
            response = await ExchangeClient(channel).get_credit_line(
                exchange_service_pb2.GetCreditLineRequest()
            )
            assert response.credit_line.payload_type == "custodian-1"

    run(scenario())


def test_an_undecodable_frame_ends_a_stream_with_invalid_argument(pki: DevPki) -> None:
    async def scenario() -> None:
        server = create_server(tls=tls(pki, "custodian-1"), servicers=[_EchoStream()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", tls(pki, "exchange-1")) as channel,
        ):
            call = channel.stream_stream(
                "/collateral_sync.v1.CustodianService/SyncPositions",
                request_serializer=None,
                response_deserializer=custodian_service_pb2.SyncPositionsResponse.FromString,
            )(timeout=5)
            good = custodian_service_pb2.SyncPositionsRequest().SerializeToString()
            await call.write(good)
            assert isinstance(await call.read(), custodian_service_pb2.SyncPositionsResponse)
            await call.write(UNDECODABLE)
            with pytest.raises(grpc.RpcError) as caught:
                await call.read()
            error = error_from_rpc_error(caught.value)
            assert (error.code, error.reason_name) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED")
            assert error.metadata["expected"] == (
                "a serialized collateral_sync.v1.SyncPositionsRequest"
            )

    run(scenario())
