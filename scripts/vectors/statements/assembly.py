"""The assembly of statements.json: the cases in the file's order, each written as a vector.

statements_file gathers the cases of the other modules (the order below is the order of
"vectors" in the file, which the vectors' readers and tests rely on), writes each case as
a vector (the envelope as JSON and hex, its PAE, its payload as JSON, then the verifier,
time, replay state, threshold and outcome), the large payloads as a rule rather than as
bytes, and the registry and signing keys every vector is verified with.
"""

from __future__ import annotations

import hashlib
from typing import Any

from collateral_sync.keys import KeyRegistry
from collateral_sync.signing import pae
from collateral_sync.statements import message_class_of
from collateral_sync.v1 import common_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from .._common import MAX_SKEW_SECONDS, NamedKey, envelope_json, rfc3339
from . import envelope, limits, threshold, types_margin, types_settlement
from ._shared import StatementCase, holdings_statement
from .large_payloads import large_payload_cases
from .types_issued import issue_type_statements

__all__ = ["statements_file"]


_THRESHOLD_ROLES = ["PARTY_ROLE_REGULATOR", "PARTY_ROLE_CUSTODIAN", "PARTY_ROLE_EXCHANGE"]


def _statement_cases(keys: dict[str, NamedKey], checkpoint_root: bytes) -> list[StatementCase]:
    """Every case of "vectors", in the file's order."""
    holdings = holdings_statement(keys["custodian"].key)
    release = threshold.release_2_of_3(keys)
    issued = issue_type_statements(keys, holdings, release)
    return [
        *envelope.valid_cases(keys, checkpoint_root, holdings),
        *threshold.valid_cases(keys, release),
        # --- must fail ---
        *envelope.refused_cases(keys, holdings),
        *threshold.refused_cases(keys),
        # every type of the §3.5 table: a valid statement, and one refused for a reason of
        # its type
        *types_margin.margin_type_cases(keys, checkpoint_root, issued),
        *types_settlement.settlement_type_cases(keys, issued),
        # limits of stages a and c, and the issuer of a statement with several signatures
        *threshold.signature_count_cases(keys, release),
        *limits.limit_cases(keys),
        *threshold.issuer_cases(keys),
    ]


def _payload_json(payload_type: str, payload: bytes) -> dict[str, Any] | None:
    """The payload as proto3 JSON, when it parses and has one, for readers of the vectors."""
    message = message_class_of(payload_type)()
    try:
        message.ParseFromString(payload)
    except DecodeError:  # unparseable payloads are vectors too
        return None
    if not message.ListFields():
        return None
    try:
        return json_format.MessageToDict(message)
    except json_format.SerializeToJsonError:  # a Timestamp out of range has no JSON form
        return None


def _outcome(case: StatementCase) -> dict[str, Any]:
    """What a vector of either list says besides its envelope: verifier, time, state, outcome."""
    return {
        "verifier_party_id": case.verifier,
        "now": rfc3339(case.now),
        "last_accepted_sequence": case.last_accepted_sequence,
        "threshold": (
            None
            if case.threshold is None
            else {"k": case.threshold, "roles": list(_THRESHOLD_ROLES)}
        ),
        "expected": case.expected,
    }


def _statement_vector(case: StatementCase) -> dict[str, Any]:
    envelope = case.envelope
    return {
        "id": case.id,
        "description": case.description,
        "expected_payload_type": case.expected_type,
        "envelope": envelope_json(envelope),
        "envelope_hex": envelope.SerializeToString(deterministic=True).hex(),
        "pae_hex": pae(envelope.payload_type, envelope.payload).hex(),
        "payload_json": _payload_json(case.expected_type, envelope.payload),
        **_outcome(case),
    }


def _large_payload_vector(case: StatementCase) -> dict[str, Any]:
    """A vector whose payload is given by a rule: a prefix, then ``padding`` zero bytes."""
    envelope = case.envelope
    payload = envelope.payload
    assert case.padding is not None
    prefix, fill = payload[: -case.padding], payload[-case.padding :]
    assert fill == bytes(case.padding)
    serialised = envelope.SerializeToString(deterministic=True)
    signed = pae(envelope.payload_type, payload)
    return {
        "id": case.id,
        "description": case.description,
        "expected_payload_type": case.expected_type,
        "envelope": {
            "payload_type": envelope.payload_type,
            "signatures": envelope_json(envelope)["signatures"],
        },
        "payload_rule": {"prefix_hex": prefix.hex(), "fill_hex": "00", "fill_count": case.padding},
        "payload_length": len(payload),
        "payload_sha256_hex": hashlib.sha256(payload).hexdigest(),
        "envelope_sha256_hex": hashlib.sha256(serialised).hexdigest(),
        "pae_sha256_hex": hashlib.sha256(signed).hexdigest(),
        "payload_json": _payload_json(case.expected_type, payload),
        **_outcome(case),
    }


def statements_file(keys: dict[str, NamedKey], checkpoint_root: bytes) -> dict[str, Any]:
    registry = KeyRegistry(k.party_key() for k in keys.values() if k.registered)
    vectors = [_statement_vector(case) for case in _statement_cases(keys, checkpoint_root)]
    large = [_large_payload_vector(case) for case in large_payload_cases(keys)]
    return {
        "description": (
            "Signed statements (docs/PROTOCOL.md section 3). Verify each envelope with the "
            "registry, for verifier_party_id, at 'now', with max_skew_seconds of skew, "
            "expecting expected_payload_type; last_accepted_sequence is the replay state for "
            "(issuer, payload type) (0: none). A non-null 'threshold' means a threshold "
            "statement (section 3.7). 'expected' is either valid with the issuer and the "
            "counted signer parties, or the ErrorReason (without the ERROR_REASON_ prefix) "
            "and gRPC status the verifier must fail with. 'large_payloads' are vectors whose "
            "payload is too large to write out: it is payload_rule's prefix followed by "
            "fill_count copies of the byte fill_hex (section 15.2)."
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
        "large_payloads": large,
    }
