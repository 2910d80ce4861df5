"""Two custodian processes on one PostgreSQL: one active, one standby; SIGKILL and take-over.

Both run the same configuration. The first takes the database's lease and
serves; the second prints ``STANDBY`` and answers health NOT_SERVING. The
exchange reaches "the custodian" through a forwarder, as it would through a
load balancer that sends traffic to whichever custodian reports SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from _postgres import PostgresServer
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE
from collateral_sync_reference.common.storage._health import LOST_LEASE_EXIT
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, Parties, ServerProcess, StartServer
from .test_crash_recovery import (
    TARGET,
    applied_sequences,
    caught_mid_stream,
    custodian_config,
    exchange_config,
    generate,
    heads,
    pledge_every_account,
    received_ranges,
    settled,
    tiles,
    until,
)

ACCOUNTS = 60
#: The standby must serve within this long of the active one's death (issue 14).
TAKEOVER = 5.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Forwarder:
    """A TCP forwarder to one backend at a time: what a health-checking load balancer does."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def health(parties: Parties, address: str) -> int:
    async with parties.channel(address, CLIENT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(response.status)


def _custodians(
    parties: Parties,
    start_server: StartServer,
    postgres: PostgresServer,
    directory_name: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ServerProcess, ServerProcess, list[str], Path]:
    """An active custodian and a standby on one database, and the configuration they share."""
    directory = tmp_path_factory.mktemp(directory_name)
    account_ids = [f"acct-{i:03d}" for i in range(ACCOUNTS)]
    config = custodian_config(parties, directory, account_ids)
    config["storage"] = postgres.storage_config(str(directory / CUSTODIAN))
    active = start_server("custodian", config, name=f"{directory_name}-a")
    standby = start_server("custodian", config, name=f"{directory_name}-b", standby=True)
    assert not active.standby
    assert standby.standby
    return active, standby, account_ids, directory


@pytest.mark.slow
def test_the_standby_takes_over_a_killed_custodian_mid_sync_and_nothing_is_lost(
    reference_parties: Parties,
    start_server: StartServer,
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    active, standby, account_ids, directory = _custodians(
        parties, start_server, postgres, "failover", tmp_path_factory
    )

    async def scenario() -> float:
        forwarder = Forwarder(active.address)
        address = await forwarder.start()
        try:
            assert await health(parties, active.address) == _SERVING
            assert await health(parties, standby.address) == _NOT_SERVING
            exchange = await asyncio.to_thread(
                start_server,
                "exchange",
                exchange_config(parties, directory, address),
                name="failover-exchange",
            )
            exchange_db = parties.storage(directory, EXCHANGE)
            return await _run(
                parties, address, forwarder, active, standby, exchange, account_ids, exchange_db
            )
        finally:
            await forwarder.close()

    takeover = asyncio.run(scenario())
    print(f"standby serving {takeover:.2f} s after SIGKILL of the active custodian")
    assert takeover < TAKEOVER, f"the standby took {takeover:.2f} s to serve"


async def _run(
    parties: Parties,
    address: str,
    forwarder: Forwarder,
    active: ServerProcess,
    standby: ServerProcess,
    exchange: ServerProcess,
    account_ids: list[str],
    exchange_db: dict[str, Any],
) -> float:
    async with contextlib.AsyncExitStack() as stack:
        to_custodian = await stack.enter_async_context(parties.channel(address, CLIENT))
        custodian_control = TestControlClient(to_custodian)
        to_exchange = await stack.enter_async_context(parties.channel(exchange.address, CUSTODIAN))
        exchange_control = TestControlClient(to_exchange)
        await pledge_every_account(parties, CustodianClient(to_custodian), account_ids)
        custodian_back, stop = asyncio.Event(), asyncio.Event()
        custodian_back.set()
        generator = asyncio.create_task(generate(custodian_control, custodian_back, stop))
        try:
            await caught_mid_stream(custodian_control, exchange_control, at_least=600)
            custodian_back.clear()
            killed = time.monotonic()
            await asyncio.to_thread(active.kill)
            await asyncio.to_thread(standby.wait_active, 30.0)
            takeover = time.monotonic() - killed
            forwarder.target = standby.address
            custodian_back.set()
            await until(
                lambda: _at_least(custodian_control, TARGET // 2),
                f"the new active custodian past {TARGET // 2} entries",
            )
            stop.set()
            async with asyncio.timeout(30):
                await generator
        finally:
            generator.cancel()
            await asyncio.gather(generator, return_exceptions=True)

        c, e = await settled(custodian_control, exchange_control, exchange_db)
        sent = c[CUSTODIAN_TO_EXCHANGE].sequence
        # Nothing lost, nothing applied twice: the exchange applied 1..sent once each.
        assert e[CUSTODIAN_TO_EXCHANGE].applied_count == sent
        assert applied_sequences(exchange_db) == list(range(1, sent + 1))
        assert tiles(received_ranges(exchange_db, CUSTODIAN_TO_EXCHANGE), sent)
        assert await health(parties, standby.address) == _SERVING
        return takeover


async def _at_least(control: TestControlClient, sequence: int) -> bool:
    try:
        return (await heads(control))[CUSTODIAN_TO_EXCHANGE].sequence >= sequence
    except Exception:  # noqa: BLE001  # the channel is reconnecting through the forwarder
        return False


def test_killing_the_standby_leaves_the_active_custodian_alone(
    reference_parties: Parties,
    start_server: StartServer,
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    active, standby, account_ids, _ = _custodians(
        parties, start_server, postgres, "standby-killed", tmp_path_factory
    )

    async def scenario() -> None:
        async with parties.channel(active.address, CLIENT) as channel:
            control = TestControlClient(channel)
            before = (await heads(control))[CUSTODIAN_TO_EXCHANGE].sequence
            await asyncio.to_thread(standby.kill)
            await asyncio.sleep(2.5)  # two of the active server's lease checks
            assert await health(parties, active.address) == _SERVING
            # It still writes: a pledge and its path are two new entries on its log.
            await pledge_every_account(parties, CustodianClient(channel), account_ids[:1])
            after = (await heads(control))[CUSTODIAN_TO_EXCHANGE].sequence
            assert after == before + 2
        assert active.process is not None
        assert active.process.poll() is None

    asyncio.run(scenario())


def test_a_custodian_that_loses_its_lease_writes_nothing_more_and_stops(
    reference_parties: Parties,
    start_server: StartServer,
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Split brain averted: the active process is paused (a VM or GC stall) while its
    lease connection is cut, and the standby takes over. Resumed, the old active writes
    nothing (the fence refuses it: its lease is gone) and stops with exit code 3, since
    another server has held the lease since."""
    parties = reference_parties
    active, standby, account_ids, directory = _custodians(
        parties, start_server, postgres, "lease-lost", tmp_path_factory
    )
    database = postgres.database(str(directory / CUSTODIAN))
    assert active.process is not None

    async def scenario() -> None:
        async with parties.channel(active.address, CLIENT) as channel:
            control = TestControlClient(channel)
            before = (await heads(control))[CUSTODIAN_TO_EXCHANGE].sequence
            # Paused, it cannot take its lease back before the standby does.
            active.process.send_signal(signal.SIGSTOP)
            try:
                with postgres.connect() as admin:
                    cut = admin.execute(
                        "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a "
                        "JOIN pg_locks l ON l.pid = a.pid WHERE a.datname = %s "
                        "AND a.application_name = 'collateral-sync lease' "
                        "AND l.locktype = 'advisory' AND l.granted",
                        (database,),
                    ).fetchall()
                assert len(cut) == 1  # the active one's lease connection
                await asyncio.to_thread(standby.wait_active, 30.0)
            finally:
                active.process.send_signal(signal.SIGCONT)
            # It has not noticed yet: whatever it is asked, it writes nothing.
            with contextlib.suppress(RPCError):
                await pledge_every_account(parties, CustodianClient(channel), account_ids[:1])
        async with parties.channel(standby.address, CLIENT) as channel:
            after = (await heads(TestControlClient(channel)))[CUSTODIAN_TO_EXCHANGE].sequence
        assert after == before
        assert active.process is not None
        assert await asyncio.to_thread(active.process.wait, 15) == LOST_LEASE_EXIT

    asyncio.run(scenario())
