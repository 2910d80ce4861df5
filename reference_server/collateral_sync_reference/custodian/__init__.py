"""The reference custodian: holds the assets, attests to them, executes only what was authorised.

``parse_settings`` and ``create_role`` are what the runner calls (``collateral-sync serve custodian``);
everything else here is the role's inside, one module per responsibility.
"""

from __future__ import annotations

from collateral_sync_reference.custodian.role import create_role, parse_settings

__all__ = ["create_role", "parse_settings"]
