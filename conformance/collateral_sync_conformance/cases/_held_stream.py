"""The exchange's SyncPositions call, held by the kit as its custodian.

A ``sync/exchange/`` or ``reconciliation/`` case that must choose the frames an
exchange under test receives takes its stream from the kit's session: the kit
ends the exchange's call, the exchange dials again (§6.7), and the case holds
that call. :func:`held_stream` checks the exchange's hello, sends the kit's and
keeps heartbeats going, stamped by the case's clock, until the case gives the
stream back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE
from collateral_sync.v1 import position_sync_pb2

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import KitCustodian, RawStream
from collateral_sync_conformance._expect import CaseFailure, check, describe

__all__ = ["HEARTBEAT_SECONDS", "REDIAL_TIMEOUT", "WINDOW", "held_stream", "send_heartbeat"]

#: How long the exchange has to re-dial after the kit ends its call (§6.7 backoff).
REDIAL_TIMEOUT = 20.0
#: How often the kit sends a heartbeat on a stream it holds.
HEARTBEAT_SECONDS = 1.0
#: The window the kit declares on a stream it holds.
WINDOW = 64


@asynccontextmanager
async def held_stream(
    ctx: CaseContext,
    kit: KitCustodian,
    *,
    window: int = WINDOW,
    stamp: Callable[[], datetime] | None = None,
) -> AsyncIterator[RawStream]:
    """The exchange's next call, its hello checked and the kit's hello sent.

    Heartbeats go out every :data:`HEARTBEAT_SECONDS` (the exchange holds a
    silent stream dead after three intervals, §6.7), their ``sent_at`` from
    ``stamp`` (default: the kit's clock, which follows the exchange's).
    """
    await ctx.server_now()  # batches are signed on the exchange's clock
    async with kit.raw_stream(REDIAL_TIMEOUT) as stream:
        if stream is None:
            raise CaseFailure(
                f"the exchange did not re-dial the custodian within {REDIAL_TIMEOUT:.0f} s of "
                "the kit ending its call (§6.7: re-dial with backoff and resume)",
                expected="a new SyncPositions call",
                got="none",
            )
        first = stream.frames[0]
        check(
            first.WhichOneof("frame") == "hello",
            "the exchange's first frame on SyncPositions must be its hello (§6.2)",
            expected="a SyncFrame with hello",
            got=describe(first),
        )
        received = kit.sync_log.received_head()
        await stream.send(
            position_sync_pb2.SyncFrame(
                hello=position_sync_pb2.SyncHello(
                    party_id=kit.party_id,
                    sending_direction=CUSTODIAN_TO_EXCHANGE,  # type: ignore[arg-type]
                    received_sequence=received.sequence,
                    received_entry_hash=received.entry_hash,
                    sent_sequence=kit.sync_log.sent_head().sequence,
                    window=window,
                    heartbeat_interval_ms=int(HEARTBEAT_SECONDS * 1000),
                )
            )
        )
        beating = asyncio.create_task(_heartbeats(kit, stream, stamp or kit.now))
        try:
            yield stream
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating


async def send_heartbeat(kit: KitCustodian, stream: RawStream, sent_at: datetime) -> None:
    """One heartbeat of the kit's, stamped ``sent_at``."""
    beat = position_sync_pb2.SyncHeartbeat(sent_sequence=kit.sync_log.sent_head().sequence)
    beat.sent_at.FromDatetime(sent_at)
    await stream.send(position_sync_pb2.SyncFrame(heartbeat=beat))


async def _heartbeats(kit: KitCustodian, stream: RawStream, stamp: Callable[[], datetime]) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        await send_heartbeat(kit, stream, stamp())
