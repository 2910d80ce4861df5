"""Metrics on beside off: the reference servers' Prometheus metrics around both benchmark parties.

Each party builds the metrics a reference server builds
(:class:`~collateral_sync_reference.common.metrics.ServerMetrics`, with the
sync figures read from its session; the custodian, which serves, with the RPC
interceptor on its server) and serves them on 127.0.0.1 from the start. A run
"with metrics on" is one during which :class:`Scraper` fetches both endpoints
every :data:`SCRAPE_INTERVAL`, 60 times as often as Prometheus' default 15 s,
so that a run of a few seconds sees scrapes at all; "off" runs are scraped by
nobody. The interceptor stays installed for both: it counts the one
SyncPositions stream when it ends, nothing a batch.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType

from collateral_sync.sync import SyncSession
from collateral_sync_reference.common.config import MetricsSettings
from collateral_sync_reference.common.metrics import ServerMetrics, sync_figures

__all__ = ["SCRAPE_INTERVAL", "Scraper", "party_metrics"]

#: Seconds between two scrapes of each endpoint during a run with metrics on.
SCRAPE_INTERVAL = 0.25
_SCRAPE_TIMEOUT = 10.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def party_metrics(
    party_id: str, role: str, sessions: Callable[[], Iterable[SyncSession]]
) -> ServerMetrics:
    """A party's metrics as a reference server has them, on a free port of 127.0.0.1."""
    metrics = ServerMetrics(MetricsSettings("127.0.0.1:0"), role=role, party_id=party_id)
    metrics.add_source(sync_figures(sessions, _utc_now))
    return metrics


class Scraper:
    """Scrapes ``addresses`` every :data:`SCRAPE_INTERVAL` on a thread while the block runs."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._urls = [f"http://{address}/metrics" for address in addresses]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scrape, name="bench-scraper", daemon=True)
        self._error: BaseException | None = None
        #: Scrapes done (each of every endpoint), and the bytes they read.
        self.scrapes = 0
        self.bytes = 0

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None and kind is None:
            raise RuntimeError(f"scraping the metrics failed: {self._error}") from self._error

    def _scrape(self) -> None:
        try:
            while True:
                for url in self._urls:
                    with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT) as response:  # noqa: S310 — our own http://127.0.0.1 endpoints
                        self.bytes += len(response.read())
                self.scrapes += 1
                if self._stop.wait(SCRAPE_INTERVAL):
                    return
        except Exception as err:  # noqa: BLE001 — handed to the run, which fails with it
            self._error = err
