"""The reference regulator: reconciles the parties at each cut-off and co-signs emergency releases.

``parse_settings`` and ``create_role`` are what the runner calls (``collateral-sync serve regulator``).
"""

from __future__ import annotations

from collateral_sync_reference.regulator.role import create_role, parse_settings

__all__ = ["create_role", "parse_settings"]
