"""A server's own TLS material while it serves: reloaded when its files change, watched for expiry.

The runner reads and checks ``tls.ca``, ``tls.cert`` and ``tls.key`` at start
and hands them to :class:`ServerTls`, which keeps them as a
:class:`~collateral_sync.transport.ReloadableTls`. The server's credentials
and the channels it dials its peers with both use that object, so replaced
files are picked up without a restart: each new incoming connection gets the
new certificate and trust bundle, each new outgoing connection presents the
new certificate, and connections already open keep theirs. A replacement is
taken only if it is whole, its key matches, its certificate still names this
server's party, and it (and at least one CA of the bundle) is within its dates;
otherwise the previous material stays and one warning says why.

A certificate that expires within :data:`EXPIRY_WARNING` is a warning in the
log at start, at each reload and every :data:`EXPIRY_CHECK_INTERVAL` while
serving; :func:`served_certificate_seconds_until_expiry` gives a metrics gauge
the same fact. docs/OPERATIONS.md, "Certificate rotation", is the operator's
side of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from collateral_sync.dev_ca import certificate_common_name, load_certificate_chain_pem
from collateral_sync.errors import MalformedError
from collateral_sync.transport import (
    ReloadableTls,
    TlsConfig,
    certificate_validity_problem,
)
from cryptography import x509

from collateral_sync_reference.common.config import TlsFiles

__all__ = [
    "EXPIRY_CHECK_INTERVAL",
    "EXPIRY_WARNING",
    "ServerTls",
    "served_certificate_seconds_until_expiry",
    "watching",
]

#: A server's certificate expiring sooner than this is a warning.
EXPIRY_WARNING = timedelta(days=14)
#: How often a serving server looks at its files and its certificate's expiry
#: when no connection made it look (every new connection does).
EXPIRY_CHECK_INTERVAL = timedelta(days=1)

_T = TypeVar("_T")

#: The ServerTls of each server of this process whose :meth:`ServerTls.watch` runs.
_SERVING: list[ServerTls] = []


class ServerTls:
    """The TLS material one server serves and dials with, reloadable; see the module."""

    def __init__(
        self, files: TlsFiles, initial: TlsConfig, *, party_id: str, logger: logging.Logger
    ) -> None:
        self.files = files
        self.party_id = party_id
        self._logger = logger
        #: What the server's credentials and its outgoing channels are made from.
        self.material = ReloadableTls(
            files.ca,
            files.cert,
            files.key,
            accept=self._acceptable,
            on_change=self._changed,
            initial=initial,
        )

    @property
    def certificate_not_after(self) -> datetime:
        """When the certificate new connections get stops being valid (the earliest of its chain)."""
        return _expiring_first(self.material.current()).not_valid_after_utc

    def seconds_until_expiry(self, now: datetime | None = None) -> float:
        """Seconds from ``now`` (default: the system clock) to :attr:`certificate_not_after`."""
        moment = datetime.now(UTC) if now is None else now
        return (self.certificate_not_after - moment).total_seconds()

    def warn_if_expiring(self, now: datetime | None = None) -> bool:
        """Log a warning if the served certificate expires within :data:`EXPIRY_WARNING`."""
        return self._warn_if_expiring(self.material.current(), now)

    async def watch(self, interval: timedelta = EXPIRY_CHECK_INTERVAL) -> None:
        """Until cancelled: every ``interval``, pick up changed files and warn of a near expiry."""
        _SERVING.append(self)
        try:
            while True:
                await asyncio.sleep(interval.total_seconds())
                self.warn_if_expiring()
        finally:
            _SERVING.remove(self)

    def _warn_if_expiring(self, material: TlsConfig, now: datetime | None) -> bool:
        moment = datetime.now(UTC) if now is None else now
        cert = _expiring_first(material)
        left = cert.not_valid_after_utc - moment
        if left > EXPIRY_WARNING:
            return False
        when = f"in {_duration(left)}" if left > timedelta(0) else f"{_duration(-left)} ago"
        self._logger.warning(
            "TLS certificate %s (%s) %s at %s (%s): rotate it before then; peers refuse an "
            "expired certificate (docs/OPERATIONS.md, Certificate rotation)",
            self.files.cert,
            cert.subject.rfc4514_string(),
            "expires" if left > timedelta(0) else "expired",
            _utc(cert.not_valid_after_utc),
            when,
        )
        return True

    def _acceptable(self, material: TlsConfig) -> None:
        """What start checks of the files, checked again of their replacement."""
        now = datetime.now(UTC)
        chain = load_certificate_chain_pem(material.cert_chain)
        name = certificate_common_name(chain[0])
        if name != self.party_id:
            raise MalformedError(
                f"{self.files.cert}: CN {name!r}, expected the party id {self.party_id!r}",
                metadata={"field": "tls.cert", "expected": self.party_id, "actual": name},
            )
        for cert in chain:
            problem = certificate_validity_problem(cert, now)
            if problem is not None:
                raise MalformedError(
                    f"the certificate {self.files.cert} ({cert.subject.rfc4514_string()}) "
                    f"{problem}",
                    metadata={"field": "tls.cert", "expected": "valid now", "actual": problem},
                )
        problems = [
            certificate_validity_problem(cert, now)
            for cert in load_certificate_chain_pem(material.ca_cert)
        ]
        if all(problem is not None for problem in problems):
            raise MalformedError(
                f"no CA certificate of {self.files.ca} is valid now: the first {problems[0]}",
                metadata={"field": "tls.ca", "expected": "a valid CA", "actual": str(problems[0])},
            )

    def _changed(self, material: TlsConfig) -> None:
        self._warn_if_expiring(material, None)


def served_certificate_seconds_until_expiry(now: datetime | None = None) -> float | None:
    """Seconds until the TLS certificate this process serves expires (negative once it has).

    For a metrics gauge: the certificate new connections get, after any reload;
    None when no server of this process serves TLS (plaintext, or not started).
    With several servers in one process, the one that expires first.
    """
    serving = list(_SERVING)
    if not serving:
        return None
    return min(server.seconds_until_expiry(now) for server in serving)


async def watching(server_tls: ServerTls | None, work: Awaitable[_T]) -> _T:
    """Await ``work`` while ``server_tls`` is watched (:meth:`ServerTls.watch`); None: just await."""
    if server_tls is None:
        return await work
    watch = asyncio.create_task(server_tls.watch(), name="tls-watch")
    try:
        return await work
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


def _expiring_first(material: TlsConfig) -> x509.Certificate:
    return min(
        load_certificate_chain_pem(material.cert_chain), key=lambda cert: cert.not_valid_after_utc
    )


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def _duration(delta: timedelta) -> str:
    if delta >= timedelta(days=2):
        return f"{delta.days} days"
    hours = int(delta.total_seconds() // 3600)
    return f"{hours} hours" if hours != 1 else "1 hour"
