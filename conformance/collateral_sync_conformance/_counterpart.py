"""The custodian the kit plays for an exchange under test (``run --role exchange --listen``).

An exchange is a client of its custodian: it dials ``SyncPositions``, fetches
checkpoints and proofs, and submits liquidation instructions. To judge how an
exchange acts on what a custodian tells it — whether it credits only proven
holdings, how it carries a margin call through its lifecycle, how it receives
the custodian's side of the stream — the kit must *be* that custodian. The
integrator points the exchange under test at the kit's ``--listen`` address
(with the kit's TLS identity as the custodian) and the kit serves:

- ``GetCheckpoint``, ``GetInclusionProof``, ``GetConsistencyProof`` over its
  own RFC 9162 attestation log (:class:`~collateral_sync.attestation.AttestationLog`);
- ``SyncPositions`` with the SDK's :class:`~collateral_sync.sync.SyncSession`
  (durable, resumable, exactly once) — or, while a case holds it, a raw stream
  the case drives frame by frame (:meth:`KitCustodian.raw_stream`);
- ``SubmitLiquidationInstruction``: recorded for the cases and answered with
  FAILED_PRECONDITION ``STATE_CONFLICT`` — the kit executes nothing.

While a case holds the kit silent (:meth:`KitCustodian.silence`, §11.2) it is
a custodian that is down: ``SyncPositions`` calls are held without a word and
every other RPC answers UNAVAILABLE.

Every other custodian RPC answers UNIMPLEMENTED. What the exchange sends on the
stream is verified (the embedded statements with the SDK) and kept in memory
for the cases; a statement that does not verify, or is not the exchange's own,
refuses its batch, as §6.5 requires of any custodian, and fails the case that
is waiting for what the exchange sends (:meth:`KitCustodian.wait_for`).

The logs live in ``state_dir`` and outlive a run: the exchange remembers how
far it has received the kit's log, so the next run against the same exchange
must continue that log, not start another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import grpc
import grpc.aio
from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.clients import ExchangeClient
from collateral_sync.errors import (
    CollateralSyncError,
    RPCError,
    StateError,
    VerificationError,
    to_grpc_status,
)
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.merkle import leaf_hash
from collateral_sync.reconciliation import PositionTree
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    LogHead,
    SyncLog,
    SyncSession,
    serve_sync_stream,
)
from collateral_sync.transport import TlsConfig, check_peer_party
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
    position_sync_pb2,
    reconciliation_service_pb2,
    reconciliation_service_pb2_grpc,
    valuation_pb2,
)
from google.protobuf.message import Message

from collateral_sync_conformance._expect import CaseFailure

__all__ = [
    "KitCustodian",
    "KitReconciliationParty",
    "RawStream",
    "ReceivedUpdate",
    "credit_line_of",
    "relies_on",
]

_R = errors_pb2.ErrorReason
_LOGGER = logging.getLogger("collateral_sync_conformance.counterpart")

#: Statements the kit signs live this long: as long as the reference custodian's,
#: so that cases moving the exchange's clock by days leave them valid.
_TTL = timedelta(days=30)
#: The kit promises a frame at least this often on the stream.
_HEARTBEAT = timedelta(seconds=1)
#: How many of the exchange's entries the kit lets be unacknowledged.
_WINDOW = 1000

#: The statement type each exchange-to-custodian variant embeds.
_EMBEDDED: dict[str, type[Message]] = {
    "credit_line": valuation_pb2.CreditLine,
    "margin_call": margin_pb2.MarginCall,
    "liquidation_instruction": liquidation_pb2.LiquidationInstruction,
    "risk_policy": valuation_pb2.RiskPolicy,
}


@dataclass(frozen=True, slots=True)
class ReceivedUpdate:
    """One entry of the exchange's log as the kit stored it, with its verified statement."""

    sequence: int
    variant: str
    envelope: envelope_pb2.Envelope
    message: Any


@dataclass(slots=True)
class RawStream:
    """A SyncPositions call the exchange dialled, handed to a case to drive by hand."""

    #: The exchange's hello (its first frame).
    hello: position_sync_pb2.SyncHello
    _requests: AsyncIterator[custodian_service_pb2.SyncPositionsRequest]
    _context: grpc.aio.ServicerContext
    _done: asyncio.Event
    frames: list[position_sync_pb2.SyncFrame] = field(default_factory=list)
    _queue: asyncio.Queue[position_sync_pb2.SyncFrame | None] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None
    # A case's frames and its heartbeat task share the call: gRPC allows one
    # write at a time (a second gives GRPC_CALL_ERROR_TOO_MANY_OPERATIONS).
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        try:
            async for request in self._requests:
                await self._queue.put(request.frame)
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass
        await self._queue.put(None)

    async def send(self, frame: position_sync_pb2.SyncFrame) -> None:
        async with self._writing:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError, RuntimeError):
                await self._context.write(custodian_service_pb2.SyncPositionsResponse(frame=frame))

    async def next_frame(self, timeout: float) -> position_sync_pb2.SyncFrame | None:
        """The exchange's next frame; None on timeout or once it has ended the call."""
        try:
            async with asyncio.timeout(timeout):
                frame = await self._queue.get()
        except TimeoutError:
            return None
        if frame is None:
            self._queue.put_nowait(None)  # stays ended for later reads
            return None
        self.frames.append(frame)
        return frame

    async def frame_of(
        self, kinds: tuple[str, ...], timeout: float
    ) -> position_sync_pb2.SyncFrame | None:
        """The next frame of one of ``kinds`` (others skipped); None on timeout or end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            frame = await self.next_frame(remaining)
            if frame is None:
                return None
            if frame.WhichOneof("frame") in kinds:
                return frame
        return None

    def end(self) -> None:
        """Give the call back: the handler returns and the exchange will re-dial."""
        if self._reader is not None:
            self._reader.cancel()
        self._done.set()


class KitCustodian:
    """The custodian side the kit serves to the exchange under test."""

    def __init__(
        self,
        *,
        listen: str,
        state_dir: Path,
        tls: TlsConfig,
        registry: KeyRegistry,
        signer: SigningKey,
        exchange_id: str,
        log_origin: str,
        sequences: Callable[[], int],
    ) -> None:
        self.listen = listen
        self.party_id = signer.party_id
        self.exchange_id = exchange_id
        self.registry = registry
        self.signer = signer
        self._tls = tls
        self._sequences = sequences
        #: The exchange's clock minus ours (test mode moves it).
        self.clock_offset = timedelta(0)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log = AttestationLog(state_dir / "attestations.sqlite", origin=log_origin)
        self._db = sqlite3.connect(state_dir / f"sync-{exchange_id}.sqlite", isolation_level=None)
        self.sync_log = SyncLog(
            self._db,
            party_id=self.party_id,
            peer_party_id=exchange_id,
            sending_direction=CUSTODIAN_TO_EXCHANGE,
        )
        self.session = SyncSession(
            self.sync_log,
            signer,
            registry,
            apply=self._apply,
            window=_WINDOW,
            heartbeat_interval=_HEARTBEAT,
            clock=self.now,
        )
        #: What the exchange sent on the stream, in order (this run only).
        self.received: list[ReceivedUpdate] = []
        #: Liquidation instructions submitted by RPC, as received.
        self.instructions: list[envelope_pb2.Envelope] = []
        #: (leaf_index, tree_size) of every GetInclusionProof asked.
        self.inclusion_requests: list[tuple[int, int]] = []
        #: Sizes of the checkpoints GetCheckpoint answered, in order.
        self.checkpoints_served: list[int] = []
        #: (first, second) of every GetConsistencyProof asked.
        self.consistency_requests: list[tuple[int, int]] = []
        #: What the exchange did wrong, for the running case to report.
        self.violations: list[str] = []
        self._reported = 0
        #: While set, GetCheckpoint / proofs answer from this log instead (a fork).
        self.fork: AttestationLog | None = None
        #: While set, each inclusion or consistency proof passes through it before it is
        #: answered: a case that lies about one proof rewrites it here.
        self.rewrite_proof: Callable[[Message], None] | None = None
        #: The sequence and signed batch with which a case contradicted the kit's own
        #: log towards the exchange (this run), once one has.
        self.equivocation: tuple[int, envelope_pb2.Envelope] | None = None
        self._changed = asyncio.Condition()
        self._raw_wanted: asyncio.Future[RawStream] | None = None
        #: Set while the kit is silent; set (and dropped) when the silence ends.
        self._silenced: asyncio.Event | None = None
        #: SyncPositions calls the session has served (counted as they start).
        self.sessions_served = 0
        self._kick: asyncio.Event | None = None
        self._streams = 0
        self._server: grpc.aio.Server | None = None

    # -- lifecycle --

    async def start(self) -> None:
        server = grpc.aio.server()
        custodian_service_pb2_grpc.add_CustodianServiceServicer_to_server(_Servicer(self), server)
        credentials = grpc.ssl_server_credentials(
            [(self._tls.private_key, self._tls.cert_chain)],
            root_certificates=self._tls.ca_cert,
            require_client_auth=True,
        )
        server.add_secure_port(self.listen, credentials)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._kick is not None:
            self._kick.set()  # end the session's call first: the exchange sees UNAVAILABLE
            await asyncio.sleep(0.05)
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
        self.log.close()
        self._db.close()

    # -- clock --

    def now(self) -> datetime:
        """The exchange's idea of now, as last seen (the clock every kit statement uses)."""
        return datetime.now(UTC) + self.clock_offset

    def follow(self, server_now: datetime) -> None:
        self.clock_offset = server_now - datetime.now(UTC)

    # -- what the kit says --

    def sign(
        self,
        message: Message,
        *,
        audience: Iterable[str] | None = None,
        statement_id: str | None = None,
        signer: SigningKey | None = None,
        sequence: int | None = None,
    ) -> envelope_pb2.Envelope:
        """A statement signed as the kit's custodian (or ``signer``), issued now."""
        return sign_statement(
            message,
            signer or self.signer,
            audience=list(audience) if audience is not None else [self.exchange_id],
            sequence=self._sequences() if sequence is None else sequence,
            ttl=_TTL,
            issued_at=self.now(),
            statement_id=statement_id,
        )

    def attest(self, envelope: envelope_pb2.Envelope) -> attestation_pb2.AttestationRef:
        """Append a holdings statement to the log; its reference under the new size."""
        leaf = statement_leaf(envelope)
        index = self.log.append(leaf)
        return attestation_pb2.AttestationRef(
            log_origin=self.log.origin,
            leaf_index=index,
            leaf_hash=leaf_hash(leaf),
            tree_size=index + 1,
        )

    def announce(self, *updates: position_sync_pb2.PositionUpdate) -> LogHead:
        """Append updates to the kit's log towards the exchange; sent once committed."""
        with self.sync_log.transaction():
            return self.sync_log.append(updates)

    def holdings_change(
        self,
        account_id: str,
        client: SigningKey,
        holdings: dict[str, str],
        *,
        epoch: int,
        reason: int = attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
        attest: bool = True,
        pledged_to: str | None = None,
        pledged: dict[str, str] | None = None,
        locked: dict[str, str] | None = None,
        path_names: dict[str, str] | None = None,
    ) -> tuple[position_sync_pb2.HoldingsChange, attestation_pb2.AttestationRef]:
        """A signed holdings statement of ``account_id`` (all of it pledged to the exchange).

        Attested in the log unless ``attest`` is False (then its reference
        names the next leaf, which holds something else or nothing). A pledge
        or top-up carries the client's pre-authorised liquidation path (§9.1).
        ``pledged_to`` names another exchange the holdings are pledged to; the
        statement is still addressed to the exchange the kit serves.
        ``pledged`` gives, per asset, a pledged quantity other than the whole
        quantity, and ``locked`` a locked quantity other than 0. ``path_names``
        overrides the ``account_id`` or ``exchange_id`` the path names (a path
        that does not authorise this account and exchange).
        """
        statement = attestation_pb2.HoldingsStatement(
            account_id=account_id,
            exchange_id=self.exchange_id if pledged_to is None else pledged_to,
            epoch=epoch,
            reason=reason,  # type: ignore[arg-type]
            positions=[
                common_pb2.Position(
                    account_id=account_id,
                    asset_id=asset,
                    quantity=common_pb2.Decimal(value=quantity),
                    locked_quantity=common_pb2.Decimal(value=(locked or {}).get(asset, "0")),
                    pledged_quantity=common_pb2.Decimal(
                        value=quantity if pledged is None else pledged.get(asset, quantity)
                    ),
                )
                for asset, quantity in sorted(holdings.items())
            ],
        )
        envelope = self.sign(statement, audience=[self.exchange_id, client.party_id])
        if attest:
            ref = self.attest(envelope)
        else:
            leaf = statement_leaf(envelope)
            size = self.log.size
            ref = attestation_pb2.AttestationRef(
                log_origin=self.log.origin,
                leaf_index=size,
                leaf_hash=leaf_hash(leaf),
                tree_size=size + 1,
            )
        change = position_sync_pb2.HoldingsChange(holdings_statement=envelope, attestation=ref)
        if reason in (
            attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE,
            attestation_pb2.HOLDINGS_CHANGE_REASON_TOP_UP,
        ):
            path = liquidation_pb2.LiquidationPath(
                account_id=account_id,
                exchange_id=self.exchange_id,
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id=asset,
                        venue="conformance-otc-desk",
                        max_quantity=common_pb2.Decimal(value=quantity),
                    )
                    for asset, quantity in sorted(holdings.items())
                ],
                proceeds_account_id=f"{self.exchange_id}/settlement",
            )
            for name, value in (path_names or {}).items():
                setattr(path, name, value)
            change.liquidation_path.CopyFrom(
                self.sign(
                    path,
                    audience=[self.party_id],
                    signer=client,
                    statement_id=f"path-{account_id}-{epoch}",
                )
            )
        return change, ref

    def checkpoint(self, size: int | None = None) -> envelope_pb2.Envelope:
        """A signed checkpoint of the log served now (the fork while one is set)."""
        log = self.fork if self.fork is not None else self.log
        if size is not None and size != log.size:
            raise StateError(
                f"the kit signs checkpoints of its whole log only: size {log.size}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": str(log.size), "actual": str(size)},
            )
        return log.checkpoint(self.signer, now=self.now(), sequence=self._sequences(), ttl=_TTL)

    # -- what the exchange says --

    def _apply(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        """The session's apply callback: verify each embedded statement, keep it for the cases."""
        received = []
        for sequence, update in updates:
            variant = update.WhichOneof("update")
            message_class = _EMBEDDED.get(str(variant))
            if message_class is None:  # the SDK's batch check lets only direction 2 through
                continue
            envelope: envelope_pb2.Envelope = getattr(update, str(variant))
            try:
                verified = verify_statement(
                    envelope,
                    self.registry,
                    expected_type=message_class,
                    audience=self.party_id,
                    now=self.now(),
                )
            except CollateralSyncError as err:
                self._violation(
                    f"entry {sequence} ({variant}) of the exchange's sync log does not verify: "
                    f"{err.reason_name}: {err.message}"
                )
                raise
            if verified.issuer != self.exchange_id:
                # §6.5: a statement on the stream must be the peer's own; the batch fails.
                message = (
                    f"entry {sequence} ({variant}) is issued by {verified.issuer!r}, "
                    f"not the exchange {self.exchange_id!r}"
                )
                self._violation(message)
                raise VerificationError(
                    message,
                    reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                    metadata={"expected": self.exchange_id, "actual": verified.issuer},
                )
            received.append(ReceivedUpdate(sequence, str(variant), envelope, verified.message))
        self.received.extend(received)
        if received:
            asyncio.get_running_loop().call_soon(self._wake)

    def _violation(self, text: str) -> None:
        self.violations.append(text)
        asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def record_instruction(self, envelope: envelope_pb2.Envelope) -> None:
        self.instructions.append(envelope)
        self._wake()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked as the exchange sends); None on timeout.

        A statement the exchange sent that did not verify, and no wait has reported
        yet, fails the case that waits: it is what the exchange did instead of what
        the case waits for.
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                while not (found := predicate()):
                    self._report_violations()
                    await self._changed.wait()
                return found
        except TimeoutError:
            self._report_violations()
            return predicate() or None

    def _report_violations(self) -> None:
        unreported = self.violations[self._reported :]
        if unreported:
            self._reported = len(self.violations)
            raise CaseFailure(
                "the exchange sent the custodian a statement that does not verify (§6.5)",
                expected="statements issued by the exchange that verify",
                got="; ".join(unreported),
            )

    async def wait_connected(self, timeout: float) -> bool:
        """True once the exchange has dialled and the handshake is done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.session.connected:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # -- the raw stream --

    @contextlib.asynccontextmanager
    async def raw_stream(self, timeout: float) -> AsyncIterator[RawStream | None]:
        """Take the stream from the session: end the current call, hand the next one over.

        Yields None if the exchange does not re-dial within ``timeout``. On
        exit the call is given back; the exchange re-dials and the session
        resumes from the durable heads, so nothing the case did is lost or
        duplicated by the session.
        """
        loop = asyncio.get_running_loop()
        wanted: asyncio.Future[RawStream] = loop.create_future()
        self._raw_wanted = wanted
        if self._kick is not None:
            self._kick.set()
        stream: RawStream | None = None
        try:
            try:
                async with asyncio.timeout(timeout):
                    stream = await wanted
            except TimeoutError:
                stream = None
            yield stream
        finally:
            self._raw_wanted = None
            if stream is not None:
                stream.end()

    # -- silence --

    @contextlib.asynccontextmanager
    async def silence(self) -> AsyncIterator[None]:
        """Fall silent: end the exchange's call and say nothing until the block ends (§11.2).

        Every call the exchange dials meanwhile is held without a frame, and
        every other RPC answers UNAVAILABLE; at the end the held calls end
        UNAVAILABLE, so the exchange re-dials and the session resumes.
        """
        ended = asyncio.Event()
        self._silenced = ended
        if self._kick is not None:
            self._kick.set()
        try:
            yield
        finally:
            self._silenced = None
            ended.set()

    @property
    def silent(self) -> bool:
        return self._silenced is not None

    async def wait_heard(self, served_before: int, timeout: float) -> bool:
        """True once a session call after ``served_before`` calls has done its handshake."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.sessions_served > served_before and self.session.connected):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _take_raw(self) -> asyncio.Future[RawStream] | None:
        wanted, self._raw_wanted = self._raw_wanted, None
        return wanted if wanted is not None and not wanted.done() else None


class _Servicer(custodian_service_pb2_grpc.CustodianServiceServicer):
    """The RPCs an exchange calls on its custodian, served by the kit."""

    def __init__(self, kit: KitCustodian) -> None:
        self._kit = kit

    async def _abort(self, context: grpc.aio.ServicerContext, err: CollateralSyncError) -> None:
        await context.abort_with_status(to_grpc_status(err))

    def _log(self) -> AttestationLog:
        return self._kit.fork if self._kit.fork is not None else self._kit.log

    async def _unless_silent(self, context: grpc.aio.ServicerContext) -> None:
        if self._kit.silent:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the kit's custodian is silent")

    async def GetCheckpoint(
        self,
        request: custodian_service_pb2.GetCheckpointRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.GetCheckpointResponse:
        await self._unless_silent(context)
        try:
            checkpoint = self._kit.checkpoint(request.tree_size or None)
        except CollateralSyncError as err:
            await self._abort(context, err)
            raise
        self._kit.checkpoints_served.append(self._log().size)
        self._kit._wake()
        return custodian_service_pb2.GetCheckpointResponse(checkpoint=checkpoint)

    async def GetInclusionProof(
        self,
        request: custodian_service_pb2.GetInclusionProofRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.GetInclusionProofResponse:
        await self._unless_silent(context)
        log = self._log()
        self._kit.inclusion_requests.append((request.leaf_index, request.tree_size))
        self._kit._wake()
        try:
            proof = log.inclusion_proof(request.leaf_index, request.tree_size or log.size)
        except CollateralSyncError as err:
            await self._abort(context, err)
            raise
        if self._kit.rewrite_proof is not None:
            self._kit.rewrite_proof(proof)
        return custodian_service_pb2.GetInclusionProofResponse(proof=proof)

    async def GetConsistencyProof(
        self,
        request: custodian_service_pb2.GetConsistencyProofRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.GetConsistencyProofResponse:
        await self._unless_silent(context)
        log = self._log()
        self._kit.consistency_requests.append((request.first_tree_size, request.second_tree_size))
        self._kit._wake()
        try:
            proof = log.consistency_proof(
                request.first_tree_size, request.second_tree_size or log.size
            )
        except CollateralSyncError as err:
            await self._abort(context, err)
            raise
        if self._kit.rewrite_proof is not None:
            self._kit.rewrite_proof(proof)
        return custodian_service_pb2.GetConsistencyProofResponse(proof=proof)

    async def SubmitLiquidationInstruction(
        self,
        request: custodian_service_pb2.SubmitLiquidationInstructionRequest,
        context: grpc.aio.ServicerContext,
    ) -> custodian_service_pb2.SubmitLiquidationInstructionResponse:
        await self._unless_silent(context)
        self._kit.record_instruction(request.liquidation_instruction)
        await self._abort(
            context,
            StateError(
                "recorded by the collateral-sync conformance kit, which executes no liquidation",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={"expected": "a custodian that executes", "actual": "the conformance kit"},
            ),
        )
        raise AssertionError("unreachable")  # abort raises

    async def _unimplemented(self, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "the conformance kit's custodian serves only what an exchange calls: checkpoints, "
            "proofs, liquidation instructions and SyncPositions",
        )

    async def GetHoldingsStatement(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def PledgeCollateral(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def RequestRedemption(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def ReleasePledge(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def ExecuteEmergencyRelease(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def SubmitSettlementInstruction(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def DisputeSettlement(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def GetSettlement(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def SyncPositions(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        kit = self._kit
        try:
            check_peer_party(context, kit.exchange_id)
        except CollateralSyncError as err:
            await self._abort(context, err)
        silenced = kit._silenced
        if silenced is not None:
            await silenced.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the kit's custodian was silent")
        wanted = kit._take_raw()
        if wanted is not None:
            await self._hand_over(wanted, request_iterator, context)
            return
        kit.sessions_served += 1
        kick = asyncio.Event()
        kit._kick = kick
        serving = asyncio.create_task(serve_sync_stream(kit.session, request_iterator, context))
        kicked = asyncio.create_task(kick.wait())
        try:
            await asyncio.wait({serving, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
            if kit._kick is kick:
                kit._kick = None
        if serving.done():
            await serving
            return
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "the conformance kit takes the stream over"
        )

    async def _hand_over(
        self,
        wanted: asyncio.Future[RawStream],
        requests: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        iterator = requests.__aiter__()
        try:
            first = await iterator.__anext__()
        except (StopAsyncIteration, grpc.RpcError):
            self._kit._raw_wanted = wanted  # the next call, then
            return
        stream = RawStream(
            hello=first.frame.hello, _requests=iterator, _context=context, _done=asyncio.Event()
        )
        stream.frames.append(first.frame)
        stream.start()
        wanted.set_result(stream)
        await stream._done.wait()
        # End the call with a status the exchange resumes after (§6.7), rather than
        # leaving it to notice a half-closed stream.
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the conformance kit ends this call")


async def credit_line_of(
    exchange: ExchangeClient, account_id: str, timeout: float
) -> valuation_pb2.CreditLine | None:
    """The exchange's current credit line of ``account_id``, or None if it has none.

    Before the exchange has the account's holdings statement it does not know
    the caller for one of the account's parties: PERMISSION_DENIED means "not
    yet" then, as NOT_FOUND does (PROTOCOL.md §4.5).
    """
    try:
        response = await exchange.get_credit_line(
            exchange_service_pb2.GetCreditLineRequest(account_id=account_id), timeout=timeout
        )
    except RPCError as err:
        if err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
            return None
        raise
    return valuation_pb2.CreditLine.FromString(response.credit_line.payload)


def relies_on(line: valuation_pb2.CreditLine | None, ref: attestation_pb2.AttestationRef) -> bool:
    """Whether ``line`` relies on the statement ``ref`` points at."""
    return line is not None and any(a.leaf_hash == ref.leaf_hash for a in line.attestations)


class KitReconciliationParty:
    """One party's ReconciliationService the kit serves to a regulator under test.

    A regulator locates breaks by descending both parties' position trees
    (§10.4) at the addresses in its own configuration. For ``--role regulator
    --listen ... --listen-exchange ...`` the kit serves the custodian's and the
    exchange's trees there, one server each, so that the regulator's descent
    can be judged by the breaks it publishes and by what it asked.
    """

    def __init__(self, *, listen: str, tls: TlsConfig, party_id: str, regulator_id: str) -> None:
        self.listen = listen
        self.party_id = party_id
        self.regulator_id = regulator_id
        self._tls = tls
        self.trees: dict[str, PositionTree] = {}
        self.statements: dict[str, envelope_pb2.Envelope] = {}
        #: Per cut-off: how many ranges and account indexes the regulator asked for.
        self.asked: dict[str, list[int]] = {}
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        reconciliation_service_pb2_grpc.add_ReconciliationServiceServicer_to_server(
            _ReconciliationServicer(self), server
        )
        credentials = grpc.ssl_server_credentials(
            [(self._tls.private_key, self._tls.cert_chain)],
            root_certificates=self._tls.ca_cert,
            require_client_auth=True,
        )
        server.add_secure_port(self.listen, credentials)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    def publish(self, cutoff_id: str, tree: PositionTree, statement: envelope_pb2.Envelope) -> None:
        """Serve ``tree`` (and its signed statement) for ``cutoff_id``."""
        self.trees[cutoff_id] = tree
        self.statements[cutoff_id] = statement
        self.asked[cutoff_id] = [0, 0]


class _ReconciliationServicer(reconciliation_service_pb2_grpc.ReconciliationServiceServicer):
    def __init__(self, party: KitReconciliationParty) -> None:
        self._party = party

    async def _refuse(
        self, context: grpc.aio.ServicerContext, err: CollateralSyncError
    ) -> NoReturn:
        await context.abort_with_status(to_grpc_status(err))
        raise AssertionError("unreachable: abort raises")

    def _unknown(self, cutoff_id: str) -> StateError:
        return StateError(
            f"the conformance kit states no cut-off {cutoff_id!r} for {self._party.party_id}",
            reason=_R.ERROR_REASON_NOT_FOUND,
            metadata={"expected": "a cut-off the kit stated", "actual": cutoff_id},
        )

    async def GetReconciliationStatement(
        self,
        request: reconciliation_service_pb2.GetReconciliationStatementRequest,
        context: grpc.aio.ServicerContext,
    ) -> reconciliation_service_pb2.GetReconciliationStatementResponse:
        try:
            check_peer_party(context, self._party.regulator_id)
            statement = self._party.statements.get(request.cutoff_id)
            if statement is None:
                raise self._unknown(request.cutoff_id)
        except CollateralSyncError as err:
            await self._refuse(context, err)
        return reconciliation_service_pb2.GetReconciliationStatementResponse(
            reconciliation_statement=statement
        )

    async def GetPositionTreeNodes(
        self,
        request: reconciliation_service_pb2.GetPositionTreeNodesRequest,
        context: grpc.aio.ServicerContext,
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        party = self._party
        try:
            check_peer_party(context, party.regulator_id)
            tree = party.trees.get(request.cutoff_id)
            if tree is None:
                raise self._unknown(request.cutoff_id)
            response = tree.answer(request)
        except CollateralSyncError as err:
            await self._refuse(context, err)
        asked = party.asked[request.cutoff_id]
        asked[0] += len(request.ranges)
        asked[1] += len(request.account_leaf_indexes)
        return response

    async def ListEquivocationEvidence(
        self,
        request: reconciliation_service_pb2.ListEquivocationEvidenceRequest,
        context: grpc.aio.ServicerContext,
    ) -> reconciliation_service_pb2.ListEquivocationEvidenceResponse:
        """The kit's parties catch nobody equivocating: an empty list, to the regulator only."""
        try:
            check_peer_party(context, self._party.regulator_id)
        except CollateralSyncError as err:
            await self._refuse(context, err)
        return reconciliation_service_pb2.ListEquivocationEvidenceResponse()
