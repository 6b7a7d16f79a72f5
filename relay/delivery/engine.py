"""The delivery engine: turns a policy-approved submission into an SMTP reply (DESIGN §5).

Why this module exists: the SMTP layer must not know about Graph, the spool or timeouts, and
the Graph client must not know about SMTP. This module owns the three delivery modes:

- `direct`: no spool. One Graph attempt while the client waits; `250` only after Graph's 202,
  transient trouble is `451` (the client keeps the message), a refusal its `5xx`.
- `queue`: `250 ... queued` as soon as the spool has the message durably; workers deliver.
- `hybrid` (default): spool durably, then one inline attempt for up to `inline_timeout`.
  202 -> `250 ... delivered`; a permanent refusal -> its `5xx` and the entry removed;
  transient or too slow -> `250 ... queued` and the workers carry on.

Theory of the inline attempt. The attempt runs as its own task so that neither a client that
hangs up (aiosmtpd cancels the DATA hook) nor the inline timeout can interrupt it half-way.
The task and the waiting hook agree on who answers through `_Inline`: the task publishes a
`verdict` only while the client has not been answered; the hook, when its wait ends without a
verdict, marks the attempt `acknowledged` (it is about to say `250 queued`). Both steps are
synchronous, so exactly one of two things happens: the client hears the verdict (and a
permanent refusal is discarded, the client owns the failure), or the client hears "queued"
(and a permanent refusal is buried and bounced like any queued message). Never both, never
neither: nothing is lost, nothing is reported twice.
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
from relay.core.values import Delivered, EntryMeta, Submission
from relay.delivery.attempt import GraphAttempts, GraphSender, error_report, message_fields
from relay.delivery.workers import QueueRunner
from relay.ops.metrics import NULL_METRICS, AcceptedOutcome, MetricsSink
from relay.store.files.spool import Spool, SpoolUnavailableError

__all__ = ["DeliveryEngine"]

log = logging.getLogger("relay.delivery")

SPOOL_TROUBLE = SmtpReply(451, "4.3.0", "Cannot queue the message right now, try again later")
SLOW_GRAPH = SmtpReply(451, "4.4.2", "Microsoft 365 did not answer in time, please try again later")


def _delivered(queue_id: str) -> SmtpReply:
    return SmtpReply(250, "2.0.0", f"Ok: delivered {queue_id}")


def _queued(queue_id: str) -> SmtpReply:
    return SmtpReply(250, "2.0.0", f"Ok: queued {queue_id}")


def _accepted(reply: SmtpReply) -> AcceptedOutcome | None:
    """What a reply built by `_delivered` or `_queued` told the client; None for the rest."""
    if reply.code != 250:
        return None
    return "delivered" if reply.text.startswith("Ok: delivered") else "queued"


@dataclass(slots=True)
class _Inline:
    """Who answers the client: the attempt (verdict) or the waiting hook (acknowledged)."""

    verdict: asyncio.Future[SmtpReply]
    acknowledged: bool = False

    def decide(self, reply: SmtpReply) -> bool:
        """Publish the verdict unless the client was already told `queued`."""
        if self.acknowledged or self.verdict.done():
            return False
        self.verdict.set_result(reply)
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
    """Delivers submissions according to `delivery.mode`; owns the spool and the workers."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        graph: GraphSender,
        spool: Spool | None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        random_fraction: Callable[[], float] = random.random,
        metrics: MetricsSink = NULL_METRICS,
    ) -> None:
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self.spool = spool
        self.attempts = GraphAttempts(
            config=config, graph=graph, monotonic=monotonic, clock=clock, metrics=metrics
        )
        self.runner = (
            QueueRunner(
                config=config,
                spool=spool,
                attempts=self.attempts,
                clock=clock,
                monotonic=monotonic,
                random_fraction=random_fraction,
                metrics=metrics,
            )
            if spool is not None
            else None
        )
        self._inline = _Tasks()

    @property
    def running(self) -> bool:
        """False once the queue runner's loop has ended (crashed or stopped)."""
        return self.runner is None or self.runner.running

    @property
    def in_flight(self) -> int:
        running = len(self._inline.running)
        return running + (self.runner.in_flight if self.runner is not None else 0)

    async def start(self) -> None:
        """Recover the spool (before any listener accepts mail) and start the workers."""
        if self.runner is not None:
            await self.runner.start()

    async def stop(self, grace: float) -> None:
        """Let attempts in progress finish for up to `grace` seconds; requeue the rest."""
        if self.runner is not None:
            # First: no new claims, or the workers would pick up what the inline attempts
            # release below and start a second request for the same message.
            self.runner.stop_claiming()
        inline = set(self._inline.running)
        if inline:
            _, pending = await asyncio.wait(inline, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self.runner is not None:
            await self.runner.stop(grace)

    async def submit(self, submission: Submission) -> SmtpReply:
        """Deliver or queue per `delivery.mode`; the reply is what the client is told."""
        reply = await self._submit(submission)
        outcome = _accepted(reply)
        if outcome is not None:  # counted only once the hook has its 250 to return
            self._metrics.accepted(submission.route.name, outcome)
        return reply

    async def _submit(self, submission: Submission) -> SmtpReply:
        mode = self._config().delivery.mode
        if mode == "direct" or self.spool is None:
            return await self._direct(submission)
        meta = self._meta(submission)
        # hybrid commits the entry already claimed, so no worker races the inline attempt. When
        # the mailbox's Graph slots are all taken the inline attempt would only wait, holding a
        # claim a crash would count against the message: queue it for the workers instead.
        inline = mode == "hybrid" and not self.attempts.slots.busy(meta.auth_object, meta.mailbox)
        claimed = inline
        try:
            assert self.runner is not None
            await self.runner.spool_io(
                self.spool.store, meta, submission.message.mime, claimed=claimed
            )
        except SpoolUnavailableError as exc:
            log.error(
                "cannot spool %s: %s",
                meta.queue_id,
                exc,
                extra={
                    "event": "spool_unavailable",
                    **message_fields(meta),
                    "reply": str(SPOOL_TROUBLE),
                },
            )
            return SPOOL_TROUBLE
        log.info(
            "queued %s from=<%s> rcpts=%d route=%s mailbox=%s",
            meta.queue_id,
            meta.mail_from,
            len(meta.recipients),
            meta.route,
            meta.mailbox,
            extra={"event": "queued", **message_fields(meta)},
        )
        assert self.runner is not None
        if not inline:
            self.runner.schedule(meta)
            return _queued(meta.queue_id)
        return await self._hybrid(meta, submission.message.mime)

    # --- hybrid ---------------------------------------------------------------------------

    async def _hybrid(self, meta: EntryMeta, mime: bytes) -> SmtpReply:
        inline = _Inline(asyncio.get_running_loop().create_future())
        task = self._inline.spawn(self._inline_attempt(meta, mime, inline))
        # asyncio.wait never cancels the task: a client hanging up cancels only this wait.
        await asyncio.wait({inline.verdict}, timeout=self._config().delivery.inline_timeout)
        if not inline.verdict.done():
            inline.acknowledged = True
            return _queued(meta.queue_id)
        await asyncio.shield(task)  # the bookkeeping behind the verdict is a few renames
        return inline.verdict.result()

    async def _inline_attempt(self, meta: EntryMeta, mime: bytes, inline: _Inline) -> None:
        assert self.runner is not None
        try:
            await self._inline_attempt_once(meta, mime, inline)
        finally:
            # Its Graph slot is free again: queued mail for this mailbox may go now.
            self.runner.wake()

    async def _inline_attempt_once(self, meta: EntryMeta, mime: bytes, inline: _Inline) -> None:
        assert self.runner is not None
        try:
            outcome = await self.attempts.send(meta, mime)
        except asyncio.CancelledError:
            await self.runner.release(meta)
            raise
        except Exception:  # a bug must not lose the spooled message
            log.exception(
                "inline attempt failed", extra={"event": "internal_error", **message_fields(meta)}
            )
            inline.decide(_queued(meta.queue_id))
            await self.runner.defer_after_crash(meta)
            return
        if isinstance(outcome, Delivered):
            inline.decide(_delivered(meta.queue_id))
            await self.runner.settle(meta, outcome, mime)
        elif outcome.reply.is_transient:
            inline.decide(_queued(meta.queue_id))
            await self.runner.settle(meta, outcome, mime)
        elif inline.decide(outcome.reply):
            await self.runner.refused_inline(meta, outcome)
        else:
            await self.runner.settle(meta, outcome, mime)

    # --- direct ---------------------------------------------------------------------------

    async def _direct(self, submission: Submission) -> SmtpReply:
        meta = self._meta(submission)
        try:
            async with asyncio.timeout(self._config().delivery.inline_timeout):
                outcome = await self.attempts.send(meta, submission.message.mime)
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
            return SLOW_GRAPH
        if isinstance(outcome, DeliveryError):
            event = "deferred" if outcome.reply.is_transient else "failed"
            self.attempts.log_failure(meta, outcome, event)
            return outcome.reply
        self.attempts.log_delivered(meta, outcome)
        return _delivered(meta.queue_id)

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
            sender=submission.sender,
        )
