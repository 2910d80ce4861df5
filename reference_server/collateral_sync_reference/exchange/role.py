"""The reference exchange: credits only proven collateral, values it, calls margin, liquidates.

Serves ``ExchangeService`` (and ``TestControlService`` in test mode) and dials
the custodian's ``SyncPositions`` stream:

- publishes a signed, versioned ``RiskPolicy`` (audience ``"*"``): the pilot's
  seed figures, overridden by the ``risk_policy`` section; a new version
  whenever its content changes (configuration, insurance-fund balance), sent to
  the custodian on the stream;
- receives holdings statements on the stream and credits one only after its
  inclusion in the custodian's attestation log is proven against a checkpoint
  that extends, by a consistency proof, the last one it trusted
  (``attestation``); a statement that fails is recorded as rejected;
- values each account with :mod:`collateral_sync.valuation` under the policy
  and the scripted price source (``price_feed``), and publishes a signed
  ``CreditLine`` whenever a figure changes;
- issues verifiable margin calls below the maintenance ratio and runs their
  lifecycle (responses on the stream or ``RespondToMarginCall``, top-ups,
  expiry, withdrawal); instructs liquidation past the liquidation line or on
  expiry, delivered by ``SubmitLiquidationInstruction`` (``instruction_delivery``);
  a shortfall in the receipt goes to the insurance fund, then is ranked for
  auto-deleveraging, in a signed ``ShortfallAllocation`` (``GetShortfallAllocation``);
- ``EmergencyReleaseService.CoSignEmergencyRelease``: co-signs a release of an
  account it mirrors with no open exposure (``emergency``);
- settlement cycles: nets each account's result since its last cycle into
  settlement instructions and submits them to the custodian
  (``settlement``; ``TestControlService.RunSettlementCycle`` in test mode);
  with ``settlement.after_reconciliation`` (on by default when a regulator is
  configured) a cut-off's cycle runs by itself once the regulator has
  published the cut-off MATCHED, never on BREAKS.
- ``ReconciliationService``: at each cut-off the exchange freezes what it
  mirrors from the custodian's holdings statements, signs a reconciliation
  statement and submits it to the regulator (``common.reconciliation``; its
  ``reconciliation`` object sits in the ``exchange`` section), once the sync
  stream has brought a batch or heartbeat the custodian issued after the
  cut-off (§10.2).

Configuration (the ``exchange`` section of the server's file; every key but
``log_origin`` is optional)::

    "exchange": {
      "custodian": "custodian-1",
      "log_origin": "custodian-1/collateral-sync/attestations",
      "risk_policy": {"maintenance_ratio": "0.5", "cure_period_seconds": 86400, ...},
      "prices": [{"asset_id": "BTC", "price": "60000"},
                 {"asset_id": "BTC", "price": "45000", "at": "2026-03-01T12:00:00Z"}],
      "profits": {"acct-2": "125000"},
      "statement_ttl_seconds": 604800,
      "policy_ttl_seconds": 2592000,
      "instruction_ttl_seconds": 86400,
      "release_consent_ttl_seconds": 300,
      "sweep_interval_seconds": 1,
      "settlement": {"after_reconciliation": true, "result_wait_seconds": 600}
    }

``custodian`` defaults to the one peer with an address in ``peers`` (the
exchange dials it). ``profits`` feeds the auto-deleveraging ranking (there is
no trading engine). The pre-authorised liquidation path of an account is not
configured: the custodian announces it with the holdings change of each pledge
(``HoldingsChange.liquidation_path``), and the exchange's instructions name the
latest one it verified.

The rules live in one module per responsibility (``holdings``, ``risk_policy``,
``valuation``, ``credit_lines``, ``margin_calls``, ``liquidations``,
``pledge_releases``, ``revaluation``), assembled by ``core``; this module reads the configuration and
runs the background tasks: the sync stream (re-dialled with exponential backoff
and jitter, resumed from the durable heads), the attestation checker, the
liquidation submitter, and a sweep for time-driven work (scripted prices that
fall due, cure periods that end).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import grpc.aio
from collateral_sync.clients import CustodianClient
from collateral_sync.errors import CollateralSyncError, RPCError
from collateral_sync.sync import EXCHANGE_TO_CUSTODIAN, SyncSession, dial_sync_stream
from collateral_sync.transport import plaintext_channel_for_testing, secure_channel
from collateral_sync.v1 import errors_pb2

from collateral_sync_reference.common.access import Caller, caller_of
from collateral_sync_reference.common.config import ServerConfig
from collateral_sync_reference.common.emergency import EmergencyReleaseCoSigner
from collateral_sync_reference.common.evidence import KeptEvidence, sync_log_evidence
from collateral_sync_reference.common.reconciliation import (
    PartyReconciliation,
    ReconciliationServicer,
    ReconciliationSettings,
    exchange_holdings,
    parse_reconciliation_settings,
)
from collateral_sync_reference.common.runner import ServerContext
from collateral_sync_reference.exchange.attestation import AttestationChecker
from collateral_sync_reference.exchange.core import ExchangeCore, ExchangeSettings
from collateral_sync_reference.exchange.emergency import exchange_release_policy
from collateral_sync_reference.exchange.instruction_delivery import LiquidationSubmitter
from collateral_sync_reference.exchange.metrics import exchange_figures
from collateral_sync_reference.exchange.policy_content import build_policy_content
from collateral_sync_reference.exchange.price_feed import PriceStep, ScriptedPriceFeed
from collateral_sync_reference.exchange.servicers import ExchangeServicer, ExchangeTestControl
from collateral_sync_reference.exchange.settlement import (
    ExchangeSettlement,
    SettlementAfterReconciliation,
    SettlingTestControl,
)

__all__ = ["ExchangeRole", "ExchangeRoleSettings", "create_role", "parse_exchange_settings"]

_R = errors_pb2.ErrorReason
#: Re-dial backoff (docs/PROTOCOL.md §6.7): initial, factor 2, maximum, with jitter.
_DIAL_INITIAL = 0.1
_DIAL_MAX = 10.0
#: A stream that lasted this long was healthy: the next re-dial starts from the initial delay.
_HEALTHY_STREAM = 2.0
#: Every this many sweeps, revalue every account (prices turn stale with time alone).
_FULL_SWEEP_EVERY = 60


@dataclass(frozen=True, slots=True)
class ExchangeRoleSettings:
    """The ``exchange`` section, read and checked."""

    core: ExchangeSettings
    custodian_address: str
    price_source: str
    prices: tuple[PriceStep, ...]
    sweep_interval: timedelta
    #: None: the default (on exactly when a regulator with an address is configured).
    settle_after_reconciliation: bool | None = None
    #: How long to wait for the regulator's result of a cut-off before giving it up.
    result_wait: timedelta = timedelta(minutes=10)


def parse_exchange_settings(config: ServerConfig) -> ExchangeRoleSettings:
    """Read and check the ``exchange`` section of a server configuration."""
    section = config.role_settings
    dialled = sorted(peer for peer, address in config.peers.items() if address is not None)
    if "custodian" in section:
        custodian = section.string("custodian")
    elif len(dialled) == 1:
        section.string("custodian", dialled[0])
        custodian = dialled[0]
    else:
        raise section.error(
            "custodian",
            "the custodian's party id (needed when peers name more or less than one address)",
            dialled,
        )
    address = config.peers.get(custodian)
    if address is None:
        raise section.error(
            "custodian",
            f"a party with an address in peers (the exchange dials it); peers: {sorted(config.peers)}",
            custodian,
        )
    log_origin = section.string("log_origin")
    policy = build_policy_content(section.section("risk_policy"))
    prices = tuple(PriceStep.from_config(step) for step in section.sections("prices"))
    profits: dict[str, Decimal] = {}
    profit_section = section.section("profits")
    for account_id in list(profit_section.keys()):
        profits[account_id] = profit_section.amount(account_id)
    profit_section.finish()
    settlement = section.section("settlement")
    after_reconciliation = (
        settlement.boolean("after_reconciliation") if "after_reconciliation" in settlement else None
    )
    result_wait = settlement.seconds("result_wait_seconds", 600)
    settlement.finish()
    settings = ExchangeRoleSettings(
        core=ExchangeSettings(
            party_id=config.party_id,
            custodian_id=custodian,
            log_origin=log_origin,
            policy_content=policy,
            statement_ttl=section.seconds("statement_ttl_seconds", 7 * 86_400),
            policy_ttl=section.seconds("policy_ttl_seconds", 30 * 86_400),
            instruction_ttl=section.seconds("instruction_ttl_seconds", 86_400),
            release_consent_ttl=section.seconds("release_consent_ttl_seconds", 300),
            profits=profits,
            max_skew=config.max_skew,
        ),
        custodian_address=address,
        price_source=policy.price_source,
        prices=prices,
        sweep_interval=section.seconds("sweep_interval_seconds", 1),
        settle_after_reconciliation=after_reconciliation,
        result_wait=result_wait,
    )
    section.finish()
    return settings


class ExchangeRole:
    """The exchange as the runner drives it (see :class:`collateral_sync_reference.common.runner.Role`)."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.logger = context.logger
        # Read first: the exchange's own parser refuses keys it does not know.
        reconciliation = parse_reconciliation_settings(context.config, context.registry)
        settings = parse_exchange_settings(context.config)
        self.settings = settings
        clock = context.clock
        storage = context.storage
        log = storage.sync_log(
            party_id=context.party_id,
            peer_party_id=settings.core.custodian_id,
            sending_direction=EXCHANGE_TO_CUSTODIAN,
        )
        self.prices = ScriptedPriceFeed(storage, name=settings.price_source, script=settings.prices)
        self.core = ExchangeCore(
            storage,
            log,
            signer=context.signer,
            registry=context.registry,
            settings=settings.core,
            prices=self.prices,
            clock=clock.now,
            logger=self.logger,
        )
        # Publish the policy and value what is known before the first call is served.
        self.core.start()
        sync = context.config.sync
        self.session = SyncSession(
            log,
            context.signer,
            context.registry,
            apply=self.core.apply_updates,
            window=sync.window,
            batch_size=sync.batch_size,
            heartbeat_interval=sync.heartbeat_interval,
            max_skew=context.config.max_skew,
            clock=clock.now,
        )
        self.core.silence.listen_to(lambda: self.session.peer_silent_for)
        context.metrics.add_source(
            exchange_figures(self.core.store, self.session, clock.now, self.core.silence)
        )
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep_now = asyncio.Event()
        self.client: CustodianClient | None = None
        self.checker: AttestationChecker | None = None
        self.submitter: LiquidationSubmitter | None = None
        self._service = ExchangeServicer(self.core, self.caller)
        self.reconciliation = PartyReconciliation(
            storage=storage,
            signer=context.signer,
            clock=clock,
            settings=reconciliation,
            counterparty_id=settings.core.custodian_id,
            exchange_id=context.party_id,
            holdings=lambda: exchange_holdings(storage),
            tls=context.tls,
            test_mode=context.test_mode,
            logger=self.logger,
            on_submitted=self._statement_submitted,
            # §10.2: a cut-off is stated once a custodian frame issued after it arrived.
            heard_after=lambda: self.session.peer_issued_at,
        )
        evidence = KeptEvidence(
            [lambda: sync_log_evidence(log), self.core.holdings.equivocation_evidence],
            self.caller,
        )
        self._reconciliation_service = ReconciliationServicer(self.reconciliation, evidence)
        self._cosigner = EmergencyReleaseCoSigner(
            signer=context.signer,
            registry=context.registry,
            clock=clock.now,
            policy=exchange_release_policy(self.core),
            max_skew=context.config.max_skew,
        )
        self.settlement = ExchangeSettlement(
            storage,
            self.core.store,
            signer=context.signer,
            custodian_id=settings.core.custodian_id,
            clock=clock.now,
        )
        self.after_reconciliation = self._settle_after_reconciliation(reconciliation)

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who is calling, as the key registry knows them (PROTOCOL.md §4.5)."""
        return caller_of(context, self.context.registry, plaintext=self.context.plaintext)

    def _settle_after_reconciliation(
        self, reconciliation: ReconciliationSettings
    ) -> SettlementAfterReconciliation | None:
        wanted = self.settings.settle_after_reconciliation
        regulator_id = reconciliation.regulator_id
        address = reconciliation.regulator_address
        if regulator_id is None or address is None:
            if wanted:
                raise self.context.config.role_settings.section("settlement").error(
                    "after_reconciliation",
                    "false, or a regulator with an address in peers (reconciliation.regulator)",
                    "true",
                )
            return None
        if wanted is False:
            return None
        return SettlementAfterReconciliation(
            self.settlement,
            self.context.storage,
            exchange_id=self.context.party_id,
            regulator_id=regulator_id,
            regulator_address=address,
            registry=self.context.registry,
            tls=self.context.tls,
            statements=self.reconciliation.submitted_statements,
            custodian=lambda: self.client,
            clock=self.context.clock.now,
            max_skew=self.context.config.max_skew,
            result_wait=self.settings.result_wait,
            logger=self.logger,
        )

    def _statement_submitted(self, cutoff_id: str) -> None:
        if self.after_reconciliation is not None:
            self.after_reconciliation.wake(cutoff_id)

    def servicers(self) -> Sequence[object]:
        return [self._service, self._cosigner, self._reconciliation_service]

    def test_control(self) -> ExchangeTestControl:
        return SettlingTestControl(
            self.core,
            self.context.test_clock,
            sessions=lambda: [self.session],
            on_clock_advanced=self.on_clock_advanced,
            settlement=self.settlement,
            custodian=lambda: self.client,
        )

    async def on_clock_advanced(self) -> None:
        # A cut-off the custodian has been heard past is frozen here; one it has not
        # waits for its frame (§10.2). The view and heads count only what was issued
        # by the cut-off, so the sweep's later entries do not change either.
        self.reconciliation.run_due()
        # Every price may have turned stale and every cure period ended: all accounts.
        self.core.revaluer.sweep(everything=True)

    async def start(self) -> None:
        address = self.settings.custodian_address
        tls = self.context.tls
        self._channel = (
            plaintext_channel_for_testing(address) if tls is None else secure_channel(address, tls)
        )
        self.client = CustodianClient(self._channel)
        self.checker = AttestationChecker(
            self.core.holdings,
            self.client,
            origin=self.settings.core.log_origin,
            custodian_id=self.settings.core.custodian_id,
            registry=self.context.registry,
            clock=self.context.clock.now,
            max_skew=self.context.config.max_skew,
            logger=self.logger,
        )
        self.submitter = LiquidationSubmitter(
            self.core.liquidations, self.client, logger=self.logger
        )
        self._tasks = [
            asyncio.create_task(self._dial_forever(self.client), name="exchange-sync"),
            asyncio.create_task(self.checker.run(), name="exchange-attestations"),
            asyncio.create_task(self.submitter.run(), name="exchange-liquidations"),
            asyncio.create_task(self._sweep_forever(), name="exchange-sweep"),
        ]
        self.reconciliation.start()
        if self.after_reconciliation is not None:
            self.after_reconciliation.start()

    async def stop(self) -> None:
        if self.after_reconciliation is not None:
            await self.after_reconciliation.stop()
        await self.reconciliation.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _dial_forever(self, client: CustodianClient) -> None:
        """Keep the sync stream up: re-dial with backoff and resume after every end."""
        loop = asyncio.get_running_loop()
        delay = _DIAL_INITIAL
        while True:
            started = loop.time()
            try:
                await dial_sync_stream(self.session, client)
                self.logger.info("sync stream ended by the custodian; re-dialling")
            except CollateralSyncError as err:
                if err.reason == _R.ERROR_REASON_EQUIVOCATION:
                    # Two histories of one log: resuming cannot fix it (PROTOCOL.md §6.5).
                    self.logger.critical(
                        "sync stream stopped for good: %s; evidence kept, operator needed",
                        err.message,
                    )
                    return
                if not isinstance(err, RPCError):  # our own refusal (the custodian counts its)
                    self.context.metrics.count_refusal(err.reason)
                self.logger.warning("sync stream failed: %s: %s", err.reason_name, err.message)
            except TimeoutError:
                self.logger.warning("sync stream: the custodian went silent; re-dialling")
            except Exception:  # the stream must outlive any bug: log it and re-dial
                self.logger.exception("sync stream broke unexpectedly; re-dialling")
            if loop.time() - started >= _HEALTHY_STREAM:
                delay = _DIAL_INITIAL
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter only
            delay = min(delay * 2, _DIAL_MAX)

    async def _sweep_forever(self) -> None:
        interval = self.settings.sweep_interval.total_seconds()
        count = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._sweep_now.wait()
            self._sweep_now.clear()
            count += 1
            try:
                self.core.revaluer.sweep(everything=count % _FULL_SWEEP_EVERY == 0)
            except CollateralSyncError as err:
                self.logger.exception("sweep failed: %s: %s", err.reason_name, err.message)


def create_role(context: ServerContext) -> ExchangeRole:
    """Entry point for the runner's role registry."""
    return ExchangeRole(context)
