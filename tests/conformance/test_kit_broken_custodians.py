"""Each custodian of :mod:`.broken_custodians` is caught by the cases meant for its fault, and no others.

The faults break what a custodian does when it says yes: the checkpoints it
signs, the proofs it serves, what a redemption, a yield accrual, a liquidation,
a co-signature, an emergency release or a settlement instruction changes. The kit runs the
case written for the rule with its neighbours (cases of the same family the
fault must leave passing); the set of failed cases must be exactly the
expected one, each failure saying what was expected and what came.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .broken_custodians import FAULTS
from .broken_custodians import main as launch_broken
from .conftest import (
    KIT_ACCOUNT,
    OTHER_EXCHANGE,
    Parties,
    custodian_config,
    kit_argv,
    quiet_custodian_config,
)
from .test_kit_broken_servers import KNOWN_FAILING, BrokenServer, _failed, _globs

_LAUNCHER = Path(__file__).with_name("broken_custodians.py")


class BrokenCustodian(BrokenServer):
    """A reference custodian started through :mod:`.broken_custodians` with one fault patched in."""

    launcher = _LAUNCHER


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[list[BrokenCustodian]]:
    started: list[BrokenCustodian] = []
    yield started
    for server in started:
        server.close()


#: Attestation cases that read no checkpoint: a checkpoint fault must leave them passing.
_NO_CHECKPOINT = [
    "attestation/holdings-statement-unknown-account",
    "attestation/holdings-statement-account-required",
]

#: The cases that execute a liquidation (the others are refused before anything is sold).
_EXECUTING = {
    "liquidation/executed-along-path",
    "liquidation/yield-paid-first",
    "liquidation/repeat-returns-same-receipt",
    "liquidation/other-caller-refused",
    "liquidation/stream-instruction-fresh-by-batch",
    "liquidation/amount-raised-part-way",
    "liquidation/call-expires-at-due-by",
    "liquidation/reused-id-refused",
    "liquidation/path-in-force-when-issued",
}

#: Faults only a custodian serving a second exchange (the kit's other exchange key) can show:
#: to a custodian serving one, a pledge to another exchange is an unknown exchange.
_SERVES_SECOND_EXCHANGE = {
    "custodian-pledges-to-two-exchanges",
    "custodian-streams-every-account-everywhere",
}

#: Faults only an account that nothing else attests anew can show: the daily yield of the kit
#: account's fund token gives it a new holdings statement every day, refreshed or not.
_QUIET_ACCOUNT = {"custodian-never-refreshes-holdings"}

MORE_CUSTODIAN_FAULTS: list[tuple[str, list[str], set[str]]] = [
    # What the exchange pays a client arrives whole, not a quantum more (§10.6).
    (
        "custodian-settlement-credits-a-quantum-more",
        ["settlement/exchange-pays-executed", "settlement/executed-after-window"],
        {"settlement/exchange-pays-executed"},
    ),
    # A settlement whose payer can no longer pay, at its deadline (§10.6).
    (
        "custodian-settles-what-it-cannot-pay",
        ["settlement/payer-short-at-execution-disputed"],
        {"settlement/payer-short-at-execution-disputed"},
    ),
    # What the payer of a settlement holds, and a net of 0 (§10.6).
    *(
        (
            fault,
            ["settlement/payer-funds-bound", "settlement/third-cycle-refused"],
            {"settlement/payer-funds-bound"},
        )
        for fault in (
            "custodian-settles-beyond-pledge",
            "custodian-settlement-funds-from-client-either-way",
            "custodian-settles-zero-net",
        )
    ),
    (
        # Every case that reads a checkpoint fails; only this one is run among them.
        "custodian-signs-checkpoints-with-unregistered-key",
        ["attestation/checkpoint-signed-by-custodian", *_NO_CHECKPOINT],
        {"attestation/checkpoint-signed-by-custodian"},
    ),
    (
        # Each of these reads the checkpoint at the log's latest size; earlier sizes, and
        # sizes beyond the log, are still answered as they should be.
        "custodian-refuses-checkpoint-at-log-size",
        ["attestation/**"],
        {
            "attestation/checkpoint-at-size",
            "attestation/checkpoint-origin-stable",
            "attestation/consistency-proof-verifies",
            "attestation/holdings-statement-attested",
        },
    ),
    (
        # A run holds every checkpoint to the first origin it saw: others are run apart.
        "custodian-alternates-checkpoint-origin",
        ["attestation/checkpoint-origin-stable", *_NO_CHECKPOINT],
        {"attestation/checkpoint-origin-stable"},
    ),
    (
        "custodian-same-size-proof-not-empty",
        ["attestation/**"],
        {"attestation/consistency-same-size-empty"},
    ),
    (
        # pledge-of-exactly-available-accepted first locks what is redeemable of its asset.
        "custodian-redemption-locks-nothing",
        ["custodian/**"],
        {
            "custodian/redemption-locks",
            "custodian/redemption-up-to-redeemable-accepted",
            "custodian/pledge-of-exactly-available-accepted",
        },
    ),
    (
        "custodian-redeems-pledged",
        ["custodian/**"],
        {
            "custodian/redemption-of-pledged-refused",
            "custodian/redemption-up-to-redeemable-accepted",
            "custodian/pledge-of-exactly-available-accepted",
        },
    ),
    (
        "custodian-settles-redemptions-early",
        ["custodian/redemption-settles-at-its-time"],
        {"custodian/redemption-settles-at-its-time"},
    ),
    (
        "custodian-never-settles-redemptions",
        ["custodian/redemption-settles-at-its-time"],
        {"custodian/redemption-settles-at-its-time"},
    ),
    (
        # Its kit account holds no fund token (_QUIET_ACCOUNT); the refresh case runs last.
        "custodian-never-refreshes-holdings",
        ["attestation/**"],
        {"attestation/holdings-refreshed-before-expiry"},
    ),
    (
        "custodian-redemption-bound-exclusive",
        ["custodian/**"],
        {
            "custodian/redemption-up-to-redeemable-accepted",
            "custodian/pledge-of-exactly-available-accepted",
        },
    ),
    ("custodian-yield-attested-as-deposit", ["custodian/**"], {"custodian/yield-accrual-attested"}),
    # Every case that executes a liquidation checks its receipt in full; the refusal does not.
    ("custodian-sells-past-step-maximum", ["liquidation/**"], _EXECUTING),
    ("custodian-sells-steps-out-of-order", ["liquidation/**"], _EXECUTING),
    # The zero-priced case raises its amount part-way through a step: rounded as any fill.
    (
        "custodian-rounds-proceeds-up",
        ["liquidation/**"],
        {*_EXECUTING, "liquidation/zero-priced-step-passed-over"},
    ),
    ("custodian-multiplies-at-28-digits", ["liquidation/**"], _EXECUTING),
    ("custodian-skips-yield-distribution", ["liquidation/**"], {"liquidation/yield-paid-first"}),
    (
        "custodian-re-signs-repeated-receipt",
        ["liquidation/**"],
        {"liquidation/repeat-returns-same-receipt"},
    ),
    (
        "custodian-liquidates-off-path",
        ["liquidation/**"],
        {"liquidation/off-path-refused", "liquidation/path-in-force-when-issued"},
    ),
    (
        "custodian-answers-reused-liquidation-id",
        ["liquidation/reused-id-refused", "liquidation/repeat-returns-same-receipt"],
        {"liquidation/reused-id-refused"},
    ),
    # Which path is in force for an instruction: the one when it was issued (§9.1).
    (
        "custodian-path-superseded-by-the-latest-only",
        ["liquidation/path-in-force-when-issued", "liquidation/off-path-refused"],
        {"liquidation/path-in-force-when-issued"},
    ),
    (
        "custodian-only-the-latest-path-authorised",
        ["liquidation/path-in-force-when-issued", "liquidation/off-path-refused"],
        {"liquidation/path-in-force-when-issued"},
    ),
    # What a custodian checks before it executes, and how much it sells (§4.5, §3.6.1, §9.2,
    # §9.3), each caught by the case written for it alone.
    (
        "custodian-takes-instructions-from-any-caller",
        ["liquidation/**"],
        {"liquidation/other-caller-refused"},
    ),
    (
        "custodian-judges-stream-instructions-at-receipt",
        ["liquidation/**"],
        {"liquidation/stream-instruction-fresh-by-batch"},
    ),
    (
        "custodian-liquidates-on-disputed-calls",
        ["liquidation/**"],
        {"liquidation/disputed-call-refused"},
    ),
    (
        # Only one second before due_by tells it: past it, the call has expired anyway.
        "custodian-liquidates-before-due-by",
        ["liquidation/**"],
        {"liquidation/call-expires-at-due-by"},
    ),
    (
        # Only the instruction issued at due_by itself tells it: the call is open through it.
        "custodian-liquidates-at-due-by",
        ["liquidation/**"],
        {"liquidation/call-expires-at-due-by"},
    ),
    (
        "custodian-takes-other-accounts-calls",
        ["liquidation/**"],
        {"liquidation/other-account-call-not-found"},
    ),
    # Only an amount the path can raise before its end, with a step of nothing pledged and
    # one priced below 1, tells these (the other cases sell every step in full).
    ("custodian-records-empty-fills", ["liquidation/**"], {"liquidation/amount-raised-part-way"}),
    (
        "custodian-skips-steps-priced-at-most-one",
        ["liquidation/**"],
        {"liquidation/amount-raised-part-way"},
    ),
    (
        "custodian-sells-whole-steps",
        ["liquidation/**"],
        {"liquidation/amount-raised-part-way", "liquidation/zero-priced-step-passed-over"},
    ),
    (
        "custodian-ignores-path-account",
        ["custodian/**"],
        {"custodian/path-of-another-account-refused"},
    ),
    (
        "custodian-ignores-path-exchange",
        ["custodian/**"],
        {"custodian/path-for-another-exchange-refused"},
    ),
    ("custodian-reuses-path-id", ["custodian/**"], {"custodian/path-id-reused-refused"}),
    # The pledge rules (§5.8, §9.1), run after the custodian/ cases they follow in a run.
    (
        # Its custodian serves a second exchange too (_SERVES_SECOND_EXCHANGE).
        "custodian-pledges-to-two-exchanges",
        ["custodian/**"],
        {"custodian/pledge-to-another-exchange-refused"},
    ),
    (
        # Its custodian serves a second exchange too, whose stream the kit reads (§5.8).
        "custodian-streams-every-account-everywhere",
        ["sync/holdings-change-attested", "sync/other-exchange-stream-isolated"],
        {"sync/other-exchange-stream-isolated"},
    ),
    (
        "custodian-pledge-bound-exclusive",
        ["custodian/**"],
        {"custodian/pledge-of-exactly-available-accepted"},
    ),
    (
        "custodian-top-up-attested-as-pledge",
        ["custodian/**"],
        {"custodian/pledge-reason-pledge-then-top-up"},
    ),
    (
        "custodian-checks-no-step-amounts",
        ["custodian/**"],
        {"custodian/path-with-bad-step-refused"},
    ),
    # Pledge release (§5.9): each rule on both sides, so each fault fails its own case only.
    (
        # The release past the pledge leaves it negative: every later case meets that account.
        "custodian-releases-beyond-pledge",
        ["pledge-release/**"],
        {
            "pledge-release/executed-within-pledge",
            "pledge-release/judged-on-latest-holdings",
            "pledge-release/only-the-account-parties",
            "pledge-release/repeat-answered-reused-id-refused",
            "pledge-release/malformed-refused",
        },
    ),
    (
        "custodian-release-bound-exclusive",
        ["pledge-release/**"],
        {"pledge-release/executed-within-pledge"},
    ),
    (
        "custodian-releases-on-any-holdings",
        ["pledge-release/**"],
        {"pledge-release/judged-on-latest-holdings"},
    ),
    (
        "custodian-releases-for-any-client",
        ["pledge-release/**"],
        {"pledge-release/only-the-account-parties"},
    ),
    (
        "custodian-releases-on-any-exchange-consent",
        ["pledge-release/**"],
        {"pledge-release/only-the-account-parties"},
    ),
    (
        # Both cases that check what a release moved.
        "custodian-release-lowers-quantity",
        ["pledge-release/**"],
        {
            "pledge-release/executed-within-pledge",
            "pledge-release/judged-on-latest-holdings",
        },
    ),
    (
        "custodian-re-executes-repeated-release",
        ["pledge-release/**"],
        {"pledge-release/repeat-answered-reused-id-refused"},
    ),
    ("custodian-cosignature-put-first", ["emergency/**"], {"emergency/cosign-appends-signature"}),
    (
        # Both cases that execute a release read the holdings statement it led to.
        "custodian-release-attested-as-liquidation",
        ["emergency/**"],
        {"emergency/two-of-three-executed", "emergency/regulator-custodian-executed-after-wait"},
    ),
    (
        # At a pending instruction's last second it has executed already; a dispute then
        # finds it executed.
        "custodian-settles-whole-day-early",
        ["settlement/**"],
        {
            "settlement/instruction-pending-until-window",
            "settlement/executed-after-window",
            "settlement/exchange-pays-executed",
            "settlement/dispute-at-deadline-refused",
        },
    ),
    # The time rules, each seen one second either side of its deadline (§10.2, §10.6, §11).
    (
        "custodian-settles-a-minute-late",
        ["settlement/**"],
        {"settlement/executed-after-window", "settlement/exchange-pays-executed"},
    ),
    (
        "custodian-dispute-window-from-instruction",
        ["settlement/**"],
        {"settlement/dispute-at-deadline-refused"},
    ),
    (
        "custodian-release-wait-from-issued-at",
        ["emergency/**"],
        {"emergency/regulator-custodian-executed-after-wait"},
    ),
    (
        "custodian-release-wait-is-dispute-window",
        ["emergency/**"],
        {"emergency/regulator-custodian-executed-after-wait"},
    ),
    (
        "custodian-states-view-when-asked",
        ["reconciliation/**"],
        {"reconciliation/view-frozen-at-cutoff"},
    ),
    (
        # Asked two days early it still refuses: only the case one second early sees it.
        "custodian-states-cutoff-a-minute-early",
        ["reconciliation/**"],
        {"reconciliation/view-frozen-at-cutoff"},
    ),
    (
        # Built as the clock passes the cut-off, it counts the kit's batch issued just after.
        "custodian-states-current-sync-heads",
        ["reconciliation/**"],
        {"reconciliation/sync-heads-at-cutoff"},
    ),
    (
        "custodian-reads-for-any-registered-party",
        ["access/**"],
        {"access/custodian/account-read-by-others-refused"},
    ),
    (
        "custodian-serves-strangers",
        ["access/**"],
        {"access/custodian/stranger-refused", "access/custodian/account-read-by-others-refused"},
    ),
    (
        "custodian-unknown-account-not-found-to-all",
        ["access/**"],
        {"access/custodian/account-read-by-others-refused"},
    ),
    (
        "custodian-refusal-names-the-parties",
        ["access/**"],
        {"access/custodian/account-read-by-others-refused"},
    ),
    # The refusal's metadata 'actual' is the caller's party id (§4.5).
    (
        "custodian-refusal-names-the-field-not-the-caller",
        ["access/**"],
        {"access/custodian/account-read-by-others-refused"},
    ),
    (
        "custodian-stranger-refusal-names-nobody",
        ["access/**"],
        {"access/custodian/stranger-refused"},
    ),
    (
        "custodian-evidence-refusal-names-nobody",
        ["evidence/**"],
        {"evidence/non-regulator-refused"},
    ),
    (
        # The kit reads leaves of every account as a regulator, and asks it for a missing one.
        "custodian-regulator-reads-nothing",
        ["access/**", "attestation/**"],
        {
            "access/custodian/account-read-by-its-parties",
            "attestation/holdings-statement-unknown-account",
            "attestation/inclusion-proof-verifies",
        },
    ),
    (
        "custodian-refuses-public-data-to-strangers",
        ["access/**"],
        {"access/custodian/stranger-reads-public-data"},
    ),
    (
        "custodian-account-hidden-from-its-exchange",
        ["access/**"],
        {"access/custodian/account-read-by-its-parties"},
    ),
    (
        # Every case that verifies a statement the custodian signed fails: two are run.
        "custodian-leaves-statement-id-empty",
        [
            "attestation/checkpoint-signed-by-custodian",
            "attestation/holdings-statement-attested",
            *_NO_CHECKPOINT,
        ],
        {"attestation/checkpoint-signed-by-custodian", "attestation/holdings-statement-attested"},
    ),
]


@pytest.mark.parametrize(
    ("fault", "run", "caught_by"),
    MORE_CUSTODIAN_FAULTS,
    ids=[f for f, _, _ in MORE_CUSTODIAN_FAULTS],
)
def test_a_broken_custodian_is_caught_by_its_cases(
    fault: str,
    run: list[str],
    caught_by: set[str],
    reference_parties: Parties,
    kit_files: dict[str, Path],
    broken: list[BrokenCustodian],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_path = tmp_path / "custodian.json"
    quiet = fault in _QUIET_ACCOUNT
    config = (quiet_custodian_config if quiet else custodian_config)(reference_parties, tmp_path)
    if fault in _SERVES_SECOND_EXCHANGE:
        config["peers"][OTHER_EXCHANGE] = None
    config_path.write_text(json.dumps(config, indent=2))
    server = BrokenCustodian(
        role="custodian", config_path=config_path, log_path=tmp_path / "custodian.log", fault=fault
    )
    broken.append(server)
    server.start()
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


def test_a_custodian_serving_two_exchanges_keeps_their_streams_apart(
    start_server: Any,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The reference custodian with a second exchange peer: its stream is served, and isolated."""
    config = custodian_config(reference_parties, tmp_path)
    config["peers"][OTHER_EXCHANGE] = None
    server = start_server("custodian", config, name="two-exchanges")
    argv = kit_argv(
        kit_files,
        server.address,
        "--account",
        KIT_ACCOUNT,
        *_globs("sync/holdings-change-attested", "sync/other-exchange-stream-isolated"),
    )
    assert _failed(argv, tmp_path / "reports", capsys) == set()
    # Served, not refused: the case read the second exchange's stream.
    assert f"sync stream with {OTHER_EXCHANGE} opened" in server.log_text()


def test_every_broken_custodian_fault_is_tested() -> None:
    assert {f for f, _, _ in MORE_CUSTODIAN_FAULTS} == set(FAULTS)


def test_an_unknown_custodian_fault_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_broken(["no-such-fault", "serve", "custodian"]) == 2
    assert "usage" in capsys.readouterr().err
