"""vectors/sync.json: sync-entry hashes, chains, receiving and signed batches.

Checked with hashing and chain checks written from docs/PROTOCOL.md §6.3-§6.5, and with
the SDK's entry_hash, verify_sync_batch and SyncLog (on SQLite).
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.sync import SyncLog, VerifiedSyncBatch, verify_sync_batch
from collateral_sync.sync import entry_hash as sync_entry_hash
from collateral_sync.v1 import common_pb2, envelope_pb2, keys_pb2, position_sync_pb2
from google.protobuf import json_format

from ._common import envelope_of, ids_of, load, own_pae, own_verify

SYNC = load("sync.json")


_SYNC_PREFIX = b"collateral-sync/v1/sync-entry\x00"
_SYNC_PARTIES = {
    1: ("custodian.example", "exchange.example"),
    2: ("exchange.example", "custodian.example"),
}


def test_sync_vectors_cover_what_the_spec_requires() -> None:
    assert bytes.fromhex(SYNC["entry_hash_prefix_hex"]) == _SYNC_PREFIX
    assert len(_SYNC_PREFIX) == 30  # 29 ASCII bytes and a zero byte (§6.3)
    assert bytes.fromhex(SYNC["zero_hash_hex"]) == bytes(32)
    assert {c["direction"] for c in SYNC["chains"]} == {1, 2}
    reasons = {v["expected"]["reason"] for v in SYNC["receiving"] if not v["expected"]["valid"]}
    assert reasons == {"SEQUENCE_GAP", "EQUIVOCATION"}
    batches = {v["expected"]["valid"] for v in SYNC["batches"]}
    assert batches == {True, False}


def _own_entry_hash(direction: int, sequence: int, prev: bytes, update: bytes) -> bytes:
    """§6.3, from the document alone."""
    return hashlib.sha256(
        _SYNC_PREFIX + bytes([direction]) + sequence.to_bytes(8, "big") + prev + update
    ).digest()


def _sync_entries(vector: dict[str, Any]) -> list[position_sync_pb2.SyncEntry]:
    return [
        position_sync_pb2.SyncEntry(
            sequence=e["sequence"],
            prev_entry_hash=bytes.fromhex(e["prev_entry_hash_hex"]),
            update=bytes.fromhex(e["update_hex"]),
            entry_hash=bytes.fromhex(e["entry_hash_hex"]),
        )
        for e in vector["entries"]
    ]


def _own_chain(direction: int, entries: Sequence[position_sync_pb2.SyncEntry]) -> str | None:
    """§6.3 and §6.5 steps 1-2 on a batch's entries, from the document; the reason or None."""
    if direction not in (1, 2) or not entries:
        return "MALFORMED"
    first = entries[0]
    if first.sequence < 1 or len(first.prev_entry_hash) != 32:
        return "MALFORMED"
    if first.sequence == 1 and first.prev_entry_hash != bytes(32):
        return "MALFORMED"
    prev = first.prev_entry_hash
    for offset, entry in enumerate(entries):
        if entry.sequence != first.sequence + offset or entry.prev_entry_hash != prev:
            return "MALFORMED"
        if entry.entry_hash != _own_entry_hash(direction, entry.sequence, prev, entry.update):
            return "MALFORMED"
        prev = entry.entry_hash
    return None


def _sync_signing_key(direction: int) -> SigningKey:
    role = "PARTY_ROLE_CUSTODIAN" if direction == 1 else "PARTY_ROLE_EXCHANGE"
    key = next(k for k in SYNC["signing_keys"] if k["role"] == role)
    return SigningKey.from_seed(
        bytes.fromhex(key["seed_hex"]), key["party_id"], common_pb2.PartyRole.Value(role)
    )


def _sync_registry() -> KeyRegistry:
    message = keys_pb2.KeyRegistry()
    json_format.ParseDict(SYNC["registry"], message)
    return KeyRegistry.from_proto(message)


_SYNC_NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def _sign_batch(
    direction: int, entries: Sequence[position_sync_pb2.SyncEntry]
) -> envelope_pb2.Envelope:
    """The entries as a batch signed by the sender of ``direction`` (§6.4), issued a minute ago."""
    _, receiver = _SYNC_PARTIES[direction]
    batch = position_sync_pb2.SyncBatch(direction=direction, entries=entries)  # type: ignore[arg-type]
    return sign_statement(
        batch,
        _sync_signing_key(direction),
        audience=[receiver],
        sequence=max(entries[-1].sequence, 1) if entries else 1,
        ttl=timedelta(hours=1),
        issued_at=_SYNC_NOW - timedelta(minutes=1),
    )


def _verify_batch(
    direction: int, envelope: envelope_pb2.Envelope, max_entries: int = 64
) -> VerifiedSyncBatch:
    sender, receiver = _SYNC_PARTIES[direction]
    return verify_sync_batch(
        envelope,
        _sync_registry(),
        receiver_party_id=receiver,
        sender_party_id=sender,
        direction=direction,
        now=_SYNC_NOW,
        max_entries=max_entries,
    )


@pytest.mark.parametrize("vector", SYNC["entry_hash"], ids=ids_of(SYNC["entry_hash"]))
def test_entry_hash_vector(vector: dict[str, Any]) -> None:
    direction, sequence = vector["direction"], vector["sequence"]
    prev = bytes.fromhex(vector["prev_entry_hash_hex"])
    update = bytes.fromhex(vector["update_hex"])
    expected = bytes.fromhex(vector["entry_hash_hex"])
    hash_input = bytes.fromhex(vector["hash_input_hex"])
    # Independent.
    assert hash_input == _SYNC_PREFIX + bytes([direction]) + sequence.to_bytes(8, "big") + (
        prev + update
    )
    assert hashlib.sha256(hash_input).digest() == expected
    assert _own_entry_hash(direction, sequence, prev, update) == expected
    # SDK.
    assert sync_entry_hash(direction, sequence, prev, update) == expected


@pytest.mark.parametrize("vector", SYNC["invalid_entry_hash"], ids=ids_of(SYNC["invalid_entry_hash"]))
def test_invalid_entry_hash_vector(vector: dict[str, Any]) -> None:
    with pytest.raises(CollateralSyncError) as sdk:
        sync_entry_hash(
            vector["direction"],
            vector["sequence"],
            bytes.fromhex(vector["prev_entry_hash_hex"]),
            bytes.fromhex(vector["update_hex"]),
        )
    assert sdk.value.reason_name == vector["expected"]["reason"]
    assert sdk.value.code.name == vector["expected"]["grpc_status"]


@pytest.mark.parametrize("vector", SYNC["chains"], ids=ids_of(SYNC["chains"]))
def test_sync_chain_vector(vector: dict[str, Any]) -> None:
    direction = vector["direction"]
    entries = _sync_entries(vector)
    assert position_sync_pb2.SyncDirection.Name(direction) == vector["direction_name"]
    # Independent.
    assert _own_chain(direction, entries) is None
    for entry, given in zip(entries, vector["entries"], strict=True):
        update = position_sync_pb2.PositionUpdate.FromString(entry.update)
        assert json_format.MessageToDict(update) == given["update_json"]
    assert entries[0].sequence == vector["first_sequence"]
    assert entries[0].prev_entry_hash.hex() == vector["first_prev_hash_hex"]
    assert entries[-1].sequence == vector["last_sequence"]
    assert entries[-1].entry_hash.hex() == vector["last_entry_hash_hex"]
    # SDK: every hash, and the chain as a signed batch.
    for entry in entries:
        assert (
            sync_entry_hash(direction, entry.sequence, entry.prev_entry_hash, entry.update)
            == entry.entry_hash
        )
    verified = _verify_batch(direction, _sign_batch(direction, entries))
    assert verified.first_sequence == vector["first_sequence"]
    assert verified.first_prev_hash.hex() == vector["first_prev_hash_hex"]
    assert verified.last_sequence == vector["last_sequence"]
    assert verified.last_entry_hash.hex() == vector["last_entry_hash_hex"]
    assert list(verified.entry_hashes) == [e.entry_hash for e in entries]


@pytest.mark.parametrize("vector", SYNC["invalid_chains"], ids=ids_of(SYNC["invalid_chains"]))
def test_invalid_sync_chain_vector(vector: dict[str, Any]) -> None:
    direction = vector["direction"]
    entries = _sync_entries(vector)
    expected = vector["expected"]
    assert _own_chain(direction, entries) == expected["reason"]
    envelope = _sign_batch(direction, entries)
    with pytest.raises(CollateralSyncError) as sdk:
        _verify_batch(direction, envelope)
    assert sdk.value.reason_name == expected["reason"], sdk.value.message
    assert sdk.value.code.name == expected["grpc_status"]


def _own_receive(vector: dict[str, Any]) -> dict[str, Any]:
    """§6.5 steps 3-4 from the document: the last duplicate, then the first new entry.

    Only the last sequence both logs hold is compared (and named), not the first entry
    that differs: the hash chain makes an earlier difference show there too.
    """
    log = vector["receiver_log"]
    stored: dict[int, str] = {}
    if log["entries_of"] is not None:
        chain = next(c for c in SYNC["chains"] if c["id"] == log["entries_of"])
        stored = {e["sequence"]: e["entry_hash_hex"] for e in chain["entries"]}
    head, head_hash = log["sequence"], log["entry_hash_hex"]
    duplicates = [e for e in vector["entries"] if e["sequence"] <= head]
    if duplicates and duplicates[-1]["entry_hash_hex"] != stored[duplicates[-1]["sequence"]]:
        shared = duplicates[-1]["sequence"]
        return {
            "reason": "EQUIVOCATION",
            "metadata": {
                "sequence": str(shared),
                "expected": stored[shared],
                "actual": duplicates[-1]["entry_hash_hex"],
            },
        }
    new: list[dict[str, Any]] = []
    for entry in vector["entries"]:
        sequence = entry["sequence"]
        if sequence <= head:
            continue
        if not new:
            if sequence > head + 1:
                return {
                    "reason": "SEQUENCE_GAP",
                    "metadata": {"expected": str(head + 1), "actual": str(sequence)},
                }
            if entry["prev_entry_hash_hex"] != head_hash:
                return {
                    "reason": "EQUIVOCATION",
                    "metadata": {
                        "sequence": str(head),
                        "expected": head_hash,
                        "actual": entry["prev_entry_hash_hex"],
                    },
                }
        new.append(entry)
    last = new[-1] if new else None
    return {
        "valid": True,
        "new_sequences": [e["sequence"] for e in new],
        "head_sequence": head if last is None else last["sequence"],
        "head_entry_hash_hex": head_hash if last is None else last["entry_hash_hex"],
    }


@pytest.mark.parametrize("vector", SYNC["receiving"], ids=ids_of(SYNC["receiving"]))
def test_sync_receiving_vector(vector: dict[str, Any], tmp_path: Path) -> None:
    direction = vector["direction"]
    expected = vector["expected"]
    sender, receiver = _SYNC_PARTIES[direction]
    # Independent.
    own = _own_receive(vector)
    if expected["valid"]:
        assert own == expected
    else:
        assert own == {"reason": expected["reason"], "metadata": expected["metadata"]}
    # SDK: a receiver's SyncLog holding the stored entries, then the vector's entries.
    connection = sqlite3.connect(tmp_path / "receiver.sqlite", isolation_level=None)
    try:
        log = SyncLog(
            connection,
            party_id=receiver,
            peer_party_id=sender,
            sending_direction=3 - direction,
        )
        applied: list[int] = []

        def apply(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
            applied.extend(sequence for sequence, _ in updates)

        stored = vector["receiver_log"]
        if stored["sequence"]:
            chain = next(c for c in SYNC["chains"] if c["id"] == stored["entries_of"])
            prefix = _sync_entries(chain)[: stored["sequence"]]
            log.accept_batch(
                _verify_batch(direction, _sign_batch(direction, prefix)), apply, now=_SYNC_NOW
            )
        assert log.received_head().sequence == stored["sequence"]
        assert log.received_head().entry_hash.hex() == stored["entry_hash_hex"]
        applied.clear()
        batch = _verify_batch(direction, _sign_batch(direction, _sync_entries(vector)))
        if expected["valid"]:
            head = log.accept_batch(batch, apply, now=_SYNC_NOW)
            assert applied == expected["new_sequences"]
            assert head.sequence == expected["head_sequence"]
            assert head.entry_hash.hex() == expected["head_entry_hash_hex"]
        else:
            with pytest.raises(CollateralSyncError) as sdk:
                log.accept_batch(batch, apply, now=_SYNC_NOW)
            assert sdk.value.reason_name == expected["reason"]
            assert sdk.value.code.name == expected["grpc_status"]
            for key, value in expected["metadata"].items():
                assert sdk.value.metadata[key] == value
            assert applied == []
            assert log.received_head().sequence == stored["sequence"]
    finally:
        connection.close()


def _batch_envelope(vector: dict[str, Any]) -> envelope_pb2.Envelope:
    return envelope_of(vector)


@pytest.mark.parametrize("vector", SYNC["batches"], ids=ids_of(SYNC["batches"]))
def test_sync_batch_vector(vector: dict[str, Any]) -> None:
    envelope = _batch_envelope(vector)
    assert envelope_pb2.Envelope.FromString(bytes.fromhex(vector["envelope_hex"])) == envelope
    assert envelope.payload_type == "application/vnd.collateral-sync.v1.sync-batch+proto"
    # Every envelope is validly signed by the sender's registered key: the failures are in
    # the batch, not in the signature.
    registry = {k["keyId"]: base64.b64decode(k["publicKey"]) for k in SYNC["registry"]["keys"]}
    (signature,) = envelope.signatures
    assert own_verify(
        registry[signature.key_id],
        own_pae(envelope.payload_type, envelope.payload),
        signature.sig,
    )
    expected = vector["expected"]
    arguments: dict[str, Any] = {
        "receiver_party_id": vector["receiver_party_id"],
        "sender_party_id": vector["sender_party_id"],
        "direction": vector["direction"],
        "now": datetime.fromisoformat(vector["now"]),
        "max_entries": vector["max_entries"],
        "max_skew": timedelta(seconds=SYNC["max_skew_seconds"]),
    }
    if expected["valid"]:
        verified = verify_sync_batch(envelope, _sync_registry(), **arguments)
        assert verified.first_sequence == expected["first_sequence"]
        assert verified.first_prev_hash.hex() == expected["first_prev_hash_hex"]
        assert verified.last_sequence == expected["last_sequence"]
        assert verified.last_entry_hash.hex() == expected["last_entry_hash_hex"]
        assert [h.hex() for h in verified.entry_hashes] == expected["entry_hashes"]
        batch = position_sync_pb2.SyncBatch.FromString(envelope.payload)
        assert _own_chain(vector["direction"], list(batch.entries)) is None
    else:
        with pytest.raises(CollateralSyncError) as sdk:
            verify_sync_batch(envelope, _sync_registry(), **arguments)
        assert sdk.value.reason_name == expected["reason"], sdk.value.message
        assert sdk.value.code.name == expected["grpc_status"]
