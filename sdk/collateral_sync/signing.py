"""Signed statements: issue them as DSSE-style envelopes, and verify them before acting.

A statement message is serialised once by its issuer (deterministic
serialisation) and signed with Ed25519 over the DSSE v1 pre-authentication
encoding :func:`pae` of its payload type and those exact bytes. Verifiers check
signatures over the bytes *as received*, before parsing them, and never
re-serialise: protobuf serialisation is not canonical across languages.

:func:`verify_statement` runs the checks in a fixed order and stops at the first
failure: structure, signature, parse and header shape, issuer key (party, role,
validity at issued_at), audience, freshness, replay. :func:`verify_threshold`
runs the same stages but requires valid signatures from ``threshold`` distinct
parties (emergency releases). Neither records anything: once the caller has
acted on a statement it calls ``replay_guard.record(verified)``, so input that
is refused later changes no state.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from collateral_sync._integers import check_integers
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import (
    KeyRegistry,
    _datetime_ns,
    _format_ns,
    _timestamp_is_valid,
    _timestamp_ns,
    _to_timestamp,
    role_name,
)
from collateral_sync.signer import Signer
from collateral_sync.statements import StatementType, statement_type_of
from collateral_sync.v1 import envelope_pb2, errors_pb2

__all__ = [
    "DEFAULT_MAX_SKEW",
    "MAX_PAYLOAD_BYTES",
    "MAX_SIGNATURES",
    "MemoryReplayGuard",
    "ReplayGuard",
    "VerifiedStatement",
    "add_signature",
    "pae",
    "sign_statement",
    "verify_statement",
    "verify_threshold",
]

M = TypeVar("M", bound=Message)

_R = errors_pb2.ErrorReason

#: Largest payload a verifier accepts by default (bytes).
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
#: Most signatures one envelope may carry; bounds the work a sender can demand.
MAX_SIGNATURES = 16
DEFAULT_MAX_SKEW = timedelta(seconds=30)

_SIGNATURE_BYTES = 64
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_ANYONE = "*"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of ``payload`` under ``payload_type``.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(payload) SP payload``, lengths as
    ASCII decimal byte counts (the type is UTF-8 encoded first).
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


# --- issuing ------------------------------------------------------------------


def sign_statement(
    message: Message,
    signer: Signer,
    *,
    audience: Sequence[str],
    sequence: int,
    ttl: timedelta,
    issued_at: datetime,
    statement_id: str | None = None,
) -> envelope_pb2.Envelope:
    """Issue ``message`` as a statement signed by ``signer``.

    Sets ``message.header`` (issuer, audience, sequence, issued_at,
    expires_at = issued_at + ttl, statement_id) in place, replacing any header
    it had, so the caller holds exactly what was signed; nothing is changed if
    an argument is refused. The payload is the message's deterministic
    serialisation, made once.
    """
    row = statement_type_of(message)
    if signer.role not in row.issuer_roles:
        expected = "|".join(sorted(role_name(r) for r in row.issuer_roles))
        raise VerificationError(
            f"a {role_name(signer.role)} key may not issue {row.payload_type}; "
            f"expected one of {expected}",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": expected, "actual": role_name(signer.role)},
        )
    if isinstance(audience, str):
        raise TypeError("audience must be a sequence of party ids, not one string")
    if not audience or any(not party for party in audience):
        raise MalformedError(
            f"audience must be non-empty party ids, got {list(audience)!r}",
            metadata={"expected": "non-empty party ids", "actual": repr(list(audience))},
        )
    if _ANYONE in audience and not row.public:
        raise MalformedError(
            f"audience '*' is only for public statements, not {row.payload_type}",
            reason=_R.ERROR_REASON_AUDIENCE_MISMATCH,
            metadata={"expected": "explicit party ids", "actual": _ANYONE},
        )
    if sequence < 1:
        raise MalformedError(
            f"sequence must be >= 1, got {sequence}",
            metadata={"expected": ">= 1", "actual": str(sequence)},
        )
    if ttl <= timedelta(0):
        raise MalformedError(
            f"ttl must be positive, got {ttl}", metadata={"expected": "> 0", "actual": str(ttl)}
        )
    header = envelope_pb2.StatementHeader(
        issuer=signer.party_id,
        audience=audience,
        sequence=sequence,
        statement_id=uuid.uuid4().hex if statement_id is None else statement_id,
    )
    header.issued_at.CopyFrom(_to_timestamp(issued_at))
    header.expires_at.CopyFrom(_to_timestamp(issued_at + ttl))
    message.header.CopyFrom(header)  # type: ignore[attr-defined]
    payload = message.SerializeToString(deterministic=True)
    signature = envelope_pb2.Signature(
        key_id=signer.key_id, sig=signer.sign(pae(row.payload_type, payload))
    )
    return envelope_pb2.Envelope(
        payload=payload, payload_type=row.payload_type, signatures=[signature]
    )


def add_signature(
    envelope: envelope_pb2.Envelope,
    signer: Signer,
    *,
    registry: KeyRegistry | None = None,
) -> envelope_pb2.Envelope:
    """A copy of ``envelope`` co-signed by ``signer`` (threshold statements).

    Refuses a second signature by the same key, or by the same party: the
    issuer named in the header, or, when ``registry`` is given, the party of
    any key already on the envelope. The co-signer should have verified the
    statement first; this function signs the received bytes as they are.
    """
    payload = envelope.payload
    for existing in envelope.signatures:
        if existing.key_id == signer.key_id:
            raise StateError(
                f"key {signer.key_id} has already signed this statement",
                metadata={"expected": "a key not yet on the envelope", "actual": signer.key_id},
            )
    parties = {_parse(statement_type_of(envelope.payload_type), payload).header.issuer}
    if registry is not None:
        for existing in envelope.signatures:
            known = registry.get(existing.key_id)
            if known is not None:
                parties.add(known.party_id)
    if signer.party_id in parties:
        raise StateError(
            f"party {signer.party_id!r} has already signed this statement",
            metadata={"expected": "a party not yet on the envelope", "actual": signer.party_id},
        )
    cosigned = envelope_pb2.Envelope()
    cosigned.CopyFrom(envelope)
    cosigned.signatures.add(
        key_id=signer.key_id, sig=signer.sign(pae(envelope.payload_type, payload))
    )
    return cosigned


# --- verification result and replay -----------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedStatement(Generic[M]):
    """A statement that passed verification, with what it was verified from."""

    message: M
    header: envelope_pb2.StatementHeader
    payload_type: str
    #: The payload bytes exactly as received and signed.
    payload: bytes
    #: Key ids of the signatures that counted (the issuer's first), and their parties.
    signer_key_ids: tuple[str, ...]
    signer_party_ids: tuple[str, ...]
    envelope: envelope_pb2.Envelope

    @property
    def issuer(self) -> str:
        return self.header.issuer

    @property
    def sequence(self) -> int:
        return self.header.sequence


class ReplayGuard(Protocol):
    """Remembers the last sequence accepted per (issuer, payload type)."""

    def check(self, issuer: str, payload_type: str, sequence: int) -> None:
        """Raise VerificationError(REPLAYED) if ``sequence`` was already passed."""

    def record(self, statement: VerifiedStatement[Any]) -> None:
        """Remember that ``statement`` was acted on."""


class MemoryReplayGuard:
    """An in-memory :class:`ReplayGuard` (thread-safe)."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def last_sequence(self, issuer: str, payload_type: str) -> int:
        """Highest sequence recorded for (issuer, payload type); 0 if none."""
        return self._last.get((issuer, payload_type), 0)

    def check(self, issuer: str, payload_type: str, sequence: int) -> None:
        _check_fresh_sequence(self.last_sequence(issuer, payload_type), issuer, sequence)

    def record(self, statement: VerifiedStatement[Any]) -> None:
        """Remember ``statement``; refuse it (REPLAYED) if a later one was recorded meanwhile."""
        key = (statement.issuer, statement.payload_type)
        with self._lock:
            _check_fresh_sequence(self._last.get(key, 0), statement.issuer, statement.sequence)
            self._last[key] = statement.sequence


def _check_fresh_sequence(last: int, issuer: str, sequence: int) -> None:
    if sequence <= last:
        raise VerificationError(
            f"sequence {sequence} from {issuer!r} was already accepted "
            f"(last accepted {last}); expected > {last}",
            reason=_R.ERROR_REASON_REPLAYED,
            metadata={"expected": f"> {last}", "actual": str(sequence)},
        )


# --- verification -----------------------------------------------------------------


def verify_statement(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    expected_type: type[M],
    audience: str,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    replay_guard: ReplayGuard | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> VerifiedStatement[M]:
    """Verify a statement signed by its issuer, addressed to ``audience``, fresh at ``now``.

    Raises MalformedError, VerificationError or CollateralSyncError(TOO_LARGE)
    at the first stage that fails (see the module docstring).
    """
    row = statement_type_of(expected_type)
    payload, verified = _verify_signatures(envelope, registry, row, max_payload_bytes)
    message = _parse(row, payload)
    header: envelope_pb2.StatementHeader = message.header
    issuer_kid = _issuer_key(registry, verified, header, row.issuer_roles)
    return _accept(
        envelope,
        row,
        payload,
        message,
        signers=[(issuer_kid, header.issuer)],
        audience=audience,
        now=now,
        max_skew=max_skew,
        replay_guard=replay_guard,
    )


def verify_threshold(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    expected_type: type[M],
    threshold: int,
    roles: Collection[int],
    audience: str,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    replay_guard: ReplayGuard | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> VerifiedStatement[M]:
    """Verify a statement that needs valid signatures from ``threshold`` distinct parties.

    A signature counts if it verifies and its key is registered in one of
    ``roles`` and valid at the statement's issued_at; several signatures by one
    party count once; invalid or unknown signatures count for nothing but do
    not fail the statement by themselves. The issuer must be one of the
    counted parties, with a key allowed to issue this type. Fewer than
    ``threshold`` parties raise THRESHOLD_NOT_MET.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    row = statement_type_of(expected_type)
    payload, verified = _verify_signatures(envelope, registry, row, max_payload_bytes)
    message = _parse(row, payload)
    header: envelope_pb2.StatementHeader = message.header
    counted: dict[str, str] = {}  # party id -> key id of its first counted signature
    for kid in verified:
        try:
            key = registry.resolve(kid, at=header.issued_at, roles=roles)
        except VerificationError:
            continue
        counted.setdefault(key.party_id, kid)
    if len(counted) < threshold:
        raise VerificationError(
            f"valid signatures from {len(counted)} distinct parties, expected {threshold}",
            reason=_R.ERROR_REASON_THRESHOLD_NOT_MET,
            metadata={"expected": str(threshold), "actual": str(len(counted))},
        )
    _issuer_key(registry, verified, header, row.issuer_roles)
    issuer_kid = counted.get(header.issuer)
    if issuer_kid is None:
        # The issuer signed with a key fit to issue, but not in one of ``roles``.
        counted_parties = ",".join(sorted(counted))
        raise VerificationError(
            f"issuer {header.issuer!r} is not among the counted signers [{counted_parties}]",
            reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata={"expected": header.issuer, "actual": counted_parties},
        )
    # Issuer first, then the other parties in signature order.
    others = [(kid, party) for party, kid in counted.items() if party != header.issuer]
    return _accept(
        envelope,
        row,
        payload,
        message,
        signers=[(issuer_kid, header.issuer), *others],
        audience=audience,
        now=now,
        max_skew=max_skew,
        replay_guard=replay_guard,
    )


def _issuer_key(
    registry: KeyRegistry,
    verified: Sequence[str],
    header: envelope_pb2.StatementHeader,
    issuer_roles: Collection[int],
) -> str:
    """Stage d: the first verified key that may issue for ``header.issuer`` at issued_at.

    If none may, the error reported is about the issuer's own key when it
    signed (revoked, not valid, wrong role), else about the first signer.
    """
    own_error: VerificationError | None = None
    other_error: VerificationError | None = None
    for kid in verified:
        try:
            registry.resolve(kid, at=header.issued_at, roles=issuer_roles, party_id=header.issuer)
        except VerificationError as err:
            key = registry.get(kid)
            if key is not None and key.party_id == header.issuer:
                own_error = own_error or err
            else:
                other_error = other_error or err
            continue
        return kid
    # _verify_signatures never returns an empty list; the last fallback is for type checkers.
    raise own_error or other_error or VerificationError("no verified signature")


def _verify_signatures(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    row: StatementType,
    max_payload_bytes: int,
) -> tuple[bytes, list[str]]:
    """Stages a and b: structure, then signatures over the received bytes.

    Returns the payload and the key ids whose signatures verified (at least one).
    """
    payload_type = envelope.payload_type
    if payload_type != row.payload_type:
        raise MalformedError(
            f"payload type {payload_type!r}, expected {row.payload_type!r}",
            reason=_R.ERROR_REASON_PAYLOAD_TYPE_MISMATCH,
            metadata={"expected": row.payload_type, "actual": payload_type},
        )
    payload = envelope.payload  # read once: each field access copies the bytes
    if len(payload) > max_payload_bytes:
        raise CollateralSyncError(
            f"payload of {len(payload)} bytes, limit {max_payload_bytes}",
            reason=_R.ERROR_REASON_TOO_LARGE,
            metadata={"expected": f"<= {max_payload_bytes}", "actual": str(len(payload))},
        )
    signatures = [(s.key_id, s.sig) for s in envelope.signatures]
    if not 1 <= len(signatures) <= MAX_SIGNATURES:
        raise MalformedError(
            f"envelope carries {len(signatures)} signatures, expected 1..{MAX_SIGNATURES}",
            metadata={"expected": f"1..{MAX_SIGNATURES}", "actual": str(len(signatures))},
        )
    for index, (kid, sig) in enumerate(signatures):
        if len(sig) != _SIGNATURE_BYTES:
            raise MalformedError(
                f"signature {index} is {len(sig)} bytes, expected {_SIGNATURE_BYTES}",
                metadata={"expected": str(_SIGNATURE_BYTES), "actual": str(len(sig))},
                field_violations={f"signatures[{index}].sig": "must be 64 bytes"},
            )
        if _KEY_ID.fullmatch(kid) is None:
            raise MalformedError(
                f"signature {index} key id {kid!r} is not 64 lowercase hex digits",
                metadata={"expected": "64 lowercase hex digits", "actual": kid},
                field_violations={f"signatures[{index}].key_id": "must be 64 lowercase hex"},
            )

    signed = pae(payload_type, payload)
    verified: list[str] = []
    known = 0
    for kid, sig in signatures:
        if kid not in registry:
            continue
        known += 1
        if kid not in verified and registry.verify_signature(kid, signed, sig):
            verified.append(kid)
    if not known:
        kids = ",".join(kid for kid, _ in signatures)
        raise VerificationError(
            f"no signature is by a registered key (key ids {kids})",
            reason=_R.ERROR_REASON_KEY_UNKNOWN,
            metadata={"expected": "a registered key id", "actual": kids},
        )
    if not verified:
        raise VerificationError(
            f"none of {known} signatures by registered keys verifies over the payload",
            reason=_R.ERROR_REASON_SIGNATURE_INVALID,
            metadata={"expected": "a valid signature", "actual": f"{known} invalid"},
        )
    return payload, verified


def _parse(row: StatementType, payload: bytes) -> Any:
    """Stage c: parse the (already authenticated) payload and check the header's shape."""
    message = row.message_class()
    try:
        message.ParseFromString(payload)
    except DecodeError as err:
        raise MalformedError(
            f"payload does not parse as {row.message_class.__name__}: {err}",
            metadata={"expected": row.message_class.__name__, "actual": "undecodable bytes"},
        ) from err
    if not message.HasField("header"):
        raise MalformedError(
            "statement has no header",
            metadata={"expected": "header", "actual": "unset"},
            field_violations={"header": "required"},
        )
    header: envelope_pb2.StatementHeader = message.header  # type: ignore[attr-defined]
    problem: tuple[str, str, str] | None = None  # field, expected, actual
    if not header.issuer:
        problem = ("header.issuer", "non-empty party id", "")
    elif header.sequence < 1:
        problem = ("header.sequence", ">= 1", str(header.sequence))
    elif not header.HasField("issued_at") or not _timestamp_is_valid(header.issued_at):
        problem = ("header.issued_at", "valid timestamp", _stamp_text(header, "issued_at"))
    elif not header.HasField("expires_at") or not _timestamp_is_valid(header.expires_at):
        problem = ("header.expires_at", "valid timestamp", _stamp_text(header, "expires_at"))
    elif _timestamp_ns(header.expires_at) <= _timestamp_ns(header.issued_at):
        problem = (
            "header.expires_at",
            f"after issued_at {header.issued_at.ToJsonString()}",
            header.expires_at.ToJsonString(),
        )
    if problem is not None:
        field, expected, actual = problem
        raise MalformedError(
            f"{field} must be {expected}, got {actual!r}",
            metadata={"expected": expected, "actual": actual},
            field_violations={field: f"must be {expected}"},
        )
    # Last in stage c: no integer above 2^63 - 1 may reach anyone's storage (§2.4).
    check_integers(message)
    return message


def _stamp_text(header: envelope_pb2.StatementHeader, name: str) -> str:
    if not header.HasField(name):  # type: ignore[arg-type]
        return "unset"
    stamp = getattr(header, name)
    return f"seconds={stamp.seconds} nanos={stamp.nanos}"


def _accept(
    envelope: envelope_pb2.Envelope,
    row: StatementType,
    payload: bytes,
    message: M,
    *,
    signers: Sequence[tuple[str, str]],
    audience: str,
    now: datetime,
    max_skew: timedelta,
    replay_guard: ReplayGuard | None,
) -> VerifiedStatement[M]:
    """Stages e to g (audience, freshness, replay), then the result."""
    header: envelope_pb2.StatementHeader = message.header  # type: ignore[attr-defined]
    addressed = header.audience
    # A non-public statement addressed to everyone is refused even if it also names us.
    matched = (
        row.public if _ANYONE in addressed else (audience != _ANYONE and audience in addressed)
    )
    if not matched:
        actual = ",".join(addressed)
        why = (
            f"'*' is not allowed for {row.payload_type}"
            if _ANYONE in addressed
            else f"{audience!r} is not in the audience [{actual}]"
        )
        raise VerificationError(
            why,
            reason=_R.ERROR_REASON_AUDIENCE_MISMATCH,
            metadata={"expected": audience, "actual": actual},
        )

    now_ns = _datetime_ns(now)
    skew_ns = _timedelta_ns(max_skew)
    issued_ns = _timestamp_ns(header.issued_at)
    if issued_ns > now_ns + skew_ns:
        limit = _format_ns(now_ns + skew_ns)
        raise VerificationError(
            f"issued at {_format_ns(issued_ns)}, after now plus skew {limit}",
            reason=_R.ERROR_REASON_STATEMENT_NOT_YET_VALID,
            metadata={"expected": f"<= {limit}", "actual": _format_ns(issued_ns)},
        )
    expires_ns = _timestamp_ns(header.expires_at)
    if now_ns > expires_ns + skew_ns:
        limit = _format_ns(expires_ns + skew_ns)
        raise VerificationError(
            f"expired at {_format_ns(expires_ns)}; now {_format_ns(now_ns)} is past {limit}",
            reason=_R.ERROR_REASON_STATEMENT_EXPIRED,
            metadata={"expected": f"<= {limit}", "actual": _format_ns(now_ns)},
        )

    if replay_guard is not None:
        replay_guard.check(header.issuer, row.payload_type, header.sequence)
    return VerifiedStatement(
        message=message,
        header=header,
        payload_type=row.payload_type,
        payload=payload,
        signer_key_ids=tuple(kid for kid, _ in signers),
        signer_party_ids=tuple(party for _, party in signers),
        envelope=envelope,
    )


def _timedelta_ns(value: timedelta) -> int:
    return (value.days * 86_400 + value.seconds) * 1_000_000_000 + value.microseconds * 1_000
