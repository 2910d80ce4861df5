"""Tests for collateral_sync.reconciliation: position leaves, the position tree,
statements and their comparison, and break location.

Three things check the SDK here: leaf bytes written out by hand from
docs/PROTOCOL.md §10.3, the recursive RFC 9162 reference (rfc9162_reference)
for every root and range hash, and a plain dictionary diff of the two views
for every located break.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import rfc9162_reference as ref
from collateral_sync import reconciliation
from collateral_sync.amounts import parse_amount
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    ProofError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.merkle import empty_root, leaf_hash
from collateral_sync.reconciliation import (
    POSITION_LEAF_PREFIX,
    PositionTree,
    PositionValues,
    build_reconciliation_statement,
    compare_statements,
    cutoff_id_of,
    locate_breaks,
    locate_breaks_sync,
    position_leaf,
    reconcile,
)
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN, LogHead
from collateral_sync.v1 import (
    common_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
)
from pymerkle import InmemoryTree

R = errors_pb2.ErrorReason
QUANTITY = reconciliation_pb2.BREAK_FIELD_QUANTITY
LOCKED = reconciliation_pb2.BREAK_FIELD_LOCKED_QUANTITY
PLEDGED = reconciliation_pb2.BREAK_FIELD_PLEDGED_QUANTITY
MISSING = reconciliation_pb2.BREAK_FIELD_MISSING
SYNC_HEAD = reconciliation_pb2.BREAK_FIELD_SYNC_LOG_HEAD
CUSTODIAN = common_pb2.PARTY_ROLE_CUSTODIAN
EXCHANGE = common_pb2.PARTY_ROLE_EXCHANGE
CUTOFF = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HEADS = {
    CUSTODIAN_TO_EXCHANGE: LogHead(10, b"\x11" * 32),
    EXCHANGE_TO_CUSTODIAN: LogHead(7, b"\x22" * 32),
}

Views = dict[str, list[PositionValues]]
Break = tuple[str, str, int, str | None, str | None]


def lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def view(count: int, *, step: int = 2) -> Views:
    """Accounts with one or two assets; ids leave gaps so extra accounts fit between."""
    return {
        f"acct-{step * k:06d}": [("USDC", f"{k}.5", "0", f"{k}.5")]
        + ([("BTC", "1", "0.25", "1")] if k % 2 else [])
        for k in range(count)
    }


def copy(views: Views) -> Views:
    return {k: list(v) for k, v in views.items()}


def statement(
    tree: PositionTree, role: int = CUSTODIAN
) -> reconciliation_pb2.ReconciliationStatement:
    return build_reconciliation_statement(
        tree, cutoff_time=CUTOFF, party_role=role, sync_log_heads=HEADS
    )


def oracle(custodian: Views, exchange: Views) -> list[Break]:
    """The spec's break table (§10.4) applied to the two full views."""
    found: list[Break] = []
    for account in sorted(custodian.keys() | exchange.keys(), key=str.encode):
        ours = {p[0]: p[1:] for p in custodian.get(account, [])}
        theirs = {p[0]: p[1:] for p in exchange.get(account, [])}
        if account not in exchange:
            found += [(account, a, MISSING, v[0], None) for a, v in sorted(ours.items())] or [
                (account, "", MISSING, "0", None)
            ]
        elif account not in custodian:
            found += [(account, a, MISSING, None, v[0]) for a, v in sorted(theirs.items())] or [
                (account, "", MISSING, None, "0")
            ]
        else:
            for asset in sorted(ours.keys() | theirs.keys(), key=str.encode):
                if asset not in theirs:
                    found.append((account, asset, MISSING, ours[asset][0], None))
                elif asset not in ours:
                    found.append((account, asset, MISSING, None, theirs[asset][0]))
                else:
                    found += [
                        (account, asset, field, m, o)
                        for field, m, o in zip(
                            (QUANTITY, LOCKED, PLEDGED), ours[asset], theirs[asset], strict=True
                        )
                        if m != o
                    ]
    return found


def as_tuples(breaks: tuple[reconciliation_pb2.ReconciliationBreak, ...]) -> list[Break]:
    return [
        (
            b.account_id,
            b.asset_id,
            b.field,
            b.custodian_value.value if b.HasField("custodian_value") else None,
            b.exchange_value.value if b.HasField("exchange_value") else None,
        )
        for b in breaks
    ]


def locate(
    custodian: Views, exchange: Views, **kwargs: Any
) -> tuple[list[Break], reconciliation.BreakLocation]:
    ours, theirs = PositionTree.build(custodian), PositionTree.build(exchange)
    location = locate_breaks_sync(
        statement(ours), statement(theirs, EXCHANGE), ours.answer, theirs.answer, **kwargs
    )
    return as_tuples(location.breaks), location


# --------------------------------------------------------------------- leaf bytes


def test_position_leaf_bytes_match_the_spec_by_hand() -> None:
    leaf = position_leaf(
        "acct-1", [("USDC", "12.5", "0", "12.5"), ("BTC", "1", "0.5", "0.000000000000000001")]
    )
    expected = (
        b"collateral-sync/v1/position-leaf\x00"
        + b"\x00\x00\x00\x06acct-1"
        + b"\x00\x00\x00\x02"
        + b"\x00\x00\x00\x03BTC"
        + b"\x00\x00\x00\x011"
        + b"\x00\x00\x00\x030.5"
        + b"\x00\x00\x00\x140.000000000000000001"
        + b"\x00\x00\x00\x04USDC"
        + b"\x00\x00\x00\x0412.5"
        + b"\x00\x00\x00\x010"
        + b"\x00\x00\x00\x0412.5"
    )
    assert leaf == expected
    assert len(POSITION_LEAF_PREFIX) == 33
    assert POSITION_LEAF_PREFIX[32] == 0


def test_position_leaf_accepts_messages_and_counts_utf8_bytes() -> None:
    account = "client-é"  # 9 characters, 10 UTF-8 bytes
    asset = "T" * 200  # a length that does not fit one byte
    message = common_pb2.Position(
        account_id=account,
        asset_id=asset,
        quantity=common_pb2.Decimal(value="3"),
        locked_quantity=common_pb2.Decimal(value="0"),
        pledged_quantity=common_pb2.Decimal(value="2.75"),
    )
    expected = (
        POSITION_LEAF_PREFIX
        + lp(account.encode())
        + struct.pack(">I", 1)
        + lp(asset.encode())
        + lp(b"3")
        + lp(b"0")
        + lp(b"2.75")
    )
    assert position_leaf(account, [message]) == expected
    assert position_leaf(account, [(asset, "3", "0", "2.75")]) == expected
    # An account without positions has count 0.
    assert position_leaf("a", []) == POSITION_LEAF_PREFIX + lp(b"a") + b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("positions", "reason"),
    [
        ([("BTC", "1", "0", "1"), ("BTC", "2", "0", "2")], R.ERROR_REASON_MALFORMED),
        ([("", "1", "0", "1")], R.ERROR_REASON_MALFORMED),
        ([("BTC", "1.50", "0", "1")], R.ERROR_REASON_INVALID_AMOUNT),
        ([("BTC", "1", "-0", "1")], R.ERROR_REASON_INVALID_AMOUNT),
        ([("BTC", "1", "0", "-1")], R.ERROR_REASON_INVALID_AMOUNT),
        ([("BTC", "1e3", "0", "1")], R.ERROR_REASON_INVALID_AMOUNT),
        ([("BTC", "", "0", "1")], R.ERROR_REASON_INVALID_AMOUNT),
    ],
)
def test_position_leaf_refuses_bad_positions(positions: list[PositionValues], reason: int) -> None:
    with pytest.raises(MalformedError) as caught:
        position_leaf("acct", positions)
    assert caught.value.reason == reason
    assert {"expected", "actual"} <= caught.value.metadata.keys()


def test_position_leaf_refuses_an_absent_amount_and_a_foreign_account() -> None:
    absent = common_pb2.Position(asset_id="BTC", quantity=common_pb2.Decimal(value="1"))
    with pytest.raises(MalformedError) as caught:
        position_leaf("acct", [absent])
    assert caught.value.reason == R.ERROR_REASON_MALFORMED
    assert caught.value.metadata["actual"] == "absent"
    foreign = common_pb2.Position(
        account_id="other",
        asset_id="BTC",
        quantity=common_pb2.Decimal(value="1"),
        locked_quantity=common_pb2.Decimal(value="0"),
        pledged_quantity=common_pb2.Decimal(value="1"),
    )
    with pytest.raises(MalformedError) as caught:
        position_leaf("acct", [foreign])
    assert caught.value.metadata == {"expected": "acct", "actual": "other"}
    with pytest.raises(MalformedError):
        position_leaf("", [])


AMOUNT_TEXTS = [
    "0", "12", "3.5", "0.000000000000000001", "123456789012345678901234567890.25",
    "9" * 60, "-0", "-1", "0.0", "1.50", "1.", "01", "00", ".5", "+1", "1e3", "1E3", " 1",
    "1 ", "1,000", "1_000", "0.0000000000000000001", "9" * 61, "", "NaN", "Infinity", "1\n2",
    "\u0661",  # an Arabic-Indic digit one: Decimal would take it, the grammar does not
]  # fmt: skip


@pytest.mark.parametrize("text", AMOUNT_TEXTS)
def test_tree_build_accepts_exactly_the_canonical_non_negative_amounts(text: str) -> None:
    try:
        canonical = parse_amount(text) >= 0
    except MalformedError:
        canonical = False
    # One account among many, in each amount field: the fast bulk check and
    # the precise fallback must both agree with amounts.parse_amount.
    for field in (1, 2, 3):
        views = view(40)
        position = ["USDC", "1", "0", "2"]
        position[field] = text
        views["acct-000010"] = [tuple(position)]  # type: ignore[list-item]
        if canonical:
            assert PositionTree.build(views).size == 40
        else:
            with pytest.raises(MalformedError) as caught:
                PositionTree.build(views)
            assert caught.value.reason == R.ERROR_REASON_INVALID_AMOUNT
            assert "acct-000010" in caught.value.message


# ------------------------------------------------------------------------- tree


def leaves_of(views: Views) -> list[bytes]:
    return [position_leaf(a, views[a]) for a in sorted(views, key=str.encode)]


@pytest.mark.parametrize("size", [*range(0, 40), 63, 64, 65, 100, 255, 257, 1000])
def test_root_equals_the_rfc9162_reference(size: int) -> None:
    views = view(size)
    tree = PositionTree.build(views)
    assert tree.size == size
    assert tree.root == ref.mth(leaves_of(views))


def test_root_equals_pymerkle() -> None:
    views = view(777)
    pymerkle_tree = InmemoryTree()
    pymerkle_tree.append_entries(leaves_of(views))
    assert PositionTree.build(views).root == pymerkle_tree.get_root()


def test_empty_tree_root_is_hash_of_empty_string() -> None:
    assert PositionTree.build({}).root == empty_root()


def test_node_hash_of_every_range_of_small_trees() -> None:
    for size in (1, 2, 3, 5, 8, 13, 21):
        views = view(size)
        leaves = leaves_of(views)
        tree = PositionTree.build(views)
        for start in range(size):
            for end in range(start + 1, size + 1):
                assert tree.node_hash(start, end) == ref.mth(leaves[start:end]), (start, end)


def test_node_hash_of_arbitrary_ranges_including_wide_unaligned_ones() -> None:
    views = view(3000)
    leaves = leaves_of(views)
    tree = PositionTree.build(views)
    rng = random.Random(11)
    ranges = [(1, 3000), (3, 2051), (1000, 1513), (7, 7 + 1024), (1, 129)]
    ranges += [tuple(sorted(rng.sample(range(3001), 2))) for _ in range(150)]  # type: ignore[misc]
    for start, end in ranges:
        expected = ref.mth(leaves[start:end])
        assert tree.node_hash(start, end) == expected
        # Remembered subtrees give the same answer the second time.
        assert tree.node_hash(start, end) == expected


@pytest.mark.parametrize(("start", "end"), [(-1, 3), (3, 3), (4, 2), (0, 11), (10, 11)])
def test_node_hash_refuses_ranges_outside_the_tree(start: int, end: int) -> None:
    tree = PositionTree.build(view(10))
    with pytest.raises(StateError) as caught:
        tree.node_hash(start, end)
    assert caught.value.reason == R.ERROR_REASON_OUT_OF_RANGE
    assert caught.value.metadata["expected"] == "0 <= start < end <= 10"


def test_build_is_independent_of_input_form_and_order() -> None:
    views = view(300)
    shuffled = list(views.items())
    random.Random(3).shuffle(shuffled)
    messages = {
        account: [
            common_pb2.Position(
                account_id=account,
                asset_id=a,
                quantity=common_pb2.Decimal(value=q),
                locked_quantity=common_pb2.Decimal(value=lk),
                pledged_quantity=common_pb2.Decimal(value=p),
            )
            for a, q, lk, p in reversed(positions)
        ]
        for account, positions in shuffled
    }
    roots = {
        PositionTree.build(views).root,
        PositionTree.build(shuffled).root,
        PositionTree.build(iter(sorted(shuffled))).root,
        PositionTree.build(messages).root,
    }
    assert roots == {ref.mth(leaves_of(views))}


def test_build_refuses_duplicate_accounts_in_order_and_out_of_order() -> None:
    pairs = sorted(view(50).items())
    for duplicated in ([*pairs, pairs[10]], [pairs[10], *pairs]):
        with pytest.raises(MalformedError) as caught:
            PositionTree.build(duplicated)
        assert caught.value.metadata == {
            "expected": "distinct account ids",
            "actual": repr(pairs[10][0]),
        }


def test_leaves_and_accounts_read_back_from_the_tree() -> None:
    views = view(200)
    views["acct-000004"] = []
    tree = PositionTree.build(views)
    for index, account in enumerate(sorted(views)):
        assert tree.account_id(index) == account
        assert tree.leaf(index) == position_leaf(account, views[account])
        message = tree.account_positions(index)
        assert message.account_id == account
        assert position_leaf(message.account_id, message.positions) == tree.leaf(index)
        assert leaf_hash(tree.leaf(index)) == tree.node_hash(index, index + 1)
    with pytest.raises(StateError):
        tree.leaf(200)


def test_totals_are_exact_sums() -> None:
    views = {
        f"a{i:03d}": [("USDC", "0.1", "0", "0.1"), ("BIG", "9" * 60, "0.000000000000000001", "1")]
        for i in range(300)
    }
    views["a999"] = [("ZERO", "0", "0", "0")]
    totals = {t.asset_id: t for t in PositionTree.build(views).totals}
    assert [t.asset_id for t in PositionTree.build(views).totals] == ["BIG", "USDC", "ZERO"]
    assert totals["USDC"].quantity == Decimal("30")  # 0.1 * 300, not 30.000000000000004
    assert totals["USDC"].pledged_quantity == Decimal("30")
    assert totals["BIG"].quantity == int("9" * 60) * 300
    assert totals["BIG"].locked_quantity == Decimal("0.0000000000000003")
    assert totals["BIG"].pledged_quantity == Decimal(300)
    assert totals["ZERO"].quantity == 0
    # 60 nines times 300 needs 63 integer digits: the statement refuses to round it.
    with pytest.raises(MalformedError) as caught:
        statement(PositionTree.build(views))
    assert caught.value.reason == R.ERROR_REASON_INVALID_AMOUNT


def test_answer_serves_ranges_and_accounts_in_request_order() -> None:
    views = view(100)
    tree = PositionTree.build(views)
    request = reconciliation_service_pb2.GetPositionTreeNodesRequest(
        cutoff_id="x",
        ranges=[
            reconciliation_service_pb2.LeafRange(start=5, end=77),
            reconciliation_service_pb2.LeafRange(start=0, end=100),
            reconciliation_service_pb2.LeafRange(start=99, end=100),
        ],
        account_leaf_indexes=[42, 3],
    )
    response = tree.answer(request)
    leaves = leaves_of(views)
    assert [(n.start, n.end, n.hash) for n in response.nodes] == [
        (5, 77, ref.mth(leaves[5:77])),
        (0, 100, tree.root),
        (99, 100, leaf_hash(leaves[99])),
    ]
    assert [a.account_id for a in response.accounts] == [tree.account_id(42), tree.account_id(3)]


def test_answer_refuses_oversized_and_out_of_range_requests() -> None:
    tree = PositionTree.build(view(10))
    too_many = reconciliation_service_pb2.GetPositionTreeNodesRequest(
        ranges=[reconciliation_service_pb2.LeafRange(start=0, end=1)] * 4097
    )
    with pytest.raises(StateError) as caught:
        tree.answer(too_many)
    assert caught.value.reason == R.ERROR_REASON_LIMIT_EXCEEDED
    assert caught.value.metadata["actual"] == "4097"
    too_many_accounts = reconciliation_service_pb2.GetPositionTreeNodesRequest(
        account_leaf_indexes=[0] * 4097
    )
    with pytest.raises(StateError) as caught:
        tree.answer(too_many_accounts)
    assert caught.value.reason == R.ERROR_REASON_LIMIT_EXCEEDED
    for request in (
        reconciliation_service_pb2.GetPositionTreeNodesRequest(
            ranges=[reconciliation_service_pb2.LeafRange(start=3, end=11)]
        ),
        reconciliation_service_pb2.GetPositionTreeNodesRequest(account_leaf_indexes=[10]),
    ):
        with pytest.raises(StateError) as caught:
            tree.answer(request)
        assert caught.value.reason == R.ERROR_REASON_OUT_OF_RANGE


# -------------------------------------------------------------------- statements


def test_statement_fields_and_signing_round_trip() -> None:
    views = view(20)
    tree = PositionTree.build(views)
    built = build_reconciliation_statement(
        tree, cutoff_time=CUTOFF, party_role=EXCHANGE, sync_log_heads=HEADS
    )
    assert built.cutoff_id == "2026-11-23T12:00:00Z"
    assert built.cutoff_time.ToDatetime(tzinfo=UTC) == CUTOFF
    assert built.party_role == EXCHANGE
    assert [(h.direction, h.sequence, h.entry_hash) for h in built.sync_log_heads] == [
        (CUSTODIAN_TO_EXCHANGE, 10, b"\x11" * 32),
        (EXCHANGE_TO_CUSTODIAN, 7, b"\x22" * 32),
    ]
    assert built.account_count == 20
    assert built.positions_root == ref.mth(leaves_of(views))
    assert [(t.asset_id, t.quantity.value, t.locked_quantity.value) for t in built.totals] == [
        ("BTC", "10", "2.5"),
        ("USDC", "200", "0"),  # 0.5 + 1.5 + ... + 19.5
    ]
    key = SigningKey.from_seed(b"\x05" * 32, "exchange-1", EXCHANGE)
    registry = KeyRegistry()
    registry.add(key.party_key(valid_from=CUTOFF - timedelta(days=1)))
    envelope = sign_statement(
        built, key, audience=["regulator-1"], sequence=1, ttl=timedelta(hours=1), issued_at=CUTOFF
    )
    verified = verify_statement(
        envelope,
        registry,
        expected_type=reconciliation_pb2.ReconciliationStatement,
        audience="regulator-1",
        now=CUTOFF,
    )
    assert verified.message.positions_root == tree.root


def test_cutoff_id_is_rfc3339_utc_with_seconds() -> None:
    assert cutoff_id_of(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    plus_two = datetime(2026, 1, 2, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert cutoff_id_of(plus_two) == "2026-01-02T14:00:00Z"
    with pytest.raises(MalformedError):
        cutoff_id_of(datetime(2026, 1, 2))  # naive on purpose
    with pytest.raises(MalformedError):
        cutoff_id_of(datetime(2026, 1, 2, 0, 0, 0, 5, tzinfo=UTC))


@pytest.mark.parametrize(
    "change",
    [
        {"party_role": common_pb2.PARTY_ROLE_REGULATOR},
        {"sync_log_heads": {CUSTODIAN_TO_EXCHANGE: HEADS[CUSTODIAN_TO_EXCHANGE]}},
        {"sync_log_heads": {**HEADS, EXCHANGE_TO_CUSTODIAN: LogHead(1, b"short")}},
        {"sync_log_heads": {**HEADS, EXCHANGE_TO_CUSTODIAN: LogHead(-1, b"\x00" * 32)}},
    ],
)
def test_statement_refuses_bad_inputs(change: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {
        "cutoff_time": CUTOFF,
        "party_role": CUSTODIAN,
        "sync_log_heads": HEADS,
        **change,
    }
    with pytest.raises(MalformedError) as caught:
        build_reconciliation_statement(PositionTree.build(view(3)), **arguments)
    assert {"expected", "actual"} <= caught.value.metadata.keys()


def pair(
    custodian: Views, exchange: Views
) -> tuple[reconciliation_pb2.ReconciliationStatement, reconciliation_pb2.ReconciliationStatement]:
    return statement(PositionTree.build(custodian)), statement(
        PositionTree.build(exchange), EXCHANGE
    )


def test_compare_identical_statements_matches() -> None:
    comparison = compare_statements(*pair(view(30), view(30)))
    assert comparison.matched
    assert comparison.differences == ()
    assert comparison.breaks == ()
    assert not comparison.positions_differ


def test_compare_reports_roots_counts_and_totals() -> None:
    exchange = view(30)
    del exchange["acct-000004"]  # USDC 2.5 only
    comparison = compare_statements(*pair(view(30), exchange))
    assert not comparison.matched
    assert comparison.positions_differ
    fields = [d.field for d in comparison.differences]
    assert fields == [
        "positions_root",
        "account_count",
        "totals[USDC].quantity",
        "totals[USDC].pledged_quantity",
    ]
    assert comparison.differences[1].custodian == "30"
    assert comparison.differences[1].exchange == "29"
    assert comparison.differences[2].custodian == "450"  # 0.5 + 1.5 + ... + 29.5
    assert comparison.differences[2].exchange == "447.5"
    # Account breaks explain those totals: none is a break of its own.
    assert comparison.breaks == ()


def test_compare_reports_sync_heads_and_totals_that_disagree_with_equal_roots() -> None:
    custodian, exchange = pair(view(5), view(5))
    exchange.sync_log_heads[1].sequence = 9
    exchange.totals[0].locked_quantity.value = "7"
    comparison = compare_statements(custodian, exchange)
    assert not comparison.positions_differ
    assert [d.field for d in comparison.differences] == [
        "sync_log_heads[SYNC_DIRECTION_EXCHANGE_TO_CUSTODIAN]",
        "totals[BTC].locked_quantity",
    ]
    assert [
        (b.account_id, b.asset_id, b.field, b.custodian_value.value, b.exchange_value.value)
        for b in comparison.breaks
    ] == [("", "", SYNC_HEAD, "7", "9"), ("", "BTC", LOCKED, "0.5", "7")]
    # An asset total in one statement only: a break per field, the other side unset.
    exchange.totals.add(
        asset_id="ZZZ",
        quantity=common_pb2.Decimal(value="3"),
        locked_quantity=common_pb2.Decimal(value="0"),
        pledged_quantity=common_pb2.Decimal(value="3"),
    )
    extra = compare_statements(custodian, exchange).breaks[2:]
    assert [
        (b.asset_id, b.field, b.HasField("custodian_value"), b.exchange_value.value) for b in extra
    ] == [
        ("ZZZ", QUANTITY, False, "3"),
        ("ZZZ", LOCKED, False, "0"),
        ("ZZZ", PLEDGED, False, "3"),
    ]


def test_compare_refuses_mismatched_cutoffs_roles_and_malformed_fields() -> None:
    custodian, exchange = pair(view(5), view(5))
    other = reconciliation_pb2.ReconciliationStatement()
    other.CopyFrom(exchange)
    other.cutoff_id = "2026-11-24T00:00:00Z"
    with pytest.raises(StateError) as caught:
        compare_statements(custodian, other)
    assert caught.value.reason == R.ERROR_REASON_STATE_CONFLICT
    with pytest.raises(VerificationError) as caught_role:
        compare_statements(exchange, custodian)
    assert caught_role.value.reason == R.ERROR_REASON_KEY_ROLE_MISMATCH
    for mutate in (
        lambda s: setattr(s, "positions_root", b"\x00" * 31),
        lambda s: s.sync_log_heads.add(direction=CUSTODIAN_TO_EXCHANGE, entry_hash=b"\x00" * 32),
        lambda s: s.totals.add(asset_id="AAA"),  # out of order, and no amounts
        lambda s: setattr(s.totals[0].quantity, "value", "1.0"),
    ):
        broken = reconciliation_pb2.ReconciliationStatement()
        broken.CopyFrom(exchange)
        mutate(broken)
        with pytest.raises(MalformedError):
            compare_statements(custodian, broken)


# --------------------------------------------------------------- break location


def test_zero_breaks_asks_nothing() -> None:
    found, location = locate(view(500), view(500))
    assert found == []
    assert location.rounds == 0
    assert location.custodian.calls == location.exchange.calls == 0


@pytest.mark.parametrize(("field", "position"), [(QUANTITY, 1), (LOCKED, 2), (PLEDGED, 3)])
def test_a_break_in_each_position_field(field: int, position: int) -> None:
    custodian = view(1000)
    exchange = copy(custodian)
    changed = list(exchange["acct-000778"][0])
    changed[position] = "123.456"
    exchange["acct-000778"][0] = tuple(changed)  # type: ignore[call-overload]
    found, _ = locate(custodian, exchange)
    original = custodian["acct-000778"][0][position]
    assert found == [("acct-000778", "USDC", field, original, "123.456")]


def test_breaks_at_the_first_and_the_last_leaf() -> None:
    custodian = view(1000)
    exchange = copy(custodian)
    exchange["acct-000000"] = [("USDC", "1", "0", "0.5")]
    exchange["acct-001998"][0] = ("USDC", "999.5", "1", "999.5")
    found, _ = locate(custodian, exchange)
    assert found == [
        ("acct-000000", "USDC", QUANTITY, "0.5", "1"),
        ("acct-001998", "USDC", LOCKED, "0", "1"),
    ]
    assert found == oracle(custodian, exchange)


def test_account_on_one_side_only_either_side() -> None:
    custodian = view(1000)
    exchange = copy(custodian)
    del exchange["acct-000302"]  # two assets, custodian only
    exchange["acct-000900x"] = [("ETH", "4", "0", "4")]  # exchange only
    found, _ = locate(custodian, exchange)
    assert found == [
        ("acct-000302", "BTC", MISSING, "1", None),
        ("acct-000302", "USDC", MISSING, "151.5", None),
        ("acct-000900x", "ETH", MISSING, None, "4"),
    ]


def test_an_extra_account_shifts_later_leaves_and_later_breaks_are_still_found() -> None:
    custodian = view(4000)
    exchange = copy(custodian)
    exchange["acct-000101"] = [("USDC", "1", "0", "1")]  # exchange only, shifts by one
    exchange["acct-005000"][0] = ("USDC", "2500.5", "0", "2500")  # later, shifted
    exchange["acct-007001"] = []  # exchange only, no positions: shifts by two
    del exchange["acct-007500"]  # custodian only: back to one
    exchange["acct-007998"][0] = ("USDC", "1", "0", "3999.5")  # the last leaf
    found, location = locate(custodian, exchange)
    assert found == oracle(custodian, exchange)
    assert ("acct-007001", "", MISSING, None, "0") in found
    assert len(found) == 5
    # Offset ranges, not a dump: a few hundred nodes for 4000 accounts.
    assert location.exchange.ranges < 600


def test_asset_on_one_side_only() -> None:
    custodian = view(300)
    exchange = copy(custodian)
    exchange["acct-000002"] = exchange["acct-000002"][1:]  # drops USDC; BTC stays
    exchange["acct-000010"] = [*exchange["acct-000010"], ("ZZZ", "3", "0", "3")]
    found, _ = locate(custodian, exchange)
    assert found == [
        ("acct-000002", "USDC", MISSING, "1.5", None),
        ("acct-000010", "ZZZ", MISSING, None, "3"),
    ]


def test_located_breaks_equal_a_full_diff_on_random_views() -> None:
    rng = random.Random(2026)
    for _ in range(120):
        size = rng.choice([0, 1, 2, 3, 7, 16, 33, 200, 700])
        custodian = view(size)
        exchange = copy(custodian)
        for _ in range(rng.choice([0, 1, 2, 5, 12])):
            kind = rng.randrange(5)
            accounts = sorted(exchange)
            if kind == 0 and accounts:
                del exchange[rng.choice(accounts)]
            elif kind == 1:
                exchange[f"acct-{rng.randrange(2 * size + 3):06d}"] = [("X", "1", "0", "0")]
            elif kind == 2:
                custodian.setdefault(f"acct-{rng.randrange(2 * size + 3):06d}z", [])
            elif kind == 3 and accounts:
                exchange[rng.choice(accounts)] = [("USDC", "7", "1", "7")]
            elif kind == 4 and accounts:
                exchange[rng.choice(accounts)] = []
        found, _ = locate(custodian, exchange, max_ranges_per_call=rng.choice([1, 5, 4096]))
        assert found == oracle(custodian, exchange)


def test_descent_asks_o_breaks_log_n_nodes() -> None:
    size, breaks = 100_000, 10
    custodian = view(size, step=1)
    exchange = copy(custodian)
    for k in range(breaks):
        account = f"acct-{(2 * k + 1) * size // (2 * breaks):06d}"
        if k % 5 == 3:
            del exchange[account]
        elif k % 5 == 4:
            exchange[account + "x"] = [("USDC", "1", "0", "1")]
        else:
            exchange[account] = [("USDC", "0.5", "0", "0.5")]
    found, location = locate(custodian, exchange)
    assert found == oracle(custodian, exchange)
    depth = math.ceil(math.log2(size))
    for side in (location.custodian, location.exchange):
        # Per break and level: a few ranges (halves, split leaf), plus audit paths.
        assert side.ranges <= 6 * breaks * depth, side
        assert side.accounts <= 4 * breaks
    assert location.rounds <= 2 * depth + 6


def test_requests_respect_the_call_limit() -> None:
    custodian = view(2000)
    exchange = copy(custodian)
    for i in range(0, 4000, 80):
        exchange[f"acct-{i:06d}"] = [("USDC", "0", "0", "0")]
    seen: list[int] = []
    ours, theirs = PositionTree.build(custodian), PositionTree.build(exchange)

    def exchange_nodes(
        request: reconciliation_service_pb2.GetPositionTreeNodesRequest,
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        seen.append(len(request.ranges))
        assert request.cutoff_id == "2026-11-23T12:00:00Z"
        return theirs.answer(request)

    location = locate_breaks_sync(
        statement(ours), statement(theirs, EXCHANGE), ours.answer, exchange_nodes,
        max_ranges_per_call=16,
    )  # fmt: skip
    assert len(location.breaks) == 100  # quantity and pledged of 50 accounts
    assert max(seen) <= 16
    assert location.exchange.calls == len(seen) > location.rounds


def test_async_sources_are_awaited() -> None:
    custodian = view(500)
    exchange = copy(custodian)
    exchange["acct-000200"] = []
    ours, theirs = PositionTree.build(custodian), PositionTree.build(exchange)

    def wrap(tree: PositionTree) -> Callable[..., Any]:
        async def answer(
            request: reconciliation_service_pb2.GetPositionTreeNodesRequest,
        ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
            await asyncio.sleep(0)
            return tree.answer(request)

        return answer

    location = asyncio.run(
        locate_breaks(statement(ours), statement(theirs, EXCHANGE), wrap(ours), wrap(theirs))
    )
    assert as_tuples(location.breaks) == oracle(custodian, exchange)
    with pytest.raises(TypeError):
        locate_breaks_sync(statement(ours), statement(theirs, EXCHANGE), wrap(ours), wrap(theirs))


# ------------------------------------------------------ answers that do not verify


def tampered(
    tree: PositionTree,
    edit: Callable[[reconciliation_service_pb2.GetPositionTreeNodesResponse], None],
) -> Callable[..., reconciliation_service_pb2.GetPositionTreeNodesResponse]:
    def answer(
        request: reconciliation_service_pb2.GetPositionTreeNodesRequest,
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        response = tree.answer(request)
        edit(response)
        return response

    return answer


def run_against(
    edit: Callable[[reconciliation_service_pb2.GetPositionTreeNodesResponse], None],
) -> None:
    custodian = view(300)
    exchange = copy(custodian)
    exchange["acct-000100"] = [("USDC", "1", "0", "1")]
    ours, theirs = PositionTree.build(custodian), PositionTree.build(exchange)
    locate_breaks_sync(
        statement(ours), statement(theirs, EXCHANGE), ours.answer, tampered(theirs, edit)
    )


def flip_first_hash(response: reconciliation_service_pb2.GetPositionTreeNodesResponse) -> None:
    if response.nodes:
        response.nodes[0].hash = bytes(32)


def change_account(response: reconciliation_service_pb2.GetPositionTreeNodesResponse) -> None:
    for account in response.accounts:
        account.positions[0].quantity.value = "42"


def test_a_node_that_does_not_match_its_parent_is_refused() -> None:
    with pytest.raises(ProofError):
        run_against(flip_first_hash)


def test_an_account_that_is_not_in_the_signed_root_is_refused() -> None:
    with pytest.raises(ProofError) as caught:
        run_against(change_account)
    assert "not in its signed positions root" in caught.value.message


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.nodes.pop() if r.nodes else None,
        lambda r: r.accounts.add(account_id="extra") if r.accounts or r.nodes else None,
        lambda r: setattr(r.nodes[0], "end", r.nodes[0].end + 1) if r.nodes else None,
        lambda r: setattr(r.nodes[0], "hash", b"\x00" * 31) if r.nodes else None,
    ],
)
def test_malformed_answers_are_refused(
    edit: Callable[[reconciliation_service_pb2.GetPositionTreeNodesResponse], None],
) -> None:
    with pytest.raises(MalformedError):
        run_against(edit)


def test_locate_refuses_statements_of_different_cutoffs() -> None:
    ours = PositionTree.build(view(3))
    exchange = statement(ours, EXCHANGE)
    exchange.cutoff_id = "other"
    with pytest.raises(CollateralSyncError):
        locate_breaks_sync(statement(ours), exchange, ours.answer, ours.answer)


# -------------------------------------------------------------------- reconcile


def test_reconcile_merges_statement_and_account_breaks_in_spec_order() -> None:
    custodian = view(400)
    exchange = copy(custodian)
    exchange["acct-000500"][0] = ("USDC", "250.5", "0", "1")
    ours, theirs = PositionTree.build(custodian), PositionTree.build(exchange)
    ours_statement, theirs_statement = statement(ours), statement(theirs, EXCHANGE)
    theirs_statement.sync_log_heads[0].sequence = 11
    result = asyncio.run(reconcile(ours_statement, theirs_statement, ours.answer, theirs.answer))
    assert as_tuples(result.breaks) == [
        ("", "", SYNC_HEAD, "10", "11"),
        ("acct-000500", "USDC", PLEDGED, "250.5", "1"),
    ]
    assert result.outcome == reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS
    signed = result.to_result(
        envelope_pb2.Envelope(payload=b"c"), envelope_pb2.Envelope(payload=b"e")
    )
    assert signed.cutoff_id == "2026-11-23T12:00:00Z"
    assert signed.outcome == reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS
    assert len(signed.breaks) == 2
    assert signed.custodian_statement.payload == b"c"


def test_reconcile_matched_never_calls_the_parties() -> None:
    tree = PositionTree.build(view(50))

    def never(request: object) -> Any:
        raise AssertionError("no descent when the statements agree")

    result = asyncio.run(reconcile(statement(tree), statement(tree, EXCHANGE), never, never))
    assert result.outcome == reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED
    assert result.location is None
    assert result.breaks == ()


def test_public_names() -> None:
    assert sorted(reconciliation.__all__) == sorted(
        [
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
    )
    for name in reconciliation.__all__:
        assert getattr(reconciliation, name) is not None
