"""The reference exchange's domain: what it credits, how it values, and the statements it issues.

:class:`ExchangeCore` holds the exchange's rules and nothing about gRPC. It
is driven by three things, each inside one storage transaction:

- the custodian's sync updates (:meth:`ExchangeCore.apply_updates`, the sync
  session's apply callback, inside the transaction that stores the batch);
- the attestation checker, which credits or rejects a received holdings
  statement once its inclusion in the custodian's log is proven
  (:meth:`credit_holdings`, :meth:`reject_holdings`);
- requests: RespondToMarginCall, and in test mode SetExposure, SetPrice,
  RunValuation and the clock.

Every change revalues the accounts it touches (:meth:`_revalue`): the
collateral is valued with :mod:`collateral_sync.valuation` under the policy in
force and the price source's quotes; a changed figure is published as a new
signed ``CreditLine``; below maintenance a signed ``MarginCall`` carrying its
signed inputs is issued; an expired call or a ratio below the liquidation line
leads to a signed ``LiquidationInstruction``. Everything the exchange signs for
the custodian is appended to the exchange→custodian sync log in the same
transaction as the state change, so it is sent exactly once, after the commit.

Why holdings are not credited inside the stream's apply: proving a statement
is in the custodian's log needs the custodian's checkpoint, consistency proof
and inclusion proof, i.e. network calls, and the apply callback runs inside
the transaction that stores the batch, which must never wait on the network
(the stream would stall and every other writer with it). So apply only
verifies the statement's signature, audience and sequence, and records it as
*pending*; the attestation checker (``attestation``) fetches the proofs
outside any transaction and then credits or rejects it here. Until then the
statement counts for nothing.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Context, Decimal
from typing import Any, TypeVar

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    ProofError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import (
    DEFAULT_MAX_SKEW,
    VerifiedStatement,
    sign_statement,
    verify_statement,
)
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import SyncLog
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    AdlCandidate,
    allocate_shortfall,
    credit_line_figures,
    liquidation_shortfall,
    margin_call_amount,
    recompute_liquidation_instruction,
    recompute_margin_call,
    value_collateral,
)
from google.protobuf.message import Message

from collateral_sync_reference.common.storage import SqliteStorage
from collateral_sync_reference.exchange.margin import (
    BLOCKING,
    EXPIRING,
    TERMINAL,
    WITHDRAWABLE_ON_RECOVERY,
    amount_due,
    check_response_shape,
    judge_response,
    state_message,
    status_name,
)
from collateral_sync_reference.exchange.policy import policy_content_key
from collateral_sync_reference.exchange.price_feed import PriceSource
from collateral_sync_reference.exchange.store import (
    ExchangeStore,
    HoldingsRow,
    LiquidationRow,
    MarginCallRow,
)

__all__ = [
    "ExchangeCore",
    "ExchangeSettings",
    "Revaluation",
]

_R = errors_pb2.ErrorReason
_S = margin_pb2.MarginCallStatus
_M = TypeVar("_M", bound=Message)
_NS = 1_000_000_000
_ZERO = Decimal(0)
_ANYONE = "*"
# Room for any canonical amount and quotient; FLOOR as the wire's "round down".
_WIDE = Context(prec=200, rounding=ROUND_FLOOR)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN_PREFIX = "mc1:"  # noqa: S105 - a format tag, not a secret
# A distinct tag so a margin-call token cannot page through liquidations.
_LIQUIDATION_PAGE_TOKEN_PREFIX = "lq1:"  # noqa: S105 - a format tag, not a secret


@dataclass(frozen=True, slots=True)
class ExchangeSettings:
    """What the exchange is configured with beyond the storage, keys and clock."""

    party_id: str
    custodian_id: str
    #: Origin of the custodian's attestation log (configured, PROTOCOL.md §5.2).
    log_origin: str
    #: The policy content to publish (no header, version or effective_from).
    policy_content: valuation_pb2.RiskPolicy
    #: Lifetime of credit lines, margin-call states, snapshots and allocations.
    statement_ttl: timedelta = timedelta(days=7)
    #: Lifetime of a published risk policy (re-signed, same version, when half is left).
    policy_ttl: timedelta = timedelta(days=30)
    #: Lifetime of a liquidation instruction.
    instruction_ttl: timedelta = timedelta(days=1)
    #: Profit per account for the auto-deleveraging ranking (there is no trading engine).
    profits: dict[str, Decimal] = field(default_factory=dict)
    max_skew: timedelta = DEFAULT_MAX_SKEW


@dataclass(frozen=True, slots=True)
class Revaluation:
    """What one revaluation of an account found and did."""

    account_id: str
    collateral_value: Decimal
    credit_limit: Decimal
    exposure: Decimal
    #: None when the exposure is 0.
    collateral_ratio: Decimal | None
    #: Id of a margin call this revaluation issued, else "".
    margin_call_id: str = ""
    #: Id of a liquidation this revaluation instructed, else "".
    liquidation_id: str = ""


@dataclass(slots=True)
class _Valuation:
    policy: valuation_pb2.RiskPolicy
    policy_envelope: envelope_pb2.Envelope
    holdings: HoldingsRow | None
    holdings_message: attestation_pb2.HoldingsStatement | None
    quotes: list[valuation_pb2.PriceQuote]
    valuation: Any  # collateral_sync.valuation.CollateralValuation
    collateral_value: Decimal
    credit_limit: Decimal
    exposure: Decimal
    ratio: Decimal | None


def _ns(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * _NS + delta.microseconds * 1_000


def _timestamp_ns(stamp: Any) -> int:
    return int(stamp.seconds) * _NS + int(stamp.nanos)


def _datetime(ns: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1_000)


def _decimal(value: Decimal) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=format_amount(value))


class ExchangeCore:
    """The exchange's state machine over its storage; see the module docstring.

    Not thread-safe: it runs on the server's event loop, and no method awaits
    while a transaction is open. Public methods that change state open their
    own transaction, except :meth:`apply_updates`, which runs inside the sync
    session's.
    """

    def __init__(
        self,
        storage: SqliteStorage,
        log: SyncLog,
        *,
        signer: SigningKey,
        registry: KeyRegistry,
        settings: ExchangeSettings,
        prices: PriceSource,
        clock: Callable[[], datetime],
        logger: logging.Logger | None = None,
    ) -> None:
        if signer.party_id != settings.party_id:
            raise ValueError(f"signer is {signer.party_id!r}, expected {settings.party_id!r}")
        if log.peer_party_id != settings.custodian_id:
            raise ValueError(
                f"sync log peer is {log.peer_party_id!r}, expected {settings.custodian_id!r}"
            )
        self._storage = storage
        self._store = ExchangeStore(storage)
        self._replay = storage.replay_guard()
        self._log = log
        self._signer = signer
        self._registry = registry
        self._settings = settings
        self._prices = prices
        self._clock = clock
        self._logger = logger or logging.getLogger("collateral_sync_reference.exchange")
        self._holdings_listeners: list[Callable[[], None]] = []
        self._liquidation_listeners: list[Callable[[], None]] = []
        # The log wakes the sync session after commits of storage.transaction().
        storage.add_commit_listener(log.notify)

    # -- identity and plumbing --

    @property
    def party_id(self) -> str:
        return self._settings.party_id

    @property
    def settings(self) -> ExchangeSettings:
        return self._settings

    @property
    def store(self) -> ExchangeStore:
        """The exchange's tables (read-only use outside this class)."""
        return self._store

    @property
    def registry(self) -> KeyRegistry:
        return self._registry

    def now(self) -> datetime:
        return self._clock()

    def add_holdings_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a holdings statement is recorded as pending."""
        self._holdings_listeners.append(listener)

    def add_liquidation_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a liquidation instruction is recorded for delivery."""
        self._liquidation_listeners.append(listener)

    def _sign(
        self,
        message: Message,
        *,
        audience: Sequence[str],
        ttl: timedelta,
        now: datetime,
        statement_id: str | None = None,
    ) -> envelope_pb2.Envelope:
        sequence = self._storage.next_sequence(payload_type_of(message))
        return sign_statement(
            message,
            self._signer,
            audience=audience,
            sequence=sequence,
            ttl=ttl,
            issued_at=now,
            statement_id=statement_id,
        )

    def _append(self, update: position_sync_pb2.PositionUpdate) -> None:
        """Send ``update`` to the custodian once the open transaction commits."""
        self._log.append([update])

    @contextmanager
    def _savepoint(self) -> Any:
        """Undo one update's writes if it is refused, inside the batch's transaction."""
        connection = self._storage.connection
        connection.execute("SAVEPOINT exchange_update")
        try:
            yield
        except BaseException:
            connection.execute("ROLLBACK TO exchange_update")
            connection.execute("RELEASE exchange_update")
            raise
        connection.execute("RELEASE exchange_update")

    # -- start --

    def start(self) -> None:
        """Publish the configured policy if it differs from the one in force; revalue all.

        The configured insurance-fund balance is the fund's opening balance:
        once a policy is published the balance is state (shortfalls draw on
        it), so a restart keeps the balance in force and publishes a new
        version only if another figure of the configuration changed.
        """
        now = self._clock()
        with self._storage.transaction():
            latest = self._store.latest_policy()
            content = valuation_pb2.RiskPolicy()
            content.CopyFrom(self._settings.policy_content)
            if latest is not None:
                in_force = valuation_pb2.RiskPolicy.FromString(latest[1].payload)
                content.insurance_fund_balance.CopyFrom(in_force.insurance_fund_balance)
            if latest is None or latest[2] != policy_content_key(content):
                self._publish_policy(content, now)
            for account_id, profit in sorted(self._settings.profits.items()):
                self._store.set_profit(account_id, profit)
            self._prices.tick(now)
            self._revalue_each(self._store.account_ids(), now)

    # -- risk policy --

    def _publish_policy(
        self, content: valuation_pb2.RiskPolicy, now: datetime
    ) -> envelope_pb2.Envelope:
        latest = self._store.latest_policy()
        policy = valuation_pb2.RiskPolicy()
        policy.CopyFrom(content)
        policy.ClearField("header")
        policy.version = 1 if latest is None else latest[0] + 1
        policy.effective_from.FromDatetime(now)
        envelope = self._sign(policy, audience=[_ANYONE], ttl=self._settings.policy_ttl, now=now)
        self._store.add_policy(policy.version, envelope, policy_content_key(policy), _ns(now))
        self._append(position_sync_pb2.PositionUpdate(risk_policy=envelope))
        self._logger.info("published risk policy version %d", policy.version)
        return envelope

    def _policy_in_force(
        self, now: datetime
    ) -> tuple[valuation_pb2.RiskPolicy, envelope_pb2.Envelope]:
        """The policy in force, re-signed first if less than half its lifetime is left."""
        latest = self._store.latest_policy()
        if latest is None:
            raise StateError(
                "no risk policy has been published",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a published policy", "actual": "none"},
            )
        version, envelope, _ = latest
        envelope = self._refreshed_policy(version, envelope, now)
        return valuation_pb2.RiskPolicy.FromString(envelope.payload), envelope

    def _refreshed_policy(
        self, version: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> envelope_pb2.Envelope:
        resigned = self._resign_if_stale(
            envelope,
            valuation_pb2.RiskPolicy,
            audience=[_ANYONE],
            ttl=self._settings.policy_ttl,
            now=now,
        )
        if resigned is None:
            return envelope
        self._store.replace_policy_envelope(version, resigned)
        return resigned

    def _resign_if_stale(
        self,
        envelope: envelope_pb2.Envelope,
        message_class: type[_M],
        *,
        audience: Sequence[str],
        ttl: timedelta,
        now: datetime,
    ) -> envelope_pb2.Envelope | None:
        """The same statement signed afresh if less than half of ``ttl`` is left, else None.

        Our own statements are fetched long after they were issued (a policy in
        force for weeks, the state of a quiet margin call); a fetcher checks
        their freshness at its own time, so they are re-issued with the same
        content and a new lifetime rather than served expired.
        """
        if not _stale(envelope, message_class, ttl, now):
            return None
        message = message_class.FromString(envelope.payload)
        message.ClearField("header")
        return self._sign(message, audience=audience, ttl=ttl, now=now)

    def risk_policy(self, version: int) -> envelope_pb2.Envelope:
        """GetRiskPolicy: the policy in force (0) or a given version; NOT_FOUND otherwise."""
        if version == 0:
            latest = self._store.latest_policy()
            found = None if latest is None else (latest[0], latest[1])
        else:
            envelope = self._store.policy(version)
            found = None if envelope is None else (version, envelope)
        if found is None:
            latest = self._store.latest_policy()
            newest = 0 if latest is None else latest[0]
            raise StateError(
                f"risk policy version {version} is not published (latest is {newest})",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": f"1..{newest}", "actual": str(version)},
            )
        now = self._clock()
        if not _stale(found[1], valuation_pb2.RiskPolicy, self._settings.policy_ttl, now):
            return found[1]
        with self._storage.transaction():
            return self._refreshed_policy(found[0], found[1], now)

    # -- sync updates from the custodian --

    def apply_updates(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        """The sync session's apply callback: runs inside the batch's transaction.

        An embedded statement that fails verification (signature, key role,
        audience, replay; freshness is judged on the batch, PROTOCOL.md §3.6.1)
        fails the whole batch, as §6.5 requires: nothing of it is stored. An
        update that verifies but asks for something the exchange cannot do (a
        response to an unknown or closed call, a receipt that does not add up)
        is recorded as rejected with its reason and changes nothing else: the
        stream cannot answer one update, and refusing the batch would block
        every later entry behind it forever.
        """
        now = self._clock()
        pending = False
        for sequence, update in updates:
            kind = update.WhichOneof("update")
            if kind == "holdings_change":
                self._receive_holdings(sequence, update.holdings_change, now)
                pending = True
            elif kind == "pledge_change":
                self._receive_pledge_change(sequence, update.pledge_change)
            elif kind == "yield_accrual":
                self._receive_yield_accrual(sequence, update.yield_accrual)
            elif kind == "liquidation_receipt":
                self._receive_receipt(sequence, update.liquidation_receipt, now)
            elif kind == "margin_call_response":
                self._receive_response(sequence, update.margin_call_response, now)
            else:  # the sync log lets only custodian variants through
                raise MalformedError(
                    f"entry {sequence}: update {kind!r} is not one the custodian sends",
                    metadata={"expected": "a custodian update", "actual": str(kind)},
                )
        if pending:
            # Wake the attestation checker; if the batch rolls back it finds nothing new.
            for listener in self._holdings_listeners:
                listener()

    def _verify_embedded(
        self,
        envelope: envelope_pb2.Envelope,
        message_class: type[_M],
        now: datetime,
        *,
        replay: bool = True,
    ) -> VerifiedStatement[_M]:
        """Stages a-e and g of a statement inside a verified batch (PROTOCOL.md §3.6.1).

        Freshness is the batch's: a statement replayed after a long outage may
        be past its own expiry and still be what the custodian said then. So a
        freshness failure at ``now`` (stage f, after the signature has been
        checked) is retried at the statement's own issued_at, which leaves
        exactly stages a-e and g.
        """
        try:
            verified = verify_statement(
                envelope,
                self._registry,
                expected_type=message_class,
                audience=self.party_id,
                now=now,
                max_skew=self._settings.max_skew,
                replay_guard=self._replay if replay else None,
            )
        except VerificationError as err:
            if err.reason not in (
                _R.ERROR_REASON_STATEMENT_EXPIRED,
                _R.ERROR_REASON_STATEMENT_NOT_YET_VALID,
            ):
                raise
            # The signature verified (stage b precedes f): parsing is safe now.
            header = message_class.FromString(envelope.payload).header  # type: ignore[attr-defined]
            verified = verify_statement(
                envelope,
                self._registry,
                expected_type=message_class,
                audience=self.party_id,
                now=header.issued_at.ToDatetime(tzinfo=UTC),
                max_skew=self._settings.max_skew,
                replay_guard=self._replay if replay else None,
            )
        self._check_custodian(verified)
        return verified

    def _check_custodian(self, verified: VerifiedStatement[Any]) -> None:
        if verified.issuer != self._settings.custodian_id:
            raise VerificationError(
                f"{verified.payload_type} issued by {verified.issuer!r}; this exchange takes "
                f"them from its custodian {self._settings.custodian_id!r} only",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": self._settings.custodian_id, "actual": verified.issuer},
            )

    def _receive_holdings(
        self, sequence: int, change: position_sync_pb2.HoldingsChange, now: datetime
    ) -> None:
        verified = self._verify_embedded(
            change.holdings_statement, attestation_pb2.HoldingsStatement, now
        )
        statement = verified.message
        if not statement.account_id:
            raise _malformed("holdings_change.holdings_statement.account_id", "an account id", "''")
        if not change.HasField("attestation"):
            raise _malformed("holdings_change.attestation", "an AttestationRef", "absent")
        path_id = None
        if change.HasField("liquidation_path"):
            path_id = self._pledged_path(change.liquidation_path, verified)
        self._store.ensure_account(statement.account_id)
        if path_id is not None:
            self._store.set_liquidation_path(statement.account_id, path_id)
        holdings_id = self._store.add_holdings(
            account_id=statement.account_id,
            epoch=statement.epoch,
            exchange_id=statement.exchange_id,
            envelope=change.holdings_statement,
            attestation=change.attestation,
            sync_sequence=sequence,
            received_at_ns=_ns(now),
        )
        try:
            _check_positions(statement)
        except CollateralSyncError as err:
            # Signed, but no valuation can use it: never credited, kept with the reason.
            self._store.decide_holdings(
                holdings_id,
                status="rejected",
                reason=err.reason_name,
                detail=err.message,
                at_ns=_ns(now),
            )
            return
        self._replay.record(verified)

    def _pledged_path(
        self,
        envelope: envelope_pb2.Envelope,
        holdings: VerifiedStatement[attestation_pb2.HoldingsStatement],
    ) -> str:
        """The statement id of the pre-authorised path a pledge announces (PROTOCOL.md §9.1).

        The client addressed the path to the custodian, which relays it: it is
        checked as the custodian checked it when it recorded the pledge (stages
        a-f, audience the custodian, at the holdings statement's issued_at; no
        replay stage, as every top-up carries the path in force again), and it
        must pre-authorise the liquidation of this account by this exchange.
        A path that fails is a false statement of the custodian's and fails the
        batch, like any embedded statement that does not verify (§6.5).
        """
        path = verify_statement(
            envelope,
            self._registry,
            expected_type=liquidation_pb2.LiquidationPath,
            audience=self._settings.custodian_id,
            now=holdings.header.issued_at.ToDatetime(tzinfo=UTC),
            max_skew=self._settings.max_skew,
        )
        message = path.message
        account_id = holdings.message.account_id
        for name, expected, actual in (
            ("account_id", account_id, message.account_id),
            ("exchange_id", self.party_id, message.exchange_id),
        ):
            if actual != expected:
                raise VerificationError(
                    f"holdings_change.liquidation_path.{name} is {actual!r}: it does not "
                    f"pre-authorise liquidating {account_id!r} by {self.party_id!r}",
                    reason=_R.ERROR_REASON_PATH_NOT_AUTHORISED,
                    metadata={
                        "field": f"holdings_change.liquidation_path.{name}",
                        "expected": expected,
                        "actual": actual,
                    },
                )
        if not path.header.statement_id:
            raise _malformed(
                "holdings_change.liquidation_path.header.statement_id", "a statement id", "''"
            )
        return path.header.statement_id

    def _receive_pledge_change(self, sequence: int, change: position_sync_pb2.PledgeChange) -> None:
        # Recorded for the record: what counts is the attested holdings
        # statement the change points at, which arrives as a holdings_change.
        if not change.account_id or not change.asset_id:
            raise _malformed("pledge_change.account_id/asset_id", "non-empty ids", "''")
        quantity = parse_amount(
            change.pledged_quantity.value, field="pledge_change.pledged_quantity"
        )
        self._store.add_pledge_change(
            sync_sequence=sequence,
            account_id=change.account_id,
            asset_id=change.asset_id,
            pledged_quantity=format_amount(quantity),
            attestation=change.attestation,
        )

    def _receive_yield_accrual(
        self, sequence: int, accrual: position_sync_pb2.YieldAccrual
    ) -> None:
        if not accrual.account_id or not accrual.asset_id:
            raise _malformed("yield_accrual.account_id/asset_id", "non-empty ids", "''")
        quantity = parse_amount(
            accrual.accrued_quantity.value, field="yield_accrual.accrued_quantity"
        )
        self._store.add_yield_accrual(
            sync_sequence=sequence,
            account_id=accrual.account_id,
            asset_id=accrual.asset_id,
            accrued_quantity=format_amount(quantity),
            accrual_time_ns=_timestamp_ns(accrual.accrual_time),
            attestation=accrual.attestation,
        )

    def _receive_response(
        self, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        verified = self._verify_embedded(envelope, margin_pb2.MarginCallResponse, now)
        try:
            with self._savepoint():
                self._act_on_response(verified, now)
        except CollateralSyncError as err:
            self._reject_update(sequence, "margin_call_response", err, envelope, now)

    def _receive_receipt(
        self, sequence: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> None:
        # The custodian sends every receipt on the stream, including those it
        # already returned from SubmitLiquidationInstruction: a copy of a
        # recorded receipt is no news, and must not fail the batch as a replay.
        verified = self._verify_embedded(
            envelope, liquidation_pb2.LiquidationReceipt, now, replay=False
        )
        if self._is_recorded_receipt(verified):
            return
        self._replay.check(verified.issuer, verified.payload_type, verified.sequence)
        try:
            with self._savepoint():
                self._act_on_receipt(verified, now)
        except CollateralSyncError as err:
            self._reject_update(sequence, "liquidation_receipt", err, envelope, now)

    def _is_recorded_receipt(
        self, verified: VerifiedStatement[liquidation_pb2.LiquidationReceipt]
    ) -> bool:
        liquidation = self._store.liquidation(verified.message.liquidation_id)
        return (
            liquidation is not None
            and liquidation.receipt is not None
            and liquidation.receipt.payload == verified.payload
        )

    def _reject_update(
        self,
        sequence: int,
        kind: str,
        error: CollateralSyncError,
        envelope: envelope_pb2.Envelope,
        now: datetime,
    ) -> None:
        self._logger.warning("sync entry %d: %s refused: %s", sequence, kind, error.message)
        self._store.add_rejected_update(
            sync_sequence=sequence,
            kind=kind,
            reason=error.reason_name,
            detail=error.message,
            payload=envelope.SerializeToString(),
            at_ns=_ns(now),
        )

    # -- attestation outcomes (from the attestation checker) --

    def pending_holdings(self) -> list[HoldingsRow]:
        return self._store.pending_holdings()

    def settle_holdings(
        self,
        credited: Iterable[int],
        rejected: Iterable[tuple[int, CollateralSyncError]],
        superseded: Iterable[int] = (),
    ) -> list[Revaluation]:
        """Record the attestation checker's verdicts in one transaction, then revalue.

        ``credited``: statements proven in the custodian's log; the account's
        credited holdings become the highest credited epoch. ``rejected``:
        statements whose proof failed, with the error (never credited).
        ``superseded``: pending statements not checked because a later epoch
        of the same account was (they are never credited either).
        """
        now = self._clock()
        touched: set[str] = set()
        with self._storage.transaction():
            for holdings_id, error in rejected:
                row = self._store.holdings(holdings_id)
                if row is None or row.status != "pending":
                    continue
                self._store.decide_holdings(
                    holdings_id,
                    status="rejected",
                    reason=error.reason_name,
                    detail=error.message,
                    at_ns=_ns(now),
                )
                self._logger.warning(
                    "holdings statement of %s epoch %d not credited: %s",
                    row.account_id,
                    row.epoch,
                    error.message,
                )
            for holdings_id in superseded:
                self._store.decide_holdings(
                    holdings_id,
                    status="rejected",
                    reason="SUPERSEDED",
                    detail="a later epoch of the account was received before this one was checked",
                    at_ns=_ns(now),
                )
            for holdings_id in credited:
                row = self._store.holdings(holdings_id)
                if row is None or row.status != "pending":
                    continue
                self._store.decide_holdings(
                    holdings_id, status="credited", reason="", detail="", at_ns=_ns(now)
                )
                account = self._store.account(row.account_id)
                current = (
                    None
                    if account is None or account.credited_holdings_id is None
                    else self._store.holdings(account.credited_holdings_id)
                )
                if current is None or row.epoch > current.epoch:
                    self._store.set_credited_holdings(row.account_id, holdings_id)
                    touched.add(row.account_id)
            return self._revalue_each(sorted(touched), now)

    def trust_checkpoint(
        self, origin: str, envelope: envelope_pb2.Envelope, tree_size: int
    ) -> None:
        """Persist the custodian checkpoint the attestation checker now trusts."""
        with self._storage.transaction():
            self._store.set_trusted_checkpoint(origin, envelope, tree_size)

    def keep_checkpoint_evidence(
        self,
        origin: str,
        *,
        reason: str,
        detail: str,
        received: envelope_pb2.Envelope,
        proof: bytes | None,
    ) -> None:
        """Keep a refused checkpoint, with the trusted one it contradicts, as evidence."""
        now = self._clock()
        with self._storage.transaction():
            self._store.add_checkpoint_evidence(
                origin=origin,
                reason=reason,
                detail=detail,
                held=self._store.trusted_checkpoint(origin),
                received=received,
                proof=proof,
                at_ns=_ns(now),
            )

    def credited_holdings(self, account_id: str) -> HoldingsRow | None:
        account = self._store.account(account_id)
        if account is None or account.credited_holdings_id is None:
            return None
        return self._store.holdings(account.credited_holdings_id)

    # -- valuation --

    def _value(self, account_id: str, now: datetime) -> _Valuation:
        policy, policy_envelope = self._policy_in_force(now)
        account = self._store.account(account_id)
        exposure = _ZERO if account is None else account.exposure
        holdings = self.credited_holdings(account_id)
        message: attestation_pb2.HoldingsStatement | None = None
        positions: Sequence[common_pb2.Position] = ()
        if holdings is not None:
            message = attestation_pb2.HoldingsStatement.FromString(holdings.envelope.payload)
            # Holdings pledged elsewhere (or released) count nothing here.
            if message.exchange_id == self.party_id:
                positions = message.positions
            else:
                message = None
        quotes = self._prices.quotes(p.asset_id for p in positions)
        valuation = value_collateral(policy, positions, quotes, valued_at=now)
        figures = credit_line_figures(policy, valuation, exposure)
        return _Valuation(
            policy=policy,
            policy_envelope=policy_envelope,
            holdings=holdings if message is not None else None,
            holdings_message=message,
            quotes=quotes,
            valuation=valuation,
            collateral_value=figures.collateral_value,
            credit_limit=figures.credit_limit,
            exposure=exposure,
            ratio=figures.collateral_ratio,
        )

    def _revalue_each(self, account_ids: Iterable[str], now: datetime) -> list[Revaluation]:
        """Revalue accounts one by one: one that cannot be revalued stops none of the others.

        Acting on a valuation signs statements that rest on the account's latest
        attested holdings, verified as evidence when issued (PROTOCOL.md §8.2 step 2).
        If they no longer verify (the custodian let the attestation expire), no margin
        call or liquidation instruction anyone could check can be issued: the account's
        part of the transaction is undone, the reason logged, and the account stays as
        it was until the custodian attests it again. The others are revalued as usual.
        """
        done = []
        for account_id in account_ids:
            try:
                with self._storage.savepoint():
                    done.append(self._revalue(account_id, now))
            except CollateralSyncError as err:
                self._logger.warning(
                    "account %s not revalued: %s: %s", account_id, err.reason_name, err.message
                )
        return done

    def _revalue(self, account_id: str, now: datetime) -> Revaluation:
        """Revalue one account inside the open transaction, and act on what it shows."""
        self._store.ensure_account(account_id)
        valued = self._value(account_id, now)
        self._publish_credit_line(account_id, valued, now)
        policy = valued.policy
        maintenance = parse_amount(policy.maintenance_ratio.value)
        liquidation_line = parse_amount(policy.liquidation_ratio.value)
        ratio = valued.ratio
        issued_call = ""
        instructed = ""

        calls = [c for c in self._store.margin_calls_of(account_id) if c.status not in TERMINAL]
        liquidations = self._store.liquidations_of(account_id)
        in_flight = any(liq.status == "instructed" for liq in liquidations)
        if liquidations and _path_refused(
            liquidations[-1], self._store.liquidation_path(account_id)
        ):
            # The custodian refused the path we know; asking again would only be
            # refused again. A newly learned path lifts this.
            in_flight = True
        now_ns = _ns(now)

        # 1. Expiry: due_by passed with the amount due unpaid.
        for call in calls:
            if call.status in EXPIRING and now_ns > call.due_by_ns:
                self._set_call_status(call, _S.MARGIN_CALL_STATUS_EXPIRED, now)
                if not in_flight and valued.holdings is not None and call.exposure > 0:
                    instructed = self._instruct_liquidation(account_id, valued, call, now)
                    in_flight = True
        calls = [c for c in self._store.margin_calls_of(account_id) if c.status not in TERMINAL]

        # 2. Satisfaction by attested top-ups, measured under each call's own inputs.
        for call in calls:
            if call.status in BLOCKING:
                self._measure_satisfaction(call, valued, now)
        calls = [c for c in self._store.margin_calls_of(account_id) if c.status not in TERMINAL]

        # 3. Recovery: a call nobody has agreed to is withdrawn once the ratio is back.
        if ratio is None or ratio >= maintenance:
            for call in calls:
                if call.status in WITHDRAWABLE_ON_RECOVERY:
                    self._set_call_status(call, _S.MARGIN_CALL_STATUS_WITHDRAWN, now)
            calls = [c for c in calls if c.status not in WITHDRAWABLE_ON_RECOVERY]

        if not in_flight and ratio is not None and valued.holdings is not None:
            if ratio < liquidation_line:
                # 4. Past the liquidation line: close out; open calls are moot.
                for call in calls:
                    self._set_call_status(call, _S.MARGIN_CALL_STATUS_WITHDRAWN, now)
                instructed = self._instruct_liquidation(account_id, valued, None, now)
            elif ratio < maintenance and not any(c.status in BLOCKING for c in calls):
                # 5. Below maintenance, no call running: issue one.
                issued_call = self._issue_margin_call(account_id, valued, now)
        return Revaluation(
            account_id=account_id,
            collateral_value=valued.collateral_value,
            credit_limit=valued.credit_limit,
            exposure=valued.exposure,
            collateral_ratio=ratio,
            margin_call_id=issued_call,
            liquidation_id=instructed,
        )

    def _publish_credit_line(self, account_id: str, valued: _Valuation, now: datetime) -> None:
        holdings = valued.holdings
        key = hashlib.sha256(
            "|".join(
                (
                    str(valued.policy.version),
                    "" if holdings is None else str(holdings.id),
                    format_amount(valued.collateral_value),
                    format_amount(valued.credit_limit),
                    format_amount(valued.exposure),
                )
            ).encode()
        ).digest()
        account = self._store.account(account_id)
        if account is not None and account.credit_key == key:
            return
        credit = valuation_pb2.CreditLine(
            account_id=account_id,
            risk_policy_version=valued.policy.version,
            attestations=[] if holdings is None else [holdings.attestation],
            prices=valued.quotes,
            valuations=valued.valuation.rows(),
            collateral_value=_decimal(valued.collateral_value),
            credit_limit=_decimal(valued.credit_limit),
            exposure=_decimal(valued.exposure),
        )
        envelope = self._sign(
            credit,
            audience=[self._settings.custodian_id],
            ttl=self._settings.statement_ttl,
            now=now,
        )
        self._store.set_credit_line(account_id, envelope, key)
        self._append(position_sync_pb2.PositionUpdate(credit_line=envelope))

    def _inputs(self, valued: _Valuation, now: datetime) -> valuation_pb2.ValuationInputs:
        """The signed policy, holdings and a new signed snapshot of the prices used."""
        assert valued.holdings is not None
        snapshot = valuation_pb2.PriceSnapshot(prices=valued.quotes)
        snapshot_envelope = self._sign(
            snapshot, audience=[_ANYONE], ttl=self._settings.statement_ttl, now=now
        )
        return valuation_pb2.ValuationInputs(
            risk_policy=valued.policy_envelope,
            holdings_statements=[valued.holdings.envelope],
            price_snapshot=snapshot_envelope,
        )

    # -- margin calls --

    def _issue_margin_call(self, account_id: str, valued: _Valuation, now: datetime) -> str:
        assert valued.ratio is not None
        assert valued.holdings is not None
        amount = margin_call_amount(valued.policy, valued.collateral_value, valued.exposure)
        assert amount is not None  # ratio < maintenance
        margin_call_id = f"mc-{uuid.uuid4().hex}"
        call = margin_pb2.MarginCall(
            margin_call_id=margin_call_id,
            account_id=account_id,
            inputs=self._inputs(valued, now),
            risk_policy_version=valued.policy.version,
            exposure=_decimal(valued.exposure),
            collateral_value=_decimal(valued.collateral_value),
            collateral_ratio=_decimal(valued.ratio),
            call_amount=_decimal(amount),
        )
        due_by_ns = _ns(now) + _timestamp_ns(valued.policy.cure_period)
        call.due_by.seconds, call.due_by.nanos = divmod(due_by_ns, _NS)
        envelope = self._sign(
            call,
            audience=[self._settings.custodian_id],
            ttl=valued.policy.cure_period.ToTimedelta() + self._settings.statement_ttl,
            now=now,
            statement_id=margin_call_id,
        )
        # What the custodian will do with it: a call that does not recompute is a bug here.
        recompute_margin_call(
            envelope, self._registry, audience=self._settings.custodian_id, now=now
        )
        state = self._sign_state(
            margin_call_id=margin_call_id,
            status=_S.MARGIN_CALL_STATUS_ISSUED,
            call_amount=amount,
            agreed_amount=_ZERO,
            satisfied_amount=_ZERO,
            now=now,
            call_envelope=envelope,
        )
        self._store.add_margin_call(
            margin_call_id=margin_call_id,
            account_id=account_id,
            status=_S.MARGIN_CALL_STATUS_ISSUED,
            call_amount=amount,
            collateral_value=valued.collateral_value,
            exposure=valued.exposure,
            holdings_epoch=valued.holdings.epoch,
            issued_at_ns=_ns(now),
            due_by_ns=due_by_ns,
            call_envelope=envelope,
            state_envelope=state,
        )
        self._append(position_sync_pb2.PositionUpdate(margin_call=envelope))
        self._logger.info(
            "margin call %s on %s: ratio %s, call amount %s",
            margin_call_id,
            account_id,
            format_amount(valued.ratio),
            format_amount(amount),
        )
        return margin_call_id

    def _sign_state(
        self,
        *,
        margin_call_id: str,
        status: int,
        call_amount: Decimal,
        agreed_amount: Decimal,
        satisfied_amount: Decimal,
        now: datetime,
        call_envelope: envelope_pb2.Envelope,
    ) -> envelope_pb2.Envelope:
        state = state_message(
            margin_call_id=margin_call_id,
            status=status,
            call_amount=call_amount,
            agreed_amount=agreed_amount,
            satisfied_amount=satisfied_amount,
            updated_at_ns=_ns(now),
            call_envelope=call_envelope,
        )
        return self._sign(
            state,
            audience=[self._settings.custodian_id],
            ttl=self._settings.statement_ttl,
            now=now,
        )

    def _set_call_status(
        self,
        call: MarginCallRow,
        status: int,
        now: datetime,
        *,
        agreed_amount: Decimal | None = None,
        satisfied_amount: Decimal | None = None,
        response: envelope_pb2.Envelope | None = None,
    ) -> envelope_pb2.Envelope:
        agreed = call.agreed_amount if agreed_amount is None else agreed_amount
        satisfied = call.satisfied_amount if satisfied_amount is None else satisfied_amount
        state = self._sign_state(
            margin_call_id=call.margin_call_id,
            status=status,
            call_amount=call.call_amount,
            agreed_amount=agreed,
            satisfied_amount=satisfied,
            now=now,
            call_envelope=call.call_envelope,
        )
        self._store.update_margin_call(
            call.margin_call_id,
            status=status,
            agreed_amount=agreed,
            satisfied_amount=satisfied,
            updated_at_ns=_ns(now),
            state_envelope=state,
            response_envelope=response,
        )
        if status != call.status:
            self._logger.info(
                "margin call %s: %s -> %s",
                call.margin_call_id,
                status_name(call.status),
                status_name(status),
            )
        return state

    def _measure_satisfaction(self, call: MarginCallRow, valued: _Valuation, now: datetime) -> None:
        """PROTOCOL.md §8.4: value the latest attested holdings under the call's own inputs."""
        holdings = valued.holdings
        if holdings is None or holdings.epoch <= call.holdings_epoch:
            return  # no top-up attested since the call
        signed = margin_pb2.MarginCall.FromString(call.call_envelope.payload)
        call_policy = valuation_pb2.RiskPolicy.FromString(signed.inputs.risk_policy.payload)
        snapshot = valuation_pb2.PriceSnapshot.FromString(signed.inputs.price_snapshot.payload)
        assert valued.holdings_message is not None
        value = value_collateral(
            call_policy,
            valued.holdings_message.positions,
            snapshot.prices,
            valued_at=_datetime(call.issued_at_ns),
        ).collateral_value
        satisfied = max(_ZERO, value - call.collateral_value)
        due = amount_due(call.status, call.call_amount, call.agreed_amount)
        if due > 0 and satisfied >= due:
            self._set_call_status(
                call, _S.MARGIN_CALL_STATUS_SATISFIED, now, satisfied_amount=satisfied
            )
        elif satisfied != call.satisfied_amount:
            self._set_call_status(call, call.status, now, satisfied_amount=satisfied)

    def respond_to_margin_call(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        """RespondToMarginCall: verify, apply and return the new signed MarginCallState.

        Verification is complete before anything is written; the new state,
        the replay record and the revaluation commit together or not at all.
        """
        now = self._clock()
        verified = verify_statement(
            envelope,
            self._registry,
            expected_type=margin_pb2.MarginCallResponse,
            audience=self.party_id,
            now=now,
            max_skew=self._settings.max_skew,
            replay_guard=self._replay,
        )
        self._check_custodian(verified)
        with self._storage.transaction():
            return self._act_on_response(verified, now)

    def _act_on_response(
        self, verified: VerifiedStatement[margin_pb2.MarginCallResponse], now: datetime
    ) -> envelope_pb2.Envelope:
        response = verified.message
        check_response_shape(response)
        call = self._store.margin_call(response.margin_call_id)
        if call is None:
            raise StateError(
                f"no margin call {response.margin_call_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a margin call id", "actual": response.margin_call_id},
            )
        outcome = judge_response(call, response, now_ns=_ns(now))
        self._set_call_status(
            call,
            outcome.status,
            now,
            agreed_amount=outcome.agreed_amount,
            response=verified.envelope,
        )
        self._replay.record(verified)
        # A top-up attested before the answer may already cover the part now due.
        self._revalue_each([call.account_id], now)
        updated = self._store.margin_call(call.margin_call_id)
        assert updated is not None
        return updated.state_envelope

    # -- liquidation --

    def _instruct_liquidation(
        self, account_id: str, valued: _Valuation, call: MarginCallRow | None, now: datetime
    ) -> str:
        # After an expired call the amount is that call's exposure, which the
        # custodian checks (§9.2); after a breach it is the exposure now.
        amount = valued.exposure if call is None else call.exposure
        path_id = self._store.liquidation_path(account_id) or ""
        if not path_id:
            self._logger.warning(
                "no pledge of %s has announced a pre-authorised liquidation path; the "
                "custodian will refuse the instruction (PATH_NOT_AUTHORISED)",
                account_id,
            )
        liquidation_id = f"liq-{uuid.uuid4().hex}"
        instruction = liquidation_pb2.LiquidationInstruction(
            liquidation_id=liquidation_id,
            account_id=account_id,
            margin_call_id="" if call is None else call.margin_call_id,
            amount=_decimal(amount),
            liquidation_path_id=path_id,
            inputs=self._inputs(valued, now),
            risk_policy_version=valued.policy.version,
        )
        envelope = self._sign(
            instruction,
            audience=[self._settings.custodian_id],
            ttl=self._settings.instruction_ttl,
            now=now,
            statement_id=liquidation_id,
        )
        recompute_liquidation_instruction(
            envelope,
            self._registry,
            audience=self._settings.custodian_id,
            now=now,
            margin_call=None
            if call is None
            else margin_pb2.MarginCall.FromString(call.call_envelope.payload),
        )
        self._store.add_liquidation(
            liquidation_id=liquidation_id,
            account_id=account_id,
            margin_call_id="" if call is None else call.margin_call_id,
            amount=amount,
            liquidation_path_id=path_id,
            instruction=envelope,
            instructed_at_ns=_ns(now),
        )
        # Delivered by SubmitLiquidationInstruction (the liquidation submitter),
        # not on the stream: a refusal then comes back as a status for this one
        # instruction, where on the stream it would fail the batch and block
        # every later entry; the custodian executes an instruction once and
        # answers a repeat with the same receipt, so retries are safe.
        for listener in self._liquidation_listeners:
            listener()
        self._logger.info(
            "liquidation %s of %s for %s (%s)",
            liquidation_id,
            account_id,
            format_amount(amount),
            "breach" if call is None else f"expired call {call.margin_call_id}",
        )
        return liquidation_id

    def _act_on_receipt(
        self, verified: VerifiedStatement[liquidation_pb2.LiquidationReceipt], now: datetime
    ) -> None:
        receipt = verified.message
        liquidation = self._store.liquidation(receipt.liquidation_id)
        if liquidation is None:
            raise StateError(
                f"no liquidation {receipt.liquidation_id!r} was instructed",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "expected": "an instructed liquidation id",
                    "actual": receipt.liquidation_id,
                },
            )
        if receipt.account_id != liquidation.account_id:
            raise _refuted(
                "liquidation_receipt.account_id", liquidation.account_id, receipt.account_id
            )
        if liquidation.status != "instructed":
            raise StateError(
                f"liquidation {receipt.liquidation_id} already has a receipt",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={"expected": "instructed", "actual": liquidation.status},
            )
        total = parse_amount(
            receipt.total_proceeds.value, field="liquidation_receipt.total_proceeds"
        )
        fills = _ZERO
        for i, fill in enumerate(receipt.fills):
            fills = _WIDE.add(
                fills,
                parse_amount(fill.proceeds.value, field=f"liquidation_receipt.fills[{i}].proceeds"),
            )
        if fills != total:
            raise _refuted(
                "liquidation_receipt.total_proceeds", format_amount(fills), format_amount(total)
            )
        shortfall = liquidation_shortfall(liquidation.amount, total)
        stated = parse_amount(receipt.shortfall.value or "0", field="liquidation_receipt.shortfall")
        if stated != shortfall:
            raise _refuted(
                "liquidation_receipt.shortfall", format_amount(shortfall), format_amount(stated)
            )

        allocation = None
        if shortfall > 0:
            allocation = self._allocate_shortfall(
                liquidation.liquidation_id, liquidation.account_id, shortfall, now
            )
        self._store.record_liquidation_receipt(
            liquidation.liquidation_id,
            receipt=verified.envelope,
            total_proceeds=total,
            shortfall=shortfall,
            allocation=allocation,
            executed_at_ns=_ns(now),
        )
        self._replay.record(verified)
        account = self._store.account(liquidation.account_id)
        assert account is not None
        # Closed out: proceeds and the waterfall together cover the amount instructed.
        self._store.set_exposure(
            liquidation.account_id, max(_ZERO, account.exposure - liquidation.amount)
        )
        for call in self._store.margin_calls_of(liquidation.account_id):
            if call.status not in TERMINAL:
                self._set_call_status(call, _S.MARGIN_CALL_STATUS_WITHDRAWN, now)
        self._logger.info(
            "liquidation %s executed: proceeds %s, shortfall %s",
            liquidation.liquidation_id,
            format_amount(total),
            format_amount(shortfall),
        )
        # The receipt stands even if the account cannot be revalued now.
        self._revalue_each([liquidation.account_id], now)

    def _allocate_shortfall(
        self, liquidation_id: str, liquidated_account: str, shortfall: Decimal, now: datetime
    ) -> envelope_pb2.Envelope:
        """PROTOCOL.md §9.5: insurance fund first, the rest ranked for auto-deleveraging."""
        policy, _ = self._policy_in_force(now)
        candidates = [
            candidate
            for account_id in self._store.account_ids()
            if account_id != liquidated_account
            for candidate in [self._adl_candidate(account_id)]
            if candidate is not None
        ]
        figures = allocate_shortfall(policy, shortfall, candidates)
        allocation = figures.to_proto(liquidation_id)
        envelope = self._sign(
            allocation,
            audience=[self._settings.custodian_id],
            ttl=self._settings.statement_ttl,
            now=now,
        )
        if figures.covered_by_insurance_fund > 0:
            # The balance is part of the published policy: a new version says what is left.
            content = valuation_pb2.RiskPolicy()
            content.CopyFrom(policy)
            content.insurance_fund_balance.CopyFrom(_decimal(figures.insurance_fund_balance_after))
            self._publish_policy(content, now)
        self._logger.info(
            "shortfall %s of %s: insurance fund %s, auto-deleveraging %s over %d accounts",
            format_amount(shortfall),
            liquidation_id,
            format_amount(figures.covered_by_insurance_fund),
            format_amount(figures.auto_deleveraging_amount),
            len(figures.ranking),
        )
        return envelope

    def _adl_candidate(self, account_id: str) -> AdlCandidate | None:
        """An account with exposure, its profit (configured) and effective leverage.

        Effective leverage = exposure / collateral value of its latest credit
        line, rounded down to 18 places; an account with exposure and no
        collateral counts leverage 0 (there is nothing to scale it by).
        """
        account = self._store.account(account_id)
        if account is None or account.exposure <= 0:
            return None
        collateral = _ZERO
        if account.credit_line is not None:
            credit = valuation_pb2.CreditLine.FromString(account.credit_line.payload)
            collateral = parse_amount(credit.collateral_value.value)
        leverage = _ZERO
        if collateral > 0:
            leverage = _WIDE.divide(account.exposure, collateral).quantize(
                Decimal(1).scaleb(-18), context=_WIDE
            )
        return AdlCandidate(
            account_id=account_id, profit=account.profit, effective_leverage=leverage
        )

    def pending_liquidations(self) -> list[LiquidationRow]:
        """Instructions recorded and not yet answered by the custodian, oldest first."""
        return self._store.liquidations_in("instructed")

    def accept_receipt(self, envelope: envelope_pb2.Envelope, *, liquidation_id: str) -> bool:
        """Act on the receipt SubmitLiquidationInstruction returned for ``liquidation_id``.

        Returns False if it was already recorded (its copy came on the stream
        first). Raises the error for a receipt that does not verify, is for
        another liquidation, or does not add up; nothing is changed then.
        """
        now = self._clock()
        verified = verify_statement(
            envelope,
            self._registry,
            expected_type=liquidation_pb2.LiquidationReceipt,
            audience=self.party_id,
            now=now,
            max_skew=self._settings.max_skew,
        )
        self._check_custodian(verified)
        if verified.message.liquidation_id != liquidation_id:
            raise _refuted(
                "liquidation_receipt.liquidation_id",
                liquidation_id,
                verified.message.liquidation_id,
            )
        if self._is_recorded_receipt(verified):
            return False
        self._replay.check(verified.issuer, verified.payload_type, verified.sequence)
        with self._storage.transaction():
            self._act_on_receipt(verified, now)
        return True

    def refuse_liquidation(self, liquidation_id: str, error: CollateralSyncError) -> None:
        """Record that the custodian refused an instruction (or its receipt was refused)."""
        now = self._clock()
        with self._storage.transaction():
            self._store.refuse_liquidation(
                liquidation_id, reason=error.reason_name, detail=error.message, at_ns=_ns(now)
            )
        self._logger.error("liquidation %s refused: %s", liquidation_id, error.message)

    def shortfall_allocation(self, liquidation_id: str) -> envelope_pb2.Envelope:
        """GetShortfallAllocation: the signed allocation of a liquidation's shortfall.

        NOT_FOUND for a liquidation this exchange never instructed, and for one
        that has no allocation (not executed yet, or its proceeds covered the
        amount). Re-signed, same content, when less than half its lifetime is left.
        """
        liquidation = self._store.liquidation(liquidation_id)
        if liquidation is None:
            raise StateError(
                f"no liquidation {liquidation_id!r} was instructed by this exchange",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "liquidation_id",
                    "expected": "an instructed liquidation id",
                    "actual": liquidation_id,
                },
            )
        allocation = liquidation.allocation
        if allocation is None:
            shortfall = (
                "none yet"
                if liquidation.shortfall is None
                else format_amount(liquidation.shortfall)
            )
            raise StateError(
                f"liquidation {liquidation_id!r} ({liquidation.status}) has no shortfall "
                f"allocation: its shortfall is {shortfall}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "liquidation_id",
                    "expected": "an executed liquidation with a shortfall",
                    "actual": f"{liquidation.status}, shortfall {shortfall}",
                },
            )
        now = self._clock()
        ttl = self._settings.statement_ttl
        if not _stale(allocation, liquidation_pb2.ShortfallAllocation, ttl, now):
            return allocation
        with self._storage.transaction():
            resigned = self._resign_if_stale(
                allocation,
                liquidation_pb2.ShortfallAllocation,
                audience=[self._settings.custodian_id],
                ttl=ttl,
                now=now,
            )
            assert resigned is not None
            self._store.replace_allocation(liquidation_id, resigned)
        return resigned

    # -- requests --

    def set_exposure(self, account_id: str, exposure: Decimal) -> Revaluation:
        if not account_id:
            raise _malformed("account_id", "an account id", "''")
        if exposure < 0:
            raise MalformedError(
                f"exposure: expected >= 0, got {format_amount(exposure)}",
                reason=_R.ERROR_REASON_INVALID_AMOUNT,
                metadata={
                    "field": "exposure",
                    "expected": ">= 0",
                    "actual": format_amount(exposure),
                },
                field_violations={"exposure": "must be >= 0"},
            )
        now = self._clock()
        with self._storage.transaction():
            self._store.set_exposure(account_id, exposure)
            return self._revalue(account_id, now)

    def set_price(self, quote: valuation_pb2.PriceQuote) -> list[Revaluation]:
        """Publish a price on the scripted source and revalue the accounts it moves."""
        setter = getattr(self._prices, "set_price", None)
        if setter is None:
            raise StateError(
                f"price source {self._prices.name!r} takes no prices from outside",
                metadata={"expected": "a scripted price source", "actual": self._prices.name},
            )
        now = self._clock()
        with self._storage.transaction():
            setter(quote, now=now)
            return self._sweep(now)

    def run_valuation(self, account_id: str) -> Revaluation:
        if self._store.account(account_id) is None:
            raise StateError(
                f"no account {account_id!r} at this exchange",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a known account id", "actual": account_id},
            )
        now = self._clock()
        with self._storage.transaction():
            self._prices.tick(now)
            return self._revalue(account_id, now)

    def sweep(self, *, everything: bool = False) -> list[Revaluation]:
        """Time-driven work: scripted prices that fell due, calls past due_by.

        ``everything`` revalues every account (after the clock jumped, every
        price may have turned stale); otherwise only the accounts with a
        running call or a price that changed.
        """
        now = self._clock()
        with self._storage.transaction():
            return self._sweep(now, everything=everything)

    def _sweep(self, now: datetime, *, everything: bool = False) -> list[Revaluation]:
        changed = self._prices.tick(now)
        accounts = set(self._store.account_ids()) if everything or changed else set()
        accounts.update(call.account_id for call in self._store.margin_calls_in(BLOCKING))
        return self._revalue_each(sorted(accounts), now)

    # -- reads --

    def credit_line(self, account_id: str) -> envelope_pb2.Envelope:
        account = self._store.account(account_id)
        if account is None or account.credit_line is None:
            raise StateError(
                f"no credit line for account {account_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "an account with a credit line", "actual": account_id},
            )
        now = self._clock()
        ttl = self._settings.statement_ttl
        if not _stale(account.credit_line, valuation_pb2.CreditLine, ttl, now):
            return account.credit_line
        with self._storage.transaction():
            resigned = self._resign_if_stale(
                account.credit_line,
                valuation_pb2.CreditLine,
                audience=[self._settings.custodian_id],
                ttl=ttl,
                now=now,
            )
            assert resigned is not None
            assert account.credit_key is not None
            self._store.set_credit_line(account_id, resigned, account.credit_key)
        return resigned

    def margin_call_state(self, margin_call_id: str) -> envelope_pb2.Envelope:
        call = self._store.margin_call(margin_call_id)
        if call is None:
            raise StateError(
                f"no margin call {margin_call_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a margin call id", "actual": margin_call_id},
            )
        return self._fresh_state(call)

    def _fresh_state(self, call: MarginCallRow) -> envelope_pb2.Envelope:
        now = self._clock()
        if not _stale(
            call.state_envelope, margin_pb2.MarginCallState, self._settings.statement_ttl, now
        ):
            return call.state_envelope
        with self._storage.transaction():
            resigned = self._resign_if_stale(
                call.state_envelope,
                margin_pb2.MarginCallState,
                audience=[self._settings.custodian_id],
                ttl=self._settings.statement_ttl,
                now=now,
            )
            assert resigned is not None
            self._store.refresh_margin_call_state(call.margin_call_id, resigned)
        return resigned

    def list_margin_calls(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[envelope_pb2.Envelope], str]:
        """ListMarginCalls: states of an account's calls, oldest first, paged."""
        after = _parse_page_token(page_token, account_id)
        if self._store.account(account_id) is None:
            raise StateError(
                f"no account {account_id!r} at this exchange",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a known account id", "actual": account_id},
            )
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
        rows = self._store.margin_calls_of(account_id, after_seq=after, limit=size + 1)
        page, more = rows[:size], len(rows) > size
        token = _page_token(account_id, page[-1].seq) if more else ""
        return [self._fresh_state(row) for row in page], token

    def list_liquidations(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[liquidation_pb2.LiquidationRecord], str]:
        """ListLiquidations: an account's liquidations, oldest first, paged.

        Each record holds the instruction as sent and the custodian's receipt as
        received (neither is re-signed: they are what the two parties acted on),
        and the shortfall allocation as GetShortfallAllocation serves it.
        """
        after = _parse_page_token(
            page_token,
            account_id,
            prefix=_LIQUIDATION_PAGE_TOKEN_PREFIX,
            listing="ListLiquidations",
        )
        if self._store.account(account_id) is None:
            raise StateError(
                f"no account {account_id!r} at this exchange",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a known account id", "actual": account_id},
            )
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
        rows = self._store.liquidations_of(account_id, after_seq=after, limit=size + 1)
        page, more = rows[:size], len(rows) > size
        token = (
            _page_token(account_id, page[-1].seq, prefix=_LIQUIDATION_PAGE_TOKEN_PREFIX)
            if more
            else ""
        )
        records = []
        for row in page:
            record = liquidation_pb2.LiquidationRecord(liquidation_instruction=row.instruction)
            if row.receipt is not None:
                record.liquidation_receipt.CopyFrom(row.receipt)
            if row.allocation is not None:
                record.shortfall_allocation.CopyFrom(self.shortfall_allocation(row.liquidation_id))
            records.append(record)
        return records, token


def _check_positions(statement: attestation_pb2.HoldingsStatement) -> None:
    """Positions a valuation can use: asset ids, canonical non-negative quantities (§7.2)."""
    for i, position in enumerate(statement.positions):
        field = f"holdings_statement.positions[{i}]"
        if not position.asset_id:
            raise _malformed(f"{field}.asset_id", "an asset id", "''")
        for name in ("quantity", "locked_quantity", "pledged_quantity"):
            if not position.HasField(name):
                raise _malformed(f"{field}.{name}", "a Decimal", "absent")
            value = parse_amount(getattr(position, name).value, field=f"{field}.{name}")
            if value < 0:
                raise MalformedError(
                    f"{field}.{name}: expected >= 0, got {format_amount(value)}",
                    reason=_R.ERROR_REASON_INVALID_AMOUNT,
                    metadata={
                        "field": f"{field}.{name}",
                        "expected": ">= 0",
                        "actual": format_amount(value),
                    },
                )


def _path_refused(liquidation: LiquidationRow, known_path: str | None) -> bool:
    return (
        liquidation.status == "refused"
        and liquidation.refusal_reason == "PATH_NOT_AUTHORISED"
        and liquidation.liquidation_path_id == (known_path or "")
    )


def _stale(
    envelope: envelope_pb2.Envelope, message_class: type[Message], ttl: timedelta, now: datetime
) -> bool:
    header = message_class.FromString(envelope.payload).header  # type: ignore[attr-defined]
    left = _timestamp_ns(header.expires_at) - _ns(now)
    return left <= (ttl // timedelta(microseconds=1)) * 1_000 // 2


def _page_token(account_id: str, seq: int, *, prefix: str = _PAGE_TOKEN_PREFIX) -> str:
    raw = f"{prefix}{seq}:{account_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _parse_page_token(
    token: str,
    account_id: str,
    *,
    prefix: str = _PAGE_TOKEN_PREFIX,
    listing: str = "ListMarginCalls",
) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii")).decode()
        tag, seq_text, owner = (
            raw[: len(prefix)],
            *raw[len(prefix) :].split(":", 1),
        )
        seq = int(seq_text)
    except (ValueError, UnicodeError):
        seq, tag, owner = -1, "", ""
    if tag != prefix or seq < 1 or owner != account_id:
        raise MalformedError(
            f"page_token: expected a token from a previous {listing} of this account",
            metadata={
                "field": "page_token",
                "expected": "a token of this listing",
                "actual": token[:40],
            },
            field_violations={"page_token": "not a token of this listing"},
        )
    return seq


def _malformed(field: str, expected: str, actual: str) -> MalformedError:
    return MalformedError(
        f"{field}: expected {expected}, got {actual}",
        metadata={"field": field, "expected": expected, "actual": actual},
        field_violations={field: f"must be {expected}"},
    )


def _refuted(field: str, expected: str, actual: str) -> ProofError:
    return ProofError(
        f"{field}: expected {expected}, got {actual}",
        metadata={"field": field, "expected": expected, "actual": actual},
    )
