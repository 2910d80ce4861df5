"""Reference exchanges and regulators that co-sign emergency releases they should refuse.

The co-signer (``collateral_sync_reference.common.emergency``) is shared by the
custodian, the exchange and the regulator; each patch here breaks exactly one
rule of docs/PROTOCOL.md §11.2 in it (or in a role's policy), so that the
``emergency/cosign/`` case written for that rule is the one that must catch it
(tests/conformance/test_kit_cosign.py). Like :mod:`.broken_servers`, whose
patches for the same kind of fault are reused here, it runs the ordinary
server command line in the same process::

    python tests/conformance/broken_cosigners.py FAULT serve exchange --config FILE ...

The faults live apart from :data:`.broken_servers.FAULTS` because that table is
required to be tested, fault for fault, by test_kit_broken_servers.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from collateral_sync._cli import main as cli_main
from collateral_sync.errors import CollateralSyncError, VerificationError
from collateral_sync.signing import VerifiedStatement
from collateral_sync.v1 import emergency_pb2, envelope_pb2, errors_pb2
from collateral_sync_reference.common import emergency as _cosigner_module
from collateral_sync_reference.exchange import role as _exchange_module
from collateral_sync_reference.regulator import role as _regulator_module

try:
    from . import broken_servers as _broken
except ImportError:  # run as a script: the launcher's own directory is on sys.path
    import broken_servers as _broken  # type: ignore[import-not-found,no-redef]

# Patched by name: what they import is their business, so they are typed loosely here.
_cosigner: Any = _cosigner_module
_exchange: Any = _exchange_module
_regulator: Any = _regulator_module

__all__ = ["FAULTS", "main"]

_R = errors_pb2.ErrorReason


def _unverified(envelope: envelope_pb2.Envelope) -> VerifiedStatement[Any]:
    """The release as if it had verified, its header's issuer taken at its word."""
    release = emergency_pb2.EmergencyRelease.FromString(envelope.payload)
    return VerifiedStatement(
        message=release,
        header=release.header,
        payload_type=envelope.payload_type,
        payload=envelope.payload,
        signer_key_ids=tuple(s.key_id for s in envelope.signatures[:1]),
        signer_party_ids=(release.header.issuer,),
        envelope=envelope,
    )


def _verify_anyway(reason: int) -> None:
    """``verify_statement`` in the co-signer: a refusal for ``reason`` becomes a pass."""
    original = _cosigner.verify_statement

    def verify_statement(envelope: Any, registry: Any, **kwargs: Any) -> Any:
        try:
            return original(envelope, registry, **kwargs)
        except VerificationError as err:
            if err.reason != reason:
                raise
            return _unverified(envelope)

    _cosigner.verify_statement = verify_statement


def _parties_of(envelope: Any, registry: Any) -> list[str]:
    """Parties of the registered keys on ``envelope`` whose signatures verify."""
    signed = _cosigner.pae(envelope.payload_type, envelope.payload)
    return [
        key.party_id
        for signature in envelope.signatures
        if (key := registry.get(signature.key_id)) is not None
        and registry.verify_signature(signature.key_id, signed, signature.sig)
    ]


def _skips_signature_checks() -> None:
    """Signatures that do not verify are ignored, the proposer's included: a forgery is co-signed.

    The roles of the signatures that do verify are still checked.
    """
    _verify_anyway(_R.ERROR_REASON_SIGNATURE_INVALID)
    original = _cosigner.check_release_signatures

    def check_release_signatures(envelope: Any, registry: Any, issued_at: Any) -> list[str]:
        signed = _cosigner.pae(envelope.payload_type, envelope.payload)
        valid = envelope_pb2.Envelope()
        valid.CopyFrom(envelope)
        del valid.signatures[:]
        valid.signatures.extend(
            s
            for s in envelope.signatures
            if s.key_id in registry and registry.verify_signature(s.key_id, signed, s.sig)
        )
        return list(original(valid, registry, issued_at))

    _cosigner.check_release_signatures = check_release_signatures


def _unregistered_cosigner_as_key_unknown() -> None:
    """A signature by a key id the registry does not hold is refused KEY_UNKNOWN, as if its
    signer were an unknown issuer; §11 step 2 makes it SIGNATURE_INVALID (unverifiable)."""
    original = _cosigner.check_release_signatures

    def check_release_signatures(envelope: Any, registry: Any, issued_at: Any) -> list[str]:
        for signature in envelope.signatures:
            if signature.key_id not in registry:
                raise VerificationError(
                    f"signature by key {signature.key_id}, which is not registered",
                    reason=_R.ERROR_REASON_KEY_UNKNOWN,
                    metadata={"expected": "a registered key", "actual": signature.key_id},
                )
        return list(original(envelope, registry, issued_at))

    _cosigner.check_release_signatures = check_release_signatures


def _ignores_key_roles() -> None:
    """Any registered key may propose or sign a release: a client's signature is co-signed."""
    _verify_anyway(_R.ERROR_REASON_KEY_ROLE_MISMATCH)
    original = _cosigner.check_release_signatures

    def check_release_signatures(envelope: Any, registry: Any, issued_at: Any) -> list[str]:
        try:
            return list(original(envelope, registry, issued_at))
        except VerificationError as err:
            if err.reason != _R.ERROR_REASON_KEY_ROLE_MISMATCH:
                raise
            return _parties_of(envelope, registry)

    _cosigner.check_release_signatures = check_release_signatures


def _keeps_replay_state() -> None:
    """A proposal co-signed once is refused as REPLAYED when it comes again (a lost answer's retry)."""
    cosigner = _cosigner.EmergencyReleaseCoSigner
    original = cosigner.cosign
    seen: set[tuple[str, str]] = set()

    def cosign(self: Any, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        signed = original(self, envelope)
        header = emergency_pb2.EmergencyRelease.FromString(envelope.payload).header
        key = (header.issuer, header.statement_id)
        if key in seen:
            raise CollateralSyncError(
                f"release statement {header.statement_id!r} was co-signed before",
                reason=_R.ERROR_REASON_REPLAYED,
                metadata={"expected": "a statement not seen before", "actual": key[1]},
            )
        seen.add(key)
        return signed

    cosigner.cosign = cosign


def _reencodes_payload() -> None:
    """The co-signer signs its own re-encoding of the release (unknown fields dropped), not the bytes it got."""
    cosigner = _cosigner.EmergencyReleaseCoSigner
    original = cosigner.cosign

    def cosign(self: Any, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        signed: envelope_pb2.Envelope = original(self, envelope)
        release = emergency_pb2.EmergencyRelease.FromString(signed.payload)
        release.DiscardUnknownFields()
        payload = release.SerializeToString(deterministic=True)
        if payload == signed.payload:
            return signed
        reencoded = envelope_pb2.Envelope()
        reencoded.CopyFrom(signed)
        reencoded.payload = payload
        own = reencoded.signatures[-1]
        own.sig = self._signer.sign(_cosigner.pae(signed.payload_type, payload))
        return reencoded

    cosigner.cosign = cosign


def _has_no_policy() -> None:
    """The exchange and the regulator co-sign any release that verifies: no policy at all."""

    def agree(verified: Any) -> None:
        return None

    _exchange.exchange_release_policy = lambda core: agree
    _regulator.RegulatorRole._cosign_policy = lambda self, verified: agree(verified)


#: Fault name -> the patch that introduces it.
FAULTS: dict[str, Callable[[], None]] = {
    "cosigner-skips-signature-checks": _skips_signature_checks,
    "cosigner-ignores-key-roles": _ignores_key_roles,
    "cosigner-unregistered-key-as-key-unknown": _unregistered_cosigner_as_key_unknown,
    "cosigner-cosigns-twice": _broken.FAULTS["custodian-cosigns-twice"],
    "cosigner-ignores-expiry": lambda: _broken._lenient_verify(
        _cosigner, "ERROR_REASON_STATEMENT_EXPIRED", _broken._at_issue
    ),
    "cosigner-ignores-audience": lambda: _broken._lenient_verify(
        _cosigner, "ERROR_REASON_AUDIENCE_MISMATCH", _broken._to_anyone
    ),
    "cosigner-keeps-replay-state": _keeps_replay_state,
    "cosigner-reencodes-payload": _reencodes_payload,
    "cosigner-malformed-as-failed-precondition": _broken.FAULTS[
        "custodian-malformed-as-failed-precondition"
    ],
    "cosigner-drops-error-info": _broken.FAULTS["exchange-drops-error-info"],
    "cosigner-has-no-policy": _has_no_policy,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in FAULTS:
        sys.stderr.write(f"usage: broken_cosigners.py {{{'|'.join(FAULTS)}}} serve ROLE ...\n")
        return 2
    FAULTS[args[0]]()
    return cli_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
