"""One attempt to hand one message to Graph, shared by inline delivery and the queue workers.

Why this module exists: whoever makes the attempt (the SMTP hook in `direct`/`hybrid` mode or a
queue worker), the same rules apply and the same log events come out:

- at most 4 concurrent requests per (auth object, mailbox): Graph's MailboxConcurrency limit
  (concepts/throttling-limits.md); a fifth would only earn a 429;
- after a 429 with Retry-After, that mailbox is paused for everyone, not just for the one
  message that was throttled;
- no request goes out before the mailbox's sending budgets have room for it (Exchange Online's
  messages per minute and recipients per day, Graph's requests and uploads: `MailboxBudgets`);
  a message without room comes back `Postponed`, unsent, and a pool's message goes out as the
  member with the most budget left;
- a limit answer (`mailbox_limit`: 429, ErrorExceededMessageLimit, ...) pauses the mailbox for
  Retry-After or a learned back-off (`relay.core.pauses`), logged once per pause;
- a message whose base64 form cannot fit Graph's 4 MB request takes the large-message path
  (draft + upload sessions, `relay.large`) with `delivery.large_messages: upload`, and is refused
  with 552 5.3.4 before sending with `reject`.

`send` returns the outcome as a value (`Delivered` or the `DeliveryError`) instead of raising, so
callers handle the three cases in one place.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from relay.config.schema import Config
from relay.core.budgets import Need
from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)
from relay.core.history import SendPath
from relay.core.lifecycle import Postponed
from relay.core.limits import (
    GRAPH_MAX_REQUEST_BYTES,
    MAX_LARGE_MESSAGE,
    base64_size,
    single_request_limit,
)
from relay.core.message.prepare import CannotConvertError, GraphJsonTooLargeError, to_graph_message
from relay.core.values import Delivered, EntryMeta, Outcome, Route, SendTarget, pool_members
from relay.delivery.budget import MailboxBudgets
from relay.delivery.pacing import (
    MailboxPauses,
    counted,
    from_graph,
    need_for_large,
    need_of,
    over_budget,
)
from relay.delivery.slots import MailboxSlots
from relay.ops.metrics import NULL_METRICS, ErrorReport, MetricsSink
from relay.store.protocol import Store

__all__ = [
    "GraphAttempts",
    "GraphSender",
    "SendResult",
    "error_report",
    "message_fields",
    "send_target",
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


class SendResult(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def request_id(self) -> str | None: ...


class GraphSender(Protocol):
    """What delivery needs from the Graph client (`relay.graph.client.GraphClient`). Each call
    raises `DeliveryError` for Graph's and the network's failures, and nothing else."""

    async def send_mime(self, target: SendTarget, mime: bytes) -> SendResult: ...

    async def send_large_mime(self, target: SendTarget, mime: bytes) -> SendResult: ...

    async def send_json(
        self, target: SendTarget, message_json: Mapping[str, Any], save_to_sent_items: bool
    ) -> SendResult: ...


_Send = Callable[[SendTarget], Awaitable[SendResult]]


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


def send_target(config: Config, route: Route) -> SendTarget:
    """What one request through `route` sends as, with a fresh client-request-id (Graph's
    request-id is logged beside it, so support can find the request from either side)."""
    return SendTarget(
        auth_name=route.auth_object,
        auth=config.auth_objects[route.auth_object],
        mailbox=route.mailbox,
        client_request_id=str(uuid.uuid4()),
    )


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
        store: Store | None = None,
    ) -> None:
        self._config = config
        self._graph = graph
        self._monotonic = monotonic
        self._clock = clock
        self.metrics = metrics
        self.budgets = MailboxBudgets(config=config, store=store, clock=clock)
        self.slots = MailboxSlots(
            monotonic=monotonic,
            limit_for=lambda auth, box: self.budgets.limits(auth, box).concurrent_requests,
        )
        self.pauses = MailboxPauses(self.slots, metrics)

    async def send(self, meta: EntryMeta, mime: bytes, route: Route) -> Outcome | Postponed:
        """One attempt through `route`, or `Postponed` when its mailbox has no budget for it.
        Never raises for Graph's or the network's failures."""
        config = self._config()
        chosen = self._choose(config, meta, mime, route)
        if isinstance(chosen, DeliveryError):
            return chosen
        request, need, path = chosen
        if route.pool:
            auth = route.auth_object
            member = self.budgets.choose_member(
                auth, route.pool, need, full=lambda box: self.slots.busy(auth, box)
            )
            if isinstance(member, Postponed):
                return member
            route = route.member(member)
            if route.needs_json:  # the JSON form names the sending mailbox (rewrite_from)
                chosen = self._choose(config, meta, mime, route)
                if isinstance(chosen, DeliveryError):
                    return chosen
                request, need, path = chosen
        too_big = self.budgets.never_fits(route.auth_object, route.mailbox, need)
        if too_big is not None:
            return over_budget(route, too_big, need, self.budgets)
        reservation = self.budgets.reserve(route.auth_object, route.mailbox, need)
        if isinstance(reservation, Postponed):
            return reservation
        used: Need | None = need  # cancelled half-way: Graph may have counted it all
        try:
            result = await self._request(config, route, request, path)
            if isinstance(result, Postponed):
                used = None
            return result
        except DeliveryError as failure:
            used = counted(failure, need)
            return failure
        finally:
            self.budgets.finish(reservation, used)

    async def _request(
        self, config: Config, route: Route, request: _Send, path: SendPath
    ) -> Delivered | Postponed:
        """The request itself, in one of the mailbox's Graph slots; raises DeliveryError.
        Postponed, unsent, when the mailbox was paused while this waited for its slot: the
        message waits in the queue, not in a waiting client's DATA (hybrid) or a worker."""
        target = send_target(config, route)
        started = self._monotonic()
        try:
            async with self.slots.hold(route.auth_object, route.mailbox):
                paused = self.slots.paused_for(route.auth_object, route.mailbox)
                if paused > 0:
                    return Postponed(route.mailbox, "pause", paused)
                requested = self._monotonic()  # the latency metric leaves out the slot wait
                try:
                    result = await request(target)
                except DeliveryError as failure:
                    if from_graph(failure):
                        elapsed = self._monotonic() - requested
                        self.metrics.graph_response(failure.http_status, failure.code, elapsed)
                    raise
        except TransientDeliveryError as failure:
            if failure.mailbox_limit:
                self.pauses.limit_reached(route, failure)
            raise
        self.pauses.sent(route)
        self.metrics.graph_response(result.status, None, self._monotonic() - requested)
        return Delivered(
            status=result.status,
            request_id=result.request_id,
            duration_ms=round((self._monotonic() - started) * 1000),
            sent_as=route.mailbox,
            path=path,
        )

    def can_send_now(self, meta: EntryMeta) -> bool:
        """Whether an attempt for `meta` would start at once: a Graph slot free and room in
        the budget (for a pool: in some member). A hint; `send` decides."""
        auth = meta.auth_object
        upload_limit = self.budgets.limits(auth, meta.mailbox).upload_per_5_minutes
        need = need_of(meta, self._config().delivery.large_messages, upload_limit)
        members = pool_members(meta.mailbox) or (meta.mailbox,)
        return any(
            not self.slots.busy(auth, box) and self.budgets.wait(auth, box, need) is None
            for box in members
        )

    def _choose(
        self, config: Config, meta: EntryMeta, mime: bytes, route: Route
    ) -> tuple[_Send, Need, SendPath] | DeliveryError:
        """The request that can carry this message, and what it uses of the budgets: Graph
        JSON when the route needs it (DESIGN §3, §7), the large-message path past 4 MB, else
        one MIME request."""
        graph = self._graph
        recipients = len(meta.recipients)
        if route.needs_json:
            json_send = self._json_send(meta, mime, route)
            if isinstance(json_send, DeliveryError):
                return json_send
            return json_send, Need(recipients), "json"
        if base64_size(len(mime)) <= GRAPH_MAX_REQUEST_BYTES:
            return (lambda target: graph.send_mime(target, mime)), Need(recipients), "mime"
        if config.delivery.large_messages == "upload":
            upload_limit = self.budgets.limits(route.auth_object, route.mailbox)
            need = need_for_large(recipients, len(mime), upload_limit.upload_per_5_minutes)
            return (lambda target: graph.send_large_mime(target, mime)), need, "upload"
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

    def _json_send(self, meta: EntryMeta, mime: bytes, route: Route) -> _Send | DeliveryError:
        """The message as Graph JSON, converted once per attempt; a message that cannot be
        converted unchanged, or too large for one request, is refused (554 5.6.0 / 552 5.3.4)."""
        try:
            message = to_graph_message(
                mime,
                envelope_recipients=meta.recipients,
                mailbox=route.mailbox,
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
        graph = self._graph
        return lambda target: graph.send_json(target, document, route.save_to_sent_items)

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
