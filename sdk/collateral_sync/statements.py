"""The table of statement types: payload type, message class, who may issue it, who may read it.

Every protocol message whose field 1 is a ``StatementHeader`` is a statement
and travels inside a signed ``Envelope``. The envelope's ``payload_type``
names the message (``application/vnd.collateral-sync.v1.<kebab-name>+proto``,
as written in the proto comments); this module is the one place that maps
payload types to message classes and says which party roles may issue each
type and which types are public (audience ``"*"`` allowed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from collateral_sync.errors import MalformedError
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    emergency_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    pledge_release_pb2,
    position_sync_pb2,
    reconciliation_pb2,
    valuation_pb2,
)

__all__ = [
    "PAYLOAD_TYPE_PREFIX",
    "PAYLOAD_TYPE_SUFFIX",
    "STATEMENT_TYPES",
    "StatementType",
    "is_public",
    "issuer_roles_of",
    "message_class_of",
    "payload_type_of",
    "statement_type_of",
]

PAYLOAD_TYPE_PREFIX = "application/vnd.collateral-sync.v1."
PAYLOAD_TYPE_SUFFIX = "+proto"

_ROLE = common_pb2.PartyRole
_CUSTODIAN = _ROLE.PARTY_ROLE_CUSTODIAN
_EXCHANGE = _ROLE.PARTY_ROLE_EXCHANGE
_REGULATOR = _ROLE.PARTY_ROLE_REGULATOR
_CLIENT = _ROLE.PARTY_ROLE_CLIENT


@dataclass(frozen=True, slots=True)
class StatementType:
    """One row of the table."""

    payload_type: str
    message_class: type[Message]
    #: PartyRole values whose keys may issue (sign as issuer) this type.
    issuer_roles: frozenset[int]
    #: Whether the audience may be ``"*"`` (anyone).
    public: bool = False


def _row(name: str, cls: type[Message], *roles: int, public: bool = False) -> StatementType:
    return StatementType(
        payload_type=f"{PAYLOAD_TYPE_PREFIX}{name}{PAYLOAD_TYPE_SUFFIX}",
        message_class=cls,
        issuer_roles=frozenset(roles),
        public=public,
    )


#: Every statement type of collateral_sync.v1. tests/sdk/test_statements.py checks
#: that it covers every message with a StatementHeader, and the proto comments.
STATEMENT_TYPES: tuple[StatementType, ...] = (
    _row("holdings-statement", attestation_pb2.HoldingsStatement, _CUSTODIAN),
    _row("checkpoint", attestation_pb2.Checkpoint, _CUSTODIAN, public=True),
    _row("sync-batch", position_sync_pb2.SyncBatch, _CUSTODIAN, _EXCHANGE),
    _row("risk-policy", valuation_pb2.RiskPolicy, _EXCHANGE, public=True),
    _row("price-snapshot", valuation_pb2.PriceSnapshot, _EXCHANGE, public=True),
    _row("credit-line", valuation_pb2.CreditLine, _EXCHANGE),
    _row("margin-call", margin_pb2.MarginCall, _EXCHANGE),
    _row("margin-call-response", margin_pb2.MarginCallResponse, _CUSTODIAN),
    _row("margin-call-state", margin_pb2.MarginCallState, _EXCHANGE),
    _row("liquidation-path", liquidation_pb2.LiquidationPath, _CLIENT),
    _row("liquidation-instruction", liquidation_pb2.LiquidationInstruction, _EXCHANGE),
    _row("liquidation-receipt", liquidation_pb2.LiquidationReceipt, _CUSTODIAN),
    _row("shortfall-allocation", liquidation_pb2.ShortfallAllocation, _EXCHANGE),
    _row(
        "reconciliation-statement",
        reconciliation_pb2.ReconciliationStatement,
        _CUSTODIAN,
        _EXCHANGE,
    ),
    _row("reconciliation-result", reconciliation_pb2.ReconciliationResult, _REGULATOR, public=True),
    _row("settlement-instruction", reconciliation_pb2.SettlementInstruction, _EXCHANGE),
    _row("settlement-dispute", reconciliation_pb2.SettlementDispute, _CUSTODIAN, _EXCHANGE),
    _row("emergency-release", emergency_pb2.EmergencyRelease, _REGULATOR, _CUSTODIAN, _EXCHANGE),
    _row("emergency-release-receipt", emergency_pb2.EmergencyReleaseReceipt, _CUSTODIAN),
    _row("pledge-instruction", custodian_service_pb2.PledgeInstruction, _CLIENT),
    _row("redemption-request", custodian_service_pb2.RedemptionRequest, _CLIENT),
    _row("pledge-release-request", pledge_release_pb2.PledgeReleaseRequest, _CLIENT),
    _row("pledge-release-consent", pledge_release_pb2.PledgeReleaseConsent, _EXCHANGE),
    _row("pledge-release-receipt", pledge_release_pb2.PledgeReleaseReceipt, _CUSTODIAN),
)

_BY_PAYLOAD_TYPE: Mapping[str, StatementType] = {t.payload_type: t for t in STATEMENT_TYPES}
_BY_CLASS: Mapping[type[Message], StatementType] = {t.message_class: t for t in STATEMENT_TYPES}


def statement_type_of(statement: str | Message | type[Message]) -> StatementType:
    """The table row for a payload type, a statement message or a statement message class."""
    if isinstance(statement, str):
        return _row_of_payload_type(statement)
    cls = statement if isinstance(statement, type) else type(statement)
    row = _BY_CLASS.get(cls)
    if row is None:
        raise MalformedError(
            f"{cls.__name__} is not a statement message",
            reason=errors_pb2.ERROR_REASON_PAYLOAD_TYPE_MISMATCH,
            metadata={"expected": "a statement message", "actual": cls.__name__},
        )
    return row


def _row_of_payload_type(payload_type: str) -> StatementType:
    row = _BY_PAYLOAD_TYPE.get(payload_type)
    if row is None:
        raise MalformedError(
            f"unknown payload type {payload_type!r}",
            reason=errors_pb2.ERROR_REASON_PAYLOAD_TYPE_MISMATCH,
            metadata={"expected": "a collateral-sync v1 payload type", "actual": payload_type},
        )
    return row


def payload_type_of(message_or_class: Message | type[Message]) -> str:
    """Payload type string of a statement message (instance or class)."""
    return statement_type_of(message_or_class).payload_type


def message_class_of(payload_type: str) -> type[Message]:
    """Message class for a payload type; unknown types raise PAYLOAD_TYPE_MISMATCH."""
    return _row_of_payload_type(payload_type).message_class


def issuer_roles_of(payload_type: str) -> frozenset[int]:
    """PartyRole values that may issue statements of this payload type."""
    return _row_of_payload_type(payload_type).issuer_roles


def is_public(payload_type: str) -> bool:
    """Whether statements of this type may be addressed to everyone (``"*"``)."""
    return _row_of_payload_type(payload_type).public
