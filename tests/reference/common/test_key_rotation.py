"""A party's key rotated and a key revoked while the reference servers sync, without a restart.

The custodian and the exchange run as real processes, each following its own
copy of a signed key registry (PROTOCOL.md §4.6; version 1 signed by two of
three registry officers and pinned by its SHA-256). While the custodian's
yield accruals flow to the exchange, the officers sign version 2, which
registers the custodian's new key and ends the old one a minute later; both
files are replaced, both servers take the version, and the custodian's key
file is replaced by the new key, which signs from then on. Nothing that was
valid is refused: the logs end equal and acknowledged, every entry applied
once, statements of both keys credited. Then version 3 revokes the client's
key from a time R on: a pledge it signed one second before R is accepted,
one signed at R or after is refused KEY_REVOKED. A version signed by one
officer only, and a key file of another party, change nothing but a line in
the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from collateral_sync.clients import CustodianClient, TestControlClient
from collateral_sync.errors import RPCError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.signed_registry import (
    SignedKeyRegistry,
    draft_version,
    sign_version,
    write_chain,
)
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE
from collateral_sync.v1 import common_pb2, envelope_pb2, errors_pb2, keys_pb2, test_control_pb2
from google.protobuf import duration_pb2

from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    Parties,
    ServerProcess,
    StartServer,
    serve_custodian_once,
)
from .test_crash_recovery import (
    custodian_config,
    database,
    exchange_config,
    generate,
    heads,
    pledge_every_account,
    pledge_request,
    run,
    settled,
    until,
)

ACCOUNTS = 40
OFFICERS = [
    SigningKey.generate(f"officer-{i}", common_pb2.PARTY_ROLE_KEY_REGISTRY) for i in range(3)
]
OVERLAP = timedelta(minutes=1)


def _version(
    number: int, keys: list[keys_pb2.PartyKey], at: datetime, *signers: int
) -> keys_pb2.SignedKeyRegistryVersion:
    signed = draft_version(
        version=number,
        issued_at=at,
        keys=keys,
        registry_keys=[o.party_key(at - timedelta(days=1)) for o in OFFICERS],
        threshold=2,
    )
    for i in signers:
        sign_version(signed, OFFICERS[i])
    return signed


def _publish(files: list[Path], *versions: keys_pb2.SignedKeyRegistryVersion) -> None:
    for path in files:
        write_chain(path, keys_pb2.KeyRegistryChain(versions=list(versions)))


def _wait_for_log(server: ServerProcess, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {text!r}\n{server.log_text()[-3000:]}")
        time.sleep(0.05)


async def _server_now(control: TestControlClient) -> datetime:
    reply = await control.advance_clock(
        test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
    )
    return reply.now.ToDatetime(tzinfo=UTC)


def _signing_keys_credited(exchange_db: dict[str, object]) -> set[str]:
    """The key ids that signed the holdings statements the exchange credited."""
    with database(exchange_db, live=True) as db:
        rows = db.execute(
            "SELECT envelope FROM exchange_holdings WHERE status = 'credited'"
        ).fetchall()
    return {envelope_pb2.Envelope.FromString(bytes(r[0])).signatures[0].key_id for r in rows}


@pytest.mark.slow
def test_a_key_rotated_and_a_key_revoked_while_syncing(
    reference_parties: Parties,
    start_server: StartServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    parties = reference_parties
    directory = tmp_path_factory.mktemp("rotation")
    account_ids = [f"acct-{i:03d}" for i in range(ACCOUNTS)]
    started = datetime.now(UTC) - timedelta(minutes=5)
    first_keys = list(parties.registry)
    v1 = _version(1, first_keys, started, 0, 1)
    root = SignedKeyRegistry.verify(keys_pb2.KeyRegistryChain(versions=[v1])).root_sha256
    files = [directory / "custodian-registry.json", directory / "exchange-registry.json"]
    _publish(files, v1)
    custodian_key = directory / "custodian.key.json"
    shutil.copy(parties.key_path(CUSTODIAN), custodian_key)

    # At full speed: the servers' own sync settings, not the crash test's slowed ones.
    config = custodian_config(parties, directory, account_ids)
    del config["sync"]
    config.update(
        key_registry=str(files[0]), key_registry_root=root, signing_key=str(custodian_key)
    )
    custodian = start_server("custodian", config, name="rotation-custodian")
    config = exchange_config(parties, directory, custodian.address)
    del config["sync"]
    config.update(key_registry=str(files[1]), key_registry_root=root)
    exchange = start_server("exchange", config, name="rotation-exchange")
    exchange_db = parties.storage(directory, EXCHANGE)
    old_key = parties.keys[CUSTODIAN]
    new_key = SigningKey.generate(CUSTODIAN, common_pb2.PARTY_ROLE_CUSTODIAN)

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
            custodians = CustodianClient(to_custodian)
            # The last two accounts are pledged while the client's key is revoked.
            await pledge_every_account(parties, custodians, account_ids[:-2])
            back, stop = asyncio.Event(), asyncio.Event()
            back.set()
            generator = asyncio.create_task(generate(custodian_control, back, stop))
            try:
                await until(
                    lambda: _received_at_least(exchange_control, 300), "300 entries at the exchange"
                )
                # A version one officer signed is no version: both servers keep version 1.
                now = await _server_now(custodian_control)
                registry = KeyRegistry(first_keys)
                registry.rotate(old_key.key_id, new_key.party_key(valid_from=now), at=now + OVERLAP)
                rotated = list(registry.to_proto().keys)
                _publish(files, v1, _version(2, rotated, now, 2))
                for server in (custodian, exchange):
                    await asyncio.to_thread(
                        _wait_for_log, server, "version 1 stays in force: version 2 of the key"
                    )
                # Signed by two: in force at both, without a restart.
                _publish(files, v1, v2 := _version(2, rotated, now, 1, 2))
                for server in (custodian, exchange):
                    await asyncio.to_thread(
                        _wait_for_log, server, "key registry version 2 in force (was 1)"
                    )
                # Another party's key in the key file is refused; the custodian's new key is not.
                parties.keys[EXCHANGE].save(custodian_key)
                await asyncio.to_thread(
                    _wait_for_log, custodian, "changed but is not used, key " + old_key.key_id
                )
                new_key.save(custodian_key)
                await asyncio.to_thread(
                    _wait_for_log,
                    custodian,
                    f"signing key {new_key.key_id} now signs (was {old_key.key_id})",
                )
                sent = (await heads(custodian_control))[CUSTODIAN_TO_EXCHANGE].sequence
                await until(
                    lambda: _received_at_least(exchange_control, sent + 300),
                    "300 more entries at the exchange, signed with the new key",
                )
                stop.set()
                async with asyncio.timeout(30):
                    await generator
            finally:
                generator.cancel()
                await asyncio.gather(generator, return_exceptions=True)

            # Nothing that was valid was refused: everything sent is applied, once.
            c, e = await settled(custodian_control, exchange_control, exchange_db)
            assert e[CUSTODIAN_TO_EXCHANGE].applied_count == c[CUSTODIAN_TO_EXCHANGE].sequence
            assert _signing_keys_credited(exchange_db) == {old_key.key_id, new_key.key_id}
            for server in (custodian, exchange):
                assert "KEY_NOT_VALID" not in server.log_text()
                assert "KEY_UNKNOWN" not in server.log_text()

            # Version 3 revokes the client's key from R on.
            revoke_at = await _server_now(custodian_control)
            registry = KeyRegistry(rotated)
            registry.revoke(parties.keys[CLIENT].key_id, revoke_at)
            _publish(files, v1, v2, _version(3, list(registry.to_proto().keys), revoke_at, 0, 2))
            await asyncio.to_thread(_wait_for_log, custodian, "key registry version 3 in force")
            sequence = ACCOUNTS - 1
            await custodians.pledge_collateral(
                pledge_request(
                    parties,
                    account_ids[-2],
                    sequence=sequence,
                    now=revoke_at - timedelta(seconds=1),
                )
            )
            for offset in (timedelta(0), timedelta(seconds=1)):
                sequence += 1
                with pytest.raises(RPCError) as refused:
                    await custodians.pledge_collateral(
                        pledge_request(
                            parties,
                            account_ids[-1],
                            sequence=sequence,
                            now=revoke_at + offset,
                        )
                    )
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert refused.value.reason == errors_pb2.ERROR_REASON_KEY_REVOKED

    run(scenario())


async def _received_at_least(control: TestControlClient, count: int) -> bool:
    return (await heads(control))[CUSTODIAN_TO_EXCHANGE].sequence >= count


def test_a_restart_on_an_older_or_other_registry_is_refused(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    """The version in force is kept in the server's storage: a restart cannot go back on it."""
    parties = reference_parties
    at = datetime.now(UTC) - timedelta(minutes=5)
    keys = list(parties.registry)
    v1 = _version(1, keys, at, 0, 1)
    v2 = _version(2, keys, at + timedelta(minutes=1), 1, 2)
    registry = tmp_path / "registry.json"
    _publish([registry], v1, v2)
    config = parties.config(CUSTODIAN, "custodian", tmp_path, peers={EXCHANGE: None}, custodian={})
    config["key_registry"] = str(registry)
    server = start_server("custodian", config, name="registry-restart")
    _wait_for_log(server, "key registry version 2 in force")
    server.stop()
    path = tmp_path / "custodian.json"
    path.write_text(json.dumps(config))

    _publish([registry], v1)
    result = serve_custodian_once(path)
    assert result.returncode == 2, result.stderr
    assert "ends at version 1, but version 2 was in force" in result.stderr
    assert "a rollback is refused" in result.stderr

    # The same number, other bytes: another history.
    other = _version(2, keys, at + timedelta(minutes=2), 0, 2)
    _publish([registry], v1, other)
    result = serve_custodian_once(path)
    assert result.returncode == 2, result.stderr
    assert "version 2 of the signed registry is not the one that was in force" in result.stderr

    # The chain it had, and one that extends it, start.
    _publish([registry], v1, v2, _version(3, keys, at + timedelta(minutes=3), 0, 1))
    server.start()
    _wait_for_log(server, "key registry version 3 in force")
