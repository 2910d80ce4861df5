"""What every vector file shares, and the helpers the file builders have in common.

The file header (format, version, protocol, kind, generator) and the JSON text of a
file; the status each ErrorReason maps to; the parties, fixed times and deterministic
Ed25519 keys; protobuf helpers for timestamps, decimals, statement headers and
envelopes signed over PAE; an envelope as JSON with hex bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from collateral_sync.keys import SigningKey
from collateral_sync.signing import pae
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import common_pb2, envelope_pb2, keys_pb2
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

__all__ = [
    "CLIENT_ID",
    "CUSTODIAN_ID",
    "EXCHANGE_ID",
    "FORMAT",
    "FORMAT_VERSION",
    "GENERATOR",
    "ISSUED",
    "KEYS_VALID_FROM",
    "LOG_ORIGIN",
    "MAX_SKEW_SECONDS",
    "NOW",
    "OLD_KEY_VALID_FROM",
    "PROTOCOL",
    "REGULATOR_ID",
    "REVOCATION_TIME",
    "ROTATION_TIME",
    "TTL",
    "NamedKey",
    "decimal",
    "deterministic_keys",
    "envelope_json",
    "file_text",
    "raw_envelope",
    "rfc3339",
    "seed_from",
    "statement_envelope",
    "statement_header",
    "status",
    "timestamp",
]


# --- the file header -------------------------------------------------------------

FORMAT = "collateral-sync-test-vectors"
FORMAT_VERSION = 1
PROTOCOL = "collateral_sync.v1"
GENERATOR = "scripts/make_vectors.py"


def file_text(kind: str, body: dict[str, Any]) -> str:
    """A vector file's exact text: the header every file shares, then its body."""
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "protocol": PROTOCOL,
        "kind": kind,
        "generator": GENERATOR,
        **body,
    }
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


# --- reasons and statuses ---------------------------------------------------------

# The status each reason maps to (docs/PROTOCOL.md §12), written out here so a
# change to the SDK's table cannot silently change the vectors.
_STATUS = {
    "MALFORMED": "INVALID_ARGUMENT",
    "INVALID_AMOUNT": "INVALID_ARGUMENT",
    "PAYLOAD_TYPE_MISMATCH": "INVALID_ARGUMENT",
    "TOO_LARGE": "RESOURCE_EXHAUSTED",
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

_ROLE = common_pb2.PartyRole
_CUSTODIAN = _ROLE.PARTY_ROLE_CUSTODIAN
_EXCHANGE = _ROLE.PARTY_ROLE_EXCHANGE
_REGULATOR = _ROLE.PARTY_ROLE_REGULATOR
_CLIENT = _ROLE.PARTY_ROLE_CLIENT

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


def seed_from(start: int) -> bytes:
    """The 32 consecutive bytes from ``start``: the seed of a deterministic key."""
    return bytes(range(start, start + 32))


@dataclass(frozen=True)
class NamedKey:
    """A signing key of the vectors: its name, and its entry in the registry (if any)."""

    name: str
    key: SigningKey
    registered: bool
    valid_from: datetime
    valid_until: datetime | None = None
    revoked_at: datetime | None = None

    def party_key(self) -> keys_pb2.PartyKey:
        entry = self.key.party_key(self.valid_from, self.valid_until)
        if self.revoked_at is not None:
            entry.revoked_at.CopyFrom(timestamp(self.revoked_at))
        return entry


def deterministic_keys() -> dict[str, NamedKey]:
    """The signing keys of statements.json and sync.json, by name, from fixed seeds."""

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
    ) -> NamedKey:
        return NamedKey(
            name,
            SigningKey.from_seed(seed_from(start), party, role),
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


# --- protobuf and hex helpers -----------------------------------------------------


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def rfc3339(value: datetime) -> str:
    return timestamp(value).ToJsonString()


def status(reason: str) -> dict[str, Any]:
    """The expected outcome of a vector that must fail with ``reason``."""
    return {"valid": False, "reason": reason, "grpc_status": _STATUS[reason]}


def decimal(text: str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=text)


def statement_header(
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
    header.issued_at.CopyFrom(timestamp(issued_at))
    header.expires_at.CopyFrom(timestamp(expires_at))
    return header


def raw_envelope(
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


def statement_envelope(
    message: Message, header: envelope_pb2.StatementHeader, signers: Iterable[SigningKey]
) -> envelope_pb2.Envelope:
    message.header.CopyFrom(header)  # type: ignore[attr-defined]
    payload = message.SerializeToString(deterministic=True)
    return raw_envelope(payload, payload_type_of(message), signers)


def envelope_json(envelope: envelope_pb2.Envelope) -> dict[str, Any]:
    return {
        "payload_type": envelope.payload_type,
        "payload_hex": envelope.payload.hex(),
        "signatures": [
            {"key_id": s.key_id, "sig_hex": s.sig.hex()} for s in envelope.signatures
        ],
    }
