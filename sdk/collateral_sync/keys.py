"""Ed25519 keys of the protocol parties, and the registry that says which key speaks for whom.

A party signs with a :class:`SigningKey` bound to its party id and one
``PartyRole`` (or with a key that never leaves a hardware token: any
:class:`collateral_sync.signer.Signer` signs). Counterparties know its public half as a ``PartyKey`` held in a
:class:`KeyRegistry`, which records each key's validity window, rotation and
revocation, and answers one question for verifiers: may this key sign for this
party, in this role, at this time (:meth:`KeyRegistry.resolve`)?

A key id is the lowercase hex SHA-256 of the 32-byte raw Ed25519 public key.

Files
-----
Signing key file (secret; written with mode 0600)::

    {"party_id": "custodian-1", "role": "PARTY_ROLE_CUSTODIAN", "seed": "<64 hex digits>"}

``seed`` is the 32-byte Ed25519 seed (RFC 8032 private key) in hex.

Key registry file (public): the proto3 JSON mapping of
``collateral_sync.v1.KeyRegistry``, so any language's protobuf library reads it::

    {"keys": [{"partyId": "custodian-1", "role": "PARTY_ROLE_CUSTODIAN",
               "publicKey": "<base64>", "keyId": "<64 hex digits>",
               "validFrom": "2026-01-01T00:00:00Z",
               "validUntil": "2027-01-01T00:00:00Z",
               "revokedAt": "2026-06-01T12:00:00Z"}]}

``validUntil`` and ``revokedAt`` are optional. Readers accept the proto field
names (``party_id``…) too, as the proto3 JSON mapping requires.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nacl.exceptions
import nacl.signing
from google.protobuf import json_format, timestamp_pb2

from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.v1 import common_pb2, errors_pb2, keys_pb2

__all__ = [
    "KeyRegistry",
    "SigningKey",
    "key_id",
    "role_name",
]

_R = errors_pb2.ErrorReason
_ROLE = common_pb2.PartyRole

_PUBLIC_KEY_BYTES = 32
_SEED_BYTES = 32
_SIGNATURE_BYTES = 64
_NS_PER_S = 1_000_000_000
# Range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
_TS_MIN_SECONDS = -62_135_596_800
_TS_MAX_SECONDS = 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

PathLike = str | os.PathLike[str]


def key_id(public_key: bytes) -> str:
    """Lowercase hex SHA-256 of a 32-byte raw Ed25519 public key."""
    if len(public_key) != _PUBLIC_KEY_BYTES:
        raise MalformedError(
            f"public key must be {_PUBLIC_KEY_BYTES} bytes, got {len(public_key)}",
            metadata={"expected": str(_PUBLIC_KEY_BYTES), "actual": str(len(public_key))},
        )
    return hashlib.sha256(public_key).hexdigest()


def role_name(role: int) -> str:
    """Enum name of a PartyRole value, or the number if it is not one."""
    try:
        return _ROLE.Name(role)  # type: ignore[arg-type]
    except ValueError:
        return str(role)


def _check_role(role: int, what: str) -> None:
    if role == _ROLE.PARTY_ROLE_UNSPECIFIED or role not in _ROLE.values():
        raise MalformedError(
            f"{what}: role must be a PartyRole other than PARTY_ROLE_UNSPECIFIED, "
            f"got {role_name(role)}",
            metadata={"expected": "PARTY_ROLE_CUSTODIAN..KEY_REGISTRY", "actual": role_name(role)},
        )


def _check_party_id(party_id: str, what: str) -> None:
    if not party_id:
        raise MalformedError(
            f"{what}: party_id must be non-empty", metadata={"expected": "non-empty", "actual": ""}
        )


# --- time -------------------------------------------------------------------
# Comparisons run on integer nanoseconds since the epoch: exact for Timestamps
# (which carry nanoseconds) and cheap on the verification path.


def _require_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value!r}")


def _datetime_ns(value: datetime) -> int:
    _require_aware(value, "datetime")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * _NS_PER_S + delta.microseconds * 1_000


def _timestamp_ns(value: timestamp_pb2.Timestamp) -> int:
    return value.seconds * _NS_PER_S + value.nanos


def _instant_ns(value: datetime | timestamp_pb2.Timestamp) -> int:
    if isinstance(value, datetime):
        return _datetime_ns(value)
    return _timestamp_ns(value)


def _timestamp_is_valid(value: timestamp_pb2.Timestamp) -> bool:
    return _TS_MIN_SECONDS <= value.seconds <= _TS_MAX_SECONDS and 0 <= value.nanos < _NS_PER_S


def _to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    _require_aware(value, "datetime")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _format_ns(ns: int) -> str:
    """RFC 3339 text of an instant for error messages; raw nanoseconds if out of range."""
    seconds, nanos = divmod(ns, _NS_PER_S)
    if not _TS_MIN_SECONDS <= seconds <= _TS_MAX_SECONDS:
        return f"{ns}ns since epoch"
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()


# --- files ------------------------------------------------------------------


def _write_file(path: PathLike, data: bytes, mode: int) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; widen only when asked (public registry files).
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_text(path: PathLike, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MalformedError(
            f"{what} {os.fspath(path)!s} is not UTF-8 text",
            metadata={"expected": "UTF-8 JSON", "actual": "undecodable bytes"},
        ) from err


# --- signing keys -------------------------------------------------------------


def _party_key(
    party_id: str,
    role: int,
    public_key: bytes,
    valid_from: datetime,
    valid_until: datetime | None,
) -> keys_pb2.PartyKey:
    """The registry entry of a public key; every kind of signing key registers through it."""
    entry = keys_pb2.PartyKey(
        party_id=party_id,
        role=role,  # type: ignore[arg-type]
        public_key=public_key,
        key_id=key_id(public_key),
    )
    entry.valid_from.CopyFrom(_to_timestamp(valid_from))
    if valid_until is not None:
        entry.valid_until.CopyFrom(_to_timestamp(valid_until))
    return entry


class SigningKey:
    """A party's Ed25519 private key, bound to its party id and role."""

    __slots__ = ("_key", "_key_id", "_party_id", "_public_key", "_role")

    def __init__(self, key: nacl.signing.SigningKey, party_id: str, role: int) -> None:
        _check_party_id(party_id, "signing key")
        _check_role(role, "signing key")
        self._key = key
        self._party_id = party_id
        self._role = role
        self._public_key: bytes = bytes(key.verify_key)
        self._key_id = key_id(self._public_key)

    @classmethod
    def generate(cls, party_id: str, role: int) -> SigningKey:
        """A new random key."""
        return cls(nacl.signing.SigningKey.generate(), party_id, role)

    @classmethod
    def from_seed(cls, seed: bytes, party_id: str, role: int) -> SigningKey:
        """The key derived from a 32-byte Ed25519 seed."""
        if len(seed) != _SEED_BYTES:
            raise MalformedError(
                f"seed must be {_SEED_BYTES} bytes, got {len(seed)}",
                metadata={"expected": str(_SEED_BYTES), "actual": str(len(seed))},
            )
        return cls(nacl.signing.SigningKey(seed), party_id, role)

    @property
    def party_id(self) -> str:
        return self._party_id

    @property
    def role(self) -> int:
        return self._role

    @property
    def public_key(self) -> bytes:
        """32-byte raw Ed25519 public key."""
        return self._public_key

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Handle with care."""
        return bytes(self._key)

    def sign(self, data: bytes) -> bytes:
        """64-byte detached Ed25519 signature over ``data``."""
        signature: bytes = self._key.sign(data).signature
        return signature

    def party_key(
        self, valid_from: datetime, valid_until: datetime | None = None
    ) -> keys_pb2.PartyKey:
        """The public registry entry for this key."""
        return _party_key(self._party_id, self._role, self._public_key, valid_from, valid_until)

    def save(self, path: PathLike) -> None:
        """Write the key file (see the module docstring) with mode 0600."""
        document = {
            "party_id": self._party_id,
            "role": role_name(self._role),
            "seed": self.seed.hex(),
        }
        _write_file(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"), 0o600)

    @classmethod
    def load(cls, path: PathLike) -> SigningKey:
        """Read a key file written by :meth:`save`; refuse anything malformed."""
        where = os.fspath(path)
        try:
            document = json.loads(_read_text(path, "signing key file"))
        except json.JSONDecodeError as err:
            raise MalformedError(
                f"signing key file {where}: not JSON ({err.msg} at line {err.lineno})",
                metadata={"expected": "JSON object", "actual": "invalid JSON"},
            ) from err
        if not isinstance(document, dict):
            raise MalformedError(
                f"signing key file {where}: expected a JSON object, got {type(document).__name__}",
                metadata={"expected": "object", "actual": type(document).__name__},
            )
        expected_fields = {"party_id", "role", "seed"}
        if set(document) != expected_fields:
            raise MalformedError(
                f"signing key file {where}: expected fields {sorted(expected_fields)}, "
                f"got {sorted(document)}",
                metadata={
                    "expected": ",".join(sorted(expected_fields)),
                    "actual": ",".join(sorted(document)),
                },
            )
        party_id, role, seed_hex = document["party_id"], document["role"], document["seed"]
        if not isinstance(party_id, str) or not party_id:
            raise MalformedError(
                f"signing key file {where}: party_id must be a non-empty string, got {party_id!r}",
                metadata={"expected": "non-empty string", "actual": repr(party_id)},
            )
        if not isinstance(role, str) or role not in _ROLE.keys():  # noqa: SIM118 (enum wrapper)
            raise MalformedError(
                f"signing key file {where}: role must be a PartyRole name, got {role!r}",
                metadata={"expected": "PARTY_ROLE_* name", "actual": repr(role)},
            )
        if not isinstance(seed_hex, str) or len(seed_hex) != 2 * _SEED_BYTES:
            actual = len(seed_hex) if isinstance(seed_hex, str) else type(seed_hex).__name__
            raise MalformedError(
                f"signing key file {where}: seed must be {2 * _SEED_BYTES} hex digits, "
                f"got {actual}",
                metadata={"expected": f"{2 * _SEED_BYTES} hex digits", "actual": str(actual)},
            )
        try:
            seed = bytes.fromhex(seed_hex)
        except ValueError as err:
            raise MalformedError(
                f"signing key file {where}: seed is not hex",
                metadata={"expected": "hex digits", "actual": "non-hex characters"},
            ) from err
        return cls.from_seed(seed, party_id, _ROLE.Value(role))

    def __repr__(self) -> str:
        # Never the seed.
        return (
            f"SigningKey(party_id={self._party_id!r}, role={role_name(self._role)}, "
            f"key_id={self._key_id[:16]}…)"
        )


# --- registry -----------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    key: keys_pb2.PartyKey  # the registry's own copy; never handed out
    verify_key: nacl.signing.VerifyKey  # cached: building one per verification is waste


class KeyRegistry:
    """Public keys of the parties, by key id, with validity, rotation and revocation."""

    __slots__ = ("_entries",)

    def __init__(self, keys: Iterable[keys_pb2.PartyKey] = ()) -> None:
        self._entries: dict[str, _Entry] = {}
        for party_key in keys:
            self.add(party_key)

    # -- changes --

    def add(self, party_key: keys_pb2.PartyKey) -> None:
        """Register a key; refuse an inconsistent entry or a key id already present."""
        entry = self._checked_entry(party_key)
        if entry.key.key_id in self._entries:
            raise StateError(
                f"key {entry.key.key_id} is already registered",
                metadata={"expected": "new key id", "actual": entry.key.key_id},
            )
        self._entries[entry.key.key_id] = entry

    def rotate(self, old_key_id: str, new_key: keys_pb2.PartyKey, at: datetime) -> None:
        """Replace a key: the old one stops being valid at ``at``; the new one is added.

        The new key must belong to the same party and role as the old one.
        """
        old = self._existing(old_key_id)
        entry = self._checked_entry(new_key)
        if entry.key.key_id in self._entries:
            raise StateError(
                f"key {entry.key.key_id} is already registered",
                metadata={"expected": "new key id", "actual": entry.key.key_id},
            )
        if (entry.key.party_id, entry.key.role) != (old.key.party_id, old.key.role):
            expected = f"{old.key.party_id}/{role_name(old.key.role)}"
            actual = f"{entry.key.party_id}/{role_name(entry.key.role)}"
            raise StateError(
                f"rotation must keep party and role: expected {expected}, got {actual}",
                metadata={"expected": expected, "actual": actual},
            )
        at_ns = _datetime_ns(at)
        if at_ns <= _timestamp_ns(old.key.valid_from):
            valid_from = old.key.valid_from.ToJsonString()
            raise StateError(
                f"rotation time must be after the old key's valid_from {valid_from}, "
                f"got {_format_ns(at_ns)}",
                metadata={"expected": f"after {valid_from}", "actual": _format_ns(at_ns)},
            )
        # An earlier end already in force stays: rotation never extends a key's life.
        if not old.key.HasField("valid_until") or at_ns < _timestamp_ns(old.key.valid_until):
            old.key.valid_until.CopyFrom(_to_timestamp(at))
        self._entries[entry.key.key_id] = entry

    def revoke(self, key_id: str, at: datetime) -> None:
        """Revoke a key: statements issued at or after ``at`` are refused."""
        entry = self._existing(key_id)
        at_ns = _datetime_ns(at)
        if not entry.key.HasField("revoked_at") or at_ns < _timestamp_ns(entry.key.revoked_at):
            entry.key.revoked_at.CopyFrom(_to_timestamp(at))

    def replace(self, other: KeyRegistry) -> None:
        """Hold exactly ``other``'s keys from now on, in one step (a new registry version).

        Whoever holds this registry sees either the old keys or the new ones, never
        a mix: the entries are swapped whole.
        """
        self._entries = dict(other._entries)

    # -- queries --

    def get(self, key_id: str) -> keys_pb2.PartyKey | None:
        """A copy of the entry for ``key_id``, or None."""
        entry = self._entries.get(key_id)
        return None if entry is None else _copy(entry.key)

    def keys_for(self, party_id: str) -> list[keys_pb2.PartyKey]:
        """Copies of every key registered for ``party_id``, in registration order."""
        return [_copy(e.key) for e in self._entries.values() if e.key.party_id == party_id]

    def resolve(
        self,
        key_id: str,
        *,
        at: datetime | timestamp_pb2.Timestamp,
        roles: Collection[int] | None = None,
        party_id: str | None = None,
    ) -> keys_pb2.PartyKey:
        """The key ``key_id`` if it may sign, at instant ``at``, for ``party_id`` in ``roles``.

        Checks identity before time: unknown key (KEY_UNKNOWN), another party or a
        role not in ``roles`` (KEY_ROLE_MISMATCH), revoked at or before ``at``
        (KEY_REVOKED), ``at`` outside [valid_from, valid_until) (KEY_NOT_VALID).
        """
        entry = self._entries.get(key_id)
        if entry is None:
            raise VerificationError(
                f"key {key_id} is not in the registry",
                reason=_R.ERROR_REASON_KEY_UNKNOWN,
                metadata={"expected": "registered key id", "actual": key_id},
            )
        key = entry.key
        if party_id is not None and key.party_id != party_id:
            raise VerificationError(
                f"key {key_id} belongs to party {key.party_id!r}, expected {party_id!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": party_id, "actual": key.party_id},
            )
        if roles is not None and key.role not in roles:
            expected = "|".join(sorted(role_name(r) for r in roles))
            raise VerificationError(
                f"key {key_id} has role {role_name(key.role)}, expected one of {expected}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": expected, "actual": role_name(key.role)},
            )
        at_ns = _instant_ns(at)
        if key.HasField("revoked_at") and at_ns >= _timestamp_ns(key.revoked_at):
            revoked = key.revoked_at.ToJsonString()
            raise VerificationError(
                f"key {key_id} was revoked at {revoked}, before {_format_ns(at_ns)}",
                reason=_R.ERROR_REASON_KEY_REVOKED,
                metadata={"expected": f"before {revoked}", "actual": _format_ns(at_ns)},
            )
        valid_from = _timestamp_ns(key.valid_from)
        has_until = key.HasField("valid_until")
        if at_ns < valid_from or (has_until and at_ns >= _timestamp_ns(key.valid_until)):
            window = (
                f"[{key.valid_from.ToJsonString()}, "
                f"{key.valid_until.ToJsonString() if has_until else 'no end'})"
            )
            raise VerificationError(
                f"key {key_id} is valid in {window}, not at {_format_ns(at_ns)}",
                reason=_R.ERROR_REASON_KEY_NOT_VALID,
                metadata={"expected": window, "actual": _format_ns(at_ns)},
            )
        return _copy(key)

    def verify_signature(self, key_id: str, data: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is the registered key's Ed25519 signature over ``data``.

        Says nothing about validity windows or roles (that is :meth:`resolve`).
        Unknown key ids raise KEY_UNKNOWN; a signature not 64 bytes is MALFORMED.
        """
        entry = self._entries.get(key_id)
        if entry is None:
            raise VerificationError(
                f"key {key_id} is not in the registry",
                reason=_R.ERROR_REASON_KEY_UNKNOWN,
                metadata={"expected": "registered key id", "actual": key_id},
            )
        if len(signature) != _SIGNATURE_BYTES:
            raise MalformedError(
                f"signature must be {_SIGNATURE_BYTES} bytes, got {len(signature)}",
                metadata={"expected": str(_SIGNATURE_BYTES), "actual": str(len(signature))},
            )
        try:
            entry.verify_key.verify(data, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[keys_pb2.PartyKey]:
        """Copies of every entry, in registration order."""
        return (_copy(e.key) for e in list(self._entries.values()))

    # -- serialisation --

    def to_proto(self) -> keys_pb2.KeyRegistry:
        return keys_pb2.KeyRegistry(keys=[e.key for e in self._entries.values()])

    @classmethod
    def from_proto(cls, message: keys_pb2.KeyRegistry) -> KeyRegistry:
        """Build a registry, checking every entry as :meth:`add` does."""
        return cls(message.keys)

    def save(self, path: PathLike) -> None:
        """Write the registry as proto3 JSON (see the module docstring)."""
        text = json_format.MessageToJson(self.to_proto(), indent=2, sort_keys=False)
        _write_file(path, (text + "\n").encode("utf-8"), 0o644)

    @classmethod
    def load(cls, path: PathLike) -> KeyRegistry:
        """Read a registry file; refuse malformed JSON or an inconsistent entry."""
        message = keys_pb2.KeyRegistry()
        try:
            json_format.Parse(_read_text(path, "key registry file"), message)
        except json_format.ParseError as err:
            raise MalformedError(
                f"key registry file {os.fspath(path)}: {err}",
                metadata={"expected": "collateral_sync.v1.KeyRegistry JSON", "actual": str(err)},
            ) from err
        return cls.from_proto(message)

    # -- helpers --

    def _existing(self, key_id: str) -> _Entry:
        entry = self._entries.get(key_id)
        if entry is None:
            raise StateError(
                f"key {key_id} is not in the registry",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "registered key id", "actual": key_id},
            )
        return entry

    @staticmethod
    def _checked_entry(party_key: keys_pb2.PartyKey) -> _Entry:
        what = f"party key {party_key.key_id or '(no key id)'}"
        _check_party_id(party_key.party_id, what)
        _check_role(party_key.role, what)
        computed = key_id(party_key.public_key)
        if party_key.key_id != computed:
            raise MalformedError(
                f"{what}: key_id must be SHA-256 of the public key, expected {computed}",
                metadata={"expected": computed, "actual": party_key.key_id},
            )
        if not party_key.HasField("valid_from"):
            raise MalformedError(
                f"{what}: valid_from must be set",
                metadata={"expected": "timestamp", "actual": "unset"},
            )
        for name in ("valid_from", "valid_until", "revoked_at"):
            if party_key.HasField(name) and not _timestamp_is_valid(getattr(party_key, name)):
                stamp = getattr(party_key, name)
                actual = f"seconds={stamp.seconds} nanos={stamp.nanos}"
                raise MalformedError(
                    f"{what}: {name} is not a valid timestamp ({actual})",
                    metadata={"expected": "0001-01-01..9999-12-31", "actual": actual},
                )
        if party_key.HasField("valid_until") and _timestamp_ns(
            party_key.valid_until
        ) <= _timestamp_ns(party_key.valid_from):
            expected = f"after {party_key.valid_from.ToJsonString()}"
            actual = party_key.valid_until.ToJsonString()
            raise MalformedError(
                f"{what}: valid_until must be {expected}, got {actual}",
                metadata={"expected": expected, "actual": actual},
            )
        return _Entry(key=_copy(party_key), verify_key=nacl.signing.VerifyKey(party_key.public_key))


def _copy(party_key: keys_pb2.PartyKey) -> keys_pb2.PartyKey:
    duplicate = keys_pb2.PartyKey()
    duplicate.CopyFrom(party_key)
    return duplicate
