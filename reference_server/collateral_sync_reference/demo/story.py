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

It never reads a server's database. The figures below are the scenario's
inputs (what the client holds and pledges, the prices, the exposure); every
figure the servers derive from them is read from their signed statements.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import grpc
from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.attestation import statement_leaf
from collateral_sync.clients import CustodianClient, ExchangeClient, TestControlClient
from collateral_sync.errors import CollateralSyncError, RPCError, StateError
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.merkle import verify_inclusion_proof
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    margin_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import collateral_ratio, recompute_margin_call, value_collateral
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.evidence import Evidence, Proven

__all__ = [
    "ACCOUNT",
    "CLIENT",
    "CUSTODIAN",
    "EXCHANGE",
    "OPERATOR",
    "PARTIES",
    "REGULATOR",
    "SECOND_ACCOUNT",
    "Connections",
    "Story",
    "custodian_config",
    "cutoffs_after",
    "edit_quantity",
    "exchange_config",
    "regulator_config",
]

_M = TypeVar("_M", bound=Message)
_T = TypeVar("_T")
_S = margin_pb2.MarginCallStatus
_REASON = attestation_pb2.HoldingsChangeReason

CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"
CLIENT = "client-1"
#: The demo's own TLS identity when it drives the servers' TestControlService.
OPERATOR = "demo-operator"
REGULATOR = "regulator-1"
#: Party id -> role, for `collateral-sync keygen`.
PARTIES = {CUSTODIAN: "custodian", EXCHANGE: "exchange", CLIENT: "client", REGULATOR: "regulator"}
ACCOUNT = "acct-7"
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
PATH_ID = f"path-{ACCOUNT}-1"
PROCEEDS_ACCOUNT = f"{EXCHANGE}-settlement"

# The scenario: what the client holds, pledges and authorises, and what the market does.
HOLDINGS = {"BTC": "8", "USDC": "120000", "BENJI": "100000", "TSLAx": "400"}
PLEDGES = (("BTC", "8"), ("USDC", "40000"), ("BENJI", "100000"), ("TSLAx", "400"))
TOP_UP = ("USDC", "40000")
#: Sell in this order, each step at most this much (asset, venue, max quantity).
PATH_STEPS = (
    ("USDC", "otc-desk", "120000"),
    ("BENJI", "fund-redemption", "100000"),
    ("BTC", "otc-desk", "8"),
    ("TSLAx", "broker", "400"),
)
PRICES = {"BTC": "60000", "USDC": "1", "BENJI": "1", "TSLAx": "250"}
EXPOSURE = "1000000"
FIRST_DROP = ("BTC", "45000")
SECOND_DROP = ("BTC", "20000")
#: How the custodian answers margin calls: the n-th call gets the n-th answer.
MARGIN_CALL_ANSWERS = [
    {"kind": "PARTIALLY_AGREE", "agreed_fraction": "0.5", "dispute_reason": "VALUATION"},
    {"kind": "AGREE"},
]
# The oversight acts: a second account of the client's, pledged after the liquidation.
SECOND_ACCOUNT = "acct-8"
SECOND_HOLDINGS = {"USDC": "250000"}
SECOND_PLEDGE = ("USDC", "150000")
#: The exchange's account at the custodian that settlements pay into and out of.
HOUSE_ACCOUNT = f"{EXCHANGE}/settlement"
HOUSE_HOLDINGS = {"USDC": "1000000"}
#: The exchange's realised trading result per account (negative: the client lost).
PROFITS = {SECOND_ACCOUNT: "-1500"}
#: Test mode only: from the second cut-off on, the exchange's view of one position is off.
BREAK = {
    "account_id": SECOND_ACCOUNT,
    "asset_id": "USDC",
    "field": "pledged_quantity",
    "delta": "25",
    "after_cutoffs": 1,
}
#: The daily yield time is set this far after the start, so the clock jump stays short.
YIELD_LEAD = timedelta(minutes=10)

CLIENT_TTL = timedelta(hours=1)
#: A standing authorisation: it must still be fresh at the top-up.
PATH_TTL = timedelta(days=30)
#: Deadline of one wait for something a server does in the background.
WAIT = 20.0
_POLL = 0.05


def edit_quantity(payload: bytes, old: str, new: str) -> bytes:
    """``payload`` with its first ``old`` decimal text replaced (a forger's edit)."""
    edited = payload.replace(old.encode(), new.encode(), 1)
    if edited == payload:
        raise StateError(
            f"expected the decimal {old} in the statement's bytes, found none",
            metadata={"expected": f"{old} in the payload", "actual": "absent"},
        )
    return edited


def _party_files(party_id: str, role: str) -> dict[str, Any]:
    return {
        "party_id": party_id,
        "role": role,
        "listen": "127.0.0.1:0",
        "storage": {"path": f"{party_id}.sqlite"},
        "signing_key": f"keys/{party_id}.key.json",
        "key_registry": "keys/registry.json",
        "tls": {"ca": "pki/ca.pem", "cert": f"pki/{party_id}.pem", "key": f"pki/{party_id}.key"},
    }


def cutoffs_after(yield_time: time) -> tuple[time, time]:
    """Two cut-offs a day, 12 h apart, the first on the hour within an hour after the yield.

    The lifecycle's clock jump (to the yield time) then never passes a cut-off,
    so the first one the demo reaches is the first each party states.
    """
    first = (datetime.combine(datetime.now(UTC).date(), yield_time) + timedelta(hours=1)).replace(
        minute=0
    )
    return first.time(), (first + timedelta(hours=12)).time()


def _schedule(cutoffs: tuple[time, time]) -> str:
    return ",".join(moment.strftime("%H:%M") for moment in sorted(cutoffs))


def custodian_config(
    yield_time: time, regulator_address: str, cutoffs: tuple[time, time]
) -> dict[str, Any]:
    """The custodian's configuration file (paths relative to the demo directory)."""
    return {
        **_party_files(CUSTODIAN, "custodian"),
        "peers": {EXCHANGE: None, REGULATOR: regulator_address},
        "custodian": {
            "log_origin": ORIGIN,
            "yield_time_utc": yield_time.strftime("%H:%M"),
            "accounts": [
                {"account_id": ACCOUNT, "client_id": CLIENT, "holdings": HOLDINGS},
                {"account_id": SECOND_ACCOUNT, "client_id": CLIENT, "holdings": SECOND_HOLDINGS},
                {"account_id": HOUSE_ACCOUNT, "client_id": EXCHANGE, "holdings": HOUSE_HOLDINGS},
            ],
            "margin_call_responses": MARGIN_CALL_ANSWERS,
            "reconciliation": {"cutoffs_utc": _schedule(cutoffs), "regulator": REGULATOR},
        },
    }


def exchange_config(
    custodian_address: str, regulator_address: str, cutoffs: tuple[time, time]
) -> dict[str, Any]:
    """The exchange's configuration file: it dials the custodian at ``custodian_address``."""
    return {
        **_party_files(EXCHANGE, "exchange"),
        # Two peers have addresses: which one is the custodian is said explicitly.
        "peers": {CUSTODIAN: custodian_address, REGULATOR: regulator_address},
        "exchange": {
            "custodian": CUSTODIAN,
            "log_origin": ORIGIN,
            "prices": [{"asset_id": asset, "price": price} for asset, price in PRICES.items()],
            "profits": PROFITS,
            "reconciliation": {
                "cutoffs_utc": _schedule(cutoffs),
                "regulator": REGULATOR,
                "test_perturbations": [BREAK],
            },
        },
    }


def regulator_config(listen: str, custodian_address: str, exchange_address: str) -> dict[str, Any]:
    """The regulator's configuration file: it asks both parties for their position trees."""
    return {
        **_party_files(REGULATOR, "regulator"),
        # Fixed in advance: the custodian's and the exchange's files name it.
        "listen": listen,
        "peers": {CUSTODIAN: custodian_address, EXCHANGE: exchange_address},
    }


@dataclass(frozen=True, slots=True)
class Connections:
    """The demo's clients: as the client (mutual TLS as client-1) and as the operator."""

    custodian: CustodianClient
    exchange: ExchangeClient
    custodian_control: TestControlClient
    exchange_control: TestControlClient
    regulator_control: TestControlClient


@dataclass(frozen=True, slots=True)
class _Attested:
    envelope: envelope_pb2.Envelope
    statement: attestation_pb2.HoldingsStatement
    ref: attestation_pb2.AttestationRef


class _ServerClock:
    """The servers' test clock as the demo sees it: real time plus the offset they report."""

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def learn(self, stamp: timestamp_pb2.Timestamp) -> datetime:
        moment = stamp.ToDatetime(tzinfo=UTC)
        self._offset = moment - datetime.now(UTC)
        return moment


def _d(value: common_pb2.Decimal) -> Decimal:
    return parse_amount(value.value or "0")


def _class_name(asset_class: int) -> str:
    return common_pb2.AssetClass.Name(asset_class).removeprefix("ASSET_CLASS_")  # type: ignore[arg-type]


def _reason(statement: attestation_pb2.HoldingsStatement) -> str:
    return _REASON.Name(statement.reason).removeprefix("HOLDINGS_CHANGE_REASON_")


def _status(status: int) -> str:
    return _S.Name(status).removeprefix("MARGIN_CALL_STATUS_")  # type: ignore[arg-type]


def _positions(statement: attestation_pb2.HoldingsStatement) -> str:
    parts = []
    for position in statement.positions:
        text = f"{position.asset_id} {say.amount(position.quantity.value)}"
        pledged = _d(position.pledged_quantity)
        if pledged:
            text += f" ({say.amount(pledged)} pledged)"
        parts.append(text)
    return " · ".join(parts) or "nothing"


def _by_asset(statement: attestation_pb2.HoldingsStatement) -> dict[str, common_pb2.Position]:
    return {position.asset_id: position for position in statement.positions}


def _check_receipt(
    receipt: liquidation_pb2.LiquidationReceipt,
    amount: Decimal,
    before: attestation_pb2.HoldingsStatement,
    after: attestation_pb2.HoldingsStatement,
) -> None:
    """The receipt's figures add up and match the holdings statements around it, or raise."""
    fills = sum((_d(f.proceeds) for f in receipt.fills), Decimal(0))
    expected = (fills, max(Decimal(0), amount - fills))
    stated = (_d(receipt.total_proceeds), _d(receipt.shortfall))
    if stated != expected:
        raise StateError(
            f"receipt: expected total proceeds and shortfall {format_amount(expected[0])}, "
            f"{format_amount(expected[1])}; got {format_amount(stated[0])}, "
            f"{format_amount(stated[1])}",
            metadata={
                "expected": f"{format_amount(expected[0])}, {format_amount(expected[1])}",
                "actual": f"{format_amount(stated[0])}, {format_amount(stated[1])}",
            },
        )
    old, new = _by_asset(before), _by_asset(after)
    zero = common_pb2.Position()
    held_sold: dict[str, Decimal] = {}
    held_paid: dict[str, Decimal] = {}
    for asset_id, was in old.items():
        now = new.get(asset_id, zero)
        sold = _d(was.pledged_quantity) - _d(now.pledged_quantity)
        paid = _d(was.quantity) - _d(now.quantity) - sold
        if sold:
            held_sold[asset_id] = sold
        if paid:
            held_paid[asset_id] = paid
    receipt_sold: dict[str, Decimal] = {}
    for fill in receipt.fills:
        receipt_sold[fill.asset_id] = receipt_sold.get(fill.asset_id, Decimal(0)) + _d(
            fill.quantity
        )
    receipt_paid = {y.asset_id: _d(y.quantity) for y in receipt.yield_distributions}
    if (receipt_sold, receipt_paid) != (held_sold, held_paid):
        raise StateError(
            "receipt: expected the sales and yield the holdings statements show, got others",
            metadata={
                "expected": f"sold {held_sold}, paid out {held_paid}",
                "actual": f"sold {receipt_sold}, paid out {receipt_paid}",
            },
        )


def _hashes(count: int) -> str:
    return f"{count} hash" if count == 1 else f"{count} hashes"


def _cites(credit: valuation_pb2.CreditLine, leaf_index: int) -> bool:
    return any(ref.leaf_index == leaf_index for ref in credit.attestations)


class Story:
    """Acts 2 to 11 of the demo, against servers that are already running."""

    def __init__(
        self, parties: Connections, registry: KeyRegistry, client_key: SigningKey, yield_time: time
    ) -> None:
        self._c = parties
        self._registry = registry
        self._client_key = client_key
        self._yield_time = yield_time
        self._clock = _ServerClock()
        self.evidence = Evidence(parties.custodian, registry, origin=ORIGIN, clock=self._clock.now)
        self._sequence = itertools.count(1)
        self._path: envelope_pb2.Envelope | None = None
        self._policy = valuation_pb2.RiskPolicy()
        self._credit = valuation_pb2.CreditLine()
        self._holdings: _Attested | None = None

    # ---------------------------------------------------------------- plumbing

    def _open(self, envelope: envelope_pb2.Envelope, kind: type[_M], audience: str) -> _M:
        """Verify a statement (signature, role, type, audience, freshness) and parse it."""
        return verify_statement(
            envelope, self._registry, expected_type=kind, audience=audience, now=self._clock.now()
        ).message

    async def _until(self, what: str, probe: Callable[[], Awaitable[_T | None]]) -> _T:
        """Poll ``probe`` until it finds something: across processes there is no event to await."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            found = await probe()
            if found is not None:
                return found
            if loop.time() >= deadline:
                raise StateError(
                    f"waited {WAIT:.0f} s for {what}; it did not happen (the server logs are "
                    "in the demo directory)",
                    metadata={"expected": what, "actual": f"nothing within {WAIT:.0f} s"},
                )
            await asyncio.sleep(_POLL)

    async def _holdings_now(self, account_id: str = ACCOUNT) -> _Attested:
        response = await self._c.custodian.get_holdings_statement(
            custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
        )
        statement = self._open(
            response.holdings_statement, attestation_pb2.HoldingsStatement, CLIENT
        )
        return _Attested(response.holdings_statement, statement, response.attestation)

    async def _credit_line(self) -> tuple[envelope_pb2.Envelope, valuation_pb2.CreditLine] | None:
        try:
            response = await self._c.exchange.get_credit_line(
                exchange_service_pb2.GetCreditLineRequest(account_id=ACCOUNT)
            )
        except RPCError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        envelope = response.credit_line
        return envelope, self._open(envelope, valuation_pb2.CreditLine, CUSTODIAN)

    def _credit_where(
        self, predicate: Callable[[valuation_pb2.CreditLine], bool]
    ) -> Callable[[], Awaitable[valuation_pb2.CreditLine | None]]:
        async def probe() -> valuation_pb2.CreditLine | None:
            found = await self._credit_line()
            if found is None or not predicate(found[1]):
                return None
            self.evidence.relied_on_by_custodian(found[0])
            self._credit = found[1]
            return found[1]

        return probe

    async def _margin_calls(self) -> list[margin_pb2.MarginCallState]:
        listed = await self._c.exchange.list_margin_calls(
            exchange_service_pb2.ListMarginCallsRequest(account_id=ACCOUNT)
        )
        states = []
        for envelope in listed.margin_call_states:
            states.append(self._open(envelope, margin_pb2.MarginCallState, CUSTODIAN))
            self.evidence.relied_on_by_custodian(envelope)
        return states

    async def _pledge(
        self,
        asset: str,
        quantity: str,
        *,
        signer: SigningKey | None = None,
        account_id: str = ACCOUNT,
        path: envelope_pb2.Envelope | None = None,
    ) -> _Attested:
        instruction = sign_statement(
            custodian_service_pb2.PledgeInstruction(
                account_id=account_id,
                exchange_id=EXCHANGE,
                asset_id=asset,
                quantity=amount_to_proto(quantity),
            ),
            signer or self._client_key,
            audience=[CUSTODIAN],
            sequence=next(self._sequence),
            ttl=CLIENT_TTL,
            issued_at=self._clock.now(),
        )
        response = await self._c.custodian.pledge_collateral(
            custodian_service_pb2.PledgeCollateralRequest(
                pledge_instruction=instruction, liquidation_path=path or self._path
            )
        )
        statement = self._open(
            response.holdings_statement, attestation_pb2.HoldingsStatement, CLIENT
        )
        return _Attested(response.holdings_statement, statement, response.attestation)

    async def _set_price(self, asset: str, price: str) -> None:
        await self._c.exchange_control.set_price(
            test_control_pb2.SetPriceRequest(
                quote=valuation_pb2.PriceQuote(asset_id=asset, price=amount_to_proto(price))
            )
        )

    async def _expect_refusal(self, what: str, call: Awaitable[object]) -> None:
        try:
            await call
        except RPCError as err:
            say.refused(what, err)
            return
        raise StateError(
            f"expected the server to refuse {what}; it accepted it",
            metadata={"expected": "a refusal", "actual": "accepted"},
        )

    @staticmethod
    def _expect_local_refusal(what: str, check: Callable[[], object]) -> None:
        try:
            check()
        except CollateralSyncError as err:
            say.refused(what, err)
            return
        raise StateError(
            f"expected the SDK to refuse {what}; it accepted it",
            metadata={"expected": "a refusal", "actual": "accepted"},
        )

    def _proven(self, proven: Proven, ref: attestation_pb2.AttestationRef) -> None:
        checkpoint = proven.checkpoint
        if proven.consistency_hashes is None:
            history = (
                "first checkpoint, trusted on first use"
                if proven.previous_size == 0
                else "same tree size as the one trusted, same root"
            )
        else:
            history = (
                f"consistent with tree size {proven.previous_size} "
                f"({_hashes(proven.consistency_hashes)}): the log only grew"
            )
        say.check(
            f"leaf {ref.leaf_index} in checkpoint {checkpoint.tree_size} "
            f"(root {checkpoint.root_hash.hex()[:12]}..., signed by {CUSTODIAN}; {history}); "
            f"inclusion proof of {_hashes(len(proven.inclusion.audit_path))}"
        )

    # ---------------------------------------------------------------- the story

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
                f"{_class_name(h.asset_class)} {h.collateral_factor.value}" for h in policy.haircuts
            )
            + "; an asset not listed counts 0"
        )
        say.detail(
            "concentration caps "
            + " · ".join(
                f"{_class_name(c.asset_class)} {c.max_share.value}"
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

    async def _pledges(self) -> list[_Attested]:
        say.section("3. Pledge: BTC, USDC, the fund token BENJI and the tokenized stock TSLAx")
        opened = await self._holdings_now()
        say.step(f"{CUSTODIAN} holds {ACCOUNT} for {CLIENT}: {_positions(opened.statement)}")
        say.detail(
            f"holdings statement epoch {opened.statement.epoch} ({_reason(opened.statement)}), "
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
                f"attests epoch {attested.statement.epoch} ({_reason(attested.statement)}) "
                f"at leaf {attested.ref.leaf_index}"
            )
        self._holdings = pledged[-1]
        say.detail(f"now: {_positions(pledged[-1].statement)}")
        impostor = SigningKey.generate(CLIENT, common_pb2.PARTY_ROLE_CLIENT)
        await self._expect_refusal(
            f"a pledge signed by a key that claims to be {CLIENT} but is not in the registry",
            self._pledge("BTC", "1", signer=impostor),
        )
        await self._expect_refusal(
            "a pledge of 1 BTC more than the account holds free", self._pledge("BTC", "1")
        )
        return pledged

    async def _attestation(self, pledged: list[_Attested]) -> None:
        say.section("4. Attestation: the exchange credits a statement only once it is proven")
        last = pledged[-1]
        credit = await self._until(
            f"{EXCHANGE} to credit the statement at leaf {last.ref.leaf_index}",
            self._credit_where(lambda c: _cites(c, last.ref.leaf_index)),
        )
        [cited] = [ref for ref in credit.attestations if ref.leaf_index == last.ref.leaf_index]
        say.step(
            f"{EXCHANGE} credits a statement only once it has proven it: its signed CreditLine "
            f"cites leaf {cited.leaf_index} of tree size {cited.tree_size}, the latest pledge"
        )
        say.step("the same checks, made here with the SDK against the custodian's log:")
        proofs = []
        for attested in pledged:
            proven = await self.evidence.prove_holdings(attested.envelope, attested.ref)
            proofs.append(proven)
            self._proven(proven, attested.ref)
        say.step("what the exchange refuses instead (the SDK's checks, run here):")
        tampered = envelope_pb2.Envelope()
        tampered.CopyFrom(last.envelope)
        tampered.payload = edit_quantity(last.envelope.payload, "100000", "900000")
        self._expect_local_refusal(
            "the statement with BENJI 100,000 edited to 900,000",
            lambda: verify_statement(
                tampered,
                self._registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience=EXCHANGE,
                now=self._clock.now(),
            ),
        )
        self._expect_local_refusal(
            "the same statement presented to another exchange (exchange-2)",
            lambda: verify_statement(
                last.envelope,
                self._registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience="exchange-2",
                now=self._clock.now(),
            ),
        )
        previous = proofs[-2]
        self._expect_local_refusal(
            f"leaf {pledged[-2].ref.leaf_index}'s inclusion proof offered for leaf "
            f"{last.ref.leaf_index}",
            lambda: verify_inclusion_proof(
                previous.inclusion, statement_leaf(last.envelope), previous.checkpoint
            ),
        )

    def _credit_figures(self) -> None:
        say.section("5. Credit: haircuts, concentration cap and the 2x leverage cap")
        credit = self._credit
        say.step(
            f"from {EXCHANGE}'s signed CreditLine (risk policy v{credit.risk_policy_version}, "
            f"prices from its '{self._policy.price_source}' source):"
        )
        rows = []
        haircut_total = Decimal(0)
        capped = []
        for row in credit.valuations:
            haircut = _d(row.market_value) * _d(row.collateral_factor)
            haircut_total += haircut
            value = _d(row.collateral_value)
            # Rounded down at the policy's scale; anything further below is the cap.
            if value < haircut - Decimal(1).scaleb(-self._policy.rounding_scale):
                capped.append(row)
            rows.append(
                [
                    row.asset_id,
                    _class_name(row.asset_class),
                    say.amount(row.eligible_quantity.value),
                    say.amount(row.price.value),
                    say.amount(row.market_value.value),
                    row.collateral_factor.value,
                    say.amount(value) + (" capped" if row in capped else ""),
                ]
            )
        say.table(
            ["asset", "class", "eligible", "price", "market value", "haircut", "collateral value"],
            rows,
        )
        caps = {c.asset_class: c.max_share.value for c in self._policy.concentration_caps}
        for row in capped:
            say.detail(
                f"{row.asset_id}: {_class_name(row.asset_class)} may count at most "
                f"{caps.get(row.asset_class, '?')} of the haircut total "
                f"{say.amount(haircut_total)}, so {say.amount(row.collateral_value.value)}"
            )
        say.detail(
            f"collateral value {say.amount(credit.collateral_value.value)} x leverage cap "
            f"{self._policy.leverage_cap.value} = credit limit {say.amount(credit.credit_limit.value)}"
        )

    def _ratio(self, credit: valuation_pb2.CreditLine) -> str:
        ratio = collateral_ratio(self._policy, _d(credit.collateral_value), _d(credit.exposure))
        return "none (no exposure)" if ratio is None else format_amount(ratio)

    async def _exposure(self) -> None:
        say.section("6. Exposure: the account trades on its credit")
        await self._c.exchange_control.set_exposure(
            test_control_pb2.SetExposureRequest(
                account_id=ACCOUNT, exposure=amount_to_proto(EXPOSURE)
            )
        )
        say.step(f"the desk sets exposure {say.amount(EXPOSURE)} (TestControl: no trading engine)")
        credit = await self._until(
            "a CreditLine with the exposure",
            self._credit_where(lambda c: _d(c.exposure) == parse_amount(EXPOSURE)),
        )
        say.detail(
            f"CreditLine: exposure {say.amount(credit.exposure.value)} within the credit limit "
            f"{say.amount(credit.credit_limit.value)}; collateral ratio {self._ratio(credit)} "
            f"(margin call below {self._policy.maintenance_ratio.value})"
        )

    async def _first_drop(self) -> str:
        say.section("7. Price drop: a margin call anyone can recompute")
        asset, price = FIRST_DROP
        await self._set_price(asset, price)
        say.step(
            f"the scripted price feed moves {asset} {say.amount(PRICES[asset])} -> {say.amount(price)}"
        )

        async def answered() -> margin_pb2.MarginCallState | None:
            states = [
                s for s in await self._margin_calls() if s.status != _S.MARGIN_CALL_STATUS_ISSUED
            ]
            return states[0] if states else None

        state = await self._until(f"{CUSTODIAN} to answer a margin call", answered)
        check = recompute_margin_call(
            state.margin_call, self._registry, audience=CUSTODIAN, now=self._clock.now()
        )
        self.evidence.relied_on_by_custodian(state.margin_call)
        call = check.margin_call
        snapshot = valuation_pb2.PriceSnapshot.FromString(call.inputs.price_snapshot.payload)
        say.step(
            f"{EXCHANGE} issues margin call {call.margin_call_id[:15]}... to {CUSTODIAN} "
            f"under risk policy v{call.risk_policy_version}:"
        )
        say.detail(
            f"collateral value {say.amount(call.collateral_value.value)} / exposure "
            f"{say.amount(call.exposure.value)} = ratio {call.collateral_ratio.value}, below "
            f"{self._policy.maintenance_ratio.value}"
        )
        say.detail(
            f"call amount {say.amount(call.call_amount.value)} (exposure x "
            f"{self._policy.maintenance_ratio.value} - collateral value), due by "
            f"{call.due_by.ToDatetime(tzinfo=UTC):%Y-%m-%d %H:%M} UTC"
        )
        say.detail(
            f"signed inputs inside the call: risk policy v{check.risk_policy.version}, holdings "
            f"statement epoch {check.holdings.epoch}, price snapshot "
            + " · ".join(f"{q.asset_id} {say.amount(q.price.value)}" for q in snapshot.prices)
        )
        say.check(
            "recomputed from those signed inputs alone (collateral_sync.valuation."
            "recompute_margin_call): collateral value, ratio, call amount and due date match"
        )
        agreed = _d(state.agreed_amount)
        say.step(
            f"{CUSTODIAN} recomputes every call before it answers (a call that does not "
            "recompute is disputed, reason ARITHMETIC); its answer on the sync stream:"
        )
        say.detail(
            f"{_status(state.status)}: {say.amount(agreed)} agreed and due, "
            f"{say.amount(_d(state.call_amount) - agreed)} disputed"
        )
        return call.margin_call_id

    async def _top_up(self, call_id: str) -> None:
        say.section("8. Top-up: the agreed part is covered, the call is satisfied")
        asset, quantity = TOP_UP
        attested = await self._pledge(asset, quantity)
        self._holdings = attested
        say.step(
            f"{CLIENT} pledges {asset} {say.amount(quantity)} more: {CUSTODIAN} attests epoch "
            f"{attested.statement.epoch} ({_reason(attested.statement)}) at leaf "
            f"{attested.ref.leaf_index}"
        )
        self._proven(
            await self.evidence.prove_holdings(attested.envelope, attested.ref), attested.ref
        )

        async def satisfied() -> margin_pb2.MarginCallState | None:
            for state in await self._margin_calls():
                if (
                    state.margin_call_id == call_id
                    and state.status == _S.MARGIN_CALL_STATUS_SATISFIED
                ):
                    return state
            return None

        state = await self._until("the margin call to be satisfied", satisfied)
        say.step(
            f"{EXCHANGE}: margin call {_status(state.status)}, the top-up is worth "
            f"{say.amount(state.satisfied_amount.value)} under the call's own prices "
            f">= {say.amount(state.agreed_amount.value)} due"
        )
        credit = await self._until(
            f"{EXCHANGE} to credit the top-up",
            self._credit_where(lambda c: _cites(c, attested.ref.leaf_index)),
        )
        say.detail(
            f"CreditLine: collateral value {say.amount(credit.collateral_value.value)}, ratio "
            f"{self._ratio(credit)} (back above {self._policy.maintenance_ratio.value}), credit "
            f"limit {say.amount(credit.credit_limit.value)}"
        )

    async def _daily_yield(self) -> None:
        say.section("9. Daily yield on the fund token, attested like any change")
        now = self._clock.now()
        due = datetime.combine(now.date(), self._yield_time, tzinfo=UTC)
        if due <= now:
            due += timedelta(days=1)
        # Just past the yield time, exchange first: nothing the custodian then
        # signs is dated ahead of the exchange's clock.
        by = duration_pb2.Duration()
        by.FromTimedelta(due - now + timedelta(seconds=1))
        await self._c.regulator_control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))
        await self._c.exchange_control.advance_clock(test_control_pb2.AdvanceClockRequest(by=by))
        moved = await self._c.custodian_control.advance_clock(
            test_control_pb2.AdvanceClockRequest(by=by)
        )
        self._clock.learn(moved.now)
        say.step(
            f"the three servers' clocks move {round((due - now).total_seconds() / 60)} min forward to "
            f"{due:%H:%M} UTC, the custodian's daily yield time"
        )
        before = self._holdings
        assert before is not None
        after = await self._holdings_now()
        if after.statement.reason != _REASON.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL:
            raise StateError(
                f"expected a YIELD_ACCRUAL statement at the yield time, got {_reason(after.statement)}",
                metadata={"expected": "YIELD_ACCRUAL", "actual": _reason(after.statement)},
            )
        self._holdings = after
        say.step(
            f"{CUSTODIAN} accrues and attests epoch {after.statement.epoch} "
            f"({_reason(after.statement)}) at leaf {after.ref.leaf_index}:"
        )
        old = _by_asset(before.statement)
        for asset, position in _by_asset(after.statement).items():
            was = old.get(asset)
            gained = _d(position.quantity) - (Decimal(0) if was is None else _d(was.quantity))
            if gained:
                say.detail(
                    f"{asset} {say.amount(was.quantity.value if was else '0')} -> "
                    f"{say.amount(position.quantity.value)} (+{say.amount(gained)}); still "
                    f"{say.amount(position.pledged_quantity.value)} pledged: yield is never pledged"
                )
        self._proven(await self.evidence.prove_holdings(after.envelope, after.ref), after.ref)
        previous = _d(self._credit.collateral_value)
        credit = await self._until(
            f"{EXCHANGE} to credit the yield statement",
            self._credit_where(lambda c: _cites(c, after.ref.leaf_index)),
        )
        value = _d(credit.collateral_value)
        say.detail(
            f"{EXCHANGE} proves and credits it: collateral value {say.amount(value)} "
            + (
                "(unchanged: only pledged quantity counts)"
                if value == previous
                else f"(was {say.amount(previous)})"
            )
        )

    async def _liquidation(self) -> None:
        say.section("10. Second drop: liquidation along the client's path, yield first")
        before = self._holdings
        assert before is not None
        exposure = _d(self._credit.exposure)
        fund_before = _d(self._policy.insurance_fund_balance)
        asset, price = SECOND_DROP
        await self._set_price(asset, price)
        prices = dict(PRICES, **{asset: price})
        say.step(
            f"the scripted price feed moves {asset} {say.amount(FIRST_DROP[1])} -> {say.amount(price)}"
        )
        quotes = [
            valuation_pb2.PriceQuote(asset_id=a, price=amount_to_proto(p))
            for a, p in prices.items()
        ]
        now = self._clock.now()
        for quote in quotes:
            quote.observed_at.FromDatetime(now)
        valued = value_collateral(self._policy, before.statement.positions, quotes, valued_at=now)
        ratio = collateral_ratio(self._policy, valued.collateral_value, exposure)
        say.detail(
            f"valued with the SDK under policy v{self._policy.version}: collateral "
            f"{say.amount(valued.collateral_value)} / exposure {say.amount(exposure)} = ratio "
            f"{format_amount(ratio) if ratio is not None else 'none'}, below the liquidation line "
            f"{self._policy.liquidation_ratio.value}"
        )

        async def liquidated() -> _Attested | None:
            attested = await self._holdings_now()
            if attested.statement.reason == _REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION:
                return attested
            return None

        after = await self._until(f"{CUSTODIAN} to execute a liquidation", liquidated)
        record = await self._until(f"{EXCHANGE} to record the receipt", self._liquidation_record)
        # The instruction is addressed to the custodian, the receipt to the exchange, the
        # allocation to the custodian: each is verified as its addressee would.
        instruction = self._open(
            record.liquidation_instruction, liquidation_pb2.LiquidationInstruction, CUSTODIAN
        )
        receipt = self._open(
            record.liquidation_receipt, liquidation_pb2.LiquidationReceipt, EXCHANGE
        )
        self.evidence.relied_on_by_custodian(record.liquidation_instruction)
        self.evidence.relied_on_by_exchange(record.liquidation_receipt)
        amount = _d(instruction.amount)
        say.step(
            f"{EXCHANGE} signs LiquidationInstruction {instruction.liquidation_id}: raise "
            f"{say.amount(amount)} along {instruction.liquidation_path_id}; {CUSTODIAN} executes "
            f"it and attests epoch {after.statement.epoch} ({_reason(after.statement)}) at leaf "
            f"{after.ref.leaf_index}"
        )
        self._proven(await self.evidence.prove_holdings(after.envelope, after.ref), after.ref)
        if (receipt.liquidation_id, receipt.attestation.leaf_index) != (
            instruction.liquidation_id,
            after.ref.leaf_index,
        ):
            raise StateError(
                f"the receipt should answer {instruction.liquidation_id} and cite leaf "
                f"{after.ref.leaf_index}; it answers {receipt.liquidation_id} and cites leaf "
                f"{receipt.attestation.leaf_index}",
                metadata={
                    "expected": f"{instruction.liquidation_id} @ {after.ref.leaf_index}",
                    "actual": f"{receipt.liquidation_id} @ {receipt.attestation.leaf_index}",
                },
            )
        say.step(
            f"ListLiquidations: {CUSTODIAN}'s signed LiquidationReceipt, verified as {EXCHANGE} "
            f"verifies it; it cites the holdings statement at leaf {after.ref.leaf_index}"
        )
        for paid in receipt.yield_distributions:
            say.detail(
                f"yield first: {paid.asset_id} {say.amount(paid.quantity.value)} accrued, paid "
                f"out to {CLIENT} before any sale"
            )
        say.detail("then the fills, along the path in its order:")
        say.table(
            ["asset", "quantity", "price", "proceeds", "venue"],
            [
                [
                    f.asset_id,
                    say.amount(f.quantity.value),
                    say.amount(f.price.value),
                    say.amount(f.proceeds.value),
                    f.venue,
                ]
                for f in receipt.fills
            ],
        )
        proceeds, shortfall = _d(receipt.total_proceeds), _d(receipt.shortfall)
        say.detail(
            f"total proceeds {say.amount(proceeds)}; shortfall {say.amount(amount)} - "
            f"{say.amount(proceeds)} = {say.amount(shortfall)}"
        )
        _check_receipt(receipt, amount, before.statement, after.statement)
        say.check(
            "the receipt adds up (fills to total, amount - total to shortfall) and agrees with "
            "the custodian's signed holdings before and after: the same quantities sold, the "
            "same yield paid out"
        )

        async def new_policy() -> valuation_pb2.RiskPolicy | None:
            envelope = (
                await self._c.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
            ).risk_policy
            policy = self._open(envelope, valuation_pb2.RiskPolicy, CLIENT)
            if policy.version <= self._policy.version:
                return None
            self.evidence.relied_on_by_custodian(envelope)
            return policy

        policy = await self._until(f"{EXCHANGE} to draw on its insurance fund", new_policy)
        fund_after = _d(policy.insurance_fund_balance)
        say.step(
            f"{EXCHANGE} publishes risk policy v{policy.version}: insurance fund "
            f"{say.amount(fund_before)} -> {say.amount(fund_after)}"
        )
        allocation = self._open(
            record.shortfall_allocation, liquidation_pb2.ShortfallAllocation, CUSTODIAN
        )
        self.evidence.relied_on_by_custodian(record.shortfall_allocation)
        covered = _d(allocation.covered_by_insurance_fund)
        deleveraged = _d(allocation.auto_deleveraging_amount)
        ranking = " > ".join(
            f"{r.rank}. {r.account_id} ({say.amount(r.score.value)})" for r in allocation.ranking
        )
        say.step(
            f"ShortfallAllocation, signed by {EXCHANGE}: shortfall "
            f"{say.amount(allocation.shortfall.value)}; the insurance fund covers "
            f"{say.amount(covered)}, {say.amount(deleveraged)} left for auto-deleveraging"
            + (f" (ranking {ranking})" if ranking else "")
        )
        if (
            allocation.liquidation_id != receipt.liquidation_id
            or _d(allocation.shortfall) != shortfall
            or covered != fund_before - fund_after
            or _d(allocation.insurance_fund_balance_after) != fund_after
        ):
            raise StateError(
                f"the allocation of {allocation.liquidation_id} (shortfall "
                f"{allocation.shortfall.value}, fund {allocation.insurance_fund_balance_after.value} "
                f"after) disagrees with the receipt of {receipt.liquidation_id} (shortfall "
                f"{format_amount(shortfall)}) or the policy (fund {format_amount(fund_after)})",
                metadata={
                    "expected": f"{receipt.liquidation_id} {format_amount(shortfall)} "
                    f"{format_amount(fund_after)}",
                    "actual": f"{allocation.liquidation_id} {allocation.shortfall.value} "
                    f"{allocation.insurance_fund_balance_after.value}",
                },
            )
        say.check(
            "the allocation covers the receipt's shortfall, and its draw is the one the new "
            "policy publishes"
        )
        credit = await self._until(
            f"{EXCHANGE} to close the account out",
            self._credit_where(lambda c: _d(c.exposure) == 0 and _cites(c, after.ref.leaf_index)),
        )
        states = await self._margin_calls()
        say.step(
            f"CreditLine: exposure {say.amount(credit.exposure.value)}, collateral value "
            f"{say.amount(credit.collateral_value.value)}; left with {CUSTODIAN}: "
            f"{_positions(after.statement)}"
        )
        say.detail("margin calls: " + (" · ".join(_status(s.status) for s in states) or "none"))

    async def _liquidation_record(self) -> liquidation_pb2.LiquidationRecord | None:
        """The account's liquidation once its receipt (and any allocation) is recorded."""
        listed = await self._c.exchange.list_liquidations(
            exchange_service_pb2.ListLiquidationsRequest(account_id=ACCOUNT)
        )
        for record in listed.liquidations:
            if not record.HasField("liquidation_receipt"):
                continue
            receipt = liquidation_pb2.LiquidationReceipt.FromString(
                record.liquidation_receipt.payload
            )
            # Parsed unverified only to know whether to wait; verified before any use.
            if _d(receipt.shortfall) == 0 or record.HasField("shortfall_allocation"):
                return record
        return None

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
