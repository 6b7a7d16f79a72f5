"""Carry out `settle`'s decisions against the store, and keep those the store cannot take yet.

Why this module exists: an attempt is over only when its outcome is recorded. If the disk is
full or read-only at that moment (issue #11 item 2), forgetting the outcome strands the message
in `active` for good, and recording nothing about a delivered message sends it again after a
restart. So this role owns the rule (DESIGN §6): an outcome that cannot be written is kept in
memory and retried with backoff until the store takes it; the message is never attempted again
while its last outcome is unrecorded (the workers ask `is_pending`); and `degraded_reasons`
says so to /healthz and /readyz.

Each decision is logged and counted once, when it is made; recording it is the store's part.
A `Bury` with a DSN is two writes (bury, then put the DSN); each is done once, in that order, so
a retry after the first succeeded does not bury twice, and the DSN is built once so a retried
put stores the same message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from relay.core.errors import DeliveryError
from relay.core.lifecycle import (
    Bury,
    Complete,
    Crashed,
    Decision,
    Defer,
    Discard,
    NoRoute,
    Quarantine,
    Result,
)
from relay.core.values import Delivered, EntryMeta
from relay.delivery.attempt import GraphAttempts, message_fields
from relay.delivery.bounces import Bouncer, PendingBounce
from relay.delivery.history import DeliveryHistory
from relay.store.protocol import EntryNotFoundError, Store, StoreUnavailableError

__all__ = ["OutcomeRecorder"]

log = logging.getLogger("relay.delivery")

RECORD_RETRY_FIRST = 0.5
RECORD_RETRY_MAX = 30.0


@dataclass(slots=True)
class _Pending:
    """One decision on its way into the store."""

    decision: Decision
    mime: bytes | None
    buried: bool = False
    bounce: PendingBounce | None = None


class OutcomeRecorder:
    """Records decisions; see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        attempts: GraphAttempts,
        bouncer: Bouncer,
        on_queued: Callable[[], None],
        retry_first: float = RECORD_RETRY_FIRST,
        retry_max: float = RECORD_RETRY_MAX,
        history: DeliveryHistory | None = None,
    ) -> None:
        self._history = history  # told each final outcome as it is decided
        self._store = store
        self._attempts = attempts
        self._bouncer = bouncer
        self._on_queued = on_queued  # something new is queued: the workers look again
        self._retry_first = retry_first
        self._retry_max = retry_max
        self._pending: dict[str, _Pending] = {}
        self._retrying: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    def is_pending(self, queue_id: str) -> bool:
        """Whether this entry's last outcome is still unrecorded: do not attempt it."""
        return queue_id in self._pending

    def degraded_reasons(self) -> list[str]:
        """For /healthz and /readyz: empty while every outcome is recorded."""
        return [f"outcomes not recorded: {len(self._pending)}"] if self._pending else []

    async def carry_out(self, decision: Decision, result: Result, mime: bytes | None) -> None:
        """Log `decision` and record it; keep it for retrying when the store is unavailable.
        Shielded: a cancelled caller (shutdown) never leaves an outcome half-told."""
        await asyncio.shield(self._carry_out(decision, result, mime))

    async def _carry_out(self, decision: Decision, result: Result, mime: bytes | None) -> None:
        self._report(decision, result)
        if self._history is not None:
            self._history.settled(decision, result, mime)
        pending = _Pending(decision, mime)
        if not await self._record(pending):
            self._keep(pending)

    async def release(self, entry: EntryMeta) -> None:
        """Shutdown interrupted the attempt: back to the queue unchanged, not a crash."""
        try:
            await asyncio.shield(self._store.release(entry.queue_id))
        except (StoreUnavailableError, EntryNotFoundError) as exc:
            # Left active: recovery at the next start requeues it.
            log.warning(
                "cannot release %s: %s",
                entry.queue_id,
                exc,
                extra={"event": "release_failed", **message_fields(entry)},
            )

    async def stop(self) -> None:
        """Try once more to record what is pending, then stop retrying."""
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
            self._retrying = None
        await self._flush()
        for queue_id in self._pending:
            log.error(
                "stopping with the outcome of %s unrecorded: it stays active and is retried "
                "at the next start",
                queue_id,
                extra={"event": "outcome_unrecorded", "queue_id": queue_id},
            )

    # --- recording --------------------------------------------------------------------------

    async def _record(self, pending: _Pending) -> bool:
        """Write `pending` as far as the store lets; True once it is all recorded."""
        decision = pending.decision
        entry = decision.entry
        try:
            if isinstance(decision, Complete):
                await self._store.complete(entry.queue_id)
            elif isinstance(decision, Defer):
                await self._store.defer(entry)
                self._on_queued()
            elif isinstance(decision, Quarantine):
                await self._store.quarantine(entry, decision.reason)
            elif isinstance(decision, Discard):
                await self._store.discard(entry.queue_id)
            else:
                await self._bury(pending, decision)
        except StoreUnavailableError as exc:
            if entry.queue_id not in self._pending:
                log.error(
                    "cannot record the outcome of %s, keeping it and retrying: %s",
                    entry.queue_id,
                    exc,
                    extra={"event": "outcome_unrecorded", **message_fields(entry)},
                )
            return False
        except EntryNotFoundError as exc:  # an operator deleted or moved it meanwhile
            log.warning(
                "outcome of %s not recorded, the entry is gone: %s",
                entry.queue_id,
                exc,
                extra={"event": "outcome_dropped", **message_fields(entry)},
            )
        return True

    async def _bury(self, pending: _Pending, decision: Bury) -> None:
        if not pending.buried:
            await self._store.bury(decision.entry, decision.reason)
            pending.buried = True
            if decision.bounce is not None and pending.mime is not None:
                pending.bounce = self._bouncer.build(decision.entry, decision.bounce, pending.mime)
        if pending.bounce is not None:
            await self._store.put(pending.bounce.entry, pending.bounce.message)
            bounce, pending.bounce = pending.bounce, None
            self._bounced(decision.entry, bounce.entry.queue_id)
            self._on_queued()

    def _keep(self, pending: _Pending) -> None:
        self._pending[pending.decision.entry.queue_id] = pending
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry(), name="record-outcomes")

    async def _retry(self) -> None:
        delay = self._retry_first
        while self._pending:
            try:
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            if await self._flush():
                log.info(
                    "every kept outcome is recorded again",
                    extra={"event": "outcomes_recorded"},
                )
                return
            delay = min(self._retry_max, delay * 2)

    async def _flush(self) -> bool:
        """Record pending outcomes oldest first; stop at the first the store refuses."""
        for queue_id, pending in list(self._pending.items()):
            if not await self._record(pending):
                return False
            del self._pending[queue_id]
        return True

    def retry_now(self) -> None:
        """Try the kept outcomes now (e.g. an operator says the disk is back)."""
        self._kick.set()

    # --- events -----------------------------------------------------------------------------

    def _report(self, decision: Decision, result: Result) -> None:
        entry = decision.entry
        attempts = self._attempts
        if isinstance(decision, Complete):
            assert isinstance(result, Delivered)
            attempts.log_delivered(entry, result)
        elif isinstance(result, DeliveryError):
            event = {Defer: "deferred", Discard: "failed"}.get(type(decision))
            if isinstance(decision, Bury):
                event = "expired" if decision.expired else "failed"
            attempts.log_failure(entry, result, event or "failed")
        elif isinstance(result, NoRoute):
            self._no_route(decision, result)
        elif isinstance(result, Crashed):
            log.error(
                "%s %s after an internal error (%d so far)",
                "quarantined" if isinstance(decision, Quarantine) else "deferred",
                entry.queue_id,
                entry.crashes,
                extra={"event": "crashed", **message_fields(entry), "crashes": entry.crashes},
            )

    def _no_route(self, decision: Decision, result: NoRoute) -> None:
        entry = decision.entry
        buried = isinstance(decision, Bury)
        log.error(
            "%s %s: %s; add or fix a route whose senders match it",
            "expired" if buried else "deferred",
            entry.queue_id,
            result.reason,
            extra={"event": "no_route", **message_fields(entry), "sender": result.sender},
        )
        if buried:
            self._attempts.metrics.failed(entry.route, "expired")
        else:
            self._attempts.metrics.deferred(entry.route)

    def _bounced(self, failed: EntryMeta, bounce_id: str) -> None:
        log.info(
            "bounced %s to <%s> as %s",
            failed.queue_id,
            failed.mail_from,
            bounce_id,
            extra={"event": "bounced", **message_fields(failed), "bounce_id": bounce_id},
        )
        self._attempts.metrics.bounced(failed.route)
