"""``collateral-sync bench``: every suite runs at a tiny scale and prints each figure beside its baseline.

Not timing tests: they check that each figure and its same-run baseline are
measured and printed, and that each suite's own end-to-end checks passed.
"""

from __future__ import annotations

import collateral_sync_benchmarks as _bench
import pytest
from _postgres import PostgresServer
from collateral_sync import _cli
from collateral_sync_benchmarks.reconciliation import run_recon_benchmark

#: The sync suite's rows, figure | baseline, per engine ({raw} is its driver).
SYNC_ROWS = [
    ("signed updates applied durably", "raw gRPC stream, 1 msg + 1 ack each"),
    ("signed updates applied durably", "raw {raw}: both parties' writes, 250/batch"),
    ("signed updates applied durably", "raw PyNaCl verify, 1 per message"),
    ("signed updates applied durably", "raw PyNaCl sign+verify, 1 per message"),
    ("signed updates applied, metrics on", "the same with metrics off"),
    ("signed updates applied, tracing on", "the same with tracing off"),
    ("margin call p50 (idle)", "raw unary gRPC round trip p50 (idle)"),
    ("margin call p99 (idle)", "raw unary gRPC round trip p99 (idle)"),
    ("margin call p50 (loaded)", "raw unary gRPC round trip p50 (loaded)"),
    ("margin call p99 (loaded)", "raw unary gRPC round trip p99 (loaded)"),
]


def _check_engine_section(section: str, raw: str) -> None:
    """One engine's part of the sync report: every figure beside its same-run baseline."""
    rows = [line for line in section.splitlines() if " | " in line and " ratio " in line]
    assert len(rows) == len(SYNC_ROWS)
    for row, (figure, baseline) in zip(rows, SYNC_ROWS, strict=True):
        left, right = row.split(" | ")
        assert left.strip().startswith(figure)
        assert right.startswith(baseline.format(raw=raw))
        ratio = float(right.split(" ratio ")[1].split()[0])
        assert ratio > 0
    verdicts = [row for row in rows if "target " in row]
    assert len(verdicts) == 5
    assert all(": met" in row or ": NOT MET" in row for row in verdicts)
    # The raw-storage baseline is measured in this run, interleaved with the protocol runs.
    runs = [line for line in section.splitlines() if line.startswith("  run ")]
    assert len(runs) == 3
    assert all(f"; raw {raw} " in line and line.endswith(" updates/s") for line in runs)
    # Each beside a run with the servers' metrics scraped meanwhile, at least once.
    assert all(" scrapes of both) " in line for line in runs)
    # And beside one with both parties' spans recorded and exported.
    assert all("; tracing on " in line for line in runs)
    assert not any("(0 scrapes" in line for line in runs)
    assert "check: the exchange applied all" in section
    assert "stored all 40 margin calls" in section


def _summary_row(out: str, engine: str) -> list[str]:
    summary = out.split("summary: protocol vs raw storage on each engine")[1]
    lines = summary.replace("NOT MET", "NOT-MET").splitlines()
    (row,) = [line.split() for line in lines if line.split()[:1] == [engine]]
    return row


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

    assert _cli.main(["bench", "sync", "--scale", "0.001", "--storage", "sqlite"]) == 0
    out = capsys.readouterr().out
    assert "cpu count" in out
    assert "[postgresql]" not in out
    _, section = out.split("[sqlite] storage: SQLite")
    _check_engine_section(section.split("\nsummary: ")[0], "sqlite3")
    assert len(_summary_row(out, "sqlite")) == 9


@pytest.mark.parametrize("where", ["throwaway", "dsn"])
def test_sync_bench_on_postgresql_beside_raw_psycopg_in_the_same_run(
    where: str, postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The PostgreSQL variant at a tiny scale: a throwaway server of its own (what
    # make bench runs), or an existing one (--dsn: the session's). Not a timing
    # test: no threshold on any figure, only that the postgresql rows are there,
    # each beside its baseline from this run, the raw psycopg one included.
    for argv in (
        ["bench", "sdk", "--storage", "postgresql"],
        ["bench", "sync", "--storage", "sqlite", "--dsn", postgres.conninfo()],
    ):
        assert _cli.main(argv) == 2
    with pytest.raises(SystemExit):
        _cli.main(["bench", "sync", "--storage", "mysql"])
    capsys.readouterr()

    dsn = ["--dsn", postgres.conninfo()] if where == "dsn" else []
    argv = ["bench", "sync", "--scale", "0.001", "--storage", "postgresql", *dsn]
    assert _cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "storage postgresql)" in out
    assert "[sqlite]" not in out
    _, section = out.split("[postgresql] storage: PostgreSQL ")
    assert ("(--dsn, 127.0.0.1;" if dsn else "(a throwaway server on 127.0.0.1:") in section
    _check_engine_section(section.split("\nsummary: ")[0], "psycopg")
    row = _summary_row(out, "postgresql")
    protocol, raw_storage, ratio = (float(x.replace(",", "")) for x in row[1:4])
    assert protocol > 0
    assert raw_storage > 0
    assert ratio == pytest.approx(protocol / raw_storage, abs=0.01)
    assert row[4] in ("met", "NOT-MET")
    assert len(row) == 9
    if dsn:
        # Its two databases are gone with the run.
        with postgres.connect() as admin:
            left = admin.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'collateral_sync_bench_%'"
            ).fetchall()
        assert left == []


def test_bench_recon_runs_small_and_checks_what_it_located(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_recon_benchmark(scale=0.0005) == 0
    out = capsys.readouterr().out
    assert "500 accounts a party, 25 break sites" in out
    assert "all located and as injected" in out
    with pytest.raises(ValueError, match="scale"):
        run_recon_benchmark(scale=0)
