"""Liquidation executed at the custodian (docs/PROTOCOL.md §9, §5.8): along the path, yield first.

The kit plays the account's client and its exchange. The client pledges two
assets of ``--account``, in uneven quantities, under one ``LiquidationPath`` of
two steps whose maxima are below what is pledged of each asset. The exchange
publishes its risk policy on the sync stream (§7.1) and instructs a
liquidation whose signed inputs — that policy, a price snapshot and the
custodian's latest holdings statement — recompute with the SDK to a ratio
below the liquidation line, for the whole exposure, which the path cannot
raise (§9.2). The receipt must then show the execution §9.3 prescribes, to
the last digit: accrued yield paid out, each step sold in order and in full
up to its maximum, proceeds rounded down, the rest a shortfall; and the
holdings statement after it must show exactly that, attested.

Around that execution, what the custodian must check first: the instruction
comes from the exchange that issued it (§4.5) — over RPC fresh by its own
lifetime, on the stream by its batch's (§3.6.1) —, and a margin call it names
is one the custodian received for the account, undisputed, and past its due_by
(§8.1, §9.2; the kit sends the call on the sync stream as the exchange). And
§9.3 for an amount the path can raise: the step that reaches it sells only the
least quantity that does, steps after it nothing, and a step with nothing of
its asset pledged has no fill.
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

import grpc
from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    collateral_ratio,
    margin_call_amount,
    recompute_liquidation_instruction,
    recompute_margin_call,
    validate_risk_policy,
    value_collateral,
)
from google.protobuf.message import DecodeError, Message

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    describe,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._checkpoints import expect_attested, latest_checkpoint
from collateral_sync_conformance.cases._exchange_side import (
    kit_risk_policy,
    price_snapshot,
    publish_risk_policy,
)
from collateral_sync_conformance.cases._kit_account import client_key, exchange_party, holdings
from collateral_sync_conformance.cases._raw_stream import (
    StreamEnded,
    SyncStream,
    check_ack,
    kit_batch,
    verified_entries,
)
from collateral_sync_conformance.cases._snapshots import custodian_state, expect_unchanged

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_M = TypeVar("_M", bound=Message)
_R = errors_pb2.ErrorReason
_REASON = attestation_pb2.HoldingsChangeReason
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE

#: What the client pledges of each of the two assets: uneven, and small enough for any account.
_PLEDGES = ("0.000731", "0.000587")
#: Each step's max_quantity: below its pledge, with 18 fraction digits so that
#: quantity * price has more than 18 and must be rounded (down, §2.3).
_STEP_MAXIMA = ("0.000370000000000007", "0.000290000000000003")
#: Each step's price: quantity * price is exact with 36 fraction digits, the last 18 all
#: nines, so it lies 10^-36 below an 18-digit boundary. Rounded to 28 significant digits
#: (a default decimal context) it reaches the boundary and rounds down one quantum too high:
#: only enough precision gives the right proceeds (§2.3).
_PRICES = ("1.448987142857142857", "2.111143333333333333")
_VENUES = ("conformance-otc-desk", "conformance-fund-redemption")
#: The collateral factor of the kit's policy for every asset it prices.
_FACTOR = "0.5"
#: Free quantity (quantity - locked - pledged) an asset needs before the kit pledges from it.
_ROOM = Decimal(1)
#: The Decimal limit (§2.1), and the kit policy's rounding_scale.
_SCALE = 18
#: Products and sums exactly (an inexact one would be a kit bug), and rounding once.
_EXACT = decimal.Context(prec=200, traps=[decimal.Inexact, decimal.InvalidOperation])
_ROUNDING = decimal.Context(prec=200, traps=[decimal.InvalidOperation])
_QUANTUM = Decimal(1).scaleb(-_SCALE)
_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)

#: amount-raised-part-way: the second asset is priced below 1 (a step is sold whatever its
#: price), and each asset is sold at a second venue too, after its first step.
_CHEAP_PRICE = "0.37"
_SECOND_VENUE = "conformance-second-desk"
#: What its two instructions raise beyond the steps sold in full: part of the first step's
#: worth, then part of the last step's.
_PART_OF_FIRST = Decimal("0.000234567890123457")
_PART_OF_LAST = Decimal("0.000123456789012345")
#: The margin-call cases' cure period: short, so that the clock moves little (§7.1).
_CURE_PERIOD = timedelta(minutes=2)
#: stream-instruction-fresh-by-batch: the instruction lives a minute, and the clock then moves
#: past its expiry by more than any skew a receiver may allow (5 minutes, §3.6 f).
_SHORT_LIFE = timedelta(minutes=1)
#: Between the liquidation paths one case records in turn.
_PATH_GAP = timedelta(seconds=10)
#: A top-up that records a new path (uneven, so it is never confused with a pledge).
_TOP_UP = "0.000013"
_PAST_EXPIRY = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class _Step:
    asset_id: str
    venue: str
    max_quantity: str
    price: str


@dataclass(frozen=True, slots=True)
class _Pledged:
    """The kit's account pledged under a two-step path, and the policy the exchange published."""

    account_id: str
    path_id: str
    steps: tuple[_Step, ...]
    policy: envelope_pb2.Envelope
    policy_version: int
    #: The policy's message, for the valuations the kit makes (margin calls).
    risk_policy: valuation_pb2.RiskPolicy


@dataclass(frozen=True, slots=True)
class _Instructed:
    """A signed instruction, and the holdings statement its inputs cite."""

    envelope: envelope_pb2.Envelope
    liquidation_id: str
    amount: Decimal
    before: attestation_pb2.HoldingsStatement


@dataclass(frozen=True, slots=True)
class _Executed:
    receipt_envelope: envelope_pb2.Envelope
    receipt: liquidation_pb2.LiquidationReceipt
    distributed: Mapping[str, Decimal]


# ------------------------------------------------------------------ figures


def _amount(value: common_pb2.Decimal, what: str, *, absent_is_zero: bool = False) -> Decimal:
    text = "0" if absent_is_zero and not value.value else value.value
    try:
        return parse_amount(text)
    except CollateralSyncError as err:
        raise CaseFailure(
            f"{what} is not a canonical decimal: {err.message}",
            expected="a canonical decimal (§2.1)",
            got=repr(value.value),
        ) from err


def _figures(statement: attestation_pb2.HoldingsStatement) -> dict[str, tuple[Decimal, ...]]:
    """(quantity, locked, pledged) per asset of a holdings statement."""
    return {
        p.asset_id: (
            _amount(p.quantity, f"quantity of {p.asset_id}", absent_is_zero=True),
            _amount(p.locked_quantity, f"locked_quantity of {p.asset_id}", absent_is_zero=True),
            _amount(p.pledged_quantity, f"pledged_quantity of {p.asset_id}", absent_is_zero=True),
        )
        for p in statement.positions
    }


_NONE = (Decimal(0), Decimal(0), Decimal(0))


def _text(figures: Sequence[Decimal]) -> tuple[str, ...]:
    return tuple(format_amount(f) for f in figures)


def _round_down(value: Decimal) -> Decimal:
    """RD(value, 18) (§2.3): toward zero, which for these non-negative figures is the floor."""
    return value.quantize(
        Decimal(1).scaleb(-_SCALE), rounding=decimal.ROUND_FLOOR, context=_ROUNDING
    )


# ------------------------------------------------------------------ setting up


async def _two_assets(ctx: CaseContext, statement: attestation_pb2.HoldingsStatement) -> list[str]:
    """Two assets of the account with room to pledge, depositing (test control) if it must."""
    free = {
        asset: quantity - locked - pledged
        for asset, (quantity, locked, pledged) in _figures(statement).items()
    }
    if len(free) < 2:
        raise CaseSkipped(
            f"account {statement.account_id!r} holds {len(free)} asset(s); a two-step path "
            "needs two"
        )
    chosen = sorted(free, key=lambda asset: (-free[asset], asset))[:2]
    for asset in chosen:
        if free[asset] < _ROOM:
            await ctx.control(
                ctx.test_control.deposit,
                test_control_pb2.DepositRequest(
                    account_id=statement.account_id,
                    asset_id=asset,
                    quantity=amount_to_proto(format_amount(_ROOM)),
                ),
            )
    return chosen


async def _pledge(
    ctx: CaseContext, account_id: str, asset_id: str, quantity: str, path: envelope_pb2.Envelope
) -> None:
    instruction = custodian_service_pb2.PledgeInstruction(
        account_id=account_id,
        exchange_id=exchange_party(ctx),
        asset_id=asset_id,
        quantity=amount_to_proto(quantity),
    )
    request = custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=await ctx.sign(instruction, client_key(ctx)), liquidation_path=path
    )
    expect_ok(
        await ctx.rpc(
            ctx.custodian.pledge_collateral, request, label=f"PledgeCollateral of {asset_id}"
        )
    )


async def _signed_path(
    ctx: CaseContext, account_id: str, steps: Sequence[_Step], path_id: str
) -> envelope_pb2.Envelope:
    exchange_id = exchange_party(ctx)
    path = liquidation_pb2.LiquidationPath(
        account_id=account_id,
        exchange_id=exchange_id,
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id=s.asset_id, venue=s.venue, max_quantity=amount_to_proto(s.max_quantity)
            )
            for s in steps
        ],
        proceeds_account_id=f"{exchange_id}-settlement",
    )
    return await ctx.sign(path, client_key(ctx), statement_id=path_id)


#: The path's steps, from the two assets pledged and the account's statement before the pledges.
_Layout = Callable[[Sequence[str], attestation_pb2.HoldingsStatement], list[_Step]]


def _two_steps(assets: Sequence[str], statement: attestation_pb2.HoldingsStatement) -> list[_Step]:
    """One step per asset, each below its pledge: no amount the kit asks for can be raised."""
    return [
        _Step(asset, venue, maximum, price)
        for asset, venue, maximum, price in zip(assets, _VENUES, _STEP_MAXIMA, _PRICES, strict=True)
    ]


def _two_venues_each(
    assets: Sequence[str], statement: attestation_pb2.HoldingsStatement
) -> list[_Step]:
    """The first asset at its first venue; the second, priced below 1, at a venue whose maximum
    is above all that will be pledged of it (the pledge bounds the step), then at a second
    venue (nothing will be left to sell there); the first asset at a second venue."""
    first, second = assets
    _, _, pledged = _figures(statement).get(second, _NONE)
    above_pledge = _EXACT.add(_EXACT.add(pledged, parse_amount(_PLEDGES[1])), Decimal(1))
    return [
        _Step(first, _VENUES[0], _STEP_MAXIMA[0], _PRICES[0]),
        _Step(second, _VENUES[1], format_amount(above_pledge), _CHEAP_PRICE),
        _Step(second, _SECOND_VENUE, _STEP_MAXIMA[1], _CHEAP_PRICE),
        _Step(first, _SECOND_VENUE, _STEP_MAXIMA[0], _PRICES[0]),
    ]


async def _pledge_under_path(
    ctx: CaseContext,
    *,
    layout: _Layout = _two_steps,
    factor: str = _FACTOR,
    cure_period: timedelta | None = None,
) -> _Pledged:
    """Pledge two assets under one path; publish the exchange's policy (§9.1, §7.1).

    The path's steps are ``layout``'s (by default one per asset), ``factor``
    the policy's collateral factor of each asset, ``cure_period`` replaces the
    policy's.
    """
    exchange = ctx.key(_EXCHANGE_ROLE)
    client_key(ctx)  # skips the case without a client key, before anything changes
    account_id = ctx.account()
    statement, _, _ = await holdings(ctx, account_id)
    if statement.exchange_id and statement.exchange_id != exchange_party(ctx):
        raise CaseSkipped(
            f"account {account_id!r} is pledged to {statement.exchange_id!r}, not to the "
            f"kit's exchange {exchange_party(ctx)!r}"
        )
    assets = await _two_assets(ctx, statement)
    steps = layout(assets, statement)
    path_id = ctx.unique("conformance-path")
    path = await _signed_path(ctx, account_id, steps, path_id)
    # One path for both pledges: the second pledge sends the path in force again (§9.1).
    for asset, quantity in zip(assets, _PLEDGES, strict=True):
        await _pledge(ctx, account_id, asset, quantity, path)
    now = await ctx.server_now()
    policy = kit_risk_policy(ctx, now, {s.asset_id: factor for s in steps})
    if cure_period is not None:
        policy.cure_period.FromTimedelta(cure_period)
        validate_risk_policy(policy)
    envelope = await ctx.sign(policy, exchange, audience=["*"], issued_at=now)
    await publish_risk_policy(ctx, envelope)
    return _Pledged(account_id, path_id, tuple(steps), envelope, policy.version, policy)


def _unraisable_amount(
    statement: attestation_pb2.HoldingsStatement, steps: Sequence[_Step]
) -> Decimal:
    """An exposure far above what the priced, pledged assets are worth (ratio below 0.4).

    Four times their market value, plus one: the collateral value (factor 0.5)
    over it is below 0.125, and no sale along the path can raise it.
    """
    figures = _figures(statement)
    worth = Decimal(0)
    for step in steps:
        quantity, locked, pledged = figures.get(step.asset_id, _NONE)
        eligible = max(Decimal(0), min(pledged, quantity - locked))
        worth = _EXACT.add(worth, _EXACT.multiply(eligible, parse_amount(step.price)))
    four_times = _EXACT.multiply(worth, Decimal(4))
    return _EXACT.add(four_times.to_integral_value(rounding=decimal.ROUND_CEILING), Decimal(1))


async def _instruction(
    ctx: CaseContext,
    pledged: _Pledged,
    *,
    path_id: str | None = None,
    amount: Decimal | None = None,
    margin_call: margin_pb2.MarginCall | None = None,
    issued_at: datetime | None = None,
    expires_at: datetime | None = None,
    liquidation_id: str | None = None,
    cited: tuple[attestation_pb2.HoldingsStatement, envelope_pb2.Envelope] | None = None,
    sequence: int | None = None,
) -> _Instructed:
    """A liquidation instruction the custodian must find due, recomputed by the kit first (§9.2).

    By default it is for a breach, of an amount the path cannot raise. An
    ``amount`` must still be a breach (the policy's factors make it one); after
    a ``margin_call`` the amount is the call's exposure. Its inputs cite the
    account's holdings statement now, or ``cited`` (one the exchange had when it
    issued the instruction); ``liquidation_id`` reuses an id, and ``sequence``
    a header sequence.
    """
    if cited is None:
        statement, statement_envelope, _ = await holdings(ctx, pledged.account_id)
    else:
        statement, statement_envelope = cited
    now = issued_at if issued_at is not None else await ctx.server_now()
    snapshot = await price_snapshot(ctx, {s.asset_id: s.price for s in pledged.steps}, now)
    if amount is None:
        amount = (
            parse_amount(margin_call.exposure.value)
            if margin_call is not None
            else _unraisable_amount(statement, pledged.steps)
        )
    liquidation_id = liquidation_id or ctx.unique("conformance-liquidation")
    message = liquidation_pb2.LiquidationInstruction(
        liquidation_id=liquidation_id,
        account_id=pledged.account_id,
        margin_call_id=margin_call.margin_call_id if margin_call is not None else "",
        amount=amount_to_proto(format_amount(amount)),
        liquidation_path_id=pledged.path_id if path_id is None else path_id,
        risk_policy_version=pledged.policy_version,
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=pledged.policy,
            holdings_statements=[statement_envelope],
            price_snapshot=snapshot,
        ),
    )
    envelope = await ctx.sign(
        message, ctx.key(_EXCHANGE_ROLE), issued_at=now, expires_at=expires_at, sequence=sequence
    )
    # What the custodian will do with it, done by the kit first: the inputs verify as
    # evidence (the custodian's statement addressed to the exchange it is pledged to)
    # and give a breach of the liquidation line (or follow the call) for exactly this amount.
    checked_call = margin_call
    if margin_call is not None and margin_call.account_id != pledged.account_id:
        # A call of another account, cited on purpose: everything else is checked.
        checked_call = margin_pb2.MarginCall()
        checked_call.CopyFrom(margin_call)
        checked_call.account_id = pledged.account_id
    sdk_check(
        "the kit's instruction recomputed from its signed inputs (the custodian's holdings "
        "statement among them, §8.2, §9.2)",
        recompute_liquidation_instruction,
        envelope,
        ctx.registry,
        audience=ctx.server_party_id,
        now=now,
        margin_call=checked_call,
    )
    return _Instructed(envelope, liquidation_id, amount, statement)


def _request(
    instructed: _Instructed,
) -> custodian_service_pb2.SubmitLiquidationInstructionRequest:
    return custodian_service_pb2.SubmitLiquidationInstructionRequest(
        liquidation_instruction=instructed.envelope
    )


# ------------------------------------------------------------------ the exchange on the stream


async def _send_on_stream(
    ctx: CaseContext,
    updates: Sequence[position_sync_pb2.PositionUpdate],
    *,
    awaited: Callable[[position_sync_pb2.PositionUpdate], bool] | None = None,
) -> position_sync_pb2.PositionUpdate | None:
    """Send ``updates`` on SyncPositions as the kit's exchange; the custodian must acknowledge.

    The batch continues the kit's exchange-to-custodian log from the head the
    custodian's hello states (§6.2). Meanwhile the custodian's own log is read
    (from its start, each batch verified and acknowledged) for the first update
    ``awaited`` accepts, which is returned: None if the custodian falls silent
    without sending one.
    """
    signer = ctx.key(_EXCHANGE_ROLE)
    stream = await SyncStream.open(ctx)
    try:
        n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
        payloads = [update.SerializeToString() for update in updates]
        batch, hashes = await kit_batch(ctx, signer, n + 1, prev, payloads)
        last = n + len(payloads)
        await stream.send(position_sync_pb2.SyncFrame(batch=batch))
        acknowledged = False
        found: position_sync_pb2.PositionUpdate | None = None
        while not acknowledged or (awaited is not None and found is None):
            try:
                frame = await stream.next_frame()
            except StreamEnded as end:
                raise CaseFailure(
                    "the custodian ended the sync stream on the kit's batch",
                    expected=f"SyncAck(sequence={last})",
                    got=f"{end.outcome.code.name}: {end.outcome.message}",
                ) from end
            if frame is None:
                break
            kind = frame.WhichOneof("frame")
            if kind in ("ack", "close"):
                check_ack(frame, last, hashes[-1])
                acknowledged = True
            elif kind == "batch":
                entries = await verified_entries(ctx, frame.batch)
                await stream.ack(entries[-1])
                for entry in entries:
                    if found is None and awaited is not None and awaited(entry.update):
                        found = entry.update
        check(
            acknowledged,
            "the custodian did not acknowledge the kit's batch",
            expected=f"SyncAck(sequence={last})",
            got="no ack",
        )
    finally:
        await stream.close()
    ctx.session.sync_sent = max(ctx.session.sync_sent, last)
    return found


def _payload_of(
    update: position_sync_pb2.PositionUpdate, variant: str, message_class: type[_M]
) -> _M | None:
    """The (not yet verified) statement of ``update`` if it is of ``variant``."""
    if update.WhichOneof("update") != variant:
        return None
    try:
        return message_class.FromString(getattr(update, variant).payload)
    except DecodeError:
        return None


def _call_exposure(collateral_value: Decimal) -> Decimal:
    """An uneven exposure more than four times the collateral value: a ratio below 0.25."""
    four_times = _EXACT.multiply(collateral_value, Decimal(4))
    return _EXACT.add(four_times.to_integral_value(rounding=decimal.ROUND_CEILING), Decimal("1.37"))


async def _margin_call(
    ctx: CaseContext,
    pledged: _Pledged,
    *,
    account_id: str | None = None,
    overstated: bool = False,
) -> margin_pb2.MarginCall:
    """Issue a margin call on the account (§8.2) on the sync stream, as the kit's exchange.

    Its figures are recomputed by the SDK from its signed inputs first — unless
    it is ``overstated`` (its call_amount one quantum too high) or names another
    ``account_id`` than the holdings statement it cites, either of which the
    custodian must answer with a DISPUTE (§6.5, §8.2). Returns the call; its
    due_by is issued_at + the policy's cure_period.
    """
    statement, statement_envelope, _ = await holdings(ctx, pledged.account_id)
    now = await ctx.server_now()
    snapshot_envelope = await price_snapshot(ctx, {s.asset_id: s.price for s in pledged.steps}, now)
    snapshot = valuation_pb2.PriceSnapshot.FromString(snapshot_envelope.payload)
    policy = pledged.risk_policy
    value = value_collateral(
        policy, statement.positions, snapshot.prices, valued_at=now
    ).collateral_value
    exposure = _call_exposure(value)
    ratio = collateral_ratio(policy, value, exposure)
    amount = margin_call_amount(policy, value, exposure)
    # A call is due by construction (a ratio below 0.25); None would be a kit bug.
    assert ratio is not None
    assert amount is not None
    if overstated:
        amount = _EXACT.add(amount, _QUANTUM)
    call = margin_pb2.MarginCall(
        margin_call_id=ctx.unique("conformance-margin-call"),
        account_id=pledged.account_id if account_id is None else account_id,
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=pledged.policy,
            holdings_statements=[statement_envelope],
            price_snapshot=snapshot_envelope,
        ),
        risk_policy_version=pledged.policy_version,
        exposure=amount_to_proto(format_amount(exposure)),
        collateral_value=amount_to_proto(format_amount(value)),
        collateral_ratio=amount_to_proto(format_amount(ratio)),
        call_amount=amount_to_proto(format_amount(amount)),
    )
    call.due_by.FromDatetime(now + policy.cure_period.ToTimedelta())
    envelope = await ctx.sign(call, ctx.key(_EXCHANGE_ROLE), issued_at=now)
    if not overstated and account_id is None:
        sdk_check(
            "the kit's margin call recomputed from its signed inputs (§8.2)",
            recompute_margin_call,
            envelope,
            ctx.registry,
            audience=ctx.server_party_id,
            now=now,
        )
    call_id = call.margin_call_id

    def answers_it(update: position_sync_pb2.PositionUpdate) -> bool:
        response = _payload_of(update, "margin_call_response", margin_pb2.MarginCallResponse)
        return response is not None and response.margin_call_id == call_id

    answer = await _send_on_stream(
        ctx,
        [position_sync_pb2.PositionUpdate(margin_call=envelope)],
        awaited=answers_it if account_id is None else None,
    )
    if account_id is not None:
        return call  # may be answered, or rejected as a call of an account it does not hold
    response = (
        None if answer is None else await _verified_response(ctx, answer.margin_call_response)
    )
    if overstated:
        check(
            response is not None and response.kind == margin_pb2.MARGIN_CALL_RESPONSE_KIND_DISPUTE,
            "a margin call whose signed inputs do not give its call_amount (one quantum too "
            "high) must be answered with a DISPUTE on the stream (§6.5, §8.2)",
            expected="a MarginCallResponse of kind DISPUTE",
            got="no answer" if response is None else describe(response),
        )
    elif response is not None and response.kind == margin_pb2.MARGIN_CALL_RESPONSE_KIND_DISPUTE:
        raise CaseSkipped(
            f"the custodian disputes the kit's margin call, whose figures recompute "
            f"({margin_pb2.DisputeReason.Name(response.dispute_reason)}: "
            f"{response.dispute_detail}): a disputed call never expires (§8.1)"
        )
    return call


async def _verified_response(
    ctx: CaseContext, envelope: envelope_pb2.Envelope
) -> margin_pb2.MarginCallResponse:
    verified = sdk_check(
        "the custodian's margin-call response",
        verify_statement,
        envelope,
        ctx.registry,
        expected_type=margin_pb2.MarginCallResponse,
        audience=exchange_party(ctx),
        now=await ctx.server_now(),
    )
    check_equal("issuer of the margin-call response", ctx.server_party_id, verified.issuer)
    response: margin_pb2.MarginCallResponse = verified.message
    return response


async def _clock_at(ctx: CaseContext, when: datetime) -> None:
    """Move the server's clock forward to ``when`` (test control), if it is not there yet."""
    now = await ctx.advance_clock(timedelta(0))
    if when > now:
        await ctx.advance_clock(when - now)


# ------------------------------------------------------------------ checking the execution


async def _verified_receipt(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, instructed: _Instructed
) -> liquidation_pb2.LiquidationReceipt:
    verified = sdk_check(
        "the liquidation receipt",
        verify_statement,
        envelope,
        ctx.registry,
        expected_type=liquidation_pb2.LiquidationReceipt,
        audience=exchange_party(ctx),
        now=await ctx.server_now(),
    )
    check_equal("issuer of the receipt", ctx.server_party_id, verified.issuer)
    receipt: liquidation_pb2.LiquidationReceipt = verified.message
    check_equal("liquidation_id of the receipt", instructed.liquidation_id, receipt.liquidation_id)
    check_equal("account_id of the receipt", instructed.before.account_id, receipt.account_id)
    return receipt


def _round_up(value: Decimal) -> Decimal:
    """RU(value, 18) (§2.3): away from zero, which for these non-negative figures is the ceiling."""
    return value.quantize(_QUANTUM, rounding=decimal.ROUND_CEILING, context=_ROUNDING)


@dataclass(frozen=True, slots=True)
class _ExpectedFill:
    step: _Step
    quantity: Decimal
    #: Why this quantity, for the failure message.
    rule: str


def _expected_fills(
    before: attestation_pb2.HoldingsStatement, steps: Sequence[_Step], amount: Decimal
) -> list[_ExpectedFill]:
    """What §9.3 sells for ``amount``: the steps in order, each at most its max_quantity and
    what is left pledged of its asset, until the proceeds reach the amount — the step that
    reaches it selling the least quantity that does, RU(rest / price, 18) — and no fill for a
    step of which nothing can be sold."""
    pledged = {asset: figures[2] for asset, figures in _figures(before).items()}
    raised = Decimal(0)
    fills = []
    for step in steps:
        rest = _EXACT.subtract(amount, raised)
        if rest <= 0:
            break
        price = parse_amount(step.price)
        maximum = parse_amount(step.max_quantity)
        left = pledged.get(step.asset_id, Decimal(0))
        sellable = min(maximum, left)
        if sellable <= 0 or price <= 0:
            continue  # nothing to sell, or nothing to raise by selling it (§9.3)
        needed = _round_up(_ROUNDING.divide(rest, price))
        if needed < sellable:
            fill = _ExpectedFill(
                step,
                needed,
                f"the least quantity whose proceeds reach the rest of the amount, "
                f"RU({format_amount(rest)} / {step.price}, 18): the step reaches the amount",
            )
        else:
            bound = "max_quantity" if maximum <= left else "what is pledged"
            fill = _ExpectedFill(
                step, sellable, f"min(max_quantity, pledged) = {bound}: the step is sold in full"
            )
        fills.append(fill)
        pledged[step.asset_id] = _EXACT.subtract(left, fill.quantity)
        raised = _EXACT.add(raised, _round_down(_EXACT.multiply(fill.quantity, price)))
    return fills


def _check_fills(
    receipt: liquidation_pb2.LiquidationReceipt,
    steps: Sequence[_Step],
    instructed: _Instructed,
    before_statement: attestation_pb2.HoldingsStatement | None = None,
) -> dict[str, Decimal]:
    """Fills along the steps, in order, each as §9.3 sells it; the totals (§9.3, §9.4)."""
    statement = instructed.before if before_statement is None else before_statement
    for i, fill in enumerate(receipt.fills):
        check(
            _amount(fill.quantity, f"fills[{i}].quantity", absent_is_zero=True) > 0,
            f"fills[{i}] ({fill.asset_id}) sells nothing: a step of which nothing can be "
            "sold (nothing of its asset pledged) or that is not reached has no fill (§9.3, §9.4)",
            expected="a positive quantity",
            got=fill.quantity.value or "0",
        )
    expected_fills = _expected_fills(statement, steps, instructed.amount)
    check_equal(
        f"assets of the fills, in order (the path's steps, each sold in turn until "
        f"{format_amount(instructed.amount)} is raised, §9.3)",
        [e.step.asset_id for e in expected_fills],
        [f.asset_id for f in receipt.fills],
    )
    before = _figures(statement)
    sold: dict[str, Decimal] = {}
    total = Decimal(0)
    for i, (expected, fill) in enumerate(zip(expected_fills, receipt.fills, strict=True)):
        step = expected.step
        what = f"fills[{i}] ({step.asset_id})"
        quantity = _amount(fill.quantity, f"{what}.quantity")
        price = _amount(fill.price, f"{what}.price")
        proceeds = _amount(fill.proceeds, f"{what}.proceeds")
        maximum = parse_amount(step.max_quantity)
        _, _, pledged = before.get(step.asset_id, _NONE)
        check(
            quantity <= maximum,
            f"{what} sold more than its step's max_quantity (§9.3)",
            expected=f"<= {step.max_quantity}",
            got=fill.quantity.value,
        )
        check(
            quantity <= pledged,
            f"{what} sold more than the pledged quantity of the asset (§9.3)",
            expected=f"<= {format_amount(pledged)}",
            got=fill.quantity.value,
        )
        check_equal(
            f"{what}.quantity: {expected.rule}",
            format_amount(expected.quantity),
            fill.quantity.value,
        )
        check_equal(f"{what}.venue (the step's)", step.venue, fill.venue)
        check_equal(
            f"{what}.price (the instruction's price snapshot)", step.price, fill.price.value
        )
        exact = _EXACT.multiply(quantity, price)
        check(
            proceeds <= exact,
            f"{what}.proceeds exceed quantity * price: rounded up, not down (§2.3)",
            expected=f"<= {exact:f} (exact)",
            got=fill.proceeds.value,
        )
        check_equal(
            f"{what}.proceeds: quantity * price = {exact:f}, rounded down to {_SCALE} digits",
            format_amount(_round_down(exact)),
            fill.proceeds.value,
        )
        total = _EXACT.add(total, proceeds)
        sold[step.asset_id] = _EXACT.add(sold.get(step.asset_id, Decimal(0)), quantity)
    check_equal(
        "total_proceeds (the sum of the fills' proceeds, §9.4)",
        format_amount(total),
        receipt.total_proceeds.value,
    )
    check_equal(
        f"shortfall (amount {format_amount(instructed.amount)} - total_proceeds, §9.4)",
        format_amount(max(Decimal(0), _EXACT.subtract(instructed.amount, total))),
        receipt.shortfall.value,
    )
    return sold


def _distributions(receipt: liquidation_pb2.LiquidationReceipt) -> list[tuple[str, str]]:
    return [(d.asset_id, d.quantity.value) for d in receipt.yield_distributions]


def _check_distributions(
    receipt: liquidation_pb2.LiquidationReceipt, statement: attestation_pb2.HoldingsStatement
) -> dict[str, Decimal]:
    """Yield paid out: positive, and never more than is neither pledged nor locked (§5.8)."""
    before = _figures(statement)
    distributed: dict[str, Decimal] = {}
    for i, distribution in enumerate(receipt.yield_distributions):
        what = f"yield_distributions[{i}] ({distribution.asset_id})"
        quantity = _amount(distribution.quantity, f"{what}.quantity")
        check(quantity > 0, f"{what} distributes nothing", expected="> 0", got=quantity)
        check(
            distribution.asset_id not in distributed,
            f"{what}: the asset's yield is distributed twice",
            expected="one distribution per asset",
            got=_distributions(receipt),
        )
        held, locked, pledged = before.get(distribution.asset_id, _NONE)
        free = held - locked - pledged
        check(
            quantity <= free,
            f"{what} exceeds quantity - locked - pledged: yield is never pledged or locked (§5.8)",
            expected=f"<= {format_amount(free)}",
            got=distribution.quantity.value,
        )
        distributed[distribution.asset_id] = quantity
    return distributed


def _check_holdings_after(
    before: attestation_pb2.HoldingsStatement,
    after: attestation_pb2.HoldingsStatement,
    distributed: Mapping[str, Decimal],
    sold: Mapping[str, Decimal],
) -> None:
    """Exactly the receipt's changes: quantity - yield - fills, pledged - fills (§5.8)."""
    check(
        after.epoch > before.epoch,
        "the liquidation did not append a holdings statement",
        expected=f"epoch > {before.epoch}",
        got=after.epoch,
    )
    check_equal(
        "reason of the holdings statement after the liquidation",
        _REASON.Name(_REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION),
        _REASON.Name(after.reason),
    )
    old, new = _figures(before), _figures(after)
    zero = Decimal(0)
    for asset in sorted(old.keys() | new.keys()):
        quantity, locked, pledged = old.get(asset, _NONE)
        taken = _EXACT.add(distributed.get(asset, zero), sold.get(asset, zero))
        expected = (
            _EXACT.subtract(quantity, taken),
            locked,
            _EXACT.subtract(pledged, sold.get(asset, zero)),
        )
        check_equal(
            f"(quantity, locked, pledged) of {asset} after the liquidation (before "
            f"{_text(old.get(asset, _NONE))}, yield paid "
            f"{format_amount(distributed.get(asset, zero))}, sold "
            f"{format_amount(sold.get(asset, zero))})",
            _text(expected),
            _text(new.get(asset, _NONE)),
        )


async def _execute(
    ctx: CaseContext,
    pledged: _Pledged,
    instructed: _Instructed,
    *,
    before: attestation_pb2.HoldingsStatement | None = None,
) -> _Executed:
    """Submit the instruction; check the receipt and the attested holdings after it.

    ``before``: the account before the execution, when it is not the statement the
    instruction cites.
    """
    since = await latest_checkpoint(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.submit_liquidation_instruction,
        _request(instructed),
        label="SubmitLiquidationInstruction",
    )
    response: custodian_service_pb2.SubmitLiquidationInstructionResponse = expect_ok(outcome)
    return await _check_execution(
        ctx, pledged, instructed, response.liquidation_receipt, since=since, before=before
    )


async def _check_execution(
    ctx: CaseContext,
    pledged: _Pledged,
    instructed: _Instructed,
    receipt_envelope: envelope_pb2.Envelope,
    *,
    since: attestation_pb2.Checkpoint,
    before: attestation_pb2.HoldingsStatement | None = None,
) -> _Executed:
    """The receipt and the attested holdings after it, against the account as it was
    ``before`` the execution (by default the statement the instruction cites)."""
    before = instructed.before if before is None else before
    receipt = await _verified_receipt(ctx, receipt_envelope, instructed)
    distributed = _check_distributions(receipt, before)
    sold = _check_fills(receipt, pledged.steps, instructed, before)
    after, after_envelope, after_ref = await holdings(ctx, pledged.account_id)
    _check_holdings_after(before, after, distributed, sold)
    check_equal(
        "the receipt's attestation: the holdings statement after the liquidation (§9.4)",
        describe(after_ref),
        describe(receipt.attestation),
    )
    await expect_attested(ctx, after_envelope, receipt.attestation, since=since)
    return _Executed(receipt_envelope, receipt, distributed)


# ------------------------------------------------------------------ cases


@REGISTRY.case(
    "liquidation/executed-along-path",
    Level.MUST,
    "an instruction below the liquidation line is executed along the pre-authorised path: "
    "the signed receipt's fills follow the steps in order, each within its max_quantity and "
    "the pledge, proceeds = quantity * price rounded down, totals and shortfall exact; the "
    "LIQUIDATION holdings statement after it changes exactly that, and is attested",
    roles=_CUSTODIAN,
    clauses=("§2.1/send-canonical-amounts", "§2.3/decimal-precision"),
)
async def executed_along_path(ctx: CaseContext) -> None:
    pledged = await _pledge_under_path(ctx)
    await _execute(ctx, pledged, await _instruction(ctx, pledged))


@REGISTRY.case(
    "liquidation/yield-paid-first",
    Level.MUST,
    "accrued yield (AccrueYield, test control) is paid out before anything is sold: listed in "
    "yield_distributions, taken out of quantity, never out of the pledge",
    roles=_CUSTODIAN,
)
async def yield_paid_first(ctx: CaseContext) -> None:
    pledged = await _pledge_under_path(ctx)
    before, _, _ = await holdings(ctx, pledged.account_id)
    await ctx.control(ctx.test_control.accrue_yield, test_control_pb2.AccrueYieldRequest())
    accrued_statement, _, _ = await holdings(ctx, pledged.account_id)
    if accrued_statement.epoch == before.epoch:
        raise CaseSkipped(f"account {pledged.account_id!r} holds no asset that accrues yield")
    old, new = _figures(before), _figures(accrued_statement)
    accrued = {
        asset: new[asset][0] - old.get(asset, _NONE)[0]
        for asset in new
        if new[asset][0] > old.get(asset, _NONE)[0]
    }
    check(
        bool(accrued),
        "the yield accrual raised no quantity",
        expected="a higher quantity of a yield-bearing asset",
        got=describe(accrued_statement),
    )
    executed = await _execute(ctx, pledged, await _instruction(ctx, pledged))
    for asset, quantity in sorted(accrued.items()):
        paid = executed.distributed.get(asset, Decimal(0))
        check(
            paid >= quantity,
            f"the yield just accrued on {asset} was not paid out before the sale (§9.3 step 1)",
            expected=f"a yield distribution of {asset} of at least {format_amount(quantity)}",
            got=_distributions(executed.receipt) or "no yield_distributions",
        )


@REGISTRY.case(
    "liquidation/off-path-refused",
    Level.MUST,
    "an instruction naming a path id the client never authorised, or a path a later pledge "
    "superseded, is refused: PERMISSION_DENIED PATH_NOT_AUTHORISED, and nothing changes",
    roles=_CUSTODIAN,
)
async def off_path_refused(ctx: CaseContext) -> None:
    pledged = await _pledge_under_path(ctx)
    # A top-up under a new path of one step: it supersedes the first for later instructions.
    newer = await _signed_path(
        ctx, pledged.account_id, pledged.steps[:1], ctx.unique("conformance-path")
    )
    await _pledge(ctx, pledged.account_id, pledged.steps[0].asset_id, "0.000013", newer)
    for label, path_id in (
        ("a path id never authorised", ctx.unique("conformance-no-such-path")),
        ("a superseded path", pledged.path_id),
    ):
        await _expect_path_not_authorised(
            ctx, await _instruction(ctx, pledged, path_id=path_id), label
        )


@REGISTRY.case(
    "liquidation/repeat-returns-same-receipt",
    Level.MUST,
    "an executed instruction submitted again returns the identical signed receipt and "
    "changes nothing",
    roles=_CUSTODIAN,
)
async def repeat_returns_same_receipt(ctx: CaseContext) -> None:
    pledged = await _pledge_under_path(ctx)
    instructed = await _instruction(ctx, pledged)
    executed = await _execute(ctx, pledged, instructed)
    before = await custodian_state(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.submit_liquidation_instruction,
        _request(instructed),
        label="SubmitLiquidationInstruction (the same instruction again)",
    )
    response: custodian_service_pb2.SubmitLiquidationInstructionResponse = expect_ok(outcome)
    first = executed.receipt_envelope.SerializeToString(deterministic=True)
    again = response.liquidation_receipt.SerializeToString(deterministic=True)
    check(
        again == first,
        "the repeat did not return the receipt of the executed instruction, byte for byte",
        expected=f"sha256 {hashlib.sha256(first).hexdigest()[:16]}: "
        f"{describe(executed.receipt_envelope)}",
        got=f"sha256 {hashlib.sha256(again).hexdigest()[:16]}: "
        f"{describe(response.liquidation_receipt)}",
    )
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "liquidation/reused-id-refused",
    Level.MUST,
    "after an instruction is executed, another instruction reusing its liquidation_id — a new "
    "statement for the same account and path, with its own figures — is FAILED_PRECONDITION "
    "STATE_CONFLICT, gets no receipt and changes nothing (§9.4); so are ones signed under the "
    "first instruction's own sequence and under sequence 1: the id is checked before replay "
    "(§12.4 steps 3, 4); on the stream, under a fresh sequence and the first one's, such an "
    "instruction is acknowledged with its batch (recorded as rejected, §6.5) and sells nothing",
    roles=_CUSTODIAN,
    clauses=("§12.4/reused-id-refused",),
)
async def reused_id_refused(ctx: CaseContext) -> None:
    pledged = await _pledge_under_path(ctx)
    first = await _instruction(ctx, pledged)
    await _execute(ctx, pledged, first)
    used = liquidation_pb2.LiquidationInstruction.FromString(first.envelope.payload).header.sequence
    # A fresh sequence, the first one's own, and one below it: other bytes that sort after
    # and before the recorded ones, all refused for the id alone.
    for label, sequence in (
        ("a fresh sequence", None),
        (f"its sequence {used}", used),
        ("sequence 1", 1),
    ):
        await _expect_refused(
            ctx,
            await _instruction(
                ctx, pledged, liquidation_id=first.liquidation_id, sequence=sequence
            ),
            f"SubmitLiquidationInstruction reusing the executed id {first.liquidation_id!r}, "
            f"under {label}",
            grpc.StatusCode.FAILED_PRECONDITION,
            _R.ERROR_REASON_STATE_CONFLICT,
        )
    # On the stream the reuse is an update recorded as rejected (§6.5, §12.4: the id before
    # stage g), under the first one's sequence too: the batch is acknowledged, not failed as
    # a replay that would block every entry behind it, and nothing is sold.
    for sequence in (None, used):
        before = await custodian_state(ctx)
        reused = await _instruction(
            ctx, pledged, liquidation_id=first.liquidation_id, sequence=sequence
        )
        await _send_on_stream(
            ctx, [position_sync_pb2.PositionUpdate(liquidation_instruction=reused.envelope)]
        )
        await expect_unchanged(ctx, before)


@REGISTRY.case(
    "liquidation/path-in-force-when-issued",
    Level.MUST,
    "an instruction is judged by the path in force when it was issued (§9.1): with paths P1, "
    "P2, P3 recorded in turn by top-ups ten seconds apart, an instruction naming P1 issued "
    "between P2 and P3, or naming P2 issued after P3, is PERMISSION_DENIED PATH_NOT_AUTHORISED "
    "and changes nothing; naming P2 issued between P2 and P3 (citing the holdings statement of "
    "then), it is executed along P2 (moves the clock with test control)",
    roles=_CUSTODIAN,
)
async def path_in_force_when_issued(ctx: CaseContext) -> None:
    await ctx.advance_clock(timedelta(0))  # skips the case without test control
    first = await _pledge_under_path(ctx)
    second = await _superseding_path(ctx, first)
    # Between P2 and P3: the holdings statement the exchange had then, and when it issues.
    await ctx.advance_clock(_PATH_GAP)
    statement, statement_envelope, _ = await holdings(ctx, first.account_id)
    between = await ctx.server_now()
    await _superseding_path(ctx, second)
    for label, pledged, issued_at, cited in (
        ("P1, issued after P2 superseded it", first, between, (statement, statement_envelope)),
        ("P2, issued after P3 superseded it", second, None, None),
    ):
        await _expect_path_not_authorised(
            ctx, await _instruction(ctx, pledged, issued_at=issued_at, cited=cited), label
        )
    instructed = await _instruction(
        ctx, second, issued_at=between, cited=(statement, statement_envelope)
    )
    now_statement, _, _ = await holdings(ctx, first.account_id)
    await _execute(ctx, second, instructed, before=now_statement)


async def _expect_path_not_authorised(
    ctx: CaseContext, instructed: _Instructed, naming: str
) -> None:
    """The instruction is PERMISSION_DENIED PATH_NOT_AUTHORISED and changes nothing (§9.2)."""
    await _expect_refused(
        ctx,
        instructed,
        f"SubmitLiquidationInstruction naming {naming}",
        grpc.StatusCode.PERMISSION_DENIED,
        _R.ERROR_REASON_PATH_NOT_AUTHORISED,
    )


async def _superseding_path(ctx: CaseContext, pledged: _Pledged) -> _Pledged:
    """Ten seconds on, a top-up under a new path of the same steps; that path in force."""
    await ctx.advance_clock(_PATH_GAP)
    path_id = ctx.unique("conformance-path")
    path = await _signed_path(ctx, pledged.account_id, pledged.steps, path_id)
    await _pledge(ctx, pledged.account_id, pledged.steps[0].asset_id, _TOP_UP, path)
    return dataclasses.replace(pledged, path_id=path_id)


@REGISTRY.case(
    "liquidation/other-caller-refused",
    Level.MUST,
    "an instruction of the kit's exchange, valid in every other respect, sent by another "
    "registered exchange or by the account's client is refused PERMISSION_DENIED "
    "KEY_ROLE_MISMATCH (only the exchange that issued it may send it, §4.5) and changes "
    "nothing; sent then by that exchange, it is executed",
    roles=_CUSTODIAN,
)
async def other_caller_refused(ctx: CaseContext) -> None:
    # Each needs a certificate of the party (--identity): skipped before anything changes.
    callers = [
        ctx.as_role(_EXCHANGE_ROLE, besides=[exchange_party(ctx)]),
        ctx.as_party(client_key(ctx).party_id),
    ]
    pledged = await _pledge_under_path(ctx)
    instructed = await _instruction(ctx, pledged)
    for caller in callers:
        before = await custodian_state(ctx)
        outcome = await ctx.rpc(
            caller.custodian.submit_liquidation_instruction,
            _request(instructed),
            label=f"SubmitLiquidationInstruction sent by {caller.party_id}",
        )
        expect_status(outcome, grpc.StatusCode.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH)
        await expect_unchanged(ctx, before)
    # Refused, it was not recorded for replay either (§3.6 g): its issuer may still send it.
    await _execute(ctx, pledged, instructed)


@REGISTRY.case(
    "liquidation/stream-instruction-fresh-by-batch",
    Level.MUST,
    "an instruction is judged fresh by how it comes: by RPC by its own expires_at — expired "
    "nine minutes ago, it is FAILED_PRECONDITION STATEMENT_EXPIRED and changes nothing —, on "
    "SyncPositions by its batch (§3.6.1): the same instruction in a fresh batch is executed, "
    "its receipt on the stream with the fills §9.3 prescribes (moves the clock with test "
    "control)",
    roles=_CUSTODIAN,
)
async def stream_instruction_fresh_by_batch(ctx: CaseContext) -> None:
    await ctx.advance_clock(timedelta(0))  # skips the case without test control
    pledged = await _pledge_under_path(ctx)
    now = await ctx.server_now()
    instructed = await _instruction(ctx, pledged, issued_at=now, expires_at=now + _SHORT_LIFE)
    await _clock_at(ctx, now + _PAST_EXPIRY)
    before = await custodian_state(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.submit_liquidation_instruction,
        _request(instructed),
        label="SubmitLiquidationInstruction of an instruction that expired nine minutes ago",
    )
    expect_status(outcome, grpc.StatusCode.FAILED_PRECONDITION, _R.ERROR_REASON_STATEMENT_EXPIRED)
    await expect_unchanged(ctx, before)

    since = await latest_checkpoint(ctx)
    current, _, _ = await holdings(ctx, pledged.account_id)

    def its_receipt(update: position_sync_pb2.PositionUpdate) -> bool:
        receipt = _payload_of(update, "liquidation_receipt", liquidation_pb2.LiquidationReceipt)
        return receipt is not None and receipt.liquidation_id == instructed.liquidation_id

    found = await _send_on_stream(
        ctx,
        [position_sync_pb2.PositionUpdate(liquidation_instruction=instructed.envelope)],
        awaited=its_receipt,
    )
    if found is None:
        raise CaseFailure(
            "the custodian did not execute an instruction that came on the stream in a fresh "
            "batch: a statement in a sync entry is judged fresh by its batch, not by its own "
            "expires_at (§3.6.1)",
            expected=f"a LiquidationReceipt of {instructed.liquidation_id!r} on the stream",
            got="none (refused, or recorded as a rejected update)",
        )
    await _check_execution(
        ctx, pledged, instructed, found.liquidation_receipt, since=since, before=current
    )


def _zero_priced_first(
    assets: Sequence[str], statement: attestation_pb2.HoldingsStatement
) -> list[_Step]:
    """The first asset quoted at 0, then the second at its price: only the second can raise."""
    first, second = assets
    return [
        _Step(first, _VENUES[0], _STEP_MAXIMA[0], "0"),
        _Step(second, _VENUES[1], _STEP_MAXIMA[1], _PRICES[1]),
    ]


@REGISTRY.case(
    "liquidation/zero-priced-step-passed-over",
    Level.MUST,
    "a path whose first step's asset the instruction's price snapshot quotes at 0: that step "
    "is passed over with no fill (nothing is sold for nothing), and the amount is raised "
    "part-way through the second step, RU(amount / price, 18) (§9.3)",
    roles=_CUSTODIAN,
    clauses=("§9.3/unpriced-step-passed-over",),
)
async def zero_priced_step_passed_over(ctx: CaseContext) -> None:
    # A collateral factor of 0: any amount is below the liquidation line (§7.3).
    pledged = await _pledge_under_path(ctx, layout=_zero_priced_first, factor="0")
    await _execute(ctx, pledged, await _instruction(ctx, pledged, amount=_PART_OF_LAST))


@REGISTRY.case(
    "liquidation/amount-raised-part-way",
    Level.MUST,
    "an amount the path can raise: the step that reaches it sells the least quantity whose "
    "proceeds do, RU(rest / price, 18), and the steps after it nothing (§9.3). Two "
    "instructions along a path of an asset, then another priced below 1 at two venues, then "
    "the first at a second venue: part-way through the first step; then the first step in "
    "full, the whole pledge of the second asset, no fill at its second venue (nothing is left "
    "to sell there) and part-way through the last step — shortfall 0 (§9.4)",
    roles=_CUSTODIAN,
)
async def amount_raised_part_way(ctx: CaseContext) -> None:
    # A collateral factor of 0: any amount is below the liquidation line (§7.3).
    pledged = await _pledge_under_path(ctx, layout=_two_venues_each, factor="0")
    await _execute(ctx, pledged, await _instruction(ctx, pledged, amount=_PART_OF_FIRST))
    statement, _, _ = await holdings(ctx, pledged.account_id)
    figures = _figures(statement)
    amount = _PART_OF_LAST
    for step in pledged.steps[:2]:  # sold in full: up to the maximum, or the whole pledge
        _, _, pledged_quantity = figures.get(step.asset_id, _NONE)
        whole = min(parse_amount(step.max_quantity), pledged_quantity)
        proceeds = _round_down(_EXACT.multiply(whole, parse_amount(step.price)))
        amount = _EXACT.add(amount, proceeds)
    await _execute(ctx, pledged, await _instruction(ctx, pledged, amount=amount))


async def _cite_due_call(
    ctx: CaseContext, *, account_id: str | None = None, overstated: bool = False
) -> tuple[_Pledged, _Instructed]:
    """A margin call on the stream, the clock a second past its due_by, and an instruction
    then citing it: refused only for what ``account_id`` or ``overstated`` make of the call."""
    await ctx.advance_clock(timedelta(0))  # skips the case without test control
    pledged = await _pledge_under_path(ctx, cure_period=_CURE_PERIOD)
    call = await _margin_call(ctx, pledged, account_id=account_id, overstated=overstated)
    after_due = call.due_by.ToDatetime(tzinfo=UTC) + _SECOND
    await _clock_at(ctx, after_due)
    return pledged, await _instruction(ctx, pledged, margin_call=call, issued_at=after_due)


async def _expect_refused(
    ctx: CaseContext, instructed: _Instructed, label: str, code: grpc.StatusCode, reason: int
) -> None:
    """SubmitLiquidationInstruction refuses it with ``code`` and ``reason``; nothing changes."""
    before = await custodian_state(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.submit_liquidation_instruction, _request(instructed), label=label
    )
    expect_status(outcome, code, reason)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "liquidation/call-expires-at-due-by",
    Level.MUST,
    "an instruction naming an undisputed margin call (§8.2, sent on SyncPositions) is refused "
    "FAILED_PRECONDITION STATE_CONFLICT when issued one second before the call's due_by and "
    "when issued at due_by itself (the call is open through it), changing nothing, and "
    "executed when issued one microsecond after it, the call EXPIRED (§8.1, §9.2; moves the "
    "clock with test control)",
    roles=_CUSTODIAN,
    clauses=("§9.2/liquidation-after-due-by",),
)
async def call_expires_at_due_by(ctx: CaseContext) -> None:
    await ctx.advance_clock(timedelta(0))  # skips the case without test control
    pledged = await _pledge_under_path(ctx, cure_period=_CURE_PERIOD)
    call = await _margin_call(ctx, pledged)
    due = call.due_by.ToDatetime(tzinfo=UTC)
    for issued, when in ((due - _SECOND, "one second before"), (due, "at")):
        await _clock_at(ctx, issued)
        await _expect_refused(
            ctx,
            await _instruction(ctx, pledged, margin_call=call, issued_at=issued),
            f"SubmitLiquidationInstruction issued {when} the call's due_by",
            grpc.StatusCode.FAILED_PRECONDITION,
            _R.ERROR_REASON_STATE_CONFLICT,
        )
    after = due + _MICROSECOND
    await _clock_at(ctx, after)
    await _execute(
        ctx, pledged, await _instruction(ctx, pledged, margin_call=call, issued_at=after)
    )


@REGISTRY.case(
    "liquidation/disputed-call-refused",
    Level.MUST,
    "an instruction naming a margin call the custodian disputed (its call_amount one quantum "
    "above what its signed inputs give: answered DISPUTE on the stream, §6.5, §8.2) is refused "
    "FAILED_PRECONDITION STATE_CONFLICT even past the call's due_by — a disputed call never "
    "expires (§8.1, §9.2) — and changes nothing (moves the clock with test control)",
    roles=_CUSTODIAN,
)
async def disputed_call_refused(ctx: CaseContext) -> None:
    _, instructed = await _cite_due_call(ctx, overstated=True)
    await _expect_refused(
        ctx,
        instructed,
        "SubmitLiquidationInstruction naming a disputed call, past its due_by",
        grpc.StatusCode.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATE_CONFLICT,
    )


@REGISTRY.case(
    "liquidation/other-account-call-not-found",
    Level.MUST,
    "an instruction naming a margin call the exchange sent for another account is refused "
    "NOT_FOUND: no call of the instruction's account has that id (§9.2), past its due_by too, "
    "and nothing changes (moves the clock with test control)",
    roles=_CUSTODIAN,
)
async def other_account_call_not_found(ctx: CaseContext) -> None:
    _, instructed = await _cite_due_call(ctx, account_id=ctx.unique("conformance-other-account"))
    await _expect_refused(
        ctx,
        instructed,
        "SubmitLiquidationInstruction naming a call of another account",
        grpc.StatusCode.NOT_FOUND,
        _R.ERROR_REASON_NOT_FOUND,
    )
