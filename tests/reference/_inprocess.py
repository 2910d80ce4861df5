"""Reference servers built in-process, as the runner builds them, for stateful tests.

A stateful test drives a role's parts directly, in one process, on their real
SQLite storage, with a :class:`TestClock` that stands still between steps. What
it must share with ``collateral-sync serve`` is how a server is assembled: keys
and a registry on disk, one configuration file, read by the role's own
``load_config`` and ``parse_settings``, then the storage, the clock and the
:class:`ServerContext` the role is built from. :func:`write_keys` and
:func:`server_context` do exactly that, minus gRPC and TLS.
"""

from __future__ import annotations

import decimal
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.v1 import common_pb2
from collateral_sync_reference.common.clock import TestClock
from collateral_sync_reference.common.config import ServerConfig, load_config
from collateral_sync_reference.common.runner import ServerContext, load_signer
from collateral_sync_reference.common.storage import SqlStorage, open_storage
from hypothesis import settings

from .conftest import CLIENT, EXCHANGE, KEYS_VALID_FROM, OTHER_CLIENT, OTHER_EXCHANGE

__all__ = [
    "ACCOUNTS",
    "EXACT",
    "EXCHANGES",
    "PATH_ORDER",
    "REGISTRY",
    "SETTINGS",
    "SIGNED_TTL",
    "START",
    "InProcessServer",
    "micro",
    "server_context",
    "write_keys",
]

# --- the world both stateful tests of conservation play in

#: Two exchanges at one custodian: the one a test watches, and another.
EXCHANGES = (EXCHANGE, OTHER_EXCHANGE)
#: Account -> the client whose key must sign its pledges and redemptions.
ACCOUNTS: Mapping[str, str] = {"acct-a": CLIENT, "acct-b": CLIENT, "acct-c": OTHER_CLIENT}
#: The order of the liquidation path's steps.
PATH_ORDER = ("USDC", "BTC", "BENJI")
#: The test clock stands still between steps: real time never leaks into an example.
START = datetime(2030, 1, 1, tzinfo=UTC)
SIGNED_TTL = timedelta(hours=1)
#: Reproducible in CI: derandomized, no example database; each example under a second.
SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
)
#: Exact model arithmetic, as the ledger's: nothing is rounded unless asked.
EXACT = decimal.Context(
    prec=200, traps=[decimal.InvalidOperation, decimal.Inexact, decimal.Overflow]
)
_MICRO = Decimal("0.000001")


def micro(units: int) -> Decimal:
    """``units`` millionths: the grain of the amounts the tests draw."""
    return EXACT.multiply(Decimal(units), _MICRO)


#: Where :func:`write_keys` puts the registry, relative to the directory.
REGISTRY = "keys/registry.json"


def write_keys(
    directory: Path, parties: Mapping[str, common_pb2.PartyRole.ValueType]
) -> dict[str, SigningKey]:
    """A fresh key per party under ``directory/keys``, and one registry naming them all."""
    (directory / "keys").mkdir(exist_ok=True)
    registry = KeyRegistry()
    keys: dict[str, SigningKey] = {}
    for party_id, role in parties.items():
        key = SigningKey.generate(party_id, role)
        key.save(directory / "keys" / f"{party_id}.key.json")
        registry.add(key.party_key(valid_from=KEYS_VALID_FROM))
        keys[party_id] = key
    registry.save(directory / REGISTRY)
    return keys


@dataclass(frozen=True, slots=True)
class InProcessServer:
    """What the runner holds before it serves: the context, its storage and its test clock."""

    context: ServerContext
    storage: SqlStorage
    clock: TestClock


def server_context(
    directory: Path,
    document: Mapping[str, Any],
    *,
    role: str,
    parse_settings: Callable[[ServerConfig], object] | None,
    start: datetime,
) -> InProcessServer:
    """Write ``document`` as ``<party_id>.json``, then build the context as ``serve`` does.

    The party's key is ``keys/<party_id>.key.json`` and the registry
    :data:`REGISTRY` (both from :func:`write_keys`), unless the document names
    others. The test clock starts at ``start`` and moves only when the test
    moves it.
    """
    party_id = document["party_id"]
    config_path = directory / f"{party_id}.json"
    config_path.write_text(
        json.dumps(
            {
                "signing_key": f"keys/{party_id}.key.json",
                "key_registry": REGISTRY,
                **document,
            }
        ),
        encoding="utf-8",
    )
    # What common/runner.py does before it serves, minus gRPC and TLS.
    config = load_config(config_path, role=role)
    # The runner passes None for a role module without parse_settings (the exchange).
    settings = None if parse_settings is None else parse_settings(config)
    storage = open_storage(config.storage)
    clock = TestClock(storage, base=lambda: start)
    context = ServerContext(
        config=config,
        settings=settings,
        storage=storage,
        clock=clock,
        signer=load_signer(config),
        registry=KeyRegistry.load(config.key_registry),
        tls=None,
        test_mode=True,
        logger=logging.getLogger(f"collateral_sync_reference.{role}"),
        _shutdown=_refuse_shutdown(party_id),
    )
    return InProcessServer(context=context, storage=storage, clock=clock)


def _refuse_shutdown(party_id: str) -> Callable[[int, str], None]:
    def refuse(code: int, reason: str) -> None:
        raise AssertionError(f"{party_id} asked to stop ({code}): {reason}")

    return refuse
