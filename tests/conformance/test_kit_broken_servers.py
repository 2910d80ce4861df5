"""Each broken reference server is caught by the cases meant for its fault, and by no others.

:mod:`.broken_servers` starts a reference custodian or exchange with one rule
broken inside the server. The kit runs the family of cases the rule belongs
to plus its neighbours; the set of failed cases must be exactly the cases
written for that rule.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from collateral_sync_conformance import main

from .broken_servers import FAULTS
from .broken_servers import main as launch_broken
from .conftest import (
    CUSTODIAN,
    EXCHANGE,
    KIT_ACCOUNT,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
    custodian_config,
    kit_argv,
    regulator_argv,
)
from .test_kit_counterpart import counterpart_argv, free_port
from .test_kit_counterpart import exchange_config as counterpart_exchange_config
from .test_kit_exchange import COUNTERPART_CASES, ORIGIN, _exchange_argv, _wait_until_known

_LAUNCHER = Path(__file__).with_name("broken_servers.py")
_REFERENCE = Path(__file__).resolve().parents[2] / "reference_server"
KNOWN_FAILING = "# the reference servers pass every case; nothing is known to fail\n"


@dataclass
class BrokenServer(ServerProcess):
    """A reference server started through a launcher with one fault patched in."""

    fault: str = ""
    #: The script that patches the fault in and runs the server (see broken_servers.py).
    launcher: ClassVar[Path] = _LAUNCHER

    def start(self) -> str:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()  # of the previous run, on a restart
        command = [
            sys.executable,
            str(self.launcher),
            self.fault,
            "serve",
            self.role,
            "--config",
            str(self.config_path),
            "--listen",
            "127.0.0.1:0",
            "--test-mode",
        ]
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(_REFERENCE), *filter(None, [environment.get("PYTHONPATH")])]
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, env=environment
            )
        self.address = self._wait_listening()
        return self.address


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[list[BrokenServer]]:
    started: list[BrokenServer] = []
    yield started
    for server in started:
        server.close()


def _start(
    started: list[BrokenServer], fault: str, role: str, config: dict[str, Any], directory: Path
) -> BrokenServer:
    config_path = directory / f"{role}.json"
    config_path.write_text(json.dumps(config, indent=2))
    server = BrokenServer(
        role=role, config_path=config_path, log_path=directory / f"{role}.log", fault=fault
    )
    started.append(server)
    server.start()
    return server


def _failed(argv: list[str], reports: Path, capsys: pytest.CaptureFixture[str]) -> set[str]:
    code = main([*argv, "--report-dir", str(reports)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    cases = json.loads((reports / "results.json").read_text("utf-8"))["cases"]
    assert not any(c["verdict"] in ("error", "skipped") for c in cases), output
    failed = {c["id"] for c in cases if c["verdict"] == "failed"}
    for case in cases:
        if case["id"] in failed:
            assert case["failure"]["expected"], case
            assert case["failure"]["got"], case
    # Non-zero exactly when a MUST case failed.
    must_failed = any(c["level"] == "MUST" and c["id"] in failed for c in cases)
    assert code == (1 if must_failed else 0), output
    return failed


def _globs(*patterns: str) -> list[str]:
    return [item for pattern in patterns for item in ("--run", pattern)]


#: Neighbourhoods of sync cases (the window and heartbeat cases wait, so they run only where needed).
_SYNC_REFUSALS = ["sync/hello-answered", "sync/duplicate-*", "sync/*-refused"]
_SYNC_FLOW = ["sync/hello-answered", "sync/window-respected", "sync/heartbeat-on-idle"]
_SYNC_RECEIVE = ["sync/hello-answered", "sync/holdings-change-attested", "sync/resume-*"]


def _targets(slug: str) -> set[str]:
    return {
        f"envelope/{target}/{slug}"
        for target in ("pledge-collateral", "request-redemption", "submit-liquidation-instruction")
    }


#: Every custodian envelope family: a fault of statement verification shows in each.
_ENVELOPE_TARGETS = [
    "envelope/pledge-collateral/**",
    "envelope/request-redemption/**",
    "envelope/submit-liquidation-instruction/**",
]

CUSTODIAN_FAULTS: list[tuple[str, list[str], set[str]]] = [
    (
        "undecodable-request-unknown",
        ["request/**"],
        {"request/undecodable-refused", "request/undecodable-stream-message-refused"},
    ),
    (
        "custodian-ignores-not-yet-valid",
        ["envelope/pledge-collateral/**", "envelope/request-redemption/**"],
        {
            "envelope/pledge-collateral/not-yet-valid-refused",
            "envelope/request-redemption/not-yet-valid-refused",
        },
    ),
    (
        "custodian-accepts-replay",
        ["envelope/pledge-collateral/**", "custodian/**"],
        {
            "envelope/pledge-collateral/replayed-refused",
            "envelope/pledge-collateral/lower-sequence-refused",
        },
    ),
    (
        "custodian-release-on-any-signature",
        ["emergency/**"],
        {
            "emergency/single-signature-refused",
            "emergency/same-party-twice-refused",
            "emergency/wrong-role-signer-refused",
            # It counts the account's exchange as present, so it never waits either,
            # nor asks for the reason and the time of a release without the exchange.
            "emergency/regulator-custodian-before-wait-refused",
            "emergency/regulator-custodian-other-reason-refused",
            "emergency/unresponsive-since-unset-refused",
            "emergency/regulator-custodian-executed-after-wait",
        },
    ),
    (
        "custodian-release-issuer-unchecked",
        ["emergency/**"],
        {"emergency/issuer-not-among-signers-refused"},
    ),
    (
        "custodian-release-for-any-reason",
        ["emergency/**"],
        {"emergency/regulator-custodian-other-reason-refused"},
    ),
    (
        "custodian-release-since-unset-as-epoch",
        ["emergency/**"],
        {"emergency/unresponsive-since-unset-refused"},
    ),
    (
        "custodian-no-settlement-cycle-cap",
        ["settlement/**"],
        {"settlement/third-cycle-refused"},
    ),
    (
        "custodian-cosigns-twice",
        ["emergency/**"],
        {"emergency/cosign-twice-refused"},
    ),
    (
        "custodian-executes-disputed-settlement",
        # Not the family: the settlements later cases dispute at once would execute too,
        # draining the pledge at moments that depend on the sweep.
        [
            "settlement/instruction-pending-until-window",
            "settlement/dispute-within-window",
            "settlement/executed-after-window",
        ],
        {"settlement/dispute-within-window"},
    ),
    # The writes idempotent by an id (§12.4): a settlement instruction, a dispute, a release.
    (
        "custodian-sells-at-zero-price",
        ["liquidation/amount-raised-part-way", "liquidation/zero-priced-*"],
        {"liquidation/zero-priced-step-passed-over"},
    ),
    (
        # Stage g before the id: a reused liquidation id under a used sequence is REPLAYED.
        "custodian-replay-before-reused-id",
        ["liquidation/re*", "settlement/re*"],
        {"liquidation/reused-id-refused", "settlement/reused-id-refused"},
    ),
    (
        # The same, on the stream only: the reused id fails its batch instead of being
        # recorded as a rejected update.
        "custodian-stream-replays-reused-id",
        ["liquidation/re*"],
        {"liquidation/reused-id-refused"},
    ),
    (
        # The id before stages a-f: an expired repeat is answered from the record.
        "custodian-answers-expired-repeats",
        ["settlement/repeat-returns-recorded", "settlement/expired-repeat-refused"],
        {"settlement/expired-repeat-refused"},
    ),
    (
        # Stage g before the id: the same envelope again is refused REPLAYED.
        "custodian-refuses-repeats-as-replayed",
        ["settlement/**", "emergency/**"],
        {
            "settlement/repeat-returns-recorded",
            "settlement/expired-repeat-refused",
            # Their reuse under the first statement's own sequence is REPLAYED too.
            "settlement/reused-id-refused",
            "emergency/reused-id-refused",
            "settlement/dispute-repeat-returns-recorded",
            # Its other disputes, some under a sequence already used, are REPLAYED too.
            "settlement/second-dispute-refused",
            "emergency/repeat-returns-same-receipt",
        },
    ),
    (
        # Ids compared, not payloads: other bytes under a used id get the recorded answer.
        "custodian-answers-reused-ids",
        ["settlement/**", "emergency/**"],
        {
            "settlement/reused-id-refused",
            "settlement/second-dispute-refused",
            "emergency/reused-id-refused",
        },
    ),
    (
        "custodian-accepts-unscheduled-cutoffs",
        ["reconciliation/**"],
        {"reconciliation/unscheduled-cutoff-refused"},
    ),
    (
        "custodian-not-found-as-failed-precondition",
        ["attestation/**"],
        {"attestation/holdings-statement-unknown-account"},
    ),
    (
        "custodian-malformed-as-failed-precondition",
        ["envelope/pledge-collateral/**", "attestation/holdings-statement-*"],
        {
            "envelope/pledge-collateral/malformed-payload-refused",
            "envelope/pledge-collateral/missing-header-refused",
            "envelope/pledge-collateral/zero-sequence-refused",
            "envelope/pledge-collateral/expiry-before-issue-refused",
            "envelope/pledge-collateral/no-signature-refused",
            "envelope/pledge-collateral/short-signature-refused",
            "envelope/pledge-collateral/malformed-key-id-refused",
            "envelope/pledge-collateral/missing-amount-refused",
            "attestation/holdings-statement-account-required",
        },
    ),
    (
        "custodian-parses-before-verifying",
        _ENVELOPE_TARGETS,
        _targets("unverified-undecodable-payload-refused"),
    ),
    (
        "custodian-reduces-signature-scalar",
        _ENVELOPE_TARGETS,
        _targets("malleated-signature-refused"),
    ),
    (
        "custodian-records-unnamed-paths",
        ["custodian/pledge-*", "custodian/path-*"],
        {"custodian/path-without-statement-id-refused"},
    ),
    (
        "custodian-drops-field-violations",
        ["envelope/pledge-collateral/**"],
        {"envelope/pledge-collateral/invalid-amount-refused"},
    ),
    ("custodian-ignores-window", _SYNC_FLOW, {"sync/window-respected"}),
    ("custodian-misses-heartbeats", _SYNC_FLOW, {"sync/heartbeat-on-idle"}),
    ("custodian-replays-from-start", _SYNC_RECEIVE, {"sync/resume-after-disconnect"}),
    ("custodian-forged-batch-as-malformed", _SYNC_REFUSALS, {"sync/forged-batch-refused"}),
    (
        "custodian-waits-forever-for-hello",
        ["sync/hello-answered", "sync/silent-stream-closed"],
        {"sync/silent-stream-closed"},
    ),
    (
        "custodian-accepts-third-party-statements",
        _SYNC_REFUSALS,
        {"sync/third-party-inner-statement-refused"},
    ),
    (
        "custodian-rejects-forged-inner-statement",
        _SYNC_REFUSALS,
        # It files any inner statement that does not verify as a business refusal.
        {"sync/invalid-inner-statement-refused", "sync/third-party-inner-statement-refused"},
    ),
    (
        "custodian-refuses-old-batches",
        _SYNC_REFUSALS,
        # The equivocating batch is at the head too: refused, but for the wrong reason.
        {"sync/duplicate-batch-acked-once", "sync/equivocation-refused"},
    ),
    ("custodian-equivocation-as-gap", _SYNC_REFUSALS, {"sync/equivocation-refused"}),
    (
        "custodian-key-role-as-unauthenticated",
        _SYNC_REFUSALS,
        {"sync/wrong-role-batch-refused", "sync/third-party-inner-statement-refused"},
    ),
    (
        "custodian-sequence-gap-as-failed-precondition",
        _SYNC_REFUSALS,
        {"sync/sequence-gap-refused"},
    ),
    ("custodian-hello-names-another-party", _SYNC_REFUSALS, {"sync/hello-answered"}),
    (
        "custodian-misattests-sync-change",
        [*_SYNC_RECEIVE, "custodian/**"],
        {"sync/holdings-change-attested"},
    ),
]


@pytest.mark.parametrize(
    ("fault", "run", "caught_by"), CUSTODIAN_FAULTS, ids=[f for f, _, _ in CUSTODIAN_FAULTS]
)
def test_a_broken_custodian_is_caught_by_its_cases(
    fault: str,
    run: list[str],
    caught_by: set[str],
    reference_parties: Parties,
    kit_files: dict[str, Path],
    broken: list[BrokenServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = _start(
        broken, fault, "custodian", custodian_config(reference_parties, tmp_path), tmp_path
    )
    known = tmp_path / "known-failing.txt"
    known.write_text(KNOWN_FAILING, "utf-8")
    argv = kit_argv(
        kit_files,
        server.address,
        "--account",
        KIT_ACCOUNT,
        "--known-failing",
        str(known),
        *_globs(*run),
    )
    assert _failed(argv, tmp_path / "reports", capsys) == caught_by, server.log_text()[-3000:]


EXCHANGE_FAULTS: list[tuple[str, list[str], set[str]]] = [
    ("integer-overflow-unchecked", ["request/**"], {"request/integer-above-2-63-refused"}),
    (
        "exchange-ignores-expiry",
        ["envelope/respond-to-margin-call/**"],
        {"envelope/respond-to-margin-call/expired-refused"},
    ),
    (
        "exchange-ignores-audience",
        ["envelope/respond-to-margin-call/**"],
        # Addressed to anyone ('*') is a rule of its own, which this exchange still keeps.
        {"envelope/respond-to-margin-call/wrong-audience-refused"},
    ),
    (
        "exchange-ignores-not-yet-valid",
        ["envelope/respond-to-margin-call/**"],
        {"envelope/respond-to-margin-call/not-yet-valid-refused"},
    ),
    (
        "exchange-miscomputes-haircut",
        ["exchange/**"],
        # Both figures value collateral: the credit line and the margin call's collateral value.
        {"exchange/credit-line-recomputes", "exchange/margin-call-recomputes"},
    ),
    ("exchange-doubles-credit-limit", ["exchange/**"], {"exchange/credit-line-recomputes"}),
    (
        "exchange-policy-versions-off-by-one",
        ["exchange/risk-policy-*"],
        {"exchange/risk-policy-by-version"},
    ),
    (
        "exchange-policy-signature-broken",
        ["exchange/risk-policy-*"],
        # The unknown-version case first reads the policy in force to pick a version beyond it.
        {
            "exchange/risk-policy-signed",
            "exchange/risk-policy-by-version",
            "exchange/risk-policy-unknown-version-not-found",
        },
    ),
    (
        "exchange-lists-calls-not-states",
        ["exchange/margin-call-recomputes", "exchange/list-margin-calls-*"],
        # margin-call-recomputes lists the account's calls to find the one it made, and
        # pages-complete lists them to count them.
        {
            "exchange/margin-call-recomputes",
            "exchange/list-margin-calls-known-account",
            "exchange/list-margin-calls-pages-complete",
        },
    ),
    (
        "exchange-never-pages-calls",
        ["exchange/margin-call-recomputes", "exchange/list-margin-calls-*"],
        {"exchange/list-margin-calls-pages-complete"},
    ),
    (
        "exchange-short-call-pages",
        ["exchange/margin-call-recomputes", "exchange/list-margin-calls-*"],
        {"exchange/list-margin-calls-pages-complete"},
    ),
    ("exchange-overstates-margin-calls", ["exchange/**"], {"exchange/margin-call-recomputes"}),
    (
        "exchange-reads-for-any-registered-party",
        ["access/**"],
        {"access/exchange/account-read-by-others-refused"},
    ),
    (
        "exchange-serves-strangers",
        ["access/**"],
        {"access/exchange/stranger-refused", "access/exchange/account-read-by-others-refused"},
    ),
    (
        "exchange-unknown-account-not-found-to-all",
        ["access/**"],
        {"access/exchange/account-read-by-others-refused"},
    ),
    (
        "exchange-account-hidden-from-its-client",
        ["access/**"],
        {"access/exchange/account-read-by-its-parties"},
    ),
    (
        "exchange-regulator-reads-nothing",
        ["access/**", "exchange/*-unknown-*"],
        {
            "access/exchange/account-read-by-its-parties",
            "access/exchange/account-read-by-others-refused",
            "exchange/credit-line-unknown-account-not-found",
            "exchange/margin-call-unknown-not-found",
            "exchange/list-margin-calls-unknown-account-not-found",
            "exchange/list-liquidations-unknown-account-not-found",
            "exchange/shortfall-allocation-unknown-not-found",
        },
    ),
    (
        "exchange-drops-error-info",
        ["exchange/**"],
        {
            "exchange/risk-policy-unknown-version-not-found",
            "exchange/credit-line-unknown-account-not-found",
            "exchange/margin-call-unknown-not-found",
            "exchange/list-margin-calls-unknown-account-not-found",
            "exchange/list-margin-calls-bad-page-token",
            "exchange/respond-to-unknown-margin-call-not-found",
            "exchange/list-liquidations-unknown-account-not-found",
            "exchange/list-liquidations-bad-page-token",
            "exchange/shortfall-allocation-unknown-not-found",
        },
    ),
    (
        "exchange-not-found-as-invalid-argument",
        ["exchange/**"],
        {
            "exchange/risk-policy-unknown-version-not-found",
            "exchange/credit-line-unknown-account-not-found",
            "exchange/margin-call-unknown-not-found",
            "exchange/list-margin-calls-unknown-account-not-found",
            "exchange/respond-to-unknown-margin-call-not-found",
            "exchange/list-liquidations-unknown-account-not-found",
            "exchange/shortfall-allocation-unknown-not-found",
        },
    ),
]


@pytest.mark.parametrize(
    ("fault", "run", "caught_by"), EXCHANGE_FAULTS, ids=[f for f, _, _ in EXCHANGE_FAULTS]
)
def test_a_broken_exchange_is_caught_by_its_cases(
    fault: str,
    run: list[str],
    caught_by: set[str],
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    broken: list[BrokenServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A custodian of its own: a fresh exchange resuming from nothing is refused by a
    # custodian that remembers what an earlier exchange of the same party acknowledged.
    custodian = start_server(
        "custodian",
        custodian_config(reference_parties, tmp_path / "custodian"),
        name=f"custodian-{fault}",
    )
    config = reference_parties.config(
        EXCHANGE,
        "exchange",
        tmp_path,
        peers={CUSTODIAN: custodian.address},
        exchange={
            "log_origin": ORIGIN,
            "prices": [
                {"asset_id": "BTC", "price": "60000"},
                {"asset_id": "USDC", "price": "1"},
                {"asset_id": "BENJI", "price": "1"},
            ],
        },
    )
    server = _start(broken, fault, "exchange", config, tmp_path)
    # A pledge to the exchange at the custodian, so that the exchange knows the kit's account.
    pledge = kit_argv(
        kit_files, custodian.address, "--account", KIT_ACCOUNT, "--run", "custodian/pledge-accepted"
    )
    assert main(pledge) == 0
    capsys.readouterr()
    asyncio.run(_wait_until_known(reference_parties, server.address))
    # The cases that need the kit as the exchange's custodian are run below.
    skip = [arg for glob in COUNTERPART_CASES for arg in ("--skip", glob)]
    if (
        fault != "exchange-lists-calls-not-states"
        and "exchange/margin-call-recomputes" in caught_by
    ):
        # It lists the call margin-call-recomputes leaves; without one it is skipped.
        skip += ["--skip", "exchange/list-margin-calls-known-account"]
        # It makes its calls as margin-call-recomputes does: a fault there fails it too.
        skip += ["--skip", "exchange/list-margin-calls-pages-complete"]
    argv = _exchange_argv(
        reference_parties,
        kit_files,
        server.address,
        "--account",
        KIT_ACCOUNT,
        *_globs(*run),
        *skip,
    )
    assert _failed(argv, tmp_path / "reports", capsys) == caught_by, server.log_text()[-3000:]


_PROOF_CASES = [
    "exchange/holdings/inclusion-proof-size-checked",
    "exchange/holdings/consistency-proof-sizes-checked",
    "exchange/holdings/other-origin-checkpoint-not-credited",
]

_HOLDINGS_CASES = {
    "exchange/holdings/leaf-hash-mismatch-not-credited",
    "exchange/holdings/unattested-statement-not-credited",
    "exchange/holdings/inconsistent-checkpoint-not-credited",
}

#: The cases that find an item of the exchange's checkpoint evidence listed.
_LISTED_EVIDENCE_CASES = {
    "evidence/exchange/checkpoint-fork-served",
    "evidence/exchange/inconsistent-checkpoint-served",
}

#: Faults of an exchange that dials the kit's own custodian (--listen).
COUNTERPART_FAULTS: list[tuple[str, list[str], set[str]]] = [
    (
        "exchange-credits-without-proving",
        ["exchange/holdings/**"],
        {"exchange/holdings/credited-once-proven", *_HOLDINGS_CASES, *_PROOF_CASES},
    ),
    (
        "exchange-ignores-partial-agreement",
        ["exchange/margin-call/partial-agreement-then-top-up"],
        {"exchange/margin-call/partial-agreement-then-top-up"},
    ),
    (
        "exchange-expires-disputed-calls",
        ["exchange/margin-call/dispute-does-not-expire"],
        {"exchange/margin-call/dispute-does-not-expire"},
    ),
    (
        "exchange-never-liquidates-expired-calls",
        ["exchange/margin-call/expiry-instructs-liquidation"],
        {"exchange/margin-call/expiry-instructs-liquidation"},
    ),
    # A call's expiry, one second either side of its due_by (§8.1).
    (
        "exchange-expires-calls-on-due-date",
        ["exchange/margin-call/open-until-due-by"],
        {"exchange/margin-call/open-until-due-by"},
    ),
    (
        # Past due by a minute the grace is over: only the case one second past due sees it.
        "exchange-expires-calls-a-minute-late",
        [
            "exchange/margin-call/open-until-due-by",
            "exchange/margin-call/expiry-instructs-liquidation",
        ],
        {"exchange/margin-call/open-until-due-by"},
    ),
    (
        "exchange-forged-batch-as-malformed",
        ["sync/exchange/forged-batch-refused", "sync/exchange/hello-valid"],
        {"sync/exchange/forged-batch-refused"},
    ),
    (
        "exchange-equivocation-as-gap",
        ["sync/exchange/sequence-gap-refused", "sync/exchange/equivocation-refused"],
        {"sync/exchange/equivocation-refused"},
    ),
    (
        "exchange-gap-as-malformed",
        ["sync/exchange/sequence-gap-refused", "sync/exchange/forged-batch-refused"],
        {"sync/exchange/sequence-gap-refused"},
    ),
    (
        "exchange-key-role-as-signature-invalid",
        ["sync/exchange/wrong-role-batch-refused", "sync/exchange/forged-batch-refused"],
        {"sync/exchange/wrong-role-batch-refused"},
    ),
    # No custodian accepts its hello: the kit's own session waits for it in vain
    # (a run error), and the case reads the hello itself.
    (
        "exchange-hello-names-another-party",
        ["sync/exchange/hello-valid"],
        {"sync/exchange/hello-valid"},
    ),
    (
        "exchange-under-reports-received-head",
        ["sync/exchange/hello-valid", "sync/exchange/batch-acked-and-resumed"],
        {"sync/exchange/batch-acked-and-resumed"},
    ),
    (
        "exchange-ignores-window",
        ["sync/exchange/window-respected"],
        {"sync/exchange/window-respected"},
    ),
    (
        "exchange-refuses-old-batches",
        ["sync/exchange/duplicate-entries-skipped", "sync/exchange/batch-acked-and-resumed"],
        {"sync/exchange/duplicate-entries-skipped"},
    ),
    # The evidence cases: the sync one, run on its own, equivocates itself first.
    (
        "exchange-serves-no-evidence",
        ["evidence/**", "sync/exchange/equivocation-evidence-served"],
        {*_LISTED_EVIDENCE_CASES, "sync/exchange/equivocation-evidence-served"},
    ),
    (
        "exchange-keeps-first-statement-only",
        ["evidence/**", "sync/exchange/equivocation-evidence-served"],
        {*_LISTED_EVIDENCE_CASES, "sync/exchange/equivocation-evidence-served"},
    ),
    (
        "exchange-serves-evidence-to-anyone",
        ["evidence/**"],
        {"evidence/non-regulator-refused"},
    ),
    (
        "exchange-unknown-response-kind-as-dispute",
        ["exchange/margin-call/unknown-response-kind-refused"],
        {"exchange/margin-call/unknown-response-kind-refused"},
    ),
    (
        "exchange-values-holdings-pledged-elsewhere",
        ["exchange/holdings/credited-once-proven", "exchange/holdings/pledged-elsewhere-*"],
        {"exchange/holdings/pledged-elsewhere-not-credited"},
    ),
    # What the exchange serves once its clock has passed the statements' expires_at: the
    # stored statement as it is, or re-signed with other content (§3.6.1).
    *(
        (
            fault,
            ["exchange/holdings/credited-once-proven", "exchange/served-statements-fresh"],
            {"exchange/served-statements-fresh"},
        )
        for fault in ("exchange-serves-stale-credit-lines", "exchange-resigns-policy-as-new")
    ),
    # The call the first case leaves SATISFIED is the ended call whose state is served.
    (
        "exchange-serves-stale-call-states",
        ["exchange/margin-call/partial-agreement-then-top-up", "exchange/served-statements-fresh"],
        {"exchange/served-statements-fresh"},
    ),
    # A call satisfied exactly at the amount due, and a satisfied amount that follows the
    # latest holdings down as well as up (§8.4).
    (
        "exchange-satisfies-only-above-amount-due",
        [
            "exchange/margin-call/partial-agreement-then-top-up",
            "exchange/margin-call/satisfied-*",
        ],
        {"exchange/margin-call/satisfied-at-amount-due"},
    ),
    (
        "exchange-satisfied-amount-only-rises",
        ["exchange/margin-call/satisfied-*"],
        {"exchange/margin-call/satisfied-amount-follows-holdings"},
    ),
    # A negative figure in any of a position's three quantities, and an older epoch proven
    # after a newer one (§7.2).
    *(
        (
            fault,
            ["exchange/holdings/credited-once-proven", "exchange/holdings/negative-*"],
            {"exchange/holdings/negative-figures-not-credited"},
        )
        for fault in ("exchange-credits-negative-figures", "exchange-checks-only-quantity-sign")
    ),
    (
        "exchange-credits-last-proven-epoch",
        ["exchange/holdings/credited-once-proven", "exchange/holdings/older-epoch-*"],
        {"exchange/holdings/older-epoch-not-credited"},
    ),
    # An amount due below one unit, and holdings that fall below those the call valued (§8.4).
    (
        "exchange-rounds-amount-due-up",
        ["exchange/margin-call/partial-agreement-*"],
        {"exchange/margin-call/partial-agreement-below-one-unit"},
    ),
    (
        "exchange-ignores-holdings-below-the-call",
        ["exchange/margin-call/satisfied-*"],
        {"exchange/margin-call/satisfied-amount-follows-holdings"},
    ),
    # Each of these acknowledges what it should refuse, so that it holds an entry the kit's
    # log does not: nothing of the stream may run after the case that catches it.
    (
        "exchange-accepts-paths-for-others",
        ["sync/exchange/hello-valid", "sync/exchange/unauthorising-path-refused"],
        {"sync/exchange/unauthorising-path-refused"},
    ),
    (
        "exchange-ignores-yield-accruals-without-ids",
        ["sync/exchange/hello-valid", "sync/exchange/yield-accrual-without-ids-refused"],
        {"sync/exchange/yield-accrual-without-ids-refused"},
    ),
    (
        "exchange-ignores-pledge-changes-without-ids",
        ["sync/exchange/*-without-ids-refused"],
        {"sync/exchange/pledge-change-without-ids-refused"},
    ),
    # The kind of a checkpoint's evidence, and what is no evidence at all (§10.7).
    (
        "exchange-lists-inconsistent-checkpoints-as-forks",
        ["evidence/**"],
        {"evidence/exchange/inconsistent-checkpoint-served"},
    ),
    (
        "exchange-lists-forks-above-accepted-root-only",
        ["evidence/**"],
        {"evidence/exchange/checkpoint-fork-served"},
    ),
    (
        "exchange-lists-rollbacks-as-forks",
        ["evidence/**"],
        {"evidence/exchange/rollback-and-bad-proof-not-evidence"},
    ),
    # A cut-off stated as the exchange's clock reaches it, before its custodian's stream is
    # past it (§10.2): the other reconciliation cases, which let the kit's session run on,
    # still pass.
    (
        "exchange-states-cutoff-without-hearing-past-it",
        ["reconciliation/**"],
        {"reconciliation/exchange-waits-for-custodian-past-cutoff"},
    ),
    # Any well-formed cut-off id taken for a cut-off, whatever its time of day (§10.1).
    (
        "exchange-accepts-unscheduled-cutoffs",
        [
            "reconciliation/statement-before-cutoff-refused",
            "reconciliation/malformed-cutoff-id-refused",
            "reconciliation/unscheduled-cutoff-refused",
        ],
        {"reconciliation/unscheduled-cutoff-refused"},
    ),
    # The consent to a pledge release (§5.10): each fault runs with its own case and the
    # family's first, which every fault of the verdict or the figures also fails.
    *(
        (
            fault,
            [f"exchange/pledge-release/{case}" for case in run],
            {f"exchange/pledge-release/{case}" for case in caught},
        )
        for fault, run, caught in [
            (
                "exchange-consents-beyond-policy",
                ["consented-at-policy-edge"],
                ["consented-at-policy-edge"],
            ),
            (
                "exchange-consent-edge-exclusive",
                ["consented-at-policy-edge"],
                ["consented-at-policy-edge"],
            ),
            (
                "exchange-consent-states-no-exposure",
                ["consented-at-policy-edge"],
                ["consented-at-policy-edge"],
            ),
            (
                "exchange-consent-figures-before-release",
                ["consented-at-policy-edge", "within-pledge"],
                ["consented-at-policy-edge", "within-pledge"],
            ),
            (
                "exchange-consents-beyond-pledge",
                ["within-pledge", "consented-at-policy-edge"],
                ["within-pledge"],
            ),
            (
                "exchange-release-judged-on-first-statement",
                ["judged-on-latest-holdings", "within-pledge"],
                ["judged-on-latest-holdings"],
            ),
            (
                "exchange-release-judged-on-received-statement",
                ["judged-on-latest-holdings", "within-pledge"],
                ["judged-on-latest-holdings"],
            ),
            (
                "exchange-consents-for-any-client",
                ["only-the-account-client"],
                ["only-the-account-client"],
            ),
            (
                "exchange-consents-for-any-exchange",
                ["only-the-account-client"],
                ["only-the-account-client"],
            ),
            (
                "exchange-consents-under-open-call",
                ["none-while-call-open"],
                ["none-while-call-open"],
            ),
            (
                "exchange-answers-reused-release-ids",
                ["repeat-answered-reused-id-refused"],
                ["repeat-answered-reused-id-refused"],
            ),
            (
                "exchange-replay-before-recorded-consent",
                ["repeat-answered-reused-id-refused"],
                ["repeat-answered-reused-id-refused"],
            ),
            (
                "exchange-release-ignores-replay",
                ["repeat-answered-reused-id-refused", "malformed-refused"],
                ["repeat-answered-reused-id-refused"],
            ),
            ("exchange-release-ignores-expiry", ["malformed-refused"], ["malformed-refused"]),
            ("exchange-release-ignores-audience", ["malformed-refused"], ["malformed-refused"]),
        ]
    ),
    # A custodian that falls silent (§11.2): every case waits a silence out, so each fault
    # runs only the cases it is shown on; each case checks both sides of the silence.
    *(
        (
            fault,
            [f"exchange/custodian-silent/{case}" for case in cases],
            {f"exchange/custodian-silent/{case}" for case in cases},
        )
        for fault, cases in [
            ("exchange-raises-credit-while-custodian-silent", ["credit-not-raised"]),
            ("exchange-revalues-ignoring-silence", ["no-liquidation", "call-withdrawn-at-due-by"]),
            ("exchange-expires-calls-while-custodian-silent", ["call-withdrawn-at-due-by"]),
            ("exchange-silence-window-fixed-300s", ["no-liquidation"]),
            # The other side: an exchange that never counts its custodian heard.
            ("exchange-never-hears-custodian", ["credit-not-raised"]),
            ("exchange-no-call-after-withdrawal", ["call-withdrawn-at-due-by"]),
        ]
    ),
    # Proofs that name other sizes than the checkpoints', and a checkpoint of another log
    # (§5.3, §5.4). Once an exchange takes another log for the kit's, every later statement
    # of the kit's log fails to prove: each fault runs with its own case only.
    *(
        (fault, ["exchange/holdings/credited-once-proven", caught], {caught})
        for fault, caught in [
            ("exchange-trusts-inclusion-proof-size", _PROOF_CASES[0]),
            ("exchange-trusts-consistency-proof-sizes", _PROOF_CASES[1]),
            ("exchange-ignores-checkpoint-origin", _PROOF_CASES[2]),
        ]
    ),
]


@pytest.mark.parametrize(
    ("fault", "run", "caught_by"), COUNTERPART_FAULTS, ids=[f for f, _, _ in COUNTERPART_FAULTS]
)
def test_a_broken_exchange_is_caught_by_the_kit_as_its_custodian(
    fault: str,
    run: list[str],
    caught_by: set[str],
    reference_parties: Parties,
    broken: list[BrokenServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    config = counterpart_exchange_config(reference_parties, tmp_path, listen)
    server = _start(broken, fault, "exchange", config, tmp_path)
    argv = counterpart_argv(
        reference_parties, server.address, listen, tmp_path / "kit-state", *_globs(*run)
    )
    assert _failed(argv, tmp_path / "reports", capsys) == caught_by, server.log_text()[-3000:]


@pytest.mark.parametrize("broken_server", [False, True], ids=["healthy", "broken"])
def test_a_custodian_that_loses_an_acknowledged_entry_on_restart_is_caught(
    broken_server: bool,
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    broken: list[BrokenServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fault = "custodian-loses-acknowledged-entry-on-restart"
    config = custodian_config(reference_parties, tmp_path)
    server: ServerProcess
    if broken_server:
        server = _start(broken, fault, "custodian", config, tmp_path)
    else:  # the same steps against the reference itself: the restart alone is no failure
        server = start_server("custodian", config, name=f"custodian-healthy-{tmp_path.name}")
    # A pledge and a deposit, streamed to the kit and acknowledged by it.
    before = kit_argv(
        kit_files,
        server.address,
        "--account",
        KIT_ACCOUNT,
        *_globs("custodian/pledge-accepted", "sync/holdings-change-attested"),
    )
    assert main(before) == 0, capsys.readouterr().out
    capsys.readouterr()
    address = server.restart()
    # Not holdings-change-attested: its own deposit would be the new latest change.
    neighbours = _globs("sync/hello-answered", "sync/latest-*", "sync/resume-*")
    argv = kit_argv(kit_files, address, "--account", KIT_ACCOUNT, *neighbours)
    failed = _failed(argv, tmp_path / "reports", capsys)
    expected = {"sync/latest-holdings-streamed"} if broken_server else set()
    assert failed == expected, server.log_text()[-3000:]


def test_every_broken_server_fault_is_tested() -> None:
    tested = {
        f
        for faults in (CUSTODIAN_FAULTS, EXCHANGE_FAULTS, COUNTERPART_FAULTS, REGULATOR_FAULTS)
        for f, _, _ in faults
    }
    tested.add("custodian-loses-acknowledged-entry-on-restart")
    assert tested == set(FAULTS)


def test_an_unknown_fault_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_broken(["no-such-fault", "serve", "custodian"]) == 2
    assert "usage" in capsys.readouterr().err


REGULATOR_FAULTS: list[tuple[str, list[str], set[str]]] = [
    ("regulator-ignores-audience", ["regulator/**"], {"regulator/wrong-audience-refused"}),
    ("regulator-ignores-sync-heads", ["regulator/**"], {"regulator/breaks-located"}),
    ("regulator-accepts-any-party", ["regulator/**"], {"regulator/unoverseen-party-refused"}),
    ("regulator-ignores-cutoff-id", ["regulator/**"], {"regulator/cutoff-id-mismatch-refused"}),
    (
        "regulator-accepts-views-before-cutoff",
        ["regulator/**"],
        {"regulator/statement-before-cutoff-refused"},
    ),
    ("regulator-accepts-replay", ["regulator/**"], {"regulator/replayed-statement-refused"}),
    ("regulator-ignores-party-role", ["regulator/**"], {"regulator/party-role-mismatch-refused"}),
    (
        "regulator-drops-one-sided-accounts",
        ["regulator/**"],
        {"regulator/breaks-located-in-trees"},
    ),
    ("regulator-reads-every-account", ["regulator/**"], {"regulator/descent-reads-few-accounts"}),
    (
        "regulator-results-on-first-statement",
        ["regulator/**"],
        # Every case that submits one statement and expects no result yet.
        {
            "regulator/cutoff-id-mismatch-refused",
            "regulator/statement-before-cutoff-refused",
            "regulator/statement-accepted",
            "regulator/matched-result-signed",
            "regulator/breaks-located",
            "regulator/forged-statement-refused",
            "regulator/wrong-audience-refused",
            "regulator/breaks-located-in-trees",
            "regulator/matched-trees-not-descended",
            "regulator/descent-reads-few-accounts",
        },
    ),
    (
        "regulator-flags-agreeing-views",
        ["regulator/**"],
        {"regulator/matched-trees-not-descended"},
    ),
    (
        "regulator-result-not-public",
        ["regulator/**"],
        # Every case that reads a result and checks it is addressed to everyone.
        {
            "regulator/matched-result-signed",
            "regulator/breaks-located",
            "regulator/second-statement-same-cutoff-refused",
            "regulator/breaks-located-in-trees",
            "regulator/matched-trees-not-descended",
            "regulator/descent-reads-few-accounts",
        },
    ),
]


@pytest.mark.parametrize(
    ("fault", "run", "caught_by"), REGULATOR_FAULTS, ids=[f for f, _, _ in REGULATOR_FAULTS]
)
def test_a_broken_regulator_is_caught_by_its_cases(
    fault: str,
    run: list[str],
    caught_by: set[str],
    reference_parties: Parties,
    broken: list[BrokenServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The kit serves both parties' position trees where the regulator dials them.
    listen = {CUSTODIAN: f"127.0.0.1:{free_port()}", EXCHANGE: f"127.0.0.1:{free_port()}"}
    config = reference_parties.config(REGULATOR, "regulator", tmp_path, peers=dict(listen))
    server = _start(broken, fault, "regulator", config, tmp_path)
    argv = regulator_argv(
        reference_parties,
        server.address,
        "--listen",
        listen[CUSTODIAN],
        "--listen-exchange",
        listen[EXCHANGE],
        *_globs(*run),
    )
    assert _failed(argv, tmp_path / "reports", capsys) == caught_by, server.log_text()[-3000:]
