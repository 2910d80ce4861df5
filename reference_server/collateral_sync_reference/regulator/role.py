"""The reference regulator (auditor) node: receives both reconciliation statements, publishes the result.

Serves ``RegulatorService`` (and ``TestControlService`` in test mode, for its
clock):

- ``SubmitReconciliationStatement``: a ``reconciliation-statement`` issued by
  the custodian or the exchange this regulator reconciles, addressed to it,
  fresh, and never seen before (the durable replay guard: the same statement
  again is REPLAYED); ``party_role`` must be the issuing key's role, the
  ``cutoff_id`` must name the ``cutoff_time``, and the statement must be issued
  at or after it (MALFORMED otherwise). One
  statement per party per cut-off: a different one for a cut-off already
  stated is EQUIVOCATION (ABORTED), and nothing is stored. The submission that
  completes a cut-off's pair compares the two statements and, when their
  positions differ, locates the breaks by descending both position trees
  through each party's ``GetPositionTreeNodes`` (mutual TLS, addresses from
  ``peers``); it returns the signed ``ReconciliationResult`` (public, ``"*"``),
  which is kept.
- ``GetReconciliationResult``: the stored result; NOT_FOUND while a statement
  is missing; FAILED_PRECONDITION (STATE_CONFLICT) when both are in but a
  party could not be asked (it is asked again on every call until it answers).

Configuration (the ``regulator`` section of the server's file; optional)::

    "regulator": {
      "custodian": "custodian-1",
      "exchange": "exchange-1",
      "result_ttl_seconds": 2592000
    }

``custodian`` and ``exchange`` default to the one peer whose registered keys
have that role; both need an address in ``peers``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta

import grpc.aio
from collateral_sync.clients import ReconciliationClient
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import role_name
from collateral_sync.reconciliation import cutoff_id_of, reconcile
from collateral_sync.signing import VerifiedStatement, sign_statement, verify_statement
from collateral_sync.transport import plaintext_channel_for_testing, secure_channel
from collateral_sync.v1 import (
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
    regulator_service_pb2,
    regulator_service_pb2_grpc,
)

from collateral_sync_reference.common.config import ServerConfig
from collateral_sync_reference.common.emergency import EmergencyReleaseCoSigner
from collateral_sync_reference.common.runner import ServerContext
from collateral_sync_reference.common.test_control import TestControlBase

__all__ = ["RegulatorRole", "RegulatorSettings", "create_role", "parse_settings"]

_R = errors_pb2.ErrorReason
_CUSTODIAN = common_pb2.PARTY_ROLE_CUSTODIAN
_EXCHANGE = common_pb2.PARTY_ROLE_EXCHANGE
_RESULT_TYPE = "application/vnd.collateral-sync.v1.reconciliation-result+proto"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS regulator_statements (
        cutoff_id TEXT NOT NULL,
        party_role INTEGER NOT NULL,
        issuer TEXT NOT NULL,
        envelope BLOB NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (cutoff_id, party_role)
    )""",
    """CREATE TABLE IF NOT EXISTS regulator_results (
        cutoff_id TEXT PRIMARY KEY,
        envelope BLOB NOT NULL
    )""",
)


@dataclass(frozen=True, slots=True)
class RegulatorSettings:
    """The ``regulator`` section, read and checked (None: found from the registry)."""

    custodian: str | None
    exchange: str | None
    result_ttl: timedelta


def parse_settings(config: ServerConfig) -> RegulatorSettings:
    """Check the ``regulator`` section (before anything is opened)."""
    section = config.role_settings
    settings = RegulatorSettings(
        custodian=section.string("custodian") if "custodian" in section else None,
        exchange=section.string("exchange") if "exchange" in section else None,
        result_ttl=section.seconds("result_ttl_seconds", 30 * 86_400),
    )
    for name, party in (("custodian", settings.custodian), ("exchange", settings.exchange)):
        if party is not None and config.peers.get(party) is None:
            raise section.error(
                name, f"a party with an address in peers {sorted(config.peers)}", party
            )
    section.finish()
    return settings


class _RegulatorService(regulator_service_pb2_grpc.RegulatorServiceServicer):
    def __init__(self, role: RegulatorRole) -> None:
        self._role = role

    async def SubmitReconciliationStatement(
        self,
        request: regulator_service_pb2.SubmitReconciliationStatementRequest,
        context: grpc.aio.ServicerContext,
    ) -> regulator_service_pb2.SubmitReconciliationStatementResponse:
        result = await self._role.submit(request.reconciliation_statement)
        response = regulator_service_pb2.SubmitReconciliationStatementResponse()
        if result is not None:
            response.reconciliation_result.CopyFrom(result)
        return response

    async def GetReconciliationResult(
        self,
        request: regulator_service_pb2.GetReconciliationResultRequest,
        context: grpc.aio.ServicerContext,
    ) -> regulator_service_pb2.GetReconciliationResultResponse:
        return regulator_service_pb2.GetReconciliationResultResponse(
            reconciliation_result=await self._role.result(request.cutoff_id)
        )


class _RegulatorTestControl(TestControlBase):
    __test__ = False

    def __init__(self, role: RegulatorRole) -> None:
        super().__init__(role.context.test_clock, sessions=list, on_clock_advanced=_nothing)


async def _nothing() -> None:
    return None


class RegulatorRole:
    """The regulator as the runner drives it (see :class:`collateral_sync_reference.common.runner.Role`)."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.logger = context.logger
        settings = context.settings
        if not isinstance(settings, RegulatorSettings):
            settings = parse_settings(context.config)
        self._result_ttl = settings.result_ttl
        self._parties = {
            _CUSTODIAN: self._party(settings.custodian, _CUSTODIAN),
            _EXCHANGE: self._party(settings.exchange, _EXCHANGE),
        }
        storage = context.storage
        storage.execute_schema("regulator", _SCHEMA)
        self._storage = storage
        self._db = storage.connection
        self._guard = storage.replay_guard()
        self._locks: dict[str, asyncio.Lock] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._clients: dict[int, ReconciliationClient] = {}
        self._service = _RegulatorService(self)
        self._cosigner = EmergencyReleaseCoSigner(
            signer=context.signer,
            registry=context.registry,
            clock=context.clock.now,
            policy=self._cosign_policy,
            max_skew=context.config.max_skew,
        )

    def _cosign_policy(self, verified: VerifiedStatement[emergency_pb2.EmergencyRelease]) -> None:
        """The regulator co-signs releases for the exchange it oversees, and no other."""
        exchange = self._parties[_EXCHANGE]
        if verified.message.exchange_id != exchange:
            raise StateError(
                f"release for exchange {verified.message.exchange_id!r}: expected {exchange!r}, "
                "the exchange this regulator oversees",
                reason=_R.ERROR_REASON_STATE_CONFLICT,
                metadata={"expected": exchange, "actual": verified.message.exchange_id},
            )

    def _party(self, configured: str | None, role: int) -> str:
        config = self.context.config
        if configured is not None:
            return configured
        found = sorted(
            peer
            for peer, address in config.peers.items()
            if address is not None
            and any(k.role == role for k in self.context.registry.keys_for(peer))
        )
        if len(found) != 1:
            raise MalformedError(
                f"config {config.file}: regulator.{role_name(role).lower()}: expected the one "
                f"{role_name(role)} peer with an address, got {found}",
                metadata={"field": "regulator", "expected": "one peer", "actual": str(found)},
            )
        return found[0]

    def servicers(self) -> Sequence[object]:
        return [self._service, self._cosigner]

    def test_control(self) -> _RegulatorTestControl:
        return _RegulatorTestControl(self)

    async def start(self) -> None:
        for role, party in self._parties.items():
            address = self.context.config.peers[party]
            assert address is not None
            tls = self.context.tls
            channel = (
                plaintext_channel_for_testing(address)
                if tls is None
                else secure_channel(address, tls)
            )
            self._channels.append(channel)
            self._clients[role] = ReconciliationClient(channel)

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels = []

    # --- statements

    def _verify(
        self, envelope: envelope_pb2.Envelope
    ) -> VerifiedStatement[reconciliation_pb2.ReconciliationStatement]:
        verified = verify_statement(
            envelope,
            self.context.registry,
            expected_type=reconciliation_pb2.ReconciliationStatement,
            audience=self.context.party_id,
            now=self.context.clock.now(),
            max_skew=self.context.config.max_skew,
            replay_guard=self._guard,
        )
        key = self.context.registry.get(verified.signer_key_ids[0])
        key_role = key.role if key is not None else common_pb2.PARTY_ROLE_UNSPECIFIED
        statement = verified.message
        if statement.party_role != key_role:
            raise VerificationError(
                f"party_role: expected the issuing key's role {role_name(key_role)}, "
                f"got {role_name(statement.party_role)}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={
                    "expected": role_name(key_role),
                    "actual": role_name(statement.party_role),
                },
            )
        expected = self._parties.get(key_role)
        if verified.issuer != expected:
            raise VerificationError(
                f"this regulator reconciles {expected!r} as {role_name(key_role)}, "
                f"not {verified.issuer!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": str(expected), "actual": verified.issuer},
            )
        self._check_cutoff(statement)
        return verified

    @staticmethod
    def _check_cutoff(statement: reconciliation_pb2.ReconciliationStatement) -> None:
        """The id names the stated time, and a view is stated only after its cut-off."""
        if not statement.HasField("cutoff_time"):
            raise MalformedError(
                "cutoff_time: expected a timestamp, got none",
                metadata={"field": "cutoff_time", "expected": "a timestamp", "actual": "absent"},
            )
        cutoff_time = statement.cutoff_time.ToDatetime(tzinfo=UTC)
        expected_id = cutoff_id_of(cutoff_time.replace(microsecond=0))
        if statement.cutoff_id != expected_id or cutoff_time.microsecond:
            raise MalformedError(
                f"cutoff_id: expected {expected_id!r} (from cutoff_time), got "
                f"{statement.cutoff_id!r}",
                metadata={
                    "field": "cutoff_id",
                    "expected": expected_id,
                    "actual": statement.cutoff_id,
                },
            )
        issued_at = statement.header.issued_at.ToDatetime(tzinfo=UTC)
        if issued_at < cutoff_time:
            raise MalformedError(
                f"a view stated before its cut-off: expected issued_at >= {expected_id}, got "
                f"{issued_at.isoformat()}",
                metadata={
                    "field": "header.issued_at",
                    "expected": f">= {expected_id}",
                    "actual": issued_at.isoformat(),
                },
            )

    async def submit(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope | None:
        """Verify and keep one party's statement; the result when it completes the pair."""
        verified = self._verify(envelope)
        statement = verified.message
        cutoff_id = statement.cutoff_id
        with self._storage.transaction():
            row = self._db.execute(
                "SELECT payload FROM regulator_statements WHERE cutoff_id = ? AND party_role = ?",
                (cutoff_id, statement.party_role),
            ).fetchone()
            if row is not None:
                raise CollateralSyncError(
                    f"{verified.issuer} already stated cut-off {cutoff_id}: expected the statement "
                    f"it gave (sequence {statement.header.sequence} is another one), got a "
                    "different one",
                    reason=_R.ERROR_REASON_EQUIVOCATION,
                    metadata={
                        "expected": "one statement per party per cut-off",
                        "actual": cutoff_id,
                    },
                )
            self._guard.record(verified)
            self._db.execute(
                "INSERT INTO regulator_statements VALUES (?, ?, ?, ?, ?)",
                (
                    cutoff_id,
                    statement.party_role,
                    verified.issuer,
                    envelope.SerializeToString(),
                    verified.payload,
                ),
            )
        self.logger.info(
            "reconciliation statement of %s for %s accepted", verified.issuer, cutoff_id
        )
        if len(self._statements(cutoff_id)) < 2:
            return None
        try:
            return await self._complete(cutoff_id)
        except CollateralSyncError as err:
            # The statement is kept; GetReconciliationResult tries again.
            self.logger.warning(
                "reconciliation of %s not completed: %s: %s",
                cutoff_id,
                err.reason_name,
                err.message,
            )
            return None

    def _statements(self, cutoff_id: str) -> dict[int, tuple[envelope_pb2.Envelope, bytes]]:
        rows = self._db.execute(
            "SELECT party_role, envelope, payload FROM regulator_statements WHERE cutoff_id = ?",
            (cutoff_id,),
        ).fetchall()
        return {int(r): (envelope_pb2.Envelope.FromString(e), bytes(p)) for r, e, p in rows}

    def _stored_result(self, cutoff_id: str) -> envelope_pb2.Envelope | None:
        row = self._db.execute(
            "SELECT envelope FROM regulator_results WHERE cutoff_id = ?", (cutoff_id,)
        ).fetchone()
        return None if row is None else envelope_pb2.Envelope.FromString(row[0])

    async def _complete(self, cutoff_id: str) -> envelope_pb2.Envelope:
        lock = self._locks.setdefault(cutoff_id, asyncio.Lock())
        async with lock:
            stored = self._stored_result(cutoff_id)
            if stored is not None:
                return stored
            statements = self._statements(cutoff_id)
            custodian_envelope, custodian_payload = statements[_CUSTODIAN]
            exchange_envelope, exchange_payload = statements[_EXCHANGE]
            custodian = reconciliation_pb2.ReconciliationStatement.FromString(custodian_payload)
            exchange = reconciliation_pb2.ReconciliationStatement.FromString(exchange_payload)
            try:
                found = await reconcile(
                    custodian,
                    exchange,
                    self._clients[_CUSTODIAN].get_position_tree_nodes,
                    self._clients[_EXCHANGE].get_position_tree_nodes,
                )
            except CollateralSyncError as err:
                raise StateError(
                    f"cut-off {cutoff_id} could not be reconciled: {err.reason_name}: {err.message}",
                    metadata={
                        "expected": "both parties' position trees",
                        "actual": err.reason_name,
                    },
                ) from err
            result = found.to_result(custodian_envelope, exchange_envelope)
            with self._storage.transaction():
                signed = sign_statement(
                    result,
                    self.context.signer,
                    audience=["*"],
                    sequence=self._storage.next_sequence(_RESULT_TYPE),
                    ttl=self._result_ttl,
                    issued_at=self.context.clock.now(),
                    statement_id=f"{self.context.party_id}/reconciliation-result/{cutoff_id}",
                )
                self._db.execute(
                    "INSERT INTO regulator_results VALUES (?, ?)",
                    (cutoff_id, signed.SerializeToString()),
                )
            outcome = reconciliation_pb2.ReconciliationOutcome.Name(result.outcome)
            self.context.metrics.count_reconciliation_result(
                outcome.removeprefix("RECONCILIATION_OUTCOME_")
            )
            self.logger.info(
                "reconciliation %s: %s, %d break(s)", cutoff_id, outcome, len(result.breaks)
            )
            return signed

    async def result(self, cutoff_id: str) -> envelope_pb2.Envelope:
        """The signed result of a cut-off (NOT_FOUND until both statements are in)."""
        if not cutoff_id:
            raise MalformedError(
                "cutoff_id: expected a cut-off id like 2026-11-23T12:00:00Z, got nothing",
                metadata={"field": "cutoff_id", "expected": "a cut-off id", "actual": ""},
                field_violations={"cutoff_id": "required"},
            )
        stored = self._stored_result(cutoff_id)
        if stored is not None:
            return stored
        present = self._statements(cutoff_id)
        if len(present) < 2:
            have = ",".join(role_name(r) for r in sorted(present)) or "none"
            raise StateError(
                f"no result for cut-off {cutoff_id}: expected both statements, got {have}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "custodian and exchange statements", "actual": have},
            )
        return await self._complete(cutoff_id)


def create_role(context: ServerContext) -> RegulatorRole:
    """Entry point for the runner's role registry."""
    return RegulatorRole(context)
