# Why this module exists: the relay's large-message path (relay.large) needs the Graph endpoints
# behind "create a draft from MIME, attach big files through upload sessions, send the draft",
# validated as Graph validates them, so that the path is tested against wire-level rules rather
# than against our own assumptions. Like `graph`, this is the I/O shell; `assemble` is pure.
"""A stand-in for Graph drafts: create from MIME, upload sessions, send, delete."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from email.message import Message
from email.policy import compat32

from aiohttp import web

from .backend import REQUEST_ID, Backend
from .directory import Mailbox
from .graph import GraphService, fault_error, read_limited
from .messages import GraphError, check_mime, decode_mime_body
from .recorder import MailDir, ReceivedMail, UploadedAttachment
from .throttle import App, message_id_of

__all__ = ["MAX_UPLOAD_BYTES", "MIN_UPLOAD_BYTES", "UPLOAD_CHUNK_MULTIPLE", "DraftService"]

# attachment-createuploadsession.md: upload sessions are for files "between 3 MB and 150 MB".
MIN_UPLOAD_BYTES = 3 * 1024 * 1024
MAX_UPLOAD_BYTES = 150 * 1024 * 1024
# Each PUT carries under 4 MB (outlook-large-attachments.md). The sandbox is stricter than the
# Outlook page and applies OneDrive's rule to every chunk but the last: a multiple of 320 KiB.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
UPLOAD_CHUNK_MULTIPLE = 320 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_SESSION_LIFETIME = datetime.timedelta(hours=1)


@dataclass(slots=True)
class _Draft:
    id: str
    app: App  # the app that created it; its upload PUTs count against that app's limits
    mailbox: Mailbox
    mime: bytes
    attachments: list[tuple[UploadedAttachment, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class _Session:
    draft: _Draft
    name: str
    content_type: str
    content_id: str | None
    is_inline: bool
    size: int
    expires: str
    data: bytearray = field(default_factory=bytearray)


class DraftService:
    """aiohttp handlers for drafts and their upload sessions; shares state with GraphService."""

    def __init__(self, backend: Backend, graph: GraphService, mail_dir: MailDir | None) -> None:
        self._backend = backend
        self._graph = graph
        self._mail_dir = mail_dir
        self.drafts: dict[str, _Draft] = {}
        self._sessions: dict[str, _Session] = {}

    def routes(self) -> list[web.RouteDef]:
        users = "/{version:v1.0|beta}/users/{user}/messages"
        return [
            web.post(users, self.create),
            web.delete(users + "/{id}", self.delete),
            web.post(users + "/{id}/attachments/createUploadSession", self.create_session),
            web.post(users + "/{id}/send", self.send),
            web.put("/upload/{token}", self.put_chunk),
            web.delete("/upload/{token}", self.cancel_session),
        ]

    def expire_sessions(self) -> None:
        """Every open upload session is gone: its PUTs answer 404."""
        self._sessions.clear()

    # -- Graph endpoints (bearer token) --------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        """POST /users/{id}/messages with base64 MIME (user-post-messages.md) -> 201 draft."""
        self._backend.journal.graph_requests += 1
        try:
            body = await read_limited(request)
            claims, mailbox = self._graph.admit(request, "Mail.ReadWrite")
            if request.content_type != "text/plain":
                raise GraphError(
                    415, "UnsupportedMediaType", "The sandbox creates drafts from MIME only."
                )
            app = (claims.tenant_id, claims.client_id)
            draft = _Draft(secrets.token_urlsafe(24) + "=", app, mailbox, decode_mime_body(body))
        except GraphError as exc:
            return await self._graph.answer(request, self._graph.error_response(request, exc))
        self.drafts[draft.id] = draft
        document = {"id": draft.id, "isDraft": True, "hasAttachments": False}
        return await self._graph.answer(request, web.json_response(document, status=201))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self._backend.journal.graph_requests += 1
        try:
            await read_limited(request)
            draft = self._draft(request, "Mail.ReadWrite")
        except GraphError as exc:
            return await self._graph.answer(request, self._graph.error_response(request, exc))
        del self.drafts[draft.id]
        return await self._graph.answer(request, web.Response(status=204))

    async def create_session(self, request: web.Request) -> web.StreamResponse:
        """attachment-createuploadsession.md: AttachmentItem in, uploadSession (201) out."""
        self._backend.journal.graph_requests += 1
        try:
            body = await read_limited(request)
            draft = self._draft(request, "Mail.ReadWrite")
            session = self._new_session(draft, body)
        except GraphError as exc:
            return await self._graph.answer(request, self._graph.error_response(request, exc))
        token = secrets.token_urlsafe(32)
        self._sessions[token] = session
        document = {
            "uploadUrl": f"{request.scheme}://{request.host}/upload/{token}",
            "expirationDateTime": session.expires,
            "nextExpectedRanges": ["0-"],
        }
        return await self._graph.answer(request, web.json_response(document, status=201))

    async def send(self, request: web.Request) -> web.StreamResponse:
        """message-send.md: POST .../messages/{id}/send -> 202; the draft leaves Drafts."""
        self._backend.journal.graph_requests += 1
        try:
            await read_limited(request)
            draft = self._draft(request, "Mail.Send")
            fault = self._backend.faults.take_graph_fault(draft.mailbox.address)
            if fault is not None and fault.status:
                raise fault_error(fault)
            submission = check_mime(draft.mime, draft.mailbox)
            refused = self._backend.throttle.admit_message(
                draft.mailbox.address, len(submission.recipients)
            )
        except GraphError as exc:
            return await self._graph.answer(request, self._graph.error_response(request, exc))
        del self.drafts[draft.id]
        if refused is not None:  # Exchange accepts the send, then delivers an NDR instead
            message_id = message_id_of(draft.mime, None)
            await self._backend.throttle.refuse_later(
                draft.mailbox.address, refused, message_id, submission.subject
            )
            return await self._graph.answer(request, web.Response(status=202))
        mail = ReceivedMail(
            mailbox=draft.mailbox.address,
            request_id=request[REQUEST_ID],
            kind="mime",
            mime=assemble(draft.mime, draft.attachments),
            json_body=None,
            recipients=submission.recipients,
            from_address=submission.from_address,
            save_to_sent_items=True,
            received_at=self._backend.clock(),
            subject=submission.subject,
            client_request_id=request.headers.get("client-request-id"),
            attachments=tuple(item for item, _ in draft.attachments),
            via_draft=True,
        )
        if self._mail_dir is not None:
            await self._mail_dir.add(mail)
        self._backend.journal.received.append(mail)
        return await self._graph.answer(request, web.Response(status=202))

    # -- the pre-authenticated upload URL ------------------------------------------------

    async def put_chunk(self, request: web.Request) -> web.StreamResponse:
        """PUT a byte range (outlook-large-attachments.md): in order, under 4 MB, no
        Authorization header; 200 + nextExpectedRanges, then 201 + Location at the end."""
        journal = self._backend.journal
        journal.upload_requests += 1
        try:
            chunk = await _read_chunk(request)
            session = self._session(request)
            self._admit_upload(session, len(chunk))
            fault = self._backend.faults.take_upload_fault()
            if fault is not None:
                raise GraphError(fault[0], "ServiceUnavailable", "Injected.", retry_after=fault[1])
            start, end, total = _content_range(request.headers.get("Content-Range", ""))
            received = len(session.data)
            if start != received:
                return await self._upload_answer(
                    request, _ranges(session, received, status=416, code="InvalidRange")
                )
            _check_chunk(session, start, end, total, len(chunk))
        except GraphError as exc:
            return await self._upload_answer(request, self._graph.error_response(request, exc))
        session.data += chunk
        if len(session.data) < session.size:
            return await self._upload_answer(request, _ranges(session, len(session.data)))
        token = request.match_info["token"]
        del self._sessions[token]
        data = bytes(session.data)
        item = UploadedAttachment(
            name=session.name,
            content_type=session.content_type,
            content_id=session.content_id,
            is_inline=session.is_inline,
            size=session.size,
            sha256=hashlib.sha256(data).hexdigest(),
        )
        session.draft.attachments.append((item, data))
        attachment_id = f"{session.draft.id}{len(session.draft.attachments)}"
        location = (
            f"{request.scheme}://{request.host}/v1.0/users/{session.draft.mailbox.address}"
            f"/messages/{session.draft.id}/attachments/{attachment_id}"
        )
        return await self._upload_answer(
            request, web.Response(status=201, headers={"Location": location})
        )

    async def cancel_session(self, request: web.Request) -> web.StreamResponse:
        self._backend.journal.upload_requests += 1
        try:
            self._admit_upload(self._session(request), 0)
        except GraphError as exc:
            return await self._upload_answer(request, self._graph.error_response(request, exc))
        del self._sessions[request.match_info["token"]]
        return await self._upload_answer(request, web.Response(status=204))

    # -- helpers -------------------------------------------------------------------------

    async def _upload_answer(
        self, request: web.Request, response: web.StreamResponse
    ) -> web.StreamResponse:
        self._backend.journal.upload_statuses[response.status] += 1
        await self._backend.journal.notify()
        return response

    def _admit_upload(self, session: _Session, size: int) -> None:
        """Upload URLs carry no token: count the request (and the bytes received) against
        the app and mailbox of the draft they belong to."""
        throttle, draft = self._backend.throttle, session.draft
        throttle.admit_request(draft.app, draft.mailbox.address)
        if size:
            throttle.admit_upload(draft.app, draft.mailbox.address, size)

    def _draft(self, request: web.Request, role: str) -> _Draft:
        _, mailbox = self._graph.admit(request, role)
        draft = self.drafts.get(request.match_info["id"])
        if draft is None or draft.mailbox.address != mailbox.address:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return draft

    def _session(self, request: web.Request) -> _Session:
        if "Authorization" in request.headers:
            # The uploadUrl is pre-authenticated; "Do not specify an Authorization request
            # header" (outlook-large-attachments.md); OneDrive's page: it "may result in 401".
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "The upload URL is pre-authenticated; do not send an Authorization header.",
            )
        session = self._sessions.get(request.match_info["token"])
        if session is None or session.draft.id not in self.drafts:
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found.")
        return session

    def _new_session(self, draft: _Draft, body: bytes) -> _Session:
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GraphError(400, "BadRequest", "Unable to read JSON request payload.") from exc
        item = None
        if isinstance(document, dict):
            item = next((v for k, v in document.items() if k.lower() == "attachmentitem"), None)
        if not isinstance(item, dict):
            raise GraphError(
                400, "ErrorInvalidParameter", "The parameter 'AttachmentItem' is required."
            )
        kind, name, size = item.get("attachmentType"), item.get("name"), item.get("size")
        if not isinstance(kind, str) or kind.lower() != "file":
            raise GraphError(400, "ErrorInvalidParameter", "attachmentType must be 'file'.")
        if not isinstance(name, str) or not name:
            raise GraphError(400, "ErrorInvalidParameter", "The attachment name is required.")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise GraphError(400, "ErrorInvalidParameter", "The attachment size is required.")
        if size < MIN_UPLOAD_BYTES:
            raise GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size must be greater than the minimum size.",
            )
        if size > MAX_UPLOAD_BYTES:
            raise GraphError(
                400, "ErrorMessageSizeExceeded", "The attachment exceeds the maximum size."
            )
        content_type = item.get("contentType")
        content_id = item.get("contentId")
        expires = datetime.datetime.fromtimestamp(self._backend.clock(), datetime.UTC)
        return _Session(
            draft=draft,
            name=name,
            content_type=content_type if isinstance(content_type, str) else "",
            content_id=content_id if isinstance(content_id, str) and content_id else None,
            is_inline=item.get("isInline") is True,
            size=size,
            expires=(expires + _SESSION_LIFETIME).strftime("%Y-%m-%dT%H:%M:%S.0000000Z"),
        )


async def _read_chunk(request: web.Request) -> bytes:
    try:
        return await read_limited(request)
    except GraphError as exc:
        raise GraphError(413, "RequestEntityTooLarge", "A chunk must be under 4 MB.") from exc


def _content_range(value: str) -> tuple[int, int, int]:
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise GraphError(400, "InvalidContentRange", "Content-Range must be bytes start-end/total.")
    start, end, total = (int(group) for group in match.groups())
    if end < start:
        raise GraphError(400, "InvalidContentRange", "The range ends before it starts.")
    return start, end, total


def _check_chunk(session: _Session, start: int, end: int, total: int, length: int) -> None:
    if total != session.size:
        raise GraphError(400, "InvalidContentRange", "The total differs from the session's size.")
    if end - start + 1 != length:
        raise GraphError(400, "InvalidContentRange", "Content-Range does not match the body.")
    if end >= session.size:
        raise GraphError(400, "InvalidContentRange", "The range passes the end of the file.")
    if length > MAX_CHUNK_BYTES:
        raise GraphError(413, "RequestEntityTooLarge", "A chunk must be under 4 MB.")
    if end + 1 < session.size and length % UPLOAD_CHUNK_MULTIPLE:
        raise GraphError(
            400, "InvalidChunkSize", "Every chunk but the last must be a multiple of 320 KiB."
        )


def _ranges(
    session: _Session, received: int, *, status: int = 200, code: str | None = None
) -> web.Response:
    document: dict[str, object] = {
        "expirationDateTime": session.expires,
        "nextExpectedRanges": [str(received)],
    }
    if code is not None:
        document["error"] = {"code": code, "message": "Bytes must be uploaded in order."}
    return web.json_response(document, status=status)


def assemble(skeleton: bytes, attachments: list[tuple[UploadedAttachment, bytes]]) -> bytes:
    """The message Exchange would send: the draft's content as the first part of a new
    multipart/mixed, each uploaded file after it (base64, 76-column lines)."""
    if not attachments:
        return skeleton
    cut = skeleton.find(b"\r\n\r\n")
    head, body = (skeleton[: cut + 2], skeleton[cut + 4 :]) if cut >= 0 else (skeleton, b"")
    outer: list[bytes] = []
    inner: list[bytes] = []
    for line in re.split(rb"\r\n(?![ \t])", head.rstrip(b"\r\n")):
        name = line.split(b":", 1)[0].strip().lower()
        if name.startswith(b"content-"):
            inner.append(line)
        elif name != b"mime-version":
            outer.append(line)
    boundary = b"=_sandbox_" + secrets.token_hex(12).encode()
    crlf = b"\r\n"
    out = [*outer, b"MIME-Version: 1.0", b'Content-Type: multipart/mixed; boundary="' + boundary]
    out[-1] += b'"'
    pieces = [crlf.join(out), crlf + crlf, b"--" + boundary + crlf]
    pieces += [crlf.join(inner) + crlf if inner else b"", crlf, body, crlf]
    for item, data in attachments:
        part = Message()
        part.add_header("Content-Type", item.content_type or "application/octet-stream")
        disposition = "inline" if item.is_inline else "attachment"
        part.add_header("Content-Disposition", disposition, filename=item.name)
        if item.content_id:
            part["Content-ID"] = f"<{item.content_id}>"
        part["Content-Transfer-Encoding"] = "base64"
        header = part.as_bytes(policy=compat32.clone(linesep="\r\n"))
        pieces += [b"--" + boundary + crlf, header]
        pieces.append(base64.encodebytes(data).replace(b"\n", crlf))
    pieces.append(b"--" + boundary + b"--" + crlf)
    return b"".join(pieces)
