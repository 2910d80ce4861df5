"""OpenTelemetry tracing and JSON log lines of a reference server process.

Off unless the configuration has a ``tracing`` section::

    "tracing": {"exporter": "console" | "otlp", "endpoint": "http://collector:4317",
                "service_name": "collateral-sync-custodian"}

:func:`start_tracing` gives the process a TracerProvider of its own (a
BatchSpanProcessor in front of the exporter: ``console`` writes one span as
one JSON line to stderr, so that stdout keeps only the LISTENING, STANDBY and
METRICS lines; ``otlp`` sends over gRPC to ``endpoint``) and instruments
gRPC with opentelemetry-instrumentation-grpc: every outgoing grpc.aio
channel of the process (the exchange's channel to its custodian included)
gets the client interceptors, which put the trace context in the call's
metadata, and :meth:`Tracing.server_interceptors` is the server side, which
takes it out. :meth:`Tracing.shutdown` flushes what is still buffered; the
runner calls it once the server stopped.

The SDK makes spans of its own with opentelemetry-api only (the sync
session's batches, :mod:`collateral_sync.sync`), as do the roles (the
exchange's valuation and margin call, the custodian's answer): without a
provider those are no-ops.

``"logging": {"format": "json"}`` makes every log line on stderr one JSON
object: ``time``, ``level``, ``logger``, ``message``, ``trace_id`` and
``span_id`` when a span is current, ``exception`` when there is one
(:class:`JsonLogFormatter`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc.aio
from opentelemetry import trace

from collateral_sync_reference.common.config import ServerConfig, TracingSettings

__all__ = ["JsonLogFormatter", "Tracing", "start_tracing"]


@dataclass(slots=True)
class Tracing:
    """The process's tracing: nothing when off, else its provider and instrumentation."""

    #: The provider spans of this process go to (None: tracing is off).
    provider: Any = None
    _client_instrumentor: Any = None

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The server span of each call (to run outside the SDK's error mapping)."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor  # noqa: PLC0415

        return [aio_server_interceptor(tracer_provider=self.provider)]  # type: ignore[no-untyped-call]

    def shutdown(self) -> None:
        """Stop instrumenting channels and flush the spans still buffered."""
        if self._client_instrumentor is not None:
            self._client_instrumentor.uninstrument()
            self._client_instrumentor = None
        if self.provider is not None:
            self.provider.shutdown()


def start_tracing(config: ServerConfig) -> Tracing:
    """Tracing as ``config.tracing`` says; :meth:`Tracing.off` when it has no section.

    Imports the OpenTelemetry SDK only when tracing is on (the config check
    already made sure it is installed).
    """
    settings = config.tracing
    if settings is None:
        return Tracing.off()
    # Imported here: a server without a tracing section never loads the SDK.
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource.create(
        {
            "service.name": settings.service_name or f"collateral-sync-{config.role}",
            "service.instance.id": config.party_id,
            "collateral_sync.party_id": config.party_id,
            "collateral_sync.role": config.role,
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    # The process's global provider: the SDK's and the roles' own spans go there too.
    trace.set_tracer_provider(provider)
    client = GrpcAioInstrumentorClient()  # type: ignore[no-untyped-call]
    client.instrument(tracer_provider=provider)
    return Tracing(provider=provider, _client_instrumentor=client)


def _exporter(settings: TracingSettings) -> Any:
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

        # One span per line on stderr: stdout is for the LISTENING line.
        return ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + os.linesep
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    return OTLPSpanExporter(endpoint=settings.endpoint)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, with the current span's trace and span ids."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = trace.format_trace_id(span.trace_id)
            entry["span_id"] = trace.format_span_id(span.span_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
