"""Conformance cases: ids, levels, roles, the registry that holds them, and id globs.

A case has a stable hierarchical id (``envelope/pledge-collateral/forged-signature-refused``),
a level (MUST or SHOULD, RFC 2119), the server roles it applies to, a one-line
description, an async body that takes a :class:`~collateral_sync_conformance._context.CaseContext`,
and the clauses of docs/PROTOCOL.md it checks (``§5.3/proof-size-is-checkpoint-size``: the
section, then the slug of the clause's ``<a id>`` anchor; docs/CONFORMANCE.md lists them).
Cases register themselves with :data:`REGISTRY` (``@REGISTRY.case(...)``);
tests build registries of their own.

Ids are matched by globs over their ``/``-separated components: ``*`` matches
within one component (``forged-*``, or a whole component), ``**`` matches any
number of components, including none. The same globs select cases
(``--run``/``--skip``) and name them in a known-failing file.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collateral_sync_conformance._context import CaseContext

__all__ = [
    "ALL_ROLES",
    "REGISTRY",
    "Case",
    "CaseBody",
    "Level",
    "Registry",
    "Role",
    "check_clause_id",
    "check_glob",
    "glob_matches",
    "select_cases",
]

_COMPONENT = re.compile(r"[a-z0-9][a-z0-9-]*")
_GLOB_COMPONENT = re.compile(r"[a-z0-9*?][a-z0-9*?-]*")
#: ``§<section>/<slug>``: a section number (``2.4``, ``3.6.1``, ``6.7a``) or an appendix letter,
#: then the slug of the clause's anchor in docs/PROTOCOL.md.
_CLAUSE_ID = re.compile(r"§(?:\d+(?:\.\d+)*[a-z]?|[A-Z])/[a-z0-9]+(?:-[a-z0-9]+)*")


class Level(StrEnum):
    """RFC 2119 level of a case: a server conforms when every MUST case passes."""

    MUST = "MUST"
    SHOULD = "SHOULD"


class Role(StrEnum):
    """The role of the server under test."""

    CUSTODIAN = "custodian"
    EXCHANGE = "exchange"
    REGULATOR = "regulator"


ALL_ROLES: frozenset[Role] = frozenset(Role)

CaseBody = Callable[["CaseContext"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Case:
    """One conformance case."""

    id: str
    level: Level
    roles: frozenset[Role]
    description: str
    body: CaseBody
    #: The clause ids of docs/PROTOCOL.md the case checks (``§4.5/reader-refused``).
    clauses: tuple[str, ...] = ()

    def applies_to(self, role: Role) -> bool:
        return role in self.roles


def _check_id(case_id: str) -> None:
    parts = case_id.split("/")
    if len(parts) < 2 or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise ValueError(
            f"case id {case_id!r}: expected at least two '/'-separated components of "
            "lowercase letters, digits and '-'"
        )


def check_clause_id(clause: str) -> str:
    """Return ``clause`` if it is a well-formed clause id, else raise ValueError."""
    if not _CLAUSE_ID.fullmatch(clause):
        raise ValueError(
            f"clause id {clause!r}: expected §<section>/<slug>, e.g. §2.4/integer-range "
            "(a section number or appendix letter, then lowercase letters, digits and '-')"
        )
    return clause


class Registry:
    """An ordered set of cases with unique ids; iteration follows registration order."""

    def __init__(self, cases: Iterable[Case] = ()) -> None:
        self._cases: dict[str, Case] = {}
        for case in cases:
            self.add(case)

    def add(self, case: Case) -> None:
        _check_id(case.id)
        if not case.roles:
            raise ValueError(f"case {case.id!r} applies to no role")
        if not case.description or "\n" in case.description:
            raise ValueError(f"case {case.id!r}: expected a one-line description")
        if isinstance(case.clauses, str):
            raise TypeError(f"case {case.id!r}: clauses must be a tuple of clause ids, not a str")
        for clause in case.clauses:
            try:
                check_clause_id(clause)
            except ValueError as error:
                raise ValueError(f"case {case.id!r}: {error}") from None
        if len(set(case.clauses)) != len(case.clauses):
            raise ValueError(f"case {case.id!r} cites a clause twice: {case.clauses}")
        if case.id in self._cases:
            raise ValueError(f"case id {case.id!r} is registered twice")
        self._cases[case.id] = case

    def case(
        self,
        case_id: str,
        level: Level,
        description: str,
        *,
        roles: Iterable[Role] = ALL_ROLES,
        clauses: Iterable[str] = (),
    ) -> Callable[[CaseBody], CaseBody]:
        """Decorator registering an async function as the body of a case.

        ``clauses`` names the clauses of docs/PROTOCOL.md the case checks, by clause id.
        """
        if isinstance(clauses, str):
            raise TypeError(f"case {case_id!r}: clauses must be a tuple of clause ids, not a str")
        cited = tuple(clauses)

        def register(body: CaseBody) -> CaseBody:
            self.add(Case(case_id, level, frozenset(roles), description, body, cited))
            return body

        return register

    def __iter__(self) -> Iterator[Case]:
        return iter(list(self._cases.values()))

    def __len__(self) -> int:
        return len(self._cases)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._cases

    def get(self, case_id: str) -> Case | None:
        return self._cases.get(case_id)

    def for_role(self, role: Role) -> list[Case]:
        return [c for c in self._cases.values() if c.applies_to(role)]


#: The kit's own cases (filled by importing ``collateral_sync_conformance.cases``).
REGISTRY = Registry()


def check_glob(pattern: str) -> str:
    """Return ``pattern`` if it is a well-formed id glob, else raise ValueError."""
    parts = pattern.split("/")
    if not pattern or not all(
        p == "**" or (_GLOB_COMPONENT.fullmatch(p) and "**" not in p) for p in parts
    ):
        raise ValueError(
            f"glob {pattern!r}: expected '/'-separated components of lowercase letters, "
            "digits, '-', '*' and '?', or '**' alone"
        )
    return pattern


@lru_cache(maxsize=512)
def _component_regex(component: str) -> re.Pattern[str]:
    translated = "".join(
        "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in component
    )
    return re.compile(translated)


def _match(glob: Sequence[str], parts: Sequence[str]) -> bool:
    if not glob:
        return not parts
    head, rest = glob[0], glob[1:]
    if head == "**":
        # Zero components, or one more and try again.
        return any(_match(rest, parts[skip:]) for skip in range(len(parts) + 1))
    if not parts or _component_regex(head).fullmatch(parts[0]) is None:
        return False
    return _match(rest, parts[1:])


def glob_matches(pattern: str, case_id: str) -> bool:
    """Whether ``case_id`` matches the id glob ``pattern``."""
    return _match(check_glob(pattern).split("/"), case_id.split("/"))


def select_cases(
    cases: Iterable[Case],
    role: Role,
    *,
    run: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> list[Case]:
    """The cases for ``role``, kept if some ``run`` glob matches (all if none), minus ``skip``."""
    chosen = []
    for case in cases:
        if not case.applies_to(role):
            continue
        if run and not any(glob_matches(g, case.id) for g in run):
            continue
        if any(glob_matches(g, case.id) for g in skip):
            continue
        chosen.append(case)
    return chosen
