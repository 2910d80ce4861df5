"""Building statements the way a counterparty would, and deliberately breaking them.

The SDK's :func:`collateral_sync.signing.sign_statement` refuses to produce a
bad statement (a key of the wrong role, an audience of ``"*"`` on a private
type), as it should. The kit must send exactly such statements, so it builds
envelopes itself from the public pieces: the header, the payload bytes,
``PAE`` (:func:`collateral_sync.signing.pae`) and an Ed25519 key. Every knob
defaults to the correct value; a case changes the one it is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from collateral_sync.keys import SigningKey
from collateral_sync.signing import pae
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import envelope_pb2
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

__all__ = [
    "GROUP_ORDER",
    "corrupt_signature",
    "make_header",
    "malleate_signature",
    "seal",
    "timestamp",
    "unknown_field",
]


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    if value.tzinfo is None:
        raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def make_header(
    *,
    issuer: str,
    audience: Sequence[str],
    sequence: int,
    issued_at: datetime,
    expires_at: datetime,
    statement_id: str,
) -> envelope_pb2.StatementHeader:
    """A StatementHeader with exactly these values (nothing is checked)."""
    header = envelope_pb2.StatementHeader(
        issuer=issuer, audience=list(audience), sequence=sequence, statement_id=statement_id
    )
    header.issued_at.CopyFrom(timestamp(issued_at))
    header.expires_at.CopyFrom(timestamp(expires_at))
    return header


def seal(
    message: Message,
    signers: Sequence[SigningKey],
    *,
    payload_type: str | None = None,
    payload: bytes | None = None,
) -> envelope_pb2.Envelope:
    """An envelope of ``message`` signed by each of ``signers`` in order.

    ``payload_type`` defaults to the message's own type and ``payload`` to its
    deterministic serialisation; either may be replaced (the signatures then
    cover the replacement, as a sender of such bytes would sign them).
    """
    kind = payload_type if payload_type is not None else payload_type_of(message)
    body = payload if payload is not None else message.SerializeToString(deterministic=True)
    signed = pae(kind, body)
    return envelope_pb2.Envelope(
        payload=body,
        payload_type=kind,
        signatures=[envelope_pb2.Signature(key_id=s.key_id, sig=s.sign(signed)) for s in signers],
    )


def corrupt_signature(envelope: envelope_pb2.Envelope, index: int = 0) -> envelope_pb2.Envelope:
    """A copy with one bit of signature ``index`` flipped (same length, same key id)."""
    copy = envelope_pb2.Envelope()
    copy.CopyFrom(envelope)
    sig = bytearray(copy.signatures[index].sig)
    # A bit in R (the first half), so the S < L check of RFC 8032 cannot be what rejects it.
    sig[5] ^= 0x01
    copy.signatures[index].sig = bytes(sig)
    return copy


#: The order L of the Ed25519 base point (RFC 8032 §5.1): a signature's scalar S must be below it.
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493


def malleate_signature(envelope: envelope_pb2.Envelope, index: int = 0) -> envelope_pb2.Envelope:
    """A copy with signature ``index``'s scalar S replaced by S + L.

    The equation of Ed25519 holds for S + L exactly as for S, so a verifier that
    reduces S modulo L, or does not check S < L, accepts the copy; RFC 8032
    §5.1.7 step 1 (PROTOCOL.md §3.3) rejects it. S < L, so S + L < 2^253 still
    fits the 32 bytes.
    """
    copy = envelope_pb2.Envelope()
    copy.CopyFrom(envelope)
    sig = copy.signatures[index].sig
    scalar = int.from_bytes(sig[32:], "little") + GROUP_ORDER
    copy.signatures[index].sig = sig[:32] + scalar.to_bytes(32, "little")
    return copy


def unknown_field(number: int, size: int) -> bytes:
    """Wire bytes of a length-delimited field ``number`` holding ``size`` zero bytes.

    Appended to a payload it changes nothing a receiver may act on (unknown
    fields are ignored, §1.3) but makes the payload ``size`` bytes longer.
    """
    if not 1 <= number < 2**29:
        raise ValueError(f"field number must be in [1, 2**29), got {number}")
    return _varint(number << 3 | 2) + _varint(size) + bytes(size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
