"""A development certificate authority for mutual TLS between parties.

Parties authenticate each other at the transport layer with X.509
certificates issued by a CA they both trust. Production deployments bring
their own PKI; this module creates a throw-away one for development, demos and
tests (``collateral-sync dev-certs`` calls :func:`create_dev_pki`).

Layout written to ``directory``::

    ca.pem            CA certificate (trust anchor for every party)
    ca.key            CA private key (mode 0600)
    <party>.pem       leaf certificate, subject CN = party id
    <party>.key       leaf private key (mode 0600)

Keys are ECDSA P-256: BoringSSL, which grpcio links, negotiates it in every TLS
version, while Ed25519 certificates are not offered by gRPC's TLS stack.
Leaf certificates carry both serverAuth and clientAuth, because every party
both serves and dials, and SANs for the hosts (DNS and IP) it serves on.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collateral_sync.errors import MalformedError

__all__ = [
    "DEFAULT_HOSTS",
    "DEFAULT_VALID_DAYS",
    "DevPki",
    "PartyFiles",
    "certificate_common_name",
    "create_dev_pki",
    "load_certificate_chain_pem",
    "load_certificate_pem",
    "load_private_key_pem",
    "pki_layout",
]

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_VALID_DAYS = 30

_CA_NAME = "ca"
# Party ids become file names: keep them to a portable, separator-free alphabet.
_PARTY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Certificates start slightly in the past so that a peer whose clock is a
# little behind does not reject a freshly issued certificate.
_BACKDATE = timedelta(minutes=5)
_CA_COMMON_NAME = "collateral-sync development CA"


@dataclass(frozen=True, slots=True)
class PartyFiles:
    """Where one party's certificate and private key were written."""

    party_id: str
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DevPki:
    """Paths of a development PKI written by :func:`create_dev_pki`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    parties: Mapping[str, PartyFiles]

    def party(self, party_id: str) -> PartyFiles:
        """The files of ``party_id``; KeyError if it was not issued."""
        return self.parties[party_id]

    def files(self) -> list[Path]:
        """Every file of the PKI: the CA's certificate and key, then each party's."""
        paths = [self.ca_cert, self.ca_key]
        for files in self.parties.values():
            paths += [files.cert, files.key]
        return paths


def pki_layout(directory: str | os.PathLike[str], parties: Sequence[str]) -> DevPki:
    """Where :func:`create_dev_pki` writes the PKI of ``parties`` under ``directory``.

    Writes nothing. MalformedError if ``parties`` is empty, repeats an id, or holds one that
    cannot be a file name (or is the CA's).
    """
    if not parties:
        raise MalformedError(
            "expected at least one party, got none",
            metadata={"expected": ">= 1 party", "actual": "0"},
            field_violations={"parties": "empty"},
        )
    for party_id in parties:
        if not _PARTY_ID.fullmatch(party_id) or party_id == _CA_NAME:
            raise MalformedError(
                f"expected a party id matching {_PARTY_ID.pattern} other than "
                f"{_CA_NAME!r}, got {party_id!r}",
                metadata={"expected": _PARTY_ID.pattern, "actual": party_id},
                field_violations={"parties": f"invalid party id {party_id!r}"},
            )
    if len(set(parties)) != len(parties):
        raise MalformedError(
            f"expected distinct party ids, got {list(parties)!r}",
            metadata={"expected": "distinct party ids", "actual": ",".join(parties)},
            field_violations={"parties": "duplicate party id"},
        )
    root = Path(directory)
    return DevPki(
        directory=root,
        ca_cert=root / f"{_CA_NAME}.pem",
        ca_key=root / f"{_CA_NAME}.key",
        parties=MappingProxyType(
            {p: PartyFiles(p, root / f"{p}.pem", root / f"{p}.key") for p in parties}
        ),
    )


def create_dev_pki(
    directory: str | os.PathLike[str],
    *,
    parties: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    valid_days: int = DEFAULT_VALID_DAYS,
    overwrite: bool = False,
    now: datetime | None = None,
) -> DevPki:
    """Create a CA and one leaf certificate per party under ``directory``.

    Refuses (FileExistsError) to replace existing files unless ``overwrite``:
    silently replacing a CA would orphan every certificate issued from it.
    """
    pki = pki_layout(directory, parties)
    if not hosts:
        raise MalformedError(
            "expected at least one host, got none",
            metadata={"expected": ">= 1 host", "actual": "0"},
            field_violations={"hosts": "empty"},
        )
    if valid_days < 1:
        raise MalformedError(
            f"expected valid_days >= 1, got {valid_days}",
            metadata={"expected": ">= 1", "actual": str(valid_days)},
            field_violations={"valid_days": "must be at least 1"},
        )
    san = x509.SubjectAlternativeName([_general_name(h) for h in hosts])
    issued_at = datetime.now(UTC) if now is None else now
    if issued_at.tzinfo is None:
        raise MalformedError(
            "expected a timezone-aware 'now', got a naive datetime",
            metadata={"expected": "timezone-aware datetime", "actual": issued_at.isoformat()},
        )
    not_before = issued_at - _BACKDATE
    not_after = issued_at + timedelta(days=valid_days)

    if not overwrite:
        # Check everything first so that a refusal leaves no half-written PKI.
        for path in pki.files():
            if path.exists():
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    pki.directory.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_COMMON_NAME)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(pki.ca_key, _private_pem(ca_key), secret=True)

    authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    for files in pki.parties.values():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, files.party_id)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(san, critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(authority_key_id, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False)
        _write(files.key, _private_pem(key), secret=True)
    return pki


def load_certificate_pem(data: bytes) -> x509.Certificate:
    """Parse one PEM certificate (the first, if there are several)."""
    return load_certificate_chain_pem(data)[0]


def load_certificate_chain_pem(data: bytes) -> list[x509.Certificate]:
    """Parse a PEM certificate chain, leaf first; at least one certificate."""
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise MalformedError(
            f"expected PEM certificates, got unparseable data ({len(data)} bytes)",
            metadata={"expected": "PEM CERTIFICATE", "actual": f"{len(data)} bytes"},
        ) from err
    return chain


def load_private_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM ECDSA private key (what :func:`create_dev_pki` writes)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise MalformedError(
            f"expected an unencrypted PEM private key, got unparseable data ({len(data)} bytes)",
            metadata={"expected": "PEM PRIVATE KEY", "actual": f"{len(data)} bytes"},
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise MalformedError(
            f"expected an ECDSA private key, got {type(key).__name__}",
            metadata={"expected": "EllipticCurvePrivateKey", "actual": type(key).__name__},
        )
    return key


def certificate_common_name(cert: x509.Certificate) -> str:
    """The subject CN of ``cert``: the party id for certificates issued here."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise MalformedError(
            f"expected exactly one subject CN, got {len(names)}",
            metadata={"expected": "1", "actual": str(len(names))},
        )
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise MalformedError(
            f"expected a DNS name or IP address, got {host!r}",
            metadata={"expected": "DNS name or IP address", "actual": host},
            field_violations={"hosts": f"invalid host {host!r}"},
        )
    return x509.DNSName(host)


def _serial_number() -> int:
    # RFC 5280: positive, at most 20 octets; 159 random bits stay within that.
    return secrets.randbits(159) | 1


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # O_CREAT's mode does not apply to a file that already existed.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(data)
    finally:
        if fd != -1:
            os.close(fd)
