"""``make demo``: the reference custodian, exchange and regulator as real processes, their story told.

The demo sets everything up as an operator would — Ed25519 keys with
``collateral-sync keygen``, a development PKI with ``collateral-sync
dev-certs``, one JSON configuration per server — then starts the custodian,
the exchange and the regulator as separate ``collateral-sync serve``
processes (test mode, SQLite on disk, loopback, mutual TLS between them and
towards the demo). It walks the lifecycle through public interfaces only
(:mod:`collateral_sync_reference.demo.story`): pledge, attestation and proofs, credit,
exposure, a margin call and its partial dispute, a top-up, daily yield,
liquidation with yield first, the shortfall waterfall; then
(:mod:`collateral_sync_reference.demo.oversight`) a matched reconciliation, an
injected break located to its account, a settlement cycle, and an emergency
release by regulator and custodian once the exchange has gone dark. It ends
by exporting what each party relied on as audit bundles and checking them
offline with ``collateral-sync verify``, once as exported (exit 0) and once
tampered (exit 1).

It runs in a fresh temporary directory, or in ``COLLATERAL_SYNC_DEMO_DIR``
(which must be empty or absent) to keep the keys, databases, logs and bundles.
Exit codes: 0 done; 1 a step failed (one message, no traceback); 130
interrupted. Every server it started is stopped in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, time
from pathlib import Path
from time import monotonic
from types import FrameType
from typing import Any, NoReturn, TypeVar

from collateral_sync.audit import save_audit_bundle
from collateral_sync.clients import (
    CustodianClient,
    EmergencyReleaseClient,
    ExchangeClient,
    RegulatorClient,
    TestControlClient,
)
from collateral_sync.errors import CollateralSyncError, RPCError, StateError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.statements import message_class_of
from collateral_sync.transport import TlsConfig, secure_channel
from collateral_sync.v1 import audit_pb2

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.configs import (
    custodian_config,
    cutoffs_after,
    exchange_config,
    regulator_config,
)
from collateral_sync_reference.demo.facts import edit_quantity
from collateral_sync_reference.demo.oversight import OverseenStory, RegulatorConnections
from collateral_sync_reference.demo.scenario import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    OPERATOR,
    PARTIES,
    REGULATOR,
    YIELD_LEAD,
)
from collateral_sync_reference.demo.servers import ServerProcess, Servers, run_cli, write_config
from collateral_sync_reference.demo.stage import Connections

__all__ = ["main", "run"]

_T = TypeVar("_T")
#: Every unary call the demo makes has this deadline.
_RPC_TIMEOUT = 5.0


def _cli(args: list[str], workdir: Path, *, expect: int = 0) -> list[str]:
    """Run a ``collateral-sync`` command as an operator would; its output lines."""
    say.command(args)
    done = run_cli(args, cwd=workdir)
    lines = (done.stdout + done.stderr).splitlines()
    if done.returncode != expect:
        raise StateError(
            f"collateral-sync {args[0]}: expected exit code {expect}, got {done.returncode}: "
            + " | ".join(lines[-3:]),
            metadata={"expected": str(expect), "actual": str(done.returncode)},
        )
    return lines


def _set_up(workdir: Path) -> KeyRegistry:
    say.section("1. Parties, keys and mutual TLS")
    for party_id, role in PARTIES.items():
        _cli(["keygen", "--party", party_id, "--role", role, "--out", "keys"], workdir)
    registry = KeyRegistry.load(workdir / "keys" / "registry.json")
    for key in registry:
        say.detail(f"{key.party_id:<12} Ed25519 key {key.key_id[:16]}... in keys/registry.json")
    parties = [CUSTODIAN, EXCHANGE, REGULATOR, CLIENT, OPERATOR]
    _cli(["dev-certs", "--out", "pki", "--party", *parties], workdir)
    say.detail(f"a development CA and a certificate for each of {', '.join(parties)}")
    return registry


def _reserve_address() -> tuple[socket.socket, str]:
    """A loopback port held bound until the regulator takes it over.

    The regulator's address goes into the other two files before it starts;
    held, the port cannot be handed to them when they ask for any free one.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


_Bundles = tuple[audit_pb2.AuditBundle, audit_pb2.AuditBundle, audit_pb2.AuditBundle]


def run(workdir: Path) -> None:
    """The whole demo in ``workdir`` (created if absent; it must be empty)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise StateError(
            f"{workdir}: expected an empty directory (the demo starts from nothing), it has files",
            metadata={"expected": "an empty directory", "actual": "not empty"},
        )
    registry = _set_up(workdir)
    # Yield accrues a few minutes after the start: the demo then moves the clocks only that far.
    yield_time = (datetime.now(UTC) + YIELD_LEAD).time().replace(second=0, microsecond=0)
    cutoffs = cutoffs_after(yield_time)
    reserved, regulator_address = _reserve_address()
    with reserved, Servers(workdir) as servers:
        custodian = servers.start(
            "custodian",
            write_config(
                workdir / "custodian.json",
                custodian_config(yield_time, regulator_address, cutoffs),
            ),
        )
        say.step(
            f"{CUSTODIAN} serves on {custodian.address} (pid {custodian.pid}; SQLite "
            f"{CUSTODIAN}.sqlite; log custodian.log)"
        )
        exchange = servers.start(
            "exchange",
            write_config(
                workdir / "exchange.json",
                exchange_config(custodian.address, regulator_address, cutoffs),
            ),
        )
        say.step(
            f"{EXCHANGE} serves on {exchange.address} (pid {exchange.pid}) and dials "
            f"{CUSTODIAN}'s position-sync stream over mutual TLS"
        )
        reserved.close()
        regulator = servers.start(
            "regulator",
            write_config(
                workdir / "regulator.json",
                regulator_config(regulator_address, custodian.address, exchange.address),
            ),
        )
        say.step(
            f"{REGULATOR} serves on {regulator.address} (pid {regulator.pid}); at each "
            f"reconciliation cut-off it receives both parties' statements and may ask each for "
            "its position tree"
        )

        async def exchange_goes_dark() -> int | None:
            return await asyncio.to_thread(exchange.stop)

        addresses = (custodian.address, exchange.address, regulator.address)
        bundles = _INTERRUPT.run_async(
            lambda: _run_story(
                workdir,
                registry,
                addresses,
                yield_time,
                cutoffs=cutoffs,
                exchange_goes_dark=exchange_goes_dark,
            )
        )
        stopped = servers.stop_all()
    _audit(workdir, bundles, stopped)


async def _run_story(
    workdir: Path,
    registry: KeyRegistry,
    addresses: tuple[str, str, str],
    yield_time: time,
    *,
    cutoffs: tuple[time, time],
    exchange_goes_dark: Callable[[], Coroutine[Any, Any, int | None]],
) -> _Bundles:
    custodian_address, exchange_address, regulator_address = addresses
    pki = workdir / "pki"

    def tls(party_id: str) -> TlsConfig:
        return TlsConfig.from_files(
            pki / "ca.pem", pki / f"{party_id}.pem", pki / f"{party_id}.key"
        )

    client_key = SigningKey.load(workdir / "keys" / f"{CLIENT}.key.json")
    regulator_key = SigningKey.load(workdir / "keys" / f"{REGULATOR}.key.json")
    async with (
        secure_channel(custodian_address, tls(CLIENT)) as as_client_to_custodian,
        secure_channel(exchange_address, tls(CLIENT)) as as_client_to_exchange,
        secure_channel(custodian_address, tls(OPERATOR)) as as_operator_to_custodian,
        secure_channel(exchange_address, tls(OPERATOR)) as as_operator_to_exchange,
        secure_channel(regulator_address, tls(OPERATOR)) as as_operator_to_regulator,
        secure_channel(custodian_address, tls(REGULATOR)) as as_regulator_to_custodian,
    ):
        connections = Connections(
            custodian=CustodianClient(as_client_to_custodian, default_timeout=_RPC_TIMEOUT),
            exchange=ExchangeClient(as_client_to_exchange, default_timeout=_RPC_TIMEOUT),
            custodian_control=TestControlClient(
                as_operator_to_custodian, default_timeout=_RPC_TIMEOUT
            ),
            exchange_control=TestControlClient(
                as_operator_to_exchange, default_timeout=_RPC_TIMEOUT
            ),
            regulator_control=TestControlClient(
                as_operator_to_regulator, default_timeout=_RPC_TIMEOUT
            ),
        )
        oversight = RegulatorConnections(
            regulator=RegulatorClient(as_operator_to_regulator, default_timeout=_RPC_TIMEOUT),
            custodian_as_regulator=CustodianClient(
                as_regulator_to_custodian, default_timeout=_RPC_TIMEOUT
            ),
            custodian_cosigner=EmergencyReleaseClient(
                as_regulator_to_custodian, default_timeout=_RPC_TIMEOUT
            ),
        )
        story = OverseenStory(
            connections,
            oversight,
            registry,
            client_key,
            yield_time,
            regulator_key=regulator_key,
            cutoffs=cutoffs,
            exchange_goes_dark=exchange_goes_dark,
        )
        await story.run()
        evidence = story.evidence
        return (
            evidence.exchange_bundle(EXCHANGE),
            evidence.custodian_bundle(CUSTODIAN),
            evidence.regulator_bundle(REGULATOR),
        )


def _kinds(bundle: audit_pb2.AuditBundle) -> str:
    counted = Counter(
        message_class_of(e.statement.payload_type).DESCRIPTOR.name for e in bundle.statements
    )
    return ", ".join(f"{count} {name}" for name, count in sorted(counted.items()))


def _audit(
    workdir: Path,
    bundles: _Bundles,
    stopped: list[tuple[ServerProcess, int | None]],
) -> None:
    say.section("16. Audit: what each party relied on, verified offline")
    say.step(
        "the servers are stopped ("
        + ", ".join(f"{server.role} exit code {code}" for server, code in stopped)
        + "): nothing below uses the network"
    )
    for_exchange, for_custodian, for_regulator = bundles
    exchange_path = workdir / "audit-exchange.json"
    save_audit_bundle(for_exchange, exchange_path)
    say.step(
        f"{exchange_path.name}: what {EXCHANGE} relied on: the key registry, "
        f"{len(for_exchange.checkpoints)} checkpoints with {len(for_exchange.consistency_proofs)} "
        f"consistency proofs, {len(for_exchange.attested_statements)} holdings statements with "
        "inclusion proofs"
        + "".join(
            f", {count} {name} signed by {CUSTODIAN}"
            for name, count in sorted(
                Counter(
                    message_class_of(e.statement.payload_type).DESCRIPTOR.name
                    for e in for_exchange.statements
                ).items()
            )
        )
    )
    _verify(workdir, exchange_path, expect=0, show_all=True)
    custodian_path = workdir / "audit-custodian.json"
    save_audit_bundle(for_custodian, custodian_path)
    say.step(
        f"{custodian_path.name}: what {CUSTODIAN} relied on, signed by {EXCHANGE} (the "
        f"release by {REGULATOR} and {CUSTODIAN}): {_kinds(for_custodian)}"
    )
    _verify(workdir, custodian_path, expect=0, show_all=False)
    regulator_path = workdir / "audit-regulator.json"
    save_audit_bundle(for_regulator, regulator_path)
    say.step(
        f"{regulator_path.name}: what {REGULATOR} published and received: {_kinds(for_regulator)}"
    )
    _verify(workdir, regulator_path, expect=0, show_all=True)

    tampered = audit_pb2.AuditBundle()
    tampered.CopyFrom(for_exchange)
    statement = tampered.attested_statements[0].statement
    statement.payload = edit_quantity(statement.payload, "100000", "900000")
    tampered_path = workdir / "audit-exchange-tampered.json"
    save_audit_bundle(tampered, tampered_path)
    say.step(
        f"{tampered_path.name}: the same bundle, BENJI 100,000 edited to 900,000 in its first "
        "holdings statement"
    )
    _verify(workdir, tampered_path, expect=1, show_all=False)


def _verify(workdir: Path, path: Path, *, expect: int, show_all: bool) -> None:
    lines = _cli(["verify", path.name], workdir, expect=expect)
    for line in lines:
        if show_all or not line.startswith("ok "):
            say.detail(line)
    say.detail(f"exit code {expect}")


class _Interrupt:
    """Ctrl-C and SIGTERM, turned into an orderly stop.

    Outside the event loop the handler raises KeyboardInterrupt, which unwinds
    through the ``with Servers`` block like any error. While the story runs it
    only cancels the story's task: an exception raised from a signal handler in
    the middle of gRPC's own code could leave a channel half torn down, whereas
    a cancelled task leaves every call and channel through its normal exits.
    """

    def __init__(self) -> None:
        self.requested = False
        self._in_loop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if not self._in_loop:
            raise KeyboardInterrupt
        if self._loop is not None and self._task is not None:
            # A loop already closing needs no cancel: run_async raises on its way out.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)

    def run_async(self, story: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """``asyncio.run`` the coroutine ``story()`` makes, cancelled on an interrupt."""
        self._in_loop = True
        try:
            return asyncio.run(self._guarded(story))
        except asyncio.CancelledError:
            if self.requested:
                raise KeyboardInterrupt from None
            raise
        finally:
            self._in_loop = False
            self._loop = self._task = None
            if self.requested:
                raise KeyboardInterrupt

    async def _guarded(self, story: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self.requested:  # it came while the loop was being set up
            raise asyncio.CancelledError
        return await story()


_INTERRUPT = _Interrupt()


def main() -> None:
    started = monotonic()
    previous = {
        signum: signal.signal(signum, _INTERRUPT.handler)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    keep = os.environ.get("COLLATERAL_SYNC_DEMO_DIR")
    try:
        if keep:
            run(Path(keep))
        else:
            with tempfile.TemporaryDirectory(prefix="collateral-sync-demo-") as tmp:
                run(Path(tmp))
    except KeyboardInterrupt:
        _fail("\ndemo interrupted; every server it started was stopped", 130)
    except RPCError as err:
        _fail(f"\ndemo failed: a server answered {err.code.name} {err.reason_name}: {err.message}")
    except CollateralSyncError as err:
        _fail(f"\ndemo failed: {err.reason_name}: {err.message}")
    except OSError as err:
        _fail(f"\ndemo failed: {err}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    where = f"; its files are in {keep}" if keep else ""
    print(f"\nDemo complete in {monotonic() - started:.1f} s{where}.", flush=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)

