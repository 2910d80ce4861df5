"""State snapshots that let a negative case prove a refused request changed nothing (§12.3).

A snapshot is taken before the request and compared after it: for a
custodian, the log's size and root and the kit account's latest holdings
statement; for an exchange, its policy version and the account's margin
calls and credit line (compared without their headers, so that a re-signed
statement with the same content is no change).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from collateral_sync.v1 import (
    attestation_pb2,
    custodian_service_pb2,
    envelope_pb2,
    exchange_service_pb2,
    margin_pb2,
    valuation_pb2,
)
from google.protobuf.message import DecodeError, Message

from collateral_sync_conformance._context import CaseContext
from collateral_sync_conformance._expect import CaseFailure, expect_ok

__all__ = ["CustodianState", "custodian_state", "exchange_state", "expect_unchanged"]


@dataclass(frozen=True, slots=True)
class CustodianState:
    """What a refused request must leave as it was."""

    tree_size: int
    root_hash: str
    #: Digest of the account's latest holdings statement payload, or how reading it failed.
    holdings: str

    def text(self) -> str:
        return f"tree_size={self.tree_size} root={self.root_hash} holdings={self.holdings}"


async def custodian_state(ctx: CaseContext) -> CustodianState:
    outcome = await ctx.rpc(
        ctx.custodian.get_checkpoint, custodian_service_pb2.GetCheckpointRequest()
    )
    response: custodian_service_pb2.GetCheckpointResponse = expect_ok(outcome)
    checkpoint = attestation_pb2.Checkpoint.FromString(response.checkpoint.payload)
    holdings_text = "(no --account)"
    if ctx.config.account_id:
        read = await ctx.rpc(
            ctx.owner.custodian.get_holdings_statement,
            custodian_service_pb2.GetHoldingsStatementRequest(account_id=ctx.config.account_id),
        )
        if read.ok:
            payload = read.response.holdings_statement.payload
            holdings_text = hashlib.sha256(payload).hexdigest()[:16]
        else:
            holdings_text = read.code.name
    return CustodianState(checkpoint.tree_size, checkpoint.root_hash.hex()[:16], holdings_text)


async def expect_unchanged(ctx: CaseContext, before: CustodianState) -> None:
    """A refused request changes no state (§12.3): the log and the account are as they were."""
    after = await custodian_state(ctx)
    if after != before:
        raise CaseFailure(
            "the refused request changed the server's state (attestation log or holdings)",
            expected=before.text(),
            got=after.text(),
        )


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
