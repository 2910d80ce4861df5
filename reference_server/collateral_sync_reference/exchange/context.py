"""What the reference exchange's parts share: storage, keys, settings, clock, the outgoing log.

The exchange's rules are split by responsibility (see :mod:`.core`). Each
part receives one :class:`ExchangeContext` and reaches through it the
storage and its tables, the signer and key registry, the settings, the price
source, the clock, the exchange→custodian sync log that everything the
exchange signs for the custodian is appended to, and the revaluation of
accounts that a part asks for after recording what can move their figures.
The few conversions and errors every part uses are here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from collateral_sync.amounts import format_amount
from collateral_sync.errors import MalformedError, ProofError, StateError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signer import Signer
from collateral_sync.signing import DEFAULT_MAX_SKEW, sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import SyncLog
from collateral_sync.v1 import (
    common_pb2,
    envelope_pb2,
    errors_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from google.protobuf.message import Message

from collateral_sync_reference.common.storage import SqlReplayGuard, SqlStorage
from collateral_sync_reference.exchange.custodian_silence import CustodianSilence
from collateral_sync_reference.exchange.price_feed import PriceSource
from collateral_sync_reference.exchange.store import ExchangeStore

__all__ = [
    "ANYONE",
    "ExchangeContext",
    "ExchangeSettings",
    "Revaluation",
    "RevalueEach",
    "from_ns",
    "is_stale",
    "malformed",
    "refuted",
    "timestamp_ns",
    "to_ns",
    "unknown_account",
    "wire_decimal",
]

_R = errors_pb2.ErrorReason
_M = TypeVar("_M", bound=Message)
_NS = 1_000_000_000
#: The audience of a public statement.
ANYONE = "*"


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
    #: Lifetime of a pledge-release consent: short, as prices move after it is given.
    release_consent_ttl: timedelta = timedelta(minutes=5)
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


#: Revalue accounts one by one, each on its own (:meth:`.revaluation.Revaluer.revalue_each`).
RevalueEach = Callable[[Iterable[str], datetime], list[Revaluation]]


@dataclass(frozen=True, slots=True)
class ExchangeContext:
    """The plumbing the exchange's parts share; it holds no rule of its own.

    Built once by :class:`~.core.ExchangeCore`. Not thread-safe: it runs on
    the server's event loop, and no part awaits while a transaction is open.
    """

    storage: SqlStorage
    store: ExchangeStore
    replay: SqlReplayGuard
    registry: KeyRegistry
    settings: ExchangeSettings
    prices: PriceSource
    logger: logging.Logger
    #: The exchange→custodian sync log (:meth:`append`).
    log: SyncLog
    signer: Signer
    clock: Callable[[], datetime]
    #: What a part calls last when what it recorded can move an account's figures.
    revalue_each: RevalueEach
    #: Whether the custodian is silent (§11.2); the role points it at its sync session.
    silence: CustodianSilence = field(default_factory=CustodianSilence)

    @property
    def party_id(self) -> str:
        return self.settings.party_id

    def now(self) -> datetime:
        return self.clock()

    def sign(
        self,
        message: Message,
        *,
        audience: Sequence[str],
        ttl: timedelta,
        now: datetime,
        statement_id: str | None = None,
    ) -> envelope_pb2.Envelope:
        sequence = self.storage.next_sequence(payload_type_of(message))
        return sign_statement(
            message,
            self.signer,
            audience=audience,
            sequence=sequence,
            ttl=ttl,
            issued_at=now,
            statement_id=statement_id,
        )

    def append(self, update: position_sync_pb2.PositionUpdate) -> None:
        """Send ``update`` to the custodian once the open transaction commits."""
        self.log.append([update])

    def resign_if_stale(
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
        if not is_stale(envelope, message_class, ttl, now):
            return None
        message = message_class.FromString(envelope.payload)
        message.ClearField("header")
        return self.sign(message, audience=audience, ttl=ttl, now=now)


def to_ns(moment: datetime) -> int:
    """Nanoseconds since the Unix epoch, as the tables store times."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * _NS + delta.microseconds * 1_000


def timestamp_ns(stamp: Any) -> int:
    return int(stamp.seconds) * _NS + int(stamp.nanos)


def from_ns(ns: int) -> datetime:
    """The UTC time of a stored nanosecond count (to the microsecond)."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1_000)


def wire_decimal(value: Decimal) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=format_amount(value))


def is_stale(
    envelope: envelope_pb2.Envelope, message_class: type[Message], ttl: timedelta, now: datetime
) -> bool:
    """Whether less than half of ``ttl`` is left of one of our statements at ``now``."""
    header = message_class.FromString(envelope.payload).header  # type: ignore[attr-defined]
    left = timestamp_ns(header.expires_at) - to_ns(now)
    return left <= (ttl // timedelta(microseconds=1)) * 1_000 // 2


def malformed(field: str, expected: str, actual: str) -> MalformedError:
    return MalformedError(
        f"{field}: expected {expected}, got {actual}",
        metadata={"field": field, "expected": expected, "actual": actual},
        field_violations={field: f"must be {expected}"},
    )


def refuted(field: str, expected: str, actual: str) -> ProofError:
    return ProofError(
        f"{field}: expected {expected}, got {actual}",
        metadata={"field": field, "expected": expected, "actual": actual},
    )


def unknown_account(account_id: str) -> StateError:
    """NOT_FOUND for an account this exchange has not heard of."""
    return StateError(
        f"no account {account_id!r} at this exchange",
        reason=_R.ERROR_REASON_NOT_FOUND,
        metadata={"expected": "a known account id", "actual": account_id},
    )
