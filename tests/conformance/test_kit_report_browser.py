"""The HTML report in a real browser: Debian's chromium, headless.

The page must lead with what failed: the failure list within the first screen
of a 1280x800 window even when the failures come last among ~130 cases, every
failure link landing on a row, and the filter (``?verdict=failed``) hiding the
other rows. Chromium is Debian's package; when it is missing and we are root
with apt-get, the session installs it (as ``make setup`` does). When it cannot
be had the test fails, saying so: it never skips.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from collateral_sync_conformance._registry import Case, Level, Role
from collateral_sync_conformance._report import render_html
from collateral_sync_conformance._runner import CaseResult, RunResult, Verdict

CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1280, 800
FAMILIES = ("transport", "envelope", "attestation", "custodian", "access", "emergency")
HOSTILE = (
    "<script>document.documentElement.setAttribute('data-pwned','script')</script>"
    "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','img')\">"
)


def _apt_get_install(apt_get: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [apt_get, "install", "-y", "chromium"],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


@pytest.fixture(scope="session")
def chromium() -> Path | str:
    """Debian's chromium, installed once per session with apt-get when missing and root.

    When it cannot be had: why, as a string, for the test to fail with (a
    failure, not a setup error and never a skip).
    """
    if CHROMIUM.exists():
        return CHROMIUM
    apt_get = shutil.which("apt-get")
    how = "install Debian's chromium (`make setup` as root, or `apt-get install -y chromium`)"
    if apt_get is None or os.geteuid() != 0:
        return (
            f"{CHROMIUM} is missing and cannot be installed here "
            f"({'no apt-get' if apt_get is None else 'not root'}): {how}"
        )
    done = _apt_get_install(apt_get)
    if done.returncode != 0:
        # Package lists may be missing or stale: refresh them once and retry.
        subprocess.run(
            [apt_get, "update"], capture_output=True, text=True, timeout=600, check=False
        )
        done = _apt_get_install(apt_get)
    if done.returncode != 0 or not CHROMIUM.exists():
        return (
            f"`apt-get install -y chromium` failed (exit {done.returncode}); {how}:\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return CHROMIUM


async def _body(ctx: object) -> None:
    return None


def _run() -> RunResult:
    """130 cases; the failures and the kit error come last, where they used to be buried."""
    results = []
    for i in range(130):
        case = Case(
            f"{FAMILIES[i % len(FAMILIES)]}/rpc-{i // 10}/case-{i}",
            Level.SHOULD if i % 5 == 0 else Level.MUST,
            frozenset({Role.CUSTODIAN}),
            f"checks that the server does what §{i % 13}.{i % 4} asks",
            _body,
        )
        if i in (121, 125, 129):
            result = CaseResult(
                case,
                Verdict.FAILED,
                0.012,
                f"PledgeCollateral: expected a refusal, but the call succeeded {HOSTILE}",
                sent="\n".join(f'  "field{j}": "{HOSTILE}",' for j in range(300)),
                expected="FAILED_PRECONDITION with ErrorInfo reason STATEMENT_EXPIRED",
                got=f'{{"status": "OK", "note": "{HOSTILE}"}}',
            )
        elif i == 127:
            result = CaseResult(
                case,
                Verdict.ERROR,
                0.2,
                "the kit raised an unexpected exception:\n"
                + "".join(f'  File "kit.py", line {n}, in body\n' for n in range(40))
                + "KeyError: 'root'",
            )
        elif i % 17 == 3:
            result = CaseResult(case, Verdict.SKIPPED, 0.001, "no TestControlService.deposit")
        elif i == 60:
            result = CaseResult(
                case,
                Verdict.EXPECTED_FAILURE,
                0.01,
                "the proof does not verify",
                known_failing=True,
            )
        else:
            result = CaseResult(case, Verdict.PASSED, 0.003)
        results.append(result)
    return RunResult(
        role=Role.CUSTODIAN,
        target="custodian.example.test:7441",
        started_at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
        finished_at=datetime(2026, 11, 23, 12, 0, 9, tzinfo=UTC),
        results=results,
    )


# Runs after the page's own script; records where things landed. The page's
# Content-Security-Policy admits scripts by hash, so the probe's hash is added.
_PROBE = """
(function () {
  var d = document, list = d.querySelectorAll("#failures li");
  function top(e) { return Math.round(e.getBoundingClientRect().top); }
  function bottom(e) { return Math.round(e.getBoundingClientRect().bottom); }
  d.documentElement.setAttribute("data-probe", JSON.stringify({
    viewport: [innerWidth, innerHeight],
    scrolled: scrollY,
    failuresTop: top(d.getElementById("failures")),
    failureItems: list.length,
    lastFailureBottom: list.length ? bottom(list[list.length - 1]) : null,
    casesTop: top(d.getElementById("cases")),
    filtersShown: d.getElementById("filters").offsetParent !== null
  }));
}());
"""


def _with_probe(page: str) -> str:
    digest = base64.b64encode(hashlib.sha256(_PROBE.encode()).digest()).decode()
    head, marker, rest = page.partition("script-src ")
    assert marker, "the page has no script-src policy"
    return f"{head}{marker}'sha256-{digest}' {rest}".replace(
        "</body>", f"<script>{_PROBE}</script></body>"
    )


class _Dom(HTMLParser):
    """The dumped DOM: every element's attributes, and the filter's "shown" line."""

    def __init__(self, dom: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.shown = ""
        self._in_shown = False
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        self._in_shown = attributes.get("id") == "f-shown"

    def handle_endtag(self, tag: str) -> None:
        self._in_shown = False

    def handle_data(self, data: str) -> None:
        if self._in_shown:
            self.shown += data

    def by_id(self) -> dict[str, tuple[str, dict[str, str]]]:
        return {a["id"]: (t, a) for t, a in self.elements if "id" in a}

    def rows(self) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == "tr" and "data-verdict" in a]


def _dump(chromium: Path, url: str, profile: Path) -> _Dom:
    done = subprocess.run(
        [
            str(chromium),
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--virtual-time-budget=2000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "<html" in done.stdout, done.stderr[-3000:]
    return _Dom(done.stdout)


def _probe(dom: _Dom) -> dict[str, Any]:
    [root] = [a for t, a in dom.elements if t == "html"]
    assert "data-pwned" not in root, "server text was interpreted as HTML"
    assert "data-probe" in root, "the probe did not run (the page's policy refused it?)"
    probe: dict[str, Any] = json.loads(root["data-probe"])
    return probe


def test_the_report_leads_with_its_failures_in_a_real_browser(
    chromium: Path | str, tmp_path: Path
) -> None:
    if isinstance(chromium, str):
        pytest.fail(chromium, pytrace=False)
    run = _run()
    page = render_html(run)
    path = tmp_path / "report.html"
    path.write_text(_with_probe(page), encoding="utf-8")
    url = path.as_uri()
    profile = tmp_path / "profile"
    bad = [r for r in run.results if r.counts_as_failure]

    # As opened: the failure list, all of it, within the first screen.
    dom = _dump(chromium, url, profile)
    probe = _probe(dom)
    assert probe["scrolled"] == 0
    viewport_height = probe["viewport"][1]
    assert 0 < viewport_height <= HEIGHT
    assert probe["failureItems"] == len(bad) == 4
    assert 0 < probe["failuresTop"] < viewport_height, probe
    assert probe["lastFailureBottom"] <= viewport_height, probe
    assert probe["casesTop"] > probe["lastFailureBottom"], probe
    assert probe["filtersShown"] is True
    # Each failure link lands on its case's row.
    elements = dom.by_id()
    failures_at = dom.elements.index(elements["failures"])
    cases_at = dom.elements.index(elements["counts"])
    links = [a["href"] for t, a in dom.elements[failures_at:cases_at] if t == "a"]
    assert links == [
        f"#case-{r.case.id}" for r in sorted(bad, key=lambda r: r.case.level is not Level.MUST)
    ]
    for link in links:
        tag, row = elements[link[1:]]
        assert tag == "tr"
        assert row["data-verdict"] in ("failed", "error")
    rows = dom.rows()
    assert len(rows) == 130
    assert not any("hidden" in r for r in rows)
    assert dom.shown == "130 of 130 cases shown"

    # ?verdict=failed: only the failed rows remain.
    dom = _dump(chromium, f"{url}?verdict=failed", profile)
    _probe(dom)
    shown = [r["id"] for r in dom.rows() if "hidden" not in r]
    assert shown == [f"case-{r.case.id}" for r in run.results if r.verdict is Verdict.FAILED]
    assert dom.shown == "3 of 130 cases shown"

    # Level and family combine with it.
    dom = _dump(chromium, f"{url}?verdict=failed,error&level=MUST&family=custodian", profile)
    shown = [r["id"] for r in dom.rows() if "hidden" not in r]
    assert shown == [
        f"case-{r.case.id}"
        for r in bad
        if r.case.level is Level.MUST and r.case.id.startswith("custodian/")
    ]
    assert shown

    # A link to a row the filter hides lifts the filter.
    target = f"case-{bad[0].case.id}"
    dom = _dump(chromium, f"{url}?verdict=passed#{target}", profile)
    row = dom.by_id()[target][1]
    assert "hidden" not in row
    assert dom.shown == "130 of 130 cases shown"
