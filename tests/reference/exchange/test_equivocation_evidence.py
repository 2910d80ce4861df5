"""The exchange keeps the custodian's equivocations in its own store and serves them to regulators.

PROTOCOL.md §10.7: a fork of the custodian's log (two checkpoints of one size,
two roots), a checkpoint whose consistency proof from the trusted one fails,
and two signed sync batches giving one sequence two entries are kept by the
exchange that caught them, survive its restart, and are listed by
``ListEquivocationEvidence`` — to a regulator, and to nobody else (not even
the accused custodian). The custodian is the scripted one of
:mod:`.test_exchange`, taught here to equivocate on the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.clients import ReconciliationClient
from collateral_sync.errors import RPCError
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, entry_hash, serve_sync_stream
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    equivocation_pb2,
    errors_pb2,
    position_sync_pb2,
    reconciliation_service_pb2,
    test_control_pb2,
)

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, REGULATOR, STRANGER, Parties, StartServer
from .test_exchange import ORIGIN, SMALL, WAIT, FakeCustodian, World, decided, run, world

_K = equivocation_pb2.EquivocationKind


class EquivocatingCustodian(FakeCustodian):
    """The scripted custodian, which on the exchange's next call contradicts its own log.

    With :attr:`equivocate` set, the next ``SyncPositions`` call is answered by
    hand: the custodian's hello, then a signed batch giving the last sequence
    the exchange holds another entry. The batch is kept in :attr:`forged`.
    """

    def __init__(self, directory: Path, parties: Parties) -> None:
        super().__init__(directory, parties)
        self.equivocate = False
        self.forged: envelope_pb2.Envelope | None = None
        self.closed: position_sync_pb2.SyncClose | None = None
        #: Set once the exchange's SyncClose arrived (it may trail the evidence it keeps).
        self.close_received = asyncio.Event()

    async def SyncPositions(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if not self.equivocate:
            await serve_sync_stream(self.session, request_iterator, context)
            return
        frames = request_iterator.__aiter__()
        hello = (await frames.__anext__()).frame.hello
        held = hello.received_sequence
        stored = self.sync_log.outgoing_entry(held)
        assert stored is not None, "the exchange holds none of the custodian's log"
        received = self.sync_log.received_head()
        await context.write(
            custodian_service_pb2.SyncPositionsResponse(
                frame=position_sync_pb2.SyncFrame(
                    hello=position_sync_pb2.SyncHello(
                        party_id=CUSTODIAN,
                        sending_direction=CUSTODIAN_TO_EXCHANGE,  # type: ignore[arg-type]
                        received_sequence=received.sequence,
                        received_entry_hash=received.entry_hash,
                        sent_sequence=self.sync_log.sent_head().sequence,
                        window=64,
                        heartbeat_interval_ms=1000,
                    )
                )
            )
        )
        update = position_sync_pb2.PositionUpdate(
            pledge_change=position_sync_pb2.PledgeChange(account_id="acct-x", asset_id="USDC")
        ).SerializeToString()
        batch = position_sync_pb2.SyncBatch(direction=CUSTODIAN_TO_EXCHANGE)  # type: ignore[arg-type]
        batch.entries.add(
            sequence=held,
            prev_entry_hash=stored.prev_entry_hash,
            update=update,
            entry_hash=entry_hash(CUSTODIAN_TO_EXCHANGE, held, stored.prev_entry_hash, update),
        )
        self.forged = sign_statement(
            batch,
            self.key,
            audience=[EXCHANGE],
            sequence=held,
            ttl=timedelta(minutes=5),
            issued_at=self.now(),
        )
        await context.write(
            custodian_service_pb2.SyncPositionsResponse(
                frame=position_sync_pb2.SyncFrame(batch=self.forged)
            )
        )
        async for request in frames:
            if request.frame.WhichOneof("frame") == "close":
                self.closed = request.frame.close
                self.close_received.set()
                break


async def _listed(w: World, client: ReconciliationClient, page_size: int = 0) -> list[Any]:
    """Every item the exchange lists, following the page tokens."""
    items: list[equivocation_pb2.EquivocationEvidence] = []
    token = ""
    while True:
        page = await client.list_equivocation_evidence(
            reconciliation_service_pb2.ListEquivocationEvidenceRequest(
                page_size=page_size, page_token=token
            )
        )
        items.extend(page.evidence)
        token = page.next_page_token
        if not token:
            return items


async def _until_listed(w: World, client: ReconciliationClient, count: int) -> list[Any]:
    async with asyncio.timeout(WAIT):
        while len(items := await _listed(w, client)) < count:
            await asyncio.sleep(0.05)
    return items


def _checkpoint(w: World, envelope: envelope_pb2.Envelope) -> attestation_pb2.Checkpoint:
    """A checkpoint of the evidence, verified as the custodian's (at its own issue time)."""
    issued = attestation_pb2.Checkpoint.FromString(envelope.payload).header.issued_at
    verified = verify_statement(
        envelope,
        w.parties.registry,
        expected_type=attestation_pb2.Checkpoint,
        audience="*",
        now=issued.ToDatetime(tzinfo=UTC),
    )
    assert verified.issuer == CUSTODIAN
    return verified.message


def _batch(w: World, envelope: envelope_pb2.Envelope) -> position_sync_pb2.SyncBatch:
    issued = position_sync_pb2.SyncBatch.FromString(envelope.payload).header.issued_at
    verified = verify_statement(
        envelope,
        w.parties.registry,
        expected_type=position_sync_pb2.SyncBatch,
        audience=EXCHANGE,
        now=issued.ToDatetime(tzinfo=UTC),
    )
    assert verified.issuer == CUSTODIAN
    return verified.message


async def _refused(call: Any) -> RPCError:
    with pytest.raises(RPCError) as caught:
        await call
    return caught.value


def test_equivocations_are_kept_across_a_restart_and_listed_to_regulators_only(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(
            reference_parties, start_server, tmp_path, custodian_type=EquivocatingCustodian
        ) as w:
            fake = w.custodian
            assert isinstance(fake, EquivocatingCustodian)
            fake.attest("acct-1", SMALL)
            await fake.wait_update("credit_line", lambda c: c.account_id == "acct-1")
            trusted = attestation_pb2.Checkpoint.FromString(
                envelope_pb2.Envelope.FromString(
                    w.rows("SELECT envelope FROM exchange_checkpoints")[0][0]
                ).payload
            )
            assert trusted.tree_size == 1

            # A fork: another log of the same size. Served at two refreshes, kept once.
            fork = AttestationLog(tmp_path / "fork.sqlite", origin=ORIGIN)
            fork.append(statement_leaf(fake.statement("acct-1", (("USDC", "1", "0", "1"),))))
            fake.served = fork
            for account in ("acct-2", "acct-3"):
                fake.attest(account, SMALL)
                assert (await decided(w, account))[1:3] == ("rejected", "CHECKPOINT_INCONSISTENT")
            # Another history, one leaf longer: its consistency proof cannot verify.
            rewritten = AttestationLog(tmp_path / "rewritten.sqlite", origin=ORIGIN)
            rewritten.append(statement_leaf(fake.statement("acct-1", (("USDC", "2", "0", "2"),))))
            fake.served = rewritten
            fake.attest("acct-4", SMALL, log=rewritten)
            assert (await decided(w, "acct-4"))[1:3] == ("rejected", "CHECKPOINT_INCONSISTENT")
            fake.served = fake.log

            # Two entries at the last sequence the exchange holds: it refuses, keeps both batches.
            held = (
                await w.control.get_sync_state(test_control_pb2.GetSyncStateRequest())
            ).directions
            sequence = {d.direction: d.sequence for d in held}[CUSTODIAN_TO_EXCHANGE]
            fake.equivocate = True
            address = await asyncio.to_thread(w.server.restart)
            async with w.parties.channel(address, REGULATOR) as channel:
                regulator = ReconciliationClient(channel)
                items = await _until_listed(w, regulator, 3)
            # The exchange keeps the evidence, then closes the stream: the close may trail.
            async with asyncio.timeout(WAIT):
                await fake.close_received.wait()
            assert fake.closed is not None
            assert fake.closed.reason == errors_pb2.ERROR_REASON_EQUIVOCATION
            assert [item.kind for item in items] == [
                _K.EQUIVOCATION_KIND_CHECKPOINT_FORK,
                _K.EQUIVOCATION_KIND_CHECKPOINT_INCONSISTENT,
                _K.EQUIVOCATION_KIND_SYNC_BATCH,
            ]
            assert {item.accused_party_id for item in items} == {CUSTODIAN}
            forked, inconsistent, equivocation = items

            # The fork: the trusted checkpoint and the other one, same size, two roots.
            first, second = _checkpoint(w, forked.first), _checkpoint(w, forked.second)
            assert first == trusted
            assert (forked.log_origin, forked.tree_size, second.tree_size) == (ORIGIN, 1, 1)
            assert second.root_hash == fork.root() != first.root_hash
            assert (forked.first_hash, forked.second_hash) == (first.root_hash, second.root_hash)
            # The failed consistency proof, with the proof the custodian served.
            assert _checkpoint(w, inconsistent.first) == trusted
            larger = _checkpoint(w, inconsistent.second)
            assert (larger.tree_size, larger.root_hash) == (2, rewritten.root())
            proof = inconsistent.consistency_proof
            assert (proof.first_tree_size, proof.second_tree_size) == (1, 2)
            # The stream: the stored batch and the forged one, at one sequence.
            assert (equivocation.direction, equivocation.sequence) == (
                CUSTODIAN_TO_EXCHANGE,
                sequence,
            )
            assert equivocation.second == fake.forged
            stored = fake.sync_log.outgoing_entry(sequence)
            assert stored is not None
            kept = {e.sequence: e.entry_hash for e in _batch(w, equivocation.first).entries}
            forged = {e.sequence: e.entry_hash for e in _batch(w, equivocation.second).entries}
            assert kept[sequence] == stored.entry_hash == equivocation.first_hash
            assert forged[sequence] == equivocation.second_hash != stored.entry_hash

            # Durable: the same list after another restart (the custodian honest again).
            fake.equivocate = False
            address = await asyncio.to_thread(w.server.restart)
            async with (
                w.parties.channel(address, REGULATOR) as channel,
                w.parties.channel(address, CUSTODIAN) as accused_channel,
                w.parties.channel(address, CLIENT) as client_channel,
                w.parties.channel(address, STRANGER) as stranger_channel,
            ):
                regulator = ReconciliationClient(channel)
                assert await _listed(w, regulator) == items
                # Pages of one, and a token of another listing refused.
                assert await _listed(w, regulator, page_size=1) == items
                bad = await _refused(
                    regulator.list_equivocation_evidence(
                        reconciliation_service_pb2.ListEquivocationEvidenceRequest(
                            page_token="bWMxOjE6YWNjdC0x"  # a ListMarginCalls token
                        )
                    )
                )
                assert (bad.code, bad.reason_name) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "MALFORMED",
                )
                # Nobody else: not the accused custodian, not a client, not a stranger.
                for other, expected in (
                    (accused_channel, "a regulator"),
                    (client_channel, "a regulator"),
                    (stranger_channel, "a party in the key registry"),
                ):
                    refusal = await _refused(
                        ReconciliationClient(other).list_equivocation_evidence(
                            reconciliation_service_pb2.ListEquivocationEvidenceRequest()
                        )
                    )
                    assert (refusal.code, refusal.reason_name) == (
                        grpc.StatusCode.PERMISSION_DENIED,
                        "KEY_ROLE_MISMATCH",
                    )
                    assert refusal.metadata["field"] == "caller"
                    assert refusal.metadata["expected"] == expected
            fork.close()
            rewritten.close()

    run(scenario())
