"""Whether the reference exchange's custodian is silent (docs/PROTOCOL.md §11.2).

The custodian is silent once the exchange has accepted no frame of its on the
sync stream (a hello, a batch, an ack or a heartbeat) for longer than the
policy's ``custodian_staleness_window``. While it is, what the exchange holds
of it may be out of date, so the exchange neither raises a credit limit
(:mod:`.credit_lines`) nor instructs a liquidation, and a margin call that
falls due meanwhile is withdrawn rather than expired (:mod:`.revaluation`).

Silence is measured on the machine's monotonic clock, as the sync session
measures it: the test clock (AdvanceClock) moves deadlines, not silence.
Until the role points it at its session, the exchange counts from its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from collateral_sync.v1 import valuation_pb2
from collateral_sync.valuation import custodian_staleness_window

__all__ = ["CustodianSilence"]


class CustodianSilence:
    """How long the custodian has been silent, judged against the policy in force."""

    def __init__(self) -> None:
        started = time.monotonic()
        self._silent_for: Callable[[], timedelta] = lambda: timedelta(
            seconds=time.monotonic() - started
        )

    def listen_to(self, silent_for: Callable[[], timedelta]) -> None:
        """Measure from now on with ``silent_for`` (the sync session's ``peer_silent_for``)."""
        self._silent_for = silent_for

    def is_silent(self, policy: valuation_pb2.RiskPolicy) -> bool:
        """Whether the custodian has been silent for longer than ``policy``'s window."""
        return self._silent_for() > custodian_staleness_window(policy)
