"""The kit's quick starts (docs/CONFORMANCE.md, README.md), run exactly as written.

A quick start an integrator copies must work as printed: each ``sh`` block of the
"Quick start" section runs in a fresh directory with the project's
``collateral-sync`` on PATH, and the summary the kit prints must be the one the
document shows after that block. The blocks use the ports ``init`` writes
(7441-7443), so those must be free.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

CONFORMANCE_MD = ROOT / "docs" / "CONFORMANCE.md"
README_MD = ROOT / "README.md"
_PORTS = (7441, 7442, 7443)
_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
#: The summary lines a block's sample output shows: a level row and the RESULT line.
_SUMMARY = re.compile(r"^(MUST|SHOULD|RESULT)\b.*$", re.MULTILINE)


def _quick_start() -> list[tuple[str, str]]:
    """(sh block, the sample output block after it) of the quick starts.

    CONFORMANCE.md's "Quick start" section, each block with the sample summary
    that follows it; and the README's kit block, which shows none (it must pass).
    """
    text = CONFORMANCE_MD.read_text("utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    readme = README_MD.read_text("utf-8").split("## Conformance kit", 1)[1].split("\n## ", 1)[0]
    blocks = [
        *_BLOCK.findall(section),
        *_BLOCK.findall(readme)[:1],
        ("", "RESULT: PASS (every MUST case passed)"),
    ]
    pairs = []
    for index, (language, body) in enumerate(blocks):
        if language == "sh":
            following = blocks[index + 1][1] if index + 1 < len(blocks) else ""
            pairs.append((body, following))
    return pairs


def _lines(text: str) -> list[str]:
    return [m.group(0) for m in _SUMMARY.finditer(text)]


def _free(port: int) -> bool:
    with socket.socket() as sock:
        # As a server binds: connections of an earlier block in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _end_group(group: int) -> None:
    """SIGTERM the block's process group and wait (up to 10 s) until all of it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


@pytest.mark.parametrize("index", range(len(_quick_start())))
def test_the_quick_start_block_runs_as_written(index: int, tmp_path: Path) -> None:
    busy = [port for port in _PORTS if not _free(port)]
    assert not busy, f"the quick start needs ports {_PORTS} free; in use: {busy}"
    script, sample = _quick_start()[index]
    environment = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    environment["PATH"] = os.pathsep.join([bin_dir, environment.get("PATH", "")])
    # The reference servers' package, whether or not the editable install predates it.
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "reference_server"), str(ROOT / "conformance")]
    )
    # Output to a file, not a pipe: the block's background server keeps its stdout open
    # after the shell ends. The server is in the shell's process group, ended after.
    log = tmp_path / "output.txt"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=tmp_path,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=600)
        finally:
            _end_group(process.pid)
    output = log.read_text("utf-8", errors="replace")
    assert process.returncode == 0, output[-4000:]
    shown = [" ".join(line.split()) for line in _lines(sample)]
    printed = [" ".join(line.split()) for line in _lines(output)]
    assert shown, "the document shows no summary after this block"
    assert printed[-len(shown) :] == shown, (
        "the summary printed differs from the one docs/CONFORMANCE.md shows:\n" + "\n".join(printed)
    )
