"""``python -m collateral_sync_reference.demo``."""

from collateral_sync_reference.demo.run import main

main()
