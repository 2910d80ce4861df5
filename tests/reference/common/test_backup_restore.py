"""A custodian's PostgreSQL database backed up with pg_dump and restored with pg_restore.

Restored from a backup of its latest state, a custodian resumes sync where it
stopped: nothing lost, nothing applied twice. Restored from an older backup
than its exchange holds, its stream is refused (the exchange's hello claims
entries its log no longer has) and the exchange keeps what it has: a stale
restore is never a silent rewind. docs/OPERATIONS.md says which to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from _postgres import USER, PostgresServer, postgres_bin
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE
from collateral_sync.v1 import test_control_pb2

from ..conftest import CLIENT, CUSTODIAN, EXCHANGE, Parties, ServerProcess, StartServer
from .test_crash_recovery import (
    applied_sequences,
    custodian_config,
    exchange_config,
    heads,
    pending_holdings,
    pledge_every_account,
    until,
)

ACCOUNTS = 20


def _pg_tool(postgres: PostgresServer, tool: str, *arguments: str) -> None:
    bindir = postgres_bin()
    assert bindir is not None
    environment = dict(os.environ, PGPASSWORD=postgres.password)
    subprocess.run(
        [str(bindir / tool), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", USER, *arguments],
        check=True,
        capture_output=True,
        timeout=120,
        env=environment,
    )


def backup(postgres: PostgresServer, database: str, file: Path) -> None:
    """``pg_dump`` in the custom format, as an operator's backup job would."""
    _pg_tool(postgres, "pg_dump", "--format=custom", f"--file={file}", database)


def restore(postgres: PostgresServer, file: Path, key: str) -> dict[str, Any]:
    """``pg_restore`` into a new, empty database; its ``storage`` config section."""
    section = postgres.storage_config(key)
    _pg_tool(
        postgres,
        "pg_restore",
        "--no-owner",
        "--exit-on-error",
        f"--dbname={postgres.database(key)}",
        str(file),
    )
    return section


async def _settled(custodian: TestControlClient, exchange: TestControlClient) -> int:
    """Wait until the exchange holds and has acknowledged all of the custodian's log."""
    final: dict[str, int] = {}

    async def done() -> bool:
        c = (await heads(custodian))[CUSTODIAN_TO_EXCHANGE]
        e = (await heads(exchange))[CUSTODIAN_TO_EXCHANGE]
        final["sent"] = c.sequence
        return (c.sequence, c.entry_hash) == (e.sequence, e.entry_hash) and (
            c.acknowledged_sequence == c.sequence
        )

    await until(done, "the exchange holds and acknowledged the custodian's whole log")
    return final["sent"]


def _restart_on(server: ServerProcess, storage: dict[str, Any]) -> None:
    """Stop ``server`` and start it again on the database ``storage`` names, same address."""
    server.stop()
    config = json.loads(server.config_path.read_text())
    config["storage"] = storage
    server.config_path.write_text(json.dumps(config, indent=2))
    server.start()


def test_a_restored_backup_of_the_latest_state_resumes_sync_and_a_stale_one_is_refused(
    reference_parties: Parties,
    start_server: StartServer,
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    directory = tmp_path_factory.mktemp("backup")
    account_ids = [f"acct-{i:03d}" for i in range(ACCOUNTS)]
    config = custodian_config(parties, directory, account_ids)
    original = str(directory / CUSTODIAN)
    config["storage"] = postgres.storage_config(original)
    custodian = start_server("custodian", config, name="backup-custodian")
    custodian.extra_args = ("--listen", custodian.address)
    exchange = start_server(
        "exchange",
        exchange_config(parties, directory, custodian.address),
        name="backup-exchange",
    )
    exchange_db = parties.storage(directory, EXCHANGE)
    latest, stale = directory / "latest.dump", directory / "stale.dump"

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            to_custodian = await stack.enter_async_context(
                parties.channel(custodian.address, CLIENT)
            )
            to_exchange = await stack.enter_async_context(
                parties.channel(exchange.address, CUSTODIAN)
            )
            custodian_control, exchange_control = (
                TestControlClient(to_custodian),
                TestControlClient(to_exchange),
            )
            await pledge_every_account(parties, CustodianClient(to_custodian), account_ids[:10])
            first = await _settled(custodian_control, exchange_control)
            await asyncio.to_thread(backup, postgres, postgres.database(original), stale)
            await custodian_control.accrue_yield(test_control_pb2.AccrueYieldRequest())
            second = await _settled(custodian_control, exchange_control)
            assert second > first
            # The latest state, quiescent: what a backup at the last commit holds.
            await asyncio.to_thread(backup, postgres, postgres.database(original), latest)

            # 1. Restored from the latest backup: it resumes, and goes on.
            await asyncio.to_thread(
                _restart_on, custodian, restore(postgres, latest, original + "-latest")
            )
            await pledge_every_account(
                parties, CustodianClient(to_custodian), account_ids[10:], first_sequence=11
            )
            await custodian_control.accrue_yield(test_control_pb2.AccrueYieldRequest())
            third = await _settled(custodian_control, exchange_control)
            assert third > second
            assert applied_sequences(exchange_db) == list(range(1, third + 1))
            await until(lambda: _none_pending(exchange_db), "every holdings statement decided")

            # 2. Restored from an older backup than the exchange holds: refused, not rewound.
            await asyncio.to_thread(
                _restart_on, custodian, restore(postgres, stale, original + "-stale")
            )
            restored = (await heads(custodian_control))[CUSTODIAN_TO_EXCHANGE].sequence
            assert restored == first < third
            await until(
                lambda: _logged(custodian, "claims to have received our entries up to"),
                "the restored custodian refused the exchange's hello",
            )
            held = (await heads(exchange_control))[CUSTODIAN_TO_EXCHANGE]
            assert held.sequence == third
            assert applied_sequences(exchange_db) == list(range(1, third + 1))

    asyncio.run(scenario())


async def _none_pending(exchange_db: dict[str, Any]) -> bool:
    return not pending_holdings(exchange_db)


async def _logged(server: ServerProcess, text: str) -> bool:
    return text in server.log_text()
