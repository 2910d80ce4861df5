"""Locating reconciliation breaks by descending two position trees (docs/PROTOCOL.md §10.4).

The regulator reaches each party only through ``GetPositionTreeNodes``:
hashes of leaf ranges, and the positions of single leaves. The descent works
on *segments*: a leaf range ``[a, b)`` of the custodian's tree (always a node
of that tree, so it is cheap to answer and chained to the signed root) and
the leaf range ``[c, e)`` of the exchange's tree that holds the same slice of
the account-id space. When no account is missing, ``c = a`` and ``e = b``;
after an account present on one side only, the exchange's range is offset
(``c = a + d``), exactly the spec's offset ranges.

A segment whose two hashes are equal is done. Otherwise the custodian's range
is split at the RFC 9162 split ``s`` and the regulator decides where the same
account-id boundary falls on the exchange's side, from hashes it asks for in
the same round: the left halves equal (the boundary is right after them),
the right halves equal (right before them), or the leaf at ``s`` equal on
both sides. Only when all three differ does it read accounts to search for
the boundary by account id. Segments of at most one account a side are read
and compared field by field. Every account read is verified against its
side's signed root with an audit path fetched in the same call, and every
custodian node hash against its parent; so breaks stand on signed data.

All segments advance together: each round sends every party at most one
batch (split into calls of 4096 ranges and 4096 accounts), so the number of
rounds grows with the tree height, not with the number of breaks.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from hmac import compare_digest
from typing import TypeAlias

from collateral_sync.errors import MalformedError, ProofError
from collateral_sync.merkle import HASH_SIZE, empty_root, leaf_hash, node_hash, verify_inclusion
from collateral_sync.reconciliation._tree import (
    MAX_ACCOUNTS_PER_CALL,
    MAX_RANGES_PER_CALL,
    position_leaf,
)
from collateral_sync.v1 import (
    common_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
)

__all__ = [
    "BreakLocation",
    "NodesSource",
    "SideCounts",
    "locate_breaks",
    "locate_breaks_sync",
]

_Request = reconciliation_service_pb2.GetPositionTreeNodesRequest
_Response = reconciliation_service_pb2.GetPositionTreeNodesResponse

#: How the regulator reaches one party: a function taking a
#: GetPositionTreeNodesRequest and returning its response, or an awaitable of
#: it (e.g. ``ReconciliationClient.get_position_tree_nodes``, or
#: ``PositionTree.answer`` for a tree in the same process).
NodesSource: TypeAlias = Callable[[_Request], "_Response | Awaitable[_Response]"]

_Range = tuple[int, int]
# asset id -> (quantity, locked_quantity, pledged_quantity) as canonical text.
_Positions = dict[str, tuple[str, str, str]]
_Task = Generator[None, None, "list[_Task]"]

_QUANTITY = reconciliation_pb2.BREAK_FIELD_QUANTITY
_MISSING = reconciliation_pb2.BREAK_FIELD_MISSING
_FIELD_NUMBERS = (
    reconciliation_pb2.BREAK_FIELD_QUANTITY,
    reconciliation_pb2.BREAK_FIELD_LOCKED_QUANTITY,
    reconciliation_pb2.BREAK_FIELD_PLEDGED_QUANTITY,
)


@dataclass(frozen=True, slots=True)
class SideCounts:
    """What the regulator asked one party for."""

    calls: int
    ranges: int
    accounts: int


@dataclass(frozen=True, slots=True)
class BreakLocation:
    """The located account breaks, in the spec's order, and what it took."""

    breaks: tuple[reconciliation_pb2.ReconciliationBreak, ...]
    rounds: int
    custodian: SideCounts
    exchange: SideCounts


@dataclass(frozen=True, slots=True)
class _Account:
    account_id: str
    positions: _Positions


def _split(width: int) -> int:
    return 1 << ((width - 1).bit_length() - 1)


def _audit_ranges(index: int, size: int) -> list[_Range]:
    """Leaf ranges of the RFC 9162 audit path of ``index``, bottom-up."""
    ranges: list[_Range] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def _error(what: str, expected: object, actual: object) -> ProofError:
    return ProofError(
        f"{what}: expected {expected}, got {actual}",
        metadata={"expected": str(expected), "actual": str(actual)},
    )


def _malformed(what: str, expected: object, actual: object) -> MalformedError:
    return MalformedError(
        f"{what}: expected {expected}, got {actual}",
        metadata={"expected": str(expected), "actual": str(actual)},
    )


class _Side:
    """One party's tree as the regulator knows it: a cache of answers."""

    def __init__(self, name: str, cutoff_id: str, size: int, root: bytes, max_ranges: int) -> None:
        self.name = name
        self.cutoff_id = cutoff_id
        self.size = size
        self.root = root
        self.max_ranges = max_ranges
        self.hashes: dict[_Range, bytes] = {(0, size): root} if size else {}
        self.accounts: dict[int, _Account] = {}
        self._wanted_ranges: set[_Range] = set()
        self._wanted_accounts: set[int] = set()
        self._received: dict[int, reconciliation_pb2.AccountPositions] = {}
        self.calls = 0
        self.ranges_asked = 0
        self.accounts_asked = 0

    def counts(self) -> SideCounts:
        return SideCounts(self.calls, self.ranges_asked, self.accounts_asked)

    def want(self, ranges: Iterable[_Range], indexes: Iterable[int]) -> bool:
        """Register what is not known yet; True if anything was."""
        missing = False
        for leaf_range in ranges:
            if leaf_range not in self.hashes:
                self._wanted_ranges.add(leaf_range)
                missing = True
        for index in indexes:
            if index not in self.accounts:
                self._wanted_accounts.add(index)
                # The audit path travels with the account: no extra round.
                for path_range in _audit_ranges(index, self.size):
                    if path_range not in self.hashes:
                        self._wanted_ranges.add(path_range)
                missing = True
        return missing

    def requests(self) -> list[_Request]:
        ranges = sorted(self._wanted_ranges)
        indexes = sorted(self._wanted_accounts)
        self._wanted_ranges.clear()
        self._wanted_accounts.clear()
        calls = max(-(-len(ranges) // self.max_ranges), -(-len(indexes) // MAX_ACCOUNTS_PER_CALL))
        requests = []
        for call in range(calls):
            chunk = ranges[call * self.max_ranges : (call + 1) * self.max_ranges]
            request = _Request(
                cutoff_id=self.cutoff_id,
                ranges=[
                    reconciliation_service_pb2.LeafRange(start=start, end=end)
                    for start, end in chunk
                ],
                account_leaf_indexes=indexes[
                    call * MAX_ACCOUNTS_PER_CALL : (call + 1) * MAX_ACCOUNTS_PER_CALL
                ],
            )
            requests.append(request)
        self.calls += len(requests)
        self.ranges_asked += len(ranges)
        self.accounts_asked += len(indexes)
        return requests

    def deliver(self, request: _Request, response: _Response) -> None:
        """Check a response's shape against its request and keep its contents."""
        if not isinstance(response, _Response):
            raise TypeError(f"{self.name}: expected GetPositionTreeNodesResponse")
        if len(response.nodes) != len(request.ranges):
            raise _malformed(
                f"{self.name} GetPositionTreeNodes node count",
                len(request.ranges),
                len(response.nodes),
            )
        if len(response.accounts) != len(request.account_leaf_indexes):
            raise _malformed(
                f"{self.name} GetPositionTreeNodes account count",
                len(request.account_leaf_indexes),
                len(response.accounts),
            )
        for asked, node in zip(request.ranges, response.nodes, strict=True):
            if (node.start, node.end) != (asked.start, asked.end):
                raise _malformed(
                    f"{self.name} node range",
                    f"[{asked.start}, {asked.end})",
                    f"[{node.start}, {node.end})",
                )
            if len(node.hash) != HASH_SIZE:
                raise _malformed(
                    f"{self.name} node [{node.start}, {node.end}) hash length",
                    HASH_SIZE,
                    len(node.hash),
                )
            known = self.hashes.setdefault((node.start, node.end), node.hash)
            if not compare_digest(known, node.hash):
                raise _error(
                    f"{self.name} node [{node.start}, {node.end}) differs from the signed tree",
                    known.hex(),
                    node.hash.hex(),
                )
        for index, account in zip(request.account_leaf_indexes, response.accounts, strict=True):
            self._received[index] = account

    def verify_received(self) -> None:
        """Prove every account received this round against the signed root."""
        for index, account in sorted(self._received.items()):
            try:
                leaf = position_leaf(account.account_id, account.positions)
            except MalformedError as err:
                raise MalformedError(
                    f"{self.name} account at leaf {index}: {err.message}",
                    reason=err.reason,
                    metadata=err.metadata,
                    field_violations=err.field_violations,
                ) from err
            path = [self.hashes[r] for r in _audit_ranges(index, self.size)]
            try:
                verify_inclusion(leaf_hash(leaf), index, self.size, path, self.root)
            except ProofError as err:
                raise ProofError(
                    f"{self.name} account {account.account_id!r} at leaf {index} "
                    f"is not in its signed positions root: {err.message}",
                    reason=err.reason,
                    metadata=err.metadata,
                ) from err
            self.accounts[index] = _Account(
                account.account_id,
                {
                    p.asset_id: (
                        p.quantity.value,
                        p.locked_quantity.value,
                        p.pledged_quantity.value,
                    )
                    for p in account.positions
                },
            )
        self._received.clear()


def _break(
    account_id: str,
    asset_id: str,
    field: reconciliation_pb2.BreakField.ValueType,
    custodian_value: str | None,
    exchange_value: str | None,
) -> reconciliation_pb2.ReconciliationBreak:
    found = reconciliation_pb2.ReconciliationBreak(
        account_id=account_id, asset_id=asset_id, field=field
    )
    if custodian_value is not None:
        found.custodian_value.CopyFrom(common_pb2.Decimal(value=custodian_value))
    if exchange_value is not None:
        found.exchange_value.CopyFrom(common_pb2.Decimal(value=exchange_value))
    return found


def _missing_account(
    account: _Account, on_custodian: bool
) -> list[reconciliation_pb2.ReconciliationBreak]:
    # An account without positions still holds zero: say which side has it.
    quantities = [(asset, values[0]) for asset, values in sorted(account.positions.items())] or [
        ("", "0")
    ]
    return [
        _break(
            account.account_id,
            asset,
            _MISSING,
            quantity if on_custodian else None,
            None if on_custodian else quantity,
        )
        for asset, quantity in quantities
    ]


def _account_breaks(
    custodian: _Account, exchange: _Account
) -> list[reconciliation_pb2.ReconciliationBreak]:
    found = []
    ours, theirs = custodian.positions, exchange.positions
    for asset in sorted(ours.keys() | theirs.keys()):
        mine, other = ours.get(asset), theirs.get(asset)
        if other is None:
            assert mine is not None
            found.append(_break(custodian.account_id, asset, _MISSING, mine[0], None))
        elif mine is None:
            found.append(_break(custodian.account_id, asset, _MISSING, None, other[0]))
        else:
            found.extend(
                _break(custodian.account_id, asset, field, m, o)
                for field, m, o in zip(_FIELD_NUMBERS, mine, other, strict=True)
                if m != o
            )
    return found


def _break_order(item: reconciliation_pb2.ReconciliationBreak) -> tuple[bytes, bytes, int]:
    """Sort key of the spec: account id, asset id (bytewise), field number."""
    return item.account_id.encode("utf-8"), item.asset_id.encode("utf-8"), item.field


class _Locator:
    """The descent as resumable tasks; callers run the I/O rounds."""

    def __init__(
        self,
        custodian: reconciliation_pb2.ReconciliationStatement,
        exchange: reconciliation_pb2.ReconciliationStatement,
        max_ranges_per_call: int,
    ) -> None:
        if not 1 <= max_ranges_per_call <= MAX_RANGES_PER_CALL:
            raise ValueError(
                f"max_ranges_per_call: expected 1..{MAX_RANGES_PER_CALL}, got {max_ranges_per_call}"
            )
        if custodian.cutoff_id != exchange.cutoff_id:
            raise _malformed(
                "exchange statement cutoff_id", custodian.cutoff_id, exchange.cutoff_id
            )
        for name, statement in (("custodian", custodian), ("exchange", exchange)):
            if len(statement.positions_root) != HASH_SIZE:
                raise _malformed(
                    f"{name} positions_root length", HASH_SIZE, len(statement.positions_root)
                )
            if statement.account_count == 0 and statement.positions_root != empty_root():
                raise _error(
                    f"{name} positions_root of 0 accounts",
                    empty_root().hex(),
                    statement.positions_root.hex(),
                )
        self.custodian = _Side(
            "custodian",
            custodian.cutoff_id,
            custodian.account_count,
            custodian.positions_root,
            max_ranges_per_call,
        )
        self.exchange = _Side(
            "exchange",
            exchange.cutoff_id,
            exchange.account_count,
            exchange.positions_root,
            max_ranges_per_call,
        )
        self.breaks: list[reconciliation_pb2.ReconciliationBreak] = []
        self.rounds = 0
        self._ready: list[_Task] = [
            self._segment(0, custodian.account_count, 0, exchange.account_count)
        ]
        self._waiting: list[_Task] = []

    # --- driving

    def step(self) -> bool:
        """Run every task until it waits for answers; True if a round is needed."""
        while self._ready:
            task = self._ready.pop()
            try:
                next(task)
            except StopIteration as done:
                self._ready.extend(done.value)
            else:
                self._waiting.append(task)
        return bool(self._waiting)

    def end_round(self) -> None:
        self.custodian.verify_received()
        self.exchange.verify_received()
        self.rounds += 1
        self._ready, self._waiting = self._waiting, []

    def result(self) -> BreakLocation:
        return BreakLocation(
            breaks=tuple(sorted(self.breaks, key=_break_order)),
            rounds=self.rounds,
            custodian=self.custodian.counts(),
            exchange=self.exchange.counts(),
        )

    # --- tasks

    def _need(
        self,
        custodian_ranges: Sequence[_Range] = (),
        exchange_ranges: Sequence[_Range] = (),
        custodian_accounts: Iterable[int] = (),
        exchange_accounts: Iterable[int] = (),
    ) -> Generator[None, None, None]:
        missing = self.custodian.want(custodian_ranges, custodian_accounts)
        missing = self.exchange.want(exchange_ranges, exchange_accounts) or missing
        if missing:
            yield

    def _segment(self, a: int, b: int, c: int, e: int) -> _Task:
        """Compare custodian leaves [a, b) with exchange leaves [c, e), the same key slice."""
        ours, theirs = self.custodian, self.exchange
        width, other_width = b - a, e - c
        if width == other_width:
            if width == 0:
                return []
            yield from self._need([(a, b)], [(c, e)])
            if compare_digest(ours.hashes[(a, b)], theirs.hashes[(c, e)]):
                return []
        if width <= 1 or other_width <= 1:
            yield from self._need(custodian_accounts=range(a, b), exchange_accounts=range(c, e))
            self._merge(
                [ours.accounts[i] for i in range(a, b)], [theirs.accounts[i] for i in range(c, e)]
            )
            return []
        k = _split(width)
        s = a + k
        left_guess = c + k  # the boundary if nothing is missing left of s
        right_guess = e - (width - k)  # ... if nothing is missing right of s
        exchange_ranges: list[_Range] = []
        if left_guess <= e:
            exchange_ranges.append((c, left_guess))
            if left_guess < e:
                exchange_ranges.append((left_guess, left_guess + 1))
        if c <= right_guess:
            exchange_ranges.append((right_guess, e))
            exchange_ranges.append((right_guess, right_guess + 1))
        yield from self._need([(a, s), (s, b), (s, s + 1)], exchange_ranges)
        left, right = ours.hashes[(a, s)], ours.hashes[(s, b)]
        self._check_children(ours, (a, b), left, right)
        if width == other_width:
            self._check_children(
                theirs, (c, e), theirs.hashes[(c, left_guess)], theirs.hashes[(left_guess, e)]
            )
        left_equal = left_guess <= e and compare_digest(left, theirs.hashes[(c, left_guess)])
        right_equal = c <= right_guess and compare_digest(right, theirs.hashes[(right_guess, e)])
        if left_equal and right_equal and left_guess <= right_guess:
            # Everything matches around exchange leaves only it holds.
            return [self._segment(s, s, left_guess, right_guess)]
        if left_equal:
            return [self._segment(s, b, left_guess, e)]
        if right_equal:
            return [self._segment(a, s, c, right_guess)]
        leaf = ours.hashes[(s, s + 1)]
        if left_guess < e and compare_digest(leaf, theirs.hashes[(left_guess, left_guess + 1)]):
            t = left_guess
        elif c <= right_guess and compare_digest(
            leaf, theirs.hashes[(right_guess, right_guess + 1)]
        ):
            t = right_guess
        else:
            t = yield from self._lower_bound(s, c, e, left_guess)
        return [self._segment(a, s, c, t), self._segment(s, b, t, e)]

    @staticmethod
    def _check_children(side: _Side, leaf_range: _Range, left: bytes, right: bytes) -> None:
        parent = side.hashes.get(leaf_range)
        if parent is not None and not compare_digest(node_hash(left, right), parent):
            raise _error(
                f"{side.name} node [{leaf_range[0]}, {leaf_range[1]}) does not match its halves",
                parent.hex(),
                node_hash(left, right).hex(),
            )

    def _lower_bound(self, s: int, c: int, e: int, guess: int) -> Generator[None, None, int]:
        """First exchange leaf in [c, e] whose account id is not below the custodian's at s.

        Gallops from the guess (missing accounts are few, so the boundary is
        near it), then bisects.
        """
        yield from self._need(custodian_accounts=[s])
        key = self.custodian.accounts[s].account_id
        low, high = c, e
        probe = min(max(guess, low), high - 1)
        step, upward = 1, None
        while low < high:
            yield from self._need(exchange_accounts=[probe])
            if self.exchange.accounts[probe].account_id < key:
                low = probe + 1
                upward = True if upward is None else upward
            else:
                high = probe
                upward = False if upward is None else upward
            if low >= high:
                break
            if upward and step > 0:
                probe = probe + step
                step *= 2
                if probe >= high:
                    probe, step = (low + high) // 2, 0
            elif upward is False and step > 0:
                probe = probe - step
                step *= 2
                if probe < low:
                    probe, step = (low + high) // 2, 0
            else:
                probe = (low + high) // 2
        return low

    def _merge(self, custodian: list[_Account], exchange: list[_Account]) -> None:
        i = j = 0
        while i < len(custodian) or j < len(exchange):
            if j == len(exchange) or (
                i < len(custodian) and custodian[i].account_id < exchange[j].account_id
            ):
                self.breaks.extend(_missing_account(custodian[i], on_custodian=True))
                i += 1
            elif i == len(custodian) or exchange[j].account_id < custodian[i].account_id:
                self.breaks.extend(_missing_account(exchange[j], on_custodian=False))
                j += 1
            else:
                self.breaks.extend(_account_breaks(custodian[i], exchange[j]))
                i += 1
                j += 1


def _direct(response: object, name: str) -> _Response:
    if inspect.isawaitable(response):
        if inspect.iscoroutine(response):
            response.close()  # never to be awaited: say so now, not at garbage collection
        raise TypeError(f"{name}: locate_breaks_sync needs a source that answers directly")
    return response  # type: ignore[return-value]  # deliver() checks the type


def locate_breaks_sync(
    custodian_statement: reconciliation_pb2.ReconciliationStatement,
    exchange_statement: reconciliation_pb2.ReconciliationStatement,
    custodian_nodes: Callable[[_Request], _Response],
    exchange_nodes: Callable[[_Request], _Response],
    *,
    max_ranges_per_call: int = MAX_RANGES_PER_CALL,
) -> BreakLocation:
    """:func:`locate_breaks` for sources that answer directly (no event loop)."""
    locator = _Locator(custodian_statement, exchange_statement, max_ranges_per_call)
    sides = ((locator.custodian, custodian_nodes), (locator.exchange, exchange_nodes))
    while locator.step():
        for side, source in sides:
            for request in side.requests():
                side.deliver(request, _direct(source(request), side.name))
        locator.end_round()
    return locator.result()


async def locate_breaks(
    custodian_statement: reconciliation_pb2.ReconciliationStatement,
    exchange_statement: reconciliation_pb2.ReconciliationStatement,
    custodian_nodes: NodesSource,
    exchange_nodes: NodesSource,
    *,
    max_ranges_per_call: int = MAX_RANGES_PER_CALL,
) -> BreakLocation:
    """Locate every account break between the two parties' position trees.

    The statements give each side's cut-off, account count and signed
    positions root (verify them first, §3.6). Each side is reached through its
    ``GetPositionTreeNodes`` (sync or async callable); both sides are asked
    concurrently, one batch per round. Returns the breaks ordered by account
    id, asset id and field, with the number of calls, ranges and accounts
    asked of each side. A side whose answers do not match its signed root
    raises ProofError; malformed answers raise MalformedError.
    """
    locator = _Locator(custodian_statement, exchange_statement, max_ranges_per_call)

    async def ask(side: _Side, source: NodesSource) -> None:
        for request in side.requests():
            response = source(request)
            if inspect.isawaitable(response):
                response = await response
            side.deliver(request, response)

    while locator.step():
        await asyncio.gather(
            ask(locator.custodian, custodian_nodes), ask(locator.exchange, exchange_nodes)
        )
        locator.end_round()
    return locator.result()
