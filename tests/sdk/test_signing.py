"""Signed statements: PAE, issuing, every verification stage, replay, and threshold statements."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import (
    MAX_SIGNATURES,
    MemoryReplayGuard,
    ReplayGuard,
    VerifiedStatement,
    add_signature,
    pae,
    sign_statement,
    verify_statement,
    verify_threshold,
)
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
TTL = timedelta(minutes=5)
SKEW = timedelta(seconds=30)
HOLDINGS = attestation_pb2.HoldingsStatement
RELEASE = emergency_pb2.EmergencyRelease
RELEASE_ROLES = {
    common_pb2.PARTY_ROLE_REGULATOR,
    common_pb2.PARTY_ROLE_CUSTODIAN,
    common_pb2.PARTY_ROLE_EXCHANGE,
}


@dataclass
class Parties:
    custodian: SigningKey
    exchange: SigningKey
    regulator: SigningKey
    client: SigningKey
    outsider: SigningKey  # never registered
    registry: KeyRegistry


@pytest.fixture
def parties() -> Parties:
    def key(n: int, party: str, role: int) -> SigningKey:
        return SigningKey.from_seed(bytes([n]) * 32, party, role)

    custodian = key(1, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
    exchange = key(2, "exchange-1", common_pb2.PARTY_ROLE_EXCHANGE)
    regulator = key(3, "regulator-1", common_pb2.PARTY_ROLE_REGULATOR)
    client = key(4, "client-1", common_pb2.PARTY_ROLE_CLIENT)
    outsider = key(5, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
    registry = KeyRegistry(
        k.party_key(T0 - timedelta(days=30)) for k in (custodian, exchange, regulator, client)
    )
    return Parties(custodian, exchange, regulator, client, outsider, registry)


def _reason(info: pytest.ExceptionInfo[CollateralSyncError]) -> str:
    return errors_pb2.ErrorReason.Name(info.value.reason)  # type: ignore[arg-type]


def _holdings(account: str = "acct-1") -> attestation_pb2.HoldingsStatement:
    return HOLDINGS(account_id=account, exchange_id="exchange-1", epoch=7)


def _issue(
    signer: SigningKey,
    *,
    sequence: int = 1,
    issued_at: datetime = T0,
    audience: tuple[str, ...] = ("exchange-1",),
) -> envelope_pb2.Envelope:
    return sign_statement(
        _holdings(), signer, audience=audience, sequence=sequence, ttl=TTL, issued_at=issued_at
    )


def _verify(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    now: datetime = T0,
    audience: str = "exchange-1",
    **options: object,
) -> VerifiedStatement[attestation_pb2.HoldingsStatement]:
    return verify_statement(
        envelope,
        registry,
        expected_type=HOLDINGS,
        audience=audience,
        now=now,
        **options,  # type: ignore[arg-type]
    )


def _forge(
    signer: SigningKey,
    payload: bytes,
    payload_type: str = "application/vnd.collateral-sync.v1.holdings-statement+proto",
) -> envelope_pb2.Envelope:
    """A genuinely signed envelope over arbitrary bytes, skipping sign_statement checks."""
    return envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[
            envelope_pb2.Signature(
                key_id=signer.key_id, sig=signer.sign(pae(payload_type, payload))
            )
        ],
    )


def _header(
    issuer: str = "custodian-1",
    *,
    audience: tuple[str, ...] = ("exchange-1",),
    sequence: int = 1,
    issued_at: datetime = T0,
    expires_at: datetime | None = T0 + TTL,
) -> envelope_pb2.StatementHeader:
    header = envelope_pb2.StatementHeader(issuer=issuer, audience=audience, sequence=sequence)
    header.issued_at.FromDatetime(issued_at)
    if expires_at is not None:
        header.expires_at.FromDatetime(expires_at)
    return header


def _forge_holdings(
    signer: SigningKey, header: envelope_pb2.StatementHeader
) -> envelope_pb2.Envelope:
    message = _holdings()
    message.header.CopyFrom(header)
    return _forge(signer, message.SerializeToString(deterministic=True))


# --- PAE ------------------------------------------------------------------------


def test_pae_matches_dsse_v1_by_hand() -> None:
    # "DSSEv1" SP len(type) SP type SP len(payload) SP payload, written out byte by byte.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("", b"") == b"DSSEv1 0  0 "
    # Lengths count UTF-8 bytes of the type, not characters.
    assert pae("t\u00e9", b"\x00\xff") == b"DSSEv1 3 t\xc3\xa9 2 \x00\xff"
    assert pae("a", b"b" * 1000) == b"DSSEv1 1 a 1000 " + b"b" * 1000


# --- issuing ----------------------------------------------------------------------


def test_sign_statement_fills_the_header_and_signs_pae(parties: Parties) -> None:
    message = _holdings()
    envelope = sign_statement(
        message,
        parties.custodian,
        audience=["exchange-1", "regulator-1"],
        sequence=3,
        ttl=TTL,
        issued_at=T0,
        statement_id="stmt-1",
    )
    header = message.header
    assert header.issuer == "custodian-1"
    assert list(header.audience) == ["exchange-1", "regulator-1"]
    assert header.sequence == 3
    assert header.issued_at.ToDatetime(tzinfo=UTC) == T0
    assert header.expires_at.ToDatetime(tzinfo=UTC) == T0 + TTL
    assert header.statement_id == "stmt-1"
    assert envelope.payload_type == "application/vnd.collateral-sync.v1.holdings-statement+proto"
    assert envelope.payload == message.SerializeToString(deterministic=True)
    [signature] = envelope.signatures
    assert signature.key_id == parties.custodian.key_id
    # Independent check with another Ed25519 implementation.
    Ed25519PublicKey.from_public_bytes(parties.custodian.public_key).verify(
        signature.sig, pae(envelope.payload_type, envelope.payload)
    )


def test_statement_ids_default_to_distinct_random_ids(parties: Parties) -> None:
    first, second = _holdings(), _holdings()
    for message in (first, second):
        sign_statement(
            message, parties.custodian, audience=["exchange-1"], sequence=1, ttl=TTL, issued_at=T0
        )
    assert len(first.header.statement_id) == 32
    assert first.header.statement_id != second.header.statement_id


def test_sign_statement_refuses_a_role_that_may_not_issue(parties: Parties) -> None:
    message = _holdings()
    with pytest.raises(VerificationError) as info:
        sign_statement(
            message, parties.exchange, audience=["custodian-1"], sequence=1, ttl=TTL, issued_at=T0
        )
    assert _reason(info) == "ERROR_REASON_KEY_ROLE_MISMATCH"
    assert info.value.metadata == {
        "expected": "PARTY_ROLE_CUSTODIAN",
        "actual": "PARTY_ROLE_EXCHANGE",
    }
    assert not message.HasField("header")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"audience": []}, MalformedError),
        ({"audience": [""]}, MalformedError),
        ({"audience": ["*"]}, MalformedError),  # holdings statements are not public
        ({"audience": "exchange-1"}, TypeError),
        ({"sequence": 0}, MalformedError),
        ({"ttl": timedelta(0)}, MalformedError),
        ({"issued_at": datetime(2026, 3, 1)}, ValueError),
    ],
)
def test_sign_statement_refuses_bad_arguments_without_changing_the_message(
    parties: Parties, options: dict[str, object], error: type[Exception]
) -> None:
    arguments: dict[str, object] = {
        "audience": ["exchange-1"],
        "sequence": 1,
        "ttl": TTL,
        "issued_at": T0,
    } | options
    message = _holdings()
    with pytest.raises(error):
        sign_statement(message, parties.custodian, **arguments)  # type: ignore[arg-type]
    assert not message.HasField("header")


# --- verification: the happy path -----------------------------------------------------


def test_round_trip(parties: Parties) -> None:
    envelope = _issue(parties.custodian, sequence=4)
    verified = _verify(envelope, parties.registry)
    assert verified.message.account_id == "acct-1"
    assert verified.message.epoch == 7
    assert verified.header.issuer == verified.issuer == "custodian-1"
    assert verified.sequence == 4
    assert verified.payload == envelope.payload
    assert verified.payload_type == payload_type_of(HOLDINGS)
    assert verified.signer_key_ids == (parties.custodian.key_id,)
    assert verified.signer_party_ids == ("custodian-1",)
    assert verified.envelope is envelope
    with pytest.raises(AttributeError):
        verified.payload = b""  # type: ignore[misc]


def test_verification_survives_the_wire(parties: Parties) -> None:
    wire = _issue(parties.custodian).SerializeToString()
    received = envelope_pb2.Envelope.FromString(wire)
    assert _verify(received, parties.registry).message.account_id == "acct-1"


def test_verification_uses_received_bytes_not_a_reserialisation(parties: Parties) -> None:
    # Non-canonical but valid encoding: the same fields in reverse order.
    message = _holdings()
    message.header.CopyFrom(_header())
    canonical = message.SerializeToString(deterministic=True)
    pieces = [
        HOLDINGS(epoch=7).SerializeToString(),
        HOLDINGS(exchange_id="exchange-1").SerializeToString(),
        HOLDINGS(account_id="acct-1").SerializeToString(),
        HOLDINGS(header=_header()).SerializeToString(),
    ]
    reordered = b"".join(pieces)
    assert reordered != canonical
    assert HOLDINGS.FromString(reordered) == message
    verified = _verify(_forge(parties.custodian, reordered), parties.registry)
    assert verified.payload == reordered


# --- stage a: structure ------------------------------------------------------------


def test_payload_type_must_be_the_expected_one(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    with pytest.raises(MalformedError) as info:
        verify_statement(
            envelope,
            parties.registry,
            expected_type=liquidation_pb2.LiquidationReceipt,
            audience="exchange-1",
            now=T0,
        )
    assert _reason(info) == "ERROR_REASON_PAYLOAD_TYPE_MISMATCH"
    assert info.value.metadata == {
        "expected": "application/vnd.collateral-sync.v1.liquidation-receipt+proto",
        "actual": "application/vnd.collateral-sync.v1.holdings-statement+proto",
    }


def test_relabelled_payload_type_breaks_the_signature(parties: Parties) -> None:
    # Signed as a holdings statement, relabelled as a liquidation receipt (same issuer role).
    envelope = _issue(parties.custodian)
    envelope.payload_type = payload_type_of(liquidation_pb2.LiquidationReceipt)
    with pytest.raises(VerificationError) as info:
        verify_statement(
            envelope,
            parties.registry,
            expected_type=liquidation_pb2.LiquidationReceipt,
            audience="exchange-1",
            now=T0,
        )
    assert _reason(info) == "ERROR_REASON_SIGNATURE_INVALID"


def test_oversized_payload_is_refused_before_its_signature_is_checked(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    size = len(envelope.payload)
    assert _verify(envelope, parties.registry, max_payload_bytes=size).sequence == 1
    envelope.payload += b"\x00"  # also breaks the signature; size is checked first
    with pytest.raises(CollateralSyncError) as info:
        _verify(envelope, parties.registry, max_payload_bytes=size)
    assert _reason(info) == "ERROR_REASON_TOO_LARGE"
    assert info.value.metadata == {"expected": f"<= {size}", "actual": str(size + 1)}


def test_default_limit_is_four_mebibytes(parties: Parties) -> None:
    big = _forge(parties.custodian, b"\x00" * (4 * 1024 * 1024 + 1))
    with pytest.raises(CollateralSyncError) as info:
        _verify(big, parties.registry)
    assert _reason(info) == "ERROR_REASON_TOO_LARGE"


def test_signature_structure(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    no_signatures = envelope_pb2.Envelope(
        payload=envelope.payload, payload_type=envelope.payload_type
    )
    with pytest.raises(MalformedError, match="0 signatures"):
        _verify(no_signatures, parties.registry)

    short = envelope_pb2.Envelope()
    short.CopyFrom(envelope)
    short.signatures[0].sig = short.signatures[0].sig[:63]
    with pytest.raises(MalformedError) as info:
        _verify(short, parties.registry)
    assert info.value.metadata == {"expected": "64", "actual": "63"}

    for bad_id in (parties.custodian.key_id.upper(), parties.custodian.key_id[:63], "g" * 64):
        relabelled = envelope_pb2.Envelope()
        relabelled.CopyFrom(envelope)
        relabelled.signatures[0].key_id = bad_id
        with pytest.raises(MalformedError, match="lowercase hex"):
            _verify(relabelled, parties.registry)

    crowded = envelope_pb2.Envelope()
    crowded.CopyFrom(envelope)
    for _ in range(MAX_SIGNATURES):
        crowded.signatures.add(key_id=parties.exchange.key_id, sig=b"\x00" * 64)
    with pytest.raises(MalformedError, match="signatures"):
        _verify(crowded, parties.registry)


# --- stage b: signatures -----------------------------------------------------------


def test_tampered_payload(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    payload = bytearray(envelope.payload)
    payload[-1] ^= 0x01
    envelope.payload = bytes(payload)
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_SIGNATURE_INVALID"


def test_signature_is_checked_before_parsing(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    envelope.payload = b"\xff\xff\xff garbage"
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_SIGNATURE_INVALID"


def test_unregistered_key(parties: Parties) -> None:
    # Same party id and role as the registered custodian, but a key nobody registered.
    envelope = _issue(parties.outsider)
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_KEY_UNKNOWN"
    assert info.value.metadata["actual"] == parties.outsider.key_id


def test_signature_by_another_registered_key_under_the_issuers_key_id(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    envelope.signatures[0].sig = parties.exchange.sign(pae(envelope.payload_type, envelope.payload))
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_SIGNATURE_INVALID"


# --- stage c: parse ------------------------------------------------------------------


def test_malformed_payload_with_a_valid_signature(parties: Parties) -> None:
    envelope = _forge(
        parties.custodian, b"\x0a\xff\xff\xff\xff"
    )  # truncated length-delimited field
    with pytest.raises(MalformedError) as info:
        _verify(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_MALFORMED"
    assert isinstance(info.value.__cause__, DecodeError)


def test_payload_without_header(parties: Parties) -> None:
    envelope = _forge(parties.custodian, HOLDINGS(account_id="a").SerializeToString())
    with pytest.raises(MalformedError, match="no header"):
        _verify(envelope, parties.registry)


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (_header(issuer=""), "header.issuer"),
        (_header(sequence=0), "header.sequence"),
        (_header(expires_at=None), "header.expires_at"),
        (_header(expires_at=T0), "header.expires_at"),
        (_header(expires_at=T0 - US), "header.expires_at"),
    ],
)
def test_header_shape(parties: Parties, header: envelope_pb2.StatementHeader, field: str) -> None:
    with pytest.raises(MalformedError) as info:
        _verify(_forge_holdings(parties.custodian, header), parties.registry)
    assert field in info.value.field_violations


def test_header_with_unset_or_invalid_issued_at(parties: Parties) -> None:
    header = _header()
    header.ClearField("issued_at")
    with pytest.raises(MalformedError) as info:
        _verify(_forge_holdings(parties.custodian, header), parties.registry)
    assert info.value.metadata == {"expected": "valid timestamp", "actual": "unset"}
    header = _header()
    header.issued_at.nanos = -5
    with pytest.raises(MalformedError, match=r"header\.issued_at"):
        _verify(_forge_holdings(parties.custodian, header), parties.registry)


# --- stage d: issuer key ---------------------------------------------------------------


def test_key_of_the_wrong_role(parties: Parties) -> None:
    # The exchange's genuine key signs a holdings statement in its own name.
    envelope = _forge_holdings(parties.exchange, _header(issuer="exchange-1"))
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry, audience="exchange-1")
    assert _reason(info) == "ERROR_REASON_KEY_ROLE_MISMATCH"
    assert info.value.metadata == {
        "expected": "PARTY_ROLE_CUSTODIAN",
        "actual": "PARTY_ROLE_EXCHANGE",
    }


def test_issuer_must_own_the_signing_key(parties: Parties) -> None:
    envelope = _forge_holdings(parties.custodian, _header(issuer="custodian-2"))
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_KEY_ROLE_MISMATCH"
    assert info.value.metadata == {"expected": "custodian-2", "actual": "custodian-1"}


def test_revoked_key(parties: Parties) -> None:
    revoked_at = T0 + timedelta(hours=1)
    parties.registry.revoke(parties.custodian.key_id, revoked_at)
    before = _issue(parties.custodian, issued_at=revoked_at - US)
    assert _verify(before, parties.registry, now=revoked_at).sequence == 1
    for issued_at in (revoked_at, revoked_at + timedelta(minutes=1)):
        after = _issue(parties.custodian, issued_at=issued_at)
        with pytest.raises(VerificationError) as info:
            _verify(after, parties.registry, now=issued_at)
        assert _reason(info) == "ERROR_REASON_KEY_REVOKED"


def test_key_outside_its_validity_window(parties: Parties) -> None:
    late = SigningKey.from_seed(b"\x09" * 32, "custodian-9", common_pb2.PARTY_ROLE_CUSTODIAN)
    parties.registry.add(late.party_key(T0, T0 + timedelta(days=1)))
    assert _verify(_issue(late, issued_at=T0), parties.registry).issuer == "custodian-9"
    for issued_at in (T0 - US, T0 + timedelta(days=1)):
        envelope = _issue(late, issued_at=issued_at)
        with pytest.raises(VerificationError) as info:
            _verify(envelope, parties.registry, now=issued_at)
        assert _reason(info) == "ERROR_REASON_KEY_NOT_VALID"


def test_rotation(parties: Parties) -> None:
    rotation = T0 + timedelta(days=1)
    new = SigningKey.from_seed(b"\x11" * 32, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
    parties.registry.rotate(parties.custodian.key_id, new.party_key(rotation), rotation)
    # Old key: fine before rotation, even when verified afterwards (within its ttl).
    old_before = _issue(parties.custodian, issued_at=rotation - timedelta(minutes=1))
    assert _verify(old_before, parties.registry, now=rotation + timedelta(minutes=1)).sequence == 1
    old_after = _issue(parties.custodian, issued_at=rotation)
    with pytest.raises(VerificationError) as info:
        _verify(old_after, parties.registry, now=rotation)
    assert _reason(info) == "ERROR_REASON_KEY_NOT_VALID"
    new_after = _issue(new, issued_at=rotation)
    assert _verify(new_after, parties.registry, now=rotation).signer_key_ids == (new.key_id,)
    new_before = _issue(new, issued_at=rotation - US)
    with pytest.raises(VerificationError) as info:
        _verify(new_before, parties.registry, now=rotation)
    assert _reason(info) == "ERROR_REASON_KEY_NOT_VALID"


# --- stage e: audience -------------------------------------------------------------------


def test_wrong_audience(parties: Parties) -> None:
    envelope = _issue(parties.custodian, audience=("exchange-1", "regulator-1"))
    assert _verify(envelope, parties.registry, audience="regulator-1").sequence == 1
    for audience in ("exchange-2", "*", ""):
        with pytest.raises(VerificationError) as info:
            _verify(envelope, parties.registry, audience=audience)
        assert _reason(info) == "ERROR_REASON_AUDIENCE_MISMATCH"
        assert info.value.metadata == {
            "expected": audience,
            "actual": "exchange-1,regulator-1",
        }


def test_anyone_audience_only_for_public_types(parties: Parties) -> None:
    checkpoint = attestation_pb2.Checkpoint(origin="custodian-1/log", tree_size=10)
    public = sign_statement(
        checkpoint, parties.custodian, audience=["*"], sequence=1, ttl=TTL, issued_at=T0
    )
    for audience in ("exchange-1", "regulator-1", "anyone-at-all"):
        verified = verify_statement(
            public,
            parties.registry,
            expected_type=attestation_pb2.Checkpoint,
            audience=audience,
            now=T0,
        )
        assert verified.message.tree_size == 10
    # A holdings statement addressed to everyone is refused, even by a party it also names.
    private = _forge_holdings(parties.custodian, _header(audience=("*", "exchange-1")))
    with pytest.raises(VerificationError) as info:
        _verify(private, parties.registry, audience="exchange-1")
    assert _reason(info) == "ERROR_REASON_AUDIENCE_MISMATCH"


# --- stage f: freshness --------------------------------------------------------------------


def test_expiry_boundary_with_skew(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    assert _verify(envelope, parties.registry, now=T0 + TTL + SKEW).sequence == 1
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry, now=T0 + TTL + SKEW + US)
    assert _reason(info) == "ERROR_REASON_STATEMENT_EXPIRED"
    assert info.value.metadata == {
        "expected": "<= 2026-03-01T12:05:30Z",
        "actual": "2026-03-01T12:05:30.000001Z",
    }


def test_not_yet_valid_boundary_with_skew(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    assert _verify(envelope, parties.registry, now=T0 - SKEW).sequence == 1
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry, now=T0 - SKEW - US)
    assert _reason(info) == "ERROR_REASON_STATEMENT_NOT_YET_VALID"
    assert info.value.metadata["actual"] == "2026-03-01T12:00:00Z"


def test_custom_skew(parties: Parties) -> None:
    envelope = _issue(parties.custodian)
    no_skew = timedelta(0)
    assert _verify(envelope, parties.registry, now=T0 + TTL, max_skew=no_skew).sequence == 1
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry, now=T0 + TTL + US, max_skew=no_skew)
    assert _reason(info) == "ERROR_REASON_STATEMENT_EXPIRED"
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry, now=T0 - US, max_skew=no_skew)
    assert _reason(info) == "ERROR_REASON_STATEMENT_NOT_YET_VALID"
    wide = timedelta(hours=1)
    assert _verify(envelope, parties.registry, now=T0 - wide, max_skew=wide).sequence == 1


def test_naive_now_is_a_programming_error(parties: Parties) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify(_issue(parties.custodian), parties.registry, now=datetime(2026, 3, 1, 12))


# --- stage g: replay -------------------------------------------------------------------------


def test_replay_guard(parties: Parties) -> None:
    guard = MemoryReplayGuard()
    fifth = _issue(parties.custodian, sequence=5)
    verified = _verify(fifth, parties.registry, replay_guard=guard)
    # Verification alone records nothing: the same statement still passes.
    _verify(fifth, parties.registry, replay_guard=guard)
    assert guard.last_sequence("custodian-1", verified.payload_type) == 0
    guard.record(verified)
    assert guard.last_sequence("custodian-1", verified.payload_type) == 5
    for sequence in (5, 4, 1):
        with pytest.raises(VerificationError) as info:
            _verify(
                _issue(parties.custodian, sequence=sequence), parties.registry, replay_guard=guard
            )
        assert _reason(info) == "ERROR_REASON_REPLAYED"
        assert info.value.metadata == {"expected": "> 5", "actual": str(sequence)}
    # Gaps are allowed; the sequence only has to increase.
    sixth = _verify(_issue(parties.custodian, sequence=9), parties.registry, replay_guard=guard)
    guard.record(sixth)
    # Recording an older statement afterwards is refused too (check-then-record race).
    with pytest.raises(VerificationError) as info:
        guard.record(verified)
    assert _reason(info) == "ERROR_REASON_REPLAYED"


def test_replay_is_tracked_per_issuer_and_payload_type(parties: Parties) -> None:
    guard = MemoryReplayGuard()
    guard.record(_verify(_issue(parties.custodian, sequence=3), parties.registry))
    checkpoint = sign_statement(
        attestation_pb2.Checkpoint(origin="o", tree_size=1),
        parties.custodian,
        audience=["*"],
        sequence=1,
        ttl=TTL,
        issued_at=T0,
    )
    verify_statement(
        checkpoint,
        parties.registry,
        expected_type=attestation_pb2.Checkpoint,
        audience="exchange-1",
        now=T0,
        replay_guard=guard,
    )
    guard.check("custodian-2", payload_type_of(HOLDINGS), 1)


def test_memory_replay_guard_satisfies_the_protocol() -> None:
    guard: ReplayGuard = MemoryReplayGuard()
    guard.check("anyone", "type", 1)


def test_stages_run_in_order(parties: Parties) -> None:
    # Expired, wrong audience and replayed at once: the audience stage reports first.
    guard = MemoryReplayGuard()
    guard.record(_verify(_issue(parties.custodian, sequence=1), parties.registry))
    envelope = _issue(parties.custodian, sequence=1)
    with pytest.raises(VerificationError) as info:
        _verify(
            envelope, parties.registry, audience="x", now=T0 + timedelta(days=1), replay_guard=guard
        )
    assert _reason(info) == "ERROR_REASON_AUDIENCE_MISMATCH"
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry, now=T0 + timedelta(days=1), replay_guard=guard)
    assert _reason(info) == "ERROR_REASON_STATEMENT_EXPIRED"
    with pytest.raises(VerificationError) as info:
        _verify(envelope, parties.registry, replay_guard=guard)
    assert _reason(info) == "ERROR_REASON_REPLAYED"


# --- co-signing and threshold statements --------------------------------------------------------


def _release(parties: Parties, issuer: SigningKey | None = None) -> envelope_pb2.Envelope:
    release = RELEASE(
        release_id="rel-1",
        account_id="acct-1",
        exchange_id="exchange-1",
        reason=emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE,
    )
    return sign_statement(
        release,
        issuer or parties.regulator,
        audience=["custodian-1"],
        sequence=1,
        ttl=timedelta(hours=48),
        issued_at=T0,
    )


def _threshold(
    envelope: envelope_pb2.Envelope, registry: KeyRegistry, *, now: datetime = T0
) -> VerifiedStatement[emergency_pb2.EmergencyRelease]:
    return verify_threshold(
        envelope,
        registry,
        expected_type=RELEASE,
        threshold=2,
        roles=RELEASE_ROLES,
        audience="custodian-1",
        now=now,
    )


def test_two_of_three_distinct_parties_pass(parties: Parties) -> None:
    envelope = add_signature(_release(parties), parties.custodian)
    assert len(envelope.signatures) == 2
    verified = _threshold(envelope, parties.registry)
    assert verified.message.release_id == "rel-1"
    assert verified.signer_party_ids == ("regulator-1", "custodian-1")
    assert verified.signer_key_ids == (parties.regulator.key_id, parties.custodian.key_id)
    all_three = add_signature(envelope, parties.exchange)
    assert _threshold(all_three, parties.registry).signer_party_ids == (
        "regulator-1",
        "custodian-1",
        "exchange-1",
    )


def test_add_signature_returns_a_new_envelope(parties: Parties) -> None:
    original = _release(parties)
    cosigned = add_signature(original, parties.custodian)
    assert len(original.signatures) == 1
    assert cosigned.payload == original.payload
    assert cosigned.payload_type == original.payload_type


def test_one_signature_does_not_meet_the_threshold(parties: Parties) -> None:
    with pytest.raises(VerificationError) as info:
        _threshold(_release(parties), parties.registry)
    assert _reason(info) == "ERROR_REASON_THRESHOLD_NOT_MET"
    assert info.value.metadata == {"expected": "2", "actual": "1"}


def test_the_same_party_twice_counts_once(parties: Parties) -> None:
    second = SigningKey.from_seed(b"\x13" * 32, "regulator-1", common_pb2.PARTY_ROLE_REGULATOR)
    parties.registry.add(second.party_key(T0 - timedelta(days=1)))
    envelope = _release(parties)
    # add_signature refuses this, so append by hand as a hostile sender would.
    envelope.signatures.add(
        key_id=second.key_id, sig=second.sign(pae(envelope.payload_type, envelope.payload))
    )
    with pytest.raises(VerificationError) as info:
        _threshold(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_THRESHOLD_NOT_MET"
    assert info.value.metadata == {"expected": "2", "actual": "1"}
    # The same signature repeated does not count twice either.
    repeated = _release(parties)
    repeated.signatures.append(repeated.signatures[0])
    with pytest.raises(VerificationError) as info:
        _threshold(repeated, parties.registry)
    assert _reason(info) == "ERROR_REASON_THRESHOLD_NOT_MET"


def test_a_wrong_role_signer_does_not_count(parties: Parties) -> None:
    envelope = add_signature(_release(parties), parties.client)
    with pytest.raises(VerificationError) as info:
        _threshold(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_THRESHOLD_NOT_MET"
    assert info.value.metadata == {"expected": "2", "actual": "1"}


def test_invalid_or_unknown_extra_signatures_do_not_break_a_valid_two_of_three(
    parties: Parties,
) -> None:
    envelope = add_signature(_release(parties), parties.custodian)
    envelope.signatures.add(key_id=parties.exchange.key_id, sig=b"\x5a" * 64)
    envelope.signatures.add(
        key_id=parties.outsider.key_id,
        sig=parties.outsider.sign(pae(envelope.payload_type, envelope.payload)),
    )
    verified = _threshold(envelope, parties.registry)
    assert verified.signer_party_ids == ("regulator-1", "custodian-1")


def test_a_key_invalid_at_issue_time_does_not_count(parties: Parties) -> None:
    parties.registry.revoke(parties.custodian.key_id, T0 - timedelta(hours=1))
    envelope = add_signature(_release(parties), parties.custodian)
    with pytest.raises(VerificationError) as info:
        _threshold(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_THRESHOLD_NOT_MET"


def test_the_issuer_must_be_among_the_counted_signers(parties: Parties) -> None:
    # Issued in the regulator's name, but only custodian and exchange signatures are valid.
    envelope = add_signature(add_signature(_release(parties), parties.custodian), parties.exchange)
    envelope.signatures[0].sig = b"\x00" * 64
    with pytest.raises(VerificationError) as info:
        _threshold(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_KEY_ROLE_MISMATCH"
    assert info.value.metadata == {"expected": "regulator-1", "actual": "custodian-1"}


def test_the_issuers_own_key_problem_is_reported(parties: Parties) -> None:
    envelope = add_signature(add_signature(_release(parties), parties.custodian), parties.exchange)
    parties.registry.revoke(parties.regulator.key_id, T0 - timedelta(hours=1))
    with pytest.raises(VerificationError) as info:
        _threshold(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_KEY_REVOKED"
    # Also for verify_statement when a co-signer's signature comes first.
    reordered = envelope_pb2.Envelope()
    reordered.CopyFrom(envelope)
    del reordered.signatures[:]
    reordered.signatures.extend([envelope.signatures[1], envelope.signatures[0]])
    with pytest.raises(VerificationError) as info:
        verify_statement(
            reordered, parties.registry, expected_type=RELEASE, audience="custodian-1", now=T0
        )
    assert _reason(info) == "ERROR_REASON_KEY_REVOKED"


def test_the_issuer_must_count_under_the_given_roles(parties: Parties) -> None:
    envelope = add_signature(add_signature(_release(parties), parties.custodian), parties.exchange)
    with pytest.raises(VerificationError) as info:
        verify_threshold(
            envelope,
            parties.registry,
            expected_type=RELEASE,
            threshold=2,
            roles={common_pb2.PARTY_ROLE_CUSTODIAN, common_pb2.PARTY_ROLE_EXCHANGE},
            audience="custodian-1",
            now=T0,
        )
    assert _reason(info) == "ERROR_REASON_KEY_ROLE_MISMATCH"
    assert info.value.metadata == {"expected": "regulator-1", "actual": "custodian-1,exchange-1"}


def test_threshold_accepts_a_cosigned_statement_issued_by_the_custodian(parties: Parties) -> None:
    envelope = add_signature(_release(parties, issuer=parties.custodian), parties.regulator)
    verified = _threshold(envelope, parties.registry)
    assert verified.signer_party_ids == ("custodian-1", "regulator-1")


def test_threshold_statements_still_check_audience_and_freshness(parties: Parties) -> None:
    envelope = add_signature(_release(parties), parties.custodian)
    with pytest.raises(VerificationError) as info:
        _threshold(envelope, parties.registry, now=T0 + timedelta(hours=48) + SKEW + US)
    assert _reason(info) == "ERROR_REASON_STATEMENT_EXPIRED"
    with pytest.raises(VerificationError) as info:
        verify_threshold(
            envelope,
            parties.registry,
            expected_type=RELEASE,
            threshold=2,
            roles=RELEASE_ROLES,
            audience="exchange-1",
            now=T0,
        )
    assert _reason(info) == "ERROR_REASON_AUDIENCE_MISMATCH"
    envelope.payload += b"\x00"
    with pytest.raises(VerificationError) as info:
        _threshold(envelope, parties.registry)
    assert _reason(info) == "ERROR_REASON_SIGNATURE_INVALID"


def test_threshold_must_be_positive(parties: Parties) -> None:
    with pytest.raises(ValueError, match="threshold"):
        verify_threshold(
            _release(parties),
            parties.registry,
            expected_type=RELEASE,
            threshold=0,
            roles=RELEASE_ROLES,
            audience="custodian-1",
            now=T0,
        )


def test_verify_statement_on_a_cosigned_envelope_reports_the_issuer(parties: Parties) -> None:
    envelope = add_signature(_release(parties), parties.custodian)
    verified = verify_statement(
        envelope, parties.registry, expected_type=RELEASE, audience="custodian-1", now=T0
    )
    assert verified.signer_party_ids == ("regulator-1",)


def test_add_signature_refuses_the_same_key_or_party(parties: Parties) -> None:
    envelope = add_signature(_release(parties), parties.custodian)
    with pytest.raises(StateError, match="key"):
        add_signature(envelope, parties.custodian)
    other_regulator_key = SigningKey.from_seed(
        b"\x14" * 32, "regulator-1", common_pb2.PARTY_ROLE_REGULATOR
    )
    with pytest.raises(StateError, match="party 'regulator-1'"):
        add_signature(envelope, other_regulator_key)  # the issuer's party
    other_custodian_key = SigningKey.from_seed(
        b"\x15" * 32, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN
    )
    add_signature(envelope, other_custodian_key)  # no registry: co-signer parties unknown
    with pytest.raises(StateError, match="party 'custodian-1'"):
        add_signature(envelope, other_custodian_key, registry=parties.registry)


def test_an_integer_above_2_63_is_malformed_in_stage_c(parties: Parties) -> None:
    # A uint64 the proto allows but no party's storage holds (docs/PROTOCOL.md §2.4).
    verified = verify_statement(
        _issue(parties.custodian, sequence=2**63 - 1),
        parties.registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience="exchange-1",
        now=T0,
    )
    assert verified.sequence == 2**63 - 1
    for sequence in (2**63, 2**64 - 1):
        with pytest.raises(MalformedError) as caught:
            verify_statement(
                _issue(parties.custodian, sequence=sequence),
                parties.registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience="exchange-1",
                now=T0,
            )
        assert caught.value.reason == errors_pb2.ERROR_REASON_OUT_OF_RANGE
        assert caught.value.metadata == {
            "field": "header.sequence",
            "expected": "<= 9223372036854775807",
            "actual": str(sequence),
        }
    # Any field of the statement, not only its header.
    statement = _holdings()
    statement.epoch = 2**64 - 1
    envelope = sign_statement(
        statement, parties.custodian, audience=("exchange-1",), sequence=1, ttl=TTL, issued_at=T0
    )
    with pytest.raises(MalformedError, match="epoch"):
        verify_statement(
            envelope,
            parties.registry,
            expected_type=attestation_pb2.HoldingsStatement,
            audience="exchange-1",
            now=T0,
        )
