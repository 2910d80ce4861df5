"""``collateral-sync bench``: SDK figures beside baselines measured in the same run.

Suites: ``sdk`` (here), ``sync`` (position sync and margin-call latency
between two processes, in :mod:`collateral_sync_benchmarks.sync`) and ``recon``
(reconciliation of a million accounts across three processes, in
:mod:`collateral_sync_benchmarks.reconciliation`).

Each figure is printed with its baseline (raw PyNaCl for signatures, raw
pymerkle for the log and proofs) and the ratio between them, because the
machines are shared and noisy: only same-run ratios are comparable. Targets
from the brief: log overhead <= 25% over pymerkle alone at 1,000,000
statements; inclusion proof generation and verification <= 0.2 ms each.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import nacl.signing
import pymerkle
from collateral_sync.amounts import amount_to_proto
from collateral_sync.attestation import AttestationLog
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.merkle import verify_consistency_proof, verify_inclusion_proof
from collateral_sync.signing import pae, sign_statement, verify_statement
from collateral_sync.v1 import attestation_pb2, common_pb2

__all__ = ["run_benchmarks"]

FULL_LOG_SIZE = 1_000_000
FULL_SIGNATURES = 20_000
PROOF_SAMPLES = 2_000
LOG_REPEATS = 3


@dataclass(frozen=True)
class _Row:
    name: str
    value: float
    unit: str
    baseline_name: str
    baseline: float
    target: str = ""

    def render(self) -> str:
        ratio = self.value / self.baseline if self.baseline else float("nan")
        line = (
            f"  {self.name:<38} {self.value:>12,.3f} {self.unit:<9}"
            f" | {self.baseline_name:<30} {self.baseline:>12,.3f} {self.unit:<9} ratio {ratio:5.2f}"
        )
        return f"{line}  [{self.target}]" if self.target else line


def _rate(count: int, fn: Callable[[], None]) -> float:
    gc.collect()
    begin = time.perf_counter()
    fn()
    return count / (time.perf_counter() - begin)


def _per_op_ms(samples: list[Callable[[], object]]) -> tuple[float, float]:
    """Median and p99 milliseconds of running each sample once."""
    timings = []
    for sample in samples:
        begin = time.perf_counter_ns()
        sample()
        timings.append((time.perf_counter_ns() - begin) / 1e6)
    timings.sort()
    return statistics.median(timings), timings[min(len(timings) - 1, int(len(timings) * 0.99))]


def _statement(n: int) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement(
        account_id=f"acct-{n:07d}",
        exchange_id="exchange-1",
        epoch=1,
        positions=[
            common_pb2.Position(
                account_id=f"acct-{n:07d}",
                asset_id="USDC",
                quantity=amount_to_proto(str(1000 + n)),
                locked_quantity=amount_to_proto("0"),
                pledged_quantity=amount_to_proto(str(1000 + n)),
            )
        ],
    )


def _bench_signatures(count: int, now: datetime) -> list[_Row]:
    custodian = SigningKey.from_seed(
        bytes(range(32)), "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN
    )
    registry = KeyRegistry()
    registry.add(custodian.party_key(valid_from=now - timedelta(days=1)))
    statements = [_statement(n) for n in range(count)]
    envelopes = []

    def sdk_sign() -> None:
        for n, message in enumerate(statements):
            envelopes.append(
                sign_statement(
                    message,
                    custodian,
                    audience=["exchange-1"],
                    sequence=n + 1,
                    ttl=timedelta(hours=1),
                    issued_at=now,
                )
            )

    sdk_sign_rate = _rate(count, sdk_sign)
    signing_inputs = [pae(e.payload_type, e.payload) for e in envelopes]
    raw_key = nacl.signing.SigningKey(bytes(range(32)))
    raw_signatures: list[bytes] = []

    def raw_sign() -> None:
        for data in signing_inputs:
            raw_signatures.append(raw_key.sign(data).signature)

    raw_sign_rate = _rate(count, raw_sign)

    def sdk_verify() -> None:
        for envelope in envelopes:
            verify_statement(
                envelope,
                registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience="exchange-1",
                now=now,
            )

    raw_verify_key = raw_key.verify_key

    def raw_verify() -> None:
        for data, signature in zip(signing_inputs, raw_signatures, strict=True):
            raw_verify_key.verify(data, signature)

    sdk_verify_rate = _rate(count, sdk_verify)
    raw_verify_rate = _rate(count, raw_verify)
    return [
        _Row(
            "sign_statement (serialise+PAE+sign)",
            sdk_sign_rate,
            "ops/s",
            "raw PyNaCl sign",
            raw_sign_rate,
        ),
        _Row(
            "verify_statement (all 7 stages)",
            sdk_verify_rate,
            "ops/s",
            "raw PyNaCl verify",
            raw_verify_rate,
        ),
    ]


def _leaves(count: int) -> list[bytes]:
    # Realistic leaf bytes: PAE of a holdings-statement-sized payload (about 200 bytes).
    prefix = b"DSSEv1 58 application/vnd.collateral-sync.v1.holdings-statement+proto 160 "
    return [prefix + n.to_bytes(8, "big") * 20 for n in range(count)]


def _bench_log(size: int, workdir: Path, now: datetime) -> list[_Row]:
    leaves = _leaves(size)
    custodian = SigningKey.from_seed(
        bytes(range(32)), "custodian-1", common_pb2.PARTY_ROLE_CUSTODIAN
    )

    raw_path = workdir / "raw.sqlite"
    sdk_path = workdir / "sdk.sqlite"

    def raw_append() -> None:
        raw_path.unlink(missing_ok=True)
        tree = pymerkle.SqliteTree(str(raw_path))
        tree.append_entries(leaves)
        tree.get_root()
        tree.close()

    def sdk_append() -> None:
        sdk_path.unlink(missing_ok=True)
        log = AttestationLog(sdk_path, origin="bench/attestations")
        log.append_many(leaves)
        log.checkpoint(custodian, now=now, sequence=1, ttl=timedelta(hours=1))
        log.close()

    # The disk is shared and noisy: interleave raw and SDK runs, keep medians.
    raw_rates, sdk_rates = [], []
    for _ in range(LOG_REPEATS):
        raw_rates.append(_rate(size, raw_append))
        sdk_rates.append(_rate(size, sdk_append))
    raw_rate = statistics.median(raw_rates)
    sdk_rate = statistics.median(sdk_rates)
    overhead = (raw_rate / sdk_rate - 1) * 100
    rows = [
        _Row(
            f"AttestationLog append+checkpoint {size:,}",
            sdk_rate,
            "leaves/s",
            "raw pymerkle SqliteTree+root",
            raw_rate,
            f"median of {LOG_REPEATS} interleaved runs; overhead {overhead:+.1f}%, target <= +25%",
        ),
    ]

    rng = random.Random(7)
    indexes = [rng.randrange(size) for _ in range(PROOF_SAMPLES)]
    raw_tree = pymerkle.SqliteTree(str(raw_path))
    log = AttestationLog(sdk_path, origin="bench/attestations")
    checkpoint = attestation_pb2.Checkpoint(
        origin="bench/attestations", tree_size=size, root_hash=log.root()
    )
    # Warm both: first proofs fill the subtree caches of each implementation alike.
    for index in indexes[:50]:
        raw_tree.prove_inclusion(index + 1, size)
        log.inclusion_proof(index, size)

    sdk_gen, sdk_gen_p99 = _per_op_ms([partial(log.inclusion_proof, i, size) for i in indexes])
    raw_gen, raw_gen_p99 = _per_op_ms(
        [partial(raw_tree.prove_inclusion, i + 1, size) for i in indexes]
    )
    proofs = [log.inclusion_proof(i, size) for i in indexes]
    raw_proofs = [raw_tree.prove_inclusion(i + 1, size) for i in indexes]
    root = raw_tree.get_root(size)
    sdk_ver, sdk_ver_p99 = _per_op_ms(
        [
            partial(verify_inclusion_proof, p, leaves[i], checkpoint)
            for p, i in zip(proofs, indexes, strict=True)
        ]
    )

    def raw_verify(proof: pymerkle.InclusionProof, leaf: bytes) -> None:
        # Leaf hashing included, as in the SDK call, which takes leaf bytes.
        pymerkle.verify_inclusion(raw_tree.hash_buff(leaf), root, proof)

    raw_ver, raw_ver_p99 = _per_op_ms(
        [partial(raw_verify, p, leaves[i]) for p, i in zip(raw_proofs, indexes, strict=True)]
    )
    first = size // 3
    first_checkpoint = attestation_pb2.Checkpoint(
        origin="bench/attestations", tree_size=first, root_hash=log.root(first)
    )
    sdk_cons_gen, _ = _per_op_ms([lambda: log.consistency_proof(first, size)] * 200)
    raw_cons_gen, _ = _per_op_ms([lambda: raw_tree.prove_consistency(first, size)] * 200)
    consistency = log.consistency_proof(first, size)
    sdk_cons_ver, _ = _per_op_ms(
        [lambda: verify_consistency_proof(consistency, first_checkpoint, checkpoint)] * 200
    )
    raw_consistency = raw_tree.prove_consistency(first, size)
    first_root = raw_tree.get_root(first)
    raw_cons_ver, _ = _per_op_ms(
        [lambda: pymerkle.verify_consistency(first_root, root, raw_consistency)] * 200
    )
    raw_tree.close()
    log.close()
    rows += [
        _Row(
            "inclusion proof generation (median)",
            sdk_gen,
            "ms",
            "pymerkle prove_inclusion",
            raw_gen,
            f"p99 {sdk_gen_p99:.3f} ms vs {raw_gen_p99:.3f}; target <= 0.2 ms",
        ),
        _Row(
            "inclusion proof verification (median)",
            sdk_ver,
            "ms",
            "pymerkle verify_inclusion",
            raw_ver,
            f"p99 {sdk_ver_p99:.3f} ms vs {raw_ver_p99:.3f}; target <= 0.2 ms",
        ),
        _Row(
            "consistency proof generation (median)",
            sdk_cons_gen,
            "ms",
            "pymerkle prove_consistency",
            raw_cons_gen,
        ),
        _Row(
            "consistency proof verification (median)",
            sdk_cons_ver,
            "ms",
            "pymerkle verify_consistency",
            raw_cons_ver,
        ),
    ]
    return rows


def run_benchmarks(
    suite: str, *, scale: float = 1.0, storage: str | None = None, dsn: str | None = None
) -> int:
    """Run a suite and print its table; returns the process exit code.

    ``storage`` and ``dsn`` are the sync suite's (see
    :func:`~collateral_sync_benchmarks.sync.run_sync_benchmark`).
    """
    if suite not in ("sdk", "sync", "recon"):
        raise ValueError(f"unknown suite {suite!r}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale: expected 0 < scale <= 1, got {scale}")
    if suite != "sync" and (storage is not None or dsn is not None):
        raise ValueError(f"storage, dsn: for the sync suite only, not {suite!r}")
    if suite == "sync":
        # Its own module: it runs a second (custodian) process and gRPC servers.
        from collateral_sync_benchmarks.sync import run_sync_benchmark  # noqa: PLC0415

        return run_sync_benchmark(scale=scale, storage=storage, dsn=dsn)
    if suite == "recon":
        # Its own module: it runs the two parties in child processes.
        from collateral_sync_benchmarks.reconciliation import run_recon_benchmark  # noqa: PLC0415

        return run_recon_benchmark(scale=scale)
    now = datetime.now(UTC)
    log_size = max(64, int(FULL_LOG_SIZE * scale))
    signatures = max(32, int(FULL_SIGNATURES * scale))
    print(f"collateral-sync bench sdk  (cpu count {os.cpu_count()}, scale {scale})")
    print("signatures")
    for row in _bench_signatures(signatures, now):
        print(row.render())
    print(f"attestation log ({log_size:,} statements, durable SQLite)")
    with tempfile.TemporaryDirectory(prefix="collateral-sync-bench-") as tmp:
        for row in _bench_log(log_size, Path(tmp), now):
            print(row.render())
    return 0
