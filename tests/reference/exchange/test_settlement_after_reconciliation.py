"""Settlement after reconciliation, with real custodian, exchange and regulator processes.

The exchange runs a cut-off's settlement cycle by itself once the regulator has
published the cut-off MATCHED (``settlement.after_reconciliation``, on by
default with a regulator). One trio goes through four cut-offs; the schedule
puts three of them within twenty minutes of one UTC day, so the third meets
the daily cap of two cycles:

1. matched: the cycle of that cut-off is signed, delivered, and executed by
   the custodian once the dispute window (1 h here) has passed;
2. matched: a cycle with nothing to move (counted by the exchange);
3. matched, but the day's cap is reached: refused and recorded, no cycle;
4. (next day, after a restart with a changed result) a break injected with
   ``test_perturbations``: no cycle, although the cap would allow one.

The restart also replays a crash between a cycle and its recorded decision:
the exchange decides the cut-off again and the cycle record keeps it from
netting twice.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest
from _postgres import open_database
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import (
    CustodianClient,
    ExchangeClient,
    RegulatorClient,
    TestControlClient,
)
from collateral_sync.errors import CollateralSyncError, RPCError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import pae, sign_statement, verify_statement
from collateral_sync.sync import EXCHANGE_TO_CUSTODIAN
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    reconciliation_pb2,
    regulator_service_pb2,
    test_control_pb2,
)
from collateral_sync_reference.common.config import ConfigSection
from collateral_sync_reference.common.storage import SqliteStorage
from collateral_sync_reference.exchange.core import ExchangeCore, ExchangeSettings
from collateral_sync_reference.exchange.policy_content import build_policy_content
from collateral_sync_reference.exchange.price_feed import ScriptedPriceFeed
from collateral_sync_reference.exchange.settlement import (
    ExchangeSettlement,
    SettlementAfterReconciliation,
    check_reconciliation_result,
)
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, REGULATOR, Parties, ServerProcess, StartServer

_T = TypeVar("_T")
STATUS = reconciliation_pb2.SettlementStatus
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
HOUSE = f"{EXCHANGE}/settlement"
WAIT = 30.0
WINDOW = timedelta(hours=1)
ACCOUNTS = ("sa-loss", "sa-win")
PROFITS = {"sa-loss": "-1500", "sa-win": "300"}
# From the fourth statement on, the exchange's view of sa-win differs.
BREAK = {
    "account_id": "sa-win",
    "asset_id": "USDC",
    "field": "locked_quantity",
    "delta": "1",
    "after_cutoffs": 3,
}
_SEQUENCE = itertools.count(1)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def schedule() -> tuple[timedelta, ...]:
    """Three cut-offs ten minutes apart, starting an hour or more from the real time."""
    hour = (datetime.now(UTC).hour + 2) % 24
    return tuple(timedelta(hours=hour, minutes=m) for m in (0, 10, 20))


def schedule_text(cutoffs: tuple[timedelta, ...]) -> str:
    return ",".join(f"{c.seconds // 3600:02d}:{c.seconds // 60 % 60:02d}" for c in cutoffs)


@dataclass
class Trio:
    custodian: ServerProcess
    exchange: ServerProcess
    regulator: ServerProcess
    #: The exchange's storage config section (either engine).
    exchange_db: dict[str, Any]
    cutoffs: tuple[timedelta, ...]


def start_trio(
    parties: Parties,
    start_server: StartServer,
    directory: Path,
    *,
    settlement: dict[str, Any] | None = None,
) -> Trio:
    cutoffs = schedule()
    regulator_address = f"127.0.0.1:{free_port()}"
    accounts: list[dict[str, Any]] = [
        {"account_id": a, "client_id": CLIENT, "holdings": {"USDC": "100000"}} for a in ACCOUNTS
    ]
    accounts.append({"account_id": HOUSE, "client_id": EXCHANGE, "holdings": {"USDC": "1000000"}})
    custodian = start_server(
        "custodian",
        parties.config(
            CUSTODIAN,
            "custodian",
            directory,
            peers={EXCHANGE: None, REGULATOR: regulator_address},
            custodian={
                "accounts": accounts,
                "reconciliation": {"cutoffs_utc": schedule_text(cutoffs)},
            },
        ),
        name=f"{directory.name}-custodian",
    )
    section: dict[str, Any] = {
        "custodian": CUSTODIAN,
        "log_origin": ORIGIN,
        "prices": [{"asset_id": "USDC", "price": "1"}],
        "profits": PROFITS,
        "risk_policy": {"settlement_dispute_window_seconds": int(WINDOW.total_seconds())},
        "reconciliation": {"cutoffs_utc": schedule_text(cutoffs), "test_perturbations": [BREAK]},
    }
    if settlement is not None:
        section["settlement"] = settlement
    exchange = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            directory,
            peers={CUSTODIAN: custodian.address, REGULATOR: regulator_address},
            exchange=section,
        ),
        name=f"{directory.name}-exchange",
    )
    regulator = start_server(
        "regulator",
        parties.config(
            REGULATOR,
            "regulator",
            directory,
            peers={CUSTODIAN: custodian.address, EXCHANGE: exchange.address},
        ),
        name=f"{directory.name}-regulator",
        extra_args=("--listen", regulator_address),
    )
    return Trio(custodian, exchange, regulator, parties.storage(directory, EXCHANGE), cutoffs)


# ------------------------------------------------------------------ helpers


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


async def pledge_all(parties: Parties, custodian: CustodianClient, now: datetime) -> None:
    """Each client account pledges 50000 USDC to the exchange."""
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
        await custodian.pledge_collateral(
            custodian_service_pb2.PledgeCollateralRequest(
                pledge_instruction=sign(instruction, client, now=now),
                liquidation_path=sign(path, client, now=now, statement_id=f"p-{account_id}"),
            )
        )


async def until_synced(
    custodian_control: TestControlClient, exchange_control: TestControlClient, exchange: Any
) -> None:
    """Every account credited, and both sides hold the same heads in both directions.

    The same heads twice in a row: an entry the exchange appends right after
    crediting must not slip in between the two parties' cut-offs.
    """
    previous: list[Any] | None = None
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
                if heads == previous:
                    return
                previous = heads
            else:
                previous = None
            await asyncio.sleep(0.1)


def next_cutoff(now: datetime, cutoffs: tuple[timedelta, ...]) -> datetime:
    day = datetime.combine(now.date(), time(0), tzinfo=UTC)
    return min(
        moment
        for moment in (day + offset + timedelta(days=d) for d in (0, 1) for offset in cutoffs)
        if moment > now
    )


async def advance(controls: list[TestControlClient], by: timedelta) -> datetime:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(by)
    moments = [
        (await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=duration))).now
        for control in controls
    ]
    return moments[0].ToDatetime(tzinfo=UTC)


async def pass_cutoff(controls: list[TestControlClient], cutoffs: tuple[timedelta, ...]) -> str:
    """Move every clock just past the next cut-off (the regulator's first); return its id."""
    now = await advance(controls[:1], timedelta(0))
    cutoff = next_cutoff(now, cutoffs)
    await advance(controls, cutoff - now + timedelta(seconds=1))
    return cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")


def exchange_rows(storage: dict[str, Any], sql: str, *args: Any) -> list[Any]:
    with open_database(storage) as db:
        return db.execute(sql, args).fetchall()


async def decision_of(path: dict[str, Any], cutoff_id: str) -> tuple[str, str]:
    """The exchange's recorded decision for the cut-off, once it has one."""
    async with asyncio.timeout(WAIT):
        while True:
            rows = exchange_rows(
                path,
                "SELECT decision, detail FROM exchange_settlement_after_reconciliation "
                "WHERE cutoff_id = ?",
                cutoff_id,
            )
            if rows:
                return rows[0][0], rows[0][1]
            await asyncio.sleep(0.05)


def cycles(path: dict[str, Any]) -> list[tuple[str, str, int]]:
    return exchange_rows(
        path,
        "SELECT cutoff_id, day, cycle_of_day FROM exchange_settlement_cycles ORDER BY day, cycle_of_day",
    )


def instructions(path: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return exchange_rows(
        path,
        "SELECT settlement_id, cutoff_id, account_id, net_amount "
        "FROM exchange_settlement_instructions ORDER BY seq",
    )


async def settlement(
    custodian: CustodianClient, settlement_id: str
) -> custodian_service_pb2.GetSettlementResponse:
    return await custodian.get_settlement(
        custodian_service_pb2.GetSettlementRequest(settlement_id=settlement_id)
    )


async def usdc(custodian: CustodianClient, account_id: str) -> tuple[str, str]:
    """(quantity, pledged) of the account's USDC, as attested."""
    response = await custodian.get_holdings_statement(
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
    )
    statement = attestation_pb2.HoldingsStatement.FromString(response.holdings_statement.payload)
    [position] = [p for p in statement.positions if p.asset_id == "USDC"]
    return position.quantity.value, position.pledged_quantity.value


async def not_found(call: Coroutine[Any, Any, Any]) -> None:
    """The call (made as the regulator, who may read every settlement, §4.5) is NOT_FOUND."""
    with pytest.raises(RPCError) as caught:
        await call
    assert caught.value.code == grpc.StatusCode.NOT_FOUND, caught.value.message


# ------------------------------------------------------------------ tests


def test_matched_cutoffs_settle_breaks_and_the_cap_do_not(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    parties = reference_parties
    trio = start_trio(parties, start_server, tmp_path)
    db = trio.exchange_db
    kept: dict[str, Any] = {}

    async def through_the_day() -> None:
        async with (
            parties.channel(trio.custodian.address, EXCHANGE) as to_custodian,
            parties.channel(trio.exchange.address, CUSTODIAN) as to_exchange,
            parties.channel(trio.regulator.address, CUSTODIAN) as to_regulator,
        ):
            custodian = CustodianClient(to_custodian)
            custodian_control = TestControlClient(to_custodian)
            exchange_control = TestControlClient(to_exchange)
            controls = [TestControlClient(to_regulator), custodian_control, exchange_control]
            exchange = ExchangeClient(to_exchange)
            now = await advance(controls[1:2], timedelta(0))
            await pledge_all(parties, custodian, now)
            await until_synced(custodian_control, exchange_control, exchange)

            # 1. Matched: the cycle of this cut-off reaches the custodian by itself.
            first = await pass_cutoff(controls, trio.cutoffs)
            assert await decision_of(db, first) == ("settled", "2 settlement instructions")
            found = {}
            for account_id, net in (("sa-loss", "1500"), ("sa-win", "-300")):
                response = await settlement(custodian, f"{first}/{account_id}")
                assert response.status == STATUS.SETTLEMENT_STATUS_PENDING
                verified = verify_statement(
                    response.settlement_instruction,
                    parties.registry,
                    expected_type=reconciliation_pb2.SettlementInstruction,
                    audience=CUSTODIAN,
                    now=await advance(controls[2:], timedelta(0)),
                )
                assert verified.issuer == EXCHANGE
                message = verified.message
                assert (message.cutoff_id, message.account_id) == (first, account_id)
                assert (message.net_amount.value, message.cycle_of_day) == (net, 1)
                found[account_id] = response
            kept["first"] = first
            kept["instructions"] = {a: r.settlement_instruction for a, r in found.items()}

            # 2. Matched: nothing changed since, an empty cycle (the exchange counts it).
            await until_synced(custodian_control, exchange_control, exchange)
            second = await pass_cutoff(controls, trio.cutoffs)
            assert await decision_of(db, second) == ("settled", "0 settlement instructions")

            # 3. Matched, but two cycles today already: refused by the cap, no cycle.
            await until_synced(custodian_control, exchange_control, exchange)
            third = await pass_cutoff(controls, trio.cutoffs)
            decision, why = await decision_of(db, third)
            assert decision == "capped", why
            assert "LIMIT_EXCEEDED" in why
            day = first[:10]
            assert second[:10] == third[:10] == day
            assert cycles(db) == [(first, day, 1), (second, day, 2)]

            # The dispute window passes: the custodian executes the first cycle.
            await advance(controls, WINDOW + timedelta(minutes=1))
            for account_id in ACCOUNTS:
                executed = await settlement(custodian, f"{first}/{account_id}")
                assert executed.status == STATUS.SETTLEMENT_STATUS_EXECUTED
                assert executed.settlement_instruction == kept["instructions"][account_id]
            assert await usdc(custodian, "sa-loss") == ("98500", "48500")
            assert await usdc(custodian, "sa-win") == ("100300", "50000")
            assert (await usdc(custodian, HOUSE))[0] == "1001200"
            kept["instructions_rows"] = instructions(db)

    run(through_the_day())

    # A crash between the first cycle and its recorded decision, and a new result
    # in the configuration: the cut-off is decided again, its cycle is not netted again.
    trio.exchange.stop()
    with open_database(db, read_only=False) as connection:
        connection.execute(
            "DELETE FROM exchange_settlement_after_reconciliation WHERE cutoff_id = ?",
            (kept["first"],),
        )
    config = json.loads(trio.exchange.config_path.read_text())
    config["exchange"]["profits"] = {**PROFITS, "sa-loss": "-2000"}
    trio.exchange.config_path.write_text(json.dumps(config))
    trio.exchange.extra_args = ("--listen", trio.exchange.address)
    trio.exchange.start()

    async def next_day() -> None:
        async with (
            parties.channel(trio.custodian.address, EXCHANGE) as to_custodian,
            parties.channel(trio.custodian.address, REGULATOR) as audit_custodian,
            parties.channel(trio.exchange.address, CUSTODIAN) as to_exchange,
            parties.channel(trio.regulator.address, CUSTODIAN) as to_regulator,
        ):
            custodian = CustodianClient(to_custodian)
            auditor = CustodianClient(audit_custodian)
            custodian_control = TestControlClient(to_custodian)
            exchange_control = TestControlClient(to_exchange)
            controls = [TestControlClient(to_regulator), custodian_control, exchange_control]
            first = kept["first"]
            assert await decision_of(db, first) == ("settled", "2 settlement instructions")
            assert instructions(db) == kept["instructions_rows"]
            assert len(cycles(db)) == 2
            for account_id in ACCOUNTS:
                again = await settlement(custodian, f"{first}/{account_id}")
                assert again.status == STATUS.SETTLEMENT_STATUS_EXECUTED
                assert again.settlement_instruction == kept["instructions"][account_id]
            assert await usdc(custodian, "sa-loss") == ("98500", "48500")

            # 4. A new day, a further loss of 500 to settle, but the cut-off breaks.
            await until_synced(custodian_control, exchange_control, ExchangeClient(to_exchange))
            fourth = await pass_cutoff(controls, trio.cutoffs)
            assert fourth[:10] != first[:10]
            decision, why = await decision_of(db, fourth)
            assert decision == "breaks", why
            assert "resolved" in why
            assert len(cycles(db)) == 2
            assert instructions(db) == kept["instructions_rows"]
            await not_found(settlement(auditor, f"{fourth}/sa-loss"))
            assert await usdc(custodian, "sa-loss") == ("98500", "48500")

    run(next_day())


def test_switched_off_a_matched_cutoff_waits_for_a_cycle_run_by_hand(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    parties = reference_parties
    trio = start_trio(parties, start_server, tmp_path, settlement={"after_reconciliation": False})
    db = trio.exchange_db

    async def scenario() -> None:
        async with (
            parties.channel(trio.custodian.address, EXCHANGE) as to_custodian,
            parties.channel(trio.custodian.address, REGULATOR) as audit_custodian,
            parties.channel(trio.exchange.address, CUSTODIAN) as to_exchange,
            parties.channel(trio.regulator.address, CUSTODIAN) as to_regulator,
        ):
            custodian = CustodianClient(to_custodian)
            auditor = CustodianClient(audit_custodian)
            custodian_control = TestControlClient(to_custodian)
            exchange_control = TestControlClient(to_exchange)
            controls = [TestControlClient(to_regulator), custodian_control, exchange_control]
            now = await advance(controls[1:2], timedelta(0))
            await pledge_all(parties, custodian, now)
            await until_synced(custodian_control, exchange_control, ExchangeClient(to_exchange))
            cutoff_id = await pass_cutoff(controls, trio.cutoffs)
            regulator = RegulatorClient(to_regulator)
            async with asyncio.timeout(WAIT):
                while True:
                    try:
                        response = await regulator.get_reconciliation_result(
                            regulator_service_pb2.GetReconciliationResultRequest(
                                cutoff_id=cutoff_id
                            )
                        )
                        break
                    except RPCError as err:
                        if err.code != grpc.StatusCode.NOT_FOUND:
                            raise
                        await asyncio.sleep(0.05)
            result = reconciliation_pb2.ReconciliationResult.FromString(
                response.reconciliation_result.payload
            )
            assert result.outcome == reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED, (
                result.breaks
            )
            # The exchange's statement is in the result: it was submitted, and not acted on.
            assert result.exchange_statement.payload
            assert exchange_rows(db, "SELECT * FROM exchange_settlement_after_reconciliation") == []
            assert cycles(db) == []
            await not_found(settlement(auditor, f"{cutoff_id}/sa-loss"))
            ran = await exchange_control.run_settlement_cycle(
                test_control_pb2.RunSettlementCycleRequest(cutoff_id=cutoff_id)
            )
            assert len(ran.settlement_instructions) == 2
            pending = await settlement(custodian, f"{cutoff_id}/sa-loss")
            assert pending.status == STATUS.SETTLEMENT_STATUS_PENDING

    run(scenario())


@pytest.mark.parametrize(
    ("settlement", "peers", "message"),
    [
        # Settling after reconciliation needs a regulator to ask.
        ({"after_reconciliation": True}, {}, "exchange.settlement.after_reconciliation"),
        ({"after_reconciliation": "yes"}, None, "true or false"),
        ({"result_wait_seconds": 0}, None, "exchange.settlement.result_wait_seconds"),
        ({"after_reconcilation": True}, None, "unknown key"),
    ],
)
def test_the_settlement_section_is_checked_before_serving(
    reference_parties: Parties,
    start_server: StartServer,
    tmp_path: Path,
    settlement: dict[str, Any],
    peers: dict[str, str] | None,
    message: str,
) -> None:
    config = reference_parties.config(
        EXCHANGE,
        "exchange",
        tmp_path,
        peers={CUSTODIAN: "127.0.0.1:1", **({REGULATOR: "127.0.0.1:2"} if peers is None else {})},
        exchange={"custodian": CUSTODIAN, "log_origin": ORIGIN, "settlement": settlement},
    )
    with pytest.raises(RuntimeError, match=message):
        start_server("exchange", config, name=f"bad-settlement-{len(message)}")


# ------------------------------------------------------------------ the result check


RESULT_TYPE = "application/vnd.collateral-sync.v1.reconciliation-result+proto"
CUTOFF_ID = "2026-11-23T12:00:00Z"
ISSUED = datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC)


def _own_statement(parties: Parties, sequence: int = 1) -> envelope_pb2.Envelope:
    statement = reconciliation_pb2.ReconciliationStatement(
        cutoff_id=CUTOFF_ID, party_role=common_pb2.PARTY_ROLE_EXCHANGE, account_count=0
    )
    statement.cutoff_time.FromDatetime(ISSUED.replace(second=0))
    return sign_statement(
        statement,
        parties.keys[EXCHANGE],
        audience=[REGULATOR],
        sequence=sequence,
        ttl=timedelta(days=7),
        issued_at=ISSUED,
    )


def _result(
    parties: Parties,
    own: envelope_pb2.Envelope,
    *,
    cutoff_id: str = CUTOFF_ID,
    outcome: int = reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED,
    breaks: int = 0,
    audience: tuple[str, ...] = ("*",),
) -> envelope_pb2.Envelope:
    message = reconciliation_pb2.ReconciliationResult(
        cutoff_id=cutoff_id,
        outcome=outcome,  # type: ignore[arg-type]
        breaks=[
            reconciliation_pb2.ReconciliationBreak(
                account_id=f"acct-{n}", field=reconciliation_pb2.BREAK_FIELD_MISSING
            )
            for n in range(breaks)
        ],
        exchange_statement=own,
    )
    return sign_statement(
        message,
        parties.keys[REGULATOR],
        audience=list(audience),
        sequence=1,
        ttl=timedelta(days=30),
        issued_at=ISSUED,
    )


def _check(
    parties: Parties,
    envelope: envelope_pb2.Envelope,
    own: envelope_pb2.Envelope,
    *,
    regulator_id: str = REGULATOR,
    now: datetime = ISSUED,
) -> reconciliation_pb2.ReconciliationResult:
    return check_reconciliation_result(
        envelope,
        registry=parties.registry,
        exchange_id=EXCHANGE,
        regulator_id=regulator_id,
        cutoff_id=CUTOFF_ID,
        own_statement=own,
        now=now,
        max_skew=timedelta(seconds=30),
    )


def test_the_result_check_accepts_the_regulators_result_for_our_statement(
    reference_parties: Parties,
) -> None:
    own = _own_statement(reference_parties)
    matched = _check(reference_parties, _result(reference_parties, own), own)
    assert matched.outcome == reconciliation_pb2.RECONCILIATION_OUTCOME_MATCHED
    broken = _check(
        reference_parties,
        _result(
            reference_parties,
            own,
            outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS,
            breaks=2,
        ),
        own,
    )
    assert [b.account_id for b in broken.breaks] == ["acct-0", "acct-1"]


def _forged_signature(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    forged = envelope_pb2.Envelope()
    forged.CopyFrom(envelope)
    signature = forged.signatures[0].sig
    forged.signatures[0].sig = bytes([signature[0] ^ 1]) + signature[1:]
    return forged


def _signed_by_the_exchange(parties: Parties, envelope: envelope_pb2.Envelope) -> Any:
    message = reconciliation_pb2.ReconciliationResult.FromString(envelope.payload)
    message.header.issuer = EXCHANGE
    payload = message.SerializeToString()
    key = parties.keys[EXCHANGE]
    return envelope_pb2.Envelope(
        payload=payload,
        payload_type=RESULT_TYPE,
        signatures=[
            envelope_pb2.Signature(key_id=key.key_id, sig=key.sign(pae(RESULT_TYPE, payload)))
        ],
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("forged signature", "SIGNATURE_INVALID"),
        ("signed by the exchange", "KEY_ROLE_MISMATCH"),
        ("another regulator expected", "KEY_ROLE_MISMATCH"),
        ("addressed, not public", "AUDIENCE_MISMATCH"),
        ("expired", "STATEMENT_EXPIRED"),
        ("another cut-off", "STATE_CONFLICT"),
        ("another statement of ours", "STATE_CONFLICT"),
        ("matched with breaks", "MALFORMED"),
        ("breaks without any", "MALFORMED"),
    ],
)
def test_the_result_check_refuses(reference_parties: Parties, case: str, reason: str) -> None:
    parties = reference_parties
    own = _own_statement(parties)
    regulator_id = REGULATOR
    now = ISSUED
    envelope = _result(parties, own)
    if case == "forged signature":
        envelope = _forged_signature(envelope)
    elif case == "signed by the exchange":
        envelope = _signed_by_the_exchange(parties, envelope)
    elif case == "another regulator expected":
        regulator_id = "regulator-2"
    elif case == "addressed, not public":
        envelope = _result(parties, own, audience=(EXCHANGE, CUSTODIAN))
    elif case == "expired":
        now = ISSUED + timedelta(days=31)
    elif case == "another cut-off":
        envelope = _result(parties, own, cutoff_id="2026-11-23T00:00:00Z")
    elif case == "another statement of ours":
        envelope = _result(parties, _own_statement(parties, sequence=2))
    elif case == "matched with breaks":
        envelope = _result(parties, own, breaks=1)
    else:
        envelope = _result(parties, own, outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS)
    with pytest.raises(CollateralSyncError) as caught:
        _check(parties, envelope, own, regulator_id=regulator_id, now=now)
    assert caught.value.reason_name == reason, caught.value.message
    assert {"expected", "actual"} <= set(caught.value.metadata), caught.value.metadata


# ------------------------------------------------------------------ fetching, in process


class _FakeRegulator:
    """GetReconciliationResult answered from a script of errors, then a result."""

    def __init__(self, answers: list[RPCError | envelope_pb2.Envelope]) -> None:
        self.answers = answers
        self.calls = 0

    async def get_reconciliation_result(
        self, request: regulator_service_pb2.GetReconciliationResultRequest
    ) -> regulator_service_pb2.GetReconciliationResultResponse:
        assert request.cutoff_id == CUTOFF_ID
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, RPCError):
            raise answer
        return regulator_service_pb2.GetReconciliationResultResponse(reconciliation_result=answer)


def _follower(
    parties: Parties, tmp_path: Path, *, result_wait: timedelta
) -> tuple[SettlementAfterReconciliation, SqliteStorage]:
    storage = SqliteStorage(tmp_path / "exchange.sqlite")
    policy = build_policy_content(ConfigSection({}, file=Path("exchange.json")))
    core = ExchangeCore(
        storage,
        storage.sync_log(
            party_id=EXCHANGE, peer_party_id=CUSTODIAN, sending_direction=EXCHANGE_TO_CUSTODIAN
        ),
        signer=parties.keys[EXCHANGE],
        registry=parties.registry,
        settings=ExchangeSettings(
            party_id=EXCHANGE, custodian_id=CUSTODIAN, log_origin=ORIGIN, policy_content=policy
        ),
        prices=ScriptedPriceFeed(storage, name=policy.price_source),
        clock=lambda: ISSUED,
    )
    core.start()
    settlement = ExchangeSettlement(
        storage,
        core.store,
        signer=parties.keys[EXCHANGE],
        custodian_id=CUSTODIAN,
        clock=lambda: ISSUED,
    )
    follower = SettlementAfterReconciliation(
        settlement,
        storage,
        exchange_id=EXCHANGE,
        regulator_id=REGULATOR,
        regulator_address="127.0.0.1:1",
        registry=parties.registry,
        tls=None,
        statements=list,
        custodian=lambda: None,
        clock=lambda: ISSUED,
        max_skew=timedelta(seconds=30),
        result_wait=result_wait,
        logger=logging.getLogger("test-settlement-after-reconciliation"),
    )
    return follower, storage


def _not_yet(code: grpc.StatusCode) -> RPCError:
    return RPCError("not yet", status_code=code)


def test_the_result_is_awaited_with_backoff_for_a_bounded_time(
    reference_parties: Parties, tmp_path: Path
) -> None:
    parties = reference_parties
    own = _own_statement(parties)
    broken = _result(
        parties, own, outcome=reconciliation_pb2.RECONCILIATION_OUTCOME_BREAKS, breaks=1
    )
    matched = _result(parties, own)

    async def scenario() -> None:
        # Not found, then a party not asked yet, then the regulator down: all "not yet".
        follower, storage = _follower(parties, tmp_path / "a", result_wait=timedelta(seconds=5))
        waiting = _FakeRegulator(
            [
                _not_yet(grpc.StatusCode.NOT_FOUND),
                _not_yet(grpc.StatusCode.FAILED_PRECONDITION),
                _not_yet(grpc.StatusCode.UNAVAILABLE),
                broken,
            ]
        )
        assert await follower.settle(cast(Any, waiting), CUTOFF_ID, own)
        assert waiting.calls == 4
        decision, why = follower.decision(CUTOFF_ID) or ("", "")
        assert decision == "breaks"
        assert "acct-0/-/MISSING" in why
        assert storage.connection.execute(
            "SELECT COUNT(*) FROM exchange_settlement_cycles"
        ).fetchone() == (0,)

        # Never there: given up after the wait, with the last answer, and retried meanwhile.
        follower, _ = _follower(parties, tmp_path / "b", result_wait=timedelta(seconds=0.5))
        never = _FakeRegulator([_not_yet(grpc.StatusCode.NOT_FOUND)])
        assert await follower.settle(cast(Any, never), CUTOFF_ID, own)
        assert 2 <= never.calls <= 6
        decision, why = follower.decision(CUTOFF_ID) or ("", "")
        assert decision == "no_result"
        assert "no result within 0.5 s" in why

        # A refusal that will not change is not retried.
        follower, _ = _follower(parties, tmp_path / "c", result_wait=timedelta(seconds=5))
        denied = _FakeRegulator([_not_yet(grpc.StatusCode.PERMISSION_DENIED)])
        assert await follower.settle(cast(Any, denied), CUTOFF_ID, own)
        assert denied.calls == 1
        assert (follower.decision(CUTOFF_ID) or ("", ""))[0] == "no_result"

        # Matched while the custodian is not connected: undecided, to be tried again.
        follower, storage = _follower(parties, tmp_path / "d", result_wait=timedelta(seconds=5))
        assert not await follower.settle(cast(Any, _FakeRegulator([matched])), CUTOFF_ID, own)
        assert follower.decision(CUTOFF_ID) is None

    for directory in "abcd":
        (tmp_path / directory).mkdir()
    run(scenario())
