"""Tests for collateral_sync.attestation: the durable log, checkpoints and the monitor."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import rfc9162_reference as ref
from collateral_sync import attestation, merkle
from collateral_sync.attestation import (
    AttestationLog,
    CheckpointFork,
    CheckpointMonitor,
    statement_leaf,
    verify_checkpoint,
)
from collateral_sync.errors import MalformedError, ProofError, StateError, VerificationError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import pae, sign_statement
from collateral_sync.v1 import attestation_pb2, common_pb2, envelope_pb2, errors_pb2

R = errors_pb2.ErrorReason
ORIGIN = "custodian.example/collateral-sync/attestations"
NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
TTL = timedelta(hours=1)


@pytest.fixture(scope="module")
def custodian() -> SigningKey:
    return SigningKey.from_seed(bytes([1]) * 32, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)


@pytest.fixture(scope="module")
def exchange() -> SigningKey:
    return SigningKey.from_seed(bytes([2]) * 32, "exchange-1", common_pb2.PARTY_ROLE_EXCHANGE)


@pytest.fixture(scope="module")
def registry(custodian: SigningKey, exchange: SigningKey) -> KeyRegistry:
    keys = KeyRegistry()
    keys.add(custodian.party_key(valid_from=NOW - timedelta(days=30)))
    keys.add(exchange.party_key(valid_from=NOW - timedelta(days=30)))
    return keys


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AttestationLog]:
    with AttestationLog(tmp_path / "log.sqlite", origin=ORIGIN) as opened:
        yield opened


def _holdings(custodian: SigningKey, n: int) -> envelope_pb2.Envelope:
    statement = attestation_pb2.HoldingsStatement(
        account_id=f"acct-{n}", exchange_id="exchange-1", epoch=n + 1
    )
    return sign_statement(
        statement, custodian, audience=["exchange-1"], sequence=n + 1, ttl=TTL, issued_at=NOW
    )


def _leaves(count: int, tag: bytes = b"leaf") -> list[bytes]:
    return [b"%s %d" % (tag, n) for n in range(count)]


def _reason(info: pytest.ExceptionInfo[Exception]) -> int:
    error = info.value
    assert isinstance(error, (MalformedError, ProofError, StateError, VerificationError))
    return error.reason


# ------------------------------------------------------------------ leaves


def test_statement_leaf_is_the_signed_bytes(custodian: SigningKey, registry: KeyRegistry) -> None:
    envelope = _holdings(custodian, 0)
    leaf = statement_leaf(envelope)
    assert leaf == pae(envelope.payload_type, envelope.payload)
    assert leaf.startswith(b"DSSEv1 ")
    signature = envelope.signatures[0]
    assert registry.verify_signature(signature.key_id, leaf, signature.sig)
    other = _holdings(custodian, 1)
    assert statement_leaf(other) != leaf


# --------------------------------------------------------------- round trip


def test_round_trip_with_signed_statements(
    log: AttestationLog, custodian: SigningKey, registry: KeyRegistry
) -> None:
    envelopes = [_holdings(custodian, n) for n in range(13)]
    leaves = [statement_leaf(e) for e in envelopes]
    assert log.size == 0
    assert log.root() == merkle.empty_root()
    assert [log.append(leaf) for leaf in leaves[:3]] == [0, 1, 2]
    assert log.append_many(leaves[3:]) == 13
    assert log.size == 13
    assert [log.leaf(i) for i in range(13)] == leaves
    for size in range(14):
        assert log.root(size) == ref.mth(leaves[:size])

    signed = log.checkpoint(custodian, now=NOW, sequence=1, ttl=TTL)
    assert list(attestation_pb2.Checkpoint.FromString(signed.payload).header.audience) == ["*"]
    checkpoint = verify_checkpoint(signed, registry, origin=ORIGIN, now=NOW)
    assert checkpoint.origin == ORIGIN
    assert checkpoint.tree_size == 13
    assert checkpoint.root_hash == ref.mth(leaves)
    assert checkpoint.timestamp.ToDatetime(tzinfo=UTC) == NOW

    for index, envelope in enumerate(envelopes):
        proof = log.inclusion_proof(index, 13)
        assert list(proof.audit_path) == ref.path(index, leaves)
        merkle.verify_inclusion_proof(proof, statement_leaf(envelope), checkpoint)
    with pytest.raises(ProofError):
        merkle.verify_inclusion_proof(log.inclusion_proof(4, 13), leaves[5], checkpoint)

    for first in range(1, 14):
        consistency = log.consistency_proof(first, 13)
        assert list(consistency.consistency_path) == ref.proof(first, leaves)
        earlier = attestation_pb2.Checkpoint(
            origin=ORIGIN, tree_size=first, root_hash=log.root(first)
        )
        merkle.verify_consistency_proof(consistency, earlier, checkpoint)


def test_every_root_and_proof_while_growing_in_batches(tmp_path: Path) -> None:
    # Exercises the composing subroot cache: roots are taken between batches,
    # so later subtrees are built partly from cached nodes, partly from leaves.
    leaves = _leaves(300)
    with AttestationLog(tmp_path / "grow.sqlite", origin=ORIGIN) as grown:
        start = 0
        for end in (1, 17, 31, 32, 33, 100, 127, 128, 129, 255, 256, 257, 300):
            grown.append_many(leaves[start:end])
            start = end
            assert grown.root() == ref.mth(leaves[:end])
        for size in range(1, 301):
            assert grown.root(size) == ref.mth(leaves[:size])
        for size in (129, 256, 300):
            for index in range(0, size, 7):
                assert list(grown.inclusion_proof(index, size).audit_path) == ref.path(
                    index, leaves[:size]
                )
        for first in range(1, 300, 11):
            assert list(grown.consistency_proof(first, 300).consistency_path) == ref.proof(
                first, leaves
            )


def test_cold_reopened_log_answers_in_any_order(tmp_path: Path) -> None:
    # After a reopen nothing is in memory; answering from the right edge
    # first leaves gaps in the stored subtrees that later answers must fill.
    path = tmp_path / "cold.sqlite"
    leaves = _leaves(300)
    with AttestationLog(path, origin=ORIGIN) as first:
        first.append_many(leaves)
    with AttestationLog(path, origin=ORIGIN) as cold:
        for index, size in ((299, 300), (200, 260), (17, 33), (0, 300), (150, 151), (64, 300)):
            assert list(cold.inclusion_proof(index, size).audit_path) == ref.path(
                index, leaves[:size]
            )
        assert list(cold.consistency_proof(97, 300).consistency_path) == ref.proof(97, leaves)
        for size in range(300, 0, -13):
            assert cold.root(size) == ref.mth(leaves[:size])


def test_proofs_after_a_checkpoint_need_no_subtree_recomputation(
    log: AttestationLog, custodian: SigningKey
) -> None:
    # The checkpoint's root fills the subroot cache for the whole tree, so
    # inclusion proofs only ever hit it (this is what keeps them fast).
    leaves = _leaves(1000)
    log.append_many(leaves)
    log.checkpoint(custodian, now=NOW, sequence=1, ttl=TTL)
    tree = log._tree
    misses = tree.get_cache_info().misses
    for index in range(0, 1000, 37):
        assert list(log.inclusion_proof(index, 1000).audit_path) == ref.path(index, leaves)
    assert tree.get_cache_info().misses == misses
    assert tree.threshold == attestation._SUBROOT_CACHE_THRESHOLD


def test_reopen_restores_the_log(tmp_path: Path, custodian: SigningKey) -> None:
    path = tmp_path / "durable.sqlite"
    leaves = _leaves(40)
    with AttestationLog(path, origin=ORIGIN) as first:
        first.append_many(leaves[:25])
        root_25 = first.root()
        proof = first.inclusion_proof(7, 25)
    with AttestationLog(str(path), origin=ORIGIN) as reopened:
        assert reopened.size == 25
        assert reopened.root() == root_25
        assert [reopened.leaf(i) for i in range(25)] == leaves[:25]
        assert reopened.inclusion_proof(7, 25) == proof
        assert reopened.append(leaves[25]) == 25
        assert reopened.append_many(leaves[26:]) == 40
        assert reopened.root() == ref.mth(leaves)
        assert reopened.root(25) == root_25
    with pytest.raises(StateError) as info:
        AttestationLog(path, origin="another.example/log")
    assert info.value.reason == R.ERROR_REASON_STATE_CONFLICT
    assert info.value.metadata == {"expected": "another.example/log", "actual": ORIGIN}


def test_bad_appends_change_nothing(log: AttestationLog) -> None:
    log.append_many(_leaves(5))
    root = log.root()
    with pytest.raises(MalformedError):
        log.append("not bytes")  # type: ignore[arg-type]
    with pytest.raises(MalformedError):
        log.append_many([b"fine", "not bytes", b"fine too"])  # type: ignore[list-item]
    assert log.size == 5
    assert log.root() == root


def test_origin_must_be_named(tmp_path: Path) -> None:
    with pytest.raises(MalformedError):
        AttestationLog(tmp_path / "x.sqlite", origin="")


def test_closed_log_refuses_use(tmp_path: Path) -> None:
    closed = AttestationLog(tmp_path / "closed.sqlite", origin=ORIGIN)
    closed.append(b"x")
    closed.close()
    closed.close()
    with pytest.raises(StateError):
        _ = closed.size
    with pytest.raises(StateError):
        closed.append(b"y")


@pytest.mark.parametrize(
    ("call", "expected", "actual"),
    [
        (lambda log: log.root(11), "0 <= size <= 10", "11"),
        (lambda log: log.root(-1), "0 <= size <= 10", "-1"),
        (lambda log: log.leaf(10), "0 <= index < 10", "10"),
        (lambda log: log.leaf(-1), "0 <= index < 10", "-1"),
        (lambda log: log.inclusion_proof(0, 11), "0 < tree_size <= 10", "11"),
        (lambda log: log.inclusion_proof(0, 0), "0 < tree_size <= 10", "0"),
        (lambda log: log.inclusion_proof(5, 5), "0 <= index < 5", "5"),
        (lambda log: log.inclusion_proof(-1, 5), "0 <= index < 5", "-1"),
        (lambda log: log.consistency_proof(1, 11), "0 < second_size <= 10", "11"),
        (lambda log: log.consistency_proof(4, 3), "0 < first_size <= 3", "4"),
        (lambda log: log.consistency_proof(0, 3), "0 < first_size <= 3", "0"),
        (lambda log: log.consistency_proof(0, 0), "0 < second_size <= 10", "0"),
    ],
)
def test_out_of_range_requests(
    log: AttestationLog, call: object, expected: str, actual: str
) -> None:
    log.append_many(_leaves(10))
    assert callable(call)
    with pytest.raises(StateError) as info:
        call(log)
    assert info.value.reason == R.ERROR_REASON_OUT_OF_RANGE
    assert info.value.metadata == {"expected": expected, "actual": actual}
    assert f"expected {expected}, got {actual}" in info.value.message


# -------------------------------------------------------------- checkpoints


def test_checkpoint_of_empty_log(
    log: AttestationLog, custodian: SigningKey, registry: KeyRegistry
) -> None:
    checkpoint = verify_checkpoint(
        log.checkpoint(custodian, now=NOW, sequence=1, ttl=TTL), registry, origin=ORIGIN, now=NOW
    )
    assert checkpoint.tree_size == 0
    assert checkpoint.root_hash == merkle.empty_root()


def _signed_checkpoint(
    signer: SigningKey, *, origin: str = ORIGIN, size: int = 3, root: bytes = b"\x07" * 32
) -> envelope_pb2.Envelope:
    message = attestation_pb2.Checkpoint(origin=origin, tree_size=size, root_hash=root)
    message.timestamp.FromDatetime(NOW)
    return sign_statement(message, signer, audience=["*"], sequence=1, ttl=TTL, issued_at=NOW)


def test_verify_checkpoint_wrong_origin(custodian: SigningKey, registry: KeyRegistry) -> None:
    with pytest.raises(ProofError) as info:
        verify_checkpoint(
            _signed_checkpoint(custodian, origin="other.example/log"),
            registry,
            origin=ORIGIN,
            now=NOW,
        )
    assert info.value.reason == R.ERROR_REASON_CHECKPOINT_INCONSISTENT  # §5.6 step 2
    assert info.value.metadata == {"expected": ORIGIN, "actual": "other.example/log"}


def test_verify_checkpoint_tampered_root(
    log: AttestationLog, custodian: SigningKey, registry: KeyRegistry
) -> None:
    log.append_many(_leaves(4))
    signed = log.checkpoint(custodian, now=NOW, sequence=1, ttl=TTL)
    root = log.root()
    assert root in signed.payload
    tampered = envelope_pb2.Envelope()
    tampered.CopyFrom(signed)
    flipped = bytes([root[0] ^ 1]) + root[1:]
    tampered.payload = signed.payload.replace(root, flipped)
    with pytest.raises(VerificationError) as info:
        verify_checkpoint(tampered, registry, origin=ORIGIN, now=NOW)
    assert info.value.reason == R.ERROR_REASON_SIGNATURE_INVALID


def test_verify_checkpoint_wrong_signer_role(
    custodian: SigningKey, exchange: SigningKey, registry: KeyRegistry
) -> None:
    # An exchange key may not issue checkpoints; sign_statement refuses, so
    # forge the envelope by hand the way a misbehaving party would.
    message = attestation_pb2.Checkpoint(origin=ORIGIN, tree_size=3, root_hash=b"\x07" * 32)
    message.timestamp.FromDatetime(NOW)
    message.header.issuer = exchange.party_id
    message.header.audience.append("*")
    message.header.sequence = 1
    message.header.issued_at.FromDatetime(NOW)
    message.header.expires_at.FromDatetime(NOW + TTL)
    payload = message.SerializeToString(deterministic=True)
    payload_type = _signed_checkpoint(custodian).payload_type
    forged = envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[
            envelope_pb2.Signature(
                key_id=exchange.key_id, sig=exchange.sign(pae(payload_type, payload))
            )
        ],
    )
    with pytest.raises(VerificationError) as info:
        verify_checkpoint(forged, registry, origin=ORIGIN, now=NOW)
    assert info.value.reason == R.ERROR_REASON_KEY_ROLE_MISMATCH


def test_verify_checkpoint_expired(custodian: SigningKey, registry: KeyRegistry) -> None:
    with pytest.raises(VerificationError) as info:
        verify_checkpoint(_signed_checkpoint(custodian), registry, origin=ORIGIN, now=NOW + 2 * TTL)
    assert info.value.reason == R.ERROR_REASON_STATEMENT_EXPIRED


def test_verify_checkpoint_root_shape(custodian: SigningKey, registry: KeyRegistry) -> None:
    with pytest.raises(MalformedError) as info:
        verify_checkpoint(
            _signed_checkpoint(custodian, root=b"\x07" * 31), registry, origin=ORIGIN, now=NOW
        )
    assert info.value.metadata == {"expected": "32 bytes", "actual": "31 bytes"}
    with pytest.raises(ProofError):
        verify_checkpoint(_signed_checkpoint(custodian, size=0), registry, origin=ORIGIN, now=NOW)


def test_verify_checkpoint_named_audience(custodian: SigningKey, registry: KeyRegistry) -> None:
    message = attestation_pb2.Checkpoint(origin=ORIGIN, tree_size=1, root_hash=b"\x07" * 32)
    message.timestamp.FromDatetime(NOW)
    signed = sign_statement(
        message, custodian, audience=["exchange-1"], sequence=1, ttl=TTL, issued_at=NOW
    )
    verify_checkpoint(signed, registry, origin=ORIGIN, now=NOW, audience="exchange-1")
    with pytest.raises(VerificationError) as info:
        verify_checkpoint(signed, registry, origin=ORIGIN, now=NOW)
    assert info.value.reason == R.ERROR_REASON_AUDIENCE_MISMATCH


# ------------------------------------------------------------------ monitor


def _checkpoint(source: AttestationLog, size: int | None = None) -> attestation_pb2.Checkpoint:
    size = source.size if size is None else size
    return attestation_pb2.Checkpoint(
        origin=source.origin, tree_size=size, root_hash=source.root(size)
    )


@pytest.fixture
def grown(log: AttestationLog) -> AttestationLog:
    log.append_many(_leaves(20))
    return log


def test_monitor_first_and_consistent_growth(grown: AttestationLog) -> None:
    monitor = CheckpointMonitor()
    assert monitor.latest(ORIGIN) is None
    first = _checkpoint(grown, 8)
    monitor.advance(first, None)
    assert monitor.latest(ORIGIN) == first
    second = _checkpoint(grown, 20)
    monitor.advance(second, grown.consistency_proof(8, 20))
    assert monitor.latest(ORIGIN) == second
    # The same tree again, even with a later timestamp, is accepted and changes nothing.
    again = _checkpoint(grown, 20)
    again.timestamp.FromDatetime(NOW + TTL)
    monitor.advance(again, None)
    assert monitor.latest(ORIGIN) == second
    assert monitor.evidence == ()


def test_monitor_growth_needs_a_proof(grown: AttestationLog) -> None:
    monitor = CheckpointMonitor()
    monitor.advance(_checkpoint(grown, 8), None)
    with pytest.raises(ProofError) as info:
        monitor.advance(_checkpoint(grown, 20), None)
    assert info.value.reason == R.ERROR_REASON_PROOF_INVALID
    with pytest.raises(ProofError) as info:
        monitor.advance(_checkpoint(grown, 20), grown.consistency_proof(9, 20))
    assert info.value.reason == R.ERROR_REASON_PROOF_INVALID
    assert "first_tree_size" in info.value.message
    assert monitor.latest(ORIGIN) == _checkpoint(grown, 8)


def test_monitor_refuses_rollback(grown: AttestationLog) -> None:
    monitor = CheckpointMonitor()
    monitor.advance(_checkpoint(grown, 20), None)
    with pytest.raises(ProofError) as info:
        monitor.advance(_checkpoint(grown, 19), grown.consistency_proof(19, 20))
    assert info.value.reason == R.ERROR_REASON_CHECKPOINT_INCONSISTENT
    assert info.value.metadata == {"expected": ">= 20", "actual": "19"}
    assert monitor.latest(ORIGIN) == _checkpoint(grown, 20)
    assert monitor.evidence == ()


def test_monitor_refuses_fork_and_keeps_evidence(grown: AttestationLog) -> None:
    monitor = CheckpointMonitor()
    held = _checkpoint(grown, 20)
    monitor.advance(held, None)
    forked = attestation_pb2.Checkpoint()
    forked.CopyFrom(held)
    forked.root_hash = ref.mth([b"forged"] * 20)
    with pytest.raises(ProofError) as info:
        monitor.advance(forked, None)
    assert info.value.reason == R.ERROR_REASON_CHECKPOINT_INCONSISTENT
    assert info.value.metadata == {
        "expected": held.root_hash.hex(),
        "actual": forked.root_hash.hex(),
    }
    assert monitor.latest(ORIGIN) == held
    assert monitor.evidence == (CheckpointFork(held=held, received=forked),)
    # Evidence and state are copies: the caller's objects cannot change them.
    forked.root_hash = b"\x00" * 32
    held.tree_size = 1
    assert monitor.evidence[0].received.root_hash == ref.mth([b"forged"] * 20)
    assert monitor.latest(ORIGIN) == _checkpoint(grown, 20)


def test_monitor_refuses_rewritten_history(grown: AttestationLog, tmp_path: Path) -> None:
    monitor = CheckpointMonitor()
    monitor.advance(_checkpoint(grown, 20), None)
    # The same origin, rebuilt with leaf 3 changed and more leaves appended.
    leaves = _leaves(30)
    leaves[3] = b"rewritten"
    with AttestationLog(tmp_path / "rewritten.sqlite", origin="rewritten") as rewritten:
        rewritten.append_many(leaves)
        forged = attestation_pb2.Checkpoint(origin=ORIGIN, tree_size=30, root_hash=rewritten.root())
        with pytest.raises(ProofError) as info:
            monitor.advance(forged, rewritten.consistency_proof(20, 30))
    assert info.value.reason == R.ERROR_REASON_CHECKPOINT_INCONSISTENT
    assert monitor.latest(ORIGIN) == _checkpoint(grown, 20)
    assert monitor.evidence == ()


def test_monitor_refuses_malformed_checkpoints(grown: AttestationLog) -> None:
    monitor = CheckpointMonitor()
    short = _checkpoint(grown, 5)
    short.root_hash = short.root_hash[:31]
    with pytest.raises(MalformedError):
        monitor.advance(short, None)
    unnamed = _checkpoint(grown, 5)
    unnamed.origin = ""
    with pytest.raises(MalformedError):
        monitor.advance(unnamed, None)
    assert monitor.latest(ORIGIN) is None


def test_monitor_keeps_logs_apart_and_grows_from_empty(tmp_path: Path) -> None:
    monitor = CheckpointMonitor()
    with (
        AttestationLog(tmp_path / "a.sqlite", origin="a.example/log") as a,
        AttestationLog(tmp_path / "b.sqlite", origin="b.example/log") as b,
    ):
        monitor.advance(_checkpoint(a), None)  # empty tree
        a.append_many(_leaves(6))
        monitor.advance(_checkpoint(a), None)  # anything extends the empty tree
        b.append_many(_leaves(3, b"other"))
        monitor.advance(_checkpoint(b), None)
        assert monitor.latest("a.example/log") == _checkpoint(a)
        assert monitor.latest("b.example/log") == _checkpoint(b)
        a.append_many(_leaves(2, b"more"))
        with pytest.raises(ProofError):
            # A proof from the other log does not match this log's checkpoint.
            monitor.advance(_checkpoint(a), b.consistency_proof(3, 3))
        assert monitor.latest("a.example/log") == _checkpoint(a, 6)
