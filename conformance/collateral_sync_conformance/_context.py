"""What a case works with: the target, TLS, keys, clients, the server's clock, test control.

:class:`KitConfig` is the kit's configuration (from the command line).
:class:`Session` holds what the cases of one run share: one mutual-TLS
channel to the target with a client per service, the sequence counter for the
statements the kit signs, and what the run has learnt about the server (its
log origin). Each case gets its own :class:`CaseContext`, which records every
RPC it makes and turns an UNIMPLEMENTED test-control call into *skipped*.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from collateral_sync.clients import (
    CustodianClient,
    EmergencyReleaseClient,
    ExchangeClient,
    ReconciliationClient,
    RegulatorClient,
    TestControlClient,
)
from collateral_sync.errors import RPCError
from collateral_sync.keys import KeyRegistry, SigningKey, role_name
from collateral_sync.transport import TlsConfig, secure_channel
from collateral_sync.v1 import common_pb2, envelope_pb2, position_sync_pb2, test_control_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from collateral_sync_conformance._counterpart import (
    KitCustodian,
    KitReconciliationParty,
    credit_line_of,
    relies_on,
)
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    Outcome,
    outcome_from_error,
)
from collateral_sync_conformance._forge import make_header, seal
from collateral_sync_conformance._registry import Case, Role

__all__ = [
    "DEFAULT_STATEMENT_TTL",
    "MAIN_SERVICE",
    "CaseContext",
    "KitConfig",
    "PartyClients",
    "Session",
    "party_role",
]

_Resp = TypeVar("_Resp")

#: The service each role serves first; health and reflection cases look for it.
MAIN_SERVICE: dict[Role, str] = {
    Role.CUSTODIAN: "collateral_sync.v1.CustodianService",
    Role.EXCHANGE: "collateral_sync.v1.ExchangeService",
    Role.REGULATOR: "collateral_sync.v1.RegulatorService",
}

#: How long the kit waits for an exchange under test to dial its custodian, and to credit.
COUNTERPART_DIAL_TIMEOUT = 30.0
#: What the account the kit opens at its own custodian holds (all pledged).
DEFAULT_HOLDINGS = {"USDC": "250000", "BTC": "10"}

#: Default lifetime of the statements the kit signs: long enough for a slow
#: server, short enough that a replay test cannot be confused with expiry.
DEFAULT_STATEMENT_TTL = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class KitConfig:
    """Everything the kit needs to know about the server under test and itself."""

    role: Role
    #: ``host:port`` of the server under test.
    target: str
    #: The kit's TLS identity (a certificate of the counterpart it plays) and the CA.
    tls: TlsConfig
    #: Public keys of the parties, including the server's.
    registry: KeyRegistry
    #: The kit's own signing keys (client, exchange, custodian... as the role needs).
    kit_keys: tuple[SigningKey, ...]
    #: Party id of the server under test.
    server_party_id: str
    #: Certificate name to check when ``target`` is not in the server's certificate.
    server_name_override: str | None = None
    #: An account at the server owned by the kit's client key (custodian cases).
    account_id: str | None = None
    #: The attestation log's origin, if known in advance (else learnt from the first checkpoint).
    log_origin: str | None = None
    #: Deadline of each RPC the kit makes, in seconds.
    rpc_timeout: float = 10.0
    #: ``host:port`` where the kit serves the custodian an exchange under test dials.
    listen: str | None = None
    #: Where the kit keeps the logs of the custodian it serves, across runs.
    state_dir: Path | None = None
    #: Regulator runs: where the kit serves the exchange's ReconciliationService
    #: (``listen`` then serves the custodian's), and the TLS identity it uses there.
    listen_exchange: str | None = None
    exchange_tls: TlsConfig | None = None
    #: Further TLS identities the kit may call as (``--identity``): a second client,
    #: another exchange, a regulator, a stranger whose party is not in the registry.
    identities: tuple[TlsConfig, ...] = ()

    def key_for(self, role: int) -> SigningKey | None:
        """The kit's first key registered for ``role`` (a ``PartyRole``), if any."""
        for key in self.kit_keys:
            if key.role == role:
                return key
        return None


@dataclass(frozen=True, slots=True)
class PartyClients:
    """The clients of one TLS identity of the kit: calls made as ``party_id``."""

    party_id: str
    custodian: CustodianClient
    exchange: ExchangeClient
    regulator: RegulatorClient
    reconciliation: ReconciliationClient
    emergency_release: EmergencyReleaseClient

    @classmethod
    def over(cls, party_id: str, channel: grpc.aio.Channel, timeout: float) -> PartyClients:
        return cls(
            party_id=party_id,
            custodian=CustodianClient(channel, default_timeout=timeout),
            exchange=ExchangeClient(channel, default_timeout=timeout),
            regulator=RegulatorClient(channel, default_timeout=timeout),
            reconciliation=ReconciliationClient(channel, default_timeout=timeout),
            emergency_release=EmergencyReleaseClient(channel, default_timeout=timeout),
        )


@dataclass(slots=True)
class Session:
    """State shared by the cases of one run; create and close it inside the event loop."""

    config: KitConfig
    channel: grpc.aio.Channel
    custodian: CustodianClient
    exchange: ExchangeClient
    regulator: RegulatorClient
    reconciliation: ReconciliationClient
    emergency_release: EmergencyReleaseClient
    test_control: TestControlClient
    #: Origin of the attestation log, fixed by --log-origin or the first checkpoint seen.
    log_origin: str | None = None
    #: False once the server answered UNIMPLEMENTED to the clock probe.
    clock_probe: bool = True
    #: Head of the kit's exchange-to-custodian sync log as the custodian last said it.
    sync_sent: int = 0
    #: The custodian the kit serves to an exchange under test (``--listen``), once started.
    counterpart: KitCustodian | None = None
    #: The account the kit opened at its own custodian when no ``--account`` was given.
    account_id: str | None = None
    #: Regulator runs with ``--listen``: the parties' ReconciliationService the kit serves.
    parties: dict[int, KitReconciliationParty] = field(default_factory=dict)
    #: Channels of the further identities, opened on first use, by party id.
    _identities: dict[str, tuple[grpc.aio.Channel, PartyClients]] = field(
        default_factory=dict, repr=False
    )
    _sequence: Iterator[int] = field(default_factory=lambda: iter(()), repr=False)

    @classmethod
    def open(cls, config: KitConfig) -> Session:
        channel = secure_channel(
            config.target, config.tls, server_name_override=config.server_name_override
        )
        timeout = config.rpc_timeout
        return cls(
            config=config,
            channel=channel,
            custodian=CustodianClient(channel, default_timeout=timeout),
            exchange=ExchangeClient(channel, default_timeout=timeout),
            regulator=RegulatorClient(channel, default_timeout=timeout),
            reconciliation=ReconciliationClient(channel, default_timeout=timeout),
            emergency_release=EmergencyReleaseClient(channel, default_timeout=timeout),
            test_control=TestControlClient(channel, default_timeout=timeout),
            log_origin=config.log_origin,
            # Microseconds since the epoch: above every sequence an earlier run of the
            # kit used, so a server that remembers its replay state accepts the next run.
            _sequence=itertools.count(time.time_ns() // 1000),
        )

    async def start(self) -> list[str]:
        """Serve the counterpart the server under test dials, if asked; returns run errors.

        For an exchange under test with ``--listen``: the kit's custodian
        starts, waits for the exchange to dial it, and (without ``--account``)
        opens an account there for the cases that need one, credited once the
        exchange has proven its holdings statement.
        """
        config = self.config
        if config.listen is not None and config.role is Role.REGULATOR:
            return await self._serve_parties()
        if config.listen is None or config.role is not Role.EXCHANGE:
            return []
        signer = config.key_for(common_pb2.PARTY_ROLE_CUSTODIAN)
        if signer is None:
            return ["--listen needs a --kit-key of the custodian role: the kit plays the custodian"]
        kit = KitCustodian(
            listen=config.listen,
            state_dir=config.state_dir or Path(".collateral-sync-kit") / config.server_party_id,
            tls=config.tls,
            registry=config.registry,
            signer=signer,
            exchange_id=config.server_party_id,
            log_origin=config.log_origin or f"{signer.party_id}/collateral-sync/attestations",
            sequences=self.next_sequence,
        )
        try:
            await kit.start()
        except (RuntimeError, OSError) as err:
            return [f"cannot serve the kit's custodian on {config.listen}: {err}"]
        self.counterpart = kit
        if not await kit.wait_connected(COUNTERPART_DIAL_TIMEOUT):
            return [
                f"the exchange did not dial the kit's custodian at {config.listen} within "
                f"{COUNTERPART_DIAL_TIMEOUT:.0f} s: configure it to use that address and the "
                f"log origin {kit.log.origin!r}"
            ]
        client = config.key_for(common_pb2.PARTY_ROLE_CLIENT)
        if config.account_id is None and client is not None:
            return await self._open_account(kit, client)
        return []

    async def _serve_parties(self) -> list[str]:
        """Serve the custodian's and the exchange's ReconciliationService to the regulator."""
        config = self.config
        served = {
            common_pb2.PARTY_ROLE_CUSTODIAN: (config.listen, config.tls),
            common_pb2.PARTY_ROLE_EXCHANGE: (
                config.listen_exchange,
                config.exchange_tls or config.tls,
            ),
        }
        for role, (address, tls) in served.items():
            key = config.key_for(role)
            if address is None or key is None:
                return ["--listen needs --listen-exchange and --kit-keys of both parties"]
            party = KitReconciliationParty(
                listen=address, tls=tls, party_id=key.party_id, regulator_id=config.server_party_id
            )
            try:
                await party.start()
            except (RuntimeError, OSError) as err:
                return [f"cannot serve {key.party_id}'s ReconciliationService on {address}: {err}"]
            self.parties[role] = party
        return []

    async def _open_account(self, kit: KitCustodian, client: SigningKey) -> list[str]:
        account = f"kit-{uuid.uuid4().hex[:12]}"
        change, ref = kit.holdings_change(account, client, dict(DEFAULT_HOLDINGS), epoch=1)
        kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COUNTERPART_DIAL_TIMEOUT
        while loop.time() < deadline:
            line = await credit_line_of(self.exchange, account, self.config.rpc_timeout)
            if relies_on(line, ref):
                self.account_id = account
                return []
            await asyncio.sleep(0.1)
        return [
            f"the exchange did not credit the kit's account {account!r} within "
            f"{COUNTERPART_DIAL_TIMEOUT:.0f} s of a proven holdings statement"
        ]

    def clients_as(self, party_id: str) -> PartyClients | None:
        """Clients calling as ``party_id`` (the main identity or an ``--identity``), if the kit has it."""
        config = self.config
        timeout = config.rpc_timeout
        if party_id == config.tls.party_id:
            return PartyClients.over(party_id, self.channel, timeout)
        opened = self._identities.get(party_id)
        if opened is not None:
            return opened[1]
        for tls in config.identities:
            if tls.party_id == party_id:
                channel = secure_channel(
                    config.target, tls, server_name_override=config.server_name_override
                )
                clients = PartyClients.over(party_id, channel, timeout)
                self._identities[party_id] = (channel, clients)
                return clients
        return None

    async def close(self) -> None:
        await self.channel.close()
        for channel, _ in self._identities.values():
            await channel.close()
        if self.counterpart is not None:
            await self.counterpart.stop()
        for party in self.parties.values():
            await party.stop()

    def next_sequence(self) -> int:
        return next(self._sequence)


class CaseContext:
    """The explicit context a case body works with."""

    def __init__(self, session: Session, case: Case) -> None:
        self.session = session
        self.case = case
        #: Every RPC the case made, in order.
        self.transcript: list[Outcome] = []

    # -- configuration --

    @property
    def config(self) -> KitConfig:
        return self.session.config

    @property
    def role(self) -> Role:
        return self.session.config.role

    @property
    def registry(self) -> KeyRegistry:
        return self.session.config.registry

    @property
    def server_party_id(self) -> str:
        return self.session.config.server_party_id

    @property
    def kit_party_id(self) -> str:
        """The party id of the kit's TLS certificate."""
        return self.session.config.tls.party_id

    def key(self, role: int) -> SigningKey:
        """The kit's key for ``role`` (a ``PartyRole``); skips the case if there is none."""
        key = self.config.key_for(role)
        if key is None:
            raise CaseSkipped(f"needs a --kit-key of role {role_name(role)}")
        return key

    def account(self) -> str:
        """The account the kit may use (``--account``, or the one it opened at its own
        custodian); skips the case if there is none."""
        if self.session.account_id:
            return self.session.account_id
        if not self.config.account_id:
            raise CaseSkipped(
                "needs --account: an account at the server owned by the kit's client key"
            )
        return self.config.account_id

    @staticmethod
    def unique(prefix: str) -> str:
        """A fresh identifier, e.g. for statement ids or accounts that must not exist."""
        return f"{prefix}-{uuid.uuid4().hex[:16]}"

    def next_sequence(self) -> int:
        return self.session.next_sequence()

    # -- identities --

    @property
    def identity_parties(self) -> list[str]:
        """The party ids the kit can call as: its main certificate's first, then ``--identity``."""
        return [self.config.tls.party_id, *(tls.party_id for tls in self.config.identities)]

    def as_party(self, party_id: str) -> PartyClients:
        """Clients calling as ``party_id``; skips the case if the kit has no certificate of it."""
        clients = self.session.clients_as(party_id)
        if clients is None:
            raise CaseSkipped(f"needs --identity: a certificate of {party_id!r}")
        return clients

    @property
    def owner(self) -> PartyClients:
        """Calls as the owner of the kit's account (the party of its client key) when the kit
        has that party's certificate, else as its main identity (PROTOCOL.md §4.5)."""
        key = self.config.key_for(common_pb2.PARTY_ROLE_CLIENT)
        clients = None if key is None else self.session.clients_as(key.party_id)
        return clients or self.as_party(self.kit_party_id)

    @property
    def auditor(self) -> PartyClients:
        """Calls as a regulator, who may read every account (PROTOCOL.md §4.5), when the kit has
        one's certificate, else as its main identity."""
        for party in self.identity_parties:
            if any(k.role == common_pb2.PARTY_ROLE_REGULATOR for k in self.registry.keys_for(party)):
                return self.as_party(party)
        return self.as_party(self.kit_party_id)

    def as_role(self, role: int, *, besides: Sequence[str] = ()) -> PartyClients:
        """Clients of a registered party of ``role`` other than ``besides``; skips without one."""
        for party in self.identity_parties:
            if party in besides:
                continue
            if any(k.role == role for k in self.registry.keys_for(party)):
                return self.as_party(party)
        others = f" besides {', '.join(besides)}" if besides else ""
        raise CaseSkipped(f"needs --identity: a certificate of a {role_name(role)} party{others}")

    def as_stranger(self) -> PartyClients:
        """Clients of a certificate from the CA whose party is not in the registry; skips without one."""
        for party in self.identity_parties:
            if not self.registry.keys_for(party):
                return self.as_party(party)
        raise CaseSkipped(
            "needs --identity: a certificate from the same CA whose party is not in the registry"
        )

    # -- clients --

    @property
    def custodian(self) -> CustodianClient:
        return self.session.custodian

    @property
    def exchange(self) -> ExchangeClient:
        return self.session.exchange

    @property
    def regulator(self) -> RegulatorClient:
        return self.session.regulator

    @property
    def reconciliation(self) -> ReconciliationClient:
        return self.session.reconciliation

    @property
    def emergency_release(self) -> EmergencyReleaseClient:
        return self.session.emergency_release

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.session.channel

    async def rpc(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Message,
        *,
        timeout: float | None = None,
        label: str | None = None,
    ) -> Outcome:
        """Call ``method(request)`` and record the outcome; errors become outcomes, not raises."""
        name = label or getattr(method, "__qualname__", None) or repr(method)
        deadline = self.config.rpc_timeout if timeout is None else timeout
        started = time.perf_counter()
        try:
            response = await method(request, timeout=deadline)
        except (RPCError, grpc.RpcError) as err:
            outcome = outcome_from_error(name, request, err, time.perf_counter() - started)
        else:
            outcome = Outcome(
                rpc=name,
                request=request,
                response=response,
                code=grpc.StatusCode.OK,
                elapsed=time.perf_counter() - started,
            )
        self.transcript.append(outcome)
        return outcome

    async def control(self, method: Callable[..., Awaitable[_Resp]], request: Message) -> _Resp:
        """Call a TestControlService RPC to put the server in a state.

        UNIMPLEMENTED (the server is not in test mode, or does not offer this
        RPC) skips the case; any other error fails it.
        """
        name = getattr(method, "__name__", "test control")
        outcome = await self.rpc(method, request, label=f"TestControlService.{name}")
        if outcome.code == grpc.StatusCode.UNIMPLEMENTED:
            raise CaseSkipped(f"the server does not offer TestControlService.{name}")
        if not outcome.ok:
            raise CaseFailure(
                f"TestControlService.{name} failed with {outcome.code.name}: {outcome.message}",
                expected="OK",
                got=str(outcome.summary()),
            )
        response: _Resp = outcome.response
        return response

    @property
    def counterpart(self) -> KitCustodian:
        """The custodian the kit serves the exchange under test; skips the case without one."""
        kit = self.session.counterpart
        if kit is None:
            raise CaseSkipped(
                "needs --listen: the kit serves the custodian the exchange under test dials"
            )
        return kit

    def reconciliation_party(self, role: int) -> KitReconciliationParty:
        """The party's ReconciliationService the kit serves the regulator under test."""
        party = self.session.parties.get(role)
        if party is None:
            raise CaseSkipped(
                "needs --listen and --listen-exchange: the kit serves the parties' position "
                "trees the regulator descends"
            )
        return party

    @property
    def test_control(self) -> TestControlClient:
        """The raw client; prefer :meth:`control`, which handles UNIMPLEMENTED."""
        return self.session.test_control

    # -- time and statements --

    async def advance_clock(self, by: timedelta) -> datetime:
        """Move the server's clock forward by ``by`` (test control); returns its new time.

        Skips the case when the server offers no ``AdvanceClock`` or does not say its time.
        """
        duration = duration_pb2.Duration()
        duration.FromTimedelta(by)
        response: test_control_pb2.AdvanceClockResponse = await self.control(
            self.test_control.advance_clock, test_control_pb2.AdvanceClockRequest(by=duration)
        )
        if not response.HasField("now"):
            raise CaseSkipped("AdvanceClock does not say the server's time")
        now = response.now.ToDatetime(tzinfo=UTC)
        # The kit's own party (the custodian an exchange dials) keeps the server's time:
        # an exchange states a cut-off only once it has heard from it past the cut-off (§10.2).
        if self.session.counterpart is not None:
            self.session.counterpart.follow(now)
        return now

    async def server_now(self) -> datetime:
        """The server's current time.

        A server in test mode may have moved its clock; ``AdvanceClock`` by zero
        reads it. Otherwise the server is taken to keep real time.
        """
        if self.session.clock_probe:
            request = test_control_pb2.AdvanceClockRequest(by=duration_pb2.Duration(seconds=0))
            try:
                response = await self.session.test_control.advance_clock(request)
            except RPCError:
                self.session.clock_probe = False
            else:
                if response.HasField("now"):
                    now = response.now.ToDatetime(tzinfo=UTC)
                    if self.session.counterpart is not None:
                        self.session.counterpart.follow(now)
                    return now
                self.session.clock_probe = False
        return datetime.now(UTC)

    async def sign(
        self,
        message: Message,
        signer: SigningKey,
        *,
        issuer: str | None = None,
        audience: Sequence[str] | None = None,
        sequence: int | None = None,
        issued_at: datetime | None = None,
        expires_at: datetime | None = None,
        statement_id: str | None = None,
        extra_signers: Sequence[SigningKey] = (),
        payload_type: str | None = None,
        payload: bytes | None = None,
    ) -> envelope_pb2.Envelope:
        """A statement as a correct issuer would make it, unless a knob says otherwise.

        Sets ``message.header`` in place. Defaults: issuer = the signer's party,
        audience = the server, a fresh sequence, issued now (server time),
        expiring after :data:`DEFAULT_STATEMENT_TTL`, a fresh statement id.
        """
        now = issued_at if issued_at is not None else await self.server_now()
        header = make_header(
            issuer=signer.party_id if issuer is None else issuer,
            audience=[self.server_party_id] if audience is None else audience,
            sequence=self.next_sequence() if sequence is None else sequence,
            issued_at=now,
            expires_at=expires_at if expires_at is not None else now + DEFAULT_STATEMENT_TTL,
            statement_id=self.unique("conformance") if statement_id is None else statement_id,
        )
        message.header.CopyFrom(header)  # type: ignore[attr-defined]
        return seal(message, [signer, *extra_signers], payload_type=payload_type, payload=payload)


def party_role(role: Role) -> int:
    """The ``PartyRole`` of a server role."""
    return {
        Role.CUSTODIAN: common_pb2.PARTY_ROLE_CUSTODIAN,
        Role.EXCHANGE: common_pb2.PARTY_ROLE_EXCHANGE,
        Role.REGULATOR: common_pb2.PARTY_ROLE_REGULATOR,
    }[role]
