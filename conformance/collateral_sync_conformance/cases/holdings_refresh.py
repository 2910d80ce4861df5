"""Holdings statements refreshed before they expire (docs/PROTOCOL.md §5.8, "Refresh").

A holdings statement is a log leaf and never re-signed; once expired it can be
cited as evidence by nothing (§3.6.1). So the custodian must attest an account
again before its latest statement expires — an account nothing else changes
with reason REFRESH, the same positions and the next epoch — and announce it
to the exchange the account is pledged to like any holdings change (§6.8).

The case moves the custodian's clock a statement's lifetime ahead, so it runs
last among the custodian's cases: nothing after it relies on the time it skips.
An account whose holdings earn a daily yield is attested anew by each accrual;
the case then sees those statements, and a refresh only for an account that
nothing else changes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from collateral_sync.amounts import amount_to_proto
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import attestation_pb2, custodian_service_pb2, test_control_pb2

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    expect_ok,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._checkpoints import verify_leaf
from collateral_sync_conformance.cases._kit_account import (
    client_key,
    ensure_pledged,
    exchange_party,
    holdings,
)
from collateral_sync_conformance.cases._raw_stream import SyncStream

__all__: list[str] = []

_REASON = attestation_pb2.HoldingsChangeReason
_REFRESH = _REASON.Name(_REASON.HOLDINGS_CHANGE_REASON_REFRESH)
#: How long before the latest statement expires the case looks for its successor.
_BEFORE_EXPIRY = timedelta(minutes=1)
#: Deposited first, so that the statement to be refreshed holds an uneven quantity.
_UNEVEN = "0.000000000123456789"

Figures = list[tuple[str, str, str, str]]


def _figures(statement: attestation_pb2.HoldingsStatement) -> Figures:
    """(asset, quantity, locked, pledged) of every position, as the canonical text signed."""
    return [
        (
            p.asset_id,
            p.quantity.value or "0",
            p.locked_quantity.value or "0",
            p.pledged_quantity.value or "0",
        )
        for p in statement.positions
    ]


def _times(statement: attestation_pb2.HoldingsStatement) -> tuple[datetime, datetime]:
    header = statement.header
    return header.issued_at.ToDatetime(tzinfo=UTC), header.expires_at.ToDatetime(tzinfo=UTC)


@REGISTRY.case(
    "attestation/holdings-refreshed-before-expiry",
    Level.MUST,
    "a minute before the latest holdings statement of the kit's pledged account expires (the "
    "clock moved with test control), GetHoldingsStatement returns a later one that outlives "
    "it; when nothing else changed the account it says REFRESH, is the next epoch and has "
    "the same positions byte for byte; and it is the account's last HoldingsChange on "
    "SyncPositions (§5.8, §6.8)",
    roles=[Role.CUSTODIAN],
    clauses=("§5.8/holdings-refreshed-before-expiry",),
)
async def holdings_refreshed_before_expiry(ctx: CaseContext) -> None:
    await ctx.advance_clock(timedelta(0))  # skips the case without test control
    account_id = ctx.account()
    statement, _, _ = await holdings(ctx, account_id)
    if statement.exchange_id in ("", exchange_party(ctx)):
        # Pledged to the kit's exchange, so that the new statement is announced to it.
        await ensure_pledged(ctx)
        statement, _, _ = await holdings(ctx, account_id)
    if not statement.positions:
        raise CaseSkipped(f"account {account_id!r} holds nothing the kit could deposit more of")
    asset_id = next(
        (p.asset_id for p in statement.positions if p.pledged_quantity.value not in ("", "0")),
        statement.positions[0].asset_id,
    )
    await ctx.control(
        ctx.test_control.deposit,
        test_control_pb2.DepositRequest(
            account_id=account_id, asset_id=asset_id, quantity=amount_to_proto(_UNEVEN)
        ),
    )
    before, _, _ = await holdings(ctx, account_id)
    issued_at, expires_at = _times(before)
    now = await ctx.advance_clock(expires_at - _BEFORE_EXPIRY - await ctx.server_now())

    outcome = await ctx.rpc(
        ctx.owner.custodian.get_holdings_statement,
        custodian_service_pb2.GetHoldingsStatementRequest(account_id=account_id),
        label=f"GetHoldingsStatement {_BEFORE_EXPIRY} before the latest statement expires",
    )
    response: custodian_service_pb2.GetHoldingsStatementResponse = expect_ok(outcome)
    after = sdk_check(
        "the holdings statement a minute before its predecessor expires",
        verify_statement,
        response.holdings_statement,
        ctx.registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=client_key(ctx).party_id,
        now=now,
    ).message
    check(
        after.epoch > before.epoch,
        f"no new holdings statement for account {account_id!r} within its latest one's "
        f"lifetime: it expires at {expires_at.isoformat()}, a minute from now, and nothing "
        "may cite it after that (§3.6.1)",
        expected=f"epoch > {before.epoch}, reason {_REFRESH} if nothing else changed the account",
        got=f"epoch {after.epoch} ({_REASON.Name(after.reason)}) issued at "
        f"{_times(after)[0].isoformat()}",
    )
    after_issued, after_expires = _times(after)
    check(
        after_issued > issued_at and after_expires > expires_at,
        "the account's new holdings statement does not outlive the one it follows",
        expected=f"issued after {issued_at.isoformat()}, expiring after {expires_at.isoformat()}",
        got=f"issued at {after_issued.isoformat()}, expiring at {after_expires.isoformat()}",
    )
    check_equal("account_id of the new statement", before.account_id, after.account_id)
    check_equal("exchange_id of the new statement", before.exchange_id, after.exchange_id)
    if after.epoch == before.epoch + 1 and (
        after.reason == _REASON.HOLDINGS_CHANGE_REASON_REFRESH
        or _figures(after) == _figures(before)
    ):
        # Nothing else was attested for the account in between: a refresh of it.
        check_equal(
            "reason of a statement that attests the same holdings again",
            _REFRESH,
            _REASON.Name(after.reason),
        )
        check_equal(
            "(asset, quantity, locked, pledged) of every position after the refresh",
            _figures(before),
            _figures(after),
        )
    if before.exchange_id == exchange_party(ctx):
        await _last_streamed(ctx, account_id, response)


async def _last_streamed(
    ctx: CaseContext,
    account_id: str,
    latest: custodian_service_pb2.GetHoldingsStatementResponse,
) -> None:
    """The account's last HoldingsChange on the exchange's stream is its latest statement."""
    stream = await SyncStream.open(ctx)
    try:
        head = stream.hello.sent_sequence
        entries = await stream.receive_until(head) if head else []
    finally:
        await stream.close()
    changes = [
        e.update.holdings_change
        for e in entries
        if e.update.WhichOneof("update") == "holdings_change"
        and verify_leaf(ctx, e.update.holdings_change.holdings_statement).account_id == account_id
    ]
    if not changes:
        raise CaseFailure(
            f"SyncPositions carries no HoldingsChange of account {account_id!r}, which is "
            "pledged to the kit's exchange (§5.8, 'Who is told')",
            expected="the account's HoldingsChanges, the latest statement last",
            got="none",
        )
    last = changes[-1]
    epoch = attestation_pb2.HoldingsStatement.FromString(last.holdings_statement.payload).epoch
    check(
        last.holdings_statement == latest.holdings_statement
        and last.attestation == latest.attestation,
        f"the last HoldingsChange of account {account_id!r} on SyncPositions is not its latest "
        "holdings statement: the new statement was not announced to the exchange (§6.8)",
        expected="the statement and AttestationRef GetHoldingsStatement returns",
        got=f"a HoldingsChange of epoch {epoch}",
    )
