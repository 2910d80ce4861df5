"""Liquidation: a pledge is sold only along its pre-authorised path, yield paid out first.

An exchange's liquidation instruction arrives by ``SubmitLiquidationInstruction``
or on the sync stream. It is executed only when it verifies (stages a to g,
issued by the exchange that sent it), names the liquidation path in force for
the account and its exchange, follows an undisputed margin call that has
expired (if it names one), and recomputes from its signed inputs. Execution
pays out every undistributed yield accrual, then sells along the path's steps,
each within its maximum and the pledge, until the amount is raised; what is
not raised is the receipt's shortfall. A repeat of an executed instruction
returns the same signed receipt and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from collateral_sync.amounts import amount_from_proto, amount_to_proto
from collateral_sync.errors import StateError, VerificationError
from collateral_sync.signing import VerifiedStatement, sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import (
    envelope_pb2,
    liquidation_pb2,
    margin_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import recompute_liquidation_instruction

from collateral_sync_reference.common.errors import conflict as _conflict
from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.custodian.ledger import (
    _R,
    _REASON,
    _ROUNDING,
    _ZERO,
    Ledger,
    _add,
    _Change,
    _not_found,
    _round_down,
    _round_up,
    _sub,
)
from collateral_sync_reference.custodian.store import (
    Account,
    LiquidationRecord,
    PathRecord,
    to_us,
)

__all__ = ["Liquidations"]

_KIND = margin_pb2.MarginCallResponseKind
_RECEIPT_TYPE = payload_type_of(liquidation_pb2.LiquidationReceipt)


class Liquidations:
    """SubmitLiquidationInstruction, and the same instruction arriving on the sync stream."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def liquidate(
        self,
        envelope: envelope_pb2.Envelope,
        *,
        now: datetime,
        tls_peer: str | None = None,
    ) -> envelope_pb2.Envelope:
        """Execute a liquidation instruction along the pre-authorised path; return the receipt.

        SubmitLiquidationInstruction: in a transaction of its own; every
        refusal is the call's status. A repeat of an executed instruction
        returns its receipt and changes nothing.
        """
        verified, receipt = self._check_instruction(envelope, now, tls_peer=tls_peer)
        if receipt is not None:
            return receipt
        return self._liquidate_verified(verified, now, on_stream=False)

    def _check_instruction(
        self,
        envelope: envelope_pb2.Envelope,
        now: datetime,
        *,
        tls_peer: str | None,
        on_stream: bool = False,
    ) -> tuple[
        VerifiedStatement[liquidation_pb2.LiquidationInstruction], envelope_pb2.Envelope | None
    ]:
        """The instruction's integrity: stages a to g, and that its issuer is the sender.

        Returns the verified statement and, for a repeat of an instruction
        already executed, its receipt (a repeat is no replay: it is answered).
        """
        ledger = self._ledger
        verified = ledger._verify(
            envelope, liquidation_pb2.LiquidationInstruction, now, on_stream=on_stream
        )
        exchange = verified.issuer
        if tls_peer is not None and tls_peer != exchange:
            raise VerificationError(
                f"liquidation instruction issued by {exchange!r} arrived from {tls_peer!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": exchange, "actual": tls_peer},
            )
        liquidation_id = verified.message.liquidation_id
        executed = ledger.store.liquidation(liquidation_id) if liquidation_id else None
        if executed is not None and executed.instruction_payload == verified.payload:
            return verified, executed.receipt
        if executed is not None:
            # PROTOCOL.md §12.4: the id before stage g; other bytes under a used id are a
            # conflict whatever their sequence. On the stream the conflict is an update
            # recorded as rejected (§6.5), not a replay that fails the batch:
            # _liquidate_verified raises it inside the batch's savepoint.
            if not on_stream:
                raise _reused(liquidation_id)
            return verified, None
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)
        return verified, None

    def _liquidate_verified(
        self,
        verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction],
        now: datetime,
        *,
        on_stream: bool,
    ) -> envelope_pb2.Envelope:
        """What the instruction asks, checked, then executed (business refusals raise).

        On the stream it runs inside the batch's transaction; from the RPC in
        a transaction of its own.
        """
        ledger = self._ledger
        instruction = verified.message
        if not instruction.liquidation_id:
            raise _required("liquidation_instruction.liquidation_id", "a liquidation id")
        if ledger.store.liquidation(instruction.liquidation_id) is not None:
            raise _reused(instruction.liquidation_id)
        account = ledger._account(instruction.account_id, "liquidation_instruction.account_id")
        path = self._authorised_path(account, verified)
        margin_call = self._expired_margin_call(account, verified)
        issued_at = verified.header.issued_at.ToDatetime(tzinfo=now.tzinfo)
        check = recompute_liquidation_instruction(
            verified.envelope,
            ledger.registry,
            audience=ledger.party_id,
            asset_classes=ledger.asset_classes,
            now=issued_at if on_stream else now,
            margin_call=margin_call,
        )
        prices = _snapshot_prices(instruction.inputs.price_snapshot)
        steps = liquidation_pb2.LiquidationPath.FromString(path.envelope.payload).steps

        with contextlib.nullcontext() if on_stream else ledger.storage.transaction():
            return self._execute(
                account, verified, amount=check.amount, steps=steps, prices=prices, now=now
            )

    def _authorised_path(
        self, account: Account, verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction]
    ) -> PathRecord:
        """The recorded path the instruction names, if it is the one in force for its issuer."""
        instruction = verified.message
        path_id = instruction.liquidation_path_id
        exchange = verified.issuer

        def refuse(why: str, expected: str) -> VerificationError:
            return VerificationError(
                f"liquidation path {path_id!r} is not authorised: {why}",
                reason=_R.ERROR_REASON_PATH_NOT_AUTHORISED,
                metadata={
                    "field": "liquidation_instruction.liquidation_path_id",
                    "expected": expected,
                    "actual": path_id,
                },
            )

        if account.exchange_id != exchange:
            raise refuse(
                f"account {account.account_id!r} pledges to {account.exchange_id or 'no exchange'!r}, "
                f"not to the issuer {exchange!r}",
                "a path of the account's exchange",
            )
        paths = self._ledger.store.paths_for(account.account_id, exchange)
        in_force = [p.statement_id for p in paths]
        for position, path in enumerate(paths):
            if path.statement_id != path_id:
                continue
            issued_at = verified.header.issued_at.ToDatetime(tzinfo=path.recorded_at.tzinfo)
            later = paths[position + 1 :]
            if later and later[0].recorded_at <= issued_at:
                raise refuse(
                    f"superseded by path {later[0].statement_id!r} before the instruction was "
                    "issued",
                    later[-1].statement_id,
                )
            return path
        raise refuse(
            f"no path of that id was pre-authorised for account {account.account_id!r} and "
            f"exchange {exchange!r}",
            in_force[-1] if in_force else "a pre-authorised path",
        )

    def _expired_margin_call(
        self, account: Account, verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction]
    ) -> margin_pb2.MarginCall | None:
        """The margin call a liquidation follows, checked to have expired undisputed."""
        call_id = verified.message.margin_call_id
        if not call_id:
            return None
        record = self._ledger.store.margin_call(call_id)
        if record is None or record.account_id != account.account_id:
            raise _not_found("margin call", call_id, "liquidation_instruction.margin_call_id")
        if record.response_kind == _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE:
            raise _conflict(
                f"margin call {call_id!r} is disputed; a disputed call does not expire",
                "liquidation_instruction.margin_call_id",
                "an expired margin call",
                "DISPUTED",
            )
        issued_us = to_us(verified.header.issued_at.ToDatetime(tzinfo=record.due_by.tzinfo))
        # PROTOCOL.md §9.2: a call is open through its due_by (a response at due_by is in
        # time, §8.3); it has expired only for an instruction issued after it.
        if issued_us <= to_us(record.due_by):
            raise _conflict(
                f"margin call {call_id!r} is due by {record.due_by.isoformat()}; the "
                "instruction was issued at or before it, while the call was open",
                "liquidation_instruction.margin_call_id",
                f"issued after {record.due_by.isoformat()}",
                verified.header.issued_at.ToJsonString(),
            )
        return margin_pb2.MarginCall.FromString(record.envelope.payload)

    def _execute(
        self,
        account: Account,
        verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction],
        *,
        amount: Decimal,
        steps: Sequence[liquidation_pb2.LiquidationStep],
        prices: dict[str, Decimal],
        now: datetime,
    ) -> envelope_pb2.Envelope:
        """Yield first, then the path's steps in order until ``amount`` is raised; inside a transaction."""
        ledger = self._ledger
        instruction = verified.message
        receipt = liquidation_pb2.LiquidationReceipt(
            liquidation_id=instruction.liquidation_id, account_id=account.account_id
        )
        # 1. Yield rights come before any sale: pay out every undistributed accrual.
        for holding in sorted(account.holdings.values(), key=lambda h: h.asset_id):
            if holding.accrued_yield > 0:
                receipt.yield_distributions.add(
                    asset_id=holding.asset_id, quantity=amount_to_proto(holding.accrued_yield)
                )
                holding.quantity = _sub(holding.quantity, holding.accrued_yield)
                holding.accrued_yield = _ZERO
        # 2. Along the path only, each step within its maximum and the pledge.
        proceeds = _ZERO
        sold: dict[str, Decimal] = {}
        for step in steps:
            remaining = _sub(amount, proceeds)
            if remaining <= 0:
                break
            price = prices.get(step.asset_id, _ZERO)
            position = account.holdings.get(step.asset_id)
            if price <= 0 or position is None:
                continue
            sellable = min(
                amount_from_proto(step.max_quantity),
                position.pledged,
                _sub(position.quantity, position.locked),
            )
            needed = _round_up(_ROUNDING.divide(remaining, price))
            quantity = min(needed, sellable)
            if quantity <= 0:
                continue
            fill_proceeds = _round_down(_ROUNDING.multiply(quantity, price))
            position.quantity = _sub(position.quantity, quantity)
            position.pledged = _sub(position.pledged, quantity)
            proceeds = _add(proceeds, fill_proceeds)
            sold[step.asset_id] = _add(sold.get(step.asset_id, _ZERO), quantity)
            receipt.fills.add(
                asset_id=step.asset_id,
                quantity=amount_to_proto(quantity),
                price=amount_to_proto(price),
                proceeds=amount_to_proto(fill_proceeds),
                venue=step.venue,
            )
        receipt.total_proceeds.CopyFrom(amount_to_proto(proceeds))
        receipt.shortfall.CopyFrom(amount_to_proto(max(_ZERO, _sub(amount, proceeds))))
        [(_, ref)] = ledger._attest(
            [_Change(account, _REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION)], now
        )
        receipt.attestation.CopyFrom(ref)
        envelope = sign_statement(
            receipt,
            ledger.signer,
            audience=[verified.issuer],
            sequence=ledger.storage.next_sequence(_RECEIPT_TYPE),
            ttl=ledger.settings.statement_ttl,
            issued_at=now,
        )
        ledger.store.add_liquidation(
            LiquidationRecord(
                instruction.liquidation_id, account.account_id, verified.payload, envelope
            )
        )
        ledger.guard.record(verified)
        # On the exchange's log: the pledges as they now stand, then the receipt (§6.8).
        ledger._announce_pledges(account, sold, ref)
        ledger._announce(
            verified.issuer, position_sync_pb2.PositionUpdate(liquidation_receipt=envelope)
        )
        return envelope


def _snapshot_prices(envelope: envelope_pb2.Envelope) -> dict[str, Decimal]:
    """Prices of a price snapshot that already passed verification (recompute_* checked it)."""
    snapshot = valuation_pb2.PriceSnapshot.FromString(envelope.payload)
    return {
        quote.asset_id: amount_from_proto(quote.price, field=f"price_snapshot.{quote.asset_id}")
        for quote in snapshot.prices
    }


def _reused(liquidation_id: str) -> StateError:
    return _conflict(
        f"liquidation {liquidation_id!r} was executed from another instruction",
        "liquidation_instruction.liquidation_id",
        "a new liquidation id",
        liquidation_id,
    )
