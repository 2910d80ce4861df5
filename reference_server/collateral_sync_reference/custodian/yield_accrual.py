"""Assets arriving from outside: deposits, and the daily yield on fund holdings.

Fund tokens (assets with a ``daily_yield_rate``) accrue yield once a day at the
configured UTC yield time. The accrued quantity is added to the holding and
kept apart as undistributed yield: it cannot be pledged, and a liquidation
pays it out before it sells anything. The last yield time accrued is stored
with the accrual, so the scheduler (:meth:`Custodian.run_due`) catches up on
every day it missed and a restart never accrues a day twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from collateral_sync.amounts import amount_to_proto
from collateral_sync.keys import _to_timestamp
from collateral_sync.v1 import position_sync_pb2, test_control_pb2

from collateral_sync_reference.custodian.ledger import (
    _REASON,
    _ROUNDING,
    Ledger,
    _add,
    _Change,
    _positive_amount,
    _round_down,
)
from collateral_sync_reference.custodian.store import from_us, to_us

__all__ = ["YieldAccrual"]

_YIELD_KEY = "custodian_yield_last_boundary_us"


class YieldAccrual:
    """Deposits (TestControlService.Deposit) and the daily yield accrual."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def deposit(self, request: test_control_pb2.DepositRequest) -> None:
        """Credit assets arriving from outside (TestControlService.Deposit)."""
        ledger = self._ledger
        now = ledger.clock.now()
        account = ledger._account(request.account_id, "account_id")
        asset_id = ledger._asset(request.asset_id, "asset_id")
        quantity = _positive_amount(request, "quantity", "quantity")
        with ledger.storage.transaction():
            holding = account.holding(asset_id)
            holding.quantity = _add(holding.quantity, quantity)
            ledger._attest([_Change(account, _REASON.HOLDINGS_CHANGE_REASON_DEPOSIT)], now)

    def accrue_yield(self, accrual_time: datetime, *, boundary: datetime | None = None) -> int:
        """Accrue one day's yield on every fund holding; returns the accounts changed.

        With ``boundary`` (a scheduled run) the boundary is recorded as done in
        the same transaction, so a restart never accrues a day twice.
        """
        ledger = self._ledger
        now = ledger.clock.now()
        rates = {
            a.asset_id: a.daily_yield_rate
            for a in ledger.settings.assets.values()
            if a.daily_yield_rate is not None
        }
        with ledger.storage.transaction():
            changes: list[_Change] = []
            accrued: list[list[tuple[str, Decimal]]] = []
            for account_id in ledger.store.accounts_holding(rates):
                account = ledger.store.account(account_id)
                if account is None:  # pragma: no cover - listed from the same table
                    continue
                amounts = []
                for asset_id, rate in sorted(rates.items()):
                    holding = account.holdings.get(asset_id)
                    if holding is None or holding.quantity <= 0:
                        continue
                    amount = _round_down(_ROUNDING.multiply(holding.quantity, rate))
                    if amount <= 0:
                        continue
                    holding.quantity = _add(holding.quantity, amount)
                    holding.accrued_yield = _add(holding.accrued_yield, amount)
                    amounts.append((asset_id, amount))
                if amounts:
                    changes.append(_Change(account, _REASON.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL))
                    accrued.append(amounts)
            issued = ledger._attest(changes, now)
            for change, (_, ref), amounts in zip(changes, issued, accrued, strict=True):
                account = change.account
                if not account.exchange_id:
                    continue
                for asset_id, amount in amounts:
                    update = position_sync_pb2.YieldAccrual(
                        account_id=account.account_id,
                        asset_id=asset_id,
                        accrued_quantity=amount_to_proto(amount),
                        attestation=ref,
                    )
                    update.accrual_time.CopyFrom(_to_timestamp(accrual_time))
                    ledger._announce(
                        account.exchange_id, position_sync_pb2.PositionUpdate(yield_accrual=update)
                    )
            if boundary is not None:
                ledger.storage.set_meta(_YIELD_KEY, str(to_us(boundary)))
        return len(changes)

    # ------------------------------------------------------------------ yield boundaries

    def _yield_boundary(self, moment: datetime) -> datetime:
        """The latest daily yield time at or before ``moment``."""
        at = datetime.combine(moment.date(), self._ledger.settings.yield_time, tzinfo=moment.tzinfo)
        return at if at <= moment else at - timedelta(days=1)

    def _last_yield_boundary(self) -> datetime:
        ledger = self._ledger
        stored = ledger.storage.get_meta(_YIELD_KEY)
        if stored is not None:
            return from_us(int(stored))
        # First start: accrual begins with the next yield time, not retroactively.
        boundary = self._yield_boundary(ledger.clock.now())
        with ledger.storage.transaction():
            ledger.storage.set_meta(_YIELD_KEY, str(to_us(boundary)))
        return boundary
