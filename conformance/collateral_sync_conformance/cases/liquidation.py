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
"""

from __future__ import annotations

import decimal
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

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
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import recompute_liquidation_instruction

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
from collateral_sync_conformance.cases._snapshots import custodian_state, expect_unchanged

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_REASON = attestation_pb2.HoldingsChangeReason
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE

#: What the client pledges of each of the two assets: uneven, and small enough for any account.
_PLEDGES = ("0.000731", "0.000587")
#: Each step's max_quantity: below its pledge, with 18 fraction digits so that
#: quantity * price has more than 18 and must be rounded (down, §2.3).
_STEP_MAXIMA = ("0.000370000000000007", "0.000290000000000003")
_PRICES = ("1.37", "2.9")
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


async def _pledge_under_path(ctx: CaseContext) -> _Pledged:
    """Pledge two assets under one two-step path; publish the exchange's policy (§9.1, §7.1)."""
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
    steps = tuple(
        _Step(asset, venue, maximum, price)
        for asset, venue, maximum, price in zip(assets, _VENUES, _STEP_MAXIMA, _PRICES, strict=True)
    )
    path_id = ctx.unique("conformance-path")
    path = await _signed_path(ctx, account_id, steps, path_id)
    # One path for both pledges: the second pledge sends the path in force again (§9.1).
    for asset, quantity in zip(assets, _PLEDGES, strict=True):
        await _pledge(ctx, account_id, asset, quantity, path)
    now = await ctx.server_now()
    policy = kit_risk_policy(ctx, now, dict.fromkeys(assets, _FACTOR))
    envelope = await ctx.sign(policy, exchange, audience=["*"], issued_at=now)
    await publish_risk_policy(ctx, envelope)
    return _Pledged(account_id, path_id, steps, envelope, policy.version)


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
    ctx: CaseContext, pledged: _Pledged, *, path_id: str | None = None
) -> _Instructed:
    """A liquidation instruction the custodian must find due, recomputed by the kit first (§9.2)."""
    statement, statement_envelope, _ = await holdings(ctx, pledged.account_id)
    now = await ctx.server_now()
    snapshot = await price_snapshot(ctx, {s.asset_id: s.price for s in pledged.steps}, now)
    amount = _unraisable_amount(statement, pledged.steps)
    liquidation_id = ctx.unique("conformance-liquidation")
    message = liquidation_pb2.LiquidationInstruction(
        liquidation_id=liquidation_id,
        account_id=pledged.account_id,
        amount=amount_to_proto(format_amount(amount)),
        liquidation_path_id=pledged.path_id if path_id is None else path_id,
        risk_policy_version=pledged.policy_version,
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=pledged.policy,
            holdings_statements=[statement_envelope],
            price_snapshot=snapshot,
        ),
    )
    envelope = await ctx.sign(message, ctx.key(_EXCHANGE_ROLE), issued_at=now)
    # What the custodian will do with it, done by the kit first: the inputs verify as
    # evidence (the custodian's statement addressed to the exchange it is pledged to)
    # and give a breach of the liquidation line for exactly this amount.
    sdk_check(
        "the kit's instruction recomputed from its signed inputs (the custodian's holdings "
        "statement among them, §8.2, §9.2)",
        recompute_liquidation_instruction,
        envelope,
        ctx.registry,
        audience=ctx.server_party_id,
        now=now,
    )
    return _Instructed(envelope, liquidation_id, amount, statement)


def _request(
    instructed: _Instructed,
) -> custodian_service_pb2.SubmitLiquidationInstructionRequest:
    return custodian_service_pb2.SubmitLiquidationInstructionRequest(
        liquidation_instruction=instructed.envelope
    )


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


def _check_fills(
    receipt: liquidation_pb2.LiquidationReceipt, steps: Sequence[_Step], instructed: _Instructed
) -> dict[str, Decimal]:
    """Fills along the steps, in order, each in full up to its maximum; the totals (§9.3, §9.4)."""
    check_equal(
        "assets of the fills, in order (the path's steps, each sold in turn, §9.3)",
        [s.asset_id for s in steps],
        [f.asset_id for f in receipt.fills],
    )
    before = _figures(instructed.before)
    sold: dict[str, Decimal] = {}
    total = Decimal(0)
    for i, (step, fill) in enumerate(zip(steps, receipt.fills, strict=True)):
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
        # The amount cannot be raised along the path: every step is sold in full.
        check_equal(
            f"{what}.quantity: min(max_quantity, pledged), the path cannot raise the amount",
            format_amount(min(maximum, pledged)),
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
    receipt: liquidation_pb2.LiquidationReceipt, instructed: _Instructed
) -> dict[str, Decimal]:
    """Yield paid out: positive, and never more than is neither pledged nor locked (§5.8)."""
    before = _figures(instructed.before)
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


async def _execute(ctx: CaseContext, pledged: _Pledged, instructed: _Instructed) -> _Executed:
    """Submit the instruction; check the receipt and the attested holdings after it."""
    since = await latest_checkpoint(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.submit_liquidation_instruction,
        _request(instructed),
        label="SubmitLiquidationInstruction",
    )
    response: custodian_service_pb2.SubmitLiquidationInstructionResponse = expect_ok(outcome)
    receipt = await _verified_receipt(ctx, response.liquidation_receipt, instructed)
    distributed = _check_distributions(receipt, instructed)
    sold = _check_fills(receipt, pledged.steps, instructed)
    after, after_envelope, after_ref = await holdings(ctx, pledged.account_id)
    _check_holdings_after(instructed.before, after, distributed, sold)
    check_equal(
        "the receipt's attestation: the holdings statement after the liquidation (§9.4)",
        describe(after_ref),
        describe(receipt.attestation),
    )
    await expect_attested(ctx, after_envelope, receipt.attestation, since=since)
    return _Executed(response.liquidation_receipt, receipt, distributed)


# ------------------------------------------------------------------ cases


@REGISTRY.case(
    "liquidation/executed-along-path",
    Level.MUST,
    "an instruction below the liquidation line is executed along the pre-authorised path: "
    "the signed receipt's fills follow the steps in order, each within its max_quantity and "
    "the pledge, proceeds = quantity * price rounded down, totals and shortfall exact; the "
    "LIQUIDATION holdings statement after it changes exactly that, and is attested",
    roles=_CUSTODIAN,
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
        instructed = await _instruction(ctx, pledged, path_id=path_id)
        before = await custodian_state(ctx)
        outcome = await ctx.rpc(
            ctx.custodian.submit_liquidation_instruction,
            _request(instructed),
            label=f"SubmitLiquidationInstruction naming {label}",
        )
        expect_status(
            outcome, grpc.StatusCode.PERMISSION_DENIED, _R.ERROR_REASON_PATH_NOT_AUTHORISED
        )
        await expect_unchanged(ctx, before)


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
