"""How ``make demo`` talks: sections, steps, checks, refusals and tables on stdout.

Every line printed says something that happened in this run; the helpers only
shape it. Amounts are shown with thousands separators but never rounded: the
text is the exact decimal a signed statement carried.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.errors import CollateralSyncError

__all__ = [
    "amount",
    "check",
    "command",
    "detail",
    "opening",
    "refused",
    "section",
    "step",
    "table",
]

_INDENT = "   "


def _emit(text: str) -> None:
    # Flushed line by line: a piped `make demo` shows progress as it happens.
    print(text, flush=True)


def opening(text: str) -> None:
    """What the story is about, before its first act."""
    _emit(text)


def section(title: str) -> None:
    """A new act of the story."""
    _emit(f"\n== {title}")


def step(text: str) -> None:
    """Something a party did."""
    _emit(f"{_INDENT}{text}")


def detail(text: str) -> None:
    """A figure or fact under the previous step."""
    _emit(f"{_INDENT}  {text}")


def check(text: str) -> None:
    """A verification that passed."""
    _emit(f"{_INDENT}ok      {text}")


def refused(text: str, error: CollateralSyncError) -> None:
    """Something bad that was refused, with the status and reason it was refused with."""
    _emit(f"{_INDENT}refused {text}")
    _emit(f"{_INDENT}        -> {error.code.name} {error.reason_name}: {error.message}")


def command(args: Sequence[str]) -> None:
    """A ``collateral-sync`` command the demo runs, as an operator would type it."""
    _emit(f"{_INDENT}$ collateral-sync {' '.join(args)}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns: the first left-aligned, the rest right-aligned (they are figures)."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def render(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return f"{_INDENT}  " + "  ".join(cells).rstrip()

    _emit(render(header))
    for row in rows:
        _emit(render(row))


def amount(value: str | Decimal) -> str:
    """An exact decimal with thousands separators: ``"1000000.5"`` -> ``"1,000,000.5"``."""
    # Canonical first, so a computed Decimal never shows as 1E+6 or 11.80.
    text = value if isinstance(value, str) else format_amount(value)
    return f"{parse_amount(text):,}"
