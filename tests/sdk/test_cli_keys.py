"""``collateral-sync keys``: a registry ceremony from the command line, and its refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from collateral_sync import _cli
from collateral_sync.errors import VerificationError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signed_registry import load_key_registry
from collateral_sync.v1 import errors_pb2

_R = errors_pb2.ErrorReason


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = _cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _keygen(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, party: str, role: str, registry: Path
) -> str:
    code, out, err = _run(
        capsys,
        "keygen",
        "--party",
        party,
        "--role",
        role,
        "--out",
        str(tmp_path / "secret"),
        "--registry",
        str(registry),
        "--valid-from",
        "2026-01-01T00:00:00+00:00",
    )
    assert code == 0, err
    return out.split()[2]  # "key id     <id>"


@pytest.fixture
def ceremony(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path | str]:
    """Three registry officers (two must sign), a custodian and an exchange: version 1 signed."""
    officers, parties = tmp_path / "officers.json", tmp_path / "parties.json"
    for i in range(3):
        _keygen(capsys, tmp_path, f"officer-{i}", "key_registry", officers)
    custodian = _keygen(capsys, tmp_path, "custodian-1", "custodian", parties)
    _keygen(capsys, tmp_path, "exchange-1", "exchange", parties)
    chain = tmp_path / "registry.json"
    code, out, err = _run(
        capsys,
        "keys",
        "init",
        "--keys",
        str(parties),
        "--registry-keys",
        str(officers),
        "--threshold",
        "2",
        "--out",
        str(chain),
    )
    assert code == 0, err
    assert "version 1 drafted" in out
    return {"chain": chain, "custodian": custodian, "dir": tmp_path}


def _sign(capsys: pytest.CaptureFixture[str], chain: Path, tmp_path: Path, *officers: int) -> None:
    for i in officers:
        key = tmp_path / "secret" / f"officer-{i}.key.json"
        code, _, err = _run(
            capsys, "keys", "sign-registry", "--registry", str(chain), "--key", str(key)
        )
        assert code == 0, err


def test_a_version_is_in_force_once_its_threshold_signed(
    ceremony: dict[str, Path | str], capsys: pytest.CaptureFixture[str]
) -> None:
    chain, tmp = Path(ceremony["chain"]), Path(ceremony["dir"])
    code, out, _ = _run(capsys, "keys", "verify-registry", "--registry", str(chain))
    assert code == 1
    assert "REFUSED" in out
    assert "0 valid signatures of its own registry keys, 2 needed" in out
    _sign(capsys, chain, tmp, 0)
    code, out, _ = _run(capsys, "keys", "verify-registry", "--registry", str(chain))
    assert code == 1
    assert "1 valid signatures" in out
    _sign(capsys, chain, tmp, 2)
    code, out, _ = _run(capsys, "keys", "verify-registry", "--registry", str(chain))
    assert code == 0, out
    root = out.split("root sha256 ")[1].split()[0]
    assert _run(capsys, "keys", "verify-registry", "--registry", str(chain), "--root", root)[0] == 0
    code, out, _ = _run(
        capsys, "keys", "verify-registry", "--registry", str(chain), "--root", "ab" * 32
    )
    assert code == 1
    assert "not the pinned root" in out


def test_a_rotation_and_a_revocation_need_a_new_ceremony_each(
    ceremony: dict[str, Path | str], capsys: pytest.CaptureFixture[str]
) -> None:
    chain, tmp, old = Path(ceremony["chain"]), Path(ceremony["dir"]), str(ceremony["custodian"])
    _sign(capsys, chain, tmp, 0, 1)
    new_key_file = tmp / "new-custodian.json"
    (tmp / "secret" / "custodian-1.key.json").rename(tmp / "secret" / "old-custodian.key.json")
    new = _keygen(capsys, tmp, "custodian-1", "custodian", new_key_file)
    at = datetime.now(UTC) + timedelta(minutes=1)
    rotated = tmp / "v2.json"
    code, out, err = _run(
        capsys,
        "keys",
        "rotate",
        "--registry",
        str(chain),
        "--key-id",
        old,
        "--new-key",
        str(new_key_file),
        "--at",
        at.isoformat(),
        "--overlap",
        "300",
        "--out",
        str(rotated),
    )
    assert code == 0, err
    assert "version 2 drafted" in out
    # A draft is no version in force, and nothing is drafted on top of it.
    assert _run(capsys, "keys", "verify-registry", "--registry", str(rotated))[0] == 1
    code, _, err = _run(
        capsys, "keys", "revoke", "--registry", str(rotated), "--key-id", new, "--out", str(rotated)
    )
    assert code == 2
    assert "every version must be signed before the next" in err
    _sign(capsys, rotated, tmp, 1, 2)
    registry, signed = load_key_registry(rotated)
    assert signed is not None
    assert signed.version == 2
    old_key, new_key = registry.get(old), registry.get(new)
    assert old_key is not None
    assert new_key is not None
    assert old_key.valid_until.ToDatetime(tzinfo=UTC) == at + timedelta(seconds=300)
    assert new_key.valid_from.ToDatetime(tzinfo=UTC) == at

    revoked = tmp / "v3.json"
    code, _, err = _run(
        capsys,
        "keys",
        "revoke",
        "--registry",
        str(rotated),
        "--key-id",
        old,
        "--at",
        at.isoformat(),
        "--out",
        str(revoked),
    )
    assert code == 0, err
    _sign(capsys, revoked, tmp, 0, 2)
    registry, signed = load_key_registry(revoked)
    assert signed is not None
    assert signed.version == 3
    with pytest.raises(VerificationError) as refused:
        registry.resolve(old, at=at)
    assert refused.value.reason == _R.ERROR_REASON_KEY_REVOKED
    code, out, _ = _run(capsys, "keys", "show", "--registry", str(revoked))
    assert code == 0
    assert "version    3" in out
    assert "REVOKED from" in out


def test_refusals_name_the_option_at_fault(
    ceremony: dict[str, Path | str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain, tmp = Path(ceremony["chain"]), Path(ceremony["dir"])
    _sign(capsys, chain, tmp, 0, 1)
    code, _, err = _run(
        capsys,
        "keys",
        "sign-registry",
        "--registry",
        str(chain),
        "--key",
        str(tmp / "secret" / "exchange-1.key.json"),
    )
    assert code == 2
    assert "--key: registry versions are signed by keys of role PARTY_ROLE_KEY_REGISTRY" in err
    code, _, err = _run(
        capsys,
        "keys",
        "revoke",
        "--registry",
        str(chain),
        "--key-id",
        "00" * 32,
        "--out",
        str(tmp / "x.json"),
    )
    assert code == 2
    assert f"--key-id {'00' * 32}: not a key of version 1" in err
    plain = tmp_path / "plain.json"
    KeyRegistry().save(plain)
    code, _, err = _run(
        capsys, "keys", "revoke", "--registry", str(plain), "--key-id", "00", "--out", str(plain)
    )
    assert code == 2
    assert "a plain registry; start a signed one with keys init" in err
    code, _, err = _run(capsys, "keys", "show", "--registry", str(tmp_path / "missing.json"))
    assert code == 2
    assert "--registry" in err
    assert "no such file" in err
