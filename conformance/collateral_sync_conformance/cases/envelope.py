"""Signed-statement cases (docs/PROTOCOL.md §3.6): every stage refuses what it must.

Each case sends a statement that is correct except for one defect — a forged
signature, a malleated one (S + L), undecodable bytes under a signature that
does not verify, an unknown key, a key of the wrong role, the wrong audience, an
expired statement, a replay, a swapped payload type, malformed or oversized
bytes, an invalid amount — and requires the status and ``ErrorInfo`` reason
of §3.6/§12, and that nothing changed on the server (§12.3).

The defects are defined once and applied to each RPC that takes a statement
to act on (:data:`_TARGETS`): the custodian's ``PledgeCollateral`` and
``RequestRedemption`` (client statements) and ``SubmitLiquidationInstruction``
(an exchange statement), and the exchange's ``RespondToMarginCall`` (a
custodian statement).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from collateral_sync.keys import SigningKey
from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import (
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    margin_pb2,
)
from google.protobuf.message import Message

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    expect_ok,
    expect_status,
)
from collateral_sync_conformance._forge import (
    corrupt_signature,
    malleate_signature,
    seal,
    unknown_field,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._kit_account import (
    liquidation_path,
    plan_pledge,
    pledge_instruction,
)
from collateral_sync_conformance.cases._snapshots import (
    custodian_state,
    exchange_state,
    expect_unchanged,
)

__all__: list[str] = []

_R = errors_pb2.ErrorReason
_C = grpc.StatusCode
_ROLE = common_pb2.PartyRole

#: Largest payload a receiver accepts (§3.6 stage a2).
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
#: Far beyond any clock skew a receiver may allow (at most 5 minutes, §3.6 f).
_FAR = timedelta(hours=1)
_TRUNCATED = b"\x0a\x05ab"  # field 1, length 5, only 2 bytes follow: corrupt in any parser


@dataclass
class _Statement:
    """The statement under test, to be signed by ``signer`` with the header knobs."""

    message: Message
    signer: SigningKey
    issuer: str | None = None
    audience: list[str] | None = None
    sequence: int | None = None
    issued_at: datetime | None = None
    expires_at: datetime | None = None
    payload_type: str | None = None
    payload: bytes | None = None
    #: Applied to the signed envelope (forging, stripping signatures...).
    after: Callable[[envelope_pb2.Envelope], envelope_pb2.Envelope] | None = None
    without_header: bool = False
    #: Bytes of an unknown field appended to the correct payload before signing.
    pad: int = 0

    async def envelope(self, ctx: CaseContext) -> envelope_pb2.Envelope:
        if self.without_header:
            sealed = seal(self.message, [self.signer], payload_type=self.payload_type)
        else:
            sealed = await ctx.sign(
                self.message,
                self.signer,
                issuer=self.issuer,
                audience=self.audience,
                sequence=self.sequence,
                issued_at=self.issued_at,
                expires_at=self.expires_at,
                payload_type=self.payload_type,
                payload=self.payload,
            )
            if self.pad:
                # A correct statement plus an unknown field: only its size is wrong.
                body = sealed.payload + unknown_field(1000, self.pad)
                sealed = seal(self.message, [self.signer], payload=body)
        return self.after(sealed) if self.after is not None else sealed


@dataclass
class _Target:
    """An RPC taking a statement to act on, and how to build a correct request for it."""

    slug: str
    rpc: str
    #: Role whose key issues the statement.
    issuer_role: int
    #: Role of a registered key that may not issue it (for the wrong-role cases).
    other_role: int
    #: The correct statement (unsigned) and a function from its envelope to the request.
    prepare: Callable[[CaseContext], Awaitable[tuple[Message, Callable[..., Awaitable[Message]]]]]
    call: Callable[[CaseContext], Callable[..., Awaitable[Message]]]
    #: An envelope type this RPC does not accept, for the payload-type case.
    foreign_type: str
    #: The role of the server that serves the RPC.
    role: Role
    #: A text snapshot of the server's state; a refused request must leave it unchanged.
    snapshot: Callable[[CaseContext], Awaitable[str]]


async def _prepare_pledge(
    ctx: CaseContext,
) -> tuple[Message, Callable[..., Awaitable[Message]]]:
    plan = await plan_pledge(ctx)

    async def request(instruction: envelope_pb2.Envelope) -> Message:
        path = await ctx.sign(liquidation_path(plan), plan.client)
        return custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=instruction, liquidation_path=path
        )

    return pledge_instruction(plan), request


async def _prepare_redemption(
    ctx: CaseContext,
) -> tuple[Message, Callable[..., Awaitable[Message]]]:
    plan = await plan_pledge(ctx)  # a free quantity of an asset of the kit's account
    redemption = custodian_service_pb2.RedemptionRequest(
        redemption_id=ctx.unique("conformance-redemption"),
        account_id=plan.account_id,
        asset_id=plan.asset_id,
        quantity=common_pb2.Decimal(value=plan.quantity),
    )

    async def request(envelope: envelope_pb2.Envelope) -> Message:
        return custodian_service_pb2.RequestRedemptionRequest(redemption_request=envelope)

    return redemption, request


async def _prepare_margin_call_response(
    ctx: CaseContext,
) -> tuple[Message, Callable[..., Awaitable[Message]]]:
    response = margin_pb2.MarginCallResponse(
        margin_call_id=ctx.unique("conformance-margin-call"),
        kind=margin_pb2.MARGIN_CALL_RESPONSE_KIND_DISPUTE,
        agreed_amount=common_pb2.Decimal(value="0"),
        dispute_reason=margin_pb2.DISPUTE_REASON_ARITHMETIC,
    )

    async def request(envelope: envelope_pb2.Envelope) -> Message:
        return exchange_service_pb2.RespondToMarginCallRequest(margin_call_response=envelope)

    return response, request


async def _custodian_snapshot(ctx: CaseContext) -> str:
    return (await custodian_state(ctx)).text()


async def _prepare_liquidation(
    ctx: CaseContext,
) -> tuple[Message, Callable[..., Awaitable[Message]]]:
    account = ctx.config.account_id or "conformance-account"
    instruction = liquidation_pb2.LiquidationInstruction(
        liquidation_id=ctx.unique("conformance-liquidation"),
        account_id=account,
        amount=common_pb2.Decimal(value="1"),
        liquidation_path_id=ctx.unique("conformance-path"),
        risk_policy_version=1,
    )

    async def request(envelope: envelope_pb2.Envelope) -> Message:
        return custodian_service_pb2.SubmitLiquidationInstructionRequest(
            liquidation_instruction=envelope
        )

    return instruction, request


_TARGETS = (
    _Target(
        slug="pledge-collateral",
        rpc="PledgeCollateral",
        issuer_role=_ROLE.PARTY_ROLE_CLIENT,
        other_role=_ROLE.PARTY_ROLE_EXCHANGE,
        prepare=_prepare_pledge,
        call=lambda ctx: ctx.custodian.pledge_collateral,
        foreign_type=payload_type_of(liquidation_pb2.LiquidationPath),
        role=Role.CUSTODIAN,
        snapshot=_custodian_snapshot,
    ),
    _Target(
        slug="request-redemption",
        rpc="RequestRedemption",
        issuer_role=_ROLE.PARTY_ROLE_CLIENT,
        other_role=_ROLE.PARTY_ROLE_EXCHANGE,
        prepare=_prepare_redemption,
        call=lambda ctx: ctx.custodian.request_redemption,
        foreign_type=payload_type_of(custodian_service_pb2.PledgeInstruction),
        role=Role.CUSTODIAN,
        snapshot=_custodian_snapshot,
    ),
    _Target(
        slug="submit-liquidation-instruction",
        rpc="SubmitLiquidationInstruction",
        issuer_role=_ROLE.PARTY_ROLE_EXCHANGE,
        other_role=_ROLE.PARTY_ROLE_CLIENT,
        prepare=_prepare_liquidation,
        call=lambda ctx: ctx.custodian.submit_liquidation_instruction,
        foreign_type=payload_type_of(custodian_service_pb2.PledgeInstruction),
        role=Role.CUSTODIAN,
        snapshot=_custodian_snapshot,
    ),
    _Target(
        slug="respond-to-margin-call",
        rpc="RespondToMarginCall",
        issuer_role=_ROLE.PARTY_ROLE_CUSTODIAN,
        other_role=_ROLE.PARTY_ROLE_CLIENT,
        prepare=_prepare_margin_call_response,
        call=lambda ctx: ctx.exchange.respond_to_margin_call,
        foreign_type=payload_type_of(custodian_service_pb2.PledgeInstruction),
        role=Role.EXCHANGE,
        snapshot=exchange_state,
    ),
)


# ------------------------------------------------------------------ defects

Defect = Callable[[CaseContext, _Target, _Statement], Awaitable[None]]


@dataclass(frozen=True)
class _Refusal:
    slug: str
    description: str
    code: grpc.StatusCode
    reason: int
    defect: Defect
    field_violation: str | None = None


async def _forged(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.after = corrupt_signature


async def _malleated(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.after = malleate_signature


async def _unverified_undecodable(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    # Bytes no parser accepts, under a registered key's signature that does not verify:
    # stage b refuses them before stage c could find them malformed (§3.6).
    s.payload = _TRUNCATED
    s.after = corrupt_signature


async def _tampered(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    def tamper(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        changed = type(s.message)()
        changed.ParseFromString(envelope.payload)
        changed.header.statement_id += "-altered"  # type: ignore[attr-defined]
        copy = envelope_pb2.Envelope()
        copy.CopyFrom(envelope)
        copy.payload = changed.SerializeToString(deterministic=True)
        return copy

    s.after = tamper


async def _unknown_key(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.signer = SigningKey.generate(s.signer.party_id, s.signer.role)


async def _wrong_role(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    # A registered key, signing as its own party, of a role that may not issue this type.
    s.signer = ctx.key(target.other_role)


async def _not_key_owner(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    # The right issuer named in the header, but the key belongs to another party.
    s.issuer = s.signer.party_id
    other = ctx.key(target.other_role)
    if other.party_id == s.issuer:
        raise CaseSkipped("the kit's keys of both roles belong to one party")
    s.signer = other


async def _wrong_audience(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.audience = [f"not-{ctx.server_party_id}"]


async def _audience_anyone(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.audience = ["*", ctx.server_party_id]


async def _expired(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    now = await ctx.server_now()
    s.issued_at = now - 2 * _FAR
    s.expires_at = now - _FAR
    _require_key_valid_at(ctx, s.signer, s.issued_at)


async def _not_yet_valid(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    now = await ctx.server_now()
    s.issued_at = now + _FAR
    s.expires_at = now + 2 * _FAR


def _require_key_valid_at(ctx: CaseContext, key: SigningKey, at: datetime) -> None:
    entry = ctx.registry.get(key.key_id)
    if entry is not None and entry.valid_from.ToDatetime(tzinfo=at.tzinfo) > at:
        raise CaseSkipped(
            f"the kit's key {key.key_id[:16]}… is valid only from "
            f"{entry.valid_from.ToJsonString()}, too late to date an expired statement"
        )


async def _payload_type(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.payload_type = target.foreign_type


async def _malformed(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.payload = _TRUNCATED


async def _missing_header(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.without_header = True


async def _zero_sequence(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.sequence = 0


async def _expires_before_issue(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    now = await ctx.server_now()
    s.issued_at = now
    s.expires_at = now - timedelta(seconds=1)


async def _no_signature(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    def strip(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        del envelope.signatures[:]
        return envelope

    s.after = strip


async def _short_signature(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    def shorten(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        envelope.signatures[0].sig = envelope.signatures[0].sig[:63]
        return envelope

    s.after = shorten


async def _bad_key_id(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    def upper(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        envelope.signatures[0].key_id = envelope.signatures[0].key_id.upper()
        return envelope

    s.after = upper


async def _oversized(ctx: CaseContext, target: _Target, s: _Statement) -> None:
    s.pad = MAX_PAYLOAD_BYTES


_REFUSALS = (
    _Refusal(
        "forged-signature-refused",
        "a statement whose signature does not verify is refused: UNAUTHENTICATED SIGNATURE_INVALID",
        _C.UNAUTHENTICATED,
        _R.ERROR_REASON_SIGNATURE_INVALID,
        _forged,
    ),
    _Refusal(
        "malleated-signature-refused",
        "a valid signature whose scalar S is replaced by S + L (the group order) is refused: "
        "UNAUTHENTICATED SIGNATURE_INVALID (§3.3, RFC 8032 §5.1.7)",
        _C.UNAUTHENTICATED,
        _R.ERROR_REASON_SIGNATURE_INVALID,
        _malleated,
    ),
    _Refusal(
        "unverified-undecodable-payload-refused",
        "payload bytes that do not parse, under a signature that does not verify, are refused "
        "for the signature, not as malformed: UNAUTHENTICATED SIGNATURE_INVALID (§3.6: no "
        "parsing before verification)",
        _C.UNAUTHENTICATED,
        _R.ERROR_REASON_SIGNATURE_INVALID,
        _unverified_undecodable,
    ),
    _Refusal(
        "tampered-payload-refused",
        "payload bytes changed after signing are refused: UNAUTHENTICATED SIGNATURE_INVALID",
        _C.UNAUTHENTICATED,
        _R.ERROR_REASON_SIGNATURE_INVALID,
        _tampered,
    ),
    _Refusal(
        "unknown-key-refused",
        "a statement signed by a key not in the registry is refused: UNAUTHENTICATED KEY_UNKNOWN",
        _C.UNAUTHENTICATED,
        _R.ERROR_REASON_KEY_UNKNOWN,
        _unknown_key,
    ),
    _Refusal(
        "wrong-role-refused",
        "a statement issued with a key of a role that may not issue it is refused: PERMISSION_DENIED KEY_ROLE_MISMATCH",
        _C.PERMISSION_DENIED,
        _R.ERROR_REASON_KEY_ROLE_MISMATCH,
        _wrong_role,
    ),
    _Refusal(
        "issuer-not-key-owner-refused",
        "a statement signed by another party's key than its issuer's is refused: PERMISSION_DENIED KEY_ROLE_MISMATCH",
        _C.PERMISSION_DENIED,
        _R.ERROR_REASON_KEY_ROLE_MISMATCH,
        _not_key_owner,
    ),
    _Refusal(
        "wrong-audience-refused",
        "a statement addressed to another party is refused: PERMISSION_DENIED AUDIENCE_MISMATCH",
        _C.PERMISSION_DENIED,
        _R.ERROR_REASON_AUDIENCE_MISMATCH,
        _wrong_audience,
    ),
    _Refusal(
        "audience-anyone-refused",
        "a non-public statement addressed to '*' is refused even if it names the server: AUDIENCE_MISMATCH",
        _C.PERMISSION_DENIED,
        _R.ERROR_REASON_AUDIENCE_MISMATCH,
        _audience_anyone,
    ),
    _Refusal(
        "expired-refused",
        "a statement past its expires_at is refused: FAILED_PRECONDITION STATEMENT_EXPIRED",
        _C.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATEMENT_EXPIRED,
        _expired,
    ),
    _Refusal(
        "not-yet-valid-refused",
        "a statement issued an hour in the future is refused: FAILED_PRECONDITION STATEMENT_NOT_YET_VALID",
        _C.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATEMENT_NOT_YET_VALID,
        _not_yet_valid,
    ),
    _Refusal(
        "payload-type-mismatch-refused",
        "a correctly signed statement of another payload type is refused: INVALID_ARGUMENT PAYLOAD_TYPE_MISMATCH",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_PAYLOAD_TYPE_MISMATCH,
        _payload_type,
    ),
    _Refusal(
        "malformed-payload-refused",
        "signed payload bytes that do not parse are refused: INVALID_ARGUMENT MALFORMED",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        _malformed,
    ),
    _Refusal(
        "missing-header-refused",
        "a signed statement without a header is refused: INVALID_ARGUMENT MALFORMED",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        _missing_header,
    ),
    _Refusal(
        "zero-sequence-refused",
        "a statement with sequence 0 is refused: INVALID_ARGUMENT MALFORMED",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        _zero_sequence,
    ),
    _Refusal(
        "expiry-before-issue-refused",
        "a statement expiring before it was issued is refused: INVALID_ARGUMENT MALFORMED",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        _expires_before_issue,
    ),
    _Refusal(
        "no-signature-refused",
        "an envelope without signatures is refused: INVALID_ARGUMENT MALFORMED",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        _no_signature,
    ),
    _Refusal(
        "short-signature-refused",
        "a signature that is not 64 bytes is refused: INVALID_ARGUMENT MALFORMED",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        _short_signature,
    ),
    _Refusal(
        "malformed-key-id-refused",
        "a key id that is not 64 lowercase hex digits is refused: INVALID_ARGUMENT MALFORMED",
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        _bad_key_id,
    ),
    _Refusal(
        "oversized-payload-refused",
        "a payload over 4 MiB is refused before it is verified: RESOURCE_EXHAUSTED TOO_LARGE",
        _C.RESOURCE_EXHAUSTED,
        _R.ERROR_REASON_TOO_LARGE,
        _oversized,
    ),
)


def _refusal_case(target: _Target, refusal: _Refusal) -> Callable[[CaseContext], Awaitable[None]]:
    async def body(ctx: CaseContext) -> None:
        message, make_request = await target.prepare(ctx)
        statement = _Statement(message=message, signer=ctx.key(target.issuer_role))
        await refusal.defect(ctx, target, statement)
        before = await target.snapshot(ctx)
        request = await make_request(await statement.envelope(ctx))
        outcome = await ctx.rpc(target.call(ctx), request, label=target.rpc)
        expect_status(
            outcome, refusal.code, refusal.reason, field_violation=refusal.field_violation
        )
        after = await target.snapshot(ctx)
        if after != before:
            raise CaseFailure(
                f"the refused {target.rpc} changed the server's state (§12.3)",
                expected=before,
                got=after,
            )

    return body


for _target in _TARGETS:
    for _refusal in _REFUSALS:
        REGISTRY.case(
            f"envelope/{_target.slug}/{_refusal.slug}",
            Level.MUST,
            f"{_target.rpc}: {_refusal.description}",
            roles=[_target.role],
            clauses={
                "malleated-signature-refused": ("§3.3/canonical-signature-scalar",),
                "issuer-not-key-owner-refused": ("§3.4/signing-key-of-issuer",),
                "expiry-before-issue-refused": ("§3.4/expires-after-issued",),
                "unverified-undecodable-payload-refused": ("§3.6/verify-before-parse",),
            }.get(_refusal.slug, ()),
        )(_refusal_case(_target, _refusal))


# ------------------------------------------------------------------ replay and amounts (pledges)


async def _accepted_pledge(
    ctx: CaseContext,
) -> tuple[custodian_service_pb2.PledgeCollateralRequest, int]:
    """A valid pledge the server accepts; returns the request and its sequence."""
    plan = await plan_pledge(ctx)
    instruction = pledge_instruction(plan)
    request = custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=await ctx.sign(instruction, plan.client),
        liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
    )
    expect_ok(await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral"))
    return request, instruction.header.sequence


@REGISTRY.case(
    "envelope/pledge-collateral/replayed-refused",
    Level.MUST,
    "PledgeCollateral: the same accepted statement sent again is refused: ALREADY_EXISTS REPLAYED",
    roles=[Role.CUSTODIAN],
)
async def pledge_replayed(ctx: CaseContext) -> None:
    request, _ = await _accepted_pledge(ctx)
    before = await custodian_state(ctx)
    outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
    expect_status(outcome, _C.ALREADY_EXISTS, _R.ERROR_REASON_REPLAYED)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "envelope/pledge-collateral/lower-sequence-refused",
    Level.MUST,
    "PledgeCollateral: a new statement with a sequence below one accepted is refused: ALREADY_EXISTS REPLAYED",
    roles=[Role.CUSTODIAN],
)
async def pledge_lower_sequence(ctx: CaseContext) -> None:
    _, accepted = await _accepted_pledge(ctx)
    plan = await plan_pledge(ctx)
    before = await custodian_state(ctx)
    request = custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=await ctx.sign(
            pledge_instruction(plan), plan.client, sequence=accepted - 1
        ),
        liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
    )
    outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
    expect_status(outcome, _C.ALREADY_EXISTS, _R.ERROR_REASON_REPLAYED)
    await expect_unchanged(ctx, before)


def _amount_case(
    quantity: str | None, code: grpc.StatusCode, reason: int, violation: str | None
) -> Callable[[CaseContext], Awaitable[None]]:
    async def body(ctx: CaseContext) -> None:
        plan = await plan_pledge(ctx)
        instruction = pledge_instruction(plan, quantity="0" if quantity is None else quantity)
        if quantity is None:
            instruction.ClearField("quantity")
        before = await custodian_state(ctx)
        request = custodian_service_pb2.PledgeCollateralRequest(
            pledge_instruction=await ctx.sign(instruction, plan.client),
            liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
        )
        outcome = await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral")
        expect_status(outcome, code, reason, field_violation=violation)
        if violation is not None:
            metadata = outcome.error_info.metadata if outcome.error_info is not None else {}
            check(
                "field" in metadata,
                "an INVALID_AMOUNT error must name the field in ErrorInfo metadata 'field' (§2.1)",
                expected="metadata key 'field'",
                got=dict(metadata),
            )
        await expect_unchanged(ctx, before)

    return body


REGISTRY.case(
    "envelope/pledge-collateral/invalid-amount-refused",
    Level.MUST,
    "PledgeCollateral: a non-canonical quantity ('0.0010') is refused: INVALID_ARGUMENT INVALID_AMOUNT naming the field",
    roles=[Role.CUSTODIAN],
    clauses=("§2.1/refuse-non-canonical-amount",),
)(_amount_case("0.0010", _C.INVALID_ARGUMENT, _R.ERROR_REASON_INVALID_AMOUNT, "quantity"))
REGISTRY.case(
    "envelope/pledge-collateral/negative-amount-refused",
    Level.MUST,
    "PledgeCollateral: a negative quantity is refused: INVALID_ARGUMENT INVALID_AMOUNT",
    roles=[Role.CUSTODIAN],
)(_amount_case("-0.001", _C.INVALID_ARGUMENT, _R.ERROR_REASON_INVALID_AMOUNT, None))
REGISTRY.case(
    "envelope/pledge-collateral/missing-amount-refused",
    Level.MUST,
    "PledgeCollateral: a pledge without a quantity is refused: INVALID_ARGUMENT MALFORMED",
    roles=[Role.CUSTODIAN],
)(_amount_case(None, _C.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED, None))
