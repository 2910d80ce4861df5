"""The committed vectors/ is exactly what scripts/make_vectors.py generates (drift fails).

Also: the generator is deterministic, and its --check mode notices a stale file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ._common import ROOT, VECTORS


def _generator() -> ModuleType:
    """The generator package scripts/vectors/, freshly imported under the name make_vectors.

    These tests are themselves the package ``vectors`` on sys.path, so the generator is
    loaded from its folder under a name of its own, and taken out of sys.modules again.
    """
    package = ROOT / "scripts" / "vectors"
    spec = importlib.util.spec_from_file_location(
        "make_vectors", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Relative imports and dataclasses look their modules up in sys.modules while they run.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]
    return module


def test_committed_vectors_equal_the_generator_output() -> None:
    generator = _generator()
    generated: dict[str, str] = generator.build_vectors()
    assert sorted(p.name for p in VECTORS.iterdir()) == sorted(generator.VECTOR_FILES)
    for name, text in generated.items():
        committed = (VECTORS / name).read_text(encoding="utf-8")
        assert committed == text, f"vectors/{name} is stale: run scripts/make_vectors.py"


def test_generator_is_deterministic() -> None:
    generator = _generator()
    assert generator.build_vectors() == generator.build_vectors()


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    generator = _generator()
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / "pae.json"
    stale.write_text(stale.read_text(encoding="utf-8").replace("DSSE", "dsse", 1))
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1
