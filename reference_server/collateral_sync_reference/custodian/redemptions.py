"""Redemptions: a client's assets are locked on request, then leave the account at settlement.

``RequestRedemption`` locks the quantity (no longer free to pledge or to
redeem again) until the configured lock time (24 h by default) has passed;
only what is neither locked nor pledged can be redeemed (docs/PROTOCOL.md
§5.8), and yield the lock takes is no longer owed. The scheduler then settles
it at its ``settles_at`` (:meth:`Custodian.run_due`): the quantity leaves the
account; the pledge and the yield still owed stay as they were.
"""

from __future__ import annotations

from datetime import datetime

from collateral_sync.amounts import format_amount
from collateral_sync.keys import _to_timestamp
from collateral_sync.v1 import (
    custodian_service_pb2,
)

from collateral_sync_reference.common.errors import conflict as _conflict
from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.custodian.ledger import (
    _REASON,
    Ledger,
    _add,
    _Change,
    _positive_amount,
    _redeemable,
    _sub,
)
from collateral_sync_reference.custodian.store import Redemption

__all__ = ["Redemptions"]


class Redemptions:
    """RequestRedemption, and the settlement of each redemption when its lock ends."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def redeem(
        self, request: custodian_service_pb2.RequestRedemptionRequest
    ) -> custodian_service_pb2.RequestRedemptionResponse:
        """Lock a client's assets until settlement (RequestRedemption)."""
        ledger = self._ledger
        now = ledger.clock.now()
        if not request.HasField("redemption_request"):
            raise _required("redemption_request", "a signed RedemptionRequest")
        verified = ledger._verify(
            request.redemption_request, custodian_service_pb2.RedemptionRequest, now
        )
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)
        redemption = verified.message
        if not redemption.redemption_id:
            raise _required("redemption_request.redemption_id", "a redemption id")
        account = ledger._account(redemption.account_id, "redemption_request.account_id")
        ledger._require_client(account, verified)
        asset_id = ledger._asset(redemption.asset_id, "redemption_request.asset_id")
        quantity = _positive_amount(redemption, "quantity", "redemption_request.quantity")
        if ledger.store.redemption(redemption.redemption_id) is not None:
            raise _conflict(
                f"redemption {redemption.redemption_id!r} already exists",
                "redemption_request.redemption_id",
                "a new redemption id",
                redemption.redemption_id,
            )
        holding = account.holding(asset_id)
        # Pledged quantity is the exchange's collateral: redeeming it would let
        # the client take what the exchange still credits (docs/PROTOCOL.md §5.8).
        redeemable = _redeemable(holding)
        if quantity > redeemable:
            raise _conflict(
                f"redemption of {format_amount(quantity)} {asset_id} exceeds the "
                f"{format_amount(redeemable)} redeemable (quantity - locked - pledged)",
                "redemption_request.quantity",
                f"<= {format_amount(redeemable)}",
                format_amount(quantity),
            )
        settles_at = now + ledger.settings.redemption_lock
        with ledger.storage.transaction():
            holding.locked = _add(holding.locked, quantity)
            # A lock may take unpaid yield (it is the client's), and then that yield
            # is no longer owed: a liquidation must not pay it out again (§5.8).
            holding.accrued_yield = min(holding.accrued_yield, _redeemable(holding))
            ledger.store.add_redemption(
                Redemption(
                    redemption.redemption_id,
                    account.account_id,
                    asset_id,
                    quantity,
                    settles_at,
                ),
                verified.payload,
            )
            ledger.guard.record(verified)
            [(envelope, ref)] = ledger._attest(
                [_Change(account, _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK)], now
            )
        response = custodian_service_pb2.RequestRedemptionResponse(
            holdings_statement=envelope, attestation=ref
        )
        response.settles_at.CopyFrom(_to_timestamp(settles_at))
        return response

    def _settle(self, redemption: Redemption, now: datetime) -> None:
        """Release a redemption's lock and let the quantity leave the account."""
        ledger = self._ledger
        with ledger.storage.transaction():
            account = ledger.store.account(redemption.account_id)
            if account is None:  # pragma: no cover - accounts are never deleted
                raise RuntimeError(f"redemption {redemption.redemption_id} of a missing account")
            holding = account.holding(redemption.asset_id)
            holding.quantity = _sub(holding.quantity, redemption.quantity)
            holding.locked = _sub(holding.locked, redemption.quantity)
            # Neither the pledge nor the yield owed can shrink here: the lock took
            # neither (§5.8), so the account still holds both.
            ledger.store.mark_settled(redemption.redemption_id)
            ledger._attest(
                [_Change(account, _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_SETTLED)], now
            )
