"""What every test directory shares: the storage engine the reference servers run on.

``COLLATERAL_SYNC_TEST_STORAGE=postgresql`` (``make test`` runs the storage
tests once more so) puts every reference server the tests start on a real
PostgreSQL: the ``postgres`` fixture starts the machine's own in a temporary
directory for the session (:mod:`_postgres`). Unset, or ``sqlite``, they run
on SQLite files, the default.

``softhsm_token`` is a SoftHSM2 token, the tests' HSM (:mod:`_softhsm`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _postgres import PostgresServer, start_postgres
from _softhsm import SoftHsmToken, create_token, softhsm_missing

ENGINE = os.environ.get("COLLATERAL_SYNC_TEST_STORAGE", "sqlite")
if ENGINE not in ("sqlite", "postgresql"):
    raise RuntimeError(f"COLLATERAL_SYNC_TEST_STORAGE must be sqlite or postgresql, not {ENGINE!r}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session, stopped and removed at its end."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_postgres(request: pytest.FixtureRequest) -> PostgresServer | None:
    """The PostgreSQL the reference servers store in, or None when they run on SQLite."""
    if ENGINE != "postgresql":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """A SoftHSM2 token of the session's own; SOFTHSM2_CONF points at it for every process.

    One per session: SoftHSM2 sees only the tokens that existed when a process
    first loaded it. Skipped only where SoftHSM2 is not installed.
    """
    missing = softhsm_missing()
    if missing is not None:
        pytest.skip(missing)
    token = create_token(tmp_path_factory.mktemp("softhsm"), label="collateral-sync-tests")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(token.config))
        yield token
