"""How long a mailbox pauses after Graph or Exchange said it reached a sending limit. PURE.

Why this module exists: a limit answer (`TransientDeliveryError.mailbox_limit`) is about the
mailbox, not the message (issue #12): everyone sending as it waits. Graph's 429 says how long
(Retry-After, concepts/throttling.md: waiting that long is the fastest recovery); Exchange's
message-limit answers often say nothing, and the block they announce lasts minutes to hours. So
without Retry-After the pause is learned: it starts short for concurrency answers (a request in
flight ends within seconds) and at a minute for sending limits, and doubles with each pause in a
row until a send goes through.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CONCURRENCY_LIMITS", "pause_for"]

# Answers about requests at once: they clear when a request in flight ends.
CONCURRENCY_LIMITS: Final = frozenset({"MailboxConcurrency", "CommandConcurrencyLimitReached"})
_FIRST: Final = {True: 1.0, False: 60.0}
_LONGEST: Final = {True: 60.0, False: 3600.0}
_LONGEST_RETRY_AFTER: Final = 86_400.0  # a day: past that a Retry-After is a server's mistake


def pause_for(limit: str, retry_after: float | None, streak: int) -> float:
    """Seconds to pause a mailbox that reached `limit`: Retry-After when Graph gave one, else
    the learned back-off for the `streak`-th pause in a row (0 for the first)."""
    if retry_after is not None and retry_after > 0:
        return min(retry_after, _LONGEST_RETRY_AFTER)
    concurrency = limit in CONCURRENCY_LIMITS
    return min(_LONGEST[concurrency], _FIRST[concurrency] * 2.0 ** min(streak, 32))
