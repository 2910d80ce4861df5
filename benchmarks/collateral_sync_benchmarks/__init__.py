"""``collateral-sync bench``: the protocol's figures beside baselines measured in the same run.

Not part of the SDK: an integrator who installs ``collateral_sync`` imports
none of this. Suites: ``sdk`` (signatures, the attestation log, proofs),
``sync`` (position sync and margin-call latency between two processes) and
``recon`` (reconciliation of a million accounts across three processes).
"""

from __future__ import annotations

from collateral_sync_benchmarks.sdk import run_benchmarks

__all__ = ["run_benchmarks"]
