"""What the vector tests share: loading vectors/ files, and checks made without the SDK.

The paths of the repository, a file's parsed JSON, vector ids for pytest, and the
independent helpers more than one file's tests use: PAE and Ed25519 verification
written from docs/PROTOCOL.md (hashlib and PyNaCl, no SDK), and an envelope from its
JSON form.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
from collateral_sync.v1 import envelope_pb2

__all__ = [
    "PROTOCOL_MD",
    "ROOT",
    "VECTORS",
    "envelope_of",
    "ids_of",
    "load",
    "own_pae",
    "own_verify",
]

ROOT = Path(__file__).resolve().parents[3]
VECTORS = ROOT / "vectors"
PROTOCOL_MD = ROOT / "docs" / "PROTOCOL.md"


def load(name: str) -> dict[str, Any]:
    """One file of vectors/, parsed."""
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


def ids_of(vectors: Sequence[dict[str, Any]]) -> list[str]:
    """The vectors' ids, for pytest's test ids."""
    return [v["id"] for v in vectors]


# --- independent helpers (no SDK) ------------------------------------------------


def own_pae(payload_type: str, payload: bytes) -> bytes:
    """PAE (docs/PROTOCOL.md §3.2), written here rather than taken from the SDK."""
    kind = payload_type.encode("utf-8")
    return b"".join(
        [b"DSSEv1 ", str(len(kind)).encode(), b" ", kind, b" ", str(len(payload)).encode(),
         b" ", payload]
    )


def own_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """An Ed25519 signature check with PyNaCl alone."""
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def envelope_of(vector: dict[str, Any]) -> envelope_pb2.Envelope:
    """The Envelope a vector gives as JSON with hex bytes."""
    fields = vector["envelope"]
    return envelope_pb2.Envelope(
        payload=bytes.fromhex(fields["payload_hex"]),
        payload_type=fields["payload_type"],
        signatures=[
            envelope_pb2.Signature(key_id=s["key_id"], sig=bytes.fromhex(s["sig_hex"]))
            for s in fields["signatures"]
        ],
    )
