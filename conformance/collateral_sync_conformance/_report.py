"""Reports of a run: live terminal progress, ``results.json``, JUnit XML and one HTML page.

Every report names the protocol version and the kit version. The HTML page is
self-contained (inline CSS, no scripts, no external resources) so that it can
be mailed or attached to a CI run as one file.
"""

from __future__ import annotations

import html
import json
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from collateral_sync_conformance._registry import Case, Level
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


def _outcome_line(run: RunResult) -> str:
    failed = run.failed_must()
    stale = [r for r in run.results if r.stale]
    if run.exit_code == 0:
        return "RESULT: PASS (every MUST case passed)"
    reasons = []
    if failed:
        reasons.append(f"{len(failed)} MUST case(s) failed")
    if stale:
        reasons.append(f"{len(stale)} known-failing case(s) passed: the list is stale")
    if run.run_errors:
        # A known-failing entry matching no case, or a counterpart the kit could not serve.
        reasons.append(f"{len(run.run_errors)} run error(s)")
    return "RESULT: FAIL (" + "; ".join(reasons) + ")"


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
        self._write(_outcome_line(run))


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

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#1b1f24;background:#fff}
h1{font-size:1.5rem;margin:0 0 .25rem}
.meta{color:#555;margin-bottom:1.25rem}
.meta code{background:#f2f4f7;padding:0 .3em;border-radius:3px}
.result{font-size:1.1rem;font-weight:600;padding:.6rem .9rem;border-radius:6px;margin:1rem 0}
.result.pass{background:#e6f4ea;color:#1e6b34}.result.fail{background:#fdecea;color:#a1261b}
table{border-collapse:collapse;width:100%;margin-bottom:1.5rem}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-weight:700;font-size:.8rem;padding:.1rem .45rem;border-radius:4px;white-space:nowrap}
.v-passed{background:#e6f4ea;color:#1e6b34}.v-failed{background:#fdecea;color:#a1261b}
.v-skipped{background:#fff4d6;color:#7a5600}.v-expected-failure{background:#e3f2f7;color:#185f73}
.v-error{background:#f6e6f7;color:#7a1f80}
.level{font-size:.8rem;font-weight:600;color:#444}
.id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
details{margin:.3rem 0 .2rem}
summary{cursor:pointer;color:#333}
pre{background:#f6f8fa;border:1px solid #e3e6ea;border-radius:4px;padding:.5rem;overflow:auto;max-height:28rem;white-space:pre-wrap;word-break:break-word;margin:.25rem 0}
.label{font-weight:600;margin-top:.4rem}
.errors li{color:#a1261b}
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _html_case(result: CaseResult) -> str:
    case = result.case
    verdict = result.verdict.value
    cells = (
        f'<td><span class="verdict v-{verdict}">{_esc(verdict)}</span></td>'
        f'<td class="level">{_esc(case.level.value)}</td>'
        f'<td><span class="id">{_esc(case.id)}</span><br>{_esc(case.description)}'
    )
    if result.verdict is not Verdict.PASSED:
        opened = " open" if result.counts_as_failure else ""
        body = [f"<pre>{_esc(result.message)}</pre>"]
        for name in ("sent", "expected", "got"):
            text = getattr(result, name)
            if text:
                body.append(f'<div class="label">{name}</div><pre>{_esc(text)}</pre>')
        cells += f"<details{opened}><summary>details</summary>{''.join(body)}</details>"
    cells += f'</td><td class="num">{result.duration:.3f}&nbsp;s</td>'
    return f"<tr>{cells}</tr>"


def render_html(run: RunResult) -> str:
    """The self-contained report page."""
    counts = run.counts()
    head_cells = "".join(f'<th class="num">{_esc(v.value)}</th>' for v in Verdict)
    rows = "".join(
        f"<tr><th>{_esc(level.value)}</th>"
        + "".join(f'<td class="num">{counts[level][v]}</td>' for v in Verdict)
        + "</tr>"
        for level in Level
    )
    errors = ""
    if run.run_errors:
        items = "".join(f"<li>{_esc(e)}</li>" for e in run.run_errors)
        errors = f'<h2>Run errors</h2><ul class="errors">{items}</ul>'
    outcome_class = "pass" if run.exit_code == 0 else "fail"
    cases = "".join(_html_case(r) for r in run.results)
    title = f"collateral-sync conformance: {run.role.value} at {run.target}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>"
        '<div class="meta">'
        f"protocol <code>{_esc(run.protocol_version)}</code> · "
        f"kit <code>{_esc(run.kit_version)}</code> · "
        f"role <code>{_esc(run.role.value)}</code> · "
        f"target <code>{_esc(run.target)}</code> · "
        f"started {_esc(run.started_at.strftime('%Y-%m-%d %H:%M:%S %Z'))} · "
        f"{len(run.results)} cases in {run.duration:.2f} s"
        + (
            f" · known-failing list <code>{_esc(run.known_failing_file)}</code>"
            if run.known_failing_file
            else ""
        )
        + "</div>"
        f'<div class="result {outcome_class}">{_esc(_outcome_line(run))}</div>'
        f"<table><thead><tr><th>level</th>{head_cells}</tr></thead><tbody>{rows}</tbody></table>"
        f"{errors}"
        "<table><thead><tr><th>verdict</th><th>level</th><th>case</th>"
        f'<th class="num">time</th></tr></thead><tbody>{cases}</tbody></table>'
        "</body></html>\n"
    )


def write_html(run: RunResult, path: Path) -> None:
    path.write_text(render_html(run), encoding="utf-8")


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
