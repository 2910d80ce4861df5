"""The signed key registry: threshold signatures, a verifiable chain, no rewritten history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signed_registry import (
    SignedKeyRegistry,
    draft_version,
    load_key_registry,
    read_chain,
    sign_version,
    write_chain,
)
from collateral_sync.v1 import common_pb2, errors_pb2, keys_pb2

_R = errors_pb2.ErrorReason
T0 = datetime(2026, 12, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _registry_key(name: str) -> SigningKey:
    return SigningKey.generate(name, common_pb2.PARTY_ROLE_KEY_REGISTRY)


REGISTRY_KEYS = [_registry_key(f"registry-officer-{i}") for i in range(3)]
CUSTODIAN = SigningKey.generate("custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
EXCHANGE = SigningKey.generate("exchange-1", common_pb2.PARTY_ROLE_EXCHANGE)


def _version(
    number: int,
    keys: list[keys_pb2.PartyKey],
    *,
    signers: list[SigningKey],
    registry: list[SigningKey] = REGISTRY_KEYS,
    threshold: int = 2,
    at: datetime | None = None,
) -> keys_pb2.SignedKeyRegistryVersion:
    signed = draft_version(
        version=number,
        issued_at=at or T0 + number * HOUR,
        keys=keys,
        registry_keys=[k.party_key(T0 - HOUR) for k in registry],
        threshold=threshold,
    )
    for signer in signers:
        sign_version(signed, signer)
    return signed


def _parties() -> list[keys_pb2.PartyKey]:
    return [CUSTODIAN.party_key(T0), EXCHANGE.party_key(T0)]


def _chain(*versions: keys_pb2.SignedKeyRegistryVersion) -> keys_pb2.KeyRegistryChain:
    return keys_pb2.KeyRegistryChain(versions=list(versions))


def _root() -> keys_pb2.SignedKeyRegistryVersion:
    return _version(1, _parties(), signers=REGISTRY_KEYS[:2])


def test_a_first_version_signed_by_its_threshold_is_trusted() -> None:
    signed = SignedKeyRegistry.verify(_chain(_root()))
    assert signed.version == 1
    registry = signed.registry()
    assert registry.resolve(CUSTODIAN.key_id, at=T0 + HOUR).party_id == "custodian-1"
    assert SignedKeyRegistry.verify(_chain(_root()), root_sha256=signed.root_sha256).version == 1


def test_a_first_version_other_than_the_pinned_root_is_refused() -> None:
    other = _version(1, [CUSTODIAN.party_key(T0)], signers=REGISTRY_KEYS[:2])
    pinned = SignedKeyRegistry.verify(_chain(_root())).root_sha256
    with pytest.raises(VerificationError, match="not the pinned root"):
        SignedKeyRegistry.verify(_chain(other), root_sha256=pinned)


@pytest.mark.parametrize(
    "how",
    ["one signature", "the same key twice", "a party key", "a corrupted signature", "a stranger"],
)
def test_fewer_than_threshold_valid_signatures_are_refused(how: str) -> None:
    signed = _version(1, _parties(), signers=REGISTRY_KEYS[:1])
    if how == "the same key twice":
        sign_version(signed, REGISTRY_KEYS[0])
        signed.signatures.append(signed.signatures[0])
    elif how == "a party key":
        # A party key is not a registry key, whatever it signs.
        signed.signatures.add(key_id=CUSTODIAN.key_id, signature=CUSTODIAN.sign(signed.version))
    elif how == "a corrupted signature":
        sign_version(signed, REGISTRY_KEYS[1])
        corrupted = bytearray(signed.signatures[1].signature)
        corrupted[0] ^= 1
        signed.signatures[1].signature = bytes(corrupted)
    elif how == "a stranger":
        stranger = _registry_key("not-an-officer")
        sign_version(signed, stranger)
    with pytest.raises(VerificationError, match="1 valid signatures of its own registry keys"):
        SignedKeyRegistry.verify(_chain(signed))


def test_only_registry_keys_sign_versions() -> None:
    with pytest.raises(MalformedError, match="PARTY_ROLE_KEY_REGISTRY"):
        sign_version(_root(), CUSTODIAN)


@pytest.mark.parametrize(
    ("threshold", "keys", "registry", "message"),
    [
        (0, _parties(), REGISTRY_KEYS, "threshold 0 of 3"),
        (4, _parties(), REGISTRY_KEYS, "threshold 4 of 3"),
        (1, [REGISTRY_KEYS[0].party_key(T0)], REGISTRY_KEYS, "listed in registry_keys"),
        (1, _parties(), [CUSTODIAN], "expected PARTY_ROLE_KEY_REGISTRY"),
    ],
)
def test_a_version_no_verifier_could_accept_is_never_drafted(
    threshold: int,
    keys: list[keys_pb2.PartyKey],
    registry: list[SigningKey],
    message: str,
) -> None:
    with pytest.raises(MalformedError, match=message):
        _version(1, keys, signers=[], registry=registry, threshold=threshold)


def _rotated() -> list[keys_pb2.PartyKey]:
    """The custodian's key rotated at T0 + 2 h, with a quarter hour of overlap."""
    old = CUSTODIAN.party_key(T0, T0 + 2 * HOUR + timedelta(minutes=15))
    return [old, EXCHANGE.party_key(T0), NEW_CUSTODIAN.party_key(T0 + 2 * HOUR)]


NEW_CUSTODIAN = SigningKey.generate("custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)


def test_a_rotation_signed_by_both_thresholds_extends_the_chain() -> None:
    trusted = SignedKeyRegistry.verify(_chain(_root()))
    v2 = _version(2, _rotated(), signers=REGISTRY_KEYS[1:])
    updated = trusted.update(_chain(_root(), v2))
    assert updated.version == 2
    registry = updated.registry()
    # Nothing that was valid is refused: the old key still signs what it signed before.
    registry.resolve(CUSTODIAN.key_id, at=T0 + HOUR)
    registry.resolve(NEW_CUSTODIAN.key_id, at=T0 + 2 * HOUR)
    with pytest.raises(VerificationError) as err:
        registry.resolve(CUSTODIAN.key_id, at=T0 + 3 * HOUR)
    assert err.value.reason == _R.ERROR_REASON_KEY_NOT_VALID
    # The same chain again is no change, and verifies from scratch too.
    assert updated.update(_chain(_root(), v2)).version == 2
    assert SignedKeyRegistry.verify(_chain(_root(), v2)).version == 2


def test_new_registry_keys_need_the_old_threshold_and_their_own() -> None:
    successors = [_registry_key(f"successor-{i}") for i in range(2)]
    trusted = SignedKeyRegistry.verify(_chain(_root()))
    only_new = _version(2, _parties(), signers=successors, registry=successors)
    with pytest.raises(VerificationError, match="0 valid signatures of version 1's"):
        trusted.update(_chain(_root(), only_new))
    only_old = _version(2, _parties(), signers=REGISTRY_KEYS[:2], registry=successors)
    with pytest.raises(VerificationError, match="0 valid signatures of its own"):
        trusted.update(_chain(_root(), only_old))
    both = _version(2, _parties(), signers=[*REGISTRY_KEYS[:2], *successors], registry=successors)
    assert trusted.update(_chain(_root(), both)).version == 2
    # From then on the old officers alone sign nothing.
    v3 = _version(3, _parties(), signers=REGISTRY_KEYS, registry=successors)
    with pytest.raises(VerificationError, match="0 valid signatures of version 2's"):
        trusted.update(_chain(_root(), both, v3))


def test_a_revocation_refuses_statements_from_its_time_on() -> None:
    revoked = CUSTODIAN.party_key(T0)
    revoked.revoked_at.FromDatetime(T0 + 90 * timedelta(minutes=1))
    v2 = _version(2, [revoked, EXCHANGE.party_key(T0)], signers=REGISTRY_KEYS[:2])
    registry = SignedKeyRegistry.verify(_chain(_root(), v2)).registry()
    registry.resolve(CUSTODIAN.key_id, at=T0 + 89 * timedelta(minutes=1))
    with pytest.raises(VerificationError) as err:
        registry.resolve(CUSTODIAN.key_id, at=T0 + 90 * timedelta(minutes=1))
    assert err.value.reason == _R.ERROR_REASON_KEY_REVOKED


@pytest.mark.parametrize(
    "kind", ["a key removed", "valid_from moved", "a key's end lifted", "a revocation lifted"]
)
def test_a_version_that_rewrites_history_is_refused(kind: str) -> None:
    first_keys = _parties()
    first_keys[0].valid_until.FromDatetime(T0 + 5 * HOUR)
    if kind == "a revocation lifted":
        first_keys[0].revoked_at.FromDatetime(T0 + 4 * HOUR)
    root = _version(1, first_keys, signers=REGISTRY_KEYS[:2])
    keys = _parties()
    if kind == "a revocation lifted":
        keys[0].valid_until.FromDatetime(T0 + 5 * HOUR)
    elif kind == "valid_from moved":
        keys[0].valid_until.FromDatetime(T0 + 5 * HOUR)
        keys[0].valid_from.FromDatetime(T0 - HOUR)
    elif kind == "a key removed":
        keys = keys[1:]
    v2 = _version(2, keys, signers=REGISTRY_KEYS[:2])
    with pytest.raises(StateError, match="never rewrites history"):
        SignedKeyRegistry.verify(_chain(root, v2))


def test_versions_come_one_after_another_in_time() -> None:
    skipped = _version(3, _parties(), signers=REGISTRY_KEYS[:2])
    with pytest.raises(MalformedError, match="version 3 follows version 1, expected 2"):
        SignedKeyRegistry.verify(_chain(_root(), skipped))
    earlier = _version(2, _parties(), signers=REGISTRY_KEYS[:2], at=T0)
    with pytest.raises(MalformedError, match="is not after version 1's"):
        SignedKeyRegistry.verify(_chain(_root(), earlier))


def test_a_rollback_or_a_fork_is_refused() -> None:
    v2 = _version(2, _rotated(), signers=REGISTRY_KEYS[:2])
    trusted = SignedKeyRegistry.verify(_chain(_root(), v2))
    with pytest.raises(StateError, match="a rollback is refused"):
        trusted.update(_chain(_root()))
    other_v2 = _version(2, _parties(), signers=REGISTRY_KEYS[:2])
    with pytest.raises(StateError, match="two histories of the registry"):
        trusted.update(_chain(_root(), other_v2))


def test_a_registry_file_is_read_plain_or_signed(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    KeyRegistry(_parties()).save(plain)
    registry, signed = load_key_registry(plain)
    assert signed is None
    assert CUSTODIAN.key_id in registry
    with pytest.raises(VerificationError, match="not signed, but a root is pinned"):
        load_key_registry(plain, root_sha256="00" * 32)

    chained = tmp_path / "signed.json"
    write_chain(chained, _chain(_root()))
    registry, signed = load_key_registry(chained)
    assert signed is not None
    assert signed.version == 1
    assert EXCHANGE.key_id in registry
    assert read_chain(chained) == _chain(_root())


def test_replacing_a_registry_swaps_every_key_at_once() -> None:
    held = KeyRegistry([CUSTODIAN.party_key(T0)])
    held.replace(KeyRegistry([EXCHANGE.party_key(T0)]))
    assert EXCHANGE.key_id in held
    assert CUSTODIAN.key_id not in held
