"""Two RPCs racing for one account's free quantity: exactly one succeeds, on either engine.

A pledge and a redemption of 700 each, sent at the same moment over two
channels, against an account holding 1,000: both cannot fit, so one must be
refused (with a status that says why, never INTERNAL) and the account must end
with 700 either pledged or locked, never both. Run on SQLite by default and on
PostgreSQL in make test's second pass (COLLATERAL_SYNC_TEST_STORAGE).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, timedelta

import grpc
import pytest
from collateral_sync.amounts import amount_to_proto, parse_amount
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    test_control_pb2,
)
from google.protobuf import duration_pb2

from ..common.test_crash_recovery import pledge_request
from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, Parties, StartServer

ROUNDS = 12


def test_a_pledge_and_a_redemption_racing_for_the_same_quantity_cannot_both_succeed(
    reference_parties: Parties,
    start_server: StartServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    accounts = [f"acct-race-{i:02d}" for i in range(ROUNDS)]
    config = parties.config(
        CUSTODIAN,
        "custodian",
        tmp_path_factory.mktemp("race"),
        peers={EXCHANGE: None},
        custodian={
            "accounts": [
                {"account_id": a, "client_id": CLIENT, "holdings": {"BENJI": "1000"}}
                for a in accounts
            ]
        },
    )
    server = start_server("custodian", config, name="race-custodian")

    async def scenario() -> None:
        async with (
            parties.channel(server.address, CLIENT) as first,
            parties.channel(server.address, CLIENT) as second,
        ):
            now = (
                await TestControlClient(first).advance_clock(
                    test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
                )
            ).now.ToDatetime(tzinfo=UTC)
            outcomes: list[tuple[bool, bool]] = []
            for sequence, account in enumerate(accounts, start=1):
                pledge = CustodianClient(first).pledge_collateral(
                    pledge_request(parties, account, sequence=sequence, now=now, quantity="700")
                )
                redemption = CustodianClient(second).request_redemption(
                    custodian_service_pb2.RequestRedemptionRequest(
                        redemption_request=sign_statement(
                            custodian_service_pb2.RedemptionRequest(
                                redemption_id=f"redeem-{account}",
                                account_id=account,
                                asset_id="BENJI",
                                quantity=amount_to_proto("700"),
                            ),
                            parties.keys[CLIENT],
                            audience=[CUSTODIAN],
                            sequence=sequence,
                            ttl=timedelta(hours=1),
                            issued_at=now,
                        )
                    )
                )
                results = await asyncio.gather(pledge, redemption, return_exceptions=True)
                for result in results:
                    if isinstance(result, RPCError):
                        # Refused for the quantity, with its reason: not a crash, not a replay.
                        assert result.code == grpc.StatusCode.FAILED_PRECONDITION, result
                    elif isinstance(result, BaseException):
                        raise result
                outcomes.append(tuple(not isinstance(r, BaseException) for r in results))  # type: ignore[arg-type]

                statement = await CustodianClient(first).get_holdings_statement(
                    custodian_service_pb2.GetHoldingsStatementRequest(account_id=account)
                )
                holdings = attestation_pb2.HoldingsStatement.FromString(
                    statement.holdings_statement.payload
                )
                (position,) = [p for p in holdings.positions if p.asset_id == "BENJI"]
                pledged = parse_amount(position.pledged_quantity.value or "0")
                locked = parse_amount(position.locked_quantity.value or "0")
                assert parse_amount(position.quantity.value) == 1000
                assert pledged + locked == 700, (account, pledged, locked)
            # Exactly one of each pair, every time.
            assert all(sum(pair) == 1 for pair in outcomes), outcomes

    asyncio.run(scenario())
