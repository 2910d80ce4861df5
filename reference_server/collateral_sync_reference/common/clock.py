"""The server's clock: real UTC time, or in test mode real time plus an offset tests move.

Everything time-driven in a server (statement times, freshness checks, yield
accrual, redemption settlement, cure periods) reads one :class:`Clock`, so a
test can jump a running server forward with ``TestControlService.AdvanceClock``
instead of waiting. The offset of a :class:`TestClock` is kept in the server's
storage, so a restarted test server carries on at the time it had reached.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from collateral_sync.errors import MalformedError

from collateral_sync_reference.common.storage import Storage

__all__ = ["Clock", "SystemClock", "TestClock", "system_now"]

_OFFSET_KEY = "test_clock_offset_us"


def system_now() -> datetime:
    """The real time, timezone-aware UTC."""
    return datetime.now(UTC)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""


class SystemClock:
    """Real UTC time; what a production server runs on."""

    __slots__ = ()

    def now(self) -> datetime:
        return system_now()


class TestClock:
    """Real time plus an offset that only moves forward and survives restarts."""

    __test__ = False  # not a pytest test class
    __slots__ = ("_base", "_offset", "_storage")

    def __init__(self, storage: Storage, *, base: Callable[[], datetime] = system_now) -> None:
        self._storage = storage
        self._base = base
        stored = storage.get_meta(_OFFSET_KEY)
        self._offset = timedelta(microseconds=int(stored)) if stored is not None else timedelta(0)

    @property
    def offset(self) -> timedelta:
        return self._offset

    def now(self) -> datetime:
        return self._base() + self._offset

    def advance(self, by: timedelta) -> datetime:
        """Move the clock forward by ``by`` (>= 0), durably; return the new time."""
        if by < timedelta(0):
            raise MalformedError(
                f"the clock only moves forward: expected a duration >= 0, got {by}",
                metadata={"field": "by", "expected": ">= 0", "actual": str(by)},
                field_violations={"by": "must not be negative"},
            )
        offset = self._offset + by
        with self._storage.transaction():
            self._storage.set_meta(_OFFSET_KEY, str(offset // timedelta(microseconds=1)))
        self._offset = offset
        return self.now()
