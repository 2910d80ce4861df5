"""Position sync, stream side: the session that runs both logs over one stream, and gRPC adapters.

Public names are re-exported by :mod:`collateral_sync.sync`, which documents
the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import NoReturn

import grpc
import grpc.aio
from opentelemetry import trace

from collateral_sync.clients import DEFAULT_SYNC_STREAM_TIMEOUT, CustodianClient, Metadata
from collateral_sync.errors import (
    STATUS_BY_REASON,
    CollateralSyncError,
    MalformedError,
    RPCError,
    VerificationError,
    error_from_rpc_error,
    to_grpc_status,
)
from collateral_sync.keys import KeyRegistry, _to_timestamp, role_name
from collateral_sync.signer import Signer
from collateral_sync.signing import DEFAULT_MAX_SKEW, sign_statement
from collateral_sync.sync._batch import (
    _SENDER_ROLE,
    HASH_SIZE,
    LogHead,
    _equivocation_error,
    direction_name,
    verify_sync_batch,
)
from collateral_sync.sync._log import ApplyUpdates, SyncLog
from collateral_sync.transport import check_peer_party
from collateral_sync.v1 import custodian_service_pb2, errors_pb2, position_sync_pb2

_R = errors_pb2.ErrorReason

DEFAULT_WINDOW = 8_000
#: Entries per signed batch. The receiver stores and applies a batch in one go on
#: its event loop, and an acknowledgement queued behind it waits that long: at
#: 1,000 the loaded margin-call p99 of 'collateral-sync bench sync' was 25.7 ms, at
#: 250 13.2 ms, for the same throughput (86k updates/s both, one signature per batch).
DEFAULT_BATCH_SIZE = 250
DEFAULT_HEARTBEAT_INTERVAL = timedelta(seconds=5)
#: A peer silent for this many of its heartbeat intervals is considered gone.
LIVENESS_INTERVALS = 3
DEFAULT_BATCH_TTL = timedelta(minutes=5)
_CLOSE_TIMEOUT = 1.0

SendFrame = Callable[[position_sync_pb2.SyncFrame], Awaitable[None]]

# opentelemetry-api only: without a configured provider every span is a no-op.
_TRACER = trace.get_tracer("collateral_sync.sync")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SyncSession:
    """One party's side of the position-sync stream with one peer.

    Sends our outgoing log (``log``) in signed batches of at most
    ``batch_size`` entries, never more than the peer's window unacknowledged;
    receives, verifies, stores and applies the peer's log (``apply`` is called
    inside the storing transaction with the new (sequence, PositionUpdate)
    pairs); acknowledges after commit; resumes from the durable heads after
    any disconnect. ``window`` is what we accept in flight from the peer;
    ``heartbeat_interval`` is how often we promise to send a frame when idle.

    :meth:`run` drives one stream and returns when the peer ends it; it may
    be called again for the next stream (a new call takes over from one still
    running). It raises CollateralSyncError when either side refuses the
    other's input (RPCError when the peer refused ours) and TimeoutError when
    the peer stayed silent for :data:`LIVENESS_INTERVALS` of its intervals.
    """

    def __init__(
        self,
        log: SyncLog,
        signer: Signer,
        registry: KeyRegistry,
        *,
        apply: ApplyUpdates,
        window: int = DEFAULT_WINDOW,
        batch_size: int = DEFAULT_BATCH_SIZE,
        heartbeat_interval: timedelta = DEFAULT_HEARTBEAT_INTERVAL,
        batch_ttl: timedelta = DEFAULT_BATCH_TTL,
        max_skew: timedelta = DEFAULT_MAX_SKEW,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if signer.party_id != log.party_id:
            raise ValueError(f"signer is {signer.party_id!r}, the log's party {log.party_id!r}")
        expected_role = _SENDER_ROLE[log.sending_direction]
        if signer.role != expected_role:
            raise ValueError(
                f"{direction_name(log.sending_direction)} is signed by a "
                f"{role_name(expected_role)} key, got {role_name(signer.role)}"
            )
        if not 1 <= window < 2**32:
            raise ValueError(f"expected 1 <= window < 2**32, got {window}")
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        interval_ms = heartbeat_interval // timedelta(milliseconds=1)
        if not 1 <= interval_ms < 2**32:
            raise ValueError(f"expected a heartbeat interval of 1 ms or more, got {interval_ms}")
        if batch_ttl <= timedelta(0):
            raise ValueError(f"expected a positive batch_ttl, got {batch_ttl}")
        self._log = log
        self._signer = signer
        self._registry = registry
        self._apply = apply
        self._window = window
        self._batch_size = batch_size
        self._interval_ms = interval_ms
        self._batch_ttl = batch_ttl
        self._max_skew = max_skew
        self._clock = clock
        self._speaks_first = log.sending_direction == _EXCHANGE_SENDS
        # Per stream (reset by run):
        self._wake: asyncio.Event | None = None
        self._send_lock: asyncio.Lock | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._connected = False
        self._peer_window = 0
        self._peer_dead_after = 0.0
        self._last_sent_at = 0.0
        self._sent = 0  # highest sequence sent on this stream
        self._sent_hash = b""
        # Across streams:
        self._acked = 0
        self._peer_sent_sequence = 0
        self._peer_issued_at: datetime | None = None
        self._heard_monotonic = time.monotonic()
        self._ack_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Batches sent and not yet acknowledged: (last sequence, issued_at), by sequence.
        self._unacknowledged: deque[tuple[int, datetime]] = deque()
        self._received = 0  # head of the peer's log as stored here, once a hello read it
        self._applied_batches = 0
        self._applied_entries = 0

    # -- state --

    @property
    def log(self) -> SyncLog:
        return self._log

    @property
    def peer_party_id(self) -> str:
        return self._log.peer_party_id

    @property
    def sent_head(self) -> LogHead:
        """Head of our outgoing log (what we have written, sent or not)."""
        return self._log.sent_head()

    @property
    def received_head(self) -> LogHead:
        """Head of the peer's log as durably received (and applied) here."""
        return self._log.received_head()

    @property
    def connected(self) -> bool:
        """Whether a stream is running past the hello exchange."""
        return self._connected

    @property
    def acknowledged_sequence(self) -> int:
        """Highest sequence of our log the peer has confirmed durable (hello or ack)."""
        return self._acked

    @property
    def in_flight(self) -> int:
        """Entries sent on the current stream and not yet acknowledged."""
        return self._sent - self._acked if self._connected else 0

    @property
    def peer_sent_sequence(self) -> int:
        """Head of the peer's own log, as it last said (hello or heartbeat)."""
        return self._peer_sent_sequence

    @property
    def peer_issued_at(self) -> datetime | None:
        """Latest time the peer stamped on a frame received here, on any stream; None before one.

        A batch's signed ``header.issued_at`` once the batch is stored (a batch
        that fails is not counted), or a heartbeat's ``sent_at``. Frames of a
        stream arrive in the order the peer issued them, so every batch the
        peer issued before this time on the stream has been stored (the
        exchange's cut-off wait, docs/PROTOCOL.md §10.2). Kept in memory only.
        """
        return self._peer_issued_at

    @property
    def peer_silent_for(self) -> timedelta:
        """Time since the last frame of the peer's was accepted here, on any stream.

        A hello that passed its checks, a batch verified and stored, an ack, or
        a heartbeat; before any, the time since this object was made. Measured
        on the machine's monotonic clock, which a test clock does not move: a
        party that must not act on a silent counterparty's data (an exchange
        whose custodian is silent, docs/PROTOCOL.md §11.2) compares this with
        its window.
        """
        return timedelta(seconds=time.monotonic() - self._heard_monotonic)

    @property
    def oldest_unacknowledged_at(self) -> datetime | None:
        """When the oldest batch sent and not yet acknowledged was issued; None when none is.

        Counts batches sent on any stream of this session object: one sent on a
        stream that broke stays the oldest until the peer acknowledges its
        entries. Entries written but not yet sent (no stream, or a full window)
        are not counted here: :attr:`connected` and the heads tell of them.
        """
        return self._unacknowledged[0][1] if self._unacknowledged else None

    @property
    def applied_batches(self) -> int:
        """Peer's batches with new entries stored and applied since this object was made."""
        return self._applied_batches

    @property
    def applied_entries(self) -> int:
        """New entries of the peer's stored and applied since this object was made."""
        return self._applied_entries

    def _heard_at(self, moment: datetime) -> None:
        if self._peer_issued_at is None or moment > self._peer_issued_at:
            self._peer_issued_at = moment

    def notify(self) -> None:
        """Wake the sender: new entries were committed to the outgoing log."""
        if self._wake is not None:
            self._wake.set()

    async def wait_acknowledged(self, sequence: int) -> None:
        """Return once the peer has acknowledged our log up to ``sequence``."""
        if self._acked >= sequence:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ack_waiters.append((sequence, future))
        await future

    # -- the stream --

    async def run(
        self, send: SendFrame, receive: AsyncIterable[position_sync_pb2.SyncFrame]
    ) -> None:
        """Run the session over one stream until the peer ends it or something fails.

        ``send`` writes one frame; ``receive`` yields the peer's frames. The
        exchange (which dials) sends its hello first; the custodian answers
        after checking it. On an error this side detects, a SyncClose frame
        saying why is sent (best effort) before the error is raised.
        """
        await self._take_over()
        self._run_task = asyncio.current_task()
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        frames = aiter(receive)
        self._log.add_listener(self.notify)
        try:
            await self._handshake(send, frames)
            await self._exchange(send, frames)
        except CollateralSyncError as err:
            if not isinstance(err, RPCError):
                await self._send_close(send, err)
            raise
        finally:
            self._log.remove_listener(self.notify)
            self._connected = False
            self._wake = None
            if self._run_task is asyncio.current_task():
                self._run_task = None

    async def _take_over(self) -> None:
        previous = self._run_task
        if previous is not None and not previous.done():
            previous.cancel()
            await asyncio.wait({previous})

    def _own_hello(self) -> position_sync_pb2.SyncFrame:
        received = self._log.received_head()
        self._received = received.sequence
        return position_sync_pb2.SyncFrame(
            hello=position_sync_pb2.SyncHello(
                party_id=self._log.party_id,
                sending_direction=self._log.sending_direction,  # type: ignore[arg-type]
                received_sequence=received.sequence,
                received_entry_hash=received.entry_hash,
                sent_sequence=self._log.sent_head().sequence,
                window=self._window,
                heartbeat_interval_ms=self._interval_ms,
            )
        )

    async def _handshake(
        self, send: SendFrame, frames: AsyncIterator[position_sync_pb2.SyncFrame]
    ) -> None:
        if self._speaks_first:
            await self._send_frame(send, self._own_hello())
        async with asyncio.timeout(LIVENESS_INTERVALS * self._interval_ms / 1000):
            frame = await anext(frames, None)
        if frame is None:
            return  # the peer ended the stream before saying anything
        kind = frame.WhichOneof("frame")
        if kind == "close":
            raise _close_error(frame.close)
        if kind != "hello":
            raise MalformedError(
                f"first frame must be a hello, got {kind or 'an empty frame'}",
                metadata={"expected": "hello", "actual": kind or "unset"},
            )
        self._accept_hello(frame)
        self._heard_monotonic = time.monotonic()
        if not self._speaks_first:
            await self._send_frame(send, self._own_hello())

    def _accept_hello(self, frame: position_sync_pb2.SyncFrame) -> None:
        """Check the peer's hello (docs/PROTOCOL.md §6.2 step 3) and resume from it."""
        hello = frame.hello
        log = self._log
        if hello.party_id != log.peer_party_id:
            raise VerificationError(
                f"hello from party {hello.party_id!r}, expected {log.peer_party_id!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": log.peer_party_id, "actual": hello.party_id},
            )
        if hello.sending_direction != log.receiving_direction:
            raise VerificationError(
                f"peer says it sends {direction_name(hello.sending_direction)}, expected "
                f"{direction_name(log.receiving_direction)}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={
                    "expected": str(log.receiving_direction),
                    "actual": str(hello.sending_direction),
                },
            )
        if hello.window < 1:
            raise MalformedError(
                "hello window must be >= 1, got 0",
                metadata={"expected": ">= 1", "actual": str(hello.window)},
                field_violations={"hello.window": "must be >= 1"},
            )
        claimed_hash = hello.received_entry_hash
        if len(claimed_hash) != HASH_SIZE:
            raise MalformedError(
                f"hello received_entry_hash must be {HASH_SIZE} bytes, got {len(claimed_hash)}",
                metadata={"expected": str(HASH_SIZE), "actual": str(len(claimed_hash))},
                field_violations={"hello.received_entry_hash": "must be 32 bytes"},
            )
        claimed = hello.received_sequence
        own_head = log.sent_head().sequence
        if claimed > own_head:
            raise CollateralSyncError(
                f"peer claims to have received our entries up to {claimed}, but our log "
                f"ends at {own_head}",
                reason=_R.ERROR_REASON_OUT_OF_RANGE,
                metadata={"expected": f"<= {own_head}", "actual": str(claimed)},
            )
        own_hash = log.outgoing_hash(claimed)
        if own_hash != claimed_hash:
            assert own_hash is not None  # claimed <= own_head
            self._equivocation("hello", claimed, own_hash, claimed_hash, frame)
        # The peer holds our log up to here, whether or not we recorded sending it.
        log._record_held_by_peer(LogHead(claimed, claimed_hash), self._clock())
        interval_ms = hello.heartbeat_interval_ms or _DEFAULT_INTERVAL_MS
        self._peer_dead_after = LIVENESS_INTERVALS * interval_ms / 1000
        self._peer_window = hello.window
        self._peer_sent_sequence = hello.sent_sequence
        self._sent = claimed
        self._sent_hash = claimed_hash
        self._set_acked(claimed)
        self._connected = True

    def _equivocation(
        self,
        kind: str,
        sequence: int,
        stored: bytes,
        received: bytes,
        frame: position_sync_pb2.SyncFrame,
    ) -> NoReturn:
        """Keep the evidence that the peer holds another version of our log, and refuse."""
        direction = self._log.sending_direction
        self._log._keep_evidence(
            kind=kind,
            direction=direction,
            sequence=sequence,
            stored=stored,
            received=received,
            stored_batch=None,
            received_message=frame.SerializeToString(),
            now=self._clock(),
        )
        raise _equivocation_error(kind, direction, sequence, stored, received)

    async def _exchange(
        self, send: SendFrame, frames: AsyncIterator[position_sync_pb2.SyncFrame]
    ) -> None:
        if not self._connected:
            return
        sender = asyncio.create_task(self._send_loop(send))
        receiver = asyncio.create_task(self._receive_loop(send, frames))
        tasks = {sender, receiver}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if sender in done and receiver not in done:
                # A write that failed because the peer ended the call: the
                # reason (its status) arrives on the read side, so wait for it.
                await asyncio.wait({receiver}, timeout=_CLOSE_TIMEOUT)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        # The receiver ends normally when the peer ends the stream; an error of
        # either task is the session's, the receiver's first (it says why).
        for task in (receiver, sender):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _send_frame(self, send: SendFrame, frame: position_sync_pb2.SyncFrame) -> None:
        assert self._send_lock is not None
        async with self._send_lock:
            await send(frame)
            self._last_sent_at = asyncio.get_running_loop().time()

    async def _send_close(self, send: SendFrame, error: CollateralSyncError) -> None:
        close = position_sync_pb2.SyncClose(
            reason=error.reason,  # type: ignore[arg-type]
            message=error.message,
            metadata=error.metadata,
        )
        # Best effort: the stream may already be broken, and the error matters more.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._send_frame(send, position_sync_pb2.SyncFrame(close=close))

    # -- sending --

    async def _send_loop(self, send: SendFrame) -> None:
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        log = self._log
        connection = log.connection
        interval = self._interval_ms / 1000
        while True:
            wake.clear()
            room = self._peer_window - (self._sent - self._acked)
            # Inside someone's open transaction rows may yet roll back: never send them.
            if room > 0 and not connection.in_transaction:
                rows = log._read_outgoing(self._sent, min(self._batch_size, room))
                if rows:
                    # Linked to the spans that wrote its entries (a margin call's issue).
                    links = [trace.Link(writer) for writer in log._writers_up_to(rows[-1][0])]
                    with _TRACER.start_as_current_span(
                        "sync.batch.send", links=links, attributes=self._batch_attributes(rows)
                    ):
                        issued_at = self._clock()
                        frame = self._batch_frame(rows, issued_at)
                        # Recorded (durably) before it leaves, so that the peer never
                        # holds a batch we cannot count at a cut-off (§10.2).
                        log._record_sent(LogHead(rows[-1][0], rows[-1][1]), issued_at)
                        # Count the batch as sent before the write yields: the peer's
                        # ack can arrive while the write is still being awaited.
                        self._sent = rows[-1][0]
                        self._sent_hash = rows[-1][1]
                        self._track_unacknowledged(self._sent, issued_at)
                        await self._send_frame(send, frame)
                    continue
            idle_for = loop.time() - self._last_sent_at
            if idle_for >= interval:
                await self._send_frame(send, self._heartbeat_frame())
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval - idle_for):
                    await wake.wait()

    def _batch_attributes(self, rows: list[tuple[int, bytes, bytes]]) -> dict[str, str | int]:
        return {
            "collateral_sync.sync.peer": self._log.peer_party_id,
            "collateral_sync.sync.direction": direction_name(self._log.sending_direction),
            "collateral_sync.sync.first_sequence": rows[0][0],
            "collateral_sync.sync.last_sequence": rows[-1][0],
            "collateral_sync.sync.entries": len(rows),
        }

    def _batch_frame(
        self, rows: list[tuple[int, bytes, bytes]], issued_at: datetime
    ) -> position_sync_pb2.SyncFrame:
        batch = position_sync_pb2.SyncBatch(direction=self._log.sending_direction)  # type: ignore[arg-type]
        add = batch.entries.add
        prev = self._sent_hash
        for sequence, hash_, update in rows:
            add(sequence=sequence, prev_entry_hash=prev, update=update, entry_hash=hash_)
            prev = hash_
        envelope = sign_statement(
            batch,
            self._signer,
            audience=[self._log.peer_party_id],
            sequence=rows[-1][0],
            ttl=self._batch_ttl,
            issued_at=issued_at,
        )
        return position_sync_pb2.SyncFrame(batch=envelope)

    def _heartbeat_frame(self) -> position_sync_pb2.SyncFrame:
        head = self._sent if self._log.connection.in_transaction else self._log.sent_head().sequence
        heartbeat = position_sync_pb2.SyncHeartbeat(sent_sequence=head)
        heartbeat.sent_at.CopyFrom(_to_timestamp(self._clock()))
        return position_sync_pb2.SyncFrame(heartbeat=heartbeat)

    # -- receiving --

    async def _receive_loop(
        self, send: SendFrame, frames: AsyncIterator[position_sync_pb2.SyncFrame]
    ) -> None:
        loop = asyncio.get_running_loop()
        dead_after = self._peer_dead_after
        async with asyncio.timeout_at(loop.time() + dead_after) as liveness:
            async for frame in frames:
                liveness.reschedule(loop.time() + dead_after)
                kind = frame.WhichOneof("frame")
                if kind == "batch":
                    await self._on_batch(send, frame)
                    liveness.reschedule(loop.time() + dead_after)
                elif kind == "ack":
                    self._on_ack(frame)
                elif kind == "heartbeat":
                    self._peer_sent_sequence = frame.heartbeat.sent_sequence
                    self._heard_at(frame.heartbeat.sent_at.ToDatetime(tzinfo=UTC))
                elif kind == "close":
                    raise _close_error(frame.close)
                else:
                    raise MalformedError(
                        f"unexpected {kind or 'empty'} frame after the hello exchange",
                        metadata={
                            "expected": "batch|ack|heartbeat|close",
                            "actual": kind or "unset",
                        },
                    )
                self._heard_monotonic = time.monotonic()

    async def _on_batch(self, send: SendFrame, frame: position_sync_pb2.SyncFrame) -> None:
        with _TRACER.start_as_current_span(
            "sync.batch.receive",
            attributes={
                "collateral_sync.sync.peer": self._log.peer_party_id,
                "collateral_sync.sync.direction": direction_name(self._log.receiving_direction),
            },
        ) as span:
            await self._receive_batch(send, frame, span)

    async def _receive_batch(
        self, send: SendFrame, frame: position_sync_pb2.SyncFrame, span: trace.Span
    ) -> None:
        log = self._log
        now = self._clock()
        batch = verify_sync_batch(
            frame.batch,
            self._registry,
            receiver_party_id=log.party_id,
            sender_party_id=log.peer_party_id,
            direction=log.receiving_direction,
            now=now,
            max_entries=self._window,
            max_skew=self._max_skew,
        )
        if span.is_recording():
            span.set_attribute("collateral_sync.sync.first_sequence", batch.first_sequence)
            span.set_attribute("collateral_sync.sync.last_sequence", batch.last_sequence)
            span.set_attribute("collateral_sync.sync.entries", len(batch.entry_hashes))
        # Stored and applied in one transaction: the span ends once it is durable.
        with _TRACER.start_as_current_span("sync.batch.apply"):
            head = log.accept_batch(batch, self._apply, now=now)
        if head.sequence > self._received:
            self._applied_batches += 1
            self._applied_entries += head.sequence - self._received
            self._received = head.sequence
        self._heard_at(batch.statement.header.issued_at.ToDatetime(tzinfo=UTC))
        # Also for a batch of duplicates only: the peer may have missed our ack.
        ack = position_sync_pb2.SyncAck(sequence=head.sequence, entry_hash=head.entry_hash)
        with _TRACER.start_as_current_span(
            "sync.batch.ack", attributes={"collateral_sync.sync.acknowledged": head.sequence}
        ):
            await self._send_frame(send, position_sync_pb2.SyncFrame(ack=ack))

    def _on_ack(self, frame: position_sync_pb2.SyncFrame) -> None:
        ack = frame.ack
        sequence = ack.sequence
        if sequence > self._sent:
            raise CollateralSyncError(
                f"ack of sequence {sequence}, but only up to {self._sent} was sent",
                reason=_R.ERROR_REASON_OUT_OF_RANGE,
                metadata={"expected": f"<= {self._sent}", "actual": str(sequence)},
            )
        if sequence <= self._acked:
            return  # cumulative: an older ack says nothing new
        own = self._log.outgoing_hash(sequence)
        assert own is not None  # sequence <= sent <= head
        if ack.entry_hash != own:
            self._equivocation("ack", sequence, own, ack.entry_hash, frame)
        self._set_acked(sequence)
        assert self._wake is not None
        self._wake.set()

    def _track_unacknowledged(self, sequence: int, issued_at: datetime) -> None:
        # A resent range keeps the time it was first sent: its entries waited since then.
        pending = self._unacknowledged
        if not pending or pending[-1][0] < sequence:
            pending.append((sequence, issued_at))

    def _set_acked(self, sequence: int) -> None:
        self._acked = sequence
        pending = self._unacknowledged
        while pending and pending[0][0] <= sequence:
            pending.popleft()
        if self._ack_waiters:
            waiting = []
            for target, future in self._ack_waiters:
                if future.done():
                    continue
                if target <= sequence:
                    future.set_result(None)
                else:
                    waiting.append((target, future))
            self._ack_waiters = waiting

    def __repr__(self) -> str:
        return (
            f"SyncSession({self._log.party_id!r} <-> {self._log.peer_party_id!r}, "
            f"acknowledged={self._acked}, in_flight={self.in_flight})"
        )


_EXCHANGE_SENDS = position_sync_pb2.SYNC_DIRECTION_EXCHANGE_TO_CUSTODIAN
_DEFAULT_INTERVAL_MS = DEFAULT_HEARTBEAT_INTERVAL // timedelta(milliseconds=1)


def _close_error(close: position_sync_pb2.SyncClose) -> RPCError:
    """The peer's SyncClose as the error it reports (the same as a call status would)."""
    return RPCError(
        close.message or "peer closed the sync stream",
        status_code=STATUS_BY_REASON.get(close.reason, grpc.StatusCode.UNKNOWN),
        reason=close.reason,
        metadata=dict(close.metadata),
    )


# --- gRPC adapters ------------------------------------------------------------------


async def serve_sync_stream(
    session: SyncSession,
    requests: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
    context: grpc.aio.ServicerContext,
    *,
    require_tls_peer: bool = True,
) -> None:
    """Run ``session`` on a CustodianService.SyncPositions call (the custodian's servicer).

    ``await serve_sync_stream(self.session, request_iterator, context)`` from
    the servicer method. The TLS peer must be the session's peer (unless
    ``require_tls_peer`` is False, for plaintext tests). Errors end the call:
    a refusal with its status and ErrorInfo, a silent peer with UNAVAILABLE;
    a peer's own SyncClose ends it quietly (the peer already knows why).
    """
    try:
        if require_tls_peer:
            check_peer_party(context, session.peer_party_id)

        async def send(frame: position_sync_pb2.SyncFrame) -> None:
            await context.write(custodian_service_pb2.SyncPositionsResponse(frame=frame))

        await session.run(send, _request_frames(requests))
    except RPCError:
        return
    except CollateralSyncError as err:
        await context.abort_with_status(to_grpc_status(err))
    except TimeoutError:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "sync peer silent; re-dial to resume")


async def _request_frames(
    requests: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
) -> AsyncIterator[position_sync_pb2.SyncFrame]:
    async for request in requests:
        yield request.frame


async def dial_sync_stream(
    session: SyncSession,
    client: CustodianClient,
    *,
    timeout: float = DEFAULT_SYNC_STREAM_TIMEOUT,
    metadata: Metadata | None = None,
) -> None:
    """Run ``session`` on a SyncPositions call dialled through ``client`` (the exchange).

    Returns when the custodian ends the stream. Raises RPCError for a status
    the custodian sent (or a SyncClose), CollateralSyncError when we refused
    its input (after telling it with a SyncClose), TimeoutError when it went
    silent. Callers re-dial with backoff on anything but a refusal.
    """
    # One span for the stream: the call's client span (and through its metadata the
    # custodian's server span and batch spans) and this side's batch spans share its trace.
    with _TRACER.start_as_current_span(
        "sync.stream", attributes={"collateral_sync.sync.peer": session.peer_party_id}
    ):
        await _dial(session, client, timeout=timeout, metadata=metadata)


async def _dial(
    session: SyncSession, client: CustodianClient, *, timeout: float, metadata: Metadata | None
) -> None:
    call = client.sync_positions(timeout=timeout, metadata=metadata)

    async def send(frame: position_sync_pb2.SyncFrame) -> None:
        await call.write(custodian_service_pb2.SyncPositionsRequest(frame=frame))

    async def receive() -> AsyncIterator[position_sync_pb2.SyncFrame]:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            yield response.frame

    try:
        await session.run(send, receive())
    except grpc.aio.AioRpcError as err:
        raise error_from_rpc_error(err) from err
    except CollateralSyncError as err:
        if not isinstance(err, RPCError):
            # Let the SyncClose reach the custodian before the call is torn down.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await call.done_writing()
                    await call.code()
        raise
    finally:
        call.cancel()
