"""vectors/statements.json: every signed statement, verified twice.

Once by an independent verifier written from docs/PROTOCOL.md §3, once by the SDK's
verify_statement or verify_threshold; both must accept the positive vectors and refuse
the negative ones with the vector's ErrorReason (and gRPC status). The payloads of
"large_payloads" (4 MiB and over) are built from their rule first (§15.2). Every type of
the §3.5 table must have a valid and an invalid vector.
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
from collateral_sync.statements import STATEMENT_TYPES, message_class_of
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    emergency_pb2,
    envelope_pb2,
    keys_pb2,
    liquidation_pb2,
    margin_pb2,
    pledge_release_pb2,
    position_sync_pb2,
    reconciliation_pb2,
    valuation_pb2,
)
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ._common import envelope_of, ids_of, load, own_pae, own_verify

STATEMENTS = load("statements.json")

POSITIVE_STATEMENTS = [v for v in STATEMENTS["vectors"] if v["expected"]["valid"]]
NEGATIVE_STATEMENTS = [v for v in STATEMENTS["vectors"] if not v["expected"]["valid"]]
# Vectors whose payload is written as a rule (docs/PROTOCOL.md §15.2): over 4 MiB, or at it.
LARGE_PAYLOADS = STATEMENTS["large_payloads"]


# --- signed statements: an independent verifier written from docs/PROTOCOL.md §3 --------

_TYPE_PREFIX = "application/vnd.collateral-sync.v1."
# The §3.5 table, written out here from docs/PROTOCOL.md: message, issuer roles, public.
_CUSTODIAN, _EXCHANGE = "PARTY_ROLE_CUSTODIAN", "PARTY_ROLE_EXCHANGE"
_REGULATOR, _CLIENT = "PARTY_ROLE_REGULATOR", "PARTY_ROLE_CLIENT"
_OWN_TABLE: dict[str, tuple[type[Message], set[str], bool]] = {
    "holdings-statement": (attestation_pb2.HoldingsStatement, {_CUSTODIAN}, False),
    "checkpoint": (attestation_pb2.Checkpoint, {_CUSTODIAN}, True),
    "sync-batch": (position_sync_pb2.SyncBatch, {_CUSTODIAN, _EXCHANGE}, False),
    "risk-policy": (valuation_pb2.RiskPolicy, {_EXCHANGE}, True),
    "price-snapshot": (valuation_pb2.PriceSnapshot, {_EXCHANGE}, True),
    "credit-line": (valuation_pb2.CreditLine, {_EXCHANGE}, False),
    "margin-call": (margin_pb2.MarginCall, {_EXCHANGE}, False),
    "margin-call-response": (margin_pb2.MarginCallResponse, {_CUSTODIAN}, False),
    "margin-call-state": (margin_pb2.MarginCallState, {_EXCHANGE}, False),
    "liquidation-path": (liquidation_pb2.LiquidationPath, {_CLIENT}, False),
    "liquidation-instruction": (liquidation_pb2.LiquidationInstruction, {_EXCHANGE}, False),
    "liquidation-receipt": (liquidation_pb2.LiquidationReceipt, {_CUSTODIAN}, False),
    "shortfall-allocation": (liquidation_pb2.ShortfallAllocation, {_EXCHANGE}, False),
    "reconciliation-statement": (
        reconciliation_pb2.ReconciliationStatement,
        {_CUSTODIAN, _EXCHANGE},
        False,
    ),
    "reconciliation-result": (reconciliation_pb2.ReconciliationResult, {_REGULATOR}, True),
    "settlement-instruction": (reconciliation_pb2.SettlementInstruction, {_EXCHANGE}, False),
    "settlement-dispute": (reconciliation_pb2.SettlementDispute, {_CUSTODIAN, _EXCHANGE}, False),
    "emergency-release": (
        emergency_pb2.EmergencyRelease,
        {_REGULATOR, _CUSTODIAN, _EXCHANGE},
        False,
    ),
    "emergency-release-receipt": (emergency_pb2.EmergencyReleaseReceipt, {_CUSTODIAN}, False),
    "pledge-instruction": (custodian_service_pb2.PledgeInstruction, {_CLIENT}, False),
    "redemption-request": (custodian_service_pb2.RedemptionRequest, {_CLIENT}, False),
    "pledge-release-request": (pledge_release_pb2.PledgeReleaseRequest, {_CLIENT}, False),
    "pledge-release-consent": (pledge_release_pb2.PledgeReleaseConsent, {_EXCHANGE}, False),
    "pledge-release-receipt": (pledge_release_pb2.PledgeReleaseReceipt, {_CUSTODIAN}, False),
}
_HEX = set("0123456789abcdef")
_NS = 1_000_000_000
_TS_MIN, _TS_MAX = -62_135_596_800, 253_402_300_799
_MAX_INTEGER = 2**63 - 1


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


def _has_integer_above_limit(message: Message) -> bool:
    """Stage c3 (§2.4): a uint64 or fixed64 anywhere in the message above 2^63 - 1."""
    for field, value in message.ListFields():
        values = list(value) if field.is_repeated else [value]
        if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            if any(v > _MAX_INTEGER for v in values):
                return True
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            assert not field.message_type.GetOptions().map_entry  # no maps in statements
            if any(_has_integer_above_limit(v) for v in values):
                return True
    return False


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
        if not 0 <= stamp.nanos < _NS:
            raise _RefusedError("MALFORMED")
    issued, expires = _ns(header.issued_at), _ns(header.expires_at)
    if not header.issuer or header.sequence < 1 or expires <= issued:
        raise _RefusedError("MALFORMED")
    if _has_integer_above_limit(message):
        raise _RefusedError("OUT_OF_RANGE")
    # d
    threshold = vector["threshold"]
    if threshold is None:
        own_failures = []
        for key_id in verified:
            key = registry[key_id]
            if key["partyId"] != header.issuer:
                continue
            if key["role"] not in issuer_roles:
                failure: str | None = "KEY_ROLE_MISMATCH"
            else:
                failure = _key_usable(key, issued)
            if failure is None:
                break
            own_failures.append(failure)
        else:
            # No key may issue: the error of the issuer's own key when it signed, else
            # KEY_ROLE_MISMATCH for a first signer of another party — the rule §3.7 step 4
            # gives as "the error stage d would report". (§3.6 "d with several signatures"
            # says the first verified signature's error instead; the two differ only when
            # another party signed before the issuer: issuer-key-not-valid-after-other-signature.)
            raise _RefusedError(own_failures[0] if own_failures else "KEY_ROLE_MISMATCH")
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


def _check_positive(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    issuer, signers = _independent_verify(vector)
    assert (issuer, signers) == (expected["issuer"], expected["signer_party_ids"])
    verified = _sdk_verify(vector)
    assert verified.issuer == expected["issuer"]
    assert list(verified.signer_party_ids) == expected["signer_party_ids"]
    assert verified.payload == bytes.fromhex(vector["envelope"]["payload_hex"])


def _check_negative(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    with pytest.raises(_RefusedError) as independent:
        _independent_verify(vector)
    assert independent.value.reason == expected["reason"]
    with pytest.raises(CollateralSyncError) as sdk:
        _sdk_verify(vector)
    assert sdk.value.reason_name == expected["reason"], sdk.value.message
    assert sdk.value.code.name == expected["grpc_status"]
    assert sdk.value.metadata.get("expected") is not None


@pytest.mark.parametrize("vector", POSITIVE_STATEMENTS, ids=ids_of(POSITIVE_STATEMENTS))
def test_positive_statement_verifies(vector: dict[str, Any]) -> None:
    _check_positive(vector)


@pytest.mark.parametrize("vector", NEGATIVE_STATEMENTS, ids=ids_of(NEGATIVE_STATEMENTS))
def test_negative_statement_fails_with_its_reason(vector: dict[str, Any]) -> None:
    _check_negative(vector)


# --- large payloads: written as a rule, expanded here ------------------------------------


def _large_payload(vector: dict[str, Any]) -> bytes:
    """The payload of a large_payloads vector: the prefix, then fill_count fill bytes."""
    rule = vector["payload_rule"]
    fill = bytes.fromhex(rule["fill_hex"])
    count: int = rule["fill_count"]
    assert len(fill) == 1
    return bytes.fromhex(rule["prefix_hex"]) + fill * count


def _expanded(vector: dict[str, Any]) -> dict[str, Any]:
    """A large_payloads vector in the shape of vectors[]: its payload written out."""
    envelope = {**vector["envelope"], "payload_hex": _large_payload(vector).hex()}
    return {**vector, "envelope": envelope}


@pytest.mark.parametrize("vector", LARGE_PAYLOADS, ids=ids_of(LARGE_PAYLOADS))
def test_large_payload_bytes_are_consistent(vector: dict[str, Any]) -> None:
    payload = _large_payload(vector)
    assert len(payload) == vector["payload_length"]
    assert hashlib.sha256(payload).hexdigest() == vector["payload_sha256_hex"]
    envelope = envelope_of(_expanded(vector))
    serialised = envelope.SerializeToString(deterministic=True)
    assert hashlib.sha256(serialised).hexdigest() == vector["envelope_sha256_hex"]
    signed = own_pae(envelope.payload_type, payload)
    assert hashlib.sha256(signed).hexdigest() == vector["pae_sha256_hex"]
    message = message_class_of(vector["expected_payload_type"])()
    message.ParseFromString(payload)
    assert json_format.MessageToDict(message) == vector["payload_json"]


@pytest.mark.parametrize("vector", LARGE_PAYLOADS, ids=ids_of(LARGE_PAYLOADS))
def test_large_payload_statement(vector: dict[str, Any]) -> None:
    if vector["expected"]["valid"]:
        _check_positive(_expanded(vector))
    else:
        _check_negative(_expanded(vector))


def test_the_4_mib_limit_is_pinned_from_both_sides() -> None:
    lengths = {v["payload_length"]: v["expected"] for v in LARGE_PAYLOADS}
    assert lengths[4 * 1024 * 1024]["valid"] is True
    assert lengths[4 * 1024 * 1024 + 1]["reason"] == "TOO_LARGE"


# --- coverage ---------------------------------------------------------------------------


def test_every_statement_type_has_a_valid_and_an_invalid_vector() -> None:
    # The table written here from §3.5 is the SDK's, row for row.
    assert {f"{_TYPE_PREFIX}{name}+proto" for name in _OWN_TABLE} == {
        row.payload_type for row in STATEMENT_TYPES
    }
    every = [*STATEMENTS["vectors"], *LARGE_PAYLOADS]
    for name in _OWN_TABLE:
        payload_type = f"{_TYPE_PREFIX}{name}+proto"
        of_type = [
            v
            for v in every
            if v["expected_payload_type"] == payload_type
            and v["envelope"]["payload_type"] == payload_type
        ]
        assert any(v["expected"]["valid"] for v in of_type), name
        assert any(not v["expected"]["valid"] for v in of_type), name


def test_the_limits_of_stages_a_and_c_have_vectors() -> None:
    every = [*STATEMENTS["vectors"], *LARGE_PAYLOADS]
    reasons = {v["expected"].get("reason") for v in every}
    assert "TOO_LARGE" in reasons
    counts = {len(v["envelope"]["signatures"]): v["expected"] for v in every}
    assert counts[16]["valid"] is True
    assert counts[17]["reason"] == "MALFORMED"


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
