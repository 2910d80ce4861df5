"""Settlement cycles on the reference custodian, a real process over mutual TLS.

The test plays the exchange (it holds the exchange's key): it signs
settlement instructions and disputes and sends them with
``SubmitSettlementInstruction`` / ``DisputeSettlement``; the custodian's clock
is moved with ``AdvanceClock`` past dispute windows. No exchange has sent a
risk policy on the sync stream, so the custodian holds the pilot's figures:
a 24 h dispute window and two cycles per UTC day.

Each test starts on a UTC day of its own (the clock moved to 01:00 of the
next day), so the daily cap counts only its own cycles.
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
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    liquidation_pb2,
    reconciliation_pb2,
    test_control_pb2,
)
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, Parties, ServerProcess, StartServer

_T = TypeVar("_T")

CODE = grpc.StatusCode
STATUS = reconciliation_pb2.SettlementStatus
REASON = attestation_pb2.HoldingsChangeReason
HOUSE = f"{EXCHANGE}/settlement"
ACCOUNTS = ("st-exec", "st-pay-back", "st-dispute", "st-late", "st-cap")
WINDOW = timedelta(hours=24)

_SEQUENCE = itertools.count(1)
_IDS = itertools.count(1)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def custodian(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    directory = tmp_path_factory.mktemp("settlement")
    accounts = [
        {"account_id": a, "client_id": CLIENT, "holdings": {"USDC": "100000"}} for a in ACCOUNTS
    ]
    accounts.append({"account_id": HOUSE, "client_id": EXCHANGE, "holdings": {"USDC": "1000000"}})
    server = start_server(
        "custodian",
        reference_parties.config(
            CUSTODIAN,
            "custodian",
            directory,
            peers={EXCHANGE: None},
            custodian={"accounts": accounts},
        ),
        name="settlement-custodian",
    )
    run(_pledge_all(reference_parties, server))
    return server


# ------------------------------------------------------------------ helpers


@dataclass
class Clients:
    custodian: CustodianClient
    control: TestControlClient


@contextlib.asynccontextmanager
async def clients(parties: Parties, server: ServerProcess) -> AsyncIterator[Clients]:
    async with parties.channel(server.address, EXCHANGE) as channel:
        yield Clients(CustodianClient(channel), TestControlClient(channel))


async def advance(control: TestControlClient, by: timedelta) -> datetime:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(by)
    response = await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=duration))
    return response.now.ToDatetime(tzinfo=UTC)


async def fresh_day(control: TestControlClient) -> datetime:
    """Move the custodian's clock to 01:00 UTC of the next day; returns the new now."""
    now = await advance(control, timedelta(0))
    target = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return await advance(control, target + timedelta(hours=1) - now)


def sign(
    message: Message, key: SigningKey, *, now: datetime, statement_id: str | None = None
) -> envelope_pb2.Envelope:
    return sign_statement(
        message,
        key,
        audience=[CUSTODIAN],
        sequence=next(_SEQUENCE),
        ttl=timedelta(hours=1),
        issued_at=now,
        statement_id=statement_id,
    )


async def _pledge_all(parties: Parties, server: ServerProcess) -> None:
    """Each client account pledges 50000 USDC to the exchange."""
    async with clients(parties, server) as c:
        now = await advance(c.control, timedelta(0))
        client = parties.keys[CLIENT]
        for account_id in ACCOUNTS:
            path = liquidation_pb2.LiquidationPath(
                account_id=account_id,
                exchange_id=EXCHANGE,
                proceeds_account_id=HOUSE,
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id="USDC", venue="otc", max_quantity=amount_to_proto("50000")
                    )
                ],
            )
            instruction = custodian_service_pb2.PledgeInstruction(
                account_id=account_id,
                exchange_id=EXCHANGE,
                asset_id="USDC",
                quantity=amount_to_proto("50000"),
            )
            await c.custodian.pledge_collateral(
                custodian_service_pb2.PledgeCollateralRequest(
                    pledge_instruction=sign(instruction, client, now=now),
                    liquidation_path=sign(path, client, now=now, statement_id=f"p-{account_id}"),
                )
            )


def instruction(
    parties: Parties,
    account_id: str,
    net_amount: str,
    *,
    now: datetime,
    cutoff_id: str,
    cycle_of_day: int,
    settlement_id: str | None = None,
) -> envelope_pb2.Envelope:
    message = reconciliation_pb2.SettlementInstruction(
        settlement_id=settlement_id or f"set-{next(_IDS)}",
        cutoff_id=cutoff_id,
        account_id=account_id,
        asset_id="USDC",
        net_amount=amount_to_proto(net_amount),
        cycle_of_day=cycle_of_day,
    )
    message.dispute_deadline.FromDatetime(now + WINDOW)
    return sign(message, parties.keys[EXCHANGE], now=now)


def settlement_id_of(envelope: envelope_pb2.Envelope) -> str:
    return reconciliation_pb2.SettlementInstruction.FromString(envelope.payload).settlement_id


async def submit(
    c: Clients, envelope: envelope_pb2.Envelope
) -> custodian_service_pb2.SubmitSettlementInstructionResponse:
    return await c.custodian.submit_settlement_instruction(
        custodian_service_pb2.SubmitSettlementInstructionRequest(settlement_instruction=envelope)
    )


async def dispute(
    parties: Parties, c: Clients, settlement_id: str, *, now: datetime, party: str = EXCHANGE
) -> custodian_service_pb2.DisputeSettlementResponse:
    message = reconciliation_pb2.SettlementDispute(
        settlement_id=settlement_id, reason="the netting does not match our books"
    )
    return await c.custodian.dispute_settlement(
        custodian_service_pb2.DisputeSettlementRequest(
            settlement_dispute=sign(message, parties.keys[party], now=now)
        )
    )


async def settlement(c: Clients, settlement_id: str) -> custodian_service_pb2.GetSettlementResponse:
    return await c.custodian.get_settlement(
        custodian_service_pb2.GetSettlementRequest(settlement_id=settlement_id)
    )


async def statement(c: Clients, account_id: str) -> attestation_pb2.HoldingsStatement:
    response = await c.custodian.get_holdings_statement(
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
    )
    return attestation_pb2.HoldingsStatement.FromString(response.holdings_statement.payload)


async def usdc(c: Clients, account_id: str) -> tuple[str, str]:
    """(quantity, pledged) of the account's USDC, as attested."""
    [position] = [p for p in (await statement(c, account_id)).positions if p.asset_id == "USDC"]
    return position.quantity.value, position.pledged_quantity.value


async def state_of(c: Clients, *account_ids: str) -> tuple[bytes, ...]:
    """The accounts' latest attested statements: what a refusal must leave as it was."""
    found = []
    for account_id in account_ids:
        response = await c.custodian.get_holdings_statement(
            custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
        )
        found.append(response.holdings_statement.SerializeToString())
    return tuple(found)


async def expect_refusal(call: Awaitable[object], code: grpc.StatusCode, reason: str) -> RPCError:
    with pytest.raises(RPCError) as caught:
        await call
    error = caught.value
    assert (error.code, error.reason_name) == (code, reason), error.message
    assert {"expected", "actual"} <= set(error.metadata), error.metadata
    return error


# ------------------------------------------------------------------ tests


def test_settlement_executes_only_after_the_dispute_window(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, custodian) as c:
            now = await fresh_day(c.control)
            house_before = (await usdc(c, HOUSE))[0]
            assert await usdc(c, "st-exec") == ("100000", "50000")
            owed = instruction(parties, "st-exec", "1000", now=now, cutoff_id="A", cycle_of_day=1)
            # The same cycle: the exchange pays another client back.
            paid_back = instruction(
                parties, "st-pay-back", "-200", now=now, cutoff_id="A", cycle_of_day=1
            )
            for envelope in (owed, paid_back):
                response = await submit(c, envelope)
                assert response.status == STATUS.SETTLEMENT_STATUS_PENDING
                deadline = response.dispute_deadline.ToDatetime(tzinfo=UTC)
                assert deadline >= now + WINDOW
            # A resubmission is answered from the record, not counted again.
            assert (await submit(c, owed)).status == STATUS.SETTLEMENT_STATUS_PENDING

            await advance(c.control, WINDOW - timedelta(hours=1))
            pending = await settlement(c, settlement_id_of(owed))
            assert pending.status == STATUS.SETTLEMENT_STATUS_PENDING
            assert not pending.HasField("attestation")
            assert await usdc(c, "st-exec") == ("100000", "50000")

            await advance(c.control, timedelta(hours=2))
            executed = await settlement(c, settlement_id_of(owed))
            assert executed.status == STATUS.SETTLEMENT_STATUS_EXECUTED
            assert executed.settlement_instruction == owed
            # Out of the client's pledge, into the exchange's account, both attested.
            after = await statement(c, "st-exec")
            assert after.reason == REASON.HOLDINGS_CHANGE_REASON_SETTLEMENT
            assert await usdc(c, "st-exec") == ("99000", "49000")
            response = await c.custodian.get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id="st-exec")
            )
            assert response.attestation.leaf_index == executed.attestation.leaf_index
            assert (await settlement(c, settlement_id_of(paid_back))).status == (
                STATUS.SETTLEMENT_STATUS_EXECUTED
            )
            assert await usdc(c, "st-pay-back") == ("100200", "50000")
            house = await statement(c, HOUSE)
            assert house.reason == REASON.HOLDINGS_CHANGE_REASON_SETTLEMENT
            assert (await usdc(c, HOUSE))[0] == str(int(house_before) + 1000 - 200)

    run(scenario())


def test_a_disputed_settlement_is_never_executed(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, custodian) as c:
            now = await fresh_day(c.control)
            envelope = instruction(
                parties, "st-dispute", "500", now=now, cutoff_id="B", cycle_of_day=1
            )
            await submit(c, envelope)
            settlement_id = settlement_id_of(envelope)
            later = await advance(c.control, timedelta(hours=3))
            answer = await dispute(parties, c, settlement_id, now=later)
            assert answer.status == STATUS.SETTLEMENT_STATUS_DISPUTED
            before = await state_of(c, "st-dispute", HOUSE)
            await advance(c.control, WINDOW * 2)
            found = await settlement(c, settlement_id)
            assert found.status == STATUS.SETTLEMENT_STATUS_DISPUTED
            assert found.HasField("settlement_dispute")
            assert not found.HasField("attestation")
            assert await state_of(c, "st-dispute", HOUSE) == before
            assert await usdc(c, "st-dispute") == ("100000", "50000")

    run(scenario())


def test_a_dispute_after_the_deadline_is_refused(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, custodian) as c:
            now = await fresh_day(c.control)
            envelope = instruction(
                parties, "st-late", "100", now=now, cutoff_id="C", cycle_of_day=1
            )
            await submit(c, envelope)
            settlement_id = settlement_id_of(envelope)
            later = await advance(c.control, WINDOW + timedelta(minutes=1))
            assert (await settlement(c, settlement_id)).status == STATUS.SETTLEMENT_STATUS_EXECUTED
            before = await state_of(c, "st-late", HOUSE)
            for party in (EXCHANGE, CUSTODIAN):
                error = await expect_refusal(
                    dispute(parties, c, settlement_id, now=later, party=party),
                    CODE.FAILED_PRECONDITION,
                    "STATE_CONFLICT",
                )
                assert error.metadata["field"] == "settlement_id"
            assert (await settlement(c, settlement_id)).status == STATUS.SETTLEMENT_STATUS_EXECUTED
            assert await state_of(c, "st-late", HOUSE) == before
            # Unknown settlements cannot be disputed either.
            await expect_refusal(
                dispute(parties, c, "no-such-settlement", now=later), CODE.NOT_FOUND, "NOT_FOUND"
            )

    run(scenario())


def test_a_pending_settlement_survives_a_restart(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, custodian) as c:
            now = await fresh_day(c.control)
            envelope = instruction(parties, "st-late", "50", now=now, cutoff_id="R", cycle_of_day=1)
            settlement_id = settlement_id_of(envelope)
            await submit(c, envelope)
            before = await usdc(c, "st-late")
            custodian.extra_args = ("--listen", custodian.address)
            await asyncio.to_thread(custodian.restart)
            found = await settlement(c, settlement_id)
            assert found.status == STATUS.SETTLEMENT_STATUS_PENDING
            assert found.settlement_instruction == envelope
            # The resubmission after the restart is answered from the record.
            assert (await submit(c, envelope)).dispute_deadline == found.dispute_deadline
            await advance(c.control, WINDOW + timedelta(minutes=1))
            assert (await settlement(c, settlement_id)).status == STATUS.SETTLEMENT_STATUS_EXECUTED
            quantity, pledged = before
            assert await usdc(c, "st-late") == (
                str(int(quantity) - 50),
                str(int(pledged) - 50),
            )

    run(scenario())


def test_a_third_cycle_in_a_day_is_refused_and_changes_nothing(
    custodian: ServerProcess, reference_parties: Parties
) -> None:
    parties = reference_parties

    async def scenario() -> None:
        async with clients(parties, custodian) as c:
            now = await fresh_day(c.control)
            first = instruction(parties, "st-cap", "10", now=now, cutoff_id="D1", cycle_of_day=1)
            await submit(c, first)
            # The cycle number must be the custodian's count.
            wrong = instruction(parties, "st-cap", "10", now=now, cutoff_id="D2", cycle_of_day=1)
            await expect_refusal(submit(c, wrong), CODE.FAILED_PRECONDITION, "STATE_CONFLICT")
            beyond = instruction(parties, "st-cap", "10", now=now, cutoff_id="D2", cycle_of_day=5)
            await expect_refusal(submit(c, beyond), CODE.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")
            second = instruction(parties, "st-cap", "20", now=now, cutoff_id="D2", cycle_of_day=2)
            await submit(c, second)
            # More instructions of a cycle already open are no new cycle.
            more = instruction(parties, "st-cap", "5", now=now, cutoff_id="D2", cycle_of_day=2)
            assert (await submit(c, more)).status == STATUS.SETTLEMENT_STATUS_PENDING
            # More than the pledge cannot be settled.
            too_much = instruction(
                parties, "st-cap", "60000", now=now, cutoff_id="D2", cycle_of_day=2
            )
            await expect_refusal(submit(c, too_much), CODE.FAILED_PRECONDITION, "STATE_CONFLICT")

            before = await state_of(c, "st-cap", HOUSE)
            third = instruction(parties, "st-cap", "30", now=now, cutoff_id="D3", cycle_of_day=3)
            error = await expect_refusal(
                submit(c, third), CODE.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"
            )
            assert error.metadata["actual"] == "3"
            # Not recorded: the exchange that issued it would read it, and is told only
            # what any non-regulator is told of a settlement that does not exist (§4.5).
            await expect_refusal(
                settlement(c, settlement_id_of(third)),
                CODE.PERMISSION_DENIED,
                "KEY_ROLE_MISMATCH",
            )
            assert await state_of(c, "st-cap", HOUSE) == before
            # Refused for the day, not for ever: the next day opens new cycles.
            tomorrow = await fresh_day(c.control)
            again = instruction(
                parties, "st-cap", "30", now=tomorrow, cutoff_id="D3", cycle_of_day=1
            )
            assert (await submit(c, again)).status == STATUS.SETTLEMENT_STATUS_PENDING

    run(scenario())


def test_the_exchange_nets_a_cycle_and_the_custodian_executes_it(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The reference exchange's own cycle: results netted, signed, submitted, executed."""
    parties = reference_parties
    directory = tmp_path_factory.mktemp("exchange-settlement")
    accounts = [
        {"account_id": a, "client_id": CLIENT, "holdings": {"USDC": "100000"}}
        for a in ("st-loss", "st-win")
    ]
    accounts.append({"account_id": HOUSE, "client_id": EXCHANGE, "holdings": {"USDC": "1000000"}})
    server = start_server(
        "custodian",
        parties.config(
            CUSTODIAN,
            "custodian",
            directory,
            peers={EXCHANGE: None},
            custodian={"accounts": accounts},
        ),
        name="netting-custodian",
    )
    exchange = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            directory,
            peers={CUSTODIAN: server.address},
            exchange={
                "log_origin": f"{CUSTODIAN}/collateral-sync/attestations",
                "prices": [{"asset_id": "USDC", "price": "1"}],
                # A loss the client owes, a profit the exchange owes.
                "profits": {"st-loss": "-1500", "st-win": "300"},
            },
        ),
        name="netting-exchange",
    )

    async def scenario() -> None:
        async with (
            clients(parties, server) as c,
            parties.channel(exchange.address, CUSTODIAN) as to_exchange,
        ):
            exchange_control = TestControlClient(to_exchange)
            now = await advance(c.control, timedelta(0))
            client = parties.keys[CLIENT]
            for account_id in ("st-loss", "st-win"):
                await c.custodian.pledge_collateral(
                    custodian_service_pb2.PledgeCollateralRequest(
                        pledge_instruction=sign(
                            custodian_service_pb2.PledgeInstruction(
                                account_id=account_id,
                                exchange_id=EXCHANGE,
                                asset_id="USDC",
                                quantity=amount_to_proto("50000"),
                            ),
                            client,
                            now=now,
                        ),
                        liquidation_path=sign(
                            liquidation_pb2.LiquidationPath(
                                account_id=account_id,
                                exchange_id=EXCHANGE,
                                proceeds_account_id=HOUSE,
                                steps=[
                                    liquidation_pb2.LiquidationStep(
                                        asset_id="USDC",
                                        venue="otc",
                                        max_quantity=amount_to_proto("50000"),
                                    )
                                ],
                            ),
                            client,
                            now=now,
                            statement_id=f"p-{account_id}",
                        ),
                    )
                )
            # The exchange dials the custodian; until it has, a cycle cannot be delivered.
            async with asyncio.timeout(30):
                while True:
                    try:
                        response = await exchange_control.run_settlement_cycle(
                            test_control_pb2.RunSettlementCycleRequest(cutoff_id="cut-1")
                        )
                        break
                    except RPCError as err:
                        if err.reason_name != "STATE_CONFLICT":
                            raise
                        await asyncio.sleep(0.05)
            instructions = {}
            for envelope in response.settlement_instructions:
                verified = verify_statement(
                    envelope,
                    parties.registry,
                    expected_type=reconciliation_pb2.SettlementInstruction,
                    audience=CUSTODIAN,
                    now=now,
                    max_skew=timedelta(hours=1),
                )
                assert verified.issuer == EXCHANGE
                instructions[verified.message.account_id] = verified.message
            assert {a: (m.net_amount.value, m.cycle_of_day) for a, m in instructions.items()} == {
                "st-loss": ("1500", 1),
                "st-win": ("-300", 1),
            }
            for message in instructions.values():
                found = await settlement(c, message.settlement_id)
                assert found.status == STATUS.SETTLEMENT_STATUS_PENDING
            # The same cut-off again: the same instructions, delivered again, netted once.
            again = await exchange_control.run_settlement_cycle(
                test_control_pb2.RunSettlementCycleRequest(cutoff_id="cut-1")
            )
            assert list(again.settlement_instructions) == list(response.settlement_instructions)
            await advance(c.control, WINDOW + timedelta(minutes=1))
            for message in instructions.values():
                found = await settlement(c, message.settlement_id)
                assert found.status == STATUS.SETTLEMENT_STATUS_EXECUTED
            assert await usdc(c, "st-loss") == ("98500", "48500")
            assert await usdc(c, "st-win") == ("100300", "50000")
            assert (await usdc(c, HOUSE))[0] == "1001200"
            # Nothing changed since: the next cycle has nothing to settle...
            second = await exchange_control.run_settlement_cycle(
                test_control_pb2.RunSettlementCycleRequest(cutoff_id="cut-2")
            )
            assert list(second.settlement_instructions) == []
            # ...and a third on the exchange's day is refused by the exchange itself.
            await expect_refusal(
                exchange_control.run_settlement_cycle(
                    test_control_pb2.RunSettlementCycleRequest(cutoff_id="cut-3")
                ),
                CODE.RESOURCE_EXHAUSTED,
                "LIMIT_EXCEEDED",
            )

    run(scenario())
