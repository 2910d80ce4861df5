"""The report writers: results.json, JUnit XML, the HTML page and the terminal."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from html.parser import HTMLParser
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


CLAUSES = ("§3.3/canonical-signature-scalar", "§3.6/verify-before-parse")


def _case(case_id: str, level: Level = Level.MUST, clauses: tuple[str, ...] = ()) -> Case:
    return Case(case_id, level, frozenset({Role.CUSTODIAN}), f"checks {case_id}", _body, clauses)


@pytest.fixture
def run() -> RunResult:
    failed = CaseResult(
        _case("envelope/pledge-collateral/forged-signature-refused", clauses=CLAUSES),
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
        "clauses",
        "verdict",
        "duration_seconds",
        "message",
        "known_failing",
        "stale_known_failing",
        "failure",
    }
    assert forged["clauses"] == list(CLAUSES)
    assert cases["transport/health-serving"]["clauses"] == []
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
    cited = [(p.get("name"), p.get("value")) for p in forged.iter("property")]
    assert cited == [("clause", clause) for clause in CLAUSES]
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


class _Page(HTMLParser):
    """The page's elements (tag, attributes) in document order, and its script's text."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data

    def ids(self) -> list[str]:
        return [a["id"] for _, a in self.elements if "id" in a]

    def index(self, element_id: str) -> int:
        return next(i for i, (_, a) in enumerate(self.elements) if a.get("id") == element_id)


def test_html_is_one_self_contained_page(run: RunResult, tmp_path: Path) -> None:
    write_reports(run, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page == render_html(run)
    assert page.startswith("<!DOCTYPE html>")
    # Nothing fetched from anywhere: no URLs, links, imports or external sources.
    assert not re.search(r"https?://", page)
    for marker in ("<link", "src=", "@import", "url(", "<img", "<iframe"):
        assert marker not in page.lower(), marker
    assert "<style>" in page
    parsed = _Page(page)
    # One inline script, allowed by its hash in the page's Content-Security-Policy; nothing else.
    [script] = parsed.scripts
    assert [a for t, a in parsed.elements if t == "script"] == [{}]
    [csp] = [
        a["content"] for t, a in parsed.elements if a.get("http-equiv") == "Content-Security-Policy"
    ]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp
    # Every link is an anchor on the page itself, or a case's clause in the protocol document.
    hrefs = [a["href"] for t, a in parsed.elements if t == "a"]
    ids = parsed.ids()
    assert len(ids) == len(set(ids))
    assert hrefs
    spec = [h for h in hrefs if h.startswith("PROTOCOL.md#")]
    assert spec == [f"PROTOCOL.md#{clause.split('/')[1]}" for clause in CLAUSES]
    assert all(h.startswith("#") and h[1:] in ids for h in hrefs if h not in spec), hrefs
    assert all(f">{clause}</a>" in page for clause in CLAUSES)
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


def test_html_leads_with_the_verdict_and_the_failures(run: RunResult) -> None:
    page = render_html(run)
    parsed = _Page(page)
    # The verdict, then the failures and errors, then the table of every case.
    assert parsed.index("verdict") < parsed.index("failures") < parsed.index("cases")
    assert re.search(r'<span class="word">FAIL</span><span class="exit">exit code 1</span>', page)
    for count in ("6 cases", "1 passed", "2 failed", "1 skipped", "1 expected-failure", "1 error"):
        assert f">{count}</li>" in page, count
    assert "target <code>127.0.0.1:7441</code>" in page
    assert "role <code>custodian</code>" in page
    # The failure list links the failed and erred cases, MUST before SHOULD.
    failures = page[page.index('<section id="failures">') : page.index("</section>")]
    linked = re.findall(r'href="#case-([^"]+)"', failures)
    assert linked == [
        "envelope/pledge-collateral/forged-signature-refused",
        "custodian/pledge-accepted",
        "transport/reflection-v1",
    ]
    assert "PledgeCollateral: expected a refusal with UNAUTHENTICATED" in failures
    assert "z/gone" in failures
    # Every case is a row with an anchor and what the filter needs.
    rows = [a for t, a in parsed.elements if t == "tr" and "data-verdict" in a]
    assert [r["id"] for r in rows] == [f"case-{r.case.id}" for r in run.results]
    assert [(r["data-verdict"], r["data-level"], r["data-family"]) for r in rows] == [
        (r.verdict.value, r.case.level.value, r.case.id.split("/")[0]) for r in run.results
    ]
    # Without scripts every row shows and the filter controls stay hidden.
    assert not any("hidden" in r for r in rows)
    [form] = [a for t, a in parsed.elements if t == "form"]
    assert form == {"id": "filters", "hidden": ""}


def test_html_folds_long_payloads_and_escapes_server_text(run: RunResult) -> None:
    hostile = '<script>document.title="owned"</script><img src=x onerror=alert(1)>"\'&'
    run.results[1].got = "\n".join(f"line {i} {hostile}" for i in range(200))
    run.results[1].message = f"refused {hostile}"
    page = render_html(run)
    row = page[page.index('id="case-envelope/') : page.index("</tr>", page.index('id="case-env'))]
    assert "<details open><summary>expected" in row
    assert '<details><summary>got <span class="size">(200 lines,' in row
    assert "owned" in page
    assert "<script>document" not in page
    assert "<img" not in page
    assert html.escape(hostile, quote=True) in page
    assert page.count("<script") == 1


def test_html_says_plainly_when_nothing_failed(run: RunResult) -> None:
    run.results = [r for r in run.results if not r.counts_as_failure]
    run.run_errors = []
    page = render_html(run)
    assert "Failures and errors (0)" in page
    assert "None: no case failed and the kit raised no error." in page
    assert '<span class="word">PASS</span><span class="exit">exit code 0</span>' in page


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
