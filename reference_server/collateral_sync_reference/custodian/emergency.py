"""The custodian's side of emergency release: its co-signing policy and the execution.

``CustodianService.ExecuteEmergencyRelease`` (docs/PROTOCOL.md §11.3) executes
a release only when:

1. the envelope passes :func:`collateral_sync.signing.verify_threshold` with
   k = 2 distinct parties among regulator, custodian and exchange keys valid at
   its issued_at (a client key, an unknown key or a bad signature counts for
   nothing; one party signing twice counts once), addressed to this custodian
   and fresh;
2. the counted parties are the right ones: any regulator, *this* custodian, and
   the exchange the release names, which must be the exchange the account is
   pledged to — another exchange's or another custodian's signature does not
   count;
3. without the exchange's signature, the reason is EXCHANGE_FAILURE,
   ``exchange_unresponsive_since`` is set and
   the custodian's clock is at least the exchange's ``emergency_release_wait``
   past it. The wait is read from the latest risk policy *that exchange* sent
   on the sync stream; a custodian that never received one uses the pilot's
   48 h (:data:`PILOT_EMERGENCY_RELEASE_WAIT`);
4. the release id is new — or the very same release (same payload) was already
   executed, which returns the stored receipt again; a different release with
   a used id is refused (STATE_CONFLICT).

Execution sets the pledged quantity of every asset of the account to 0, issues
the account's next holdings statement with reason RELEASE (announced on the
sync stream with a PledgeChange per asset), records the release and a signed
:class:`EmergencyReleaseReceipt` in one transaction, and returns the receipt.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.signing import VerifiedStatement, sign_statement, verify_threshold
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    errors_pb2,
    valuation_pb2,
)

from collateral_sync_reference.common.emergency import RELEASE_ROLES, ReleasePolicy
from collateral_sync_reference.custodian.ledger import Ledger, _Change
from collateral_sync_reference.custodian.store import to_us

__all__ = [
    "PILOT_EMERGENCY_RELEASE_WAIT",
    "CustodianEmergencyRelease",
    "exchange_risk_policy",
]

_R = errors_pb2.ErrorReason
_RECEIPT_TYPE = payload_type_of(emergency_pb2.EmergencyReleaseReceipt)
_ZERO = Decimal(0)

#: The pilot policy's wait (valuation.proto RiskPolicy.emergency_release_wait).
PILOT_EMERGENCY_RELEASE_WAIT = timedelta(hours=48)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_emergency_releases (
        release_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        receipt BLOB NOT NULL,
        executed_at_us INTEGER NOT NULL
    )""",
)


def exchange_risk_policy(ledger: Ledger, exchange_id: str) -> valuation_pb2.RiskPolicy | None:
    """The latest risk policy ``exchange_id`` sent on the sync stream (verified on receipt)."""
    rows = ledger.storage.connection.execute(
        "SELECT envelope FROM custodian_risk_policies ORDER BY version DESC"
    ).fetchall()
    for (data,) in rows:
        envelope = envelope_pb2.Envelope.FromString(bytes(data))
        policy = valuation_pb2.RiskPolicy.FromString(envelope.payload)
        if policy.header.issuer == exchange_id:
            return policy
    return None


class CustodianEmergencyRelease:
    """Co-signing policy and ExecuteEmergencyRelease of one reference custodian."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        ledger.storage.execute_schema("custodian.emergency", _SCHEMA)
        self._db = ledger.storage.connection

    # ------------------------------------------------------------------ co-signing

    @property
    def cosign_policy(self) -> ReleasePolicy:
        return self._agree

    def _agree(self, verified: VerifiedStatement[emergency_pb2.EmergencyRelease]) -> None:
        """The custodian co-signs releases of accounts it holds, naming their exchange."""
        release = verified.message
        account = self._ledger._account(release.account_id, "account_id")
        self._check_exchange(account.exchange_id, release)

    @staticmethod
    def _check_exchange(pledged_to: str, release: emergency_pb2.EmergencyRelease) -> None:
        if not pledged_to or release.exchange_id != pledged_to:
            raise StateError(
                f"account {release.account_id!r} is pledged to {pledged_to or 'no exchange'!r}, "
                f"the release names {release.exchange_id!r}",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": "exchange_id",
                    "expected": pledged_to or "an account pledged to an exchange",
                    "actual": release.exchange_id,
                },
            )

    def emergency_release_wait(self, exchange_id: str) -> timedelta:
        policy = exchange_risk_policy(self._ledger, exchange_id)
        if policy is None or not policy.HasField("emergency_release_wait"):
            return PILOT_EMERGENCY_RELEASE_WAIT
        return policy.emergency_release_wait.ToTimedelta()

    # ------------------------------------------------------------------ execution

    def execute(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        """Verify ``envelope`` (an EmergencyRelease) and execute it; returns the receipt."""
        ledger = self._ledger
        now = ledger.clock.now()
        verified = verify_threshold(
            envelope,
            ledger.registry,
            expected_type=emergency_pb2.EmergencyRelease,
            threshold=2,
            roles=RELEASE_ROLES,
            audience=ledger.party_id,
            now=now,
            max_skew=ledger.max_skew,
        )
        release = verified.message
        if not release.release_id:
            raise MalformedError(
                "release_id is required",
                metadata={"field": "release_id", "expected": "a release id", "actual": ""},
                field_violations={"release_id": "required"},
            )
        account = ledger._account(release.account_id, "account_id")
        self._check_exchange(account.exchange_id, release)
        parties = self._counted_parties(verified, release.exchange_id)
        if release.exchange_id not in parties:
            self._check_wait(release, now)

        existing = self._db.execute(
            "SELECT payload, receipt FROM custodian_emergency_releases WHERE release_id = ?",
            (release.release_id,),
        ).fetchone()
        if existing is not None:
            if bytes(existing[0]) == verified.payload:
                # The same release again (a retry): same receipt, nothing executed twice.
                return envelope_pb2.Envelope.FromString(bytes(existing[1]))
            raise StateError(
                f"release {release.release_id!r} was already executed with other content",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": "release_id",
                    "expected": "a new release id",
                    "actual": release.release_id,
                },
            )
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)

        with ledger.storage.transaction():
            released = sorted(
                asset_id for asset_id, holding in account.holdings.items() if holding.pledged > 0
            )
            for asset_id in released:
                account.holdings[asset_id].pledged = _ZERO
            [(_, ref)] = ledger._attest(
                [_Change(account, attestation_pb2.HOLDINGS_CHANGE_REASON_RELEASE)], now
            )
            receipt = emergency_pb2.EmergencyReleaseReceipt(
                release_id=release.release_id, account_id=account.account_id, release=envelope
            )
            receipt.executed_at.FromDatetime(now)
            # Everyone the release was addressed to or signed by, and the account's client.
            audience = sorted(
                {*verified.header.audience, *parties, account.client_id} - {ledger.party_id, "*"}
            )
            signed = sign_statement(
                receipt,
                ledger.signer,
                audience=audience,
                sequence=ledger.storage.next_sequence(_RECEIPT_TYPE),
                ttl=ledger.settings.statement_ttl,
                issued_at=now,
            )
            self._db.execute(
                "INSERT INTO custodian_emergency_releases VALUES (?, ?, ?, ?, ?)",
                (
                    release.release_id,
                    account.account_id,
                    verified.payload,
                    signed.SerializeToString(),
                    to_us(now),
                ),
            )
            ledger.guard.record(verified)
            ledger._announce_pledges(account, released, ref)
        return signed

    def _counted_parties(
        self, verified: VerifiedStatement[emergency_pb2.EmergencyRelease], exchange_id: str
    ) -> set[str]:
        """The signers that count for this release: a regulator, us, the account's exchange."""
        ledger = self._ledger
        registry = ledger.registry
        counted: set[str] = set()
        for kid, party in zip(verified.signer_key_ids, verified.signer_party_ids, strict=True):
            key = registry.get(kid)
            role = key.role if key is not None else common_pb2.PARTY_ROLE_UNSPECIFIED
            if (
                role == common_pb2.PARTY_ROLE_REGULATOR
                or (role == common_pb2.PARTY_ROLE_CUSTODIAN and party == ledger.party_id)
                or (role == common_pb2.PARTY_ROLE_EXCHANGE and party == exchange_id)
            ):
                counted.add(party)
        if len(counted) < 2:
            signers = ",".join(verified.signer_party_ids)
            raise VerificationError(
                f"the release counts {len(counted)} of the parties it needs (a regulator, "
                f"{ledger.party_id!r}, {exchange_id!r}); signed by [{signers}]",
                reason=_R.ERROR_REASON_THRESHOLD_NOT_MET,
                metadata={"expected": "2", "actual": str(len(counted))},
            )
        return counted

    def _check_wait(self, release: emergency_pb2.EmergencyRelease, now: datetime) -> None:
        """Regulator and custodian alone: only after the policy's wait since the exchange went dark."""
        wait = self.emergency_release_wait(release.exchange_id)
        failure = emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE
        if release.reason != failure:
            raise StateError(
                "a release without the exchange's signature must give the reason EXCHANGE_FAILURE",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": "reason",
                    "expected": emergency_pb2.EmergencyReleaseReason.Name(failure),
                    "actual": emergency_pb2.EmergencyReleaseReason.Name(release.reason),
                },
            )
        if not release.HasField("exchange_unresponsive_since"):
            raise StateError(
                "a release without the exchange's signature needs exchange_unresponsive_since",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": "exchange_unresponsive_since",
                    "expected": "the time the exchange stopped answering",
                    "actual": "absent",
                },
            )
        since = release.exchange_unresponsive_since.ToDatetime(tzinfo=now.tzinfo)
        allowed_at = since + wait
        if now < allowed_at:
            raise StateError(
                f"the exchange has been unresponsive since {since.isoformat()}; without its "
                f"signature a release is allowed from {allowed_at.isoformat()} "
                f"(wait {wait}), now is {now.isoformat()}",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": "exchange_unresponsive_since",
                    "expected": allowed_at.isoformat(),
                    "actual": now.isoformat(),
                },
            )
