"""The delivery engine: turns a policy-approved submission into a typed outcome (DESIGN §5).

Why this module exists: the SMTP layer must not know about Graph, the store or timeouts, and
the Graph client must not know about SMTP. This module owns the three delivery modes and hands
the SMTP layer an `Accepted` or a `Refused` value, which it turns into its reply:

- `direct`: no store. One Graph attempt while the client waits; `Accepted(delivered)` only after
  Graph's 202, transient trouble is a `451` (the client keeps the message), a refusal its `5xx`.
- `queue`: `Accepted(queued)` as soon as the store has the message durably; workers deliver.
- `hybrid` (default): store durably, then one inline attempt for up to `inline_timeout`.
  202 -> `Accepted(delivered)`; a permanent refusal -> `Refused(5xx)` and the entry discarded;
  transient or too slow -> `Accepted(queued)` and the workers carry on.

Theory of the inline attempt. The attempt runs as its own task so that neither a client that
hangs up (aiosmtpd cancels the DATA hook) nor the inline timeout can interrupt it half-way.
The task and the waiting hook agree on who answers through `_Inline`: the task publishes a
`verdict` only while the client has not been answered; the hook, when its wait ends without a
verdict, marks the attempt `acknowledged` (it is about to say `250 queued`). Both steps are
synchronous, so exactly one of two things happens: the client hears the verdict (and a
permanent refusal is discarded, the client owns the failure), or the client hears "queued"
(and a permanent refusal is buried and bounced like any queued message). Never both, never
neither: nothing is lost, nothing is reported twice. Which of the two happened reaches
`relay.core.lifecycle.settle` as its `answered` flag; the core decides the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from relay.config.schema import Config
from relay.core.errors import DeliveryError, SmtpReply
from relay.core.lifecycle import Crashed, Postponed, Result
from relay.core.values import Accepted, Delivered, EntryMeta, Refused, Submission, SubmitOutcome
from relay.delivery.attempt import (
    GraphAttempts,
    GraphSender,
    error_report,
    message_fields,
)
from relay.delivery.bounces import Bouncer
from relay.delivery.history import DeliveryHistory
from relay.delivery.mailboxes import mailbox_rows
from relay.delivery.outcomes import RECORD_RETRY_FIRST, RECORD_RETRY_MAX, OutcomeRecorder
from relay.delivery.pacing import no_budget_reply
from relay.delivery.routing import sent_as
from relay.delivery.workers import RESCAN_SECONDS, QueueWorkers
from relay.ops.mailbox_gauges import MailboxRow
from relay.ops.metrics import NULL_METRICS, MetricsSink
from relay.store.protocol import HistoryLog, Store, StoreUnavailableError

__all__ = ["DeliveryEngine"]

log = logging.getLogger("relay.delivery")

STORE_TROUBLE = SmtpReply(451, "4.3.0", "Cannot queue the message right now, try again later")
SLOW_GRAPH = SmtpReply(451, "4.4.2", "Microsoft 365 did not answer in time, please try again later")


@dataclass(slots=True)
class _Inline:
    """Who answers the client: the attempt (verdict) or the waiting hook (acknowledged)."""

    verdict: asyncio.Future[SubmitOutcome]
    acknowledged: bool = False

    def decide(self, outcome: SubmitOutcome) -> bool:
        """Publish the verdict unless the client was already told `queued`."""
        if self.acknowledged or self.verdict.done():
            return False
        self.verdict.set_result(outcome)
        return True


@dataclass(slots=True)
class _Tasks:
    running: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task


class DeliveryEngine:
    """Delivers submissions according to `delivery.mode`; owns the workers (not the store)."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        graph: GraphSender,
        store: Store | None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        random_fraction: Callable[[], float] = random.random,
        metrics: MetricsSink = NULL_METRICS,
        rescan_seconds: float = RESCAN_SECONDS,
        record_retry: tuple[float, float] | None = None,
        history: HistoryLog | None = None,  # where outcomes are kept; default: the store
    ) -> None:
        self._config = config
        self.history = DeliveryHistory(config=config, store=history or store, clock=clock)
        self._clock = clock
        self._metrics = metrics
        self.store = store
        self.attempts = GraphAttempts(
            config=config,
            graph=graph,
            monotonic=monotonic,
            clock=clock,
            metrics=metrics,
            store=store,
        )
        self.outcomes: OutcomeRecorder | None = None
        self.workers: QueueWorkers | None = None
        if store is not None:
            # Kept outcomes are tried again at least once per rescan (and the rescan kicks them).
            first, most = record_retry or (
                RECORD_RETRY_FIRST,
                min(RECORD_RETRY_MAX, rescan_seconds),
            )
            self.outcomes = OutcomeRecorder(
                store=store,
                attempts=self.attempts,
                bouncer=Bouncer(config=config, clock=clock),
                on_queued=self.wake,
                retry_first=first,
                retry_max=most,
                history=self.history,
            )
            self.workers = QueueWorkers(
                config=config,
                store=store,
                attempts=self.attempts,
                outcomes=self.outcomes,
                clock=clock,
                monotonic=monotonic,
                random_fraction=random_fraction,
                rescan_seconds=rescan_seconds,
            )
        self._inline = _Tasks()

    @property
    def running(self) -> bool:
        """False once the workers' loop has ended (crashed or stopped)."""
        return self.workers is None or self.workers.running

    @property
    def in_flight(self) -> int:
        running = len(self._inline.running)
        return running + (self.workers.in_flight if self.workers is not None else 0)

    def degraded_reasons(self) -> list[str]:
        """What /healthz reports and /readyz turns 503 for; empty when all is well."""
        return self.outcomes.degraded_reasons() if self.outcomes is not None else []

    async def mailbox_report(self, now: float) -> list[MailboxRow]:
        """Each sending mailbox's budget, line and drain estimate (/metrics, status page)."""
        slots = self.attempts.slots
        return await mailbox_rows(
            self.attempts.budgets,
            self.store,
            now,
            paused_for=slots.paused_for,
            in_flight=slots.users,
        )

    def wake(self) -> None:
        if self.workers is not None:
            self.workers.wake()

    async def start(self) -> None:
        """Recover the store (before any listener accepts mail) and start the workers."""
        if self.store is None or self.workers is None:
            return
        report = await self.store.recover()
        sends = await self.attempts.budgets.load()
        log.info(
            "store recovered: %d requeued, %d quarantined, %d corrupt",
            report.requeued,
            report.quarantined,
            report.corrupt,
            extra={
                "event": "spool_recovered",
                "requeued": report.requeued,
                "quarantined": report.quarantined,
                "corrupt": report.corrupt,
                "orphans_removed": report.orphans_removed,
                "temp_removed": report.temp_removed,
                "ledger_sends": sends,
            },
        )
        await self.workers.start()

    async def stop(self, grace: float) -> None:
        """Let attempts in progress finish for up to `grace` seconds; release the rest."""
        if self.workers is not None:
            # First: no new claims, or the workers would pick up what the inline attempts
            # release below and start a second request for the same message.
            self.workers.stop_claiming()
        inline = set(self._inline.running)
        if inline:
            _, pending = await asyncio.wait(inline, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self.workers is not None:
            await self.workers.stop(grace)
        if self.outcomes is not None:
            await self.outcomes.stop()
        await self.attempts.budgets.stop()
        await self.history.flush()

    async def submit(self, submission: Submission) -> SubmitOutcome:
        """Deliver or queue per `delivery.mode`."""
        outcome = await self._submit(submission)
        if isinstance(outcome, Accepted):  # counted only once the hook has its 250 to return
            self._metrics.accepted(submission.route.name, outcome.how)
        return outcome

    async def _submit(self, submission: Submission) -> SubmitOutcome:
        mode = self._config().delivery.mode
        if mode == "direct" or self.store is None or self.workers is None:
            return await self._direct(submission)
        meta = self._meta(submission)
        # hybrid commits the entry already claimed, so no worker races the inline attempt. When
        # the mailbox's Graph slots are all taken, or its sending budget has no room, the inline
        # attempt would only wait, holding a claim a crash would count against the message:
        # queue it for the workers instead (they send it when the budget frees).
        inline = mode == "hybrid" and self.attempts.can_send_now(meta)
        inline = inline and not self.workers.paused(meta)  # `queue pause`: the workers wait
        try:
            await self.store.put(meta, submission.message.mime, claimed=inline)
        except StoreUnavailableError as exc:
            log.error(
                "cannot store %s: %s",
                meta.queue_id,
                exc,
                extra={
                    "event": "spool_unavailable",
                    **message_fields(meta),
                    "reply": str(STORE_TROUBLE),
                },
            )
            return Refused(STORE_TROUBLE)
        log.info(
            "queued %s from=<%s> rcpts=%d route=%s mailbox=%s",
            meta.queue_id,
            meta.mail_from,
            len(meta.recipients),
            meta.route,
            meta.mailbox,
            extra={"event": "queued", **message_fields(meta)},
        )
        if not inline:
            self.workers.wake()
            return Accepted(meta.queue_id, "queued")
        return await self._hybrid(meta, submission)

    # --- hybrid ---------------------------------------------------------------------------

    async def _hybrid(self, meta: EntryMeta, submission: Submission) -> SubmitOutcome:
        inline = _Inline(asyncio.get_running_loop().create_future())
        task = self._inline.spawn(self._inline_attempt(meta, submission, inline))
        # asyncio.wait never cancels the task: a client hanging up cancels only this wait.
        await asyncio.wait({inline.verdict}, timeout=self._config().delivery.inline_timeout)
        if not inline.verdict.done():
            inline.acknowledged = True
            return Accepted(meta.queue_id, "queued")
        await asyncio.shield(task)  # the bookkeeping behind the verdict is one store write
        return inline.verdict.result()

    async def _inline_attempt(
        self, meta: EntryMeta, submission: Submission, inline: _Inline
    ) -> None:
        try:
            await self._inline_attempt_once(meta, submission, inline)
        finally:
            # Its Graph slot is free again: queued mail for this mailbox may go now.
            self.wake()

    async def _inline_attempt_once(
        self, meta: EntryMeta, submission: Submission, inline: _Inline
    ) -> None:
        assert self.workers is not None
        assert self.outcomes is not None
        mime = submission.message.mime
        result: Result
        try:
            # The route policy chose a moment ago, from the same configuration.
            result = await self.attempts.send(meta, mime, submission.route)
            if isinstance(result, Delivered):
                meta = sent_as(meta, result)
        except asyncio.CancelledError:
            await self.outcomes.release(meta)
            raise
        except Exception as exc:  # a bug must not lose the stored message
            log.exception(
                "inline attempt failed", extra={"event": "internal_error", **message_fields(meta)}
            )
            result = Crashed(f"internal error ({type(exc).__name__})")
        answered = False
        if isinstance(result, Delivered):
            inline.decide(Accepted(meta.queue_id, "delivered"))
        elif isinstance(result, DeliveryError) and not result.reply.is_transient:
            answered = inline.decide(Refused(result.reply))
        else:
            inline.decide(Accepted(meta.queue_id, "queued"))
        await self.workers.settle(meta, result, mime, answered=answered)

    # --- direct ---------------------------------------------------------------------------

    async def _direct(self, submission: Submission) -> SubmitOutcome:
        meta, mime = self._meta(submission), submission.message.mime
        try:
            async with asyncio.timeout(self._config().delivery.inline_timeout):
                outcome = await self.attempts.send(meta, mime, submission.route)
        except TimeoutError:
            log.warning(
                "deferred %s: no answer from Graph in time",
                meta.queue_id,
                extra={"event": "deferred", **message_fields(meta), "reply": str(SLOW_GRAPH)},
            )
            self._metrics.deferred(meta.route)
            self._metrics.delivery_error(
                error_report(
                    meta,
                    "deferred",
                    at=self._clock(),
                    reply=SLOW_GRAPH,
                    message="no answer from Graph in time",
                )
            )
            self.history.direct_refused(meta, "no answer from Graph in time", None, mime)
            return Refused(SLOW_GRAPH)
        if isinstance(outcome, Postponed):
            reply = no_budget_reply(outcome)
            log.info(
                "refused %s for now: %s",
                meta.queue_id,
                outcome.reason,
                extra={"event": "deferred", **message_fields(meta), "reply": str(reply)},
            )
            self._metrics.deferred(meta.route)
            self.history.direct_refused(meta, outcome.reason, None, mime)
            return Refused(reply)
        if isinstance(outcome, DeliveryError):
            event = "deferred" if outcome.reply.is_transient else "failed"
            self.attempts.log_failure(meta, outcome, event)
            self.history.direct_refused(meta, f"{outcome.reply}: {outcome.message}", outcome, mime)
            return Refused(outcome.reply)
        self.attempts.log_delivered(sent_as(meta, outcome), outcome)
        self.history.direct_delivered(sent_as(meta, outcome), outcome, mime)
        return Accepted(meta.queue_id, "delivered")

    def _meta(self, submission: Submission) -> EntryMeta:
        route = submission.route
        return EntryMeta(
            queue_id=submission.queue_id,
            created=self._clock(),
            mail_from=submission.mail_from,
            recipients=submission.recipients,
            client=submission.client,
            client_ip=submission.client_ip,
            auth_object=route.auth_object,
            mailbox=route.mailbox,
            route=route.name,
            message_id=submission.message.message_id,
            size=len(submission.message.mime),
            sender=submission.sender or submission.mail_from,
        )
