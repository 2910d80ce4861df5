"""Keys on a PKCS#11 token (SoftHSM2): keygen on the token, signing there, and each refusal.

The token is the session's (``softhsm_token`` in ``tests/conftest.py``); each
test makes its keys under labels of its own. PKCS#11 logs a whole process in
to a token, so a test reads the token directly (:func:`_session`) only while
no signer of its own is open.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import nacl.signing
import pkcs11
import pytest
from _softhsm import SoftHsmToken, unique_label
from collateral_sync import _cli
from collateral_sync.amounts import amount_to_proto
from collateral_sync.errors import SignerError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signer import Pkcs11Signer, Signer
from collateral_sync.signing import pae, sign_statement, verify_statement
from collateral_sync.v1 import attestation_pb2, common_pb2
from pkcs11.util.ec import encode_named_curve_parameters

CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"
ROLE = common_pb2.PARTY_ROLE_CUSTODIAN
PIN_ENV = "COLLATERAL_SYNC_TEST_PKCS11_PIN"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _open(hsm: SoftHsmToken, label: str, **changes: Any) -> Pkcs11Signer:
    arguments: dict[str, Any] = {
        "module": hsm.module,
        "token": hsm.label,
        "label": label,
        "pin": hsm.pin,
        "party_id": CUSTODIAN,
        "role": ROLE,
    }
    arguments.update(changes)
    return Pkcs11Signer(arguments.pop("module"), **arguments)


def _generate(token: SoftHsmToken, prefix: str = "key") -> str:
    """A new Ed25519 key pair on the token; its label."""
    label = unique_label(prefix)
    Pkcs11Signer.generate(
        token.module,
        token=token.label,
        label=label,
        pin=token.pin,
        party_id=CUSTODIAN,
        role=ROLE,
    ).close()
    return label


@contextmanager
def _session(token: SoftHsmToken, *, rw: bool = False) -> Iterator[Any]:
    """A logged-in session of the test's own on the token."""
    library = pkcs11.lib(str(token.module))
    with library.get_token(token_label=token.label).open(user_pin=token.pin, rw=rw) as session:
        yield session


def _holdings(signer: Signer, sequence: int = 1) -> Any:
    statement = attestation_pb2.HoldingsStatement(
        account_id="acct-1",
        exchange_id=EXCHANGE,
        epoch=1,
        positions=[
            common_pb2.Position(
                account_id="acct-1", asset_id="USDC", quantity=amount_to_proto("100")
            )
        ],
    )
    return sign_statement(
        statement,
        signer,
        audience=[EXCHANGE],
        sequence=sequence,
        ttl=timedelta(hours=1),
        issued_at=NOW,
    )


def test_keygen_on_the_token_registers_the_key_and_its_statements_verify(
    softhsm_token: SoftHsmToken,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = softhsm_token
    label = unique_label("keygen")
    monkeypatch.setenv(PIN_ENV, token.pin)
    code = _cli.main(
        [
            "keygen",
            "--party",
            CUSTODIAN,
            "--role",
            "custodian",
            "--out",
            str(tmp_path),
            "--pkcs11-module",
            str(token.module),
            "--token",
            token.label,
            "--label",
            label,
            "--pin-env",
            PIN_ENV,
            "--valid-from",
            "2026-01-01T00:00:00Z",
        ]
    )
    output = capsys.readouterr()
    assert code == 0, output.err
    # The registry entry is written as for a key file; no secret is written anywhere.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["registry.json"]
    registry = KeyRegistry.load(tmp_path / "registry.json")
    [entry] = list(registry)
    assert (entry.party_id, entry.role) == (CUSTODIAN, ROLE)
    assert f"key id     {entry.key_id}" in output.out
    assert repr(label) in output.out

    with _open(token, label) as signer:
        assert signer.key_id == entry.key_id
        assert signer.public_key == entry.public_key
        envelope = _holdings(signer)
    verified = verify_statement(
        envelope,
        registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=EXCHANGE,
        now=NOW,
    )
    assert verified.issuer == CUSTODIAN
    assert verified.signer_key_ids == (entry.key_id,)

    # The public key as the token holds it (CKA_EC_POINT, a DER OCTET STRING around the
    # 32 bytes) is the registered one, and the token's signature verifies with it.
    with _session(token) as session:
        public = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, label=label)
        point = bytes(public[pkcs11.Attribute.EC_POINT])
    assert point[:2] == b"\x04\x20"
    assert point[2:] == entry.public_key
    [signature] = envelope.signatures
    nacl.signing.VerifyKey(point[2:]).verify(
        pae(envelope.payload_type, envelope.payload), signature.sig
    )


def test_the_private_key_is_sensitive_and_never_extractable(softhsm_token: SoftHsmToken) -> None:
    label = _generate(softhsm_token, "sealed")
    with _session(softhsm_token) as session:
        private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=label)
        attribute = pkcs11.Attribute
        assert private.key_type == pkcs11.KeyType.EC_EDWARDS
        assert private[attribute.TOKEN] is True
        assert private[attribute.SENSITIVE] is True
        assert private[attribute.EXTRACTABLE] is False
        assert private[attribute.NEVER_EXTRACTABLE] is True
        assert private[attribute.ALWAYS_SENSITIVE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[attribute.VALUE]


def test_a_label_already_on_the_token_is_never_replaced(softhsm_token: SoftHsmToken) -> None:
    label = _generate(softhsm_token, "taken")
    with pytest.raises(SignerError, match="already holds an object labelled") as raised:
        Pkcs11Signer.generate(
            softhsm_token.module,
            token=softhsm_token.label,
            label=label,
            pin=softhsm_token.pin,
            party_id=CUSTODIAN,
            role=ROLE,
        )
    assert "choose another label" in raised.value.message
    with _open(softhsm_token, label) as signer:  # the first key is still there, and signs
        assert len(signer.sign(b"still here")) == 64


def _p256_key(token: SoftHsmToken) -> str:
    label = unique_label("p256")
    with _session(token, rw=True) as session:
        session.generate_keypair(
            pkcs11.KeyType.EC,
            store=True,
            label=label,
            public_template={
                pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")
            },
        )
    return label


Refusal = Callable[[SoftHsmToken, Path], dict[str, Any]]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        pytest.param(
            lambda t, _: {"label": _generate(t), "pin": "0000"},
            ["PKCS#11 token 'collateral-sync-tests'", "the PIN is incorrect"],
            id="wrong PIN",
        ),
        pytest.param(
            lambda _t, _p: {"label": "absent-label"},
            ["holds no private key labelled 'absent-label'", "keygen --pkcs11-module"],
            id="missing label",
        ),
        pytest.param(
            lambda t, _: {"label": _generate(t), "token": "no-such-token"},
            ["no token labelled 'no-such-token'", "(tokens: 'collateral-sync-tests')"],
            id="unknown token",
        ),
        pytest.param(
            lambda _t, p: {"label": "any", "module": p / "absent.so"},
            ["absent.so: no such file"],
            id="missing module",
        ),
        pytest.param(
            lambda _t, p: {"label": "any", "module": _not_a_library(p)},
            ["not-a-library.so: cannot load it"],
            id="not a PKCS#11 module",
        ),
        pytest.param(
            lambda t, _: {"label": _p256_key(t)},
            ["a EC key, expected Ed25519 (CKK_EC_EDWARDS on edwards25519)"],
            id="not an Ed25519 key",
        ),
    ],
)
def test_each_unusable_key_is_refused_in_words(
    softhsm_token: SoftHsmToken, tmp_path: Path, make: Refusal, words: list[str]
) -> None:
    with pytest.raises(SignerError) as raised:
        _open(softhsm_token, **make(softhsm_token, tmp_path))
    message = raised.value.message
    assert "\n" not in message
    for word in words:
        assert word in message, message


def _not_a_library(directory: Path) -> Path:
    path = directory / "not-a-library.so"
    path.write_bytes(b"not an ELF file")
    return path


def test_one_signer_per_token_and_process(softhsm_token: SoftHsmToken) -> None:
    label = _generate(softhsm_token)
    with _open(softhsm_token, label), pytest.raises(SignerError, match="already logged in"):
        _open(softhsm_token, label)


def test_signs_from_many_threads_at_once(softhsm_token: SoftHsmToken) -> None:
    label = _generate(softhsm_token, "threads")
    found: list[tuple[bytes, bytes]] = []
    failures: list[BaseException] = []
    with _open(softhsm_token, label) as signer:
        verify_key = nacl.signing.VerifyKey(signer.public_key)

        def work(worker: int) -> None:
            try:
                for n in range(25):
                    data = f"worker {worker} message {n}".encode()
                    found.append((data, signer.sign(data)))
            except BaseException as err:  # noqa: BLE001  # reported below
                failures.append(err)

        threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert len(found) == 200
    for data, signature in found:
        verify_key.verify(data, signature)


def test_a_session_the_token_dropped_is_opened_again(softhsm_token: SoftHsmToken) -> None:
    label = _generate(softhsm_token, "reopen")
    with _open(softhsm_token, label) as signer:
        signer.sign(b"before")
        # As when an HSM restarts: every session and login of this process is gone.
        pkcs11.lib(str(softhsm_token.module)).reinitialize()
        signature = signer.sign(b"after")
        nacl.signing.VerifyKey(signer.public_key).verify(b"after", signature)
    with pytest.raises(SignerError, match="the signer was closed") as closed:
        signer.sign(b"closed")
    # What a request that needed the signature is refused with: retry later, nothing written.
    assert closed.value.reason_name == "SIGNER_UNAVAILABLE"
    assert closed.value.code == grpc.StatusCode.UNAVAILABLE


def test_repr_never_shows_the_pin(softhsm_token: SoftHsmToken) -> None:
    label = _generate(softhsm_token)
    with _open(softhsm_token, label) as signer:
        text = repr(signer)
    assert softhsm_token.pin not in text
    assert label in text
    assert signer.key_id[:16] in text


def test_without_python_pkcs11_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    with pytest.raises(SignerError, match=r"pip install 'collateral-sync\[pkcs11\]'"):
        Pkcs11Signer(
            tmp_path / "module.so",
            token="t",
            label="k",
            pin="1",
            party_id=CUSTODIAN,
            role=ROLE,
        )


@pytest.mark.parametrize(
    ("arguments", "environment", "words"),
    [
        pytest.param(
            ["--pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so", "--token", "t", "--label", "k"],
            {},
            f"--pin-env: set the environment variable {PIN_ENV}",
            id="PIN variable unset",
        ),
        pytest.param(
            ["--token", "t"], {}, "--token: for a key on a token, with --pkcs11-module", id="token"
        ),
        pytest.param(
            ["--pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so", "--label", "k"],
            {PIN_ENV: "1"},
            "--token is required with --pkcs11-module",
            id="no token",
        ),
        pytest.param(
            ["--pkcs11-module", "m.so", "--token", "t", "--label", "k", "--force"],
            {PIN_ENV: "1"},
            "--force: a key on a token is never replaced",
            id="force",
        ),
    ],
)
def test_keygen_on_a_token_refuses_bad_arguments_in_one_line(
    arguments: list[str],
    environment: dict[str, str],
    words: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    base = ["keygen", "--party", CUSTODIAN, "--role", "custodian", "--out", str(tmp_path)]
    assert _cli.main([*base, *arguments, "--pin-env", PIN_ENV]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert words in line
    assert list(tmp_path.iterdir()) == []


def test_keygen_on_a_token_refuses_a_wrong_pin_in_one_line(
    softhsm_token: SoftHsmToken,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(PIN_ENV, "9999")
    code = _cli.main(
        [
            "keygen",
            "--party",
            CUSTODIAN,
            "--role",
            "custodian",
            "--out",
            str(tmp_path),
            "--pkcs11-module",
            str(softhsm_token.module),
            "--token",
            softhsm_token.label,
            "--label",
            unique_label("refused"),
            "--pin-env",
            PIN_ENV,
        ]
    )
    assert code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (
        f"collateral-sync: error: PKCS#11 token {softhsm_token.label!r}: the PIN is incorrect"
    )
    assert not (tmp_path / "registry.json").exists()
