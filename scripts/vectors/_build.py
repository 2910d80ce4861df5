"""Builds every vector file, in order, as the exact text written under vectors/."""

from __future__ import annotations

from ._common import deterministic_keys, file_text
from .amounts import amounts_file
from .keys import keys_file
from .merkle import merkle_file
from .pae import pae_file
from .position_tree import position_tree_file
from .statements import statements_file
from .sync import sync_file

__all__ = ["VECTOR_FILES", "build_vectors"]


#: File names written under vectors/, in the order they are built.
VECTOR_FILES = (
    "keys.json",
    "pae.json",
    "statements.json",
    "merkle.json",
    "amounts.json",
    "sync.json",
    "position_tree.json",
)


def build_vectors() -> dict[str, str]:
    """Every vector file's name and exact text, generated in memory."""
    keys = deterministic_keys()
    merkle_body = merkle_file()
    checkpoint_root = bytes.fromhex(
        next(t["root_hex"] for t in merkle_body["trees"] if t["tree_size"] == 1000)
    )
    bodies = {
        "keys.json": ("keys", keys_file()),
        "pae.json": ("pae", pae_file()),
        "statements.json": ("statements", statements_file(keys, checkpoint_root)),
        "merkle.json": ("merkle", merkle_body),
        "amounts.json": ("amounts", amounts_file()),
        "sync.json": ("sync", sync_file(keys)),
        "position_tree.json": ("position_tree", position_tree_file()),
    }
    assert tuple(bodies) == VECTOR_FILES
    return {name: file_text(kind, body) for name, (kind, body) in bodies.items()}
