"""``conformance run --wait SECONDS``: the kit waits for the server to report SERVING.

The kit runs as a real process (``collateral-sync conformance run``), so that what
it writes to stderr — gRPC core's own log lines included — is checked as a user
sees it. A reference custodian started after the kit is waited for; a port
nothing listens on, a wrong CA and a server reporting NOT_SERVING each end the
wait with one line naming the target and what was last seen (exit 2).
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from collateral_sync.dev_ca import create_dev_pki
from collateral_sync.transport import server_credentials
from collateral_sync_conformance import main
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .conftest import (
    CUSTODIAN,
    Parties,
    ServerProcess,
    StartServer,
    custodian_config,
    kit_argv,
)

ROOT = Path(__file__).resolve().parents[2]
#: A gRPC core log line ("E1207 05:35:54.949692    8632 add_port.cc:83] ...").
CORE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _kit(argv: list[str]) -> subprocess.Popen[bytes]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [
            str(ROOT / "conformance"),
            str(ROOT / "reference_server"),
            *filter(None, [environment.get("PYTHONPATH")]),
        ]
    )
    command = [sys.executable, "-m", "collateral_sync._cli", "conformance", *argv]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment
    )


def _first_stderr_line(process: subprocess.Popen[bytes], timeout: float = 60.0) -> bytes:
    """Read the kit's stderr up to its first newline (never more than ``timeout`` seconds)."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                process.kill()
                pytest.fail(f"no line on the kit's stderr in {timeout} s: {buffer!r}")
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
    return buffer


def _clean(stderr: str) -> list[str]:
    """The non-empty lines of ``stderr``, checked free of tracebacks and gRPC core logs."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert not [line for line in lines if CORE_LOG.match(line)], stderr
    return lines


def test_the_kit_waits_for_a_server_started_after_it(
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    kit = _kit(kit_argv(kit_files, address, "--run", "transport/health-serving", "--wait", "90"))
    try:
        # The kit found nothing there and says what it waits for...
        first = _first_stderr_line(kit)
        assert first.decode().startswith(
            f"waiting up to 90 s for {CUSTODIAN} at {address} to report SERVING"
        ), first
        time.sleep(2)  # ...and keeps polling while the server is still down.
        assert kit.poll() is None
        server: ServerProcess = start_server(
            "custodian",
            custodian_config(reference_parties, tmp_path),
            name="late-custodian",
            extra_args=("--listen", address),
        )
        assert server.address == address
        out, rest = kit.communicate(timeout=120)
    finally:
        if kit.poll() is None:
            kit.kill()
            kit.communicate()
    stderr = (first + rest).decode()
    assert kit.returncode == 0, stderr + out.decode()
    assert "RESULT: PASS" in out.decode()
    assert len(_clean(stderr)) == 1, stderr  # the waiting line, printed once


def test_the_wait_ends_on_a_port_nothing_listens_on(kit_files: dict[str, Path]) -> None:
    address = f"127.0.0.1:{_free_port()}"
    kit = _kit(kit_argv(kit_files, address, "--wait", "1.5"))
    out, err = kit.communicate(timeout=60)
    assert kit.returncode == 2, err
    assert out == b""
    lines = _clean(err.decode())
    assert lines[0].endswith(
        f"waiting up to 1.5 s for {CUSTODIAN} at {address} to report SERVING..."
    )
    assert len(lines) == 2, lines
    assert f"{CUSTODIAN} at {address} did not report SERVING within 1.5 s" in lines[1]
    assert "last seen: connection refused" in lines[1]


def test_without_wait_one_check_names_what_it_saw(kit_files: dict[str, Path]) -> None:
    address = f"127.0.0.1:{_free_port()}"
    kit = _kit(kit_argv(kit_files, address))
    _, err = kit.communicate(timeout=60)
    assert kit.returncode == 2, err
    (line,) = _clean(err.decode())
    assert f"cannot reach {CUSTODIAN} at {address} over mutual TLS: connection refused" in line


def test_a_wrong_ca_is_named_as_a_tls_handshake_failure(
    custodian: ServerProcess, kit_files: dict[str, Path], tmp_path: Path
) -> None:
    other = create_dev_pki(tmp_path / "other-pki", parties=["exchange-1"])
    argv = kit_argv(kit_files, custodian.address, "--wait", "1")
    argv[argv.index("--ca") + 1] = str(other.ca_cert)
    kit = _kit(argv)
    _, err = kit.communicate(timeout=60)
    assert kit.returncode == 2, err
    lines = _clean(err.decode())
    assert len(lines) == 2, lines
    assert f"{CUSTODIAN} at {custodian.address} did not report SERVING within 1 s" in lines[1]
    assert "TLS handshake failed" in lines[1]
    assert f"--ca {other.ca_cert}" in lines[1]
    assert "wrong CA" in lines[1]


@pytest.fixture
def not_serving(reference_parties: Parties) -> Iterator[str]:
    """A server over the parties' mutual TLS whose health says NOT_SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(reference_parties.tls(CUSTODIAN))
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def test_a_server_that_stays_not_serving_ends_the_wait(
    not_serving: str, kit_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(kit_argv(kit_files, not_serving, "--wait", "1")) == 2
    lines = _clean(capsys.readouterr().err)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"waiting up to 1 s for {CUSTODIAN} at {not_serving}")
    assert lines[1].endswith(
        f"{CUSTODIAN} at {not_serving} did not report SERVING within 1 s; "
        "last seen: health reports NOT_SERVING"
    )


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_wait_takes_seconds(
    kit_files: dict[str, Path], capsys: pytest.CaptureFixture[str], value: str
) -> None:
    assert main(kit_argv(kit_files, "127.0.0.1:9", "--wait", value)) == 2
    (line,) = _clean(capsys.readouterr().err)
    assert "argument --wait: expected seconds" in line
