"""``make demo`` run as a user runs it: a process of its own, with its servers as processes.

The demo is judged from the outside: its exit code, the lines that tell the
story, the files it leaves in ``COLLATERAL_SYNC_DEMO_DIR`` (the audit bundles
verify in-process too, and tampered copies do not), and that none of the
three servers it started outlives it, whether it finishes, fails or is
interrupted.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from collateral_sync.audit import load_audit_bundle, verify_audit_bundle
from collateral_sync.keys import KeyRegistry
from collateral_sync.v1 import (
    audit_pb2,
    emergency_pb2,
    liquidation_pb2,
    margin_pb2,
    reconciliation_pb2,
    valuation_pb2,
)
from collateral_sync_reference.demo.facts import edit_quantity

DEMO = (sys.executable, "-m", "collateral_sync_reference.demo")
#: The brief asks for well under two minutes on the 2-core machine.
DEMO_TIMEOUT = 120.0


def _run_demo(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, COLLATERAL_SYNC_DEMO_DIR=str(directory))
    return subprocess.run(
        [*DEMO, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=DEMO_TIMEOUT,
        check=False,
    )


def _free_base_port() -> int:
    """A port N with N, N+1 and N+2 free on loopback (for --base-port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 2 > 65535:
            continue
        held = []
        try:
            for port in range(base, base + 3):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise AssertionError("no three consecutive free ports found")


def _server_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"serves on \S+ \(pid (\d+)", output)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie child of the exited demo is gone too; ask the kernel for its state.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] == "Z"


def test_demo_tells_the_whole_lifecycle_and_verifies_its_audit_bundles(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    base = _free_base_port()
    started = time.monotonic()
    done = _run_demo(directory, "--base-port", str(base))
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert elapsed < DEMO_TIMEOUT

    # It opens by saying where the assets are.
    assert out.startswith(
        "The assets stay at the custodian: custodian-1 holds client-1's BTC, USDC, BENJI and "
        "TSLAx in its custody accounts, and they never move to the exchange.\n"
        "exchange-1 holds none of them: it grants credit and trades against custodian-1's "
        "signed attestations"
    ), out[:400]
    for number in range(1, 20):
        assert f"\n== {number}. " in out, f"section {number} missing"
    # The story, in order: each step appears after the one before it.
    steps = [
        "$ collateral-sync keygen --party custodian-1 --role custodian",
        "$ collateral-sync dev-certs --out pki",
        # --base-port N: the custodian on N, the exchange on N+1, the regulator on N+2.
        f"custodian-1 serves on 127.0.0.1:{base} ",
        f"exchange-1 serves on 127.0.0.1:{base + 1} ",
        f"regulator-1 serves on 127.0.0.1:{base + 2} ",
        "risk policy v1, signed by exchange-1",
        "client-1 signs its pre-authorised liquidation path path-acct-7-1",
        "client-1 pledges TSLAx 400 to exchange-1",
        "refused a pledge signed by a key that claims to be client-1",
        "UNAUTHENTICATED KEY_UNKNOWN",
        "FAILED_PRECONDITION STATE_CONFLICT",
        "its signed CreditLine cites leaf 6 of tree size 7",
        "first checkpoint, trusted on first use",
        "AUDIENCE_MISMATCH",
        "PROOF_INVALID",
        "TSLAx: TOKENIZED_SINGLE_STOCK may count at most 0.1",
        "collateral value 578,000 x leverage cap 2 = credit limit 1,156,000",
        "exposure 1,000,000 within the credit limit 1,156,000",
        "BTC 60,000 -> 45,000",
        "call amount 27,600",
        "ok      recomputed from those signed inputs alone",
        "PARTIALLY_AGREED: 13,800 agreed and due, 13,800 disputed",
        "margin call SATISFIED",
        # The disputed half: covered by the top-up, re-checked, no call left open.
        "the disputed 13,800: the top-up's 41,800 covers the whole call amount 27,600",
        "so no new call is due for the disputed part and none is issued",
        "ok      dispute resolved: 1 margin call on acct-7, SATISFIED; none ISSUED, AGREED, "
        "PARTIALLY_AGREED or DISPUTED",
        "(YIELD_ACCRUAL)",
        "BENJI 100,000 -> 100,011.8 (+11.8)",
        "exchange-1 signs LiquidationInstruction liq-",
        "(LIQUIDATION)",
        "ListLiquidations: custodian-1's signed LiquidationReceipt, verified as exchange-1",
        "yield first: BENJI 11.8 accrued, paid out to client-1 before any sale",
        "USDC     80,000       1    80,000         otc-desk",
        "BENJI   100,000       1   100,000  fund-redemption",
        "BTC           8  20,000   160,000         otc-desk",
        "TSLAx       400     250   100,000           broker",
        "total proceeds 440,000; shortfall 1,000,000 - 440,000 = 560,000",
        "ok      the receipt adds up",
        "insurance fund 1,000,000 -> 440,000",
        "ShortfallAllocation, signed by exchange-1: shortfall 560,000; the insurance fund "
        "covers 560,000, 0 left for auto-deleveraging",
        "ok      the allocation covers the receipt's shortfall",
        "CreditLine: exposure 0",
        "entries on both sides",
        # Reconciliation: matched, then the injected break located.
        "client-1 pledges USDC 150,000 of its second account acct-8 to exchange-1",
        "exchange-1 credits it: collateral value 142,500",
        "signed by regulator-1 for everyone: MATCHED, 0 breaks",
        "custodian-1's statement: 2 accounts, positions root ",
        "ok      the result and both statements in it verify",
        "off by 25 (a break in its books)",
        "signed by regulator-1: BREAKS, 1 break",
        "the statements alone differ in totals[USDC].pledged_quantity: 150000 vs 150025",
        "acct-8    USDC  PLEDGED_QUANTITY      150,000     150,025",
        "ok      the break is the one injected, located to its account, asset and field",
        # Settlement: pending for its window, then executed.
        "(RunSettlementCycle): 1 signed instruction sent to custodian-1",
        "acct-8 USDC net 1,500 (the client owes), cycle 1 of the 2 the policy allows a day",
        "custodian-1 holds it PENDING until its dispute deadline",
        "USDC 1,500 moves from acct-8's pledge to exchange-1/settlement",
        "(SETTLEMENT)",
        "acct-8 now: USDC 248,500 (148,500 pledged)",
        # Pledge release: refused beyond the policy, consented within it, executed.
        "refused a release of USDC 100,000: the credit limit left would not cover the exposure",
        "STATE_CONFLICT: after the release the credit limit 92150 is below the exposure 150000",
        "PledgeReleaseConsent signed by exchange-1 for custodian-1 and client-1",
        "collateral value 95,000, credit limit 190,000 >= exposure 150,000, collateral ratio 0.63",
        "ok      the consent recomputes from its signed inputs",
        "(PLEDGE_RELEASE) at leaf ",
        "acct-8 now: USDC 248,500 (100,000 pledged)",
        "exchange-1 credits it once proven: collateral value 95,000, credit limit 190,000",
        # The custodian down: credit frozen past the window, raised once it is back.
        "custodian-1's process is killed (SIGKILL)",
        "custodian_staleness_window (4 s) exchange-1 counts custodian-1 silent",
        "exchange-1 revalues acct-8 and keeps its credit limit at ",
        "custodian-1 restarts on the same database and address (pid ",
        "ok      heard again, the same valuation counts: credit limit ",
        # Emergency release: the exchange dark, too early refused, then executed.
        "exchange-1's process stops (exit code 0)",
        "a call to exchange-1 now fails: UNAVAILABLE",
        "regulator-1 signs EmergencyRelease release-acct-8-1",
        "reason EXCHANGE_FAILURE",
        "custodian-1 co-signs it (CoSignEmergencyRelease): signed by regulator-1 and custodian-1",
        "refused executing it now: without exchange-1's signature the policy's 48 h 00 min wait",
        "-> FAILED_PRECONDITION STATE_CONFLICT: the exchange has been unresponsive since",
        "ok      acct-8's attested holdings are unchanged by the refusal",
        "clocks move 48 h ",
        "the same release, brought again: executed. EmergencyReleaseReceipt signed by custodian-1",
        "(RELEASE) at leaf ",
        "USDC 248,500, nothing pledged",
        # Redemption: locked 24 h, refused again before settles_at, settled after.
        "client-1 asks custodian-1 to redeem USDC 200,000 of acct-8",
        "(REDEMPTION_LOCK) at leaf ",
        "USDC 248,500, 200,000 locked; settles at ",
        "(24 h 00 min from now)",
        "refused a second redemption of the same USDC 200,000 before ",
        "-> FAILED_PRECONDITION STATE_CONFLICT: redemption of 200000 USDC exceeds the 48500 "
        "redeemable",
        "ok      before settles_at the lock holds: USDC 248,500 still in acct-8, 200,000 locked",
        "clocks move 24 h ",
        "past settles_at",
        "(REDEMPTION_SETTLED) at leaf ",
        "USDC 248,500 -> 48,500, locked 200,000 -> 0: the 200,000 has left custody",
        "regulator exit code 0, exchange exit code 0, custodian exit code 0",
        "1 LiquidationReceipt signed by custodian-1",
        "$ collateral-sync verify audit-exchange.json",
        "ok   statement[0]: LiquidationReceipt #",
        "$ collateral-sync verify audit-custodian.json",
        "$ collateral-sync verify audit-regulator.json",
        ": MATCHED, 0 breaks, both parties' statements verify",
        ": BREAKS, 1 break, both parties' statements verify",
        "ok   statement[2]: EmergencyReleaseReceipt #1 signed by custodian-1",
        "$ collateral-sync verify audit-exchange-tampered.json",
        "FAIL attested_statement[0]",
        "Demo complete in",
    ]
    position = 0
    for text in steps:
        found = out.find(text, position)
        assert found >= 0, f"{text!r} missing after position {position}:\n{out}"
        position = found
    verdicts = re.findall(r"(VERIFIED|REFUSED): (\d+) of (\d+) checks passed", out)
    assert [v[0] for v in verdicts] == ["VERIFIED", "VERIFIED", "VERIFIED", "REFUSED"]
    assert all(passed == total for _, passed, total in verdicts[:3])
    assert int(verdicts[3][1]) == int(verdicts[3][2]) - 1
    assert out.count("exit code 0\n") == 3
    assert out.count("exit code 1\n") == 1

    # No server outlives the demo.
    pids = _server_pids(out)
    assert len(pids) == 3
    assert all(_gone(pid) for pid in pids)

    # The kept files: the bundles check out here too, independently of the CLI.
    exchange_report = verify_audit_bundle(load_audit_bundle(directory / "audit-exchange.json"))
    assert exchange_report.ok
    exchange_bundle = load_audit_bundle(directory / "audit-exchange.json")
    assert exchange_bundle.verifier_party_id == "exchange-1"
    sizes = [c.inclusion_proof.tree_size for c in exchange_bundle.attested_statements]
    assert sizes == sorted(sizes)
    assert len(exchange_bundle.consistency_proofs) == len(exchange_bundle.checkpoints) - 1
    custodian_bundle = load_audit_bundle(directory / "audit-custodian.json")
    assert verify_audit_bundle(custodian_bundle).ok
    kinds = {e.statement.payload_type.rsplit(".", 1)[-1] for e in custodian_bundle.statements}
    assert {
        "margin-call+proto",
        "margin-call-state+proto",
        "credit-line+proto",
        "liquidation-instruction+proto",
        "shortfall-allocation+proto",
    } <= kinds
    # The custodian's receipt is addressed to the exchange: it is in the exchange's bundle.
    [receipt_evidence] = exchange_bundle.statements
    receipt = liquidation_pb2.LiquidationReceipt.FromString(receipt_evidence.statement.payload)
    assert [(f.asset_id, f.proceeds.value) for f in receipt.fills] == [
        ("USDC", "80000"),
        ("BENJI", "100000"),
        ("BTC", "160000"),
        ("TSLAx", "100000"),
    ]
    assert (receipt.total_proceeds.value, receipt.shortfall.value) == ("440000", "560000")
    [allocation] = [
        liquidation_pb2.ShortfallAllocation.FromString(e.statement.payload)
        for e in custodian_bundle.statements
        if e.statement.payload_type.endswith(".shortfall-allocation+proto")
    ]
    assert allocation.liquidation_id == receipt.liquidation_id
    assert (
        allocation.covered_by_insurance_fund.value,
        allocation.auto_deleveraging_amount.value,
    ) == (
        "560000",
        "0",
    )
    calls = [
        margin_pb2.MarginCall.FromString(e.statement.payload)
        for e in custodian_bundle.statements
        if e.statement.payload_type.endswith(".margin-call+proto")
    ]
    assert [c.call_amount.value for c in calls] == ["27600"]
    policies = [
        valuation_pb2.RiskPolicy.FromString(e.statement.payload)
        for e in custodian_bundle.statements
        if e.statement.payload_type.endswith(".risk-policy+proto")
    ]
    assert [(p.version, p.insurance_fund_balance.value) for p in policies] == [
        (1, "1000000"),
        (2, "440000"),
    ]
    tampered = verify_audit_bundle(load_audit_bundle(directory / "audit-exchange-tampered.json"))
    assert not tampered.ok
    assert [c.subject for c in tampered.checks if not c.ok] == ["attested_statement[0]"]
    kinds = {e.statement.payload_type.rsplit(".", 1)[-1] for e in custodian_bundle.statements}
    assert {"settlement-instruction+proto", "emergency-release+proto"} <= kinds
    [instruction] = [
        reconciliation_pb2.SettlementInstruction.FromString(e.statement.payload)
        for e in custodian_bundle.statements
        if e.statement.payload_type.endswith(".settlement-instruction+proto")
    ]
    assert (instruction.account_id, instruction.asset_id, instruction.net_amount.value) == (
        "acct-8",
        "USDC",
        "1500",
    )
    _check_regulator_bundle(directory)
    for name in (
        "custodian.log",
        "exchange.log",
        "regulator.log",
        "custodian-1.sqlite",
        "exchange-1.sqlite",
        "regulator-1.sqlite",
    ):
        assert (directory / name).is_file(), name


def _check_regulator_bundle(directory: Path) -> None:
    """The regulator's bundle: both results and the release receipt, and tampering caught."""
    bundle = load_audit_bundle(directory / "audit-regulator.json")
    assert bundle.verifier_party_id == "regulator-1"
    report = verify_audit_bundle(bundle)
    assert report.ok, report.lines()
    results = [
        reconciliation_pb2.ReconciliationResult.FromString(e.statement.payload)
        for e in bundle.statements
        if e.statement.payload_type.endswith(".reconciliation-result+proto")
    ]
    outcome = reconciliation_pb2.ReconciliationOutcome
    assert [r.outcome for r in results] == [
        outcome.RECONCILIATION_OUTCOME_MATCHED,
        outcome.RECONCILIATION_OUTCOME_BREAKS,
    ]
    assert results[0].cutoff_id < results[1].cutoff_id
    assert [
        (b.account_id, b.asset_id, b.field, b.custodian_value.value, b.exchange_value.value)
        for b in results[1].breaks
    ] == [("acct-8", "USDC", reconciliation_pb2.BREAK_FIELD_PLEDGED_QUANTITY, "150000", "150025")]
    [receipt] = [
        emergency_pb2.EmergencyReleaseReceipt.FromString(e.statement.payload)
        for e in bundle.statements
        if e.statement.payload_type.endswith(".emergency-release-receipt+proto")
    ]
    release = emergency_pb2.EmergencyRelease.FromString(receipt.release.payload)
    assert (receipt.account_id, release.account_id, release.exchange_id) == (
        "acct-8",
        "acct-8",
        "exchange-1",
    )
    assert release.reason == emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE
    registry = KeyRegistry.from_proto(bundle.registry)
    signers = [registry.get(s.key_id) for s in receipt.release.signatures]
    assert [key.party_id for key in signers if key is not None] == ["regulator-1", "custodian-1"]
    # Executed only once the wait had passed since the exchange went dark.
    since = release.exchange_unresponsive_since.ToDatetime()
    assert receipt.executed_at.ToDatetime() - since >= timedelta(hours=48)

    # A break value edited in the signed result is caught.
    tampered = audit_pb2.AuditBundle()
    tampered.CopyFrom(bundle)
    envelope = tampered.statements[1].statement
    envelope.payload = edit_quantity(envelope.payload, "150025", "150026")
    failed = [c.subject for c in verify_audit_bundle(tampered).checks if not c.ok]
    assert failed == ["statement[1]"]


def test_demo_with_a_base_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    base = _free_base_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        done = _run_demo(tmp_path / "demo", "--base-port", str(base))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"demo: port {base + 1} (for the exchange, --base-port {base} + 1) is in use on "
        "127.0.0.1: Address already in use; choose another --base-port"
    ]
    assert "serves on" not in done.stdout


def test_demo_help_documents_the_base_port() -> None:
    done = subprocess.run(
        [*DEMO, "--help"], capture_output=True, text=True, timeout=DEMO_TIMEOUT, check=False
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # however argparse wraps it
    assert "--base-port N" in text
    assert "N (custodian), N+1 (exchange) and N+2 (regulator)" in text


def test_demo_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not the demo's")
    done = _run_demo(tmp_path)
    assert done.returncode == 1
    assert "demo failed:" in done.stderr
    assert "expected an empty directory" in done.stderr
    assert "Traceback" not in done.stderr
    # Nothing was started, and nothing of the user's was touched.
    assert "serves on" not in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_a_failed_step_ends_with_one_message_and_stops_the_servers(tmp_path: Path) -> None:
    # The same demo with a scenario the custodian must refuse: 9 BTC pledged of 8 held
    # (patched in the module whose act pledges them).
    script = (
        "import collateral_sync_reference.demo.onboarding as onboarding\n"
        "onboarding.PLEDGES = (('BTC', '9'),)\n"
        "from collateral_sync_reference.demo.run import main\n"
        "main()\n"
    )
    environment = dict(os.environ, COLLATERAL_SYNC_DEMO_DIR=str(tmp_path / "demo"))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "demo failed: a server answered FAILED_PRECONDITION STATE_CONFLICT: pledge of 9 BTC "
        "exceeds the 8 available (quantity - locked - pledged - accrued yield)"
    ]
    assert "Demo complete" not in done.stdout
    pids = _server_pids(done.stdout)
    assert len(pids) == 3
    assert all(_gone(pid) for pid in pids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_demo_stops_its_servers(tmp_path: Path, signum: signal.Signals) -> None:
    environment = dict(os.environ, COLLATERAL_SYNC_DEMO_DIR=str(tmp_path / "demo"))
    process = subprocess.Popen(
        DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=False
    )
    assert process.stdout is not None
    output = b""
    deadline = time.monotonic() + 60
    try:
        # Interrupt once the three servers serve: the story is under way.
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"regulator-1 serves on" not in output:
                remaining = deadline - time.monotonic()
                assert remaining > 0, output.decode()
                assert selector.select(remaining), output.decode()
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, output.decode()
                output += chunk
        process.send_signal(signum)
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    text = (output + rest).decode()
    assert process.returncode == 130, f"{text}\n{stderr.decode()}"
    assert "demo interrupted; every server it started was stopped" in stderr.decode()
    assert b"Traceback" not in stderr
    pids = _server_pids(text)
    assert len(pids) == 3
    assert all(_gone(pid) for pid in pids)
