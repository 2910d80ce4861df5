"""Verdicts, the known-failing list and exit codes, with cases that need no server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from collateral_sync.dev_ca import create_dev_pki
from collateral_sync.errors import RPCError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.transport import TlsConfig
from collateral_sync.v1 import common_pb2
from collateral_sync_conformance._context import KitConfig
from collateral_sync_conformance._expect import CaseFailure, CaseSkipped
from collateral_sync_conformance._registry import Case, Level, Role
from collateral_sync_conformance._runner import (
    EXIT_FAILED,
    EXIT_OK,
    KnownFailing,
    RunResult,
    Verdict,
    run_cases,
)


class FakeSession:
    """Stands in for the network session: these cases never touch it."""

    def __init__(self) -> None:
        self.closed = False

    async def start(self) -> list[str]:
        return []

    async def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> KitConfig:
    pki = create_dev_pki(tmp_path_factory.mktemp("pki"), parties=["exchange-t"])
    return KitConfig(
        role=Role.CUSTODIAN,
        target="127.0.0.1:9",
        tls=TlsConfig.from_dev_pki(pki, "exchange-t"),
        registry=KeyRegistry(),
        kit_keys=(SigningKey.generate("client-t", common_pb2.PARTY_ROLE_CLIENT),),
        server_party_id="custodian-t",
    )


async def _passes(ctx: object) -> None:
    return None


async def _fails(ctx: object) -> None:
    raise CaseFailure(
        "refused nothing", sent="a forged pledge", expected="UNAUTHENTICATED", got="OK"
    )


async def _skips(ctx: object) -> None:
    raise CaseSkipped("needs TestControlService")


async def _breaks(ctx: object) -> None:
    {}["missing"]


async def _hangs(ctx: object) -> None:
    await asyncio.Event().wait()


async def _raises_timeout_itself(ctx: object) -> None:
    raise TimeoutError("from inside the case")


async def _rpc_refused(ctx: object) -> None:
    raise RPCError("no such account", status_code=grpc.StatusCode.NOT_FOUND)


def case(case_id: str, body: object, level: Level = Level.MUST) -> Case:
    return Case(case_id, level, frozenset(Role), "a case", body)  # type: ignore[arg-type]


def run(
    config: KitConfig,
    cases: Sequence[Case],
    known: KnownFailing | None = None,
    *,
    timeout: float = 5.0,
) -> tuple[RunResult, FakeSession]:
    session = FakeSession()
    seen: list[str] = []
    result = asyncio.run(
        run_cases(
            config,
            cases,
            known_failing=known,
            case_timeout=timeout,
            progress=lambda r: seen.append(r.case.id),
            session_factory=lambda _: session,  # type: ignore[arg-type,return-value]
        )
    )
    assert seen == [c.id for c in cases]  # progress reported each case, in order
    return result, session


def verdicts(result: RunResult) -> dict[str, Verdict]:
    return {r.case.id: r.verdict for r in result.results}


def test_each_kind_of_ending_gets_its_verdict(config: KitConfig) -> None:
    result, session = run(
        config,
        [
            case("a/passes", _passes),
            case("a/fails", _fails),
            case("a/skips", _skips),
            case("a/breaks", _breaks),
            case("a/hangs", _hangs),
            case("a/timeout-inside", _raises_timeout_itself),
            case("a/rpc-refused", _rpc_refused),
        ],
        timeout=0.2,
    )
    assert session.closed
    assert verdicts(result) == {
        "a/passes": Verdict.PASSED,
        "a/fails": Verdict.FAILED,
        "a/skips": Verdict.SKIPPED,
        "a/breaks": Verdict.ERROR,
        "a/hangs": Verdict.FAILED,
        "a/timeout-inside": Verdict.ERROR,
        "a/rpc-refused": Verdict.FAILED,
    }
    by_id = {r.case.id: r for r in result.results}
    failed = by_id["a/fails"]
    assert (failed.message, failed.sent, failed.expected, failed.got) == (
        "refused nothing",
        "a forged pledge",
        "UNAUTHENTICATED",
        "OK",
    )
    assert by_id["a/skips"].message == "needs TestControlService"
    assert "KeyError" in by_id["a/breaks"].message
    assert "did not finish within 0.2 s" in by_id["a/hangs"].message
    assert "NOT_FOUND" in by_id["a/rpc-refused"].message
    assert result.exit_code == EXIT_FAILED


@pytest.mark.parametrize(
    ("body", "level", "exit_code"),
    [
        (_passes, Level.MUST, EXIT_OK),
        (_fails, Level.MUST, EXIT_FAILED),
        (_breaks, Level.MUST, EXIT_FAILED),
        (_fails, Level.SHOULD, EXIT_OK),
        (_breaks, Level.SHOULD, EXIT_OK),
        # Skipped is never passed, but not a failure of the server either.
        (_skips, Level.MUST, EXIT_OK),
    ],
)
def test_exit_code_fails_only_on_must(
    config: KitConfig, body: object, level: Level, exit_code: int
) -> None:
    result, _ = run(config, [case("a/passes", _passes), case("a/x", body, level)])
    assert result.exit_code == exit_code
    counts = result.counts()
    assert counts[level][verdicts(result)["a/x"]] >= 1
    assert sum(n for row in counts.values() for n in row.values()) == 2


def test_known_failing_file_format() -> None:
    known = KnownFailing.parse(
        "# servers we know about\n\nenvelope/pledge/forged   # issue 12\n  attestation/**\n",
        "known.txt",
    )
    assert known.entries == (("envelope/pledge/forged", 3), ("attestation/**", 4))
    assert known.lists("envelope/pledge/forged")
    assert known.lists("attestation/inclusion-proof-verifies")
    assert not known.lists("envelope/pledge/expired")
    with pytest.raises(ValueError, match=r"known.txt:2: glob"):
        KnownFailing.parse("a/b\nNot A Glob\n", "known.txt")


def test_known_failing_case_that_fails_is_an_expected_failure(config: KitConfig) -> None:
    known = KnownFailing.parse("a/fails\n", "known.txt")
    result, _ = run(config, [case("a/passes", _passes), case("a/fails", _fails)], known)
    assert verdicts(result)["a/fails"] is Verdict.EXPECTED_FAILURE
    listed = result.results[1]
    assert listed.known_failing
    assert not listed.stale
    assert listed.got == "OK"  # the failure's details stay in the reports
    assert result.exit_code == EXIT_OK


def test_known_failing_case_that_passes_fails_the_run_even_at_should(config: KitConfig) -> None:
    known = KnownFailing.parse("a/passes\n", "known.txt")
    result, _ = run(config, [case("a/passes", _passes, Level.SHOULD)], known)
    [only] = result.results
    assert only.verdict is Verdict.FAILED
    assert only.stale
    assert "known.txt" in only.message
    assert "remove" in only.message
    assert result.exit_code == EXIT_FAILED


def test_known_failing_entry_matching_no_case_fails_the_run(config: KitConfig) -> None:
    known = KnownFailing.parse("a/fails\nz/renamed-long-ago\n", "known.txt")
    result, _ = run(config, [case("a/fails", _fails)], known)
    assert verdicts(result) == {"a/fails": Verdict.EXPECTED_FAILURE}
    assert result.run_errors == [
        "known.txt:2: 'z/renamed-long-ago' matches no custodian case: remove it"
    ]
    assert result.exit_code == EXIT_FAILED


def test_known_failing_does_not_hide_kit_errors_or_skips(config: KitConfig) -> None:
    known = KnownFailing.parse("a/*\n", "known.txt")
    result, _ = run(config, [case("a/breaks", _breaks), case("a/skips", _skips)], known)
    assert verdicts(result) == {"a/breaks": Verdict.ERROR, "a/skips": Verdict.SKIPPED}
    assert result.exit_code == EXIT_FAILED


def test_known_failing_file_is_read_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "known-failing.txt"
    path.write_text("transport/reflection-v1  # not served yet\n", encoding="utf-8")
    known = KnownFailing.load(path)
    assert known.path == str(path)
    assert known.entries == (("transport/reflection-v1", 1),)
