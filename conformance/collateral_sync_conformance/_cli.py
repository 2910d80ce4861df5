"""``collateral-sync conformance run|list|init``: the kit's command line.

Exit codes: 0 every MUST case passed (and the known-failing list is current);
1 a MUST case failed or erred, or the known-failing list is stale; 2 a usage
error (bad arguments, unreadable files, a target that cannot be reached or,
with ``--wait``, does not report SERVING in time), reported on one line of
stderr naming the option or target at fault, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
import grpc.aio
from collateral_sync import PROTOCOL_VERSION, __version__
from collateral_sync.dev_ca import load_certificate_chain_pem, load_private_key_pem
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.transport import (
    TlsConfig,
    check_client_certificate,
    grpc_core_log_held,
    secure_channel,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collateral_sync_conformance._context import KitConfig, party_role
from collateral_sync_conformance._init import BASE_PORT, InitError, init
from collateral_sync_conformance._registry import (
    REGISTRY,
    Case,
    Registry,
    Role,
    check_glob,
    glob_matches,
    select_cases,
)
from collateral_sync_conformance._report import TerminalReporter, write_reports
from collateral_sync_conformance._runner import (
    EXIT_OK,
    EXIT_USAGE,
    KnownFailing,
    run_cases,
)

__all__ = ["main"]

_PROG = "collateral-sync conformance"


_T = TypeVar("_T")


class UsageError(Exception):
    """A problem with the command line or its input files (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), like every other."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _load_cases() -> Registry:
    # Importing the package registers every case with REGISTRY.
    import collateral_sync_conformance.cases  # noqa: F401, PLC0415

    return REGISTRY


def _globs(values: Sequence[str] | None, option: str, cases: Sequence[Case]) -> list[str]:
    globs = []
    for value in values or ():
        try:
            check_glob(value)
        except ValueError as err:
            raise UsageError(f"{option}: {err}") from err
        if not any(glob_matches(value, c.id) for c in cases):
            raise UsageError(f"{option} {value!r} matches no case (see 'conformance list')")
        globs.append(value)
    return globs


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from err
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from err
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        # No abbreviations: '--list' must never be taken for '--listen', nor the reverse.
        allow_abbrev=False,
        description=(
            f"The collateral-sync conformance kit {__version__} ({PROTOCOL_VERSION}): run cases "
            "against a custodian, exchange or regulator server and report which pass."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    roles = [r.value for r in Role]

    run = sub.add_parser("run", help="run the cases against a server", allow_abbrev=False)
    run.add_argument("--role", required=True, choices=roles, help="role of the server under test")
    run.add_argument("--target", required=True, help="host:port of the server under test")
    run.add_argument(
        "--ca", required=True, help="CA certificate (PEM) the server's certificate chains to"
    )
    run.add_argument(
        "--cert", required=True, help="the kit's client certificate (PEM), CN = its party id"
    )
    run.add_argument("--key", required=True, help="private key (PEM) of --cert")
    run.add_argument(
        "--registry", required=True, help="key registry (proto3 JSON) with the server's public keys"
    )
    run.add_argument(
        "--kit-key",
        action="append",
        required=True,
        metavar="FILE",
        help="a signing key file of a party the kit plays (e.g. the exchange and a client when "
        "testing a custodian); repeatable",
    )
    run.add_argument(
        "--identity",
        action="append",
        nargs=2,
        metavar=("CERT", "KEY"),
        default=[],
        help="a further TLS identity (certificate and key, PEM, from the same CA) the kit calls "
        "as in the access/ cases: a second client, another exchange, a regulator, and a "
        "stranger whose party is not in the registry; repeatable",
    )
    run.add_argument("--server-party", help="party id of the server (default: from --registry)")
    run.add_argument("--server-name", help="name to check in the server certificate (TLS)")
    run.add_argument(
        "--account", help="an account at the server owned by the kit's client key (custodian cases)"
    )
    run.add_argument("--log-origin", help="the custodian's attestation log origin, if known")
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="exchange runs: serve the custodian the exchange under test dials here "
        "(TLS identity --cert/--key, signing as the custodian --kit-key); regulator runs: "
        "serve the custodian's ReconciliationService here",
    )
    run.add_argument(
        "--listen-exchange",
        metavar="HOST:PORT",
        help="regulator runs: serve the exchange's ReconciliationService here",
    )
    run.add_argument(
        "--exchange-cert", help="TLS certificate for --listen-exchange (default --cert)"
    )
    run.add_argument("--exchange-key", help="private key of --exchange-cert")
    run.add_argument(
        "--state-dir",
        metavar="DIR",
        help="with --listen: where the kit keeps its custodian's logs across runs "
        "(default .collateral-sync-kit/<server party>)",
    )
    run.add_argument("--run", action="append", metavar="GLOB", help="run only matching cases")
    run.add_argument("--skip", action="append", metavar="GLOB", help="do not run matching cases")
    run.add_argument(
        "--known-failing", metavar="FILE", help="case ids (or globs) expected to fail, one a line"
    )
    run.add_argument(
        "--report-dir", metavar="DIR", help="write results.json, junit.xml, report.html"
    )
    run.add_argument(
        "--timeout", type=_positive, default=60.0, help="time limit of one case, seconds (60)"
    )
    run.add_argument(
        "--rpc-timeout", type=_positive, default=10.0, help="deadline of each RPC, seconds (10)"
    )
    run.add_argument(
        "--wait",
        type=_non_negative,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the server to report SERVING on gRPC health before the "
        "first case (0, the default: check once that it answers)",
    )
    run.add_argument("--no-colour", action="store_true", help="plain terminal output")

    listing = sub.add_parser(
        "list", help="list the cases with id, level and description", allow_abbrev=False
    )
    listing.add_argument("--role", choices=roles, help="only the cases of this role")
    listing.add_argument("--run", action="append", metavar="GLOB", help="only matching cases")
    listing.add_argument("--skip", action="append", metavar="GLOB", help="leave out matching cases")
    listing.add_argument("--json", action="store_true", help="print JSON")

    setup = sub.add_parser(
        "init",
        help="write the kit's keys, certificates, registry, a reference server config and "
        "run-kit.sh into DIR",
        allow_abbrev=False,
    )
    setup.add_argument("--role", required=True, choices=roles, help="role of the server to test")
    setup.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    setup.add_argument(
        "--base-port",
        type=int,
        default=BASE_PORT,
        metavar="PORT",
        help=f"first of six consecutive ports for the server and the kit (default {BASE_PORT})",
    )
    setup.add_argument("directory", metavar="DIR", help="where to write (created if absent)")
    return parser


def _cmd_list(args: argparse.Namespace, registry: Registry) -> int:
    everything = list(registry)
    run = _globs(args.run, "--run", everything)
    skip = _globs(args.skip, "--skip", everything)
    roles = [Role(args.role)] if args.role else list(Role)
    chosen = [
        case
        for case in everything
        if any(case in select_cases([case], role, run=run, skip=skip) for role in roles)
    ]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": c.id,
                        "level": c.level.value,
                        "roles": sorted(r.value for r in c.roles),
                        # Clause ids of docs/CONFORMANCE.md (anchors of PROTOCOL.md).
                        "clauses": list(c.clauses),
                        "description": c.description,
                    }
                    for c in chosen
                ],
                indent=2,
            )
        )
        return EXIT_OK
    width = max((len(c.id) for c in chosen), default=0)
    for case in chosen:
        who = ",".join(r.value for r in Role if r in case.roles)
        # The clauses of docs/PROTOCOL.md the case checks, before the description.
        cites = f"[{' '.join(case.clauses)}] " if case.clauses else ""
        print(f"{case.id:<{width}}  {case.level.value:<6}  {who:<28}  {cites}{case.description}")
    print(f"{len(chosen)} cases ({sum(1 for c in chosen if c.level.value == 'MUST')} MUST)")
    return EXIT_OK


def _cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    try:
        written = init(args.role, directory, force=args.force, base_port=args.base_port)
    except InitError as err:
        raise UsageError(str(err)) from err
    except OSError as err:
        raise UsageError(f"{directory}: cannot write ({err.strerror or err})") from err
    print(f"wrote      {written.directory}: pki/, keys/, server.json, run-kit.sh, README.txt")
    print(written.readme.read_text("utf-8"), end="")
    return EXIT_OK


def _server_party(args: argparse.Namespace, role: Role, registry: KeyRegistry) -> str:
    if args.server_party:
        return str(args.server_party)
    parties = sorted({k.party_id for k in registry if k.role == party_role(role)})
    if len(parties) != 1:
        found = ", ".join(parties) or "none"
        raise UsageError(
            f"--server-party is needed: the registry holds {role.value} parties: {found}"
        )
    return parties[0]


def _config(args: argparse.Namespace) -> KitConfig:
    role = Role(args.role)
    if args.listen and role is Role.CUSTODIAN:
        raise UsageError("--listen serves a custodian's counterparts: not for --role custodian")
    if (args.listen_exchange or args.exchange_cert) and role is not Role.REGULATOR:
        raise UsageError("--listen-exchange and --exchange-cert are for --role regulator")
    if role is Role.REGULATOR and bool(args.listen) != bool(args.listen_exchange):
        raise UsageError("a regulator run serves both parties: give --listen and --listen-exchange")
    if bool(args.exchange_cert) != bool(args.exchange_key):
        raise UsageError("--exchange-cert and --exchange-key go together")
    if args.state_dir and not args.listen:
        raise UsageError("--state-dir is the state of the custodian --listen serves")
    tls = _tls(("--ca", args.ca), ("--cert", args.cert), ("--key", args.key))
    exchange_tls = (
        _tls(
            ("--ca", args.ca),
            ("--exchange-cert", args.exchange_cert),
            ("--exchange-key", args.exchange_key),
        )
        if args.exchange_cert
        else None
    )
    identities = tuple(
        _tls(("--ca", args.ca), ("--identity", cert), ("--identity", key))
        for cert, key in args.identity
    )
    registry = _input_file("--registry", args.registry, KeyRegistry.load)
    keys = tuple(_input_file("--kit-key", path, SigningKey.load) for path in args.kit_key)
    for option, value in (("--state-dir", args.state_dir), ("--report-dir", args.report_dir)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise UsageError(f"{option} {value} is not a directory; {option} wants a directory")
    return KitConfig(
        role=role,
        target=args.target,
        tls=tls,
        registry=registry,
        kit_keys=keys,
        server_party_id=_server_party(args, role, registry),
        server_name_override=args.server_name,
        account_id=args.account,
        log_origin=args.log_origin,
        rpc_timeout=args.rpc_timeout,
        listen=args.listen,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        listen_exchange=args.listen_exchange,
        exchange_tls=exchange_tls,
        identities=identities,
    )


def _input_file(option: str, path: str, load: Callable[[str], _T]) -> _T:
    """``load(path)``; a problem is a UsageError naming ``option`` and ``path``."""
    try:
        return load(path)
    except OSError as err:
        if isinstance(err, IsADirectoryError):
            raise UsageError(f"{option} {path} is a directory; {option} wants a file") from err
        raise UsageError(f"{option} {path}: {err.strerror or err}") from err
    except (CollateralSyncError, ValueError) as err:
        message = err.message if isinstance(err, CollateralSyncError) else str(err)
        shown = message if path in message else f"{path}: {message}"
        raise UsageError(f"{option}: {shown}") from err


def _read_certificates(path: str) -> bytes:
    data = Path(path).read_bytes()
    load_certificate_chain_pem(data)
    return data


def _read_private_key(path: str) -> bytes:
    data = Path(path).read_bytes()
    load_private_key_pem(data)
    return data


def _tls(ca: tuple[str, str], cert: tuple[str, str], key: tuple[str, str]) -> TlsConfig:
    """A TLS identity from (option, path) pairs; each file is checked on its own."""
    material = (
        _input_file(*ca, _read_certificates),
        _input_file(*cert, _read_certificates),
        _input_file(*key, _read_private_key),
    )
    try:
        tls = TlsConfig(*material, cert_file=cert[1])
    except CollateralSyncError as err:
        raise UsageError(f"{key[0]} {key[1]}: {err.message} ({cert[0]} {cert[1]})") from err
    try:
        # The kit dials with it: out of its dates, every connection would be refused.
        check_client_certificate(tls)
    except CollateralSyncError as err:
        raise UsageError(f"{cert[0]}: {err.message}") from err
    return tls


#: Health states a probe of the target can end in.
_READY, _NOT_SERVING, _UNREACHABLE = "ready", "not serving", "unreachable"
#: Seconds between two probes while ``--wait`` waits.
_POLL_INTERVAL = 0.25


def _why_unreachable(err: grpc.aio.AioRpcError, config: KitConfig, ca: str, timeout: float) -> str:
    """What an UNAVAILABLE or DEADLINE_EXCEEDED health check says, and the likely fix."""
    if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"no answer within {timeout:g} s (DEADLINE_EXCEEDED): something accepts "
            "connections there but does not answer gRPC"
        )
    details = err.details() or ""
    low = details.lower()
    if "connection refused" in low:
        return "connection refused: nothing listens there (check --target; is the server up?)"
    if any(
        words in low
        for words in ("dns resolution failed", "errors resolving", "name or service not known")
    ):
        return "the host name does not resolve (check --target)"
    if "hostname verification" in low or "peer name" in low:
        name = config.server_name_override or config.target.rpartition(":")[0]
        return (
            f"TLS handshake failed: the server's certificate does not name {name!r} "
            "(give --server-name with a name it holds)"
        )
    if "wrong_version_number" in low:
        return "TLS handshake failed: the server does not speak TLS (a plaintext server?)"
    verify = re.search(r"certificate_verify_failed:\s*([^:]+)", details, re.IGNORECASE)
    if verify is not None:
        return (
            f"TLS handshake failed: the server's certificate does not verify against --ca {ca} "
            f"({verify.group(1).strip()}); likely a wrong CA, or the server presents a "
            "certificate of another CA"
        )
    if "socket closed" in low or "connection reset" in low or "end of file" in low:
        return (
            "TLS handshake failed: the server closed the connection; likely it does not trust "
            "the kit's certificate (--cert from another CA than the server's)"
        )
    if any(word in low for word in ("handshake", "ssl", "tls", "tsi_", "certificate")):
        return f"TLS handshake failed (wrong CA or certificate?): {details}"
    return f"{err.code().name}: {details}"


async def _probe(config: KitConfig, ca: str, timeout: float) -> tuple[str, str]:
    """One health check over mutual TLS: (state, what was seen)."""
    async with secure_channel(
        config.target, config.tls, server_name_override=config.server_name_override
    ) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return _UNREACHABLE, _why_unreachable(err, config, ca, timeout)
            # It answers, if not with a health status: the transport/ cases judge that.
            return _READY, f"health answered {err.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return _READY, status
    return _NOT_SERVING, f"health reports {status}"


#: The start of a gRPC core log line: severity, date, time, thread, file:line].
def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _await_ready(
    config: KitConfig, ca: str, wait: float, say: Callable[[str], None] = _say
) -> None:
    """Check the target once (``wait`` 0) or wait until it reports SERVING; UsageError if not.

    A single check only needs an answer (as before ``--wait``); waiting needs SERVING,
    or an answer that is not a health status at all, which waiting would not change.
    """
    who = f"{config.server_party_id} at {config.target}"
    deadline = time.monotonic() + wait
    announced = False
    while True:
        remaining = deadline - time.monotonic()
        timeout = min(config.rpc_timeout, max(remaining, 1.0)) if wait else config.rpc_timeout
        state, seen = await _probe(config, ca, timeout)
        if state == _READY or (state == _NOT_SERVING and wait == 0):
            return
        if wait == 0:
            raise UsageError(f"cannot reach {who} over mutual TLS: {seen}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UsageError(f"{who} did not report SERVING within {wait:g} s; last seen: {seen}")
        if not announced:
            say(f"waiting up to {wait:g} s for {who} to report SERVING...")
            announced = True
        await asyncio.sleep(min(_POLL_INTERVAL, remaining))


def _served(config: KitConfig) -> dict[str, str]:
    """What the kit serves the server under test to dial, for the run's header."""
    if config.listen is None:
        return {}
    if config.role is Role.REGULATOR:
        return {
            "kit serves": f"custodian's ReconciliationService at {config.listen}, "
            f"exchange's at {config.listen_exchange}"
        }
    return {"kit serves": f"custodian at {config.listen}"}


def _cmd_run(args: argparse.Namespace, registry: Registry) -> int:
    config = _config(args)
    role_cases = registry.for_role(config.role)
    run = _globs(args.run, "--run", list(registry))
    skip = _globs(args.skip, "--skip", list(registry))
    chosen = select_cases(role_cases, config.role, run=run, skip=skip)
    known = None
    if args.known_failing:
        known = _input_file("--known-failing", args.known_failing, KnownFailing.load)
    # Handshake failures are explained in one line of the kit's own; core's lines go.
    with grpc_core_log_held() as held:
        held.drop_core_log = True
        asyncio.run(_await_ready(config, args.ca, args.wait, held.say))
    reporter = TerminalReporter(colour=False if args.no_colour else None)
    reporter.start(
        {
            "kit": f"collateral-sync conformance {__version__}",
            "protocol": PROTOCOL_VERSION,
            "role": config.role.value,
            "target": config.target,
            "server": config.server_party_id,
            "kit party": config.tls.party_id,
            **_served(config),
        },
        chosen,
    )
    result = asyncio.run(
        run_cases(
            config,
            chosen,
            role_cases=role_cases,
            known_failing=known,
            case_timeout=args.timeout,
            progress=reporter.case_finished,
        )
    )
    reporter.summary(result)
    if args.report_dir:
        written = write_reports(result, Path(args.report_dir))
        print("reports    " + ", ".join(str(p) for p in written))
    return result.exit_code


#: The options of ``run`` that ``--list`` keeps (they choose cases); the others it drops.
_CHOOSING = frozenset({"--role", "--run", "--skip"})
#: The options of ``run`` that take no value.
_FLAGS = frozenset({"--no-colour", "--list"})


def _as_listing(argv: Sequence[str]) -> list[str] | None:
    """``--list``, alone or among a run's options: list the cases that run would choose.

    ``conformance --list [--role R] ...`` is ``conformance list ...``; ``conformance run
    ... --list`` lists the cases the same run would run (its ``--role``, ``--run`` and
    ``--skip``), without contacting any server.
    """
    if "--list" not in argv or not argv or argv[0] not in ("--list", "run"):
        return None
    listing = ["list"]
    tokens = iter(argv[1:] if argv[0] == "run" else argv)
    for token in tokens:
        name, has_value, _ = token.partition("=")
        if name in _FLAGS:
            continue
        if name in _CHOOSING:
            listing.append(token)
            if not has_value:
                listing.append(next(tokens, ""))
        elif name.startswith("--") and not has_value:
            next(tokens, None)  # another run option: its value goes with it
        elif not name.startswith("--"):
            listing.append(token)  # let the list parser refuse what it does not know
    return listing


def main(argv: Sequence[str] | None = None, *, prog: str = _PROG) -> int:
    """Entry point; returns the exit code."""
    parser = _parser(prog)
    arguments = list(sys.argv[1:] if argv is None else argv)
    arguments = _as_listing(arguments) or arguments
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:  # argparse reports usage errors itself (exit 2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    registry = _load_cases()
    try:
        if args.command == "list":
            return _cmd_list(args, registry)
        if args.command == "init":
            return _cmd_init(args)
        return _cmd_run(args, registry)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
