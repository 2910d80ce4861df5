"""The custodian's ledger: the accounts, and the operation every change of holdings goes through.

Every change of an account's holdings is an *operation*: in one storage
transaction it changes the account, issues the account's next holdings
statement (a leaf of the attestation log at a pre-assigned index), records
the statement, the replay record of the client or exchange statement that
caused it, and appends the position-sync updates announcing it
(:meth:`Ledger._attest`, :meth:`Ledger._announce`). After the commit the new
leaves are appended to the attestation log and a checkpoint is signed at the
operation's final size (``attestation``, which also says why that order is
crash safe).

:class:`Ledger` is what every part of the custodian works through: the
storage and the custodian's store, the clock, the signing key and the key
registry, the settings, the replay guard and the sync logs towards the
exchanges, with the operation machinery and the lookups and checks the parts
share. The amount helpers here keep the arithmetic exact.

Holdings statement sequences are ``leaf_index + 1``, so they increase with the
log and need no counter; every other statement type we sign takes its
sequence from the storage's counter in the transaction that stores it.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from collateral_sync.amounts import amount_from_proto, amount_to_proto, format_amount
from collateral_sync.attestation import statement_leaf
from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.merkle import leaf_hash
from collateral_sync.signing import VerifiedStatement, sign_statement, verify_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, SyncLog
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    errors_pb2,
    position_sync_pb2,
)
from google.protobuf.message import Message

from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.common.runner import ServerContext
from collateral_sync_reference.custodian.config import CustodianSettings
from collateral_sync_reference.custodian.store import (
    Account,
    Holding,
    SqliteCustodianStore,
    StoredStatement,
)

__all__ = ["Ledger"]

_R = errors_pb2.ErrorReason
_REASON = attestation_pb2.HoldingsChangeReason
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE

# Statements inside a sync batch are judged fresh by the batch (docs/PROTOCOL.md
# §3.6.1, the sync-entry row): a skew this wide makes stage f pass for any valid header.
_STREAM_SKEW = timedelta(days=4_000_000)
# Exact arithmetic: no canonical amount, nor a product of two, comes near 200
# digits, and Inexact is trapped so nothing is rounded by accident.
_EXACT = decimal.Context(
    prec=200, traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow]
)
_ROUNDING = decimal.Context(prec=200, traps=[decimal.InvalidOperation, decimal.Overflow])
_ZERO = Decimal(0)

M = TypeVar("M", bound=Message)


def _add(a: Decimal, b: Decimal) -> Decimal:
    return _EXACT.add(a, b)


def _sub(a: Decimal, b: Decimal) -> Decimal:
    return _EXACT.subtract(a, b)


def _round_down(value: Decimal, places: int = 18) -> Decimal:
    return value.quantize(
        Decimal(1).scaleb(-places), rounding=decimal.ROUND_FLOOR, context=_ROUNDING
    )


def _round_up(value: Decimal, places: int = 18) -> Decimal:
    return value.quantize(
        Decimal(1).scaleb(-places), rounding=decimal.ROUND_CEILING, context=_ROUNDING
    )


def _redeemable(holding: Holding) -> Decimal:
    """What a redemption may lock: neither locked nor pledged (docs/PROTOCOL.md §5.8)."""
    return _sub(_sub(holding.quantity, holding.locked), holding.pledged)


def _free(holding: Holding) -> Decimal:
    """What may still be pledged: neither locked, pledged nor undistributed yield (§5.8)."""
    return _sub(_redeemable(holding), holding.accrued_yield)


def _not_found(what: str, value: str, field: str) -> StateError:
    return StateError(
        f"unknown {what} {value!r}",
        reason=_R.ERROR_REASON_NOT_FOUND,
        metadata={"field": field, "expected": f"a known {what}", "actual": value},
    )


def _positive_amount(parent: Message, name: str, field: str) -> Decimal:
    """A required Decimal field that must be > 0 (absent: MALFORMED; bad text or <= 0: INVALID_AMOUNT)."""
    if not parent.HasField(name):
        raise _required(field, "a decimal amount")
    value = amount_from_proto(getattr(parent, name), field=field)
    if value <= 0:
        raise MalformedError(
            f"{field} must be > 0, got {format_amount(value)}",
            reason=_R.ERROR_REASON_INVALID_AMOUNT,
            metadata={"field": field, "expected": "> 0", "actual": format_amount(value)},
            field_violations={field: "must be > 0"},
        )
    return value


@dataclass(frozen=True, slots=True)
class _Change:
    """One account whose holdings an operation changed, and why."""

    account: Account
    reason: int
    #: For a pledge: the recorded LiquidationPath, announced with the holdings change.
    liquidation_path: envelope_pb2.Envelope | None = None


class Ledger:
    """What every part of the custodian shares: its state, the operation, the common checks."""

    def __init__(self, context: ServerContext, settings: CustodianSettings) -> None:
        self.settings = settings
        self.storage = context.storage
        self.clock = context.clock
        self.signer = context.signer
        self.registry = context.registry
        self.party_id = context.party_id
        self.max_skew = context.config.max_skew
        self.asset_classes = settings.asset_classes()
        self.store = SqliteCustodianStore(context.storage)
        self.guard = context.storage.replay_guard()
        self.exchanges = tuple(
            peer
            for peer in context.config.peers
            if any(k.role == _EXCHANGE_ROLE for k in self.registry.keys_for(peer))
        )
        self.sync_logs: dict[str, SyncLog] = {
            exchange: context.storage.sync_log(
                party_id=self.party_id,
                peer_party_id=exchange,
                sending_direction=CUSTODIAN_TO_EXCHANGE,
            )
            for exchange in self.exchanges
        }

    # ------------------------------------------------------------------ operations

    def _open_accounts(self) -> None:
        """Create the configured accounts the database does not have yet, attested."""
        new = [a for a in self.settings.accounts if self.store.account(a.account_id) is None]
        if not new:
            return
        now = self.clock.now()
        with self.storage.transaction():
            changes = []
            for settings in new:
                account = Account(settings.account_id, settings.client_id, "", 0)
                for asset_id, quantity in settings.holdings.items():
                    account.holding(asset_id).quantity = quantity
                self.store.add_account(account)
                changes.append(_Change(account, _REASON.HOLDINGS_CHANGE_REASON_DEPOSIT))
            self._attest(changes, now)

    def _attest(
        self, changes: Sequence[_Change], now: datetime
    ) -> list[tuple[envelope_pb2.Envelope, attestation_pb2.AttestationRef]]:
        """Issue and record the next holdings statement of each changed account (step 1).

        Inside the operation's transaction. Leaf indexes follow the recorded
        statements; every reference names the operation's final tree size, at
        which the checkpoint is signed after the commit. Accounts pledged to an
        exchange get a HoldingsChange on its sync log.
        """
        base = self.store.statement_count()
        end = base + len(changes)
        issued = []
        for offset, change in enumerate(changes):
            account = change.account
            index = base + offset
            account.epoch += 1
            message = attestation_pb2.HoldingsStatement(
                account_id=account.account_id,
                exchange_id=account.exchange_id,
                epoch=account.epoch,
                reason=change.reason,  # type: ignore[arg-type]
                positions=[
                    common_pb2.Position(
                        account_id=account.account_id,
                        asset_id=h.asset_id,
                        quantity=amount_to_proto(h.quantity),
                        locked_quantity=amount_to_proto(h.locked),
                        pledged_quantity=amount_to_proto(h.pledged),
                    )
                    for h in sorted(account.holdings.values(), key=lambda h: h.asset_id)
                    if not h.is_empty()
                ],
            )
            audience = (
                [account.exchange_id, account.client_id]
                if account.exchange_id
                else [account.client_id]
            )
            envelope = sign_statement(
                message,
                self.signer,
                audience=audience,
                sequence=index + 1,
                ttl=self.settings.statement_ttl,
                issued_at=now,
            )
            leaf = statement_leaf(envelope)
            ref = attestation_pb2.AttestationRef(
                log_origin=self.settings.log_origin,
                leaf_index=index,
                leaf_hash=leaf_hash(leaf),
                tree_size=end,
            )
            self.store.add_statement(
                StoredStatement(
                    leaf_index=index,
                    account_id=account.account_id,
                    epoch=account.epoch,
                    reason=change.reason,
                    envelope=envelope,
                    attestation=ref,
                    checkpoint_after=index == end - 1,
                )
            )
            self.store.save_account(account)
            if account.exchange_id:
                holdings_change = position_sync_pb2.HoldingsChange(
                    holdings_statement=envelope, attestation=ref
                )
                if change.liquidation_path is not None:
                    # How the exchange learns the path id its instructions must name.
                    holdings_change.liquidation_path.CopyFrom(change.liquidation_path)
                self._announce(
                    account.exchange_id,
                    position_sync_pb2.PositionUpdate(holdings_change=holdings_change),
                )
            issued.append((envelope, ref))
        return issued

    def _announce_pledges(
        self, account: Account, asset_ids: Iterable[str], ref: attestation_pb2.AttestationRef
    ) -> None:
        """A pledge_change per asset, by asset id: its pledge as the account now holds it, as
        the holdings statement at ``ref`` records it (§6.8), on the account's exchange's log."""
        self._announce(
            account.exchange_id,
            *(
                position_sync_pb2.PositionUpdate(
                    pledge_change=position_sync_pb2.PledgeChange(
                        account_id=account.account_id,
                        asset_id=asset_id,
                        pledged_quantity=amount_to_proto(account.holding(asset_id).pledged),
                        attestation=ref,
                    )
                )
                for asset_id in sorted(asset_ids)
            ),
        )

    def _announce(self, exchange: str, *updates: position_sync_pb2.PositionUpdate) -> None:
        log = self.sync_logs.get(exchange)
        if log is not None:
            log.append(updates)

    # ------------------------------------------------------------------ verification helpers

    def _verify(
        self,
        envelope: envelope_pb2.Envelope,
        expected_type: type[M],
        now: datetime,
        *,
        on_stream: bool = False,
    ) -> VerifiedStatement[M]:
        """Stages a to f of a statement addressed to us; g is checked by the caller."""
        return verify_statement(
            envelope,
            self.registry,
            expected_type=expected_type,
            audience=self.party_id,
            now=now,
            max_skew=_STREAM_SKEW if on_stream else self.max_skew,
        )

    def _account(self, account_id: str, field: str) -> Account:
        if not account_id:
            raise _required(field, "an account id")
        account = self.store.account(account_id)
        if account is None:
            raise _not_found("account", account_id, field)
        return account

    def _require_client(self, account: Account, statement: VerifiedStatement[Any]) -> None:
        # Which client owns an account is configuration (docs/PROTOCOL.md §17 item 3).
        if statement.issuer != account.client_id:
            raise VerificationError(
                f"account {account.account_id!r} belongs to client {account.client_id!r}, "
                f"not to the issuer {statement.issuer!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": account.client_id, "actual": statement.issuer},
            )

    def _asset(self, asset_id: str, field: str) -> str:
        if not asset_id:
            raise _required(field, "an asset id")
        if asset_id not in self.settings.assets:
            raise _not_found("asset", asset_id, field)
        return asset_id
