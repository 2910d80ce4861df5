"""RFC 9162 Merkle trees (SHA-256): hashing, proof verification, pymerkle bridge.

The attestation log commits to its leaves with the RFC 9162 (Certificate
Transparency 2.0) Merkle tree hash. Counterparties check inclusion and
consistency proofs with the pure functions here; because proofs use RFC 9162
conventions on the wire (0-based index, audit path bottom-up, consistency path
of §2.1.4.1), any RFC 9162 verifier in any language checks the same bytes.

The log itself is stored with pymerkle, whose proofs use a different layout
(1-based indexes, a leading base hash, its own consistency decomposition).
:func:`inclusion_proof_from_pymerkle` and :func:`consistency_proof_from_pymerkle`
turn pymerkle's proofs into exact RFC 9162 proofs.

Every verifier checks its preconditions (ranges, hash sizes, path length)
before hashing anything and raises :class:`~collateral_sync.errors.ProofError`
saying what was expected and what was received.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from hmac import compare_digest
from typing import Protocol

from collateral_sync.errors import ProofError
from collateral_sync.v1 import attestation_pb2, errors_pb2

__all__ = [
    "HASH_SIZE",
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "consistency_proof_from_pymerkle",
    "empty_root",
    "inclusion_proof_from_pymerkle",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion_proof",
    "verify_consistency",
    "verify_consistency_proof",
    "verify_inclusion",
    "verify_inclusion_proof",
]

#: RFC 9162 §2.1.1 domain separation: leaf hashes and interior node hashes
#: can never collide (second-preimage resistance).
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
#: SHA-256 digest size; every leaf hash, node hash and root is this long.
HASH_SIZE = 32

_PROOF_INVALID = errors_pb2.ERROR_REASON_PROOF_INVALID
_INCONSISTENT = errors_pb2.ERROR_REASON_CHECKPOINT_INCONSISTENT

_Range = tuple[int, int]


# --------------------------------------------------------------------- hashing


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def empty_root() -> bytes:
    """Root of the empty tree: SHA-256 of the empty string."""
    return hashlib.sha256(b"").digest()


# ---------------------------------------------------------------- errors


def _error(
    what: str, expected: object, actual: object, *, reason: int = _PROOF_INVALID
) -> ProofError:
    return ProofError(
        f"{what}: expected {expected}, got {actual}",
        reason=reason,
        metadata={"expected": str(expected), "actual": str(actual)},
    )


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise _error(f"{name} has the wrong length", f"{HASH_SIZE} bytes", f"{len(value)} bytes")


def _check_path_hashes(name: str, path: Sequence[bytes]) -> None:
    for position, value in enumerate(path):
        _check_hash(f"{name}[{position}]", value)


def _check_root(name: str, expected: bytes, actual: bytes, *, reason: int) -> None:
    if not compare_digest(expected, actual):
        raise _error(f"{name} does not match", expected.hex(), actual.hex(), reason=reason)


# ------------------------------------------------------- inclusion (§2.1.3.2)


def _decomp_inclusion_proof(index: int, size: int) -> tuple[int, int]:
    """Split an inclusion path into its inner part and its right border.

    The inner part holds the siblings below the level where the paths to
    ``index`` and to the last leaf ``size - 1`` merge; above it the leaf's
    node is always a right child of a perfect left subtree (the border).
    """
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, path: Sequence[bytes], index: int) -> bytes:
    for level, sibling in enumerate(path):
        is_right = (index >> level) & 1
        seed = node_hash(sibling, seed) if is_right else node_hash(seed, sibling)
    return seed


def _chain_inner_right(seed: bytes, path: Sequence[bytes], index: int) -> bytes:
    # Only left siblings belong to the tree that ends at ``index``.
    for level, sibling in enumerate(path):
        if (index >> level) & 1:
            seed = node_hash(sibling, seed)
    return seed


def _chain_border_right(seed: bytes, path: Sequence[bytes]) -> bytes:
    for sibling in path:
        seed = node_hash(sibling, seed)
    return seed


def _check_index(index: int, tree_size: int) -> None:
    if tree_size <= 0:
        raise _error("tree size must be positive", "tree_size > 0", tree_size)
    if not 0 <= index < tree_size:
        raise _error("leaf index out of range", f"0 <= index < {tree_size}", index)


def root_from_inclusion_proof(
    leaf_hash: bytes, index: int, tree_size: int, audit_path: Sequence[bytes]
) -> bytes:
    """Root implied by an RFC 9162 inclusion proof (0-based ``index``).

    Raises ProofError if the index, the hash sizes or the path length do not
    fit ``(index, tree_size)``; nothing is hashed before those checks pass.
    """
    _check_index(index, tree_size)
    _check_hash("leaf hash", leaf_hash)
    _check_path_hashes("audit_path", audit_path)
    inner, border = _decomp_inclusion_proof(index, tree_size)
    if len(audit_path) != inner + border:
        raise _error(
            f"audit path length for leaf {index} of {tree_size}",
            inner + border,
            len(audit_path),
        )
    seed = _chain_inner(leaf_hash, audit_path[:inner], index)
    return _chain_border_right(seed, audit_path[inner:])


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, audit_path: Sequence[bytes], root: bytes
) -> None:
    """Check an RFC 9162 §2.1.3.2 inclusion proof against ``root``.

    Raises ProofError (ERROR_REASON_PROOF_INVALID) on any failure.
    """
    _check_hash("root", root)
    computed = root_from_inclusion_proof(leaf_hash, index, tree_size, audit_path)
    _check_root("root computed from the inclusion proof", root, computed, reason=_PROOF_INVALID)


# ----------------------------------------------------- consistency (§2.1.4.2)


def verify_consistency(
    first_size: int,
    second_size: int,
    consistency_path: Sequence[bytes],
    first_root: bytes,
    second_root: bytes,
) -> None:
    """Check an RFC 9162 §2.1.4.2 consistency proof between two tree heads.

    Structural problems (sizes, hash lengths, path length) raise ProofError
    with ERROR_REASON_PROOF_INVALID before any hashing; a root that the proof
    does not reproduce raises ProofError with
    ERROR_REASON_CHECKPOINT_INCONSISTENT.
    """
    if first_size <= 0:
        raise _error("first tree size must be positive", "first_size > 0", first_size)
    if first_size > second_size:
        raise _error(
            "first tree size exceeds second tree size",
            f"first_size <= {second_size}",
            first_size,
        )
    _check_hash("first root", first_root)
    _check_hash("second root", second_root)
    _check_path_hashes("consistency_path", consistency_path)

    if first_size == second_size:
        if consistency_path:
            raise _error("consistency path length for equal sizes", 0, len(consistency_path))
        _check_root(
            "second root of an equal-size tree", first_root, second_root, reason=_INCONSISTENT
        )
        return

    # The proof is the tail of the inclusion proof of leaf first_size - 1 in
    # the second tree, starting at the level of the largest perfect subtree
    # the first tree ends with; that subtree's hash comes first unless it is
    # the whole first tree (then the verifier already has it).
    inner, border = _decomp_inclusion_proof(first_size - 1, second_size)
    shift = (first_size & -first_size).bit_length() - 1
    inner -= shift
    whole_first_tree = first_size == 1 << shift
    start = 0 if whole_first_tree else 1
    if len(consistency_path) != start + inner + border:
        raise _error(
            f"consistency path length from {first_size} to {second_size}",
            start + inner + border,
            len(consistency_path),
        )
    seed = first_root if whole_first_tree else consistency_path[0]
    path = consistency_path[start:]
    mask = (first_size - 1) >> shift

    computed_first = _chain_border_right(_chain_inner_right(seed, path[:inner], mask), path[inner:])
    _check_root(
        "first root computed from the consistency proof",
        first_root,
        computed_first,
        reason=_INCONSISTENT,
    )
    computed_second = _chain_border_right(_chain_inner(seed, path[:inner], mask), path[inner:])
    _check_root(
        "second root computed from the consistency proof",
        second_root,
        computed_second,
        reason=_INCONSISTENT,
    )


# --------------------------------------------------------------- proto wrappers


def verify_inclusion_proof(
    proof: attestation_pb2.InclusionProof, leaf: bytes, checkpoint: attestation_pb2.Checkpoint
) -> None:
    """Check that ``leaf`` (the leaf bytes, not their hash) is in ``checkpoint``'s tree."""
    if proof.tree_size != checkpoint.tree_size:
        raise _error(
            "inclusion proof tree_size differs from the checkpoint",
            checkpoint.tree_size,
            proof.tree_size,
        )
    verify_inclusion(
        leaf_hash(leaf),
        proof.leaf_index,
        proof.tree_size,
        proof.audit_path,
        checkpoint.root_hash,
    )


def verify_consistency_proof(
    proof: attestation_pb2.ConsistencyProof,
    first: attestation_pb2.Checkpoint,
    second: attestation_pb2.Checkpoint,
) -> None:
    """Check that ``second``'s tree extends ``first``'s tree (same log)."""
    if first.origin != second.origin:
        raise _error("checkpoints come from different logs", first.origin, second.origin)
    if proof.first_tree_size != first.tree_size:
        raise _error(
            "consistency proof first_tree_size differs from the first checkpoint",
            first.tree_size,
            proof.first_tree_size,
        )
    if proof.second_tree_size != second.tree_size:
        raise _error(
            "consistency proof second_tree_size differs from the second checkpoint",
            second.tree_size,
            proof.second_tree_size,
        )
    verify_consistency(
        proof.first_tree_size,
        proof.second_tree_size,
        proof.consistency_path,
        first.root_hash,
        second.root_hash,
    )


# ------------------------------------------------------------ pymerkle bridge


class _PymerkleProof(Protocol):
    """The public attributes of a pymerkle 7 proof that the bridge reads."""

    algorithm: str
    security: bool
    size: int
    rule: list[int]
    path: list[bytes]


class _PymerkleInclusionProof(_PymerkleProof, Protocol):
    index: int


class _PymerkleConsistencyProof(_PymerkleProof, Protocol):
    prior_size: int
    subset: list[int]


def _split(width: int) -> int:
    """RFC 9162 split point: the largest power of two strictly below ``width``."""
    return 1 << ((width - 1).bit_length() - 1)


def _pymerkle_inclusion_layout(index: int, size: int) -> list[int]:
    """pymerkle's rule for leaf ``index`` (0-based) of ``size``.

    A rule bit says whether the node on the leaf's path at that height is a
    right child (bottom-up; the root's bit is 0). The path has one hash per
    bit: the leaf hash, then the siblings bottom-up.
    """
    bits: list[int] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            bits.append(0)
            end = start + k
        else:
            bits.append(1)
            start += k
    return [*reversed(bits), 0]


def _pymerkle_consistency_layout(
    prior: int, later: int
) -> tuple[list[int], list[int], list[_Range]]:
    """pymerkle's (rule, subset, leaf ranges) for a proof from ``prior`` to ``later``.

    pymerkle descends into the right half whenever the prior tree fills the
    left half (``prior >= k``), even when it fills it exactly, and then keeps
    descending left inside the new leaves until it reaches a single leaf; it
    also always includes the base node. RFC 9162 instead stops at ``m == k``.
    """
    start, prior_width, width = 0, prior, later
    bits: list[int] = []
    masks: list[int] = []
    siblings: list[_Range] = []
    while prior_width != width and not (prior_width == 0 and width == 1):
        k = _split(width)
        if prior_width < k:
            bits.append(0)
            masks.append(0)
            siblings.append((start + k, start + width))
            width = k
        else:
            bits.append(1)
            masks.append(1)
            siblings.append((start, start + k))
            start += k
            prior_width -= k
            width -= k
    base_mask = 1 if prior_width == width else 0
    rule = [*reversed(bits), 0]
    subset = [base_mask, *reversed(masks)]
    ranges = [(start, start + width), *reversed(siblings)]
    return rule, subset, ranges


def _rfc9162_consistency_ranges(first: int, second: int) -> list[_Range]:
    """Leaf ranges whose hashes make up PROOF(first, D[second]), in RFC order.

    SUBPROOF(m, D[n], b) of RFC 9162 §2.1.4.1, unrolled: descend left while
    ``m <= k``, right otherwise (``b`` becomes false), and stop at ``m == n``;
    the node reached is included only if ``b`` is false.
    """
    start, m, width, whole_first_tree = 0, first, second, True
    siblings: list[_Range] = []
    while m != width:
        k = _split(width)
        if m <= k:
            siblings.append((start + k, start + width))
            width = k
        else:
            siblings.append((start, start + k))
            start += k
            m -= k
            width -= k
            whole_first_tree = False
    base = [] if whole_first_tree else [(start, start + width)]
    return base + siblings[::-1]


def _range_hash(known: Mapping[_Range, bytes], leaves: _Range) -> bytes:
    """Hash of a leaf range, from a known hash or from known pieces along RFC splits."""
    found = known.get(leaves)
    if found is not None:
        return found
    start, end = leaves
    if end - start < 2:
        raise _error("pymerkle proof lacks a hash for leaves", f"[{start}, {end})", "none")
    k = _split(end - start)
    return node_hash(_range_hash(known, (start, start + k)), _range_hash(known, (start + k, end)))


def _check_pymerkle_proof(proof: _PymerkleProof, rule: list[int]) -> None:
    if proof.algorithm != "sha256":
        raise _error("pymerkle proof hash algorithm", "sha256", proof.algorithm)
    if proof.security is not True:
        raise _error("pymerkle proof security (0x00/0x01 prefixes)", True, proof.security)
    if len(proof.path) != len(rule):
        raise _error("pymerkle proof path length", len(rule), len(proof.path))
    if list(proof.rule) != rule:
        raise _error("pymerkle proof rule", rule, list(proof.rule))
    for position, value in enumerate(proof.path):
        if not isinstance(value, bytes):
            raise _error(f"pymerkle path[{position}] type", "bytes", type(value).__name__)
    _check_path_hashes("pymerkle path", proof.path)


def _check_sizes(what: str, low: int, high: int) -> None:
    if not (isinstance(low, int) and isinstance(high, int) and 0 < low <= high):
        raise _error(f"pymerkle {what}", "0 < first <= second", f"{low}, {high}")


def inclusion_proof_from_pymerkle(
    proof: _PymerkleInclusionProof,
) -> attestation_pb2.InclusionProof:
    """Convert a pymerkle inclusion proof to an RFC 9162 one (0-based index).

    pymerkle's path is the leaf hash followed by the RFC 9162 audit path, so
    after checking the proof's shape the leaf hash is dropped.
    """
    _check_sizes("inclusion proof index and size", proof.index, proof.size)
    index = proof.index - 1
    _check_pymerkle_proof(proof, _pymerkle_inclusion_layout(index, proof.size))
    return attestation_pb2.InclusionProof(
        leaf_index=index, tree_size=proof.size, audit_path=proof.path[1:]
    )


def consistency_proof_from_pymerkle(
    proof: _PymerkleConsistencyProof,
) -> attestation_pb2.ConsistencyProof:
    """Convert a pymerkle consistency proof to an RFC 9162 §2.1.4.1 one.

    Each pymerkle path hash covers a leaf range that follows from the sizes;
    the RFC proof is rebuilt range by range. Where RFC 9162 needs one hash
    for a range pymerkle split into pieces, the pieces are combined along
    RFC 9162's splits. The redundant old root pymerkle includes is dropped.
    """
    _check_sizes("consistency proof sizes", proof.prior_size, proof.size)
    rule, subset, ranges = _pymerkle_consistency_layout(proof.prior_size, proof.size)
    _check_pymerkle_proof(proof, rule)
    if list(proof.subset) != subset:
        raise _error("pymerkle proof subset", subset, list(proof.subset))
    known = dict(zip(ranges, proof.path, strict=True))
    path = [
        _range_hash(known, leaves)
        for leaves in _rfc9162_consistency_ranges(proof.prior_size, proof.size)
    ]
    return attestation_pb2.ConsistencyProof(
        first_tree_size=proof.prior_size, second_tree_size=proof.size, consistency_path=path
    )
