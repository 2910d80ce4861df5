"""The valid statements of every type of §3.5 that envelope.py and threshold.py leave out.

One realistic statement (or two, one per issuing party) of each type, from the messages of
_messages.py, issued through the SDK's own issuing path; the emergency releases issued by
the custodian and by the exchange are threshold statements, signed over PAE directly.
Statements that embed others embed these: the margin call its signed inputs (the policy,
the holdings statement, the snapshot), the reconciliation result both views, the release
receipt the 2-of-3 release. TypeStatements holds them and what they were built from, for
the cases of types_margin.py and types_settlement.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from collateral_sync.amounts import format_amount
from collateral_sync.signing import pae
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    emergency_pb2,
    envelope_pb2,
    position_sync_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import credit_line_figures, value_collateral

from .. import _messages as messages
from .._common import (
    CLIENT_ID,
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    NOW,
    REGULATOR_ID,
    NamedKey,
)
from ..sync import _C2E, _E2C, _chain, _custodian_updates, _exchange_updates, _SyncEntry
from ._shared import forge, issue

__all__ = ["RELEASE_AUDIENCE", "TypeStatements", "issue_type_statements", "sync_batch"]


#: The audience of every emergency release.
RELEASE_AUDIENCE = [REGULATOR_ID, CUSTODIAN_ID, EXCHANGE_ID]


def sync_batch(direction: int, entries: Sequence[_SyncEntry]) -> position_sync_pb2.SyncBatch:
    return messages.sync_batch(direction, [e.to_proto() for e in entries])


@dataclass(frozen=True)
class TypeStatements:
    # sync-batch: three custodian entries, two exchange entries, chained as in sync.json.
    c2e: list[_SyncEntry]
    e2c: list[_SyncEntry]
    batch_c2e: envelope_pb2.Envelope
    batch_e2c: envelope_pb2.Envelope
    # risk-policy, price-snapshot, credit-line
    policy: envelope_pb2.Envelope
    observed: datetime
    snapshot: envelope_pb2.Envelope
    holdings_leaf: bytes
    credit: envelope_pb2.Envelope
    # margin-call, margin-call-response, margin-call-state
    inputs: valuation_pb2.ValuationInputs
    call: envelope_pb2.Envelope
    response: envelope_pb2.Envelope
    state: envelope_pb2.Envelope
    # liquidation-instruction, liquidation-receipt, shortfall-allocation
    instruction: envelope_pb2.Envelope
    after_liquidation_leaf: bytes
    receipt: envelope_pb2.Envelope
    allocation: envelope_pb2.Envelope
    # reconciliation-statement, reconciliation-result
    heads: list[tuple[int, int, bytes]]
    custodian_view: envelope_pb2.Envelope
    exchange_view: envelope_pb2.Envelope
    result: envelope_pb2.Envelope
    # settlement-instruction, settlement-dispute
    deadline: datetime
    settlement: envelope_pb2.Envelope
    dispute_by_custodian: envelope_pb2.Envelope
    dispute_by_exchange: envelope_pb2.Envelope
    # emergency-release issued by the custodian and by the exchange; its receipt
    release: envelope_pb2.Envelope
    release_by_custodian: envelope_pb2.Envelope
    release_by_exchange: envelope_pb2.Envelope
    release_receipt: envelope_pb2.Envelope
    # pledge-instruction, redemption-request
    pledge: envelope_pb2.Envelope
    redemption: envelope_pb2.Envelope
    # pledge-release-request, pledge-release-consent, pledge-release-receipt
    release_request: envelope_pb2.Envelope
    release_consent: envelope_pb2.Envelope
    release_pledge_receipt: envelope_pb2.Envelope


def issue_type_statements(
    keys: dict[str, NamedKey],
    holdings: envelope_pb2.Envelope,
    release: envelope_pb2.Envelope,
) -> TypeStatements:
    """The valid statements; ``holdings`` and ``release`` are the ones they embed."""
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    client = keys["client"].key
    role = common_pb2.PartyRole

    # sync-batch
    c2e = _chain(_C2E, _custodian_updates()[:3])
    e2c = _chain(_E2C, _exchange_updates(exchange)[:2])
    batch_c2e = issue(sync_batch(_C2E, c2e), custodian, [EXCHANGE_ID], 3, "sync-batch-c2e-3")
    batch_e2c = issue(sync_batch(_E2C, e2c), exchange, [CUSTODIAN_ID], 2, "sync-batch-e2c-2")

    # risk-policy, price-snapshot, credit-line
    policy = issue(
        messages.risk_policy(ISSUED - timedelta(days=1)), exchange, ["*"], 3, "risk-policy-3"
    )
    observed = ISSUED - timedelta(seconds=30)
    snapshot = issue(messages.price_snapshot(observed), exchange, ["*"], 118, "price-snapshot-118")
    holdings_leaf = pae(holdings.payload_type, holdings.payload)
    credit = issue(
        messages.credit_line(holdings_leaf, 57, observed),
        exchange,
        [CUSTODIAN_ID],
        4,
        "credit-line-acct-0001-4",
    )

    # margin-call, margin-call-response, margin-call-state
    inputs = messages.valuation_inputs(policy, [holdings], snapshot)
    call = issue(
        messages.margin_call(inputs, ISSUED + timedelta(hours=24)),
        exchange,
        [CUSTODIAN_ID],
        1,
        messages.MARGIN_CALL_ID,
    )
    response = issue(
        messages.margin_call_response(),
        custodian,
        [EXCHANGE_ID],
        12,
        "margin-call-response-0001",
    )
    state = issue(
        messages.margin_call_state(call, ISSUED),
        exchange,
        [CUSTODIAN_ID, CLIENT_ID],
        2,
        "margin-call-state-0001-2",
    )

    # liquidation-instruction, liquidation-receipt, shortfall-allocation
    instruction = issue(
        messages.liquidation_instruction(inputs),
        exchange,
        [CUSTODIAN_ID],
        1,
        messages.LIQUIDATION_ID,
    )
    after_liquidation = issue(
        messages.holdings(
            epoch=4,
            reason=attestation_pb2.HOLDINGS_CHANGE_REASON_LIQUIDATION,
            rows=(("BENJI", "0", "0", "0"), ("USDC", "100000.25", "0", "0")),
        ),
        custodian,
        [EXCHANGE_ID, CLIENT_ID],
        9,
        "holdings-acct-0001-epoch-4",
    )
    after_liquidation_leaf = pae(after_liquidation.payload_type, after_liquidation.payload)
    receipt = issue(
        messages.liquidation_receipt(after_liquidation_leaf, 58),
        custodian,
        [EXCHANGE_ID],
        1,
        "liquidation-receipt-acct-0001-0001",
    )
    allocation = issue(
        messages.shortfall_allocation(),
        exchange,
        [CUSTODIAN_ID],
        1,
        "shortfall-allocation-acct-0001-0001",
    )

    # reconciliation-statement, reconciliation-result
    heads = [(_C2E, c2e[-1].sequence, c2e[-1].hash), (_E2C, e2c[-1].sequence, e2c[-1].hash)]
    custodian_view = issue(
        messages.reconciliation_statement(role.PARTY_ROLE_CUSTODIAN, heads),
        custodian,
        [REGULATOR_ID, EXCHANGE_ID],
        2,
        f"reconciliation-{messages.CUTOFF_ID}-custodian",
    )
    exchange_view = issue(
        messages.reconciliation_statement(role.PARTY_ROLE_EXCHANGE, heads),
        exchange,
        [REGULATOR_ID, CUSTODIAN_ID],
        2,
        f"reconciliation-{messages.CUTOFF_ID}-exchange",
    )
    result = issue(
        messages.reconciliation_result(custodian_view, exchange_view),
        regulator,
        ["*"],
        2,
        f"reconciliation-result-{messages.CUTOFF_ID}",
    )

    # settlement-instruction, settlement-dispute
    deadline = ISSUED + timedelta(hours=24)
    settlement = issue(
        messages.settlement_instruction(deadline),
        exchange,
        [CUSTODIAN_ID],
        1,
        messages.SETTLEMENT_ID,
    )
    dispute_by_custodian = issue(
        messages.settlement_dispute(
            "the reconciliation of this cut-off has a break on acct-0001 USDC"
        ),
        custodian,
        [EXCHANGE_ID],
        1,
        f"settlement-dispute-{messages.SETTLEMENT_ID}-custodian",
    )
    dispute_by_exchange = issue(
        messages.settlement_dispute("net amount from a stale realised result; reissued"),
        exchange,
        [CUSTODIAN_ID],
        1,
        f"settlement-dispute-{messages.SETTLEMENT_ID}-exchange",
    )

    # emergency-release issued by the custodian and by the exchange; its receipt
    release_by_custodian = forge(
        messages.emergency_release(NOW - timedelta(hours=50), release_id="release-0002"),
        CUSTODIAN_ID,
        RELEASE_AUDIENCE,
        1,
        "release-0002",
        by=[custodian, exchange],
    )
    release_by_exchange = forge(
        messages.emergency_release(
            None,
            release_id="release-0003",
            reason=emergency_pb2.EMERGENCY_RELEASE_REASON_REGULATORY_ORDER,
        ),
        EXCHANGE_ID,
        RELEASE_AUDIENCE,
        1,
        "release-0003",
        by=[exchange, regulator],
    )
    release_receipt = issue(
        messages.emergency_release_receipt(release, ISSUED),
        custodian,
        [*RELEASE_AUDIENCE, CLIENT_ID],
        1,
        "emergency-release-receipt-release-0001",
    )

    # pledge-instruction, redemption-request
    pledge = issue(
        messages.pledge_instruction(), client, [CUSTODIAN_ID], 2, "pledge-acct-0001-0002"
    )
    redemption = issue(
        messages.redemption_request(), client, [CUSTODIAN_ID], 3, "redemption-acct-0001-0001"
    )

    # pledge-release-request, pledge-release-consent, pledge-release-receipt (§5.9): the
    # consent's figures are the epoch-3 holdings valued with the released USDC taken out of
    # the pledge, under the inputs of the margin call.
    release_request = issue(
        messages.pledge_release_request(),
        client,
        [EXCHANGE_ID, CUSTODIAN_ID],
        4,
        messages.PLEDGE_RELEASE_ID,
    )
    policy_message = valuation_pb2.RiskPolicy.FromString(policy.payload)
    after = value_collateral(
        policy_message,
        messages.holdings_after_release(),
        valuation_pb2.PriceSnapshot.FromString(snapshot.payload).prices,
        valued_at=ISSUED,
    )
    figures = credit_line_figures(
        policy_message, after, Decimal(messages.RELEASE_EXPOSURE)
    )
    release_consent = issue(
        messages.pledge_release_consent(
            release_request,
            inputs,
            format_amount(figures.collateral_value),
            format_amount(figures.credit_limit),
        ),
        exchange,
        [CUSTODIAN_ID, CLIENT_ID],
        5,
        f"consent-{messages.PLEDGE_RELEASE_ID}",
    )
    after_release = issue(
        messages.holdings(
            epoch=4,
            reason=attestation_pb2.HOLDINGS_CHANGE_REASON_PLEDGE_RELEASE,
            rows=tuple(
                (p.asset_id, p.quantity.value, p.locked_quantity.value, p.pledged_quantity.value)
                for p in messages.holdings_after_release()
            ),
        ),
        custodian,
        [EXCHANGE_ID, CLIENT_ID],
        10,
        "holdings-acct-0001-epoch-4-released",
    )
    release_pledge_receipt = issue(
        messages.pledge_release_receipt(
            release_consent,
            ISSUED,
            messages.attestation_ref(pae(after_release.payload_type, after_release.payload), 58),
        ),
        custodian,
        [EXCHANGE_ID, CLIENT_ID],
        1,
        f"receipt-{messages.PLEDGE_RELEASE_ID}",
    )

    return TypeStatements(
        c2e=c2e,
        e2c=e2c,
        batch_c2e=batch_c2e,
        batch_e2c=batch_e2c,
        policy=policy,
        observed=observed,
        snapshot=snapshot,
        holdings_leaf=holdings_leaf,
        credit=credit,
        inputs=inputs,
        call=call,
        response=response,
        state=state,
        instruction=instruction,
        after_liquidation_leaf=after_liquidation_leaf,
        receipt=receipt,
        allocation=allocation,
        heads=heads,
        custodian_view=custodian_view,
        exchange_view=exchange_view,
        result=result,
        deadline=deadline,
        settlement=settlement,
        dispute_by_custodian=dispute_by_custodian,
        dispute_by_exchange=dispute_by_exchange,
        release=release,
        release_by_custodian=release_by_custodian,
        release_by_exchange=release_by_exchange,
        release_receipt=release_receipt,
        pledge=pledge,
        redemption=redemption,
        release_request=release_request,
        release_consent=release_consent,
        release_pledge_receipt=release_pledge_receipt,
    )
