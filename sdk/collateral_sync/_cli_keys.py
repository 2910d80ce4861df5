"""``collateral-sync keys``: the signed key registry from the command line (PROTOCOL.md §4.6).

A registry change is a ceremony in three steps, each a command:

1. ``keys init`` (the first version), ``keys rotate`` or ``keys revoke`` appends the
   next version, unsigned, to a copy of the chain (``--out``);
2. each registry key holder runs ``keys sign-registry`` on that copy with their key;
3. ``keys verify-registry`` says whether the copy is now in force-able: every version
   signed by its thresholds, no history rewritten. The copy then replaces the file the
   servers follow, and they take the new version without a restart.

``keys show`` prints what a registry file says, plain or signed.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collateral_sync.errors import CollateralSyncError

if TYPE_CHECKING:
    from collateral_sync.keys import KeyRegistry
    from collateral_sync.v1 import keys_pb2

__all__ = ["KeysUsageError", "add_keys_parser"]

_EXIT_OK = 0
_EXIT_REFUSED = 1


class KeysUsageError(Exception):
    """A problem with the command line or its input files (the CLI's exit 2)."""


def add_keys_parser(sub: Any, parse_time: Any) -> None:
    """Register ``keys`` and its subcommands on the top-level subparsers ``sub``."""
    keys = sub.add_parser(
        "keys", help="the signed key registry: show, rotate, revoke, sign, verify"
    )
    commands = keys.add_subparsers(dest="keys_command", required=True)

    show = commands.add_parser("show", help="print a key registry file, plain or signed")
    show.add_argument("--registry", required=True, help="the registry file")
    show.set_defaults(func=_show)

    init = commands.add_parser("init", help="draft version 1 of a signed registry")
    init.add_argument("--keys", required=True, help="plain registry of the party keys")
    init.add_argument(
        "--registry-keys", required=True, help="plain registry of the registry keys (officers)"
    )
    init.add_argument("--threshold", type=int, required=True, help="signatures a version needs")
    init.add_argument("--out", required=True, help="the chain file to write (version 1, unsigned)")
    init.set_defaults(func=lambda args: _init(args, parse_time))

    for name, text in (
        ("rotate", "draft the next version: a party key replaced, with an overlap"),
        ("revoke", "draft the next version: a key revoked from a time on"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--registry", required=True, help="the signed registry (chain) file")
        command.add_argument("--key-id", required=True, help="the key rotated or revoked")
        command.add_argument("--at", help="when (ISO 8601; default now)")
        command.add_argument("--out", required=True, help="the chain file to write")
        if name == "rotate":
            command.add_argument(
                "--new-key", required=True, help="plain registry holding the new key (keygen's)"
            )
            command.add_argument(
                "--overlap",
                type=float,
                default=600.0,
                help="seconds the old key still signs after --at (default 600)",
            )
        command.add_argument(
            "--registry-keys", help="plain registry of new registry keys (default: unchanged)"
        )
        command.add_argument("--threshold", type=int, help="new threshold (default: unchanged)")
        command.set_defaults(func=lambda args, name=name: _next(args, name, parse_time))

    sign = commands.add_parser("sign-registry", help="add your signature to the last version")
    sign.add_argument("--registry", required=True, help="the chain file (changed in place)")
    sign.add_argument("--key", required=True, help="your registry key file (keygen key_registry)")
    sign.set_defaults(func=_sign)

    verify = commands.add_parser("verify-registry", help="verify every version of a chain")
    verify.add_argument("--registry", required=True, help="the chain file")
    verify.add_argument("--root", help="SHA-256 of version 1 to pin (as verify-registry prints)")
    verify.set_defaults(func=_verify)


# --- commands -------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    from collateral_sync.signed_registry import SignedKeyRegistry, is_chain_file, read_chain

    path = _existing(args.registry, "--registry")
    if not is_chain_file(path):
        registry = _plain(path, "--registry")
        print(f"{path}: a plain key registry (unsigned; read once at a server's start)")
        _print_keys(registry.to_proto().keys)
        return _EXIT_OK
    chain = read_chain(path)
    print(f"{path}: a signed key registry of {len(chain.versions)} versions")
    try:
        signed = SignedKeyRegistry.verify(chain)
    except CollateralSyncError as err:
        print(f"NOT VERIFIED: {err.message}")
        return _EXIT_REFUSED
    latest = signed.latest
    print(f"root       sha256 {signed.root_sha256}")
    print(f"version    {latest.version} issued {latest.issued_at.ToJsonString()}")
    print(f"threshold  {latest.threshold} of {len(latest.registry_keys)} registry keys")
    _print_keys(latest.registry_keys)
    _print_keys(latest.keys)
    return _EXIT_OK


def _init(args: argparse.Namespace, parse_time: Any) -> int:
    from collateral_sync.signed_registry import draft_version, write_chain
    from collateral_sync.v1 import keys_pb2

    keys = _plain(_existing(args.keys, "--keys"), "--keys")
    officers = _plain(_existing(args.registry_keys, "--registry-keys"), "--registry-keys")
    out = _writable(args.out)
    try:
        version = draft_version(
            version=1,
            issued_at=datetime.now(UTC),
            keys=keys.to_proto().keys,
            registry_keys=officers.to_proto().keys,
            threshold=args.threshold,
        )
    except CollateralSyncError as err:
        raise KeysUsageError(err.message) from err
    write_chain(out, keys_pb2.KeyRegistryChain(versions=[version]))
    print(f"version 1 drafted in {out}: sign it with keys sign-registry ({args.threshold} needed)")
    return _EXIT_OK


def _next(args: argparse.Namespace, action: str, parse_time: Any) -> int:
    from collateral_sync.keys import KeyRegistry
    from collateral_sync.signed_registry import draft_version, write_chain

    signed = _verified(_existing(args.registry, "--registry"), "--registry")
    out = _writable(args.out)
    latest = signed.latest
    at = parse_time(args.at, "--at") if args.at else datetime.now(UTC)
    registry = KeyRegistry(latest.keys)
    if registry.get(args.key_id) is None:
        raise KeysUsageError(f"--key-id {args.key_id}: not a key of version {latest.version}")
    try:
        if action == "rotate":
            new_keys = list(_plain(_existing(args.new_key, "--new-key"), "--new-key"))
            if len(new_keys) != 1:
                raise KeysUsageError(f"--new-key: holds {len(new_keys)} keys, expected 1")
            new = new_keys[0]
            new.valid_from.FromDatetime(at)
            registry.rotate(args.key_id, new, at + timedelta(seconds=args.overlap))
            # rotate() ends the old key at its time: the new one starts at --at, before it.
        else:
            registry.revoke(args.key_id, at)
        officers = (
            list(_plain(_existing(args.registry_keys, "--registry-keys"), "--registry-keys"))
            if args.registry_keys
            else list(latest.registry_keys)
        )
        version = draft_version(
            version=latest.version + 1,
            issued_at=max(datetime.now(UTC), _after(latest)),
            keys=registry.to_proto().keys,
            registry_keys=officers,
            threshold=args.threshold if args.threshold is not None else latest.threshold,
        )
    except CollateralSyncError as err:
        raise KeysUsageError(err.message) from err
    chain = signed.to_proto()
    chain.versions.append(version)
    write_chain(out, chain)
    print(
        f"version {latest.version + 1} drafted in {out} ({action} {args.key_id[:16]}…): "
        "sign it with keys sign-registry, by the current and the new registry keys"
    )
    return _EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    from collateral_sync.keys import SigningKey
    from collateral_sync.signed_registry import read_chain, sign_version, write_chain

    path = _existing(args.registry, "--registry")
    chain = read_chain(path)
    if not chain.versions:
        raise KeysUsageError(f"--registry {path}: holds no version to sign")
    try:
        key = SigningKey.load(_existing(args.key, "--key"))
        sign_version(chain.versions[-1], key)
    except CollateralSyncError as err:
        raise KeysUsageError(f"--key: {err.message}") from err
    write_chain(path, chain)
    count = len(chain.versions[-1].signatures)
    print(f"signed the last version of {path} with {key.key_id[:16]}… ({count} signatures)")
    return _EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from collateral_sync.signed_registry import SignedKeyRegistry, read_chain

    path = _existing(args.registry, "--registry")
    try:
        signed = SignedKeyRegistry.verify(read_chain(path), root_sha256=args.root)
    except CollateralSyncError as err:
        print(f"REFUSED {path}: {err.reason_name}: {err.message}")
        return _EXIT_REFUSED
    latest = signed.latest
    print(f"VERIFIED {path}: version {latest.version}, {len(latest.keys)} party keys")
    print(f"root sha256 {signed.root_sha256}")
    return _EXIT_OK


# --- helpers --------------------------------------------------------------------------


def _existing(value: str, option: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise KeysUsageError(f"{option} {path}: no such file")
    return path


def _writable(value: str) -> Path:
    path = Path(value)
    if not path.parent.is_dir():
        raise KeysUsageError(f"--out {path}: the directory {path.parent} does not exist")
    return path


def _plain(path: Path, option: str) -> KeyRegistry:
    from collateral_sync.keys import KeyRegistry

    try:
        return KeyRegistry.load(path)
    except CollateralSyncError as err:
        raise KeysUsageError(f"{option}: {err.message}") from err


def _verified(path: Path, option: str) -> Any:
    from collateral_sync.signed_registry import SignedKeyRegistry, is_chain_file, read_chain

    if not is_chain_file(path):
        raise KeysUsageError(
            f"{option} {path}: a plain registry; start a signed one with keys init"
        )
    try:
        return SignedKeyRegistry.verify(read_chain(path))
    except CollateralSyncError as err:
        raise KeysUsageError(
            f"{option} {path}: {err.message} (every version must be signed before the next)"
        ) from err


def _after(latest: keys_pb2.KeyRegistryVersion) -> datetime:
    return latest.issued_at.ToDatetime(tzinfo=UTC) + timedelta(microseconds=1)


def _print_keys(keys: Any) -> None:
    from collateral_sync.keys import role_name

    for key in keys:
        until = key.valid_until.ToJsonString() if key.HasField("valid_until") else "no end"
        revoked = (
            f"  REVOKED from {key.revoked_at.ToJsonString()}" if key.HasField("revoked_at") else ""
        )
        print(
            f"  {key.key_id[:16]}…  {key.party_id:<24} {role_name(key.role):<24} "
            f"{key.valid_from.ToJsonString()} .. {until}{revoked}"
        )
