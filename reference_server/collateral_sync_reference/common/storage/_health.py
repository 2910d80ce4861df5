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
from datetime import timedelta

import grpc.aio
from collateral_sync.server import service_names, set_service_status
from grpc_health.v1 import health, health_pb2

from collateral_sync_reference.common.storage._postgres import PostgresStorage

__all__ = ["watch_database"]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def watch_database(
    storage: PostgresStorage,
    server: grpc.aio.Server,
    logger: logging.Logger,
    *,
    interval: timedelta = timedelta(seconds=1),
) -> None:
    """Until cancelled: set every service's health from whether ``storage`` answers."""
    seconds = interval.total_seconds()
    serving = True
    while True:
        await asyncio.sleep(seconds)
        try:
            reachable = await asyncio.wait_for(
                asyncio.to_thread(storage.reachable, seconds * 2), seconds * 3
            )
        except TimeoutError:
            reachable = False
        if reachable == serving:
            continue
        serving = reachable
        status = _SERVING if serving else _NOT_SERVING
        if serving:
            logger.warning("database reachable again: health SERVING")
        else:
            logger.error("database unreachable: health NOT_SERVING, calls refused UNAVAILABLE")
        for name in (*service_names(server), health.OVERALL_HEALTH):
            await set_service_status(server, name, status)
