"""vectors/position_tree.json: position-tree leaves and roots (§10.3).

Trees given with their accounts in any order, each leaf's bytes and hash and the RFC
9162 root; account sets that must be refused. Leaves are built here from the
specification, not with the SDK's position_leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from collateral_sync import merkle
from pymerkle import InmemoryTree

from ._common import status

__all__ = ["position_tree_file"]


#: §10.3: 32 ASCII bytes and one zero byte.
_POSITION_LEAF_PREFIX = b"collateral-sync/v1/position-leaf\x00"

#: One position as given to a tree: asset_id, quantity, locked_quantity, pledged_quantity
#: (None: the Decimal is absent).
_TreePosition = tuple[str, str | None, str | None, str | None]


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def _position_leaf(account_id: str, positions: Sequence[_TreePosition]) -> bytes:
    """The leaf bytes of §10.3, written from the specification (not the SDK's position_leaf)."""
    ordered = sorted(positions, key=lambda p: p[0].encode("utf-8"))
    parts = [
        _POSITION_LEAF_PREFIX,
        _length_prefixed(account_id),
        len(ordered).to_bytes(4, "big"),
    ]
    for position in ordered:
        parts.extend(_length_prefixed(text) for text in position if text is not None)
    return b"".join(parts)


def _tree_accounts(accounts: Sequence[tuple[str, Sequence[_TreePosition]]]) -> list[Any]:
    return [
        {
            "account_id": account_id,
            "positions": [
                {
                    "asset_id": asset_id,
                    "quantity": quantity,
                    "locked_quantity": locked,
                    "pledged_quantity": pledged,
                }
                for asset_id, quantity, locked, pledged in positions
            ],
        }
        for account_id, positions in accounts
    ]


def _tree_vector(
    vector_id: str, description: str, accounts: Sequence[tuple[str, Sequence[_TreePosition]]]
) -> dict[str, Any]:
    ordered = sorted(accounts, key=lambda a: a[0].encode("utf-8"))
    leaves = [_position_leaf(account_id, positions) for account_id, positions in ordered]
    if leaves:
        tree = InmemoryTree()
        tree.append_entries(leaves)
        root = bytes(tree.get_root(len(leaves)))
    else:
        root = merkle.empty_root()
    return {
        "id": vector_id,
        "description": description,
        "accounts": _tree_accounts(accounts),
        "leaves": [
            {
                "account_id": account_id,
                "leaf_hex": leaf.hex(),
                "leaf_hash_hex": hashlib.sha256(b"\x00" + leaf).hexdigest(),
            }
            for (account_id, _), leaf in zip(ordered, leaves, strict=True)
        ],
        "account_count": len(leaves),
        "root_hex": root.hex(),
    }


def _position_trees() -> list[dict[str, Any]]:
    pledged = ("BENJI", "1000000", "0", "1000000")
    return [
        _tree_vector("empty", "No accounts: the root is SHA-256 of the empty string.", []),
        _tree_vector(
            "one-account",
            "One account with one position.",
            [("acct-0001", [pledged])],
        ),
        _tree_vector(
            "one-account-no-positions",
            "One account with no positions: its count is 0.",
            [("acct-0002", [])],
        ),
        _tree_vector(
            "several-accounts",
            "Five accounts given out of order, with assets out of order and amounts of uneven "
            "lengths; asset ids sort bytewise, so upper case before lower case.",
            [
                (
                    "acct-0010",
                    [
                        ("usdc.e", "7", "0", "7"),
                        ("ETH", "12.5", "2.25", "10"),
                        ("BTC", "0.5", "0", "0.5"),
                        ("USDC", "123456789012345678901234567890.25", "0", "0"),
                    ],
                ),
                ("acct-0003", [("USDC", "500000.25", "0", "400000"), pledged]),
                (
                    "acct-0001",
                    [("BENJI", "0.000000000000000001", "0", "0.000000000000000001")],
                ),
                ("acct-0002", [("USDC", "0", "0", "0")]),
                ("acct-0004", []),
            ],
        ),
        _tree_vector(
            "utf8-order",
            "Non-ASCII ids sort by their UTF-8 bytes (code point order), which differs from "
            "UTF-16 code unit order for characters beyond U+FFFF: acct-z < acct-\u00e9 < "
            "acct-\uff21 < acct-\U0001f600, and asset \uffe5 < \U0001f4b5.",
            [
                ("acct-\U0001f600", [("\U0001f4b5", "2", "1", "1"), ("\uffe5", "3", "0", "3")]),
                ("acct-\uff21", [pledged]),
                ("acct-\u00e9", [("\u20ac", "1.5", "0", "1.5")]),
                ("acct-z", [pledged]),
            ],
        ),
        _tree_vector(
            "long-fields",
            "An account id of 200 bytes, an asset id of 130 bytes and an amount of 79 "
            "characters: the length prefixes are 000000c8, 00000082 and 0000004f.",
            [
                ("acct-" + "x" * 195, [("A" * 130, "9" * 60 + "." + "9" * 18, "0", "1")]),
                ("acct-0001", [pledged]),
                ("acct-0002", [pledged]),
            ],
        ),
    ]


def _invalid_position_trees() -> list[dict[str, Any]]:
    def case(
        vector_id: str,
        clause: str,
        description: str,
        reason: str,
        positions: Sequence[_TreePosition] = (),
        *,
        accounts: Sequence[tuple[str, Sequence[_TreePosition]]] | None = None,
    ) -> dict[str, Any]:
        given = [("acct-0001", positions)] if accounts is None else accounts
        return {
            "id": vector_id,
            "clause": clause,
            "description": description,
            "accounts": _tree_accounts([("acct-0000", [("BENJI", "1", "0", "1")]), *given]),
            "expected": status(reason),
        }

    return [
        case(
            "non-canonical-quantity",
            "§2.1",
            "quantity '1.50' (trailing zero).",
            "INVALID_AMOUNT",
            [("BENJI", "1.50", "0", "1.5")],
        ),
        case(
            "negative-locked-quantity",
            "§2.2",
            "locked_quantity '-1': quantities are non-negative.",
            "INVALID_AMOUNT",
            [("BENJI", "2", "-1", "2")],
        ),
        case(
            "negative-zero",
            "§2.1",
            "pledged_quantity '-0'.",
            "INVALID_AMOUNT",
            [("BENJI", "2", "0", "-0")],
        ),
        case(
            "exponent",
            "§2.1",
            "quantity '1e3'.",
            "INVALID_AMOUNT",
            [("BENJI", "1e3", "0", "0")],
        ),
        case(
            "nineteen-fraction-digits",
            "§2.1",
            "pledged_quantity with 19 fraction digits.",
            "INVALID_AMOUNT",
            [("BENJI", "1", "0", "0.0000000000000000001")],
        ),
        case(
            "empty-amount",
            "§2.1",
            "locked_quantity '' (a present Decimal with an empty value).",
            "INVALID_AMOUNT",
            [("BENJI", "1", "", "1")],
        ),
        case(
            "absent-amount",
            "§2.1",
            "locked_quantity null: the Decimal is absent.",
            "MALFORMED",
            [("BENJI", "1", None, "1")],
        ),
        case(
            "duplicate-asset",
            "§10.3",
            "Two positions in BENJI in one account.",
            "MALFORMED",
            [("BENJI", "1", "0", "1"), ("USDC", "2", "0", "2"), ("BENJI", "3", "0", "3")],
        ),
        case(
            "duplicate-account",
            "§10.3",
            "acct-0001 given twice (with different positions).",
            "MALFORMED",
            accounts=[
                ("acct-0001", [("BENJI", "1", "0", "1")]),
                ("acct-0002", [("BENJI", "1", "0", "1")]),
                ("acct-0001", [("USDC", "1", "0", "1")]),
            ],
        ),
        case(
            "empty-account-id",
            "§10.3",
            "An account id that is the empty string.",
            "MALFORMED",
            accounts=[("", [("BENJI", "1", "0", "1")])],
        ),
        case(
            "empty-asset-id",
            "§10.3",
            "An asset id that is the empty string.",
            "MALFORMED",
            [("", "1", "0", "1")],
        ),
        case(
            "account-id-not-utf8",
            "§10.3",
            "An account id holding a lone surrogate (U+D800), which has no UTF-8 encoding.",
            "MALFORMED",
            accounts=[("acct-\ud800", [("BENJI", "1", "0", "1")])],
        ),
    ]


def position_tree_file() -> dict[str, Any]:
    return {
        "description": (
            "Position trees (docs/PROTOCOL.md section 10.3). Each account's leaf is "
            "'collateral-sync/v1/position-leaf' || 0x00 || LP(account_id) || "
            "u32be(number of positions) || for each position, sorted bytewise by the UTF-8 of "
            "asset_id: LP(asset_id) || LP(quantity) || LP(locked_quantity) || "
            "LP(pledged_quantity), with LP(x) = u32be(byte length of x) || UTF-8 of x; the "
            "root is the RFC 9162 tree head over the leaves, accounts sorted bytewise by the "
            "UTF-8 of account_id. 'trees' give accounts in any order and the leaves in tree "
            "order; every 'invalid' input must be refused with its reason."
        ),
        "leaf_prefix_hex": _POSITION_LEAF_PREFIX.hex(),
        "trees": _position_trees(),
        "invalid": _invalid_position_trees(),
    }
