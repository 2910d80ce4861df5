"""The limits of stage c in statements.json: timestamps and integers (§2.4, §3.6).

The holdings statement with a header timestamp at, or just beyond, the range of
google.protobuf.Timestamp, with nanos out of range or unset, and with a header or body
integer above 2^63 - 1, the largest integer a protocol field may carry.
"""

from __future__ import annotations

from typing import Any

from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import attestation_pb2, envelope_pb2

from .._common import CUSTODIAN_ID, EXCHANGE_ID, ISSUED, TTL, NamedKey, statement_envelope, status
from ._shared import StatementCase, holdings_header, holdings_message, valid

__all__ = ["limit_cases"]


#: The range of google.protobuf.Timestamp seconds: 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z.
_TIMESTAMP_MIN_SECONDS = -62_135_596_800
_TIMESTAMP_MAX_SECONDS = 253_402_300_799
#: The largest integer a protocol field may carry (§2.4).
_MAX_INTEGER = 2**63 - 1


def limit_cases(keys: dict[str, NamedKey]) -> list[StatementCase]:
    custodian = keys["custodian"].key
    holdings_type = payload_type_of(attestation_pb2.HoldingsStatement)

    def holdings_with(
        change: str, seconds: int | None = None, nanos: int = 0
    ) -> envelope_pb2.Envelope:
        """The holdings statement with one header timestamp replaced (or cleared)."""
        header = holdings_header()
        stamp = header.issued_at if change == "issued_at" else header.expires_at
        if seconds is None:
            header.ClearField(change)  # type: ignore[arg-type]
        else:
            stamp.seconds = seconds
            stamp.nanos = nanos
        return statement_envelope(holdings_message(), header, [custodian])

    huge_epoch = holdings_message()
    huge_epoch.epoch = _MAX_INTEGER + 1

    def holdings_case(
        case_id: str, description: str, envelope: envelope_pb2.Envelope, expected: dict[str, Any]
    ) -> StatementCase:
        return StatementCase(case_id, description, holdings_type, envelope, expected, EXCHANGE_ID)

    return [
        holdings_case(
            "holdings-statement/valid-expires-at-timestamp-max",
            "expires_at = 9999-12-31T23:59:59.999999999Z, the last valid timestamp.",
            holdings_with("expires_at", _TIMESTAMP_MAX_SECONDS, 999_999_999),
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
        ),
        holdings_case(
            "holdings-statement/issued-at-before-year-1",
            "issued_at one second before 0001-01-01T00:00:00Z (seconds = -62135596801).",
            holdings_with("issued_at", _TIMESTAMP_MIN_SECONDS - 1),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/expires-at-after-year-9999",
            "expires_at one second after 9999-12-31T23:59:59Z (seconds = 253402300800).",
            holdings_with("expires_at", _TIMESTAMP_MAX_SECONDS + 1),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/issued-at-nanos-out-of-range",
            "issued_at with nanos = 1000000000 (at most 999999999).",
            holdings_with("issued_at", int(ISSUED.timestamp()), 1_000_000_000),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/expires-at-negative-nanos",
            "expires_at with nanos = -1.",
            holdings_with("expires_at", int((ISSUED + TTL).timestamp()), -1),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/issued-at-unset",
            "A header without issued_at.",
            holdings_with("issued_at"),
            status("MALFORMED"),
        ),
        holdings_case(
            "holdings-statement/sequence-above-2-63-minus-1",
            "header.sequence = 2^63: at least 1 (stage c2) but above the largest protocol "
            "integer (stage c3, section 2.4).",
            statement_envelope(
                holdings_message(), holdings_header(sequence=_MAX_INTEGER + 1), [custodian]
            ),
            status("OUT_OF_RANGE"),
        ),
        holdings_case(
            "holdings-statement/epoch-above-2-63-minus-1",
            "epoch = 2^63: a uint64 field of the body above the largest protocol integer "
            "(stage c3, section 2.4).",
            statement_envelope(huge_epoch, holdings_header(), [custodian]),
            status("OUT_OF_RANGE"),
        ),
    ]
