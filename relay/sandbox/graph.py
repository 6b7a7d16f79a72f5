# Why this module exists: the relay's Graph client (DESIGN §2 graph.py) and its error mapping
# (DESIGN §5 table) must be tested against something that answers like Graph: bearer token,
# Mail.Send role, mailbox existence and licence, the 4 MB request limit, MailboxConcurrency,
# then the body checks of `messages` and the sending limits of `throttle`. This is the I/O
# shell around those checks: it reads the request, keeps the concurrency bookkeeping, injects
# faults and records what it accepted.
"""A stand-in for Microsoft Graph `POST /users/{id}/sendMail`."""

from __future__ import annotations

import asyncio
import datetime

from aiohttp import web

from .access_tokens import GRAPH_APP_ID, InvalidTokenError, TokenClaims
from .backend import REQUEST_ID, Backend
from .directory import Mailbox
from .faults import ABORT, GraphFault
from .messages import GraphError, Submission, parse_json_submission, parse_mime_submission
from .recorder import MailDir, ReceivedMail
from .throttle import message_id_of

__all__ = ["MAILBOX_CONCURRENCY", "MAX_REQUEST_BYTES", "GraphService", "read_limited"]

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # Graph's per-request body limit
MAILBOX_CONCURRENCY = 4  # the default of SandboxLimits.concurrent_requests (throttling-limits.md)
_DEFAULT_CODES = {
    400: ("BadRequest", "The request is malformed or incorrect."),
    401: ("InvalidAuthenticationToken", "Access token validation failure."),
    403: ("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
    404: ("ErrorItemNotFound", "The specified object was not found in the store."),
    429: ("TooManyRequests", "Too many requests. Retry after the time in Retry-After."),
    500: ("InternalServerError", "An internal server error occurred."),
    502: ("BadGateway", "The gateway received an invalid response."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable. Retry later."),
    504: ("GatewayTimeout", "The gateway timed out waiting for the service."),
}


class GraphService:
    """aiohttp handler for sendMail plus Graph-style error rendering."""

    def __init__(self, backend: Backend, mail_dir: MailDir | None) -> None:
        self._backend = backend
        self._mail_dir = mail_dir
        self._app_in_flight: dict[tuple[str, str, str], int] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/{version:v1.0|beta}/users/{user}/sendMail", self.send_mail),
            web.post("/{version:v1.0|beta}/me/sendMail", self.send_mail_me),
        ]

    async def send_mail_me(self, request: web.Request) -> web.StreamResponse:
        self._backend.journal.graph_requests += 1
        try:
            await read_limited(request)
            self._authenticate(request)
            raise GraphError(
                400, "BadRequest", "/me request is only valid with delegated authentication flow."
            )
        except GraphError as exc:
            return await self._answer(request, self.error_response(request, exc))

    async def send_mail(self, request: web.Request) -> web.StreamResponse:
        self._backend.journal.graph_requests += 1
        try:
            body = await read_limited(request)
            claims, mailbox = self.admit(request)
            slot = (claims.tenant_id, claims.client_id, mailbox.address)
            throttle = self._backend.throttle
            if self._app_in_flight.get(slot, 0) >= throttle.limits.concurrent_requests:
                raise throttle.concurrency_error()
        except GraphError as exc:
            return await self._answer(request, self.error_response(request, exc))
        self._app_in_flight[slot] = self._app_in_flight.get(slot, 0) + 1
        self._backend.journal.enter(mailbox.address)
        await self._backend.journal.notify()
        try:
            response = await self._accepted_request(request, body, mailbox)
        finally:
            self._app_in_flight[slot] -= 1
            if not self._app_in_flight[slot]:
                del self._app_in_flight[slot]
            self._backend.journal.leave(mailbox.address)
        return await self._answer(request, response)

    async def _accepted_request(
        self, request: web.Request, body: bytes, mailbox: Mailbox
    ) -> web.StreamResponse | None:
        """Everything after admission: hold, latency, scripted faults, validation, recording.
        None means the connection was aborted on purpose."""
        await self._backend.faults.wait_released()
        if self._backend.faults.latency:
            await asyncio.sleep(self._backend.faults.latency)
        fault = self._backend.faults.take_graph_fault(mailbox.address)
        if fault is not None:
            if fault.status == ABORT:
                if request.transport is not None:
                    request.transport.abort()
                return None
            return self.error_response(request, fault_error(fault))
        try:
            submission = self._parse(request, body, mailbox)
            refused = self._backend.throttle.admit_message(
                mailbox.address, len(submission.recipients)
            )
        except GraphError as exc:
            return self.error_response(request, exc)
        if refused is not None:
            message_id = message_id_of(submission.mime, submission.json_body)
            await self._backend.throttle.refuse_later(
                mailbox.address, refused, message_id, submission.subject
            )
            return web.Response(status=202)  # Exchange accepts, then sends an NDR instead
        mail = ReceivedMail(
            mailbox=mailbox.address,
            request_id=request[REQUEST_ID],
            kind=submission.kind,
            mime=submission.mime,
            json_body=submission.json_body,
            recipients=submission.recipients,
            from_address=submission.from_address,
            save_to_sent_items=submission.save_to_sent_items,
            received_at=self._backend.clock(),
            subject=submission.subject,
            client_request_id=request.headers.get("client-request-id"),
        )
        if self._mail_dir is not None:
            await self._mail_dir.add(mail)
        self._backend.journal.received.append(mail)
        return web.Response(status=202)

    async def _answer(
        self, request: web.Request, response: web.StreamResponse | None
    ) -> web.StreamResponse:
        if response is None:
            self._backend.journal.graph_statuses[ABORT] += 1
            await self._backend.journal.notify()
            # The transport is gone; aiohttp discards whatever is returned for it.
            return web.Response(status=500)
        self._backend.journal.graph_statuses[response.status] += 1
        await self._backend.journal.notify()
        return response

    def admit(self, request: web.Request, role: str = "Mail.Send") -> tuple[TokenClaims, Mailbox]:
        """Authenticate, find the mailbox, and count the request against the app's request
        limit on it (429 past it); every authenticated request on a mailbox goes through here."""
        claims = self._authenticate(request, role)
        mailbox = self._mailbox(request.match_info["user"])
        self._backend.throttle.admit_request((claims.tenant_id, claims.client_id), mailbox.address)
        return claims, mailbox

    def authenticate(self, request: web.Request, role: str = "Mail.Send") -> TokenClaims:
        """The valid bearer token's claims, if its app holds the application `role`."""
        return self._authenticate(request, role)

    def mailbox(self, user: str) -> Mailbox:
        return self._mailbox(user)

    async def answer(
        self, request: web.Request, response: web.StreamResponse | None
    ) -> web.StreamResponse:
        return await self._answer(request, response)

    def _authenticate(self, request: web.Request, role: str = "Mail.Send") -> TokenClaims:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        try:
            claims = self._backend.tokens.validate(token.strip(), self._backend.resources())
        except InvalidTokenError as exc:
            raise GraphError(401, "InvalidAuthenticationToken", str(exc)) from exc
        if role not in claims.roles:
            raise GraphError(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        return claims

    def _mailbox(self, user: str) -> Mailbox:
        mailbox = self._backend.directory.find_mailbox(user)
        if mailbox is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        if not mailbox.licensed:
            raise GraphError(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            )
        return mailbox

    @staticmethod
    def _parse(request: web.Request, body: bytes, mailbox: Mailbox) -> Submission:
        if request.content_type == "text/plain":
            return parse_mime_submission(body, mailbox)
        if request.content_type == "application/json":
            return parse_json_submission(body, mailbox)
        raise GraphError(
            415,
            "UnsupportedMediaType",
            f"Content-Type '{request.content_type}' is not supported: use application/json for "
            "a message resource or text/plain for base64 MIME.",
        )

    def error_response(self, request: web.Request, exc: GraphError) -> web.Response:
        """Graph's error JSON, with innerError carrying the date and request ids."""
        when = datetime.datetime.fromtimestamp(self._backend.clock(), datetime.UTC)
        request_id = request[REQUEST_ID]
        inner = {
            "date": when.strftime("%Y-%m-%dT%H:%M:%S"),
            "request-id": request_id,
            "client-request-id": request.headers.get("client-request-id", request_id),
        }
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = exc.retry_after
        if exc.status == 401:
            headers["WWW-Authenticate"] = (
                f'Bearer realm="", authorization_uri="{request.scheme}://{request.host}'
                f'/common/oauth2/authorize", client_id="{GRAPH_APP_ID}"'
            )
        payload = {"error": {"code": exc.code, "message": exc.message, "innerError": inner}}
        return web.json_response(payload, status=exc.status, headers=headers)


def fault_error(fault: GraphFault) -> GraphError:
    default_code, default_message = _DEFAULT_CODES.get(
        fault.status, ("UnknownError", "An error was injected by the sandbox.")
    )
    return GraphError(
        fault.status,
        fault.code or default_code,
        fault.message or default_message,
        retry_after=fault.retry_after,
    )


async def read_limited(request: web.Request) -> bytes:
    """The request body, or 413 once it passes MAX_REQUEST_BYTES. An oversized body is still
    drained so the client sees the answer instead of a reset while it is sending."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size <= MAX_REQUEST_BYTES:
            chunks.append(chunk)
    if size > MAX_REQUEST_BYTES:
        raise GraphError(
            413,
            "RequestEntityTooLarge",
            f"The request body is {size} bytes; the maximum request length supported is 4MB.",
        )
    return b"".join(chunks)
