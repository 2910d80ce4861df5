"""`buf breaking` guards the released protocol (releases/collateral_sync.v1.json).

`make lint` runs it over proto/; these tests show it able to fail: a copy of proto/
with a field removed, renumbered or retyped is refused, and an additive change
(a new field, a new message) passes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
RELEASED = ROOT / "releases" / "collateral_sync.v1.json"
ATTESTATION = Path("collateral_sync") / "v1" / "attestation.proto"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make setup`")


def _breaking(proto: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", str(proto), "--against", str(RELEASED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def _copy_with(tmp_path: Path, old: str, new: str) -> Path:
    proto = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto)
    path = proto / ATTESTATION
    text = path.read_text("utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), "utf-8")
    return proto


def test_the_protocol_in_the_tree_is_not_breaking() -> None:
    done = _breaking(ROOT / "proto")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        ("  string account_id = 2;\n  // Exchange", "  // Exchange", r"[Ff]ield \"2\".*deleted"),
        ("  uint64 epoch = 4;", "  uint64 epoch = 9;", r"[Ff]ield \"4\".*deleted"),
        ("  uint64 epoch = 4;", "  int64 epoch = 4;", r"type from \"uint64\" to \"int64\""),
        ('option java_package = "io.collateralsync.v1";', 'option java_package = "io.other.v1";', "java_package"),
    ],
    ids=["field-removed", "field-renumbered", "field-retyped", "java-package-changed"],
)
def test_a_breaking_change_fails(tmp_path: Path, old: str, new: str, said: str) -> None:
    done = _breaking(_copy_with(tmp_path, old, new))
    assert done.returncode != 0, done.stdout + done.stderr
    assert re.search(said, done.stdout + done.stderr), done.stdout + done.stderr


def test_an_additive_change_passes(tmp_path: Path) -> None:
    proto = _copy_with(
        tmp_path,
        "  uint64 epoch = 4;",
        "  uint64 epoch = 4;\n  // Added after the release.\n  string added_later = 100;",
    )
    done = _breaking(proto)
    assert done.returncode == 0, done.stdout + done.stderr
