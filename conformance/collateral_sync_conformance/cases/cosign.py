"""Co-signing emergency releases at the exchange and the regulator (docs/PROTOCOL.md §11.2).

The kit proposes a release as the custodian (its ``--kit-key`` of role
custodian) and sends it to the server's ``CoSignEmergencyRelease``:

- testing an exchange, the release is of the kit's ``--account`` and names the
  exchange under test; the reference exchange co-signs only a release of an
  account it mirrors with exposure 0, so ``--account`` must have none;
- testing a regulator, the release names the exchange of the kit's key of role
  exchange (the exchange the regulator oversees) and says that exchange failed:
  the custodian-and-regulator path of §11.3.

§11.2 fixes what every co-signer checks before it signs — the proposer's
signature, addressed to it, fresh, every signature present by a valid release
key, not signed by it already — and that it signs the received payload bytes
and keeps no replay state: those cases are MUST. What it then agrees to is its
policy, for which the protocol fixes only the refusal (``STATE_CONFLICT`` or
``NOT_FOUND``); the cases for the reference policies are SHOULD. Co-signing
changes nothing at the co-signer, so at an exchange every refusal must leave
its policy, margin calls and credit line as they were.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import ROUND_DOWN, Decimal

import grpc
from collateral_sync.amounts import amount_from_proto, amount_to_proto
from collateral_sync.keys import SigningKey
from collateral_sync.signing import pae, verify_threshold
from collateral_sync.v1 import (
    common_pb2,
    emergency_pb2,
    emergency_release_service_pb2,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    test_control_pb2,
    valuation_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseSkipped,
    Outcome,
    check_equal,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._forge import corrupt_signature, seal, unknown_field
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._snapshots import exchange_state

__all__: list[str] = []

_CO_SIGNERS = [Role.EXCHANGE, Role.REGULATOR]
_EXCHANGE = [Role.EXCHANGE]
_R = errors_pb2.ErrorReason
_C = grpc.StatusCode
_RELEASE_ROLES = (
    common_pb2.PARTY_ROLE_REGULATOR,
    common_pb2.PARTY_ROLE_CUSTODIAN,
    common_pb2.PARTY_ROLE_EXCHANGE,
)
_TRUNCATED = b"\x0a\x05ab"  # field 1, length 5, only 2 bytes follow: corrupt in any parser
#: How long before now the regulator's release says the exchange stopped answering.
_UNRESPONSIVE_FOR = timedelta(days=3)
#: The open-exposure case exposes this fraction of the account's collateral value.
_EXPOSURE_SHARE = 1000
_QUANTUM = Decimal("1e-18")


def _proposer(ctx: CaseContext) -> SigningKey:
    return ctx.key(common_pb2.PARTY_ROLE_CUSTODIAN)


async def _release(ctx: CaseContext) -> tuple[emergency_pb2.EmergencyRelease, list[str]]:
    """A release the server's reference policy agrees with, and the audience to address it to."""
    proposer = _proposer(ctx)
    release = emergency_pb2.EmergencyRelease(release_id=ctx.unique("conformance-release"))
    audience = [proposer.party_id, ctx.server_party_id]
    if ctx.role is Role.EXCHANGE:
        release.account_id = ctx.account()
        release.exchange_id = ctx.server_party_id
        release.reason = emergency_pb2.EMERGENCY_RELEASE_REASON_REGULATORY_ORDER
    else:
        # The regulator's release is for the exchange it oversees, which has failed.
        exchange = ctx.key(common_pb2.PARTY_ROLE_EXCHANGE).party_id
        release.account_id = ctx.config.account_id or ctx.unique("conformance-account")
        release.exchange_id = exchange
        release.reason = emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE
        release.exchange_unresponsive_since.FromDatetime(await ctx.server_now() - _UNRESPONSIVE_FOR)
        audience.append(exchange)
    return release, audience


async def _proposal(ctx: CaseContext) -> envelope_pb2.Envelope:
    """A well-formed release signed by its proposer alone."""
    release, audience = await _release(ctx)
    return await ctx.sign(release, _proposer(ctx), audience=audience)


async def _cosign(ctx: CaseContext, envelope: envelope_pb2.Envelope) -> Outcome:
    return await ctx.rpc(
        ctx.emergency_release.co_sign_emergency_release,
        emergency_release_service_pb2.CoSignEmergencyReleaseRequest(emergency_release=envelope),
        label="CoSignEmergencyRelease",
    )


async def _state(ctx: CaseContext) -> str | None:
    """What a co-signer must not change: the exchange's state; a regulator shows none."""
    return await exchange_state(ctx) if ctx.role is Role.EXCHANGE else None


async def _cosigned(ctx: CaseContext, proposal: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """The server's answer to ``proposal``: the same release, with its valid signature appended."""
    response: emergency_release_service_pb2.CoSignEmergencyReleaseResponse = expect_ok(
        await _cosign(ctx, proposal)
    )
    signed = response.emergency_release
    check_equal("payload_type of the co-signed release", proposal.payload_type, signed.payload_type)
    check_equal(
        "payload of the co-signed release (the bytes proposed, unchanged)",
        proposal.payload,
        signed.payload,
    )
    check_equal(
        "number of signatures after co-signing",
        len(proposal.signatures) + 1,
        len(signed.signatures),
    )
    check_equal(
        "the proposer's signatures after co-signing",
        [s.SerializeToString() for s in proposal.signatures],
        [s.SerializeToString() for s in signed.signatures[: len(proposal.signatures)]],
    )
    verified = sdk_check(
        "the co-signed release (2 of regulator, custodian, exchange)",
        verify_threshold,
        signed,
        ctx.registry,
        expected_type=emergency_pb2.EmergencyRelease,
        threshold=2,
        roles=_RELEASE_ROLES,
        audience=_proposer(ctx).party_id,
        now=await ctx.server_now(),
    )
    check_equal(
        "parties that signed the co-signed release",
        sorted({_proposer(ctx).party_id, ctx.server_party_id}),
        sorted(set(verified.signer_party_ids)),
    )
    return signed


async def _refused(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, code: grpc.StatusCode, reason: int
) -> None:
    """The co-signer refuses ``envelope`` with ``code`` and ``reason``, and changes nothing."""
    before = await _state(ctx)
    expect_status(await _cosign(ctx, envelope), code, reason)
    check_equal("the server's state after a refused co-signing", before, await _state(ctx))


async def _policy_refused(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, *, watch_state: bool = True
) -> None:
    """A refusal by policy: FAILED_PRECONDITION STATE_CONFLICT or NOT_FOUND (§11.2), nothing changed."""
    before = await _state(ctx) if watch_state else None
    outcome = await _cosign(ctx, envelope)
    if outcome.code == _C.NOT_FOUND:
        expect_status(outcome, _C.NOT_FOUND, _R.ERROR_REASON_NOT_FOUND)
    else:
        expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    if watch_state:
        check_equal("the server's state after a refused co-signing", before, await _state(ctx))


@REGISTRY.case(
    "emergency/cosign/signature-appended",
    Level.MUST,
    "a custodian's release (carrying an unknown field) comes back with the payload bytes unchanged and the server's valid signature appended",
    roles=_CO_SIGNERS,
    clauses=("§1.3/ignore-unknown-fields",),
)
async def signature_appended(ctx: CaseContext) -> None:
    release, audience = await _release(ctx)
    proposer = _proposer(ctx)
    sealed = await ctx.sign(release, proposer, audience=audience)
    # Unknown fields are ignored (§1.3) but are part of the signed bytes: a co-signer
    # that re-encodes the release instead of signing what it received loses them.
    body = sealed.payload + unknown_field(1000, 8)
    proposal = seal(release, [proposer], payload=body)
    before = await _state(ctx)
    await _cosigned(ctx, proposal)
    # A signature, not an action (§11.2: no state is recorded).
    check_equal("the server's state after co-signing", before, await _state(ctx))


@REGISTRY.case(
    "emergency/cosign/same-proposal-cosigned-again",
    Level.MUST,
    "the same proposal sent again (a retry after a lost answer) is co-signed again: a co-signer keeps no replay state",
    roles=_CO_SIGNERS,
)
async def same_proposal_again(ctx: CaseContext) -> None:
    proposal = await _proposal(ctx)
    await _cosigned(ctx, proposal)
    await _cosigned(ctx, proposal)


@REGISTRY.case(
    "emergency/cosign/already-signed-refused",
    Level.MUST,
    "a release the server has already signed, sent back to it, is refused: FAILED_PRECONDITION STATE_CONFLICT",
    roles=_CO_SIGNERS,
)
async def already_signed(ctx: CaseContext) -> None:
    signed = await _cosigned(ctx, await _proposal(ctx))
    await _refused(ctx, signed, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)


@REGISTRY.case(
    "emergency/cosign/forged-proposal-refused",
    Level.MUST,
    "a release whose proposer's signature does not verify is refused (UNAUTHENTICATED SIGNATURE_INVALID); the genuine one is co-signed after",
    roles=_CO_SIGNERS,
)
async def forged_proposal(ctx: CaseContext) -> None:
    genuine = await _proposal(ctx)
    await _refused(
        ctx, corrupt_signature(genuine), _C.UNAUTHENTICATED, _R.ERROR_REASON_SIGNATURE_INVALID
    )
    await _cosigned(ctx, genuine)


@REGISTRY.case(
    "emergency/cosign/invalid-cosignature-refused",
    Level.MUST,
    "a release with a valid proposer's signature and a second one that does not verify is refused: UNAUTHENTICATED SIGNATURE_INVALID",
    roles=_CO_SIGNERS,
    clauses=("§11/cosignatures-verify",),
)
async def invalid_cosignature(ctx: CaseContext) -> None:
    proposal = await _proposal(ctx)
    # The proposer's signature again with one bit flipped: a release key's, and false.
    proposal.signatures.append(corrupt_signature(proposal).signatures[0])
    await _refused(ctx, proposal, _C.UNAUTHENTICATED, _R.ERROR_REASON_SIGNATURE_INVALID)


@REGISTRY.case(
    "emergency/cosign/unregistered-cosigner-refused",
    Level.MUST,
    "a release with a valid proposer's signature and a second one, true, by a key id the "
    "registry does not hold is refused: UNAUTHENTICATED SIGNATURE_INVALID (an unverifiable "
    "signature, not an unknown issuer, §11 step 2)",
    roles=_CO_SIGNERS,
    clauses=("§11/cosignatures-verify",),
)
async def unregistered_cosigner(ctx: CaseContext) -> None:
    proposal = await _proposal(ctx)
    # A new key of the proposer's party that no registry holds (a rotation half done).
    unregistered = SigningKey.generate(_proposer(ctx).party_id, common_pb2.PARTY_ROLE_CUSTODIAN)
    proposal.signatures.add(
        key_id=unregistered.key_id,
        sig=unregistered.sign(pae(proposal.payload_type, proposal.payload)),
    )
    await _refused(ctx, proposal, _C.UNAUTHENTICATED, _R.ERROR_REASON_SIGNATURE_INVALID)


@REGISTRY.case(
    "emergency/cosign/client-signature-refused",
    Level.MUST,
    "a release carrying a client's valid signature beside the proposer's is refused: PERMISSION_DENIED KEY_ROLE_MISMATCH",
    roles=_CO_SIGNERS,
)
async def client_signature(ctx: CaseContext) -> None:
    client = ctx.key(common_pb2.PARTY_ROLE_CLIENT)
    release, audience = await _release(ctx)
    proposal = await ctx.sign(release, _proposer(ctx), audience=audience, extra_signers=[client])
    await _refused(ctx, proposal, _C.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH)


@REGISTRY.case(
    "emergency/cosign/client-proposer-refused",
    Level.MUST,
    "a release issued and signed by a client is refused: PERMISSION_DENIED KEY_ROLE_MISMATCH",
    roles=_CO_SIGNERS,
)
async def client_proposer(ctx: CaseContext) -> None:
    client = ctx.key(common_pb2.PARTY_ROLE_CLIENT)
    release, audience = await _release(ctx)
    proposal = await ctx.sign(release, client, audience=audience)
    await _refused(ctx, proposal, _C.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH)


@REGISTRY.case(
    "emergency/cosign/expired-refused",
    Level.MUST,
    "a release past its expires_at is refused: FAILED_PRECONDITION STATEMENT_EXPIRED",
    roles=_CO_SIGNERS,
)
async def expired(ctx: CaseContext) -> None:
    proposer = _proposer(ctx)
    now = await ctx.server_now()
    issued_at = now - timedelta(hours=2)
    entry = ctx.registry.get(proposer.key_id)
    if entry is not None and entry.valid_from.ToDatetime(tzinfo=now.tzinfo) > issued_at:
        raise CaseSkipped(
            f"the kit's custodian key is valid only from {entry.valid_from.ToJsonString()}, "
            "too late to date an expired release"
        )
    release, audience = await _release(ctx)
    proposal = await ctx.sign(
        release,
        proposer,
        audience=audience,
        issued_at=issued_at,
        expires_at=now - timedelta(hours=1),
    )
    await _refused(ctx, proposal, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATEMENT_EXPIRED)


@REGISTRY.case(
    "emergency/cosign/wrong-audience-refused",
    Level.MUST,
    "a release not addressed to the server is refused (PERMISSION_DENIED AUDIENCE_MISMATCH); the same release addressed to it is co-signed after",
    roles=_CO_SIGNERS,
)
async def wrong_audience(ctx: CaseContext) -> None:
    release, audience = await _release(ctx)
    others = [party for party in audience if party != ctx.server_party_id]
    misaddressed = await ctx.sign(release, _proposer(ctx), audience=others)
    await _refused(ctx, misaddressed, _C.PERMISSION_DENIED, _R.ERROR_REASON_AUDIENCE_MISMATCH)
    await _cosigned(ctx, await ctx.sign(release, _proposer(ctx), audience=audience))


@REGISTRY.case(
    "emergency/cosign/malformed-payload-refused",
    Level.MUST,
    "a signed payload that does not parse as an EmergencyRelease is refused: INVALID_ARGUMENT MALFORMED",
    roles=_CO_SIGNERS,
)
async def malformed_payload(ctx: CaseContext) -> None:
    release, audience = await _release(ctx)
    proposal = await ctx.sign(release, _proposer(ctx), audience=audience, payload=_TRUNCATED)
    await _refused(ctx, proposal, _C.INVALID_ARGUMENT, _R.ERROR_REASON_MALFORMED)


@REGISTRY.case(
    "emergency/cosign/missing-account-refused",
    Level.SHOULD,
    "a release naming no account is refused: INVALID_ARGUMENT MALFORMED, with a field violation for account_id",
    roles=_CO_SIGNERS,
)
async def missing_account(ctx: CaseContext) -> None:
    release, audience = await _release(ctx)
    release.ClearField("account_id")
    proposal = await ctx.sign(release, _proposer(ctx), audience=audience)
    before = await _state(ctx)
    expect_status(
        await _cosign(ctx, proposal),
        _C.INVALID_ARGUMENT,
        _R.ERROR_REASON_MALFORMED,
        field_violation="account_id",
    )
    check_equal("the server's state after a refused co-signing", before, await _state(ctx))


@REGISTRY.case(
    "emergency/cosign/other-exchange-refused",
    Level.SHOULD,
    "a release naming an exchange that is not the server (exchange) or not overseen by it (regulator) is refused: STATE_CONFLICT or NOT_FOUND",
    roles=_CO_SIGNERS,
)
async def other_exchange(ctx: CaseContext) -> None:
    release, audience = await _release(ctx)
    release.exchange_id = ctx.unique("conformance-exchange")
    await _policy_refused(ctx, await ctx.sign(release, _proposer(ctx), audience=audience))


@REGISTRY.case(
    "emergency/cosign/unknown-account-refused",
    Level.SHOULD,
    "the exchange refuses a release of an account it does not mirror: NOT_FOUND or STATE_CONFLICT",
    roles=_EXCHANGE,
)
async def unknown_account(ctx: CaseContext) -> None:
    release, audience = await _release(ctx)
    release.account_id = ctx.unique("conformance-no-such-account")
    await _policy_refused(ctx, await ctx.sign(release, _proposer(ctx), audience=audience))


@REGISTRY.case(
    "emergency/cosign/open-exposure-refused",
    Level.SHOULD,
    "the exchange refuses a release of an account with open exposure (set by test control): STATE_CONFLICT or NOT_FOUND",
    roles=_EXCHANGE,
)
async def open_exposure(ctx: CaseContext) -> None:
    release, audience = await _release(ctx)
    proposal = await ctx.sign(release, _proposer(ctx), audience=audience)
    # Valued now, so that the credit line counts every pledge the exchange has mirrored.
    await ctx.control(
        ctx.test_control.run_valuation,
        test_control_pb2.RunValuationRequest(account_id=release.account_id),
    )
    outcome = await ctx.rpc(
        ctx.exchange.get_credit_line,
        exchange_service_pb2.GetCreditLineRequest(account_id=release.account_id),
        label="GetCreditLine",
    )
    response: exchange_service_pb2.GetCreditLineResponse = expect_ok(outcome)
    line = valuation_pb2.CreditLine.FromString(response.credit_line.payload)
    value = sdk_check(
        "the credit line's collateral value", amount_from_proto, line.collateral_value
    )
    # A thousandth of the collateral: exposure it still backs, far from any margin call
    # or liquidation, so that the release alone is what the exchange refuses.
    exposure = (value / _EXPOSURE_SHARE).quantize(_QUANTUM, rounding=ROUND_DOWN)
    if exposure <= 0:
        raise CaseSkipped(
            f"account {release.account_id!r} has collateral worth {value}: nothing to expose"
        )

    async def set_exposure(amount: Decimal) -> None:
        await ctx.control(
            ctx.test_control.set_exposure,
            test_control_pb2.SetExposureRequest(
                account_id=release.account_id, exposure=amount_to_proto(amount)
            ),
        )

    await set_exposure(exposure)
    try:
        # Setting the exposure is itself a change of state: only the refusal is checked.
        await _policy_refused(ctx, proposal, watch_state=False)
    finally:
        await set_exposure(Decimal(0))
