"""Reconciliation with real processes: custodian, exchange and regulator over mutual TLS.

Each scenario pledges accounts to the exchange, waits until both sides hold
the same sync logs, moves the three clocks past the next cut-off (12:00 or
00:00 UTC) and reads the regulator's signed result. Breaks are produced with
the exchange's test-mode ``reconciliation.test_perturbations``, one position
field (or a whole account) per account, and must be located to that account,
asset and field.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from _postgres import open_database
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import (
    CustodianClient,
    ExchangeClient,
    ReconciliationClient,
    RegulatorClient,
    TestControlClient,
)
from collateral_sync.errors import RPCError
from collateral_sync.keys import SigningKey
from collateral_sync.merkle import empty_root
from collateral_sync.reconciliation import PositionTree, build_reconciliation_statement
from collateral_sync.server import create_server
from collateral_sync.server import start_server as start_grpc_server
from collateral_sync.server import stop_server as stop_grpc_server
from collateral_sync.signing import pae, sign_statement, verify_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN, LogHead
from collateral_sync.v1 import (
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    margin_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
    reconciliation_service_pb2_grpc,
    regulator_service_pb2,
    test_control_pb2,
)
from google.protobuf import duration_pb2

from .._scrape import metrics_address, scrape, value
from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    OTHER_EXCHANGE,
    REGULATOR,
    Parties,
    ServerProcess,
)

_T = TypeVar("_T")
_R = errors_pb2.ErrorReason
_F = reconciliation_pb2
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
WAIT = 20.0
STATEMENT_TYPE = "application/vnd.collateral-sync.v1.reconciliation-statement+proto"
#: account -> (holdings, pledged BTC)
ACCOUNTS = {
    "acct-l": ({"BTC": "4", "USDC": "1000"}, "2"),
    "acct-m": ({"BTC": "3", "USDC": "500"}, "1"),
    "acct-p": ({"BTC": "5"}, "5"),
    "acct-q": ({"BTC": "10", "USDC": "250000"}, "6"),
}
# From the second cut-off on: the first one is matched.
PERTURBATIONS: list[dict[str, Any]] = [
    {"account_id": "acct-q", "asset_id": "BTC", "field": "quantity", "delta": "1"},
    {"account_id": "acct-q", "asset_id": "USDC", "field": "missing"},
    {"account_id": "acct-l", "asset_id": "BTC", "field": "locked_quantity", "delta": "1"},
    {"account_id": "acct-p", "asset_id": "BTC", "field": "pledged_quantity", "delta": "0.5"},
    {"account_id": "acct-m", "field": "missing"},
]
PERTURBATIONS = [{**p, "after_cutoffs": 1} for p in PERTURBATIONS]


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def free_port() -> int:
    # The regulator's address must be in the parties' configs before it starts.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Trio:
    custodian: ServerProcess
    exchange: ServerProcess
    regulator: ServerProcess
    #: The regulator's storage config section (either engine).
    regulator_db: dict[str, Any]


def start_trio(
    parties: Parties,
    start_server: Any,
    directory: Path,
    name: str,
    *,
    perturbations: list[dict[str, Any]] | None = None,
) -> Trio:
    regulator_address = f"127.0.0.1:{free_port()}"
    custodian = start_server(
        "custodian",
        parties.config(
            CUSTODIAN,
            "custodian",
            directory,
            peers={EXCHANGE: None, REGULATOR: regulator_address},
            custodian={
                "accounts": [
                    {"account_id": account, "client_id": CLIENT, "holdings": holdings}
                    for account, (holdings, _) in ACCOUNTS.items()
                ]
            },
        ),
        name=f"{name}-custodian",
    )
    exchange_section: dict[str, Any] = {
        "custodian": CUSTODIAN,
        "log_origin": ORIGIN,
        "prices": [
            {"asset_id": "BTC", "price": "60000"},
            {"asset_id": "USDC", "price": "1"},
        ],
    }
    if perturbations:
        exchange_section["reconciliation"] = {"test_perturbations": perturbations}
    exchange = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            directory,
            peers={CUSTODIAN: custodian.address, REGULATOR: regulator_address},
            exchange=exchange_section,
        ),
        name=f"{name}-exchange",
    )
    regulator = start_server(
        "regulator",
        parties.config(
            REGULATOR,
            "regulator",
            directory,
            peers={CUSTODIAN: custodian.address, EXCHANGE: exchange.address},
            metrics={"listen": "127.0.0.1:0"},
        ),
        name=f"{name}-regulator",
        extra_args=("--listen", regulator_address),
    )
    return Trio(custodian, exchange, regulator, parties.storage(directory, REGULATOR))


async def refused(call: Coroutine[Any, Any, Any]) -> RPCError:
    with pytest.raises(RPCError) as caught:
        await call
    return caught.value


async def pledge_all(parties: Parties, to_custodian: Any, now: datetime) -> None:
    client = parties.keys[CLIENT]
    custodian = CustodianClient(to_custodian)
    sequences = itertools.count(1)
    for account, (_, btc) in ACCOUNTS.items():
        path = sign_statement(
            liquidation_pb2.LiquidationPath(
                account_id=account,
                exchange_id=EXCHANGE,
                proceeds_account_id="exchange-1-settlement",
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id="BTC", venue="otc-desk", max_quantity=amount_to_proto(btc)
                    )
                ],
            ),
            client,
            audience=[CUSTODIAN],
            sequence=next(sequences),
            ttl=timedelta(hours=1),
            issued_at=now,
            statement_id=f"path-{account}",
        )
        instruction = sign_statement(
            custodian_service_pb2.PledgeInstruction(
                account_id=account,
                exchange_id=EXCHANGE,
                asset_id="BTC",
                quantity=amount_to_proto(btc),
            ),
            client,
            audience=[CUSTODIAN],
            sequence=next(sequences),
            ttl=timedelta(hours=1),
            issued_at=now,
        )
        await custodian.pledge_collateral(
            custodian_service_pb2.PledgeCollateralRequest(
                pledge_instruction=instruction, liquidation_path=path
            )
        )


async def until_synced(
    custodian_control: TestControlClient, exchange_control: TestControlClient, exchange: Any
) -> None:
    """Every account credited, and both sides hold the same heads in both directions."""
    async with asyncio.timeout(WAIT):
        while True:
            credited = 0
            for account in ACCOUNTS:
                try:
                    await exchange.get_credit_line(
                        exchange_service_pb2.GetCreditLineRequest(account_id=account)
                    )
                    credited += 1
                except RPCError:
                    pass
            ours = await custodian_control.get_sync_state(test_control_pb2.GetSyncStateRequest())
            theirs = await exchange_control.get_sync_state(test_control_pb2.GetSyncStateRequest())
            heads = [
                sorted((d.direction, d.sequence, d.entry_hash) for d in s.directions)
                for s in (ours, theirs)
            ]
            if credited == len(ACCOUNTS) and heads[0] == heads[1]:
                return
            await asyncio.sleep(0.1)


def next_cutoff(now: datetime) -> datetime:
    day = datetime.combine(now.date(), time(0), tzinfo=UTC)
    for moment in (day + timedelta(hours=12), day + timedelta(days=1)):
        if moment > now:
            return moment
    raise AssertionError("unreachable")


async def pass_cutoff(controls: list[TestControlClient]) -> str:
    """Move every clock just past the next cut-off (the regulator's first); return its id."""
    zero = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
    now = (await controls[0].advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
    cutoff = next_cutoff(now)
    by = duration_pb2.Duration()
    by.FromTimedelta(cutoff - now + timedelta(seconds=1))
    for control in controls:
        await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))
    return cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")


async def await_result(regulator: RegulatorClient, cutoff_id: str) -> envelope_pb2.Envelope:
    async with asyncio.timeout(WAIT):
        while True:
            try:
                response = await regulator.get_reconciliation_result(
                    regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=cutoff_id)
                )
            except RPCError as err:
                # Only "not both statements yet" is worth waiting for.
                if err.reason != _R.ERROR_REASON_NOT_FOUND:
                    raise
                await asyncio.sleep(0.1)
            else:
                return response.reconciliation_result


def verified_result(parties: Parties, envelope: envelope_pb2.Envelope) -> Any:
    verified = verify_statement(
        envelope,
        parties.registry,
        expected_type=reconciliation_pb2.ReconciliationResult,
        audience=CUSTODIAN,
        now=datetime.now(UTC) + timedelta(days=2),
    )
    assert verified.issuer == REGULATOR
    assert list(verified.header.audience) == ["*"]
    return verified.message


def regulator_rows(storage: dict[str, Any]) -> tuple[list[Any], list[Any], list[Any]]:
    with open_database(storage) as db:
        return (
            db.execute(
                "SELECT cutoff_id, party_role, envelope FROM regulator_statements ORDER BY 1, 2"
            ).fetchall(),
            db.execute("SELECT cutoff_id, envelope FROM regulator_results").fetchall(),
            db.execute("SELECT * FROM replay_guard ORDER BY 1, 2").fetchall(),
        )


def resign(
    statement: reconciliation_pb2.ReconciliationStatement,
    key: SigningKey,
    *,
    sequence: int,
    audience: tuple[str, ...] = (REGULATOR,),
) -> envelope_pb2.Envelope:
    copy = reconciliation_pb2.ReconciliationStatement()
    copy.CopyFrom(statement)
    return sign_statement(
        copy,
        key,
        audience=list(audience),
        sequence=sequence,
        ttl=timedelta(days=1),
        issued_at=statement.header.issued_at.ToDatetime(tzinfo=UTC),
    )


def test_matched_cutoff_then_bad_submissions_are_refused_without_state_change(
    reference_parties: Parties, start_server: Any, tmp_path: Path
) -> None:
    parties = reference_parties
    trio = start_trio(parties, start_server, tmp_path, "matched")
    kept: dict[str, Any] = {}

    async def scenario() -> None:
        async with (
            parties.channel(trio.custodian.address, REGULATOR) as to_custodian,
            parties.channel(trio.exchange.address, REGULATOR) as to_exchange,
            parties.channel(trio.regulator.address, CUSTODIAN) as to_regulator,
        ):
            custodian_control = TestControlClient(to_custodian)
            exchange_control = TestControlClient(to_exchange)
            regulator_control = TestControlClient(to_regulator)
            regulator = RegulatorClient(to_regulator)
            custodian_recon = ReconciliationClient(to_custodian)
            exchange_recon = ReconciliationClient(to_exchange)
            zero = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
            now = (await custodian_control.advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
            await pledge_all(parties, to_custodian, now)
            await until_synced(custodian_control, exchange_control, ExchangeClient(to_exchange))

            # Before the cut-off: a party cannot state it; the regulator has nothing.
            upcoming = next_cutoff(now).strftime("%Y-%m-%dT%H:%M:%SZ")
            early = await refused(
                custodian_recon.get_reconciliation_statement(
                    reconciliation_service_pb2.GetReconciliationStatementRequest(cutoff_id=upcoming)
                )
            )
            assert early.code == grpc.StatusCode.FAILED_PRECONDITION
            assert early.reason == _R.ERROR_REASON_STATE_CONFLICT
            for bad_id in ("2026-11-23T12:00:00", "2026-11-23T07:00:00Z", "tomorrow"):
                malformed = await refused(
                    exchange_recon.get_reconciliation_statement(
                        reconciliation_service_pb2.GetReconciliationStatementRequest(
                            cutoff_id=bad_id
                        )
                    )
                )
                assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT, bad_id
            missing = await refused(
                regulator.get_reconciliation_result(
                    regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=upcoming)
                )
            )
            assert missing.code == grpc.StatusCode.NOT_FOUND

            cutoff_id = await pass_cutoff([regulator_control, custodian_control, exchange_control])
            assert cutoff_id == upcoming
            envelope = await await_result(regulator, cutoff_id)
            result = verified_result(parties, envelope)
            kept.update(cutoff_id=cutoff_id, result=envelope, statement=result.custodian_statement)
            assert result.cutoff_id == cutoff_id
            assert result.outcome == _F.RECONCILIATION_OUTCOME_MATCHED
            assert list(result.breaks) == []

            # The statements in the result are the parties' own, served identically again.
            statements = {}
            for name, recon, embedded in (
                (CUSTODIAN, custodian_recon, result.custodian_statement),
                (EXCHANGE, exchange_recon, result.exchange_statement),
            ):
                request = reconciliation_service_pb2.GetReconciliationStatementRequest(
                    cutoff_id=cutoff_id
                )
                first = (await recon.get_reconciliation_statement(request)).reconciliation_statement
                again = (await recon.get_reconciliation_statement(request)).reconciliation_statement
                assert first == again == embedded
                statement = verify_statement(
                    first,
                    parties.registry,
                    expected_type=reconciliation_pb2.ReconciliationStatement,
                    audience=REGULATOR,
                    now=datetime.now(UTC) + timedelta(days=1),
                )
                assert statement.issuer == name
                statements[name] = statement.message
            custodian_statement = statements[CUSTODIAN]
            assert custodian_statement.account_count == len(ACCOUNTS)
            assert custodian_statement.positions_root != empty_root()
            assert custodian_statement.positions_root == statements[EXCHANGE].positions_root
            assert {t.asset_id: t.pledged_quantity.value for t in custodian_statement.totals} == {
                "BTC": "14",
                "USDC": "0",
            }

            # The snapshot is frozen: a later deposit changes neither root nor leaves.
            await custodian_control.deposit(
                test_control_pb2.DepositRequest(
                    account_id="acct-q", asset_id="BTC", quantity=amount_to_proto("7")
                )
            )
            nodes = await custodian_recon.get_position_tree_nodes(
                reconciliation_service_pb2.GetPositionTreeNodesRequest(
                    cutoff_id=cutoff_id,
                    ranges=[reconciliation_service_pb2.LeafRange(start=0, end=len(ACCOUNTS))],
                    account_leaf_indexes=list(range(len(ACCOUNTS))),
                )
            )
            assert nodes.nodes[0].hash == custodian_statement.positions_root
            rebuilt = PositionTree.build({a.account_id: a.positions for a in nodes.accounts})
            assert rebuilt.root == custodian_statement.positions_root
            quantities = {
                a.account_id: {p.asset_id: p.quantity.value for p in a.positions}
                for a in nodes.accounts
            }
            assert quantities["acct-q"]["BTC"] == "10"
            out_of_range = await refused(
                custodian_recon.get_position_tree_nodes(
                    reconciliation_service_pb2.GetPositionTreeNodesRequest(
                        cutoff_id=cutoff_id,
                        ranges=[reconciliation_service_pb2.LeafRange(start=0, end=99)],
                    )
                )
            )
            assert out_of_range.code == grpc.StatusCode.OUT_OF_RANGE
            unknown = await refused(
                exchange_recon.get_position_tree_nodes(
                    reconciliation_service_pb2.GetPositionTreeNodesRequest(
                        cutoff_id="2020-01-01T00:00:00Z",
                        ranges=[reconciliation_service_pb2.LeafRange(start=0, end=1)],
                    )
                )
            )
            assert unknown.code == grpc.StatusCode.NOT_FOUND

            # Positions are for the regulator and the counterparty only.
            async with parties.channel(trio.custodian.address, OTHER_EXCHANGE) as stranger:
                outsider = ReconciliationClient(stranger)
                for call in (
                    outsider.get_reconciliation_statement(
                        reconciliation_service_pb2.GetReconciliationStatementRequest(
                            cutoff_id=cutoff_id
                        )
                    ),
                    outsider.get_position_tree_nodes(
                        reconciliation_service_pb2.GetPositionTreeNodesRequest(
                            cutoff_id=cutoff_id,
                            ranges=[reconciliation_service_pb2.LeafRange(start=0, end=1)],
                        )
                    ),
                ):
                    denied = await refused(call)
                    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
                    assert denied.reason == _R.ERROR_REASON_KEY_ROLE_MISMATCH
            async with parties.channel(trio.exchange.address, CUSTODIAN) as counterparty:
                statement_of_exchange = await ReconciliationClient(
                    counterparty
                ).get_reconciliation_statement(
                    reconciliation_service_pb2.GetReconciliationStatementRequest(
                        cutoff_id=cutoff_id
                    )
                )
                assert statement_of_exchange.reconciliation_statement == result.exchange_statement

            # Bad submissions: each refused with its status, nothing stored.
            before = regulator_rows(trio.regulator_db)
            assert len(before[0]) == 2
            assert len(before[1]) == 1
            original = result.custodian_statement
            forged = envelope_pb2.Envelope()
            forged.CopyFrom(original)
            forged.signatures[0].sig = bytes([forged.signatures[0].sig[0] ^ 1]) + bytes(
                forged.signatures[0].sig[1:]
            )
            changed = reconciliation_pb2.ReconciliationStatement()
            changed.CopyFrom(custodian_statement)
            changed.account_count += 1
            # A client key signing a reconciliation statement (sign_statement refuses to).
            client_key = parties.keys[CLIENT]
            client_payload = changed.SerializeToString()
            wrong_role_key = envelope_pb2.Envelope(
                payload=client_payload,
                payload_type=STATEMENT_TYPE,
                signatures=[
                    envelope_pb2.Signature(
                        key_id=client_key.key_id,
                        sig=client_key.sign(pae(STATEMENT_TYPE, client_payload)),
                    )
                ],
            )
            exchange_key = parties.keys[EXCHANGE]
            as_custodian = reconciliation_pb2.ReconciliationStatement()
            as_custodian.CopyFrom(statements[EXCHANGE])
            as_custodian.party_role = common_pb2.PARTY_ROLE_CUSTODIAN
            wrong_id = reconciliation_pb2.ReconciliationStatement()
            wrong_id.CopyFrom(changed)
            wrong_id.cutoff_id = "2020-01-01T00:00:00Z"
            too_early = reconciliation_pb2.ReconciliationStatement()
            too_early.CopyFrom(changed)
            too_early.cutoff_time.FromDatetime(
                custodian_statement.header.issued_at.ToDatetime(tzinfo=UTC).replace(microsecond=0)
                + timedelta(hours=12)
            )
            too_early.cutoff_id = too_early.cutoff_time.ToDatetime(tzinfo=UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            other_exchange = reconciliation_pb2.ReconciliationStatement()
            other_exchange.CopyFrom(statements[EXCHANGE])
            cases = [
                (
                    "forged",
                    forged,
                    grpc.StatusCode.UNAUTHENTICATED,
                    _R.ERROR_REASON_SIGNATURE_INVALID,
                ),
                (
                    "client key",
                    wrong_role_key,
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    "party_role not the key's role",
                    resign(as_custodian, exchange_key, sequence=900),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    "an exchange this regulator does not reconcile",
                    resign(other_exchange, parties.keys[OTHER_EXCHANGE], sequence=900),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    "wrong audience",
                    resign(changed, parties.keys[CUSTODIAN], sequence=901, audience=(EXCHANGE,)),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_AUDIENCE_MISMATCH,
                ),
                (
                    "cut-off id not its time",
                    resign(wrong_id, parties.keys[CUSTODIAN], sequence=903),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
                (
                    "stated before the cut-off",
                    resign(too_early, parties.keys[CUSTODIAN], sequence=904),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
                ("replay", original, grpc.StatusCode.ALREADY_EXISTS, _R.ERROR_REASON_REPLAYED),
                (
                    "second statement for the cut-off",
                    resign(changed, parties.keys[CUSTODIAN], sequence=902),
                    grpc.StatusCode.ABORTED,
                    _R.ERROR_REASON_EQUIVOCATION,
                ),
            ]
            for label, submitted, code, reason in cases:
                error = await refused(
                    regulator.submit_reconciliation_statement(
                        regulator_service_pb2.SubmitReconciliationStatementRequest(
                            reconciliation_statement=submitted
                        )
                    )
                )
                assert (error.code, error.reason) == (code, reason), (label, error)
                assert regulator_rows(trio.regulator_db) == before, label
            again = await regulator.get_reconciliation_result(
                regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=cutoff_id)
            )
            assert again.reconciliation_result == envelope

    run(scenario())

    # Restarted, every party keeps what it stated: the result, the statement and
    # the frozen tree (rebuilt from the stored snapshot, not from today's holdings).
    trio.regulator.restart()
    trio.custodian.restart()

    async def after_restart() -> None:
        async with (
            parties.channel(trio.custodian.address, REGULATOR) as to_custodian,
            parties.channel(trio.regulator.address, EXCHANGE) as to_regulator,
        ):
            results = await RegulatorClient(to_regulator).get_reconciliation_result(
                regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=kept["cutoff_id"])
            )
            assert results.reconciliation_result == kept["result"]
            recon = ReconciliationClient(to_custodian)
            statement = await recon.get_reconciliation_statement(
                reconciliation_service_pb2.GetReconciliationStatementRequest(
                    cutoff_id=kept["cutoff_id"]
                )
            )
            assert statement.reconciliation_statement == kept["statement"]
            nodes = await recon.get_position_tree_nodes(
                reconciliation_service_pb2.GetPositionTreeNodesRequest(
                    cutoff_id=kept["cutoff_id"],
                    ranges=[reconciliation_service_pb2.LeafRange(start=0, end=len(ACCOUNTS))],
                )
            )
            stated = reconciliation_pb2.ReconciliationStatement.FromString(
                kept["statement"].payload
            )
            assert nodes.nodes[0].hash == stated.positions_root

    run(after_restart())


def test_breaks_are_located_to_account_asset_and_field(
    reference_parties: Parties, start_server: Any, tmp_path: Path
) -> None:
    parties = reference_parties
    trio = start_trio(parties, start_server, tmp_path, "breaks", perturbations=PERTURBATIONS)

    async def scenario() -> None:
        async with (
            parties.channel(trio.custodian.address, REGULATOR) as to_custodian,
            parties.channel(trio.exchange.address, REGULATOR) as to_exchange,
            parties.channel(trio.regulator.address, EXCHANGE) as to_regulator,
        ):
            custodian_control = TestControlClient(to_custodian)
            exchange_control = TestControlClient(to_exchange)
            regulator_control = TestControlClient(to_regulator)
            regulator = RegulatorClient(to_regulator)
            zero = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
            now = (await custodian_control.advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
            await pledge_all(parties, to_custodian, now)
            exchange = ExchangeClient(to_exchange)
            controls = [regulator_control, custodian_control, exchange_control]
            await until_synced(custodian_control, exchange_control, exchange)
            first = await pass_cutoff(controls)
            matched = verified_result(parties, await await_result(regulator, first))
            assert matched.outcome == _F.RECONCILIATION_OUTCOME_MATCHED
            # What the exchange sent when its clock moved is in both views of the next one.
            await until_synced(custodian_control, exchange_control, exchange)
            cutoff_id = await pass_cutoff(controls)
            assert cutoff_id != first
            result = verified_result(parties, await await_result(regulator, cutoff_id))
            assert result.outcome == _F.RECONCILIATION_OUTCOME_BREAKS
            # Each verdict counted as the regulator signed it.
            samples = await asyncio.to_thread(scrape, metrics_address(trio.regulator))
            verdicts = "collateral_sync_reconciliation_results_total"
            assert value(samples, verdicts, verdict="MATCHED") == 1
            assert value(samples, verdicts, verdict="BREAKS") == 1
            found = [
                (
                    b.account_id,
                    b.asset_id,
                    b.field,
                    b.custodian_value.value if b.HasField("custodian_value") else None,
                    b.exchange_value.value if b.HasField("exchange_value") else None,
                )
                for b in result.breaks
            ]
            assert found == [
                ("acct-l", "BTC", _F.BREAK_FIELD_LOCKED_QUANTITY, "0", "1"),
                ("acct-m", "BTC", _F.BREAK_FIELD_MISSING, "3", None),
                ("acct-m", "USDC", _F.BREAK_FIELD_MISSING, "500", None),
                ("acct-p", "BTC", _F.BREAK_FIELD_PLEDGED_QUANTITY, "5", "5.5"),
                ("acct-q", "BTC", _F.BREAK_FIELD_QUANTITY, "10", "11"),
                ("acct-q", "USDC", _F.BREAK_FIELD_MISSING, "250000", None),
            ]
            exchange_statement = reconciliation_pb2.ReconciliationStatement.FromString(
                result.exchange_statement.payload
            )
            assert exchange_statement.account_count == len(ACCOUNTS) - 1

    run(scenario())


def test_perturbations_need_test_mode(
    reference_parties: Parties, start_server: Any, tmp_path: Path
) -> None:
    parties = reference_parties
    config = parties.config(
        EXCHANGE,
        "exchange",
        tmp_path,
        peers={CUSTODIAN: "127.0.0.1:1", REGULATOR: "127.0.0.1:2"},
        exchange={
            "custodian": CUSTODIAN,
            "log_origin": ORIGIN,
            "reconciliation": {"test_perturbations": PERTURBATIONS[:1]},
        },
    )
    with pytest.raises(RuntimeError, match="only allowed in test mode"):
        start_server("exchange", config, name="production-exchange", test_mode=False)


def test_the_conformance_kit_transport_cases_pass_against_the_regulator(
    reference_parties: Parties, start_server: Any, tmp_path: Path
) -> None:
    parties = reference_parties
    regulator = start_server(
        "regulator",
        parties.config(
            REGULATOR,
            "regulator",
            tmp_path,
            peers={CUSTODIAN: "127.0.0.1:1", EXCHANGE: "127.0.0.1:2"},
        ),
        name="kit-regulator",
    )
    files = parties.pki.party(CUSTODIAN)
    root = Path(__file__).resolve().parents[3]
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [
            str(root / "conformance"),
            str(root / "reference_server"),
            environment.get("PYTHONPATH", ""),
        ]
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "collateral_sync._cli",
            "conformance",
            "run",
            "--role",
            "regulator",
            "--target",
            regulator.address,
            "--ca",
            str(parties.pki.ca_cert),
            "--cert",
            str(files.cert),
            "--key",
            str(files.key),
            "--registry",
            str(parties.registry_path),
            "--kit-key",
            str(parties.key_path(CUSTODIAN)),
            "--report-dir",
            str(tmp_path / "reports"),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert "RESULT: PASS (every MUST case passed)" in lines, completed.stdout
    assert not any(line.startswith("FAIL") for line in lines), completed.stdout
    assert any(
        line.startswith("PASS  MUST   transport/deadline-exceeded-honoured") for line in lines
    )


class _FakeParty(reconciliation_service_pb2_grpc.ReconciliationServiceServicer):
    """A party's ReconciliationService answered from a tree in the test process."""

    def __init__(self, tree: PositionTree) -> None:
        self.tree = tree
        self.calls = 0

    async def GetPositionTreeNodes(
        self, request: Any, context: Any
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        self.calls += 1
        return self.tree.answer(request)


def _position(account: str, asset: str, quantity: str) -> common_pb2.Position:
    return common_pb2.Position(
        account_id=account,
        asset_id=asset,
        quantity=amount_to_proto(quantity),
        locked_quantity=amount_to_proto("0"),
        pledged_quantity=amount_to_proto("0"),
    )


def test_a_regulator_down_leaves_its_results_pending_and_stops_nothing_else(
    reference_parties: Parties, start_server: Any, tmp_path: Path
) -> None:
    """The regulator fails (kill -9) before a cut-off and comes back after it (issue 16).

    While it is down the parties state the cut-off, keep syncing, and the exchange
    issues a margin call the custodian receives and answers on the stream; once
    it is back the statements they kept resubmitting reach it, and it publishes
    the cut-off's result, MATCHED.
    """
    parties = reference_parties
    trio = start_trio(parties, start_server, tmp_path, "regulator-down")

    async def scenario() -> None:
        async with (
            parties.channel(trio.custodian.address, REGULATOR) as to_custodian,
            parties.channel(trio.exchange.address, REGULATOR) as to_exchange,
        ):
            custodian_control = TestControlClient(to_custodian)
            exchange_control = TestControlClient(to_exchange)
            exchange = ExchangeClient(to_exchange)
            zero = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
            now = (await custodian_control.advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
            await pledge_all(parties, to_custodian, now)
            await until_synced(custodian_control, exchange_control, exchange)

            trio.regulator.kill()
            cutoff_id = await pass_cutoff([custodian_control, exchange_control])
            request = reconciliation_service_pb2.GetReconciliationStatementRequest(
                cutoff_id=cutoff_id
            )
            async with asyncio.timeout(WAIT):
                while True:
                    try:
                        for to_party in (to_custodian, to_exchange):
                            await ReconciliationClient(to_party).get_reconciliation_statement(
                                request
                            )
                        break
                    except RPCError as err:
                        # The exchange states the cut-off once its custodian's stream is past it.
                        if err.reason != _R.ERROR_REASON_STATE_CONFLICT:
                            raise
                        await asyncio.sleep(0.1)

            # Nothing else waits for the regulator: an exposure brings a margin call, which
            # reaches the custodian and is answered on the stream.
            # acct-q's collateral is worth 280000: 622222 puts its ratio at 0.45, between the
            # liquidation line and maintenance.
            await exchange_control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-q", exposure=amount_to_proto("622222")
                )
            )
            await exchange_control.run_valuation(
                test_control_pb2.RunValuationRequest(account_id="acct-q")
            )
            calls = (
                await exchange.list_margin_calls(
                    exchange_service_pb2.ListMarginCallsRequest(account_id="acct-q")
                )
            ).margin_call_states
            assert len(calls) == 1
            call_id = margin_pb2.MarginCallState.FromString(calls[0].payload).margin_call_id
            async with asyncio.timeout(WAIT):
                while True:
                    state = (
                        await exchange.get_margin_call(
                            exchange_service_pb2.GetMarginCallRequest(margin_call_id=call_id)
                        )
                    ).margin_call_state
                    status = margin_pb2.MarginCallState.FromString(state.payload).status
                    if status != margin_pb2.MARGIN_CALL_STATUS_ISSUED:
                        break
                    await asyncio.sleep(0.1)
            await until_synced(custodian_control, exchange_control, exchange)

            # Back on the same data: its clock joins the others', and the result comes.
            trio.regulator.start()
            async with parties.channel(trio.regulator.address, CUSTODIAN) as to_regulator:
                regulator_control = TestControlClient(to_regulator)
                theirs = (await custodian_control.advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
                ours = (await regulator_control.advance_clock(zero)).now.ToDatetime(tzinfo=UTC)
                by = duration_pb2.Duration()
                by.FromTimedelta(max(theirs - ours, timedelta(0)))
                await regulator_control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))
                envelope = await await_result(RegulatorClient(to_regulator), cutoff_id)
            result = verified_result(parties, envelope)
            assert result.cutoff_id == cutoff_id
            assert result.outcome == _F.RECONCILIATION_OUTCOME_MATCHED

    run(scenario())


def test_an_unreachable_party_leaves_the_result_pending_until_it_answers(
    reference_parties: Parties, start_server: Any, tmp_path: Path
) -> None:
    """Statements signed here; both parties' trees served in-process, the exchange's late."""
    parties = reference_parties
    trees = {
        CUSTODIAN: PositionTree.build(
            {f"acct-{n:03d}": [_position(f"acct-{n:03d}", "BTC", str(n))] for n in range(40)}
        ),
        EXCHANGE: PositionTree.build(
            {
                f"acct-{n:03d}": [_position(f"acct-{n:03d}", "BTC", str(n + (n == 17)))]
                for n in range(40)
            }
        ),
    }
    exchange_port = free_port()

    async def scenario() -> None:
        custodian_fake = _FakeParty(trees[CUSTODIAN])
        exchange_fake = _FakeParty(trees[EXCHANGE])
        custodian_server = create_server(tls=parties.tls(CUSTODIAN), servicers=[custodian_fake])
        custodian_port = await start_grpc_server(custodian_server, "127.0.0.1:0")
        regulator = start_server(
            "regulator",
            parties.config(
                REGULATOR,
                "regulator",
                tmp_path,
                peers={
                    CUSTODIAN: f"127.0.0.1:{custodian_port}",
                    EXCHANGE: f"127.0.0.1:{exchange_port}",
                },
            ),
            name="pending-regulator",
        )
        now = datetime.now(UTC)
        cutoff = datetime.combine(now.date(), time(0), tzinfo=UTC)
        cutoff_id = cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")
        heads = {
            CUSTODIAN_TO_EXCHANGE: LogHead(3, bytes(range(32))),
            EXCHANGE_TO_CUSTODIAN: LogHead(0, bytes(32)),
        }
        envelopes = {
            party: sign_statement(
                build_reconciliation_statement(
                    trees[party], cutoff_time=cutoff, party_role=role, sync_log_heads=heads
                ),
                parties.keys[party],
                audience=[REGULATOR],
                sequence=1,
                ttl=timedelta(days=1),
                issued_at=now,
            )
            for party, role in (
                (CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN),
                (EXCHANGE, common_pb2.PARTY_ROLE_EXCHANGE),
            )
        }
        try:
            async with parties.channel(regulator.address, CUSTODIAN) as channel:
                client = RegulatorClient(channel)
                for party in (CUSTODIAN, EXCHANGE):
                    response = await client.submit_reconciliation_statement(
                        regulator_service_pb2.SubmitReconciliationStatementRequest(
                            reconciliation_statement=envelopes[party]
                        )
                    )
                    # The exchange cannot be asked: no result yet.
                    assert not response.HasField("reconciliation_result"), party
                request = regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=cutoff_id)
                pending = await refused(client.get_reconciliation_result(request))
                assert pending.code == grpc.StatusCode.FAILED_PRECONDITION
                assert pending.reason == _R.ERROR_REASON_STATE_CONFLICT

                exchange_server = create_server(
                    tls=parties.tls(EXCHANGE), servicers=[exchange_fake]
                )
                await start_grpc_server(exchange_server, f"127.0.0.1:{exchange_port}")
                try:
                    async with asyncio.timeout(WAIT):
                        while True:
                            try:
                                response = await client.get_reconciliation_result(request)
                                break
                            except RPCError as err:
                                if err.reason != _R.ERROR_REASON_STATE_CONFLICT:
                                    raise
                                await asyncio.sleep(0.2)
                finally:
                    await stop_grpc_server(exchange_server, grace=None)
            result = verified_result(parties, response.reconciliation_result)
            assert result.outcome == _F.RECONCILIATION_OUTCOME_BREAKS
            assert [(b.account_id, b.asset_id, b.field) for b in result.breaks] == [
                ("acct-017", "BTC", _F.BREAK_FIELD_QUANTITY)
            ]
            assert result.breaks[0].custodian_value.value == "17"
            assert result.breaks[0].exchange_value.value == "18"
            # Located by descent, not a dump: a few calls for 40 accounts.
            assert 0 < exchange_fake.calls <= 12
            assert result.custodian_statement == envelopes[CUSTODIAN]
            assert result.exchange_statement == envelopes[EXCHANGE]
        finally:
            await stop_grpc_server(custodian_server, grace=None)

    run(scenario())


@pytest.mark.parametrize(
    ("role", "party", "settings", "message"),
    [
        ("regulator", REGULATOR, {"regulator": {"custodian": "nobody"}}, "regulator.custodian"),
        ("regulator", REGULATOR, {"regulator": {"cut_offs": "12:00"}}, "unknown key"),
        (
            "custodian",
            CUSTODIAN,
            {"custodian": {"reconciliation": {"cutoffs_utc": "12:00,25:00"}}},
            "custodian.reconciliation.cutoffs_utc",
        ),
        (
            "custodian",
            CUSTODIAN,
            {"custodian": {"reconciliation": {"regulator": "nobody"}}},
            "custodian.reconciliation.regulator",
        ),
    ],
)
def test_reconciliation_configuration_is_checked_before_start(
    reference_parties: Parties,
    start_server: Any,
    tmp_path: Path,
    role: str,
    party: str,
    settings: dict[str, Any],
    message: str,
) -> None:
    config = reference_parties.config(
        party,
        role,
        tmp_path,
        peers={CUSTODIAN: "127.0.0.1:1", EXCHANGE: "127.0.0.1:2"}
        if role == "regulator"
        else {EXCHANGE: None, REGULATOR: "127.0.0.1:3"},
        **settings,
    )
    with pytest.raises(RuntimeError, match=message):
        start_server(role, config, name=f"bad-{role}-{len(message)}")
    assert not (tmp_path / f"{party}.sqlite").exists()
