"""Position-sync figures, read from each :class:`~collateral_sync.sync.SyncSession` at scrape time.

Per peer and direction (``outgoing``: our log towards the peer; ``incoming``:
the peer's log as stored here):

- lag in entries: outgoing, our head minus what the peer acknowledged;
  incoming, the head the peer last announced (hello or heartbeat) minus ours
  of its log (never below 0);
- lag in seconds: outgoing, the age of the oldest batch sent and not yet
  acknowledged (0 when none is); incoming, the time since the latest instant
  up to which the peer's log is known complete here: every batch the peer
  issued before its latest frame received (batch or heartbeat) is stored
  (docs/PROTOCOL.md §10.2). Healthy, it stays under a heartbeat interval; it
  counts from the server's start until the peer is first heard.

What the peer acknowledged is known from its hello on: right after a
restart, until the peer reconnects, the outgoing lag is the whole log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from collateral_sync.sync import SyncSession
from prometheus_client.metrics_core import Metric

from collateral_sync_reference.common.metrics._exposition import Source
from collateral_sync_reference.common.metrics.catalogue import (
    SYNC_BATCHES_APPLIED,
    SYNC_CONNECTED,
    SYNC_ENTRIES_APPLIED,
    SYNC_LAG_ENTRIES,
    SYNC_LAG_SECONDS,
)

__all__ = ["sync_figures"]

_OUT, _IN = "outgoing", "incoming"


def sync_figures(
    sessions: Callable[[], Iterable[SyncSession]],
    clock: Callable[[], datetime],
) -> Source:
    """A source of the sync figures of every session ``sessions()`` returns (on the server's clock)."""
    started = clock()

    def read() -> Iterable[Metric]:
        now = clock()
        connected = SYNC_CONNECTED.family()
        lag_entries = SYNC_LAG_ENTRIES.family()
        lag_seconds = SYNC_LAG_SECONDS.family()
        batches = SYNC_BATCHES_APPLIED.family()
        entries = SYNC_ENTRIES_APPLIED.family()
        for session in sessions():
            peer = session.peer_party_id
            connected.add_metric([peer], 1.0 if session.connected else 0.0)
            outgoing = max(0, session.sent_head.sequence - session.acknowledged_sequence)
            incoming = max(0, session.peer_sent_sequence - session.received_head.sequence)
            lag_entries.add_metric([peer, _OUT], outgoing)
            lag_entries.add_metric([peer, _IN], incoming)
            oldest = session.oldest_unacknowledged_at
            lag_seconds.add_metric([peer, _OUT], _seconds(now, oldest) if oldest else 0.0)
            heard = session.peer_issued_at
            lag_seconds.add_metric([peer, _IN], _seconds(now, heard or started))
            batches.add_metric([peer], session.applied_batches)
            entries.add_metric([peer], session.applied_entries)
        return (connected, lag_entries, lag_seconds, batches, entries)

    return read


def _seconds(now: datetime, since: datetime) -> float:
    return max(0.0, (now - since).total_seconds())
