"""Reconciliation: position trees, signed statements, comparison and break location.

At each cut-off the custodian and the exchange each state what they hold
(docs/PROTOCOL.md §10): the heads of both sync-log directions, an RFC 9162
root over one leaf per account, and per-asset totals. A party builds a
:class:`PositionTree` from its positions, turns it into a statement with
:func:`build_reconciliation_statement` (then signs it with
:func:`~collateral_sync.signing.sign_statement`), and serves
``GetPositionTreeNodes`` with :meth:`PositionTree.answer`::

    tree = PositionTree.build(positions_by_account)
    statement = build_reconciliation_statement(
        tree, cutoff_time=cutoff, party_role=PARTY_ROLE_CUSTODIAN, sync_log_heads=heads)
    envelope = sign_statement(statement, key, audience=["regulator-1"], ...)

The regulator compares the two verified statements and, when the positions
differ, locates the breaks account by account by descending both trees
through each party's ``GetPositionTreeNodes`` — O(breaks * log n) nodes,
never a full dump::

    reconciliation = await reconcile(custodian_statement, exchange_statement,
                                     custodian_client.get_position_tree_nodes,
                                     exchange_client.get_position_tree_nodes)
    result = reconciliation.to_result(custodian_envelope, exchange_envelope)

Everything here is pure computation over bytes and messages; amounts are
exact decimals throughout.
"""

from __future__ import annotations

from collateral_sync.reconciliation._locate import (
    BreakLocation,
    NodesSource,
    SideCounts,
    locate_breaks,
    locate_breaks_sync,
)
from collateral_sync.reconciliation._statement import (
    Reconciliation,
    StatementComparison,
    StatementDifference,
    build_reconciliation_statement,
    compare_statements,
    cutoff_id_of,
    reconcile,
)
from collateral_sync.reconciliation._tree import (
    MAX_ACCOUNTS_PER_CALL,
    MAX_RANGES_PER_CALL,
    POSITION_LEAF_PREFIX,
    AssetTotal,
    PositionTree,
    PositionValues,
    position_leaf,
)

__all__ = [
    "MAX_ACCOUNTS_PER_CALL",
    "MAX_RANGES_PER_CALL",
    "POSITION_LEAF_PREFIX",
    "AssetTotal",
    "BreakLocation",
    "NodesSource",
    "PositionTree",
    "PositionValues",
    "Reconciliation",
    "SideCounts",
    "StatementComparison",
    "StatementDifference",
    "build_reconciliation_statement",
    "compare_statements",
    "cutoff_id_of",
    "locate_breaks",
    "locate_breaks_sync",
    "position_leaf",
    "reconcile",
]
