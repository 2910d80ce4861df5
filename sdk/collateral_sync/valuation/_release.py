"""A pledge release judged by the exchange, and its consent recomputed by anyone (§5.9, §5.10).

:func:`judge_release` is the exchange's rule: the figures of §7.3 with each
released quantity taken out of the asset's pledge, and whether the account
stays within the policy after it. :func:`recompute_pledge_release_consent`
runs the same function on the signed inputs a ``PledgeReleaseConsent``
carries, so a custodian, a client or an auditor confirms the figures and that
the exchange consented only within its policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from collateral_sync.amounts import format_amount
from collateral_sync.keys import KeyRegistry
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    pledge_release_pb2,
    valuation_pb2,
)
from collateral_sync.valuation._arith import (
    _EXACT,
    _R,
    _amount,
    _checked_input,
    _datetime_ns,
    _malformed,
    _round_down,
    _timestamp_ns,
)
from collateral_sync.valuation._collateral import (
    AssetClass,
    CollateralValuation,
    _ratio,
    _value,
)
from collateral_sync.valuation._policy import _parse_policy, _Policy
from collateral_sync.valuation._recompute import _compare, _refuted, _stated, _verify_inputs

__all__ = [
    "PledgeReleaseConsentCheck",
    "ReleaseJudgement",
    "ReleaseRefusal",
    "judge_release",
    "recompute_pledge_release_consent",
    "released_quantities",
]


def released_quantities(
    request: pledge_release_pb2.PledgeReleaseRequest, *, field: str = "request"
) -> list[tuple[str, Decimal]]:
    """The request's releases, in order, once its fields are checked (§5.9 step 2).

    ``release_id``, ``account_id`` and at least one release are required, each
    asset id non-empty and at most once (MALFORMED); each quantity is present
    (MALFORMED), canonical (INVALID_AMOUNT) and > 0 (INVALID_AMOUNT). ``field``
    prefixes the field named in the error.
    """
    for name, what in (("release_id", "a release id"), ("account_id", "an account id")):
        if not getattr(request, name):
            raise _malformed(f"{field}.{name}", what, "''")
    if not request.releases:
        raise _malformed(f"{field}.releases", "at least one asset and quantity", "none")
    releases: list[tuple[str, Decimal]] = []
    seen: set[str] = set()
    for index, item in enumerate(request.releases):
        path = f"{field}.releases[{index}]"
        if not item.asset_id:
            raise _malformed(f"{path}.asset_id", "an asset id", "''")
        if item.asset_id in seen:
            raise _malformed(f"{path}.asset_id", "each asset at most once", item.asset_id)
        seen.add(item.asset_id)
        quantity = _amount(item, "quantity", f"{path}.quantity", "")
        if quantity <= 0:
            raise _malformed(
                f"{path}.quantity",
                "> 0",
                format_amount(quantity),
                reason=_R.ERROR_REASON_INVALID_AMOUNT,
            )
        releases.append((item.asset_id, quantity))
    return releases


@dataclass(frozen=True, slots=True)
class ReleaseRefusal:
    """Why an exchange must not consent: the first rule of §5.10 the release breaks."""

    message: str
    field: str
    expected: str
    actual: str


@dataclass(frozen=True, slots=True)
class ReleaseJudgement:
    """The account's figures after a release, and whether the policy allows it."""

    #: The positions with each released quantity taken out of its pledge.
    positions: tuple[common_pb2.Position, ...]
    valuation: CollateralValuation
    collateral_value_after: Decimal
    credit_limit_after: Decimal
    exposure: Decimal
    #: None when the exposure is 0.
    collateral_ratio_after: Decimal | None
    #: None when the release is within the pledge and the policy.
    refusal: ReleaseRefusal | None


def judge_release(
    policy: valuation_pb2.RiskPolicy,
    positions: Sequence[common_pb2.Position],
    prices: Sequence[valuation_pb2.PriceQuote],
    releases: Sequence[tuple[str, Decimal]],
    exposure: Decimal,
    *,
    valued_at: datetime,
    asset_classes: Mapping[str, AssetClass] | None = None,
) -> ReleaseJudgement:
    """Value ``positions`` after ``releases`` at ``valued_at`` and judge them (§5.10).

    Refused, in this order: a quantity above the asset's pledged quantity
    (field ``releases[i].quantity``); a credit limit after the release below
    the exposure (``credit_limit_after``); with exposure > 0, a collateral
    ratio after it below the maintenance ratio (``collateral_ratio_after``).
    """
    return _judge(
        _parse_policy(policy),
        positions,
        prices,
        releases,
        _checked_input(exposure, "exposure"),
        asset_classes=asset_classes or {},
        valued_at_ns=_datetime_ns(valued_at),
    )


def _judge(
    policy: _Policy,
    positions: Sequence[common_pb2.Position],
    prices: Sequence[valuation_pb2.PriceQuote],
    releases: Sequence[tuple[str, Decimal]],
    exposure: Decimal,
    *,
    asset_classes: Mapping[str, AssetClass],
    valued_at_ns: int,
) -> ReleaseJudgement:
    after, refusal = _after(positions, releases)
    valuation = _value(policy, after, prices, asset_classes, valued_at_ns)
    value = valuation.collateral_value
    limit = _round_down(_EXACT.multiply(value, policy.leverage_cap), policy.rounding_scale)
    ratio = _ratio(policy, value, exposure)
    if refusal is None and limit < exposure:
        refusal = ReleaseRefusal(
            f"after the release the credit limit {format_amount(limit)} is below the "
            f"exposure {format_amount(exposure)}",
            "credit_limit_after",
            f">= {format_amount(exposure)}",
            format_amount(limit),
        )
    if refusal is None and ratio is not None and ratio < policy.maintenance_ratio:
        refusal = ReleaseRefusal(
            f"after the release the collateral ratio {format_amount(ratio)} is below the "
            f"maintenance ratio {format_amount(policy.maintenance_ratio)}",
            "collateral_ratio_after",
            f">= {format_amount(policy.maintenance_ratio)}",
            format_amount(ratio),
        )
    return ReleaseJudgement(
        positions=tuple(after),
        valuation=valuation,
        collateral_value_after=value,
        credit_limit_after=limit,
        exposure=exposure,
        collateral_ratio_after=ratio,
        refusal=refusal,
    )


def _after(
    positions: Sequence[common_pb2.Position], releases: Sequence[tuple[str, Decimal]]
) -> tuple[list[common_pb2.Position], ReleaseRefusal | None]:
    """The positions with each release taken out of its pledge; the first release beyond it."""
    taken = dict(releases)
    after: list[common_pb2.Position] = []
    pledged_of: dict[str, Decimal] = {}
    for index, position in enumerate(positions):
        pledged = _amount(
            position, "pledged_quantity", f"positions[{index}].pledged_quantity", "holdings"
        )
        pledged_of[position.asset_id] = pledged
        copy = common_pb2.Position()
        copy.CopyFrom(position)
        if position.asset_id in taken:
            left = _EXACT.subtract(pledged, taken[position.asset_id])
            copy.pledged_quantity.value = format_amount(max(left, Decimal(0)))
        after.append(copy)
    for index, (asset_id, quantity) in enumerate(releases):
        pledged = pledged_of.get(asset_id, Decimal(0))
        if quantity > pledged:
            return after, ReleaseRefusal(
                f"the release of {format_amount(quantity)} {asset_id} exceeds the "
                f"{format_amount(pledged)} pledged",
                f"releases[{index}].quantity",
                format_amount(pledged),
                format_amount(quantity),
            )
    return after, None


@dataclass(frozen=True, slots=True)
class PledgeReleaseConsentCheck:
    """A consent confirmed from its signed inputs, with the recomputed figures."""

    consent: pledge_release_pb2.PledgeReleaseConsent
    request: pledge_release_pb2.PledgeReleaseRequest
    #: The client who signed the request.
    client_id: str
    releases: tuple[tuple[str, Decimal], ...]
    risk_policy: valuation_pb2.RiskPolicy
    #: The holdings statement judged (the latest epoch among the inputs).
    holdings: attestation_pb2.HoldingsStatement
    judgement: ReleaseJudgement


def recompute_pledge_release_consent(
    envelope: envelope_pb2.Envelope,
    registry: KeyRegistry,
    *,
    audience: str,
    asset_classes: Mapping[str, AssetClass] | None = None,
    now: datetime,
) -> PledgeReleaseConsentCheck:
    """Verify a signed PledgeReleaseConsent and recompute it from its signed inputs (§5.10).

    The consent must be addressed to ``audience`` and fresh at ``now``; the
    client's request inside it is verified as evidence at the consent's
    issued_at, addressed to the consent's issuer, and must name that issuer as
    its ``exchange_id``; the inputs are verified as for a margin call
    (:func:`~collateral_sync.valuation.recompute_margin_call`), for the
    request's account. The latest holdings statement among them is judged with
    :func:`judge_release` at the consent's issued_at, on its stated exposure:
    ``collateral_value_after`` and ``credit_limit_after`` must equal the
    recomputed figures, and the release must be within the pledge and the
    policy. Anything else raises VerificationError (PROOF_INVALID, metadata
    field/expected/actual), MalformedError for missing or invalid fields, or
    what :func:`~collateral_sync.signing.verify_statement` raises.
    """
    consent = verify_statement(
        envelope,
        registry,
        expected_type=pledge_release_pb2.PledgeReleaseConsent,
        audience=audience,
        now=now,
    ).message
    what = "pledge release consent"
    if not consent.HasField("request"):
        raise _malformed("request", "the client's signed PledgeReleaseRequest", "absent", what)
    issuer = consent.header.issuer
    request = verify_statement(
        consent.request,
        registry,
        expected_type=pledge_release_pb2.PledgeReleaseRequest,
        audience=issuer,
        now=consent.header.issued_at.ToDatetime(tzinfo=UTC),
    )
    asked = request.message
    releases = released_quantities(asked)
    if asked.exchange_id != issuer:
        raise _refuted(
            "request.exchange_id",
            issuer,
            asked.exchange_id,
            "the request asks another exchange than the one that consented",
        )
    inputs = _verify_inputs(
        consent.inputs,
        registry,
        header=consent.header,
        account_id=asked.account_id,
        risk_policy_version=consent.risk_policy_version,
        audience=audience,
        what=what,
    )
    exposure = _stated(consent, "exposure", what)
    stated_value = _stated(consent, "collateral_value_after", what)
    stated_limit = _stated(consent, "credit_limit_after", what)
    judgement = _judge(
        inputs.parsed,
        inputs.holdings.positions,
        inputs.snapshot.prices,
        releases,
        exposure,
        asset_classes=asset_classes or {},
        valued_at_ns=_timestamp_ns(consent.header.issued_at),
    )
    _compare("collateral_value_after", judgement.collateral_value_after, stated_value)
    _compare("credit_limit_after", judgement.credit_limit_after, stated_limit)
    refusal = judgement.refusal
    if refusal is not None:
        # A release's quantity is the request's, inside the consent.
        field = (
            f"request.{refusal.field}" if refusal.field.startswith("releases[") else refusal.field
        )
        raise _refuted(
            field,
            refusal.expected,
            refusal.actual,
            f"the exchange consented outside its policy ({refusal.message})",
        )
    return PledgeReleaseConsentCheck(
        consent=consent,
        request=asked,
        client_id=request.issuer,
        releases=tuple(releases),
        risk_policy=inputs.policy,
        holdings=inputs.holdings,
        judgement=judgement,
    )
