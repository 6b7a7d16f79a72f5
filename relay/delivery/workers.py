"""Queue workers: claim what the store says is due, attempt it, and have the outcome settled.

Why this module exists: once a message is acknowledged with `250 ... queued`, the relay alone is
responsible for it (RFC 5321 §6.1). This role keeps that promise like Postfix's qmgr: it asks
the store what is due (`Store.due`, leaving out mailboxes whose Graph slots are full or paused),
claims each entry before touching it (a concurrent claimer simply wins), makes at most
`delivery.concurrency` attempts at once, and hands every result to `relay.core.lifecycle.settle`,
whose decision `OutcomeRecorder` records. It makes no decision of its own.

Theory of operation. The store is the truth and the only index: the loop sleeps until the next
entry is due (`Store.next_due`), a wake-up (something was queued, a worker finished, an inline
attempt freed a slot) or the rescan period, and every `rescan_seconds` calls `Store.refresh` to
take in what other processes changed (queue CLI retries and deletions). An entry whose last
outcome is not recorded yet is never claimed again. A worker that is cancelled (shutdown)
releases its entry unchanged; an entry left claimed by a process that died is counted as a
crash by the store's recovery.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

from relay.config.schema import Config
from relay.core.lifecycle import Crashed, NoRoute, Result, SettlePolicy, settle
from relay.core.lifecycle import claimed as claimed_at
from relay.core.values import Delivered, EntryMeta, pool_key, pool_members
from relay.core.waiting import HeldBack
from relay.delivery.attempt import GraphAttempts, message_fields
from relay.delivery.outcomes import OutcomeRecorder
from relay.delivery.pacing import need_of
from relay.delivery.routing import resolve_route, routed, sent_as
from relay.store.protocol import (
    EntryNotFoundError,
    MailboxKey,
    Store,
    StoreUnavailableError,
    mailbox_key,
)

__all__ = ["RESCAN_SECONDS", "QueueWorkers"]

log = logging.getLogger("relay.delivery")

RESCAN_SECONDS = 10.0
_FILL_ROUNDS = 8  # Store.due calls per fill, each without the mailboxes the last one filled
_LOOP_ERROR_PAUSE = 1.0


class QueueWorkers:
    """Delivers queued entries; see the module docstring."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: Store,
        attempts: GraphAttempts,
        outcomes: OutcomeRecorder,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        random_fraction: Callable[[], float] = random.random,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        self._config = config
        self._store = store
        self._attempts = attempts
        self._outcomes = outcomes
        self._clock = clock
        self._monotonic = monotonic
        self._random = random_fraction
        self._rescan = rescan_seconds
        initial = config()
        self._policy_for: Config = initial
        self._settle_policy = SettlePolicy.from_config(initial)
        self._workers: dict[str, asyncio.Task[None]] = {}
        # Entries the store could not read: left alone until this monotonic time (one rescan),
        # so a failing disk is not asked for the same file in a tight loop.
        self._resting: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._budget_wake: float | None = None  # seconds until a spent budget frees
        self.fills = 0  # looks at the queue so far (tests wait for the next one)
        # When each mailbox was held back by our own pacing (credited against the lifetime).
        self._held: HeldBack[MailboxKey] = HeldBack(horizon=initial.delivery.retry.lifetime)
        self._paused: frozenset[MailboxKey] = frozenset()  # `queue pause`, read at each rescan

    @property
    def running(self) -> bool:
        """False once the loop has ended: crashed (a restart helps) or stopped."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def in_flight(self) -> int:
        return len(self._workers)

    async def start(self) -> None:
        """Start the loop (the store is recovered by then)."""
        self._paused = await self._store.paused_mailboxes()
        self._loop_task = asyncio.create_task(self._run(), name="queue-workers")

    def paused(self, meta: EntryMeta) -> bool:
        """Whether the operator paused `meta`'s mailbox (`queue pause`), as of the last rescan."""
        return mailbox_key(meta.auth_object, meta.mailbox) in self._paused

    def stop_claiming(self) -> None:
        """Shutdown has begun: claim nothing more (stop() then waits for the workers)."""
        self._stopping = True
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming; wait up to `grace` for attempts in progress; release the rest."""
        self.stop_claiming()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers.values()), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def wake(self) -> None:
        """Look again now: something was queued, or a mailbox's Graph slot is free again."""
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        next_rescan = self._monotonic() + self._rescan
        while not self._stopping:
            self._wake.clear()  # before looking: a wake-up during _fill is not lost
            try:
                wait = await self._fill()
                if self._monotonic() >= next_rescan:
                    self._outcomes.retry_now()  # kept outcomes land within one rescan
                    await self._store.refresh()
                    self._paused = await self._store.paused_mailboxes()
                    rested = self._monotonic()
                    self._resting = {q: t for q, t in self._resting.items() if t > rested}
                    next_rescan = self._monotonic() + self._rescan
                    wait = 0.0  # what the rescan found (CLI retry, lost hints) is due now
            except StoreUnavailableError as exc:  # cannot claim now (full or read-only disk)
                log.warning("cannot claim queued mail: %s", exc, extra={"event": "claim_failed"})
                wait = _LOOP_ERROR_PAUSE
            except Exception:  # the loop must outlive any single bad entry or disk hiccup
                log.exception("queue worker loop error", extra={"event": "internal_error"})
                wait = _LOOP_ERROR_PAUSE
            wait = min(wait, max(0.0, next_rescan - self._monotonic()))
            if wait > 0 and not self._stopping:
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _fill(self) -> float:
        """Claim due entries while there is capacity; return seconds until worth looking again.

        Fairness: a mailbox that cannot start another send now (its Graph slots are taken, it
        is paused, its budget has no room for the entry at the head of its line) is left out
        of the next `Store.due` call, so one mailbox's backlog never hides another mailbox's
        mail; within a mailbox the head of the line goes first (order of acceptance)."""
        now = self._clock()
        capacity = self._config().delivery.concurrency - len(self._workers)
        if capacity <= 0:
            return self._rescan  # a worker finishing wakes the loop
        self._budget_wake = None
        blocked = self._blocked()
        started = 0
        for _ in range(_FILL_ROUNDS):
            found, started_now, newly = await self._fill_round(now, capacity - started, blocked)
            started += started_now
            blocked |= newly  # look again without the mailboxes that just filled up
            if started >= capacity or not newly or not found:
                break
        self._held.observe(blocked, now)
        self.fills += 1
        if started >= capacity:
            return 0.0
        return await self._idle_wait(now)

    def _blocked(self) -> set[MailboxKey]:
        """Mailboxes (and pools) that cannot start a send now."""
        slots, budgets = self._attempts.slots, self._attempts.budgets
        blocked: set[MailboxKey] = set(slots.busy_keys()) | self._paused
        for key, wait in budgets.blocked().items():
            blocked.add(key)
            self._note_budget_wait(wait)
        for route in self._config().routes:
            if route.pool:
                pool = mailbox_key(route.auth_object, pool_key(route.pool))
                members = [mailbox_key(route.auth_object, m) for m in route.pool]
                if all(m in blocked for m in members):
                    blocked.add(pool)
        return blocked

    async def _fill_round(
        self, now: float, capacity: int, blocked: set[MailboxKey]
    ) -> tuple[int, int, set[MailboxKey]]:
        """One `Store.due` call and the claims it allows: (listed, started, newly blocked)."""
        slots = self._attempts.slots
        due = await self._store.due(now, capacity + len(self._workers), blocked)
        starting: Counter[MailboxKey] = Counter()
        newly: set[MailboxKey] = set()
        started = 0
        for entry in due:
            if self._stopping or started >= capacity:
                break
            key = slots.key(entry.auth_object, entry.mailbox)
            if key in newly:
                continue  # the head of this mailbox's line waits: nothing behind it overtakes
            if entry.queue_id in self._workers or self._outcomes.is_pending(entry.queue_id):
                continue
            if self._resting.get(entry.queue_id, 0.0) > self._monotonic():
                continue
            if not self._may_start(entry, starting[key]):
                newly.add(key)
                continue
            claimed = await self._store.claim(entry.queue_id)
            if claimed is None:
                continue  # another worker, relay or the CLI got there first
            starting[key] += 1
            started += 1
            key_held = functools.partial(self._held.held, key)
            self._spawn(claimed_at(claimed, self._clock(), key_held))
        return len(due), started, newly

    def _may_start(self, entry: EntryMeta, starting: int) -> bool:
        """Whether a send for `entry` could start now, beside `starting` others of its mailbox
        started in this round (for a pool: through some member). A hint; `send` decides."""
        slots, budgets = self._attempts.slots, self._attempts.budgets
        upload_limit = budgets.limits(entry.auth_object, entry.mailbox).upload_per_5_minutes
        need = need_of(entry, self._config().delivery.large_messages, upload_limit)
        for box in pool_members(entry.mailbox) or (entry.mailbox,):
            if slots.busy(entry.auth_object, box, starting=starting):
                continue
            waiting = budgets.wait(entry.auth_object, box, need)
            if waiting is None:
                return True
            self._note_budget_wait(waiting.wait)
        return False

    def _note_budget_wait(self, wait: float | None) -> None:
        if wait is not None:
            self._budget_wake = wait if self._budget_wake is None else min(wait, self._budget_wake)

    async def _idle_wait(self, now: float) -> float:
        next_due = await self._store.next_due()
        if next_due is None:
            return self._rescan
        if next_due > now:
            return next_due - now
        # Due but blocked: full or paused mailboxes, spent budgets, or unrecorded outcomes. A
        # worker finishing or a recorded outcome wakes the loop; a pause and a budget window
        # end by themselves.
        waits = [w for w in (self._attempts.slots.next_unpause(), self._budget_wake) if w]
        return min(waits) if waits else self._rescan

    def _spawn(self, entry: EntryMeta) -> None:
        task = asyncio.create_task(self._work(entry), name=f"deliver-{entry.queue_id}")
        self._workers[entry.queue_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._workers.pop(entry.queue_id, None)
            self._wake.set()

        task.add_done_callback(done)

    async def _work(self, entry: EntryMeta) -> None:
        mime: bytes | None = None
        result: Result
        self._resting.pop(entry.queue_id, None)
        try:
            mime = await self._store.read_message(entry.queue_id)
            route = resolve_route(self._config(), entry)
            if isinstance(route, NoRoute):
                result = route
            else:
                entry = routed(entry, route)
                result = await self._attempts.send(entry, mime, route)
                if isinstance(result, Delivered):
                    entry = sent_as(entry, result)
        except EntryNotFoundError as exc:  # set aside as corrupt, or removed by an operator
            log.warning(
                "not delivering %s: %s",
                entry.queue_id,
                exc,
                extra={"event": "entry_gone", **message_fields(entry)},
            )
            return
        except StoreUnavailableError as exc:  # cannot read it now: not an attempt, not a crash
            log.warning(
                "cannot read %s, putting it back: %s",
                entry.queue_id,
                exc,
                extra={"event": "read_failed", **message_fields(entry)},
            )
            self._resting[entry.queue_id] = self._monotonic() + self._rescan
            await self._outcomes.release(entry)
            return
        except asyncio.CancelledError:
            await self._outcomes.release(entry)
            raise
        except Exception as exc:  # a bug must not lose the stored message
            log.exception(
                "delivery worker error", extra={"event": "internal_error", **message_fields(entry)}
            )
            result = Crashed(f"internal error ({type(exc).__name__})")
        await self.settle(entry, result, mime)

    def _policy(self) -> SettlePolicy:
        """The settle policy of the configuration in force, built once per configuration (a
        reload hands out a new Config object), not once per message."""
        config = self._config()
        if self._policy_for is not config:
            self._policy_for, self._settle_policy = config, SettlePolicy.from_config(config)
        return self._settle_policy

    async def settle(
        self, entry: EntryMeta, result: Result, mime: bytes | None, *, answered: bool = False
    ) -> None:
        """Decide with the core and record the decision (also used by the inline attempt, which
        says whether the waiting client `answered` heard a refusal itself)."""
        policy = self._policy()
        now = self._clock()
        decision = settle(entry, result, now, policy, jitter=self._random(), answered=answered)
        await self._outcomes.carry_out(decision, result, mime)
