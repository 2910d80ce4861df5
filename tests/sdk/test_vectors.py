"""Tests for the language-neutral test vectors in vectors/ (scripts/make_vectors.py).

Three things are checked:

(a) the committed files are exactly what the generator produces (drift fails);
(b) every positive vector verifies with the SDK *and* with an independent
    check written here from the JSON and docs/PROTOCOL.md alone (hashlib and
    PyNaCl for keys, PAE and signatures; tests/rfc9162_reference.py for Merkle
    proofs; a character-level checker for amounts);
(c) every negative vector fails, in the SDK and in the independent check, with
    the ErrorReason (and gRPC status) the vector states.
"""

from __future__ import annotations

import base64
import decimal
import hashlib
import importlib.util
import json
import re
import sqlite3
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import nacl.exceptions
import nacl.signing
import pytest
import rfc9162_reference as ref
from collateral_sync import merkle
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError, ProofError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.reconciliation import PositionTree, position_leaf
from collateral_sync.signing import (
    MemoryReplayGuard,
    VerifiedStatement,
    pae,
    sign_statement,
    verify_statement,
    verify_threshold,
)
from collateral_sync.statements import message_class_of
from collateral_sync.sync import SyncLog, VerifiedSyncBatch, verify_sync_batch
from collateral_sync.sync import entry_hash as sync_entry_hash
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    errors_pb2,
    keys_pb2,
    liquidation_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import DecodeError, Message

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "vectors"
PROTOCOL_MD = ROOT / "docs" / "PROTOCOL.md"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


KEYS = _load("keys.json")
PAE = _load("pae.json")
STATEMENTS = _load("statements.json")
MERKLE = _load("merkle.json")
AMOUNTS = _load("amounts.json")

POSITIVE_STATEMENTS = [v for v in STATEMENTS["vectors"] if v["expected"]["valid"]]
NEGATIVE_STATEMENTS = [v for v in STATEMENTS["vectors"] if not v["expected"]["valid"]]


def _ids(vectors: Sequence[dict[str, Any]]) -> list[str]:
    return [v["id"] for v in vectors]


# --- (a) drift ---------------------------------------------------------------------


def _generator() -> ModuleType:
    path = ROOT / "scripts" / "make_vectors.py"
    spec = importlib.util.spec_from_file_location("make_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_committed_vectors_equal_the_generator_output() -> None:
    generator = _generator()
    generated: dict[str, str] = generator.build_vectors()
    assert sorted(p.name for p in VECTORS.iterdir()) == sorted(generator.VECTOR_FILES)
    for name, text in generated.items():
        committed = (VECTORS / name).read_text(encoding="utf-8")
        assert committed == text, f"vectors/{name} is stale: run scripts/make_vectors.py"


def test_generator_is_deterministic() -> None:
    generator = _generator()
    assert generator.build_vectors() == generator.build_vectors()


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    generator = _generator()
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / "pae.json"
    stale.write_text(stale.read_text(encoding="utf-8").replace("DSSE", "dsse", 1))
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1


def test_every_file_declares_the_format() -> None:
    for document in (KEYS, PAE, STATEMENTS, MERKLE, AMOUNTS):
        assert document["format"] == "collateral-sync-test-vectors"
        assert document["format_version"] == 1
        assert document["protocol"] == "collateral_sync.v1"


def test_vector_ids_are_unique() -> None:
    for vectors in (
        STATEMENTS["vectors"],
        MERKLE["invalid_inclusion"],
        MERKLE["invalid_consistency"],
    ):
        ids = _ids(vectors)
        assert len(ids) == len(set(ids))


def test_the_vectors_cover_what_the_spec_requires() -> None:
    reasons = {v["expected"]["reason"] for v in NEGATIVE_STATEMENTS}
    assert {
        "SIGNATURE_INVALID",
        "PAYLOAD_TYPE_MISMATCH",
        "KEY_UNKNOWN",
        "KEY_ROLE_MISMATCH",
        "KEY_REVOKED",
        "KEY_NOT_VALID",
        "AUDIENCE_MISMATCH",
        "STATEMENT_EXPIRED",
        "STATEMENT_NOT_YET_VALID",
        "REPLAYED",
        "THRESHOLD_NOT_MET",
        "MALFORMED",
    } <= reasons
    sizes = {t["tree_size"] for t in MERKLE["trees"]}
    assert set(range(33)) | {100, 1000} <= sizes
    assert any(v["expected"]["reason"] == "CHECKPOINT_INCONSISTENT"
               for v in MERKLE["invalid_consistency"])


def test_protocol_document_examples_match_the_vectors() -> None:
    # docs/PROTOCOL.md quotes a PAE and a registry entry; they must be the vectors' bytes.
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    assert PAE["vectors"][0]["pae_hex"] in text
    seed_key = next(v for v in KEYS["vectors"] if v["seed_hex"] == bytes(range(32)).hex())
    assert seed_key["key_id"] in text
    assert seed_key["public_key_base64"] in text


# --- independent helpers (no SDK) ------------------------------------------------


def _own_pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode("utf-8")
    return b"".join(
        [b"DSSEv1 ", str(len(kind)).encode(), b" ", kind, b" ", str(len(payload)).encode(),
         b" ", payload]
    )


def _own_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


# --- keys and PAE ------------------------------------------------------------------


@pytest.mark.parametrize("vector", KEYS["vectors"], ids=lambda v: v["seed_hex"][:8])
def test_key_vector(vector: dict[str, Any]) -> None:
    seed = bytes.fromhex(vector["seed_hex"])
    public = bytes.fromhex(vector["public_key_hex"])
    message = bytes.fromhex(vector["message_hex"])
    signature = bytes.fromhex(vector["signature_hex"])
    # Independent.
    own = nacl.signing.SigningKey(seed)
    assert bytes(own.verify_key) == public
    assert base64.b64decode(vector["public_key_base64"]) == public
    assert hashlib.sha256(public).hexdigest() == vector["key_id"]
    assert own.sign(message).signature == signature
    assert _own_verify(public, message, signature)
    assert not _own_verify(public, message + b"!", signature)
    # SDK.
    sdk = SigningKey.from_seed(seed, "party.example", common_pb2.PARTY_ROLE_CUSTODIAN)
    assert sdk.public_key == public
    assert sdk.key_id == vector["key_id"]
    assert sdk.sign(message) == signature


@pytest.mark.parametrize("vector", PAE["vectors"], ids=lambda v: v["description"][:40])
def test_pae_vector(vector: dict[str, Any]) -> None:
    payload = bytes.fromhex(vector["payload_hex"])
    expected = bytes.fromhex(vector["pae_hex"])
    assert _own_pae(vector["payload_type"], payload) == expected
    assert pae(vector["payload_type"], payload) == expected


# --- key registry files: an independent loader written from docs/PROTOCOL.md §4.1, §4.3 --

REGISTRIES = KEYS["registries"]
#: Each PartyKey field by both its proto3 JSON name and its original name (§4.3).
_OWN_FIELDS = {
    "partyId": "party_id",
    "role": "role",
    "publicKey": "public_key",
    "keyId": "key_id",
    "validFrom": "valid_from",
    "validUntil": "valid_until",
    "revokedAt": "revoked_at",
}
_OWN_FIELDS |= {original: original for original in _OWN_FIELDS.values()}
_OWN_ROLES = {
    "PARTY_ROLE_CUSTODIAN": 1,
    "PARTY_ROLE_EXCHANGE": 2,
    "PARTY_ROLE_REGULATOR": 3,
    "PARTY_ROLE_CLIENT": 4,
}
_RFC3339_Z = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z")


class _RegistryRefusedError(Exception):
    pass


def _own_instant(text: Any) -> tuple[int, int]:
    """(seconds since the epoch, nanos) of an RFC 3339 UTC time within 0001..9999."""
    match = _RFC3339_Z.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise _RegistryRefusedError(f"not an RFC 3339 UTC time: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not 1 <= year <= 9999:
        raise _RegistryRefusedError(f"outside 0001-01-01..9999-12-31: {text}")
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as err:
        raise _RegistryRefusedError(str(err)) from err
    nanos = int((match.group(7) or "").ljust(9, "0") or 0)
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()), nanos


def _own_registry(document: Any) -> list[str]:
    """The key ids of a registry file, in order; _RegistryRefusedError for a bad one."""
    if not isinstance(document, dict) or set(document) - {"keys"}:
        raise _RegistryRefusedError("a registry is an object with one field, keys")
    seen: list[str] = []
    for entry in document.get("keys", []):
        fields: dict[str, Any] = {}
        for name, value in entry.items():
            field = _OWN_FIELDS.get(name)
            if field is None or field in fields:
                raise _RegistryRefusedError(f"unknown or repeated field {name!r}")
            fields[field] = value
        if not fields.get("party_id"):
            raise _RegistryRefusedError("empty party id")
        role = fields.get("role")
        if role not in _OWN_ROLES and role not in _OWN_ROLES.values():
            raise _RegistryRefusedError(f"role {role!r}")
        public = base64.b64decode(fields.get("public_key", ""), validate=True)
        if len(public) != 32:
            raise _RegistryRefusedError(f"a public key of {len(public)} bytes")
        if fields.get("key_id") != hashlib.sha256(public).hexdigest():
            raise _RegistryRefusedError("key id is not the hash of the public key")
        if "valid_from" not in fields:
            raise _RegistryRefusedError("valid_from unset")
        valid_from = _own_instant(fields["valid_from"])
        if "valid_until" in fields and _own_instant(fields["valid_until"]) <= valid_from:
            raise _RegistryRefusedError("valid_until <= valid_from")
        if "revoked_at" in fields:
            _own_instant(fields["revoked_at"])
        if fields["key_id"] in seen:
            raise _RegistryRefusedError("key id registered twice")
        seen.append(fields["key_id"])
    return seen


def test_registry_vectors_cover_what_the_spec_requires() -> None:
    ids = {v["id"] for v in REGISTRIES}
    assert len(ids) == len(REGISTRIES)
    # §4.3: both namings load; §4.1: every refusal it lists, and the repeated key id.
    assert {
        "camel-case",
        "snake-case",
        "empty-party-id",
        "role-unspecified",
        "role-unknown",
        "public-key-31-bytes",
        "key-id-mismatch",
        "valid-from-unset",
        "valid-from-before-year-1",
        "valid-until-equals-valid-from",
        "duplicate-key-id",
    } <= ids


@pytest.mark.parametrize("vector", REGISTRIES, ids=_ids(REGISTRIES))
def test_registry_vector(vector: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(vector["registry"]), encoding="utf-8")
    expected = vector["expected"]
    if expected["valid"]:
        assert _own_registry(vector["registry"]) == expected["key_ids"]
        assert [k.key_id for k in KeyRegistry.load(path)] == expected["key_ids"]
        return
    with pytest.raises(_RegistryRefusedError):
        _own_registry(vector["registry"])
    with pytest.raises(CollateralSyncError):
        KeyRegistry.load(path)


def test_a_negative_registry_vector_is_not_vacuous() -> None:
    # Each refused file differs from a valid one in one thing: put right, both loaders accept it.
    duplicate = next(v for v in REGISTRIES if v["id"] == "duplicate-key-id")
    keys = duplicate["registry"]["keys"]
    assert keys[0] == keys[-1]
    fixed = {"keys": keys[:-1]}
    assert len(_own_registry(fixed)) == 2
    assert len(KeyRegistry.from_proto(json_format.ParseDict(fixed, keys_pb2.KeyRegistry()))) == 2


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
    signed = _own_pae(payload_type, payload)
    known = [(k, s) for k, s in signatures if k in registry]
    if not known:
        raise _RefusedError("KEY_UNKNOWN")
    verified: list[str] = []
    for key_id, sig in known:
        public = base64.b64decode(registry[key_id]["publicKey"])
        assert hashlib.sha256(public).hexdigest() == key_id
        if key_id not in verified and _own_verify(public, signed, sig):
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


def _envelope(vector: dict[str, Any]) -> envelope_pb2.Envelope:
    fields = vector["envelope"]
    return envelope_pb2.Envelope(
        payload=bytes.fromhex(fields["payload_hex"]),
        payload_type=fields["payload_type"],
        signatures=[
            envelope_pb2.Signature(key_id=s["key_id"], sig=bytes.fromhex(s["sig_hex"]))
            for s in fields["signatures"]
        ],
    )


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
    envelope = _envelope(vector)
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


@pytest.mark.parametrize("vector", STATEMENTS["vectors"], ids=_ids(STATEMENTS["vectors"]))
def test_statement_vector_bytes_are_consistent(vector: dict[str, Any]) -> None:
    envelope = _envelope(vector)
    assert envelope_pb2.Envelope.FromString(bytes.fromhex(vector["envelope_hex"])) == envelope
    assert bytes.fromhex(vector["pae_hex"]) == _own_pae(envelope.payload_type, envelope.payload)
    if vector["payload_json"] is not None:
        message = message_class_of(vector["expected_payload_type"])()
        message.ParseFromString(envelope.payload)
        assert json_format.MessageToDict(message) == vector["payload_json"]


@pytest.mark.parametrize("vector", POSITIVE_STATEMENTS, ids=_ids(POSITIVE_STATEMENTS))
def test_positive_statement_verifies(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    issuer, signers = _independent_verify(vector)
    assert (issuer, signers) == (expected["issuer"], expected["signer_party_ids"])
    verified = _sdk_verify(vector)
    assert verified.issuer == expected["issuer"]
    assert list(verified.signer_party_ids) == expected["signer_party_ids"]
    assert verified.payload == bytes.fromhex(vector["envelope"]["payload_hex"])


@pytest.mark.parametrize("vector", NEGATIVE_STATEMENTS, ids=_ids(NEGATIVE_STATEMENTS))
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


# --- Merkle --------------------------------------------------------------------------

_LEAVES = [b"leaf-%d" % i for i in range(max(t["tree_size"] for t in MERKLE["trees"]))]


def _hexes(values: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


def test_tree_roots() -> None:
    assert MERKLE["leaf_rule"] == "leaf-<i>"
    for tree in MERKLE["trees"]:
        size = tree["tree_size"]
        assert ref.mth(_LEAVES[:size]).hex() == tree["root_hex"]
    assert MERKLE["trees"][0]["root_hex"] == hashlib.sha256(b"").hexdigest()
    assert merkle.empty_root().hex() == MERKLE["trees"][0]["root_hex"]


@pytest.mark.parametrize(
    "vector",
    MERKLE["inclusion"],
    ids=[f"{v['leaf_index']}-of-{v['tree_size']}" for v in MERKLE["inclusion"]],
)
def test_inclusion_vector(vector: dict[str, Any]) -> None:
    index, size = vector["leaf_index"], vector["tree_size"]
    leaf = bytes.fromhex(vector["leaf_hex"])
    leaf_hash = bytes.fromhex(vector["leaf_hash_hex"])
    path = _hexes(vector["audit_path"])
    root = bytes.fromhex(vector["root_hex"])
    # Independent: hashing, the recursive definition of PATH, and its verifier.
    assert leaf == _LEAVES[index]
    assert hashlib.sha256(b"\x00" + leaf).digest() == leaf_hash
    assert ref.path(index, _LEAVES[:size]) == path
    assert ref.root_from_path(leaf_hash, index, size, path) == root
    # SDK.
    merkle.verify_inclusion(leaf_hash, index, size, path, root)


@pytest.mark.parametrize(
    "vector",
    MERKLE["consistency"],
    ids=[f"{v['first_tree_size']}-to-{v['second_tree_size']}" for v in MERKLE["consistency"]],
)
def test_consistency_vector(vector: dict[str, Any]) -> None:
    first, second = vector["first_tree_size"], vector["second_tree_size"]
    path = _hexes(vector["consistency_path"])
    first_root = bytes.fromhex(vector["first_root_hex"])
    second_root = bytes.fromhex(vector["second_root_hex"])
    assert ref.proof(first, _LEAVES[:second]) == path
    assert ref.roots_from_proof(first, second, path, first_root) == (first_root, second_root)
    merkle.verify_consistency(first, second, path, first_root, second_root)


def _independent_inclusion(vector: dict[str, Any]) -> str | None:
    """docs/PROTOCOL.md §5.3 with the reference recursion; the failure reason or None."""
    index, size = vector["leaf_index"], vector["tree_size"]
    leaf_hash = bytes.fromhex(vector["leaf_hash_hex"])
    path = _hexes(vector["audit_path"])
    root = bytes.fromhex(vector["root_hex"])
    if not 0 <= index < size or any(len(h) != 32 for h in [leaf_hash, root, *path]):
        return "PROOF_INVALID"
    try:
        computed = ref.root_from_path(leaf_hash, index, size, path)
    except ValueError:
        return "PROOF_INVALID"
    return None if computed == root else "PROOF_INVALID"


def _independent_consistency(vector: dict[str, Any]) -> str | None:
    """docs/PROTOCOL.md §5.4 with the reference recursion; the failure reason or None."""
    first, second = vector["first_tree_size"], vector["second_tree_size"]
    path = _hexes(vector["consistency_path"])
    first_root = bytes.fromhex(vector["first_root_hex"])
    second_root = bytes.fromhex(vector["second_root_hex"])
    if not 0 < first <= second or any(len(h) != 32 for h in [first_root, second_root, *path]):
        return "PROOF_INVALID"
    if first == second:
        if path:
            return "PROOF_INVALID"
        return None if first_root == second_root else "CHECKPOINT_INCONSISTENT"
    try:
        roots = ref.roots_from_proof(first, second, path, first_root)
    except ValueError:
        return "PROOF_INVALID"
    return None if roots == (first_root, second_root) else "CHECKPOINT_INCONSISTENT"


def test_independent_merkle_checks_accept_the_positive_vectors() -> None:
    # Guards the two helpers above against rejecting everything.
    for vector in MERKLE["inclusion"]:
        assert _independent_inclusion(vector) is None
    for vector in MERKLE["consistency"]:
        assert _independent_consistency(vector) is None


@pytest.mark.parametrize(
    "vector", MERKLE["invalid_inclusion"], ids=_ids(MERKLE["invalid_inclusion"])
)
def test_invalid_inclusion_vector(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    assert _independent_inclusion(vector) == expected["reason"]
    with pytest.raises(ProofError) as sdk:
        merkle.verify_inclusion(
            bytes.fromhex(vector["leaf_hash_hex"]),
            vector["leaf_index"],
            vector["tree_size"],
            _hexes(vector["audit_path"]),
            bytes.fromhex(vector["root_hex"]),
        )
    assert sdk.value.reason_name == expected["reason"]
    assert sdk.value.code.name == expected["grpc_status"]


@pytest.mark.parametrize(
    "vector", MERKLE["invalid_consistency"], ids=_ids(MERKLE["invalid_consistency"])
)
def test_invalid_consistency_vector(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    assert _independent_consistency(vector) == expected["reason"]
    with pytest.raises(ProofError) as sdk:
        merkle.verify_consistency(
            vector["first_tree_size"],
            vector["second_tree_size"],
            _hexes(vector["consistency_path"]),
            bytes.fromhex(vector["first_root_hex"]),
            bytes.fromhex(vector["second_root_hex"]),
        )
    assert sdk.value.reason_name == expected["reason"]
    assert sdk.value.code.name == expected["grpc_status"]


# --- amounts -------------------------------------------------------------------------

_DIGITS = set("0123456789")


def _own_is_canonical(text: str) -> bool:
    """docs/PROTOCOL.md §2.1, character by character."""
    body = text.removeprefix("-")
    integer, dot, fraction = body.partition(".")
    if not integer or not set(integer) <= _DIGITS or len(integer) > 60:
        return False
    if len(integer) > 1 and integer[0] == "0":
        return False
    if dot and (
        not fraction or not set(fraction) <= _DIGITS or len(fraction) > 18 or fraction[-1] == "0"
    ):
        return False
    return text != "-0"


@pytest.mark.parametrize("text", AMOUNTS["canonical"])
def test_canonical_amount(text: str) -> None:
    assert _own_is_canonical(text)
    assert format_amount(parse_amount(text)) == text


@pytest.mark.parametrize(
    "vector", AMOUNTS["non_canonical"], ids=[repr(v["text"]) for v in AMOUNTS["non_canonical"]]
)
def test_non_canonical_amount(vector: dict[str, Any]) -> None:
    assert not _own_is_canonical(vector["text"])
    with pytest.raises(CollateralSyncError) as sdk:
        parse_amount(vector["text"])
    assert sdk.value.reason_name == vector["expected"]["reason"]
    assert sdk.value.code.name == vector["expected"]["grpc_status"]


@pytest.mark.parametrize("vector", AMOUNTS["formatting"], ids=lambda v: v["value"])
def test_amount_formatting(vector: dict[str, Any]) -> None:
    canonical = vector["canonical"]
    assert _own_is_canonical(canonical)
    assert decimal.Decimal(vector["value"]) == decimal.Decimal(canonical)
    assert format_amount(decimal.Decimal(vector["value"])) == canonical


@pytest.mark.parametrize("vector", AMOUNTS["unformattable"], ids=lambda v: v["why"])
def test_unformattable_amount(vector: dict[str, Any]) -> None:
    with pytest.raises(CollateralSyncError) as sdk:
        format_amount(decimal.Decimal(vector["value"]))
    assert sdk.value.reason == errors_pb2.ERROR_REASON_INVALID_AMOUNT
    assert sdk.value.reason_name == vector["expected"]["reason"]


# --- sync entries and chains (vectors/sync.json, docs/PROTOCOL.md §6.3-§6.5) ------------

SYNC = _load("sync.json")
POSITION_TREE = _load("position_tree.json")

_SYNC_PREFIX = b"collateral-sync/v1/sync-entry\x00"
_SYNC_PARTIES = {
    1: ("custodian.example", "exchange.example"),
    2: ("exchange.example", "custodian.example"),
}


def test_sync_and_position_tree_files_declare_the_format() -> None:
    for document, kind in ((SYNC, "sync"), (POSITION_TREE, "position_tree")):
        assert document["format"] == "collateral-sync-test-vectors"
        assert document["format_version"] == 1
        assert document["protocol"] == "collateral_sync.v1"
        assert document["kind"] == kind
    for vectors in (
        SYNC["entry_hash"],
        SYNC["invalid_entry_hash"],
        SYNC["chains"],
        SYNC["invalid_chains"],
        SYNC["receiving"],
        SYNC["batches"],
        POSITION_TREE["trees"],
        POSITION_TREE["invalid"],
    ):
        ids = _ids(vectors)
        assert len(ids) == len(set(ids))


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


@pytest.mark.parametrize("vector", SYNC["entry_hash"], ids=_ids(SYNC["entry_hash"]))
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


@pytest.mark.parametrize("vector", SYNC["invalid_entry_hash"], ids=_ids(SYNC["invalid_entry_hash"]))
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


@pytest.mark.parametrize("vector", SYNC["chains"], ids=_ids(SYNC["chains"]))
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


@pytest.mark.parametrize("vector", SYNC["invalid_chains"], ids=_ids(SYNC["invalid_chains"]))
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
    """§6.5 steps 3-4 from the document: compare every duplicate, then the first new entry."""
    log = vector["receiver_log"]
    stored: dict[int, str] = {}
    if log["entries_of"] is not None:
        chain = next(c for c in SYNC["chains"] if c["id"] == log["entries_of"])
        stored = {e["sequence"]: e["entry_hash_hex"] for e in chain["entries"]}
    head, head_hash = log["sequence"], log["entry_hash_hex"]
    new: list[dict[str, Any]] = []
    for entry in vector["entries"]:
        sequence = entry["sequence"]
        if sequence <= head:
            if entry["entry_hash_hex"] != stored[sequence]:
                return {
                    "reason": "EQUIVOCATION",
                    "metadata": {
                        "sequence": str(sequence),
                        "expected": stored[sequence],
                        "actual": entry["entry_hash_hex"],
                    },
                }
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


@pytest.mark.parametrize("vector", SYNC["receiving"], ids=_ids(SYNC["receiving"]))
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
    return _envelope(vector)


@pytest.mark.parametrize("vector", SYNC["batches"], ids=_ids(SYNC["batches"]))
def test_sync_batch_vector(vector: dict[str, Any]) -> None:
    envelope = _batch_envelope(vector)
    assert envelope_pb2.Envelope.FromString(bytes.fromhex(vector["envelope_hex"])) == envelope
    assert envelope.payload_type == "application/vnd.collateral-sync.v1.sync-batch+proto"
    # Every envelope is validly signed by the sender's registered key: the failures are in
    # the batch, not in the signature.
    registry = {k["keyId"]: base64.b64decode(k["publicKey"]) for k in SYNC["registry"]["keys"]}
    (signature,) = envelope.signatures
    assert _own_verify(
        registry[signature.key_id],
        _own_pae(envelope.payload_type, envelope.payload),
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


# --- position trees (vectors/position_tree.json, docs/PROTOCOL.md §10.3) ---------------

_LEAF_PREFIX = b"collateral-sync/v1/position-leaf\x00"


def _own_lp(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def _own_position_leaf(account: dict[str, Any]) -> bytes:
    """§10.3 from the document alone."""
    positions = sorted(account["positions"], key=lambda p: p["asset_id"].encode("utf-8"))
    parts = [_LEAF_PREFIX, _own_lp(account["account_id"]), len(positions).to_bytes(4, "big")]
    for p in positions:
        parts += [
            _own_lp(p[name])
            for name in ("asset_id", "quantity", "locked_quantity", "pledged_quantity")
        ]
    return b"".join(parts)


def _tree_positions(account: dict[str, Any]) -> list[common_pb2.Position]:
    """An account's positions as Position messages; a null amount is an absent Decimal.

    ``account_id`` is left unset (position_leaf takes the account id apart, and an unset
    one is allowed): protobuf cannot hold the lone surrogate of one invalid vector.
    """
    positions = []
    for given in account["positions"]:
        position = common_pb2.Position(asset_id=given["asset_id"])
        for name in ("quantity", "locked_quantity", "pledged_quantity"):
            if given[name] is not None:
                getattr(position, name).CopyFrom(common_pb2.Decimal(value=given[name]))
        positions.append(position)
    return positions


def test_position_tree_vectors_cover_what_the_spec_requires() -> None:
    assert bytes.fromhex(POSITION_TREE["leaf_prefix_hex"]) == _LEAF_PREFIX
    assert len(_LEAF_PREFIX) == 33  # 32 ASCII bytes and a zero byte (§10.3)
    sizes = {t["account_count"] for t in POSITION_TREE["trees"]}
    assert {0, 1} <= sizes
    assert max(sizes) >= 3
    reasons = {v["expected"]["reason"] for v in POSITION_TREE["invalid"]}
    assert reasons == {"INVALID_AMOUNT", "MALFORMED"}


@pytest.mark.parametrize("vector", POSITION_TREE["trees"], ids=_ids(POSITION_TREE["trees"]))
def test_position_tree_vector(vector: dict[str, Any]) -> None:
    accounts = vector["accounts"]
    leaves = [bytes.fromhex(leaf["leaf_hex"]) for leaf in vector["leaves"]]
    root = bytes.fromhex(vector["root_hex"])
    ordered = sorted(accounts, key=lambda a: a["account_id"].encode("utf-8"))
    assert [a["account_id"] for a in ordered] == [leaf["account_id"] for leaf in vector["leaves"]]
    assert vector["account_count"] == len(accounts)
    # Independent.
    assert [_own_position_leaf(a) for a in ordered] == leaves
    for leaf, given in zip(leaves, vector["leaves"], strict=True):
        assert hashlib.sha256(b"\x00" + leaf).hexdigest() == given["leaf_hash_hex"]
    assert ref.mth(leaves) == root
    # SDK: each leaf, from messages and from tuples, and the tree from the accounts as given.
    for account, leaf in zip(ordered, leaves, strict=True):
        assert position_leaf(account["account_id"], _tree_positions(account)) == leaf
        values = [
            (p["asset_id"], p["quantity"], p["locked_quantity"], p["pledged_quantity"])
            for p in account["positions"]
        ]
        assert position_leaf(account["account_id"], values) == leaf
        assert merkle.leaf_hash(leaf).hex() == next(
            v["leaf_hash_hex"] for v in vector["leaves"] if v["account_id"] == account["account_id"]
        )
    tree = PositionTree.build([(a["account_id"], _tree_positions(a)) for a in accounts])
    assert tree.size == len(leaves)
    assert tree.root == root
    assert [tree.leaf(i) for i in range(tree.size)] == leaves


@pytest.mark.parametrize("vector", POSITION_TREE["invalid"], ids=_ids(POSITION_TREE["invalid"]))
def test_invalid_position_tree_vector(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    accounts = [(a["account_id"], _tree_positions(a)) for a in vector["accounts"]]
    with pytest.raises(CollateralSyncError) as sdk:
        PositionTree.build(accounts)
    assert sdk.value.reason_name == expected["reason"], sdk.value.message
    assert sdk.value.code.name == expected["grpc_status"]
