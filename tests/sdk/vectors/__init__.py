"""Tests for the language-neutral test vectors in vectors/ (scripts/make_vectors.py).

One module per vector file (test_keys, test_pae, test_statements, test_merkle,
test_amounts, test_sync, test_position_tree), test_files for checks across the
files, test_drift for the generator, and _common for what they share. Three things
are checked:

(a) the committed files are exactly what the generator produces (drift fails);
(b) every positive vector verifies with the SDK *and* with an independent
    check written here from the JSON and docs/PROTOCOL.md alone (hashlib and
    PyNaCl for keys, PAE and signatures; tests/sdk/rfc9162_reference.py for Merkle
    proofs; a character-level checker for amounts);
(c) every negative vector fails, in the SDK and in the independent check, with
    the ErrorReason (and gRPC status) the vector states.
"""
