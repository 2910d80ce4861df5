"""The kit's cases, by family; importing this package registers them with ``REGISTRY``.

Order of import is the order of a run: transport first (can we talk at all),
then the attestation log, signed-statement refusals, role behaviour, position sync, settlement, and emergency release
(last: an executed release consumes the account's pledge).
"""

from collateral_sync_conformance.cases import transport  # noqa: I001 (run order)
from collateral_sync_conformance.cases import attestation, envelope, custodian, sync, exchange

from collateral_sync_conformance.cases import regulator, settlement, reconciliation
from collateral_sync_conformance.cases import cosign

# Last: an executed release consumes the account's pledge.
from collateral_sync_conformance.cases import emergency

__all__ = [
    "attestation",
    "cosign",
    "custodian",
    "emergency",
    "envelope",
    "exchange",
    "reconciliation",
    "regulator",
    "settlement",
    "sync",
    "transport",
]
