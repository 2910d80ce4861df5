"""Generated protobuf and gRPC modules for collateral_sync.v1 (do not edit)."""
