"""Fixtures for the conformance kit's own tests.

The kit is importable from the source tree whether or not the editable install
predates it. The reference-server fixtures (a development PKI, party keys, real
server processes on port 0) are shared with tests/reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / "conformance", ROOT / "reference_server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from reference.conftest import (  # noqa: E402 (needs the paths above)
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    REGULATOR,
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
    "REGULATOR",
    "Parties",
    "ServerProcess",
    "StartServer",
    "reference_parties",
    "start_server",
]


@pytest.fixture
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
    }
