"""The reference exchange's domain: what it credits, how it values, and the statements it issues.

The exchange's rules, and nothing about gRPC, live in the parts
:class:`ExchangeCore` builds. They are driven by three things, each inside
one storage transaction:

- the custodian's sync updates (:meth:`ExchangeCore.apply_updates`, the sync
  session's apply callback, inside the transaction that stores the batch);
- the attestation checker, which credits or rejects a received holdings
  statement once its inclusion in the custodian's log is proven
  (:meth:`.holdings.AttestedHoldings.settle_holdings`);
- requests: RespondToMarginCall, RequestPledgeRelease, and in test mode SetExposure, SetPrice,
  RunValuation and the clock.

Every change revalues the accounts it touches
(:meth:`.revaluation.Revaluer.revalue`): the collateral is valued with
:mod:`collateral_sync.valuation` under the policy in force and the price
source's quotes; a changed figure is published as a new signed
``CreditLine``; below maintenance a signed ``MarginCall`` carrying its signed
inputs is issued; an expired call or a ratio below the liquidation line leads
to a signed ``LiquidationInstruction``. Everything the exchange signs for
the custodian is appended to the exchange→custodian sync log in the same
transaction as the state change, so it is sent exactly once, after the commit.

One part per responsibility, each over the same
:class:`~.context.ExchangeContext` (storage, tables, keys, clock, sync log):

- :mod:`.custodian_statements`: checks what the custodian sends; keeps the
  stream updates it refuses;
- :mod:`.holdings`: holdings statements, pending until proven, then credited;
  the custodian's checkpoints;
- :mod:`.risk_policy`: the published policy, its versions and re-signing;
- :mod:`.valuation`: an account's valuation and the signed inputs it rests on;
- :mod:`.credit_lines`: each account's signed credit line;
- :mod:`.margin_calls`: calls, their states, responses and satisfaction;
- :mod:`.liquidation`: instructions, receipts and shortfall allocation;
- :mod:`.pledge_releases`: consents to a client's release of part of its pledge;
- :mod:`.revaluation`: when an account is revalued and what that leads to;
- :mod:`.custodian_silence`: whether the custodian has been heard lately enough
  to raise credit or liquidate on what it proved (§11.2).

Their tables are in :mod:`.store`, one module per part's group of tables.

:class:`ExchangeCore` builds the parts, publishes the policy at start and
dispatches the custodian's stream to them; callers use the parts directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from collateral_sync.errors import MalformedError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signer import Signer
from collateral_sync.sync import SyncLog
from collateral_sync.v1 import position_sync_pb2

from collateral_sync_reference.common.storage import SqlStorage
from collateral_sync_reference.exchange.context import (
    ExchangeContext,
    ExchangeSettings,
    Revaluation,
)
from collateral_sync_reference.exchange.credit_lines import CreditLines
from collateral_sync_reference.exchange.custodian_silence import CustodianSilence
from collateral_sync_reference.exchange.custodian_statements import CustodianStatements
from collateral_sync_reference.exchange.holdings import AttestedHoldings
from collateral_sync_reference.exchange.liquidations import Liquidations
from collateral_sync_reference.exchange.margin_calls import MarginCalls
from collateral_sync_reference.exchange.pledge_releases import ReleaseConsents
from collateral_sync_reference.exchange.price_feed import PriceSource
from collateral_sync_reference.exchange.revaluation import Revaluer
from collateral_sync_reference.exchange.risk_policy import RiskPolicies
from collateral_sync_reference.exchange.store import ExchangeStore
from collateral_sync_reference.exchange.valuation import Valuer

__all__ = [
    "ExchangeCore",
    "ExchangeSettings",
    "Revaluation",
]


class ExchangeCore:
    """The exchange's parts over its storage; see the module docstring.

    Not thread-safe: it runs on the server's event loop, and no method awaits
    while a transaction is open. Public methods that change state open their
    own transaction, except :meth:`apply_updates`, which runs inside the sync
    session's.
    """

    def __init__(
        self,
        storage: SqlStorage,
        log: SyncLog,
        *,
        signer: Signer,
        registry: KeyRegistry,
        settings: ExchangeSettings,
        prices: PriceSource,
        clock: Callable[[], datetime],
        logger: logging.Logger | None = None,
    ) -> None:
        if signer.party_id != settings.party_id:
            raise ValueError(f"signer is {signer.party_id!r}, expected {settings.party_id!r}")
        if log.peer_party_id != settings.custodian_id:
            raise ValueError(
                f"sync log peer is {log.peer_party_id!r}, expected {settings.custodian_id!r}"
            )
        context = ExchangeContext(
            storage=storage,
            store=ExchangeStore(storage),
            replay=storage.replay_guard(),
            registry=registry,
            settings=settings,
            prices=prices,
            logger=logger or logging.getLogger("collateral_sync_reference.exchange"),
            log=log,
            signer=signer,
            clock=clock,
            revalue_each=self._revalue_each,
        )
        # The log wakes the sync session after commits of storage.transaction().
        storage.add_commit_listener(log.notify)
        self._context = context
        statements = CustodianStatements(context)
        self.policies = RiskPolicies(context)
        self.holdings = AttestedHoldings(context, statements)
        self.valuer = Valuer(context, self.policies, self.holdings)
        self.credit_lines = CreditLines(context)
        self.margin_calls = MarginCalls(context, statements, self.valuer, holdings=self.holdings)
        self.liquidations = Liquidations(
            context,
            statements,
            self.policies,
            self.valuer,
            self.margin_calls,
            holdings=self.holdings,
        )
        self.release_consents = ReleaseConsents(context, self.valuer, self.holdings)
        self.revaluer = Revaluer(
            context, self.valuer, self.credit_lines, self.margin_calls, self.liquidations
        )

    # -- identity --

    @property
    def party_id(self) -> str:
        return self._context.party_id

    @property
    def settings(self) -> ExchangeSettings:
        return self._context.settings

    @property
    def store(self) -> ExchangeStore:
        """The exchange's tables (read-only use outside this class)."""
        return self._context.store

    @property
    def registry(self) -> KeyRegistry:
        return self._context.registry

    def now(self) -> datetime:
        return self._context.now()

    @property
    def silence(self) -> CustodianSilence:
        """Whether the custodian is silent (§11.2); the role points it at its sync session."""
        return self._context.silence

    # -- start --

    def start(self) -> None:
        """Publish the configured policy if it differs from the one in force; revalue all."""
        context = self._context
        now = context.now()
        with context.storage.transaction():
            self.policies.publish_configured(now)
            for account_id, profit in sorted(context.settings.profits.items()):
                context.store.accounts.set_profit(account_id, profit)
            context.prices.tick(now)
            self.revaluer.revalue_each(context.store.accounts.ids(), now)

    # -- sync updates from the custodian --

    def apply_updates(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        """The sync session's apply callback: runs inside the batch's transaction.

        An embedded statement that fails verification (signature, key role,
        audience, replay; freshness is judged on the batch, PROTOCOL.md §3.6.1)
        fails the whole batch, as §6.5 requires: nothing of it is stored. An
        update that verifies but asks for something the exchange cannot do (a
        response to an unknown or closed call, a receipt that does not add up)
        is recorded as rejected with its reason and changes nothing else: the
        stream cannot answer one update, and refusing the batch would block
        every later entry behind it forever.
        """
        now = self._context.now()
        pending = False
        for sequence, update in updates:
            kind = update.WhichOneof("update")
            if kind == "holdings_change":
                self.holdings.receive_holdings(sequence, update.holdings_change, now)
                pending = True
            elif kind == "pledge_change":
                self.holdings.receive_pledge_change(sequence, update.pledge_change)
            elif kind == "yield_accrual":
                self.holdings.receive_yield_accrual(sequence, update.yield_accrual)
            elif kind == "liquidation_receipt":
                self.liquidations.receive_receipt(sequence, update.liquidation_receipt, now)
            elif kind == "margin_call_response":
                self.margin_calls.receive_response(sequence, update.margin_call_response, now)
            else:  # the sync log lets only custodian variants through
                raise MalformedError(
                    f"entry {sequence}: update {kind!r} is not one the custodian sends",
                    metadata={"expected": "a custodian update", "actual": str(kind)},
                )
        if pending:
            # Wake the attestation checker; if the batch rolls back it finds nothing new.
            self.holdings.announce_pending()

    def _revalue_each(self, account_ids: Iterable[str], now: datetime) -> list[Revaluation]:
        # The context's revalue_each: what credited holdings, responses and
        # receipts record can move an account's figures. The revaluer acts
        # through the other parts, so it is built last and reached through here.
        return self.revaluer.revalue_each(account_ids, now)
