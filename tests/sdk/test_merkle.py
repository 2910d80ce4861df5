"""Tests for collateral_sync.merkle: RFC 9162 proofs and the pymerkle bridge.

Three implementations check each other: pymerkle (through the bridge), the
SDK's iterative verifiers, and the recursive reference in rfc9162_reference.
Known-answer vectors from the Certificate Transparency test data anchor all
three to the RFC.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import rfc9162_reference as ref
from collateral_sync import merkle
from collateral_sync.errors import ProofError
from collateral_sync.v1 import attestation_pb2, errors_pb2
from pymerkle import InmemoryTree

PROOF_INVALID = errors_pb2.ERROR_REASON_PROOF_INVALID
INCONSISTENT = errors_pb2.ERROR_REASON_CHECKPOINT_INCONSISTENT

SMALL = 64
LARGE = 5000
LEAVES = [b"statement %d" % i for i in range(LARGE)]


def _tree(leaves: list[bytes]) -> InmemoryTree:
    tree = InmemoryTree()
    tree.append_entries(leaves)
    return tree


@pytest.fixture(scope="module")
def small_tree() -> InmemoryTree:
    return _tree(LEAVES[:SMALL])


@pytest.fixture(scope="module")
def large_tree() -> InmemoryTree:
    return _tree(LEAVES)


@pytest.fixture
def no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the verifier hashes anything (preconditions come first)."""

    def forbidden(left: bytes, right: bytes) -> bytes:
        raise AssertionError("hashed before the preconditions were checked")

    monkeypatch.setattr(merkle, "node_hash", forbidden)


def _inclusion(tree: InmemoryTree, index: int, size: int) -> attestation_pb2.InclusionProof:
    return merkle.inclusion_proof_from_pymerkle(tree.prove_inclusion(index + 1, size))


def _consistency(tree: InmemoryTree, first: int, second: int) -> attestation_pb2.ConsistencyProof:
    return merkle.consistency_proof_from_pymerkle(tree.prove_consistency(first, second))


def _flip(value: bytes, position: int = 0) -> bytes:
    return value[:position] + bytes([value[position] ^ 0x01]) + value[position + 1 :]


# ------------------------------------------------------------ known answers

# Certificate Transparency test vectors (RFC 6962 reference implementation,
# also in transparency-dev/merkle testonly): leaves, MTH of the first n
# leaves, and a few inclusion and consistency proofs.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def test_prefixes_and_empty_root() -> None:
    assert merkle.LEAF_PREFIX == b"\x00"
    assert merkle.NODE_PREFIX == b"\x01"
    assert merkle.HASH_SIZE == 32
    assert merkle.empty_root().hex() == CT_ROOTS[0]
    assert ref.mth([]).hex() == CT_ROOTS[0]
    assert InmemoryTree().get_root(0).hex() == CT_ROOTS[0]


def test_known_answer_roots() -> None:
    tree = _tree(CT_LEAVES)
    for size in range(1, len(CT_LEAVES) + 1):
        assert ref.mth(CT_LEAVES[:size]).hex() == CT_ROOTS[size]
        assert tree.get_root(size).hex() == CT_ROOTS[size]
    assert merkle.leaf_hash(CT_LEAVES[0]).hex() == CT_ROOTS[1]
    assert merkle.node_hash(merkle.leaf_hash(b""), merkle.leaf_hash(b"\x00")).hex() == CT_ROOTS[2]


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_known_answer_inclusion(index: int, size: int) -> None:
    expected = [bytes.fromhex(h) for h in CT_INCLUSION[index, size]]
    assert ref.path(index, CT_LEAVES[:size]) == expected
    assert list(_inclusion(_tree(CT_LEAVES), index, size).audit_path) == expected
    merkle.verify_inclusion(
        merkle.leaf_hash(CT_LEAVES[index]), index, size, expected, bytes.fromhex(CT_ROOTS[size])
    )


@pytest.mark.parametrize(("first", "second"), sorted(CT_CONSISTENCY))
def test_known_answer_consistency(first: int, second: int) -> None:
    expected = [bytes.fromhex(h) for h in CT_CONSISTENCY[first, second]]
    assert ref.proof(first, CT_LEAVES[:second]) == expected
    assert list(_consistency(_tree(CT_LEAVES), first, second).consistency_path) == expected
    merkle.verify_consistency(
        first, second, expected, bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second])
    )


# ---------------------------------------------------- exhaustive cross-check


def _cross_check_inclusion(tree: InmemoryTree, index: int, size: int, root: bytes) -> None:
    leaves = LEAVES[:size]
    proof = _inclusion(tree, index, size)
    assert proof.leaf_index == index
    assert proof.tree_size == size
    assert list(proof.audit_path) == ref.path(index, leaves)
    leaf = merkle.leaf_hash(LEAVES[index])
    merkle.verify_inclusion(leaf, index, size, proof.audit_path, root)
    assert merkle.root_from_inclusion_proof(leaf, index, size, proof.audit_path) == root
    assert ref.root_from_path(leaf, index, size, list(proof.audit_path)) == root


def _cross_check_consistency(
    tree: InmemoryTree, first: int, second: int, first_root: bytes, second_root: bytes
) -> None:
    proof = _consistency(tree, first, second)
    assert (proof.first_tree_size, proof.second_tree_size) == (first, second)
    assert list(proof.consistency_path) == ref.proof(first, LEAVES[:second])
    merkle.verify_consistency(first, second, proof.consistency_path, first_root, second_root)
    assert ref.roots_from_proof(first, second, list(proof.consistency_path), first_root) == (
        first_root,
        second_root,
    )


@pytest.mark.parametrize("size", range(1, SMALL + 1))
def test_every_pair_up_to_64(small_tree: InmemoryTree, size: int) -> None:
    roots = [ref.mth(LEAVES[:n]) for n in range(size + 1)]
    assert small_tree.get_root(size) == roots[size]
    for index in range(size):
        _cross_check_inclusion(small_tree, index, size, roots[size])
    for first in range(1, size + 1):
        _cross_check_consistency(small_tree, first, size, roots[first], roots[size])


def _large_cases() -> Iterator[tuple[int, int, int]]:
    rng = random.Random(9162)
    sizes = [1023, 1024, 1025, 3000, 4096, LARGE, *rng.sample(range(65, LARGE), 4)]
    for size in sizes:
        powers = [1 << p for p in range(size.bit_length()) if 1 << p <= size]
        firsts = {1, size - 1, size, rng.randrange(1, size + 1), rng.choice(powers)}
        indexes = {0, size - 1, rng.randrange(size), rng.randrange(size)}
        for first, index in zip(sorted(firsts), sorted(indexes) * 2, strict=False):
            yield size, first, index


@pytest.mark.parametrize(("size", "first", "index"), list(_large_cases()))
def test_random_large_sizes(large_tree: InmemoryTree, size: int, first: int, index: int) -> None:
    root = ref.mth(LEAVES[:size])
    first_root = ref.mth(LEAVES[:first])
    assert large_tree.get_root(size) == root
    _cross_check_inclusion(large_tree, index, size, root)
    _cross_check_consistency(large_tree, first, size, first_root, root)


# ------------------------------------------------------ inclusion negatives

SIZE, INDEX = 13, 5


@pytest.fixture(scope="module")
def inclusion_case(small_tree: InmemoryTree) -> tuple[bytes, list[bytes], bytes]:
    proof = _inclusion(small_tree, INDEX, SIZE)
    return merkle.leaf_hash(LEAVES[INDEX]), list(proof.audit_path), ref.mth(LEAVES[:SIZE])


def _raises(reason: int, call: object, *args: object) -> ProofError:
    assert callable(call)
    with pytest.raises(ProofError) as info:
        call(*args)
    assert info.value.reason == reason
    assert "expected" in info.value.message
    assert set(info.value.metadata) >= {"expected", "actual"}
    return info.value


def test_inclusion_flipped_byte_in_each_position(
    inclusion_case: tuple[bytes, list[bytes], bytes],
) -> None:
    leaf, path, root = inclusion_case
    for position in range(len(path)):
        for byte in (0, merkle.HASH_SIZE - 1):
            bad = list(path)
            bad[position] = _flip(bad[position], byte)
            _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, INDEX, SIZE, bad, root)
            assert ref.root_from_path(leaf, INDEX, SIZE, bad) != root
    _raises(PROOF_INVALID, merkle.verify_inclusion, _flip(leaf), INDEX, SIZE, path, root)
    _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, INDEX, SIZE, path, _flip(root))


def test_inclusion_wrong_index(inclusion_case: tuple[bytes, list[bytes], bytes]) -> None:
    leaf, path, root = inclusion_case
    for index in (INDEX - 1, INDEX + 1):
        # Same path length, so only the hashing can tell.
        assert len(ref.path(index, LEAVES[:SIZE])) == len(path)
        _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, index, SIZE, path, root)
    with pytest.raises(ValueError, match="path"):
        ref.root_from_path(leaf, 12, SIZE, path)


@pytest.mark.usefixtures("no_hashing")
def test_inclusion_preconditions_before_hashing(
    inclusion_case: tuple[bytes, list[bytes], bytes],
) -> None:
    leaf, path, root = inclusion_case
    error = _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, SIZE, SIZE, path, root)
    assert error.metadata == {"expected": f"0 <= index < {SIZE}", "actual": str(SIZE)}
    _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, SIZE + 7, SIZE, path, root)
    _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, -1, SIZE, path, root)
    error = _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, 0, 0, [], root)
    assert error.metadata["actual"] == "0"
    for position in range(len(path)):
        short = list(path)
        short[position] = short[position][:31]
        error = _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, INDEX, SIZE, short, root)
        assert f"audit_path[{position}]" in error.message
        assert error.metadata == {"expected": "32 bytes", "actual": "31 bytes"}
    error = _raises(PROOF_INVALID, merkle.verify_inclusion, leaf[:31], INDEX, SIZE, path, root)
    assert "leaf hash" in error.message
    error = _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, INDEX, SIZE, path, root[:31])
    assert "root" in error.message
    error = _raises(
        PROOF_INVALID, merkle.verify_inclusion, leaf, INDEX, SIZE, [*path, path[0]], root
    )
    assert error.metadata == {"expected": str(len(path)), "actual": str(len(path) + 1)}
    error = _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, INDEX, SIZE, path[:-1], root)
    assert error.metadata == {"expected": str(len(path)), "actual": str(len(path) - 1)}
    _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, 0, 1, [leaf], leaf)


def test_single_leaf_tree() -> None:
    leaf = merkle.leaf_hash(b"only")
    merkle.verify_inclusion(leaf, 0, 1, [], leaf)
    merkle.verify_consistency(1, 1, [], leaf, leaf)
    _raises(PROOF_INVALID, merkle.verify_inclusion, leaf, 0, 1, [], _flip(leaf))


# ---------------------------------------------------- consistency negatives

FIRST, SECOND = 6, 27


@pytest.fixture(scope="module")
def consistency_case(small_tree: InmemoryTree) -> tuple[list[bytes], bytes, bytes]:
    proof = _consistency(small_tree, FIRST, SECOND)
    return list(proof.consistency_path), ref.mth(LEAVES[:FIRST]), ref.mth(LEAVES[:SECOND])


def test_consistency_flipped_byte_in_each_position(
    consistency_case: tuple[list[bytes], bytes, bytes],
) -> None:
    path, first_root, second_root = consistency_case
    for position in range(len(path)):
        bad = list(path)
        bad[position] = _flip(bad[position], position % merkle.HASH_SIZE)
        _raises(
            INCONSISTENT, merkle.verify_consistency, FIRST, SECOND, bad, first_root, second_root
        )
        assert ref.roots_from_proof(FIRST, SECOND, bad, first_root) != (first_root, second_root)
    for first, second in ((_flip(first_root), second_root), (first_root, _flip(second_root))):
        _raises(INCONSISTENT, merkle.verify_consistency, FIRST, SECOND, path, first, second)


@pytest.mark.usefixtures("no_hashing")
def test_consistency_preconditions_before_hashing(
    consistency_case: tuple[list[bytes], bytes, bytes],
) -> None:
    path, first_root, second_root = consistency_case
    verify = merkle.verify_consistency
    error = _raises(PROOF_INVALID, verify, SECOND, FIRST, path, second_root, first_root)
    assert error.metadata == {"expected": f"first_size <= {FIRST}", "actual": str(SECOND)}
    error = _raises(PROOF_INVALID, verify, 0, SECOND, path, first_root, second_root)
    assert error.metadata["actual"] == "0"
    error = _raises(PROOF_INVALID, verify, FIRST, SECOND, [*path, path[0]], first_root, second_root)
    assert error.metadata == {"expected": str(len(path)), "actual": str(len(path) + 1)}
    _raises(PROOF_INVALID, verify, FIRST, SECOND, path[:-1], first_root, second_root)
    _raises(PROOF_INVALID, verify, FIRST, SECOND, [], first_root, second_root)
    for position in range(len(path)):
        short = list(path)
        short[position] = short[position][:31]
        error = _raises(PROOF_INVALID, verify, FIRST, SECOND, short, first_root, second_root)
        assert f"consistency_path[{position}]" in error.message
    _raises(PROOF_INVALID, verify, FIRST, SECOND, path, first_root[:31], second_root)
    _raises(PROOF_INVALID, verify, FIRST, SECOND, path, first_root, second_root[:31])
    # Equal sizes: the proof is empty and the roots must be equal.
    _raises(PROOF_INVALID, verify, SECOND, SECOND, [path[0]], second_root, second_root)
    error = _raises(INCONSISTENT, verify, SECOND, SECOND, [], second_root, _flip(second_root))
    assert error.metadata["expected"] == second_root.hex()


def test_consistency_power_of_two_first_size(small_tree: InmemoryTree) -> None:
    # The first tree is a perfect subtree: RFC 9162 omits its root from the
    # proof; pymerkle includes it and splits the new part (the bridge's hard case).
    for first, second in ((8, 9), (8, 13), (16, 64), (32, 33), (4, 7)):
        first_root, second_root = ref.mth(LEAVES[:first]), ref.mth(LEAVES[:second])
        path = list(_consistency(small_tree, first, second).consistency_path)
        pymerkle_path = small_tree.prove_consistency(first, second).path
        assert first_root in pymerkle_path
        assert first_root not in path
        assert path == ref.proof(first, LEAVES[:second])
        merkle.verify_consistency(first, second, path, first_root, second_root)
        _raises(
            INCONSISTENT,
            merkle.verify_consistency,
            first,
            second,
            path,
            ref.mth(LEAVES[: first - 1]),
            second_root,
        )


def test_rewritten_history_is_exposed() -> None:
    honest = _tree(LEAVES[:20])
    old_size = 10
    old_root = honest.get_root(old_size)
    # The log operator changes one early leaf and keeps appending.
    forged_leaves = list(LEAVES[:40])
    forged_leaves[3] = b"forged statement"
    forged = _tree(forged_leaves)
    for new_size in (11, 16, 40):
        new_root = forged.get_root(new_size)
        proof = _consistency(forged, old_size, new_size)
        path = list(proof.consistency_path)
        error = _raises(
            INCONSISTENT, merkle.verify_consistency, old_size, new_size, path, old_root, new_root
        )
        assert "first root" in error.message
        assert ref.roots_from_proof(old_size, new_size, path, old_root)[0] != old_root
        # The same proof is fine against the forged log's own old root.
        merkle.verify_consistency(old_size, new_size, path, forged.get_root(old_size), new_root)
    # At equal size the forged root differs from the one already seen.
    _raises(
        INCONSISTENT,
        merkle.verify_consistency,
        old_size,
        old_size,
        [],
        old_root,
        forged.get_root(old_size),
    )
    # A proof made from the honest log cannot vouch for the forged root either.
    honest_proof = _consistency(honest, old_size, 20)
    _raises(
        INCONSISTENT,
        merkle.verify_consistency,
        old_size,
        20,
        honest_proof.consistency_path,
        old_root,
        forged.get_root(20),
    )


def test_reference_verifier_rejects_wrong_lengths() -> None:
    leaves = LEAVES[:11]
    good = ref.proof(3, leaves)
    root3 = ref.mth(leaves[:3])
    with pytest.raises(ValueError, match="path"):
        ref.roots_from_proof(3, 11, good[:-1], root3)
    with pytest.raises(ValueError, match="path"):
        ref.roots_from_proof(3, 11, [*good, good[0]], root3)
    with pytest.raises(ValueError, match="path"):
        ref.root_from_path(merkle.leaf_hash(leaves[2]), 2, 11, [*ref.path(2, leaves), root3])


# -------------------------------------------------------------- proto wrappers


def _checkpoint(
    tree: InmemoryTree, size: int, origin: str = "log.example/a"
) -> attestation_pb2.Checkpoint:
    return attestation_pb2.Checkpoint(origin=origin, tree_size=size, root_hash=tree.get_root(size))


def test_verify_inclusion_proof(small_tree: InmemoryTree) -> None:
    proof = _inclusion(small_tree, 4, 9)
    merkle.verify_inclusion_proof(proof, LEAVES[4], _checkpoint(small_tree, 9))
    _raises(
        PROOF_INVALID, merkle.verify_inclusion_proof, proof, LEAVES[5], _checkpoint(small_tree, 9)
    )
    error = _raises(
        PROOF_INVALID, merkle.verify_inclusion_proof, proof, LEAVES[4], _checkpoint(small_tree, 10)
    )
    assert "tree_size" in error.message
    assert error.metadata == {"expected": "10", "actual": "9"}


def test_verify_consistency_proof(small_tree: InmemoryTree) -> None:
    proof = _consistency(small_tree, 5, 12)
    first, second = _checkpoint(small_tree, 5), _checkpoint(small_tree, 12)
    merkle.verify_consistency_proof(proof, first, second)
    error = _raises(
        PROOF_INVALID, merkle.verify_consistency_proof, proof, _checkpoint(small_tree, 6), second
    )
    assert "first_tree_size" in error.message
    error = _raises(
        PROOF_INVALID, merkle.verify_consistency_proof, proof, first, _checkpoint(small_tree, 13)
    )
    assert "second_tree_size" in error.message
    assert error.metadata == {"expected": "13", "actual": "12"}
    error = _raises(
        PROOF_INVALID,
        merkle.verify_consistency_proof,
        proof,
        first,
        _checkpoint(small_tree, 12, origin="log.example/b"),
    )
    assert error.metadata == {"expected": "log.example/a", "actual": "log.example/b"}
    _raises(
        INCONSISTENT,
        merkle.verify_consistency_proof,
        proof,
        first,
        attestation_pb2.Checkpoint(
            origin="log.example/a", tree_size=12, root_hash=_flip(second.root_hash)
        ),
    )


# ------------------------------------------------------------ bridge negatives


def _copy(proof: object, **changes: object) -> SimpleNamespace:
    fields = dict(vars(proof))
    fields.update(changes)
    return SimpleNamespace(**fields)


def test_bridge_rejects_malformed_inclusion(small_tree: InmemoryTree) -> None:
    proof = small_tree.prove_inclusion(6, 13)
    merkle.inclusion_proof_from_pymerkle(_copy(proof))
    bad_rule = list(proof.rule)
    bad_rule[0] ^= 1
    cases = [
        _copy(proof, rule=bad_rule),
        _copy(proof, path=proof.path[:-1]),
        _copy(proof, path=[*proof.path, proof.path[0]]),
        _copy(proof, path=[proof.path[0][:31], *proof.path[1:]]),
        _copy(proof, path=[proof.path[0].hex(), *proof.path[1:]]),
        _copy(proof, index=0),
        _copy(proof, index=14),
        _copy(proof, index=9),  # another leaf: same length, other rule
        _copy(proof, algorithm="sha512"),
        _copy(proof, security=False),
    ]
    for case in cases:
        with pytest.raises(ProofError) as info:
            merkle.inclusion_proof_from_pymerkle(case)
        assert info.value.reason == PROOF_INVALID


def test_bridge_rejects_malformed_consistency(small_tree: InmemoryTree) -> None:
    proof = small_tree.prove_consistency(8, 13)
    merkle.consistency_proof_from_pymerkle(_copy(proof))
    bad_subset = list(proof.subset)
    bad_subset[-1] ^= 1
    cases = [
        _copy(proof, subset=bad_subset),
        _copy(proof, rule=[1 - bit for bit in proof.rule]),
        _copy(proof, path=proof.path[:-1]),
        _copy(proof, path=[*proof.path[:-1], proof.path[-1][:31]]),
        _copy(proof, prior_size=0),
        _copy(proof, prior_size=14),
        _copy(proof, prior_size=7),
        _copy(proof, algorithm="sha3_256"),
    ]
    for case in cases:
        with pytest.raises(ProofError) as info:
            merkle.consistency_proof_from_pymerkle(case)
        assert info.value.reason == PROOF_INVALID
