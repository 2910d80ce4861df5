"""Act 15 of the demo: the client takes part of a pledge back, on the exchange's consent.

The client signs a ``PledgeReleaseRequest`` for its second account and asks the
exchange (``RequestPledgeRelease``). A release that would leave the credit
limit below the account's exposure is refused; a smaller one is consented, and
the demo recomputes the consent from its signed inputs with the SDK, as the
custodian or an auditor would. The client relays the consent to the custodian
(``ReleasePledge``), whose next holdings statement (``PLEDGE_RELEASE``) lowers
the pledge and nothing else; the exchange credits that statement once proven.
"""

from __future__ import annotations

from datetime import UTC

from collateral_sync.amounts import amount_to_proto
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    exchange_service_pb2,
    pledge_release_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import recompute_pledge_release_consent

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.facts import cites, positions_text, reason_name
from collateral_sync_reference.demo.scenario import (
    CLIENT,
    CLIENT_TTL,
    CUSTODIAN,
    EXCHANGE,
    RELEASE,
    RELEASE_EXPOSURE,
    RELEASE_REFUSED,
    SECOND_ACCOUNT,
)
from collateral_sync_reference.demo.stage import Stage

__all__ = ["PledgeReleaseAct"]


class PledgeReleaseAct(Stage):
    """Act 15: consent, then release, of part of the second account's pledge."""

    def _release_request(self, asset: str, quantity: str, release_id: str) -> envelope_pb2.Envelope:
        return sign_statement(
            pledge_release_pb2.PledgeReleaseRequest(
                release_id=release_id,
                account_id=SECOND_ACCOUNT,
                exchange_id=EXCHANGE,
                releases=[
                    pledge_release_pb2.ReleasedQuantity(
                        asset_id=asset, quantity=amount_to_proto(quantity)
                    )
                ],
            ),
            self._client_key,
            audience=[EXCHANGE, CUSTODIAN],
            sequence=next(self._sequence),
            ttl=CLIENT_TTL,
            issued_at=self._clock.now(),
        )

    async def _ask_release(
        self, asset: str, quantity: str, release_id: str
    ) -> exchange_service_pb2.RequestPledgeReleaseResponse:
        request = self._release_request(asset, quantity, release_id)
        return await self._c.exchange.request_pledge_release(
            exchange_service_pb2.RequestPledgeReleaseRequest(pledge_release_request=request)
        )

    async def _pledge_release(self) -> None:
        say.section("15. The client takes part of its pledge back: the exchange consents first")
        await self._c.exchange_control.set_exposure(
            test_control_pb2.SetExposureRequest(
                account_id=SECOND_ACCOUNT, exposure=amount_to_proto(RELEASE_EXPOSURE)
            )
        )
        before = await self._holdings_now(SECOND_ACCOUNT)
        say.step(
            f"{SECOND_ACCOUNT} holds {positions_text(before.statement)}; its exposure at "
            f"{EXCHANGE} is {say.amount(RELEASE_EXPOSURE)} (SetExposure)"
        )
        asset, too_much = RELEASE_REFUSED
        await self._expect_refusal(
            f"a release of {asset} {say.amount(too_much)}: the credit limit left would not cover "
            "the exposure",
            self._ask_release(asset, too_much, f"release-{SECOND_ACCOUNT}-0"),
        )
        asset, quantity = RELEASE
        response = await self._ask_release(asset, quantity, f"release-{SECOND_ACCOUNT}-1")
        checked = recompute_pledge_release_consent(
            response.consent, self._registry, audience=CLIENT, now=self._clock.now()
        )
        judged = checked.judgement
        say.step(
            f"{CLIENT} asks {EXCHANGE} to release {asset} {say.amount(quantity)} "
            f"(RequestPledgeRelease): PledgeReleaseConsent signed by {EXCHANGE} for "
            f"{CUSTODIAN} and {CLIENT}, judged on epoch {checked.holdings.epoch}"
        )
        ratio = judged.collateral_ratio_after
        say.detail(
            f"after the release: collateral value {say.amount(judged.collateral_value_after)}, "
            f"credit limit {say.amount(judged.credit_limit_after)} >= exposure "
            f"{say.amount(judged.exposure)}"
            + ("" if ratio is None else f", collateral ratio {say.amount(ratio)}")
            + f" >= maintenance {checked.risk_policy.maintenance_ratio.value}"
        )
        say.check(
            "the consent recomputes from its signed inputs (policy, holdings statement, "
            "prices), and the release is within the pledge and the policy"
        )
        released = await self._c.custodian.release_pledge(
            custodian_service_pb2.ReleasePledgeRequest(consent=response.consent)
        )
        statement = self._open(
            released.holdings_statement, attestation_pb2.HoldingsStatement, CLIENT
        )
        receipt = self._open(released.receipt, pledge_release_pb2.PledgeReleaseReceipt, CLIENT)
        executed = receipt.executed_at.ToDatetime(tzinfo=UTC)
        say.step(
            f"{CLIENT} relays the consent to {CUSTODIAN} (ReleasePledge): PledgeReleaseReceipt "
            f"signed by {CUSTODIAN} at {executed:%H:%M} UTC; epoch {statement.epoch} "
            f"({reason_name(statement)}) at leaf {receipt.holdings.leaf_index}"
        )
        say.detail(f"{SECOND_ACCOUNT} now: {positions_text(statement)}")
        proven = await self.evidence.prove_holdings(released.holdings_statement, receipt.holdings)
        self._proven(proven, receipt.holdings)
        leaf = receipt.holdings.leaf_index

        async def credited() -> valuation_pb2.CreditLine | None:
            response = await self._c.exchange.get_credit_line(
                exchange_service_pb2.GetCreditLineRequest(account_id=SECOND_ACCOUNT)
            )
            credit = self._open(response.credit_line, valuation_pb2.CreditLine, CUSTODIAN)
            return credit if cites(credit, leaf) else None

        credit = await self._until(f"{EXCHANGE} to credit the released statement", credited)
        say.detail(
            f"{EXCHANGE} credits it once proven: collateral value "
            f"{say.amount(credit.collateral_value.value)}, credit limit "
            f"{say.amount(credit.credit_limit.value)}"
        )
