"""Keep every message's final outcome in the store's delivery history, in the background.

Why this module exists: the history (`relay.core.history`) is for people looking back; it must
never slow, block or fail a delivery. So the delivery roles hand each final outcome to
`DeliveryHistory` synchronously (`settled` for the queue modes, `direct_*` for direct mode),
which builds the record at once (the MIME is at hand for the Subject) and appends it to a list
that a background task writes to the store in batches, as `MailboxBudgets` saves the send
ledger. A store that refuses (disk full, read-only, database down) keeps the records here and is
asked again with the next batch, and at shutdown; the refusal is logged once, and its end once.
At most `MAX_UNSAVED` records wait in memory: past that the oldest are dropped (counted in the
log), because a relay must not run out of memory over its diary.

After a write, at most once per `PRUNE_EVERY`, the store is asked to forget what settled before
now minus `history.retention`. `search` answers from the store plus what is still waiting here,
so the status page shows a delivery the moment it is settled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Final

from relay.config.schema import Config
from relay.core.errors import DeliveryError
from relay.core.history import HistoryOutcome, HistoryQuery, HistoryRecord, select, subject_of
from relay.core.lifecycle import Bury, Complete, Decision, Discard, NoRoute, Result
from relay.core.values import Delivered, EntryMeta
from relay.store.protocol import HistoryLog, StoreUnavailableError

__all__ = ["MAX_UNSAVED", "PRUNE_EVERY", "DeliveryHistory"]

log = logging.getLogger("relay.delivery")

MAX_UNSAVED: Final = 10_000
PRUNE_EVERY: Final = 3600.0
NO_ROUTE_REMEDY: Final = "add or fix a route whose senders match this sender"


class DeliveryHistory:
    """Builds history records and writes them in the background (module docstring)."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        store: HistoryLog | None,
        clock: Callable[[], float] = time.time,
        max_unsaved: int = MAX_UNSAVED,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._max_unsaved = max_unsaved
        self._unsaved: list[HistoryRecord] = []
        self._writing: list[HistoryRecord] = []
        self._saving: asyncio.Task[None] | None = None
        self._failing = False
        self._pruned_at = -math.inf

    # --- what the delivery roles call (synchronous: never waits for the store) -------------

    def settled(self, decision: Decision, result: Result, mime: bytes | None) -> None:
        """A queue-mode decision: Complete, Bury and Discard are final, the rest are not."""
        entry = decision.entry
        if isinstance(decision, Complete) and isinstance(result, Delivered):
            self._keep(self._delivered(entry, result, mime, entry.attempts + 1))
        elif isinstance(decision, Bury | Discard):
            outcome: HistoryOutcome = "refused" if isinstance(decision, Discard) else "failed"
            if isinstance(decision, Bury) and decision.expired:
                outcome = "expired"
            failure = result if isinstance(result, DeliveryError) else None
            remedy = NO_ROUTE_REMEDY if isinstance(result, NoRoute) else ""
            self._keep(
                self._failed(entry, outcome, decision.reason, failure, mime, entry.attempts, remedy)
            )

    def direct_delivered(self, entry: EntryMeta, result: Delivered, mime: bytes) -> None:
        """Direct mode: Graph took it while the client waited."""
        self._keep(self._delivered(entry, result, mime, 1))

    def direct_refused(
        self, entry: EntryMeta, error: str, failure: DeliveryError | None, mime: bytes
    ) -> None:
        """Direct mode: the client was refused (it keeps the message); `failure` when Graph or
        the token endpoint answered, None when nothing was sent (no answer, no budget)."""
        attempts = 0 if failure is None else 1
        self._keep(self._failed(entry, "refused", error, failure, mime, attempts, ""))

    # --- reading and stopping ---------------------------------------------------------------

    async def search(self, query: HistoryQuery) -> Sequence[HistoryRecord]:
        """What `query` matches, from the store and from what waits to be written."""
        waiting = [*self._writing, *self._unsaved]
        stored: Sequence[HistoryRecord] = ()
        if self._store is not None:
            stored = await self._store.history(query)
        seen = {(r.queue_id, r.settled) for r in stored}
        return select(
            [*stored, *(r for r in waiting if (r.queue_id, r.settled) not in seen)], query
        )

    async def flush(self) -> None:
        """Write what waits now (shutdown; tests). A refusing store keeps it waiting."""
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
        await self._save()

    # --- building ---------------------------------------------------------------------------

    def _record(
        self,
        entry: EntryMeta,
        mime: bytes | None,
        outcome: HistoryOutcome,
        attempts: int,
        failure: DeliveryError | None = None,
        status: int | None = None,
        **fields: str,
    ) -> HistoryRecord:
        subjects = self._config().history.subjects
        return HistoryRecord(
            queue_id=entry.queue_id,
            message_id=entry.message_id,
            accepted=entry.created,
            settled=self._clock(),
            client=entry.client,
            client_ip=entry.client_ip,
            sender=entry.mail_from,
            recipients=len(entry.recipients),
            route=entry.route,
            mailbox=fields.pop("mailbox", entry.mailbox),
            path=fields.pop("path", ""),
            http_status=failure.http_status if failure else status,
            request_id=(failure.request_id or "") if failure else fields.pop("request_id", ""),
            attempts=attempts,
            outcome=outcome,
            subject=subject_of(mime) if subjects and mime is not None else None,
            error=fields.pop("error", ""),
            remedy=(failure.remedy if failure else "") or fields.pop("remedy", ""),
        )

    def _delivered(
        self, entry: EntryMeta, result: Delivered, mime: bytes | None, attempts: int
    ) -> HistoryRecord:
        return self._record(
            entry,
            mime,
            "delivered",
            attempts,
            status=result.status,
            mailbox=result.sent_as or entry.mailbox,
            path=result.path,
            request_id=result.request_id or "",
        )

    def _failed(
        self,
        entry: EntryMeta,
        outcome: HistoryOutcome,
        error: str,
        failure: DeliveryError | None,
        mime: bytes | None,
        attempts: int,
        remedy: str,
    ) -> HistoryRecord:
        return self._record(entry, mime, outcome, attempts, failure, error=error, remedy=remedy)

    # --- writing ----------------------------------------------------------------------------

    def _keep(self, record: HistoryRecord) -> None:
        if self._store is None:
            return
        self._unsaved.append(record.shortened())
        excess = len(self._unsaved) - self._max_unsaved
        if excess > 0:
            del self._unsaved[:excess]
            log.warning(
                "dropped the %d oldest unwritten history records (the store refuses them)",
                excess,
                extra={"event": "history_dropped", "dropped": excess},
            )
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save(), name="save-history")

    async def _save(self) -> None:
        while self._unsaved and self._store is not None:
            self._writing, self._unsaved = self._unsaved, []
            try:
                await self._store.record_history(self._writing)
            except StoreUnavailableError as exc:
                self._unsaved, self._writing = self._writing + self._unsaved, []
                if not self._failing:
                    log.warning(
                        "cannot write the delivery history, keeping %d records in memory: %s",
                        len(self._unsaved),
                        exc,
                        extra={"event": "history_unsaved"},
                    )
                self._failing = True
                return
            self._writing = []
            if self._failing:
                log.info("the delivery history is written again", extra={"event": "history_saved"})
                self._failing = False
            await self._prune()

    async def _prune(self) -> None:
        now = self._clock()
        if self._store is None or now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        try:
            await self._store.prune_history(now - self._config().history.retention)
        except StoreUnavailableError as exc:
            log.warning(
                "cannot prune the delivery history: %s", exc, extra={"event": "history_unpruned"}
            )
