"""The exchange's crediting of holdings, with the kit as its custodian (PROTOCOL.md §5.5, §5.6, §7.2).

These cases need ``--listen``: the exchange under test dials the kit's
custodian (:mod:`collateral_sync_conformance._counterpart`), so the kit decides
what the custodian says — a holdings statement the log does not prove, a
checkpoint that forks the log, positions no valuation may use, an epoch older
than one already credited — and watches what the exchange credits. Each case
opens accounts of its own.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collateral_sync.attestation import AttestationLog, statement_leaf
from collateral_sync.errors import CollateralSyncError
from collateral_sync.merkle import leaf_hash, root_from_inclusion_proof, verify_consistency
from collateral_sync.v1 import attestation_pb2, position_sync_pb2

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import KitCustodian, relies_on
from collateral_sync_conformance._expect import check
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._as_custodian import (
    GRACE,
    HOLDINGS,
    check_not_credited,
    credit_line,
    not_credited,
    open_account,
    poll,
)
from collateral_sync_conformance.cases._kit_account import client_key
from collateral_sync_conformance.cases._published import signed_credit_line

__all__: list[str] = []

_EXCHANGE = [Role.EXCHANGE]
_H = attestation_pb2.HoldingsChangeReason


@REGISTRY.case(
    "exchange/holdings/credited-once-proven",
    Level.MUST,
    "a holdings statement the custodian attests is credited after the exchange fetched an "
    "inclusion proof of its leaf (§5.5), and the credit line names that leaf",
    roles=_EXCHANGE,
)
async def credited_once_proven(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    asked_before = len(kit.inclusion_requests)
    account, ref = await open_account(ctx, kit)
    asked = [index for index, _ in kit.inclusion_requests[asked_before:]]
    check(
        ref.leaf_index in asked,
        "the exchange credited a statement without asking the custodian for its inclusion proof",
        expected=f"GetInclusionProof(leaf_index={ref.leaf_index})",
        got=f"inclusion proofs asked for leaves {asked}",
    )
    line = await signed_credit_line(ctx, account)
    named = [(a.log_origin, a.leaf_index, a.leaf_hash.hex()) for a in line.attestations]
    check(
        (ref.log_origin, ref.leaf_index, ref.leaf_hash.hex()) in named,
        "the credit line does not name the attested statement it relies on",
        expected=f"{ref.log_origin} leaf {ref.leaf_index} {ref.leaf_hash.hex()}",
        got=repr(named),
    )


@REGISTRY.case(
    "exchange/holdings/leaf-hash-mismatch-not-credited",
    Level.MUST,
    "a holdings statement whose AttestationRef.leaf_hash is not its own leaf hash is never "
    "credited (§5.5 step 1)",
    roles=_EXCHANGE,
)
async def leaf_hash_mismatch(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    account = ctx.unique("kit-badref")
    change, _ = kit.holdings_change(account, client_key(ctx), dict(HOLDINGS), epoch=1)
    change.attestation.leaf_hash = bytes(b ^ 0xFF for b in change.attestation.leaf_hash)
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
    await not_credited(ctx, kit, account, "a statement whose leaf_hash is not its own")


@REGISTRY.case(
    "exchange/holdings/unattested-statement-not-credited",
    Level.MUST,
    "a signed holdings statement pointing at a leaf that holds another statement is never "
    "credited: its inclusion proof does not verify (§5.5 step 3)",
    roles=_EXCHANGE,
)
async def unattested_statement(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    account = ctx.unique("kit-unattested")
    # Signed by the custodian, but never appended: its reference names the next
    # leaf, which not_credited's good statement then takes.
    change, _ = kit.holdings_change(account, client_key(ctx), dict(HOLDINGS), epoch=1, attest=False)
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
    await not_credited(ctx, kit, account, "a statement that is not in the attestation log")


async def _offered_in_fork(
    ctx: CaseContext,
    kit: KitCustodian,
    account: str,
    what: str,
    *,
    origin: str | None = None,
    rewrite_first_leaf: bool = False,
    rewrite_proof: Callable[[Any], None] | None = None,
) -> None:
    """Offer a statement attested only in another log than the kit's, then check it is not credited.

    The other log holds the kit's leaves (the first one rewritten if asked), the
    new statement and three fillers (so that its last leaf is not the
    statement's), under ``origin`` (the kit's own by default). While it is
    offered, ``rewrite_proof`` may change each proof the kit answers.
    """
    change, _ = kit.holdings_change(account, client_key(ctx), dict(HOLDINGS), epoch=1, attest=False)
    with tempfile.TemporaryDirectory(prefix="kit-fork-") as directory:
        fork = AttestationLog(Path(directory) / "fork.sqlite", origin=origin or kit.log.origin)
        try:
            leaves = [kit.log.leaf(i) for i in range(kit.log.size)]
            if rewrite_first_leaf:
                leaves[0] = b"rewritten by the conformance kit: " + leaves[0]
            fillers = [statement_leaf(_filler(ctx, kit)) for _ in range(3)]
            fork.append_many([*leaves, statement_leaf(change.holdings_statement), *fillers])
            change.attestation.leaf_index = len(leaves)
            change.attestation.tree_size = offered = fork.size
            served_before = len(kit.checkpoints_served)
            asked_before = len(kit.consistency_requests)
            kit.fork = fork
            kit.rewrite_proof = rewrite_proof
            kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))

            async def judged() -> bool:
                # A checkpoint of another origin may be refused before any proof is asked.
                if origin is not None:
                    return fork.size in kit.checkpoints_served[served_before:]
                return len(kit.consistency_requests) > asked_before

            await poll(ctx, judged, "the exchange fetches the other log's checkpoint")
            await asyncio.sleep(GRACE)
            # Checked now too: an exchange that took the other log for the kit's cannot
            # credit anything of the kit's log later on.
            await check_not_credited(ctx, account, what)
        finally:
            kit.fork = None
            kit.rewrite_proof = None
            fork.close()
    # The real log must pass the other log's size, so that the next checkpoint the
    # exchange sees is new and of no size it was offered: attest statements nobody is told of.
    while kit.log.size <= offered:
        kit.attest(_filler(ctx, kit))
    await not_credited(ctx, kit, account, what)


def _filler(ctx: CaseContext, kit: KitCustodian) -> Any:
    """A signed holdings statement of an account the exchange is never told about."""
    return kit.sign(attestation_pb2.HoldingsStatement(account_id=ctx.unique("kit-filler")))


@REGISTRY.case(
    "exchange/holdings/inconsistent-checkpoint-not-credited",
    Level.MUST,
    "a statement attested only under a checkpoint whose consistency proof from the accepted one "
    "does not verify (a forked log) is never credited (§5.6)",
    roles=_EXCHANGE,
)
async def inconsistent_checkpoint(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    await _offered_in_fork(
        ctx,
        kit,
        ctx.unique("kit-forked"),
        "a statement attested only under a forked checkpoint",
        rewrite_first_leaf=True,
    )


@REGISTRY.case(
    "exchange/holdings/other-origin-checkpoint-not-credited",
    Level.MUST,
    "a statement attested only under a checkpoint of another log origin is never credited, "
    "although that log extends the accepted one leaf for leaf and the custodian signs its "
    "checkpoint: a consistency proof joins two checkpoints of one origin only (§5.4)",
    roles=_EXCHANGE,
    clauses=("§5.4/same-origin",),
)
async def other_origin_checkpoint(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    await _offered_in_fork(
        ctx,
        kit,
        ctx.unique("kit-other-origin"),
        "a statement attested only in a log of another origin",
        origin=f"{kit.log.origin}/conformance-other-log",
    )


@REGISTRY.case(
    "exchange/holdings/consistency-proof-sizes-checked",
    Level.MUST,
    "a consistency proof whose sizes are not the two checkpoints' sizes is refused, although "
    "its hashes prove the right pair: a statement attested only under the new checkpoint is "
    "never credited (§5.4)",
    roles=_EXCHANGE,
    clauses=("§5.4/proof-sizes-are-checkpoint-sizes",),
)
async def consistency_proof_sizes(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()

    def misstate_sizes(proof: Any) -> None:
        if isinstance(proof, attestation_pb2.ConsistencyProof) and kit.fork is not None:
            roots = (kit.fork.root(proof.first_tree_size), kit.fork.root(proof.second_tree_size))
            proof.first_tree_size, proof.second_tree_size = _misstated_sizes(proof, *roots)

    await _offered_in_fork(
        ctx,
        kit,
        ctx.unique("kit-proof-sizes"),
        "a statement whose checkpoint came with a consistency proof for other sizes",
        rewrite_proof=misstate_sizes,
    )


def _misstated_sizes(
    proof: attestation_pb2.ConsistencyProof, first_root: bytes, second_root: bytes
) -> tuple[int, int]:
    """Other sizes for which the proof's hashes still join the two roots, if some exist.

    So an exchange that trusts the proof's sizes and one that ignores them both
    accept the misstated proof; only one that compares them with the checkpoints'
    refuses it. Without such sizes, the second size plus one.
    """
    first, second = proof.first_tree_size, proof.second_tree_size
    path = list(proof.consistency_path)
    candidates = [(first, s) for s in range(first, 2 * second + 2) if s != second]
    candidates += [(f, second) for f in range(1, second + 1) if f != first]
    for sizes in candidates:
        try:
            verify_consistency(*sizes, path, first_root, second_root)
        except CollateralSyncError:
            continue
        return sizes
    return first, second + 1


@REGISTRY.case(
    "exchange/holdings/inclusion-proof-size-checked",
    Level.MUST,
    "an inclusion proof whose tree_size is not the checkpoint's is refused, although its "
    "hashes lead to the checkpoint's root: the statement it proves is never credited (§5.3)",
    roles=_EXCHANGE,
    clauses=("§5.3/proof-size-is-checkpoint-size",),
)
async def inclusion_proof_size(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    account = ctx.unique("kit-inclusion-size")
    change, ref = kit.holdings_change(account, client_key(ctx), dict(HOLDINGS), epoch=1)
    # Three leaves after it: the last leaf of a tree has a proof that fits one size only.
    for _ in range(3):
        kit.attest(_filler(ctx, kit))
    leaf = leaf_hash(statement_leaf(change.holdings_statement))
    misstated: list[int] = []

    def misstate_size(proof: Any) -> None:
        # Only this statement's proofs: the later statement of not_credited is proven honestly.
        if isinstance(proof, attestation_pb2.InclusionProof) and proof.leaf_index == ref.leaf_index:
            root = root_from_inclusion_proof(
                leaf, proof.leaf_index, proof.tree_size, list(proof.audit_path)
            )
            proof.tree_size = _misstated_tree_size(leaf, proof, root)
            misstated.append(proof.tree_size)

    asked_before = len(kit.inclusion_requests)
    kit.rewrite_proof = misstate_size
    try:
        kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))

        async def asked() -> bool:
            return any(i == ref.leaf_index for i, _ in kit.inclusion_requests[asked_before:])

        await poll(ctx, asked, "the exchange asks for the statement's inclusion proof")
        await asyncio.sleep(GRACE)
        await not_credited(
            ctx,
            kit,
            account,
            f"a statement proven for tree sizes {misstated}, not the checkpoint's",
        )
    finally:
        kit.rewrite_proof = None


def _misstated_tree_size(leaf: bytes, proof: attestation_pb2.InclusionProof, root: bytes) -> int:
    """Another tree size under which the proof's path still gives ``root``, if one exists."""
    path = list(proof.audit_path)
    sizes = range(proof.leaf_index + 1, 2 * proof.tree_size + 2)
    for other in (size for size in sizes if size != proof.tree_size):
        try:
            if root_from_inclusion_proof(leaf, proof.leaf_index, other, path) == root:
                return other
        except CollateralSyncError:
            continue
    return proof.tree_size + 1


@REGISTRY.case(
    "exchange/holdings/pledged-elsewhere-not-credited",
    Level.MUST,
    "a proven holdings statement whose exchange_id is another exchange is never valued: an "
    "exchange values only holdings pledged to it (§7.2)",
    roles=_EXCHANGE,
    clauses=("§7.2/holdings-pledged-to-valuer",),
)
async def pledged_elsewhere(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    account = ctx.unique("kit-elsewhere")
    # Signed, attested and addressed to the exchange, but pledged to another one. A deposit,
    # so that it carries no liquidation path (a path naming the other exchange would fail
    # the whole batch, §9.1).
    change, _ = kit.holdings_change(
        account,
        client_key(ctx),
        dict(HOLDINGS),
        epoch=1,
        reason=_H.HOLDINGS_CHANGE_REASON_DEPOSIT,
        pledged_to=ctx.unique("conformance-other-exchange"),
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
    await not_credited(ctx, kit, account, "holdings pledged to another exchange")


@REGISTRY.case(
    "exchange/holdings/negative-figures-not-credited",
    Level.MUST,
    "a proven holdings statement with a negative quantity, locked quantity or pledged quantity "
    "(-0.5, -0.37, -0.25: less than zero, more than minus one) is never credited, neither whole "
    "nor its other positions (§7.2)",
    roles=_EXCHANGE,
    clauses=("§7.2/quantities-non-negative",),
)
async def negative_figures(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    # One negative figure per statement, beside a positive, priced position the exchange
    # would otherwise credit; deposits, so that no liquidation path names the figures.
    offered = {
        "quantity": ({"USDC": "2500.5", "KIT-NEGATIVE": "-0.5"}, {"KIT-NEGATIVE": "0"}, None),
        "locked_quantity": ({"USDC": "1800.75"}, None, {"USDC": "-0.37"}),
        "pledged_quantity": ({"USDC": "3100.25"}, {"USDC": "-0.25"}, None),
    }
    accounts = {}
    for field, (holdings, pledged, locked) in offered.items():
        account = ctx.unique(f"kit-negative-{field.replace('_', '-')}")
        change, _ = kit.holdings_change(
            account,
            client_key(ctx),
            holdings,
            epoch=1,
            reason=_H.HOLDINGS_CHANGE_REASON_DEPOSIT,
            pledged=pledged,
            locked=locked,
        )
        kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
        accounts[field] = account
    await open_account(ctx, kit)  # a later, proven statement: the exchange has caught up
    await asyncio.sleep(GRACE)
    for field, account in accounts.items():
        await check_not_credited(ctx, account, f"a holdings statement with a negative {field}")


@REGISTRY.case(
    "exchange/holdings/older-epoch-not-credited",
    Level.MUST,
    "an account is valued on its proven statement of highest epoch: a statement of a lower epoch "
    "proven after it (other, larger holdings), or another of the same epoch, does not replace "
    "it, and one of a higher epoch does (§7.2)",
    roles=_EXCHANGE,
    clauses=("§7.2/highest-epoch-valued",),
)
async def older_epoch(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()
    account = ctx.unique("kit-epochs")

    async def offer(holdings: dict[str, str], epoch: int) -> attestation_pb2.AttestationRef:
        change, ref = kit.holdings_change(account, client_key(ctx), holdings, epoch=epoch)
        kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
        return ref

    newer = await offer({"USDC": "73519.31"}, epoch=5)

    async def credited_newer() -> bool:
        return relies_on(await credit_line(ctx, account), newer)

    await poll(ctx, credited_newer, f"the exchange credits {account!r} at epoch 5")
    before = await credit_line(ctx, account)
    assert before is not None
    # A lower epoch, then the same epoch again (two statements with one epoch: refused).
    for epoch, holdings in ((3, "180000.77"), (5, "91277.03")):
        other = await offer({"USDC": holdings}, epoch=epoch)
        await open_account(ctx, kit)  # a later, proven statement: the exchange has caught up
        await asyncio.sleep(GRACE)
        line = await credit_line(ctx, account)
        check(
            line is not None and relies_on(line, newer) and not relies_on(line, other),
            f"the exchange replaced the credited statement of epoch 5 by another of epoch {epoch}",
            expected=f"a credit line relying on leaf {newer.leaf_index} (epoch 5), "
            f"collateral value {before.collateral_value.value}",
            got="no credit line"
            if line is None
            else "leaves "
            + ", ".join(str(a.leaf_index) for a in line.attestations)
            + f" (the other is leaf {other.leaf_index}), collateral value "
            + line.collateral_value.value,
        )
    newest = await offer({"USDC": "69022.4"}, epoch=6)

    async def credited_newest() -> bool:
        return relies_on(await credit_line(ctx, account), newest)

    await poll(ctx, credited_newest, f"the exchange credits {account!r} at epoch 6, above 5")
