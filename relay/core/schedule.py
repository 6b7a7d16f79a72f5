"""When to try a queued message again, and when to give up. PURE.

Why this module exists: retry timing decides both how hard the relay pushes a struggling
Microsoft 365 and how long a sender waits to learn that mail failed, and it must be testable
without clocks. Values in (attempt count, Graph's Retry-After, the configured backoff, a random
number), a time out.

Rules (DESIGN §5):
- Graph's `Retry-After` is honoured exactly: never earlier (concepts/throttling.md).
- Otherwise exponential backoff: `first`, doubled per failed attempt, capped at `max`, with up
  to 25 % added jitter so messages deferred together do not retry together.
- No retry is scheduled past `created + lifetime`: the last try happens at the deadline, and a
  failure at or after it makes the message dead.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backoff", "is_expired", "next_attempt_at"]

JITTER = 0.25


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float
    max: float
    lifetime: float

    def delay(self, attempts: int, random_fraction: float) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
        exponent = max(0, attempts - 1)
        base = self.first * (2.0 ** min(exponent, 64))
        return min(self.max, base * (1.0 + JITTER * random_fraction))


def is_expired(created: float, now: float, lifetime: float) -> bool:
    return now - created >= lifetime


def next_attempt_at(
    *,
    now: float,
    created: float,
    attempts: int,
    retry_after: float | None,
    backoff: Backoff,
    random_fraction: float,
) -> float:
    """Wall-clock time of the next attempt after a transient failure."""
    if retry_after is not None:
        return now + max(0.0, retry_after)
    wait = backoff.delay(attempts, random_fraction)
    return max(now, min(now + wait, created + backoff.lifetime))
