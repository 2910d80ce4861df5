"""Write the language-neutral test vectors of collateral_sync.v1 into vectors/*.json.

The command line of scripts/make_vectors.py: write every file, or with --check exit 1
when a committed file differs from what the generator builds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._build import build_vectors

__all__ = ["VECTORS_DIR", "main"]


VECTORS_DIR = Path(__file__).resolve().parents[2] / "vectors"


def main(argv: Sequence[str] | None = None) -> int:
    """Write vectors/ (or --out), or --check it; the exit status. --help quotes line 1 above."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if vectors/ differs from the generator"
    )
    parser.add_argument("--out", type=Path, default=VECTORS_DIR, help="output directory")
    args = parser.parse_args(argv)
    files = build_vectors()
    out: Path = args.out
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != text
        ]
        if stale:
            print(f"stale test vectors in {out}: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files to {out}")
    return 0
