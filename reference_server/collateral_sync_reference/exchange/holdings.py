"""The holdings the reference exchange credits: received from the custodian, proven, then counted.

A holdings statement arrives on the custodian's stream
(:meth:`AttestedHoldings.receive_holdings`, inside the batch's transaction)
and is recorded as *pending*, with the liquidation path its pledge announces;
pledge changes and yield accruals are recorded beside it. The attestation
checker (``attestation``) settles the pending statements
(:meth:`~AttestedHoldings.settle_holdings`): an account's credited holdings
become its highest proven epoch, and the account is revalued. The custodian
checkpoint the checker trusts, and any refused one as evidence, are kept here
too; those that prove the custodian equivocated (a fork, a failed consistency
proof) are what the exchange serves regulators besides its sync log's
evidence (PROTOCOL.md §10.7, ``common/evidence.py``).

Why holdings are not credited inside the stream's apply: proving a statement
is in the custodian's log needs the custodian's checkpoint, consistency proof
and inclusion proof, i.e. network calls, and the apply callback runs inside
the transaction that stores the batch, which must never wait on the network
(the stream would stall and every other writer with it). So apply only
verifies the statement's signature, audience and sequence, and records it as
*pending*; the attestation checker (``attestation``) fetches the proofs
outside any transaction and then credits or rejects it here. Until then the
statement counts for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from collateral_sync.amounts import check_amount, format_amount, parse_amount
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    VerificationError,
    reason_name,
)
from collateral_sync.signing import VerifiedStatement, verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    envelope_pb2,
    equivocation_pb2,
    errors_pb2,
    liquidation_pb2,
    position_sync_pb2,
)

from collateral_sync_reference.exchange.context import (
    ExchangeContext,
    Revaluation,
    malformed,
    timestamp_ns,
    to_ns,
)
from collateral_sync_reference.exchange.custodian_statements import CustodianStatements
from collateral_sync_reference.exchange.store import CheckpointEvidenceRow, HoldingsRow

__all__ = ["AttestedHoldings"]

_R = errors_pb2.ErrorReason


class AttestedHoldings:
    """Holdings statements from the custodian's stream, pending until proven, then credited."""

    def __init__(
        self,
        context: ExchangeContext,
        statements: CustodianStatements,
    ) -> None:
        self._context = context
        self._statements = statements
        self._store = context.store
        self._settings = context.settings
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a holdings statement is recorded as pending."""
        self._listeners.append(listener)

    def announce_pending(self) -> None:
        """Call the listeners: statements were recorded as pending in the open transaction."""
        for listener in self._listeners:
            listener()

    def receive_holdings(
        self, sequence: int, change: position_sync_pb2.HoldingsChange, now: datetime
    ) -> None:
        """A holdings change on the stream: record its statement as pending (not yet credited)."""
        verified = self._statements.verify_embedded(
            change.holdings_statement, attestation_pb2.HoldingsStatement, now
        )
        statement = verified.message
        if not statement.account_id:
            raise malformed("holdings_change.holdings_statement.account_id", "an account id", "''")
        if not change.HasField("attestation"):
            raise malformed("holdings_change.attestation", "an AttestationRef", "absent")
        path_id = None
        if change.HasField("liquidation_path"):
            path_id = self._pledged_path(change.liquidation_path, verified)
        self._store.accounts.ensure(statement.account_id)
        if path_id is not None:
            self._store.liquidations.set_path(statement.account_id, path_id)
        holdings_id = self._store.holdings.add(
            account_id=statement.account_id,
            epoch=statement.epoch,
            exchange_id=statement.exchange_id,
            envelope=change.holdings_statement,
            attestation=change.attestation,
            sync_sequence=sequence,
            received_at_ns=to_ns(now),
        )
        try:
            _check_positions(statement)
        except CollateralSyncError as err:
            # Signed, but no valuation can use it: never credited, kept with the reason.
            self._store.holdings.decide(
                holdings_id,
                status="rejected",
                reason=err.reason_name,
                detail=err.message,
                at_ns=to_ns(now),
            )
            return
        self._context.replay.record(verified)

    def _pledged_path(
        self,
        envelope: envelope_pb2.Envelope,
        holdings: VerifiedStatement[attestation_pb2.HoldingsStatement],
    ) -> str:
        """The statement id of the pre-authorised path a pledge announces (PROTOCOL.md §9.1).

        The client addressed the path to the custodian, which relays it: it is
        checked as the custodian checked it when it recorded the pledge (stages
        a-f, audience the custodian, at the holdings statement's issued_at; no
        replay stage, as every top-up carries the path in force again), and it
        must pre-authorise the liquidation of this account by this exchange.
        A path that fails is a false statement of the custodian's and fails the
        batch, like any embedded statement that does not verify (§6.5).
        """
        path = verify_statement(
            envelope,
            self._context.registry,
            expected_type=liquidation_pb2.LiquidationPath,
            audience=self._settings.custodian_id,
            now=holdings.header.issued_at.ToDatetime(tzinfo=UTC),
            max_skew=self._settings.max_skew,
        )
        message = path.message
        account_id = holdings.message.account_id
        for name, expected, actual in (
            ("account_id", account_id, message.account_id),
            ("exchange_id", self._context.party_id, message.exchange_id),
        ):
            if actual != expected:
                raise VerificationError(
                    f"holdings_change.liquidation_path.{name} is {actual!r}: it does not "
                    f"pre-authorise liquidating {account_id!r} by {self._context.party_id!r}",
                    reason=_R.ERROR_REASON_PATH_NOT_AUTHORISED,
                    metadata={
                        "field": f"holdings_change.liquidation_path.{name}",
                        "expected": expected,
                        "actual": actual,
                    },
                )
        if not path.header.statement_id:
            raise malformed(
                "holdings_change.liquidation_path.header.statement_id", "a statement id", "''"
            )
        return path.header.statement_id

    def receive_pledge_change(self, sequence: int, change: position_sync_pb2.PledgeChange) -> None:
        """A pledge change on the stream (inside the batch's transaction)."""
        # Recorded for the record: what counts is the attested holdings
        # statement the change points at, which arrives as a holdings_change.
        if not change.account_id or not change.asset_id:
            raise malformed("pledge_change.account_id/asset_id", "non-empty ids", "''")
        quantity = check_amount(
            change.pledged_quantity.value, field="pledge_change.pledged_quantity"
        )
        self._store.holdings.add_pledge_change(
            sync_sequence=sequence,
            account_id=change.account_id,
            asset_id=change.asset_id,
            pledged_quantity=quantity,
            attestation=change.attestation,
        )

    def receive_yield_accrual(self, sequence: int, accrual: position_sync_pb2.YieldAccrual) -> None:
        """A yield accrual on the stream, recorded beside the holdings (they count nothing)."""
        if not accrual.account_id or not accrual.asset_id:
            raise malformed("yield_accrual.account_id/asset_id", "non-empty ids", "''")
        quantity = check_amount(
            accrual.accrued_quantity.value, field="yield_accrual.accrued_quantity"
        )
        self._store.holdings.add_yield_accrual(
            sync_sequence=sequence,
            account_id=accrual.account_id,
            asset_id=accrual.asset_id,
            accrued_quantity=quantity,
            accrual_time_ns=timestamp_ns(accrual.accrual_time),
            attestation=accrual.attestation,
        )

    # -- attestation outcomes (from the attestation checker) --

    def pending_holdings(self) -> list[HoldingsRow]:
        """Statements received and not yet credited or rejected, oldest first."""
        return self._store.holdings.pending()

    def settle_holdings(
        self,
        credited: Iterable[int],
        rejected: Iterable[tuple[int, CollateralSyncError]],
        superseded: Iterable[int] = (),
    ) -> list[Revaluation]:
        """Record the attestation checker's verdicts in one transaction, then revalue.

        ``credited``: statements proven in the custodian's log; the account's
        credited holdings become the highest credited epoch. ``rejected``:
        statements whose proof failed, with the error (never credited).
        ``superseded``: pending statements not checked because a later epoch
        of the same account was (they are never credited either).
        """
        now = self._context.now()
        touched: set[str] = set()
        with self._context.storage.transaction():
            for holdings_id, error in rejected:
                row = self._store.holdings.get(holdings_id)
                if row is None or row.status != "pending":
                    continue
                self._store.holdings.decide(
                    holdings_id,
                    status="rejected",
                    reason=error.reason_name,
                    detail=error.message,
                    at_ns=to_ns(now),
                )
                self._context.logger.warning(
                    "holdings statement of %s epoch %d not credited: %s",
                    row.account_id,
                    row.epoch,
                    error.message,
                )
            for holdings_id in superseded:
                self._store.holdings.decide(
                    holdings_id,
                    status="rejected",
                    reason="SUPERSEDED",
                    detail="a later epoch of the account was received before this one was checked",
                    at_ns=to_ns(now),
                )
            for holdings_id in credited:
                row = self._store.holdings.get(holdings_id)
                if row is None or row.status != "pending":
                    continue
                self._store.holdings.decide(
                    holdings_id, status="credited", reason="", detail="", at_ns=to_ns(now)
                )
                account = self._store.accounts.get(row.account_id)
                current = (
                    None
                    if account is None or account.credited_holdings_id is None
                    else self._store.holdings.get(account.credited_holdings_id)
                )
                if current is None or row.epoch > current.epoch:
                    self._store.accounts.set_credited_holdings(row.account_id, holdings_id)
                    touched.add(row.account_id)
            return self._context.revalue_each(sorted(touched), now)

    def trusted_checkpoint(self, origin: str) -> envelope_pb2.Envelope | None:
        """The custodian checkpoint last trusted for ``origin``, if any."""
        return self._store.checkpoints.trusted(origin)

    def trust_checkpoint(
        self, origin: str, envelope: envelope_pb2.Envelope, tree_size: int
    ) -> None:
        """Persist the custodian checkpoint the attestation checker now trusts."""
        with self._context.storage.transaction():
            self._store.checkpoints.set_trusted(origin, envelope, tree_size)

    def keep_checkpoint_evidence(
        self,
        origin: str,
        *,
        reason: str,
        detail: str,
        received: envelope_pb2.Envelope,
        proof: bytes | None,
    ) -> None:
        """Keep a refused checkpoint, with the trusted one it contradicts, as evidence.

        Kept in a transaction of its own, durably, whatever becomes of the
        statements that needed the checkpoint. The same conflict shown again
        (the custodian serving its fork at every retry, each time signed anew)
        is kept once: the first signed proof of it is enough.
        """
        now = self._context.now()
        shown = _size_and_root(received)
        with self._context.storage.transaction():
            held = self._store.checkpoints.trusted(origin)
            if any(
                kept.reason == reason
                and kept.held == held
                and _size_and_root(kept.received) == shown
                for kept in self._store.checkpoints.evidence(origin)
            ):
                return
            self._store.checkpoints.add_evidence(
                origin=origin,
                reason=reason,
                detail=detail,
                held=held,
                received=received,
                proof=proof,
                at_ns=to_ns(now),
            )

    def equivocation_evidence(self) -> list[equivocation_pb2.EquivocationEvidence]:
        """The refused checkpoints that prove the custodian equivocated (PROTOCOL.md §10.7).

        Of what :meth:`keep_checkpoint_evidence` keeps, two kinds are evidence
        a third party can check: a fork (the trusted checkpoint and one of the
        same size with another root) and a larger checkpoint whose well-formed
        consistency proof from the trusted one does not reproduce both roots.
        A rollback, or a proof that is malformed or missing, is kept for the
        operators but accuses nobody: the custodian may have served an old
        checkpoint or a bad proof of a sound log.
        """
        return [
            found
            for row in self._store.checkpoints.evidence()
            if (found := _checkpoint_equivocation(row)) is not None
        ]

    # -- who may read (PROTOCOL.md §4.5) --

    def readers_of_account(self, account_id: str) -> frozenset[str] | None:
        """The account's parties as its latest holdings statement names them (None: none received).

        The statement's issuer (the custodian) and audience (the client and
        this exchange): the custodian says who the account's parties are. Any
        statement stored passed its signature and audience checks on receipt,
        so its header is trusted whether or not it was credited since.
        """
        latest = self._store.holdings.latest(account_id)
        if latest is None:
            return None
        header = attestation_pb2.HoldingsStatement.FromString(latest.envelope.payload).header
        return frozenset({header.issuer, *header.audience})

    def credited_holdings(self, account_id: str) -> HoldingsRow | None:
        """The account's credited holdings statement, if any."""
        account = self._store.accounts.get(account_id)
        if account is None or account.credited_holdings_id is None:
            return None
        return self._store.holdings.get(account.credited_holdings_id)


def _size_and_root(envelope: envelope_pb2.Envelope) -> tuple[int, bytes]:
    checkpoint = attestation_pb2.Checkpoint.FromString(envelope.payload)
    return checkpoint.tree_size, checkpoint.root_hash


def _checkpoint_equivocation(
    row: CheckpointEvidenceRow,
) -> equivocation_pb2.EquivocationEvidence | None:
    """The evidence a refused checkpoint gives against the custodian, if it gives any.

    Both checkpoints were verified as the custodian's before they were trusted
    or refused (``attestation``): the payloads parse and the issuer is the
    custodian.
    """
    if row.held is None:
        return None
    held = attestation_pb2.Checkpoint.FromString(row.held.payload)
    received = attestation_pb2.Checkpoint.FromString(row.received.payload)
    kinds = equivocation_pb2.EquivocationKind
    evidence = equivocation_pb2.EquivocationEvidence(
        accused_party_id=received.header.issuer,
        log_origin=row.origin,
        tree_size=held.tree_size,
        first=row.held,
        second=row.received,
        first_hash=held.root_hash,
        second_hash=received.root_hash,
    )
    if received.tree_size == held.tree_size and received.root_hash != held.root_hash:
        evidence.kind = kinds.EQUIVOCATION_KIND_CHECKPOINT_FORK
    elif (
        received.tree_size > held.tree_size
        and row.reason == reason_name(_R.ERROR_REASON_CHECKPOINT_INCONSISTENT)
        and row.proof is not None
    ):
        evidence.kind = kinds.EQUIVOCATION_KIND_CHECKPOINT_INCONSISTENT
        evidence.consistency_proof.ParseFromString(row.proof)
    else:
        return None
    evidence.detected_at.FromNanoseconds(row.detected_at_ns)
    return evidence


def _check_positions(statement: attestation_pb2.HoldingsStatement) -> None:
    """Positions a valuation can use: asset ids, canonical non-negative quantities (§7.2)."""
    for i, position in enumerate(statement.positions):
        field = f"holdings_statement.positions[{i}]"
        if not position.asset_id:
            raise malformed(f"{field}.asset_id", "an asset id", "''")
        for name in ("quantity", "locked_quantity", "pledged_quantity"):
            if not position.HasField(name):
                raise malformed(f"{field}.{name}", "a Decimal", "absent")
            value = parse_amount(getattr(position, name).value, field=f"{field}.{name}")
            if value < 0:
                raise MalformedError(
                    f"{field}.{name}: expected >= 0, got {format_amount(value)}",
                    reason=_R.ERROR_REASON_INVALID_AMOUNT,
                    metadata={
                        "field": f"{field}.{name}",
                        "expected": ">= 0",
                        "actual": format_amount(value),
                    },
                )
