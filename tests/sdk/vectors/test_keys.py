"""vectors/keys.json: Ed25519 keys, key ids and signatures, and key registry files.

Keys are checked with PyNaCl and hashlib and with the SDK's SigningKey; registry files
with an independent loader written from docs/PROTOCOL.md §4.1 and §4.3, and with
KeyRegistry.load.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signed_registry import SignedKeyRegistry
from collateral_sync.v1 import common_pb2, keys_pb2
from google.protobuf import json_format

from ._common import ids_of, load, own_verify

KEYS = load("keys.json")


@pytest.mark.parametrize("vector", KEYS["vectors"], ids=lambda v: v["seed_hex"][:8])
def test_key_vector(vector: dict[str, Any]) -> None:
    seed = bytes.fromhex(vector["seed_hex"])
    public = bytes.fromhex(vector["public_key_hex"])
    message = bytes.fromhex(vector["message_hex"])
    signature = bytes.fromhex(vector["signature_hex"])
    # Independent.
    own = nacl.signing.SigningKey(seed)
    assert bytes(own.verify_key) == public
    assert base64.b64decode(vector["public_key_base64"]) == public
    assert hashlib.sha256(public).hexdigest() == vector["key_id"]
    assert own.sign(message).signature == signature
    assert own_verify(public, message, signature)
    assert not own_verify(public, message + b"!", signature)
    # SDK.
    sdk = SigningKey.from_seed(seed, "party.example", common_pb2.PARTY_ROLE_CUSTODIAN)
    assert sdk.public_key == public
    assert sdk.key_id == vector["key_id"]
    assert sdk.sign(message) == signature


# --- key registry files: an independent loader written from docs/PROTOCOL.md §4.1, §4.3 --

REGISTRIES = KEYS["registries"]
#: Each PartyKey field by both its proto3 JSON name and its original name (§4.3).
_OWN_FIELDS = {
    "partyId": "party_id",
    "role": "role",
    "publicKey": "public_key",
    "keyId": "key_id",
    "validFrom": "valid_from",
    "validUntil": "valid_until",
    "revokedAt": "revoked_at",
}
_OWN_FIELDS |= {original: original for original in _OWN_FIELDS.values()}
_OWN_ROLES = {
    "PARTY_ROLE_CUSTODIAN": 1,
    "PARTY_ROLE_EXCHANGE": 2,
    "PARTY_ROLE_REGULATOR": 3,
    "PARTY_ROLE_CLIENT": 4,
}
_RFC3339_Z = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z")


class _RegistryRefusedError(Exception):
    pass


def _own_instant(text: Any) -> tuple[int, int]:
    """(seconds since the epoch, nanos) of an RFC 3339 UTC time within 0001..9999."""
    match = _RFC3339_Z.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise _RegistryRefusedError(f"not an RFC 3339 UTC time: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not 1 <= year <= 9999:
        raise _RegistryRefusedError(f"outside 0001-01-01..9999-12-31: {text}")
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as err:
        raise _RegistryRefusedError(str(err)) from err
    nanos = int((match.group(7) or "").ljust(9, "0") or 0)
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()), nanos


def _own_registry(document: Any) -> list[str]:
    """The key ids of a registry file, in order; _RegistryRefusedError for a bad one."""
    if not isinstance(document, dict) or set(document) - {"keys"}:
        raise _RegistryRefusedError("a registry is an object with one field, keys")
    seen: list[str] = []
    for entry in document.get("keys", []):
        fields: dict[str, Any] = {}
        for name, value in entry.items():
            field = _OWN_FIELDS.get(name)
            if field is None or field in fields:
                raise _RegistryRefusedError(f"unknown or repeated field {name!r}")
            fields[field] = value
        if not fields.get("party_id"):
            raise _RegistryRefusedError("empty party id")
        role = fields.get("role")
        if role not in _OWN_ROLES and role not in _OWN_ROLES.values():
            raise _RegistryRefusedError(f"role {role!r}")
        public = base64.b64decode(fields.get("public_key", ""), validate=True)
        if len(public) != 32:
            raise _RegistryRefusedError(f"a public key of {len(public)} bytes")
        if fields.get("key_id") != hashlib.sha256(public).hexdigest():
            raise _RegistryRefusedError("key id is not the hash of the public key")
        if "valid_from" not in fields:
            raise _RegistryRefusedError("valid_from unset")
        valid_from = _own_instant(fields["valid_from"])
        if "valid_until" in fields and _own_instant(fields["valid_until"]) <= valid_from:
            raise _RegistryRefusedError("valid_until <= valid_from")
        if "revoked_at" in fields:
            _own_instant(fields["revoked_at"])
        if fields["key_id"] in seen:
            raise _RegistryRefusedError("key id registered twice")
        seen.append(fields["key_id"])
    return seen


def test_registry_vectors_cover_what_the_spec_requires() -> None:
    ids = {v["id"] for v in REGISTRIES}
    assert len(ids) == len(REGISTRIES)
    # §4.3: both namings load; §4.1: every refusal it lists, and the repeated key id.
    assert {
        "camel-case",
        "snake-case",
        "empty-party-id",
        "role-unspecified",
        "role-unknown",
        "public-key-31-bytes",
        "key-id-mismatch",
        "valid-from-unset",
        "valid-from-before-year-1",
        "valid-until-equals-valid-from",
        "duplicate-key-id",
    } <= ids


@pytest.mark.parametrize("vector", REGISTRIES, ids=ids_of(REGISTRIES))
def test_registry_vector(vector: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(vector["registry"]), encoding="utf-8")
    expected = vector["expected"]
    if expected["valid"]:
        assert _own_registry(vector["registry"]) == expected["key_ids"]
        assert [k.key_id for k in KeyRegistry.load(path)] == expected["key_ids"]
        return
    with pytest.raises(_RegistryRefusedError):
        _own_registry(vector["registry"])
    with pytest.raises(CollateralSyncError):
        KeyRegistry.load(path)


def test_a_negative_registry_vector_is_not_vacuous() -> None:
    # Each refused file differs from a valid one in one thing: put right, both loaders accept it.
    duplicate = next(v for v in REGISTRIES if v["id"] == "duplicate-key-id")
    keys = duplicate["registry"]["keys"]
    assert keys[0] == keys[-1]
    fixed = {"keys": keys[:-1]}
    assert len(_own_registry(fixed)) == 2
    assert len(KeyRegistry.from_proto(json_format.ParseDict(fixed, keys_pb2.KeyRegistry()))) == 2


# --- signed key registries (§4.6): the SDK, and an independent check from the text ------

CHAINS = KEYS["chains"]
_CHAIN_TYPE = b"application/vnd.collateral-sync.v1.key-registry-version+proto"


def _own_chain_check(chain: keys_pb2.KeyRegistryChain, root: str | None) -> tuple[int, list[str]]:
    """§4.6 read literally: each version's signers, numbering, time and history."""

    def signers(signed: Any, version: Any, holders: Any) -> int:
        pae = b"DSSEv1 %d %b %d %b" % (
            len(_CHAIN_TYPE),
            _CHAIN_TYPE,
            len(signed.version),
            signed.version,
        )
        keys = {k.key_id: k for k in holders.registry_keys}
        good = set()
        for signature in signed.signatures[:32]:
            key = keys.get(signature.key_id)
            if key is None or signature.key_id in good:
                continue
            at = version.issued_at.ToNanoseconds()
            if key.valid_from.ToNanoseconds() > at:
                continue
            if own_verify(key.public_key, pae, signature.signature):
                good.add(signature.key_id)
        return len(good)

    previous = None
    for index, signed in enumerate(chain.versions):
        version = keys_pb2.KeyRegistryVersion.FromString(signed.version)
        assert 1 <= version.threshold <= len(version.registry_keys)
        if previous is None:
            assert version.version == 1
            if root is not None:
                assert hashlib.sha256(signed.version).hexdigest() == root
        else:
            assert version.version == previous.version + 1
            assert version.issued_at.ToNanoseconds() > previous.issued_at.ToNanoseconds()
            assert signers(signed, version, previous) >= previous.threshold
            kept = {k.key_id: k for k in version.keys}
            for old in previous.keys:
                new = kept[old.key_id]
                assert (new.public_key, new.valid_from) == (old.public_key, old.valid_from)
                for end in ("valid_until", "revoked_at"):
                    if old.HasField(end):
                        assert new.HasField(end)
                        assert (
                            getattr(new, end).ToNanoseconds() <= getattr(old, end).ToNanoseconds()
                        )
        assert signers(signed, version, version) >= version.threshold, index
        previous = version
    assert previous is not None
    return previous.version, [k.key_id for k in previous.keys]


@pytest.mark.parametrize("vector", CHAINS, ids=lambda v: v["id"])
def test_signed_registry_vector(vector: dict[str, Any]) -> None:
    chain = keys_pb2.KeyRegistryChain()
    json_format.ParseDict(vector["chain"], chain)
    root = vector["root_sha256"]
    expected = vector["expected"]
    if expected["valid"]:
        assert _own_chain_check(chain, root) == (expected["version"], expected["key_ids"])
        signed = SignedKeyRegistry.verify(chain, root_sha256=root)
        assert signed.version == expected["version"]
        assert [k.key_id for k in signed.registry()] == expected["key_ids"]
    else:
        with pytest.raises((AssertionError, KeyError)):
            _own_chain_check(chain, root)
        with pytest.raises(CollateralSyncError):
            SignedKeyRegistry.verify(chain, root_sha256=root)
