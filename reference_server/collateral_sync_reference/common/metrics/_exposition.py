"""Serving a registry over HTTP, and reading the server's state for it on the event loop.

prometheus-client answers ``GET /metrics`` on a thread of its own. The
figures read from the server's state at scrape time (heads of sync logs,
rows of the store) must not be read from that thread: the storage belongs to
the event loop (:class:`~collateral_sync_reference.common.storage.SqlStorage`
is not thread-safe). :class:`LoopCollector` hands each scrape's reading to
the loop and waits for it, so a reading never runs beside a transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric

__all__ = ["LoopCollector", "MetricsEndpoint", "Source"]

#: A reading of figures at scrape time: it runs on the event loop and must not block.
Source = Callable[[], Iterable[Metric]]

#: Longest a scrape waits for the event loop; past it the loop's figures are left out.
_SCRAPE_TIMEOUT = 5.0


class LoopCollector:
    """A prometheus-client collector that runs ``sources`` on ``loop`` at each scrape.

    ``sources`` is read at each scrape, on the loop: what was appended to it
    since (on the loop) is read too.

    A source that raises is logged and left out of that scrape; the others
    still report. A loop busy past :data:`_SCRAPE_TIMEOUT` (or gone) leaves
    them all out: the scrape still shows the RPC counters, which need no loop.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sources: Sequence[Source],
        logger: logging.Logger,
    ) -> None:
        self._loop = loop
        self._sources = sources
        self._logger = logger

    def collect(self) -> Iterable[Metric]:
        if self._loop.is_closed():
            return []
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return self._read()  # scraped from the loop itself (a test's generate_latest)
        reading = self._read_on_loop()
        try:
            future = asyncio.run_coroutine_threadsafe(reading, self._loop)
        except RuntimeError:  # the loop closed meanwhile
            reading.close()
            return []
        try:
            return future.result(timeout=_SCRAPE_TIMEOUT)
        except (TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            self._logger.warning(
                "metrics: the event loop did not answer a scrape within %.0f s; "
                "state figures left out",
                _SCRAPE_TIMEOUT,
            )
            return []

    async def _read_on_loop(self) -> list[Metric]:
        return self._read()

    def _read(self) -> list[Metric]:
        found: list[Metric] = []
        for source in list(self._sources):
            try:
                found.extend(source())
            except Exception:  # a figure must never break the scrape, or the server
                name = getattr(source, "__qualname__", repr(source))
                self._logger.exception("metrics: reading %s failed; left out", name)
        return found


class MetricsEndpoint:
    """``GET /metrics`` of one registry, served over plain HTTP from a daemon thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, registry: CollectorRegistry, listen: str) -> MetricsEndpoint:
        """Bind ``listen`` (``host:port``, ``[v6]:port``) and serve; OSError naming it if not."""
        host, _, port = listen.rpartition(":")
        try:
            server, thread = start_http_server(int(port), host.strip("[]"), registry=registry)
        except OSError as err:
            raise OSError(
                f"cannot serve metrics on {listen} (metrics.listen): {err.strerror or err}"
            ) from err
        return cls(server, thread)

    @property
    def port(self) -> int:
        """The bound port (the one chosen when ``listen`` asked for port 0)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
