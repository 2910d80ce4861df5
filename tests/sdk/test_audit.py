"""Offline audit of statements whose meaning goes beyond their signature:
margin calls are recomputed, reconciliation results checked against the two
statements they compared."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from collateral_sync.audit import verify_audit_bundle
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import audit_pb2, common_pb2, envelope_pb2, reconciliation_pb2
from google.protobuf import timestamp_pb2
from test_valuation import ASSET_CLASSES, CUSTODIAN, T0, Parties, issue_call, seed_policy

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _stamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _bundle(
    registry: KeyRegistry, verifier: str, statement: envelope_pb2.Envelope, at: datetime
) -> audit_pb2.AuditBundle:
    return audit_pb2.AuditBundle(
        registry=registry.to_proto(),
        verifier_party_id=verifier,
        log_origin="custodian-1/attestations",
        statements=[audit_pb2.Evidence(statement=statement, relied_at=_stamp(at))],
    )


def _call(parties: Parties, **figures: str) -> envelope_pb2.Envelope:
    # A policy that names each asset's class: the call recomputes from signed data alone.
    policy = seed_policy()
    policy.assets.extend(
        common_pb2.Asset(asset_id=a, asset_class=c) for a, c in ASSET_CLASSES.items()
    )
    signed_policy = parties.sign(policy, parties.exchange, ["*"], T0 - timedelta(days=1))
    return issue_call(parties, policy_envelope=signed_policy, figures=figures or None)


def test_margin_call_in_a_bundle_is_recomputed() -> None:
    parties = Parties()
    report = verify_audit_bundle(
        _bundle(parties.registry, CUSTODIAN, _call(parties), T0 + timedelta(minutes=1))
    )
    assert report.ok, report.lines()
    assert "recomputed from its signed inputs" in report.checks[0].detail
    assert "call amount 33.03" in report.checks[0].detail


def test_margin_call_with_inflated_amount_is_refused() -> None:
    parties = Parties()
    envelope = _call(parties, call_amount="33.04")
    report = verify_audit_bundle(
        _bundle(parties.registry, CUSTODIAN, envelope, T0 + timedelta(minutes=1))
    )
    assert not report.ok
    assert report.checks[0].reason == "PROOF_INVALID"


def _recon_parties() -> tuple[SigningKey, SigningKey, SigningKey, KeyRegistry]:
    custodian = SigningKey.from_seed(b"\x11" * 32, "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN)
    exchange = SigningKey.from_seed(b"\x12" * 32, "exchange-1", common_pb2.PARTY_ROLE_EXCHANGE)
    regulator = SigningKey.from_seed(b"\x13" * 32, "regulator-1", common_pb2.PARTY_ROLE_REGULATOR)
    registry = KeyRegistry()
    for key in (custodian, exchange, regulator):
        registry.add(key.party_key(valid_from=NOW - timedelta(days=1)))
    return custodian, exchange, regulator, registry


def _result(
    *, exchange_root: bytes, outcome: int, breaks: int
) -> tuple[envelope_pb2.Envelope, KeyRegistry]:
    custodian, exchange, regulator, registry = _recon_parties()
    statements = []
    for signer, role, root in (
        (custodian, common_pb2.PARTY_ROLE_CUSTODIAN, b"\x01" * 32),
        (exchange, common_pb2.PARTY_ROLE_EXCHANGE, exchange_root),
    ):
        statement = reconciliation_pb2.ReconciliationStatement(
            cutoff_id="2026-11-23T12:00:00Z", party_role=role, account_count=3, positions_root=root
        )
        statements.append(
            sign_statement(
                statement,
                signer,
                audience=["regulator-1"],
                sequence=1,
                ttl=timedelta(hours=1),
                issued_at=NOW,
            )
        )
    result = reconciliation_pb2.ReconciliationResult(
        cutoff_id="2026-11-23T12:00:00Z",
        outcome=outcome,
        breaks=[
            reconciliation_pb2.ReconciliationBreak(account_id=f"acct-{n}", asset_id="USDC")
            for n in range(breaks)
        ],
        custodian_statement=statements[0],
        exchange_statement=statements[1],
    )
    envelope = sign_statement(
        result, regulator, audience=["*"], sequence=1, ttl=timedelta(hours=1), issued_at=NOW
    )
    return envelope, registry


def test_matched_reconciliation_result_verifies_with_its_statements() -> None:
    envelope, registry = _result(
        exchange_root=b"\x01" * 32,
        outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED,
        breaks=0,
    )
    report = verify_audit_bundle(_bundle(registry, "custodian-1", envelope, NOW))
    assert report.ok, report.lines()
    assert "MATCHED, 0 breaks" in report.checks[0].detail


def test_matched_result_over_different_roots_is_refused() -> None:
    envelope, registry = _result(
        exchange_root=b"\x02" * 32,
        outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED,
        breaks=0,
    )
    report = verify_audit_bundle(_bundle(registry, "custodian-1", envelope, NOW))
    assert not report.ok
    assert "different roots" in report.checks[0].detail


def test_breaks_outcome_without_breaks_is_refused() -> None:
    envelope, registry = _result(
        exchange_root=b"\x02" * 32,
        outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS,
        breaks=0,
    )
    report = verify_audit_bundle(_bundle(registry, "custodian-1", envelope, NOW))
    assert not report.ok
    envelope, registry = _result(
        exchange_root=b"\x02" * 32,
        outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS,
        breaks=2,
    )
    assert verify_audit_bundle(_bundle(registry, "custodian-1", envelope, NOW)).ok
