"""Position sync, the exchange's side (docs/PROTOCOL.md §6): the kit is the custodian it dials.

Each case takes the stream from the kit's session (the exchange's current call
ends; it re-dials, §6.7) and drives the next call frame by frame: it reads the
exchange's hello, answers with the kit's own, and sends batches a correct
custodian would — or a gap, a forged or wrong-role batch, an equivocation —
judging the exchange by its acknowledgements, its SyncClose and its next
hello. Entries the kit sends for real are appended to its durable log first,
so the session, which takes over again after the case, continues one history.

Equivocation comes last: an exchange refuses to resume with a custodian whose
history it has seen fork (§6.5), so nothing can follow it in a run but the
case that reads, as a regulator, the evidence the exchange kept of it
(§10.7), which needs no stream.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from collateral_sync.amounts import parse_amount
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    EXCHANGE_TO_CUSTODIAN,
    ZERO_HASH,
    LogHead,
    entry_hash,
    verify_sync_batch,
)
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    errors_pb2,
    position_sync_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._counterpart import (
    KitCustodian,
    RawStream,
    credit_line_of,
    relies_on,
)
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    describe,
    sdk_check,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._evidence import KIND, sync_batch_pair, wait_for_evidence
from collateral_sync_conformance.cases._held_stream import held_stream

__all__: list[str] = []

_EXCHANGE = [Role.EXCHANGE]
_R = errors_pb2.ErrorReason
#: How long the kit waits for a frame it expects.
_FRAME_TIMEOUT = 5.0
#: How long the exchange may take to prove and credit an account (and say so on the stream).
_CREDIT_TIMEOUT = 20.0
#: How long the kit watches for a batch the window does not allow.
_QUIET = 1.0
#: How long a stream the kit will make the exchange refuse stays up first.
_STEADY_SECONDS = 2.2


def _batch(
    kit: KitCustodian,
    first_sequence: int,
    prev_entry_hash: bytes,
    updates: list[bytes],
) -> tuple[envelope_pb2.Envelope, list[bytes]]:
    """A custodian-to-exchange batch chained from ``prev_entry_hash``, signed by the kit."""
    batch = position_sync_pb2.SyncBatch(direction=CUSTODIAN_TO_EXCHANGE)  # type: ignore[arg-type]
    hashes = []
    prev = prev_entry_hash
    for i, update in enumerate(updates):
        sequence = first_sequence + i
        hash_ = entry_hash(CUSTODIAN_TO_EXCHANGE, sequence, prev, update)
        batch.entries.add(sequence=sequence, prev_entry_hash=prev, update=update, entry_hash=hash_)
        hashes.append(hash_)
        prev = hash_
    last = first_sequence + len(updates) - 1
    return kit.sign(batch, sequence=last), hashes


def _fresh_update(ctx: CaseContext, kit: KitCustodian) -> bytes:
    """A harmless custodian update: a proven holdings statement of a throwaway account."""
    change, _ = kit.holdings_change(
        ctx.unique("kit-sync"),
        ctx.key(common_pb2.PARTY_ROLE_CLIENT),
        {"USDC": "1"},
        epoch=1,
    )
    return position_sync_pb2.PositionUpdate(holdings_change=change).SerializeToString()


def _logged(kit: KitCustodian, update: bytes) -> tuple[int, bytes, bytes]:
    """Append ``update`` to the kit's durable log; its (sequence, prev hash, hash)."""
    before = kit.sync_log.sent_head()
    head = kit.announce(position_sync_pb2.PositionUpdate.FromString(update))
    return head.sequence, before.entry_hash, head.entry_hash


async def _expect_ack(stream: RawStream, sequence: int, hash_: bytes) -> None:
    frame = await stream.frame_of(("ack", "close"), _FRAME_TIMEOUT)
    check(
        frame is not None and frame.WhichOneof("frame") == "ack",
        "the exchange did not acknowledge the kit's batch (§6.5 step 7)",
        expected=f"SyncAck(sequence={sequence})",
        got=describe(frame) if frame is not None else "no ack",
    )
    assert frame is not None
    check_equal("acknowledged sequence", sequence, frame.ack.sequence)
    check_equal("acknowledged entry hash", hash_.hex(), frame.ack.entry_hash.hex())


async def _expect_close(
    stream: RawStream, reason: errors_pb2.ErrorReason.ValueType, rule: str
) -> None:
    frame = await stream.frame_of(("ack", "close"), _FRAME_TIMEOUT)
    check(
        frame is not None and frame.WhichOneof("frame") == "close",
        f"the exchange did not refuse {rule} with a SyncClose (§6.7a)",
        expected=f"SyncClose({_R.Name(reason)})",
        got=describe(frame) if frame is not None else "nothing",
    )
    assert frame is not None
    check_equal("SyncClose reason", _R.Name(reason), _R.Name(frame.close.reason))
    ended = await stream.next_frame(_FRAME_TIMEOUT)
    check(
        ended is None,
        "after its SyncClose the exchange must end the stream (§6.7a)",
        expected="the call ended",
        got=describe(ended) if ended is not None else "",
    )


async def _head_unchanged(ctx: CaseContext, kit: KitCustodian, sequence: int, hash_: bytes) -> None:
    """The exchange's next hello still says it holds the kit's log up to ``sequence``."""
    async with held_stream(ctx, kit) as stream:
        check_equal(
            "received_sequence in the exchange's next hello (the refused batch stored nothing)",
            sequence,
            stream.hello.received_sequence,
        )
        check_equal(
            "received_entry_hash in the exchange's next hello",
            hash_.hex(),
            stream.hello.received_entry_hash.hex(),
        )


@REGISTRY.case(
    "sync/exchange/hello-valid",
    Level.MUST,
    "the exchange dials with a hello naming itself, direction 2, a window ≥ 1, and the head of "
    "the custodian's log it holds, which the custodian's log contains (§6.2)",
    roles=_EXCHANGE,
    clauses=("§6.2/hello-party-is-tls-cn",),
)
async def hello_valid(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    async with held_stream(ctx, kit) as stream:
        hello = stream.hello
        check_equal("party_id of the exchange's hello", kit.exchange_id, hello.party_id)
        check_equal("sending_direction of the exchange's hello", 2, int(hello.sending_direction))
        check(
            hello.window >= 1, "the exchange's window is 0", expected=">= 1", got=str(hello.window)
        )
        sent = kit.sync_log.sent_head()
        check(
            hello.received_sequence <= sent.sequence,
            "the exchange claims entries of the custodian's log the custodian never wrote",
            expected=f"<= {sent.sequence}",
            got=str(hello.received_sequence),
        )
        expected = (
            ZERO_HASH
            if hello.received_sequence == 0
            else kit.sync_log.outgoing_hash(hello.received_sequence)
        )
        assert expected is not None
        check_equal(
            "received_entry_hash of the exchange's hello",
            expected.hex(),
            hello.received_entry_hash.hex(),
        )


@REGISTRY.case(
    "sync/exchange/batch-acked-and-resumed",
    Level.MUST,
    "the exchange acknowledges a batch with its last sequence and hash, and after a disconnect "
    "its hello resumes from exactly there (§6.2, §6.6)",
    roles=_EXCHANGE,
)
async def batch_acked_and_resumed(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    async with held_stream(ctx, kit) as stream:
        for _ in range(3):
            _logged(kit, _fresh_update(ctx, kit))
        # Everything after what the exchange holds: the three new entries, and any
        # the session had not yet had acknowledged.
        await _send_from_held(kit, stream)
    head = kit.sync_log.sent_head()
    await _head_unchanged(ctx, kit, head.sequence, head.entry_hash)


@REGISTRY.case(
    "sync/exchange/duplicate-entries-skipped",
    Level.MUST,
    "a batch repeating the last acknowledged entry before a new one is applied once: the "
    "duplicate is skipped, the new entry acknowledged (§6.5 step 3)",
    roles=_EXCHANGE,
)
async def duplicate_entries_skipped(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    async with held_stream(ctx, kit) as stream:
        last = stream.hello.received_sequence
        stored = kit.sync_log.outgoing_entry(last) if last else None
        if stored is None:
            raise CaseFailure(
                "the exchange holds none of the kit's log to repeat",
                expected="received_sequence >= 1",
                got=str(last),
            )
        sequence, _, new_hash = _logged(kit, _fresh_update(ctx, kit))
        # The repeated entry, then everything after it (what the session had not
        # yet had acknowledged, and the new entry).
        entries = [kit.sync_log.outgoing_entry(s) for s in range(last, sequence + 1)]
        envelope, hashes = _batch(
            kit, last, stored.prev_entry_hash, [e.update for e in entries if e is not None]
        )
        check_equal("kit's own chain", new_hash.hex(), hashes[-1].hex())
        await stream.send(position_sync_pb2.SyncFrame(batch=envelope))
        await _expect_ack(stream, sequence, new_hash)


@REGISTRY.case(
    "sync/exchange/window-respected",
    Level.SHOULD,
    "the exchange never has more of its entries unacknowledged than the window the custodian "
    "declared (here 1) (§6.6)",
    roles=_EXCHANGE,
)
async def window_respected(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    async with held_stream(ctx, kit, window=1) as stream:
        # Two fresh accounts for the exchange to credit: each credit is an entry of its
        # log to the custodian (a CreditLine), after anything not yet acknowledged.
        for _ in range(2):
            _logged(kit, _fresh_update(ctx, kit))
        # Its ack is not waited for: reading up to it would pass over its batches.
        await _send_from_held(kit, stream, expect_ack=False)
        seen = 0
        while seen < 2:
            frame = await stream.frame_of(("batch",), _CREDIT_TIMEOUT)
            if frame is None:
                if seen == 0:
                    kinds = [f.WhichOneof("frame") for f in stream.frames]
                    raise CaseSkipped(
                        f"the exchange sent the custodian nothing to pace within "
                        f"{_CREDIT_TIMEOUT:.0f} s of two new accounts (frames: {kinds})"
                    )
                break
            verified = sdk_check(
                "a sync batch from the exchange",
                verify_sync_batch,
                frame.batch,
                kit.registry,
                receiver_party_id=kit.party_id,
                sender_party_id=kit.exchange_id,
                direction=EXCHANGE_TO_CUSTODIAN,
                now=kit.now(),
                max_entries=2**32 - 1,
            )
            check(
                len(verified.updates) <= 1,
                "a batch larger than the custodian's window",
                expected="at most 1 entry",
                got=len(verified.updates),
            )
            extra = await stream.frame_of(("batch",), _QUIET)
            check(
                extra is None,
                "a second batch before the first was acknowledged (window 1)",
                expected="no batch until the ack",
                got=describe(extra) if extra is not None else "",
            )
            seen += 1
            ack = position_sync_pb2.SyncAck(
                sequence=verified.last_sequence, entry_hash=verified.last_entry_hash
            )
            await stream.send(position_sync_pb2.SyncFrame(ack=ack))


async def _send_from_held(kit: KitCustodian, stream: RawStream, *, expect_ack: bool = True) -> None:
    """Send the kit's log from the exchange's received head to its end (and expect the ack)."""
    held = stream.hello.received_sequence
    head = kit.sync_log.sent_head()
    entries = [kit.sync_log.outgoing_entry(s) for s in range(held + 1, head.sequence + 1)]
    envelope, _ = _batch(
        kit, held + 1, stream.hello.received_entry_hash, [e.update for e in entries if e]
    )
    await stream.send(position_sync_pb2.SyncFrame(batch=envelope))
    if expect_ack:
        await _expect_ack(stream, head.sequence, head.entry_hash)


@REGISTRY.case(
    "sync/exchange/sequence-gap-refused",
    Level.MUST,
    "a batch starting beyond the next sequence is refused: SyncClose SEQUENCE_GAP, and the "
    "exchange's next hello shows nothing stored (§6.5 step 4)",
    roles=_EXCHANGE,
)
async def sequence_gap_refused(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    async with held_stream(ctx, kit) as stream:
        held = stream.hello.received_sequence
        held_hash = stream.hello.received_entry_hash
        envelope, _ = _batch(kit, held + 2, bytes(32), [_fresh_update(ctx, kit)])
        await stream.send(position_sync_pb2.SyncFrame(batch=envelope))
        await _expect_close(stream, _R.ERROR_REASON_SEQUENCE_GAP, "a sequence gap")
    await _head_unchanged(ctx, kit, held, held_hash)


@REGISTRY.case(
    "sync/exchange/forged-batch-refused",
    Level.MUST,
    "a batch whose signature does not verify is refused: SyncClose SIGNATURE_INVALID, nothing "
    "stored (§6.5 step 1)",
    roles=_EXCHANGE,
)
async def forged_batch_refused(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    async with held_stream(ctx, kit) as stream:
        held = stream.hello.received_sequence
        held_hash = stream.hello.received_entry_hash
        envelope, _ = _batch(kit, held + 1, held_hash, [_fresh_update(ctx, kit)])
        signature = bytearray(envelope.signatures[0].sig)
        signature[0] ^= 0x01
        envelope.signatures[0].sig = bytes(signature)
        await stream.send(position_sync_pb2.SyncFrame(batch=envelope))
        await _expect_close(stream, _R.ERROR_REASON_SIGNATURE_INVALID, "a forged batch")
    await _head_unchanged(ctx, kit, held, held_hash)


@REGISTRY.case(
    "sync/exchange/wrong-role-batch-refused",
    Level.MUST,
    "a custodian-to-exchange batch signed by a client key is refused: SyncClose "
    "KEY_ROLE_MISMATCH, nothing stored (§6.5 step 1)",
    roles=_EXCHANGE,
)
async def wrong_role_batch_refused(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    async with held_stream(ctx, kit) as stream:
        held = stream.hello.received_sequence
        held_hash = stream.hello.received_entry_hash
        # Forged with the kit's own tools: the SDK would refuse to sign it.
        update = _fresh_update(ctx, kit)
        hash_ = entry_hash(CUSTODIAN_TO_EXCHANGE, held + 1, held_hash, update)
        batch = position_sync_pb2.SyncBatch(direction=CUSTODIAN_TO_EXCHANGE)  # type: ignore[arg-type]
        batch.entries.add(
            sequence=held + 1, prev_entry_hash=held_hash, update=update, entry_hash=hash_
        )
        envelope = await ctx.sign(
            batch,
            ctx.key(common_pb2.PARTY_ROLE_CLIENT),
            audience=[kit.exchange_id],
            sequence=held + 1,
            issued_at=kit.now(),
        )
        await stream.send(position_sync_pb2.SyncFrame(batch=envelope))
        await _expect_close(stream, _R.ERROR_REASON_KEY_ROLE_MISMATCH, "a batch signed by a client")
    await _head_unchanged(ctx, kit, held, held_hash)


async def _refused_in_turn(
    ctx: CaseContext,
    kit: KitCustodian,
    refused: list[tuple[str, bytes]],
    reason: errors_pb2.ErrorReason.ValueType,
    *,
    logged: list[bytes] | None = None,
) -> None:
    """Send each ``(what, update)`` in a batch of its own, on a stream of its own, right after
    the head of the kit's log: each must be refused with SyncClose(``reason``), and the
    exchange's next hello must show nothing of it stored.

    ``logged`` updates are appended to the kit's log first, and must be acknowledged on the
    first stream before anything is refused there.
    """
    loop = asyncio.get_running_loop()
    head = kit.sync_log.sent_head()
    for index, (what, update) in enumerate(refused):
        async with held_stream(ctx, kit) as stream:
            began = loop.time()
            _check_held(stream, head, what=f"before {what}")
            if index == 0 and logged:
                for entry in logged:
                    _logged(kit, entry)
                head = kit.sync_log.sent_head()
            if stream.hello.received_sequence < head.sequence:
                await _send_from_held(kit, stream)
            # Up a while before the refusal: an exchange that re-dials at once after a stream
            # that was up a while (as the reference does, §6.7 backoff) keeps the case short.
            await asyncio.sleep(max(0.0, began + _STEADY_SECONDS - loop.time()))
            envelope, _ = _batch(kit, head.sequence + 1, head.entry_hash, [update])
            await stream.send(position_sync_pb2.SyncFrame(batch=envelope))
            await _expect_close(stream, reason, what)
    await _head_unchanged(ctx, kit, head.sequence, head.entry_hash)


def _check_held(stream: RawStream, head: LogHead, *, what: str) -> None:
    """The exchange holds the kit's log up to ``head``, or less of it (never another entry)."""
    held = stream.hello.received_sequence
    check(
        held <= head.sequence,
        f"the exchange stored an entry of the custodian's log the kit refused to write ({what})",
        expected=f"received_sequence <= {head.sequence}",
        got=str(held),
    )


async def _credited(ctx: CaseContext, kit: KitCustodian) -> None:
    """A proven statement of a new account, announced after everything else, is credited:
    the exchange has caught up with the kit's log and its attestations."""
    account_id = ctx.unique("kit-sync")
    change, ref = kit.holdings_change(
        account_id, ctx.key(common_pb2.PARTY_ROLE_CLIENT), {"USDC": "1"}, epoch=1
    )
    kit.announce(position_sync_pb2.PositionUpdate(holdings_change=change))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _CREDIT_TIMEOUT
    while not relies_on(
        await credit_line_of(ctx.exchange, account_id, ctx.config.rpc_timeout), ref
    ):
        if loop.time() > deadline:
            raise CaseFailure(
                f"the exchange did not credit {account_id!r} within {_CREDIT_TIMEOUT:.0f} s of "
                "a proven statement on the stream (§5.5)",
                expected="a credit line relying on the statement",
                got="none",
            )
        await asyncio.sleep(0.1)


@REGISTRY.case(
    "sync/exchange/unauthorising-path-refused",
    Level.MUST,
    "a pledge whose relayed liquidation path names another exchange, or another account, is a "
    "false statement of the custodian's: SyncClose PATH_NOT_AUTHORISED, nothing of the batch "
    "stored, and the account is never credited (§9.1, §6.5 step 5)",
    roles=_EXCHANGE,
)
async def unauthorising_path_refused(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    await ctx.server_now()  # the kit signs on the exchange's clock
    client = ctx.key(common_pb2.PARTY_ROLE_CLIENT)
    accounts = []
    refused = []
    for field, named, what in (
        ("exchange_id", ctx.unique("conformance-other-exchange"), "another exchange"),
        ("account_id", ctx.unique("kit-other-account"), "another account"),
    ):
        account = ctx.unique("kit-path")
        change, _ = kit.holdings_change(
            account, client, {"USDC": "1000"}, epoch=1, path_names={field: named}
        )
        accounts.append(account)
        update = position_sync_pb2.PositionUpdate(holdings_change=change)
        refused.append(
            (f"a pledge whose liquidation path names {what}", update.SerializeToString())
        )
    await _refused_in_turn(ctx, kit, refused, _R.ERROR_REASON_PATH_NOT_AUTHORISED)
    await _credited(ctx, kit)
    await asyncio.sleep(_QUIET)
    for account in accounts:
        line = await credit_line_of(ctx.exchange, account, ctx.config.rpc_timeout)
        value = parse_amount(line.collateral_value.value or "0") if line is not None else 0
        check(
            line is None or (not line.attestations and value == 0),
            f"the exchange credited {account!r}, whose pledge carried a path that does not "
            "authorise it (§9.1)",
            expected="no credit line, or one relying on no statement and valuing nothing",
            got=f"collateral value {value}, {len(line.attestations) if line else 0} attestation(s)",
        )


def _account_update(
    variant: str,
    *,
    account_id: str,
    asset_id: str,
    quantity: str,
    ref: attestation_pb2.AttestationRef,
    at: datetime,
) -> bytes:
    """A pledge_change or yield_accrual of (account, asset), attested by ``ref``."""
    figure = common_pb2.Decimal(value=quantity)
    if variant == "pledge_change":
        update = position_sync_pb2.PositionUpdate(
            pledge_change=position_sync_pb2.PledgeChange(
                account_id=account_id, asset_id=asset_id, pledged_quantity=figure, attestation=ref
            )
        )
    else:
        accrual = position_sync_pb2.YieldAccrual(
            account_id=account_id, asset_id=asset_id, accrued_quantity=figure, attestation=ref
        )
        accrual.accrual_time.FromDatetime(at)
        update = position_sync_pb2.PositionUpdate(yield_accrual=accrual)
    return update.SerializeToString()


async def _ids_required(ctx: CaseContext, kit: KitCustodian, variant: str) -> None:
    """A well-formed ``variant`` update is acknowledged; one naming no account, or no asset,
    is a malformed update: SyncClose MALFORMED, nothing stored (§6.5 step 5, §6.8)."""
    await ctx.server_now()  # the kit signs on the exchange's clock
    client = ctx.key(common_pb2.PARTY_ROLE_CLIENT)
    account, asset = ctx.unique("kit-ids"), "BENJI"
    now = kit.now()

    def update(
        kind: str,
        account_id: str,
        asset_id: str,
        quantity: str,
        ref: attestation_pb2.AttestationRef,
    ) -> bytes:
        return _account_update(
            kind, account_id=account_id, asset_id=asset_id, quantity=quantity, ref=ref, at=now
        )

    # A pledge, announced as §6.8 says: its holdings statement, then its pledge change.
    pledge, ref = kit.holdings_change(account, client, {asset: "1000"}, epoch=1)
    updates = [
        position_sync_pb2.PositionUpdate(holdings_change=pledge).SerializeToString(),
        update("pledge_change", account, asset, "1000", ref),
    ]
    figure = "1000"
    if variant == "yield_accrual":
        # Then a yield accrual: the quantity grows, the pledge does not (§9.3).
        figure = "0.37"
        accrued, ref = kit.holdings_change(
            account,
            client,
            {asset: "1000.37"},
            epoch=2,
            reason=attestation_pb2.HOLDINGS_CHANGE_REASON_YIELD_ACCRUAL,
            pledged={asset: "1000"},
        )
        updates += [
            position_sync_pb2.PositionUpdate(holdings_change=accrued).SerializeToString(),
            update(variant, account, asset, figure, ref),
        ]
    refused = [
        (f"a {variant} naming no account", update(variant, "", asset, figure, ref)),
        (f"a {variant} naming no asset", update(variant, account, "", figure, ref)),
    ]
    # The well-formed ones first: acknowledged like any other entry.
    await _refused_in_turn(ctx, kit, refused, _R.ERROR_REASON_MALFORMED, logged=updates)


@REGISTRY.case(
    "sync/exchange/yield-accrual-without-ids-refused",
    Level.MUST,
    "a yield_accrual naming its account and asset is acknowledged; one with an empty "
    "account_id, or an empty asset_id, is a malformed update: SyncClose MALFORMED, and the "
    "exchange's next hello shows nothing of it stored (§6.5 step 5, §6.8)",
    roles=_EXCHANGE,
)
async def yield_accrual_without_ids_refused(ctx: CaseContext) -> None:
    await _ids_required(ctx, ctx.counterpart, "yield_accrual")


@REGISTRY.case(
    "sync/exchange/pledge-change-without-ids-refused",
    Level.MUST,
    "a pledge_change naming its account and asset is acknowledged; one with an empty "
    "account_id, or an empty asset_id, is a malformed update: SyncClose MALFORMED, and the "
    "exchange's next hello shows nothing of it stored (§6.5 step 5, §6.8)",
    roles=_EXCHANGE,
)
async def pledge_change_without_ids_refused(ctx: CaseContext) -> None:
    await _ids_required(ctx, ctx.counterpart, "pledge_change")


async def _equivocate(ctx: CaseContext, kit: KitCustodian) -> None:
    """Send the exchange another entry at the last sequence it holds; expect EQUIVOCATION."""
    async with held_stream(ctx, kit) as stream:
        held = stream.hello.received_sequence
        stored = kit.sync_log.outgoing_entry(held) if held else None
        if stored is None:
            raise CaseFailure(
                "the exchange holds none of the kit's log to contradict",
                expected="received_sequence >= 1",
                got=str(held),
            )
        envelope, _ = _batch(kit, held, stored.prev_entry_hash, [_fresh_update(ctx, kit)])
        kit.equivocation = (held, envelope)
        await stream.send(position_sync_pb2.SyncFrame(batch=envelope))
        await _expect_close(stream, _R.ERROR_REASON_EQUIVOCATION, "an equivocating batch")


@REGISTRY.case(
    "sync/exchange/equivocation-refused",
    Level.MUST,
    "a batch giving an acknowledged sequence a different entry is refused: SyncClose "
    "EQUIVOCATION (§6.5); this ends the exchange's stream with the kit for good, so only the "
    "reading of its evidence runs after it",
    roles=_EXCHANGE,
)
async def equivocation_refused(ctx: CaseContext) -> None:
    await _equivocate(ctx, ctx.counterpart)


@REGISTRY.case(
    "sync/exchange/equivocation-evidence-served",
    Level.MUST,
    "after that equivocation the exchange lists to a regulator both signed batches — the one it "
    "stored and the kit's contradicting one, each verifying as the custodian's — whose entries "
    "at that sequence differ (§10.7)",
    roles=_EXCHANGE,
    clauses=("§10.7/evidence-kept-durably", "§10.7/evidence-served-to-regulators"),
)
async def equivocation_evidence_served(ctx: CaseContext) -> None:
    kit = ctx.counterpart
    regulator = ctx.as_role(common_pb2.PARTY_ROLE_REGULATOR)
    if kit.equivocation is None:  # run on its own: equivocate first
        await _equivocate(ctx, kit)
    assert kit.equivocation is not None
    sequence, sent = kit.equivocation
    item = await wait_for_evidence(
        ctx,
        regulator,
        lambda e: (
            e.kind == KIND.EQUIVOCATION_KIND_SYNC_BATCH
            and e.accused_party_id == kit.party_id
            and e.sequence == sequence
        ),
        f"a SYNC_BATCH equivocation of {kit.party_id} at sequence {sequence}",
    )
    check_equal(
        "direction of the evidence",
        position_sync_pb2.SyncDirection.Name(CUSTODIAN_TO_EXCHANGE),  # type: ignore[arg-type]
        position_sync_pb2.SyncDirection.Name(item.direction),
    )
    stored, received = sync_batch_pair(
        ctx, item, sender=kit.party_id, receiver=kit.exchange_id, direction=CUSTODIAN_TO_EXCHANGE
    )
    own = kit.sync_log.outgoing_hash(sequence)
    check_equal(
        f"entry hash at {sequence} in the evidence's first batch (the one the exchange stored)",
        own.hex() if own is not None else "(the kit's own entry)",
        stored.hex(),
    )
    check(
        item.second == sent,
        "the evidence's second batch is not the kit's contradicting batch as sent (§10.7: both "
        "statements exactly as received)",
        expected=f"the batch the kit sent at sequence {sequence}",
        got=f"a batch giving sequence {sequence} the entry hash {received.hex()}",
    )
    check(
        (item.first_hash, item.second_hash) == (stored, received),
        "first_hash and second_hash of a sync equivocation are the two entry hashes (§10.7)",
        expected=[stored.hex(), received.hex()],
        got=[item.first_hash.hex(), item.second_hash.hex()],
    )
