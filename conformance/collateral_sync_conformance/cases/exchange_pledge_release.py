"""The exchange's consent to a pledge release, with the kit as its custodian (§5.10).

These cases need ``--listen``: the kit is the custodian whose holdings
statements the exchange credits, and the account's client who asks it to
release part of a pledge. Every consent the exchange gives is recomputed by
the SDK from the signed inputs it carries
(:func:`collateral_sync.valuation.recompute_pledge_release_consent`), and each
rule is tried on both sides: the largest release the policy allows is
consented and one quantum (10^-18) more refused; exactly the pledge is
consented and one quantum more refused; the latest proven statement is judged,
and a release only it allows is consented; the account's client is obeyed and
another client, a request for another exchange, another role's key and a
stranger refused; nothing is consented while a margin call is open, and the
same release is once the call has ended. Quantities are uneven and only part
of each holding is pledged, so a rule applied to the wrong figure cannot pass
by chance. The kit's custodian never executes these consents: each case opens
accounts of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

import grpc
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.keys import SigningKey
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    margin_pb2,
    pledge_release_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import (
    PledgeReleaseConsentCheck,
    judge_release,
    recompute_pledge_release_consent,
)

from collateral_sync_conformance._context import CaseContext, PartyClients
from collateral_sync_conformance._counterpart import KitCustodian, relies_on
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    Outcome,
    check,
    check_equal,
    expect_access_denied,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._as_custodian import (
    credit_line,
    open_account,
    poll,
    set_exposure,
)
from collateral_sync_conformance.cases._kit_account import QUANTUM, client_key
from collateral_sync_conformance.cases._published import latest_policy

__all__: list[str] = []

_EXCHANGE = [Role.EXCHANGE]
_R = errors_pb2.ErrorReason
_C = grpc.StatusCode
_H = attestation_pb2.HoldingsChangeReason
_MS = margin_pb2.MarginCallStatus
_ROLE = common_pb2.PartyRole
_ONE = Decimal(QUANTUM)
#: What the accounts of these cases hold, and the part of it pledged: uneven on purpose.
_HELD = "123456.789012345678"
_PLEDGED = "100000.000000000317"
_FIELD = "pledge_release_request"


# --- the account, as the kit's custodian attests it -----------------------------------


async def _open(
    ctx: CaseContext,
    kit: KitCustodian,
    *,
    held: dict[str, str] | None = None,
    pledged: dict[str, str] | None = None,
    account: str | None = None,
    epoch: int = 1,
) -> tuple[str, envelope_pb2.Envelope]:
    """An account's statement at the kit's custodian, credited by the exchange.

    Returns the account and the statement's envelope, once the exchange's
    credit line relies on it.
    """
    await ctx.server_now()  # the kit signs on the exchange's clock
    account = account or ctx.unique("kit-release")
    change, ref = kit.holdings_change(
        account,
        client_key(ctx),
        held or {"USDC": _HELD},
        epoch=epoch,
        reason=_H.HOLDINGS_CHANGE_REASON_PLEDGE if epoch == 1 else _H.HOLDINGS_CHANGE_REASON_TOP_UP,
        pledged=pledged if pledged is not None else {"USDC": _PLEDGED},
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))

    async def credited() -> bool:
        return relies_on(await credit_line(ctx, account), ref)

    await poll(ctx, credited, f"the exchange credits {account!r} (epoch {epoch}) once proven")
    return account, change.holdings_statement


async def _basis(
    ctx: CaseContext, account: str
) -> tuple[valuation_pb2.RiskPolicy, list[valuation_pb2.PriceQuote]]:
    """The policy in force and the quotes of the account's credit line: what it is judged on."""
    line = await credit_line(ctx, account)
    assert line is not None  # credited
    policy = await latest_policy(ctx)
    if policy.version != line.risk_policy_version:
        raise CaseSkipped("the exchange's policy changed while the case ran")
    return policy, list(line.prices)


# --- requests and consents ---------------------------------------------------------------


async def _request(
    ctx: CaseContext,
    account: str,
    releases: Sequence[tuple[str, str]],
    *,
    release_id: str | None = None,
    signer: SigningKey | None = None,
    exchange_id: str | None = None,
    audience: Sequence[str] | None = None,
    sequence: int | None = None,
    expired: bool = False,
) -> envelope_pb2.Envelope:
    """The client's signed request, addressed to the exchange and the kit's custodian."""
    exchange = ctx.server_party_id if exchange_id is None else exchange_id
    request = pledge_release_pb2.PledgeReleaseRequest(
        release_id=ctx.unique("kit-release-id") if release_id is None else release_id,
        account_id=account,
        exchange_id=exchange,
        releases=[
            pledge_release_pb2.ReleasedQuantity(
                asset_id=asset_id, quantity=common_pb2.Decimal(value=quantity)
            )
            for asset_id, quantity in releases
        ],
    )
    now = await ctx.server_now()
    issued = now - timedelta(hours=2) if expired else now
    return await ctx.sign(
        request,
        signer if signer is not None else client_key(ctx),
        audience=[ctx.server_party_id, ctx.counterpart.party_id] if audience is None else audience,
        sequence=sequence,
        issued_at=issued,
        expires_at=issued + timedelta(hours=1),
    )


async def _ask(
    ctx: CaseContext,
    envelope: envelope_pb2.Envelope | None,
    label: str,
    *,
    relay: PartyClients | None = None,
) -> Outcome:
    """RequestPledgeRelease, relayed by ``relay`` (default: the account's client)."""
    clients = relay if relay is not None else ctx.owner
    request = exchange_service_pb2.RequestPledgeReleaseRequest()
    if envelope is not None:
        request.pledge_release_request.CopyFrom(envelope)
    return await ctx.rpc(clients.exchange.request_pledge_release, request, label=label)


async def _consented(
    ctx: CaseContext,
    outcome: Outcome,
    request: envelope_pb2.Envelope,
    judged: envelope_pb2.Envelope,
) -> tuple[envelope_pb2.Envelope, PledgeReleaseConsentCheck]:
    """The consent (it must be given), recomputed from its inputs as the custodian would.

    It carries the request as sent, judges exactly ``judged`` (the account's
    latest proven statement), is addressed to the custodian and the client,
    and its figures and verdict are what its signed inputs give (§5.10).
    """
    kit = ctx.counterpart
    response: exchange_service_pb2.RequestPledgeReleaseResponse = expect_ok(outcome)
    consent = response.consent
    checked = sdk_check(
        "the consent, recomputed from its signed inputs by the account's custodian",
        recompute_pledge_release_consent,
        consent,
        ctx.registry,
        audience=kit.party_id,
        now=kit.now(),
    )
    sdk_check(
        "the consent, as the account's client verifies it",
        verify_statement,
        consent,
        ctx.registry,
        expected_type=pledge_release_pb2.PledgeReleaseConsent,
        audience=client_key(ctx).party_id,
        now=kit.now(),
    )
    check_equal("issuer of the consent", ctx.server_party_id, checked.consent.header.issuer)
    check_equal(
        "the request inside the consent",
        request.SerializeToString(),
        checked.consent.request.SerializeToString(),
    )
    cited = [e.SerializeToString() for e in checked.consent.inputs.holdings_statements]
    check(
        cited == [judged.SerializeToString()],
        "the consent must judge exactly the account's latest proven holdings statement (§5.10)",
        expected=f"that statement alone (epoch {_epoch(judged)})",
        got=", ".join(f"epoch {_epoch(e)}" for e in checked.consent.inputs.holdings_statements)
        or "none",
    )
    return consent, checked


def _epoch(envelope: envelope_pb2.Envelope) -> int:
    return attestation_pb2.HoldingsStatement.FromString(envelope.payload).epoch


def _positions(envelope: envelope_pb2.Envelope) -> list[common_pb2.Position]:
    return list(attestation_pb2.HoldingsStatement.FromString(envelope.payload).positions)


def _expect_conflict(outcome: Outcome, fields: Sequence[str]) -> None:
    """FAILED_PRECONDITION STATE_CONFLICT whose metadata ``field`` is one of ``fields``."""
    expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    info = outcome.error_info
    assert info is not None
    check(
        info.metadata.get("field") in fields,
        f"{outcome.rpc}: the refusal's ErrorInfo metadata 'field' names the rule (§5.10, §12.2)",
        expected=" or ".join(fields),
        got=info.metadata.get("field", "(absent)"),
    )


def _largest_release(
    policy: valuation_pb2.RiskPolicy,
    positions: Sequence[common_pb2.Position],
    quotes: Sequence[valuation_pb2.PriceQuote],
    exposure: Decimal,
    *,
    asset_id: str,
    pledged: Decimal,
    at: datetime,
) -> Decimal:
    """The largest quantity of ``asset_id`` (in quanta) the policy lets go, by bisection."""

    def allowed(units: int) -> bool:
        judged = judge_release(
            policy,
            positions,
            quotes,
            [(asset_id, Decimal(units) * _ONE)] if units else [],
            exposure,
            valued_at=at,
        )
        return judged.refusal is None

    low, high = 0, int(pledged / _ONE)
    if not allowed(low) or allowed(high):
        raise CaseSkipped("the exchange's policy leaves no edge to release up to")
    while high - low > 1:
        middle = (low + high) // 2
        if allowed(middle):
            low = middle
        else:
            high = middle
    return Decimal(low) * _ONE


# --- the cases ---------------------------------------------------------------------------


@REGISTRY.case(
    "exchange/pledge-release/consented-at-policy-edge",
    Level.MUST,
    "with an exposure set, the largest release after which the credit limit still covers "
    "the exposure and the ratio is at maintenance is consented, with figures recomputable "
    "from the consent's signed inputs and the account's exposure stated; one quantum more is "
    "refused with STATE_CONFLICT (§5.10)",
    roles=_EXCHANGE,
    clauses=("§5.10/consent-within-policy", "§5.10/consent-figures-stated"),
)
async def consented_at_policy_edge(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, statement = await _open(ctx, kit)
    policy, quotes = await _basis(ctx, account)
    now = await ctx.server_now()
    positions = _positions(statement)
    full = judge_release(policy, positions, quotes, [], Decimal(0), valued_at=now)
    if full.collateral_value_after <= 0:
        raise CaseSkipped("the exchange's policy gives USDC no collateral value")
    leverage = parse_amount(policy.leverage_cap.value)
    maintenance = parse_amount(policy.maintenance_ratio.value)
    # Exposure that needs about 60% of the collateral: both limits bind somewhere below it.
    needed = max(1 / leverage, maintenance)
    exposure = (full.collateral_value_after * Decimal("0.6") / needed).quantize(Decimal("0.01"))
    await set_exposure(ctx, account, exposure)
    now = await ctx.server_now()
    edge = _largest_release(
        policy, positions, quotes, exposure, asset_id="USDC", pledged=parse_amount(_PLEDGED), at=now
    )

    request = await _request(ctx, account, [("USDC", format_amount(edge))])
    _, checked = await _consented(
        ctx,
        await _ask(ctx, request, f"RequestPledgeRelease of {format_amount(edge)} USDC (the edge)"),
        request,
        statement,
    )
    check_equal(
        "the exposure the consent states (the account's, set by the kit)",
        format_amount(exposure),
        format_amount(checked.judgement.exposure),
    )
    beyond = format_amount(edge + _ONE)
    _expect_conflict(
        await _ask(
            ctx,
            await _request(ctx, account, [("USDC", beyond)]),
            f"RequestPledgeRelease of {beyond} USDC (one quantum past the edge)",
        ),
        ["credit_limit_after", "collateral_ratio_after"],
    )


@REGISTRY.case(
    "exchange/pledge-release/within-pledge",
    Level.MUST,
    "with no exposure, exactly the pledged quantity (not the holding) is consented, and one "
    "quantum more refused with STATE_CONFLICT naming that release, also as the second asset "
    "of a request (§5.10)",
    roles=_EXCHANGE,
    clauses=("§5.10/consent-within-pledge",),
)
async def within_pledge(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    held = {"BTC": "3.000000000000000007", "USDC": _HELD}
    pledged = {"BTC": "2.718281828459045235", "USDC": _PLEDGED}
    account, statement = await _open(ctx, kit, held=held, pledged=pledged)
    request = await _request(ctx, account, [("BTC", pledged["BTC"]), ("USDC", _PLEDGED)])
    _, checked = await _consented(
        ctx,
        await _ask(ctx, request, "RequestPledgeRelease of the whole pledge"),
        request,
        statement,
    )
    check_equal(
        "collateral value after releasing the whole pledge",
        "0",
        format_amount(checked.judgement.collateral_value_after),
    )
    beyond = format_amount(parse_amount(_PLEDGED) + _ONE)
    outcome = await _ask(
        ctx,
        await _request(ctx, account, [("BTC", "0.5"), ("USDC", beyond)]),
        f"RequestPledgeRelease of {beyond} USDC, one quantum more than pledged",
    )
    _expect_conflict(outcome, [f"{_FIELD}.releases[1].quantity"])
    info = outcome.error_info
    assert info is not None
    check_equal(
        "the refusal's expected (the pledged quantity)", _PLEDGED, info.metadata["expected"]
    )
    _expect_conflict(
        await _ask(
            ctx,
            await _request(ctx, account, [("BENJI", "1")]),
            "RequestPledgeRelease of an asset the account has not pledged",
        ),
        [f"{_FIELD}.releases[0].quantity"],
    )


@REGISTRY.case(
    "exchange/pledge-release/judged-on-latest-holdings",
    Level.MUST,
    "a release that only an unproven top-up covers is refused (the credited statement is "
    "judged); after the top-up is proven, the same release is consented and the consent "
    "cites the new statement alone (§5.10)",
    roles=_EXCHANGE,
    clauses=("§5.10/consent-on-latest-holdings",),
)
async def judged_on_latest_holdings(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, _ = await _open(ctx, kit)
    more = "150000.000000000429"
    top_up = {"USDC": "170000"}
    quantity = format_amount(parse_amount(_PLEDGED) + Decimal("0.5"))
    # A top-up the exchange receives but cannot prove (no leaf holds it): not judged on.
    await ctx.server_now()
    unproven, _ = kit.holdings_change(
        account,
        client_key(ctx),
        top_up,
        epoch=2,
        reason=_H.HOLDINGS_CHANGE_REASON_TOP_UP,
        pledged={"USDC": more},
        attest=False,
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=unproven))
    await open_account(ctx, kit)  # a later statement credited: the exchange has read past it
    _expect_conflict(
        await _ask(
            ctx,
            await _request(ctx, account, [("USDC", quantity)]),
            f"RequestPledgeRelease of {quantity} USDC, which only an unproven top-up covers",
        ),
        [f"{_FIELD}.releases[0].quantity"],
    )
    # The same top-up attested: once proven, the release it covers is consented on it.
    _, latest = await _open(ctx, kit, account=account, epoch=3, held=top_up, pledged={"USDC": more})
    request = await _request(ctx, account, [("USDC", quantity)])
    await _consented(
        ctx,
        await _ask(ctx, request, f"RequestPledgeRelease of {quantity} USDC after the top-up"),
        request,
        latest,
    )


@REGISTRY.case(
    "exchange/pledge-release/only-the-account-client",
    Level.MUST,
    "a request signed by another client, for another exchange or by another role's key is "
    "refused with PERMISSION_DENIED KEY_ROLE_MISMATCH, and another client's request for an "
    "account that does not exist, or the client's for an account pledged to another "
    "exchange, gets the same refusal; a stranger relaying the client's "
    "request is refused; the client's request relayed by another registered party is "
    "consented (§4.5, §5.10)",
    roles=_EXCHANGE,
    clauses=("§5.10/consent-by-account-client", "§5.10/consent-request-verified"),
)
async def only_the_account_client(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, statement = await _open(ctx, kit)
    own = client_key(ctx).party_id
    others = [
        k for k in ctx.config.kit_keys if k.role == _ROLE.PARTY_ROLE_CLIENT and k.party_id != own
    ]
    if not others:
        raise CaseSkipped("needs a --kit-key of a second client")
    other = others[0]
    small = [("USDC", "1.000000000000000003")]
    issuer = f"{_FIELD}.header.issuer"

    theirs = await _ask(
        ctx,
        await _request(ctx, account, small, signer=other),
        f"RequestPledgeRelease signed by another client {other.party_id!r}",
    )
    expect_status(
        theirs, _C.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH, metadata_field=issuer
    )
    missing = await _ask(
        ctx,
        await _request(ctx, ctx.unique("kit-no-such-account"), small, signer=other),
        "RequestPledgeRelease by another client, for an account that does not exist",
    )
    expect_status(
        missing, _C.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH, metadata_field=issuer
    )
    others_exchange = [
        k.party_id
        for k in ctx.config.kit_keys
        if k.role == _ROLE.PARTY_ROLE_EXCHANGE and k.party_id != ctx.server_party_id
    ]
    # Another exchange named: a registered one, and names sorting below and above this one.
    for elsewhere in [*others_exchange[:1], "0-kit-another-exchange", "~-kit-another-exchange"]:
        expect_status(
            await _ask(
                ctx,
                await _request(ctx, account, small, exchange_id=elsewhere),
                f"RequestPledgeRelease naming exchange {elsewhere!r}",
            ),
            _C.PERMISSION_DENIED,
            _R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata_field=f"{_FIELD}.exchange_id",
        )
    expect_status(
        await _ask(
            ctx,
            await _request(ctx, account, small, signer=ctx.key(_ROLE.PARTY_ROLE_CUSTODIAN)),
            "RequestPledgeRelease signed with the custodian's key",
        ),
        _C.PERMISSION_DENIED,
        _R.ERROR_REASON_KEY_ROLE_MISMATCH,
    )
    # Accounts the kit's custodian attests as pledged to another exchange, its id sorting
    # below and above any usual party id: not this exchange's accounts.
    for pledged_to in ("0-kit-other-exchange", "~-kit-other-exchange"):
        await ctx.server_now()
        away = ctx.unique("kit-release-elsewhere")
        change, _ = kit.holdings_change(
            away,
            client_key(ctx),
            {"USDC": _HELD},
            epoch=1,
            pledged={"USDC": _PLEDGED},
            pledged_to=pledged_to,
        )
        kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
        await open_account(ctx, kit)  # a later statement credited: the exchange has read past it
        expect_status(
            await _ask(
                ctx,
                await _request(ctx, away, small),
                f"RequestPledgeRelease by the client of an account pledged to {pledged_to!r}",
            ),
            _C.PERMISSION_DENIED,
            _R.ERROR_REASON_KEY_ROLE_MISMATCH,
            metadata_field=issuer,
        )
    stranger = ctx.as_stranger()
    expect_access_denied(
        await _ask(
            ctx,
            await _request(ctx, account, small),
            "RequestPledgeRelease relayed by a stranger",
            relay=stranger,
        ),
        field="caller",
        caller=stranger.party_id,
    )
    relay = ctx.as_party(other.party_id)
    request = await _request(ctx, account, small)
    await _consented(
        ctx,
        await _ask(
            ctx, request, "the client's RequestPledgeRelease relayed by another client", relay=relay
        ),
        request,
        statement,
    )


@REGISTRY.case(
    "exchange/pledge-release/none-while-call-open",
    Level.MUST,
    "while a margin call of the account is ISSUED, and once it is DISPUTED, a release the "
    "policy would allow is refused with STATE_CONFLICT; once the call is withdrawn, the same "
    "release is consented (§5.10)",
    roles=_EXCHANGE,
    clauses=("§5.10/consent-nothing-open",),
)
async def none_while_call_open(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, statement = await _open(ctx, kit)
    policy, quotes = await _basis(ctx, account)
    positions = _positions(statement)
    now = await ctx.server_now()
    full = judge_release(policy, positions, quotes, [], Decimal(0), valued_at=now)
    value = full.collateral_value_after
    maintenance = parse_amount(policy.maintenance_ratio.value)
    liquidation = parse_amount(policy.liquidation_ratio.value)
    if value <= 0 or maintenance <= liquidation:
        raise CaseSkipped(
            "the exchange's policy leaves no room between maintenance and liquidation"
        )
    # Between the liquidation line and maintenance: a call, and no liquidation.
    await set_exposure(
        ctx, account, (value * 2 / (maintenance + liquidation)).quantize(Decimal("0.01"))
    )
    call = await _open_call(ctx, account)
    small = [("USDC", "0.000000000000000011")]
    _expect_conflict(
        await _ask(ctx, await _request(ctx, account, small), "RequestPledgeRelease, call ISSUED"),
        ["margin_call"],
    )
    dispute = kit.sign(
        margin_pb2.MarginCallResponse(
            margin_call_id=call,
            kind=margin_pb2.MARGIN_CALL_RESPONSE_KIND_DISPUTE,
            agreed_amount=common_pb2.Decimal(value="0"),
            dispute_reason=margin_pb2.DISPUTE_REASON_VALUATION,
            dispute_detail="sent by the collateral-sync conformance kit",
        )
    )
    kit.announce(position_sync_pb2.PositionUpdate(margin_call_response=dispute))
    await _until_status(ctx, call, _MS.MARGIN_CALL_STATUS_DISPUTED)
    _expect_conflict(
        await _ask(ctx, await _request(ctx, account, small), "RequestPledgeRelease, call DISPUTED"),
        ["margin_call"],
    )
    # Exposure low enough that the release is well within the policy: the call is withdrawn.
    await set_exposure(ctx, account, (value / 10).quantize(Decimal("0.01")))
    await _until_status(ctx, call, _MS.MARGIN_CALL_STATUS_WITHDRAWN)
    request = await _request(ctx, account, small)
    await _consented(
        ctx,
        await _ask(ctx, request, "RequestPledgeRelease once the call is withdrawn"),
        request,
        statement,
    )


async def _open_call(ctx: CaseContext, account: str) -> str:
    """The id of the account's open margin call, once the exchange lists one."""
    found: list[str] = []

    async def listed() -> bool:
        outcome = await ctx.rpc(
            ctx.exchange.list_margin_calls,
            exchange_service_pb2.ListMarginCallsRequest(account_id=account),
        )
        response: exchange_service_pb2.ListMarginCallsResponse = expect_ok(outcome)
        for envelope in response.margin_call_states:
            state = margin_pb2.MarginCallState.FromString(envelope.payload)
            if state.status == _MS.MARGIN_CALL_STATUS_ISSUED:
                found[:] = [state.margin_call_id]
                return True
        return False

    await poll(ctx, listed, f"the exchange issues a margin call for {account!r}")
    return found[0]


async def _until_status(
    ctx: CaseContext, call_id: str, status: margin_pb2.MarginCallStatus.ValueType
) -> None:
    seen: list[str] = []

    async def reached() -> bool:
        outcome = await ctx.rpc(
            ctx.exchange.get_margin_call,
            exchange_service_pb2.GetMarginCallRequest(margin_call_id=call_id),
        )
        response: exchange_service_pb2.GetMarginCallResponse = expect_ok(outcome)
        state = margin_pb2.MarginCallState.FromString(response.margin_call_state.payload)
        seen[:] = [_MS.Name(state.status)]
        return state.status == status

    try:
        await poll(ctx, reached, f"margin call {call_id} reaches {_MS.Name(status)}")
    except CaseFailure as failure:
        raise CaseFailure(
            failure.message,
            expected=_MS.Name(status),
            got=seen[0] if seen else "no state",
        ) from None


@REGISTRY.case(
    "exchange/pledge-release/repeat-answered-reused-id-refused",
    Level.MUST,
    "the same request again is answered with the recorded consent, byte for byte; other "
    "requests under its release id, their bytes sorting below and above it, are refused "
    "with STATE_CONFLICT, and one with a sequence "
    "below the consented request's with REPLAYED (§5.10, §12.4)",
    roles=_EXCHANGE,
    clauses=("§5.10/consent-repeat-answered",),
)
async def repeat_answered(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, statement = await _open(ctx, kit)
    release_id = ctx.unique("kit-release-id")
    request = await _request(
        ctx, account, [("USDC", "7.000000000000000013")], release_id=release_id
    )
    first, _ = await _consented(
        ctx, await _ask(ctx, request, "RequestPledgeRelease"), request, statement
    )
    again = expect_ok(await _ask(ctx, request, "the same RequestPledgeRelease again"))
    check_equal(
        "the consent to the same request, asked again (the recorded one)",
        first.SerializeToString(),
        again.consent.SerializeToString(),
    )
    sequence = pledge_release_pb2.PledgeReleaseRequest.FromString(request.payload).header.sequence
    # Other payloads under the id, one sorting below the consented one's bytes and one above:
    # only "different" may decide, not an order.
    sides: dict[str, envelope_pb2.Envelope] = {}
    for offset in range(1, 64):
        candidate = await _request(
            ctx, account, [("USDC", "8")], release_id=release_id, sequence=sequence + offset
        )
        side = "below" if candidate.payload < request.payload else "above"
        sides.setdefault(side, candidate)
        lower = await _request(
            ctx,
            account,
            [("USDC", "8")],
            release_id=release_id,
            sequence=max(1, sequence - offset),
        )
        sides.setdefault("below" if lower.payload < request.payload else "above", lower)
        if len(sides) == 2:
            break
    for side, reuse in sorted(sides.items()):
        _expect_conflict(
            await _ask(
                ctx,
                reuse,
                f"another RequestPledgeRelease under the consented release id (bytes {side})",
            ),
            [f"{_FIELD}.release_id"],
        )
    expect_status(
        await _ask(
            ctx,
            await _request(ctx, account, [("USDC", "8")], sequence=sequence - 1),
            "RequestPledgeRelease with a sequence below the consented request's",
        ),
        _C.ALREADY_EXISTS,
        _R.ERROR_REASON_REPLAYED,
    )


@REGISTRY.case(
    "exchange/pledge-release/malformed-refused",
    Level.MUST,
    "a request without its envelope, release id, account or releases, with an asset twice, "
    "a quantity of 0 or not canonical, addressed only to the custodian, or expired is refused "
    "with the error §5.10 names, and records nothing: its release id is consented afterwards "
    "(§5.10)",
    roles=_EXCHANGE,
    clauses=("§5.10/consent-request-verified",),
)
async def malformed_refused(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    account, statement = await _open(ctx, kit)
    release_id = ctx.unique("kit-release-id")
    one = [("USDC", "1.5")]
    expect_status(
        await _ask(ctx, None, "RequestPledgeRelease without a request"),
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
    )
    attempts: list[tuple[str, envelope_pb2.Envelope, int, str]] = [
        (
            "without a release id",
            await _request(ctx, account, one, release_id=""),
            _R.ERROR_REASON_MALFORMED,
            f"{_FIELD}.release_id",
        ),
        (
            "without an account",
            await _request(ctx, "", one, release_id=release_id),
            _R.ERROR_REASON_MALFORMED,
            f"{_FIELD}.account_id",
        ),
        (
            "without releases",
            await _request(ctx, account, [], release_id=release_id),
            _R.ERROR_REASON_MALFORMED,
            f"{_FIELD}.releases",
        ),
        (
            "with USDC twice",
            await _request(ctx, account, [*one, ("USDC", "2")], release_id=release_id),
            _R.ERROR_REASON_MALFORMED,
            f"{_FIELD}.releases[1].asset_id",
        ),
        (
            "of 0",
            await _request(ctx, account, [("USDC", "0")], release_id=release_id),
            _R.ERROR_REASON_INVALID_AMOUNT,
            f"{_FIELD}.releases[0].quantity",
        ),
        (
            "of 1.50 (not canonical)",
            await _request(ctx, account, [("USDC", "1.50")], release_id=release_id),
            _R.ERROR_REASON_INVALID_AMOUNT,
            f"{_FIELD}.releases[0].quantity",
        ),
    ]
    for what, envelope, reason, field in attempts:
        expect_status(
            await _ask(ctx, envelope, f"RequestPledgeRelease {what}"),
            _C.INVALID_ARGUMENT,
            reason,
            metadata_field=field,
        )
    expect_status(
        await _ask(
            ctx,
            await _request(ctx, account, one, release_id=release_id, audience=[kit.party_id]),
            "RequestPledgeRelease addressed only to the custodian",
        ),
        _C.PERMISSION_DENIED,
        _R.ERROR_REASON_AUDIENCE_MISMATCH,
    )
    expect_status(
        await _ask(
            ctx,
            await _request(ctx, account, one, release_id=release_id, expired=True),
            "RequestPledgeRelease that expired an hour ago",
        ),
        _C.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATEMENT_EXPIRED,
    )
    request = await _request(ctx, account, one, release_id=release_id)
    await _consented(
        ctx,
        await _ask(ctx, request, "RequestPledgeRelease under the id the refused ones used"),
        request,
        statement,
    )
