"""The ``emergency/cosign/`` cases against the reference exchange and regulator, healthy and broken.

The healthy servers pass every case. Each broken co-signer
(:mod:`.broken_cosigners`) is caught by exactly the cases written for the rule
it breaks. Broken co-signers run as regulators where the rule is the shared
co-signer's (a regulator needs no peer to start), and as exchanges where the
rule is the exchange's own policy or where the exchange's state must be seen
unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import collateral_sync_conformance.cases  # noqa: F401 (registers the kit's cases)
import pytest
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Level, Role

from .broken_cosigners import FAULTS
from .broken_cosigners import main as launch_broken
from .conftest import (
    CUSTODIAN,
    EXCHANGE,
    KIT_ACCOUNT,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
    custodian_config,
    kit_argv,
    regulator_argv,
)
from .test_kit_broken_servers import BrokenServer
from .test_kit_exchange import ORIGIN, _exchange_argv, _wait_until_known

_LAUNCHER = Path(__file__).with_name("broken_cosigners.py")
_COSIGN = ["--run", "emergency/cosign/**"]

#: The cases run against a regulator that expect a refusal with a collateral-sync ErrorInfo.
_REFUSALS = {
    "emergency/cosign/already-signed-refused",
    "emergency/cosign/forged-proposal-refused",
    "emergency/cosign/invalid-cosignature-refused",
    "emergency/cosign/unregistered-cosigner-refused",
    "emergency/cosign/client-signature-refused",
    "emergency/cosign/client-proposer-refused",
    "emergency/cosign/expired-refused",
    "emergency/cosign/wrong-audience-refused",
    "emergency/cosign/malformed-payload-refused",
    "emergency/cosign/missing-account-refused",
    "emergency/cosign/other-exchange-refused",
}


class BrokenCoSigner(BrokenServer):
    """A reference server started through :mod:`.broken_cosigners` with one fault patched in."""

    launcher = _LAUNCHER


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[list[BrokenCoSigner]]:
    started: list[BrokenCoSigner] = []
    yield started
    for server in started:
        server.close()


def _start_broken(
    started: list[BrokenCoSigner], fault: str, role: str, config: dict[str, Any], directory: Path
) -> BrokenCoSigner:
    config_path = directory / f"{role}.json"
    config_path.write_text(json.dumps(config, indent=2))
    server = BrokenCoSigner(
        role=role, config_path=config_path, log_path=directory / f"{role}.log", fault=fault
    )
    started.append(server)
    server.start()
    return server


def _regulator_config(parties: Parties, directory: Path) -> dict[str, Any]:
    # The peers' addresses lead nowhere: co-signing never calls them.
    return parties.config(
        REGULATOR,
        "regulator",
        directory,
        peers={CUSTODIAN: "127.0.0.1:1", EXCHANGE: "127.0.0.1:2"},
    )


def _exchange_config(parties: Parties, directory: Path, custodian: str) -> dict[str, Any]:
    # USDC dear: the kit's pledge of 0.001 USDC is then worth something, and the
    # open-exposure case can expose a small share of it without a margin call.
    return parties.config(
        EXCHANGE,
        "exchange",
        directory,
        peers={CUSTODIAN: custodian},
        exchange={
            "log_origin": ORIGIN,
            "prices": [
                {"asset_id": "BTC", "price": "60000"},
                {"asset_id": "USDC", "price": "1000000"},
                {"asset_id": "BENJI", "price": "1"},
            ],
        },
    )


def _mirror_kit_account(
    parties: Parties, kit_files: dict[str, Path], custodian: str, exchange: str
) -> None:
    """Pledge the kit's account to the exchange at the custodian; wait until the exchange knows it."""
    pledge = kit_argv(
        kit_files, custodian, "--account", KIT_ACCOUNT, "--run", "custodian/pledge-accepted"
    )
    assert main(pledge) == 0
    asyncio.run(_wait_until_known(parties, exchange))


@pytest.fixture(scope="module")
def exchange(
    custodian: ServerProcess,
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """A healthy reference exchange that mirrors the kit's account, with exposure 0."""
    directory = tmp_path_factory.mktemp("cosign-exchange")
    config = _exchange_config(reference_parties, directory, custodian.address)
    server = start_server("exchange", config, name="cosign-exchange")
    _mirror_kit_account(reference_parties, kit_files, custodian.address, server.address)
    return server


@pytest.fixture(scope="module")
def regulator(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    directory = tmp_path_factory.mktemp("cosign-regulator")
    config = _regulator_config(reference_parties, directory)
    return start_server("regulator", config, name="cosign-regulator")


def _cases(argv: list[str], reports: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Run the kit; the cases of its report by id, and its exit code under ``"code"``."""
    code = main([*argv, "--report-dir", str(reports)])
    captured = capsys.readouterr()
    cases = json.loads((reports / "results.json").read_text("utf-8"))["cases"]
    by_id: dict[str, Any] = {c["id"]: c for c in cases}
    assert not any(c["verdict"] in ("error", "skipped") for c in cases), captured.out
    must_failed = any(c["level"] == "MUST" and c["verdict"] == "failed" for c in cases)
    # Non-zero exactly when a MUST case failed.
    assert code == (1 if must_failed else 0), captured.out
    return by_id


def _failed(cases: dict[str, Any]) -> set[str]:
    failed = {case_id for case_id, c in cases.items() if c["verdict"] == "failed"}
    for case_id in failed:
        assert cases[case_id]["failure"]["expected"], cases[case_id]
        assert cases[case_id]["failure"]["got"], cases[case_id]
    return failed


def _cosign_ids(role: Role) -> set[str]:
    return {c.id for c in REGISTRY.for_role(role) if c.id.startswith("emergency/cosign/")}


def test_the_cosign_cases_cover_both_co_signers() -> None:
    exchange = _cosign_ids(Role.EXCHANGE)
    regulator = _cosign_ids(Role.REGULATOR)
    assert regulator <= exchange
    assert exchange - regulator == {
        "emergency/cosign/unknown-account-refused",
        "emergency/cosign/open-exposure-refused",
    }
    # The rules §11.2 fixes are MUST; what a party's policy agrees to is SHOULD.
    should = {c.id for c in REGISTRY if c.id in exchange and c.level is Level.SHOULD}
    assert should == {
        "emergency/cosign/missing-account-refused",
        "emergency/cosign/other-exchange-refused",
        "emergency/cosign/unknown-account-refused",
        "emergency/cosign/open-exposure-refused",
    }
    assert not any(
        c.id.startswith("emergency/cosign/") and Role.CUSTODIAN in c.roles for c in REGISTRY
    )


def test_the_reference_exchange_passes_every_cosign_case(
    exchange: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = _exchange_argv(
        reference_parties, kit_files, exchange.address, "--account", KIT_ACCOUNT, *_COSIGN
    )
    cases = _cases(argv, tmp_path, capsys)
    assert set(cases) == _cosign_ids(Role.EXCHANGE)
    assert _failed(cases) == set(), exchange.log_text()[-3000:]


def test_the_reference_regulator_passes_every_cosign_case(
    regulator: ServerProcess,
    reference_parties: Parties,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cases = _cases(regulator_argv(reference_parties, regulator.address, *_COSIGN), tmp_path, capsys)
    assert set(cases) == _cosign_ids(Role.REGULATOR)
    assert _failed(cases) == set(), regulator.log_text()[-3000:]


def test_without_a_custodian_key_the_cosign_cases_are_skipped_not_passed(
    regulator: ServerProcess,
    reference_parties: Parties,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = regulator_argv(reference_parties, regulator.address, *_COSIGN, keys=(EXCHANGE,))
    assert main([*argv, "--report-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    cases = json.loads((tmp_path / "results.json").read_text("utf-8"))["cases"]
    assert {c["verdict"] for c in cases} == {"skipped"}


#: (fault, the cases that must catch it) when the broken co-signer is a regulator.
REGULATOR_FAULTS: list[tuple[str, set[str]]] = [
    (
        "cosigner-skips-signature-checks",
        {
            "emergency/cosign/forged-proposal-refused",
            "emergency/cosign/invalid-cosignature-refused",
            "emergency/cosign/unregistered-cosigner-refused",
        },
    ),
    (
        "cosigner-unregistered-key-as-key-unknown",
        {"emergency/cosign/unregistered-cosigner-refused"},
    ),
    (
        "cosigner-ignores-key-roles",
        {"emergency/cosign/client-signature-refused", "emergency/cosign/client-proposer-refused"},
    ),
    ("cosigner-cosigns-twice", {"emergency/cosign/already-signed-refused"}),
    ("cosigner-ignores-expiry", {"emergency/cosign/expired-refused"}),
    ("cosigner-ignores-audience", {"emergency/cosign/wrong-audience-refused"}),
    ("cosigner-keeps-replay-state", {"emergency/cosign/same-proposal-cosigned-again"}),
    ("cosigner-reencodes-payload", {"emergency/cosign/signature-appended"}),
    (
        "cosigner-malformed-as-failed-precondition",
        {"emergency/cosign/malformed-payload-refused", "emergency/cosign/missing-account-refused"},
    ),
    # Every refusal must carry its ErrorInfo: caught by every case that expects one.
    ("cosigner-drops-error-info", _REFUSALS),
    ("cosigner-has-no-policy", {"emergency/cosign/other-exchange-refused"}),
]

#: The same when the broken co-signer is an exchange.
EXCHANGE_FAULTS: list[tuple[str, set[str]]] = [
    (
        "cosigner-has-no-policy",
        {
            "emergency/cosign/other-exchange-refused",
            "emergency/cosign/unknown-account-refused",
            "emergency/cosign/open-exposure-refused",
        },
    ),
    # The exchange's side of the shared co-signer, with its state watched for changes.
    ("cosigner-cosigns-twice", {"emergency/cosign/already-signed-refused"}),
]


@pytest.mark.parametrize(
    ("fault", "caught_by"), REGULATOR_FAULTS, ids=[f for f, _ in REGULATOR_FAULTS]
)
def test_a_broken_regulator_cosigner_is_caught_by_its_cases(
    fault: str,
    caught_by: set[str],
    reference_parties: Parties,
    broken: list[BrokenCoSigner],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _regulator_config(reference_parties, tmp_path)
    server = _start_broken(broken, fault, "regulator", config, tmp_path)
    argv = regulator_argv(reference_parties, server.address, *_COSIGN)
    cases = _cases(argv, tmp_path / "reports", capsys)
    assert _failed(cases) == caught_by, server.log_text()[-3000:]


@pytest.mark.parametrize(
    ("fault", "caught_by"), EXCHANGE_FAULTS, ids=[f for f, _ in EXCHANGE_FAULTS]
)
def test_a_broken_exchange_cosigner_is_caught_by_its_cases(
    fault: str,
    caught_by: set[str],
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    broken: list[BrokenCoSigner],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A custodian of its own: one that remembers another exchange process of the same
    # party refuses a fresh exchange's resume from nothing.
    custodian = start_server(
        "custodian",
        custodian_config(reference_parties, tmp_path / "custodian"),
        name=f"cosign-custodian-{fault}",
    )
    config = _exchange_config(reference_parties, tmp_path, custodian.address)
    server = _start_broken(broken, fault, "exchange", config, tmp_path)
    _mirror_kit_account(reference_parties, kit_files, custodian.address, server.address)
    capsys.readouterr()
    argv = _exchange_argv(
        reference_parties, kit_files, server.address, "--account", KIT_ACCOUNT, *_COSIGN
    )
    cases = _cases(argv, tmp_path / "reports", capsys)
    assert _failed(cases) == caught_by, server.log_text()[-3000:]


def test_every_broken_cosigner_is_tested() -> None:
    tested = {fault for fault, _ in [*REGULATOR_FAULTS, *EXCHANGE_FAULTS]}
    assert tested == set(FAULTS)
    caught = set().union(*(cases for _, cases in [*REGULATOR_FAULTS, *EXCHANGE_FAULTS]))
    # Every case is shown able to fail.
    assert caught == _cosign_ids(Role.EXCHANGE)


def test_an_unknown_cosigner_fault_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_broken(["no-such-fault", "serve", "regulator"]) == 2
    assert "usage" in capsys.readouterr().err
