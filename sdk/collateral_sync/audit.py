"""Offline verification of an audit bundle (``collateral-sync verify``).

An :class:`~collateral_sync.v1.audit_pb2.AuditBundle` holds a key registry,
checkpoints of one attestation log with consistency proofs between them,
attested statements with inclusion proofs, and further signed statements.
Verification needs no network and reproduces the relying party's decisions:
every statement is checked for the bundle's ``verifier_party_id`` at the time
it was relied on. The outcome is a :class:`AuditReport` listing every check;
one failed check makes the whole bundle refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from collateral_sync.attestation import statement_leaf, verify_checkpoint
from collateral_sync.errors import CollateralSyncError, MalformedError
from collateral_sync.keys import KeyRegistry
from collateral_sync.merkle import verify_consistency_proof, verify_inclusion_proof
from collateral_sync.signing import verify_statement, verify_threshold
from collateral_sync.statements import message_class_of
from collateral_sync.v1 import (
    attestation_pb2,
    audit_pb2,
    common_pb2,
    emergency_pb2,
    margin_pb2,
    reconciliation_pb2,
)
from collateral_sync.valuation import recompute_margin_call

__all__ = [
    "AuditCheck",
    "AuditReport",
    "load_audit_bundle",
    "save_audit_bundle",
    "verify_audit_bundle",
]

#: Emergency releases need signatures from two distinct parties among these roles.
EMERGENCY_RELEASE_THRESHOLD = 2
EMERGENCY_RELEASE_ROLES = frozenset(
    {
        common_pb2.PARTY_ROLE_REGULATOR,
        common_pb2.PARTY_ROLE_CUSTODIAN,
        common_pb2.PARTY_ROLE_EXCHANGE,
    }
)


@dataclass(frozen=True)
class AuditCheck:
    """One check and its outcome."""

    subject: str
    ok: bool
    detail: str
    reason: str = ""


@dataclass
class AuditReport:
    """Every check made on a bundle; ``ok`` only if all passed."""

    checks: list[AuditCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        out = [f"{'ok  ' if c.ok else 'FAIL'} {c.subject}: {c.detail}" for c in self.checks]
        passed = sum(c.ok for c in self.checks)
        verdict = "VERIFIED" if self.ok else "REFUSED"
        out.append(f"{verdict}: {passed} of {len(self.checks)} checks passed")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [
                {"subject": c.subject, "ok": c.ok, "detail": c.detail, "reason": c.reason}
                for c in self.checks
            ],
        }


def load_audit_bundle(path: str | Path) -> audit_pb2.AuditBundle:
    """Read a bundle as proto3 JSON (``.json``) or binary protobuf (anything else)."""
    data = Path(path).read_bytes()
    bundle = audit_pb2.AuditBundle()
    try:
        if str(path).endswith(".json"):
            json_format.Parse(data.decode("utf-8"), bundle)
        else:
            bundle.ParseFromString(data)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError) as err:
        raise MalformedError(f"{path}: not an AuditBundle: {err}") from err
    return bundle


def save_audit_bundle(bundle: audit_pb2.AuditBundle, path: str | Path) -> None:
    """Write a bundle as proto3 JSON (``.json``) or binary protobuf."""
    target = Path(path)
    if str(target).endswith(".json"):
        target.write_text(json_format.MessageToJson(bundle) + "\n")
    else:
        target.write_bytes(bundle.SerializeToString(deterministic=True))


def verify_audit_bundle(bundle: audit_pb2.AuditBundle) -> AuditReport:
    """Verify every piece of evidence in the bundle; never raises for bad evidence."""
    report = AuditReport()
    if not bundle.verifier_party_id or not bundle.log_origin:
        raise MalformedError(
            "bundle: expected verifier_party_id and log_origin, got "
            f"{bundle.verifier_party_id!r} and {bundle.log_origin!r}"
        )
    registry = KeyRegistry.from_proto(bundle.registry)
    audience = bundle.verifier_party_id

    checkpoints: dict[int, attestation_pb2.Checkpoint] = {}
    ordered: list[attestation_pb2.Checkpoint] = []
    for i, evidence in enumerate(bundle.checkpoints):
        subject = f"checkpoint[{i}]"

        def _check_checkpoint(evidence: audit_pb2.Evidence = evidence) -> str:
            checkpoint = verify_checkpoint(
                evidence.statement,
                registry,
                origin=bundle.log_origin,
                now=_relied_at(evidence),
            )
            if ordered and checkpoint.tree_size <= ordered[-1].tree_size:
                raise MalformedError(
                    f"expected tree size > {ordered[-1].tree_size}, got {checkpoint.tree_size}"
                )
            ordered.append(checkpoint)
            checkpoints[checkpoint.tree_size] = checkpoint
            return f"signed by the custodian, tree size {checkpoint.tree_size}"

        _run(report, subject, _check_checkpoint)

    if len(bundle.consistency_proofs) != max(len(ordered) - 1, 0):
        report.checks.append(
            AuditCheck(
                "consistency",
                False,
                f"expected {max(len(ordered) - 1, 0)} consistency proofs, got "
                f"{len(bundle.consistency_proofs)}",
                "PROOF_INVALID",
            )
        )
    else:
        for i, proof in enumerate(bundle.consistency_proofs):

            def _check_consistency(
                proof: attestation_pb2.ConsistencyProof = proof, i: int = i
            ) -> str:
                verify_consistency_proof(proof, ordered[i], ordered[i + 1])
                return f"tree size {ordered[i].tree_size} -> {ordered[i + 1].tree_size} append-only"

            _run(report, f"consistency[{i}]", _check_consistency)

    for i, evidence in enumerate(bundle.attested_statements):

        def _check_attested(evidence: audit_pb2.Evidence = evidence) -> str:
            kind = _verify_by_type(evidence, registry, audience)
            if not evidence.HasField("inclusion_proof"):
                raise MalformedError("expected an inclusion proof, got none")
            size = evidence.inclusion_proof.tree_size
            checkpoint = checkpoints.get(size)
            if checkpoint is None:
                raise MalformedError(
                    f"expected a verified checkpoint of tree size {size} in the bundle, got none"
                )
            verify_inclusion_proof(
                evidence.inclusion_proof, statement_leaf(evidence.statement), checkpoint
            )
            return f"{kind} included at leaf {evidence.inclusion_proof.leaf_index} of {size}"

        _run(report, f"attested_statement[{i}]", _check_attested)

    for i, evidence in enumerate(bundle.statements):

        def _check_statement(evidence: audit_pb2.Evidence = evidence) -> str:
            return _verify_by_type(evidence, registry, audience)

        _run(report, f"statement[{i}]", _check_statement)
    return report


def _verify_by_type(evidence: audit_pb2.Evidence, registry: KeyRegistry, audience: str) -> str:
    envelope = evidence.statement
    message_class = message_class_of(envelope.payload_type)
    now = _relied_at(evidence)
    if message_class is emergency_pb2.EmergencyRelease:
        release = verify_threshold(
            envelope,
            registry,
            expected_type=message_class,
            threshold=EMERGENCY_RELEASE_THRESHOLD,
            roles=EMERGENCY_RELEASE_ROLES,
            audience=audience,
            now=now,
        )
        parties = ", ".join(sorted(set(release.signer_party_ids)))
        return f"emergency release signed by {parties}"
    if message_class is margin_pb2.MarginCall:
        # A margin call is only as good as its arithmetic: recompute it from
        # the signed policy, holdings and prices it carries.
        check = recompute_margin_call(envelope, registry, audience=audience, now=now)
        call = check.margin_call
        return (
            f"MarginCall {call.margin_call_id} recomputed from its signed inputs: "
            f"ratio {check.collateral_ratio}, call amount {check.call_amount}"
        )
    verified = verify_statement(
        envelope, registry, expected_type=message_class, audience=audience, now=now
    )
    name = message_class.DESCRIPTOR.name
    if isinstance(verified.message, reconciliation_pb2.ReconciliationResult):
        return _check_reconciliation_result(verified.message, registry)
    return f"{name} #{verified.header.sequence} signed by {verified.header.issuer}"


def _check_reconciliation_result(
    result: reconciliation_pb2.ReconciliationResult, registry: KeyRegistry
) -> str:
    """The two statements compared must verify, and the outcome must fit them."""
    issued_at = result.header.issued_at.ToDatetime(tzinfo=UTC)
    sides = []
    for side, role in (
        ("custodian_statement", common_pb2.PARTY_ROLE_CUSTODIAN),
        ("exchange_statement", common_pb2.PARTY_ROLE_EXCHANGE),
    ):
        statement = verify_statement(
            getattr(result, side),
            registry,
            expected_type=reconciliation_pb2.ReconciliationStatement,
            audience=result.header.issuer,
            now=issued_at,
        ).message
        if statement.party_role != role or statement.cutoff_id != result.cutoff_id:
            raise MalformedError(
                f"{side}: expected a {common_pb2.PartyRole.Name(role)} statement for cut-off "
                f"{result.cutoff_id!r}, got {common_pb2.PartyRole.Name(statement.party_role)} "
                f"for {statement.cutoff_id!r}"
            )
        sides.append(statement)
    same_root = sides[0].positions_root == sides[1].positions_root
    matched = result.outcome == reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED
    if matched and (not same_root or result.breaks):
        raise MalformedError(
            "expected MATCHED only for equal position roots and no breaks, got "
            f"{'equal' if same_root else 'different'} roots and {len(result.breaks)} breaks"
        )
    if not matched and not result.breaks:
        raise MalformedError("expected the breaks of a BREAKS outcome, got none")
    outcome = reconciliation_pb2.ReconciliationOutcome.Name(result.outcome).removeprefix(
        "RECONCILIATION_OUTCOME_"
    )
    return (
        f"ReconciliationResult {result.cutoff_id}: {outcome}, {len(result.breaks)} "
        f"{'break' if len(result.breaks) == 1 else 'breaks'}, "
        "both parties' statements verify"
    )


def _relied_at(evidence: audit_pb2.Evidence) -> datetime:
    if not evidence.HasField("relied_at"):
        raise MalformedError("expected relied_at, got none")
    return evidence.relied_at.ToDatetime(tzinfo=UTC)


def _run(report: AuditReport, subject: str, check: Callable[[], str]) -> None:
    try:
        detail = check()
    except CollateralSyncError as err:
        report.checks.append(AuditCheck(subject, False, err.message, err.reason_name))
    else:
        report.checks.append(AuditCheck(subject, True, detail))
