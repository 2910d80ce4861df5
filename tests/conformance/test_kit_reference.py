"""The kit against the reference custodian, a real process over mutual TLS.

Every MUST case must pass against the reference (in test mode, and without
test mode with the cases that need it skipped, never passed); the
known-failing list must fail the run when it goes stale; and the command
works end to end through ``collateral-sync conformance``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Level, Role

from .conftest import (
    KIT_ACCOUNT,
    ROOT,
    Parties,
    ServerProcess,
    StartServer,
    custodian_config,
    kit_argv,
)


def _results(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / "results.json").read_text("utf-8"))
    return document


def _must_not_passed(document: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (c["id"], c["verdict"], c["message"])
        for c in document["cases"]
        if c["level"] == "MUST" and c["verdict"] != "passed"
    ]


def test_reference_custodian_passes_every_must_case(
    custodian: ServerProcess,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        kit_argv(
            kit_files, custodian.address, "--account", KIT_ACCOUNT, "--report-dir", str(tmp_path)
        )
    )
    out = capsys.readouterr().out
    document = _results(tmp_path)
    assert _must_not_passed(document) == [], custodian.log_text()[-3000:]
    assert code == 0, out
    ran = {c["id"] for c in document["cases"]}
    assert ran == {c.id for c in REGISTRY.for_role(Role.CUSTODIAN)}
    assert sum(c["level"] == "MUST" for c in document["cases"]) >= 50
    assert "RESULT: PASS" in out
    for name in ("results.json", "junit.xml", "report.html"):
        assert (tmp_path / name).stat().st_size > 0


def test_stale_known_failing_entries_fail_the_run_against_a_real_server(
    custodian: ServerProcess,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    known = tmp_path / "known-failing.txt"
    known.write_text(
        "# our server is fine now\ntransport/health-serving\nenvelope/no-such-case\n", "utf-8"
    )
    argv = kit_argv(
        kit_files,
        custodian.address,
        "--run",
        "transport/health-serving",
        "--known-failing",
        str(known),
        "--report-dir",
        str(tmp_path),
    )
    assert main(argv) == 1
    out = capsys.readouterr().out
    document = _results(tmp_path)
    [case] = document["cases"]
    assert case["verdict"] == "failed"
    assert case["stale_known_failing"] is True
    assert document["run_errors"] == [
        f"{known}:3: 'envelope/no-such-case' matches no custodian case: remove it"
    ]
    assert "RESULT: FAIL" in out


def test_without_test_mode_cases_needing_test_control_are_skipped_not_passed(
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path_factory.mktemp("kit-custodian-production")
    server = start_server(
        "custodian",
        custodian_config(reference_parties, directory),
        name="custodian-production",
        test_mode=False,
    )
    reports = directory / "reports"
    argv = kit_argv(
        kit_files,
        server.address,
        "--account",
        KIT_ACCOUNT,
        "--run",
        "attestation/**",
        "--run",
        "custodian/**",
        "--report-dir",
        str(reports),
    )
    assert main(argv) == 0
    capsys.readouterr()
    verdicts = {c["id"]: c["verdict"] for c in _results(reports)["cases"]}
    # These need TestControlService (Deposit, AccrueYield): skipped, never passed.
    assert verdicts["custodian/deposit-attested"] == "skipped"
    assert verdicts["custodian/yield-accrual-attested"] == "skipped"
    assert "failed" not in verdicts.values()
    assert "error" not in verdicts.values()
    # Without a test mode the kit grows the log with ordinary pledges instead.
    assert verdicts["attestation/checkpoint-origin-stable"] == "passed"
    assert verdicts["attestation/consistency-proof-verifies"] == "passed"
    assert verdicts["custodian/pledge-accepted"] == "passed"


def test_collateral_sync_conformance_runs_end_to_end(
    custodian: ServerProcess, kit_files: dict[str, Path], tmp_path: Path
) -> None:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [
            str(ROOT / "conformance"),
            str(ROOT / "reference_server"),
            environment.get("PYTHONPATH", ""),
        ]
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "collateral_sync._cli",
            "conformance",
            *kit_argv(kit_files, custodian.address, "--run", "transport/**"),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert any(line.startswith("PASS  MUST   transport/mtls-required") for line in lines)
    assert any(line.startswith("PASS  SHOULD transport/reflection-v1 ") for line in lines)
    assert lines[-1] == "RESULT: PASS (every MUST case passed)"
    musts = [c for c in REGISTRY.for_role(Role.CUSTODIAN) if c.id.startswith("transport/")]
    assert sum(c.level is Level.MUST for c in musts) == sum(
        1 for line in lines if line.startswith("PASS  MUST   transport/")
    )
