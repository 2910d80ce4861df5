"""Write the language-neutral test vectors of collateral_sync.v1 into vectors/*.json.

The vectors pin the protocol's byte-level rules (docs/PROTOCOL.md, "Test
vectors") so that an implementation in any language can check itself without
running ours: key ids, PAE, signed statements that must verify or must fail
with a given ErrorReason, RFC 9162 Merkle roots and proofs, canonical amounts,
sync-entry hashes and hash chains, position-tree leaves and roots.

Everything is deterministic: fixed 32-byte Ed25519 seeds (Ed25519 signatures
are deterministic), fixed timestamps, fixed statement ids, deterministic
protobuf serialisation. Expected outcomes are written here by hand from the
specification, never read back from the SDK's verifiers, so that the vectors
test the SDK rather than mirror it (tests/sdk/test_vectors.py checks both the SDK
and an independent verifier against them, and that the committed files equal
what this script generates).

Usage::

    python scripts/make_vectors.py            # (re)write vectors/
    python scripts/make_vectors.py --check    # exit 1 if vectors/ differs
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nacl.signing
from collateral_sync import merkle
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import pae, sign_statement
from collateral_sync.statements import message_class_of, payload_type_of
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    keys_pb2,
    liquidation_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from pymerkle import InmemoryTree

__all__ = ["VECTOR_FILES", "build_vectors", "main"]

FORMAT = "collateral-sync-test-vectors"
FORMAT_VERSION = 1
PROTOCOL = "collateral_sync.v1"
GENERATOR = "scripts/make_vectors.py"

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"

_ROLE = common_pb2.PartyRole
_CUSTODIAN = _ROLE.PARTY_ROLE_CUSTODIAN
_EXCHANGE = _ROLE.PARTY_ROLE_EXCHANGE
_REGULATOR = _ROLE.PARTY_ROLE_REGULATOR
_CLIENT = _ROLE.PARTY_ROLE_CLIENT

# The status each reason maps to (docs/PROTOCOL.md §12), written out here so a
# change to the SDK's table cannot silently change the vectors.
_STATUS = {
    "MALFORMED": "INVALID_ARGUMENT",
    "INVALID_AMOUNT": "INVALID_ARGUMENT",
    "PAYLOAD_TYPE_MISMATCH": "INVALID_ARGUMENT",
    "SIGNATURE_INVALID": "UNAUTHENTICATED",
    "KEY_UNKNOWN": "UNAUTHENTICATED",
    "KEY_REVOKED": "UNAUTHENTICATED",
    "KEY_NOT_VALID": "UNAUTHENTICATED",
    "KEY_ROLE_MISMATCH": "PERMISSION_DENIED",
    "AUDIENCE_MISMATCH": "PERMISSION_DENIED",
    "THRESHOLD_NOT_MET": "PERMISSION_DENIED",
    "STATEMENT_EXPIRED": "FAILED_PRECONDITION",
    "STATEMENT_NOT_YET_VALID": "FAILED_PRECONDITION",
    "REPLAYED": "ALREADY_EXISTS",
    "PROOF_INVALID": "INVALID_ARGUMENT",
    "CHECKPOINT_INCONSISTENT": "FAILED_PRECONDITION",
    "EQUIVOCATION": "ABORTED",
    "SEQUENCE_GAP": "OUT_OF_RANGE",
    "OUT_OF_RANGE": "OUT_OF_RANGE",
    "LIMIT_EXCEEDED": "RESOURCE_EXHAUSTED",
}

# --- parties, keys and times ------------------------------------------------------

CUSTODIAN_ID = "custodian.example"
EXCHANGE_ID = "exchange.example"
REGULATOR_ID = "regulator.example"
CLIENT_ID = "client-0001.example"
LOG_ORIGIN = "custodian.example/collateral-sync/attestations"

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
ISSUED = NOW - timedelta(minutes=1)
TTL = timedelta(hours=1)
MAX_SKEW_SECONDS = 30
KEYS_VALID_FROM = datetime(2026, 1, 1, tzinfo=UTC)
OLD_KEY_VALID_FROM = datetime(2025, 1, 1, tzinfo=UTC)
ROTATION_TIME = KEYS_VALID_FROM
REVOCATION_TIME = datetime(2026, 3, 1, tzinfo=UTC)


#: The order L of the Ed25519 base point (RFC 8032 §5.1).
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493


def _seed(start: int) -> bytes:
    return bytes(range(start, start + 32))


@dataclass(frozen=True)
class _Key:
    name: str
    key: SigningKey
    registered: bool
    valid_from: datetime
    valid_until: datetime | None = None
    revoked_at: datetime | None = None

    def party_key(self) -> keys_pb2.PartyKey:
        entry = self.key.party_key(self.valid_from, self.valid_until)
        if self.revoked_at is not None:
            entry.revoked_at.CopyFrom(_timestamp(self.revoked_at))
        return entry


def _keys() -> dict[str, _Key]:
    def key(
        name: str,
        start: int,
        party: str,
        role: int,
        *,
        registered: bool = True,
        valid_from: datetime = KEYS_VALID_FROM,
        valid_until: datetime | None = None,
        revoked_at: datetime | None = None,
    ) -> _Key:
        return _Key(
            name,
            SigningKey.from_seed(_seed(start), party, role),
            registered,
            valid_from,
            valid_until,
            revoked_at,
        )

    keys = [
        key("custodian", 0, CUSTODIAN_ID, _CUSTODIAN),
        key("exchange", 32, EXCHANGE_ID, _EXCHANGE),
        key("regulator", 64, REGULATOR_ID, _REGULATOR),
        key("regulator-second", 96, REGULATOR_ID, _REGULATOR),
        key("client", 128, CLIENT_ID, _CLIENT),
        # Rotated out at ROTATION_TIME: valid only for statements issued before it.
        key(
            "custodian-rotated-out",
            160,
            CUSTODIAN_ID,
            _CUSTODIAN,
            valid_from=OLD_KEY_VALID_FROM,
            valid_until=ROTATION_TIME,
        ),
        key("exchange-revoked", 192, EXCHANGE_ID, _EXCHANGE, revoked_at=REVOCATION_TIME),
        key("unregistered", 224, CUSTODIAN_ID, _CUSTODIAN, registered=False),
    ]
    return {k.name: k for k in keys}


# --- small helpers ----------------------------------------------------------------


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _rfc3339(value: datetime) -> str:
    return _timestamp(value).ToJsonString()


def _status(reason: str) -> dict[str, Any]:
    return {"valid": False, "reason": reason, "grpc_status": _STATUS[reason]}


def _decimal(text: str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=text)


def _position(asset: str, quantity: str, locked: str, pledged: str) -> common_pb2.Position:
    return common_pb2.Position(
        account_id="acct-0001",
        asset_id=asset,
        quantity=_decimal(quantity),
        locked_quantity=_decimal(locked),
        pledged_quantity=_decimal(pledged),
    )


def _header(
    *,
    issuer: str,
    audience: Sequence[str],
    sequence: int,
    issued_at: datetime,
    expires_at: datetime,
    statement_id: str,
) -> envelope_pb2.StatementHeader:
    header = envelope_pb2.StatementHeader(
        issuer=issuer, audience=audience, sequence=sequence, statement_id=statement_id
    )
    header.issued_at.CopyFrom(_timestamp(issued_at))
    header.expires_at.CopyFrom(_timestamp(expires_at))
    return header


def _raw_envelope(
    payload: bytes, payload_type: str, signers: Iterable[SigningKey]
) -> envelope_pb2.Envelope:
    """An envelope signed over PAE without any of the issuer checks of sign_statement.

    Negative vectors need statements the SDK would refuse to issue.
    """
    signed = pae(payload_type, payload)
    return envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[envelope_pb2.Signature(key_id=k.key_id, sig=k.sign(signed)) for k in signers],
    )


def _statement_envelope(
    message: Message, header: envelope_pb2.StatementHeader, signers: Iterable[SigningKey]
) -> envelope_pb2.Envelope:
    message.header.CopyFrom(header)  # type: ignore[attr-defined]
    payload = message.SerializeToString(deterministic=True)
    return _raw_envelope(payload, payload_type_of(message), signers)


def _copy(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    duplicate = envelope_pb2.Envelope()
    duplicate.CopyFrom(envelope)
    return duplicate


# --- file 1: keys -----------------------------------------------------------------

_KEY_MESSAGE = b"collateral-sync test vector message"


def _keys_file() -> dict[str, Any]:
    seeds = [bytes(32), bytes(range(32)), bytes([0xFF] * 32), _seed(32), _seed(224)]
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
            "and refuse each invalid one (a local refusal, with no wire status)."
        ),
        "vectors": vectors,
        "registries": _registry_files(),
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
    custodian_seed, exchange_seed = bytes(range(32)), _seed(32)

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


# --- file 2: PAE ------------------------------------------------------------------


def _pae_file() -> dict[str, Any]:
    cases: list[tuple[str, bytes, str]] = [
        (
            "application/vnd.collateral-sync.v1.checkpoint+proto",
            b"hello",
            "the example of docs/PROTOCOL.md section 3.2",
        ),
        ("application/vnd.collateral-sync.v1.holdings-statement+proto", b"", "empty payload"),
        ("", b"x", "empty payload type"),
        (
            "application/vnd.collateral-sync.v1.sync-batch+proto",
            bytes(range(256)),
            "binary payload of 256 bytes: three-digit length, spaces and NULs inside",
        ),
        (
            "application/vnd.collateral-sync.v1.margin-call+proto",
            b"DSSEv1 1 a 1 b",
            "a payload that itself looks like a PAE",
        ),
        ("type/\u00e9", b"\xc3\xa9", "non-ASCII type: LEN counts UTF-8 bytes (7), not characters"),
        ("application/example", b"0123456789" * 100, "1000-byte payload"),
    ]
    return {
        "description": (
            'PAE(type, payload) = "DSSEv1" SP LEN(type) SP type SP LEN(payload) SP payload, '
            "LEN = ASCII decimal byte length without leading zeros, SP = 0x20, type as UTF-8."
        ),
        "vectors": [
            {
                "description": why,
                "payload_type": payload_type,
                "payload_hex": payload.hex(),
                "pae_hex": pae(payload_type, payload).hex(),
            }
            for payload_type, payload, why in cases
        ],
    }


# --- file 3: signed statements ----------------------------------------------------


@dataclass
class _StatementCase:
    id: str
    description: str
    expected_type: str
    envelope: envelope_pb2.Envelope
    expected: dict[str, Any]
    verifier: str
    now: datetime = NOW
    last_accepted_sequence: int = 0
    threshold: int | None = None


_THRESHOLD_ROLES = ["PARTY_ROLE_REGULATOR", "PARTY_ROLE_CUSTODIAN", "PARTY_ROLE_EXCHANGE"]


def _holdings(epoch: int = 3) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement(
        account_id="acct-0001",
        exchange_id=EXCHANGE_ID,
        epoch=epoch,
        positions=[
            _position("BENJI", "1000000", "0", "1000000"),
            _position("USDC", "500000.25", "0", "400000"),
        ],
        reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
    )


def _release() -> emergency_pb2.EmergencyRelease:
    release = emergency_pb2.EmergencyRelease(
        release_id="release-0001",
        account_id="acct-0001",
        exchange_id=EXCHANGE_ID,
        reason=emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE,
    )
    release.exchange_unresponsive_since.CopyFrom(_timestamp(NOW - timedelta(hours=49)))
    return release


def _valid(issuer: str, *signer_parties: str) -> dict[str, Any]:
    return {"valid": True, "issuer": issuer, "signer_party_ids": list(signer_parties)}


def _statement_cases(keys: dict[str, _Key], checkpoint_root: bytes) -> list[_StatementCase]:
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    regulator_second = keys["regulator-second"].key
    client = keys["client"].key
    rotated_out = keys["custodian-rotated-out"].key
    revoked = keys["exchange-revoked"].key
    unregistered = keys["unregistered"].key

    holdings_type = payload_type_of(attestation_pb2.HoldingsStatement)
    checkpoint_type = payload_type_of(attestation_pb2.Checkpoint)
    release_type = payload_type_of(emergency_pb2.EmergencyRelease)
    policy_type = payload_type_of(valuation_pb2.RiskPolicy)
    path_type = payload_type_of(liquidation_pb2.LiquidationPath)

    def holdings_header(**changes: Any) -> envelope_pb2.StatementHeader:
        fields: dict[str, Any] = {
            "issuer": CUSTODIAN_ID,
            "audience": [EXCHANGE_ID],
            "sequence": 7,
            "issued_at": ISSUED,
            "expires_at": ISSUED + TTL,
            "statement_id": "holdings-acct-0001-epoch-3",
        }
        fields.update(changes)
        return _header(**fields)

    # Positive statements issued through the SDK's own issuing path.
    holdings = sign_statement(
        _holdings(),
        custodian,
        audience=[EXCHANGE_ID],
        sequence=7,
        ttl=TTL,
        issued_at=ISSUED,
        statement_id="holdings-acct-0001-epoch-3",
    )
    checkpoint_message = attestation_pb2.Checkpoint(
        origin=LOG_ORIGIN, tree_size=1000, root_hash=checkpoint_root
    )
    checkpoint_message.timestamp.CopyFrom(_timestamp(ISSUED))
    checkpoint = sign_statement(
        checkpoint_message,
        custodian,
        audience=["*"],
        sequence=42,
        ttl=TTL,
        issued_at=ISSUED,
        statement_id="checkpoint-1000",
    )
    release_header = _header(
        issuer=REGULATOR_ID,
        audience=[REGULATOR_ID, CUSTODIAN_ID, EXCHANGE_ID],
        sequence=1,
        issued_at=ISSUED,
        expires_at=ISSUED + TTL,
        statement_id="release-0001",
    )
    release_2of3 = _statement_envelope(_release(), release_header, [regulator, custodian])
    release_extra = _copy(release_2of3)
    release_extra.signatures.add(
        key_id=unregistered.key_id, sig=unregistered.sign(pae(release_type, b"other bytes"))
    )
    release_extra.signatures.add(key_id=exchange.key_id, sig=bytes(64))
    path_message = liquidation_pb2.LiquidationPath(
        account_id="acct-0001",
        exchange_id=EXCHANGE_ID,
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id="USDC", venue="otc-desk", max_quantity=_decimal("400000")
            ),
            liquidation_pb2.LiquidationStep(
                asset_id="BENJI", venue="fund-redemption", max_quantity=_decimal("1000000")
            ),
        ],
        proceeds_account_id="exchange-settlement-0001",
    )
    path = _statement_envelope(
        path_message,
        _header(
            issuer=CLIENT_ID,
            audience=[CUSTODIAN_ID],
            sequence=1,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id="path-acct-0001-v1",
        ),
        [client, custodian],
    )
    old_key_time = ROTATION_TIME - timedelta(hours=1)
    by_rotated_out = sign_statement(
        _holdings(epoch=2),
        rotated_out,
        audience=[EXCHANGE_ID],
        sequence=6,
        ttl=TTL,
        issued_at=old_key_time,
        statement_id="holdings-acct-0001-epoch-2",
    )

    def tampered(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        changed = _copy(envelope)
        payload = bytearray(changed.payload)
        payload[-1] ^= 0x01
        changed.payload = bytes(payload)
        return changed

    def relabelled(envelope: envelope_pb2.Envelope, payload_type: str) -> envelope_pb2.Envelope:
        changed = _copy(envelope)
        changed.payload_type = payload_type
        return changed

    def holdings_by(
        signers: Sequence[SigningKey], **changes: Any
    ) -> envelope_pb2.Envelope:
        return _statement_envelope(_holdings(), holdings_header(**changes), signers)

    short_signature = _copy(holdings)
    short_signature.signatures[0].sig = short_signature.signatures[0].sig[:63]
    upper_key_id = _copy(holdings)
    upper_key_id.signatures[0].key_id = upper_key_id.signatures[0].key_id.upper()
    unsigned = _copy(holdings)
    del unsigned.signatures[:]

    revoked_policy = valuation_pb2.RiskPolicy(version=9)
    revoked_policy_envelope = _statement_envelope(
        revoked_policy,
        _header(
            issuer=EXCHANGE_ID,
            audience=["*"],
            sequence=9,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id="risk-policy-9",
        ),
        [revoked],
    )
    no_header = _raw_envelope(b"", holdings_type, [custodian])
    garbage = _raw_envelope(b"\xff\xff\xff", holdings_type, [custodian])
    # The same bytes under a signature that does not verify: refused before parsing (§3.6).
    garbage_forged = _copy(garbage)
    forged_sig = bytearray(garbage_forged.signatures[0].sig)
    forged_sig[5] ^= 0x01  # a bit of R: S < L still holds
    garbage_forged.signatures[0].sig = bytes(forged_sig)
    # S replaced by S + L (L the group order): the Ed25519 equation still holds (§3.3).
    malleated = _copy(holdings)
    scalar = int.from_bytes(malleated.signatures[0].sig[32:], "little") + _GROUP_ORDER
    malleated.signatures[0].sig = malleated.signatures[0].sig[:32] + scalar.to_bytes(32, "little")
    # Issued in the exchange's name, signed by regulator and custodian only (§3.7 step 4).
    exchange_named = envelope_pb2.StatementHeader()
    exchange_named.CopyFrom(release_header)
    exchange_named.issuer = EXCHANGE_ID
    release_not_by_issuer = _statement_envelope(_release(), exchange_named, [regulator, custodian])
    # The skew boundary: expired 20 s before NOW, inside the 30 s skew.
    in_skew = sign_statement(
        _holdings(),
        custodian,
        audience=[EXCHANGE_ID],
        sequence=8,
        ttl=timedelta(seconds=40),
        issued_at=NOW - timedelta(minutes=1),
        statement_id="holdings-in-skew",
    )

    valid = _valid
    return [
        _StatementCase(
            "holdings-statement/valid",
            "A custodian's holdings statement addressed to the exchange.",
            holdings_type,
            holdings,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "checkpoint/valid-public",
            "A checkpoint addressed to '*' (public type), verified by the regulator.",
            checkpoint_type,
            checkpoint,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            REGULATOR_ID,
        ),
        _StatementCase(
            "liquidation-path/valid-countersigned",
            "A client's liquidation path countersigned by the custodian: the issuer signs first.",
            path_type,
            path,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        _StatementCase(
            "holdings-statement/valid-rotated-key-before-rotation",
            "Signed by a key since rotated out, issued while it was valid; 'now' is then too.",
            holdings_type,
            by_rotated_out,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
            now=old_key_time + timedelta(minutes=5),
        ),
        _StatementCase(
            "holdings-statement/valid-expired-within-skew",
            "Expired 20 s before 'now': still accepted with the 30 s skew.",
            holdings_type,
            in_skew,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "emergency-release/valid-2-of-3",
            "Issued by the regulator, signed by regulator and custodian (2 distinct parties).",
            release_type,
            release_2of3,
            valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        _StatementCase(
            "emergency-release/valid-extra-bad-signatures-ignored",
            "2-of-3 plus an unregistered key's signature and a zero signature by the exchange's "
            "key: invalid extra signatures are ignored.",
            release_type,
            release_extra,
            valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        # --- must fail ---
        _StatementCase(
            "holdings-statement/tampered-payload",
            "The last payload byte flipped after signing.",
            holdings_type,
            tampered(holdings),
            _status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/swapped-payload-type",
            "payload_type changed to checkpoint; the verifier expects a holdings statement.",
            holdings_type,
            relabelled(holdings, checkpoint_type),
            _status("PAYLOAD_TYPE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/relabelled-as-checkpoint",
            "payload_type changed to checkpoint and the verifier expects a checkpoint: the type "
            "is inside PAE, so the signature no longer verifies.",
            checkpoint_type,
            relabelled(holdings, checkpoint_type),
            _status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/unregistered-key",
            "Signed by a key that is not in the registry.",
            holdings_type,
            holdings_by([unregistered]),
            _status("KEY_UNKNOWN"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/wrong-role",
            "Issued and signed by the exchange: exchange keys may not issue holdings statements.",
            holdings_type,
            holdings_by([exchange], issuer=EXCHANGE_ID, audience=[CUSTODIAN_ID]),
            _status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        _StatementCase(
            "holdings-statement/other-party-key",
            "Issuer is the custodian but the only signature is the exchange's.",
            holdings_type,
            holdings_by([exchange]),
            _status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/key-not-valid-after-rotation",
            "Signed with the rotated-out key, issued after its valid_until.",
            holdings_type,
            holdings_by([rotated_out]),
            _status("KEY_NOT_VALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "risk-policy/revoked-key",
            "Signed with an exchange key revoked before issued_at.",
            policy_type,
            revoked_policy_envelope,
            _status("KEY_REVOKED"),
            CUSTODIAN_ID,
        ),
        _StatementCase(
            "holdings-statement/wrong-audience",
            "Addressed to another exchange.",
            holdings_type,
            holdings_by([custodian], audience=["other-exchange.example"]),
            _status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/star-audience-not-public",
            "Audience ['*', verifier] on a non-public type.",
            holdings_type,
            holdings_by([custodian], audience=["*", EXCHANGE_ID]),
            _status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/expired",
            "expires_at one hour before 'now'.",
            holdings_type,
            holdings_by(
                [custodian], issued_at=NOW - timedelta(hours=2), expires_at=NOW - timedelta(hours=1)
            ),
            _status("STATEMENT_EXPIRED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/not-yet-valid",
            "issued_at one minute after 'now' (beyond the 30 s skew).",
            holdings_type,
            holdings_by(
                [custodian], issued_at=NOW + timedelta(minutes=1), expires_at=NOW + TTL
            ),
            _status("STATEMENT_NOT_YET_VALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/replayed",
            "Sequence 7 when the verifier already accepted sequence 7 from this issuer and type.",
            holdings_type,
            holdings,
            _status("REPLAYED"),
            EXCHANGE_ID,
            last_accepted_sequence=7,
        ),
        _StatementCase(
            "holdings-statement/no-signatures",
            "An envelope without signatures.",
            holdings_type,
            unsigned,
            _status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/short-signature",
            "A 63-byte signature.",
            holdings_type,
            short_signature,
            _status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/uppercase-key-id",
            "A key id in uppercase hex.",
            holdings_type,
            upper_key_id,
            _status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/unparseable-payload",
            "Validly signed bytes that are not a protobuf message.",
            holdings_type,
            garbage,
            _status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/unparseable-payload-bad-signature",
            "The unparseable bytes again, under a signature that does not verify: stage b "
            "refuses them before stage c could parse them.",
            holdings_type,
            garbage_forged,
            _status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/signature-scalar-not-reduced",
            "The valid statement's signature with S replaced by S + L: S must be below the "
            "group order L (RFC 8032 §5.1.7).",
            holdings_type,
            malleated,
            _status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/no-header",
            "Validly signed empty payload: a message without a header.",
            holdings_type,
            no_header,
            _status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/sequence-zero",
            "header.sequence = 0.",
            holdings_type,
            holdings_by([custodian], sequence=0),
            _status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/expires-before-issued",
            "expires_at before issued_at.",
            holdings_type,
            holdings_by([custodian], expires_at=ISSUED - timedelta(seconds=1)),
            _status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "emergency-release/below-threshold",
            "Signed by the regulator alone.",
            release_type,
            _statement_envelope(_release(), release_header, [regulator]),
            _status("THRESHOLD_NOT_MET"),
            CUSTODIAN_ID,
            threshold=2,
        ),
        _StatementCase(
            "emergency-release/issuer-not-a-signer",
            "Issued by the exchange, signed by regulator and custodian: two parties count, but "
            "the issuer is not one of them.",
            release_type,
            release_not_by_issuer,
            _status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
            threshold=2,
        ),
        _StatementCase(
            "emergency-release/same-party-twice",
            "Signed by two different keys of the regulator: one party counts once.",
            release_type,
            _statement_envelope(_release(), release_header, [regulator, regulator_second]),
            _status("THRESHOLD_NOT_MET"),
            CUSTODIAN_ID,
            threshold=2,
        ),
    ]


def _envelope_json(envelope: envelope_pb2.Envelope) -> dict[str, Any]:
    return {
        "payload_type": envelope.payload_type,
        "payload_hex": envelope.payload.hex(),
        "signatures": [
            {"key_id": s.key_id, "sig_hex": s.sig.hex()} for s in envelope.signatures
        ],
    }


def _payload_json(payload_type: str, payload: bytes) -> dict[str, Any] | None:
    """The payload as proto3 JSON, when it parses, for readers of the vectors."""
    message = message_class_of(payload_type)()
    try:
        message.ParseFromString(payload)
    except DecodeError:  # unparseable payloads are vectors too
        return None
    if not message.ListFields():
        return None
    return json_format.MessageToDict(message)


def _statements_file(keys: dict[str, _Key], checkpoint_root: bytes) -> dict[str, Any]:
    registry = KeyRegistry(k.party_key() for k in keys.values() if k.registered)
    vectors = []
    for case in _statement_cases(keys, checkpoint_root):
        envelope = case.envelope
        vector: dict[str, Any] = {
            "id": case.id,
            "description": case.description,
            "expected_payload_type": case.expected_type,
            "envelope": _envelope_json(envelope),
            "envelope_hex": envelope.SerializeToString(deterministic=True).hex(),
            "pae_hex": pae(envelope.payload_type, envelope.payload).hex(),
            "payload_json": _payload_json(case.expected_type, envelope.payload),
            "verifier_party_id": case.verifier,
            "now": _rfc3339(case.now),
            "last_accepted_sequence": case.last_accepted_sequence,
            "threshold": (
                None
                if case.threshold is None
                else {"k": case.threshold, "roles": list(_THRESHOLD_ROLES)}
            ),
            "expected": case.expected,
        }
        vectors.append(vector)
    return {
        "description": (
            "Signed statements (docs/PROTOCOL.md section 3). Verify each envelope with the "
            "registry, for verifier_party_id, at 'now', with max_skew_seconds of skew, "
            "expecting expected_payload_type; last_accepted_sequence is the replay state for "
            "(issuer, payload type) (0: none). A non-null 'threshold' means a threshold "
            "statement (section 3.7). 'expected' is either valid with the issuer and the "
            "counted signer parties, or the ErrorReason (without the ERROR_REASON_ prefix) "
            "and gRPC status the verifier must fail with."
        ),
        "max_skew_seconds": MAX_SKEW_SECONDS,
        "registry": json_format.MessageToDict(registry.to_proto()),
        "signing_keys": [
            {
                "name": k.name,
                "party_id": k.key.party_id,
                "role": common_pb2.PartyRole.Name(k.key.role),  # type: ignore[arg-type]
                "seed_hex": k.key.seed.hex(),
                "key_id": k.key.key_id,
                "registered": k.registered,
            }
            for k in keys.values()
        ],
        "vectors": vectors,
    }


# --- file 4: Merkle trees ---------------------------------------------------------

_LARGE_SIZES = (100, 1000)


def _leaf(index: int) -> bytes:
    return b"leaf-%d" % index


def _selected_indexes(size: int) -> list[int]:
    """Every index of small trees; edges and power-of-two boundaries of larger ones."""
    if size <= 16:
        return list(range(size))
    picks = {0, 1, size // 2, size - 2, size - 1}
    power = 1
    while power < size:
        picks.update({power - 1, power} & set(range(size)))
        power *= 2
    return sorted(picks)


def _selected_first_sizes(size: int) -> list[int]:
    if size <= 16:
        return list(range(1, size + 1))
    return sorted({i + 1 for i in _selected_indexes(size)} | {size})


def _merkle_file() -> dict[str, Any]:
    largest = max(_LARGE_SIZES)
    tree = InmemoryTree()
    tree.append_entries([_leaf(i) for i in range(largest)])
    sizes = [*range(1, 33), *_LARGE_SIZES]

    def root(size: int) -> bytes:
        return merkle.empty_root() if size == 0 else bytes(tree.get_root(size))

    def inclusion(index: int, size: int) -> attestation_pb2.InclusionProof:
        return merkle.inclusion_proof_from_pymerkle(tree.prove_inclusion(index + 1, size))

    def consistency(first: int, second: int) -> list[bytes]:
        if first == second:
            return []
        return list(
            merkle.consistency_proof_from_pymerkle(
                tree.prove_consistency(first, second)
            ).consistency_path
        )

    trees = [{"tree_size": 0, "root_hex": root(0).hex()}] + [
        {"tree_size": n, "root_hex": root(n).hex()} for n in sizes
    ]
    inclusions = []
    for size in sizes:
        for index in _selected_indexes(size):
            proof = inclusion(index, size)
            inclusions.append(
                {
                    "leaf_index": index,
                    "tree_size": size,
                    "leaf_hex": _leaf(index).hex(),
                    "leaf_hash_hex": merkle.leaf_hash(_leaf(index)).hex(),
                    "audit_path": [h.hex() for h in proof.audit_path],
                    "root_hex": root(size).hex(),
                }
            )
    consistencies = []
    for size in sizes:
        for first in _selected_first_sizes(size):
            consistencies.append(
                {
                    "first_tree_size": first,
                    "second_tree_size": size,
                    "first_root_hex": root(first).hex(),
                    "second_root_hex": root(size).hex(),
                    "consistency_path": [h.hex() for h in consistency(first, size)],
                }
            )
    return {
        "description": (
            "RFC 9162 Merkle trees with SHA-256 (docs/PROTOCOL.md section 5). Leaf i "
            "(0-based) is the ASCII bytes 'leaf-<i>' (decimal, no padding); leaf hash = "
            "SHA-256(0x00 || leaf), node hash = SHA-256(0x01 || left || right), empty tree = "
            "SHA-256(''). Inclusion audit paths are bottom-up (RFC 9162 2.1.3); consistency "
            "paths follow RFC 9162 2.1.4.1 (empty when the sizes are equal)."
        ),
        "leaf_rule": "leaf-<i>",
        "trees": trees,
        "inclusion": inclusions,
        "consistency": consistencies,
        "invalid_inclusion": _invalid_inclusion(root, inclusion),
        "invalid_consistency": _invalid_consistency(root, consistency),
    }


def _inclusion_vector(
    vector_id: str,
    description: str,
    *,
    leaf_index: int,
    tree_size: int,
    leaf_hash: bytes,
    audit_path: Sequence[bytes],
    root: bytes,
    reason: str,
) -> dict[str, Any]:
    return {
        "id": vector_id,
        "description": description,
        "leaf_index": leaf_index,
        "tree_size": tree_size,
        "leaf_hash_hex": leaf_hash.hex(),
        "audit_path": [h.hex() for h in audit_path],
        "root_hex": root.hex(),
        "expected": _status(reason),
    }


def _invalid_inclusion(
    root: Callable[[int], bytes],
    inclusion: Callable[[int, int], attestation_pb2.InclusionProof],
) -> list[dict[str, Any]]:
    path = list(inclusion(5, 13).audit_path)
    good = {
        "leaf_index": 5,
        "tree_size": 13,
        "leaf_hash": merkle.leaf_hash(_leaf(5)),
        "audit_path": path,
        "root": root(13),
    }

    def case(vector_id: str, description: str, reason: str, **changes: Any) -> dict[str, Any]:
        fields = {**good, **changes}
        return _inclusion_vector(vector_id, description, reason=reason, **fields)

    flipped = bytearray(path[1])
    flipped[0] ^= 0x80
    return [
        case(
            "index-equals-size",
            "leaf_index = tree_size.",
            "PROOF_INVALID",
            leaf_index=13,
        ),
        case(
            "index-beyond-size",
            "leaf_index > tree_size.",
            "PROOF_INVALID",
            leaf_index=20,
        ),
        case(
            "empty-tree",
            "tree_size = 0 has no leaves.",
            "PROOF_INVALID",
            leaf_index=0,
            tree_size=0,
            audit_path=[],
            root=root(0),
        ),
        case(
            "path-too-short",
            "The last audit path hash removed.",
            "PROOF_INVALID",
            audit_path=path[:-1],
        ),
        case(
            "path-too-long",
            "One hash too many.",
            "PROOF_INVALID",
            audit_path=[*path, root(1)],
        ),
        case(
            "short-path-hash",
            "An audit path hash of 31 bytes.",
            "PROOF_INVALID",
            audit_path=[path[0][:31], *path[1:]],
        ),
        case(
            "short-leaf-hash",
            "A leaf hash of 31 bytes.",
            "PROOF_INVALID",
            leaf_hash=merkle.leaf_hash(_leaf(5))[:31],
        ),
        case(
            "short-root",
            "A root of 31 bytes.",
            "PROOF_INVALID",
            root=root(13)[:31],
        ),
        case(
            "wrong-leaf",
            "The proof of leaf 5 presented for leaf 6's hash.",
            "PROOF_INVALID",
            leaf_hash=merkle.leaf_hash(_leaf(6)),
        ),
        case(
            "wrong-index",
            "The proof of leaf 5 presented as index 4.",
            "PROOF_INVALID",
            leaf_index=4,
        ),
        case(
            "flipped-path-bit",
            "One bit of an audit path hash flipped.",
            "PROOF_INVALID",
            audit_path=[path[0], bytes(flipped), *path[2:]],
        ),
        case(
            "wrong-root",
            "A valid proof checked against the root of another size.",
            "PROOF_INVALID",
            root=root(14),
        ),
    ]


def _invalid_consistency(
    root: Callable[[int], bytes], consistency: Callable[[int, int], list[bytes]]
) -> list[dict[str, Any]]:
    # History rewritten: leaf 3 replaced after a checkpoint at size 8, then grown to 13.
    rewritten = InmemoryTree()
    rewritten.append_entries(
        [b"leaf-3-rewritten" if i == 3 else _leaf(i) for i in range(13)]
    )
    rewritten_path = list(
        merkle.consistency_proof_from_pymerkle(rewritten.prove_consistency(8, 13)).consistency_path
    )
    path = consistency(6, 13)

    def case(
        vector_id: str,
        description: str,
        reason: str,
        *,
        first: int,
        second: int,
        consistency_path: Sequence[bytes],
        first_root: bytes,
        second_root: bytes,
    ) -> dict[str, Any]:
        return {
            "id": vector_id,
            "description": description,
            "first_tree_size": first,
            "second_tree_size": second,
            "first_root_hex": first_root.hex(),
            "second_root_hex": second_root.hex(),
            "consistency_path": [h.hex() for h in consistency_path],
            "expected": _status(reason),
        }

    flipped = bytearray(path[0])
    flipped[31] ^= 0x01
    return [
        case(
            "rewritten-history",
            "The log rewrote leaf 3 after the checkpoint of size 8: the new tree's proof from 8 "
            "to 13 does not lead from the old root.",
            "CHECKPOINT_INCONSISTENT",
            first=8,
            second=13,
            consistency_path=rewritten_path,
            first_root=root(8),
            second_root=bytes(rewritten.get_root(13)),
        ),
        case(
            "fork-same-size",
            "Two different roots for the same size.",
            "CHECKPOINT_INCONSISTENT",
            first=8,
            second=8,
            consistency_path=[],
            first_root=root(8),
            second_root=bytes(rewritten.get_root(8)),
        ),
        case(
            "flipped-path-bit",
            "One bit of a well-formed proof flipped.",
            "CHECKPOINT_INCONSISTENT",
            first=6,
            second=13,
            consistency_path=[bytes(flipped), *path[1:]],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "first-larger-than-second",
            "first_tree_size > second_tree_size.",
            "PROOF_INVALID",
            first=13,
            second=6,
            consistency_path=path,
            first_root=root(13),
            second_root=root(6),
        ),
        case(
            "first-size-zero",
            "A consistency proof from the empty tree is not defined.",
            "PROOF_INVALID",
            first=0,
            second=13,
            consistency_path=[],
            first_root=root(0),
            second_root=root(13),
        ),
        case(
            "path-too-short",
            "The last hash removed.",
            "PROOF_INVALID",
            first=6,
            second=13,
            consistency_path=path[:-1],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "path-too-long",
            "One hash too many.",
            "PROOF_INVALID",
            first=6,
            second=13,
            consistency_path=[*path, root(1)],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "short-path-hash",
            "A consistency path hash of 31 bytes.",
            "PROOF_INVALID",
            first=6,
            second=13,
            consistency_path=[path[0][:31], *path[1:]],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "equal-sizes-non-empty-path",
            "Equal sizes with a non-empty path.",
            "PROOF_INVALID",
            first=8,
            second=8,
            consistency_path=[root(1)],
            first_root=root(8),
            second_root=root(8),
        ),
    ]


# --- file 5: amounts --------------------------------------------------------------


def _amounts_file() -> dict[str, Any]:
    canonical = [
        "0",
        "1",
        "12",
        "-3.5",
        "0.5",
        "-0.5",
        "0.000000000000000001",
        "-0.000000000000000001",
        "1000000",
        "123456789012345678901234567890.25",
        "9223372036854775808",
        "9" * 60,
        "-" + "9" * 60 + "." + "9" * 18,
        "1.000000000000000001",
    ]
    non_canonical = [
        ("-0", "negative zero"),
        ("0.0", "trailing zero in the fraction"),
        ("1.50", "trailing zero in the fraction"),
        ("1.", "empty fraction"),
        (".5", "empty integer part"),
        ("01", "leading zero"),
        ("00", "leading zero"),
        ("-01.5", "leading zero"),
        ("+1", "plus sign"),
        ("1e3", "exponent"),
        ("1E3", "exponent"),
        (" 1", "leading space"),
        ("1 ", "trailing space"),
        ("1,000", "thousands separator"),
        ("1_000", "digit separator"),
        ("", "empty"),
        ("-", "sign only"),
        ("NaN", "not a number"),
        ("Infinity", "not a number"),
        ("0.0000000000000000001", "19 fraction digits"),
        ("1" * 61, "61 integer digits"),
        ("\u0661", "non-ASCII digit (ARABIC-INDIC DIGIT ONE)"),
        ("0x10", "hexadecimal"),
        ("--1", "double sign"),
    ]
    formatting = [
        ("1.500", "1.5"),
        ("-0.000", "0"),
        ("0012", "12"),
        ("100", "100"),
        ("1000.000000000000000000", "1000"),
        ("-2.50", "-2.5"),
        ("0.000000000000000001000", "0.000000000000000001"),
    ]
    unformattable = [
        ("0.0000000000000000001", "19 significant fraction digits would need rounding"),
        ("1" * 61, "61 integer digits"),
    ]
    return {
        "description": (
            "Canonical decimal text (docs/PROTOCOL.md section 2). 'canonical' must parse; "
            "'non_canonical' must be refused with reason INVALID_AMOUNT; 'formatting' maps an "
            "exact value written in any plain decimal notation to its canonical text; "
            "'unformattable' values cannot be written canonically and must be refused with "
            "INVALID_AMOUNT rather than rounded."
        ),
        "canonical": canonical,
        "non_canonical": [
            {"text": text, "why": why, "expected": _reason_amount()} for text, why in non_canonical
        ],
        "formatting": [{"value": value, "canonical": text} for value, text in formatting],
        "unformattable": [
            {"value": value, "why": why, "expected": _reason_amount()}
            for value, why in unformattable
        ],
    }


def _reason_amount() -> dict[str, Any]:
    return {"valid": False, "reason": "INVALID_AMOUNT", "grpc_status": "INVALID_ARGUMENT"}


# --- file 6: sync-entry hashes and chains ---------------------------------------------

#: The entry-hash domain of §6.3: 29 ASCII bytes, followed by one zero byte.
_SYNC_ENTRY_DOMAIN = b"collateral-sync/v1/sync-entry"
_ZERO_HASH = bytes(32)
#: SyncDirection numbers (§6.1), written out rather than read from the generated code.
_C2E = 1
_E2C = 2
_DIRECTION_NAMES = {
    _C2E: "SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE",
    _E2C: "SYNC_DIRECTION_EXCHANGE_TO_CUSTODIAN",
}
#: The largest integer the protocol carries (§2.4).
_MAX_INTEGER = 2**63 - 1
#: The receiver's window for the signed batches, unless a vector names another.
_SYNC_WINDOW = 16
_ACCOUNT = "acct-0001"


def _sync_hash_input(direction: int, sequence: int, prev: bytes, update: bytes) -> bytes:
    """The SHA-256 input of §6.3, written from the specification (not the SDK's entry_hash)."""
    return b"".join(
        [_SYNC_ENTRY_DOMAIN, b"\x00", bytes([direction]), sequence.to_bytes(8, "big"), prev, update]
    )


def _sync_hash(direction: int, sequence: int, prev: bytes, update: bytes) -> bytes:
    return hashlib.sha256(_sync_hash_input(direction, sequence, prev, update)).digest()


@dataclass(frozen=True)
class _SyncEntry:
    sequence: int
    prev: bytes
    update: bytes
    hash: bytes

    def to_proto(self) -> position_sync_pb2.SyncEntry:
        return position_sync_pb2.SyncEntry(
            sequence=self.sequence,
            prev_entry_hash=self.prev,
            update=self.update,
            entry_hash=self.hash,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "prev_entry_hash_hex": self.prev.hex(),
            "update_hex": self.update.hex(),
            "entry_hash_hex": self.hash.hex(),
        }


def _chain(
    direction: int, updates: Sequence[bytes], *, first: int = 1, prev: bytes = _ZERO_HASH
) -> list[_SyncEntry]:
    """Entries ``first, first + 1, ...`` chained from ``prev``, hashed in ``direction``."""
    entries = []
    for offset, update in enumerate(updates):
        sequence = first + offset
        digest = _sync_hash(direction, sequence, prev, update)
        entries.append(_SyncEntry(sequence, prev, update, digest))
        prev = digest
    return entries


def _attestation_ref(leaf_index: int) -> attestation_pb2.AttestationRef:
    return attestation_pb2.AttestationRef(
        log_origin=LOG_ORIGIN,
        leaf_index=leaf_index,
        leaf_hash=merkle.leaf_hash(_leaf(leaf_index)),
        tree_size=leaf_index + 1,
    )


def _pledge_update(asset: str, pledged: str, leaf_index: int) -> bytes:
    change = position_sync_pb2.PledgeChange(
        account_id=_ACCOUNT,
        asset_id=asset,
        pledged_quantity=_decimal(pledged),
        attestation=_attestation_ref(leaf_index),
    )
    return position_sync_pb2.PositionUpdate(pledge_change=change).SerializeToString(
        deterministic=True
    )


def _yield_update(asset: str, accrued: str, leaf_index: int) -> bytes:
    accrual = position_sync_pb2.YieldAccrual(
        account_id=_ACCOUNT,
        asset_id=asset,
        accrued_quantity=_decimal(accrued),
        attestation=_attestation_ref(leaf_index),
    )
    accrual.accrual_time.CopyFrom(_timestamp(ISSUED - timedelta(hours=leaf_index)))
    return position_sync_pb2.PositionUpdate(yield_accrual=accrual).SerializeToString(
        deterministic=True
    )


def _custodian_updates(*, fork: bool = False) -> list[bytes]:
    """Eight custodian -> exchange updates; ``fork`` changes the third (another history)."""
    return [
        _pledge_update("BENJI", "1000000", 40),
        _pledge_update("USDC", "400000", 41),
        _yield_update("BENJI", "12.25" if fork else "12.5", 42),
        _pledge_update("USDC", "400000.25", 43),
        _yield_update("USDC", "0.000000000000000001", 44),
        _pledge_update("BENJI", "999000", 45),
        _pledge_update("USDC", "0", 46),
        _yield_update("BENJI", "3", 47),
    ]


def _exchange_updates(exchange: SigningKey) -> list[bytes]:
    """Four exchange -> custodian updates, each carrying a statement signed by the exchange."""
    policy = valuation_pb2.RiskPolicy(version=1)
    policy.effective_from.CopyFrom(_timestamp(ISSUED))

    def signed(message: Message, sequence: int, statement_id: str) -> envelope_pb2.Envelope:
        return sign_statement(
            message,
            exchange,
            audience=[CUSTODIAN_ID],
            sequence=sequence,
            ttl=TTL,
            issued_at=ISSUED,
            statement_id=statement_id,
        )

    def credit_line(sequence: int, value: str, limit: str) -> envelope_pb2.Envelope:
        line = valuation_pb2.CreditLine(
            account_id=_ACCOUNT,
            risk_policy_version=1,
            collateral_value=_decimal(value),
            credit_limit=_decimal(limit),
            exposure=_decimal("0"),
        )
        return signed(line, sequence, f"credit-line-{_ACCOUNT}-{sequence}")

    updates = [
        position_sync_pb2.PositionUpdate(risk_policy=signed(policy, 1, "risk-policy-1")),
        position_sync_pb2.PositionUpdate(credit_line=credit_line(1, "937500.25", "750000")),
        position_sync_pb2.PositionUpdate(credit_line=credit_line(2, "1000000.625", "800000.5")),
        position_sync_pb2.PositionUpdate(credit_line=credit_line(3, "0", "0")),
    ]
    return [u.SerializeToString(deterministic=True) for u in updates]


def _update_json(update: bytes) -> dict[str, Any]:
    """The update as proto3 JSON, for readers of the vectors."""
    return json_format.MessageToDict(position_sync_pb2.PositionUpdate.FromString(update))


def _chain_vector(
    vector_id: str, description: str, direction: int, entries: Sequence[_SyncEntry]
) -> dict[str, Any]:
    return {
        "id": vector_id,
        "description": description,
        "direction": direction,
        "direction_name": _DIRECTION_NAMES[direction],
        "entries": [e.to_json() | {"update_json": _update_json(e.update)} for e in entries],
        "first_sequence": entries[0].sequence,
        "first_prev_hash_hex": entries[0].prev.hex(),
        "last_sequence": entries[-1].sequence,
        "last_entry_hash_hex": entries[-1].hash.hex(),
    }


def _entry_hash_vectors(c2e: Sequence[_SyncEntry]) -> list[dict[str, Any]]:
    cases = [
        (
            "first-entry",
            "The first custodian -> exchange entry: sequence 1 after 32 zero bytes.",
            _C2E,
            1,
            _ZERO_HASH,
            c2e[0].update,
        ),
        (
            "other-direction",
            "The same sequence, prev_entry_hash and update in direction 2: the direction byte "
            "changes the hash.",
            _E2C,
            1,
            _ZERO_HASH,
            c2e[0].update,
        ),
        (
            "sequence-256",
            "Sequence 256: u64be is 00 00 00 00 00 00 01 00.",
            _C2E,
            256,
            c2e[0].hash,
            c2e[1].update,
        ),
        (
            "high-sequence",
            "Sequence 2^63 - 1024 (u64be 7f ff ff ff ff ff fc 00), near the largest integer the "
            "protocol carries (section 2.4) and exact as a JSON number in any parser, after a "
            "prev_entry_hash of 32 0xff bytes.",
            _C2E,
            _MAX_INTEGER - 1023,
            b"\xff" * 32,
            c2e[2].update,
        ),
        (
            "empty-update",
            "A zero-length update, hashed as given (as an update it has no variant, which "
            "section 6.8 refuses as MALFORMED when the entry is applied).",
            _E2C,
            7,
            c2e[0].hash,
            b"",
        ),
    ]
    return [
        {
            "id": vector_id,
            "description": description,
            "direction": direction,
            "sequence": sequence,
            "prev_entry_hash_hex": prev.hex(),
            "update_hex": update.hex(),
            "hash_input_hex": _sync_hash_input(direction, sequence, prev, update).hex(),
            "entry_hash_hex": _sync_hash(direction, sequence, prev, update).hex(),
        }
        for vector_id, description, direction, sequence, prev, update in cases
    ]


def _invalid_entry_hash_vectors(c2e: Sequence[_SyncEntry]) -> list[dict[str, Any]]:
    good: dict[str, Any] = {
        "direction": _C2E,
        "sequence": 2,
        "prev": c2e[0].hash,
        "update": c2e[1].update,
    }

    def case(vector_id: str, description: str, **changes: Any) -> dict[str, Any]:
        fields = good | changes
        return {
            "id": vector_id,
            "description": description,
            "direction": fields["direction"],
            "sequence": fields["sequence"],
            "prev_entry_hash_hex": fields["prev"].hex(),
            "update_hex": fields["update"].hex(),
            "expected": _status("MALFORMED"),
        }

    return [
        case("direction-unspecified", "Direction 0 (SYNC_DIRECTION_UNSPECIFIED).", direction=0),
        case("direction-3", "Direction 3, which SyncDirection does not define.", direction=3),
        case("sequence-zero", "Sequence 0: sequences start at 1.", sequence=0),
        case("prev-31-bytes", "A prev_entry_hash of 31 bytes.", prev=c2e[0].hash[:31]),
        case("prev-empty", "An empty prev_entry_hash.", prev=b""),
    ]


def _invalid_chain_vectors(
    c2e: Sequence[_SyncEntry], e2c: Sequence[_SyncEntry]
) -> list[dict[str, Any]]:
    updates = [e.update for e in c2e]
    broken = [*c2e[:2], *_chain(_C2E, updates[2:5], first=3, prev=c2e[0].hash)]
    flipped = bytearray(c2e[3].update)
    flipped[-1] ^= 0x01
    tampered = [*c2e[:3], _SyncEntry(4, c2e[3].prev, bytes(flipped), c2e[3].hash), c2e[4]]
    short_hash = [*c2e[:2], _SyncEntry(3, c2e[2].prev, c2e[2].update, c2e[2].hash[:31])]

    def case(
        vector_id: str, description: str, direction: int, entries: Sequence[_SyncEntry]
    ) -> dict[str, Any]:
        return {
            "id": vector_id,
            "description": description,
            "direction": direction,
            "entries": [e.to_json() for e in entries],
            "expected": _status("MALFORMED"),
        }

    return [
        case("no-entries", "A batch without entries.", _C2E, []),
        case(
            "sequence-zero",
            "Entries 0, 1, 2 chained from 32 zero bytes: sequences start at 1.",
            _C2E,
            _chain(_C2E, updates[:3], first=0),
        ),
        case(
            "sequence-1-after-non-zero-hash",
            "Entry 1 chained to a non-zero hash (exchange -> custodian entry 1's): sequence 1 "
            "follows 32 zero bytes.",
            _C2E,
            _chain(_C2E, updates[:3], prev=e2c[0].hash),
        ),
        case(
            "first-prev-31-bytes",
            "Entries 6 to 8 whose first prev_entry_hash is entry 5's hash cut to 31 bytes (and "
            "hashed so).",
            _C2E,
            _chain(_C2E, updates[5:8], first=6, prev=c2e[4].hash[:31]),
        ),
        case(
            "gap",
            "Entries 1, 2, 4: entry 4 chained to entry 2's hash and correctly hashed; sequences "
            "must be consecutive.",
            _C2E,
            [*c2e[:2], *_chain(_C2E, updates[3:4], first=4, prev=c2e[1].hash)],
        ),
        case(
            "repeated-sequence",
            "Entries 1, 2, 2: the second entry 2 chained to the first and correctly hashed.",
            _C2E,
            [*c2e[:2], *_chain(_C2E, updates[2:3], first=2, prev=c2e[1].hash)],
        ),
        case(
            "broken-link",
            "Entries 1 to 5 where entry 3's prev_entry_hash is entry 1's hash, not entry 2's; "
            "entries 3 to 5 are correctly hashed over what they hold.",
            _C2E,
            broken,
        ),
        case(
            "entry-hash-mismatch",
            "Entries 1 to 5 with the last byte of entry 4's update flipped after hashing.",
            _C2E,
            tampered,
        ),
        case(
            "entry-hash-31-bytes",
            "Entries 1 to 3 with entry 3's entry_hash cut to 31 bytes.",
            _C2E,
            short_hash,
        ),
        case(
            "wrong-direction",
            "The custodian -> exchange entries 1 to 5 checked as direction 2: every hash was "
            "computed with direction byte 1.",
            _E2C,
            c2e[:5],
        ),
    ]


def _receiving_vectors(
    chains: dict[str, list[_SyncEntry]],
) -> list[dict[str, Any]]:
    genesis, fork, e2c = chains["genesis"], chains["fork"], chains["exchange"]
    names = {
        "genesis": "custodian-to-exchange/genesis",
        "fork": "custodian-to-exchange/fork",
        "exchange": "exchange-to-custodian/genesis",
    }

    def log(chain: str | None, sequence: int) -> dict[str, Any]:
        head = _ZERO_HASH if chain is None or sequence == 0 else chains[chain][sequence - 1].hash
        return {
            "entries_of": None if chain is None else names[chain],
            "sequence": sequence,
            "entry_hash_hex": head.hex(),
        }

    def valid(new: Sequence[_SyncEntry], head: _SyncEntry) -> dict[str, Any]:
        return {
            "valid": True,
            "new_sequences": [e.sequence for e in new],
            "head_sequence": head.sequence,
            "head_entry_hash_hex": head.hash.hex(),
        }

    def gap(expected: int, actual: int) -> dict[str, Any]:
        return _status("SEQUENCE_GAP") | {
            "metadata": {"expected": str(expected), "actual": str(actual)}
        }

    def equivocation(sequence: int, stored: bytes, received: bytes) -> dict[str, Any]:
        return _status("EQUIVOCATION") | {
            "metadata": {
                "sequence": str(sequence),
                "expected": stored.hex(),
                "actual": received.hex(),
            }
        }

    def case(
        vector_id: str,
        description: str,
        receiver_log: dict[str, Any],
        entries: Sequence[_SyncEntry],
        expected: dict[str, Any],
        *,
        direction: int = _C2E,
    ) -> dict[str, Any]:
        return {
            "id": vector_id,
            "description": description,
            "direction": direction,
            "receiver_log": receiver_log,
            "entries": [e.to_json() for e in entries],
            "expected": expected,
        }

    return [
        case(
            "first-batch",
            "An empty log receives entries 1 to 5.",
            log(None, 0),
            genesis[:5],
            valid(genesis[:5], genesis[4]),
        ),
        case(
            "next-batch",
            "A log at 5 receives entries 6 to 8, chained to its head.",
            log("genesis", 5),
            genesis[5:8],
            valid(genesis[5:8], genesis[7]),
        ),
        case(
            "overlap",
            "A log at 3 receives entries 2 to 5: 2 and 3 are duplicates (skipped), 4 and 5 new.",
            log("genesis", 3),
            genesis[1:5],
            valid(genesis[3:5], genesis[4]),
        ),
        case(
            "duplicates-only",
            "A log at 5 receives entries 2 to 4 again: nothing new, the head stays.",
            log("genesis", 5),
            genesis[1:4],
            valid([], genesis[4]),
        ),
        case(
            "duplicates-of-a-common-prefix",
            "A log holding the fork's entries 1 to 5 receives genesis entries 1 and 2, which "
            "both histories share: duplicates, nothing new.",
            log("fork", 5),
            genesis[:2],
            valid([], fork[4]),
        ),
        case(
            "exchange-next-batch",
            "An exchange -> custodian log at 2 receives entries 3 and 4.",
            log("exchange", 2),
            e2c[2:4],
            valid(e2c[2:4], e2c[3]),
            direction=_E2C,
        ),
        case(
            "gap-after-head",
            "A log at 3 receives entries 6 to 8: entry 4 is missing.",
            log("genesis", 3),
            genesis[5:8],
            gap(4, 6),
        ),
        case(
            "gap-on-empty-log",
            "An empty log receives entries 6 to 8.",
            log(None, 0),
            genesis[5:8],
            gap(1, 6),
        ),
        case(
            "fork-at-head",
            "A log holding the fork's entries 1 to 5 receives genesis entries 6 to 8: entry 6 "
            "does not chain to the stored entry 5.",
            log("fork", 5),
            genesis[5:8],
            equivocation(5, fork[4].hash, genesis[4].hash),
        ),
        case(
            "duplicate-differs",
            "A log holding the fork's entries 1 to 3 receives genesis entries 3 to 5: entry 3, "
            "the only duplicate, differs.",
            log("fork", 3),
            genesis[2:5],
            equivocation(3, fork[2].hash, genesis[2].hash),
        ),
        case(
            "stale-duplicates-differ",
            "A log holding the fork's entries 1 to 5 receives genesis entries 1 to 3: all "
            "duplicates, and entry 3 differs from the stored one.",
            log("fork", 5),
            genesis[:3],
            equivocation(3, fork[2].hash, genesis[2].hash),
        ),
    ]


def _sync_batch_vectors(
    keys: dict[str, _Key], c2e: Sequence[_SyncEntry], e2c: Sequence[_SyncEntry]
) -> list[dict[str, Any]]:
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    invalid = {v["id"]: v for v in _invalid_chain_vectors(c2e, e2c)}

    def entries_of(vector_id: str) -> list[_SyncEntry]:
        return [
            _SyncEntry(
                e["sequence"],
                bytes.fromhex(e["prev_entry_hash_hex"]),
                bytes.fromhex(e["update_hex"]),
                bytes.fromhex(e["entry_hash_hex"]),
            )
            for e in invalid[vector_id]["entries"]
        ]

    def envelope(
        entries: Sequence[_SyncEntry],
        *,
        direction: int = _C2E,
        batch_direction: int | None = None,
        header_sequence: int | None = None,
    ) -> envelope_pb2.Envelope:
        sender, receiver = (
            (custodian, EXCHANGE_ID) if direction == _C2E else (exchange, CUSTODIAN_ID)
        )
        batch = position_sync_pb2.SyncBatch(
            direction=direction if batch_direction is None else batch_direction,  # type: ignore[arg-type]
            entries=[e.to_proto() for e in entries],
        )
        sequence = entries[-1].sequence if header_sequence is None else header_sequence
        statement_id = f"sync-batch-{direction}-{entries[0].sequence}-{entries[-1].sequence}"
        header = _header(
            issuer=sender.party_id,
            audience=[receiver],
            sequence=sequence,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id=statement_id,
        )
        return _statement_envelope(batch, header, [sender])

    def case(
        vector_id: str,
        description: str,
        signed: envelope_pb2.Envelope,
        expected: dict[str, Any],
        *,
        direction: int = _C2E,
        max_entries: int = _SYNC_WINDOW,
    ) -> dict[str, Any]:
        sender, receiver = (
            (CUSTODIAN_ID, EXCHANGE_ID) if direction == _C2E else (EXCHANGE_ID, CUSTODIAN_ID)
        )
        return {
            "id": vector_id,
            "description": description,
            "sender_party_id": sender,
            "receiver_party_id": receiver,
            "direction": direction,
            "now": _rfc3339(NOW),
            "max_entries": max_entries,
            "envelope": _envelope_json(signed),
            "envelope_hex": signed.SerializeToString(deterministic=True).hex(),
            "expected": expected,
        }

    def valid(entries: Sequence[_SyncEntry]) -> dict[str, Any]:
        return {
            "valid": True,
            "first_sequence": entries[0].sequence,
            "first_prev_hash_hex": entries[0].prev.hex(),
            "last_sequence": entries[-1].sequence,
            "last_entry_hash_hex": entries[-1].hash.hex(),
            "entry_hashes": [e.hash.hex() for e in entries],
        }

    beyond = _chain(_C2E, [c2e[0].update, c2e[1].update], first=_MAX_INTEGER, prev=c2e[4].hash)
    return [
        case(
            "custodian-to-exchange/valid",
            "Entries 1 to 5 of the custodian's log, signed by the custodian for the exchange.",
            envelope(c2e[:5]),
            valid(c2e[:5]),
        ),
        case(
            "custodian-to-exchange/valid-continuation",
            "Entries 6 to 8: the first prev_entry_hash is entry 5's hash.",
            envelope(c2e[5:8]),
            valid(c2e[5:8]),
        ),
        case(
            "exchange-to-custodian/valid",
            "Entries 1 to 4 of the exchange's log, signed by the exchange for the custodian.",
            envelope(e2c, direction=_E2C),
            valid(e2c),
            direction=_E2C,
        ),
        case(
            "custodian-to-exchange/broken-link",
            "The entries of invalid_chains 'broken-link', validly signed.",
            envelope(entries_of("broken-link")),
            _status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/entry-hash-mismatch",
            "The entries of invalid_chains 'entry-hash-mismatch', validly signed.",
            envelope(entries_of("entry-hash-mismatch")),
            _status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/gap",
            "The entries of invalid_chains 'gap', validly signed.",
            envelope(entries_of("gap")),
            _status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/sequence-zero",
            "The entries of invalid_chains 'sequence-zero' (header.sequence 2), validly signed.",
            envelope(entries_of("sequence-zero")),
            _status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/wrong-batch-direction",
            "Entries 1 to 5 signed by the custodian in a batch whose direction field says 2 "
            "(exchange -> custodian), received on the custodian -> exchange stream.",
            envelope(c2e[:5], batch_direction=_E2C),
            _status("KEY_ROLE_MISMATCH"),
        ),
        case(
            "custodian-to-exchange/header-sequence-not-last",
            "Entries 1 to 5 with header.sequence 4: it must be the last entry's sequence.",
            envelope(c2e[:5], header_sequence=4),
            _status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/over-window",
            "Entries 1 to 5 for a receiver whose window is 4 entries.",
            envelope(c2e[:5]),
            _status("LIMIT_EXCEEDED"),
            max_entries=4,
        ),
        case(
            "custodian-to-exchange/sequence-beyond-2^63-1",
            "Entries 2^63 - 1 and 2^63, chained and hashed correctly: 2^63 is beyond the "
            "largest integer the protocol carries (section 2.4).",
            envelope(beyond),
            _status("OUT_OF_RANGE"),
        ),
    ]


def _sync_file(keys: dict[str, _Key]) -> dict[str, Any]:
    custodian_updates = _custodian_updates()
    genesis = _chain(_C2E, custodian_updates)
    fork = _chain(_C2E, _custodian_updates(fork=True))
    assert genesis[:2] == fork[:2]
    assert genesis[2].hash != fork[2].hash
    e2c = _chain(_E2C, _exchange_updates(keys["exchange"].key))
    chains = [
        _chain_vector(
            "custodian-to-exchange/genesis",
            "Entries 1 to 5 of a custodian -> exchange log, from 32 zero bytes.",
            _C2E,
            genesis[:5],
        ),
        _chain_vector(
            "custodian-to-exchange/continuation",
            "Entries 6 to 8 of the same log: the first prev_entry_hash is entry 5's hash.",
            _C2E,
            genesis[5:8],
        ),
        _chain_vector(
            "custodian-to-exchange/fork",
            "Another history of the same log: entries 1 and 2 equal the genesis chain's, "
            "entry 3's update differs, and so every hash from entry 3 on.",
            _C2E,
            fork[:5],
        ),
        _chain_vector(
            "exchange-to-custodian/genesis",
            "Entries 1 to 4 of an exchange -> custodian log, from 32 zero bytes; each update "
            "carries a statement signed by the exchange.",
            _E2C,
            e2c,
        ),
    ]
    sync_keys = [keys["custodian"], keys["exchange"]]
    registry = KeyRegistry(k.party_key() for k in sync_keys)
    return {
        "description": (
            "Position-sync entries (docs/PROTOCOL.md section 6). entry_hash = SHA-256("
            "'collateral-sync/v1/sync-entry' || 0x00 || u8(direction) || u64be(sequence) || "
            "prev_entry_hash || update). 'entry_hash' and 'chains' must be reproduced; "
            "'invalid_entry_hash' and 'invalid_chains' must be refused (section 6.5 steps 1 "
            "and 2); 'receiving' checks a chain against the receiver's stored log (section 6.5 "
            "steps 3 and 4); 'batches' are signed SyncBatch envelopes to verify as a whole."
        ),
        "entry_hash_prefix_hex": (_SYNC_ENTRY_DOMAIN + b"\x00").hex(),
        "zero_hash_hex": _ZERO_HASH.hex(),
        "entry_hash": _entry_hash_vectors(genesis),
        "invalid_entry_hash": _invalid_entry_hash_vectors(genesis),
        "chains": chains,
        "invalid_chains": _invalid_chain_vectors(genesis, e2c),
        "receiving": _receiving_vectors({"genesis": genesis, "fork": fork, "exchange": e2c}),
        "max_skew_seconds": MAX_SKEW_SECONDS,
        "registry": json_format.MessageToDict(registry.to_proto()),
        "signing_keys": [
            {
                "name": k.name,
                "party_id": k.key.party_id,
                "role": common_pb2.PartyRole.Name(k.key.role),  # type: ignore[arg-type]
                "seed_hex": k.key.seed.hex(),
                "key_id": k.key.key_id,
            }
            for k in sync_keys
        ],
        "batches": _sync_batch_vectors(keys, genesis, e2c),
    }


# --- file 7: position trees -------------------------------------------------------------

#: §10.3: 32 ASCII bytes and one zero byte.
_POSITION_LEAF_PREFIX = b"collateral-sync/v1/position-leaf\x00"

#: One position as given to a tree: asset_id, quantity, locked_quantity, pledged_quantity
#: (None: the Decimal is absent).
_TreePosition = tuple[str, str | None, str | None, str | None]


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def _position_leaf(account_id: str, positions: Sequence[_TreePosition]) -> bytes:
    """The leaf bytes of §10.3, written from the specification (not the SDK's position_leaf)."""
    ordered = sorted(positions, key=lambda p: p[0].encode("utf-8"))
    parts = [
        _POSITION_LEAF_PREFIX,
        _length_prefixed(account_id),
        len(ordered).to_bytes(4, "big"),
    ]
    for position in ordered:
        parts.extend(_length_prefixed(text) for text in position if text is not None)
    return b"".join(parts)


def _tree_accounts(accounts: Sequence[tuple[str, Sequence[_TreePosition]]]) -> list[Any]:
    return [
        {
            "account_id": account_id,
            "positions": [
                {
                    "asset_id": asset_id,
                    "quantity": quantity,
                    "locked_quantity": locked,
                    "pledged_quantity": pledged,
                }
                for asset_id, quantity, locked, pledged in positions
            ],
        }
        for account_id, positions in accounts
    ]


def _tree_vector(
    vector_id: str, description: str, accounts: Sequence[tuple[str, Sequence[_TreePosition]]]
) -> dict[str, Any]:
    ordered = sorted(accounts, key=lambda a: a[0].encode("utf-8"))
    leaves = [_position_leaf(account_id, positions) for account_id, positions in ordered]
    if leaves:
        tree = InmemoryTree()
        tree.append_entries(leaves)
        root = bytes(tree.get_root(len(leaves)))
    else:
        root = merkle.empty_root()
    return {
        "id": vector_id,
        "description": description,
        "accounts": _tree_accounts(accounts),
        "leaves": [
            {
                "account_id": account_id,
                "leaf_hex": leaf.hex(),
                "leaf_hash_hex": hashlib.sha256(b"\x00" + leaf).hexdigest(),
            }
            for (account_id, _), leaf in zip(ordered, leaves, strict=True)
        ],
        "account_count": len(leaves),
        "root_hex": root.hex(),
    }


def _position_trees() -> list[dict[str, Any]]:
    pledged = ("BENJI", "1000000", "0", "1000000")
    return [
        _tree_vector("empty", "No accounts: the root is SHA-256 of the empty string.", []),
        _tree_vector(
            "one-account",
            "One account with one position.",
            [("acct-0001", [pledged])],
        ),
        _tree_vector(
            "one-account-no-positions",
            "One account with no positions: its count is 0.",
            [("acct-0002", [])],
        ),
        _tree_vector(
            "several-accounts",
            "Five accounts given out of order, with assets out of order and amounts of uneven "
            "lengths; asset ids sort bytewise, so upper case before lower case.",
            [
                (
                    "acct-0010",
                    [
                        ("usdc.e", "7", "0", "7"),
                        ("ETH", "12.5", "2.25", "10"),
                        ("BTC", "0.5", "0", "0.5"),
                        ("USDC", "123456789012345678901234567890.25", "0", "0"),
                    ],
                ),
                ("acct-0003", [("USDC", "500000.25", "0", "400000"), pledged]),
                (
                    "acct-0001",
                    [("BENJI", "0.000000000000000001", "0", "0.000000000000000001")],
                ),
                ("acct-0002", [("USDC", "0", "0", "0")]),
                ("acct-0004", []),
            ],
        ),
        _tree_vector(
            "utf8-order",
            "Non-ASCII ids sort by their UTF-8 bytes (code point order), which differs from "
            "UTF-16 code unit order for characters beyond U+FFFF: acct-z < acct-\u00e9 < "
            "acct-\uff21 < acct-\U0001f600, and asset \uffe5 < \U0001f4b5.",
            [
                ("acct-\U0001f600", [("\U0001f4b5", "2", "1", "1"), ("\uffe5", "3", "0", "3")]),
                ("acct-\uff21", [pledged]),
                ("acct-\u00e9", [("\u20ac", "1.5", "0", "1.5")]),
                ("acct-z", [pledged]),
            ],
        ),
        _tree_vector(
            "long-fields",
            "An account id of 200 bytes, an asset id of 130 bytes and an amount of 79 "
            "characters: the length prefixes are 000000c8, 00000082 and 0000004f.",
            [
                ("acct-" + "x" * 195, [("A" * 130, "9" * 60 + "." + "9" * 18, "0", "1")]),
                ("acct-0001", [pledged]),
                ("acct-0002", [pledged]),
            ],
        ),
    ]


def _invalid_position_trees() -> list[dict[str, Any]]:
    def case(
        vector_id: str,
        clause: str,
        description: str,
        reason: str,
        positions: Sequence[_TreePosition] = (),
        *,
        accounts: Sequence[tuple[str, Sequence[_TreePosition]]] | None = None,
    ) -> dict[str, Any]:
        given = [("acct-0001", positions)] if accounts is None else accounts
        return {
            "id": vector_id,
            "clause": clause,
            "description": description,
            "accounts": _tree_accounts([("acct-0000", [("BENJI", "1", "0", "1")]), *given]),
            "expected": _status(reason),
        }

    return [
        case(
            "non-canonical-quantity",
            "§2.1",
            "quantity '1.50' (trailing zero).",
            "INVALID_AMOUNT",
            [("BENJI", "1.50", "0", "1.5")],
        ),
        case(
            "negative-locked-quantity",
            "§2.2",
            "locked_quantity '-1': quantities are non-negative.",
            "INVALID_AMOUNT",
            [("BENJI", "2", "-1", "2")],
        ),
        case(
            "negative-zero",
            "§2.1",
            "pledged_quantity '-0'.",
            "INVALID_AMOUNT",
            [("BENJI", "2", "0", "-0")],
        ),
        case(
            "exponent",
            "§2.1",
            "quantity '1e3'.",
            "INVALID_AMOUNT",
            [("BENJI", "1e3", "0", "0")],
        ),
        case(
            "nineteen-fraction-digits",
            "§2.1",
            "pledged_quantity with 19 fraction digits.",
            "INVALID_AMOUNT",
            [("BENJI", "1", "0", "0.0000000000000000001")],
        ),
        case(
            "empty-amount",
            "§2.1",
            "locked_quantity '' (a present Decimal with an empty value).",
            "INVALID_AMOUNT",
            [("BENJI", "1", "", "1")],
        ),
        case(
            "absent-amount",
            "§2.1",
            "locked_quantity null: the Decimal is absent.",
            "MALFORMED",
            [("BENJI", "1", None, "1")],
        ),
        case(
            "duplicate-asset",
            "§10.3",
            "Two positions in BENJI in one account.",
            "MALFORMED",
            [("BENJI", "1", "0", "1"), ("USDC", "2", "0", "2"), ("BENJI", "3", "0", "3")],
        ),
        case(
            "duplicate-account",
            "§10.3",
            "acct-0001 given twice (with different positions).",
            "MALFORMED",
            accounts=[
                ("acct-0001", [("BENJI", "1", "0", "1")]),
                ("acct-0002", [("BENJI", "1", "0", "1")]),
                ("acct-0001", [("USDC", "1", "0", "1")]),
            ],
        ),
        case(
            "empty-account-id",
            "§10.3",
            "An account id that is the empty string.",
            "MALFORMED",
            accounts=[("", [("BENJI", "1", "0", "1")])],
        ),
        case(
            "empty-asset-id",
            "§10.3",
            "An asset id that is the empty string.",
            "MALFORMED",
            [("", "1", "0", "1")],
        ),
        case(
            "account-id-not-utf8",
            "§10.3",
            "An account id holding a lone surrogate (U+D800), which has no UTF-8 encoding.",
            "MALFORMED",
            accounts=[("acct-\ud800", [("BENJI", "1", "0", "1")])],
        ),
    ]


def _position_tree_file() -> dict[str, Any]:
    return {
        "description": (
            "Position trees (docs/PROTOCOL.md section 10.3). Each account's leaf is "
            "'collateral-sync/v1/position-leaf' || 0x00 || LP(account_id) || "
            "u32be(number of positions) || for each position, sorted bytewise by the UTF-8 of "
            "asset_id: LP(asset_id) || LP(quantity) || LP(locked_quantity) || "
            "LP(pledged_quantity), with LP(x) = u32be(byte length of x) || UTF-8 of x; the "
            "root is the RFC 9162 tree head over the leaves, accounts sorted bytewise by the "
            "UTF-8 of account_id. 'trees' give accounts in any order and the leaves in tree "
            "order; every 'invalid' input must be refused with its reason."
        ),
        "leaf_prefix_hex": _POSITION_LEAF_PREFIX.hex(),
        "trees": _position_trees(),
        "invalid": _invalid_position_trees(),
    }


# --- assembly ---------------------------------------------------------------------

#: File names written under vectors/, in the order they are built.
VECTOR_FILES = (
    "keys.json",
    "pae.json",
    "statements.json",
    "merkle.json",
    "amounts.json",
    "sync.json",
    "position_tree.json",
)


def _document(kind: str, body: dict[str, Any]) -> str:
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "protocol": PROTOCOL,
        "kind": kind,
        "generator": GENERATOR,
        **body,
    }
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def build_vectors() -> dict[str, str]:
    """Every vector file's name and exact text, generated in memory."""
    keys = _keys()
    merkle_body = _merkle_file()
    checkpoint_root = bytes.fromhex(
        next(t["root_hex"] for t in merkle_body["trees"] if t["tree_size"] == 1000)
    )
    bodies = {
        "keys.json": ("keys", _keys_file()),
        "pae.json": ("pae", _pae_file()),
        "statements.json": ("statements", _statements_file(keys, checkpoint_root)),
        "merkle.json": ("merkle", merkle_body),
        "amounts.json": ("amounts", _amounts_file()),
        "sync.json": ("sync", _sync_file(keys)),
        "position_tree.json": ("position_tree", _position_tree_file()),
    }
    assert tuple(bodies) == VECTOR_FILES
    return {name: _document(kind, body) for name, (kind, body) in bodies.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if vectors/ differs from the generator"
    )
    parser.add_argument("--out", type=Path, default=VECTORS_DIR, help="output directory")
    args = parser.parse_args(argv)
    files = build_vectors()
    out: Path = args.out
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != text
        ]
        if stale:
            print(f"stale test vectors in {out}: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
