"""The reference exchange's attestation checker: no holdings count until the custodian's log proves them.

A holdings statement arrives on the sync stream with an ``AttestationRef``
(log origin, leaf index, leaf hash, tree size). Before the exchange credits
it, :class:`AttestationChecker` proves it is in the custodian's append-only
log (docs/PROTOCOL.md §5.5, §5.6):

1. the reference matches the statement: configured origin, leaf hash of
   ``PAE(payload_type, payload)`` as received, index below the tree size;
2. a checkpoint at least that large is trusted: the custodian's latest
   checkpoint is fetched and verified (signature by the custodian, origin),
   and accepted only through a :class:`~collateral_sync.attestation.CheckpointMonitor`
   that moves forward along a verifying consistency proof from the last
   trusted one (the first is trusted on first use). The trusted checkpoint is
   kept in the exchange's storage, so a restart does not trust anew; a
   refused checkpoint (rollback, fork, proof that does not verify) is kept as
   evidence;
3. the inclusion proof of the leaf under the trusted checkpoint verifies.

Any failure rejects the statement with its reason; it is never credited.
Transport failures (custodian unreachable) are not verdicts: the statement
stays pending and is checked again. The checker runs as a background task,
outside every database transaction: the network is never awaited while the
database is locked, and the sync stream never waits for it.

Only the newest pending statement of each account is checked; older pending
ones are superseded by it (they would be replaced the moment it is credited).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import grpc
from collateral_sync.attestation import CheckpointMonitor, statement_leaf, verify_checkpoint
from collateral_sync.clients import CustodianClient
from collateral_sync.errors import CollateralSyncError, ProofError, RPCError, VerificationError
from collateral_sync.keys import KeyRegistry
from collateral_sync.merkle import leaf_hash, verify_inclusion_proof
from collateral_sync.signing import DEFAULT_MAX_SKEW
from collateral_sync.v1 import attestation_pb2, custodian_service_pb2, envelope_pb2, errors_pb2

from collateral_sync_reference.exchange.holdings import AttestedHoldings
from collateral_sync_reference.exchange.store import HoldingsRow

__all__ = ["TRANSIENT_CODES", "AttestationChecker"]

_R = errors_pb2.ErrorReason
#: Statuses that say "try again later", not "this is wrong".
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
_CONCURRENT_PROOFS = 16


class _NotYetCoveredError(Exception):
    """The custodian has not yet signed a checkpoint that includes the leaf."""


class AttestationChecker:
    """Checks pending holdings statements against the custodian's log; see the module docstring."""

    def __init__(
        self,
        holdings: AttestedHoldings,
        client: CustodianClient,
        *,
        origin: str,
        custodian_id: str,
        registry: KeyRegistry,
        clock: Callable[[], datetime],
        max_skew: timedelta = DEFAULT_MAX_SKEW,
        retry_interval: float = 0.2,
        max_retry_interval: float = 2.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self._holdings = holdings
        self._client = client
        self._origin = origin
        self._custodian_id = custodian_id
        self._registry = registry
        self._clock = clock
        self._max_skew = max_skew
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._logger = logger or logging.getLogger("collateral_sync_reference.exchange")
        self._monitor = CheckpointMonitor()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        stored = holdings.trusted_checkpoint(origin)
        if stored is not None:
            # Verified when it was accepted; the signature and origin still hold.
            self._monitor.advance(attestation_pb2.Checkpoint.FromString(stored.payload), None)
        holdings.add_listener(self.wake)

    def wake(self) -> None:
        """Something may be pending: check soon."""
        self._idle.clear()
        self._wake.set()

    @property
    def trusted_tree_size(self) -> int:
        held = self._monitor.latest(self._origin)
        return 0 if held is None else held.tree_size

    async def wait_idle(self) -> None:
        """Return once nothing is pending that could be decided now (for tests and drivers)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Check whatever is pending, whenever woken, until cancelled."""
        delay = self._retry_interval
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                waiting = await self.check_pending()
            except (RPCError, OSError, TimeoutError) as err:
                self._logger.info("attestation check postponed: %s", err)
                waiting = True
            except Exception:  # the checker must outlive a bug: log it, retry later
                self._logger.exception("attestation check failed; retrying")
                waiting = True
            if waiting:
                # Retry with backoff: the custodian is down, or has not yet
                # signed a checkpoint that covers what it sent.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                self._wake.set()
                delay = min(delay * 2, self._max_retry_interval)
            else:
                delay = self._retry_interval
                if not self._wake.is_set():
                    self._idle.set()

    async def check_pending(self) -> bool:
        """Decide every pending statement that can be decided now; True if some must wait."""
        rows = self._holdings.pending_holdings()
        if not rows:
            return False
        newest: dict[str, HoldingsRow] = {}
        for row in rows:
            held = newest.get(row.account_id)
            if held is None or (row.epoch, row.id) > (held.epoch, held.id):
                newest[row.account_id] = row
        candidates = sorted(newest.values(), key=lambda r: r.id)

        needed = max(row.attestation.tree_size for row in candidates)
        refresh_error: CollateralSyncError | None = None
        if self.trusted_tree_size < needed:
            try:
                await self._refresh_checkpoint()
            except RPCError as err:
                if err.code in TRANSIENT_CODES:
                    raise
                refresh_error = err
            except CollateralSyncError as err:
                refresh_error = err

        credited: list[int] = []
        rejected: list[tuple[int, CollateralSyncError]] = []
        waiting = False
        limit = asyncio.Semaphore(_CONCURRENT_PROOFS)

        async def check(row: HoldingsRow) -> None:
            nonlocal waiting
            async with limit:
                try:
                    await self._check(row, refresh_error)
                except _NotYetCoveredError:
                    waiting = True
                    return
                except RPCError as err:
                    if err.code in TRANSIENT_CODES:
                        waiting = True
                        return
                    rejected.append((row.id, err))
                    return
                except CollateralSyncError as err:
                    rejected.append((row.id, err))
                    return
            credited.append(row.id)

        await asyncio.gather(*(check(row) for row in candidates))
        decided = set(credited) | {row_id for row_id, _ in rejected}
        decided_accounts = {row.account_id for row in candidates if row.id in decided}
        superseded = [
            row.id
            for row in rows
            if row.account_id in decided_accounts and row.id != newest[row.account_id].id
        ]
        if credited or rejected or superseded:
            self._holdings.settle_holdings(credited, rejected, superseded)
        return waiting

    async def _check(self, row: HoldingsRow, refresh_error: CollateralSyncError | None) -> None:
        ref = row.attestation
        leaf = statement_leaf(row.envelope)
        if ref.log_origin != self._origin:
            raise ProofError(
                f"attestation log origin: expected {self._origin!r}, got {ref.log_origin!r}",
                metadata={"expected": self._origin, "actual": ref.log_origin},
            )
        computed = leaf_hash(leaf)
        if ref.leaf_hash != computed:
            raise ProofError(
                "attestation leaf_hash does not match the statement's leaf: expected "
                f"{computed.hex()}, got {ref.leaf_hash.hex()}",
                metadata={"expected": computed.hex(), "actual": ref.leaf_hash.hex()},
            )
        if not ref.leaf_index < ref.tree_size:
            raise ProofError(
                f"attestation leaf_index {ref.leaf_index} is not below its tree_size {ref.tree_size}",
                metadata={"expected": f"< {ref.tree_size}", "actual": str(ref.leaf_index)},
            )
        checkpoint = self._monitor.latest(self._origin)
        if checkpoint is None or checkpoint.tree_size < ref.tree_size:
            if refresh_error is not None:
                raise refresh_error
            raise _NotYetCoveredError
        response = await self._client.get_inclusion_proof(
            custodian_service_pb2.GetInclusionProofRequest(
                leaf_index=ref.leaf_index, tree_size=checkpoint.tree_size
            )
        )
        proof = response.proof
        if proof.leaf_index != ref.leaf_index:
            raise ProofError(
                f"inclusion proof is for leaf {proof.leaf_index}, expected {ref.leaf_index}",
                metadata={"expected": str(ref.leaf_index), "actual": str(proof.leaf_index)},
            )
        verify_inclusion_proof(proof, leaf, checkpoint)

    async def _refresh_checkpoint(self) -> None:
        """Fetch the custodian's latest checkpoint and trust it if it extends the trusted one."""
        response = await self._client.get_checkpoint(
            custodian_service_pb2.GetCheckpointRequest(tree_size=0)
        )
        envelope = response.checkpoint
        checkpoint = verify_checkpoint(
            envelope,
            self._registry,
            origin=self._origin,
            now=self._clock(),
            max_skew=self._max_skew,
        )
        if checkpoint.header.issuer != self._custodian_id:
            raise VerificationError(
                f"checkpoint issued by {checkpoint.header.issuer!r}, expected the custodian "
                f"{self._custodian_id!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": self._custodian_id, "actual": checkpoint.header.issuer},
            )
        held = self._monitor.latest(self._origin)
        proof: attestation_pb2.ConsistencyProof | None = None
        if held is not None and 0 < held.tree_size < checkpoint.tree_size:
            proof = (
                await self._client.get_consistency_proof(
                    custodian_service_pb2.GetConsistencyProofRequest(
                        first_tree_size=held.tree_size, second_tree_size=checkpoint.tree_size
                    )
                )
            ).proof
        try:
            self._monitor.advance(checkpoint, proof)
        except CollateralSyncError as err:
            self._keep_evidence(err, envelope, proof)
            raise
        if held is None or checkpoint.tree_size > held.tree_size:
            self._holdings.trust_checkpoint(self._origin, envelope, checkpoint.tree_size)

    def _keep_evidence(
        self,
        error: CollateralSyncError,
        received: envelope_pb2.Envelope,
        proof: attestation_pb2.ConsistencyProof | None,
    ) -> None:
        self._logger.error("custodian checkpoint refused: %s", error.message)
        self._holdings.keep_checkpoint_evidence(
            self._origin,
            reason=error.reason_name,
            detail=error.message,
            received=received,
            proof=None if proof is None else proof.SerializeToString(),
        )
