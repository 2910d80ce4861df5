"""The kit depends only on the public protocol and the SDK's client side.

It judges every implementation the same way only if it knows nothing of the
reference servers: no import of ``collateral_sync_reference``, none of the
SDK's server side (``collateral_sync.server``), none of the SDK's private
modules or names. Checked on the source, so a lazy import inside a function
counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[2] / "conformance" / "collateral_sync_conformance"

#: SDK modules the kit may use: the client side and the pure verification code.
ALLOWED_SDK_MODULES = {
    "collateral_sync",
    "collateral_sync.amounts",
    "collateral_sync.attestation",
    "collateral_sync.clients",
    "collateral_sync.dev_ca",
    "collateral_sync.errors",
    "collateral_sync.keys",
    "collateral_sync.merkle",
    "collateral_sync.reconciliation",
    "collateral_sync.signing",
    "collateral_sync.statements",
    "collateral_sync.sync",
    "collateral_sync.transport",
    "collateral_sync.valuation",
}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in a file."""
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the kit
                continue
            found.append((node.lineno, node.module or "", [a.name for a in node.names]))
    return found


def _problem(module: str, names: list[str]) -> str | None:
    """Why importing ``names`` from ``module`` is not allowed in the kit, or None."""
    root = module.split(".", 1)[0]
    if root == "collateral_sync_reference":
        return f"imports the reference servers ({module})"
    if root != "collateral_sync" or module.startswith("collateral_sync.v1"):
        return None  # third-party, or the generated public protocol
    if module not in ALLOWED_SDK_MODULES:
        return f"imports {module}, not the SDK's public client side"
    private = [n for n in names if n.startswith("_") and not n.endswith("__")]
    if private:
        return f"imports private names {private} from {module}"
    return None


def _violations(path: Path) -> list[str]:
    return [
        f"{path.name}:{line}: {problem}"
        for line, module, names in _imports(path)
        if (problem := _problem(module, names)) is not None
    ]


def test_the_kit_has_sources_to_check() -> None:
    files = sorted(KIT.rglob("*.py"))
    assert len(files) >= 10
    assert any(p.parent.name == "cases" for p in files)


def test_the_kit_imports_only_the_public_protocol_and_sdk_client_side() -> None:
    problems = [problem for path in sorted(KIT.rglob("*.py")) for problem in _violations(path)]
    assert problems == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import collateral_sync_reference\n", "reference servers"),
        ("from collateral_sync_reference.common.runner import serve_main\n", "reference servers"),
        ("from collateral_sync.server import create_server\n", "not the SDK's public client side"),
        ("from collateral_sync.sync._log import SyncLog\n", "not the SDK's public client side"),
        ("from collateral_sync.keys import _to_timestamp\n", "private names"),
        ("def f():\n    import collateral_sync_reference.custodian\n", "reference servers"),
        ("from collateral_sync.v1 import envelope_pb2\nimport grpc\n", None),
    ],
)
def test_the_scan_catches_forbidden_imports(
    tmp_path: Path, source: str, expected: str | None
) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    problems = _violations(probe)
    if expected is None:
        assert problems == []
    else:
        [problem] = problems
        assert expected in problem
