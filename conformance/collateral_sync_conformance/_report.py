"""Reports of a run: live terminal progress, ``results.json``, JUnit XML and one HTML page.

Every report names the protocol version and the kit version; each leads with
``RunResult.outcome_line``. The HTML page is rendered in ``_report_html``.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from collateral_sync_conformance._registry import Case, Level
from collateral_sync_conformance._report_html import render_html, write_html
from collateral_sync_conformance._runner import CaseResult, RunResult, Verdict

__all__ = [
    "RESULTS_FORMAT",
    "RESULTS_FORMAT_VERSION",
    "TerminalReporter",
    "junit_tree",
    "render_html",
    "results_document",
    "write_html",
    "write_json",
    "write_junit",
    "write_reports",
]

RESULTS_FORMAT = "collateral-sync-conformance-results"
RESULTS_FORMAT_VERSION = 1

_LABEL = {
    Verdict.PASSED: "PASS",
    Verdict.FAILED: "FAIL",
    Verdict.SKIPPED: "SKIP",
    Verdict.EXPECTED_FAILURE: "XFAIL",
    Verdict.ERROR: "ERROR",
}
_COLOUR = {
    Verdict.PASSED: "32",
    Verdict.FAILED: "31",
    Verdict.SKIPPED: "33",
    Verdict.EXPECTED_FAILURE: "36",
    Verdict.ERROR: "35",
}


# ------------------------------------------------------------------ terminal


class TerminalReporter:
    """One line per case as it finishes, failure details indented, then a summary."""

    def __init__(self, stream: TextIO | None = None, *, colour: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        if colour is None:
            colour = self._stream.isatty() and "NO_COLOR" not in os.environ
        self._colour = colour
        self._width = 0

    def _write(self, text: str = "") -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def _paint(self, verdict: Verdict, text: str) -> str:
        return f"\033[{_COLOUR[verdict]}m{text}\033[0m" if self._colour else text

    def start(self, run_header: dict[str, str], cases: Sequence[Case]) -> None:
        self._width = max((len(c.id) for c in cases), default=0)
        for key, value in run_header.items():
            self._write(f"{key:<10} {value}")
        self._write(f"{'cases':<10} {len(cases)}")
        self._write()

    def case_finished(self, result: CaseResult) -> None:
        label = self._paint(result.verdict, f"{_LABEL[result.verdict]:<5}")
        self._write(
            f"{label} {result.case.level.value:<6} {result.case.id:<{self._width}} "
            f"{result.duration:7.3f}s"
        )
        if result.verdict is Verdict.PASSED:
            return
        for line in result.message.splitlines() or [""]:
            self._write(f"      {line}")
        if result.verdict in (Verdict.FAILED, Verdict.ERROR):
            for name in ("expected", "got"):
                text = getattr(result, name)
                if text:
                    first, *rest = text.splitlines()
                    suffix = f" (+{len(rest)} lines in the reports)" if rest else ""
                    self._write(f"      {name}: {first[:160]}{suffix}")

    def summary(self, run: RunResult) -> None:
        self._write()
        counts = run.counts()
        verdicts = list(Verdict)
        self._write(f"{'':<8}" + "".join(f"{v.value:>18}" for v in verdicts))
        for level in Level:
            row = counts[level]
            self._write(f"{level.value:<8}" + "".join(f"{row[v]:>18}" for v in verdicts))
        for error in run.run_errors:
            self._write(f"run error: {error}")
        for result in run.results:
            if result.stale:
                self._write(f"known-failing: {result.case.id}: {result.message}")
        self._write(run.outcome_line())


# ------------------------------------------------------------------ JSON


def _case_document(result: CaseResult) -> dict[str, Any]:
    failure = None
    if result.sent is not None or result.expected is not None or result.got is not None:
        failure = {"sent": result.sent, "expected": result.expected, "got": result.got}
    return {
        "id": result.case.id,
        "level": result.case.level.value,
        "roles": sorted(r.value for r in result.case.roles),
        "description": result.case.description,
        "clauses": list(result.case.clauses),
        "verdict": result.verdict.value,
        "duration_seconds": round(result.duration, 6),
        "message": result.message,
        "known_failing": result.known_failing,
        "stale_known_failing": result.stale,
        "failure": failure,
    }


def results_document(run: RunResult) -> dict[str, Any]:
    """The content of ``results.json``."""
    counts = run.counts()
    return {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_FORMAT_VERSION,
        "protocol_version": run.protocol_version,
        "kit_version": run.kit_version,
        "role": run.role.value,
        "target": run.target,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat(),
        "duration_seconds": round(run.duration, 6),
        "known_failing_file": run.known_failing_file,
        "passed": run.exit_code == 0,
        "exit_code": run.exit_code,
        "summary": {
            "total": len(run.results),
            "by_level": {
                level.value: {v.value: n for v, n in counts[level].items()} for level in Level
            },
            "by_verdict": {v.value: sum(counts[level][v] for level in Level) for v in Verdict},
        },
        "run_errors": list(run.run_errors),
        "cases": [_case_document(r) for r in run.results],
    }


def write_json(run: RunResult, path: Path) -> None:
    path.write_text(json.dumps(results_document(run), indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ JUnit XML


def _details(result: CaseResult) -> str:
    parts = [result.message]
    for name in ("sent", "expected", "got"):
        text = getattr(result, name)
        if text:
            parts.append(f"--- {name} ---\n{text}")
    return "\n".join(parts)


def junit_tree(run: RunResult) -> ET.ElementTree[ET.Element]:
    """JUnit XML (the common Jenkins/Ant schema): one testsuite, one testcase per case."""
    counts = {v: sum(1 for r in run.results if r.verdict is v) for v in Verdict}
    stale_entries = len(run.run_errors)
    failures = counts[Verdict.FAILED] + stale_entries
    suite_name = f"collateral-sync conformance ({run.role.value})"
    suites = ET.Element(
        "testsuites",
        name=suite_name,
        tests=str(len(run.results) + stale_entries),
        failures=str(failures),
        errors=str(counts[Verdict.ERROR]),
        skipped=str(counts[Verdict.SKIPPED] + counts[Verdict.EXPECTED_FAILURE]),
        time=f"{run.duration:.3f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=suite_name,
        tests=suites.get("tests", "0"),
        failures=str(failures),
        errors=str(counts[Verdict.ERROR]),
        skipped=suites.get("skipped", "0"),
        time=f"{run.duration:.3f}",
        timestamp=run.started_at.strftime("%Y-%m-%dT%H:%M:%S"),
        hostname=run.target,
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("protocol_version", run.protocol_version),
        ("kit_version", run.kit_version),
        ("role", run.role.value),
        ("target", run.target),
    ):
        ET.SubElement(properties, "property", name=name, value=value)
    for result in run.results:
        case = result.case
        element = ET.SubElement(
            suite,
            "testcase",
            classname=f"{run.role.value}.{case.id.rsplit('/', 1)[0].replace('/', '.')}",
            name=f"{case.id} [{case.level.value}]",
            time=f"{result.duration:.3f}",
        )
        if case.clauses:
            # The clauses of docs/PROTOCOL.md the case checks, one property each.
            cited = ET.SubElement(element, "properties")
            for clause in case.clauses:
                ET.SubElement(cited, "property", name="clause", value=clause)
        if result.verdict is Verdict.FAILED:
            failure = ET.SubElement(
                element, "failure", message=result.message, type=case.level.value
            )
            failure.text = _details(result)
        elif result.verdict is Verdict.ERROR:
            error = ET.SubElement(element, "error", message="kit error", type="error")
            error.text = _details(result)
        elif result.verdict is Verdict.SKIPPED:
            ET.SubElement(element, "skipped", message=result.message)
        elif result.verdict is Verdict.EXPECTED_FAILURE:
            ET.SubElement(
                element, "skipped", message=f"expected failure (known-failing): {result.message}"
            )
    for error_text in run.run_errors:
        element = ET.SubElement(
            suite,
            "testcase",
            classname=f"{run.role.value}.run",
            name=error_text,
            time="0",
        )
        ET.SubElement(element, "failure", message=error_text, type="stale")
    ET.indent(suites)
    return ET.ElementTree(suites)


def write_junit(run: RunResult, path: Path) -> None:
    junit_tree(run).write(path, encoding="utf-8", xml_declaration=True)


# ------------------------------------------------------------------ HTML
#
# The page leads with what failed: the verdict, then the failures and errors,
# each linking to its row; then the counts per level; then every case, with a
# filter. Everything is in the HTML itself and readable with scripts disabled;
# the one inline script only adds the filter (and lifts it when a link points
# at a row it hides). A Content-Security-Policy lets that script (by its hash)
# and inline styles run, and nothing else: no fetches, no other scripts.


def write_reports(run: RunResult, directory: Path) -> list[Path]:
    """``results.json``, ``junit.xml`` and ``report.html`` in ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, writer in (
        ("results.json", write_json),
        ("junit.xml", write_junit),
        ("report.html", write_html),
    ):
        path = directory / name
        writer(run, path)
        written.append(path)
    return written
