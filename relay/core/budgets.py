"""Per-mailbox sending budgets: may this mailbox send now, and if not, from when. PURE.

Why this module exists: Exchange Online and Graph count what each mailbox sends over rolling
windows (`relay.config.limits`), and past a limit mail fails late and out of sight (a 202, then
an NDR, or a blocked mailbox). So before each Graph request the delivery engine asks this module
whether the mailbox has room for the message, and a message without room waits for the moment
the budget frees, instead of being sent early. Values in, values out; the caller passes `now`.

Theory of operation
-------------------
`Usage` is one mailbox's ledger: the sends that finished in the last 24 hours (time and amounts,
`SendRecord`) plus the reservations still in flight. A limit L over a window W has room for a
need n at `now` when

    in-flight + (finished sends with at > now - W) + n <= L

and otherwise frees at `at_k + W`, where at_k is the time of the oldest finished send whose
leaving makes room. A finished send is recorded at the moment its answer came back, and a
reservation counts from the moment its request started, so every send Microsoft counted (at
some moment between the two) is in the relay's window whenever Microsoft's window holds it:
the relay never runs ahead of the count Microsoft keeps, without any safety margin.

Finished sends are kept sorted with running totals, so a check is two binary searches however
long the day's ledger is (10,000 sends at the default recipient budget).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from relay.core.policy import matches_any

if TYPE_CHECKING:  # annotations only: pydantic loads socket
    from relay.config.limits import MailboxLimitsConfig

__all__ = [
    "LEDGER_SPAN",
    "WINDOWS",
    "LimitName",
    "MailboxLimits",
    "Need",
    "SendRecord",
    "Usage",
    "drain_eta",
    "fits",
    "limits_for",
]

LimitName = Literal[
    "messages_per_minute", "recipients_per_day", "requests_per_10_minutes", "upload_per_5_minutes"
]
# The rolling window of each counted limit, in seconds (the names say it).
WINDOWS: Final[Mapping[LimitName, float]] = {
    "messages_per_minute": 60.0,
    "recipients_per_day": 86_400.0,
    "requests_per_10_minutes": 600.0,
    "upload_per_5_minutes": 300.0,
}
LEDGER_SPAN: Final = max(WINDOWS.values())  # how far back the ledger must reach


@dataclass(frozen=True, slots=True)
class MailboxLimits:
    """The budgets of one mailbox (the section's values with its override applied)."""

    messages_per_minute: int
    recipients_per_day: int
    concurrent_requests: int
    requests_per_10_minutes: int
    upload_per_5_minutes: int

    def limit(self, name: LimitName) -> int:
        value: int = getattr(self, name)
        return value


def limits_for(config: MailboxLimitsConfig, mailbox: str) -> MailboxLimits:
    """`mailbox`'s budgets: the first override whose patterns match it, over the defaults."""
    chosen = {
        "messages_per_minute": config.messages_per_minute,
        "recipients_per_day": config.recipients_per_day,
        "concurrent_requests": config.concurrent_requests,
        "requests_per_10_minutes": config.requests_per_10_minutes,
        "upload_per_5_minutes": config.upload_per_5_minutes,
    }
    for override in config.overrides:
        if matches_any(mailbox, override.mailboxes):
            for name in chosen:
                value = getattr(override, name)
                if value is not None:
                    chosen[name] = value
            break
    return MailboxLimits(**chosen)


@dataclass(frozen=True, slots=True)
class Need:
    """What one send uses of its mailbox's budgets."""

    recipients: int
    requests: int = 1
    upload: int = 0
    messages: int = 1

    def amount(self, name: LimitName) -> int:
        return {
            "messages_per_minute": self.messages,
            "recipients_per_day": self.recipients,
            "requests_per_10_minutes": self.requests,
            "upload_per_5_minutes": self.upload,
        }[name]


@dataclass(frozen=True, slots=True)
class SendRecord:
    """One finished send (or a refused attempt, which used requests but sent nothing), as the
    store's ledger keeps it so that a restart does not reset the 24-hour window."""

    at: float
    auth_object: str
    mailbox: str
    messages: int
    recipients: int
    requests: int
    upload: int

    def __post_init__(self) -> None:
        if min(self.messages, self.recipients, self.requests, self.upload) < 0:
            raise ValueError("a send record cannot hold negative amounts")
        if not math.isfinite(self.at):
            raise ValueError("a send record needs a finite time")

    @property
    def need(self) -> Need:
        return Need(self.recipients, self.requests, self.upload, self.messages)


_NAMES: Final[tuple[LimitName, ...]] = tuple(WINDOWS)
_PACED: Final[tuple[LimitName, ...]] = ("messages_per_minute", "recipients_per_day")


class Usage:
    """One mailbox's finished sends of the last 24 hours and its reservations in flight."""

    def __init__(self, records: Iterable[SendRecord] = ()) -> None:
        self._at: list[float] = []
        self._totals: dict[LimitName, list[int]] = {name: [0] for name in _NAMES}
        self._in_flight: dict[int, Need] = {}
        self._next_token = 0
        for record in sorted(records, key=lambda r: r.at):
            self.record(record.at, record.need)

    # --- bookkeeping ------------------------------------------------------------------------

    def record(self, at: float, used: Need) -> None:
        """A send finished at `at` (a time earlier than the last is counted at the last:
        later is the safe side, it leaves the window later)."""
        if self._at and at < self._at[-1]:
            at = self._at[-1]
        self._at.append(at)
        for name in _NAMES:
            totals = self._totals[name]
            totals.append(totals[-1] + used.amount(name))

    def reserve(self, need: Need) -> int:
        """Count `need` as in flight; returns the token `settle` takes."""
        self._next_token += 1
        self._in_flight[self._next_token] = need
        return self._next_token

    def settle(self, token: int, at: float, used: Need | None) -> None:
        """The reservation `token` ended at `at`: `used` is what Microsoft counted (None or
        nothing when the request was refused before it counted)."""
        self._in_flight.pop(token, None)
        if used is not None and any(used.amount(name) for name in _NAMES):
            self.record(at, used)

    def prune(self, now: float) -> None:
        """Forget sends older than every window (amortised: only once half the ledger is old)."""
        old = bisect.bisect_right(self._at, now - LEDGER_SPAN)
        if old and old * 2 >= len(self._at):
            self._at = self._at[old:]
            for name in _NAMES:
                totals = self._totals[name]
                base = totals[old]
                self._totals[name] = [t - base for t in totals[old:]]

    def copy(self, now: float) -> Usage:
        """A copy without reservations: those in flight count as sent at `now`."""
        twin = Usage()
        twin._at = list(self._at)
        twin._totals = {name: list(totals) for name, totals in self._totals.items()}
        for need in self._in_flight.values():
            twin.record(now, need)
        return twin

    @property
    def idle(self) -> bool:
        """Nothing in flight and no send in the ledger: the mailbox can be forgotten."""
        return not self._in_flight and not self._at

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # --- questions --------------------------------------------------------------------------

    def used(self, name: LimitName, now: float) -> int:
        """What the window of `name` holds at `now`, reservations in flight included."""
        totals = self._totals[name]
        start = bisect.bisect_right(self._at, now - WINDOWS[name])
        in_flight = sum(need.amount(name) for need in self._in_flight.values())
        return totals[-1] - totals[start] + in_flight

    def wait(
        self,
        limits: MailboxLimits,
        need: Need,
        now: float,
        names: Sequence[LimitName] = _NAMES,
    ) -> float | None:
        """Seconds until the windows of `names` (all, by default) have room for `need` (0.0:
        now). None when only a request in flight finishing can make room (the caller is woken
        when one does)."""
        longest = 0.0
        for name in names:
            wait = self._wait_one(name, limits.limit(name), need.amount(name), now)
            if wait is None:
                return None
            longest = max(longest, wait)
        return longest

    def _wait_one(self, name: LimitName, limit: int, amount: int, now: float) -> float | None:
        if amount == 0:
            return 0.0
        window = WINDOWS[name]
        totals = self._totals[name]
        start = bisect.bisect_right(self._at, now - window)
        in_flight = sum(need.amount(name) for need in self._in_flight.values())
        excess = totals[-1] - totals[start] + in_flight + amount - limit
        if excess <= 0:
            return 0.0
        # The oldest sends leave first: find the first k with totals[k] - totals[start] >= excess.
        k = bisect.bisect_left(totals, totals[start] + excess, lo=start + 1)
        if k >= len(totals):
            return None  # the finished sends are not enough: what is in flight must end first
        return max(0.0, self._at[k - 1] + window - now)

    def room(self, limits: MailboxLimits, now: float) -> float:
        """The smallest share of any budget left, 0.0 (spent) to 1.0 (untouched): how a pool
        chooses the member with the most budget left."""
        return min(max(0.0, 1.0 - self.used(name, now) / limits.limit(name)) for name in _NAMES)


def fits(limits: MailboxLimits, need: Need) -> LimitName | None:
    """The limit `need` exceeds on its own (so it can never be sent through this mailbox), or
    None when an empty budget would take it."""
    for name in _NAMES:
        if need.amount(name) > limits.limit(name):
            return name
    return None


def drain_eta(usage: Usage, limits: MailboxLimits, waiting: Sequence[int], now: float) -> float:
    """Seconds until the last of the waiting messages (their recipient counts, in queue order)
    could be sent, counting the message and recipient budgets only (the others bind far later);
    0.0 when nothing waits. Each message goes at the first moment both windows have room;
    requests in flight count as sent now."""
    simulated = usage.copy(now)
    at = now
    for recipients in waiting:
        need = Need(min(recipients, limits.recipients_per_day), requests=0, upload=0)
        at += simulated.wait(limits, need, at, _PACED) or 0.0
        simulated.record(at, need)
    return at - now
