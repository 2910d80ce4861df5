"""The HTML page of a run: verdict first, then what failed, then every case with a filter.

Self-contained (inline CSS, one small inline script allowed by hash in the
page's Content-Security-Policy, no external resources), so that it can be
mailed or attached to a CI run as one file. Without scripts every row shows;
the filter (verdict, level, family, also read from the address) is an
addition. Server-controlled text is escaped everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Sequence
from pathlib import Path

from collateral_sync_conformance._registry import Level
from collateral_sync_conformance._runner import CaseResult, RunResult, Verdict

__all__ = ["render_html", "write_html"]


_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;padding:1.25rem 2rem 3rem;color:#1b1f24;background:#fff}
h1{font-size:1.25rem;margin:0 0 .6rem;font-weight:600}
h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
code,.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
.banner{display:flex;flex-wrap:wrap;align-items:baseline;gap:.4rem 1rem;padding:.7rem 1rem;border-radius:6px;margin:0 0 .5rem}
.banner.pass{background:#e6f4ea;color:#1e6b34}.banner.fail{background:#fdecea;color:#a1261b}
.banner .word{font-size:1.6rem;font-weight:800;letter-spacing:.04em}
.banner .exit{font-weight:600}
.counts{list-style:none;margin:.4rem 0;padding:0;display:flex;flex-wrap:wrap;gap:.4rem}
.counts li{padding:.1rem .55rem;border-radius:4px;font-weight:600;font-size:.9rem}
.counts li.zero{opacity:.5;font-weight:400}
.meta{color:#555;margin:.3rem 0 0}
.meta code{background:#f2f4f7;padding:0 .3em;border-radius:3px}
#failures{border:1px solid #e3e6ea;border-radius:6px;padding:.2rem 1rem .6rem;margin-top:1rem}
#failures h2{margin-top:.6rem}
#failures ol{margin:.2rem 0;padding-left:1.6rem}
#failures li{margin:.25rem 0}
#failures .msg{color:#333;display:block;overflow-wrap:anywhere}
#failures .none{font-weight:600;color:#1e6b34}
.run-errors li{color:#a1261b;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;margin-bottom:1rem}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.levels{width:auto}
.verdict{font-weight:700;font-size:.8rem;padding:.1rem .45rem;border-radius:4px;white-space:nowrap}
.v-passed{background:#e6f4ea;color:#1e6b34}.v-failed{background:#fdecea;color:#a1261b}
.v-skipped{background:#fff4d6;color:#7a5600}.v-expected-failure{background:#e3f2f7;color:#185f73}
.v-error{background:#f6e6f7;color:#7a1f80}
.level{font-size:.8rem;font-weight:600;color:#444}
tr[id]{scroll-margin-top:1rem}
tr:target>td{background:#fffbe6}
tr.bad>td:first-child{box-shadow:inset 3px 0 #a1261b}
.desc{color:#444}
.clauses{font-size:.85rem;color:#555}
.message{margin:.3rem 0;white-space:pre-wrap;overflow-wrap:anywhere}
details{margin:.25rem 0}
summary{cursor:pointer;color:#333;font-weight:600}
summary .size{font-weight:400;color:#666}
pre{background:#f6f8fa;border:1px solid #e3e6ea;border-radius:4px;padding:.5rem;overflow:auto;max-height:28rem;white-space:pre-wrap;word-break:break-word;margin:.25rem 0}
.back{font-size:.85rem}
#filters{display:flex;flex-wrap:wrap;align-items:center;gap:.5rem 1rem;margin:.5rem 0 .75rem;padding:.5rem .75rem;background:#f6f8fa;border-radius:6px}
#filters[hidden]{display:none}
#filters label{font-weight:600}
#filters select{margin-left:.3rem;font:inherit}
#f-shown{color:#555}
a{color:#0b57d0}
@media print{#filters,.back{display:none}}
"""

# The page's only script: the filter, lifted when the address points at a row it
# hides. It reads the DOM and carries no data, so nothing from a run can
# reach it. Filter state lives in the query string: ?verdict=failed,error&level=MUST&family=envelope
_SCRIPT = """
(function () {
  "use strict";
  var d = document, form = d.getElementById("filters");
  if (!form) { return; }
  var rows = Array.prototype.slice.call(d.querySelectorAll("#cases tbody tr[data-verdict]"));
  var keys = ["verdict", "level", "family"], select = {};
  keys.forEach(function (k) { select[k] = d.getElementById("f-" + k); });
  var shown = d.getElementById("f-shown");
  function choose(s, value) {
    var known = Array.prototype.some.call(s.options, function (o) { return o.value === value; });
    if (!known) {
      var o = d.createElement("option");
      o.value = value; o.textContent = value;
      s.appendChild(o);
    }
    s.value = value;
  }
  function apply(remember) {
    var want = {}, n = 0, query = [];
    keys.forEach(function (k) {
      var v = select[k].value;
      want[k] = v ? v.split(",") : null;
      if (v) { query.push(k + "=" + encodeURIComponent(v).replace(/%2C/g, ",")); }
    });
    rows.forEach(function (r) {
      var ok = keys.every(function (k) {
        return !want[k] || want[k].indexOf(r.getAttribute("data-" + k)) >= 0;
      });
      r.hidden = !ok;
      if (ok) { n += 1; }
    });
    shown.textContent = n + " of " + rows.length + " cases shown";
    if (remember) {
      try {
        history.replaceState(null, "", (query.length ? "?" + query.join("&") : location.pathname) + location.hash);
      } catch (e) { /* some browsers refuse this for file: pages */ }
    }
  }
  function reveal() {
    var id = decodeURIComponent(location.hash.slice(1)), target = id && d.getElementById(id);
    if (!target || target.tagName !== "TR") { return; }
    if (target.hidden) {
      keys.forEach(function (k) { select[k].value = ""; });
      apply(true);
      target.scrollIntoView();
    }
  }
  var params = new URLSearchParams(location.search);
  keys.forEach(function (k) {
    var v = params.get(k);
    if (v) { choose(select[k], v); }
    select[k].addEventListener("change", function () { apply(true); });
  });
  d.getElementById("f-reset").addEventListener("click", function () {
    keys.forEach(function (k) { select[k].value = ""; });
    apply(true);
  });
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  form.hidden = false;
  apply(false);
  reveal();
  window.addEventListener("hashchange", reveal);
}());
"""

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()}'; "
    "base-uri 'none'; form-action 'none'"
)

#: A payload longer than this many lines or characters starts folded.
_FOLD_LINES = 12
_FOLD_CHARS = 1500
#: The failure list shows each message's first line, cut to this length.
_ONE_LINE = 200
#: Where a case's clauses link to: docs/PROTOCOL.md, whose ``<a id="slug">`` anchors are
#: the slugs of the clause ids (``§4.5/reader-refused`` -> ``PROTOCOL.md#reader-refused``).
#: A relative link: it resolves where the report sits next to the protocol document.
_SPEC = "PROTOCOL.md"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _anchor(result: CaseResult) -> str:
    """The id of a case's row: ``case-`` and the case id (lowercase, digits, ``-`` and ``/``)."""
    return "case-" + result.case.id


def _family(result: CaseResult) -> str:
    return result.case.id.split("/", 1)[0]


def _one_line(result: CaseResult) -> str:
    """The message's first line; for a kit error, with the traceback's last line."""
    lines = [line.strip() for line in result.message.splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    line = lines[0]
    if result.verdict is Verdict.ERROR and len(lines) > 1:
        line = f"{line} {lines[-1]}"
    return line if len(line) <= _ONE_LINE else line[: _ONE_LINE - 1] + "…"


def _clauses(result: CaseResult) -> str:
    """The clauses the case checks, each a link to its anchor in the protocol document."""
    if not result.case.clauses:
        return ""
    links = ", ".join(
        f'<a href="{_esc(_SPEC)}#{_esc(clause.split("/", 1)[1])}">{_esc(clause)}</a>'
        for clause in result.case.clauses
    )
    return f'<div class="clauses">checks {links}</div>'


def _folds(text: str) -> bool:
    return text.count("\n") >= _FOLD_LINES or len(text) > _FOLD_CHARS


def _size(text: str) -> str:
    lines = text.count("\n") + 1
    size = len(text.encode("utf-8"))
    human = f"{size} B" if size < 1024 else f"{size / 1024:.1f} kB"
    return f"{lines} line{'s' if lines != 1 else ''}, {human}"


def _payload(name: str, text: str, *, unfold_short: bool) -> str:
    """One of sent / expected / got: short ones open, long ones folded."""
    opened = " open" if unfold_short and not _folds(text) else ""
    return (
        f'<details{opened}><summary>{name} <span class="size">({_size(text)})</span></summary>'
        f"<pre>{_esc(text)}</pre></details>"
    )


def _html_case(result: CaseResult) -> str:
    case = result.case
    verdict = result.verdict.value
    bad = result.counts_as_failure
    cells = (
        f'<td><span class="verdict v-{verdict}">{_esc(verdict)}</span></td>'
        f'<td class="level">{_esc(case.level.value)}</td>'
        f'<td><span class="id">{_esc(case.id)}</span>'
        f'<div class="desc">{_esc(case.description)}</div>'
        f"{_clauses(result)}"
    )
    if result.verdict is not Verdict.PASSED:
        if _folds(result.message):
            first = result.message.splitlines()[0][:_ONE_LINE]
            cells += (
                f'<div class="message">{_esc(first)}</div>'
                f"<details><summary>the whole message "
                f'<span class="size">({_size(result.message)})</span></summary>'
                f"<pre>{_esc(result.message)}</pre></details>"
            )
        elif result.message:
            cells += f'<div class="message">{_esc(result.message)}</div>'
        for name in ("sent", "expected", "got"):
            text = getattr(result, name)
            if text:
                cells += _payload(name, text, unfold_short=bad)
        if bad:
            cells += '<a class="back" href="#failures">↑ failures and errors</a>'
    cells += f'</td><td class="num">{result.duration:.3f}&nbsp;s</td>'
    attributes = (
        f'id="{_esc(_anchor(result))}" data-verdict="{_esc(verdict)}" '
        f'data-level="{_esc(case.level.value)}" data-family="{_esc(_family(result))}"'
    )
    if bad:
        attributes += ' class="bad"'
    return f"<tr {attributes}>{cells}</tr>"


def _failure_item(result: CaseResult) -> str:
    verdict = result.verdict.value
    return (
        f'<li><span class="verdict v-{verdict}">{_esc(verdict)}</span> '
        f'<span class="level">{_esc(result.case.level.value)}</span> '
        f'<a class="id" href="#{_esc(_anchor(result))}">{_esc(result.case.id)}</a>'
        f'<span class="msg">{_esc(_one_line(result))}</span></li>'
    )


def _failures_section(run: RunResult) -> str:
    """Failed and erred cases, MUST before SHOULD (MUST decides the exit code), then run errors."""
    bad = [r for r in run.results if r.counts_as_failure]
    bad.sort(key=lambda r: list(Level).index(r.case.level))
    parts = [f'<section id="failures"><h2>Failures and errors ({len(bad)})</h2>']
    if bad:
        parts.append("<ol>" + "".join(_failure_item(r) for r in bad) + "</ol>")
    else:
        parts.append('<p class="none">None: no case failed and the kit raised no error.</p>')
    if run.run_errors:
        items = "".join(f"<li>{_esc(e)}</li>" for e in run.run_errors)
        parts.append(
            f'<h3>Run errors ({len(run.run_errors)})</h3><ul class="run-errors">{items}</ul>'
        )
    parts.append("</section>")
    return "".join(parts)


def _options(values: Sequence[tuple[str, str]]) -> str:
    return '<option value="">all</option>' + "".join(
        f'<option value="{_esc(value)}">{_esc(label)}</option>' for value, label in values
    )


def _filters(run: RunResult) -> str:
    by_verdict = {v: sum(1 for r in run.results if r.verdict is v) for v in Verdict}
    verdicts = [("failed,error", "failures and errors")] + [
        (v.value, f"{v.value} ({by_verdict[v]})") for v in Verdict if by_verdict[v]
    ]
    levels = [(level.value, level.value) for level in Level]
    families: dict[str, int] = {}
    for result in run.results:
        families[_family(result)] = families.get(_family(result), 0) + 1
    family_options = [(f, f"{f} ({n})") for f, n in sorted(families.items())]
    return (
        '<form id="filters" hidden>'
        f'<label>verdict<select id="f-verdict">{_options(verdicts)}</select></label>'
        f'<label>level<select id="f-level">{_options(levels)}</select></label>'
        f'<label>family<select id="f-family">{_options(family_options)}</select></label>'
        '<button type="button" id="f-reset">show all</button>'
        '<span id="f-shown" aria-live="polite"></span>'
        "</form>"
    )


def render_html(run: RunResult) -> str:
    """The self-contained report page."""
    counts = run.counts()
    by_verdict = {v: sum(counts[level][v] for level in Level) for v in Verdict}
    passed = run.exit_code == 0
    title = f"collateral-sync conformance: {run.role.value} at {run.target}"
    chips = "".join(
        f'<li class="v-{v.value}{"" if by_verdict[v] else " zero"}">'
        f"{by_verdict[v]} {_esc(v.value)}</li>"
        for v in Verdict
    )
    known = (
        f" · known-failing list <code>{_esc(run.known_failing_file)}</code>"
        if run.known_failing_file
        else ""
    )
    header = (
        f"<header><h1>{_esc(title)}</h1>"
        f'<div class="banner {"pass" if passed else "fail"}" id="verdict">'
        f'<span class="word">{"PASS" if passed else "FAIL"}</span>'
        f'<span class="exit">exit code {run.exit_code}</span>'
        f"<span>{_esc(run.outcome_line())}</span></div>"
        f'<ul class="counts" aria-label="cases per verdict"><li>{len(run.results)} cases</li>'
        f"{chips}</ul>"
        '<p class="meta">'
        f"target <code>{_esc(run.target)}</code> · "
        f"role <code>{_esc(run.role.value)}</code> · "
        f"kit <code>{_esc(run.kit_version)}</code> · "
        f"protocol <code>{_esc(run.protocol_version)}</code> · "
        f"started {_esc(run.started_at.strftime('%Y-%m-%d %H:%M:%S %Z'))} · "
        f"{run.duration:.2f} s{known}</p></header>"
    )
    head_cells = "".join(f'<th class="num">{_esc(v.value)}</th>' for v in Verdict)
    level_rows = "".join(
        f"<tr><th>{_esc(level.value)}</th>"
        + "".join(f'<td class="num">{counts[level][v]}</td>' for v in Verdict)
        + "</tr>"
        for level in Level
    )
    levels = (
        '<section id="counts"><h2>Counts per level</h2>'
        f'<table class="levels"><thead><tr><th>level</th>{head_cells}</tr></thead>'
        f"<tbody>{level_rows}</tbody></table></section>"
    )
    cases = (
        f'<section id="cases"><h2>All cases ({len(run.results)})</h2>'
        f"{_filters(run)}"
        "<table><thead><tr><th>verdict</th><th>level</th><th>case</th>"
        '<th class="num">time</th></tr></thead>'
        f"<tbody>{''.join(_html_case(r) for r in run.results)}</tbody></table></section>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"{header}{_failures_section(run)}{levels}{cases}"
        f"<script>{_SCRIPT}</script>"
        "</body></html>\n"
    )


def write_html(run: RunResult, path: Path) -> None:
    path.write_text(render_html(run), encoding="utf-8")
