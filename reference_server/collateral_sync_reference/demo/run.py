"""``make demo``: the reference custodian, exchange and regulator as real processes, their story told.

The demo sets everything up as an operator would — Ed25519 keys with
``collateral-sync keygen``, a development PKI with ``collateral-sync
dev-certs``, one JSON configuration per server — then starts the custodian,
the exchange and the regulator as separate ``collateral-sync serve``
processes (test mode, SQLite on disk, loopback, mutual TLS between them and
towards the demo). It walks the lifecycle through public interfaces only
(:mod:`collateral_sync_reference.demo.story`): pledge, attestation and proofs,
credit, exposure, a margin call and its partial dispute, a top-up that
satisfies it and resolves the dispute, daily yield, liquidation with yield
first, the shortfall waterfall; then
(:mod:`collateral_sync_reference.demo.oversight`) a matched reconciliation, an
injected break located to its account, a settlement cycle, part of a pledge
released on the exchange's consent, and an emergency
release by regulator and custodian once the exchange has gone dark, and a
redemption locked for 24 h, refused again while locked, then settled. It ends
by exporting what each party relied on as audit bundles and checking them
offline with ``collateral-sync verify``, once as exported (exit 0) and once
tampered (exit 1).

It runs in a fresh temporary directory, or in ``COLLATERAL_SYNC_DEMO_DIR``
(which must be empty or absent) to keep the keys, databases, logs and bundles.
``--base-port N`` has the servers listen on N, N+1 and N+2 instead of ports
the system picks. Exit codes: 0 done; 1 a step failed (one message, no
traceback); 2 bad arguments or a ``--base-port`` port in use (one line); 130
interrupted. Every server it started is stopped in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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


#: Server roles in the order they take ports from ``--base-port N``: N, N+1, N+2.
ROLES = ("custodian", "exchange", "regulator")


class PortInUseError(OSError):
    """A port ``--base-port`` asks for is already taken."""


def _fixed_addresses(base_port: int) -> dict[str, str]:
    """Each server's address from ``--base-port``; PortInUseError if one is taken."""
    addresses = {}
    for offset, role in enumerate(ROLES):
        port = base_port + offset
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as err:
                raise PortInUseError(
                    f"port {port} (for the {role}, --base-port {base_port} + {offset}) "
                    f"is in use on 127.0.0.1: {err.strerror}; choose another --base-port"
                ) from err
        addresses[role] = f"127.0.0.1:{port}"
    return addresses


def _reserve_address() -> tuple[socket.socket, str]:
    """A loopback port held bound until the regulator takes it over.

    The regulator's address goes into the other two files before it starts;
    held, the port cannot be handed to them when they ask for any free one.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


_Bundles = tuple[audit_pb2.AuditBundle, audit_pb2.AuditBundle, audit_pb2.AuditBundle]


def _opening() -> None:
    say.opening(
        f"The assets stay at the custodian: {CUSTODIAN} holds {CLIENT}'s BTC, USDC, BENJI and "
        f"TSLAx in its custody accounts, and they never move to the exchange."
    )
    say.opening(
        f"{EXCHANGE} holds none of them: it grants credit and trades against {CUSTODIAN}'s "
        "signed attestations, each provable in an append-only log."
    )


def run(workdir: Path, base_port: int | None = None) -> None:
    """The whole demo in ``workdir`` (created if absent; it must be empty).

    With ``base_port`` the custodian, exchange and regulator listen on it and
    the next two ports (PortInUseError, before anything starts, if one is
    taken); without it, on ports the system picks.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise StateError(
            f"{workdir}: expected an empty directory (the demo starts from nothing), it has files",
            metadata={"expected": "an empty directory", "actual": "not empty"},
        )
    fixed = None if base_port is None else _fixed_addresses(base_port)
    _opening()
    registry = _set_up(workdir)
    # Yield accrues a few minutes after the start: the demo then moves the clocks only that far.
    yield_time = (datetime.now(UTC) + YIELD_LEAD).time().replace(second=0, microsecond=0)
    cutoffs = cutoffs_after(yield_time)
    reserved: socket.socket | None = None
    if fixed is None:
        reserved, regulator_address = _reserve_address()
    else:
        # Nothing to hold: the regulator's port is known before any server starts.
        regulator_address = fixed["regulator"]

    def listening(role: str, config: dict[str, Any]) -> dict[str, Any]:
        return config if fixed is None else {**config, "listen": fixed[role]}

    with contextlib.ExitStack() as held, Servers(workdir) as servers:
        if reserved is not None:
            held.enter_context(reserved)
        custodian = servers.start(
            "custodian",
            write_config(
                workdir / "custodian.json",
                listening("custodian", custodian_config(yield_time, regulator_address, cutoffs)),
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
                listening(
                    "exchange", exchange_config(custodian.address, regulator_address, cutoffs)
                ),
            ),
        )
        say.step(
            f"{EXCHANGE} serves on {exchange.address} (pid {exchange.pid}) and dials "
            f"{CUSTODIAN}'s position-sync stream over mutual TLS"
        )
        if reserved is not None:
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

        async def custodian_goes_down() -> None:
            await asyncio.to_thread(custodian.kill)

        async def custodian_comes_back() -> int:
            # The same database, and the address the exchange dials.
            document = json.loads(custodian.config.read_text(encoding="utf-8"))
            write_config(custodian.config, {**document, "listen": custodian.address})
            await asyncio.to_thread(custodian.start)
            return custodian.pid

        addresses = (custodian.address, exchange.address, regulator.address)
        bundles = _INTERRUPT.run_async(
            lambda: _run_story(
                workdir,
                registry,
                addresses,
                yield_time,
                cutoffs=cutoffs,
                exchange_goes_dark=exchange_goes_dark,
                custodian_goes_down=custodian_goes_down,
                custodian_comes_back=custodian_comes_back,
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
    custodian_goes_down: Callable[[], Coroutine[Any, Any, None]],
    custodian_comes_back: Callable[[], Coroutine[Any, Any, int]],
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
            custodian_goes_down=custodian_goes_down,
            custodian_comes_back=custodian_comes_back,
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
    say.section("19. Audit: what each party relied on, verified offline")
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


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535 - (len(ROLES) - 1):
        raise argparse.ArgumentTypeError(
            f"expected a port from 1 to {65535 - (len(ROLES) - 1)}, got {port}"
        )
    return port


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m collateral_sync_reference.demo",
        description=(
            "Start a reference custodian, exchange and regulator (test mode, mutual TLS on "
            "loopback) and tell the seed story through their public interfaces. It runs in a "
            "fresh temporary directory, or in COLLATERAL_SYNC_DEMO_DIR (empty or absent) to "
            "keep its keys, databases, logs and audit bundles."
        ),
        epilog="Exit codes: 0 done; 1 a step failed; 2 bad arguments or a port in use; "
        "130 interrupted.",
    )
    parser.add_argument(
        "--base-port",
        type=_port,
        metavar="N",
        help=(
            "listen on 127.0.0.1 ports N (custodian), N+1 (exchange) and N+2 (regulator) "
            "instead of ports the system picks; a port in use ends the demo with exit code 2 "
            "before any server starts"
        ),
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(argv)
    started = monotonic()
    previous = {
        signum: signal.signal(signum, _INTERRUPT.handler)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    keep = os.environ.get("COLLATERAL_SYNC_DEMO_DIR")
    try:
        if keep:
            run(Path(keep), arguments.base_port)
        else:
            with tempfile.TemporaryDirectory(prefix="collateral-sync-demo-") as tmp:
                run(Path(tmp), arguments.base_port)
    except KeyboardInterrupt:
        _fail("\ndemo interrupted; every server it started was stopped", 130)
    except RPCError as err:
        _fail(f"\ndemo failed: a server answered {err.code.name} {err.reason_name}: {err.message}")
    except CollateralSyncError as err:
        _fail(f"\ndemo failed: {err.reason_name}: {err.message}")
    except PortInUseError as err:
        _fail(f"demo: {err}", 2)
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
