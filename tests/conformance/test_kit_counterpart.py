"""The kit against a reference exchange that dials the kit's own custodian (``--listen``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from collateral_sync.errors import VerificationError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.transport import TlsConfig
from collateral_sync.v1 import position_sync_pb2, valuation_pb2
from collateral_sync_conformance import main
from collateral_sync_conformance._counterpart import KitCustodian
from collateral_sync_conformance._expect import CaseFailure
from collateral_sync_conformance._forge import make_header, seal
from collateral_sync_conformance._registry import REGISTRY, Role

from .conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    FURTHER_IDENTITIES,
    OTHER_CLIENT,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
    parties_identity_argv,
)

ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def exchange_config(parties: Parties, directory: Path, custodian: str) -> dict[str, Any]:
    """A reference exchange whose custodian is at ``custodian`` (the kit)."""
    return parties.config(
        EXCHANGE,
        "exchange",
        directory,
        peers={CUSTODIAN: custodian, REGULATOR: None},
        exchange={
            "log_origin": ORIGIN,
            "prices": [
                {"asset_id": "BTC", "price": "60000"},
                {"asset_id": "USDC", "price": "1"},
                {"asset_id": "BENJI", "price": "1"},
            ],
            # Short enough for the kit to wait out a silence (§11.2), long beside the
            # kit's one-second heartbeats.
            "risk_policy": {"custodian_staleness_window_seconds": 8},
        },
    )


def counterpart_argv(
    parties: Parties, target: str, listen: str, state_dir: Path, *extra: str
) -> list[str]:
    """``run`` arguments for an exchange at ``target`` that dials the kit at ``listen``."""
    custodian_tls = parties.pki.party(CUSTODIAN)
    return [
        "run",
        "--role",
        "exchange",
        "--target",
        target,
        "--server-party",
        EXCHANGE,
        "--ca",
        str(parties.pki.ca_cert),
        "--cert",
        str(custodian_tls.cert),
        "--key",
        str(custodian_tls.key),
        "--registry",
        str(parties.registry_path),
        "--kit-key",
        str(parties.key_path(CUSTODIAN)),
        "--kit-key",
        str(parties.key_path(CLIENT)),
        # A registered client that does not own the kit's accounts (pledge-release/*).
        "--kit-key",
        str(parties.key_path(OTHER_CLIENT)),
        *parties_identity_argv(parties, *FURTHER_IDENTITIES),
        "--listen",
        listen,
        "--state-dir",
        str(state_dir),
        "--log-origin",
        ORIGIN,
        "--no-colour",
        *extra,
    ]


@pytest.fixture(scope="module")
def dialling_exchange(
    start_server: StartServer,
    reference_parties: Parties,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ServerProcess, str, Path]:
    """A reference exchange in test mode whose custodian is the kit: (server, listen, state)."""
    listen = f"127.0.0.1:{free_port()}"
    directory = tmp_path_factory.mktemp("counterpart-exchange")
    server = start_server("exchange", exchange_config(reference_parties, directory, listen))
    return server, listen, tmp_path_factory.mktemp("kit-state")


def run_kit(argv: list[str], report_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    code = main([*argv, "--report-dir", str(report_dir)])
    document: dict[str, Any] = json.loads((report_dir / "results.json").read_text("utf-8"))
    return code, document["cases"]


def test_reference_exchange_passes_every_must_case_against_the_kit_custodian(
    dialling_exchange: tuple[ServerProcess, str, Path],
    reference_parties: Parties,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, listen, state = dialling_exchange
    argv = counterpart_argv(reference_parties, server.address, listen, state)
    code, cases = run_kit(argv, tmp_path)
    out = capsys.readouterr().out
    not_passed = [
        (c["id"], c["verdict"], c["message"])
        for c in cases
        if c["level"] == "MUST" and c["verdict"] != "passed"
    ]
    assert not_passed == [], out + server.log_text()[-3000:]
    assert code == 0, out
    assert f"custodian at {listen}" in out  # the header says what the kit serves
    assert {c["id"] for c in cases} == {c.id for c in REGISTRY.for_role(Role.EXCHANGE)}


def _kit_custodian(parties: Parties, state: Path) -> KitCustodian:
    return KitCustodian(
        listen="127.0.0.1:0",
        state_dir=state,
        tls=TlsConfig.from_dev_pki(parties.pki, CUSTODIAN),
        registry=parties.registry,
        signer=SigningKey.load(parties.key_path(CUSTODIAN)),
        exchange_id=EXCHANGE,
        log_origin=ORIGIN,
        sequences=itertools.count(1).__next__,
    )


def test_a_statement_from_the_exchange_that_does_not_verify_fails_its_batch_and_the_case(
    reference_parties: Parties, tmp_path: Path
) -> None:
    """What the kit's custodian does with what the exchange sends (§6.5), without a server."""

    async def scenario() -> None:
        kit = _kit_custodian(reference_parties, tmp_path)
        try:
            now = datetime.now(UTC)
            good = sign_statement(
                valuation_pb2.RiskPolicy(version=1),
                SigningKey.load(reference_parties.key_path(EXCHANGE)),
                audience=[CUSTODIAN],
                sequence=1,
                ttl=timedelta(minutes=5),
                issued_at=now,
            )
            kit._apply([(1, position_sync_pb2.PositionUpdate(risk_policy=good))])
            assert [u.variant for u in kit.received] == ["risk_policy"]
            assert await kit.wait_for(lambda: kit.received, 1.0) == kit.received

            # A risk policy signed by a client: refused, with the reason kept.
            policy = valuation_pb2.RiskPolicy(version=2)
            policy.header.CopyFrom(
                make_header(
                    issuer=CLIENT,
                    audience=[CUSTODIAN],
                    sequence=2,
                    issued_at=now,
                    expires_at=now + timedelta(minutes=5),
                    statement_id="from-a-client",
                )
            )
            forged = seal(policy, [SigningKey.load(reference_parties.key_path(CLIENT))])
            with pytest.raises(VerificationError):
                kit._apply([(2, position_sync_pb2.PositionUpdate(risk_policy=forged))])
            assert len(kit.received) == 1
            assert "KEY_ROLE_MISMATCH" in kit.violations[0]

            # A case waiting for what the exchange sends learns of it, and fails.
            with pytest.raises(CaseFailure) as failure:
                await kit.wait_for(lambda: None, 1.0)
            assert "KEY_ROLE_MISMATCH" in failure.value.got
            # Reported once: the next wait is judged on what comes next.
            assert await kit.wait_for(lambda: kit.received, 0.1) == kit.received
        finally:
            await kit.stop()

    asyncio.run(scenario())
