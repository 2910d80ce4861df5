"""The kit's cases, by family; importing this package registers them with ``REGISTRY``.

Order of import is the order of a run: transport first (can we talk at all),
then the attestation log, signed-statement refusals, role behaviour, and position sync.
"""

from collateral_sync_conformance.cases import transport  # noqa: I001 (run order)
from collateral_sync_conformance.cases import attestation, envelope, custodian, sync, exchange

__all__ = ["attestation", "custodian", "envelope", "exchange", "sync", "transport"]
