"""Fixtures for the conformance kit's own tests.

The kit is importable from the source tree whether or not the editable install
predates it. The reference-server fixtures (a development PKI, party keys, real
server processes on port 0) are shared with tests/reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from collateral_sync.transport import TlsConfig

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / "conformance", ROOT / "reference_server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from reference.conftest import (  # noqa: E402 (needs the paths above)
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    OTHER_CLIENT,
    OTHER_EXCHANGE,
    REGULATOR,
    STRANGER,
    Parties,
    ServerProcess,
    StartServer,
    reference_parties,
    start_server,
)

__all__ = [
    "CLIENT",
    "CUSTODIAN",
    "EXCHANGE",
    "FURTHER_IDENTITIES",
    "KIT_ACCOUNT",
    "OTHER_EXCHANGE",
    "REGULATOR",
    "Parties",
    "ServerProcess",
    "StartServer",
    "custodian",
    "custodian_config",
    "further_tls",
    "identity_argv",
    "kit_argv",
    "parties_identity_argv",
    "quiet_custodian_config",
    "reference_parties",
    "regulator_argv",
    "start_server",
]


@pytest.fixture(scope="session")
def kit_files(reference_parties: Parties) -> dict[str, Path]:
    """The files a kit run against a custodian needs, as the exchange plus a client."""
    files = reference_parties.pki.party(EXCHANGE)
    return {
        "ca": reference_parties.pki.ca_cert,
        "cert": files.cert,
        "key": files.key,
        "registry": reference_parties.registry_path,
        "exchange_key": reference_parties.key_path(EXCHANGE),
        "client_key": reference_parties.key_path(CLIENT),
        # Emergency releases need a second signer beside the exchange.
        "regulator_key": reference_parties.key_path(REGULATOR),
        # A registered exchange that is not the stream's peer (sync/third-party-*).
        "other_exchange_key": reference_parties.key_path(OTHER_EXCHANGE),
        # A registered client that does not own the kit's account (pledge-release/*).
        "other_client_key": reference_parties.key_path(OTHER_CLIENT),
        # Further TLS identities (access/ cases): the account's client, another client,
        # another exchange, the regulator, and a stranger from the same CA.
        **{
            f"identity:{party}": reference_parties.pki.party(party).cert
            for party in (CLIENT, OTHER_CLIENT, OTHER_EXCHANGE, REGULATOR, STRANGER)
        },
    }


def identity_argv(files: dict[str, Path]) -> list[str]:
    """``--identity CERT KEY`` for each further identity in ``files``."""
    argv: list[str] = []
    for name, cert in files.items():
        if name.startswith("identity:"):
            argv += ["--identity", str(cert), str(cert.with_suffix(".key"))]
    return argv


def parties_identity_argv(parties: Parties, *party_ids: str) -> list[str]:
    """``--identity CERT KEY`` for each of ``party_ids`` (default: every test party but the server's)."""
    argv: list[str] = []
    for party in party_ids:
        files = parties.pki.party(party)
        argv += ["--identity", str(files.cert), str(files.key)]
    return argv


#: The further identities of exchange and regulator runs (access/ cases).
FURTHER_IDENTITIES = (CLIENT, OTHER_CLIENT, OTHER_EXCHANGE, REGULATOR, STRANGER)


def further_tls(parties: Parties) -> list[TlsConfig]:
    """The TLS material of :data:`FURTHER_IDENTITIES` (a fault proxy passes them through)."""
    return [TlsConfig.from_dev_pki(parties.pki, party) for party in FURTHER_IDENTITIES]


#: Accounts of the reference custodian the kit is run against; the kit uses KIT_ACCOUNT.
KIT_ACCOUNT = "acct-kit"
KIT_ACCOUNTS = {
    KIT_ACCOUNT: {"USDC": "250000", "BTC": "10", "BENJI": "1000"},
    "acct-kit-other": {"USDC": "10"},
}


def custodian_config(parties: Parties, directory: Path) -> dict[str, Any]:
    """A reference custodian serving the kit's exchange, with the kit's accounts."""
    return parties.config(
        CUSTODIAN,
        "custodian",
        directory,
        # A regulator named (no address): the custodian states cut-offs for the
        # reconciliation/ cases, which the kit reads as the regulator would.
        peers={EXCHANGE: None, REGULATOR: None},
        # A short heartbeat keeps sync/heartbeat-on-idle (which waits 1.5 intervals) quick.
        sync={"window": 8000, "batch_size": 1000, "heartbeat_interval_ms": 1000},
        custodian={
            "accounts": [
                {"account_id": account, "client_id": CLIENT, "holdings": holdings}
                for account, holdings in KIT_ACCOUNTS.items()
            ]
            # Where settlements land (PROTOCOL.md §10.6): the exchange's own account.
            + [{"account_id": f"{EXCHANGE}/settlement", "client_id": EXCHANGE, "holdings": {}}]
        },
    )


#: The fund token of KIT_ACCOUNT: it earns a daily yield at the reference custodian.
KIT_FUND_TOKEN = "BENJI"


def quiet_custodian_config(parties: Parties, directory: Path) -> dict[str, Any]:
    """:func:`custodian_config` with the kit's account holding no fund token: no daily yield
    accrual attests it anew, only a refresh does (PROTOCOL.md §5.8, Refresh)."""
    config = custodian_config(parties, directory)
    for account in config["custodian"]["accounts"]:
        if account["account_id"] == KIT_ACCOUNT:
            account["holdings"] = {
                asset: quantity
                for asset, quantity in account["holdings"].items()
                if asset != KIT_FUND_TOKEN
            }
    return config


@pytest.fixture(scope="module")
def custodian(
    start_server: StartServer, reference_parties: Parties, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """A reference custodian in test mode, one per test module."""
    directory = tmp_path_factory.mktemp("kit-custodian")
    return start_server("custodian", custodian_config(reference_parties, directory))


def kit_argv(files: dict[str, Path], target: str, *extra: str) -> list[str]:
    """``run`` arguments for a custodian at ``target``, the kit playing exchange, client and regulator."""
    return [
        "run",
        "--role",
        "custodian",
        "--target",
        target,
        "--ca",
        str(files["ca"]),
        "--cert",
        str(files["cert"]),
        "--key",
        str(files["key"]),
        "--registry",
        str(files["registry"]),
        "--kit-key",
        str(files["exchange_key"]),
        "--kit-key",
        str(files["client_key"]),
        "--kit-key",
        str(files["regulator_key"]),
        "--kit-key",
        str(files["other_exchange_key"]),
        "--kit-key",
        str(files["other_client_key"]),
        *identity_argv(files),
        "--no-colour",
        *extra,
    ]


def regulator_argv(
    parties: Parties,
    target: str,
    *extra: str,
    # The last: an exchange the regulator does not oversee (regulator/unoverseen-party-refused).
    keys: tuple[str, ...] = (CUSTODIAN, EXCHANGE, CLIENT, OTHER_EXCHANGE),
) -> list[str]:
    """``run`` arguments for a regulator at ``target``, the kit signing as the ``keys`` parties."""
    files = parties.pki.party(CUSTODIAN)
    argv = [
        "run",
        "--role",
        "regulator",
        "--target",
        target,
        "--ca",
        str(parties.pki.ca_cert),
        "--cert",
        str(files.cert),
        "--key",
        str(files.key),
        "--registry",
        str(parties.registry_path),
        "--server-party",
        REGULATOR,
        "--no-colour",
    ]
    for party in keys:
        argv += ["--kit-key", str(parties.key_path(party))]
    argv += parties_identity_argv(parties, STRANGER)
    return [*argv, *extra]
