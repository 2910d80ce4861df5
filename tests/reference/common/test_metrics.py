"""Prometheus metrics of the reference servers, scraped from real processes over HTTP.

A custodian and an exchange run with ``"metrics": {"listen": "127.0.0.1:0"}``
(each prints ``METRICS host:port`` after its ``LISTENING`` line). The test
scrapes both, pledges and deposits so that the sync stream carries entries,
scrapes again once both sides are in step, and checks that the figures moved:
RPCs by method and code, entries applied, the attestation log, sync lag back
to 0. A refused RPC shows with its code; a bad ``metrics`` section is refused
at start with one line and exit code 2. The catalogue, docs/OPERATIONS.md and
the ready Prometheus files in docs/ops are held together.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
import yaml
from _postgres import PostgresServer
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.errors import RPCError, StorageError
from collateral_sync.server import create_server, serve
from collateral_sync.signing import sign_statement
from collateral_sync.transport import plaintext_channel_for_testing
from collateral_sync.v1 import (
    custodian_service_pb2,
    errors_pb2,
    liquidation_pb2,
    test_control_pb2,
    test_control_pb2_grpc,
)
from collateral_sync_reference.common.config import MetricsSettings
from collateral_sync_reference.common.metrics import ServerMetrics, catalogue
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from prometheus_client.metrics_core import Metric

from .._scrape import Samples, metrics_address, scrape, value
from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    ROOT,
    STRANGER,
    Parties,
    ServerProcess,
    StartServer,
    serve_custodian_once,
)

_T = TypeVar("_T")
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
ACCOUNT = "metrics-acct"
WAIT = 30.0
CUSTODIAN_SERVICE = "collateral_sync.v1.CustodianService"
CONTROL_SERVICE = "collateral_sync.v1.TestControlService"
_SEQUENCE = itertools.count(1)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def start_pair(
    parties: Parties, start_server: StartServer, directory: Path
) -> tuple[ServerProcess, str, ServerProcess, str]:
    metrics = {"listen": "127.0.0.1:0"}
    custodian = start_server(
        "custodian",
        parties.config(
            CUSTODIAN,
            "custodian",
            directory,
            peers={EXCHANGE: None},
            metrics=metrics,
            custodian={
                "accounts": [
                    {"account_id": ACCOUNT, "client_id": CLIENT, "holdings": {"USDC": "100000"}}
                ]
            },
        ),
        name=f"{directory.name}-custodian",
    )
    custodian_metrics = metrics_address(custodian)
    exchange = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            directory,
            peers={CUSTODIAN: custodian.address},
            metrics=metrics,
            exchange={
                "custodian": CUSTODIAN,
                "log_origin": ORIGIN,
                "prices": [{"asset_id": "USDC", "price": "1"}],
            },
        ),
        name=f"{directory.name}-exchange",
    )
    return custodian, custodian_metrics, exchange, metrics_address(exchange)


def sign(message: Message, parties: Parties, *, now: datetime, statement_id: str) -> Any:
    return sign_statement(
        message,
        parties.keys[CLIENT],
        audience=[CUSTODIAN],
        sequence=next(_SEQUENCE),
        ttl=timedelta(hours=1),
        issued_at=now,
        statement_id=statement_id,
    )


async def pledge(parties: Parties, custodian: CustodianClient, now: datetime) -> None:
    path = liquidation_pb2.LiquidationPath(
        account_id=ACCOUNT,
        exchange_id=EXCHANGE,
        proceeds_account_id=f"{EXCHANGE}/settlement",
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id="USDC", venue="otc", max_quantity=amount_to_proto("50000")
            )
        ],
    )
    instruction = custodian_service_pb2.PledgeInstruction(
        account_id=ACCOUNT, exchange_id=EXCHANGE, asset_id="USDC", quantity=amount_to_proto("50000")
    )
    await custodian.pledge_collateral(
        custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=sign(instruction, parties, now=now, statement_id="pledge"),
            liquidation_path=sign(path, parties, now=now, statement_id="path"),
        )
    )


async def in_step(
    custodian_at: str,
    exchange_at: str,
    *,
    applied_at_least: float,
    counted: Callable[[Samples], bool] = lambda samples: True,
) -> tuple[Samples, Samples]:
    """The first scrapes where the exchange applied that many entries and nobody lags.

    ``counted`` waits for the custodian's figures of calls just answered too: a
    server counts a call once it is done on its side, which may be just after
    the client has the answer.
    """
    async with asyncio.timeout(WAIT):
        while True:
            ours, theirs = (
                await asyncio.to_thread(scrape, custodian_at),
                await asyncio.to_thread(scrape, exchange_at),
            )
            applied = value(theirs, "collateral_sync_sync_entries_applied_total", peer=CUSTODIAN)
            lags = [
                value(samples, "collateral_sync_sync_lag_entries", peer=peer, direction=direction)
                for samples, peer in ((ours, EXCHANGE), (theirs, CUSTODIAN))
                for direction in ("outgoing", "incoming")
            ]
            if applied >= applied_at_least and lags == [0, 0, 0, 0] and counted(ours):
                return ours, theirs
            await asyncio.sleep(0.1)


def test_a_running_pair_shows_its_figures_moving(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    parties = reference_parties
    custodian, custodian_at, _exchange, exchange_at = start_pair(parties, start_server, tmp_path)

    async def scenario() -> tuple[Samples, Samples, Samples, Samples]:
        before = (
            await asyncio.to_thread(scrape, custodian_at),
            await asyncio.to_thread(scrape, exchange_at),
        )
        async with parties.channel(custodian.address, EXCHANGE) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            duration = duration_pb2.Duration()
            now = (
                await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=duration))
            ).now
            await pledge(parties, client, now.ToDatetime(tzinfo=UTC))
            for _ in range(3):
                await control.deposit(
                    test_control_pb2.DepositRequest(
                        account_id=ACCOUNT, asset_id="USDC", quantity=amount_to_proto("10")
                    )
                )
            # Refused by the servicer: no pledge instruction (INVALID_ARGUMENT).
            with pytest.raises(RPCError) as refused:
                await client.pledge_collateral(custodian_service_pb2.PledgeCollateralRequest())
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # Refused by the access check, before any servicer: a party the registry does not know.
        async with parties.channel(custodian.address, STRANGER) as channel:
            with pytest.raises(RPCError) as stranger:
                await CustodianClient(channel).get_holdings_statement(
                    custodian_service_pb2.GetHoldingsStatementRequest(account_id=ACCOUNT)
                )
        # A pledge and three deposits: four holdings changes announced to the exchange.
        initial = value(before[1], "collateral_sync_sync_entries_applied_total", peer=CUSTODIAN)
        after = await in_step(
            custodian_at,
            exchange_at,
            applied_at_least=initial + 4,
            counted=lambda samples: (
                value(
                    samples,
                    "collateral_sync_rpcs_total",
                    service=CUSTODIAN_SERVICE,
                    method="GetHoldingsStatement",
                    code="PERMISSION_DENIED",
                )
                > 0
            ),
        )
        assert stranger.value.code == grpc.StatusCode.PERMISSION_DENIED
        return (*before, *after)

    custodian_before, exchange_before, custodian_after, exchange_after = run(scenario())

    def moved(name: str, samples: tuple[Samples, Samples], **labels: str) -> tuple[float, float]:
        return value(samples[0], name, **labels), value(samples[1], name, **labels)

    on_custodian = (custodian_before, custodian_after)
    on_exchange = (exchange_before, exchange_after)
    rpcs = "collateral_sync_rpcs_total"
    pledged_ok = moved(
        rpcs, on_custodian, service=CUSTODIAN_SERVICE, method="PledgeCollateral", code="OK"
    )
    assert pledged_ok == (0, 1)
    deposits = moved(rpcs, on_custodian, service=CONTROL_SERVICE, method="Deposit", code="OK")
    assert deposits == (0, 3)
    refused = moved(
        rpcs,
        on_custodian,
        service=CUSTODIAN_SERVICE,
        method="PledgeCollateral",
        code="INVALID_ARGUMENT",
    )
    assert refused == (0, 1)
    # The stranger's call, refused by the access check (the exchange may read statements too).
    denied = moved(
        rpcs,
        on_custodian,
        service=CUSTODIAN_SERVICE,
        method="GetHoldingsStatement",
        code="PERMISSION_DENIED",
    )
    assert denied == (0, 1)
    timed = moved(
        "collateral_sync_rpc_duration_seconds_count",
        on_custodian,
        service=CUSTODIAN_SERVICE,
        method="PledgeCollateral",
    )
    assert timed == (0, 2)
    # The exchange's SyncPositions stream stays open: a gauge, not a count.
    open_streams = value(
        custodian_after,
        "collateral_sync_rpc_streams_open",
        service=CUSTODIAN_SERVICE,
        method="SyncPositions",
    )
    assert open_streams == 1

    applied = moved("collateral_sync_sync_entries_applied_total", on_exchange, peer=CUSTODIAN)
    assert applied[1] >= applied[0] + 4
    batches = moved("collateral_sync_sync_batches_applied_total", on_exchange, peer=CUSTODIAN)
    assert 1 <= batches[1] - batches[0] <= applied[1] - applied[0]
    log_size = moved("collateral_sync_attestation_log_size", on_custodian)
    assert log_size[1] >= log_size[0] + 4
    assert value(custodian_after, "collateral_sync_attestation_checkpoint_age_seconds") >= 0
    for samples, peer in ((custodian_after, EXCHANGE), (exchange_after, CUSTODIAN)):
        assert value(samples, "collateral_sync_sync_connected", peer=peer) == 1
        assert (
            value(samples, "collateral_sync_sync_lag_seconds", peer=peer, direction="outgoing") == 0
        )
        incoming = value(
            samples, "collateral_sync_sync_lag_seconds", peer=peer, direction="incoming"
        )
        assert 0 <= incoming < WAIT
        for certificate in ("server", "ca"):
            expiry = value(
                samples, "collateral_sync_certificate_expiry_seconds", certificate=certificate
            )
            assert expiry > 86_400
    assert value(exchange_after, "collateral_sync_margin_calls", state="ISSUED") == 0
    assert ("collateral_sync_liquidations_total", ()) in exchange_after
    assert ("collateral_sync_liquidations_total", ()) in custodian_after
    info = value(
        custodian_after,
        "collateral_sync_server_info",
        role="custodian",
        party_id=CUSTODIAN,
        version="0.1.0",
    )
    assert info == 1


def test_sync_lag_grows_while_the_exchange_is_away_and_returns_to_zero(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    parties = reference_parties
    custodian, custodian_at, exchange, exchange_at = start_pair(parties, start_server, tmp_path)
    lag = "collateral_sync_sync_lag_entries"

    async def deposit(control: TestControlClient, times: int) -> None:
        for _ in range(times):
            await control.deposit(
                test_control_pb2.DepositRequest(
                    account_id=ACCOUNT, asset_id="USDC", quantity=amount_to_proto("1")
                )
            )

    async def scenario() -> None:
        nonlocal exchange_at
        async with parties.channel(custodian.address, EXCHANGE) as channel:
            control = TestControlClient(channel)
            duration = duration_pb2.Duration()
            now = (
                await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=duration))
            ).now
            await pledge(parties, CustodianClient(channel), now.ToDatetime(tzinfo=UTC))
            await in_step(custodian_at, exchange_at, applied_at_least=1)

            await asyncio.to_thread(exchange.stop)
            async with asyncio.timeout(WAIT):
                while value(scrape(custodian_at), "collateral_sync_sync_connected", peer=EXCHANGE):
                    await asyncio.sleep(0.05)
            await deposit(control, 3)
            away = await asyncio.to_thread(scrape, custodian_at)
            assert value(away, lag, peer=EXCHANGE, direction="outgoing") >= 3

            await asyncio.to_thread(exchange.start)
            exchange_at = metrics_address(exchange)
            # The restarted exchange counts from 0: the three deposits at least.
            ours, theirs = await in_step(custodian_at, exchange_at, applied_at_least=3)
            assert value(ours, "collateral_sync_sync_connected", peer=EXCHANGE) == 1
            assert value(theirs, lag, peer=CUSTODIAN, direction="incoming") == 0

    run(scenario())


def test_a_standby_serves_its_metrics_while_it_waits_and_its_role_figures_once_active(
    reference_parties: Parties,
    start_server: StartServer,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    parties = reference_parties
    storage = postgres.storage_config(str(tmp_path / CUSTODIAN))
    accounts = [{"account_id": ACCOUNT, "client_id": CLIENT, "holdings": {"USDC": "1"}}]

    def config(listen: str) -> dict[str, Any]:
        document = parties.config(
            CUSTODIAN,
            "custodian",
            tmp_path,
            peers={EXCHANGE: None},
            metrics={"listen": listen},
            custodian={"accounts": accounts},
        )
        document["storage"] = storage
        return document

    active = start_server("custodian", config("127.0.0.1:0"), name="metrics-active")
    active_at = metrics_address(active)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        standby_at = f"127.0.0.1:{probe.getsockname()[1]}"
    standby = start_server("custodian", config(standby_at), name="metrics-standby", standby=True)
    assert standby.standby
    info = {"role": "custodian", "party_id": CUSTODIAN, "version": "0.1.0"}
    log_size = ("collateral_sync_attestation_log_size", ())

    waiting = scrape(standby_at)
    assert value(waiting, "collateral_sync_server_info", **info) == 1
    assert value(waiting, "collateral_sync_certificate_expiry_seconds", certificate="server") > 0
    assert log_size not in waiting
    assert log_size in scrape(active_at)

    active.kill()
    standby.wait_active()
    assert metrics_address(standby) == standby_at
    serving = scrape(standby_at)
    assert log_size in serving
    assert value(serving, "collateral_sync_sync_connected", peer=EXCHANGE) == 0


class _RefusingControl(test_control_pb2_grpc.TestControlServiceServicer):
    __test__ = False

    async def Deposit(
        self, request: test_control_pb2.DepositRequest, context: grpc.aio.ServicerContext
    ) -> test_control_pb2.DepositResponse:
        raise StorageError(
            "storage is full: nothing was written", reason=errors_pb2.ERROR_REASON_STORAGE_FULL
        )


def _failing_reading() -> list[Metric]:
    raise RuntimeError("a bug in a reading")


def _seven_liquidations() -> list[Metric]:
    family = catalogue.LIQUIDATIONS.family()
    family.add_metric([], 7)
    return [family]


def test_a_storage_refusal_counts_and_a_failing_reading_leaves_only_itself_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In one process: the status's ErrorInfo reason is what counts as a storage error."""
    rpcs = "collateral_sync_rpcs_total"

    async def scenario() -> Samples:
        metrics = ServerMetrics(
            MetricsSettings("127.0.0.1:0"), role="custodian", party_id=CUSTODIAN
        )
        metrics.add_source(_failing_reading)
        metrics.add_source(_seven_liquidations)
        server = create_server(
            tls=None,
            plaintext_for_testing=True,
            servicers=[_RefusingControl()],
            interceptors=metrics.interceptors(),
        )
        async with serve(server) as port:
            address = metrics.start()
            assert address is not None
            try:
                async with plaintext_channel_for_testing(f"127.0.0.1:{port}") as channel:
                    with pytest.raises(RPCError) as refused:
                        await TestControlClient(channel).deposit(test_control_pb2.DepositRequest())
                assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                async with asyncio.timeout(WAIT):
                    while True:  # the server counts once the call is done on its side
                        samples = await asyncio.to_thread(scrape, address)
                        if value(
                            samples,
                            rpcs,
                            service=CONTROL_SERVICE,
                            method="Deposit",
                            code="RESOURCE_EXHAUSTED",
                        ):
                            return samples
                        await asyncio.sleep(0.01)
            finally:
                metrics.stop()

    samples = run(scenario())
    assert value(samples, "collateral_sync_storage_errors_total", reason="STORAGE_FULL") == 1
    assert value(samples, "collateral_sync_liquidations_total") == 7
    assert "metrics: reading _failing_reading failed; left out" in caplog.text


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"listen": "nowhere"}, "metrics.listen: expected host:port"),
        ({"listen": "127.0.0.1:9464", "port": 9464}, "metrics.port: expected a known key"),
        ({}, "metrics.listen: expected a value"),
        ("127.0.0.1:9464", "metrics: expected an object"),
    ],
)
def test_a_bad_metrics_section_is_refused_at_start(
    reference_parties: Parties, tmp_path: Path, metrics: object, expected: str
) -> None:
    config = reference_parties.config(CUSTODIAN, "custodian", tmp_path, metrics=metrics)
    path = tmp_path / "custodian.json"
    path.write_text(json.dumps(config))
    result = serve_custodian_once(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]


def test_a_metrics_address_in_use_is_refused_at_start(
    reference_parties: Parties, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = reference_parties.config(
            CUSTODIAN, "custodian", tmp_path, metrics={"listen": f"127.0.0.1:{port}"}
        )
        path = tmp_path / "custodian.json"
        path.write_text(json.dumps(config))
        result = serve_custodian_once(path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("collateral-sync:")]
    assert errors == [
        f"collateral-sync: error: cannot serve metrics on 127.0.0.1:{port} (metrics.listen): "
        "Address already in use"
    ], result.stderr


# ------------------------------------------------------------------ documentation

OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
OPS = ROOT / "docs" / "ops"


def test_every_metric_is_documented_and_named_in_the_catalogue() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text[text.index("## Metrics") :]
    for spec in catalogue.ALL:
        assert f"`{spec.exposed_name}`" in section, spec.exposed_name
    documented = set(re.findall(r"`(collateral_sync_[a-z_]+)`", section))
    exposed = {spec.exposed_name for spec in catalogue.ALL}
    assert documented <= exposed | {"collateral_sync_rpc_duration_seconds_bucket"}, (
        documented - exposed
    )


def test_the_prometheus_files_parse_and_alert_on_catalogued_metrics() -> None:
    scrape_config = yaml.safe_load((OPS / "prometheus.yml").read_text(encoding="utf-8"))
    assert scrape_config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in scrape_config["scrape_configs"]}
    assert jobs == {"collateral-sync"}
    rules = yaml.safe_load((OPS / "alerts.yml").read_text(encoding="utf-8"))
    names = {spec.name for spec in catalogue.ALL}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert alerts
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule
        assert rule["annotations"]["summary"], rule
        used = set(
            re.findall(
                r"\b(collateral_sync_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b", rule["expr"]
            )
        )
        assert used <= names, (rule["alert"], used - names)
    tests = yaml.safe_load((OPS / "alerts_test.yml").read_text(encoding="utf-8"))
    assert tests["rule_files"] == ["alerts.yml"]
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested <= {rule["alert"] for rule in alerts}


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian: apt-get install prometheus)",
)
def test_promtool_accepts_the_files_and_the_alerts_fire_as_their_tests_expect() -> None:
    def promtool(*args: str) -> str:
        result = subprocess.run(
            ["promtool", *args], capture_output=True, text=True, timeout=60, check=False, cwd=OPS
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    rules = yaml.safe_load((OPS / "alerts.yml").read_text(encoding="utf-8"))
    count = sum(len(group["rules"]) for group in rules["groups"])
    assert f"SUCCESS: {count} rules found" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
