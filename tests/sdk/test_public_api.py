"""The SDK's public surface is pinned: adding or removing a name is a decision."""

from __future__ import annotations

import collateral_sync
from collateral_sync.v1 import envelope_pb2

EXPECTED = {
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
}


def test_export_list_is_pinned() -> None:
    assert set(collateral_sync.__all__) == EXPECTED
    for name in collateral_sync.__all__:
        assert hasattr(collateral_sync, name), name


def test_every_error_derives_from_the_root() -> None:
    for name in ("MalformedError", "ProofError", "RPCError", "StateError", "VerificationError"):
        assert issubclass(getattr(collateral_sync, name), collateral_sync.CollateralSyncError)


def test_protocol_version_matches_the_proto_package() -> None:
    assert envelope_pb2.DESCRIPTOR.package == collateral_sync.PROTOCOL_VERSION
