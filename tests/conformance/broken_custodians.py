"""Reference custodians that attest, prove, release or settle wrongly while refusing nothing.

Each patch breaks exactly one rule of the custodian's positive behaviour
(docs/PROTOCOL.md §5 checkpoints and proofs, Appendix A redemptions and yield,
§9 liquidation, §10 emergency release, §10.6 settlement), so that the case
written for that rule is the one that must catch it
(tests/conformance/test_kit_broken_custodians.py).
Most of these faults change what the custodian *signs*, which a fault proxy
cannot fake. Like :mod:`.broken_servers`, whose machinery is reused, it runs
the ordinary server command line in the same process::

    python tests/conformance/broken_custodians.py FAULT serve custodian --config FILE ...

The faults live apart from :data:`.broken_servers.FAULTS` because that table is
required to be tested, fault for fault, by test_kit_broken_servers.py.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from collateral_sync._cli import main as cli_main
from collateral_sync.errors import StateError
from collateral_sync.keys import SigningKey
from collateral_sync.signing import sign_statement
from collateral_sync.v1 import attestation_pb2, errors_pb2, liquidation_pb2, reconciliation_pb2
from collateral_sync_reference.common import access as _access_module
from collateral_sync_reference.common import emergency as _cosigner_module
from collateral_sync_reference.custodian import attestation as _attestation_module
from collateral_sync_reference.custodian import emergency as _emergency_module
from collateral_sync_reference.custodian import ledger as _ledger_module
from collateral_sync_reference.custodian import liquidations as _liquidations_module
from collateral_sync_reference.custodian import redemptions as _redemptions_module
from collateral_sync_reference.custodian import role as _role_module
from collateral_sync_reference.custodian import settlement as _settlement_module
from collateral_sync_reference.custodian import store as _store_module

# Patched by name: what they import is their business, so they are typed loosely here.
_custodian_attestation: Any = _attestation_module
_custodian_ledger: Any = _ledger_module
_custodian_liquidations: Any = _liquidations_module
_custodian_redemptions: Any = _redemptions_module
_custodian_emergency: Any = _emergency_module
_custodian_settlement: Any = _settlement_module
_custodian_store: Any = _store_module
_cosigner: Any = _cosigner_module
_access: Any = _access_module
_custodian_role: Any = _role_module

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


#: Fault name -> the patch that introduces it.
FAULTS: dict[str, Callable[[], None]] = {
    "custodian-signs-checkpoints-with-unregistered-key": _signs_checkpoints_with_unregistered_key,
    "custodian-refuses-checkpoint-at-log-size": _refuses_checkpoint_at_log_size,
    "custodian-alternates-checkpoint-origin": _alternates_checkpoint_origin,
    "custodian-same-size-proof-not-empty": _same_size_proof_not_empty,
    "custodian-redemption-locks-nothing": _redemption_locks_nothing,
    "custodian-redeems-pledged": _redeems_pledged,
    "custodian-redemption-bound-exclusive": _redemption_bound_exclusive,
    "custodian-settles-redemptions-early": _settles_redemptions_early,
    "custodian-never-settles-redemptions": _never_settles_redemptions,
    "custodian-yield-attested-as-deposit": _yield_attested_as_deposit,
    "custodian-cosignature-put-first": _cosignature_put_first,
    "custodian-release-attested-as-liquidation": _release_attested_as_liquidation,
    "custodian-settles-whole-day-early": _settles_whole_day_early,
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
