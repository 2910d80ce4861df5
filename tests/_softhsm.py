"""A SoftHSM2 token for the tests: PKCS#11, as every HSM speaks it, in a temporary directory.

:func:`create_token` writes a SoftHSM2 configuration whose token directory is
its own, and initialises a token there with ``softhsm2-util --init-token``.
SoftHSM2 reads ``SOFTHSM2_CONF`` when a process first loads it, and sees only
the tokens that existed then: so the ``softhsm_token`` fixture
(``tests/conftest.py``) makes one token for the whole session, before any
test loads the library, and each test makes keys under labels of its own.
Processes started later (servers, the CLI) inherit ``SOFTHSM2_CONF``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SoftHsmToken", "create_token", "softhsm_missing", "unique_label"]

#: Where Debian's softhsm2 package puts the PKCS#11 module.
MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token: the module, its label and PINs, its configuration file."""

    module: Path
    label: str
    pin: str
    so_pin: str
    config: Path


def softhsm_missing() -> str | None:
    """Why SoftHSM2 cannot be used here, or None."""
    if shutil.which("softhsm2-util") is None or not MODULE.is_file():
        return (
            "SoftHSM2 is not installed (softhsm2-util, /usr/lib/softhsm/libsofthsm2.so): "
            "make setup installs Debian's softhsm2"
        )
    return None


def create_token(
    directory: Path, *, label: str, pin: str = "4321", so_pin: str = "87654321"
) -> SoftHsmToken:
    """Initialise a token labelled ``label`` in ``directory/tokens``."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    config = directory / "softhsm2.conf"
    config.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            so_pin,
            "--pin",
            pin,
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return SoftHsmToken(module=MODULE, label=label, pin=pin, so_pin=so_pin, config=config)


def unique_label(prefix: str) -> str:
    """A key label no other test on the session's token uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
