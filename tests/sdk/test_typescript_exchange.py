"""The TypeScript SDK acting as an exchange against a real reference custodian.

The custodian is the reference server as a process on port 0 over mutual TLS (the
``reference_parties`` / ``start_server`` fixtures of tests/reference); the exchange is
``sdk/typescript/examples/exchange.ts`` compiled with the package's own ``tsc`` and run with
node. The example prints one JSON line per event, which the test follows; holdings change
because a client pledges uneven amounts through the Python SDK. The test checks that the TS
exchange verifies checkpoints (with consistency proofs), holdings statements and their
inclusion proofs, receives and acknowledges every batch, and after a SIGKILL mid-stream and
after the custodian drops its stream resumes from its stored head with nothing lost and
nothing applied twice — and that the custodian's own record of acknowledgements agrees.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    liquidation_pb2,
    position_sync_pb2,
    test_control_pb2,
)
from google.protobuf import duration_pb2

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / "tests", ROOT / "reference_server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from reference.conftest import (  # noqa: E402 (needs the paths above)
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    KEYS_VALID_FROM,
    OTHER_CLIENT,
    Parties,
    ServerProcess,
    StartServer,
    reference_parties,
    start_server,
)

# Fixtures shared with tests/reference, used here by name.
__all__ = ["reference_parties", "start_server"]

_T = TypeVar("_T")

TS_SDK = ROOT / "sdk" / "typescript"
EXAMPLE = TS_SDK / "dist" / "examples" / "exchange.js"
TSC = TS_SDK / "node_modules" / "typescript" / "bin" / "tsc"
ACCOUNT = "acct-ts"
OTHER_ACCOUNT = "acct-ts-other"
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
#: Bound of every wait for an event; a failure says what was awaited and shows the tail.
WAIT = 30.0
HEARTBEAT_MS = 500


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


# ------------------------------------------------------------------ the TS exchange process


class ExchangeProcess:
    """``node dist/examples/exchange.js`` with its JSON lines collected as they arrive."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stderr = log.open("wb")
        self.process = subprocess.Popen(
            ["node", str(EXAMPLE), *args], stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._log = log
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:  # e.g. a line cut short by SIGKILL
                event = {"event": "unparsed", "line": raw.decode(errors="replace")}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(
        self, what: str, predicate: Callable[[dict[str, Any]], bool], *, start: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``start`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + WAIT
        with self._changed:
            while True:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.process.poll() is not None and not self._reader.is_alive()
                ):
                    break
                self._changed.wait(remaining)
        tail = "\n".join(json.dumps(e) for e in self.events[-25:] if "heartbeat" not in e["event"])
        raise AssertionError(
            f"the TS exchange did not report {what} within {WAIT}s "
            f"(exit {self.process.poll()}); last events:\n{tail}\n"
            f"stderr:\n{self._log.read_text(errors='replace')}"
        )

    def event(self, name: str, start: int = 0, **fields: Any) -> dict[str, Any]:
        """Wait for event ``name`` whose fields include ``fields``."""
        return self.wait_for(
            f"{name} {fields}",
            lambda e: e["event"] == name and all(e.get(k) == v for k, v in fields.items()),
            start=start,
        )

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events if e["event"] == name]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(WAIT)
        self._reader.join(WAIT)

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(WAIT)
        self._reader.join(WAIT)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def built() -> Path:
    """The TS SDK compiled by its own tsc (strict); refuses to go on with type errors."""
    assert TSC.is_file(), f"{TSC} is missing: run `make setup` (npm ci in {TS_SDK})"
    result = subprocess.run(
        ["node", str(TSC), "-p", str(TS_SDK / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"tsc failed:\n{result.stdout}{result.stderr}"
    assert EXAMPLE.is_file()
    return EXAMPLE


def exchange_args(parties: Parties, address: str, state: Path, registry: Path) -> list[str]:
    files = parties.pki.party(EXCHANGE)
    return [
        "--address", address,
        "--ca", str(parties.pki.ca_cert),
        "--cert", str(files.cert),
        "--key", str(files.key),
        "--registry", str(registry),
        "--state-dir", str(state),
        "--custodian", CUSTODIAN,
        "--account", ACCOUNT,
        "--account", OTHER_ACCOUNT,
        "--heartbeat-ms", str(HEARTBEAT_MS),
        "--checkpoint-interval-ms", "1000",
    ]  # fmt: skip


@pytest.fixture
def exchanges(tmp_path: Path) -> Iterator[Callable[[list[str]], ExchangeProcess]]:
    started: list[ExchangeProcess] = []

    def start(args: list[str]) -> ExchangeProcess:
        process = ExchangeProcess(args, tmp_path / f"exchange-{len(started)}.stderr")
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


# ------------------------------------------------------------------ the custodian


@pytest.fixture(scope="module")
def custodian(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    directory = tmp_path_factory.mktemp("ts-custodian")
    config = reference_parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        peers={EXCHANGE: None},
        # Small batches, so that several batches (and acks) make up the stream.
        sync={"window": 64, "batch_size": 2, "heartbeat_interval_ms": HEARTBEAT_MS},
        custodian={
            "accounts": [
                {"account_id": ACCOUNT, "client_id": CLIENT, "holdings": {"USDC": "1000000"}},
                {
                    "account_id": OTHER_ACCOUNT,
                    "client_id": OTHER_CLIENT,
                    "holdings": {"USDC": "10"},
                },
            ]
        },
    )
    return start_server("custodian", config, name="ts-custodian")


class Client:
    """client-1 pledging to exchange-1 through the Python SDK, one path for every pledge."""

    def __init__(self, parties: Parties, address: str) -> None:
        self.parties = parties
        self.address = address
        self.key = parties.keys[CLIENT]
        self.sequence = int(datetime.now(UTC).timestamp() * 1000)
        self.path: envelope_pb2.Envelope | None = None

    def _sign(self, message: Any, now: datetime, statement_id: str | None = None) -> Any:
        self.sequence += 1
        return sign_statement(
            message,
            self.key,
            audience=[CUSTODIAN],
            sequence=self.sequence,
            ttl=timedelta(hours=1),
            issued_at=now,
            statement_id=statement_id,
        )

    async def pledge(self, amounts: list[str]) -> None:
        async with self.parties.channel(self.address, CLIENT) as channel:
            custodian, control = CustodianClient(channel), TestControlClient(channel)
            clock = await control.advance_clock(
                test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
            )
            now = clock.now.ToDatetime(tzinfo=UTC)
            if self.path is None:
                path = liquidation_pb2.LiquidationPath(
                    account_id=ACCOUNT,
                    exchange_id=EXCHANGE,
                    proceeds_account_id=f"{EXCHANGE}/settlement",
                    steps=[
                        liquidation_pb2.LiquidationStep(
                            asset_id="USDC", venue="otc", max_quantity=amount_to_proto("1000000")
                        )
                    ],
                )
                self.path = self._sign(path, now, statement_id="path-ts")
            for amount in amounts:
                instruction = custodian_service_pb2.PledgeInstruction(
                    account_id=ACCOUNT,
                    exchange_id=EXCHANGE,
                    asset_id="USDC",
                    quantity=common_pb2.Decimal(value=amount),
                )
                await custodian.pledge_collateral(
                    custodian_service_pb2.PledgeCollateralRequest(
                        pledge_instruction=self._sign(instruction, now), liquidation_path=self.path
                    )
                )

    async def pledged(self) -> str:
        async with self.parties.channel(self.address, CLIENT) as channel:
            answer = await CustodianClient(channel).get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id=ACCOUNT)
            )
        statement = attestation_pb2.HoldingsStatement.FromString(answer.holdings_statement.payload)
        return next(p.pledged_quantity.value for p in statement.positions if p.asset_id == "USDC")


async def custodian_side(parties: Parties, address: str) -> test_control_pb2.SyncDirectionState:
    """The custodian's own record of its log towards exchange-1: head and acknowledged."""
    async with parties.channel(address, CLIENT) as channel:
        state = await TestControlClient(channel).get_sync_state(
            test_control_pb2.GetSyncStateRequest()
        )
    return next(
        d
        for d in state.directions
        if d.direction == position_sync_pb2.SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE
    )


async def take_over_stream(parties: Parties, address: str, head: int, head_hash: bytes) -> None:
    """Dial SyncPositions as exchange-1 ourselves: the custodian drops the TS exchange's stream.

    The custodian holds one stream per exchange and a new one replaces the earlier (§6.2).
    Our hello claims exactly the TS exchange's head, so the custodian's record is unchanged.
    """
    async with parties.channel(address, EXCHANGE) as channel:
        call = CustodianClient(channel).sync_positions(timeout=WAIT)
        hello = position_sync_pb2.SyncHello(
            party_id=EXCHANGE,
            sending_direction=position_sync_pb2.SYNC_DIRECTION_EXCHANGE_TO_CUSTODIAN,
            received_sequence=head,
            received_entry_hash=head_hash,
            window=1,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
        await call.write(
            custodian_service_pb2.SyncPositionsRequest(
                frame=position_sync_pb2.SyncFrame(hello=hello)
            )
        )
        answer = await asyncio.wait_for(call.read(), WAIT)
        assert answer.frame.WhichOneof("frame") == "hello", answer
        call.cancel()


def stored_log(state: Path) -> dict[str, Any]:
    stored: dict[str, Any] = json.loads((state / "sync" / "received-log.json").read_text())
    return stored


def sequences(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["sequence"]) for e in events]


# ------------------------------------------------------------------ tests


def test_typescript_exchange_verifies_syncs_and_resumes_exactly_once(
    built: Path,
    custodian: ServerProcess,
    reference_parties: Parties,
    exchanges: Callable[[list[str]], ExchangeProcess],
    tmp_path: Path,
) -> None:
    parties = reference_parties
    address = custodian.address
    client = Client(parties, address)
    state = tmp_path / "state"
    args = exchange_args(parties, address, state, parties.registry_path)
    # The exchange may read an account's holdings once it is pledged to it (§4.5).
    amounts = ["1000.5"]
    run(client.pledge(amounts))

    # -- first run: checkpoints, fetched statements and proofs, the stream
    first = exchanges(args)
    accepted = first.event("checkpoint_accepted")
    assert accepted["consistentFrom"] is None  # trusted on first use (§5.6)
    verified = first.event("holdings_verified", account=ACCOUNT)
    proven = first.event("statement_proven", source="fetch", account=ACCOUNT)
    assert proven["epoch"] == verified["epoch"]
    assert proven["leafIndex"] < proven["treeSize"]
    # A real refusal, decoded from the custodian's ErrorInfo (§4.5, §12.2).
    refused = first.event("holdings_refused", account=OTHER_ACCOUNT)
    assert (refused["reason"], refused["code"]) == ("KEY_ROLE_MISMATCH", "PERMISSION_DENIED")
    assert refused["metadata"]["field"] == "account_id"
    assert refused["metadata"]["actual"] == EXCHANGE
    head = run(custodian_side(parties, address)).sequence
    assert head == 2  # the pledge's holdings_change and pledge_change
    first.event("ack_sent", sequence=head)

    # Pledges while the exchange runs; it is killed (SIGKILL) once acks move past them.
    running = ["20", "333.333", "0.000001", "4444.4"]
    amounts += running
    pledging = threading.Thread(target=lambda: run(client.pledge(running)))
    pledging.start()
    first.wait_for(
        "an ack beyond the first pledge",
        lambda e: e["event"] == "ack_sent" and e["sequence"] >= head + 2,
    )
    first.kill()
    pledging.join(WAIT)
    assert not pledging.is_alive()
    # ... and while it is down: entries the custodian holds for it, unacknowledged.
    down = ["77.7", "5"]
    amounts += down
    run(client.pledge(down))

    stored = stored_log(state)
    stored_head = int(stored["head"]["sequence"])
    last_ack = max(sequences(first.named("ack_sent")))
    assert stored_head >= last_ack  # an ack is sent only once its batch is stored
    assert stored["state"]["applied"] == [str(s) for s in range(1, stored_head + 1)]
    side = run(custodian_side(parties, address))
    assert side.acknowledged_sequence <= stored_head < side.sequence
    assert side.sequence == 2 * len(amounts)
    # Each stored batch was acknowledged (the last one perhaps not: SIGKILL may fall between).
    acked = set(sequences(first.named("ack_sent")))
    assert all(b["lastSequence"] in acked for b in first.named("batch_stored")[:-1])

    # -- second run: resumes from the stored head, replayed from there by the custodian
    second = exchanges(args)
    assert second.event("started")["storedHead"] == stored_head
    second.event("checkpoint_restored")
    hello = second.event("hello_sent")
    assert hello["receivedSequence"] == stored_head
    assert hello["receivedEntryHash"] == stored["head"]["entryHash"]
    resumed = second.event("batch_stored")
    assert resumed["firstSequence"] == resumed["firstNew"] == stored_head + 1
    final_head = side.sequence
    ack = second.event("ack_sent", sequence=final_head)
    side = run(custodian_side(parties, address))
    assert (side.sequence, side.acknowledged_sequence) == (final_head, final_head)
    assert side.entry_hash.hex() == ack["entryHash"]
    # The checkpoint grew while we were away: accepted only with a consistency proof.
    grown = second.event("checkpoint_accepted")
    assert grown["consistentFrom"] is not None
    assert grown["consistentFrom"] < grown["treeSize"]

    # -- the custodian drops the stream (another stream of exchange-1 replaces it): re-dial
    mark = len(second.events)
    run(take_over_stream(parties, address, final_head, bytes.fromhex(ack["entryHash"])))
    rehello = second.event("hello_sent", start=mark)
    assert rehello["receivedSequence"] == final_head
    second.event("hello_received", start=mark)
    last = ["12.34"]
    amounts += last
    run(client.pledge(last))
    final_head += 2
    second.event("ack_sent", start=mark, sequence=final_head)
    # Every holdings statement the stream announced to this run is proven in the log (§5.5),
    # and every batch it stored is acknowledged.
    second.wait_for(
        "the last holdings change applied",
        lambda e: e["event"] == "update_applied" and e.get("entry") == final_head - 1,
    )
    announced = [e for e in second.named("update_applied") if e["kind"] == "holdingsChange"]
    # The reference custodian announces each pledge as a holdings change and a pledge change.
    assert len(announced) == (final_head - stored_head) // 2
    for change in announced:
        proof = second.event("statement_proven", source="stream", entry=change["entry"])
        assert proof["epoch"] == change["epoch"]
        assert proof["leafIndex"] < proof["treeSize"]
    acked = set(sequences(second.named("ack_sent")))
    assert all(b["lastSequence"] in acked for b in second.named("batch_stored"))
    assert second.stop() == 0
    assert second.event("stopped")["head"] == final_head

    # -- exactly once: every entry applied, in order, once, across both runs and the re-dial
    stored = stored_log(state)
    assert stored["head"]["sequence"] == str(final_head)
    assert stored["state"]["applied"] == [str(s) for s in range(1, final_head + 1)]
    printed = [e["entry"] for p in (first, second) for e in p.named("update_applied")]
    assert len(printed) == len(set(printed)), "an entry was applied twice"
    assert all(e["entry"] > stored_head for e in second.named("update_applied"))
    assert set(printed) <= set(range(1, final_head + 1))
    # What the exchange holds as pledged is what the client pledged, and what the custodian says.
    total = sum((Decimal(a) for a in amounts), Decimal(0))
    assert Decimal(stored["state"]["pledged"][ACCOUNT]["USDC"]) == total
    assert Decimal(run(client.pledged())) == total
    side = run(custodian_side(parties, address))
    assert (side.sequence, side.acknowledged_sequence) == (final_head, final_head)


def test_typescript_exchange_refuses_a_checkpoint_signed_by_a_key_it_does_not_know(
    built: Path,
    custodian: ServerProcess,
    reference_parties: Parties,
    exchanges: Callable[[list[str]], ExchangeProcess],
    tmp_path: Path,
) -> None:
    parties = reference_parties
    # The same parties, but another key registered for the custodian: its real signatures
    # verify with no registered key, so nothing it signs may be trusted.
    registry = KeyRegistry()
    stranger = SigningKey.generate(CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN)
    for party_id, key in parties.keys.items():
        registry.add(
            (stranger if party_id == CUSTODIAN else key).party_key(valid_from=KEYS_VALID_FROM)
        )
    path = tmp_path / "other-registry.json"
    registry.save(path)
    state = tmp_path / "state"
    process = exchanges(exchange_args(parties, custodian.address, state, path))
    fatal = process.event("fatal")
    assert (fatal["stage"], fatal["reason"], fatal["code"]) == (
        "checkpoint",
        "KEY_UNKNOWN",
        "UNAUTHENTICATED",
    )
    assert process.process.wait(WAIT) == 1
    assert not (state / "checkpoint.json").exists()
    assert not process.named("hello_sent")


def test_typescript_exchange_reports_the_custodians_refusal_of_its_hello_and_redials(
    built: Path,
    custodian: ServerProcess,
    reference_parties: Parties,
    exchanges: Callable[[list[str]], ExchangeProcess],
    tmp_path: Path,
) -> None:
    # A stored head the custodian never wrote: as if the custodian had lost data (§6.2 step 3).
    state = tmp_path / "state"
    (state / "sync").mkdir(parents=True)
    claimed = 10**6
    (state / "sync" / "received-log.json").write_text(
        json.dumps(
            {
                "format": "collateral-sync/ts-received-log/1",
                "peer": CUSTODIAN,
                "head": {"sequence": str(claimed), "entryHash": "ab" * 32},
                "batches": [],
                "replay": {},
                "state": {
                    "applied": [],
                    "holdings": {},
                    "pledged": {},
                    "accrued": {},
                    "rejected": [],
                },
            }
        )
    )
    process = exchanges(
        exchange_args(reference_parties, custodian.address, state, reference_parties.registry_path)
    )
    assert process.event("hello_sent")["receivedSequence"] == claimed
    closed = process.event("peer_closed")
    assert closed["reason"] == "OUT_OF_RANGE"
    assert closed["metadata"]["actual"] == str(claimed)
    failed = process.event("stream_failed")
    assert (failed["reason"], failed["code"]) == ("OUT_OF_RANGE", "OUT_OF_RANGE")
    # Not an equivocation: the exchange re-dials (and is refused again), it does not give up.
    redial = process.event("redial")
    again = process.event("hello_sent", start=process.events.index(redial))
    assert again["receivedSequence"] == claimed
    assert process.stop() == 0
    assert stored_log(state)["head"]["sequence"] == str(claimed)
