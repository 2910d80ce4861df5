"""vectors/statements.json: signed statements that must verify, or must fail (§3).

Positive statements are issued through the SDK's own issuing path; negative ones are
built by hand (the SDK would refuse to issue them). Each names the verifier, the time
and the replay state, and the outcome written from the specification: the issuer and
the counted signer parties, or the ErrorReason and gRPC status.
"""

from __future__ import annotations

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
from google.protobuf.message import DecodeError

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
    decimal,
    envelope_json,
    raw_envelope,
    rfc3339,
    statement_envelope,
    statement_header,
    status,
    timestamp,
)

__all__ = ["statements_file"]


#: The order L of the Ed25519 base point (RFC 8032 §5.1).
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493


def _position(asset: str, quantity: str, locked: str, pledged: str) -> common_pb2.Position:
    return common_pb2.Position(
        account_id="acct-0001",
        asset_id=asset,
        quantity=decimal(quantity),
        locked_quantity=decimal(locked),
        pledged_quantity=decimal(pledged),
    )


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


_THRESHOLD_ROLES = ["PARTY_ROLE_REGULATOR", "PARTY_ROLE_CUSTODIAN", "PARTY_ROLE_EXCHANGE"]


def _holdings(epoch: int = 3) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement(
        account_id="acct-0001",
        exchange_id=EXCHANGE_ID,
        epoch=epoch,
        positions=[
            _position("BENJI", "1000000", "0", "1000000"),
            _position("USDC", "500000.25", "0", "400000"),
        ],
        reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
    )


def _release() -> emergency_pb2.EmergencyRelease:
    release = emergency_pb2.EmergencyRelease(
        release_id="release-0001",
        account_id="acct-0001",
        exchange_id=EXCHANGE_ID,
        reason=emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE,
    )
    release.exchange_unresponsive_since.CopyFrom(timestamp(NOW - timedelta(hours=49)))
    return release


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
    path_message = liquidation_pb2.LiquidationPath(
        account_id="acct-0001",
        exchange_id=EXCHANGE_ID,
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id="USDC", venue="otc-desk", max_quantity=decimal("400000")
            ),
            liquidation_pb2.LiquidationStep(
                asset_id="BENJI", venue="fund-redemption", max_quantity=decimal("1000000")
            ),
        ],
        proceeds_account_id="exchange-settlement-0001",
    )
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
    ]


def _payload_json(payload_type: str, payload: bytes) -> dict[str, Any] | None:
    """The payload as proto3 JSON, when it parses, for readers of the vectors."""
    message = message_class_of(payload_type)()
    try:
        message.ParseFromString(payload)
    except DecodeError:  # unparseable payloads are vectors too
        return None
    if not message.ListFields():
        return None
    return json_format.MessageToDict(message)


def statements_file(keys: dict[str, NamedKey], checkpoint_root: bytes) -> dict[str, Any]:
    registry = KeyRegistry(k.party_key() for k in keys.values() if k.registered)
    vectors = []
    for case in _statement_cases(keys, checkpoint_root):
        envelope = case.envelope
        vector: dict[str, Any] = {
            "id": case.id,
            "description": case.description,
            "expected_payload_type": case.expected_type,
            "envelope": envelope_json(envelope),
            "envelope_hex": envelope.SerializeToString(deterministic=True).hex(),
            "pae_hex": pae(envelope.payload_type, envelope.payload).hex(),
            "payload_json": _payload_json(case.expected_type, envelope.payload),
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
        vectors.append(vector)
    return {
        "description": (
            "Signed statements (docs/PROTOCOL.md section 3). Verify each envelope with the "
            "registry, for verifier_party_id, at 'now', with max_skew_seconds of skew, "
            "expecting expected_payload_type; last_accepted_sequence is the replay state for "
            "(issuer, payload type) (0: none). A non-null 'threshold' means a threshold "
            "statement (section 3.7). 'expected' is either valid with the issuer and the "
            "counted signer parties, or the ErrorReason (without the ERROR_REASON_ prefix) "
            "and gRPC status the verifier must fail with."
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
    }
