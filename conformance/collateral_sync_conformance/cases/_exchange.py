"""Helpers for the cases that test an exchange: its risk policy and a state snapshot.

When the kit tests an exchange it plays the exchange's custodian: its TLS
certificate and its ``--kit-key`` of role custodian are the custodian's.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from collateral_sync.errors import VerificationError
from collateral_sync.signing import VerifiedStatement, verify_statement
from collateral_sync.v1 import (
    envelope_pb2,
    errors_pb2,
    exchange_service_pb2,
    margin_pb2,
    valuation_pb2,
)
from collateral_sync.valuation import validate_risk_policy
from google.protobuf.message import DecodeError, Message

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import check, check_equal, expect_ok, sdk_check

__all__ = ["exchange_state", "latest_policy", "signed_credit_line", "verified_policy"]


def _verify_public(
    ctx: CaseContext, envelope: envelope_pb2.Envelope, now: datetime
) -> VerifiedStatement[valuation_pb2.RiskPolicy]:
    """A risk policy is public: addressed to everyone, or at least to the kit."""
    try:
        return verify_statement(
            envelope, ctx.registry, expected_type=valuation_pb2.RiskPolicy, audience="*", now=now
        )
    except VerificationError as err:
        if err.reason != errors_pb2.ERROR_REASON_AUDIENCE_MISMATCH:
            raise
    return verify_statement(
        envelope,
        ctx.registry,
        expected_type=valuation_pb2.RiskPolicy,
        audience=ctx.kit_party_id,
        now=now,
    )


async def verified_policy(
    ctx: CaseContext, envelope: envelope_pb2.Envelope
) -> valuation_pb2.RiskPolicy:
    """A risk policy the server returned: signed by its exchange key, and valid (§7.1)."""
    verified = sdk_check("the risk policy", _verify_public, ctx, envelope, await ctx.server_now())
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


def _content_digest(envelope: envelope_pb2.Envelope, message_class: type[Message]) -> str:
    """Digest of a statement without its header: a re-signed statement is the same content."""
    try:
        message = message_class.FromString(envelope.payload)
    except DecodeError:
        return "undecodable"
    message.ClearField("header")
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()[:16]


async def exchange_state(ctx: CaseContext) -> str:
    """What a refused request must leave as it was: the policy, and the account's call and credit."""
    outcome = await ctx.rpc(
        ctx.exchange.get_risk_policy, exchange_service_pb2.GetRiskPolicyRequest()
    )
    parts = []
    if outcome.ok:
        policy = valuation_pb2.RiskPolicy.FromString(outcome.response.risk_policy.payload)
        parts.append(f"policy version={policy.version}")
    else:
        parts.append(f"policy {outcome.code.name}")
    if ctx.config.account_id:
        account = ctx.config.account_id
        calls = await ctx.rpc(
            ctx.exchange.list_margin_calls,
            exchange_service_pb2.ListMarginCallsRequest(account_id=account, page_size=1000),
        )
        if calls.ok:
            digests = [
                _content_digest(e, margin_pb2.MarginCallState)
                for e in calls.response.margin_call_states
            ]
            parts.append(f"margin calls={','.join(digests) or 'none'}")
        else:
            parts.append(f"margin calls {calls.code.name}")
        credit = await ctx.rpc(
            ctx.exchange.get_credit_line,
            exchange_service_pb2.GetCreditLineRequest(account_id=account),
        )
        if credit.ok:
            parts.append(
                f"credit line={_content_digest(credit.response.credit_line, valuation_pb2.CreditLine)}"
            )
        else:
            parts.append(f"credit line {credit.code.name}")
    return " ".join(parts)


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
