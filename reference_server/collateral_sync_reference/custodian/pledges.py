"""Pledges: a client pledges holdings to an exchange with a pre-authorised liquidation path.

``PledgeCollateral`` carries two client statements: the pledge instruction
and the liquidation path along which, and only along which, the exchange may
later have the pledge sold. The path is checked and recorded (co-signed by
the custodian) with the pledge, and the holdings change announcing the pledge
carries it to the exchange, which learns from it the path id its
instructions must name. A top-up may send the path in force again.
"""

from __future__ import annotations

from collateral_sync.amounts import format_amount
from collateral_sync.errors import MalformedError
from collateral_sync.signing import VerifiedStatement, add_signature
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    liquidation_pb2,
)

from collateral_sync_reference.common.errors import conflict as _conflict
from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.custodian.ledger import (
    _REASON,
    Ledger,
    _add,
    _Change,
    _free,
    _not_found,
    _positive_amount,
)
from collateral_sync_reference.custodian.store import PathRecord

__all__ = ["Pledges"]


class Pledges:
    """PledgeCollateral: pledges, top-ups and the liquidation paths they record."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def pledge(
        self, request: custodian_service_pb2.PledgeCollateralRequest
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.AttestationRef]:
        """Record a client's pledge and its pre-authorised liquidation path (PledgeCollateral)."""
        ledger = self._ledger
        now = ledger.clock.now()
        if not request.HasField("pledge_instruction"):
            raise _required("pledge_instruction", "a signed PledgeInstruction")
        if not request.HasField("liquidation_path"):
            raise _required("liquidation_path", "a signed LiquidationPath")
        verified = ledger._verify(
            request.pledge_instruction, custodian_service_pb2.PledgeInstruction, now
        )
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)
        path = ledger._verify(request.liquidation_path, liquidation_pb2.LiquidationPath, now)
        instruction = verified.message
        account = ledger._account(instruction.account_id, "pledge_instruction.account_id")
        ledger._require_client(account, verified)
        ledger._require_client(account, path)
        asset_id = ledger._asset(instruction.asset_id, "pledge_instruction.asset_id")
        quantity = _positive_amount(instruction, "quantity", "pledge_instruction.quantity")
        exchange = instruction.exchange_id
        if exchange not in ledger.exchanges:
            raise _not_found("exchange", exchange, "pledge_instruction.exchange_id")
        if account.exchange_id and account.exchange_id != exchange:
            raise _conflict(
                f"account {account.account_id!r} pledges to {account.exchange_id!r}; one "
                f"exchange per account, got a pledge to {exchange!r}",
                "pledge_instruction.exchange_id",
                account.exchange_id,
                exchange,
            )
        new_path = self._check_path(path, instruction)
        holding = account.holding(asset_id)
        free = _free(holding)
        if quantity > free:
            raise _conflict(
                f"pledge of {format_amount(quantity)} {asset_id} exceeds the "
                f"{format_amount(free)} available (quantity - locked - pledged - accrued yield)",
                "pledge_instruction.quantity",
                f"<= {format_amount(free)}",
                format_amount(quantity),
            )

        with ledger.storage.transaction():
            reason = (
                _REASON.HOLDINGS_CHANGE_REASON_TOP_UP
                if account.exchange_id
                else _REASON.HOLDINGS_CHANGE_REASON_PLEDGE
            )
            account.exchange_id = exchange
            holding.pledged = _add(holding.pledged, quantity)
            if new_path:
                recorded_path = add_signature(path.envelope, ledger.signer)
                ledger.store.add_path(
                    PathRecord(
                        statement_id=path.header.statement_id,
                        account_id=account.account_id,
                        exchange_id=exchange,
                        recorded_at=now,
                        envelope=recorded_path,
                    )
                )
                ledger.guard.record(path)
            else:
                record = ledger.store.path(path.header.statement_id)
                assert record is not None  # _check_path found it
                recorded_path = record.envelope
            ledger.store.add_pledge(
                verified.header.statement_id,
                account.account_id,
                asset_id,
                quantity,
                verified.payload,
            )
            ledger.guard.record(verified)
            [(envelope, ref)] = ledger._attest(
                [_Change(account, reason, liquidation_path=recorded_path)], now
            )
            ledger._announce_pledges(account, [asset_id], ref)
        return envelope, ref

    def _check_path(
        self,
        path: VerifiedStatement[liquidation_pb2.LiquidationPath],
        instruction: custodian_service_pb2.PledgeInstruction,
    ) -> bool:
        """Check a pledge's liquidation path; True if it is new (to be recorded)."""
        ledger = self._ledger
        message = path.message
        for name in ("account_id", "exchange_id"):
            if getattr(message, name) != getattr(instruction, name):
                field = f"liquidation_path.{name}"
                raise MalformedError(
                    f"{field} {getattr(message, name)!r} differs from the pledge's "
                    f"{getattr(instruction, name)!r}",
                    metadata={
                        "field": field,
                        "expected": getattr(instruction, name),
                        "actual": getattr(message, name),
                    },
                    field_violations={field: "must match the pledge instruction"},
                )
        if not path.header.statement_id:
            raise _required("liquidation_path.header.statement_id", "the path's statement id")
        if not message.proceeds_account_id:
            raise _required("liquidation_path.proceeds_account_id", "where proceeds go")
        if not message.steps:
            raise _required("liquidation_path.steps", "at least one step")
        for index, step in enumerate(message.steps):
            field = f"liquidation_path.steps[{index}]"
            ledger._asset(step.asset_id, f"{field}.asset_id")
            if not step.venue:
                raise _required(f"{field}.venue", "a venue")
            _positive_amount(step, "max_quantity", f"{field}.max_quantity")
        recorded = ledger.store.path(path.header.statement_id)
        if recorded is not None:
            if recorded.envelope.payload != path.payload:
                raise _conflict(
                    f"liquidation path id {path.header.statement_id!r} is already recorded "
                    "with other content",
                    "liquidation_path.header.statement_id",
                    "a new statement id or the recorded path",
                    path.header.statement_id,
                )
            return False  # the path in force, sent again with a top-up
        ledger.guard.check(path.issuer, path.payload_type, path.sequence)
        return True
