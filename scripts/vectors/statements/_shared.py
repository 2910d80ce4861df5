"""What the modules of statements.json share: the case record and the common statements.

StatementCase is one vector before it is written out (assembly.py turns it into JSON);
valid() is the outcome of a statement that must verify. The rest builds the statements
several modules start from: the holdings statement of acct-0001 (its message, its header
and the statement the SDK issues), the checkpoint of the custodian's log, and statements
of any type issued through the SDK (issue) or signed by hand whatever the issuer (forge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import attestation_pb2, envelope_pb2
from google.protobuf.message import Message

from .. import _messages as messages
from .._common import (
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    LOG_ORIGIN,
    NOW,
    TTL,
    statement_envelope,
    statement_header,
    timestamp,
)

__all__ = [
    "StatementCase",
    "checkpoint_message",
    "copy_envelope",
    "forge",
    "holdings_header",
    "holdings_message",
    "holdings_statement",
    "issue",
    "type_case",
    "valid",
]


@dataclass
class StatementCase:
    id: str
    description: str
    expected_type: str
    envelope: envelope_pb2.Envelope
    expected: dict[str, Any]
    verifier: str
    now: datetime = NOW
    last_accepted_sequence: int = 0
    threshold: int | None = None
    #: For a payload too large to write out: the number of zero bytes it ends with.
    padding: int | None = None


def type_case(
    case_id: str,
    description: str,
    envelope: envelope_pb2.Envelope,
    expected: dict[str, Any],
    verifier: str,
    **options: Any,
) -> StatementCase:
    """A case whose expected type is the envelope's own (none of the type vectors is about
    stage a1)."""
    return StatementCase(
        case_id, description, envelope.payload_type, envelope, expected, verifier, **options
    )


def valid(issuer: str, *signer_parties: str) -> dict[str, Any]:
    return {"valid": True, "issuer": issuer, "signer_party_ids": list(signer_parties)}


def copy_envelope(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    duplicate = envelope_pb2.Envelope()
    duplicate.CopyFrom(envelope)
    return duplicate


# --- the holdings statement of acct-0001 and the checkpoint ---------------------------


def holdings_message(epoch: int = 3) -> attestation_pb2.HoldingsStatement:
    return messages.holdings(epoch)


def holdings_header(**changes: Any) -> envelope_pb2.StatementHeader:
    """The header of the custodian's holdings statement (epoch 3), with ``changes``."""
    fields: dict[str, Any] = {
        "issuer": CUSTODIAN_ID,
        "audience": [EXCHANGE_ID],
        "sequence": 7,
        "issued_at": ISSUED,
        "expires_at": ISSUED + TTL,
        "statement_id": "holdings-acct-0001-epoch-3",
    }
    fields.update(changes)
    return statement_header(**fields)


def holdings_statement(custodian: SigningKey) -> envelope_pb2.Envelope:
    """The custodian's holdings statement, issued through the SDK's own issuing path."""
    return issue(holdings_message(), custodian, [EXCHANGE_ID], 7, "holdings-acct-0001-epoch-3")


def checkpoint_message(checkpoint_root: bytes) -> attestation_pb2.Checkpoint:
    """The checkpoint of the custodian's log at tree size 1000 (merkle.json's root)."""
    message = attestation_pb2.Checkpoint(
        origin=LOG_ORIGIN, tree_size=1000, root_hash=checkpoint_root
    )
    message.timestamp.CopyFrom(timestamp(ISSUED))
    return message


# --- statements of any type -----------------------------------------------------------


def issue(
    message: Message,
    signer: SigningKey,
    audience: Sequence[str],
    sequence: int,
    statement_id: str,
    *,
    issued_at: datetime = ISSUED,
) -> envelope_pb2.Envelope:
    """A statement issued through the SDK's own issuing path, fresh at NOW."""
    return sign_statement(
        message,
        signer,
        audience=audience,
        sequence=sequence,
        ttl=TTL,
        issued_at=issued_at,
        statement_id=statement_id,
    )


def forge(
    message: Message,
    issuer: str,
    audience: Sequence[str],
    sequence: int,
    statement_id: str,
    *,
    by: Sequence[SigningKey],
) -> envelope_pb2.Envelope:
    """A statement fresh at NOW, signed by ``by`` whatever the issuer or the audience."""
    header = statement_header(
        issuer=issuer,
        audience=audience,
        sequence=sequence,
        issued_at=ISSUED,
        expires_at=ISSUED + TTL,
        statement_id=statement_id,
    )
    return statement_envelope(message, header, by)
