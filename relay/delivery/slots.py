"""Graph request slots per sending mailbox: at most 4 at once, and pauses after a 429.

Why this module exists: Graph allows 4 concurrent requests per app and mailbox
(MailboxConcurrency, concepts/throttling-limits.md); a fifth only earns a 429. And a 429 with
Retry-After is about the mailbox, not the one message: everyone sending as that mailbox waits.
The inline attempt and the queue workers share one `MailboxSlots`, so neither can overrun the
other, and the workers ask it which mailboxes to leave out of `Store.due`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from relay.core.limits import MAILBOX_CONCURRENCY
from relay.store.protocol import MailboxKey, mailbox_key

__all__ = ["MailboxSlots"]


class MailboxSlots:
    """At most `limit` concurrent Graph requests per (auth object, mailbox), plus pauses."""

    def __init__(
        self,
        limit: int = MAILBOX_CONCURRENCY,
        *,
        monotonic: Callable[[], float],
        limit_for: Callable[[str, str], int] | None = None,
    ) -> None:
        self.limit = limit
        # A mailbox's own limit (delivery.mailbox_limits.concurrent_requests), at most `limit`.
        self._limit_for = limit_for
        self._monotonic = monotonic
        self._slots: dict[MailboxKey, tuple[asyncio.Semaphore, int]] = {}
        self._limits: dict[MailboxKey, int] = {}  # the limit each semaphore was made with
        self._paused: dict[MailboxKey, float] = {}

    def limit_of(self, auth_object: str, mailbox: str) -> int:
        if self._limit_for is None:
            return self.limit
        return max(1, min(self.limit, self._limit_for(auth_object, mailbox)))

    @staticmethod
    def key(auth_object: str, mailbox: str) -> MailboxKey:
        return mailbox_key(auth_object, mailbox)

    def users(self, auth_object: str, mailbox: str) -> int:
        """Requests holding or waiting for a slot of this mailbox."""
        return self._slots.get(self.key(auth_object, mailbox), (None, 0))[1]

    def busy(self, auth_object: str, mailbox: str, *, starting: int = 0) -> bool:
        """True when a new request (after `starting` others about to start) would wait."""
        if self.users(auth_object, mailbox) + starting >= self.limit_of(auth_object, mailbox):
            return True
        return self.paused_for(auth_object, mailbox) > 0

    def busy_keys(self) -> set[MailboxKey]:
        """Every mailbox a new request would have to wait for (for `Store.due(exclude=)`)."""
        full = {
            key
            for key, (_, users) in self._slots.items()
            if users >= self._limits.get(key, self.limit)
        }
        now = self._monotonic()
        return full | {key for key, until in self._paused.items() if until > now}

    def next_unpause(self) -> float | None:
        """Seconds until the first pause ends, None when nothing is paused."""
        now = self._monotonic()
        waits = [until - now for until in self._paused.values() if until > now]
        return min(waits) if waits else None

    def paused_for(self, auth_object: str, mailbox: str) -> float:
        key = self.key(auth_object, mailbox)
        remaining = self._paused.get(key, 0.0) - self._monotonic()
        if remaining <= 0:
            self._paused.pop(key, None)
            return 0.0
        return remaining

    def pause(self, auth_object: str, mailbox: str, seconds: float) -> float:
        """Pause the mailbox for `seconds` from now (a longer pause stays); the seconds this
        added to the pause (0.0 when it was paused as long already)."""
        key = self.key(auth_object, mailbox)
        now = self._monotonic()
        before = max(now, self._paused.get(key, 0.0))
        self._paused[key] = max(before, now + seconds)
        return self._paused[key] - before

    @contextlib.asynccontextmanager
    async def hold(self, auth_object: str, mailbox: str) -> AsyncIterator[None]:
        key = self.key(auth_object, mailbox)
        if key not in self._slots:
            self._limits[key] = self.limit_of(auth_object, mailbox)
        semaphore, users = self._slots.get(key, (asyncio.Semaphore(self._limits[key]), 0))
        self._slots[key] = (semaphore, users + 1)
        try:
            async with semaphore:  # a pause is the caller's to check, once it holds the slot
                yield
        finally:
            semaphore, users = self._slots[key]
            if users <= 1:
                del self._slots[key]  # as small as the set of busy mailboxes
                self._limits.pop(key, None)
            else:
                self._slots[key] = (semaphore, users - 1)
