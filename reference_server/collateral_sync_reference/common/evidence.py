"""The evidence of equivocation a party keeps against others, served to regulators (PROTOCOL.md §10.7).

A party that catches a counterparty saying two things that cannot both be
true holds the one proof of it a third party can check: the counterparty's
own signatures. The party that lied will not hand it over, so the party that
caught it keeps it and gives it to the regulator.

The evidence is written where each refusal happens, in the party's own
database, in a transaction of its own that outlives the refusal: the sync
logs keep theirs (the SDK's :class:`~collateral_sync.sync.SyncLog`, §6.2,
§6.5, §6.6), the exchange keeps the custodian checkpoints it refused
(``exchange/holdings.py``, §5.6). Each role hands :class:`KeptEvidence` one
*source* per place that keeps some; this module turns what the sync logs keep
into ``EquivocationEvidence`` messages and serves every source's evidence,
oldest first, in pages, to regulators only.

A page token counts the items served. Evidence is only ever added, each with
the time it was detected, which the party's clock gives and which only moves
forward: a new item sorts after every item already kept, so the count keeps
naming the same items from one page to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc.aio
from collateral_sync.sync import EquivocationEvidence as SyncEvidence
from collateral_sync.sync import SyncLog
from collateral_sync.v1 import (
    envelope_pb2,
    equivocation_pb2,
    reconciliation_service_pb2,
)

from collateral_sync_reference.common.access import Caller, require_regulator
from collateral_sync_reference.common.paging import Listing, rows_per_page

__all__ = ["EvidenceSource", "KeptEvidence", "sync_log_evidence"]

_K = equivocation_pb2.EquivocationKind
#: The SDK's names for where a sync equivocation showed, and their kinds.
_SYNC_KINDS = {
    "batch": _K.EQUIVOCATION_KIND_SYNC_BATCH,
    "hello": _K.EQUIVOCATION_KIND_SYNC_HELLO,
    "ack": _K.EQUIVOCATION_KIND_SYNC_ACK,
}
_LISTING = Listing("ListEquivocationEvidence", tag="eq1:")

#: Something that keeps evidence: every item it holds, in the order it was kept.
EvidenceSource = Callable[[], Iterable[equivocation_pb2.EquivocationEvidence]]


def sync_log_evidence(log: SyncLog) -> list[equivocation_pb2.EquivocationEvidence]:
    """What ``log`` keeps against its peer, as ``EquivocationEvidence`` (§10.7).

    A conflicting batch is a signed statement of the peer, as is the stored
    batch it contradicts; a hello or an ack is a frame, unsigned, kept as it
    came.
    """
    return [_from_sync(log.peer_party_id, kept) for kept in log.evidence()]


def _from_sync(peer: str, kept: SyncEvidence) -> equivocation_pb2.EquivocationEvidence:
    kind = _SYNC_KINDS[kept.kind]
    evidence = equivocation_pb2.EquivocationEvidence(
        accused_party_id=peer,
        kind=kind,
        direction=kept.direction,  # type: ignore[arg-type]
        sequence=kept.sequence,
        first_hash=kept.stored_entry_hash,
        second_hash=kept.received_entry_hash,
    )
    if kind == _K.EQUIVOCATION_KIND_SYNC_BATCH:
        if kept.stored_batch is not None:
            evidence.first.CopyFrom(envelope_pb2.Envelope.FromString(kept.stored_batch))
        evidence.second.CopyFrom(envelope_pb2.Envelope.FromString(kept.received))
    else:
        evidence.received_frame = kept.received  # the serialised SyncFrame as it came
    evidence.detected_at.FromDatetime(kept.detected_at)
    return evidence


@dataclass(frozen=True, slots=True)
class _Row:
    """One item of the listing, numbered from 1 in listing order (the page token's ``seq``)."""

    seq: int
    evidence: equivocation_pb2.EquivocationEvidence


class KeptEvidence:
    """``ListEquivocationEvidence``: every source's evidence, oldest first, to regulators only."""

    def __init__(
        self,
        sources: Sequence[EvidenceSource],
        caller: Callable[[grpc.aio.ServicerContext], Caller],
    ) -> None:
        self._sources = tuple(sources)
        self._caller = caller

    def check_reader(self, context: grpc.aio.ServicerContext) -> None:
        """Only a regulator reads the evidence (PERMISSION_DENIED ``KEY_ROLE_MISMATCH``, §10.7)."""
        require_regulator(self._caller(context), what="the equivocation evidence this party keeps")

    def all(self) -> list[equivocation_pb2.EquivocationEvidence]:
        """Every item, oldest first (a stable sort: ties keep each source's own order)."""
        items = [item for source in self._sources for item in source()]
        items.sort(key=lambda item: (item.detected_at.seconds, item.detected_at.nanos))
        return items

    def page(
        self, request: reconciliation_service_pb2.ListEquivocationEvidenceRequest
    ) -> reconciliation_service_pb2.ListEquivocationEvidenceResponse:
        after = _LISTING.after(request.page_token, "")
        size = rows_per_page(request.page_size)
        items = self.all()
        rows = [_Row(seq, item) for seq, item in enumerate(items, 1)][after : after + size + 1]
        page, token = _LISTING.page(rows, size, "")
        return reconciliation_service_pb2.ListEquivocationEvidenceResponse(
            evidence=[row.evidence for row in page], next_page_token=token
        )
