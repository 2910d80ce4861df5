"""Prometheus metrics of a reference server, served over HTTP on ``metrics.listen``.

Off unless the configuration has a ``metrics`` section::

    "metrics": {"listen": "127.0.0.1:9464"}

Each server keeps its figures in a registry of its own (:class:`ServerMetrics`,
on :attr:`ServerContext.metrics <collateral_sync_reference.common.runner.ServerContext>`),
never prometheus-client's global one. Where each figure comes from:

- RPCs by method and status code, unary latencies, open streams: one server
  interceptor (``_rpc``), counting the status each call ended with;
- storage errors: refusals with reason STORAGE_FULL or STORAGE_UNAVAILABLE
  (the interceptor reads the reason from the status details; the exchange's
  sync dialler reports its own), and regulator verdicts as they are signed:
  counted as they happen (:meth:`ServerMetrics.count_refusal`,
  :meth:`ServerMetrics.count_reconciliation_result`);
- everything that is state (sync lag and applied counts, attestation log size
  and checkpoint age, margin calls by state, liquidations, certificate
  expiry): read at scrape time where it lives, by a :data:`Source` each role
  adds (``_sync``, ``_certificate``, and the roles' own ``metrics`` modules),
  run on the event loop that owns the storage (``_exposition``).

Names, kinds and help texts live in :mod:`.catalogue`; docs/OPERATIONS.md
("Metrics") says what each means and when to alert.
"""

from __future__ import annotations

from collateral_sync_reference.common.metrics import catalogue
from collateral_sync_reference.common.metrics._exposition import Source
from collateral_sync_reference.common.metrics._server import ServerMetrics
from collateral_sync_reference.common.metrics._sync import sync_figures

__all__ = ["ServerMetrics", "Source", "catalogue", "sync_figures"]
