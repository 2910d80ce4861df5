"""Deliberately broken reference servers, for faults a proxy cannot fake.

A fault proxy (:mod:`.fault_proxy`) can only rewrite what crosses the wire;
these faults live inside the server: it acts on a statement it should refuse,
values collateral wrongly, or maps an error to the wrong status. The launcher
applies one documented monkeypatch of a reference-server (or SDK server-side)
function, then runs the ordinary server command line in the same process::

    python tests/conformance/broken_servers.py FAULT serve custodian --config FILE ...

The reference server's own files are untouched; each patch is a wrapper that
breaks exactly one rule, so the conformance case written for that rule is
the one that must catch it (tests/conformance/test_kit_broken_servers.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import grpc
from collateral_sync import attestation as _attestation_module
from collateral_sync import errors
from collateral_sync import keys as _keys_module
from collateral_sync import merkle as _merkle_module
from collateral_sync import server as _server_module
from collateral_sync import signing as _signing_module
from collateral_sync._cli import main as cli_main
from collateral_sync.errors import MalformedError, VerificationError
from collateral_sync.statements import payload_type_of
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN, ZERO_HASH
from collateral_sync.sync import _log as _sync_log
from collateral_sync.sync import _session as _session_module
from collateral_sync.v1 import (
    custodian_service_pb2,
    emergency_pb2,
    envelope_pb2,
    equivocation_pb2,
    errors_pb2,
    liquidation_pb2,
    margin_pb2,
    pledge_release_pb2,
    position_sync_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
    valuation_pb2,
)
from collateral_sync.v1.attestation_pb2 import Checkpoint, HoldingsStatement
from collateral_sync.v1.liquidation_pb2 import LiquidationPath
from collateral_sync.valuation import ReleaseRefusal
from collateral_sync_reference.common import access as _access_module
from collateral_sync_reference.common import emergency as _cosigner_module
from collateral_sync_reference.common import evidence as _evidence_module
from collateral_sync_reference.common import reconciliation as _reconciliation_module
from collateral_sync_reference.common import storage as _storage
from collateral_sync_reference.custodian import emergency as _emergency_module
from collateral_sync_reference.custodian import exchange_stream as _exchange_stream_module
from collateral_sync_reference.custodian import ledger as _ledger_module
from collateral_sync_reference.custodian import liquidations as _liquidations_module
from collateral_sync_reference.custodian import pledges as _pledges_module
from collateral_sync_reference.custodian import settlement as _settlement_module
from collateral_sync_reference.exchange import attestation as _attest_module
from collateral_sync_reference.exchange import credit_lines as _credit_lines_module
from collateral_sync_reference.exchange import custodian_silence as _silence_module
from collateral_sync_reference.exchange import custodian_statements as _statements_module
from collateral_sync_reference.exchange import holdings as _holdings_module
from collateral_sync_reference.exchange import liquidations as _liquidation_module
from collateral_sync_reference.exchange import margin as _margin_module
from collateral_sync_reference.exchange import margin_calls as _margin_calls_module
from collateral_sync_reference.exchange import pledge_releases as _pledge_releases_module
from collateral_sync_reference.exchange import revaluation as _revaluation_module
from collateral_sync_reference.exchange import risk_policy as _risk_policy_module
from collateral_sync_reference.exchange import servicers as _servicers_module
from collateral_sync_reference.exchange import valuation as _valuation_module
from collateral_sync_reference.exchange.store import margin_calls as _margin_store_module
from collateral_sync_reference.regulator import role as _regulator_module
from google.protobuf.message import DecodeError

# Patched by name: what they import is their business, so they are typed loosely here.
_custodian_ledger: Any = _ledger_module
_custodian_exchange_stream: Any = _exchange_stream_module
_exchange_statements: Any = _statements_module
_exchange_holdings: Any = _holdings_module
_exchange_valuation: Any = _valuation_module
_exchange_margin_calls: Any = _margin_calls_module
_exchange_margin_store: Any = _margin_store_module
_exchange_margin: Any = _margin_module
_exchange_pledge_releases: Any = _pledge_releases_module
_exchange_liquidation: Any = _liquidation_module
_exchange_revaluation: Any = _revaluation_module
_exchange_risk_policy: Any = _risk_policy_module
_exchange_credit_lines: Any = _credit_lines_module
_exchange_attest: Any = _attest_module
_sdk_attestation: Any = _attestation_module
_sync_session: Any = _session_module
_custodian_emergency: Any = _emergency_module
_custodian_settlement: Any = _settlement_module
_custodian_liquidations: Any = _liquidations_module
_custodian_pledges: Any = _pledges_module
_regulator: Any = _regulator_module
_cosigner: Any = _cosigner_module
_access: Any = _access_module
_exchange_servicers: Any = _servicers_module
_kept_evidence: Any = _evidence_module
_party_reconciliation: Any = _reconciliation_module

__all__ = ["FAULTS", "main"]


def _lenient_verify(
    module: Any, reason_name: str, relax: Callable[[Any, dict[str, Any]], None]
) -> None:
    """Wrap ``module.verify_statement``: a refusal for ``reason_name`` is retried, relaxed.

    ``relax(header, kwargs)`` changes the verification arguments (the time,
    the audience) so that the rule the reason stands for is no longer applied.
    """
    reason = errors_pb2.ErrorReason.Value(reason_name)
    original = module.verify_statement

    def verify_statement(envelope: Any, registry: Any, **kwargs: Any) -> Any:
        try:
            return original(envelope, registry, **kwargs)
        except VerificationError as err:
            if err.reason != reason:
                raise
            header = kwargs["expected_type"].FromString(envelope.payload).header
            relax(header, kwargs)
            return original(envelope, registry, **kwargs)

    module.verify_statement = verify_statement


def _at_issue(header: Any, kwargs: dict[str, Any]) -> None:
    kwargs["now"] = header.issued_at.ToDatetime(tzinfo=UTC)


def _to_anyone(header: Any, kwargs: dict[str, Any]) -> None:
    kwargs["audience"] = header.audience[0] if header.audience else "*"


def _exchange_lenient_verify(
    reason_name: str, relax: Callable[[Any, dict[str, Any]], None]
) -> None:
    """:func:`_lenient_verify` wherever the exchange verifies statements it receives.

    The custodian's own statements, and the liquidation path a pledge relays.
    """
    for module in (_exchange_statements, _exchange_holdings):
        _lenient_verify(module, reason_name, relax)


def _exchange_ignores_expiry() -> None:
    """RespondToMarginCall verifies an expired response as of its own issued_at."""
    _exchange_lenient_verify("ERROR_REASON_STATEMENT_EXPIRED", _at_issue)


def _exchange_ignores_audience() -> None:
    """The exchange acts on statements addressed to another party, as if to it.

    It still refuses '*' for a directed statement: the SDK applies that rule
    whatever audience it is asked to check.
    """
    _exchange_lenient_verify("ERROR_REASON_AUDIENCE_MISMATCH", _to_anyone)


def _custodian_ignores_not_yet_valid() -> None:
    """The custodian acts on statements issued in the future (no clock-skew bound)."""
    _lenient_verify(_custodian_ledger, "ERROR_REASON_STATEMENT_NOT_YET_VALID", _at_issue)


def _custodian_accepts_replay() -> None:
    """The replay guard never refuses: a statement sent twice is executed twice."""

    def check(self: Any, issuer: str, payload_type: str, sequence: int) -> None:
        return None

    _storage.SqlReplayGuard.check = check  # type: ignore[method-assign]


def _exchange_ignores_not_yet_valid() -> None:
    """RespondToMarginCall acts on a response issued in the future."""
    _exchange_lenient_verify("ERROR_REASON_STATEMENT_NOT_YET_VALID", _at_issue)


def _exchange_miscomputes_haircut() -> None:
    """The exchange counts every haircut a tenth too generously (factor * 1.1, at most 1)."""
    original = _exchange_valuation.value_collateral

    def value_collateral(policy: Any, positions: Any, prices: Any, **kwargs: Any) -> Any:
        generous = valuation_pb2.RiskPolicy()
        generous.CopyFrom(policy)
        for haircut in generous.haircuts:
            factor = min(Decimal(1), Decimal(haircut.collateral_factor.value) * Decimal("1.1"))
            haircut.collateral_factor.value = format(factor.normalize(), "f")
        return original(generous, positions, prices, **kwargs)

    # Valuing an account, and measuring top-ups against a margin call.
    _exchange_valuation.value_collateral = value_collateral
    _exchange_margin_calls.value_collateral = value_collateral


def _exchange_doubles_credit_limit() -> None:
    """The exchange grants twice the credit the leverage cap allows."""
    original = _exchange_valuation.credit_line_figures

    def credit_line_figures(policy: Any, valuation: Any, exposure: Any) -> Any:
        figures = original(policy, valuation, exposure)
        return dataclasses.replace(figures, credit_limit=figures.credit_limit * 2)

    _exchange_valuation.credit_line_figures = credit_line_figures


def _exchange_overstates_margin_calls() -> None:
    """The exchange calls for 10% more margin than its policy says is due."""
    original = _exchange_margin_calls.margin_call_amount

    def margin_call_amount(policy: Any, collateral_value: Any, exposure: Any) -> Any:
        amount = original(policy, collateral_value, exposure)
        return None if amount is None else (amount * Decimal("1.1")).quantize(amount)

    _exchange_margin_calls.margin_call_amount = margin_call_amount


def _wrong_status(reason_name: str, code_name: str) -> Callable[[], None]:
    def patch() -> None:
        """Answers one error reason with the wrong gRPC status code."""
        table = dict(errors.STATUS_BY_REASON)
        table[errors_pb2.ErrorReason.Value(reason_name)] = grpc.StatusCode[code_name]
        errors.STATUS_BY_REASON = table

    return patch


def _undecodable_request_unknown() -> None:
    """Request bytes that do not parse reach gRPC's deserializer raw: UNKNOWN, no details."""
    server: Any = _server_module
    server._never_raising = lambda deserializer: deserializer


def _integer_overflow_unchecked() -> None:
    """Integers above 2^63 - 1 go unchecked into storage, where they overflow (INTERNAL)."""
    server: Any = _server_module
    signing: Any = _signing_module
    server.check_integers = lambda message, prefix="": None
    signing.check_integers = lambda message, prefix="": None


def _custodian_rejects_forged_inner_statement() -> None:
    """A risk policy on the stream that does not verify is recorded as rejected, its batch acked."""
    stream = _custodian_exchange_stream.ExchangeStream
    original = stream._on_risk_policy

    def on_risk_policy(self: Any, exchange: str, sequence: int, envelope: Any, now: Any) -> None:
        try:
            original(self, exchange, sequence, envelope, now)
        except VerificationError as err:
            with self._or_rejected(exchange, sequence, "risk_policy", envelope, now):
                raise err from None

    stream._on_risk_policy = on_risk_policy


def _custodian_accepts_third_party_statements() -> None:
    """Statements on the exchange's stream are acted on whoever of the registry issued them."""

    def from_peer(self: Any, exchange: str, envelope: Any, expected_type: Any, now: Any) -> Any:
        ledger = self._ledger
        verified = ledger._verify(envelope, expected_type, now, on_stream=True)
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)
        return verified

    _custodian_exchange_stream.ExchangeStream._from_peer = from_peer


def _custodian_waits_forever_for_hello() -> None:
    """A stream that never says hello is held open (and a dead peer noticed late)."""
    session: Any = _session_module
    session.LIVENESS_INTERVALS = 1_000


def _drops_error_info() -> None:
    """Errors carry a status code and message but no ErrorInfo (reason) in their details."""
    original = errors.error_to_status

    def error_to_status(error: errors.CollateralSyncError) -> Any:
        status = original(error)
        del status.details[:]
        return status

    errors.error_to_status = error_to_status


def _drops_field_violations() -> None:
    """Error details keep ErrorInfo but lose the BadRequest naming the offending field."""
    original = errors.error_to_status

    def error_to_status(error: errors.CollateralSyncError) -> Any:
        error.field_violations = {}
        return original(error)

    errors.error_to_status = error_to_status


# -- the position-sync stream: the SDK's session class as the server runs it


def _custodian_session(session: Any) -> bool:
    return bool(session.log.sending_direction == CUSTODIAN_TO_EXCHANGE)


def _exchange_session(session: Any) -> bool:
    return bool(session.log.sending_direction == EXCHANGE_TO_CUSTODIAN)


def _ignores_window(is_side: Callable[[Any], bool]) -> Callable[[], None]:
    def patch() -> None:
        """The party sends as if its peer's window were unlimited."""
        original = _sync_session.SyncSession._accept_hello

        def accept_hello(self: Any, frame: Any) -> None:
            original(self, frame)
            if is_side(self):
                self._peer_window = 2**31

        _sync_session.SyncSession._accept_hello = accept_hello

    return patch


def _custodian_misses_heartbeats() -> None:
    """The custodian announces a heartbeat interval a twentieth of the one it keeps."""
    original = _sync_session.SyncSession._own_hello

    def own_hello(self: Any) -> Any:
        frame = original(self)
        if _custodian_session(self):
            frame.hello.heartbeat_interval_ms = max(1, frame.hello.heartbeat_interval_ms // 20)
        return frame

    _sync_session.SyncSession._own_hello = own_hello


def _hello_names_another_party(is_side: Callable[[Any], bool]) -> Callable[[], None]:
    def patch() -> None:
        """The party's hello names a party other than itself."""
        original = _sync_session.SyncSession._own_hello

        def own_hello(self: Any) -> Any:
            frame = original(self)
            if is_side(self):
                frame.hello.party_id = f"not-{frame.hello.party_id}"
            return frame

        _sync_session.SyncSession._own_hello = own_hello

    return patch


def _custodian_replays_from_start() -> None:
    """On a resume the custodian sends its whole log again, ignoring the exchange's received head."""
    original = _sync_session.SyncSession._accept_hello

    def accept_hello(self: Any, frame: Any) -> None:
        original(self, frame)
        if _custodian_session(self):
            self._sent = 0
            self._sent_hash = ZERO_HASH

    _sync_session.SyncSession._accept_hello = accept_hello


def _custodian_misattests_sync_change() -> None:
    """Holdings changes on the stream point at the wrong leaf of the attestation log."""
    original = _custodian_ledger.Ledger._announce

    def announce(self: Any, exchange: str, *updates: position_sync_pb2.PositionUpdate) -> None:
        for update in updates:
            if update.WhichOneof("update") == "holdings_change":
                ref = update.holdings_change.attestation
                ref.leaf_index = ref.leaf_index - 1 if ref.leaf_index else ref.leaf_index + 1
        original(self, exchange, *updates)

    _custodian_ledger.Ledger._announce = announce


def _custodian_loses_last_entry_on_restart() -> None:
    """At every start the custodian's log towards the exchange loses its last entry.

    As if the entry had been acknowledged before it was durable: the exchange
    never learns the change it carried (and the next change reuses its sequence).
    """
    original = _sync_log.SyncLog.__init__

    def init(self: Any, connection: Any, *args: Any, **kwargs: Any) -> None:
        original(self, connection, *args, **kwargs)
        if self.sending_direction == CUSTODIAN_TO_EXCHANGE:
            head = self.sent_head().sequence
            with connection:
                connection.execute(
                    "DELETE FROM sync_outgoing WHERE peer_party_id = ? AND direction = ? "
                    "AND sequence = ?",
                    (self.peer_party_id, self.sending_direction, head),
                )

    _sync_log.SyncLog.__init__ = init  # type: ignore[method-assign]


def _custodian_forged_batch_as_malformed() -> None:
    """A sync batch with a bad signature is refused, but as MALFORMED, not UNAUTHENTICATED."""
    original = _sync_session.verify_sync_batch

    def verify_sync_batch(envelope: Any, registry: Any, **kwargs: Any) -> Any:
        try:
            return original(envelope, registry, **kwargs)
        except VerificationError as err:
            if err.reason != errors_pb2.ERROR_REASON_SIGNATURE_INVALID:
                raise
            raise errors.MalformedError(err.message, metadata=err.metadata) from err

    _sync_session.verify_sync_batch = verify_sync_batch


def _refuses_old_batches(receiving: int) -> Callable[[], None]:
    def patch() -> None:
        """Any batch at or below the stored head is refused as a replay: no duplicates acked."""
        original = _sync_log.SyncLog.accept_batch

        def accept_batch(self: Any, batch: Any, apply: Any, *, now: Any) -> Any:
            head = self.received_head().sequence
            if batch.direction == receiving and batch.first_sequence <= head:
                raise VerificationError(
                    f"batch from {batch.first_sequence}, expected > {head}",
                    reason=errors_pb2.ERROR_REASON_REPLAYED,
                    metadata={"expected": f"> {head}", "actual": str(batch.first_sequence)},
                )
            return original(self, batch, apply, now=now)

        _sync_log.SyncLog.accept_batch = accept_batch  # type: ignore[method-assign]

    return patch


def _custodian_equivocation_as_gap() -> None:
    """Equivocation is refused, but reported as a sequence gap (OUT_OF_RANGE)."""
    original = _sync_log.SyncLog.accept_batch

    def accept_batch(self: Any, batch: Any, apply: Any, *, now: Any) -> Any:
        try:
            return original(self, batch, apply, now=now)
        except errors.CollateralSyncError as err:
            if err.reason != errors_pb2.ERROR_REASON_EQUIVOCATION:
                raise
            raise errors.CollateralSyncError(
                err.message, reason=errors_pb2.ERROR_REASON_SEQUENCE_GAP, metadata=err.metadata
            ) from err

    _sync_log.SyncLog.accept_batch = accept_batch  # type: ignore[method-assign]


def _custodian_release_on_any_signature() -> None:
    """An emergency release is executed on any one signature: the 2-of-3 threshold is not kept."""
    original = _custodian_emergency.verify_threshold

    def verify_threshold(envelope: Any, registry: Any, **kwargs: Any) -> Any:
        kwargs["threshold"] = 1
        return original(envelope, registry, **kwargs)

    def counted_parties(self: Any, verified: Any, exchange_id: str) -> set[str]:
        # The account's exchange counted as present: no wait, no count.
        return {*verified.signer_party_ids, exchange_id}

    _custodian_emergency.verify_threshold = verify_threshold
    _custodian_emergency.CustodianEmergencyRelease._counted_parties = counted_parties


def _custodian_no_cycle_cap() -> None:
    """Settlement cycles are not capped per day: the policy's limit reads as a thousand."""
    original = _custodian_settlement.CustodianSettlement._limits

    def limits(self: Any, exchange_id: str) -> tuple[int, Any]:
        _, window = original(self, exchange_id)
        return 1000, window

    _custodian_settlement.CustodianSettlement._limits = limits


def _custodian_executes_disputed() -> None:
    """Disputed settlements are executed too once their deadline passes."""
    settlement = _custodian_settlement.CustodianSettlement
    original = settlement.run_due

    def run_due(self: Any) -> None:
        original(self)
        now = self._ledger.clock.now()
        rows = self._db.execute(
            "SELECT settlement_id FROM custodian_settlements "
            "WHERE status = ? AND dispute_deadline_us <= ?",
            (reconciliation_pb2.SETTLEMENT_STATUS_DISPUTED, _custodian_settlement.to_us(now)),
        ).fetchall()
        for (settlement_id,) in rows:
            found = self._row(settlement_id)
            if found is not None:
                self._execute(found, now)

    settlement.run_due = run_due


def _cosigns_twice() -> None:
    """The custodian co-signs a release it already signed: it forgets whose signatures are on it."""
    original = _cosigner.check_release_signatures

    def check_release_signatures(envelope: Any, registry: Any, issued_at: Any) -> list[str]:
        original(envelope, registry, issued_at)
        return []

    def add_signature(envelope: Any, signer: Any, **_: Any) -> Any:
        # The SDK's add_signature would refuse a second signature by the same key.
        signed = type(envelope)()
        signed.CopyFrom(envelope)
        signed.signatures.add(
            key_id=signer.key_id,
            sig=signer.sign(_cosigner.pae(envelope.payload_type, envelope.payload)),
        )
        return signed

    _cosigner.check_release_signatures = check_release_signatures
    _cosigner.add_signature = add_signature


def _regulator_ignores_audience() -> None:
    """The regulator keeps reconciliation statements addressed to another party."""
    _lenient_verify(_regulator, "ERROR_REASON_AUDIENCE_MISMATCH", _to_anyone)


def _regulator_accepts_any_party() -> None:
    """The regulator keeps statements of any registered custodian or exchange, overseen or not."""
    role = _regulator.RegulatorRole
    original = role._verify

    def verify(self: Any, envelope: Any) -> Any:
        try:
            return original(self, envelope)
        except VerificationError as err:
            if "this regulator reconciles" not in err.message:
                raise
        statement = reconciliation_pb2.ReconciliationStatement.FromString(envelope.payload)
        overseen = self._parties
        self._parties = {**overseen, statement.party_role: statement.header.issuer}
        try:
            return original(self, envelope)
        finally:
            self._parties = overseen

    role._verify = verify


def _regulator_check_cutoff(field: str) -> Callable[[], None]:
    def patch() -> None:
        """The regulator does not hold a statement to one rule of its cut-off."""
        role = _regulator.RegulatorRole
        original = role._check_cutoff

        def check_cutoff(statement: Any) -> None:
            lenient = type(statement).FromString(statement.SerializeToString())
            stated = lenient.cutoff_time.ToDatetime(tzinfo=UTC)
            if field == "cutoff_id":
                lenient.cutoff_id = stated.strftime("%Y-%m-%dT%H:%M:%SZ")
            else:
                lenient.header.issued_at.CopyFrom(lenient.cutoff_time)
            original(lenient)

        role._check_cutoff = staticmethod(check_cutoff)

    return patch


def _regulator_ignores_sync_heads() -> None:
    """The regulator compares positions and totals but not the sync log heads."""
    original = _regulator.reconcile

    async def reconcile(custodian: Any, exchange: Any, *args: Any) -> Any:
        exchange = type(exchange).FromString(exchange.SerializeToString())
        del exchange.sync_log_heads[:]
        exchange.sync_log_heads.extend(custodian.sync_log_heads)
        return await original(custodian, exchange, *args)

    _regulator.reconcile = reconcile


def _regulator_drops_one_sided_accounts() -> None:
    """The regulator's result leaves out accounts and assets present on one side only."""
    original = _regulator.reconcile

    async def reconcile(custodian: Any, exchange: Any, *args: Any, **kwargs: Any) -> Any:
        found = await original(custodian, exchange, *args, **kwargs)
        kept = tuple(b for b in found.breaks if b.field != reconciliation_pb2.BREAK_FIELD_MISSING)
        return dataclasses.replace(found, breaks=kept)

    _regulator.reconcile = reconcile


def _regulator_reads_every_account() -> None:
    """Before descending, the regulator reads every account of both trees (right, but O(n))."""
    original = _regulator.reconcile
    request_type = reconciliation_service_pb2.GetPositionTreeNodesRequest

    async def read_all(source: Any, statement: Any) -> None:
        count = statement.account_count
        for start in range(0, count, 4096):
            indexes = range(start, min(count, start + 4096))
            await source(request_type(cutoff_id=statement.cutoff_id, account_leaf_indexes=indexes))

    async def reconcile(
        custodian: Any, exchange: Any, custodian_nodes: Any, exchange_nodes: Any, **kwargs: Any
    ) -> Any:
        if custodian.positions_root != exchange.positions_root:
            await read_all(custodian_nodes, custodian)
            await read_all(exchange_nodes, exchange)
        return await original(custodian, exchange, custodian_nodes, exchange_nodes, **kwargs)

    _regulator.reconcile = reconcile


# -- who may read what at the exchange (PROTOCOL.md §4.5)


def _exchange_reads_for_any_registered_party() -> None:
    """Any registered party reads any account's credit line, margin calls and liquidations."""
    _exchange_servicers.require_reader = lambda caller, readers, *, field: None


def _exchange_serves_strangers() -> None:
    """No access control at all: any certificate from the CA reads any account (the v1 bug)."""
    _exchange_reads_for_any_registered_party()
    _access.AccessInterceptor._check = lambda self, context: None


def _exchange_unknown_account_not_found_to_all() -> None:
    """An account the exchange does not know is NOT_FOUND to anyone: existence leaks."""
    original = _access.require_reader

    def require_reader(caller: Any, readers: Any, *, field: str) -> None:
        if readers is not None:
            original(caller, readers, field=field)

    _exchange_servicers.require_reader = require_reader


def _exchange_account_hidden_from_its_client() -> None:
    """Only the custodian reads an account's data at the exchange: its own client is refused."""
    holdings = _exchange_holdings.AttestedHoldings

    def readers_of_account(self: Any, account_id: str) -> Any:
        latest = self._store.holdings.latest(account_id)
        if latest is None:
            return None
        return frozenset({HoldingsStatement.FromString(latest.envelope.payload).header.issuer})

    holdings.readers_of_account = readers_of_account


def _exchange_regulator_reads_nothing() -> None:
    """A regulator is treated like any other party: it reads no account it is not named on."""
    _access.Caller.reads_everything = property(lambda self: not self.checked)


# -- the exchange with a custodian that tells it things (the kit's own, --listen)


def _exchange_credits_without_proving() -> None:
    """Holdings statements are credited once their signature verifies: no inclusion proof."""

    async def check(self: Any, row: Any, refresh_error: Any) -> None:
        return None

    _exchange_attest.AttestationChecker._check = check


def _exchange_trusts_inclusion_proof_size() -> None:
    """An inclusion proof is checked against the checkpoint's root at the proof's own
    tree_size, which is never compared with the checkpoint's."""

    def verify(proof: Any, leaf: bytes, checkpoint: Any) -> None:
        _merkle_module.verify_inclusion(
            _merkle_module.leaf_hash(leaf),
            proof.leaf_index,
            proof.tree_size,
            proof.audit_path,
            checkpoint.root_hash,
        )

    _exchange_attest.verify_inclusion_proof = verify


def _exchange_trusts_consistency_proof_sizes() -> None:
    """A consistency proof is checked between the checkpoints' roots at the proof's own
    sizes, which are never compared with the checkpoints'."""

    def verify(proof: Any, first: Any, second: Any) -> None:
        if first.origin != second.origin:
            raise errors.ProofError("checkpoints come from different logs")
        _merkle_module.verify_consistency(
            proof.first_tree_size,
            proof.second_tree_size,
            proof.consistency_path,
            first.root_hash,
            second.root_hash,
        )

    _sdk_attestation.verify_consistency_proof = verify


def _exchange_ignores_checkpoint_origin() -> None:
    """Any checkpoint the custodian signs is taken for its log's, whatever origin it names."""
    original = _exchange_attest.verify_checkpoint

    def verify(envelope: Any, registry: Any, *, origin: str, **kwargs: Any) -> Any:
        named = Checkpoint.FromString(envelope.payload).origin
        checkpoint = original(envelope, registry, origin=named, **kwargs)
        checkpoint.origin = origin
        return checkpoint

    _exchange_attest.verify_checkpoint = verify


def _exchange_ignores_partial_agreement() -> None:
    """A partially agreed call still needs the whole call amount to be satisfied."""
    original = _exchange_margin_calls.amount_due
    partial = margin_pb2.MARGIN_CALL_STATUS_PARTIALLY_AGREED

    def amount_due(status: int, call_amount: Decimal, agreed_amount: Decimal) -> Decimal:
        if status == partial:
            return call_amount
        return Decimal(original(status, call_amount, agreed_amount))

    _exchange_margin_calls.amount_due = amount_due


def _exchange_expires_disputed_calls() -> None:
    """Disputed calls expire at their due_by like any open call (and lead to a liquidation)."""
    _exchange_revaluation.EXPIRING = frozenset(
        {*_exchange_revaluation.EXPIRING, margin_pb2.MARGIN_CALL_STATUS_DISPUTED}
    )


def _exchange_never_liquidates_expired_calls() -> None:
    """An expired call is marked EXPIRED, but no liquidation is instructed for it."""
    original = _exchange_liquidation.Liquidations.instruct

    def instruct(self: Any, account_id: str, valued: Any, call: Any, now: Any) -> str:
        if call is not None:
            return ""
        return str(original(self, account_id, valued, call, now))

    _exchange_liquidation.Liquidations.instruct = instruct


def _exchange_shifts_due_by(shift: Callable[[int], int]) -> None:
    """The exchange decides a call's expiry by ``shift(due_by_ns)``; the signed due_by is untouched."""
    table = _exchange_margin_store.MarginCallTable
    original = table.of_account

    def of_account(self: Any, account_id: str, **kwargs: Any) -> list[Any]:
        rows = original(self, account_id, **kwargs)
        return [dataclasses.replace(row, due_by_ns=shift(row.due_by_ns)) for row in rows]

    table.of_account = of_account


_DAY_NS = 86_400 * 10**9


def _exchange_expires_calls_on_due_date() -> None:
    """A daily batch expires every open call due today: from 00:00 UTC of its due date on."""
    _exchange_shifts_due_by(lambda due_ns: due_ns - due_ns % _DAY_NS)


def _exchange_expires_calls_a_minute_late() -> None:
    """An open call expires a minute after its due_by (a grace the protocol does not have)."""
    _exchange_shifts_due_by(lambda due_ns: due_ns + 60 * 10**9)


def _exchange_policy_versions_off_by_one() -> None:
    """GetRiskPolicy(version=v) looks up version v + 1 (0 still means the policy in force)."""
    original = _exchange_risk_policy.RiskPolicies.risk_policy

    def risk_policy(self: Any, version: int) -> Any:
        return original(self, version + 1 if version else 0)

    _exchange_risk_policy.RiskPolicies.risk_policy = risk_policy


def _exchange_policy_signature_broken() -> None:
    """GetRiskPolicy serves the policy with its signature bytes damaged (signed, then changed)."""
    original = _exchange_risk_policy.RiskPolicies.risk_policy

    def risk_policy(self: Any, version: int) -> Any:
        envelope = type(original(self, version))()
        envelope.CopyFrom(original(self, version))
        signature = bytearray(envelope.signatures[0].sig)
        signature[0] ^= 0x01
        envelope.signatures[0].sig = bytes(signature)
        return envelope

    _exchange_risk_policy.RiskPolicies.risk_policy = risk_policy


def _exchange_serves_stale_credit_lines() -> None:
    """GetCreditLine serves the stored credit line as it is, never re-signed: once the
    account's figures stop changing, it is served after it expired."""

    def credit_line(self: Any, account_id: str) -> Any:
        account = self._store.accounts.get(account_id)
        if account is None or account.credit_line is None:
            raise errors.StateError(
                f"no credit line for account {account_id!r}",
                reason=errors_pb2.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "an account with a credit line", "actual": account_id},
            )
        return account.credit_line

    _exchange_credit_lines.CreditLines.credit_line = credit_line


def _exchange_serves_stale_call_states() -> None:
    """GetMarginCall and ListMarginCalls serve each call's stored state as it is, never
    re-signed: the state of a call that has ended is served after it expired."""

    def fresh_state(self: Any, call: Any) -> Any:
        return call.state_envelope

    _exchange_margin_calls.MarginCalls._fresh_state = fresh_state


def _exchange_resigns_policy_as_new() -> None:
    """A risk policy with less than half its lifetime left is re-signed as if published
    again: the same version, but ``effective_from`` moved to the time of re-signing."""
    policies = _exchange_risk_policy.RiskPolicies

    def refreshed(self: Any, version: int, envelope: Any, now: datetime) -> Any:
        ttl = self._settings.policy_ttl
        if not _exchange_risk_policy.is_stale(envelope, valuation_pb2.RiskPolicy, ttl, now):
            return envelope
        policy = valuation_pb2.RiskPolicy.FromString(envelope.payload)
        policy.ClearField("header")
        policy.effective_from.FromDatetime(now)
        resigned = self._context.sign(
            policy, audience=[_exchange_risk_policy.ANYONE], ttl=ttl, now=now
        )
        self._store.policies.replace_envelope(version, resigned)
        return resigned

    policies._refreshed = refreshed


def _exchange_lists_calls_not_states() -> None:
    """ListMarginCalls answers each call's signed MarginCall instead of its MarginCallState."""
    original = _exchange_margin_calls.MarginCalls.list_margin_calls

    def list_margin_calls(self: Any, account_id: str, page_size: int, page_token: str) -> Any:
        states, token = original(self, account_id, page_size, page_token)
        calls = [margin_pb2.MarginCallState.FromString(e.payload).margin_call for e in states]
        return calls, token

    _exchange_margin_calls.MarginCalls.list_margin_calls = list_margin_calls


def _exchange_call_pages_short_by(missing: int) -> Callable[[], None]:
    """ListMarginCalls fetches ``page_size + 1 - missing`` rows to fill a page of
    ``page_size`` (the only read of margin calls with a ``limit``): 1 fetches exactly
    ``page_size`` rows, so that it never sees a row beyond the page and never issues a
    next_page_token; 2 fetches one row fewer still, so that pages are short as well (a
    page of 1 is empty) and the listing ends early."""

    def patch() -> None:
        table = _exchange_margin_store.MarginCallTable
        original = table.of_account

        def of_account(self: Any, account_id: str, *, after_seq: int = 0, limit: int = -1) -> Any:
            if limit >= 0:
                limit = max(limit - missing, 0)
            return original(self, account_id, after_seq=after_seq, limit=limit)

        table.of_account = of_account

    return patch


def _exchange_sync_error_as(reason_name: str, into: Callable[[Any], Exception]) -> None:
    """The exchange refuses a custodian batch for ``reason_name``, but reports ``into(err)``."""
    reason = errors_pb2.ErrorReason.Value(reason_name)
    original_verify = _sync_session.verify_sync_batch
    original_accept = _sync_log.SyncLog.accept_batch

    def verify_sync_batch(envelope: Any, registry: Any, **kwargs: Any) -> Any:
        try:
            return original_verify(envelope, registry, **kwargs)
        except errors.CollateralSyncError as err:
            if err.reason != reason or kwargs.get("direction") != CUSTODIAN_TO_EXCHANGE:
                raise
            raise into(err) from err

    def accept_batch(self: Any, batch: Any, apply: Any, *, now: Any) -> Any:
        try:
            return original_accept(self, batch, apply, now=now)
        except errors.CollateralSyncError as err:
            if err.reason != reason or batch.direction != CUSTODIAN_TO_EXCHANGE:
                raise
            raise into(err) from err

    _sync_session.verify_sync_batch = verify_sync_batch
    _sync_log.SyncLog.accept_batch = accept_batch  # type: ignore[method-assign]


def _exchange_gap_as_malformed() -> None:
    """A sequence gap in the custodian's log is refused, but as MALFORMED."""
    _exchange_sync_error_as(
        "ERROR_REASON_SEQUENCE_GAP", lambda err: errors.MalformedError(err.message)
    )


def _exchange_key_role_as_signature_invalid() -> None:
    """A batch signed by a non-custodian key is refused, but as SIGNATURE_INVALID."""
    _exchange_sync_error_as(
        "ERROR_REASON_KEY_ROLE_MISMATCH",
        lambda err: VerificationError(
            err.message, reason=errors_pb2.ERROR_REASON_SIGNATURE_INVALID
        ),
    )


def _exchange_under_reports_received_head() -> None:
    """The exchange's hello claims one entry less of the custodian's log than it stored."""
    original = _sync_session.SyncSession._own_hello

    def own_hello(self: Any) -> Any:
        frame = original(self)
        hello = frame.hello
        if _exchange_session(self) and hello.received_sequence > 0:
            previous = hello.received_sequence - 1
            entry = self.log.received_entry(previous) if previous else None
            hello.received_sequence = previous
            hello.received_entry_hash = ZERO_HASH if entry is None else entry.entry_hash
        return frame

    _sync_session.SyncSession._own_hello = own_hello


def _regulator_results_on_first_statement() -> None:
    """The regulator answers a first statement with something in reconciliation_result."""
    original = _regulator.RegulatorRole.submit

    async def submit(self: Any, envelope: Any) -> Any:
        result = await original(self, envelope)
        return envelope if result is None else result

    _regulator.RegulatorRole.submit = submit


def _regulator_flags_agreeing_views() -> None:
    """The regulator reports a break in every non-empty cut-off, even when both views agree."""
    original = _regulator.reconcile

    async def reconcile(custodian: Any, exchange: Any, *args: Any, **kwargs: Any) -> Any:
        found = await original(custodian, exchange, *args, **kwargs)
        if found.breaks or custodian.account_count == 0:
            return found
        spurious = reconciliation_pb2.ReconciliationBreak(
            account_id="", asset_id="", field=reconciliation_pb2.BREAK_FIELD_QUANTITY
        )
        return dataclasses.replace(found, breaks=(spurious,))

    _regulator.reconcile = reconcile


def _regulator_result_not_public() -> None:
    """Reconciliation results are addressed to the custodian only, not to everyone."""
    original = _regulator.sign_statement

    def sign_statement(message: Any, signer: Any, **kwargs: Any) -> Any:
        if isinstance(message, reconciliation_pb2.ReconciliationResult):
            custodian = reconciliation_pb2.ReconciliationStatement.FromString(
                message.custodian_statement.payload
            )
            kwargs["audience"] = [custodian.header.issuer]
        return original(message, signer, **kwargs)

    _regulator.sign_statement = sign_statement


def _parses_before_verifying() -> None:
    """Statement payloads are parsed before any signature is checked: bytes that do not
    parse are MALFORMED whether or not a signature verifies them (§3.6 b before c)."""
    original = _signing_module._verify_signatures

    def verify_signatures(envelope: Any, registry: Any, row: Any, max_payload_bytes: int) -> Any:
        if envelope.payload_type == row.payload_type:
            try:
                row.message_class().ParseFromString(envelope.payload)
            except DecodeError as err:
                raise MalformedError(
                    f"payload does not parse as {row.message_class.__name__}: {err}",
                    metadata={"expected": row.message_class.__name__, "actual": "undecodable"},
                ) from err
        return original(envelope, registry, row, max_payload_bytes)

    _signing_module._verify_signatures = verify_signatures


#: The order L of the Ed25519 base point.
_GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493


def _reduces_signature_scalar() -> None:
    """The verifier reduces a signature's scalar S modulo L before checking it, so S + L
    verifies as S does: signatures are malleable (§3.3, RFC 8032 §5.1.7 step 1)."""
    registry = _keys_module.KeyRegistry
    original = registry.verify_signature

    def verify_signature(self: Any, key_id: str, data: bytes, signature: bytes) -> bool:
        if len(signature) == 64:
            scalar = int.from_bytes(signature[32:], "little") % _GROUP_ORDER
            signature = signature[:32] + scalar.to_bytes(32, "little")
        return bool(original(self, key_id, data, signature))

    registry.verify_signature = verify_signature  # type: ignore[method-assign]


def _custodian_release_issuer_unchecked() -> None:
    """An emergency release counts its signers, but whether its issuer is one of them is
    never asked (§3.7 step 4): any two parties may put a third's name on it."""
    sdk = _signing_module

    def verify_threshold(
        envelope: Any,
        registry: Any,
        *,
        expected_type: Any,
        threshold: int,
        roles: Any,
        audience: str,
        now: Any,
        max_skew: Any = sdk.DEFAULT_MAX_SKEW,
        replay_guard: Any = None,
        max_payload_bytes: int = sdk.MAX_PAYLOAD_BYTES,
    ) -> Any:
        row = sdk.statement_type_of(expected_type)
        payload, verified = sdk._verify_signatures(envelope, registry, row, max_payload_bytes)
        message = sdk._parse(row, payload)
        counted: dict[str, str] = {}
        for kid in verified:
            try:
                key = registry.resolve(kid, at=message.header.issued_at, roles=roles)
            except VerificationError:
                continue
            counted.setdefault(key.party_id, kid)
        if len(counted) < threshold:
            raise VerificationError(
                f"valid signatures from {len(counted)} distinct parties, expected {threshold}",
                reason=errors_pb2.ERROR_REASON_THRESHOLD_NOT_MET,
                metadata={"expected": str(threshold), "actual": str(len(counted))},
            )
        return sdk._accept(
            envelope,
            row,
            payload,
            message,
            signers=[(kid, party) for party, kid in counted.items()],
            audience=audience,
            now=now,
            max_skew=max_skew,
            replay_guard=replay_guard,
        )

    _custodian_emergency.verify_threshold = verify_threshold


def _custodian_release_wait_rewritten(
    rewrite: Callable[[Any], None],
) -> Callable[[], None]:
    def patch() -> None:
        """The wait of a release without the exchange is judged on a rewritten copy."""
        release_class = _custodian_emergency.CustodianEmergencyRelease
        original = release_class._check_wait

        def check_wait(self: Any, release: Any, now: Any) -> None:
            judged = emergency_pb2.EmergencyRelease()
            judged.CopyFrom(release)
            rewrite(judged)
            original(self, judged, now)

        release_class._check_wait = check_wait

    return patch


def _any_reason(release: Any) -> None:
    """Regulator and custodian alone may release for any reason, not only EXCHANGE_FAILURE."""
    release.reason = emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE


def _unset_since_as_epoch(release: Any) -> None:
    """An unset exchange_unresponsive_since reads as 1970-01-01: the wait has long passed."""
    if not release.HasField("exchange_unresponsive_since"):
        release.exchange_unresponsive_since.SetInParent()


def _regulator_ignores_party_role() -> None:
    """The regulator files a statement under the party_role it states without comparing it
    with the issuing key's role (§10.2): a custodian may state the exchange's view."""
    role = _regulator.RegulatorRole
    original = role._verify

    def verify(self: Any, envelope: Any) -> Any:
        try:
            return original(self, envelope)
        except VerificationError as err:
            if not err.message.startswith("party_role:"):
                raise
        verified = _regulator.verify_statement(
            envelope,
            self.context.registry,
            expected_type=reconciliation_pb2.ReconciliationStatement,
            audience=self.context.party_id,
            now=self.context.clock.now(),
            max_skew=self.context.config.max_skew,
            replay_guard=self._guard,
        )
        # Every other rule still holds: the issuer is the party overseen in its key's role.
        key = self.context.registry.get(verified.signer_key_ids[0])
        if key is None or verified.issuer != self._parties.get(key.role):
            raise VerificationError(
                f"this regulator does not reconcile {verified.issuer!r}",
                reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
            )
        self._check_cutoff(verified.message)
        return verified

    role._verify = verify


def _exchange_unknown_response_kind_as_dispute() -> None:
    """A margin-call response of a kind the exchange does not know is taken for a DISPUTE,
    not read as UNSPECIFIED (§1.3) and refused."""
    original = _exchange_margin.check_response_shape
    kinds = margin_pb2.MarginCallResponseKind

    def check_response_shape(response: Any) -> Any:
        if response.kind in kinds.values():
            return original(response)
        as_dispute = margin_pb2.MarginCallResponse()
        as_dispute.CopyFrom(response)
        as_dispute.kind = kinds.Value("MARGIN_CALL_RESPONSE_KIND_DISPUTE")
        return original(as_dispute)

    # judge_response (margin) checks the shape, and so does the servicer's path (margin_calls).
    _exchange_margin.check_response_shape = check_response_shape
    _exchange_margin_calls.check_response_shape = check_response_shape


# -- the equivocation evidence a party keeps (PROTOCOL.md §10.7)


def _serves_no_evidence() -> None:
    """Equivocations are refused, but ListEquivocationEvidence always answers an empty list."""
    _kept_evidence.KeptEvidence.all = lambda self: []


def _keeps_first_statement_only() -> None:
    """Each item of evidence is served with the statement accepted first, not the other one."""
    original = _kept_evidence.KeptEvidence.all

    def every(self: Any) -> list[Any]:
        items = original(self)
        for item in items:
            item.ClearField("second")
        return items

    _kept_evidence.KeptEvidence.all = every


def _serves_evidence_to_anyone() -> None:
    """Any registered party reads the evidence, the party it accuses included."""
    _kept_evidence.require_regulator = lambda caller, *, what: None


def _exchange_values_holdings_pledged_elsewhere() -> None:
    """The exchange values an account's credited holdings whatever exchange they are pledged
    to: their exchange_id is not compared with its own party id (§7.2)."""
    valuer = _exchange_valuation.Valuer
    original = valuer.value

    class _PledgedHere:
        """The exchange's context, but with the party id the holdings name."""

        def __init__(self, context: Any, party_id: str) -> None:
            self._context = context
            self.party_id = party_id

        def __getattr__(self, name: str) -> Any:
            return getattr(self._context, name)

    def value(self: Any, account_id: str, now: Any) -> Any:
        holdings = self._holdings.credited_holdings(account_id)
        if holdings is None:
            return original(self, account_id, now)
        pledged_to = HoldingsStatement.FromString(holdings.envelope.payload).exchange_id
        context = self._context
        self._context = _PledgedHere(context, pledged_to)
        try:
            return original(self, account_id, now)
        finally:
            self._context = context

    valuer.value = value


def _exchange_satisfies_only_above_amount_due() -> None:
    """A margin call is satisfied by a top-up worth more than the amount due, not by one worth
    exactly that amount (§8.4: satisfied_amount >= the amount due)."""
    original = _exchange_margin_calls.amount_due

    def amount_due(status: int, call_amount: Decimal, agreed_amount: Decimal) -> Decimal:
        # Figures have at most 18 fraction digits: ">= due + 1e-18" is "> due".
        return Decimal(original(status, call_amount, agreed_amount)) + Decimal("1e-18")

    _exchange_margin_calls.amount_due = amount_due


def _exchange_satisfied_amount_only_rises() -> None:
    """A call's satisfied_amount is published when a top-up raises it, but not when later
    holdings lower it: the call keeps its highest figure (§8.4: it is that of the latest)."""
    calls = _exchange_margin_calls.MarginCalls
    original = calls.set_status

    def set_status(self: Any, call: Any, status: int, now: Any, **kwargs: Any) -> Any:
        satisfied = kwargs.get("satisfied_amount")
        if status == call.status and satisfied is not None and satisfied < call.satisfied_amount:
            return call.state_envelope
        return original(self, call, status, now, **kwargs)

    calls.set_status = set_status


def _replay_check_on_reused_liquidation_id(ledger: Any, envelope: Any) -> None:
    """Stage g first for an instruction reusing an executed id with other bytes (REPLAYED)."""
    message = liquidation_pb2.LiquidationInstruction.FromString(envelope.payload)
    executed = ledger.store.liquidation(message.liquidation_id) if message.liquidation_id else None
    if executed is not None and executed.instruction_payload != envelope.payload:
        header = message.header
        ledger.guard.check(header.issuer, envelope.payload_type, header.sequence)


def _custodian_stream_replays_reused_id() -> None:
    """On the stream only, stage g before the id: a liquidation instruction reusing a used id
    under an already-used sequence fails its batch as REPLAYED (blocking the stream) instead of
    being recorded as a rejected update (§6.5, §12.4). The RPC path is left right."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._check_instruction

    def check_instruction(self: Any, envelope: Any, now: Any, **kwargs: Any) -> Any:
        if kwargs.get("on_stream"):
            _replay_check_on_reused_liquidation_id(self._ledger, envelope)
        return original(self, envelope, now, **kwargs)

    liquidations._check_instruction = check_instruction


def _custodian_replay_before_reused_id() -> None:
    """Stage g before the id (§12.4 steps 3, 4): a liquidation or settlement instruction
    reusing a used id under an already-used sequence is refused REPLAYED, not STATE_CONFLICT."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._check_instruction

    def check_instruction(self: Any, envelope: Any, now: Any, **kwargs: Any) -> Any:
        _replay_check_on_reused_liquidation_id(self._ledger, envelope)
        return original(self, envelope, now, **kwargs)

    liquidations._check_instruction = check_instruction

    settlement = _custodian_settlement.CustodianSettlement
    submit = settlement.submit

    def submit_replay_first(self: Any, envelope: Any) -> Any:
        message = reconciliation_pb2.SettlementInstruction.FromString(envelope.payload)
        existing = self._row(message.settlement_id)
        if existing is not None and existing.payload != envelope.payload:
            header = message.header
            self._ledger.guard.check(header.issuer, envelope.payload_type, header.sequence)
        return submit(self, envelope)

    settlement.submit = submit_replay_first


def _custodian_sells_at_zero_price() -> None:
    """A quote of 0 is taken for the smallest price there is (10^-18): a step whose asset is
    quoted at 0 is sold in full for nothing (§9.3 passes it over)."""
    original = _custodian_liquidations._snapshot_prices

    def snapshot_prices(envelope: Any) -> dict[str, Decimal]:
        return {
            asset: price if price > 0 else Decimal("1e-18")
            for asset, price in original(envelope).items()
        }

    _custodian_liquidations._snapshot_prices = snapshot_prices


def _custodian_answers_expired_repeats() -> None:
    """A settlement instruction's id is looked up before the statement is verified: the same
    bytes again get the recorded answer even once they have expired (§12.4 step 1)."""
    settlement = _custodian_settlement.CustodianSettlement
    original = settlement.submit

    def submit(self: Any, envelope: Any) -> Any:
        instruction = reconciliation_pb2.SettlementInstruction.FromString(envelope.payload)
        existing = self._row(instruction.settlement_id)
        if existing is not None and existing.payload == envelope.payload:
            return self._answer(existing.status, existing.dispute_deadline)
        return original(self, envelope)

    settlement.submit = submit


def _exchange_credits_negative_figures(*ignored: str) -> Callable[[], None]:
    """Holdings statements are checked for negative figures in every field but ``ignored``,
    where a negative is taken for nothing: the statement is credited and valued as if it
    said 0 there (§7.2) — all three fields, or the two an integrator forgot."""

    def as_nothing(positions: Any) -> list[Any]:
        cleared = []
        for position in positions:
            copy = type(position)()
            copy.CopyFrom(position)
            for name in ignored:
                if getattr(copy, name).value.startswith("-"):
                    getattr(copy, name).value = "0"
            cleared.append(copy)
        return cleared

    def patch() -> None:
        check = _exchange_holdings._check_positions
        value = _exchange_valuation.value_collateral

        def check_positions(statement: Any) -> None:
            checked = HoldingsStatement()
            checked.CopyFrom(statement)
            del checked.positions[:]
            checked.positions.extend(as_nothing(statement.positions))
            check(checked)

        def value_collateral(policy: Any, positions: Any, *args: Any, **kwargs: Any) -> Any:
            return value(policy, as_nothing(positions), *args, **kwargs)

        _exchange_holdings._check_positions = check_positions
        _exchange_valuation.value_collateral = value_collateral

    return patch


def _exchange_credits_last_proven_epoch() -> None:
    """The statement proven last becomes the account's credited holdings, whatever its epoch
    (§7.2: the highest epoch)."""
    holdings = _exchange_holdings.AttestedHoldings
    original = holdings.settle_holdings

    def settle_holdings(self: Any, credited: Any, rejected: Any, superseded: Any = ()) -> Any:
        credited = list(credited)
        revaluations = original(self, credited, rejected, superseded)
        now = self._context.now()
        touched = set()
        with self._context.storage.transaction():
            for holdings_id in credited:
                row = self._store.holdings.get(holdings_id)
                if row is not None and row.status == "credited":
                    self._store.accounts.set_credited_holdings(row.account_id, holdings_id)
                    touched.add(row.account_id)
            return [*revaluations, *self._context.revalue_each(sorted(touched), now)]

    holdings.settle_holdings = settle_holdings


def _exchange_rounds_amount_due_up() -> None:
    """The amount due on a call is rounded up to a whole unit of the currency before a top-up
    is compared with it: 0.73 agreed needs a top-up worth 1 (§8.4)."""
    original = _exchange_margin_calls.amount_due

    def amount_due(status: int, call_amount: Decimal, agreed_amount: Decimal) -> Decimal:
        return Decimal(original(status, call_amount, agreed_amount)).to_integral_value(
            rounding="ROUND_CEILING"
        )

    _exchange_margin_calls.amount_due = amount_due


def _exchange_ignores_holdings_below_the_call() -> None:
    """satisfied_amount is measured only while the latest holdings are worth more than those
    the call valued: holdings below them leave the last figure standing instead of 0 (§8.4)."""
    calls = _exchange_margin_calls.MarginCalls
    original = calls.set_status

    def set_status(self: Any, call: Any, status: int, now: Any, **kwargs: Any) -> Any:
        satisfied = kwargs.get("satisfied_amount")
        if status == call.status and satisfied is not None and satisfied == 0:
            return call.state_envelope
        return original(self, call, status, now, **kwargs)

    calls.set_status = set_status


def _exchange_accepts_paths_for_others() -> None:
    """A liquidation path relayed with a pledge is verified as the client's, but whom it
    authorises is never compared with the holdings statement's account and the exchange
    itself (§9.1): a path for another account or exchange becomes the path in force."""
    holdings = _exchange_holdings.AttestedHoldings

    def pledged_path(self: Any, envelope: Any, statement: Any) -> str:
        path = _exchange_holdings.verify_statement(
            envelope,
            self._context.registry,
            expected_type=LiquidationPath,
            audience=self._settings.custodian_id,
            now=statement.header.issued_at.ToDatetime(tzinfo=UTC),
            max_skew=self._settings.max_skew,
        )
        if not path.header.statement_id:
            raise MalformedError("holdings_change.liquidation_path.header.statement_id: unset")
        return str(path.header.statement_id)

    holdings._pledged_path = pledged_path


def _exchange_ignores_updates_without_ids(method: str) -> Callable[[], None]:
    """A ``method`` update (pledge change, yield accrual) naming no account or no asset is
    acknowledged and dropped, not refused as a malformed update (§6.5 step 5)."""

    def patch() -> None:
        holdings = _exchange_holdings.AttestedHoldings
        original = getattr(holdings, method)

        def receive(self: Any, sequence: int, update: Any) -> None:
            if update.account_id and update.asset_id:
                original(self, sequence, update)

        setattr(holdings, method, receive)

    return patch


def _exchange_lists_equivocation(
    rewrite: Callable[[Any, Any], Any],
) -> Callable[[], None]:
    """The evidence an exchange lists for a refused checkpoint is ``rewrite(row, evidence)``
    of what the reference lists (None: nothing)."""

    def patch() -> None:
        original = _exchange_holdings._checkpoint_equivocation

        def equivocation(row: Any) -> Any:
            return rewrite(row, original(row))

        _exchange_holdings._checkpoint_equivocation = equivocation

    return patch


_EQUIVOCATION_KIND = equivocation_pb2.EquivocationKind


def _inconsistent_as_fork(row: Any, evidence: Any) -> Any:
    """A larger checkpoint that fails its consistency proof is listed as a fork (at the
    accepted size), without its consistency proof."""
    if (
        evidence is not None
        and evidence.kind == _EQUIVOCATION_KIND.EQUIVOCATION_KIND_CHECKPOINT_INCONSISTENT
    ):
        evidence.kind = _EQUIVOCATION_KIND.EQUIVOCATION_KIND_CHECKPOINT_FORK
        evidence.ClearField("consistency_proof")
    return evidence


def _forks_above_only(row: Any, evidence: Any) -> Any:
    """Roots are compared by order: a fork is listed only if its root sorts above the
    accepted one."""
    if (
        evidence is not None
        and evidence.kind == _EQUIVOCATION_KIND.EQUIVOCATION_KIND_CHECKPOINT_FORK
        and evidence.second_hash < evidence.first_hash
    ):
        return None
    return evidence


def _rollbacks_as_forks(row: Any, evidence: Any) -> Any:
    """A checkpoint smaller than the accepted one is listed as a fork of the accepted one."""
    if evidence is not None or row.held is None:
        return evidence
    held = Checkpoint.FromString(row.held.payload)
    received = Checkpoint.FromString(row.received.payload)
    if received.tree_size >= held.tree_size:
        return None
    fork = equivocation_pb2.EquivocationEvidence(
        kind=_EQUIVOCATION_KIND.EQUIVOCATION_KIND_CHECKPOINT_FORK,
        accused_party_id=received.header.issuer,
        log_origin=row.origin,
        tree_size=held.tree_size,
        first=row.held,
        second=row.received,
        first_hash=held.root_hash,
        second_hash=received.root_hash,
    )
    fork.detected_at.FromNanoseconds(row.detected_at_ns)
    return fork


def _exchange_states_cutoff_without_hearing_past_it() -> None:
    """The exchange states a cut-off as soon as its clock reaches it, as the custodian does:
    it never waits for a batch or heartbeat its custodian issued after the cut-off (§10.2),
    so a batch issued by the cut-off that is still in flight is left out of its view."""
    _party_reconciliation.PartyReconciliation._heard = lambda self, cutoff: True


def _custodian_records_unnamed_paths() -> None:
    """A liquidation path without a statement_id is recorded under a name the custodian
    makes up, not refused (§9.1: the path's statement_id MUST be set)."""
    pledges = _custodian_pledges.Pledges
    original = pledges._check_path

    def check_path(self: Any, path: Any, instruction: Any) -> Any:
        if not path.header.statement_id:
            path.header.statement_id = f"unnamed-path-{path.header.sequence}"
        return original(self, path, instruction)

    pledges._check_path = check_path


def _accepts_unscheduled_cutoffs() -> None:
    """Any well-formed cutoff_id names a cut-off: its time of day is never held to the schedule
    (§10.1), so an off-schedule id is stated like a scheduled one, or not yet reached."""
    original = _party_reconciliation.parse_cutoff_id

    def parse_cutoff_id(cutoff_id: str, cutoffs: Sequence[timedelta]) -> datetime:
        try:
            moment = datetime.strptime(cutoff_id, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return original(cutoff_id, cutoffs)  # type: ignore[no-any-return]
        its_own = moment - datetime.combine(moment.date(), time(0), tzinfo=UTC)
        return original(cutoff_id, (*cutoffs, its_own))  # type: ignore[no-any-return]

    _party_reconciliation.parse_cutoff_id = parse_cutoff_id


#: The custodian's writes that are idempotent by an id (§12.4), and what they carry.
_IDEMPOTENT_WRITES: list[tuple[Any, str, Any]] = [
    (_custodian_settlement.CustodianSettlement, "submit", reconciliation_pb2.SettlementInstruction),
    (_custodian_settlement.CustodianSettlement, "dispute", reconciliation_pb2.SettlementDispute),
    (_custodian_emergency.CustodianEmergencyRelease, "execute", emergency_pb2.EmergencyRelease),
]


def _custodian_refuses_repeats_as_replayed() -> None:
    """Stage g comes first, before the id (§12.4 puts it after): the same settlement
    instruction, dispute or emergency release sent again is refused REPLAYED instead of
    being answered from the record."""

    def replay_checked_first(owner: Any, method: str, kind: Any) -> None:
        original = getattr(owner, method)

        def write(self: Any, envelope: Any) -> Any:
            with contextlib.suppress(DecodeError):  # undecodable: the write refuses it itself
                header = kind.FromString(envelope.payload).header
                self._ledger.guard.check(header.issuer, envelope.payload_type, header.sequence)
            return original(self, envelope)

        setattr(owner, method, write)

    for owner, method, kind in _IDEMPOTENT_WRITES:
        replay_checked_first(owner, method, kind)


def _reuses(err: errors.CollateralSyncError, field: str) -> bool:
    """Whether ``err`` refuses a used id ``field`` (STATE_CONFLICT naming it)."""
    return (
        err.reason == errors_pb2.ERROR_REASON_STATE_CONFLICT and err.metadata.get("field") == field
    )


def _custodian_answers_reused_ids() -> None:
    """A settlement instruction or an emergency release under a used id, and another dispute of
    a disputed settlement, get the recorded answer whatever their bytes: ids are compared, not
    payloads (§12.4 wants STATE_CONFLICT)."""
    settlement = _custodian_settlement.CustodianSettlement
    release = _custodian_emergency.CustodianEmergencyRelease
    submit, dispute, execute = settlement.submit, settlement.dispute, release.execute

    def submit_any(self: Any, envelope: Any) -> Any:
        try:
            return submit(self, envelope)
        except errors.CollateralSyncError as err:
            if not _reuses(err, "settlement_id"):
                raise
            message = reconciliation_pb2.SettlementInstruction.FromString(envelope.payload)
            found = self._row(message.settlement_id)
            return self._answer(found.status, found.dispute_deadline)

    def dispute_any(self: Any, envelope: Any) -> Any:
        try:
            return dispute(self, envelope)
        except errors.CollateralSyncError as err:
            message = reconciliation_pb2.SettlementDispute.FromString(envelope.payload)
            found = self._row(message.settlement_id) if _reuses(err, "settlement_id") else None
            if found is None or found.dispute is None:
                raise  # not disputed yet: its window closed, or it was executed
            return custodian_service_pb2.DisputeSettlementResponse(status=found.status)

    def execute_any(self: Any, envelope: Any) -> Any:
        try:
            return execute(self, envelope)
        except errors.CollateralSyncError as err:
            if not _reuses(err, "release_id"):
                raise
            message = emergency_pb2.EmergencyRelease.FromString(envelope.payload)
            [receipt] = self._db.execute(
                "SELECT receipt FROM custodian_emergency_releases WHERE release_id = ?",
                (message.release_id,),
            ).fetchone()
            return envelope_pb2.Envelope.FromString(bytes(receipt))

    settlement.submit, settlement.dispute, release.execute = submit_any, dispute_any, execute_any


#: Fault name -> the patch that introduces it.
FAULTS: dict[str, Callable[[], None]] = {
    "exchange-ignores-expiry": _exchange_ignores_expiry,
    "exchange-ignores-audience": _exchange_ignores_audience,
    "exchange-ignores-not-yet-valid": _exchange_ignores_not_yet_valid,
    "exchange-miscomputes-haircut": _exchange_miscomputes_haircut,
    "exchange-doubles-credit-limit": _exchange_doubles_credit_limit,
    "exchange-drops-error-info": _drops_error_info,
    "exchange-overstates-margin-calls": _exchange_overstates_margin_calls,
    "exchange-not-found-as-invalid-argument": _wrong_status(
        "ERROR_REASON_NOT_FOUND", "INVALID_ARGUMENT"
    ),
    "custodian-ignores-not-yet-valid": _custodian_ignores_not_yet_valid,
    "custodian-accepts-replay": _custodian_accepts_replay,
    "custodian-not-found-as-failed-precondition": _wrong_status(
        "ERROR_REASON_NOT_FOUND", "FAILED_PRECONDITION"
    ),
    "custodian-malformed-as-failed-precondition": _wrong_status(
        "ERROR_REASON_MALFORMED", "FAILED_PRECONDITION"
    ),
    "custodian-drops-field-violations": _drops_field_violations,
    "custodian-ignores-window": _ignores_window(_custodian_session),
    "custodian-misses-heartbeats": _custodian_misses_heartbeats,
    "custodian-replays-from-start": _custodian_replays_from_start,
    "custodian-misattests-sync-change": _custodian_misattests_sync_change,
    "custodian-forged-batch-as-malformed": _custodian_forged_batch_as_malformed,
    "custodian-loses-acknowledged-entry-on-restart": _custodian_loses_last_entry_on_restart,
    # The custodian receives the exchange's log (direction 2), and the reverse.
    "custodian-refuses-old-batches": _refuses_old_batches(EXCHANGE_TO_CUSTODIAN),
    "custodian-equivocation-as-gap": _custodian_equivocation_as_gap,
    "custodian-key-role-as-unauthenticated": _wrong_status(
        "ERROR_REASON_KEY_ROLE_MISMATCH", "UNAUTHENTICATED"
    ),
    "custodian-sequence-gap-as-failed-precondition": _wrong_status(
        "ERROR_REASON_SEQUENCE_GAP", "FAILED_PRECONDITION"
    ),
    "custodian-hello-names-another-party": _hello_names_another_party(_custodian_session),
    "custodian-release-on-any-signature": _custodian_release_on_any_signature,
    "custodian-no-settlement-cycle-cap": _custodian_no_cycle_cap,
    "custodian-executes-disputed-settlement": _custodian_executes_disputed,
    "custodian-cosigns-twice": _cosigns_twice,
    "undecodable-request-unknown": _undecodable_request_unknown,
    "integer-overflow-unchecked": _integer_overflow_unchecked,
    "custodian-rejects-forged-inner-statement": _custodian_rejects_forged_inner_statement,
    "custodian-waits-forever-for-hello": _custodian_waits_forever_for_hello,
    "custodian-accepts-third-party-statements": _custodian_accepts_third_party_statements,
    "exchange-credits-without-proving": _exchange_credits_without_proving,
    "exchange-ignores-partial-agreement": _exchange_ignores_partial_agreement,
    "exchange-expires-disputed-calls": _exchange_expires_disputed_calls,
    "exchange-never-liquidates-expired-calls": _exchange_never_liquidates_expired_calls,
    "exchange-expires-calls-on-due-date": _exchange_expires_calls_on_due_date,
    "exchange-expires-calls-a-minute-late": _exchange_expires_calls_a_minute_late,
    # The custodian's patches of the SDK session apply to whichever party runs them.
    "exchange-forged-batch-as-malformed": _custodian_forged_batch_as_malformed,
    "exchange-equivocation-as-gap": _custodian_equivocation_as_gap,
    "regulator-ignores-audience": _regulator_ignores_audience,
    # The same guard as the custodian's: the regulator then meets a replay as an equivocation.
    "regulator-accepts-replay": _custodian_accepts_replay,
    "regulator-ignores-sync-heads": _regulator_ignores_sync_heads,
    "regulator-accepts-any-party": _regulator_accepts_any_party,
    "regulator-ignores-cutoff-id": _regulator_check_cutoff("cutoff_id"),
    "regulator-accepts-views-before-cutoff": _regulator_check_cutoff("issued_at"),
    "regulator-drops-one-sided-accounts": _regulator_drops_one_sided_accounts,
    "regulator-reads-every-account": _regulator_reads_every_account,
    "regulator-results-on-first-statement": _regulator_results_on_first_statement,
    "regulator-flags-agreeing-views": _regulator_flags_agreeing_views,
    "regulator-result-not-public": _regulator_result_not_public,
    "exchange-policy-versions-off-by-one": _exchange_policy_versions_off_by_one,
    "exchange-policy-signature-broken": _exchange_policy_signature_broken,
    "exchange-lists-calls-not-states": _exchange_lists_calls_not_states,
    "exchange-never-pages-calls": _exchange_call_pages_short_by(1),
    "exchange-short-call-pages": _exchange_call_pages_short_by(2),
    "exchange-serves-stale-credit-lines": _exchange_serves_stale_credit_lines,
    "exchange-serves-stale-call-states": _exchange_serves_stale_call_states,
    "exchange-resigns-policy-as-new": _exchange_resigns_policy_as_new,
    "exchange-reads-for-any-registered-party": _exchange_reads_for_any_registered_party,
    "exchange-serves-strangers": _exchange_serves_strangers,
    "exchange-unknown-account-not-found-to-all": _exchange_unknown_account_not_found_to_all,
    "exchange-account-hidden-from-its-client": _exchange_account_hidden_from_its_client,
    "exchange-regulator-reads-nothing": _exchange_regulator_reads_nothing,
    "exchange-gap-as-malformed": _exchange_gap_as_malformed,
    "exchange-key-role-as-signature-invalid": _exchange_key_role_as_signature_invalid,
    "exchange-hello-names-another-party": _hello_names_another_party(_exchange_session),
    "exchange-under-reports-received-head": _exchange_under_reports_received_head,
    "exchange-ignores-window": _ignores_window(_exchange_session),
    "exchange-refuses-old-batches": _refuses_old_batches(CUSTODIAN_TO_EXCHANGE),
    "exchange-serves-no-evidence": _serves_no_evidence,
    "exchange-keeps-first-statement-only": _keeps_first_statement_only,
    "exchange-serves-evidence-to-anyone": _serves_evidence_to_anyone,
    "custodian-parses-before-verifying": _parses_before_verifying,
    "custodian-reduces-signature-scalar": _reduces_signature_scalar,
    "custodian-release-issuer-unchecked": _custodian_release_issuer_unchecked,
    "custodian-release-for-any-reason": _custodian_release_wait_rewritten(_any_reason),
    "custodian-release-since-unset-as-epoch": _custodian_release_wait_rewritten(
        _unset_since_as_epoch
    ),
    "regulator-ignores-party-role": _regulator_ignores_party_role,
    "exchange-unknown-response-kind-as-dispute": _exchange_unknown_response_kind_as_dispute,
    "exchange-values-holdings-pledged-elsewhere": _exchange_values_holdings_pledged_elsewhere,
    "exchange-trusts-inclusion-proof-size": _exchange_trusts_inclusion_proof_size,
    "exchange-trusts-consistency-proof-sizes": _exchange_trusts_consistency_proof_sizes,
    "exchange-ignores-checkpoint-origin": _exchange_ignores_checkpoint_origin,
    "custodian-records-unnamed-paths": _custodian_records_unnamed_paths,
    "exchange-satisfies-only-above-amount-due": _exchange_satisfies_only_above_amount_due,
    "exchange-satisfied-amount-only-rises": _exchange_satisfied_amount_only_rises,
    "custodian-answers-expired-repeats": _custodian_answers_expired_repeats,
    "custodian-sells-at-zero-price": _custodian_sells_at_zero_price,
    "custodian-replay-before-reused-id": _custodian_replay_before_reused_id,
    "custodian-stream-replays-reused-id": _custodian_stream_replays_reused_id,
    "exchange-credits-negative-figures": _exchange_credits_negative_figures(
        "quantity", "locked_quantity", "pledged_quantity"
    ),
    "exchange-checks-only-quantity-sign": _exchange_credits_negative_figures(
        "locked_quantity", "pledged_quantity"
    ),
    "exchange-credits-last-proven-epoch": _exchange_credits_last_proven_epoch,
    "exchange-rounds-amount-due-up": _exchange_rounds_amount_due_up,
    "exchange-ignores-holdings-below-the-call": _exchange_ignores_holdings_below_the_call,
    "exchange-accepts-paths-for-others": _exchange_accepts_paths_for_others,
    "exchange-ignores-yield-accruals-without-ids": _exchange_ignores_updates_without_ids(
        "receive_yield_accrual"
    ),
    "exchange-ignores-pledge-changes-without-ids": _exchange_ignores_updates_without_ids(
        "receive_pledge_change"
    ),
    "exchange-lists-inconsistent-checkpoints-as-forks": _exchange_lists_equivocation(
        _inconsistent_as_fork
    ),
    "exchange-lists-forks-above-accepted-root-only": _exchange_lists_equivocation(
        _forks_above_only
    ),
    "exchange-lists-rollbacks-as-forks": _exchange_lists_equivocation(_rollbacks_as_forks),
    "exchange-states-cutoff-without-hearing-past-it": (
        _exchange_states_cutoff_without_hearing_past_it
    ),
    "custodian-accepts-unscheduled-cutoffs": _accepts_unscheduled_cutoffs,
    "exchange-accepts-unscheduled-cutoffs": _accepts_unscheduled_cutoffs,
    "custodian-refuses-repeats-as-replayed": _custodian_refuses_repeats_as_replayed,
    "custodian-answers-reused-ids": _custodian_answers_reused_ids,
}


# --- the exchange's consent to a pledge release (§5.10) -------------------------------


def _exchange_rejudges_release(
    rejudge: Callable[[Any, tuple[Any, ...]], Any],
) -> Callable[[], None]:
    """Wrap the exchange's ``judge_release``: ``rejudge(judged, args)`` replaces its verdict."""

    def patch() -> None:
        original = _exchange_pledge_releases.judge_release

        def judge_release(*args: Any, **kwargs: Any) -> Any:
            return rejudge(original(*args, **kwargs), args)

        _exchange_pledge_releases.judge_release = judge_release

    return patch


def _drop_refusals(prefixes: tuple[str, ...]) -> Callable[[Any, tuple[Any, ...]], Any]:
    """Consents although refused, for refusals whose field starts with one of ``prefixes``."""

    def rejudge(judged: Any, args: tuple[Any, ...]) -> Any:
        refusal = judged.refusal
        if refusal is not None and refusal.field.startswith(prefixes):
            return dataclasses.replace(judged, refusal=None)
        return judged

    return rejudge


def _edge_exclusive(judged: Any, args: tuple[Any, ...]) -> Any:
    """Refuses a release that leaves the account exactly at its limit or at maintenance."""
    maintenance = Decimal(args[0].maintenance_ratio.value)
    at_edge = judged.credit_limit_after == judged.exposure or (
        judged.collateral_ratio_after is not None and judged.collateral_ratio_after == maintenance
    )
    if judged.refusal is None and at_edge and judged.exposure > 0:
        return dataclasses.replace(
            judged,
            refusal=ReleaseRefusal("at the limit", "credit_limit_after", "> exposure", "="),
        )
    return judged


def _states_no_exposure(judged: Any, args: tuple[Any, ...]) -> Any:
    """Judges on the account's exposure but states 0 in the consent."""
    return dataclasses.replace(judged, exposure=Decimal(0))


def _exchange_consent_figures_before_release() -> None:
    """The consent states the account's figures before the release, not after it."""
    original = _exchange_pledge_releases.judge_release

    def judge_release(
        policy: Any, positions: Any, prices: Any, releases: Any, *rest: Any, **kw: Any
    ) -> Any:
        judged = original(policy, positions, prices, releases, *rest, **kw)
        before = original(policy, positions, prices, [], *rest, **kw)
        return dataclasses.replace(
            judged,
            collateral_value_after=before.collateral_value_after,
            credit_limit_after=before.credit_limit_after,
        )

    _exchange_pledge_releases.judge_release = judge_release


def _exchange_release_judged_on(pick: Callable[[Any, str], Any]) -> Callable[[], None]:
    """A release is judged on (and cites) the statement ``pick(store, account)`` finds."""

    def patch() -> None:
        consents = _exchange_pledge_releases.ReleaseConsents
        original = consents.consent

        class _Picked:
            def __init__(self, holdings: Any, store: Any) -> None:
                self._holdings = holdings
                self._store = store

            def credited_holdings(self, account_id: str) -> Any:
                return pick(self._store, account_id) or self._holdings.credited_holdings(account_id)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._holdings, name)

        def consent(self: Any, envelope: Any) -> Any:
            valuer = self._valuer
            holdings = valuer._holdings
            valuer._holdings = _Picked(holdings, self._store)
            try:
                return original(self, envelope)
            finally:
                valuer._holdings = holdings

        consents.consent = consent

    return patch


def _first_statement(store: Any, account_id: str) -> Any:
    """The account's first statement, whatever came after it."""
    rows = store.holdings.of_account(account_id)
    return rows[0] if rows else None


def _latest_received(store: Any, account_id: str) -> Any:
    """The account's latest statement received, proven or not."""
    return store.holdings.latest(account_id)


def _exchange_consents_for_any_client() -> None:
    """Any client's request is judged: the issuer is not checked against the account."""

    def check_client(self: Any, request: Any) -> str:
        return str(request.issuer)

    _exchange_pledge_releases.ReleaseConsents._check_client = check_client


def _exchange_consents_for_any_exchange() -> None:
    """The request's exchange_id is not compared with the exchange's own party id."""
    consents = _exchange_pledge_releases.ReleaseConsents
    original = consents._check_client

    def check_client(self: Any, request: Any) -> str:
        named = request.message.exchange_id
        request.message.exchange_id = self._context.party_id
        try:
            return str(original(self, request))
        finally:
            request.message.exchange_id = named

    consents._check_client = check_client


def _exchange_consents_under_open_call(statuses: frozenset[int]) -> Callable[[], None]:
    def patch() -> None:
        """Margin calls in ``statuses`` do not stop a release (as if they had ended)."""
        _exchange_pledge_releases.TERMINAL = frozenset({*_exchange_margin.TERMINAL, *statuses})

    return patch


def _exchange_answers_reused_release_ids() -> None:
    """Another request under a consented release id is answered with the recorded consent."""
    consents = _exchange_pledge_releases.ReleaseConsents

    def answered(self: Any, request: Any) -> Any:
        recorded = self._store.release_consents.get(request.message.release_id)
        return None if recorded is None else recorded.consent

    consents._answered = answered


def _exchange_replay_before_recorded_consent() -> None:
    """The replay guard runs before the record: the same request again is REPLAYED."""
    consents = _exchange_pledge_releases.ReleaseConsents
    original = consents.consent

    def consent(self: Any, envelope: Any) -> Any:
        request = pledge_release_pb2.PledgeReleaseRequest
        header = request.FromString(envelope.payload).header
        self._context.replay.check(header.issuer, payload_type_of(request), header.sequence)
        return original(self, envelope)

    consents.consent = consent


def _exchange_release_ignores_replay() -> None:
    """No replay guard for requests: a sequence is neither checked nor recorded (stage g)."""
    consents = _exchange_pledge_releases.ReleaseConsents
    original = consents.consent

    class _NoGuard:
        def __init__(self, guard: Any) -> None:
            self._guard = guard

        def check(self, issuer: str, payload_type: str, sequence: int) -> None:
            return None

        def record(self, statement: Any) -> None:
            return None

        def __getattr__(self, name: str) -> Any:
            return getattr(self._guard, name)

    class _Context:
        def __init__(self, context: Any) -> None:
            self._context = context
            self.replay = _NoGuard(context.replay)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._context, name)

    def consent(self: Any, envelope: Any) -> Any:
        context = self._context
        self._context = _Context(context)
        try:
            return original(self, envelope)
        finally:
            self._context = context

    consents.consent = consent


_RELEASE_FAULTS: dict[str, Callable[[], None]] = {
    "exchange-consents-beyond-policy": _exchange_rejudges_release(
        _drop_refusals(("credit_limit_after", "collateral_ratio_after"))
    ),
    "exchange-consents-beyond-pledge": _exchange_rejudges_release(_drop_refusals(("releases[",))),
    "exchange-consent-edge-exclusive": _exchange_rejudges_release(_edge_exclusive),
    "exchange-consent-states-no-exposure": _exchange_rejudges_release(_states_no_exposure),
    "exchange-consent-figures-before-release": _exchange_consent_figures_before_release,
    "exchange-release-judged-on-first-statement": _exchange_release_judged_on(_first_statement),
    "exchange-release-judged-on-received-statement": _exchange_release_judged_on(_latest_received),
    "exchange-consents-for-any-client": _exchange_consents_for_any_client,
    "exchange-consents-for-any-exchange": _exchange_consents_for_any_exchange,
    "exchange-consents-under-open-call": _exchange_consents_under_open_call(
        frozenset(
            {
                margin_pb2.MARGIN_CALL_STATUS_ISSUED,
                margin_pb2.MARGIN_CALL_STATUS_AGREED,
                margin_pb2.MARGIN_CALL_STATUS_PARTIALLY_AGREED,
                margin_pb2.MARGIN_CALL_STATUS_DISPUTED,
            }
        )
    ),
    "exchange-answers-reused-release-ids": _exchange_answers_reused_release_ids,
    "exchange-replay-before-recorded-consent": _exchange_replay_before_recorded_consent,
    "exchange-release-ignores-replay": _exchange_release_ignores_replay,
    "exchange-release-ignores-expiry": lambda: _lenient_verify(
        _exchange_pledge_releases, "ERROR_REASON_STATEMENT_EXPIRED", _at_issue
    ),
    "exchange-release-ignores-audience": lambda: _lenient_verify(
        _exchange_pledge_releases, "ERROR_REASON_AUDIENCE_MISMATCH", _to_anyone
    ),
}
FAULTS.update(_RELEASE_FAULTS)


# -- a custodian that falls silent (§11.2) --


@contextlib.contextmanager
def _heard(silence: Any) -> Any:
    """Within the block, the custodian counts as heard, whatever the clock says."""
    silence.is_silent = lambda policy: False
    try:
        yield
    finally:
        del silence.is_silent


def _exchange_credit_ignores_silence() -> None:
    """Credit lines are published as if the custodian were heard: a limit rises in silence."""
    lines = _credit_lines_module.CreditLines
    original = lines.publish

    def publish(self: Any, account_id: str, valued: Any, now: datetime) -> None:
        with _heard(self._context.silence):
            original(self, account_id, valued, now)

    lines.publish = publish


def _exchange_revalues_ignoring_silence() -> None:
    """Every revaluation as if the custodian were heard: credit rises and it liquidates in silence."""
    revaluer = _exchange_revaluation.Revaluer
    original = revaluer._revalue

    def revalue(self: Any, account_id: str, now: datetime) -> Any:
        with _heard(self._context.silence):
            return original(self, account_id, now)

    revaluer._revalue = revalue


def _exchange_expires_calls_in_silence() -> None:
    """A call falling due in silence is EXPIRED (though nothing is liquidated on it)."""
    calls = _exchange_margin_calls.MarginCalls
    original = calls.set_status
    withdrawn = margin_pb2.MARGIN_CALL_STATUS_WITHDRAWN

    def set_status(self: Any, call: Any, status: int, now: datetime, **kwargs: Any) -> Any:
        if status == withdrawn and call.due_by_ns < int(now.timestamp() * 1e9):
            status = margin_pb2.MARGIN_CALL_STATUS_EXPIRED
        return original(self, call, status, now, **kwargs)

    calls.set_status = set_status


def _exchange_silence_window(window: timedelta | None) -> Callable[[], None]:
    def patch() -> None:
        """Silence judged on a window of its own (None: the custodian is never heard)."""

        def is_silent(self: Any, policy: Any) -> bool:
            return window is None or self._silent_for() > window

        _silence_module.CustodianSilence.is_silent = is_silent

    return patch


def _exchange_no_call_after_withdrawal() -> None:
    """A withdrawn call still counts as running: no new call follows it."""
    revaluer = _exchange_revaluation
    revaluer.BLOCKING = frozenset({*revaluer.BLOCKING, margin_pb2.MARGIN_CALL_STATUS_WITHDRAWN})
    revaluer.TERMINAL = frozenset(revaluer.TERMINAL - {margin_pb2.MARGIN_CALL_STATUS_WITHDRAWN})


FAULTS.update(
    {
        "exchange-raises-credit-while-custodian-silent": _exchange_credit_ignores_silence,
        "exchange-revalues-ignoring-silence": _exchange_revalues_ignoring_silence,
        "exchange-expires-calls-while-custodian-silent": _exchange_expires_calls_in_silence,
        "exchange-silence-window-fixed-300s": _exchange_silence_window(timedelta(seconds=300)),
        "exchange-never-hears-custodian": _exchange_silence_window(None),
        "exchange-no-call-after-withdrawal": _exchange_no_call_after_withdrawal,
    }
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in FAULTS:
        sys.stderr.write(f"usage: broken_servers.py {{{'|'.join(FAULTS)}}} serve ROLE ...\n")
        return 2
    FAULTS[args[0]]()
    return cli_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
