"""The report writers: results.json, JUnit XML, the HTML page and the terminal."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import collateral_sync
import pytest
from collateral_sync_conformance._registry import Case, Level, Role
from collateral_sync_conformance._report import (
    RESULTS_FORMAT,
    TerminalReporter,
    render_html,
    results_document,
    write_reports,
)
from collateral_sync_conformance._runner import CaseResult, RunResult, Verdict


async def _body(ctx: object) -> None:
    return None


def _case(case_id: str, level: Level = Level.MUST) -> Case:
    return Case(case_id, level, frozenset({Role.CUSTODIAN}), f"checks {case_id}", _body)


@pytest.fixture
def run() -> RunResult:
    failed = CaseResult(
        _case("envelope/pledge-collateral/forged-signature-refused"),
        Verdict.FAILED,
        0.0123,
        "PledgeCollateral: expected a refusal with UNAUTHENTICATED, but the call succeeded",
        sent='{"rpc": "PledgeCollateral", "request": "<script>alert(1)</script>"}',
        expected="UNAUTHENTICATED with ErrorInfo reason SIGNATURE_INVALID",
        got='{"status": "OK"}',
    )
    stale = CaseResult(
        _case("transport/reflection-v1", Level.SHOULD),
        Verdict.FAILED,
        0.001,
        "listed in the known-failing file known.txt but passed: remove the entry",
        expected="a failure (the case is listed as known-failing)",
        got="passed",
        known_failing=True,
        stale=True,
    )
    return RunResult(
        role=Role.CUSTODIAN,
        target="127.0.0.1:7441",
        started_at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
        finished_at=datetime(2026, 11, 23, 12, 0, 2, tzinfo=UTC),
        results=[
            CaseResult(_case("transport/health-serving"), Verdict.PASSED, 0.002),
            failed,
            CaseResult(
                _case("attestation/checkpoint-origin-stable"),
                Verdict.SKIPPED,
                0.001,
                "the server does not offer TestControlService.deposit",
            ),
            CaseResult(
                _case("attestation/inclusion-proof-verifies"),
                Verdict.EXPECTED_FAILURE,
                0.004,
                "the inclusion proof does not verify",
                expected="root abc",
                got="root def",
                known_failing=True,
            ),
            CaseResult(
                _case("custodian/pledge-accepted"), Verdict.ERROR, 0.5, "Traceback: KeyError"
            ),
            stale,
        ],
        run_errors=["known.txt:3: 'z/gone' matches no custodian case: remove it"],
        known_failing_file="known.txt",
    )


def test_results_json_carries_versions_counts_and_failure_details(
    run: RunResult, tmp_path: Path
) -> None:
    write_reports(run, tmp_path)
    document = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert document == results_document(run)
    assert document["format"] == RESULTS_FORMAT
    assert document["format_version"] == 1
    assert document["protocol_version"] == collateral_sync.PROTOCOL_VERSION == "collateral_sync.v1"
    assert document["kit_version"] == collateral_sync.__version__
    assert document["role"] == "custodian"
    assert document["target"] == "127.0.0.1:7441"
    assert document["passed"] is False
    assert document["exit_code"] == 1
    assert document["summary"]["total"] == 6
    assert document["summary"]["by_level"]["MUST"] == {
        "passed": 1,
        "failed": 1,
        "skipped": 1,
        "expected-failure": 1,
        "error": 1,
    }
    assert document["summary"]["by_level"]["SHOULD"]["failed"] == 1
    assert document["summary"]["by_verdict"]["failed"] == 2
    assert document["run_errors"] == run.run_errors
    cases = {c["id"]: c for c in document["cases"]}
    assert list(cases) == [r.case.id for r in run.results]
    forged = cases["envelope/pledge-collateral/forged-signature-refused"]
    assert set(forged) == {
        "id",
        "level",
        "roles",
        "description",
        "verdict",
        "duration_seconds",
        "message",
        "known_failing",
        "stale_known_failing",
        "failure",
    }
    assert forged["verdict"] == "failed"
    assert forged["level"] == "MUST"
    assert forged["failure"]["expected"].startswith("UNAUTHENTICATED")
    assert forged["failure"]["got"] == '{"status": "OK"}'
    assert cases["transport/health-serving"]["failure"] is None
    assert cases["transport/reflection-v1"]["stale_known_failing"] is True


def test_junit_xml_parses_and_counts_like_the_run(run: RunResult, tmp_path: Path) -> None:
    write_reports(run, tmp_path)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.tag == "testsuites"
    [suite] = root.findall("testsuite")
    # 6 cases + 1 stale entry; failures = 2 failed cases + the stale entry.
    assert (
        suite.get("tests"),
        suite.get("failures"),
        suite.get("errors"),
        suite.get("skipped"),
    ) == (
        "7",
        "3",
        "1",
        "2",
    )
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["protocol_version"] == collateral_sync.PROTOCOL_VERSION
    assert properties["kit_version"] == collateral_sync.__version__
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    forged = cases["envelope/pledge-collateral/forged-signature-refused [MUST]"]
    assert forged.get("classname") == "custodian.envelope.pledge-collateral"
    [failure] = forged.findall("failure")
    assert "but the call succeeded" in (failure.get("message") or "")
    assert "--- sent ---" in (failure.text or "")
    assert "<script>" in (failure.text or "")
    assert cases["transport/health-serving [MUST]"].findall("*") == []
    assert cases["custodian/pledge-accepted [MUST]"].find("error") is not None
    skipped = cases["attestation/inclusion-proof-verifies [MUST]"].find("skipped")
    assert skipped is not None
    assert "expected failure" in (skipped.get("message") or "")
    assert cases["attestation/checkpoint-origin-stable [MUST]"].find("skipped") is not None
    stale = [c for c in suite.findall("testcase") if "z/gone" in (c.get("name") or "")]
    assert len(stale) == 1
    assert stale[0].find("failure") is not None


def test_html_is_one_self_contained_page(run: RunResult, tmp_path: Path) -> None:
    write_reports(run, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page == render_html(run)
    assert page.startswith("<!DOCTYPE html>")
    # Nothing fetched from anywhere: no URLs, scripts, links, imports or external sources.
    assert not re.search(r"https?://", page)
    for marker in ("<script", "<link", "src=", "href=", "@import", "url("):
        assert marker not in page.lower(), marker
    assert "<style>" in page
    # Content is escaped, never interpreted.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert collateral_sync.PROTOCOL_VERSION in page
    assert collateral_sync.__version__ in page
    for result in run.results:
        assert result.case.id in page
        assert f"v-{result.verdict.value}" in page
    assert "UNAUTHENTICATED with ErrorInfo reason SIGNATURE_INVALID" in page
    assert "RESULT: FAIL" in page
    assert "z/gone" in page


def test_terminal_progress_and_summary(run: RunResult) -> None:
    stream = io.StringIO()
    reporter = TerminalReporter(stream, colour=False)
    reporter.start(
        {"kit": "k", "protocol": collateral_sync.PROTOCOL_VERSION}, [r.case for r in run.results]
    )
    for result in run.results:
        reporter.case_finished(result)
    reporter.summary(run)
    text = stream.getvalue()
    assert "\033[" not in text
    lines = text.splitlines()
    assert any(
        line.startswith("PASS  MUST   transport/health-serving") and line.endswith("0.002s")
        for line in lines
    )
    assert any(line.startswith("FAIL  MUST   envelope/pledge-collateral/forged") for line in lines)
    assert "      expected: UNAUTHENTICATED with ErrorInfo reason SIGNATURE_INVALID" in lines
    assert any(
        line.startswith("XFAIL MUST   attestation/inclusion-proof-verifies") for line in lines
    )
    assert any(
        line.startswith("SKIP  MUST   attestation/checkpoint-origin-stable") for line in lines
    )
    must_row = next(line for line in lines if line.startswith("MUST "))
    assert must_row.split() == ["MUST", "1", "1", "1", "1", "1"]
    assert "run error: known.txt:3: 'z/gone' matches no custodian case: remove it" in lines
    # A failed and an erred MUST case, a listed case that passed, an entry matching nothing.
    assert lines[-1] == (
        "RESULT: FAIL (2 MUST case(s) failed; 1 known-failing case(s) passed: the list is "
        "stale; 1 run error(s))"
    )
    coloured = io.StringIO()
    TerminalReporter(coloured, colour=True).case_finished(run.results[0])
    assert "\033[32mPASS" in coloured.getvalue()


def test_a_clean_run_says_pass(run: RunResult) -> None:
    run.results = [r for r in run.results if r.verdict is Verdict.PASSED]
    run.run_errors = []
    assert results_document(run)["passed"] is True
    assert "RESULT: PASS" in render_html(run)
