"""The ``chains`` of vectors/keys.json: signed key registries a party must accept or refuse (§4.6).

Built by hand from the specification: each version is a KeyRegistryVersion
serialised deterministically, signed with PyNaCl over PAE(type, bytes); the
verdicts are written here, never read back from the SDK's verifier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import nacl.signing
from collateral_sync.v1 import common_pb2, keys_pb2
from google.protobuf import json_format

from ._common import CUSTODIAN_ID, EXCHANGE_ID, KEYS_VALID_FROM, seed_from, timestamp

__all__ = ["registry_chains"]

PAYLOAD_TYPE = "application/vnd.collateral-sync.v1.key-registry-version+proto"
_REGISTRY = common_pb2.PARTY_ROLE_KEY_REGISTRY
_V1_AT = KEYS_VALID_FROM
_DAY = timedelta(days=1)


def _pae(payload: bytes) -> bytes:
    kind = PAYLOAD_TYPE.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _entry(
    seed: bytes,
    party: str,
    role: common_pb2.PartyRole.ValueType,
    valid_from: datetime,
    **ends: datetime,
) -> Any:
    public = bytes(nacl.signing.SigningKey(seed).verify_key)
    key = keys_pb2.PartyKey(
        party_id=party, role=role, public_key=public, key_id=hashlib.sha256(public).hexdigest()
    )
    key.valid_from.CopyFrom(timestamp(valid_from))
    for name, value in ends.items():
        getattr(key, name).CopyFrom(timestamp(value))
    return key


_OFFICERS = [seed_from(s) for s in (40, 72, 104)]
_SUCCESSORS = [seed_from(s) for s in (136, 168)]
_CUSTODIAN, _EXCHANGE, _NEW_CUSTODIAN = seed_from(0), seed_from(32), seed_from(200)


def _officer(seed: bytes, name: str) -> Any:
    return _entry(seed, name, _REGISTRY, _V1_AT - _DAY)


def _version(
    number: int,
    at: datetime,
    keys: list[Any],
    signers: list[bytes],
    *,
    officers: list[bytes] = _OFFICERS,
    threshold: int = 2,
) -> keys_pb2.SignedKeyRegistryVersion:
    version = keys_pb2.KeyRegistryVersion(
        version=number,
        keys=keys,
        registry_keys=[_officer(s, f"registry-officer-{i}") for i, s in enumerate(officers)],
        threshold=threshold,
    )
    version.issued_at.CopyFrom(timestamp(at))
    payload = version.SerializeToString(deterministic=True)
    signed = keys_pb2.SignedKeyRegistryVersion(version=payload)
    for seed in signers:
        signing = nacl.signing.SigningKey(seed)
        signed.signatures.add(
            key_id=hashlib.sha256(bytes(signing.verify_key)).hexdigest(),
            signature=signing.sign(_pae(payload)).signature,
        )
    return signed


def _parties(**custodian_ends: datetime) -> list[Any]:
    return [
        _entry(_CUSTODIAN, CUSTODIAN_ID, common_pb2.PARTY_ROLE_CUSTODIAN, _V1_AT, **custodian_ends),
        _entry(_EXCHANGE, EXCHANGE_ID, common_pb2.PARTY_ROLE_EXCHANGE, _V1_AT),
    ]


def _key_ids(keys: Iterable[Any]) -> list[str]:
    return [k.key_id for k in keys]


def registry_chains() -> list[dict[str, Any]]:
    """Chains a verifier must accept (with their version and key ids), and ones it must refuse."""
    v1 = _version(1, _V1_AT, _parties(), _OFFICERS[:2])
    root = hashlib.sha256(v1.version).hexdigest()
    rotation_at = _V1_AT + 30 * _DAY
    rotated = [
        *_parties(valid_until=rotation_at + timedelta(minutes=10)),
        _entry(_NEW_CUSTODIAN, CUSTODIAN_ID, common_pb2.PARTY_ROLE_CUSTODIAN, rotation_at),
    ]
    v2 = _version(2, rotation_at, rotated, _OFFICERS[1:])

    def chain(*versions: keys_pb2.SignedKeyRegistryVersion) -> dict[str, Any]:
        document: dict[str, Any] = json_format.MessageToDict(
            keys_pb2.KeyRegistryChain(versions=list(versions))
        )
        return document

    def valid(vector_id: str, text: str, *versions: Any, pin: str | None = None) -> dict[str, Any]:
        last = keys_pb2.KeyRegistryVersion.FromString(versions[-1].version)
        return {
            "id": vector_id,
            "description": text,
            "chain": chain(*versions),
            "root_sha256": pin,
            "expected": {"valid": True, "version": last.version, "key_ids": _key_ids(last.keys)},
        }

    def invalid(
        vector_id: str, text: str, *versions: Any, pin: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": vector_id,
            "description": text,
            "chain": chain(*versions),
            "root_sha256": pin,
            "expected": {"valid": False},
        }

    one_signature = _version(1, _V1_AT, _parties(), _OFFICERS[:1])
    doubled = _version(1, _V1_AT, _parties(), _OFFICERS[:1])
    doubled.signatures.append(doubled.signatures[0])
    replaced_both = _version(
        2, rotation_at, _parties(), [*_OFFICERS[:2], *_SUCCESSORS], officers=_SUCCESSORS
    )
    replaced_new_only = _version(2, rotation_at, _parties(), _SUCCESSORS, officers=_SUCCESSORS)
    revoked = _parties(revoked_at=rotation_at)
    return [
        valid("root", "Version 1, signed by 2 of its 3 registry keys.", v1),
        valid("root-pinned", "The same, with its SHA-256 pinned.", v1, pin=root),
        valid(
            "rotation",
            "Version 2 registers the custodian's new key and ends the old one ten minutes after "
            "the new one starts; signed by 2 registry keys (of version 1 and of its own).",
            v1,
            v2,
        ),
        valid(
            "registry-keys-replaced",
            "Version 2 names two new registry keys; signed by 2 of version 1's and both new ones.",
            v1,
            replaced_both,
        ),
        valid(
            "revocation",
            "Version 2 revokes the custodian's key from a time on (an earlier end is allowed).",
            v1,
            _version(2, rotation_at, revoked, _OFFICERS[:2]),
        ),
        invalid("root-one-signature", "Version 1 with 1 signature, 2 needed.", one_signature),
        invalid(
            "root-same-key-twice",
            "Version 1 with one registry key's signature twice: one signer, 2 needed.",
            doubled,
        ),
        invalid("root-not-pinned", "Version 1 under another pinned SHA-256.", v1, pin="00" * 32),
        invalid(
            "new-registry-keys-only",
            "Version 2 signed only by the new registry keys it names: version 1's threshold is "
            "missing.",
            v1,
            replaced_new_only,
        ),
        invalid(
            "version-skipped",
            "Version 3 directly after version 1.",
            v1,
            _version(3, rotation_at, rotated, _OFFICERS[:2]),
        ),
        invalid(
            "issued-not-later",
            "Version 2 issued at the same instant as version 1.",
            v1,
            _version(2, _V1_AT, rotated, _OFFICERS[:2]),
        ),
        invalid(
            "key-removed",
            "Version 2 drops the exchange's key: history is never rewritten.",
            v1,
            _version(2, rotation_at, _parties()[:1], _OFFICERS[:2]),
        ),
        invalid(
            "revocation-lifted",
            "Version 3 lifts the revocation version 2 made.",
            v1,
            _version(2, rotation_at, revoked, _OFFICERS[:2]),
            _version(3, rotation_at + _DAY, _parties(), _OFFICERS[:2]),
        ),
        invalid(
            "end-extended",
            "Version 3 moves the old custodian key's end a day later than version 2 set it.",
            v1,
            v2,
            _version(
                3,
                rotation_at + _DAY,
                [
                    *_parties(valid_until=rotation_at + _DAY),
                    _entry(
                        _NEW_CUSTODIAN, CUSTODIAN_ID, common_pb2.PARTY_ROLE_CUSTODIAN, rotation_at
                    ),
                ],
                _OFFICERS[:2],
            ),
        ),
    ]
