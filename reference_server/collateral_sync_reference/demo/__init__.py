"""``make demo``: the whole story, end to end, against real reference servers.

Run as ``python -m collateral_sync_reference.demo``. It starts a custodian, an
exchange and a regulator as separate processes over mutual TLS, drives them
as a client and an auditor would, and says at each step what was proven.
``run`` drives the story; ``scenario`` holds its inputs and ``configs`` the
servers' files; ``story`` (over ``stage``, with the chapters ``onboarding``,
``proofs``, ``margin`` and ``liquidation``) and ``oversight`` are its acts,
``evidence`` the proofs it keeps and ``facts`` how it reads statements;
``servers`` starts and stops the processes; ``text`` is how it speaks.
"""

from __future__ import annotations

from collateral_sync_reference.demo.run import main, run

__all__ = ["main", "run"]
