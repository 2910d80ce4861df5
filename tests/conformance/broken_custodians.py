"""Reference custodians that attest, prove, release or settle wrongly while refusing nothing.

Each patch breaks exactly one rule of the custodian's positive behaviour
(docs/PROTOCOL.md §5 checkpoints and proofs, Appendix A redemptions and yield,
§9 liquidation, §10.2 the view and the sync log heads stated for a cut-off, §10.6
settlement, §11 emergency release), so that the case written for that rule is the one that
must catch it (tests/conformance/test_kit_broken_custodians.py). Some move a
deadline by a second's worth or more — settling a minute late, a window or a
wait counted from the wrong time — which only a case that looks one second
either side of the deadline sees.
Most of these faults change what the custodian *signs*, which a fault proxy
cannot fake. Like :mod:`.broken_servers`, whose machinery is reused, it runs
the ordinary server command line in the same process::

    python tests/conformance/broken_custodians.py FAULT serve custodian --config FILE ...

The faults live apart from :data:`.broken_servers.FAULTS` because that table is
required to be tested, fault for fault, by test_kit_broken_servers.py.
"""

from __future__ import annotations

import builtins
import dataclasses
import decimal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from collateral_sync._cli import main as cli_main
from collateral_sync.errors import StateError, VerificationError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.sync import _log as _sync_log
from collateral_sync.v1 import attestation_pb2, errors_pb2, liquidation_pb2, reconciliation_pb2
from collateral_sync_reference.common import access as _access_module
from collateral_sync_reference.common import emergency as _cosigner_module
from collateral_sync_reference.common import evidence as _evidence_module
from collateral_sync_reference.common import reconciliation as _reconciliation_module
from collateral_sync_reference.custodian import attestation as _attestation_module
from collateral_sync_reference.custodian import emergency as _emergency_module
from collateral_sync_reference.custodian import ledger as _ledger_module
from collateral_sync_reference.custodian import liquidations as _liquidations_module
from collateral_sync_reference.custodian import pledge_releases as _pledge_releases_module
from collateral_sync_reference.custodian import pledges as _pledges_module
from collateral_sync_reference.custodian import redemptions as _redemptions_module
from collateral_sync_reference.custodian import refresh as _refresh_module
from collateral_sync_reference.custodian import role as _role_module
from collateral_sync_reference.custodian import settlement as _settlement_module
from collateral_sync_reference.custodian import store as _store_module
from collateral_sync_reference.custodian.store import margin_calls as _margin_call_store_module

# Patched by name: what they import is their business, so they are typed loosely here.
_custodian_attestation: Any = _attestation_module
_common_evidence: Any = _evidence_module
_custodian_ledger: Any = _ledger_module
_custodian_liquidations: Any = _liquidations_module
_custodian_pledges: Any = _pledges_module
_custodian_pledge_releases: Any = _pledge_releases_module
_custodian_margin_call_store: Any = _margin_call_store_module
_custodian_redemptions: Any = _redemptions_module
_custodian_refresh: Any = _refresh_module
_custodian_emergency: Any = _emergency_module
_custodian_settlement: Any = _settlement_module
_custodian_store: Any = _store_module
_cosigner: Any = _cosigner_module
_access: Any = _access_module
_custodian_role: Any = _role_module
_party_reconciliation: Any = _reconciliation_module
_sync_log_module: Any = _sync_log

__all__ = ["FAULTS", "main"]

_REASON = attestation_pb2.HoldingsChangeReason


def _signs_checkpoints_with_unregistered_key() -> None:
    """Checkpoints are signed with a new custodian key that is in no registry (a rotation half done)."""
    original = _custodian_attestation.Attestation._sign_checkpoint
    rotated: dict[str, SigningKey] = {}

    def sign_checkpoint(self: Any, size: int, now: datetime) -> Any:
        ledger = self._ledger
        own = ledger.signer
        if own.party_id not in rotated:
            rotated[own.party_id] = SigningKey.generate(own.party_id, own.role)
        ledger.signer = rotated[own.party_id]
        try:
            return original(self, size, now)
        finally:
            ledger.signer = own

    _custodian_attestation.Attestation._sign_checkpoint = sign_checkpoint


def _refuses_checkpoint_at_log_size() -> None:
    """GetCheckpoint(tree_size=n) refuses n equal to the log's size as beyond it (>= for >)."""
    original = _custodian_attestation.Attestation.checkpoint

    def checkpoint(self: Any, tree_size: int) -> Any:
        size = self._log.size
        if tree_size and tree_size >= size:
            raise StateError(
                f"tree size {tree_size} is beyond the log of {size} leaves",
                reason=errors_pb2.ERROR_REASON_OUT_OF_RANGE,
                metadata={"field": "tree_size", "expected": f"< {size}", "actual": str(tree_size)},
            )
        return original(self, tree_size)

    _custodian_attestation.Attestation.checkpoint = checkpoint


def _alternates_checkpoint_origin() -> None:
    """Every other checkpoint names another log origin, as two signers configured apart would."""
    original = _custodian_attestation.sign_statement
    signed = [0]

    def sign_statement(message: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(message, attestation_pb2.Checkpoint):
            signed[0] += 1
            if signed[0] % 2 == 0:
                renamed = attestation_pb2.Checkpoint()
                renamed.CopyFrom(message)
                renamed.origin = f"{message.origin}/replica-b"
                message = renamed
        return original(message, *args, **kwargs)

    _custodian_attestation.sign_statement = sign_statement


def _same_size_proof_not_empty() -> None:
    """A consistency proof between equal sizes carries the tree's root (RFC 9162 SUBPROOF, b=false)."""
    original = _custodian_attestation.Attestation.consistency_proof

    def consistency_proof(self: Any, first_tree_size: int, second_tree_size: int) -> Any:
        proof = original(self, first_tree_size, second_tree_size)
        if proof.first_tree_size == proof.second_tree_size and not proof.consistency_path:
            proof.consistency_path.append(self._log.root(proof.second_tree_size))
        return proof

    _custodian_attestation.Attestation.consistency_proof = consistency_proof


def _rewrite_changes(rewrite: Callable[[Any, Any], Any]) -> None:
    """Wrap ``Ledger._attest``: ``rewrite(ledger, change)`` may alter each change first."""
    original = _custodian_ledger.Ledger._attest

    def attest(self: Any, changes: Sequence[Any], now: datetime) -> Any:
        return original(self, [rewrite(self, change) for change in changes], now)

    _custodian_ledger.Ledger._attest = attest


def _redemption_locks_nothing() -> None:
    """A redemption is attested as REDEMPTION_LOCK, but the account is saved with its old locks."""

    def unlock(ledger: Any, change: Any) -> Any:
        if change.reason == _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK:
            stored = ledger.store.account(change.account.account_id)
            for asset_id, holding in change.account.holdings.items():
                before = stored.holdings.get(asset_id) if stored is not None else None
                holding.locked = before.locked if before is not None else Decimal(0)
        return change

    _rewrite_changes(unlock)


def _redeems_pledged() -> None:
    """The double spend: a redemption may lock pledged quantity (bound quantity - locked)."""
    _custodian_redemptions._redeemable = lambda holding: holding.quantity - holding.locked


def _redemption_bound_exclusive() -> None:
    """Redeeming exactly quantity - locked - pledged is refused (the bound taken as exclusive)."""
    original = _custodian_redemptions._redeemable
    quantum = Decimal("0.000000000000000001")
    _custodian_redemptions._redeemable = lambda holding: original(holding) - quantum


def _settles_redemptions_early() -> None:
    """Redemption locks settle an hour before the settles_at the custodian announced."""
    store = _custodian_store.SqliteCustodianStore
    original = store.due_redemptions

    def due_redemptions(self: Any, now: datetime) -> Any:
        return original(self, now + timedelta(hours=1))

    store.due_redemptions = due_redemptions


def _never_settles_redemptions() -> None:
    """Redemption locks hold for ever: nothing ever falls due."""
    _custodian_store.SqliteCustodianStore.due_redemptions = lambda self, now: []


def _never_refreshes_holdings() -> None:
    """Holdings statements are never refreshed: an account nothing changes is left with an
    expired latest statement, which nothing may cite (§3.6.1, §5.8)."""
    _custodian_refresh.HoldingsRefresh.sweep = lambda self: 0


def _yield_attested_as_deposit() -> None:
    """Accrued yield is attested with reason DEPOSIT (the fund's payment), not YIELD_ACCRUAL."""

    def as_deposit(ledger: Any, change: Any) -> Any:
        if change.reason == _REASON.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL:
            return dataclasses.replace(change, reason=_REASON.HOLDINGS_CHANGE_REASON_DEPOSIT)
        return change

    _rewrite_changes(as_deposit)


def _cosignature_put_first() -> None:
    """The co-signer puts its own signature before the issuer's instead of appending it."""
    cosigner = _cosigner.EmergencyReleaseCoSigner
    original = cosigner.cosign

    def cosign(self: Any, envelope: Any) -> Any:
        signed = original(self, envelope)
        *others, own = [type(s).FromString(s.SerializeToString()) for s in signed.signatures]
        del signed.signatures[:]
        signed.signatures.extend([own, *others])
        return signed

    cosigner.cosign = cosign


def _release_attested_as_liquidation() -> None:
    """An executed emergency release is attested with reason LIQUIDATION, not RELEASE."""
    original = _custodian_emergency._Change

    def change(account: Any, reason: int, *args: Any, **kwargs: Any) -> Any:
        if reason == _REASON.HOLDINGS_CHANGE_REASON_RELEASE:
            reason = _REASON.HOLDINGS_CHANGE_REASON_LIQUIDATION
        return original(account, reason, *args, **kwargs)

    _custodian_emergency._Change = change


def _settles_whole_day_early() -> None:
    """A daily batch executes every pending settlement whose deadline falls on today's UTC date."""
    settlement = _custodian_settlement.CustodianSettlement
    original = settlement.run_due
    to_us = _custodian_settlement.to_us

    def run_due(self: Any) -> None:
        original(self)
        now = self._ledger.clock.now().astimezone(UTC)
        end_of_day = datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)
        rows = self._db.execute(
            "SELECT settlement_id FROM custodian_settlements "
            "WHERE status = ? AND dispute_deadline_us < ? ORDER BY dispute_deadline_us",
            (reconciliation_pb2.SETTLEMENT_STATUS_PENDING, to_us(end_of_day)),
        ).fetchall()
        for (settlement_id,) in rows:
            found = self._row(settlement_id)
            if found is not None:
                self._execute(found, now)

    settlement.run_due = run_due


#: How late custodian-settles-a-minute-late executes a settlement.
_A_MINUTE = timedelta(minutes=1)


def _settles_a_minute_late() -> None:
    """Settlements execute a minute after their dispute deadline, not when it passes.

    Disputes are still refused from the deadline on: only execution is late.
    """
    settlement = _custodian_settlement.CustodianSettlement
    to_us = _custodian_settlement.to_us
    original_next_due = settlement.next_due

    def run_due(self: Any) -> None:
        now = self._ledger.clock.now()
        rows = self._db.execute(
            "SELECT settlement_id FROM custodian_settlements "
            "WHERE status = ? AND dispute_deadline_us <= ? ORDER BY dispute_deadline_us",
            (reconciliation_pb2.SETTLEMENT_STATUS_PENDING, to_us(now - _A_MINUTE)),
        ).fetchall()
        for (settlement_id,) in rows:
            found = self._row(settlement_id)
            if found is not None:
                self._execute(found, now)

    def next_due(self: Any) -> datetime | None:
        due = original_next_due(self)
        return None if due is None else due + _A_MINUTE

    settlement.run_due = run_due
    settlement.next_due = next_due


def _dispute_window_from_instruction() -> None:
    """The dispute window ends at the instruction's own dispute_deadline: receipt plus the
    policy's window is not counted, so a late delivery shortens it (§10.6)."""
    settlement = _custodian_settlement.CustodianSettlement
    original = settlement._limits

    def limits(self: Any, exchange_id: str) -> tuple[int, timedelta]:
        cycles, _ = original(self, exchange_id)
        return cycles, timedelta(0)

    settlement._limits = limits


def _release_wait_from_issued_at() -> None:
    """Regulator + custodian wait emergency_release_wait from the release's issued_at, not from
    exchange_unresponsive_since."""
    release_part = _custodian_emergency.CustodianEmergencyRelease
    original = release_part._check_wait

    def check_wait(self: Any, release: Any, now: datetime) -> None:
        counted = type(release)()
        counted.CopyFrom(release)
        if counted.HasField("exchange_unresponsive_since"):
            counted.exchange_unresponsive_since.CopyFrom(release.header.issued_at)
        original(self, counted, now)

    release_part._check_wait = check_wait


def _release_wait_is_dispute_window() -> None:
    """Regulator + custodian wait the exchange's settlement_dispute_window (24 h in the pilot)
    instead of its emergency_release_wait (48 h)."""

    def emergency_release_wait(self: Any, exchange_id: str) -> timedelta:
        policy = _custodian_emergency.exchange_risk_policy(self._ledger, exchange_id)
        window: timedelta = _custodian_settlement.PILOT_SETTLEMENT_DISPUTE_WINDOW
        if policy is not None and policy.HasField("settlement_dispute_window"):
            window = policy.settlement_dispute_window.ToTimedelta()
        return window

    _custodian_emergency.CustodianEmergencyRelease.emergency_release_wait = emergency_release_wait


def _states_view_when_asked() -> None:
    """A cut-off's view is built when its statement is first asked for, from the holdings as they
    are then, not frozen at the cut-off (§10.2: the latest statements issued at or before it)."""
    reconciliation = _party_reconciliation.PartyReconciliation
    original_view = reconciliation._view

    def run_due(self: Any) -> list[str]:
        return []  # nothing frozen as the clock passes a cut-off

    def view(self: Any, cutoff: datetime) -> Any:
        return original_view(self, self._clock.now())

    reconciliation.run_due = run_due
    reconciliation._view = view


def _states_cutoff_a_minute_early() -> None:
    """GetReconciliationStatement builds and serves a cut-off's statement from a minute before
    the cut-off, instead of refusing it until then (STATE_CONFLICT)."""
    reconciliation = _party_reconciliation.PartyReconciliation
    original = reconciliation.statement

    def statement(self: Any, cutoff_id: str) -> Any:
        cutoff = _party_reconciliation.parse_cutoff_id(cutoff_id, self._settings.cutoffs)
        if cutoff > self._clock.now() + _A_MINUTE:
            return original(self, cutoff_id)
        return self._ensure(cutoff)

    reconciliation.statement = statement


def _states_current_sync_heads() -> None:
    """A cut-off's statement states the sync log heads held when it is built, not the last
    entries of batches issued at or before the cut-off (§10.2): a batch the exchange issued
    after the cut-off, delivered before the custodian's clock reached it, is counted."""

    def heads_at(self: Any, cutoff: datetime) -> dict[int, Any]:
        heads = {
            self.sending_direction: self.sent_head(),
            self.receiving_direction: self.received_head(),
        }
        return dict(sorted(heads.items()))

    # Only reconciliation asks the log for its heads at a time.
    _sync_log_module.SyncLog.heads_at = heads_at


def _rewrite_steps(rewrite: Callable[[list[Any]], list[Any]]) -> None:
    """Wrap ``Liquidations._execute``: it sells along ``rewrite(steps)`` instead of the path."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._execute

    def execute(self: Any, account: Any, verified: Any, *, steps: Any, **kwargs: Any) -> Any:
        return original(self, account, verified, steps=rewrite(list(steps)), **kwargs)

    liquidations._execute = execute


def _sells_past_step_maximum() -> None:
    """Each step sells up to the whole pledge of its asset: its max_quantity is ignored."""

    def uncapped(steps: list[Any]) -> list[Any]:
        widened = []
        for step in steps:
            copy = liquidation_pb2.LiquidationStep()
            copy.CopyFrom(step)
            copy.max_quantity.value = "1000000000000"
            widened.append(copy)
        return widened

    _rewrite_steps(uncapped)


def _sells_steps_out_of_order() -> None:
    """The path's steps are sold last first."""
    _rewrite_steps(lambda steps: steps[::-1])


def _rounds_proceeds_up() -> None:
    """A fill's proceeds are quantity x price rounded up (in the seller's favour), not down."""
    _custodian_liquidations._round_down = _custodian_liquidations._round_up


def _skips_yield_distribution() -> None:
    """Accrued yield is forgotten at a liquidation: kept in quantity, never paid out first."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._execute

    def execute(self: Any, account: Any, *args: Any, **kwargs: Any) -> Any:
        for holding in account.holdings.values():
            holding.accrued_yield = Decimal(0)
        return original(self, account, *args, **kwargs)

    liquidations._execute = execute


def _re_signs_repeated_receipt() -> None:
    """A repeat of an executed instruction gets its receipt signed anew (a new header), not the same one."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._check_instruction

    def check_instruction(self: Any, envelope: Any, now: datetime, **kwargs: Any) -> Any:
        verified, receipt = original(self, envelope, now, **kwargs)
        if receipt is not None:
            message = liquidation_pb2.LiquidationReceipt.FromString(receipt.payload)
            ledger = self._ledger
            receipt = sign_statement(
                message,
                ledger.signer,
                audience=list(message.header.audience),
                sequence=message.header.sequence,
                ttl=ledger.settings.statement_ttl,
                issued_at=now,
            )
        return verified, receipt

    liquidations._check_instruction = check_instruction


def _liquidates_off_path() -> None:
    """Any path id is taken for the account's path in force: the instruction's id is not checked."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._authorised_path

    def authorised_path(self: Any, account: Any, verified: Any) -> Any:
        paths = self._ledger.store.paths_for(account.account_id, verified.issuer)
        return paths[-1] if paths else original(self, account, verified)

    liquidations._authorised_path = authorised_path


def _answers_reused_liquidation_id() -> None:
    """Any instruction with an executed liquidation_id gets that execution's receipt, whatever
    else it says: the repeat check compares ids, not payloads."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._check_instruction

    def check_instruction(self: Any, envelope: Any, now: datetime, **kwargs: Any) -> Any:
        message = liquidation_pb2.LiquidationInstruction.FromString(envelope.payload)
        executed = (
            self._ledger.store.liquidation(message.liquidation_id)
            if message.liquidation_id
            else None
        )
        if executed is None:
            return original(self, envelope, now, **kwargs)
        verified = self._ledger._verify(
            envelope,
            liquidation_pb2.LiquidationInstruction,
            now,
            on_stream=kwargs.get("on_stream", False),
        )
        return verified, executed.receipt

    liquidations._check_instruction = check_instruction


def _path_superseded_by_the_latest_only() -> None:
    """A path counts as superseded only once the *latest* later path was recorded before the
    instruction was issued (not the first later one)."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._authorised_path

    def authorised_path(self: Any, account: Any, verified: Any) -> Any:
        paths = self._ledger.store.paths_for(account.account_id, verified.issuer)
        for position, path in enumerate(paths):
            if path.statement_id != verified.message.liquidation_path_id:
                continue
            issued_at = verified.header.issued_at.ToDatetime(tzinfo=UTC)
            later = paths[position + 1 :]
            if not later or later[-1].recorded_at > issued_at:
                return path
        return original(self, account, verified)

    liquidations._authorised_path = authorised_path


def _only_the_latest_path_authorised() -> None:
    """An instruction must name the path in force when it arrives, not when it was issued."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._authorised_path

    def authorised_path(self: Any, account: Any, verified: Any) -> Any:
        path = original(self, account, verified)
        latest = self._ledger.store.paths_for(account.account_id, verified.issuer)[-1]
        if latest.statement_id != path.statement_id:
            raise VerificationError(
                f"liquidation path {path.statement_id!r} is not the one in force",
                reason=errors_pb2.ERROR_REASON_PATH_NOT_AUTHORISED,
                metadata={"expected": latest.statement_id, "actual": path.statement_id},
            )
        return path

    liquidations._authorised_path = authorised_path


def _reads_for_any_registered_party() -> None:
    """Any registered party reads any account: the audience of the data is not checked."""

    def require_reader(caller: Any, readers: Any, *, field: str) -> None:
        return None

    _custodian_role.require_reader = require_reader


def _serves_strangers() -> None:
    """No access control at all: any certificate from the CA reads any account (the v1 bug)."""
    _reads_for_any_registered_party()
    _access.AccessInterceptor._check = lambda self, context: None


def _unknown_account_not_found_to_all() -> None:
    """An account that does not exist is NOT_FOUND to anyone: existence leaks to other parties."""
    original = _access.require_reader

    def require_reader(caller: Any, readers: Any, *, field: str) -> None:
        if readers is not None:
            original(caller, readers, field=field)

    _custodian_role.require_reader = require_reader


def _refusal_names_the_parties() -> None:
    """A refused read says who may read the account, naming its client and exchange."""
    original = _access.require_reader

    def require_reader(caller: Any, readers: Any, *, field: str) -> None:
        try:
            original(caller, readers, field=field)
        except _access.VerificationError as err:
            err.metadata["expected"] = "|".join(sorted(readers or ()))
            raise

    _custodian_role.require_reader = require_reader


def _refusal_names_the_field_not_the_caller() -> None:
    """A refused read's metadata ``actual`` repeats the field, not the caller's party id."""
    original = _access.require_reader

    def require_reader(caller: Any, readers: Any, *, field: str) -> None:
        try:
            original(caller, readers, field=field)
        except _access.VerificationError as err:
            err.metadata["actual"] = field
            raise

    _custodian_role.require_reader = require_reader


def _stranger_refusal_names_nobody() -> None:
    """A stranger's refusal leaves metadata ``actual`` empty: it never says whom it refused."""
    original = _access._refuse_stranger

    def refuse_stranger(caller: Any) -> None:
        try:
            original(caller)
        except _access.VerificationError as err:
            err.metadata["actual"] = ""
            raise

    _access._refuse_stranger = refuse_stranger


def _evidence_refusal_names_nobody() -> None:
    """A refusal of the evidence to a non-regulator leaves metadata ``actual`` empty."""
    original = _common_evidence.require_regulator

    def require_regulator(caller: Any, *, what: str) -> None:
        try:
            original(caller, what=what)
        except _access.VerificationError as err:
            err.metadata["actual"] = ""
            raise

    _common_evidence.require_regulator = require_regulator


def _refuses_public_data_to_strangers() -> None:
    """Checkpoints and consistency proofs are refused to a certificate the registry lacks."""
    _access.PUBLIC_METHODS = frozenset()


def _regulator_reads_nothing() -> None:
    """A regulator is treated like any other party: it reads no account it is not named on."""
    _access.Caller.reads_everything = property(lambda self: not self.checked)


def _account_hidden_from_its_exchange() -> None:
    """Only the account's client reads its holdings: the exchange it is pledged to is refused."""
    attestation = _custodian_attestation.Attestation
    original = attestation.readers_of_account

    def readers_of_account(self: Any, account_id: str) -> Any:
        readers = original(self, account_id)
        if readers is None:
            return None
        account = self._ledger.store.account(account_id)
        return frozenset({account.client_id}) if account is not None else readers

    attestation.readers_of_account = readers_of_account


def _leaves_statement_id_empty() -> None:
    """Every statement the custodian signs has an empty header.statement_id (§3.4: issuers
    MUST set one; verifiers do not check it, so every signature still verifies)."""
    original = sign_statement

    def without_id(message: Any, signer: Any, **kwargs: Any) -> Any:
        kwargs["statement_id"] = ""
        return original(message, signer, **kwargs)

    # Wherever it was imported by name (the SDK's checkpoints and sync batches included).
    for module in list(sys.modules.values()):
        if vars(module).get("sign_statement") is original:
            module.sign_statement = without_id  # type: ignore[attr-defined]


def _multiplies_at_28_digits() -> None:
    """A liquidation's proceeds are multiplied in a default decimal context (28 significant
    digits), then rounded down to 18 fraction digits: too little precision (§2.3)."""
    _custodian_liquidations._ROUNDING = decimal.Context(prec=28)


def _takes_instructions_from_any_caller() -> None:
    """SubmitLiquidationInstruction executes an exchange's instruction whoever sends it: the
    caller is not compared with the instruction's issuer (§4.5)."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations.liquidate

    def liquidate(self: Any, envelope: Any, *, now: datetime, tls_peer: Any = None) -> Any:
        return original(self, envelope, now=now, tls_peer=None)

    liquidations.liquidate = liquidate


def _judges_stream_instructions_at_receipt() -> None:
    """An instruction that came on the stream must still be fresh when it is received, by its
    own expires_at, as if it came by RPC (§3.6.1: the batch's freshness is what counts)."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._liquidate_verified

    def liquidate_verified(self: Any, verified: Any, now: datetime, *, on_stream: bool) -> Any:
        if on_stream:
            ledger = self._ledger
            verify_statement(
                verified.envelope,
                ledger.registry,
                expected_type=liquidation_pb2.LiquidationInstruction,
                audience=ledger.party_id,
                now=now,
                max_skew=ledger.max_skew,
            )
        return original(self, verified, now, on_stream=on_stream)

    liquidations._liquidate_verified = liquidate_verified


def _rewrite_margin_calls(rewrite: Callable[[Any], Any]) -> None:
    """Wrap the custodian's margin-call lookup: it finds ``rewrite(record)`` instead."""
    tables = _custodian_margin_call_store.MarginCallTables
    original = tables.margin_call

    def margin_call(self: Any, margin_call_id: str) -> Any:
        record = original(self, margin_call_id)
        return None if record is None else rewrite(record)

    tables.margin_call = margin_call


def _liquidates_on_disputed_calls() -> None:
    """A margin call it disputed is taken for one never answered: it expires at its due_by."""
    _rewrite_margin_calls(lambda record: dataclasses.replace(record, response_kind=0))


def _liquidates_before_due_by() -> None:
    """A named margin call is taken to have expired whenever the instruction was issued."""
    _rewrite_margin_calls(
        lambda record: dataclasses.replace(record, due_by=datetime(1970, 1, 1, tzinfo=UTC))
    )


def _liquidates_at_due_by() -> None:
    """A named margin call is taken to have expired at its due_by, not after it: an
    instruction issued exactly at due_by is executed (§9.2: the call is open through it)."""
    _rewrite_margin_calls(
        lambda record: dataclasses.replace(record, due_by=record.due_by - timedelta(microseconds=1))
    )


def _takes_other_accounts_calls() -> None:
    """A named margin call is looked up by its id alone, whatever account it is for: the
    instruction then fails its recomputation (PROOF_INVALID), not the look-up (NOT_FOUND)."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._expired_margin_call

    def expired_margin_call(self: Any, account: Any, verified: Any) -> Any:
        record = self._ledger.store.margin_call(verified.message.margin_call_id)
        if record is not None and record.account_id != account.account_id:
            account = dataclasses.replace(account, account_id=record.account_id)
        return original(self, account, verified)

    liquidations._expired_margin_call = expired_margin_call


class _NothingSoldYet(Decimal):
    """A zero quantity that does not count as nothing: ``quantity <= 0`` says no."""

    def __le__(self, other: Any) -> bool:
        return False if other == 0 else Decimal.__le__(self, other)


def _records_empty_fills() -> None:
    """A step of which nothing can be sold (nothing of its asset pledged) still gets a fill,
    of quantity 0: the sale's test ``quantity <= 0`` acts as ``quantity < 0``."""

    def least(*args: Any, **kwargs: Any) -> Any:
        found = builtins.min(*args, **kwargs)
        return _NothingSoldYet(found) if isinstance(found, Decimal) and found == 0 else found

    _custodian_liquidations.min = least


def _skips_steps_priced_at_most_one() -> None:
    """A step whose asset is priced at 1 or less is passed over, like an unpriced one."""
    liquidations = _custodian_liquidations.Liquidations
    original = liquidations._execute

    def execute(
        self: Any, account: Any, verified: Any, *, steps: Any, prices: Any, **kwargs: Any
    ) -> Any:
        kept = [step for step in steps if prices.get(step.asset_id, Decimal(0)) > 1]
        return original(self, account, verified, steps=kept, prices=prices, **kwargs)

    liquidations._execute = execute


def _sells_whole_steps() -> None:
    """Each step is sold in full (up to its maximum and the pledge) until the amount is
    raised: the step that reaches it sells more than it needs."""
    _custodian_liquidations._round_up = lambda value, places=18: Decimal("1e30")


def _path_checked_without(name: str) -> None:
    """Wrap ``Pledges._check_path``: the path's ``name`` is taken to be the pledge's."""
    pledges = _custodian_pledges.Pledges
    original = pledges._check_path

    def check_path(self: Any, path: Any, instruction: Any) -> Any:
        message = liquidation_pb2.LiquidationPath()
        message.CopyFrom(path.message)
        setattr(message, name, getattr(instruction, name))
        return original(self, dataclasses.replace(path, message=message), instruction)

    pledges._check_path = check_path


def _reuses_path_id() -> None:
    """A path whose statement_id is recorded already is taken for the recorded one, whatever
    it says: a top-up cannot tell the path in force from another under its id."""
    pledges = _custodian_pledges.Pledges
    original = pledges._check_path

    def check_path(self: Any, path: Any, instruction: Any) -> Any:
        if self._ledger.store.path(path.header.statement_id) is not None:
            return False
        return original(self, path, instruction)

    pledges._check_path = check_path


def _pledges_to_two_exchanges() -> None:
    """An account pledged to one exchange may be pledged to another it serves (§5.8 ignored):
    the account is taken as pledged to whichever exchange the instruction names."""
    pledges = _custodian_pledges.Pledges
    original = pledges.pledge

    def pledge(self: Any, request: Any) -> Any:
        ledger = self._ledger
        instruction = _custodian_pledges.custodian_service_pb2.PledgeInstruction()
        instruction.ParseFromString(request.pledge_instruction.payload)
        account_of = ledger._account

        def account(account_id: str, field: str) -> Any:
            found = account_of(account_id, field)
            if found.exchange_id and instruction.exchange_id in ledger.exchanges:
                found.exchange_id = instruction.exchange_id
            return found

        ledger._account = account
        try:
            return original(self, request)
        finally:
            del ledger._account

    pledges.pledge = pledge


def _pledge_bound_exclusive() -> None:
    """Pledging exactly quantity - locked - pledged - accrued yield is refused (bound exclusive)."""
    original = _custodian_pledges._free
    quantum = Decimal("0.000000000000000001")
    _custodian_pledges._free = lambda holding: original(holding) - quantum


def _top_up_attested_as_pledge() -> None:
    """A further pledge to the account's exchange is attested with reason PLEDGE, not TOP_UP."""

    def as_pledge(ledger: Any, change: Any) -> Any:
        if change.reason == _REASON.HOLDINGS_CHANGE_REASON_TOP_UP:
            return dataclasses.replace(change, reason=_REASON.HOLDINGS_CHANGE_REASON_PLEDGE)
        return change

    _rewrite_changes(as_pledge)


def _checks_no_step_amounts() -> None:
    """A liquidation path's steps are recorded without their max_quantity being checked."""
    original = _custodian_pledges._positive_amount

    def positive_amount(parent: Any, name: str, field: str) -> Any:
        if field.startswith("liquidation_path.steps"):
            return Decimal(1)
        return original(parent, name, field)

    _custodian_pledges._positive_amount = positive_amount


# --- pledge release (§5.9) --------------------------------------------------------------


def _bound_releases(refused: Callable[[Any, Decimal], bool], why: str) -> None:
    """Replace the release bound: ``refused(holding, quantity)`` decides, ``why`` says."""

    def check(account: Any, items: list[tuple[str, Decimal]]) -> None:
        for index, (asset_id, quantity) in enumerate(items):
            if refused(account.holding(asset_id), quantity):
                raise StateError(
                    f"release of {quantity} {asset_id} {why}",
                    reason=errors_pb2.ERROR_REASON_STATE_CONFLICT,
                    metadata={"field": f"releases[{index}].quantity"},
                )

    _custodian_pledge_releases.PledgeReleases._check_within_pledge = staticmethod(check)


def _releases_beyond_pledge() -> None:
    """A release is bounded by what is not locked (quantity - locked), not by the pledge."""
    _bound_releases(lambda h, q: q > h.quantity - h.locked, "exceeds quantity - locked")


def _release_bound_exclusive() -> None:
    """Releasing exactly the pledge is refused (the bound taken as exclusive)."""
    _bound_releases(lambda h, q: q >= h.pledged, "is not below the pledge")


def _releases_on_any_holdings() -> None:
    """A consent is executed whatever holdings statement it was judged on."""
    _custodian_pledge_releases.PledgeReleases._check_latest_holdings = lambda *_: None


def _releases_for_any_client() -> None:
    """Only the consenting exchange is checked: any registered client may ask for the release."""
    releases = _custodian_pledge_releases.PledgeReleases

    def check(self: Any, account: Any, consent: Any, request: Any) -> None:
        exchange = consent.issuer
        if exchange != request.message.exchange_id or exchange != account.exchange_id:
            raise VerificationError(
                "not the account's exchange",
                reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"field": "consent.header.issuer", "actual": exchange},
            )

    releases._check_parties = check


def _releases_on_any_exchange_consent() -> None:
    """Only the client is checked: a consent by any registered exchange is obeyed."""
    releases = _custodian_pledge_releases.PledgeReleases

    def check(self: Any, account: Any, consent: Any, request: Any) -> None:
        if request.issuer != account.client_id:
            raise VerificationError(
                "not the account's client",
                reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"field": "request.header.issuer", "actual": request.issuer},
            )

    releases._check_parties = check


def _release_lowers_quantity() -> None:
    """A release is booked as a withdrawal: quantity falls with the pledge."""
    releases = _custodian_pledge_releases.PledgeReleases
    original = releases._move

    def move(account: Any, items: list[tuple[str, Decimal]]) -> None:
        original(account, items)
        for asset_id, quantity in items:
            account.holding(asset_id).quantity -= quantity

    releases._move = staticmethod(move)


def _re_executes_repeated_release() -> None:
    """No record of executed releases is consulted: a repeat is a new release (or REPLAYED)."""
    _custodian_pledge_releases.PledgeReleases._answered = lambda *_: None


#: Fault name -> the patch that introduces it.
def _settlement_funds(
    client_bound: Callable[[Any], Decimal] | None, either_way: bool
) -> Callable[[], None]:
    """The payer's funds judged wrongly: the client's bound replaced, or the client made the
    payer whichever the sign (§10.6)."""

    def patch() -> None:
        settlement = _custodian_settlement.CustodianSettlement
        original = settlement._check_funds

        def check_funds(client: Any, house: Any, asset_id: str, net: Decimal) -> None:
            if client_bound is not None and net > 0:
                available = client_bound(client.holding(asset_id))
                if net > available:
                    raise StateError(
                        f"{client.account_id!r} can pay {available} {asset_id}",
                        reason=errors_pb2.ERROR_REASON_STATE_CONFLICT,
                        metadata={
                            "field": "net_amount",
                            "expected": f"<= {available}",
                            "actual": str(net),
                        },
                    )
                return
            if either_way:
                original(client, house, asset_id, abs(net))
                return
            original(client, house, asset_id, net)

        settlement._check_funds = staticmethod(check_funds)

    return patch


def _settles_what_it_cannot_pay() -> None:
    """At execution the payer's funds are not checked again: a settlement whose payer's pledge
    fell since it was accepted moves anyway (§10.6)."""
    settlement = _custodian_settlement.CustodianSettlement
    original_execute = settlement._execute
    original_check = settlement._check_funds
    executing: list[bool] = []

    def check_funds(client: Any, house: Any, asset_id: str, net: Decimal) -> None:
        if not executing:
            original_check(client, house, asset_id, net)

    def execute(self: Any, found: Any, now: datetime) -> None:
        executing.append(True)
        try:
            original_execute(self, found, now)
        finally:
            executing.pop()

    settlement._check_funds = staticmethod(check_funds)
    settlement._execute = execute


def _settlement_credits_a_quantum_more() -> None:
    """What a settlement credits an account is one quantum (10^-18) more than it debits."""
    original = _custodian_settlement._add

    def add(a: Decimal, b: Decimal) -> Decimal:
        return Decimal(original(a, b)) + Decimal("1e-18")

    _custodian_settlement._add = add


def _settles_zero_net() -> None:
    """No zero check: an instruction of net 0 is recorded, as if something were owed."""

    class _Zero(Decimal):
        __hash__ = Decimal.__hash__

        def __eq__(self, other: object) -> bool:
            return False if other == 0 else Decimal.__eq__(self, other)

    original = _custodian_settlement.amount_from_proto

    def amount_from_proto(message: Any, **kwargs: Any) -> Decimal:
        value = original(message, **kwargs)
        return _Zero(value) if value == 0 else value

    _custodian_settlement.amount_from_proto = amount_from_proto


def _streams_every_account_everywhere() -> None:
    """Each update goes on every exchange's log, not only on that of the account's exchange."""

    def announce(self: Any, exchange: str, *updates: Any) -> None:
        for log in self.sync_logs.values():
            log.append(updates)

    _custodian_ledger.Ledger._announce = announce


FAULTS: dict[str, Callable[[], None]] = {
    # The client pays out of quantity - locked, its pledge ignored.
    "custodian-settles-beyond-pledge": _settlement_funds(
        lambda holding: holding.quantity - holding.locked, either_way=False
    ),
    "custodian-settlement-funds-from-client-either-way": _settlement_funds(None, either_way=True),
    "custodian-settles-zero-net": _settles_zero_net,
    "custodian-settles-what-it-cannot-pay": _settles_what_it_cannot_pay,
    "custodian-settlement-credits-a-quantum-more": _settlement_credits_a_quantum_more,
    "custodian-releases-beyond-pledge": _releases_beyond_pledge,
    "custodian-release-bound-exclusive": _release_bound_exclusive,
    "custodian-releases-on-any-holdings": _releases_on_any_holdings,
    "custodian-releases-for-any-client": _releases_for_any_client,
    "custodian-releases-on-any-exchange-consent": _releases_on_any_exchange_consent,
    "custodian-release-lowers-quantity": _release_lowers_quantity,
    "custodian-re-executes-repeated-release": _re_executes_repeated_release,
    "custodian-signs-checkpoints-with-unregistered-key": _signs_checkpoints_with_unregistered_key,
    "custodian-refuses-checkpoint-at-log-size": _refuses_checkpoint_at_log_size,
    "custodian-alternates-checkpoint-origin": _alternates_checkpoint_origin,
    "custodian-same-size-proof-not-empty": _same_size_proof_not_empty,
    "custodian-redemption-locks-nothing": _redemption_locks_nothing,
    "custodian-redeems-pledged": _redeems_pledged,
    "custodian-redemption-bound-exclusive": _redemption_bound_exclusive,
    "custodian-settles-redemptions-early": _settles_redemptions_early,
    "custodian-never-settles-redemptions": _never_settles_redemptions,
    "custodian-never-refreshes-holdings": _never_refreshes_holdings,
    "custodian-yield-attested-as-deposit": _yield_attested_as_deposit,
    "custodian-cosignature-put-first": _cosignature_put_first,
    "custodian-release-attested-as-liquidation": _release_attested_as_liquidation,
    "custodian-settles-whole-day-early": _settles_whole_day_early,
    "custodian-settles-a-minute-late": _settles_a_minute_late,
    "custodian-dispute-window-from-instruction": _dispute_window_from_instruction,
    "custodian-release-wait-from-issued-at": _release_wait_from_issued_at,
    "custodian-release-wait-is-dispute-window": _release_wait_is_dispute_window,
    "custodian-states-view-when-asked": _states_view_when_asked,
    "custodian-states-cutoff-a-minute-early": _states_cutoff_a_minute_early,
    "custodian-states-current-sync-heads": _states_current_sync_heads,
    "custodian-sells-past-step-maximum": _sells_past_step_maximum,
    "custodian-sells-steps-out-of-order": _sells_steps_out_of_order,
    "custodian-rounds-proceeds-up": _rounds_proceeds_up,
    "custodian-skips-yield-distribution": _skips_yield_distribution,
    "custodian-re-signs-repeated-receipt": _re_signs_repeated_receipt,
    "custodian-liquidates-off-path": _liquidates_off_path,
    "custodian-reads-for-any-registered-party": _reads_for_any_registered_party,
    "custodian-serves-strangers": _serves_strangers,
    "custodian-unknown-account-not-found-to-all": _unknown_account_not_found_to_all,
    "custodian-refusal-names-the-parties": _refusal_names_the_parties,
    "custodian-regulator-reads-nothing": _regulator_reads_nothing,
    "custodian-refuses-public-data-to-strangers": _refuses_public_data_to_strangers,
    "custodian-account-hidden-from-its-exchange": _account_hidden_from_its_exchange,
    "custodian-leaves-statement-id-empty": _leaves_statement_id_empty,
    "custodian-multiplies-at-28-digits": _multiplies_at_28_digits,
    "custodian-takes-instructions-from-any-caller": _takes_instructions_from_any_caller,
    "custodian-judges-stream-instructions-at-receipt": _judges_stream_instructions_at_receipt,
    "custodian-liquidates-on-disputed-calls": _liquidates_on_disputed_calls,
    "custodian-liquidates-before-due-by": _liquidates_before_due_by,
    "custodian-liquidates-at-due-by": _liquidates_at_due_by,
    "custodian-takes-other-accounts-calls": _takes_other_accounts_calls,
    "custodian-records-empty-fills": _records_empty_fills,
    "custodian-skips-steps-priced-at-most-one": _skips_steps_priced_at_most_one,
    "custodian-sells-whole-steps": _sells_whole_steps,
    "custodian-ignores-path-account": lambda: _path_checked_without("account_id"),
    "custodian-ignores-path-exchange": lambda: _path_checked_without("exchange_id"),
    "custodian-reuses-path-id": _reuses_path_id,
    "custodian-pledges-to-two-exchanges": _pledges_to_two_exchanges,
    "custodian-streams-every-account-everywhere": _streams_every_account_everywhere,
    "custodian-pledge-bound-exclusive": _pledge_bound_exclusive,
    "custodian-top-up-attested-as-pledge": _top_up_attested_as_pledge,
    "custodian-checks-no-step-amounts": _checks_no_step_amounts,
    "custodian-answers-reused-liquidation-id": _answers_reused_liquidation_id,
    "custodian-refusal-names-the-field-not-the-caller": _refusal_names_the_field_not_the_caller,
    "custodian-stranger-refusal-names-nobody": _stranger_refusal_names_nobody,
    "custodian-evidence-refusal-names-nobody": _evidence_refusal_names_nobody,
    "custodian-path-superseded-by-the-latest-only": _path_superseded_by_the_latest_only,
    "custodian-only-the-latest-path-authorised": _only_the_latest_path_authorised,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in FAULTS:
        sys.stderr.write(f"usage: broken_custodians.py {{{'|'.join(FAULTS)}}} serve ROLE ...\n")
        return 2
    FAULTS[args[0]]()
    return cli_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
