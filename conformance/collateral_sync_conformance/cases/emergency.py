"""Emergency release at the custodian (docs/PROTOCOL.md §10): two of {regulator, custodian, exchange}.

The kit signs as the regulator and as the exchange (``--kit-key`` of both
roles; the exchange key's party is the account's exchange). Releases are of
the kit's ``--account``, which must be pledged to the kit's exchange: each
case makes sure of it with an ordinary pledge by the kit's client. The
refusals change nothing (§12.3); the executed release consumes the pledge,
so it runs last and leaves the account re-pledged for whatever follows.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import grpc
from collateral_sync.keys import SigningKey
from collateral_sync.signing import verify_statement, verify_threshold
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    emergency_pb2,
    emergency_release_service_pb2,
    envelope_pb2,
    errors_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    Outcome,
    check,
    check_equal,
    describe,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._kit_account import (
    client_key,
    ensure_pledged,
    exchange_party,
    holdings,
)
from collateral_sync_conformance.cases._snapshots import custodian_state, expect_unchanged

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_RELEASE_ROLES = (
    common_pb2.PARTY_ROLE_REGULATOR,
    common_pb2.PARTY_ROLE_CUSTODIAN,
    common_pb2.PARTY_ROLE_EXCHANGE,
)
_THRESHOLD = (grpc.StatusCode.PERMISSION_DENIED, _R.ERROR_REASON_THRESHOLD_NOT_MET)


def _signers(ctx: CaseContext) -> tuple[SigningKey, SigningKey]:
    return ctx.key(common_pb2.PARTY_ROLE_REGULATOR), ctx.key(common_pb2.PARTY_ROLE_EXCHANGE)


def _release(ctx: CaseContext, account_id: str) -> emergency_pb2.EmergencyRelease:
    return emergency_pb2.EmergencyRelease(
        release_id=ctx.unique("conformance-release"),
        account_id=account_id,
        exchange_id=exchange_party(ctx),
        reason=emergency_pb2.EMERGENCY_RELEASE_REASON_REGULATORY_ORDER,
    )


async def _refused(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, code: grpc.StatusCode, reason: int
) -> None:
    before = await custodian_state(ctx)
    outcome = await ctx.rpc(
        ctx.custodian.execute_emergency_release,
        custodian_service_pb2.ExecuteEmergencyReleaseRequest(emergency_release=envelope),
        label="ExecuteEmergencyRelease",
    )
    expect_status(outcome, code, reason)
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "emergency/single-signature-refused",
    Level.MUST,
    "a release signed by the regulator alone is refused: PERMISSION_DENIED THRESHOLD_NOT_MET",
    roles=_CUSTODIAN,
)
async def single_signature(ctx: CaseContext) -> None:
    regulator, _ = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    envelope = await ctx.sign(_release(ctx, account_id), regulator)
    await _refused(ctx, envelope, *_THRESHOLD)


@REGISTRY.case(
    "emergency/same-party-twice-refused",
    Level.MUST,
    "the regulator's signature twice counts once: PERMISSION_DENIED THRESHOLD_NOT_MET",
    roles=_CUSTODIAN,
)
async def same_party_twice(ctx: CaseContext) -> None:
    regulator, _ = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    envelope = await ctx.sign(_release(ctx, account_id), regulator)
    envelope.signatures.append(envelope.signatures[0])
    await _refused(ctx, envelope, *_THRESHOLD)


@REGISTRY.case(
    "emergency/wrong-role-signer-refused",
    Level.MUST,
    "a client's signature is no release signature: regulator + client is refused, THRESHOLD_NOT_MET",
    roles=_CUSTODIAN,
)
async def wrong_role_signer(ctx: CaseContext) -> None:
    regulator, _ = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    envelope = await ctx.sign(_release(ctx, account_id), regulator, extra_signers=[client_key(ctx)])
    await _refused(ctx, envelope, *_THRESHOLD)


@REGISTRY.case(
    "emergency/expired-refused",
    Level.MUST,
    "a regulator+exchange release past its expires_at is refused: FAILED_PRECONDITION STATEMENT_EXPIRED",
    roles=_CUSTODIAN,
)
async def expired(ctx: CaseContext) -> None:
    regulator, exchange = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    now = await ctx.server_now()
    envelope = await ctx.sign(
        _release(ctx, account_id),
        regulator,
        extra_signers=[exchange],
        issued_at=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1),
    )
    await _refused(
        ctx, envelope, grpc.StatusCode.FAILED_PRECONDITION, _R.ERROR_REASON_STATEMENT_EXPIRED
    )


@REGISTRY.case(
    "emergency/issuer-not-among-signers-refused",
    Level.MUST,
    "a release issued in the custodian's name but signed by the regulator and the exchange is "
    "refused, its issuer not among its signers: PERMISSION_DENIED KEY_ROLE_MISMATCH (§3.7 step 4)",
    roles=_CUSTODIAN,
    clauses=("§3.7/issuer-among-signers",),
)
async def issuer_not_among_signers(ctx: CaseContext) -> None:
    regulator, exchange = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    # Two parties that count, the exchange among them, so nothing else stops it (§11.3);
    # but the party it names as issuer never signed it.
    envelope = await ctx.sign(
        _release(ctx, account_id),
        regulator,
        issuer=ctx.server_party_id,
        extra_signers=[exchange],
    )
    await _refused(
        ctx, envelope, grpc.StatusCode.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH
    )


async def _cosign(ctx: CaseContext, envelope: envelope_pb2.Envelope) -> Outcome:
    return await ctx.rpc(
        ctx.emergency_release.co_sign_emergency_release,
        emergency_release_service_pb2.CoSignEmergencyReleaseRequest(emergency_release=envelope),
        label="CoSignEmergencyRelease",
    )


async def _cosigned(
    ctx: CaseContext, release: emergency_pb2.EmergencyRelease
) -> tuple[envelope_pb2.Envelope, envelope_pb2.Envelope]:
    """A regulator-issued release, and the same with the custodian's signature appended (§11.2)."""
    regulator, _ = _signers(ctx)
    issued = await ctx.sign(release, regulator)
    response: emergency_release_service_pb2.CoSignEmergencyReleaseResponse = expect_ok(
        await _cosign(ctx, issued)
    )
    return issued, response.emergency_release


@REGISTRY.case(
    "emergency/cosign-appends-signature",
    Level.MUST,
    "CoSignEmergencyRelease of a regulator's release returns it unchanged with the custodian's valid signature appended",
    roles=_CUSTODIAN,
)
async def cosign_appends(ctx: CaseContext) -> None:
    account_id = await ensure_pledged(ctx)
    before = await custodian_state(ctx)
    issued, signed = await _cosigned(ctx, _release(ctx, account_id))
    check_equal("payload of the co-signed release", issued.payload, signed.payload)
    check_equal("payload_type of the co-signed release", issued.payload_type, signed.payload_type)
    check_equal("number of signatures after co-signing", 2, len(signed.signatures))
    check_equal(
        "the issuer's signature after co-signing",
        issued.signatures[0].SerializeToString(),
        signed.signatures[0].SerializeToString(),
    )
    verified = sdk_check(
        "the co-signed release (2 of regulator, custodian, exchange)",
        verify_threshold,
        signed,
        ctx.registry,
        expected_type=emergency_pb2.EmergencyRelease,
        threshold=2,
        roles=_RELEASE_ROLES,
        audience=ctx.server_party_id,
        now=await ctx.server_now(),
    )
    check_equal(
        "parties that signed the co-signed release",
        sorted({_signers(ctx)[0].party_id, ctx.server_party_id}),
        sorted(set(verified.signer_party_ids)),
    )
    # Co-signing is a signature, not an execution (§11.2: no state is recorded).
    await expect_unchanged(ctx, before)


@REGISTRY.case(
    "emergency/cosign-twice-refused",
    Level.MUST,
    "CoSignEmergencyRelease of a release the custodian already signed is refused: FAILED_PRECONDITION STATE_CONFLICT",
    roles=_CUSTODIAN,
)
async def cosign_twice(ctx: CaseContext) -> None:
    account_id = await ensure_pledged(ctx)
    _, signed = await _cosigned(ctx, _release(ctx, account_id))
    expect_status(
        await _cosign(ctx, signed),
        grpc.StatusCode.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATE_CONFLICT,
    )


@REGISTRY.case(
    "emergency/regulator-custodian-before-wait-refused",
    Level.MUST,
    "regulator + custodian without the exchange, before emergency_release_wait has passed, is refused: FAILED_PRECONDITION STATE_CONFLICT",
    roles=_CUSTODIAN,
    clauses=("§11/release-wait",),
)
async def regulator_custodian_before_wait(ctx: CaseContext) -> None:
    account_id = await ensure_pledged(ctx)
    release = _release(ctx, account_id)
    release.reason = emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE
    # Unresponsive since this instant: no positive wait can have passed.
    release.exchange_unresponsive_since.FromDatetime(await ctx.server_now())
    _, signed = await _cosigned(ctx, release)
    await _refused(ctx, signed, grpc.StatusCode.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)


#: Long enough ago that any emergency_release_wait has passed (the pilot's is 48 h).
_LONG_UNRESPONSIVE = timedelta(days=365)


@REGISTRY.case(
    "emergency/regulator-custodian-other-reason-refused",
    Level.MUST,
    "regulator + custodian without the exchange, for another reason than EXCHANGE_FAILURE, is "
    "refused even a year after the exchange went silent: FAILED_PRECONDITION STATE_CONFLICT (§11.3)",
    roles=_CUSTODIAN,
    clauses=("§11/release-reason-exchange-failure",),
)
async def regulator_custodian_other_reason(ctx: CaseContext) -> None:
    account_id = await ensure_pledged(ctx)
    release = _release(ctx, account_id)  # reason REGULATORY_ORDER
    release.exchange_unresponsive_since.FromDatetime(await ctx.server_now() - _LONG_UNRESPONSIVE)
    _, signed = await _cosigned(ctx, release)
    await _refused(ctx, signed, grpc.StatusCode.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)


@REGISTRY.case(
    "emergency/unresponsive-since-unset-refused",
    Level.MUST,
    "regulator + custodian without the exchange, EXCHANGE_FAILURE but no exchange_unresponsive_since, "
    "is refused (not read as 1970): FAILED_PRECONDITION STATE_CONFLICT (§11.3)",
    roles=_CUSTODIAN,
    clauses=("§11/unresponsive-since-set",),
)
async def unresponsive_since_unset(ctx: CaseContext) -> None:
    account_id = await ensure_pledged(ctx)
    release = _release(ctx, account_id)
    release.reason = emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE
    _, signed = await _cosigned(ctx, release)
    await _refused(ctx, signed, grpc.StatusCode.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)


#: The emergency_release_wait of the kit's exchange: what its policy says (the liquidation/
#: cases publish one) and what a custodian without its policy applies, the pilot's (§11.3).
_RELEASE_WAIT = timedelta(hours=48)
_SECOND = timedelta(seconds=1)
#: How far ahead of the server's clock the wait ends when the kit asks for the co-signature.
_COSIGN_LEAD = timedelta(seconds=10)


async def _expect_released(ctx: CaseContext, account_id: str) -> None:
    """The account's next holdings statement says RELEASE and pledges nothing (§11)."""
    statement, _, _ = await holdings(ctx, account_id)
    check_equal(
        "reason of the holdings statement after the release",
        attestation_pb2.HoldingsChangeReason.Name(attestation_pb2.HOLDINGS_CHANGE_REASON_RELEASE),
        attestation_pb2.HoldingsChangeReason.Name(statement.reason),
    )
    still = {p.asset_id: p.pledged_quantity.value for p in statement.positions}
    check(
        all(v in ("", "0") for v in still.values()),
        "the account still pledges collateral after the release",
        expected="pledged_quantity 0 for every asset",
        got=still,
    )


@REGISTRY.case(
    "emergency/regulator-custodian-executed-after-wait",
    Level.MUST,
    "regulator + custodian without the exchange (EXCHANGE_FAILURE): one second before "
    "exchange_unresponsive_since + emergency_release_wait (48 h) the release is refused, "
    "FAILED_PRECONDITION STATE_CONFLICT, changing nothing; at it the same release is executed: "
    "a receipt, and the account's next holdings statement says RELEASE and pledges nothing (§11.3)",
    roles=_CUSTODIAN,
    clauses=("§11/release-wait",),
)
async def regulator_custodian_after_wait(ctx: CaseContext) -> None:
    regulator, _ = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    now = await ctx.advance_clock(timedelta(0))  # skips the case without test control
    allowed_at = now + _COSIGN_LEAD
    release = _release(ctx, account_id)
    release.reason = emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE
    release.exchange_unresponsive_since.FromDatetime(allowed_at - _RELEASE_WAIT)
    _, signed = await _cosigned(ctx, release)
    cosigned_at = await ctx.server_now()
    check(
        cosigned_at < allowed_at - _SECOND,
        "CoSignEmergencyRelease took too long for the kit to try the release before its wait ends",
        expected=f"an answer within {(_COSIGN_LEAD - _SECOND).total_seconds():.0f} s",
        got=f"{(cosigned_at - now).total_seconds():.1f} s",
    )
    # One second before the wait has passed: refused, nothing changed.
    await ctx.advance_clock(allowed_at - _SECOND - cosigned_at)
    await _refused(ctx, signed, grpc.StatusCode.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    # At the end of the wait: the same release is executed.
    await ctx.advance_clock(max(allowed_at - await ctx.server_now(), timedelta(0)))
    outcome = await ctx.rpc(
        ctx.custodian.execute_emergency_release,
        custodian_service_pb2.ExecuteEmergencyReleaseRequest(emergency_release=signed),
        label="ExecuteEmergencyRelease",
    )
    response: custodian_service_pb2.ExecuteEmergencyReleaseResponse = expect_ok(outcome)
    receipt = sdk_check(
        "the emergency release receipt",
        verify_statement,
        response.emergency_release_receipt,
        ctx.registry,
        expected_type=emergency_pb2.EmergencyReleaseReceipt,
        audience=regulator.party_id,
        now=await ctx.server_now(),
    )
    check_equal("release_id of the receipt", release.release_id, receipt.message.release_id)
    check_equal(
        "the release the receipt says was executed",
        signed.SerializeToString(),
        receipt.message.release.SerializeToString(),
    )
    await _expect_released(ctx, account_id)
    # Leave the account pledged again, as the cases after this one expect.
    await ensure_pledged(ctx)


@REGISTRY.case(
    "emergency/two-of-three-executed",
    Level.MUST,
    "a regulator+exchange release is executed: a signed receipt, and the account pledges nothing after",
    roles=_CUSTODIAN,
)
async def two_of_three_executed(ctx: CaseContext) -> None:
    regulator, exchange = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    release = _release(ctx, account_id)
    envelope = await ctx.sign(release, regulator, extra_signers=[exchange])
    outcome = await ctx.rpc(
        ctx.custodian.execute_emergency_release,
        custodian_service_pb2.ExecuteEmergencyReleaseRequest(emergency_release=envelope),
        label="ExecuteEmergencyRelease",
    )
    response: custodian_service_pb2.ExecuteEmergencyReleaseResponse = expect_ok(outcome)
    now = await ctx.server_now()
    # The receipt is for the release's parties: the kit reads it as the regulator.
    receipt = sdk_check(
        "the emergency release receipt",
        verify_statement,
        response.emergency_release_receipt,
        ctx.registry,
        expected_type=emergency_pb2.EmergencyReleaseReceipt,
        audience=regulator.party_id,
        now=now,
    )
    check_equal("issuer of the receipt", ctx.server_party_id, receipt.issuer)
    check_equal("release_id of the receipt", release.release_id, receipt.message.release_id)
    check_equal("account_id of the receipt", account_id, receipt.message.account_id)
    check_equal(
        "the release the receipt says was executed",
        envelope.SerializeToString(),
        receipt.message.release.SerializeToString(),
    )
    await _expect_released(ctx, account_id)
    # Leave the account pledged again, as the cases after this one expect.
    await ensure_pledged(ctx)


# ------------------------------------------------------------------ repeats and reused ids (§12.4)


async def _execute(ctx: CaseContext, envelope: envelope_pb2.Envelope, label: str) -> Outcome:
    return await ctx.rpc(
        ctx.custodian.execute_emergency_release,
        custodian_service_pb2.ExecuteEmergencyReleaseRequest(emergency_release=envelope),
        label=label,
    )


async def _executed(
    ctx: CaseContext, release: emergency_pb2.EmergencyRelease
) -> tuple[envelope_pb2.Envelope, envelope_pb2.Envelope]:
    """A regulator+exchange release of ``release``, executed; and its receipt."""
    regulator, exchange = _signers(ctx)
    envelope = await ctx.sign(release, regulator, extra_signers=[exchange])
    response: custodian_service_pb2.ExecuteEmergencyReleaseResponse = expect_ok(
        await _execute(ctx, envelope, "ExecuteEmergencyRelease")
    )
    return envelope, response.emergency_release_receipt


@REGISTRY.case(
    "emergency/repeat-returns-same-receipt",
    Level.MUST,
    "an executed release sent again, the same envelope, returns the identical receipt, byte for "
    "byte — not REPLAYED, not executed twice — and changes nothing (§11 step 4, §12.4)",
    roles=_CUSTODIAN,
    clauses=("§12.4/repeat-answered-from-record",),
)
async def repeat_returns_same_receipt(ctx: CaseContext) -> None:
    account_id = await ensure_pledged(ctx)
    envelope, receipt = await _executed(ctx, _release(ctx, account_id))
    before = await custodian_state(ctx)
    response: custodian_service_pb2.ExecuteEmergencyReleaseResponse = expect_ok(
        await _execute(ctx, envelope, "ExecuteEmergencyRelease (the same release again)")
    )
    first = receipt.SerializeToString(deterministic=True)
    again = response.emergency_release_receipt.SerializeToString(deterministic=True)
    check(
        again == first,
        "the repeat did not return the receipt of the executed release, byte for byte",
        expected=f"sha256 {hashlib.sha256(first).hexdigest()[:16]}: {describe(receipt)}",
        got=f"sha256 {hashlib.sha256(again).hexdigest()[:16]}: "
        f"{describe(response.emergency_release_receipt)}",
    )
    await expect_unchanged(ctx, before)
    # Leave the account pledged again, as the cases after this one expect.
    await ensure_pledged(ctx)


@REGISTRY.case(
    "emergency/reused-id-refused",
    Level.MUST,
    "after a release is executed and the account pledged again, another release under its "
    "release_id — the same fields, signed anew by the regulator and the exchange, so other "
    "payload bytes, under a fresh sequence, the executed release's own and sequence 1 — is "
    "refused: FAILED_PRECONDITION STATE_CONFLICT, field release_id, and changes nothing: the "
    "new pledge stays (§11 step 4, §12.4 steps 3, 4)",
    roles=_CUSTODIAN,
    clauses=("§12.4/reused-id-refused",),
)
async def reused_id_refused(ctx: CaseContext) -> None:
    regulator, exchange = _signers(ctx)
    account_id = await ensure_pledged(ctx)
    release = _release(ctx, account_id)
    executed, _ = await _executed(ctx, release)
    await ensure_pledged(ctx)
    used = emergency_pb2.EmergencyRelease.FromString(executed.payload).header.sequence
    # Under a fresh sequence, the executed release's own and sequence 1: other bytes sorting
    # after and before the recorded ones, all refused for the id alone (§12.4 steps 3, 4).
    for label, sequence in (
        ("a fresh sequence", None),
        (f"sequence {used}", used),
        ("sequence 1", 1),
    ):
        reused = await ctx.sign(release, regulator, extra_signers=[exchange], sequence=sequence)
        before = await custodian_state(ctx)
        expect_status(
            await _execute(
                ctx, reused, f"ExecuteEmergencyRelease (another under a used release_id, {label})"
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            _R.ERROR_REASON_STATE_CONFLICT,
            metadata_field="release_id",
        )
        await expect_unchanged(ctx, before)
