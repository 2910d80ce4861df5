"""RequestPledgeRelease: the exchange's consent to a client taking part of its pledge back.

``ExchangeService.RequestPledgeRelease`` (docs/PROTOCOL.md §5.10) carries the
client's signed ``PledgeReleaseRequest``. The exchange checks, in the order of
§5.10: the request's signature (addressed to it, fresh), its fields, that it
names this exchange and that its issuer is the client of an account pledged
here (one refusal for "not yours" and "no such account"), the release id (the
same request again is answered with the recorded consent, another under a used
id refused), the replay guard, that no margin call or liquidation of the
account is open, and then :func:`collateral_sync.valuation.judge_release` on
the account's credited holdings, its exposure and the prices now: within the
pledge, the credit limit after the release at least the exposure, the ratio
after it at least the maintenance ratio.

Consented, the exchange signs a ``PledgeReleaseConsent`` carrying the request,
the signed inputs it judged (policy, the holdings statement, a new price
snapshot) and the figures after the release, addressed to the custodian and the
client, with the short lifetime ``release_consent_ttl``; it records the
consent and the request's replay mark in one transaction. The custodian
executes the consent only while that holdings statement is the account's
latest (§5.9), so two consents judged on one epoch can never both execute.
"""

from __future__ import annotations

from collateral_sync.amounts import format_amount
from collateral_sync.errors import VerificationError
from collateral_sync.signing import VerifiedStatement, verify_statement
from collateral_sync.v1 import attestation_pb2, envelope_pb2, errors_pb2, pledge_release_pb2
from collateral_sync.valuation import judge_release, released_quantities

from collateral_sync_reference.common.errors import conflict
from collateral_sync_reference.exchange.context import ExchangeContext, to_ns, wire_decimal
from collateral_sync_reference.exchange.holdings import AttestedHoldings
from collateral_sync_reference.exchange.margin import TERMINAL, status_name
from collateral_sync_reference.exchange.store import ReleaseConsentRow
from collateral_sync_reference.exchange.valuation import Valuer

__all__ = ["ReleaseConsents"]

_R = errors_pb2.ErrorReason
_FIELD = "pledge_release_request"


class ReleaseConsents:
    """RequestPledgeRelease of one reference exchange."""

    def __init__(
        self, context: ExchangeContext, valuer: Valuer, holdings: AttestedHoldings
    ) -> None:
        self._context = context
        self._valuer = valuer
        self._holdings = holdings
        self._store = context.store
        self._settings = context.settings

    def consent(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        """Judge a client's signed request in the order of §5.10; the signed consent."""
        context = self._context
        now = context.now()
        request = verify_statement(
            envelope,
            context.registry,
            expected_type=pledge_release_pb2.PledgeReleaseRequest,
            audience=context.party_id,
            now=now,
            max_skew=self._settings.max_skew,
        )
        asked = request.message
        releases = released_quantities(asked, field=_FIELD)
        client_id = self._check_client(request)

        answered = self._answered(request)
        if answered is not None:
            return answered
        context.replay.check(request.issuer, request.payload_type, request.sequence)
        self._check_nothing_open(asked.account_id)

        valued = self._valuer.value(asked.account_id, now)
        assert valued.holdings_message is not None  # _check_client found it pledged here
        judgement = judge_release(
            valued.policy,
            valued.holdings_message.positions,
            valued.quotes,
            releases,
            valued.exposure,
            valued_at=now,
        )
        if judgement.refusal is not None:
            refusal = judgement.refusal
            field = refusal.field
            if field.startswith("releases["):
                field = f"{_FIELD}.{field}"
            raise conflict(refusal.message, field, refusal.expected, refusal.actual)

        with context.storage.transaction():
            consent = context.sign(
                pledge_release_pb2.PledgeReleaseConsent(
                    request=envelope,
                    inputs=self._valuer.inputs(valued, now),
                    risk_policy_version=valued.policy.version,
                    exposure=wire_decimal(judgement.exposure),
                    collateral_value_after=wire_decimal(judgement.collateral_value_after),
                    credit_limit_after=wire_decimal(judgement.credit_limit_after),
                ),
                audience=[self._settings.custodian_id, client_id],
                ttl=self._settings.release_consent_ttl,
                now=now,
            )
            self._store.release_consents.add(
                ReleaseConsentRow(
                    release_id=asked.release_id,
                    account_id=asked.account_id,
                    request_payload=request.payload,
                    consent=consent,
                    consented_at_ns=to_ns(now),
                )
            )
            context.replay.record(request)
        context.logger.info(
            "consented to release %s of account %s: %s",
            asked.release_id,
            asked.account_id,
            ", ".join(f"{format_amount(q)} {a}" for a, q in releases),
        )
        return consent

    def _check_client(
        self, request: VerifiedStatement[pledge_release_pb2.PledgeReleaseRequest]
    ) -> str:
        """The request names this exchange, and its issuer is the client of an account
        pledged here; returns the client. Whether the account exists is not told apart
        from whose it is (§4.5)."""
        asked = request.message
        if asked.exchange_id != self._context.party_id:
            raise VerificationError(
                f"the request asks exchange {asked.exchange_id!r}, not this one",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={
                    "field": f"{_FIELD}.exchange_id",
                    "expected": self._context.party_id,
                    "actual": asked.exchange_id,
                },
            )
        clients: frozenset[str] = frozenset()
        credited = self._holdings.credited_holdings(asked.account_id)
        statement = (
            None
            if credited is None
            else attestation_pb2.HoldingsStatement.FromString(credited.envelope.payload)
        )
        if statement is not None and statement.exchange_id == self._context.party_id:
            clients = frozenset(statement.header.audience) - {
                self._context.party_id,
                self._settings.custodian_id,
                "*",
            }
        if request.issuer not in clients:
            raise VerificationError(
                f"{request.issuer!r} is not the client of an account pledged to this exchange "
                f"with id {asked.account_id!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={
                    "field": f"{_FIELD}.header.issuer",
                    "expected": "the client of the account",
                    "actual": request.issuer,
                },
            )
        return request.issuer

    def _answered(
        self, request: VerifiedStatement[pledge_release_pb2.PledgeReleaseRequest]
    ) -> envelope_pb2.Envelope | None:
        """The consent recorded for this very request; a used id is refused (§12.4)."""
        recorded = self._store.release_consents.get(request.message.release_id)
        if recorded is None:
            return None
        if recorded.request_payload != request.payload:
            raise conflict(
                f"release id {request.message.release_id!r} was already consented to for "
                "another request",
                f"{_FIELD}.release_id",
                "a new release id",
                request.message.release_id,
            )
        return recorded.consent

    def _check_nothing_open(self, account_id: str) -> None:
        """No margin call of the account open, no liquidation of it awaiting its receipt."""
        for call in self._store.margin_calls.of_account(account_id):
            if call.status not in TERMINAL:
                raise conflict(
                    f"margin call {call.margin_call_id} of account {account_id!r} is "
                    f"{status_name(call.status)}: nothing is released while it is open",
                    "margin_call",
                    "no open margin call",
                    call.margin_call_id,
                )
        for liquidation in self._store.liquidations.in_status("instructed"):
            if liquidation.account_id == account_id:
                raise conflict(
                    f"liquidation {liquidation.liquidation_id} of account {account_id!r} "
                    "awaits its receipt: nothing is released meanwhile",
                    "liquidation",
                    "no liquidation awaiting its receipt",
                    liquidation.liquidation_id,
                )
