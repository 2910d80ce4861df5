"""What every act of the demo stands on: its connections, the servers' clock, and plumbing.

:class:`Stage` holds the story's state (the policy, credit line and holdings
last seen) and the calls every act makes: verify and parse a statement, poll
until a server has done something, pledge as the client, expect a refusal,
print a proof. The acts themselves are its subclasses, one module a chapter.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TypeVar

import grpc
from collateral_sync.amounts import amount_to_proto
from collateral_sync.clients import CustodianClient, ExchangeClient, TestControlClient
from collateral_sync.errors import CollateralSyncError, RPCError, StateError
from collateral_sync.keys import KeyRegistry
from collateral_sync.signer import Signer
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    exchange_service_pb2,
    margin_pb2,
    test_control_pb2,
    valuation_pb2,
)
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.evidence import Evidence, Proven
from collateral_sync_reference.demo.scenario import (
    ACCOUNT,
    CLIENT,
    CLIENT_TTL,
    CUSTODIAN,
    EXCHANGE,
    ORIGIN,
)

__all__ = ["Attested", "Connections", "Stage"]

_M = TypeVar("_M", bound=Message)
_T = TypeVar("_T")

#: Deadline of one wait for something a server does in the background.
WAIT = 20.0
_POLL = 0.05


@dataclass(frozen=True, slots=True)
class Connections:
    """The demo's clients: as the client (mutual TLS as client-1) and as the operator."""

    custodian: CustodianClient
    exchange: ExchangeClient
    custodian_control: TestControlClient
    exchange_control: TestControlClient
    regulator_control: TestControlClient


@dataclass(frozen=True, slots=True)
class Attested:
    """A holdings statement as the custodian returned it: envelope, parsed, and its leaf."""

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


def _hashes(count: int) -> str:
    return f"{count} hash" if count == 1 else f"{count} hashes"


class Stage:
    """The story's state and the calls every act makes; the acts are its subclasses."""

    def __init__(
        self, parties: Connections, registry: KeyRegistry, client_key: Signer, yield_time: time
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
        self._holdings: Attested | None = None

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

    async def _holdings_now(self, account_id: str = ACCOUNT) -> Attested:
        response = await self._c.custodian.get_holdings_statement(
            custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id)
        )
        statement = self._open(
            response.holdings_statement, attestation_pb2.HoldingsStatement, CLIENT
        )
        return Attested(response.holdings_statement, statement, response.attestation)

    async def _credit_line(
        self, account_id: str = ACCOUNT
    ) -> tuple[envelope_pb2.Envelope, valuation_pb2.CreditLine] | None:
        try:
            response = await self._c.exchange.get_credit_line(
                exchange_service_pb2.GetCreditLineRequest(account_id=account_id)
            )
        except RPCError as err:
            # Until the exchange holds the account's statement it does not know the client
            # for one of the account's parties (PROTOCOL.md §4.5): not yet, as NOT_FOUND is.
            if err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
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
        signer: Signer | None = None,
        account_id: str = ACCOUNT,
        path: envelope_pb2.Envelope | None = None,
    ) -> Attested:
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
        return Attested(response.holdings_statement, statement, response.attestation)

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
