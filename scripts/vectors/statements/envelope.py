"""The single-signer statements of statements.json: valid ones, and envelope negatives.

valid_cases: the holdings statement, the public checkpoint, the countersigned liquidation
path, a statement by a key since rotated out, one expired within the skew. refused_cases:
the holdings statement tampered with, relabelled, signed by the wrong key (unknown, of
another role or party, rotated out, revoked), misaddressed, out of its time window,
replayed, and malformed (signatures, key ids, payload, header), each with the ErrorReason
the specification gives (§3.6 stages a to d).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import attestation_pb2, envelope_pb2, liquidation_pb2, valuation_pb2

from .. import _messages as messages
from .._common import (
    CLIENT_ID,
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    NOW,
    REGULATOR_ID,
    ROTATION_TIME,
    TTL,
    NamedKey,
    raw_envelope,
    statement_envelope,
    statement_header,
    status,
)
from ._shared import (
    StatementCase,
    checkpoint_message,
    copy_envelope,
    holdings_header,
    holdings_message,
    valid,
)

__all__ = ["refused_cases", "valid_cases"]


#: The order L of the Ed25519 base point (RFC 8032 §5.1).
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493

_HOLDINGS_TYPE = payload_type_of(attestation_pb2.HoldingsStatement)
_CHECKPOINT_TYPE = payload_type_of(attestation_pb2.Checkpoint)


def valid_cases(
    keys: dict[str, NamedKey], checkpoint_root: bytes, holdings: envelope_pb2.Envelope
) -> list[StatementCase]:
    """Statements that verify, issued through the SDK (the path countersigned over PAE)."""
    custodian = keys["custodian"].key
    client = keys["client"].key
    rotated_out = keys["custodian-rotated-out"].key
    path_type = payload_type_of(liquidation_pb2.LiquidationPath)

    checkpoint = sign_statement(
        checkpoint_message(checkpoint_root),
        custodian,
        audience=["*"],
        sequence=42,
        ttl=TTL,
        issued_at=ISSUED,
        statement_id="checkpoint-1000",
    )
    path = statement_envelope(
        messages.liquidation_path(),
        statement_header(
            issuer=CLIENT_ID,
            audience=[CUSTODIAN_ID],
            sequence=1,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id="path-acct-0001-v1",
        ),
        [client, custodian],
    )
    old_key_time = ROTATION_TIME - timedelta(hours=1)
    by_rotated_out = sign_statement(
        holdings_message(epoch=2),
        rotated_out,
        audience=[EXCHANGE_ID],
        sequence=6,
        ttl=TTL,
        issued_at=old_key_time,
        statement_id="holdings-acct-0001-epoch-2",
    )
    # The skew boundary: expired 20 s before NOW, inside the 30 s skew.
    in_skew = sign_statement(
        holdings_message(),
        custodian,
        audience=[EXCHANGE_ID],
        sequence=8,
        ttl=timedelta(seconds=40),
        issued_at=NOW - timedelta(minutes=1),
        statement_id="holdings-in-skew",
    )

    return [
        StatementCase(
            "holdings-statement/valid",
            "A custodian's holdings statement addressed to the exchange.",
            _HOLDINGS_TYPE,
            holdings,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        StatementCase(
            "checkpoint/valid-public",
            "A checkpoint addressed to '*' (public type), verified by the regulator.",
            _CHECKPOINT_TYPE,
            checkpoint,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            REGULATOR_ID,
        ),
        StatementCase(
            "liquidation-path/valid-countersigned",
            "A client's liquidation path countersigned by the custodian: the issuer signs first.",
            path_type,
            path,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        StatementCase(
            "holdings-statement/valid-rotated-key-before-rotation",
            "Signed by a key since rotated out, issued while it was valid; 'now' is then too.",
            _HOLDINGS_TYPE,
            by_rotated_out,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
            now=old_key_time + timedelta(minutes=5),
        ),
        StatementCase(
            "holdings-statement/valid-expired-within-skew",
            "Expired 20 s before 'now': still accepted with the 30 s skew.",
            _HOLDINGS_TYPE,
            in_skew,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
    ]


def _tampered(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    changed = copy_envelope(envelope)
    payload = bytearray(changed.payload)
    payload[-1] ^= 0x01
    changed.payload = bytes(payload)
    return changed


def _relabelled(envelope: envelope_pb2.Envelope, payload_type: str) -> envelope_pb2.Envelope:
    changed = copy_envelope(envelope)
    changed.payload_type = payload_type
    return changed


def _holdings_by(signers: Sequence[SigningKey], **changes: Any) -> envelope_pb2.Envelope:
    return statement_envelope(holdings_message(), holdings_header(**changes), signers)


def refused_cases(
    keys: dict[str, NamedKey], holdings: envelope_pb2.Envelope
) -> list[StatementCase]:
    """Statements that must fail, built by hand: the SDK would refuse to issue them."""
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    rotated_out = keys["custodian-rotated-out"].key
    revoked = keys["exchange-revoked"].key
    unregistered = keys["unregistered"].key
    policy_type = payload_type_of(valuation_pb2.RiskPolicy)

    short_signature = copy_envelope(holdings)
    short_signature.signatures[0].sig = short_signature.signatures[0].sig[:63]
    upper_key_id = copy_envelope(holdings)
    upper_key_id.signatures[0].key_id = upper_key_id.signatures[0].key_id.upper()
    unsigned = copy_envelope(holdings)
    del unsigned.signatures[:]

    revoked_policy = valuation_pb2.RiskPolicy(version=9)
    revoked_policy_envelope = statement_envelope(
        revoked_policy,
        statement_header(
            issuer=EXCHANGE_ID,
            audience=["*"],
            sequence=9,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id="risk-policy-9",
        ),
        [revoked],
    )
    no_header = raw_envelope(b"", _HOLDINGS_TYPE, [custodian])
    garbage = raw_envelope(b"\xff\xff\xff", _HOLDINGS_TYPE, [custodian])
    # The same bytes under a signature that does not verify: refused before parsing (§3.6).
    garbage_forged = copy_envelope(garbage)
    forged_sig = bytearray(garbage_forged.signatures[0].sig)
    forged_sig[5] ^= 0x01  # a bit of R: S < L still holds
    garbage_forged.signatures[0].sig = bytes(forged_sig)
    # S replaced by S + L (L the group order): the Ed25519 equation still holds (§3.3).
    malleated = copy_envelope(holdings)
    scalar = int.from_bytes(malleated.signatures[0].sig[32:], "little") + _GROUP_ORDER
    malleated.signatures[0].sig = malleated.signatures[0].sig[:32] + scalar.to_bytes(32, "little")

    return [
        StatementCase(
            "holdings-statement/tampered-payload",
            "The last payload byte flipped after signing.",
            _HOLDINGS_TYPE,
            _tampered(holdings),
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/swapped-payload-type",
            "payload_type changed to checkpoint; the verifier expects a holdings statement.",
            _HOLDINGS_TYPE,
            _relabelled(holdings, _CHECKPOINT_TYPE),
            status("PAYLOAD_TYPE_MISMATCH"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/relabelled-as-checkpoint",
            "payload_type changed to checkpoint and the verifier expects a checkpoint: the type "
            "is inside PAE, so the signature no longer verifies.",
            _CHECKPOINT_TYPE,
            _relabelled(holdings, _CHECKPOINT_TYPE),
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/unregistered-key",
            "Signed by a key that is not in the registry.",
            _HOLDINGS_TYPE,
            _holdings_by([unregistered]),
            status("KEY_UNKNOWN"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/wrong-role",
            "Issued and signed by the exchange: exchange keys may not issue holdings statements.",
            _HOLDINGS_TYPE,
            _holdings_by([exchange], issuer=EXCHANGE_ID, audience=[CUSTODIAN_ID]),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        StatementCase(
            "holdings-statement/other-party-key",
            "Issuer is the custodian but the only signature is the exchange's.",
            _HOLDINGS_TYPE,
            _holdings_by([exchange]),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/key-not-valid-after-rotation",
            "Signed with the rotated-out key, issued after its valid_until.",
            _HOLDINGS_TYPE,
            _holdings_by([rotated_out]),
            status("KEY_NOT_VALID"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "risk-policy/revoked-key",
            "Signed with an exchange key revoked before issued_at.",
            policy_type,
            revoked_policy_envelope,
            status("KEY_REVOKED"),
            CUSTODIAN_ID,
        ),
        StatementCase(
            "holdings-statement/wrong-audience",
            "Addressed to another exchange.",
            _HOLDINGS_TYPE,
            _holdings_by([custodian], audience=["other-exchange.example"]),
            status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/star-audience-not-public",
            "Audience ['*', verifier] on a non-public type.",
            _HOLDINGS_TYPE,
            _holdings_by([custodian], audience=["*", EXCHANGE_ID]),
            status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/expired",
            "expires_at one hour before 'now'.",
            _HOLDINGS_TYPE,
            _holdings_by(
                [custodian], issued_at=NOW - timedelta(hours=2), expires_at=NOW - timedelta(hours=1)
            ),
            status("STATEMENT_EXPIRED"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/not-yet-valid",
            "issued_at one minute after 'now' (beyond the 30 s skew).",
            _HOLDINGS_TYPE,
            _holdings_by([custodian], issued_at=NOW + timedelta(minutes=1), expires_at=NOW + TTL),
            status("STATEMENT_NOT_YET_VALID"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/replayed",
            "Sequence 7 when the verifier already accepted sequence 7 from this issuer and type.",
            _HOLDINGS_TYPE,
            holdings,
            status("REPLAYED"),
            EXCHANGE_ID,
            last_accepted_sequence=7,
        ),
        StatementCase(
            "holdings-statement/no-signatures",
            "An envelope without signatures.",
            _HOLDINGS_TYPE,
            unsigned,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/short-signature",
            "A 63-byte signature.",
            _HOLDINGS_TYPE,
            short_signature,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/uppercase-key-id",
            "A key id in uppercase hex.",
            _HOLDINGS_TYPE,
            upper_key_id,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/unparseable-payload",
            "Validly signed bytes that are not a protobuf message.",
            _HOLDINGS_TYPE,
            garbage,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/unparseable-payload-bad-signature",
            "The unparseable bytes again, under a signature that does not verify: stage b "
            "refuses them before stage c could parse them.",
            _HOLDINGS_TYPE,
            garbage_forged,
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/signature-scalar-not-reduced",
            "The valid statement's signature with S replaced by S + L: S must be below the "
            "group order L (RFC 8032 §5.1.7).",
            _HOLDINGS_TYPE,
            malleated,
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/no-header",
            "Validly signed empty payload: a message without a header.",
            _HOLDINGS_TYPE,
            no_header,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/sequence-zero",
            "header.sequence = 0.",
            _HOLDINGS_TYPE,
            _holdings_by([custodian], sequence=0),
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        StatementCase(
            "holdings-statement/expires-before-issued",
            "expires_at before issued_at.",
            _HOLDINGS_TYPE,
            _holdings_by([custodian], expires_at=ISSUED - timedelta(seconds=1)),
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
    ]
