"""ReleasePledge: part of a pledge given back to the client, on the exchange's consent.

``CustodianService.ReleasePledge`` (docs/PROTOCOL.md §5.9) carries the
exchange's signed ``PledgeReleaseConsent``, which carries the client's signed
``PledgeReleaseRequest``. The custodian checks, in the order of §5.9: both
signatures (the request as evidence at the consent's ``issued_at``), the
request's fields and account, that the client of the account asked and the
exchange the account is pledged to consented, the release id (the same consent
again is answered from the record, another one under a used id refused), the
replay guard, that the consent judged the account's *latest* holdings
statement, and that every quantity is within the asset's pledge.

Executed, each released asset's pledged quantity falls by exactly its
quantity and nothing else moves; the account's next holdings statement (reason
PLEDGE_RELEASE), its announcement on the exchange's stream (the holdings
change, then a pledge change per asset), the release and its receipt commit in
one transaction.
"""

from __future__ import annotations

from decimal import Decimal

from collateral_sync.amounts import format_amount
from collateral_sync.errors import MalformedError, VerificationError
from collateral_sync.signing import VerifiedStatement, sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    pledge_release_pb2,
)
from google.protobuf.message import DecodeError

from collateral_sync_reference.common.errors import conflict as _conflict
from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.custodian.ledger import (
    _REASON,
    Ledger,
    _Change,
    _positive_amount,
    _sub,
)
from collateral_sync_reference.custodian.store import Account, to_us

__all__ = ["PledgeReleases"]

_R = errors_pb2.ErrorReason
_RECEIPT_TYPE = payload_type_of(pledge_release_pb2.PledgeReleaseReceipt)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_pledge_releases (
        exchange_id TEXT NOT NULL,
        release_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        receipt BLOB NOT NULL,
        holdings_statement BLOB NOT NULL,
        executed_at_us INTEGER NOT NULL,
        PRIMARY KEY (exchange_id, release_id)
    )""",
)


class PledgeReleases:
    """ReleasePledge of one reference custodian."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        ledger.storage.execute_schema("custodian.pledge_releases", _SCHEMA)
        self._db = ledger.storage.connection

    def release(
        self, consent_envelope: envelope_pb2.Envelope
    ) -> custodian_service_pb2.ReleasePledgeResponse:
        """Check a consent in the order of §5.9 and execute it; the receipt and the statement."""
        ledger = self._ledger
        now = ledger.clock.now()
        consent = ledger._verify(consent_envelope, pledge_release_pb2.PledgeReleaseConsent, now)
        if not consent.message.HasField("request"):
            raise _required("consent.request", "the client's signed PledgeReleaseRequest")
        request = ledger._verify(
            consent.message.request,
            pledge_release_pb2.PledgeReleaseRequest,
            consent.header.issued_at.ToDatetime(tzinfo=now.tzinfo),
        )
        asked = request.message
        if not asked.release_id:
            raise _required("request.release_id", "a release id")
        account = ledger._account(asked.account_id, "request.account_id")
        releases = self._releases(asked)
        self._check_parties(account, consent, request)

        answered = self._answered(consent, asked.release_id)
        if answered is not None:
            return answered
        ledger.guard.check(consent.issuer, consent.payload_type, consent.sequence)
        self._check_latest_holdings(account, consent.message)
        self._check_within_pledge(account, releases)

        with ledger.storage.transaction():
            self._move(account, releases)
            [(statement, ref)] = ledger._attest(
                [_Change(account, _REASON.HOLDINGS_CHANGE_REASON_PLEDGE_RELEASE)], now
            )
            receipt = pledge_release_pb2.PledgeReleaseReceipt(
                release_id=asked.release_id,
                account_id=account.account_id,
                consent=consent_envelope,
                holdings=ref,
            )
            receipt.executed_at.FromDatetime(now)
            signed = sign_statement(
                receipt,
                ledger.signer,
                audience=[account.exchange_id, account.client_id],
                sequence=ledger.storage.next_sequence(_RECEIPT_TYPE),
                ttl=ledger.settings.statement_ttl,
                issued_at=now,
            )
            self._db.execute(
                "INSERT INTO custodian_pledge_releases VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    consent.issuer,
                    asked.release_id,
                    account.account_id,
                    consent.payload,
                    signed.SerializeToString(),
                    statement.SerializeToString(),
                    to_us(now),
                ),
            )
            ledger.guard.record(consent)
            ledger._announce_pledges(account, (asset_id for asset_id, _ in releases), ref)
        return custodian_service_pb2.ReleasePledgeResponse(
            receipt=signed, holdings_statement=statement
        )

    def _releases(self, asked: pledge_release_pb2.PledgeReleaseRequest) -> list[tuple[str, Decimal]]:
        """The released quantities, in request order: known assets, each once, each > 0."""
        if not asked.releases:
            raise _required("request.releases", "at least one asset and quantity")
        releases: list[tuple[str, Decimal]] = []
        seen: set[str] = set()
        for index, item in enumerate(asked.releases):
            field = f"request.releases[{index}]"
            asset_id = self._ledger._asset(item.asset_id, f"{field}.asset_id")
            if asset_id in seen:
                raise MalformedError(
                    f"{field}.asset_id {asset_id!r} is released twice in one request",
                    metadata={
                        "field": f"{field}.asset_id",
                        "expected": "each asset at most once",
                        "actual": asset_id,
                    },
                    field_violations={f"{field}.asset_id": "each asset at most once"},
                )
            seen.add(asset_id)
            releases.append((asset_id, _positive_amount(item, "quantity", f"{field}.quantity")))
        return releases

    def _answered(
        self,
        consent: VerifiedStatement[pledge_release_pb2.PledgeReleaseConsent],
        release_id: str,
    ) -> custodian_service_pb2.ReleasePledgeResponse | None:
        """The recorded answer to this very consent, if executed; a used id is refused (§12.4)."""
        recorded = self._db.execute(
            "SELECT payload, receipt, holdings_statement FROM custodian_pledge_releases "
            "WHERE exchange_id = ? AND release_id = ?",
            (consent.issuer, release_id),
        ).fetchone()
        if recorded is None:
            return None
        if bytes(recorded[0]) != consent.payload:
            raise _conflict(
                f"release {release_id!r} of {consent.issuer!r} was already executed "
                "with another consent",
                "release_id",
                "a new release id",
                release_id,
            )
        # The same consent again (a retry): the same answer, nothing released twice.
        return custodian_service_pb2.ReleasePledgeResponse(
            receipt=envelope_pb2.Envelope.FromString(bytes(recorded[1])),
            holdings_statement=envelope_pb2.Envelope.FromString(bytes(recorded[2])),
        )

    @staticmethod
    def _check_within_pledge(account: Account, releases: list[tuple[str, Decimal]]) -> None:
        """Every quantity is at most the asset's pledge (§5.9 step 7)."""
        for index, (asset_id, quantity) in enumerate(releases):
            pledged = account.holding(asset_id).pledged
            if quantity > pledged:
                raise _conflict(
                    f"release of {format_amount(quantity)} {asset_id} exceeds the "
                    f"{format_amount(pledged)} pledged",
                    f"releases[{index}].quantity",
                    format_amount(pledged),
                    format_amount(quantity),
                )

    @staticmethod
    def _move(account: Account, releases: list[tuple[str, Decimal]]) -> None:
        """The pledge of each asset falls by its quantity; nothing else moves (§5.9)."""
        for asset_id, quantity in releases:
            holding = account.holding(asset_id)
            holding.pledged = _sub(holding.pledged, quantity)

    def _check_parties(
        self,
        account: Account,
        consent: VerifiedStatement[pledge_release_pb2.PledgeReleaseConsent],
        request: VerifiedStatement[pledge_release_pb2.PledgeReleaseRequest],
    ) -> None:
        """The account's client asked; the exchange it is pledged to, and the one asked, consented."""
        if request.issuer != account.client_id:
            raise _not_theirs(
                "request.header.issuer",
                request.issuer,
                f"the request was not issued by the client of account {account.account_id!r}",
            )
        if consent.issuer != request.message.exchange_id or consent.issuer != account.exchange_id:
            raise _not_theirs(
                "consent.header.issuer",
                consent.issuer,
                f"the consent was not issued by the exchange account {account.account_id!r} "
                "is pledged to and the request names",
            )

    def _check_latest_holdings(
        self, account: Account, consent: pledge_release_pb2.PledgeReleaseConsent
    ) -> None:
        """The consent judged the account's latest holdings statement, and no other."""
        latest = self._ledger.store.latest_statement(account.account_id)
        assert latest is not None  # every account is attested when opened
        cited = consent.inputs.holdings_statements
        if len(cited) == 1 and cited[0].payload == latest.envelope.payload:
            return
        epochs = []
        for envelope in cited:
            try:
                statement = attestation_pb2.HoldingsStatement.FromString(envelope.payload)
            except DecodeError:
                epochs.append("undecodable")
            else:
                epochs.append(str(statement.epoch))
        raise _conflict(
            f"the consent judges holdings {', '.join(epochs) or 'none'}; account "
            f"{account.account_id!r} is at epoch {latest.epoch}: ask the exchange again",
            "inputs.holdings_statements",
            str(latest.epoch),
            ",".join(epochs) or "none",
        )


def _not_theirs(field: str, actual: str, message: str) -> VerificationError:
    return VerificationError(
        message,
        reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
        metadata={"field": field, "expected": "an account party", "actual": actual},
    )

