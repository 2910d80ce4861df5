"""The exchange side of the sync benchmark (this process): it dials the custodian's child process.

Its sync log, session and risk policy, the margin calls it signs, and the
guard that bounds every wait on the child or the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from collateral_sync.amounts import amount_to_proto, check_amount
from collateral_sync.errors import MalformedError, StateError, VerificationError
from collateral_sync.signing import VerifiedStatement, sign_statement, verify_statement
from collateral_sync.sync import EXCHANGE_TO_CUSTODIAN, SyncLog, SyncSession
from collateral_sync.v1 import (
    attestation_pb2,
    envelope_pb2,
    errors_pb2,
    margin_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import collateral_ratio, margin_call_amount, value_collateral
from google.protobuf.message import Message

from collateral_sync_benchmarks.sync._fixtures import (
    _ACK_TIMEOUT,
    _CUSTODIAN,
    _EXCHANGE,
    _STATEMENT_TTL,
    _STOP_TIMEOUT,
    _party_keys,
    _quote,
    _risk_policy,
    _unexpected_variant,
)
from collateral_sync_benchmarks.sync._storage import (
    POSITION_UPSERT,
    POSITIONS_SCHEMA,
    _Database,
    _StorageSpec,
)

# Helpers for the sibling modules only: nothing here is API.
__all__: list[str] = []

_EXPOSURE = Decimal("60000")

_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)


class _RunError(RuntimeError):
    """The run cannot go on: the custodian process, the stream or an end-to-end check failed."""


class _CustodianProcess:
    """The child process and its command channel (JSON lines on stdin/stdout)."""

    def __init__(self, process: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self._process = process
        self._stderr_path = stderr_path

    @classmethod
    async def start(cls, workdir: Path, pool_size: int, storage: _StorageSpec) -> _CustodianProcess:
        storage.save(workdir)  # the child reads where its database is from there
        stderr_path = workdir / "custodian.stderr"
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "collateral_sync_benchmarks.sync",
                str(workdir),
                str(pool_size),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        return cls(process, stderr_path)

    async def send(self, command: dict[str, Any]) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(command).encode() + b"\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as err:
            raise self._failure(f"cannot send {command['op']!r}") from err

    async def receive(self, timeout: float, what: str) -> dict[str, Any]:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await stdout.readline()
        except TimeoutError:
            raise self._failure(f"no answer to {what} within {timeout:.0f} s") from None
        if not line:
            await self._reap()
            raise self._failure(f"exited during {what}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise _RunError(f"custodian process failed during {what}:\n{reply['error']}")
        return reply

    async def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        await self.send(command)
        return await self.receive(timeout, repr(command["op"]))

    def describe(self) -> str:
        code = self._process.returncode
        return "running" if code is None else f"exited with code {code}"

    def _failure(self, what: str) -> _RunError:
        try:
            tail = self._stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        return _RunError(
            f"custodian process ({self.describe()}): {what}"
            + (f"\n--- its stderr ---\n{tail}" if tail.strip() else "")
        )

    async def _reap(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_TIMEOUT):
                await self._process.wait()

    async def stop(self) -> None:
        """Ask it to quit; kill it (our own child, by its pid) if it does not."""
        process = self._process
        if process.returncode is None:
            with contextlib.suppress(Exception):
                await self.ask({"op": "quit"}, _STOP_TIMEOUT)
            if process.stdin is not None:
                process.stdin.close()
            await self._reap()
        if process.returncode is None:
            process.kill()
            await process.wait()


class _Exchange:
    """The exchange: its database (either engine), sync log and session, its policy, its calls."""

    def __init__(self, workdir: Path, now: datetime, storage: _StorageSpec) -> None:
        _, self.key, self.registry = _party_keys()
        self.database = _Database(storage, workdir, "exchange")
        self.connection = self.database.connection
        for statement in (
            POSITIONS_SCHEMA.format(table="positions"),
            "CREATE TABLE IF NOT EXISTS holdings (account_id TEXT PRIMARY KEY, "
            "epoch INTEGER NOT NULL, envelope BLOB NOT NULL)",
            "CREATE TABLE IF NOT EXISTS margin_calls (margin_call_id TEXT PRIMARY KEY, "
            "account_id TEXT NOT NULL, call_amount TEXT NOT NULL, sequence INTEGER NOT NULL, "
            "envelope BLOB NOT NULL, status TEXT NOT NULL, agreed_amount TEXT, response BLOB)",
        ):
            self.connection.execute(statement)
        self.log = SyncLog(
            self.connection,
            party_id=_EXCHANGE,
            peer_party_id=_CUSTODIAN,
            sending_direction=EXCHANGE_TO_CUSTODIAN,
        )
        self.session = SyncSession(self.log, self.key, self.registry, apply=self._apply)
        self.policy = _risk_policy(now)
        self.policy_envelope = sign_statement(
            self.policy, self.key, audience=["*"], sequence=1, ttl=timedelta(days=30), issued_at=now
        )
        self._calls = 0

    def _apply(self, updates: list[tuple[int, position_sync_pb2.PositionUpdate]]) -> None:
        """Write each update into the exchange's tables in the transaction that stores its batch."""
        now = datetime.now(UTC)
        pledges = []
        holdings = []
        for sequence, update in updates:
            variant = update.WhichOneof("update")
            if variant == "pledge_change":
                change = update.pledge_change
                if not change.account_id or not change.asset_id:
                    raise MalformedError(
                        f"entry {sequence}: pledge_change without account or asset id",
                        metadata={"expected": "non-empty ids", "actual": "''"},
                    )
                quantity = check_amount(
                    change.pledged_quantity.value, field="pledge_change.pledged_quantity"
                )
                pledges.append(
                    (
                        change.account_id,
                        change.asset_id,
                        quantity,
                        sequence,
                        change.attestation.SerializeToString(),
                    )
                )
            elif variant == "holdings_change":
                envelope = update.holdings_change.holdings_statement
                statement = self._from_custodian(
                    envelope, attestation_pb2.HoldingsStatement, now
                ).message
                holdings.append(
                    (statement.account_id, statement.epoch, envelope.SerializeToString())
                )
            elif variant == "margin_call_response":
                self._receive_response(update.margin_call_response, now)
            else:
                _unexpected_variant(
                    "exchange", "pledge_change|holdings_change|margin_call_response", update
                )
        if pledges:
            self.connection.executemany(POSITION_UPSERT.format(table="positions"), pledges)
        if holdings:
            self.connection.executemany(
                "INSERT INTO holdings VALUES (?, ?, ?) ON CONFLICT (account_id) "
                "DO UPDATE SET epoch = excluded.epoch, envelope = excluded.envelope",
                holdings,
            )

    def _from_custodian(
        self, envelope: envelope_pb2.Envelope, expected_type: type[_M], now: datetime
    ) -> VerifiedStatement[_M]:
        verified = verify_statement(
            envelope, self.registry, expected_type=expected_type, audience=_EXCHANGE, now=now
        )
        if verified.issuer != _CUSTODIAN:
            raise VerificationError(
                f"{verified.payload_type} issued by {verified.issuer!r}, expected {_CUSTODIAN!r}",
                reason=errors_pb2.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": _CUSTODIAN, "actual": verified.issuer},
            )
        return verified

    def _receive_response(self, envelope: envelope_pb2.Envelope, now: datetime) -> None:
        response = self._from_custodian(envelope, margin_pb2.MarginCallResponse, now).message
        if response.kind != margin_pb2.MARGIN_CALL_RESPONSE_KIND_AGREE:
            raise VerificationError(
                f"the custodian answered {response.margin_call_id} with "
                f"{margin_pb2.MarginCallResponseKind.Name(response.kind)}: {response.dispute_detail}",
                reason=errors_pb2.ERROR_REASON_PROOF_INVALID,
                metadata={"expected": "AGREE", "actual": str(response.kind)},
            )
        changed = self.connection.execute(
            "UPDATE margin_calls SET status = 'AGREED', agreed_amount = ?, response = ? "
            "WHERE margin_call_id = ? AND status = 'ISSUED'",
            (response.agreed_amount.value, envelope.SerializeToString(), response.margin_call_id),
        ).rowcount
        if changed != 1:
            raise StateError(
                f"response to margin call {response.margin_call_id!r}, which is not ISSUED here",
                metadata={"expected": "an ISSUED call", "actual": response.margin_call_id},
            )

    def agreed_calls(self) -> int:
        """Margin calls the custodian recomputed and agreed in full."""
        (count,) = self.connection.execute(
            "SELECT count(*) FROM margin_calls WHERE status = 'AGREED' "
            "AND agreed_amount = call_amount"
        ).fetchone()
        return int(count)

    def holdings_count(self) -> int:
        (count,) = self.connection.execute("SELECT count(*) FROM holdings").fetchone()
        return int(count)

    async def margin_call(
        self, account_id: str, btc_price: str, guard: _Guard
    ) -> tuple[float, float]:
        """Seconds from a breaching price to the custodian's durable acknowledgement of the call.

        Also the seconds until the call was committed to our log, ready to send.
        """
        begin = time.perf_counter()
        now = datetime.now(UTC)
        self._calls += 1
        number = self._calls
        (stored,) = self.connection.execute(
            "SELECT envelope FROM holdings WHERE account_id = ?", (account_id,)
        ).fetchone()
        holdings_envelope = envelope_pb2.Envelope.FromString(stored)
        holdings = attestation_pb2.HoldingsStatement.FromString(holdings_envelope.payload)
        snapshot = valuation_pb2.PriceSnapshot(
            prices=[
                _quote("BTC", btc_price, now),
                _quote("USDC", "1", now),
                _quote("BENJI", "1", now),
            ]
        )
        snapshot_envelope = sign_statement(
            snapshot,
            self.key,
            audience=[_CUSTODIAN],
            sequence=number,
            ttl=_STATEMENT_TTL,
            issued_at=now,
        )
        valuation = value_collateral(
            self.policy, holdings.positions, snapshot.prices, valued_at=now
        )
        value = valuation.collateral_value
        amount = margin_call_amount(self.policy, value, _EXPOSURE)
        ratio = collateral_ratio(self.policy, value, _EXPOSURE)
        if amount is None or ratio is None:
            raise RuntimeError(f"BTC at {btc_price} is no breach for {account_id}")
        call = margin_pb2.MarginCall(
            margin_call_id=f"mc-{number}",
            account_id=account_id,
            inputs=valuation_pb2.ValuationInputs(
                risk_policy=self.policy_envelope,
                holdings_statements=[holdings_envelope],
                price_snapshot=snapshot_envelope,
            ),
            risk_policy_version=self.policy.version,
            exposure=amount_to_proto(_EXPOSURE),
            collateral_value=amount_to_proto(value),
            collateral_ratio=amount_to_proto(ratio),
            call_amount=amount_to_proto(amount),
        )
        call.due_by.FromDatetime(now + self.policy.cure_period.ToTimedelta())
        envelope = sign_statement(
            call,
            self.key,
            audience=[_CUSTODIAN],
            sequence=number,
            ttl=_STATEMENT_TTL,
            issued_at=now,
        )
        # The exchange's record of the call and the log entry announcing it commit together.
        with self.log.transaction() as connection:
            head = self.log.append([position_sync_pb2.PositionUpdate(margin_call=envelope)])
            connection.execute(
                "INSERT INTO margin_calls VALUES (?, ?, ?, ?, ?, 'ISSUED', NULL, NULL)",
                (
                    call.margin_call_id,
                    account_id,
                    call.call_amount.value,
                    head.sequence,
                    envelope.SerializeToString(),
                ),
            )
        prepared = time.perf_counter()
        await guard.bounded(
            self.session.wait_acknowledged(head.sequence),
            _ACK_TIMEOUT,
            f"ack of {call.margin_call_id}",
        )
        return time.perf_counter() - begin, prepared - begin

    def close(self) -> None:
        self.database.close()


class _Guard:
    """Bounds waits, and turns a dead stream or custodian into an error instead of a hang."""

    def __init__(self, dial: asyncio.Task[None], custodian: _CustodianProcess) -> None:
        self._dial = dial
        self._custodian = custodian

    def check(self, what: str) -> None:
        if self._dial.done():
            error = None if self._dial.cancelled() else self._dial.exception()
            raise _RunError(
                f"{what}: the sync stream ended ({error!r}); custodian process "
                f"{self._custodian.describe()}"
            )

    async def bounded(self, awaitable: Awaitable[_T], seconds: float, what: str) -> _T:
        try:
            async with asyncio.timeout(seconds):
                return await awaitable
        except TimeoutError:
            self.check(what)
            raise _RunError(
                f"{what}: nothing within {seconds:.0f} s; custodian process "
                f"{self._custodian.describe()}"
            ) from None

    async def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A command to the custodian, failing early if the stream dies meanwhile."""
        await self._custodian.send(command)
        receive = asyncio.create_task(self._custodian.receive(timeout, repr(command["op"])))
        done, _ = await asyncio.wait({receive, self._dial}, return_when=asyncio.FIRST_COMPLETED)
        if receive not in done:
            receive.cancel()
            with contextlib.suppress(BaseException):
                await receive
            self.check(repr(command["op"]))
        return receive.result()
