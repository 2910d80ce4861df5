"""Tests for the development CA."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from collateral_sync.dev_ca import (
    DEFAULT_HOSTS,
    DevPki,
    certificate_common_name,
    create_dev_pki,
    load_certificate_chain_pem,
    load_certificate_pem,
    load_private_key_pem,
)
from collateral_sync.errors import MalformedError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(
        tmp_path_factory.mktemp("pki"),
        parties=["custodian-1", "exchange-1"],
        valid_days=7,
        now=NOW,
    )


def test_writes_every_file_with_private_keys_0600(pki: DevPki) -> None:
    names = sorted(p.name for p in pki.directory.iterdir())
    assert names == [
        "ca.key",
        "ca.pem",
        "custodian-1.key",
        "custodian-1.pem",
        "exchange-1.key",
        "exchange-1.pem",
    ]
    for key in (pki.ca_key, pki.party("custodian-1").key, pki.party("exchange-1").key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Certificates are public; no reason to hide them, but never world-writable.
    assert stat.S_IMODE(pki.ca_cert.stat().st_mode) & 0o022 == 0


def test_leaf_certificates_are_issued_by_the_ca(pki: DevPki) -> None:
    ca = load_certificate_pem(pki.ca_cert.read_bytes())
    ca_key = load_private_key_pem(pki.ca_key.read_bytes())
    assert ca.public_key() == ca_key.public_key()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for party_id in ("custodian-1", "exchange-1"):
        files = pki.party(party_id)
        leaf = load_certificate_pem(files.cert.read_bytes())
        leaf.verify_directly_issued_by(ca)  # raises if the CA did not sign it
        assert leaf.issuer == ca.subject
        key = load_private_key_pem(files.key.read_bytes())
        assert isinstance(key.curve, ec.SECP256R1)
        assert leaf.public_key() == key.public_key()
        assert certificate_common_name(leaf) == party_id
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_leaf_has_sans_and_both_key_usages(pki: DevPki) -> None:
    leaf = load_certificate_pem(pki.party("exchange-1").cert.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_validity_window_follows_now_and_valid_days(pki: DevPki) -> None:
    leaf = load_certificate_pem(pki.party("custodian-1").cert.read_bytes())
    assert leaf.not_valid_before_utc < NOW
    assert NOW - leaf.not_valid_before_utc <= timedelta(minutes=5)
    assert leaf.not_valid_after_utc == NOW + timedelta(days=7)


def test_another_pki_has_another_ca(pki: DevPki, tmp_path: Path) -> None:
    other = create_dev_pki(tmp_path, parties=["exchange-1"], hosts=["exchange.test"])
    ca = load_certificate_pem(pki.ca_cert.read_bytes())
    leaf = load_certificate_pem(other.party("exchange-1").cert.read_bytes())
    # Same CA name, different key: only the signature tells them apart.
    assert leaf.issuer == ca.subject
    with pytest.raises(InvalidSignature):
        leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["exchange.test"]
    assert san.get_values_for_type(x509.IPAddress) == []


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first = create_dev_pki(tmp_path, parties=["regulator"])
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError):
        create_dev_pki(tmp_path, parties=["regulator"])
    assert first.ca_cert.read_bytes() == ca_before
    second = create_dev_pki(tmp_path, parties=["regulator"], overwrite=True)
    assert second.ca_cert.read_bytes() != ca_before
    assert stat.S_IMODE(second.ca_key.stat().st_mode) == 0o600


def test_refusal_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "exchange-1.key").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        create_dev_pki(tmp_path, parties=["custodian-1", "exchange-1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exchange-1.key"]


@pytest.mark.parametrize(
    ("parties", "hosts", "valid_days"),
    [
        ([], DEFAULT_HOSTS, 1),
        (["../evil"], DEFAULT_HOSTS, 1),
        (["ca"], DEFAULT_HOSTS, 1),
        (["a b"], DEFAULT_HOSTS, 1),
        (["dup", "dup"], DEFAULT_HOSTS, 1),
        (["ok"], [], 1),
        (["ok"], ["bad host"], 1),
        (["ok"], DEFAULT_HOSTS, 0),
    ],
)
def test_rejects_bad_arguments_before_writing(
    tmp_path: Path, parties: list[str], hosts: list[str], valid_days: int
) -> None:
    with pytest.raises(MalformedError) as info:
        create_dev_pki(tmp_path, parties=parties, hosts=hosts, valid_days=valid_days)
    assert set(info.value.metadata) == {"expected", "actual"}
    assert list(tmp_path.iterdir()) == []


def test_rejects_naive_now(tmp_path: Path) -> None:
    with pytest.raises(MalformedError):
        create_dev_pki(tmp_path, parties=["ok"], now=datetime(2026, 1, 1))
    assert list(tmp_path.iterdir()) == []


def test_loaders_reject_garbage(pki: DevPki) -> None:
    with pytest.raises(MalformedError):
        load_certificate_pem(b"not a certificate")
    with pytest.raises(MalformedError):
        load_private_key_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(MalformedError):
        # A certificate is not a key.
        load_private_key_pem(pki.ca_cert.read_bytes())
    chain = pki.party("exchange-1").cert.read_bytes() + pki.ca_cert.read_bytes()
    assert [certificate_common_name(c) for c in load_certificate_chain_pem(chain)] == [
        "exchange-1",
        "collateral-sync development CA",
    ]
