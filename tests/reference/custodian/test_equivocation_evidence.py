"""The custodian keeps an exchange's equivocation in its own store and serves it to regulators.

PROTOCOL.md §10.7, from the custodian's side: an exchange that gives one
sequence of its log two signed entries is refused (§6.5), and both signed
batches are kept by the custodian, survive its restart, and are listed by
``ListEquivocationEvidence`` to a regulator — not to the accused exchange.
The exchange is played here frame by frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest
from collateral_sync.clients import CustodianClient, ReconciliationClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.signing import sign_statement
from collateral_sync.sync import EXCHANGE_TO_CUSTODIAN, ZERO_HASH, entry_hash
from collateral_sync.v1 import (
    custodian_service_pb2,
    envelope_pb2,
    equivocation_pb2,
    position_sync_pb2,
    reconciliation_service_pb2,
    test_control_pb2,
    valuation_pb2,
)
from google.protobuf import duration_pb2

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, REGULATOR, Parties, StartServer

_K = equivocation_pb2.EquivocationKind


async def _server_now(channel: grpc.aio.Channel) -> datetime:
    response = await TestControlClient(channel).advance_clock(
        test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration(seconds=0))
    )
    return response.now.ToDatetime(tzinfo=UTC)


def _batch(parties: Parties, now: datetime, account_id: str) -> envelope_pb2.Envelope:
    """Entry 1 of the exchange's log, a credit line for ``account_id``, in a signed batch."""
    credit_line = sign_statement(
        valuation_pb2.CreditLine(account_id=account_id, risk_policy_version=1),
        parties.keys[EXCHANGE],
        audience=[CUSTODIAN],
        sequence=int(now.timestamp() * 1000),
        ttl=timedelta(hours=1),
        issued_at=now,
    )
    update = position_sync_pb2.PositionUpdate(credit_line=credit_line).SerializeToString()
    batch = position_sync_pb2.SyncBatch(direction=EXCHANGE_TO_CUSTODIAN)  # type: ignore[arg-type]
    batch.entries.add(
        sequence=1,
        prev_entry_hash=ZERO_HASH,
        update=update,
        entry_hash=entry_hash(EXCHANGE_TO_CUSTODIAN, 1, ZERO_HASH, update),
    )
    return sign_statement(
        batch,
        parties.keys[EXCHANGE],
        audience=[CUSTODIAN],
        sequence=1,
        ttl=timedelta(minutes=5),
        issued_at=now,
    )


async def _send(channel: grpc.aio.Channel, batch: envelope_pb2.Envelope) -> list[str]:
    """Say hello as the exchange, send ``batch``; the kinds of frame the custodian answers.

    Ends at the custodian's ack (the batch is stored) or when it ends the call.
    """

    async def frames() -> AsyncIterator[custodian_service_pb2.SyncPositionsRequest]:
        hello = position_sync_pb2.SyncHello(
            party_id=EXCHANGE,
            sending_direction=EXCHANGE_TO_CUSTODIAN,  # type: ignore[arg-type]
            received_sequence=0,
            received_entry_hash=ZERO_HASH,
            sent_sequence=1,
            window=64,
            heartbeat_interval_ms=1000,
        )
        for frame in (
            position_sync_pb2.SyncFrame(hello=hello),
            position_sync_pb2.SyncFrame(batch=batch),
        ):
            yield custodian_service_pb2.SyncPositionsRequest(frame=frame)
        await asyncio.sleep(30)  # keep our side open until the custodian answers

    seen: list[str] = []
    call = CustodianClient(channel).sync_positions(frames(), timeout=20)
    async for response in call:
        kind = str(response.frame.WhichOneof("frame"))
        seen.append(kind)
        if kind == "ack":
            call.cancel()
            break
    return seen


def test_an_exchange_equivocation_is_kept_across_a_restart_and_listed_to_regulators_only(
    start_server: StartServer, reference_parties: Parties, tmp_path: Path
) -> None:
    parties = reference_parties
    config = parties.config(
        CUSTODIAN,
        "custodian",
        tmp_path,
        peers={EXCHANGE: None},
        custodian={"accounts": [{"account_id": "acct-e", "client_id": CLIENT, "holdings": {}}]},
    )
    server = start_server("custodian", config, name="custodian-evidence")

    async def scenario(address: str) -> tuple[envelope_pb2.Envelope, envelope_pb2.Envelope]:
        async with parties.channel(address, EXCHANGE) as channel:
            now = await _server_now(channel)
            first = _batch(parties, now, "acct-first")
            second = _batch(parties, now + timedelta(seconds=1), "acct-second")
            assert "ack" in await _send(channel, first)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _send(channel, second)
            assert caught.value.code() == grpc.StatusCode.ABORTED
            assert "equivocation" in str(caught.value.details())
        return first, second

    first, second = asyncio.run(scenario(server.address))

    async def listed(address: str) -> list[equivocation_pb2.EquivocationEvidence]:
        async with (
            parties.channel(address, REGULATOR) as channel,
            parties.channel(address, EXCHANGE) as accused,
        ):
            response = await ReconciliationClient(channel).list_equivocation_evidence(
                reconciliation_service_pb2.ListEquivocationEvidenceRequest()
            )
            with pytest.raises(RPCError) as refused:
                await ReconciliationClient(accused).list_equivocation_evidence(
                    reconciliation_service_pb2.ListEquivocationEvidenceRequest()
                )
            assert (refused.value.code, refused.value.reason_name) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "KEY_ROLE_MISMATCH",
            )
            assert refused.value.metadata["field"] == "caller"
            return list(response.evidence)

    before = asyncio.run(listed(server.address))
    [evidence] = before
    assert (evidence.accused_party_id, evidence.kind) == (EXCHANGE, _K.EQUIVOCATION_KIND_SYNC_BATCH)
    assert (evidence.direction, evidence.sequence) == (EXCHANGE_TO_CUSTODIAN, 1)
    assert (evidence.first, evidence.second) == (first, second)
    entries = [
        position_sync_pb2.SyncBatch.FromString(e.payload).entries[0] for e in (first, second)
    ]
    assert (evidence.first_hash, evidence.second_hash) == tuple(e.entry_hash for e in entries)
    assert evidence.detected_at.ToDatetime(tzinfo=UTC) <= datetime.now(UTC) + timedelta(days=1)

    address = server.restart()
    assert asyncio.run(listed(address)) == before
