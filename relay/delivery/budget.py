"""The sending budgets of every mailbox this relay sends as: the shell around `relay.core.budgets`.

Why this module exists: the pure core answers "room now, or from when" for one mailbox's ledger;
somebody has to hold those ledgers for the life of the process, load them from the store at
start (a restart must not open a fresh 24-hour window), feed them as sends start and finish,
and write each finished send back to the store's ledger. The inline attempt and the queue
workers share one `MailboxBudgets` through `GraphAttempts`, as they share the Graph slots.

Theory of operation
-------------------
`reserve` is the gate: synchronous, so checking and taking the room cannot be split by another
task. It counts the send as in flight; `finish` turns it into a finished send at the moment the
answer came (what Microsoft counted: a 202 or an unknown outcome counts in full, a refusal
counts its requests only, a token failure nothing). Finished sends go to the store in batches
by a background task; a store that refuses keeps them in memory and is asked again with the
next batch (the budget in memory is right either way; only a restart meanwhile would forget).

Which mailbox a pool's message goes out as is decided here too: the member with room now and
the most budget left (`Usage.room`), members whose Graph slots are all taken left out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from relay.config.schema import Config
from relay.core.budgets import (
    LEDGER_SPAN,
    WINDOWS,
    LimitName,
    MailboxLimits,
    Need,
    SendRecord,
    Usage,
    fits,
    limits_for,
)
from relay.core.lifecycle import Postponed
from relay.store.protocol import MailboxKey, Store, StoreUnavailableError, mailbox_key

__all__ = ["MailboxBudgets", "Reservation", "Spent"]

_SHOWN: tuple[LimitName, ...] = tuple(WINDOWS)

log = logging.getLogger("relay.delivery")


@dataclass(frozen=True, slots=True)
class Reservation:
    """A send counted as in flight against `mailbox`'s budgets."""

    auth_object: str
    mailbox: str
    need: Need
    token: int


@dataclass(frozen=True, slots=True)
class Spent:
    """A mailbox's budget as the status page, /metrics and `queue list` show it."""

    auth_object: str
    mailbox: str
    limits: MailboxLimits
    used: dict[LimitName, int]
    in_flight: int


class MailboxBudgets:
    """Every mailbox's `Usage`; see the module docstring."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: Store | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._usage: dict[MailboxKey, Usage] = {}
        self._names: dict[MailboxKey, tuple[str, str]] = {}  # key -> as first written
        self._limits_of: Config | None = None
        self._limits: dict[MailboxKey, MailboxLimits] = {}
        self._unsaved: list[SendRecord] = []
        self._changed: set[MailboxKey] = set()  # reserved or finished since `blocked` looked
        self._held_until: dict[MailboxKey, float | None] = {}  # blocked at its last look
        self._blocked_for: Config | None = None
        self._saving: asyncio.Task[None] | None = None
        self._save_failing = False

    async def load(self) -> int:
        """Read the last 24 hours of sends from the store (once, at start); their number."""
        if self._store is None:
            return 0
        records = await self._store.sends_since(self._clock() - LEDGER_SPAN)
        for record in records:
            self._usage_of(record.auth_object, record.mailbox).record(record.at, record.need)
        return len(records)

    async def stop(self) -> None:
        """Write what is not saved yet (shutdown)."""
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
        await self._save()

    # --- questions ----------------------------------------------------------------------------

    def limits(self, auth_object: str, mailbox: str) -> MailboxLimits:
        """`mailbox`'s budgets under the configuration in force (a reload takes effect)."""
        config = self._config()
        if config is not self._limits_of:
            self._limits_of, self._limits = config, {}
        key = mailbox_key(auth_object, mailbox)
        found = self._limits.get(key)
        if found is None:
            found = self._limits[key] = limits_for(config.delivery.mailbox_limits, mailbox)
        return found

    def never_fits(self, auth_object: str, mailbox: str, need: Need) -> LimitName | None:
        """The limit `need` exceeds even with an empty budget (e.g. more recipients than the
        whole day's budget), or None."""
        return fits(self.limits(auth_object, mailbox), need)

    def wait(self, auth_object: str, mailbox: str, need: Need) -> Postponed | None:
        """None when `mailbox` has room for `need` now, else why and for how long it waits."""
        usage = self._usage.get(mailbox_key(auth_object, mailbox))
        if usage is None:
            return None
        limits = self.limits(auth_object, mailbox)
        now = self._clock()
        wait = usage.wait(limits, need, now)
        if wait == 0.0:
            return None
        return Postponed(mailbox, self._binding(usage, limits, need, now), wait)

    def blocked(self) -> dict[MailboxKey, float | None]:
        """Mailboxes without room even for a one-recipient message, with the seconds until
        they have it (None: when a request in flight ends).

        Asked at every look at the queue, so it does not walk every mailbox of the day: only
        a reservation can take a mailbox's room (time and finished requests only give it
        back), so it looks again only at mailboxes reserved or finished since the last call,
        at those whose wait has run out, and at all after a reload (new limits)."""
        now = self._clock()
        config = self._config()
        if config is not self._blocked_for:
            self._blocked_for, self._changed = config, set(self._usage)
        look = self._changed | {
            key for key, until in self._held_until.items() if until is None or until <= now
        }
        self._changed = set()
        smallest = Need(recipients=1)
        for key in look:
            usage = self._usage.get(key)
            wait: float | None = 0.0
            if usage is not None:
                auth_object, mailbox = self._names[key]
                wait = usage.wait(self.limits(auth_object, mailbox), smallest, now)
            if wait == 0.0:
                self._held_until.pop(key, None)
            else:
                self._held_until[key] = None if wait is None else now + wait
        return {
            key: None if until is None else max(0.0, until - now)
            for key, until in self._held_until.items()
        }

    def spent(self) -> Iterator[Spent]:
        """Each mailbox with sends in the ledger or in flight, and what its windows hold."""
        now = self._clock()
        for key, usage in list(self._usage.items()):
            usage.prune(now)
            if usage.idle:
                del self._usage[key]
                continue
            auth_object, mailbox = self._names[key]
            limits = self.limits(auth_object, mailbox)
            used = {name: usage.used(name, now) for name in _SHOWN}
            yield Spent(auth_object, mailbox, limits, used, usage.in_flight)

    def usage(self, auth_object: str, mailbox: str) -> Usage:
        """The ledger of `mailbox` (empty when it sent nothing lately)."""
        return self._usage.get(mailbox_key(auth_object, mailbox)) or Usage()

    def choose_member(
        self, auth_object: str, members: tuple[str, ...], need: Need, full: Callable[[str], bool]
    ) -> str | Postponed:
        """The pool member with room for `need` now and the most budget left, leaving out
        those `full` says have no free Graph slot; else the shortest wait among them."""
        now = self._clock()
        best: tuple[float, str] | None = None
        waits: list[Postponed] = []
        for member in members:
            if full(member):
                continue
            waiting = self.wait(auth_object, member, need)
            if waiting is not None:
                waits.append(waiting)
                continue
            room = self.usage(auth_object, member).room(self.limits(auth_object, member), now)
            if best is None or room > best[0]:
                best = (room, member)
        if best is not None:
            return best[1]
        known = [w for w in waits if w.wait is not None]
        if known:
            return min(known, key=lambda w: w.wait or 0.0)
        pool = ",".join(members)
        return waits[0] if waits else Postponed(pool, "concurrent_requests", None)

    # --- bookkeeping --------------------------------------------------------------------------

    def reserve(self, auth_object: str, mailbox: str, need: Need) -> Reservation | Postponed:
        """Take room for `need` now, or say why not: the one gate before every send."""
        waiting = self.wait(auth_object, mailbox, need)
        if waiting is not None:
            return waiting
        token = self._usage_of(auth_object, mailbox).reserve(need)
        self._changed.add(mailbox_key(auth_object, mailbox))
        return Reservation(auth_object, mailbox, need, token)

    def finish(self, reservation: Reservation, counted: Need | None) -> None:
        """The send ended now; `counted` is what Microsoft counted of it (module docstring)."""
        key = mailbox_key(reservation.auth_object, reservation.mailbox)
        usage = self._usage.get(key)
        now = self._clock()
        if usage is not None:
            usage.settle(reservation.token, now, counted)
            self._changed.add(key)
        if counted is None or self._store is None:
            return
        self._unsaved.append(
            SendRecord(
                now,
                reservation.auth_object,
                reservation.mailbox,
                counted.messages,
                counted.recipients,
                counted.requests,
                counted.upload,
            )
        )
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save(), name="save-send-ledger")

    async def _save(self) -> None:
        while self._unsaved and self._store is not None:
            batch, self._unsaved = self._unsaved, []
            try:
                await self._store.record_sends(batch)
            except StoreUnavailableError as exc:
                self._unsaved = batch + self._unsaved
                if not self._save_failing:
                    log.warning(
                        "cannot write the send ledger, keeping %d sends in memory: %s",
                        len(self._unsaved),
                        exc,
                        extra={"event": "ledger_unsaved"},
                    )
                self._save_failing = True
                return
            if self._save_failing:
                log.info("the send ledger is written again", extra={"event": "ledger_saved"})
                self._save_failing = False

    def _usage_of(self, auth_object: str, mailbox: str) -> Usage:
        key = mailbox_key(auth_object, mailbox)
        usage = self._usage.get(key)
        if usage is None:
            usage = self._usage[key] = Usage()
            self._names[key] = (auth_object, mailbox)
            self._changed.add(key)  # a new ledger (at load) may be spent already
        return usage

    @staticmethod
    def _binding(usage: Usage, limits: MailboxLimits, need: Need, now: float) -> str:
        """The name of the budget that keeps `need` waiting longest."""
        longest, name = -1.0, "messages_per_minute"
        for limit in _SHOWN:
            wait = usage.wait(limits, need, now, (limit,))
            value = math.inf if wait is None else wait
            if value > longest:
                longest, name = value, limit
        return name
