"""The custodian process: ``python -m collateral_sync_benchmarks.sync WORKDIR POOL``.

The benchmark (:func:`~collateral_sync_benchmarks.sync.run_sync_benchmark`) is
the exchange; it starts this as its child and drives it over stdin/stdout.
"""

from __future__ import annotations

import sys

from collateral_sync_benchmarks.sync._custodian import _child

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
