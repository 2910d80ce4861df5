"""vectors/sync.json: position-sync entry hashes, chains and signed batches (§6).

Entry hashes with their SHA-256 input, hash chains in both directions (and a fork),
entries and chains that must be refused, a receiver's checks against its stored log,
and signed SyncBatch envelopes to verify as a whole. Hashes are computed here from the
specification, not with the SDK's entry_hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from collateral_sync import merkle
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message

from ._common import (
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    LOG_ORIGIN,
    MAX_SKEW_SECONDS,
    NOW,
    TTL,
    NamedKey,
    decimal,
    envelope_json,
    rfc3339,
    statement_envelope,
    statement_header,
    status,
    timestamp,
)
from .merkle import leaf

__all__ = ["sync_file"]


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
        leaf_hash=merkle.leaf_hash(leaf(leaf_index)),
        tree_size=leaf_index + 1,
    )


def _pledge_update(asset: str, pledged: str, leaf_index: int) -> bytes:
    change = position_sync_pb2.PledgeChange(
        account_id=_ACCOUNT,
        asset_id=asset,
        pledged_quantity=decimal(pledged),
        attestation=_attestation_ref(leaf_index),
    )
    return position_sync_pb2.PositionUpdate(pledge_change=change).SerializeToString(
        deterministic=True
    )


def _yield_update(asset: str, accrued: str, leaf_index: int) -> bytes:
    accrual = position_sync_pb2.YieldAccrual(
        account_id=_ACCOUNT,
        asset_id=asset,
        accrued_quantity=decimal(accrued),
        attestation=_attestation_ref(leaf_index),
    )
    accrual.accrual_time.CopyFrom(timestamp(ISSUED - timedelta(hours=leaf_index)))
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
    policy.effective_from.CopyFrom(timestamp(ISSUED))

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
            collateral_value=decimal(value),
            credit_limit=decimal(limit),
            exposure=decimal("0"),
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
            "expected": status("MALFORMED"),
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
            "expected": status("MALFORMED"),
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
        return status("SEQUENCE_GAP") | {
            "metadata": {"expected": str(expected), "actual": str(actual)}
        }

    def equivocation(sequence: int, stored: bytes, received: bytes) -> dict[str, Any]:
        return status("EQUIVOCATION") | {
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
        # The two below differ first at entry 3, but the receiver compares (and names) the
        # last sequence both logs hold: a search for the first difference fails them.
        case(
            "overlap-differs-before-head",
            "A log holding the fork's entries 1 to 5 receives genesis entries 2 to 7: the "
            "histories part at entry 3, and the comparison is at the stored head, entry 5.",
            log("fork", 5),
            genesis[1:7],
            equivocation(5, fork[4].hash, genesis[4].hash),
        ),
        case(
            "duplicates-differ-before-last",
            "A log holding the fork's entries 1 to 5 receives genesis entries 2 to 4: all "
            "duplicates, parting at entry 3; the comparison is at the batch's last entry, 4.",
            log("fork", 5),
            genesis[1:4],
            equivocation(4, fork[3].hash, genesis[3].hash),
        ),
    ]


def _sync_batch_vectors(
    keys: dict[str, NamedKey], c2e: Sequence[_SyncEntry], e2c: Sequence[_SyncEntry]
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
        header = statement_header(
            issuer=sender.party_id,
            audience=[receiver],
            sequence=sequence,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id=statement_id,
        )
        return statement_envelope(batch, header, [sender])

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
            "now": rfc3339(NOW),
            "max_entries": max_entries,
            "envelope": envelope_json(signed),
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
            status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/entry-hash-mismatch",
            "The entries of invalid_chains 'entry-hash-mismatch', validly signed.",
            envelope(entries_of("entry-hash-mismatch")),
            status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/gap",
            "The entries of invalid_chains 'gap', validly signed.",
            envelope(entries_of("gap")),
            status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/sequence-zero",
            "The entries of invalid_chains 'sequence-zero' (header.sequence 2), validly signed.",
            envelope(entries_of("sequence-zero")),
            status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/wrong-batch-direction",
            "Entries 1 to 5 signed by the custodian in a batch whose direction field says 2 "
            "(exchange -> custodian), received on the custodian -> exchange stream.",
            envelope(c2e[:5], batch_direction=_E2C),
            status("KEY_ROLE_MISMATCH"),
        ),
        case(
            "custodian-to-exchange/header-sequence-not-last",
            "Entries 1 to 5 with header.sequence 4: it must be the last entry's sequence.",
            envelope(c2e[:5], header_sequence=4),
            status("MALFORMED"),
        ),
        case(
            "custodian-to-exchange/over-window",
            "Entries 1 to 5 for a receiver whose window is 4 entries.",
            envelope(c2e[:5]),
            status("LIMIT_EXCEEDED"),
            max_entries=4,
        ),
        case(
            "custodian-to-exchange/sequence-beyond-2^63-1",
            "Entries 2^63 - 1 and 2^63, chained and hashed correctly: 2^63 is beyond the "
            "largest integer the protocol carries (section 2.4).",
            envelope(beyond),
            status("OUT_OF_RANGE"),
        ),
    ]


def sync_file(keys: dict[str, NamedKey]) -> dict[str, Any]:
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
