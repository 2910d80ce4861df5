"""vectors/keys.json: Ed25519 keys from fixed seeds, and key registry files.

Each key gives its seed, public key, key id (SHA-256 of the raw public key) and the
deterministic signature of a fixed message; the registry files are ones a loader must
accept with exactly their key ids, and ones it must refuse (§4.1, §4.3).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

import nacl.signing

from ._common import CUSTODIAN_ID, EXCHANGE_ID, seed_from
from .key_registry_chains import registry_chains

__all__ = ["keys_file"]


_KEY_MESSAGE = b"collateral-sync test vector message"


def keys_file() -> dict[str, Any]:
    seeds = [bytes(32), bytes(range(32)), bytes([0xFF] * 32), seed_from(32), seed_from(224)]
    vectors = []
    for seed in seeds:
        signing = nacl.signing.SigningKey(seed)
        public = bytes(signing.verify_key)
        vectors.append(
            {
                "seed_hex": seed.hex(),
                "public_key_hex": public.hex(),
                "public_key_base64": base64.b64encode(public).decode("ascii"),
                "key_id": hashlib.sha256(public).hexdigest(),
                "message_hex": _KEY_MESSAGE.hex(),
                "signature_hex": signing.sign(_KEY_MESSAGE).signature.hex(),
            }
        )
    return {
        "description": (
            "Ed25519 (RFC 8032) keys from 32-byte seeds. key_id is the lowercase hex "
            "SHA-256 of the 32-byte raw public key; signature_hex is the deterministic "
            "Ed25519 signature of message_hex. registries[] are key registry files "
            "(§4.1, §4.3): a loader must accept each valid one with exactly its key_ids, "
            "and refuse each invalid one (a local refusal, with no wire status). chains[] are "
            "signed key registries (§4.6, proto3 JSON of KeyRegistryChain, with root_sha256 the "
            "pinned SHA-256 of version 1's bytes or null): a party must accept each valid one, "
            "with the last version's number and key ids in force, and refuse each invalid one."
        ),
        "vectors": vectors,
        "registries": _registry_files(),
        "chains": registry_chains(),
    }


#: The proto3 JSON names of PartyKey's fields (§4.3), and their original snake_case names.
_CAMEL = ("partyId", "role", "publicKey", "keyId", "validFrom", "validUntil", "revokedAt")
_SNAKE = ("party_id", "role", "public_key", "key_id", "valid_from", "valid_until", "revoked_at")


def _registry_entry(
    seed: bytes,
    party: str,
    role: str,
    *,
    names: Sequence[str] = _CAMEL,
    public_key: bytes | None = None,
    key_id: str | None = None,
    valid_from: str | None = "2026-01-01T00:00:00Z",
    valid_until: str | None = None,
    revoked_at: str | None = None,
) -> dict[str, Any]:
    """One PartyKey as a registry file holds it, written by hand (not by the SDK)."""
    public = bytes(nacl.signing.SigningKey(seed).verify_key) if public_key is None else public_key
    values: list[Any] = [
        party,
        role,
        base64.b64encode(public).decode("ascii"),
        hashlib.sha256(public).hexdigest() if key_id is None else key_id,
        valid_from,
        valid_until,
        revoked_at,
    ]
    return {name: value for name, value in zip(names, values, strict=True) if value is not None}


def _registry_files() -> list[dict[str, Any]]:
    """Registry files a loader must accept, and ones it must refuse (§4.1, §4.3)."""
    custodian_seed, exchange_seed = bytes(range(32)), seed_from(32)

    def custodian(**changes: Any) -> dict[str, Any]:
        return _registry_entry(custodian_seed, CUSTODIAN_ID, "PARTY_ROLE_CUSTODIAN", **changes)

    def exchange(**changes: Any) -> dict[str, Any]:
        return _registry_entry(
            exchange_seed,
            EXCHANGE_ID,
            "PARTY_ROLE_EXCHANGE",
            valid_until="2027-01-01T00:00:00Z",
            revoked_at="2026-06-01T00:00:00Z",
            **changes,
        )

    both = [
        hashlib.sha256(bytes(nacl.signing.SigningKey(s).verify_key)).hexdigest()
        for s in (custodian_seed, exchange_seed)
    ]
    # A 31-byte key whose key_id is its own hash: only its length is wrong.
    short = bytes(nacl.signing.SigningKey(custodian_seed).verify_key)[:31]

    def valid(vector_id: str, description: str, keys: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": vector_id,
            "clause": "§4.3",
            "description": description,
            "registry": {"keys": keys},
            "expected": {"valid": True, "key_ids": both},
        }

    def invalid(
        vector_id: str, clause: str, description: str, keys: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "id": vector_id,
            "clause": clause,
            "description": description,
            "registry": {"keys": keys},
            "expected": {"valid": False},
        }

    return [
        valid(
            "camel-case",
            "Two keys with lowerCamelCase field names, as the proto3 JSON mapping writes them.",
            [custodian(), exchange()],
        ),
        valid(
            "snake-case",
            "The same two keys with the original snake_case field names: parsers MUST accept "
            "them too.",
            [custodian(names=_SNAKE), exchange(names=_SNAKE)],
        ),
        valid(
            "mixed-case",
            "The same two keys, one entry in each naming.",
            [custodian(names=_SNAKE), exchange()],
        ),
        invalid(
            "empty-party-id",
            "§4.1",
            "An entry with an empty partyId.",
            [custodian(), exchange() | {"partyId": ""}],
        ),
        invalid(
            "role-unspecified",
            "§4.1",
            "An entry whose role is PARTY_ROLE_UNSPECIFIED.",
            [custodian(), exchange() | {"role": "PARTY_ROLE_UNSPECIFIED"}],
        ),
        invalid(
            "role-unknown",
            "§4.1",
            "An entry whose role is a number PartyRole does not define (99).",
            [custodian(), exchange() | {"role": 99}],
        ),
        invalid(
            "public-key-31-bytes",
            "§4.1",
            "A public key of 31 bytes (its keyId is the hash of those 31 bytes).",
            [custodian(public_key=short), exchange()],
        ),
        invalid(
            "key-id-mismatch",
            "§4.1",
            "An entry whose keyId is the exchange key's, not the hash of its own public key.",
            [custodian(key_id=both[1])],
        ),
        invalid(
            "valid-from-unset",
            "§4.1",
            "An entry without validFrom.",
            [custodian(valid_from=None), exchange()],
        ),
        invalid(
            "valid-from-before-year-1",
            "§4.1",
            "A validFrom before 0001-01-01T00:00:00Z, outside the Timestamp range.",
            [custodian(valid_from="0000-12-31T00:00:00Z"), exchange()],
        ),
        invalid(
            "valid-until-equals-valid-from",
            "§4.1",
            "validUntil equal to validFrom: a window with no instant in it.",
            [custodian(valid_until="2026-01-01T00:00:00Z"), exchange()],
        ),
        invalid(
            "valid-until-before-valid-from",
            "§4.1",
            "validUntil before validFrom.",
            [custodian(valid_until="2025-12-31T23:59:59Z"), exchange()],
        ),
        invalid(
            "duplicate-key-id",
            "§4.1",
            "The same key registered twice: one entry per key id.",
            [custodian(), exchange(), custodian()],
        ),
        invalid(
            "unknown-field",
            "§4.3",
            "An entry with a misspelt field name (partyID): unknown fields are refused.",
            [custodian(), {"partyID" if k == "partyId" else k: v for k, v in exchange().items()}],
        ),
    ]
