"""TLS material rotated without a restart, SDK side, and client certificates out of their dates.

:class:`ReloadableTls` on its own (what it takes, what it keeps and says), a
reloading channel and a reloading server against real grpc.aio servers on
port 0, and the clear refusal of an expired or not yet valid client
certificate before any connection.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from _certificates import issue, replace, served_certificate
from collateral_sync.clients import ExchangeClient
from collateral_sync.dev_ca import DevPki, create_dev_pki
from collateral_sync.errors import MalformedError, RPCError, VerificationError
from collateral_sync.server import create_server, serve
from collateral_sync.transport import (
    ReloadableTls,
    TlsConfig,
    check_client_certificate,
    secure_channel,
)
from collateral_sync.v1 import envelope_pb2, errors_pb2, exchange_service_pb2
from collateral_sync.v1 import exchange_service_pb2_grpc as exchange_grpc
from cryptography import x509

_T = TypeVar("_T")

CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"
#: Where the SDK logs what it reloads and what it refuses.
LOGGER = "collateral_sync.transport"


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@dataclass(frozen=True)
class LiveFiles:
    """A party's TLS files where a rotation replaces them: copies, not the PKI's own."""

    ca: Path
    cert: Path
    key: Path

    def reloadable(self, **kwargs: Any) -> ReloadableTls:
        return ReloadableTls(self.ca, self.cert, self.key, **kwargs)


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return create_dev_pki(tmp_path / "pki", parties=[CUSTODIAN, EXCHANGE])


def live(pki: DevPki, party_id: str, directory: Path) -> LiveFiles:
    directory.mkdir(exist_ok=True)
    files = LiveFiles(
        ca=directory / "ca.pem",
        cert=directory / f"{party_id}.pem",
        key=directory / f"{party_id}.key",
    )
    shutil.copy(pki.ca_cert, files.ca)
    shutil.copy(pki.party(party_id).cert, files.cert)
    shutil.copy(pki.party(party_id).key, files.key)
    return files


def serial(material: TlsConfig) -> int:
    return x509.load_pem_x509_certificate(material.cert_chain).serial_number


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


class EchoPeer(exchange_grpc.ExchangeServiceServicer):
    """Answers GetCreditLine with the serial (hex) of the client certificate it was shown."""

    async def GetCreditLine(
        self, request: exchange_service_pb2.GetCreditLineRequest, context: grpc.aio.ServicerContext
    ) -> exchange_service_pb2.GetCreditLineResponse:
        pem = context.auth_context()["x509_pem_cert"][0]
        shown = x509.load_pem_x509_certificate(pem).serial_number
        return exchange_service_pb2.GetCreditLineResponse(
            credit_line=envelope_pb2.Envelope(payload_type=f"{shown:x}")
        )


async def presented(client: ExchangeClient) -> int:
    response = await client.get_credit_line(exchange_service_pb2.GetCreditLineRequest())
    return int(response.credit_line.payload_type, 16)


# --- a client certificate out of its dates ------------------------------------------


def test_an_expired_client_certificate_is_refused_before_any_connection(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    old = create_dev_pki(tmp_path, parties=[CUSTODIAN], valid_days=1, now=now - timedelta(days=10))
    tls = TlsConfig.from_dev_pki(old, CUSTODIAN)
    not_after = x509.load_pem_x509_certificate(tls.cert_chain).not_valid_after_utc
    # Nothing listens on port 1: the refusal cannot have come from a server.
    with pytest.raises(VerificationError) as info:
        secure_channel("localhost:1", tls)
    message = info.value.message
    assert message.startswith(f"client certificate {old.party(CUSTODIAN).cert} (CN={CUSTODIAN})")
    assert f"expired at {not_after:%Y-%m-%dT%H:%M:%SZ}" in message
    assert "renew it" in message
    assert info.value.reason == errors_pb2.ERROR_REASON_KEY_NOT_VALID
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_certificate_not_yet_valid_is_refused(tmp_path: Path) -> None:
    later = create_dev_pki(tmp_path, parties=[CUSTODIAN], now=datetime.now(UTC) + timedelta(days=2))
    tls = TlsConfig.from_dev_pki(later, CUSTODIAN)
    with pytest.raises(
        VerificationError, match=r"is not valid before .* check this machine's clock"
    ):
        secure_channel("localhost:1", tls)
    # Valid at a moment within its dates.
    check_client_certificate(tls, now=datetime.now(UTC) + timedelta(days=3))


def test_a_server_refusing_the_client_certificate_is_named_as_such(
    pki: DevPki, tmp_path: Path
) -> None:
    foreign = create_dev_pki(tmp_path / "foreign", parties=[CUSTODIAN])
    # Trusts the server's CA, presents a certificate the server does not trust.
    outsider = TlsConfig(
        pki.ca_cert.read_bytes(),
        foreign.party(CUSTODIAN).cert.read_bytes(),
        foreign.party(CUSTODIAN).key.read_bytes(),
    )

    async def scenario() -> None:
        server = create_server(tls=TlsConfig.from_dev_pki(pki, EXCHANGE), servicers=[EchoPeer()])
        async with serve(server) as port, secure_channel(f"localhost:{port}", outsider) as channel:
            with pytest.raises(RPCError) as info:
                await ExchangeClient(channel).get_credit_line(
                    exchange_service_pb2.GetCreditLineRequest(), timeout=5
                )
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "Socket closed" in info.value.message
        assert "the server closed the connection during the TLS handshake" in info.value.message

    run(scenario())


# --- ReloadableTls --------------------------------------------------------------------


def test_unchanged_files_are_not_read_again(pki: DevPki, tmp_path: Path) -> None:
    files = live(pki, CUSTODIAN, tmp_path / "live")
    tls = files.reloadable()
    first = tls.current()
    assert tls.current() is first
    # Rewritten with the same bytes (another inode, other times): the same material.
    replace(files.cert, files.cert.read_bytes())
    assert tls.current() is first


def test_replaced_files_are_taken_and_logged(
    pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    files = live(pki, CUSTODIAN, tmp_path / "live")
    changes: list[TlsConfig] = []
    tls = files.reloadable(on_change=changes.append)
    before = tls.current()
    new = issue(pki, CUSTODIAN)
    replace(files.key, new.key)
    replace(files.cert, new.cert)
    after = tls.current()
    assert serial(after) == new.certificate.serial_number != serial(before)
    assert after.cert_file == str(files.cert)
    assert changes == [after]
    [line] = messages(caplog, logging.INFO)
    assert f"certificate {files.cert}" in line
    assert f"serial {new.certificate.serial_number:x}" in line
    assert f"trust bundle {files.ca} (1 certificate)" in line


def test_half_written_and_inconsistent_files_keep_the_previous_material(
    pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    files = live(pki, CUSTODIAN, tmp_path / "live")
    tls = files.reloadable()
    before = tls.current()
    new = issue(pki, CUSTODIAN)
    # Written in place, not renamed: a reader can see the file cut short.
    files.cert.write_bytes(new.cert[: len(new.cert) // 2])
    for _ in range(3):
        assert tls.current() is before
    [half] = messages(caplog, logging.WARNING)
    assert f"{files.cert}: 1 PEM BEGIN line(s) but 0 END line(s)" in half
    assert "half-written" in half
    assert f"serial {serial(before):x}" in half  # what stays in use
    # The whole certificate, but the key is still the old one.
    files.cert.write_bytes(new.cert)
    assert tls.current() is before
    assert tls.current() is before
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert f"{files.key} is not the private key of the certificate {files.cert}" in warnings[1]
    # The key arrives: the pair is taken.
    files.key.write_bytes(new.key)
    assert serial(tls.current()) == new.certificate.serial_number
    assert len(messages(caplog, logging.WARNING)) == 2
    assert len(messages(caplog, logging.INFO)) == 1


def test_a_swapped_directory_link_replaces_all_three_files_at_once(
    pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # docs/OPERATIONS.md: one directory per version, the configuration names a link.
    first = live(pki, CUSTODIAN, tmp_path / "v1")
    second = live(pki, CUSTODIAN, tmp_path / "v2")
    new = issue(pki, CUSTODIAN)
    second.cert.write_bytes(new.cert)
    second.key.write_bytes(new.key)
    (tmp_path / "current").symlink_to("v1")
    linked = tmp_path / "current"
    tls = ReloadableTls(linked / first.ca.name, linked / first.cert.name, linked / first.key.name)
    before = tls.current()
    (tmp_path / "current.new").symlink_to("v2")
    (tmp_path / "current.new").replace(linked)
    assert serial(tls.current()) == new.certificate.serial_number != serial(before)
    assert messages(caplog, logging.WARNING) == []


def test_a_missing_file_keeps_the_previous_material(
    pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = live(pki, CUSTODIAN, tmp_path / "live")
    tls = files.reloadable()
    before = tls.current()
    files.key.unlink()
    assert tls.current() is before
    assert tls.current() is before
    [line] = messages(caplog, logging.WARNING)
    assert f"cannot read {files.key}" in line


def test_accept_refuses_a_replacement(
    pki: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def only_the_custodian(material: TlsConfig) -> None:
        if material.party_id != CUSTODIAN:
            raise MalformedError(f"CN {material.party_id!r}, expected {CUSTODIAN!r}")

    files = live(pki, CUSTODIAN, tmp_path / "live")
    tls = files.reloadable(accept=only_the_custodian)
    before = tls.current()
    replace(files.key, pki.party(EXCHANGE).key.read_bytes())
    replace(files.cert, pki.party(EXCHANGE).cert.read_bytes())
    assert tls.current() is before
    [line] = messages(caplog, logging.WARNING)
    assert f"CN {EXCHANGE!r}, expected {CUSTODIAN!r}" in line


# --- channels and servers made from ReloadableTls --------------------------------------


def test_a_reloading_channel_presents_the_replaced_certificate_on_new_connections(
    pki: DevPki, tmp_path: Path
) -> None:
    files = live(pki, CUSTODIAN, tmp_path / "live")
    original = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
    new = issue(pki, CUSTODIAN)

    async def scenario() -> None:
        server = create_server(tls=TlsConfig.from_dev_pki(pki, EXCHANGE), servicers=[EchoPeer()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", files.reloadable()) as channel,
        ):
            client = ExchangeClient(channel)
            assert await presented(client) == original
            replace(files.key, new.key)
            replace(files.cert, new.cert)
            assert await presented(client) == new.certificate.serial_number
            assert await presented(client) == new.certificate.serial_number
            assert channel.dialled == 2

    run(scenario())


def test_a_reloading_channel_refuses_calls_once_its_certificate_expired(
    pki: DevPki, tmp_path: Path
) -> None:
    files = live(pki, CUSTODIAN, tmp_path / "live")
    now = datetime.now(UTC)
    expired = issue(pki, CUSTODIAN, not_before=now - timedelta(days=10), not_after=now)

    async def scenario() -> None:
        # Nothing listens on port 1: the refusal is the channel's own.
        async with secure_channel("localhost:1", files.reloadable()) as channel:
            replace(files.key, expired.key)
            replace(files.cert, expired.cert)
            with pytest.raises(VerificationError) as info:
                await ExchangeClient(channel).get_credit_line(
                    exchange_service_pb2.GetCreditLineRequest()
                )
        assert info.value.message.startswith(f"client certificate {files.cert} (CN={CUSTODIAN})")
        assert "expired at" in info.value.message

    run(scenario())


def test_a_reloading_server_serves_the_replaced_certificate_to_new_connections(
    pki: DevPki, tmp_path: Path
) -> None:
    files = live(pki, EXCHANGE, tmp_path / "live")
    client = pki.party(CUSTODIAN)
    original = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
    new = issue(pki, EXCHANGE)

    async def served(port: int) -> int:
        cert = await asyncio.to_thread(
            served_certificate, port, ca=pki.ca_cert, cert=client.cert, key=client.key
        )
        return cert.serial_number

    async def scenario() -> None:
        server = create_server(tls=files.reloadable(), servicers=[EchoPeer()])
        async with (
            serve(server) as port,
            secure_channel(f"localhost:{port}", TlsConfig.from_dev_pki(pki, CUSTODIAN)) as opened,
        ):
            assert await presented(ExchangeClient(opened)) == client_serial(pki)
            assert await served(port) == original
            replace(files.key, new.key)
            replace(files.cert, new.cert)
            assert await served(port) == new.certificate.serial_number
            # The connection opened before keeps working.
            assert await presented(ExchangeClient(opened)) == client_serial(pki)

    run(scenario())


def client_serial(pki: DevPki) -> int:
    return x509.load_pem_x509_certificate(pki.party(CUSTODIAN).cert.read_bytes()).serial_number
