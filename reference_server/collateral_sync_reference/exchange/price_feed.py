"""Price sources of the reference exchange: the interface, and a deterministic scripted feed.

The exchange values collateral with the quotes of one named price source (the
risk policy's ``price_source``). :class:`PriceSource` is what the exchange
needs from one. The reference implementation, :class:`ScriptedPriceFeed`,
never looks outside: its quotes come from a script in the configuration
(``PriceStep``: a price that takes effect at a given time, or at start) and
from ``TestControlService.SetPrice``. It keeps its current quotes in the
exchange's SQLite database, so a restarted exchange values with the prices it
had, and a test or demo gets the same figures on every run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from collateral_sync.amounts import Amount, format_amount, parse_amount
from collateral_sync.errors import MalformedError
from collateral_sync.v1 import common_pb2, errors_pb2, valuation_pb2

from collateral_sync_reference.common.config import ConfigSection
from collateral_sync_reference.common.storage import SqlStorage

__all__ = [
    "PriceSource",
    "PriceStep",
    "ScriptedPriceFeed",
]

_R = errors_pb2.ErrorReason
_NS = 1_000_000_000
_ABSENT = "\x00absent"


class PriceSource(Protocol):
    """Where the exchange takes prices from.

    ``quotes`` returns the current quote of each asset it knows among
    ``asset_ids`` (an asset without a quote counts 0 in a valuation).
    ``tick`` is called with the exchange's clock before every valuation sweep
    and inside the exchange's open database transaction; it returns the assets
    whose quote changed since the last call, so that the exchange revalues
    the accounts holding them.
    """

    @property
    def name(self) -> str: ...

    def quotes(self, asset_ids: Iterable[str]) -> list[valuation_pb2.PriceQuote]: ...

    def tick(self, now: datetime) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class PriceStep:
    """One line of a price script: ``asset_id`` costs ``price`` from ``at`` on.

    ``at`` None means from the start. ``observed_at`` is the time the quote
    says it was observed (default: ``at``, or the time the step is applied
    when ``at`` is None); an old ``observed_at`` scripts a stale price.
    """

    asset_id: str
    price: Amount
    at: datetime | None = None
    observed_at: datetime | None = None

    @classmethod
    def from_config(cls, section: ConfigSection) -> PriceStep:
        """Read ``{"asset_id", "price", "at"?, "observed_at"?}`` (times RFC 3339, UTC)."""
        asset_id = section.string("asset_id")
        price = section.amount("price")
        if price < 0:
            raise section.error("price", "a price >= 0", format_amount(price))
        step = cls(
            asset_id=asset_id,
            price=price,
            at=_time(section, "at"),
            observed_at=_time(section, "observed_at"),
        )
        section.finish()
        return step


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS price_quotes (
        source TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        price TEXT NOT NULL,
        observed_at_ns INTEGER NOT NULL,
        changed INTEGER NOT NULL,
        PRIMARY KEY (source, asset_id)
    ) WITHOUT ROWID""",
    # How many script steps have been applied, so a restart does not apply
    # a step twice (and override a SetPrice made after it).
    """CREATE TABLE IF NOT EXISTS price_script_progress (
        source TEXT PRIMARY KEY,
        applied INTEGER NOT NULL
    )""",
)


class ScriptedPriceFeed:
    """A deterministic price source: a script of steps plus prices set by tests.

    Quotes live in the table ``price_quotes`` of the exchange's storage. Writes (:meth:`set_price`, :meth:`tick`) must run
    inside the caller's open transaction, so that a price and the valuation
    it causes commit together. The last write for an asset wins: a SetPrice
    replaces a scripted price, and a script step due later replaces it in turn.
    """

    def __init__(
        self,
        storage: SqlStorage,
        *,
        name: str,
        script: Sequence[PriceStep] = (),
    ) -> None:
        if not name:
            raise ValueError("a price source needs a non-empty name")
        storage.execute_schema("exchange.price_feed", _SCHEMA)
        self._connection = storage.connection
        self._name = name
        # Steps without a time first, then by time; equal times keep script order.
        start = datetime.min.replace(tzinfo=UTC)
        self._script = sorted(script, key=lambda step: step.at or start)

    @property
    def name(self) -> str:
        return self._name

    def quotes(self, asset_ids: Iterable[str]) -> list[valuation_pb2.PriceQuote]:
        wanted = sorted(set(asset_ids))
        found: list[valuation_pb2.PriceQuote] = []
        for asset_id in wanted:
            row = self._connection.execute(
                "SELECT price, observed_at_ns FROM price_quotes WHERE source = ? AND asset_id = ?",
                (self._name, asset_id),
            ).fetchone()
            if row is not None:
                found.append(self._quote(asset_id, row[0], row[1]))
        return found

    def all_quotes(self) -> list[valuation_pb2.PriceQuote]:
        """Every current quote, by asset id."""
        rows = self._connection.execute(
            "SELECT asset_id, price, observed_at_ns FROM price_quotes WHERE source = ? "
            "ORDER BY asset_id",
            (self._name,),
        ).fetchall()
        return [self._quote(asset_id, price, ns) for asset_id, price, ns in rows]

    def set_price(
        self, quote: valuation_pb2.PriceQuote, *, now: datetime
    ) -> valuation_pb2.PriceQuote:
        """Publish ``quote`` (TestControlService.SetPrice); returns the quote as stored.

        The asset id must be non-empty and the price canonical and >= 0
        (INVALID_AMOUNT otherwise); ``source``, if set, must be this feed's
        name (quotes of another source are never used); ``observed_at``
        defaults to ``now``.
        """
        if not quote.asset_id:
            raise _malformed("quote.asset_id", "a non-empty asset id", "''")
        if not quote.HasField("price"):
            raise _malformed("quote.price", "a Decimal", "absent")
        price = parse_amount(quote.price.value, field="quote.price")
        if price < 0:
            raise MalformedError(
                f"quote.price: expected >= 0, got {quote.price.value}",
                reason=_R.ERROR_REASON_INVALID_AMOUNT,
                metadata={"field": "quote.price", "expected": ">= 0", "actual": quote.price.value},
                field_violations={"quote.price": "must be >= 0"},
            )
        if quote.source and quote.source != self._name:
            raise MalformedError(
                f"quote.source: expected {self._name!r}, got {quote.source!r}",
                metadata={"field": "quote.source", "expected": self._name, "actual": quote.source},
                field_violations={"quote.source": f"must be {self._name!r} or empty"},
            )
        observed = (
            quote.observed_at.seconds * _NS + quote.observed_at.nanos
            if quote.HasField("observed_at")
            else _ns(now)
        )
        self._write(quote.asset_id, price, observed)
        return self._quote(quote.asset_id, format_amount(price), observed)

    def tick(self, now: datetime) -> frozenset[str]:
        """Apply the script steps due by ``now``; return every asset changed since the last tick."""
        row = self._connection.execute(
            "SELECT applied FROM price_script_progress WHERE source = ?", (self._name,)
        ).fetchone()
        applied = 0 if row is None else int(row[0])
        due = applied
        while due < len(self._script):
            step = self._script[due]
            if step.at is not None and step.at > now:
                break
            observed = step.observed_at or step.at or now
            self._write(step.asset_id, step.price, _ns(observed))
            due += 1
        if due != applied:
            self._connection.execute(
                "INSERT INTO price_script_progress VALUES (?, ?) "
                "ON CONFLICT (source) DO UPDATE SET applied = excluded.applied",
                (self._name, due),
            )
        changed = self._connection.execute(
            "SELECT asset_id FROM price_quotes WHERE source = ? AND changed = 1", (self._name,)
        ).fetchall()
        if changed:
            self._connection.execute(
                "UPDATE price_quotes SET changed = 0 WHERE source = ? AND changed = 1",
                (self._name,),
            )
        return frozenset(asset_id for (asset_id,) in changed)

    def _write(self, asset_id: str, price: Amount, observed_ns: int) -> None:
        if not self._connection.in_transaction:
            raise RuntimeError("price writes run inside the exchange's open transaction")
        self._connection.execute(
            "INSERT INTO price_quotes VALUES (?, ?, ?, ?, 1) ON CONFLICT (source, asset_id) "
            "DO UPDATE SET price = excluded.price, observed_at_ns = excluded.observed_at_ns, "
            "changed = 1",
            (self._name, asset_id, format_amount(price), observed_ns),
        )

    def _quote(self, asset_id: str, price: str, observed_ns: int) -> valuation_pb2.PriceQuote:
        quote = valuation_pb2.PriceQuote(
            asset_id=asset_id, price=common_pb2.Decimal(value=price), source=self._name
        )
        quote.observed_at.seconds, quote.observed_at.nanos = divmod(observed_ns, _NS)
        return quote


def _ns(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {moment!r}")
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * _NS + delta.microseconds * 1_000


def _time(section: ConfigSection, key: str) -> datetime | None:
    text = section.string(key, _ABSENT)
    if text is _ABSENT:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise section.error(key, "an RFC 3339 time such as 2026-01-01T00:00:00Z", text) from None
    if moment.tzinfo is None:
        raise section.error(key, "an RFC 3339 time with a zone (Z)", text)
    return moment.astimezone(UTC)


def _malformed(field: str, expected: str, actual: str) -> MalformedError:
    return MalformedError(
        f"{field}: expected {expected}, got {actual}",
        metadata={"field": field, "expected": expected, "actual": actual},
        field_violations={field: f"must be {expected}"},
    )
