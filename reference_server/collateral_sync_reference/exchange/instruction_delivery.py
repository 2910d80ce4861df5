"""Delivers the reference exchange's liquidation instructions to the custodian, until answered.

An instruction is decided and stored in one transaction with the valuation
that called for it (status ``instructed``). :class:`LiquidationSubmitter`
then sends it with ``SubmitLiquidationInstruction`` and acts on the answer:

- a receipt: verified and recorded (proceeds, shortfall waterfall, exposure)
  through :meth:`.liquidation.Liquidations.accept_receipt`; the custodian also
  sends the receipt on the sync stream, and whichever copy arrives second is
  no news;
- a refusal (PATH_NOT_AUTHORISED, STATE_CONFLICT, a proof the custodian does
  not accept...): recorded on the liquidation with its reason, for operators;
- a transport failure, or an instruction from our future (the custodian's
  clock is behind): retried with backoff. The custodian executes an
  instruction once and answers a repeat with the same receipt, so a retry
  after a lost answer (or after our own crash) is safe.

Why not the sync stream: there a refusal fails the whole batch and blocks
every later entry of the exchange's log until an operator steps in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from collateral_sync.clients import CustodianClient
from collateral_sync.errors import CollateralSyncError, RPCError
from collateral_sync.v1 import custodian_service_pb2, errors_pb2

from collateral_sync_reference.exchange.attestation import TRANSIENT_CODES
from collateral_sync_reference.exchange.liquidations import Liquidations

__all__ = ["LiquidationSubmitter"]

# The custodian's clock is behind ours: the same instruction will be valid soon.
_NOT_YET_VALID = errors_pb2.ERROR_REASON_STATEMENT_NOT_YET_VALID


class LiquidationSubmitter:
    """Background delivery of recorded liquidation instructions; see the module docstring."""

    def __init__(
        self,
        liquidations: Liquidations,
        client: CustodianClient,
        *,
        retry_interval: float = 0.2,
        max_retry_interval: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self._liquidations = liquidations
        self._client = client
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._logger = logger or logging.getLogger("collateral_sync_reference.exchange")
        self._wake = asyncio.Event()
        liquidations.add_listener(self._wake.set)

    async def run(self) -> None:
        """Deliver whatever is pending, whenever woken, until cancelled."""
        delay = self._retry_interval
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                delivered = await self.submit_pending()
            except Exception:  # the submitter must outlive a bug: log it, retry later
                self._logger.exception("liquidation delivery failed; retrying")
                delivered = False
            if delivered:
                delay = self._retry_interval
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.set()
            delay = min(delay * 2, self._max_retry_interval)

    async def submit_pending(self) -> bool:
        """Send every pending instruction once; False if one must be retried later."""
        for liquidation in self._liquidations.pending_liquidations():
            request = custodian_service_pb2.SubmitLiquidationInstructionRequest(
                liquidation_instruction=liquidation.instruction
            )
            try:
                response = await self._client.submit_liquidation_instruction(request)
            except RPCError as err:
                if err.code in TRANSIENT_CODES or err.reason == _NOT_YET_VALID:
                    self._logger.info(
                        "liquidation %s not delivered yet: %s", liquidation.liquidation_id, err
                    )
                    return False
                self._liquidations.refuse_liquidation(liquidation.liquidation_id, err)
                continue
            except (OSError, TimeoutError) as err:
                self._logger.info(
                    "liquidation %s not delivered yet: %s", liquidation.liquidation_id, err
                )
                return False
            try:
                self._liquidations.accept_receipt(
                    response.liquidation_receipt, liquidation_id=liquidation.liquidation_id
                )
            except CollateralSyncError as err:
                self._liquidations.refuse_liquidation(liquidation.liquidation_id, err)
        return True
