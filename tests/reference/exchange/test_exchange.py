"""Tests for the reference exchange, run as a real process against a custodian the test scripts.

The exchange runs as its own process (``collateral-sync serve exchange
--test-mode``, from the ``start_server`` fixture) over mutual TLS. Its
counterparty is a custodian written here from SDK parts — a real attestation
log and a real position-sync session — which the test drives: it attests
holdings when told, can serve a forged inclusion proof or a rewritten log,
and answers liquidation instructions with a chosen shortfall. Everything the
exchange signs is verified with the SDK, and figures are checked against hand
computations (PROTOCOL.md §7.4's worked example) and against
:mod:`collateral_sync.valuation` on the same signed inputs.

What the exchange decided but sends nowhere (a rejected statement, a kept
checkpoint) is read from its SQLite database, read-only, while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from _postgres import open_database
from _softhsm import SoftHsmToken
from collateral_sync.amounts import amount_to_proto, format_amount
from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.clients import CustodianClient, ExchangeClient, TestControlClient
from collateral_sync.errors import CollateralSyncError, MalformedError, RPCError
from collateral_sync.keys import SigningKey
from collateral_sync.merkle import leaf_hash
from collateral_sync.server import create_server, start_server, stop_server
from collateral_sync.signing import pae, sign_statement, verify_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    EXCHANGE_TO_CUSTODIAN,
    SyncLog,
    SyncSession,
    serve_sync_stream,
)
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    custodian_service_pb2_grpc,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    margin_pb2,
    pledge_release_pb2,
    position_sync_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    LiquidationCheck,
    recompute_liquidation_instruction,
    recompute_margin_call,
    recompute_pledge_release_consent,
    value_collateral,
)
from collateral_sync_reference.common.config import ConfigSection
from collateral_sync_reference.common.storage import SqliteStorage
from collateral_sync_reference.exchange.core import ExchangeCore, ExchangeSettings
from collateral_sync_reference.exchange.policy_content import build_policy_content
from collateral_sync_reference.exchange.price_feed import PriceStep, ScriptedPriceFeed
from google.protobuf import duration_pb2

from .._token_keys import PIN_ENV, token_key
from ..conftest import (
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    OTHER_EXCHANGE,
    Parties,
    ServerProcess,
    StartServer,
)

_T = TypeVar("_T")
_R = errors_pb2.ErrorReason
_S = margin_pb2.MarginCallStatus
_K = margin_pb2.MarginCallResponseKind
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
WAIT = 15.0

#: PROTOCOL.md §7.4: BENJI 1000000 @1, USDC 500000 (400000 pledged) @1, SPY-T 2000 @600,
#: AAPL-T 1500 (500 locked) @230, XYZ (not listed) 100 @10.
EXAMPLE_POSITIONS = (
    ("BENJI", "1000000", "0", "1000000"),
    ("USDC", "500000", "0", "400000"),
    ("SPY-T", "2000", "0", "2000"),
    ("AAPL-T", "1500", "500", "1500"),
    ("XYZ", "100", "0", "100"),
)
EXAMPLE_POLICY = {
    "assets": {
        "BENJI": "TOKENIZED_MMF",
        "USDC": "STABLECOIN",
        "SPY-T": "TOKENIZED_ETF",
        "AAPL-T": "TOKENIZED_SINGLE_STOCK",
    },
}
EXAMPLE_PRICES = [
    {"asset_id": "BENJI", "price": "1"},
    {"asset_id": "USDC", "price": "1"},
    {"asset_id": "SPY-T", "price": "600"},
    {"asset_id": "AAPL-T", "price": "230"},
    {"asset_id": "XYZ", "price": "10"},
]


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def ns(stamp: Any) -> int:
    return int(stamp.seconds) * 1_000_000_000 + int(stamp.nanos)


def sign_any(
    message: Any,
    signer: SigningKey,
    *,
    audience: list[str],
    sequence: int,
    ttl: timedelta,
    issued_at: datetime,
    statement_id: str = "s",
) -> envelope_pb2.Envelope:
    """Sign a statement with any key, even one whose role may not issue it (the SDK refuses to)."""
    message.header.CopyFrom(
        envelope_pb2.StatementHeader(
            issuer=signer.party_id,
            audience=audience,
            sequence=sequence,
            statement_id=statement_id,
        )
    )
    message.header.issued_at.FromDatetime(issued_at)
    message.header.expires_at.FromDatetime(issued_at + ttl)
    payload = message.SerializeToString(deterministic=True)
    payload_type = payload_type_of(message)
    return envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[
            envelope_pb2.Signature(
                key_id=signer.key_id, sig=signer.sign(pae(payload_type, payload))
            )
        ],
    )


def liquidation_path(
    signer: SigningKey,
    account_id: str,
    path_id: str,
    *,
    sequence: int,
    issued_at: datetime,
    exchange_id: str = EXCHANGE,
    audience: tuple[str, ...] = (CUSTODIAN,),
    ttl: timedelta = timedelta(hours=1),
) -> envelope_pb2.Envelope:
    """A LiquidationPath as a client pre-authorises it (addressed to the custodian)."""
    path = liquidation_pb2.LiquidationPath(
        account_id=account_id,
        exchange_id=exchange_id,
        proceeds_account_id=f"{exchange_id}/settlement",
        steps=[
            liquidation_pb2.LiquidationStep(
                asset_id="BENJI", venue="fund-redemption", max_quantity=amount_to_proto("1000000")
            )
        ],
    )
    return sign_any(
        path,
        signer,
        audience=list(audience),
        sequence=sequence,
        ttl=ttl,
        issued_at=issued_at,
        statement_id=path_id,
    )


# --- the scripted custodian -------------------------------------------------------------


class FakeCustodian(custodian_service_pb2_grpc.CustodianServiceServicer):
    """A custodian the test controls: real log and sync session, scripted behaviour."""

    def __init__(self, directory: Path, parties: Parties) -> None:
        self.key: SigningKey = parties.keys[CUSTODIAN]
        self.client: SigningKey = parties.keys[CLIENT]
        self.registry = parties.registry
        self.offset = timedelta(0)
        self.log = AttestationLog(directory / "fake-attestations.sqlite", origin=ORIGIN)
        #: The log checkpoints and proofs are served from (a fork replaces it).
        self.served = self.log
        self.db = sqlite3.connect(directory / "fake-sync.sqlite", isolation_level=None)
        self.sync_log = SyncLog(
            self.db,
            party_id=CUSTODIAN,
            peer_party_id=EXCHANGE,
            sending_direction=CUSTODIAN_TO_EXCHANGE,
        )
        self.session = SyncSession(
            self.sync_log, self.key, self.registry, apply=self._apply, clock=self.now
        )
        self.received: list[position_sync_pb2.PositionUpdate] = []
        self._changed = asyncio.Event()
        self._counters: dict[str, itertools.count[int]] = {}
        self.epochs: dict[str, int] = {}
        self.leaves: dict[int, envelope_pb2.Envelope] = {}
        #: Leaf indexes whose inclusion proofs are served corrupted.
        self.tampered: set[int] = set()
        #: Proceeds a liquidation raises (None: exactly the amount instructed).
        self.proceeds: Decimal | None = None
        self.liquidations: list[LiquidationCheck] = []

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def next_sequence(self, name: str) -> int:
        return next(self._counters.setdefault(name, itertools.count(1)))

    def close(self) -> None:
        self.log.close()
        self.db.close()

    # -- what the exchange sent --

    def _apply(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        self.received.extend(update for _, update in updates)
        self._changed.set()

    async def wait_update(
        self, kind: str, predicate: Callable[[Any], bool] = lambda _: True
    ) -> envelope_pb2.Envelope:
        """The first envelope of ``kind`` from the exchange whose statement satisfies ``predicate``."""
        message_class = {
            "credit_line": valuation_pb2.CreditLine,
            "margin_call": margin_pb2.MarginCall,
            "risk_policy": valuation_pb2.RiskPolicy,
            "liquidation_instruction": liquidation_pb2.LiquidationInstruction,
        }[kind]
        async with asyncio.timeout(WAIT):
            while True:
                for update in self.received:
                    if update.WhichOneof("update") == kind:
                        envelope = getattr(update, kind)
                        if predicate(message_class.FromString(envelope.payload)):
                            return envelope
                self._changed.clear()
                await self._changed.wait()

    # -- what the custodian says --

    def statement(
        self,
        account_id: str,
        positions: tuple[tuple[str, str, str, str], ...],
        *,
        reason: int = attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
    ) -> envelope_pb2.Envelope:
        epoch = self.epochs.get(account_id, 0) + 1
        self.epochs[account_id] = epoch
        holdings = attestation_pb2.HoldingsStatement(
            account_id=account_id,
            exchange_id=EXCHANGE,
            epoch=epoch,
            reason=reason,  # type: ignore[arg-type]
            positions=[
                common_pb2.Position(
                    account_id=account_id,
                    asset_id=asset,
                    quantity=amount_to_proto(quantity),
                    locked_quantity=amount_to_proto(locked),
                    pledged_quantity=amount_to_proto(pledged),
                )
                for asset, quantity, locked, pledged in positions
            ],
        )
        # Addressed as §5.8 says: the exchange it is pledged to, and the account's client.
        return sign_statement(
            holdings,
            self.key,
            audience=[EXCHANGE, self.client.party_id],
            sequence=self.next_sequence("holdings"),
            ttl=timedelta(days=30),
            issued_at=self.now(),
        )

    def path(self, account_id: str, path_id: str) -> envelope_pb2.Envelope:
        """The client's pre-authorised LiquidationPath, as a pledge records it."""
        return liquidation_path(
            self.client,
            account_id,
            path_id,
            sequence=self.next_sequence("path"),
            issued_at=self.now(),
        )

    def attest(
        self,
        account_id: str,
        positions: tuple[tuple[str, str, str, str], ...],
        *,
        reason: int = attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
        log: AttestationLog | None = None,
        ref_hash: bytes | None = None,
        path: envelope_pb2.Envelope | None = None,
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.AttestationRef]:
        """Sign a holdings statement, append it to the log, send it on the stream.

        ``path``: the pledge's liquidation path, announced with the change.
        """
        envelope = self.statement(account_id, positions, reason=reason)
        target = log or self.log
        index = target.append(statement_leaf(envelope))
        self.leaves[index] = envelope
        ref = attestation_pb2.AttestationRef(
            log_origin=ORIGIN,
            leaf_index=index,
            leaf_hash=ref_hash or leaf_hash(statement_leaf(envelope)),
            tree_size=index + 1,
        )
        change = position_sync_pb2.HoldingsChange(holdings_statement=envelope, attestation=ref)
        if path is not None:
            change.liquidation_path.CopyFrom(path)
        self.send(position_sync_pb2.PositionUpdate(holdings_change=change))
        return envelope, ref

    def send(self, update: position_sync_pb2.PositionUpdate) -> None:
        with self.sync_log.transaction():
            self.sync_log.append([update])

    def respond(
        self,
        margin_call_id: str,
        kind: int,
        agreed: str,
        *,
        dispute_reason: int = margin_pb2.DISPUTE_REASON_UNSPECIFIED,
        signer: SigningKey | None = None,
        audience: str = EXCHANGE,
        issued_at: datetime | None = None,
        ttl: timedelta = timedelta(hours=1),
        sequence: int | None = None,
    ) -> envelope_pb2.Envelope:
        """A signed MarginCallResponse (by default a valid one from this custodian)."""
        response = margin_pb2.MarginCallResponse(
            margin_call_id=margin_call_id,
            kind=kind,  # type: ignore[arg-type]
            agreed_amount=common_pb2.Decimal(value=agreed),
            dispute_reason=dispute_reason,  # type: ignore[arg-type]
        )
        return sign_any(
            response,
            signer or self.key,
            audience=[audience],
            sequence=sequence or self.next_sequence("response"),
            ttl=ttl,
            issued_at=issued_at or self.now(),
        )

    # -- CustodianService --

    async def GetCheckpoint(
        self, request: custodian_service_pb2.GetCheckpointRequest, context: Any
    ) -> custodian_service_pb2.GetCheckpointResponse:
        checkpoint = self.served.checkpoint(
            self.key,
            now=self.now(),
            sequence=self.next_sequence("checkpoint"),
            ttl=timedelta(days=1),
        )
        return custodian_service_pb2.GetCheckpointResponse(checkpoint=checkpoint)

    async def GetInclusionProof(
        self, request: custodian_service_pb2.GetInclusionProofRequest, context: Any
    ) -> custodian_service_pb2.GetInclusionProofResponse:
        size = request.tree_size or self.served.size()
        proof = self.served.inclusion_proof(request.leaf_index, size)
        if request.leaf_index in self.tampered:
            proof.audit_path[0] = bytes(32)
        return custodian_service_pb2.GetInclusionProofResponse(
            holdings_statement=self.leaves.get(request.leaf_index), proof=proof
        )

    async def GetConsistencyProof(
        self, request: custodian_service_pb2.GetConsistencyProofRequest, context: Any
    ) -> custodian_service_pb2.GetConsistencyProofResponse:
        proof = self.served.consistency_proof(
            request.first_tree_size, request.second_tree_size or self.served.size()
        )
        return custodian_service_pb2.GetConsistencyProofResponse(proof=proof)

    async def SyncPositions(  # type: ignore[override]
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await serve_sync_stream(self.session, request_iterator, context)

    async def SubmitLiquidationInstruction(
        self, request: custodian_service_pb2.SubmitLiquidationInstructionRequest, context: Any
    ) -> custodian_service_pb2.SubmitLiquidationInstructionResponse:
        envelope = request.liquidation_instruction
        instruction = liquidation_pb2.LiquidationInstruction.FromString(envelope.payload)
        call = None
        if instruction.margin_call_id:
            call_envelope = await self.wait_update(
                "margin_call", lambda c: c.margin_call_id == instruction.margin_call_id
            )
            call = margin_pb2.MarginCall.FromString(call_envelope.payload)
        # What a custodian must do before it sells anything (PROTOCOL.md §9.2).
        check = recompute_liquidation_instruction(
            envelope, self.registry, audience=CUSTODIAN, now=self.now(), margin_call=call
        )
        self.liquidations.append(check)
        proceeds = check.amount if self.proceeds is None else self.proceeds
        receipt = liquidation_pb2.LiquidationReceipt(
            liquidation_id=instruction.liquidation_id,
            account_id=instruction.account_id,
            fills=[
                liquidation_pb2.LiquidationFill(
                    asset_id="BENJI",
                    quantity=amount_to_proto(proceeds),
                    price=amount_to_proto("1"),
                    proceeds=amount_to_proto(proceeds),
                    venue="fund-redemption",
                )
            ],
            total_proceeds=amount_to_proto(proceeds),
            shortfall=amount_to_proto(max(Decimal(0), check.amount - proceeds)),
        )
        signed = sign_statement(
            receipt,
            self.key,
            audience=[EXCHANGE],
            sequence=self.next_sequence("receipt"),
            ttl=timedelta(days=1),
            issued_at=self.now(),
        )
        # Like the reference custodian: the receipt also goes on the stream.
        self.send(position_sync_pb2.PositionUpdate(liquidation_receipt=signed))
        return custodian_service_pb2.SubmitLiquidationInstructionResponse(
            liquidation_receipt=signed
        )


# --- one exchange against one scripted custodian ----------------------------------------


@dataclass
class World:
    parties: Parties
    custodian: FakeCustodian
    server: ServerProcess
    exchange: ExchangeClient
    control: TestControlClient
    #: The exchange's storage config section (either engine).
    database: dict[str, Any]

    def rows(self, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
        """Read the running exchange's database (read-only)."""
        with open_database(self.database) as connection:
            return connection.execute(sql, parameters).fetchall()

    async def until_rows(self, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
        """Poll the exchange's database until the query returns rows (it has no event for it)."""
        async with asyncio.timeout(WAIT):
            while True:
                found = self.rows(sql, *parameters)
                if found:
                    return found
                await asyncio.sleep(0.05)

    async def credit_line(self, account_id: str) -> valuation_pb2.CreditLine:
        response = await self.exchange.get_credit_line(
            exchange_service_pb2.GetCreditLineRequest(account_id=account_id)
        )
        return self.verified(response.credit_line, valuation_pb2.CreditLine)

    async def state(self, margin_call_id: str) -> margin_pb2.MarginCallState:
        response = await self.exchange.get_margin_call(
            exchange_service_pb2.GetMarginCallRequest(margin_call_id=margin_call_id)
        )
        return self.verified(response.margin_call_state, margin_pb2.MarginCallState)

    def verified(self, envelope: envelope_pb2.Envelope, message_class: type[Any]) -> Any:
        """Check a statement the exchange signed, as the custodian would, and parse it."""
        statement = verify_statement(
            envelope,
            self.parties.registry,
            expected_type=message_class,
            audience=CUSTODIAN,
            now=self.custodian.now(),
        )
        assert statement.issuer == EXCHANGE
        return statement.message

    async def respond(self, envelope: envelope_pb2.Envelope) -> margin_pb2.MarginCallState:
        response = await self.exchange.respond_to_margin_call(
            exchange_service_pb2.RespondToMarginCallRequest(margin_call_response=envelope)
        )
        return self.verified(response.margin_call_state, margin_pb2.MarginCallState)

    async def advance(self, by: timedelta) -> None:
        # The custodian first: it must not take the exchange's next batch for one from the future.
        self.custodian.offset += by
        await self.control.advance_clock(
            test_control_pb2.AdvanceClockRequest(
                by=duration_pb2.Duration(seconds=int(by.total_seconds()))
            )
        )


@contextlib.asynccontextmanager
async def world(
    parties: Parties,
    start_server_fixture: StartServer,
    directory: Path,
    *,
    custodian_type: type[FakeCustodian] = FakeCustodian,
    **exchange_settings: Any,
) -> AsyncIterator[World]:
    custodian = custodian_type(directory, parties)
    server = create_server(tls=parties.tls(CUSTODIAN), servicers=[custodian])
    port = await start_server(server, "127.0.0.1:0")
    settings = {"log_origin": ORIGIN, **exchange_settings}
    config = parties.config(
        EXCHANGE,
        "exchange",
        directory,
        peers={CUSTODIAN: f"127.0.0.1:{port}"},
        sync={"heartbeat_interval_ms": 1000},
        exchange=settings,
    )
    process = await asyncio.to_thread(start_server_fixture, "exchange", config, name=directory.name)
    try:
        async with parties.channel(process.address, CUSTODIAN) as channel:
            yield World(
                parties=parties,
                custodian=custodian,
                server=process,
                exchange=ExchangeClient(channel),
                control=TestControlClient(channel),
                database=parties.storage(directory, EXCHANGE),
            )
    finally:
        await asyncio.to_thread(process.close)
        await stop_server(server, grace=0)
        custodian.close()


async def refused(call: Coroutine[Any, Any, Any]) -> RPCError:
    with pytest.raises(RPCError) as caught:
        await call
    return caught.value


def d(text: str) -> Decimal:
    return Decimal(text)


# --- the scripted price source and the policy configuration (no process needed) ----------------


def test_scripted_prices_follow_the_script_and_survive_a_restart(tmp_path: Path) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    script = [
        PriceStep("BTC", d("90"), at=t0 + timedelta(hours=1)),
        PriceStep("BTC", d("100")),
        PriceStep("ETH", d("5"), at=t0 + timedelta(hours=2), observed_at=t0),
    ]

    def quotes(feed: ScriptedPriceFeed) -> dict[str, tuple[str, datetime]]:
        return {
            q.asset_id: (q.price.value, q.observed_at.ToDatetime(tzinfo=UTC))
            for q in feed.all_quotes()
        }

    storage = SqliteStorage(tmp_path / "prices.sqlite")
    feed = ScriptedPriceFeed(storage, name="scripted", script=script)
    with storage.transaction():
        assert feed.tick(t0) == {"BTC"}  # the untimed step applies at once
    assert quotes(feed) == {"BTC": ("100", t0)}
    later = t0 + timedelta(minutes=30)
    with storage.transaction():
        stored = feed.set_price(
            valuation_pb2.PriceQuote(asset_id="BTC", price=amount_to_proto("95")), now=later
        )
        assert (stored.source, stored.price.value) == ("scripted", "95")
        assert feed.tick(later) == {"BTC"}
        assert feed.tick(later) == set()
    assert quotes(feed) == {"BTC": ("95", later)}
    with storage.transaction():
        assert feed.tick(t0 + timedelta(hours=1)) == {"BTC"}  # a later step replaces it
    storage.close()

    storage = SqliteStorage(tmp_path / "prices.sqlite")
    feed = ScriptedPriceFeed(storage, name="scripted", script=script)
    with storage.transaction():
        assert feed.tick(t0 + timedelta(hours=1)) == set()  # nothing applied twice
        assert feed.tick(t0 + timedelta(hours=3)) == {"ETH"}
    assert quotes(feed) == {"BTC": ("90", t0 + timedelta(hours=1)), "ETH": ("5", t0)}
    refusals = [
        (
            valuation_pb2.PriceQuote(asset_id="BTC", price=amount_to_proto("1"), source="x"),
            "MALFORMED",
        ),
        (
            valuation_pb2.PriceQuote(asset_id="BTC", price=common_pb2.Decimal(value="-1")),
            "INVALID_AMOUNT",
        ),
        (
            valuation_pb2.PriceQuote(asset_id="BTC", price=common_pb2.Decimal(value="1.0")),
            "INVALID_AMOUNT",
        ),
        (valuation_pb2.PriceQuote(price=amount_to_proto("1")), "MALFORMED"),
        (valuation_pb2.PriceQuote(asset_id="BTC"), "MALFORMED"),
    ]
    for quote, reason in refusals:
        with pytest.raises(MalformedError) as caught, storage.transaction():
            feed.set_price(quote, now=t0)
        assert caught.value.reason_name == reason
    assert quotes(feed)["BTC"] == ("90", t0 + timedelta(hours=1))
    storage.close()


def test_policy_configuration_is_checked_before_start() -> None:
    def build(data: dict[str, Any]) -> valuation_pb2.RiskPolicy:
        return build_policy_content(ConfigSection(data, file=Path("exchange.json")))

    seed = build({})
    assert (seed.version, seed.HasField("header"), seed.price_source) == (0, False, "scripted")
    assert {a.asset_id for a in seed.assets} == {"BTC", "USDC", "BENJI", "SPYx", "TSLAx"}
    custom = build(
        {
            "haircuts": {"STABLECOIN": "0.9", "ASSET_CLASS_CRYPTO": "0.5"},
            "concentration_caps": {},
            "asset_haircuts": [
                {
                    "asset_id": "AAPL-T",
                    "asset_class": "TOKENIZED_SINGLE_STOCK",
                    "collateral_factor": "0.5",
                }
            ],
            "rounding_scale": 4,
        }
    )
    assert {h.asset_class: h.collateral_factor.value for h in custom.haircuts} == {
        common_pb2.ASSET_CLASS_STABLECOIN: "0.9",
        common_pb2.ASSET_CLASS_CRYPTO: "0.5",
    }
    assert list(custom.concentration_caps) == []
    assert custom.asset_haircuts[0].asset_id == "AAPL-T"
    bad = [
        ({"leverage": "2"}, "leverage"),
        ({"liquidation_ratio": "0.6"}, "liquidation_ratio"),
        ({"maintenance_ratio": "0.505"}, "maintenance_ratio"),
        ({"haircuts": {"STABLECOIN": "1.5"}}, "haircuts"),
        ({"haircuts": {"GOLD": "0.5"}}, "haircuts.GOLD"),
        ({"leverage_cap": 2}, "leverage_cap"),
        ({"stale_price_rule": "NEVER"}, "stale_price_rule"),
    ]
    for data, field in bad:
        with pytest.raises(MalformedError) as caught:
            build(data)
        assert caught.value.metadata["field"].startswith(field), data


# --- the liquidation path, learned from pledges (the apply callback, no process needed) ------


def test_the_liquidation_path_comes_with_the_pledge_and_a_false_one_fails_its_batch(
    reference_parties: Parties, tmp_path: Path
) -> None:
    parties = reference_parties
    custodian, client = parties.keys[CUSTODIAN], parties.keys[CLIENT]
    now = datetime.now(UTC).replace(microsecond=0)
    storage = SqliteStorage(tmp_path / "exchange.sqlite")
    policy = build_policy_content(ConfigSection({}, file=Path("exchange.json")))
    core = ExchangeCore(
        storage,
        storage.sync_log(
            party_id=EXCHANGE, peer_party_id=CUSTODIAN, sending_direction=EXCHANGE_TO_CUSTODIAN
        ),
        signer=parties.keys[EXCHANGE],
        registry=parties.registry,
        settings=ExchangeSettings(
            party_id=EXCHANGE, custodian_id=CUSTODIAN, log_origin=ORIGIN, policy_content=policy
        ),
        prices=ScriptedPriceFeed(storage, name=policy.price_source),
        clock=lambda: now,
    )
    core.start()
    sequences = itertools.count(1)
    entries = itertools.count(1)

    def pledge(path: envelope_pb2.Envelope, account_id: str = "acct-p") -> None:
        """One pledge's holdings change, applied as the stream applies a batch."""
        statement = sign_statement(
            attestation_pb2.HoldingsStatement(
                account_id=account_id, exchange_id=EXCHANGE, epoch=next(sequences)
            ),
            custodian,
            audience=[EXCHANGE, CLIENT],
            sequence=next(sequences),
            ttl=timedelta(days=1),
            issued_at=now,
        )
        change = position_sync_pb2.HoldingsChange(
            holdings_statement=statement,
            attestation=attestation_pb2.AttestationRef(log_origin=ORIGIN, tree_size=1),
            liquidation_path=path,
        )
        with storage.transaction():
            core.apply_updates(
                [(next(entries), position_sync_pb2.PositionUpdate(holdings_change=change))]
            )

    def path(path_id: str, *, signer: SigningKey = client, **options: Any) -> envelope_pb2.Envelope:
        options.setdefault("issued_at", now - timedelta(minutes=1))
        return liquidation_path(
            signer,
            options.pop("account_id", "acct-p"),
            path_id,
            sequence=next(sequences),
            **options,
        )

    def recorded() -> tuple[str | None, int]:
        held = storage.connection.execute("SELECT COUNT(*) FROM exchange_holdings").fetchone()
        return core.store.liquidations.path("acct-p"), int(held[0])

    try:
        assert recorded() == (None, 0)
        pledge(path("path-1"))
        assert recorded() == ("path-1", 1)
        # A top-up that names a new path: instructions issued from now on name it.
        pledge(path("path-2"))
        assert recorded() == ("path-2", 2)
        # The client may address its path to the exchange as well as to the custodian.
        pledge(path("path-3", audience=(CUSTODIAN, EXCHANGE)))
        assert recorded() == ("path-3", 3)

        forged = path("path-forged")
        forged.signatures[0].sig = bytes(64)
        not_a_path = sign_statement(
            custodian_service_pb2.PledgeInstruction(account_id="acct-p", exchange_id=EXCHANGE),
            client,
            audience=[CUSTODIAN],
            sequence=next(sequences),
            ttl=timedelta(hours=1),
            issued_at=now,
        )
        false_paths = [
            (forged, "SIGNATURE_INVALID"),
            (not_a_path, "PAYLOAD_TYPE_MISMATCH"),
            # Only the client pre-authorises; the custodian cannot make one up.
            (path("path-c", signer=custodian), "KEY_ROLE_MISMATCH"),
            # The custodian recorded it as addressed to itself; anything else was not.
            (path("path-a", audience=(EXCHANGE,)), "AUDIENCE_MISMATCH"),
            (path("path-e", issued_at=now - timedelta(hours=2)), "STATEMENT_EXPIRED"),
            (path("path-x", exchange_id=OTHER_EXCHANGE), "PATH_NOT_AUTHORISED"),
            (path("path-o", account_id="acct-other"), "PATH_NOT_AUTHORISED"),
            (path(""), "MALFORMED"),
        ]
        for false_path, reason in false_paths:
            with pytest.raises(CollateralSyncError) as caught:
                pledge(false_path)
            assert caught.value.reason_name == reason, caught.value.message
            assert {"expected", "actual"} <= set(caught.value.metadata)
            # The whole batch is refused: neither the path nor the holdings are kept.
            assert recorded() == ("path-3", 3), reason
    finally:
        storage.close()


# --- risk policy ----------------------------------------------------------------------------


def test_risk_policy_is_signed_versioned_and_sent_to_the_custodian(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            risk_policy={"insurance_fund_balance": "250000", "cure_period_seconds": 7200},
        ) as w:
            response = await w.exchange.get_risk_policy(
                exchange_service_pb2.GetRiskPolicyRequest(version=0)
            )
            envelope = response.risk_policy
            # Public: anyone may verify it (audience "*").
            statement = verify_statement(
                envelope,
                w.parties.registry,
                expected_type=valuation_pb2.RiskPolicy,
                audience=OTHER_EXCHANGE,
                now=w.custodian.now(),
            )
            policy = statement.message
            assert statement.issuer == EXCHANGE
            assert list(statement.header.audience) == ["*"]
            assert policy.version == 1
            factors = {h.asset_class: h.collateral_factor.value for h in policy.haircuts}
            assert factors[common_pb2.ASSET_CLASS_TOKENIZED_MMF] == "0.98"
            assert factors[common_pb2.ASSET_CLASS_STABLECOIN] == "0.95"
            assert factors[common_pb2.ASSET_CLASS_TOKENIZED_ETF] == "0.85"
            assert factors[common_pb2.ASSET_CLASS_TOKENIZED_SINGLE_STOCK] == "0.6"
            caps = {c.asset_class: c.max_share.value for c in policy.concentration_caps}
            assert caps == {
                common_pb2.ASSET_CLASS_TOKENIZED_ETF: "0.4",
                common_pb2.ASSET_CLASS_TOKENIZED_SINGLE_STOCK: "0.1",
            }
            assert policy.leverage_cap.value == "2"
            assert policy.maintenance_ratio.value == "0.5"
            assert policy.liquidation_ratio.value == "0.4"
            assert policy.insurance_fund_balance.value == "250000"
            assert policy.cure_period.seconds == 7200
            assert policy.auto_deleveraging_rule == (
                valuation_pb2.AUTO_DELEVERAGING_RULE_PROFIT_TIMES_LEVERAGE
            )
            assert policy.stale_price_rule == valuation_pb2.STALE_PRICE_RULE_LAST_PRICE
            assert {a.asset_id: a.asset_class for a in policy.assets}["BENJI"] == (
                common_pb2.ASSET_CLASS_TOKENIZED_MMF
            )

            by_version = await w.exchange.get_risk_policy(
                exchange_service_pb2.GetRiskPolicyRequest(version=1)
            )
            assert by_version.risk_policy == envelope
            missing = await refused(
                w.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest(version=2))
            )
            assert missing.code == grpc.StatusCode.NOT_FOUND
            assert missing.reason == _R.ERROR_REASON_NOT_FOUND

            # The same signed bytes reach the custodian on the stream.
            sent = await w.custodian.wait_update("risk_policy")
            assert sent == envelope

    run(scenario())


# --- attestation before credit -------------------------------------------------------------------

SMALL = (("USDC", "100000", "0", "100000"),)


def holdings_rows(w: World, account_id: str) -> list[tuple[Any, ...]]:
    return w.rows(
        "SELECT epoch, status, reason FROM exchange_holdings WHERE account_id = ? ORDER BY id",
        account_id,
    )


async def decided(w: World, account_id: str) -> tuple[Any, ...]:
    rows = await w.until_rows(
        "SELECT epoch, status, reason, detail FROM exchange_holdings "
        "WHERE account_id = ? AND status != 'pending' ORDER BY id DESC",
        account_id,
    )
    return rows[0]


def test_holdings_with_a_bad_inclusion_proof_or_leaf_hash_are_not_credited(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(reference_parties, start_server, tmp_path, prices=EXAMPLE_PRICES) as w:
            w.custodian.attest("acct-good", SMALL)
            line = await w.custodian.wait_update(
                "credit_line", lambda c: c.account_id == "acct-good"
            )
            credit = w.verified(line, valuation_pb2.CreditLine)
            assert credit.collateral_value.value == "95000"  # 100000 USDC at 1, 95%
            assert holdings_rows(w, "acct-good") == [(1, "credited", "")]

            # The custodian serves a corrupted audit path for the next leaf.
            w.custodian.tampered.add(1)
            w.custodian.attest("acct-forged-proof", SMALL)
            epoch, status, reason, _ = await decided(w, "acct-forged-proof")
            assert (epoch, status, reason) == (1, "rejected", "PROOF_INVALID")

            # A reference whose leaf hash is not the statement's.
            w.custodian.attest("acct-wrong-leaf", SMALL, ref_hash=bytes(32))
            epoch, status, reason, detail = await decided(w, "acct-wrong-leaf")
            assert (status, reason) == ("rejected", "PROOF_INVALID")
            assert "leaf_hash" in detail

            # Signed by the custodian but unusable (a negative quantity): refused, and the
            # stream carries on.
            w.custodian.attest("acct-negative", (("USDC", "-5", "0", "0"),))
            _, status, reason, _ = await decided(w, "acct-negative")
            assert (status, reason) == ("rejected", "INVALID_AMOUNT")
            w.custodian.attest("acct-after", SMALL)
            await w.custodian.wait_update("credit_line", lambda c: c.account_id == "acct-after")

            # Not credited: no credit line, and with exposure the collateral counts 0.
            for account_id in ("acct-forged-proof", "acct-wrong-leaf", "acct-negative"):
                missing = await refused(
                    w.exchange.get_credit_line(
                        exchange_service_pb2.GetCreditLineRequest(account_id=account_id)
                    )
                )
                assert missing.code == grpc.StatusCode.NOT_FOUND
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-forged-proof", exposure=amount_to_proto("10")
                )
            )
            credit = await w.credit_line("acct-forged-proof")
            assert (credit.collateral_value.value, credit.exposure.value) == ("0", "10")
            assert list(credit.attestations) == []
            # The good account is untouched.
            assert (await w.credit_line("acct-good")).collateral_value.value == "95000"

    run(scenario())


def test_holdings_under_a_checkpoint_inconsistent_with_the_trusted_one_are_not_credited(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(reference_parties, start_server, tmp_path, prices=EXAMPLE_PRICES) as w:
            w.custodian.attest("acct-1", SMALL)
            await w.custodian.wait_update("credit_line", lambda c: c.account_id == "acct-1")
            trusted = w.rows("SELECT tree_size FROM exchange_checkpoints")
            assert trusted == [(1,)]

            # History rewritten: a log whose first leaf differs, extended by a new leaf.
            fork = AttestationLog(tmp_path / "fork.sqlite", origin=ORIGIN)
            fork.append(statement_leaf(w.custodian.statement("acct-1", (("USDC", "1", "0", "1"),))))
            w.custodian.served = fork
            w.custodian.attest("acct-2", SMALL, log=fork)

            epoch, status, reason, _ = await decided(w, "acct-2")
            assert (epoch, status, reason) == (1, "rejected", "CHECKPOINT_INCONSISTENT")
            # The refused checkpoint is kept as evidence; trust did not move.
            evidence = w.rows("SELECT reason, held IS NOT NULL FROM exchange_checkpoint_evidence")
            assert evidence == [("CHECKPOINT_INCONSISTENT", 1)]
            assert w.rows("SELECT tree_size FROM exchange_checkpoints") == [(1,)]
            missing = await refused(
                w.exchange.get_credit_line(
                    exchange_service_pb2.GetCreditLineRequest(account_id="acct-2")
                )
            )
            assert missing.code == grpc.StatusCode.NOT_FOUND
            fork.close()

    run(scenario())


# --- valuation, credit and margin calls -----------------------------------------------------------


def test_an_agreed_call_is_withdrawn_when_no_exposure_is_left(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    """Nothing to secure: an agreed call must not expire into a liquidation of a closed position."""

    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            w.custodian.attest("acct-w", EXAMPLE_POSITIONS)
            await w.custodian.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-w" and c.collateral_value.value != "0",
            )
            exposure = test_control_pb2.SetExposureRequest
            await w.control.set_exposure(
                exposure(account_id="acct-w", exposure=amount_to_proto("5200000"))
            )
            call = margin_pb2.MarginCall.FromString(
                (await w.custodian.wait_update("margin_call")).payload
            )
            agreed = await w.respond(
                w.custodian.respond(
                    call.margin_call_id, _K.MARGIN_CALL_RESPONSE_KIND_AGREE, "94800"
                )
            )
            assert agreed.status == _S.MARGIN_CALL_STATUS_AGREED
            # Prices recovering alone would leave an agreed call standing; no exposure does not.
            await w.control.set_exposure(
                exposure(account_id="acct-w", exposure=amount_to_proto("0"))
            )
            await w.control.run_valuation(test_control_pb2.RunValuationRequest(account_id="acct-w"))
            state = await w.state(call.margin_call_id)
            assert state.status == _S.MARGIN_CALL_STATUS_WITHDRAWN

    run(scenario())


def test_credit_line_margin_call_partial_agreement_and_top_up(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            holdings, _ = w.custodian.attest("acct-a", EXAMPLE_POSITIONS)
            line = await w.custodian.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-a" and c.collateral_value.value != "0",
            )
            credit = w.verified(line, valuation_pb2.CreditLine)
            # Hand-checked (PROTOCOL.md §7.4): 980000 + 380000 + 1007200 (ETF capped at
            # 0.4 x 2518000) + 138000 (1000 unlocked AAPL-T) + 0 (XYZ unknown).
            assert credit.collateral_value.value == "2505200"
            assert credit.credit_limit.value == "5010400"  # leverage cap 2
            values = {v.asset_id: v.collateral_value.value for v in credit.valuations}
            assert values == {
                "BENJI": "980000",
                "USDC": "380000",
                "SPY-T": "1007200",
                "AAPL-T": "138000",
                "XYZ": "0",
            }
            assert credit.risk_policy_version == 1
            assert [a.leaf_index for a in credit.attestations] == [0]
            # The same figures from the SDK on the same signed inputs.
            policy = w.verified(
                (
                    await w.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
                ).risk_policy,
                valuation_pb2.RiskPolicy,
            )
            statement = attestation_pb2.HoldingsStatement.FromString(holdings.payload)
            sdk = value_collateral(
                policy,
                statement.positions,
                credit.prices,
                valued_at=credit.header.issued_at.ToDatetime(tzinfo=UTC),
            )
            assert format_amount(sdk.collateral_value) == credit.collateral_value.value
            assert [row.collateral_value.value for row in sdk.rows()] == list(values.values())

            # Exposure above the maintenance line: a verifiable margin call.
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-a", exposure=amount_to_proto("5200000")
                )
            )
            envelope = await w.custodian.wait_update("margin_call")
            check = recompute_margin_call(
                envelope, w.parties.registry, audience=CUSTODIAN, now=w.custodian.now()
            )
            call = check.margin_call
            assert (call.account_id, call.collateral_ratio.value) == ("acct-a", "0.48")
            assert check.call_amount == d("94800")  # RU(5200000 x 0.5 - 2505200)
            assert check.collateral_value == d("2505200")
            assert ns(call.due_by) - ns(call.header.issued_at) == 86_400 * 10**9
            state = await w.state(call.margin_call_id)
            assert (state.status, state.call_amount.value) == (
                _S.MARGIN_CALL_STATUS_ISSUED,
                "94800",
            )
            assert state.margin_call == envelope
            valuation = await w.control.run_valuation(
                test_control_pb2.RunValuationRequest(account_id="acct-a")
            )
            # The call is running: the valuation states the ratio and issues nothing new.
            assert valuation.collateral_ratio.value == "0.48"
            assert valuation.margin_call_id == ""

            # Partial agreement: 50000 due, the rest disputed.
            agreed = await w.respond(
                w.custodian.respond(
                    call.margin_call_id,
                    _K.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE,
                    "50000",
                    dispute_reason=margin_pb2.DISPUTE_REASON_VALUATION,
                )
            )
            assert agreed.status == _S.MARGIN_CALL_STATUS_PARTIALLY_AGREED
            assert (agreed.agreed_amount.value, agreed.satisfied_amount.value) == ("50000", "0")
            listed = await w.exchange.list_margin_calls(
                exchange_service_pb2.ListMarginCallsRequest(account_id="acct-a")
            )
            assert [
                w.verified(s, margin_pb2.MarginCallState).status for s in listed.margin_call_states
            ] == [_S.MARGIN_CALL_STATUS_PARTIALLY_AGREED]

            # Attested top-up: all 500000 USDC pledged. Under the call's own prices the
            # collateral becomes 980000 + 475000 + 1020000 (no longer capped) + 138000.
            w.custodian.attest(
                "acct-a",
                (
                    ("BENJI", "1000000", "0", "1000000"),
                    ("USDC", "500000", "0", "500000"),
                    ("SPY-T", "2000", "0", "2000"),
                    ("AAPL-T", "1500", "500", "1500"),
                    ("XYZ", "100", "0", "100"),
                ),
                reason=attestation_pb2.HOLDINGS_CHANGE_REASON_TOP_UP,
            )
            await w.custodian.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-a" and c.collateral_value.value == "2613000",
            )
            satisfied = await w.state(call.margin_call_id)
            assert satisfied.status == _S.MARGIN_CALL_STATUS_SATISFIED
            assert satisfied.satisfied_amount.value == "107800"  # 2613000 - 2505200
            assert satisfied.agreed_amount.value == "50000"
            # Ratio 2613000 / 5200000 = 0.50: no new call.
            listed = await w.exchange.list_margin_calls(
                exchange_service_pb2.ListMarginCallsRequest(account_id="acct-a")
            )
            assert len(listed.margin_call_states) == 1

    run(scenario())


def test_respond_to_margin_call_refuses_bad_input_and_changes_nothing(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            fake = w.custodian
            for account_id in ("acct-b", "acct-c"):
                fake.attest(account_id, EXAMPLE_POSITIONS)
                await fake.wait_update(
                    "credit_line",
                    lambda c, a=account_id: c.account_id == a and c.collateral_value.value != "0",
                )
                await w.control.set_exposure(
                    test_control_pb2.SetExposureRequest(
                        account_id=account_id, exposure=amount_to_proto("5200000")
                    )
                )
            calls = {}
            for account_id in ("acct-b", "acct-c"):
                envelope = await fake.wait_update(
                    "margin_call", lambda c, a=account_id: c.account_id == a
                )
                calls[account_id] = margin_pb2.MarginCall.FromString(
                    envelope.payload
                ).margin_call_id
            call_id = calls["acct-b"]
            before = await w.state(call_id)
            assert before.status == _S.MARGIN_CALL_STATUS_ISSUED
            partial = _K.MARGIN_CALL_RESPONSE_KIND_PARTIALLY_AGREE

            forged = fake.respond(call_id, partial, "50000", sequence=1000)
            forged.signatures[0].sig = bytes(64)
            expired = fake.respond(
                call_id,
                partial,
                "50000",
                issued_at=fake.now() - timedelta(hours=3),
                ttl=timedelta(hours=1),
                sequence=1001,
            )
            cases: list[tuple[str, envelope_pb2.Envelope, grpc.StatusCode, int]] = [
                (
                    "forged",
                    forged,
                    grpc.StatusCode.UNAUTHENTICATED,
                    _R.ERROR_REASON_SIGNATURE_INVALID,
                ),
                (
                    "expired",
                    expired,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    _R.ERROR_REASON_STATEMENT_EXPIRED,
                ),
                (
                    "wrong audience",
                    fake.respond(call_id, partial, "50000", audience=OTHER_EXCHANGE, sequence=1002),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_AUDIENCE_MISMATCH,
                ),
                (
                    "wrong role (a client's key)",
                    fake.respond(
                        call_id, partial, "50000", signer=w.parties.keys[CLIENT], sequence=1003
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    "wrong role (another exchange's key)",
                    fake.respond(
                        call_id,
                        partial,
                        "50000",
                        signer=w.parties.keys[OTHER_EXCHANGE],
                        sequence=1009,
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    "unknown call",
                    fake.respond("mc-nope", partial, "50000", sequence=1004),
                    grpc.StatusCode.NOT_FOUND,
                    _R.ERROR_REASON_NOT_FOUND,
                ),
                (
                    "partial agreement of the whole amount",
                    fake.respond(call_id, partial, "94800", sequence=1005),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_INVALID_AMOUNT,
                ),
                (
                    "non-canonical amount",
                    fake.respond(call_id, partial, "050000", sequence=1006),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_INVALID_AMOUNT,
                ),
                (
                    "agreement of another amount",
                    fake.respond(
                        call_id, _K.MARGIN_CALL_RESPONSE_KIND_AGREE, "94799.99", sequence=1007
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_INVALID_AMOUNT,
                ),
                (
                    "dispute without a reason",
                    fake.respond(call_id, _K.MARGIN_CALL_RESPONSE_KIND_DISPUTE, "0", sequence=1008),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
                (
                    "another statement type",
                    fake.statement("acct-b", SMALL),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_PAYLOAD_TYPE_MISMATCH,
                ),
            ]
            for name, envelope, code, reason in cases:
                error = await refused(
                    w.exchange.respond_to_margin_call(
                        exchange_service_pb2.RespondToMarginCallRequest(
                            margin_call_response=envelope
                        )
                    )
                )
                assert (error.code, error.reason) == (code, reason), name
                assert error.metadata.get("expected") is not None, name
                assert await w.state(call_id) == before, name
            missing = await refused(
                w.exchange.respond_to_margin_call(exchange_service_pb2.RespondToMarginCallRequest())
            )
            assert (missing.code, missing.reason) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                _R.ERROR_REASON_MALFORMED,
            )

            # None of the refusals was recorded as seen: a valid response with a lower
            # sequence than every refused one is still accepted.
            valid = fake.respond(
                call_id,
                partial,
                "50000",
                dispute_reason=margin_pb2.DISPUTE_REASON_POSITIONS,
                sequence=5,
            )
            assert (await w.respond(valid)).status == _S.MARGIN_CALL_STATUS_PARTIALLY_AGREED
            replayed = await refused(
                w.exchange.respond_to_margin_call(
                    exchange_service_pb2.RespondToMarginCallRequest(margin_call_response=valid)
                )
            )
            assert (replayed.code, replayed.reason) == (
                grpc.StatusCode.ALREADY_EXISTS,
                _R.ERROR_REASON_REPLAYED,
            )
            answered = await refused(
                w.exchange.respond_to_margin_call(
                    exchange_service_pb2.RespondToMarginCallRequest(
                        margin_call_response=fake.respond(
                            call_id, _K.MARGIN_CALL_RESPONSE_KIND_AGREE, "94800", sequence=6
                        )
                    )
                )
            )
            assert (answered.code, answered.reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                _R.ERROR_REASON_STATE_CONFLICT,
            )
            after = await w.state(call_id)
            assert (after.status, after.agreed_amount.value) == (
                _S.MARGIN_CALL_STATUS_PARTIALLY_AGREED,
                "50000",
            )

            # A dispute of the other call.
            disputed = await w.respond(
                fake.respond(
                    calls["acct-c"],
                    _K.MARGIN_CALL_RESPONSE_KIND_DISPUTE,
                    "0",
                    dispute_reason=margin_pb2.DISPUTE_REASON_ARITHMETIC,
                    sequence=7,
                )
            )
            assert (disputed.status, disputed.agreed_amount.value) == (
                _S.MARGIN_CALL_STATUS_DISPUTED,
                "0",
            )

            # A response to an unknown call on the stream is recorded as refused; the
            # stream carries on (the next holdings statement is credited).
            fake.send(
                position_sync_pb2.PositionUpdate(
                    margin_call_response=fake.respond(
                        "mc-unknown", _K.MARGIN_CALL_RESPONSE_KIND_AGREE, "1", sequence=8
                    )
                )
            )
            fake.attest("acct-later", SMALL)
            await fake.wait_update("credit_line", lambda c: c.account_id == "acct-later")
            assert w.rows("SELECT kind, reason FROM exchange_rejected_updates") == [
                ("margin_call_response", "NOT_FOUND")
            ]

    run(scenario())


# --- expiry, liquidation, shortfall --------------------------------------------------------------


def test_expired_call_leads_to_liquidation_and_the_shortfall_waterfall(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy={
                **EXAMPLE_POLICY,
                "cure_period_seconds": 3600,
                "insurance_fund_balance": "100000",
            },
            profits={"acct-d": "1000", "acct-e": "5000"},
        ) as w:
            fake = w.custodian
            # Two other accounts with exposure: the auto-deleveraging candidates.
            for account_id, exposure in (("acct-d", "190000"), ("acct-e", "95000")):
                fake.attest(account_id, SMALL)
                await fake.wait_update(
                    "credit_line",
                    lambda c, a=account_id: c.account_id == a and c.collateral_value.value != "0",
                )
                await w.control.set_exposure(
                    test_control_pb2.SetExposureRequest(
                        account_id=account_id, exposure=amount_to_proto(exposure)
                    )
                )
            # The pledge announces the client's path: the instruction must name it.
            fake.attest("acct-x", EXAMPLE_POSITIONS, path=fake.path("acct-x", "path-x"))
            await fake.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-x" and c.collateral_value.value != "0",
            )
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-x", exposure=amount_to_proto("5200000")
                )
            )
            call_envelope = await fake.wait_update(
                "margin_call", lambda c: c.account_id == "acct-x"
            )
            call = margin_pb2.MarginCall.FromString(call_envelope.payload)

            # Unanswered past the cure period: expired, then liquidated.
            fake.proceeds = d("4000000")
            await w.advance(timedelta(seconds=3601))
            expired = await w.state(call.margin_call_id)
            assert expired.status == _S.MARGIN_CALL_STATUS_EXPIRED
            rows = await w.until_rows(
                "SELECT liquidation_id, margin_call_id, amount, liquidation_path_id, status, "
                "total_proceeds, shortfall FROM exchange_liquidations WHERE status = 'executed'"
            )
            [(liquidation_id, named_call, amount, path_id, _, proceeds, shortfall)] = rows
            assert (named_call, amount, path_id) == (call.margin_call_id, "5200000", "path-x")
            assert (proceeds, shortfall) == ("4000000", "1200000")
            # The custodian recomputed the instruction from its signed inputs.
            [check] = fake.liquidations
            assert check.amount == d("5200000")
            assert check.instruction.liquidation_id == liquidation_id

            # Insurance fund first (100000), the rest ranked by profit x leverage:
            # acct-e 5000 x (95000 / 95000) = 5000, acct-d 1000 x (190000 / 95000) = 2000.
            served = await w.exchange.get_shortfall_allocation(
                exchange_service_pb2.GetShortfallAllocationRequest(liquidation_id=liquidation_id)
            )
            [(allocation_bytes,)] = w.rows(
                "SELECT allocation FROM exchange_liquidations WHERE liquidation_id = ?",
                liquidation_id,
            )
            assert served.shortfall_allocation.SerializeToString() == allocation_bytes
            allocation = w.verified(
                served.shortfall_allocation, liquidation_pb2.ShortfallAllocation
            )
            assert allocation.liquidation_id == liquidation_id
            assert allocation.shortfall.value == "1200000"
            assert allocation.covered_by_insurance_fund.value == "100000"
            assert allocation.insurance_fund_balance_after.value == "0"
            assert allocation.auto_deleveraging_amount.value == "1100000"
            assert [(r.account_id, r.score.value, r.rank) for r in allocation.ranking] == [
                ("acct-e", "5000", 1),
                ("acct-d", "2000", 2),
            ]
            # The fund's new balance is published as a new policy version, also on the stream.
            policy = await fake.wait_update("risk_policy", lambda p: p.version == 2)
            assert (
                valuation_pb2.RiskPolicy.FromString(policy.payload).insurance_fund_balance.value
                == "0"
            )
            current = await w.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
            assert current.risk_policy == policy
            # Closed out: the account owes nothing more.
            credit = await w.credit_line("acct-x")
            assert credit.exposure.value == "0"

            # The fund's balance is state: a restart keeps it (no new version from the
            # configured opening balance).
            address = await asyncio.to_thread(w.server.restart)
            async with w.parties.channel(address, CUSTODIAN) as channel:
                after = await ExchangeClient(channel).get_risk_policy(
                    exchange_service_pb2.GetRiskPolicyRequest()
                )
                assert after.risk_policy == policy

    run(scenario())


def test_breach_of_the_liquidation_line_instructs_a_close_out(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            fake = w.custodian
            fake.attest("acct-y", EXAMPLE_POSITIONS, path=fake.path("acct-y", "path-y-1"))
            # A top-up with a new path supersedes the first one.
            fake.attest("acct-y", EXAMPLE_POSITIONS, path=fake.path("acct-y", "path-y"))
            await fake.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-y" and c.collateral_value.value != "0",
            )
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-y", exposure=amount_to_proto("5200000")
                )
            )
            call_envelope = await fake.wait_update("margin_call")
            call = margin_pb2.MarginCall.FromString(call_envelope.payload)
            # SPY-T falls from 600 to 100: 980000 + 380000 + 170000 + 138000 = 1668000,
            # ratio 0.32 < 0.4.
            await w.control.set_price(
                test_control_pb2.SetPriceRequest(
                    quote=valuation_pb2.PriceQuote(asset_id="SPY-T", price=amount_to_proto("100"))
                )
            )
            rows = await w.until_rows(
                "SELECT margin_call_id, amount, status, liquidation_path_id "
                "FROM exchange_liquidations WHERE status = 'executed'"
            )
            assert rows == [("", "5200000", "executed", "path-y")]
            [check] = fake.liquidations
            assert check.collateral_value == d("1668000")
            assert check.collateral_ratio == d("0.32")
            # The running call is moot once the account is closed out.
            assert (await w.state(call.margin_call_id)).status == _S.MARGIN_CALL_STATUS_WITHDRAWN
            # Proceeds covered the amount: no allocation, the policy unchanged.
            assert w.rows("SELECT allocation FROM exchange_liquidations") == [(None,)]
            [(liquidation_id,)] = w.rows("SELECT liquidation_id FROM exchange_liquidations")
            none = await refused(
                w.exchange.get_shortfall_allocation(
                    exchange_service_pb2.GetShortfallAllocationRequest(
                        liquidation_id=liquidation_id
                    )
                )
            )
            assert (none.code, none.reason) == (
                grpc.StatusCode.NOT_FOUND,
                _R.ERROR_REASON_NOT_FOUND,
            )
            assert none.metadata["actual"] == "executed, shortfall 0"
            unknown = await refused(
                w.exchange.get_shortfall_allocation(
                    exchange_service_pb2.GetShortfallAllocationRequest(liquidation_id="liq-nope")
                )
            )
            # The custodian is no regulator: what does not exist is refused as not its (§4.5).
            assert (unknown.code, unknown.reason, unknown.metadata["field"]) == (
                grpc.StatusCode.PERMISSION_DENIED,
                _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                "liquidation_id",
            )
            empty = await refused(
                w.exchange.get_shortfall_allocation(
                    exchange_service_pb2.GetShortfallAllocationRequest()
                )
            )
            assert (empty.code, empty.reason) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                _R.ERROR_REASON_MALFORMED,
            )

    run(scenario())


def test_liquidations_are_listed_in_pages_with_their_signed_records(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def breach(w: World, exposure: str) -> None:
        await w.control.set_exposure(
            test_control_pb2.SetExposureRequest(
                account_id="acct-l", exposure=amount_to_proto(exposure)
            )
        )

    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=[
                *EXAMPLE_PRICES[:2],
                {"asset_id": "SPY-T", "price": "100"},
                *EXAMPLE_PRICES[3:],
            ],
            risk_policy={**EXAMPLE_POLICY, "insurance_fund_balance": "1000000"},
        ) as w:
            fake = w.custodian
            fake.attest("acct-l", EXAMPLE_POSITIONS, path=fake.path("acct-l", "path-l"))
            await fake.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-l" and c.collateral_value.value != "0",
            )
            # 1668000 of collateral against 5200000: past the liquidation line. The
            # custodian raises the whole amount the first time, 1000000 short the second.
            await breach(w, "5200000")
            await w.until_rows("SELECT 1 FROM exchange_liquidations WHERE status = 'executed'")
            fake.proceeds = d("4200000")
            await breach(w, "5200000")
            await w.until_rows(
                "SELECT 1 FROM exchange_liquidations WHERE status = 'executed' LIMIT 1 OFFSET 1"
            )
            ids = [
                row[0]
                for row in w.rows("SELECT liquidation_id FROM exchange_liquidations ORDER BY seq")
            ]
            assert len(ids) == 2

            first = await w.exchange.list_liquidations(
                exchange_service_pb2.ListLiquidationsRequest(account_id="acct-l", page_size=1)
            )
            [covered] = first.liquidations
            assert first.next_page_token
            rest = await w.exchange.list_liquidations(
                exchange_service_pb2.ListLiquidationsRequest(
                    account_id="acct-l", page_size=1, page_token=first.next_page_token
                )
            )
            [short] = rest.liquidations
            assert rest.next_page_token == ""
            everything = await w.exchange.list_liquidations(
                exchange_service_pb2.ListLiquidationsRequest(account_id="acct-l")
            )
            assert list(everything.liquidations) == [covered, short]

            for record, liquidation_id, proceeds, shortfall in (
                (covered, ids[0], "5200000", "0"),
                (short, ids[1], "4200000", "1000000"),
            ):
                instruction = w.verified(
                    record.liquidation_instruction, liquidation_pb2.LiquidationInstruction
                )
                assert (instruction.liquidation_id, instruction.liquidation_path_id) == (
                    liquidation_id,
                    "path-l",
                )
                receipt = verify_statement(
                    record.liquidation_receipt,
                    w.parties.registry,
                    expected_type=liquidation_pb2.LiquidationReceipt,
                    audience=EXCHANGE,
                    now=fake.now(),
                )
                assert receipt.issuer == CUSTODIAN
                assert receipt.message.liquidation_id == liquidation_id
                assert [(f.asset_id, f.proceeds.value) for f in receipt.message.fills] == [
                    ("BENJI", proceeds)
                ]
                assert (receipt.message.total_proceeds.value, receipt.message.shortfall.value) == (
                    proceeds,
                    shortfall,
                )
            # Proceeds covered the first: no allocation. The second's is the one served.
            assert not covered.HasField("shortfall_allocation")
            served = await w.exchange.get_shortfall_allocation(
                exchange_service_pb2.GetShortfallAllocationRequest(liquidation_id=ids[1])
            )
            assert short.shortfall_allocation == served.shortfall_allocation
            allocation = w.verified(short.shortfall_allocation, liquidation_pb2.ShortfallAllocation)
            assert (allocation.shortfall.value, allocation.covered_by_insurance_fund.value) == (
                "1000000",
                "1000000",
            )

            # Bad reads fail as ListMarginCalls' do; a margin-call token (same shape,
            # its own tag) is no liquidation token.
            margin_call_token = base64.urlsafe_b64encode(b"mc1:1:acct-l").decode()
            bad: list[tuple[exchange_service_pb2.ListLiquidationsRequest, grpc.StatusCode, int]] = [
                (
                    exchange_service_pb2.ListLiquidationsRequest(
                        account_id="acct-l", page_token="not-a-token"
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
                (
                    exchange_service_pb2.ListLiquidationsRequest(
                        account_id="acct-l", page_token=margin_call_token
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
                # Accounts the exchange does not know: the custodian, no regulator, is
                # refused before the token is looked at, as for one not its (§4.5).
                (
                    exchange_service_pb2.ListLiquidationsRequest(
                        account_id="acct-other", page_token=first.next_page_token
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    exchange_service_pb2.ListLiquidationsRequest(account_id="acct-none"),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    exchange_service_pb2.ListLiquidationsRequest(),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
            ]
            for request, code, reason in bad:
                error = await refused(w.exchange.list_liquidations(request))
                assert (error.code, error.reason) == (code, reason)

    run(scenario())


def test_a_pledge_release_is_consented_at_the_edge_and_recorded(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    """RequestPledgeRelease on the real exchange, on either engine (PROTOCOL.md §5.10).

    Hand figures (§7.4 portfolio): releasing USDC 100000 of its 400000 pledge leaves USDC
    worth 285000 and the uncapped total 2423000, so the ETF cap falls to 969200:
    980000 + 285000 + 969200 + 138000 = 2372200, credit limit 4744400.
    """

    def request(release_id: str, quantity: str) -> envelope_pb2.Envelope:
        return sign_statement(
            pledge_release_pb2.PledgeReleaseRequest(
                release_id=release_id,
                account_id="acct-r",
                exchange_id=EXCHANGE,
                releases=[
                    pledge_release_pb2.ReleasedQuantity(
                        asset_id="USDC", quantity=common_pb2.Decimal(value=quantity)
                    )
                ],
            ),
            reference_parties.keys[CLIENT],
            audience=[EXCHANGE, CUSTODIAN],
            sequence=next(sequences),
            ttl=timedelta(hours=1),
            issued_at=clock(),
        )

    sequences = itertools.count(1)

    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            clock_of[:] = [w.custodian.now]
            w.custodian.attest("acct-r", EXAMPLE_POSITIONS)
            await w.custodian.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-r" and c.collateral_value.value != "0",
            )

            async def ask(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
                response = await w.exchange.request_pledge_release(
                    exchange_service_pb2.RequestPledgeReleaseRequest(
                        pledge_release_request=envelope
                    )
                )
                return response.consent

            async def expose(amount: str) -> None:
                await w.control.set_exposure(
                    test_control_pb2.SetExposureRequest(
                        account_id="acct-r", exposure=common_pb2.Decimal(value=amount)
                    )
                )

            await expose("4744400")
            first = request("rel-1", "100000")
            consent = await ask(first)
            checked = recompute_pledge_release_consent(
                consent, w.parties.registry, audience=CUSTODIAN, now=w.custodian.now()
            )
            judged = checked.judgement
            assert (judged.collateral_value_after, judged.credit_limit_after) == (
                d("2372200"),
                d("4744400"),
            )
            assert (judged.exposure, judged.collateral_ratio_after) == (d("4744400"), d("0.5"))
            # Asked again: the recorded consent, byte for byte.
            assert await ask(first) == consent
            reused = await refused(ask(request("rel-1", "99999")))
            assert reused.reason == _R.ERROR_REASON_STATE_CONFLICT
            assert reused.metadata["field"] == "pledge_release_request.release_id"
            # One cent more exposure and the same release leaves the limit short.
            await expose("4744400.01")
            short = await refused(ask(request("rel-2", "100000")))
            assert short.reason == _R.ERROR_REASON_STATE_CONFLICT
            assert (short.metadata["field"], short.metadata["actual"]) == (
                "credit_limit_after",
                "4744400",
            )
            assert w.rows("SELECT release_id, account_id FROM exchange_release_consents") == [
                ("rel-1", "acct-r")
            ]

    clock_of: list[Callable[[], datetime]] = []

    def clock() -> datetime:
        return clock_of[0]()

    run(scenario())


class _UnansweringCustodian(FakeCustodian):
    """Takes no liquidation instruction: the exchange's stays instructed, unanswered."""

    async def SubmitLiquidationInstruction(
        self, request: custodian_service_pb2.SubmitLiquidationInstructionRequest, context: Any
    ) -> custodian_service_pb2.SubmitLiquidationInstructionResponse:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the custodian does not answer")
        raise AssertionError("unreachable")


def test_no_pledge_release_while_a_liquidation_awaits_its_receipt(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    """§5.10 step 6, the half the kit cannot reach: a liquidation is instructed only below
    the liquidation line, where the policy refuses a release anyway, unless the exposure
    falls meanwhile. Here it does; the account sorts after the other one, so that an id
    compared by order rather than equality is caught too."""

    def request(account_id: str, sequence: int) -> envelope_pb2.Envelope:
        return sign_statement(
            pledge_release_pb2.PledgeReleaseRequest(
                release_id=f"rel-{account_id}",
                account_id=account_id,
                exchange_id=EXCHANGE,
                releases=[
                    pledge_release_pb2.ReleasedQuantity(
                        asset_id="USDC", quantity=common_pb2.Decimal(value="1")
                    )
                ],
            ),
            reference_parties.keys[CLIENT],
            audience=[EXCHANGE, CUSTODIAN],
            sequence=sequence,
            ttl=timedelta(hours=1),
            issued_at=now[0](),
        )

    now: list[Callable[[], datetime]] = []

    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            custodian_type=_UnansweringCustodian,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            fake = w.custodian
            now[:] = [fake.now]
            for account in ("acct-b", "acct-y"):
                fake.attest(account, EXAMPLE_POSITIONS, path=fake.path(account, f"path-{account}"))
                await fake.wait_update(
                    "credit_line",
                    lambda c, a=account: c.account_id == a and c.collateral_value.value != "0",
                )

            async def expose(amount: str) -> None:
                await w.control.set_exposure(
                    test_control_pb2.SetExposureRequest(
                        account_id="acct-y", exposure=amount_to_proto(amount)
                    )
                )

            # 2505200 / 10000000 = 0.25 < 0.4: a close-out, which the custodian never answers.
            await expose("10000000")
            await w.until_rows(
                "SELECT liquidation_id FROM exchange_liquidations "
                "WHERE account_id = 'acct-y' AND status = 'instructed'"
            )
            await expose("0")

            async def ask(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
                response = await w.exchange.request_pledge_release(
                    exchange_service_pb2.RequestPledgeReleaseRequest(
                        pledge_release_request=envelope
                    )
                )
                return response.consent

            pending = await refused(ask(request("acct-y", 1)))
            assert pending.reason == _R.ERROR_REASON_STATE_CONFLICT
            assert pending.metadata["field"] == "liquidation"
            consent = await ask(request("acct-b", 2))
            checked = recompute_pledge_release_consent(
                consent, w.parties.registry, audience=CUSTODIAN, now=fake.now()
            )
            assert checked.request.account_id == "acct-b"

    run(scenario())


def test_set_price_and_exposure_refuse_bad_input(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(reference_parties, start_server, tmp_path, prices=EXAMPLE_PRICES) as w:
            cases = [
                (
                    w.control.set_exposure(
                        test_control_pb2.SetExposureRequest(
                            account_id="acct-1", exposure=common_pb2.Decimal(value="-1")
                        )
                    ),
                    _R.ERROR_REASON_INVALID_AMOUNT,
                ),
                (
                    w.control.set_exposure(
                        test_control_pb2.SetExposureRequest(
                            account_id="acct-1", exposure=common_pb2.Decimal(value="1.50")
                        )
                    ),
                    _R.ERROR_REASON_INVALID_AMOUNT,
                ),
                (
                    w.control.set_exposure(
                        test_control_pb2.SetExposureRequest(exposure=amount_to_proto("1"))
                    ),
                    _R.ERROR_REASON_MALFORMED,
                ),
                (
                    w.control.set_price(
                        test_control_pb2.SetPriceRequest(
                            quote=valuation_pb2.PriceQuote(
                                asset_id="BENJI", price=amount_to_proto("1"), source="elsewhere"
                            )
                        )
                    ),
                    _R.ERROR_REASON_MALFORMED,
                ),
                (
                    w.control.set_price(
                        test_control_pb2.SetPriceRequest(
                            quote=valuation_pb2.PriceQuote(
                                asset_id="BENJI", price=common_pb2.Decimal(value="-2")
                            )
                        )
                    ),
                    _R.ERROR_REASON_INVALID_AMOUNT,
                ),
            ]
            for call, reason in cases:
                error = await refused(call)
                assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
            unknown = await refused(
                w.control.run_valuation(test_control_pb2.RunValuationRequest(account_id="acct-1"))
            )
            assert unknown.code == grpc.StatusCode.NOT_FOUND
            assert w.rows("SELECT account_id FROM exchange_accounts") == []
            assert w.rows("SELECT price FROM price_quotes WHERE asset_id = 'BENJI'") == [("1",)]

    run(scenario())


# --- reads, paging, withdrawal, restart ---------------------------------------------------------


def test_calls_are_withdrawn_when_prices_recover_and_listed_in_pages(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def set_spy(w: World, price: str) -> None:
        await w.control.set_price(
            test_control_pb2.SetPriceRequest(
                quote=valuation_pb2.PriceQuote(asset_id="SPY-T", price=amount_to_proto(price))
            )
        )

    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            fake = w.custodian
            fake.attest("acct-p", EXAMPLE_POSITIONS)
            await fake.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-p" and c.collateral_value.value != "0",
            )
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-p", exposure=amount_to_proto("5200000")
                )
            )
            first = margin_pb2.MarginCall.FromString(
                (await fake.wait_update("margin_call")).payload
            )
            # SPY-T at 1000: 980000 + 380000 + 1279200 (capped) + 138000 = 2777200, ratio 0.53.
            await set_spy(w, "1000")
            assert (await w.state(first.margin_call_id)).status == _S.MARGIN_CALL_STATUS_WITHDRAWN
            await set_spy(w, "600")
            second_envelope = await fake.wait_update(
                "margin_call", lambda c: c.margin_call_id != first.margin_call_id
            )
            second = margin_pb2.MarginCall.FromString(second_envelope.payload)
            assert second.call_amount.value == "94800"

            page = await w.exchange.list_margin_calls(
                exchange_service_pb2.ListMarginCallsRequest(account_id="acct-p", page_size=1)
            )
            [state] = [w.verified(s, margin_pb2.MarginCallState) for s in page.margin_call_states]
            assert (state.margin_call_id, state.status) == (
                first.margin_call_id,
                _S.MARGIN_CALL_STATUS_WITHDRAWN,
            )
            assert page.next_page_token
            rest = await w.exchange.list_margin_calls(
                exchange_service_pb2.ListMarginCallsRequest(
                    account_id="acct-p", page_size=1, page_token=page.next_page_token
                )
            )
            [state] = [w.verified(s, margin_pb2.MarginCallState) for s in rest.margin_call_states]
            assert (state.margin_call_id, state.status) == (
                second.margin_call_id,
                _S.MARGIN_CALL_STATUS_ISSUED,
            )
            assert rest.next_page_token == ""

            # Bad reads: the right status, and the server keeps serving.
            bad: list[tuple[Coroutine[Any, Any, Any], grpc.StatusCode, int]] = [
                (
                    w.exchange.list_margin_calls(
                        exchange_service_pb2.ListMarginCallsRequest(
                            account_id="acct-p", page_token="not-a-token"
                        )
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
                # What the exchange does not know: the custodian, no regulator, is
                # refused before the token is looked at, as for what is not its (§4.5).
                (
                    w.exchange.list_margin_calls(
                        exchange_service_pb2.ListMarginCallsRequest(
                            account_id="acct-other", page_token=page.next_page_token
                        )
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    w.exchange.list_margin_calls(
                        exchange_service_pb2.ListMarginCallsRequest(account_id="acct-none")
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    w.exchange.get_margin_call(
                        exchange_service_pb2.GetMarginCallRequest(margin_call_id="mc-none")
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                    _R.ERROR_REASON_KEY_ROLE_MISMATCH,
                ),
                (
                    w.exchange.get_margin_call(exchange_service_pb2.GetMarginCallRequest()),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
                (
                    w.exchange.get_credit_line(exchange_service_pb2.GetCreditLineRequest()),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    _R.ERROR_REASON_MALFORMED,
                ),
            ]
            for call, code, reason in bad:
                error = await refused(call)
                assert (error.code, error.reason) == (code, reason)
            assert (await w.state(second.margin_call_id)).status == _S.MARGIN_CALL_STATUS_ISSUED

    run(scenario())


def test_a_forged_statement_on_the_stream_fails_its_batch_and_stores_nothing(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(reference_parties, start_server, tmp_path, prices=EXAMPLE_PRICES) as w:
            fake = w.custodian
            fake.attest("acct-1", SMALL)
            await fake.wait_update("credit_line", lambda c: c.account_id == "acct-1")
            forged = fake.statement("acct-2", SMALL)
            forged.signatures[0].sig = bytes(64)
            fake.send(
                position_sync_pb2.PositionUpdate(
                    holdings_change=position_sync_pb2.HoldingsChange(
                        holdings_statement=forged,
                        attestation=attestation_pb2.AttestationRef(
                            log_origin=ORIGIN, leaf_index=1, tree_size=2
                        ),
                    )
                )
            )
            async with asyncio.timeout(WAIT):
                while "SIGNATURE_INVALID" not in w.server.log_text():
                    await asyncio.sleep(0.05)
            # Nothing of the batch was stored or applied; the exchange still serves.
            assert w.rows("SELECT account_id FROM exchange_holdings") == [("acct-1",)]
            state = await w.control.get_sync_state(test_control_pb2.GetSyncStateRequest())
            received = {s.direction: s.sequence for s in state.directions}
            assert received[CUSTODIAN_TO_EXCHANGE] == 1
            assert (await w.credit_line("acct-1")).collateral_value.value == "95000"

    run(scenario())


def test_state_survives_a_restart_and_the_trusted_checkpoint_carries_on(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            fake = w.custodian
            fake.attest("acct-r", EXAMPLE_POSITIONS)
            await fake.wait_update(
                "credit_line",
                lambda c: c.account_id == "acct-r" and c.collateral_value.value != "0",
            )
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-r", exposure=amount_to_proto("5200000")
                )
            )
            call = margin_pb2.MarginCall.FromString((await fake.wait_update("margin_call")).payload)
            policy = await w.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
            before = await w.state(call.margin_call_id)

            address = await asyncio.to_thread(w.server.restart)
            async with w.parties.channel(address, CUSTODIAN) as channel:
                exchange = ExchangeClient(channel)
                # Same policy (not republished), same call, same state.
                again = await exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
                assert again.risk_policy == policy.risk_policy
                state = await exchange.get_margin_call(
                    exchange_service_pb2.GetMarginCallRequest(margin_call_id=call.margin_call_id)
                )
                assert w.verified(state.margin_call_state, margin_pb2.MarginCallState) == before
                # The stream resumes and the next statement is proven against the trusted
                # checkpoint (size 1), by a consistency proof up to size 2.
                fake.attest("acct-s", SMALL)
                await fake.wait_update("credit_line", lambda c: c.account_id == "acct-s")
                assert w.rows("SELECT tree_size FROM exchange_checkpoints") == [(2,)]
                assert holdings_rows(w, "acct-s") == [(1, "credited", "")]
                margin_calls = [u for u in fake.received if u.WhichOneof("update") == "margin_call"]
                assert len(margin_calls) == 1  # nothing sent twice after the restart

    run(scenario())


# --- with the reference custodian ------------------------------------------------------------------


@pytest.mark.parametrize("custodian_key", ["file", "pkcs11"])
def test_lifecycle_with_the_reference_custodian(
    reference_parties: Parties,
    start_server: StartServer,
    tmp_path: Path,
    custodian_key: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pledge, credit, call answered by the custodian, top-up, second call, breach, receipt.

    Run with the custodian's key in a key file, and on a PKCS#11 token (SoftHSM2):
    then the registry holds only the token's key for the custodian, so every
    holdings statement, checkpoint, sync batch and the receipt the exchange
    accepted was signed on the token.
    """
    parties = reference_parties
    registry = parties.registry
    keys: dict[str, Any] = {}
    token_key_id: str | None = None
    if custodian_key == "pkcs11":
        hsm: SoftHsmToken = request.getfixturevalue("softhsm_token")
        on_token = token_key(hsm, parties, CUSTODIAN, "custodian", tmp_path)
        monkeypatch.setenv(PIN_ENV, hsm.pin)  # the servers started below inherit it
        registry, token_key_id = on_token.registry, on_token.key_id
        keys = {"signing_key": on_token.signing_key, "key_registry": str(on_token.registry_path)}
    server_name = f"lifecycle-{custodian_key}"
    custodian_config = parties.config(
        CUSTODIAN,
        "custodian",
        tmp_path,
        **keys,
        peers={EXCHANGE: None},
        custodian={
            "accounts": [
                {
                    "account_id": "acct-1",
                    "client_id": CLIENT,
                    "holdings": {"BTC": "10", "USDC": "250000", "BENJI": "1000000"},
                }
            ],
            "margin_call_responses": [
                {"kind": "PARTIALLY_AGREE", "agreed_fraction": "0.5", "dispute_reason": "VALUATION"}
            ],
        },
    )
    custodian = start_server("custodian", custodian_config, name=f"{server_name}-custodian")
    exchange = start_server(
        "exchange",
        parties.config(
            EXCHANGE,
            "exchange",
            tmp_path,
            **({"key_registry": keys["key_registry"]} if keys else {}),
            peers={CUSTODIAN: custodian.address},
            exchange={
                "log_origin": ORIGIN,
                "prices": [
                    {"asset_id": "BTC", "price": "60000"},
                    {"asset_id": "USDC", "price": "1"},
                    {"asset_id": "BENJI", "price": "1"},
                ],
            },
        ),
        name=f"{server_name}-exchange",
    )
    client = parties.keys[CLIENT]
    sequences = itertools.count(1)

    async def scenario() -> None:
        async with (
            parties.channel(custodian.address, EXCHANGE) as to_custodian,
            parties.channel(exchange.address, CUSTODIAN) as to_exchange,
        ):
            custodian_client = CustodianClient(to_custodian)
            custodian_control = TestControlClient(to_custodian)
            ex = ExchangeClient(to_exchange)
            control = TestControlClient(to_exchange)
            now = (
                await custodian_control.advance_clock(
                    test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration())
                )
            ).now.ToDatetime(tzinfo=UTC)
            path = sign_statement(
                liquidation_pb2.LiquidationPath(
                    account_id="acct-1",
                    exchange_id=EXCHANGE,
                    proceeds_account_id="exchange-1-settlement",
                    steps=[
                        liquidation_pb2.LiquidationStep(
                            asset_id="BTC", venue="otc-desk", max_quantity=amount_to_proto("10")
                        ),
                        liquidation_pb2.LiquidationStep(
                            asset_id="USDC",
                            venue="otc-desk",
                            max_quantity=amount_to_proto("250000"),
                        ),
                    ],
                ),
                client,
                audience=[CUSTODIAN],
                sequence=next(sequences),
                ttl=timedelta(hours=1),
                issued_at=now,
                statement_id="path-acct-1",
            )

            async def pledge(asset: str, quantity: str) -> None:
                instruction = sign_statement(
                    custodian_service_pb2.PledgeInstruction(
                        account_id="acct-1",
                        exchange_id=EXCHANGE,
                        asset_id=asset,
                        quantity=amount_to_proto(quantity),
                    ),
                    client,
                    audience=[CUSTODIAN],
                    sequence=next(sequences),
                    ttl=timedelta(hours=1),
                    issued_at=now,
                )
                await custodian_client.pledge_collateral(
                    custodian_service_pb2.PledgeCollateralRequest(
                        pledge_instruction=instruction, liquidation_path=path
                    )
                )

            async def until(check: Callable[[], Coroutine[Any, Any, bool]]) -> None:
                # Across two processes there is no event to await: poll the exchange.
                async with asyncio.timeout(WAIT):
                    while not await check():
                        await asyncio.sleep(0.05)

            async def credit() -> valuation_pb2.CreditLine:
                try:
                    response = await ex.get_credit_line(
                        exchange_service_pb2.GetCreditLineRequest(account_id="acct-1")
                    )
                except RPCError:
                    return valuation_pb2.CreditLine()
                return valuation_pb2.CreditLine.FromString(response.credit_line.payload)

            async def states() -> list[margin_pb2.MarginCallState]:
                try:
                    listed = await ex.list_margin_calls(
                        exchange_service_pb2.ListMarginCallsRequest(account_id="acct-1")
                    )
                except RPCError:
                    return []
                return [
                    margin_pb2.MarginCallState.FromString(s.payload)
                    for s in listed.margin_call_states
                ]

            async def set_btc(price: str) -> None:
                await control.set_price(
                    test_control_pb2.SetPriceRequest(
                        quote=valuation_pb2.PriceQuote(asset_id="BTC", price=amount_to_proto(price))
                    )
                )

            await pledge("BTC", "10")
            await pledge("USDC", "200000")
            # 10 BTC x 60000 x 0.8 + 200000 USDC x 0.95.
            await until(lambda: _is(credit(), lambda c: c.collateral_value.value == "670000"))
            await control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-1", exposure=amount_to_proto("1000000")
                )
            )
            await set_btc("30000")  # 240000 + 190000: ratio 0.43, call 70000
            await until(
                lambda: _is(
                    states(),
                    lambda s: (
                        [(x.status, x.agreed_amount.value) for x in s]
                        == [(_S.MARGIN_CALL_STATUS_PARTIALLY_AGREED, "35000")]
                    ),
                )
            )
            await pledge("USDC", "50000")  # +47500 under the call's prices >= 35000 due
            await until(
                lambda: _is(
                    states(),
                    lambda s: (
                        len(s) == 2
                        and s[0].status == _S.MARGIN_CALL_STATUS_SATISFIED
                        and s[0].satisfied_amount.value == "47500"
                        # 477500 / 1000000 = 0.47: a second call for 22500, half agreed.
                        and (s[1].status, s[1].call_amount.value, s[1].agreed_amount.value)
                        == (_S.MARGIN_CALL_STATUS_PARTIALLY_AGREED, "22500", "11250")
                    ),
                )
            )
            accrued = await custodian_control.accrue_yield(test_control_pb2.AccrueYieldRequest())
            assert accrued.accounts == 1
            await set_btc("5000")  # 50000 + 237500: ratio 0.28 < 0.4, close out
            exchange_db = reference_parties.storage(tmp_path, EXCHANGE)

            def executed() -> list[tuple[Any, ...]]:
                with open_database(exchange_db) as db:
                    return db.execute(
                        "SELECT receipt, total_proceeds, shortfall, liquidation_path_id "
                        "FROM exchange_liquidations WHERE status = 'executed'"
                    ).fetchall()

            async def done() -> bool:
                return bool(executed())

            await until(done)
            # The path id came with the pledge, not from configuration.
            [(receipt_bytes, proceeds, shortfall, path_id)] = executed()
            assert path_id == "path-acct-1"
            receipt = liquidation_pb2.LiquidationReceipt.FromString(
                envelope_pb2.Envelope.FromString(receipt_bytes).payload
            )
            # Yield paid out first; then the path: all BTC (50000), all USDC (250000).
            assert [y.asset_id for y in receipt.yield_distributions] == ["BENJI"]
            assert [(f.asset_id, f.quantity.value) for f in receipt.fills] == [
                ("BTC", "10"),
                ("USDC", "250000"),
            ]
            assert (proceeds, shortfall) == ("300000", "700000")
            # The waterfall's allocation is served to the custodian, signed.
            allocation = verify_statement(
                (
                    await ex.get_shortfall_allocation(
                        exchange_service_pb2.GetShortfallAllocationRequest(
                            liquidation_id=receipt.liquidation_id
                        )
                    )
                ).shortfall_allocation,
                registry,
                expected_type=liquidation_pb2.ShortfallAllocation,
                audience=CUSTODIAN,
                now=now,
            ).message
            assert (allocation.shortfall.value, allocation.covered_by_insurance_fund.value) == (
                "700000",
                "700000",
            )
            # ListLiquidations gives a counterparty the whole signed record: the
            # exchange's instruction, the custodian's receipt and the allocation.
            listed = await ex.list_liquidations(
                exchange_service_pb2.ListLiquidationsRequest(account_id="acct-1")
            )
            assert listed.next_page_token == ""
            [record] = listed.liquidations
            sent = verify_statement(
                record.liquidation_instruction,
                registry,
                expected_type=liquidation_pb2.LiquidationInstruction,
                audience=CUSTODIAN,
                now=now,
            )
            assert sent.issuer == EXCHANGE
            assert (sent.message.liquidation_id, sent.message.account_id) == (
                receipt.liquidation_id,
                "acct-1",
            )
            assert sent.message.liquidation_path_id == "path-acct-1"
            # The receipt is the custodian's, addressed to the exchange, as recorded.
            signed_receipt = verify_statement(
                record.liquidation_receipt,
                registry,
                expected_type=liquidation_pb2.LiquidationReceipt,
                audience=EXCHANGE,
                now=now,
            )
            assert signed_receipt.issuer == CUSTODIAN
            if token_key_id is not None:
                assert signed_receipt.signer_key_ids == (token_key_id,)
            assert record.liquidation_receipt.SerializeToString() == receipt_bytes
            listed_receipt = signed_receipt.message
            [paid] = listed_receipt.yield_distributions
            assert paid.asset_id == "BENJI"
            assert Decimal(paid.quantity.value) > 0
            assert [
                (f.asset_id, f.quantity.value, f.price.value, f.proceeds.value)
                for f in listed_receipt.fills
            ] == [("BTC", "10", "5000", "50000"), ("USDC", "250000", "1", "250000")]
            assert (listed_receipt.total_proceeds.value, listed_receipt.shortfall.value) == (
                "300000",
                "700000",
            )
            listed_allocation = verify_statement(
                record.shortfall_allocation,
                registry,
                expected_type=liquidation_pb2.ShortfallAllocation,
                audience=CUSTODIAN,
                now=now,
            ).message
            assert listed_allocation == allocation
            policy = await ex.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
            published = valuation_pb2.RiskPolicy.FromString(policy.risk_policy.payload)
            assert (published.version, published.insurance_fund_balance.value) == (2, "300000")
            await until(lambda: _is(credit(), lambda c: c.exposure.value == "0"))
            assert [s.status for s in await states()] == [
                _S.MARGIN_CALL_STATUS_SATISFIED,
                _S.MARGIN_CALL_STATUS_WITHDRAWN,
            ]

    run(scenario())


async def _is(value: Coroutine[Any, Any, _T], predicate: Callable[[_T], bool]) -> bool:
    return predicate(await value)


def test_an_account_whose_attested_holdings_expired_does_not_stop_the_others(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    """A margin call cannot rest on an expired holdings statement (§8.2 step 2). The account
    whose attestation lapsed gets no call, and says why in the log; every other account is
    still revalued when prices move."""

    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            fake = w.custodian
            for account in ("acct-lapsed", "acct-other"):
                fake.attest(account, EXAMPLE_POSITIONS)
                await fake.wait_update(
                    "credit_line",
                    lambda c, a=account: c.account_id == a and c.collateral_value.value != "0",
                )
            # Just above maintenance (0.5): the price fall below calls it.
            value = d((await w.credit_line("acct-lapsed")).collateral_value.value)
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-lapsed",
                    exposure=amount_to_proto(
                        format_amount((value / d("0.51")).quantize(d("0.01")))
                    ),
                )
            )
            # The custodian's statements live 30 days; it re-attests nothing meanwhile.
            await w.advance(timedelta(days=31))
            await w.control.set_price(
                test_control_pb2.SetPriceRequest(
                    quote=valuation_pb2.PriceQuote(asset_id="SPY-T", price=amount_to_proto("450"))
                )
            )
            line = await w.credit_line("acct-other")
            assert {q.asset_id: q.price.value for q in line.prices}["SPY-T"] == "450"
            calls = await w.exchange.list_margin_calls(
                exchange_service_pb2.ListMarginCallsRequest(account_id="acct-lapsed")
            )
            assert list(calls.margin_call_states) == []
            log = w.server.log_text()
            assert "account acct-lapsed not revalued: STATEMENT_EXPIRED" in log

    run(scenario())


def test_a_refreshed_holdings_statement_keeps_a_quiet_account_callable(
    reference_parties: Parties, start_server: StartServer, tmp_path: Path
) -> None:
    """The custodian attests an account nothing changes again before its statement expires
    (reason REFRESH, the same positions: PROTOCOL.md §5.8). The exchange credits it like any
    holdings change, the same quantities, and a margin call rests on it after the first
    statement's lifetime, where an expired statement could carry none (the test above)."""

    def eligible(line: valuation_pb2.CreditLine) -> dict[str, str]:
        return {v.asset_id: v.eligible_quantity.value for v in line.valuations}

    async def scenario() -> None:
        async with world(
            reference_parties,
            start_server,
            tmp_path,
            prices=EXAMPLE_PRICES,
            risk_policy=EXAMPLE_POLICY,
        ) as w:
            fake = w.custodian
            fake.attest("acct-quiet", EXAMPLE_POSITIONS)
            first = valuation_pb2.CreditLine.FromString(
                (
                    await fake.wait_update(
                        "credit_line",
                        lambda c: c.account_id == "acct-quiet" and c.collateral_value.value != "0",
                    )
                ).payload
            )
            # Half the statement's 30 days on, the custodian refreshes it.
            await w.advance(timedelta(days=15))
            refresh, ref = fake.attest(
                "acct-quiet",
                EXAMPLE_POSITIONS,
                reason=attestation_pb2.HOLDINGS_CHANGE_REASON_REFRESH,
            )
            line = valuation_pb2.CreditLine.FromString(
                (
                    await fake.wait_update(
                        "credit_line",
                        lambda c: (
                            c.account_id == "acct-quiet"
                            and any(a.leaf_index == ref.leaf_index for a in c.attestations)
                        ),
                    )
                ).payload
            )
            assert eligible(line) == eligible(first)
            # Just above maintenance (0.5); past the first statement's lifetime the price falls.
            await w.control.set_exposure(
                test_control_pb2.SetExposureRequest(
                    account_id="acct-quiet",
                    exposure=amount_to_proto(
                        format_amount(
                            (d(line.collateral_value.value) / d("0.51")).quantize(d("0.01"))
                        )
                    ),
                )
            )
            await w.advance(timedelta(days=16))
            await w.control.set_price(
                test_control_pb2.SetPriceRequest(
                    quote=valuation_pb2.PriceQuote(asset_id="SPY-T", price=amount_to_proto("450"))
                )
            )
            call = margin_pb2.MarginCall.FromString(
                (
                    await fake.wait_update("margin_call", lambda c: c.account_id == "acct-quiet")
                ).payload
            )
            assert list(call.inputs.holdings_statements) == [refresh]

    run(scenario())
