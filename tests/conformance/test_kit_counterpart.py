"""The kit against a reference exchange that dials the kit's own custodian (``--listen``)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Role

from .conftest import CLIENT, CUSTODIAN, EXCHANGE, REGULATOR, Parties, ServerProcess, StartServer

ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def exchange_config(parties: Parties, directory: Path, custodian: str) -> dict[str, Any]:
    """A reference exchange whose custodian is at ``custodian`` (the kit)."""
    return parties.config(
        EXCHANGE,
        "exchange",
        directory,
        peers={CUSTODIAN: custodian, REGULATOR: None},
        exchange={
            "log_origin": ORIGIN,
            "prices": [
                {"asset_id": "BTC", "price": "60000"},
                {"asset_id": "USDC", "price": "1"},
                {"asset_id": "BENJI", "price": "1"},
            ],
        },
    )


def counterpart_argv(
    parties: Parties, target: str, listen: str, state_dir: Path, *extra: str
) -> list[str]:
    """``run`` arguments for an exchange at ``target`` that dials the kit at ``listen``."""
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
        str(parties.pki.ca_cert),
        "--cert",
        str(custodian_tls.cert),
        "--key",
        str(custodian_tls.key),
        "--registry",
        str(parties.registry_path),
        "--kit-key",
        str(parties.key_path(CUSTODIAN)),
        "--kit-key",
        str(parties.key_path(CLIENT)),
        "--listen",
        listen,
        "--state-dir",
        str(state_dir),
        "--log-origin",
        ORIGIN,
        "--no-colour",
        *extra,
    ]


@pytest.fixture(scope="module")
def dialling_exchange(
    start_server: StartServer,
    reference_parties: Parties,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ServerProcess, str, Path]:
    """A reference exchange in test mode whose custodian is the kit: (server, listen, state)."""
    listen = f"127.0.0.1:{free_port()}"
    directory = tmp_path_factory.mktemp("counterpart-exchange")
    server = start_server("exchange", exchange_config(reference_parties, directory, listen))
    return server, listen, tmp_path_factory.mktemp("kit-state")


def run_kit(argv: list[str], report_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    code = main([*argv, "--report-dir", str(report_dir)])
    document: dict[str, Any] = json.loads((report_dir / "results.json").read_text("utf-8"))
    return code, document["cases"]


def test_reference_exchange_passes_every_must_case_against_the_kit_custodian(
    dialling_exchange: tuple[ServerProcess, str, Path],
    reference_parties: Parties,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, listen, state = dialling_exchange
    argv = counterpart_argv(reference_parties, server.address, listen, state)
    code, cases = run_kit(argv, tmp_path)
    out = capsys.readouterr().out
    not_passed = [
        (c["id"], c["verdict"], c["message"])
        for c in cases
        if c["level"] == "MUST" and c["verdict"] != "passed"
    ]
    assert not_passed == [], out + server.log_text()[-3000:]
    assert code == 0, out
    assert f"custodian at {listen}" in out  # the header says what the kit serves
    assert {c["id"] for c in cases} == {c.id for c in REGISTRY.for_role(Role.EXCHANGE)}
