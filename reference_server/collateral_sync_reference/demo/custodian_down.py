"""Act 16 of the demo: the custodian goes down, and the exchange freezes credit until it is back.

The custodian's process is killed (SIGKILL). Once the exchange has heard
nothing on the sync stream for its policy's ``custodian_staleness_window``,
the custodian is silent (PROTOCOL.md §11.2): a price rise of an asset the
account holds raises no credit limit, however the exchange revalues. The
custodian restarts on the same data and address, the exchange re-dials and
resumes the stream, and the same valuation raises the limit. The price is
then put back, so the acts after this one see the figures they would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import StateError
from collateral_sync.v1 import test_control_pb2, valuation_pb2
from collateral_sync.valuation import custodian_staleness_window

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.scenario import CUSTODIAN, EXCHANGE, SECOND_ACCOUNT
from collateral_sync_reference.demo.stage import Stage

__all__ = ["CustodianDownAct"]

#: The price rise the act applies while the custodian is silent.
_RISE = Decimal("1.2")


class CustodianDownAct(Stage):
    """Act 16: credit frozen while the custodian is silent, raised once it is heard again."""

    _custodian_goes_down: Callable[[], Awaitable[None]]
    _custodian_comes_back: Callable[[], Awaitable[int]]

    async def _limit(self) -> valuation_pb2.CreditLine:
        await self._c.exchange_control.run_valuation(
            test_control_pb2.RunValuationRequest(account_id=SECOND_ACCOUNT)
        )
        found = await self._credit_line(SECOND_ACCOUNT)
        if found is None:
            raise StateError(
                f"{EXCHANGE} has no credit line for {SECOND_ACCOUNT}",
                metadata={"expected": "a credit line", "actual": "none"},
            )
        self.evidence.relied_on_by_custodian(found[0])
        return found[1]

    async def _custodian_down(self) -> None:
        say.section("16. The custodian goes down: no credit rises until the exchange hears it")
        before = await self._limit()
        counted = [v for v in before.valuations if parse_amount(v.collateral_value.value) > 0]
        row = max(counted, key=lambda v: parse_amount(v.collateral_value.value))
        asset, price = row.asset_id, parse_amount(row.price.value)
        risen = (price * _RISE).normalize()
        window = custodian_staleness_window(self._policy)

        await self._custodian_goes_down()
        say.step(
            f"{CUSTODIAN}'s process is killed (SIGKILL); {EXCHANGE} hears nothing more on the "
            "position-sync stream"
        )
        await asyncio.sleep(window.total_seconds() + 1.5)
        say.step(
            f"after its policy's custodian_staleness_window ({window.total_seconds():g} s) "
            f"{EXCHANGE} counts {CUSTODIAN} silent (PROTOCOL.md §11.2): until it hears it again, "
            "no credit limit rises, nothing is liquidated, a call falling due is withdrawn"
        )
        await self._set_price(asset, format_amount(risen))
        during = await self._limit()
        limit = before.credit_limit.value
        if parse_amount(during.credit_limit.value) > parse_amount(limit):
            raise StateError(
                f"{EXCHANGE} raised {SECOND_ACCOUNT}'s credit limit while {CUSTODIAN} was silent",
                metadata={"expected": f"<= {limit}", "actual": during.credit_limit.value},
            )
        say.step(
            f"the scripted feed moves {asset} {say.amount(format_amount(price))} -> "
            f"{say.amount(format_amount(risen))}; {EXCHANGE} revalues {SECOND_ACCOUNT} and keeps its "
            f"credit limit at {say.amount(limit)}"
        )

        pid = await self._custodian_comes_back()
        say.step(
            f"{CUSTODIAN} restarts on the same database and address (pid {pid}); {EXCHANGE} "
            "re-dials and resumes the stream where both logs left off"
        )

        async def raised() -> valuation_pb2.CreditLine | None:
            line = await self._limit()
            return line if parse_amount(line.credit_limit.value) > parse_amount(limit) else None

        after = await self._until(
            f"{EXCHANGE} to raise the limit once it hears {CUSTODIAN}", raised
        )
        say.check(
            f"heard again, the same valuation counts: credit limit {say.amount(limit)} -> "
            f"{say.amount(after.credit_limit.value)}"
        )
        await self._set_price(asset, format_amount(price))
        back = await self._limit()
        say.detail(
            f"{asset} back at {say.amount(format_amount(price))}: credit limit "
            f"{say.amount(back.credit_limit.value)}"
        )
