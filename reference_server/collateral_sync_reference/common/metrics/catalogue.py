"""Every metric a reference server exposes: its name, kind, labels and help text, in one place.

Instruments updated as things happen (:meth:`MetricSpec.counter` and the like) and
families built at each scrape from the state where a fact lives
(:meth:`MetricSpec.family`) take their names from here, and
docs/OPERATIONS.md lists the same names (a test holds the two together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = [
    "ALL",
    "ATTESTATION_CHECKPOINT_AGE",
    "ATTESTATION_CHECKPOINT_TREE_SIZE",
    "ATTESTATION_LOG_SIZE",
    "CERTIFICATE_EXPIRY",
    "CUSTODIAN_SILENT",
    "LIQUIDATIONS",
    "MARGIN_CALLS",
    "RECONCILIATION_RESULTS",
    "RPCS",
    "RPC_DURATION",
    "RPC_STREAMS_OPEN",
    "SERVER_INFO",
    "STORAGE_ERRORS",
    "SYNC_BATCHES_APPLIED",
    "SYNC_CONNECTED",
    "SYNC_ENTRIES_APPLIED",
    "SYNC_LAG_ENTRIES",
    "SYNC_LAG_SECONDS",
    "MetricSpec",
]

_PREFIX = "collateral_sync_"
#: Unary RPCs take milliseconds; the buckets resolve that and still show a slow disk.
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: ``name`` as exposed (counters without their ``_total`` suffix)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith(_PREFIX):
            raise ValueError(f"expected a name starting {_PREFIX!r}, got {self.name!r}")

    @property
    def exposed_name(self) -> str:
        """The sample name a scrape shows (``_total`` for counters)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    def family(self) -> CounterMetricFamily | GaugeMetricFamily:
        """An empty family to fill at scrape time (counters and gauges only)."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.help, labels=self.labels)
        raise TypeError(f"{self.name} is a {self.kind}: make it with histogram()")

    def counter(self, registry: CollectorRegistry) -> Counter:
        """The counter of this metric in ``registry``, for code that counts as things happen."""
        self._expect("counter")
        return Counter(self.name, self.help, self.labels, registry=registry)

    def gauge(self, registry: CollectorRegistry) -> Gauge:
        """The gauge of this metric in ``registry``, for code that sets it as things happen."""
        self._expect("gauge")
        return Gauge(self.name, self.help, self.labels, registry=registry)

    def histogram(self, registry: CollectorRegistry) -> Histogram:
        """The histogram of this metric in ``registry`` (RPC durations' buckets)."""
        self._expect("histogram")
        return Histogram(self.name, self.help, self.labels, registry=registry, buckets=_RPC_BUCKETS)

    def _expect(self, kind: Kind) -> None:
        if self.kind != kind:
            raise TypeError(f"{self.name} is a {self.kind}, not a {kind}")


# -- every role ---------------------------------------------------------------------

SERVER_INFO = MetricSpec(
    f"{_PREFIX}server_info",
    "gauge",
    "Always 1; its labels say which server this is (role, party id, software version).",
    ("role", "party_id", "version"),
)
RPCS = MetricSpec(
    f"{_PREFIX}rpcs",
    "counter",
    "RPCs served to their end, by service, method and gRPC status code (OK for success); "
    "a stream counts once, when it ends.",
    ("service", "method", "code"),
)
RPC_DURATION = MetricSpec(
    f"{_PREFIX}rpc_duration_seconds",
    "histogram",
    "Seconds from the start of a unary RPC to its status, by service and method "
    "(streams are not timed: see collateral_sync_rpc_streams_open).",
    ("service", "method"),
)
RPC_STREAMS_OPEN = MetricSpec(
    f"{_PREFIX}rpc_streams_open",
    "gauge",
    "Streaming RPCs open now, by service and method (SyncPositions, health Watch, reflection).",
    ("service", "method"),
)
STORAGE_ERRORS = MetricSpec(
    f"{_PREFIX}storage_errors",
    "counter",
    "Requests refused because storage could not be written (reason STORAGE_FULL or "
    "STORAGE_UNAVAILABLE): RPC statuses, and sync streams the exchange's storage ended.",
    ("reason",),
)
CERTIFICATE_EXPIRY = MetricSpec(
    f"{_PREFIX}certificate_expiry_seconds",
    "gauge",
    "Seconds until the server's own TLS certificate (certificate=server, the leaf of "
    "tls.cert) or its trust anchor (certificate=ca, the latest-expiring of tls.ca) expires "
    "(notAfter); negative once expired. Absent without TLS.",
    ("certificate",),
)

# -- position sync (custodian and exchange) --------------------------------------------

SYNC_CONNECTED = MetricSpec(
    f"{_PREFIX}sync_connected",
    "gauge",
    "1 while the position-sync stream with the peer runs past its hello exchange, else 0.",
    ("peer",),
)
SYNC_LAG_ENTRIES = MetricSpec(
    f"{_PREFIX}sync_lag_entries",
    "gauge",
    "Sync log entries not yet in step, by peer and direction: outgoing, entries of ours the "
    "peer has not acknowledged; incoming, entries the peer says it has that we have not stored.",
    ("peer", "direction"),
)
SYNC_LAG_SECONDS = MetricSpec(
    f"{_PREFIX}sync_lag_seconds",
    "gauge",
    "How far behind in time, by peer and direction: outgoing, age of the oldest batch sent "
    "and not acknowledged (0 when none); incoming, seconds since the latest instant up to "
    "which the peer's log is known to be stored here (its latest batch or heartbeat).",
    ("peer", "direction"),
)
SYNC_BATCHES_APPLIED = MetricSpec(
    f"{_PREFIX}sync_batches_applied",
    "counter",
    "Peer's sync batches with new entries stored and applied, since the server started.",
    ("peer",),
)
SYNC_ENTRIES_APPLIED = MetricSpec(
    f"{_PREFIX}sync_entries_applied",
    "counter",
    "Peer's sync log entries stored and applied, since the server started.",
    ("peer",),
)

# -- custodian ---------------------------------------------------------------------

ATTESTATION_LOG_SIZE = MetricSpec(
    f"{_PREFIX}attestation_log_size",
    "gauge",
    "Leaves (attested holdings statements) in the custodian's attestation log.",
)
ATTESTATION_CHECKPOINT_TREE_SIZE = MetricSpec(
    f"{_PREFIX}attestation_checkpoint_tree_size",
    "gauge",
    "Tree size of the custodian's latest signed checkpoint.",
)
ATTESTATION_CHECKPOINT_AGE = MetricSpec(
    f"{_PREFIX}attestation_checkpoint_age_seconds",
    "gauge",
    "Seconds since the custodian signed its latest checkpoint (by the server's clock).",
)

# -- custodian and exchange ----------------------------------------------------------

LIQUIDATIONS = MetricSpec(
    f"{_PREFIX}liquidations",
    "counter",
    "Liquidations in the server's records: executed (custodian) or instructed (exchange).",
)

# -- exchange -----------------------------------------------------------------------

MARGIN_CALLS = MetricSpec(
    f"{_PREFIX}margin_calls",
    "gauge",
    "The exchange's margin calls by current state (MarginCallStatus without its prefix).",
    ("state",),
)

CUSTODIAN_SILENT = MetricSpec(
    f"{_PREFIX}custodian_silent",
    "gauge",
    "1 while the exchange's custodian is silent (PROTOCOL.md 11.2: no frame on its stream for "
    "the policy's custodian_staleness_window): no credit limit rises and nothing is liquidated.",
    ("custodian",),
)

# -- regulator ----------------------------------------------------------------------

RECONCILIATION_RESULTS = MetricSpec(
    f"{_PREFIX}reconciliation_results",
    "counter",
    "Reconciliation results the regulator signed since it started, by verdict "
    "(ReconciliationOutcome without its prefix).",
    ("verdict",),
)

ALL: tuple[MetricSpec, ...] = (
    SERVER_INFO,
    RPCS,
    RPC_DURATION,
    RPC_STREAMS_OPEN,
    STORAGE_ERRORS,
    CERTIFICATE_EXPIRY,
    SYNC_CONNECTED,
    SYNC_LAG_ENTRIES,
    SYNC_LAG_SECONDS,
    SYNC_BATCHES_APPLIED,
    SYNC_ENTRIES_APPLIED,
    ATTESTATION_LOG_SIZE,
    ATTESTATION_CHECKPOINT_TREE_SIZE,
    ATTESTATION_CHECKPOINT_AGE,
    LIQUIDATIONS,
    MARGIN_CALLS,
    CUSTODIAN_SILENT,
    RECONCILIATION_RESULTS,
)
