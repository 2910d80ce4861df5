"""When the reference exchange revalues an account, and what a revaluation leads to.

Every change revalues the accounts it touches (:meth:`Revaluer.revalue`),
inside the transaction of the change: the account is valued
(:mod:`.valuation`) and a changed figure published as a new credit line
(:mod:`.credit_lines`); then, in order, a call past due_by with the amount
unpaid expires (and leads to a liquidation), running calls are measured for
satisfaction by attested top-ups, calls nobody agreed to are withdrawn once
the ratio is back at maintenance, and a ratio below the liquidation line
leads to a liquidation (:mod:`.liquidation`), one below maintenance to a
margin call (:mod:`.margin_calls`).

What starts a revaluation: credited holdings, a response or a receipt (the
parts that record them call back), and the requests here: SetExposure,
SetPrice and RunValuation in test mode, and the time-driven sweep.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError, MalformedError, StateError
from collateral_sync.v1 import errors_pb2, margin_pb2, valuation_pb2
from opentelemetry import trace

from collateral_sync_reference.exchange.context import (
    ExchangeContext,
    Revaluation,
    malformed,
    to_ns,
    unknown_account,
)
from collateral_sync_reference.exchange.credit_lines import CreditLines
from collateral_sync_reference.exchange.liquidations import Liquidations
from collateral_sync_reference.exchange.margin import (
    BLOCKING,
    EXPIRING,
    TERMINAL,
    WITHDRAWABLE_ON_RECOVERY,
)
from collateral_sync_reference.exchange.margin_calls import MarginCalls
from collateral_sync_reference.exchange.store import LiquidationRow
from collateral_sync_reference.exchange.valuation import Valuer

__all__ = ["Revaluer"]

_R = errors_pb2.ErrorReason
_S = margin_pb2.MarginCallStatus
# A no-op unless the server's config turns tracing on (common/tracing.py).
_TRACER = trace.get_tracer("collateral_sync_reference.exchange")


class Revaluer:
    """Revalues accounts and acts on what each revaluation shows; see the module docstring."""

    def __init__(
        self,
        context: ExchangeContext,
        valuer: Valuer,
        credit_lines: CreditLines,
        margin_calls: MarginCalls,
        liquidations: Liquidations,
    ) -> None:
        self._context = context
        self._valuer = valuer
        self._credit_lines = credit_lines
        self._margin_calls = margin_calls
        self._liquidations = liquidations
        self._store = context.store

    def revalue_each(self, account_ids: Iterable[str], now: datetime) -> list[Revaluation]:
        """Revalue accounts one by one: one that cannot be revalued stops none of the others.

        Acting on a valuation signs statements that rest on the account's latest
        attested holdings, verified as evidence when issued (PROTOCOL.md §8.2 step 2).
        If they no longer verify (the custodian let the attestation expire), no margin
        call or liquidation instruction anyone could check can be issued: the account's
        part of the transaction is undone, the reason logged, and the account stays as
        it was until the custodian attests it again. The others are revalued as usual.
        """
        done = []
        for account_id in account_ids:
            try:
                with self._context.storage.savepoint():
                    done.append(self.revalue(account_id, now))
            except CollateralSyncError as err:
                self._context.logger.warning(
                    "account %s not revalued: %s: %s", account_id, err.reason_name, err.message
                )
        return done

    def revalue(self, account_id: str, now: datetime) -> Revaluation:
        """Revalue one account inside the open transaction, and act on what it shows."""
        with _TRACER.start_as_current_span(
            "exchange.valuation", attributes={"collateral_sync.account_id": account_id}
        ) as span:
            revaluation = self._revalue(account_id, now)
            if span.is_recording():
                if revaluation.collateral_ratio is not None:
                    ratio = format_amount(revaluation.collateral_ratio)
                    span.set_attribute("collateral_sync.collateral_ratio", ratio)
                if revaluation.margin_call_id:
                    span.set_attribute("collateral_sync.margin_call_id", revaluation.margin_call_id)
                if revaluation.liquidation_id:
                    span.set_attribute("collateral_sync.liquidation_id", revaluation.liquidation_id)
            return revaluation

    def _revalue(self, account_id: str, now: datetime) -> Revaluation:
        self._store.accounts.ensure(account_id)
        valued = self._valuer.value(account_id, now)
        self._credit_lines.publish(account_id, valued, now)
        policy = valued.policy
        maintenance = parse_amount(policy.maintenance_ratio.value)
        liquidation_line = parse_amount(policy.liquidation_ratio.value)
        ratio = valued.ratio
        issued_call = ""
        instructed = ""

        calls = [
            c for c in self._store.margin_calls.of_account(account_id) if c.status not in TERMINAL
        ]
        liquidations = self._store.liquidations.of_account(account_id)
        in_flight = any(liq.status == "instructed" for liq in liquidations)
        if liquidations and _path_refused(
            liquidations[-1], self._store.liquidations.path(account_id)
        ):
            # The custodian refused the path we know; asking again would only be
            # refused again. A newly learned path lifts this.
            in_flight = True
        now_ns = to_ns(now)

        # While the custodian is silent what we hold of it may be out of date, and
        # the client cannot move collateral there: nothing is liquidated, and a call
        # falling due is withdrawn, to be issued anew once the custodian is heard (§11.2).
        silent = self._context.silence.is_silent(policy)

        # 1. Expiry: due_by passed with the amount due unpaid.
        for call in calls:
            if call.status in EXPIRING and now_ns > call.due_by_ns:
                if silent:
                    self._margin_calls.set_status(call, _S.MARGIN_CALL_STATUS_WITHDRAWN, now)
                    continue
                self._margin_calls.set_status(call, _S.MARGIN_CALL_STATUS_EXPIRED, now)
                if not in_flight and valued.holdings is not None and call.exposure > 0:
                    instructed = self._liquidations.instruct(account_id, valued, call, now)
                    in_flight = True
        calls = [
            c for c in self._store.margin_calls.of_account(account_id) if c.status not in TERMINAL
        ]

        # 2. Satisfaction by attested top-ups, measured under each call's own inputs.
        for call in calls:
            if call.status in BLOCKING:
                self._margin_calls.measure_satisfaction(call, valued, now)
        calls = [
            c for c in self._store.margin_calls.of_account(account_id) if c.status not in TERMINAL
        ]

        # 3. Recovery: a call nobody has agreed to is withdrawn once the ratio is back.
        #    With no exposure left (no ratio) there is nothing to secure: an agreed call
        #    is withdrawn too, rather than expire into a liquidation for a closed position.
        if ratio is None or ratio >= maintenance:
            withdrawable = (
                BLOCKING | WITHDRAWABLE_ON_RECOVERY if ratio is None else (WITHDRAWABLE_ON_RECOVERY)
            )
            for call in calls:
                if call.status in withdrawable:
                    self._margin_calls.set_status(call, _S.MARGIN_CALL_STATUS_WITHDRAWN, now)
            calls = [c for c in calls if c.status not in withdrawable]

        if not in_flight and not silent and ratio is not None and valued.holdings is not None:
            if ratio < liquidation_line:
                # 4. Past the liquidation line: close out; open calls are moot.
                for call in calls:
                    self._margin_calls.set_status(call, _S.MARGIN_CALL_STATUS_WITHDRAWN, now)
                instructed = self._liquidations.instruct(account_id, valued, None, now)
            elif ratio < maintenance and not any(c.status in BLOCKING for c in calls):
                # 5. Below maintenance, no call running: issue one. Its entry is
                #    appended in this span: the sync batch that carries it links here.
                with _TRACER.start_as_current_span("exchange.margin_call.issue") as span:
                    issued_call = self._margin_calls.issue(account_id, valued, now)
                    span.set_attribute("collateral_sync.margin_call_id", issued_call)
        return Revaluation(
            account_id=account_id,
            collateral_value=valued.collateral_value,
            credit_limit=valued.credit_limit,
            exposure=valued.exposure,
            collateral_ratio=ratio,
            margin_call_id=issued_call,
            liquidation_id=instructed,
        )

    # -- requests --

    def set_exposure(self, account_id: str, exposure: Decimal) -> Revaluation:
        """SetExposure (test mode): the account's exposure, then a revaluation."""
        if not account_id:
            raise malformed("account_id", "an account id", "''")
        if exposure < 0:
            raise MalformedError(
                f"exposure: expected >= 0, got {format_amount(exposure)}",
                reason=_R.ERROR_REASON_INVALID_AMOUNT,
                metadata={
                    "field": "exposure",
                    "expected": ">= 0",
                    "actual": format_amount(exposure),
                },
                field_violations={"exposure": "must be >= 0"},
            )
        now = self._context.now()
        with self._context.storage.transaction():
            self._store.accounts.set_exposure(account_id, exposure)
            return self.revalue(account_id, now)

    def set_price(self, quote: valuation_pb2.PriceQuote) -> list[Revaluation]:
        """Publish a price on the scripted source and revalue the accounts it moves."""
        setter = getattr(self._context.prices, "set_price", None)
        if setter is None:
            raise StateError(
                f"price source {self._context.prices.name!r} takes no prices from outside",
                metadata={
                    "expected": "a scripted price source",
                    "actual": self._context.prices.name,
                },
            )
        now = self._context.now()
        with self._context.storage.transaction():
            setter(quote, now=now)
            return self._sweep(now)

    def run_valuation(self, account_id: str) -> Revaluation:
        """RunValuation (test mode): revalue a known account now."""
        if self._store.accounts.get(account_id) is None:
            raise unknown_account(account_id)
        now = self._context.now()
        with self._context.storage.transaction():
            self._context.prices.tick(now)
            return self.revalue(account_id, now)

    def sweep(self, *, everything: bool = False) -> list[Revaluation]:
        """Time-driven work: scripted prices that fell due, calls past due_by.

        ``everything`` revalues every account (after the clock jumped, every
        price may have turned stale); otherwise only the accounts with a
        running call or a price that changed.
        """
        now = self._context.now()
        with self._context.storage.transaction():
            return self._sweep(now, everything=everything)

    def _sweep(self, now: datetime, *, everything: bool = False) -> list[Revaluation]:
        changed = self._context.prices.tick(now)
        accounts = set(self._store.accounts.ids()) if everything or changed else set()
        accounts.update(call.account_id for call in self._store.margin_calls.in_statuses(BLOCKING))
        return self.revalue_each(sorted(accounts), now)


def _path_refused(liquidation: LiquidationRow, known_path: str | None) -> bool:
    return (
        liquidation.status == "refused"
        and liquidation.refusal_reason == "PATH_NOT_AUTHORISED"
        and liquidation.liquidation_path_id == (known_path or "")
    )
