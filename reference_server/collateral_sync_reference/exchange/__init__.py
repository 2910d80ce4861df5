"""The reference exchange: credits only proven collateral, values it, calls margin, liquidates.

``create_role`` is what the runner calls (``collateral-sync serve exchange``);
everything else here is the role's inside, one module per responsibility.
"""

from __future__ import annotations

from collateral_sync_reference.exchange.role import create_role

__all__ = ["create_role"]
