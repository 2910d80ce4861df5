"""collateral-sync: the open protocol for mirrored collateral (Python SDK).

The names most integrations need are re-exported here; each lives in a public
module named for what it is: ``signing`` (signed statements), ``keys`` (the
key registry), ``signer`` (what signs: a key file, or a key on a PKCS#11
token), ``merkle`` (RFC 9162 proofs), ``attestation`` (the custodian's
log and checkpoints), ``sync`` (the position-sync session), ``valuation``
(haircuts, credit, margin calls), ``audit`` (offline verification),
``clients`` / ``server`` / ``transport`` (gRPC with mutual TLS) and
``errors`` (the one exception hierarchy). Generated protobuf modules are in
``collateral_sync.v1``.
"""

from collateral_sync._version import PROTOCOL_VERSION, __version__
from collateral_sync.attestation import (
    AttestationLog,
    CheckpointMonitor,
    statement_leaf,
    verify_checkpoint,
)
from collateral_sync.audit import verify_audit_bundle
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    ProofError,
    RPCError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.merkle import verify_consistency_proof, verify_inclusion_proof
from collateral_sync.signer import Signer
from collateral_sync.signing import (
    VerifiedStatement,
    add_signature,
    sign_statement,
    verify_statement,
    verify_threshold,
)
from collateral_sync.valuation import recompute_margin_call

__all__ = [
    "PROTOCOL_VERSION",
    "AttestationLog",
    "CheckpointMonitor",
    "CollateralSyncError",
    "KeyRegistry",
    "MalformedError",
    "ProofError",
    "RPCError",
    "Signer",
    "SigningKey",
    "StateError",
    "VerificationError",
    "VerifiedStatement",
    "__version__",
    "add_signature",
    "recompute_margin_call",
    "sign_statement",
    "statement_leaf",
    "verify_audit_bundle",
    "verify_checkpoint",
    "verify_consistency_proof",
    "verify_inclusion_proof",
    "verify_statement",
    "verify_threshold",
]
