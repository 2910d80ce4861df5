"""vectors/merkle.json: RFC 9162 trees over the leaves 'leaf-<i>' (§5).

Tree heads, inclusion and consistency proofs computed with pymerkle, and proofs that
must be refused. The leaf rule is shared with sync.json, whose attestation references
point at these leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from collateral_sync import merkle
from collateral_sync.v1 import attestation_pb2
from pymerkle import InmemoryTree

from ._common import status

__all__ = ["leaf", "merkle_file"]


_LARGE_SIZES = (100, 1000)


def leaf(index: int) -> bytes:
    """Leaf ``index`` of every tree: the ASCII bytes 'leaf-<index>'."""
    return b"leaf-%d" % index


def _selected_indexes(size: int) -> list[int]:
    """Every index of small trees; edges and power-of-two boundaries of larger ones."""
    if size <= 16:
        return list(range(size))
    picks = {0, 1, size // 2, size - 2, size - 1}
    power = 1
    while power < size:
        picks.update({power - 1, power} & set(range(size)))
        power *= 2
    return sorted(picks)


def _selected_first_sizes(size: int) -> list[int]:
    if size <= 16:
        return list(range(1, size + 1))
    return sorted({i + 1 for i in _selected_indexes(size)} | {size})


def merkle_file() -> dict[str, Any]:
    largest = max(_LARGE_SIZES)
    tree = InmemoryTree()
    tree.append_entries([leaf(i) for i in range(largest)])
    sizes = [*range(1, 33), *_LARGE_SIZES]

    def root(size: int) -> bytes:
        return merkle.empty_root() if size == 0 else bytes(tree.get_root(size))

    def inclusion(index: int, size: int) -> attestation_pb2.InclusionProof:
        return merkle.inclusion_proof_from_pymerkle(tree.prove_inclusion(index + 1, size))

    def consistency(first: int, second: int) -> list[bytes]:
        if first == second:
            return []
        return list(
            merkle.consistency_proof_from_pymerkle(
                tree.prove_consistency(first, second)
            ).consistency_path
        )

    trees = [{"tree_size": 0, "root_hex": root(0).hex()}] + [
        {"tree_size": n, "root_hex": root(n).hex()} for n in sizes
    ]
    inclusions = []
    for size in sizes:
        for index in _selected_indexes(size):
            proof = inclusion(index, size)
            inclusions.append(
                {
                    "leaf_index": index,
                    "tree_size": size,
                    "leaf_hex": leaf(index).hex(),
                    "leaf_hash_hex": merkle.leaf_hash(leaf(index)).hex(),
                    "audit_path": [h.hex() for h in proof.audit_path],
                    "root_hex": root(size).hex(),
                }
            )
    consistencies = []
    for size in sizes:
        for first in _selected_first_sizes(size):
            consistencies.append(
                {
                    "first_tree_size": first,
                    "second_tree_size": size,
                    "first_root_hex": root(first).hex(),
                    "second_root_hex": root(size).hex(),
                    "consistency_path": [h.hex() for h in consistency(first, size)],
                }
            )
    return {
        "description": (
            "RFC 9162 Merkle trees with SHA-256 (docs/PROTOCOL.md section 5). Leaf i "
            "(0-based) is the ASCII bytes 'leaf-<i>' (decimal, no padding); leaf hash = "
            "SHA-256(0x00 || leaf), node hash = SHA-256(0x01 || left || right), empty tree = "
            "SHA-256(''). Inclusion audit paths are bottom-up (RFC 9162 2.1.3); consistency "
            "paths follow RFC 9162 2.1.4.1 (empty when the sizes are equal)."
        ),
        "leaf_rule": "leaf-<i>",
        "trees": trees,
        "inclusion": inclusions,
        "consistency": consistencies,
        "invalid_inclusion": _invalid_inclusion(root, inclusion),
        "invalid_consistency": _invalid_consistency(root, consistency),
    }


def _inclusion_vector(
    vector_id: str,
    description: str,
    *,
    leaf_index: int,
    tree_size: int,
    leaf_hash: bytes,
    audit_path: Sequence[bytes],
    root: bytes,
    reason: str,
) -> dict[str, Any]:
    return {
        "id": vector_id,
        "description": description,
        "leaf_index": leaf_index,
        "tree_size": tree_size,
        "leaf_hash_hex": leaf_hash.hex(),
        "audit_path": [h.hex() for h in audit_path],
        "root_hex": root.hex(),
        "expected": status(reason),
    }


def _invalid_inclusion(
    root: Callable[[int], bytes],
    inclusion: Callable[[int, int], attestation_pb2.InclusionProof],
) -> list[dict[str, Any]]:
    path = list(inclusion(5, 13).audit_path)
    good = {
        "leaf_index": 5,
        "tree_size": 13,
        "leaf_hash": merkle.leaf_hash(leaf(5)),
        "audit_path": path,
        "root": root(13),
    }

    def case(vector_id: str, description: str, reason: str, **changes: Any) -> dict[str, Any]:
        fields = {**good, **changes}
        return _inclusion_vector(vector_id, description, reason=reason, **fields)

    flipped = bytearray(path[1])
    flipped[0] ^= 0x80
    return [
        case(
            "index-equals-size",
            "leaf_index = tree_size.",
            "PROOF_INVALID",
            leaf_index=13,
        ),
        case(
            "index-beyond-size",
            "leaf_index > tree_size.",
            "PROOF_INVALID",
            leaf_index=20,
        ),
        case(
            "empty-tree",
            "tree_size = 0 has no leaves.",
            "PROOF_INVALID",
            leaf_index=0,
            tree_size=0,
            audit_path=[],
            root=root(0),
        ),
        case(
            "path-too-short",
            "The last audit path hash removed.",
            "PROOF_INVALID",
            audit_path=path[:-1],
        ),
        case(
            "path-too-long",
            "One hash too many.",
            "PROOF_INVALID",
            audit_path=[*path, root(1)],
        ),
        case(
            "short-path-hash",
            "An audit path hash of 31 bytes.",
            "PROOF_INVALID",
            audit_path=[path[0][:31], *path[1:]],
        ),
        case(
            "short-leaf-hash",
            "A leaf hash of 31 bytes.",
            "PROOF_INVALID",
            leaf_hash=merkle.leaf_hash(leaf(5))[:31],
        ),
        case(
            "short-root",
            "A root of 31 bytes.",
            "PROOF_INVALID",
            root=root(13)[:31],
        ),
        case(
            "wrong-leaf",
            "The proof of leaf 5 presented for leaf 6's hash.",
            "PROOF_INVALID",
            leaf_hash=merkle.leaf_hash(leaf(6)),
        ),
        case(
            "wrong-index",
            "The proof of leaf 5 presented as index 4.",
            "PROOF_INVALID",
            leaf_index=4,
        ),
        case(
            "flipped-path-bit",
            "One bit of an audit path hash flipped.",
            "PROOF_INVALID",
            audit_path=[path[0], bytes(flipped), *path[2:]],
        ),
        case(
            "wrong-root",
            "A valid proof checked against the root of another size.",
            "PROOF_INVALID",
            root=root(14),
        ),
    ]


def _invalid_consistency(
    root: Callable[[int], bytes], consistency: Callable[[int, int], list[bytes]]
) -> list[dict[str, Any]]:
    # History rewritten: leaf 3 replaced after a checkpoint at size 8, then grown to 13.
    rewritten = InmemoryTree()
    rewritten.append_entries(
        [b"leaf-3-rewritten" if i == 3 else leaf(i) for i in range(13)]
    )
    rewritten_path = list(
        merkle.consistency_proof_from_pymerkle(rewritten.prove_consistency(8, 13)).consistency_path
    )
    path = consistency(6, 13)

    def case(
        vector_id: str,
        description: str,
        reason: str,
        *,
        first: int,
        second: int,
        consistency_path: Sequence[bytes],
        first_root: bytes,
        second_root: bytes,
    ) -> dict[str, Any]:
        return {
            "id": vector_id,
            "description": description,
            "first_tree_size": first,
            "second_tree_size": second,
            "first_root_hex": first_root.hex(),
            "second_root_hex": second_root.hex(),
            "consistency_path": [h.hex() for h in consistency_path],
            "expected": status(reason),
        }

    flipped = bytearray(path[0])
    flipped[31] ^= 0x01
    return [
        case(
            "rewritten-history",
            "The log rewrote leaf 3 after the checkpoint of size 8: the new tree's proof from 8 "
            "to 13 does not lead from the old root.",
            "CHECKPOINT_INCONSISTENT",
            first=8,
            second=13,
            consistency_path=rewritten_path,
            first_root=root(8),
            second_root=bytes(rewritten.get_root(13)),
        ),
        case(
            "fork-same-size",
            "Two different roots for the same size.",
            "CHECKPOINT_INCONSISTENT",
            first=8,
            second=8,
            consistency_path=[],
            first_root=root(8),
            second_root=bytes(rewritten.get_root(8)),
        ),
        case(
            "flipped-path-bit",
            "One bit of a well-formed proof flipped.",
            "CHECKPOINT_INCONSISTENT",
            first=6,
            second=13,
            consistency_path=[bytes(flipped), *path[1:]],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "first-larger-than-second",
            "first_tree_size > second_tree_size.",
            "PROOF_INVALID",
            first=13,
            second=6,
            consistency_path=path,
            first_root=root(13),
            second_root=root(6),
        ),
        case(
            "first-size-zero",
            "A consistency proof from the empty tree is not defined.",
            "PROOF_INVALID",
            first=0,
            second=13,
            consistency_path=[],
            first_root=root(0),
            second_root=root(13),
        ),
        case(
            "path-too-short",
            "The last hash removed.",
            "PROOF_INVALID",
            first=6,
            second=13,
            consistency_path=path[:-1],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "path-too-long",
            "One hash too many.",
            "PROOF_INVALID",
            first=6,
            second=13,
            consistency_path=[*path, root(1)],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "short-path-hash",
            "A consistency path hash of 31 bytes.",
            "PROOF_INVALID",
            first=6,
            second=13,
            consistency_path=[path[0][:31], *path[1:]],
            first_root=root(6),
            second_root=root(13),
        ),
        case(
            "equal-sizes-non-empty-path",
            "Equal sizes with a non-empty path.",
            "PROOF_INVALID",
            first=8,
            second=8,
            consistency_path=[root(1)],
            first_root=root(8),
            second_root=root(8),
        ),
    ]
