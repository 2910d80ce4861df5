"""The reference exchange's published risk policy: its versions, the one in force, re-signing.

:mod:`.policy` builds the policy content from the configuration; this
module publishes it as a signed, versioned ``RiskPolicy`` for anyone, on the
sync log to the custodian, keeps the version in force fresh (re-signed, same
content, when less than half its lifetime is left) and serves GetRiskPolicy.
"""

from __future__ import annotations

from datetime import datetime

from collateral_sync.errors import StateError
from collateral_sync.v1 import envelope_pb2, errors_pb2, position_sync_pb2, valuation_pb2

from collateral_sync_reference.exchange.context import ANYONE, ExchangeContext, is_stale, to_ns
from collateral_sync_reference.exchange.policy_content import policy_content_key

__all__ = ["RiskPolicies"]

_R = errors_pb2.ErrorReason


class RiskPolicies:
    """Every version of the exchange's risk policy, as published and served."""

    def __init__(self, context: ExchangeContext) -> None:
        self._context = context
        self._store = context.store
        self._settings = context.settings

    def publish_configured(self, now: datetime) -> None:
        """Publish the configured policy if it differs from the one in force, inside a transaction.

        The configured insurance-fund balance is the fund's opening balance:
        once a policy is published the balance is state (shortfalls draw on
        it), so a restart keeps the balance in force and publishes a new
        version only if another figure of the configuration changed.
        """
        latest = self._store.policies.latest()
        content = valuation_pb2.RiskPolicy()
        content.CopyFrom(self._settings.policy_content)
        if latest is not None:
            in_force = valuation_pb2.RiskPolicy.FromString(latest[1].payload)
            content.insurance_fund_balance.CopyFrom(in_force.insurance_fund_balance)
        if latest is None or latest[2] != policy_content_key(content):
            self.publish(content, now)

    def publish(self, content: valuation_pb2.RiskPolicy, now: datetime) -> envelope_pb2.Envelope:
        """Sign ``content`` as the next version, in force from ``now``, and send it."""
        latest = self._store.policies.latest()
        policy = valuation_pb2.RiskPolicy()
        policy.CopyFrom(content)
        policy.ClearField("header")
        policy.version = 1 if latest is None else latest[0] + 1
        policy.effective_from.FromDatetime(now)
        envelope = self._context.sign(
            policy, audience=[ANYONE], ttl=self._settings.policy_ttl, now=now
        )
        self._store.policies.add(policy.version, envelope, policy_content_key(policy), to_ns(now))
        self._context.append(position_sync_pb2.PositionUpdate(risk_policy=envelope))
        self._context.logger.info("published risk policy version %d", policy.version)
        return envelope

    def in_force(self, now: datetime) -> tuple[valuation_pb2.RiskPolicy, envelope_pb2.Envelope]:
        """The policy in force, re-signed first if less than half its lifetime is left."""
        latest = self._store.policies.latest()
        if latest is None:
            raise StateError(
                "no risk policy has been published",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a published policy", "actual": "none"},
            )
        version, envelope, _ = latest
        envelope = self._refreshed(version, envelope, now)
        return valuation_pb2.RiskPolicy.FromString(envelope.payload), envelope

    def _refreshed(
        self, version: int, envelope: envelope_pb2.Envelope, now: datetime
    ) -> envelope_pb2.Envelope:
        resigned = self._context.resign_if_stale(
            envelope,
            valuation_pb2.RiskPolicy,
            audience=[ANYONE],
            ttl=self._settings.policy_ttl,
            now=now,
        )
        if resigned is None:
            return envelope
        self._store.policies.replace_envelope(version, resigned)
        return resigned

    def risk_policy(self, version: int) -> envelope_pb2.Envelope:
        """GetRiskPolicy: the policy in force (0) or a given version; NOT_FOUND otherwise."""
        if version == 0:
            latest = self._store.policies.latest()
            found = None if latest is None else (latest[0], latest[1])
        else:
            envelope = self._store.policies.get(version)
            found = None if envelope is None else (version, envelope)
        if found is None:
            latest = self._store.policies.latest()
            newest = 0 if latest is None else latest[0]
            raise StateError(
                f"risk policy version {version} is not published (latest is {newest})",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": f"1..{newest}", "actual": str(version)},
            )
        now = self._context.now()
        if not is_stale(found[1], valuation_pb2.RiskPolicy, self._settings.policy_ttl, now):
            return found[1]
        with self._context.storage.transaction():
            return self._refreshed(found[0], found[1], now)
