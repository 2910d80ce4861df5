"""Reconciliation statements and position trees at the custodian and the exchange (docs/PROTOCOL.md §10.1-§10.4).

Both parties serve ``ReconciliationService``: the signed statement of a
cut-off, and the position-tree nodes and accounts a regulator descends to
locate breaks. The kit asks as the regulator would and judges the answers on
its own: the statement with the SDK's signature verifier, the tree by
recomputing RFC 9162 hashes (``collateral_sync.merkle``) over position leaves
it encodes itself from §10.3, so a server whose tree only agrees with its own
encoder is caught.

A statement exists only once its cut-off has passed, so the cases that need
one move the server's clock just past the next cut-off with
TestControlService.AdvanceClock (at most 12 hours each); without test control
they are skipped. The kit cannot learn the server's schedule from the
protocol, so it assumes the default one (00:00 and 12:00 UTC, §10.1). Against
a custodian the kit first pledges its ``--account`` (when given) so that the
frozen view holds an account.

The sync log heads a custodian states are checked against the batches the
kit itself saw on the SyncPositions stream, as the exchange (the helpers of
the ``sync/`` cases): each batch's last entry and signed ``issued_at``, both
ways. Entries flow both ways just before and just after the cut-off, one of
the kit's batches issued after the cut-off while the custodian's clock is
still before it (an exchange clock running ahead), before the statement is
asked for.

An exchange states a cut-off only once it has received a batch or heartbeat
its custodian issued after it (§10.2), so against an exchange the cases need
the kit to be that custodian (``--listen``): its session follows the
exchange's clock. One case holds that stream itself and chooses the frames'
times: while nothing after the cut-off has come — not even a batch issued
just before it — the statement must be refused, and once a heartbeat issued
after it comes the statement must hold that batch.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from typing import Literal

import grpc
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import role_name
from collateral_sync.merkle import HASH_SIZE, empty_root, leaf_hash, node_hash
from collateral_sync.signing import verify_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN, ZERO_HASH
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    position_sync_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
    test_control_pb2,
)
from google.protobuf.message import DecodeError

from collateral_sync_conformance._context import CaseContext, party_role
from collateral_sync_conformance._counterpart import KitCustodian, RawStream
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    Outcome,
    check,
    check_equal,
    describe,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._checkpoints import verify_leaf
from collateral_sync_conformance.cases._held_stream import held_stream, send_heartbeat
from collateral_sync_conformance.cases._kit_account import ensure_pledged, holdings
from collateral_sync_conformance.cases._raw_stream import (
    StreamEnded,
    SyncStream,
    kit_batch,
    kit_update,
    verified_entries,
)

__all__: list[str] = []

_PARTIES = [Role.CUSTODIAN, Role.EXCHANGE]
_R = errors_pb2.ErrorReason
_ROLE = common_pb2.PartyRole
_LeafRange = reconciliation_service_pb2.LeafRange
#: The default schedule (§10.1): offsets from 00:00 UTC.
_DEFAULT_CUTOFFS = (timedelta(0), timedelta(hours=12))
#: Ranges and account indexes one GetPositionTreeNodes call may carry (§10.4).
_MAX_PER_CALL = 4096
#: The exchange states a cut-off once it holds a batch or heartbeat issued after it
#: (§10.2): how long the kit waits through FAILED_PRECONDITION for that.
_STATEMENT_WAIT = timedelta(seconds=5)
_POLL_SECONDS = 0.1
#: §10.3: 32 ASCII bytes and a zero byte.
_POSITION_LEAF_PREFIX = b"collateral-sync/v1/position-leaf\x00"
_U32 = struct.Struct(">I")
_AMOUNTS: tuple[Literal["quantity", "locked_quantity", "pledged_quantity"], ...] = (
    "quantity",
    "locked_quantity",
    "pledged_quantity",
)
#: Ill-formed cut-off ids (§10.1 wants RFC 3339 UTC with seconds and ``Z``).
_MALFORMED_IDS = (
    "",
    "2026-11-23T12:00:00",
    "2026-11-23 12:00:00Z",
    "2026-11-23T12:00:00+00:00",
    "noon",
)
#: A time of day past a scheduled cut-off that no sane schedule has (§10.1): the id naming it is
#: well formed, and names no cut-off.
_OFF_SCHEDULE = timedelta(minutes=17, seconds=23)


def _cutoff_id(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _next_cutoff(after: datetime) -> datetime:
    """The first cut-off of the default schedule strictly after ``after``."""
    day = datetime.combine(after.astimezone(UTC).date(), datetime.min.time(), tzinfo=UTC)
    candidates = sorted(
        day + timedelta(days=days) + offset for days in (0, 1) for offset in _DEFAULT_CUTOFFS
    )
    return next(c for c in candidates if c > after)


def _unreached_cutoff(now: datetime) -> datetime:
    """A cut-off two days ahead of ``now``: no server can have stated it yet."""
    return _next_cutoff(now + timedelta(days=2))


# ------------------------------------------------------------------ a cut-off


async def _pass_cutoff(ctx: CaseContext) -> datetime:
    """Move the server's clock one second past its next cut-off; return that cut-off.

    A custodian gets the kit's account pledged first, so that the view frozen
    at the cut-off is not empty.
    """
    if ctx.role is Role.CUSTODIAN and ctx.config.account_id:
        await ensure_pledged(ctx)
    if ctx.role is Role.EXCHANGE:
        # An exchange states C once it has heard from its custodian past C (§10.2):
        # only the kit's own custodian (--listen) moves with the exchange's clock.
        _ = ctx.counterpart
    now = await ctx.advance_clock(timedelta(0))
    cutoff = _next_cutoff(now)
    await ctx.advance_clock(cutoff - now + timedelta(seconds=1))
    return cutoff


async def _ask_statement(ctx: CaseContext, cutoff_id: str, when: str = "") -> Outcome:
    """GetReconciliationStatement of ``cutoff_id``; ``when`` says, in a failure, when it was asked."""
    return await ctx.rpc(
        ctx.reconciliation.get_reconciliation_statement,
        reconciliation_service_pb2.GetReconciliationStatementRequest(cutoff_id=cutoff_id),
        label=f"GetReconciliationStatement ({when})" if when else "GetReconciliationStatement",
    )


async def _statement(
    ctx: CaseContext, cutoff: datetime
) -> tuple[envelope_pb2.Envelope, reconciliation_pb2.ReconciliationStatement]:
    """The envelope the server returns for a passed cut-off, and its payload, parsed.

    Waits a little through FAILED_PRECONDITION: an exchange may state the
    cut-off only once a batch or heartbeat issued after it has arrived.
    """
    deadline = time.monotonic() + _STATEMENT_WAIT.total_seconds()
    while True:
        outcome = await _ask_statement(ctx, _cutoff_id(cutoff))
        if outcome.code != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
            break
        await asyncio.sleep(_POLL_SECONDS)
    response: reconciliation_service_pb2.GetReconciliationStatementResponse = expect_ok(outcome)
    envelope = response.reconciliation_statement
    try:
        statement = reconciliation_pb2.ReconciliationStatement.FromString(envelope.payload)
    except DecodeError as err:
        raise CaseFailure(
            "the reconciliation statement's payload does not parse",
            expected="a serialised ReconciliationStatement",
            got=describe(envelope),
        ) from err
    check_equal("cutoff_id of the statement", _cutoff_id(cutoff), statement.cutoff_id)
    return envelope, statement


async def _nodes(
    ctx: CaseContext,
    cutoff_id: str,
    ranges: Sequence[tuple[int, int]] = (),
    indexes: Sequence[int] = (),
) -> Outcome:
    return await ctx.rpc(
        ctx.reconciliation.get_position_tree_nodes,
        reconciliation_service_pb2.GetPositionTreeNodesRequest(
            cutoff_id=cutoff_id,
            ranges=[_LeafRange(start=start, end=end) for start, end in ranges],
            account_leaf_indexes=list(indexes),
        ),
        label="GetPositionTreeNodes",
    )


async def _answered(
    ctx: CaseContext,
    cutoff_id: str,
    ranges: Sequence[tuple[int, int]] = (),
    indexes: Sequence[int] = (),
) -> tuple[list[bytes], list[reconciliation_pb2.AccountPositions]]:
    """Node hashes in the order of ``ranges`` and accounts in the order of ``indexes``."""
    response: reconciliation_service_pb2.GetPositionTreeNodesResponse = expect_ok(
        await _nodes(ctx, cutoff_id, ranges, indexes)
    )
    check_equal(
        "nodes returned (start, end), in the order of the ranges asked",
        list(ranges),
        [(node.start, node.end) for node in response.nodes],
    )
    for node in response.nodes:
        check_equal(f"hash length of node [{node.start}, {node.end})", HASH_SIZE, len(node.hash))
    check_equal(
        "number of accounts returned (one per account_leaf_index)",
        len(indexes),
        len(response.accounts),
    )
    return [node.hash for node in response.nodes], list(response.accounts)


# ------------------------------------------------------------------ position tree, by the spec


def _lp(text: str) -> bytes:
    data = text.encode("utf-8")
    return _U32.pack(len(data)) + data


def _canonical(value: common_pb2.Decimal, what: str) -> str:
    try:
        canonical = format_amount(parse_amount(value.value, field=what), field=what)
    except CollateralSyncError as err:
        raise CaseFailure(
            f"{what} is not an amount: {err.message}", expected="canonical decimal text"
        ) from err
    check_equal(f"{what} (canonical text, §2.1)", canonical, value.value)
    return canonical


def _position_leaf(account: reconciliation_pb2.AccountPositions) -> bytes:
    """The leaf bytes of an account as §10.3 defines them, from what the server sent."""
    parts = [_POSITION_LEAF_PREFIX, _lp(account.account_id), _U32.pack(len(account.positions))]
    assets = [p.asset_id.encode("utf-8") for p in account.positions]
    check(
        len(set(assets)) == len(assets),
        f"account {account.account_id!r} lists an asset twice",
        expected="each asset at most once (§10.3)",
        got=[p.asset_id for p in account.positions],
    )
    for position in sorted(account.positions, key=lambda p: p.asset_id.encode("utf-8")):
        parts.append(_lp(position.asset_id))
        for name in _AMOUNTS:
            what = f"accounts[{account.account_id}].{position.asset_id}.{name}"
            check(position.HasField(name), f"{what} is absent", expected="a Decimal", got="none")
            parts.append(_lp(_canonical(getattr(position, name), what)))
    return b"".join(parts)


def _tree_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """RFC 9162 MTH over leaf hashes; ``H("")`` for none."""
    if not leaf_hashes:
        return empty_root()
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    split = 1 << ((len(leaf_hashes) - 1).bit_length() - 1)
    return node_hash(_tree_hash(leaf_hashes[:split]), _tree_hash(leaf_hashes[split:]))


def _probe_ranges(size: int) -> list[tuple[int, int]]:
    """The whole tree, its RFC split, and ranges off the RFC alignment (§10.4: any range)."""
    ranges = [(0, size)]
    if size >= 2:
        split = 1 << ((size - 1).bit_length() - 1)
        ranges += [(0, split), (split, size), (1, size), (0, size - 1)]
    if size >= 4:
        ranges += [(1, size - 1), (size // 2 - 1, size // 2 + 1)]
    return list(dict.fromkeys(ranges))


def _chunks(count: int) -> list[range]:
    return [range(i, min(i + _MAX_PER_CALL, count)) for i in range(0, count, _MAX_PER_CALL)]


def _totals(
    statement: reconciliation_pb2.ReconciliationStatement,
) -> dict[str, tuple[Decimal, ...]]:
    order = [t.asset_id.encode("utf-8") for t in statement.totals]
    check(
        all(a < b for a, b in pairwise(order)) and all(order),
        "totals are not ordered bytewise by asset_id, each once",
        expected="strictly increasing non-empty asset ids (§10.2)",
        got=[t.asset_id for t in statement.totals],
    )
    return {
        t.asset_id: tuple(
            Decimal(_canonical(getattr(t, name), f"totals[{t.asset_id}].{name}"))
            for name in _AMOUNTS
        )
        for t in statement.totals
    }


# ------------------------------------------------------------------ cases


@REGISTRY.case(
    "reconciliation/statement-signed-for-cutoff",
    Level.MUST,
    "the statement of a passed cut-off is signed by the server, addressed to a regulator, names that cut-off and the server's role, and is well formed",
    roles=_PARTIES,
    clauses=("§10.2/party-role-stated",),
)
async def statement_signed(ctx: CaseContext) -> None:
    cutoff = await _pass_cutoff(ctx)
    envelope, statement = await _statement(ctx, cutoff)
    regulators = sorted(
        {k.party_id for k in ctx.registry if k.role == _ROLE.PARTY_ROLE_REGULATOR}
        & set(statement.header.audience)
    )
    check(
        bool(regulators),
        "the statement is not addressed to a regulator",
        expected="an audience naming a party with a registered regulator key (§10.2)",
        got=list(statement.header.audience),
    )
    verified = sdk_check(
        "the reconciliation statement",
        verify_statement,
        envelope,
        ctx.registry,
        expected_type=reconciliation_pb2.ReconciliationStatement,
        audience=regulators[0],
        now=await ctx.server_now(),
    )
    check_equal("issuer of the statement", ctx.server_party_id, verified.issuer)
    check_equal(
        "party_role of the statement",
        role_name(party_role(ctx.role)),
        role_name(statement.party_role),
    )
    check_equal("cutoff_time of the statement", cutoff, statement.cutoff_time.ToDatetime(UTC))
    issued = statement.header.issued_at.ToDatetime(UTC)
    check(
        issued >= cutoff,
        "the statement was issued before its cut-off",
        expected=f">= {cutoff.isoformat()}",
        got=issued.isoformat(),
    )
    check_equal(
        "sync_log_heads directions (both, ordered by direction number)",
        [CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN],
        [head.direction for head in statement.sync_log_heads],
    )
    for head in statement.sync_log_heads:
        check_equal(f"entry_hash length of head {head.direction}", HASH_SIZE, len(head.entry_hash))
    check_equal("positions_root length", HASH_SIZE, len(statement.positions_root))
    if statement.account_count == 0:
        check_equal("positions_root of no accounts", empty_root(), statement.positions_root)
    _totals(statement)


@REGISTRY.case(
    "reconciliation/statement-frozen",
    Level.MUST,
    "GetReconciliationStatement returns the same bytes on every call, and the tree keeps the signed root after the positions change",
    roles=_PARTIES,
)
async def statement_frozen(ctx: CaseContext) -> None:
    cutoff = await _pass_cutoff(ctx)
    first, statement = await _statement(ctx, cutoff)
    if ctx.role is Role.CUSTODIAN and ctx.config.account_id:
        # After the cut-off the live view moves; the frozen one must not.
        held, _, _ = await holdings(ctx, ctx.config.account_id)
        if held.positions:
            await ctx.control(
                ctx.test_control.deposit,
                test_control_pb2.DepositRequest(
                    account_id=ctx.config.account_id,
                    asset_id=held.positions[0].asset_id,
                    quantity=common_pb2.Decimal(value="1"),
                ),
            )
    await ctx.advance_clock(timedelta(minutes=1))
    again, _ = await _statement(ctx, cutoff)
    check(
        first.SerializeToString() == again.SerializeToString(),
        "the statement returned again differs from the first (§10.2: the same bytes thereafter)",
        expected=describe(first),
        got=describe(again),
    )
    if statement.account_count:
        hashes, _ = await _answered(ctx, statement.cutoff_id, [(0, statement.account_count)])
        check_equal(
            "hash of [0, account_count) after the positions changed",
            statement.positions_root.hex(),
            hashes[0].hex(),
        )


#: Uneven deposits, one just before the cut-off and one just after: each shows on its own.
_DEPOSIT_BEFORE = "0.000000001234567891"
_DEPOSIT_AFTER = "0.000000019876543219"
_SECOND = timedelta(seconds=1)
#: The kit wants a cut-off at least this far ahead, to place a deposit one second before it.
_CUTOFF_LEAD = timedelta(seconds=5)


async def _deposit(ctx: CaseContext, account_id: str, asset_id: str, quantity: str) -> None:
    await ctx.control(
        ctx.test_control.deposit,
        test_control_pb2.DepositRequest(
            account_id=account_id,
            asset_id=asset_id,
            quantity=common_pb2.Decimal(value=quantity),
        ),
    )


def _issued(statement: attestation_pb2.HoldingsStatement) -> datetime:
    issued: datetime = statement.header.issued_at.ToDatetime(tzinfo=UTC)
    return issued


async def _latest_at(
    ctx: CaseContext,
    cutoff: datetime,
    before: tuple[attestation_pb2.HoldingsStatement, attestation_pb2.AttestationRef],
    after: tuple[attestation_pb2.HoldingsStatement, attestation_pb2.AttestationRef],
) -> attestation_pb2.HoldingsStatement:
    """The account's latest holdings statement issued at or before ``cutoff`` (§10.2).

    ``before`` was issued at or before the cut-off and ``after`` after it; the
    statements the custodian issued for the account between the two, if any,
    are read from the attestation log (as a regulator when the kit can be one).
    """
    latest, ref = before
    last, last_ref = after
    if last.epoch == latest.epoch + 1:
        return latest
    reader = ctx.auditor
    for index in range(ref.leaf_index + 1, last_ref.leaf_index):
        outcome = await ctx.rpc(
            reader.custodian.get_inclusion_proof,
            custodian_service_pb2.GetInclusionProofRequest(
                leaf_index=index, tree_size=last_ref.tree_size
            ),
            label=f"GetInclusionProof of leaf {index}",
        )
        if outcome.code == grpc.StatusCode.PERMISSION_DENIED:
            continue  # another party's account, which this identity may not read
        response: custodian_service_pb2.GetInclusionProofResponse = expect_ok(outcome)
        leaf = verify_leaf(ctx, response.holdings_statement)
        if (
            leaf.account_id == latest.account_id
            and leaf.epoch > latest.epoch
            and _issued(leaf) <= cutoff
        ):
            latest = leaf
    return latest


async def _account_index(
    ctx: CaseContext, statement: reconciliation_pb2.ReconciliationStatement, account_id: str
) -> int:
    """The leaf index of ``account_id`` in the statement's tree: accounts are sorted (§10.3)."""
    wanted = account_id.encode("utf-8")
    low, high = 0, statement.account_count
    while low < high:
        middle = (low + high) // 2
        _, [found] = await _answered(ctx, statement.cutoff_id, indexes=[middle])
        have = found.account_id.encode("utf-8")
        if have == wanted:
            return middle
        if have < wanted:
            low = middle + 1
        else:
            high = middle
    raise CaseFailure(
        f"the view of {statement.cutoff_id} has no account {account_id!r}",
        expected=f"{account_id} among the {statement.account_count} accounts, pledged to the "
        "exchange before the cut-off",
        got="not found by its place in account_id order",
    )


def _view_positions(positions: Sequence[common_pb2.Position]) -> dict[str, tuple[str, ...]]:
    """asset -> (quantity, locked, pledged), canonical text."""
    return {
        p.asset_id: tuple(
            format_amount(parse_amount(getattr(p, name).value or "0")) for name in _AMOUNTS
        )
        for p in positions
    }


async def _depositable(ctx: CaseContext) -> tuple[str, str]:
    """The kit's pledged account and an asset it holds, which test control can deposit more of."""
    account_id = await ensure_pledged(ctx)
    held, _, _ = await holdings(ctx, account_id)
    if not held.positions:
        raise CaseSkipped(f"account {account_id!r} holds no asset the kit could deposit")
    return account_id, held.positions[0].asset_id


@REGISTRY.case(
    "reconciliation/view-frozen-at-cutoff",
    Level.MUST,
    "one second before a cut-off its statement is refused (FAILED_PRECONDITION STATE_CONFLICT); "
    "after it, the view holds each account's positions of its latest holdings statement issued "
    "at or before the cut-off: a deposit one second before it is in the view, one made one second "
    "after it, before the statement is asked for, is not (§10.2)",
    roles=[Role.CUSTODIAN],
)
async def view_frozen_at_cutoff(ctx: CaseContext) -> None:
    account_id, asset_id = await _depositable(ctx)
    now = await ctx.advance_clock(timedelta(0))  # skips the case without test control
    cutoff = _next_cutoff(now + _CUTOFF_LEAD)

    await ctx.advance_clock(cutoff - _SECOND - now)
    await _deposit(ctx, account_id, asset_id, _DEPOSIT_BEFORE)
    before, _, before_ref = await holdings(ctx, account_id)
    check(
        _issued(before) <= cutoff,
        "the deposit made one second before the cut-off was attested after it",
        expected=f"issued_at <= {cutoff.isoformat()}",
        got=_issued(before).isoformat(),
    )
    # Not yet the cut-off: no statement of it (§10.2).
    expect_status(
        await _ask_statement(ctx, _cutoff_id(cutoff)),
        grpc.StatusCode.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATE_CONFLICT,
    )

    await ctx.advance_clock(cutoff + _SECOND - await ctx.server_now())
    await _deposit(ctx, account_id, asset_id, _DEPOSIT_AFTER)
    after, _, after_ref = await holdings(ctx, account_id)
    check(
        _issued(after) > cutoff,
        "the deposit made one second after the cut-off was attested at or before it",
        expected=f"issued_at > {cutoff.isoformat()}",
        got=_issued(after).isoformat(),
    )
    expected = await _latest_at(ctx, cutoff, (before, before_ref), (after, after_ref))

    _, statement = await _statement(ctx, cutoff)
    index = await _account_index(ctx, statement, account_id)
    _, [account] = await _answered(ctx, statement.cutoff_id, indexes=[index])
    check_equal(
        f"positions of {account_id} in the view of {statement.cutoff_id} (asset: quantity, "
        f"locked, pledged): those of its holdings statement of epoch {expected.epoch}, the latest "
        f"issued at or before the cut-off (deposits: {_DEPOSIT_BEFORE} {asset_id} one second "
        f"before, {_DEPOSIT_AFTER} one second after)",
        _view_positions(expected.positions),
        _view_positions(account.positions),
    )


# ------------------------------------------------------------------ sync log heads at the cut-off

#: How far after the cut-off the kit issues the batch it sends while the custodian's clock is
#: still one second before it: an exchange whose clock runs ahead, well within the skew
#: (§3.6 f, 30 s by default).
_AHEAD = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class _Batch:
    """A batch of one direction as the kit saw it: when it was issued, and its last entry."""

    issued_at: datetime
    sequence: int
    entry_hash: bytes


def _head_at(cutoff: datetime, start: _Batch, batches: Sequence[_Batch]) -> _Batch:
    """The last entry contained in a batch issued at or before ``cutoff`` (§10.2)."""
    return max((b for b in (start, *batches) if b.issued_at <= cutoff), key=lambda b: b.sequence)


def _batch_issued_at(envelope: envelope_pb2.Envelope) -> datetime:
    # Only called on a batch verified_entries accepted.
    batch = position_sync_pb2.SyncBatch.FromString(envelope.payload)
    issued: datetime = batch.header.issued_at.ToDatetime(tzinfo=UTC)
    return issued


@dataclass
class _KitExchange:
    """The kit as the exchange on one SyncPositions stream, keeping every batch of both ways.

    Each of the custodian's batches is verified, acknowledged and noted with its
    ``issued_at``; each of the kit's own is noted once the custodian acknowledged it.
    """

    ctx: CaseContext
    stream: SyncStream
    #: The custodian's entries as the kit receives them (the stream starts from sequence 1).
    received: list[_Batch] = field(default_factory=list)
    #: The kit's batches the custodian acknowledged.
    sent: list[_Batch] = field(default_factory=list)
    #: Where the custodian stood in the kit's log before this stream (its hello).
    sent_before: _Batch = field(init=False)
    _acked: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        hello = self.stream.hello
        # Entries the custodian held already came in batches issued before the case.
        self.sent_before = _Batch(
            datetime.min.replace(tzinfo=UTC), hello.received_sequence, hello.received_entry_hash
        )
        self._acked = hello.received_sequence

    @property
    def received_sequence(self) -> int:
        return self.received[-1].sequence if self.received else 0

    async def _read(self, done: Callable[[], bool], waiting_for: str) -> None:
        """Handle the custodian's frames until ``done()``; _Ended if it ends the stream."""
        while not done():
            try:
                frame = await self.stream.frame_of(("batch", "ack", "close"))
            except StreamEnded as end:
                info = end.outcome.error_info
                raise _Ended(
                    info.reason if info is not None else "",
                    f"{end.outcome.code.name} {end.outcome.message}".strip(),
                ) from None
            if frame is None:
                raise CaseFailure(
                    f"the custodian sent nothing while the kit waited for {waiting_for}",
                    expected=waiting_for,
                    got="no batch or ack within 5 s",
                )
            kind = frame.WhichOneof("frame")
            if kind == "close":
                code = frame.close.reason
                known = code in errors_pb2.ErrorReason.values()
                reason = errors_pb2.ErrorReason.Name(code) if known else str(code)
                raise _Ended(reason.removeprefix("ERROR_REASON_"), str(describe(frame.close)))
            if kind == "ack":
                self._acked = max(self._acked, frame.ack.sequence)
                continue
            entries = await verified_entries(self.ctx, frame.batch)
            last = entries[-1]
            self.received.append(
                _Batch(_batch_issued_at(frame.batch), last.sequence, last.entry_hash)
            )
            await self.stream.ack(last)

    async def _receive(self, done: Callable[[], bool], waiting_for: str) -> None:
        try:
            await self._read(done, waiting_for)
        except _Ended as ended:
            raise CaseFailure(
                f"the custodian ended the stream while the kit waited for {waiting_for}",
                expected=waiting_for,
                got=ended.got,
            ) from None

    async def receive_through(self, sequence: int, what: str) -> None:
        """Read the custodian's batches until one holds ``sequence``."""
        await self._receive(lambda: self.received_sequence >= sequence, what)

    async def receive_issued_after(self, cutoff: datetime, what: str) -> None:
        """Read the custodian's batches until one issued after ``cutoff`` came."""
        await self._receive(
            lambda: bool(self.received) and self.received[-1].issued_at > cutoff, what
        )

    async def send(self, issued_at: datetime | None = None) -> _Batch:
        """Send one harmless entry in a batch of its own; return it once acknowledged."""
        ctx = self.ctx
        signer = ctx.key(_ROLE.PARTY_ROLE_EXCHANGE)
        head = self.sent[-1] if self.sent else self.sent_before
        envelope, hashes = await kit_batch(
            ctx,
            signer,
            head.sequence + 1,
            head.entry_hash,
            [await kit_update(ctx, signer)],
            issued_at=issued_at,
        )
        batch = _Batch(_batch_issued_at(envelope), head.sequence + 1, hashes[0])
        await self.stream.send(position_sync_pb2.SyncFrame(batch=envelope))
        acknowledged = f"SyncAck(sequence={batch.sequence})"
        try:
            await self._read(lambda: self._acked >= batch.sequence, acknowledged)
        except _Ended as ended:
            if issued_at is not None and ended.reason == "STATEMENT_NOT_YET_VALID":
                raise CaseSkipped(
                    f"the custodian refused a batch issued {_AHEAD.total_seconds() * 1000:g} ms "
                    "after the cut-off while its clock was about a second before it (its "
                    "clock skew is under a second): the kit cannot place an entry after the "
                    "cut-off before the custodian reaches it"
                ) from None
            raise CaseFailure(
                "the custodian ended the stream after the kit's batch",
                sent=str(describe(envelope)),
                expected=acknowledged,
                got=ended.got,
            ) from None
        self.sent.append(batch)
        ctx.session.sync_sent = max(ctx.session.sync_sent, batch.sequence)
        return batch


class _Ended(Exception):  # noqa: N818 (the custodian ended the stream, not a bug)
    """The custodian's SyncClose or end of the call: its ErrorInfo reason (no prefix), and what came."""

    def __init__(self, reason: str, got: str) -> None:
        super().__init__(got)
        self.reason = reason
        self.got = got


def _shown(batches: Sequence[_Batch], cutoff: datetime) -> str:
    """The last few batches of a direction, for a failure message."""
    return ", ".join(
        f"{b.sequence} issued {'after' if b.issued_at > cutoff else 'by'} the cut-off "
        f"({b.issued_at.isoformat()})"
        for b in batches[-4:]
    )


@REGISTRY.case(
    "reconciliation/sync-heads-at-cutoff",
    Level.MUST,
    "the statement's sync log heads are, each way, the last entry of a batch issued at or "
    "before the cut-off (§10.2), not the heads held when it is built: the kit, as the "
    "exchange, has entries flow both ways one second before the cut-off, in a batch it issues "
    "just after the cut-off while the custodian's clock is still before it, and one second "
    "after it before the statement is asked for",
    roles=[Role.CUSTODIAN],
)
async def sync_heads_at_cutoff(ctx: CaseContext) -> None:
    account_id, asset_id = await _depositable(ctx)
    ctx.key(_ROLE.PARTY_ROLE_EXCHANGE)  # skips the case without the kit's exchange key
    now = await ctx.advance_clock(timedelta(0))  # skips the case without test control
    cutoff = _next_cutoff(now + _CUTOFF_LEAD)
    stream = await SyncStream.open(ctx)
    kit = _KitExchange(ctx, stream)
    try:
        # The custodian's log so far, replayed from sequence 1 before the cut-off.
        await kit.receive_through(
            stream.hello.sent_sequence, f"the custodian's log up to {stream.hello.sent_sequence}"
        )
        await ctx.advance_clock(max(cutoff - _SECOND - await ctx.server_now(), timedelta(0)))
        # One second before the cut-off: an entry each way.
        await _deposit(ctx, account_id, asset_id, _DEPOSIT_BEFORE)
        await kit.receive_through(
            kit.received_sequence + 1, "the entry of a deposit one second before the cut-off"
        )
        await kit.send()
        # The kit's clock runs ahead: a batch issued after the cut-off, which the custodian
        # stores while its own clock is still before it.
        await kit.send(issued_at=cutoff + _AHEAD)
        # One second after the cut-off, before the statement is asked for: an entry each way.
        await ctx.advance_clock(max(cutoff + _SECOND - await ctx.server_now(), timedelta(0)))
        await _deposit(ctx, account_id, asset_id, _DEPOSIT_AFTER)
        await kit.receive_issued_after(
            cutoff, "a batch issued after the cut-off (a deposit one second after it)"
        )
        await kit.send()
    finally:
        await stream.close()

    _, statement = await _statement(ctx, cutoff)
    stated = {int(head.direction): head for head in statement.sync_log_heads}
    start = _Batch(datetime.min.replace(tzinfo=UTC), 0, ZERO_HASH)
    for direction, name, batches, before in (
        (CUSTODIAN_TO_EXCHANGE, "CUSTODIAN_TO_EXCHANGE", kit.received, start),
        (EXCHANGE_TO_CUSTODIAN, "EXCHANGE_TO_CUSTODIAN", kit.sent, kit.sent_before),
    ):
        expected = _head_at(cutoff, before, batches)
        head = stated.get(direction)
        check(
            head is not None,
            f"the statement of {statement.cutoff_id} has no {name} head",
            expected="both directions in sync_log_heads",
            got=str([h.direction for h in statement.sync_log_heads]),
        )
        assert head is not None
        check_equal(
            f"sync_log_heads {name} of {statement.cutoff_id} (sequence, entry hash): the last "
            f"entry of a batch issued at or before the cut-off, of the batches ending at "
            f"{_shown(batches, cutoff)}",
            (expected.sequence, expected.entry_hash.hex()),
            (head.sequence, head.entry_hash.hex()),
        )


@REGISTRY.case(
    "reconciliation/tree-nodes-recompute-root",
    Level.MUST,
    "GetPositionTreeNodes: accounts encode (§10.3) to leaves whose RFC 9162 hashes, and any range's, recompute the signed positions_root; their positions sum to the totals",
    roles=_PARTIES,
    clauses=("§10.4/any-range",),
)
async def tree_nodes_recompute_root(ctx: CaseContext) -> None:
    cutoff = await _pass_cutoff(ctx)
    _, statement = await _statement(ctx, cutoff)
    size = statement.account_count
    if size == 0:
        check_equal("positions_root of no accounts", empty_root(), statement.positions_root)
        raise CaseSkipped("the server's view at the cut-off holds no account: no tree to read")
    leaf_hashes: list[bytes] = []
    accounts: list[reconciliation_pb2.AccountPositions] = []
    for chunk in _chunks(size):
        hashes, found = await _answered(
            ctx, statement.cutoff_id, [(i, i + 1) for i in chunk], list(chunk)
        )
        leaf_hashes += hashes
        accounts += found
    ids = [a.account_id.encode("utf-8") for a in accounts]
    check(
        all(a < b for a, b in pairwise(ids)),
        "accounts are not in bytewise account_id order, each once",
        expected="strictly increasing account ids (§10.3)",
        got=[a.account_id for a in accounts],
    )
    sums: dict[str, list[Decimal]] = {}
    for index, (account, served) in enumerate(zip(accounts, leaf_hashes, strict=True)):
        check_equal(
            f"hash of leaf {index} ({account.account_id}) against its positions",
            leaf_hash(_position_leaf(account)).hex(),
            served.hex(),
        )
        for position in account.positions:
            total = sums.setdefault(position.asset_id, [Decimal(0)] * len(_AMOUNTS))
            for i, name in enumerate(_AMOUNTS):
                total[i] += Decimal(getattr(position, name).value)
    check_equal(
        "RFC 9162 root of the served leaves against positions_root",
        statement.positions_root.hex(),
        _tree_hash(leaf_hashes).hex(),
    )
    probes = _probe_ranges(size)
    hashes, _ = await _answered(ctx, statement.cutoff_id, probes)
    for (start, end), served in zip(probes, hashes, strict=True):
        check_equal(
            f"hash of range [{start}, {end}) against its leaves",
            _tree_hash(leaf_hashes[start:end]).hex(),
            served.hex(),
        )
    check_equal(
        "totals (quantity, locked, pledged) against the sums of the accounts' positions",
        {asset: tuple(values) for asset, values in sorted(sums.items())},
        _totals(statement),
    )


@REGISTRY.case(
    "reconciliation/statement-before-cutoff-refused",
    Level.MUST,
    "GetReconciliationStatement for a cut-off not yet reached: FAILED_PRECONDITION STATE_CONFLICT",
    roles=_PARTIES,
)
async def statement_before_cutoff(ctx: CaseContext) -> None:
    upcoming = _unreached_cutoff(await ctx.server_now())
    expect_status(
        await _ask_statement(ctx, _cutoff_id(upcoming)),
        grpc.StatusCode.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATE_CONFLICT,
    )


@REGISTRY.case(
    "reconciliation/malformed-cutoff-id-refused",
    Level.MUST,
    "GetReconciliationStatement with a cutoff_id that is not RFC 3339 UTC with Z: INVALID_ARGUMENT MALFORMED naming cutoff_id",
    roles=_PARTIES,
    clauses=("§10.1/cutoff-id-on-schedule",),
)
async def malformed_cutoff_id(ctx: CaseContext) -> None:
    for cutoff_id in _MALFORMED_IDS:
        expect_status(
            await _ask_statement(ctx, cutoff_id),
            grpc.StatusCode.INVALID_ARGUMENT,
            _R.ERROR_REASON_MALFORMED,
            field_violation="cutoff_id",
        )


def _expect_off_schedule(outcome: Outcome) -> None:
    """INVALID_ARGUMENT MALFORMED naming cutoff_id, in ErrorInfo and BadRequest (§10.1, §12.2)."""
    expect_status(
        outcome,
        grpc.StatusCode.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        field_violation="cutoff_id",
        metadata_field="cutoff_id",
    )


@REGISTRY.case(
    "reconciliation/unscheduled-cutoff-refused",
    Level.MUST,
    "a well-formed cutoff_id whose time of day is on no schedule (hh:17:23, a day back and two "
    "days ahead) is refused by GetReconciliationStatement and GetPositionTreeNodes alike: "
    "INVALID_ARGUMENT MALFORMED, field cutoff_id; the scheduled cut-off beside the one ahead is "
    "not refused as ill-formed (§10.1)",
    roles=_PARTIES,
    clauses=("§10.1/cutoff-id-on-schedule",),
)
async def unscheduled_cutoff(ctx: CaseContext) -> None:
    now = await ctx.server_now()
    passed = _next_cutoff(now - timedelta(days=1))
    upcoming = _unreached_cutoff(now)
    for scheduled in (passed, upcoming):
        cutoff_id = _cutoff_id(scheduled + _OFF_SCHEDULE)
        _expect_off_schedule(await _ask_statement(ctx, cutoff_id, f"off schedule: {cutoff_id}"))
        _expect_off_schedule(await _nodes(ctx, cutoff_id, [(0, 1)], [0]))
    # The other side of the rule: a scheduled cut-off not yet reached is well formed, only
    # not stated yet (asking for one that passed would have the server state it).
    cutoff_id = _cutoff_id(upcoming)
    for outcome in (await _ask_statement(ctx, cutoff_id), await _nodes(ctx, cutoff_id, [(0, 1)])):
        check(
            outcome.code != grpc.StatusCode.INVALID_ARGUMENT,
            f"{outcome.rpc}: the scheduled cut-off {cutoff_id} was refused as ill-formed",
            expected="not INVALID_ARGUMENT: a cut-off not reached yet is STATE_CONFLICT or "
            "NOT_FOUND",
            got=outcome.summary(),
        )


@REGISTRY.case(
    "reconciliation/tree-nodes-unknown-cutoff-not-found",
    Level.MUST,
    "GetPositionTreeNodes for a cut-off the server never stated: NOT_FOUND, no nodes",
    roles=_PARTIES,
)
async def tree_nodes_unknown_cutoff(ctx: CaseContext) -> None:
    upcoming = _cutoff_id(_unreached_cutoff(await ctx.server_now()))
    expect_status(
        await _nodes(ctx, upcoming, [(0, 1)], [0]),
        grpc.StatusCode.NOT_FOUND,
        _R.ERROR_REASON_NOT_FOUND,
    )


@REGISTRY.case(
    "reconciliation/tree-nodes-range-out-of-range-refused",
    Level.MUST,
    "GetPositionTreeNodes with a range beyond account_count, empty or reversed, or a leaf index beyond it: OUT_OF_RANGE, the whole call",
    roles=_PARTIES,
)
async def tree_nodes_out_of_range(ctx: CaseContext) -> None:
    cutoff = await _pass_cutoff(ctx)
    _, statement = await _statement(ctx, cutoff)
    size = statement.account_count
    valid = [(0, size)] if size else []
    for ranges, indexes in (
        ([*valid, (0, size + 1)], []),
        ([(size, size + 1)], []),
        ([*valid, (0, 0)], []),
        ([(1, 0)], []),
        (valid, [size]),
    ):
        expect_status(
            await _nodes(ctx, statement.cutoff_id, ranges, indexes),
            grpc.StatusCode.OUT_OF_RANGE,
            _R.ERROR_REASON_OUT_OF_RANGE,
        )


@REGISTRY.case(
    "reconciliation/tree-nodes-limit-exceeded",
    Level.MUST,
    "GetPositionTreeNodes answers 4096 ranges, and refuses 4097 ranges or account indexes: RESOURCE_EXHAUSTED LIMIT_EXCEEDED",
    roles=_PARTIES,
)
async def tree_nodes_limit(ctx: CaseContext) -> None:
    cutoff = await _pass_cutoff(ctx)
    _, statement = await _statement(ctx, cutoff)
    if statement.account_count == 0:
        raise CaseSkipped("the server's view at the cut-off holds no account: no range to ask")
    await _answered(ctx, statement.cutoff_id, [(0, 1)] * _MAX_PER_CALL)
    for ranges, indexes in (([(0, 1)] * (_MAX_PER_CALL + 1), []), ([], [0] * (_MAX_PER_CALL + 1))):
        expect_status(
            await _nodes(ctx, statement.cutoff_id, ranges, indexes),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _R.ERROR_REASON_LIMIT_EXCEEDED,
        )


# ------------------------------------------------------------------ the exchange waits for its custodian

#: How long the kit waits for a frame it expects on the stream it holds.
_FRAME_TIMEOUT = 5.0
#: What the kit's custodian holds of the account it opens at the cut-off: uneven, so that
#: the exchange's view shows it as it is.
_WAIT_HOLDINGS = {"USDC": "1234.000000000000000789"}


@dataclass
class _HeldStream:
    """The exchange's SyncPositions call, held by the kit as its custodian, whose times the
    case chooses: heartbeats are stamped ``min(kit.now(), until)`` while ``until`` is set."""

    kit: KitCustodian
    until: datetime | None = None
    stream: RawStream = field(init=False)

    def stamp(self) -> datetime:
        now = self.kit.now()
        return now if self.until is None else min(now, self.until)

    async def heartbeat(self, sent_at: datetime) -> None:
        await send_heartbeat(self.kit, self.stream, sent_at)

    async def send_log(self, ctx: CaseContext, issued_at: datetime) -> _Batch:
        """Send the kit's log from the exchange's received head to its end, in one batch
        issued at ``issued_at``; return its last entry once the exchange acknowledged it."""
        kit = self.kit
        held = self.stream.hello.received_sequence
        head = kit.sync_log.sent_head()
        batch = position_sync_pb2.SyncBatch(direction=CUSTODIAN_TO_EXCHANGE)  # type: ignore[arg-type]
        for sequence in range(held + 1, head.sequence + 1):
            entry = kit.sync_log.outgoing_entry(sequence)
            assert entry is not None  # sequence <= head
            batch.entries.add().CopyFrom(entry)
        envelope = await ctx.sign(
            batch,
            kit.signer,
            audience=[kit.exchange_id],
            sequence=head.sequence,
            issued_at=issued_at,
        )
        await self.stream.send(position_sync_pb2.SyncFrame(batch=envelope))
        frame = await self.stream.frame_of(("ack", "close"), _FRAME_TIMEOUT)
        check(
            frame is not None and frame.WhichOneof("frame") == "ack",
            f"the exchange did not acknowledge the kit's batch issued at {issued_at.isoformat()} "
            "(§6.5 step 7)",
            expected=f"SyncAck(sequence={head.sequence})",
            got=describe(frame) if frame is not None else "no ack",
        )
        assert frame is not None
        check_equal("acknowledged sequence", head.sequence, frame.ack.sequence)
        check_equal("acknowledged entry hash", head.entry_hash.hex(), frame.ack.entry_hash.hex())
        return _Batch(issued_at, head.sequence, head.entry_hash)


@asynccontextmanager
async def _held_stream(ctx: CaseContext, kit: KitCustodian) -> AsyncIterator[_HeldStream]:
    """Take the exchange's stream from the kit's session and hold the next call, its
    heartbeats stamped by the case's capped clock. Given back on exit."""
    held = _HeldStream(kit)
    async with held_stream(ctx, kit, stamp=held.stamp) as stream:
        held.stream = stream
        yield held


async def _expect_unstated(ctx: CaseContext, cutoff: datetime, when: str) -> None:
    """The exchange refuses the statement of ``cutoff``: no custodian frame issued after it
    has arrived (§10.2). ``when`` says what has, for a failure."""
    outcome = await _ask_statement(
        ctx, _cutoff_id(cutoff), f"{when}; no custodian frame issued after the cut-off yet"
    )
    expect_status(outcome, grpc.StatusCode.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)


@REGISTRY.case(
    "reconciliation/exchange-waits-for-custodian-past-cutoff",
    Level.MUST,
    "an exchange states a cut-off only once its custodian's stream is past it (§10.2): the kit, "
    "as its custodian, holds the stream while the exchange's clock passes the cut-off; the "
    "statement is refused (FAILED_PRECONDITION STATE_CONFLICT) with no frame after the cut-off "
    "and after a batch issued one second before it (a new account's holdings), and once a "
    "heartbeat issued one second after it arrives it is built, its custodian-to-exchange head "
    "that batch's last entry and its view holding the account",
    roles=[Role.EXCHANGE],
)
async def exchange_waits_for_custodian(ctx: CaseContext) -> None:
    kit = ctx.counterpart  # skips the case without --listen
    client = ctx.key(_ROLE.PARTY_ROLE_CLIENT)  # skips the case without the client's key
    await ctx.advance_clock(timedelta(0))  # skips the case without test control
    async with _held_stream(ctx, kit) as held:
        # Every frame the kit sent before is stamped before this cut-off.
        cutoff = _next_cutoff(await ctx.server_now() + _CUTOFF_LEAD)
        held.until = cutoff - _SECOND
        account_id = ctx.unique("kit-recon")
        change, _ = kit.holdings_change(account_id, client, dict(_WAIT_HOLDINGS), epoch=1)
        holdings_statement = attestation_pb2.HoldingsStatement.FromString(
            change.holdings_statement.payload
        )
        kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))

        # The exchange's clock one second past the cut-off; the kit's frames are not.
        await ctx.advance_clock(cutoff + _SECOND - await ctx.server_now())
        await _expect_unstated(
            ctx,
            cutoff,
            "the exchange's clock one second past the cut-off, the custodian's frames all "
            f"stamped at or before {held.until.isoformat()}",
        )
        # A batch issued before the cut-off, received after it: part of the view, but it
        # says nothing of what the custodian issued after the cut-off.
        batch = await held.send_log(ctx, cutoff - _SECOND)
        await _expect_unstated(
            ctx,
            cutoff,
            f"after the custodian's batch issued at {batch.issued_at.isoformat()}, one second "
            "before the cut-off, was acknowledged",
        )
        # A heartbeat issued after the cut-off: everything issued by it has arrived.
        held.until = cutoff + _SECOND
        await held.heartbeat(held.until)
        _, statement = await _statement(ctx, cutoff)

    stated = {int(head.direction): head for head in statement.sync_log_heads}
    head = stated.get(CUSTODIAN_TO_EXCHANGE)
    check(
        head is not None,
        f"the statement of {statement.cutoff_id} has no CUSTODIAN_TO_EXCHANGE head",
        expected="both directions in sync_log_heads",
        got=str([h.direction for h in statement.sync_log_heads]),
    )
    assert head is not None
    check_equal(
        f"sync_log_heads CUSTODIAN_TO_EXCHANGE of {statement.cutoff_id} (sequence, entry hash): "
        "the last entry of the kit's batch issued one second before the cut-off, which arrived "
        "after it and before the heartbeat that let the exchange state it (§10.2)",
        (batch.sequence, batch.entry_hash.hex()),
        (head.sequence, head.entry_hash.hex()),
    )
    index = await _account_index(ctx, statement, account_id)
    _, [account] = await _answered(ctx, statement.cutoff_id, indexes=[index])
    check_equal(
        f"positions of {account_id} in the view of {statement.cutoff_id} (asset: quantity, "
        "locked, pledged): those of its holdings statement issued before the cut-off, which "
        "came in that batch",
        _view_positions(holdings_statement.positions),
        _view_positions(account.positions),
    )
