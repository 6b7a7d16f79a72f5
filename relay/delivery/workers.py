"""Queue workers: deliver what the spool holds, retry with backoff, expire, bury and bounce.

Why this module exists: once a message is acknowledged with `250 ... queued`, the relay alone is
responsible for it (RFC 5321 §6.1). This module owns that responsibility: it picks due entries
from the spool, makes attempts (at most `delivery.concurrency` at once, at most 4 per mailbox),
and settles each outcome in the spool before it forgets the message:

- delivered -> the entry is removed;
- transient -> attempts+1, `next_attempt` from Retry-After or the backoff (`relay.schedule`);
  after `retry.lifetime` the message is dead (`4.4.7`) instead;
- permanent -> dead with the reason, and a DSN (RFC 3464) to the envelope sender, itself a
  spooled message (null sender, never bounced) so it gets the same durability and retries.

Theory of operation. The spool on disk is the truth; the runner keeps an index (a heap of
`(next_attempt, queue_id)`) only as a hint of what to look at when. Claiming is an atomic rename,
so an entry the CLI deleted or retried simply fails to claim or shows up in the next rescan
(every `RESCAN_SECONDS`). A worker that is cancelled (shutdown) puts its entry back unchanged;
an entry left claimed by a process that died is counted as a crash by the spool's recovery.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from relay.config.schema import Config
from relay.core.errors import DeliveryError, TransientDeliveryError
from relay.core.limits import CRASH_LIMIT
from relay.core.message.prepare import BounceRequest, FailedRecipient, build_dsn, is_bounce
from relay.core.schedule import Backoff, is_expired, next_attempt_at
from relay.core.values import Delivered, EntryMeta, Outcome
from relay.delivery.attempt import GraphAttempts, message_fields
from relay.ops.metrics import NULL_METRICS, MetricsSink
from relay.store.files.spool import Spool, SpoolUnavailableError
from relay.store.queue_ids import new_queue_id

__all__ = ["RESCAN_SECONDS", "QueueRunner"]

log = logging.getLogger("relay.delivery")

RESCAN_SECONDS = 10.0
SPOOL_THREADS = 32
T = TypeVar("T")


class QueueRunner:
    """Delivers queued entries; see the module docstring."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        spool: Spool,
        attempts: GraphAttempts,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        random_fraction: Callable[[], float],
        metrics: MetricsSink = NULL_METRICS,
    ) -> None:
        self._config = config
        self._spool = spool
        self._attempts = attempts
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._random = random_fraction
        self._heap: list[tuple[float, str]] = []
        self._index: dict[str, tuple[float, str, str]] = {}  # id -> (due, auth_object, mailbox)
        self._workers: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # Spool I/O (fsync-bound) gets its own threads: the loop's default pool has only
        # cores + 4, and stores, claims and completes queued behind each other there.
        self._threads = ThreadPoolExecutor(max_workers=SPOOL_THREADS, thread_name_prefix="spool")
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        """False once the loop has ended: crashed (a restart helps) or stopped."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def in_flight(self) -> int:
        return len(self._workers)

    async def _io(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a blocking spool operation on the spool's threads."""
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, partial(call, *args, **kwargs)
        )

    async def spool_io(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        """The same, for the inline path of the delivery engine."""
        return await self._io(call, *args, **kwargs)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        report = await self._io(self._spool.open)
        log.info(
            "spool recovered: %d requeued, %d quarantined, %d corrupt",
            report.requeued,
            report.quarantined,
            report.corrupt,
            extra={"event": "spool_recovered", **vars_of(report)},
        )
        await self._rescan()
        self._loop_task = asyncio.create_task(self._run(), name="queue-runner")

    async def stop(self, grace: float) -> None:
        """Stop claiming; wait up to `grace` for attempts in progress; requeue the rest."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._threads.shutdown(wait=False)  # every spool operation has completed by now

    def stop_claiming(self) -> None:
        """Shutdown has begun: claim nothing more (stop() then waits for the workers)."""
        self._stopping = True
        self._wake.set()

    def wake(self) -> None:
        """Look again now, e.g. because an inline attempt freed a mailbox's Graph slot."""
        self._wake.set()

    def schedule(self, meta: EntryMeta) -> None:
        """Note an entry now in `queue/` (new, deferred or bounced) and wake the loop."""
        self._index[meta.queue_id] = (meta.next_attempt, meta.auth_object, meta.mailbox)
        heapq.heappush(self._heap, (meta.next_attempt, meta.queue_id))
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        next_rescan = self._monotonic() + RESCAN_SECONDS
        while not self._stopping:
            try:
                wait = await self._fill()
                if self._monotonic() >= next_rescan:
                    await self._rescan()
                    next_rescan = self._monotonic() + RESCAN_SECONDS
                    wait = 0.0  # what the rescan found (CLI retry, lost hints) is due now
                wait = min(wait, max(0.0, next_rescan - self._monotonic()))
                self._wake.clear()
                if wait > 0:
                    try:
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any single bad entry or disk hiccup
                log.exception("queue runner error", extra={"event": "internal_error"})
                await asyncio.sleep(1.0)

    async def _fill(self) -> float:
        """Claim due entries while there is capacity; return seconds until worth looking again."""
        now = self._clock()
        limit = self._config().delivery.concurrency
        skipped: list[tuple[float, str]] = []
        wait = RESCAN_SECONDS
        while self._heap and len(self._workers) < limit and not self._stopping:
            due, queue_id = self._heap[0]
            hint = self._index.get(queue_id)
            if hint is None or hint[0] != due:
                heapq.heappop(self._heap)  # stale: rescheduled, claimed or deleted since
                continue
            if due > now:
                wait = min(wait, due - now)
                break
            heapq.heappop(self._heap)
            _, auth_object, mailbox = hint
            if self._attempts.slots.busy(auth_object, mailbox):
                skipped.append((due, queue_id))  # a worker finishing wakes us up
                pause = self._attempts.slots.paused_for(auth_object, mailbox)
                if pause > 0:
                    wait = min(wait, pause)
                continue
            del self._index[queue_id]
            meta = await self._io(self._spool.claim, queue_id)
            if meta is None:
                continue
            task = asyncio.create_task(self._work(meta), name=f"deliver-{queue_id}")
            self._workers.add(task)
            task.add_done_callback(self._worker_done)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return wait

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        self._wake.set()

    async def _rescan(self) -> None:
        """Rebuild the index from disk: picks up CLI retries, deletions and lost hints."""
        entries = await self._io(self._spool.list, "queue")
        self._heap = []
        self._index = {}
        for meta in entries:
            self._index[meta.queue_id] = (meta.next_attempt, meta.auth_object, meta.mailbox)
            self._heap.append((meta.next_attempt, meta.queue_id))
        heapq.heapify(self._heap)

    async def _work(self, meta: EntryMeta) -> None:
        try:
            mime = await self._io(self._spool.read_data, meta.queue_id)
            outcome = await self._attempts.send(meta, mime)
        except asyncio.CancelledError:
            await self.release(meta)
            raise
        except Exception:
            log.exception(
                "delivery worker error", extra={"event": "internal_error", **message_fields(meta)}
            )
            await self.defer_after_crash(meta)
            return
        await self.settle(meta, outcome, mime)

    # --- settling outcomes (also used by the inline attempt) ------------------------------

    async def settle(self, meta: EntryMeta, outcome: Outcome, mime: bytes) -> None:
        """Record the outcome of an attempt on a claimed entry; bounce when it dies."""
        await asyncio.shield(self._settle(meta, outcome, mime))

    async def _settle(self, meta: EntryMeta, outcome: Outcome, mime: bytes) -> None:
        if isinstance(outcome, Delivered):
            await self._io(self._spool.complete, meta.queue_id)
            self._attempts.log_delivered(meta, outcome)
            return
        now = self._clock()
        tried = meta_with(meta, attempts=meta.attempts + 1, last_error=_short(outcome))
        retry = self._config().delivery.retry
        if outcome.reply.is_transient and not is_expired(meta.created, now, retry.lifetime):
            retry_after = (
                outcome.retry_after if isinstance(outcome, TransientDeliveryError) else None
            )
            deferred = meta_with(
                tried,
                next_attempt=next_attempt_at(
                    now=now,
                    created=meta.created,
                    attempts=tried.attempts,
                    retry_after=retry_after,
                    backoff=Backoff(retry.first, retry.max, retry.lifetime),
                    random_fraction=self._random(),
                ),
            )
            await self._io(self._spool.defer, deferred)
            self._attempts.log_failure(deferred, outcome, "deferred")
            self.schedule(deferred)
            return
        expired = outcome.reply.is_transient
        reason = (
            f"expired after {tried.attempts} attempts; last error: {_short(outcome)}"
            if expired
            else f"refused: {_short(outcome)}"
        )
        await self._io(self._spool.bury, tried, reason)
        self._attempts.log_failure(tried, outcome, "expired" if expired else "failed")
        await self._bounce(tried, outcome, mime, expired=expired)

    async def refused_inline(self, meta: EntryMeta, outcome: DeliveryError) -> None:
        """The waiting client was told the 5xx itself: the relay keeps nothing, sends no DSN."""
        await asyncio.shield(self._io(self._spool.discard, meta.queue_id))
        self._attempts.log_failure(meta, outcome, "failed")

    async def release(self, meta: EntryMeta) -> None:
        """Shutdown interrupted the attempt: back to the queue unchanged, not a crash."""
        await asyncio.shield(self._io(self._spool.release, meta.queue_id))
        self._index[meta.queue_id] = (meta.next_attempt, meta.auth_object, meta.mailbox)
        heapq.heappush(self._heap, (meta.next_attempt, meta.queue_id))

    async def defer_after_crash(self, meta: EntryMeta) -> None:
        """An unexpected error handling this entry: retry later; after 3, keep it for people."""
        crashed = meta_with(meta, crashes=meta.crashes + 1, last_error="internal error")
        if crashed.crashes >= CRASH_LIMIT:
            await asyncio.shield(
                self._io(self._spool.bury, crashed, "internal error handling it 3 times")
            )
            return
        retry = self._config().delivery.retry
        deferred = meta_with(crashed, next_attempt=self._clock() + retry.first)
        await asyncio.shield(self._io(self._spool.defer, deferred))
        self.schedule(deferred)

    async def _bounce(
        self, meta: EntryMeta, failure: DeliveryError, mime: bytes, *, expired: bool
    ) -> None:
        config = self._config()
        if not config.delivery.bounces or not meta.mail_from or meta.is_bounce or is_bounce(mime):
            return
        now = datetime.now(UTC)
        queue_id = new_queue_id()
        status = "4.4.7" if expired else failure.reply.status
        diagnostic = f"smtp; {failure.reply}"
        if failure.code:
            diagnostic += f" (Graph {failure.code}; request-id {failure.request_id or 'none'})"
        dsn = build_dsn(
            BounceRequest(
                original=mime,
                envelope_from=meta.mail_from,
                recipients=tuple(
                    FailedRecipient(address=rcpt, status=status, diagnostic=diagnostic)
                    for rcpt in meta.recipients
                ),
                reporting_mta=config.smtp.hostname,
                queue_id=meta.queue_id,
                arrival=datetime.fromtimestamp(meta.created, UTC),
                now=now,
                from_address=meta.mailbox,
                message_id_local=queue_id,
                reason_text=_reason_text(failure, expired=expired),
            )
        )
        bounce = EntryMeta(
            queue_id=queue_id,
            created=self._clock(),
            mail_from="",
            recipients=(meta.mail_from,),
            client="relay",
            client_ip="",
            auth_object=meta.auth_object,
            mailbox=meta.mailbox,
            route=meta.route,
            message_id=f"<{queue_id}@{config.smtp.hostname}>",
            size=len(dsn),
            is_bounce=True,
        )
        try:
            await self._io(self._spool.store, bounce, dsn)
        except SpoolUnavailableError as exc:
            log.error(
                "cannot queue the bounce for %s: %s",
                meta.queue_id,
                exc,
                extra={"event": "bounce_failed", **message_fields(meta)},
            )
            return
        log.info(
            "bounced %s to <%s> as %s",
            meta.queue_id,
            meta.mail_from,
            queue_id,
            extra={"event": "bounced", **message_fields(meta), "bounce_id": queue_id},
        )
        self._metrics.bounced(meta.route)
        self.schedule(bounce)


def meta_with(meta: EntryMeta, **changes: object) -> EntryMeta:
    from dataclasses import replace

    return replace(meta, **changes)  # type: ignore[arg-type]


def vars_of(report: object) -> dict[str, object]:
    return {name: getattr(report, name) for name in getattr(report, "__slots__", ())}


def _short(failure: DeliveryError) -> str:
    code = f" {failure.code}" if failure.code else ""
    return f"{failure.reply}{code}"[:300]


def _reason_text(failure: DeliveryError, *, expired: bool) -> str:
    if expired:
        text = (
            "Microsoft 365 could not take the message for too long, so the relay gave up. "
            f"The last answer was: {failure.reply.text}."
        )
    else:
        text = f"Microsoft 365 refused the message: {failure.reply.text}."
    if failure.remedy:
        text += f" What an administrator can do: {failure.remedy}."
    return text
