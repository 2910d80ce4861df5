"""The collateral-sync conformance kit: run it against your server, read why it does (not) conform.

Run from the command line (``collateral-sync conformance run|list``, see
docs/CONFORMANCE.md) or from Python with :func:`run_cases`. The kit uses only
the public protocol (``proto/``, as generated in ``collateral_sync.v1``) and
the SDK's client side, so it judges every implementation the same way.

Cases live in ``collateral_sync_conformance.cases`` and register with
:data:`REGISTRY`; each has a stable hierarchical id, a level (MUST/SHOULD),
the roles it applies to and a one-line description.
"""

from collateral_sync_conformance._cli import main
from collateral_sync_conformance._context import CaseContext, KitConfig
from collateral_sync_conformance._expect import CaseFailure, CaseSkipped, expect_ok, expect_status
from collateral_sync_conformance._registry import REGISTRY, Case, Level, Registry, Role
from collateral_sync_conformance._report import write_reports
from collateral_sync_conformance._runner import (
    CaseResult,
    KnownFailing,
    RunResult,
    Verdict,
    run_cases,
)

__all__ = [
    "REGISTRY",
    "Case",
    "CaseContext",
    "CaseFailure",
    "CaseResult",
    "CaseSkipped",
    "KitConfig",
    "KnownFailing",
    "Level",
    "Registry",
    "Role",
    "RunResult",
    "Verdict",
    "expect_ok",
    "expect_status",
    "main",
    "run_cases",
    "write_reports",
]
