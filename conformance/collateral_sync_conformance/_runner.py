"""Running cases: verdicts, the known-failing list, and what decides the exit code.

Each case ends with one verdict:

- ``passed``; ``failed`` (the server did not behave as required); ``skipped``
  (the case could not run here: no test-control service, no key for a role;
  never counted as passed); ``error`` (the kit itself broke: an unexpected
  exception; counted as failed);
- ``expected-failure``: it failed and is listed in the known-failing file.

A listed case that *passes* is reported failed, and so is a listed id that
matches no case: the list cannot go stale. The run fails (exit 1) when a MUST
case fails or errs, or the known-failing list is stale; SHOULD failures are
reported but do not fail the run.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from collateral_sync import PROTOCOL_VERSION, __version__
from collateral_sync.errors import RPCError

from collateral_sync_conformance._context import CaseContext, KitConfig, Session
from collateral_sync_conformance._expect import CaseFailure, CaseSkipped, outcome_from_error
from collateral_sync_conformance._registry import Case, Level, Role, check_glob, glob_matches

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CaseResult",
    "KnownFailing",
    "RunResult",
    "Verdict",
    "run_cases",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class Verdict(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    EXPECTED_FAILURE = "expected-failure"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class KnownFailing:
    """Entries of a known-failing file: case ids or id globs, with their line numbers."""

    path: str
    entries: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, text: str, path: str = "<known-failing>") -> KnownFailing:
        """One id (or glob) per line; ``#`` starts a comment; blank lines are ignored.

        A malformed glob raises ValueError naming the line.
        """
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                check_glob(entry)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from err
            entries.append((entry, number))
        return cls(path, tuple(entries))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KnownFailing:
        return cls.parse(Path(path).read_text(encoding="utf-8"), os.fspath(path))

    def lists(self, case_id: str) -> bool:
        return any(glob_matches(entry, case_id) for entry, _ in self.entries)

    def unmatched(self, cases: Sequence[Case]) -> list[tuple[str, int]]:
        """Entries that name no case in ``cases``."""
        return [
            (entry, line)
            for entry, line in self.entries
            if not any(glob_matches(entry, c.id) for c in cases)
        ]


@dataclass(slots=True)
class CaseResult:
    """The verdict on one case, with what was sent, expected and received on failure."""

    case: Case
    verdict: Verdict
    duration: float
    message: str = ""
    sent: str | None = None
    expected: str | None = None
    got: str | None = None
    #: Listed in the known-failing file.
    known_failing: bool = False
    #: Listed as known-failing, yet it passed: the entry must go.
    stale: bool = False

    @property
    def counts_as_failure(self) -> bool:
        return self.verdict in (Verdict.FAILED, Verdict.ERROR)


@dataclass(slots=True)
class RunResult:
    """Everything the reports show."""

    role: Role
    target: str
    started_at: datetime
    finished_at: datetime
    results: list[CaseResult]
    #: Problems with the run itself (stale known-failing entries).
    run_errors: list[str] = field(default_factory=list)
    protocol_version: str = PROTOCOL_VERSION
    kit_version: str = __version__
    known_failing_file: str | None = None

    @property
    def duration(self) -> float:
        return sum(r.duration for r in self.results)

    def counts(self) -> dict[Level, dict[Verdict, int]]:
        table = {level: dict.fromkeys(Verdict, 0) for level in Level}
        for result in self.results:
            table[result.case.level][result.verdict] += 1
        return table

    def failed_must(self) -> list[CaseResult]:
        return [r for r in self.results if r.case.level is Level.MUST and r.counts_as_failure]

    def outcome_line(self) -> str:
        """``RESULT: PASS (...)`` or ``RESULT: FAIL (why)``: the line every report leads with."""
        failed = self.failed_must()
        stale = [r for r in self.results if r.stale]
        if self.exit_code == 0:
            return "RESULT: PASS (every MUST case passed)"
        reasons = []
        if failed:
            reasons.append(f"{len(failed)} MUST case(s) failed")
        if stale:
            reasons.append(f"{len(stale)} known-failing case(s) passed: the list is stale")
        if self.run_errors:
            # A known-failing entry matching no case, or a counterpart the kit could not serve.
            reasons.append(f"{len(self.run_errors)} run error(s)")
        return "RESULT: FAIL (" + "; ".join(reasons) + ")"

    @property
    def exit_code(self) -> int:
        stale = any(r.stale for r in self.results)
        if self.failed_must() or self.run_errors or stale:
            return EXIT_FAILED
        return EXIT_OK


Progress = Callable[[CaseResult], None]


async def _run_one(case: Case, session: Session, timeout: float) -> CaseResult:
    context = CaseContext(session, case)
    started = time.perf_counter()

    def result(
        verdict: Verdict,
        message: str = "",
        *,
        sent: str | None = None,
        expected: str | None = None,
        got: str | None = None,
    ) -> CaseResult:
        elapsed = time.perf_counter() - started
        return CaseResult(case, verdict, elapsed, message, sent=sent, expected=expected, got=got)

    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            await case.body(context)
    except CaseSkipped as skip:
        return result(Verdict.SKIPPED, str(skip))
    except CaseFailure as failure:
        return result(
            Verdict.FAILED,
            failure.message,
            sent=failure.sent,
            expected=failure.expected,
            got=failure.got,
        )
    except TimeoutError:
        if not deadline.expired():
            return result(Verdict.ERROR, _unexpected())
        last = context.transcript[-1].rpc if context.transcript else "none"
        return result(
            Verdict.FAILED,
            f"the case did not finish within {timeout:g} s (last RPC: {last})",
            expected=f"an answer within {timeout:g} s",
            got="no answer",
        )
    except RPCError as err:
        # A call the case made directly (not through context.rpc) was refused.
        outcome = outcome_from_error("RPC", None, err, 0.0)
        return result(
            Verdict.FAILED,
            f"an RPC failed with {outcome.code.name}: {outcome.message}",
            expected="OK",
            got=str(outcome.summary()),
        )
    except Exception:  # noqa: BLE001 — a kit bug must become a verdict, not end the run
        return result(Verdict.ERROR, _unexpected())
    return result(Verdict.PASSED)


def _unexpected() -> str:
    return "the kit raised an unexpected exception:\n" + traceback.format_exc(limit=8)


def _apply_known_failing(result: CaseResult, known: KnownFailing | None) -> CaseResult:
    if known is None or not known.lists(result.case.id):
        return result
    result.known_failing = True
    if result.verdict is Verdict.FAILED:
        result.verdict = Verdict.EXPECTED_FAILURE
    elif result.verdict is Verdict.PASSED:
        result.verdict = Verdict.FAILED
        result.stale = True
        result.message = (
            f"listed in the known-failing file {known.path} but passed: remove the entry"
        )
        result.expected = "a failure (the case is listed as known-failing)"
        result.got = "passed"
    return result


async def run_cases(
    config: KitConfig,
    cases: Sequence[Case],
    *,
    role_cases: Sequence[Case] | None = None,
    known_failing: KnownFailing | None = None,
    case_timeout: float = 60.0,
    progress: Progress | None = None,
    session_factory: Callable[[KitConfig], Session] = Session.open,
) -> RunResult:
    """Run ``cases`` in order against ``config.target`` and collect the verdicts.

    ``role_cases`` are all cases of the role (a known-failing entry that
    matches none of them is stale); by default ``cases``.
    """
    started_at = datetime.now(UTC)
    run_errors = []
    if known_failing is not None:
        for entry, line in known_failing.unmatched(role_cases if role_cases is not None else cases):
            run_errors.append(
                f"{known_failing.path}:{line}: '{entry}' matches no {config.role} case: remove it"
            )
    results = []
    session = session_factory(config)
    try:
        run_errors.extend(await session.start())
        for case in cases:
            outcome = _apply_known_failing(
                await _run_one(case, session, case_timeout), known_failing
            )
            results.append(outcome)
            if progress is not None:
                progress(outcome)
    finally:
        await session.close()
    return RunResult(
        role=config.role,
        target=config.target,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        results=results,
        run_errors=run_errors,
        known_failing_file=None if known_failing is None else known_failing.path,
    )
