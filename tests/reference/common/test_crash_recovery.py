"""SIGKILL of either reference server in the middle of a sync of thousands of updates.

The reference custodian and exchange run as real processes over mutual TLS,
both in test mode. The custodian's accounts are pledged to the exchange, then
the custodian's daily yield accrual is run again and again
(``TestControlService.AccrueYield``: one transaction that attests every
account and announces a holdings change and a yield accrual for each), so
thousands of updates flow custodian -> exchange while the exchange answers
with credit lines exchange -> custodian. In the middle of it the exchange is
killed with SIGKILL and restarted; later the custodian is killed and restarted
on the same port, while it is still generating.

After each kill the dead party's database is opened: every entry its peer had
seen acknowledged is in it, with the peer's hash at its head (nothing
acknowledged was lost), the exchange had applied exactly what it stored, and
everything the peer holds of the dead party's own log is in that log (the
sender lost nothing either). The generator pauses while many entries are
unacknowledged, so the log keeps flowing without running away while the
exchange is down. At the end both servers report
identical heads in both directions, everything acknowledged; the exchange
applied each custodian entry exactly once (every sequence 1..N appears once
in its tables), and on both sides the stored batches tile the received log
without overlap.

Every wait polls with a deadline: there is no event to await across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from _postgres import open_database
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.signing import sign_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN
from collateral_sync.v1 import (
    custodian_service_pb2,
    liquidation_pb2,
    test_control_pb2,
)
from google.protobuf import duration_pb2

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, Parties, ServerProcess, StartServer

#: A server's ``storage`` config section: where its database is, on either engine.
Storage = dict[str, Any]

_T = TypeVar("_T")

ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
ACCOUNTS = 120
#: Custodian -> exchange entries to produce in all (each accrual adds 2 per account).
TARGET = 6_000
#: The generator pauses while this many entries are unacknowledged.
BACKLOG = 1_000
#: Small batches and a small window keep the stream busy long enough to be caught mid-way.
SYNC = {"batch_size": 100, "window": 300, "heartbeat_interval_ms": 1000}
POLL = 0.02
WAIT = 30.0


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until it holds; fail saying ``what`` did not happen in time."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(POLL)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


Heads = dict[int, test_control_pb2.SyncDirectionState]


async def heads(control: TestControlClient) -> Heads:
    """Both directions of the one peer's sync logs, by direction."""
    state = await control.get_sync_state(test_control_pb2.GetSyncStateRequest(), timeout=5)
    return {int(d.direction): d for d in state.directions}


# --- the servers' databases -------------------------------------------------------------


@contextlib.contextmanager
def database(storage: Storage, *, live: bool) -> Any:
    """A running server's database read-only, or a dead one's opened as its restart would."""
    with open_database(storage, read_only=live) as connection:
        yield connection


def received_head(path: Storage, direction: int, *, live: bool) -> tuple[int, bytes]:
    with database(path, live=live) as db:
        row = db.execute(
            "SELECT last_sequence, last_entry_hash FROM sync_received_batches "
            "WHERE direction = ? ORDER BY last_sequence DESC LIMIT 1",
            (direction,),
        ).fetchone()
    return (0, bytes(32)) if row is None else (int(row[0]), bytes(row[1]))


def outgoing_hash(path: Storage, direction: int, sequence: int, *, live: bool) -> bytes | None:
    if sequence == 0:
        return bytes(32)
    with database(path, live=live) as db:
        row = db.execute(
            "SELECT entry_hash FROM sync_outgoing WHERE direction = ? AND sequence = ?",
            (direction, sequence),
        ).fetchone()
    return None if row is None else bytes(row[0])


def received_ranges(path: Storage, direction: int) -> list[tuple[int, int]]:
    """(first new sequence, last sequence) of each stored batch, in order."""
    with database(path, live=True) as db:
        rows = db.execute(
            "SELECT first_sequence, last_sequence FROM sync_received_batches "
            "WHERE direction = ? ORDER BY last_sequence",
            (direction,),
        ).fetchall()
    return [(int(first), int(last)) for first, last in rows]


def tiles(ranges: list[tuple[int, int]], head: int) -> bool:
    """Whether the ranges cover 1..head exactly once, in order."""
    expected = 1
    for first, last in ranges:
        if first != expected or last < first:
            return False
        expected = last + 1
    return expected == head + 1


# --- the test -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_either_server_mid_sync_loses_nothing_and_applies_nothing_twice(
    reference_parties: Parties,
    start_server: StartServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    directory = tmp_path_factory.mktemp("crash")
    account_ids = [f"acct-{i:03d}" for i in range(ACCOUNTS)]
    custodian = start_server(
        "custodian", custodian_config(parties, directory, account_ids), name="crash-custodian"
    )
    # A restarted custodian must come back where the exchange dials it.
    custodian.extra_args = ("--listen", custodian.address)
    exchange = start_server(
        "exchange",
        exchange_config(parties, directory, custodian.address),
        name="crash-exchange",
    )
    custodian_db = parties.storage(directory, CUSTODIAN)
    exchange_db = parties.storage(directory, EXCHANGE)

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            to_custodian = await stack.enter_async_context(
                parties.channel(custodian.address, CLIENT)
            )
            custodian_control = TestControlClient(to_custodian)
            exchange_control = await reconnect_exchange(stack, parties, exchange)

            await pledge_every_account(parties, CustodianClient(to_custodian), account_ids)
            custodian_back, stop = asyncio.Event(), asyncio.Event()
            custodian_back.set()
            generator = asyncio.create_task(generate(custodian_control, custodian_back, stop))
            try:
                # 1. SIGKILL the exchange while updates are flowing to it.
                await caught_mid_stream(custodian_control, exchange_control, at_least=1_000)
                await asyncio.to_thread(exchange.kill)
                durable = check_nothing_acknowledged_lost(
                    receiver_db=exchange_db,
                    sender_db=custodian_db,
                    direction=CUSTODIAN_TO_EXCHANGE,
                    acknowledged=(await heads(custodian_control))[
                        CUSTODIAN_TO_EXCHANGE
                    ].acknowledged_sequence,
                    receiver_live=False,
                    sender_live=True,
                )
                # What it stored it had applied, in the same transactions, each entry once.
                assert applied_sequences(exchange_db, live=False) == list(range(1, durable + 1))
                check_sender_kept_what_receiver_holds(
                    sender_db=exchange_db,
                    receiver=(await heads(custodian_control))[EXCHANGE_TO_CUSTODIAN],
                    direction=EXCHANGE_TO_CUSTODIAN,
                    sender_live=False,
                )
                await asyncio.to_thread(exchange.start)
                exchange_control = await reconnect_exchange(stack, parties, exchange)

                # 2. Later, SIGKILL the custodian while it is still sending (and generating).
                await caught_mid_stream(custodian_control, exchange_control, at_least=2_500)
                await until(
                    lambda: _is(
                        heads(exchange_control),
                        lambda h: h[EXCHANGE_TO_CUSTODIAN].acknowledged_sequence > 0,
                    ),
                    "the custodian acknowledged some of the exchange's log",
                )
                custodian_back.clear()
                await asyncio.to_thread(custodian.kill)
                check_nothing_acknowledged_lost(
                    receiver_db=custodian_db,
                    sender_db=exchange_db,
                    direction=EXCHANGE_TO_CUSTODIAN,
                    acknowledged=(await heads(exchange_control))[
                        EXCHANGE_TO_CUSTODIAN
                    ].acknowledged_sequence,
                    receiver_live=False,
                    sender_live=True,
                )
                check_sender_kept_what_receiver_holds(
                    sender_db=custodian_db,
                    receiver=(await heads(exchange_control))[CUSTODIAN_TO_EXCHANGE],
                    direction=CUSTODIAN_TO_EXCHANGE,
                    sender_live=False,
                )
                await asyncio.to_thread(custodian.start)
                custodian_back.set()
                await until(
                    lambda: _is(
                        heads(custodian_control),
                        lambda h: h[CUSTODIAN_TO_EXCHANGE].sequence >= TARGET,
                    ),
                    f"the restarted custodian past {TARGET} entries",
                )
                stop.set()
                async with asyncio.timeout(WAIT):
                    await generator
            finally:
                generator.cancel()
                await asyncio.gather(generator, return_exceptions=True)

            # 3. Everything settles: identical heads both ways, everything acknowledged.
            c, e = await settled(custodian_control, exchange_control, exchange_db)
            sent = c[CUSTODIAN_TO_EXCHANGE].sequence
            assert sent >= TARGET
            # Nothing lost, nothing applied twice: the exchange applied 1..sent once each.
            assert e[CUSTODIAN_TO_EXCHANGE].applied_count == sent
            assert applied_sequences(exchange_db) == list(range(1, sent + 1))
            assert c[EXCHANGE_TO_CUSTODIAN].applied_count == e[EXCHANGE_TO_CUSTODIAN].sequence > 0
            assert tiles(received_ranges(exchange_db, CUSTODIAN_TO_EXCHANGE), sent)
            assert tiles(
                received_ranges(custodian_db, EXCHANGE_TO_CUSTODIAN),
                c[EXCHANGE_TO_CUSTODIAN].sequence,
            )
            # Every pledge told the exchange its account's pre-authorised liquidation path.
            with database(exchange_db, live=True) as db:
                paths = db.execute(
                    "SELECT account_id, liquidation_path_id FROM exchange_liquidation_paths"
                ).fetchall()
            assert sorted(paths) == [(a, f"path-{a}") for a in account_ids]
            # Each stored head is the sender's own entry at that sequence.
            assert (
                outgoing_hash(custodian_db, CUSTODIAN_TO_EXCHANGE, sent, live=True)
                == (received_head(exchange_db, CUSTODIAN_TO_EXCHANGE, live=True)[1])
            )

    run(scenario())


# --- steps ------------------------------------------------------------------------------------


def custodian_config(parties: Parties, directory: Path, account_ids: list[str]) -> dict[str, Any]:
    """A custodian of ``account_ids`` (1,000,000 BENJI each, client CLIENT) for one exchange."""
    return parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        peers={EXCHANGE: None},
        sync=SYNC,
        custodian={
            "accounts": [
                {"account_id": a, "client_id": CLIENT, "holdings": {"BENJI": "1000000"}}
                for a in account_ids
            ]
        },
    )


def exchange_config(parties: Parties, directory: Path, custodian_address: str) -> dict[str, Any]:
    """The exchange of those accounts, dialing the custodian at ``custodian_address``."""
    return parties.config(
        EXCHANGE,
        "exchange",
        directory,
        peers={CUSTODIAN: custodian_address},
        sync=SYNC,
        exchange={"log_origin": ORIGIN, "prices": [{"asset_id": "BENJI", "price": "1"}]},
    )


async def settled(
    custodian: TestControlClient, exchange: TestControlClient, exchange_db: Storage
) -> tuple[Heads, Heads]:
    """Both sides' heads once both logs are equal, acknowledged and every statement decided."""
    final: dict[str, Heads] = {}

    async def done() -> bool:
        c, e = await heads(custodian), await heads(exchange)
        final["custodian"], final["exchange"] = c, e
        return (
            all(
                (c[d].sequence, c[d].entry_hash) == (e[d].sequence, e[d].entry_hash)
                for d in (CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN)
            )
            and c[CUSTODIAN_TO_EXCHANGE].acknowledged_sequence == c[CUSTODIAN_TO_EXCHANGE].sequence
            and e[EXCHANGE_TO_CUSTODIAN].acknowledged_sequence == e[EXCHANGE_TO_CUSTODIAN].sequence
            and not pending_holdings(exchange_db)
        )

    await until(done, "both logs fully received and acknowledged on both sides")
    return final["custodian"], final["exchange"]


def pledge_request(
    parties: Parties,
    account_id: str,
    *,
    sequence: int,
    now: datetime,
    quantity: str = "500000",
) -> custodian_service_pb2.PledgeCollateralRequest:
    """CLIENT pledges ``quantity`` BENJI of ``account_id`` to EXCHANGE, with its path."""
    client = parties.keys[CLIENT]
    path = sign_statement(
        liquidation_pb2.LiquidationPath(
            account_id=account_id,
            exchange_id=EXCHANGE,
            proceeds_account_id=f"{EXCHANGE}/settlement",
            steps=[
                liquidation_pb2.LiquidationStep(
                    asset_id="BENJI",
                    venue="fund-redemption",
                    max_quantity=amount_to_proto(quantity),
                )
            ],
        ),
        client,
        audience=[CUSTODIAN],
        sequence=sequence,
        ttl=timedelta(hours=1),
        issued_at=now,
        statement_id=f"path-{account_id}",
    )
    instruction = sign_statement(
        custodian_service_pb2.PledgeInstruction(
            account_id=account_id,
            exchange_id=EXCHANGE,
            asset_id="BENJI",
            quantity=amount_to_proto(quantity),
        ),
        client,
        audience=[CUSTODIAN],
        sequence=sequence,
        ttl=timedelta(hours=1),
        issued_at=now,
    )
    return custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=instruction, liquidation_path=path
    )


async def reconnect_exchange(
    stack: contextlib.AsyncExitStack, parties: Parties, exchange: ServerProcess
) -> TestControlClient:
    """A test-control client of the exchange at its current address (it changes on restart)."""
    channel = await stack.enter_async_context(parties.channel(exchange.address, CUSTODIAN))
    return TestControlClient(channel)


async def pledge_every_account(
    parties: Parties,
    custodian: CustodianClient,
    account_ids: list[str],
    *,
    first_sequence: int = 1,
) -> None:
    """Each account pledges half its BENJI, with its path: 2 updates each on the stream.

    One at a time: the client's statements must arrive in sequence order (the
    client's first statements carry ``first_sequence``).
    """
    control = TestControlClient(custodian.channel)
    now = (
        await control.advance_clock(
            test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
        )
    ).now.ToDatetime(tzinfo=UTC)
    for sequence, account_id in enumerate(account_ids, start=first_sequence):
        await custodian.pledge_collateral(
            pledge_request(parties, account_id, sequence=sequence, now=now)
        )


async def generate(
    control: TestControlClient, custodian_back: asyncio.Event, stop: asyncio.Event
) -> None:
    """Accrue yield again and again until ``stop``, keeping at most BACKLOG entries unacknowledged.

    The bound keeps the stream busy without letting the log run away while
    the exchange is down. While the custodian is down (killed, not yet
    restarted) the calls fail; the generator waits for it and goes on.
    """
    while not stop.is_set():
        try:
            state = (await heads(control))[CUSTODIAN_TO_EXCHANGE]
            if state.sequence - state.acknowledged_sequence < BACKLOG:
                await control.accrue_yield(test_control_pb2.AccrueYieldRequest(), timeout=10)
            else:
                await asyncio.sleep(POLL)  # wait for the exchange to catch up
        except RPCError as err:
            if err.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if custodian_back.is_set():
                await asyncio.sleep(POLL)  # restarted; the channel reconnects
            else:
                await custodian_back.wait()


async def caught_mid_stream(
    custodian: TestControlClient, exchange: TestControlClient, *, at_least: int
) -> None:
    """Wait until the exchange holds ``at_least`` entries and more are still on their way."""

    async def flowing() -> bool:
        try:
            received = (await heads(exchange))[CUSTODIAN_TO_EXCHANGE].sequence
            sent = (await heads(custodian))[CUSTODIAN_TO_EXCHANGE].sequence
        except RPCError:
            return False  # a server just restarted; ask again
        return received >= at_least and sent - received >= 100

    await until(flowing, f"the exchange past {at_least} entries with more still coming")


def check_nothing_acknowledged_lost(
    *,
    receiver_db: Storage,
    sender_db: Storage,
    direction: int,
    acknowledged: int,
    receiver_live: bool,
    sender_live: bool,
) -> int:
    """The dead receiver durably holds everything its sender saw acknowledged, as sent.

    Returns the receiver's durable head. Its hash is the sender's at that
    sequence, and the hash chain makes that true of every entry before it.
    """
    sequence, entry_hash = received_head(receiver_db, direction, live=receiver_live)
    assert acknowledged > 0
    assert sequence >= acknowledged, (sequence, acknowledged)
    assert outgoing_hash(sender_db, direction, sequence, live=sender_live) == entry_hash
    return sequence


def check_sender_kept_what_receiver_holds(
    *,
    sender_db: Storage,
    receiver: test_control_pb2.SyncDirectionState,
    direction: int,
    sender_live: bool,
) -> None:
    """The dead sender's log holds every entry its peer received from it, with the same hash."""
    assert outgoing_hash(sender_db, direction, receiver.sequence, live=sender_live) == bytes(
        receiver.entry_hash
    )


def pending_holdings(path: Storage) -> int:
    with database(path, live=True) as db:
        row = db.execute("SELECT COUNT(*) FROM exchange_holdings WHERE status = 'pending'")
        return int(row.fetchone()[0])


def applied_sequences(path: Storage, *, live: bool = True) -> list[int]:
    """Every custodian sync sequence the exchange's tables hold an update of, with repeats."""
    with database(path, live=live) as db:
        rows = db.execute(
            "SELECT sync_sequence FROM exchange_holdings UNION ALL "
            "SELECT sync_sequence FROM exchange_pledge_changes UNION ALL "
            "SELECT sync_sequence FROM exchange_yield_accruals ORDER BY 1"
        ).fetchall()
    return [int(row[0]) for row in rows]


async def _is(value: Coroutine[Any, Any, _T], predicate: Callable[[_T], bool]) -> bool:
    try:
        return predicate(await value)
    except RPCError:
        return False
