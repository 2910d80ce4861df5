"""A server whose signing key is on a PKCS#11 token: it starts, or it says in one line why not.

Each refusal runs ``collateral-sync serve custodian`` as a process on a
configuration naming a key on the session's SoftHSM2 token, and checks exit
code 2, one line naming ``signing_key.pkcs11`` (or the registry) and the
fault, and that nothing was opened. The full sync and liquidation with the
custodian's key on the token is
``tests/reference/exchange/test_exchange.py::test_lifecycle_with_the_reference_custodian``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _softhsm import SoftHsmToken

from .._token_keys import PIN_ENV, TokenKey, token_key
from ..conftest import CUSTODIAN, EXCHANGE, REFERENCE_PATH, Parties, StartServer

Change = Callable[[dict[str, Any], TokenKey, Parties, SoftHsmToken, Path], object]


@pytest.fixture
def custodian_token_key(
    softhsm_token: SoftHsmToken, reference_parties: Parties, tmp_path: Path
) -> TokenKey:
    return token_key(softhsm_token, reference_parties, CUSTODIAN, "custodian", tmp_path)


def _config(parties: Parties, key: TokenKey, directory: Path) -> dict[str, Any]:
    return parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        signing_key=json.loads(json.dumps(key.signing_key)),
        key_registry=str(key.registry_path),
    )


def _pkcs11(config: dict[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = config["signing_key"]["pkcs11"]
    return section


def _registered_for_the_exchange(
    config: dict[str, Any], _key: TokenKey, parties: Parties, hsm: SoftHsmToken, directory: Path
) -> None:
    (directory / "exchange-key").mkdir()
    other = token_key(hsm, parties, EXCHANGE, "exchange", directory / "exchange-key")
    config["signing_key"] = other.signing_key
    config["key_registry"] = str(other.registry_path)


def _pin_file(directory: Path, text: str) -> str:
    path = directory / "pin.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("change", "environment", "words"),
    [
        pytest.param(
            lambda c, *_: None,
            {PIN_ENV: "0000"},
            ["signing_key.pkcs11: PKCS#11 token 'collateral-sync-tests': the PIN is incorrect"],
            id="wrong PIN",
        ),
        pytest.param(
            lambda c, *_: _pkcs11(c).update(label="no-such-key"),
            None,
            ["signing_key.pkcs11:", "holds no private key labelled 'no-such-key'"],
            id="no such key",
        ),
        pytest.param(
            lambda c, *_: _pkcs11(c).update(token="no-such-token"),
            None,
            ["signing_key.pkcs11:", "no token labelled 'no-such-token'"],
            id="no such token",
        ),
        pytest.param(
            lambda c, *_: _pkcs11(c).update(module="/nonexistent/libpkcs11.so"),
            None,
            ["signing_key.pkcs11:", "/nonexistent/libpkcs11.so: no such file"],
            id="no such module",
        ),
        pytest.param(
            lambda c, *_: _pkcs11(c).update(pin="1234"),
            None,
            ["signing_key.pkcs11.pin: expected pin_env or pin_file (the PIN never goes in"],
            id="PIN in the config",
        ),
        pytest.param(
            lambda c, *_: _pkcs11(c).pop("pin_env"),
            None,
            ["signing_key.pkcs11.pin_env: expected pin_env or pin_file"],
            id="no PIN",
        ),
        pytest.param(
            lambda c, *_: _pkcs11(c).update(pin_env="COLLATERAL_SYNC_UNSET_PIN"),
            None,
            [
                "signing_key.pkcs11.pin_env: expected the environment variable "
                "COLLATERAL_SYNC_UNSET_PIN set, got unset"
            ],
            id="PIN variable unset",
        ),
        pytest.param(
            lambda c, _k, _p, _h, d: _pkcs11(c).update(pin_file=_pin_file(d, "")),
            None,
            ["signing_key.pkcs11.pin_file: expected either pin_env or pin_file, got both"],
            id="PIN variable and file",
        ),
        pytest.param(
            lambda c, _k, p, *_: c.update(key_registry=str(p.registry_path)),
            None,
            ["key_registry:", "does not hold this server's own key"],
            id="key not registered",
        ),
        pytest.param(
            _registered_for_the_exchange,
            None,
            [
                "key_registry:",
                f"for {EXCHANGE}/PARTY_ROLE_EXCHANGE, expected {CUSTODIAN}/PARTY_ROLE_CUSTODIAN",
            ],
            id="key registered for another party",
        ),
    ],
)
def test_an_unusable_token_key_is_refused_in_one_line(
    change: Change,
    environment: dict[str, str] | None,
    words: list[str],
    custodian_token_key: TokenKey,
    reference_parties: Parties,
    softhsm_token: SoftHsmToken,
    tmp_path: Path,
) -> None:
    config = _config(reference_parties, custodian_token_key, tmp_path)
    change(config, custodian_token_key, reference_parties, softhsm_token, tmp_path)
    path = tmp_path / "custodian.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    process_environment = {
        **os.environ,
        "PYTHONPATH": str(REFERENCE_PATH),
        PIN_ENV: softhsm_token.pin,
        **(environment or {}),
    }
    result = subprocess.run(
        [sys.executable, "-m", "collateral_sync._cli", "serve", "custodian", "--config", str(path)],
        capture_output=True,
        text=True,
        env=process_environment,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("collateral-sync:")]
    for word in words:
        assert word in line, result.stderr
    assert softhsm_token.pin not in result.stderr
    assert not (tmp_path / f"{CUSTODIAN}.sqlite").exists()


def test_a_custodian_reads_its_pin_from_a_file_and_serves(
    custodian_token_key: TokenKey,
    reference_parties: Parties,
    softhsm_token: SoftHsmToken,
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)
    config = _config(reference_parties, custodian_token_key, tmp_path)
    pkcs11 = _pkcs11(config)
    del pkcs11["pin_env"]
    pkcs11["pin_file"] = _pin_file(tmp_path, softhsm_token.pin + "\n")
    server = start_server("custodian", config, name="pin-file-custodian")
    assert server.stop() == 0
