"""The kit's command line: listing, usage errors (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from _certificates import issue
from collateral_sync import _cli as sdk_cli
from collateral_sync.dev_ca import DevPki
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.v1 import common_pb2
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Role


def _stderr_is_one_line(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_list_prints_every_case_with_level_and_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    cases = list(REGISTRY)
    assert len(out) == len(cases) + 1
    for line, case in zip(out, cases, strict=False):
        assert line.split()[:2] == [case.id, case.level.value]
        assert line.endswith(case.description)
    assert out[-1] == f"{len(cases)} cases ({sum(c.level.value == 'MUST' for c in cases)} MUST)"


def test_list_filters_by_role_and_glob_and_speaks_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list", "--role", "regulator", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed
    assert all("regulator" in c["roles"] for c in listed)
    assert not any(c["id"].startswith("attestation/") for c in listed)
    assert {"id", "level", "roles", "clauses", "description"} == set(listed[0])
    assert all(isinstance(c["clauses"], list) for c in listed)

    known = "envelope/pledge-collateral/invalid-amount-refused"
    assert main(["list", "--run", known, "--json"]) == 0
    [case] = json.loads(capsys.readouterr().out)
    assert case["id"] == known
    assert "§2.1/refuse-non-canonical-amount" in case["clauses"]

    assert main(["list", "--run", "envelope/*/forged-*", "--json"]) == 0
    ids = [c["id"] for c in json.loads(capsys.readouterr().out)]
    assert ids == [
        "envelope/pledge-collateral/forged-signature-refused",
        "envelope/request-redemption/forged-signature-refused",
        "envelope/submit-liquidation-instruction/forged-signature-refused",
        "envelope/respond-to-margin-call/forged-signature-refused",
    ]
    assert main(["list", "--run", "envelope/**", "--skip", "envelope/pledge-collateral/**"]) == 0
    out = capsys.readouterr().out
    assert "submit-liquidation-instruction" in out
    assert "respond-to-margin-call" in out
    assert "pledge-collateral" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "--run", "nothing/**"], "--run 'nothing/**' matches no case"),
        (["list", "--skip", "Bad Glob"], "--skip: glob"),
    ],
)
def test_list_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    _stderr_is_one_line(err)
    assert message in err


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--role", "custodian"]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["list", "--role", "broker"]) == 2
    assert main([]) == 2


def _run_argv(files: dict[str, Path], target: str, **override: str) -> list[str]:
    options = {
        "--role": "custodian",
        "--target": target,
        "--ca": str(files["ca"]),
        "--cert": str(files["cert"]),
        "--key": str(files["key"]),
        "--registry": str(files["registry"]),
        "--kit-key": str(files["client_key"]),
        "--rpc-timeout": "3",
    }
    options.update(override)
    return ["run", *[item for pair in options.items() for item in pair]]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"--ca": "/nonexistent/ca.pem"}, "No such file"),
        ({"--registry": "/nonexistent/registry.json"}, "No such file"),
        ({"--kit-key": "/nonexistent/client.key.json"}, "No such file"),
        ({"--key": "CA_KEY"}, "expected the private key of the leaf certificate"),
        ({"--registry": "NOT_JSON"}, "key registry file"),
        ({"--timeout": "0"}, "expected seconds > 0"),
        ({"--run": "Bad Glob"}, "--run: glob"),
    ],
)
def test_run_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    kit_files: dict[str, Path],
    tmp_path: Path,
    override: dict[str, str],
    message: str,
) -> None:
    not_json = tmp_path / "registry.json"
    not_json.write_text("{not json", encoding="utf-8")
    for name, value in list(override.items()):
        if value == "CA_KEY":
            override[name] = str(Path(kit_files["ca"]).with_name("ca.key"))
        elif value == "NOT_JSON":
            override[name] = str(not_json)
    argv = _run_argv(kit_files, f"127.0.0.1:{_closed_port()}", **override)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    if "expected seconds" not in message:  # argparse prints its usage line too
        _stderr_is_one_line(err)


def test_run_refuses_an_expired_kit_certificate_before_dialling(
    capsys: pytest.CaptureFixture[str], kit_files: dict[str, Path], tmp_path: Path
) -> None:
    # The kit's party from the kit's CA, valid until yesterday.
    ca = Path(kit_files["ca"])
    pki = DevPki(directory=ca.parent, ca_cert=ca, ca_key=ca.with_name("ca.key"), parties={})
    now = datetime.now(UTC)
    party = "exchange-1"
    expired = issue(
        pki, party, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    cert, key = tmp_path / "expired.pem", tmp_path / "expired.key"
    cert.write_bytes(expired.cert)
    key.write_bytes(expired.key)
    argv = _run_argv(
        kit_files, f"127.0.0.1:{_closed_port()}", **{"--cert": str(cert), "--key": str(key)}
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    _stderr_is_one_line(err)
    assert f"--cert: client certificate {cert} (CN={party}) expired at" in err


def test_run_refuses_an_unreachable_target(
    capsys: pytest.CaptureFixture[str], kit_files: dict[str, Path]
) -> None:
    assert main(_run_argv(kit_files, f"127.0.0.1:{_closed_port()}")) == 2
    err = capsys.readouterr().err
    _stderr_is_one_line(err)
    assert "cannot reach" in err


def test_run_needs_server_party_when_the_registry_has_several(
    capsys: pytest.CaptureFixture[str], kit_files: dict[str, Path], tmp_path: Path
) -> None:
    registry = KeyRegistry.load(kit_files["registry"])
    registry.add(
        SigningKey.generate("custodian-9", common_pb2.PARTY_ROLE_CUSTODIAN).party_key(
            valid_from=datetime(2020, 1, 1, tzinfo=UTC)
        )
    )
    path = tmp_path / "registry.json"
    registry.save(path)
    argv = _run_argv(kit_files, f"127.0.0.1:{_closed_port()}", **{"--registry": str(path)})
    assert main(argv) == 2
    err = capsys.readouterr().err
    _stderr_is_one_line(err)
    assert "--server-party is needed" in err
    assert "custodian-1, custodian-9" in err


def test_the_sdk_cli_hands_conformance_to_the_kit(capsys: pytest.CaptureFixture[str]) -> None:
    assert sdk_cli.main(["conformance", "list", "--role", "exchange", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in listed] == [c.id for c in REGISTRY.for_role(Role.EXCHANGE)]
    assert sdk_cli.main(["conformance", "--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert sdk_cli.main(["conformance", "list", "--run", "nothing/**"]) == 2


def test_dash_dash_list_is_the_list_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--role", "regulator", "--skip", "emergency/**"]) == 0
    listed = capsys.readouterr().out
    assert main(["--list", "--role", "regulator", "--skip", "emergency/**"]) == 0
    assert capsys.readouterr().out == listed
    assert "regulator/breaks-located" in listed
    assert "emergency/" not in listed


def test_run_with_list_lists_what_the_run_would_choose_without_a_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["run", "--role", "exchange", "--target", "127.0.0.1:9", "--ca", "no-such.pem"]
    argv += ["--cert", "c.pem", "--key", "k.pem", "--registry", "r.json", "--kit-key", "x.json"]
    argv += ["--listen", "127.0.0.1:9", "--run", "sync/**", "--no-colour", "--list"]
    assert main(argv) == 0  # no file is read and nothing is dialled
    lines = capsys.readouterr().out.splitlines()
    chosen = [c.id for c in REGISTRY.for_role(Role.EXCHANGE) if c.id.startswith("sync/")]
    assert [line.split()[0] for line in lines[:-1]] == chosen
    assert lines[-1].startswith(f"{len(chosen)} cases")


def test_options_are_never_abbreviated(capsys: pytest.CaptureFixture[str]) -> None:
    # '--lis' could be --list or --listen: no prefix is ever taken for an option.
    assert main(["list", "--rol", "exchange"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --rol exchange" in err
    assert "Traceback" not in err
