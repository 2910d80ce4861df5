"""How the reference exchange values an account, and the signed inputs its statements carry.

An account is valued with :mod:`collateral_sync.valuation` under the policy
in force, on its credited holdings (if they are pledged to this exchange)
and the price source's quotes (:meth:`Valuer.value`). A margin call or a
liquidation instruction carries the signed policy, the holdings statement
and a new signed snapshot of the prices it was valued on
(:meth:`Valuer.inputs`), so that the custodian can recompute it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from collateral_sync.v1 import attestation_pb2, common_pb2, envelope_pb2, valuation_pb2
from collateral_sync.valuation import credit_line_figures, value_collateral

from collateral_sync_reference.exchange.context import ANYONE, ExchangeContext
from collateral_sync_reference.exchange.holdings import AttestedHoldings
from collateral_sync_reference.exchange.risk_policy import RiskPolicies
from collateral_sync_reference.exchange.store import HoldingsRow

__all__ = ["AccountValuation", "Valuer"]

_ZERO = Decimal(0)


@dataclass(slots=True)
class AccountValuation:
    """One account valued: the figures, and the signed inputs they rest on."""

    policy: valuation_pb2.RiskPolicy
    policy_envelope: envelope_pb2.Envelope
    holdings: HoldingsRow | None
    holdings_message: attestation_pb2.HoldingsStatement | None
    quotes: list[valuation_pb2.PriceQuote]
    valuation: Any  # collateral_sync.valuation.CollateralValuation
    collateral_value: Decimal
    credit_limit: Decimal
    exposure: Decimal
    ratio: Decimal | None


class Valuer:
    """Values accounts under the policy in force; signs the inputs a statement rests on."""

    def __init__(
        self, context: ExchangeContext, policies: RiskPolicies, holdings: AttestedHoldings
    ) -> None:
        self._context = context
        self._policies = policies
        self._holdings = holdings
        self._store = context.store
        self._settings = context.settings

    def value(self, account_id: str, now: datetime) -> AccountValuation:
        """Value one account now, under the policy in force, on its credited holdings."""
        policy, policy_envelope = self._policies.in_force(now)
        account = self._store.accounts.get(account_id)
        exposure = _ZERO if account is None else account.exposure
        holdings = self._holdings.credited_holdings(account_id)
        message: attestation_pb2.HoldingsStatement | None = None
        positions: Sequence[common_pb2.Position] = ()
        if holdings is not None:
            message = attestation_pb2.HoldingsStatement.FromString(holdings.envelope.payload)
            # Holdings pledged elsewhere (or released) count nothing here.
            if message.exchange_id == self._context.party_id:
                positions = message.positions
            else:
                message = None
        quotes = self._context.prices.quotes(p.asset_id for p in positions)
        valuation = value_collateral(policy, positions, quotes, valued_at=now)
        figures = credit_line_figures(policy, valuation, exposure)
        return AccountValuation(
            policy=policy,
            policy_envelope=policy_envelope,
            holdings=holdings if message is not None else None,
            holdings_message=message,
            quotes=quotes,
            valuation=valuation,
            collateral_value=figures.collateral_value,
            credit_limit=figures.credit_limit,
            exposure=exposure,
            ratio=figures.collateral_ratio,
        )

    def inputs(self, valued: AccountValuation, now: datetime) -> valuation_pb2.ValuationInputs:
        """The signed policy, holdings and a new signed snapshot of the prices used."""
        assert valued.holdings is not None
        snapshot = valuation_pb2.PriceSnapshot(prices=valued.quotes)
        snapshot_envelope = self._context.sign(
            snapshot, audience=[ANYONE], ttl=self._settings.statement_ttl, now=now
        )
        return valuation_pb2.ValuationInputs(
            risk_policy=valued.policy_envelope,
            holdings_statements=[valued.holdings.envelope],
            price_snapshot=snapshot_envelope,
        )
