"""vectors/position_tree.json: position-tree leaves and roots.

Checked with a leaf encoder written from docs/PROTOCOL.md §10.3 and the RFC 9162
reference, and with the SDK's position_leaf and PositionTree.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import rfc9162_reference as ref
from collateral_sync import merkle
from collateral_sync.errors import CollateralSyncError
from collateral_sync.reconciliation import PositionTree, position_leaf
from collateral_sync.v1 import common_pb2

from ._common import ids_of, load

POSITION_TREE = load("position_tree.json")


_LEAF_PREFIX = b"collateral-sync/v1/position-leaf\x00"


def _own_lp(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def _own_position_leaf(account: dict[str, Any]) -> bytes:
    """§10.3 from the document alone."""
    positions = sorted(account["positions"], key=lambda p: p["asset_id"].encode("utf-8"))
    parts = [_LEAF_PREFIX, _own_lp(account["account_id"]), len(positions).to_bytes(4, "big")]
    for p in positions:
        parts += [
            _own_lp(p[name])
            for name in ("asset_id", "quantity", "locked_quantity", "pledged_quantity")
        ]
    return b"".join(parts)


def _tree_positions(account: dict[str, Any]) -> list[common_pb2.Position]:
    """An account's positions as Position messages; a null amount is an absent Decimal.

    ``account_id`` is left unset (position_leaf takes the account id apart, and an unset
    one is allowed): protobuf cannot hold the lone surrogate of one invalid vector.
    """
    positions = []
    for given in account["positions"]:
        position = common_pb2.Position(asset_id=given["asset_id"])
        for name in ("quantity", "locked_quantity", "pledged_quantity"):
            if given[name] is not None:
                getattr(position, name).CopyFrom(common_pb2.Decimal(value=given[name]))
        positions.append(position)
    return positions


def test_position_tree_vectors_cover_what_the_spec_requires() -> None:
    assert bytes.fromhex(POSITION_TREE["leaf_prefix_hex"]) == _LEAF_PREFIX
    assert len(_LEAF_PREFIX) == 33  # 32 ASCII bytes and a zero byte (§10.3)
    sizes = {t["account_count"] for t in POSITION_TREE["trees"]}
    assert {0, 1} <= sizes
    assert max(sizes) >= 3
    reasons = {v["expected"]["reason"] for v in POSITION_TREE["invalid"]}
    assert reasons == {"INVALID_AMOUNT", "MALFORMED"}


@pytest.mark.parametrize("vector", POSITION_TREE["trees"], ids=ids_of(POSITION_TREE["trees"]))
def test_position_tree_vector(vector: dict[str, Any]) -> None:
    accounts = vector["accounts"]
    leaves = [bytes.fromhex(leaf["leaf_hex"]) for leaf in vector["leaves"]]
    root = bytes.fromhex(vector["root_hex"])
    ordered = sorted(accounts, key=lambda a: a["account_id"].encode("utf-8"))
    assert [a["account_id"] for a in ordered] == [leaf["account_id"] for leaf in vector["leaves"]]
    assert vector["account_count"] == len(accounts)
    # Independent.
    assert [_own_position_leaf(a) for a in ordered] == leaves
    for leaf, given in zip(leaves, vector["leaves"], strict=True):
        assert hashlib.sha256(b"\x00" + leaf).hexdigest() == given["leaf_hash_hex"]
    assert ref.mth(leaves) == root
    # SDK: each leaf, from messages and from tuples, and the tree from the accounts as given.
    for account, leaf in zip(ordered, leaves, strict=True):
        assert position_leaf(account["account_id"], _tree_positions(account)) == leaf
        values = [
            (p["asset_id"], p["quantity"], p["locked_quantity"], p["pledged_quantity"])
            for p in account["positions"]
        ]
        assert position_leaf(account["account_id"], values) == leaf
        assert merkle.leaf_hash(leaf).hex() == next(
            v["leaf_hash_hex"] for v in vector["leaves"] if v["account_id"] == account["account_id"]
        )
    tree = PositionTree.build([(a["account_id"], _tree_positions(a)) for a in accounts])
    assert tree.size == len(leaves)
    assert tree.root == root
    assert [tree.leaf(i) for i in range(tree.size)] == leaves


@pytest.mark.parametrize("vector", POSITION_TREE["invalid"], ids=ids_of(POSITION_TREE["invalid"]))
def test_invalid_position_tree_vector(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    accounts = [(a["account_id"], _tree_positions(a)) for a in vector["accounts"]]
    with pytest.raises(CollateralSyncError) as sdk:
        PositionTree.build(accounts)
    assert sdk.value.reason_name == expected["reason"], sdk.value.message
    assert sdk.value.code.name == expected["grpc_status"]
