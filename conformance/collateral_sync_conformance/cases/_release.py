"""The kit's pledged account and the release consents it signs as client and exchange (§5.9).

A consent is what a correct exchange would sign: the client's request inside
it, judged on the account's latest holdings statement (or one named), with the
kit's own policy and prices and the figures after the release computed by the
SDK (:func:`collateral_sync.valuation.judge_release`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from collateral_sync.amounts import amount_to_proto, format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError
from collateral_sync.keys import SigningKey
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    pledge_release_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import judge_release

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import CaseFailure, check, expect_ok
from collateral_sync_conformance.cases._exchange_side import kit_risk_policy, price_snapshot
from collateral_sync_conformance.cases._kit_account import (
    PledgePlan,
    client_key,
    ensure_pledged,
    exchange_party,
    holdings,
    liquidation_path,
    pledge_instruction,
)

__all__ = [
    "ConsentHeader",
    "PledgedAccount",
    "consent_header",
    "pledge_back",
    "pledged_account",
    "release_consent",
]

_ROLE = common_pb2.PartyRole


@dataclass(frozen=True, slots=True)
class ConsentHeader:
    """What a consent's header says besides issuer and audience."""

    sequence: int
    issued_at: datetime
    expires_at: datetime
    statement_id: str


def consent_header(envelope: envelope_pb2.Envelope) -> ConsentHeader:
    header = pledge_release_pb2.PledgeReleaseConsent.FromString(envelope.payload).header
    return ConsentHeader(
        sequence=header.sequence,
        issued_at=header.issued_at.ToDatetime(tzinfo=UTC),
        expires_at=header.expires_at.ToDatetime(tzinfo=UTC),
        statement_id=header.statement_id,
    )


@dataclass(frozen=True, slots=True)
class PledgedAccount:
    """The kit's pledged account as it stands: its latest statement and its pledged assets."""

    account_id: str
    statement: attestation_pb2.HoldingsStatement
    envelope: envelope_pb2.Envelope
    #: Pledged quantity by asset, for the assets with a pledge > 0.
    pledged: dict[str, Decimal]


async def pledged_account(ctx: CaseContext) -> PledgedAccount:
    account_id = await ensure_pledged(ctx)
    statement, envelope, _ = await holdings(ctx, account_id)
    pledged = {
        p.asset_id: parse_amount(p.pledged_quantity.value or "0")
        for p in statement.positions
        if parse_amount(p.pledged_quantity.value or "0") > 0
    }
    check(
        bool(pledged),
        f"account {account_id!r} was pledged, yet its holdings statement shows no pledge",
        expected="a position with pledged_quantity > 0",
        got="none",
    )
    return PledgedAccount(account_id, statement, envelope, pledged)


async def release_consent(
    ctx: CaseContext,
    account: PledgedAccount,
    releases: Sequence[tuple[str, str]],
    *,
    release_id: str | None = None,
    judged: envelope_pb2.Envelope | None = None,
    client: SigningKey | None = None,
    exchange: SigningKey | None = None,
    request_exchange_id: str | None = None,
    also_judged: Sequence[envelope_pb2.Envelope] = (),
    cited: Sequence[envelope_pb2.Envelope] | None = None,
    header: ConsentHeader | None = None,
) -> envelope_pb2.Envelope:
    """The client's request for ``releases`` (asset, quantity text) and the exchange's consent.

    Judged on the account's latest statement unless ``judged`` (and on
    ``also_judged`` besides), or citing exactly ``cited`` (figures as judged); signed by the account's client and the kit's
    exchange unless ``client`` or ``exchange``; the consent's header is fresh
    unless ``header`` fixes its sequence, times and statement id.
    """
    exchange_key = exchange if exchange is not None else ctx.key(_ROLE.PARTY_ROLE_EXCHANGE)
    exchange_id = exchange_party(ctx) if request_exchange_id is None else request_exchange_id
    request = pledge_release_pb2.PledgeReleaseRequest(
        release_id=release_id or ctx.unique("conformance-release"),
        account_id=account.account_id,
        exchange_id=exchange_id,
        releases=[
            pledge_release_pb2.ReleasedQuantity(
                asset_id=asset_id, quantity=common_pb2.Decimal(value=quantity)
            )
            for asset_id, quantity in releases
        ],
    )
    request_envelope = await ctx.sign(
        request,
        client if client is not None else client_key(ctx),
        audience=[exchange_id, ctx.server_party_id],
    )
    now = await ctx.server_now()
    statement_envelope = account.envelope if judged is None else judged
    statement = attestation_pb2.HoldingsStatement.FromString(statement_envelope.payload)
    assets = sorted(p.asset_id for p in statement.positions)
    policy = kit_risk_policy(ctx, now, dict.fromkeys(assets, "1"))
    snapshot = await price_snapshot(ctx, dict.fromkeys(assets, "1"), now)
    try:
        after = judge_release(
            policy,
            statement.positions,
            valuation_pb2.PriceSnapshot.FromString(snapshot.payload).prices,
            _well_formed(releases),
            Decimal(0),
            valued_at=now,
        )
    except CollateralSyncError as err:
        raise CaseFailure(
            f"the account's holdings statement (epoch {statement.epoch}) cannot be valued: "
            f"{err.message}",
            expected="non-negative, canonical quantities (§5.8, §7.2)",
            got=err.metadata.get("actual", ""),
        ) from err
    consent = pledge_release_pb2.PledgeReleaseConsent(
        request=request_envelope,
        inputs=valuation_pb2.ValuationInputs(
            risk_policy=await ctx.sign(policy, exchange_key, audience=["*"], issued_at=now),
            holdings_statements=(
                [statement_envelope, *also_judged] if cited is None else list(cited)
            ),
            price_snapshot=snapshot,
        ),
        risk_policy_version=policy.version,
        exposure=amount_to_proto("0"),
        collateral_value_after=amount_to_proto(format_amount(after.collateral_value_after)),
        credit_limit_after=amount_to_proto(format_amount(after.credit_limit_after)),
    )
    if header is None:
        return await ctx.sign(
            consent,
            exchange_key,
            audience=[ctx.server_party_id, client_key(ctx).party_id],
            issued_at=now,
        )
    return await ctx.sign(
        consent,
        exchange_key,
        audience=[ctx.server_party_id, client_key(ctx).party_id],
        sequence=header.sequence,
        issued_at=header.issued_at,
        expires_at=header.expires_at,
        statement_id=header.statement_id,
    )


async def pledge_back(ctx: CaseContext, account_id: str, asset_id: str, quantity: Decimal) -> None:
    """Pledge ``quantity`` of ``asset_id`` again: what was released is pledgeable anew."""
    plan = PledgePlan(
        client=client_key(ctx),
        account_id=account_id,
        exchange_id=exchange_party(ctx),
        asset_id=asset_id,
        quantity=format_amount(quantity),
        free=quantity,
        pledged=Decimal(0),
    )
    expect_ok(
        await ctx.rpc(
            ctx.custodian.pledge_collateral,
            custodian_service_pb2.PledgeCollateralRequest(
                pledge_instruction=await ctx.sign(pledge_instruction(plan), plan.client),
                liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
            ),
            label=f"PledgeCollateral of the {format_amount(quantity)} {asset_id} just released",
        )
    )


def _well_formed(releases: Sequence[tuple[str, str]]) -> list[tuple[str, Decimal]]:
    """The releases whose quantity is canonical and > 0: a malformed one, sent on purpose,
    is left out of the figures."""
    kept: list[tuple[str, Decimal]] = []
    for asset_id, quantity in releases:
        try:
            amount = parse_amount(quantity)
        except CollateralSyncError:
            continue
        if amount > 0:
            kept.append((asset_id, amount))
    return kept
