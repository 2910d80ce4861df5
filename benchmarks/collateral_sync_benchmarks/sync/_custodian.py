"""The custodian process of the sync benchmark: it serves the sync stream and a raw baseline stream.

It runs as a child of the benchmark (``python -m collateral_sync_benchmarks.sync``)
and takes its commands as JSON lines on stdin, answering on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from collateral_sync.amounts import amount_to_proto, format_amount
from collateral_sync.errors import VerificationError
from collateral_sync.server import create_server, serve
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.sync import (
    CUSTODIAN_TO_EXCHANGE,
    DEFAULT_WINDOW,
    SyncLog,
    SyncSession,
    serve_sync_stream,
)
from collateral_sync.v1 import (
    custodian_service_pb2,
    custodian_service_pb2_grpc,
    errors_pb2,
    margin_pb2,
    position_sync_pb2,
)
from collateral_sync.valuation import recompute_margin_call
from collateral_sync_reference.common.metrics import ServerMetrics

from collateral_sync_benchmarks.sync._fixtures import (
    _ACK_TIMEOUT,
    _CUSTODIAN,
    _EXCHANGE,
    _MARGIN_ACCOUNTS,
    _START_TIMEOUT,
    _STATEMENT_TTL,
    TRANSACTION_UPDATES,
    _cpu_seconds,
    _holdings_change,
    _margin_account,
    _party_keys,
    _pledge_update,
    _raw_message,
    _tls,
    _unexpected_variant,
)
from collateral_sync_benchmarks.sync._metrics import party_metrics
from collateral_sync_benchmarks.sync._storage import _Database, _StorageSpec
from collateral_sync_benchmarks.sync._tracing import SwitchableTracing

# Helpers for the sibling modules only: nothing here is API.
__all__: list[str] = []

# Appended but unacknowledged updates a live producer lets pile up before it
# waits: enough to keep the window full, bounded so that the log cannot run away.
_BACKLOG_LIMIT = 2 * DEFAULT_WINDOW
_CHILD_LIFETIME = 3600.0


class _Custodian:
    """The custodian: its database, sync log and session, and a live producer of updates."""

    def __init__(self, workdir: Path, pool_size: int, storage: _StorageSpec) -> None:
        self.key, _, registry = _party_keys()
        self.registry = registry
        self.database = _Database(storage, workdir, "custodian")
        self.connection = self.database.connection
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS margin_calls (margin_call_id TEXT PRIMARY KEY, "
            "statement_sequence INTEGER NOT NULL UNIQUE, account_id TEXT NOT NULL, "
            "call_amount TEXT NOT NULL, sync_sequence INTEGER NOT NULL, envelope BLOB NOT NULL, "
            "response BLOB NOT NULL)"
        )
        self.log = SyncLog(
            self.connection,
            party_id=_CUSTODIAN,
            peer_party_id=_EXCHANGE,
            sending_direction=CUSTODIAN_TO_EXCHANGE,
        )
        self.session = SyncSession(self.log, self.key, registry, apply=self._apply)
        # The changes to announce exist before the clock starts; appending them
        # (variant check, hash chain, the database) is timed. Kept as bytes: 200,000
        # message objects would make every garbage collection pass slow.
        self.pool = [
            _pledge_update(i).SerializeToString(deterministic=True) for i in range(pool_size)
        ]
        self._produced = 0
        #: Duration of each apply (each batch of margin calls), until collected.
        self.apply_seconds: list[float] = []

    def _apply(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        """Verify, recompute, store and answer each margin call, as the reference custodian does.

        Runs in the transaction that stores the batch: the call, its answer and
        the log entry carrying the answer commit before the acknowledgement.
        """
        begin = time.perf_counter()
        now = datetime.now(UTC)
        answers = []
        for sequence, update in updates:
            if update.WhichOneof("update") != "margin_call":
                _unexpected_variant("custodian", "margin_call", update)
            envelope = update.margin_call
            verified = verify_statement(
                envelope,
                self.registry,
                expected_type=margin_pb2.MarginCall,
                audience=_CUSTODIAN,
                now=now,
            )
            self._check_fresh_call(verified.issuer, verified.sequence)
            # Freshness was judged just now; the inputs are evidence at the call's issued_at.
            check = recompute_margin_call(
                envelope,
                self.registry,
                audience=_CUSTODIAN,
                now=verified.header.issued_at.ToDatetime(tzinfo=UTC),
            )
            (answered,) = self.connection.execute("SELECT count(*) FROM margin_calls").fetchone()
            response = sign_statement(
                margin_pb2.MarginCallResponse(
                    margin_call_id=check.margin_call.margin_call_id,
                    kind=margin_pb2.MARGIN_CALL_RESPONSE_KIND_AGREE,
                    agreed_amount=amount_to_proto(check.call_amount),
                ),
                self.key,
                audience=[_EXCHANGE],
                sequence=answered + 1,
                ttl=_STATEMENT_TTL,
                issued_at=now,
            )
            self.connection.execute(
                "INSERT INTO margin_calls VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    check.margin_call.margin_call_id,
                    verified.sequence,
                    check.margin_call.account_id,
                    format_amount(check.call_amount),
                    sequence,
                    envelope.SerializeToString(),
                    response.SerializeToString(),
                ),
            )
            answers.append(position_sync_pb2.PositionUpdate(margin_call_response=response))
        self.log.append(answers)
        self.apply_seconds.append(time.perf_counter() - begin)

    def _check_fresh_call(self, issuer: str, sequence: int) -> None:
        """The durable replay check: a call's statement sequence must be new."""
        if issuer != _EXCHANGE:
            raise VerificationError(
                f"margin call issued by {issuer!r}, expected the peer {_EXCHANGE!r}",
                reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": _EXCHANGE, "actual": issuer},
            )
        (last,) = self.connection.execute(
            "SELECT coalesce(max(statement_sequence), 0) FROM margin_calls"
        ).fetchone()
        if sequence <= last:
            raise VerificationError(
                f"margin call sequence {sequence} was already accepted (last {last})",
                reason=errors_pb2.ERROR_REASON_REPLAYED,
                metadata={"expected": f"> {last}", "actual": str(sequence)},
            )

    def announce_holdings(self, now: datetime) -> None:
        with self.log.transaction():
            self.log.append(
                _holdings_change(self.key, _margin_account(i), now) for i in range(_MARGIN_ACCOUNTS)
            )

    async def produce(
        self,
        count: int | None,
        *,
        rate: float | None = None,
        stop: asyncio.Event | None = None,
        first_commit: asyncio.Future[int] | None = None,
    ) -> tuple[int, int]:
        """Append updates live, in transactions, as a custodian's state changes would.

        Stops after ``count`` updates (or when ``stop`` is set), paced at
        ``rate`` per second if given; never lets more than :data:`_BACKLOG_LIMIT`
        updates wait unacknowledged. Returns (last sequence, updates appended).
        """
        log, session, pool = self.log, self.session, self.pool
        loop = asyncio.get_running_loop()
        begin = loop.time()
        head = log.sent_head().sequence
        appended = 0
        while (count is None or appended < count) and not (stop is not None and stop.is_set()):
            size = (
                TRANSACTION_UPDATES if count is None else min(TRANSACTION_UPDATES, count - appended)
            )
            if rate is not None:
                delay = begin + appended / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing, not waiting for an event
            if head - session.acknowledged_sequence >= _BACKLOG_LIMIT:
                await session.wait_acknowledged(head - _BACKLOG_LIMIT + size)
            start = self._produced
            chunk = [pool[(start + i) % len(pool)] for i in range(size)]
            with log.transaction():
                head = log.append(chunk).sequence
            self._produced += size
            appended += size
            if first_commit is not None and not first_commit.done():
                first_commit.set_result(head)
            # Let the session send what just committed before the next transaction.
            await asyncio.sleep(0)
        return head, appended


class _CustodianSync(custodian_service_pb2_grpc.CustodianServiceServicer):
    """SyncPositions as the reference custodian serves it: the SDK adapter around its session."""

    def __init__(self, session: SyncSession) -> None:
        self._session = session

    async def SyncPositions(  # type: ignore[override]  # noqa: N802 (generated gRPC method name)
        self,
        request_iterator: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await serve_sync_stream(self._session, request_iterator, context)


class _RawStream(custodian_service_pb2_grpc.CustodianServiceServicer):
    """The per-message baseline: one message per update, one ack each, no SDK in the path."""

    def __init__(self, message: custodian_service_pb2.SyncPositionsResponse) -> None:
        self._message = message
        self._armed: tuple[int, asyncio.Future[float]] | None = None

    def arm(self, count: int) -> asyncio.Future[float]:
        result: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._armed = (count, result)
        return result

    async def SyncPositions(  # type: ignore[override]  # noqa: N802 (generated gRPC method name)
        self,
        request_iterator: AsyncIterator[custodian_service_pb2.SyncPositionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if self._armed is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "raw stream not armed")
            return
        count, result = self._armed
        self._armed = None
        requests = aiter(request_iterator)
        try:
            await anext(requests)  # the client's start signal
            begin = time.perf_counter()
            message = self._message

            async def write_all() -> None:
                for _ in range(count):
                    await context.write(message)

            writer = asyncio.create_task(write_all())
            try:
                acknowledged = 0
                async for request in requests:
                    acknowledged = request.frame.ack.sequence
                    if acknowledged >= count:
                        break
                await writer
            finally:
                writer.cancel()
        except BaseException as err:
            result.set_exception(RuntimeError(f"raw stream failed: {err!r}"))
            raise
        if acknowledged < count:
            result.set_exception(
                RuntimeError(f"raw stream: {acknowledged} of {count} messages acknowledged")
            )
        else:
            result.set_result(time.perf_counter() - begin)


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _custodian_main(workdir: Path, pool_size: int) -> None:
    custodian = _Custodian(workdir, pool_size, _StorageSpec.load(workdir))
    # Its metrics as a reference custodian has them; the parent scrapes them in runs "on".
    metrics = party_metrics(_CUSTODIAN, "custodian", lambda: (custodian.session,))
    # Spans recorded and exported only in runs "tracing on" (the parent says which).
    tracing = SwitchableTracing.of_process()
    try:
        await _serve_commands(custodian, workdir, metrics)
    finally:
        tracing.shutdown()
        metrics.stop()
        custodian.database.close()


async def _serve_commands(custodian: _Custodian, workdir: Path, metrics: ServerMetrics) -> None:
    custodian.announce_holdings(datetime.now(UTC))
    raw = _RawStream(_raw_message(custodian.key))  # type: ignore[abstract]
    tls = _tls(workdir, _CUSTODIAN)
    # Only SyncPositions is served; the generated base answers UNIMPLEMENTED to the rest.
    sync_servicer = _CustodianSync(custodian.session)  # type: ignore[abstract]
    sync_server = create_server(
        tls=tls, servicers=[sync_servicer], interceptors=metrics.interceptors()
    )
    raw_server = create_server(tls=tls, servicers=[raw])
    background: tuple[asyncio.Task[tuple[int, int]], asyncio.Event, float] | None = None
    async with serve(sync_server, grace=0) as sync_port, serve(raw_server, grace=0) as raw_port:
        reader = await _stdin_reader()
        ports = {"sync_port": sync_port, "raw_port": raw_port, "metrics": metrics.start()}
        _reply({"ready": True, **ports})
        async with asyncio.timeout(_CHILD_LIFETIME):
            while True:
                line = await reader.readline()
                if not line:
                    return  # the exchange is gone: so are we
                command = json.loads(line)
                op = command["op"]
                if op == "quit":
                    _reply({"ok": True})
                    return
                if op == "raw":
                    result = raw.arm(command["messages"])
                    _reply({"armed": True})
                    async with asyncio.timeout(command["timeout"]):
                        elapsed = await result
                    _reply({"elapsed": elapsed})
                elif op == "sync":
                    _reply(await _timed_sync(custodian, command["updates"], command["timeout"]))
                elif op == "background-start":
                    stop = asyncio.Event()
                    first: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                    begin = time.perf_counter()
                    task = asyncio.create_task(
                        custodian.produce(None, rate=command["rate"], stop=stop, first_commit=first)
                    )
                    background = (task, stop, begin)
                    waiters: set[asyncio.Future[Any]] = {first, task}
                    async with asyncio.timeout(_START_TIMEOUT):
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                        if task.done():
                            task.result()  # raises what stopped it
                        await custodian.session.wait_acknowledged(first.result())
                    _reply({"started": True})
                elif op == "background-stop":
                    if background is None:
                        raise RuntimeError("background-stop without background-start")
                    task, stop, begin = background
                    background = None
                    stop.set()
                    async with asyncio.timeout(command["timeout"]):
                        last, appended = await task
                        await custodian.session.wait_acknowledged(last)
                    elapsed = time.perf_counter() - begin
                    _reply({"updates": appended, "elapsed": elapsed})
                elif op == "tracing":
                    SwitchableTracing.of_process().on = bool(command["on"])
                    _reply({"ok": True})
                elif op == "apply-times":
                    _reply({"seconds": custodian.apply_seconds})
                    custodian.apply_seconds = []
                elif op == "state":
                    # Quiet first: everything we sent (answers included) acknowledged.
                    async with asyncio.timeout(_ACK_TIMEOUT):
                        await custodian.session.wait_acknowledged(
                            custodian.session.sent_head.sequence
                        )
                    (stored,) = custodian.connection.execute(
                        "SELECT count(*) FROM margin_calls"
                    ).fetchone()
                    _reply(
                        {
                            "margin_calls": stored,
                            "sent_sequence": custodian.session.sent_head.sequence,
                            "received_sequence": custodian.session.received_head.sequence,
                            "acknowledged_sequence": custodian.session.acknowledged_sequence,
                        }
                    )
                else:
                    raise ValueError(f"unknown command {op!r}")


async def _timed_sync(custodian: _Custodian, updates: int, timeout: float) -> dict[str, Any]:
    cpu = _cpu_seconds()
    begin = time.perf_counter()
    async with asyncio.timeout(timeout):
        last, _ = await custodian.produce(updates)
        await custodian.session.wait_acknowledged(last)
    return {
        "elapsed": time.perf_counter() - begin,
        "cpu": _cpu_seconds() - cpu,
        "last_sequence": last,
    }


def _child(argv: Sequence[str]) -> int:
    """Entry of the custodian process: ``python -m collateral_sync_benchmarks.sync WORKDIR POOL``."""
    workdir, pool_size = Path(argv[0]), int(argv[1])
    try:
        asyncio.run(_custodian_main(workdir, pool_size))
    except BaseException:  # noqa: BLE001 — reported to the parent, which raises it
        _reply({"error": traceback.format_exc()})
        return 1
    return 0
