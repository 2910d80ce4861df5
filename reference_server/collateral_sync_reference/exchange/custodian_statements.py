"""How the reference exchange checks what its custodian sends, and keeps the updates it refuses.

Every statement the exchange acts on for the custodian must be issued by
this exchange's custodian (:meth:`CustodianStatements.check_custodian`). One
embedded in a sync batch is checked at the batch's time
(:meth:`~CustodianStatements.verify_embedded`); one the custodian sends
directly, at the exchange's (:meth:`~CustodianStatements.verify`). A stream
update that verifies but asks for something the exchange cannot do is
undone alone and kept with its reason
(:meth:`~CustodianStatements.act_or_reject`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from collateral_sync.errors import CollateralSyncError, VerificationError
from collateral_sync.signing import VerifiedStatement, verify_statement
from collateral_sync.v1 import envelope_pb2, errors_pb2
from google.protobuf.message import Message

from collateral_sync_reference.exchange.context import ExchangeContext, to_ns

__all__ = ["CustodianStatements"]

_R = errors_pb2.ErrorReason
_M = TypeVar("_M", bound=Message)


class CustodianStatements:
    """Verification of the custodian's statements, and the record of refused stream updates."""

    def __init__(self, context: ExchangeContext) -> None:
        self._context = context
        self._settings = context.settings
        self._store = context.store

    def verify(
        self,
        envelope: envelope_pb2.Envelope,
        message_class: type[_M],
        now: datetime,
        *,
        replay: bool,
    ) -> VerifiedStatement[_M]:
        """Every stage at ``now`` of a statement to this exchange, and its issuer our custodian."""
        verified = verify_statement(
            envelope,
            self._context.registry,
            expected_type=message_class,
            audience=self._context.party_id,
            now=now,
            max_skew=self._settings.max_skew,
            replay_guard=self._context.replay if replay else None,
        )
        self.check_custodian(verified)
        return verified

    def verify_embedded(
        self,
        envelope: envelope_pb2.Envelope,
        message_class: type[_M],
        now: datetime,
        *,
        replay: bool = True,
    ) -> VerifiedStatement[_M]:
        """Stages a-e and g of a statement inside a verified batch (PROTOCOL.md §3.6.1).

        Freshness is the batch's: a statement replayed after a long outage may
        be past its own expiry and still be what the custodian said then. So a
        freshness failure at ``now`` (stage f, after the signature has been
        checked) is retried at the statement's own issued_at, which leaves
        exactly stages a-e and g.
        """
        try:
            return self.verify(envelope, message_class, now, replay=replay)
        except VerificationError as err:
            if err.reason not in (
                _R.ERROR_REASON_STATEMENT_EXPIRED,
                _R.ERROR_REASON_STATEMENT_NOT_YET_VALID,
            ):
                raise
            # The signature verified (stage b precedes f): parsing is safe now.
            header = message_class.FromString(envelope.payload).header  # type: ignore[attr-defined]
            issued_at = header.issued_at.ToDatetime(tzinfo=UTC)
            return self.verify(envelope, message_class, issued_at, replay=replay)

    def check_custodian(self, verified: VerifiedStatement[Any]) -> None:
        if verified.issuer != self._settings.custodian_id:
            raise VerificationError(
                f"{verified.payload_type} issued by {verified.issuer!r}; this exchange takes "
                f"them from its custodian {self._settings.custodian_id!r} only",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": self._settings.custodian_id, "actual": verified.issuer},
            )

    def act_or_reject(
        self,
        sequence: int,
        kind: str,
        envelope: envelope_pb2.Envelope,
        now: datetime,
        act: Callable[[], object],
    ) -> None:
        """Run ``act`` for a verified stream update; if it is refused, undo it and keep the refusal."""
        try:
            with self._savepoint():
                act()
        except CollateralSyncError as err:
            self._reject_update(sequence, kind, err, envelope, now)

    def _reject_update(
        self,
        sequence: int,
        kind: str,
        error: CollateralSyncError,
        envelope: envelope_pb2.Envelope,
        now: datetime,
    ) -> None:
        self._context.logger.warning("sync entry %d: %s refused: %s", sequence, kind, error.message)
        self._store.rejected_updates.add(
            sync_sequence=sequence,
            kind=kind,
            reason=error.reason_name,
            detail=error.message,
            payload=envelope.SerializeToString(),
            at_ns=to_ns(now),
        )

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        """Undo one update's writes if it is refused, inside the batch's transaction."""
        connection = self._context.storage.connection
        connection.execute("SAVEPOINT exchange_update")
        try:
            yield
        except BaseException:
            connection.execute("ROLLBACK TO exchange_update")
            connection.execute("RELEASE exchange_update")
            raise
        connection.execute("RELEASE exchange_update")
