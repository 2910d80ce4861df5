"""Conservation of holdings at the reference custodian, as a stateful property (PROTOCOL.md §5.8).

A hypothesis state machine drives the real custodian in-process — the parts
of ``custodian/core.py`` on their real SQLite storage and attestation log,
built from a configuration file as the runner builds them — with three
accounts of two clients, two exchanges and three assets (one of them a fund
token that earns yield), and keeps a model of every account's balances: Q
(quantity), P (pledged), L (locked) and Y (accrued yield, internal to the
store). Amounts are uneven (integers of 10^-6 units; yield brings 18 decimal
places) and bounded, so that a hundred examples run in seconds.

Operations driven:

- deposit (the test-control path, ``yield_accrual.deposit``): Q += a;
- yield accrual, both on demand (``accrue_yield``, as ``AccrueYield``) and at
  the daily yield time (``run_due``): Q += y, Y += y;
- pledge and top-up, signed ``PledgeInstruction`` and ``LiquidationPath``: P += a
  when a <= Q - P - L - Y and the account pledges to no other exchange;
- redemption lock, signed ``RedemptionRequest``: L += a when a <= Q - P - L,
  and then Y = min(Y, Q - P - L): a lock may take accrued yield, which is then
  no longer owed as yield (see :func:`_locked` for why the model needs this to
  keep P + L + Y <= Q);
- redemption settlement, moving the test clock to (or past) a lock's due time
  and running ``run_due``: Q -= a, L -= a, Y = min(Y, Q - P - L);
- liquidation, a signed ``LiquidationInstruction`` from the account's exchange
  along the recorded path: the yield is paid out first (Q -= Y, Y = 0), then
  each fill f of the receipt takes f <= min(P, Q - L) from both Q and P;
- pledge release (§5.9), the client's signed request with the account's
  exchange's consent judged on the latest holdings statement: P -= a when
  a <= P;
- attempts the rules refuse: pledging more than Q - P - L - Y, pledging to a
  second exchange, redeeming more than Q - P - L (pledged quantity is not
  redeemable), a liquidation from an exchange that holds no pledge, a release
  of more than P, and a release consented by the other exchange or judged on
  the holdings statement before the latest.

After every step: 0 <= P, 0 <= L, 0 <= Y and P + L + Y <= Q for every account
and asset, and the store equals the model. A refused operation changes no
balance, no statement count and no attestation log size; an accepted one
changes the balances exactly as §5.8 says, issues exactly one holdings
statement per account it changes (with the reason of the change, and the
positions the store holds), and never lowers P unless it is a liquidation or
a pledge release.

Not covered: settlement instructions (§10.6) and emergency release (§11), the
other two operations that lower P; they need an exchange's settlement cycle
and two co-signatures and have tests of their own.
"""

from __future__ import annotations

import decimal
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from collateral_sync.amounts import amount_from_proto, amount_to_proto, format_amount
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    liquidation_pb2,
    pledge_release_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync_reference.common.clock import TestClock
from collateral_sync_reference.common.storage import SqliteStorage
from collateral_sync_reference.custodian import parse_settings
from collateral_sync_reference.custodian.config import CustodianSettings
from collateral_sync_reference.custodian.core import Custodian
from google.protobuf import duration_pb2
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
    micro,
    server_context,
    write_keys,
)
from ..conftest import CUSTODIAN

REASON = attestation_pb2.HoldingsChangeReason
_CLASS = common_pb2.AssetClass

#: Asset -> (class, daily yield rate or None).
ASSETS: Mapping[str, tuple[common_pb2.AssetClass.ValueType, Decimal | None]] = {
    "USDC": (_CLASS.ASSET_CLASS_STABLECOIN, None),
    "BTC": (_CLASS.ASSET_CLASS_CRYPTO, None),
    "BENJI": (_CLASS.ASSET_CLASS_TOKENIZED_MMF, Decimal("0.000118")),
}
#: The prices a liquidation is executed at.
PRICES = {"USDC": "1", "BTC": "64000.5", "BENJI": "1.0123"}

YIELD_TIME = timedelta(hours=8)  # "08:00"
REDEMPTION_LOCK = timedelta(hours=6)
STATEMENT_TTL = timedelta(days=365)
#: A path in force is sent again with each top-up, so it must outlive the example.
PATH_TTL = timedelta(days=365)

_ZERO = Decimal(0)
_ROUNDING = decimal.Context(prec=200, traps=[decimal.InvalidOperation, decimal.Overflow])
_YIELD_QUANTUM = Decimal("1e-18")


def _plus(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.add(a, b)


def _minus(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.subtract(a, b)


def _daily_yield(quantity: Decimal, rate: Decimal) -> Decimal:
    """The custodian's daily yield on ``quantity``: rate x quantity, down to 18 places."""
    return _ROUNDING.multiply(quantity, rate).quantize(
        _YIELD_QUANTUM, rounding=decimal.ROUND_FLOOR, context=_ROUNDING
    )


@dataclass(frozen=True, slots=True)
class Balances:
    """One account's balances of one asset (§5.8)."""

    quantity: Decimal = _ZERO
    pledged: Decimal = _ZERO
    locked: Decimal = _ZERO
    accrued: Decimal = _ZERO

    @property
    def redeemable(self) -> Decimal:
        return _minus(_minus(self.quantity, self.pledged), self.locked)

    @property
    def pledgeable(self) -> Decimal:
        return _minus(self.redeemable, self.accrued)

    def __str__(self) -> str:
        return (
            f"Q={format_amount(self.quantity)} P={format_amount(self.pledged)} "
            f"L={format_amount(self.locked)} Y={format_amount(self.accrued)}"
        )


Key = tuple[str, str]  # (account, asset)
BalanceSheet = dict[Key, Balances]
#: (account, holdings change reason) of one new holdings statement.
Change = tuple[str, attestation_pb2.HoldingsChangeReason.ValueType]


@dataclass(frozen=True, slots=True)
class OpenRedemption:
    redemption_id: str
    account_id: str
    asset_id: str
    quantity: Decimal
    settle_at: datetime


@dataclass(frozen=True, slots=True)
class Observed:
    """What the custodian's store shows, and what a refusal must leave as it was."""

    balances: BalanceSheet
    exchanges: dict[str, str]
    statement_count: int
    log_size: int


def _statement(envelope: envelope_pb2.Envelope) -> attestation_pb2.HoldingsStatement:
    return attestation_pb2.HoldingsStatement.FromString(envelope.payload)


def _locked(held: Balances, amount: Decimal) -> Balances:
    """A redemption lock: L += a, then Y = min(Y, Q - P - L).

    A lock may take up to Q - P - L, accrued yield included. If Y were cut
    only at settlement, P + L + Y > Q would hold in between, and a liquidation
    there would pay the locked yield out (Q -= Y) while the lock still holds
    it: at settlement the same yield would leave a second time, out of the
    pledge. Cut at the lock, P + L + Y <= Q holds after every operation, and
    the cut at settlement changes nothing.
    """
    locked = replace(held, locked=_plus(held.locked, amount))
    return replace(locked, accrued=min(locked.accrued, locked.redeemable))


def _draw_amount(data: st.DataObject, bound: Decimal, label: str) -> Decimal:
    """An amount > 0 near ``bound``: within it, exactly it, or beyond it by some micro-units."""
    # The floor for bound >= 0; a negative bound (which conservation excludes) is beyond at once.
    whole_units = max(0, int(bound.scaleb(6)))
    kinds = [
        kind
        for kind, possible in (
            ("within", whole_units >= 1),
            ("bound", bound > 0),
            ("beyond", True),
        )
        if possible
    ]
    kind = data.draw(st.sampled_from(kinds), label=f"{label} (bound {format_amount(bound)})")
    if kind == "within":
        return micro(data.draw(st.integers(1, whole_units), label=f"{label} in micro-units"))
    if kind == "bound":
        return bound
    # (whole_units + n) micro-units > bound for every n >= 1; half the time n is small, so
    # that "just beyond" (where an off-by-a-term bound accepts) comes up in most examples.
    beyond = data.draw(
        st.one_of(st.integers(1, 1000), st.integers(1, 10**9)),
        label=f"{label}: micro-units beyond the bound",
    )
    return micro(whole_units + beyond)


class CustodianConservation(RuleBasedStateMachine):
    """The reference custodian against a model of §5.8, one fresh custodian per example."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="conservation-"))
        self.storage: SqliteStorage | None = None
        self.custodian: Custodian | None = None
        self.keys: dict[str, SigningKey] = {}
        self.clock: TestClock | None = None
        self.model: BalanceSheet = {}
        self.exchange_of: dict[str, str] = dict.fromkeys(ACCOUNTS, "")
        #: The liquidation path in force for each pledged account, as its client signed it.
        self.path_of: dict[str, envelope_pb2.Envelope] = {}
        self.open_redemptions: list[OpenRedemption] = []
        #: The last daily yield time accrued; the first start takes the one before START.
        self.last_yield_boundary = START - timedelta(days=1) + YIELD_TIME
        self._sequence = itertools.count(1)
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ building the custodian

    @initialize(
        holdings=st.fixed_dictionaries(
            {
                (account, asset): st.integers(0, 2 * 10**9)
                for account in ACCOUNTS
                for asset in ASSETS
            }
        )
    )
    def start_custodian(self, holdings: dict[Key, int]) -> None:
        """Keys, a key registry and a configuration file, then the custodian as the runner builds it."""
        directory = self.directory
        self.keys = write_keys(
            directory,
            {
                CUSTODIAN: common_pb2.PARTY_ROLE_CUSTODIAN,
                **dict.fromkeys(EXCHANGES, common_pb2.PARTY_ROLE_EXCHANGE),
                **dict.fromkeys(sorted(set(ACCOUNTS.values())), common_pb2.PARTY_ROLE_CLIENT),
            },
        )
        initial = {key: micro(units) for key, units in holdings.items()}
        document: dict[str, Any] = {
            "party_id": CUSTODIAN,
            "role": "custodian",
            "storage": {"path": f"{CUSTODIAN}.sqlite"},
            "peers": dict.fromkeys(EXCHANGES),
            "custodian": {
                "yield_time_utc": "08:00",
                "redemption_lock_seconds": int(REDEMPTION_LOCK.total_seconds()),
                "statement_ttl_seconds": int(STATEMENT_TTL.total_seconds()),
                "assets": [
                    {
                        "asset_id": asset,
                        "asset_class": _CLASS.Name(asset_class),
                        **({"daily_yield_rate": str(rate)} if rate is not None else {}),
                    }
                    for asset, (asset_class, rate) in ASSETS.items()
                ],
                "accounts": [
                    {
                        "account_id": account,
                        "client_id": client,
                        "holdings": {
                            asset: format_amount(initial[account, asset]) for asset in ASSETS
                        },
                    }
                    for account, client in ACCOUNTS.items()
                ],
            },
        }
        server = server_context(
            directory, document, role="custodian", parse_settings=parse_settings, start=START
        )
        self.storage, self.clock = server.storage, server.clock
        role_settings = server.context.settings
        assert isinstance(role_settings, CustodianSettings)
        self.custodian = Custodian(server.context, role_settings)
        # As the role's start does: the first look at the clock fixes the yield schedule.
        self.custodian.run_due()

        self.model = {key: Balances(quantity=quantity) for key, quantity in initial.items()}
        observed = self._observe()
        assert observed.statement_count == len(ACCOUNTS), "one opening statement per account"
        self._compare(observed)

    def teardown(self) -> None:
        if self.custodian is not None:
            self.custodian.close()
        if self.storage is not None:
            self.storage.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ operations

    @rule(
        account=st.sampled_from(sorted(ACCOUNTS)),
        asset=st.sampled_from(sorted(ASSETS)),
        units=st.integers(1, 10**9),
    )
    def deposit(self, account: str, asset: str, units: int) -> None:
        amount = micro(units)
        before = self.model[account, asset]
        expected = self._with(
            {(account, asset): replace(before, quantity=_plus(before.quantity, amount))}
        )
        self._operate(
            "deposit",
            f"deposit of {format_amount(amount)} {asset} to {account}",
            lambda: self._custodian.yield_accrual.deposit(
                test_control_pb2.DepositRequest(
                    account_id=account, asset_id=asset, quantity=amount_to_proto(amount)
                )
            ),
            expect=lambda _: (expected, [(account, REASON.HOLDINGS_CHANGE_REASON_DEPOSIT)]),
        )

    @rule(
        data=st.data(),
        account=st.sampled_from(sorted(ACCOUNTS)),
        asset=st.sampled_from(sorted(ASSETS)),
    )
    def pledge(self, data: st.DataObject, account: str, asset: str) -> None:
        """A pledge (or top-up) to the account's exchange, or to either while it has none."""
        exchange = self.exchange_of[account] or data.draw(
            st.sampled_from(EXCHANGES), label="exchange"
        )
        before = self.model[account, asset]
        bound = before.pledgeable
        amount = _draw_amount(data, bound, "pledge")
        what = f"pledge of {format_amount(amount)} {asset} from {account} to {exchange}"
        request = self._pledge_request(account, exchange, asset, amount)
        if amount > bound:
            self._refused(
                "pledge beyond Q - P - L - Y",
                what,
                lambda: self._custodian.pledges.pledge(request),
                because=f"§5.8: a <= Q - P - L - Y = {format_amount(bound)} ({before})",
                reason="STATE_CONFLICT",
            )
            return
        reason = (
            REASON.HOLDINGS_CHANGE_REASON_TOP_UP
            if self.exchange_of[account]
            else REASON.HOLDINGS_CHANGE_REASON_PLEDGE
        )
        expected = self._with(
            {(account, asset): replace(before, pledged=_plus(before.pledged, amount))}
        )
        self._operate(
            "pledge",
            what,
            lambda: self._custodian.pledges.pledge(request),
            expect=lambda _: (expected, [(account, reason)]),
        )
        self.exchange_of[account] = exchange
        self.path_of[account] = request.liquidation_path

    @precondition(lambda self: any(self.exchange_of.values()))
    @rule(data=st.data(), asset=st.sampled_from(sorted(ASSETS)))
    def pledge_to_a_second_exchange(self, data: st.DataObject, asset: str) -> None:
        pledged = sorted(a for a, e in self.exchange_of.items() if e)
        account = data.draw(st.sampled_from(pledged), label="pledged account")
        other = next(e for e in EXCHANGES if e != self.exchange_of[account])
        before = self.model[account, asset]
        # Within what is free, so that the second exchange is the only reason to refuse.
        whole_units = int(before.pledgeable.scaleb(6))
        amount = micro(data.draw(st.integers(1, max(1, whole_units)), label="micro-units"))
        request = self._pledge_request(account, other, asset, amount)
        self._refused(
            "pledge to a second exchange",
            f"pledge of {format_amount(amount)} {asset} from {account} to {other}",
            lambda: self._custodian.pledges.pledge(request),
            because=f"§5.8: one exchange per account; {account} pledges to {self.exchange_of[account]}",
            reason="STATE_CONFLICT",
        )

    @rule(
        data=st.data(),
        account=st.sampled_from(sorted(ACCOUNTS)),
        asset=st.sampled_from(sorted(ASSETS)),
    )
    def request_redemption(self, data: st.DataObject, account: str, asset: str) -> None:
        self._redeem(data, account, asset)

    @precondition(lambda self: any(b.pledged > 0 for b in self.model.values()))
    @rule(data=st.data())
    def redeem_from_a_pledged_holding(self, data: st.DataObject) -> None:
        """Where a double spend would be: a redemption of an asset the account has pledged."""
        pledged = sorted(key for key, held in self.model.items() if held.pledged > 0)
        account, asset = data.draw(st.sampled_from(pledged), label="pledged holding")
        self._redeem(data, account, asset)

    def _redeem(self, data: st.DataObject, account: str, asset: str) -> None:
        before = self.model[account, asset]
        bound = before.redeemable
        amount = _draw_amount(data, bound, "redemption")
        redemption_id = f"redemption-{next(self._ids)}"
        what = f"redemption {redemption_id} of {format_amount(amount)} {asset} from {account}"
        message = custodian_service_pb2.RedemptionRequest(
            redemption_id=redemption_id,
            account_id=account,
            asset_id=asset,
            quantity=amount_to_proto(amount),
        )
        request = custodian_service_pb2.RequestRedemptionRequest(
            redemption_request=self._sign(ACCOUNTS[account], message)
        )
        if amount > bound:
            pledged_zone = amount <= _minus(before.quantity, before.locked)
            self._refused(
                "redemption beyond Q - P - L" + (", within Q - L" if pledged_zone else ""),
                what,
                lambda: self._custodian.redemptions.redeem(request),
                because=(
                    f"§5.8: a <= Q - P - L = {format_amount(bound)}, pledged quantity is not "
                    f"redeemable ({before})"
                ),
                reason="STATE_CONFLICT",
            )
            return
        expected = self._with({(account, asset): _locked(before, amount)})
        self._operate(
            "redemption lock" + (" into accrued yield" if amount > before.pledgeable else ""),
            what,
            lambda: self._custodian.redemptions.redeem(request),
            expect=lambda _: (expected, [(account, REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK)]),
        )
        self.open_redemptions.append(
            OpenRedemption(redemption_id, account, asset, amount, self._now() + REDEMPTION_LOCK)
        )

    @rule(seconds=st.integers(1, 30 * 3600))
    def advance_clock(self, seconds: int) -> None:
        """Time passes; whatever fell due runs (settlements, then each yield day passed)."""
        self._advance_and_run_due(timedelta(seconds=seconds))

    @precondition(lambda self: bool(self.open_redemptions))
    @rule(extra_seconds=st.integers(0, 3600))
    def advance_past_a_lock(self, extra_seconds: int) -> None:
        """The clock moves to the first open lock's due time (or a little past it)."""
        due = min(r.settle_at for r in self.open_redemptions)
        self._advance_and_run_due(
            max(timedelta(0), due - self._now()) + timedelta(seconds=extra_seconds)
        )

    @rule()
    def accrue_yield(self) -> None:
        """One day's yield, on demand (TestControlService.AccrueYield)."""
        expected, changes = self._accrued(self.model)
        self._operate(
            "yield accrual",
            "yield accrual",
            lambda: self._custodian.yield_accrual.accrue_yield(self._now()),
            expect=lambda _: (expected, changes),
        )

    @precondition(lambda self: any(self.exchange_of.values()))
    @rule(data=st.data())
    def liquidate(self, data: st.DataObject) -> None:
        """The account's exchange liquidates along the recorded path: yield out first, fills <= P."""
        pledged = sorted(a for a, e in self.exchange_of.items() if e)
        account = data.draw(st.sampled_from(pledged), label="pledged account")
        exchange = self.exchange_of[account]
        amount = micro(data.draw(st.integers(1, 10**15), label="value to raise, micro-units"))
        instruction = self._liquidation_instruction(account, exchange, amount)
        self._operate(
            "liquidation",
            f"liquidation of {account} by {exchange} raising {format_amount(amount)}",
            lambda: self._custodian.liquidations.liquidate(instruction, now=self._now()),
            expect=lambda receipt: self._liquidated(account, receipt),
            pledge_may_fall=True,
        )

    @rule(data=st.data(), account=st.sampled_from(sorted(ACCOUNTS)))
    def liquidate_without_a_pledge(self, data: st.DataObject, account: str) -> None:
        """An exchange the account does not pledge to cannot liquidate it."""
        others = [e for e in EXCHANGES if e != self.exchange_of[account]]
        exchange = data.draw(st.sampled_from(others), label="exchange")
        instruction = self._liquidation_instruction(account, exchange, Decimal("1000.5"))
        self._refused(
            "liquidation by an exchange without a pledge",
            f"liquidation of {account} by {exchange}",
            lambda: self._custodian.liquidations.liquidate(instruction, now=self._now()),
            because=f"§9.2: {account} pledges to {self.exchange_of[account] or 'no exchange'}",
            reason="PATH_NOT_AUTHORISED",
        )

    @precondition(lambda self: any(b.pledged > 0 for b in self.model.values()))
    @rule(data=st.data())
    def release_pledge(self, data: st.DataObject) -> None:
        """The client asks, the account's exchange consents on the latest holdings: P -= a <= P."""
        pledged = sorted(key for key, held in self.model.items() if held.pledged > 0)
        account, asset = data.draw(st.sampled_from(pledged), label="pledged holding")
        before = self.model[account, asset]
        amount = _draw_amount(data, before.pledged, "release")
        consent = self._release_consent(account, asset, amount)
        what = f"release of {format_amount(amount)} {asset} of {account}'s pledge"
        if amount > before.pledged:
            self._refused(
                "release beyond P",
                what,
                lambda: self._custodian.pledge_releases.release(consent),
                because=f"§5.9: a <= P = {format_amount(before.pledged)} ({before})",
                reason="STATE_CONFLICT",
            )
            return
        expected = self._with(
            {(account, asset): replace(before, pledged=_minus(before.pledged, amount))}
        )
        self._operate(
            "pledge release",
            what,
            lambda: self._custodian.pledge_releases.release(consent),
            expect=lambda _: (expected, [(account, REASON.HOLDINGS_CHANGE_REASON_PLEDGE_RELEASE)]),
            pledge_may_fall=True,
        )

    @precondition(lambda self: any(b.pledged > 0 for b in self.model.values()))
    @rule(data=st.data(), stale=st.booleans())
    def release_without_consent(self, data: st.DataObject, stale: bool) -> None:
        """A release the account's exchange did not consent to on the latest holdings is refused."""
        pledged = sorted(key for key, held in self.model.items() if held.pledged > 0)
        account, asset = data.draw(st.sampled_from(pledged), label="pledged holding")
        amount = micro(1)
        if stale:
            consent = self._release_consent(account, asset, amount, judged_epoch_back=1)
            self._refused(
                "release judged on older holdings",
                f"release of {account}'s {asset} judged on the statement before the latest",
                lambda: self._custodian.pledge_releases.release(consent),
                because="§5.9: the consent must judge the account's latest holdings",
                reason="STATE_CONFLICT",
            )
            return
        other = next(e for e in EXCHANGES if e != self.exchange_of[account])
        consent = self._release_consent(account, asset, amount, exchange=other)
        self._refused(
            "release consented by another exchange",
            f"release of {account}'s {asset} consented by {other}",
            lambda: self._custodian.pledge_releases.release(consent),
            because=f"§5.9: {account} is pledged to {self.exchange_of[account]}",
            reason="KEY_ROLE_MISMATCH",
        )

    # ------------------------------------------------------------------ after every step

    @invariant()
    def conservation_holds(self) -> None:
        if self.custodian is None:
            return
        observed = self._observe()
        _check_conservation(observed, "after the step")
        self._compare(observed)

    # ------------------------------------------------------------------ the operation wrapper

    def _operate(
        self,
        kind: str,
        what: str,
        action: Callable[[], object],
        *,
        expect: Callable[[Any], tuple[BalanceSheet, list[Change]]],
        pledge_may_fall: bool = False,
    ) -> None:
        """Run an operation the rules accept; check its effect and its statements, then adopt it."""
        event(f"accepted: {kind}")
        before = self._observe()
        try:
            result = action()
        except CollateralSyncError as err:
            raise AssertionError(f"{what}: refused ({err!r}), but §5.8 accepts it") from err
        after = self._observe()
        # The invariant first: a broken one is the finding, whatever the model says.
        _check_conservation(after, what)
        if not pledge_may_fall:
            for key, got in sorted(after.balances.items()):
                old = before.balances.get(key, Balances())
                assert got.pledged >= old.pledged, (
                    f"{what}: P of {key[0]} {key[1]} fell from {format_amount(old.pledged)} to "
                    f"{format_amount(got.pledged)}; only liquidation, settlement, pledge or emergency "
                    "release may lower it"
                )
        expected, changes = expect(result)
        for key in sorted(set(expected) | set(after.balances)):
            got, want = after.balances.get(key, Balances()), expected.get(key, Balances())
            assert got == want, f"{what}: {key[0]} {key[1]} is {got}, expected {want}"
        self._check_statements(what, before, after, changes)
        self.model = expected

    def _refused(
        self, kind: str, what: str, action: Callable[[], object], *, because: str, reason: str
    ) -> None:
        """Run an operation the rules refuse: it must raise, with ``reason``, and change nothing."""
        event(f"refused: {kind}")
        before = self._observe()
        refusal: CollateralSyncError | None = None
        try:
            action()
        except CollateralSyncError as err:
            refusal = err
        after = self._observe()
        if refusal is None:
            changed = sorted(
                f"{k[0]} {k[1]}: {before.balances.get(k, Balances())} -> {v}"
                for k, v in after.balances.items()
                if before.balances.get(k, Balances()) != v
            )
            raise AssertionError(f"{what}: accepted, but {because}; it changed {changed}")
        assert refusal.reason_name == reason, f"{what}: refused with {refusal!r}, expected {reason}"
        assert {"expected", "actual"} <= set(refusal.metadata), (
            f"{what}: refusal without expected/actual: {refusal.metadata}"
        )
        assert after == before, f"{what}: refused, yet it changed the custodian's state"

    def _check_statements(
        self, what: str, before: Observed, after: Observed, changes: list[Change]
    ) -> None:
        """Exactly one new holdings statement per changed account, each showing the store."""
        store = self._custodian.ledger.store
        new = store.statements_from(before.statement_count)
        got = sorted((s.account_id, REASON.Name(REASON.ValueType(s.reason))) for s in new)
        want = sorted((account, REASON.Name(reason)) for account, reason in changes)
        assert got == want, f"{what}: new holdings statements {got}, expected {want}"
        assert after.statement_count == before.statement_count + len(changes)
        assert after.log_size == after.statement_count, f"{what}: log and statements differ"
        for account in {account for account, _ in changes}:
            latest = store.latest_statement(account)
            assert latest is not None
            statement = _statement(latest.envelope)
            positions = {
                p.asset_id: (
                    amount_from_proto(p.quantity),
                    amount_from_proto(p.pledged_quantity),
                    amount_from_proto(p.locked_quantity),
                )
                for p in statement.positions
            }
            held = {
                asset: (b.quantity, b.pledged, b.locked)
                for (a, asset), b in after.balances.items()
                if a == account and b != Balances()
            }
            assert positions == held, (
                f"{what}: {account}'s statement shows {positions}, store {held}"
            )
            assert statement.exchange_id == after.exchanges[account]

    # ------------------------------------------------------------------ the model

    def _with(self, updates: Mapping[Key, Balances]) -> BalanceSheet:
        return {**self.model, **updates}

    def _accrued(self, sheet: BalanceSheet) -> tuple[BalanceSheet, list[Change]]:
        """One day's yield on every fund holding: Q += y, Y += y."""
        result = dict(sheet)
        changes: list[Change] = []
        for account in sorted(ACCOUNTS):
            earned = False
            for asset, (_, rate) in ASSETS.items():
                held = result[account, asset]
                if rate is None or held.quantity <= 0:
                    continue
                amount = _daily_yield(held.quantity, rate)
                if amount <= 0:
                    continue
                result[account, asset] = replace(
                    held, quantity=_plus(held.quantity, amount), accrued=_plus(held.accrued, amount)
                )
                earned = True
            if earned:
                changes.append((account, REASON.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL))
        return result, changes

    def _advance_and_run_due(self, by: timedelta) -> None:
        now = self._now() + by
        sheet = dict(self.model)
        changes: list[Change] = []
        due = sorted(
            (r for r in self.open_redemptions if r.settle_at <= now),
            key=lambda r: (r.settle_at, r.redemption_id),
        )
        for redemption in due:
            key = (redemption.account_id, redemption.asset_id)
            held = sheet[key]
            settled = replace(
                held,
                quantity=_minus(held.quantity, redemption.quantity),
                locked=_minus(held.locked, redemption.quantity),
            )
            sheet[key] = replace(settled, accrued=min(settled.accrued, settled.redeemable))
            changes.append(
                (redemption.account_id, REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_SETTLED)
            )
        last_boundary = self.last_yield_boundary
        while last_boundary + timedelta(days=1) <= now:
            sheet, accrued = self._accrued(sheet)
            changes.extend(accrued)
            last_boundary += timedelta(days=1)

        def run() -> None:
            assert self.clock is not None
            self.clock.advance(by)
            self._custodian.run_due()

        self._operate(
            "run_due" + (" with settlements" if due else ""),
            f"advancing the clock by {by} to {now.isoformat()} ({len(due)} lock(s) due)",
            run,
            expect=lambda _: (sheet, changes),
        )
        self.open_redemptions = [r for r in self.open_redemptions if r not in due]
        self.last_yield_boundary = last_boundary

    def _liquidated(
        self, account: str, receipt_envelope: object
    ) -> tuple[BalanceSheet, list[Change]]:
        """What the receipt's yield distributions and fills must have done (§5.8, §9.3)."""
        assert isinstance(receipt_envelope, envelope_pb2.Envelope)
        receipt = liquidation_pb2.LiquidationReceipt.FromString(receipt_envelope.payload)
        sheet = dict(self.model)
        paid = {d.asset_id: amount_from_proto(d.quantity) for d in receipt.yield_distributions}
        owed = {
            asset: sheet[account, asset].accrued
            for asset in ASSETS
            if sheet[account, asset].accrued > 0
        }
        assert paid == owed, f"liquidation of {account}: yield paid out {paid}, accrued {owed}"
        for asset in ASSETS:
            held = sheet[account, asset]
            sheet[account, asset] = replace(
                held, quantity=_minus(held.quantity, held.accrued), accrued=_ZERO
            )
        for fill in receipt.fills:
            quantity = amount_from_proto(fill.quantity)
            held = sheet[account, fill.asset_id]
            assert fill.asset_id in PATH_ORDER, f"fill of {fill.asset_id} off the path"
            assert 0 < quantity <= min(held.pledged, _minus(held.quantity, held.locked)), (
                f"liquidation of {account}: fill of {format_amount(quantity)} {fill.asset_id} "
                f"with {held}"
            )
            sheet[account, fill.asset_id] = replace(
                held,
                quantity=_minus(held.quantity, quantity),
                pledged=_minus(held.pledged, quantity),
            )
        return sheet, [(account, REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION)]

    # ------------------------------------------------------------------ reading the store

    def _observe(self) -> Observed:
        ledger = self._custodian.ledger
        balances: BalanceSheet = {}
        exchanges: dict[str, str] = {}
        for account_id in ACCOUNTS:
            account = ledger.store.account(account_id)
            assert account is not None
            exchanges[account_id] = account.exchange_id
            for holding in account.holdings.values():
                balances[account_id, holding.asset_id] = Balances(
                    holding.quantity, holding.pledged, holding.locked, holding.accrued_yield
                )
        return Observed(
            balances=balances,
            exchanges=exchanges,
            statement_count=ledger.store.statement_count(),
            log_size=self._custodian.attestation.attestation_log.size,
        )

    def _compare(self, observed: Observed) -> None:
        for key in sorted(set(self.model) | set(observed.balances)):
            got = observed.balances.get(key, Balances())
            want = self.model.get(key, Balances())
            assert got == want, f"{key[0]} {key[1]}: store {got}, model {want}"
        assert observed.exchanges == self.exchange_of

    # ------------------------------------------------------------------ signed statements

    @property
    def _custodian(self) -> Custodian:
        assert self.custodian is not None
        return self.custodian

    def _now(self) -> datetime:
        assert self.clock is not None
        return self.clock.now()

    def _sign(
        self,
        party_id: str,
        message: Message,
        *,
        audience: Iterable[str] = (CUSTODIAN,),
        statement_id: str | None = None,
        ttl: timedelta = SIGNED_TTL,
    ) -> envelope_pb2.Envelope:
        return sign_statement(
            message,
            self.keys[party_id],
            audience=list(audience),
            sequence=next(self._sequence),
            ttl=ttl,
            issued_at=self._now(),
            statement_id=statement_id,
        )

    def _pledge_request(
        self, account: str, exchange: str, asset: str, amount: Decimal
    ) -> custodian_service_pb2.PledgeCollateralRequest:
        """A signed pledge with the path in force, or a new path for a first pledge to ``exchange``."""
        client = ACCOUNTS[account]
        path = self.path_of.get(account) if self.exchange_of[account] == exchange else None
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
            path = self._sign(client, message, statement_id=f"path-{next(self._ids)}", ttl=PATH_TTL)
        instruction = custodian_service_pb2.PledgeInstruction(
            account_id=account,
            exchange_id=exchange,
            asset_id=asset,
            quantity=amount_to_proto(amount),
        )
        return custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=self._sign(client, instruction), liquidation_path=path
        )

    def _release_consent(
        self,
        account: str,
        asset: str,
        amount: Decimal,
        *,
        exchange: str | None = None,
        judged_epoch_back: int = 0,
    ) -> envelope_pb2.Envelope:
        """The client's request for ``amount`` and a consent by ``exchange`` (default: the
        account's) judged on the latest statement, or on one ``judged_epoch_back`` before it."""
        client = ACCOUNTS[account]
        consenting = exchange or self.exchange_of[account]
        assert consenting
        request = pledge_release_pb2.PledgeReleaseRequest(
            release_id=f"release-{next(self._ids)}",
            account_id=account,
            exchange_id=consenting,
            releases=[
                pledge_release_pb2.ReleasedQuantity(
                    asset_id=asset, quantity=amount_to_proto(amount)
                )
            ],
        )
        store = self._custodian.ledger.store
        latest = store.latest_statement(account)
        assert latest is not None
        judged = latest.envelope
        if judged_epoch_back:
            older = [
                s
                for s in store.statements_from(0)
                if s.account_id == account and s.epoch == latest.epoch - judged_epoch_back
            ]
            judged = older[0].envelope
        consent = pledge_release_pb2.PledgeReleaseConsent(
            request=self._sign(client, request, audience=(consenting, CUSTODIAN)),
            inputs=valuation_pb2.ValuationInputs(holdings_statements=[judged]),
            exposure=amount_to_proto("0"),
        )
        return self._sign(consenting, consent, audience=(CUSTODIAN, client))

    def _liquidation_instruction(
        self, account: str, exchange: str, amount: Decimal
    ) -> envelope_pb2.Envelope:
        """A breach liquidation from ``exchange`` naming the account's recorded path, if any.

        The policy gives a collateral factor only to a class no asset here has,
        so every account's collateral value is 0 and any amount > 0 is a breach:
        the instruction recomputes, and how much it sells is up to the amount.
        """
        now = self._now()
        policy = valuation_pb2.RiskPolicy(
            version=1,
            haircuts=[
                valuation_pb2.AssetClassHaircut(
                    asset_class=_CLASS.ASSET_CLASS_TOKENIZED_ETF,
                    collateral_factor=amount_to_proto("0.85"),
                )
            ],
            leverage_cap=amount_to_proto("2"),
            maintenance_ratio=amount_to_proto("0.5"),
            liquidation_ratio=amount_to_proto("0.4"),
            insurance_fund_balance=amount_to_proto("1000000"),
            valuation_currency="USD",
            auto_deleveraging_rule=valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE,
            max_price_age=duration_pb2.Duration(seconds=3600),
            cure_period=duration_pb2.Duration(seconds=86400),
            stale_price_rule=valuation_pb2.STALE_PRICE_RULE_ZERO,
            rounding_scale=2,
            max_settlement_cycles_per_day=2,
            price_source="scripted",
        )
        policy.effective_from.FromDatetime(now - timedelta(days=1))
        snapshot = valuation_pb2.PriceSnapshot()
        for asset_id, price in PRICES.items():
            quote = snapshot.prices.add(
                asset_id=asset_id, price=amount_to_proto(price), source="scripted"
            )
            quote.observed_at.FromDatetime(now)
        latest = self._custodian.ledger.store.latest_statement(account)
        assert latest is not None
        path = self.path_of.get(account)
        instruction = liquidation_pb2.LiquidationInstruction(
            liquidation_id=f"liquidation-{next(self._ids)}",
            account_id=account,
            amount=amount_to_proto(amount),
            liquidation_path_id=_path_id(path) if path is not None else "no-path",
            risk_policy_version=1,
            inputs=valuation_pb2.ValuationInputs(
                risk_policy=self._sign(exchange, policy, audience=("*",)),
                holdings_statements=[latest.envelope],
                price_snapshot=self._sign(exchange, snapshot, audience=("*",)),
            ),
        )
        return self._sign(exchange, instruction)


def _check_conservation(observed: Observed, when: str) -> None:
    """0 <= P, 0 <= L, 0 <= Y and P + L + Y <= Q everywhere; as many leaves as statements."""
    for (account, asset), held in sorted(observed.balances.items()):
        where = f"{account} {asset}: {held}"
        assert held.pledged >= 0, f"{when}: P < 0 at {where}"
        assert held.locked >= 0, f"{when}: L < 0 at {where}"
        assert held.accrued >= 0, f"{when}: Y < 0 at {where}"
        total = _plus(_plus(held.pledged, held.locked), held.accrued)
        assert total <= held.quantity, f"{when}: P + L + Y = {format_amount(total)} > Q at {where}"
    assert observed.log_size == observed.statement_count, (
        f"{when}: the attestation log holds {observed.log_size} leaves, the store "
        f"{observed.statement_count} statements"
    )


def _path_id(envelope: envelope_pb2.Envelope) -> str:
    return liquidation_pb2.LiquidationPath.FromString(envelope.payload).header.statement_id


def test_holdings_are_conserved_under_any_sequence_of_operations() -> None:
    run_state_machine_as_test(CustodianConservation, settings=SETTINGS)
