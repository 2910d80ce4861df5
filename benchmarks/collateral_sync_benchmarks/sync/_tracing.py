"""Tracing on beside off: the sync session's spans recorded and exported, or not, run by run.

A reference server with a ``tracing`` section gives its process an
OpenTelemetry TracerProvider with a BatchSpanProcessor in front of the
exporter (:mod:`collateral_sync_reference.common.tracing`); without one, the
SDK's spans (one per batch sent, received and applied) are the API's no-ops.
A process can set its provider only once, so both benchmark parties install
:class:`SwitchableTracing` at start: a provider whose tracers hand each span
to the same SDK set-up a server uses (its spans exported as JSON lines, as the
``console`` exporter writes them, to ``/dev/null``) while tracing is on, and
to the API's no-op tracer while it is off. "Off" therefore costs one Python
call more per span than a server without a provider: the comparison leans
against tracing, never for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

__all__ = ["SwitchableTracing"]

_PROCESS: SwitchableTracing | None = None


class SwitchableTracing(trace.TracerProvider):
    """The process's TracerProvider, recording and exporting only while :attr:`on`."""

    def __init__(self) -> None:
        self.on = False
        self._sink = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 — closed by shutdown
        self._sdk = TracerProvider()
        self._sdk.add_span_processor(
            BatchSpanProcessor(
                ConsoleSpanExporter(
                    out=self._sink, formatter=lambda span: span.to_json(indent=None) + os.linesep
                )
            )
        )
        self._off = trace.NoOpTracer()

    @classmethod
    def of_process(cls) -> SwitchableTracing:
        """The process's global provider (installed on first use, off until switched on)."""
        global _PROCESS  # noqa: PLW0603 — one provider per process, as OpenTelemetry allows
        if _PROCESS is None:
            _PROCESS = cls()
            trace.set_tracer_provider(_PROCESS)
        return _PROCESS

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> trace.Tracer:
        on = self._sdk.get_tracer(
            instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )
        return _SwitchTracer(self, on, self._off)

    def shutdown(self) -> None:
        """Export what is buffered, then close the sink."""
        self._sdk.shutdown()
        self._sink.close()


class _SwitchTracer(trace.Tracer):
    def __init__(self, switch: SwitchableTracing, on: trace.Tracer, off: trace.Tracer) -> None:
        self._switch, self._on, self._off = switch, on, off

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return (self._on if self._switch.on else self._off).start_span(*args, **kwargs)

    def start_as_current_span(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> AbstractContextManager[trace.Span]:
        tracer = self._on if self._switch.on else self._off
        return tracer.start_as_current_span(*args, **kwargs)
