"""Reference servers of collateral-sync: custodian, exchange and regulator as real processes.

Started with ``collateral-sync serve <role> --config FILE``; each server keeps its
state in its own SQLite database (WAL), talks gRPC over mutual TLS, serves health
and reflection, and in ``--test-mode`` also ``TestControlService`` with a clock
that tests move forward. The modules:

- :mod:`collateral_sync_reference.custodian` — the custodian role;
- ``_runner`` — the role registry and the process lifecycle shared by every role;
- ``_config``, ``_storage``, ``_clock``, ``_test_control`` — the infrastructure
  the roles build on.
"""

from __future__ import annotations

from collateral_sync_reference._runner import ROLE_MODULES, serve_main

__all__ = ["ROLE_MODULES", "serve_main"]
