"""SyncPositions (docs/PROTOCOL.md §6): the custodian's side of the position-sync stream.

The kit dials as the exchange. Entries the custodian sends must verify with
the SDK (signature, sender, direction, hash chain); a holdings change must
carry a statement that verifies and an attestation the log proves; a resume
must lose nothing and repeat nothing; a batch sent twice is acknowledged,
not applied twice; forged, misdirected, gapped and equivocating batches are
refused with the prescribed status, and change nothing. The refusal cases
run last: a custodian may hold an equivocating peer at arm's length.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from collateral_sync.amounts import amount_to_proto
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, ZERO_HASH
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    liquidation_pb2,
    position_sync_pb2,
    test_control_pb2,
)

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import (
    CaseFailure,
    CaseSkipped,
    check,
    check_equal,
    describe,
    expect_ok,
    expect_status,
)
from collateral_sync_conformance._registry import REGISTRY, Level, Role
from collateral_sync_conformance.cases._checkpoints import (
    expect_attested,
    latest_checkpoint,
    verify_leaf,
)
from collateral_sync_conformance.cases._kit_account import (
    exchange_party,
    holdings,
    liquidation_path,
    plan_pledge,
    pledge_instruction,
)
from collateral_sync_conformance.cases._raw_stream import (
    KIT_WINDOW,
    ReceivedEntry,
    StreamEnded,
    SyncStream,
    check_ack,
    kit_batch,
    kit_update,
    verified_entries,
)

__all__: list[str] = []

_CUSTODIAN = [Role.CUSTODIAN]
_R = errors_pb2.ErrorReason
_C = grpc.StatusCode
#: How long the kit watches for a frame that must not come (window) before acknowledging.
_QUIET = 1.0
_EXCHANGE_ROLE = common_pb2.PARTY_ROLE_EXCHANGE


async def _change_holdings(ctx: CaseContext) -> None:
    """Make the custodian announce a holdings change to the kit's exchange.

    A deposit (test control) into the kit's account if it is pledged to the
    kit's exchange; otherwise a pledge to it, an ordinary protocol action.
    """
    account = ctx.account()
    statement, _, _ = await holdings(ctx, account)
    if statement.exchange_id == exchange_party(ctx) and statement.positions:
        await ctx.control(
            ctx.test_control.deposit,
            test_control_pb2.DepositRequest(
                account_id=account,
                asset_id=statement.positions[0].asset_id,
                quantity=amount_to_proto("1"),
            ),
        )
        return
    plan = await plan_pledge(ctx)
    request = custodian_service_pb2.PledgeCollateralRequest(
        pledge_instruction=await ctx.sign(pledge_instruction(plan), plan.client),
        liquidation_path=await ctx.sign(liquidation_path(plan), plan.client),
    )
    expect_ok(await ctx.rpc(ctx.custodian.pledge_collateral, request, label="PledgeCollateral"))


async def _stream_with_entries(
    ctx: CaseContext, count: int, *, window: int = KIT_WINDOW
) -> SyncStream:
    """A stream from the start of a custodian log that holds at least ``count`` entries."""
    for _ in range(count + 1):
        stream = await SyncStream.open(ctx, window=window)
        if stream.hello.sent_sequence >= count:
            return stream
        await stream.close()
        await _change_holdings(ctx)
    raise CaseFailure(
        f"the custodian's sync log did not reach {count} entries after holdings changes",
        expected=f"hello.sent_sequence >= {count}",
        got=str(stream.hello.sent_sequence),
    )


@REGISTRY.case(
    "sync/hello-answered",
    Level.MUST,
    "SyncPositions: the custodian answers the exchange's hello with its own: its party, its "
    "direction, a window, and a received head that is 0 with 32 zero bytes or a real hash",
    roles=_CUSTODIAN,
    clauses=("§6.2/hello-party-is-tls-cn",),
)
async def hello_answered(ctx: CaseContext) -> None:
    stream = await SyncStream.open(ctx)
    try:
        hello = stream.hello
        check_equal("hello.party_id", ctx.server_party_id, hello.party_id)
        check_equal(
            "hello.sending_direction",
            position_sync_pb2.SyncDirection.Name(CUSTODIAN_TO_EXCHANGE),  # type: ignore[arg-type]
            position_sync_pb2.SyncDirection.Name(hello.sending_direction),
        )
        check(hello.window >= 1, "hello.window must be >= 1", expected=">= 1", got=hello.window)
        check_equal("length of hello.received_entry_hash", 32, len(hello.received_entry_hash))
        check(
            (hello.received_sequence == 0) == (hello.received_entry_hash == ZERO_HASH),
            "hello.received_entry_hash must be 32 zero bytes exactly when received_sequence is 0",
            expected="zero hash iff received_sequence == 0",
            got=f"received_sequence={hello.received_sequence} "
            f"hash={hello.received_entry_hash.hex()}",
        )
    finally:
        await stream.close()


@REGISTRY.case(
    "sync/holdings-change-attested",
    Level.MUST,
    "SyncPositions: a holdings change of the kit's account arrives as a HoldingsChange whose "
    "statement verifies and whose AttestationRef is proved by the log (inclusion, consistency)",
    roles=_CUSTODIAN,
)
async def holdings_change_attested(ctx: CaseContext) -> None:
    account = ctx.account()
    stream = await SyncStream.open(ctx)
    try:
        head = stream.hello.sent_sequence
        if head:
            await stream.receive_until(head)
        since = await latest_checkpoint(ctx)
        before, _, _ = await holdings(ctx, account)
        await _change_holdings(ctx)
        change: position_sync_pb2.HoldingsChange | None = None
        while change is None:
            entries = await stream.receive_until(head + 1)
            head = entries[-1].sequence
            for entry in entries:
                if entry.update.WhichOneof("update") == "holdings_change":
                    candidate = entry.update.holdings_change
                    leaf = verify_leaf(ctx, candidate.holdings_statement)
                    if leaf.account_id == account and leaf.epoch > before.epoch:
                        change = candidate
        statement = verify_leaf(ctx, change.holdings_statement)
        check(
            statement.exchange_id == exchange_party(ctx),
            "a holdings change sent to an exchange must be of an account pledged to it",
            expected=exchange_party(ctx),
            got=statement.exchange_id,
        )
        await expect_attested(ctx, change.holdings_statement, change.attestation, since=since)
    finally:
        await stream.close()


def _account_of(update: position_sync_pb2.PositionUpdate) -> str:
    """The account an update of the custodian's is about ("" if it names none)."""
    kind = update.WhichOneof("update")
    if kind == "holdings_change":
        payload = update.holdings_change.holdings_statement.payload
        return attestation_pb2.HoldingsStatement.FromString(payload).account_id
    if kind == "liquidation_receipt":
        return liquidation_pb2.LiquidationReceipt.FromString(
            update.liquidation_receipt.payload
        ).account_id
    if kind in ("pledge_change", "yield_accrual"):
        account: str = getattr(update, kind).account_id
        return account
    return ""


async def _drain(stream: SyncStream, seconds: float) -> list[ReceivedEntry]:
    """Every entry ``stream`` brings within ``seconds`` (each batch acknowledged)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    entries: list[ReceivedEntry] = []
    with contextlib.suppress(StreamEnded):
        while (remaining := deadline - loop.time()) > 0:
            frame = await stream.frame_of(("batch",), remaining)
            if frame is None:
                break
            batch = await verified_entries(stream.ctx, frame.batch, receiver=stream.party_id)
            entries.extend(batch)
            await stream.ack(batch[-1])
    return entries


@REGISTRY.case(
    "sync/other-exchange-stream-isolated",
    Level.MUST,
    "a holdings change of the kit's account reaches the stream of the exchange it is pledged "
    "to and no other: replayed from its start and followed for two seconds past the change, "
    "the stream of a second registered exchange (an --identity of it) names the account in no "
    "update; a custodian that does not serve that exchange, and refuses its stream, passes "
    "(§5.8)",
    roles=_CUSTODIAN,
    clauses=("§5.8/stream-of-pledged-accounts",),
)
async def other_exchange_stream_isolated(ctx: CaseContext) -> None:
    account = ctx.account()
    ours = exchange_party(ctx)
    other = ctx.as_role(_EXCHANGE_ROLE, besides=[ours])
    try:
        second = await SyncStream.open(ctx, as_party=other)
    except StreamEnded:
        return  # not served: nothing of the account can reach that exchange
    stream = await SyncStream.open(ctx)
    try:
        head = stream.hello.sent_sequence
        if head:
            await stream.receive_until(head)
        other_head = second.hello.sent_sequence
        seen = await second.receive_until(other_head) if other_head else []
        before, _, _ = await holdings(ctx, account)
        await _change_holdings(ctx)
        arrived = False
        while not arrived:
            entries = await stream.receive_until(head + 1)
            head = entries[-1].sequence
            arrived = any(
                _account_of(e.update) == account
                and e.update.WhichOneof("update") == "holdings_change"
                and verify_leaf(ctx, e.update.holdings_change.holdings_statement).epoch
                > before.epoch
                for e in entries
            )
        seen += await _drain(second, 2.0)
    finally:
        await stream.close()
        await second.close()
    named = [e for e in seen if _account_of(e.update) == account]
    check(
        not named,
        f"the custodian streamed account {account!r}, pledged to {ours}, to {other.party_id} "
        "(§5.8: an exchange's stream carries the accounts pledged to it and no other)",
        expected=f"no update naming {account} on {other.party_id}'s stream",
        got=", ".join(f"{e.update.WhichOneof('update')} at {e.sequence}" for e in named[:5]),
    )


@REGISTRY.case(
    "sync/latest-holdings-streamed",
    Level.MUST,
    "SyncPositions: replayed from the start, the stream's last HoldingsChange of an account "
    "pledged to the exchange is the account's latest holdings statement (no attested change "
    "is lost, e.g. across a restart)",
    roles=_CUSTODIAN,
)
async def latest_holdings_streamed(ctx: CaseContext) -> None:
    account = ctx.account()
    latest, _, _ = await holdings(ctx, account)
    if latest.exchange_id != exchange_party(ctx):
        await _change_holdings(ctx)  # a pledge to the kit's exchange
        latest, _, _ = await holdings(ctx, account)
    stream = await SyncStream.open(ctx)
    try:
        head = stream.hello.sent_sequence
        entries = await stream.receive_until(head) if head else []
    finally:
        await stream.close()
    streamed = [
        verify_leaf(ctx, e.update.holdings_change.holdings_statement)
        for e in entries
        if e.update.WhichOneof("update") == "holdings_change"
    ]
    epochs = [s.epoch for s in streamed if s.account_id == account]
    check(
        bool(epochs) and epochs[-1] == latest.epoch,
        f"the stream does not carry account {account!r}'s latest holdings statement",
        expected=f"a last HoldingsChange of epoch {latest.epoch}",
        got=f"epochs {epochs[-5:]}" if epochs else "no HoldingsChange of the account",
    )


@REGISTRY.case(
    "sync/resume-after-disconnect",
    Level.MUST,
    "SyncPositions: after a disconnect the custodian resumes from the exchange's received head: "
    "the next entry chains to it, nothing is lost or repeated, and the heads agree",
    roles=_CUSTODIAN,
)
async def resume_after_disconnect(ctx: CaseContext) -> None:
    first = await _stream_with_entries(ctx, 2)
    try:
        # Unacknowledged, the custodian sends at most the kit's window: a log that earlier
        # runs grew beyond it is read up to the window, not to its head.
        head = min(first.hello.sent_sequence, KIT_WINDOW)
        seen = await first.receive_until(head, ack=False)
    finally:
        await first.close()
    kept = seen[len(seen) // 2 - 1]  # the exchange "durably stored" half of them
    second = await SyncStream.open(
        ctx, received_sequence=kept.sequence, received_entry_hash=kept.entry_hash
    )
    try:
        check(
            second.hello.sent_sequence >= head,
            "the custodian's log shrank across a reconnect",
            expected=f"sent_sequence >= {head}",
            got=second.hello.sent_sequence,
        )
        replayed = await second.receive_until(second.hello.sent_sequence)
    finally:
        await second.close()
    check_equal("first sequence after the resume", kept.sequence + 1, replayed[0].sequence)
    check_equal(
        "prev_entry_hash of the first entry after the resume",
        kept.entry_hash.hex(),
        replayed[0].prev_entry_hash.hex(),
    )
    sequences = [e.sequence for e in replayed]
    check_equal(
        "sequences after the resume (no loss, no duplicates)",
        list(range(kept.sequence + 1, second.hello.sent_sequence + 1)),
        sequences,
    )
    before = {e.sequence: e.entry_hash.hex() for e in seen}
    again = {e.sequence: e.entry_hash.hex() for e in replayed if e.sequence in before}
    check_equal(
        "entry hashes sent again after the resume",
        {s: h for s, h in before.items() if s in again},
        again,
    )


@REGISTRY.case(
    "sync/window-respected",
    Level.SHOULD,
    "SyncPositions: the custodian never has more entries unacknowledged than the window the "
    "exchange declared (here 1)",
    roles=_CUSTODIAN,
)
async def window_respected(ctx: CaseContext) -> None:
    stream = await _stream_with_entries(ctx, 2, window=1)
    try:
        for _ in range(2):
            frame = await stream.frame_of(("batch",))
            check(frame is not None, "no batch came", expected="a batch", got="nothing")
            assert frame is not None
            entries = await verified_entries(ctx, frame.batch)
            check(
                len(entries) <= 1,
                "a batch larger than the exchange's window",
                expected="at most 1 entry",
                got=len(entries),
            )
            extra = await stream.frame_of(("batch",), timeout=_QUIET)
            check(
                extra is None,
                "a second batch before the first was acknowledged (window 1)",
                expected="no batch until the ack",
                got=describe(extra) if extra is not None else "",
            )
            await stream.ack(entries[-1])
    finally:
        await stream.close()


@REGISTRY.case(
    "sync/heartbeat-on-idle",
    Level.SHOULD,
    "SyncPositions: an idle custodian sends a heartbeat within its announced interval (the kit "
    "waits three intervals, for scheduling delays)",
    roles=_CUSTODIAN,
)
async def heartbeat_on_idle(ctx: CaseContext) -> None:
    stream = await SyncStream.open(ctx)
    try:
        head = stream.hello.sent_sequence
        if head:
            await stream.receive_until(head)
        interval = (stream.hello.heartbeat_interval_ms or 5000) / 1000
        # Three intervals, not one: a loaded machine delays a timer, and a margin in
        # proportion still tells a custodian that keeps, say, 20 times its announced
        # interval (a fixed slack of seconds would not).
        frame = await stream.frame_of(("heartbeat",), timeout=interval * 3)
        check(
            frame is not None,
            "no heartbeat from an idle custodian",
            expected=f"a heartbeat within {3 * interval:g}s (three announced intervals)",
            got="silence",
        )
    finally:
        await stream.close()


# ------------------------------------------------------------------ the kit's own batches


async def _refused(
    ctx: CaseContext,
    stream: SyncStream,
    batch: envelope_pb2.Envelope,
    code: grpc.StatusCode,
    reason: int,
) -> None:
    """Send ``batch``; the custodian must end the stream with ``code``/``reason``, storing nothing."""
    stored = stream.hello.received_sequence
    await stream.send(position_sync_pb2.SyncFrame(batch=batch))
    end = await stream.ended()
    await stream.close()
    if end is None:
        raise CaseFailure(
            "the custodian kept the stream open after a batch it must refuse",
            sent=str(describe(batch)),
            expected=f"the stream ended with {code.name}",
            got=str([describe(f) for f in stream.frames[-3:]]) if stream.frames else "no frame",
        )
    expect_status(end.outcome, code, reason)
    after = await SyncStream.open(ctx)
    await after.close()
    check_equal(
        "the custodian's received head of the kit's log after the refusal",
        stored,
        after.hello.received_sequence,
    )


#: What the kit allows past the deadline: scheduling and the call's teardown.
_DEADLINE_SLACK = 2.0


@REGISTRY.case(
    "sync/silent-stream-closed",
    Level.MUST,
    "SyncPositions: a stream on which no hello arrives is closed within three of the "
    "custodian's heartbeat intervals, and the custodian says nothing on it first (§6.2)",
    roles=_CUSTODIAN,
    clauses=("§6.2/hello-deadline",),
)
async def silent_stream_closed(ctx: CaseContext) -> None:
    probe = await SyncStream.open(ctx)  # to learn the custodian's interval
    await probe.close()
    interval = (probe.hello.heartbeat_interval_ms or 5000) / 1000
    limit = 3 * interval + _DEADLINE_SLACK
    call = ctx.custodian.sync_positions(timeout=limit + ctx.config.rpc_timeout)
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            first = await call.read()
    except TimeoutError:
        raise CaseFailure(
            "the custodian kept a stream open on which no hello ever arrived",
            expected=f"the stream closed within {3 * interval:g} s (3 heartbeat intervals)",
            got=f"still open after {limit:g} s",
        ) from None
    except grpc.RpcError:
        return  # closed with a status: what §6.2 asks
    finally:
        call.cancel()
    check(
        first is grpc.aio.EOF,
        "the custodian sent a frame before the exchange's hello (§6.2 step 1)",
        expected="nothing, then the end of the stream",
        got=describe(first),
    )
    check(
        time.monotonic() - started <= limit,
        "the silent stream was not closed in time",
        expected=f"<= {limit:g} s",
        got=f"{time.monotonic() - started:.1f} s",
    )


@REGISTRY.case(
    "sync/duplicate-batch-acked-once",
    Level.MUST,
    "SyncPositions: a batch the custodian already acknowledged, sent again, is acknowledged "
    "again and stored once",
    roles=_CUSTODIAN,
)
async def duplicate_batch(ctx: CaseContext) -> None:
    signer = ctx.key(_EXCHANGE_ROLE)
    stream = await SyncStream.open(ctx)
    try:
        n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
        batch, hashes = await kit_batch(ctx, signer, n + 1, prev, [await kit_update(ctx, signer)])
        for _ in range(2):
            await stream.send(position_sync_pb2.SyncFrame(batch=batch))
            check_ack(await stream.frame_of(("ack", "close")), n + 1, hashes[0])
    finally:
        await stream.close()
    ctx.session.sync_sent = n + 1
    again = await SyncStream.open(ctx)
    await again.close()
    check_equal("received head after the duplicate", n + 1, again.hello.received_sequence)
    check_equal(
        "received entry hash after the duplicate",
        hashes[0].hex(),
        again.hello.received_entry_hash.hex(),
    )


@REGISTRY.case(
    "sync/sequence-gap-refused",
    Level.MUST,
    "SyncPositions: a batch that skips a sequence is refused: OUT_OF_RANGE SEQUENCE_GAP, nothing stored",
    roles=_CUSTODIAN,
)
async def sequence_gap(ctx: CaseContext) -> None:
    signer = ctx.key(_EXCHANGE_ROLE)
    stream = await SyncStream.open(ctx)
    n = stream.hello.received_sequence
    batch, _ = await kit_batch(
        ctx, signer, n + 2, bytes(range(32)), [await kit_update(ctx, signer)]
    )
    await _refused(ctx, stream, batch, _C.OUT_OF_RANGE, _R.ERROR_REASON_SEQUENCE_GAP)


@REGISTRY.case(
    "sync/forged-batch-refused",
    Level.MUST,
    "SyncPositions: a batch whose signature does not verify is refused: UNAUTHENTICATED "
    "SIGNATURE_INVALID, nothing stored",
    roles=_CUSTODIAN,
)
async def forged_batch(ctx: CaseContext) -> None:
    signer = ctx.key(_EXCHANGE_ROLE)
    stream = await SyncStream.open(ctx)
    n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
    batch, _ = await kit_batch(ctx, signer, n + 1, prev, [await kit_update(ctx, signer)])
    signature = bytearray(batch.signatures[0].sig)
    signature[0] ^= 0x01
    batch.signatures[0].sig = bytes(signature)
    await _refused(ctx, stream, batch, _C.UNAUTHENTICATED, _R.ERROR_REASON_SIGNATURE_INVALID)


@REGISTRY.case(
    "sync/wrong-role-batch-refused",
    Level.MUST,
    "SyncPositions: a batch signed by a key of another role (the client's) is refused: "
    "PERMISSION_DENIED KEY_ROLE_MISMATCH, nothing stored",
    roles=_CUSTODIAN,
)
async def wrong_role_batch(ctx: CaseContext) -> None:
    exchange = ctx.key(_EXCHANGE_ROLE)
    client = ctx.key(common_pb2.PARTY_ROLE_CLIENT)
    stream = await SyncStream.open(ctx)
    n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
    batch, _ = await kit_batch(ctx, client, n + 1, prev, [await kit_update(ctx, exchange)])
    await _refused(ctx, stream, batch, _C.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH)


@REGISTRY.case(
    "sync/invalid-inner-statement-refused",
    Level.MUST,
    "SyncPositions: a validly signed batch whose second update carries a statement with a "
    "forged signature is refused whole: UNAUTHENTICATED SIGNATURE_INVALID, not even its valid "
    "first entry stored (§6.5 step 5)",
    roles=_CUSTODIAN,
)
async def invalid_inner_statement(ctx: CaseContext) -> None:
    signer = ctx.key(_EXCHANGE_ROLE)
    stream = await SyncStream.open(ctx)
    n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
    forged = position_sync_pb2.PositionUpdate.FromString(await kit_update(ctx, signer))
    signature = bytearray(forged.risk_policy.signatures[0].sig)
    signature[0] ^= 0x01
    forged.risk_policy.signatures[0].sig = bytes(signature)
    updates = [await kit_update(ctx, signer), forged.SerializeToString()]
    batch, _ = await kit_batch(ctx, signer, n + 1, prev, updates)
    await _refused(ctx, stream, batch, _C.UNAUTHENTICATED, _R.ERROR_REASON_SIGNATURE_INVALID)


@REGISTRY.case(
    "sync/third-party-inner-statement-refused",
    Level.MUST,
    "SyncPositions: a batch from the exchange carrying a statement validly signed by another "
    "registered exchange is refused whole: PERMISSION_DENIED KEY_ROLE_MISMATCH, nothing stored "
    "(§6.5: the issuer of a statement an update carries must be the peer)",
    roles=_CUSTODIAN,
    clauses=("§6.5/inner-issuer-is-peer",),
)
async def third_party_inner_statement(ctx: CaseContext) -> None:
    signer = ctx.key(_EXCHANGE_ROLE)
    other = next(
        (
            key
            for key in ctx.config.kit_keys
            if key.role == _EXCHANGE_ROLE and key.party_id != signer.party_id
        ),
        None,
    )
    if other is None:
        raise CaseSkipped("needs a --kit-key of a second exchange party, registered at the server")
    stream = await SyncStream.open(ctx)
    n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
    updates = [await kit_update(ctx, signer), await kit_update(ctx, other)]
    batch, _ = await kit_batch(ctx, signer, n + 1, prev, updates)
    await _refused(ctx, stream, batch, _C.PERMISSION_DENIED, _R.ERROR_REASON_KEY_ROLE_MISMATCH)


@REGISTRY.case(
    "sync/equivocation-refused",
    Level.MUST,
    "SyncPositions: a different entry at a sequence the custodian acknowledged is refused: "
    "ABORTED EQUIVOCATION",
    roles=_CUSTODIAN,
)
async def equivocation(ctx: CaseContext) -> None:
    signer = ctx.key(_EXCHANGE_ROLE)
    stream = await SyncStream.open(ctx)
    n, prev = stream.hello.received_sequence, stream.hello.received_entry_hash
    batch, hashes = await kit_batch(ctx, signer, n + 1, prev, [await kit_update(ctx, signer)])
    await stream.send(position_sync_pb2.SyncFrame(batch=batch))
    check_ack(await stream.frame_of(("ack", "close")), n + 1, hashes[0])
    ctx.session.sync_sent = n + 1
    stream.hello.received_sequence = n + 1  # what a refusal must leave in place
    other, _ = await kit_batch(ctx, signer, n + 1, prev, [await kit_update(ctx, signer)])
    await _refused(ctx, stream, other, _C.ABORTED, _R.ERROR_REASON_EQUIVOCATION)
