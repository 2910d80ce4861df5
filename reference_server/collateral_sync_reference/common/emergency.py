"""EmergencyReleaseService for any of the three parties: verify a release, apply a policy, co-sign.

:class:`EmergencyReleaseCoSigner` is the servicer the custodian, the exchange
and the regulator each register with their own key and their own *policy* (a
callable that raises a :class:`~collateral_sync.errors.CollateralSyncError`
to refuse). Co-signing changes no state: the signature is the party's whole
contribution, and the custodian alone executes the release
(``CustodianService.ExecuteEmergencyRelease``, see ``custodian.emergency``).

Before it signs, the co-signer checks (docs/PROTOCOL.md §11.2): the issuer's
signature, the audience (this party), freshness; then that *every* signature
already on the envelope is by a registered regulator, custodian or exchange
key and verifies — a co-signer must not lend its signature to an envelope
carrying garbage — and that this party has not signed yet (FAILED_PRECONDITION
with STATE_CONFLICT).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import grpc.aio
from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signer import Signer
from collateral_sync.signing import VerifiedStatement, add_signature, pae, verify_statement
from collateral_sync.v1 import (
    common_pb2,
    emergency_pb2,
    emergency_release_service_pb2,
    emergency_release_service_pb2_grpc,
    envelope_pb2,
    errors_pb2,
)
from google.protobuf.timestamp_pb2 import Timestamp

from collateral_sync_reference.common.errors import require_statement

__all__ = [
    "RELEASE_ROLES",
    "EmergencyReleaseCoSigner",
    "ReleasePolicy",
    "check_release_signatures",
]

_R = errors_pb2.ErrorReason

#: The roles whose keys count towards an emergency release.
RELEASE_ROLES = frozenset(
    {
        common_pb2.PARTY_ROLE_REGULATOR,
        common_pb2.PARTY_ROLE_CUSTODIAN,
        common_pb2.PARTY_ROLE_EXCHANGE,
    }
)

#: Decides whether this party agrees with a verified release; raises to refuse.
ReleasePolicy = Callable[[VerifiedStatement[emergency_pb2.EmergencyRelease]], None]


def check_release_signatures(
    envelope: envelope_pb2.Envelope, registry: KeyRegistry, issued_at: Timestamp
) -> list[str]:
    """The parties of every signature on ``envelope``, each required to be a valid release key.

    Raises SIGNATURE_INVALID for a signature that does not verify or whose key
    is unknown, KEY_ROLE_MISMATCH for a key outside regulator/custodian/exchange
    (or not valid at ``issued_at``).
    """
    signed = pae(envelope.payload_type, envelope.payload)
    parties: list[str] = []
    for index, signature in enumerate(envelope.signatures):
        if signature.key_id not in registry or not registry.verify_signature(
            signature.key_id, signed, signature.sig
        ):
            raise VerificationError(
                f"signature {index} (key {signature.key_id}) does not verify",
                reason=_R.ERROR_REASON_SIGNATURE_INVALID,
                metadata={"expected": "a valid signature", "actual": signature.key_id},
            )
        try:
            key = registry.resolve(signature.key_id, at=issued_at, roles=RELEASE_ROLES)
        except VerificationError as err:
            raise VerificationError(
                f"signature {index} is by key {signature.key_id}, not a regulator, custodian "
                f"or exchange key valid at the release's issued_at: {err.message}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": "regulator|custodian|exchange", "actual": signature.key_id},
            ) from err
        parties.append(key.party_id)
    return parties


class EmergencyReleaseCoSigner(emergency_release_service_pb2_grpc.EmergencyReleaseServiceServicer):
    """CoSignEmergencyRelease for one party: verify, apply ``policy``, append our signature."""

    def __init__(
        self,
        *,
        signer: Signer,
        registry: KeyRegistry,
        clock: Callable[[], datetime],
        policy: ReleasePolicy,
        max_skew: timedelta,
    ) -> None:
        self._signer = signer
        self._registry = registry
        self._clock = clock
        self._policy = policy
        self._max_skew = max_skew

    def cosign(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        """The release with this party's signature appended, or the error refusing it."""
        verified = verify_statement(
            envelope,
            self._registry,
            expected_type=emergency_pb2.EmergencyRelease,
            audience=self._signer.party_id,
            now=self._clock(),
            max_skew=self._max_skew,
        )
        release = verified.message
        if not release.release_id or not release.account_id or not release.exchange_id:
            missing = [
                name
                for name in ("release_id", "account_id", "exchange_id")
                if not getattr(release, name)
            ]
            raise MalformedError(
                f"an emergency release needs {', '.join(missing)}",
                metadata={"field": missing[0], "expected": "non-empty", "actual": ""},
                field_violations=dict.fromkeys(missing, "required"),
            )
        parties = check_release_signatures(envelope, self._registry, verified.header.issued_at)
        if self._signer.party_id in parties:
            raise StateError(
                f"{self._signer.party_id!r} has already signed release {release.release_id!r}",
                metadata={
                    "expected": "a release not yet signed by this party",
                    "actual": ",".join(parties),
                },
            )
        self._policy(verified)
        return add_signature(envelope, self._signer, registry=self._registry)

    async def CoSignEmergencyRelease(
        self,
        request: emergency_release_service_pb2.CoSignEmergencyReleaseRequest,
        context: grpc.aio.ServicerContext,
    ) -> emergency_release_service_pb2.CoSignEmergencyReleaseResponse:
        require_statement(request, "emergency_release", "a signed EmergencyRelease")
        return emergency_release_service_pb2.CoSignEmergencyReleaseResponse(
            emergency_release=self.cosign(request.emergency_release)
        )
