"""The exchange's figures for its metrics, read at scrape time from where they live.

The sync session with its custodian (``common.metrics.sync_figures``); its
margin calls by status (one grouped count; every status is shown, 0 when it
has no call, so that a graph or an alert always has its series); the
liquidations it instructed (a count); whether its custodian is silent under
the policy in force (§11.2). See docs/OPERATIONS.md, "Metrics".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from collateral_sync.sync import SyncSession
from collateral_sync.v1 import margin_pb2, valuation_pb2
from prometheus_client.metrics_core import Metric

from collateral_sync_reference.common.metrics import Source, catalogue, sync_figures
from collateral_sync_reference.exchange.custodian_silence import CustodianSilence
from collateral_sync_reference.exchange.store import ExchangeStore

__all__ = ["exchange_figures"]

_STATUS = margin_pb2.MarginCallStatus
_STATUS_PREFIX = "MARGIN_CALL_STATUS_"
#: Every status a call can be in, by wire value (UNSPECIFIED is none).
_STATES = {
    number: name.removeprefix(_STATUS_PREFIX)
    for name, number in _STATUS.items()
    if number != _STATUS.MARGIN_CALL_STATUS_UNSPECIFIED
}


def exchange_figures(
    store: ExchangeStore,
    session: SyncSession,
    clock: Callable[[], datetime],
    silence: CustodianSilence,
) -> Source:
    """A source of the exchange's figures (sync, margin calls, liquidations, silence)."""
    sync = sync_figures(lambda: (session,), clock)

    def read() -> Iterable[Metric]:
        counts = store.margin_calls.count_by_status()
        margin_calls = catalogue.MARGIN_CALLS.family()
        for number, state in _STATES.items():
            margin_calls.add_metric([state], counts.get(number, 0))
        liquidations = catalogue.LIQUIDATIONS.family()
        liquidations.add_metric([], store.liquidations.count())
        silent = catalogue.CUSTODIAN_SILENT.family()
        latest = store.policies.latest()
        if latest is not None:  # published at start: a scrape always finds one
            policy = valuation_pb2.RiskPolicy.FromString(latest[1].payload)
            silent.add_metric([session.peer_party_id], float(silence.is_silent(policy)))
        return (*sync(), margin_calls, liquidations, silent)

    return read
