"""Checks across the vector files.

The header every file shares, unique vector ids, what the specification requires the
vectors to cover, and the examples docs/PROTOCOL.md quotes from them.
"""

from __future__ import annotations

from ._common import PROTOCOL_MD, ids_of, load

KEYS = load("keys.json")
PAE = load("pae.json")
STATEMENTS = load("statements.json")
MERKLE = load("merkle.json")
AMOUNTS = load("amounts.json")
SYNC = load("sync.json")
POSITION_TREE = load("position_tree.json")

NEGATIVE_STATEMENTS = [v for v in STATEMENTS["vectors"] if not v["expected"]["valid"]]


def test_every_file_declares_the_format() -> None:
    for document in (KEYS, PAE, STATEMENTS, MERKLE, AMOUNTS):
        assert document["format"] == "collateral-sync-test-vectors"
        assert document["format_version"] == 1
        assert document["protocol"] == "collateral_sync.v1"


def test_vector_ids_are_unique() -> None:
    for vectors in (
        STATEMENTS["vectors"],
        MERKLE["invalid_inclusion"],
        MERKLE["invalid_consistency"],
    ):
        ids = ids_of(vectors)
        assert len(ids) == len(set(ids))


def test_the_vectors_cover_what_the_spec_requires() -> None:
    reasons = {v["expected"]["reason"] for v in NEGATIVE_STATEMENTS}
    assert {
        "SIGNATURE_INVALID",
        "PAYLOAD_TYPE_MISMATCH",
        "KEY_UNKNOWN",
        "KEY_ROLE_MISMATCH",
        "KEY_REVOKED",
        "KEY_NOT_VALID",
        "AUDIENCE_MISMATCH",
        "STATEMENT_EXPIRED",
        "STATEMENT_NOT_YET_VALID",
        "REPLAYED",
        "THRESHOLD_NOT_MET",
        "MALFORMED",
    } <= reasons
    sizes = {t["tree_size"] for t in MERKLE["trees"]}
    assert set(range(33)) | {100, 1000} <= sizes
    assert any(v["expected"]["reason"] == "CHECKPOINT_INCONSISTENT"
               for v in MERKLE["invalid_consistency"])


def test_protocol_document_examples_match_the_vectors() -> None:
    # docs/PROTOCOL.md quotes a PAE and a registry entry; they must be the vectors' bytes.
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    assert PAE["vectors"][0]["pae_hex"] in text
    seed_key = next(v for v in KEYS["vectors"] if v["seed_hex"] == bytes(range(32)).hex())
    assert seed_key["key_id"] in text
    assert seed_key["public_key_base64"] in text


def test_sync_and_position_tree_files_declare_the_format() -> None:
    for document, kind in ((SYNC, "sync"), (POSITION_TREE, "position_tree")):
        assert document["format"] == "collateral-sync-test-vectors"
        assert document["format_version"] == 1
        assert document["protocol"] == "collateral_sync.v1"
        assert document["kind"] == kind
    for vectors in (
        SYNC["entry_hash"],
        SYNC["invalid_entry_hash"],
        SYNC["chains"],
        SYNC["invalid_chains"],
        SYNC["receiving"],
        SYNC["batches"],
        POSITION_TREE["trees"],
        POSITION_TREE["invalid"],
    ):
        ids = ids_of(vectors)
        assert len(ids) == len(set(ids))
