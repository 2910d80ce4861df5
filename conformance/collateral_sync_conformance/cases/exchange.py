"""Exchange reads (docs/PROTOCOL.md §7.1, Appendix A): the published risk policy and lookups.

The risk policy must be signed by the exchange, public, and valid by the
rules of §7.1 (checked with the SDK's independent validator); every lookup of
something that does not exist answers NOT_FOUND with the collateral-sync
error details.
"""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal

import grpc
from collateral_sync.amounts import amount_from_proto, format_amount, parse_amount
from collateral_sync.signing import VerifiedStatement, verify_statement
from collateral_sync.v1 import (
    common_pb2,
    errors_pb2,
    exchange_service_pb2,
    margin_pb2,
    test_control_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import credit_line_figures, recompute_margin_call, value_collateral

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseSkipped,
    check,
    check_equal,
    describe,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._as_custodian import set_exposure
from collateral_sync_conformance.cases._published import (
    latest_policy,
    signed_credit_line,
    verified_policy,
)
from collateral_sync_conformance.cases._snapshots import exchange_state

__all__: list[str] = []

_EXCHANGE = [Role.EXCHANGE]
_R = errors_pb2.ErrorReason
_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)


@REGISTRY.case(
    "exchange/risk-policy-signed",
    Level.MUST,
    "the risk policy in force is signed by the exchange, public, and valid by the rules of §7.1",
    roles=_EXCHANGE,
    clauses=("§7.1/adl-rule-defined", "§7.1/stale-price-rule-defined"),
)
async def risk_policy_signed(ctx: CaseContext) -> None:
    await latest_policy(ctx)


@REGISTRY.case(
    "exchange/risk-policy-by-version",
    Level.MUST,
    "GetRiskPolicy(version=v) of the version in force returns that version with the same content",
    roles=_EXCHANGE,
    clauses=("§7.1/adl-rule-defined", "§7.1/stale-price-rule-defined"),
)
async def risk_policy_by_version(ctx: CaseContext) -> None:
    current = await latest_policy(ctx)
    outcome = await ctx.rpc(
        ctx.exchange.get_risk_policy,
        exchange_service_pb2.GetRiskPolicyRequest(version=current.version),
    )
    response: exchange_service_pb2.GetRiskPolicyResponse = expect_ok(outcome)
    again = await verified_policy(ctx, response.risk_policy)
    check_equal("version of the policy asked for by version", current.version, again.version)
    # The same policy, possibly re-signed: compare everything but the header.
    first, second = valuation_pb2.RiskPolicy(), valuation_pb2.RiskPolicy()
    first.CopyFrom(current)
    second.CopyFrom(again)
    first.ClearField("header")
    second.ClearField("header")
    check_equal(
        f"content of policy version {current.version}",
        str(first),
        str(second),
    )


@REGISTRY.case(
    "exchange/risk-policy-unknown-version-not-found",
    Level.MUST,
    "GetRiskPolicy of a version never published is refused with NOT_FOUND",
    roles=_EXCHANGE,
)
async def risk_policy_unknown_version(ctx: CaseContext) -> None:
    current = await latest_policy(ctx)
    outcome = await ctx.rpc(
        ctx.exchange.get_risk_policy,
        exchange_service_pb2.GetRiskPolicyRequest(version=current.version + 1_000_000),
    )
    expect_status(outcome, *_NOT_FOUND)


@REGISTRY.case(
    "exchange/credit-line-unknown-account-not-found",
    Level.MUST,
    "a regulator's GetCreditLine of an account the exchange does not know is refused with NOT_FOUND",
    roles=_EXCHANGE,
)
async def credit_line_unknown(ctx: CaseContext) -> None:
    # Only a regulator, who may read every account, learns that one does not exist (§4.5).
    regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
    outcome = await ctx.rpc(
        regulator.exchange.get_credit_line,
        exchange_service_pb2.GetCreditLineRequest(
            account_id=ctx.unique("conformance-no-such-account")
        ),
    )
    expect_status(outcome, *_NOT_FOUND)


@REGISTRY.case(
    "exchange/margin-call-unknown-not-found",
    Level.MUST,
    "a regulator's GetMarginCall of a call that does not exist is refused with NOT_FOUND",
    roles=_EXCHANGE,
)
async def margin_call_unknown(ctx: CaseContext) -> None:
    # Only a regulator, who may read every account, learns that one does not exist (§4.5).
    regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
    outcome = await ctx.rpc(
        regulator.exchange.get_margin_call,
        exchange_service_pb2.GetMarginCallRequest(margin_call_id=ctx.unique("conformance-no-call")),
    )
    expect_status(outcome, *_NOT_FOUND)


@REGISTRY.case(
    "exchange/list-margin-calls-unknown-account-not-found",
    Level.MUST,
    "a regulator's ListMarginCalls of an account the exchange does not know is refused with NOT_FOUND",
    roles=_EXCHANGE,
)
async def list_margin_calls_unknown(ctx: CaseContext) -> None:
    # Only a regulator, who may read every account, learns that one does not exist (§4.5).
    regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
    outcome = await ctx.rpc(
        regulator.exchange.list_margin_calls,
        exchange_service_pb2.ListMarginCallsRequest(
            account_id=ctx.unique("conformance-no-such-account")
        ),
    )
    expect_status(outcome, *_NOT_FOUND)


@REGISTRY.case(
    "exchange/list-margin-calls-bad-page-token",
    Level.MUST,
    "ListMarginCalls with a page token the exchange never issued is refused: INVALID_ARGUMENT MALFORMED",
    roles=_EXCHANGE,
)
async def list_margin_calls_bad_token(ctx: CaseContext) -> None:
    account = ctx.account()  # a known account, so that only the token is wrong
    outcome = await ctx.rpc(
        ctx.exchange.list_margin_calls,
        exchange_service_pb2.ListMarginCallsRequest(
            account_id=account,
            page_token="conformance-not-a-token",  # noqa: S106 (not a secret)
        ),
    )
    expect_status(outcome, grpc.StatusCode.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED)


@REGISTRY.case(
    "exchange/respond-to-unknown-margin-call-not-found",
    Level.MUST,
    "a correctly signed response to a margin call that does not exist is refused with NOT_FOUND",
    roles=_EXCHANGE,
)
async def respond_to_unknown_call(ctx: CaseContext) -> None:
    custodian = ctx.key(common_pb2.PARTY_ROLE_CUSTODIAN)
    response = margin_pb2.MarginCallResponse(
        margin_call_id=ctx.unique("conformance-no-call"),
        kind=margin_pb2.MARGIN_CALL_RESPONSE_KIND_DISPUTE,
        agreed_amount=common_pb2.Decimal(value="0"),
        dispute_reason=margin_pb2.DISPUTE_REASON_ARITHMETIC,
    )
    before = await exchange_state(ctx)
    outcome = await ctx.rpc(
        ctx.exchange.respond_to_margin_call,
        exchange_service_pb2.RespondToMarginCallRequest(
            margin_call_response=await ctx.sign(response, custodian)
        ),
    )
    expect_status(outcome, *_NOT_FOUND)
    check_equal(
        "the exchange's state after the refused response", before, await exchange_state(ctx)
    )


# ------------------------------------------------------------------ valuation arithmetic


#: A price that makes any pledged quantity the kit can afford count for something.
_HIGH_PRICE = "1000000000"


def _row_positions(line: valuation_pb2.CreditLine) -> list[common_pb2.Position]:
    """The holdings the exchange says it valued: each row's eligible quantity, pledged in full."""
    return [
        common_pb2.Position(
            asset_id=row.asset_id,
            quantity=row.eligible_quantity,
            locked_quantity=common_pb2.Decimal(value="0"),
            pledged_quantity=row.eligible_quantity,
        )
        for row in line.valuations
    ]


async def _revalue_at(ctx: CaseContext, account: str, asset_id: str, price: str) -> None:
    # The quote comes from the source the published policy names (§7.1 price_source).
    source = (await latest_policy(ctx)).price_source
    now = await ctx.server_now()
    quote = valuation_pb2.PriceQuote(
        asset_id=asset_id, price=common_pb2.Decimal(value=price), source=source
    )
    quote.observed_at.FromDatetime(now)
    await ctx.control(ctx.test_control.set_price, test_control_pb2.SetPriceRequest(quote=quote))
    await ctx.control(
        ctx.test_control.run_valuation, test_control_pb2.RunValuationRequest(account_id=account)
    )


async def _check_figures(ctx: CaseContext, line: valuation_pb2.CreditLine) -> None:
    check(
        bool(line.attestations),
        "the credit line names no holdings statement it valued",
        expected="at least one AttestationRef",
        got="none",
    )
    policy_outcome = await ctx.rpc(
        ctx.exchange.get_risk_policy,
        exchange_service_pb2.GetRiskPolicyRequest(version=line.risk_policy_version),
    )
    policy_response: exchange_service_pb2.GetRiskPolicyResponse = expect_ok(policy_outcome)
    policy = await verified_policy(ctx, policy_response.risk_policy)
    check_equal(
        "version of the policy the credit line names", line.risk_policy_version, policy.version
    )
    valuation = sdk_check(
        "the credit line's valuation inputs",
        value_collateral,
        policy,
        _row_positions(line),
        list(line.prices),
        valued_at=line.header.issued_at.ToDatetime(tzinfo=UTC),
    )
    check_equal(
        "the position valuations (haircuts, caps, rounding)",
        [describe(row) for row in valuation.rows()],
        [describe(row) for row in line.valuations],
    )
    exposure = sdk_check("the credit line's exposure", amount_from_proto, line.exposure)
    figures = sdk_check(
        "the credit line's figures", credit_line_figures, policy, valuation, exposure
    )
    check_equal(
        "collateral_value", format_amount(figures.collateral_value), line.collateral_value.value
    )
    check_equal("credit_limit", format_amount(figures.credit_limit), line.credit_limit.value)


@REGISTRY.case(
    "exchange/credit-line-recomputes",
    Level.MUST,
    "the signed CreditLine's rows and figures equal the SDK's valuation under the signed policy "
    "it names, its prices and its holdings (§7.2, rules 1 to 8); a zero valuation is first "
    "raised with SetPrice",
    roles=_EXCHANGE,
    clauses=("§2.1/send-canonical-amounts", "§3.4/audience-not-empty"),
)
async def credit_line_recomputes(ctx: CaseContext) -> None:
    account = ctx.account()
    line = await signed_credit_line(ctx, account)
    if parse_amount(line.collateral_value.value or "0") > 0:
        await _check_figures(ctx, line)
        return
    # Zero hides every multiplication: price an asset that counts high enough to show.
    counted = [
        r
        for r in line.valuations
        if parse_amount(r.eligible_quantity.value or "0") > 0
        and parse_amount(r.collateral_factor.value or "0") > 0
    ]
    if not counted:
        await _check_figures(ctx, line)  # nothing the policy counts: zero is the right answer
        return
    row = counted[0]
    before = next((q.price.value for q in line.prices if q.asset_id == row.asset_id), "")
    await _revalue_at(ctx, account, row.asset_id, _HIGH_PRICE)
    try:
        line = await signed_credit_line(ctx, account)
        check(
            parse_amount(line.collateral_value.value or "0") > 0,
            f"after SetPrice({row.asset_id}={_HIGH_PRICE}) and RunValuation the credit line is "
            "still worth nothing",
            expected="collateral_value > 0",
            got=line.collateral_value.value,
        )
        await _check_figures(ctx, line)
    finally:
        if before:
            await _revalue_at(ctx, account, row.asset_id, before)


# ------------------------------------------------------------------ margin calls


_MS = margin_pb2.MarginCallStatus
_OPEN = {
    _MS.MARGIN_CALL_STATUS_ISSUED,
    _MS.MARGIN_CALL_STATUS_AGREED,
    _MS.MARGIN_CALL_STATUS_PARTIALLY_AGREED,
    _MS.MARGIN_CALL_STATUS_DISPUTED,
}


async def _listed_states(
    ctx: CaseContext, account: str, page_size: int = 1000
) -> list[VerifiedStatement[margin_pb2.MarginCallState]]:
    """ListMarginCalls of ``account``: every state verified by the SDK before use."""
    outcome = await ctx.rpc(
        ctx.exchange.list_margin_calls,
        exchange_service_pb2.ListMarginCallsRequest(account_id=account, page_size=page_size),
    )
    response: exchange_service_pb2.ListMarginCallsResponse = expect_ok(outcome)
    now = await ctx.server_now()
    return [
        sdk_check(
            "a listed margin call state",
            verify_statement,
            envelope,
            ctx.registry,
            expected_type=margin_pb2.MarginCallState,
            audience=ctx.kit_party_id,
            now=now,
        )
        for envelope in response.margin_call_states
    ]


async def _call_ids(ctx: CaseContext, account: str) -> dict[str, int]:
    """The account's margin calls by id, with their status."""
    states = [verified.message for verified in await _listed_states(ctx, account)]
    return {state.margin_call_id: state.status for state in states}


async def _valued(ctx: CaseContext, account: str) -> tuple[Decimal, tuple[str, str] | None]:
    """The account's collateral value, raised by a high price on an asset the policy counts
    when it is 0; with the (asset, price) to put back afterwards, if a price was changed."""
    line = await signed_credit_line(ctx, account)
    value = parse_amount(line.collateral_value.value or "0")
    if value != 0:
        return value, None
    counted = [
        r
        for r in line.valuations
        if parse_amount(r.eligible_quantity.value or "0") > 0
        and parse_amount(r.collateral_factor.value or "0") > 0
    ]
    if not counted:
        raise CaseSkipped(f"account {account!r} holds nothing the exchange's policy counts")
    asset = counted[0].asset_id
    before = next((q.price.value for q in line.prices if q.asset_id == asset), "")
    await _revalue_at(ctx, account, asset, _HIGH_PRICE)
    line = await signed_credit_line(ctx, account)
    return parse_amount(line.collateral_value.value or "0"), (asset, before) if before else None


@REGISTRY.case(
    "exchange/margin-call-recomputes",
    Level.MUST,
    "an exposure that puts the collateral ratio between the liquidation line and maintenance "
    "makes RunValuation issue a margin call whose figures the SDK recomputes from its signed "
    "inputs (recompute_margin_call)",
    roles=_EXCHANGE,
)
async def margin_call_recomputes(ctx: CaseContext) -> None:
    account = ctx.account()
    value, restore = await _valued(ctx, account)
    try:
        policy = await latest_policy(ctx)
        maintenance = parse_amount(policy.maintenance_ratio.value)
        liquidation = parse_amount(policy.liquidation_ratio.value)
        # A ratio halfway between the two lines: a call is due, a liquidation is not.
        exposure = (value * 2 / (maintenance + liquidation)).quantize(Decimal("0.01"))
        earlier = await _call_ids(ctx, account)
        # SetExposure may revalue (and call) by itself; RunValuation then names no new call.
        call_id = await set_exposure(ctx, account, exposure)
        if not call_id:
            after = await _call_ids(ctx, account)
            fresh = sorted(set(after) - set(earlier))
            # A call still open (e.g. agreed by the custodian earlier) stands in for a new one.
            still_open = sorted(i for i, status in after.items() if status in _OPEN)
            call_id = fresh[0] if len(fresh) == 1 else (still_open[-1] if still_open else "")
            new_call = len(fresh) == 1
        else:
            new_call = True
        check(
            bool(call_id),
            "RunValuation at a collateral ratio below maintenance issued no margin call",
            expected=f"a margin_call_id (collateral value {value}, exposure {exposure}, "
            f"maintenance {maintenance}, liquidation {liquidation})",
            got="none",
        )
        outcome = await ctx.rpc(
            ctx.exchange.get_margin_call,
            exchange_service_pb2.GetMarginCallRequest(margin_call_id=call_id),
        )
        response: exchange_service_pb2.GetMarginCallResponse = expect_ok(outcome)
        now = await ctx.server_now()
        state = sdk_check(
            "the margin call state",
            verify_statement,
            response.margin_call_state,
            ctx.registry,
            expected_type=margin_pb2.MarginCallState,
            audience=ctx.kit_party_id,
            now=now,
        )
        check_equal("issuer of the margin call state", ctx.server_party_id, state.issuer)
        check_equal("margin_call_id of the state", call_id, state.message.margin_call_id)
        recomputed = sdk_check(
            "the margin call, recomputed from its signed inputs",
            recompute_margin_call,
            state.message.margin_call,
            ctx.registry,
            audience=ctx.kit_party_id,
            now=now,
        )
        check_equal("account of the margin call", account, recomputed.margin_call.account_id)
        if new_call:
            check_equal("exposure the call was computed on", exposure, recomputed.exposure)
        check_equal(
            "call amount of the state and of the signed call",
            format_amount(recomputed.call_amount),
            state.message.call_amount.value,
        )
    finally:
        await set_exposure(ctx, account, Decimal(0))
        if restore is not None:
            await _revalue_at(ctx, account, *restore)


@REGISTRY.case(
    "exchange/list-margin-calls-known-account",
    Level.MUST,
    "ListMarginCalls of a known account answers with signed call states of that account "
    "(run after exchange/margin-call-recomputes, which leaves one)",
    roles=_EXCHANGE,
)
async def list_margin_calls_known(ctx: CaseContext) -> None:
    account = ctx.account()
    states = await _listed_states(ctx, account, page_size=0)
    if not states:
        # An empty list proves nothing about the states; this case runs after
        # exchange/margin-call-recomputes, which leaves a call of the account behind.
        raise CaseSkipped(f"account {account!r} has no margin call to check")
    for state in states:
        check_equal("issuer of a listed margin call state", ctx.server_party_id, state.issuer)
        call = margin_pb2.MarginCall.FromString(state.message.margin_call.payload)
        check_equal("account of a listed margin call", account, call.account_id)
        check_equal(
            "margin_call_id of the state and its call",
            state.message.margin_call_id,
            call.margin_call_id,
        )


#: How many margin calls the paging case wants the account to have: pages of 1 and 2 then
#: include a full page followed by another, and a last page that is not full.
_PAGED_CALLS = 3


async def _listed_pages(
    ctx: CaseContext, account: str, page_size: int, total: int
) -> list[list[str]]:
    """The margin_call_ids of each page of ListMarginCalls(account, page_size), following
    next_page_token from the first page until it is empty; ``total`` calls never take more
    than ``total + 1`` pages."""
    pages: list[list[str]] = []
    token = ""
    while True:
        outcome = await ctx.rpc(
            ctx.exchange.list_margin_calls,
            exchange_service_pb2.ListMarginCallsRequest(
                account_id=account, page_size=page_size, page_token=token
            ),
            label=f"ListMarginCalls({account}, page_size={page_size}, page {len(pages) + 1})",
        )
        response: exchange_service_pb2.ListMarginCallsResponse = expect_ok(outcome)
        page = [
            margin_pb2.MarginCallState.FromString(envelope.payload).margin_call_id
            for envelope in response.margin_call_states
        ]
        pages.append(page)
        check(
            len(page) <= page_size,
            f"page {len(pages)} of ListMarginCalls with page_size {page_size} holds more items "
            "than asked for (§13 Pagination)",
            expected=f"at most {page_size} margin call states",
            got=f"{len(page)}",
        )
        token = response.next_page_token
        if not token:
            return pages
        check(
            bool(page),
            f"page {len(pages)} of ListMarginCalls with page_size {page_size} is empty, yet "
            "names a next page (§13 Pagination)",
            expected="a page with at least one margin call state",
            got=f"no state, next_page_token {token[:40]!r}",
        )
        check(
            len(pages) <= total + 1,
            f"ListMarginCalls with page_size {page_size} keeps naming a next page",
            expected=f"at most {total + 1} pages for {total} margin calls",
            got=f"{len(pages)} pages, still a next_page_token",
        )


@REGISTRY.case(
    "exchange/list-margin-calls-pages-complete",
    Level.MUST,
    "ListMarginCalls of an account with at least three margin calls (the case makes those it "
    "needs with SetExposure, as margin-call-recomputes does), followed page by page "
    "with page_size 1 and with page_size 2, lists exactly the calls of one listing with "
    "page_size 1000, in the same order, none twice, no page over its size, the last page's "
    "next_page_token empty (§13 Pagination)",
    roles=_EXCHANGE,
    clauses=("§13/listing-pages-complete",),
)
async def list_margin_calls_pages_complete(ctx: CaseContext) -> None:
    account = ctx.account()
    if len(await _call_ids(ctx, account)) < _PAGED_CALLS:
        await _more_calls(ctx, account)
    outcome = await ctx.rpc(
        ctx.exchange.list_margin_calls,
        exchange_service_pb2.ListMarginCallsRequest(account_id=account, page_size=1000),
    )
    whole: exchange_service_pb2.ListMarginCallsResponse = expect_ok(outcome)
    expected = [
        margin_pb2.MarginCallState.FromString(envelope.payload).margin_call_id
        for envelope in whole.margin_call_states
    ]
    if len(expected) < _PAGED_CALLS:
        raise CaseSkipped(
            f"account {account!r} has {len(expected)} margin call(s), fewer than {_PAGED_CALLS}"
        )
    check(
        len(set(expected)) == len(expected),
        "one listing with page_size 1000 lists a margin call twice",
        expected="distinct margin_call_ids",
        got=repr(expected),
    )
    check_equal(
        f"next_page_token of a listing of {len(expected)} margin calls with page_size 1000",
        "",
        whole.next_page_token,
    )
    for page_size in (1, 2):
        pages = await _listed_pages(ctx, account, page_size, len(expected))
        check_equal(
            f"the margin_call_ids of every page with page_size {page_size}, in order, against "
            "one listing with page_size 1000 (§13 Pagination)",
            expected,
            [call_id for page in pages for call_id in page],
        )


async def _more_calls(ctx: CaseContext, account: str) -> None:
    """Margin calls of ``account`` until it has ``_PAGED_CALLS``, as margin-call-recomputes
    makes one: an exposure between the liquidation line and maintenance issues a call, and
    no exposure at all ends it (the exchange withdraws it, §8.1), so that the next exposure
    issues another. Any price raised to give the account a value is put back afterwards."""
    value, restore = await _valued(ctx, account)
    try:
        policy = await latest_policy(ctx)
        maintenance = parse_amount(policy.maintenance_ratio.value)
        liquidation = parse_amount(policy.liquidation_ratio.value)
        exposure = (value * 2 / (maintenance + liquidation)).quantize(Decimal("0.01"))
        known = await _call_ids(ctx, account)
        for _ in range(_PAGED_CALLS):
            if len(known) >= _PAGED_CALLS:
                break
            await set_exposure(ctx, account, exposure)
            await set_exposure(ctx, account, Decimal(0))
            known = await _call_ids(ctx, account)
    finally:
        await set_exposure(ctx, account, Decimal(0))
        if restore is not None:
            await _revalue_at(ctx, account, *restore)


@REGISTRY.case(
    "exchange/list-liquidations-unknown-account-not-found",
    Level.MUST,
    "a regulator's ListLiquidations of an account the exchange does not know is refused with NOT_FOUND",
    roles=_EXCHANGE,
)
async def list_liquidations_unknown(ctx: CaseContext) -> None:
    # Only a regulator, who may read every account, learns that one does not exist (§4.5).
    regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
    outcome = await ctx.rpc(
        regulator.exchange.list_liquidations,
        exchange_service_pb2.ListLiquidationsRequest(
            account_id=ctx.unique("conformance-no-such-account")
        ),
    )
    expect_status(outcome, *_NOT_FOUND)


@REGISTRY.case(
    "exchange/list-liquidations-bad-page-token",
    Level.MUST,
    "ListLiquidations with a page token the exchange never issued is refused: INVALID_ARGUMENT MALFORMED",
    roles=_EXCHANGE,
)
async def list_liquidations_bad_token(ctx: CaseContext) -> None:
    account = ctx.account()  # a known account, so that only the token is wrong
    outcome = await ctx.rpc(
        ctx.exchange.list_liquidations,
        exchange_service_pb2.ListLiquidationsRequest(
            account_id=account,
            page_token="conformance-not-a-token",  # noqa: S106 (not a secret)
        ),
    )
    expect_status(outcome, grpc.StatusCode.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED)


@REGISTRY.case(
    "exchange/shortfall-allocation-unknown-not-found",
    Level.MUST,
    "a regulator's GetShortfallAllocation of a liquidation that never happened is refused with NOT_FOUND",
    roles=_EXCHANGE,
)
async def shortfall_allocation_unknown(ctx: CaseContext) -> None:
    # Only a regulator, who may read every account, learns that one does not exist (§4.5).
    regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
    outcome = await ctx.rpc(
        regulator.exchange.get_shortfall_allocation,
        exchange_service_pb2.GetShortfallAllocationRequest(
            liquidation_id=ctx.unique("conformance-no-liquidation")
        ),
    )
    expect_status(outcome, *_NOT_FOUND)
