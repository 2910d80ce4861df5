"""collateral-sync: the open protocol for mirrored collateral (Python SDK)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
PROTOCOL_VERSION = "collateral_sync.v1"
