"""A reference server's TLS files replaced while it serves, and its certificate's expiry watched.

Real custodian processes on port 0, each on copies of its TLS files that the
tests replace as an operator would (docs/OPERATIONS.md, "Certificate
rotation"): the next connection gets the new certificate or trust bundle, the
connections already open keep working, broken files change nothing but a
warning in the log, and a certificate close to its notAfter is a warning at
start. The certificate a server presents is read over a plain ``ssl``
connection (``_certificates.served_certificate``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from _certificates import issue, replace, served_certificate
from collateral_sync.clients import CustodianClient
from collateral_sync.dev_ca import DevPki, create_dev_pki
from collateral_sync.errors import RPCError
from collateral_sync.transport import TlsConfig, secure_channel
from collateral_sync.v1 import custodian_service_pb2
from collateral_sync_reference.common.config import TlsFiles
from collateral_sync_reference.common.tls import (
    EXPIRY_WARNING,
    ServerTls,
    served_certificate_seconds_until_expiry,
    watching,
)
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import CUSTODIAN, EXCHANGE, Parties, ServerProcess, StartServer
from .test_crash_recovery import custodian_config, exchange_config

_T = TypeVar("_T")

_SERVING = health_pb2.HealthCheckResponse.SERVING
#: Each channel its own connections: a new channel must mean a new TLS handshake.
_OWN_CONNECTIONS = [("grpc.use_local_subchannel_pool", 1)]
#: The warning a refused replacement logs, once per version of the files.
_REFUSED = "TLS files changed but cannot be used"


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@dataclass(frozen=True)
class Custodian:
    """A custodian process and the TLS files it serves, which the test may replace."""

    process: ServerProcess
    files: TlsFiles

    @property
    def port(self) -> int:
        return self.process.port


def copy_files(pki: DevPki, party_id: str, directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca=directory / "ca.pem",
        cert=directory / f"{party_id}.pem",
        key=directory / f"{party_id}.key",
    )
    shutil.copy(pki.ca_cert, files.ca)
    shutil.copy(pki.party(party_id).cert, files.cert)
    shutil.copy(pki.party(party_id).key, files.key)
    return files


def tls_section(files: TlsFiles) -> dict[str, str]:
    return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}


def start_custodian(
    start_server: StartServer, parties: Parties, directory: Path, files: TlsFiles
) -> Custodian:
    config = parties.config(CUSTODIAN, "custodian", directory, peers={EXCHANGE: None}, custodian={})
    config["tls"] = tls_section(files)
    return Custodian(start_server("custodian", config, name=directory.name), files)


def wait_for_log(server: ServerProcess, text: str, count: int, timeout: float = 30.0) -> None:
    """Poll ``server``'s log until ``text`` appears ``count`` times (no event crosses processes)."""
    deadline = time.monotonic() + timeout
    while server.log_text().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"not {count}x {text!r} within {timeout} s:\n{server.log_text()}")
        time.sleep(0.05)


@pytest.fixture
def custodian(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Custodian]:
    directory = tmp_path_factory.mktemp("tls-reload")
    files = copy_files(reference_parties.pki, CUSTODIAN, directory / "tls")
    server = start_custodian(start_server, reference_parties, directory, files)
    yield server
    server.process.stop()


async def served_serial(parties: Parties, port: int) -> int:
    """Serial of the certificate a new connection to ``port`` gets (as the exchange)."""
    exchange = parties.pki.party(EXCHANGE)
    cert = await asyncio.to_thread(
        served_certificate, port, ca=parties.pki.ca_cert, cert=exchange.cert, key=exchange.key
    )
    return cert.serial_number


async def healthy(channel: grpc.aio.Channel) -> bool:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return bool(response.status == _SERVING)


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_a_replaced_certificate_reaches_new_connections_and_open_ones_keep_working(
    custodian: Custodian, reference_parties: Parties
) -> None:
    original = serial_of(custodian.files.cert)
    new = issue(reference_parties.pki, CUSTODIAN, not_after=datetime.now(UTC) + timedelta(days=90))

    async def scenario() -> None:
        tls = reference_parties.tls(EXCHANGE)
        address = custodian.process.address
        async with secure_channel(address, tls, options=_OWN_CONNECTIONS) as opened:
            assert await healthy(opened)
            assert await served_serial(reference_parties, custodian.port) == original
            replace(custodian.files.key, new.key)
            replace(custodian.files.cert, new.cert)
            assert (
                await served_serial(reference_parties, custodian.port)
                == new.certificate.serial_number
            )
            assert await healthy(opened)
            async with secure_channel(address, tls, options=_OWN_CONNECTIONS) as fresh:
                assert await healthy(fresh)

    run(scenario())
    log = custodian.process.log_text()
    assert f"TLS files reloaded: certificate {custodian.files.cert}" in log
    assert f"serial {new.certificate.serial_number:x}" in log
    assert _REFUSED not in log
    assert "expires at" not in log  # 90 days left: nothing to warn about


def test_a_replaced_trust_bundle_decides_who_connects_next(
    custodian: Custodian, reference_parties: Parties, tmp_path: Path
) -> None:
    # An exchange certificate from a new CA; it trusts the custodian's CA as before.
    new_ca = create_dev_pki(tmp_path / "new-ca", parties=[EXCHANGE])
    from_new_ca = TlsConfig(
        reference_parties.pki.ca_cert.read_bytes(),
        new_ca.party(EXCHANGE).cert.read_bytes(),
        new_ca.party(EXCHANGE).key.read_bytes(),
    )
    from_old_ca = reference_parties.tls(EXCHANGE)
    address = custodian.process.address

    async def answer(tls: TlsConfig) -> grpc.StatusCode:
        """What a health check on a new connection presenting ``tls`` gets."""
        async with secure_channel(address, tls, options=_OWN_CONNECTIONS) as channel:
            try:
                assert await healthy(channel)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    async def scenario() -> None:
        async with secure_channel(address, from_old_ca, options=_OWN_CONNECTIONS) as opened:
            assert await healthy(opened)
            assert await answer(from_new_ca) == grpc.StatusCode.UNAVAILABLE
            # The new CA only: the old CA's certificates are refused from the next connection.
            replace(custodian.files.ca, new_ca.ca_cert.read_bytes())
            assert await answer(from_new_ca) == grpc.StatusCode.OK
            async with secure_channel(address, from_old_ca, options=_OWN_CONNECTIONS) as refused:
                with pytest.raises(RPCError) as info:
                    await CustodianClient(refused, default_timeout=5).get_checkpoint(
                        custodian_service_pb2.GetCheckpointRequest()
                    )
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "may refuse this client's certificate" in info.value.message
            # Opened under the old bundle: the connection stays.
            assert await healthy(opened)
            # Both CAs, as during a migration from one to the other.
            both = reference_parties.pki.ca_cert.read_bytes() + new_ca.ca_cert.read_bytes()
            replace(custodian.files.ca, both)
            assert await answer(from_old_ca) == grpc.StatusCode.OK
            assert await answer(from_new_ca) == grpc.StatusCode.OK

    run(scenario())
    log = custodian.process.log_text()
    assert f"trust bundle {custodian.files.ca} (1 certificate)" in log
    assert f"trust bundle {custodian.files.ca} (2 certificates)" in log


def test_broken_or_unacceptable_files_keep_the_served_certificate_with_one_warning_each(
    custodian: Custodian, reference_parties: Parties
) -> None:
    pki = reference_parties.pki
    original = serial_of(custodian.files.cert)
    new = issue(pki, CUSTODIAN)
    now = datetime.now(UTC)
    expired = issue(pki, CUSTODIAN, not_before=now - timedelta(days=30), not_after=now)

    async def scenario() -> None:
        port = custodian.port
        # Written in place and caught half-way.
        custodian.files.cert.write_bytes(new.cert[: len(new.cert) // 2])
        assert await served_serial(reference_parties, port) == original
        assert await served_serial(reference_parties, port) == original
        # The whole certificate, but the key is not written yet.
        custodian.files.cert.write_bytes(new.cert)
        assert await served_serial(reference_parties, port) == original
        custodian.files.key.write_bytes(new.key)
        assert await served_serial(reference_parties, port) == new.certificate.serial_number
        # A consistent pair, but expired: peers would refuse it.
        replace(custodian.files.key, expired.key)
        replace(custodian.files.cert, expired.cert)
        assert await served_serial(reference_parties, port) == new.certificate.serial_number
        assert await served_serial(reference_parties, port) == new.certificate.serial_number

    run(scenario())
    refusals = [line for line in custodian.process.log_text().splitlines() if _REFUSED in line]
    assert len(refusals) == 3, refusals
    assert "half-written" in refusals[0]
    assert f"serial {original:x}" in refusals[0]  # what stays in use, named
    assert f"{custodian.files.key} is not the private key" in refusals[1]
    assert "expired at" in refusals[2]
    assert f"serial {new.certificate.serial_number:x}" in refusals[2]


def test_a_certificate_expiring_within_14_days_is_a_warning_at_start(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("tls-expiring")
    soon = create_dev_pki(directory / "pki", parties=[CUSTODIAN], valid_days=3)
    files = copy_files(soon, CUSTODIAN, directory / "tls")
    not_after = x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc
    server = start_custodian(start_server, reference_parties, directory, files)
    try:
        log = server.process.log_text()
    finally:
        server.process.stop()
    [line] = [line for line in log.splitlines() if "expires at" in line]
    assert " WARNING " in line
    assert (
        f"TLS certificate {files.cert} (CN={CUSTODIAN}) expires at "
        f"{not_after:%Y-%m-%dT%H:%M:%SZ} (in 2 days)"
    ) in line


def test_the_served_certificate_expiry_is_there_for_metrics_while_served(
    reference_parties: Parties, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = copy_files(reference_parties.pki, CUSTODIAN, tmp_path / "tls")
    initial = TlsConfig.from_files(files.ca, files.cert, files.key)
    logger = logging.getLogger("test-tls-reload")
    server_tls = ServerTls(files, initial, party_id=CUSTODIAN, logger=logger)
    now = datetime.now(UTC)
    not_after = x509.load_pem_x509_certificate(initial.cert_chain).not_valid_after_utc
    soon = issue(reference_parties.pki, CUSTODIAN, not_after=now + timedelta(days=5))

    async def while_served() -> tuple[float | None, float | None]:
        await asyncio.sleep(0)  # the watch starts
        before = served_certificate_seconds_until_expiry(now)
        replace(files.key, soon.key)
        replace(files.cert, soon.cert)
        return before, served_certificate_seconds_until_expiry(now)

    assert served_certificate_seconds_until_expiry(now) is None
    before, after = run(watching(server_tls, while_served()))
    assert before == (not_after - now).total_seconds()
    assert after is not None
    assert after == (soon.certificate.not_valid_after_utc - now).total_seconds()
    assert after < EXPIRY_WARNING.total_seconds()
    assert served_certificate_seconds_until_expiry(now) is None
    assert server_tls.certificate_not_after == soon.certificate.not_valid_after_utc
    # The reload itself warned of the near expiry.
    assert any("expires at" in r.getMessage() for r in caplog.records if r.name == logger.name)


def test_a_replacement_naming_another_party_is_refused(
    reference_parties: Parties, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = reference_parties.pki
    files = copy_files(pki, CUSTODIAN, tmp_path / "tls")
    initial = TlsConfig.from_files(files.ca, files.cert, files.key)
    server_tls = ServerTls(files, initial, party_id=CUSTODIAN, logger=logging.getLogger("t"))
    replace(files.key, pki.party(EXCHANGE).key.read_bytes())
    replace(files.cert, pki.party(EXCHANGE).cert.read_bytes())
    assert server_tls.material.current() is initial
    assert any(
        f"CN {EXCHANGE!r}, expected the party id {CUSTODIAN!r}" in r.getMessage()
        for r in caplog.records
    )


async def refused(address: str, tls: TlsConfig) -> None:
    async with secure_channel(address, tls, options=_OWN_CONNECTIONS) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await healthy(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_exchange_re_dials_the_custodian_with_its_replaced_certificate(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The exchange's channel to the custodian presents its current certificate on a new connection.

    The exchange's certificate is replaced by one of a new CA, and the
    custodian restarted on its port trusting that CA only: the sync stream
    comes back only over a connection that presents the new certificate.
    """
    parties = reference_parties
    directory = tmp_path_factory.mktemp("tls-redial")
    new_ca = create_dev_pki(directory / "new-ca", parties=[EXCHANGE])
    custodian_files = copy_files(parties.pki, CUSTODIAN, directory / "custodian-tls")
    replace(custodian_files.ca, parties.pki.ca_cert.read_bytes() + new_ca.ca_cert.read_bytes())
    exchange_files = copy_files(parties.pki, EXCHANGE, directory / "exchange-tls")
    config = custodian_config(parties, directory, ["acct-tls"])
    config["tls"] = tls_section(custodian_files)
    custodian = start_server("custodian", config, name="tls-redial-custodian")
    custodian.extra_args = ("--listen", custodian.address)
    config = exchange_config(parties, directory, custodian.address)
    config["tls"] = tls_section(exchange_files)
    exchange = start_server("exchange", config, name="tls-redial-exchange")
    opened = f"sync stream with {EXCHANGE} opened"
    try:
        wait_for_log(custodian, opened, 1)
        replace(exchange_files.key, new_ca.party(EXCHANGE).key.read_bytes())
        replace(exchange_files.cert, new_ca.party(EXCHANGE).cert.read_bytes())
        replace(custodian_files.ca, new_ca.ca_cert.read_bytes())
        assert custodian.stop() == 0
        custodian.start()
        wait_for_log(custodian, opened, 2)
        # What the exchange presented before is refused now: the stream is on the new one.
        run(refused(custodian.address, parties.tls(EXCHANGE)))
    finally:
        exchange.stop()
        custodian.stop()
    new_serial = serial_of(new_ca.party(EXCHANGE).cert)
    assert f"serial {new_serial:x}" in exchange.log_text()  # "TLS files reloaded: ..."
