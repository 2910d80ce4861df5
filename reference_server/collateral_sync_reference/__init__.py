"""Reference servers of collateral-sync: custodian, exchange and regulator as real processes.

Started with ``collateral-sync serve <role> --config FILE``; each server keeps its
state in its own SQLite database (WAL), talks gRPC over mutual TLS, serves health
and reflection, and in ``--test-mode`` also ``TestControlService`` with a clock
that tests move forward. The packages:

- :mod:`~collateral_sync_reference.custodian`, :mod:`~collateral_sync_reference.exchange`
  and :mod:`~collateral_sync_reference.regulator` — one per role, each exposing
  ``create_role`` to the runner and keeping its rules in modules named for them;
- :mod:`~collateral_sync_reference.common` — what the roles share: the runner,
  configuration, storage, clocks, test control, the emergency co-signer and a
  party's side of reconciliation;
- :mod:`~collateral_sync_reference.demo` — ``make demo``, which drives real
  servers of every role through the whole story.

Only :func:`serve_main` and :data:`ROLE_MODULES` are for use from outside;
docs/ARCHITECTURE.md is the map.
"""

from __future__ import annotations

from collateral_sync_reference.common.runner import ROLE_MODULES, serve_main

__all__ = ["ROLE_MODULES", "serve_main"]
