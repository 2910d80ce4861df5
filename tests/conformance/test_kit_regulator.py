"""The kit against the reference regulator, playing both the custodian and the exchange.

The regulator is a real process over mutual TLS; the kit signs statements with
the custodian's and the exchange's keys (and a client key for the wrong-role
case). The parties' addresses in the regulator's configuration are where the kit
serves their ReconciliationService (--listen, --listen-exchange), for the
cases in which the regulator descends position trees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Level, Role

from .conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
    regulator_argv,
)
from .test_kit_counterpart import free_port

#: Where the kit serves the parties' ReconciliationService, which the regulator dials.
LISTEN = {CUSTODIAN: f"127.0.0.1:{free_port()}", EXCHANGE: f"127.0.0.1:{free_port()}"}


@pytest.fixture(scope="module")
def regulator(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    directory = tmp_path_factory.mktemp("kit-regulator")
    config = reference_parties.config(REGULATOR, "regulator", directory, peers=dict(LISTEN))
    return start_server("regulator", config, name="kit-regulator-conformance")


def listening(*extra: str) -> list[str]:
    return ["--listen", LISTEN[CUSTODIAN], "--listen-exchange", LISTEN[EXCHANGE], *extra]


def _results(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / "results.json").read_text("utf-8"))
    return document


def test_reference_regulator_passes_every_must_case(
    regulator: ServerProcess,
    reference_parties: Parties,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = regulator_argv(
        reference_parties, regulator.address, *listening("--report-dir", str(tmp_path))
    )
    code = main(argv)
    out = capsys.readouterr().out
    document = _results(tmp_path)
    not_passed = [
        (c["id"], c["verdict"], c["message"])
        for c in document["cases"]
        if c["level"] == "MUST" and c["verdict"] != "passed"
    ]
    assert not_passed == [], regulator.log_text()[-3000:]
    assert code == 0, out
    assert {c["id"] for c in document["cases"]} == {c.id for c in REGISTRY.for_role(Role.REGULATOR)}
    regulator_cases = [c for c in document["cases"] if c["id"].startswith("regulator/")]
    assert sum(c["level"] == Level.MUST.name for c in regulator_cases) >= 9


def test_without_the_exchange_key_the_pair_cases_are_skipped_not_passed(
    regulator: ServerProcess,
    reference_parties: Parties,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = regulator_argv(
        reference_parties, regulator.address, "--run", "regulator/**", keys=(CUSTODIAN, CLIENT)
    )
    assert main([*argv, "--report-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    verdicts = {c["id"]: c["verdict"] for c in _results(tmp_path)["cases"]}
    assert verdicts["regulator/matched-result-signed"] == "skipped"
    assert verdicts["regulator/breaks-located"] == "skipped"
    assert verdicts["regulator/statement-accepted"] == "passed"
