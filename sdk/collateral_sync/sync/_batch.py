"""Position sync, wire side: entry hashes, log heads, batch verification, equivocation evidence.

Public names are re-exported by :mod:`collateral_sync.sync`, which documents
the protocol; this module holds the pure checks on what travels between the
parties, and :mod:`collateral_sync.sync._log` stores what passes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from google.protobuf.message import DecodeError

from collateral_sync.errors import CollateralSyncError, MalformedError, VerificationError
from collateral_sync.keys import KeyRegistry, role_name
from collateral_sync.signing import DEFAULT_MAX_SKEW, VerifiedStatement, verify_statement
from collateral_sync.v1 import common_pb2, envelope_pb2, errors_pb2, position_sync_pb2

__all__ = [
    "CUSTODIAN_TO_EXCHANGE",
    "ENTRY_HASH_DOMAIN",
    "EXCHANGE_TO_CUSTODIAN",
    "HASH_SIZE",
    "ZERO_HASH",
    "EquivocationEvidence",
    "LogHead",
    "VerifiedSyncBatch",
    "direction_name",
    "entry_hash",
    "verify_sync_batch",
]

_R = errors_pb2.ErrorReason
_ROLE = common_pb2.PartyRole

CUSTODIAN_TO_EXCHANGE: int = position_sync_pb2.SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE
EXCHANGE_TO_CUSTODIAN: int = position_sync_pb2.SYNC_DIRECTION_EXCHANGE_TO_CUSTODIAN

ENTRY_HASH_DOMAIN = b"collateral-sync/v1/sync-entry"
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)

_MAX_SEQUENCE = 2**63 - 1  # SQLite INTEGER

_SENDER_ROLE = {
    CUSTODIAN_TO_EXCHANGE: _ROLE.PARTY_ROLE_CUSTODIAN,
    EXCHANGE_TO_CUSTODIAN: _ROLE.PARTY_ROLE_EXCHANGE,
}
# PositionUpdate variants allowed in each direction (docs/PROTOCOL.md §6.8).
_VARIANTS = {
    CUSTODIAN_TO_EXCHANGE: frozenset(
        {
            "holdings_change",
            "pledge_change",
            "yield_accrual",
            "liquidation_receipt",
            "margin_call_response",
        }
    ),
    EXCHANGE_TO_CUSTODIAN: frozenset(
        {"credit_line", "margin_call", "liquidation_instruction", "risk_policy"}
    ),
}
# The hash input starts with the same 31 bytes for every entry of a direction.
_PREFIX = {d: ENTRY_HASH_DOMAIN + b"\x00" + bytes([d]) for d in _SENDER_ROLE}


def direction_name(direction: int) -> str:
    """Enum name of a SyncDirection value, or the number if it is not one."""
    try:
        return position_sync_pb2.SyncDirection.Name(direction)  # type: ignore[arg-type]
    except ValueError:
        return str(direction)


def _check_direction(direction: int) -> None:
    if direction not in _PREFIX:
        raise MalformedError(
            f"direction must be CUSTODIAN_TO_EXCHANGE (1) or EXCHANGE_TO_CUSTODIAN (2), "
            f"got {direction_name(direction)}",
            metadata={"expected": "1|2", "actual": str(direction)},
        )


def entry_hash(direction: int, sequence: int, prev_entry_hash: bytes, update: bytes) -> bytes:
    """SHA-256 of one sync-log entry (docs/PROTOCOL.md §6.3).

    ``H("collateral-sync/v1/sync-entry" || 0x00 || u8(direction) ||
    u64be(sequence) || prev_entry_hash || update)``, with ``update`` the
    serialised PositionUpdate exactly as sent or received.
    """
    _check_direction(direction)
    if not 1 <= sequence < 2**64:
        raise MalformedError(
            f"sequence must be in 1..2^64-1, got {sequence}",
            metadata={"expected": "1..2^64-1", "actual": str(sequence)},
        )
    if len(prev_entry_hash) != HASH_SIZE:
        raise MalformedError(
            f"prev_entry_hash must be {HASH_SIZE} bytes, got {len(prev_entry_hash)}",
            metadata={"expected": str(HASH_SIZE), "actual": str(len(prev_entry_hash))},
        )
    return hashlib.sha256(
        _PREFIX[direction] + sequence.to_bytes(8, "big") + prev_entry_hash + update
    ).digest()


class LogHead(NamedTuple):
    """The last entry of a log: its sequence and entry hash (0 and 32 zero bytes if empty)."""

    sequence: int
    entry_hash: bytes


# --- batch verification ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedSyncBatch:
    """A SyncBatch whose envelope, sender, direction and hash chain checked out.

    Says nothing yet about how it fits the receiver's log (duplicates, gaps,
    equivocation): that is :meth:`SyncLog.accept_batch`.
    """

    statement: VerifiedStatement[position_sync_pb2.SyncBatch]
    direction: int
    first_sequence: int
    #: prev_entry_hash of the first entry.
    first_prev_hash: bytes
    #: entry_hash of each entry, in order (sequence first_sequence + i).
    entry_hashes: tuple[bytes, ...]
    #: Serialised PositionUpdate of each entry, as received.
    updates: tuple[bytes, ...]

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + len(self.entry_hashes) - 1

    @property
    def last_entry_hash(self) -> bytes:
        return self.entry_hashes[-1]


def verify_sync_batch(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    receiver_party_id: str,
    sender_party_id: str,
    direction: int,
    now: datetime,
    max_entries: int,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
) -> VerifiedSyncBatch:
    """Verify a received sync batch (docs/PROTOCOL.md §6.5 steps 1 and 2).

    In order: the envelope as a ``sync-batch`` statement addressed to
    ``receiver_party_id`` and fresh at ``now`` (signing stages a to f); the issuer
    is ``sender_party_id``, its key's role and the batch direction match
    ``direction`` (KEY_ROLE_MISMATCH); at most ``max_entries`` entries
    (LIMIT_EXCEEDED: the receiver's window); then the entries: non-empty,
    consecutive, every hash 32 bytes, chained, a sequence-1 entry chained to
    32 zero bytes, every ``entry_hash`` recomputed, and ``header.sequence``
    the last entry's sequence (MALFORMED).
    """
    _check_direction(direction)
    statement = verify_statement(
        envelope,
        registry,
        expected_type=position_sync_pb2.SyncBatch,
        audience=receiver_party_id,
        now=now,
        max_skew=max_skew,
    )
    batch = statement.message
    if statement.issuer != sender_party_id:
        raise VerificationError(
            f"sync batch issued by {statement.issuer!r}, expected the peer {sender_party_id!r}",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": sender_party_id, "actual": statement.issuer},
        )
    signer = registry.get(statement.signer_key_ids[0])
    signer_role = _ROLE.PARTY_ROLE_UNSPECIFIED if signer is None else signer.role
    expected_role = _SENDER_ROLE[direction]
    if signer_role != expected_role:
        raise VerificationError(
            f"{direction_name(direction)} batches are signed by a {role_name(expected_role)} "
            f"key, got a {role_name(signer_role)} key",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": role_name(expected_role), "actual": role_name(signer_role)},
        )
    if batch.direction != direction:
        raise VerificationError(
            f"batch direction {direction_name(batch.direction)}, expected "
            f"{direction_name(direction)} on this stream",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": str(direction), "actual": str(batch.direction)},
            field_violations={"direction": f"must be {direction_name(direction)}"},
        )
    entries = batch.entries
    count = len(entries)
    if count == 0:
        raise MalformedError(
            "sync batch has no entries, expected at least 1",
            metadata={"expected": ">= 1", "actual": "0"},
            field_violations={"entries": "must not be empty"},
        )
    if count > max_entries:
        raise CollateralSyncError(
            f"sync batch of {count} entries exceeds the window of {max_entries}",
            reason=_R.ERROR_REASON_LIMIT_EXCEEDED,
            metadata={"expected": f"<= {max_entries}", "actual": str(count)},
        )
    first = entries[0]
    first_sequence = first.sequence
    last_sequence = first_sequence + count - 1
    if first_sequence < 1 or last_sequence > _MAX_SEQUENCE:
        raise MalformedError(
            f"entry sequences {first_sequence}..{last_sequence} are outside 1..{_MAX_SEQUENCE}",
            metadata={"expected": f"1..{_MAX_SEQUENCE}", "actual": str(first_sequence)},
            field_violations={"entries[0].sequence": "out of range"},
        )
    first_prev = first.prev_entry_hash
    if len(first_prev) != HASH_SIZE or (first_sequence == 1 and first_prev != ZERO_HASH):
        expected = "32 zero bytes" if first_sequence == 1 else f"{HASH_SIZE} bytes"
        raise MalformedError(
            f"entries[0].prev_entry_hash must be {expected}, got {first_prev.hex() or 'empty'}",
            metadata={"expected": expected, "actual": first_prev.hex()},
            field_violations={"entries[0].prev_entry_hash": f"must be {expected}"},
        )

    prefix = _PREFIX[direction]
    sha256 = hashlib.sha256
    hashes: list[bytes] = []
    updates: list[bytes] = []
    expected_sequence = first_sequence
    prev = first_prev
    for index, entry in enumerate(entries):
        sequence = entry.sequence
        if sequence != expected_sequence:
            raise MalformedError(
                f"entries[{index}].sequence {sequence}, expected {expected_sequence} (consecutive)",
                metadata={"expected": str(expected_sequence), "actual": str(sequence)},
                field_violations={f"entries[{index}].sequence": "must be consecutive"},
            )
        if entry.prev_entry_hash != prev:
            raise MalformedError(
                f"entries[{index}].prev_entry_hash does not chain to the previous entry",
                metadata={"expected": prev.hex(), "actual": entry.prev_entry_hash.hex()},
                field_violations={f"entries[{index}].prev_entry_hash": "must chain"},
            )
        claimed = entry.entry_hash
        if len(claimed) != HASH_SIZE:
            raise MalformedError(
                f"entries[{index}].entry_hash is {len(claimed)} bytes, expected {HASH_SIZE}",
                metadata={"expected": str(HASH_SIZE), "actual": str(len(claimed))},
                field_violations={f"entries[{index}].entry_hash": "must be 32 bytes"},
            )
        update = entry.update
        computed = sha256(prefix + sequence.to_bytes(8, "big") + prev + update).digest()
        if computed != claimed:
            raise MalformedError(
                f"entries[{index}] (sequence {sequence}): entry_hash does not match its content",
                metadata={"expected": computed.hex(), "actual": claimed.hex()},
                field_violations={f"entries[{index}].entry_hash": "must be the entry's hash"},
            )
        hashes.append(claimed)
        updates.append(update)
        prev = claimed
        expected_sequence += 1
    if batch.header.sequence != last_sequence:
        raise MalformedError(
            f"header.sequence {batch.header.sequence}, expected the last entry's "
            f"sequence {last_sequence}",
            metadata={"expected": str(last_sequence), "actual": str(batch.header.sequence)},
            field_violations={"header.sequence": "must be the last entry's sequence"},
        )
    return VerifiedSyncBatch(
        statement=statement,
        direction=direction,
        first_sequence=first_sequence,
        first_prev_hash=first_prev,
        entry_hashes=tuple(hashes),
        updates=tuple(updates),
    )


def _parse_updates(
    direction: int, first_sequence: int, updates: Sequence[bytes]
) -> list[tuple[int, position_sync_pb2.PositionUpdate]]:
    """Parse updates and check each carries a variant allowed in ``direction`` (§6.8)."""
    allowed = _VARIANTS[direction]
    parsed: list[tuple[int, position_sync_pb2.PositionUpdate]] = []
    sequence = first_sequence
    for data in updates:
        update = _parse_update(data, sequence)
        variant = update.WhichOneof("update")
        if variant not in allowed:
            raise _variant_error(direction, sequence, variant)
        parsed.append((sequence, update))
        sequence += 1
    return parsed


def _parse_update(data: bytes, sequence: int) -> position_sync_pb2.PositionUpdate:
    try:
        return position_sync_pb2.PositionUpdate.FromString(data)
    except DecodeError as err:
        raise MalformedError(
            f"entry {sequence}: update does not parse as PositionUpdate: {err}",
            metadata={"expected": "PositionUpdate", "actual": "undecodable bytes"},
        ) from err


def _variant_error(direction: int, sequence: int, variant: str | None) -> MalformedError:
    allowed = _VARIANTS[direction]
    return MalformedError(
        f"entry {sequence}: update variant {variant or 'unset'!r} is not allowed in "
        f"{direction_name(direction)}",
        metadata={"expected": "|".join(sorted(allowed)), "actual": variant or "unset"},
    )


# --- evidence -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EquivocationEvidence:
    """Two different entries claimed at one sequence of one log, as detected and kept.

    ``kind`` says where the conflict showed: ``"batch"`` (a received batch
    contradicts the stored log), ``"hello"`` or ``"ack"`` (the peer claims a
    hash of our own outgoing log that we never wrote).
    """

    kind: str
    direction: int
    sequence: int
    stored_entry_hash: bytes
    received_entry_hash: bytes
    #: Serialised Envelope (signed SyncBatch) that carried the stored entry;
    #: None for our own outgoing log, whose entries are not kept signed.
    stored_batch: bytes | None
    #: Serialised Envelope of the conflicting batch (kind "batch"), or the
    #: serialised SyncFrame of the hello or ack.
    received: bytes
    detected_at: datetime


def _equivocation_error(
    kind: str, direction: int, sequence: int, stored: bytes, received: bytes
) -> VerificationError:
    return VerificationError(
        f"equivocation in {direction_name(direction)} at sequence {sequence} ({kind}): "
        f"stored entry hash {stored.hex()}, peer's {received.hex()}",
        reason=_R.ERROR_REASON_EQUIVOCATION,
        metadata={"sequence": str(sequence), "expected": stored.hex(), "actual": received.hex()},
    )
