"""Act 4 of the demo: a holdings statement is credited only once it is proven in the log."""

from __future__ import annotations

from collateral_sync.attestation import statement_leaf
from collateral_sync.merkle import verify_inclusion_proof
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import attestation_pb2, envelope_pb2

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.facts import cites, edit_quantity
from collateral_sync_reference.demo.scenario import EXCHANGE
from collateral_sync_reference.demo.stage import Attested, Stage

__all__ = ["ProofActs"]


class ProofActs(Stage):
    """The exchange's proof of the pledges, made again here, and what it refuses (act 4)."""

    async def _attestation(self, pledged: list[Attested]) -> None:
        say.section("4. Attestation: the exchange credits a statement only once it is proven")
        last = pledged[-1]
        credit = await self._until(
            f"{EXCHANGE} to credit the statement at leaf {last.ref.leaf_index}",
            self._credit_where(lambda c: cites(c, last.ref.leaf_index)),
        )
        [cited] = [ref for ref in credit.attestations if ref.leaf_index == last.ref.leaf_index]
        say.step(
            f"{EXCHANGE} credits a statement only once it has proven it: its signed CreditLine "
            f"cites leaf {cited.leaf_index} of tree size {cited.tree_size}, the latest pledge"
        )
        say.step("the same checks, made here with the SDK against the custodian's log:")
        proofs = []
        for attested in pledged:
            proven = await self.evidence.prove_holdings(attested.envelope, attested.ref)
            proofs.append(proven)
            self._proven(proven, attested.ref)
        say.step("what the exchange refuses instead (the SDK's checks, run here):")
        tampered = envelope_pb2.Envelope()
        tampered.CopyFrom(last.envelope)
        tampered.payload = edit_quantity(last.envelope.payload, "100000", "900000")
        self._expect_local_refusal(
            "the statement with BENJI 100,000 edited to 900,000",
            lambda: verify_statement(
                tampered,
                self._registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience=EXCHANGE,
                now=self._clock.now(),
            ),
        )
        self._expect_local_refusal(
            "the same statement presented to another exchange (exchange-2)",
            lambda: verify_statement(
                last.envelope,
                self._registry,
                expected_type=attestation_pb2.HoldingsStatement,
                audience="exchange-2",
                now=self._clock.now(),
            ),
        )
        previous = proofs[-2]
        self._expect_local_refusal(
            f"leaf {pledged[-2].ref.leaf_index}'s inclusion proof offered for leaf "
            f"{last.ref.leaf_index}",
            lambda: verify_inclusion_proof(
                previous.inclusion, statement_leaf(last.envelope), previous.checkpoint
            ),
        )
