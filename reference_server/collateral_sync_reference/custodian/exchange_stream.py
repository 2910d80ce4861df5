"""The position-sync stream from the exchange: what the custodian applies, and how it answers.

Each exchange the custodian serves has one :class:`~collateral_sync.sync.SyncSession`
(``SyncPositions``): the custodian's holdings changes, pledge changes, yield
accruals, liquidation receipts and margin-call responses go out on it, and
the exchange's credit lines, risk policies, margin calls and liquidation
instructions come in. A batch that arrives is applied inside the transaction
that stores it. A statement that does not verify fails the batch; one that
verifies but asks for what cannot be done (a liquidation off the path in
force, a reused margin-call id, an unusable policy) is recorded as rejected
and the batch goes on (PROTOCOL.md §6.5). Each margin call is recomputed from
its signed inputs and answered at once: with the configured answer if it
recomputes, with a DISPUTE saying why if it does not.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal

from collateral_sync.amounts import amount_to_proto
from collateral_sync.errors import CollateralSyncError, MalformedError, VerificationError
from collateral_sync.signing import VerifiedStatement, sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import SyncSession
from collateral_sync.v1 import (
    envelope_pb2,
    margin_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import recompute_margin_call, validate_risk_policy
from opentelemetry import trace

from collateral_sync_reference.common.config import SyncSettings
from collateral_sync_reference.common.errors import conflict as _conflict
from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.custodian.config import MarginCallAnswer
from collateral_sync_reference.custodian.ledger import _R, _ROUNDING, _ZERO, Ledger, M, _round_down
from collateral_sync_reference.custodian.liquidations import Liquidations
from collateral_sync_reference.custodian.store import MarginCallRecord, RejectedUpdate

__all__ = ["ExchangeStream"]

_KIND = margin_pb2.MarginCallResponseKind
_DISPUTE = margin_pb2.DisputeReason
_RESPONSE_TYPE = payload_type_of(margin_pb2.MarginCallResponse)

_LOGGER = logging.getLogger("collateral_sync_reference.custodian")
# A no-op unless the server's config turns tracing on (common/tracing.py).
_TRACER = trace.get_tracer("collateral_sync_reference.custodian")


class ExchangeStream:
    """The sync session with each exchange, and what the custodian does with what arrives."""

    def __init__(self, ledger: Ledger, liquidations: Liquidations, sync: SyncSettings) -> None:
        self._ledger = ledger
        self._liquidations = liquidations
        self.sessions: dict[str, SyncSession] = {
            exchange: SyncSession(
                log,
                ledger.signer,
                ledger.registry,
                apply=self._stream_applier(exchange),
                window=sync.window,
                batch_size=sync.batch_size,
                heartbeat_interval=sync.heartbeat_interval,
                max_skew=ledger.max_skew,
                clock=ledger.clock.now,
            )
            for exchange, log in ledger.sync_logs.items()
        }

    def _stream_applier(
        self, exchange: str
    ) -> Callable[[list[tuple[int, position_sync_pb2.PositionUpdate]]], None]:
        def apply(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
            # Inside the batch's transaction. A statement that does not verify
            # fails (rolls back) the whole batch; one that verifies but asks for
            # something we cannot do is recorded as rejected, and the rest of
            # the batch is applied (PROTOCOL.md §6.5).
            now = self._ledger.clock.now()
            for sequence, update in updates:
                kind = update.WhichOneof("update")
                try:
                    if kind == "credit_line":
                        self._on_credit_line(exchange, update.credit_line, now)
                    elif kind == "margin_call":
                        self._on_margin_call(exchange, sequence, update.margin_call, now)
                    elif kind == "liquidation_instruction":
                        self._on_liquidation_instruction(
                            exchange, sequence, update.liquidation_instruction, now
                        )
                    elif kind == "risk_policy":
                        self._on_risk_policy(exchange, sequence, update.risk_policy, now)
                    else:  # pragma: no cover - the sync log checks variants per direction
                        raise MalformedError(
                            f"update of kind {kind} is not one an exchange sends",
                            metadata={
                                "expected": "an exchange-to-custodian update",
                                "actual": str(kind),
                            },
                        )
                except CollateralSyncError as err:
                    err.metadata.setdefault("sequence", str(sequence))
                    raise

        return apply

    @contextlib.contextmanager
    def _or_rejected(
        self,
        exchange: str,
        sequence: int,
        kind: str,
        envelope: envelope_pb2.Envelope,
        now: datetime,
    ) -> Iterator[None]:
        """Act on a verified stream statement; a refusal is recorded instead of raised.

        The stream cannot answer one update, and failing the batch would block
        every later entry behind it for good: the refused action's writes are
        undone (a savepoint inside the batch's transaction) and the refusal is
        kept with its reason. The statement is not recorded for replay, so the
        exchange may still send it by RPC, where the refusal is a status.
        """
        ledger = self._ledger
        connection = ledger.storage.connection
        connection.execute("SAVEPOINT custodian_update")
        try:
            yield
        except CollateralSyncError as err:
            connection.execute("ROLLBACK TO custodian_update")
            connection.execute("RELEASE custodian_update")
            _LOGGER.warning(
                "sync entry %d from %s: %s rejected: %s: %s",
                sequence,
                exchange,
                kind,
                err.reason_name,
                err.message,
            )
            ledger.store.add_rejected_update(
                RejectedUpdate(
                    exchange_id=exchange,
                    sync_sequence=sequence,
                    kind=kind,
                    reason=err.reason_name,
                    detail=err.message,
                    envelope=envelope,
                    rejected_at=now,
                )
            )
        except BaseException:
            connection.execute("ROLLBACK TO custodian_update")
            connection.execute("RELEASE custodian_update")
            raise
        else:
            connection.execute("RELEASE custodian_update")

    def rejected_updates(self, exchange: str) -> list[RejectedUpdate]:
        """The stream updates of ``exchange`` recorded as rejected, in stream order."""
        return self._ledger.store.rejected_updates(exchange)

    def _on_liquidation_instruction(
        self, exchange: str, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        verified, receipt = self._liquidations._check_instruction(
            envelope, now, tls_peer=exchange, on_stream=True
        )
        if receipt is not None:
            return  # executed before (and its receipt announced then)
        with self._or_rejected(exchange, sequence, "liquidation_instruction", envelope, now):
            self._liquidations._liquidate_verified(verified, now, on_stream=True)

    def _from_peer(
        self,
        exchange: str,
        envelope: envelope_pb2.Envelope,
        expected_type: type[M],
        now: datetime,
    ) -> VerifiedStatement[M]:
        ledger = self._ledger
        verified = ledger._verify(envelope, expected_type, now, on_stream=True)
        if verified.issuer != exchange:
            raise VerificationError(
                f"{verified.payload_type} issued by {verified.issuer!r} on the stream of {exchange!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": exchange, "actual": verified.issuer},
            )
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)
        return verified

    def _on_credit_line(
        self, exchange: str, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        ledger = self._ledger
        verified = self._from_peer(exchange, envelope, valuation_pb2.CreditLine, now)
        ledger.store.put_credit_line(verified.message.account_id, envelope)
        ledger.guard.record(verified)

    def _on_risk_policy(
        self, exchange: str, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        ledger = self._ledger
        verified = self._from_peer(exchange, envelope, valuation_pb2.RiskPolicy, now)
        with self._or_rejected(exchange, sequence, "risk_policy", envelope, now):
            # Signed, but figures no valuation can use: not a policy we hold the exchange to.
            validate_risk_policy(verified.message)
            ledger.store.put_risk_policy(verified.message.version, envelope)
            ledger.guard.record(verified)

    def _on_margin_call(
        self, exchange: str, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        verified = self._from_peer(exchange, envelope, margin_pb2.MarginCall, now)
        # Inside the batch's sync.batch.apply span: the answer is durable when that span ends,
        # and the batch that carries the answer back links to this span.
        with (
            _TRACER.start_as_current_span(
                "custodian.margin_call.answer",
                attributes={
                    "collateral_sync.margin_call_id": verified.message.margin_call_id,
                    "collateral_sync.account_id": verified.message.account_id,
                    "collateral_sync.sync.sequence": sequence,
                },
            ),
            self._or_rejected(exchange, sequence, "margin_call", envelope, now),
        ):
            self._answer_margin_call(exchange, verified, now)

    def _answer_margin_call(
        self,
        exchange: str,
        verified: VerifiedStatement[margin_pb2.MarginCall],
        now: datetime,
    ) -> None:
        """Record a margin call and answer it on the stream, after recomputing it.

        A call whose signed inputs do not give its figures is answered with a
        DISPUTE; one that cannot be a call at all (no id, an id already used)
        is refused, and so recorded as rejected by the caller.
        """
        ledger = self._ledger
        envelope = verified.envelope
        call = verified.message
        if not call.margin_call_id:
            raise _required("margin_call.margin_call_id", "a margin call id")
        if ledger.store.margin_call(call.margin_call_id) is not None:
            raise _conflict(
                f"margin call {call.margin_call_id!r} was already received",
                "margin_call.margin_call_id",
                "a new margin call id",
                call.margin_call_id,
            )
        issued_at = verified.header.issued_at.ToDatetime(tzinfo=now.tzinfo)
        response = margin_pb2.MarginCallResponse(margin_call_id=call.margin_call_id)
        try:
            check = recompute_margin_call(
                envelope,
                ledger.registry,
                audience=ledger.party_id,
                asset_classes=ledger.asset_classes,
                now=issued_at,
            )
        except CollateralSyncError as err:
            # A call its own signed inputs do not prove is disputed, not refused:
            # the exchange learns why from the response.
            response.kind = _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE
            response.agreed_amount.CopyFrom(amount_to_proto(0))
            response.dispute_reason = (
                _DISPUTE.DISPUTE_REASON_ARITHMETIC
                if err.reason == _R.ERROR_REASON_PROOF_INVALID
                else _DISPUTE.DISPUTE_REASON_POSITIONS
            )
            response.dispute_detail = f"{err.reason_name}: {err.message}"[:1000]
        else:
            answers = ledger.settings.margin_call_answers
            answer = answers[min(ledger.store.answered_margin_calls(), len(answers) - 1)]
            _apply_answer(response, answer, check.call_amount, check.risk_policy.rounding_scale)
        signed = sign_statement(
            response,
            ledger.signer,
            audience=[exchange],
            sequence=ledger.storage.next_sequence(_RESPONSE_TYPE),
            ttl=ledger.settings.statement_ttl,
            issued_at=now,
        )
        due_by = call.due_by.ToDatetime(tzinfo=now.tzinfo) if call.HasField("due_by") else now
        ledger.store.add_margin_call(
            MarginCallRecord(
                call.margin_call_id, call.account_id, envelope, due_by, response.kind, signed
            )
        )
        ledger.guard.record(verified)
        ledger._announce(exchange, position_sync_pb2.PositionUpdate(margin_call_response=signed))


def _apply_answer(
    response: margin_pb2.MarginCallResponse,
    answer: MarginCallAnswer,
    call_amount: Decimal,
    rounding_scale: int,
) -> None:
    """Fill ``response`` from the configured answer to a call that recomputed."""
    kind = answer.kind
    agreed = call_amount
    if kind == _KIND.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE:
        if answer.agreed_fraction is not None:
            agreed = _round_down(
                _ROUNDING.multiply(call_amount, answer.agreed_fraction), rounding_scale
            )
        else:
            assert answer.agreed_amount is not None  # checked with the configuration
            agreed = answer.agreed_amount
        if agreed >= call_amount:
            kind, agreed = _KIND.MARGIN_CALL_RESPONSE_KIND_AGREE, call_amount
        elif agreed <= 0:
            kind = _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE
    if kind == _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE:
        agreed = _ZERO
    response.kind = kind  # type: ignore[assignment]
    response.agreed_amount.CopyFrom(amount_to_proto(agreed))
    if kind != _KIND.MARGIN_CALL_RESPONSE_KIND_AGREE:
        response.dispute_reason = answer.dispute_reason  # type: ignore[assignment]
        response.dispute_detail = "disputed by the custodian's answer policy"
