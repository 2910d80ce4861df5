"""Every case of the kit is shown able to fail.

A case that passes against every server proves nothing. Two kinds of evidence
are gathered here:

- a server that refuses nothing (a proxy that turns every refusal of the
  protocol's services into OK) must fail every case that expects a refusal —
  the negative cases of the three roles, whatever the RPC and rule;
- every other case is named by at least one targeted fault of the other test
  modules (a proxy fault or a broken reference server, each caught by exactly
  its cases).

``test_every_case_is_shown_able_to_fail`` joins the two: a new case that no
fault catches fails it until one is written, or until it is listed in
``NOT_YET_SHOWN`` with the reason — and a listed case that some fault does
catch fails it too, so the list cannot go stale.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from collateral_sync.transport import TlsConfig
from collateral_sync_conformance import main
from collateral_sync_conformance._registry import REGISTRY, Role

from . import (
    test_kit_broken_custodians,
    test_kit_broken_servers,
    test_kit_cosign,
    test_kit_exchange,
    test_kit_faults,
    test_kit_reconciliation,
    test_kit_regulator,
)
from .conftest import (
    CUSTODIAN,
    EXCHANGE,
    KIT_ACCOUNT,
    REGULATOR,
    Parties,
    ServerProcess,
    further_tls,
    kit_argv,
    regulator_argv,
)
from .fault_proxy import Fault, FaultProxy, Refusal
from .test_kit_exchange import COUNTERPART_CASES, FORGED_RESPONSE_CASES, _exchange_argv
from .test_kit_regulator import listening

# The servers of those modules' tests, as fixtures of this module too.
exchange = test_kit_exchange.exchange
regulator = test_kit_regulator.regulator

#: Cases that expect the server to refuse what the kit sends (transport refusals
#: happen below gRPC, where the proxy's fault does not reach: they have their own).
REFUSAL = re.compile(r"^(?!transport/).*-(refused|not-found|bad-page-token|limit-exceeded)$")

#: Cases that are not named like a refusal but rest on one, so they fail too.
ALSO_REFUSALS = {
    Role.CUSTODIAN: {
        "attestation/holdings-statement-account-required",
        "attestation/holdings-statement-unknown-account",
        "attestation/inclusion-index-out-of-range",
        # Locks up to the bound, then checks one quantum more is refused.
        "custodian/redemption-up-to-redeemable-accepted",
        # Pledges up to the bound, then checks one quantum more is refused.
        "custodian/pledge-of-exactly-available-accepted",
        # Releases up to the pledge, then checks one quantum more is refused.
        "pledge-release/executed-within-pledge",
        # A consent on the statement before the latest is refused, then one on the latest executed.
        "pledge-release/judged-on-latest-holdings",
        # Another client's request and another exchange's consent must be refused.
        "pledge-release/only-the-account-parties",
        # Refused one second before the wait ends, then executed at its end.
        "emergency/regulator-custodian-executed-after-wait",
        # Its statement is refused one second before the cut-off.
        "reconciliation/view-frozen-at-cutoff",
        # Exactly what the payer holds is accepted, one quantum more and a net of 0 refused.
        "settlement/payer-funds-bound",
        # The wrong cycle numbers are refused, the right ones accepted.
        "settlement/cycle-of-day-counted",
    },
    Role.EXCHANGE: set(),
    Role.REGULATOR: {"regulator/result-not-found-before-both"},
}

#: Cases no fault has shown able to fail yet, with the reason (none today).
NOT_YET_SHOWN: dict[str, str] = {}


def _refuses_nothing(called: str, refusal: Refusal) -> bytes | None:
    """Answer OK (an empty response) to every refusal of the protocol's own services."""
    if called.startswith("/collateral_sync.v1.") and "TestControlService" not in called:
        return b""
    return None


REFUSES_NOTHING = Fault("refuses nothing", on_refusal=_refuses_nothing)


#: Per role, what the refuses-nothing run leaves out: the kit's sync cases leave
#: evidence against its exchange party at the custodian, which would stop the
#: reference exchange of the same party that shares this module's custodian, and
#: its liquidation cases (the policy they publish) and reconciliation/sync-heads-at-cutoff
#: write to that party's exchange-to-custodian log behind that exchange's back
#: (liquidation/off-path-refused is shown by custodian-liquidates-off-path instead); an
#: exchange's own sync and crediting run against the kit's custodian, not its API.
LEFT_OUT = {
    Role.CUSTODIAN: ("sync/", "liquidation/", "reconciliation/sync-heads-at-cutoff"),
    Role.EXCHANGE: (
        *(glob.removesuffix("**") for glob in COUNTERPART_CASES),
        # The kit's account at this exchange is worth nothing (a 0.001 USDC pledge),
        # so there is no exposure to set; test_kit_cosign runs it where there is.
        "emergency/cosign/open-exposure-refused",
    ),
    Role.REGULATOR: (),
}


def refusal_cases(role: Role) -> set[str]:
    """What a server of ``role`` that refuses nothing must fail (and nothing else)."""
    named = {c.id for c in REGISTRY.for_role(role) if REFUSAL.search(c.id)}
    return {c for c in named | ALSO_REFUSALS[role] if not c.startswith(LEFT_OUT[role])}


def _skips(role: Role) -> list[str]:
    globs = [prefix + "**" if prefix.endswith("/") else prefix for prefix in LEFT_OUT[role]]
    return [arg for glob in globs for arg in ("--skip", glob)]


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    started: list[FaultProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def _proxy(
    proxies: list[FaultProxy], parties: Parties, address: str, client: str, server: str
) -> str:
    proxy = FaultProxy(
        address,
        client_tls=TlsConfig.from_dev_pki(parties.pki, client),
        server_tls=TlsConfig.from_dev_pki(parties.pki, server),
        fault=REFUSES_NOTHING,
        identities=further_tls(parties),
    )
    proxies.append(proxy)
    return proxy.start()


def _failed(argv: list[str], reports: Path, capsys: pytest.CaptureFixture[str]) -> set[str]:
    code = main([*argv, "--report-dir", str(reports)])
    output = capsys.readouterr().out
    assert code == 1, output
    cases = json.loads((reports / "results.json").read_text("utf-8"))["cases"]
    assert not any(c["verdict"] in ("error", "skipped") for c in cases), output
    failed = {c["id"] for c in cases if c["verdict"] == "failed"}
    for case in cases:
        if case["id"] in failed:
            assert case["failure"]["expected"], case
            assert case["failure"]["got"], case
    return failed


def test_an_exchange_that_refuses_nothing_fails_exactly_the_refusal_cases(
    exchange: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    proxies: list[FaultProxy],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = _proxy(proxies, reference_parties, exchange.address, CUSTODIAN, EXCHANGE)
    argv = _exchange_argv(
        reference_parties, kit_files, address, "--account", KIT_ACCOUNT, *_skips(Role.EXCHANGE)
    )
    assert _failed(argv, tmp_path, capsys) == refusal_cases(Role.EXCHANGE)


def test_a_custodian_that_refuses_nothing_fails_exactly_the_refusal_cases(
    custodian: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    proxies: list[FaultProxy],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = _proxy(proxies, reference_parties, custodian.address, EXCHANGE, CUSTODIAN)
    argv = kit_argv(kit_files, address, "--account", KIT_ACCOUNT, *_skips(Role.CUSTODIAN))
    assert _failed(argv, tmp_path, capsys) == refusal_cases(Role.CUSTODIAN)


def test_a_regulator_that_refuses_nothing_fails_exactly_the_refusal_cases(
    regulator: ServerProcess,
    reference_parties: Parties,
    proxies: list[FaultProxy],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = _proxy(proxies, reference_parties, regulator.address, CUSTODIAN, REGULATOR)
    argv = regulator_argv(reference_parties, address, *listening())
    assert _failed(argv, tmp_path, capsys) == refusal_cases(Role.REGULATOR)


def _shown() -> set[str]:
    """Every case some test shows failing against a server broken for it."""
    shown: set[str] = set()
    for role in Role:
        shown |= refusal_cases(role)
    for _, _, caught in test_kit_faults.FAULTS:
        shown |= caught
    for faults in (
        test_kit_broken_servers.CUSTODIAN_FAULTS,
        test_kit_broken_servers.EXCHANGE_FAULTS,
        test_kit_broken_servers.COUNTERPART_FAULTS,
        test_kit_broken_servers.REGULATOR_FAULTS,
        test_kit_broken_custodians.MORE_CUSTODIAN_FAULTS,
    ):
        for _, _, caught in faults:
            shown |= caught
    for _, caught in (*test_kit_cosign.REGULATOR_FAULTS, *test_kit_cosign.EXCHANGE_FAULTS):
        shown |= caught
    for _, caught in test_kit_reconciliation.BROKEN.values():
        shown |= caught
    shown |= FORGED_RESPONSE_CASES
    # test_a_custodian_that_loses_an_acknowledged_entry_on_restart_is_caught:
    shown.add("sync/latest-holdings-streamed")
    return shown


def test_every_case_is_shown_able_to_fail() -> None:
    everything = {case.id for case in REGISTRY}
    shown = _shown()
    assert shown <= everything, f"faults name cases that do not exist: {sorted(shown - everything)}"
    unshown = everything - shown - NOT_YET_SHOWN.keys()
    assert unshown == set(), f"cases no fault shows able to fail: {sorted(unshown)}"
    stale = NOT_YET_SHOWN.keys() & shown
    assert stale == set(), f"NOT_YET_SHOWN lists cases a fault now catches: {sorted(stale)}"
