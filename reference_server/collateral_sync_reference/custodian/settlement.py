"""The custodian's settlement cycles: pending instructions, the dispute window, the daily cap.

docs/PROTOCOL.md §10.4. The exchange nets what each account owes after a
reconciliation and signs one :class:`SettlementInstruction` per account and
asset (``SubmitSettlementInstruction``). The instructions of one cut-off
(``cutoff_id``) form one *cycle*; the custodian counts cycles per exchange and
UTC day (of the instruction's issued_at) and refuses the first instruction of a cycle
beyond the policy's ``max_settlement_cycles_per_day`` with RESOURCE_EXHAUSTED
(LIMIT_EXCEEDED), changing nothing. ``cycle_of_day`` must be the number the
custodian counts (above the cap: LIMIT_EXCEEDED too).

An accepted instruction is PENDING until its dispute deadline: the later of
the deadline it carries and receipt plus the policy's
``settlement_dispute_window``. Until then the custodian or the exchange may
dispute it (``DisputeSettlement``: DISPUTED, never executed); at or after the
deadline a dispute is refused (FAILED_PRECONDITION, STATE_CONFLICT). When the
deadline passes undisputed the custodian executes it: a positive net amount
leaves the client's account out of its pledge and enters the exchange's
account ``<exchange_id>/settlement`` at the custodian; a negative one moves
the other way (unpledged). Both accounts get a holdings statement with reason
SETTLEMENT, the client's announced to the exchange like any change. If the
funds are no longer there at execution the custodian disputes the
instruction itself instead of moving part of it.

The policy figures are the ones the exchange last sent on the sync stream, the
pilot's (2 cycles, 24 h) for an exchange that sent none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from collateral_sync.amounts import amount_from_proto, format_amount
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    StateError,
    VerificationError,
)
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
)

from collateral_sync_reference.common.errors import conflict as _conflict
from collateral_sync_reference.common.errors import required as _required
from collateral_sync_reference.custodian.emergency import exchange_risk_policy
from collateral_sync_reference.custodian.ledger import Ledger, _add, _Change, _sub
from collateral_sync_reference.custodian.store import Account, from_us, to_us

__all__ = [
    "PILOT_MAX_SETTLEMENT_CYCLES_PER_DAY",
    "PILOT_SETTLEMENT_DISPUTE_WINDOW",
    "CustodianSettlement",
]

_R = errors_pb2.ErrorReason
_S = reconciliation_pb2.SettlementStatus
_SETTLEMENT = attestation_pb2.HOLDINGS_CHANGE_REASON_SETTLEMENT
_LOGGER = logging.getLogger("collateral_sync_reference.custodian")

PILOT_MAX_SETTLEMENT_CYCLES_PER_DAY = 2
PILOT_SETTLEMENT_DISPUTE_WINDOW = timedelta(hours=24)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS custodian_settlements (
        settlement_id TEXT PRIMARY KEY,
        exchange_id TEXT NOT NULL,
        day TEXT NOT NULL,
        cutoff_id TEXT NOT NULL,
        cycle_of_day INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        net_amount TEXT NOT NULL,
        status INTEGER NOT NULL,
        dispute_deadline_us INTEGER NOT NULL,
        payload BLOB NOT NULL,
        instruction BLOB NOT NULL,
        dispute BLOB,
        attestation BLOB
    )""",
    """CREATE INDEX IF NOT EXISTS custodian_settlements_due
        ON custodian_settlements (status, dispute_deadline_us)""",
)


@dataclass(frozen=True, slots=True)
class _Settlement:
    settlement_id: str
    exchange_id: str
    account_id: str
    asset_id: str
    net_amount: Decimal
    status: int
    dispute_deadline: datetime
    payload: bytes
    instruction: envelope_pb2.Envelope
    dispute: envelope_pb2.Envelope | None
    attestation: attestation_pb2.AttestationRef | None


def settlement_account_id(exchange_id: str) -> str:
    """The exchange's own account at the custodian, where settlements land."""
    return f"{exchange_id}/settlement"


class CustodianSettlement:
    """SubmitSettlementInstruction, DisputeSettlement, GetSettlement and their execution."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        ledger.storage.execute_schema("custodian.settlement", _SCHEMA)
        self._db = ledger.storage.connection

    # ------------------------------------------------------------------ policy

    def _limits(self, exchange_id: str) -> tuple[int, timedelta]:
        policy = exchange_risk_policy(self._ledger, exchange_id)
        if policy is None:
            return PILOT_MAX_SETTLEMENT_CYCLES_PER_DAY, PILOT_SETTLEMENT_DISPUTE_WINDOW
        window = (
            policy.settlement_dispute_window.ToTimedelta()
            if policy.HasField("settlement_dispute_window")
            else PILOT_SETTLEMENT_DISPUTE_WINDOW
        )
        return policy.max_settlement_cycles_per_day, window

    # ------------------------------------------------------------------ reads

    def _row(self, settlement_id: str) -> _Settlement | None:
        row = self._db.execute(
            "SELECT settlement_id, exchange_id, account_id, asset_id, net_amount, status, "
            "dispute_deadline_us, payload, instruction, dispute, attestation "
            "FROM custodian_settlements WHERE settlement_id = ?",
            (settlement_id,),
        ).fetchone()
        if row is None:
            return None
        return _Settlement(
            settlement_id=row[0],
            exchange_id=row[1],
            account_id=row[2],
            asset_id=row[3],
            net_amount=Decimal(row[4]),
            status=row[5],
            dispute_deadline=from_us(row[6]),
            payload=bytes(row[7]),
            instruction=envelope_pb2.Envelope.FromString(bytes(row[8])),
            dispute=None if row[9] is None else envelope_pb2.Envelope.FromString(bytes(row[9])),
            attestation=None
            if row[10] is None
            else attestation_pb2.AttestationRef.FromString(bytes(row[10])),
        )

    def readers(self, settlement_id: str) -> frozenset[str] | None:
        """Who may read a settlement (PROTOCOL.md §4.5): its exchange and its account's parties."""
        if not settlement_id:
            raise _required("settlement_id", "a settlement id")
        found = self._row(settlement_id)
        if found is None:
            return None
        parties = {found.exchange_id}
        account = self._ledger.store.account(found.account_id)
        if account is not None:
            parties |= {account.client_id, account.exchange_id} - {""}
        return frozenset(parties)

    def get(self, settlement_id: str) -> custodian_service_pb2.GetSettlementResponse:
        if not settlement_id:
            raise _required("settlement_id", "a settlement id")
        found = self._row(settlement_id)
        if found is None:
            raise StateError(
                f"unknown settlement {settlement_id!r}",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={
                    "field": "settlement_id",
                    "expected": "a known settlement",
                    "actual": settlement_id,
                },
            )
        response = custodian_service_pb2.GetSettlementResponse(
            settlement_instruction=found.instruction,
            status=found.status,  # type: ignore[arg-type]
        )
        response.dispute_deadline.FromDatetime(found.dispute_deadline)
        if found.attestation is not None:
            response.attestation.CopyFrom(found.attestation)
        if found.dispute is not None:
            response.settlement_dispute.CopyFrom(found.dispute)
        return response

    # ------------------------------------------------------------------ submission

    def submit(
        self, envelope: envelope_pb2.Envelope
    ) -> custodian_service_pb2.SubmitSettlementInstructionResponse:
        ledger = self._ledger
        now = ledger.clock.now()
        verified = ledger._verify(envelope, reconciliation_pb2.SettlementInstruction, now)
        instruction = verified.message
        exchange_id = verified.issuer
        if exchange_id not in ledger.exchanges:
            expected = "|".join(ledger.exchanges) or "a configured exchange"
            raise VerificationError(
                f"settlement instructions come from the exchanges this custodian serves "
                f"({expected}), not {exchange_id!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": expected, "actual": exchange_id},
            )
        for name in ("settlement_id", "cutoff_id", "account_id", "asset_id"):
            if not getattr(instruction, name):
                raise _required(name, f"a {name.replace('_', ' ')}")
        if not instruction.HasField("net_amount"):
            raise _required("net_amount", "a decimal amount")
        net = amount_from_proto(instruction.net_amount, field="net_amount")
        if net == 0:
            raise MalformedError(
                "net_amount must not be 0: nothing to settle",
                reason=_R.ERROR_REASON_INVALID_AMOUNT,
                metadata={"field": "net_amount", "expected": "!= 0", "actual": "0"},
                field_violations={"net_amount": "must not be 0"},
            )
        account = ledger._account(instruction.account_id, "account_id")
        if account.exchange_id != exchange_id:
            raise _conflict(
                f"account {account.account_id!r} is pledged to "
                f"{account.exchange_id or 'no exchange'!r}, not to {exchange_id!r}",
                "account_id",
                exchange_id,
                account.exchange_id,
            )
        house = ledger._account(settlement_account_id(exchange_id), "account_id")
        ledger._asset(instruction.asset_id, "asset_id")

        existing = self._row(instruction.settlement_id)
        if existing is not None:
            if existing.payload != verified.payload:
                raise _conflict(
                    f"settlement {instruction.settlement_id!r} exists with other content",
                    "settlement_id",
                    "a new settlement id",
                    instruction.settlement_id,
                )
            return self._answer(existing.status, existing.dispute_deadline)
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)

        max_cycles, window = self._limits(exchange_id)
        # The cycle's day is the instruction's (PROTOCOL.md §10.6), fresh within max_skew.
        day = verified.header.issued_at.ToDatetime(tzinfo=UTC).date().isoformat()
        if instruction.cycle_of_day > max_cycles:
            raise CollateralSyncError(
                f"cycle {instruction.cycle_of_day} of {day}; the policy allows {max_cycles} a day",
                reason=_R.ERROR_REASON_LIMIT_EXCEEDED,
                metadata={
                    "field": "cycle_of_day",
                    "expected": f"<= {max_cycles}",
                    "actual": str(instruction.cycle_of_day),
                },
            )
        cycles = dict(
            self._db.execute(
                "SELECT cutoff_id, MIN(cycle_of_day) FROM custodian_settlements "
                "WHERE exchange_id = ? AND day = ? GROUP BY cutoff_id",
                (exchange_id, day),
            ).fetchall()
        )
        cycle = cycles.get(instruction.cutoff_id)
        if cycle is None:
            if len(cycles) >= max_cycles:
                raise CollateralSyncError(
                    f"{len(cycles)} settlement cycles of {exchange_id!r} on {day} already; "
                    f"the policy allows {max_cycles} a day",
                    reason=_R.ERROR_REASON_LIMIT_EXCEEDED,
                    metadata={
                        "field": "cutoff_id",
                        "expected": f"<= {max_cycles} cycles on {day}",
                        "actual": str(len(cycles) + 1),
                    },
                )
            cycle = len(cycles) + 1
        if instruction.cycle_of_day != cycle:
            raise _conflict(
                f"cut-off {instruction.cutoff_id!r} is cycle {cycle} of {day}, "
                f"the instruction says {instruction.cycle_of_day}",
                "cycle_of_day",
                str(cycle),
                str(instruction.cycle_of_day),
            )
        self._check_funds(account, house, instruction.asset_id, net)
        deadline = max(now + window, instruction.dispute_deadline.ToDatetime(tzinfo=UTC))
        with ledger.storage.transaction():
            self._db.execute(
                "INSERT INTO custodian_settlements (settlement_id, exchange_id, day, cutoff_id, "
                "cycle_of_day, account_id, asset_id, net_amount, status, dispute_deadline_us, "
                "payload, instruction) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    instruction.settlement_id,
                    exchange_id,
                    day,
                    instruction.cutoff_id,
                    cycle,
                    account.account_id,
                    instruction.asset_id,
                    format_amount(net),
                    _S.SETTLEMENT_STATUS_PENDING,
                    to_us(deadline),
                    verified.payload,
                    envelope.SerializeToString(),
                ),
            )
            ledger.guard.record(verified)
        return self._answer(_S.SETTLEMENT_STATUS_PENDING, deadline)

    @staticmethod
    def _answer(
        status: int, deadline: datetime
    ) -> custodian_service_pb2.SubmitSettlementInstructionResponse:
        response = custodian_service_pb2.SubmitSettlementInstructionResponse(
            status=status,  # type: ignore[arg-type]
        )
        response.dispute_deadline.FromDatetime(deadline)
        return response

    @staticmethod
    def _check_funds(client: Account, house: Account, asset_id: str, net: Decimal) -> None:
        """The payer must hold the amount: the client out of its pledge, the exchange free."""
        if net > 0:
            holding = client.holding(asset_id)
            available = min(holding.pledged, _sub(holding.quantity, holding.locked))
            payer = client.account_id
        else:
            holding = house.holding(asset_id)
            available = _sub(_sub(holding.quantity, holding.locked), holding.pledged)
            payer = house.account_id
        if abs(net) > available:
            raise _conflict(
                f"{payer!r} can pay {format_amount(available)} {asset_id}, "
                f"the settlement needs {format_amount(abs(net))}",
                "net_amount",
                f"<= {format_amount(available)}",
                format_amount(abs(net)),
            )

    # ------------------------------------------------------------------ disputes

    def dispute(
        self, envelope: envelope_pb2.Envelope
    ) -> custodian_service_pb2.DisputeSettlementResponse:
        ledger = self._ledger
        now = ledger.clock.now()
        verified = ledger._verify(envelope, reconciliation_pb2.SettlementDispute, now)
        dispute = verified.message
        if not dispute.settlement_id:
            raise _required("settlement_id", "a settlement id")
        found = self._row(dispute.settlement_id)
        if found is None:
            self.get(dispute.settlement_id)  # raises NOT_FOUND
            raise AssertionError  # pragma: no cover
        # Either side of this settlement: us, or the exchange that instructed it.
        if verified.issuer not in (ledger.party_id, found.exchange_id):
            raise VerificationError(
                f"settlement {found.settlement_id!r} is between {ledger.party_id!r} and "
                f"{found.exchange_id!r}; {verified.issuer!r} may not dispute it",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={
                    "expected": f"{ledger.party_id}|{found.exchange_id}",
                    "actual": verified.issuer,
                },
            )
        if (
            found.status == _S.SETTLEMENT_STATUS_DISPUTED
            and found.dispute is not None
            and found.dispute.payload == verified.payload
        ):
            return custodian_service_pb2.DisputeSettlementResponse(status=found.status)  # type: ignore[arg-type]
        if found.status != _S.SETTLEMENT_STATUS_PENDING or now >= found.dispute_deadline:
            raise _conflict(
                f"settlement {found.settlement_id!r} is "
                f"{_S.Name(_S.ValueType(found.status)).removeprefix('SETTLEMENT_STATUS_')}; its dispute "
                f"window closed at {found.dispute_deadline.isoformat()}",
                "settlement_id",
                f"a PENDING settlement before {found.dispute_deadline.isoformat()}",
                f"{_S.Name(_S.ValueType(found.status))} at {now.isoformat()}",
            )
        ledger.guard.check(verified.issuer, verified.payload_type, verified.sequence)
        with ledger.storage.transaction():
            self._db.execute(
                "UPDATE custodian_settlements SET status = ?, dispute = ? WHERE settlement_id = ?",
                (_S.SETTLEMENT_STATUS_DISPUTED, envelope.SerializeToString(), found.settlement_id),
            )
            ledger.guard.record(verified)
        return custodian_service_pb2.DisputeSettlementResponse(status=_S.SETTLEMENT_STATUS_DISPUTED)

    # ------------------------------------------------------------------ execution

    def next_due(self) -> datetime | None:
        row = self._db.execute(
            "SELECT MIN(dispute_deadline_us) FROM custodian_settlements WHERE status = ?",
            (_S.SETTLEMENT_STATUS_PENDING,),
        ).fetchone()
        return None if row[0] is None else from_us(row[0])

    def run_due(self) -> None:
        """Execute every pending settlement whose dispute window has passed."""
        now = self._ledger.clock.now()
        due = [
            settlement_id
            for (settlement_id,) in self._db.execute(
                "SELECT settlement_id FROM custodian_settlements "
                "WHERE status = ? AND dispute_deadline_us <= ? ORDER BY dispute_deadline_us",
                (_S.SETTLEMENT_STATUS_PENDING, to_us(now)),
            ).fetchall()
        ]
        for settlement_id in due:
            found = self._row(settlement_id)
            if found is not None:
                self._execute(found, now)

    def _execute(self, settlement: _Settlement, now: datetime) -> None:
        ledger = self._ledger
        client = ledger._account(settlement.account_id, "account_id")
        house = ledger._account(settlement_account_id(settlement.exchange_id), "account_id")
        net = settlement.net_amount
        asset_id = settlement.asset_id
        try:
            self._check_funds(client, house, asset_id, net)
        except StateError as err:
            # Never a partial move: the custodian disputes what it can no longer pay.
            _LOGGER.warning("settlement %s not executed: %s", settlement.settlement_id, err.message)
            with ledger.storage.transaction():
                self._db.execute(
                    "UPDATE custodian_settlements SET status = ? WHERE settlement_id = ?",
                    (_S.SETTLEMENT_STATUS_DISPUTED, settlement.settlement_id),
                )
            return
        with ledger.storage.transaction():
            own = client.holding(asset_id)
            exchange = house.holding(asset_id)
            if net > 0:
                own.quantity = _sub(own.quantity, net)
                own.pledged = _sub(own.pledged, net)
                exchange.quantity = _add(exchange.quantity, net)
            else:
                exchange.quantity = _sub(exchange.quantity, -net)
                own.quantity = _add(own.quantity, -net)
            [(_, ref), _] = ledger._attest(
                [_Change(client, _SETTLEMENT), _Change(house, _SETTLEMENT)], now
            )
            if net > 0:
                ledger._announce_pledges(client, [asset_id], ref)
            self._db.execute(
                "UPDATE custodian_settlements SET status = ?, attestation = ? "
                "WHERE settlement_id = ?",
                (_S.SETTLEMENT_STATUS_EXECUTED, ref.SerializeToString(), settlement.settlement_id),
            )
