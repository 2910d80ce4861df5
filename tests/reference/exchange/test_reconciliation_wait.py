"""The exchange states a cut-off only once it has heard the custodian past it (PROTOCOL.md §10.2).

"The exchange builds its statement once it has received a batch or heartbeat
issued after ``C``": a custodian batch issued at or before ``C`` but still in
flight at ``C`` is in the exchange's view of ``C``, so the two views agree;
a batch issued after ``C`` is not, whenever it arrives. The reference exchange
is built in-process as the runner builds it (:mod:`tests.reference._inprocess`,
the real :class:`ExchangeRole` on its SQLite storage and test clock); its sync
session talks over an in-memory stream to a custodian made of SDK parts (a
sync log and session on a clock the test sets), whose frames the test can hold
back. Nothing is dialled: the role is never started, the test drives what its
background tasks and ``AdvanceClock`` would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from collateral_sync.amounts import amount_to_proto
from collateral_sync.errors import StateError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.reconciliation import PositionTree, cutoff_id_of
from collateral_sync.signing import sign_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, LogHead, SyncLog, SyncSession
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    errors_pb2,
    position_sync_pb2,
    reconciliation_pb2,
)
from collateral_sync_reference.common.storage import SqliteStorage
from collateral_sync_reference.exchange.role import ExchangeRole

from .._inprocess import REGISTRY, server_context, write_keys
from ..conftest import CUSTODIAN, EXCHANGE, REGULATOR

CUTOFF = datetime(2030, 1, 1, 12, tzinfo=UTC)
NEXT_CUTOFF = CUTOFF + timedelta(hours=12)
CUTOFF_ID = cutoff_id_of(CUTOFF)
SECOND = timedelta(seconds=1)
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
WAIT = 10.0
#: Nobody heartbeats on their own: every frame of the test is one it sent.
QUIET = timedelta(hours=1)

Positions = tuple[tuple[str, str], ...]


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


class HeldPipe:
    """One direction of the stream; frames cross it serialised, or wait while it is held."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[position_sync_pb2.SyncFrame | None] = asyncio.Queue()
        self.holding = False
        self.held: list[position_sync_pb2.SyncFrame] = []

    async def send(self, frame: position_sync_pb2.SyncFrame) -> None:
        copy = position_sync_pb2.SyncFrame.FromString(frame.SerializeToString())
        if self.holding:
            self.held.append(copy)
        else:
            await self.queue.put(copy)

    def release(self) -> None:
        self.holding = False
        for frame in self.held:
            self.queue.put_nowait(frame)
        self.held.clear()

    async def frames(self) -> AsyncIterator[position_sync_pb2.SyncFrame]:
        while (frame := await self.queue.get()) is not None:
            yield frame


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@dataclass
class Link:
    """The in-process exchange, the scripted custodian's side of the stream, and the stream."""

    exchange: ExchangeRole
    key: SigningKey
    log: SyncLog
    session: SyncSession
    clock: Clock
    to_exchange: HeldPipe
    _sequences: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _epochs: dict[str, int] = field(default_factory=dict)

    def advance_exchange(self, to: datetime) -> None:
        clock = self.exchange.context.test_clock
        assert clock is not None
        clock.advance(to - clock.now())

    def attest(self, *accounts: tuple[str, Positions]) -> LogHead:
        """Holdings statements, issued now by the custodian, appended in one transaction."""
        updates = []
        for account_id, positions in accounts:
            self._epochs[account_id] = epoch = self._epochs.get(account_id, 0) + 1
            statement = attestation_pb2.HoldingsStatement(
                account_id=account_id,
                exchange_id=EXCHANGE,
                epoch=epoch,
                reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
                positions=_positions(account_id, positions),
            )
            envelope = sign_statement(
                statement,
                self.key,
                audience=[EXCHANGE],
                sequence=next(self._sequences),
                ttl=timedelta(days=1),
                issued_at=self.clock.now(),
            )
            # No attestation checker runs: the exchange keeps the statement pending.
            ref = attestation_pb2.AttestationRef(
                log_origin=ORIGIN, leaf_index=0, leaf_hash=bytes(32), tree_size=1
            )
            change = position_sync_pb2.HoldingsChange(holdings_statement=envelope, attestation=ref)
            updates.append(position_sync_pb2.PositionUpdate(holdings_change=change))
        with self.log.transaction():
            return self.log.append(updates)

    async def delivered(self, head: LogHead) -> None:
        """Wait until the exchange has stored (acknowledged) the custodian's log up to ``head``."""
        async with asyncio.timeout(WAIT):
            await self.session.wait_acknowledged(head.sequence)

    async def heartbeat(self, sent_at: datetime) -> None:
        """A custodian heartbeat stamped ``sent_at``, behind whatever the stream holds."""
        heartbeat = position_sync_pb2.SyncHeartbeat(sent_sequence=self.log.sent_head().sequence)
        heartbeat.sent_at.FromDatetime(sent_at)
        frame = position_sync_pb2.SyncFrame(heartbeat=heartbeat)
        await self.to_exchange.send(frame)
        await until(
            lambda: (self.exchange.session.peer_issued_at or CUTOFF - QUIET) >= sent_at,
            "the heartbeat to arrive",
        )

    def statement(self, cutoff_id: str = CUTOFF_ID) -> reconciliation_pb2.ReconciliationStatement:
        envelope = self.exchange.reconciliation.statement(cutoff_id)
        return reconciliation_pb2.ReconciliationStatement.FromString(envelope.payload)

    def not_stated(self, cutoff_id: str = CUTOFF_ID) -> None:
        """The exchange has not stated the cut-off, and says so as before the cut-off."""
        with pytest.raises(StateError) as refused:
            self.exchange.reconciliation.statement(cutoff_id)
        assert refused.value.reason == errors_pb2.ERROR_REASON_STATE_CONFLICT


def _positions(account_id: str, positions: Positions) -> list[common_pb2.Position]:
    return [
        common_pb2.Position(
            account_id=account_id,
            asset_id=asset,
            quantity=amount_to_proto(quantity),
            locked_quantity=amount_to_proto("0"),
            pledged_quantity=amount_to_proto(quantity),
        )
        for asset, quantity in positions
    ]


def _exchange_document() -> dict[str, Any]:
    return {
        "party_id": EXCHANGE,
        "role": "exchange",
        "storage": {"path": f"{EXCHANGE}.sqlite"},
        # Never dialled; the regulator has no address: statements are only served.
        "peers": {CUSTODIAN: "127.0.0.1:9", REGULATOR: None},
        "sync": {"heartbeat_interval_ms": QUIET // timedelta(milliseconds=1)},
        "exchange": {
            "custodian": CUSTODIAN,
            "log_origin": ORIGIN,
            "prices": [{"asset_id": "USDC", "price": "1"}, {"asset_id": "BENJI", "price": "1"}],
        },
    }


@asynccontextmanager
async def linked(directory: Path, start: datetime) -> AsyncIterator[Link]:
    """The exchange and the custodian, both clocks at ``start``, with the stream up."""
    keys = write_keys(
        directory,
        {
            CUSTODIAN: common_pb2.PARTY_ROLE_CUSTODIAN,
            EXCHANGE: common_pb2.PARTY_ROLE_EXCHANGE,
            REGULATOR: common_pb2.PARTY_ROLE_REGULATOR,
        },
    )
    server = server_context(
        directory, _exchange_document(), role="exchange", parse_settings=None, start=start
    )
    exchange = ExchangeRole(server.context)
    custodian_storage = SqliteStorage(directory / "custodian.sqlite")
    log = custodian_storage.sync_log(
        party_id=CUSTODIAN, peer_party_id=EXCHANGE, sending_direction=CUSTODIAN_TO_EXCHANGE
    )
    clock = Clock(start)
    session = SyncSession(
        log,
        keys[CUSTODIAN],
        KeyRegistry.load(directory / REGISTRY),
        apply=lambda updates: None,
        heartbeat_interval=QUIET,
        clock=clock.now,
    )
    to_custodian, to_exchange = HeldPipe(), HeldPipe()
    runs = [
        asyncio.create_task(exchange.session.run(to_custodian.send, to_exchange.frames())),
        asyncio.create_task(session.run(to_exchange.send, to_custodian.frames())),
    ]
    try:
        await until(lambda: exchange.session.connected and session.connected, "the hello exchange")
        yield Link(exchange, keys[CUSTODIAN], log, session, clock, to_exchange)
    finally:
        to_exchange.release()
        for pipe in (to_custodian, to_exchange):
            pipe.queue.put_nowait(None)
        await asyncio.wait(runs, timeout=WAIT)
        for run in runs:
            run.cancel()
        await exchange.reconciliation.stop()
        custodian_storage.close()
        server.storage.close()


def _heads(statement: reconciliation_pb2.ReconciliationStatement) -> dict[int, LogHead]:
    return {h.direction: LogHead(h.sequence, h.entry_hash) for h in statement.sync_log_heads}


def _root(view: dict[str, Positions]) -> bytes:
    return PositionTree.build({a: _positions(a, p) for a, p in view.items()}).root


@pytest.mark.parametrize("heard_by", ["batch", "heartbeat"])
def test_a_batch_in_flight_at_the_cutoff_is_in_the_exchange_statement(
    tmp_path: Path, heard_by: str
) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, CUTOFF - 30 * SECOND) as link:
            await link.delivered(link.attest(("acct-1", (("USDC", "100"),))))

            # Issued a second before the cut-off, and held back on the way.
            link.to_exchange.holding = True
            link.clock.at = CUTOFF - SECOND
            in_flight = link.attest(("acct-1", (("USDC", "70"),)), ("acct-2", (("BENJI", "5"),)))
            await until(lambda: bool(link.to_exchange.held), "the batch in flight")

            # Both clocks pass the cut-off; AdvanceClock freezes what it may.
            link.clock.at = CUTOFF + SECOND
            link.advance_exchange(CUTOFF + SECOND)
            await link.exchange.on_clock_advanced()
            assert link.exchange.reconciliation.run_due() == []
            link.not_stated()

            # The batch arrives after the cut-off: still nothing issued after it.
            link.to_exchange.release()
            await link.delivered(in_flight)
            assert link.exchange.reconciliation.run_due() == []
            link.not_stated()

            if heard_by == "batch":
                # Issued after the cut-off: it lets the exchange state C, and is not in it.
                await link.delivered(link.attest(("acct-3", (("USDC", "9"),))))
            else:
                await link.heartbeat(CUTOFF + SECOND)
            assert link.exchange.reconciliation.run_due() == [CUTOFF_ID]

            statement = link.statement()
            assert statement.account_count == 2
            assert statement.positions_root == _root(
                {"acct-1": (("USDC", "70"),), "acct-2": (("BENJI", "5"),)}
            )
            assert _heads(statement)[CUSTODIAN_TO_EXCHANGE] == in_flight
            # The custodian states the same head of direction 1.
            assert link.log.heads_at(CUTOFF)[CUSTODIAN_TO_EXCHANGE] == in_flight

    asyncio.run(scenario())


def test_a_batch_issued_after_the_cutoff_is_not_in_the_exchange_statement(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, CUTOFF - 30 * SECOND) as link:
            before = link.attest(("acct-1", (("USDC", "100"),)))
            await link.delivered(before)
            # The custodian's clock runs ahead: its batch issued after the cut-off
            # arrives while the exchange's clock is still before it.
            link.advance_exchange(CUTOFF - SECOND)
            link.clock.at = CUTOFF + SECOND
            await link.delivered(
                link.attest(("acct-1", (("USDC", "1"),)), ("acct-2", (("BENJI", "5"),)))
            )
            assert link.exchange.reconciliation.run_due() == []

            link.advance_exchange(CUTOFF + 2 * SECOND)
            await link.exchange.on_clock_advanced()  # already heard past C: stated at once
            statement = link.statement()
            assert statement.account_count == 1
            assert statement.positions_root == _root({"acct-1": (("USDC", "100"),)})
            assert _heads(statement)[CUSTODIAN_TO_EXCHANGE] == before

    asyncio.run(scenario())


def test_a_silent_custodian_leaves_the_cutoff_unstated_until_it_is_heard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collateral_sync_reference.exchange")

    async def scenario() -> None:
        async with linked(tmp_path, CUTOFF - 30 * SECOND) as link:
            first = link.attest(("acct-1", (("USDC", "100"),)))
            await link.delivered(first)
            # A frame stamped exactly C is not issued after C.
            await link.heartbeat(CUTOFF)
            link.advance_exchange(CUTOFF + SECOND)
            for _ in range(3):
                await link.exchange.on_clock_advanced()
                link.not_stated()
            # However long it stays silent, through the next cut-off too: never built early.
            link.advance_exchange(NEXT_CUTOFF + timedelta(hours=1))
            assert link.exchange.reconciliation.run_due() == []
            link.not_stated()
            link.not_stated(cutoff_id_of(NEXT_CUTOFF))
            waiting = [r for r in caplog.records if "waits for a batch or heartbeat" in r.message]
            assert [CUTOFF_ID in r.message for r in waiting] == [True]

            # Heard again past both cut-offs: each is stated, each with what it held by then.
            link.clock.at = NEXT_CUTOFF + SECOND
            await link.heartbeat(NEXT_CUTOFF + SECOND)
            assert link.exchange.reconciliation.run_due() == [
                CUTOFF_ID,
                cutoff_id_of(NEXT_CUTOFF),
            ]
            for cutoff_id in (CUTOFF_ID, cutoff_id_of(NEXT_CUTOFF)):
                statement = link.statement(cutoff_id)
                assert statement.positions_root == _root({"acct-1": (("USDC", "100"),)})
                assert _heads(statement)[CUSTODIAN_TO_EXCHANGE] == first

    asyncio.run(scenario())


def test_the_background_task_states_the_cutoff_once_the_custodian_is_heard(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with linked(tmp_path, CUTOFF - 30 * SECOND) as link:
            await link.delivered(link.attest(("acct-1", (("USDC", "100"),))))
            link.advance_exchange(CUTOFF + SECOND)
            reconciliation = link.exchange.reconciliation
            reconciliation.start()
            stored = "SELECT 1 FROM reconciliation_statements WHERE cutoff_id = ?"
            db = link.exchange.context.storage.connection
            await asyncio.sleep(0.5)
            assert db.execute(stored, (CUTOFF_ID,)).fetchone() is None

            await link.heartbeat(CUTOFF + SECOND)
            await until(
                lambda: db.execute(stored, (CUTOFF_ID,)).fetchone() is not None,
                "the background task to state the cut-off",
            )
            assert link.statement().positions_root == _root({"acct-1": (("USDC", "100"),)})

    asyncio.run(scenario())
