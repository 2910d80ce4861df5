"""Who may read what the reference exchange serves (PROTOCOL.md §4.5), over mutual TLS.

A reference custodian and a reference exchange run as real processes. The
client pledges one account to the exchange; its price then falls into a
margin call and past the liquidation line, leaving a liquidation with a
shortfall allocation. Each read of ExchangeService is then made as each
party: the account's parties (its client, the custodian that holds it) and
the regulator read it; another client and another exchange get the same
refusal as for data that does not exist, which names nobody; only the
regulator learns NOT_FOUND; a stranger (a certificate from the CA whose party
is not in the registry) reads the public risk policy and nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any, TypeVar

import grpc
import pytest
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, ExchangeClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    custodian_service_pb2,
    errors_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    margin_pb2,
    test_control_pb2,
    valuation_pb2,
)
from google.protobuf import duration_pb2

from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    OTHER_CLIENT,
    OTHER_EXCHANGE,
    REGULATOR,
    STRANGER,
    Parties,
    StartServer,
)

_T = TypeVar("_T")
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
ACCOUNT = "acct-1"
UNKNOWN = "no-such-id"
WAIT = 30.0
KEY_ROLE_MISMATCH = errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH

#: The account's parties as the exchange knows them, and the regulator: they may read.
READERS = (CLIENT, CUSTODIAN, REGULATOR)
#: Registered parties the account does not concern: refused.
OUTSIDERS = (OTHER_CLIENT, OTHER_EXCHANGE)

Call = Callable[[ExchangeClient], Awaitable[Any]]


@dataclass(frozen=True)
class Pledged:
    """The running exchange and the account's data on it."""

    address: str
    margin_call_id: str
    liquidation_id: str


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


async def until(check: Callable[[], Awaitable[_T | None]]) -> _T:
    """Poll across the two processes until ``check`` gives something (there is no event)."""
    async with asyncio.timeout(WAIT):
        while True:
            found = await check()
            if found is not None:
                return found
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def pledged(
    reference_parties: Parties,
    start_server: StartServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Pledged:
    """acct-1 of CLIENT pledged to EXCHANGE, with a margin call and a liquidation's shortfall."""
    parties = reference_parties
    directory = tmp_path_factory.mktemp("access")
    custodian = start_server(
        "custodian",
        parties.config(
            CUSTODIAN,
            "custodian",
            directory,
            peers={EXCHANGE: None},
            custodian={
                "accounts": [
                    {
                        "account_id": ACCOUNT,
                        "client_id": CLIENT,
                        "holdings": {"BTC": "10", "USDC": "200000"},
                    }
                ]
            },
        ),
        name="access-custodian",
    )
    exchange = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            directory,
            peers={CUSTODIAN: custodian.address},
            exchange={
                "log_origin": ORIGIN,
                "prices": [
                    {"asset_id": "BTC", "price": "60000"},
                    {"asset_id": "USDC", "price": "1"},
                ],
            },
        ),
        name="access-exchange",
    )
    return run(_pledge_call_and_liquidate(parties, custodian.address, exchange.address))


async def _pledge_call_and_liquidate(
    parties: Parties, custodian_address: str, exchange_address: str
) -> Pledged:
    client = parties.keys[CLIENT]
    sequences = itertools.count(1)
    async with (
        parties.channel(custodian_address, EXCHANGE) as to_custodian,
        parties.channel(exchange_address, CUSTODIAN) as to_exchange,
        parties.channel(exchange_address, REGULATOR) as as_regulator,
    ):
        now = (
            await TestControlClient(to_custodian).advance_clock(
                test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
            )
        ).now.ToDatetime(tzinfo=UTC)
        path = sign_statement(
            liquidation_pb2.LiquidationPath(
                account_id=ACCOUNT,
                exchange_id=EXCHANGE,
                proceeds_account_id=f"{EXCHANGE}-settlement",
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id=asset, venue="otc-desk", max_quantity=amount_to_proto(quantity)
                    )
                    for asset, quantity in (("BTC", "10"), ("USDC", "200000"))
                ],
            ),
            client,
            audience=[CUSTODIAN],
            sequence=next(sequences),
            ttl=timedelta(hours=1),
            issued_at=now,
            statement_id=f"path-{ACCOUNT}",
        )
        for asset, quantity in (("BTC", "10"), ("USDC", "200000")):
            instruction = sign_statement(
                custodian_service_pb2.PledgeInstruction(
                    account_id=ACCOUNT,
                    exchange_id=EXCHANGE,
                    asset_id=asset,
                    quantity=amount_to_proto(quantity),
                ),
                client,
                audience=[CUSTODIAN],
                sequence=next(sequences),
                ttl=timedelta(hours=1),
                issued_at=now,
            )
            await CustodianClient(to_custodian).pledge_collateral(
                custodian_service_pb2.PledgeCollateralRequest(
                    pledge_instruction=instruction, liquidation_path=path
                )
            )
        regulator = ExchangeClient(as_regulator)
        control = TestControlClient(to_exchange)

        async def credited() -> bool | None:
            # 10 BTC x 60000 x 0.8 + 200000 USDC x 0.95.
            with_credit = await _credit_line_or_none(regulator)
            return True if with_credit and with_credit.collateral_value.value == "670000" else None

        async def margin_call() -> str | None:
            listed = await regulator.list_margin_calls(
                exchange_service_pb2.ListMarginCallsRequest(account_id=ACCOUNT)
            )
            states = listed.margin_call_states
            if not states:
                return None
            return margin_pb2.MarginCallState.FromString(states[0].payload).margin_call_id

        async def allocated() -> str | None:
            listed = await regulator.list_liquidations(
                exchange_service_pb2.ListLiquidationsRequest(account_id=ACCOUNT)
            )
            for record in listed.liquidations:
                if record.HasField("shortfall_allocation"):
                    return liquidation_pb2.LiquidationInstruction.FromString(
                        record.liquidation_instruction.payload
                    ).liquidation_id
            return None

        await until(credited)
        await control.set_exposure(
            test_control_pb2.SetExposureRequest(
                account_id=ACCOUNT, exposure=amount_to_proto("1000000")
            )
        )
        await _set_btc(control, "30000")  # 240000 + 190000: ratio 0.43 < 0.5, a call
        margin_call_id = await until(margin_call)
        await _set_btc(control, "5000")  # 40000 + 190000: ratio 0.23 < 0.4, a close-out
        liquidation_id = await until(allocated)
    return Pledged(exchange_address, margin_call_id, liquidation_id)


async def _credit_line_or_none(exchange: ExchangeClient) -> valuation_pb2.CreditLine | None:
    try:
        response = await exchange.get_credit_line(
            exchange_service_pb2.GetCreditLineRequest(account_id=ACCOUNT)
        )
    except RPCError:
        return None
    return valuation_pb2.CreditLine.FromString(response.credit_line.payload)


async def _set_btc(control: TestControlClient, price: str) -> None:
    await control.set_price(
        test_control_pb2.SetPriceRequest(
            quote=valuation_pb2.PriceQuote(asset_id="BTC", price=amount_to_proto(price))
        )
    )


# --- calling as a party ---------------------------------------------------------------------


async def _as(parties: Parties, address: str, party: str, call: Call) -> Any:
    async with parties.channel(address, party) as channel:
        return await call(ExchangeClient(channel))


def answered(parties: Parties, address: str, party: str, call: Call) -> Any:
    """The response to ``call`` made as ``party``."""
    return run(_as(parties, address, party, call))


def refused(parties: Parties, address: str, party: str, call: Call) -> RPCError:
    """The error ``call`` made as ``party`` fails with."""
    with pytest.raises(RPCError) as caught:
        run(_as(parties, address, party, call))
    return caught.value


def shape(error: RPCError) -> tuple[Any, ...]:
    """Everything a caller sees of a refusal."""
    return (error.code, error.reason, error.message, dict(error.metadata))


def credit_line(account_id: str) -> Call:
    return lambda ex: ex.get_credit_line(
        exchange_service_pb2.GetCreditLineRequest(account_id=account_id)
    )


def margin_calls(account_id: str) -> Call:
    return lambda ex: ex.list_margin_calls(
        exchange_service_pb2.ListMarginCallsRequest(account_id=account_id)
    )


def liquidations(account_id: str) -> Call:
    return lambda ex: ex.list_liquidations(
        exchange_service_pb2.ListLiquidationsRequest(account_id=account_id)
    )


def margin_call(margin_call_id: str) -> Call:
    return lambda ex: ex.get_margin_call(
        exchange_service_pb2.GetMarginCallRequest(margin_call_id=margin_call_id)
    )


def shortfall_allocation(liquidation_id: str) -> Call:
    return lambda ex: ex.get_shortfall_allocation(
        exchange_service_pb2.GetShortfallAllocationRequest(liquidation_id=liquidation_id)
    )


#: (request field, the read of an id) for each restricted read of ExchangeService.
ACCOUNT_READS = {
    "GetCreditLine": credit_line,
    "ListMarginCalls": margin_calls,
    "ListLiquidations": liquidations,
}
READS: dict[str, tuple[str, Callable[[str], Call]]] = {
    **{name: ("account_id", read) for name, read in ACCOUNT_READS.items()},
    "GetMarginCall": ("margin_call_id", margin_call),
    "GetShortfallAllocation": ("liquidation_id", shortfall_allocation),
}


def known_id(pledged: Pledged, field: str) -> str:
    return {
        "account_id": ACCOUNT,
        "margin_call_id": pledged.margin_call_id,
        "liquidation_id": pledged.liquidation_id,
    }[field]


# --- the table ------------------------------------------------------------------------------


@pytest.mark.parametrize("party", READERS)
@pytest.mark.parametrize("rpc", READS)
def test_the_account_parties_and_the_regulator_read(
    reference_parties: Parties, pledged: Pledged, rpc: str, party: str
) -> None:
    field, read = READS[rpc]
    response = answered(reference_parties, pledged.address, party, read(known_id(pledged, field)))
    # Each read returns the data itself, not an empty answer.
    assert response.ListFields(), response


@pytest.mark.parametrize("party", OUTSIDERS)
@pytest.mark.parametrize("rpc", READS)
def test_others_get_the_same_refusal_for_theirs_and_for_nothing(
    reference_parties: Parties, pledged: Pledged, rpc: str, party: str
) -> None:
    field, read = READS[rpc]
    known = refused(reference_parties, pledged.address, party, read(known_id(pledged, field)))
    unknown = refused(reference_parties, pledged.address, party, read(UNKNOWN))
    assert known.code == grpc.StatusCode.PERMISSION_DENIED
    assert known.reason == KEY_ROLE_MISMATCH
    assert known.metadata["field"] == field
    assert known.metadata["actual"] == party
    # Whether it exists is not told, nor who it belongs to.
    assert shape(unknown) == shape(known)
    for named in (CLIENT, EXCHANGE, ACCOUNT):
        assert named not in known.message
        assert named not in known.metadata.values()


@pytest.mark.parametrize("rpc", READS)
def test_only_the_regulator_learns_what_does_not_exist(
    reference_parties: Parties, pledged: Pledged, rpc: str
) -> None:
    _, read = READS[rpc]
    error = refused(reference_parties, pledged.address, REGULATOR, read(UNKNOWN))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert refused(reference_parties, pledged.address, CLIENT, read(UNKNOWN)).code == (
        grpc.StatusCode.PERMISSION_DENIED
    )


@pytest.mark.parametrize("rpc", READS)
def test_a_missing_id_is_malformed_before_anyone_is_refused(
    reference_parties: Parties, pledged: Pledged, rpc: str
) -> None:
    field, read = READS[rpc]
    error = refused(reference_parties, pledged.address, OTHER_CLIENT, read(""))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["field"] == field


def test_a_stranger_reads_the_risk_policy_and_nothing_restricted(
    reference_parties: Parties, pledged: Pledged
) -> None:
    policy = answered(
        reference_parties,
        pledged.address,
        STRANGER,
        lambda ex: ex.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest()),
    )
    assert policy.risk_policy.payload
    error = refused(reference_parties, pledged.address, STRANGER, credit_line(ACCOUNT))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == KEY_ROLE_MISMATCH
    assert (error.metadata["field"], error.metadata["actual"]) == ("caller", STRANGER)
    assert CLIENT not in error.message
