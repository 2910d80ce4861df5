"""vectors/pae.json: PAE, by an encoder written from docs/PROTOCOL.md §3.2 and by the SDK."""

from __future__ import annotations

from typing import Any

import pytest
from collateral_sync.signing import pae

from ._common import load, own_pae

PAE = load("pae.json")


@pytest.mark.parametrize("vector", PAE["vectors"], ids=lambda v: v["description"][:40])
def test_pae_vector(vector: dict[str, Any]) -> None:
    payload = bytes.fromhex(vector["payload_hex"])
    expected = bytes.fromhex(vector["pae_hex"])
    assert own_pae(vector["payload_type"], payload) == expected
    assert pae(vector["payload_type"], payload) == expected
