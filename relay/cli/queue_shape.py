"""`queue shape`: qshape for this relay: how old the waiting mail is, per sending mailbox.

Why this module exists: when a queue grows, the first question is whether it is one mailbox or
all of them, and whether it is a burst (young mail) or a jam (old mail). Postfix answers it with
`qshape`: rows per domain, columns of age buckets that double in width. Here the rows are the
sending mailboxes (the unit Graph throttles), the columns the same doubling buckets, with a
TOTAL row and column and each mailbox's last error, which is usually the why. Pure: entries and
`now` in, text out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from relay.core.message.addresses import fold_ascii
from relay.core.values import EntryMeta

__all__ = ["BUCKETS", "bucket_of", "shape_table"]

# Upper bounds in minutes; the last column holds everything older than the last bound.
BUCKETS: Final[tuple[int, ...]] = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
_LABELS: Final[tuple[str, ...]] = (*(f"{m}m" for m in BUCKETS), f"{BUCKETS[-1]}m+")


def bucket_of(age_seconds: float) -> int:
    """The column of an entry this old: the first bucket whose bound it is under."""
    minutes = max(0.0, age_seconds) / 60
    for column, bound in enumerate(BUCKETS):
        if minutes < bound:
            return column
    return len(BUCKETS)


def shape_table(entries: Sequence[EntryMeta], now: float) -> str:
    """The table: a TOTAL row first, then one row per mailbox, most mail first."""
    cells: dict[str, list[int]] = {}
    last_error: dict[str, tuple[float, str]] = {}
    for entry in entries:
        box = fold_ascii(entry.mailbox)
        row = cells.setdefault(box, [0] * len(_LABELS))
        row[bucket_of(now - entry.created)] += 1
        if entry.last_error and entry.created >= last_error.get(box, (-1.0, ""))[0]:
            last_error[box] = (entry.created, entry.last_error)  # the youngest entry's error
    total = [sum(column) for column in zip(*cells.values(), strict=True)] or [0] * len(_LABELS)
    name_width = max([len("TOTAL"), *map(len, cells)]) + 2
    width = max(6, *(len(label) + 1 for label in _LABELS))

    def line(name: str, counts: Sequence[int], error: str) -> str:
        numbers = "".join(f"{n:>{width}}" for n in (sum(counts), *counts))
        return f"{name:<{name_width}}{numbers}  {error}".rstrip() + "\n"

    head = "".join(f"{label:>{width}}" for label in ("T", *_LABELS))
    text = f"{'MAILBOX':<{name_width}}{head}  LAST ERROR\n" + line("TOTAL", total, "")
    for box in sorted(cells, key=lambda b: (-sum(cells[b]), b)):
        text += line(box, cells[box], last_error.get(box, (0.0, ""))[1])
    return text
