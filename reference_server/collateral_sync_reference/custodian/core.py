"""The custodian's behaviour: holdings, attestation, pledges, redemptions, yield, liquidation.

Every change of an account's holdings is an *operation*: in one storage
transaction it changes the account, issues the account's next holdings
statement (a leaf of the attestation log at a pre-assigned index), records
the statement, the replay record of the client or exchange statement that
caused it, and appends the position-sync updates announcing it. After the
commit the new leaves are appended to the attestation log and a checkpoint is
signed at the operation's final size (:meth:`Custodian._attest_pending`).

Crash safety between the two files
----------------------------------
The attestation log is pymerkle's own SQLite file, so the two cannot share a
transaction. The order of writes is: (1) the database commit, holding the
signed statements and the sync entries; (2) the leaves, appended durably to the
log; (3) the checkpoint at the new size and the "attested up to" mark, in a
second database transaction. Nothing is announced before step 2 is done: steps
1 to 3 run without yielding to the event loop, so no sync session can send the
new entries and no RPC can answer in between; and a restarted custodian
finishes steps 2 and 3 for every recorded statement (:meth:`Custodian._recover`)
*before* it serves. A failure in step 2 or 3 ends the process at once, so a
statement is never announced while its leaf is missing. The one case the order
cannot exclude is the log ending up *ahead* of the database (the database's
last commits lost to a power failure under ``synchronous=NORMAL``): those
leaves were never announced; they are adopted as orphan statements and the
account's epochs continue after them.

Holdings statement sequences are ``leaf_index + 1``, so they increase with the
log and need no counter; every other statement type we sign takes its
sequence from the storage's counter in the transaction that stores it.
"""

from __future__ import annotations

import contextlib
import decimal
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from collateral_sync.amounts import amount_from_proto, amount_to_proto, format_amount
from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import _to_timestamp
from collateral_sync.merkle import leaf_hash
from collateral_sync.signing import (
    VerifiedStatement,
    add_signature,
    sign_statement,
    verify_statement,
)
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, SyncLog, SyncSession
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    recompute_liquidation_instruction,
    recompute_margin_call,
    validate_risk_policy,
)
from google.protobuf.message import Message

from collateral_sync_reference.common.errors import conflict as _conflict
from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.common.runner import ServerContext
from collateral_sync_reference.custodian.config import CustodianSettings, MarginCallAnswer
from collateral_sync_reference.custodian.store import (
    Account,
    Holding,
    LiquidationRecord,
    MarginCallRecord,
    PathRecord,
    Redemption,
    RejectedUpdate,
    SqliteCustodianStore,
    StoredCheckpoint,
    StoredStatement,
    from_us,
    to_us,
)

__all__ = ["Custodian"]

_R = errors_pb2.ErrorReason
_REASON = attestation_pb2.HoldingsChangeReason
_KIND = margin_pb2.MarginCallResponseKind
_DISPUTE = margin_pb2.DisputeReason
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE

_CHECKPOINT_TYPE = payload_type_of(attestation_pb2.Checkpoint)
_RECEIPT_TYPE = payload_type_of(liquidation_pb2.LiquidationReceipt)
_RESPONSE_TYPE = payload_type_of(margin_pb2.MarginCallResponse)
_ATTESTED_KEY = "custodian_attested_size"
_YIELD_KEY = "custodian_yield_last_boundary_us"

# Statements inside a sync batch are judged fresh by the batch (docs/PROTOCOL.md
# §3.6.1, last row): a skew this wide makes stage f pass for any valid header.
_STREAM_SKEW = timedelta(days=4_000_000)
# Exact arithmetic: no canonical amount, nor a product of two, comes near 200
# digits, and Inexact is trapped so nothing is rounded by accident.
_EXACT = decimal.Context(
    prec=200, traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow]
)
_ROUNDING = decimal.Context(prec=200, traps=[decimal.InvalidOperation, decimal.Overflow])
_QUANTUM = Decimal(1).scaleb(-18)
_ZERO = Decimal(0)

_LOGGER = logging.getLogger("collateral_sync_reference.custodian")

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


def _free(holding: Holding) -> Decimal:
    """What may still be pledged: neither locked, pledged nor undistributed yield."""
    return _sub(
        _sub(_sub(holding.quantity, holding.locked), holding.pledged), holding.accrued_yield
    )


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


class Custodian:
    """The reference custodian's state and behaviour (the servicers are thin wrappers)."""

    def __init__(self, context: ServerContext, settings: CustodianSettings) -> None:
        self._context = context
        self._settings = settings
        self._storage = context.storage
        self._clock = context.clock
        self._signer = context.signer
        self._registry = context.registry
        self._party_id = context.party_id
        self._max_skew = context.config.max_skew
        self._asset_classes = settings.asset_classes()
        self._store = SqliteCustodianStore(context.storage)
        self._guard = context.storage.replay_guard()
        self._log = AttestationLog(settings.attestation_log, origin=settings.log_origin)
        self._attesting = False
        self.exchanges = tuple(
            peer
            for peer in context.config.peers
            if any(k.role == _EXCHANGE_ROLE for k in self._registry.keys_for(peer))
        )
        self._sync_logs: dict[str, SyncLog] = {}
        self.sessions: dict[str, SyncSession] = {}
        sync = context.config.sync
        for exchange in self.exchanges:
            log = context.storage.sync_log(
                party_id=self._party_id,
                peer_party_id=exchange,
                sending_direction=CUSTODIAN_TO_EXCHANGE,
            )
            self._sync_logs[exchange] = log
            self.sessions[exchange] = SyncSession(
                log,
                self._signer,
                self._registry,
                apply=self._stream_applier(exchange),
                window=sync.window,
                batch_size=sync.batch_size,
                heartbeat_interval=sync.heartbeat_interval,
                max_skew=self._max_skew,
                clock=self._clock.now,
            )
            # A batch the stream applied commits in the log's own transaction:
            # its statements are attested right after, before anything is sent.
            log.add_listener(self._attest_pending)
        context.storage.add_commit_listener(self._after_commit)
        self._recover()
        self._open_accounts()

    @property
    def settings(self) -> CustodianSettings:
        return self._settings

    @property
    def attestation_log(self) -> AttestationLog:
        return self._log

    def close(self) -> None:
        self._log.close()

    # ------------------------------------------------------------------ attestation

    def _after_commit(self) -> None:
        self._attest_pending()
        for log in self._sync_logs.values():
            log.notify()

    def _attested_size(self) -> int:
        stored = self._storage.get_meta(_ATTESTED_KEY)
        return 0 if stored is None else int(stored)

    def _attest_pending(self) -> None:
        """Append recorded-but-unattested leaves and sign their checkpoints (steps 2 and 3)."""
        if self._attesting:
            return
        self._attesting = True
        try:
            attested = self._attested_size()
            count = self._store.statement_count()
            if attested >= count:
                return
            pending = self._store.statements_from(attested)
            self._append_leaves(pending)
            now = self._clock.now()
            with self._storage.transaction():
                for statement in pending:
                    if statement.checkpoint_after:
                        self._sign_checkpoint(statement.leaf_index + 1, now)
                self._storage.set_meta(_ATTESTED_KEY, str(count))
        except Exception as err:
            # Sync entries announcing these statements are committed; serving on
            # would risk sending them without their leaves. Stop now; recovery
            # completes the attestation before the next start serves anything.
            _LOGGER.critical("attestation failed, stopping at once: %r", err, exc_info=err)
            logging.shutdown()
            os._exit(70)
        finally:
            self._attesting = False

    def _append_leaves(self, pending: Sequence[StoredStatement]) -> None:
        """Append the leaves of recorded statements the log does not hold yet."""
        size = self._log.size
        new = [s for s in pending if s.leaf_index >= size]
        if not new:
            return
        if new[0].leaf_index != size:
            raise RuntimeError(
                f"attestation log has {size} leaves, next recorded statement is {new[0].leaf_index}"
            )
        self._log.append_many([statement_leaf(s.envelope) for s in new])

    def _sign_checkpoint(self, size: int, now: datetime) -> StoredCheckpoint:
        """Sign and store a checkpoint at ``size`` leaves; inside a transaction."""
        message = attestation_pb2.Checkpoint(
            origin=self._settings.log_origin, tree_size=size, root_hash=self._log.root(size)
        )
        message.timestamp.CopyFrom(_to_timestamp(now))
        envelope = sign_statement(
            message,
            self._signer,
            audience=["*"],
            sequence=self._storage.next_sequence(_CHECKPOINT_TYPE),
            ttl=self._settings.checkpoint_ttl,
            issued_at=now,
        )
        checkpoint = StoredCheckpoint(size, envelope, now)
        self._store.add_checkpoint(checkpoint)
        return checkpoint

    def _recover(self) -> None:
        """Bring the log and the database into step before serving (module docstring)."""
        count = self._store.statement_count()
        size = self._log.size
        if size > count:
            self._adopt_orphans(count, size)
        self._attest_pending()
        if self._store.latest_checkpoint() is None:
            with self._storage.transaction():
                self._sign_checkpoint(self._log.size, self._clock.now())

    def _adopt_orphans(self, count: int, size: int) -> None:
        _LOGGER.warning(
            "attestation log holds %d leaves the database does not know (indexes %d..%d): "
            "adopting them as never-announced orphans",
            size - count,
            count,
            size - 1,
        )
        with self._storage.transaction():
            for index in range(count, size):
                leaf = self._log.leaf(index)
                payload_type, payload = _split_pae(leaf)
                # Ed25519 is deterministic: signing the same bytes again gives the
                # signature the lost envelope carried.
                envelope = envelope_pb2.Envelope(
                    payload=payload,
                    payload_type=payload_type,
                    signatures=[
                        envelope_pb2.Signature(
                            key_id=self._signer.key_id, sig=self._signer.sign(leaf)
                        )
                    ],
                )
                statement = attestation_pb2.HoldingsStatement.FromString(payload)
                account = self._store.account(statement.account_id)
                if account is not None and statement.epoch > account.epoch:
                    account.epoch = statement.epoch
                    self._store.save_account(account)
                self._store.add_statement(
                    StoredStatement(
                        leaf_index=index,
                        account_id=statement.account_id,
                        epoch=statement.epoch,
                        reason=statement.reason,
                        envelope=envelope,
                        attestation=attestation_pb2.AttestationRef(
                            log_origin=self._settings.log_origin,
                            leaf_index=index,
                            leaf_hash=leaf_hash(leaf),
                            tree_size=size,
                        ),
                        checkpoint_after=index == size - 1,
                        orphan=True,
                    )
                )

    def _open_accounts(self) -> None:
        """Create the configured accounts the database does not have yet, attested."""
        new = [a for a in self._settings.accounts if self._store.account(a.account_id) is None]
        if not new:
            return
        now = self._clock.now()
        with self._storage.transaction():
            changes = []
            for settings in new:
                account = Account(settings.account_id, settings.client_id, "", 0)
                for asset_id, quantity in settings.holdings.items():
                    account.holding(asset_id).quantity = quantity
                self._store.add_account(account)
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
        base = self._store.statement_count()
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
                self._signer,
                audience=audience,
                sequence=index + 1,
                ttl=self._settings.statement_ttl,
                issued_at=now,
            )
            leaf = statement_leaf(envelope)
            ref = attestation_pb2.AttestationRef(
                log_origin=self._settings.log_origin,
                leaf_index=index,
                leaf_hash=leaf_hash(leaf),
                tree_size=end,
            )
            self._store.add_statement(
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
            self._store.save_account(account)
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

    def _announce(self, exchange: str, *updates: position_sync_pb2.PositionUpdate) -> None:
        log = self._sync_logs.get(exchange)
        if log is not None:
            log.append(updates)

    # ------------------------------------------------------------------ reads

    def latest_checkpoint(self) -> envelope_pb2.Envelope:
        """The latest checkpoint, re-signed first if it is older than the interval."""
        latest = self._store.latest_checkpoint()
        now = self._clock.now()
        if (
            latest is None
            or latest.tree_size != self._log.size
            or now - latest.issued_at >= self._settings.checkpoint_interval
        ):
            with self._storage.transaction():
                latest = self._sign_checkpoint(self._log.size, now)
        return latest.envelope

    def checkpoint(self, tree_size: int) -> envelope_pb2.Envelope:
        if tree_size == 0:
            return self.latest_checkpoint()
        size = self._log.size
        if tree_size > size:
            raise StateError(
                f"tree size {tree_size} is beyond the log of {size} leaves",
                reason=_R.ERROR_REASON_OUT_OF_RANGE,
                metadata={"field": "tree_size", "expected": f"<= {size}", "actual": str(tree_size)},
            )
        found = self._store.checkpoint_at(tree_size)
        if found is None:
            raise StateError(
                f"no checkpoint was signed at tree size {tree_size}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "tree_size",
                    "expected": "a size a checkpoint was signed at",
                    "actual": str(tree_size),
                },
            )
        now = self._clock.now()
        if (
            now - found.issued_at
            >= self._settings.checkpoint_ttl - self._settings.checkpoint_interval
        ):
            # Same size, same root: a fresh signature, so the answer is still verifiable.
            with self._storage.transaction():
                found = self._sign_checkpoint(tree_size, now)
        return found.envelope

    def _latest_size(self) -> int:
        latest = self._store.latest_checkpoint()
        return self._log.size if latest is None else latest.tree_size

    def inclusion_proof(
        self, leaf_index: int, tree_size: int
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.InclusionProof]:
        size = tree_size or self._latest_size()
        proof = self._log.inclusion_proof(leaf_index, size)
        stored = self._store.statement(leaf_index)
        if stored is None:  # pragma: no cover - every leaf has its record after recovery
            raise _not_found("leaf", str(leaf_index), "leaf_index")
        return stored.envelope, proof

    def consistency_proof(
        self, first_tree_size: int, second_tree_size: int
    ) -> attestation_pb2.ConsistencyProof:
        second = second_tree_size or self._latest_size()
        return self._log.consistency_proof(first_tree_size, second)

    def holdings_statement(
        self, account_id: str
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.AttestationRef]:
        if not account_id:
            raise _required("account_id", "an account id")
        stored = self._store.latest_statement(account_id)
        if stored is None:
            raise _not_found("account", account_id, "account_id")
        return stored.envelope, stored.attestation

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
            self._registry,
            expected_type=expected_type,
            audience=self._party_id,
            now=now,
            max_skew=_STREAM_SKEW if on_stream else self._max_skew,
        )

    def _account(self, account_id: str, field: str) -> Account:
        if not account_id:
            raise _required(field, "an account id")
        account = self._store.account(account_id)
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
        if asset_id not in self._settings.assets:
            raise _not_found("asset", asset_id, field)
        return asset_id

    # ------------------------------------------------------------------ pledges

    def pledge(
        self, request: custodian_service_pb2.PledgeCollateralRequest
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.AttestationRef]:
        """Record a client's pledge and its pre-authorised liquidation path (PledgeCollateral)."""
        now = self._clock.now()
        if not request.HasField("pledge_instruction"):
            raise _required("pledge_instruction", "a signed PledgeInstruction")
        if not request.HasField("liquidation_path"):
            raise _required("liquidation_path", "a signed LiquidationPath")
        verified = self._verify(
            request.pledge_instruction, custodian_service_pb2.PledgeInstruction, now
        )
        self._guard.check(verified.issuer, verified.payload_type, verified.sequence)
        path = self._verify(request.liquidation_path, liquidation_pb2.LiquidationPath, now)
        instruction = verified.message
        account = self._account(instruction.account_id, "pledge_instruction.account_id")
        self._require_client(account, verified)
        self._require_client(account, path)
        asset_id = self._asset(instruction.asset_id, "pledge_instruction.asset_id")
        quantity = _positive_amount(instruction, "quantity", "pledge_instruction.quantity")
        exchange = instruction.exchange_id
        if exchange not in self.exchanges:
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

        with self._storage.transaction():
            reason = (
                _REASON.HOLDINGS_CHANGE_REASON_TOP_UP
                if account.exchange_id
                else _REASON.HOLDINGS_CHANGE_REASON_PLEDGE
            )
            account.exchange_id = exchange
            holding.pledged = _add(holding.pledged, quantity)
            if new_path:
                recorded_path = add_signature(path.envelope, self._signer)
                self._store.add_path(
                    PathRecord(
                        statement_id=path.header.statement_id,
                        account_id=account.account_id,
                        exchange_id=exchange,
                        recorded_at=now,
                        envelope=recorded_path,
                    )
                )
                self._guard.record(path)
            else:
                record = self._store.path(path.header.statement_id)
                assert record is not None  # _check_path found it
                recorded_path = record.envelope
            self._store.add_pledge(
                verified.header.statement_id,
                account.account_id,
                asset_id,
                quantity,
                verified.payload,
            )
            self._guard.record(verified)
            [(envelope, ref)] = self._attest(
                [_Change(account, reason, liquidation_path=recorded_path)], now
            )
            self._announce(
                exchange,
                position_sync_pb2.PositionUpdate(
                    pledge_change=position_sync_pb2.PledgeChange(
                        account_id=account.account_id,
                        asset_id=asset_id,
                        pledged_quantity=amount_to_proto(holding.pledged),
                        attestation=ref,
                    )
                ),
            )
        return envelope, ref

    def _check_path(
        self,
        path: VerifiedStatement[liquidation_pb2.LiquidationPath],
        instruction: custodian_service_pb2.PledgeInstruction,
    ) -> bool:
        """Check a pledge's liquidation path; True if it is new (to be recorded)."""
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
            self._asset(step.asset_id, f"{field}.asset_id")
            if not step.venue:
                raise _required(f"{field}.venue", "a venue")
            _positive_amount(step, "max_quantity", f"{field}.max_quantity")
        recorded = self._store.path(path.header.statement_id)
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
        self._guard.check(path.issuer, path.payload_type, path.sequence)
        return True

    # ------------------------------------------------------------------ redemptions

    def redeem(
        self, request: custodian_service_pb2.RequestRedemptionRequest
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.AttestationRef]:
        """Lock a client's assets until settlement (RequestRedemption)."""
        now = self._clock.now()
        if not request.HasField("redemption_request"):
            raise _required("redemption_request", "a signed RedemptionRequest")
        verified = self._verify(
            request.redemption_request, custodian_service_pb2.RedemptionRequest, now
        )
        self._guard.check(verified.issuer, verified.payload_type, verified.sequence)
        redemption = verified.message
        if not redemption.redemption_id:
            raise _required("redemption_request.redemption_id", "a redemption id")
        account = self._account(redemption.account_id, "redemption_request.account_id")
        self._require_client(account, verified)
        asset_id = self._asset(redemption.asset_id, "redemption_request.asset_id")
        quantity = _positive_amount(redemption, "quantity", "redemption_request.quantity")
        if self._store.redemption(redemption.redemption_id) is not None:
            raise _conflict(
                f"redemption {redemption.redemption_id!r} already exists",
                "redemption_request.redemption_id",
                "a new redemption id",
                redemption.redemption_id,
            )
        holding = account.holding(asset_id)
        unlocked = _sub(holding.quantity, holding.locked)
        if quantity > unlocked:
            raise _conflict(
                f"redemption of {format_amount(quantity)} {asset_id} exceeds the "
                f"{format_amount(unlocked)} not yet locked",
                "redemption_request.quantity",
                f"<= {format_amount(unlocked)}",
                format_amount(quantity),
            )
        with self._storage.transaction():
            holding.locked = _add(holding.locked, quantity)
            self._store.add_redemption(
                Redemption(
                    redemption.redemption_id,
                    account.account_id,
                    asset_id,
                    quantity,
                    now + self._settings.redemption_lock,
                ),
                verified.payload,
            )
            self._guard.record(verified)
            [(envelope, ref)] = self._attest(
                [_Change(account, _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK)], now
            )
        return envelope, ref

    def _settle(self, redemption: Redemption, now: datetime) -> None:
        """Release a redemption's lock and let the quantity leave the account."""
        with self._storage.transaction():
            account = self._store.account(redemption.account_id)
            if account is None:  # pragma: no cover - accounts are never deleted
                raise RuntimeError(f"redemption {redemption.redemption_id} of a missing account")
            holding = account.holding(redemption.asset_id)
            holding.quantity = _sub(holding.quantity, redemption.quantity)
            holding.locked = _sub(holding.locked, redemption.quantity)
            pledged_before = holding.pledged
            # What left the account can be neither pledged nor owed as yield any more.
            holding.pledged = min(holding.pledged, _sub(holding.quantity, holding.locked))
            holding.accrued_yield = max(
                _ZERO,
                min(
                    holding.accrued_yield,
                    _sub(_sub(holding.quantity, holding.locked), holding.pledged),
                ),
            )
            self._store.mark_settled(redemption.redemption_id)
            [(_, ref)] = self._attest(
                [_Change(account, _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_SETTLED)], now
            )
            if account.exchange_id and holding.pledged != pledged_before:
                self._announce(
                    account.exchange_id,
                    position_sync_pb2.PositionUpdate(
                        pledge_change=position_sync_pb2.PledgeChange(
                            account_id=account.account_id,
                            asset_id=redemption.asset_id,
                            pledged_quantity=amount_to_proto(holding.pledged),
                            attestation=ref,
                        )
                    ),
                )

    # ------------------------------------------------------------------ deposits and yield

    def deposit(self, request: test_control_pb2.DepositRequest) -> None:
        """Credit assets arriving from outside (TestControlService.Deposit)."""
        now = self._clock.now()
        account = self._account(request.account_id, "account_id")
        asset_id = self._asset(request.asset_id, "asset_id")
        quantity = _positive_amount(request, "quantity", "quantity")
        with self._storage.transaction():
            holding = account.holding(asset_id)
            holding.quantity = _add(holding.quantity, quantity)
            self._attest([_Change(account, _REASON.HOLDINGS_CHANGE_REASON_DEPOSIT)], now)

    def accrue_yield(self, accrual_time: datetime, *, boundary: datetime | None = None) -> int:
        """Accrue one day's yield on every fund holding; returns the accounts changed.

        With ``boundary`` (a scheduled run) the boundary is recorded as done in
        the same transaction, so a restart never accrues a day twice.
        """
        now = self._clock.now()
        rates = {
            a.asset_id: a.daily_yield_rate
            for a in self._settings.assets.values()
            if a.daily_yield_rate is not None
        }
        with self._storage.transaction():
            changes: list[_Change] = []
            accrued: list[list[tuple[str, Decimal]]] = []
            for account_id in self._store.accounts_holding(rates):
                account = self._store.account(account_id)
                if account is None:  # pragma: no cover - listed from the same table
                    continue
                amounts = []
                for asset_id, rate in sorted(rates.items()):
                    holding = account.holdings.get(asset_id)
                    if holding is None or holding.quantity <= 0:
                        continue
                    amount = _round_down(_ROUNDING.multiply(holding.quantity, rate))
                    if amount <= 0:
                        continue
                    holding.quantity = _add(holding.quantity, amount)
                    holding.accrued_yield = _add(holding.accrued_yield, amount)
                    amounts.append((asset_id, amount))
                if amounts:
                    changes.append(_Change(account, _REASON.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL))
                    accrued.append(amounts)
            issued = self._attest(changes, now)
            for change, (_, ref), amounts in zip(changes, issued, accrued, strict=True):
                account = change.account
                if not account.exchange_id:
                    continue
                for asset_id, amount in amounts:
                    update = position_sync_pb2.YieldAccrual(
                        account_id=account.account_id,
                        asset_id=asset_id,
                        accrued_quantity=amount_to_proto(amount),
                        attestation=ref,
                    )
                    update.accrual_time.CopyFrom(_to_timestamp(accrual_time))
                    self._announce(
                        account.exchange_id, position_sync_pb2.PositionUpdate(yield_accrual=update)
                    )
            if boundary is not None:
                self._storage.set_meta(_YIELD_KEY, str(to_us(boundary)))
        return len(changes)

    # ------------------------------------------------------------------ time-driven work

    def _yield_boundary(self, moment: datetime) -> datetime:
        """The latest daily yield time at or before ``moment``."""
        at = datetime.combine(moment.date(), self._settings.yield_time, tzinfo=moment.tzinfo)
        return at if at <= moment else at - timedelta(days=1)

    def _last_yield_boundary(self) -> datetime:
        stored = self._storage.get_meta(_YIELD_KEY)
        if stored is not None:
            return from_us(int(stored))
        # First start: accrual begins with the next yield time, not retroactively.
        boundary = self._yield_boundary(self._clock.now())
        with self._storage.transaction():
            self._storage.set_meta(_YIELD_KEY, str(to_us(boundary)))
        return boundary

    def run_due(self) -> None:
        """Do the time-driven work that is due: settlements, then each missed yield day."""
        now = self._clock.now()
        for redemption in self._store.due_redemptions(now):
            self._settle(redemption, now)
        boundary = self._last_yield_boundary() + timedelta(days=1)
        while boundary <= now:
            self.accrue_yield(boundary, boundary=boundary)
            boundary += timedelta(days=1)

    def next_due(self) -> datetime:
        """When :meth:`run_due` next has work (a settlement or the next yield time)."""
        due = self._last_yield_boundary() + timedelta(days=1)
        settlement = self._store.next_settlement()
        return due if settlement is None else min(due, settlement)

    # ------------------------------------------------------------------ liquidation

    def liquidate(
        self,
        envelope: envelope_pb2.Envelope,
        *,
        now: datetime,
        tls_peer: str | None = None,
    ) -> envelope_pb2.Envelope:
        """Execute a liquidation instruction along the pre-authorised path; return the receipt.

        SubmitLiquidationInstruction: in a transaction of its own; every
        refusal is the call's status. A repeat of an executed instruction
        returns its receipt and changes nothing.
        """
        verified, receipt = self._check_instruction(envelope, now, tls_peer=tls_peer)
        if receipt is not None:
            return receipt
        return self._liquidate_verified(verified, now, on_stream=False)

    def _check_instruction(
        self,
        envelope: envelope_pb2.Envelope,
        now: datetime,
        *,
        tls_peer: str | None,
        on_stream: bool = False,
    ) -> tuple[
        VerifiedStatement[liquidation_pb2.LiquidationInstruction], envelope_pb2.Envelope | None
    ]:
        """The instruction's integrity: stages a to g, and that its issuer is the sender.

        Returns the verified statement and, for a repeat of an instruction
        already executed, its receipt (a repeat is no replay: it is answered).
        """
        verified = self._verify(
            envelope, liquidation_pb2.LiquidationInstruction, now, on_stream=on_stream
        )
        exchange = verified.issuer
        if tls_peer is not None and tls_peer != exchange:
            raise VerificationError(
                f"liquidation instruction issued by {exchange!r} arrived from {tls_peer!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": exchange, "actual": tls_peer},
            )
        liquidation_id = verified.message.liquidation_id
        executed = self._store.liquidation(liquidation_id) if liquidation_id else None
        if executed is not None and executed.instruction_payload == verified.payload:
            return verified, executed.receipt
        self._guard.check(verified.issuer, verified.payload_type, verified.sequence)
        return verified, None

    def _liquidate_verified(
        self,
        verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction],
        now: datetime,
        *,
        on_stream: bool,
    ) -> envelope_pb2.Envelope:
        """What the instruction asks, checked, then executed (business refusals raise).

        On the stream it runs inside the batch's transaction; from the RPC in
        a transaction of its own.
        """
        instruction = verified.message
        if not instruction.liquidation_id:
            raise _required("liquidation_instruction.liquidation_id", "a liquidation id")
        if self._store.liquidation(instruction.liquidation_id) is not None:
            raise _conflict(
                f"liquidation {instruction.liquidation_id!r} was executed from another instruction",
                "liquidation_instruction.liquidation_id",
                "a new liquidation id",
                instruction.liquidation_id,
            )
        account = self._account(instruction.account_id, "liquidation_instruction.account_id")
        path = self._authorised_path(account, verified)
        margin_call = self._expired_margin_call(account, verified)
        issued_at = verified.header.issued_at.ToDatetime(tzinfo=now.tzinfo)
        check = recompute_liquidation_instruction(
            verified.envelope,
            self._registry,
            audience=self._party_id,
            asset_classes=self._asset_classes,
            now=issued_at if on_stream else now,
            margin_call=margin_call,
        )
        prices = _snapshot_prices(instruction.inputs.price_snapshot)
        steps = liquidation_pb2.LiquidationPath.FromString(path.envelope.payload).steps

        with contextlib.nullcontext() if on_stream else self._storage.transaction():
            return self._execute(
                account, verified, amount=check.amount, steps=steps, prices=prices, now=now
            )

    def _authorised_path(
        self, account: Account, verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction]
    ) -> PathRecord:
        """The recorded path the instruction names, if it is the one in force for its issuer."""
        instruction = verified.message
        path_id = instruction.liquidation_path_id
        exchange = verified.issuer

        def refuse(why: str, expected: str) -> VerificationError:
            return VerificationError(
                f"liquidation path {path_id!r} is not authorised: {why}",
                reason=_R.ERROR_REASON_PATH_NOT_AUTHORISED,
                metadata={
                    "field": "liquidation_instruction.liquidation_path_id",
                    "expected": expected,
                    "actual": path_id,
                },
            )

        if account.exchange_id != exchange:
            raise refuse(
                f"account {account.account_id!r} pledges to {account.exchange_id or 'no exchange'!r}, "
                f"not to the issuer {exchange!r}",
                "a path of the account's exchange",
            )
        paths = self._store.paths_for(account.account_id, exchange)
        in_force = [p.statement_id for p in paths]
        for position, path in enumerate(paths):
            if path.statement_id != path_id:
                continue
            issued_at = verified.header.issued_at.ToDatetime(tzinfo=path.recorded_at.tzinfo)
            later = paths[position + 1 :]
            if later and later[0].recorded_at <= issued_at:
                raise refuse(
                    f"superseded by path {later[0].statement_id!r} before the instruction was "
                    "issued",
                    later[-1].statement_id,
                )
            return path
        raise refuse(
            f"no path of that id was pre-authorised for account {account.account_id!r} and "
            f"exchange {exchange!r}",
            in_force[-1] if in_force else "a pre-authorised path",
        )

    def _expired_margin_call(
        self, account: Account, verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction]
    ) -> margin_pb2.MarginCall | None:
        """The margin call a liquidation follows, checked to have expired undisputed."""
        call_id = verified.message.margin_call_id
        if not call_id:
            return None
        record = self._store.margin_call(call_id)
        if record is None or record.account_id != account.account_id:
            raise _not_found("margin call", call_id, "liquidation_instruction.margin_call_id")
        if record.response_kind == _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE:
            raise _conflict(
                f"margin call {call_id!r} is disputed; a disputed call does not expire",
                "liquidation_instruction.margin_call_id",
                "an expired margin call",
                "DISPUTED",
            )
        issued_us = to_us(verified.header.issued_at.ToDatetime(tzinfo=record.due_by.tzinfo))
        if issued_us < to_us(record.due_by):
            raise _conflict(
                f"margin call {call_id!r} is due by {record.due_by.isoformat()}; the "
                "instruction was issued before it expired",
                "liquidation_instruction.margin_call_id",
                f"issued at or after {record.due_by.isoformat()}",
                verified.header.issued_at.ToJsonString(),
            )
        return margin_pb2.MarginCall.FromString(record.envelope.payload)

    def _execute(
        self,
        account: Account,
        verified: VerifiedStatement[liquidation_pb2.LiquidationInstruction],
        *,
        amount: Decimal,
        steps: Sequence[liquidation_pb2.LiquidationStep],
        prices: dict[str, Decimal],
        now: datetime,
    ) -> envelope_pb2.Envelope:
        """Yield first, then the path's steps in order until ``amount`` is raised; inside a transaction."""
        instruction = verified.message
        receipt = liquidation_pb2.LiquidationReceipt(
            liquidation_id=instruction.liquidation_id, account_id=account.account_id
        )
        # 1. Yield rights come before any sale: pay out every undistributed accrual.
        for holding in sorted(account.holdings.values(), key=lambda h: h.asset_id):
            if holding.accrued_yield > 0:
                receipt.yield_distributions.add(
                    asset_id=holding.asset_id, quantity=amount_to_proto(holding.accrued_yield)
                )
                holding.quantity = _sub(holding.quantity, holding.accrued_yield)
                holding.accrued_yield = _ZERO
        # 2. Along the path only, each step within its maximum and the pledge.
        proceeds = _ZERO
        sold: dict[str, Decimal] = {}
        for step in steps:
            remaining = _sub(amount, proceeds)
            if remaining <= 0:
                break
            price = prices.get(step.asset_id, _ZERO)
            position = account.holdings.get(step.asset_id)
            if price <= 0 or position is None:
                continue
            sellable = min(
                amount_from_proto(step.max_quantity),
                position.pledged,
                _sub(position.quantity, position.locked),
            )
            needed = _round_up(_ROUNDING.divide(remaining, price))
            quantity = min(needed, sellable)
            if quantity <= 0:
                continue
            fill_proceeds = _round_down(_ROUNDING.multiply(quantity, price))
            position.quantity = _sub(position.quantity, quantity)
            position.pledged = _sub(position.pledged, quantity)
            proceeds = _add(proceeds, fill_proceeds)
            sold[step.asset_id] = _add(sold.get(step.asset_id, _ZERO), quantity)
            receipt.fills.add(
                asset_id=step.asset_id,
                quantity=amount_to_proto(quantity),
                price=amount_to_proto(price),
                proceeds=amount_to_proto(fill_proceeds),
                venue=step.venue,
            )
        receipt.total_proceeds.CopyFrom(amount_to_proto(proceeds))
        receipt.shortfall.CopyFrom(amount_to_proto(max(_ZERO, _sub(amount, proceeds))))
        [(_, ref)] = self._attest(
            [_Change(account, _REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION)], now
        )
        receipt.attestation.CopyFrom(ref)
        envelope = sign_statement(
            receipt,
            self._signer,
            audience=[verified.issuer],
            sequence=self._storage.next_sequence(_RECEIPT_TYPE),
            ttl=self._settings.statement_ttl,
            issued_at=now,
        )
        self._store.add_liquidation(
            LiquidationRecord(
                instruction.liquidation_id, account.account_id, verified.payload, envelope
            )
        )
        self._guard.record(verified)
        updates = [
            position_sync_pb2.PositionUpdate(
                pledge_change=position_sync_pb2.PledgeChange(
                    account_id=account.account_id,
                    asset_id=asset_id,
                    pledged_quantity=amount_to_proto(account.holding(asset_id).pledged),
                    attestation=ref,
                )
            )
            for asset_id in sorted(sold)
        ]
        updates.append(position_sync_pb2.PositionUpdate(liquidation_receipt=envelope))
        self._announce(verified.issuer, *updates)
        return envelope

    # ------------------------------------------------------------------ the sync stream

    def _stream_applier(
        self, exchange: str
    ) -> Callable[[list[tuple[int, position_sync_pb2.PositionUpdate]]], None]:
        def apply(updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
            # Inside the batch's transaction. A statement that does not verify
            # fails (rolls back) the whole batch; one that verifies but asks for
            # something we cannot do is recorded as rejected, and the rest of
            # the batch is applied (PROTOCOL.md §6.5).
            now = self._clock.now()
            for sequence, update in updates:
                kind = update.WhichOneof("update")
                try:
                    if kind == "credit_line":
                        self._on_credit_line(exchange, update.credit_line, now)
                    elif kind == "margin_call":
                        self._on_margin_call(exchange, sequence, update.margin_call, now)
                    elif kind == "liquidation_instruction":
                        self._on_liquidation_instruction(
                            exchange, sequence, update.liquidation_instruction, now
                        )
                    elif kind == "risk_policy":
                        self._on_risk_policy(exchange, sequence, update.risk_policy, now)
                    else:  # pragma: no cover - the sync log checks variants per direction
                        raise MalformedError(
                            f"update of kind {kind} is not one an exchange sends",
                            metadata={
                                "expected": "an exchange-to-custodian update",
                                "actual": str(kind),
                            },
                        )
                except CollateralSyncError as err:
                    err.metadata.setdefault("sequence", str(sequence))
                    raise

        return apply

    @contextlib.contextmanager
    def _or_rejected(
        self,
        exchange: str,
        sequence: int,
        kind: str,
        envelope: envelope_pb2.Envelope,
        now: datetime,
    ) -> Iterator[None]:
        """Act on a verified stream statement; a refusal is recorded instead of raised.

        The stream cannot answer one update, and failing the batch would block
        every later entry behind it for good: the refused action's writes are
        undone (a savepoint inside the batch's transaction) and the refusal is
        kept with its reason. The statement is not recorded for replay, so the
        exchange may still send it by RPC, where the refusal is a status.
        """
        connection = self._storage.connection
        connection.execute("SAVEPOINT custodian_update")
        try:
            yield
        except CollateralSyncError as err:
            connection.execute("ROLLBACK TO custodian_update")
            connection.execute("RELEASE custodian_update")
            _LOGGER.warning(
                "sync entry %d from %s: %s rejected: %s: %s",
                sequence,
                exchange,
                kind,
                err.reason_name,
                err.message,
            )
            self._store.add_rejected_update(
                RejectedUpdate(
                    exchange_id=exchange,
                    sync_sequence=sequence,
                    kind=kind,
                    reason=err.reason_name,
                    detail=err.message,
                    envelope=envelope,
                    rejected_at=now,
                )
            )
        except BaseException:
            connection.execute("ROLLBACK TO custodian_update")
            connection.execute("RELEASE custodian_update")
            raise
        else:
            connection.execute("RELEASE custodian_update")

    def rejected_updates(self, exchange: str) -> list[RejectedUpdate]:
        """The stream updates of ``exchange`` recorded as rejected, in stream order."""
        return self._store.rejected_updates(exchange)

    def _on_liquidation_instruction(
        self, exchange: str, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        verified, receipt = self._check_instruction(
            envelope, now, tls_peer=exchange, on_stream=True
        )
        if receipt is not None:
            return  # executed before (and its receipt announced then)
        with self._or_rejected(exchange, sequence, "liquidation_instruction", envelope, now):
            self._liquidate_verified(verified, now, on_stream=True)

    def _from_peer(
        self,
        exchange: str,
        envelope: envelope_pb2.Envelope,
        expected_type: type[M],
        now: datetime,
    ) -> VerifiedStatement[M]:
        verified = self._verify(envelope, expected_type, now, on_stream=True)
        if verified.issuer != exchange:
            raise VerificationError(
                f"{verified.payload_type} issued by {verified.issuer!r} on the stream of {exchange!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": exchange, "actual": verified.issuer},
            )
        self._guard.check(verified.issuer, verified.payload_type, verified.sequence)
        return verified

    def _on_credit_line(
        self, exchange: str, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        verified = self._from_peer(exchange, envelope, valuation_pb2.CreditLine, now)
        self._store.put_credit_line(verified.message.account_id, envelope)
        self._guard.record(verified)

    def _on_risk_policy(
        self, exchange: str, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        verified = self._from_peer(exchange, envelope, valuation_pb2.RiskPolicy, now)
        with self._or_rejected(exchange, sequence, "risk_policy", envelope, now):
            # Signed, but figures no valuation can use: not a policy we hold the exchange to.
            validate_risk_policy(verified.message)
            self._store.put_risk_policy(verified.message.version, envelope)
            self._guard.record(verified)

    def _on_margin_call(
        self, exchange: str, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        verified = self._from_peer(exchange, envelope, margin_pb2.MarginCall, now)
        with self._or_rejected(exchange, sequence, "margin_call", envelope, now):
            self._answer_margin_call(exchange, verified, now)

    def _answer_margin_call(
        self,
        exchange: str,
        verified: VerifiedStatement[margin_pb2.MarginCall],
        now: datetime,
    ) -> None:
        """Record a margin call and answer it on the stream, after recomputing it.

        A call whose signed inputs do not give its figures is answered with a
        DISPUTE; one that cannot be a call at all (no id, an id already used)
        is refused, and so recorded as rejected by the caller.
        """
        envelope = verified.envelope
        call = verified.message
        if not call.margin_call_id:
            raise _required("margin_call.margin_call_id", "a margin call id")
        if self._store.margin_call(call.margin_call_id) is not None:
            raise _conflict(
                f"margin call {call.margin_call_id!r} was already received",
                "margin_call.margin_call_id",
                "a new margin call id",
                call.margin_call_id,
            )
        issued_at = verified.header.issued_at.ToDatetime(tzinfo=now.tzinfo)
        response = margin_pb2.MarginCallResponse(margin_call_id=call.margin_call_id)
        try:
            check = recompute_margin_call(
                envelope,
                self._registry,
                audience=self._party_id,
                asset_classes=self._asset_classes,
                now=issued_at,
            )
        except CollateralSyncError as err:
            # A call its own signed inputs do not prove is disputed, not refused:
            # the exchange learns why from the response.
            response.kind = _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE
            response.agreed_amount.CopyFrom(amount_to_proto(0))
            response.dispute_reason = (
                _DISPUTE.DISPUTE_REASON_ARITHMETIC
                if err.reason == _R.ERROR_REASON_PROOF_INVALID
                else _DISPUTE.DISPUTE_REASON_POSITIONS
            )
            response.dispute_detail = f"{err.reason_name}: {err.message}"[:1000]
        else:
            answers = self._settings.margin_call_answers
            answer = answers[min(self._store.answered_margin_calls(), len(answers) - 1)]
            _apply_answer(response, answer, check.call_amount, check.risk_policy.rounding_scale)
        signed = sign_statement(
            response,
            self._signer,
            audience=[exchange],
            sequence=self._storage.next_sequence(_RESPONSE_TYPE),
            ttl=self._settings.statement_ttl,
            issued_at=now,
        )
        due_by = call.due_by.ToDatetime(tzinfo=now.tzinfo) if call.HasField("due_by") else now
        self._store.add_margin_call(
            MarginCallRecord(
                call.margin_call_id, call.account_id, envelope, due_by, response.kind, signed
            )
        )
        self._guard.record(verified)
        self._announce(exchange, position_sync_pb2.PositionUpdate(margin_call_response=signed))


def _apply_answer(
    response: margin_pb2.MarginCallResponse,
    answer: MarginCallAnswer,
    call_amount: Decimal,
    rounding_scale: int,
) -> None:
    """Fill ``response`` from the configured answer to a call that recomputed."""
    kind = answer.kind
    agreed = call_amount
    if kind == _KIND.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE:
        if answer.agreed_fraction is not None:
            agreed = _round_down(
                _ROUNDING.multiply(call_amount, answer.agreed_fraction), rounding_scale
            )
        else:
            assert answer.agreed_amount is not None  # checked with the configuration
            agreed = answer.agreed_amount
        if agreed >= call_amount:
            kind, agreed = _KIND.MARGIN_CALL_RESPONSE_KIND_AGREE, call_amount
        elif agreed <= 0:
            kind = _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE
    if kind == _KIND.MARGIN_CALL_RESPONSE_KIND_DISPUTE:
        agreed = _ZERO
    response.kind = kind  # type: ignore[assignment]
    response.agreed_amount.CopyFrom(amount_to_proto(agreed))
    if kind != _KIND.MARGIN_CALL_RESPONSE_KIND_AGREE:
        response.dispute_reason = answer.dispute_reason  # type: ignore[assignment]
        response.dispute_detail = "disputed by the custodian's answer policy"


def _snapshot_prices(envelope: envelope_pb2.Envelope) -> dict[str, Decimal]:
    """Prices of a price snapshot that already passed verification (recompute_* checked it)."""
    snapshot = valuation_pb2.PriceSnapshot.FromString(envelope.payload)
    return {
        quote.asset_id: amount_from_proto(quote.price, field=f"price_snapshot.{quote.asset_id}")
        for quote in snapshot.prices
    }


def _split_pae(leaf: bytes) -> tuple[str, bytes]:
    """(payload_type, payload) of a leaf ``PAE(payload_type, payload)`` we wrote ourselves."""
    magic, type_length, rest = leaf.split(b" ", 2)
    if magic != b"DSSEv1":
        raise ValueError("attestation log leaf is not a DSSEv1 PAE")
    length = int(type_length)
    payload_type = rest[:length].decode("utf-8")
    payload_length, payload = rest[length + 1 :].split(b" ", 1)
    if len(payload) != int(payload_length):
        raise ValueError("attestation log leaf has a payload of the wrong length")
    return payload_type, payload
