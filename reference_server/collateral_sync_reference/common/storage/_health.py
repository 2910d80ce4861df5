"""The server's health follows its database: NOT_SERVING while PostgreSQL cannot be reached.

A SQLite file is part of the server; a PostgreSQL server is not, and may go
away (a restart, a failover, a network cut). While it is away every call that
needs it is refused UNAVAILABLE (``STORAGE_UNAVAILABLE``, nothing written), and
health says NOT_SERVING so that load balancers and counterparties stop sending;
once it answers again health returns to SERVING. The database is asked a
trivial question every ``interval``, from a thread: a hung connection never
stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

import grpc.aio
from collateral_sync.server import service_names, set_service_status
from grpc_health.v1 import health, health_pb2

from collateral_sync_reference.common.storage._lease import PostgresLease
from collateral_sync_reference.common.storage._postgres import PostgresStorage

__all__ = ["LOST_LEASE_EXIT", "watch_database"]

#: Exit code of a server that lost its lease (a supervisor restarts it, as a standby).
LOST_LEASE_EXIT = 3

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def watch_database(
    storage: PostgresStorage,
    server: grpc.aio.Server,
    logger: logging.Logger,
    *,
    lease: PostgresLease | None = None,
    on_lost: Callable[[int, str], None] | None = None,
    interval: timedelta = timedelta(seconds=1),
) -> None:
    """Until cancelled: set every service's health from whether ``storage`` answers.

    With a ``lease``: once its connection ended, health is NOT_SERVING (the
    fence refuses every write meanwhile) until the lease is taken back with
    nobody else having held it; if another server did, ``on_lost(3, why)``
    stops this one, which must not serve from a past it no longer owns.
    """
    seconds = interval.total_seconds()
    serving = True

    async def set_all(status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in (*service_names(server), health.OVERALL_HEALTH):
            await set_service_status(server, name, status)

    while True:
        await asyncio.sleep(seconds)
        if lease is not None and not await asyncio.to_thread(lease.still_held):
            if serving:
                serving = False
                logger.error("lost the database's lease: NOT_SERVING, writes refused")
                await set_all(_NOT_SERVING)
            taken = await asyncio.to_thread(lease.take_back)
            if taken is None:
                continue
            if not taken:
                logger.error("another server held the database's lease meanwhile: stopping")
                if on_lost is not None:
                    on_lost(LOST_LEASE_EXIT, "another server held the database's lease")
                return
            storage.fence(lease)
            logger.warning("took the database's lease back (nobody else held it)")
        try:
            reachable = await asyncio.wait_for(
                asyncio.to_thread(storage.reachable, seconds * 2), seconds * 3
            )
        except TimeoutError:
            reachable = False
        if reachable == serving:
            continue
        serving = reachable
        if serving:
            logger.warning("database reachable again: health SERVING")
        else:
            logger.error("database unreachable: health NOT_SERVING, calls refused UNAVAILABLE")
        await set_all(_SERVING if serving else _NOT_SERVING)
