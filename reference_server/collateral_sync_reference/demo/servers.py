"""``make demo`` plumbing: the ``collateral-sync`` commands it runs and the server processes.

The demo drives the product the way an operator would: keys and certificates
come from ``collateral-sync keygen`` and ``collateral-sync dev-certs``, and
each reference server is its own ``collateral-sync serve <role> --config FILE
--test-mode`` process, ready once it prints ``LISTENING host:port``. Every
wait has a deadline, and :class:`Servers` stops every process it started when
its ``with`` block ends, however it ends (SIGTERM first, SIGKILL if a server
does not stop in time).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from collateral_sync.errors import StateError

__all__ = ["ServerProcess", "Servers", "run_cli", "write_config"]

_CLI = (sys.executable, "-m", "collateral_sync._cli")
CLI_TIMEOUT = 60.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: Lines of a server's log shown when it fails.
_LOG_TAIL = 15


def run_cli(
    args: Sequence[str], *, cwd: Path, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``collateral-sync ARGS`` in ``cwd``; the caller judges the exit code."""
    try:
        # Our own CLI under this interpreter, with arguments the demo built.
        return subprocess.run(  # noqa: S603
            [*_CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise StateError(
            f"collateral-sync {' '.join(args)}: expected it to finish within {timeout:.0f} s, "
            "it did not",
            metadata={"expected": f"exit within {timeout:.0f} s", "actual": "still running"},
        ) from err


def write_config(path: Path, document: dict[str, Any]) -> Path:
    """Write a server configuration file (JSON; its paths are relative to its directory)."""
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


class ServerProcess:
    """One reference server: ``collateral-sync serve ROLE --config FILE --test-mode``."""

    def __init__(self, role: str, config: Path, log: Path) -> None:
        self.role = role
        self.config = config
        self.log = log
        self.address = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return 0 if self._process is None else self._process.pid

    def start(self) -> str:
        """Start the server and return its address once it serves."""
        with self.log.open("ab") as log:
            # Its own session: a Ctrl-C in the terminal reaches the demo, which
            # then stops the servers in order, instead of every process at once.
            self._process = subprocess.Popen(  # noqa: S603 - our own CLI, as above
                [*_CLI, "serve", self.role, "--config", str(self.config), "--test-mode"],
                cwd=self.config.parent,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self.address = self._wait_listening()
        return self.address

    def _wait_listening(self) -> str:
        process = self._process
        assert process is not None
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise self.failure(
                        f"expected a LISTENING line within {START_TIMEOUT:.0f} s, got none"
                    )
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    try:
                        code: int | None = process.wait(timeout=STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        code = None
                    raise self.failure(f"closed its output (exit code {code}) before it served")
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode(errors="replace")
        word, _, address = line.partition(" ")
        if word != "LISTENING" or not address:
            raise self.failure(f"expected 'LISTENING host:port' first, got {line!r}")
        return address

    def failure(self, what: str) -> StateError:
        """An error naming this server, with the end of its log."""
        tail = self.log_tail()
        return StateError(
            f"{self.role} server ({self.config.name}): {what}"
            + (f"\n--- last lines of {self.log} ---\n{tail}" if tail else ""),
            metadata={"expected": "a serving process", "actual": what},
        )

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after the grace); the exit code, None if never started."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL, for when there is no time left to stop gracefully."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-_LOG_TAIL:])


class Servers:
    """The servers of one demo run; all stopped, last started first, when the block ends."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started: list[ServerProcess] = []

    def start(self, role: str, config: Path) -> ServerProcess:
        server = ServerProcess(role, config, self._directory / f"{config.stem}.log")
        # Registered before it starts: a server that fails half-way is still stopped.
        self._started.append(server)
        server.start()
        return server

    def stop_all(self) -> list[tuple[ServerProcess, int | None]]:
        """Stop every server; returns each with its exit code."""
        stopped = []
        try:
            while self._started:
                server = self._started[-1]
                stopped.append((server, server.stop()))
                self._started.pop()
        except BaseException:
            # Interrupted while stopping (a second Ctrl-C): no process may outlive the demo.
            for server in self._started:
                server.kill()
            self._started.clear()
            raise
        return stopped

    def __enter__(self) -> Servers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()
