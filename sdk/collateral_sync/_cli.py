"""The ``collateral-sync`` command line.

Exit codes: 0 success; 1 verification refused (the evidence is bad); 2 usage
error or unusable input (missing file, malformed bundle). Errors are printed
as one line on stderr naming the thing at fault (option, file, config key) and,
where there is one, the fix; never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from collateral_sync._cli_keys import KeysUsageError, add_keys_parser
from collateral_sync._version import __version__
from collateral_sync.errors import CollateralSyncError, VerificationError
from collateral_sync.v1 import common_pb2

if TYPE_CHECKING:
    from collateral_sync.keys import KeyRegistry

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

#: The environment variable keygen reads a token's user PIN from, unless --pin-env names another.
DEFAULT_PIN_ENV = "COLLATERAL_SYNC_PKCS11_PIN"

_ROLES = {
    "custodian": common_pb2.PARTY_ROLE_CUSTODIAN,
    "exchange": common_pb2.PARTY_ROLE_EXCHANGE,
    "regulator": common_pb2.PARTY_ROLE_REGULATOR,
    "client": common_pb2.PARTY_ROLE_CLIENT,
    "key_registry": common_pb2.PARTY_ROLE_KEY_REGISTRY,
}


class _UsageError(Exception):
    """A problem with the command line or its input files (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), like every other."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _what_is(path: Path) -> str:
    """What ``path`` is, for a message: 'a directory', 'a character device', 'missing'..."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _directory(option: str, path: Path, holds: str) -> None:
    """Make ``path`` a directory for ``option`` (created if absent) or say why it cannot be."""
    if path.exists() and not path.is_dir():
        raise _UsageError(
            f"{option} {path} is {_what_is(path)}; {option} wants a directory ({holds})"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _UsageError(
            f"{option} {path}: cannot create the directory ({err.strerror or err})"
        ) from err


def _check_party_file_name(party: str) -> None:
    # The party id names the key file: it must stay inside --out and be a name.
    if not party or party in (".", "..") or any(c in party for c in ("/", "\\", "\0")):
        raise _UsageError(
            f"--party {party!r}: a party id names its key file, so it cannot be empty, "
            "'.' or '..', nor contain '/', '\\' or NUL"
        )


def _cmd_keygen(args: argparse.Namespace) -> int:
    from collateral_sync.keys import SigningKey

    if args.pkcs11_module is not None:
        return _keygen_on_token(args)
    for option, value in (("--token", args.token), ("--label", args.label)):
        if value is not None:
            raise _UsageError(f"{option}: for a key on a token, with --pkcs11-module")
    # Every argument and input file is checked before anything is written.
    _check_party_file_name(args.party)
    valid_from, out, registry_path, registry = _keygen_registry(args)
    _directory("--out", out, f"it gets {args.party}.key.json")
    key_path = out / f"{args.party}.key.json"
    if key_path.exists() and not args.force:
        raise _UsageError(f"{key_path} exists; pass --force to overwrite it")
    key = SigningKey.generate(args.party, _ROLES[args.role])
    key.save(key_path)
    registry.add(key.party_key(valid_from=valid_from))
    registry.save(registry_path)
    print(f"key id     {key.key_id}")
    print(f"party      {key.party_id} ({args.role})")
    print(f"secret key {key_path} (mode 0600)")
    print(f"registry   {registry_path}")
    return EXIT_OK


def _keygen_registry(args: argparse.Namespace) -> tuple[datetime, Path, Path, KeyRegistry]:
    """keygen's checked --valid-from, --out, and the registry file with what it holds now."""
    from collateral_sync.keys import KeyRegistry

    valid_from = (
        _parse_time(args.valid_from, "--valid-from") if args.valid_from else datetime.now(UTC)
    )
    out = Path(args.out)
    registry_path = Path(args.registry) if args.registry else out / "registry.json"
    registry_what = "--registry" if args.registry else "registry (in --out)"
    if registry_path.exists() and not registry_path.is_file():
        raise _UsageError(
            f"{registry_what} {registry_path} is {_what_is(registry_path)}; "
            "it must be the key registry JSON file (created if absent)"
        )
    try:
        registry = KeyRegistry.load(registry_path) if registry_path.exists() else KeyRegistry()
    except CollateralSyncError as err:
        raise _UsageError(f"{registry_what}: {err.message}") from err
    return valid_from, out, registry_path, registry


def _keygen_on_token(args: argparse.Namespace) -> int:
    """keygen --pkcs11-module: the key pair is generated on the token and never leaves it."""
    from collateral_sync.errors import SignerError
    from collateral_sync.signer import Pkcs11Signer

    for option, value in (("--token", args.token), ("--label", args.label)):
        if not value:
            raise _UsageError(f"{option} is required with --pkcs11-module")
    if args.force:
        raise _UsageError("--force: a key on a token is never replaced; choose another --label")
    pin = os.environ.get(args.pin_env)
    if not pin:
        raise _UsageError(
            f"--pin-env: set the environment variable {args.pin_env} to the token's user PIN "
            "(never on the command line)"
        )
    valid_from, out, registry_path, registry = _keygen_registry(args)
    if not args.registry:
        _directory("--out", out, "it gets registry.json")
    try:
        signer = Pkcs11Signer.generate(
            args.pkcs11_module,
            token=args.token,
            label=args.label,
            pin=pin,
            party_id=args.party,
            role=_ROLES[args.role],
        )
    except SignerError as err:
        raise _UsageError(err.message) from err
    with signer:
        registry.add(signer.party_key(valid_from=valid_from))
        registry.save(registry_path)
        print(f"key id     {signer.key_id}")
        print(f"party      {signer.party_id} ({args.role})")
        print(
            f"token key  {signer.label!r} on token {signer.token!r} "
            f"({signer.module}; private key sensitive, never extractable)"
        )
        print(f"registry   {registry_path}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from collateral_sync.audit import load_audit_bundle, verify_audit_bundle

    path = Path(args.file)
    if not path.is_file():
        what = _what_is(path)
        found = "no such file" if what == "missing" else f"is {what}"
        raise _UsageError(f"{path}: {found}; verify expects a file holding {_BUNDLE_FORMATS}")
    bundle = load_audit_bundle(path)
    try:
        report = verify_audit_bundle(bundle)
    except CollateralSyncError as err:
        if isinstance(err, VerificationError):
            raise
        raise _UsageError(f"{path}: not a usable audit bundle: {err.message}") from err
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            print(line)
    return EXIT_OK if report.ok else EXIT_REFUSED


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from collateral_sync_reference import serve_main
    except ModuleNotFoundError as err:
        if err.name != "collateral_sync_reference":
            raise
        raise _UsageError(
            "the reference servers (package collateral_sync_reference) are not installed"
        ) from err
    from collateral_sync_reference.common.config import check_address

    if args.listen is not None:
        try:
            check_address(args.listen)
        except ValueError as err:
            raise _UsageError(f"--listen: {err}") from err
    return serve_main(
        args.role,
        args.config,
        test_mode=args.test_mode,
        listen=args.listen,
        plaintext_for_testing=args.plaintext_for_testing,
    )


#: What ``verify`` reads, for its messages.
_BUNDLE_FORMATS = "an AuditBundle (binary protobuf, or proto3 JSON if named *.json)"

#: Which option each field of create_dev_pki's MalformedError comes from.
_DEV_CERTS_OPTIONS = {"parties": "--party", "hosts": "--host", "valid_days": "--valid-days"}


def _cmd_dev_certs(args: argparse.Namespace) -> int:
    from collateral_sync.dev_ca import DEFAULT_HOSTS, create_dev_pki, pki_layout
    from collateral_sync.errors import MalformedError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _UsageError(
            f"--out {out} is {_what_is(out)}; --out wants a directory for the PEM files"
        )
    try:
        layout = pki_layout(out, args.party)
    except MalformedError as err:
        raise _UsageError(f"--party: {err.message}") from err
    existing = [path for path in layout.files() if path.exists()]
    if existing and not args.force:
        raise _UsageError(
            f"--out {out} already holds {', '.join(p.name for p in existing)}; pass --force "
            "to replace them (certificates issued by a replaced CA stop verifying)"
        )
    try:
        pki = create_dev_pki(
            out,
            parties=args.party,
            hosts=args.host or DEFAULT_HOSTS,
            valid_days=args.valid_days,
            overwrite=args.force,
        )
    except MalformedError as err:
        options = [_DEV_CERTS_OPTIONS.get(name, name) for name in err.field_violations]
        raise _UsageError(f"{'/'.join(options) or 'dev-certs'}: {err.message}") from err
    except OSError as err:
        raise _UsageError(f"--out {out}: cannot write the PKI ({_os_error(err)})") from err
    print(f"CA         {pki.ca_cert} (key {pki.ca_key}, mode 0600)")
    for files in pki.parties.values():
        print(f"party      {files.party_id}: {files.cert} (key {files.key}, mode 0600)")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from collateral_sync_benchmarks import run_benchmarks

    if args.suite != "sync" and (args.storage is not None or args.dsn is not None):
        raise _UsageError(f"--storage/--dsn: for 'bench sync' only, not 'bench {args.suite}'")
    if args.dsn is not None and args.storage == "sqlite":
        raise _UsageError("--dsn: a PostgreSQL server, for --storage postgresql or both")
    return run_benchmarks(args.suite, scale=args.scale, storage=args.storage, dsn=args.dsn)


def _cmd_conformance(args: argparse.Namespace) -> int:
    try:
        from collateral_sync_conformance import main as conformance_main
    except ModuleNotFoundError as err:
        if err.name != "collateral_sync_conformance":
            raise
        raise _UsageError(
            "the conformance kit (package collateral_sync_conformance) is not installed"
        ) from err
    return conformance_main(args.args, prog="collateral-sync conformance")


def _parse_time(text: str, option: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as err:
        raise _UsageError(
            f"{option}: expected an ISO 8601 time such as 2026-01-01T00:00:00Z, got {text!r}"
        ) from err
    if value.tzinfo is None:
        raise _UsageError(f"{option}: expected a time with a zone (e.g. ...Z), got {text!r}")
    return value


def _positive_days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of days >= 1, got {text!r}")
    return value


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="collateral-sync",
        description=(
            "Open protocol for mirrored collateral: keys, offline verification, benchmarks, "
            "development certificates and the reference servers."
        ),
    )
    parser.add_argument("--version", action="version", version=f"collateral-sync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="generate an Ed25519 party key and register it")
    keygen.add_argument("--party", required=True, help="party id, e.g. custodian-1")
    keygen.add_argument("--role", required=True, choices=sorted(_ROLES))
    keygen.add_argument("--out", default="keys", help="directory for the secret key file")
    keygen.add_argument(
        "--registry", help="key registry JSON to add the key to (created if absent)"
    )
    keygen.add_argument("--valid-from", help="start of the key's validity (ISO 8601; default now)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    token = keygen.add_argument_group(
        "key on a PKCS#11 token (an HSM)",
        "generate the key pair on the token instead of a key file; the private key never "
        "leaves it",
    )
    token.add_argument(
        "--pkcs11-module", help="the token's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so"
    )
    token.add_argument("--token", help="the token's label")
    token.add_argument("--label", help="label for the new key on the token (CKA_LABEL)")
    token.add_argument(
        "--pin-env",
        default=DEFAULT_PIN_ENV,
        help=f"environment variable holding the token's user PIN (default {DEFAULT_PIN_ENV})",
    )
    keygen.set_defaults(func=_cmd_keygen)

    add_keys_parser(sub, _parse_time)

    verify = sub.add_parser("verify", help="verify an audit bundle offline")
    verify.add_argument("file", help="AuditBundle as binary protobuf (.pb) or proto3 JSON (.json)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=_cmd_verify)

    serve = sub.add_parser(
        "serve", help="run a reference server (custodian, exchange or regulator) until SIGTERM"
    )
    serve.add_argument("role", choices=["custodian", "exchange", "regulator"])
    serve.add_argument("--config", required=True, help="the server's JSON configuration file")
    serve.add_argument(
        "--test-mode",
        action="store_true",
        help="also serve TestControlService, with a clock tests can move (never in production)",
    )
    serve.add_argument(
        "--listen", help="host:port to listen on, overriding the config (port 0: any free port)"
    )
    serve.add_argument(
        "--plaintext-for-testing",
        action="store_true",
        help="serve without TLS (tests only; parties talk over mutual TLS)",
    )
    serve.set_defaults(func=_cmd_serve)

    dev_certs = sub.add_parser(
        "dev-certs", help="create a development CA and mutual-TLS certificates for parties"
    )
    dev_certs.add_argument("--out", required=True, help="directory to write the PEM files to")
    dev_certs.add_argument(
        "--party",
        required=True,
        action="extend",
        nargs="+",
        help="party id (certificate CN); repeat or list several",
    )
    dev_certs.add_argument(
        "--host",
        action="extend",
        nargs="+",
        help="DNS name or IP the certificates are valid for (default: localhost, 127.0.0.1, ::1)",
    )
    dev_certs.add_argument(
        "--valid-days", type=_positive_days, default=30, help="certificate lifetime in days (30)"
    )
    dev_certs.add_argument(
        "--force", action="store_true", help="replace the files of an earlier dev-certs in --out"
    )
    dev_certs.set_defaults(func=_cmd_dev_certs)

    bench = sub.add_parser("bench", help="run benchmarks with baselines measured in the same run")
    bench.add_argument(
        "suite",
        nargs="?",
        default="sdk",
        choices=["sdk", "sync", "recon"],
        help=(
            "sdk: signatures, attestation log, proofs; sync: position sync and margin calls; "
            "recon: reconciliation of a million accounts"
        ),
    )
    bench.add_argument(
        "--scale", type=_scale, default=1.0, help="fraction of the full sizes (1.0 = brief figures)"
    )
    bench.add_argument(
        "--storage",
        choices=["sqlite", "postgresql", "both"],
        default=None,
        help=(
            "sync: where both parties keep their state, each engine beside its own raw-storage "
            "baseline (default: both when PostgreSQL's initdb is installed, else sqlite)"
        ),
    )
    bench.add_argument(
        "--dsn",
        default=None,
        help=(
            "sync: an existing PostgreSQL server (libpq conninfo; password in it, PGPASSWORD "
            "or ~/.pgpass) instead of a throwaway one; two databases collateral_sync_bench_* "
            "are created there afresh and dropped at the end"
        ),
    )
    bench.set_defaults(func=_cmd_bench)

    # Every argument after "conformance" goes to the kit's own parser (prefix "\0": none
    # of them is an option here), so 'conformance run --help' shows the kit's help.
    conformance = sub.add_parser(
        "conformance",
        help="run the conformance kit against a server ('conformance --help')",
        add_help=False,
        prefix_chars="\0",
    )
    conformance.add_argument("args", nargs=argparse.REMAINDER)
    conformance.set_defaults(func=_cmd_conformance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (_UsageError, KeysUsageError) as err:
        print(f"collateral-sync: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as err:
        print(f"collateral-sync: refused: {err.reason_name}: {err.message}", file=sys.stderr)
        return EXIT_REFUSED
    except CollateralSyncError as err:
        print(f"collateral-sync: error: {err.reason_name}: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"collateral-sync: error: {_os_error(err)}", file=sys.stderr)
        return EXIT_USAGE
    return code


def _os_error(err: OSError) -> str:
    """An OSError without its '[Errno N]' prefix: 'PATH: No such file or directory'."""
    if err.filename is not None and err.strerror:
        return f"{os.fsdecode(err.filename)}: {err.strerror}"
    return str(err.strerror or err)


if __name__ == "__main__":
    sys.exit(main())
