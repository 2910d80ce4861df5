"""A party's signing key on the session's SoftHSM2 token, made as an operator makes one.

:func:`token_key` runs ``collateral-sync keygen --pkcs11-module`` into a key
registry of its own: the test parties' registry without the party's key
file, so that every statement of the party a counterparty accepts was
signed on the token. The server's configuration names the key with
:attr:`TokenKey.signing_key`; the PIN travels in :data:`PIN_ENV`, which the
test sets for the server processes it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _softhsm import SoftHsmToken, unique_label
from collateral_sync.keys import KeyRegistry

from .conftest import KEYS_VALID_FROM, Parties

__all__ = ["PIN_ENV", "TokenKey", "token_key"]

#: The variable the servers' configurations name for the token's user PIN.
PIN_ENV = "COLLATERAL_SYNC_TEST_HSM_PIN"


@dataclass(frozen=True)
class TokenKey:
    """A key generated on the token, and the registry that holds it."""

    label: str
    key_id: str
    registry_path: Path
    #: The configuration's ``signing_key``: ``{"pkcs11": {...}}``.
    signing_key: dict[str, Any]

    @property
    def registry(self) -> KeyRegistry:
        return KeyRegistry.load(self.registry_path)


def token_key(
    hsm: SoftHsmToken, parties: Parties, party_id: str, role: str, directory: Path
) -> TokenKey:
    """``collateral-sync keygen`` on the token for ``party_id``, into ``directory/registry.json``."""
    registry = KeyRegistry(key for key in parties.registry if key.party_id != party_id)
    registry_path = directory / "registry.json"
    registry.save(registry_path)
    label = unique_label(party_id)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "collateral_sync._cli",
            "keygen",
            "--party",
            party_id,
            "--role",
            role,
            "--registry",
            str(registry_path),
            "--valid-from",
            KEYS_VALID_FROM.isoformat(),
            "--pkcs11-module",
            str(hsm.module),
            "--token",
            hsm.label,
            "--label",
            label,
            "--pin-env",
            PIN_ENV,
        ],
        env={**os.environ, PIN_ENV: hsm.pin},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [entry] = KeyRegistry.load(registry_path).keys_for(party_id)
    return TokenKey(
        label=label,
        key_id=entry.key_id,
        registry_path=registry_path,
        signing_key={
            "pkcs11": {
                "module": str(hsm.module),
                "token": hsm.label,
                "label": label,
                "pin_env": PIN_ENV,
            }
        },
    )
