"""Position sync: the long-lived, resumable, exactly-once stream between custodian and exchange.

Each direction (custodian → exchange, exchange → custodian) is an ordered log
of entries chained by :func:`entry_hash`; entries travel in ``SyncBatch``
statements signed once per batch; the receiver verifies a batch
(:func:`verify_sync_batch`), then stores and applies its new entries in one
SQLite transaction and only then acknowledges. After a disconnect or a crash
each side says in its hello how far it has durably received the other's log,
and the other replays from there: nothing acknowledged is lost, nothing is
applied twice. The same sequence with two different hashes is equivocation:
refused (ABORTED), with the evidence kept. docs/PROTOCOL.md §6 is the spec.

A party keeps one :class:`SyncLog` per peer on its own ``sqlite3.Connection``
and changes its state and appends to its outgoing log in one transaction::

    log = SyncLog(connection, party_id="exchange-1", peer_party_id="custodian-1",
                  sending_direction=EXCHANGE_TO_CUSTODIAN)
    with log.transaction() as conn:
        conn.execute("UPDATE credit_lines SET ...")
        log.append([update])           # sent once the transaction commits

A :class:`SyncSession` runs both logs over one stream. ``apply`` receives the
peer's new updates inside the storing transaction and must change state only
through the same connection (or in memory it rebuilds from it); it may
:meth:`SyncLog.append` its own answers there, which then commit with them. A
CollateralSyncError it raises refuses the batch with that reason::

    session = SyncSession(log, signing_key, registry, apply=apply_updates)
    await dial_sync_stream(session, CustodianClient(channel))        # exchange
    await serve_sync_stream(session, request_iterator, context)       # custodian

Reconciliation (docs/PROTOCOL.md §10.2) states both logs as they stood at a
cut-off ``C``: for each direction, the last entry contained in a batch whose
signed ``header.issued_at`` is at or before ``C``. :meth:`SyncLog.heads_at`
answers it from what both sides keep: the peer's batch envelopes as stored,
and a record of every batch the session sends (its last entry and
``issued_at``, written in a small transaction of its own before the batch
goes out)::

    heads = log.heads_at(cutoff)       # {direction: LogHead}, both directions

Durability: the log puts the database in WAL mode with ``synchronous=NORMAL``
by default, which keeps every committed (so every acknowledged) entry across
a process crash such as SIGKILL, but not necessarily across power loss; pass
``synchronous="FULL"`` to :class:`SyncLog` for that, at one fsync per commit.
A :class:`WalCheckpointer` moves SQLite's WAL checkpoints (which sync the
database file) out of the commits, so that no batch's acknowledgement waits for one.
"""

from __future__ import annotations

from collateral_sync.sync._batch import (
    CUSTODIAN_TO_EXCHANGE,
    ENTRY_HASH_DOMAIN,
    EXCHANGE_TO_CUSTODIAN,
    ZERO_HASH,
    EquivocationEvidence,
    LogHead,
    VerifiedSyncBatch,
    entry_hash,
    verify_sync_batch,
)
from collateral_sync.sync._log import MAX_UPDATE_BYTES, ApplyUpdates, SyncLog
from collateral_sync.sync._session import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_TTL,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_WINDOW,
    LIVENESS_INTERVALS,
    SendFrame,
    SyncSession,
    dial_sync_stream,
    serve_sync_stream,
)
from collateral_sync.sync._wal import WalCheckpointer

__all__ = [
    "CUSTODIAN_TO_EXCHANGE",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_TTL",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_WINDOW",
    "ENTRY_HASH_DOMAIN",
    "EXCHANGE_TO_CUSTODIAN",
    "LIVENESS_INTERVALS",
    "MAX_UPDATE_BYTES",
    "ZERO_HASH",
    "ApplyUpdates",
    "EquivocationEvidence",
    "LogHead",
    "SendFrame",
    "SyncLog",
    "SyncSession",
    "VerifiedSyncBatch",
    "WalCheckpointer",
    "dial_sync_stream",
    "entry_hash",
    "serve_sync_stream",
    "verify_sync_batch",
]
