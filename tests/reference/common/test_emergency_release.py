"""Emergency release, 2 of {regulator, custodian, exchange}, against real server processes.

A reference custodian and a reference exchange run as processes over mutual
TLS; the test plays the regulator (it holds the regulator's key). Accounts
pledge USDC to the exchange and the exchange mirrors them; then releases are
co-signed through ``EmergencyReleaseService`` on the servers and executed
with ``CustodianService.ExecuteEmergencyRelease``. Every refusal is checked
for its status and reason and for leaving the account's attested state (its
latest holdings statement and the log size) untouched.

The test that moves the custodian's clock 48 h runs last: the exchange's
clock is left behind, as a dark exchange's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import pytest
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import (
    CustodianClient,
    EmergencyReleaseClient,
    ExchangeClient,
    TestControlClient,
)
from collateral_sync.errors import RPCError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import add_signature, sign_statement, verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    emergency_pb2,
    emergency_release_service_pb2,
    envelope_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    test_control_pb2,
)
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    OTHER_EXCHANGE,
    REGULATOR,
    Parties,
    ServerProcess,
    StartServer,
)

_T = TypeVar("_T")

ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
CODE = grpc.StatusCode
REASON = attestation_pb2.HoldingsChangeReason
ACCOUNTS = ("er-reg-exch", "er-cust-exch", "er-dark", "er-refused", "er-exposed", "er-regulator")
PLEDGED = "400000"
#: Regulator and custodian alone: the pilot's wait.
WAIT = timedelta(hours=48)

_SEQUENCE = itertools.count(1)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@dataclass
class Servers:
    custodian: ServerProcess
    exchange: ServerProcess


@pytest.fixture(scope="module")
def servers(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> Servers:
    directory = tmp_path_factory.mktemp("emergency")
    custodian = start_server(
        "custodian",
        reference_parties.config(
            CUSTODIAN,
            "custodian",
            directory,
            peers={EXCHANGE: None},
            custodian={
                "accounts": [
                    {"account_id": a, "client_id": CLIENT, "holdings": {"USDC": "500000"}}
                    for a in ACCOUNTS
                ]
            },
        ),
        name="emergency-custodian",
    )
    exchange = start_server(
        "exchange",
        reference_parties.config(
            EXCHANGE,
            "exchange",
            directory,
            peers={CUSTODIAN: custodian.address},
            exchange={"log_origin": ORIGIN, "prices": [{"asset_id": "USDC", "price": "1"}]},
        ),
        name="emergency-exchange",
    )
    servers = Servers(custodian, exchange)
    run(_pledge_all(reference_parties, servers))
    return servers


# ------------------------------------------------------------------ helpers


@dataclass
class Clients:
    custodian: CustodianClient
    custodian_control: TestControlClient
    custodian_cosigner: EmergencyReleaseClient
    exchange: ExchangeClient
    exchange_control: TestControlClient
    exchange_cosigner: EmergencyReleaseClient


@contextlib.asynccontextmanager
async def clients(parties: Parties, servers: Servers) -> AsyncIterator[Clients]:
    # The regulator's certificate: it is the regulator who drives a release.
    async with (
        parties.channel(servers.custodian.address, REGULATOR) as to_custodian,
        parties.channel(servers.exchange.address, REGULATOR) as to_exchange,
    ):
        yield Clients(
            CustodianClient(to_custodian),
            TestControlClient(to_custodian),
            EmergencyReleaseClient(to_custodian),
            ExchangeClient(to_exchange),
            TestControlClient(to_exchange),
            EmergencyReleaseClient(to_exchange),
        )


async def server_now(control: TestControlClient) -> datetime:
    response = await control.advance_clock(
        test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
    )
    return response.now.ToDatetime(tzinfo=UTC)


def sign(
    message: Message,
    key: SigningKey,
    *,
    now: datetime,
    audience: tuple[str, ...] = (CUSTODIAN,),
    ttl: timedelta = timedelta(hours=1),
    statement_id: str | None = None,
) -> envelope_pb2.Envelope:
    return sign_statement(
        message,
        key,
        audience=list(audience),
        sequence=next(_SEQUENCE),
        ttl=ttl,
        issued_at=now,
        statement_id=statement_id,
    )


async def _pledge_all(parties: Parties, servers: Servers) -> None:
    """Each account pledges USDC to the exchange; wait until the exchange credits every one."""
    async with clients(parties, servers) as c:
        now = await server_now(c.custodian_control)
        client = parties.keys[CLIENT]
        for account_id in ACCOUNTS:
            path = liquidation_pb2.LiquidationPath(
                account_id=account_id,
                exchange_id=EXCHANGE,
                proceeds_account_id=f"{EXCHANGE}/settlement",
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id="USDC", venue="otc", max_quantity=amount_to_proto(PLEDGED)
                    )
                ],
            )
            instruction = custodian_service_pb2.PledgeInstruction(
                account_id=account_id,
                exchange_id=EXCHANGE,
                asset_id="USDC",
                quantity=amount_to_proto(PLEDGED),
            )
            await c.custodian.pledge_collateral(
                custodian_service_pb2.PledgeCollateralRequest(
                    pledge_instruction=sign(instruction, client, now=now),
                    liquidation_path=sign(path, client, now=now, statement_id=f"path-{account_id}"),
                )
            )
        async with asyncio.timeout(30):
            for account_id in ACCOUNTS:
                while True:
                    try:
                        await c.exchange.get_credit_line(
                            exchange_service_pb2.GetCreditLineRequest(account_id=account_id)
                        )
                        break
                    except RPCError:
                        # No event crosses the process boundary: poll the exchange.
                        await asyncio.sleep(0.05)


def release(
    parties: Parties,
    issuer: str,
    account_id: str,
    release_id: str,
    *,
    now: datetime,
    unresponsive_since: datetime | None = None,
    ttl: timedelta = timedelta(hours=1),
    exchange_id: str = EXCHANGE,
) -> envelope_pb2.Envelope:
    message = emergency_pb2.EmergencyRelease(
        release_id=release_id,
        account_id=account_id,
        exchange_id=exchange_id,
        reason=emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE
        if unresponsive_since is not None
        else emergency_pb2.EMERGENCY_RELEASE_REASON_REGULATORY_ORDER,
    )
    if unresponsive_since is not None:
        message.exchange_unresponsive_since.FromDatetime(unresponsive_since)
    return sign(
        message,
        parties.keys[issuer],
        now=now,
        ttl=ttl,
        audience=(CUSTODIAN, EXCHANGE, REGULATOR),
        statement_id=release_id,
    )


async def cosign(cosigner: EmergencyReleaseClient, envelope: envelope_pb2.Envelope) -> Any:
    response = await cosigner.co_sign_emergency_release(
        emergency_release_service_pb2.CoSignEmergencyReleaseRequest(emergency_release=envelope)
    )
    return response.emergency_release


async def execute(custodian: CustodianClient, envelope: envelope_pb2.Envelope) -> Any:
    response = await custodian.execute_emergency_release(
        custodian_service_pb2.ExecuteEmergencyReleaseRequest(emergency_release=envelope)
    )
    return response.emergency_release_receipt


async def expect_refusal(call: Awaitable[object], code: grpc.StatusCode, reason: str) -> RPCError:
    with pytest.raises(RPCError) as caught:
        await call
    error = caught.value
    assert (error.code, error.reason_name) == (code, reason), error.message
    assert {"expected", "actual"} <= set(error.metadata), error.metadata
    return error


async def state_of(custodian: CustodianClient, account_id: str) -> tuple[bytes, int]:
    """What a refused release must not change: the account's statement and the log size."""
    statement = await custodian.get_holdings_statement(
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
    )
    checkpoint = await custodian.get_checkpoint(custodian_service_pb2.GetCheckpointRequest())
    size = attestation_pb2.Checkpoint.FromString(checkpoint.checkpoint.payload).tree_size
    return statement.holdings_statement.SerializeToString(), size


async def pledged(custodian: CustodianClient, account_id: str) -> attestation_pb2.HoldingsStatement:
    response = await custodian.get_holdings_statement(
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
    )
    return attestation_pb2.HoldingsStatement.FromString(response.holdings_statement.payload)


def signer_parties(parties: Parties, envelope: envelope_pb2.Envelope) -> list[str]:
    registry = parties.registry
    found = [registry.get(s.key_id) for s in envelope.signatures]
    return [key.party_id for key in found if key is not None]


def check_receipt(
    parties: Parties,
    receipt: envelope_pb2.Envelope,
    released: envelope_pb2.Envelope,
    account_id: str,
    now: datetime,
) -> emergency_pb2.EmergencyReleaseReceipt:
    verified = verify_statement(
        receipt,
        parties.registry,
        expected_type=emergency_pb2.EmergencyReleaseReceipt,
        audience=REGULATOR,
        now=now,
    )
    assert verified.issuer == CUSTODIAN
    message = verified.message
    assert message.account_id == account_id
    assert message.release == released
    return message


async def assert_released(c: Clients, account_id: str) -> None:
    """The account's latest attested statement says RELEASE and pledges nothing."""
    statement = await pledged(c.custodian, account_id)
    assert statement.reason == REASON.HOLDINGS_CHANGE_REASON_RELEASE
    assert [
        (p.asset_id, p.quantity.value, p.pledged_quantity.value) for p in statement.positions
    ] == [("USDC", "500000", "0")]


# ------------------------------------------------------------------ tests


def test_regulator_and_exchange_release_is_executed_attested_and_idempotent(
    servers: Servers, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, servers) as c:
            now = await server_now(c.custodian_control)
            account = "er-reg-exch"
            before = await pledged(c.custodian, account)
            assert [p.pledged_quantity.value for p in before.positions] == [PLEDGED]
            issued = release(parties, REGULATOR, account, "rel-reg-exch", now=now)
            signed = await cosign(c.exchange_cosigner, issued)
            assert signer_parties(parties, signed) == [REGULATOR, EXCHANGE]
            assert signed.payload == issued.payload
            # The exchange signs once: asking again is refused.
            await expect_refusal(
                cosign(c.exchange_cosigner, signed), CODE.FAILED_PRECONDITION, "STATE_CONFLICT"
            )
            receipt = await execute(c.custodian, signed)
            message = check_receipt(parties, receipt, signed, account, now)
            assert message.release_id == "rel-reg-exch"
            await assert_released(c, account)
            # A retry returns the same receipt and changes nothing more.
            state = await state_of(c.custodian, account)
            assert await execute(c.custodian, signed) == receipt
            assert await state_of(c.custodian, account) == state
            # Another release under the same id is refused.
            other = await cosign(
                c.exchange_cosigner,
                release(parties, REGULATOR, "er-refused", "rel-reg-exch", now=now),
            )
            refused_state = await state_of(c.custodian, "er-refused")
            await expect_refusal(
                execute(c.custodian, other), CODE.FAILED_PRECONDITION, "STATE_CONFLICT"
            )
            assert await state_of(c.custodian, "er-refused") == refused_state

    run(scenario())


def test_custodian_and_exchange_release_is_executed(
    servers: Servers, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, servers) as c:
            now = await server_now(c.custodian_control)
            account = "er-cust-exch"
            # Issued by the custodian (its operator), co-signed by the exchange.
            issued = release(parties, CUSTODIAN, account, "rel-cust-exch", now=now)
            signed = await cosign(c.exchange_cosigner, issued)
            assert signer_parties(parties, signed) == [CUSTODIAN, EXCHANGE]
            receipt = await execute(c.custodian, signed)
            check_receipt(parties, receipt, signed, account, now)
            await assert_released(c, account)

    run(scenario())


def test_bad_releases_are_refused_and_change_nothing(
    servers: Servers, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, servers) as c:
            now = await server_now(c.custodian_control)
            account = "er-refused"
            state = await state_of(c.custodian, account)

            async def refused(
                envelope: envelope_pb2.Envelope, code: grpc.StatusCode, reason: str
            ) -> None:
                await expect_refusal(execute(c.custodian, envelope), code, reason)
                assert await state_of(c.custodian, account) == state

            # One signature.
            single = release(parties, REGULATOR, account, "rel-single", now=now)
            await refused(single, CODE.PERMISSION_DENIED, "THRESHOLD_NOT_MET")
            # The same party twice: its signature repeated counts once.
            twice = envelope_pb2.Envelope()
            twice.CopyFrom(single)
            twice.signatures.append(single.signatures[0])
            await refused(twice, CODE.PERMISSION_DENIED, "THRESHOLD_NOT_MET")
            # A wrong-role key: the client's signature is no release key.
            with_client = add_signature(single, parties.keys[CLIENT])
            await refused(with_client, CODE.PERMISSION_DENIED, "THRESHOLD_NOT_MET")
            # ...and the co-signers will not add to an envelope carrying it.
            await expect_refusal(
                cosign(c.exchange_cosigner, with_client),
                CODE.PERMISSION_DENIED,
                "KEY_ROLE_MISMATCH",
            )
            # Another exchange's signature is a valid release key, but not this account's.
            with_other_exchange = add_signature(single, parties.keys[OTHER_EXCHANGE])
            await refused(with_other_exchange, CODE.PERMISSION_DENIED, "THRESHOLD_NOT_MET")
            # Expired: issued two hours ago for one hour.
            expired = add_signature(
                release(parties, REGULATOR, account, "rel-expired", now=now - timedelta(hours=2)),
                parties.keys[EXCHANGE],
            )
            await refused(expired, CODE.FAILED_PRECONDITION, "STATEMENT_EXPIRED")
            await expect_refusal(
                cosign(c.custodian_cosigner, expired), CODE.FAILED_PRECONDITION, "STATEMENT_EXPIRED"
            )
            # Tampered: another account in the signed payload.
            good = await cosign(
                c.exchange_cosigner, release(parties, REGULATOR, account, "rel-tamper", now=now)
            )
            message = emergency_pb2.EmergencyRelease.FromString(good.payload)
            message.account_id = "er-dark"
            tampered = envelope_pb2.Envelope()
            tampered.CopyFrom(good)
            tampered.payload = message.SerializeToString()
            await refused(tampered, CODE.UNAUTHENTICATED, "SIGNATURE_INVALID")
            dark_state = await state_of(c.custodian, "er-dark")
            # One signature flipped: only one party left.
            flipped = envelope_pb2.Envelope()
            flipped.CopyFrom(good)
            flipped.signatures[1].sig = bytes(64)
            await refused(flipped, CODE.PERMISSION_DENIED, "THRESHOLD_NOT_MET")
            # Regulator + custodian, exchange not declared unresponsive.
            without_exchange = await cosign(
                c.custodian_cosigner,
                release(parties, REGULATOR, account, "rel-no-exchange", now=now),
            )
            assert signer_parties(parties, without_exchange) == [REGULATOR, CUSTODIAN]
            await refused(without_exchange, CODE.FAILED_PRECONDITION, "STATE_CONFLICT")
            # A release naming another exchange than the account's.
            await expect_refusal(
                cosign(
                    c.custodian_cosigner,
                    release(
                        parties, REGULATOR, account, "rel-other", now=now, exchange_id="exchange-2"
                    ),
                ),
                CODE.FAILED_PRECONDITION,
                "STATE_CONFLICT",
            )
            assert await state_of(c.custodian, "er-dark") == dark_state
            # Still pledged after all of it.
            statement = await pledged(c.custodian, account)
            assert [p.pledged_quantity.value for p in statement.positions] == [PLEDGED]

    run(scenario())


def test_exchange_refuses_to_cosign_for_an_account_with_exposure(
    servers: Servers, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, servers) as c:
            now = await server_now(c.custodian_control)
            await c.exchange_control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="er-exposed", exposure=amount_to_proto("1000")
                )
            )
            error = await expect_refusal(
                cosign(
                    c.exchange_cosigner,
                    release(parties, REGULATOR, "er-exposed", "rel-exposed", now=now),
                ),
                CODE.FAILED_PRECONDITION,
                "STATE_CONFLICT",
            )
            assert error.metadata["actual"] == "1000"

    run(scenario())


def test_regulator_and_custodian_release_only_after_the_wait(
    servers: Servers, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, servers) as c:
            now = await server_now(c.custodian_control)
            account = "er-dark"
            since = now - timedelta(hours=1)
            early = await cosign(
                c.custodian_cosigner,
                release(
                    parties, REGULATOR, account, "rel-dark-early", now=now, unresponsive_since=since
                ),
            )
            state = await state_of(c.custodian, account)
            error = await expect_refusal(
                execute(c.custodian, early), CODE.FAILED_PRECONDITION, "STATE_CONFLICT"
            )
            assert error.metadata["field"] == "exchange_unresponsive_since"
            assert await state_of(c.custodian, account) == state
            # Just short of the wait: still refused.
            duration = duration_pb2.Duration()
            duration.FromTimedelta(WAIT - timedelta(hours=1, minutes=5))
            later = (
                await c.custodian_control.advance_clock(
                    test_control_pb2.AdvanceClockRequest(by=duration)
                )
            ).now.ToDatetime(tzinfo=UTC)
            almost = await cosign(
                c.custodian_cosigner,
                release(
                    parties,
                    REGULATOR,
                    account,
                    "rel-dark-almost",
                    now=later,
                    unresponsive_since=since,
                ),
            )
            await expect_refusal(
                execute(c.custodian, almost), CODE.FAILED_PRECONDITION, "STATE_CONFLICT"
            )
            # Past the wait: executed.
            duration.FromTimedelta(timedelta(minutes=10))
            after = (
                await c.custodian_control.advance_clock(
                    test_control_pb2.AdvanceClockRequest(by=duration)
                )
            ).now.ToDatetime(tzinfo=UTC)
            assert after >= since + WAIT
            accepted = await cosign(
                c.custodian_cosigner,
                release(
                    parties, REGULATOR, account, "rel-dark", now=after, unresponsive_since=since
                ),
            )
            receipt = await execute(c.custodian, accepted)
            check_receipt(parties, receipt, accepted, account, after)
            await assert_released(c, account)
            # The release is recorded durably: after a restart the same release answers with
            # the same receipt, and nothing is executed again.
            state = await state_of(c.custodian, account)
            servers.custodian.extra_args = ("--listen", servers.custodian.address)
            await asyncio.to_thread(servers.custodian.restart)
            assert await execute(c.custodian, accepted) == receipt
            assert await state_of(c.custodian, account) == state

    run(scenario())


def test_regulator_server_cosigns_for_its_exchange_only(
    servers: Servers,
    reference_parties: Parties,
    start_server: StartServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    regulator = start_server(
        "regulator",
        parties.config(
            REGULATOR,
            "regulator",
            tmp_path_factory.mktemp("emergency-regulator"),
            peers={CUSTODIAN: servers.custodian.address, EXCHANGE: servers.exchange.address},
        ),
        name="emergency-regulator",
    )

    async def scenario() -> None:
        async with (
            clients(parties, servers) as c,
            parties.channel(regulator.address, EXCHANGE) as to_regulator,
        ):
            regulator_cosigner = EmergencyReleaseClient(to_regulator)
            # Earlier tests may have moved the custodian's clock days ahead; issue at the
            # regulator's time with a TTL that covers both clocks.
            now = await server_now(TestControlClient(to_regulator))
            ttl = timedelta(days=30)
            account = "er-regulator"
            issued = release(parties, EXCHANGE, account, "rel-exch-reg", now=now, ttl=ttl)
            signed = await cosign(regulator_cosigner, issued)
            assert signer_parties(parties, signed) == [EXCHANGE, REGULATOR]
            receipt = await execute(c.custodian, signed)
            check_receipt(parties, receipt, signed, account, await server_now(c.custodian_control))
            await assert_released(c, account)
            # A release naming an exchange this regulator does not oversee is refused.
            other = release(
                parties,
                EXCHANGE,
                account,
                "rel-other",
                now=now,
                ttl=ttl,
                exchange_id=OTHER_EXCHANGE,
            )
            await expect_refusal(
                cosign(regulator_cosigner, other), CODE.FAILED_PRECONDITION, "STATE_CONFLICT"
            )

    run(scenario())
