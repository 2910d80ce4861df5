"""Write the language-neutral test vectors of collateral_sync.v1 into vectors/*.json.

The command line of the generator, whose code lives in the package scripts/vectors/
(one module per vector file). This path stays the entry point: the Makefile, the docs
and the "generator" field of every vector file name it.

Usage::

    python scripts/make_vectors.py            # (re)write vectors/
    python scripts/make_vectors.py --check    # exit 1 if vectors/ differs
"""

from __future__ import annotations

import sys

from vectors import VECTOR_FILES, build_vectors, main

__all__ = ["VECTOR_FILES", "build_vectors", "main"]

if __name__ == "__main__":
    sys.exit(main())
