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

import pytest

from .broken_custodians import FAULTS
from .broken_custodians import main as launch_broken
from .conftest import KIT_ACCOUNT, Parties, custodian_config, kit_argv
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

#: The cases that execute a liquidation (the fourth is refused before anything is sold).
_EXECUTING = {
    "liquidation/executed-along-path",
    "liquidation/yield-paid-first",
    "liquidation/repeat-returns-same-receipt",
}

MORE_CUSTODIAN_FAULTS: list[tuple[str, list[str], set[str]]] = [
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
        "custodian-redemption-locks-nothing",
        ["custodian/**"],
        {"custodian/redemption-locks", "custodian/redemption-up-to-redeemable-accepted"},
    ),
    (
        "custodian-redeems-pledged",
        ["custodian/**"],
        {
            "custodian/redemption-of-pledged-refused",
            "custodian/redemption-up-to-redeemable-accepted",
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
        "custodian-redemption-bound-exclusive",
        ["custodian/**"],
        {"custodian/redemption-up-to-redeemable-accepted"},
    ),
    ("custodian-yield-attested-as-deposit", ["custodian/**"], {"custodian/yield-accrual-attested"}),
    # Every case that executes a liquidation checks its receipt in full; the refusal does not.
    ("custodian-sells-past-step-maximum", ["liquidation/**"], _EXECUTING),
    ("custodian-sells-steps-out-of-order", ["liquidation/**"], _EXECUTING),
    ("custodian-rounds-proceeds-up", ["liquidation/**"], _EXECUTING),
    ("custodian-skips-yield-distribution", ["liquidation/**"], {"liquidation/yield-paid-first"}),
    (
        "custodian-re-signs-repeated-receipt",
        ["liquidation/**"],
        {"liquidation/repeat-returns-same-receipt"},
    ),
    ("custodian-liquidates-off-path", ["liquidation/**"], {"liquidation/off-path-refused"}),
    ("custodian-cosignature-put-first", ["emergency/**"], {"emergency/cosign-appends-signature"}),
    (
        "custodian-release-attested-as-liquidation",
        ["emergency/**"],
        {"emergency/two-of-three-executed"},
    ),
    (
        "custodian-settles-whole-day-early",
        ["settlement/**"],
        {"settlement/instruction-pending-until-window"},
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
    config_path.write_text(json.dumps(custodian_config(reference_parties, tmp_path), indent=2))
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


def test_every_broken_custodian_fault_is_tested() -> None:
    assert {f for f, _, _ in MORE_CUSTODIAN_FAULTS} == set(FAULTS)


def test_an_unknown_custodian_fault_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_broken(["no-such-fault", "serve", "custodian"]) == 2
    assert "usage" in capsys.readouterr().err
