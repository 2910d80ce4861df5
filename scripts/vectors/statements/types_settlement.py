"""The vectors of the liquidation, reconciliation, settlement and client types of §3.5.

liquidation-path (refused only: its valid statement is in envelope.py),
liquidation-instruction, liquidation-receipt, shortfall-allocation,
reconciliation-statement, reconciliation-result, settlement-instruction,
settlement-dispute, emergency-release (issued by the custodian and by the exchange),
emergency-release-receipt, pledge-instruction, redemption-request and the pledge release's
request, consent and receipt: each type's valid
statement (types_issued.py), and one refused for a reason of its type.
"""

from __future__ import annotations

from collateral_sync.v1 import common_pb2, envelope_pb2, pledge_release_pb2

from .. import _messages as messages
from .._common import (
    CLIENT_ID,
    CUSTODIAN_ID,
    EXCHANGE_ID,
    ISSUED,
    REGULATOR_ID,
    NamedKey,
    status,
)
from ._shared import StatementCase, forge, issue, type_case, valid
from .types_issued import RELEASE_AUDIENCE, TypeStatements

__all__ = ["settlement_type_cases"]


def settlement_type_cases(keys: dict[str, NamedKey], issued: TypeStatements) -> list[StatementCase]:
    custodian = keys["custodian"].key
    exchange = keys["exchange"].key
    regulator = keys["regulator"].key
    client = keys["client"].key
    role = common_pb2.PartyRole
    case = type_case

    misaddressed_instruction = issue(
        messages.liquidation_instruction(issued.inputs),
        exchange,
        ["other-custodian.example"],
        2,
        "liquidation-acct-0001-0001-resent",
    )

    return [
        case(
            "liquidation-path/signed-by-custodian-only",
            "The client's path signed only by the custodian's key: the client must sign its "
            "own path.",
            forge(
                messages.liquidation_path(),
                CLIENT_ID,
                [CUSTODIAN_ID],
                1,
                "path-acct-0001-v1",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "liquidation-instruction/valid",
            "An instruction after the call expired (whole exposure, the client's path, the "
            "call's signed inputs), addressed to the custodian.",
            issued.instruction,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "liquidation-instruction/addressed-to-another-custodian",
            "The instruction addressed to another custodian, delivered to this one.",
            misaddressed_instruction,
            status("AUDIENCE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "liquidation-receipt/valid",
            "The custodian's receipt (yield first, two fills, the shortfall, the attestation "
            "of the holdings after), addressed to the exchange.",
            issued.receipt,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "liquidation-receipt/issued-by-exchange",
            "The receipt issued and signed by the exchange: only custodian keys may issue "
            "liquidation receipts.",
            forge(
                messages.liquidation_receipt(issued.after_liquidation_leaf, 58),
                EXCHANGE_ID,
                [CUSTODIAN_ID],
                1,
                "liquidation-receipt-acct-0001-0001",
                by=[exchange],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "shortfall-allocation/valid",
            "The exchange's allocation of the shortfall (insurance fund, then an "
            "auto-deleveraging ranking), addressed to the custodian.",
            issued.allocation,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "shortfall-allocation/star-audience",
            "The allocation addressed to '*': shortfall allocations are not public.",
            forge(
                messages.shortfall_allocation(),
                EXCHANGE_ID,
                ["*"],
                1,
                "shortfall-allocation-acct-0001-0001",
                by=[exchange],
            ),
            status("AUDIENCE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "reconciliation-statement/valid-custodian",
            "The custodian's view at the cut-off, addressed to the regulator and the exchange.",
            issued.custodian_view,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            REGULATOR_ID,
        ),
        case(
            "reconciliation-statement/valid-exchange",
            "The exchange's view at the cut-off, addressed to the regulator and the custodian.",
            issued.exchange_view,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            REGULATOR_ID,
        ),
        case(
            "reconciliation-statement/issued-by-client",
            "A view issued and signed by the client: only custodian and exchange keys may "
            "issue reconciliation statements.",
            forge(
                messages.reconciliation_statement(role.PARTY_ROLE_CLIENT, issued.heads),
                CLIENT_ID,
                [REGULATOR_ID],
                1,
                f"reconciliation-{messages.CUTOFF_ID}-client",
                by=[client],
            ),
            status("KEY_ROLE_MISMATCH"),
            REGULATOR_ID,
        ),
        case(
            "reconciliation-result/valid-public",
            "The regulator's result (one break) embedding both views, addressed to '*' "
            "(public type), verified by the exchange.",
            issued.result,
            valid(REGULATOR_ID, REGULATOR_ID),
            EXCHANGE_ID,
        ),
        case(
            "reconciliation-result/issued-by-custodian",
            "The same result issued and signed by the custodian: only regulator keys may issue "
            "reconciliation results.",
            forge(
                messages.reconciliation_result(issued.custodian_view, issued.exchange_view),
                CUSTODIAN_ID,
                ["*"],
                2,
                f"reconciliation-result-{messages.CUTOFF_ID}",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "settlement-instruction/valid",
            "The exchange's settlement instruction for acct-0001 (USDC, cycle 1), addressed "
            "to the custodian.",
            issued.settlement,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "settlement-instruction/signed-by-custodian-key",
            "An instruction in the exchange's name signed only by the custodian's key.",
            forge(
                messages.settlement_instruction(issued.deadline),
                EXCHANGE_ID,
                [CUSTODIAN_ID],
                1,
                messages.SETTLEMENT_ID,
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "settlement-dispute/valid-custodian",
            "The custodian disputes the instruction, addressed to the exchange.",
            issued.dispute_by_custodian,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "settlement-dispute/valid-exchange",
            "The exchange disputes its own instruction, addressed to the custodian.",
            issued.dispute_by_exchange,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "settlement-dispute/issued-by-client",
            "A dispute issued and signed by the client: only custodian and exchange keys may "
            "issue settlement disputes.",
            forge(
                messages.settlement_dispute("the client does not agree"),
                CLIENT_ID,
                [CUSTODIAN_ID],
                1,
                f"settlement-dispute-{messages.SETTLEMENT_ID}-client",
                by=[client],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "emergency-release/valid-issued-by-custodian",
            "Issued by the custodian, signed by custodian and exchange.",
            issued.release_by_custodian,
            valid(CUSTODIAN_ID, CUSTODIAN_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        case(
            "emergency-release/valid-issued-by-exchange",
            "Issued by the exchange on a regulatory order, signed by exchange and regulator.",
            issued.release_by_exchange,
            valid(EXCHANGE_ID, EXCHANGE_ID, REGULATOR_ID),
            CUSTODIAN_ID,
            threshold=2,
        ),
        case(
            "emergency-release-receipt/valid",
            "The custodian's receipt embedding the release as executed (2 of 3), addressed to "
            "the release's audience and the client, verified by the exchange.",
            issued.release_receipt,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "emergency-release-receipt/issued-by-regulator",
            "The receipt issued and signed by the regulator: only custodian keys may issue "
            "release receipts.",
            forge(
                messages.emergency_release_receipt(issued.release, ISSUED),
                REGULATOR_ID,
                [*RELEASE_AUDIENCE, CLIENT_ID],
                1,
                "emergency-release-receipt-release-0001",
                by=[regulator],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "pledge-instruction/valid",
            "The client pledges 250000 BENJI to the exchange, addressed to the custodian.",
            issued.pledge,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        case(
            "pledge-instruction/signed-by-custodian-key",
            "A pledge in the client's name signed only by the custodian's key.",
            forge(
                messages.pledge_instruction(),
                CLIENT_ID,
                [CUSTODIAN_ID],
                2,
                "pledge-acct-0001-0002",
                by=[custodian],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "redemption-request/valid",
            "The client's redemption request, addressed to the custodian.",
            issued.redemption,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        case(
            "pledge-release-request/valid",
            "The client asks for 100000.25 of its 400000 pledged USDC back, addressed to the "
            "exchange and the custodian (§5.9).",
            issued.release_request,
            valid(CLIENT_ID, CLIENT_ID),
            CUSTODIAN_ID,
        ),
        case(
            "pledge-release-request/signed-by-exchange-key",
            "A release request in the client's name signed only by the exchange's key: only "
            "client keys may ask for a pledge back.",
            forge(
                messages.pledge_release_request(),
                CLIENT_ID,
                [EXCHANGE_ID, CUSTODIAN_ID],
                4,
                messages.PLEDGE_RELEASE_ID,
                by=[exchange],
            ),
            status("KEY_ROLE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "pledge-release-consent/valid",
            "The exchange's consent embedding the client's request, judged on the epoch-3 "
            "holdings, addressed to the custodian and the client, verified by the custodian.",
            issued.release_consent,
            valid(EXCHANGE_ID, EXCHANGE_ID),
            CUSTODIAN_ID,
        ),
        case(
            "pledge-release-consent/not-addressed-to-custodian",
            "The consent addressed to the client only, verified by the custodian that would "
            "execute it.",
            issue(
                _consent_of(issued.release_consent),
                exchange,
                [CLIENT_ID],
                6,
                f"consent-{messages.PLEDGE_RELEASE_ID}-client-only",
            ),
            status("AUDIENCE_MISMATCH"),
            CUSTODIAN_ID,
        ),
        case(
            "pledge-release-receipt/valid",
            "The custodian's receipt of the executed release, addressed to the exchange and the "
            "client, verified by the exchange.",
            issued.release_pledge_receipt,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
            EXCHANGE_ID,
        ),
        case(
            "pledge-release-receipt/issued-by-client",
            "The receipt issued and signed by the client: only custodian keys may confirm a "
            "release.",
            forge(
                _receipt_of(issued.release_pledge_receipt),
                CLIENT_ID,
                [EXCHANGE_ID, CLIENT_ID],
                1,
                f"receipt-{messages.PLEDGE_RELEASE_ID}",
                by=[client],
            ),
            status("KEY_ROLE_MISMATCH"),
            EXCHANGE_ID,
        ),
        case(
            "redemption-request/replayed",
            "The same request again after the custodian acted on sequence 3: one request "
            "redeems once.",
            issued.redemption,
            status("REPLAYED"),
            CUSTODIAN_ID,
            last_accepted_sequence=3,
        ),
    ]


def _consent_of(envelope: envelope_pb2.Envelope) -> pledge_release_pb2.PledgeReleaseConsent:
    """The consent's message without its header, to be issued anew."""
    message = pledge_release_pb2.PledgeReleaseConsent.FromString(envelope.payload)
    message.ClearField("header")
    return message


def _receipt_of(envelope: envelope_pb2.Envelope) -> pledge_release_pb2.PledgeReleaseReceipt:
    message = pledge_release_pb2.PledgeReleaseReceipt.FromString(envelope.payload)
    message.ClearField("header")
    return message
