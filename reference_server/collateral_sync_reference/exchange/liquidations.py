"""The reference exchange's liquidations: instructed, answered, and any shortfall allocated.

An expired margin call, or a ratio below the liquidation line, leads to a
signed ``LiquidationInstruction`` (:meth:`Liquidations.instruct`), delivered
by the liquidation submitter (``instruction_delivery``). The custodian's
``LiquidationReceipt`` (its answer, or its copy on the stream) closes the
liquidation out: proceeds and, for a shortfall, the waterfall of PROTOCOL.md
§9.5 (insurance fund first, then auto-deleveraging), signed as a
``ShortfallAllocation``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import ROUND_FLOOR, Context, Decimal

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError, StateError
from collateral_sync.signing import VerifiedStatement
from collateral_sync.v1 import (
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    AdlCandidate,
    allocate_shortfall,
    liquidation_shortfall,
    recompute_liquidation_instruction,
)

from collateral_sync_reference.common.paging import Listing, rows_per_page
from collateral_sync_reference.exchange.context import (
    ExchangeContext,
    is_stale,
    refuted,
    to_ns,
    unknown_account,
    wire_decimal,
)
from collateral_sync_reference.exchange.custodian_statements import CustodianStatements
from collateral_sync_reference.exchange.holdings import AttestedHoldings
from collateral_sync_reference.exchange.margin import TERMINAL
from collateral_sync_reference.exchange.margin_calls import MarginCalls
from collateral_sync_reference.exchange.risk_policy import RiskPolicies
from collateral_sync_reference.exchange.store import LiquidationRow, MarginCallRow
from collateral_sync_reference.exchange.valuation import AccountValuation, Valuer

__all__ = ["Liquidations"]

_R = errors_pb2.ErrorReason
_S = margin_pb2.MarginCallStatus
_ZERO = Decimal(0)
# Room for any canonical amount and quotient; FLOOR as the wire's "round down".
_WIDE = Context(prec=200, rounding=ROUND_FLOOR)
# A distinct tag so a margin-call token cannot page through liquidations.
_LISTING = Listing("ListLiquidations", tag="lq1:")


class Liquidations:
    """The exchange's liquidation instructions, the custodian's receipts, and shortfalls."""

    def __init__(
        self,
        context: ExchangeContext,
        statements: CustodianStatements,
        policies: RiskPolicies,
        valuer: Valuer,
        margin_calls: MarginCalls,
        *,
        holdings: AttestedHoldings,
    ) -> None:
        self._context = context
        self._statements = statements
        self._policies = policies
        self._valuer = valuer
        self._margin_calls = margin_calls
        self._holdings = holdings
        self._store = context.store
        self._settings = context.settings
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a liquidation instruction is recorded for delivery."""
        self._listeners.append(listener)

    def instruct(
        self, account_id: str, valued: AccountValuation, call: MarginCallRow | None, now: datetime
    ) -> str:
        """Instruct a liquidation after an expired ``call``, or a breach (None); return its id."""
        # After an expired call the amount is that call's exposure, which the
        # custodian checks (§9.2); after a breach it is the exposure now.
        amount = valued.exposure if call is None else call.exposure
        path_id = self._store.liquidations.path(account_id) or ""
        if not path_id:
            self._context.logger.warning(
                "no pledge of %s has announced a pre-authorised liquidation path; the "
                "custodian will refuse the instruction (PATH_NOT_AUTHORISED)",
                account_id,
            )
        liquidation_id = f"liq-{uuid.uuid4().hex}"
        instruction = liquidation_pb2.LiquidationInstruction(
            liquidation_id=liquidation_id,
            account_id=account_id,
            margin_call_id="" if call is None else call.margin_call_id,
            amount=wire_decimal(amount),
            liquidation_path_id=path_id,
            inputs=self._valuer.inputs(valued, now),
            risk_policy_version=valued.policy.version,
        )
        envelope = self._context.sign(
            instruction,
            audience=[self._settings.custodian_id],
            ttl=self._settings.instruction_ttl,
            now=now,
            statement_id=liquidation_id,
        )
        recompute_liquidation_instruction(
            envelope,
            self._context.registry,
            audience=self._settings.custodian_id,
            now=now,
            margin_call=None
            if call is None
            else margin_pb2.MarginCall.FromString(call.call_envelope.payload),
        )
        self._store.liquidations.add(
            liquidation_id=liquidation_id,
            account_id=account_id,
            margin_call_id="" if call is None else call.margin_call_id,
            amount=amount,
            liquidation_path_id=path_id,
            instruction=envelope,
            instructed_at_ns=to_ns(now),
        )
        # Delivered by SubmitLiquidationInstruction (the liquidation submitter),
        # not on the stream: a refusal then comes back as a status for this one
        # instruction, where on the stream it would fail the batch and block
        # every later entry; the custodian executes an instruction once and
        # answers a repeat with the same receipt, so retries are safe.
        for listener in self._listeners:
            listener()
        self._context.logger.info(
            "liquidation %s of %s for %s (%s)",
            liquidation_id,
            account_id,
            format_amount(amount),
            "breach" if call is None else f"expired call {call.margin_call_id}",
        )
        return liquidation_id

    def receive_receipt(
        self, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        """A receipt on the stream (inside the batch's transaction); a refused one is kept."""
        # The custodian sends every receipt on the stream, including those it
        # already returned from SubmitLiquidationInstruction: a copy of a
        # recorded receipt is no news, and must not fail the batch as a replay.
        verified = self._statements.verify_embedded(
            envelope, liquidation_pb2.LiquidationReceipt, now, replay=False
        )
        if self._is_recorded_receipt(verified):
            return
        self._context.replay.check(verified.issuer, verified.payload_type, verified.sequence)
        self._statements.act_or_reject(
            sequence,
            "liquidation_receipt",
            envelope,
            now,
            lambda: self._act_on_receipt(verified, now),
        )

    def _is_recorded_receipt(
        self, verified: VerifiedStatement[liquidation_pb2.LiquidationReceipt]
    ) -> bool:
        liquidation = self._store.liquidations.get(verified.message.liquidation_id)
        return (
            liquidation is not None
            and liquidation.receipt is not None
            and liquidation.receipt.payload == verified.payload
        )

    def _act_on_receipt(
        self, verified: VerifiedStatement[liquidation_pb2.LiquidationReceipt], now: datetime
    ) -> None:
        receipt = verified.message
        liquidation = self._store.liquidations.get(receipt.liquidation_id)
        if liquidation is None:
            raise StateError(
                f"no liquidation {receipt.liquidation_id!r} was instructed",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "expected": "an instructed liquidation id",
                    "actual": receipt.liquidation_id,
                },
            )
        if receipt.account_id != liquidation.account_id:
            raise refuted(
                "liquidation_receipt.account_id", liquidation.account_id, receipt.account_id
            )
        if liquidation.status != "instructed":
            raise StateError(
                f"liquidation {receipt.liquidation_id} already has a receipt",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={"expected": "instructed", "actual": liquidation.status},
            )
        total = parse_amount(
            receipt.total_proceeds.value, field="liquidation_receipt.total_proceeds"
        )
        fills = _ZERO
        for i, fill in enumerate(receipt.fills):
            fills = _WIDE.add(
                fills,
                parse_amount(fill.proceeds.value, field=f"liquidation_receipt.fills[{i}].proceeds"),
            )
        if fills != total:
            raise refuted(
                "liquidation_receipt.total_proceeds", format_amount(fills), format_amount(total)
            )
        shortfall = liquidation_shortfall(liquidation.amount, total)
        stated = parse_amount(receipt.shortfall.value or "0", field="liquidation_receipt.shortfall")
        if stated != shortfall:
            raise refuted(
                "liquidation_receipt.shortfall", format_amount(shortfall), format_amount(stated)
            )

        allocation = None
        if shortfall > 0:
            allocation = self._allocate_shortfall(
                liquidation.liquidation_id, liquidation.account_id, shortfall, now
            )
        self._store.liquidations.record_receipt(
            liquidation.liquidation_id,
            receipt=verified.envelope,
            total_proceeds=total,
            shortfall=shortfall,
            allocation=allocation,
            executed_at_ns=to_ns(now),
        )
        self._context.replay.record(verified)
        account = self._store.accounts.get(liquidation.account_id)
        assert account is not None
        # Closed out: proceeds and the waterfall together cover the amount instructed.
        self._store.accounts.set_exposure(
            liquidation.account_id, max(_ZERO, account.exposure - liquidation.amount)
        )
        for call in self._store.margin_calls.of_account(liquidation.account_id):
            if call.status not in TERMINAL:
                self._margin_calls.set_status(call, _S.MARGIN_CALL_STATUS_WITHDRAWN, now)
        self._context.logger.info(
            "liquidation %s executed: proceeds %s, shortfall %s",
            liquidation.liquidation_id,
            format_amount(total),
            format_amount(shortfall),
        )
        # The receipt stands even if the account cannot be revalued now.
        self._context.revalue_each([liquidation.account_id], now)

    def _allocate_shortfall(
        self, liquidation_id: str, liquidated_account: str, shortfall: Decimal, now: datetime
    ) -> envelope_pb2.Envelope:
        """PROTOCOL.md §9.5: insurance fund first, the rest ranked for auto-deleveraging."""
        policy, _ = self._policies.in_force(now)
        candidates = [
            candidate
            for account_id in self._store.accounts.ids()
            if account_id != liquidated_account
            for candidate in [self._adl_candidate(account_id)]
            if candidate is not None
        ]
        figures = allocate_shortfall(policy, shortfall, candidates)
        allocation = figures.to_proto(liquidation_id)
        envelope = self._context.sign(
            allocation,
            audience=[self._settings.custodian_id],
            ttl=self._settings.statement_ttl,
            now=now,
        )
        if figures.covered_by_insurance_fund > 0:
            # The balance is part of the published policy: a new version says what is left.
            content = valuation_pb2.RiskPolicy()
            content.CopyFrom(policy)
            content.insurance_fund_balance.CopyFrom(
                wire_decimal(figures.insurance_fund_balance_after)
            )
            self._policies.publish(content, now)
        self._context.logger.info(
            "shortfall %s of %s: insurance fund %s, auto-deleveraging %s over %d accounts",
            format_amount(shortfall),
            liquidation_id,
            format_amount(figures.covered_by_insurance_fund),
            format_amount(figures.auto_deleveraging_amount),
            len(figures.ranking),
        )
        return envelope

    def _adl_candidate(self, account_id: str) -> AdlCandidate | None:
        """An account with exposure, its profit (configured) and effective leverage.

        Effective leverage = exposure / collateral value of its latest credit
        line, rounded down to 18 places; an account with exposure and no
        collateral counts leverage 0 (there is nothing to scale it by).
        """
        account = self._store.accounts.get(account_id)
        if account is None or account.exposure <= 0:
            return None
        collateral = _ZERO
        if account.credit_line is not None:
            credit = valuation_pb2.CreditLine.FromString(account.credit_line.payload)
            collateral = parse_amount(credit.collateral_value.value)
        leverage = _ZERO
        if collateral > 0:
            leverage = _WIDE.divide(account.exposure, collateral).quantize(
                Decimal(1).scaleb(-18), context=_WIDE
            )
        return AdlCandidate(
            account_id=account_id, profit=account.profit, effective_leverage=leverage
        )

    def pending_liquidations(self) -> list[LiquidationRow]:
        """Instructions recorded and not yet answered by the custodian, oldest first."""
        return self._store.liquidations.in_status("instructed")

    def accept_receipt(self, envelope: envelope_pb2.Envelope, *, liquidation_id: str) -> bool:
        """Act on the receipt SubmitLiquidationInstruction returned for ``liquidation_id``.

        Returns False if it was already recorded (its copy came on the stream
        first). Raises the error for a receipt that does not verify, is for
        another liquidation, or does not add up; nothing is changed then.
        """
        now = self._context.now()
        verified = self._statements.verify(
            envelope, liquidation_pb2.LiquidationReceipt, now, replay=False
        )
        if verified.message.liquidation_id != liquidation_id:
            raise refuted(
                "liquidation_receipt.liquidation_id",
                liquidation_id,
                verified.message.liquidation_id,
            )
        if self._is_recorded_receipt(verified):
            return False
        self._context.replay.check(verified.issuer, verified.payload_type, verified.sequence)
        with self._context.storage.transaction():
            self._act_on_receipt(verified, now)
        return True

    def refuse_liquidation(self, liquidation_id: str, error: CollateralSyncError) -> None:
        """Record that the custodian refused an instruction (or its receipt was refused)."""
        now = self._context.now()
        with self._context.storage.transaction():
            self._store.liquidations.refuse(
                liquidation_id, reason=error.reason_name, detail=error.message, at_ns=to_ns(now)
            )
        self._context.logger.error("liquidation %s refused: %s", liquidation_id, error.message)

    def readers_of_liquidation(self, liquidation_id: str) -> frozenset[str] | None:
        """Who may read a liquidation (PROTOCOL.md §4.5): its account's parties (None: no such one)."""
        liquidation = self._store.liquidations.get(liquidation_id)
        if liquidation is None:
            return None
        return self._holdings.readers_of_account(liquidation.account_id)

    def shortfall_allocation(self, liquidation_id: str) -> envelope_pb2.Envelope:
        """GetShortfallAllocation: the signed allocation of a liquidation's shortfall.

        NOT_FOUND for a liquidation this exchange never instructed, and for one
        that has no allocation (not executed yet, or its proceeds covered the
        amount). Re-signed, same content, when less than half its lifetime is left.
        """
        liquidation = self._store.liquidations.get(liquidation_id)
        if liquidation is None:
            raise StateError(
                f"no liquidation {liquidation_id!r} was instructed by this exchange",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "liquidation_id",
                    "expected": "an instructed liquidation id",
                    "actual": liquidation_id,
                },
            )
        allocation = liquidation.allocation
        if allocation is None:
            shortfall = (
                "none yet"
                if liquidation.shortfall is None
                else format_amount(liquidation.shortfall)
            )
            raise StateError(
                f"liquidation {liquidation_id!r} ({liquidation.status}) has no shortfall "
                f"allocation: its shortfall is {shortfall}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "liquidation_id",
                    "expected": "an executed liquidation with a shortfall",
                    "actual": f"{liquidation.status}, shortfall {shortfall}",
                },
            )
        now = self._context.now()
        ttl = self._settings.statement_ttl
        if not is_stale(allocation, liquidation_pb2.ShortfallAllocation, ttl, now):
            return allocation
        with self._context.storage.transaction():
            resigned = self._context.resign_if_stale(
                allocation,
                liquidation_pb2.ShortfallAllocation,
                audience=[self._settings.custodian_id],
                ttl=ttl,
                now=now,
            )
            assert resigned is not None
            self._store.liquidations.replace_allocation(liquidation_id, resigned)
        return resigned

    def list_liquidations(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[liquidation_pb2.LiquidationRecord], str]:
        """ListLiquidations: an account's liquidations, oldest first, paged.

        Each record holds the instruction as sent and the custodian's receipt as
        received (neither is re-signed: they are what the two parties acted on),
        and the shortfall allocation as GetShortfallAllocation serves it.
        """
        after = _LISTING.after(page_token, account_id)
        if self._store.accounts.get(account_id) is None:
            raise unknown_account(account_id)
        size = rows_per_page(page_size)
        rows = self._store.liquidations.of_account(account_id, after_seq=after, limit=size + 1)
        page, token = _LISTING.page(rows, size, account_id)
        records = []
        for row in page:
            record = liquidation_pb2.LiquidationRecord(liquidation_instruction=row.instruction)
            if row.receipt is not None:
                record.liquidation_receipt.CopyFrom(row.receipt)
            if row.allocation is not None:
                record.shortfall_allocation.CopyFrom(self.shortfall_allocation(row.liquidation_id))
            records.append(record)
        return records, token
