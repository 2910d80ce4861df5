"""A custodian that goes down under a running exchange (PROTOCOL.md §11.2), with real processes.

The reference custodian is killed (-9) while the exchange credits its accounts.
Once the exchange's ``custodian_staleness_window`` has passed, a price rise
raises no credit limit and an exposure far below the liquidation line is not
liquidated; the custodian comes back on the same data and port, and the
exchange, having heard it, instructs the liquidation. The exchange's
``collateral_sync_custodian_silent`` gauge says 1 exactly while it waits.
Meanwhile exchange and regulator sign an emergency release of another
account's pledge; the custodian back executes it at once (no waiting period
with the exchange among the signers, §11 step 3) and the exchange credits
nothing of that account after. (That the limit then
rises is checked by the kit's ``exchange/custodian-silent/credit-not-raised``
against this exchange.)
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

from collateral_sync.amounts import amount_to_proto, parse_amount
from collateral_sync.clients import (
    CustodianClient,
    EmergencyReleaseClient,
    ExchangeClient,
    TestControlClient,
)
from collateral_sync.v1 import (
    common_pb2,
    exchange_service_pb2,
    test_control_pb2,
    valuation_pb2,
)
from google.protobuf import duration_pb2

from .._scrape import metrics_address, scrape, value
from ..common.test_emergency_release import cosign, execute, release, signer_parties
from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, REGULATOR, Parties
from ..regulator.test_regulator import ACCOUNTS, free_port, pledge_all, run, until_synced

ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
WINDOW_SECONDS = 3
WAIT = 30.0
ACCOUNT = "acct-q"


async def _limit(exchange: ExchangeClient, account: str = ACCOUNT) -> Decimal:
    response = await exchange.get_credit_line(
        exchange_service_pb2.GetCreditLineRequest(account_id=account)
    )
    line = valuation_pb2.CreditLine.FromString(response.credit_line.payload)
    return parse_amount(line.credit_limit.value)


async def _liquidations(exchange: ExchangeClient) -> int:
    response = await exchange.list_liquidations(
        exchange_service_pb2.ListLiquidationsRequest(account_id=ACCOUNT)
    )
    return len(response.liquidations)


def test_a_silent_custodian_raises_no_credit_and_liquidates_nothing_until_heard(
    reference_parties: Parties, start_server: Any, tmp_path: Path
) -> None:
    parties = reference_parties
    custodian_address = f"127.0.0.1:{free_port()}"
    beat = {"heartbeat_interval_ms": 500}
    custodian = start_server(
        "custodian",
        parties.config(
            CUSTODIAN,
            "custodian",
            tmp_path,
            peers={EXCHANGE: None, REGULATOR: None},
            sync=beat,
            custodian={
                "accounts": [
                    {"account_id": account, "client_id": CLIENT, "holdings": holdings}
                    for account, (holdings, _) in ACCOUNTS.items()
                ]
            },
        ),
        name="silent-custodian",
        extra_args=("--listen", custodian_address),
    )
    exchange_process = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            tmp_path,
            peers={CUSTODIAN: custodian.address, REGULATOR: None},
            sync=beat,
            exchange={
                "custodian": CUSTODIAN,
                "log_origin": ORIGIN,
                "prices": [
                    {"asset_id": "BTC", "price": "60000"},
                    {"asset_id": "USDC", "price": "1"},
                ],
                "risk_policy": {"custodian_staleness_window_seconds": WINDOW_SECONDS},
            },
            metrics={"listen": "127.0.0.1:0"},
        ),
        name="silent-custodian-exchange",
    )
    metrics = metrics_address(exchange_process)

    def silent() -> float:
        return value(scrape(metrics), "collateral_sync_custodian_silent", custodian=CUSTODIAN)

    async def scenario() -> None:
        async with (
            parties.channel(custodian.address, REGULATOR) as to_custodian,
            parties.channel(exchange_process.address, REGULATOR) as to_exchange,
        ):
            custodian_control = TestControlClient(to_custodian)
            control = TestControlClient(to_exchange)
            exchange = ExchangeClient(to_exchange)
            zero = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
            now = (await custodian_control.advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
            await pledge_all(parties, to_custodian, now)
            await until_synced(custodian_control, control, exchange)
            before = await _limit(exchange)
            assert before > 0
            assert silent() == 0

            custodian.kill()
            await asyncio.sleep(WINDOW_SECONDS + 1.5)
            quote = valuation_pb2.PriceQuote(
                asset_id="BTC", price=common_pb2.Decimal(value="90000"), source="scripted"
            )
            quote.observed_at.GetCurrentTime()
            await control.set_price(test_control_pb2.SetPriceRequest(quote=quote))
            # Ten times the credit limit: a ratio of 0.05 or less, far below the line (0.4).
            await control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id=ACCOUNT, exposure=amount_to_proto(str(before * 10))
                )
            )
            await control.run_valuation(test_control_pb2.RunValuationRequest(account_id=ACCOUNT))
            await asyncio.sleep(1.0)
            assert await _limit(exchange) <= before
            assert await _liquidations(exchange) == 0
            assert silent() == 1
            # Exchange and regulator release another account's pledge meanwhile: the
            # exchange co-signs (exposure 0) though its custodian is down (§11.2).
            released = "acct-l"
            now = (await control.advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
            proposal = release(parties, REGULATOR, released, "release-while-down", now=now)
            signed = await cosign(EmergencyReleaseClient(to_exchange), proposal)
            assert signer_parties(parties, signed) == [REGULATOR, EXCHANGE]

            # Back on the same data and port: the exchange re-dials, hears it, and acts.
            custodian.start()
            async with asyncio.timeout(WAIT):
                while await _liquidations(exchange) == 0:
                    await control.run_valuation(
                        test_control_pb2.RunValuationRequest(account_id=ACCOUNT)
                    )
                    await asyncio.sleep(0.2)
            assert silent() == 0
            # The release signed while it was down executes at once: no wait with the
            # exchange among the signers; the exchange then credits nothing of the account.
            receipt = await execute(CustodianClient(to_custodian), signed)
            assert receipt.payload
            async with asyncio.timeout(WAIT):
                while await _limit(exchange, released) > 0:
                    await asyncio.sleep(0.1)

    run(scenario())
