"""Transport cases (docs/PROTOCOL.md §13): mutual TLS, health, reflection, deadlines.

These apply to every role. Connections that must be refused are made on
channels of their own; everything else uses the run's mutual-TLS channel.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from collateral_sync.dev_ca import create_dev_pki
from collateral_sync.transport import TlsConfig, channel_options, secure_channel
from collateral_sync.v1 import (
    custodian_service_pb2,
    exchange_service_pb2,
    regulator_service_pb2,
)
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from collateral_sync_conformance._context import MAIN_SERVICE, CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    Outcome,
    check,
    check_equal,
    expect_ok,
    expect_status,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role

__all__: list[str] = []

_HEALTH = "grpc.health.v1.Health"
_REFLECTION_PATH = "/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
_SERVICE_FILES = {
    Role.CUSTODIAN: custodian_service_pb2.DESCRIPTOR,
    Role.EXCHANGE: exchange_service_pb2.DESCRIPTOR,
    Role.REGULATOR: regulator_service_pb2.DESCRIPTOR,
}
#: A tiny deadline must end a call this soon after it expires (the server has no say).
_DEADLINE_SLACK = 2.0


def _health(channel: grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check


async def _refused(ctx: CaseContext, channel: grpc.aio.Channel, what: str) -> None:
    """A health check over ``channel`` must fail: the server must not talk to this peer."""
    try:
        outcome = await ctx.rpc(
            _health(channel), health_pb2.HealthCheckRequest(), label=f"Health.Check ({what})"
        )
    finally:
        await channel.close()
    if outcome.ok:
        raise CaseFailure(
            f"the server answered a call over a connection with {what}",
            expected="the TLS handshake or the call refused (e.g. UNAVAILABLE)",
            got="Health.Check answered OK",
        )


def _server_name_options(ctx: CaseContext) -> list[tuple[str, str | int]]:
    override = ctx.config.server_name_override
    return channel_options(server_name_override=override)


@REGISTRY.case(
    "transport/mtls-required",
    Level.MUST,
    "a connection without a client certificate is refused",
)
async def mtls_required(ctx: CaseContext) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ctx.config.tls.ca_cert)
    channel = grpc.aio.secure_channel(
        ctx.config.target, credentials, options=_server_name_options(ctx)
    )
    await _refused(ctx, channel, "no client certificate")


@REGISTRY.case(
    "transport/untrusted-client-certificate-refused",
    Level.MUST,
    "a client certificate from another CA (same party name) is refused",
)
async def untrusted_client_certificate(ctx: CaseContext) -> None:
    with tempfile.TemporaryDirectory(prefix="conformance-rogue-ca-") as directory:
        rogue = create_dev_pki(directory, parties=[ctx.kit_party_id])
        files = rogue.party(ctx.kit_party_id)
        tls = TlsConfig(
            ca_cert=ctx.config.tls.ca_cert,
            cert_chain=files.cert.read_bytes(),
            private_key=files.key.read_bytes(),
        )
    channel = secure_channel(
        ctx.config.target, tls, server_name_override=ctx.config.server_name_override
    )
    await _refused(ctx, channel, "a certificate from an untrusted CA")


@REGISTRY.case(
    "transport/plaintext-refused",
    Level.MUST,
    "a plaintext (non-TLS) connection is refused",
)
async def plaintext_refused(ctx: CaseContext) -> None:
    channel = grpc.aio.insecure_channel(ctx.config.target, options=channel_options())
    await _refused(ctx, channel, "no TLS at all")


@REGISTRY.case(
    "transport/health-serving",
    Level.MUST,
    "grpc.health.v1 reports the server and its main service SERVING",
)
async def health_serving(ctx: CaseContext) -> None:
    check_method = _health(ctx.channel)
    for service in ("", MAIN_SERVICE[ctx.role]):
        outcome = await ctx.rpc(
            check_method, health_pb2.HealthCheckRequest(service=service), label="Health.Check"
        )
        response = expect_ok(outcome)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        name = service or "the server (service '')"
        check_equal(f"health status of {name}", "SERVING", status)


@REGISTRY.case(
    "transport/health-unknown-service-not-found",
    Level.SHOULD,
    "a health check of a service the server does not have answers NOT_FOUND",
)
async def health_unknown_service(ctx: CaseContext) -> None:
    outcome = await ctx.rpc(
        _health(ctx.channel),
        health_pb2.HealthCheckRequest(service="collateral_sync.v1.NoSuchService"),
        label="Health.Check",
    )
    expect_status(outcome, grpc.StatusCode.NOT_FOUND, None)


def _reflection(ctx: CaseContext, version: str) -> Callable[..., Awaitable[Message]]:
    """One request/response exchange on the reflection stream of ``version``."""
    method = ctx.channel.stream_stream(
        _REFLECTION_PATH.format(version=version),
        # v1 and v1alpha messages are identical on the wire; only the service name differs.
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def exchange(
        request: reflection_pb2.ServerReflectionRequest, *, timeout: float
    ) -> reflection_pb2.ServerReflectionResponse:
        call = method(iter([request]), timeout=timeout)
        responses = [response async for response in call]
        if len(responses) != 1:
            raise CaseFailure(
                f"reflection ({version}) answered one request with {len(responses)} responses",
                expected="1 response",
                got=str(len(responses)),
            )
        response: reflection_pb2.ServerReflectionResponse = responses[0]
        return response

    exchange.__qualname__ = f"ServerReflection({version}).ServerReflectionInfo"
    return exchange


async def _listed_services(ctx: CaseContext, version: str) -> tuple[Outcome, list[str]]:
    outcome = await ctx.rpc(
        _reflection(ctx, version), reflection_pb2.ServerReflectionRequest(list_services="*")
    )
    if not outcome.ok:
        return outcome, []
    response: reflection_pb2.ServerReflectionResponse = outcome.response
    if response.HasField("error_response"):
        raise CaseFailure(
            f"reflection ({version}) list_services failed: {response.error_response.error_message}",
            expected="list_services_response",
            got=f"error {response.error_response.error_code}",
        )
    return outcome, [s.name for s in response.list_services_response.service]


async def _check_service_descriptor(ctx: CaseContext, version: str) -> None:
    """The descriptor the server reflects for its main service has our methods and types."""
    service_name = MAIN_SERVICE[ctx.role]
    outcome = await ctx.rpc(
        _reflection(ctx, version),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service_name),
    )
    response: reflection_pb2.ServerReflectionResponse = expect_ok(outcome)
    check(
        response.HasField("file_descriptor_response"),
        f"reflection ({version}) gave no file descriptor for {service_name}",
        expected="file_descriptor_response",
        got=response.WhichOneof("message_response") or "nothing",
    )
    ours = _SERVICE_FILES[ctx.role].services_by_name[service_name.rsplit(".", 1)[1]]
    expected = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in ours.methods}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for service in file.service:
            if f"{file.package}.{service.name}" != service_name:
                continue
            got = {
                m.name: (m.input_type.lstrip("."), m.output_type.lstrip("."))
                for m in service.method
            }
            check_equal(f"methods of {service_name} as reflected", expected, got)
            return
    raise CaseFailure(
        f"the reflected file descriptors do not declare {service_name}",
        expected=f"a file declaring service {service_name}",
        got=", ".join(
            descriptor_pb2.FileDescriptorProto.FromString(raw).name
            for raw in response.file_descriptor_response.file_descriptor_proto
        )
        or "no files",
    )


@REGISTRY.case(
    "transport/reflection-lists-services",
    Level.MUST,
    "server reflection lists the main service and health, and reflects the main service's methods",
)
async def reflection_lists_services(ctx: CaseContext) -> None:
    answers = []
    for version in ("v1", "v1alpha"):
        outcome, services = await _listed_services(ctx, version)
        if outcome.ok:
            for needed in (MAIN_SERVICE[ctx.role], _HEALTH):
                check(
                    needed in services,
                    f"reflection ({version}) does not list {needed}",
                    expected=needed,
                    got=services,
                )
            await _check_service_descriptor(ctx, version)
            return
        answers.append(f"{version}: {outcome.code.name} {outcome.message}")
    raise CaseFailure(
        "neither grpc.reflection.v1 nor grpc.reflection.v1alpha is served",
        expected="server reflection",
        got="; ".join(answers),
    )


def _reflection_version_case(version: str) -> Callable[[CaseContext], Awaitable[None]]:
    async def body(ctx: CaseContext) -> None:
        outcome, services = await _listed_services(ctx, version)
        expect_ok(outcome)
        check(
            MAIN_SERVICE[ctx.role] in services,
            f"reflection ({version}) does not list {MAIN_SERVICE[ctx.role]}",
            expected=MAIN_SERVICE[ctx.role],
            got=services,
        )

    return body


REGISTRY.case(
    "transport/reflection-v1",
    Level.SHOULD,
    "grpc.reflection.v1 is served and lists the main service",
)(_reflection_version_case("v1"))
REGISTRY.case(
    "transport/reflection-v1alpha",
    Level.SHOULD,
    "grpc.reflection.v1alpha (for older tools) is served and lists the main service",
)(_reflection_version_case("v1alpha"))


def _read_call(ctx: CaseContext) -> tuple[Callable[..., Awaitable[Any]], Message]:
    """An idempotent read of the role's main service."""
    if ctx.role is Role.CUSTODIAN:
        return ctx.custodian.get_checkpoint, custodian_service_pb2.GetCheckpointRequest()
    if ctx.role is Role.EXCHANGE:
        return ctx.exchange.get_risk_policy, exchange_service_pb2.GetRiskPolicyRequest()
    return (
        ctx.regulator.get_reconciliation_result,
        regulator_service_pb2.GetReconciliationResultRequest(cutoff_id="2000-01-01T00:00:00Z"),
    )


def _answered(outcome: Outcome) -> bool:
    """OK, or a deliberate protocol refusal (a status with collateral-sync ErrorInfo)."""
    return outcome.ok or outcome.error_info is not None


@REGISTRY.case(
    "transport/deadline-exceeded-honoured",
    Level.MUST,
    "calls with tiny deadlines end promptly with DEADLINE_EXCEEDED (or an answer) and the server keeps serving",
)
async def deadline_exceeded(ctx: CaseContext) -> None:
    method, request = _read_call(ctx)
    for deadline in (0.0005, 0.002, 0.01, 0.05):
        started = time.perf_counter()
        outcome = await ctx.rpc(method, request, timeout=deadline)
        elapsed = time.perf_counter() - started
        check(
            outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED or _answered(outcome),
            f"a call with a {deadline * 1000:g} ms deadline ended with {outcome.code.name}",
            expected="DEADLINE_EXCEEDED, or the call's normal answer",
            got=outcome.summary(),
        )
        check(
            elapsed <= deadline + _DEADLINE_SLACK,
            f"a call with a {deadline * 1000:g} ms deadline took {elapsed:.3f} s",
            expected=f"<= {deadline + _DEADLINE_SLACK:.3f} s",
            got=f"{elapsed:.3f} s",
        )
    # The abandoned calls must not have hurt the server.
    outcome = await ctx.rpc(method, request)
    check(
        _answered(outcome),
        "after calls that ran out of time the server no longer answers normally",
        expected="OK or a collateral-sync refusal",
        got=outcome.summary(),
    )


@REGISTRY.case(
    "transport/unknown-method-unimplemented",
    Level.SHOULD,
    "a call to a method the service does not have answers UNIMPLEMENTED",
)
async def unknown_method(ctx: CaseContext) -> None:
    method = ctx.channel.unary_unary(
        f"/{MAIN_SERVICE[ctx.role]}/NoSuchMethod",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    outcome = await ctx.rpc(
        method, health_pb2.HealthCheckRequest(), label=f"{MAIN_SERVICE[ctx.role]}/NoSuchMethod"
    )
    expect_status(outcome, grpc.StatusCode.UNIMPLEMENTED, None)
