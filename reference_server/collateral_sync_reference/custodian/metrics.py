"""The custodian's figures for its metrics, read at scrape time from where they live.

The sync session with each exchange (``common.metrics.sync_figures``); the
attestation log's size (the log in memory) and its latest checkpoint's tree
size and age (one indexed row); the liquidations executed (a count of the
liquidation records). See docs/OPERATIONS.md, "Metrics".
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from collateral_sync_reference.common.metrics import Source, catalogue, sync_figures
from collateral_sync_reference.custodian.core import Custodian

__all__ = ["custodian_figures"]


def custodian_figures(custodian: Custodian) -> Source:
    """A source of the custodian's figures (sync, attestation, liquidations)."""
    ledger = custodian.ledger
    sync = sync_figures(custodian.sessions.values, ledger.clock.now)

    def read() -> Iterable[Metric]:
        size = catalogue.ATTESTATION_LOG_SIZE.family()
        size.add_metric([], custodian.attestation.attestation_log.size)
        found: list[Metric] = [*sync(), size]
        latest = ledger.store.latest_checkpoint()
        if latest is not None:
            tree_size = catalogue.ATTESTATION_CHECKPOINT_TREE_SIZE.family()
            tree_size.add_metric([], latest.tree_size)
            age = catalogue.ATTESTATION_CHECKPOINT_AGE.family()
            age.add_metric([], (ledger.clock.now() - latest.issued_at).total_seconds())
            found += [tree_size, age]
        liquidations = catalogue.LIQUIDATIONS.family()
        liquidations.add_metric([], ledger.store.liquidation_count())
        found.append(liquidations)
        return found

    return read
