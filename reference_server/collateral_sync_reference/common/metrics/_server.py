"""One server's metrics: its own registry, its instruments, its sources, its endpoint."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc.aio
from collateral_sync import __version__
from collateral_sync.errors import reason_name
from collateral_sync.transport import TlsConfig
from collateral_sync.v1 import errors_pb2
from prometheus_client import CollectorRegistry, ProcessCollector

from collateral_sync_reference.common.config import MetricsSettings
from collateral_sync_reference.common.metrics._certificate import certificate_figures
from collateral_sync_reference.common.metrics._exposition import (
    LoopCollector,
    MetricsEndpoint,
    Source,
)
from collateral_sync_reference.common.metrics._rpc import RpcMetricsInterceptor
from collateral_sync_reference.common.metrics.catalogue import (
    RECONCILIATION_RESULTS,
    RPC_DURATION,
    RPC_STREAMS_OPEN,
    RPCS,
    SERVER_INFO,
    STORAGE_ERRORS,
)

__all__ = ["ServerMetrics"]

_R = errors_pb2.ErrorReason
#: The refusals counted as storage errors.
_STORAGE_REASONS = frozenset({_R.ERROR_REASON_STORAGE_FULL, _R.ERROR_REASON_STORAGE_UNAVAILABLE})
_LOGGER = logging.getLogger("collateral_sync_reference.metrics")


class ServerMetrics:
    """The metrics of one server process, in a registry of its own.

    Not prometheus-client's global registry: tests run several servers in one
    process, and each must show its own figures. Off (``settings`` None)
    nothing is served and no interceptor is installed; the instruments still
    exist, so that the code updating them needs no condition.

    Roles add :data:`Source` readings with :meth:`add_source` while they are
    built, which may be after :meth:`start` (on the event loop): a standby
    serves its metrics while it waits, and its role's figures once it serves.
    """

    def __init__(
        self,
        settings: MetricsSettings | None,
        *,
        role: str,
        party_id: str,
        tls: Callable[[], TlsConfig | None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._registry = registry = CollectorRegistry()
        self._sources: list[Source] = [certificate_figures(tls)]
        self._endpoint: MetricsEndpoint | None = None
        SERVER_INFO.gauge(registry).labels(role, party_id, __version__).set(1)
        self._storage_errors = STORAGE_ERRORS.counter(registry)
        self._reconciliation_results = RECONCILIATION_RESULTS.counter(registry)
        self._interceptor: RpcMetricsInterceptor | None = None
        if settings is not None:
            self._interceptor = RpcMetricsInterceptor(
                rpcs=RPCS.counter(registry),
                duration=RPC_DURATION.histogram(registry),
                streams_open=RPC_STREAMS_OPEN.gauge(registry),
                on_refusal=self.count_refusal,
                refusal_reasons=_STORAGE_REASONS,
            )
            ProcessCollector(registry=registry)

    @classmethod
    def off(cls) -> ServerMetrics:
        """Metrics that serve nothing (a server without a ``metrics`` section)."""
        return cls(None, role="", party_id="")

    @property
    def enabled(self) -> bool:
        return self._settings is not None

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The RPC interceptor to install on the server (none when off)."""
        return [] if self._interceptor is None else [self._interceptor]

    def add_source(self, source: Source) -> None:
        """Read ``source`` at every scrape from now on, on the event loop."""
        self._sources.append(source)

    # -- events -------------------------------------------------------------------------

    def count_refusal(self, reason: int) -> None:
        """A request refused with ``reason``: counted if storage refused it."""
        if reason in _STORAGE_REASONS:
            self._storage_errors.labels(reason_name(reason)).inc()

    def count_reconciliation_result(self, verdict: str) -> None:
        """The regulator signed a reconciliation result with ``verdict`` (MATCHED, BREAKS)."""
        self._reconciliation_results.labels(verdict).inc()

    # -- serving ------------------------------------------------------------------------

    def start(self) -> str | None:
        """Serve ``GET /metrics`` on the configured address; its ``host:port``, None when off.

        Called on the server's event loop, which the state readings then run on.
        OSError (naming ``metrics.listen``) if the address cannot be bound.
        """
        if self._settings is None:
            return None
        loop = asyncio.get_running_loop()
        self._registry.register(LoopCollector(loop, self._sources, _LOGGER))
        self._endpoint = MetricsEndpoint.start(self._registry, self._settings.listen)
        host = self._settings.listen.rpartition(":")[0]
        _LOGGER.info("metrics on http://%s:%d/metrics", host, self._endpoint.port)
        return f"{host}:{self._endpoint.port}"

    def stop(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
