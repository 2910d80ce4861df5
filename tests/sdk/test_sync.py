"""Tests for position sync: entry hashes, the durable log, the session, and the gRPC adapters.

Sessions run over two transports: an in-memory duplex pipe (which the tests
can inspect, delay or cut) and a real grpc.aio stream with mutual TLS on
127.0.0.1 port 0. Every party keeps its log in a real SQLite file; its
``apply`` inserts each applied sequence into a table whose primary key is the
sequence, in the same transaction, so applying anything twice fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import struct
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from collateral_sync import sync
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient
from collateral_sync.dev_ca import DevPki, create_dev_pki
from collateral_sync.errors import (
    STATUS_BY_REASON,
    CollateralSyncError,
    MalformedError,
    RPCError,
    StateError,
    StorageError,
    VerificationError,
    error_from_rpc_error,
)
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.server import create_server, serve
from collateral_sync.signing import sign_statement
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    EXCHANGE_TO_CUSTODIAN,
    ZERO_HASH,
    LogHead,
    SyncLog,
    SyncSession,
    dial_sync_stream,
    entry_hash,
    serve_sync_stream,
    verify_sync_batch,
)
from collateral_sync.transport import TlsConfig, secure_channel
from collateral_sync.v1 import (
    common_pb2,
    custodian_service_pb2,
    custodian_service_pb2_grpc,
    envelope_pb2,
    errors_pb2,
    position_sync_pb2,
)

_T = TypeVar("_T")
_R = errors_pb2.ErrorReason
CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
Frame = position_sync_pb2.SyncFrame
EMPTY_HEAD = LogHead(0, ZERO_HASH)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


async def within(
    awaitable: Coroutine[Any, Any, _T] | asyncio.Future[_T], seconds: float = 10
) -> _T:
    """Await with a generous bound, so that a bug fails the test instead of hanging it."""
    async with asyncio.timeout(seconds):
        return await awaitable


# --- parties ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        CUSTODIAN: SigningKey.from_seed(b"\x01" * 32, CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN),
        EXCHANGE: SigningKey.from_seed(b"\x02" * 32, EXCHANGE, common_pb2.PARTY_ROLE_EXCHANGE),
    }


def make_registry(*signers: SigningKey) -> KeyRegistry:
    return KeyRegistry(s.party_key(valid_from=T0) for s in signers)


@pytest.fixture(scope="module")
def registry(keys: dict[str, SigningKey]) -> KeyRegistry:
    return make_registry(*keys.values())


def update_for(direction: int, index: int) -> position_sync_pb2.PositionUpdate:
    """A small valid update of ``direction``; ``index`` makes it unique."""
    if direction == CUSTODIAN_TO_EXCHANGE:
        return position_sync_pb2.PositionUpdate(
            pledge_change=position_sync_pb2.PledgeChange(
                account_id=f"acct-{index}",
                asset_id="USDC",
                pledged_quantity=amount_to_proto(f"{index}.5"),
            )
        )
    credit = envelope_pb2.Envelope(
        payload=b"credit line %d" % index,
        payload_type="application/vnd.collateral-sync.v1.credit-line+proto",
    )
    return position_sync_pb2.PositionUpdate(credit_line=credit)


class Party:
    """One side: its SQLite file, sync log, session, and an exactly-once applied table."""

    def __init__(
        self,
        path: Path,
        signer: SigningKey,
        registry: KeyRegistry,
        *,
        apply_hook: Callable[[list[tuple[int, position_sync_pb2.PositionUpdate]]], None]
        | None = None,
        **session_options: Any,
    ) -> None:
        self.path = path
        self.signer = signer
        self.direction = (
            CUSTODIAN_TO_EXCHANGE if signer.party_id == CUSTODIAN else EXCHANGE_TO_CUSTODIAN
        )
        peer = EXCHANGE if signer.party_id == CUSTODIAN else CUSTODIAN
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS applied (sequence INTEGER PRIMARY KEY, variant TEXT)"
        )
        self.log = SyncLog(
            self.connection,
            party_id=signer.party_id,
            peer_party_id=peer,
            sending_direction=self.direction,
        )
        self.apply_hook = apply_hook
        self.session = SyncSession(self.log, signer, registry, apply=self.apply, **session_options)

    def apply(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        self.connection.executemany(
            "INSERT INTO applied VALUES (?, ?)",
            [(sequence, update.WhichOneof("update")) for sequence, update in updates],
        )
        if self.apply_hook is not None:
            self.apply_hook(updates)

    def append(self, count: int, start: int | None = None) -> LogHead:
        first = self.log.sent_head().sequence + 1 if start is None else start
        with self.log.transaction():
            return self.log.append(update_for(self.direction, first + i) for i in range(count))

    def applied(self) -> list[int]:
        rows = self.connection.execute("SELECT sequence FROM applied ORDER BY sequence")
        return [row[0] for row in rows]

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def make_party(
    tmp_path: Path, keys: dict[str, SigningKey], registry: KeyRegistry
) -> Iterator[Callable[..., Party]]:
    made: list[Party] = []

    def factory(party_id: str, name: str | None = None, **options: Any) -> Party:
        party = Party(tmp_path / f"{name or party_id}.sqlite", keys[party_id], registry, **options)
        made.append(party)
        return party

    yield factory
    for party in made:
        party.close()


# --- transports -------------------------------------------------------------------


class Pipe:
    """One direction of an in-memory stream; frames cross it serialised, as on the wire.

    ``drop`` decides which frames are lost; ``on_frame`` sees every frame sent.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.drop: Callable[[Frame], bool] = lambda frame: False
        self.on_frame: Callable[[Frame], None] = lambda frame: None

    async def send(self, frame: Frame) -> None:
        self.on_frame(frame)
        if not self.drop(frame):
            await self.queue.put(Frame.FromString(frame.SerializeToString()))

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            frame = await self.queue.get()
            if frame is None:
                return
            yield frame

    def end(self) -> None:
        self.queue.put_nowait(None)


class Link:
    """Two sessions running over a pair of pipes."""

    def __init__(self, exchange: Party, custodian: Party) -> None:
        self.to_custodian = Pipe()
        self.to_exchange = Pipe()
        self.exchange_run = asyncio.create_task(
            exchange.session.run(self.to_custodian.send, self.to_exchange.frames())
        )
        self.custodian_run = asyncio.create_task(
            custodian.session.run(self.to_exchange.send, self.to_custodian.frames())
        )

    async def cut(self) -> None:
        """End the stream both ways and wait for both sessions to return."""
        self.to_custodian.end()
        self.to_exchange.end()
        await within(asyncio.gather(self.exchange_run, self.custodian_run))


class ScriptedPeer:
    """The far end of a session under test, driven frame by frame by the test."""

    def __init__(self, session: SyncSession) -> None:
        self.inbox: asyncio.Queue[Frame] = asyncio.Queue()
        self.outbox = Pipe()
        self.run = asyncio.create_task(session.run(self._receive, self.outbox.frames()))

    async def _receive(self, frame: Frame) -> None:
        await self.inbox.put(Frame.FromString(frame.SerializeToString()))

    async def send(self, frame: Frame) -> None:
        await self.outbox.send(frame)

    async def expect(self, kind: str) -> Frame:
        frame = await within(self.inbox.get())
        assert frame.WhichOneof("frame") == kind, frame
        return frame

    async def failure(self) -> BaseException:
        """The error the session ended with (it must end with one)."""
        with pytest.raises(BaseException) as caught:
            await within(self.run)
        return caught.value


def hello(
    party_id: str,
    direction: int,
    *,
    received: LogHead = EMPTY_HEAD,
    sent_sequence: int = 0,
    window: int = 1000,
    heartbeat_interval_ms: int = 60_000,
) -> Frame:
    return Frame(
        hello=position_sync_pb2.SyncHello(
            party_id=party_id,
            sending_direction=direction,  # type: ignore[arg-type]
            received_sequence=received.sequence,
            received_entry_hash=received.entry_hash,
            sent_sequence=sent_sequence,
            window=window,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
    )


def chain(
    direction: int, count: int, *, start: int = 1, prev: bytes = ZERO_HASH, salt: int = 0
) -> list[position_sync_pb2.SyncEntry]:
    """``count`` correctly chained entries from ``start`` on top of ``prev``."""
    entries = []
    for sequence in range(start, start + count):
        update = update_for(direction, sequence + salt).SerializeToString()
        digest = entry_hash(direction, sequence, prev, update)
        entries.append(
            position_sync_pb2.SyncEntry(
                sequence=sequence, prev_entry_hash=prev, update=update, entry_hash=digest
            )
        )
        prev = digest
    return entries


def batch_frame(
    signer: SigningKey,
    direction: int,
    entries: list[position_sync_pb2.SyncEntry],
    *,
    audience: str,
    header_sequence: int | None = None,
    issued_at: datetime | None = None,
) -> Frame:
    batch = position_sync_pb2.SyncBatch(direction=direction, entries=entries)  # type: ignore[arg-type]
    envelope = sign_statement(
        batch,
        signer,
        audience=[audience],
        sequence=entries[-1].sequence if header_sequence is None else header_sequence,
        ttl=timedelta(minutes=5),
        issued_at=issued_at or datetime.now(UTC),
    )
    return Frame(batch=envelope)


def check_error(error: BaseException, reason: int, code: grpc.StatusCode) -> None:
    assert isinstance(error, CollateralSyncError), repr(error)
    assert (error.reason, error.code) == (reason, code), repr(error)
    assert {"expected", "actual"} <= set(error.metadata), error.metadata


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(
        tmp_path_factory.mktemp("pki"), parties=[CUSTODIAN, EXCHANGE, "exchange-2"]
    )


class CustodianSync(custodian_service_pb2_grpc.CustodianServiceServicer):
    """The custodian's SyncPositions: the SDK adapter around one session."""

    def __init__(self, session: SyncSession) -> None:
        self.session = session

    async def SyncPositions(
        self,
        request_iterator: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await serve_sync_stream(self.session, request_iterator, context)


@contextlib.asynccontextmanager
async def custodian_server(
    pki: DevPki, servicer: custodian_service_pb2_grpc.CustodianServiceServicer
) -> AsyncIterator[CustodianClient]:
    """A mutual-TLS custodian server on port 0, and the exchange's client to it."""
    server = create_server(tls=TlsConfig.from_dev_pki(pki, CUSTODIAN), servicers=[servicer])
    async with (
        serve(server, grace=0) as port,
        secure_channel(f"localhost:{port}", TlsConfig.from_dev_pki(pki, EXCHANGE)) as channel,
    ):
        yield CustodianClient(channel)


# --- entry hash and the log -----------------------------------------------------------


def test_public_api_is_pinned() -> None:
    assert sorted(sync.__all__) == sorted(
        [
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
    )
    for name in sync.__all__:
        assert getattr(sync, name) is not None


def test_entry_hash_is_the_specified_sha256() -> None:
    update = bytes.fromhex("0a0b") + b"holdings"
    prev = bytes(range(32))
    expected = hashlib.sha256(
        b"collateral-sync/v1/sync-entry\x00" + b"\x02" + struct.pack(">Q", 258) + prev + update
    ).digest()
    assert entry_hash(EXCHANGE_TO_CUSTODIAN, 258, prev, update) == expected
    # The direction and the sequence are bound into the hash.
    assert entry_hash(CUSTODIAN_TO_EXCHANGE, 258, prev, update) != expected
    assert entry_hash(EXCHANGE_TO_CUSTODIAN, 259, prev, update) != expected


@pytest.mark.parametrize(
    ("direction", "sequence", "prev", "expected"),
    [
        (0, 1, ZERO_HASH, "1|2"),
        (3, 1, ZERO_HASH, "1|2"),
        (1, 0, ZERO_HASH, "1..2^64-1"),
        (1, 2**64, ZERO_HASH, "1..2^64-1"),
        (1, 1, bytes(31), "32"),
    ],
)
def test_entry_hash_refuses_bad_input(
    direction: int, sequence: int, prev: bytes, expected: str
) -> None:
    with pytest.raises(MalformedError) as caught:
        entry_hash(direction, sequence, prev, b"")
    assert caught.value.metadata["expected"] == expected


def test_append_chains_entries_and_commits_with_the_callers_transaction(
    make_party: Callable[..., Party],
) -> None:
    custodian = make_party(CUSTODIAN)
    log = custodian.log
    assert log.sent_head() == LogHead(0, ZERO_HASH)
    head = custodian.append(3)
    assert head.sequence == 3
    prev = ZERO_HASH
    for sequence in (1, 2, 3):
        entry = log.outgoing_entry(sequence)
        assert entry is not None
        assert entry.prev_entry_hash == prev
        assert entry.entry_hash == entry_hash(CUSTODIAN_TO_EXCHANGE, sequence, prev, entry.update)
        assert position_sync_pb2.PositionUpdate.FromString(entry.update) == update_for(
            CUSTODIAN_TO_EXCHANGE, sequence
        )
        prev = entry.entry_hash
    assert head == LogHead(3, prev)

    # A state change and its entries commit together, or neither does.
    connection = custodian.connection
    connection.execute("CREATE TABLE state (value INTEGER)")

    def change_then_fail() -> None:
        with log.transaction():
            connection.execute("INSERT INTO state VALUES (1)")
            log.append([update_for(CUSTODIAN_TO_EXCHANGE, 4)])
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        change_then_fail()
    assert log.sent_head() == head
    assert connection.execute("SELECT COUNT(*) FROM state").fetchone() == (0,)

    # The caller's own transaction works too.
    connection.execute("BEGIN")
    connection.execute("INSERT INTO state VALUES (2)")
    log.append([update_for(CUSTODIAN_TO_EXCHANGE, 4).SerializeToString()])
    connection.execute("COMMIT")
    assert log.sent_head().sequence == 4


def test_append_refuses_misuse_and_bad_updates_without_writing(
    make_party: Callable[..., Party],
) -> None:
    custodian = make_party(CUSTODIAN)
    log = custodian.log
    with pytest.raises(RuntimeError, match="inside a transaction"):
        log.append([update_for(CUSTODIAN_TO_EXCHANGE, 1)])
    with log.transaction():
        # An exchange-to-custodian variant cannot go custodian to exchange.
        with pytest.raises(MalformedError) as wrong_way:
            log.append([update_for(CUSTODIAN_TO_EXCHANGE, 1), update_for(EXCHANGE_TO_CUSTODIAN, 2)])
        assert wrong_way.value.metadata["actual"] == "credit_line"
        with pytest.raises(MalformedError) as unset:
            log.append([position_sync_pb2.PositionUpdate()])
        assert unset.value.metadata["actual"] == "unset"
        with pytest.raises(MalformedError):
            log.append([b"\xff\xff"])
        with pytest.raises(CollateralSyncError) as too_large:
            log.append([b"\x00" * (sync.MAX_UPDATE_BYTES + 1)])
        assert too_large.value.reason == _R.ERROR_REASON_TOO_LARGE
    assert log.sent_head() == LogHead(0, ZERO_HASH)
    with log.transaction():
        nested = log.transaction()
        with pytest.raises(RuntimeError, match="open transaction"):
            nested.__enter__()


def test_a_full_or_read_only_database_refuses_the_append_and_writes_nothing(
    make_party: Callable[..., Party],
) -> None:
    custodian = make_party(CUSTODIAN)
    log, connection = custodian.log, custodian.connection
    head = custodian.append(2)
    big = [update_for(CUSTODIAN_TO_EXCHANGE, 3 + i).SerializeToString() * 50 for i in range(50)]
    # SQLite's own limit on the file's pages: the database cannot grow by one more.
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    connection.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageError) as full, log.transaction():
        log.append(big)
    assert full.value.reason == _R.ERROR_REASON_STORAGE_FULL
    assert STATUS_BY_REASON[full.value.reason] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not connection.in_transaction
    assert log.sent_head() == head

    connection.execute(f"PRAGMA max_page_count = {pages * 1000}")
    connection.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageError) as read_only, log.transaction():
        log.append([update_for(CUSTODIAN_TO_EXCHANGE, 3)])
    assert read_only.value.reason == _R.ERROR_REASON_STORAGE_UNAVAILABLE
    assert STATUS_BY_REASON[read_only.value.reason] == grpc.StatusCode.UNAVAILABLE
    assert read_only.value.metadata["actual"] == "SQLITE_READONLY"
    assert log.sent_head() == head

    # Writable again: the log goes on from where it stood.
    connection.execute("PRAGMA query_only = OFF")
    assert custodian.append(1).sequence == head.sequence + 1


def test_log_sets_wal_and_the_requested_synchronous_level(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "full.sqlite", isolation_level=None)
    SyncLog(
        connection,
        party_id=CUSTODIAN,
        peer_party_id=EXCHANGE,
        sending_direction=CUSTODIAN_TO_EXCHANGE,
        synchronous="FULL",
    )
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    connection.close()
    with contextlib.closing(sqlite3.connect(":memory:")) as memory:
        with pytest.raises(ValueError, match="WAL"):
            SyncLog(
                memory,
                party_id=CUSTODIAN,
                peer_party_id=EXCHANGE,
                sending_direction=CUSTODIAN_TO_EXCHANGE,
            )
        # Off would risk a corrupt database on power loss.
        with pytest.raises(ValueError, match="synchronous"):
            SyncLog(
                memory,
                party_id=CUSTODIAN,
                peer_party_id=EXCHANGE,
                sending_direction=CUSTODIAN_TO_EXCHANGE,
                synchronous="OFF",
            )


# --- batch verification -------------------------------------------------------------


def _verify(frame: Frame, registry: KeyRegistry, **overrides: Any) -> sync.VerifiedSyncBatch:
    options: dict[str, Any] = {
        "receiver_party_id": EXCHANGE,
        "sender_party_id": CUSTODIAN,
        "direction": CUSTODIAN_TO_EXCHANGE,
        "now": datetime.now(UTC),
        "max_entries": 100,
    }
    options.update(overrides)
    return verify_sync_batch(frame.batch, registry, **options)


def test_verify_sync_batch_accepts_a_chained_batch(
    keys: dict[str, SigningKey], registry: KeyRegistry
) -> None:
    entries = chain(CUSTODIAN_TO_EXCHANGE, 5, start=1)
    verified = _verify(batch_frame(keys[CUSTODIAN], 1, entries, audience=EXCHANGE), registry)
    assert (verified.first_sequence, verified.last_sequence) == (1, 5)
    assert verified.entry_hashes == tuple(e.entry_hash for e in entries)
    assert verified.updates == tuple(e.update for e in entries)
    # A batch continuing a log elsewhere chains to that log's hash, not zeros.
    later = chain(CUSTODIAN_TO_EXCHANGE, 2, start=6, prev=entries[-1].entry_hash)
    verified = _verify(batch_frame(keys[CUSTODIAN], 1, later, audience=EXCHANGE), registry)
    assert verified.first_prev_hash == entries[-1].entry_hash


def _tampered(kind: str) -> tuple[list[position_sync_pb2.SyncEntry], str]:
    entries = chain(CUSTODIAN_TO_EXCHANGE, 4)
    if kind == "content":  # the update changed after hashing
        entries[2].update = update_for(CUSTODIAN_TO_EXCHANGE, 99).SerializeToString()
        return entries, "entries[2].entry_hash"
    if kind == "link":  # a correctly hashed entry that does not chain
        rest = chain(CUSTODIAN_TO_EXCHANGE, 2, start=3, prev=b"\x07" * 32)
        return entries[:2] + rest, "entries[2].prev_entry_hash"
    if kind == "order":
        return [entries[0], entries[2]], "entries[1].sequence"
    if kind == "first-prev":  # sequence 1 must chain to zeros
        return chain(CUSTODIAN_TO_EXCHANGE, 2, prev=b"\x01" * 32), "entries[0].prev_entry_hash"
    assert kind == "short-hash"
    entries[1].entry_hash = entries[1].entry_hash[:31]
    return entries, "entries[1].entry_hash"


@pytest.mark.parametrize("kind", ["content", "link", "order", "first-prev", "short-hash"])
def test_verify_sync_batch_refuses_a_broken_chain(
    kind: str, keys: dict[str, SigningKey], registry: KeyRegistry
) -> None:
    entries, field = _tampered(kind)
    frame = batch_frame(keys[CUSTODIAN], 1, entries, audience=EXCHANGE)
    with pytest.raises(MalformedError) as caught:
        _verify(frame, registry)
    assert list(caught.value.field_violations) == [field]


def test_verify_sync_batch_checks_header_direction_and_size(
    keys: dict[str, SigningKey], registry: KeyRegistry
) -> None:
    entries = chain(CUSTODIAN_TO_EXCHANGE, 3)
    signer = keys[CUSTODIAN]
    frame = batch_frame(signer, 1, entries, audience=EXCHANGE, header_sequence=2)
    with pytest.raises(MalformedError) as caught:
        _verify(frame, registry)
    assert caught.value.metadata == {"expected": "3", "actual": "2"}

    frame = batch_frame(signer, 1, entries, audience=EXCHANGE)
    with pytest.raises(CollateralSyncError) as caught:
        _verify(frame, registry, max_entries=2)
    check_error(caught.value, _R.ERROR_REASON_LIMIT_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)

    wrong_direction = batch_frame(signer, 2, entries, audience=EXCHANGE)
    with pytest.raises(VerificationError) as caught:
        _verify(wrong_direction, registry)
    check_error(caught.value, _R.ERROR_REASON_KEY_ROLE_MISMATCH, grpc.StatusCode.PERMISSION_DENIED)

    empty = position_sync_pb2.SyncBatch(direction=1)  # type: ignore[arg-type]
    envelope = sign_statement(
        empty,
        signer,
        audience=[EXCHANGE],
        sequence=1,
        ttl=timedelta(minutes=1),
        issued_at=datetime.now(UTC),
    )
    with pytest.raises(MalformedError, match="no entries"):
        _verify(Frame(batch=envelope), registry)


# --- sessions over an in-memory stream ----------------------------------------------------


def test_sessions_exchange_both_logs_and_acknowledge_after_commit(
    make_party: Callable[..., Party],
) -> None:
    async def scenario() -> None:
        exchange, custodian = make_party(EXCHANGE), make_party(CUSTODIAN)
        exchange.append(40)
        link = Link(exchange, custodian)
        custodian.append(25)  # after the stream is up: the append wakes the sender
        await within(
            asyncio.gather(
                exchange.session.wait_acknowledged(40), custodian.session.wait_acknowledged(25)
            )
        )
        assert custodian.applied() == list(range(1, 41))
        assert exchange.applied() == list(range(1, 26))
        assert custodian.log.received_head() == exchange.log.sent_head()
        assert exchange.log.received_head() == custodian.log.sent_head()
        assert exchange.session.connected
        assert exchange.session.in_flight == 0
        # Received entries are kept as received, inside their signed batches.
        stored = custodian.log.received_entry(17)
        assert stored == exchange.log.outgoing_entry(17)
        await link.cut()
        assert not exchange.session.connected

    run(scenario())


# --- heads at a cut-off (reconciliation, PROTOCOL.md §10.2) ------------------------------

C = datetime(2026, 3, 1, 12, tzinfo=UTC)
MICRO = timedelta(microseconds=1)


class Clock:
    """A settable clock shared by both sessions: every batch is issued at ``now``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_sessions_count_what_they_applied_and_date_what_awaits_an_ack(
    make_party: Callable[..., Party],
) -> None:
    """The figures the reference servers' metrics read from a session."""

    async def scenario() -> None:
        clock = Clock(C)
        exchange = make_party(EXCHANGE, clock=clock)
        custodian = make_party(CUSTODIAN, batch_size=10, clock=clock)
        custodian.append(25)
        link = Link(exchange, custodian)
        link.to_custodian.drop = lambda frame: frame.WhichOneof("frame") == "ack"
        async with asyncio.timeout(10):
            while exchange.session.applied_entries < 25:
                await asyncio.sleep(0.01)
        assert (exchange.session.applied_batches, exchange.session.applied_entries) == (3, 25)
        assert custodian.session.oldest_unacknowledged_at == C  # three batches, none acknowledged
        link.to_custodian.drop = lambda frame: False
        clock.now = C + timedelta(seconds=1)
        custodian.append(1)
        await within(custodian.session.wait_acknowledged(26))
        assert custodian.session.oldest_unacknowledged_at is None
        assert (exchange.session.applied_batches, exchange.session.applied_entries) == (4, 26)
        assert (custodian.session.applied_batches, custodian.session.applied_entries) == (0, 0)
        await link.cut()

    run(scenario())


def test_heads_at_an_empty_log_are_zero_and_need_an_aware_time(
    make_party: Callable[..., Party],
) -> None:
    custodian = make_party(CUSTODIAN)
    both = {CUSTODIAN_TO_EXCHANGE: EMPTY_HEAD, EXCHANGE_TO_CUSTODIAN: EMPTY_HEAD}
    assert custodian.log.heads_at(C) == both
    custodian.append(3)  # written, never sent: in no batch
    assert custodian.log.heads_at(C + timedelta(days=365)) == both
    with pytest.raises(ValueError, match="naive"):
        custodian.log.heads_at(datetime(2026, 3, 1, 12))


def test_heads_at_count_batches_issued_up_to_the_cutoff_on_both_sides(
    make_party: Callable[..., Party],
) -> None:
    clock = Clock(C - timedelta(seconds=1))

    async def scenario() -> None:
        exchange = make_party(EXCHANGE, clock=clock)
        custodian = make_party(CUSTODIAN, clock=clock)
        link = Link(exchange, custodian)

        async def flow(exchange_count: int, custodian_count: int) -> tuple[LogHead, LogHead]:
            ours, theirs = exchange.append(exchange_count), custodian.append(custodian_count)
            await within(
                asyncio.gather(
                    exchange.session.wait_acknowledged(ours.sequence),
                    custodian.session.wait_acknowledged(theirs.sequence),
                )
            )
            return ours, theirs

        before = await flow(3, 2)  # issued one second before the cut-off
        clock.now = C
        at = await flow(2, 2)  # issued at the cut-off itself: still in
        clock.now = C + MICRO
        after = await flow(1, 4)  # a microsecond after it: out
        await link.cut()

        for party in (exchange, custodian):
            log = party.log
            assert log.heads_at(C) == {
                CUSTODIAN_TO_EXCHANGE: at[1],
                EXCHANGE_TO_CUSTODIAN: at[0],
            }, party.signer.party_id
            assert log.heads_at(C - MICRO) == {
                CUSTODIAN_TO_EXCHANGE: before[1],
                EXCHANGE_TO_CUSTODIAN: before[0],
            }
            assert log.heads_at(C - timedelta(seconds=2)) == {
                CUSTODIAN_TO_EXCHANGE: EMPTY_HEAD,
                EXCHANGE_TO_CUSTODIAN: EMPTY_HEAD,
            }
            # Once everything sent by then is in, the heads are today's.
            assert log.heads_at(C + MICRO) == {
                CUSTODIAN_TO_EXCHANGE: after[1],
                EXCHANGE_TO_CUSTODIAN: after[0],
            }
        assert custodian.log.heads_at(C + MICRO)[CUSTODIAN_TO_EXCHANGE] == custodian.log.sent_head()
        # The hashes are the entries' own (the last of each batch).
        assert exchange.log.outgoing_hash(at[0].sequence) == at[0].entry_hash
        # Another time zone names the same instant.
        eastern = C.astimezone(timezone(timedelta(hours=5)))
        assert exchange.log.heads_at(eastern) == exchange.log.heads_at(C)

    run(scenario())


def test_heads_at_a_resumed_stream_count_each_entry_from_its_first_batch(
    make_party: Callable[..., Party],
) -> None:
    """Entries sent again on a later stream (their ack was lost) keep their first batch's time."""
    clock = Clock(C - timedelta(seconds=1))

    async def scenario() -> None:
        exchange = make_party(EXCHANGE, clock=clock)
        custodian = make_party(CUSTODIAN, clock=clock)
        head = exchange.append(5)
        stored = asyncio.Event()
        custodian.apply_hook = lambda updates: stored.set()
        link = Link(exchange, custodian)
        link.to_exchange.drop = lambda frame: frame.WhichOneof("frame") == "ack"
        await within(stored.wait())
        await link.cut()
        assert exchange.session.acknowledged_sequence == 0

        clock.now = C + timedelta(seconds=1)
        link = Link(exchange, custodian)
        resent: list[int] = []

        def record(frame: Frame) -> None:
            if frame.WhichOneof("frame") == "batch":
                batch = position_sync_pb2.SyncBatch.FromString(frame.batch.payload)
                resent.extend(entry.sequence for entry in batch.entries)

        link.to_custodian.on_frame = record
        later = exchange.append(2)
        await within(exchange.session.wait_acknowledged(later.sequence))
        await link.cut()
        # The custodian's hello said it held 1..5: only 6..7 went out again.
        assert resent == [6, 7]
        for log in (exchange.log, custodian.log):
            assert log.heads_at(C)[EXCHANGE_TO_CUSTODIAN] == head
            assert log.heads_at(C + timedelta(seconds=1))[EXCHANGE_TO_CUSTODIAN] == later

    run(scenario())


def test_heads_at_a_batch_sent_again_after_the_cutoff_keeps_its_first_time(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    """A peer that never acknowledged: the same entries go out again, later; the first send counts."""
    clock = Clock(C - timedelta(seconds=1))

    async def scenario() -> None:
        custodian = make_party(CUSTODIAN, clock=clock)
        head = custodian.append(4)
        peer = ScriptedPeer(custodian.session)
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
        await peer.expect("hello")
        first = position_sync_pb2.SyncBatch.FromString((await peer.expect("batch")).batch.payload)
        peer.outbox.end()  # gone without an ack
        await within(peer.run)

        clock.now = C + timedelta(seconds=1)
        peer = ScriptedPeer(custodian.session)
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
        await peer.expect("hello")
        again = position_sync_pb2.SyncBatch.FromString((await peer.expect("batch")).batch.payload)
        assert [e.sequence for e in again.entries] == [e.sequence for e in first.entries]
        assert again.header.issued_at.ToDatetime(UTC) == C + timedelta(seconds=1)
        peer.outbox.end()
        await within(peer.run)
        assert custodian.log.heads_at(C)[CUSTODIAN_TO_EXCHANGE] == head
        assert custodian.log.heads_at(C - timedelta(seconds=2))[CUSTODIAN_TO_EXCHANGE] == (
            EMPTY_HEAD
        )

    run(scenario())


def test_heads_at_a_database_from_before_the_records_is_migrated(
    make_party: Callable[..., Party], tmp_path: Path
) -> None:
    """A log written before issued_at was kept: the stored envelopes and the peer's hello tell it."""
    clock = Clock(C - timedelta(seconds=1))

    async def scenario() -> None:
        exchange = make_party(EXCHANGE, clock=clock)
        custodian = make_party(CUSTODIAN, clock=clock)
        link = Link(exchange, custodian)
        sent = exchange.append(3)
        received = custodian.append(2)
        await within(
            asyncio.gather(
                exchange.session.wait_acknowledged(sent.sequence),
                custodian.session.wait_acknowledged(received.sequence),
            )
        )
        await link.cut()
        exchange.close()
        # What an earlier version of the SDK left: no issued_at, no sent batches.
        with contextlib.closing(sqlite3.connect(tmp_path / f"{EXCHANGE}.sqlite")) as old:
            old.execute("ALTER TABLE sync_received_batches DROP COLUMN issued_at_us")
            old.execute("DROP TABLE sync_sent_batches")
            old.commit()

        clock.now = C - MICRO
        upgraded = make_party(EXCHANGE, clock=clock)  # same file, new version
        columns = [
            row[1]
            for row in upgraded.connection.execute("PRAGMA table_info(sync_received_batches)")
        ]
        assert "issued_at_us" in columns
        # The received side is read from the signed envelopes; nothing sent is known yet.
        assert upgraded.log.heads_at(C) == {
            CUSTODIAN_TO_EXCHANGE: received,
            EXCHANGE_TO_CUSTODIAN: EMPTY_HEAD,
        }
        assert upgraded.log.heads_at(C - timedelta(seconds=2))[CUSTODIAN_TO_EXCHANGE] == (
            EMPTY_HEAD
        )
        # The custodian's hello confirms 1..3: sent no later than now.
        link = Link(upgraded, custodian)
        more = custodian.append(1)
        await within(custodian.session.wait_acknowledged(more.sequence))
        await link.cut()
        assert (
            upgraded.log.heads_at(C)
            == custodian.log.heads_at(C)
            == {
                CUSTODIAN_TO_EXCHANGE: more,
                EXCHANGE_TO_CUSTODIAN: sent,
            }
        )

    run(scenario())


# --- sessions over gRPC ------------------------------------------------------------------


def test_5000_updates_each_way_over_grpc_arrive_once(
    make_party: Callable[..., Party], pki: DevPki
) -> None:
    async def scenario() -> None:
        exchange = make_party(EXCHANGE, batch_size=700)
        custodian = make_party(CUSTODIAN, batch_size=700)
        async with custodian_server(pki, CustodianSync(custodian.session)) as client:
            dial = asyncio.create_task(dial_sync_stream(exchange.session, client))
            for _ in range(5):  # appends while the stream runs, from both sides
                exchange.append(1000)
                custodian.append(1000)
                await asyncio.sleep(0)
            await within(
                asyncio.gather(
                    exchange.session.wait_acknowledged(5000),
                    custodian.session.wait_acknowledged(5000),
                )
            )
            dial.cancel()
            await asyncio.wait({dial})
        assert exchange.applied() == custodian.applied() == list(range(1, 5001))
        assert custodian.session.received_head == exchange.session.sent_head
        assert custodian.log.received_head() == exchange.log.sent_head()
        assert exchange.log.received_head() == custodian.log.sent_head()
        assert exchange.log.sent_head().sequence == 5000

    run(scenario())


def test_disconnect_mid_stream_then_resume_loses_nothing_and_applies_once(
    make_party: Callable[..., Party], pki: DevPki
) -> None:
    async def scenario() -> None:
        exchange = make_party(EXCHANGE, batch_size=50, window=200)
        custodian = make_party(CUSTODIAN, batch_size=50, window=200)
        cut_at = asyncio.Event()

        def watch(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
            if updates[-1][0] >= 1000:
                cut_at.set()

        custodian.apply_hook = watch
        async with custodian_server(pki, CustodianSync(custodian.session)) as client:
            exchange.append(3000)
            custodian.append(3000)
            dial = asyncio.create_task(dial_sync_stream(exchange.session, client))
            await within(cut_at.wait())
            dial.cancel()  # the exchange drops the call mid-stream
            await asyncio.wait({dial})
            midway = custodian.log.received_head().sequence
            assert 1000 <= midway < 3000
            exchange.append(500)
            custodian.append(500)
            dial = asyncio.create_task(dial_sync_stream(exchange.session, client))
            await within(
                asyncio.gather(
                    exchange.session.wait_acknowledged(3500),
                    custodian.session.wait_acknowledged(3500),
                )
            )
            dial.cancel()
            await asyncio.wait({dial})
        assert exchange.applied() == custodian.applied() == list(range(1, 3501))
        assert custodian.log.received_head() == exchange.log.sent_head()
        assert exchange.log.received_head() == custodian.log.sent_head()

    run(scenario())


def test_crash_after_commit_before_ack_replays_and_applies_once(
    make_party: Callable[..., Party],
) -> None:
    """The custodian commits batches but 'dies' before its acks leave; then restarts."""

    async def scenario() -> None:
        exchange = make_party(EXCHANGE, batch_size=100, window=1000)
        custodian = make_party(CUSTODIAN, batch_size=100)
        exchange.append(600)
        committed = asyncio.Event()

        def watch(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
            if updates[-1][0] >= 600:
                committed.set()

        custodian.apply_hook = watch
        link = Link(exchange, custodian)
        link.to_exchange.drop = lambda frame: frame.WhichOneof("frame") == "ack"
        await within(committed.wait())
        await link.cut()
        # Everything is durable at the custodian; the exchange heard of none of it.
        assert custodian.log.received_head().sequence == 600
        assert exchange.session.acknowledged_sequence == 0
        custodian.close()
        restarted = make_party(CUSTODIAN, batch_size=100)  # same file: a new process
        assert restarted.log.received_head() == exchange.log.sent_head()
        replayed: list[int] = []
        exchange.append(50)
        link = Link(exchange, restarted)

        def record(frame: Frame) -> None:
            if frame.WhichOneof("frame") == "batch":
                batch = position_sync_pb2.SyncBatch.FromString(frame.batch.payload)
                replayed.extend(entry.sequence for entry in batch.entries)

        link.to_custodian.on_frame = record
        await within(exchange.session.wait_acknowledged(650))
        await link.cut()
        # The restarted custodian's hello made the exchange resume after 600.
        assert replayed == list(range(601, 651))
        assert restarted.applied() == list(range(1, 651))

    run(scenario())


def test_duplicate_entries_are_skipped_and_acknowledged_again(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        peer = ScriptedPeer(custodian.session)
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
        await peer.expect("hello")
        entries = chain(EXCHANGE_TO_CUSTODIAN, 5)
        signer = keys[EXCHANGE]
        await peer.send(batch_frame(signer, 2, entries[:3], audience=CUSTODIAN))
        assert (await peer.expect("ack")).ack.sequence == 3
        # A sender replaying from its last ack overlaps what is stored.
        await peer.send(batch_frame(signer, 2, entries, audience=CUSTODIAN))
        ack = (await peer.expect("ack")).ack
        assert (ack.sequence, ack.entry_hash) == (5, entries[4].entry_hash)
        await peer.send(batch_frame(signer, 2, entries[1:4], audience=CUSTODIAN))
        assert (await peer.expect("ack")).ack.sequence == 5
        assert custodian.applied() == [1, 2, 3, 4, 5]
        peer.outbox.end()
        await within(peer.run)

    run(scenario())


async def _exchange_call_with_three_entries(
    client: CustodianClient, signer: SigningKey
) -> tuple[grpc.aio.StreamStreamCall, list[position_sync_pb2.SyncEntry]]:
    """A raw exchange call that says hello and gets entries 1..3 acknowledged."""
    call = client.sync_positions(timeout=10)

    async def write(frame: Frame) -> None:
        await call.write(custodian_service_pb2.SyncPositionsRequest(frame=frame))

    async def read(kind: str) -> Frame:
        response = await within(call.read())
        assert response is not grpc.aio.EOF
        assert response.frame.WhichOneof("frame") == kind, response
        return response.frame

    await write(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
    await read("hello")
    entries = chain(EXCHANGE_TO_CUSTODIAN, 3)
    await write(batch_frame(signer, 2, entries, audience=CUSTODIAN))
    assert (await read("ack")).ack.sequence == 3
    return call, entries


async def _status_of(call: grpc.aio.StreamStreamCall, frame: Frame) -> RPCError:
    """Send ``frame`` on a raw call; the custodian must end the call with an error."""
    await call.write(custodian_service_pb2.SyncPositionsRequest(frame=frame))
    try:
        while await within(call.read()) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as err:
        return error_from_rpc_error(err)
    raise AssertionError("the custodian ended the call without an error")


def test_equivocating_exchange_is_aborted_and_the_evidence_kept(
    make_party: Callable[..., Party], keys: dict[str, SigningKey], pki: DevPki
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        async with custodian_server(pki, CustodianSync(custodian.session)) as client:
            call, entries = await _exchange_call_with_three_entries(client, keys[EXCHANGE])
            # A different entry 3, correctly chained to 2 and signed: a fork.
            forked = chain(EXCHANGE_TO_CUSTODIAN, 2, start=3, prev=entries[1].entry_hash, salt=7)
            frame = batch_frame(keys[EXCHANGE], 2, forked, audience=CUSTODIAN)
            error = await _status_of(call, frame)
        assert error.code == grpc.StatusCode.ABORTED
        assert error.reason == _R.ERROR_REASON_EQUIVOCATION
        assert error.metadata == {
            "sequence": "3",
            "expected": entries[2].entry_hash.hex(),
            "actual": forked[0].entry_hash.hex(),
        }
        # Nothing of the fork was stored or applied; both signed sides are kept.
        assert custodian.log.received_head() == LogHead(3, entries[2].entry_hash)
        assert custodian.applied() == [1, 2, 3]
        [evidence] = custodian.log.evidence()
        assert (evidence.kind, evidence.sequence) == ("batch", 3)
        assert evidence.direction == EXCHANGE_TO_CUSTODIAN
        assert evidence.stored_entry_hash == entries[2].entry_hash
        assert evidence.received_entry_hash == forked[0].entry_hash
        assert evidence.received == frame.batch.SerializeToString()
        assert evidence.stored_batch is not None
        stored = envelope_pb2.Envelope.FromString(evidence.stored_batch)
        assert position_sync_pb2.SyncBatch.FromString(stored.payload).entries[2] == entries[2]

    run(scenario())


def test_forged_batch_signature_is_unauthenticated_and_changes_nothing(
    make_party: Callable[..., Party], keys: dict[str, SigningKey], pki: DevPki
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        async with custodian_server(pki, CustodianSync(custodian.session)) as client:
            call, entries = await _exchange_call_with_three_entries(client, keys[EXCHANGE])
            more = chain(EXCHANGE_TO_CUSTODIAN, 2, start=4, prev=entries[2].entry_hash)
            frame = batch_frame(keys[EXCHANGE], 2, more, audience=CUSTODIAN)
            forged = bytearray(frame.batch.signatures[0].sig)
            forged[0] ^= 1
            frame.batch.signatures[0].sig = bytes(forged)
            error = await _status_of(call, frame)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert error.reason == _R.ERROR_REASON_SIGNATURE_INVALID
        assert custodian.log.received_head().sequence == 3
        assert custodian.applied() == [1, 2, 3]
        assert custodian.log.evidence() == []

    run(scenario())


# --- refusals on the stream ------------------------------------------------------------


async def _custodian_with_three_entries(
    custodian: Party, signer: SigningKey
) -> tuple[ScriptedPeer, list[position_sync_pb2.SyncEntry]]:
    """The custodian's session under test, past the hello, holding exchange entries 1..3."""
    peer = ScriptedPeer(custodian.session)
    await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
    await peer.expect("hello")
    entries = chain(EXCHANGE_TO_CUSTODIAN, 3)
    await peer.send(batch_frame(signer, 2, entries, audience=CUSTODIAN))
    assert (await peer.expect("ack")).ack.sequence == 3
    return peer, entries


async def _refused(peer: ScriptedPeer, frame: Frame) -> CollateralSyncError:
    """Send ``frame``; the session must fail, telling the peer why in a SyncClose."""
    await peer.send(frame)
    # The session may still send its own log before it reads the frame.
    while (reply := await within(peer.inbox.get())).WhichOneof("frame") != "close":
        assert reply.WhichOneof("frame") in {"batch", "heartbeat"}, reply
    close = reply.close
    error = await peer.failure()
    assert isinstance(error, CollateralSyncError)
    assert not isinstance(error, RPCError)
    assert (close.reason, close.message, dict(close.metadata)) == (
        error.reason,
        error.message,
        error.metadata,
    )
    return error


def test_gap_is_out_of_range_and_changes_nothing(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        peer, entries = await _custodian_with_three_entries(custodian, keys[EXCHANGE])
        skipped = chain(EXCHANGE_TO_CUSTODIAN, 3, start=4, prev=entries[2].entry_hash)[1:]
        error = await _refused(peer, batch_frame(keys[EXCHANGE], 2, skipped, audience=CUSTODIAN))
        check_error(error, _R.ERROR_REASON_SEQUENCE_GAP, grpc.StatusCode.OUT_OF_RANGE)
        assert error.metadata == {"expected": "4", "actual": "5"}
        assert custodian.log.received_head() == LogHead(3, entries[2].entry_hash)
        assert custodian.applied() == [1, 2, 3]

    run(scenario())


def test_new_entry_not_chained_to_the_stored_head_is_equivocation(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        peer, entries = await _custodian_with_three_entries(custodian, keys[EXCHANGE])
        elsewhere = chain(EXCHANGE_TO_CUSTODIAN, 2, start=4, prev=b"\x09" * 32)
        error = await _refused(peer, batch_frame(keys[EXCHANGE], 2, elsewhere, audience=CUSTODIAN))
        check_error(error, _R.ERROR_REASON_EQUIVOCATION, grpc.StatusCode.ABORTED)
        [evidence] = custodian.log.evidence()
        assert (evidence.sequence, evidence.stored_entry_hash, evidence.received_entry_hash) == (
            3,
            entries[2].entry_hash,
            b"\x09" * 32,
        )
        assert custodian.applied() == [1, 2, 3]

    run(scenario())


def test_batch_signed_by_the_wrong_role_or_party_is_permission_denied(
    make_party: Callable[..., Party], keys: dict[str, SigningKey], registry: KeyRegistry
) -> None:
    # A key registered to the custodian's party id but in the exchange role.
    impostor = SigningKey.from_seed(b"\x03" * 32, CUSTODIAN, common_pb2.PARTY_ROLE_EXCHANGE)
    wide = make_registry(keys[CUSTODIAN], keys[EXCHANGE], impostor)

    async def scenario(signer: SigningKey, direction: int, expected: dict[str, str]) -> None:
        exchange = make_party(EXCHANGE, name=f"exchange-{signer.key_id[:8]}-{direction}")
        exchange.session = SyncSession(exchange.log, keys[EXCHANGE], wide, apply=exchange.apply)
        peer = ScriptedPeer(exchange.session)
        await peer.expect("hello")
        await peer.send(hello(CUSTODIAN, CUSTODIAN_TO_EXCHANGE))
        entries = chain(direction, 2)
        error = await _refused(peer, batch_frame(signer, direction, entries, audience=EXCHANGE))
        check_error(error, _R.ERROR_REASON_KEY_ROLE_MISMATCH, grpc.StatusCode.PERMISSION_DENIED)
        assert error.metadata == expected
        assert exchange.log.received_head() == LogHead(0, ZERO_HASH)
        assert exchange.applied() == []

    # An exchange-role key signing a custodian-direction batch.
    run(
        scenario(impostor, 1, {"expected": "PARTY_ROLE_CUSTODIAN", "actual": "PARTY_ROLE_EXCHANGE"})
    )
    # The exchange's own batch reflected at it as if it came from the custodian.
    run(scenario(keys[EXCHANGE], 2, {"expected": CUSTODIAN, "actual": EXCHANGE}))
    # The right key, the wrong direction on this stream.
    run(scenario(keys[CUSTODIAN], 2, {"expected": "1", "actual": "2"}))


def test_batch_for_another_audience_is_permission_denied(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        peer, entries = await _custodian_with_three_entries(custodian, keys[EXCHANGE])
        more = chain(EXCHANGE_TO_CUSTODIAN, 1, start=4, prev=entries[2].entry_hash)
        frame = batch_frame(keys[EXCHANGE], 2, more, audience="custodian-2")
        error = await _refused(peer, frame)
        check_error(error, _R.ERROR_REASON_AUDIENCE_MISMATCH, grpc.StatusCode.PERMISSION_DENIED)
        assert custodian.log.received_head().sequence == 3

    run(scenario())


def test_batch_larger_than_the_window_is_refused(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN, window=4)
        peer = ScriptedPeer(custodian.session)
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
        assert (await peer.expect("hello")).hello.window == 4
        entries = chain(EXCHANGE_TO_CUSTODIAN, 5)
        error = await _refused(peer, batch_frame(keys[EXCHANGE], 2, entries, audience=CUSTODIAN))
        check_error(error, _R.ERROR_REASON_LIMIT_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert custodian.applied() == []

    run(scenario())


def test_apply_failure_rolls_back_the_whole_batch(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    custodian: Party

    def refuse_sequence_5(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        # An answer appended in the same transaction goes down with the refusal too.
        custodian.log.append([update_for(CUSTODIAN_TO_EXCHANGE, updates[0][0])])
        if any(sequence == 5 for sequence, _ in updates):
            raise StateError(
                "account acct-5 is frozen",
                metadata={"expected": "active account", "actual": "frozen"},
            )

    async def scenario() -> None:
        nonlocal custodian
        custodian = make_party(CUSTODIAN, apply_hook=refuse_sequence_5)
        peer, entries = await _custodian_with_three_entries(custodian, keys[EXCHANGE])
        assert custodian.log.sent_head().sequence == 1
        more = chain(EXCHANGE_TO_CUSTODIAN, 3, start=4, prev=entries[2].entry_hash)
        error = await _refused(peer, batch_frame(keys[EXCHANGE], 2, more, audience=CUSTODIAN))
        check_error(error, _R.ERROR_REASON_STATE_CONFLICT, grpc.StatusCode.FAILED_PRECONDITION)
        # Entry 4 was applied inside the transaction, then rolled back with it.
        assert custodian.log.received_head().sequence == 3
        assert custodian.applied() == [1, 2, 3]
        assert custodian.log.sent_head().sequence == 1

    run(scenario())


def test_answers_appended_by_apply_commit_with_the_batch_and_are_sent(
    make_party: Callable[..., Party],
) -> None:
    async def scenario() -> None:
        exchange = make_party(EXCHANGE, batch_size=10)
        custodian = make_party(CUSTODIAN)

        def answer(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
            # One response per credit line, in the transaction that stores the credit line.
            custodian.log.append(update_for(CUSTODIAN_TO_EXCHANGE, s) for s, _ in updates)

        custodian.apply_hook = answer
        link = Link(exchange, custodian)
        exchange.append(35)
        await within(exchange.session.wait_acknowledged(35))
        await within(custodian.session.wait_acknowledged(35))
        assert exchange.applied() == list(range(1, 36))
        assert exchange.log.received_head() == custodian.log.sent_head()
        await link.cut()

    run(scenario())


def test_bad_update_inside_a_signed_batch_is_malformed(
    make_party: Callable[..., Party], keys: dict[str, SigningKey]
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        peer, entries = await _custodian_with_three_entries(custodian, keys[EXCHANGE])
        # A custodian-to-exchange variant, correctly hashed, in the other direction.
        update = update_for(CUSTODIAN_TO_EXCHANGE, 4).SerializeToString()
        prev = entries[2].entry_hash
        entry = position_sync_pb2.SyncEntry(
            sequence=4,
            prev_entry_hash=prev,
            update=update,
            entry_hash=entry_hash(EXCHANGE_TO_CUSTODIAN, 4, prev, update),
        )
        error = await _refused(peer, batch_frame(keys[EXCHANGE], 2, [entry], audience=CUSTODIAN))
        check_error(error, _R.ERROR_REASON_MALFORMED, grpc.StatusCode.INVALID_ARGUMENT)
        assert error.metadata["actual"] == "pledge_change"
        assert custodian.log.received_head().sequence == 3

    run(scenario())


def test_hello_is_checked_before_anything_is_sent(
    make_party: Callable[..., Party],
) -> None:
    async def refused_hello(custodian: Party, frame: Frame) -> CollateralSyncError:
        peer = ScriptedPeer(custodian.session)
        # The custodian answers a bad hello with a SyncClose, never its own hello.
        return await _refused(peer, frame)

    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        head = custodian.append(5)
        third = custodian.log.outgoing_hash(3)
        assert third is not None

        error = await refused_hello(custodian, hello("exchange-2", EXCHANGE_TO_CUSTODIAN))
        check_error(error, _R.ERROR_REASON_KEY_ROLE_MISMATCH, grpc.StatusCode.PERMISSION_DENIED)
        error = await refused_hello(custodian, hello(EXCHANGE, CUSTODIAN_TO_EXCHANGE))
        check_error(error, _R.ERROR_REASON_KEY_ROLE_MISMATCH, grpc.StatusCode.PERMISSION_DENIED)
        error = await refused_hello(custodian, hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN, window=0))
        check_error(error, _R.ERROR_REASON_MALFORMED, grpc.StatusCode.INVALID_ARGUMENT)
        error = await refused_hello(custodian, Frame(heartbeat=position_sync_pb2.SyncHeartbeat()))
        check_error(error, _R.ERROR_REASON_MALFORMED, grpc.StatusCode.INVALID_ARGUMENT)
        # The exchange claims entries the custodian never wrote: it lost data, or lies.
        error = await refused_hello(
            custodian, hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN, received=LogHead(6, head.entry_hash))
        )
        check_error(error, _R.ERROR_REASON_OUT_OF_RANGE, grpc.StatusCode.OUT_OF_RANGE)
        assert custodian.log.evidence() == []
        # The exchange holds another entry 3 than the one the custodian wrote.
        claimed = hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN, received=LogHead(3, b"\x05" * 32))
        error = await refused_hello(custodian, claimed)
        check_error(error, _R.ERROR_REASON_EQUIVOCATION, grpc.StatusCode.ABORTED)
        [evidence] = custodian.log.evidence()
        assert (evidence.kind, evidence.sequence, evidence.direction) == ("hello", 3, 1)
        assert evidence.stored_entry_hash == third
        assert evidence.received_entry_hash == b"\x05" * 32
        assert evidence.received == claimed.SerializeToString()
        # The exchange re-dials with the same forked history: refused, kept once.
        error = await refused_hello(custodian, claimed)
        assert error.reason == _R.ERROR_REASON_EQUIVOCATION
        assert custodian.log.evidence() == [evidence]

    run(scenario())


def test_acks_are_checked_against_what_was_sent(
    make_party: Callable[..., Party],
) -> None:
    async def scenario(ack: position_sync_pb2.SyncAck, reason: int) -> Party:
        custodian = make_party(CUSTODIAN, name=f"custodian-{ack.sequence}")
        custodian.append(3)
        peer = ScriptedPeer(custodian.session)
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
        await peer.expect("hello")
        batch = position_sync_pb2.SyncBatch.FromString((await peer.expect("batch")).batch.payload)
        assert [e.sequence for e in batch.entries] == [1, 2, 3]
        second = Frame(
            ack=position_sync_pb2.SyncAck(sequence=2, entry_hash=batch.entries[1].entry_hash)
        )
        await peer.send(second)
        await within(custodian.session.wait_acknowledged(2))
        error = await _refused(peer, Frame(ack=ack))
        assert error.reason == reason
        assert custodian.session.acknowledged_sequence == 2
        return custodian

    run(
        scenario(
            position_sync_pb2.SyncAck(sequence=4, entry_hash=ZERO_HASH),
            _R.ERROR_REASON_OUT_OF_RANGE,
        )
    )
    custodian = run(
        scenario(
            position_sync_pb2.SyncAck(sequence=3, entry_hash=b"\x01" * 32),
            _R.ERROR_REASON_EQUIVOCATION,
        )
    )
    [evidence] = custodian.log.evidence()
    assert (evidence.kind, evidence.sequence) == ("ack", 3)


def test_an_ack_that_arrives_while_its_batch_is_still_being_written_is_accepted(
    make_party: Callable[..., Party],
) -> None:
    """On a fast link the peer's ack can be read before the write of its batch returns.

    The session must already count the batch as sent then; a session that
    counted it only after the write saw an ack beyond what it had sent and
    ended the stream with OUT_OF_RANGE.
    """
    total = 30

    async def scenario() -> None:
        custodian = make_party(CUSTODIAN, batch_size=10)
        custodian.append(total)
        session = custodian.session
        acks: asyncio.Queue[tuple[Frame, asyncio.Future[None]]] = asyncio.Queue()
        acked_inside_write: list[int] = []

        async def peer_frames() -> AsyncIterator[Frame]:
            yield hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN)
            while True:
                ack, handled = await acks.get()
                yield ack
                # Resumed: the session handled the ack and asks for the next frame.
                handled.set_result(None)
                if session.acknowledged_sequence == total:
                    return

        async def send(frame: Frame) -> None:
            if frame.WhichOneof("frame") != "batch":
                return
            last = position_sync_pb2.SyncBatch.FromString(frame.batch.payload).entries[-1]
            handled = asyncio.get_running_loop().create_future()
            ack = Frame(
                ack=position_sync_pb2.SyncAck(sequence=last.sequence, entry_hash=last.entry_hash)
            )
            await acks.put((ack, handled))
            # The write is still "in progress" while the session reads and handles the ack.
            await handled
            acked_inside_write.append(session.acknowledged_sequence)

        await within(session.run(send, peer_frames()))
        assert acked_inside_write == [10, 20, 30]
        assert session.acknowledged_sequence == total

    run(scenario())


def test_peer_close_ends_the_session_with_the_peers_reason(
    make_party: Callable[..., Party],
) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        peer = ScriptedPeer(custodian.session)
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN))
        await peer.expect("hello")
        close = position_sync_pb2.SyncClose(
            reason=_R.ERROR_REASON_EQUIVOCATION,
            message="custodian forked at 9",
            metadata={"sequence": "9", "expected": "aa", "actual": "bb"},
        )
        await peer.send(Frame(close=close))
        error = await peer.failure()
        assert isinstance(error, RPCError)
        assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, _R.ERROR_REASON_EQUIVOCATION)
        assert error.metadata["sequence"] == "9"
        assert peer.inbox.empty()  # a peer's close is not answered with another

    run(scenario())


def test_dialling_exchange_tells_the_custodian_why_it_refuses(
    make_party: Callable[..., Party], keys: dict[str, SigningKey], pki: DevPki
) -> None:
    """The exchange cannot set a call status; its SyncClose carries the reason instead."""

    class ForkingCustodian(custodian_service_pb2_grpc.CustodianServiceServicer):
        def __init__(self) -> None:
            self.seen: list[Frame] = []

        async def SyncPositions(
            self, request_iterator: Any, context: grpc.aio.ServicerContext
        ) -> None:
            async for request in request_iterator:
                self.seen.append(request.frame)
                if request.frame.WhichOneof("frame") == "hello":
                    await context.write(
                        custodian_service_pb2.SyncPositionsResponse(
                            frame=hello(CUSTODIAN, CUSTODIAN_TO_EXCHANGE)
                        )
                    )
                    entries = chain(CUSTODIAN_TO_EXCHANGE, 2, start=2, prev=b"\x04" * 32)
                    frame = batch_frame(keys[CUSTODIAN], 1, entries, audience=EXCHANGE)
                    await context.write(custodian_service_pb2.SyncPositionsResponse(frame=frame))

    async def scenario() -> None:
        exchange = make_party(EXCHANGE)
        custodian = ForkingCustodian()
        async with custodian_server(pki, custodian) as client:
            with pytest.raises(CollateralSyncError) as caught:
                await within(dial_sync_stream(exchange.session, client))
        check_error(caught.value, _R.ERROR_REASON_SEQUENCE_GAP, grpc.StatusCode.OUT_OF_RANGE)
        kinds = [frame.WhichOneof("frame") for frame in custodian.seen]
        assert kinds == ["hello", "close"]
        assert custodian.seen[1].close.reason == _R.ERROR_REASON_SEQUENCE_GAP
        assert dict(custodian.seen[1].close.metadata) == {"expected": "1", "actual": "2"}

    run(scenario())


def test_custodian_refusal_reaches_the_dialling_exchange_as_rpc_error(
    make_party: Callable[..., Party], registry: KeyRegistry, pki: DevPki
) -> None:
    async def scenario() -> None:
        exchange = make_party(EXCHANGE)
        custodian = make_party(CUSTODIAN)
        custodian.append(2)
        # The exchange holds custodian entries 1..4, more than the custodian's log has
        # (say the custodian lost its last writes): the custodian refuses the hello.
        other = make_party(CUSTODIAN, name="lost-custodian")
        other.append(4)
        entries = [other.log.outgoing_entry(s) for s in (1, 2, 3, 4)]
        signed = batch_frame(other.signer, 1, [e for e in entries if e], audience=EXCHANGE)
        now = datetime.now(UTC)
        verified = verify_sync_batch(
            signed.batch,
            registry,
            receiver_party_id=EXCHANGE,
            sender_party_id=CUSTODIAN,
            direction=CUSTODIAN_TO_EXCHANGE,
            now=now,
            max_entries=10,
        )
        exchange.log.accept_batch(verified, exchange.apply, now=now)
        async with custodian_server(pki, CustodianSync(custodian.session)) as client:
            with pytest.raises(RPCError) as caught:
                await within(dial_sync_stream(exchange.session, client))
        assert caught.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert caught.value.reason == _R.ERROR_REASON_OUT_OF_RANGE
        assert caught.value.metadata == {"expected": "<= 2", "actual": "4"}

    run(scenario())


# --- flow control and liveness -----------------------------------------------------------


def test_sender_never_has_more_than_the_window_unacknowledged(
    make_party: Callable[..., Party],
) -> None:
    window = 20

    async def scenario() -> None:
        exchange = make_party(EXCHANGE, batch_size=7)
        custodian = make_party(CUSTODIAN, window=window)
        exchange.append(100)
        link = Link(exchange, custodian)
        held: list[Frame] = []
        released = 0
        sent = 0
        worst = 0

        def count_batches(frame: Frame) -> None:
            nonlocal sent, worst
            if frame.WhichOneof("frame") == "batch":
                batch = position_sync_pb2.SyncBatch.FromString(frame.batch.payload)
                sent = batch.entries[-1].sequence
                worst = max(worst, sent - released)

        link.to_custodian.on_frame = count_batches

        def hold_acks(frame: Frame) -> bool:
            if frame.WhichOneof("frame") == "ack":
                held.append(frame)
                return True
            return False

        link.to_exchange.drop = hold_acks
        while released < 100:
            # Let the sender run as far as it may; then release one ack.
            for _ in range(50):
                await asyncio.sleep(0)
            assert sent - released <= window
            assert exchange.session.in_flight == sent - released
            if released < 80:
                assert sent - released == window  # it used the whole window, no more
            ack = held.pop(0)
            released = ack.ack.sequence
            await link.to_exchange.queue.put(ack)
            await within(exchange.session.wait_acknowledged(released))
        assert worst == window
        assert custodian.applied() == list(range(1, 101))
        await link.cut()

    run(scenario())


def test_idle_session_sends_heartbeats(
    make_party: Callable[..., Party], registry: KeyRegistry
) -> None:
    stamp = datetime.now(UTC).replace(microsecond=0)

    async def scenario() -> None:
        exchange = make_party(EXCHANGE, heartbeat_interval=timedelta(milliseconds=30))
        custodian = make_party(CUSTODIAN, clock=lambda: stamp)
        custodian.append(2)
        custodian.session = SyncSession(
            custodian.log,
            custodian.signer,
            registry,
            apply=custodian.apply,
            heartbeat_interval=timedelta(milliseconds=30),
            clock=lambda: stamp,
        )
        link = Link(exchange, custodian)
        beats: asyncio.Queue[Frame] = asyncio.Queue()

        def watch(frame: Frame) -> None:
            if frame.WhichOneof("frame") == "heartbeat":
                beats.put_nowait(frame)

        link.to_exchange.on_frame = watch
        beat = (await within(beats.get())).heartbeat
        assert beat.sent_sequence == 2
        assert beat.sent_at.ToDatetime(tzinfo=UTC) == stamp
        # Heartbeats keep the stream alive past the liveness limit of three intervals.
        for _ in range(4):
            await within(beats.get())
        assert exchange.session.connected
        assert exchange.session.peer_sent_sequence == 2
        await link.cut()

    run(scenario())


def test_silent_peer_is_considered_gone(make_party: Callable[..., Party]) -> None:
    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        peer = ScriptedPeer(custodian.session)
        # The peer promises a frame every 20 ms, then says nothing more.
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN, heartbeat_interval_ms=20))
        await peer.expect("hello")
        error = await peer.failure()
        assert isinstance(error, TimeoutError)
        assert not custodian.session.connected

    run(scenario())


def test_silence_is_elapsed_time_since_the_peers_last_accepted_frame(
    make_party: Callable[..., Party],
) -> None:
    """§11.2: a heartbeat resets it whatever time it carries; a refused frame does not."""

    async def scenario() -> None:
        custodian = make_party(CUSTODIAN)
        await asyncio.sleep(0.05)
        assert custodian.session.peer_silent_for >= timedelta(milliseconds=50)  # since made
        peer = ScriptedPeer(custodian.session)
        await peer.send(hello(EXCHANGE, EXCHANGE_TO_CUSTODIAN, heartbeat_interval_ms=10_000))
        await peer.expect("hello")
        assert custodian.session.peer_silent_for < timedelta(milliseconds=50)
        await asyncio.sleep(0.1)
        assert custodian.session.peer_silent_for >= timedelta(milliseconds=100)
        # A heartbeat stamped a year ago is still a frame heard now.
        beat = position_sync_pb2.SyncHeartbeat(sent_sequence=0)
        beat.sent_at.FromDatetime(datetime.now(UTC) - timedelta(days=365))
        await peer.send(Frame(heartbeat=beat))
        await within(_until(lambda: custodian.session.peer_silent_for < timedelta(milliseconds=50)))
        await asyncio.sleep(0.1)
        # A frame the session refuses is not heard: the stream ends, silence goes on.
        await peer.send(Frame())
        await peer.failure()
        assert custodian.session.peer_silent_for >= timedelta(milliseconds=100)

    run(scenario())


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_custodian_refuses_a_stream_from_another_tls_identity(
    make_party: Callable[..., Party], pki: DevPki
) -> None:
    """The hello may name the right party; the TLS certificate must too."""

    async def scenario() -> None:
        exchange = make_party(EXCHANGE)
        custodian = make_party(CUSTODIAN)
        server = create_server(
            tls=TlsConfig.from_dev_pki(pki, CUSTODIAN), servicers=[CustodianSync(custodian.session)]
        )
        other = TlsConfig.from_dev_pki(pki, "exchange-2")
        async with serve(server, grace=0) as port, secure_channel(f"localhost:{port}", other) as ch:
            with pytest.raises(RPCError) as caught:
                await within(dial_sync_stream(exchange.session, CustodianClient(ch)))
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.reason == _R.ERROR_REASON_KEY_ROLE_MISMATCH
        assert caught.value.metadata == {"expected": EXCHANGE, "actual": "exchange-2"}

    run(scenario())


# --- SIGKILL ------------------------------------------------------------------------------

# The exchange as a separate process: sends its log of `count` entries, applies the
# custodian's in its `applied` table (primary key: applying twice fails), re-dials on
# any disconnect. The test kills it with SIGKILL mid-stream and starts it again.
_EXCHANGE_PROCESS = """
import asyncio, sqlite3, sys
from datetime import UTC, datetime
from pathlib import Path
from collateral_sync.clients import CustodianClient
from collateral_sync.errors import RPCError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.sync import EXCHANGE_TO_CUSTODIAN, SyncLog, SyncSession, dial_sync_stream
from collateral_sync.transport import TlsConfig, secure_channel
from collateral_sync.v1 import common_pb2, envelope_pb2, position_sync_pb2

database, pki, port, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
t0 = datetime(2026, 1, 1, tzinfo=UTC)
custodian = SigningKey.from_seed(b"\\x01" * 32, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
exchange = SigningKey.from_seed(b"\\x02" * 32, "exchange-1", common_pb2.PARTY_ROLE_EXCHANGE)
registry = KeyRegistry([custodian.party_key(t0), exchange.party_key(t0)])
connection = sqlite3.connect(database, isolation_level=None)
connection.execute("CREATE TABLE IF NOT EXISTS applied (sequence INTEGER PRIMARY KEY, v TEXT)")
log = SyncLog(connection, party_id="exchange-1", peer_party_id="custodian-1",
              sending_direction=EXCHANGE_TO_CUSTODIAN)

def apply(updates):
    connection.executemany("INSERT INTO applied VALUES (?, ?)",
                           [(s, u.WhichOneof("update")) for s, u in updates])

while log.sent_head().sequence < count:
    start = log.sent_head().sequence + 1
    with log.transaction():
        log.append(position_sync_pb2.PositionUpdate(credit_line=envelope_pb2.Envelope(
            payload=b"credit %d" % i, payload_type="application/vnd.collateral-sync.v1.credit-line+proto"))
            for i in range(start, min(start + 500, count + 1)))
session = SyncSession(log, exchange, registry, apply=apply, batch_size=200, window=1000)
tls = TlsConfig.from_files(pki / "ca.pem", pki / "exchange-1.pem", pki / "exchange-1.key")

async def main():
    async with secure_channel(f"localhost:{port}", tls) as channel:
        while True:
            try:
                await dial_sync_stream(session, CustodianClient(channel))
            except (RPCError, TimeoutError):
                await asyncio.sleep(0.05)

asyncio.run(main())
"""


@contextlib.contextmanager
def exchange_database(path: Path) -> Iterator[SyncLog]:
    """The exchange process's log, opened as its next incarnation would."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        yield SyncLog(
            connection,
            party_id=EXCHANGE,
            peer_party_id=CUSTODIAN,
            sending_direction=EXCHANGE_TO_CUSTODIAN,
        )


@pytest.mark.slow
def test_exchange_killed_with_sigkill_mid_stream_resumes_with_identical_heads(
    make_party: Callable[..., Party], pki: DevPki, tmp_path: Path
) -> None:
    count = 6000
    database = tmp_path / "exchange-process.sqlite"

    async def scenario() -> None:
        received = {"head": 0}
        reached: list[tuple[int, asyncio.Event]] = []

        def watch(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
            received["head"] = updates[-1][0]
            for target, event in reached:
                if updates[-1][0] >= target:
                    event.set()

        async def received_at_least(target: int) -> None:
            event = asyncio.Event()
            reached.append((target, event))
            if received["head"] >= target:
                return
            await within(event.wait(), 30)

        custodian = make_party(CUSTODIAN, batch_size=200, window=1000, apply_hook=watch)
        custodian.append(count)
        server = create_server(
            tls=TlsConfig.from_dev_pki(pki, CUSTODIAN), servicers=[CustodianSync(custodian.session)]
        )
        async with serve(server, grace=0) as port:

            async def start() -> asyncio.subprocess.Process:
                return await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _EXCHANGE_PROCESS,
                    str(database),
                    str(pki.directory),
                    str(port),
                    str(count),
                )

            # Killed twice mid-stream, each time while both logs are still flowing.
            for target in (1500, 3500):
                child = await start()
                await received_at_least(target)
                child.kill()  # SIGKILL
                await child.wait()
                assert received["head"] < count
                # Every entry the dead exchange acknowledged is in its database.
                acknowledged = custodian.session.acknowledged_sequence
                with exchange_database(database) as exchange_log:
                    durable = exchange_log.received_head()
                    # Whatever of its log the custodian holds, it recorded sending.
                    later = datetime.now(UTC) + timedelta(days=1)
                    sent = exchange_log.heads_at(later)[EXCHANGE_TO_CUSTODIAN].sequence
                assert sent >= custodian.log.received_head().sequence
                assert acknowledged <= durable.sequence
                assert custodian.log.outgoing_hash(durable.sequence) == durable.entry_hash
            child = await start()
            await within(custodian.session.wait_acknowledged(count), 30)
            await received_at_least(count)
            child.kill()
            await child.wait()

        with exchange_database(database) as exchange_log:
            assert exchange_log.received_head() == custodian.log.sent_head()
            assert exchange_log.sent_head() == custodian.log.received_head()
            # Every batch the killed exchange sent was recorded before it left (§10.2).
            later = datetime.now(UTC) + timedelta(days=1)
            assert exchange_log.heads_at(later) == custodian.log.heads_at(later)
            assert exchange_log.heads_at(later)[EXCHANGE_TO_CUSTODIAN] == exchange_log.sent_head()
            rows = exchange_log.connection.execute("SELECT sequence FROM applied ORDER BY 1")
            applied = [row[0] for row in rows]
        assert applied == list(range(1, count + 1))
        assert custodian.applied() == list(range(1, count + 1))

    run(scenario())
