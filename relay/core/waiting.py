"""How long each mailbox's mail was held back by the relay's own pacing. PURE.

Why this module exists: a message that waits because its mailbox has no sending budget, is
paused after a limit answer, or has all its Graph slots taken is not failing, and that wait
must not age it towards `retry.lifetime` (issue #12). The workers see, at each look at the
queue, which mailboxes are held back; this module keeps those moments as intervals per mailbox
and answers how much of a message's wait fell inside them (`held`), which
`relay.core.lifecycle.claimed` credits to the entry. Time the relay was not running, or spent
retrying after failures, is not held back and still counts.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["HeldBack"]

K = TypeVar("K", bound=Hashable)


class HeldBack(Generic[K]):
    """Per key, the sorted, disjoint intervals during which it was held back."""

    def __init__(self, horizon: float) -> None:
        self._horizon = horizon  # intervals ending longer ago than this are forgotten
        self._starts: dict[K, list[float]] = {}
        self._ends: dict[K, list[float]] = {}
        self._open: set[K] = set()  # held back at the last `observe`

    def observe(self, held: Iterable[K], now: float) -> None:
        """The keys held back at `now`. A key also held back at the previous observation is
        taken to have been held back all the time between."""
        current = set(held)
        for key in current:
            starts, ends = self._starts.setdefault(key, []), self._ends.setdefault(key, [])
            if key in self._open and ends and ends[-1] <= now:
                ends[-1] = now
            elif not ends or now > ends[-1]:
                starts.append(now)
                ends.append(now)
        self._open = current
        self._forget(now)

    def held(self, key: K, since: float, until: float) -> float:
        """Seconds of [since, until] during which `key` was held back."""
        starts, ends = self._starts.get(key), self._ends.get(key)
        if not starts or not ends or until <= since:
            return 0.0
        total = 0.0
        for i in range(max(0, bisect.bisect_right(ends, since) - 1), len(starts)):
            if starts[i] >= until:
                break
            total += max(0.0, min(ends[i], until) - max(starts[i], since))
        return total

    def _forget(self, now: float) -> None:
        for key in list(self._ends):
            ends = self._ends[key]
            old = bisect.bisect_left(ends, now - self._horizon)
            if old:
                del ends[:old]
                del self._starts[key][:old]
            if not ends and key not in self._open:
                del self._ends[key], self._starts[key]
