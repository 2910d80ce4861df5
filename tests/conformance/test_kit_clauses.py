"""Every MUST of docs/PROTOCOL.md is mapped to the kit cases that check it.

docs/CONFORMANCE.md, section "Normative clauses and the cases that check them", has one
row per normative clause: a clause id ``§<section>/<slug>``, a verbatim quote of the MUST
sentence, who it binds, and the MUST cases that fail when a server breaks it, or
``vectors: FILE``, or ``not yet: reason``. These tests hold the table and the spec to each
other:

- every occurrence of the word MUST in PROTOCOL.md lies inside the quote of some row, unless
  it is one of the few editorial mentions listed here;
- every quote contains MUST and occurs exactly once in the section its clause id names
  (whitespace and line breaks count as one space, so rewrapping does not matter but
  rewording does);
- every case id is a MUST case of the kit's registry, every vector file exists;
- the ``not yet`` rows are as many as the table says and as :data:`NOT_YET_CLAUSES` says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import collateral_sync_conformance.cases  # noqa: F401 (registers the kit's cases)
from collateral_sync_conformance._registry import REGISTRY, Level

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_MD = ROOT / "docs" / "PROTOCOL.md"
CONFORMANCE_MD = ROOT / "docs" / "CONFORMANCE.md"
VECTORS = ROOT / "vectors"
TABLE_HEADING = "## Normative clauses and the cases that check them"

#: The clauses no case or vector checks yet: the protocol's known gaps. Closing one (a new
#: case) lowers this; a new clause without a case raises it, deliberately, in a reviewed
#: change to this constant and to the count in docs/CONFORMANCE.md.
NOT_YET_CLAUSES = 0

#: Mentions of MUST that state no rule: (section, quoted text) -> why.
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
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_NUMBERED = re.compile(r"(\d+(?:\.\d+)*[a-z]?)\.?\s")
_APPENDIX = re.compile(r"Appendix\s+([A-Z])\b")
_CLAUSE_ID = re.compile(r"§(\d+(?:\.\d+)*[a-z]?|[A-Z])/[a-z0-9]+(?:-[a-z0-9]+)*")
_NOT_YET_COUNT = re.compile(r"Today (\d+) clauses? (?:are|is) marked `not yet`")
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


@cache
def protocol_sections() -> dict[str, Section]:
    sections: dict[str, Section] = {"": Section("")}
    current = sections[""]
    stack: list[tuple[int, str]] = []
    fenced = False
    for lineno, line in enumerate(PROTOCOL_MD.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading is None:
            current.add_line(lineno, line)
            continue
        level = len(heading.group(1))
        if level == 1:
            continue  # the document title
        number = _section_number(heading.group(2), level, stack)
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, number))
        current = sections.setdefault(number, Section(number))
        # Sections split across headings (unnumbered subheadings) never join mid-sentence.
        current.add_line(lineno, "¶")
    return sections


# ------------------------------------------------------------------ CONFORMANCE.md


@dataclass(frozen=True)
class Row:
    clause: str
    quote: str
    words: str
    who: list[str]
    checked_by: str

    @property
    def section(self) -> str:
        return self.clause[1:].split("/", 1)[0]

    @property
    def kind(self) -> str:
        if self.checked_by.startswith("not yet:"):
            return "not yet"
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
    for line in clause_section().splitlines():
        if not line.startswith("| `§"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"docs/CONFORMANCE.md: a clause row needs 5 cells: {line}"
        clause, quote, words, who, checked_by = cells
        assert clause.startswith("`"), f"clause id not in backticks: {line}"
        assert clause.endswith("`"), f"clause id not in backticks: {line}"
        quoted = len(quote) > 2 and quote[0] == quote[-1] == '"'
        assert quoted, (
            f"{clause}: the second cell must quote the MUST sentence in double quotes, got {quote}"
        )
        yield Row(
            clause=clause.strip("`"),
            quote=_normal(quote[1:-1]),
            words=words,
            who=[part.strip() for part in who.split(",")],
            checked_by=checked_by,
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
    assert len(clause_rows()) >= 30


def test_clause_ids_are_well_formed_and_unique() -> None:
    seen: set[str] = set()
    for row in clause_rows():
        assert _CLAUSE_ID.fullmatch(row.clause), (
            f"clause id {row.clause!r}: expected §<section>/<lowercase-slug>, e.g. §2.4/integer-range"
        )
        assert row.clause not in seen, f"clause id {row.clause!r} is in the table twice"
        seen.add(row.clause)
        assert row.section in protocol_sections(), (
            f"{row.clause}: docs/PROTOCOL.md has no section {row.section}"
        )
        unknown = [who for who in row.who if who not in WHO]
        assert not unknown, f"{row.clause}: who {unknown} is not one of {sorted(WHO)}"


def test_every_quote_is_a_must_of_its_section() -> None:
    sections = protocol_sections()
    for row in clause_rows():
        assert _MUST.search(row.quote), f"{row.clause}: the quote {row.quote!r} contains no MUST"
        hits = sections[row.section].find(row.quote)
        assert len(hits) == 1, (
            f"{row.clause}: the quote {row.quote!r} occurs {len(hits)} times in §{row.section} of "
            "docs/PROTOCOL.md, expected exactly once (was the clause reworded or moved? "
            "update the row; is the quote too short? quote more of the sentence)"
        )


def test_every_must_of_the_protocol_is_claimed_by_a_row() -> None:
    sections = protocol_sections()
    claimed: dict[str, list[tuple[int, int]]] = {}
    for row in clause_rows():
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
        for must in _MUST.finditer(section.text):
            if any(a <= must.start() and must.end() <= b for a, b in claimed.get(number, [])):
                continue
            lineno, line = section.line_at(must.start())
            context = section.text[max(0, must.start() - 40) : must.end() + 60]
            unclaimed.append(
                f"docs/PROTOCOL.md:{lineno} (§{number or '(preamble)'}): …{context}…\n    line: {line.strip()}"
            )
    assert not unclaimed, (
        f"{len(unclaimed)} MUST(s) of docs/PROTOCOL.md are claimed by no row of the table "
        f"{TABLE_HEADING!r} in docs/CONFORMANCE.md (add a row quoting each, with the cases "
        "that check it, or `not yet: reason`):\n" + "\n".join(unclaimed)
    )


def test_every_listed_case_is_a_must_case_of_the_kit() -> None:
    for row in clause_rows():
        if row.kind != "cases":
            continue
        for case_id in row.case_ids():
            case = REGISTRY.get(case_id)
            assert case is not None, (
                f"{row.clause}: case {case_id!r} is not in the kit's registry "
                "(`collateral-sync conformance list` prints every case id)"
            )
            assert case.level is Level.MUST, (
                f"{row.clause}: case {case_id!r} is a {case.level} case; a MUST clause needs a "
                "MUST case (a SHOULD case failing does not fail the run)"
            )


def test_every_vector_file_exists() -> None:
    for row in clause_rows():
        if row.kind != "vectors":
            continue
        name = row.checked_by.removeprefix("vectors:").strip().strip("`")
        assert name, f"{row.clause}: `vectors:` names no file"
        assert (VECTORS / name).is_file(), f"{row.clause}: vectors/{name} does not exist"


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
