"""Five runs in a row against one reference server give the same verdict for every case.

A kit whose verdicts wander (a race in a case, state one run leaves for the
next) cannot be trusted with servers it has never seen: a flaky failure
sends an integrator hunting a fault that is not there, a flaky pass hides
one. Each role's reference server is started once and the kit run against it
five times; every run's verdicts must equal the first's, and no MUST case
may fail or err.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from collateral_sync_conformance import main

from . import test_kit_regulator
from .conftest import KIT_ACCOUNT, Parties, ServerProcess, kit_argv, regulator_argv

# The server of that module's tests, as a fixture of this module too. The exchange's
# runs are in test_kit_stability_exchange.py: a reference exchange dials this module's
# custodian as the kit's exchange party, and its stream would replace the kit's.
regulator = test_kit_regulator.regulator

RUNS = 5

__all__ = ["five_runs"]


def _verdicts(argv: list[str], reports: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    main([*argv, "--report-dir", str(reports)])
    capsys.readouterr()
    cases = json.loads((reports / "results.json").read_text("utf-8"))["cases"]
    broken = [
        c["id"] for c in cases if c["level"] == "MUST" and c["verdict"] in ("failed", "error")
    ]
    assert not broken, f"MUST cases not passed against a reference server: {broken}"
    return {c["id"]: c["verdict"] for c in cases}


def five_runs(
    argv: Callable[[], list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _verdicts(argv(), tmp_path / "run-1", capsys)
    assert first, "the kit ran no case"
    for run in range(2, RUNS + 1):
        verdicts = _verdicts(argv(), tmp_path / f"run-{run}", capsys)
        changed = {
            case: (first.get(case), verdict)
            for case, verdict in verdicts.items()
            if first.get(case) != verdict
        }
        assert not changed, f"run {run} differs from run 1 (case: (run 1, run {run})): {changed}"


def test_five_runs_against_the_custodian_agree(
    custodian: ServerProcess,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    five_runs(
        lambda: kit_argv(kit_files, custodian.address, "--account", KIT_ACCOUNT),
        tmp_path,
        capsys,
    )


def test_five_runs_against_the_regulator_agree(
    regulator: ServerProcess,
    reference_parties: Parties,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    five_runs(
        lambda: regulator_argv(
            reference_parties, regulator.address, *test_kit_regulator.listening()
        ),
        tmp_path,
        capsys,
    )
