"""What ``make demo`` relied on, proven as it goes and kept as evidence an auditor checks offline.

:class:`Evidence` proves each holdings statement the way the exchange must
before it credits one: the custodian's checkpoint at the statement's tree size
(signature, origin, freshness), a consistency proof from the last checkpoint
trusted (the log only grew), and the statement's inclusion proof. Everything
that passed is kept, with the time it was relied on, and becomes two
``AuditBundle`` files: one per relying party, because a bundle verifies every
statement for one audience — holdings statements are addressed to the
exchange (as is the custodian's liquidation receipt), margin calls, credit lines,
the liquidation instruction and the shortfall allocation to the custodian.
A third bundle is the regulator's: the reconciliation results it published
and the receipt of the emergency release it drove.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from collateral_sync.attestation import CheckpointMonitor, statement_leaf, verify_checkpoint
from collateral_sync.clients import CustodianClient
from collateral_sync.errors import ProofError, StateError
from collateral_sync.keys import KeyRegistry
from collateral_sync.merkle import leaf_hash, verify_consistency_proof, verify_inclusion_proof
from collateral_sync.v1 import attestation_pb2, audit_pb2, custodian_service_pb2, envelope_pb2
from google.protobuf import timestamp_pb2

__all__ = ["Evidence", "Proven"]


@dataclass(frozen=True, slots=True)
class Proven:
    """How one holdings statement was proven to be in the custodian's log."""

    checkpoint: attestation_pb2.Checkpoint
    inclusion: attestation_pb2.InclusionProof
    #: The tree size trusted before (0 for the first checkpoint, trusted on first use).
    previous_size: int
    #: Hashes in the consistency proof from ``previous_size``; None if nothing new was trusted.
    consistency_hashes: int | None


def _stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class Evidence:
    """Proves holdings statements against the custodian's log and keeps what was relied on."""

    def __init__(
        self,
        custodian: CustodianClient,
        registry: KeyRegistry,
        *,
        origin: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._custodian = custodian
        self._registry = registry
        self._origin = origin
        self._clock = clock
        self._monitor = CheckpointMonitor()
        self._trusted: attestation_pb2.Checkpoint | None = None
        self._checkpoints: list[audit_pb2.Evidence] = []
        self._consistency: list[attestation_pb2.ConsistencyProof] = []
        self._attested: list[audit_pb2.Evidence] = []
        self._custodian_relied: list[audit_pb2.Evidence] = []
        self._exchange_relied: list[audit_pb2.Evidence] = []
        self._regulator_relied: list[audit_pb2.Evidence] = []
        self._kept: set[bytes] = set()

    async def prove_holdings(
        self,
        envelope: envelope_pb2.Envelope,
        ref: attestation_pb2.AttestationRef,
        *,
        keep: bool = True,
    ) -> Proven:
        """Prove a holdings statement is leaf ``ref.leaf_index`` of the log, or raise.

        With ``keep=False`` it is proven all the same but not kept for the
        exchange's bundle: a statement issued while the exchange was dark is
        nothing the exchange relied on.
        """
        now = self._clock()
        leaf = statement_leaf(envelope)
        if ref.log_origin != self._origin:
            raise ProofError(
                f"attestation ref: expected log origin {self._origin!r}, got {ref.log_origin!r}",
                metadata={"expected": self._origin, "actual": ref.log_origin},
            )
        if ref.leaf_hash != leaf_hash(leaf):
            raise ProofError(
                f"attestation ref: expected the leaf hash of the statement received, got "
                f"{ref.leaf_hash.hex()[:16]}...",
                metadata={"expected": leaf_hash(leaf).hex(), "actual": ref.leaf_hash.hex()},
            )
        signed = (
            await self._custodian.get_checkpoint(
                custodian_service_pb2.GetCheckpointRequest(tree_size=ref.tree_size)
            )
        ).checkpoint
        checkpoint = verify_checkpoint(signed, self._registry, origin=self._origin, now=now)
        if checkpoint.tree_size != ref.tree_size:
            raise ProofError(
                f"checkpoint: expected tree size {ref.tree_size}, got {checkpoint.tree_size}",
                metadata={"expected": str(ref.tree_size), "actual": str(checkpoint.tree_size)},
            )
        previous = self._trusted
        previous_size = 0 if previous is None else previous.tree_size
        hashes: int | None = None
        if previous is not None and checkpoint.tree_size < previous.tree_size:
            raise StateError(
                f"statements are proven in log order: expected tree size >= {previous_size}, "
                f"got {checkpoint.tree_size}",
                metadata={"expected": f">= {previous_size}", "actual": str(checkpoint.tree_size)},
            )
        if previous is not None and checkpoint.tree_size == previous.tree_size:
            if keep:
                self._monitor.advance(checkpoint, None)  # same size: the roots must agree
        else:
            proof = None
            if previous is not None:
                proof = (
                    await self._custodian.get_consistency_proof(
                        custodian_service_pb2.GetConsistencyProofRequest(
                            first_tree_size=previous.tree_size,
                            second_tree_size=checkpoint.tree_size,
                        )
                    )
                ).proof
                verify_consistency_proof(proof, previous, checkpoint)
                hashes = len(proof.consistency_path)
            if keep:
                self._monitor.advance(checkpoint, proof)
                self._trusted = checkpoint
                self._checkpoints.append(
                    audit_pb2.Evidence(statement=signed, relied_at=_stamp(now))
                )
                if proof is not None:
                    self._consistency.append(proof)

        response = await self._custodian.get_inclusion_proof(
            custodian_service_pb2.GetInclusionProofRequest(
                leaf_index=ref.leaf_index, tree_size=ref.tree_size
            )
        )
        if statement_leaf(response.holdings_statement) != leaf:
            raise ProofError(
                f"leaf {ref.leaf_index}: expected the statement we hold, the log holds another",
                metadata={"expected": leaf_hash(leaf).hex(), "actual": "another leaf"},
            )
        verify_inclusion_proof(response.proof, leaf, checkpoint)
        if keep:
            self._attested.append(
                audit_pb2.Evidence(
                    statement=envelope, relied_at=_stamp(now), inclusion_proof=response.proof
                )
            )
        return Proven(checkpoint, response.proof, previous_size, hashes)

    def relied_on_by_custodian(self, envelope: envelope_pb2.Envelope) -> None:
        """Keep a statement addressed to the custodian (margin call, credit line, policy)."""
        if envelope.payload in self._kept:
            return
        self._kept.add(envelope.payload)
        self._custodian_relied.append(
            audit_pb2.Evidence(statement=envelope, relied_at=_stamp(self._clock()))
        )

    def relied_on_by_exchange(self, envelope: envelope_pb2.Envelope) -> None:
        """Keep a statement addressed to the exchange that is no log leaf (liquidation receipt)."""
        if envelope.payload in self._kept:
            return
        self._kept.add(envelope.payload)
        self._exchange_relied.append(
            audit_pb2.Evidence(statement=envelope, relied_at=_stamp(self._clock()))
        )

    def relied_on_by_regulator(self, envelope: envelope_pb2.Envelope) -> None:
        """Keep a statement for the regulator's bundle (its results, a release receipt)."""
        if envelope.payload in self._kept:
            return
        self._kept.add(envelope.payload)
        self._regulator_relied.append(
            audit_pb2.Evidence(statement=envelope, relied_at=_stamp(self._clock()))
        )

    def exchange_bundle(self, verifier: str) -> audit_pb2.AuditBundle:
        """Checkpoints, consistency proofs, holdings statements and receipts, for the exchange."""
        return audit_pb2.AuditBundle(
            registry=self._registry.to_proto(),
            verifier_party_id=verifier,
            log_origin=self._origin,
            checkpoints=self._checkpoints,
            consistency_proofs=self._consistency,
            attested_statements=self._attested,
            statements=self._exchange_relied,
        )

    def custodian_bundle(self, verifier: str) -> audit_pb2.AuditBundle:
        """The exchange's statements the custodian acted on."""
        return audit_pb2.AuditBundle(
            registry=self._registry.to_proto(),
            verifier_party_id=verifier,
            log_origin=self._origin,
            statements=self._custodian_relied,
        )

    def regulator_bundle(self, verifier: str) -> audit_pb2.AuditBundle:
        """The reconciliation results and the release receipt, for the regulator."""
        return audit_pb2.AuditBundle(
            registry=self._registry.to_proto(),
            verifier_party_id=verifier,
            log_origin=self._origin,
            statements=self._regulator_relied,
        )
