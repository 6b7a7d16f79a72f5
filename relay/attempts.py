"""One attempt to hand one message to Graph, shared by inline delivery and the queue workers.

Why this module exists: whoever makes the attempt (the SMTP hook in `direct`/`hybrid` mode or a
queue worker), the same rules apply and the same log events come out:

- at most 4 concurrent requests per (auth object, mailbox): Graph's MailboxConcurrency limit
  (concepts/throttling-limits.md); a fifth would only earn a 429;
- after a 429 with Retry-After, that mailbox is paused for everyone, not just for the one
  message that was throttled;
- a message whose base64 form cannot fit Graph's 4 MB request is refused before sending.

`send` returns the outcome as a value (`Delivered` or the `DeliveryError`) instead of raising, so
callers handle the three cases in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from relay.config import AuthObjectConfig, Config
from relay.errors import DeliveryError, PermanentDeliveryError, SmtpReply, TransientDeliveryError
from relay.metrics import NULL_METRICS, ErrorReport, MetricsSink
from relay.spool import EntryMeta

__all__ = [
    "GRAPH_MAX_REQUEST_BYTES",
    "Delivered",
    "GraphAttempts",
    "GraphSender",
    "MailboxSlots",
    "Outcome",
    "error_report",
    "message_fields",
    "single_request_limit",
]

log = logging.getLogger("relay.delivery")

# Graph rejects request bodies over 4 MB (user-sendmail.md); the MIME form is base64 (+4/3).
GRAPH_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Room for what the relay adds: Received, Date, Message-ID and a Bcc field naming recipients.
_HEADER_HEADROOM = 64 * 1024
MAILBOX_CONCURRENCY = 4


def base64_size(size: int) -> int:
    return 4 * ((size + 2) // 3)


def single_request_limit() -> int:
    """Largest message (as received) whose prepared MIME still fits one sendMail request."""
    return (GRAPH_MAX_REQUEST_BYTES // 4) * 3 - _HEADER_HEADROOM


class SendOutcome(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def request_id(self) -> str | None: ...


class GraphSender(Protocol):
    """What delivery needs from the Graph client."""

    async def send_mime(
        self,
        auth: AuthObjectConfig,
        auth_name: str,
        mailbox: str,
        mime: bytes,
        *,
        client_request_id: str,
    ) -> SendOutcome: ...


@dataclass(frozen=True, slots=True)
class Delivered:
    status: int
    request_id: str | None
    duration_ms: int


Outcome = Delivered | DeliveryError


def message_fields(meta: EntryMeta) -> dict[str, object]:
    """The structured log fields that identify a message in every event of its life."""
    return {
        "queue_id": meta.queue_id,
        "message_id": meta.message_id,
        "client": meta.client,
        "client_ip": meta.client_ip,
        "mail_from": meta.mail_from,
        "recipients": len(meta.recipients),
        "route": meta.route,
        "auth_object": meta.auth_object,
        "mailbox": meta.mailbox,
        "size": meta.size,
        "attempts": meta.attempts,
    }


def error_report(
    meta: EntryMeta,
    event: str,
    *,
    at: float,
    reply: SmtpReply,
    failure: DeliveryError | None = None,
    message: str = "",
) -> ErrorReport:
    """What the status page shows about a failed attempt (no addresses beyond the mailbox)."""
    return ErrorReport(
        at=at,
        event=event,
        queue_id=meta.queue_id,
        route=meta.route,
        auth_object=meta.auth_object,
        mailbox=meta.mailbox,
        http_status=failure.http_status if failure else None,
        code=failure.code if failure else None,
        request_id=failure.request_id if failure else None,
        reply=str(reply),
        remedy=failure.remedy if failure else "",
        message=failure.message if failure else message,
    )


def _from_graph(failure: DeliveryError) -> bool:
    """Whether Graph (or the way to it) produced `failure`, rather than the token step.

    Token failures are 451 4.7.0 (relay.aadsts) and are counted as token acquisitions; the only
    Graph answer mapped to 4.7.0 is its 401.
    """
    return failure.reply.status != "4.7.0" or failure.http_status == 401


class MailboxSlots:
    """At most `limit` concurrent Graph requests per (auth object, mailbox), plus pauses."""

    def __init__(self, limit: int = MAILBOX_CONCURRENCY, *, monotonic: Callable[[], float]) -> None:
        self.limit = limit
        self._monotonic = monotonic
        self._slots: dict[tuple[str, str], tuple[asyncio.Semaphore, int]] = {}
        self._paused: dict[tuple[str, str], float] = {}

    @staticmethod
    def key(auth_object: str, mailbox: str) -> tuple[str, str]:
        return (auth_object, mailbox.casefold())

    def busy(self, auth_object: str, mailbox: str) -> bool:
        """True when a new request for this mailbox would have to wait."""
        key = self.key(auth_object, mailbox)
        _, users = self._slots.get(key, (None, 0))
        return users >= self.limit or self.paused_for(auth_object, mailbox) > 0

    def paused_for(self, auth_object: str, mailbox: str) -> float:
        key = self.key(auth_object, mailbox)
        remaining = self._paused.get(key, 0.0) - self._monotonic()
        if remaining <= 0:
            self._paused.pop(key, None)
            return 0.0
        return remaining

    def pause(self, auth_object: str, mailbox: str, seconds: float) -> None:
        key = self.key(auth_object, mailbox)
        self._paused[key] = max(self._paused.get(key, 0.0), self._monotonic() + seconds)

    @contextlib.asynccontextmanager
    async def hold(self, auth_object: str, mailbox: str) -> AsyncIterator[None]:
        key = self.key(auth_object, mailbox)
        semaphore, users = self._slots.get(key, (asyncio.Semaphore(self.limit), 0))
        self._slots[key] = (semaphore, users + 1)
        try:
            async with semaphore:
                pause = self.paused_for(auth_object, mailbox)
                if pause > 0:  # Graph asked this mailbox's traffic to wait (Retry-After)
                    await asyncio.sleep(pause)
                yield
        finally:
            semaphore, users = self._slots[key]
            if users <= 1:
                del self._slots[key]  # as small as the set of busy mailboxes
            else:
                self._slots[key] = (semaphore, users - 1)


class GraphAttempts:
    """Makes attempts and writes the log event of each outcome."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        graph: GraphSender,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        metrics: MetricsSink = NULL_METRICS,
    ) -> None:
        self._config = config
        self._graph = graph
        self._monotonic = monotonic
        self._clock = clock
        self.metrics = metrics
        self.slots = MailboxSlots(monotonic=monotonic)

    async def send(self, meta: EntryMeta, mime: bytes) -> Outcome:
        """One attempt. Never raises for Graph's or the network's failures."""
        if base64_size(len(mime)) > GRAPH_MAX_REQUEST_BYTES:
            return PermanentDeliveryError(
                "message too large for one Graph request",
                reply=SmtpReply(
                    552, "5.3.4", "Message too large for Microsoft 365 (4 MB per request)"
                ),
                code="MessageTooLarge",
                remedy="lower smtp.max_message_size or let the sender split the message",
            )
        auth = self._config().auth_objects[meta.auth_object]
        started = self._monotonic()
        try:
            async with self.slots.hold(meta.auth_object, meta.mailbox):
                requested = self._monotonic()  # the latency metric leaves out the slot wait
                try:
                    result = await self._graph.send_mime(
                        auth,
                        meta.auth_object,
                        meta.mailbox,
                        mime,
                        client_request_id=str(uuid.uuid4()),
                    )
                except DeliveryError as failure:
                    if _from_graph(failure):
                        elapsed = self._monotonic() - requested
                        self.metrics.graph_response(failure.http_status, failure.code, elapsed)
                    raise
        except DeliveryError as failure:
            if isinstance(failure, TransientDeliveryError) and failure.http_status == 429:
                self.slots.pause(meta.auth_object, meta.mailbox, failure.retry_after or 1.0)
            return failure
        self.metrics.graph_response(result.status, None, self._monotonic() - requested)
        return Delivered(
            status=result.status,
            request_id=result.request_id,
            duration_ms=round((self._monotonic() - started) * 1000),
        )

    def log_delivered(self, meta: EntryMeta, outcome: Delivered) -> None:
        """The `delivered` event: log line and metrics."""
        self.metrics.delivered(meta.route, meta.auth_object, self._clock() - meta.created)
        log.info(
            "delivered %s from=<%s> rcpts=%d route=%s mailbox=%s graph=%s request_id=%s",
            meta.queue_id,
            meta.mail_from,
            len(meta.recipients),
            meta.route,
            meta.mailbox,
            outcome.status,
            outcome.request_id,
            extra={
                "event": "delivered",
                **message_fields(meta),
                "graph_status": outcome.status,
                "request_id": outcome.request_id,
                "duration_ms": outcome.duration_ms,
            },
        )

    def log_failure(self, meta: EntryMeta, failure: DeliveryError, event: str) -> None:
        """A `deferred`, `failed` or `expired` event: log line, metrics, status page."""
        if event == "deferred":
            self.metrics.deferred(meta.route)
        elif event in ("failed", "expired"):
            self.metrics.failed(meta.route, "expired" if event == "expired" else "permanent")
        self.metrics.delivery_error(
            error_report(meta, event, at=self._clock(), reply=failure.reply, failure=failure)
        )
        alert = isinstance(failure, TransientDeliveryError) and failure.alert
        log.log(
            logging.ERROR if alert or event in ("failed", "expired") else logging.WARNING,
            "%s %s: %s",
            event,
            meta.queue_id,
            failure.describe(),
            extra={
                "event": event,
                **message_fields(meta),
                "graph_status": failure.http_status,
                "graph_code": failure.code,
                "request_id": failure.request_id,
                "remedy": failure.remedy,
                "reply": str(failure.reply),
            },
        )
