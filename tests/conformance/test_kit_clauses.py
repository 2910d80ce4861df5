"""Every MUST and SHOULD of docs/PROTOCOL.md is mapped to the kit cases that check it.

docs/CONFORMANCE.md, section "Normative clauses and the cases that check them", has one
row per normative clause: a clause id ``§<section>/<slug>``, a verbatim quote of the MUST
sentence, who it binds, and the MUST cases that fail when a server breaks it, or
``vectors: FILE``, or ``not yet: reason``. Its subsection "SHOULD clauses" has the same
columns for every SHOULD, whose last cell is SHOULD cases, ``vectors: FILE`` or
``not checked: reason``. These tests hold the table, the spec and the kit to each other:

- every occurrence of the word MUST (SHOULD) in PROTOCOL.md lies inside the quote of some
  MUST (SHOULD) row, unless it is one of the few editorial mentions listed here;
- every quote contains its row's keyword and occurs exactly once in the section its clause
  id names (whitespace and line breaks count as one space, so rewrapping does not matter
  but rewording does);
- every clause's slug is an anchor ``<a id="slug"></a>`` of PROTOCOL.md exactly once, in the
  paragraph, list item or table row of its quote and before it; every paragraph holding a
  MUST or SHOULD has an anchor;
- every case id is a case of the kit's registry at the row's level, and the cases of a row
  are exactly the cases that cite its clause with ``clauses=``; every vector file exists;
- the ``not yet`` rows are as many as the table says and as :data:`NOT_YET_CLAUSES` says,
  and the ``not checked`` SHOULD rows as many as the table says.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import collateral_sync_conformance.cases  # noqa: F401 (registers the kit's cases)
import pytest
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Level, Registry

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_MD = ROOT / "docs" / "PROTOCOL.md"
CONFORMANCE_MD = ROOT / "docs" / "CONFORMANCE.md"
VECTORS = ROOT / "vectors"
TABLE_HEADING = "## Normative clauses and the cases that check them"
SHOULD_HEADING = "### SHOULD clauses"

#: The clauses no case or vector checks yet: the protocol's known gaps. Closing one (a new
#: case) lowers this; a new clause without a case raises it, deliberately, in a reviewed
#: change to this constant and to the count in docs/CONFORMANCE.md.
NOT_YET_CLAUSES = 0

#: Mentions of MUST or SHOULD that state no rule: (section, quoted text) -> why.
EDITORIAL: dict[tuple[str, str], str] = {
    (
        "",
        "The key words MUST, MUST NOT, SHOULD, SHOULD NOT and MAY",
    ): "the RFC 2119 key-words sentence",
    ("14", "runs cases with stable ids at levels MUST and SHOULD"): "names the kit's case levels",
    (
        "14",
        "A server conforms to v1 when it passes every MUST case",
    ): "defines conformance by the kit's MUST cases",
}

WHO = {
    "custodian",
    "exchange",
    "regulator",
    "client",
    "any party",
    "receiver",
    "SDK-verifier",
}

_MUST = re.compile(r"\bMUST\b")
_KEYWORD = {Level.MUST: _MUST, Level.SHOULD: re.compile(r"\bSHOULD\b")}
_ANCHOR = re.compile(r'<a id="([^"]*)"></a>')
#: A line that starts a block of its own: a list item or a table row.
_BLOCK_START = re.compile(r"\s*(?:[-*+]|\d+\.)\s|\s*\|")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_NUMBERED = re.compile(r"(\d+(?:\.\d+)*[a-z]?)\.?\s")
_APPENDIX = re.compile(r"Appendix\s+([A-Z])\b")
_CLAUSE_ID = re.compile(r"§(\d+(?:\.\d+)*[a-z]?|[A-Z])/[a-z0-9]+(?:-[a-z0-9]+)*")
_NOT_YET_COUNT = re.compile(r"Today (\d+) clauses? (?:are|is) marked `not yet`")
_NOT_CHECKED_COUNT = re.compile(r"Today (\d+) SHOULD clauses? (?:are|is)\s+marked `not checked`")
_SPACE = re.compile(r"\s+")


def _normal(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


# ------------------------------------------------------------------ PROTOCOL.md


@dataclass
class Section:
    """The text under the headings of one section number, whitespace normalised.

    ``starts`` maps offsets in ``text`` back to PROTOCOL.md line numbers.
    """

    number: str
    text: str = ""
    starts: list[tuple[int, int, str]] | None = None  # (offset, line number, line)

    def add_line(self, lineno: int, line: str) -> None:
        part = _normal(line)
        if not part:
            return
        if self.starts is None:
            self.starts = []
        if self.text:
            self.text += " "
        self.starts.append((len(self.text), lineno, line.rstrip("\n")))
        self.text += part

    def line_at(self, offset: int) -> tuple[int, str]:
        found = (0, "")
        for start, lineno, line in self.starts or []:
            if start > offset:
                break
            found = (lineno, line)
        return found

    def find(self, quote: str) -> list[int]:
        """Offsets of every (possibly overlapping) occurrence of ``quote``."""
        hits, at = [], self.text.find(quote)
        while at >= 0:
            hits.append(at)
            at = self.text.find(quote, at + 1)
        return hits


def _section_number(title: str, level: int, stack: list[tuple[int, str]]) -> str:
    if match := _APPENDIX.match(title):
        return match.group(1)
    if match := _NUMBERED.match(title + " "):
        return match.group(1)
    # An unnumbered heading belongs to the nearest enclosing numbered one.
    return next((number for lvl, number in reversed(stack) if lvl < level), "")


def _protocol_lines() -> Iterator[tuple[int, str, str, bool]]:
    """(line number, line, section number, whether the line is a heading), title left out."""
    number = ""
    stack: list[tuple[int, str]] = []
    fenced = False
    for lineno, line in enumerate(PROTOCOL_MD.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading is None:
            yield lineno, line, number, False
            continue
        level = len(heading.group(1))
        if level == 1:
            continue  # the document title
        number = _section_number(heading.group(2), level, stack)
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, number))
        yield lineno, line, number, True


@cache
def protocol_sections() -> dict[str, Section]:
    sections: dict[str, Section] = {"": Section("")}
    for lineno, line, number, is_heading in _protocol_lines():
        current = sections.setdefault(number, Section(number))
        # Sections split across headings (unnumbered subheadings) never join mid-sentence.
        current.add_line(lineno, "¶" if is_heading else line)
    return sections


@dataclass(frozen=True)
class Block:
    """A paragraph, list item or table row of PROTOCOL.md, whitespace normalised."""

    section: str
    lineno: int
    text: str

    def where(self) -> str:
        return f"docs/PROTOCOL.md:{self.lineno} (§{self.section or '(preamble)'})"


@cache
def protocol_blocks() -> tuple[Block, ...]:
    """The blocks of PROTOCOL.md: a blank line or a heading ends one; a list item or a table
    row starts one of its own, and the lines that continue it join it."""
    blocks: list[Block] = []
    lines: list[str] = []
    start = (0, "")

    def flush() -> None:
        if lines:
            blocks.append(Block(start[1], start[0], _normal(" ".join(lines))))
            lines.clear()

    for lineno, line, number, is_heading in _protocol_lines():
        if is_heading or not line.strip():
            flush()
            continue
        if _BLOCK_START.match(line) or not lines:
            flush()
            start = (lineno, number)
        lines.append(line)
    flush()
    return tuple(blocks)


# ------------------------------------------------------------------ CONFORMANCE.md


@dataclass(frozen=True)
class Row:
    clause: str
    quote: str
    words: str
    who: list[str]
    checked_by: str
    level: Level = Level.MUST

    @property
    def section(self) -> str:
        return self.clause[1:].split("/", 1)[0]

    @property
    def slug(self) -> str:
        return self.clause.split("/", 1)[1]

    @property
    def kind(self) -> str:
        if self.checked_by.startswith("not yet:"):
            return "not yet"
        if self.checked_by.startswith("not checked:"):
            return "not checked"
        if self.checked_by.startswith("vectors:"):
            return "vectors"
        return "cases"

    def case_ids(self) -> list[str]:
        return [item.strip().strip("`") for item in self.checked_by.split(",")]


@cache
def clause_section() -> str:
    text = CONFORMANCE_MD.read_text(encoding="utf-8")
    assert TABLE_HEADING in text, f"docs/CONFORMANCE.md has no section {TABLE_HEADING!r}"
    body = text.split(TABLE_HEADING, 1)[1]
    following = re.search(r"^## ", body, flags=re.MULTILINE)
    return body[: following.start()] if following else body


def _rows() -> Iterator[Row]:
    level = Level.MUST
    for line in clause_section().splitlines():
        if line.strip() == SHOULD_HEADING:
            level = Level.SHOULD
        if not line.startswith("| `§"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"docs/CONFORMANCE.md: a clause row needs 5 cells: {line}"
        clause, quote, words, who, checked_by = cells
        assert clause.startswith("`"), f"clause id not in backticks: {line}"
        assert clause.endswith("`"), f"clause id not in backticks: {line}"
        quoted = len(quote) > 2 and quote[0] == quote[-1] == '"'
        assert quoted, (
            f"{clause}: the second cell must quote the {level} sentence in double quotes, "
            f"got {quote}"
        )
        yield Row(
            clause=clause.strip("`"),
            quote=_normal(quote[1:-1]),
            words=words,
            who=[part.strip() for part in who.split(",")],
            checked_by=checked_by,
            level=level,
        )


@cache
def clause_rows() -> tuple[Row, ...]:
    rows = tuple(_rows())
    assert rows, f"no clause rows found under {TABLE_HEADING!r} in docs/CONFORMANCE.md"
    return rows


# ------------------------------------------------------------------ tests


def test_the_table_and_the_spec_parse() -> None:
    # Guards against a parser that silently finds nothing and so checks nothing.
    sections = protocol_sections()
    musts = sum(len(_MUST.findall(s.text)) for s in sections.values())
    assert musts >= 30, f"found only {musts} MUSTs in docs/PROTOCOL.md: is the parser broken?"
    assert {"2.4", "3.6.1", "6.7a", "11", "A"} <= set(sections)
    levels = [row.level for row in clause_rows()]
    assert levels.count(Level.MUST) >= 30
    assert levels.count(Level.SHOULD) >= 10, f"no rows found under {SHOULD_HEADING!r}"
    assert len(protocol_blocks()) >= 300
    assert sum(1 for b in protocol_blocks() if _ANCHOR.search(b.text)) >= 30


def test_clause_ids_are_well_formed_and_unique() -> None:
    seen: set[str] = set()
    slugs: dict[str, str] = {}
    for row in clause_rows():
        assert _CLAUSE_ID.fullmatch(row.clause), (
            f"clause id {row.clause!r}: expected §<section>/<lowercase-slug>, e.g. §2.4/integer-range"
        )
        assert row.clause not in seen, f"clause id {row.clause!r} is in the table twice"
        seen.add(row.clause)
        assert row.slug not in slugs, (
            f"{row.clause} and {slugs[row.slug]} share the slug {row.slug!r}: a slug is an anchor "
            "of docs/PROTOCOL.md and must be unique across the document"
        )
        slugs[row.slug] = row.clause
        assert row.section in protocol_sections(), (
            f"{row.clause}: docs/PROTOCOL.md has no section {row.section}"
        )
        unknown = [who for who in row.who if who not in WHO]
        assert not unknown, f"{row.clause}: who {unknown} is not one of {sorted(WHO)}"


def test_every_quote_is_a_clause_of_its_section() -> None:
    sections = protocol_sections()
    for row in clause_rows():
        keyword = _KEYWORD[row.level]
        assert keyword.search(row.quote), (
            f"{row.clause}: the quote {row.quote!r} of a {row.level} row contains no {row.level}"
        )
        for other in Level:
            assert other is row.level or not _KEYWORD[other].search(row.quote), (
                f"{row.clause}: the quote {row.quote!r} of a {row.level} row contains {other}: "
                f"quote the {other} in a row of its own"
            )
        hits = sections[row.section].find(row.quote)
        assert len(hits) == 1, (
            f"{row.clause}: the quote {row.quote!r} occurs {len(hits)} times in §{row.section} of "
            "docs/PROTOCOL.md, expected exactly once (was the clause reworded or moved? "
            "update the row; is the quote too short? quote more of the sentence)"
        )


@pytest.mark.parametrize("level", list(Level))
def test_every_keyword_of_the_protocol_is_claimed_by_a_row(level: Level) -> None:
    sections = protocol_sections()
    keyword = _KEYWORD[level]
    claimed: dict[str, list[tuple[int, int]]] = {}
    for row in clause_rows():
        if row.level is not level:
            continue
        for at in sections[row.section].find(row.quote):
            claimed.setdefault(row.section, []).append((at, at + len(row.quote)))
    for (number, quote), why in EDITORIAL.items():
        hits = sections[number].find(_normal(quote))
        assert len(hits) == 1, (
            f"editorial exemption ({why}) {quote!r} occurs {len(hits)} times in §{number or '(preamble)'} "
            "of docs/PROTOCOL.md, expected once: update EDITORIAL in this test"
        )
        claimed.setdefault(number, []).append((hits[0], hits[0] + len(_normal(quote))))
    unclaimed = []
    for number, section in sections.items():
        for found in keyword.finditer(section.text):
            if any(a <= found.start() and found.end() <= b for a, b in claimed.get(number, [])):
                continue
            lineno, line = section.line_at(found.start())
            context = section.text[max(0, found.start() - 40) : found.end() + 60]
            unclaimed.append(
                f"docs/PROTOCOL.md:{lineno} (§{number or '(preamble)'}): …{context}…\n    line: {line.strip()}"
            )
    table = TABLE_HEADING if level is Level.MUST else f"{SHOULD_HEADING} (under {TABLE_HEADING})"
    assert not unclaimed, (
        f"{len(unclaimed)} {level}(s) of docs/PROTOCOL.md are claimed by no row of the table "
        f"{table!r} in docs/CONFORMANCE.md (add a row quoting each, with the cases "
        "that check it, or `not yet: reason` / `not checked: reason`):\n" + "\n".join(unclaimed)
    )


def test_every_clause_has_its_anchor_once_in_the_protocol() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    anchors = Counter(_ANCHOR.findall(text))
    slugs = {row.slug: row.clause for row in clause_rows()}
    problems = []
    for slug, clause in slugs.items():
        if anchors[slug] != 1:
            problems.append(
                f'{clause}: <a id="{slug}"></a> occurs {anchors[slug]} times in docs/PROTOCOL.md, '
                "expected once, right before the sentence (or table cell) of the clause"
            )
    for slug in sorted(set(anchors) - set(slugs)):
        problems.append(
            f'<a id="{slug}"></a> in docs/PROTOCOL.md names no clause of docs/CONFORMANCE.md '
            "(a renamed clause? rename the anchor too)"
        )
    assert not problems, "\n".join(problems)


def test_every_anchor_stands_before_its_quote() -> None:
    blocks = protocol_blocks()
    problems = []
    for row in clause_rows():
        anchor = f'<a id="{row.slug}"></a>'
        holding = [b for b in blocks if b.section == row.section and row.quote in b.text]
        if len(holding) != 1:
            problems.append(
                f"{row.clause}: the quote {row.quote!r} lies in {len(holding)} paragraphs of "
                f"§{row.section} of docs/PROTOCOL.md, expected one (does it span two?)"
            )
            continue
        [block] = holding
        at = block.text.find(anchor)
        if at < 0 or at > block.text.find(row.quote):
            problems.append(
                f"{row.clause}: {block.where()}: {anchor} is not in the paragraph (or table "
                "row) of the quote, before it: put it right before the sentence holding the "
                f"clause ({row.quote!r})"
            )
    assert not problems, "\n".join(problems)


def test_every_paragraph_with_a_keyword_has_an_anchor() -> None:
    editorial = [(number, _normal(quote)) for number, quote in EDITORIAL]
    bare = []
    for block in protocol_blocks():
        if _ANCHOR.search(block.text):
            continue
        exempt = [
            (at, at + len(quote))
            for number, quote in editorial
            if number == block.section
            for at in [block.text.find(quote)]
            if at >= 0
        ]
        for level, keyword in _KEYWORD.items():
            for found in keyword.finditer(block.text):
                if any(a <= found.start() and found.end() <= b for a, b in exempt):
                    continue
                context = block.text[max(0, found.start() - 60) : found.end() + 60]
                bare.append(f"{block.where()}: a {level} with no <a id> anchor: …{context}…")
    assert not bare, (
        f"{len(bare)} normative sentence(s) of docs/PROTOCOL.md have no anchor in their "
        "paragraph or table row: add a row for each to docs/CONFORMANCE.md and put "
        '<a id="slug"></a> right before the sentence:\n' + "\n".join(bare)
    )


def test_every_listed_case_is_a_case_of_its_level() -> None:
    for row in clause_rows():
        if row.kind != "cases":
            continue
        for case_id in row.case_ids():
            case = REGISTRY.get(case_id)
            assert case is not None, (
                f"{row.clause}: case {case_id!r} is not in the kit's registry "
                "(`collateral-sync conformance list` prints every case id)"
            )
            assert case.level is row.level, (
                f"{row.clause}: case {case_id!r} is a {case.level} case; a {row.level} clause "
                f"needs a {row.level} case"
                + (
                    " (a SHOULD case failing does not fail the run)"
                    if row.level is Level.MUST
                    else ""
                )
            )


def test_cases_cite_exactly_the_clauses_whose_rows_list_them() -> None:
    citing: dict[str, set[str]] = {}
    for case in REGISTRY:
        for clause in case.clauses:
            citing.setdefault(clause, set()).add(case.id)
    rows = {row.clause: row for row in clause_rows()}
    problems = [
        f"{clause}: cited with clauses= by {sorted(cases)}, but docs/CONFORMANCE.md has no row "
        "for it (a typo? or add the row, and its anchor in docs/PROTOCOL.md)"
        for clause, cases in sorted(citing.items())
        if clause not in rows
    ]
    for clause, row in rows.items():
        listed = set(row.case_ids()) if row.kind == "cases" else set()
        cited = citing.get(clause, set())
        if missing := sorted(listed - cited):
            problems.append(
                f"{clause}: docs/CONFORMANCE.md lists {missing}, which do not declare "
                f'clauses=("{clause}", ...) in their @REGISTRY.case(...)'
            )
        if extra := sorted(cited - listed):
            problems.append(
                f"{clause}: {extra} declare the clause with clauses=, but its row in "
                f"docs/CONFORMANCE.md does not list them (it says: {row.checked_by})"
            )
    assert not problems, "\n".join(problems)


async def _nothing(ctx: object) -> None:
    return None


@pytest.mark.parametrize(
    "clause", ["4.5/reader-refused", "§4.5", "§4.5/Reader", "§x/reader", "§4.5/a b", "§4.5/-a"]
)
def test_the_registry_refuses_malformed_clause_ids(clause: str) -> None:
    with pytest.raises(ValueError, match="clause id"):
        Registry().case("a/b", Level.MUST, "does something", clauses=(clause,))(_nothing)
    with pytest.raises(TypeError, match="not a str"):
        Registry().case("a/b", Level.MUST, "does something", clauses="§4.5/reader-refused")


def test_conformance_list_prints_the_clauses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--run", "envelope/*/malleated-signature-refused"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert len(lines) == 4
    assert all("§3.3/canonical-signature-scalar" in line for line in lines), lines


def test_every_vector_file_exists() -> None:
    for row in clause_rows():
        if row.kind != "vectors":
            continue
        name = row.checked_by.removeprefix("vectors:").strip().strip("`")
        assert name, f"{row.clause}: `vectors:` names no file"
        assert (VECTORS / name).is_file(), f"{row.clause}: vectors/{name} does not exist"


def test_not_checked_is_for_should_clauses_only_and_counted() -> None:
    for row in clause_rows():
        if row.kind == "not yet":
            assert row.level is Level.MUST, (
                f"{row.clause}: `not yet` marks a MUST without a case; a SHOULD row says "
                "`not checked: reason`"
            )
        if row.kind == "not checked":
            assert row.level is Level.SHOULD, (
                f"{row.clause}: a MUST clause is never `not checked`; a gap is `not yet: reason`"
            )
            assert row.checked_by.removeprefix("not checked:").strip(), (
                f"{row.clause}: `not checked:` needs a reason"
            )
    unchecked = [row.clause for row in clause_rows() if row.kind == "not checked"]
    stated = _NOT_CHECKED_COUNT.search(clause_section())
    assert stated is not None, (
        f"the section {SHOULD_HEADING!r} must say how many SHOULD clauses are marked "
        "`not checked` ('Today N SHOULD clauses are marked `not checked`')"
    )
    assert int(stated.group(1)) == len(unchecked), (
        f"docs/CONFORMANCE.md says {stated.group(1)} SHOULD clauses are `not checked`, the "
        f"table has {len(unchecked)}: {unchecked}"
    )


def test_not_yet_clauses_are_counted() -> None:
    gaps = [row for row in clause_rows() if row.kind == "not yet"]
    listing = "\n".join(
        f"  {row.clause}: {row.checked_by.removeprefix('not yet:').strip()}" for row in gaps
    )
    print(f"{len(gaps)} normative clauses no kit case checks yet:\n{listing}")
    for row in gaps:
        assert row.checked_by.removeprefix("not yet:").strip(), (
            f"{row.clause}: `not yet:` needs a reason"
        )
    stated = _NOT_YET_COUNT.search(clause_section())
    assert stated is not None, (
        f"the section {TABLE_HEADING!r} must say how many clauses are marked `not yet` "
        "('Today N clauses are marked `not yet`')"
    )
    assert int(stated.group(1)) == len(gaps), (
        f"docs/CONFORMANCE.md says {stated.group(1)} clauses are `not yet`, the table has "
        f"{len(gaps)}:\n{listing}"
    )
    assert len(gaps) == NOT_YET_CLAUSES, (
        f"{len(gaps)} clauses are `not yet`, NOT_YET_CLAUSES says {NOT_YET_CLAUSES}: a gap was "
        "closed (lower the constant and the count in docs/CONFORMANCE.md) or opened (write "
        f"the case instead):\n{listing}"
    )
