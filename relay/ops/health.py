"""The checks behind /healthz and /readyz, and the queue reading the admin pages share.

Why this module exists: the answers must tell the truth, and each one is decided here, apart
from the HTTP server that carries it (`relay.ops.admin`) and the page that shows it
(`relay.ops.status_page`):

- healthy: every configured SMTP listener is bound, and the spool can be written (the root is a
  writable directory with more than the reserve free). Otherwise 503 with one reason per line.
- degraded: healthy, but something the relay cannot mend alone is wrong and an operator should
  know, e.g. "outcomes not recorded: 3" (the store could not record what Graph answered; those
  messages are held until it can). /healthz stays 200 (a restart would not help and could lose
  the held outcomes) and names each reason; /readyz turns 503 so that a load balancer sends new
  mail to a relay that can record it.
- ready: healthy, not degraded, and Microsoft 365 tokens can be had as far as the relay knows:
  some auth object's last token request succeeded, or none has failed yet.

Nothing here touches the network. The spool probe and the queue counts run under a deadline,
so a hung file system or database makes the answer quick and negative instead of late. The
queue counts come from `Store.stats`, which the store keeps up to date incrementally: no check
and no page lists the entries of the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.config.schema import Config, ListenerConfig
from relay.core.history import HistoryQuery, HistoryRecord
from relay.graph.tokens import TokenStatus
from relay.ops.mailbox_gauges import MailboxRow
from relay.ops.queue_gauges import QueueReading
from relay.store.protocol import StoreError, StoreStats

__all__ = [
    "CHECK_TIMEOUT",
    "BoundListenerView",
    "HealthChecks",
    "HealthSources",
    "HistorySearch",
    "MailboxReport",
    "QueueStats",
    "SpoolProbe",
    "listener_problems",
    "spool_problems",
    "token_problems",
]

# The logger that has always reported unreadable queue counts at scrape time.
log = logging.getLogger("relay.metrics")

# A health check that cannot finish in this time is itself the answer: 503.
CHECK_TIMEOUT = 2.0

# `Store.stats`: the counts per state, cheap (kept incrementally by the store).
QueueStats = Callable[[float], Awaitable[StoreStats]]
# Each sending mailbox's budget and line at `now` (relay.delivery.mailboxes.mailbox_rows).
MailboxReport = Callable[[float], Awaitable[Sequence[MailboxRow]]]
# The delivery history, newest first (relay.delivery.history.DeliveryHistory.search).
HistorySearch = Callable[[HistoryQuery], Awaitable[Sequence[HistoryRecord]]]


class BoundListenerView(Protocol):
    """A listening SMTP socket (relay.service.BoundListener)."""

    @property
    def config(self) -> ListenerConfig: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class SpoolProbe(Protocol):
    """Whether a file spool could take a message: blocking calls, a few syscalls."""

    @property
    def root(self) -> Path: ...
    def has_room_for(self, size: int) -> bool: ...


def _nothing_degraded() -> Sequence[str]:
    return ()


@dataclass(frozen=True, slots=True)
class HealthSources:
    """The running relay as the admin server sees it; filled in by the composition root.

    `listeners` are the listeners that must be bound (fixed at start: a reload cannot move
    them); `bound` the ones listening now. `tokens`, `config` and `degraded` are called per
    request, so a reload that replaces the token provider is followed. `spool` (the file
    store's directory, probed for room) and `queue` (`Store.stats`) are None in direct mode.
    `degraded` is `DeliveryEngine.degraded_reasons`: one short reason per problem, none when
    all is well; it must be cheap and must not raise.
    """

    config: Callable[[], Config]
    listeners: Sequence[ListenerConfig]
    bound: Callable[[], Sequence[BoundListenerView]]
    tokens: Callable[[], Mapping[str, TokenStatus]]
    spool: SpoolProbe | None = None
    queue: QueueStats | None = None
    mailboxes: MailboxReport | None = None
    degraded: Callable[[], Sequence[str]] = _nothing_degraded
    history: HistorySearch | None = None


def listener_problems(
    expected: Sequence[ListenerConfig], bound: Sequence[BoundListenerView]
) -> list[str]:
    """One reason per configured listener that is not listening."""
    listening = [b.config for b in bound]
    problems = []
    for listener in expected:
        if listener in listening:
            listening.remove(listener)
        else:
            problems.append(f"SMTP listener {listener.address}:{listener.port} is not bound")
    if not expected:
        problems.append("no SMTP listener is configured")
    return problems


def spool_problems(spool: SpoolProbe) -> list[str]:
    """Whether the spool could take a message now. Blocking (a few syscalls)."""
    root = spool.root
    if not root.is_dir():
        return [f"spool {root} is not a directory"]
    if not os.access(root, os.W_OK | os.X_OK):
        return [f"spool {root} is not writable"]
    if not spool.has_room_for(0):
        return [f"spool {root}: free space is below the reserve for one message"]
    return []


def token_problems(statuses: Mapping[str, TokenStatus]) -> list[str]:
    """Empty when some auth object's last token request succeeded or none failed yet."""
    if any(status.last_ok for status in statuses.values()):
        return []
    return [
        f"auth object {name}: the last token request failed"
        + (f" ({status.code})" if status.code else "")
        + (f": {status.remedy}" if status.remedy else "")
        for name, status in sorted(statuses.items())
        if status.last_ok is False
    ]


class HealthChecks:
    """The verdicts of the module docstring, each read fresh from `HealthSources`."""

    def __init__(self, sources: HealthSources, *, check_timeout: float = CHECK_TIMEOUT) -> None:
        self.sources = sources
        self._timeout = check_timeout

    async def problems(self) -> list[str]:
        """The reasons /healthz answers 503; empty when healthy."""
        sources = self.sources
        problems = listener_problems(sources.listeners, sources.bound())
        if sources.spool is not None:
            problems += await self._probe(sources.spool)
        return problems

    def degraded(self) -> list[str]:
        """What is wrong although the relay is healthy; empty when nothing is."""
        return [str(reason) for reason in self.sources.degraded()]

    async def readiness_problems(self) -> list[str]:
        """The reasons /readyz answers 503; empty when ready."""
        return (
            await self.problems()
            + [f"degraded: {reason}" for reason in self.degraded()]
            + token_problems(self.sources.tokens())
        )

    async def queue(self, now: float) -> QueueReading | None:
        """The store's counts for one request; None in direct mode (no store)."""
        stats = self.sources.queue
        if stats is None:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                return QueueReading(await stats(now))
        except TimeoutError:
            problem = f"the queue did not answer within {self._timeout:g}s"
        except (StoreError, OSError) as exc:
            problem = f"cannot read the queue: {exc}"
        log.warning("%s", problem, extra={"event": "metrics_error"})
        return QueueReading(None, problem)

    async def mailboxes(self, now: float) -> Sequence[MailboxRow]:
        """Each sending mailbox's budget; empty when it cannot be read in time (logged)."""
        report = self.sources.mailboxes
        if report is None:
            return ()
        try:
            async with asyncio.timeout(self._timeout):
                return await report(now)
        except TimeoutError:
            problem = f"the mailbox budgets did not answer within {self._timeout:g}s"
        except (StoreError, OSError) as exc:
            problem = f"cannot read the mailbox budgets: {exc}"
        log.warning("%s", problem, extra={"event": "metrics_error"})
        return ()

    async def history(self, text: str) -> tuple[Sequence[HistoryRecord], str]:
        """The last outcomes matching the status page's search box, and a problem ("" when
        none): the history is a page section, never a reason for 503."""
        search = self.sources.history
        if search is None:
            return (), "no history is kept here"
        query = HistoryQuery(text=text.strip()[:200])
        try:
            async with asyncio.timeout(self._timeout):
                return await search(query), ""
        except TimeoutError:
            return (), f"the history did not answer within {self._timeout:g}s"
        except (StoreError, OSError) as exc:
            return (), f"cannot read the history: {exc}"

    async def _probe(self, spool: SpoolProbe) -> list[str]:
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.to_thread(spool_problems, spool)
        except TimeoutError:
            return [f"spool {spool.root}: no answer within {self._timeout:g}s"]
        except OSError as exc:
            return [f"spool {spool.root}: {exc.strerror or exc}"]
