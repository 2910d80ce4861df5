"""Breaks located inside the position trees (docs/PROTOCOL.md §10.3, §10.4): the regulator's descent.

When two statements' positions roots differ, the regulator finds the accounts
that differ by asking both parties for nodes of their position trees
(``GetPositionTreeNodes``), at the addresses in its own configuration. With
``--listen`` and ``--listen-exchange`` the kit serves both parties'
``ReconciliationService`` there (:class:`~collateral_sync_conformance._counterpart.KitReconciliationParty`),
states two views of the same accounts that differ in a few places, and checks
that the published result names exactly those breaks, in the order §10.4
prescribes — and, as a SHOULD, that the regulator found them by descending
rather than by reading every account.

The expected breaks are derived here from the two views with the table of
§10.4, not by the SDK's own descent: the kit judges the regulator's answer
against the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from collateral_sync.reconciliation import PositionTree, build_reconciliation_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN, ZERO_HASH, LogHead
from collateral_sync.v1 import common_pb2, envelope_pb2, reconciliation_pb2

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import check, check_equal
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases.regulator import (
    _complete,
    _cutoff,
    _expect_no_result,
    _submit,
)

__all__: list[str] = []

_REGULATOR = [Role.REGULATOR]
_FIELD = reconciliation_pb2.BreakField
_OUTCOME = reconciliation_pb2.ReconciliationOutcome
_CUSTODIAN_ROLE = common_pb2.PARTY_ROLE_CUSTODIAN
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE

#: account id -> asset id -> (quantity, locked, pledged)
View = dict[str, dict[str, tuple[str, str, str]]]
#: (account, asset, field name, custodian value or None, exchange value or None)
Break = tuple[str, str, str, str | None, str | None]


def _view(accounts: int) -> View:
    """A deterministic view: every account holds USDC, every third BTC too."""
    view: View = {}
    for i in range(accounts):
        usdc = str(1000 + i)
        holdings = {"USDC": (usdc, "0", usdc)}
        if i % 3 == 0:
            holdings["BTC"] = ("0.5", "0", "0.5")
        view[f"acct-{i:05d}"] = holdings
    return view


def _differing(accounts: int) -> tuple[View, View]:
    """The custodian's and the exchange's view, apart in five kinds of places (§10.4 table)."""
    custodian, exchange = _view(accounts), _view(accounts)
    # A field differs: the pledged USDC of one account, the locked USDC of another.
    exchange["acct-00037"]["USDC"] = ("1037", "0", "1000")
    exchange[f"acct-{accounts - 1:05d}"]["USDC"] = (
        str(1000 + accounts - 1),
        "5",
        str(1000 + accounts - 1),
    )
    # An account on the custodian's side only, and one on the exchange's only.
    del exchange["acct-00100"]
    exchange["acct-00250a"] = {"BTC": ("2", "0", "2")}
    # An asset on one side only.
    exchange["acct-00400"]["BTC"] = ("1", "0", "1")
    return custodian, exchange


def _expected_breaks(custodian: View, exchange: View) -> list[Break]:
    """The §10.4 table applied to two views; ordered by account, asset, field number."""
    found: list[tuple[str, str, int, str | None, str | None]] = []
    for account in sorted(custodian.keys() | exchange.keys(), key=str.encode):
        ours, theirs = custodian.get(account), exchange.get(account)
        if ours is None or theirs is None:
            present, side_is_custodian = (ours, True) if ours is not None else (theirs, False)
            assert present is not None
            for asset, (quantity, _, _) in present.items():
                values = (quantity, None) if side_is_custodian else (None, quantity)
                found.append((account, asset, _FIELD.BREAK_FIELD_MISSING, *values))
            continue
        for asset in ours.keys() | theirs.keys():
            a, b = ours.get(asset), theirs.get(asset)
            if a is None or b is None:
                found.append(
                    (
                        account,
                        asset,
                        _FIELD.BREAK_FIELD_MISSING,
                        None if a is None else a[0],
                        None if b is None else b[0],
                    )
                )
                continue
            for field, x, y in zip(
                (
                    _FIELD.BREAK_FIELD_QUANTITY,
                    _FIELD.BREAK_FIELD_LOCKED_QUANTITY,
                    _FIELD.BREAK_FIELD_PLEDGED_QUANTITY,
                ),
                a,
                b,
                strict=True,
            ):
                if x != y:
                    found.append((account, asset, field, x, y))
    found.sort(key=lambda b: (b[0].encode(), b[1].encode(), b[2]))
    return [(acc, asset, _FIELD.Name(f), x, y) for acc, asset, f, x, y in found]  # type: ignore[arg-type]


def _tree(view: Mapping[str, Mapping[str, tuple[str, str, str]]]) -> PositionTree:
    return PositionTree.build(
        (account, [(asset, *values) for asset, values in holdings.items()])
        for account, holdings in view.items()
    )


async def _state(
    ctx: CaseContext, role: int, cutoff: datetime, tree: PositionTree
) -> envelope_pb2.Envelope:
    """A party's signed statement of ``tree``, served with the tree at the kit's address."""
    statement = build_reconciliation_statement(
        tree,
        cutoff_time=cutoff,
        party_role=role,
        sync_log_heads={
            CUSTODIAN_TO_EXCHANGE: LogHead(0, ZERO_HASH),
            EXCHANGE_TO_CUSTODIAN: LogHead(0, ZERO_HASH),
        },
    )
    envelope = await ctx.sign(statement, ctx.key(role))
    ctx.reconciliation_party(role).publish(statement.cutoff_id, tree, envelope)
    return envelope


async def _reconciled(
    ctx: CaseContext, custodian_view: View, exchange_view: View
) -> tuple[reconciliation_pb2.ReconciliationResult, str]:
    ctx.reconciliation_party(_CUSTODIAN_ROLE)  # skip before signing anything
    ctx.reconciliation_party(_EXCHANGE_ROLE)
    cutoff = await _cutoff(ctx)
    custodian = await _state(ctx, _CUSTODIAN_ROLE, cutoff, _tree(custodian_view))
    exchange = await _state(ctx, _EXCHANGE_ROLE, cutoff, _tree(exchange_view))
    _expect_no_result(await _submit(ctx, custodian), "the custodian's statement")
    result = await _complete(ctx, cutoff, custodian, exchange)
    return result, result.cutoff_id


def _breaks_of(result: reconciliation_pb2.ReconciliationResult) -> list[Break]:
    return [
        (
            b.account_id,
            b.asset_id,
            _FIELD.Name(b.field),
            b.custodian_value.value if b.HasField("custodian_value") else None,
            b.exchange_value.value if b.HasField("exchange_value") else None,
        )
        for b in result.breaks
    ]


@REGISTRY.case(
    "regulator/breaks-located-in-trees",
    Level.MUST,
    "two views of 512 accounts whose roots differ give BREAKS naming exactly the differing "
    "accounts, assets and fields, in order, found in the parties' position trees (§10.4)",
    roles=_REGULATOR,
)
async def breaks_located_in_trees(ctx: CaseContext) -> None:
    custodian, exchange = _differing(512)
    result, _ = await _reconciled(ctx, custodian, exchange)
    check_equal(
        "outcome",
        _OUTCOME.Name(_OUTCOME.RECONCILIATION_OUTCOME_BREAKS),
        _OUTCOME.Name(result.outcome),
    )
    check_equal(
        "breaks (account, asset, field, custodian value, exchange value; None = unset)",
        _expected_breaks(custodian, exchange),
        _breaks_of(result),
    )


@REGISTRY.case(
    "regulator/matched-trees-not-descended",
    Level.MUST,
    "two equal non-empty views give MATCHED with no breaks (§10.4 step 2)",
    roles=_REGULATOR,
)
async def matched_trees(ctx: CaseContext) -> None:
    view = _view(64)
    result, _ = await _reconciled(ctx, view, _view(64))
    check_equal(
        "outcome",
        _OUTCOME.Name(_OUTCOME.RECONCILIATION_OUTCOME_MATCHED),
        _OUTCOME.Name(result.outcome),
    )
    check_equal("breaks", [], _breaks_of(result))


@REGISTRY.case(
    "regulator/descent-reads-few-accounts",
    Level.SHOULD,
    "locating one break among 8192 accounts asks the parties for far fewer nodes and accounts "
    "than a full read (§10.4: breaks x height, never n)",
    roles=_REGULATOR,
)
async def descent_reads_few_accounts(ctx: CaseContext) -> None:
    accounts = 8192
    custodian, exchange = _view(accounts), _view(accounts)
    exchange["acct-04321"]["USDC"] = ("5321", "0", "5000")
    result, cutoff_id = await _reconciled(ctx, custodian, exchange)
    check_equal("breaks", _expected_breaks(custodian, exchange), _breaks_of(result))
    asked = [
        sum(ctx.reconciliation_party(role).asked[cutoff_id])
        for role in (_CUSTODIAN_ROLE, _EXCHANGE_ROLE)
    ]
    limit = accounts // 16
    check(
        all(count <= limit for count in asked),
        "the regulator read a large part of the trees to find one break",
        expected=f"at most {limit} ranges and accounts asked of each party (of {accounts})",
        got=f"custodian {asked[0]}, exchange {asked[1]}",
    )
