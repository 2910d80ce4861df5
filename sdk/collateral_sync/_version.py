"""Versions: of this package, and of the protocol it implements."""

__version__ = "0.1.0"
#: The protocol package every message belongs to; reports carry it.
PROTOCOL_VERSION = "collateral_sync.v1"
