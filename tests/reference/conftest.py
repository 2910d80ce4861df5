"""Fixtures that run the reference servers as real processes on port 0, over mutual TLS.

- ``reference_parties`` (session): a development PKI (written by
  ``collateral-sync dev-certs``) and Ed25519 keys for the parties below, with
  one key registry file; :class:`Parties` builds TLS
  configs, channels and server configuration files from them.
- ``start_server`` (module): ``start_server(role, config) -> ServerProcess``
  writes the config (a dict; party files filled in by :meth:`Parties.config`)
  and starts ``python -m collateral_sync._cli serve <role> --config FILE
  --test-mode --listen 127.0.0.1:0``, waiting for its ``LISTENING host:port``
  line — never a sleep. Every process it started is killed at teardown.

Servers log to ``<dir>/<name>.log`` (:meth:`ServerProcess.log_text`), shown when
a start fails.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from _postgres import PostgresServer
from collateral_sync.dev_ca import DevPki, PartyFiles
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.transport import TlsConfig, secure_channel
from collateral_sync.v1 import common_pb2

ROOT = Path(__file__).resolve().parents[2]
# The reference servers' package, importable whether or not the editable
# install predates it.
REFERENCE_PATH = ROOT / "reference_server"
if str(REFERENCE_PATH) not in sys.path:
    sys.path.insert(0, str(REFERENCE_PATH))

CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"
OTHER_EXCHANGE = "exchange-2"
REGULATOR = "regulator-1"
CLIENT = "client-1"
OTHER_CLIENT = "client-2"
#: A certificate from the same CA whose party is not in the key registry (PROTOCOL.md §4.5).
STRANGER = "stranger-1"

_ROLES = {
    CUSTODIAN: common_pb2.PARTY_ROLE_CUSTODIAN,
    EXCHANGE: common_pb2.PARTY_ROLE_EXCHANGE,
    OTHER_EXCHANGE: common_pb2.PARTY_ROLE_EXCHANGE,
    REGULATOR: common_pb2.PARTY_ROLE_REGULATOR,
    CLIENT: common_pb2.PARTY_ROLE_CLIENT,
    OTHER_CLIENT: common_pb2.PARTY_ROLE_CLIENT,
}
#: Keys are valid long before any test clock, which only moves forward.
KEYS_VALID_FROM = datetime(2020, 1, 1, tzinfo=UTC)
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Parties:
    """Keys, certificates and the registry of every test party."""

    directory: Path
    pki: DevPki
    keys: dict[str, SigningKey]
    registry_path: Path
    #: Where servers store: a PostgreSQL server, or None for SQLite files.
    postgres: PostgresServer | None = None

    @property
    def registry(self) -> KeyRegistry:
        return KeyRegistry.load(self.registry_path)

    def key_path(self, party_id: str) -> Path:
        return self.directory / "keys" / f"{party_id}.key.json"

    def tls(self, party_id: str) -> TlsConfig:
        return TlsConfig.from_dev_pki(self.pki, party_id)

    @asynccontextmanager
    async def channel(self, address: str, party_id: str) -> AsyncIterator[grpc.aio.Channel]:
        """A mutual-TLS channel to ``address`` presenting ``party_id``'s certificate."""
        async with secure_channel(address, self.tls(party_id)) as channel:
            yield channel

    def config(self, party_id: str, role: str, directory: Path, **settings: Any) -> dict[str, Any]:
        """A server configuration for ``party_id``: its key, the registry, its TLS files.

        ``settings`` are further top-level keys (``peers``, ``custodian``...).
        """
        files = self.pki.party(party_id)
        document: dict[str, Any] = {
            "party_id": party_id,
            "role": role,
            "listen": "127.0.0.1:0",
            "storage": self.storage(directory, party_id),
            "signing_key": str(self.key_path(party_id)),
            "key_registry": str(self.registry_path),
            "tls": {"ca": str(self.pki.ca_cert), "cert": str(files.cert), "key": str(files.key)},
        }
        document.update(settings)
        return document

    def storage(self, directory: Path, party_id: str) -> dict[str, Any]:
        """The ``storage`` section of ``party_id``'s server in ``directory``: the same on restart."""
        if self.postgres is None:
            return {"path": str(directory / f"{party_id}.sqlite")}
        return self.postgres.storage_config(str(directory / party_id))


def serve_custodian_once(config_path: Path) -> subprocess.CompletedProcess[str]:
    """``collateral-sync serve custodian`` run to its end, as an operator would start it:
    for configurations it must refuse at start (one line on stderr, exit 2)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "collateral_sync._cli",
            "serve",
            "custodian",
            "--config",
            str(config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REFERENCE_PATH)},
    )


@pytest.fixture(scope="session")
def reference_parties(
    tmp_path_factory: pytest.TempPathFactory, server_postgres: PostgresServer | None
) -> Parties:
    directory = tmp_path_factory.mktemp("parties")
    # Through the CLI, as an operator would: `collateral-sync dev-certs`.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "collateral_sync._cli",
            "dev-certs",
            "--out",
            str(directory / "pki"),
            "--party",
            *_ROLES,
            STRANGER,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pki = DevPki(
        directory=directory / "pki",
        ca_cert=directory / "pki" / "ca.pem",
        ca_key=directory / "pki" / "ca.key",
        parties={
            party: PartyFiles(
                party, directory / "pki" / f"{party}.pem", directory / "pki" / f"{party}.key"
            )
            for party in (*_ROLES, STRANGER)
        },
    )
    assert all(files.cert.is_file() and files.key.is_file() for files in pki.parties.values())
    (directory / "keys").mkdir()
    keys = {}
    registry = KeyRegistry()
    for party_id, role in _ROLES.items():
        key = SigningKey.generate(party_id, role)
        key.save(directory / "keys" / f"{party_id}.key.json")
        registry.add(key.party_key(valid_from=KEYS_VALID_FROM))
        keys[party_id] = key
    registry_path = directory / "keys" / "registry.json"
    registry.save(registry_path)
    return Parties(
        directory=directory,
        pki=pki,
        keys=keys,
        registry_path=registry_path,
        postgres=server_postgres,
    )


@dataclass
class ServerProcess:
    """One reference server process; restartable on the same configuration and data."""

    role: str
    config_path: Path
    log_path: Path
    test_mode: bool = True
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    address: str = ""
    #: Whether the server waits on standby for its database's lease.
    standby: bool = False
    _buffer: bytes = field(default=b"", repr=False)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def start(self, *, standby: bool = False) -> str:
        """Start the server and return its address once it is serving.

        With ``standby``, a server that prints ``STANDBY host:port`` (another
        holds its database's lease) is started too: :attr:`standby` is then
        True, and :meth:`wait_active` waits for it to take over.
        """
        if self.process is not None:
            if self.process.poll() is None:
                raise RuntimeError("server already running")
            if self.process.stdout is not None:
                self.process.stdout.close()
        command = [
            sys.executable,
            "-m",
            "collateral_sync._cli",
            "serve",
            self.role,
            "--config",
            str(self.config_path),
            "--listen",
            "127.0.0.1:0",
            *(("--test-mode",) if self.test_mode else ()),
            *self.extra_args,
        ]
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(REFERENCE_PATH), *filter(None, [environment.get("PYTHONPATH")])]
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, env=environment
            )
        if standby:
            self._buffer = b""
            word, self.address = self._next_line(START_TIMEOUT)
            self.standby = word == "STANDBY"
            if word != "LISTENING" and not self.standby:
                self.kill()
                raise RuntimeError(f"unexpected first line {word!r}:\n{self.log_text()}")
            return self.address
        self.address = self._wait_listening()
        return self.address

    def _wait_listening(self) -> str:
        """The address of the ``LISTENING host:port`` line a just started server prints first."""
        self._buffer = b""
        self.standby = False
        word, address = self._next_line(START_TIMEOUT)
        if word != "LISTENING":
            self.kill()
            raise RuntimeError(f"unexpected first line {word!r}:\n{self.log_text()}")
        return address

    def wait_active(self, timeout: float = START_TIMEOUT) -> str:
        """A standby's ``LISTENING`` line, once it took the lease; its address."""
        assert self.standby, "not a standby"
        word, self.address = self._next_line(timeout)
        if word != "LISTENING":
            raise RuntimeError(f"unexpected line {word!r}:\n{self.log_text()}")
        self.standby = False
        return self.address

    def _next_line(self, timeout: float) -> tuple[str, str]:
        """The next ``WORD host:port`` line the server prints on stdout."""
        process = self.process
        assert process is not None
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.kill()
                    raise TimeoutError(f"no LISTENING line in {timeout}s:\n{self.log_text()}")
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    code = process.wait()
                    raise RuntimeError(
                        f"server exited with {code} before serving:\n{self.log_text()}"
                    )
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        word, address = line.decode().split(" ", 1)
        return word, address

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        process = self.process
        assert process is not None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> str:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self.kill()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """``start_server(role, config, *, name=None, test_mode=True, extra_args=(), standby=False)``."""
    started: list[ServerProcess] = []
    directory = tmp_path_factory.mktemp("servers")

    def start(
        role: str,
        config: dict[str, Any],
        *,
        name: str | None = None,
        test_mode: bool = True,
        extra_args: tuple[str, ...] = (),
        standby: bool = False,
    ) -> ServerProcess:
        name = name or str(config["party_id"])
        config_path = directory / f"{name}.json"
        config_path.write_text(json.dumps(config, indent=2))
        server = ServerProcess(
            role=role,
            config_path=config_path,
            log_path=directory / f"{name}.log",
            test_mode=test_mode,
            extra_args=extra_args,
        )
        started.append(server)
        server.start(standby=standby)
        return server

    yield start
    for server in started:
        server.close()
