"""Helpers for the SyncPositions cases: the kit plays the exchange on a raw stream.

The kit drives the stream frame by frame (rather than through a
``SyncSession``) so that it controls exactly what it sends: a window, an
acknowledgement withheld, a batch sent twice, a forged or equivocating batch.
What the custodian sends is checked with the SDK's independent verifier
(:func:`~collateral_sync.sync.verify_sync_batch`) and entry-hash rule.

The exchange-to-custodian log of the kit's party lives at the custodian and
outlives a kit run; the kit continues it from where the custodian's hello
says it stands, so that reruns against one server stay consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import grpc.aio
from collateral_sync.keys import SigningKey
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    EXCHANGE_TO_CUSTODIAN,
    ZERO_HASH,
    entry_hash,
    verify_sync_batch,
)
from collateral_sync.v1 import (
    custodian_service_pb2,
    envelope_pb2,
    position_sync_pb2,
    valuation_pb2,
)

from collateral_sync_conformance._context import CaseContext, PartyClients
from collateral_sync_conformance._expect import (
    CaseFailure,
    Outcome,
    check,
    check_equal,
    describe,
    outcome_from_error,
    sdk_check,
)
from collateral_sync_conformance.cases._kit_account import exchange_party

__all__ = [
    "KIT_WINDOW",
    "ReceivedEntry",
    "StreamEnded",
    "SyncStream",
    "check_ack",
    "kit_batch",
    "kit_update",
    "verified_entries",
]

#: The window the kit declares unless a case needs another one.
KIT_WINDOW = 64
#: How long the kit waits for a frame it expects.
FRAME_TIMEOUT = 5.0
_SYNC = "CustodianService.SyncPositions"


@dataclass(frozen=True, slots=True)
class ReceivedEntry:
    sequence: int
    prev_entry_hash: bytes
    entry_hash: bytes
    update: position_sync_pb2.PositionUpdate


class StreamEnded(Exception):  # noqa: N818 (an outcome, not a bug)
    """The custodian ended the stream: with a status (``outcome``) and maybe a SyncClose."""

    def __init__(self, outcome: Outcome, close: position_sync_pb2.SyncClose | None) -> None:
        super().__init__(outcome.code.name)
        self.outcome = outcome
        self.close = close


@dataclass
class SyncStream:
    """One SyncPositions call, the kit as the exchange."""

    ctx: CaseContext
    call: Any
    #: The custodian's hello.
    hello: position_sync_pb2.SyncHello
    #: The exchange the kit speaks as on this stream (the kit's own unless opened as another).
    party_id: str = ""
    last_sent: position_sync_pb2.SyncFrame | None = None
    close_frame: position_sync_pb2.SyncClose | None = None
    frames: list[position_sync_pb2.SyncFrame] = field(default_factory=list)
    _ended: StreamEnded | None = None

    @classmethod
    async def open(
        cls,
        ctx: CaseContext,
        *,
        received_sequence: int = 0,
        received_entry_hash: bytes = ZERO_HASH,
        window: int = KIT_WINDOW,
        sent_sequence: int | None = None,
        as_party: PartyClients | None = None,
    ) -> SyncStream:
        """Dial, send the kit's hello, and return once the custodian's hello is read.

        ``as_party``: speak as that exchange (a certificate of ``--identity``)
        instead of the kit's own, which has sent nothing on that exchange's log.
        """
        clients = as_party.custodian if as_party is not None else ctx.custodian
        party = as_party.party_id if as_party is not None else exchange_party(ctx)
        if as_party is not None and sent_sequence is None:
            sent_sequence = 0
        call = clients.sync_positions(timeout=ctx.config.rpc_timeout * 6)
        hello = position_sync_pb2.SyncHello(
            party_id=party,
            sending_direction=EXCHANGE_TO_CUSTODIAN,  # type: ignore[arg-type]
            received_sequence=received_sequence,
            received_entry_hash=received_entry_hash,
            sent_sequence=ctx.session.sync_sent if sent_sequence is None else sent_sequence,
            window=window,
        )
        stream = cls(ctx=ctx, call=call, hello=position_sync_pb2.SyncHello(), party_id=party)
        stream._start_reading()
        try:
            await stream.send(position_sync_pb2.SyncFrame(hello=hello))
            first = await stream.next_frame()
            check(
                first is not None and first.WhichOneof("frame") == "hello",
                "the custodian's first frame on SyncPositions must be its hello (§6.2)",
                expected="a SyncFrame with hello",
                got=describe(first) if first is not None else "nothing",
            )
        except BaseException:
            await stream.close()
            raise
        assert first is not None
        stream.hello = first.hello
        if as_party is None:
            # Where the custodian stands in the kit's log, for the next hello and batch.
            ctx.session.sync_sent = max(ctx.session.sync_sent, first.hello.received_sequence)
        return stream

    async def send(self, frame: position_sync_pb2.SyncFrame) -> None:
        self.last_sent = frame
        self.ctx.transcript.append(
            Outcome(rpc=f"{_SYNC} (write)", request=frame, response=None, code=grpc.StatusCode.OK)
        )
        # A call that has ended refuses writes; the reading side reports how it ended.
        with contextlib.suppress(asyncio.InvalidStateError, grpc.RpcError):
            await self.call.write(custodian_service_pb2.SyncPositionsRequest(frame=frame))

    def _start_reading(self) -> None:
        # Reads run in a task of their own: cancelling a pending read (a timeout)
        # would cancel the whole call.
        self._queue: asyncio.Queue[position_sync_pb2.SyncFrame | StreamEnded] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        started = time.perf_counter()
        while True:
            try:
                response = await self.call.read()
            except grpc.RpcError as err:
                outcome = outcome_from_error(
                    _SYNC, self.last_sent, err, time.perf_counter() - started
                )
                await self._queue.put(StreamEnded(outcome, None))
                return
            if response is grpc.aio.EOF:
                outcome = Outcome(
                    rpc=_SYNC, request=self.last_sent, response=None, code=await self.call.code()
                )
                await self._queue.put(StreamEnded(outcome, None))
                return
            await self._queue.put(response.frame)

    async def next_frame(
        self, timeout: float = FRAME_TIMEOUT
    ) -> position_sync_pb2.SyncFrame | None:
        """The custodian's next frame; None on timeout; StreamEnded when the call ends."""
        if self._ended is not None:
            raise self._ended
        try:
            async with asyncio.timeout(timeout):
                item = await self._queue.get()
        except TimeoutError:
            return None
        if isinstance(item, StreamEnded):
            self._ended = StreamEnded(item.outcome, self.close_frame)
            self.ctx.transcript.append(item.outcome)
            raise self._ended
        frame = item
        self.frames.append(frame)
        self.ctx.transcript.append(
            Outcome(rpc=f"{_SYNC} (read)", request=None, response=frame, code=grpc.StatusCode.OK)
        )
        if frame.WhichOneof("frame") == "close":
            self.close_frame = frame.close
        return frame

    async def frame_of(
        self, kinds: tuple[str, ...], timeout: float = FRAME_TIMEOUT
    ) -> position_sync_pb2.SyncFrame | None:
        """The next frame of one of ``kinds`` (others are skipped), or None on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            frame = await self.next_frame(remaining)
            if frame is None:
                return None
            if frame.WhichOneof("frame") in kinds:
                return frame

    async def ended(self, timeout: float = FRAME_TIMEOUT) -> StreamEnded | None:
        """Read until the custodian ends the call; None if it is still open after ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                await self.next_frame(remaining)
        except StreamEnded as end:
            return end
        return None

    async def ack(self, entry: ReceivedEntry) -> None:
        await self.send(
            position_sync_pb2.SyncFrame(
                ack=position_sync_pb2.SyncAck(sequence=entry.sequence, entry_hash=entry.entry_hash)
            )
        )

    async def receive_until(self, sequence: int, *, ack: bool = True) -> list[ReceivedEntry]:
        """Entries until ``sequence`` is reached (acknowledging each batch unless told not to)."""
        entries: list[ReceivedEntry] = []
        while not entries or entries[-1].sequence < sequence:
            frame = await self.frame_of(("batch",))
            if frame is None:
                got = entries[-1].sequence if entries else "nothing"
                raise CaseFailure(
                    f"the custodian stopped sending before sequence {sequence}",
                    expected=f"batches up to sequence {sequence}",
                    got=f"up to {got}",
                )
            batch = await verified_entries(self.ctx, frame.batch, receiver=self.party_id)
            entries.extend(batch)
            if ack:
                await self.ack(batch[-1])
        return entries

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.wait({self._reader})


async def verified_entries(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, *, receiver: str = ""
) -> list[ReceivedEntry]:
    """A custodian's batch, verified by the SDK: signature, sender, role, direction, chain.

    Addressed to ``receiver`` (default: the kit's exchange)."""
    verified = sdk_check(
        "a sync batch from the custodian",
        verify_sync_batch,
        envelope,
        ctx.registry,
        receiver_party_id=receiver or exchange_party(ctx),
        sender_party_id=ctx.server_party_id,
        direction=CUSTODIAN_TO_EXCHANGE,
        now=await ctx.server_now(),
        max_entries=2**32 - 1,
    )
    entries = []
    prev = verified.first_prev_hash
    for i, (hash_, update) in enumerate(zip(verified.entry_hashes, verified.updates, strict=True)):
        entries.append(
            ReceivedEntry(
                sequence=verified.first_sequence + i,
                prev_entry_hash=prev,
                entry_hash=hash_,
                update=position_sync_pb2.PositionUpdate.FromString(update),
            )
        )
        prev = hash_
    return entries


async def kit_update(ctx: CaseContext, signer: SigningKey) -> bytes:
    """A harmless exchange-to-custodian update: a signed risk policy no valuation can use.

    A custodian records it as a refused update (its content), not as a failed
    batch, so acknowledging it changes no holdings; its fresh header makes it unique.
    """
    policy = valuation_pb2.RiskPolicy()
    envelope = await ctx.sign(policy, signer)
    return position_sync_pb2.PositionUpdate(risk_policy=envelope).SerializeToString()


async def kit_batch(
    ctx: CaseContext,
    signer: SigningKey,
    first_sequence: int,
    prev_entry_hash: bytes,
    updates: list[bytes],
    *,
    issuer: str | None = None,
    issued_at: datetime | None = None,
) -> tuple[envelope_pb2.Envelope, list[bytes]]:
    """A signed exchange-to-custodian batch chained from ``prev_entry_hash``; returns its hashes.

    Issued now (server time) unless ``issued_at`` says otherwise.
    """
    batch = position_sync_pb2.SyncBatch(direction=EXCHANGE_TO_CUSTODIAN)  # type: ignore[arg-type]
    hashes = []
    prev = prev_entry_hash
    for i, update in enumerate(updates):
        sequence = first_sequence + i
        hash_ = entry_hash(EXCHANGE_TO_CUSTODIAN, sequence, prev, update)
        batch.entries.add(sequence=sequence, prev_entry_hash=prev, update=update, entry_hash=hash_)
        hashes.append(hash_)
        prev = hash_
    envelope = await ctx.sign(
        batch,
        signer,
        issuer=issuer,
        sequence=first_sequence + len(updates) - 1,
        issued_at=issued_at,
    )
    return envelope, hashes


def check_ack(frame: position_sync_pb2.SyncFrame | None, sequence: int, hash_: bytes) -> None:
    check(
        frame is not None and frame.WhichOneof("frame") == "ack",
        "the custodian did not acknowledge the kit's batch",
        expected=f"SyncAck(sequence={sequence})",
        got=describe(frame) if frame is not None else "no ack",
    )
    assert frame is not None
    check_equal("acknowledged sequence", sequence, frame.ack.sequence)
    check_equal("acknowledged entry hash", hash_.hex(), frame.ack.entry_hash.hex())
