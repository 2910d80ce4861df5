"""The acts of ``make demo`` that need the regulator: reconciliation, settlement, emergency release.

:class:`OverseenStory` runs the lifecycle of :class:`~collateral_sync_reference.demo.story.Story`
and then, with the regulator's server running beside the custodian and the
exchange, goes on through public interfaces only:

- a second account of the client's is pledged, and the three clocks are moved
  past a reconciliation cut-off: the regulator's signed ``ReconciliationResult``
  is fetched, verified with the SDK together with the two statements it
  compares, and printed (MATCHED);
- at the next cut-off the exchange's view is off by a difference its test-mode
  configuration injects: the result locates the break to its account, asset
  and field;
- the exchange runs a settlement cycle (``RunSettlementCycle``); the
  custodian holds the instruction until its dispute deadline and executes it
  once the clocks pass it;
- the client takes part of the second account's pledge back
  (:mod:`~collateral_sync_reference.demo.pledge_release`): the exchange
  refuses a release its policy does not allow at the account's exposure and
  consents to a smaller one, the custodian executes the consent;
- the custodian's process is killed: past the policy's staleness window the
  exchange raises no credit limit; the custodian restarts and the limit rises
  (:mod:`~collateral_sync_reference.demo.custodian_down`);
- the exchange's process is stopped; the regulator's officer signs an
  emergency release, the custodian co-signs it (``CoSignEmergencyRelease``),
  refuses to execute it before the policy's wait and executes it after, with a
  signed receipt and a holdings statement with reason RELEASE;
- the client redeems part of the released account: the custodian locks it
  (REDEMPTION_LOCK, ``settles_at`` 24 h later), refuses a second redemption of
  the same quantity while the lock holds, and settles it (REDEMPTION_SETTLED:
  quantity and locked both down) once the clocks pass ``settles_at``.

Clocks: every running server's clock moves by the same amount, the
regulator's first, so it is past a cut-off before the parties submit their
statements for it; before a cut-off the demo waits until both parties report
the same sync-log heads, so both statements state the same stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

import grpc
from collateral_sync.amounts import amount_to_proto, parse_amount
from collateral_sync.audit import EMERGENCY_RELEASE_ROLES, EMERGENCY_RELEASE_THRESHOLD
from collateral_sync.clients import CustodianClient, EmergencyReleaseClient, RegulatorClient
from collateral_sync.errors import RPCError, StateError
from collateral_sync.keys import KeyRegistry
from collateral_sync.reconciliation import compare_statements
from collateral_sync.signer import Signer
from collateral_sync.signing import sign_statement, verify_statement, verify_threshold
from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    emergency_pb2,
    emergency_release_service_pb2,
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    liquidation_pb2,
    position_sync_pb2,
    reconciliation_pb2,
    regulator_service_pb2,
    test_control_pb2,
    valuation_pb2,
)
from google.protobuf import duration_pb2

from collateral_sync_reference.demo import text as say
from collateral_sync_reference.demo.custodian_down import CustodianDownAct
from collateral_sync_reference.demo.facts import by_asset, decimal_of, positions_text, reason_name
from collateral_sync_reference.demo.pledge_release import PledgeReleaseAct
from collateral_sync_reference.demo.scenario import (
    BREAK,
    CLIENT,
    CLIENT_TTL,
    CUSTODIAN,
    EXCHANGE,
    HOUSE_ACCOUNT,
    PROCEEDS_ACCOUNT,
    REDEMPTION,
    REGULATOR,
    SECOND_ACCOUNT,
    SECOND_PLEDGE,
)
from collateral_sync_reference.demo.stage import Attested, Connections
from collateral_sync_reference.demo.story import Story

__all__ = ["OverseenStory", "RegulatorConnections"]

_R = errors_pb2.ErrorReason
_OUTCOME = reconciliation_pb2.ReconciliationOutcome
_SETTLEMENT = reconciliation_pb2.SettlementStatus
_REASON = attestation_pb2.HoldingsChangeReason
#: How long the regulator's release stays valid: beyond the wait it is made to sit out.
_RELEASE_TTL_BEYOND_WAIT = timedelta(days=1)
#: Past a deadline by this much: a clock exactly at it is not yet past it.
_PAST = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class RegulatorConnections:
    """The demo's clients for the regulator's part.

    ``regulator`` reads published results (as the demo's operator); the
    custodian is reached with the regulator's own TLS identity, since it is
    the regulator who brings an emergency release.
    """

    regulator: RegulatorClient
    custodian_as_regulator: CustodianClient
    custodian_cosigner: EmergencyReleaseClient


def _cutoff_id(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(by: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(by)
    return duration


def _span(by: timedelta) -> str:
    minutes = round(by.total_seconds() / 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def _field(field: int) -> str:
    return reconciliation_pb2.BreakField.Name(field).removeprefix("BREAK_FIELD_")  # type: ignore[arg-type]


def _heads(statement: reconciliation_pb2.ReconciliationStatement) -> str:
    parts = []
    for head in sorted(statement.sync_log_heads, key=lambda h: h.direction):
        name = position_sync_pb2.SyncDirection.Name(head.direction)
        arrow = "c->e" if name.endswith("CUSTODIAN_TO_EXCHANGE") else "e->c"
        parts.append(f"{arrow} {head.sequence}")
    return ", ".join(parts)


def _totals(statement: reconciliation_pb2.ReconciliationStatement) -> str:
    return " · ".join(
        f"{t.asset_id} {say.amount(t.quantity.value or '0')} "
        f"({say.amount(t.pledged_quantity.value or '0')} pledged)"
        for t in statement.totals
    )


class OverseenStory(Story, PledgeReleaseAct, CustodianDownAct):
    """The lifecycle, then reconciliation, settlement, a pledge release, the custodian down, an
    emergency release, a redemption (12-18)."""

    def __init__(
        self,
        parties: Connections,
        regulator: RegulatorConnections,
        registry: KeyRegistry,
        client_key: Signer,
        yield_time: time,
        *,
        regulator_key: Signer,
        cutoffs: tuple[time, time],
        exchange_goes_dark: Callable[[], Awaitable[int | None]],
        custodian_goes_down: Callable[[], Awaitable[None]],
        custodian_comes_back: Callable[[], Awaitable[int]],
    ) -> None:
        super().__init__(parties, registry, client_key, yield_time)
        self._r = regulator
        self._regulator_key = regulator_key
        self._regulator_sequence = itertools.count(1)
        self._cutoffs = cutoffs
        self._exchange_goes_dark = exchange_goes_dark
        self._custodian_goes_down = custodian_goes_down
        self._custodian_comes_back = custodian_comes_back
        self._matched_cutoff = ""

    async def run(self) -> None:
        await super().run()
        await self._matched_reconciliation()
        await self._break_located()
        await self._settlement_cycle()
        await self._pledge_release()
        await self._custodian_down()
        await self._emergency_release()
        await self._redemption()

    # ---------------------------------------------------------------- plumbing

    async def _advance(self, by: timedelta, *, exchange_running: bool = True) -> datetime:
        """Move every running server's clock by ``by``; the custodian's new time."""
        request = test_control_pb2.AdvanceClockRequest(by=_duration(by))
        # The regulator first: past a cut-off before any statement for it reaches it.
        await self._c.regulator_control.advance_clock(request)
        if exchange_running:
            await self._c.exchange_control.advance_clock(request)
        moved = await self._c.custodian_control.advance_clock(request)
        return self._clock.learn(moved.now)

    def _next_cutoff(self, now: datetime) -> datetime:
        found = [
            datetime.combine(now.date() + timedelta(days=days), moment, tzinfo=UTC)
            for days in (0, 1)
            for moment in self._cutoffs
        ]
        return min(moment for moment in found if moment > now)

    async def _pass_cutoff(self) -> str:
        """Wait until both parties state the same streams, then move the clocks past a cut-off."""
        heads = await self._until(
            "both servers to report the same sync-log heads", self._agreed_heads
        )
        now = self._clock.now()
        cutoff = self._next_cutoff(now)
        say.step(
            f"both parties hold the same sync logs ({sum(s for s, _ in heads.values())} entries); "
            f"the three clocks move {_span(cutoff - now)} forward, past the cut-off "
            f"{cutoff:%H:%M} UTC"
        )
        await self._advance(cutoff - now + timedelta(seconds=1))
        return _cutoff_id(cutoff)

    async def _result(
        self, cutoff_id: str
    ) -> tuple[
        reconciliation_pb2.ReconciliationResult,
        reconciliation_pb2.ReconciliationStatement,
        reconciliation_pb2.ReconciliationStatement,
    ]:
        """The regulator's result for ``cutoff_id``, verified with both statements it compares."""

        async def published() -> envelope_pb2.Envelope | None:
            try:
                response = await self._r.regulator.get_reconciliation_result(
                    regulator_service_pb2.GetReconciliationResultRequest(cutoff_id=cutoff_id)
                )
            except RPCError as err:
                # Not both statements in yet, or a party not asked yet: worth waiting for.
                if err.reason in (_R.ERROR_REASON_NOT_FOUND, _R.ERROR_REASON_STATE_CONFLICT):
                    return None
                raise
            return response.reconciliation_result

        envelope = await self._until(f"{REGULATOR}'s result for cut-off {cutoff_id}", published)
        verified = verify_statement(
            envelope,
            self._registry,
            expected_type=reconciliation_pb2.ReconciliationResult,
            audience=CLIENT,
            now=self._clock.now(),
        )
        result = verified.message
        if verified.issuer != REGULATOR or result.cutoff_id != cutoff_id:
            raise StateError(
                f"expected {REGULATOR}'s result for {cutoff_id}, got {verified.issuer}'s for "
                f"{result.cutoff_id}",
                metadata={
                    "expected": f"{REGULATOR} {cutoff_id}",
                    "actual": f"{verified.issuer} {result.cutoff_id}",
                },
            )
        issued_at = result.header.issued_at.ToDatetime(tzinfo=UTC)
        sides = [
            verify_statement(
                statement,
                self._registry,
                expected_type=reconciliation_pb2.ReconciliationStatement,
                audience=REGULATOR,
                now=issued_at,
            )
            for statement in (result.custodian_statement, result.exchange_statement)
        ]
        if [side.issuer for side in sides] != [CUSTODIAN, EXCHANGE]:
            raise StateError(
                f"expected statements by {CUSTODIAN} and {EXCHANGE}, got "
                f"{', '.join(side.issuer for side in sides)}",
                metadata={
                    "expected": f"{CUSTODIAN}, {EXCHANGE}",
                    "actual": ", ".join(side.issuer for side in sides),
                },
            )
        self.evidence.relied_on_by_regulator(envelope)
        return result, sides[0].message, sides[1].message

    def _print_statements(
        self,
        custodian: reconciliation_pb2.ReconciliationStatement,
        exchange: reconciliation_pb2.ReconciliationStatement,
    ) -> None:
        for name, statement in ((CUSTODIAN, custodian), (EXCHANGE, exchange)):
            say.detail(
                f"{name}'s statement: {statement.account_count} accounts, positions root "
                f"{statement.positions_root.hex()[:16]}..., sync heads {_heads(statement)}; "
                f"totals {_totals(statement)}"
            )

    # ---------------------------------------------------------------- the acts

    async def _matched_reconciliation(self) -> None:
        say.section("12. Reconciliation at a cut-off: the regulator's signed result")
        first, second = sorted(self._cutoffs)
        say.step(
            f"cut-offs twice a day at {first:%H:%M} and {second:%H:%M} UTC (reconciliation."
            "cutoffs_utc, set by the demo to follow its yield time); at each, custodian and "
            f"exchange sign a ReconciliationStatement for {REGULATOR}"
        )
        asset, quantity = SECOND_PLEDGE
        path = sign_statement(
            liquidation_pb2.LiquidationPath(
                account_id=SECOND_ACCOUNT,
                exchange_id=EXCHANGE,
                proceeds_account_id=PROCEEDS_ACCOUNT,
                steps=[
                    liquidation_pb2.LiquidationStep(
                        asset_id=asset, venue="otc-desk", max_quantity=amount_to_proto(quantity)
                    )
                ],
            ),
            self._client_key,
            audience=[CUSTODIAN],
            sequence=next(self._sequence),
            ttl=timedelta(days=30),
            issued_at=self._clock.now(),
            statement_id=f"path-{SECOND_ACCOUNT}-1",
        )
        attested = await self._pledge(asset, quantity, account_id=SECOND_ACCOUNT, path=path)
        say.step(
            f"{CLIENT} pledges {asset} {say.amount(quantity)} of its second account "
            f"{SECOND_ACCOUNT} to {EXCHANGE}: epoch {attested.statement.epoch} "
            f"({reason_name(attested.statement)}) at leaf {attested.ref.leaf_index}"
        )
        self._proven(
            await self.evidence.prove_holdings(attested.envelope, attested.ref), attested.ref
        )
        credit = await self._until(
            f"{EXCHANGE} to credit {SECOND_ACCOUNT}", self._second_credit(attested.ref.leaf_index)
        )
        say.detail(
            f"{EXCHANGE} credits it: collateral value {say.amount(credit.collateral_value.value)}"
        )
        cutoff_id = await self._pass_cutoff()
        result, custodian, exchange = await self._result(cutoff_id)
        outcome = _OUTCOME.Name(result.outcome).removeprefix("RECONCILIATION_OUTCOME_")
        say.step(
            f"ReconciliationResult {cutoff_id}, signed by {REGULATOR} for everyone: {outcome}, "
            f"{len(result.breaks)} breaks"
        )
        self._print_statements(custodian, exchange)
        comparison = compare_statements(custodian, exchange)
        if result.outcome != _OUTCOME.RECONCILIATION_OUTCOME_MATCHED or not comparison.matched:
            raise StateError(
                f"cut-off {cutoff_id}: expected MATCHED, got {outcome} with "
                f"{len(comparison.differences)} differences between the statements",
                metadata={"expected": "MATCHED", "actual": outcome},
            )
        say.check(
            f"the result and both statements in it verify (signatures of {REGULATOR}, "
            f"{CUSTODIAN}, {EXCHANGE}); compared with the SDK the statements agree on roots, "
            "account counts, sync heads and totals"
        )
        self._matched_cutoff = cutoff_id

    def _second_credit(
        self, leaf_index: int
    ) -> Callable[[], Awaitable[valuation_pb2.CreditLine | None]]:
        async def probe() -> valuation_pb2.CreditLine | None:
            try:
                response = await self._c.exchange.get_credit_line(
                    exchange_service_pb2.GetCreditLineRequest(account_id=SECOND_ACCOUNT)
                )
            except RPCError as err:
                # Not yet known to the exchange, so not yet the client's to read (§4.5).
                if err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                    return None
                raise
            credit = self._open(response.credit_line, valuation_pb2.CreditLine, CUSTODIAN)
            if not any(ref.leaf_index == leaf_index for ref in credit.attestations):
                return None
            self.evidence.relied_on_by_custodian(response.credit_line)
            return credit

        return probe

    async def _break_located(self) -> None:
        say.section("13. The next cut-off: an injected break, located to its account")
        field = str(BREAK["field"])
        say.step(
            f"{EXCHANGE} runs in test mode with reconciliation.test_perturbations: from its "
            f"second statement on, its view of {BREAK['account_id']} {BREAK['asset_id']} "
            f"{field} is off by {BREAK['delta']} (a break in its books)"
        )
        cutoff_id = await self._pass_cutoff()
        result, custodian, exchange = await self._result(cutoff_id)
        outcome = _OUTCOME.Name(result.outcome).removeprefix("RECONCILIATION_OUTCOME_")
        say.step(
            f"ReconciliationResult {cutoff_id}, signed by {REGULATOR}: {outcome}, "
            f"{len(result.breaks)} break{'s' if len(result.breaks) != 1 else ''}"
        )
        self._print_statements(custodian, exchange)
        comparison = compare_statements(custodian, exchange)
        for difference in comparison.differences:
            say.detail(
                f"the statements alone differ in {difference.field}: "
                f"{difference.custodian[:16] or '-'} vs {difference.exchange[:16] or '-'}"
            )
        if result.outcome != _OUTCOME.RECONCILIATION_OUTCOME_BREAKS or comparison.matched:
            raise StateError(
                f"cut-off {cutoff_id}: expected BREAKS, got {outcome}",
                metadata={"expected": "BREAKS", "actual": outcome},
            )
        say.detail(
            f"{REGULATOR} descended both position trees (GetPositionTreeNodes on each party) "
            "to the leaves that differ, without either party sending its full positions:"
        )
        say.table(
            ["account", "asset", "field", custodian.header.issuer, exchange.header.issuer],
            [
                [
                    b.account_id,
                    b.asset_id,
                    _field(b.field),
                    say.amount(b.custodian_value.value) if b.HasField("custodian_value") else "-",
                    say.amount(b.exchange_value.value) if b.HasField("exchange_value") else "-",
                ]
                for b in result.breaks
            ],
        )
        expected = (BREAK["account_id"], BREAK["asset_id"], field.upper())
        located = [(b.account_id, b.asset_id, _field(b.field)) for b in result.breaks]
        if located != [expected]:
            raise StateError(
                f"expected the one break {expected}, got {located}",
                metadata={"expected": str([expected]), "actual": str(located)},
            )
        say.check(
            "the break is the one injected, located to its account, asset and field; the "
            "result verifies and names both statements it compared"
        )

    async def _settlement_cycle(self) -> None:
        say.section("14. A settlement cycle, held for its dispute window")
        asked = self._clock.now()
        response = await self._c.exchange_control.run_settlement_cycle(
            test_control_pb2.RunSettlementCycleRequest(cutoff_id=self._matched_cutoff)
        )
        count = len(response.settlement_instructions)
        say.step(
            f"{EXCHANGE} nets each account's realised result since its last cycle into the "
            f"cycle of the last matched cut-off, {self._matched_cutoff} (RunSettlementCycle): "
            f"{count} signed instruction{'s' if count != 1 else ''} sent to {CUSTODIAN}"
        )
        if len(response.settlement_instructions) != 1:
            raise StateError(
                f"expected one settlement instruction (for {SECOND_ACCOUNT}), got "
                f"{len(response.settlement_instructions)}",
                metadata={"expected": "1", "actual": str(len(response.settlement_instructions))},
            )
        [envelope] = response.settlement_instructions
        instruction = self._open(envelope, reconciliation_pb2.SettlementInstruction, CUSTODIAN)
        self.evidence.relied_on_by_custodian(envelope)
        issued_at = instruction.header.issued_at.ToDatetime(tzinfo=UTC)
        # A cycle is recorded once per cut-off: an exchange that settles on a MATCHED
        # result by itself has already issued it, and the call returns that record.
        if issued_at < asked - timedelta(seconds=1):
            say.detail(
                f"the cycle was already recorded: {EXCHANGE} issued it at {issued_at:%H:%M} UTC, "
                "when the MATCHED result reached it; the call returns the same instruction"
            )
        net = instruction.net_amount.value
        owes = "the client owes" if not net.startswith("-") else f"{EXCHANGE} owes"
        say.detail(
            f"SettlementInstruction {instruction.settlement_id}: {instruction.account_id} "
            f"{instruction.asset_id} net {say.amount(net)} ({owes}), cycle "
            f"{instruction.cycle_of_day} of the {self._policy.max_settlement_cycles_per_day} "
            "the policy allows a day"
        )
        state = await self._c.custodian.get_settlement(
            custodian_service_pb2.GetSettlementRequest(settlement_id=instruction.settlement_id)
        )
        deadline = state.dispute_deadline.ToDatetime(tzinfo=UTC)
        now = self._clock.now()
        say.step(
            f"{CUSTODIAN} holds it {_SETTLEMENT.Name(state.status).removeprefix('SETTLEMENT_STATUS_')}"
            f" until its dispute deadline {deadline:%Y-%m-%d %H:%M} UTC ({_span(deadline - now)} "
            "from now); until then either side may dispute it"
        )
        before = await self._holdings_now(SECOND_ACCOUNT)
        now = await self._advance(deadline - now + _PAST)
        say.step(f"the three clocks move past the deadline, to {now:%Y-%m-%d %H:%M} UTC")

        async def executed() -> custodian_service_pb2.GetSettlementResponse | None:
            found = await self._c.custodian.get_settlement(
                custodian_service_pb2.GetSettlementRequest(settlement_id=instruction.settlement_id)
            )
            return found if found.status == _SETTLEMENT.SETTLEMENT_STATUS_EXECUTED else None

        done = await self._until(f"{CUSTODIAN} to execute the settlement", executed)
        after = await self._holdings_now(SECOND_ACCOUNT)
        if (
            after.ref.leaf_index != done.attestation.leaf_index
            or after.statement.reason != _REASON.HOLDINGS_CHANGE_REASON_SETTLEMENT
        ):
            raise StateError(
                f"expected the SETTLEMENT statement at leaf {done.attestation.leaf_index}, got "
                f"{reason_name(after.statement)} at leaf {after.ref.leaf_index}",
                metadata={
                    "expected": f"SETTLEMENT @ {done.attestation.leaf_index}",
                    "actual": f"{reason_name(after.statement)} @ {after.ref.leaf_index}",
                },
            )
        say.step(
            f"undisputed, {CUSTODIAN} executes it: {instruction.asset_id} "
            f"{say.amount(net.lstrip('-'))} moves "
            + (
                f"from {SECOND_ACCOUNT}'s pledge to {HOUSE_ACCOUNT}"
                if not net.startswith("-")
                else f"from {HOUSE_ACCOUNT} to {SECOND_ACCOUNT}"
            )
            + f"; epoch {after.statement.epoch} ({reason_name(after.statement)}) at leaf "
            f"{after.ref.leaf_index}"
        )
        say.detail(f"{SECOND_ACCOUNT} was: {positions_text(before.statement)}")
        say.detail(f"{SECOND_ACCOUNT} now: {positions_text(after.statement)}")
        self._proven(await self.evidence.prove_holdings(after.envelope, after.ref), after.ref)

    async def _emergency_release(self) -> None:
        say.section("17. The exchange goes dark: emergency release by regulator and custodian")
        # What is released must be what the exchange last saw: wait for the stream to settle.
        await self._until("both servers to report the same sync-log heads", self._agreed_heads)
        code = await self._exchange_goes_dark()
        since = self._clock.now()
        say.step(f"{EXCHANGE}'s process stops (exit code {code}) at {since:%Y-%m-%d %H:%M} UTC")
        try:
            await self._c.exchange.get_risk_policy(exchange_service_pb2.GetRiskPolicyRequest())
        except RPCError as err:
            say.detail(f"a call to {EXCHANGE} now fails: {err.code.name}")
        else:
            raise StateError(
                f"expected {EXCHANGE} to be unreachable once stopped, it answered",
                metadata={"expected": "UNAVAILABLE", "actual": "an answer"},
            )
        held = await self._holdings_now(SECOND_ACCOUNT)
        wait = self._policy.emergency_release_wait.ToTimedelta()
        release = emergency_pb2.EmergencyRelease(
            release_id=f"release-{SECOND_ACCOUNT}-1",
            account_id=SECOND_ACCOUNT,
            exchange_id=EXCHANGE,
            reason=emergency_pb2.EMERGENCY_RELEASE_REASON_EXCHANGE_FAILURE,
        )
        release.exchange_unresponsive_since.FromDatetime(since)
        issued = sign_statement(
            release,
            self._regulator_key,
            audience=[CUSTODIAN, EXCHANGE, REGULATOR],
            sequence=next(self._regulator_sequence),
            ttl=wait + _RELEASE_TTL_BEYOND_WAIT,
            issued_at=self._clock.now(),
            statement_id=release.release_id,
        )
        say.step(
            f"{REGULATOR} signs EmergencyRelease {release.release_id}: unfreeze what "
            f"{SECOND_ACCOUNT} has pledged to {EXCHANGE} ({positions_text(held.statement)}); "
            f"reason EXCHANGE_FAILURE, unresponsive since {since:%H:%M} UTC"
        )
        cosigned = (
            await self._r.custodian_cosigner.co_sign_emergency_release(
                emergency_release_service_pb2.CoSignEmergencyReleaseRequest(
                    emergency_release=issued
                )
            )
        ).emergency_release
        verified = verify_threshold(
            cosigned,
            self._registry,
            expected_type=emergency_pb2.EmergencyRelease,
            threshold=EMERGENCY_RELEASE_THRESHOLD,
            roles=EMERGENCY_RELEASE_ROLES,
            audience=CUSTODIAN,
            now=self._clock.now(),
        )
        signers = " and ".join(verified.signer_party_ids)
        say.step(
            f"{CUSTODIAN} co-signs it (CoSignEmergencyRelease): signed by {signers}, "
            f"{EMERGENCY_RELEASE_THRESHOLD} of {{regulator, custodian, exchange}}"
        )
        say.check(
            f"the SDK counts {len(set(verified.signer_party_ids))} distinct parties with "
            "registered release roles (verify_threshold)"
        )
        execute = custodian_service_pb2.ExecuteEmergencyReleaseRequest(emergency_release=cosigned)
        await self._expect_refusal(
            f"executing it now: without {EXCHANGE}'s signature the policy's "
            f"{_span(wait)} wait must have passed since it went dark",
            self._r.custodian_as_regulator.execute_emergency_release(execute),
        )
        if await self._holdings_now(SECOND_ACCOUNT) != held:
            raise StateError(
                f"the refused release changed {SECOND_ACCOUNT}'s attested holdings",
                metadata={"expected": "unchanged", "actual": "a new statement"},
            )
        say.check(f"{SECOND_ACCOUNT}'s attested holdings are unchanged by the refusal")
        by = since + wait + _PAST - self._clock.now()
        now = await self._advance(by, exchange_running=False)
        say.step(
            f"{REGULATOR}'s and {CUSTODIAN}'s clocks move {_span(by)} forward, to "
            f"{now:%Y-%m-%d %H:%M} UTC: {_span(now - since)} since {EXCHANGE} went dark, "
            "and it still is"
        )
        receipt_envelope = (
            await self._r.custodian_as_regulator.execute_emergency_release(execute)
        ).emergency_release_receipt
        receipt = self._open(receipt_envelope, emergency_pb2.EmergencyReleaseReceipt, REGULATOR)
        if receipt.release != cosigned or receipt.account_id != SECOND_ACCOUNT:
            raise StateError(
                f"expected a receipt for the release brought, for {SECOND_ACCOUNT}; got one for "
                f"{receipt.release_id} of {receipt.account_id}",
                metadata={"expected": release.release_id, "actual": receipt.release_id},
            )
        self.evidence.relied_on_by_custodian(cosigned)
        self.evidence.relied_on_by_regulator(receipt_envelope)
        executed_at = receipt.executed_at.ToDatetime(tzinfo=UTC)
        say.step(
            f"the same release, brought again: executed. EmergencyReleaseReceipt signed by "
            f"{receipt.header.issuer}, executed at {executed_at:%Y-%m-%d %H:%M} UTC, carrying "
            "the release with both signatures"
        )
        after = await self._holdings_now(SECOND_ACCOUNT)
        if after.statement.reason != _REASON.HOLDINGS_CHANGE_REASON_RELEASE:
            raise StateError(
                f"expected a RELEASE statement after the release, got {reason_name(after.statement)}",
                metadata={"expected": "RELEASE", "actual": reason_name(after.statement)},
            )
        say.step(
            f"{CUSTODIAN} attests epoch {after.statement.epoch} ({reason_name(after.statement)}) at "
            f"leaf {after.ref.leaf_index}: {positions_text(after.statement)}, nothing pledged"
        )
        self._proven(
            await self.evidence.prove_holdings(after.envelope, after.ref, keep=False), after.ref
        )
        say.detail(
            f"(proven, but not put in {EXCHANGE}'s bundle: it was dark and relied on nothing)"
        )

    async def _redeem(
        self, redemption_id: str, asset: str, quantity: str
    ) -> tuple[Attested, datetime]:
        """RequestRedemption as the client: the REDEMPTION_LOCK statement and settles_at."""
        request = sign_statement(
            custodian_service_pb2.RedemptionRequest(
                redemption_id=redemption_id,
                account_id=SECOND_ACCOUNT,
                asset_id=asset,
                quantity=amount_to_proto(quantity),
            ),
            self._client_key,
            audience=[CUSTODIAN],
            sequence=next(self._sequence),
            ttl=CLIENT_TTL,
            issued_at=self._clock.now(),
        )
        response = await self._c.custodian.request_redemption(
            custodian_service_pb2.RequestRedemptionRequest(redemption_request=request)
        )
        statement = self._open(
            response.holdings_statement, attestation_pb2.HoldingsStatement, CLIENT
        )
        attested = Attested(response.holdings_statement, statement, response.attestation)
        return attested, response.settles_at.ToDatetime(tzinfo=UTC)

    async def _redemption(self) -> None:
        say.section("18. Redemption: locked for 24 h, then settled out of custody")
        asset, quantity = REDEMPTION
        amount = parse_amount(quantity)
        before = await self._holdings_now(SECOND_ACCOUNT)
        held = by_asset(before.statement)[asset]
        free = (
            decimal_of(held.quantity)
            - decimal_of(held.locked_quantity)
            - decimal_of(held.pledged_quantity)
        )
        say.step(
            f"{CLIENT} asks {CUSTODIAN} to redeem {asset} {say.amount(quantity)} of "
            f"{SECOND_ACCOUNT} (signed RedemptionRequest); {say.amount(free)} is free "
            "(quantity - locked - pledged): pledged collateral is never redeemable"
        )
        locked, settles_at = await self._redeem(f"redemption-{SECOND_ACCOUNT}-1", asset, quantity)
        position = by_asset(locked.statement)[asset]
        if (
            locked.statement.reason != _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_LOCK
            or decimal_of(position.locked_quantity) != decimal_of(held.locked_quantity) + amount
        ):
            raise StateError(
                f"expected a REDEMPTION_LOCK statement locking {asset} {quantity}, got "
                f"{reason_name(locked.statement)} with {position.locked_quantity.value or '0'} "
                "locked",
                metadata={"expected": "REDEMPTION_LOCK", "actual": reason_name(locked.statement)},
            )
        lock = settles_at - self._clock.now()
        say.step(
            f"{CUSTODIAN} attests epoch {locked.statement.epoch} "
            f"({reason_name(locked.statement)}) at leaf {locked.ref.leaf_index}: {asset} "
            f"{say.amount(position.quantity.value)}, {say.amount(position.locked_quantity.value)} "
            f"locked; settles at {settles_at:%Y-%m-%d %H:%M} UTC ({_span(lock)} from now)"
        )
        self._proven(
            await self.evidence.prove_holdings(locked.envelope, locked.ref, keep=False),
            locked.ref,
        )
        await self._expect_refusal(
            f"a second redemption of the same {asset} {say.amount(quantity)} before "
            f"{settles_at:%H:%M} UTC: what the lock holds is no longer redeemable",
            self._redeem(f"redemption-{SECOND_ACCOUNT}-2", asset, quantity),
        )
        still = await self._holdings_now(SECOND_ACCOUNT)
        if still != locked:
            raise StateError(
                f"expected {SECOND_ACCOUNT}'s holdings unchanged before settles_at, got epoch "
                f"{still.statement.epoch} ({reason_name(still.statement)})",
                metadata={"expected": "the lock held", "actual": reason_name(still.statement)},
            )
        say.check(
            f"before settles_at the lock holds: {asset} {say.amount(position.quantity.value)} "
            f"still in {SECOND_ACCOUNT}, {say.amount(position.locked_quantity.value)} locked"
        )
        by = settles_at + _PAST - self._clock.now()
        now = await self._advance(by, exchange_running=False)
        say.step(
            f"{REGULATOR}'s and {CUSTODIAN}'s clocks move {_span(by)} forward, to "
            f"{now:%Y-%m-%d %H:%M} UTC, past settles_at"
        )

        async def settled() -> Attested | None:
            found = await self._holdings_now(SECOND_ACCOUNT)
            reason = _REASON.HOLDINGS_CHANGE_REASON_REDEMPTION_SETTLED
            return found if found.statement.reason == reason else None

        after = await self._until(f"{CUSTODIAN} to settle the redemption", settled)
        done = by_asset(after.statement)[asset]
        if (
            decimal_of(done.quantity) != decimal_of(position.quantity) - amount
            or decimal_of(done.locked_quantity) != decimal_of(position.locked_quantity) - amount
        ):
            raise StateError(
                f"expected {asset} quantity and locked both down by {quantity} at settlement; "
                f"got {done.quantity.value} and {done.locked_quantity.value or '0'}",
                metadata={"expected": f"both down by {quantity}", "actual": done.quantity.value},
            )
        say.step(
            f"{CUSTODIAN} attests epoch {after.statement.epoch} ({reason_name(after.statement)}) "
            f"at leaf {after.ref.leaf_index}: {asset} {say.amount(position.quantity.value)} -> "
            f"{say.amount(done.quantity.value)}, locked "
            f"{say.amount(position.locked_quantity.value)} -> "
            f"{say.amount(decimal_of(done.locked_quantity))}: the {say.amount(quantity)} has left "
            "custody to the client"
        )
        self._proven(
            await self.evidence.prove_holdings(after.envelope, after.ref, keep=False), after.ref
        )
