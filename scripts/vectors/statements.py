"""vectors/statements.json: signed statements that must verify, or must fail (§3).

Positive statements are issued through the SDK's own issuing path (threshold and
countersigned ones, and padded ones, are signed over PAE directly); negative ones are
built by hand (the SDK would refuse to issue them). Each names the verifier, the time
and the replay state, and the outcome written from the specification: the issuer and
the counted signer parties, or the ErrorReason and gRPC status.

Every type of the §3.5 table has at least one valid statement, realistic and fully
populated (_messages.py), and one refused for a reason of its type; the limits of
stages a and c (16 signatures, timestamps, 4 MiB) and the issuer rule of threshold
statements (§3.7 step 4) have their own. Payloads over 4 MiB go to "large_payloads",
written as a rule rather than as bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import pae, sign_statement
from collateral_sync.statements import message_class_of, payload_type_of
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    liquidation_pb2,
    valuation_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from . import _messages as messages
from ._common import (
    CLIENT_ID,
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    LOG_ORIGIN,
    MAX_SKEW_SECONDS,
    NOW,
    REGULATOR_ID,
    ROTATION_TIME,
    TTL,
    NamedKey,
    envelope_json,
    raw_envelope,
    rfc3339,
    statement_envelope,
    statement_header,
    status,
    timestamp,
)
from .sync import _C2E, _E2C, _chain, _custodian_updates, _exchange_updates

__all__ = ["statements_file"]


#: The order L of the Ed25519 base point (RFC 8032 §5.1).
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493


def _copy(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    duplicate = envelope_pb2.Envelope()
    duplicate.CopyFrom(envelope)
    return duplicate


@dataclass
class _StatementCase:
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


_THRESHOLD_ROLES = ["PARTY_ROLE_REGULATOR", "PARTY_ROLE_CUSTODIAN", "PARTY_ROLE_EXCHANGE"]


def _holdings(epoch: int = 3) -> attestation_pb2.HoldingsStatement:
    return messages.holdings(epoch)


def _release() -> emergency_pb2.EmergencyRelease:
    return messages.emergency_release(NOW - timedelta(hours=49))


def _valid(issuer: str, *signer_parties: str) -> dict[str, Any]:
    return {"valid": True, "issuer": issuer, "signer_party_ids": list(signer_parties)}


def _statement_cases(keys: dict[str, NamedKey], checkpoint_root: bytes) -> list[_StatementCase]:
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    regulator_second = keys["regulator-second"].key
    client = keys["client"].key
    rotated_out = keys["custodian-rotated-out"].key
    revoked = keys["exchange-revoked"].key
    unregistered = keys["unregistered"].key

    holdings_type = payload_type_of(attestation_pb2.HoldingsStatement)
    checkpoint_type = payload_type_of(attestation_pb2.Checkpoint)
    release_type = payload_type_of(emergency_pb2.EmergencyRelease)
    policy_type = payload_type_of(valuation_pb2.RiskPolicy)
    path_type = payload_type_of(liquidation_pb2.LiquidationPath)

    def holdings_header(**changes: Any) -> envelope_pb2.StatementHeader:
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

    # Positive statements issued through the SDK's own issuing path.
    holdings = sign_statement(
        _holdings(),
        custodian,
        audience=[EXCHANGE_ID],
        sequence=7,
        ttl=TTL,
        issued_at=ISSUED,
        statement_id="holdings-acct-0001-epoch-3",
    )
    checkpoint_message = attestation_pb2.Checkpoint(
        origin=LOG_ORIGIN, tree_size=1000, root_hash=checkpoint_root
    )
    checkpoint_message.timestamp.CopyFrom(timestamp(ISSUED))
    checkpoint = sign_statement(
        checkpoint_message,
        custodian,
        audience=["*"],
        sequence=42,
        ttl=TTL,
        issued_at=ISSUED,
        statement_id="checkpoint-1000",
    )
    release_header = statement_header(
        issuer=REGULATOR_ID,
        audience=[REGULATOR_ID, CUSTODIAN_ID, EXCHANGE_ID],
        sequence=1,
        issued_at=ISSUED,
        expires_at=ISSUED + TTL,
        statement_id="release-0001",
    )
    release_2of3 = statement_envelope(_release(), release_header, [regulator, custodian])
    release_extra = _copy(release_2of3)
    release_extra.signatures.add(
        key_id=unregistered.key_id, sig=unregistered.sign(pae(release_type, b"other bytes"))
    )
    release_extra.signatures.add(key_id=exchange.key_id, sig=bytes(64))
    path_message = messages.liquidation_path()
    path = statement_envelope(
        path_message,
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
        _holdings(epoch=2),
        rotated_out,
        audience=[EXCHANGE_ID],
        sequence=6,
        ttl=TTL,
        issued_at=old_key_time,
        statement_id="holdings-acct-0001-epoch-2",
    )

    def tampered(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        changed = _copy(envelope)
        payload = bytearray(changed.payload)
        payload[-1] ^= 0x01
        changed.payload = bytes(payload)
        return changed

    def relabelled(envelope: envelope_pb2.Envelope, payload_type: str) -> envelope_pb2.Envelope:
        changed = _copy(envelope)
        changed.payload_type = payload_type
        return changed

    def holdings_by(
        signers: Sequence[SigningKey], **changes: Any
    ) -> envelope_pb2.Envelope:
        return statement_envelope(_holdings(), holdings_header(**changes), signers)

    short_signature = _copy(holdings)
    short_signature.signatures[0].sig = short_signature.signatures[0].sig[:63]
    upper_key_id = _copy(holdings)
    upper_key_id.signatures[0].key_id = upper_key_id.signatures[0].key_id.upper()
    unsigned = _copy(holdings)
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
    no_header = raw_envelope(b"", holdings_type, [custodian])
    garbage = raw_envelope(b"\xff\xff\xff", holdings_type, [custodian])
    # The same bytes under a signature that does not verify: refused before parsing (§3.6).
    garbage_forged = _copy(garbage)
    forged_sig = bytearray(garbage_forged.signatures[0].sig)
    forged_sig[5] ^= 0x01  # a bit of R: S < L still holds
    garbage_forged.signatures[0].sig = bytes(forged_sig)
    # S replaced by S + L (L the group order): the Ed25519 equation still holds (§3.3).
    malleated = _copy(holdings)
    scalar = int.from_bytes(malleated.signatures[0].sig[32:], "little") + _GROUP_ORDER
    malleated.signatures[0].sig = malleated.signatures[0].sig[:32] + scalar.to_bytes(32, "little")
    # Issued in the exchange's name, signed by regulator and custodian only (§3.7 step 4).
    exchange_named = envelope_pb2.StatementHeader()
    exchange_named.CopyFrom(release_header)
    exchange_named.issuer = EXCHANGE_ID
    release_not_by_issuer = statement_envelope(_release(), exchange_named, [regulator, custodian])
    # The skew boundary: expired 20 s before NOW, inside the 30 s skew.
    in_skew = sign_statement(
        _holdings(),
        custodian,
        audience=[EXCHANGE_ID],
        sequence=8,
        ttl=timedelta(seconds=40),
        issued_at=NOW - timedelta(minutes=1),
        statement_id="holdings-in-skew",
    )

    valid = _valid
    return [
        _StatementCase(
            "holdings-statement/valid",
            "A custodian's holdings statement addressed to the exchange.",
            holdings_type,
            holdings,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "checkpoint/valid-public",
            "A checkpoint addressed to '*' (public type), verified by the regulator.",
            checkpoint_type,
            checkpoint,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            REGULATOR_ID,
        ),
        _StatementCase(
            "liquidation-path/valid-countersigned",
            "A client's liquidation path countersigned by the custodian: the issuer signs first.",
            path_type,
            path,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        _StatementCase(
            "holdings-statement/valid-rotated-key-before-rotation",
            "Signed by a key since rotated out, issued while it was valid; 'now' is then too.",
            holdings_type,
            by_rotated_out,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
            now=old_key_time + timedelta(minutes=5),
        ),
        _StatementCase(
            "holdings-statement/valid-expired-within-skew",
            "Expired 20 s before 'now': still accepted with the 30 s skew.",
            holdings_type,
            in_skew,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "emergency-release/valid-2-of-3",
            "Issued by the regulator, signed by regulator and custodian (2 distinct parties).",
            release_type,
            release_2of3,
            valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        _StatementCase(
            "emergency-release/valid-extra-bad-signatures-ignored",
            "2-of-3 plus an unregistered key's signature and a zero signature by the exchange's "
            "key: invalid extra signatures are ignored.",
            release_type,
            release_extra,
            valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        # --- must fail ---
        _StatementCase(
            "holdings-statement/tampered-payload",
            "The last payload byte flipped after signing.",
            holdings_type,
            tampered(holdings),
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/swapped-payload-type",
            "payload_type changed to checkpoint; the verifier expects a holdings statement.",
            holdings_type,
            relabelled(holdings, checkpoint_type),
            status("PAYLOAD_TYPE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/relabelled-as-checkpoint",
            "payload_type changed to checkpoint and the verifier expects a checkpoint: the type "
            "is inside PAE, so the signature no longer verifies.",
            checkpoint_type,
            relabelled(holdings, checkpoint_type),
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/unregistered-key",
            "Signed by a key that is not in the registry.",
            holdings_type,
            holdings_by([unregistered]),
            status("KEY_UNKNOWN"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/wrong-role",
            "Issued and signed by the exchange: exchange keys may not issue holdings statements.",
            holdings_type,
            holdings_by([exchange], issuer=EXCHANGE_ID, audience=[CUSTODIAN_ID]),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        _StatementCase(
            "holdings-statement/other-party-key",
            "Issuer is the custodian but the only signature is the exchange's.",
            holdings_type,
            holdings_by([exchange]),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/key-not-valid-after-rotation",
            "Signed with the rotated-out key, issued after its valid_until.",
            holdings_type,
            holdings_by([rotated_out]),
            status("KEY_NOT_VALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "risk-policy/revoked-key",
            "Signed with an exchange key revoked before issued_at.",
            policy_type,
            revoked_policy_envelope,
            status("KEY_REVOKED"),
            CUSTODIAN_ID,
        ),
        _StatementCase(
            "holdings-statement/wrong-audience",
            "Addressed to another exchange.",
            holdings_type,
            holdings_by([custodian], audience=["other-exchange.example"]),
            status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/star-audience-not-public",
            "Audience ['*', verifier] on a non-public type.",
            holdings_type,
            holdings_by([custodian], audience=["*", EXCHANGE_ID]),
            status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/expired",
            "expires_at one hour before 'now'.",
            holdings_type,
            holdings_by(
                [custodian], issued_at=NOW - timedelta(hours=2), expires_at=NOW - timedelta(hours=1)
            ),
            status("STATEMENT_EXPIRED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/not-yet-valid",
            "issued_at one minute after 'now' (beyond the 30 s skew).",
            holdings_type,
            holdings_by(
                [custodian], issued_at=NOW + timedelta(minutes=1), expires_at=NOW + TTL
            ),
            status("STATEMENT_NOT_YET_VALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/replayed",
            "Sequence 7 when the verifier already accepted sequence 7 from this issuer and type.",
            holdings_type,
            holdings,
            status("REPLAYED"),
            EXCHANGE_ID,
            last_accepted_sequence=7,
        ),
        _StatementCase(
            "holdings-statement/no-signatures",
            "An envelope without signatures.",
            holdings_type,
            unsigned,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/short-signature",
            "A 63-byte signature.",
            holdings_type,
            short_signature,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/uppercase-key-id",
            "A key id in uppercase hex.",
            holdings_type,
            upper_key_id,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/unparseable-payload",
            "Validly signed bytes that are not a protobuf message.",
            holdings_type,
            garbage,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/unparseable-payload-bad-signature",
            "The unparseable bytes again, under a signature that does not verify: stage b "
            "refuses them before stage c could parse them.",
            holdings_type,
            garbage_forged,
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/signature-scalar-not-reduced",
            "The valid statement's signature with S replaced by S + L: S must be below the "
            "group order L (RFC 8032 §5.1.7).",
            holdings_type,
            malleated,
            status("SIGNATURE_INVALID"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/no-header",
            "Validly signed empty payload: a message without a header.",
            holdings_type,
            no_header,
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/sequence-zero",
            "header.sequence = 0.",
            holdings_type,
            holdings_by([custodian], sequence=0),
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "holdings-statement/expires-before-issued",
            "expires_at before issued_at.",
            holdings_type,
            holdings_by([custodian], expires_at=ISSUED - timedelta(seconds=1)),
            status("MALFORMED"),
            EXCHANGE_ID,
        ),
        _StatementCase(
            "emergency-release/below-threshold",
            "Signed by the regulator alone.",
            release_type,
            statement_envelope(_release(), release_header, [regulator]),
            status("THRESHOLD_NOT_MET"),
            CUSTODIAN_ID,
            threshold=2,
        ),
        _StatementCase(
            "emergency-release/issuer-not-a-signer",
            "Issued by the exchange, signed by regulator and custodian: two parties count, but "
            "the issuer is not one of them.",
            release_type,
            release_not_by_issuer,
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
            threshold=2,
        ),
        _StatementCase(
            "emergency-release/same-party-twice",
            "Signed by two different keys of the regulator: one party counts once.",
            release_type,
            statement_envelope(_release(), release_header, [regulator, regulator_second]),
            status("THRESHOLD_NOT_MET"),
            CUSTODIAN_ID,
            threshold=2,
        ),
        *_type_cases(keys, checkpoint_root, holdings, release_2of3),
        *_limit_cases(keys, release_2of3),
    ]


# --- every type of the §3.5 table: a valid statement, and one refused for a reason of its type


def _issue(
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


def _forge(
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


def _type_cases(
    keys: dict[str, NamedKey],
    checkpoint_root: bytes,
    holdings: envelope_pb2.Envelope,
    release: envelope_pb2.Envelope,
) -> list[_StatementCase]:
    """For each type of §3.5 not covered above, a valid statement and a refused one."""
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    client = keys["client"].key
    role = common_pb2.PartyRole
    valid = _valid

    def case(
        case_id: str,
        description: str,
        envelope: envelope_pb2.Envelope,
        expected: dict[str, Any],
        verifier: str,
        **options: Any,
    ) -> _StatementCase:
        # The expected type is the envelope's own: none of these vectors is about stage a1.
        return _StatementCase(
            case_id, description, envelope.payload_type, envelope, expected, verifier, **options
        )

    # checkpoint
    checkpoint_message = attestation_pb2.Checkpoint(
        origin=LOG_ORIGIN, tree_size=1000, root_hash=checkpoint_root
    )
    checkpoint_message.timestamp.CopyFrom(timestamp(ISSUED))
    checkpoint_by_exchange = _forge(
        checkpoint_message, EXCHANGE_ID, ["*"], 42, "checkpoint-1000", by=[exchange]
    )

    # sync-batch: three custodian entries, two exchange entries, chained as in sync.json.
    c2e = _chain(_C2E, _custodian_updates()[:3])
    e2c = _chain(_E2C, _exchange_updates(exchange)[:2])

    def batch(direction: int, entries: Sequence[Any]) -> Message:
        return messages.sync_batch(direction, [e.to_proto() for e in entries])

    batch_c2e = _issue(batch(_C2E, c2e), custodian, [EXCHANGE_ID], 3, "sync-batch-c2e-3")
    batch_e2c = _issue(batch(_E2C, e2c), exchange, [CUSTODIAN_ID], 2, "sync-batch-e2c-2")

    # risk-policy, price-snapshot, credit-line
    policy = _issue(
        messages.risk_policy(ISSUED - timedelta(days=1)), exchange, ["*"], 3, "risk-policy-3"
    )
    observed = ISSUED - timedelta(seconds=30)
    snapshot = _issue(messages.price_snapshot(observed), exchange, ["*"], 118, "price-snapshot-118")
    holdings_leaf = pae(holdings.payload_type, holdings.payload)
    credit = _issue(
        messages.credit_line(holdings_leaf, 57, observed),
        exchange,
        [CUSTODIAN_ID],
        4,
        "credit-line-acct-0001-4",
    )

    # margin-call, margin-call-response, margin-call-state
    inputs = messages.valuation_inputs(policy, [holdings], snapshot)
    call = _issue(
        messages.margin_call(inputs, ISSUED + timedelta(hours=24)),
        exchange,
        [CUSTODIAN_ID],
        1,
        messages.MARGIN_CALL_ID,
    )
    response = _issue(
        messages.margin_call_response(),
        custodian,
        [EXCHANGE_ID],
        12,
        "margin-call-response-0001",
    )
    state = _issue(
        messages.margin_call_state(call, ISSUED),
        exchange,
        [CUSTODIAN_ID, CLIENT_ID],
        2,
        "margin-call-state-0001-2",
    )
    stale_state = _issue(
        messages.margin_call_state(call, NOW - timedelta(hours=3)),
        exchange,
        [CUSTODIAN_ID, CLIENT_ID],
        2,
        "margin-call-state-0001-2",
        issued_at=NOW - timedelta(hours=3),
    )

    # liquidation-instruction, liquidation-receipt, shortfall-allocation
    instruction = _issue(
        messages.liquidation_instruction(inputs),
        exchange,
        [CUSTODIAN_ID],
        1,
        messages.LIQUIDATION_ID,
    )
    misaddressed_instruction = _issue(
        messages.liquidation_instruction(inputs),
        exchange,
        ["other-custodian.example"],
        2,
        "liquidation-acct-0001-0001-resent",
    )
    after_liquidation = _issue(
        messages.holdings(
            epoch=4,
            reason=attestation_pb2.HOLDINGS_CHANGE_REASON_LIQUIDATION,
            rows=(("BENJI", "0", "0", "0"), ("USDC", "100000.25", "0", "0")),
        ),
        custodian,
        [EXCHANGE_ID, CLIENT_ID],
        9,
        "holdings-acct-0001-epoch-4",
    )
    receipt = _issue(
        messages.liquidation_receipt(
            pae(after_liquidation.payload_type, after_liquidation.payload), 58
        ),
        custodian,
        [EXCHANGE_ID],
        1,
        "liquidation-receipt-acct-0001-0001",
    )
    allocation = _issue(
        messages.shortfall_allocation(),
        exchange,
        [CUSTODIAN_ID],
        1,
        "shortfall-allocation-acct-0001-0001",
    )

    # reconciliation-statement, reconciliation-result
    heads = [(_C2E, c2e[-1].sequence, c2e[-1].hash), (_E2C, e2c[-1].sequence, e2c[-1].hash)]
    custodian_view = _issue(
        messages.reconciliation_statement(role.PARTY_ROLE_CUSTODIAN, heads),
        custodian,
        [REGULATOR_ID, EXCHANGE_ID],
        2,
        f"reconciliation-{messages.CUTOFF_ID}-custodian",
    )
    exchange_view = _issue(
        messages.reconciliation_statement(role.PARTY_ROLE_EXCHANGE, heads),
        exchange,
        [REGULATOR_ID, CUSTODIAN_ID],
        2,
        f"reconciliation-{messages.CUTOFF_ID}-exchange",
    )
    result = _issue(
        messages.reconciliation_result(custodian_view, exchange_view),
        regulator,
        ["*"],
        2,
        f"reconciliation-result-{messages.CUTOFF_ID}",
    )

    # settlement-instruction, settlement-dispute
    deadline = ISSUED + timedelta(hours=24)
    settlement = _issue(
        messages.settlement_instruction(deadline),
        exchange,
        [CUSTODIAN_ID],
        1,
        messages.SETTLEMENT_ID,
    )
    dispute_by_custodian = _issue(
        messages.settlement_dispute(
            "the reconciliation of this cut-off has a break on acct-0001 USDC"
        ),
        custodian,
        [EXCHANGE_ID],
        1,
        f"settlement-dispute-{messages.SETTLEMENT_ID}-custodian",
    )
    dispute_by_exchange = _issue(
        messages.settlement_dispute("net amount from a stale realised result; reissued"),
        exchange,
        [CUSTODIAN_ID],
        1,
        f"settlement-dispute-{messages.SETTLEMENT_ID}-exchange",
    )

    # emergency-release issued by the custodian and by the exchange; its receipt
    release_audience = [REGULATOR_ID, CUSTODIAN_ID, EXCHANGE_ID]
    release_by_custodian = _forge(
        messages.emergency_release(NOW - timedelta(hours=50), release_id="release-0002"),
        CUSTODIAN_ID,
        release_audience,
        1,
        "release-0002",
        by=[custodian, exchange],
    )
    release_by_exchange = _forge(
        messages.emergency_release(
            None,
            release_id="release-0003",
            reason=emergency_pb2.EMERGENCY_RELEASE_REASON_REGULATORY_ORDER,
        ),
        EXCHANGE_ID,
        release_audience,
        1,
        "release-0003",
        by=[exchange, regulator],
    )
    release_receipt = _issue(
        messages.emergency_release_receipt(release, ISSUED),
        custodian,
        [*release_audience, CLIENT_ID],
        1,
        "emergency-release-receipt-release-0001",
    )

    # pledge-instruction, redemption-request
    pledge = _issue(
        messages.pledge_instruction(), client, [CUSTODIAN_ID], 2, "pledge-acct-0001-0002"
    )
    redemption = _issue(
        messages.redemption_request(), client, [CUSTODIAN_ID], 3, "redemption-acct-0001-0001"
    )

    return [
        case(
            "checkpoint/issued-by-exchange",
            "A checkpoint of the custodian's log issued and signed by the exchange: only "
            "custodian keys may issue checkpoints.",
            checkpoint_by_exchange,
            status("KEY_ROLE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "sync-batch/valid-custodian-to-exchange",
            "A batch of three custodian-to-exchange entries (sequence = the last entry's), "
            "addressed to the exchange.",
            batch_c2e,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "sync-batch/valid-exchange-to-custodian",
            "A batch of two exchange-to-custodian entries, addressed to the custodian.",
            batch_e2c,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "sync-batch/issued-by-regulator",
            "The custodian-to-exchange entries in a batch issued and signed by the regulator: "
            "only custodian and exchange keys may issue batches.",
            _forge(
                batch(_C2E, c2e), REGULATOR_ID, [EXCHANGE_ID], 3, "sync-batch-c2e-3", by=[regulator]
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "sync-batch/star-audience",
            "The custodian's batch addressed to '*': sync batches are not public.",
            _forge(batch(_C2E, c2e), CUSTODIAN_ID, ["*"], 3, "sync-batch-c2e-3", by=[custodian]),
            status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "risk-policy/valid-public",
            "The exchange's full risk policy (version 3, the pilot's figures of section 7.4) "
            "addressed to '*' (public type), verified by the custodian.",
            policy,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "risk-policy/issued-by-custodian",
            "The same policy issued and signed by the custodian: only exchange keys may issue "
            "risk policies.",
            _forge(
                messages.risk_policy(ISSUED - timedelta(days=1)),
                CUSTODIAN_ID,
                ["*"],
                3,
                "risk-policy-3",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "price-snapshot/valid-public",
            "The exchange's price snapshot addressed to '*' (public type), verified by the "
            "custodian.",
            snapshot,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "price-snapshot/signed-by-custodian-key",
            "A snapshot in the exchange's name signed only by the custodian's key.",
            _forge(
                messages.price_snapshot(observed),
                EXCHANGE_ID,
                ["*"],
                118,
                "price-snapshot-118",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "price-snapshot/explicit-audience-without-verifier",
            "A public type addressed to the custodian only, verified by the regulator: without "
            "'*' the explicit audience applies.",
            _issue(
                messages.price_snapshot(observed),
                exchange,
                [CUSTODIAN_ID],
                119,
                "price-snapshot-119",
            ),
            status("AUDIENCE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "credit-line/valid",
            "The exchange's credit line for acct-0001 (attestation, prices, valuations), "
            "addressed to the custodian.",
            credit,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "credit-line/star-audience",
            "The credit line addressed to '*': credit lines are not public.",
            _forge(
                messages.credit_line(holdings_leaf, 57, observed),
                EXCHANGE_ID,
                ["*"],
                4,
                "credit-line-acct-0001-4",
                by=[exchange],
            ),
            status("AUDIENCE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "margin-call/valid",
            "A margin call embedding its signed inputs (the policy, the holdings statement and "
            "the snapshot above), addressed to the custodian.",
            call,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "margin-call/issued-by-custodian",
            "The same call issued and signed by the custodian: only exchange keys may issue "
            "margin calls.",
            _forge(
                messages.margin_call(inputs, ISSUED + timedelta(hours=24)),
                CUSTODIAN_ID,
                [EXCHANGE_ID],
                1,
                messages.MARGIN_CALL_ID,
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "margin-call-response/valid",
            "The custodian's partial agreement with the call, on the client's behalf, "
            "addressed to the exchange.",
            response,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "margin-call-response/issued-by-client",
            "The response issued and signed by the client: the custodian answers on the "
            "client's behalf (section 8.3); client keys may not issue responses.",
            _forge(
                messages.margin_call_response(),
                CLIENT_ID,
                [EXCHANGE_ID],
                1,
                "margin-call-response-0001",
                by=[client],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "margin-call-state/valid",
            "The exchange's state of the call (partially agreed) embedding the signed call, "
            "addressed to the custodian and the client, verified by the client.",
            state,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CLIENT_ID,
        ),
        case(
            "margin-call-state/served-after-expiry",
            "A state issued three hours before 'now' with a one-hour lifetime, served without "
            "being re-signed.",
            stale_state,
            status("STATEMENT_EXPIRED"),
            CLIENT_ID,
        ),
        case(
            "liquidation-path/signed-by-custodian-only",
            "The client's path signed only by the custodian's key: the client must sign its "
            "own path.",
            _forge(
                messages.liquidation_path(),
                CLIENT_ID,
                [CUSTODIAN_ID],
                1,
                "path-acct-0001-v1",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "liquidation-instruction/valid",
            "An instruction after the call expired (whole exposure, the client's path, the "
            "call's signed inputs), addressed to the custodian.",
            instruction,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "liquidation-instruction/addressed-to-another-custodian",
            "The instruction addressed to another custodian, delivered to this one.",
            misaddressed_instruction,
            status("AUDIENCE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "liquidation-receipt/valid",
            "The custodian's receipt (yield first, two fills, the shortfall, the attestation "
            "of the holdings after), addressed to the exchange.",
            receipt,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "liquidation-receipt/issued-by-exchange",
            "The receipt issued and signed by the exchange: only custodian keys may issue "
            "liquidation receipts.",
            _forge(
                messages.liquidation_receipt(
                    pae(after_liquidation.payload_type, after_liquidation.payload), 58
                ),
                EXCHANGE_ID,
                [CUSTODIAN_ID],
                1,
                "liquidation-receipt-acct-0001-0001",
                by=[exchange],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "shortfall-allocation/valid",
            "The exchange's allocation of the shortfall (insurance fund, then an "
            "auto-deleveraging ranking), addressed to the custodian.",
            allocation,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "shortfall-allocation/star-audience",
            "The allocation addressed to '*': shortfall allocations are not public.",
            _forge(
                messages.shortfall_allocation(),
                EXCHANGE_ID,
                ["*"],
                1,
                "shortfall-allocation-acct-0001-0001",
                by=[exchange],
            ),
            status("AUDIENCE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "reconciliation-statement/valid-custodian",
            "The custodian's view at the cut-off, addressed to the regulator and the exchange.",
            custodian_view,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            REGULATOR_ID,
        ),
        case(
            "reconciliation-statement/valid-exchange",
            "The exchange's view at the cut-off, addressed to the regulator and the custodian.",
            exchange_view,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            REGULATOR_ID,
        ),
        case(
            "reconciliation-statement/issued-by-client",
            "A view issued and signed by the client: only custodian and exchange keys may "
            "issue reconciliation statements.",
            _forge(
                messages.reconciliation_statement(role.PARTY_ROLE_CLIENT, heads),
                CLIENT_ID,
                [REGULATOR_ID],
                1,
                f"reconciliation-{messages.CUTOFF_ID}-client",
                by=[client],
            ),
            status("KEY_ROLE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "reconciliation-result/valid-public",
            "The regulator's result (one break) embedding both views, addressed to '*' "
            "(public type), verified by the exchange.",
            result,
            valid(REGULATOR_ID, REGULATOR_ID),
            EXCHANGE_ID,
        ),
        case(
            "reconciliation-result/issued-by-custodian",
            "The same result issued and signed by the custodian: only regulator keys may issue "
            "reconciliation results.",
            _forge(
                messages.reconciliation_result(custodian_view, exchange_view),
                CUSTODIAN_ID,
                ["*"],
                2,
                f"reconciliation-result-{messages.CUTOFF_ID}",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "settlement-instruction/valid",
            "The exchange's settlement instruction for acct-0001 (USDC, cycle 1), addressed "
            "to the custodian.",
            settlement,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "settlement-instruction/signed-by-custodian-key",
            "An instruction in the exchange's name signed only by the custodian's key.",
            _forge(
                messages.settlement_instruction(deadline),
                EXCHANGE_ID,
                [CUSTODIAN_ID],
                1,
                messages.SETTLEMENT_ID,
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "settlement-dispute/valid-custodian",
            "The custodian disputes the instruction, addressed to the exchange.",
            dispute_by_custodian,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "settlement-dispute/valid-exchange",
            "The exchange disputes its own instruction, addressed to the custodian.",
            dispute_by_exchange,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "settlement-dispute/issued-by-client",
            "A dispute issued and signed by the client: only custodian and exchange keys may "
            "issue settlement disputes.",
            _forge(
                messages.settlement_dispute("the client does not agree"),
                CLIENT_ID,
                [CUSTODIAN_ID],
                1,
                f"settlement-dispute-{messages.SETTLEMENT_ID}-client",
                by=[client],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "emergency-release/valid-issued-by-custodian",
            "Issued by the custodian, signed by custodian and exchange.",
            release_by_custodian,
            valid(CUSTODIAN_ID, CUSTODIAN_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        case(
            "emergency-release/valid-issued-by-exchange",
            "Issued by the exchange on a regulatory order, signed by exchange and regulator.",
            release_by_exchange,
            valid(EXCHANGE_ID, EXCHANGE_ID, REGULATOR_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        case(
            "emergency-release-receipt/valid",
            "The custodian's receipt embedding the release as executed (2 of 3), addressed to "
            "the release's audience and the client, verified by the exchange.",
            release_receipt,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "emergency-release-receipt/issued-by-regulator",
            "The receipt issued and signed by the regulator: only custodian keys may issue "
            "release receipts.",
            _forge(
                messages.emergency_release_receipt(release, ISSUED),
                REGULATOR_ID,
                [*release_audience, CLIENT_ID],
                1,
                "emergency-release-receipt-release-0001",
                by=[regulator],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "pledge-instruction/valid",
            "The client pledges 250000 BENJI to the exchange, addressed to the custodian.",
            pledge,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        case(
            "pledge-instruction/signed-by-custodian-key",
            "A pledge in the client's name signed only by the custodian's key.",
            _forge(
                messages.pledge_instruction(),
                CLIENT_ID,
                [CUSTODIAN_ID],
                2,
                "pledge-acct-0001-0002",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "redemption-request/valid",
            "The client's redemption request, addressed to the custodian.",
            redemption,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        case(
            "redemption-request/replayed",
            "The same request again after the custodian acted on sequence 3: one request "
            "redeems once.",
            redemption,
            status("REPLAYED"),
            CUSTODIAN_ID,
            last_accepted_sequence=3,
        ),
    ]


# --- limits of stages a and c, and the issuer of a threshold statement ------------------

#: The range of google.protobuf.Timestamp seconds: 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z.
_TIMESTAMP_MIN_SECONDS = -62_135_596_800
_TIMESTAMP_MAX_SECONDS = 253_402_300_799
#: The largest integer a protocol field may carry (§2.4).
_MAX_INTEGER = 2**63 - 1


def _limit_cases(keys: dict[str, NamedKey], release: envelope_pb2.Envelope) -> list[_StatementCase]:
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    client = keys["client"].key
    unregistered = keys["unregistered"].key
    holdings_type = payload_type_of(attestation_pb2.HoldingsStatement)
    release_type = payload_type_of(emergency_pb2.EmergencyRelease)

    # 16 signatures (the most allowed) and 17: the 2-of-3 release, then signatures of an
    # unregistered key over other bytes (ignored when there are at most 16).
    sixteen = _copy(release)
    for index in range(16 - len(release.signatures)):
        sixteen.signatures.add(
            key_id=unregistered.key_id,
            sig=unregistered.sign(pae(release_type, b"other bytes %d" % index)),
        )
    seventeen = _copy(sixteen)
    seventeen.signatures.add(
        key_id=unregistered.key_id, sig=unregistered.sign(pae(release_type, b"other bytes 16"))
    )

    def holdings_with(
        change: str, seconds: int | None = None, nanos: int = 0
    ) -> envelope_pb2.Envelope:
        """The holdings statement with one header timestamp replaced (or cleared)."""
        header = statement_header(
            issuer=CUSTODIAN_ID,
            audience=[EXCHANGE_ID],
            sequence=7,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id="holdings-acct-0001-epoch-3",
        )
        stamp = header.issued_at if change == "issued_at" else header.expires_at
        if seconds is None:
            header.ClearField(change)  # type: ignore[arg-type]
        else:
            stamp.seconds = seconds
            stamp.nanos = nanos
        return statement_envelope(_holdings(), header, [custodian])

    def release_signed_by(issuer: str, signers: Sequence[SigningKey]) -> envelope_pb2.Envelope:
        header = statement_header(
            issuer=issuer,
            audience=[REGULATOR_ID, CUSTODIAN_ID, EXCHANGE_ID],
            sequence=1,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id="release-0001",
        )
        return statement_envelope(_release(), header, signers)

    def holdings_header(sequence: int = 7) -> envelope_pb2.StatementHeader:
        return statement_header(
            issuer=CUSTODIAN_ID,
            audience=[EXCHANGE_ID],
            sequence=sequence,
            issued_at=ISSUED,
            expires_at=ISSUED + TTL,
            statement_id="holdings-acct-0001-epoch-3",
        )

    huge_epoch = _holdings()
    huge_epoch.epoch = _MAX_INTEGER + 1

    forged_issuer = release_signed_by(EXCHANGE_ID, [regulator, custodian])
    forged_issuer.signatures.insert(
        0,
        envelope_pb2.Signature(
            key_id=exchange.key_id, sig=exchange.sign(pae(release_type, b"other bytes"))
        ),
    )

    def holdings_case(
        case_id: str, description: str, envelope: envelope_pb2.Envelope, expected: dict[str, Any]
    ) -> _StatementCase:
        return _StatementCase(case_id, description, holdings_type, envelope, expected, EXCHANGE_ID)

    def release_case(
        case_id: str, description: str, envelope: envelope_pb2.Envelope, expected: dict[str, Any]
    ) -> _StatementCase:
        return _StatementCase(
            case_id, description, release_type, envelope, expected, CUSTODIAN_ID, threshold=2
        )

    return [
        release_case(
            "emergency-release/valid-16-signatures",
            "The 2-of-3 release with 14 more signatures by an unregistered key over other "
            "bytes: 16 signatures, the most an envelope may carry; the extra ones are ignored.",
            sixteen,
            _valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
        ),
        release_case(
            "emergency-release/17-signatures",
            "The same with a 17th signature: more than 16 signatures (stage a3), refused "
            "before any signature is checked.",
            seventeen,
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/valid-expires-at-timestamp-max",
            "expires_at = 9999-12-31T23:59:59.999999999Z, the last valid timestamp.",
            holdings_with("expires_at", _TIMESTAMP_MAX_SECONDS, 999_999_999),
            _valid(CUSTODIAN_ID, CUSTODIAN_ID),
        ),
        holdings_case(
            "holdings-statement/issued-at-before-year-1",
            "issued_at one second before 0001-01-01T00:00:00Z (seconds = -62135596801).",
            holdings_with("issued_at", _TIMESTAMP_MIN_SECONDS - 1),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/expires-at-after-year-9999",
            "expires_at one second after 9999-12-31T23:59:59Z (seconds = 253402300800).",
            holdings_with("expires_at", _TIMESTAMP_MAX_SECONDS + 1),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/issued-at-nanos-out-of-range",
            "issued_at with nanos = 1000000000 (at most 999999999).",
            holdings_with("issued_at", int(ISSUED.timestamp()), 1_000_000_000),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/expires-at-negative-nanos",
            "expires_at with nanos = -1.",
            holdings_with("expires_at", int((ISSUED + TTL).timestamp()), -1),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/issued-at-unset",
            "A header without issued_at.",
            holdings_with("issued_at"),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/sequence-above-2-63-minus-1",
            "header.sequence = 2^63: at least 1 (stage c2) but above the largest protocol "
            "integer (stage c3, section 2.4).",
            statement_envelope(_holdings(), holdings_header(_MAX_INTEGER + 1), [custodian]),
            status("OUT_OF_RANGE"),
        ),
        holdings_case(
            "holdings-statement/epoch-above-2-63-minus-1",
            "epoch = 2^63: a uint64 field of the body above the largest protocol integer "
            "(stage c3, section 2.4).",
            statement_envelope(huge_epoch, holdings_header(), [custodian]),
            status("OUT_OF_RANGE"),
        ),
        holdings_case(
            "holdings-statement/issuer-key-not-valid-after-other-signature",
            "Signed first by the exchange, then by the custodian's rotated-out key: no key "
            "may issue; the error reported is the issuer's own key's (KEY_NOT_VALID), not "
            "the first signer's (see section 3.7 step 4; section 3.6 'd with several "
            "signatures' says the first verified signature's).",
            statement_envelope(
                _holdings(), holdings_header(), [exchange, keys["custodian-rotated-out"].key]
            ),
            status("KEY_NOT_VALID"),
        ),
        release_case(
            "emergency-release/issuer-signed-with-revoked-key",
            "Issued by the exchange with its revoked key, signed by regulator and custodian "
            "too: two parties count, the issuer's own key fails d2.",
            release_signed_by(EXCHANGE_ID, [keys["exchange-revoked"].key, regulator, custodian]),
            status("KEY_REVOKED"),
        ),
        release_case(
            "emergency-release/issuer-signed-with-rotated-out-key",
            "Issued by the custodian with its rotated-out key, signed by regulator and "
            "exchange too: two parties count, the issuer's own key fails d3.",
            release_signed_by(
                CUSTODIAN_ID, [keys["custodian-rotated-out"].key, regulator, exchange]
            ),
            status("KEY_NOT_VALID"),
        ),
        release_case(
            "emergency-release/issuer-signature-invalid",
            "Issued by the exchange, whose signature (first) is over other bytes; regulator "
            "and custodian signed: the issuer did not sign, so the first verified signer, not "
            "the issuer, is reported.",
            forged_issuer,
            status("KEY_ROLE_MISMATCH"),
        ),
        release_case(
            "emergency-release/issued-by-client",
            "Issued and signed by the client, signed by regulator and custodian too: the "
            "client's signature does not count and client keys may not issue releases.",
            release_signed_by(CLIENT_ID, [client, regulator, custodian]),
            status("KEY_ROLE_MISMATCH"),
        ),
    ]


# --- payloads too large to write out -------------------------------------------------------

#: Stage a2's limit (§3.6): 4 MiB.
_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
#: The key of the padding record of the large payloads: field 1000, wire type 2 (an unknown
#: length-delimited field of every statement message).
_PADDING_KEY = bytes([0xC2, 0x3E])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _large_payload_cases(keys: dict[str, NamedKey]) -> list[_StatementCase]:
    """Holdings statements padded to exactly 4 MiB (valid) and to 4 MiB + 1 byte (TOO_LARGE).

    The padding is one unknown length-delimited field of zero bytes after the known fields,
    so the payload is a validly signed, parseable statement: only its size differs.
    """
    custodian = keys["custodian"].key
    holdings_type = payload_type_of(attestation_pb2.HoldingsStatement)
    cases = []
    for case_id, description, sequence, size, expected in (
        (
            "holdings-statement/valid-payload-of-4-mib",
            "A holdings statement padded with an unknown field to exactly 4194304 bytes, the "
            "largest payload allowed.",
            10,
            _MAX_PAYLOAD_BYTES,
            _valid(CUSTODIAN_ID, CUSTODIAN_ID),
        ),
        (
            "holdings-statement/too-large",
            "The same padded to 4194305 bytes: one byte over 4 MiB (stage a2), refused before "
            "its signature is checked.",
            11,
            _MAX_PAYLOAD_BYTES + 1,
            status("TOO_LARGE"),
        ),
    ):
        message = _holdings()
        message.header.CopyFrom(
            statement_header(
                issuer=CUSTODIAN_ID,
                audience=[EXCHANGE_ID],
                sequence=sequence,
                issued_at=ISSUED,
                expires_at=ISSUED + TTL,
                statement_id=f"holdings-acct-0001-epoch-3-padded-{size}",
            )
        )
        known = message.SerializeToString(deterministic=True)
        length_bytes = 4  # 2^21 <= padding < 2^28
        padding = size - len(known) - len(_PADDING_KEY) - length_bytes
        prefix = known + _PADDING_KEY + _varint(padding)
        assert len(_varint(padding)) == length_bytes
        payload = prefix + bytes(padding)
        assert len(payload) == size
        envelope = raw_envelope(payload, holdings_type, [custodian])
        cases.append(
            _StatementCase(
                case_id,
                description,
                holdings_type,
                envelope,
                expected,
                EXCHANGE_ID,
                padding=padding,
            )
        )
    return cases


def _payload_json(payload_type: str, payload: bytes) -> dict[str, Any] | None:
    """The payload as proto3 JSON, when it parses and has one, for readers of the vectors."""
    message = message_class_of(payload_type)()
    try:
        message.ParseFromString(payload)
    except DecodeError:  # unparseable payloads are vectors too
        return None
    if not message.ListFields():
        return None
    try:
        return json_format.MessageToDict(message)
    except json_format.SerializeToJsonError:  # a Timestamp out of range has no JSON form
        return None


def _outcome(case: _StatementCase) -> dict[str, Any]:
    """What a vector of either list says besides its envelope: verifier, time, state, outcome."""
    return {
        "verifier_party_id": case.verifier,
        "now": rfc3339(case.now),
        "last_accepted_sequence": case.last_accepted_sequence,
        "threshold": (
            None
            if case.threshold is None
            else {"k": case.threshold, "roles": list(_THRESHOLD_ROLES)}
        ),
        "expected": case.expected,
    }


def _statement_vector(case: _StatementCase) -> dict[str, Any]:
    envelope = case.envelope
    return {
        "id": case.id,
        "description": case.description,
        "expected_payload_type": case.expected_type,
        "envelope": envelope_json(envelope),
        "envelope_hex": envelope.SerializeToString(deterministic=True).hex(),
        "pae_hex": pae(envelope.payload_type, envelope.payload).hex(),
        "payload_json": _payload_json(case.expected_type, envelope.payload),
        **_outcome(case),
    }


def _large_payload_vector(case: _StatementCase) -> dict[str, Any]:
    """A vector whose payload is given by a rule: a prefix, then ``padding`` zero bytes."""
    envelope = case.envelope
    payload = envelope.payload
    assert case.padding is not None
    prefix, fill = payload[: -case.padding], payload[-case.padding :]
    assert fill == bytes(case.padding)
    serialised = envelope.SerializeToString(deterministic=True)
    signed = pae(envelope.payload_type, payload)
    return {
        "id": case.id,
        "description": case.description,
        "expected_payload_type": case.expected_type,
        "envelope": {
            "payload_type": envelope.payload_type,
            "signatures": envelope_json(envelope)["signatures"],
        },
        "payload_rule": {"prefix_hex": prefix.hex(), "fill_hex": "00", "fill_count": case.padding},
        "payload_length": len(payload),
        "payload_sha256_hex": hashlib.sha256(payload).hexdigest(),
        "envelope_sha256_hex": hashlib.sha256(serialised).hexdigest(),
        "pae_sha256_hex": hashlib.sha256(signed).hexdigest(),
        "payload_json": _payload_json(case.expected_type, payload),
        **_outcome(case),
    }


def statements_file(keys: dict[str, NamedKey], checkpoint_root: bytes) -> dict[str, Any]:
    registry = KeyRegistry(k.party_key() for k in keys.values() if k.registered)
    vectors = [_statement_vector(case) for case in _statement_cases(keys, checkpoint_root)]
    large = [_large_payload_vector(case) for case in _large_payload_cases(keys)]
    return {
        "description": (
            "Signed statements (docs/PROTOCOL.md section 3). Verify each envelope with the "
            "registry, for verifier_party_id, at 'now', with max_skew_seconds of skew, "
            "expecting expected_payload_type; last_accepted_sequence is the replay state for "
            "(issuer, payload type) (0: none). A non-null 'threshold' means a threshold "
            "statement (section 3.7). 'expected' is either valid with the issuer and the "
            "counted signer parties, or the ErrorReason (without the ERROR_REASON_ prefix) "
            "and gRPC status the verifier must fail with. 'large_payloads' are vectors whose "
            "payload is too large to write out: it is payload_rule's prefix followed by "
            "fill_count copies of the byte fill_hex (section 15.2)."
        ),
        "max_skew_seconds": MAX_SKEW_SECONDS,
        "registry": json_format.MessageToDict(registry.to_proto()),
        "signing_keys": [
            {
                "name": k.name,
                "party_id": k.key.party_id,
                "role": common_pb2.PartyRole.Name(k.key.role),  # type: ignore[arg-type]
                "seed_hex": k.key.seed.hex(),
                "key_id": k.key.key_id,
                "registered": k.registered,
            }
            for k in keys.values()
        ],
        "vectors": vectors,
        "large_payloads": large,
    }
