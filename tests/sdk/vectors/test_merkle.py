"""vectors/merkle.json: RFC 9162 tree heads and proofs.

Checked with the reference recursion of tests/sdk/rfc9162_reference.py and with the
SDK's merkle module; invalid proofs must fail in both with the vector's reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pytest
import rfc9162_reference as ref
from collateral_sync import merkle
from collateral_sync.errors import ProofError

from ._common import ids_of, load

MERKLE = load("merkle.json")


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
    "vector", MERKLE["invalid_inclusion"], ids=ids_of(MERKLE["invalid_inclusion"])
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
    "vector", MERKLE["invalid_consistency"], ids=ids_of(MERKLE["invalid_consistency"])
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
