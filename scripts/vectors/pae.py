"""vectors/pae.json: the DSSE pre-authentication encoding of a type and a payload (§3.2)."""

from __future__ import annotations

from typing import Any

from collateral_sync.signing import pae

__all__ = ["pae_file"]


def pae_file() -> dict[str, Any]:
    cases: list[tuple[str, bytes, str]] = [
        (
            "application/vnd.collateral-sync.v1.checkpoint+proto",
            b"hello",
            "the example of docs/PROTOCOL.md section 3.2",
        ),
        ("application/vnd.collateral-sync.v1.holdings-statement+proto", b"", "empty payload"),
        ("", b"x", "empty payload type"),
        (
            "application/vnd.collateral-sync.v1.sync-batch+proto",
            bytes(range(256)),
            "binary payload of 256 bytes: three-digit length, spaces and NULs inside",
        ),
        (
            "application/vnd.collateral-sync.v1.margin-call+proto",
            b"DSSEv1 1 a 1 b",
            "a payload that itself looks like a PAE",
        ),
        ("type/\u00e9", b"\xc3\xa9", "non-ASCII type: LEN counts UTF-8 bytes (7), not characters"),
        ("application/example", b"0123456789" * 100, "1000-byte payload"),
    ]
    return {
        "description": (
            'PAE(type, payload) = "DSSEv1" SP LEN(type) SP type SP LEN(payload) SP payload, '
            "LEN = ASCII decimal byte length without leading zeros, SP = 0x20, type as UTF-8."
        ),
        "vectors": [
            {
                "description": why,
                "payload_type": payload_type,
                "payload_hex": payload.hex(),
                "pae_hex": pae(payload_type, payload).hex(),
            }
            for payload_type, payload, why in cases
        ],
    }
