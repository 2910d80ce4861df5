"""The conformance kit's mutation score over the reference servers' rule modules.

``make mutation`` (outside CI: it takes about ten seconds per mutant) runs
cosmic-ray over the modules where the protocol's rules live, with the kit
against a reference server as the only test: a mutant is *killed* when the
kit run fails (some MUST case fails, or the server does not start), and
*survives* when every MUST case still passes. The score is killed / total.

Mutants are made in a fresh clone of ``HEAD`` in a temporary directory, so the
working tree is never touched; the clone's ``sdk``, ``reference_server`` and
``conformance`` come first on ``PYTHONPATH``, ahead of the editable install.

    python scripts/mutation.py [--family custodian|exchange] [--keep DIR]

Operators: cosmic-ray's core set, less binary-operator replacements into
operators that rule code never uses (bit operations, powers, modulo, floor
division): those die of a TypeError on the first call and would only pad the
score.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SERVER = "reference_server/collateral_sync_reference"

#: Per family: the rule modules mutated, and the kit run that must catch them.
FAMILIES = {
    "custodian": (
        [
            f"{_SERVER}/custodian/pledges.py",
            f"{_SERVER}/custodian/pledge_releases.py",
            f"{_SERVER}/custodian/redemptions.py",
            f"{_SERVER}/custodian/liquidations.py",
            f"{_SERVER}/common/access.py",
        ],
        "tests/conformance/test_kit_reference.py::test_reference_custodian_passes_every_must_case",
    ),
    "exchange": (
        [
            f"{_SERVER}/exchange/credit_lines.py",
            f"{_SERVER}/exchange/margin_calls.py",
            f"{_SERVER}/exchange/holdings.py",
            f"{_SERVER}/exchange/pledge_releases.py",
            f"{_SERVER}/exchange/custodian_silence.py",
        ],
        "tests/conformance/test_kit_exchange.py::test_reference_exchange_passes_every_must_case "
        "tests/conformance/test_kit_counterpart.py",
    ),
}

_EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_.*_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|Mod|FloorDiv)$",
    r"core/ReplaceBinaryOperator_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|Mod|FloorDiv)_.*",
]


def _config(modules: list[str], tests: str, clone: Path) -> str:
    python = sys.executable
    # The clone's own packages, ahead of the editable install: the mutants, and an SDK
    # and kit nobody edits while the run lasts.
    path = os.pathsep.join(
        str(clone / package) for package in ("sdk", "reference_server", "conformance")
    )
    # Not a shell: cosmic-ray splits the command and runs it in the clone.
    command = f"env PYTHONPATH={path} {python} -m pytest -x -q -p no:cacheprovider {tests}"
    excluded = ", ".join(json.dumps(pattern) for pattern in _EXCLUDED_OPERATORS)
    return "\n".join(
        [
            "[cosmic-ray]",
            f"module-path = {json.dumps(modules)}",
            "timeout = 180.0",
            "excluded-modules = []",
            f"test-command = {json.dumps(command)}",
            "[cosmic-ray.distributor]",
            'name = "local"',
            "[cosmic-ray.filters.operators-filter]",
            f"exclude-operators = [{excluded}]",
            "",
        ]
    )


def _run(*command: str, cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True)


def _survivors(session: Path) -> tuple[int, int, list[str]]:
    """(total, killed, a line per surviving mutant) from cosmic-ray's session database."""
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT m.module_path, m.operator_name, m.occurrence, m.start_pos_row, r.test_outcome "
            "FROM mutation_specs m JOIN work_results r ON m.job_id = r.job_id"
        ).fetchall()
    # Filtered-out operators have no test outcome; INCOMPETENT mutants (that do not
    # even import) are neither killed nor survivors, as cosmic-ray's own report has it.
    judged = [r for r in rows if r[4] in ("KILLED", "SURVIVED")]
    survived = [
        f"{module}:{row} {operator} #{occurrence}"
        for module, operator, occurrence, row, outcome in judged
        if outcome == "SURVIVED"
    ]
    return len(judged), len(judged) - len(survived), sorted(survived)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The kit's mutation score over rule modules.")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="custodian")
    parser.add_argument(
        "--keep", type=Path, help="work here and keep the session (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    tool = shutil.which("cosmic-ray", path=str(Path(sys.executable).parent))
    if tool is None:
        print("cosmic-ray is not installed: make mutation installs it", file=sys.stderr)
        return 2
    modules, tests = FAMILIES[args.family]
    work = args.keep or Path(tempfile.mkdtemp(prefix="collateral-sync-mutation-"))
    work.mkdir(parents=True, exist_ok=True)
    clone = work / "clone"
    if not clone.exists():
        _run("git", "clone", "--quiet", str(ROOT), str(clone), cwd=work)
    config = work / "cosmic-ray.toml"
    config.write_text(_config(modules, tests, clone), "utf-8")
    session = work / "session.sqlite"
    bin_dir = Path(tool).parent
    if not session.exists():
        _run(tool, "init", str(config), str(session), cwd=clone)
        _run(str(bin_dir / "cr-filter-operators"), str(session), str(config), cwd=clone)
        _run(tool, "baseline", str(config), cwd=clone)
    _run(tool, "exec", str(config), str(session), cwd=clone)
    total, killed, survived = _survivors(session)
    if total == 0:
        print("no mutant was judged: see the session's outputs (cosmic-ray dump)", file=sys.stderr)
        return 1
    print(f"family {args.family}: {killed} of {total} mutants killed ({killed / total:.1%})")
    for line in survived:
        print(f"  survived {line}")
    print(f"session: {session}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
