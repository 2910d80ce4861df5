"""``collateral-sync bench sync``: position-sync figures beside baselines measured in the same run.

Two processes talk over mutual TLS on 127.0.0.1 (a development PKI made in a
temporary directory), as the reference servers do: this process is the
exchange, which dials; a child process (``python -m
collateral_sync_benchmarks.sync``) is the custodian, which serves. Each keeps its
sync log and its own tables in a database of its own and runs the SDK's
:class:`~collateral_sync.sync.SyncSession` with its default batch size and
window, through ``serve_sync_stream`` and ``dial_sync_stream``.

The suite runs once per storage engine (``--storage sqlite|postgresql|both``;
see ``_storage.py``): SQLite files (WAL, synchronous=NORMAL), or two databases
of one PostgreSQL server (a throwaway one from
:mod:`collateral_sync.dev_postgres`, or ``--dsn``) through the SDK's
:class:`~collateral_sync.sql.PostgresConnection`, with the same SQL. Each
engine's figures are measured beside that engine's own baselines, and a
summary puts the engines side by side.

Figures, each beside a baseline from the same run (machines are shared and
noisy, so only same-run ratios compare):

* Signed position updates applied durably per second, custodian -> exchange:
  the custodian appends live, in transactions of :data:`TRANSACTION_UPDATES`,
  and the clock runs from its first append to its receipt of the exchange's
  durable acknowledgement of the last update; the exchange writes every
  update into its positions table in the transaction that stores the batch.
  Baselines: a raw gRPC stream between the same two processes sending one
  message per update (the size of a one-entry signed batch) with one
  acknowledgement each; raw PyNaCl per-message sign and verify; and the
  storage ceiling: the engine's own driver (sqlite3, psycopg) doing the
  receiver's writes alone (a transaction per batch of the protocol's size:
  the signed batch into a log table, every position upserted by
  ``executemany``), with no protocol work. The raw stream and raw storage
  runs are interleaved with the protocol runs. Targets: >= 50,000 updates/s
  (brief §5), and >= 0.7x the raw-storage baseline on each engine (issue 14).
* The same throughput with the reference servers' Prometheus metrics on
  (``_metrics.py``: both parties serve them as the servers do, and both are
  scraped every 0.25 s during the run) beside the runs with metrics off,
  alternating which goes first. Target: metrics cost under 5 %.
* The same throughput with tracing on (``_tracing.py``: both parties record
  the sync session's spans and export them, as a server with a ``tracing``
  section does, to ``/dev/null`` as JSON lines) beside off; the three
  variants take turns going first. No target: the figure is reported.
* Margin-call latency, price breach -> the custodian's durable
  acknowledgement: the exchange signs the price snapshot, values the account
  under its signed risk policy, signs a MarginCall carrying its valuation
  inputs, appends it to its sync log and waits for the acknowledgement. The
  custodian, as the reference custodian does, verifies the call, recomputes
  it from its signed inputs, stores it and appends its signed answer, all in
  the transaction that stores the batch, before it acknowledges. Baseline: a
  raw unary gRPC round trip (health Check) on the same channel, interleaved
  with the calls. Measured on an idle link and under a background flow of
  position updates (:data:`BACKGROUND_RATE`). Target: p99 <= 5 ms.

The run ends with checks that make the figures mean something: both logs
fully received and acknowledged on both sides, every margin call stored by
the custodian and agreed in full. Every wait has a deadline; a failure of
either process, of the stream or of a check ends the run with one message on
stderr (with the custodian's stderr when it has any) and exit code 1.
"""

from __future__ import annotations

from collateral_sync_benchmarks.sync._measurements import run_sync_benchmark

__all__ = ["run_sync_benchmark"]
