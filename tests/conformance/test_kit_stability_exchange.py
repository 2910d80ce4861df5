"""Five runs in a row against the reference exchange give the same verdicts.

Apart from test_kit_stability.py because the exchange here dials its own
custodian (this module's) as the kit's exchange party: in one module with the
custodian's runs, its re-dialled stream would replace the kit's streams.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import test_kit_exchange
from .conftest import KIT_ACCOUNT, Parties, ServerProcess
from .test_kit_stability import five_runs

# The server of that module's tests, as a fixture of this module too.
exchange = test_kit_exchange.exchange


def test_five_runs_against_the_exchange_agree(
    exchange: ServerProcess,
    reference_parties: Parties,
    kit_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    skip = [arg for glob in test_kit_exchange.COUNTERPART_CASES for arg in ("--skip", glob)]
    five_runs(
        lambda: test_kit_exchange._exchange_argv(
            reference_parties, kit_files, exchange.address, "--account", KIT_ACCOUNT, *skip
        ),
        tmp_path,
        capsys,
    )
