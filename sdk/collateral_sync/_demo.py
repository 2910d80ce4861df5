"""``make demo``: the SDK walked end to end, for real, with readable output.

Keys and a registry; a custodian's signed holdings statements appended to a
durable attestation log; signed checkpoints; the exchange verifying
statements, inclusion proofs and the log's append-only growth; tampered,
expired, misdirected and rewritten evidence refused; and an audit bundle
exported and checked offline by the ``collateral-sync verify`` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from google.protobuf import timestamp_pb2

from collateral_sync.amounts import amount_to_proto
from collateral_sync.attestation import (
    AttestationLog,
    CheckpointMonitor,
    statement_leaf,
    verify_checkpoint,
)
from collateral_sync.audit import save_audit_bundle
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.merkle import verify_consistency_proof, verify_inclusion_proof
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.v1 import attestation_pb2, audit_pb2, common_pb2, envelope_pb2

ORIGIN = "custodian.example/collateral-sync/attestations"
CUSTODIAN, EXCHANGE, REGULATOR = "custodian-1", "exchange-1", "regulator-1"
ACCOUNT = "inst-7"
TTL = timedelta(hours=1)


def _say(title: str) -> None:
    print(f"\n== {title}")


def _ok(text: str) -> None:
    print(f"   ok      {text}")


def _refused(text: str, check: Callable[[], object]) -> None:
    try:
        check()
    except CollateralSyncError as err:
        print(f"   refused {text}: {err.code.name} {err.reason_name} - {err.message}")
        return
    raise SystemExit(f"demo failed: {text} was accepted")


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _holdings(
    account: str, epoch: int, positions: dict[str, tuple[str, str]]
) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement(
        account_id=account,
        exchange_id=EXCHANGE,
        epoch=epoch,
        reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
        positions=[
            common_pb2.Position(
                account_id=account,
                asset_id=asset,
                quantity=amount_to_proto(quantity),
                locked_quantity=amount_to_proto("0"),
                pledged_quantity=amount_to_proto(pledged),
            )
            for asset, (quantity, pledged) in positions.items()
        ],
    )


def run(workdir: Path) -> None:
    start = datetime.now(UTC).replace(microsecond=0)

    _say("1. Parties, keys and the key registry")
    custodian = SigningKey.generate(CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN)
    exchange = SigningKey.generate(EXCHANGE, common_pb2.PARTY_ROLE_EXCHANGE)
    regulator = SigningKey.generate(REGULATOR, common_pb2.PARTY_ROLE_REGULATOR)
    registry = KeyRegistry()
    for key in (custodian, exchange, regulator):
        registry.add(key.party_key(valid_from=start - timedelta(days=1)))
        _ok(f"{key.party_id:<12} Ed25519 key id {key.key_id[:16]}...")

    _say("2. The custodian attests holdings into its append-only log")
    log = AttestationLog(workdir / "attestations.sqlite", origin=ORIGIN)
    sequence = 0

    def attest(
        statement: attestation_pb2.HoldingsStatement, when: datetime
    ) -> tuple[envelope_pb2.Envelope, int]:
        nonlocal sequence
        sequence += 1
        envelope = sign_statement(
            statement, custodian, audience=[EXCHANGE], sequence=sequence, ttl=TTL, issued_at=when
        )
        return envelope, log.append(statement_leaf(envelope))

    for n in range(200):
        attest(_holdings(f"acct-{n:04d}", 1, {"USDC": ("1000", "1000")}), start)
    pledge, pledge_index = attest(
        _holdings(
            ACCOUNT,
            1,
            {
                "BTC": ("12.5", "12.5"),
                "USDC": ("2500000", "2000000"),
                "BENJI": ("750000.125", "750000.125"),
                "TSLAx": ("1800", "1800"),
            },
        ),
        start,
    )
    _ok(
        f"{ACCOUNT}: BTC 12.5, USDC 2,000,000 pledged, BENJI 750,000.125, TSLAx 1,800 (leaf {pledge_index})"
    )
    _ok(
        f"payload {len(pledge.payload)} bytes, signed once over DSSE PAE, type {pledge.payload_type}"
    )
    first = log.checkpoint(custodian, now=start, sequence=1, ttl=TTL)
    _ok(f"checkpoint 1 signed: tree size {log.size}, root {log.root().hex()[:16]}...")

    _say("3. The exchange verifies before it credits anything")
    verified = verify_statement(
        pledge,
        registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=EXCHANGE,
        now=start,
    )
    _ok(
        f"signature, key role, audience, freshness: {verified.message.account_id} epoch {verified.message.epoch}"
    )
    checkpoint_1 = verify_checkpoint(first, registry, origin=ORIGIN, now=start)
    monitor = CheckpointMonitor()
    monitor.advance(checkpoint_1, None)
    proof = log.inclusion_proof(pledge_index, checkpoint_1.tree_size)
    verify_inclusion_proof(proof, statement_leaf(pledge), checkpoint_1)
    _ok(
        f"RFC 9162 inclusion proof: leaf {proof.leaf_index} of {proof.tree_size}, {len(proof.audit_path)} hashes"
    )

    _say("4. The log grows: a top-up with accrued fund yield, then checkpoint 2")
    later = start + timedelta(minutes=5)
    top_up, top_up_index = attest(
        _holdings(
            ACCOUNT,
            2,
            {
                "BTC": ("12.5", "12.5"),
                "USDC": ("2500000", "2250000"),
                "BENJI": ("750020.675", "750020.675"),
                "TSLAx": ("1800", "1800"),
            },
        ),
        later,
    )
    second = log.checkpoint(custodian, now=later, sequence=2, ttl=TTL)
    checkpoint_2 = verify_checkpoint(second, registry, origin=ORIGIN, now=later)
    consistency = log.consistency_proof(checkpoint_1.tree_size, checkpoint_2.tree_size)
    verify_consistency_proof(consistency, checkpoint_1, checkpoint_2)
    monitor.advance(checkpoint_2, consistency)
    _ok(
        f"consistency proof {checkpoint_1.tree_size} -> {checkpoint_2.tree_size}: "
        f"{len(consistency.consistency_path)} hashes; history was only appended to"
    )

    _say("5. Bad evidence is refused, and nothing changes")
    tampered = envelope_pb2.Envelope()
    tampered.CopyFrom(pledge)
    tampered.payload = tampered.payload.replace(b"12.5", b"99.5", 1)
    _refused(
        "a holdings statement with BTC 12.5 edited to 99.5",
        lambda: verify_statement(
            tampered,
            registry,
            expected_type=attestation_pb2.HoldingsStatement,
            audience=EXCHANGE,
            now=start,
        ),
    )
    _refused(
        "the same statement presented to another exchange",
        lambda: verify_statement(
            pledge,
            registry,
            expected_type=attestation_pb2.HoldingsStatement,
            audience="exchange-2",
            now=start,
        ),
    )
    _refused(
        "the statement two hours later (expired)",
        lambda: verify_statement(
            pledge,
            registry,
            expected_type=attestation_pb2.HoldingsStatement,
            audience=EXCHANGE,
            now=start + timedelta(hours=2),
        ),
    )
    forged = sign_statement(
        _holdings(ACCOUNT, 3, {"BTC": ("1000", "1000")}),
        SigningKey.generate(CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN),
        audience=[EXCHANGE],
        sequence=99,
        ttl=TTL,
        issued_at=start,
    )
    _refused(
        "a statement signed by an unregistered key claiming to be the custodian",
        lambda: verify_statement(
            forged,
            registry,
            expected_type=attestation_pb2.HoldingsStatement,
            audience=EXCHANGE,
            now=start,
        ),
    )
    rewritten = AttestationLog(workdir / "rewritten.sqlite", origin=ORIGIN)
    for index in range(log.size):
        leaf = log.leaf(index)
        rewritten.append(leaf.replace(b"1000", b"9000") if index == 3 else leaf)
    rewritten.append(statement_leaf(top_up))
    fork = verify_checkpoint(
        rewritten.checkpoint(custodian, now=later, sequence=3, ttl=TTL),
        registry,
        origin=ORIGIN,
        now=later,
    )
    _refused(
        "a checkpoint of a log whose leaf 3 was rewritten",
        lambda: monitor.advance(
            fork, rewritten.consistency_proof(checkpoint_2.tree_size, fork.tree_size)
        ),
    )
    _ok(f"the exchange still trusts tree size {checkpoint_2.tree_size} with the original root")
    rewritten.close()

    _say("6. An auditor verifies the evidence offline")
    bundle = audit_pb2.AuditBundle(
        registry=registry.to_proto(),
        verifier_party_id=EXCHANGE,
        log_origin=ORIGIN,
        checkpoints=[
            audit_pb2.Evidence(statement=first, relied_at=_timestamp(start)),
            audit_pb2.Evidence(statement=second, relied_at=_timestamp(later)),
        ],
        consistency_proofs=[consistency],
        attested_statements=[
            audit_pb2.Evidence(
                statement=pledge, relied_at=_timestamp(start), inclusion_proof=proof
            ),
            audit_pb2.Evidence(
                statement=top_up,
                relied_at=_timestamp(later),
                inclusion_proof=log.inclusion_proof(top_up_index, checkpoint_2.tree_size),
            ),
        ],
    )
    log.close()
    bundle_path = workdir / "audit-bundle.json"
    save_audit_bundle(bundle, bundle_path)
    _ok(f"audit bundle written: {bundle_path}")
    _run_verify(bundle_path, expect=0)
    bundle.attested_statements[0].statement.payload = tampered.payload
    bad_path = workdir / "audit-bundle-tampered.json"
    save_audit_bundle(bundle, bad_path)
    _run_verify(bad_path, expect=1)

    print("\nDemo complete: every check above ran for real.")


def _run_verify(path: Path, *, expect: int) -> None:
    command = [sys.executable, "-m", "collateral_sync._cli", "verify", str(path)]
    print(f"   $ collateral-sync verify {path.name}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in (done.stdout + done.stderr).splitlines():
        print(f"     {line}")
    if done.returncode != expect:
        raise SystemExit(f"demo failed: verify exited {done.returncode}, expected {expect}")
    print(f"   exit code {done.returncode} (expected {expect})")


def main() -> None:
    keep = os.environ.get("COLLATERAL_SYNC_DEMO_DIR")
    if keep:
        workdir = Path(keep)
        workdir.mkdir(parents=True, exist_ok=True)
        run(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="collateral-sync-demo-") as tmp:
        run(Path(tmp))


if __name__ == "__main__":
    main()
