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
from .valuation import valuation_file

__all__ = ["CLAUSES", "VECTOR_FILES", "build_vectors"]


#: File names written under vectors/, in the order they are built.
VECTOR_FILES = (
    "keys.json",
    "pae.json",
    "statements.json",
    "merkle.json",
    "amounts.json",
    "sync.json",
    "position_tree.json",
    "valuation.json",
)


#: The clauses of docs/PROTOCOL.md each file pins, by the clause ids of docs/CONFORMANCE.md
#: (each is an anchor of PROTOCOL.md: ``§4.1/registry-entry-refused`` is
#: ``PROTOCOL.md#registry-entry-refused``). Written as the file's top-level ``clauses``.
CLAUSES = {
    "keys.json": (
        "§4.1/registry-entry-refused",
        "§4.1/duplicate-key-id-refused",
        "§4.3/snake-case-registry-names",
        "§4.6/registry-version-accepted",
        "§4.6/registry-history-kept",
    ),
    "pae.json": (),
    "statements.json": (
        "§1.3/ignore-unknown-fields",
        "§2.4/integer-range",
        "§3.3/canonical-signature-scalar",
        "§3.4/signing-key-of-issuer",
        "§3.4/expires-after-issued",
        "§3.6/verify-before-parse",
        "§3.7/issuer-among-signers",
    ),
    "merkle.json": ("§15.2/log-generates-vector-paths",),
    "amounts.json": ("§2.1/refuse-non-canonical-amount", "§2.1/send-canonical-amounts"),
    "sync.json": ("§2.4/integer-range",),
    "position_tree.json": ("§2.1/refuse-non-canonical-amount",),
    "valuation.json": (
        "§2.1/refuse-non-canonical-amount",
        "§7.1/adl-rule-defined",
        "§7.1/stale-price-rule-defined",
    ),
}


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
        "valuation.json": ("valuation", valuation_file(keys)),
    }
    assert tuple(bodies) == VECTOR_FILES
    assert set(CLAUSES) == set(VECTOR_FILES), "every vector file names its clauses in CLAUSES"
    return {
        # The clauses right after the description (which stays first).
        name: file_text(
            kind, {"description": body["description"], "clauses": list(CLAUSES[name]), **body}
        )
        for name, (kind, body) in bodies.items()
    }
