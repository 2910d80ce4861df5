"""Paging of the reference servers' listings (ListMarginCalls, ListLiquidations, ListEquivocationEvidence).

Rows are listed oldest first. A page token names the listing (a tag of its
own, so that one listing's token cannot page through another), the last row
served and the scope listed (the account of an account's listing; empty for
a listing of the whole party); it is opaque to the client (URL-safe base64).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from collateral_sync.errors import MalformedError

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Listing", "rows_per_page"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class _Row(Protocol):
    @property
    def seq(self) -> int: ...


_T = TypeVar("_T", bound=_Row)


def rows_per_page(requested: int) -> int:
    """How many rows a page holds: the default for 0, else as requested up to the maximum."""
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Listing:
    """One paged listing: its RPC name (for errors) and the tag of its tokens."""

    name: str
    tag: str

    def after(self, token: str, account_id: str) -> int:
        """The seq of the last row served before, from ``token`` ("": none); MALFORMED if foreign.

        ``account_id`` is the scope of the listing: the account listed, or "" for
        a listing of the whole party.
        """
        prefix = self.tag
        if not token:
            return 0
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii")).decode()
            tag, seq_text, owner = (
                raw[: len(prefix)],
                *raw[len(prefix) :].split(":", 1),
            )
            seq = int(seq_text)
        except (ValueError, UnicodeError):
            seq, tag, owner = -1, "", ""
        if tag != prefix or seq < 1 or owner != account_id:
            scope = " of this account" if account_id else ""
            raise MalformedError(
                f"page_token: expected a token from a previous {self.name}{scope}",
                metadata={
                    "field": "page_token",
                    "expected": "a token of this listing",
                    "actual": token[:40],
                },
                field_violations={"page_token": "not a token of this listing"},
            )
        return seq

    def page(self, rows: Sequence[_T], size: int, account_id: str) -> tuple[Sequence[_T], str]:
        """The page of ``rows`` (fetched ``size + 1``), and the token of the next page ("": none)."""
        page, more = rows[:size], len(rows) > size
        return page, (self._token(account_id, page[-1].seq) if more else "")

    def _token(self, account_id: str, seq: int) -> str:
        raw = f"{self.tag}{seq}:{account_id}".encode()
        return base64.urlsafe_b64encode(raw).decode("ascii")
