"""The threshold statements of statements.json: emergency releases, 2 of 3 (§3.7).

release_2_of_3 is the regulator's release signed by regulator and custodian, which the
other modules embed or extend. valid_cases: it, and it with invalid extra signatures.
refused_cases: below the threshold, issued by a party that did not sign, one party twice.
signature_count_cases: 16 signatures (the most) and 17 (stage a3). issuer_cases: the
issuer's own key among several signatures (§3.7 step 4): rotated out, revoked, not
signing, or of a role that may not issue.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from collateral_sync.keys import SigningKey
from collateral_sync.signing import pae
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import attestation_pb2, emergency_pb2, envelope_pb2

from .. import _messages as messages
from .._common import (
    CLIENT_ID,
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    NOW,
    REGULATOR_ID,
    TTL,
    NamedKey,
    statement_envelope,
    statement_header,
    status,
)
from ._shared import StatementCase, copy_envelope, holdings_header, holdings_message, valid

__all__ = [
    "issuer_cases",
    "refused_cases",
    "release_2_of_3",
    "signature_count_cases",
    "valid_cases",
]


_RELEASE_TYPE = payload_type_of(emergency_pb2.EmergencyRelease)


def _release() -> emergency_pb2.EmergencyRelease:
    return messages.emergency_release(NOW - timedelta(hours=49))


def _release_header(issuer: str = REGULATOR_ID) -> envelope_pb2.StatementHeader:
    return statement_header(
        issuer=issuer,
        audience=[REGULATOR_ID, CUSTODIAN_ID, EXCHANGE_ID],
        sequence=1,
        issued_at=ISSUED,
        expires_at=ISSUED + TTL,
        statement_id="release-0001",
    )


def _release_signed_by(issuer: str, signers: Sequence[SigningKey]) -> envelope_pb2.Envelope:
    return statement_envelope(_release(), _release_header(issuer), signers)


def _release_case(
    case_id: str, description: str, envelope: envelope_pb2.Envelope, expected: dict[str, Any]
) -> StatementCase:
    return StatementCase(
        case_id, description, _RELEASE_TYPE, envelope, expected, CUSTODIAN_ID, threshold=2
    )


def release_2_of_3(keys: dict[str, NamedKey]) -> envelope_pb2.Envelope:
    """Issued by the regulator, signed by regulator and custodian, over PAE directly."""
    return _release_signed_by(REGULATOR_ID, [keys["regulator"].key, keys["custodian"].key])


def valid_cases(keys: dict[str, NamedKey], release: envelope_pb2.Envelope) -> list[StatementCase]:
    exchange = keys["exchange"].key
    unregistered = keys["unregistered"].key

    release_extra = copy_envelope(release)
    release_extra.signatures.add(
        key_id=unregistered.key_id, sig=unregistered.sign(pae(_RELEASE_TYPE, b"other bytes"))
    )
    release_extra.signatures.add(key_id=exchange.key_id, sig=bytes(64))

    return [
        _release_case(
            "emergency-release/valid-2-of-3",
            "Issued by the regulator, signed by regulator and custodian (2 distinct parties).",
            release,
            valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
        ),
        _release_case(
            "emergency-release/valid-extra-bad-signatures-ignored",
            "2-of-3 plus an unregistered key's signature and a zero signature by the exchange's "
            "key: invalid extra signatures are ignored.",
            release_extra,
            valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
        ),
    ]


def refused_cases(keys: dict[str, NamedKey]) -> list[StatementCase]:
    custodian = keys["custodian"].key
    regulator = keys["regulator"].key
    regulator_second = keys["regulator-second"].key

    return [
        _release_case(
            "emergency-release/below-threshold",
            "Signed by the regulator alone.",
            _release_signed_by(REGULATOR_ID, [regulator]),
            status("THRESHOLD_NOT_MET"),
        ),
        # Issued in the exchange's name, signed by regulator and custodian only (§3.7 step 4).
        _release_case(
            "emergency-release/issuer-not-a-signer",
            "Issued by the exchange, signed by regulator and custodian: two parties count, but "
            "the issuer is not one of them.",
            _release_signed_by(EXCHANGE_ID, [regulator, custodian]),
            status("KEY_ROLE_MISMATCH"),
        ),
        _release_case(
            "emergency-release/same-party-twice",
            "Signed by two different keys of the regulator: one party counts once.",
            _release_signed_by(REGULATOR_ID, [regulator, regulator_second]),
            status("THRESHOLD_NOT_MET"),
        ),
    ]


def signature_count_cases(
    keys: dict[str, NamedKey], release: envelope_pb2.Envelope
) -> list[StatementCase]:
    """16 signatures (the most allowed) and 17: the 2-of-3 release, then signatures of an
    unregistered key over other bytes (ignored when there are at most 16)."""
    unregistered = keys["unregistered"].key

    sixteen = copy_envelope(release)
    for index in range(16 - len(release.signatures)):
        sixteen.signatures.add(
            key_id=unregistered.key_id,
            sig=unregistered.sign(pae(_RELEASE_TYPE, b"other bytes %d" % index)),
        )
    seventeen = copy_envelope(sixteen)
    seventeen.signatures.add(
        key_id=unregistered.key_id, sig=unregistered.sign(pae(_RELEASE_TYPE, b"other bytes 16"))
    )

    return [
        _release_case(
            "emergency-release/valid-16-signatures",
            "The 2-of-3 release with 14 more signatures by an unregistered key over other "
            "bytes: 16 signatures, the most an envelope may carry; the extra ones are ignored.",
            sixteen,
            valid(REGULATOR_ID, REGULATOR_ID, CUSTODIAN_ID),
        ),
        _release_case(
            "emergency-release/17-signatures",
            "The same with a 17th signature: more than 16 signatures (stage a3), refused "
            "before any signature is checked.",
            seventeen,
            status("MALFORMED"),
        ),
    ]


def issuer_cases(keys: dict[str, NamedKey]) -> list[StatementCase]:
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    client = keys["client"].key
    rotated_out = keys["custodian-rotated-out"].key

    forged_issuer = _release_signed_by(EXCHANGE_ID, [regulator, custodian])
    forged_issuer.signatures.insert(
        0,
        envelope_pb2.Signature(
            key_id=exchange.key_id, sig=exchange.sign(pae(_RELEASE_TYPE, b"other bytes"))
        ),
    )

    return [
        StatementCase(
            "holdings-statement/issuer-key-not-valid-after-other-signature",
            "Signed first by the exchange, then by the custodian's rotated-out key: no key "
            "may issue; the error reported is the issuer's own key's (KEY_NOT_VALID), not "
            "the first signer's (see section 3.7 step 4; section 3.6 'd with several "
            "signatures' says the first verified signature's).",
            payload_type_of(attestation_pb2.HoldingsStatement),
            statement_envelope(holdings_message(), holdings_header(), [exchange, rotated_out]),
            status("KEY_NOT_VALID"),
            EXCHANGE_ID,
        ),
        _release_case(
            "emergency-release/issuer-signed-with-revoked-key",
            "Issued by the exchange with its revoked key, signed by regulator and custodian "
            "too: two parties count, the issuer's own key fails d2.",
            _release_signed_by(EXCHANGE_ID, [keys["exchange-revoked"].key, regulator, custodian]),
            status("KEY_REVOKED"),
        ),
        _release_case(
            "emergency-release/issuer-signed-with-rotated-out-key",
            "Issued by the custodian with its rotated-out key, signed by regulator and "
            "exchange too: two parties count, the issuer's own key fails d3.",
            _release_signed_by(CUSTODIAN_ID, [rotated_out, regulator, exchange]),
            status("KEY_NOT_VALID"),
        ),
        _release_case(
            "emergency-release/issuer-signature-invalid",
            "Issued by the exchange, whose signature (first) is over other bytes; regulator "
            "and custodian signed: the issuer did not sign, so the first verified signer, not "
            "the issuer, is reported.",
            forged_issuer,
            status("KEY_ROLE_MISMATCH"),
        ),
        _release_case(
            "emergency-release/issued-by-client",
            "Issued and signed by the client, signed by regulator and custodian too: the "
            "client's signature does not count and client keys may not issue releases.",
            _release_signed_by(CLIENT_ID, [client, regulator, custodian]),
            status("KEY_ROLE_MISMATCH"),
        ),
    ]
