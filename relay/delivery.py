"""The delivery engine: turns a policy-approved submission into Graph's verdict and an SMTP reply.

Why this module exists: the SMTP layer must not know about Graph, tokens or timeouts, and the
Graph client must not know about SMTP. This module owns the delivery semantics of DESIGN §5.

This release implements `direct` mode only: no spool, so the client gets `250` only after
Graph's `202 Accepted`; a transient problem (throttling, outage, token trouble, or no answer
within `delivery.inline_timeout`) is answered `451` so the client keeps the message and retries;
a permanent refusal is answered with the matching `5xx`. Nothing is ever acknowledged that
Microsoft 365 has not accepted, so nothing can be lost.

Every message produces exactly one log event with its queue id, client, sender, recipient
count, route, mailbox, Graph status, request-id and duration.
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
from relay.smtp import Submission

__all__ = [
    "GRAPH_MAX_REQUEST_BYTES",
    "DirectDelivery",
    "GraphSender",
    "MailboxSlots",
    "SendOutcome",
    "single_request_limit",
]

log = logging.getLogger("relay.delivery")

# Graph rejects request bodies over 4 MB (user-sendmail.md: "the total message size ... cannot
# exceed 4 MB"); the MIME form is base64, which grows the message by 4/3.
GRAPH_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Room for what the relay adds before sending: Received, Date, Message-ID and a Bcc field that
# can list every envelope recipient.
_HEADER_HEADROOM = 64 * 1024


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
class _Timing:
    started: float

    def ms(self, now: float) -> int:
        return round((now - self.started) * 1000)


class MailboxSlots:
    """At most `limit` concurrent Graph requests per (auth object, mailbox).

    Graph's MailboxConcurrency limit is 4 concurrent requests per app and mailbox
    (concepts/throttling-limits.md); a fifth is answered 429. Waiting for a slot here costs the
    client a little time inside `inline_timeout` instead of a throttled request and a 451.
    """

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self._slots: dict[tuple[str, str], tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, auth_object: str, mailbox: str) -> AsyncIterator[None]:
        key = (auth_object, mailbox.casefold())
        semaphore, users = self._slots.get(key, (asyncio.Semaphore(self.limit), 0))
        self._slots[key] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._slots[key]
            if users <= 1:
                del self._slots[key]  # keep the table as small as the set of busy mailboxes
            else:
                self._slots[key] = (semaphore, users - 1)


class DirectDelivery:
    """`delivery.mode: direct`: one Graph attempt while the client waits."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        graph: GraphSender,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._graph = graph
        self._monotonic = monotonic
        self._in_flight: set[asyncio.Task[SmtpReply]] = set()
        self._slots = MailboxSlots()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def submit(self, submission: Submission) -> SmtpReply:
        """Deliver now; the reply is final.

        The attempt runs as a tracked task so a shutdown can wait for it. If the client hangs
        up, aiosmtpd cancels the hook and with it the attempt: the client never saw a 250 and
        will send again (at worst a duplicate, never a loss).
        """
        task = asyncio.create_task(self._deliver(submission))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await task

    async def drain(self, grace: float) -> None:
        """Wait (bounded) for deliveries in progress, e.g. before shutdown."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace)

    async def _deliver(self, submission: Submission) -> SmtpReply:
        config = self._config()
        route = submission.route
        auth = config.auth_objects[route.auth_object]
        timing = _Timing(self._monotonic())
        client_request_id = str(uuid.uuid4())
        fields = {
            "queue_id": submission.queue_id,
            "message_id": submission.message.message_id,
            "client": submission.client,
            "client_ip": submission.client_ip,
            "mail_from": submission.mail_from,
            "recipients": len(submission.recipients),
            "route": route.name,
            "auth_object": route.auth_object,
            "mailbox": route.mailbox,
            "size": len(submission.message.mime),
            "client_request_id": client_request_id,
        }
        if base64_size(len(submission.message.mime)) > GRAPH_MAX_REQUEST_BYTES:
            reply = SmtpReply(
                552, "5.3.4", "Message too large for one Microsoft Graph request (4 MB)"
            )
            log.warning(
                "rejected %s: too large for Graph",
                submission.queue_id,
                extra={"event": "rejected", **fields, "reply": str(reply)},
            )
            return reply
        try:
            async with (
                asyncio.timeout(config.delivery.inline_timeout),
                self._slots.hold(route.auth_object, route.mailbox),
            ):
                outcome = await self._graph.send_mime(
                    auth,
                    route.auth_object,
                    route.mailbox,
                    submission.message.mime,
                    client_request_id=client_request_id,
                )
        except TimeoutError:
            reply = SmtpReply(
                451, "4.4.2", "Microsoft 365 did not answer in time, please try again later"
            )
            log.warning(
                "deferred %s: no answer from Graph within %ss",
                submission.queue_id,
                config.delivery.inline_timeout,
                extra={
                    "event": "deferred",
                    **fields,
                    "reply": str(reply),
                    "duration_ms": timing.ms(self._monotonic()),
                },
            )
            return reply
        except DeliveryError as failure:
            return self._failed(submission, failure, fields, timing)
        reply = SmtpReply(250, "2.0.0", f"Ok: delivered {submission.queue_id}")
        log.info(
            "delivered %s from=<%s> rcpts=%d route=%s mailbox=%s graph=%s request_id=%s",
            submission.queue_id,
            submission.mail_from,
            len(submission.recipients),
            route.name,
            route.mailbox,
            outcome.status,
            outcome.request_id,
            extra={
                "event": "delivered",
                **fields,
                "graph_status": outcome.status,
                "request_id": outcome.request_id,
                "duration_ms": timing.ms(self._monotonic()),
            },
        )
        return reply

    def _failed(
        self,
        submission: Submission,
        failure: DeliveryError,
        fields: dict[str, object],
        timing: _Timing,
    ) -> SmtpReply:
        permanent = isinstance(failure, PermanentDeliveryError)
        alert = isinstance(failure, TransientDeliveryError) and failure.alert
        event = "failed" if permanent else "deferred"
        level = logging.ERROR if alert else logging.WARNING
        log.log(
            level,
            "%s %s: %s",
            event,
            submission.queue_id,
            failure.describe(),
            extra={
                "event": event,
                **fields,
                "graph_status": failure.http_status,
                "graph_code": failure.code,
                "request_id": failure.request_id,
                "remedy": failure.remedy,
                "reply": str(failure.reply),
                "duration_ms": timing.ms(self._monotonic()),
            },
        )
        return failure.reply
