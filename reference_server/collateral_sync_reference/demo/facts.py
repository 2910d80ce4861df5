"""How the demo reads signed statements aloud: their decimals, names and positions.

Also the one edit a forger makes to a statement's bytes, to show it refused.
"""

from __future__ import annotations

from decimal import Decimal

from collateral_sync.amounts import parse_amount
from collateral_sync.errors import StateError
from collateral_sync.v1 import attestation_pb2, common_pb2, margin_pb2, valuation_pb2

from collateral_sync_reference.demo import text as say

__all__ = [
    "asset_class_name",
    "by_asset",
    "cites",
    "decimal_of",
    "edit_quantity",
    "positions_text",
    "reason_name",
    "status_name",
]

_S = margin_pb2.MarginCallStatus
_REASON = attestation_pb2.HoldingsChangeReason


def edit_quantity(payload: bytes, old: str, new: str) -> bytes:
    """``payload`` with its first ``old`` decimal text replaced (a forger's edit)."""
    edited = payload.replace(old.encode(), new.encode(), 1)
    if edited == payload:
        raise StateError(
            f"expected the decimal {old} in the statement's bytes, found none",
            metadata={"expected": f"{old} in the payload", "actual": "absent"},
        )
    return edited


def decimal_of(value: common_pb2.Decimal) -> Decimal:
    return parse_amount(value.value or "0")


def asset_class_name(asset_class: int) -> str:
    return common_pb2.AssetClass.Name(asset_class).removeprefix("ASSET_CLASS_")  # type: ignore[arg-type]


def reason_name(statement: attestation_pb2.HoldingsStatement) -> str:
    return _REASON.Name(statement.reason).removeprefix("HOLDINGS_CHANGE_REASON_")


def status_name(status: int) -> str:
    return _S.Name(status).removeprefix("MARGIN_CALL_STATUS_")  # type: ignore[arg-type]


def positions_text(statement: attestation_pb2.HoldingsStatement) -> str:
    parts = []
    for position in statement.positions:
        text = f"{position.asset_id} {say.amount(position.quantity.value)}"
        pledged = decimal_of(position.pledged_quantity)
        if pledged:
            text += f" ({say.amount(pledged)} pledged)"
        parts.append(text)
    return " · ".join(parts) or "nothing"


def by_asset(statement: attestation_pb2.HoldingsStatement) -> dict[str, common_pb2.Position]:
    return {position.asset_id: position for position in statement.positions}


def cites(credit: valuation_pb2.CreditLine, leaf_index: int) -> bool:
    return any(ref.leaf_index == leaf_index for ref in credit.attestations)
