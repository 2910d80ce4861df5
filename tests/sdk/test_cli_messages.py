"""Every bad invocation of ``collateral-sync`` is one line naming the thing at fault.

Table-driven: each row runs the real command (``python -m collateral_sync._cli``)
as a process and checks its exit code, that stderr is exactly one line — no
traceback, no gRPC core log line (``E1207 05:35:54.949692 8632 add_port.cc:83]
...``) — and that the line names the offending option, file or config key and,
where there is one, the fix.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _postgres import PostgresServer
from collateral_sync.dev_ca import DevPki, create_dev_pki
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.v1 import common_pb2

ROOT = Path(__file__).resolve().parents[2]
CORE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"


@dataclass
class World:
    """Files the bad invocations point at: a PKI, keys, configs, a busy port."""

    directory: Path
    pki: DevPki
    expired: DevPki
    future: DevPki
    registry: Path
    busy_port: int
    postgres: PostgresServer

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def config(self, name: str, **changes: Any) -> str:
        """A custodian configuration with ``changes`` (``tls__cert`` sets tls.cert; None deletes)."""
        files = self.pki.party(CUSTODIAN)
        document: dict[str, Any] = {
            "party_id": CUSTODIAN,
            "role": "custodian",
            "listen": "127.0.0.1:0",
            "storage": {"path": f"{name}.sqlite"},
            "signing_key": f"keys/{CUSTODIAN}.key.json",
            "key_registry": "keys/registry.json",
            "tls": {"ca": str(self.pki.ca_cert), "cert": str(files.cert), "key": str(files.key)},
        }
        for key, value in changes.items():
            *parents, leaf = key.split("__")
            target = document
            for parent in parents:
                target = target[parent]
            if value is None:
                del target[leaf]
            else:
                target[leaf] = value
        path = self.directory / f"{name}.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("cli-messages")
    now = datetime.now(UTC)
    pki = create_dev_pki(directory / "pki", parties=[CUSTODIAN, EXCHANGE])
    expired = create_dev_pki(
        directory / "expired", parties=[CUSTODIAN], valid_days=1, now=now - timedelta(days=10)
    )
    future = create_dev_pki(
        directory / "future", parties=[CUSTODIAN], valid_days=30, now=now + timedelta(days=2)
    )
    (directory / "keys").mkdir()
    registry = KeyRegistry()
    for party, role in (
        (CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN),
        (EXCHANGE, common_pb2.PARTY_ROLE_EXCHANGE),
    ):
        key = SigningKey.generate(party, role)
        key.save(directory / "keys" / f"{party}.key.json")
        if party == EXCHANGE:
            only = KeyRegistry()
            only.add(key.party_key(valid_from=now))
            only.save(directory / "exchange-only.json")
        registry.add(key.party_key(valid_from=now - timedelta(days=1)))
    registry.save(directory / "keys" / "registry.json")
    (directory / "a-file.txt").write_text("not a directory\n", encoding="utf-8")
    (directory / "a-dir").mkdir()
    (directory / "not-json.json").write_text("{not json", encoding="utf-8")
    (directory / "empty.pb").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield World(
            directory=directory,
            pki=pki,
            expired=expired,
            future=future,
            registry=directory / "keys" / "registry.json",
            busy_port=busy.getsockname()[1],
            postgres=_prepared_postgres(postgres, directory),
        )


#: A login of the session's PostgreSQL with no right to create tables, and its password.
_NO_RIGHTS = ("no_rights", "no-rights-password")


def _prepared_postgres(postgres: PostgresServer, directory: Path) -> PostgresServer:
    """The session's PostgreSQL with the databases and logins the rows below point at."""
    (directory / "pg-password").write_text(postgres.password + "\n", encoding="utf-8")
    (directory / "pg-wrong-password").write_text("not-the-password\n", encoding="utf-8")
    (directory / "pg-no-rights-password").write_text(_NO_RIGHTS[1] + "\n", encoding="utf-8")
    postgres.database("cli-empty")
    newer = postgres.database("cli-newer")
    with postgres.connect() as admin:
        if (
            admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (_NO_RIGHTS[0],)).fetchone()
            is None
        ):
            admin.execute(f"CREATE ROLE {_NO_RIGHTS[0]} LOGIN PASSWORD '{_NO_RIGHTS[1]}'")
    with postgres.connect(newer) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions "
            "(component TEXT PRIMARY KEY, version BIGINT NOT NULL)"
        )
        db.execute("INSERT INTO schema_versions VALUES ('storage', 99) ON CONFLICT DO NOTHING")
    return postgres


def _postgres_storage(w: World, database: str, **settings: Any) -> dict[str, Any]:
    """A ``storage`` section on the session's PostgreSQL (``password_file`` by default)."""
    section: dict[str, Any] = {
        "engine": "postgresql",
        "dsn": w.postgres.conninfo(w.postgres.database(database), with_password=False),
        "password_file": w.path("pg-password"),
    }
    section.update(settings)
    return {k: v for k, v in section.items() if v is not None}


@dataclass(frozen=True)
class Row:
    """One bad invocation: its arguments, exit code and what its line must name."""

    name: str
    argv: Callable[[World], list[str]]
    names: Callable[[World], list[str]]
    code: int = 2


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(config: str, *extra: str) -> list[str]:
    return ["serve", "custodian", "--config", config, *extra]


def _keygen(w: World, *extra: str) -> list[str]:
    return ["keygen", "--party", "p-1", "--role", "client", "--out", w.path("new-keys"), *extra]


def _kit_run(w: World, **files: str) -> list[str]:
    """``conformance run`` against a custodian nobody serves; ``files`` replace the defaults."""
    options = {
        "ca": str(w.pki.ca_cert),
        "cert": str(w.pki.party(EXCHANGE).cert),
        "key": str(w.pki.party(EXCHANGE).key),
        "registry": str(w.registry),
        "kit_key": w.path(f"keys/{EXCHANGE}.key.json"),
        **files,
    }
    argv = ["conformance", "run", "--role", "custodian", "--target", "127.0.0.1:9"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", value]
    return argv


ROWS = [
    # PostgreSQL storage: bad configuration fails at start, in one line
    Row(
        "serve with a password in the dsn",
        lambda w: _serve(
            w.config(
                "pg-dsn-password",
                storage={"engine": "postgresql", "dsn": "host=127.0.0.1 dbname=x password=secret"},
            )
        ),
        lambda w: ["storage.dsn", "without a password", "password_env or password_file"],
    ),
    Row(
        "serve with password_env naming an unset variable",
        lambda w: _serve(
            w.config(
                "pg-env",
                storage=_postgres_storage(
                    w, "cli-empty", password_file=None, password_env="COLLATERAL_SYNC_UNSET_VAR"
                ),
            )
        ),
        lambda w: ["storage.password_env", "COLLATERAL_SYNC_UNSET_VAR"],
    ),
    Row(
        "serve with an unreachable database",
        lambda w: _serve(
            w.config(
                "pg-unreachable",
                storage={
                    "engine": "postgresql",
                    "dsn": f"host=127.0.0.1 port={_closed_port()} dbname=x user=x",
                },
            )
        ),
        lambda w: ["storage.dsn", "cannot use the database", "Connection refused"],
    ),
    Row(
        "serve with a wrong database password",
        lambda w: _serve(
            w.config(
                "pg-wrong",
                storage=_postgres_storage(
                    w, "cli-empty", password_file=w.path("pg-wrong-password")
                ),
            )
        ),
        lambda w: ["storage.dsn", "password authentication failed"],
    ),
    Row(
        "serve with a login that may not create tables",
        lambda w: _serve(
            w.config(
                "pg-no-rights",
                storage={
                    "engine": "postgresql",
                    "dsn": w.postgres.conninfo(
                        w.postgres.database("cli-empty"), with_password=False
                    ).replace("user=collateral", f"user={_NO_RIGHTS[0]}"),
                    "password_file": w.path("pg-no-rights-password"),
                },
            )
        ),
        lambda w: ["storage.dsn", "permission denied"],
    ),
    Row(
        "serve on a database a newer server wrote",
        lambda w: _serve(w.config("pg-newer", storage=_postgres_storage(w, "cli-newer"))),
        lambda w: ["storage schema is version 99", "newer than this server knows"],
    ),
    # dev-certs
    Row(
        "dev-certs into a folder that holds a PKI",
        lambda w: ["dev-certs", "--out", str(w.pki.directory), "--party", CUSTODIAN],
        lambda w: [f"--out {w.pki.directory} already holds ca.pem", "pass --force"],
    ),
    Row(
        "dev-certs --out naming a file",
        lambda w: ["dev-certs", "--out", w.path("a-file.txt"), "--party", "p-1"],
        lambda w: [f"--out {w.path('a-file.txt')} is a file", "--out wants a directory"],
    ),
    Row(
        "dev-certs --valid-days 0",
        lambda w: ["dev-certs", "--out", w.path("new-pki"), "--party", "p-1", "--valid-days", "0"],
        lambda w: ["--valid-days", ">= 1", "got '0'"],
    ),
    Row(
        "dev-certs --party ca",
        lambda w: ["dev-certs", "--out", w.path("new-pki"), "--party", "ca"],
        lambda w: ["--party", "got 'ca'"],
    ),
    Row(
        "dev-certs --host with a space",
        lambda w: ["dev-certs", "--out", w.path("new-pki"), "--party", "p-1", "--host", "a b"],
        lambda w: ["--host", "'a b'"],
    ),
    # keygen
    Row(
        "keygen --out naming a file",
        lambda w: ["keygen", "--party", "p-1", "--role", "client", "--out", w.path("a-file.txt")],
        lambda w: [f"--out {w.path('a-file.txt')} is a file", "--out wants a directory"],
    ),
    Row(
        "keygen --registry naming a directory",
        lambda w: _keygen(w, "--registry", w.path("a-dir")),
        lambda w: [f"--registry {w.path('a-dir')} is a directory", "key registry JSON file"],
    ),
    Row(
        "keygen --registry that is not JSON",
        lambda w: _keygen(w, "--registry", w.path("not-json.json")),
        lambda w: ["--registry", w.path("not-json.json"), "JSON"],
    ),
    Row(
        "keygen over an existing key",
        lambda w: ["keygen", "--party", CUSTODIAN, "--role", "custodian", "--out", w.path("keys")],
        lambda w: [f"{CUSTODIAN}.key.json exists", "pass --force"],
    ),
    Row(
        "keygen --party with a slash",
        lambda w: ["keygen", "--party", "../p-1", "--role", "client", "--out", w.path("new-keys")],
        lambda w: ["--party '../p-1'", "'/'"],
    ),
    Row(
        "keygen --valid-from without a zone",
        lambda w: _keygen(w, "--valid-from", "2026-01-01T00:00:00"),
        lambda w: ["--valid-from", "zone"],
    ),
    Row(
        "keygen --role unknown",
        lambda w: ["keygen", "--party", "p-1", "--role", "banker"],
        lambda w: ["--role", "'banker'", "choose from"],
    ),
    # verify
    Row(
        "verify a directory",
        lambda w: ["verify", w.path("a-dir")],
        lambda w: [f"{w.path('a-dir')}: is a directory", "verify expects", "AuditBundle"],
    ),
    Row(
        "verify /dev/null",
        lambda w: ["verify", os.devnull],
        lambda w: [f"{os.devnull}: is a character device", "verify expects", "AuditBundle"],
    ),
    Row(
        "verify a missing file",
        lambda w: ["verify", w.path("absent.json")],
        lambda w: [f"{w.path('absent.json')}: no such file", "verify expects"],
    ),
    Row(
        "verify a file that is not JSON",
        lambda w: ["verify", w.path("not-json.json")],
        lambda w: [w.path("not-json.json"), "not an AuditBundle"],
    ),
    Row(
        "verify an empty bundle",
        lambda w: ["verify", w.path("empty.pb")],
        lambda w: [w.path("empty.pb"), "verifier_party_id"],
    ),
    # the command line itself
    Row("no command", lambda w: [], lambda w: ["required: command", "--help"]),
    Row("an unknown command", lambda w: ["mint"], lambda w: ["invalid choice: 'mint'"]),
    Row(
        "bench --scale 0",
        lambda w: ["bench", "sdk", "--scale", "0"],
        lambda w: ["--scale", "got '0'"],
    ),
    # serve: arguments and the config file
    Row(
        "serve an unknown role",
        lambda w: ["serve", "broker", "--config", w.path("any.json")],
        lambda w: ["role", "invalid choice: 'broker'"],
    ),
    Row(
        "serve --listen without a port",
        lambda w: _serve(w.config("listen-ok"), "--listen", "localhost"),
        lambda w: ["--listen", "'localhost'"],
    ),
    Row(
        "serve a missing config",
        lambda w: _serve(w.path("absent.json")),
        lambda w: [w.path("absent.json"), "no such file"],
    ),
    Row(
        "serve a directory as config",
        lambda w: _serve(w.path("a-dir")),
        lambda w: [w.path("a-dir"), "is a directory", "--config"],
    ),
    Row(
        "serve a config that is not JSON",
        lambda w: _serve(w.path("not-json.json")),
        lambda w: [w.path("not-json.json"), "not JSON", "line 1"],
    ),
    Row(
        "serve a config of another role",
        lambda w: ["serve", "exchange", "--config", w.config("role-custodian")],
        lambda w: ["role", "'exchange'", "'custodian'"],
    ),
    Row(
        "serve a config with an unknown key",
        lambda w: _serve(w.config("typo", listne="127.0.0.1:0")),
        lambda w: ["listne", "unknown key"],
    ),
    # serve: the files the config names
    Row(
        "serve with a missing tls.cert",
        lambda w: _serve(w.config("no-cert", tls__cert="pki/absent.pem")),
        lambda w: ["tls.cert", w.path("pki/absent.pem"), "no such file"],
    ),
    Row(
        "serve with a missing tls.ca",
        lambda w: _serve(w.config("no-ca", tls__ca="absent-ca.pem")),
        lambda w: ["tls.ca", w.path("absent-ca.pem"), "no such file"],
    ),
    Row(
        "serve with a directory as tls.key",
        lambda w: _serve(w.config("key-dir", tls__key="a-dir")),
        lambda w: ["tls.key", w.path("a-dir"), "is a directory"],
    ),
    Row(
        "serve with a tls.key of another certificate",
        lambda w: _serve(w.config("other-key", tls__key=str(w.pki.party(EXCHANGE).key))),
        lambda w: ["tls.key", str(w.pki.party(EXCHANGE).key), "not the private key of tls.cert"],
    ),
    Row(
        "serve with a key as tls.cert",
        lambda w: _serve(w.config("cert-key", tls__cert=str(w.pki.party(CUSTODIAN).key))),
        lambda w: ["tls.cert", str(w.pki.party(CUSTODIAN).key), "PEM certificates"],
    ),
    Row(
        "serve with another party's certificate",
        lambda w: _serve(
            w.config(
                "other-cert",
                tls__cert=str(w.pki.party(EXCHANGE).cert),
                tls__key=str(w.pki.party(EXCHANGE).key),
            )
        ),
        lambda w: ["tls.cert", f"CN '{EXCHANGE}'", f"'{CUSTODIAN}'"],
    ),
    Row(
        "serve with a missing signing_key",
        lambda w: _serve(w.config("no-key", signing_key="keys/absent.key.json")),
        lambda w: ["signing_key", w.path("keys/absent.key.json"), "no such file"],
    ),
    Row(
        "serve with the signing key of another role",
        lambda w: _serve(w.config("wrong-key", signing_key=f"keys/{EXCHANGE}.key.json")),
        lambda w: ["signing_key", f"{CUSTODIAN}/PARTY_ROLE_CUSTODIAN", f"{EXCHANGE}/"],
    ),
    Row(
        "serve with a PEM file as signing_key",
        lambda w: _serve(w.config("pem-key", signing_key=str(w.pki.ca_cert))),
        lambda w: ["signing_key", str(w.pki.ca_cert), "not JSON"],
    ),
    Row(
        "serve with a missing key_registry",
        lambda w: _serve(w.config("no-registry", key_registry="keys/absent.json")),
        lambda w: ["key_registry", w.path("keys/absent.json"), "no such file"],
    ),
    Row(
        "serve with a key_registry that is not JSON",
        lambda w: _serve(w.config("bad-registry", key_registry="not-json.json")),
        lambda w: ["key_registry", w.path("not-json.json"), "JSON"],
    ),
    Row(
        "serve with a key_registry without the server's key",
        lambda w: _serve(w.config("foreign-registry", key_registry="exchange-only.json")),
        lambda w: ["key_registry", w.path("exchange-only.json"), "does not hold"],
    ),
    Row(
        "serve with a directory as storage.path",
        lambda w: _serve(w.config("storage-dir", storage={"path": "a-dir"})),
        lambda w: ["storage.path", w.path("a-dir"), "is a directory"],
    ),
    Row(
        "serve with storage.path under a file",
        lambda w: _serve(w.config("storage-under-file", storage={"path": "a-file.txt/db.sqlite"})),
        lambda w: ["storage.path", w.path("a-file.txt/db.sqlite"), "cannot open"],
    ),
    Row(
        "serve without tls",
        lambda w: _serve(w.config("no-tls", tls=None)),
        lambda w: ["tls is required", "--plaintext-for-testing"],
    ),
    # serve: refusing to start
    Row(
        "serve on a port in use",
        lambda w: _serve(w.config("busy"), "--listen", f"127.0.0.1:{w.busy_port}"),
        lambda w: [f"127.0.0.1:{w.busy_port}", "already in use", "another port"],
    ),
    Row(
        "serve on an address of another machine",
        lambda w: _serve(w.config("elsewhere"), "--listen", "192.0.2.1:7441"),
        lambda w: ["192.0.2.1:7441", "not an address of this machine"],
    ),
    Row(
        "serve with an expired certificate",
        lambda w: _serve(
            w.config(
                "expired",
                tls__ca=str(w.expired.ca_cert),
                tls__cert=str(w.expired.party(CUSTODIAN).cert),
                tls__key=str(w.expired.party(CUSTODIAN).key),
            )
        ),
        lambda w: ["tls.cert", str(w.expired.party(CUSTODIAN).cert), "expired at", "notAfter"],
    ),
    Row(
        "serve with a certificate not valid yet",
        lambda w: _serve(
            w.config(
                "future",
                tls__ca=str(w.future.ca_cert),
                tls__cert=str(w.future.party(CUSTODIAN).cert),
                tls__key=str(w.future.party(CUSTODIAN).key),
            )
        ),
        lambda w: ["tls.cert", str(w.future.party(CUSTODIAN).cert), "notBefore"],
    ),
    Row(
        "serve with an expired CA",
        lambda w: _serve(w.config("expired-ca", tls__ca=str(w.expired.ca_cert))),
        lambda w: ["tls.ca", str(w.expired.ca_cert), "expired at"],
    ),
    # the conformance kit through the SDK's command line
    Row(
        "conformance run with a missing --ca",
        lambda w: _kit_run(w, ca=w.path("absent-ca.pem")),
        lambda w: [f"--ca {w.path('absent-ca.pem')}", "No such file"],
    ),
    Row(
        "conformance run with a directory as --kit-key",
        lambda w: _kit_run(w, kit_key=w.path("a-dir")),
        lambda w: [f"--kit-key {w.path('a-dir')} is a directory"],
    ),
    Row(
        "conformance run with a --key of another certificate",
        lambda w: _kit_run(w, key=str(w.pki.party(CUSTODIAN).key)),
        lambda w: [f"--key {w.pki.party(CUSTODIAN).key}", "private key", "--cert"],
    ),
    Row(
        "conformance run --wait -1",
        lambda w: ["conformance", "run", "--wait", "-1"],
        lambda w: ["--wait", "got '-1'"],
    ),
]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [
            str(ROOT / "reference_server"),
            str(ROOT / "conformance"),
            *filter(None, [environment.get("PYTHONPATH")]),
        ]
    )
    return subprocess.run(
        [sys.executable, "-m", "collateral_sync._cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=environment,
    )


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_a_bad_invocation_is_one_line_naming_the_thing(world: World, row: Row) -> None:
    result = _run(row.argv(world), world.directory)
    assert result.returncode == row.code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if CORE_LOG.match(line)], result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in row.names(world):
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_a_refused_keygen_writes_nothing(world: World) -> None:
    out = world.directory / "refused-keys"
    argv = ["keygen", "--party", "p-1", "--role", "client", "--out", str(out)]
    result = _run([*argv, "--registry", str(world.directory / "not-json.json")], world.directory)
    assert result.returncode == 2, result.stderr
    assert not out.exists()


def test_a_refused_dev_certs_changes_nothing(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path / "pki", parties=[CUSTODIAN])
    before = {path: path.read_bytes() for path in pki.files()}
    argv = ["dev-certs", "--out", str(pki.directory), "--party", CUSTODIAN, EXCHANGE]
    result = _run(argv, tmp_path)
    assert result.returncode == 2, result.stderr
    assert {path: path.read_bytes() for path in pki.files()} == before
    assert not (pki.directory / f"{EXCHANGE}.pem").exists()
    # --force is the fix the message names, and it works.
    result = _run([*argv, "--force"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert pki.ca_cert.read_bytes() != before[pki.ca_cert]
