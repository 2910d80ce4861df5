"""The kit against the reference exchange (dialing the reference custodian), playing the custodian."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from collateral_sync.clients import ExchangeClient
from collateral_sync.errors import RPCError
from collateral_sync.transport import TlsConfig
from collateral_sync.v1 import exchange_service_pb2
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Role

from .conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    FURTHER_IDENTITIES,
    KIT_ACCOUNT,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
    further_tls,
    kit_argv,
    parties_identity_argv,
)
from .fault_proxy import Fault, FaultProxy, Refusal

ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
KNOWN_AT_EXCHANGE_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def exchange(
    custodian: ServerProcess,
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """A reference exchange that knows the kit's account: pledged to it at the custodian."""
    directory = tmp_path_factory.mktemp("kit-exchange")
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
    server = start_server("exchange", config)
    # The kit's own pledge case pledges the account to the exchange at the custodian.
    pledge = kit_argv(
        kit_files, custodian.address, "--account", KIT_ACCOUNT, "--run", "custodian/pledge-accepted"
    )
    assert main(pledge) == 0
    asyncio.run(_wait_until_known(reference_parties, server.address))
    return server


async def _wait_until_known(parties: Parties, address: str) -> None:
    """The exchange learns the account from the sync stream; poll until it has."""
    deadline = time.monotonic() + KNOWN_AT_EXCHANGE_TIMEOUT
    # As the custodian: until the exchange holds the account's statement the custodian is
    # not yet one of the account's parties, so PERMISSION_DENIED means "not yet" too (§4.5).
    async with parties.channel(address, CUSTODIAN) as channel:
        client = ExchangeClient(channel)
        while True:
            try:
                await client.list_margin_calls(
                    exchange_service_pb2.ListMarginCallsRequest(account_id=KIT_ACCOUNT)
                )
            except RPCError as err:
                not_yet = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
                if err.code not in not_yet or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                return


def _exchange_argv(parties: Parties, files: dict[str, Path], target: str, *extra: str) -> list[str]:
    custodian_tls = parties.pki.party(CUSTODIAN)
    return [
        "run",
        "--role",
        "exchange",
        "--target",
        target,
        "--server-party",
        EXCHANGE,
        "--ca",
        str(files["ca"]),
        "--cert",
        str(custodian_tls.cert),
        "--key",
        str(custodian_tls.key),
        "--registry",
        str(files["registry"]),
        "--kit-key",
        str(parties.key_path(CUSTODIAN)),
        "--kit-key",
        str(parties.key_path(CLIENT)),
        *parties_identity_argv(parties, *FURTHER_IDENTITIES),
        "--no-colour",
        *extra,
    ]


#: Cases that need the kit to be the exchange's custodian (--listen): run in
#: test_kit_counterpart.py; here the exchange dials the reference custodian.
COUNTERPART_CASES = (
    "exchange/holdings/**",
    "exchange/margin-call/**",
    "exchange/pledge-release/**",
    "exchange/custodian-silent/**",
    # It moves the exchange's clock a month ahead, past its custodian's statements.
    "exchange/served-statements-fresh",
    "sync/exchange/**",
    "evidence/exchange/**",
    # An exchange states a cut-off once its custodian's stream is past it (§10.2):
    # the kit must be that custodian to move its time with the exchange's.
    "reconciliation/**",
)


def test_reference_exchange_passes_every_must_case(
    exchange: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    skip = [arg for glob in COUNTERPART_CASES for arg in ("--skip", glob)]
    argv = _exchange_argv(
        reference_parties,
        kit_files,
        exchange.address,
        "--account",
        KIT_ACCOUNT,
        "--report-dir",
        str(tmp_path),
        *skip,
    )
    code = main(argv)
    out = capsys.readouterr().out
    document: dict[str, Any] = json.loads((tmp_path / "results.json").read_text("utf-8"))
    not_passed = [
        (c["id"], c["verdict"], c["message"])
        for c in document["cases"]
        if c["level"] == "MUST" and c["verdict"] != "passed"
    ]
    assert not_passed == [], exchange.log_text()[-3000:]
    assert code == 0, out
    assert {c["id"] for c in document["cases"]} == {
        c.id
        for c in REGISTRY.for_role(Role.EXCHANGE)
        if not any(c.id.startswith(glob.removesuffix("**")) for glob in COUNTERPART_CASES)
    }
    assert document["role"] == "exchange"


#: What an exchange that acts on forged margin-call responses fails.
FORGED_RESPONSE_CASES = {
    "envelope/respond-to-margin-call/forged-signature-refused",
    "envelope/respond-to-margin-call/malleated-signature-refused",
    "envelope/respond-to-margin-call/unverified-undecodable-payload-refused",
    "envelope/respond-to-margin-call/tampered-payload-refused",
    "envelope/respond-to-margin-call/unknown-key-refused",
}


def test_an_exchange_that_accepts_forged_responses_is_caught(
    exchange: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def accept_forged(method: str, refusal: Refusal) -> bytes | None:
        forged = refusal.reason in ("SIGNATURE_INVALID", "KEY_UNKNOWN")
        return b"" if forged and method.endswith("/RespondToMarginCall") else None

    proxy = FaultProxy(
        exchange.address,
        client_tls=TlsConfig.from_dev_pki(reference_parties.pki, CUSTODIAN),
        server_tls=TlsConfig.from_dev_pki(reference_parties.pki, EXCHANGE),
        fault=Fault("accepts forged margin-call responses", on_refusal=accept_forged),
        identities=further_tls(reference_parties),
    )
    address = proxy.start()
    try:
        argv = _exchange_argv(
            reference_parties,
            kit_files,
            address,
            "--account",
            KIT_ACCOUNT,
            # Its family only: the full run before this one has moved the exchange's
            # clock by days (reconciliation/ cut-offs), so a call the custodian agreed
            # to there has since expired into a liquidation of --account.
            "--run",
            "envelope/respond-to-margin-call/**",
            "--report-dir",
            str(tmp_path),
        )
        assert main(argv) == 1
    finally:
        proxy.stop()
    capsys.readouterr()
    cases = json.loads((tmp_path / "results.json").read_text("utf-8"))["cases"]
    assert {c["id"] for c in cases if c["verdict"] == "failed"} == FORGED_RESPONSE_CASES
