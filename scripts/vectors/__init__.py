"""The generator of the language-neutral test vectors in vectors/*.json.

The vectors pin the protocol's byte-level rules (docs/PROTOCOL.md, "Test
vectors") so that an implementation in any language can check itself without
running ours: key ids, PAE, signed statements that must verify or must fail
with a given ErrorReason, RFC 9162 Merkle roots and proofs, canonical amounts,
sync-entry hashes and hash chains, position-tree leaves and roots, and
valuation, credit, margin-call and liquidation figures.

Everything is deterministic: fixed 32-byte Ed25519 seeds (Ed25519 signatures
are deterministic), fixed timestamps, fixed statement ids, deterministic
protobuf serialisation. Where the expected outcomes come from depends on the
file (docs/PROTOCOL.md section 15 says the same):

- keys, pae, statements, merkle, amounts, sync and position_tree: written here
  by hand from the specification, never read back from the SDK's verifiers, so
  that the vectors test the SDK rather than mirror it; tests/sdk/vectors/
  checks the Python SDK and independent checks written from the specification
  against them, and so does the TypeScript SDK.
- valuation: computed here with the Python SDK (collateral_sync.valuation)
  and cross-checked by the TypeScript SDK, written independently from the
  specification, which must reproduce every figure and refusal; the figures
  of the worked example of section 7.4 are checked against the ones the
  document prints when the file is built.

tests/sdk/vectors/ also checks that the committed files equal what this
package generates.

One module per file: keys, pae, statements, merkle, amounts, sync,
position_tree and valuation each build the body of the vectors/ file of that name
(statements is a subpackage, one module per concern; its __init__ lists them);
_common holds what they share (the file header, the reason -> status table,
parties, times, deterministic keys, protobuf and hex helpers); _build
assembles the files in order; _cli is the command line of
scripts/make_vectors.py.

Usage::

    python scripts/make_vectors.py            # (re)write vectors/
    python scripts/make_vectors.py --check    # exit 1 if vectors/ differs
"""

from __future__ import annotations

from ._build import VECTOR_FILES, build_vectors
from ._cli import main

__all__ = ["VECTOR_FILES", "build_vectors", "main"]
