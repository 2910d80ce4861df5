"""README.md's "The SDK in a few lines" runs as written, and its last line verifies.

The block is executed in an empty directory (it writes its log file there); a
tampered copy, whose statement is not the one the log holds, must fail, so the
example cannot pass by proving nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from collateral_sync import CollateralSyncError
from collateral_sync.v1 import attestation_pb2

README = Path(__file__).resolve().parents[2] / "README.md"


def _sdk_example() -> str:
    section = README.read_text("utf-8").split("## The SDK in a few lines", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    return str(block)


def test_the_readme_sdk_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(_sdk_example(), "README.md", "exec"), scope)
    assert (tmp_path / "attestations.db").is_file()
    assert scope["index"] == 0
    checkpoint = scope["checkpoint"]
    assert isinstance(checkpoint, attestation_pb2.Checkpoint)
    assert checkpoint.tree_size == 1


def test_the_readme_sdk_example_refuses_another_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = _sdk_example()
    last = code.rstrip().splitlines()[-1]
    assert last.startswith("verify_inclusion_proof(")
    # The same proof, checked for a leaf the log does not hold.
    tampered = code.replace(last, last.replace("statement_leaf(envelope)", "b'another leaf'", 1))
    assert tampered != code
    with pytest.raises(CollateralSyncError):
        exec(compile(tampered, "README.md (tampered)", "exec"), {})
