"""``collateral-sync bench``: every suite runs at a tiny scale and prints each figure beside its baseline.

Not timing tests: they check that each figure and its same-run baseline are
measured and printed, and that each suite's own end-to-end checks passed.
"""

from __future__ import annotations

import collateral_sync_benchmarks as _bench
import pytest
from collateral_sync import _cli
from collateral_sync_benchmarks.reconciliation import run_recon_benchmark


def test_bench_runs_at_small_scale(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench.run_benchmarks("sdk", scale=0.0002) == 0
    out = capsys.readouterr().out
    for name in (
        "raw PyNaCl sign",
        "raw PyNaCl verify",
        "raw pymerkle SqliteTree+root",
        "pymerkle prove_inclusion",
        "pymerkle verify_inclusion",
        "pymerkle prove_consistency",
        "pymerkle verify_consistency",
    ):
        assert name in out
    assert sum(" | " in line and " ratio " in line for line in out.splitlines()) == 7


def test_sync_bench_prints_every_figure_beside_its_baseline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Two processes over mutual TLS at a tiny scale. Not a timing test: only that
    # every figure is measured and printed beside its same-run baseline, with a
    # verdict against its target, and that the run's end-to-end checks passed.
    with pytest.raises(ValueError, match="scale"):
        _bench.run_benchmarks("sync", scale=0)
    with pytest.raises(SystemExit):
        _cli.main(["bench", "syncs"])
    capsys.readouterr()

    assert _cli.main(["bench", "sync", "--scale", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "cpu count" in out
    rows = [line for line in out.splitlines() if " | " in line and " ratio " in line]
    pairs = [
        ("signed updates applied durably", "raw gRPC stream, 1 msg + 1 ack each"),
        ("signed updates applied durably", "raw PyNaCl verify, 1 per message"),
        ("signed updates applied durably", "raw PyNaCl sign+verify, 1 per message"),
        ("margin call p50 (idle)", "raw unary gRPC round trip p50 (idle)"),
        ("margin call p99 (idle)", "raw unary gRPC round trip p99 (idle)"),
        ("margin call p50 (loaded)", "raw unary gRPC round trip p50 (loaded)"),
        ("margin call p99 (loaded)", "raw unary gRPC round trip p99 (loaded)"),
    ]
    assert len(rows) == len(pairs)
    for row, (figure, baseline) in zip(rows, pairs, strict=True):
        left, right = row.split(" | ")
        assert left.strip().startswith(figure)
        assert right.startswith(baseline)
        ratio = float(right.split(" ratio ")[1].split()[0])
        assert ratio > 0
    verdicts = [row for row in rows if "target " in row]
    assert len(verdicts) == 3
    assert all(": met" in row or ": NOT MET" in row for row in verdicts)
    assert "check: the exchange applied all" in out
    assert "stored all 40 margin calls" in out


def test_bench_recon_runs_small_and_checks_what_it_located(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_recon_benchmark(scale=0.0005) == 0
    out = capsys.readouterr().out
    assert "500 accounts a party, 25 break sites" in out
    assert "all located and as injected" in out
    with pytest.raises(ValueError, match="scale"):
        run_recon_benchmark(scale=0)
