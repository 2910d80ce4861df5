"""Case ids, id globs and case selection."""

from __future__ import annotations

import collateral_sync_conformance.cases  # noqa: F401 (registers the kit's cases)
import pytest
from collateral_sync_conformance._registry import (
    REGISTRY,
    Case,
    Level,
    Registry,
    Role,
    check_glob,
    glob_matches,
    select_cases,
)


async def _nothing(ctx: object) -> None:
    return None


def _case(case_id: str, *roles: Role, level: Level = Level.MUST) -> Case:
    return Case(case_id, level, frozenset(roles or Role), "does something", _nothing)


@pytest.mark.parametrize(
    ("pattern", "case_id", "expected"),
    [
        ("envelope/forged-signature-refused", "envelope/forged-signature-refused", True),
        ("envelope/*", "envelope/forged-signature-refused", True),
        ("envelope/*", "envelope/pledge-collateral/forged-signature-refused", False),
        (
            "envelope/*/forged-signature-refused",
            "envelope/pledge-collateral/forged-signature-refused",
            True,
        ),
        ("envelope/*/forged-signature-refused", "envelope/forged-signature-refused", False),
        ("envelope/**", "envelope/pledge-collateral/forged-signature-refused", True),
        ("envelope/**", "envelope/forged-signature-refused", True),
        (
            "**/forged-signature-refused",
            "envelope/pledge-collateral/forged-signature-refused",
            True,
        ),
        ("**/forged-signature-refused", "envelope/forged-signature-refused", True),
        ("**/forged-signature-refused", "envelope/forged-signature-accepted", False),
        ("**", "transport/health-serving", True),
        ("*", "transport/health-serving", False),
        ("envelope/**/refused", "envelope/a/b/c/refused", True),
        ("envelope/**/refused", "envelope/refused", True),
        ("envelope/**/refused", "attestation/refused", False),
        ("envelope/*/forged-*", "envelope/pledge-collateral/forged-signature-refused", True),
        ("envelope/*/forged-*", "envelope/pledge-collateral/expired-refused", False),
        ("transport/health-servin?", "transport/health-serving", True),
        ("transport/health-servin?", "transport/health-servin", False),
        # '*' never crosses a '/'.
        ("transport*", "transport/health-serving", False),
        ("transport/health", "transport/health-serving", False),
    ],
)
def test_globs_match_by_path_component(pattern: str, case_id: str, expected: bool) -> None:
    assert glob_matches(pattern, case_id) is expected


@pytest.mark.parametrize("pattern", ["", "Envelope/x", "envelope//x", "envelope/", "a b", "a/**x"])
def test_malformed_globs_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="glob"):
        check_glob(pattern)


@pytest.mark.parametrize(
    "case_id", ["single", "Upper/case", "a//b", "a/b/", "a/-b", "a/b c", "a/**", "a/b*"]
)
def test_malformed_case_ids_are_refused(case_id: str) -> None:
    with pytest.raises(ValueError, match="case id"):
        Registry([_case(case_id)])


def test_registry_refuses_duplicates_roleless_and_multiline_cases() -> None:
    registry = Registry([_case("a/b")])
    with pytest.raises(ValueError, match="twice"):
        registry.add(_case("a/b"))
    with pytest.raises(ValueError, match="no role"):
        registry.add(Case("a/c", Level.MUST, frozenset(), "x", _nothing))
    with pytest.raises(ValueError, match="one-line"):
        registry.add(Case("a/d", Level.MUST, frozenset(Role), "two\nlines", _nothing))
    assert [c.id for c in registry] == ["a/b"]


def test_decorator_registers_in_order_and_keeps_the_function() -> None:
    registry = Registry()

    @registry.case("x/second", Level.SHOULD, "second", roles=[Role.EXCHANGE])
    async def second(ctx: object) -> None:
        return None

    @registry.case("x/first", Level.MUST, "first")
    async def first(ctx: object) -> None:
        return None

    assert [c.id for c in registry] == ["x/second", "x/first"]
    assert registry.get("x/second") == Case(
        "x/second", Level.SHOULD, frozenset({Role.EXCHANGE}), "second", second
    )
    assert [c.id for c in registry.for_role(Role.CUSTODIAN)] == ["x/first"]


def test_selection_by_role_run_and_skip() -> None:
    cases = [
        _case("transport/health-serving"),
        _case("envelope/pledge/forged", Role.CUSTODIAN),
        _case("envelope/pledge/expired", Role.CUSTODIAN),
        _case("margin/call-issued", Role.EXCHANGE),
    ]

    def ids(role: Role, run: list[str] | None = None, skip: list[str] | None = None) -> list[str]:
        return [c.id for c in select_cases(cases, role, run=run or [], skip=skip or [])]

    assert ids(Role.CUSTODIAN) == [
        "transport/health-serving",
        "envelope/pledge/forged",
        "envelope/pledge/expired",
    ]
    assert ids(Role.EXCHANGE) == ["transport/health-serving", "margin/call-issued"]
    assert ids(Role.CUSTODIAN, run=["envelope/**"]) == [
        "envelope/pledge/forged",
        "envelope/pledge/expired",
    ]
    assert ids(Role.CUSTODIAN, run=["envelope/**"], skip=["**/expired"]) == [
        "envelope/pledge/forged"
    ]
    assert ids(Role.CUSTODIAN, run=["transport/*", "**/forged"]) == [
        "transport/health-serving",
        "envelope/pledge/forged",
    ]
    assert ids(Role.EXCHANGE, run=["envelope/**"]) == []


def test_the_kits_cases_are_well_formed() -> None:
    cases = list(REGISTRY)
    assert len(cases) >= 60
    assert all(c.description[0].islower() or c.description[0].isupper() for c in cases)
    for role in Role:
        assert REGISTRY.for_role(role), role
    custodian = REGISTRY.for_role(Role.CUSTODIAN)
    assert sum(c.level is Level.MUST for c in custodian) >= 50
    # Every named family of the brief is present.
    for family in ("transport/", "attestation/", "envelope/", "custodian/"):
        assert any(c.id.startswith(family) for c in cases), family
