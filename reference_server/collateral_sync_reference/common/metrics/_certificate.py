"""Certificate expiry: seconds until the server's own TLS certificate and its CA expire.

Read at each scrape from the TLS material the server holds (not the files on
disk, which may already hold a renewal the server has not loaded), by wall
time: a peer checks validity by its real clock, never the test clock.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable

from collateral_sync.dev_ca import load_certificate_chain_pem
from collateral_sync.transport import TlsConfig
from prometheus_client.metrics_core import Metric

from collateral_sync_reference.common.metrics._exposition import Source
from collateral_sync_reference.common.metrics.catalogue import CERTIFICATE_EXPIRY

__all__ = ["certificate_figures"]


def certificate_figures(tls: Callable[[], TlsConfig | None]) -> Source:
    """A source of ``collateral_sync_certificate_expiry_seconds`` for the material ``tls()`` holds."""

    def read() -> Iterable[Metric]:
        material = tls()
        if material is None:
            return ()
        now = time.time()
        family = CERTIFICATE_EXPIRY.family()
        family.add_metric(["server"], _not_after(material.cert_chain, latest=False) - now)
        family.add_metric(["ca"], _not_after(material.ca_cert, latest=True) - now)
        return (family,)

    return read


# Parsed once per PEM in use: a reload brings new bytes, and so a new entry.
@functools.lru_cache(maxsize=8)
def _not_after(pem: bytes, *, latest: bool) -> float:
    """notAfter (POSIX seconds) of the chain's leaf, or its latest-expiring certificate."""
    moments = [cert.not_valid_after_utc.timestamp() for cert in load_certificate_chain_pem(pem)]
    return max(moments) if latest else moments[0]
