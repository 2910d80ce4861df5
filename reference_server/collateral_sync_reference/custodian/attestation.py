"""The custodian's attestation log: appending leaves, checkpoints, proofs, and crash recovery.

An operation (``ledger``) records each new holdings statement at a
pre-assigned leaf index in the database. :class:`Attestation` then appends the
new leaves to the attestation log and signs a checkpoint at the operation's
final size (:meth:`Attestation._attest_pending`), and answers the reads:
checkpoints, inclusion and consistency proofs, and an account's latest
holdings statement.

Crash safety between the two files
----------------------------------
The attestation log is pymerkle's own SQLite file, so the two cannot share a
transaction. The order of writes is: (1) the database commit, holding the
signed statements and the sync entries; (2) the leaves, appended durably to the
log; (3) the checkpoint at the new size and the "attested up to" mark, in a
second database transaction. Nothing is announced before step 2 is done: steps
1 to 3 run without yielding to the event loop, so no sync session can send the
new entries and no RPC can answer in between; and a restarted custodian
finishes steps 2 and 3 for every recorded statement (:meth:`Attestation._recover`)
*before* it serves. A failure in step 2 or 3 ends the process at once, so a
statement is never announced while its leaf is missing. The one case the order
cannot exclude is the log ending up *ahead* of the database (the database's
last commits lost to a power failure under ``synchronous=NORMAL``): those
leaves were never announced; they are adopted as orphan statements and the
account's epochs continue after them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime

from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.errors import StateError
from collateral_sync.keys import _to_timestamp
from collateral_sync.merkle import leaf_hash
from collateral_sync.signing import sign_statement
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import attestation_pb2, envelope_pb2

from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.custodian.ledger import _R, Ledger, _not_found
from collateral_sync_reference.custodian.store import StoredCheckpoint, StoredStatement

__all__ = ["Attestation"]

_CHECKPOINT_TYPE = payload_type_of(attestation_pb2.Checkpoint)
_ATTESTED_KEY = "custodian_attested_size"

_LOGGER = logging.getLogger("collateral_sync_reference.custodian")


class Attestation:
    """The attestation log of one custodian, kept in step with its database."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        settings = ledger.settings
        self._log = ledger.storage.attestation_log(
            settings.log_origin, path=settings.attestation_log
        )
        self._attesting = False
        for log in ledger.sync_logs.values():
            # A batch the stream applied commits in the log's own transaction:
            # its statements are attested right after, before anything is sent.
            log.add_listener(self._attest_pending)
        ledger.storage.add_commit_listener(self._after_commit)
        # Before the custodian serves anything (module docstring).
        self._recover()

    @property
    def attestation_log(self) -> AttestationLog:
        return self._log

    def close(self) -> None:
        self._log.close()

    # ------------------------------------------------------------------ attestation

    def _after_commit(self) -> None:
        self._attest_pending()
        for log in self._ledger.sync_logs.values():
            log.notify()

    def _attested_size(self) -> int:
        stored = self._ledger.storage.get_meta(_ATTESTED_KEY)
        return 0 if stored is None else int(stored)

    def _attest_pending(self) -> None:
        """Append recorded-but-unattested leaves and sign their checkpoints (steps 2 and 3)."""
        ledger = self._ledger
        if self._attesting:
            return
        self._attesting = True
        try:
            attested = self._attested_size()
            count = ledger.store.statement_count()
            if attested >= count:
                return
            pending = ledger.store.statements_from(attested)
            self._append_leaves(pending)
            now = ledger.clock.now()
            with ledger.storage.transaction():
                for statement in pending:
                    if statement.checkpoint_after:
                        self._sign_checkpoint(statement.leaf_index + 1, now)
                ledger.storage.set_meta(_ATTESTED_KEY, str(count))
        except Exception as err:
            # Sync entries announcing these statements are committed; serving on
            # would risk sending them without their leaves. Stop now; recovery
            # completes the attestation before the next start serves anything.
            _LOGGER.critical("attestation failed, stopping at once: %r", err, exc_info=err)
            logging.shutdown()
            os._exit(70)
        finally:
            self._attesting = False

    def _append_leaves(self, pending: Sequence[StoredStatement]) -> None:
        """Append the leaves of recorded statements the log does not hold yet."""
        size = self._log.size
        new = [s for s in pending if s.leaf_index >= size]
        if not new:
            return
        if new[0].leaf_index != size:
            raise RuntimeError(
                f"attestation log has {size} leaves, next recorded statement is {new[0].leaf_index}"
            )
        self._log.append_many([statement_leaf(s.envelope) for s in new])

    def _sign_checkpoint(self, size: int, now: datetime) -> StoredCheckpoint:
        """Sign and store a checkpoint at ``size`` leaves; inside a transaction."""
        ledger = self._ledger
        message = attestation_pb2.Checkpoint(
            origin=ledger.settings.log_origin, tree_size=size, root_hash=self._log.root(size)
        )
        message.timestamp.CopyFrom(_to_timestamp(now))
        envelope = sign_statement(
            message,
            ledger.signer,
            audience=["*"],
            sequence=ledger.storage.next_sequence(_CHECKPOINT_TYPE),
            ttl=ledger.settings.checkpoint_ttl,
            issued_at=now,
        )
        checkpoint = StoredCheckpoint(size, envelope, now)
        ledger.store.add_checkpoint(checkpoint)
        return checkpoint

    def _recover(self) -> None:
        """Bring the log and the database into step before serving (module docstring)."""
        ledger = self._ledger
        count = ledger.store.statement_count()
        size = self._log.size
        if size > count:
            self._adopt_orphans(count, size)
        self._attest_pending()
        if ledger.store.latest_checkpoint() is None:
            with ledger.storage.transaction():
                self._sign_checkpoint(self._log.size, ledger.clock.now())

    def _adopt_orphans(self, count: int, size: int) -> None:
        ledger = self._ledger
        _LOGGER.warning(
            "attestation log holds %d leaves the database does not know (indexes %d..%d): "
            "adopting them as never-announced orphans",
            size - count,
            count,
            size - 1,
        )
        with ledger.storage.transaction():
            for index in range(count, size):
                leaf = self._log.leaf(index)
                payload_type, payload = _split_pae(leaf)
                # Ed25519 is deterministic: signing the same bytes again gives the
                # signature the lost envelope carried.
                envelope = envelope_pb2.Envelope(
                    payload=payload,
                    payload_type=payload_type,
                    signatures=[
                        envelope_pb2.Signature(
                            key_id=ledger.signer.key_id, sig=ledger.signer.sign(leaf)
                        )
                    ],
                )
                statement = attestation_pb2.HoldingsStatement.FromString(payload)
                account = ledger.store.account(statement.account_id)
                if account is not None and statement.epoch > account.epoch:
                    account.epoch = statement.epoch
                    ledger.store.save_account(account)
                ledger.store.add_statement(
                    StoredStatement(
                        leaf_index=index,
                        account_id=statement.account_id,
                        epoch=statement.epoch,
                        reason=statement.reason,
                        envelope=envelope,
                        attestation=attestation_pb2.AttestationRef(
                            log_origin=ledger.settings.log_origin,
                            leaf_index=index,
                            leaf_hash=leaf_hash(leaf),
                            tree_size=size,
                        ),
                        checkpoint_after=index == size - 1,
                        orphan=True,
                    )
                )

    # ------------------------------------------------------------------ reads

    def latest_checkpoint(self) -> envelope_pb2.Envelope:
        """The latest checkpoint, re-signed first if it is older than the interval."""
        ledger = self._ledger
        latest = ledger.store.latest_checkpoint()
        now = ledger.clock.now()
        if (
            latest is None
            or latest.tree_size != self._log.size
            or now - latest.issued_at >= ledger.settings.checkpoint_interval
        ):
            with ledger.storage.transaction():
                latest = self._sign_checkpoint(self._log.size, now)
        return latest.envelope

    def checkpoint(self, tree_size: int) -> envelope_pb2.Envelope:
        ledger = self._ledger
        if tree_size == 0:
            return self.latest_checkpoint()
        size = self._log.size
        if tree_size > size:
            raise StateError(
                f"tree size {tree_size} is beyond the log of {size} leaves",
                reason=_R.ERROR_REASON_OUT_OF_RANGE,
                metadata={"field": "tree_size", "expected": f"<= {size}", "actual": str(tree_size)},
            )
        found = ledger.store.checkpoint_at(tree_size)
        if found is None:
            raise StateError(
                f"no checkpoint was signed at tree size {tree_size}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "tree_size",
                    "expected": "a size a checkpoint was signed at",
                    "actual": str(tree_size),
                },
            )
        now = ledger.clock.now()
        if (
            now - found.issued_at
            >= ledger.settings.checkpoint_ttl - ledger.settings.checkpoint_interval
        ):
            # Same size, same root: a fresh signature, so the answer is still verifiable.
            with ledger.storage.transaction():
                found = self._sign_checkpoint(tree_size, now)
        return found.envelope

    def _latest_size(self) -> int:
        latest = self._ledger.store.latest_checkpoint()
        return self._log.size if latest is None else latest.tree_size

    def inclusion_proof(
        self, leaf_index: int, tree_size: int
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.InclusionProof]:
        size = tree_size or self._latest_size()
        proof = self._log.inclusion_proof(leaf_index, size)
        stored = self._ledger.store.statement(leaf_index)
        if stored is None:  # pragma: no cover - every leaf has its record after recovery
            raise _not_found("leaf", str(leaf_index), "leaf_index")
        return stored.envelope, proof

    def consistency_proof(
        self, first_tree_size: int, second_tree_size: int
    ) -> attestation_pb2.ConsistencyProof:
        second = second_tree_size or self._latest_size()
        return self._log.consistency_proof(first_tree_size, second)

    def holdings_statement(
        self, account_id: str
    ) -> tuple[envelope_pb2.Envelope, attestation_pb2.AttestationRef]:
        if not account_id:
            raise _required("account_id", "an account id")
        stored = self._ledger.store.latest_statement(account_id)
        if stored is None:
            raise _not_found("account", account_id, "account_id")
        return stored.envelope, stored.attestation

    # ------------------------------------------------------------------ who may read

    def readers_of_leaf(self, leaf_index: int) -> frozenset[str] | None:
        """The audience of the holdings statement at ``leaf_index`` (None: no such leaf)."""
        stored = self._ledger.store.statement(leaf_index)
        return None if stored is None else _audience(stored.envelope)

    def readers_of_account(self, account_id: str) -> frozenset[str] | None:
        """The audience of the account's latest holdings statement (None: no such account)."""
        if not account_id:
            raise _required("account_id", "an account id")
        stored = self._ledger.store.latest_statement(account_id)
        return None if stored is None else _audience(stored.envelope)


def _audience(envelope: envelope_pb2.Envelope) -> frozenset[str]:
    # Our own statement, signed by us: parsing it trusts nothing new.
    return frozenset(attestation_pb2.HoldingsStatement.FromString(envelope.payload).header.audience)


def _split_pae(leaf: bytes) -> tuple[str, bytes]:
    """(payload_type, payload) of a leaf ``PAE(payload_type, payload)`` we wrote ourselves."""
    magic, type_length, rest = leaf.split(b" ", 2)
    if magic != b"DSSEv1":
        raise ValueError("attestation log leaf is not a DSSEv1 PAE")
    length = int(type_length)
    payload_type = rest[:length].decode("utf-8")
    payload_length, payload = rest[length + 1 :].split(b" ", 1)
    if len(payload) != int(payload_length):
        raise ValueError("attestation log leaf has a payload of the wrong length")
    return payload_type, payload
