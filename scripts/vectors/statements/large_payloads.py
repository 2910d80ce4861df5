"""The "large_payloads" of statements.json: payloads at and over stage a2's 4 MiB (§3.6).

Too large to write out, they are written as a rule (assembly.py): a prefix, then a count
of zero bytes. StatementCase.padding is that count.
"""

from __future__ import annotations

from collateral_sync.statements import payload_type_of
from collateral_sync.v1 import attestation_pb2

from .._common import CUSTODIAN_ID, EXCHANGE_ID, NamedKey, raw_envelope, status
from ._shared import StatementCase, holdings_header, holdings_message, valid

__all__ = ["large_payload_cases"]


#: Stage a2's limit (§3.6): 4 MiB.
_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
#: The key of the padding record of the large payloads: field 1000, wire type 2 (an unknown
#: length-delimited field of every statement message).
_PADDING_KEY = bytes([0xC2, 0x3E])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def large_payload_cases(keys: dict[str, NamedKey]) -> list[StatementCase]:
    """Holdings statements padded to exactly 4 MiB (valid) and to 4 MiB + 1 byte (TOO_LARGE).

    The padding is one unknown length-delimited field of zero bytes after the known fields,
    so the payload is a validly signed, parseable statement: only its size differs.
    """
    custodian = keys["custodian"].key
    holdings_type = payload_type_of(attestation_pb2.HoldingsStatement)
    cases = []
    for case_id, description, sequence, size, expected in (
        (
            "holdings-statement/valid-payload-of-4-mib",
            "A holdings statement padded with an unknown field to exactly 4194304 bytes, the "
            "largest payload allowed.",
            10,
            _MAX_PAYLOAD_BYTES,
            valid(CUSTODIAN_ID, CUSTODIAN_ID),
        ),
        (
            "holdings-statement/too-large",
            "The same padded to 4194305 bytes: one byte over 4 MiB (stage a2), refused before "
            "its signature is checked.",
            11,
            _MAX_PAYLOAD_BYTES + 1,
            status("TOO_LARGE"),
        ),
    ):
        message = holdings_message()
        message.header.CopyFrom(
            holdings_header(
                sequence=sequence, statement_id=f"holdings-acct-0001-epoch-3-padded-{size}"
            )
        )
        known = message.SerializeToString(deterministic=True)
        length_bytes = 4  # 2^21 <= padding < 2^28
        padding = size - len(known) - len(_PADDING_KEY) - length_bytes
        prefix = known + _PADDING_KEY + _varint(padding)
        assert len(_varint(padding)) == length_bytes
        payload = prefix + bytes(padding)
        assert len(payload) == size
        envelope = raw_envelope(payload, holdings_type, [custodian])
        cases.append(
            StatementCase(
                case_id,
                description,
                holdings_type,
                envelope,
                expected,
                EXCHANGE_ID,
                padding=padding,
            )
        )
    return cases
