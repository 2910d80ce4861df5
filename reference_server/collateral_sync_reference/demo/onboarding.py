"""Acts 2 and 3 of the demo: the exchange's risk policy, then the client's path and pledges."""

from __future__ import annotations

from datetime import timedelta

from collateral_sync.amounts import amount_to_proto
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import common_pb2, exchange_service_pb2, liquidation_pb2, valuation_pb2

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.facts import asset_class_name, positions_text, reason_name
from collateral_sync_reference.demo.scenario import (
    ACCOUNT,
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    PATH_ID,
    PATH_STEPS,
    PATH_TTL,
    PLEDGES,
    PROCEEDS_ACCOUNT,
)
from collateral_sync_reference.demo.stage import Attested, Stage

__all__ = ["OnboardingActs"]


class OnboardingActs(Stage):
    """The risk policy the client relies on, and the pledges it signs (acts 2 and 3)."""

    async def _risk_policy(self) -> None:
        say.section("2. The exchange publishes its risk policy")
        envelope = (
            await self._c.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
        ).risk_policy
        policy = self._open(envelope, valuation_pb2.RiskPolicy, CLIENT)
        self._policy = policy
        self.evidence.relied_on_by_custodian(envelope)
        say.step(
            f"risk policy v{policy.version}, signed by {policy.header.issuer} for everyone, "
            f"values in {policy.valuation_currency}:"
        )
        say.detail(
            "haircuts "
            + " · ".join(
                f"{asset_class_name(h.asset_class)} {h.collateral_factor.value}"
                for h in policy.haircuts
            )
            + "; an asset not listed counts 0"
        )
        say.detail(
            "concentration caps "
            + " · ".join(
                f"{asset_class_name(c.asset_class)} {c.max_share.value}"
                for c in policy.concentration_caps
            )
            + " of the haircut total"
        )
        say.detail(
            f"leverage cap {policy.leverage_cap.value}x · margin call below a collateral ratio of "
            f"{policy.maintenance_ratio.value} · liquidation below {policy.liquidation_ratio.value}"
            f" · cure period {policy.cure_period.ToTimedelta() // timedelta(hours=1)} h"
        )
        rule = valuation_pb2.AutoDeleveragingRule.Name(policy.auto_deleveraging_rule)
        say.detail(
            f"insurance fund {say.amount(policy.insurance_fund_balance.value)}, then "
            f"auto-deleveraging ranked by {rule.removeprefix('AUTO_DELEVERAGING_RULE_')}"
        )

    async def _pledges(self) -> list[Attested]:
        say.section("3. Pledge: BTC, USDC, the fund token BENJI and the tokenized stock TSLAx")
        opened = await self._holdings_now()
        say.step(f"{CUSTODIAN} holds {ACCOUNT} for {CLIENT}: {positions_text(opened.statement)}")
        say.detail(
            f"holdings statement epoch {opened.statement.epoch} ({reason_name(opened.statement)}), "
            f"leaf {opened.ref.leaf_index} of its attestation log, signed by "
            f"{opened.statement.header.issuer}"
        )
        self._path = sign_statement(
            liquidation_pb2.LiquidationPath(
                account_id=ACCOUNT,
                exchange_id=EXCHANGE,
                proceeds_account_id=PROCEEDS_ACCOUNT,
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id=asset, venue=venue, max_quantity=amount_to_proto(most)
                    )
                    for asset, venue, most in PATH_STEPS
                ],
            ),
            self._client_key,
            audience=[CUSTODIAN],
            sequence=next(self._sequence),
            ttl=PATH_TTL,
            issued_at=self._clock.now(),
            statement_id=PATH_ID,
        )
        say.step(
            f"{CLIENT} signs its pre-authorised liquidation path {PATH_ID} "
            f"(proceeds to {PROCEEDS_ACCOUNT}):"
        )
        say.detail(
            " -> ".join(
                f"{asset} up to {say.amount(most)} via {venue}" for asset, venue, most in PATH_STEPS
            )
        )
        pledged = []
        for asset, quantity in PLEDGES:
            attested = await self._pledge(asset, quantity)
            pledged.append(attested)
            say.step(
                f"{CLIENT} pledges {asset} {say.amount(quantity)} to {EXCHANGE}: {CUSTODIAN} "
                f"attests epoch {attested.statement.epoch} ({reason_name(attested.statement)}) "
                f"at leaf {attested.ref.leaf_index}"
            )
        self._holdings = pledged[-1]
        say.detail(f"now: {positions_text(pledged[-1].statement)}")
        impostor = SigningKey.generate(CLIENT, common_pb2.PARTY_ROLE_CLIENT)
        await self._expect_refusal(
            f"a pledge signed by a key that claims to be {CLIENT} but is not in the registry",
            self._pledge("BTC", "1", signer=impostor),
        )
        await self._expect_refusal(
            "a pledge of 1 BTC more than the account holds free", self._pledge("BTC", "1")
        )
        return pledged
