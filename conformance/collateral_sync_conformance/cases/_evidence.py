"""Reading the equivocation evidence a server keeps (docs/PROTOCOL.md §10.7), and judging it.

The kit lists the evidence as a regulator (the only caller §10.7 lets read
it) and checks each item it relies on as a third party would: both
statements verify as the accused party's own, with a key valid when it
signed, and they contradict each other. Freshness is not judged — evidence
is old by nature — so each statement is verified at its own ``issued_at``
(§3.6.1, the evidence row). The timestamp is read from the payload before
the signature is checked only to choose that moment; nothing else of an
unverified payload is used.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

from collateral_sync.signing import verify_statement
from collateral_sync.sync import VerifiedSyncBatch, verify_sync_batch
from collateral_sync.v1 import (
    attestation_pb2,
    envelope_pb2,
    equivocation_pb2,
    position_sync_pb2,
    reconciliation_service_pb2,
)
from google.protobuf.message import DecodeError, Message

from collateral_sync_conformance._context import CaseContext, PartyClients
from collateral_sync_conformance._expect import (
    CaseFailure,
    check,
    check_equal,
    describe,
    expect_ok,
    sdk_check,
)

__all__ = [
    "EVIDENCE_TIMEOUT",
    "KIND",
    "checkpoint_pair",
    "list_evidence",
    "second_root",
    "sync_batch_pair",
    "wait_for_evidence",
]

KIND = equivocation_pb2.EquivocationKind
#: How long the server has to keep and list evidence once it has refused the statement.
EVIDENCE_TIMEOUT = 20.0
#: Pages the kit follows before it calls the listing endless.
_MAX_PAGES = 100
_POLL = 0.2


async def list_evidence(
    ctx: CaseContext, regulator: PartyClients
) -> list[equivocation_pb2.EquivocationEvidence]:
    """Everything ``ListEquivocationEvidence`` lists to ``regulator``, following the pages."""
    found: list[equivocation_pb2.EquivocationEvidence] = []
    token = ""
    for _ in range(_MAX_PAGES):
        outcome = await ctx.rpc(
            regulator.reconciliation.list_equivocation_evidence,
            reconciliation_service_pb2.ListEquivocationEvidenceRequest(page_token=token),
            label=f"ListEquivocationEvidence as {regulator.party_id}",
        )
        page: reconciliation_service_pb2.ListEquivocationEvidenceResponse = expect_ok(outcome)
        found.extend(page.evidence)
        token = page.next_page_token
        if not token:
            return found
    raise CaseFailure(
        f"ListEquivocationEvidence gave a next_page_token on each of {_MAX_PAGES} pages",
        expected="a last page with an empty next_page_token",
        got=f"{len(found)} items and still a token",
    )


async def wait_for_evidence(
    ctx: CaseContext,
    regulator: PartyClients,
    wanted: Callable[[equivocation_pb2.EquivocationEvidence], bool],
    what: str,
) -> equivocation_pb2.EquivocationEvidence:
    """The first listed item ``wanted`` accepts, once the server lists it (§10.7)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVIDENCE_TIMEOUT
    while True:
        listed = await list_evidence(ctx, regulator)
        for item in listed:
            if wanted(item):
                return item
        if loop.time() > deadline:
            raise CaseFailure(
                f"the server does not list {what} to a regulator within "
                f"{EVIDENCE_TIMEOUT:.0f} s of refusing it (§10.7: kept and served)",
                expected=what,
                got=json.dumps([_summary(item) for item in listed], indent=2, default=str)
                if listed
                else "no evidence listed",
            )
        await asyncio.sleep(_POLL)


def _summary(item: equivocation_pb2.EquivocationEvidence) -> object:
    """The item without its envelopes' bytes: what a reader needs to see why it did not match."""
    shown = equivocation_pb2.EquivocationEvidence()
    shown.CopyFrom(item)
    for name in ("first", "second"):
        shown.ClearField(name)
    return {
        **(describe(shown) or {}),
        "first": "set" if item.HasField("first") else "unset",
        "second": "set" if item.HasField("second") else "unset",
    }


def second_root(item: equivocation_pb2.EquivocationEvidence) -> bytes | None:
    """The root of the checkpoint an item holds as its ``second`` statement, if it holds one:
    which refused checkpoint the item is about (verified later, when the item is judged)."""
    if not item.HasField("second"):
        return None
    try:
        return attestation_pb2.Checkpoint.FromString(item.second.payload).root_hash
    except DecodeError:
        return None


def _issued_at(envelope: envelope_pb2.Envelope, message_type: type[Message], what: str) -> datetime:
    """When the statement says it was issued: the moment to verify evidence at."""
    try:
        message = message_type.FromString(envelope.payload)
    except DecodeError as err:
        raise CaseFailure(
            f"{what}: the payload does not parse as {message_type.DESCRIPTOR.name}",
            expected=f"a signed {message_type.DESCRIPTOR.name}",
            got=str(err),
        ) from err
    header = message.header  # type: ignore[attr-defined]
    return header.issued_at.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


def _both_set(item: equivocation_pb2.EquivocationEvidence) -> None:
    for name in ("first", "second"):
        check(
            item.HasField(name),
            f"the evidence lacks its {name} statement: one signed statement proves nothing "
            "(§10.7: both statements as received)",
            expected=f"{name} set",
            got=_summary(item),
        )


def checkpoint_pair(
    ctx: CaseContext, item: equivocation_pb2.EquivocationEvidence, accused: str, origin: str
) -> tuple[attestation_pb2.Checkpoint, attestation_pb2.Checkpoint]:
    """Both checkpoints of the evidence, verified as ``accused``'s, of ``origin``."""
    _both_set(item)
    checkpoints = []
    for name in ("first", "second"):
        envelope: envelope_pb2.Envelope = getattr(item, name)
        what = f"the evidence's {name} checkpoint"
        verified = sdk_check(
            what,
            verify_statement,
            envelope,
            ctx.registry,
            expected_type=attestation_pb2.Checkpoint,
            audience="*",
            now=_issued_at(envelope, attestation_pb2.Checkpoint, what),
        )
        check_equal(f"issuer of {what}", accused, verified.issuer)
        check_equal(f"origin of {what}", origin, verified.message.origin)
        checkpoints.append(verified.message)
    return checkpoints[0], checkpoints[1]


def sync_batch_pair(
    ctx: CaseContext,
    item: equivocation_pb2.EquivocationEvidence,
    *,
    sender: str,
    receiver: str,
    direction: int,
) -> tuple[bytes, bytes]:
    """The two entry hashes both signed batches of the evidence give its ``sequence``.

    Each batch must verify as ``sender``'s batch of ``direction`` to
    ``receiver``, hash chain included. The first must hold an entry at the
    sequence; the second may instead start right after it, its first entry's
    ``prev_entry_hash`` then saying what it holds there (§6.5 step 4).
    """
    _both_set(item)
    sequence = item.sequence
    batches: list[VerifiedSyncBatch] = []
    for name in ("first", "second"):
        envelope: envelope_pb2.Envelope = getattr(item, name)
        what = f"the evidence's {name} sync batch"
        batches.append(
            sdk_check(
                what,
                verify_sync_batch,
                envelope,
                ctx.registry,
                receiver_party_id=receiver,
                sender_party_id=sender,
                direction=direction,
                now=_issued_at(envelope, position_sync_pb2.SyncBatch, what),
                max_entries=2**32 - 1,
            )
        )
    hashes = []
    for name, batch, before_allowed in (("first", batches[0], False), ("second", batches[1], True)):
        if batch.first_sequence <= sequence <= batch.last_sequence:
            hashes.append(batch.entry_hashes[sequence - batch.first_sequence])
        elif before_allowed and sequence == batch.first_sequence - 1:
            hashes.append(batch.first_prev_hash)
        else:
            raise CaseFailure(
                f"the evidence's {name} sync batch says nothing of sequence {sequence}",
                expected=f"an entry at {sequence}"
                + (f" or a first entry at {sequence + 1}" if before_allowed else ""),
                got=f"entries {batch.first_sequence}..{batch.last_sequence}",
            )
    check(
        hashes[0] != hashes[1],
        f"the evidence's two sync batches agree at sequence {sequence}: they prove nothing",
        expected="two different entry hashes",
        got=hashes[0].hex(),
    )
    return hashes[0], hashes[1]
