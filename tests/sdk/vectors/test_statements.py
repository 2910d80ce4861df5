"""vectors/statements.json: every signed statement, verified twice.

Once by an independent verifier written from docs/PROTOCOL.md §3, once by the SDK's
verify_statement or verify_threshold; both must accept the positive vectors and refuse
the negative ones with the vector's ErrorReason (and gRPC status).
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

import nacl.signing
import pytest
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signing import (
    MemoryReplayGuard,
    VerifiedStatement,
    verify_statement,
    verify_threshold,
)
from collateral_sync.statements import message_class_of
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    keys_pb2,
    liquidation_pb2,
    valuation_pb2,
)
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from ._common import envelope_of, ids_of, load, own_pae, own_verify

STATEMENTS = load("statements.json")

POSITIVE_STATEMENTS = [v for v in STATEMENTS["vectors"] if v["expected"]["valid"]]
NEGATIVE_STATEMENTS = [v for v in STATEMENTS["vectors"] if not v["expected"]["valid"]]


# --- signed statements: an independent verifier written from docs/PROTOCOL.md §3 --------

_TYPE_PREFIX = "application/vnd.collateral-sync.v1."
# Only the rows of the §3.5 table that the vectors use.
_OWN_TABLE: dict[str, tuple[type[Message], set[str], bool]] = {
    "holdings-statement": (attestation_pb2.HoldingsStatement, {"PARTY_ROLE_CUSTODIAN"}, False),
    "checkpoint": (attestation_pb2.Checkpoint, {"PARTY_ROLE_CUSTODIAN"}, True),
    "risk-policy": (valuation_pb2.RiskPolicy, {"PARTY_ROLE_EXCHANGE"}, True),
    "liquidation-path": (liquidation_pb2.LiquidationPath, {"PARTY_ROLE_CLIENT"}, False),
    "emergency-release": (
        emergency_pb2.EmergencyRelease,
        {"PARTY_ROLE_REGULATOR", "PARTY_ROLE_CUSTODIAN", "PARTY_ROLE_EXCHANGE"},
        False,
    ),
}
_HEX = set("0123456789abcdef")
_NS = 1_000_000_000
_TS_MIN, _TS_MAX = -62_135_596_800, 253_402_300_799


class _RefusedError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _ns_of_text(text: str) -> int:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp.seconds * _NS + stamp.nanos


def _ns(stamp: timestamp_pb2.Timestamp) -> int:
    return stamp.seconds * _NS + stamp.nanos


def _key_usable(key: dict[str, Any], issued_ns: int) -> str | None:
    """The stage d2/d3 failure of a registry entry at issued_at, or None."""
    if "revokedAt" in key and _ns_of_text(key["revokedAt"]) <= issued_ns:
        return "KEY_REVOKED"
    if issued_ns < _ns_of_text(key["validFrom"]):
        return "KEY_NOT_VALID"
    if "validUntil" in key and issued_ns >= _ns_of_text(key["validUntil"]):
        return "KEY_NOT_VALID"
    return None


def _independent_verify(vector: dict[str, Any]) -> tuple[str, list[str]]:
    """Run the stages of docs/PROTOCOL.md §3.6/§3.7; return (issuer, signer parties)."""
    registry = {k["keyId"]: k for k in STATEMENTS["registry"]["keys"]}
    envelope = vector["envelope"]
    payload_type = envelope["payload_type"]
    payload = bytes.fromhex(envelope["payload_hex"])
    signatures = [(s["key_id"], bytes.fromhex(s["sig_hex"])) for s in envelope["signatures"]]
    # a
    if payload_type != vector["expected_payload_type"]:
        raise _RefusedError("PAYLOAD_TYPE_MISMATCH")
    if len(payload) > 4 * 1024 * 1024:
        raise _RefusedError("TOO_LARGE")
    if not 1 <= len(signatures) <= 16:
        raise _RefusedError("MALFORMED")
    for key_id, sig in signatures:
        if len(sig) != 64 or len(key_id) != 64 or not set(key_id) <= _HEX:
            raise _RefusedError("MALFORMED")
    # b: over the received bytes, before parsing
    signed = own_pae(payload_type, payload)
    known = [(k, s) for k, s in signatures if k in registry]
    if not known:
        raise _RefusedError("KEY_UNKNOWN")
    verified: list[str] = []
    for key_id, sig in known:
        public = base64.b64decode(registry[key_id]["publicKey"])
        assert hashlib.sha256(public).hexdigest() == key_id
        if key_id not in verified and own_verify(public, signed, sig):
            verified.append(key_id)
    if not verified:
        raise _RefusedError("SIGNATURE_INVALID")
    # c
    name = payload_type.removeprefix(_TYPE_PREFIX).removesuffix("+proto")
    message_class, issuer_roles, public_type = _OWN_TABLE[name]
    message = message_class()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise _RefusedError("MALFORMED") from None
    if not message.HasField("header"):
        raise _RefusedError("MALFORMED")
    header: envelope_pb2.StatementHeader = message.header  # type: ignore[attr-defined]
    for stamp_name in ("issued_at", "expires_at"):
        stamp = getattr(header, stamp_name)
        if not header.HasField(stamp_name) or not _TS_MIN <= stamp.seconds <= _TS_MAX:
            raise _RefusedError("MALFORMED")
    issued, expires = _ns(header.issued_at), _ns(header.expires_at)
    if not header.issuer or header.sequence < 1 or expires <= issued:
        raise _RefusedError("MALFORMED")
    # d
    threshold = vector["threshold"]
    if threshold is None:
        failures = []
        for key_id in verified:
            key = registry[key_id]
            if key["partyId"] != header.issuer or key["role"] not in issuer_roles:
                failures.append("KEY_ROLE_MISMATCH")
                continue
            failure = _key_usable(key, issued)
            if failure is None:
                break
            failures.append(failure)
        else:
            raise _RefusedError(failures[0])
        signers = [header.issuer]
    else:
        counted: dict[str, str] = {}
        for key_id in verified:
            key = registry[key_id]
            if key["role"] in threshold["roles"] and _key_usable(key, issued) is None:
                counted.setdefault(key["partyId"], key["role"])
        if len(counted) < threshold["k"]:
            raise _RefusedError("THRESHOLD_NOT_MET")
        if counted.get(header.issuer) not in issuer_roles:
            # §3.7 step 4: the error of the issuer's own key when it signed, else
            # KEY_ROLE_MISMATCH (the first verified signer is not the issuer).
            for key_id in verified:
                key = registry[key_id]
                if key["partyId"] == header.issuer:
                    if key["role"] not in issuer_roles:
                        raise _RefusedError("KEY_ROLE_MISMATCH")
                    raise _RefusedError(_key_usable(key, issued) or "KEY_ROLE_MISMATCH")
            raise _RefusedError("KEY_ROLE_MISMATCH")
        signers = [header.issuer, *(p for p in counted if p != header.issuer)]
    # e
    audience = list(header.audience)
    verifier = vector["verifier_party_id"]
    if ("*" in audience and not public_type) or ("*" not in audience and verifier not in audience):
        raise _RefusedError("AUDIENCE_MISMATCH")
    # f
    now = _ns_of_text(vector["now"])
    skew = STATEMENTS["max_skew_seconds"] * _NS
    if issued > now + skew:
        raise _RefusedError("STATEMENT_NOT_YET_VALID")
    if now > expires + skew:
        raise _RefusedError("STATEMENT_EXPIRED")
    # g
    if header.sequence <= vector["last_accepted_sequence"]:
        raise _RefusedError("REPLAYED")
    return header.issuer, signers


# --- signed statements: through the SDK -------------------------------------------


def _sdk_registry() -> KeyRegistry:
    message = keys_pb2.KeyRegistry()
    json_format.ParseDict(STATEMENTS["registry"], message)
    return KeyRegistry.from_proto(message)


def _replay_guard(vector: dict[str, Any], envelope: envelope_pb2.Envelope) -> MemoryReplayGuard:
    guard = MemoryReplayGuard()
    last = vector["last_accepted_sequence"]
    if last:
        # What the receiver remembers: (issuer, payload type) -> last sequence acted on.
        message = message_class_of(vector["expected_payload_type"])()
        message.ParseFromString(envelope.payload)
        issuer = message.header.issuer  # type: ignore[attr-defined]
        header = envelope_pb2.StatementHeader(issuer=issuer, sequence=last)
        guard.record(
            VerifiedStatement(
                message=message,
                header=header,
                payload_type=vector["expected_payload_type"],
                payload=b"",
                signer_key_ids=(),
                signer_party_ids=(),
                envelope=envelope_pb2.Envelope(),
            )
        )
    return guard


def _sdk_verify(vector: dict[str, Any]) -> VerifiedStatement[Any]:
    envelope = envelope_of(vector)
    common: dict[str, Any] = {
        "expected_type": message_class_of(vector["expected_payload_type"]),
        "audience": vector["verifier_party_id"],
        "now": datetime.fromisoformat(vector["now"]),
        "max_skew": timedelta(seconds=STATEMENTS["max_skew_seconds"]),
        "replay_guard": _replay_guard(vector, envelope),
    }
    threshold = vector["threshold"]
    if threshold is None:
        return verify_statement(envelope, _sdk_registry(), **common)
    return verify_threshold(
        envelope,
        _sdk_registry(),
        threshold=threshold["k"],
        roles={common_pb2.PartyRole.Value(r) for r in threshold["roles"]},
        **common,
    )


def test_registry_and_signing_keys_agree() -> None:
    registered = {k["keyId"] for k in STATEMENTS["registry"]["keys"]}
    for entry in STATEMENTS["registry"]["keys"]:
        public = base64.b64decode(entry["publicKey"])
        assert hashlib.sha256(public).hexdigest() == entry["keyId"]
    for key in STATEMENTS["signing_keys"]:
        public = bytes(nacl.signing.SigningKey(bytes.fromhex(key["seed_hex"])).verify_key)
        assert hashlib.sha256(public).hexdigest() == key["key_id"]
        assert (key["key_id"] in registered) is key["registered"]
    assert len(_sdk_registry()) == len(registered)


@pytest.mark.parametrize("vector", STATEMENTS["vectors"], ids=ids_of(STATEMENTS["vectors"]))
def test_statement_vector_bytes_are_consistent(vector: dict[str, Any]) -> None:
    envelope = envelope_of(vector)
    assert envelope_pb2.Envelope.FromString(bytes.fromhex(vector["envelope_hex"])) == envelope
    assert bytes.fromhex(vector["pae_hex"]) == own_pae(envelope.payload_type, envelope.payload)
    if vector["payload_json"] is not None:
        message = message_class_of(vector["expected_payload_type"])()
        message.ParseFromString(envelope.payload)
        assert json_format.MessageToDict(message) == vector["payload_json"]


@pytest.mark.parametrize("vector", POSITIVE_STATEMENTS, ids=ids_of(POSITIVE_STATEMENTS))
def test_positive_statement_verifies(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    issuer, signers = _independent_verify(vector)
    assert (issuer, signers) == (expected["issuer"], expected["signer_party_ids"])
    verified = _sdk_verify(vector)
    assert verified.issuer == expected["issuer"]
    assert list(verified.signer_party_ids) == expected["signer_party_ids"]
    assert verified.payload == bytes.fromhex(vector["envelope"]["payload_hex"])


@pytest.mark.parametrize("vector", NEGATIVE_STATEMENTS, ids=ids_of(NEGATIVE_STATEMENTS))
def test_negative_statement_fails_with_its_reason(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    with pytest.raises(_RefusedError) as independent:
        _independent_verify(vector)
    assert independent.value.reason == expected["reason"]
    with pytest.raises(CollateralSyncError) as sdk:
        _sdk_verify(vector)
    assert sdk.value.reason_name == expected["reason"], sdk.value.message
    assert sdk.value.code.name == expected["grpc_status"]
    assert sdk.value.metadata.get("expected") is not None


def test_a_negative_vector_is_not_vacuous() -> None:
    # The tampered vector differs from the valid one only in the payload; restoring
    # the byte makes both verifiers accept it again.
    valid = next(v for v in STATEMENTS["vectors"] if v["id"] == "holdings-statement/valid")
    tampered = next(
        v for v in STATEMENTS["vectors"] if v["id"] == "holdings-statement/tampered-payload"
    )
    good = bytes.fromhex(valid["envelope"]["payload_hex"])
    bad = bytes.fromhex(tampered["envelope"]["payload_hex"])
    assert len(good) == len(bad)
    assert sum(a != b for a, b in zip(good, bad, strict=True)) == 1
    restored = json.loads(json.dumps(tampered))
    restored["envelope"]["payload_hex"] = good.hex()
    assert _independent_verify(restored)[0] == "custodian.example"
    assert _sdk_verify(restored).issuer == "custodian.example"
