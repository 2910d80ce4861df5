"""Reconciliation at the regulator (docs/PROTOCOL.md §10.2 to §10.5): statements in, a signed result out.

The kit plays both parties the regulator reconciles: it signs
``ReconciliationStatement``s with its ``--kit-key``s of role custodian and
exchange. Every case states a cut-off of its own — a whole second picked at
random in the past three years, so that no two cases and no two runs share
one — because a regulator keeps one statement per party per cut-off for ever.

The statements here describe an empty view (no accounts, root ``H("")``) or
differ only in what the regulator can compare without asking the parties for
their position trees (asset totals, sync log heads). Breaks inside the trees,
which the regulator finds by descending them through the parties'
``GetPositionTreeNodes``, are the cases of :mod:`.regulator_descent`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import grpc
from collateral_sync.keys import SigningKey
from collateral_sync.signing import verify_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN, ZERO_HASH
from collateral_sync.v1 import (
    common_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
    regulator_service_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseSkipped,
    Outcome,
    check,
    check_equal,
    describe,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._forge import corrupt_signature
from collateral_sync_conformance._registry import REGISTRY, Level, Role

__all__: list[str] = []

_REGULATOR = [Role.REGULATOR]
_R = errors_pb2.ErrorReason
_OUTCOME = reconciliation_pb2.ReconciliationOutcome
_FIELD = reconciliation_pb2.BreakField
_CUSTODIAN_ROLE = common_pb2.PARTY_ROLE_CUSTODIAN
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE
#: The root of an empty position tree (§10.3).
_EMPTY_ROOT = hashlib.sha256(b"").digest()
_THREE_YEARS = 3 * 365 * 24 * 3600
#: How many recent whole-second cut-offs a case may try before giving up.
_RECENT_CUTOFFS = 30


async def _cutoff(ctx: CaseContext) -> datetime:
    """A cut-off of this case alone: a whole second in the past, picked at random."""
    now = (await ctx.server_now()).replace(microsecond=0)
    return now - timedelta(seconds=1 + uuid.uuid4().int % _THREE_YEARS)


def _total(asset_id: str, quantity: str, pledged: str) -> reconciliation_pb2.AssetTotal:
    total = reconciliation_pb2.AssetTotal(asset_id=asset_id)
    total.quantity.value = quantity
    total.locked_quantity.value = "0"
    total.pledged_quantity.value = pledged
    return total


def _statement(
    role: int,
    cutoff: datetime,
    *,
    totals: Sequence[reconciliation_pb2.AssetTotal] = (),
    exchange_head: int = 0,
) -> reconciliation_pb2.ReconciliationStatement:
    """A view of no accounts at ``cutoff``; ``exchange_head`` sets the exchange→custodian head."""
    statement = reconciliation_pb2.ReconciliationStatement(
        cutoff_id=cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"),
        party_role=role,  # type: ignore[arg-type]
        account_count=0,
        positions_root=_EMPTY_ROOT,
        totals=list(totals),
    )
    statement.cutoff_time.FromDatetime(cutoff)
    for direction, sequence in ((CUSTODIAN_TO_EXCHANGE, 0), (EXCHANGE_TO_CUSTODIAN, exchange_head)):
        head = statement.sync_log_heads.add(direction=direction, sequence=sequence)
        head.entry_hash = ZERO_HASH if sequence == 0 else hashlib.sha256(b"%d" % sequence).digest()
    return statement


def _party(ctx: CaseContext, role: int) -> SigningKey:
    return ctx.key(role)


async def _signed(
    ctx: CaseContext,
    role: int,
    cutoff: datetime,
    *,
    audience: Sequence[str] | None = None,
    totals: Sequence[reconciliation_pb2.AssetTotal] = (),
    exchange_head: int = 0,
) -> envelope_pb2.Envelope:
    statement = _statement(role, cutoff, totals=totals, exchange_head=exchange_head)
    return await ctx.sign(statement, _party(ctx, role), audience=audience)


async def _submit(ctx: CaseContext, envelope: envelope_pb2.Envelope) -> Outcome:
    return await ctx.rpc(
        ctx.regulator.submit_reconciliation_statement,
        regulator_service_pb2.SubmitReconciliationStatementRequest(
            reconciliation_statement=envelope
        ),
        label="SubmitReconciliationStatement",
    )


async def _get(ctx: CaseContext, cutoff: datetime) -> Outcome:
    return await ctx.rpc(
        ctx.regulator.get_reconciliation_result,
        regulator_service_pb2.GetReconciliationResultRequest(
            cutoff_id=cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")
        ),
        label="GetReconciliationResult",
    )


def _expect_no_result(outcome: Outcome, what: str) -> None:
    response: regulator_service_pb2.SubmitReconciliationStatementResponse = expect_ok(outcome)
    check(
        not response.HasField("reconciliation_result"),
        f"{what}: a result before both statements are in",
        expected="no reconciliation_result",
        got=describe(response.reconciliation_result),
    )


async def _result(
    ctx: CaseContext,
    envelope: envelope_pb2.Envelope,
    cutoff: datetime,
    custodian: envelope_pb2.Envelope,
    exchange: envelope_pb2.Envelope,
) -> reconciliation_pb2.ReconciliationResult:
    """A result: regulator-signed, public (§10.5), of this cut-off and these two statements."""
    verified = sdk_check(
        "the reconciliation result",
        verify_statement,
        envelope,
        ctx.registry,
        expected_type=reconciliation_pb2.ReconciliationResult,
        audience="*",
        now=await ctx.server_now(),
    )
    check_equal("issuer of the result", ctx.server_party_id, verified.issuer)
    result: reconciliation_pb2.ReconciliationResult = verified.message
    check_equal("cutoff_id of the result", cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"), result.cutoff_id)
    check_equal(
        "the custodian statement in the result (as received)",
        custodian.SerializeToString(),
        result.custodian_statement.SerializeToString(),
    )
    check_equal(
        "the exchange statement in the result (as received)",
        exchange.SerializeToString(),
        result.exchange_statement.SerializeToString(),
    )
    return result


async def _complete(
    ctx: CaseContext,
    cutoff: datetime,
    custodian: envelope_pb2.Envelope,
    exchange: envelope_pb2.Envelope,
) -> reconciliation_pb2.ReconciliationResult:
    """Submit the exchange's statement after the custodian's; the result both ways must agree."""
    response: regulator_service_pb2.SubmitReconciliationStatementResponse = expect_ok(
        await _submit(ctx, exchange)
    )
    check(
        response.HasField("reconciliation_result"),
        "the submission completing the pair returned no result",
        expected="the signed ReconciliationResult (§10.5)",
        got="none",
    )
    result = await _result(ctx, response.reconciliation_result, cutoff, custodian, exchange)
    fetched: regulator_service_pb2.GetReconciliationResultResponse = expect_ok(
        await _get(ctx, cutoff)
    )
    again = await _result(ctx, fetched.reconciliation_result, cutoff, custodian, exchange)
    check_equal("GetReconciliationResult against the submission's result", result, again)
    return result


def _matched(result: reconciliation_pb2.ReconciliationResult) -> None:
    check_equal(
        "outcome",
        _OUTCOME.Name(_OUTCOME.RECONCILIATION_OUTCOME_MATCHED),
        _OUTCOME.Name(result.outcome),
    )
    check_equal("breaks of a matched cut-off", [], [describe(b) for b in result.breaks])


@REGISTRY.case(
    "regulator/statement-accepted",
    Level.MUST,
    "a correct custodian statement is accepted; alone it yields no result yet",
    roles=_REGULATOR,
)
async def statement_accepted(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    _expect_no_result(
        await _submit(ctx, await _signed(ctx, _CUSTODIAN_ROLE, cutoff)), "the first statement"
    )


@REGISTRY.case(
    "regulator/result-not-found-before-both",
    Level.MUST,
    "GetReconciliationResult is NOT_FOUND before any statement and with only one of the two",
    roles=_REGULATOR,
)
async def not_found_before_both(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    expect_status(await _get(ctx, cutoff), grpc.StatusCode.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)
    expect_ok(await _submit(ctx, await _signed(ctx, _CUSTODIAN_ROLE, cutoff)))
    expect_status(await _get(ctx, cutoff), grpc.StatusCode.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)


@REGISTRY.case(
    "regulator/matched-result-signed",
    Level.MUST,
    "equal statements from both sides give a MATCHED result, regulator-signed and public, from Submit and Get alike",
    roles=_REGULATOR,
    clauses=("§3.4/audience-not-empty",),
)
async def matched_result(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    totals = [_total("USDC", "10", "10")]
    custodian = await _signed(ctx, _CUSTODIAN_ROLE, cutoff, totals=totals)
    exchange = await _signed(ctx, _EXCHANGE_ROLE, cutoff, totals=totals)
    _expect_no_result(await _submit(ctx, custodian), "the custodian's statement")
    _matched(await _complete(ctx, cutoff, custodian, exchange))


@REGISTRY.case(
    "regulator/breaks-located",
    Level.MUST,
    "statements with equal roots but a different sync head and asset total give BREAKS naming exactly those (§10.4)",
    roles=_REGULATOR,
)
async def breaks_located(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    custodian = await _signed(
        ctx, _CUSTODIAN_ROLE, cutoff, totals=[_total("USDC", "10", "10")], exchange_head=3
    )
    exchange = await _signed(
        ctx, _EXCHANGE_ROLE, cutoff, totals=[_total("USDC", "10", "9")], exchange_head=4
    )
    _expect_no_result(await _submit(ctx, custodian), "the custodian's statement")
    result = await _complete(ctx, cutoff, custodian, exchange)
    check_equal(
        "outcome",
        _OUTCOME.Name(_OUTCOME.RECONCILIATION_OUTCOME_BREAKS),
        _OUTCOME.Name(result.outcome),
    )
    # Ordered by account, asset, field (§10.4): the head's empty asset comes first.
    check_equal(
        "breaks (account, asset, field, custodian value, exchange value)",
        [
            ("", "", _FIELD.Name(_FIELD.BREAK_FIELD_SYNC_LOG_HEAD), "3", "4"),
            ("", "USDC", _FIELD.Name(_FIELD.BREAK_FIELD_PLEDGED_QUANTITY), "10", "9"),
        ],
        [
            (
                b.account_id,
                b.asset_id,
                _FIELD.Name(b.field),
                b.custodian_value.value,
                b.exchange_value.value,
            )
            for b in result.breaks
        ],
    )


@REGISTRY.case(
    "regulator/forged-statement-refused",
    Level.MUST,
    "a statement with a bad signature is refused (UNAUTHENTICATED SIGNATURE_INVALID) and not kept",
    roles=_REGULATOR,
)
async def forged_statement(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    genuine = await _signed(ctx, _CUSTODIAN_ROLE, cutoff)
    expect_status(
        await _submit(ctx, corrupt_signature(genuine)),
        grpc.StatusCode.UNAUTHENTICATED,
        _R.ERROR_REASON_SIGNATURE_INVALID,
    )
    # Nothing was kept: the genuine statement is still the first of its cut-off.
    _expect_no_result(await _submit(ctx, genuine), "the genuine statement after a forged one")


@REGISTRY.case(
    "regulator/wrong-role-statement-refused",
    Level.MUST,
    "a statement signed with a client key is refused: PERMISSION_DENIED KEY_ROLE_MISMATCH",
    roles=_REGULATOR,
)
async def wrong_role_statement(ctx: CaseContext) -> None:
    client = ctx.key(common_pb2.PARTY_ROLE_CLIENT)
    cutoff = await _cutoff(ctx)
    statement = _statement(_CUSTODIAN_ROLE, cutoff)
    expect_status(
        await _submit(ctx, await ctx.sign(statement, client)),
        grpc.StatusCode.PERMISSION_DENIED,
        _R.ERROR_REASON_KEY_ROLE_MISMATCH,
    )
    expect_status(await _get(ctx, cutoff), grpc.StatusCode.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)


@REGISTRY.case(
    "regulator/party-role-mismatch-refused",
    Level.MUST,
    "a statement signed with the custodian's key that states party_role EXCHANGE is refused "
    "(PERMISSION_DENIED KEY_ROLE_MISMATCH) and not kept (§10.2)",
    roles=_REGULATOR,
    clauses=("§10.2/party-role-checked",),
)
async def party_role_mismatch(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    # The custodian speaking for the exchange: a registered key, an overseen party, but
    # not the role it states.
    posing = _statement(_EXCHANGE_ROLE, cutoff)
    expect_status(
        await _submit(ctx, await ctx.sign(posing, _party(ctx, _CUSTODIAN_ROLE))),
        grpc.StatusCode.PERMISSION_DENIED,
        _R.ERROR_REASON_KEY_ROLE_MISMATCH,
    )
    # Not kept: with the custodian's own statement in, the cut-off still waits for the
    # exchange's (kept as the exchange's view, the posing statement would complete it).
    expect_ok(await _submit(ctx, await _signed(ctx, _CUSTODIAN_ROLE, cutoff)))
    expect_status(await _get(ctx, cutoff), grpc.StatusCode.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)


@REGISTRY.case(
    "regulator/wrong-audience-refused",
    Level.MUST,
    "a statement addressed to another party is refused (PERMISSION_DENIED AUDIENCE_MISMATCH) and not kept",
    roles=_REGULATOR,
)
async def wrong_audience(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    other = _party(ctx, _EXCHANGE_ROLE).party_id
    expect_status(
        await _submit(ctx, await _signed(ctx, _CUSTODIAN_ROLE, cutoff, audience=[other])),
        grpc.StatusCode.PERMISSION_DENIED,
        _R.ERROR_REASON_AUDIENCE_MISMATCH,
    )
    _expect_no_result(
        await _submit(ctx, await _signed(ctx, _CUSTODIAN_ROLE, cutoff)),
        "a correctly addressed statement after a misaddressed one",
    )


@REGISTRY.case(
    "regulator/replayed-statement-refused",
    Level.MUST,
    "the same statement submitted twice is refused the second time: ALREADY_EXISTS REPLAYED",
    roles=_REGULATOR,
)
async def replayed_statement(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    envelope = await _signed(ctx, _CUSTODIAN_ROLE, cutoff)
    expect_ok(await _submit(ctx, envelope))
    expect_status(
        await _submit(ctx, envelope), grpc.StatusCode.ALREADY_EXISTS, _R.ERROR_REASON_REPLAYED
    )


@REGISTRY.case(
    "regulator/cutoff-id-mismatch-refused",
    Level.MUST,
    "a statement whose cutoff_id names another second than its cutoff_time is refused "
    "(INVALID_ARGUMENT MALFORMED) and not kept (§10.2)",
    roles=_REGULATOR,
)
async def cutoff_id_mismatch(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    statement = _statement(_CUSTODIAN_ROLE, cutoff)
    statement.cutoff_id = (cutoff - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    expect_status(
        await _submit(ctx, await ctx.sign(statement, _party(ctx, _CUSTODIAN_ROLE))),
        grpc.StatusCode.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
    )
    _expect_no_result(
        await _submit(ctx, await _signed(ctx, _CUSTODIAN_ROLE, cutoff)),
        "a consistent statement after an inconsistent one",
    )


@REGISTRY.case(
    "regulator/statement-before-cutoff-refused",
    Level.MUST,
    "a view stated before its own cut-off (issued_at < cutoff_time) is refused (INVALID_ARGUMENT "
    "MALFORMED) and not kept; one issued at the cut-off itself is accepted (§10.2)",
    roles=_REGULATOR,
)
async def statement_before_cutoff(ctx: CaseContext) -> None:
    # Cut-offs of the last seconds: the kit's keys are valid then. A cut-off an earlier
    # run already stated (runs a second apart) is met as EQUIVOCATION; the next one back is tried.
    now = (await ctx.server_now()).replace(microsecond=0)
    for back in range(1, _RECENT_CUTOFFS + 1):
        cutoff = now - timedelta(seconds=back)
        early = await ctx.sign(
            _statement(_CUSTODIAN_ROLE, cutoff),
            _party(ctx, _CUSTODIAN_ROLE),
            issued_at=cutoff - timedelta(seconds=1),
        )
        expect_status(
            await _submit(ctx, early), grpc.StatusCode.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED
        )
        # The other side of the rule: a statement issued at the cut-off itself is a view of it.
        at_cutoff = await ctx.sign(
            _statement(_CUSTODIAN_ROLE, cutoff), _party(ctx, _CUSTODIAN_ROLE), issued_at=cutoff
        )
        outcome = await _submit(ctx, at_cutoff)
        if outcome.code == grpc.StatusCode.ABORTED:
            continue
        _expect_no_result(outcome, "a statement issued at its cut-off")
        return
    raise CaseSkipped(f"the last {_RECENT_CUTOFFS} cut-offs were all stated by earlier runs")


@REGISTRY.case(
    "regulator/unoverseen-party-refused",
    Level.MUST,
    "a statement from a registered exchange or custodian the regulator does not oversee is "
    "refused (PERMISSION_DENIED KEY_ROLE_MISMATCH) and not kept (§10.2)",
    roles=_REGULATOR,
)
async def unoverseen_party(ctx: CaseContext) -> None:
    overseen = {_party(ctx, role).party_id for role in (_CUSTODIAN_ROLE, _EXCHANGE_ROLE)}
    stranger = next(
        (
            key
            for key in ctx.config.kit_keys
            if key.role in (_CUSTODIAN_ROLE, _EXCHANGE_ROLE) and key.party_id not in overseen
        ),
        None,
    )
    if stranger is None:
        raise CaseSkipped(
            "needs a --kit-key of a custodian or exchange party other than the pair the "
            "regulator oversees (the kit's first custodian and exchange keys)"
        )
    cutoff = await _cutoff(ctx)
    expect_status(
        await _submit(ctx, await ctx.sign(_statement(stranger.role, cutoff), stranger)),
        grpc.StatusCode.PERMISSION_DENIED,
        _R.ERROR_REASON_KEY_ROLE_MISMATCH,
    )
    expect_status(await _get(ctx, cutoff), grpc.StatusCode.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)


@REGISTRY.case(
    "regulator/second-statement-same-cutoff-refused",
    Level.MUST,
    "a second, different statement of a party for a cut-off is refused (ABORTED EQUIVOCATION); the first stands",
    roles=_REGULATOR,
)
async def second_statement(ctx: CaseContext) -> None:
    cutoff = await _cutoff(ctx)
    totals = [_total("USDC", "10", "10")]
    first = await _signed(ctx, _CUSTODIAN_ROLE, cutoff, totals=totals)
    expect_ok(await _submit(ctx, first))
    second = await _signed(ctx, _CUSTODIAN_ROLE, cutoff, totals=[_total("USDC", "10", "9")])
    expect_status(await _submit(ctx, second), grpc.StatusCode.ABORTED, _R.ERROR_REASON_EQUIVOCATION)
    # The result is made of the first: it matches an exchange statement equal to it.
    exchange = await _signed(ctx, _EXCHANGE_ROLE, cutoff, totals=totals)
    _matched(await _complete(ctx, cutoff, first, exchange))
