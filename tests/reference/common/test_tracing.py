"""OpenTelemetry tracing and JSON log lines of the reference servers.

A custodian and an exchange run as real processes with ``"tracing":
{"exporter": "console"}`` (one span per JSON line on stderr) and
``"logging": {"format": "json"}``. A pledge, then an exposure that puts the
account below maintenance: the exchange issues a margin call, the custodian
answers it on the sync stream. Once both stopped (which flushes their spans),
the two logs show the RPCs with method and status, one trace across both
processes from the exchange's sync stream to the custodian's answer, the
batch that carried the call linked to the span that issued it, and log lines
that parse and carry the trace id of the span they were written in. With the
``otlp`` exporter the spans reach an OTLP/gRPC collector (a TraceService the
test serves) with the server's resource attributes. Tracing off makes no spans; a bad section is refused at start with one line and exit
code 2. In-process: a refused call's server span carries the status the
error mapping sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent import futures
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, ExchangeClient, TestControlClient
from collateral_sync.errors import MalformedError, RPCError
from collateral_sync.server import create_server, serve
from collateral_sync.transport import plaintext_channel_for_testing
from collateral_sync.v1 import (
    exchange_service_pb2,
    margin_pb2,
    test_control_pb2,
    test_control_pb2_grpc,
    valuation_pb2,
)
from collateral_sync_reference.common.config import load_config
from collateral_sync_reference.common.tracing import JsonLogFormatter, start_tracing
from google.protobuf import duration_pb2
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    Parties,
    StartServer,
    serve_custodian_once,
)
from .test_metrics import ACCOUNT, ORIGIN, pledge

_T = TypeVar("_T")
WAIT = 60.0
TRACING = {"exporter": "console"}
JSON_LOGS = {"format": "json"}
CUSTODIAN_SERVICE = "collateral_sync.v1.CustodianService"


def spans_and_logs(text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A server's stderr: every line one JSON object, a span (console exporter) or a log line."""
    spans, logs = [], []
    for line in text.splitlines():
        entry = json.loads(line)  # a line that is not JSON fails the test here
        (spans if "context" in entry and "kind" in entry else logs).append(entry)
    return spans, logs


def hex_id(value: str) -> str:
    return value.removeprefix("0x")


def named(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["name"] == name]


async def until(what: str, probe: Callable[[], Awaitable[_T | None]]) -> _T:
    async with asyncio.timeout(WAIT):
        while True:
            found = await probe()
            if found is not None:
                return found
            await asyncio.sleep(0.1)
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


def test_a_margin_call_is_one_trace_from_the_exchange_to_the_custodians_answer(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    parties = reference_parties
    custodian = start_server(
        "custodian",
        parties.config(
            CUSTODIAN,
            "custodian",
            tmp_path,
            peers={EXCHANGE: None},
            tracing=TRACING,
            logging=JSON_LOGS,
            custodian={
                "accounts": [
                    {"account_id": ACCOUNT, "client_id": CLIENT, "holdings": {"USDC": "100000"}}
                ]
            },
        ),
        name="traced-custodian",
    )
    exchange = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            tmp_path,
            peers={CUSTODIAN: custodian.address},
            tracing={**TRACING, "service_name": "exchange-under-test"},
            logging=JSON_LOGS,
            exchange={
                "custodian": CUSTODIAN,
                "log_origin": ORIGIN,
                "prices": [{"asset_id": "USDC", "price": "1"}],
            },
        ),
        name="traced-exchange",
    )

    async def scenario() -> str:
        async with parties.channel(custodian.address, EXCHANGE) as channel:
            control = TestControlClient(channel)
            now = (
                await control.advance_clock(
                    test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
                )
            ).now
            await pledge(parties, CustodianClient(channel), now.ToDatetime(tzinfo=UTC))
        async with (
            parties.channel(exchange.address, CLIENT) as as_client,
            parties.channel(exchange.address, CUSTODIAN) as as_custodian,
        ):
            client = ExchangeClient(as_client)

            async def credited() -> Decimal | None:
                try:
                    line = (
                        await client.get_credit_line(
                            exchange_service_pb2.GetCreditLineRequest(account_id=ACCOUNT)
                        )
                    ).credit_line
                except RPCError:
                    return None
                credit = valuation_pb2.CreditLine.FromString(line.payload)
                return Decimal(credit.collateral_value.value) or None

            value = await until("the pledge credited at the exchange", credited)
            # Ratio 0.45: below maintenance (0.5), above the liquidation line (0.4).
            exposure = (value / Decimal("0.45")).quantize(Decimal(1))
            await TestControlClient(as_custodian).set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id=ACCOUNT, exposure=amount_to_proto(str(exposure))
                )
            )

            async def answered() -> str | None:
                states = (
                    await client.list_margin_calls(
                        exchange_service_pb2.ListMarginCallsRequest(account_id=ACCOUNT)
                    )
                ).margin_call_states
                for envelope in states:
                    state = margin_pb2.MarginCallState.FromString(envelope.payload)
                    if state.status != margin_pb2.MARGIN_CALL_STATUS_ISSUED:
                        return state.margin_call_id
                return None

            return await until("the custodian's answer to a margin call", answered)

    margin_call_id = asyncio.run(scenario())
    # Stopping flushes each process's spans; the exchange first, which ends the stream.
    assert exchange.stop() == 0
    assert custodian.stop() == 0
    exchange_spans, exchange_logs = spans_and_logs(exchange.log_text())
    custodian_spans, custodian_logs = spans_and_logs(custodian.log_text())

    # Every RPC is a span, named by its method, with its status.
    pledged = named(custodian_spans, f"/{CUSTODIAN_SERVICE}/PledgeCollateral")
    assert len(pledged) == 1, [span["name"] for span in custodian_spans]
    assert pledged[0]["kind"] == "SpanKind.SERVER"
    assert pledged[0]["attributes"]["rpc.method"] == "PledgeCollateral"
    assert pledged[0]["attributes"]["rpc.grpc.status_code"] == 0
    assert pledged[0]["resource"]["attributes"]["service.name"] == "collateral-sync-custodian"
    assert exchange_spans[0]["resource"]["attributes"]["service.name"] == "exchange-under-test"

    # The sync stream: the exchange's client span is the custodian's server span's parent.
    (client_call,) = named(exchange_spans, f"/{CUSTODIAN_SERVICE}/SyncPositions")
    assert client_call["kind"] == "SpanKind.CLIENT"
    (server_call,) = named(custodian_spans, f"/{CUSTODIAN_SERVICE}/SyncPositions")
    assert server_call["parent_id"] == client_call["context"]["span_id"]
    (stream,) = named(exchange_spans, "sync.stream")
    trace_id = stream["context"]["trace_id"]
    assert client_call["context"]["trace_id"] == server_call["context"]["trace_id"] == trace_id

    # The exchange's valuation issued the call; the batch that carried it links to that span.
    (issued,) = named(exchange_spans, "exchange.margin_call.issue")
    assert issued["attributes"]["collateral_sync.margin_call_id"] == margin_call_id
    (valuation,) = [
        span
        for span in named(exchange_spans, "exchange.valuation")
        if span["attributes"].get("collateral_sync.margin_call_id") == margin_call_id
    ]
    assert issued["parent_id"] == valuation["context"]["span_id"]
    carried = [
        span
        for span in named(exchange_spans, "sync.batch.send")
        if any(link["context"]["span_id"] == issued["context"]["span_id"] for link in span["links"])
    ]
    assert len(carried) == 1, named(exchange_spans, "sync.batch.send")
    assert carried[0]["context"]["trace_id"] == trace_id

    # In the custodian's process, the same trace: the batch received, applied (durable
    # when the span ends), the answer made inside it, and acknowledged.
    (answer,) = named(custodian_spans, "custodian.margin_call.answer")
    assert answer["attributes"]["collateral_sync.margin_call_id"] == margin_call_id
    assert answer["context"]["trace_id"] == trace_id
    by_id = {span["context"]["span_id"]: span for span in custodian_spans}
    apply = by_id[answer["parent_id"]]
    assert apply["name"] == "sync.batch.apply"
    receive = by_id[apply["parent_id"]]
    assert receive["name"] == "sync.batch.receive"
    sent = carried[0]["attributes"]
    assert (
        receive["attributes"]["collateral_sync.sync.last_sequence"]
        == sent["collateral_sync.sync.last_sequence"]
    )
    assert any(
        span["parent_id"] == receive["context"]["span_id"]
        for span in named(custodian_spans, "sync.batch.ack")
    )

    # Log lines: JSON, and a line written inside a span carries its trace and span ids.
    for entry in (*exchange_logs, *custodian_logs):
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    (issue_log,) = [
        line
        for line in exchange_logs
        if line["message"].startswith(f"margin call {margin_call_id} on ")
    ]
    assert issue_log["trace_id"] == hex_id(issued["context"]["trace_id"])
    assert issue_log["span_id"] == hex_id(issued["context"]["span_id"])
    assert any(
        "serving on" in line["message"] and "trace_id" not in line for line in custodian_logs
    )


def test_without_a_tracing_section_there_are_no_spans(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    custodian = start_server(
        "custodian",
        reference_parties.config(CUSTODIAN, "custodian", tmp_path, peers={EXCHANGE: None}),
        name="untraced-custodian",
    )

    async def call() -> None:
        async with reference_parties.channel(custodian.address, EXCHANGE) as channel:
            await TestControlClient(channel).advance_clock(
                test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
            )

    asyncio.run(call())
    assert custodian.stop() == 0
    text = custodian.log_text()
    assert "serving on" in text
    assert '"trace_id"' not in text
    assert not any(line.startswith("{") for line in text.splitlines())
    # And nothing is set up: no provider of the SDK's, no exporter.
    config = load_config(custodian.config_path)
    assert config.tracing is None
    assert config.log_format == "text"
    tracing = start_tracing(config)
    assert not tracing.enabled
    assert tracing.server_interceptors() == []
    tracing.shutdown()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: what a collector at the configured endpoint gets."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_collector(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    collector = _Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        custodian = start_server(
            "custodian",
            reference_parties.config(
                CUSTODIAN,
                "custodian",
                tmp_path,
                peers={EXCHANGE: None},
                tracing={"exporter": "otlp", "endpoint": f"http://127.0.0.1:{port}"},
            ),
            name="otlp-custodian",
        )

        async def call() -> None:
            async with reference_parties.channel(custodian.address, EXCHANGE) as channel:
                await TestControlClient(channel).advance_clock(
                    test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
                )

        asyncio.run(call())
        assert custodian.stop() == 0  # flushes what is still buffered
    finally:
        receiver.stop(grace=None)
    resources = [
        {a.key: a.value.string_value for a in spans.resource.attributes}
        for request in collector.requests
        for spans in request.resource_spans
    ]
    names = [
        span.name
        for request in collector.requests
        for spans in request.resource_spans
        for scope in spans.scope_spans
        for span in scope.spans
    ]
    assert resources, "the collector received no spans"
    assert all(r["service.name"] == "collateral-sync-custodian" for r in resources)
    assert all(r["collateral_sync.party_id"] == CUSTODIAN for r in resources)
    assert "/collateral_sync.v1.TestControlService/AdvanceClock" in names, names


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"tracing": {"exporter": "jaeger"}}, "tracing.exporter: expected console or otlp"),
        ({"tracing": {}}, "tracing.exporter: expected a value"),
        ({"tracing": {"exporter": "otlp", "url": "x"}}, "tracing.url: expected a known key"),
        (
            {"tracing": {"exporter": "console", "endpoint": "http://127.0.0.1:4317"}},
            "tracing.endpoint: expected no endpoint with the console exporter",
        ),
        ({"tracing": "console"}, "tracing: expected an object"),
        ({"logging": {"format": "xml"}}, "logging.format: expected text or json"),
        ({"logging": {"level": "debug"}}, "logging.level: expected a known key"),
    ],
)
def test_a_bad_tracing_or_logging_section_is_refused_at_start(
    reference_parties: Parties, tmp_path: Path, section: dict[str, object], expected: str
) -> None:
    config = reference_parties.config(CUSTODIAN, "custodian", tmp_path, **section)
    path = tmp_path / "custodian.json"
    path.write_text(json.dumps(config))
    result = serve_custodian_once(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]


# ------------------------------------------------------------------ in-process


class _Refusing(test_control_pb2_grpc.TestControlServiceServicer):
    """Refuses AdvanceClock; every other method is the generated UNIMPLEMENTED."""

    async def AdvanceClock(
        self, request: test_control_pb2.AdvanceClockRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.AdvanceClockResponse:
        raise MalformedError("refused", metadata={"expected": "nothing", "actual": "a call"})


def test_a_refused_call_has_a_span_with_the_status_the_peer_got() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def scenario() -> list[grpc.StatusCode]:
        server = create_server(
            tls=None,
            plaintext_for_testing=True,
            servicers=[_Refusing()],
            outer_interceptors=[aio_server_interceptor(tracer_provider=provider)],
        )
        codes = []
        async with serve(server) as port, plaintext_channel_for_testing(f"127.0.0.1:{port}") as ch:
            control = TestControlClient(ch)
            calls = (
                control.advance_clock(test_control_pb2.AdvanceClockRequest()),
                control.run_valuation(test_control_pb2.RunValuationRequest(account_id="a")),
            )
            for made in calls:
                with pytest.raises(RPCError) as refused:
                    await made
                codes.append(refused.value.code)
        return codes

    codes = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED]
    spans = {span.name.rsplit("/", 1)[1]: span for span in exporter.get_finished_spans()}
    assert spans.keys() == {"AdvanceClock", "RunValuation"}
    refused, unimplemented = spans["AdvanceClock"], spans["RunValuation"]
    assert refused.attributes is not None
    assert unimplemented.attributes is not None
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The caller's error, not the server's (OpenTelemetry's conventions for gRPC servers).
    assert refused.status.status_code.name == "UNSET"
    assert (
        unimplemented.attributes["rpc.grpc.status_code"] == (grpc.StatusCode.UNIMPLEMENTED.value[0])
    )
    assert unimplemented.status.status_code.name == "ERROR"
    provider.shutdown()


def test_a_json_log_line_carries_the_current_span() -> None:
    provider = TracerProvider()
    record = logging.LogRecord(
        "collateral_sync_reference.x", logging.INFO, "f", 1, "a %s", ("b",), None
    )
    formatter = JsonLogFormatter()
    outside = json.loads(formatter.format(record))
    assert outside["message"] == "a b"
    assert "trace_id" not in outside
    with provider.get_tracer("test").start_as_current_span("work") as span:
        inside = json.loads(formatter.format(record))
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert {"time", "level", "logger", "message"} <= inside.keys()
    provider.shutdown()
