"""``python -m collateral_sync_conformance``: the same as ``collateral-sync conformance``."""

import sys

from collateral_sync_conformance._cli import main

sys.exit(main(prog="python -m collateral_sync_conformance"))
