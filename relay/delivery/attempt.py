"""One attempt to hand one message to Graph, shared by inline delivery and the queue workers.

Why this module exists: whoever makes the attempt (the SMTP hook in `direct`/`hybrid` mode or a
queue worker), the same rules apply and the same log events come out:

- at most 4 concurrent requests per (auth object, mailbox): Graph's MailboxConcurrency limit
  (concepts/throttling-limits.md); a fifth would only earn a 429;
- after a 429 with Retry-After, that mailbox is paused for everyone, not just for the one
  message that was throttled;
- a message whose base64 form cannot fit Graph's 4 MB request takes the large-message path
  (draft + upload sessions, `relay.large`) with `delivery.large_messages: upload`, and is refused
  with 552 5.3.4 before sending with `reject`.

`send` returns the outcome as a value (`Delivered` or the `DeliveryError`) instead of raising, so
callers handle the three cases in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from relay.config.schema import Config, RouteConfig
from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)
from relay.core.limits import (
    GRAPH_MAX_REQUEST_BYTES,
    MAILBOX_CONCURRENCY,
    MAX_LARGE_MESSAGE,
    base64_size,
    single_request_limit,
)
from relay.core.message.prepare import CannotConvertError, GraphJsonTooLargeError, to_graph_message
from relay.core.values import Delivered, EntryMeta, Outcome, SendTarget, route_index
from relay.ops.metrics import NULL_METRICS, ErrorReport, MetricsSink

__all__ = [
    "GraphAttempts",
    "GraphSender",
    "JsonGraphSender",
    "LargeGraphSender",
    "MailboxSlots",
    "error_report",
    "message_fields",
    "size_limit",
]

log = logging.getLogger("relay.delivery")


def size_limit(config: Config) -> int:
    """What EHLO advertises as SIZE: the configured limit, capped by what Graph can take, which
    is one request with `large_messages: reject` and a 150 MB attachment with `upload`."""
    cap = single_request_limit()
    if config.delivery.large_messages == "upload":
        cap = MAX_LARGE_MESSAGE
    return min(config.smtp.max_message_size, cap)


class SendOutcome(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def request_id(self) -> str | None: ...


class GraphSender(Protocol):
    """What delivery needs from the Graph client."""

    async def send_mime(self, target: SendTarget, mime: bytes) -> SendOutcome: ...


@runtime_checkable
class LargeGraphSender(Protocol):
    """A GraphSender that can also send past the 4 MB limit (relay.graph.GraphClient)."""

    async def send_large_mime(self, target: SendTarget, mime: bytes) -> SendOutcome: ...


@runtime_checkable
class JsonGraphSender(Protocol):
    """A GraphSender that can also send Graph's JSON message resource (relay.graph.GraphClient)."""

    async def send_json(
        self, target: SendTarget, message_json: Mapping[str, Any], save_to_sent_items: bool
    ) -> SendOutcome: ...


_Send = Callable[[SendTarget, bytes], Awaitable[SendOutcome]]


def json_route(config: Config, meta: EntryMeta) -> RouteConfig | None:
    """The route of `meta` when it needs the JSON form (DESIGN §3, §7: rewrite_from, or
    save_to_sent_items: false, which MIME cannot express); None for the MIME form. The route is
    read from the current config by its position, so a reload applies to queued messages too."""
    index = route_index(meta.route)
    if index is None or index >= len(config.routes):
        return None
    route = config.routes[index]
    return route if route.rewrite_from or not route.save_to_sent_items else None


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
        config = self._config()
        send: _Send = self._graph.send_mime
        route = json_route(config, meta)
        if route is not None:
            chosen = self._json_send(meta, mime, route)
            if isinstance(chosen, DeliveryError):
                return chosen
            send = chosen
        elif base64_size(len(mime)) > GRAPH_MAX_REQUEST_BYTES:
            if config.delivery.large_messages != "upload" or not isinstance(
                self._graph, LargeGraphSender
            ):
                return PermanentDeliveryError(
                    "message too large for one Graph request (large_messages: reject)",
                    reply=SmtpReply(
                        552,
                        "5.3.4",
                        "Message too large for Microsoft 365: at most 4 MB per request after "
                        "base64, and this relay does not send larger messages in parts",
                    ),
                    code="MessageTooLarge",
                    remedy="set delivery.large_messages: upload (needs Mail.ReadWrite), or the "
                    "sender must send the message smaller",
                )
            send = self._graph.send_large_mime
        target = SendTarget(
            auth_name=meta.auth_object,
            auth=config.auth_objects[meta.auth_object],
            mailbox=meta.mailbox,
            client_request_id=str(uuid.uuid4()),
        )
        started = self._monotonic()
        try:
            async with self.slots.hold(meta.auth_object, meta.mailbox):
                requested = self._monotonic()  # the latency metric leaves out the slot wait
                try:
                    result = await send(target, mime)
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

    def _json_send(self, meta: EntryMeta, mime: bytes, route: RouteConfig) -> _Send | DeliveryError:
        """The message as Graph JSON, converted once per attempt; a message that cannot be
        converted unchanged, or too large for one request, is refused (554 5.6.0 / 552 5.3.4)."""
        graph = self._graph
        if not isinstance(graph, JsonGraphSender):
            return TransientDeliveryError(
                "the Graph client cannot send JSON", alert=True, remedy="report this as a bug"
            )
        try:
            message = to_graph_message(
                mime,
                envelope_recipients=meta.recipients,
                mailbox=meta.mailbox,
                rewrite_from=route.rewrite_from,
            )
        except (CannotConvertError, GraphJsonTooLargeError) as exc:
            too_large = isinstance(exc, GraphJsonTooLargeError)
            return PermanentDeliveryError(
                f"cannot send as Graph JSON: {exc}",
                reply=exc.reply,
                code="MessageTooLarge" if too_large else "CannotConvert",
                remedy="the route needs Graph's JSON form (rewrite_from or save_to_sent_items: "
                "false); route this sender through a route without them to send the MIME as is",
            )
        if message.dropped_headers:
            log.info(
                "json form of %s drops headers beyond Graph's 5 x- headers: %s",
                meta.queue_id,
                ", ".join(message.dropped_headers),
                extra={"event": "json_headers_dropped", **message_fields(meta)},
            )
        document = message.as_json()

        async def send(target: SendTarget, _: bytes) -> SendOutcome:
            return await graph.send_json(target, document, route.save_to_sent_items)

        return send

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
