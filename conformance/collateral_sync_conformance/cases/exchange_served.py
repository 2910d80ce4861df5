"""What the exchange serves stays fresh (docs/PROTOCOL.md §3.6.1, "Statements served fresh").

A party that fetches a statement verifies stages a-f at its own time (§3.6.1,
fetches row). So a statement the exchange serves long after it issued it — the
risk policy in force for weeks, the credit line of an account nothing changes,
the state of a margin call that has ended — must be re-signed with the same
content (a new header) before it would fail stage f (§3.4, "Lifetimes").

The case needs ``--listen`` and test mode. It opens an account at the kit's
custodian holding only an asset the exchange has no price for, so that nothing
the clock does changes its valuation, and fetches that account's credit line,
the risk policy in force and the states of up to three margin calls of this run
that have ended (terminal: their content can no longer change). Then it moves
the exchange's clock past the latest ``expires_at`` of them all — a month, for
a risk policy — and fetches each again. That is why it runs after every other
``exchange/`` case that values collateral: afterwards every price the exchange
holds is stale and every holdings statement the kit attested before has
expired. What runs after it (``evidence/``, ``sync/exchange/``) opens accounts
of its own and values nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    exchange_service_pb2,
    margin_pb2,
    valuation_pb2,
)
from google.protobuf.message import Message

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import KitCustodian
from collateral_sync_conformance._expect import (
    check,
    check_equal,
    expect_ok,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._as_custodian import SETTLE_TIMEOUT, open_account
from collateral_sync_conformance.cases._published import verify_public

__all__: list[str] = []

_MS = margin_pb2.MarginCallStatus
#: Statuses after which a call's state never changes again (§8.1).
_ENDED = frozenset(
    {
        _MS.MARGIN_CALL_STATUS_SATISFIED,
        _MS.MARGIN_CALL_STATUS_EXPIRED,
        _MS.MARGIN_CALL_STATUS_WITHDRAWN,
    }
)
#: At most this many ended calls are fetched again.
_MAX_CALLS = 3
#: An asset no exchange quotes: the account is worth 0 whatever time it is (§7.3 step 3).
_HOLDINGS = {"KIT-UNPRICED": "1000"}
#: How far past the latest expires_at the clock moves: beyond any skew a verifier may
#: allow (§3.6 f: at most 5 minutes), so a statement served as stored fails stage f.
_PAST_EXPIRY = timedelta(minutes=10)


def _expires_at(message: Message) -> datetime:
    expires: datetime = message.header.expires_at.ToDatetime(tzinfo=UTC)  # type: ignore[attr-defined]
    return expires


def _content(message: Message) -> bytes:
    """The statement's payload without its header: what re-signing must keep."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField("header")
    return copy.SerializeToString(deterministic=True)


def _changed_fields(before: Message, after: Message) -> list[str]:
    names = {f.name for f, _ in before.ListFields()} | {f.name for f, _ in after.ListFields()}
    names.discard("header")
    return sorted(n for n in names if getattr(before, n) != getattr(after, n))


def _check_same_content(what: str, before: Message, after: Message) -> None:
    changed = _changed_fields(before, after)
    check(
        not changed,
        f"{what} is not the statement served before with a new header: re-signing keeps "
        "every field but the header (§3.6.1, statements served fresh)",
        expected="the same content as before the clock moved",
        got="changed: " + ", ".join(changed),
    )


async def _open_account(ctx: CaseContext, kit: KitCustodian) -> str:
    """A fresh account at the kit's custodian, holding only an unpriced asset, credited."""
    account, _ = await open_account(ctx, kit, dict(_HOLDINGS), prefix="kit-served")
    return account


async def _policy(ctx: CaseContext, version: int, what: str) -> valuation_pb2.RiskPolicy:
    """GetRiskPolicy(version), verified a-f at the exchange's now (public, or to the kit)."""
    outcome = await ctx.rpc(
        ctx.exchange.get_risk_policy,
        exchange_service_pb2.GetRiskPolicyRequest(version=version),
        label=f"GetRiskPolicy(version={version})",
    )
    response: exchange_service_pb2.GetRiskPolicyResponse = expect_ok(outcome)
    now = await ctx.server_now()
    verified, _ = sdk_check(
        what, verify_public, ctx, response.risk_policy, now, valuation_pb2.RiskPolicy
    )
    check_equal(f"issuer of {what}", ctx.server_party_id, verified.issuer)
    policy: valuation_pb2.RiskPolicy = verified.message
    return policy


async def _credit_line(ctx: CaseContext, account: str, what: str) -> valuation_pb2.CreditLine:
    """GetCreditLine(account), verified a-f for the kit's custodian at the exchange's now."""
    outcome = await ctx.rpc(
        ctx.exchange.get_credit_line,
        exchange_service_pb2.GetCreditLineRequest(account_id=account),
        label=f"GetCreditLine({account})",
    )
    response: exchange_service_pb2.GetCreditLineResponse = expect_ok(outcome)
    verified = sdk_check(
        what,
        verify_statement,
        response.credit_line,
        ctx.registry,
        expected_type=valuation_pb2.CreditLine,
        audience=ctx.kit_party_id,
        now=await ctx.server_now(),
    )
    check_equal(f"issuer of {what}", ctx.server_party_id, verified.issuer)
    line: valuation_pb2.CreditLine = verified.message
    check_equal(f"account_id of {what}", account, line.account_id)
    return line


async def _call_state(ctx: CaseContext, call_id: str, what: str) -> margin_pb2.MarginCallState:
    """GetMarginCall(call_id), verified a-f for the kit's custodian at the exchange's now."""
    outcome = await ctx.rpc(
        ctx.exchange.get_margin_call,
        exchange_service_pb2.GetMarginCallRequest(margin_call_id=call_id),
        label=f"GetMarginCall({call_id})",
    )
    response: exchange_service_pb2.GetMarginCallResponse = expect_ok(outcome)
    verified = sdk_check(
        what,
        verify_statement,
        response.margin_call_state,
        ctx.registry,
        expected_type=margin_pb2.MarginCallState,
        audience=ctx.kit_party_id,
        now=await ctx.server_now(),
    )
    check_equal(f"issuer of {what}", ctx.server_party_id, verified.issuer)
    state: margin_pb2.MarginCallState = verified.message
    check_equal(f"margin_call_id of {what}", call_id, state.margin_call_id)
    return state


async def _listed_states(
    ctx: CaseContext, account: str, what: str
) -> dict[str, margin_pb2.MarginCallState]:
    """ListMarginCalls(account), every page, each state verified a-f at the exchange's now."""
    states: dict[str, margin_pb2.MarginCallState] = {}
    token = ""
    while True:
        outcome = await ctx.rpc(
            ctx.exchange.list_margin_calls,
            exchange_service_pb2.ListMarginCallsRequest(account_id=account, page_token=token),
            label=f"ListMarginCalls({account})",
        )
        response: exchange_service_pb2.ListMarginCallsResponse = expect_ok(outcome)
        now = await ctx.server_now()
        for envelope in response.margin_call_states:
            verified = sdk_check(
                what,
                verify_statement,
                envelope,
                ctx.registry,
                expected_type=margin_pb2.MarginCallState,
                audience=ctx.kit_party_id,
                now=now,
            )
            check_equal(f"issuer of {what}", ctx.server_party_id, verified.issuer)
            states[verified.message.margin_call_id] = verified.message
        token = response.next_page_token
        if not token:
            return states


async def _ended_calls(
    ctx: CaseContext, kit: KitCustodian
) -> list[tuple[str, margin_pb2.MarginCallState]]:
    """Up to ``_MAX_CALLS`` margin calls the exchange sent this run that have ended, as served."""
    call_ids: list[str] = []
    for update in kit.received:
        if update.variant == "margin_call" and update.message.margin_call_id not in call_ids:
            call_ids.append(update.message.margin_call_id)
    ended = []
    for call_id in call_ids:
        state = await _call_state(
            ctx, call_id, f"the state of margin call {call_id!r} (GetMarginCall)"
        )
        if state.status in _ENDED:
            ended.append((call_id, state))
            if len(ended) == _MAX_CALLS:
                break
    return ended


def _announced(kit: KitCustodian, since: int, account: str, line: valuation_pb2.CreditLine) -> bool:
    """Whether the exchange sent, after entry ``since``, a credit line of ``line``'s content."""
    content = _content(line)
    return any(
        update.variant == "credit_line"
        and update.message.account_id == account
        and _content(update.message) == content
        for update in kit.received[since:]
    )


@REGISTRY.case(
    "exchange/served-statements-fresh",
    Level.MUST,
    "what the exchange serves passes stages a-f at its own now, before and after test control "
    "moves its clock past the expires_at of each statement served: the risk policy by version "
    "and in force, the credit line of an account holding an unpriced asset, and the states "
    "(GetMarginCall and ListMarginCalls) of margin calls of this run that have ended — each "
    "re-signed with the same content (§3.6.1, §3.4 Lifetimes)",
    roles=[Role.EXCHANGE],
    clauses=("§3.6.1/served-statements-fresh",),
)
async def served_statements_fresh(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.advance_clock(timedelta(0))  # skips the case without test control
    account = await _open_account(ctx, kit)

    # Before the clock moves: what the exchange serves is fresh now (§3.6.1, fetches row).
    policy = await _policy(ctx, 0, "the risk policy in force (GetRiskPolicy)")
    line = await _credit_line(ctx, account, f"the credit line of {account!r} (GetCreditLine)")
    since = len(kit.received)
    calls = await _ended_calls(ctx, kit)
    served: list[tuple[str, Message]] = [
        (f"risk policy version {policy.version}", policy),
        (f"the credit line of {account!r}", line),
        *((f"the state of margin call {call_id!r}", state) for call_id, state in calls),
    ]
    latest = max(_expires_at(message) for _, message in served)
    moved_to = await ctx.advance_clock(latest + _PAST_EXPIRY - await ctx.server_now())
    after = (
        f"after the exchange's clock moved to {moved_to.isoformat()}, {_PAST_EXPIRY} past the "
        "expires_at of everything it served before"
    )

    again = await _policy(
        ctx,
        policy.version,
        f"risk policy version {policy.version} (GetRiskPolicy by version) {after}",
    )
    _check_same_content(f"risk policy version {policy.version} served {after}", policy, again)
    in_force = await _policy(ctx, 0, f"the risk policy in force (GetRiskPolicy) {after}")
    if in_force.version == policy.version:
        _check_same_content(f"the risk policy in force served {after}", policy, in_force)

    line_again = await _credit_line(
        ctx, account, f"the credit line of {account!r} (GetCreditLine) {after}"
    )
    if _content(line_again) != _content(line):
        # A new valuation is no re-signing: it is fresh by issue, and announced (§6.8).
        announced = await kit.wait_for(
            lambda: _announced(kit, since, account, line_again), SETTLE_TIMEOUT
        )
        if not announced:
            _check_same_content(f"the credit line of {account!r} served {after}", line, line_again)

    for call_id, state in calls:
        state_again = await _call_state(
            ctx, call_id, f"the state of margin call {call_id!r} (GetMarginCall) {after}"
        )
        _check_same_content(
            f"the state of margin call {call_id!r} served {after}", state, state_again
        )
        call = margin_pb2.MarginCall.FromString(state.margin_call.payload)
        listed = await _listed_states(
            ctx,
            call.account_id,
            f"a margin call state of account {call.account_id!r} (ListMarginCalls) {after}",
        )
        check(
            call_id in listed,
            f"ListMarginCalls of account {call.account_id!r} does not list its call {call_id!r}",
            expected=f"a state of {call_id}",
            got=", ".join(sorted(listed)) or "none",
        )
        _check_same_content(
            f"the listed state of margin call {call_id!r} {after}", state, listed[call_id]
        )
