"""What the kit signs and sends as the exchange: its risk policy, price snapshots, publication.

A liquidation instruction (§9.2) carries the signed inputs its amount comes
from: the exchange's risk policy, a price snapshot and the custodian's own
holdings statement. The kit makes them as a correct exchange would, and
publishes each policy version on the sync stream before it cites it (§7.1:
a new version is sent on the stream whenever any field changes), so that the
custodian knows the policy the way the protocol tells it, not only from the
instruction's inputs.

The policy's settlement and emergency figures are the pilot's (§7.4), so a
custodian that applies the latest policy it received keeps the daily cap,
dispute window and release wait the settlement and emergency cases expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from collateral_sync.amounts import amount_to_proto
from collateral_sync.v1 import common_pb2, envelope_pb2, position_sync_pb2, valuation_pb2
from collateral_sync.valuation import validate_risk_policy

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import CaseFailure
from collateral_sync_conformance.cases._raw_stream import (
    StreamEnded,
    SyncStream,
    check_ack,
    kit_batch,
)

__all__ = [
    "KIT_PRICE_SOURCE",
    "kit_risk_policy",
    "price_snapshot",
    "publish_risk_policy",
]

#: The price source the kit's policies name and its snapshots quote from.
KIT_PRICE_SOURCE = "conformance-kit"
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE
#: An arbitrary defined class for the kit's per-asset overrides: the override sets the
#: factor, so the valuation does not depend on the custodian's asset list (§7.2, §17 item 4).
_OVERRIDE_CLASS = common_pb2.ASSET_CLASS_STABLECOIN


def kit_risk_policy(
    ctx: CaseContext, now: datetime, factors: Mapping[str, str]
) -> valuation_pb2.RiskPolicy:
    """A valid policy (§7.1) with a per-asset factor for each asset of ``factors``.

    ``rounding_scale`` is 18, the Decimal limit: every published figure —
    collateral values and, in §9.3, the proceeds of a fill — is then rounded at
    the same scale whichever scale a custodian reads §9 to mean. The version is
    fresh and increasing across runs (the kit's sequence counter).
    """
    policy = valuation_pb2.RiskPolicy(
        version=ctx.next_sequence(),
        asset_haircuts=[
            valuation_pb2.AssetHaircut(
                asset_id=asset_id,
                asset_class=_OVERRIDE_CLASS,
                collateral_factor=amount_to_proto(factor),
            )
            for asset_id, factor in sorted(factors.items())
        ],
        leverage_cap=amount_to_proto("2"),
        maintenance_ratio=amount_to_proto("0.5"),
        liquidation_ratio=amount_to_proto("0.4"),
        insurance_fund_balance=amount_to_proto("0"),
        valuation_currency="USD",
        auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE,
        stale_price_rule=valuation_pb2.STALE_PRICE_RULE_ZERO,
        rounding_scale=18,
        max_settlement_cycles_per_day=2,
        price_source=KIT_PRICE_SOURCE,
    )
    policy.cure_period.FromTimedelta(timedelta(hours=24))
    policy.max_price_age.FromTimedelta(timedelta(hours=1))
    policy.settlement_dispute_window.FromTimedelta(timedelta(hours=24))
    policy.emergency_release_wait.FromTimedelta(timedelta(hours=48))
    policy.effective_from.FromDatetime(now - timedelta(minutes=5))
    # The kit's own construction, checked before a server is judged by it.
    validate_risk_policy(policy)
    return policy


async def price_snapshot(
    ctx: CaseContext, prices: Mapping[str, str], now: datetime
) -> envelope_pb2.Envelope:
    """A public, exchange-signed snapshot quoting ``prices``, observed at ``now``."""
    snapshot = valuation_pb2.PriceSnapshot()
    for asset_id, price in sorted(prices.items()):
        quote = snapshot.prices.add(
            asset_id=asset_id, price=amount_to_proto(price), source=KIT_PRICE_SOURCE
        )
        quote.observed_at.FromDatetime(now)
    return await ctx.sign(snapshot, ctx.key(_EXCHANGE_ROLE), audience=["*"], issued_at=now)


async def publish_risk_policy(ctx: CaseContext, policy: envelope_pb2.Envelope) -> None:
    """Send ``policy`` on SyncPositions as the kit's exchange; the custodian must acknowledge it.

    The entry continues the kit's exchange-to-custodian log from the head the
    custodian's hello states (§6.2, §6.8 ``risk_policy``).
    """
    signer = ctx.key(_EXCHANGE_ROLE)
    stream = await SyncStream.open(ctx)
    try:
        n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
        update = position_sync_pb2.PositionUpdate(risk_policy=policy).SerializeToString()
        batch, hashes = await kit_batch(ctx, signer, n + 1, prev, [update])
        await stream.send(position_sync_pb2.SyncFrame(batch=batch))
        try:
            frame = await stream.frame_of(("ack", "close"))
        except StreamEnded as end:
            raise CaseFailure(
                "the custodian ended the sync stream instead of acknowledging the kit's "
                "risk policy",
                expected=f"SyncAck(sequence={n + 1})",
                got=f"{end.outcome.code.name}: {end.outcome.message}",
            ) from end
        check_ack(frame, n + 1, hashes[0])
    finally:
        await stream.close()
    ctx.session.sync_sent = max(ctx.session.sync_sent, n + 1)
