"""docs/INTEGRATING.md's TypeScript program type-checks against the SDK as published.

The guide's ``ts`` block is compiled by the package's own strict ``tsc`` as a file of the
package importing ``@collateral-sync/sdk`` by name (resolved through package.json's
``exports`` to the built declarations), so a renamed export or a changed signature fails
here. A copy that calls a function the SDK does not export must fail too: the check is real.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "INTEGRATING.md"
TS_SDK = ROOT / "sdk" / "typescript"
TSC = TS_SDK / "node_modules" / "typescript" / "bin" / "tsc"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not TSC.exists(),
    reason="node and sdk/typescript/node_modules come with `make setup`",
)


def _guide_program() -> str:
    blocks = re.findall(r"```ts\n(.*?)```", GUIDE.read_text("utf-8"), flags=re.S)
    assert len(blocks) == 1, f"expected one ts block in {GUIDE.name}, found {len(blocks)}"
    return str(blocks[0])


def _built() -> None:
    if not (TS_SDK / "dist" / "src" / "index.d.ts").exists():
        subprocess.run(["node", str(TSC), "-p", "tsconfig.json"], cwd=TS_SDK, check=True)


def _type_check(program: str, name: str) -> subprocess.CompletedProcess[str]:
    # Inside the package (dist/ is not committed), so that the package's own name resolves.
    where = TS_SDK / "dist" / "guide-check" / name
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    (where / "guide.ts").write_text(program, "utf-8")
    config = {
        "extends": str(TS_SDK / "tsconfig.json"),
        "compilerOptions": {"noEmit": True, "rootDir": str(where)},
        "files": [str(where / "guide.ts")],
        "include": [],
    }
    (where / "tsconfig.json").write_text(json.dumps(config), "utf-8")
    return subprocess.run(
        ["node", str(TSC), "-p", str(where / "tsconfig.json")],
        cwd=TS_SDK,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_guide_program_type_checks() -> None:
    _built()
    done = _type_check(_guide_program(), "as-written")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_program_calling_what_the_sdk_lacks_does_not() -> None:
    _built()
    program = _guide_program().replace("verifyInclusionProof", "verifyInclusionProofLoosely")
    done = _type_check(program, "broken")
    assert done.returncode != 0
    assert "verifyInclusionProofLoosely" in done.stdout + done.stderr
