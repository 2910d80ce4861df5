"""Pledge release: part of a pledge given back on the client's request and the exchange's consent (§5.9).

The kit plays both signers: the account's client signs the request, the
kit's exchange the consent, judged on the account's latest holdings statement
with the kit's own policy and prices (the figures recomputed by the SDK, as a
correct exchange would state them). Quantities are uneven, two assets are
pledged where the account has two, and every rule is tried on both sides:
exactly the pledge is released and one quantum more is refused; the latest
holdings are accepted and the epoch before refused; the account's client and
exchange are obeyed and another client or exchange refused. What is released
is pledgeable again, and the cases pledge it back, leaving the account's
pledge as they found it for the cases after them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import grpc
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.signing import verify_statement
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    pledge_release_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseSkipped,
    Outcome,
    check,
    check_equal,
    expect_ok,
    expect_status,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._kit_account import (
    QUANTUM,
    client_key,
    exchange_party,
    holdings,
    position_figures,
)
from collateral_sync_conformance.cases._release import (
    ConsentHeader,
    PledgedAccount,
    consent_header,
    pledge_back,
    pledged_account,
    release_consent,
)
from collateral_sync_conformance.cases._snapshots import custodian_state, expect_unchanged

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_C = grpc.StatusCode
_REASON = attestation_pb2.HoldingsChangeReason
_ROLE = common_pb2.PartyRole
#: An uneven part of a pledge, so a rule applied to the wrong quantity cannot pass by chance.
_PART = Decimal("0.000317000000000009")


async def _release(ctx: CaseContext, consent: envelope_pb2.Envelope, label: str) -> Outcome:
    return await ctx.rpc(
        ctx.custodian.release_pledge,
        custodian_service_pb2.ReleasePledgeRequest(consent=consent),
        label=label,
    )


async def _released(
    ctx: CaseContext, account: PledgedAccount, consent: envelope_pb2.Envelope, label: str
) -> tuple[attestation_pb2.HoldingsStatement, pledge_release_pb2.PledgeReleaseReceipt]:
    """Execute ``consent`` (it must be accepted); the new statement and receipt, both verified."""
    response: custodian_service_pb2.ReleasePledgeResponse = expect_ok(
        await _release(ctx, consent, label)
    )
    now = await ctx.server_now()
    statement = sdk_check(
        "the holdings statement ReleasePledge returned",
        verify_statement,
        response.holdings_statement,
        ctx.registry,
        expected_type=attestation_pb2.HoldingsStatement,
        audience=client_key(ctx).party_id,
        now=now,
    )
    receipt = sdk_check(
        "the receipt ReleasePledge returned",
        verify_statement,
        response.receipt,
        ctx.registry,
        expected_type=pledge_release_pb2.PledgeReleaseReceipt,
        audience=exchange_party(ctx),
        now=now,
    )
    check_equal("issuer of the receipt", ctx.server_party_id, receipt.issuer)
    check_equal("issuer of the holdings statement", ctx.server_party_id, statement.issuer)
    check_equal(
        "account of the holdings statement", account.account_id, statement.message.account_id
    )
    check_equal(
        "reason of the release's holdings statement",
        _REASON.Name(_REASON.HOLDINGS_CHANGE_REASON_PLEDGE_RELEASE),
        _REASON.Name(statement.message.reason),
    )
    check_equal(
        "epoch of the release's holdings statement",
        account.statement.epoch + 1,
        statement.message.epoch,
    )
    check_equal(
        "the receipt's consent",
        consent.SerializeToString(),
        receipt.message.consent.SerializeToString(),
    )
    latest, _, ref = await holdings(ctx, account.account_id)
    check_equal("the account's latest statement after the release", statement.message, latest)
    check_equal(
        "the receipt's holdings reference", ref.leaf_hash, receipt.message.holdings.leaf_hash
    )
    return statement.message, receipt.message


def _check_moved(
    before: attestation_pb2.HoldingsStatement,
    after: attestation_pb2.HoldingsStatement,
    released: dict[str, Decimal],
) -> None:
    """Each released asset's pledge fell by exactly its quantity; nothing else moved (§5.9)."""
    assets = sorted({p.asset_id for p in before.positions} | {p.asset_id for p in after.positions})
    for asset_id in assets:
        quantity, locked, pledged = position_figures(before, asset_id)
        expected = (
            quantity,
            locked,
            format_amount(parse_amount(pledged) - released.get(asset_id, Decimal(0))),
        )
        check_equal(
            f"(quantity, locked, pledged) of {asset_id} after the release",
            expected,
            tuple(format_amount(parse_amount(text)) for text in position_figures(after, asset_id)),
        )


@REGISTRY.case(
    "pledge-release/executed-within-pledge",
    Level.MUST,
    "a release of an uneven part of each pledged asset (the client's request, the exchange's "
    "consent judged on the latest holdings) lowers each pledge by exactly its quantity and moves "
    "nothing else, in a holdings statement of reason PLEDGE_RELEASE and a verified receipt; a "
    "release of one quantum more than an asset's remaining pledge is refused FAILED_PRECONDITION "
    "STATE_CONFLICT and changes nothing; a release of exactly the remaining pledge is accepted, "
    "and what was released can be pledged again (§5.8, §5.9)",
    roles=_CUSTODIAN,
    clauses=(
        "§5.9/release-within-pledge",
        "§5.9/release-moves-pledge-only",
    ),
)
async def executed_within_pledge(ctx: CaseContext) -> None:
    account = await pledged_account(ctx)
    parts = {asset_id: min(_PART, pledged / 3) for asset_id, pledged in account.pledged.items()}
    consent = await release_consent(
        ctx, account, [(asset_id, format_amount(part)) for asset_id, part in sorted(parts.items())]
    )
    after, receipt = await _released(
        ctx, account, consent, f"ReleasePledge of {len(parts)} uneven part(s)"
    )
    _check_moved(account.statement, after, parts)
    check(
        bool(receipt.release_id),
        "the receipt carries no release_id",
        expected="the request's release_id",
        got="''",
    )

    account = await pledged_account(ctx)
    asset_id, remaining = sorted(account.pledged.items())[0]
    before = await custodian_state(ctx)
    over = format_amount(remaining + Decimal(QUANTUM))
    outcome = await _release(
        ctx,
        await release_consent(ctx, account, [(asset_id, over)]),
        f"ReleasePledge of {over} {asset_id}, one quantum more than its pledge {remaining}",
    )
    expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    await expect_unchanged(ctx, before)

    consent = await release_consent(ctx, account, [(asset_id, format_amount(remaining))])
    after, _ = await _released(
        ctx, account, consent, f"ReleasePledge of exactly the {remaining} {asset_id} pledged"
    )
    _check_moved(account.statement, after, {asset_id: remaining})
    await pledge_back(ctx, account.account_id, asset_id, remaining)


@REGISTRY.case(
    "pledge-release/judged-on-latest-holdings",
    Level.MUST,
    "a consent judged on the account's holdings statement of the epoch before the latest is "
    "refused FAILED_PRECONDITION STATE_CONFLICT (metadata: the latest epoch expected, the one "
    "judged actual) and changes nothing, as are consents citing the latest and the one before, "
    "none, or undecodable bytes; the same release judged on the latest is executed (§5.9)",
    roles=_CUSTODIAN,
    clauses=(
        "§5.9/release-on-latest-holdings",
        "§5.9/release-moves-pledge-only",
    ),
)
async def judged_on_latest_holdings(ctx: CaseContext) -> None:
    account = await pledged_account(ctx)
    asset_id = sorted(account.pledged)[0]
    # A change of the account (a top-up), so that the statement the exchange judged is not the latest.
    await pledge_back(ctx, account.account_id, asset_id, Decimal(QUANTUM))
    older = account.envelope
    account = await pledged_account(ctx)
    check(
        account.statement.epoch > attestation_pb2.HoldingsStatement.FromString(older.payload).epoch,
        "a pledge did not give the account a new holdings statement",
        expected="a later epoch",
        got=account.statement.epoch,
    )
    quantity = format_amount(min(_PART, account.pledged[asset_id] / 3))
    older_epoch = attestation_pb2.HoldingsStatement.FromString(older.payload).epoch
    before = await custodian_state(ctx)
    outcome = await _release(
        ctx,
        await release_consent(ctx, account, [(asset_id, quantity)], judged=older),
        "ReleasePledge judged on the account's previous holdings statement",
    )
    expect_status(
        outcome,
        _C.FAILED_PRECONDITION,
        _R.ERROR_REASON_STATE_CONFLICT,
        metadata_field="inputs.holdings_statements",
    )
    info = outcome.error_info
    metadata = dict(info.metadata) if info is not None else {}
    check_equal(
        "the refusal's metadata (expected: the latest epoch, actual: the epoch judged)",
        (str(account.statement.epoch), str(older_epoch)),
        (metadata.get("expected"), metadata.get("actual")),
    )
    await expect_unchanged(ctx, before)
    outcome = await _release(
        ctx,
        await release_consent(ctx, account, [(asset_id, quantity)], also_judged=[older]),
        "ReleasePledge judged on the latest holdings statement and the one before",
    )
    expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
    await expect_unchanged(ctx, before)
    undecodable = envelope_pb2.Envelope()
    undecodable.CopyFrom(account.envelope)
    undecodable.payload = b"\xff" + account.envelope.payload
    for what, cited in (
        ("no holdings statement", []),
        ("an undecodable holdings statement", [undecodable]),
    ):
        outcome = await _release(
            ctx,
            await release_consent(ctx, account, [(asset_id, quantity)], cited=cited),
            f"ReleasePledge whose consent cites {what}",
        )
        expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
        await expect_unchanged(ctx, before)
    after, _ = await _released(
        ctx,
        account,
        await release_consent(ctx, account, [(asset_id, quantity)]),
        "the same release judged on the latest holdings statement",
    )
    _check_moved(account.statement, after, {asset_id: parse_amount(quantity)})
    await pledge_back(ctx, account.account_id, asset_id, parse_amount(quantity))


@REGISTRY.case(
    "pledge-release/only-the-account-parties",
    Level.MUST,
    "a release requested by another registered client, consented by another registered "
    "exchange, or whose request names another exchange than the consenting one is refused "
    "PERMISSION_DENIED KEY_ROLE_MISMATCH and changes nothing (§5.9); the account's own client "
    "and exchange are obeyed (pledge-release/executed-within-pledge)",
    roles=_CUSTODIAN,
    clauses=("§5.9/release-by-account-parties",),
)
async def only_the_account_parties(ctx: CaseContext) -> None:
    account = await pledged_account(ctx)
    asset_id = sorted(account.pledged)[0]
    quantity = format_amount(min(_PART, account.pledged[asset_id] / 3))
    own_client = client_key(ctx).party_id
    own_exchange = exchange_party(ctx)
    other_clients = [
        k
        for k in ctx.config.kit_keys
        if k.role == _ROLE.PARTY_ROLE_CLIENT and k.party_id != own_client
    ]
    other_exchanges = [
        k
        for k in ctx.config.kit_keys
        if k.role == _ROLE.PARTY_ROLE_EXCHANGE and k.party_id != own_exchange
    ]
    if not other_clients and not other_exchanges:
        raise CaseSkipped("needs a --kit-key of a second client or a second exchange party")
    attempts: list[tuple[str, envelope_pb2.Envelope]] = []
    for key in other_clients[:1]:
        attempts.append(
            (
                f"ReleasePledge requested by another client {key.party_id!r}",
                await release_consent(ctx, account, [(asset_id, quantity)], client=key),
            )
        )
    for key in other_exchanges[:1]:
        attempts.append(
            (
                f"ReleasePledge consented by another exchange {key.party_id!r}",
                await release_consent(
                    ctx,
                    account,
                    [(asset_id, quantity)],
                    exchange=key,
                    request_exchange_id=key.party_id,
                ),
            )
        )
        attempts.append(
            (
                f"ReleasePledge whose request names {key.party_id!r}, consented by {own_exchange!r}",
                await release_consent(
                    ctx, account, [(asset_id, quantity)], request_exchange_id=key.party_id
                ),
            )
        )
    for label, consent in attempts:
        before = await custodian_state(ctx)
        outcome = await _release(ctx, consent, label)
        expect_status(outcome, _C.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH)
        await expect_unchanged(ctx, before)


@REGISTRY.case(
    "pledge-release/repeat-answered-reused-id-refused",
    Level.MUST,
    "the same consent sent again is answered with the same receipt and holdings statement, byte "
    "for byte, and releases "
    "nothing twice; another consent under the used release_id is refused FAILED_PRECONDITION "
    "STATE_CONFLICT and changes nothing (§5.9, §12.4)",
    roles=_CUSTODIAN,
)
async def repeat_answered(ctx: CaseContext) -> None:
    account = await pledged_account(ctx)
    asset_id = sorted(account.pledged)[0]
    quantity = min(_PART, account.pledged[asset_id] / 3)
    release_id = ctx.unique("conformance-release")
    consent = await release_consent(
        ctx, account, [(asset_id, format_amount(quantity))], release_id=release_id
    )
    first: custodian_service_pb2.ReleasePledgeResponse = expect_ok(
        await _release(ctx, consent, "ReleasePledge")
    )
    before = await custodian_state(ctx)
    again: custodian_service_pb2.ReleasePledgeResponse = expect_ok(
        await _release(ctx, consent, "the same ReleasePledge again")
    )
    check_equal(
        "the receipt and holdings statement of the repeat",
        (first.receipt.SerializeToString(), first.holdings_statement.SerializeToString()),
        (again.receipt.SerializeToString(), again.holdings_statement.SerializeToString()),
    )
    await expect_unchanged(ctx, before)
    moved = await pledged_account(ctx)
    # Other consents under the used id: a fresh one, and two with the executed one's very
    # header but a statement id sorting before and after it (so that comparing the payloads
    # by order rather than for equality lets one through). The id is checked before the
    # replay guard (§12.4): the reused sequence is not what refuses them.
    executed = consent_header(consent)
    others = [
        ("a fresh consent", None),
        *(
            (
                f"the executed consent's header with statement id {edge}",
                ConsentHeader(
                    executed.sequence,
                    executed.issued_at,
                    executed.expires_at,
                    edge + executed.statement_id[1:],
                ),
            )
            for edge in ("0", "~")
        ),
    ]
    for what, header in others:
        other = await release_consent(
            ctx, moved, [(asset_id, QUANTUM)], release_id=release_id, header=header
        )
        outcome = await _release(ctx, other, f"{what} under the used release_id {release_id!r}")
        expect_status(outcome, _C.FAILED_PRECONDITION, _R.ERROR_REASON_STATE_CONFLICT)
        await expect_unchanged(ctx, before)
    await pledge_back(ctx, moved.account_id, asset_id, quantity)


@REGISTRY.case(
    "pledge-release/malformed-refused",
    Level.MUST,
    "a release of 0, of a negative or non-canonical quantity, of one asset twice, or of "
    "nothing is refused INVALID_ARGUMENT (INVALID_AMOUNT or MALFORMED), and a consent whose "
    "client request does not verify is refused SIGNATURE_INVALID; none changes anything (§5.9)",
    roles=_CUSTODIAN,
    clauses=("§5.9/release-consent-verified",),
)
async def malformed_refused(ctx: CaseContext) -> None:
    account = await pledged_account(ctx)
    asset_id = sorted(account.pledged)[0]
    unit = format_amount(min(_PART, account.pledged[asset_id] / 3))
    cases: list[tuple[str, list[tuple[str, str]], int]] = [
        ("a quantity of 0", [(asset_id, "0")], _R.ERROR_REASON_INVALID_AMOUNT),
        ("a negative quantity", [(asset_id, f"-{unit}")], _R.ERROR_REASON_INVALID_AMOUNT),
        ("a non-canonical quantity", [(asset_id, f"{unit}0")], _R.ERROR_REASON_INVALID_AMOUNT),
        ("one asset twice", [(asset_id, unit), (asset_id, unit)], _R.ERROR_REASON_MALFORMED),
        ("no release at all", [], _R.ERROR_REASON_MALFORMED),
    ]
    for what, releases, reason in cases:
        before = await custodian_state(ctx)
        outcome = await _release(
            ctx, await release_consent(ctx, account, releases), f"ReleasePledge of {what}"
        )
        expect_status(outcome, _C.INVALID_ARGUMENT, reason)
        await expect_unchanged(ctx, before)
    consent = await release_consent(ctx, account, [(asset_id, unit)])
    message = pledge_release_pb2.PledgeReleaseConsent.FromString(consent.payload)
    tampered = bytearray(message.request.signatures[0].sig)
    tampered[0] ^= 1
    message.request.signatures[0].sig = bytes(tampered)
    resigned = await ctx.sign(
        message,
        ctx.key(_ROLE.PARTY_ROLE_EXCHANGE),
        audience=[ctx.server_party_id, client_key(ctx).party_id],
        issued_at=_issued_at(consent),
    )
    before = await custodian_state(ctx)
    outcome = await _release(
        ctx, resigned, "ReleasePledge whose client request's signature is broken"
    )
    expect_status(outcome, _C.UNAUTHENTICATED, _R.ERROR_REASON_SIGNATURE_INVALID)
    await expect_unchanged(ctx, before)


def _issued_at(envelope: envelope_pb2.Envelope) -> datetime:
    message = pledge_release_pb2.PledgeReleaseConsent.FromString(envelope.payload)
    return message.header.issued_at.ToDatetime(tzinfo=UTC)
