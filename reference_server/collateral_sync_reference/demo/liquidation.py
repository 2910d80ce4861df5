"""Acts 9 and 10 of the demo: yield accrues, then a price drop liquidates the account."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from collateral_sync.amounts import amount_to_proto, format_amount
from collateral_sync.errors import StateError
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import collateral_ratio, value_collateral
from google.protobuf import duration_pb2

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.facts import (
    by_asset,
    cites,
    decimal_of,
    positions_text,
    reason_name,
    status_name,
)
from collateral_sync_reference.demo.scenario import (
    ACCOUNT,
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    FIRST_DROP,
    PRICES,
    SECOND_DROP,
)
from collateral_sync_reference.demo.stage import Attested, Stage

__all__ = ["LiquidationActs"]

_REASON = attestation_pb2.HoldingsChangeReason


def _check_receipt(
    receipt: liquidation_pb2.LiquidationReceipt,
    amount: Decimal,
    before: attestation_pb2.HoldingsStatement,
    after: attestation_pb2.HoldingsStatement,
) -> None:
    """The receipt's figures add up and match the holdings statements around it, or raise."""
    fills = sum((decimal_of(f.proceeds) for f in receipt.fills), Decimal(0))
    expected = (fills, max(Decimal(0), amount - fills))
    stated = (decimal_of(receipt.total_proceeds), decimal_of(receipt.shortfall))
    if stated != expected:
        raise StateError(
            f"receipt: expected total proceeds and shortfall {format_amount(expected[0])}, "
            f"{format_amount(expected[1])}; got {format_amount(stated[0])}, "
            f"{format_amount(stated[1])}",
            metadata={
                "expected": f"{format_amount(expected[0])}, {format_amount(expected[1])}",
                "actual": f"{format_amount(stated[0])}, {format_amount(stated[1])}",
            },
        )
    old, new = by_asset(before), by_asset(after)
    zero = common_pb2.Position()
    held_sold: dict[str, Decimal] = {}
    held_paid: dict[str, Decimal] = {}
    for asset_id, was in old.items():
        now = new.get(asset_id, zero)
        sold = decimal_of(was.pledged_quantity) - decimal_of(now.pledged_quantity)
        paid = decimal_of(was.quantity) - decimal_of(now.quantity) - sold
        if sold:
            held_sold[asset_id] = sold
        if paid:
            held_paid[asset_id] = paid
    receipt_sold: dict[str, Decimal] = {}
    for fill in receipt.fills:
        receipt_sold[fill.asset_id] = receipt_sold.get(fill.asset_id, Decimal(0)) + decimal_of(
            fill.quantity
        )
    receipt_paid = {y.asset_id: decimal_of(y.quantity) for y in receipt.yield_distributions}
    if (receipt_sold, receipt_paid) != (held_sold, held_paid):
        raise StateError(
            "receipt: expected the sales and yield the holdings statements show, got others",
            metadata={
                "expected": f"sold {held_sold}, paid out {held_paid}",
                "actual": f"sold {receipt_sold}, paid out {receipt_paid}",
            },
        )


class LiquidationActs(Stage):
    """The daily yield, then the liquidation and the shortfall it leaves (acts 9 and 10)."""

    async def _daily_yield(self) -> None:
        say.section("9. Daily yield on the fund token, attested like any change")
        now = self._clock.now()
        due = datetime.combine(now.date(), self._yield_time, tzinfo=UTC)
        if due <= now:
            due += timedelta(days=1)
        # Just past the yield time, exchange first: nothing the custodian then
        # signs is dated ahead of the exchange's clock.
        by = duration_pb2.Duration()
        by.FromTimedelta(due - now + timedelta(seconds=1))
        await self._c.regulator_control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))
        await self._c.exchange_control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))
        moved = await self._c.custodian_control.advance_clock(
            test_control_pb2.AdvanceClockRequest(by=by)
        )
        self._clock.learn(moved.now)
        say.step(
            f"the three servers' clocks move {round((due - now).total_seconds() / 60)} min forward to "
            f"{due:%H:%M} UTC, the custodian's daily yield time"
        )
        before = self._holdings
        assert before is not None
        after = await self._holdings_now()
        if after.statement.reason != _REASON.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL:
            raise StateError(
                f"expected a YIELD_ACCRUAL statement at the yield time, got {reason_name(after.statement)}",
                metadata={"expected": "YIELD_ACCRUAL", "actual": reason_name(after.statement)},
            )
        self._holdings = after
        say.step(
            f"{CUSTODIAN} accrues and attests epoch {after.statement.epoch} "
            f"({reason_name(after.statement)}) at leaf {after.ref.leaf_index}:"
        )
        old = by_asset(before.statement)
        for asset, position in by_asset(after.statement).items():
            was = old.get(asset)
            gained = decimal_of(position.quantity) - (
                Decimal(0) if was is None else decimal_of(was.quantity)
            )
            if gained:
                say.detail(
                    f"{asset} {say.amount(was.quantity.value if was else '0')} -> "
                    f"{say.amount(position.quantity.value)} (+{say.amount(gained)}); still "
                    f"{say.amount(position.pledged_quantity.value)} pledged: yield is never pledged"
                )
        self._proven(await self.evidence.prove_holdings(after.envelope, after.ref), after.ref)
        previous = decimal_of(self._credit.collateral_value)
        credit = await self._until(
            f"{EXCHANGE} to credit the yield statement",
            self._credit_where(lambda c: cites(c, after.ref.leaf_index)),
        )
        value = decimal_of(credit.collateral_value)
        say.detail(
            f"{EXCHANGE} proves and credits it: collateral value {say.amount(value)} "
            + (
                "(unchanged: only pledged quantity counts)"
                if value == previous
                else f"(was {say.amount(previous)})"
            )
        )

    async def _liquidation(self) -> None:
        say.section("10. Second drop: liquidation along the client's path, yield first")
        before = self._holdings
        assert before is not None
        exposure = decimal_of(self._credit.exposure)
        fund_before = decimal_of(self._policy.insurance_fund_balance)
        asset, price = SECOND_DROP
        await self._set_price(asset, price)
        prices = dict(PRICES, **{asset: price})
        say.step(
            f"the scripted price feed moves {asset} {say.amount(FIRST_DROP[1])} -> {say.amount(price)}"
        )
        quotes = [
            valuation_pb2.PriceQuote(asset_id=a, price=amount_to_proto(p))
            for a, p in prices.items()
        ]
        now = self._clock.now()
        for quote in quotes:
            quote.observed_at.FromDatetime(now)
        valued = value_collateral(self._policy, before.statement.positions, quotes, valued_at=now)
        ratio = collateral_ratio(self._policy, valued.collateral_value, exposure)
        say.detail(
            f"valued with the SDK under policy v{self._policy.version}: collateral "
            f"{say.amount(valued.collateral_value)} / exposure {say.amount(exposure)} = ratio "
            f"{format_amount(ratio) if ratio is not None else 'none'}, below the liquidation line "
            f"{self._policy.liquidation_ratio.value}"
        )

        async def liquidated() -> Attested | None:
            attested = await self._holdings_now()
            if attested.statement.reason == _REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION:
                return attested
            return None

        after = await self._until(f"{CUSTODIAN} to execute a liquidation", liquidated)
        record = await self._until(f"{EXCHANGE} to record the receipt", self._liquidation_record)
        # The instruction is addressed to the custodian, the receipt to the exchange, the
        # allocation to the custodian: each is verified as its addressee would.
        instruction = self._open(
            record.liquidation_instruction, liquidation_pb2.LiquidationInstruction, CUSTODIAN
        )
        receipt = self._open(
            record.liquidation_receipt, liquidation_pb2.LiquidationReceipt, EXCHANGE
        )
        self.evidence.relied_on_by_custodian(record.liquidation_instruction)
        self.evidence.relied_on_by_exchange(record.liquidation_receipt)
        amount = decimal_of(instruction.amount)
        say.step(
            f"{EXCHANGE} signs LiquidationInstruction {instruction.liquidation_id}: raise "
            f"{say.amount(amount)} along {instruction.liquidation_path_id}; {CUSTODIAN} executes "
            f"it and attests epoch {after.statement.epoch} ({reason_name(after.statement)}) at leaf "
            f"{after.ref.leaf_index}"
        )
        self._proven(await self.evidence.prove_holdings(after.envelope, after.ref), after.ref)
        if (receipt.liquidation_id, receipt.attestation.leaf_index) != (
            instruction.liquidation_id,
            after.ref.leaf_index,
        ):
            raise StateError(
                f"the receipt should answer {instruction.liquidation_id} and cite leaf "
                f"{after.ref.leaf_index}; it answers {receipt.liquidation_id} and cites leaf "
                f"{receipt.attestation.leaf_index}",
                metadata={
                    "expected": f"{instruction.liquidation_id} @ {after.ref.leaf_index}",
                    "actual": f"{receipt.liquidation_id} @ {receipt.attestation.leaf_index}",
                },
            )
        say.step(
            f"ListLiquidations: {CUSTODIAN}'s signed LiquidationReceipt, verified as {EXCHANGE} "
            f"verifies it; it cites the holdings statement at leaf {after.ref.leaf_index}"
        )
        for paid in receipt.yield_distributions:
            say.detail(
                f"yield first: {paid.asset_id} {say.amount(paid.quantity.value)} accrued, paid "
                f"out to {CLIENT} before any sale"
            )
        say.detail("then the fills, along the path in its order:")
        say.table(
            ["asset", "quantity", "price", "proceeds", "venue"],
            [
                [
                    f.asset_id,
                    say.amount(f.quantity.value),
                    say.amount(f.price.value),
                    say.amount(f.proceeds.value),
                    f.venue,
                ]
                for f in receipt.fills
            ],
        )
        proceeds, shortfall = decimal_of(receipt.total_proceeds), decimal_of(receipt.shortfall)
        say.detail(
            f"total proceeds {say.amount(proceeds)}; shortfall {say.amount(amount)} - "
            f"{say.amount(proceeds)} = {say.amount(shortfall)}"
        )
        _check_receipt(receipt, amount, before.statement, after.statement)
        say.check(
            "the receipt adds up (fills to total, amount - total to shortfall) and agrees with "
            "the custodian's signed holdings before and after: the same quantities sold, the "
            "same yield paid out"
        )

        async def new_policy() -> valuation_pb2.RiskPolicy | None:
            envelope = (
                await self._c.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
            ).risk_policy
            policy = self._open(envelope, valuation_pb2.RiskPolicy, CLIENT)
            if policy.version <= self._policy.version:
                return None
            self.evidence.relied_on_by_custodian(envelope)
            return policy

        policy = await self._until(f"{EXCHANGE} to draw on its insurance fund", new_policy)
        fund_after = decimal_of(policy.insurance_fund_balance)
        say.step(
            f"{EXCHANGE} publishes risk policy v{policy.version}: insurance fund "
            f"{say.amount(fund_before)} -> {say.amount(fund_after)}"
        )
        allocation = self._open(
            record.shortfall_allocation, liquidation_pb2.ShortfallAllocation, CUSTODIAN
        )
        self.evidence.relied_on_by_custodian(record.shortfall_allocation)
        covered = decimal_of(allocation.covered_by_insurance_fund)
        deleveraged = decimal_of(allocation.auto_deleveraging_amount)
        ranking = " > ".join(
            f"{r.rank}. {r.account_id} ({say.amount(r.score.value)})" for r in allocation.ranking
        )
        say.step(
            f"ShortfallAllocation, signed by {EXCHANGE}: shortfall "
            f"{say.amount(allocation.shortfall.value)}; the insurance fund covers "
            f"{say.amount(covered)}, {say.amount(deleveraged)} left for auto-deleveraging"
            + (f" (ranking {ranking})" if ranking else "")
        )
        if (
            allocation.liquidation_id != receipt.liquidation_id
            or decimal_of(allocation.shortfall) != shortfall
            or covered != fund_before - fund_after
            or decimal_of(allocation.insurance_fund_balance_after) != fund_after
        ):
            raise StateError(
                f"the allocation of {allocation.liquidation_id} (shortfall "
                f"{allocation.shortfall.value}, fund {allocation.insurance_fund_balance_after.value} "
                f"after) disagrees with the receipt of {receipt.liquidation_id} (shortfall "
                f"{format_amount(shortfall)}) or the policy (fund {format_amount(fund_after)})",
                metadata={
                    "expected": f"{receipt.liquidation_id} {format_amount(shortfall)} "
                    f"{format_amount(fund_after)}",
                    "actual": f"{allocation.liquidation_id} {allocation.shortfall.value} "
                    f"{allocation.insurance_fund_balance_after.value}",
                },
            )
        say.check(
            "the allocation covers the receipt's shortfall, and its draw is the one the new "
            "policy publishes"
        )
        credit = await self._until(
            f"{EXCHANGE} to close the account out",
            self._credit_where(
                lambda c: decimal_of(c.exposure) == 0 and cites(c, after.ref.leaf_index)
            ),
        )
        states = await self._margin_calls()
        say.step(
            f"CreditLine: exposure {say.amount(credit.exposure.value)}, collateral value "
            f"{say.amount(credit.collateral_value.value)}; left with {CUSTODIAN}: "
            f"{positions_text(after.statement)}"
        )
        say.detail("margin calls: " + (" · ".join(status_name(s.status) for s in states) or "none"))

    async def _liquidation_record(self) -> liquidation_pb2.LiquidationRecord | None:
        """The account's liquidation once its receipt (and any allocation) is recorded."""
        listed = await self._c.exchange.list_liquidations(
            exchange_service_pb2.ListLiquidationsRequest(account_id=ACCOUNT)
        )
        for record in listed.liquidations:
            if not record.HasField("liquidation_receipt"):
                continue
            receipt = liquidation_pb2.LiquidationReceipt.FromString(
                record.liquidation_receipt.payload
            )
            # Parsed unverified only to know whether to wait; verified before any use.
            if decimal_of(receipt.shortfall) == 0 or record.HasField("shortfall_allocation"):
                return record
        return None
