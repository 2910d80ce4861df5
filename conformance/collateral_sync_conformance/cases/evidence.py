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
from pathlib import Path

from collateral_sync.attestation import AttestationLog
from collateral_sync.v1 import common_pb2, errors_pb2, position_sync_pb2, reconciliation_service_pb2

from collateral_sync_conformance._context import CaseContext, PartyClients
from collateral_sync_conformance._counterpart import KitCustodian, credit_line_of, relies_on
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    expect_access_denied,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._evidence import (
    EVIDENCE_TIMEOUT,
    KIND,
    checkpoint_pair,
    list_evidence,
    wait_for_evidence,
)

__all__: list[str] = []

_R = errors_pb2.ErrorReason
_ROLE = common_pb2.PartyRole
_EXCHANGE = [Role.EXCHANGE]
_HOLDINGS = {"USDC": "1000"}


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


@REGISTRY.case(
    "evidence/exchange/checkpoint-fork-served",
    Level.MUST,
    "after the custodian serves a checkpoint of the size the exchange accepted with another root "
    "(a fork, §5.6), the exchange lists both signed checkpoints — same origin and size, the two "
    "roots — to a regulator (§10.7)",
    roles=_EXCHANGE,
    clauses=("§10.7/evidence-kept-durably", "§10.7/evidence-served-to-regulators"),
)
async def checkpoint_fork_served(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    regulator = ctx.as_role(_ROLE.PARTY_ROLE_REGULATOR)
    await _trusted_to_the_end(ctx, kit)
    size = kit.log.size
    accepted_root = kit.log.root()
    with tempfile.TemporaryDirectory(prefix="kit-fork-") as directory:
        fork = AttestationLog(Path(directory) / "fork.sqlite", origin=kit.log.origin)
        try:
            # The same log with its last leaf rewritten: the size accepted, another root.
            leaves = [kit.log.leaf(i) for i in range(size)]
            leaves[-1] = b"rewritten by the conformance kit: " + leaves[-1]
            fork.append_many(leaves)
            forked_root = fork.root()
            kit.fork = fork
            # A statement attested beyond that size: to prove it, the exchange fetches the
            # custodian's checkpoint, and gets the fork.
            change, _ = kit.holdings_change(
                ctx.unique("kit-forked"),
                ctx.key(_ROLE.PARTY_ROLE_CLIENT),
                dict(_HOLDINGS),
                epoch=1,
                attest=False,
            )
            kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
            item = await wait_for_evidence(
                ctx,
                regulator,
                lambda e: e.kind == KIND.EQUIVOCATION_KIND_CHECKPOINT_FORK
                and e.accused_party_id == kit.party_id
                and e.tree_size == size,
                f"a CHECKPOINT_FORK of {kit.party_id} at tree size {size}",
            )
        finally:
            kit.fork = None
            fork.close()
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
