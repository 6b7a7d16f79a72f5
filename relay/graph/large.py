"""Send a message past Graph's 4 MB request limit: draft, upload sessions, send (DESIGN §7).

Why this module exists: a message over the limit takes four kinds of Graph requests instead of
one, with a chunk loop and a clean-up rule, and this sequence deserves its own module. It talks
to Graph only through `GraphCalls` (implemented by `relay.graph.client.GraphClient`; the
client imports this module, never the other way round), which converts
aiohttp exceptions and maps answers, so nothing here knows about HTTP libraries.

Graph facts (microsoftgraph/microsoft-graph-docs-contrib):
- api-reference/v1.0/api/user-post-messages.md: `POST /users/{id}/messages` with
  `Content-Type: text/plain` and base64 MIME creates a draft: `201 Created` + the message.
- attachment-createuploadsession.md: `POST .../messages/{id}/attachments/createUploadSession`
  with `{"AttachmentItem": {attachmentType, name, size, contentType, isInline, contentId}}` ->
  `201` + `uploadUrl`; only for files of 3 MB to 150 MB; needs Mail.ReadWrite.
- concepts/outlook-large-attachments.md: PUT byte ranges in order to `uploadUrl` (pre-
  authenticated: no Authorization header), `Content-Range: bytes {start}-{end}/{total}`, each
  under 4 MB; `200` + `nextExpectedRanges: ["{start}"]` until the last, which answers `201`.
  (The 320 KiB multiple is the OneDrive rule for the same kind of session; we keep to it.)
- message-send.md: `POST .../messages/{id}/send` -> `202 Accepted`.

Theory of the clean-up: once the draft exists, any failure (or cancellation) deletes it, best
effort, so a retried message does not leave a trail of drafts in the mailbox. The draft is
deleted by a task of its own when the attempt is cancelled, since a cancelled task cannot await.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import quote

from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)
from relay.core.limits import GRAPH_MAX_REQUEST_BYTES, base64_size
from relay.core.message.split import BigAttachment, split_message
from relay.core.values import SendTarget

__all__ = [
    "CHUNK_SIZE",
    "CHUNK_TRIES",
    "MAX_ATTACHMENT",
    "GraphCalls",
    "send_large",
]

_LOG = logging.getLogger("relay.graph")

MAX_ATTACHMENT = 150 * 1024 * 1024  # attachment-createuploadsession.md: "between 3 MB and 150 MB"
CHUNK_SIZE = 10 * 320 * 1024  # 3,200 KiB: a multiple of 320 KiB, under 4 MB
CHUNK_TRIES = 4  # sends of one chunk before the whole attempt is given up (transient)
_MAX_CHUNK_PAUSE = 30.0
_SESSION_GONE = frozenset({401, 403, 404, 410})


class GraphCalls(Protocol):
    """The Graph primitives this module needs (relay.graph.client.GraphClient has them)."""

    # GraphClient.graph_request's signature, compact: one parameter a line would repeat its ten
    # lines here verbatim, the duplication #10 removes.
    async def graph_request(
        self, target: SendTarget, method: str, path: str, *, body: bytes | None, expect: int,
        step: str, content_type: str | None = "text/plain",
    ) -> tuple[Mapping[str, str], bytes]: ...  # fmt: skip

    async def upload_chunk(
        self, target: SendTarget, upload_url: str, chunk: bytes, *, start: int, total: int
    ) -> tuple[int, Mapping[str, str], bytes]: ...

    def map_error(
        self, status: int, headers: Mapping[str, str], payload: bytes, *, step: str
    ) -> DeliveryError: ...


def _too_large(what: str) -> PermanentDeliveryError:
    return PermanentDeliveryError(
        f"message cannot be sent through Graph: {what}",
        reply=SmtpReply(552, "5.3.4", f"Message too large for Microsoft 365: {what}"),
        code="MessageTooLarge",
        remedy="the sender must send the message smaller or split the attachments",
    )


def _session_ended(status: int, failure: DeliveryError) -> TransientDeliveryError:
    return TransientDeliveryError(
        f"upload session ended (HTTP {status}): {failure.message}",
        reply=SmtpReply(451, "4.4.2", "Microsoft 365 ended an upload, try again later"),
        code=failure.code,
        http_status=status,
        request_id=failure.request_id,
        remedy="temporary: the whole message is uploaded again on the next attempt",
    )


def _json(payload: bytes, step: str) -> dict[str, Any]:
    try:
        document = json.loads(payload)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise TransientDeliveryError(
            f"Graph's answer to {step} is not a JSON object",
            remedy="Graph answered unexpectedly; the message is tried again later",
        )
    return document


def _next_expected(payload: bytes) -> int | None:
    """The start of `nextExpectedRanges` ("{start}" or "{start}-{end}"), if the body has one."""
    try:
        ranges = json.loads(payload).get("nextExpectedRanges")
        return int(str(ranges[0]).split("-", 1)[0])
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        return None


class _Upload:
    """One message's journey; `draft` is set once Graph created the draft."""

    def __init__(
        self,
        graph: GraphCalls,
        target: SendTarget,
        sleep: Callable[[float], Awaitable[None]],
        retry_delay: float,
    ) -> None:
        self.graph, self.target = graph, target
        self.sleep, self.retry_delay = sleep, retry_delay
        self.user = f"/users/{quote(target.mailbox, safe='@')}"
        self.draft: str | None = None

    async def call(
        self, method: str, path: str, body: bytes | None, expect: int, step: str, kind: str | None
    ) -> tuple[Mapping[str, str], bytes]:
        return await self.graph.graph_request(
            self.target,
            method,
            self.user + path,
            body=body,
            expect=expect,
            step=step,
            content_type=kind,
        )

    async def create_draft(self, skeleton: bytes) -> None:
        body = base64.b64encode(skeleton)
        _, payload = await self.call("POST", "/messages", body, 201, "draft", "text/plain")
        draft = _json(payload, "draft").get("id")
        if not isinstance(draft, str) or not draft:
            raise TransientDeliveryError("Graph created a draft without an id")
        self.draft = quote(draft, safe="=-_")

    async def attach(self, source: bytes, attachment: BigAttachment) -> None:
        item: dict[str, object] = {
            "attachmentType": "file",
            "name": attachment.name,
            "size": attachment.size,
            "contentType": attachment.content_type,
            "isInline": attachment.is_inline,
        }
        if attachment.content_id:
            item["contentId"] = attachment.content_id
        body = json.dumps({"AttachmentItem": item}).encode()
        path = f"/messages/{self.draft}/attachments/createUploadSession"
        _, payload = await self.call("POST", path, body, 201, "uploadSession", "application/json")
        url = _json(payload, "createUploadSession").get("uploadUrl")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise TransientDeliveryError("Graph created an upload session without an https URL")
        await self.upload(url, source, attachment)

    async def upload(self, url: str, source: bytes, attachment: BigAttachment) -> None:
        """PUT the decoded bytes in order; resume where the session says after a failure."""
        offset = 0
        stream: Iterator[bytes] = attachment.chunks(source, CHUNK_SIZE)
        chunk = await asyncio.to_thread(next, stream, b"")
        failures = 0
        while True:
            try:
                status, headers, payload = await self.graph.upload_chunk(
                    self.target, url, chunk, start=offset, total=attachment.size
                )
            except TransientDeliveryError:
                failures += 1
                if failures >= CHUNK_TRIES:
                    raise
                await self.sleep(self.retry_delay * failures)
                continue
            if status == 201:
                return
            resume = _next_expected(payload)
            if status == 200 or (status == 416 and resume is not None):
                if status == 200:
                    failures = 0
                target = offset + len(chunk) if resume is None else resume
                if not 0 <= target < attachment.size:
                    raise TransientDeliveryError(
                        f"upload session expects byte {target} of {attachment.size}"
                    )
                if target != offset + len(chunk):  # the session kept less (or more): seek
                    stream = attachment.chunks(source, CHUNK_SIZE, skip=target)
                offset = target
                chunk = await asyncio.to_thread(next, stream, b"")
                continue
            failure = self.graph.map_error(status, headers, payload, step="upload")
            if status in _SESSION_GONE:
                raise _session_ended(status, failure)
            failures += 1
            if not isinstance(failure, TransientDeliveryError) or failures >= CHUNK_TRIES:
                raise failure
            pause = failure.retry_after
            if pause is None:
                pause = self.retry_delay * failures
            await self.sleep(min(pause, _MAX_CHUNK_PAUSE))

    async def send(self) -> str | None:
        path = f"/messages/{self.draft}/send"
        headers, _ = await self.call("POST", path, None, 202, "send", None)
        return headers.get("request-id")

    async def delete_draft(self) -> None:
        """Best effort: a draft left behind is an annoyance, not a lost message."""
        try:
            await self.call("DELETE", f"/messages/{self.draft}", None, 204, "deleteDraft", None)
        except DeliveryError as failure:
            _LOG.warning(
                "could not delete the draft of a failed large message mailbox=%s %s",
                self.target.mailbox,
                failure.describe(),
            )


async def send_large(
    graph: GraphCalls,
    target: SendTarget,
    mime: bytes,
    *,
    background: set[asyncio.Task[None]],
    retry_delay: float = 1.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> str | None:
    """Send `mime` as `target.mailbox` through a draft and upload sessions; the send's request-id.

    Raises a DeliveryError like `GraphClient.send_mime`; a message that cannot fit even this
    way (skeleton over 4 MB, an attachment over 150 MB) is a permanent 552 5.3.4. When the
    attempt is cancelled, the draft is deleted by a task kept in `background` until it ends.
    """
    parts = await asyncio.to_thread(split_message, mime)
    if base64_size(len(parts.skeleton)) > GRAPH_MAX_REQUEST_BYTES:
        raise _too_large("the text and small attachments exceed 4 MB")
    if any(a.size > MAX_ATTACHMENT for a in parts.attachments):
        raise _too_large("an attachment exceeds 150 MB")
    upload = _Upload(graph, target, sleep, retry_delay)
    await upload.create_draft(parts.skeleton)
    try:
        for attachment in parts.attachments:
            await upload.attach(mime, attachment)
        return await upload.send()
    except asyncio.CancelledError:
        task = asyncio.create_task(upload.delete_draft())
        background.add(task)
        task.add_done_callback(background.discard)
        raise
    except BaseException:
        await upload.delete_draft()
        raise
