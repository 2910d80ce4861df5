"""The reference exchange's credit lines: each account's figures, signed for the custodian.

Every revaluation publishes the account's figures as a new signed
``CreditLine`` on the sync log, if they changed (:meth:`CreditLines.publish`)
and, while the custodian is silent, if the credit limit did not rise (§11.2);
GetCreditLine serves the latest, re-signed
(same content) when less than half its lifetime is left.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import StateError
from collateral_sync.v1 import envelope_pb2, errors_pb2, position_sync_pb2, valuation_pb2

from collateral_sync_reference.exchange.context import ExchangeContext, is_stale, wire_decimal
from collateral_sync_reference.exchange.valuation import AccountValuation

__all__ = ["CreditLines"]

_R = errors_pb2.ErrorReason


class CreditLines:
    """The latest signed credit line of each account."""

    def __init__(self, context: ExchangeContext) -> None:
        self._context = context
        self._store = context.store
        self._settings = context.settings

    def publish(self, account_id: str, valued: AccountValuation, now: datetime) -> None:
        """Publish the account's figures as a new signed credit line, if they changed."""
        holdings = valued.holdings
        key = hashlib.sha256(
            "|".join(
                (
                    str(valued.policy.version),
                    "" if holdings is None else str(holdings.id),
                    format_amount(valued.collateral_value),
                    format_amount(valued.credit_limit),
                    format_amount(valued.exposure),
                )
            ).encode()
        ).digest()
        account = self._store.accounts.get(account_id)
        if account is not None and account.credit_key == key:
            return
        if self._context.silence.is_silent(valued.policy) and valued.credit_limit > _limit_of(
            None if account is None else account.credit_line
        ):
            # §11.2: no credit limit rises on the data of a silent custodian; the
            # line in force stays until the custodian is heard again.
            return
        credit = valuation_pb2.CreditLine(
            account_id=account_id,
            risk_policy_version=valued.policy.version,
            attestations=[] if holdings is None else [holdings.attestation],
            prices=valued.quotes,
            valuations=valued.valuation.rows(),
            collateral_value=wire_decimal(valued.collateral_value),
            credit_limit=wire_decimal(valued.credit_limit),
            exposure=wire_decimal(valued.exposure),
        )
        envelope = self._context.sign(
            credit,
            audience=[self._settings.custodian_id],
            ttl=self._settings.statement_ttl,
            now=now,
        )
        self._store.accounts.set_credit_line(account_id, envelope, key)
        self._context.append(position_sync_pb2.PositionUpdate(credit_line=envelope))

    def credit_line(self, account_id: str) -> envelope_pb2.Envelope:
        """GetCreditLine: the latest, re-signed (same content) if less than half its life is left."""
        account = self._store.accounts.get(account_id)
        if account is None or account.credit_line is None:
            raise StateError(
                f"no credit line for account {account_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "an account with a credit line", "actual": account_id},
            )
        now = self._context.now()
        ttl = self._settings.statement_ttl
        if not is_stale(account.credit_line, valuation_pb2.CreditLine, ttl, now):
            return account.credit_line
        with self._context.storage.transaction():
            resigned = self._context.resign_if_stale(
                account.credit_line,
                valuation_pb2.CreditLine,
                audience=[self._settings.custodian_id],
                ttl=ttl,
                now=now,
            )
            assert resigned is not None
            assert account.credit_key is not None
            self._store.accounts.set_credit_line(account_id, resigned, account.credit_key)
        return resigned


def _limit_of(envelope: envelope_pb2.Envelope | None) -> Decimal:
    """The credit limit of a signed credit line; 0 without one."""
    if envelope is None:
        return Decimal(0)
    line = valuation_pb2.CreditLine.FromString(envelope.payload)
    return parse_amount(line.credit_limit.value)
