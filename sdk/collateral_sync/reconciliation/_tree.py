"""Position leaves and the position tree (docs/PROTOCOL.md §10.3).

A party's view at a cut-off is one leaf per account, accounts sorted bytewise
by account id, hashed into an RFC 9162 tree. :class:`PositionTree` keeps what a
party needs to serve ``GetPositionTreeNodes`` for a million accounts in little
memory: the leaf bytes (without their constant prefix) in one buffer with an
offset table, and the hashes of every aligned power-of-two subtree as one
``bytes`` per level (32 bytes a node). The hash of any leaf range, aligned or
not, is composed from those levels along RFC 9162's split.
"""

from __future__ import annotations

import decimal
import gc
import operator
import re
import struct
from array import array
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha256
from itertools import accumulate, chain, compress, islice, pairwise
from operator import itemgetter
from typing import Literal, TypeAlias

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import MalformedError, StateError
from collateral_sync.merkle import HASH_SIZE, NODE_PREFIX, empty_root, leaf_hash, node_hash
from collateral_sync.v1 import (
    common_pb2,
    errors_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
)

__all__ = [
    "MAX_ACCOUNTS_PER_CALL",
    "MAX_RANGES_PER_CALL",
    "POSITION_LEAF_PREFIX",
    "AssetTotal",
    "PositionTree",
    "PositionValues",
    "position_leaf",
]

#: Domain separation of position leaves: 32 ASCII bytes and a zero byte.
POSITION_LEAF_PREFIX = b"collateral-sync/v1/position-leaf\x00"
#: Limits of one GetPositionTreeNodes call (reconciliation_service.proto).
MAX_RANGES_PER_CALL = 4096
MAX_ACCOUNTS_PER_CALL = 4096

#: One position as canonical text: (asset_id, quantity, locked_quantity, pledged_quantity).
#: Plain tuples cost a third of the memory of Position messages at a million accounts.
PositionValues: TypeAlias = tuple[str, str, str, str]
PositionLike: TypeAlias = "common_pb2.Position | PositionValues"

_R = errors_pb2.ErrorReason
_U32 = struct.Struct(">I")
_U32_MAX = 0xFFFFFFFF
_AmountField: TypeAlias = Literal["quantity", "locked_quantity", "pledged_quantity"]
_FIELDS: tuple[_AmountField, ...] = ("quantity", "locked_quantity", "pledged_quantity")
# u32be(n) for n < 128 is "\0\0\0" + one ASCII byte, so an all-ASCII leaf can be
# written as one str and encoded once; anything else takes the bytes path.
_SHORT_LENGTH = tuple("\0\0\0" + chr(n) for n in range(128))
# A non-negative canonical amount (amounts.py's grammar without the sign),
# matched without a Python call per amount; the slow path uses parse_amount.
# tests/sdk/test_reconciliation.py pins their agreement.
_CANONICAL = re.compile(r"(?:0|[1-9][0-9]{0,59})(?:\.[0-9]{0,17}[1-9])?")
_NOT_ZERO = "0".__ne__
# Accounts handled per step of the build.
_CHUNK = 1 << 15
# Sums of up to 2**64 amounts of 60+18 digits stay far below 200 digits; Inexact
# is trapped so that a total can never be rounded silently.
_SUM_CONTEXT = decimal.Context(
    prec=200, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow]
)
_ZERO = decimal.Decimal(0)
# Unaligned perfect subtrees at least this wide are memoised: a regulator that
# compares offset ranges descends into their halves next.
_MEMO_MIN_WIDTH = 64
_MEMO_MAX_ENTRIES = 1 << 18


def _malformed(
    what: str, expected: object, actual: object, *, reason: int = _R.ERROR_REASON_MALFORMED
) -> MalformedError:
    return MalformedError(
        f"{what}: expected {expected}, got {actual}",
        reason=reason,
        metadata={"expected": str(expected), "actual": str(actual)[:120]},
    )


# --------------------------------------------------------------------- leaf bytes


def _values_of(account_id: str, position: PositionLike) -> PositionValues:
    if isinstance(position, common_pb2.Position):
        if position.account_id and position.account_id != account_id:
            raise _malformed("position.account_id", account_id, position.account_id)
        for name in _FIELDS:
            if not position.HasField(name):
                raise _malformed(f"position {position.asset_id!r} {name}", "a Decimal", "absent")
        return (
            position.asset_id,
            position.quantity.value,
            position.locked_quantity.value,
            position.pledged_quantity.value,
        )
    if not (isinstance(position, tuple) and len(position) == 4):
        raise TypeError("a position is a Position message or (asset_id, quantity, locked, pledged)")
    return position


def _check_amount(account_id: str, asset_id: str, name: str, text: str) -> None:
    field = f"positions[{account_id}][{asset_id}].{name}"
    value = parse_amount(text, field=field)
    if value < 0:
        raise MalformedError(
            f"{field}: expected a non-negative quantity, got {text}",
            reason=_R.ERROR_REASON_INVALID_AMOUNT,
            metadata={"field": field, "expected": ">= 0", "actual": text},
            field_violations={field: "negative quantity"},
        )


def _sorted_values(account_id: str, positions: Iterable[PositionLike]) -> list[PositionValues]:
    values = [p if type(p) is tuple else _values_of(account_id, p) for p in positions]
    if len(values) > 1:
        # str order is code-point order, which is the bytewise order of UTF-8.
        values.sort(key=itemgetter(0))
        for before, after in pairwise(values):
            if before[0] == after[0]:
                raise _malformed(
                    f"account {account_id!r} positions", "distinct asset ids", repr(after[0])
                )
    return values


def _fast_values(account_id: str, positions: Iterable[PositionLike]) -> Sequence[PositionValues]:
    """:func:`_sorted_values`, without copying a few tuples already in order.

    Positions usually come sorted by asset (a database index); checking is
    cheaper than sorting a copy, and most accounts hold a few assets.
    """
    kind = type(positions)
    if kind is list or kind is tuple:
        count = len(positions)  # type: ignore[arg-type]
        if count == 1:
            (first,) = positions
            if type(first) is tuple:
                return positions  # type: ignore[return-value]  # checked: one tuple
        elif count == 2:
            first, second = positions
            if type(first) is tuple and type(second) is tuple and first[0] < second[0]:
                return positions  # type: ignore[return-value]  # checked: two, in order
        elif count == 3:
            first, second, third = positions
            if (
                type(first) is tuple
                and type(second) is tuple
                and type(third) is tuple
                and first[0] < second[0] < third[0]
            ):
                return positions  # type: ignore[return-value]  # checked: three, in order
    return _sorted_values(account_id, positions)


def _check_values(account_id: str, values: Sequence[PositionValues]) -> None:
    """The slow, precise checks: names the account, asset and field at fault."""
    if not isinstance(account_id, str) or not account_id:
        raise _malformed("account_id", "a non-empty string", repr(account_id))
    for asset_id, *amounts in values:
        if not isinstance(asset_id, str) or not asset_id:
            raise _malformed(f"account {account_id!r} asset_id", "a non-empty string", asset_id)
        for name, text in zip(_FIELDS, amounts, strict=True):
            _check_amount(account_id, asset_id, name, text)


def _encode(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _malformed(what, "valid UTF-8 text", repr(text)) from err


def _lp(data: bytes) -> bytes:
    if len(data) > _U32_MAX:
        raise _malformed("length-prefixed field", f"<= {_U32_MAX} bytes", len(data))
    return _U32.pack(len(data)) + data


def _body_bytes(account_id: str, values: Sequence[PositionValues]) -> bytes:
    """Leaf bytes after the prefix, one field at a time (any lengths, any text)."""
    parts = [_lp(_encode(account_id, "account_id")), _U32.pack(len(values))]
    for position in values:
        parts.extend(_lp(_encode(text, "position text")) for text in position)
    return b"".join(parts)


def _body(account_id: str, values: Sequence[PositionValues]) -> bytes:
    """Leaf bytes after the prefix, fast when every piece is short ASCII."""
    lengths = _SHORT_LENGTH
    try:
        if len(values) == 1:
            ((asset_id, quantity, locked, pledged),) = values
            text = (
                f"{lengths[len(account_id)]}{account_id}\0\0\0\x01"
                f"{lengths[len(asset_id)]}{asset_id}{lengths[len(quantity)]}{quantity}"
                f"{lengths[len(locked)]}{locked}{lengths[len(pledged)]}{pledged}"
            )
        else:
            parts = [lengths[len(account_id)], account_id, lengths[len(values)]]
            for asset_id, quantity, locked, pledged in values:
                parts.append(
                    f"{lengths[len(asset_id)]}{asset_id}{lengths[len(quantity)]}{quantity}"
                    f"{lengths[len(locked)]}{locked}{lengths[len(pledged)]}{pledged}"
                )
            text = "".join(parts)
    except IndexError:
        return _body_bytes(account_id, values)
    if not text.isascii():
        return _body_bytes(account_id, values)
    return text.encode("ascii")


def position_leaf(account_id: str, positions: Iterable[PositionLike]) -> bytes:
    """The leaf bytes of one account (docs/PROTOCOL.md §10.3).

    ``positions`` are Position messages or ``(asset_id, quantity,
    locked_quantity, pledged_quantity)`` tuples of canonical text, in any
    order; they are sorted bytewise by asset id. Duplicate assets, empty ids,
    absent or non-canonical or negative amounts raise MalformedError.
    """
    values = _sorted_values(account_id, positions)
    _check_values(account_id, values)
    return POSITION_LEAF_PREFIX + _body(account_id, values)


def _decode_body(body: bytes | bytearray) -> tuple[str, list[PositionValues]]:
    """Inverse of :func:`_body` for bytes this module wrote."""
    offset = 0

    def take() -> str:
        nonlocal offset
        (length,) = _U32.unpack_from(body, offset)
        start = offset + 4
        offset = start + length
        return body[start:offset].decode("utf-8")

    account_id = take()
    (count,) = _U32.unpack_from(body, offset)
    offset += 4
    values = [(take(), take(), take(), take()) for _ in range(count)]
    return account_id, values


# ------------------------------------------------------------------------ totals


@dataclass(frozen=True, slots=True)
class AssetTotal:
    """Sums of one asset over all accounts, exact."""

    asset_id: str
    quantity: decimal.Decimal
    locked_quantity: decimal.Decimal
    pledged_quantity: decimal.Decimal

    def to_proto(self) -> reconciliation_pb2.AssetTotal:
        return reconciliation_pb2.AssetTotal(
            asset_id=self.asset_id,
            quantity=common_pb2.Decimal(value=format_amount(self.quantity, field="quantity")),
            locked_quantity=common_pb2.Decimal(
                value=format_amount(self.locked_quantity, field="locked_quantity")
            ),
            pledged_quantity=common_pb2.Decimal(
                value=format_amount(self.pledged_quantity, field="pledged_quantity")
            ),
        )


def _all_canonical(texts: Sequence[str]) -> bool:
    try:
        return all(map(_CANONICAL.fullmatch, texts))
    except TypeError:  # not text: the slow path names it
        return False


# -------------------------------------------------------------------------- tree


def _split(width: int) -> int:
    """RFC 9162 split point: the largest power of two strictly below ``width``."""
    return 1 << ((width - 1).bit_length() - 1)


def _combine_level(level: bytes | bytearray) -> bytes:
    """Hashes of the complete pairs of one level: the level above it."""
    view = memoryview(level)
    prefix = NODE_PREFIX
    return b"".join(
        [
            sha256(prefix + view[i : i + 2 * HASH_SIZE]).digest()
            for i in range(0, (len(level) // (2 * HASH_SIZE)) * 2 * HASH_SIZE, 2 * HASH_SIZE)
        ]
    )


class _Builder:
    """Leaf bytes, leaf hashes and totals, a chunk of accounts at a time.

    Chunks keep the interpreter's per-object work (and the cyclic GC's) to
    what one chunk holds; maps and comprehensions rather than one loop,
    because at a million accounts per-statement overhead is the cost.
    """

    def __init__(self) -> None:
        self.bodies = bytearray()
        self.offsets = array("Q", [0])
        self.leaf_hashes = bytearray()
        self.sums: dict[str, list[decimal.Decimal]] = {}
        self.last: str | None = None
        self.in_order = True

    def add(self, chunk: list[tuple[str, Iterable[PositionLike]]]) -> None:
        account_ids = [account_id for account_id, _ in chunk]
        if not all(isinstance(a, str) and a for a in account_ids):
            for account_id in account_ids:
                _check_values(account_id, ())
        if self.in_order:
            self.in_order = (self.last is None or self.last < account_ids[0]) and all(
                map(operator.lt, account_ids, account_ids[1:])
            )
        self.last = account_ids[-1]
        values_of = [_fast_values(account_id, positions) for account_id, positions in chunk]
        try:
            bodies = list(map(_body, account_ids, values_of))
        except (TypeError, ValueError):
            for account_id, values in zip(account_ids, values_of, strict=True):
                _check_values(account_id, values)  # names the field that is not text
            raise
        by_asset: dict[str, list[PositionValues]] = defaultdict(list)
        for position in chain.from_iterable(values_of):
            by_asset[position[0]].append(position)
        for asset_id, positions in by_asset.items():
            if not (asset_id and self._add_sums(asset_id, positions)):
                # Find and name the culprit; the fast check only says "somewhere".
                for account_id, values in zip(account_ids, values_of, strict=True):
                    _check_values(account_id, values)
        self.leaf_hashes += b"".join(map(leaf_hash, map(POSITION_LEAF_PREFIX.__add__, bodies)))
        start = self.offsets[-1]
        self.offsets.extend(islice(accumulate(map(len, bodies), initial=start), 1, None))
        self.bodies += b"".join(bodies)

    def _add_sums(self, asset_id: str, positions: list[PositionValues]) -> bool:
        """Add one asset's amounts to its totals; False if one is not canonical.

        Most locked quantities are zero and most pledged quantities equal the
        quantity (everything in the custody account pledged): those are
        neither checked nor parsed twice. Anything else takes the full path.
        """
        _, quantities, locked, pledged = zip(*positions, strict=True)
        locked = tuple(filter(_NOT_ZERO, locked))
        differs = tuple(map(operator.ne, quantities, pledged))
        pledged = tuple(compress(pledged, differs))
        if not (_all_canonical(quantities) and _all_canonical(locked) and _all_canonical(pledged)):
            return False
        sums = self.sums.setdefault(asset_id, [_ZERO, _ZERO, _ZERO])
        with decimal.localcontext(_SUM_CONTEXT):
            parsed = list(map(decimal.Decimal, quantities))
            sums[0] = sum(parsed, sums[0])
            sums[1] = sum(map(decimal.Decimal, locked), sums[1])
            same = sum(compress(parsed, map(operator.not_, differs)), _ZERO)
            sums[2] = sum(map(decimal.Decimal, pledged), sums[2] + same)
        return True

    def _sort(self) -> None:
        """Put leaves received out of order into account-id order."""
        offsets, bodies, hashes = self.offsets, self.bodies, self.leaf_hashes
        count = len(offsets) - 1
        ids = [_decode_body(bytes(bodies[offsets[i] : offsets[i + 1]]))[0] for i in range(count)]
        order = sorted(range(count), key=ids.__getitem__)
        for before, after in pairwise(order):
            if ids[before] == ids[after]:
                raise _malformed("accounts", "distinct account ids", repr(ids[after]))
        self.bodies = bytearray(b"".join(bodies[offsets[i] : offsets[i + 1]] for i in order))
        self.offsets = array(
            "Q", accumulate((offsets[i + 1] - offsets[i] for i in order), initial=0)
        )
        self.leaf_hashes = bytearray(
            b"".join(hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in order)
        )

    def finish(self) -> PositionTree:
        if not self.in_order:
            self._sort()
        totals = tuple(AssetTotal(asset_id, *self.sums[asset_id]) for asset_id in sorted(self.sums))
        levels = _levels(bytes(self.leaf_hashes))
        self.leaf_hashes = bytearray()
        # The leaf buffer is kept as built: copying it to bytes would double it.
        return PositionTree(self.bodies, self.offsets, levels, totals)


def _levels(leaf_hashes: bytes) -> list[bytes]:
    """Every level of aligned subtree hashes above the leaf hashes, leaves first."""
    levels = [leaf_hashes]
    while len(levels[-1]) >= 2 * HASH_SIZE:
        levels.append(_combine_level(levels[-1]))
    return levels


AccountsInput: TypeAlias = (
    "Mapping[str, Iterable[PositionLike]] | Iterable[tuple[str, Iterable[PositionLike]]]"
)


class PositionTree:
    """A party's positions at a cut-off as an RFC 9162 tree (immutable once built).

    Build it with :meth:`build`; read ``size``, ``root`` and ``totals`` for the
    statement; answer ``GetPositionTreeNodes`` with :meth:`answer`. Memory is
    the leaf bytes plus about 72 bytes an account (subtree hashes and leaf
    offsets), never one Python object per node.
    """

    __slots__ = ("_bodies", "_levels", "_memo", "_offsets", "_size", "_totals")

    def __init__(
        self,
        bodies: bytearray,
        offsets: array[int],
        levels: list[bytes],
        totals: tuple[AssetTotal, ...],
    ) -> None:
        self._bodies = bodies
        self._offsets = offsets
        self._levels = levels
        self._size = len(offsets) - 1
        self._totals = totals
        self._memo: dict[tuple[int, int], bytes] = {}

    @classmethod
    def build(cls, accounts: AccountsInput) -> PositionTree:
        """Build the tree of ``accounts``: account id -> positions.

        Accepts a mapping or (account_id, positions) pairs in any order;
        pairs already sorted by account id (e.g. a database cursor) are
        streamed, so memory stays the tree's own. Positions are Position
        messages or :data:`PositionValues` tuples. Duplicate accounts or
        assets, empty ids and absent, non-canonical or negative amounts raise
        MalformedError.
        """
        if isinstance(accounts, Mapping):
            keys = list(accounts)
            if all(map(operator.lt, keys, keys[1:])):
                # Already in order (built from a sorted source): no lookups.
                pairs: Iterable[tuple[str, Iterable[PositionLike]]] = accounts.items()
            else:
                # str order is code-point order, which is the bytewise order of UTF-8.
                pairs = ((account_id, accounts[account_id]) for account_id in sorted(keys))
            del keys
        else:
            pairs = accounts
        builder = _Builder()
        iterator = iter(pairs)
        # The build makes no reference cycles, and a full collection walks
        # every object of the process: seconds for a party holding a million
        # accounts' positions, several times over. So the cyclic GC waits.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            while chunk := list(islice(iterator, _CHUNK)):
                builder.add(chunk)
            return builder.finish()
        finally:
            if was_enabled:
                gc.enable()

    # --- reading

    @property
    def size(self) -> int:
        """Number of accounts (leaves)."""
        return self._size

    def __len__(self) -> int:
        return self._size

    @property
    def root(self) -> bytes:
        """RFC 9162 tree head over all leaves; ``H("")`` for no accounts."""
        if self._size == 0:
            return empty_root()
        return self._range_hash(0, self._size)

    @property
    def totals(self) -> tuple[AssetTotal, ...]:
        """Per-asset sums over all accounts, ordered bytewise by asset id."""
        return self._totals

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._size:
            raise StateError(
                f"leaf index out of range: expected 0 <= index < {self._size}, got {index}",
                reason=_R.ERROR_REASON_OUT_OF_RANGE,
                metadata={"expected": f"0 <= index < {self._size}", "actual": str(index)},
            )

    def leaf(self, index: int) -> bytes:
        """The position leaf bytes of the account at ``index``."""
        self._check_index(index)
        return POSITION_LEAF_PREFIX + self._bodies[self._offsets[index] : self._offsets[index + 1]]

    def account_id(self, index: int) -> str:
        """The account id at leaf ``index``."""
        self._check_index(index)
        start = self._offsets[index]
        (length,) = _U32.unpack_from(self._bodies, start)
        return self._bodies[start + 4 : start + 4 + length].decode("utf-8")

    def account_positions(self, index: int) -> reconciliation_pb2.AccountPositions:
        """The account at leaf ``index`` as sent in GetPositionTreeNodesResponse."""
        self._check_index(index)
        body = self._bodies[self._offsets[index] : self._offsets[index + 1]]
        account_id, values = _decode_body(body)
        return reconciliation_pb2.AccountPositions(
            account_id=account_id,
            positions=[
                common_pb2.Position(
                    account_id=account_id,
                    asset_id=asset_id,
                    quantity=common_pb2.Decimal(value=quantity),
                    locked_quantity=common_pb2.Decimal(value=locked),
                    pledged_quantity=common_pb2.Decimal(value=pledged),
                )
                for asset_id, quantity, locked, pledged in values
            ],
        )

    def node_hash(self, start: int, end: int) -> bytes:
        """MTH of the leaves ``[start, end)``, for any ``0 <= start < end <= size``.

        Aligned power-of-two ranges are read from the levels; any other range
        is composed along RFC 9162 splits. A range not aligned to the tree
        (a regulator comparing offset ranges) costs about its width in
        hashes the first time; its wide subtrees are remembered.
        """
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= self._size):
            raise StateError(
                f"leaf range out of range: expected 0 <= start < end <= {self._size}, "
                f"got [{start}, {end})",
                reason=_R.ERROR_REASON_OUT_OF_RANGE,
                metadata={
                    "expected": f"0 <= start < end <= {self._size}",
                    "actual": f"[{start}, {end})",
                },
            )
        return self._range_hash(start, end)

    def _range_hash(self, start: int, end: int) -> bytes:
        width = end - start
        if width & (width - 1) == 0:
            return self._perfect(start, width)
        k = _split(width)
        return node_hash(self._range_hash(start, start + k), self._range_hash(start + k, end))

    def _perfect(self, start: int, width: int) -> bytes:
        height = width.bit_length() - 1
        if start & (width - 1) == 0:
            node = start >> height
            return self._levels[height][node * HASH_SIZE : (node + 1) * HASH_SIZE]
        if width <= _MEMO_MIN_WIDTH:
            return self._perfect_from_level(start, width)
        key = (start, width)
        found = self._memo.get(key)
        if found is not None:
            return found
        half = width >> 1
        value = node_hash(self._perfect(start, half), self._perfect(start + half, half))
        if len(self._memo) >= _MEMO_MAX_ENTRIES:
            self._memo.clear()
        self._memo[key] = value
        return value

    def _perfect_from_level(self, start: int, width: int) -> bytes:
        # The highest level whose nodes the unaligned range still covers whole.
        height = ((start & -start).bit_length() - 1) if start else width.bit_length() - 1
        first = start >> height
        level = self._levels[height][first * HASH_SIZE : (first + (width >> height)) * HASH_SIZE]
        while len(level) > HASH_SIZE:
            level = _combine_level(level)
        return level

    # --- serving

    def answer(
        self, request: reconciliation_service_pb2.GetPositionTreeNodesRequest
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        """The GetPositionTreeNodes response for this tree.

        Checks the request first (at most 4096 ranges and 4096 indexes,
        LIMIT_EXCEEDED; every range ``0 <= start < end <= size`` and index
        ``< size``, OUT_OF_RANGE). The caller checks ``cutoff_id``. Nodes come
        in the order of the ranges, accounts in the order of the indexes.
        """
        for name, count, limit in (
            ("ranges", len(request.ranges), MAX_RANGES_PER_CALL),
            ("account_leaf_indexes", len(request.account_leaf_indexes), MAX_ACCOUNTS_PER_CALL),
        ):
            if count > limit:
                raise StateError(
                    f"{name}: expected at most {limit} per call, got {count}",
                    reason=_R.ERROR_REASON_LIMIT_EXCEEDED,
                    metadata={"field": name, "expected": f"<= {limit}", "actual": str(count)},
                )
        for leaf_range in request.ranges:
            if not 0 <= leaf_range.start < leaf_range.end <= self._size:
                self.node_hash(leaf_range.start, leaf_range.end)  # raises OUT_OF_RANGE
        for index in request.account_leaf_indexes:
            self._check_index(index)
        return reconciliation_service_pb2.GetPositionTreeNodesResponse(
            nodes=[
                reconciliation_pb2.PositionTreeNode(
                    start=r.start, end=r.end, hash=self._range_hash(r.start, r.end)
                )
                for r in request.ranges
            ],
            accounts=[self.account_positions(i) for i in request.account_leaf_indexes],
        )
