"""The sync log heads a reference party states for a cut-off are those of PROTOCOL.md §10.2.

For each direction: the last entry contained in a batch whose signed
``header.issued_at`` is at or before the cut-off — not the heads the party
holds when it builds the statement. The custodian's and the exchange's
:class:`PartyReconciliation` run on their real SQLite storage, their sync
sessions over an in-memory stream, each on a clock the test moves. The
exchange's clock runs half a second ahead: a batch it issues just after the
cut-off reaches the custodian while the custodian's clock is still before it.
Both statements, whether built as the clock passes the cut-off or when first
asked for after more entries flowed, state the same heads, and compare as
matched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from collateral_sync.amounts import amount_to_proto
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.reconciliation import compare_statements, cutoff_id_of
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    EXCHANGE_TO_CUSTODIAN,
    LogHead,
    SyncLog,
    SyncSession,
)
from collateral_sync.v1 import common_pb2, envelope_pb2, position_sync_pb2, reconciliation_pb2
from collateral_sync_reference.common.reconciliation import (
    DEFAULT_CUTOFFS,
    PartyReconciliation,
    ReconciliationSettings,
)
from collateral_sync_reference.common.storage import SqliteStorage

from ..conftest import CUSTODIAN, EXCHANGE, REGULATOR

CUTOFF = datetime(2030, 1, 1, 12, tzinfo=UTC)
SECOND = timedelta(seconds=1)
KEYS = {
    CUSTODIAN: SigningKey.from_seed(b"\x11" * 32, CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN),
    EXCHANGE: SigningKey.from_seed(b"\x12" * 32, EXCHANGE, common_pb2.PARTY_ROLE_EXCHANGE),
}
REGISTRY = KeyRegistry(k.party_key(valid_from=CUTOFF - timedelta(days=1)) for k in KEYS.values())


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


class Pipe:
    """One direction of the stream; frames cross it serialised."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[position_sync_pb2.SyncFrame | None] = asyncio.Queue()

    async def send(self, frame: position_sync_pb2.SyncFrame) -> None:
        await self.queue.put(position_sync_pb2.SyncFrame.FromString(frame.SerializeToString()))

    async def frames(self) -> AsyncIterator[position_sync_pb2.SyncFrame]:
        while (frame := await self.queue.get()) is not None:
            yield frame


class Party:
    """A reference party's storage, its sync session with the other, and its reconciliation."""

    def __init__(self, path: Path, party_id: str, clock: Clock) -> None:
        self.party_id = party_id
        self.clock = clock
        self.storage = SqliteStorage(path)
        custodian = party_id == CUSTODIAN
        self.direction = CUSTODIAN_TO_EXCHANGE if custodian else EXCHANGE_TO_CUSTODIAN
        peer = EXCHANGE if custodian else CUSTODIAN
        self.log: SyncLog = self.storage.sync_log(
            party_id=party_id, peer_party_id=peer, sending_direction=self.direction
        )
        self.session = SyncSession(
            self.log, KEYS[party_id], REGISTRY, apply=lambda updates: None, clock=clock.now
        )
        self.reconciliation = PartyReconciliation(
            storage=self.storage,
            signer=KEYS[party_id],
            clock=clock,
            settings=ReconciliationSettings(
                cutoffs=DEFAULT_CUTOFFS,
                regulator_id=REGULATOR,
                regulator_address=None,
                statement_ttl=timedelta(days=7),
                perturbations=(),
            ),
            counterparty_id=peer,
            exchange_id=EXCHANGE,
            holdings=list,  # no accounts: the heads are what this is about
            tls=None,
            test_mode=True,
            logger=logging.getLogger(f"test.{party_id}"),
        )
        self._written = 0

    def update(self) -> position_sync_pb2.PositionUpdate:
        self._written += 1
        if self.direction == CUSTODIAN_TO_EXCHANGE:
            return position_sync_pb2.PositionUpdate(
                pledge_change=position_sync_pb2.PledgeChange(
                    account_id=f"acct-{self._written}",
                    asset_id="BTC",
                    pledged_quantity=amount_to_proto("1"),
                )
            )
        line = envelope_pb2.Envelope(
            payload=b"credit line %d" % self._written,
            payload_type="application/vnd.collateral-sync.v1.credit-line+proto",
        )
        return position_sync_pb2.PositionUpdate(credit_line=line)

    async def send(self, count: int) -> LogHead:
        """Append ``count`` entries and wait until the other side acknowledged them."""
        with self.log.transaction():
            head = self.log.append(self.update() for _ in range(count))
        async with asyncio.timeout(10):
            await self.session.wait_acknowledged(head.sequence)
        return head

    def statement(self) -> reconciliation_pb2.ReconciliationStatement:
        envelope = self.reconciliation.statement(cutoff_id_of(CUTOFF))
        return reconciliation_pb2.ReconciliationStatement.FromString(envelope.payload)


@pytest.fixture
def parties(tmp_path: Path) -> Iterator[tuple[Party, Party]]:
    custodian = Party(tmp_path / "custodian.sqlite", CUSTODIAN, Clock(CUTOFF - SECOND))
    exchange = Party(tmp_path / "exchange.sqlite", EXCHANGE, Clock(CUTOFF - SECOND))
    yield custodian, exchange
    custodian.storage.close()
    exchange.storage.close()


def _heads(statement: reconciliation_pb2.ReconciliationStatement) -> dict[int, LogHead]:
    return {h.direction: LogHead(h.sequence, h.entry_hash) for h in statement.sync_log_heads}


@pytest.mark.parametrize("built", ["as-the-clock-passes", "when-first-asked"])
def test_both_parties_state_the_heads_of_batches_issued_by_the_cutoff(
    parties: tuple[Party, Party], built: str
) -> None:
    custodian, exchange = parties

    async def scenario() -> None:
        to_custodian, to_exchange = Pipe(), Pipe()
        runs = [
            asyncio.create_task(exchange.session.run(to_custodian.send, to_exchange.frames())),
            asyncio.create_task(custodian.session.run(to_exchange.send, to_custodian.frames())),
        ]
        before = {
            CUSTODIAN_TO_EXCHANGE: await custodian.send(2),
            EXCHANGE_TO_CUSTODIAN: await exchange.send(3),
        }
        # The exchange's clock is ahead: its batch is issued after the cut-off and
        # stored by the custodian, whose clock has not reached it yet.
        exchange.clock.at = CUTOFF + SECOND / 2
        await exchange.send(2)
        custodian.clock.at = CUTOFF + SECOND
        if built == "as-the-clock-passes":
            assert custodian.reconciliation.run_due() == [cutoff_id_of(CUTOFF)]
            assert exchange.reconciliation.run_due() == [cutoff_id_of(CUTOFF)]
        # Entries after the cut-off, both ways, before the statements are asked for.
        after = await custodian.send(1)
        await exchange.send(1)
        assert custodian.log.received_head().sequence == 6
        assert exchange.log.received_head() == after

        ours, theirs = custodian.statement(), exchange.statement()
        assert _heads(ours) == _heads(theirs) == before
        assert compare_statements(ours, theirs).matched
        for queue in (to_custodian, to_exchange):
            await queue.queue.put(None)
        await asyncio.wait(runs)

    asyncio.run(scenario())
