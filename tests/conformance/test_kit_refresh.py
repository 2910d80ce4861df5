"""The refresh case against a reference custodian whose kit account earns no yield (§5.8).

With a fund token in the kit's account, the daily yield accrual attests the account anew
every day, and ``attestation/holdings-refreshed-before-expiry`` sees those statements (the full
runs of test_kit_reference.py). Without one only a refresh renews the account's statement:
the reference custodian must then pass the case with a REFRESH statement.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from collateral_sync.clients import CustodianClient
from collateral_sync.v1 import attestation_pb2, custodian_service_pb2
from collateral_sync_conformance import main

from .conftest import (
    CLIENT,
    KIT_ACCOUNT,
    Parties,
    StartServer,
    kit_argv,
    quiet_custodian_config,
)

_CASE = "attestation/holdings-refreshed-before-expiry"


def test_the_reference_custodian_refreshes_an_account_nothing_else_changes(
    start_server: StartServer,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(
        "custodian", quiet_custodian_config(reference_parties, tmp_path), name="custodian-quiet"
    )
    reports = tmp_path / "reports"
    argv = kit_argv(
        kit_files,
        server.address,
        "--account",
        KIT_ACCOUNT,
        "--run",
        _CASE,
        "--report-dir",
        str(reports),
    )
    code = main(argv)
    out = capsys.readouterr().out
    cases = json.loads((reports / "results.json").read_text("utf-8"))["cases"]
    assert {c["id"]: c["verdict"] for c in cases} == {_CASE: "passed"}, out
    assert code == 0, out

    async def latest() -> attestation_pb2.HoldingsStatement:
        async with reference_parties.channel(server.address, CLIENT) as channel:
            response = await CustodianClient(channel).get_holdings_statement(
                custodian_service_pb2.GetHoldingsStatementRequest(account_id=KIT_ACCOUNT)
            )
        return attestation_pb2.HoldingsStatement.FromString(response.holdings_statement.payload)

    # It passed by a refresh, not by another change of the account.
    statement = asyncio.run(latest())
    assert statement.reason == attestation_pb2.HOLDINGS_CHANGE_REASON_REFRESH
    assert {p.asset_id for p in statement.positions} == {"USDC", "BTC"}
