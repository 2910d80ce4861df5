"""Signing keys, key ids, and the key registry (validity, rotation, revocation, files)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.keys import KeyRegistry, SigningKey, key_id
from collateral_sync.v1 import common_pb2, errors_pb2, keys_pb2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf import json_format, timestamp_pb2

CUSTODIAN = common_pb2.PARTY_ROLE_CUSTODIAN
EXCHANGE = common_pb2.PARTY_ROLE_EXCHANGE
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)

# RFC 8032 section 7.1, TEST 1.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_EMPTY_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
    "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def _key(n: int, party: str = "custodian-1", role: int = CUSTODIAN) -> SigningKey:
    return SigningKey.from_seed(bytes([n]) * 32, party, role)


def _reason(info: pytest.ExceptionInfo[Exception]) -> str:
    return errors_pb2.ErrorReason.Name(info.value.reason)  # type: ignore[attr-defined]


# --- key ids and signing keys -------------------------------------------------


def test_key_id_of_fixed_seed_is_sha256_of_raw_public_key() -> None:
    key = SigningKey.from_seed(RFC8032_SEED, "custodian-1", CUSTODIAN)
    # Public key derived independently (OpenSSL via cryptography) and from the RFC.
    independent = (
        Ed25519PrivateKey.from_private_bytes(RFC8032_SEED)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert independent == RFC8032_PUBLIC == key.public_key
    expected = hashlib.sha256(RFC8032_PUBLIC).hexdigest()
    assert expected == "21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9"
    assert key.key_id == expected
    assert key_id(RFC8032_PUBLIC) == expected


def test_signature_matches_rfc8032_vector() -> None:
    key = SigningKey.from_seed(RFC8032_SEED, "custodian-1", CUSTODIAN)
    assert key.sign(b"") == RFC8032_EMPTY_SIG
    signature = key.sign(b"statement bytes")
    assert len(signature) == 64
    Ed25519PublicKey.from_public_bytes(key.public_key).verify(signature, b"statement bytes")


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_key_id_refuses_other_lengths(length: int) -> None:
    with pytest.raises(MalformedError) as info:
        key_id(b"\x01" * length)
    assert info.value.metadata == {"expected": "32", "actual": str(length)}


def test_signing_key_refuses_bad_seed_party_or_role() -> None:
    with pytest.raises(MalformedError):
        SigningKey.from_seed(b"\x00" * 31, "custodian-1", CUSTODIAN)
    with pytest.raises(MalformedError):
        SigningKey.from_seed(b"\x00" * 32, "", CUSTODIAN)
    with pytest.raises(MalformedError):
        SigningKey.from_seed(b"\x00" * 32, "custodian-1", common_pb2.PARTY_ROLE_UNSPECIFIED)
    with pytest.raises(MalformedError):
        SigningKey.from_seed(b"\x00" * 32, "custodian-1", 99)


def test_generated_keys_differ_and_keep_party_and_role() -> None:
    first = SigningKey.generate("exchange-1", EXCHANGE)
    second = SigningKey.generate("exchange-1", EXCHANGE)
    assert first.key_id != second.key_id
    assert (first.party_id, first.role) == ("exchange-1", EXCHANGE)
    assert SigningKey.from_seed(first.seed, "exchange-1", EXCHANGE).key_id == first.key_id


def test_party_key_entry() -> None:
    key = _key(1)
    entry = key.party_key(T0, T0 + timedelta(days=365))
    assert entry.party_id == "custodian-1"
    assert entry.role == CUSTODIAN
    assert entry.public_key == key.public_key
    assert entry.key_id == key.key_id
    assert entry.valid_from.ToDatetime(tzinfo=UTC) == T0
    assert entry.valid_until.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=365)
    assert not entry.HasField("revoked_at")
    assert not key.party_key(T0).HasField("valid_until")
    with pytest.raises(ValueError, match="timezone-aware"):
        key.party_key(datetime(2026, 1, 1))


def test_repr_does_not_reveal_the_seed() -> None:
    key = _key(7)
    assert key.seed.hex() not in repr(key)
    assert "custodian-1" in repr(key)


def test_signing_key_file_round_trip_and_mode(tmp_path: Path) -> None:
    key = _key(3, "exchange-1", EXCHANGE)
    path = tmp_path / "exchange.key.json"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document == {
        "party_id": "exchange-1",
        "role": "PARTY_ROLE_EXCHANGE",
        "seed": (bytes([3]) * 32).hex(),
    }
    loaded = SigningKey.load(path)
    assert (loaded.party_id, loaded.role, loaded.key_id) == ("exchange-1", EXCHANGE, key.key_id)
    assert loaded.sign(b"x") == key.sign(b"x")


def test_save_over_a_readable_file_leaves_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text("old")
    path.chmod(0o644)
    _key(1).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"party_id": "p", "role": "PARTY_ROLE_CUSTODIAN"}', "expected fields"),
        (
            '{"party_id": "p", "role": "PARTY_ROLE_CUSTODIAN", "seed": "%s", "x": 1}' % ("00" * 32),
            "expected fields",
        ),
        (
            '{"party_id": "", "role": "PARTY_ROLE_CUSTODIAN", "seed": "%s"}' % ("00" * 32),
            "party_id",
        ),
        ('{"party_id": "p", "role": "CUSTODIAN", "seed": "%s"}' % ("00" * 32), "role"),
        ('{"party_id": "p", "role": 1, "seed": "%s"}' % ("00" * 32), "role"),
        (
            '{"party_id": "p", "role": "PARTY_ROLE_UNSPECIFIED", "seed": "%s"}' % ("00" * 32),
            "role",
        ),
        ('{"party_id": "p", "role": "PARTY_ROLE_CUSTODIAN", "seed": "00"}', "64 hex digits"),
        ('{"party_id": "p", "role": "PARTY_ROLE_CUSTODIAN", "seed": "%s"}' % ("zz" * 32), "hex"),
    ],
)
def test_malformed_signing_key_file_is_refused(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(MalformedError, match=problem):
        SigningKey.load(path)


def test_non_utf8_key_file_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MalformedError, match="UTF-8"):
        SigningKey.load(path)


# --- registry: adding keys ----------------------------------------------------


def test_add_and_get() -> None:
    key = _key(1)
    registry = KeyRegistry()
    registry.add(key.party_key(T0))
    assert key.key_id in registry
    assert len(registry) == 1
    entry = registry.get(key.key_id)
    assert entry is not None
    assert entry.public_key == key.public_key
    assert registry.get("0" * 64) is None


def test_get_returns_a_copy() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0)])
    entry = registry.get(key.key_id)
    assert entry is not None
    entry.revoked_at.FromDatetime(T0)
    entry.party_id = "someone-else"
    registry.resolve(key.key_id, at=T0 + US, party_id="custodian-1")


def test_add_copies_the_callers_entry() -> None:
    key = _key(1)
    entry = key.party_key(T0)
    registry = KeyRegistry([entry])
    entry.revoked_at.FromDatetime(T0)
    registry.resolve(key.key_id, at=T0 + US)


def _entry(**changes: object) -> keys_pb2.PartyKey:
    entry = _key(1).party_key(T0)
    for name, value in changes.items():
        setattr(entry, name, value)
    return entry


@pytest.mark.parametrize(
    ("entry", "metadata"),
    [
        (_entry(key_id="ab" * 32), {"expected": _key(1).key_id, "actual": "ab" * 32}),
        (
            _entry(key_id=_key(1).key_id.upper()),
            {"expected": _key(1).key_id, "actual": _key(1).key_id.upper()},
        ),
        (_entry(public_key=b"\x01" * 31), {"expected": "32", "actual": "31"}),
        (
            _entry(role=common_pb2.PARTY_ROLE_UNSPECIFIED),
            {"expected": "PARTY_ROLE_CUSTODIAN..KEY_REGISTRY", "actual": "PARTY_ROLE_UNSPECIFIED"},
        ),
        (_entry(role=42), {"expected": "PARTY_ROLE_CUSTODIAN..KEY_REGISTRY", "actual": "42"}),
        (_entry(party_id=""), {"expected": "non-empty", "actual": ""}),
    ],
)
def test_add_refuses_inconsistent_entries(
    entry: keys_pb2.PartyKey, metadata: dict[str, str]
) -> None:
    registry = KeyRegistry()
    with pytest.raises(MalformedError) as info:
        registry.add(entry)
    assert info.value.metadata == metadata
    assert len(registry) == 0


def test_add_refuses_bad_validity_fields() -> None:
    no_start = _key(1).party_key(T0)
    no_start.ClearField("valid_from")
    with pytest.raises(MalformedError, match="valid_from"):
        KeyRegistry().add(no_start)
    backwards = _key(1).party_key(T0, T0)
    with pytest.raises(MalformedError, match="valid_until"):
        KeyRegistry().add(backwards)
    bad_nanos = _key(1).party_key(T0)
    bad_nanos.valid_until.CopyFrom(timestamp_pb2.Timestamp(seconds=2_000_000_000, nanos=-1))
    with pytest.raises(MalformedError, match="not a valid timestamp"):
        KeyRegistry().add(bad_nanos)


def test_duplicate_key_id_is_refused() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0)])
    with pytest.raises(StateError) as info:
        registry.add(key.party_key(T0 + timedelta(days=1)))
    assert info.value.metadata["actual"] == key.key_id
    # Same key for another party is still the same key id.
    with pytest.raises(StateError):
        registry.add(SigningKey.from_seed(key.seed, "exchange-1", EXCHANGE).party_key(T0))


# --- registry: resolving keys -------------------------------------------------


def test_resolve_unknown_key() -> None:
    with pytest.raises(VerificationError) as info:
        KeyRegistry().resolve("ab" * 32, at=T0)
    assert _reason(info) == "ERROR_REASON_KEY_UNKNOWN"
    assert info.value.metadata["actual"] == "ab" * 32


def test_resolve_checks_validity_window_bounds() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0, T0 + timedelta(days=10))])
    assert registry.resolve(key.key_id, at=T0).key_id == key.key_id  # start is inclusive
    registry.resolve(key.key_id, at=T0 + timedelta(days=10) - US)
    for outside in (T0 - US, T0 + timedelta(days=10)):  # end is exclusive
        with pytest.raises(VerificationError) as info:
            registry.resolve(key.key_id, at=outside)
        assert _reason(info) == "ERROR_REASON_KEY_NOT_VALID"
        assert info.value.metadata["expected"] == "[2026-03-01T12:00:00Z, 2026-03-11T12:00:00Z)"


def test_resolve_accepts_a_timestamp_with_nanoseconds() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0)])
    start = int(T0.timestamp())
    registry.resolve(key.key_id, at=timestamp_pb2.Timestamp(seconds=start, nanos=0))
    with pytest.raises(VerificationError):
        registry.resolve(
            key.key_id, at=timestamp_pb2.Timestamp(seconds=start - 1, nanos=999_999_999)
        )


def test_resolve_checks_role_and_party() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0)])
    registry.resolve(key.key_id, at=T0, roles={CUSTODIAN, EXCHANGE}, party_id="custodian-1")
    with pytest.raises(VerificationError) as info:
        registry.resolve(key.key_id, at=T0, roles={EXCHANGE})
    assert _reason(info) == "ERROR_REASON_KEY_ROLE_MISMATCH"
    assert info.value.metadata == {
        "expected": "PARTY_ROLE_EXCHANGE",
        "actual": "PARTY_ROLE_CUSTODIAN",
    }
    with pytest.raises(VerificationError) as info:
        registry.resolve(key.key_id, at=T0, party_id="custodian-2")
    assert _reason(info) == "ERROR_REASON_KEY_ROLE_MISMATCH"
    assert info.value.metadata == {"expected": "custodian-2", "actual": "custodian-1"}


def test_revocation_applies_at_and_after_revoked_at() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0)])
    registry.revoke(key.key_id, T0 + timedelta(days=5))
    registry.resolve(key.key_id, at=T0 + timedelta(days=5) - US)
    for at in (T0 + timedelta(days=5), T0 + timedelta(days=6)):
        with pytest.raises(VerificationError) as info:
            registry.resolve(key.key_id, at=at)
        assert _reason(info) == "ERROR_REASON_KEY_REVOKED"
        assert info.value.metadata["expected"] == "before 2026-03-06T12:00:00Z"


def test_a_later_revocation_does_not_undo_an_earlier_one() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0)])
    registry.revoke(key.key_id, T0 + timedelta(days=1))
    registry.revoke(key.key_id, T0 + timedelta(days=9))
    with pytest.raises(VerificationError):
        registry.resolve(key.key_id, at=T0 + timedelta(days=2))


def test_revoking_an_unknown_key_is_not_found() -> None:
    with pytest.raises(StateError) as info:
        KeyRegistry().revoke("ab" * 32, T0)
    assert _reason(info) == "ERROR_REASON_NOT_FOUND"


def test_rotation_ends_the_old_key_and_adds_the_new() -> None:
    old, new = _key(1), _key(2)
    registry = KeyRegistry([old.party_key(T0)])
    rotation = T0 + timedelta(days=30)
    registry.rotate(old.key_id, new.party_key(rotation), rotation)
    registry.resolve(old.key_id, at=rotation - US)
    with pytest.raises(VerificationError) as info:
        registry.resolve(old.key_id, at=rotation)
    assert _reason(info) == "ERROR_REASON_KEY_NOT_VALID"
    registry.resolve(new.key_id, at=rotation)
    assert [k.key_id for k in registry.keys_for("custodian-1")] == [old.key_id, new.key_id]


def test_rotation_never_extends_an_earlier_end() -> None:
    old, new = _key(1), _key(2)
    registry = KeyRegistry([old.party_key(T0, T0 + timedelta(days=1))])
    registry.rotate(old.key_id, new.party_key(T0), T0 + timedelta(days=5))
    with pytest.raises(VerificationError):
        registry.resolve(old.key_id, at=T0 + timedelta(days=2))


def test_rotation_refusals() -> None:
    old = _key(1)
    registry = KeyRegistry([old.party_key(T0)])
    other_party = _key(2, "custodian-2")
    with pytest.raises(StateError, match="keep party and role"):
        registry.rotate(old.key_id, other_party.party_key(T0), T0 + timedelta(days=1))
    other_role = _key(3, "custodian-1", EXCHANGE)
    with pytest.raises(StateError, match="keep party and role"):
        registry.rotate(old.key_id, other_role.party_key(T0), T0 + timedelta(days=1))
    with pytest.raises(StateError, match="after the old key's valid_from"):
        registry.rotate(old.key_id, _key(4).party_key(T0), T0)
    with pytest.raises(StateError, match="already registered"):
        registry.rotate(old.key_id, old.party_key(T0), T0 + timedelta(days=1))
    with pytest.raises(StateError) as info:
        registry.rotate("ab" * 32, _key(5).party_key(T0), T0 + timedelta(days=1))
    assert _reason(info) == "ERROR_REASON_NOT_FOUND"
    # Nothing was changed by the refused rotations.
    assert len(registry) == 1
    registry.resolve(old.key_id, at=T0 + timedelta(days=100))


def test_verify_signature() -> None:
    key = _key(1)
    registry = KeyRegistry([key.party_key(T0)])
    signature = key.sign(b"data")
    assert registry.verify_signature(key.key_id, b"data", signature)
    assert not registry.verify_signature(key.key_id, b"datA", signature)
    assert not registry.verify_signature(key.key_id, b"data", _key(2).sign(b"data"))
    with pytest.raises(VerificationError) as info:
        registry.verify_signature(_key(2).key_id, b"data", signature)
    assert _reason(info) == "ERROR_REASON_KEY_UNKNOWN"
    with pytest.raises(MalformedError):
        registry.verify_signature(key.key_id, b"data", signature[:63])


# --- registry: proto and files ------------------------------------------------


def _populated_registry() -> KeyRegistry:
    custodian, exchange, rotated = _key(1), _key(2, "exchange-1", EXCHANGE), _key(3)
    registry = KeyRegistry([custodian.party_key(T0), exchange.party_key(T0)])
    registry.rotate(
        custodian.key_id, rotated.party_key(T0 + timedelta(days=1)), T0 + timedelta(days=1)
    )
    registry.revoke(exchange.key_id, T0 + timedelta(days=2, microseconds=5))
    return registry


def test_proto_round_trip() -> None:
    registry = _populated_registry()
    message = registry.to_proto()
    assert len(message.keys) == 3
    again = KeyRegistry.from_proto(message)
    assert again.to_proto() == message


def test_json_file_round_trip(tmp_path: Path) -> None:
    registry = _populated_registry()
    path = tmp_path / "registry.json"
    registry.save(path)
    document = json.loads(path.read_text())
    first = document["keys"][0]
    # The proto3 JSON mapping: enum names, base64 bytes, RFC 3339 timestamps.
    assert first["partyId"] == "custodian-1"
    assert first["role"] == "PARTY_ROLE_CUSTODIAN"
    assert first["validFrom"] == "2026-03-01T12:00:00Z"
    assert first["validUntil"] == "2026-03-02T12:00:00Z"
    assert document["keys"][1]["revokedAt"] == "2026-03-03T12:00:00.000005Z"
    loaded = KeyRegistry.load(path)
    assert loaded.to_proto() == registry.to_proto()
    with pytest.raises(VerificationError):
        loaded.resolve(_key(2, "exchange-1", EXCHANGE).key_id, at=T0 + timedelta(days=3))


def test_registry_file_with_proto_field_names_is_read(tmp_path: Path) -> None:
    key = _key(1)
    path = tmp_path / "registry.json"
    entry = key.party_key(T0)
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "party_id": entry.party_id,
                        "role": "PARTY_ROLE_CUSTODIAN",
                        "public_key": base64.b64encode(entry.public_key).decode(),
                        "key_id": entry.key_id,
                        "valid_from": "2026-03-01T12:00:00Z",
                    }
                ]
            }
        )
    )
    assert KeyRegistry.load(path).resolve(key.key_id, at=T0).party_id == "custodian-1"


def test_malformed_registry_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text("{not json")
    with pytest.raises(MalformedError, match=r"registry\.json"):
        KeyRegistry.load(path)
    path.write_text('{"keys": [{"role": "NO_SUCH_ROLE"}]}')
    with pytest.raises(MalformedError):
        KeyRegistry.load(path)
    # Well-formed JSON, inconsistent entry: key id not the hash of the key.
    tampered = _key(1).party_key(T0)
    tampered.key_id = _key(2).key_id
    path.write_text(json_format.MessageToJson(keys_pb2.KeyRegistry(keys=[tampered])))
    with pytest.raises(MalformedError) as info:
        KeyRegistry.load(path)
    assert info.value.metadata == {"expected": _key(1).key_id, "actual": _key(2).key_id}
