"""The reference exchange's margin calls: issued, answered, satisfied, expired, listed.

A revaluation below maintenance issues a signed ``MarginCall`` carrying its
signed inputs (:meth:`MarginCalls.issue`); every change of a call publishes a
new signed ``MarginCallState`` (:meth:`~MarginCalls.set_status`). The
custodian answers with a ``MarginCallResponse``, on the stream or by
RespondToMarginCall; attested top-ups satisfy a call, measured under the
call's own inputs (:meth:`~MarginCalls.measure_satisfaction`). The lifecycle
itself, as pure rules, is :mod:`.margin`; when a call is issued, expires or
is withdrawn is decided by :mod:`.revaluation`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from collateral_sync.amounts import format_amount
from collateral_sync.errors import StateError
from collateral_sync.signing import VerifiedStatement
from collateral_sync.v1 import (
    envelope_pb2,
    errors_pb2,
    margin_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import margin_call_amount, recompute_margin_call, value_collateral

from collateral_sync_reference.common.paging import Listing, rows_per_page
from collateral_sync_reference.exchange.context import (
    ExchangeContext,
    from_ns,
    is_stale,
    timestamp_ns,
    to_ns,
    unknown_account,
    wire_decimal,
)
from collateral_sync_reference.exchange.custodian_statements import CustodianStatements
from collateral_sync_reference.exchange.holdings import AttestedHoldings
from collateral_sync_reference.exchange.margin import (
    amount_due,
    check_response_shape,
    judge_response,
    state_message,
    status_name,
)
from collateral_sync_reference.exchange.store import MarginCallRow
from collateral_sync_reference.exchange.valuation import AccountValuation, Valuer

__all__ = ["MarginCalls"]

_R = errors_pb2.ErrorReason
_S = margin_pb2.MarginCallStatus
_NS = 1_000_000_000
_ZERO = Decimal(0)
_LISTING = Listing("ListMarginCalls", tag="mc1:")


class MarginCalls:
    """The exchange's margin calls and their signed states."""

    def __init__(
        self,
        context: ExchangeContext,
        statements: CustodianStatements,
        valuer: Valuer,
        *,
        holdings: AttestedHoldings,
    ) -> None:
        self._context = context
        self._statements = statements
        self._valuer = valuer
        self._holdings = holdings
        self._store = context.store
        self._settings = context.settings

    def issue(self, account_id: str, valued: AccountValuation, now: datetime) -> str:
        """Issue a margin call on an account below maintenance; return its id."""
        assert valued.ratio is not None
        assert valued.holdings is not None
        amount = margin_call_amount(valued.policy, valued.collateral_value, valued.exposure)
        assert amount is not None  # ratio < maintenance
        margin_call_id = f"mc-{uuid.uuid4().hex}"
        call = margin_pb2.MarginCall(
            margin_call_id=margin_call_id,
            account_id=account_id,
            inputs=self._valuer.inputs(valued, now),
            risk_policy_version=valued.policy.version,
            exposure=wire_decimal(valued.exposure),
            collateral_value=wire_decimal(valued.collateral_value),
            collateral_ratio=wire_decimal(valued.ratio),
            call_amount=wire_decimal(amount),
        )
        due_by_ns = to_ns(now) + timestamp_ns(valued.policy.cure_period)
        call.due_by.seconds, call.due_by.nanos = divmod(due_by_ns, _NS)
        envelope = self._context.sign(
            call,
            audience=[self._settings.custodian_id],
            ttl=valued.policy.cure_period.ToTimedelta() + self._settings.statement_ttl,
            now=now,
            statement_id=margin_call_id,
        )
        # What the custodian will do with it: a call that does not recompute is a bug here.
        recompute_margin_call(
            envelope, self._context.registry, audience=self._settings.custodian_id, now=now
        )
        state = self._sign_state(
            margin_call_id=margin_call_id,
            status=_S.MARGIN_CALL_STATUS_ISSUED,
            call_amount=amount,
            agreed_amount=_ZERO,
            satisfied_amount=_ZERO,
            now=now,
            call_envelope=envelope,
        )
        self._store.margin_calls.add(
            margin_call_id=margin_call_id,
            account_id=account_id,
            status=_S.MARGIN_CALL_STATUS_ISSUED,
            call_amount=amount,
            collateral_value=valued.collateral_value,
            exposure=valued.exposure,
            holdings_epoch=valued.holdings.epoch,
            issued_at_ns=to_ns(now),
            due_by_ns=due_by_ns,
            call_envelope=envelope,
            state_envelope=state,
        )
        self._context.append(position_sync_pb2.PositionUpdate(margin_call=envelope))
        self._context.logger.info(
            "margin call %s on %s: ratio %s, call amount %s",
            margin_call_id,
            account_id,
            format_amount(valued.ratio),
            format_amount(amount),
        )
        return margin_call_id

    def _sign_state(
        self,
        *,
        margin_call_id: str,
        status: int,
        call_amount: Decimal,
        agreed_amount: Decimal,
        satisfied_amount: Decimal,
        now: datetime,
        call_envelope: envelope_pb2.Envelope,
    ) -> envelope_pb2.Envelope:
        state = state_message(
            margin_call_id=margin_call_id,
            status=status,
            call_amount=call_amount,
            agreed_amount=agreed_amount,
            satisfied_amount=satisfied_amount,
            updated_at_ns=to_ns(now),
            call_envelope=call_envelope,
        )
        return self._context.sign(
            state,
            audience=[self._settings.custodian_id],
            ttl=self._settings.statement_ttl,
            now=now,
        )

    def set_status(
        self,
        call: MarginCallRow,
        status: int,
        now: datetime,
        *,
        agreed_amount: Decimal | None = None,
        satisfied_amount: Decimal | None = None,
        response: envelope_pb2.Envelope | None = None,
    ) -> envelope_pb2.Envelope:
        """Sign and store a new state of ``call``; amounts not given stay as they are."""
        agreed = call.agreed_amount if agreed_amount is None else agreed_amount
        satisfied = call.satisfied_amount if satisfied_amount is None else satisfied_amount
        state = self._sign_state(
            margin_call_id=call.margin_call_id,
            status=status,
            call_amount=call.call_amount,
            agreed_amount=agreed,
            satisfied_amount=satisfied,
            now=now,
            call_envelope=call.call_envelope,
        )
        self._store.margin_calls.update(
            call.margin_call_id,
            status=status,
            agreed_amount=agreed,
            satisfied_amount=satisfied,
            updated_at_ns=to_ns(now),
            state_envelope=state,
            response_envelope=response,
        )
        if status != call.status:
            self._context.logger.info(
                "margin call %s: %s -> %s",
                call.margin_call_id,
                status_name(call.status),
                status_name(status),
            )
        return state

    def measure_satisfaction(
        self, call: MarginCallRow, valued: AccountValuation, now: datetime
    ) -> None:
        """PROTOCOL.md §8.4: value the latest attested holdings under the call's own inputs."""
        holdings = valued.holdings
        if holdings is None or holdings.epoch <= call.holdings_epoch:
            return  # no top-up attested since the call
        signed = margin_pb2.MarginCall.FromString(call.call_envelope.payload)
        call_policy = valuation_pb2.RiskPolicy.FromString(signed.inputs.risk_policy.payload)
        snapshot = valuation_pb2.PriceSnapshot.FromString(signed.inputs.price_snapshot.payload)
        assert valued.holdings_message is not None
        value = value_collateral(
            call_policy,
            valued.holdings_message.positions,
            snapshot.prices,
            valued_at=from_ns(call.issued_at_ns),
        ).collateral_value
        satisfied = max(_ZERO, value - call.collateral_value)
        due = amount_due(call.status, call.call_amount, call.agreed_amount)
        if due > 0 and satisfied >= due:
            self.set_status(call, _S.MARGIN_CALL_STATUS_SATISFIED, now, satisfied_amount=satisfied)
        elif satisfied != call.satisfied_amount:
            self.set_status(call, call.status, now, satisfied_amount=satisfied)

    def respond_to_margin_call(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        """RespondToMarginCall: verify, apply and return the new signed MarginCallState.

        Verification is complete before anything is written; the new state,
        the replay record and the revaluation commit together or not at all.
        """
        now = self._context.now()
        verified = self._statements.verify(
            envelope, margin_pb2.MarginCallResponse, now, replay=True
        )
        with self._context.storage.transaction():
            return self._act_on_response(verified, now)

    def receive_response(
        self, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        """A response on the stream (inside the batch's transaction); a refused one is kept."""
        verified = self._statements.verify_embedded(envelope, margin_pb2.MarginCallResponse, now)
        self._statements.act_or_reject(
            sequence,
            "margin_call_response",
            envelope,
            now,
            lambda: self._act_on_response(verified, now),
        )

    def _act_on_response(
        self, verified: VerifiedStatement[margin_pb2.MarginCallResponse], now: datetime
    ) -> envelope_pb2.Envelope:
        response = verified.message
        check_response_shape(response)
        call = self._store.margin_calls.get(response.margin_call_id)
        if call is None:
            raise StateError(
                f"no margin call {response.margin_call_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a margin call id", "actual": response.margin_call_id},
            )
        outcome = judge_response(call, response, now_ns=to_ns(now))
        self.set_status(
            call,
            outcome.status,
            now,
            agreed_amount=outcome.agreed_amount,
            response=verified.envelope,
        )
        self._context.replay.record(verified)
        # A top-up attested before the answer may already cover the part now due.
        self._context.revalue_each([call.account_id], now)
        updated = self._store.margin_calls.get(call.margin_call_id)
        assert updated is not None
        return updated.state_envelope

    def readers_of_call(self, margin_call_id: str) -> frozenset[str] | None:
        """Who may read a call (PROTOCOL.md §4.5): its account's parties (None: no such call)."""
        call = self._store.margin_calls.get(margin_call_id)
        return None if call is None else self._holdings.readers_of_account(call.account_id)

    def margin_call_state(self, margin_call_id: str) -> envelope_pb2.Envelope:
        """GetMarginCall: the call's latest state, re-signed if less than half its life is left."""
        call = self._store.margin_calls.get(margin_call_id)
        if call is None:
            raise StateError(
                f"no margin call {margin_call_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a margin call id", "actual": margin_call_id},
            )
        return self._fresh_state(call)

    def _fresh_state(self, call: MarginCallRow) -> envelope_pb2.Envelope:
        now = self._context.now()
        if not is_stale(
            call.state_envelope, margin_pb2.MarginCallState, self._settings.statement_ttl, now
        ):
            return call.state_envelope
        with self._context.storage.transaction():
            resigned = self._context.resign_if_stale(
                call.state_envelope,
                margin_pb2.MarginCallState,
                audience=[self._settings.custodian_id],
                ttl=self._settings.statement_ttl,
                now=now,
            )
            assert resigned is not None
            self._store.margin_calls.refresh_state(call.margin_call_id, resigned)
        return resigned

    def list_margin_calls(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[envelope_pb2.Envelope], str]:
        """ListMarginCalls: states of an account's calls, oldest first, paged."""
        after = _LISTING.after(page_token, account_id)
        if self._store.accounts.get(account_id) is None:
            raise unknown_account(account_id)
        size = rows_per_page(page_size)
        rows = self._store.margin_calls.of_account(account_id, after_seq=after, limit=size + 1)
        page, token = _LISTING.page(rows, size, account_id)
        return [self._fresh_state(row) for row in page], token
