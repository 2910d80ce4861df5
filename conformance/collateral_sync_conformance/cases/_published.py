"""Helpers for what a server publishes signed: public statements, the risk policy, credit lines.

When the kit tests an exchange it plays the exchange's custodian: its TLS
certificate and its ``--kit-key`` of role custodian are the custodian's.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from collateral_sync.errors import VerificationError
from collateral_sync.signing import VerifiedStatement, verify_statement
from collateral_sync.v1 import envelope_pb2, errors_pb2, exchange_service_pb2, valuation_pb2
from collateral_sync.valuation import validate_risk_policy
from google.protobuf.message import Message

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import check, check_equal, expect_ok, sdk_check

__all__ = ["latest_policy", "signed_credit_line", "verified_policy", "verify_public"]

M = TypeVar("M", bound=Message)


def verify_public(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, now: datetime, expected_type: type[M]
) -> tuple[VerifiedStatement[M], str]:
    """Verify a public statement (checkpoint, risk policy): addressed to everyone, or to the kit.

    Returns the verified statement and the audience it verified for.
    """
    try:
        verified = verify_statement(
            envelope, ctx.registry, expected_type=expected_type, audience="*", now=now
        )
    except VerificationError as err:
        if err.reason != errors_pb2.ERROR_REASON_AUDIENCE_MISMATCH:
            raise
    else:
        return verified, "*"
    verified = verify_statement(
        envelope, ctx.registry, expected_type=expected_type, audience=ctx.kit_party_id, now=now
    )
    return verified, ctx.kit_party_id


async def verified_policy(
    ctx: CaseContext, envelope: envelope_pb2.Envelope
) -> valuation_pb2.RiskPolicy:
    """A risk policy the server returned: signed by its exchange key, and valid (§7.1)."""
    now = await ctx.server_now()
    verified, _ = sdk_check(
        "the risk policy", verify_public, ctx, envelope, now, valuation_pb2.RiskPolicy
    )
    check_equal("risk policy issuer", ctx.server_party_id, verified.issuer)
    policy: valuation_pb2.RiskPolicy = verified.message
    sdk_check("the risk policy's content (§7.1)", validate_risk_policy, policy)
    check(
        policy.version >= 1, "risk policy version must be >= 1", expected=">= 1", got=policy.version
    )
    return policy


async def latest_policy(ctx: CaseContext) -> valuation_pb2.RiskPolicy:
    outcome = await ctx.rpc(
        ctx.exchange.get_risk_policy, exchange_service_pb2.GetRiskPolicyRequest()
    )
    response: exchange_service_pb2.GetRiskPolicyResponse = expect_ok(outcome)
    check(
        response.HasField("risk_policy"),
        "GetRiskPolicy returned no policy",
        expected="a signed RiskPolicy",
        got="none",
    )
    return await verified_policy(ctx, response.risk_policy)


async def signed_credit_line(ctx: CaseContext, account: str) -> valuation_pb2.CreditLine:
    """GetCreditLine of ``account``: signed by the exchange, of that account, valuing something."""
    outcome = await ctx.rpc(
        ctx.exchange.get_credit_line, exchange_service_pb2.GetCreditLineRequest(account_id=account)
    )
    response: exchange_service_pb2.GetCreditLineResponse = expect_ok(outcome)
    verified = sdk_check(
        "the credit line",
        verify_statement,
        response.credit_line,
        ctx.registry,
        expected_type=valuation_pb2.CreditLine,
        audience=ctx.kit_party_id,
        now=await ctx.server_now(),
    )
    check_equal("credit line issuer", ctx.server_party_id, verified.issuer)
    line: valuation_pb2.CreditLine = verified.message
    check_equal("credit line account_id", account, line.account_id)
    check(
        bool(line.valuations),
        "the credit line of an account with pledged collateral values no position",
        expected="at least one PositionValuation row",
        got="none",
    )
    return line
