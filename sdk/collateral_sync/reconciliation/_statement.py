"""Reconciliation statements: building them from a position tree, comparing two of them."""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from google.protobuf import timestamp_pb2

from collateral_sync.amounts import amount_from_proto, format_amount
from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.merkle import HASH_SIZE
from collateral_sync.reconciliation._locate import (
    BreakLocation,
    NodesSource,
    _break_order,
    locate_breaks,
)
from collateral_sync.reconciliation._tree import (
    MAX_RANGES_PER_CALL,
    PositionTree,
)
from collateral_sync.sync import LogHead
from collateral_sync.v1 import (
    common_pb2,
    envelope_pb2,
    errors_pb2,
    position_sync_pb2,
    reconciliation_pb2,
)

__all__ = [
    "Reconciliation",
    "StatementComparison",
    "StatementDifference",
    "build_reconciliation_statement",
    "compare_statements",
    "cutoff_id_of",
    "reconcile",
]

_R = errors_pb2.ErrorReason
_CUSTODIAN = common_pb2.PARTY_ROLE_CUSTODIAN
_EXCHANGE = common_pb2.PARTY_ROLE_EXCHANGE
_DIRECTIONS = (
    position_sync_pb2.SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE,
    position_sync_pb2.SYNC_DIRECTION_EXCHANGE_TO_CUSTODIAN,
)
_TOTAL_FIELDS: tuple[
    tuple[
        Literal["quantity", "locked_quantity", "pledged_quantity"],
        reconciliation_pb2.BreakField.ValueType,
    ],
    ...,
] = (
    ("quantity", reconciliation_pb2.BREAK_FIELD_QUANTITY),
    ("locked_quantity", reconciliation_pb2.BREAK_FIELD_LOCKED_QUANTITY),
    ("pledged_quantity", reconciliation_pb2.BREAK_FIELD_PLEDGED_QUANTITY),
)


def _malformed(what: str, expected: object, actual: object) -> MalformedError:
    return MalformedError(
        f"{what}: expected {expected}, got {actual}",
        metadata={"expected": str(expected), "actual": str(actual)},
    )


def _role_name(role: int) -> str:
    if role in common_pb2.PartyRole.values():
        return common_pb2.PartyRole.Name(role)  # type: ignore[arg-type]
    return str(role)


def _direction_name(direction: int) -> str:
    if direction in position_sync_pb2.SyncDirection.values():
        return position_sync_pb2.SyncDirection.Name(direction)  # type: ignore[arg-type]
    return str(direction)


# -------------------------------------------------------------------- statements


def cutoff_id_of(cutoff_time: datetime) -> str:
    """The cut-off id of §10.1: RFC 3339 UTC with seconds and ``Z``."""
    if cutoff_time.tzinfo is None or cutoff_time.utcoffset() is None:
        raise _malformed("cutoff_time", "a timezone-aware datetime", cutoff_time.isoformat())
    if cutoff_time.microsecond:
        raise _malformed("cutoff_time", "whole seconds", cutoff_time.isoformat())
    return cutoff_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_reconciliation_statement(
    tree: PositionTree,
    *,
    cutoff_time: datetime,
    party_role: int,
    sync_log_heads: Mapping[int, LogHead],
) -> reconciliation_pb2.ReconciliationStatement:
    """A party's ReconciliationStatement at ``cutoff_time``, ready for sign_statement.

    ``sync_log_heads`` maps each SyncDirection (both of them) to the head of
    that direction at the cut-off. Account count, positions root and totals
    come from ``tree``. The header is left for the signer to fill.
    """
    cutoff_id = cutoff_id_of(cutoff_time)
    if party_role not in (_CUSTODIAN, _EXCHANGE):
        raise _malformed(
            "party_role",
            "PARTY_ROLE_CUSTODIAN or PARTY_ROLE_EXCHANGE",
            _role_name(party_role),
        )
    if sorted(sync_log_heads) != sorted(_DIRECTIONS):
        raise _malformed(
            "sync_log_heads directions",
            [_direction_name(d) for d in _DIRECTIONS],
            [_direction_name(d) for d in sorted(sync_log_heads)],
        )
    heads = []
    for direction in _DIRECTIONS:
        head = sync_log_heads[direction]
        if head.sequence < 0 or len(head.entry_hash) != HASH_SIZE:
            raise _malformed(
                f"sync log head {_direction_name(direction)}",
                f"sequence >= 0 and a {HASH_SIZE}-byte entry hash",
                f"sequence {head.sequence}, {len(head.entry_hash)} bytes",
            )
        heads.append(
            reconciliation_pb2.SyncLogHead(
                direction=direction, sequence=head.sequence, entry_hash=head.entry_hash
            )
        )
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(cutoff_time.astimezone(UTC))
    return reconciliation_pb2.ReconciliationStatement(
        cutoff_id=cutoff_id,
        cutoff_time=timestamp,
        party_role=party_role,  # type: ignore[arg-type]
        sync_log_heads=heads,
        account_count=tree.size,
        positions_root=tree.root,
        totals=[total.to_proto() for total in tree.totals],
    )


# -------------------------------------------------------------------- comparison


@dataclass(frozen=True, slots=True)
class StatementDifference:
    """One top-level field on which the two statements disagree.

    ``field`` is a path such as ``positions_root``,
    ``sync_log_heads[SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE]`` or
    ``totals[USDC].locked_quantity``; values are as text, empty when absent.
    """

    field: str
    custodian: str
    exchange: str


@dataclass(frozen=True, slots=True)
class StatementComparison:
    """What comparing the two statements alone shows.

    ``breaks`` holds the breaks the statements prove by themselves (sync log
    heads; totals when the positions roots agree). ``positions_differ`` says
    whether the trees must be descended to find the account breaks.
    """

    cutoff_id: str
    differences: tuple[StatementDifference, ...]
    breaks: tuple[reconciliation_pb2.ReconciliationBreak, ...]
    positions_differ: bool

    @property
    def matched(self) -> bool:
        return not self.differences


def _heads_of(
    statement: reconciliation_pb2.ReconciliationStatement, name: str
) -> dict[int, reconciliation_pb2.SyncLogHead]:
    heads: dict[int, reconciliation_pb2.SyncLogHead] = {}
    for head in statement.sync_log_heads:
        if head.direction not in _DIRECTIONS or head.direction in heads:
            raise _malformed(
                f"{name} sync_log_heads",
                "each direction at most once",
                _direction_name(head.direction),
            )
        if len(head.entry_hash) != HASH_SIZE:
            raise _malformed(
                f"{name} sync log head entry_hash length", HASH_SIZE, len(head.entry_hash)
            )
        heads[head.direction] = head
    return heads


def _totals_of(
    statement: reconciliation_pb2.ReconciliationStatement, name: str
) -> dict[str, tuple[decimal.Decimal, ...]]:
    totals: dict[str, tuple[decimal.Decimal, ...]] = {}
    previous = b""
    for total in statement.totals:
        key = total.asset_id.encode("utf-8")
        if not total.asset_id or (totals and key <= previous):
            raise _malformed(
                f"{name} totals", "non-empty asset ids in increasing bytewise order", total.asset_id
            )
        previous = key
        values = []
        for field, _ in _TOTAL_FIELDS:
            if not total.HasField(field):
                raise _malformed(f"{name} totals[{total.asset_id}].{field}", "a Decimal", "absent")
            values.append(
                amount_from_proto(getattr(total, field), field=f"totals[{total.asset_id}].{field}")
            )
        totals[total.asset_id] = tuple(values)
    return totals


def _check_statement(
    statement: reconciliation_pb2.ReconciliationStatement, name: str, role: int
) -> None:
    if statement.party_role != role:
        raise VerificationError(
            f"{name} statement party_role: expected {_role_name(role)}, "
            f"got {_role_name(statement.party_role)}",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": _role_name(role), "actual": _role_name(statement.party_role)},
        )
    if len(statement.positions_root) != HASH_SIZE:
        raise _malformed(f"{name} positions_root length", HASH_SIZE, len(statement.positions_root))


def _break(
    asset_id: str,
    field: reconciliation_pb2.BreakField.ValueType,
    custodian: str | None,
    exchange: str | None,
) -> reconciliation_pb2.ReconciliationBreak:
    found = reconciliation_pb2.ReconciliationBreak(asset_id=asset_id, field=field)
    if custodian is not None:
        found.custodian_value.value = custodian
    if exchange is not None:
        found.exchange_value.value = exchange
    return found


def compare_statements(
    custodian: reconciliation_pb2.ReconciliationStatement,
    exchange: reconciliation_pb2.ReconciliationStatement,
) -> StatementComparison:
    """Compare two (already verified) statements of one cut-off field by field.

    Refuses statements of different cut-offs (STATE_CONFLICT), a statement in
    the wrong role's slot (KEY_ROLE_MISMATCH) and malformed heads, roots or
    totals (MALFORMED, INVALID_AMOUNT) before comparing anything.
    """
    _check_statement(custodian, "custodian", _CUSTODIAN)
    _check_statement(exchange, "exchange", _EXCHANGE)
    if custodian.cutoff_id != exchange.cutoff_id or custodian.cutoff_time != exchange.cutoff_time:
        raise StateError(
            f"statements of different cut-offs: expected {custodian.cutoff_id!r}, "
            f"got {exchange.cutoff_id!r}",
            reason=_R.ERROR_REASON_STATE_CONFLICT,
            metadata={"expected": custodian.cutoff_id, "actual": exchange.cutoff_id},
        )
    heads = _heads_of(custodian, "custodian"), _heads_of(exchange, "exchange")
    totals = _totals_of(custodian, "custodian"), _totals_of(exchange, "exchange")

    differences: list[StatementDifference] = []
    breaks: list[reconciliation_pb2.ReconciliationBreak] = []
    root_differs = custodian.positions_root != exchange.positions_root
    count_differs = custodian.account_count != exchange.account_count
    if root_differs:
        differences.append(
            StatementDifference(
                "positions_root", custodian.positions_root.hex(), exchange.positions_root.hex()
            )
        )
    if count_differs:
        differences.append(
            StatementDifference(
                "account_count", str(custodian.account_count), str(exchange.account_count)
            )
        )
    for direction in _DIRECTIONS:
        ours, theirs = heads[0].get(direction), heads[1].get(direction)
        pair = [None if h is None else (h.sequence, h.entry_hash) for h in (ours, theirs)]
        if pair[0] != pair[1]:
            texts = ["" if p is None else f"{p[0]}:{p[1].hex()}" for p in pair]
            differences.append(
                StatementDifference(
                    f"sync_log_heads[{_direction_name(direction)}]", texts[0], texts[1]
                )
            )
            found = reconciliation_pb2.ReconciliationBreak(
                field=reconciliation_pb2.BREAK_FIELD_SYNC_LOG_HEAD
            )
            if ours is not None:
                found.custodian_value.value = str(ours.sequence)
            if theirs is not None:
                found.exchange_value.value = str(theirs.sequence)
            breaks.append(found)
    positions_differ = root_differs or count_differs
    for asset_id in sorted(totals[0].keys() | totals[1].keys(), key=str.encode):
        ours_total, theirs_total = totals[0].get(asset_id), totals[1].get(asset_id)
        for position, (field, number) in enumerate(_TOTAL_FIELDS):
            mine = None if ours_total is None else ours_total[position]
            other = None if theirs_total is None else theirs_total[position]
            if mine == other:
                continue
            texts = ["" if v is None else format_amount(v) for v in (mine, other)]
            differences.append(StatementDifference(f"totals[{asset_id}].{field}", *texts))
            # With equal roots, totals that differ are a break of their own;
            # otherwise the account breaks explain them.
            if not positions_differ:
                breaks.append(
                    _break(
                        asset_id,
                        number,
                        None if mine is None else texts[0],
                        None if other is None else texts[1],
                    )
                )
    return StatementComparison(
        cutoff_id=custodian.cutoff_id,
        differences=tuple(differences),
        breaks=tuple(breaks),
        positions_differ=positions_differ,
    )


# ----------------------------------------------------------------- reconciliation


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """The regulator's findings for one cut-off: every break, in the spec's order."""

    comparison: StatementComparison
    #: None when the positions roots and counts agree (nothing to descend).
    location: BreakLocation | None
    breaks: tuple[reconciliation_pb2.ReconciliationBreak, ...]

    @property
    def outcome(self) -> int:
        """RECONCILIATION_OUTCOME_MATCHED iff there is no break."""
        if self.breaks:
            return reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS
        return reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED

    def to_result(
        self,
        custodian_statement: envelope_pb2.Envelope,
        exchange_statement: envelope_pb2.Envelope,
    ) -> reconciliation_pb2.ReconciliationResult:
        """The ReconciliationResult to sign, carrying both statements as received."""
        return reconciliation_pb2.ReconciliationResult(
            cutoff_id=self.comparison.cutoff_id,
            outcome=self.outcome,  # type: ignore[arg-type]
            breaks=self.breaks,
            custodian_statement=custodian_statement,
            exchange_statement=exchange_statement,
        )


async def reconcile(
    custodian: reconciliation_pb2.ReconciliationStatement,
    exchange: reconciliation_pb2.ReconciliationStatement,
    custodian_nodes: NodesSource,
    exchange_nodes: NodesSource,
    *,
    max_ranges_per_call: int = MAX_RANGES_PER_CALL,
) -> Reconciliation:
    """Compare two verified statements and, if their positions differ, locate the breaks.

    The sources are each party's GetPositionTreeNodes (see :func:`locate_breaks`);
    they are not called when the positions roots and counts agree.
    """
    comparison = compare_statements(custodian, exchange)
    location = None
    breaks = list(comparison.breaks)
    if comparison.positions_differ:
        location = await locate_breaks(
            custodian,
            exchange,
            custodian_nodes,
            exchange_nodes,
            max_ranges_per_call=max_ranges_per_call,
        )
        breaks.extend(location.breaks)
    # Stable: two sync-log-head breaks keep their direction order.
    breaks.sort(key=_break_order)
    return Reconciliation(comparison=comparison, location=location, breaks=tuple(breaks))
