"""Acts 5 to 8 of the demo: credit, exposure, a margin call, its top-up and its dispute resolved."""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal

from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.errors import StateError
from collateral_sync.v1 import margin_pb2, test_control_pb2, valuation_pb2
from collateral_sync.valuation import collateral_ratio, recompute_margin_call

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.facts import (
    asset_class_name,
    cites,
    decimal_of,
    reason_name,
    status_name,
)
from collateral_sync_reference.demo.scenario import (
    ACCOUNT,
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    EXPOSURE,
    FIRST_DROP,
    PRICES,
    TOP_UP,
)
from collateral_sync_reference.demo.stage import Stage

__all__ = ["MarginActs"]

_S = margin_pb2.MarginCallStatus
#: A call in these states still asks for something (§8.1): after the top-up, none may remain.
_OPEN = frozenset(
    {
        _S.MARGIN_CALL_STATUS_ISSUED,
        _S.MARGIN_CALL_STATUS_AGREED,
        _S.MARGIN_CALL_STATUS_PARTIALLY_AGREED,
        _S.MARGIN_CALL_STATUS_DISPUTED,
    }
)


class MarginActs(Stage):
    """Credit, exposure, a margin call recomputed from its signed inputs, the top-up (acts 5-8)."""

    def _credit_figures(self) -> None:
        say.section("5. Credit: haircuts, concentration cap and the 2x leverage cap")
        credit = self._credit
        say.step(
            f"from {EXCHANGE}'s signed CreditLine (risk policy v{credit.risk_policy_version}, "
            f"prices from its '{self._policy.price_source}' source):"
        )
        rows = []
        haircut_total = Decimal(0)
        capped = []
        for row in credit.valuations:
            haircut = decimal_of(row.market_value) * decimal_of(row.collateral_factor)
            haircut_total += haircut
            value = decimal_of(row.collateral_value)
            # Rounded down at the policy's scale; anything further below is the cap.
            if value < haircut - Decimal(1).scaleb(-self._policy.rounding_scale):
                capped.append(row)
            rows.append(
                [
                    row.asset_id,
                    asset_class_name(row.asset_class),
                    say.amount(row.eligible_quantity.value),
                    say.amount(row.price.value),
                    say.amount(row.market_value.value),
                    row.collateral_factor.value,
                    say.amount(value) + (" capped" if row in capped else ""),
                ]
            )
        say.table(
            ["asset", "class", "eligible", "price", "market value", "haircut", "collateral value"],
            rows,
        )
        caps = {c.asset_class: c.max_share.value for c in self._policy.concentration_caps}
        for row in capped:
            say.detail(
                f"{row.asset_id}: {asset_class_name(row.asset_class)} may count at most "
                f"{caps.get(row.asset_class, '?')} of the haircut total "
                f"{say.amount(haircut_total)}, so {say.amount(row.collateral_value.value)}"
            )
        say.detail(
            f"collateral value {say.amount(credit.collateral_value.value)} x leverage cap "
            f"{self._policy.leverage_cap.value} = credit limit {say.amount(credit.credit_limit.value)}"
        )

    def _ratio(self, credit: valuation_pb2.CreditLine) -> str:
        ratio = collateral_ratio(
            self._policy, decimal_of(credit.collateral_value), decimal_of(credit.exposure)
        )
        return "none (no exposure)" if ratio is None else format_amount(ratio)

    async def _exposure(self) -> None:
        say.section("6. Exposure: the account trades on its credit")
        await self._c.exchange_control.set_exposure(
            test_control_pb2.SetExposureRequest(
                account_id=ACCOUNT, exposure=amount_to_proto(EXPOSURE)
            )
        )
        say.step(f"the desk sets exposure {say.amount(EXPOSURE)} (TestControl: no trading engine)")
        credit = await self._until(
            "a CreditLine with the exposure",
            self._credit_where(lambda c: decimal_of(c.exposure) == parse_amount(EXPOSURE)),
        )
        say.detail(
            f"CreditLine: exposure {say.amount(credit.exposure.value)} within the credit limit "
            f"{say.amount(credit.credit_limit.value)}; collateral ratio {self._ratio(credit)} "
            f"(margin call below {self._policy.maintenance_ratio.value})"
        )

    async def _first_drop(self) -> str:
        say.section("7. Price drop: a margin call anyone can recompute")
        asset, price = FIRST_DROP
        await self._set_price(asset, price)
        say.step(
            f"the scripted price feed moves {asset} {say.amount(PRICES[asset])} -> {say.amount(price)}"
        )

        async def answered() -> margin_pb2.MarginCallState | None:
            states = [
                s for s in await self._margin_calls() if s.status != _S.MARGIN_CALL_STATUS_ISSUED
            ]
            return states[0] if states else None

        state = await self._until(f"{CUSTODIAN} to answer a margin call", answered)
        check = recompute_margin_call(
            state.margin_call, self._registry, audience=CUSTODIAN, now=self._clock.now()
        )
        self.evidence.relied_on_by_custodian(state.margin_call)
        call = check.margin_call
        snapshot = valuation_pb2.PriceSnapshot.FromString(call.inputs.price_snapshot.payload)
        say.step(
            f"{EXCHANGE} issues margin call {call.margin_call_id[:15]}... to {CUSTODIAN} "
            f"under risk policy v{call.risk_policy_version}:"
        )
        say.detail(
            f"collateral value {say.amount(call.collateral_value.value)} / exposure "
            f"{say.amount(call.exposure.value)} = ratio {call.collateral_ratio.value}, below "
            f"{self._policy.maintenance_ratio.value}"
        )
        say.detail(
            f"call amount {say.amount(call.call_amount.value)} (exposure x "
            f"{self._policy.maintenance_ratio.value} - collateral value), due by "
            f"{call.due_by.ToDatetime(tzinfo=UTC):%Y-%m-%d %H:%M} UTC"
        )
        say.detail(
            f"signed inputs inside the call: risk policy v{check.risk_policy.version}, holdings "
            f"statement epoch {check.holdings.epoch}, price snapshot "
            + " · ".join(f"{q.asset_id} {say.amount(q.price.value)}" for q in snapshot.prices)
        )
        say.check(
            "recomputed from those signed inputs alone (collateral_sync.valuation."
            "recompute_margin_call): collateral value, ratio, call amount and due date match"
        )
        agreed = decimal_of(state.agreed_amount)
        say.step(
            f"{CUSTODIAN} recomputes every call before it answers (a call that does not "
            "recompute is disputed, reason ARITHMETIC); its answer on the sync stream:"
        )
        say.detail(
            f"{status_name(state.status)}: {say.amount(agreed)} agreed and due, "
            f"{say.amount(decimal_of(state.call_amount) - agreed)} disputed"
        )
        return call.margin_call_id

    async def _top_up(self, call_id: str) -> None:
        say.section(
            "8. Top-up: the agreed part is covered, the call satisfied, the dispute resolved"
        )
        asset, quantity = TOP_UP
        attested = await self._pledge(asset, quantity)
        self._holdings = attested
        say.step(
            f"{CLIENT} pledges {asset} {say.amount(quantity)} more: {CUSTODIAN} attests epoch "
            f"{attested.statement.epoch} ({reason_name(attested.statement)}) at leaf "
            f"{attested.ref.leaf_index}"
        )
        self._proven(
            await self.evidence.prove_holdings(attested.envelope, attested.ref), attested.ref
        )

        async def satisfied() -> margin_pb2.MarginCallState | None:
            for state in await self._margin_calls():
                if (
                    state.margin_call_id == call_id
                    and state.status == _S.MARGIN_CALL_STATUS_SATISFIED
                ):
                    return state
            return None

        state = await self._until("the margin call to be satisfied", satisfied)
        say.step(
            f"{EXCHANGE}: margin call {status_name(state.status)}, the top-up is worth "
            f"{say.amount(state.satisfied_amount.value)} under the call's own prices "
            f">= {say.amount(state.agreed_amount.value)} due"
        )
        credit = await self._until(
            f"{EXCHANGE} to credit the top-up",
            self._credit_where(lambda c: cites(c, attested.ref.leaf_index)),
        )
        say.detail(
            f"CreditLine: collateral value {say.amount(credit.collateral_value.value)}, ratio "
            f"{self._ratio(credit)} (back above {self._policy.maintenance_ratio.value}), credit "
            f"limit {say.amount(credit.credit_limit.value)}"
        )
        await self._dispute_resolved(state, credit)

    async def _dispute_resolved(
        self, state: margin_pb2.MarginCallState, credit: valuation_pb2.CreditLine
    ) -> None:
        """The disputed part (PROTOCOL.md §8.1): covered, re-checked, and no call left open."""
        call_amount = decimal_of(state.call_amount)
        disputed = call_amount - decimal_of(state.agreed_amount)
        covered = decimal_of(state.satisfied_amount)
        ratio = collateral_ratio(
            self._policy, decimal_of(credit.collateral_value), decimal_of(credit.exposure)
        )
        maintenance = decimal_of(self._policy.maintenance_ratio)
        open_calls = [s for s in await self._margin_calls() if s.status in _OPEN]
        if covered < call_amount or ratio is None or ratio < maintenance or open_calls:
            raise StateError(
                f"expected the top-up to cover the whole call {format_amount(call_amount)} "
                f"and no call left open; it is worth {format_amount(covered)}, ratio "
                f"{self._ratio(credit)}, {len(open_calls)} call(s) open",
                metadata={"expected": "the dispute resolved", "actual": "a call still open"},
            )
        say.step(
            f"the disputed {say.amount(disputed)}: the top-up's "
            f"{say.amount(covered)} covers the whole call amount {say.amount(call_amount)} "
            "too, so nothing in dispute is left unsecured"
        )
        say.detail(
            f"{EXCHANGE} re-checks the account at its current prices: ratio {self._ratio(credit)} "
            f">= {self._policy.maintenance_ratio.value}, so no new call is due for the disputed "
            "part and none is issued"
        )
        say.check(
            f"dispute resolved: {len(await self._margin_calls())} margin call on {ACCOUNT}, "
            f"{status_name(state.status)}; none ISSUED, AGREED, PARTIALLY_AGREED or DISPUTED"
        )
