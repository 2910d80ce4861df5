"""``collateral-sync conformance init``: everything the kit needs, written into one directory.

``init --role custodian|exchange|regulator DIR`` writes a development PKI (``pki/``: a CA,
one certificate per party, and a stranger's whose party is in no registry), an Ed25519
signing key per party and the key registry holding them all (``keys/``), a configuration
of the reference server of that role (``server.json``, paths relative to DIR), an
executable ``run-kit.sh`` with the exact ``conformance run`` command, and ``README.txt``.
The registry holds the server's key too: an integrator replaces that entry (and the
server's certificate, if they use their own) with their server's.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from collateral_sync.dev_ca import create_dev_pki
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.v1 import common_pb2

__all__ = ["BASE_PORT", "InitError", "Ports", "init"]

CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"
OTHER_EXCHANGE = "exchange-2"
REGULATOR = "regulator-1"
CLIENT = "client-1"
OTHER_CLIENT = "client-2"
#: A certificate from the same CA whose party is not in the key registry (the access/ cases).
STRANGER = "stranger-1"

_PARTY_ROLES = {
    CUSTODIAN: common_pb2.PARTY_ROLE_CUSTODIAN,
    EXCHANGE: common_pb2.PARTY_ROLE_EXCHANGE,
    OTHER_EXCHANGE: common_pb2.PARTY_ROLE_EXCHANGE,
    REGULATOR: common_pb2.PARTY_ROLE_REGULATOR,
    CLIENT: common_pb2.PARTY_ROLE_CLIENT,
    OTHER_CLIENT: common_pb2.PARTY_ROLE_CLIENT,
}
#: Keys are valid long before any clock a test-mode server may be moved to.
KEYS_VALID_FROM = datetime(2020, 1, 1, tzinfo=UTC)

HOST = "127.0.0.1"
#: The first of the six ports init uses unless told otherwise (--base-port).
BASE_PORT = 7441


@dataclass(frozen=True)
class Ports:
    """Where each role's server listens, and where the kit serves what the server dials.

    Six consecutive ports from ``base``, distinct per role, so that a custodian, an
    exchange and a regulator set up side by side with one base never clash.
    """

    base: int = BASE_PORT

    def __post_init__(self) -> None:
        if not 1 <= self.base <= 65535 - 5:
            raise InitError(f"base port must be between 1 and 65530, got {self.base}")

    def server(self, role: str) -> str:
        offset = {"custodian": 0, "exchange": 1, "regulator": 3}[role]
        return f"{HOST}:{self.base + offset}"

    @property
    def kit_custodian(self) -> str:
        """Exchange runs: the kit's custodian, which the exchange dials."""
        return f"{HOST}:{self.base + 2}"

    @property
    def kit_reconciliation_custodian(self) -> str:
        """Regulator runs: the custodian's ReconciliationService, served by the kit."""
        return f"{HOST}:{self.base + 4}"

    @property
    def kit_reconciliation_exchange(self) -> str:
        """Regulator runs: the exchange's ReconciliationService, served by the kit."""
        return f"{HOST}:{self.base + 5}"


#: The account of the reference custodian the kit uses (owned by the kit's client).
KIT_ACCOUNT = "acct-kit"
LOG_ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
#: Where the server's database and the kit's custodian state go; ``--force`` empties it.
STATE = "state"

_SERVER_PARTY = {"custodian": CUSTODIAN, "exchange": EXCHANGE, "regulator": REGULATOR}


class InitError(Exception):
    """DIR cannot be used (not a directory, or not empty without ``force``)."""


@dataclass(frozen=True)
class Written:
    """What :func:`init` wrote: the directory and the files a reader starts from."""

    directory: Path
    server_config: Path
    run_script: Path
    readme: Path


def _key(party: str) -> str:
    return f"keys/{party}.key.json"


def _cert(party: str) -> str:
    return f"pki/{party}.pem"


def _tls_key(party: str) -> str:
    return f"pki/{party}.key"


def _server_config(role: str, ports: Ports) -> dict[str, Any]:
    party = _SERVER_PARTY[role]
    document: dict[str, Any] = {
        "party_id": party,
        "role": role,
        "listen": ports.server(role),
        "storage": {"path": f"{STATE}/{party}.sqlite"},
        "signing_key": _key(party),
        "key_registry": "keys/registry.json",
        "tls": {"ca": "pki/ca.pem", "cert": _cert(party), "key": _tls_key(party)},
    }
    if role == "custodian":
        # The kit's exchange dials it; a regulator named (no address) makes it state cut-offs.
        document["peers"] = {EXCHANGE: None, REGULATOR: None}
        # A short heartbeat keeps sync/heartbeat-on-idle (1.5 intervals) quick.
        document["sync"] = {"window": 8000, "batch_size": 1000, "heartbeat_interval_ms": 1000}
        document["custodian"] = {
            "accounts": [
                {
                    "account_id": KIT_ACCOUNT,
                    "client_id": CLIENT,
                    "holdings": {"USDC": "250000", "BTC": "10", "BENJI": "1000"},
                },
                {
                    "account_id": f"{KIT_ACCOUNT}-other",
                    "client_id": CLIENT,
                    "holdings": {"USDC": "10"},
                },
                # Where settlements land (PROTOCOL.md §10.6): the exchange's own account.
                {"account_id": f"{EXCHANGE}/settlement", "client_id": EXCHANGE, "holdings": {}},
            ]
        }
    elif role == "exchange":
        # Its custodian is the kit (--listen).
        document["peers"] = {CUSTODIAN: ports.kit_custodian, REGULATOR: None}
        document["exchange"] = {
            "log_origin": LOG_ORIGIN,
            "prices": [
                {"asset_id": "BTC", "price": "60000"},
                {"asset_id": "USDC", "price": "1"},
                {"asset_id": "BENJI", "price": "1"},
            ],
            # Short enough for the kit to wait out its custodian's silence (§11.2).
            "risk_policy": {"custodian_staleness_window_seconds": 8},
        }
    else:
        # The parties it reconciles are the kit (--listen, --listen-exchange).
        document["peers"] = {
            CUSTODIAN: ports.kit_reconciliation_custodian,
            EXCHANGE: ports.kit_reconciliation_exchange,
        }
    return document


def _identities(*parties: str) -> list[str]:
    options: list[str] = []
    for party in parties:
        options += ["--identity", _cert(party), _tls_key(party)]
    return options


def kit_arguments(role: str, ports: Ports) -> list[str]:
    """The ``conformance run`` options (paths relative to DIR) for a server of ``role``."""
    further = (CLIENT, OTHER_CLIENT, OTHER_EXCHANGE, REGULATOR, STRANGER)
    keys: tuple[str, ...]
    if role == "custodian":
        kit_party, keys = EXCHANGE, (EXCHANGE, CLIENT, REGULATOR, OTHER_EXCHANGE, OTHER_CLIENT)
        extra = [*_identities(*further), "--account", KIT_ACCOUNT]
    elif role == "exchange":
        kit_party, keys = CUSTODIAN, (CUSTODIAN, CLIENT, OTHER_CLIENT)
        extra = [
            "--server-party",
            EXCHANGE,
            *_identities(*further),
            "--listen",
            ports.kit_custodian,
            "--state-dir",
            f"{STATE}/kit",
            "--log-origin",
            LOG_ORIGIN,
        ]
    else:
        # The last key: an exchange the regulator does not oversee.
        kit_party, keys = CUSTODIAN, (CUSTODIAN, EXCHANGE, CLIENT, OTHER_EXCHANGE)
        extra = [
            "--server-party",
            REGULATOR,
            *_identities(STRANGER),
            "--listen",
            ports.kit_reconciliation_custodian,
            "--listen-exchange",
            ports.kit_reconciliation_exchange,
        ]
    arguments = [
        "--role",
        role,
        "--target",
        ports.server(role),
        "--ca",
        "pki/ca.pem",
        "--cert",
        _cert(kit_party),
        "--key",
        _tls_key(kit_party),
        "--registry",
        "keys/registry.json",
    ]
    for party in keys:
        arguments += ["--kit-key", _key(party)]
    return [*arguments, *extra, "--wait", "30", "--report-dir", "report"]


def _script(role: str, ports: Ports) -> str:
    options = kit_arguments(role, ports)
    lines = []
    # One option (with its values) a line.
    index = 0
    while index < len(options):
        end = index + 1
        while end < len(options) and not options[end].startswith("--"):
            end += 1
        lines.append("  " + " ".join(shlex.quote(part) for part in options[index:end]))
        index = end
    body = " \\\n".join(["exec collateral-sync conformance run", *lines, '  "$@"'])
    return (
        "#!/bin/sh\n"
        f"# The conformance kit against the {role} at {ports.server(role)}\n"
        "# (written by 'collateral-sync conformance init'; paths are relative to this directory).\n"
        "# Further options are passed on, e.g.: ./run-kit.sh --run 'transport/*'\n"
        "set -e\n"
        'cd "$(dirname "$0")"\n'
        f"{body}\n"
    )


def _readme(role: str, directory: Path, ports: Ports) -> str:
    party = _SERVER_PARTY[role]
    address = ports.server(role)
    where = shlex.quote(str(directory))
    dials = {
        "custodian": "",
        "exchange": f"   Your exchange dials its custodian, the kit, at {ports.kit_custodian}\n"
        f"   (log origin {LOG_ORIGIN}).\n",
        "regulator": f"   Your regulator dials the custodian's and the exchange's\n"
        f"   ReconciliationService, the kit, at {ports.kit_reconciliation_custodian} and "
        f"{ports.kit_reconciliation_exchange}.\n",
    }[role]
    return (
        f"The collateral-sync conformance kit, set up to test a {role} at {address}.\n"
        "\n"
        f"1) Start your server on {address} (its party: {party}), or the reference {role}:\n"
        f"     collateral-sync serve {role} --config {where}/server.json --test-mode\n"
        f"{dials}"
        f"2) Run the kit:\n"
        f"     {where}/run-kit.sh\n"
        "   Reports go to report/ (report.html, results.json, junit.xml).\n"
        "\n"
        "What is here: pki/ a development CA and a certificate per party (stranger-1's party\n"
        "is in no registry); keys/ a signing key per party and keys/registry.json with all\n"
        f"their public keys. For your own server, give it pki/ca.pem, pki/{party}.pem and\n"
        f"pki/{party}.key, and the registry; or replace {party}'s entry in keys/registry.json\n"
        "with your server's public key (and its certificate with one from this CA).\n"
        "server.json configures the reference server (paths relative to this directory);\n"
        f"its database and the kit's state go to {STATE}/. Run 'collateral-sync conformance\n"
        f"init --role {role} --force {where}' to start again with new keys.\n"
    )


def init(role: str, directory: Path, *, force: bool = False, base_port: int = BASE_PORT) -> Written:
    """Write the kit's set-up for a server of ``role`` into ``directory``.

    Its server and the kit's own listeners take six ports from ``base_port`` (:class:`Ports`).
    """
    ports = Ports(base_port)
    if directory.exists() and not directory.is_dir():
        raise InitError(f"{directory} is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise InitError(f"{directory} is not empty; pass --force to write into it anyway")
    directory.mkdir(parents=True, exist_ok=True)
    # New keys make an earlier server database and kit state useless.
    shutil.rmtree(directory / STATE, ignore_errors=True)
    create_dev_pki(directory / "pki", parties=[*_PARTY_ROLES, STRANGER], overwrite=True)
    (directory / "keys").mkdir(exist_ok=True)
    registry = KeyRegistry()
    for party, party_role in _PARTY_ROLES.items():
        key = SigningKey.generate(party, party_role)
        key.save(directory / _key(party))
        registry.add(key.party_key(valid_from=KEYS_VALID_FROM))
    registry.save(directory / "keys" / "registry.json")
    server_config = directory / "server.json"
    server_config.write_text(json.dumps(_server_config(role, ports), indent=2) + "\n", "utf-8")
    script = directory / "run-kit.sh"
    script.write_text(_script(role, ports), "utf-8")
    script.chmod(0o755)
    readme = directory / "README.txt"
    readme.write_text(_readme(role, directory, ports), "utf-8")
    return Written(directory, server_config, script, readme)
