"""Equivocation evidence (docs/PROTOCOL.md §10.7): kept by the party that caught it, served to regulators.

A party that catches its counterparty signing two things that cannot both be
true keeps both statements and lists them to any regulator
(``ReconciliationService.ListEquivocationEvidence``), to nobody else — not
even the party they accuse.

``evidence/non-regulator-refused`` asks as the kit's own identity (the
server's counterparty) and as a client, then as a regulator, who must be
served. ``evidence/exchange/checkpoint-fork-served`` needs ``--listen``: the
kit's custodian shows the exchange a checkpoint of the size it accepted with
another root, and the kit, as a regulator, then finds both signed
checkpoints in the exchange's evidence. The fork leaves the exchange's trust
where it was, so the cases after it go on as before. Its sibling for the sync
stream, ``sync/exchange/equivocation-evidence-served``, runs right after the
stream's equivocation case, which ends the exchange's stream with the kit for
good (:mod:`.sync_exchange`).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.merkle import leaf_hash, root_from_inclusion_proof
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    errors_pb2,
    position_sync_pb2,
    reconciliation_service_pb2,
)
from collateral_sync.v1.equivocation_pb2 import EquivocationEvidence

from collateral_sync_conformance._context import CaseContext, PartyClients
from collateral_sync_conformance._counterpart import KitCustodian, credit_line_of, relies_on
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    describe,
    expect_access_denied,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._evidence import (
    EVIDENCE_TIMEOUT,
    KIND,
    checkpoint_pair,
    list_evidence,
    second_root,
    wait_for_evidence,
)

__all__: list[str] = []

_R = errors_pb2.ErrorReason
_ROLE = common_pb2.PartyRole
_EXCHANGE = [Role.EXCHANGE]
_HOLDINGS = {"USDC": "1000"}
#: After the exchange fetched a checkpoint it must refuse, how long the kit waits before it
#: reads what the exchange lists.
_GRACE = 1.0


def _is_regulator(ctx: CaseContext, party_id: str) -> bool:
    return any(k.role == _ROLE.PARTY_ROLE_REGULATOR for k in ctx.registry.keys_for(party_id))


@REGISTRY.case(
    "evidence/non-regulator-refused",
    Level.MUST,
    "ListEquivocationEvidence is refused to every caller but a regulator — the kit's own identity "
    "(the server's counterparty, whom the evidence would accuse) and a client get "
    "PERMISSION_DENIED KEY_ROLE_MISMATCH, field caller, actual their party id — and a "
    "regulator is served (§10.7, §4.5)",
    roles=[Role.CUSTODIAN, Role.EXCHANGE],
    clauses=("§10.7/evidence-served-to-regulators", "§10.7/evidence-refused-to-others"),
)
async def non_regulator_refused(ctx: CaseContext) -> None:
    callers: list[PartyClients] = []
    if not _is_regulator(ctx, ctx.kit_party_id):
        callers.append(ctx.as_party(ctx.kit_party_id))
    # Without a client's certificate, the kit's own identity is enough to judge the rule.
    with contextlib.suppress(CaseSkipped):
        callers.append(ctx.as_role(_ROLE.PARTY_ROLE_CLIENT, besides=[ctx.kit_party_id]))
    if not callers:
        raise CaseSkipped("needs a TLS identity of a registered party that is not a regulator")
    for who in callers:
        outcome = await ctx.rpc(
            who.reconciliation.list_equivocation_evidence,
            reconciliation_service_pb2.ListEquivocationEvidenceRequest(),
            label=f"ListEquivocationEvidence as {who.party_id}",
        )
        expect_access_denied(outcome, field="caller", caller=who.party_id)
    try:
        regulator = ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR)
    except CaseSkipped:
        return  # nobody to be served: the refusals were the rule this case could judge
    await list_evidence(ctx, regulator)


async def _trusted_to_the_end(ctx: CaseContext, kit: KitCustodian) -> None:
    """Make the exchange trust the kit's whole log: a statement at its end, credited.

    The kit signs checkpoints of its whole log only, so the exchange then
    holds the checkpoint of the log's present size.
    """
    await ctx.server_now()  # the kit signs on the exchange's clock
    account = ctx.unique("kit-evidence")
    change, ref = kit.holdings_change(
        account, ctx.key(_ROLE.PARTY_ROLE_CLIENT), dict(_HOLDINGS), epoch=1
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVIDENCE_TIMEOUT
    while not relies_on(await credit_line_of(ctx.exchange, account, ctx.config.rpc_timeout), ref):
        if loop.time() > deadline:
            raise CaseFailure(
                f"the exchange did not credit {account!r} within {EVIDENCE_TIMEOUT:.0f} s of a "
                "statement its custodian attests (§5.5)",
                expected="a credit line relying on the statement",
                got="none",
            )
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def _serving(kit: KitCustodian, leaves: list[bytes]) -> Iterator[AttestationLog]:
    """While in the block, the kit's custodian serves checkpoints and proofs of a log of
    ``leaves`` (same origin) instead of its own."""
    with tempfile.TemporaryDirectory(prefix="kit-fork-") as directory:
        fork = AttestationLog(Path(directory) / "fork.sqlite", origin=kit.log.origin)
        try:
            fork.append_many(leaves)
            kit.fork = fork
            yield fork
        finally:
            kit.fork = None
            fork.close()


def _unattested(
    ctx: CaseContext, kit: KitCustodian, prefix: str
) -> position_sync_pb2.HoldingsChange:
    """A statement of a new account attested beyond the kit's log (its reference names the
    next leaf): to prove it the exchange fetches the custodian's checkpoint anew."""
    change, _ = kit.holdings_change(
        ctx.unique(prefix), ctx.key(_ROLE.PARTY_ROLE_CLIENT), dict(_HOLDINGS), epoch=1, attest=False
    )
    return change


#: The fork is served for a log of more leaves than this.
_LARGE_LOG = 300
#: Rewritten last leaves the kit tries for a fork root on one side of the accepted root.
_FORK_ATTEMPTS = 4096


def _forked_leaves(
    kit: KitCustodian, size: int, accepted_root: bytes, below: bool
) -> list[bytes] | None:
    """The kit's first ``size`` leaves, the last one rewritten so that the root of the fork sorts
    below (or above) ``accepted_root``; None if no attempt gives one (an accepted root very
    near one end of the range)."""
    leaves = [kit.log.leaf(i) for i in range(size)]
    path = list(kit.log.inclusion_proof(size - 1, size).audit_path)
    for attempt in range(_FORK_ATTEMPTS):
        leaf = f"rewritten by the conformance kit ({attempt}): ".encode() + leaves[-1]
        root = root_from_inclusion_proof(leaf_hash(leaf), size - 1, size, path)
        if (root < accepted_root) == below:
            leaves[-1] = leaf
            return leaves
    return None


async def _fork_of_trusted(ctx: CaseContext, kit: KitCustodian, below: bool) -> list[bytes]:
    """A fork of the log the exchange trusts, at its size, whose root sorts below (or above) the
    accepted root: the exchange must catch it by comparing roots for equality, not by order."""
    for _ in range(3):
        leaves = _forked_leaves(kit, kit.log.size, kit.log.root(), below)
        if leaves is not None:
            return leaves
        await _trusted_to_the_end(ctx, kit)  # another accepted root
    raise CaseFailure(  # about (1 / 4096) ** 3: never
        "the kit found no fork of the accepted size with a root on the wanted side",
        expected="a root " + ("below" if below else "above") + " the accepted one",
        got=f"none in {3 * _FORK_ATTEMPTS} attempts",
    )


def _holding(
    kit: KitCustodian,
    root: bytes,
    kind: int | None = None,
    tree_size: int | None = None,
) -> Callable[[EquivocationEvidence], bool]:
    """Whether an item accuses the kit's custodian with the refused checkpoint of ``root``
    (and is of ``kind``, at ``tree_size``, when given)."""

    def wanted(item: EquivocationEvidence) -> bool:
        return (
            item.accused_party_id == kit.party_id
            and second_root(item) == root
            and kind in (None, item.kind)
            and tree_size in (None, item.tree_size)
        )

    return wanted


@REGISTRY.case(
    "evidence/exchange/checkpoint-fork-served",
    Level.MUST,
    "after the custodian serves a checkpoint of the size the exchange accepted with another root "
    "(a fork, §5.6), the exchange lists both signed checkpoints — same origin and size, the two "
    "roots — to a regulator as a CHECKPOINT_FORK (§10.7); two forks of a log of over 300 "
    "leaves are served, one whose root sorts below the accepted root and one above it",
    roles=_EXCHANGE,
    clauses=("§10.7/evidence-kept-durably", "§10.7/evidence-served-to-regulators"),
)
async def checkpoint_fork_served(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    regulator = ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR)
    # Sizes past the small integers some runtimes share (CPython to 256, Java's Integer
    # cache to 127): an exchange that compares sizes by identity, not value, shows it.
    while kit.log.size <= _LARGE_LOG:
        kit.log.append(_filler(ctx, kit))
    await _trusted_to_the_end(ctx, kit)
    for below in (True, False):
        # The same log with its last leaf rewritten: the size accepted, another root.
        leaves = await _fork_of_trusted(ctx, kit, below)
        size, accepted_root = kit.log.size, kit.log.root()
        with _serving(kit, leaves) as fork:
            forked_root = fork.root()
            # A statement attested beyond that size: to prove it, the exchange fetches the
            # custodian's checkpoint, and gets the fork.
            change = _unattested(ctx, kit, "kit-forked")
            kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
            item = await wait_for_evidence(
                ctx,
                regulator,
                _holding(kit, forked_root, KIND.EQUIVOCATION_KIND_CHECKPOINT_FORK, size),
                f"a CHECKPOINT_FORK of {kit.party_id} at tree size {size} with the root "
                f"{forked_root.hex()} ({'below' if below else 'above'} the accepted one)",
            )
        first, second = checkpoint_pair(ctx, item, kit.party_id, kit.log.origin)
        check_equal("log_origin of the evidence", kit.log.origin, item.log_origin)
        check_equal(
            "tree sizes of the two checkpoints", (size, size), (first.tree_size, second.tree_size)
        )
        check_equal(
            "roots of the two checkpoints (first: accepted, second: the fork)",
            (accepted_root.hex(), forked_root.hex()),
            (first.root_hash.hex(), second.root_hash.hex()),
        )
        check(
            (item.first_hash, item.second_hash) == (first.root_hash, second.root_hash),
            "first_hash and second_hash of a checkpoint fork are the two roots (§10.7)",
            expected=[first.root_hash.hex(), second.root_hash.hex()],
            got=[item.first_hash.hex(), item.second_hash.hex()],
        )


def _filler(ctx: CaseContext, kit: KitCustodian) -> bytes:
    """The leaf of a signed holdings statement of an account the exchange is never told about."""
    return statement_leaf(
        kit.sign(attestation_pb2.HoldingsStatement(account_id=ctx.unique("kit-filler")))
    )


@REGISTRY.case(
    "evidence/exchange/inconsistent-checkpoint-served",
    Level.MUST,
    "after the custodian serves a larger checkpoint whose well-formed consistency proof from the "
    "accepted one does not reproduce both roots (§5.6), the exchange lists to a regulator a "
    "CHECKPOINT_INCONSISTENT item: the accepted checkpoint and the refused one, the accepted "
    "size, the two roots and the consistency proof as served (§10.7)",
    roles=_EXCHANGE,
    clauses=("§10.7/evidence-kept-durably", "§10.7/evidence-served-to-regulators"),
)
async def inconsistent_checkpoint_served(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    regulator = ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR)
    await _trusted_to_the_end(ctx, kit)
    size = kit.log.size
    accepted_root = kit.log.root()
    change = _unattested(ctx, kit, "kit-inconsistent")
    # Another history: the kit's leaves with the first one rewritten, then the statement.
    leaves = [kit.log.leaf(i) for i in range(size)]
    leaves[0] = b"rewritten by the conformance kit: " + leaves[0]
    larger = size + 1
    try:
        with _serving(kit, [*leaves, statement_leaf(change.holdings_statement)]) as fork:
            forked_root = fork.root()
            served = fork.consistency_proof(size, larger)
            change.attestation.leaf_index = size
            change.attestation.tree_size = larger
            kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
            item = await wait_for_evidence(
                ctx,
                regulator,
                _holding(kit, forked_root),
                f"evidence against {kit.party_id} holding the refused checkpoint of size "
                f"{larger} (root {forked_root.hex()})",
            )
    finally:
        # The kit's own log must pass the size the exchange was offered, so that the next
        # checkpoint it sees is of a size it never refused.
        while kit.log.size <= larger:
            kit.log.append(_filler(ctx, kit))
    check_equal(
        "kind of the evidence a larger checkpoint that fails its consistency proof gives",
        KIND.Name(KIND.EQUIVOCATION_KIND_CHECKPOINT_INCONSISTENT),
        KIND.Name(item.kind),
    )
    first, second = checkpoint_pair(ctx, item, kit.party_id, kit.log.origin)
    check_equal("log_origin of the evidence", kit.log.origin, item.log_origin)
    check_equal("tree_size of the evidence (the accepted checkpoint's)", size, item.tree_size)
    check_equal(
        "tree sizes of the two checkpoints (first: accepted, second: refused)",
        (size, larger),
        (first.tree_size, second.tree_size),
    )
    check_equal(
        "roots of the two checkpoints (first: accepted, second: refused)",
        (accepted_root.hex(), forked_root.hex()),
        (first.root_hash.hex(), second.root_hash.hex()),
    )
    check(
        (item.first_hash, item.second_hash) == (first.root_hash, second.root_hash),
        "first_hash and second_hash of an inconsistent checkpoint are the two roots (§10.7)",
        expected=[first.root_hash.hex(), second.root_hash.hex()],
        got=[item.first_hash.hex(), item.second_hash.hex()],
    )
    check(
        item.consistency_proof == served,
        "the evidence's consistency_proof is not the one the custodian served (§10.7: "
        "consistency_proof as served)",
        expected=describe(served),
        got=describe(item.consistency_proof),
    )


@REGISTRY.case(
    "evidence/exchange/rollback-and-bad-proof-not-evidence",
    Level.MUST,
    "a checkpoint smaller than the accepted one (a rollback) and a larger one served with a "
    "malformed consistency proof are refused, but accuse nobody: the exchange lists neither "
    "as equivocation evidence (§5.6, §10.7)",
    roles=_EXCHANGE,
)
async def rollback_and_bad_proof_not_evidence(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    regulator = ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR)
    await _trusted_to_the_end(ctx, kit)
    size = kit.log.size
    refused: dict[bytes, str] = {}

    # The kit's log as it was one leaf ago: an old checkpoint, not a contradiction.
    with _serving(kit, [kit.log.leaf(i) for i in range(size - 1)]) as old:
        refused[old.root()] = f"the rollback to size {old.size}"
        served_before = len(kit.checkpoints_served)
        kit.announce(
            position_sync_pb2.PositionUpdate(holdings_change=_unattested(ctx, kit, "kit-rollback"))
        )
        await _poll(
            lambda: old.size in kit.checkpoints_served[served_before:],
            f"the exchange fetches the custodian's checkpoint (served: the one of size {old.size})",
        )
        await asyncio.sleep(_GRACE)

    # A larger checkpoint of the kit's own log, its consistency proof one hash too long.
    change, _ = kit.holdings_change(
        ctx.unique("kit-bad-proof"), ctx.key(_ROLE.PARTY_ROLE_CLIENT), dict(_HOLDINGS), epoch=1
    )
    refused[kit.log.root()] = f"the checkpoint of size {kit.log.size} with a malformed proof"

    def lengthen(proof: Any) -> None:
        if isinstance(proof, attestation_pb2.ConsistencyProof):
            proof.consistency_path.append(bytes(32))

    asked_before = len(kit.consistency_requests)
    kit.rewrite_proof = lengthen
    try:
        kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
        await _poll(
            lambda: len(kit.consistency_requests) > asked_before,
            "the exchange asks for a consistency proof to the larger checkpoint",
        )
        await asyncio.sleep(_GRACE)
    finally:
        kit.rewrite_proof = None

    listed = await list_evidence(ctx, regulator)
    accusing = [
        f"{KIND.Name(item.kind)} naming {refused[root]}"
        for item in listed
        if item.accused_party_id == kit.party_id and (root := second_root(item)) in refused
    ]
    check(
        not accusing,
        "the exchange lists as equivocation evidence a checkpoint that proves nothing against "
        "the custodian (§10.7: a rollback, and a proof that is malformed, accuse nobody)",
        expected="no evidence holding either refused checkpoint",
        got="; ".join(accusing),
    )


async def _poll(done: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVIDENCE_TIMEOUT
    while not done():
        if loop.time() > deadline:
            raise CaseFailure(
                f"{what} within {EVIDENCE_TIMEOUT:.0f} s", expected=what, got="not yet"
            )
        await asyncio.sleep(0.1)
