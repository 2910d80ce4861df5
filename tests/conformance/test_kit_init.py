"""``conformance init``: what it writes runs the kit against the reference server, as written.

The reference custodian is started from the written ``server.json`` (paths relative to
DIR) in test mode, and the kit is run with exactly the options of the written
``run-kit.sh`` (only ``--target`` substituted: the server listens on a free port).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from collateral_sync.keys import KeyRegistry
from collateral_sync_conformance import main

from .conftest import ServerProcess
from .test_kit_counterpart import free_port


def _run_kit_argv(script: Path) -> list[str]:
    """The ``conformance run`` arguments of ``run-kit.sh``, ``"$@"`` left out."""
    text = script.read_text("utf-8").replace("\\\n", " ")
    (command,) = [line for line in text.splitlines() if line.startswith("exec ")]
    words = shlex.split(command)
    assert words[:4] == ["exec", "collateral-sync", "conformance", "run"]
    assert words[-1] == "$@"
    return words[3:-1]


def _with_target(argv: list[str], target: str) -> list[str]:
    index = argv.index("--target")
    return [*argv[: index + 1], target, *argv[index + 2 :]]


def _free_base_port() -> int:
    """The first of six consecutive ports that are free now (init's --base-port)."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + 6):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise AssertionError("no six consecutive free ports found")


def _must_not_passed(directory: Path) -> list[tuple[str, str, str]]:
    cases = _results(directory / "report")["cases"]
    return [
        (c["id"], c["verdict"], c["message"])
        for c in cases
        if c["level"] == "MUST" and c["verdict"] != "passed"
    ]


def _results(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / "results.json").read_text("utf-8"))
    return document


def _passes_as_written(
    role: str,
    directory: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The reference ``role`` from the written config, and the kit as run-kit.sh runs it, pass.

    The config is used as it is (its relative paths resolve against its directory); only
    the address is the test's: --listen 127.0.0.1:0 on the server's command line.
    """
    server = ServerProcess(
        role=role, config_path=directory / "server.json", log_path=tmp_path / f"{role}.log"
    )
    try:
        address = server.start()
        monkeypatch.chdir(directory)  # as run-kit.sh does
        argv = _with_target(_run_kit_argv(directory / "run-kit.sh"), address)
        code = main([*argv, "--no-colour"])
    finally:
        server.close()
    out = capsys.readouterr().out
    not_passed = _must_not_passed(directory)
    assert not not_passed, f"{not_passed}\n{out[-3000:]}\n{server.log_text()[-3000:]}"
    assert code == 0, out[-3000:]


def test_init_refuses_a_non_empty_directory_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "something").write_text("x")
    assert main(["init", "--role", "custodian", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "not empty" in err
    assert "--force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something"]
    assert main(["init", "--role", "custodian", "--force", str(tmp_path)]) == 0
    assert (tmp_path / "run-kit.sh").is_file()


@pytest.mark.parametrize("role", ["custodian", "exchange", "regulator"])
def test_init_writes_keys_registry_config_script_and_readme(
    role: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "kit"
    assert main(["init", "--role", role, str(directory)]) == 0
    assert "run-kit.sh" in capsys.readouterr().out
    script = directory / "run-kit.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    argv = _run_kit_argv(script)
    assert argv[:3] == ["run", "--role", role]
    assert argv[argv.index("--wait") + 1] == "30"
    assert argv[argv.index("--report-dir") + 1] == "report"
    assert argv.count("--identity") >= 1
    # Every file the kit and the server are pointed at exists, relative to DIR.
    config = json.loads((directory / "server.json").read_text("utf-8"))
    files = [config["signing_key"], config["key_registry"], *config["tls"].values()]
    files += [w for w in argv if w.startswith(("pki/", "keys/"))]
    assert all((directory / f).is_file() for f in files), files
    # The registry holds the server's own key (the integrator replaces it) and no stranger.
    parties = {k.party_id for k in KeyRegistry.load(directory / "keys" / "registry.json")}
    assert config["party_id"] in parties
    assert "stranger-1" not in parties
    # The kit's --listen addresses are where the server dials, and not where it listens.
    listens = [argv[i + 1] for i, w in enumerate(argv) if w in ("--listen", "--listen-exchange")]
    assert sorted(listens) == sorted(a for a in config.get("peers", {}).values() if a)
    assert config["listen"] not in listens
    assert config["listen"] == argv[argv.index("--target") + 1]
    readme = (directory / "README.txt").read_text("utf-8")
    assert f"collateral-sync serve {role} --config {directory}/server.json --test-mode" in readme
    assert f"{directory}/run-kit.sh" in readme


def test_the_kit_as_init_writes_it_passes_the_reference_custodian(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "kit"
    assert main(["init", "--role", "custodian", str(directory)]) == 0
    _passes_as_written("custodian", directory, tmp_path, monkeypatch, capsys)
    assert os.path.isdir(directory / "state")  # the server's database went where README says


def test_the_kit_as_init_writes_it_passes_the_reference_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "kit"
    assert main(["init", "--role", "exchange", str(directory)]) == 0
    argv = _run_kit_argv(directory / "run-kit.sh")
    # The kit's custodian on a free port rather than the fixed one (tests may run side by
    # side): the server's custodian peer and the kit's --listen move together.
    config = json.loads((directory / "server.json").read_text("utf-8"))
    written_listen = argv[argv.index("--listen") + 1]
    assert config["peers"]["custodian-1"] == written_listen
    listen = f"127.0.0.1:{free_port()}"
    config["peers"]["custodian-1"] = listen
    (directory / "server-test.json").write_text(json.dumps(config), "utf-8")
    server = ServerProcess(
        role="exchange",
        config_path=directory / "server-test.json",
        log_path=tmp_path / "exchange.log",
    )
    try:
        address = server.start()
        monkeypatch.chdir(directory)  # as run-kit.sh does
        argv = _with_target(argv, address)
        argv[argv.index("--listen") + 1] = listen
        code = main([*argv, "--no-colour"])
    finally:
        server.close()
    out = capsys.readouterr().out
    not_passed = _must_not_passed(directory)
    assert not not_passed, f"{not_passed}\n{out[-3000:]}\n{server.log_text()[-3000:]}"
    assert code == 0, out[-3000:]


def test_base_port_moves_every_address_init_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    addresses: dict[str, list[str]] = {}
    for role in ("custodian", "exchange", "regulator"):
        directory = tmp_path / role
        assert main(["init", "--role", role, "--base-port", "30100", str(directory)]) == 0
        argv = _run_kit_argv(directory / "run-kit.sh")
        config = json.loads((directory / "server.json").read_text("utf-8"))
        listens = [
            argv[i + 1] for i, w in enumerate(argv) if w in ("--listen", "--listen-exchange")
        ]
        addresses[role] = [config["listen"], *listens]
        assert argv[argv.index("--target") + 1] == config["listen"]
        readme = (directory / "README.txt").read_text("utf-8")
        assert all(address in readme for address in addresses[role]), readme
    everything = [a for role in addresses.values() for a in role]
    # Six distinct ports, base to base + 5, across the three roles.
    assert sorted(everything) == [f"127.0.0.1:{p}" for p in range(30100, 30106)]
    capsys.readouterr()


@pytest.mark.parametrize("base", ["0", "65531", "port"])
def test_a_base_port_out_of_range_is_a_usage_error(
    base: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["init", "--role", "custodian", "--base-port", base, str(tmp_path / "kit")])
    assert code == 2
    err = capsys.readouterr().err
    assert "base port" in err or "--base-port" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "kit").exists()


def test_the_kit_as_init_writes_it_passes_the_reference_regulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Free ports as init writes them: the regulator dials the kit's two listeners.
    directory = tmp_path / "kit"
    assert (
        main(["init", "--role", "regulator", "--base-port", str(_free_base_port()), str(directory)])
        == 0
    )
    _passes_as_written("regulator", directory, tmp_path, monkeypatch, capsys)
    regulator_cases = [
        c for c in _results(directory / "report")["cases"] if c["id"].startswith("regulator/")
    ]
    assert sum(c["verdict"] == "passed" for c in regulator_cases) >= 9
