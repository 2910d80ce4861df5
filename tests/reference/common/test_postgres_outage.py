"""A server whose PostgreSQL goes away: UNAVAILABLE and NOT_SERVING, then back to work.

The PostgreSQL here is one of the test's own (not the session's), so that
stopping it stops nobody else's servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from _postgres import PostgresServer, start_postgres
from collateral_sync.clients import CustodianClient
from collateral_sync.errors import RPCError
from collateral_sync.v1 import custodian_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, Parties, StartServer

ACCOUNT = "acct-outage"
#: How long health may take to follow the database (the watcher asks every second).
FOLLOW = 15.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def _until_health(channel: grpc.aio.Channel, status: int) -> None:
    async with asyncio.timeout(FOLLOW):
        while await _health(channel) != status:
            await asyncio.sleep(0.2)
    # Every service follows, not only the whole server.
    assert await _health(channel, "collateral_sync.v1.CustodianService") == status


def test_a_lost_database_turns_health_not_serving_refuses_unavailable_and_recovers(
    start_server: StartServer,
    reference_parties: Parties,
    own_postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    directory = tmp_path_factory.mktemp("outage")
    config = reference_parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        peers={EXCHANGE: None},
        custodian={
            "accounts": [{"account_id": ACCOUNT, "client_id": CLIENT, "holdings": {"USDC": "125"}}]
        },
    )
    config["storage"] = own_postgres.storage_config(str(directory / CUSTODIAN))
    server = start_server("custodian", config, name="outage-custodian")
    request = custodian_service_pb2.GetHoldingsStatementRequest(account_id=ACCOUNT)

    async def scenario() -> None:
        async with reference_parties.channel(server.address, CLIENT) as channel:
            custodian = CustodianClient(channel)
            before = await custodian.get_holdings_statement(request)
            assert await _health(channel) == _SERVING

            own_postgres.pg_ctl("stop", "-m", "fast", "-w")
            with pytest.raises(RPCError) as refused:
                await custodian.get_holdings_statement(request)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert refused.value.reason_name == "STORAGE_UNAVAILABLE"
            await _until_health(channel, _NOT_SERVING)

            own_postgres.start()
            await _until_health(channel, _SERVING)
            after = await custodian.get_holdings_statement(request)
            # The same signed statement: nothing was lost or re-issued in between.
            assert after.SerializeToString() == before.SerializeToString()

    asyncio.run(scenario())
