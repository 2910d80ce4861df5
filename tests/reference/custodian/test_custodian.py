"""The reference custodian as a real process on port 0, over mutual TLS.

One custodian serves the whole module (each test uses accounts of its own, so
the order of tests does not matter); the restart tests start their own. Tests
sign statements at the server's clock, read with ``AdvanceClock(0)``, since
another test may have moved it forward.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from _postgres import open_database
from collateral_sync.amounts import amount_to_proto, parse_amount
from collateral_sync.attestation import CheckpointMonitor, statement_leaf, verify_checkpoint
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.keys import SigningKey
from collateral_sync.merkle import leaf_hash, verify_inclusion_proof
from collateral_sync.signing import pae, sign_statement, verify_statement
from collateral_sync.sync import EXCHANGE_TO_CUSTODIAN, SyncLog, SyncSession, dial_sync_stream
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    liquidation_pb2,
    margin_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import collateral_ratio, margin_call_amount, value_collateral
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    OTHER_CLIENT,
    OTHER_EXCHANGE,
    REFERENCE_PATH,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
)

_T = TypeVar("_T")

ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
CUSTODIAN_SERVICE = "collateral_sync.v1.CustodianService"
TEST_CONTROL_SERVICE = "collateral_sync.v1.TestControlService"
REASON = attestation_pb2.HoldingsChangeReason
CODE = grpc.StatusCode
BENJI_DAILY_RATE = Decimal("0.000118")

ACCOUNTS: dict[str, tuple[str, dict[str, str]]] = {
    "acct-read": (CLIENT, {"USDC": "1000", "BTC": "1"}),
    "acct-pledge": (CLIENT, {"BTC": "10", "USDC": "250000", "BENJI": "1000000"}),
    "acct-redeem": (CLIENT, {"USDC": "5000", "SPYx": "20"}),
    "acct-double-spend": (CLIENT, {"USDC": "1000000"}),
    "acct-yield": (CLIENT, {"BENJI": "1000000", "USDC": "10"}),
    "acct-liquidate": (CLIENT, {"BTC": "10", "USDC": "100000", "BENJI": "500000"}),
    "acct-path": (CLIENT, {"USDC": "100000"}),
    "acct-bad": (CLIENT, {"USDC": "1000", "TSLAx": "5"}),
    "acct-stream": (CLIENT, {"USDC": "400000", "BENJI": "200000"}),
    "acct-other": (OTHER_CLIENT, {"USDC": "1000"}),
}

_SEQUENCE = itertools.count(1)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def custodian_settings(accounts: dict[str, tuple[str, dict[str, str]]]) -> dict[str, Any]:
    return {
        "accounts": [
            {"account_id": account_id, "client_id": client, "holdings": holdings}
            for account_id, (client, holdings) in accounts.items()
        ]
    }


@pytest.fixture(scope="module")
def custodian(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    directory = tmp_path_factory.mktemp("custodian")
    config = reference_parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        peers={EXCHANGE: None, OTHER_EXCHANGE: None},
        custodian=custodian_settings(ACCOUNTS),
    )
    return start_server("custodian", config)


# ------------------------------------------------------------------ helpers


async def server_now(control: TestControlClient) -> datetime:
    response = await control.advance_clock(
        test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration(seconds=0))
    )
    return response.now.ToDatetime(tzinfo=UTC)


async def advance(control: TestControlClient, by: timedelta) -> datetime:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(by)
    response = await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=duration))
    return response.now.ToDatetime(tzinfo=UTC)


def sign(
    parties: Parties,
    party: str,
    message: Message,
    *,
    now: datetime,
    audience: tuple[str, ...] = (CUSTODIAN,),
    ttl: timedelta = timedelta(hours=1),
    sequence: int | None = None,
    statement_id: str | None = None,
    key: SigningKey | None = None,
) -> envelope_pb2.Envelope:
    return sign_statement(
        message,
        key or parties.keys[party],
        audience=list(audience),
        sequence=next(_SEQUENCE) if sequence is None else sequence,
        ttl=ttl,
        issued_at=now,
        statement_id=statement_id,
    )


def path_envelope(
    parties: Parties,
    account_id: str,
    steps: list[tuple[str, str, str]],
    *,
    now: datetime,
    path_id: str,
    exchange: str = EXCHANGE,
) -> envelope_pb2.Envelope:
    path = liquidation_pb2.LiquidationPath(
        account_id=account_id,
        exchange_id=exchange,
        proceeds_account_id=f"{exchange}/settlement",
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id=asset, venue=venue, max_quantity=amount_to_proto(maximum)
            )
            for asset, venue, maximum in steps
        ],
    )
    return sign(parties, CLIENT, path, now=now, statement_id=path_id)


def pledge_request(
    parties: Parties,
    account_id: str,
    asset_id: str,
    quantity: str,
    *,
    now: datetime,
    path: envelope_pb2.Envelope,
    exchange: str = EXCHANGE,
) -> custodian_service_pb2.PledgeCollateralRequest:
    instruction = custodian_service_pb2.PledgeInstruction(
        account_id=account_id,
        exchange_id=exchange,
        asset_id=asset_id,
        quantity=common_pb2.Decimal(value=quantity),
    )
    return custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=sign(parties, CLIENT, instruction, now=now), liquidation_path=path
    )


def holdings(envelope: envelope_pb2.Envelope) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement.FromString(envelope.payload)


def positions(statement: attestation_pb2.HoldingsStatement) -> dict[str, tuple[str, str, str]]:
    return {
        p.asset_id: (p.quantity.value, p.locked_quantity.value, p.pledged_quantity.value)
        for p in statement.positions
    }


async def expect_refusal(call: Awaitable[object], code: grpc.StatusCode, reason: str) -> RPCError:
    with pytest.raises(RPCError) as caught:
        await call
    error = caught.value
    assert (error.code, error.reason_name) == (code, reason), error.message
    assert {"expected", "actual"} <= set(error.metadata), error.metadata
    return error


async def state_of(custodian: CustodianClient, account_id: str) -> tuple[bytes, int]:
    """What must not change when a request is refused: the account's statement, the log size."""
    statement = await custodian.get_holdings_statement(
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
    )
    checkpoint = await custodian.get_checkpoint(custodian_service_pb2.GetCheckpointRequest())
    size = attestation_pb2.Checkpoint.FromString(checkpoint.checkpoint.payload).tree_size
    return statement.SerializeToString(), size


async def checkpoint_at(
    parties: Parties, custodian: CustodianClient, tree_size: int, now: datetime
) -> attestation_pb2.Checkpoint:
    response = await custodian.get_checkpoint(
        custodian_service_pb2.GetCheckpointRequest(tree_size=tree_size)
    )
    return verify_checkpoint(response.checkpoint, parties.registry, origin=ORIGIN, now=now)


def risk_policy(now: datetime) -> valuation_pb2.RiskPolicy:
    """The pilot's figures; crypto has no haircut entry, so BTC counts 0 as collateral."""
    classes = common_pb2.AssetClass

    def factor(asset_class: int, value: str) -> valuation_pb2.AssetClassHaircut:
        return valuation_pb2.AssetClassHaircut(
            asset_class=asset_class,  # type: ignore[arg-type]
            collateral_factor=common_pb2.Decimal(value=value),
        )

    policy = valuation_pb2.RiskPolicy(
        version=1,
        haircuts=[
            factor(classes.ASSET_CLASS_TOKENIZED_MMF, "0.98"),
            factor(classes.ASSET_CLASS_STABLECOIN, "0.95"),
            factor(classes.ASSET_CLASS_TOKENIZED_ETF, "0.85"),
        ],
        leverage_cap=common_pb2.Decimal(value="2"),
        maintenance_ratio=common_pb2.Decimal(value="0.5"),
        liquidation_ratio=common_pb2.Decimal(value="0.4"),
        insurance_fund_balance=common_pb2.Decimal(value="1000000"),
        valuation_currency="USD",
        auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE,
        max_price_age=duration_pb2.Duration(seconds=3600),
        cure_period=duration_pb2.Duration(seconds=86400),
        stale_price_rule=valuation_pb2.STALE_PRICE_RULE_ZERO,
        rounding_scale=2,
        max_settlement_cycles_per_day=2,
        price_source="scripted",
    )
    policy.effective_from.FromDatetime(now - timedelta(days=1))
    return policy


def price_snapshot(
    parties: Parties, prices: dict[str, str], now: datetime
) -> envelope_pb2.Envelope:
    snapshot = valuation_pb2.PriceSnapshot()
    for asset_id, price in prices.items():
        quote = snapshot.prices.add(
            asset_id=asset_id, price=common_pb2.Decimal(value=price), source="scripted"
        )
        quote.observed_at.FromDatetime(now)
    return sign(parties, EXCHANGE, snapshot, now=now, audience=("*",))


# ------------------------------------------------------------------ serving basics


def test_health_serving_and_reflection_lists_the_services(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    async def scenario() -> None:
        async with reference_parties.channel(custodian.address, EXCHANGE) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo(timeout=5)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            await call.done_writing()
            names = {s.name for s in listed.list_services_response.service}
            # A test-mode server serves TestControlService, and announces it like the rest.
            assert {
                CUSTODIAN_SERVICE,
                TEST_CONTROL_SERVICE,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= names
            # Every service it lists is one health reports on (and the server as a whole).
            ours = sorted(n for n in names if n.startswith("collateral_sync."))
            for service in ["", *ours]:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

    run(scenario())


def test_without_test_mode_test_control_is_neither_served_nor_announced(
    start_server: StartServer,
    reference_parties: Parties,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    directory = tmp_path_factory.mktemp("production")
    config = reference_parties.config(
        CUSTODIAN, "custodian", directory, peers={EXCHANGE: None}, custodian={}
    )
    server = start_server("custodian", config, name="production-custodian", test_mode=False)

    async def scenario() -> None:
        async with reference_parties.channel(server.address, EXCHANGE) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(
                    health_pb2.HealthCheckRequest(service=TEST_CONTROL_SERVICE), timeout=5
                )
            assert unknown.value.code() == CODE.NOT_FOUND
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo(timeout=5)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            names = {s.name for s in reply.list_services_response.service}
            assert CUSTODIAN_SERVICE in names
            assert TEST_CONTROL_SERVICE not in names
            with pytest.raises(RPCError) as caught:
                await TestControlClient(channel).get_sync_state(
                    test_control_pb2.GetSyncStateRequest()
                )
            assert caught.value.code == CODE.UNIMPLEMENTED

    try:
        run(scenario())
    finally:
        server.stop()


def test_connection_without_a_client_certificate_is_refused(custodian: ServerProcess) -> None:
    async def scenario() -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=custodian_ca(custodian).read_bytes()
        )
        async with grpc.aio.secure_channel(custodian.address, credentials) as channel:
            with pytest.raises(RPCError) as caught:
                await CustodianClient(channel, default_timeout=5).get_checkpoint(
                    custodian_service_pb2.GetCheckpointRequest()
                )
            assert caught.value.code == CODE.UNAVAILABLE

    run(scenario())


def custodian_ca(server: ServerProcess) -> Path:
    return Path(json.loads(server.config_path.read_text())["tls"]["ca"])


def test_initial_holdings_are_attested_and_included_under_a_checkpoint(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    async def scenario() -> None:
        async with reference_parties.channel(custodian.address, CLIENT) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            now = await server_now(control)
            response = await client.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id="acct-read")
            )
            verified = verify_statement(
                response.holdings_statement,
                reference_parties.registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience=CLIENT,
                now=now,
            )
            statement = verified.message
            assert verified.issuer == CUSTODIAN
            assert statement.reason == REASON.HOLDINGS_CHANGE_REASON_DEPOSIT
            assert statement.exchange_id == ""
            assert positions(statement) == {"BTC": ("1", "0", "0"), "USDC": ("1000", "0", "0")}
            ref = response.attestation
            leaf = statement_leaf(response.holdings_statement)
            assert (ref.log_origin, ref.leaf_hash) == (ORIGIN, leaf_hash(leaf))
            assert ref.leaf_index < ref.tree_size
            # The reference names a checkpoint that exists; the leaf is under it.
            checkpoint = await checkpoint_at(reference_parties, client, ref.tree_size, now)
            proof = await client.get_inclusion_proof(
                custodian_service_pb2.GetInclusionProofRequest(
                    leaf_index=ref.leaf_index, tree_size=checkpoint.tree_size
                )
            )
            assert proof.holdings_statement == response.holdings_statement
            verify_inclusion_proof(proof.proof, leaf, checkpoint)

    run(scenario())


# ------------------------------------------------------------------ pledges and proofs


def test_pledge_is_attested_announced_and_provably_appended(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with parties.channel(custodian.address, CLIENT) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            now = await server_now(control)
            before = await checkpoint_at(parties, client, 0, now)
            path = path_envelope(
                parties,
                "acct-pledge",
                [("USDC", "otc-desk", "100000"), ("BENJI", "fund-redemption", "500000")],
                now=now,
                path_id="path-pledge-1",
            )
            response = await client.pledge_collateral(
                pledge_request(parties, "acct-pledge", "USDC", "100000", now=now, path=path)
            )
            verified = verify_statement(
                response.holdings_statement,
                parties.registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience=EXCHANGE,
                now=now,
            )
            statement = verified.message
            assert (statement.account_id, statement.exchange_id) == ("acct-pledge", EXCHANGE)
            assert statement.reason == REASON.HOLDINGS_CHANGE_REASON_PLEDGE
            assert set(verified.header.audience) == {EXCHANGE, CLIENT}
            assert positions(statement)["USDC"] == ("250000", "0", "100000")
            assert positions(statement)["BTC"] == ("10", "0", "0")

            # A second pledge to the same exchange (the path sent again) is a top-up.
            top_up = await client.pledge_collateral(
                pledge_request(parties, "acct-pledge", "BENJI", "400000", now=now, path=path)
            )
            second = holdings(top_up.holdings_statement)
            assert second.reason == REASON.HOLDINGS_CHANGE_REASON_TOP_UP
            assert second.epoch == statement.epoch + 1
            assert positions(second)["BENJI"] == ("1000000", "0", "400000")
            assert positions(second)["USDC"] == ("250000", "0", "100000")

            # Both leaves are under the latest checkpoint, which extends the earlier one.
            after = await checkpoint_at(parties, client, 0, now)
            assert after.tree_size == top_up.attestation.tree_size >= before.tree_size + 2
            for pledged in (response, top_up):
                proof = await client.get_inclusion_proof(
                    custodian_service_pb2.GetInclusionProofRequest(
                        leaf_index=pledged.attestation.leaf_index, tree_size=after.tree_size
                    )
                )
                verify_inclusion_proof(
                    proof.proof, statement_leaf(pledged.holdings_statement), after
                )
            consistency = await client.get_consistency_proof(
                custodian_service_pb2.GetConsistencyProofRequest(
                    first_tree_size=before.tree_size, second_tree_size=after.tree_size
                )
            )
            monitor = CheckpointMonitor()
            monitor.advance(before, None)
            monitor.advance(after, consistency.proof)
            assert monitor.latest(ORIGIN) == after
            # The checkpoint named by the first reference exists too, and is a prefix.
            first_ref = await checkpoint_at(parties, client, response.attestation.tree_size, now)
            consistency = await client.get_consistency_proof(
                custodian_service_pb2.GetConsistencyProofRequest(
                    first_tree_size=first_ref.tree_size, second_tree_size=0
                )
            )
            assert consistency.proof.second_tree_size == after.tree_size
            monitor = CheckpointMonitor()
            monitor.advance(first_ref, None)
            monitor.advance(after, consistency.proof)

            # The latest statement is what the exchange will be told about.
            latest = await client.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id="acct-pledge")
            )
            assert latest.holdings_statement == top_up.holdings_statement
            assert latest.attestation == top_up.attestation

    run(scenario())


# ------------------------------------------------------------------ redemption and yield


def test_pledged_quantity_cannot_be_redeemed(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    """The double spend of issue 11: 1,000,000 held, 400,000 pledged, 1,000,000 redeemed.

    Only quantity - locked - pledged is redeemable (docs/PROTOCOL.md §5.8), on
    both sides of the bound, and after the lock settles the pledge is intact.
    """
    parties = reference_parties
    account = "acct-double-spend"

    def redemption(redemption_id: str, quantity: str, now: datetime) -> Any:
        message = custodian_service_pb2.RedemptionRequest(
            redemption_id=redemption_id,
            account_id=account,
            asset_id="USDC",
            quantity=amount_to_proto(quantity),
        )
        return custodian_service_pb2.RequestRedemptionRequest(
            redemption_request=sign(parties, CLIENT, message, now=now)
        )

    async def scenario() -> None:
        async with parties.channel(custodian.address, CLIENT) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            now = await server_now(control)
            path = path_envelope(
                parties,
                account,
                [("USDC", "otc-desk", "400000")],
                now=now,
                path_id="path-double-spend",
            )
            await client.pledge_collateral(
                pledge_request(parties, account, "USDC", "400000", now=now, path=path)
            )
            before = await state_of(client, account)
            for redemption_id, quantity in (
                ("double-spend-all", "1000000"),
                # One quantum above the bound: a check against quantity - locked passes it.
                ("double-spend-quantum", "600000.000000000000000001"),
            ):
                error = await expect_refusal(
                    client.request_redemption(redemption(redemption_id, quantity, now)),
                    CODE.FAILED_PRECONDITION,
                    "STATE_CONFLICT",
                )
                assert error.metadata["expected"] == "<= 600000"
                assert error.metadata["actual"] == quantity
                assert await state_of(client, account) == before

            # Exactly the bound is accepted, in two uneven locks.
            first = await client.request_redemption(
                redemption("double-spend-part-1", "123456.789", now)
            )
            assert positions(holdings(first.holdings_statement))["USDC"] == (
                "1000000",
                "123456.789",
                "400000",
            )
            second = await client.request_redemption(
                redemption("double-spend-part-2", "476543.211", now)
            )
            assert positions(holdings(second.holdings_statement))["USDC"] == (
                "1000000",
                "600000",
                "400000",
            )
            # Nothing is left to redeem, not even a quantum.
            await expect_refusal(
                client.request_redemption(
                    redemption("double-spend-rest", "0.000000000000000001", now)
                ),
                CODE.FAILED_PRECONDITION,
                "STATE_CONFLICT",
            )

            await advance(control, timedelta(hours=24, seconds=1))
            settled = await client.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
            )
            statement = holdings(settled.holdings_statement)
            assert statement.reason == REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_SETTLED
            # What the exchange credits is still held.
            assert positions(statement)["USDC"] == ("400000", "0", "400000")

    run(scenario())


def test_redemption_locks_until_the_lock_period_then_settles(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with parties.channel(custodian.address, CLIENT) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            now = await server_now(control)
            request = custodian_service_pb2.RedemptionRequest(
                redemption_id="redeem-1",
                account_id="acct-redeem",
                asset_id="USDC",
                quantity=amount_to_proto("1500.25"),
            )
            response = await client.request_redemption(
                custodian_service_pb2.RequestRedemptionRequest(
                    redemption_request=sign(parties, CLIENT, request, now=now)
                )
            )
            locked = holdings(response.holdings_statement)
            assert locked.reason == REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK
            assert positions(locked)["USDC"] == ("5000", "1500.25", "0")
            # More than what is not yet locked is refused.
            too_much = custodian_service_pb2.RedemptionRequest(
                redemption_id="redeem-2",
                account_id="acct-redeem",
                asset_id="USDC",
                quantity=amount_to_proto("3500"),
            )
            await expect_refusal(
                client.request_redemption(
                    custodian_service_pb2.RequestRedemptionRequest(
                        redemption_request=sign(parties, CLIENT, too_much, now=now)
                    )
                ),
                CODE.FAILED_PRECONDITION,
                "STATE_CONFLICT",
            )

            await advance(control, timedelta(hours=23))
            still = await client.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id="acct-redeem")
            )
            assert still.holdings_statement == response.holdings_statement

            await advance(control, timedelta(hours=1, seconds=1))
            settled = await client.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id="acct-redeem")
            )
            statement = holdings(settled.holdings_statement)
            assert statement.reason == REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_SETTLED
            assert statement.epoch == locked.epoch + 1
            assert positions(statement)["USDC"] == ("3499.75", "0", "0")
            assert positions(statement)["SPYx"] == ("20", "0", "0")

    run(scenario())


def test_yield_accrual_is_attested(custodian: ServerProcess, reference_parties: Parties) -> None:
    async def scenario() -> None:
        async with reference_parties.channel(custodian.address, CLIENT) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            request = custodian_service_pb2.GetHoldingsStatementRequest(account_id="acct-yield")
            before = holdings((await client.get_holdings_statement(request)).holdings_statement)
            accrued = await control.accrue_yield(test_control_pb2.AccrueYieldRequest())
            assert accrued.accounts >= 1
            response = await client.get_holdings_statement(request)
            after = holdings(response.holdings_statement)
            assert after.reason == REASON.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL
            assert after.epoch == before.epoch + 1
            held = parse_amount(positions(before)["BENJI"][0])
            expected = held + (held * BENJI_DAILY_RATE).quantize(Decimal("1e-18"))
            assert parse_amount(positions(after)["BENJI"][0]) == expected
            # Only the fund token earns yield.
            assert positions(after)["USDC"] == positions(before)["USDC"]
            now = await server_now(control)
            checkpoint = await checkpoint_at(
                reference_parties, client, response.attestation.tree_size, now
            )
            proof = await client.get_inclusion_proof(
                custodian_service_pb2.GetInclusionProofRequest(
                    leaf_index=response.attestation.leaf_index, tree_size=checkpoint.tree_size
                )
            )
            verify_inclusion_proof(
                proof.proof, statement_leaf(response.holdings_statement), checkpoint
            )

    run(scenario())


# ------------------------------------------------------------------ liquidation


def liquidation_instruction(
    parties: Parties,
    *,
    liquidation_id: str,
    account_id: str,
    amount: str,
    path_id: str,
    now: datetime,
    inputs: valuation_pb2.ValuationInputs | None = None,
    issuer: str = EXCHANGE,
) -> envelope_pb2.Envelope:
    instruction = liquidation_pb2.LiquidationInstruction(
        liquidation_id=liquidation_id,
        account_id=account_id,
        amount=amount_to_proto(amount),
        liquidation_path_id=path_id,
        risk_policy_version=1,
    )
    if inputs is not None:
        instruction.inputs.CopyFrom(inputs)
    return sign(parties, issuer, instruction, now=now)


def test_liquidation_pays_yield_first_then_sells_along_the_path(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties
    account = "acct-liquidate"

    async def scenario() -> None:
        async with (
            parties.channel(custodian.address, CLIENT) as client_channel,
            parties.channel(custodian.address, EXCHANGE) as exchange_channel,
        ):
            client, control = CustodianClient(client_channel), TestControlClient(client_channel)
            exchange = CustodianClient(exchange_channel)
            now = await server_now(control)
            path = path_envelope(
                parties,
                account,
                [
                    ("USDC", "otc-desk", "50000"),
                    ("BTC", "otc-desk", "10"),
                    ("BENJI", "fund-redemption", "150000"),
                ],
                now=now,
                path_id="path-liquidate-1",
            )
            for asset, quantity in (("USDC", "50000"), ("BTC", "10"), ("BENJI", "200000")):
                await client.pledge_collateral(
                    pledge_request(parties, account, asset, quantity, now=now, path=path)
                )
            await control.accrue_yield(test_control_pb2.AccrueYieldRequest())
            latest = await client.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
            )
            before = positions(holdings(latest.holdings_statement))
            accrued = parse_amount(before["BENJI"][0]) - Decimal(500000)
            assert accrued > 0

            # Collateral: USDC 50000 * 0.95 + BENJI 200000 * 0.98 (BTC counts 0) = 243500;
            # with an exposure of 700000 the ratio 0.34 is under the liquidation line 0.4.
            now = await server_now(control)
            policy = sign(parties, EXCHANGE, risk_policy(now), now=now, audience=("*",))
            inputs = valuation_pb2.ValuationInputs(
                risk_policy=policy,
                holdings_statements=[latest.holdings_statement],
                price_snapshot=price_snapshot(
                    parties, {"USDC": "1", "BENJI": "1", "BTC": "100000"}, now
                ),
            )
            instruction = liquidation_instruction(
                parties,
                liquidation_id="liq-1",
                account_id=account,
                amount="700000",
                path_id="path-liquidate-1",
                now=now,
                inputs=inputs,
            )
            response = await exchange.submit_liquidation_instruction(
                custodian_service_pb2.SubmitLiquidationInstructionRequest(
                    liquidation_instruction=instruction
                )
            )
            receipt = verify_statement(
                response.liquidation_receipt,
                parties.registry,
                expected_type=liquidation_pb2.LiquidationReceipt,
                audience=EXCHANGE,
                now=now,
            ).message
            assert (receipt.liquidation_id, receipt.account_id) == ("liq-1", account)
            assert [
                (y.asset_id, parse_amount(y.quantity.value)) for y in receipt.yield_distributions
            ] == [("BENJI", accrued)]
            # Along the path, in order, until the amount is raised: BENJI is never reached.
            assert [
                (f.asset_id, f.quantity.value, f.price.value, f.proceeds.value, f.venue)
                for f in receipt.fills
            ] == [
                ("USDC", "50000", "1", "50000", "otc-desk"),
                ("BTC", "6.5", "100000", "650000", "otc-desk"),
            ]
            assert (receipt.total_proceeds.value, receipt.shortfall.value) == ("700000", "0")

            after = await client.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
            )
            statement = holdings(after.holdings_statement)
            assert statement.reason == REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION
            assert after.attestation == receipt.attestation
            assert positions(statement) == {
                "BTC": ("3.5", "0", "3.5"),
                "USDC": ("50000", "0", "0"),
                "BENJI": ("500000", "0", "200000"),
            }
            checkpoint = await checkpoint_at(parties, client, receipt.attestation.tree_size, now)
            proof = await client.get_inclusion_proof(
                custodian_service_pb2.GetInclusionProofRequest(
                    leaf_index=receipt.attestation.leaf_index, tree_size=checkpoint.tree_size
                )
            )
            verify_inclusion_proof(
                proof.proof, statement_leaf(after.holdings_statement), checkpoint
            )

            # The same instruction again: the same receipt, nothing executed twice.
            state = await state_of(client, account)
            again = await exchange.submit_liquidation_instruction(
                custodian_service_pb2.SubmitLiquidationInstructionRequest(
                    liquidation_instruction=instruction
                )
            )
            assert again.liquidation_receipt == response.liquidation_receipt
            assert await state_of(client, account) == state
            # Another instruction reusing the id is refused.
            other = liquidation_instruction(
                parties,
                liquidation_id="liq-1",
                account_id=account,
                amount="1",
                path_id="path-liquidate-1",
                now=now,
                inputs=inputs,
            )
            await expect_refusal(
                exchange.submit_liquidation_instruction(
                    custodian_service_pb2.SubmitLiquidationInstructionRequest(
                        liquidation_instruction=other
                    )
                ),
                CODE.FAILED_PRECONDITION,
                "STATE_CONFLICT",
            )
            assert await state_of(client, account) == state

    run(scenario())


def test_liquidation_outside_the_pre_authorised_path_is_refused(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties
    account = "acct-path"

    async def scenario() -> None:
        async with (
            parties.channel(custodian.address, CLIENT) as client_channel,
            parties.channel(custodian.address, EXCHANGE) as exchange_channel,
            parties.channel(custodian.address, OTHER_EXCHANGE) as other_channel,
        ):
            client, control = CustodianClient(client_channel), TestControlClient(client_channel)
            now = await server_now(control)
            path = path_envelope(
                parties, account, [("USDC", "otc-desk", "100000")], now=now, path_id="path-p1"
            )
            await client.pledge_collateral(
                pledge_request(parties, account, "USDC", "100000", now=now, path=path)
            )
            state = await state_of(client, account)
            cases = [
                # A path id the client never authorised.
                (EXCHANGE, exchange_channel, "path-unknown"),
                # A path the client authorised for another account.
                (EXCHANGE, exchange_channel, "path-pledge-1"),
                # The right path id, but from an exchange the account did not pledge to.
                (OTHER_EXCHANGE, other_channel, "path-p1"),
            ]
            for index, (issuer, channel, path_id) in enumerate(cases):
                instruction = liquidation_instruction(
                    parties,
                    liquidation_id=f"liq-path-{index}",
                    account_id=account,
                    amount="1000",
                    path_id=path_id,
                    now=now,
                    issuer=issuer,
                )
                await expect_refusal(
                    CustodianClient(channel).submit_liquidation_instruction(
                        custodian_service_pb2.SubmitLiquidationInstructionRequest(
                            liquidation_instruction=instruction
                        )
                    ),
                    CODE.PERMISSION_DENIED,
                    "PATH_NOT_AUTHORISED",
                )
            # An exchange's instruction relayed over another party's connection.
            instruction = liquidation_instruction(
                parties,
                liquidation_id="liq-relayed",
                account_id=account,
                amount="1000",
                path_id="path-p1",
                now=now,
            )
            await expect_refusal(
                client.submit_liquidation_instruction(
                    custodian_service_pb2.SubmitLiquidationInstructionRequest(
                        liquidation_instruction=instruction
                    )
                ),
                CODE.PERMISSION_DENIED,
                "KEY_ROLE_MISMATCH",
            )
            assert await state_of(client, account) == state

    run(scenario())


# ------------------------------------------------------------------ bad input


def _flip_signature(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    forged = envelope_pb2.Envelope()
    forged.CopyFrom(envelope)
    sig = bytearray(forged.signatures[0].sig)
    sig[0] ^= 0x01
    forged.signatures[0].sig = bytes(sig)
    return forged


def _raw_envelope(
    parties: Parties, party: str, payload: bytes, payload_type: str
) -> envelope_pb2.Envelope:
    key = parties.keys[party]
    return envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[
            envelope_pb2.Signature(key_id=key.key_id, sig=key.sign(pae(payload_type, payload)))
        ],
    )


PLEDGE_TYPE = "application/vnd.collateral-sync.v1.pledge-instruction+proto"


def test_every_bad_pledge_is_refused_with_its_status_and_changes_nothing(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties
    account = "acct-bad"

    async def scenario() -> None:
        async with parties.channel(custodian.address, CLIENT) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            now = await server_now(control)
            path = path_envelope(
                parties, account, [("USDC", "otc-desk", "1000")], now=now, path_id="path-bad"
            )

            def instruction(**changes: Any) -> custodian_service_pb2.PledgeInstruction:
                fields: dict[str, Any] = {
                    "account_id": account,
                    "exchange_id": EXCHANGE,
                    "asset_id": "USDC",
                    "quantity": common_pb2.Decimal(value="100"),
                }
                fields.update(changes)
                return custodian_service_pb2.PledgeInstruction(**fields)

            def request(
                pledge: envelope_pb2.Envelope, liquidation_path: envelope_pb2.Envelope = path
            ) -> custodian_service_pb2.PledgeCollateralRequest:
                return custodian_service_pb2.PledgeCollateralRequest(
                    pledge_instruction=pledge, liquidation_path=liquidation_path
                )

            stranger = SigningKey.generate(CLIENT, common_pb2.PARTY_ROLE_CLIENT)
            good = sign(parties, CLIENT, instruction(), now=now)
            cases: list[
                tuple[str, custodian_service_pb2.PledgeCollateralRequest, grpc.StatusCode, str]
            ] = [
                (
                    "payload that does not parse",
                    request(_raw_envelope(parties, CLIENT, b"\xff\xff\xff", PLEDGE_TYPE)),
                    CODE.INVALID_ARGUMENT,
                    "MALFORMED",
                ),
                (
                    "bad signature",
                    request(_flip_signature(good)),
                    CODE.UNAUTHENTICATED,
                    "SIGNATURE_INVALID",
                ),
                (
                    "unregistered key",
                    request(sign(parties, CLIENT, instruction(), now=now, key=stranger)),
                    CODE.UNAUTHENTICATED,
                    "KEY_UNKNOWN",
                ),
                (
                    "exchange key signing a client statement",
                    request(
                        sign_statement(
                            instruction(),
                            SigningKey.from_seed(
                                parties.keys[EXCHANGE].seed, EXCHANGE, common_pb2.PARTY_ROLE_CLIENT
                            ),
                            audience=[CUSTODIAN],
                            sequence=next(_SEQUENCE),
                            ttl=timedelta(hours=1),
                            issued_at=now,
                        )
                    ),
                    CODE.PERMISSION_DENIED,
                    "KEY_ROLE_MISMATCH",
                ),
                (
                    "another client's key",
                    request(sign(parties, OTHER_CLIENT, instruction(), now=now)),
                    CODE.PERMISSION_DENIED,
                    "KEY_ROLE_MISMATCH",
                ),
                (
                    "wrong audience",
                    request(sign(parties, CLIENT, instruction(), now=now, audience=(EXCHANGE,))),
                    CODE.PERMISSION_DENIED,
                    "AUDIENCE_MISMATCH",
                ),
                (
                    "expired",
                    request(
                        sign(
                            parties,
                            CLIENT,
                            instruction(),
                            now=now - timedelta(hours=2),
                            ttl=timedelta(hours=1),
                        )
                    ),
                    CODE.FAILED_PRECONDITION,
                    "STATEMENT_EXPIRED",
                ),
                (
                    "issued in the future",
                    request(sign(parties, CLIENT, instruction(), now=now + timedelta(hours=1))),
                    CODE.FAILED_PRECONDITION,
                    "STATEMENT_NOT_YET_VALID",
                ),
                (
                    "non-canonical amount",
                    request(
                        sign(
                            parties,
                            CLIENT,
                            instruction(quantity=common_pb2.Decimal(value="1.50")),
                            now=now,
                        )
                    ),
                    CODE.INVALID_ARGUMENT,
                    "INVALID_AMOUNT",
                ),
                (
                    "negative amount",
                    request(
                        sign(
                            parties,
                            CLIENT,
                            instruction(quantity=common_pb2.Decimal(value="-1")),
                            now=now,
                        )
                    ),
                    CODE.INVALID_ARGUMENT,
                    "INVALID_AMOUNT",
                ),
                (
                    "zero amount",
                    request(
                        sign(
                            parties,
                            CLIENT,
                            instruction(quantity=common_pb2.Decimal(value="0")),
                            now=now,
                        )
                    ),
                    CODE.INVALID_ARGUMENT,
                    "INVALID_AMOUNT",
                ),
                (
                    "a pledge in place of the path",
                    request(good, liquidation_path=good),
                    CODE.INVALID_ARGUMENT,
                    "PAYLOAD_TYPE_MISMATCH",
                ),
                (
                    "more than is free",
                    request(
                        sign(
                            parties,
                            CLIENT,
                            instruction(quantity=common_pb2.Decimal(value="1000.01")),
                            now=now,
                        )
                    ),
                    CODE.FAILED_PRECONDITION,
                    "STATE_CONFLICT",
                ),
                (
                    "unknown account",
                    request(sign(parties, CLIENT, instruction(account_id="acct-nobody"), now=now)),
                    CODE.NOT_FOUND,
                    "NOT_FOUND",
                ),
                (
                    "unknown asset",
                    request(sign(parties, CLIENT, instruction(asset_id="DOGE"), now=now)),
                    CODE.NOT_FOUND,
                    "NOT_FOUND",
                ),
                (
                    "no path",
                    custodian_service_pb2.PledgeCollateralRequest(pledge_instruction=good),
                    CODE.INVALID_ARGUMENT,
                    "MALFORMED",
                ),
            ]
            before = await state_of(client, account)
            for name, bad, code, reason in cases:
                try:
                    await expect_refusal(client.pledge_collateral(bad), code, reason)
                except AssertionError as err:
                    raise AssertionError(f"case {name!r}: {err}") from err
                assert await state_of(client, account) == before, name

            # The good one goes through once; sent again, it is a replay and changes nothing.
            await client.pledge_collateral(request(good))
            after = await state_of(client, account)
            assert after != before
            await expect_refusal(
                client.pledge_collateral(request(good)), CODE.ALREADY_EXISTS, "REPLAYED"
            )
            assert await state_of(client, account) == after
            # The server kept serving through all of it.
            assert custodian.process is not None
            assert custodian.process.poll() is None

    run(scenario())


def test_bad_reads_get_their_statuses(custodian: ServerProcess, reference_parties: Parties) -> None:
    async def scenario() -> None:
        async with reference_parties.channel(custodian.address, EXCHANGE) as channel:
            client = CustodianClient(channel)
            latest = attestation_pb2.Checkpoint.FromString(
                (
                    await client.get_checkpoint(custodian_service_pb2.GetCheckpointRequest())
                ).checkpoint.payload
            )
            size = latest.tree_size
            request = custodian_service_pb2
            calls: list[tuple[Awaitable[object], grpc.StatusCode, str]] = [
                (
                    client.get_checkpoint(request.GetCheckpointRequest(tree_size=size + 100)),
                    CODE.OUT_OF_RANGE,
                    "OUT_OF_RANGE",
                ),
                # The first operation signed one checkpoint for all the initial accounts.
                (
                    client.get_checkpoint(request.GetCheckpointRequest(tree_size=1)),
                    CODE.NOT_FOUND,
                    "NOT_FOUND",
                ),
                (
                    client.get_inclusion_proof(
                        request.GetInclusionProofRequest(leaf_index=size, tree_size=size)
                    ),
                    CODE.OUT_OF_RANGE,
                    "OUT_OF_RANGE",
                ),
                (
                    client.get_inclusion_proof(
                        request.GetInclusionProofRequest(leaf_index=0, tree_size=size + 1)
                    ),
                    CODE.OUT_OF_RANGE,
                    "OUT_OF_RANGE",
                ),
                (
                    client.get_consistency_proof(
                        request.GetConsistencyProofRequest(first_tree_size=0, second_tree_size=size)
                    ),
                    CODE.OUT_OF_RANGE,
                    "OUT_OF_RANGE",
                ),
                (
                    client.get_consistency_proof(
                        request.GetConsistencyProofRequest(first_tree_size=2, second_tree_size=1)
                    ),
                    CODE.OUT_OF_RANGE,
                    "OUT_OF_RANGE",
                ),
                (
                    client.get_consistency_proof(
                        request.GetConsistencyProofRequest(
                            first_tree_size=1, second_tree_size=size + 1
                        )
                    ),
                    CODE.OUT_OF_RANGE,
                    "OUT_OF_RANGE",
                ),
                # Not the exchange's to know whether it exists (PROTOCOL.md §4.5).
                (
                    client.get_holdings_statement(
                        request.GetHoldingsStatementRequest(account_id="acct-nobody")
                    ),
                    CODE.PERMISSION_DENIED,
                    "KEY_ROLE_MISMATCH",
                ),
                (
                    client.get_holdings_statement(request.GetHoldingsStatementRequest()),
                    CODE.INVALID_ARGUMENT,
                    "MALFORMED",
                ),
                (
                    client.submit_liquidation_instruction(
                        request.SubmitLiquidationInstructionRequest()
                    ),
                    CODE.INVALID_ARGUMENT,
                    "MALFORMED",
                ),
                (
                    client.request_redemption(request.RequestRedemptionRequest()),
                    CODE.INVALID_ARGUMENT,
                    "MALFORMED",
                ),
            ]
            for call, code, reason in calls:
                await expect_refusal(call, code, reason)
            # A release, a settlement or a dispute without its statement (test_emergency_release
            # and test_settlement cover the rest).
            for empty in (
                client.execute_emergency_release(request.ExecuteEmergencyReleaseRequest()),
                client.submit_settlement_instruction(request.SubmitSettlementInstructionRequest()),
                client.dispute_settlement(request.DisputeSettlementRequest()),
            ):
                await expect_refusal(empty, CODE.INVALID_ARGUMENT, "MALFORMED")
            await expect_refusal(
                client.get_settlement(request.GetSettlementRequest(settlement_id="none")),
                CODE.PERMISSION_DENIED,
                "KEY_ROLE_MISMATCH",
            )
        # Only a regulator, who may read every account and settlement, learns what does not
        # exist (PROTOCOL.md §4.5).
        async with reference_parties.channel(custodian.address, REGULATOR) as channel:
            auditor = CustodianClient(channel)
            request = custodian_service_pb2
            for call in (
                auditor.get_holdings_statement(
                    request.GetHoldingsStatementRequest(account_id="acct-nobody")
                ),
                auditor.get_settlement(request.GetSettlementRequest(settlement_id="none")),
            ):
                await expect_refusal(call, CODE.NOT_FOUND, "NOT_FOUND")

    run(scenario())


# ------------------------------------------------------------------ the position-sync stream


class ExchangeSide:
    """A stand-in exchange: its own sync log and session, recording what it receives."""

    def __init__(
        self,
        path: Path,
        parties: Parties,
        clock: Callable[[], datetime],
        party_id: str = EXCHANGE,
    ) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.log = SyncLog(
            self.connection,
            party_id=party_id,
            peer_party_id=CUSTODIAN,
            sending_direction=EXCHANGE_TO_CUSTODIAN,
        )
        self.received: list[position_sync_pb2.PositionUpdate] = []
        self.arrived = asyncio.Event()
        self.dial: asyncio.Task[None] | None = None
        self.session = SyncSession(
            self.log, parties.keys[party_id], parties.registry, apply=self.apply, clock=clock
        )

    def apply(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        self.received.extend(update for _, update in updates)
        self.arrived.set()

    async def wait_for(
        self, predicate: Callable[[position_sync_pb2.PositionUpdate], bool]
    ) -> position_sync_pb2.PositionUpdate:
        async with asyncio.timeout(20):
            while True:
                for update in self.received:
                    if predicate(update):
                        return update
                if self.dial is not None and self.dial.done():
                    # The stream ended: say why instead of waiting in vain.
                    self.dial.result()
                    raise AssertionError("the sync stream ended without an error")
                self.arrived.clear()
                waiter = asyncio.ensure_future(self.arrived.wait())
                pending = {waiter} if self.dial is None else {waiter, self.dial}
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()

    def send(self, update: position_sync_pb2.PositionUpdate) -> None:
        with self.log.transaction():
            self.log.append([update])


def margin_call(
    parties: Parties,
    statement: envelope_pb2.Envelope,
    *,
    call_id: str,
    now: datetime,
    tamper: bool = False,
) -> envelope_pb2.Envelope:
    """A margin call whose figures follow from its signed inputs (unless ``tamper``)."""
    policy = risk_policy(now)
    prices = {"USDC": "1", "BENJI": "1"}
    snapshot = price_snapshot(parties, prices, now)
    holdings_statement = holdings(statement)
    quotes = valuation_pb2.PriceSnapshot.FromString(snapshot.payload).prices
    classes = {
        "USDC": common_pb2.ASSET_CLASS_STABLECOIN,
        "BENJI": common_pb2.ASSET_CLASS_TOKENIZED_MMF,
    }
    value = value_collateral(
        policy, holdings_statement.positions, quotes, asset_classes=classes, valued_at=now
    ).collateral_value
    exposure = (value / Decimal("0.45")).quantize(Decimal(1))
    ratio = collateral_ratio(policy, value, exposure)
    amount = margin_call_amount(policy, value, exposure)
    assert ratio is not None
    assert amount is not None
    if tamper:
        amount += 1
    call = margin_pb2.MarginCall(
        margin_call_id=call_id,
        account_id=holdings_statement.account_id,
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=sign(parties, EXCHANGE, policy, now=now, audience=("*",)),
            holdings_statements=[statement],
            price_snapshot=snapshot,
        ),
        risk_policy_version=policy.version,
        exposure=amount_to_proto(exposure),
        collateral_value=amount_to_proto(value),
        collateral_ratio=amount_to_proto(ratio),
        call_amount=amount_to_proto(amount),
    )
    call.due_by.FromDatetime(now + timedelta(days=1))
    return sign(parties, EXCHANGE, call, now=now, audience=(CUSTODIAN,))


def test_sync_stream_announces_holdings_and_answers_margin_calls(
    custodian: ServerProcess, reference_parties: Parties, tmp_path: Path
) -> None:
    parties = reference_parties
    account = "acct-stream"

    async def scenario() -> None:
        async with (
            parties.channel(custodian.address, CLIENT) as client_channel,
            parties.channel(custodian.address, EXCHANGE) as exchange_channel,
        ):
            client, control = CustodianClient(client_channel), TestControlClient(client_channel)
            now = await server_now(control)
            # The stand-in exchange keeps the custodian's (possibly advanced) time.
            offset = now - datetime.now(UTC)
            exchange = ExchangeSide(
                tmp_path / "exchange.sqlite", parties, lambda: datetime.now(UTC) + offset
            )
            dial = exchange.dial = asyncio.create_task(
                dial_sync_stream(exchange.session, CustodianClient(exchange_channel))
            )
            try:
                path = path_envelope(
                    parties, account, [("USDC", "otc-desk", "400000")], now=now, path_id="path-s"
                )
                pledged = await client.pledge_collateral(
                    pledge_request(parties, account, "USDC", "300000", now=now, path=path)
                )
                change = await exchange.wait_for(
                    lambda u: (
                        u.HasField("holdings_change")
                        and holdings(u.holdings_change.holdings_statement).account_id == account
                    )
                )
                assert change.holdings_change.holdings_statement == pledged.holdings_statement
                assert change.holdings_change.attestation == pledged.attestation
                # The pledge carries the client's path, as recorded (countersigned): the
                # exchange learns from it the id its instructions must name.
                announced_path = change.holdings_change.liquidation_path
                assert announced_path.payload == path.payload
                assert [s.key_id for s in announced_path.signatures] == [
                    parties.keys[CLIENT].key_id,
                    parties.keys[CUSTODIAN].key_id,
                ]
                verified_path = verify_statement(
                    announced_path,
                    parties.registry,
                    expected_type=liquidation_pb2.LiquidationPath,
                    audience=CUSTODIAN,
                    now=now,
                )
                assert (verified_path.issuer, verified_path.header.statement_id) == (
                    CLIENT,
                    "path-s",
                )
                pledge_change = await exchange.wait_for(
                    lambda u: u.HasField("pledge_change") and u.pledge_change.account_id == account
                )
                assert pledge_change.pledge_change.pledged_quantity.value == "300000"

                # A call that recomputes is answered by the policy (default: agree).
                good = margin_call(parties, pledged.holdings_statement, call_id="mc-good", now=now)
                exchange.send(position_sync_pb2.PositionUpdate(margin_call=good))
                answer = await exchange.wait_for(
                    lambda u: (
                        u.HasField("margin_call_response")
                        and margin_pb2.MarginCallResponse.FromString(
                            u.margin_call_response.payload
                        ).margin_call_id
                        == "mc-good"
                    )
                )
                response = verify_statement(
                    answer.margin_call_response,
                    parties.registry,
                    expected_type=margin_pb2.MarginCallResponse,
                    audience=EXCHANGE,
                    now=now,
                ).message
                call = margin_pb2.MarginCall.FromString(good.payload)
                assert response.kind == margin_pb2.MARGIN_CALL_RESPONSE_KIND_AGREE
                assert response.agreed_amount == call.call_amount

                # One whose amount its inputs do not give is disputed as arithmetic.
                bad = margin_call(
                    parties, pledged.holdings_statement, call_id="mc-bad", now=now, tamper=True
                )
                exchange.send(position_sync_pb2.PositionUpdate(margin_call=bad))
                answer = await exchange.wait_for(
                    lambda u: (
                        u.HasField("margin_call_response")
                        and margin_pb2.MarginCallResponse.FromString(
                            u.margin_call_response.payload
                        ).margin_call_id
                        == "mc-bad"
                    )
                )
                response = margin_pb2.MarginCallResponse.FromString(
                    answer.margin_call_response.payload
                )
                assert response.kind == margin_pb2.MARGIN_CALL_RESPONSE_KIND_DISPUTE
                assert response.dispute_reason == margin_pb2.DISPUTE_REASON_ARITHMETIC
                assert response.agreed_amount.value == "0"

                # A liquidation instruction on the stream: executed, attested, receipted.
                now = await server_now(control)
                policy = sign(parties, EXCHANGE, risk_policy(now), now=now, audience=("*",))
                inputs = valuation_pb2.ValuationInputs(
                    risk_policy=policy,
                    holdings_statements=[pledged.holdings_statement],
                    price_snapshot=price_snapshot(parties, {"USDC": "1", "BENJI": "1"}, now),
                )
                # 300000 * 0.95 = 285000 against an exposure of 800000: ratio 0.35 < 0.4.
                instruction = liquidation_instruction(
                    parties,
                    liquidation_id="liq-stream",
                    account_id=account,
                    amount="800000",
                    path_id="path-s",
                    now=now,
                    inputs=inputs,
                )
                exchange.send(position_sync_pb2.PositionUpdate(liquidation_instruction=instruction))
                update = await exchange.wait_for(
                    lambda u: (
                        u.HasField("liquidation_receipt")
                        and liquidation_pb2.LiquidationReceipt.FromString(
                            u.liquidation_receipt.payload
                        ).liquidation_id
                        == "liq-stream"
                    )
                )
                receipt = verify_statement(
                    update.liquidation_receipt,
                    parties.registry,
                    expected_type=liquidation_pb2.LiquidationReceipt,
                    audience=EXCHANGE,
                    now=now,
                ).message
                assert [
                    (f.asset_id, f.quantity.value, f.proceeds.value) for f in receipt.fills
                ] == [("USDC", "300000", "300000")]
                assert (receipt.total_proceeds.value, receipt.shortfall.value) == (
                    "300000",
                    "500000",
                )
                # The attested holdings came first on the stream, and are the latest.
                position = exchange.received.index(update)
                announced = [
                    u.holdings_change
                    for u in exchange.received[:position]
                    if u.HasField("holdings_change")
                    and holdings(u.holdings_change.holdings_statement).account_id == account
                    and holdings(u.holdings_change.holdings_statement).reason
                    == REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION
                ]
                assert [a.attestation for a in announced] == [receipt.attestation]
                latest = await client.get_holdings_statement(
                    custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
                )
                assert latest.holdings_statement == announced[0].holdings_statement
                assert positions(holdings(latest.holdings_statement))["USDC"] == (
                    "100000",
                    "0",
                    "0",
                )
                checkpoint = await checkpoint_at(
                    parties, client, receipt.attestation.tree_size, now
                )
                proof = await client.get_inclusion_proof(
                    custodian_service_pb2.GetInclusionProofRequest(
                        leaf_index=receipt.attestation.leaf_index, tree_size=checkpoint.tree_size
                    )
                )
                verify_inclusion_proof(
                    proof.proof, statement_leaf(latest.holdings_statement), checkpoint
                )

                # Both sides agree on both logs' heads.
                await exchange.session.wait_acknowledged(exchange.log.sent_head().sequence)
                state = await control.get_sync_state(test_control_pb2.GetSyncStateRequest())
                # Both directions per exchange, in the order of the custodian's peers.
                heads = {int(d.direction): (d.sequence, d.entry_hash) for d in state.directions[:2]}
                assert heads[EXCHANGE_TO_CUSTODIAN] == tuple(exchange.log.sent_head())
                received = exchange.log.received_head()
                assert (
                    heads[position_sync_pb2.SYNC_DIRECTION_CUSTODIAN_TO_EXCHANGE][0]
                    >= received.sequence
                )
            finally:
                dial.cancel()
                await asyncio.gather(dial, return_exceptions=True)
                exchange.connection.close()

    run(scenario())


def test_stream_updates_refused_for_what_they_ask_are_recorded_and_do_not_block_the_log(
    start_server: StartServer,
    reference_parties: Parties,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """PROTOCOL.md §6.5: a verified statement the custodian cannot act on is rejected, kept
    with its reason, and the batch goes on; a statement that does not verify fails it."""
    parties = reference_parties
    directory = tmp_path_factory.mktemp("rejections")
    account = "acct-refuse"
    config = parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        peers={EXCHANGE: None, OTHER_EXCHANGE: None},
        custodian=custodian_settings({account: (CLIENT, {"USDC": "400000"})}),
    )
    server = start_server("custodian", config, name="rejecting-custodian")
    storage = config["storage"]

    def rejected() -> list[tuple[int, str, str]]:
        with open_database(storage) as db:
            rows = db.execute(
                "SELECT sync_sequence, kind, reason FROM custodian_rejected_updates "
                "WHERE exchange_id = ? ORDER BY id",
                (EXCHANGE,),
            ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def scenario() -> None:
        async with (
            parties.channel(server.address, CLIENT) as client_channel,
            parties.channel(server.address, EXCHANGE) as exchange_channel,
        ):
            client, control = CustodianClient(client_channel), TestControlClient(client_channel)
            now = await server_now(control)
            path = path_envelope(
                parties, account, [("USDC", "otc-desk", "400000")], now=now, path_id="path-r"
            )
            pledged = await client.pledge_collateral(
                pledge_request(parties, account, "USDC", "300000", now=now, path=path)
            )
            exchange = ExchangeSide(
                tmp_path_factory.mktemp("refusing-exchange") / "x.sqlite", parties, lambda: now
            )
            policy = sign(parties, EXCHANGE, risk_policy(now), now=now, audience=("*",))
            inputs = valuation_pb2.ValuationInputs(
                risk_policy=policy,
                holdings_statements=[pledged.holdings_statement],
                price_snapshot=price_snapshot(parties, {"USDC": "1"}, now),
            )

            def instruction(liquidation_id: str, path_id: str) -> position_sync_pb2.PositionUpdate:
                # 300000 * 0.95 = 285000 against an exposure of 800000: ratio 0.35 < 0.4.
                return position_sync_pb2.PositionUpdate(
                    liquidation_instruction=liquidation_instruction(
                        parties,
                        liquidation_id=liquidation_id,
                        account_id=account,
                        amount="800000",
                        path_id=path_id,
                        now=now,
                        inputs=inputs,
                    )
                )

            unusable = risk_policy(now)
            unusable.haircuts[0].collateral_factor.value = "1.5"
            call = margin_call(parties, pledged.holdings_statement, call_id="mc-r", now=now)
            # One batch (one transaction, sent before the stream is up): 1, 3, 4 and 5
            # verify but ask for what cannot be done; 2 and 6 are fine.
            with exchange.log.transaction():
                exchange.log.append(
                    [
                        instruction("liq-wrong-path", "path-unknown"),
                        position_sync_pb2.PositionUpdate(margin_call=call),
                        position_sync_pb2.PositionUpdate(
                            margin_call=margin_call(
                                parties, pledged.holdings_statement, call_id="mc-r", now=now
                            )
                        ),
                        position_sync_pb2.PositionUpdate(
                            margin_call=margin_call(
                                parties, pledged.holdings_statement, call_id="", now=now
                            )
                        ),
                        position_sync_pb2.PositionUpdate(
                            risk_policy=sign(parties, EXCHANGE, unusable, now=now, audience=("*",))
                        ),
                        position_sync_pb2.PositionUpdate(
                            credit_line=sign(
                                parties,
                                EXCHANGE,
                                valuation_pb2.CreditLine(account_id=account, risk_policy_version=1),
                                now=now,
                            )
                        ),
                    ]
                )
            dial = exchange.dial = asyncio.create_task(
                dial_sync_stream(exchange.session, CustodianClient(exchange_channel))
            )
            try:
                # The whole batch is acknowledged; a stream that ends instead says why.
                acked = asyncio.ensure_future(exchange.session.wait_acknowledged(6))
                await asyncio.wait({acked, dial}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
                if dial.done():
                    acked.cancel()
                    dial.result()
                assert acked.done(), "the batch was not acknowledged within 20 s"
                assert rejected() == [
                    (1, "liquidation_instruction", "PATH_NOT_AUTHORISED"),
                    (3, "margin_call", "STATE_CONFLICT"),
                    (4, "margin_call", "MALFORMED"),
                    (5, "risk_policy", "MALFORMED"),
                ]
                # The good call in the same batch was answered; the refused ones were not.
                await exchange.wait_for(lambda u: u.HasField("margin_call_response"))
                answers = [
                    margin_pb2.MarginCallResponse.FromString(u.margin_call_response.payload)
                    for u in exchange.received
                    if u.HasField("margin_call_response")
                ]
                assert [a.margin_call_id for a in answers] == ["mc-r"]
                # The refused instruction sold nothing; a later one on the same log is executed.
                latest = await client.get_holdings_statement(
                    custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
                )
                assert latest.holdings_statement == pledged.holdings_statement
                exchange.send(instruction("liq-right-path", "path-r"))
                update = await exchange.wait_for(lambda u: u.HasField("liquidation_receipt"))
                receipt = liquidation_pb2.LiquidationReceipt.FromString(
                    update.liquidation_receipt.payload
                )
                assert receipt.liquidation_id == "liq-right-path"

                # Integrity is another matter: an instruction another exchange signed,
                # relayed on this exchange's stream, fails its batch and nothing is stored.
                foreign = liquidation_instruction(
                    parties,
                    liquidation_id="liq-foreign",
                    account_id=account,
                    amount="800000",
                    path_id="path-r",
                    now=now,
                    inputs=inputs,
                    issuer=OTHER_EXCHANGE,
                )
                foreign_header = liquidation_pb2.LiquidationInstruction.FromString(foreign.payload)
                assert foreign_header.header.issuer == OTHER_EXCHANGE
                exchange.send(position_sync_pb2.PositionUpdate(liquidation_instruction=foreign))
                with pytest.raises(RPCError) as caught:
                    async with asyncio.timeout(20):
                        await dial
                assert (caught.value.code, caught.value.reason_name) == (
                    CODE.PERMISSION_DENIED,
                    "KEY_ROLE_MISMATCH",
                )
                state = await control.get_sync_state(test_control_pb2.GetSyncStateRequest())
                heads = {int(d.direction): d.sequence for d in state.directions[:2]}
                assert heads[EXCHANGE_TO_CUSTODIAN] == 7
                assert len(rejected()) == 4
            finally:
                dial.cancel()
                await asyncio.gather(dial, return_exceptions=True)
                exchange.connection.close()

    try:
        run(scenario())
    finally:
        server.stop()


def test_a_bad_batch_on_the_stream_is_refused_and_changes_nothing(
    custodian: ServerProcess, reference_parties: Parties, tmp_path: Path
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with (
            parties.channel(custodian.address, OTHER_EXCHANGE) as channel,
            parties.channel(custodian.address, CLIENT) as client_channel,
        ):
            control = TestControlClient(client_channel)
            now = await server_now(control)
            offset = now - datetime.now(UTC)
            exchange = ExchangeSide(
                tmp_path / "exchange-2.sqlite",
                parties,
                lambda: datetime.now(UTC) + offset,
                party_id=OTHER_EXCHANGE,
            )
            try:
                credit_line = sign(
                    parties,
                    OTHER_EXCHANGE,
                    valuation_pb2.CreditLine(account_id="acct-other", risk_policy_version=1),
                    now=now,
                )
                exchange.send(
                    position_sync_pb2.PositionUpdate(credit_line=_flip_signature(credit_line))
                )
                with pytest.raises(RPCError) as caught:
                    async with asyncio.timeout(20):
                        await dial_sync_stream(exchange.session, CustodianClient(channel))
                assert (caught.value.code, caught.value.reason_name) == (
                    CODE.UNAUTHENTICATED,
                    "SIGNATURE_INVALID",
                )
                # Nothing of the batch was stored: the custodian still has nothing from us.
                state = await control.get_sync_state(test_control_pb2.GetSyncStateRequest())
                heads = {int(d.direction): d.sequence for d in state.directions[2:4]}
                assert heads[EXCHANGE_TO_CUSTODIAN] == 0
                # And it keeps serving.
                await CustodianClient(channel).get_checkpoint(
                    custodian_service_pb2.GetCheckpointRequest()
                )
            finally:
                exchange.connection.close()

    run(scenario())


# ------------------------------------------------------------------ restarts


RESTART_ACCOUNTS = {
    "acct-r1": (CLIENT, {"USDC": "1000", "BENJI": "5000"}),
    "acct-r2": (OTHER_CLIENT, {"BTC": "2"}),
}


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_state_survives_a_restart(
    how: str,
    start_server: StartServer,
    reference_parties: Parties,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    directory = tmp_path_factory.mktemp(f"restart-{how}")
    config = parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        peers={EXCHANGE: None},
        custodian=custodian_settings(RESTART_ACCOUNTS),
    )
    server = start_server("custodian", config, name=f"custodian-restart-{how}")

    async def record() -> tuple[dict[str, bytes], bytes, datetime, envelope_pb2.Envelope]:
        # The regulator reads both clients' accounts (PROTOCOL.md §4.5) and relays the pledge.
        async with parties.channel(server.address, REGULATOR) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            now = await advance(control, timedelta(hours=5))
            path = path_envelope(
                parties, "acct-r1", [("USDC", "otc", "500")], now=now, path_id="p-r"
            )
            await client.pledge_collateral(
                pledge_request(parties, "acct-r1", "USDC", "500", now=now, path=path)
            )
            await control.deposit(
                test_control_pb2.DepositRequest(
                    account_id="acct-r2", asset_id="BTC", quantity=amount_to_proto("0.5")
                )
            )
            statements = {}
            for account in RESTART_ACCOUNTS:
                response = await client.get_holdings_statement(
                    custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
                )
                statements[account] = response.SerializeToString()
            checkpoint = await client.get_checkpoint(custodian_service_pb2.GetCheckpointRequest())
            return statements, checkpoint.checkpoint.payload, now, path

    statements, checkpoint_payload, clock_before, path = run(record())
    checkpoint = attestation_pb2.Checkpoint.FromString(checkpoint_payload)
    if how == "sigterm":
        assert server.stop() == 0
    else:
        server.kill()
    server.start()

    async def check() -> None:
        # The regulator reads both clients' accounts (PROTOCOL.md §4.5) and relays the pledge.
        async with parties.channel(server.address, REGULATOR) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            now = await server_now(control)
            assert now >= clock_before  # the test clock kept its offset
            for account, recorded in statements.items():
                response = await client.get_holdings_statement(
                    custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
                )
                assert response.SerializeToString() == recorded
            same_size = await checkpoint_at(parties, client, checkpoint.tree_size, now)
            assert same_size.root_hash == checkpoint.root_hash
            latest = await checkpoint_at(parties, client, 0, now)
            assert latest.tree_size == checkpoint.tree_size
            # A pledge after the restart continues the same log and epochs.
            pledged = await client.pledge_collateral(
                pledge_request(parties, "acct-r1", "USDC", "100", now=now, path=path)
            )
            statement = holdings(pledged.holdings_statement)
            previous = custodian_service_pb2.GetHoldingsStatementResponse.FromString(
                statements["acct-r1"]
            )
            assert statement.epoch == holdings(previous.holdings_statement).epoch + 1
            assert pledged.attestation.leaf_index == checkpoint.tree_size
            grown = await checkpoint_at(parties, client, 0, now)
            consistency = await client.get_consistency_proof(
                custodian_service_pb2.GetConsistencyProofRequest(
                    first_tree_size=checkpoint.tree_size, second_tree_size=grown.tree_size
                )
            )
            monitor = CheckpointMonitor()
            monitor.advance(same_size, None)
            monitor.advance(grown, consistency.proof)

    run(check())


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(colour="blue"), "colour: expected a known key"),
        (
            lambda c: c["custodian"]["accounts"][0]["holdings"].update(USDC=10.5),
            "custodian.accounts[0].holdings.USDC: expected a decimal as a JSON string",
        ),
        (lambda c: c.update(role="exchange"), "got role is 'exchange'"),
        (lambda c: c.pop("tls"), "tls is required"),
        (lambda c: c.update(signing_key="missing.key.json"), "missing.key.json"),
    ],
)
def test_a_bad_configuration_is_reported_in_one_line_without_starting(
    change: Callable[[dict[str, Any]], object],
    message: str,
    reference_parties: Parties,
    tmp_path: Path,
) -> None:
    config = json.loads(
        json.dumps(
            reference_parties.config(
                CUSTODIAN, "custodian", tmp_path, custodian=custodian_settings(RESTART_ACCOUNTS)
            )
        )
    )
    change(config)
    path = tmp_path / "custodian.json"
    path.write_text(json.dumps(config))
    environment = dict(os.environ, PYTHONPATH=str(REFERENCE_PATH))
    result = subprocess.run(
        [sys.executable, "-m", "collateral_sync._cli", "serve", "custodian", "--config", str(path)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("collateral-sync:")]
    assert message in line, result.stderr
    assert not (tmp_path / f"{CUSTODIAN}.sqlite").exists()
