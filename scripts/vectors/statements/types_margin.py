"""The vectors of the reporting and margin types of §3.5, valid and refused.

checkpoint (refused only: its valid statement is in envelope.py), sync-batch,
risk-policy, price-snapshot, credit-line, margin-call, margin-call-response and
margin-call-state: each type's valid statement (types_issued.py), and the same statement
refused for a reason of its type, mostly an issuer or a signing key of a role that may not
issue it, or an audience it may not have.
"""

from __future__ import annotations

from datetime import timedelta

from .. import _messages as messages
from .._common import (
    CLIENT_ID,
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    NOW,
    REGULATOR_ID,
    NamedKey,
    status,
)
from ..sync import _C2E
from ._shared import StatementCase, checkpoint_message, forge, issue, type_case, valid
from .types_issued import TypeStatements, sync_batch

__all__ = ["margin_type_cases"]


def margin_type_cases(
    keys: dict[str, NamedKey], checkpoint_root: bytes, issued: TypeStatements
) -> list[StatementCase]:
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    client = keys["client"].key
    case = type_case
    c2e = issued.c2e

    stale_state = issue(
        messages.margin_call_state(issued.call, NOW - timedelta(hours=3)),
        exchange,
        [CUSTODIAN_ID, CLIENT_ID],
        2,
        "margin-call-state-0001-2",
        issued_at=NOW - timedelta(hours=3),
    )

    return [
        case(
            "checkpoint/issued-by-exchange",
            "A checkpoint of the custodian's log issued and signed by the exchange: only "
            "custodian keys may issue checkpoints.",
            forge(
                checkpoint_message(checkpoint_root),
                EXCHANGE_ID,
                ["*"],
                42,
                "checkpoint-1000",
                by=[exchange],
            ),
            status("KEY_ROLE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "sync-batch/valid-custodian-to-exchange",
            "A batch of three custodian-to-exchange entries (sequence = the last entry's), "
            "addressed to the exchange.",
            issued.batch_c2e,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "sync-batch/valid-exchange-to-custodian",
            "A batch of two exchange-to-custodian entries, addressed to the custodian.",
            issued.batch_e2c,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "sync-batch/issued-by-regulator",
            "The custodian-to-exchange entries in a batch issued and signed by the regulator: "
            "only custodian and exchange keys may issue batches.",
            forge(
                sync_batch(_C2E, c2e),
                REGULATOR_ID,
                [EXCHANGE_ID],
                3,
                "sync-batch-c2e-3",
                by=[regulator],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "sync-batch/star-audience",
            "The custodian's batch addressed to '*': sync batches are not public.",
            forge(
                sync_batch(_C2E, c2e), CUSTODIAN_ID, ["*"], 3, "sync-batch-c2e-3", by=[custodian]
            ),
            status("AUDIENCE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "risk-policy/valid-public",
            "The exchange's full risk policy (version 3, the pilot's figures of section 7.4) "
            "addressed to '*' (public type), verified by the custodian.",
            issued.policy,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "risk-policy/issued-by-custodian",
            "The same policy issued and signed by the custodian: only exchange keys may issue "
            "risk policies.",
            forge(
                messages.risk_policy(ISSUED - timedelta(days=1)),
                CUSTODIAN_ID,
                ["*"],
                3,
                "risk-policy-3",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "price-snapshot/valid-public",
            "The exchange's price snapshot addressed to '*' (public type), verified by the "
            "custodian.",
            issued.snapshot,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "price-snapshot/signed-by-custodian-key",
            "A snapshot in the exchange's name signed only by the custodian's key.",
            forge(
                messages.price_snapshot(issued.observed),
                EXCHANGE_ID,
                ["*"],
                118,
                "price-snapshot-118",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "price-snapshot/explicit-audience-without-verifier",
            "A public type addressed to the custodian only, verified by the regulator: without "
            "'*' the explicit audience applies.",
            issue(
                messages.price_snapshot(issued.observed),
                exchange,
                [CUSTODIAN_ID],
                119,
                "price-snapshot-119",
            ),
            status("AUDIENCE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "credit-line/valid",
            "The exchange's credit line for acct-0001 (attestation, prices, valuations), "
            "addressed to the custodian.",
            issued.credit,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "credit-line/star-audience",
            "The credit line addressed to '*': credit lines are not public.",
            forge(
                messages.credit_line(issued.holdings_leaf, 57, issued.observed),
                EXCHANGE_ID,
                ["*"],
                4,
                "credit-line-acct-0001-4",
                by=[exchange],
            ),
            status("AUDIENCE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "margin-call/valid",
            "A margin call embedding its signed inputs (the policy, the holdings statement and "
            "the snapshot above), addressed to the custodian.",
            issued.call,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "margin-call/issued-by-custodian",
            "The same call issued and signed by the custodian: only exchange keys may issue "
            "margin calls.",
            forge(
                messages.margin_call(issued.inputs, ISSUED + timedelta(hours=24)),
                CUSTODIAN_ID,
                [EXCHANGE_ID],
                1,
                messages.MARGIN_CALL_ID,
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "margin-call-response/valid",
            "The custodian's partial agreement with the call, on the client's behalf, "
            "addressed to the exchange.",
            issued.response,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "margin-call-response/issued-by-client",
            "The response issued and signed by the client: the custodian answers on the "
            "client's behalf (section 8.3); client keys may not issue responses.",
            forge(
                messages.margin_call_response(),
                CLIENT_ID,
                [EXCHANGE_ID],
                1,
                "margin-call-response-0001",
                by=[client],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "margin-call-state/valid",
            "The exchange's state of the call (partially agreed) embedding the signed call, "
            "addressed to the custodian and the client, verified by the client.",
            issued.state,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CLIENT_ID,
        ),
        case(
            "margin-call-state/served-after-expiry",
            "A state issued three hours before 'now' with a one-hour lifetime, served without "
            "being re-signed.",
            stale_state,
            status("STATEMENT_EXPIRED"),
            CLIENT_ID,
        ),
    ]
