"""Checks across the vector files.

The header every file shares, unique vector ids, what the specification requires the
vectors to cover, the examples docs/PROTOCOL.md quotes from them, and the clauses each
file cites (its top-level ``clauses``), against the clause tables of docs/CONFORMANCE.md.
"""

from __future__ import annotations

import re

from ._common import PROTOCOL_MD, ROOT, VECTORS, ids_of, load

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
    assert any(
        v["expected"]["reason"] == "CHECKPOINT_INCONSISTENT" for v in MERKLE["invalid_consistency"]
    )


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


CONFORMANCE_MD = ROOT / "docs" / "CONFORMANCE.md"
CLAUSE_TABLES = "## Normative clauses and the cases that check them"
#: A row of the clause tables: its clause id and its last cell ("Checked by").
_CLAUSE_ROW = re.compile(r"^\| `(§[^`]+)` \|.*\| ([^|]*?) \|$", re.MULTILINE)


def _clause_rows() -> dict[str, str]:
    """Clause id -> "Checked by", from the MUST and SHOULD tables of docs/CONFORMANCE.md."""
    text = CONFORMANCE_MD.read_text(encoding="utf-8")
    assert CLAUSE_TABLES in text, f"docs/CONFORMANCE.md has no section {CLAUSE_TABLES!r}"
    section = re.split(r"^## ", text.split(CLAUSE_TABLES, 1)[1], maxsplit=1, flags=re.MULTILINE)[0]
    rows = {m.group(1): m.group(2).strip() for m in _CLAUSE_ROW.finditer(section)}
    assert len(rows) >= 40, f"found only {len(rows)} clause rows in docs/CONFORMANCE.md"
    return rows


def _cited() -> dict[str, list[str]]:
    """Vector file name -> the clauses it cites."""
    cited = {}
    for path in sorted(VECTORS.glob("*.json")):
        clauses = load(path.name).get("clauses")
        assert isinstance(clauses, list), f"vectors/{path.name} has no top-level `clauses` list"
        assert len(clauses) == len(set(clauses)), f"vectors/{path.name} cites a clause twice"
        cited[path.name] = clauses
    return cited


def test_every_cited_clause_is_a_row_of_the_clause_tables() -> None:
    rows = _clause_rows()
    unknown = [
        f"vectors/{name}: {clause}"
        for name, clauses in _cited().items()
        for clause in clauses
        if clause not in rows
    ]
    assert not unknown, (
        "vector files cite clauses that docs/CONFORMANCE.md has no row for (regenerate with "
        "scripts/make_vectors.py after fixing CLAUSES in scripts/vectors/_build.py):\n"
        + "\n".join(unknown)
    )


def test_every_vectors_row_is_cited_by_its_file() -> None:
    cited = _cited()
    missing = []
    for clause, checked_by in _clause_rows().items():
        if not checked_by.startswith("vectors:"):
            continue
        name = checked_by.removeprefix("vectors:").strip().strip("`")
        if clause not in cited.get(name, []):
            missing.append(f"{clause}: checked by `vectors: {name}`, which does not cite it")
    assert not missing, "\n".join(missing)
