"""The exchange never credits more than is proven and pledged to it, as a stateful property.

The exchange's side of conservation (PROTOCOL.md §5.8 last paragraph, §6.8,
§7.3, §9.1). A hypothesis state machine drives a real reference custodian and a
real reference exchange in-process, each on its own SQLite storage and built
from its own configuration file as the runner builds it (``.._inprocess``),
with test clocks that stand still between steps and move together. Three
accounts of two clients hold three assets (a fund token among them, which
earns yield); amounts are uneven micro-units.

How the exchange is fed, with nothing mocked:

- **The stream.** The custodian announces each change of an account pledged
  to an exchange on its custodian→exchange ``SyncLog``. The ``deliver`` step
  reads the next entries of that log (``SyncLog.outgoing_entry``), packs them
  into a ``SyncBatch`` signed with the custodian's key as its sync session
  packs them, and hands the batch to the exchange's receive path exactly as
  the exchange's session does: ``verify_sync_batch``, then
  ``SyncLog.accept_batch`` with ``ExchangeCore.apply_updates`` as the apply
  callback, inside the batch's transaction. Delivery lags the custodian by a
  drawn number of entries, so the exchange often holds statements older than
  the custodian's latest, or newer than the last it proved.
- **The proofs.** A real ``AttestationChecker`` (``exchange/attestation.py``)
  decides what is pending (``check_pending``): it fetches the custodian's
  checkpoint, consistency and inclusion proofs through a client whose four
  calls are answered in-process by the custodian's ``Attestation`` and
  ``Liquidations`` parts as its servicer answers them (a refusal arrives as
  the ``RPCError`` a gRPC client would raise). The checker's own logic —
  ``CheckpointMonitor``, the reference checks, ``verify_inclusion_proof``,
  ``settle_holdings`` — is what runs.
- **Liquidations.** The exchange instructs them itself (an exposure or a
  price past the liquidation line, or an expired margin call); a real
  ``LiquidationSubmitter`` delivers them through the same client, and the
  receipts come back on the stream too.

Operations: deposits; yield accruals (on demand and at the daily yield time);
pledges and top-ups by the account's client, to the exchange under test or
to another exchange, within what is free; pledge releases the client asks the
exchange to consent to (up to a fifth more than pledged), each consent
recomputed from its signed inputs with the SDK and checked to cite the
credited statement, and sometimes relayed to the custodian, which must
execute it exactly when that statement is still the account's latest (and
then lower the pledge by exactly the quantity); redemption locks within what is
redeemable, and their settlement when the clock passes their due time;
liquidations; price changes (scripted feed, ``SetPrice``); exposure changes
(``SetExposure``); time passing (the custodian's due work and the exchange's
sweep).

Checked after every step, for every account:

1. Proven before counted. The exchange's credited holdings statement, if any,
   is byte for byte the one the custodian signed at that leaf; its leaf is
   below the tree size of the checkpoint the exchange trusts, that
   checkpoint verifies as the custodian's, and the test verifies the leaf's
   inclusion under it itself. Its epoch is the newest the exchange had
   received when its checker last ran (nothing newer is counted, nothing
   proven is left behind); and no step other than a proof changes any
   account's credited statement: delivering a statement credits nothing.
2. Pledged, and no more. What the exchange counts per asset (the eligible
   quantity of its published credit line) is <= the pledged quantity, and <=
   quantity - locked, of that asset in the proven statement it cites, which
   is the credited one.
3. Reproducible. The signed ``CreditLine`` verifies as the exchange's; from
   the policy version it names, the statement it cites and the quotes it
   carries, :mod:`collateral_sync.valuation` gives exactly its valuation rows,
   collateral value and credit limit at its ``issued_at``; and the limit never
   exceeds leverage cap x sum(pledged x price x factor) over the proven
   statement, with the factors, leverage cap and prices this test configured
   (caps, staleness and rounding only lower a limit).
4. Pledged elsewhere counts nothing. An account the custodian records as
   pledged to another exchange (or to none) has no credited statement at the
   exchange, and a credit line there, if any (after an exposure change),
   cites nothing and grants 0.

Not covered here: settlement cycles and emergency release (two of the other
ways P falls), margin-call responses (the exchange→custodian direction of the
stream is not carried; the exchange's margin calls wait in its log), and a
custodian that lies (forged proofs and rewritten logs are
``test_exchange.py``'s cases).
"""

from __future__ import annotations

import asyncio
import decimal
import itertools
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, cast

from collateral_sync.amounts import amount_from_proto, amount_to_proto, format_amount
from collateral_sync.attestation import statement_leaf, verify_checkpoint
from collateral_sync.clients import CustodianClient
from collateral_sync.errors import CollateralSyncError, error_from_status, error_to_status
from collateral_sync.keys import SigningKey
from collateral_sync.merkle import verify_inclusion_proof
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    DEFAULT_BATCH_TTL,
    EXCHANGE_TO_CUSTODIAN,
    SyncLog,
    verify_sync_batch,
)
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    pledge_release_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    credit_line_figures,
    recompute_pledge_release_consent,
    value_collateral,
)
from collateral_sync_reference.common.clock import TestClock
from collateral_sync_reference.custodian import parse_settings as parse_custodian_settings
from collateral_sync_reference.custodian.config import CustodianSettings
from collateral_sync_reference.custodian.core import Custodian
from collateral_sync_reference.custodian.store.accounts import Holding
from collateral_sync_reference.exchange.attestation import AttestationChecker
from collateral_sync_reference.exchange.core import ExchangeCore
from collateral_sync_reference.exchange.instruction_delivery import LiquidationSubmitter
from collateral_sync_reference.exchange.price_feed import ScriptedPriceFeed
from collateral_sync_reference.exchange.role import ExchangeRoleSettings, parse_exchange_settings
from google.protobuf.message import Message
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._inprocess import (
    ACCOUNTS,
    EXACT,
    EXCHANGES,
    PATH_ORDER,
    SETTINGS,
    SIGNED_TTL,
    START,
    InProcessServer,
    micro,
    server_context,
    write_keys,
)
from ..conftest import CUSTODIAN, EXCHANGE, OTHER_EXCHANGE

_CLASS = common_pb2.AssetClass

#: Asset -> (class name, daily yield rate or None).
ASSETS: Mapping[str, tuple[str, Decimal | None]] = {
    "USDC": ("STABLECOIN", None),
    "BTC": ("CRYPTO", None),
    "BENJI": ("TOKENIZED_MMF", Decimal("0.000118")),
}
#: The exchange's policy as this test configures it, and knows it independently.
FACTORS: Mapping[str, Decimal] = {
    "USDC": Decimal("0.95"),
    "BTC": Decimal("0.8"),
    "BENJI": Decimal("0.98"),
}
LEVERAGE_CAP = Decimal(2)
#: A cap one account's BTC often exceeds, so that capped valuations come up.
CRYPTO_CAP = "0.6"
OPENING_PRICES: Mapping[str, Decimal] = {
    "USDC": Decimal(1),
    "BTC": Decimal("64000.5"),
    "BENJI": Decimal("1.0123"),
}
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"

#: Statements and paths outlive an example (at most ~40 days of test clock).
LONG_TTL = timedelta(days=365)
#: Where each account's opening pledges go, if anywhere ("": no pledge at the start).
OPENING_PLEDGES = (EXCHANGE, EXCHANGE, OTHER_EXCHANGE, "")
#: Collateral ratios an exposure aims at: healthy, below maintenance (0.5), below liquidation (0.4).
RATIOS = (Decimal("0.9"), Decimal("0.45"), Decimal("0.3"), Decimal("0.05"))
#: Entries per batch when the test carries the stream.
BATCH_ENTRIES = 7

_T = TypeVar("_T")
_ZERO = Decimal(0)


def _draw_within(data: st.DataObject, bound: Decimal, label: str) -> Decimal | None:
    """An amount in (0, bound]: some micro-units within it, or exactly it; None if bound <= 0."""
    if bound <= 0:
        return None
    whole_units = int(bound.scaleb(6))
    if whole_units < 1 or data.draw(st.booleans(), label=f"{label}: all of {bound}"):
        return bound
    return micro(data.draw(st.integers(1, whole_units), label=f"{label} in micro-units"))


class _InProcessCustodian:
    """The CustodianService calls the exchange's checker and submitter make, answered in-process.

    Each call does what the custodian's servicer (``custodian/role.py``) does
    with the request, on the custodian's real parts; a refusal reaches the
    caller as the :class:`~collateral_sync.errors.RPCError` a gRPC client
    raises for it (status, reason and metadata through the one error table).
    The exchange's instructions come as over its own mutual-TLS connection.
    """

    def __init__(self, custodian: Custodian, *, peer: str) -> None:
        self._custodian = custodian
        self._peer = peer

    async def get_checkpoint(
        self, request: custodian_service_pb2.GetCheckpointRequest, **_: Any
    ) -> custodian_service_pb2.GetCheckpointResponse:
        return _answer(
            lambda: custodian_service_pb2.GetCheckpointResponse(
                checkpoint=self._custodian.attestation.checkpoint(request.tree_size)
            )
        )

    async def get_inclusion_proof(
        self, request: custodian_service_pb2.GetInclusionProofRequest, **_: Any
    ) -> custodian_service_pb2.GetInclusionProofResponse:
        def answer() -> custodian_service_pb2.GetInclusionProofResponse:
            envelope, proof = self._custodian.attestation.inclusion_proof(
                request.leaf_index, request.tree_size
            )
            return custodian_service_pb2.GetInclusionProofResponse(
                holdings_statement=envelope, proof=proof
            )

        return _answer(answer)

    async def get_consistency_proof(
        self, request: custodian_service_pb2.GetConsistencyProofRequest, **_: Any
    ) -> custodian_service_pb2.GetConsistencyProofResponse:
        return _answer(
            lambda: custodian_service_pb2.GetConsistencyProofResponse(
                proof=self._custodian.attestation.consistency_proof(
                    request.first_tree_size, request.second_tree_size
                )
            )
        )

    async def submit_liquidation_instruction(
        self, request: custodian_service_pb2.SubmitLiquidationInstructionRequest, **_: Any
    ) -> custodian_service_pb2.SubmitLiquidationInstructionResponse:
        custodian = self._custodian
        return _answer(
            lambda: custodian_service_pb2.SubmitLiquidationInstructionResponse(
                liquidation_receipt=custodian.liquidations.liquidate(
                    request.liquidation_instruction,
                    now=custodian.ledger.clock.now(),
                    tls_peer=self._peer,
                )
            )
        )


def _answer(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except CollateralSyncError as err:
        # What crosses the wire: the status and its ErrorInfo, nothing else.
        raise error_from_status(error_to_status(err)) from err


class ExchangeCreditConservation(RuleBasedStateMachine):
    """A real custodian and a real exchange, the stream carried by the test (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="credit-conservation-"))
        self.servers: list[InProcessServer] = []
        self.custodian: Custodian | None = None
        self.core: ExchangeCore | None = None
        self.exchange_log: SyncLog | None = None
        self.checker: AttestationChecker | None = None
        self.submitter: LiquidationSubmitter | None = None
        self.clocks: list[TestClock] = []
        self.keys: dict[str, SigningKey] = {}
        self.window = 0
        self.max_skew = timedelta(0)
        #: The price of each asset as this test last set it.
        self.prices: dict[str, Decimal] = dict(OPENING_PRICES)
        #: The liquidation path in force for each pledged account, as its client signed it.
        self.path_of: dict[str, envelope_pb2.Envelope] = {}
        #: Newest epoch of each account delivered to the exchange: so far / at the last proof.
        self.delivered_epoch: dict[str, int] = {}
        self.proven_epoch: dict[str, int] = {}
        #: Each account's credited statement (holdings row id) after the last step.
        self.credited: dict[str, int | None] = dict.fromkeys(ACCOUNTS)
        self.proved = False
        self._sequence = itertools.count(1)
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ building both parties

    @initialize(
        holdings=st.fixed_dictionaries(
            {
                (account, asset): st.integers(1, 2 * 10**9)
                for account in ACCOUNTS
                for asset in ASSETS
            }
        ),
        data=st.data(),
    )
    def start_parties(self, holdings: dict[tuple[str, str], int], data: st.DataObject) -> None:
        """Keys and one registry; the custodian, then the exchange, each from its own file."""
        directory = self.directory
        self.keys = write_keys(
            directory,
            {
                CUSTODIAN: common_pb2.PARTY_ROLE_CUSTODIAN,
                **dict.fromkeys(EXCHANGES, common_pb2.PARTY_ROLE_EXCHANGE),
                **dict.fromkeys(sorted(set(ACCOUNTS.values())), common_pb2.PARTY_ROLE_CLIENT),
            },
        )
        custodian_server = server_context(
            directory,
            self._custodian_document(holdings),
            role="custodian",
            parse_settings=parse_custodian_settings,
            start=START,
        )
        self.servers.append(custodian_server)
        custodian_settings = custodian_server.context.settings
        assert isinstance(custodian_settings, CustodianSettings)
        self.custodian = Custodian(custodian_server.context, custodian_settings)
        self.custodian.run_due()  # as the role's start: fixes the yield schedule

        exchange_server = server_context(
            directory,
            self._exchange_document(),
            role="exchange",
            parse_settings=None,
            start=START,
        )
        self.servers.append(exchange_server)
        self.clocks = [custodian_server.clock, exchange_server.clock]
        self._build_exchange(exchange_server)
        self._check_everything()
        # Most examples start with pledges made and proven, so that credit is there to test.
        for account in sorted(ACCOUNTS):
            exchange = data.draw(st.sampled_from(OPENING_PLEDGES), label=f"{account} pledges to")
            if not exchange:
                continue
            for asset in sorted(ASSETS):
                held = self._holding(account, asset)
                amount = _draw_within(
                    data, held.quantity - held.accrued_yield, f"{account} {asset}"
                )
                if amount is not None:
                    self._custodian.pledges.pledge(
                        self._pledge_request(account, exchange, asset, amount)
                    )
        if self._undelivered():
            self.deliver_and_prove()

    def _custodian_document(self, holdings: Mapping[tuple[str, str], int]) -> dict[str, Any]:
        return {
            "party_id": CUSTODIAN,
            "role": "custodian",
            "storage": {"path": f"{CUSTODIAN}.sqlite"},
            "peers": dict.fromkeys(EXCHANGES),
            "custodian": {
                "log_origin": ORIGIN,
                "yield_time_utc": "08:00",
                "redemption_lock_seconds": 6 * 3600,
                "statement_ttl_seconds": int(LONG_TTL.total_seconds()),
                "assets": [
                    {
                        "asset_id": asset,
                        "asset_class": f"ASSET_CLASS_{asset_class}",
                        **({"daily_yield_rate": str(rate)} if rate is not None else {}),
                    }
                    for asset, (asset_class, rate) in ASSETS.items()
                ],
                "accounts": [
                    {
                        "account_id": account,
                        "client_id": client,
                        "holdings": {
                            asset: format_amount(micro(holdings[account, asset]))
                            for asset in ASSETS
                        },
                    }
                    for account, client in ACCOUNTS.items()
                ],
            },
        }

    def _exchange_document(self) -> dict[str, Any]:
        return {
            "party_id": EXCHANGE,
            "role": "exchange",
            "storage": {"path": f"{EXCHANGE}.sqlite"},
            # Never dialled: the test carries the stream and answers the calls in-process.
            "peers": {CUSTODIAN: "127.0.0.1:9"},
            "exchange": {
                "custodian": CUSTODIAN,
                "log_origin": ORIGIN,
                "statement_ttl_seconds": int(LONG_TTL.total_seconds()),
                "risk_policy": {
                    "assets": {asset: asset_class for asset, (asset_class, _) in ASSETS.items()},
                    "haircuts": {
                        ASSETS[asset][0]: format_amount(factor) for asset, factor in FACTORS.items()
                    },
                    "concentration_caps": {"CRYPTO": CRYPTO_CAP},
                    "leverage_cap": format_amount(LEVERAGE_CAP),
                },
                "prices": [
                    {"asset_id": asset, "price": format_amount(price)}
                    for asset, price in OPENING_PRICES.items()
                ],
            },
        }

    def _build_exchange(self, server: InProcessServer) -> None:
        """What ``exchange/role.py`` builds and starts, the in-process custodian as its peer."""
        context = server.context
        role_settings = parse_exchange_settings(context.config)
        self.exchange_log = log = server.storage.sync_log(
            party_id=EXCHANGE, peer_party_id=CUSTODIAN, sending_direction=EXCHANGE_TO_CUSTODIAN
        )
        prices = ScriptedPriceFeed(
            server.storage, name=role_settings.price_source, script=role_settings.prices
        )
        self.core = core = ExchangeCore(
            server.storage,
            log,
            signer=context.signer,
            registry=context.registry,
            settings=role_settings.core,
            prices=prices,
            clock=server.clock.now,
            logger=context.logger,
        )
        core.start()
        client = cast(CustodianClient, _InProcessCustodian(self._custodian, peer=EXCHANGE))
        self.checker = AttestationChecker(
            core.holdings,
            client,
            origin=role_settings.core.log_origin,
            custodian_id=role_settings.core.custodian_id,
            registry=context.registry,
            clock=server.clock.now,
            max_skew=context.config.max_skew,
            logger=context.logger,
        )
        self.submitter = LiquidationSubmitter(core.liquidations, client, logger=context.logger)
        self.window = context.config.sync.window
        self.max_skew = context.config.max_skew
        _check_policy(role_settings)

    def teardown(self) -> None:
        if self.custodian is not None:
            self.custodian.close()
        for server in self.servers:
            server.storage.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ the custodian's operations

    @rule(
        account=st.sampled_from(sorted(ACCOUNTS)),
        asset=st.sampled_from(sorted(ASSETS)),
        units=st.integers(1, 10**9),
    )
    def deposit(self, account: str, asset: str, units: int) -> None:
        self._custodian.yield_accrual.deposit(
            test_control_pb2.DepositRequest(
                account_id=account, asset_id=asset, quantity=amount_to_proto(micro(units))
            )
        )

    @rule()
    def accrue_yield(self) -> None:
        self._custodian.yield_accrual.accrue_yield(self._now())

    @rule(
        data=st.data(),
        account=st.sampled_from(sorted(ACCOUNTS)),
        asset=st.sampled_from(sorted(ASSETS)),
    )
    def pledge(self, data: st.DataObject, account: str, asset: str) -> None:
        """A pledge or top-up within Q - P - L - Y, to the account's exchange or (first) either."""
        # Mostly to the exchange under test, whose credit is what is checked.
        exchange = self._exchange_of(account) or data.draw(
            st.sampled_from((EXCHANGE, EXCHANGE, OTHER_EXCHANGE)), label="exchange"
        )
        held = self._holding(account, asset)
        free = held.quantity - held.pledged - held.locked - held.accrued_yield
        amount = _draw_within(data, free, "pledge")
        if amount is None:
            event("pledge: nothing free")
            return
        event(f"pledge to {'the exchange' if exchange == EXCHANGE else 'another exchange'}")
        self._custodian.pledges.pledge(self._pledge_request(account, exchange, asset, amount))

    @rule(
        data=st.data(),
        account=st.sampled_from(sorted(ACCOUNTS)),
        asset=st.sampled_from(sorted(ASSETS)),
    )
    def request_redemption(self, data: st.DataObject, account: str, asset: str) -> None:
        """A redemption lock within Q - P - L; it settles when the clock passes its due time."""
        held = self._holding(account, asset)
        amount = _draw_within(data, held.quantity - held.pledged - held.locked, "redemption")
        if amount is None:
            event("redemption: nothing redeemable")
            return
        message = custodian_service_pb2.RedemptionRequest(
            redemption_id=f"redemption-{next(self._ids)}",
            account_id=account,
            asset_id=asset,
            quantity=amount_to_proto(amount),
        )
        self._custodian.redemptions.redeem(
            custodian_service_pb2.RequestRedemptionRequest(
                redemption_request=self._sign(ACCOUNTS[account], message)
            )
        )

    @rule(seconds=st.integers(1, 30 * 3600))
    def advance_clock(self, seconds: int) -> None:
        """Time passes for both: the custodian's due work, then the exchange's full sweep."""
        for clock in self.clocks:
            clock.advance(timedelta(seconds=seconds))
        self._custodian.run_due()
        # As the exchange's AdvanceClock: every price may have turned stale, every cure ended.
        self._core.revaluer.sweep(everything=True)

    # ------------------------------------------------------------------ the exchange's inputs

    @rule(
        asset=st.sampled_from(sorted(ASSETS)),
        units=st.one_of(st.integers(0, 10**7), st.integers(0, 10**11)),
    )
    def set_price(self, asset: str, units: int) -> None:
        price = micro(units)
        self._core.revaluer.set_price(
            valuation_pb2.PriceQuote(asset_id=asset, price=amount_to_proto(price))
        )
        self.prices[asset] = price

    @rule(data=st.data(), account=st.sampled_from(sorted(ACCOUNTS)))
    def set_exposure(self, data: st.DataObject, account: str) -> None:
        """An exposure: none, any amount, or one that puts the ratio near or past its lines."""
        row = self._core.store.accounts.get(account)
        line = None if row is None else row.credit_line
        value = (
            _ZERO
            if line is None
            else amount_from_proto(
                valuation_pb2.CreditLine.FromString(line.payload).collateral_value
            )
        )
        kind = data.draw(
            st.sampled_from(("none", "any", "ratio") if value > 0 else ("none", "any")),
            label=f"exposure (collateral value {format_amount(value)})",
        )
        if kind == "none":
            exposure = _ZERO
        elif kind == "any":
            exposure = micro(data.draw(st.integers(1, 10**15), label="micro-units"))
        else:
            ratio = data.draw(st.sampled_from(RATIOS), label="target collateral ratio")
            exposure = (value / ratio).quantize(micro(1), rounding=decimal.ROUND_CEILING)
        revaluation = self._core.revaluer.set_exposure(account, exposure)
        if self._exchange_of(account) == OTHER_EXCHANGE:
            event("exposure: account pledged to another exchange")
        if revaluation.liquidation_id:
            event("exposure: liquidation instructed")
        elif revaluation.margin_call_id:
            event("exposure: margin call issued")

    @rule(
        data=st.data(),
        account=st.sampled_from(sorted(ACCOUNTS)),
        asset=st.sampled_from(sorted(ASSETS)),
        relay=st.booleans(),
    )
    def release_pledge(self, data: st.DataObject, account: str, asset: str, relay: bool) -> None:
        """The client asks the exchange to release part of a pledge (§5.10), and may relay the
        consent to the custodian (§5.9).

        Every consent the exchange gives must recompute from its signed inputs, within
        the pledge and the policy, citing exactly the statement it credits; the custodian
        executes it exactly when that statement is still the account's latest.
        """
        pledged = self._holding(account, asset).pledged
        amount = _draw_within(data, pledged * Decimal("1.2") + micro(1), "release")
        assert amount is not None
        request = pledge_release_pb2.PledgeReleaseRequest(
            release_id=f"release-{next(self._ids)}",
            account_id=account,
            exchange_id=EXCHANGE,
            releases=[
                pledge_release_pb2.ReleasedQuantity(
                    asset_id=asset, quantity=amount_to_proto(amount)
                )
            ],
        )
        client = ACCOUNTS[account]
        envelope = sign_statement(
            request,
            self.keys[client],
            audience=[EXCHANGE, CUSTODIAN],
            sequence=next(self._sequence),
            ttl=SIGNED_TTL,
            issued_at=self._now(),
        )
        credited = self._credited_id(account)
        try:
            consent = self._core.release_consents.consent(envelope)
        except CollateralSyncError as err:
            event(f"release: the exchange refuses ({err.reason_name})")
            assert self._credited_id(account) == credited
            return
        checked = recompute_pledge_release_consent(
            consent, self._core.registry, audience=CUSTODIAN, now=self._now()
        )
        row = self._core.store.holdings.get(self._credited_id(account) or -1)
        assert row is not None, "a consent for an account the exchange credits nothing of"
        assert [e.payload for e in checked.consent.inputs.holdings_statements] == [
            row.envelope.payload
        ]
        judged = {p.asset_id: p for p in checked.holdings.positions}
        assert asset in judged
        assert amount <= amount_from_proto(judged[asset].pledged_quantity)
        event("release: the exchange consents")
        if not relay:
            return
        latest = self._custodian.ledger.store.latest_statement(account)
        assert latest is not None
        on_latest = latest.envelope.payload == row.envelope.payload
        before = self._holding(account, asset)
        refusal: CollateralSyncError | None = None
        try:
            self._custodian.pledge_releases.release(consent)
        except CollateralSyncError as err:
            refusal = err
        if refusal is not None:
            assert not on_latest, f"a consent on the latest statement refused: {refusal}"
            assert refusal.reason == errors_pb2.ERROR_REASON_STATE_CONFLICT
            event("release: the custodian refuses a consent on an older epoch")
            return
        assert on_latest, "a consent on an older epoch executed"
        after = self._holding(account, asset)
        assert after.pledged == before.pledged - amount
        assert (after.quantity, after.locked) == (before.quantity, before.locked)
        event("release: executed")

    # ------------------------------------------------------------------ the stream and the proofs

    @precondition(lambda self: self._undelivered() > 0)
    @rule(count=st.integers(1, 6))
    def deliver(self, count: int) -> None:
        """The next ``count`` entries of the custodian's log reach the exchange (not proven yet)."""
        source = self._custodian.ledger.sync_logs[EXCHANGE]
        target = self._exchange_log
        first = target.received_head().sequence + 1
        last = min(source.sent_head().sequence, first + count - 1)
        for start in range(first, last + 1, BATCH_ENTRIES):
            entries = []
            for sequence in range(start, min(start + BATCH_ENTRIES - 1, last) + 1):
                entry = source.outgoing_entry(sequence)
                assert entry is not None
                entries.append(entry)
            self._carry(entries)
        event("deliver: all" if self._undelivered() == 0 else "deliver: some")

    @rule()
    def prove(self) -> None:
        """The exchange's attestation checker decides everything pending."""
        self.proved = True
        waiting = asyncio.run(self._checker.check_pending())
        assert not waiting, "the checker left statements pending though the custodian answers"
        self.proven_epoch = dict(self.delivered_epoch)

    @precondition(lambda self: self._undelivered() > 0)
    @rule()
    def deliver_and_prove(self) -> None:
        """The stream catches up and the checker runs: the exchange sees the custodian's latest."""
        self.deliver(self._undelivered())
        self._check_everything()  # between the two: what arrived counts for nothing yet
        self.prove()

    @rule()
    def submit_liquidations(self) -> None:
        """The exchange's submitter delivers its pending liquidation instructions."""
        pending = len(self._core.liquidations.pending_liquidations())
        delivered = asyncio.run(self._submitter.submit_pending())
        assert delivered, "the submitter postponed an instruction though the custodian answers"
        if pending:
            event("liquidation instructions delivered")

    def _carry(self, entries: list[position_sync_pb2.SyncEntry]) -> None:
        """One batch, as the custodian's session signs it and the exchange's session receives it."""
        batch = position_sync_pb2.SyncBatch(
            direction=CUSTODIAN_TO_EXCHANGE,  # type: ignore[arg-type]
            entries=entries,
        )
        envelope = sign_statement(
            batch,
            self.keys[CUSTODIAN],
            audience=[EXCHANGE],
            sequence=entries[-1].sequence,
            ttl=DEFAULT_BATCH_TTL,
            issued_at=self._now(),
        )
        now = self._now()
        verified = verify_sync_batch(
            envelope,
            self._core.registry,
            receiver_party_id=EXCHANGE,
            sender_party_id=CUSTODIAN,
            direction=CUSTODIAN_TO_EXCHANGE,
            now=now,
            max_entries=self.window,
            max_skew=self.max_skew,
        )
        self._exchange_log.accept_batch(verified, self._core.apply_updates, now=now)
        for entry in entries:
            update = position_sync_pb2.PositionUpdate.FromString(entry.update)
            if update.WhichOneof("update") == "holdings_change":
                statement = attestation_pb2.HoldingsStatement.FromString(
                    update.holdings_change.holdings_statement.payload
                )
                account = statement.account_id
                self.delivered_epoch[account] = max(
                    self.delivered_epoch.get(account, 0), statement.epoch
                )
            elif update.WhichOneof("update") == "liquidation_receipt":
                event("liquidation receipt on the stream")

    # ------------------------------------------------------------------ after every step

    @invariant()
    def the_exchange_credits_only_what_is_proven_and_pledged(self) -> None:
        if self.core is None:
            return
        self._check_everything()

    def _check_everything(self) -> None:
        credited = {account: self._credited_id(account) for account in ACCOUNTS}
        if not self.proved:
            changed = {
                a: (self.credited[a], c) for a, c in credited.items() if self.credited[a] != c
            }
            assert not changed, (
                f"credited statements changed without a proof step (holdings row ids before, "
                f"after): {changed}"
            )
        self.proved = False
        self.credited = credited
        for account in sorted(ACCOUNTS):
            statement = self._check_credited(account)
            self._check_credit_line(account, statement)

    def _check_credited(self, account: str) -> attestation_pb2.HoldingsStatement | None:
        """Rule 1: the credited statement is the custodian's, proven, and the newest proven."""
        row = self._core.holdings.credited_holdings(account)
        proven = self.proven_epoch.get(account)
        if row is None:
            assert proven is None, (
                f"{account}: nothing credited, though epoch {proven} was received and proven"
            )
            return None
        where = (
            f"{account}: credited statement epoch {row.epoch} (leaf {row.attestation.leaf_index})"
        )
        assert row.status == "credited", f"{where} has status {row.status!r}"
        signed = self._custodian.ledger.store.statement(row.attestation.leaf_index)
        assert signed is not None, f"{where}: the custodian has no statement at that leaf"
        assert signed.envelope == row.envelope, f"{where} is not the one the custodian signed"
        statement = attestation_pb2.HoldingsStatement.FromString(row.envelope.payload)
        assert (statement.account_id, statement.epoch) == (account, row.epoch)

        trusted = self._core.holdings.trusted_checkpoint(ORIGIN)
        assert trusted is not None, f"{where}, but the exchange trusts no checkpoint"
        checkpoint = attestation_pb2.Checkpoint.FromString(trusted.payload)
        verify_checkpoint(
            trusted,
            self._core.registry,
            origin=ORIGIN,
            now=checkpoint.header.issued_at.ToDatetime(tzinfo=UTC),
        )
        assert checkpoint.header.issuer == CUSTODIAN
        assert row.attestation.leaf_index < checkpoint.tree_size, (
            f"{where}: not covered by the trusted checkpoint of size {checkpoint.tree_size}"
        )
        _, proof = self._custodian.attestation.inclusion_proof(
            row.attestation.leaf_index, checkpoint.tree_size
        )
        verify_inclusion_proof(proof, statement_leaf(row.envelope), checkpoint)
        assert row.epoch == proven, (
            f"{where}, but the newest epoch received before the last proof is {proven}"
        )
        return statement

    def _check_credit_line(
        self, account: str, proven: attestation_pb2.HoldingsStatement | None
    ) -> None:
        """Rules 2, 3 and 4 on the account's published credit line."""
        pledged_to = self._exchange_of(account)
        if pledged_to != EXCHANGE:
            assert proven is None, (
                f"{account} pledges to {pledged_to or 'no exchange'}, yet the exchange credits "
                f"its epoch {proven.epoch if proven else '?'}"
            )
        row = self._core.store.accounts.get(account)
        if row is None or row.credit_line is None:
            assert proven is None, f"{account}: credited holdings, but no credit line"
            return
        envelope = row.credit_line
        issued = verify_statement(
            envelope,
            self._core.registry,
            expected_type=valuation_pb2.CreditLine,
            audience=CUSTODIAN,
            now=_issued_at(envelope, valuation_pb2.CreditLine),
        )
        assert issued.issuer == EXCHANGE
        credit = issued.message
        valued_at = issued.header.issued_at.ToDatetime(tzinfo=UTC)
        where = f"{account}: credit line issued at {valued_at.isoformat()}"

        cited = [(a.leaf_index, a.leaf_hash) for a in credit.attestations]
        counted = proven is not None and proven.exchange_id == EXCHANGE
        if counted:
            credited = self._core.holdings.credited_holdings(account)
            assert credited is not None
            want = [(credited.attestation.leaf_index, credited.attestation.leaf_hash)]
            assert cited == want, f"{where} cites leaves {cited}, the proven statement is {want}"
            assert proven is not None
            positions = list(proven.positions)
        else:
            assert not cited, f"{where} cites {cited}, with no proven statement pledged here"
            positions = []

        policy_envelope = self._core.store.policies.get(credit.risk_policy_version)
        assert policy_envelope is not None, f"{where} names unknown policy version"
        policy = valuation_pb2.RiskPolicy.FromString(policy_envelope.payload)
        exposure = amount_from_proto(credit.exposure)
        valuation = value_collateral(policy, positions, list(credit.prices), valued_at=valued_at)
        figures = credit_line_figures(policy, valuation, exposure)
        stated = (
            amount_from_proto(credit.collateral_value),
            amount_from_proto(credit.credit_limit),
        )
        assert stated == (figures.collateral_value, figures.credit_limit), (
            f"{where} states collateral value {format_amount(stated[0])} and limit "
            f"{format_amount(stated[1])}; its inputs give "
            f"{format_amount(figures.collateral_value)} and {format_amount(figures.credit_limit)}"
        )
        assert list(credit.valuations) == valuation.rows(), (
            f"{where}: its valuation rows are not those of its inputs"
        )

        held = {
            p.asset_id: (
                amount_from_proto(p.quantity),
                amount_from_proto(p.pledged_quantity),
                amount_from_proto(p.locked_quantity),
            )
            for p in positions
        }
        bound = _ZERO
        for valued in credit.valuations:
            quantity, pledged, locked = held.get(valued.asset_id, (_ZERO, _ZERO, _ZERO))
            eligible = amount_from_proto(valued.eligible_quantity)
            assert eligible <= pledged, (
                f"{where} counts {format_amount(eligible)} {valued.asset_id}; the proven "
                f"statement (epoch {proven.epoch if proven else '-'}) pledges "
                f"{format_amount(pledged)}"
            )
            assert eligible <= quantity - locked, (
                f"{where} counts {format_amount(eligible)} {valued.asset_id}; Q - L is "
                f"{format_amount(quantity - locked)}"
            )
        for asset_id, (_, pledged, _) in held.items():
            value = EXACT.multiply(
                EXACT.multiply(pledged, self.prices[asset_id]), FACTORS[asset_id]
            )
            bound = EXACT.add(bound, value)
        assert stated[1] <= EXACT.multiply(LEVERAGE_CAP, bound), (
            f"{where}: limit {format_amount(stated[1])} exceeds leverage cap x pledged value "
            f"{format_amount(EXACT.multiply(LEVERAGE_CAP, bound))}"
        )
        if counted and stated[1] > 0:
            event("credit granted on proven pledges")

    # ------------------------------------------------------------------ reading and signing

    @property
    def _custodian(self) -> Custodian:
        assert self.custodian is not None
        return self.custodian

    @property
    def _core(self) -> ExchangeCore:
        assert self.core is not None
        return self.core

    @property
    def _exchange_log(self) -> SyncLog:
        assert self.exchange_log is not None
        return self.exchange_log

    @property
    def _checker(self) -> AttestationChecker:
        assert self.checker is not None
        return self.checker

    @property
    def _submitter(self) -> LiquidationSubmitter:
        assert self.submitter is not None
        return self.submitter

    def _now(self) -> datetime:
        return self.clocks[0].now()

    def _undelivered(self) -> int:
        if self.custodian is None or self.exchange_log is None:
            return 0
        sent = self.custodian.ledger.sync_logs[EXCHANGE].sent_head().sequence
        return sent - self.exchange_log.received_head().sequence

    def _credited_id(self, account: str) -> int | None:
        row = self._core.holdings.credited_holdings(account)
        return None if row is None else row.id

    def _exchange_of(self, account: str) -> str:
        held = self._custodian.ledger.store.account(account)
        assert held is not None
        return held.exchange_id

    def _holding(self, account: str, asset: str) -> Holding:
        held = self._custodian.ledger.store.account(account)
        assert held is not None
        return held.holding(asset)

    def _sign(
        self,
        party_id: str,
        message: Message,
        *,
        statement_id: str | None = None,
        ttl: timedelta = SIGNED_TTL,
    ) -> envelope_pb2.Envelope:
        return sign_statement(
            message,
            self.keys[party_id],
            audience=[CUSTODIAN],
            sequence=next(self._sequence),
            ttl=ttl,
            issued_at=self._now(),
            statement_id=statement_id,
        )

    def _pledge_request(
        self, account: str, exchange: str, asset: str, amount: Decimal
    ) -> custodian_service_pb2.PledgeCollateralRequest:
        """A signed pledge with the path in force, or a new path for a first pledge."""
        client = ACCOUNTS[account]
        path = self.path_of.get(account)
        if path is None:
            message = liquidation_pb2.LiquidationPath(
                account_id=account,
                exchange_id=exchange,
                proceeds_account_id=f"{exchange}/settlement",
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id=step, venue="otc-desk", max_quantity=amount_to_proto("1000000000")
                    )
                    for step in PATH_ORDER
                ],
            )
            path = self._sign(client, message, statement_id=f"path-{next(self._ids)}", ttl=LONG_TTL)
            self.path_of[account] = path
        instruction = custodian_service_pb2.PledgeInstruction(
            account_id=account,
            exchange_id=exchange,
            asset_id=asset,
            quantity=amount_to_proto(amount),
        )
        return custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=self._sign(client, instruction), liquidation_path=path
        )


def _issued_at(envelope: envelope_pb2.Envelope, message_class: type[Message]) -> datetime:
    """When a statement was issued: it is verified as evidence at that time."""
    header = message_class.FromString(envelope.payload).header  # type: ignore[attr-defined]
    moment: datetime = header.issued_at.ToDatetime(tzinfo=UTC)
    return moment


def _check_policy(role_settings: ExchangeRoleSettings) -> None:
    """The exchange's policy is the one this test configured (the bound of rule 3 rests on it)."""
    policy = role_settings.core.policy_content
    factors = {
        common_pb2.AssetClass.Name(h.asset_class): amount_from_proto(h.collateral_factor)
        for h in policy.haircuts
    }
    assert factors == {
        f"ASSET_CLASS_{ASSETS[asset][0]}": factor for asset, factor in FACTORS.items()
    }
    assert amount_from_proto(policy.leverage_cap) == LEVERAGE_CAP
    assert not policy.asset_haircuts


def test_the_exchange_never_credits_more_than_is_proven_and_pledged() -> None:
    run_state_machine_as_test(ExchangeCreditConservation, settings=SETTINGS)
