"""The signed key registry: versions that a threshold of registry keys sign (PROTOCOL.md §4.6).

A plain registry file (:class:`~collateral_sync.keys.KeyRegistry`) is trusted
because it is configured. A signed one is trusted because of who signed it,
the way TUF trusts its root role: each :class:`KeyRegistryVersion` names the
party keys in force, the registry keys and a threshold; version 1 is signed by
a threshold of its own registry keys (and may be pinned by the SHA-256 of its
bytes); every later version is signed by a threshold of the previous version's
registry keys *and* of its own, so that replacing the registry keys is itself
verifiable. A version may only add keys, or bring a key's end or revocation
earlier: history is never rewritten, so a statement that verified under one
version verifies under the next unless its key was revoked from before its
``issued_at``.

:class:`SignedKeyRegistry` is a verified chain; :meth:`SignedKeyRegistry.update`
takes a longer chain that extends it and refuses a rollback, a fork or a
rewritten history. :func:`load_key_registry` reads either kind of file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.keys import (
    KeyRegistry,
    PathLike,
    _read_text,
    _timestamp_is_valid,
    _timestamp_ns,
    _write_file,
    role_name,
)
from collateral_sync.signer import Signer
from collateral_sync.signing import pae
from collateral_sync.v1 import common_pb2, errors_pb2, keys_pb2

__all__ = [
    "PAYLOAD_TYPE",
    "SignedKeyRegistry",
    "draft_version",
    "load_key_registry",
    "sign_version",
]

#: The payload type registry keys sign a KeyRegistryVersion under (§3.2 PAE).
PAYLOAD_TYPE = "application/vnd.collateral-sync.v1.key-registry-version+proto"
#: Most signatures one version may carry: bounds the work a chain can demand.
MAX_SIGNATURES = 32

_R = errors_pb2.ErrorReason
_REGISTRY_ROLE = common_pb2.PARTY_ROLE_KEY_REGISTRY


@dataclass(frozen=True, slots=True)
class _Verified:
    signed: keys_pb2.SignedKeyRegistryVersion
    version: keys_pb2.KeyRegistryVersion
    registry_keys: KeyRegistry


class SignedKeyRegistry:
    """A verified chain of registry versions; the last one is in force."""

    __slots__ = ("_chain",)

    def __init__(self, chain: Sequence[_Verified]) -> None:
        self._chain = tuple(chain)

    @classmethod
    def verify(
        cls, chain: keys_pb2.KeyRegistryChain, *, root_sha256: str | None = None
    ) -> SignedKeyRegistry:
        """Verify every version from the first; ``root_sha256`` pins version 1's bytes."""
        if not chain.versions:
            raise MalformedError(
                "a signed key registry holds at least one version",
                metadata={"field": "versions", "expected": ">= 1 version", "actual": "0"},
            )
        first = chain.versions[0]
        if root_sha256 is not None and hashlib.sha256(first.version).hexdigest() != root_sha256:
            actual = hashlib.sha256(first.version).hexdigest()
            raise VerificationError(
                f"version 1 of the key registry is not the pinned root: SHA-256 {actual}, "
                f"expected {root_sha256}",
                reason=_R.ERROR_REASON_SIGNATURE_INVALID,
                metadata={"field": "versions[0]", "expected": root_sha256, "actual": actual},
            )
        root = _parse(first, 0)
        if root.version.version != 1:
            raise MalformedError(
                f"versions[0]: the first version is 1, got {root.version.version}",
                metadata={
                    "field": "versions[0].version",
                    "expected": "1",
                    "actual": str(root.version.version),
                },
            )
        _require_threshold(first, root, root, 0, "its own")
        verified = [root]
        for index in range(1, len(chain.versions)):
            verified.append(_successor(verified[-1], chain.versions[index], index))
        return cls(verified)

    def update(self, chain: keys_pb2.KeyRegistryChain) -> SignedKeyRegistry:
        """The registry ``chain`` makes, if it extends this one (or is this one).

        Refuses a chain shorter than this one (a rollback) or one whose versions
        up to this one's latest are not byte for byte this one's (a fork).
        """
        held = len(self._chain)
        if len(chain.versions) < held:
            raise StateError(
                f"the key registry offered ends at version {len(chain.versions)}, before "
                f"version {held} in force: a rollback is refused",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": "versions",
                    "expected": f">= {held} versions",
                    "actual": str(len(chain.versions)),
                },
            )
        for index, ours in enumerate(self._chain):
            if chain.versions[index].version != ours.signed.version:
                raise StateError(
                    f"version {index + 1} of the key registry offered differs from the one "
                    "in force: two histories of the registry",
                    reason=_R.ERROR_REASON_STATE_CONFLICT,
                    metadata={
                        "field": f"versions[{index}].version",
                        "expected": "the version in force",
                        "actual": "other bytes",
                    },
                )
        verified = list(self._chain)
        for index in range(held, len(chain.versions)):
            verified.append(_successor(verified[-1], chain.versions[index], index))
        return SignedKeyRegistry(verified)

    # -- what it says --

    @property
    def version(self) -> int:
        """The number of the version in force."""
        return int(self._chain[-1].version.version)

    @property
    def latest(self) -> keys_pb2.KeyRegistryVersion:
        """A copy of the version in force."""
        copy = keys_pb2.KeyRegistryVersion()
        copy.CopyFrom(self._chain[-1].version)
        return copy

    @property
    def root_sha256(self) -> str:
        """SHA-256 of version 1's bytes: what a party pins as its trust root."""
        return hashlib.sha256(self._chain[0].signed.version).hexdigest()

    def version_sha256(self, version: int) -> str:
        """SHA-256 of the bytes of ``version`` (1 .. :attr:`version`)."""
        if not 1 <= version <= len(self._chain):
            raise ValueError(f"no version {version} in a chain of {len(self._chain)}")
        return hashlib.sha256(self._chain[version - 1].signed.version).hexdigest()

    def registry(self) -> KeyRegistry:
        """The party keys of the version in force."""
        return KeyRegistry(self._chain[-1].version.keys)

    def to_proto(self) -> keys_pb2.KeyRegistryChain:
        return keys_pb2.KeyRegistryChain(versions=[v.signed for v in self._chain])


# --- files ------------------------------------------------------------------------


def read_chain(path: PathLike) -> keys_pb2.KeyRegistryChain:
    """A chain file as it is: proto3 JSON of KeyRegistryChain, nothing verified yet."""
    message = keys_pb2.KeyRegistryChain()
    try:
        json_format.Parse(_read_text(path, "signed key registry file"), message)
    except json_format.ParseError as err:
        raise MalformedError(
            f"signed key registry file {os.fspath(path)}: {err}",
            metadata={"expected": "collateral_sync.v1.KeyRegistryChain JSON", "actual": str(err)},
        ) from err
    return message


def write_chain(path: PathLike, chain: keys_pb2.KeyRegistryChain) -> None:
    """Write a chain file atomically (proto3 JSON)."""
    text = json_format.MessageToJson(chain, indent=2)
    _write_file(path, (text + "\n").encode("utf-8"), 0o644)


def is_chain_file(path: PathLike) -> bool:
    """Whether ``path`` holds a signed registry (``versions``) rather than a plain one."""
    try:
        document = json.loads(_read_text(path, "key registry file"))
    except ValueError:
        return False  # the plain loader says what is wrong with it
    return isinstance(document, dict) and "versions" in document


def load_key_registry(
    path: PathLike, *, root_sha256: str | None = None
) -> tuple[KeyRegistry, SignedKeyRegistry | None]:
    """The party keys of a registry file, plain or signed (then verified, and returned too)."""
    if not is_chain_file(path):
        if root_sha256 is not None:
            raise VerificationError(
                f"key registry file {os.fspath(path)} is not signed, but a root is pinned",
                reason=_R.ERROR_REASON_SIGNATURE_INVALID,
                metadata={"expected": "a signed key registry", "actual": "a plain one"},
            )
        return KeyRegistry.load(path), None
    signed = SignedKeyRegistry.verify(read_chain(path), root_sha256=root_sha256)
    return signed.registry(), signed


# --- making versions ----------------------------------------------------------------


def draft_version(
    *,
    version: int,
    issued_at: datetime,
    keys: Iterable[keys_pb2.PartyKey],
    registry_keys: Iterable[keys_pb2.PartyKey],
    threshold: int,
) -> keys_pb2.SignedKeyRegistryVersion:
    """A version nobody has signed yet (each registry key holder adds theirs)."""
    message = keys_pb2.KeyRegistryVersion(
        version=version, keys=list(keys), registry_keys=list(registry_keys), threshold=threshold
    )
    message.issued_at.FromDatetime(issued_at)
    # Checked as a verifier will check it, so that a draft nobody can accept is never signed.
    _check_structure(message, "draft")
    return keys_pb2.SignedKeyRegistryVersion(version=message.SerializeToString())


def sign_version(signed: keys_pb2.SignedKeyRegistryVersion, signer: Signer) -> None:
    """Add ``signer``'s signature (a registry key) to ``signed``, replacing an earlier one."""
    if signer.role != _REGISTRY_ROLE:
        raise MalformedError(
            f"registry versions are signed by keys of role PARTY_ROLE_KEY_REGISTRY, not "
            f"{role_name(signer.role)}",
            metadata={"expected": "PARTY_ROLE_KEY_REGISTRY", "actual": role_name(signer.role)},
        )
    kept = [s for s in signed.signatures if s.key_id != signer.key_id]
    del signed.signatures[:]
    signed.signatures.extend(kept)
    signed.signatures.append(
        keys_pb2.RegistrySignature(
            key_id=signer.key_id, signature=signer.sign(pae(PAYLOAD_TYPE, signed.version))
        )
    )


# --- verifying ----------------------------------------------------------------------


def _parse(signed: keys_pb2.SignedKeyRegistryVersion, index: int) -> _Verified:
    field = f"versions[{index}]"
    version = keys_pb2.KeyRegistryVersion()
    try:
        version.ParseFromString(signed.version)
    except DecodeError as err:
        raise MalformedError(
            f"{field}.version: not a KeyRegistryVersion: {err}",
            metadata={
                "field": f"{field}.version",
                "expected": "KeyRegistryVersion bytes",
                "actual": "undecodable",
            },
        ) from err
    registry_keys = _check_structure(version, field)
    return _Verified(signed=signed, version=version, registry_keys=registry_keys)


def _check_structure(version: keys_pb2.KeyRegistryVersion, field: str) -> KeyRegistry:
    """What one version must be on its own; returns its registry keys."""
    if not version.HasField("issued_at") or not _timestamp_is_valid(version.issued_at):
        raise MalformedError(
            f"{field}: issued_at is required",
            metadata={
                "field": f"{field}.issued_at",
                "expected": "a timestamp",
                "actual": "absent or out of range",
            },
        )
    # The loader's own checks: ids, roles, windows, no key id twice.
    KeyRegistry(version.keys)
    registry_keys = KeyRegistry(version.registry_keys)
    for i, key in enumerate(version.keys):
        if key.role == _REGISTRY_ROLE:
            raise MalformedError(
                f"{field}.keys[{i}]: a registry key is listed in registry_keys, not keys",
                metadata={
                    "field": f"{field}.keys[{i}].role",
                    "expected": "a party role",
                    "actual": "PARTY_ROLE_KEY_REGISTRY",
                },
            )
    for i, key in enumerate(version.registry_keys):
        if key.role != _REGISTRY_ROLE:
            raise MalformedError(
                f"{field}.registry_keys[{i}]: role {role_name(key.role)}, expected "
                "PARTY_ROLE_KEY_REGISTRY",
                metadata={
                    "field": f"{field}.registry_keys[{i}].role",
                    "expected": "PARTY_ROLE_KEY_REGISTRY",
                    "actual": role_name(key.role),
                },
            )
    if not 1 <= version.threshold <= len(version.registry_keys):
        raise MalformedError(
            f"{field}: threshold {version.threshold} of {len(version.registry_keys)} registry keys",
            metadata={
                "field": f"{field}.threshold",
                "expected": f"1..{len(version.registry_keys)}",
                "actual": str(version.threshold),
            },
        )
    return registry_keys


def _require_threshold(
    signed: keys_pb2.SignedKeyRegistryVersion,
    subject: _Verified,
    signers: _Verified,
    index: int,
    whose: str,
) -> None:
    """At least ``signers``' threshold of its registry keys signed ``signed`` validly."""
    if len(signed.signatures) > MAX_SIGNATURES:
        raise MalformedError(
            f"versions[{index}]: {len(signed.signatures)} signatures, at most {MAX_SIGNATURES}",
            metadata={
                "field": f"versions[{index}].signatures",
                "expected": f"<= {MAX_SIGNATURES}",
                "actual": str(len(signed.signatures)),
            },
        )
    data = pae(PAYLOAD_TYPE, signed.version)
    good: set[str] = set()
    for signature in signed.signatures:
        if signature.key_id in good or signature.key_id not in signers.registry_keys:
            continue
        try:
            signers.registry_keys.resolve(
                signature.key_id, at=subject.version.issued_at, roles=(_REGISTRY_ROLE,)
            )
            if signers.registry_keys.verify_signature(signature.key_id, data, signature.signature):
                good.add(signature.key_id)
        except (VerificationError, MalformedError):
            continue
    needed = signers.version.threshold
    if len(good) < needed:
        raise VerificationError(
            f"version {subject.version.version} of the key registry carries {len(good)} valid "
            f"signatures of {whose} registry keys, {needed} needed",
            reason=_R.ERROR_REASON_SIGNATURE_INVALID,
            metadata={
                "field": f"versions[{index}].signatures",
                "expected": f">= {needed}",
                "actual": str(len(good)),
            },
        )


def _successor(
    previous: _Verified, signed: keys_pb2.SignedKeyRegistryVersion, index: int
) -> _Verified:
    """Version ``previous`` + 1, signed by both thresholds, rewriting no history."""
    nxt = _parse(signed, index)
    field = f"versions[{index}]"
    expected = previous.version.version + 1
    if nxt.version.version != expected:
        raise MalformedError(
            f"{field}: version {nxt.version.version} follows version "
            f"{previous.version.version}, expected {expected}",
            metadata={
                "field": f"{field}.version",
                "expected": str(expected),
                "actual": str(nxt.version.version),
            },
        )
    if _timestamp_ns(nxt.version.issued_at) <= _timestamp_ns(previous.version.issued_at):
        raise MalformedError(
            f"{field}: issued_at {nxt.version.issued_at.ToJsonString()} is not after version "
            f"{previous.version.version}'s {previous.version.issued_at.ToJsonString()}",
            metadata={
                "field": f"{field}.issued_at",
                "expected": f"after {previous.version.issued_at.ToJsonString()}",
                "actual": nxt.version.issued_at.ToJsonString(),
            },
        )
    _require_threshold(signed, nxt, previous, index, f"version {previous.version.version}'s")
    _require_threshold(signed, nxt, nxt, index, "its own")
    _check_history(previous.version, nxt.version, field)
    return nxt


def _check_history(
    previous: keys_pb2.KeyRegistryVersion, nxt: keys_pb2.KeyRegistryVersion, field: str
) -> None:
    """Every party key of ``previous`` is in ``nxt``, the same but for an earlier end."""
    kept = {key.key_id: key for key in nxt.keys}
    for old in previous.keys:
        new = kept.get(old.key_id)
        problem = None
        if new is None:
            problem = "is missing"
        elif (new.party_id, new.role, new.public_key) != (old.party_id, old.role, old.public_key):
            problem = "changed party, role or public key"
        elif new.valid_from != old.valid_from:
            problem = "changed valid_from"
        elif _later(old, new, "valid_until") or _later(old, new, "revoked_at"):
            problem = "has a later or no valid_until or revoked_at than before"
        if problem is not None:
            raise StateError(
                f"{field}: key {old.key_id} ({old.party_id}, {role_name(old.role)}) {problem}: "
                "a registry version never rewrites history",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": f"{field}.keys",
                    "expected": "the key as before, or ended earlier",
                    "actual": problem,
                },
            )


def _later(old: keys_pb2.PartyKey, new: keys_pb2.PartyKey, name: str) -> bool:
    """Whether ``new`` ends ``name`` later than ``old`` did (or not at all, where it did)."""
    if not old.HasField(name):  # type: ignore[arg-type]
        return False
    if not new.HasField(name):  # type: ignore[arg-type]
        return True
    return _timestamp_ns(getattr(new, name)) > _timestamp_ns(getattr(old, name))
