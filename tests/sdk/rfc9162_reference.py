"""Independent RFC 9162 Merkle tree reference, for the test suite only.

Written straight from the recursive definitions of RFC 9162 §2.1.1 (MTH),
§2.1.3.1 (PATH) and §2.1.4.1 (PROOF/SUBPROOF), with verifiers that follow the
same recursion instead of the iterative bit arithmetic of
``collateral_sync.merkle``. It shares no code with the SDK so that the two can
check each other. Obviously correct, not fast: everything is recomputed from
the leaf data on every call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["mth", "path", "proof", "root_from_path", "roots_from_proof", "split"]


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def split(n: int) -> int:
    """k: the largest power of two smaller than n (n > 1)."""
    assert n > 1
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of §2.1.1 over the leaf *data* (not leaf hashes)."""
    n = len(leaves)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + leaves[0])
    k = split(n)
    return _h(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of §2.1.3.1: the audit path for leaf m (0-based)."""
    n = len(leaves)
    assert 0 <= m < n
    if n == 1:
        return []
    k = split(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def proof(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of §2.1.4.1 (0 < m <= n)."""
    assert 0 < m <= len(leaves)
    return _subproof(m, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [mth(leaves)]
    k = split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], b), mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def root_from_path(leaf_hash: bytes, m: int, n: int, audit_path: Sequence[bytes]) -> bytes:
    """Root implied by an inclusion proof, by the recursion of PATH.

    The last path entry is the sibling at the top of the tree, so each level
    of recursion peels one entry off the end. Raises ValueError if the path
    does not have the length the recursion needs.
    """
    if not 0 <= m < n:
        raise ValueError(f"index {m} not in tree of size {n}")
    if n == 1:
        if audit_path:
            raise ValueError("path too long")
        return leaf_hash
    if not audit_path:
        raise ValueError("path too short")
    k = split(n)
    top = audit_path[-1]
    if m < k:
        return _h(b"\x01" + root_from_path(leaf_hash, m, k, audit_path[:-1]) + top)
    return _h(b"\x01" + top + root_from_path(leaf_hash, m - k, n - k, audit_path[:-1]))


def roots_from_proof(
    m: int, n: int, consistency_path: Sequence[bytes], first_root: bytes
) -> tuple[bytes, bytes]:
    """(first root, second root) implied by a consistency proof, by the recursion of SUBPROOF.

    ``first_root`` stands in for the node SUBPROOF omits when the recursion
    reaches the whole first tree with b = true. A proof is valid when the
    first returned root equals the first tree's root and the second equals
    the second tree's root. Raises ValueError on a path of the wrong length.
    """
    if not 0 < m <= n:
        raise ValueError(f"sizes {m}, {n} not 0 < m <= n")
    return _subroots(m, n, True, list(consistency_path), first_root)


def _subroots(
    m: int, n: int, b: bool, consistency_path: list[bytes], first_root: bytes
) -> tuple[bytes, bytes]:
    if m == n:
        if b:
            if consistency_path:
                raise ValueError("path too long")
            return first_root, first_root
        if len(consistency_path) != 1:
            raise ValueError("path length wrong at a shared subtree")
        return consistency_path[0], consistency_path[0]
    if not consistency_path:
        raise ValueError("path too short")
    k = split(n)
    top = consistency_path[-1]
    rest = consistency_path[:-1]
    if m <= k:
        old, new = _subroots(m, k, b, rest, first_root)
        # The first tree lies inside the left half; only the second tree grows.
        return old, _h(b"\x01" + new + top)
    old, new = _subroots(m - k, n - k, False, rest, first_root)
    return _h(b"\x01" + top + old), _h(b"\x01" + top + new)
