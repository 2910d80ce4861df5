"""The lifecycle ``make demo`` narrates, driven against the running reference servers.

The demo plays three parts, each through public interfaces only:

- the client (``client-1``): signs its liquidation path and its pledges with
  its own key and sends them with ``PledgeCollateral``;
- the market and the trading desk: scripted prices, the account's exposure and
  the servers' clocks, through ``TestControlService`` (test mode);
- an auditor: every statement it prints is verified with the SDK first
  (signature, key role, audience, freshness), every holdings statement is
  proven in the custodian's log (:mod:`collateral_sync_reference.demo.evidence`), a
  margin call is recomputed from its signed inputs, and the liquidation is read
  from its signed records (``ListLiquidations``): the custodian's receipt is
  checked to add up and to agree with the holdings statements around it.

It never reads a server's database. The scenario's inputs (what the client
holds and pledges, the prices, the exposure) are in
:mod:`~collateral_sync_reference.demo.scenario`; every figure the servers
derive from them is read from their signed statements.

:class:`Story` is the acts in order. Each chapter is a module of its own, a
subclass of :class:`~collateral_sync_reference.demo.stage.Stage` (the state and
the calls every act makes): ``onboarding`` (acts 2-3), ``proofs`` (act 4),
``margin`` (acts 5-8) and ``liquidation`` (acts 9-10); act 11 is here.
"""

from __future__ import annotations

from collateral_sync.v1 import position_sync_pb2, test_control_pb2
from google.protobuf import duration_pb2

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.liquidation import LiquidationActs
from collateral_sync_reference.demo.margin import MarginActs
from collateral_sync_reference.demo.onboarding import OnboardingActs
from collateral_sync_reference.demo.proofs import ProofActs

__all__ = ["Story"]


class Story(OnboardingActs, ProofActs, MarginActs, LiquidationActs):
    """Acts 2 to 11 of the demo, against servers that are already running."""

    async def run(self) -> None:
        now = await self._c.custodian_control.advance_clock(
            test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
        )
        self._clock.learn(now.now)
        await self._risk_policy()
        pledged = await self._pledges()
        await self._attestation(pledged)
        self._credit_figures()
        await self._exposure()
        call_id = await self._first_drop()
        await self._top_up(call_id)
        await self._daily_yield()
        await self._liquidation()
        await self._sync_heads()

    async def _agreed_heads(self) -> dict[int, tuple[int, bytes]] | None:
        """Both servers' sync-log heads (sequence, entry hash) by direction, if they agree."""

        def heads(
            state: test_control_pb2.GetSyncStateResponse,
        ) -> dict[int, tuple[int, bytes]]:
            return {d.direction: (d.sequence, d.entry_hash) for d in state.directions}

        ours = heads(
            await self._c.custodian_control.get_sync_state(test_control_pb2.GetSyncStateRequest())
        )
        theirs = heads(
            await self._c.exchange_control.get_sync_state(test_control_pb2.GetSyncStateRequest())
        )
        return ours if ours and ours == theirs else None

    async def _sync_heads(self) -> None:
        say.section("11. Both sides hold the same position-sync logs")
        direction = position_sync_pb2.SyncDirection
        found = await self._until(
            "both servers to report the same sync-log heads", self._agreed_heads
        )
        for number, (sequence, entry_hash) in sorted(found.items()):
            name = direction.Name(number).removeprefix("SYNC_DIRECTION_").replace("_", " ").lower()  # type: ignore[arg-type]
            say.check(
                f"{name}: {sequence} entries on both sides, head hash {entry_hash.hex()[:16]}..."
            )
