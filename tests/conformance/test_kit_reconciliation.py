"""The kit's reconciliation cases against the reference custodian and exchange, and broken ones.

The servers here name a regulator among their peers (without an address:
statements are served, not submitted), which the shared fixtures' servers do
not: a party with no regulator to address a statement to cannot state a
cut-off. Three more accounts are pledged before the kit runs, so that the
position trees have unaligned ranges to ask for. Each broken variant is a
fault proxy in front of the healthy custodian, changing one thing the
reconciliation cases check; the kit must fail exactly the cases meant for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, ExchangeClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import pae, sign_statement
from collateral_sync.transport import TlsConfig
from collateral_sync.v1 import (
    custodian_service_pb2,
    envelope_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
    test_control_pb2,
)
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Role
from google.protobuf import duration_pb2

from .conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    KIT_ACCOUNT,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
    custodian_config,
    further_tls,
    kit_argv,
)
from .fault_proxy import Fault, FaultProxy, Refusal
from .test_kit_exchange import ORIGIN, _exchange_argv

_SERVICE = "/collateral_sync.v1.ReconciliationService/"
_STATEMENT = _SERVICE + "GetReconciliationStatement"
_NODES = _SERVICE + "GetPositionTreeNodes"
#: Pledged by the test before the kit runs: with the kit's own, four leaves.
TREE_ACCOUNTS = ("acct-recon-a", "acct-recon-b", "acct-recon-c")
WAIT = 30.0

_SIGNED = "reconciliation/statement-signed-for-cutoff"
_FROZEN = "reconciliation/statement-frozen"
_RECOMPUTE = "reconciliation/tree-nodes-recompute-root"
_REFUSALS = {
    "reconciliation/statement-before-cutoff-refused",
    "reconciliation/malformed-cutoff-id-refused",
    "reconciliation/unscheduled-cutoff-refused",
    "reconciliation/tree-nodes-unknown-cutoff-not-found",
    "reconciliation/tree-nodes-range-out-of-range-refused",
    "reconciliation/tree-nodes-limit-exceeded",
}


#: The kit plays this module's exchange party on the custodian's sync stream there, adding
#: entries to its exchange-to-custodian log behind the back of the reference exchange that
#: shares the custodian (whose own log would then disagree): it runs against custodians of
#: its own (test_kit_reference.py, test_kit_broken_custodians.py).
_SHARED_STREAM = "reconciliation/sync-heads-at-cutoff"


def _ids(role: Role) -> set[str]:
    return {
        c.id
        for c in REGISTRY.for_role(role)
        if c.id.startswith("reconciliation/") and c.id != _SHARED_STREAM
    }


async def _pledge(parties: Parties, address: str) -> None:
    """Pledge one BTC of each TREE_ACCOUNTS account to the exchange, as their client."""
    client = parties.keys[CLIENT]
    sequences = itertools.count(1)
    async with parties.channel(address, EXCHANGE) as channel:
        zero = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
        now = (await TestControlClient(channel).advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
        custodian = CustodianClient(channel)

        def signed(message: Any) -> envelope_pb2.Envelope:
            return sign_statement(
                message,
                client,
                audience=[CUSTODIAN],
                sequence=next(sequences),
                ttl=timedelta(hours=1),
                issued_at=now,
            )

        for account in TREE_ACCOUNTS:
            path = liquidation_pb2.LiquidationPath(
                account_id=account,
                exchange_id=EXCHANGE,
                proceeds_account_id=f"{EXCHANGE}-settlement",
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id="BTC", venue="otc-desk", max_quantity=amount_to_proto("1")
                    )
                ],
            )
            instruction = custodian_service_pb2.PledgeInstruction(
                account_id=account,
                exchange_id=EXCHANGE,
                asset_id="BTC",
                quantity=amount_to_proto("1"),
            )
            await custodian.pledge_collateral(
                custodian_service_pb2.PledgeCollateralRequest(
                    pledge_instruction=signed(instruction), liquidation_path=signed(path)
                )
            )


async def _catch_up(parties: Parties, custodian: str, exchange: str) -> None:
    """Move the exchange's clock to the custodian's, which earlier kit runs moved on.

    Otherwise the exchange would meet the custodian's sync batches as issued in its future.
    """
    zero = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
    async with (
        parties.channel(custodian, EXCHANGE) as to_custodian,
        parties.channel(exchange, CUSTODIAN) as to_exchange,
    ):
        ahead = (await TestControlClient(to_custodian).advance_clock(zero)).now.ToDatetime()
        control = TestControlClient(to_exchange)
        behind = (await control.advance_clock(zero)).now.ToDatetime()
        if ahead > behind:
            by = duration_pb2.Duration()
            by.FromTimedelta(ahead - behind)
            await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))


async def _until_mirrored(parties: Parties, address: str) -> None:
    """The exchange learns pledged accounts from the sync stream; poll until it knows them all."""
    deadline = time.monotonic() + WAIT
    async with parties.channel(address, CUSTODIAN) as channel:
        client = ExchangeClient(channel)
        for account in (*TREE_ACCOUNTS, KIT_ACCOUNT):
            while True:
                try:
                    await client.list_margin_calls(
                        exchange_service_pb2.ListMarginCallsRequest(account_id=account)
                    )
                except RPCError as err:
                    # Not yet known, so the custodian is not yet its reader (§4.5) either.
                    not_yet = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
                    if err.code not in not_yet or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
                else:
                    break


@pytest.fixture(scope="module")
def custodian(
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """A reference custodian that states cut-offs (a regulator among its peers), four accounts pledged."""
    directory = tmp_path_factory.mktemp("recon-custodian")
    config = custodian_config(reference_parties, directory)
    config["peers"] = {EXCHANGE: None, REGULATOR: None}
    config["custodian"]["accounts"] += [
        {"account_id": account, "client_id": CLIENT, "holdings": {"BTC": "3", "USDC": "100"}}
        for account in TREE_ACCOUNTS
    ]
    server = start_server("custodian", config, name="recon-custodian")
    asyncio.run(_pledge(reference_parties, server.address))
    pledge = kit_argv(
        kit_files, server.address, "--account", KIT_ACCOUNT, "--run", "custodian/pledge-accepted"
    )
    assert main(pledge) == 0
    return server


@pytest.fixture(scope="module")
def exchange(
    custodian: ServerProcess,
    start_server: StartServer,
    reference_parties: Parties,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """A reference exchange mirroring the custodian's pledged accounts, a regulator among its peers."""
    directory = tmp_path_factory.mktemp("recon-exchange")
    config = reference_parties.config(
        EXCHANGE,
        "exchange",
        directory,
        peers={CUSTODIAN: custodian.address, REGULATOR: None},
        exchange={
            "log_origin": ORIGIN,
            "prices": [
                {"asset_id": "BTC", "price": "60000"},
                {"asset_id": "USDC", "price": "1"},
                {"asset_id": "BENJI", "price": "1"},
            ],
        },
    )
    server = start_server("exchange", config, name="recon-exchange")
    asyncio.run(_catch_up(reference_parties, custodian.address, server.address))
    asyncio.run(_until_mirrored(reference_parties, server.address))
    return server


def _run(argv: list[str], directory: Path) -> dict[str, str]:
    """Run the kit; the verdict of each case it ran."""
    main([*argv, "--report-dir", str(directory)])
    document = json.loads((directory / "results.json").read_text("utf-8"))
    return {c["id"]: c["verdict"] for c in document["cases"]}


def test_reference_custodian_passes_every_reconciliation_case(
    custodian: ServerProcess,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = kit_argv(kit_files, custodian.address, "--account", KIT_ACCOUNT)
    verdicts = _run([*argv, "--run", "reconciliation/**", "--skip", _SHARED_STREAM], tmp_path)
    capsys.readouterr()
    assert set(verdicts) == _ids(Role.CUSTODIAN)
    assert {i: v for i, v in verdicts.items() if v != "passed"} == {}, custodian.log_text()[-3000:]


def test_reference_exchange_passes_every_reconciliation_case(
    exchange: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Here the exchange dials the reference custodian: the cases that pass a cut-off need
    the kit to be that custodian (§10.2: the exchange states C once its custodian's stream
    is past C), so they skip; test_kit_counterpart.py runs them with --listen."""
    argv = _exchange_argv(reference_parties, kit_files, exchange.address)
    verdicts = _run([*argv, "--run", "reconciliation/**"], tmp_path)
    out = capsys.readouterr().out
    assert set(verdicts) == _ids(Role.EXCHANGE)
    not_passed = {i: v for i, v in verdicts.items() if v != "passed"}
    assert set(not_passed.values()) == {"skipped"}, exchange.log_text()[-3000:]
    assert "reconciliation/statement-signed-for-cutoff" in not_passed
    assert "reconciliation/statement-before-cutoff-refused" not in not_passed
    assert "needs --listen" in out


# ------------------------------------------------------------------ broken custodians


def _resigned(response: bytes, key: SigningKey, change: Callable[[Any], None]) -> bytes:
    """A GetReconciliationStatement response whose statement is changed, then signed by ``key``."""
    answer = reconciliation_service_pb2.GetReconciliationStatementResponse.FromString(response)
    envelope = answer.reconciliation_statement
    statement = reconciliation_pb2.ReconciliationStatement.FromString(envelope.payload)
    change(statement)
    payload = statement.SerializeToString()
    envelope.payload = payload
    del envelope.signatures[:]
    envelope.signatures.add(key_id=key.key_id, sig=key.sign(pae(envelope.payload_type, payload)))
    return answer.SerializeToString()


def _wrong_key(parties: Parties) -> Fault:
    def sign_as_exchange(method: str, response: bytes) -> bytes | None:
        if method != _STATEMENT:
            return None
        return _resigned(response, parties.keys[EXCHANGE], lambda _: None)

    return Fault("signs its statements with another party's key", on_response=sign_as_exchange)


def _rebuilt_each_call(parties: Parties) -> Fault:
    counter = itertools.count(1)

    def rebuild(method: str, response: bytes) -> bytes | None:
        if method != _STATEMENT:
            return None

        def renumber(statement: Any) -> None:
            statement.header.sequence += next(counter)

        return _resigned(response, parties.keys[CUSTODIAN], renumber)

    return Fault("builds and signs the statement afresh on every call", on_response=rebuild)


def _leaf_hashes_off(method: str, response: bytes) -> bytes | None:
    if method != _NODES:
        return None
    answer = reconciliation_service_pb2.GetPositionTreeNodesResponse.FromString(response)
    for node in answer.nodes:
        if node.end - node.start == 1:
            node.hash = bytes([node.hash[0] ^ 1]) + node.hash[1:]
    return answer.SerializeToString()


def _unknown_cutoff_ok(method: str, refusal: Refusal) -> bytes | None:
    return b"" if method == _NODES and refusal.reason == "NOT_FOUND" else None


def _details_dropped(method: str, refusal: Refusal) -> Refusal | None:
    if not method.startswith(_SERVICE):
        return None
    kept = tuple((k, v) for k, v in refusal.trailing_metadata if k != "grpc-status-details-bin")
    return Refusal(refusal.code, refusal.details, kept)


BROKEN: dict[str, tuple[Callable[[Parties], Fault], set[str]]] = {
    "wrong-signing-key": (_wrong_key, {_SIGNED}),
    "statement-not-frozen": (_rebuilt_each_call, {_FROZEN}),
    "leaf-hashes-off-root": (
        lambda _: Fault(
            "serves leaf hashes that miss the signed root", on_response=_leaf_hashes_off
        ),
        {_RECOMPUTE},
    ),
    "unknown-cutoff-answered-ok": (
        lambda _: Fault("answers an unknown cut-off with no nodes", on_refusal=_unknown_cutoff_ok),
        {"reconciliation/tree-nodes-unknown-cutoff-not-found"},
    ),
    "error-details-dropped": (
        lambda _: Fault("drops ErrorInfo from its refusals", on_refusal=_details_dropped),
        # view-frozen-at-cutoff asks for its cut-off one second early, and is refused.
        {*_REFUSALS, "reconciliation/view-frozen-at-cutoff"},
    ),
}


@pytest.fixture
def proxy(custodian: ServerProcess, reference_parties: Parties) -> Iterator[Callable[[Fault], str]]:
    """``proxy(fault)``: the address of a fault proxy in front of the custodian."""
    started: list[FaultProxy] = []

    def start(fault: Fault) -> str:
        running = FaultProxy(
            custodian.address,
            client_tls=TlsConfig.from_dev_pki(reference_parties.pki, EXCHANGE),
            server_tls=TlsConfig.from_dev_pki(reference_parties.pki, CUSTODIAN),
            fault=fault,
            identities=further_tls(reference_parties),
        )
        started.append(running)
        return running.start()

    yield start
    for running in started:
        running.stop()


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_broken_custodian_is_caught_by_exactly_its_cases(
    variant: str,
    proxy: Callable[[Fault], str],
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_fault, caught_by = BROKEN[variant]
    address = proxy(make_fault(reference_parties))
    argv = kit_argv(kit_files, address, "--account", KIT_ACCOUNT)
    verdicts = _run([*argv, "--run", "reconciliation/**", "--skip", _SHARED_STREAM], tmp_path)
    capsys.readouterr()
    assert set(verdicts) == _ids(Role.CUSTODIAN)
    assert {i for i, v in verdicts.items() if v != "passed"} == caught_by
    assert {verdicts[i] for i in caught_by} == {"failed"}
