"""The collateral-sync command line: keygen, verify (offline audit bundles), bench."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from collateral_sync import _cli
from collateral_sync.amounts import amount_to_proto
from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.audit import load_audit_bundle, save_audit_bundle, verify_audit_bundle
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import add_signature, sign_statement
from collateral_sync.v1 import attestation_pb2, audit_pb2, common_pb2, emergency_pb2
from google.protobuf import timestamp_pb2

ORIGIN = "custodian.test/attestations"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TTL = timedelta(hours=1)


def _stamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _parties() -> tuple[SigningKey, SigningKey, SigningKey, KeyRegistry]:
    custodian = SigningKey.from_seed(b"\x01" * 32, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
    exchange = SigningKey.from_seed(b"\x02" * 32, "exchange-1", common_pb2.PARTY_ROLE_EXCHANGE)
    regulator = SigningKey.from_seed(b"\x03" * 32, "regulator-1", common_pb2.PARTY_ROLE_REGULATOR)
    registry = KeyRegistry()
    for key in (custodian, exchange, regulator):
        registry.add(key.party_key(valid_from=NOW - timedelta(days=1)))
    return custodian, exchange, regulator, registry


def _bundle(tmp_path: Path) -> audit_pb2.AuditBundle:
    custodian, _exchange, regulator, registry = _parties()
    log = AttestationLog(tmp_path / "log.sqlite", origin=ORIGIN)
    envelopes = []
    for n in range(5):
        statement = attestation_pb2.HoldingsStatement(
            account_id=f"acct-{n}",
            exchange_id="exchange-1",
            epoch=1,
            positions=[
                common_pb2.Position(
                    account_id=f"acct-{n}", asset_id="USDC", quantity=amount_to_proto(n + 1)
                )
            ],
        )
        envelope = sign_statement(
            statement, custodian, audience=["exchange-1"], sequence=n + 1, ttl=TTL, issued_at=NOW
        )
        log.append(statement_leaf(envelope))
        envelopes.append(envelope)
        if n == 2:
            first = log.checkpoint(custodian, now=NOW, sequence=1, ttl=TTL)
    second = log.checkpoint(custodian, now=NOW, sequence=2, ttl=TTL)
    release = sign_statement(
        emergency_pb2.EmergencyRelease(
            release_id="rel-1", account_id="acct-1", exchange_id="exchange-1"
        ),
        regulator,
        audience=["exchange-1", "custodian-1"],
        sequence=1,
        ttl=TTL,
        issued_at=NOW,
    )
    release = add_signature(release, custodian)
    bundle = audit_pb2.AuditBundle(
        registry=registry.to_proto(),
        verifier_party_id="exchange-1",
        log_origin=ORIGIN,
        checkpoints=[
            audit_pb2.Evidence(statement=first, relied_at=_stamp(NOW)),
            audit_pb2.Evidence(statement=second, relied_at=_stamp(NOW)),
        ],
        consistency_proofs=[log.consistency_proof(3, 5)],
        attested_statements=[
            audit_pb2.Evidence(
                statement=envelopes[1],
                relied_at=_stamp(NOW),
                inclusion_proof=log.inclusion_proof(1, 3),
            ),
            audit_pb2.Evidence(
                statement=envelopes[4],
                relied_at=_stamp(NOW),
                inclusion_proof=log.inclusion_proof(4, 5),
            ),
        ],
        statements=[audit_pb2.Evidence(statement=release, relied_at=_stamp(NOW))],
    )
    log.close()
    return bundle


def test_keygen_writes_secret_key_0600_and_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    code = _cli.main(["keygen", "--party", "custodian-1", "--role", "custodian", "--out", str(out)])
    assert code == _cli.EXIT_OK
    key_file = out / "custodian-1.key.json"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = SigningKey.load(key_file)
    registry = KeyRegistry.load(out / "registry.json")
    registered = registry.get(key.key_id)
    assert registered is not None
    assert registered.party_id == "custodian-1"
    assert registered.role == common_pb2.PARTY_ROLE_CUSTODIAN
    assert key.key_id in capsys.readouterr().out

    # A second party goes into the same registry.
    assert (
        _cli.main(["keygen", "--party", "exchange-1", "--role", "exchange", "--out", str(out)]) == 0
    )
    assert len(KeyRegistry.load(out / "registry.json")) == 2


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["keygen", "--party", "custodian-1", "--role", "custodian", "--out", str(tmp_path)]
    assert _cli.main(args) == 0
    before = (tmp_path / "custodian-1.key.json").read_bytes()
    assert _cli.main(args) == _cli.EXIT_USAGE
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "custodian-1.key.json").read_bytes() == before


def test_keygen_rejects_unknown_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        _cli.main(["keygen", "--party", "p", "--role", "banker"])
    assert raised.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".json", ".pb"])
def test_verify_accepts_a_sound_bundle(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"bundle{suffix}"
    save_audit_bundle(_bundle(tmp_path), path)
    assert _cli.main(["verify", str(path)]) == _cli.EXIT_OK
    out = capsys.readouterr().out
    assert "VERIFIED: 6 of 6 checks passed" in out
    assert "emergency release signed by custodian-1, regulator-1" in out


def test_verify_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bundle.json"
    save_audit_bundle(_bundle(tmp_path), path)
    assert _cli.main(["verify", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert [c["subject"] for c in report["checks"]] == [
        "checkpoint[0]",
        "checkpoint[1]",
        "consistency[0]",
        "attested_statement[0]",
        "attested_statement[1]",
        "statement[0]",
    ]


def test_verify_refuses_tampered_statement_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle(tmp_path)
    payload = bytearray(bundle.attested_statements[0].statement.payload)
    payload[-1] ^= 1
    bundle.attested_statements[0].statement.payload = bytes(payload)
    path = tmp_path / "bundle.json"
    save_audit_bundle(bundle, path)
    assert _cli.main(["verify", str(path)]) == _cli.EXIT_REFUSED
    out = capsys.readouterr().out
    assert "FAIL attested_statement[0]" in out
    assert "REFUSED: 5 of 6" in out


def test_verify_refuses_wrong_inclusion_proof(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    bundle.attested_statements[0].inclusion_proof.leaf_index = 2
    report = verify_audit_bundle(bundle)
    assert not report.ok
    failed = [c for c in report.checks if not c.ok]
    assert [c.subject for c in failed] == ["attested_statement[0]"]
    assert failed[0].reason == "PROOF_INVALID"


def test_verify_refuses_rewritten_history(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    custodian, _, _, _ = _parties()
    # A second log that differs at leaf 0 but claims to extend the first checkpoint.
    other = AttestationLog(tmp_path / "other.sqlite", origin=ORIGIN)
    other.append_many([b"rewritten"] + [b"x"] * 4)
    forged = other.checkpoint(custodian, now=NOW, sequence=3, ttl=TTL)
    bundle.checkpoints[1].statement.CopyFrom(forged)
    bundle.consistency_proofs[0].CopyFrom(other.consistency_proof(3, 5))
    other.close()
    report = verify_audit_bundle(bundle)
    failed = {c.subject: c.reason for c in report.checks if not c.ok}
    assert failed["consistency[0]"] == "CHECKPOINT_INCONSISTENT"


def test_verify_refuses_single_signature_emergency_release(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    release = bundle.statements[0].statement
    del release.signatures[1]
    report = verify_audit_bundle(bundle)
    failed = {c.subject: c.reason for c in report.checks if not c.ok}
    assert failed == {"statement[0]": "THRESHOLD_NOT_MET"}


def test_verify_refuses_missing_consistency_proof(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    del bundle.consistency_proofs[:]
    report = verify_audit_bundle(bundle)
    assert not report.ok
    assert any(c.subject == "consistency" and not c.ok for c in report.checks)


def test_verify_unusable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["verify", str(tmp_path / "absent.json")]) == _cli.EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert _cli.main(["verify", str(garbage)]) == _cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "not an AuditBundle" in err
    assert "Traceback" not in err
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert _cli.main(["verify", str(empty)]) == _cli.EXIT_USAGE
    assert "verifier_party_id" in capsys.readouterr().err


def test_load_audit_bundle_round_trips(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    for name in ("b.json", "b.pb"):
        save_audit_bundle(bundle, tmp_path / name)
        assert load_audit_bundle(tmp_path / name) == bundle
