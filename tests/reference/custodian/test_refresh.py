"""Holdings statements refreshed before they expire (PROTOCOL.md §5.8, "Refresh").

The custodian is built in-process, as the runner builds it, on a test clock
that moves only when a test moves it: two accounts holding uneven quantities,
one pledged to an exchange and one never pledged, and no asset that earns
yield, so that nothing but a refresh changes them. A sweep re-attests an
account once its latest statement has used half its lifetime, not a
microsecond before: the same positions, reason REFRESH, the next epoch, in the
log and on the pledged exchange's sync log. Sweeps run from ``run_due`` every
min(1 day, lifetime / 4), ``next_due`` names the next one, and a restart
neither repeats a sweep nor skips one. The main test runs on SQLite and on
PostgreSQL; the last one drives a real server with ``AdvanceClock``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _postgres import PostgresServer
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    liquidation_pb2,
    position_sync_pb2,
    test_control_pb2,
)
from collateral_sync_reference.common.clock import TestClock
from collateral_sync_reference.common.storage import SqlStorage
from collateral_sync_reference.custodian import parse_settings
from collateral_sync_reference.custodian.config import CustodianSettings
from collateral_sync_reference.custodian.core import Custodian
from collateral_sync_reference.custodian.store import StoredStatement
from google.protobuf import duration_pb2

from .._inprocess import START, server_context, write_keys
from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, REGULATOR, Parties, StartServer

REASON = attestation_pb2.HoldingsChangeReason
PLEDGED = "acct-pledged"
QUIET = "acct-quiet"
HOLDINGS = {
    PLEDGED: {"USDC": "250000.000000000000000001", "BTC": "0.123456789"},
    QUIET: {"USDC": "10.000000000000000007"},
}
#: What the pledged account pledges: uneven, and less than it holds.
PLEDGE = "0.012345678901234567"
LIFETIME = timedelta(days=30)
HALF = LIFETIME / 2


class World:
    """A custodian in-process on ``storage`` at ``directory``, rebuilt as a restart would."""

    def __init__(self, directory: Path, storage: dict[str, Any], lifetime: timedelta) -> None:
        self.directory = directory
        self.keys = write_keys(
            directory,
            {
                CUSTODIAN: common_pb2.PARTY_ROLE_CUSTODIAN,
                EXCHANGE: common_pb2.PARTY_ROLE_EXCHANGE,
                CLIENT: common_pb2.PARTY_ROLE_CLIENT,
            },
        )
        self.document: dict[str, Any] = {
            "party_id": CUSTODIAN,
            "role": "custodian",
            "storage": storage,
            "peers": {EXCHANGE: None},
            "custodian": {
                "statement_ttl_seconds": int(lifetime.total_seconds()),
                # No asset earns yield: nothing but a refresh renews a statement here.
                "assets": [
                    {"asset_id": "USDC", "asset_class": "STABLECOIN"},
                    {"asset_id": "BTC", "asset_class": "CRYPTO"},
                ],
                "accounts": [
                    {"account_id": account, "client_id": CLIENT, "holdings": holdings}
                    for account, holdings in HOLDINGS.items()
                ],
            },
        }
        self.storage: SqlStorage | None = None
        self.clock: TestClock | None = None
        self.custodian: Custodian | None = None

    def start(self, *, at: datetime | None = None) -> Custodian:
        """Build the custodian as the runner does (its clock moved to ``at`` while it was
        down), and run what is due, as the role's start does."""
        server = server_context(
            self.directory,
            self.document,
            role="custodian",
            parse_settings=parse_settings,
            start=START,
        )
        self.storage, self.clock = server.storage, server.clock
        if at is not None:
            self.move_to(at)
        settings = server.context.settings
        assert isinstance(settings, CustodianSettings)
        self.custodian = Custodian(server.context, settings)
        self.custodian.run_due()
        return self.custodian

    def stop(self) -> None:
        if self.custodian is not None:
            self.custodian.close()
        if self.storage is not None:
            self.storage.close()
        self.custodian = self.storage = self.clock = None

    def now(self) -> datetime:
        assert self.clock is not None
        return self.clock.now()

    def move_to(self, moment: datetime) -> None:
        """Move the test clock forward to ``moment`` (nothing runs by itself)."""
        assert self.clock is not None
        self.clock.advance(moment - self.clock.now())

    def latest(self, account_id: str) -> StoredStatement:
        assert self.custodian is not None
        statement = self.custodian.ledger.store.latest_statement(account_id)
        assert statement is not None
        return statement

    def statement_count(self) -> int:
        assert self.custodian is not None
        return self.custodian.ledger.store.statement_count()

    def announced(self) -> list[position_sync_pb2.PositionUpdate]:
        """Every update on the custodian's sync log towards the exchange, in order."""
        assert self.custodian is not None
        log = self.custodian.ledger.sync_logs[EXCHANGE]
        updates = []
        for sequence in range(1, log.sent_head().sequence + 1):
            entry = log.outgoing_entry(sequence)
            assert entry is not None
            updates.append(position_sync_pb2.PositionUpdate.FromString(entry.update))
        return updates

    def pledge(self, account_id: str, asset_id: str, quantity: str) -> None:
        assert self.custodian is not None
        client, now = self.keys[CLIENT], self.now()
        path = liquidation_pb2.LiquidationPath(
            account_id=account_id,
            exchange_id=EXCHANGE,
            proceeds_account_id=f"{EXCHANGE}/settlement",
            steps=[
                liquidation_pb2.LiquidationStep(
                    asset_id=asset_id, venue="otc-desk", max_quantity=amount_to_proto(quantity)
                )
            ],
        )
        instruction = custodian_service_pb2.PledgeInstruction(
            account_id=account_id,
            exchange_id=EXCHANGE,
            asset_id=asset_id,
            quantity=amount_to_proto(quantity),
        )
        self.custodian.pledges.pledge(
            custodian_service_pb2.PledgeCollateralRequest(
                pledge_instruction=_signed(client, instruction, 1, now),
                liquidation_path=_signed(client, path, 2, now, statement_id="p-1"),
            )
        )


def _signed(
    key: SigningKey,
    message: Any,
    sequence: int,
    now: datetime,
    *,
    statement_id: str | None = None,
) -> envelope_pb2.Envelope:
    return sign_statement(
        message,
        key,
        audience=[CUSTODIAN],
        sequence=sequence,
        ttl=timedelta(hours=1),
        issued_at=now,
        statement_id=statement_id,
    )


@contextmanager
def world(
    directory: Path, storage: dict[str, Any], lifetime: timedelta = LIFETIME
) -> Iterator[World]:
    built = World(directory, storage, lifetime)
    try:
        built.start()
        yield built
    finally:
        built.stop()


def _sqlite(directory: Path) -> dict[str, Any]:
    return {"path": str(directory / f"{CUSTODIAN}.sqlite")}


def _statement(stored: StoredStatement) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement.FromString(stored.envelope.payload)


def _figures(statement: attestation_pb2.HoldingsStatement) -> list[tuple[str, str, str, str]]:
    return [
        (p.asset_id, p.quantity.value, p.locked_quantity.value, p.pledged_quantity.value)
        for p in statement.positions
    ]


def _times(statement: attestation_pb2.HoldingsStatement) -> tuple[datetime, datetime]:
    header = statement.header
    return header.issued_at.ToDatetime(tzinfo=UTC), header.expires_at.ToDatetime(tzinfo=UTC)


# ------------------------------------------------------------------ the sweep


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_an_account_is_refreshed_once_half_its_statement_lifetime_has_passed(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if engine == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        storage = postgres.storage_config(str(tmp_path / CUSTODIAN))
    else:
        storage = _sqlite(tmp_path)
    with world(tmp_path, storage) as w:
        assert w.custodian is not None
        pledged_at = START + timedelta(hours=1)
        w.move_to(pledged_at)
        w.pledge(PLEDGED, "USDC", PLEDGE)
        before = {account: w.latest(account) for account in HOLDINGS}
        count = w.statement_count()
        log_size = w.custodian.attestation.attestation_log.size
        announced = len(w.announced())

        # One microsecond short of half the pledge's lifetime: the quiet account's statement
        # (issued earlier, at START) is due, the pledged account's is not.
        w.move_to(START + HALF - timedelta(microseconds=1))
        assert w.custodian.refresh.sweep() == 0
        w.move_to(START + HALF)
        assert w.custodian.refresh.sweep() == 1
        quiet = w.latest(QUIET)
        assert quiet.reason == REASON.HOLDINGS_CHANGE_REASON_REFRESH
        assert w.latest(PLEDGED) == before[PLEDGED]

        w.move_to(pledged_at + HALF - timedelta(microseconds=1))
        assert w.custodian.refresh.sweep() == 0
        w.move_to(pledged_at + HALF)
        assert w.custodian.refresh.sweep() == 1

        for account in HOLDINGS:
            old, new = _statement(before[account]), _statement(w.latest(account))
            assert w.latest(account).reason == REASON.HOLDINGS_CHANGE_REASON_REFRESH
            assert new.reason == REASON.HOLDINGS_CHANGE_REASON_REFRESH
            assert new.epoch == old.epoch + 1
            assert _figures(new) == _figures(old)
            assert new.exchange_id == old.exchange_id
            assert list(new.header.audience) == list(old.header.audience)
        # Each refreshed when its own statement was half used, for a whole lifetime more.
        assert _times(_statement(quiet)) == (START + HALF, START + HALF + LIFETIME)
        new = _statement(w.latest(PLEDGED))
        assert _times(new) == (pledged_at + HALF, pledged_at + HALF + LIFETIME)
        assert _figures(new) == [
            ("BTC", "0.123456789", "0", "0"),
            ("USDC", "250000.000000000000000001", "0", PLEDGE),
        ]
        # Both are leaves of the log, attested after the commit.
        assert w.statement_count() == count + 2
        assert w.custodian.attestation.attestation_log.size == log_size + 2

        # Only the pledged account's refresh is announced, as a HoldingsChange of that statement.
        updates = w.announced()[announced:]
        assert [u.WhichOneof("update") for u in updates] == ["holdings_change"]
        change = updates[0].holdings_change
        assert change.holdings_statement == w.latest(PLEDGED).envelope
        assert change.attestation == w.latest(PLEDGED).attestation
        assert not change.HasField("liquidation_path")

        # A fresh statement is not refreshed again.
        assert w.custodian.refresh.sweep() == 0


def test_sweeps_run_from_run_due_each_interval_and_no_statement_expires(tmp_path: Path) -> None:
    with world(tmp_path, _sqlite(tmp_path)) as w:
        custodian = w.custodian
        assert custodian is not None
        # Statements of 30 days: a sweep a day, the first one at the start.
        assert custodian.refresh.interval == timedelta(days=1)
        assert custodian.refresh.next_sweep() == START + timedelta(days=1)
        epoch = _statement(w.latest(QUIET)).epoch
        refreshed_on = []
        for day in range(1, 61):
            sweep_at = START + timedelta(days=day)
            w.move_to(sweep_at - timedelta(microseconds=1))
            custodian.run_due()
            assert custodian.refresh.next_sweep() == sweep_at  # not swept early
            assert custodian.next_due() <= sweep_at
            w.move_to(sweep_at)
            custodian.run_due()
            assert custodian.refresh.next_sweep() == sweep_at + timedelta(days=1)
            latest = _statement(w.latest(QUIET))
            issued_at, expires_at = _times(latest)
            # Never left with less than half a lifetime after a sweep.
            assert expires_at - w.now() > HALF
            if latest.epoch != epoch:
                assert latest.epoch == epoch + 1
                assert issued_at == sweep_at
                epoch = latest.epoch
                refreshed_on.append(day)
        # At the first sweep at or after half of each statement's lifetime.
        assert refreshed_on == [15, 30, 45, 60]


def test_short_lived_statements_are_swept_four_times_a_lifetime(tmp_path: Path) -> None:
    with world(tmp_path, _sqlite(tmp_path), lifetime=timedelta(hours=8)) as w:
        custodian = w.custodian
        assert custodian is not None
        assert custodian.refresh.interval == timedelta(hours=2)
        # The scheduler wakes for the sweep: it comes before the yield time (08:00).
        assert custodian.next_due() == START + timedelta(hours=2)
        w.move_to(START + timedelta(hours=2))
        custodian.run_due()
        assert w.latest(QUIET).reason == REASON.HOLDINGS_CHANGE_REASON_DEPOSIT
        assert custodian.next_due() == START + timedelta(hours=4)
        w.move_to(START + timedelta(hours=4))
        custodian.run_due()
        assert w.latest(QUIET).reason == REASON.HOLDINGS_CHANGE_REASON_REFRESH


def test_a_restart_neither_repeats_a_sweep_nor_skips_one(tmp_path: Path) -> None:
    w = World(tmp_path, _sqlite(tmp_path), LIFETIME)
    try:
        custodian = w.start()
        w.move_to(START + HALF)
        custodian.run_due()
        refreshed = _statement(w.latest(QUIET))
        assert refreshed.reason == REASON.HOLDINGS_CHANGE_REASON_REFRESH
        count = w.statement_count()
        w.stop()

        # Started again at the same moment: that sweep is done, the next is a day later.
        custodian = w.start()
        assert w.statement_count() == count
        assert custodian.refresh.next_sweep() == START + HALF + timedelta(days=1)
        w.move_to(START + HALF + timedelta(days=1) - timedelta(microseconds=1))
        custodian.run_due()
        assert w.statement_count() == count
        w.stop()

        # Down until past the refreshed statements' half-life: the start sweeps at once.
        w.start(at=START + LIFETIME + timedelta(days=3))
        latest = _statement(w.latest(QUIET))
        assert latest.reason == REASON.HOLDINGS_CHANGE_REASON_REFRESH
        assert latest.epoch == refreshed.epoch + 1
        assert _times(latest)[0] == START + LIFETIME + timedelta(days=3)
        assert w.statement_count() == count + 2  # both accounts
    finally:
        w.stop()


# ------------------------------------------------------------------ a real server


def test_advance_clock_past_half_a_lifetime_refreshes_a_running_custodian(
    start_server: StartServer, reference_parties: Parties, tmp_path: Path
) -> None:
    config = reference_parties.config(
        CUSTODIAN,
        "custodian",
        tmp_path,
        peers={EXCHANGE: None},
        custodian={
            "accounts": [{"account_id": QUIET, "client_id": CLIENT, "holdings": HOLDINGS[QUIET]}]
        },
    )
    server = start_server("custodian", config, name="custodian-refresh")

    async def scenario() -> None:
        async with reference_parties.channel(server.address, REGULATOR) as channel:
            client, control = CustodianClient(channel), TestControlClient(channel)
            request = custodian_service_pb2.GetHoldingsStatementRequest(account_id=QUIET)
            before = attestation_pb2.HoldingsStatement.FromString(
                (await client.get_holdings_statement(request)).holdings_statement.payload
            )
            issued_at, expires_at = _times(before)
            by = duration_pb2.Duration()
            by.FromTimedelta(expires_at - issued_at - timedelta(minutes=1))
            moved = await control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))
            now = moved.now.ToDatetime(tzinfo=UTC)
            after = attestation_pb2.HoldingsStatement.FromString(
                (await client.get_holdings_statement(request)).holdings_statement.payload
            )
            assert after.reason == REASON.HOLDINGS_CHANGE_REASON_REFRESH
            assert after.epoch == before.epoch + 1
            assert _figures(after) == _figures(before)
            assert _times(after)[1] > now

    asyncio.run(scenario())
