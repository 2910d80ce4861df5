"""The exchange's co-signing policy for emergency releases (EmergencyReleaseService).

The reference exchange co-signs a release only when it names this exchange,
the account is one it has mirrored, and the account has no open exposure
(exposure 0): unfreezing collateral that still backs a position would leave
the exchange unsecured, so such a release needs the regulator and the
custodian instead (after the policy's wait, docs/PROTOCOL.md §11.2).
"""

from __future__ import annotations

from collateral_sync.amounts import format_amount
from collateral_sync.errors import StateError
from collateral_sync.signing import VerifiedStatement
from collateral_sync.v1 import emergency_pb2, errors_pb2

from collateral_sync_reference.common.emergency import ReleasePolicy
from collateral_sync_reference.exchange.core import ExchangeCore

__all__ = ["exchange_release_policy"]

_R = errors_pb2.ErrorReason


def exchange_release_policy(core: ExchangeCore) -> ReleasePolicy:
    """The policy :class:`EmergencyReleaseCoSigner` applies on behalf of ``core``'s exchange."""

    def agree(verified: VerifiedStatement[emergency_pb2.EmergencyRelease]) -> None:
        release = verified.message
        if release.exchange_id != core.party_id:
            raise StateError(
                f"the release names exchange {release.exchange_id!r}, not {core.party_id!r}",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={
                    "field": "exchange_id",
                    "expected": core.party_id,
                    "actual": release.exchange_id,
                },
            )
        account = core.store.accounts.get(release.account_id)
        if account is None:
            raise StateError(
                f"unknown account {release.account_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "account_id",
                    "expected": "an account this exchange mirrors",
                    "actual": release.account_id,
                },
            )
        if account.exposure != 0:
            exposure = format_amount(account.exposure)
            raise StateError(
                f"account {release.account_id!r} has an open exposure of {exposure}",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={"field": "account_id", "expected": "exposure 0", "actual": exposure},
            )

    return agree
