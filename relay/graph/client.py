"""The Microsoft Graph client: send a message as MIME with `POST /users/{mailbox}/sendMail`,
or, past Graph's 4 MB request limit, as a draft plus upload sessions (`relay.large`).

Why this module exists: it is the relay's only HTTP conversation with Graph, and the place where
Graph's answers (and the network's failures) become the relay's own decisions, once:

- `error_from_response(status, headers, body)` is the pure mapping of DESIGN §5's table from an
  HTTP answer to `TransientDeliveryError` / `PermanentDeliveryError`, carrying the HTTP status,
  Graph's error code and message, the `request-id` and a remedy for the log;
- aiohttp and TLS exceptions are converted at the one place they can occur (`_request`), so nobody
  above this module ever sees an aiohttp exception.

Graph facts this module relies on (microsoftgraph/microsoft-graph-docs-contrib):
- api-reference/v1.0/api/user-sendmail.md: MIME goes as a base64 string in the body with
  `Content-Type: text/plain`; success is `202 Accepted` with an empty body; malformed MIME is
  `400 ErrorMimeContentInvalidBase64String`. The example wraps the base64 at 76 columns; one
  unbroken line is equally a base64 string and is what we send.
- concepts/errors.md: errors are `{"error": {"code", "message", "innerError": {"request-id",
  "date"}}}`, inner errors may nest and carry more specific codes (spelled `innerError` in the
  example, `innererror` in the schema; both are read).
- concepts/throttling.md: 429 carries `Retry-After`; waiting that long is the fastest recovery.
- concepts/outlook-large-attachments.md: the `uploadUrl` of an upload session is pre-authenticated;
  "Do not specify an Authorization request header" on its PUTs.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from relay.config.schema import AuthObjectConfig
from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)
from relay.graph.large import send_large
from relay.graph.transport import proxy_for, ssl_context_for

__all__ = [
    "GraphClient",
    "GraphError",
    "SendResult",
    "TokenSource",
    "error_from_network",
    "error_from_response",
    "parse_graph_error",
    "parse_retry_after",
]

_LOG = logging.getLogger("relay.graph")
_MESSAGE_LIMIT = 300
_ERROR_BODY_LIMIT = 64 * 1024
_SAFE_TOKEN = re.compile(r"[^A-Za-z0-9._:-]")
_TAG = re.compile(r"<[^>]*>")

# Graph's 400 codes for a message it cannot parse (user-sendmail.md and observed answers).
MIME_ERROR_CODES = frozenset(
    {
        "ErrorMimeContentInvalid",
        "ErrorMimeContentInvalidBase64String",
        "InvalidInternetMessageHeader",
        "ErrorInvalidInternetMessageHeader",
    }
)
# 4xx answers that come from the path (a proxy) or a momentary state, not from the message.
_TRANSIENT_4XX = frozenset({407, 408, 423, 425})

_REMEDY_THROTTLED = (
    "Graph is throttling or unavailable; temporary: the message is sent again later, "
    "not before Retry-After"
)
_REMEDY_401 = (
    "Graph refused a freshly issued token: check that tenant_id is the tenant of the mailboxes, "
    "that the cloud's graph_endpoint matches the authority, and that the app was not deleted"
)
_REMEDY_SEND_AS = (
    "give the mailbox Send As permission for the From address (Exchange admin center > "
    "Recipients > Mailboxes > Delegation), or route this sender to its own mailbox"
)
_REMEDY_ACCESS = (
    "grant the Mail.Send application permission with admin consent (App registrations > API "
    "permissions), and check Exchange application access policies / RBAC for Applications that "
    "scope the app to certain mailboxes"
)
_REMEDY_READ_WRITE = (
    "messages over Graph's 4 MB request limit are sent as a draft plus upload sessions, which "
    "needs the Mail.ReadWrite application permission with admin consent: grant Mail.ReadWrite "
    "or set delivery.large_messages: reject"
)
_REMEDY_NO_MAILBOX = "the mailbox does not exist in this tenant; check the route's mailbox"
_REMEDY_NO_REST = (
    "assign an Exchange Online licence to the mailbox; on-premises or inactive mailboxes cannot "
    "use Graph"
)
_REMEDY_RECIPIENTS = "Graph refused the recipients; check the envelope recipient addresses"
_REMEDY_MIME = "Graph could not parse the message; keep the original .eml and report it"
_REMEDY_SIZE = (
    "the message is larger than Graph accepts (4 MB per request after base64, or the mailbox's "
    "maximum send size); the sender must send it smaller"
)
_REMEDY_OTHER = "Graph refused the request; look up the error code in the Graph documentation"
_REMEDY_NETWORK = (
    "the relay cannot reach Graph: check DNS, the firewall and the proxy (HTTPS_PROXY or the "
    "auth object's proxy)"
)
_REMEDY_TLS = (
    "Graph's certificate is not trusted: if a TLS-inspecting proxy is in the way, put its CA "
    "certificate into the auth object's ca_file"
)


class TokenSource(Protocol):
    """Where GraphClient gets bearer tokens (relay.tokens.TokenProvider in production)."""

    async def get_token(self, name: str, *, stale: str | None = None) -> str: ...


@dataclass(frozen=True, slots=True)
class SendResult:
    """Graph accepted the message (202). `duration` covers the HTTP exchange(s) in seconds."""

    status: int
    request_id: str | None
    duration: float


@dataclass(frozen=True, slots=True)
class GraphError:
    """What a Graph error body says. Every field may be missing from a gateway's HTML page."""

    code: str | None
    message: str
    request_id: str | None
    codes: tuple[str, ...] = ()  # the top-level code first, then nested innerError codes


def _one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe(value: str | None, limit: int = 64) -> str | None:
    """A server-supplied identifier made fit for an SMTP reply line (one short token)."""
    if not value:
        return None
    return _SAFE_TOKEN.sub("", value)[:limit] or None


def _inner(error: Mapping[str, Any]) -> Any:
    for key, value in error.items():
        if key.lower() == "innererror" and isinstance(value, dict):
            return value
    return None


def parse_graph_error(body: bytes) -> GraphError:
    """Read Graph's error JSON; tolerate empty, truncated, non-JSON and HTML bodies."""
    text = body.decode("utf-8", errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return GraphError(code=None, message=_one_line(_TAG.sub(" ", text)), request_id=None)
    codes: list[str] = []
    request_id: str | None = None
    level: Any = error
    while isinstance(level, dict) and len(codes) < 10:
        if isinstance(level.get("code"), str):
            codes.append(level["code"])
        if request_id is None and isinstance(level.get("request-id"), str):
            request_id = level["request-id"]
        level = _inner(level)
    message = error.get("message")
    return GraphError(
        code=codes[0] if codes else None,
        message=_one_line(message if isinstance(message, str) else ""),
        request_id=request_id,
        codes=tuple(codes),
    )


def parse_retry_after(value: str | None, *, now: Callable[[], datetime]) -> float | None:
    """`Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now()).total_seconds())


def _utcnow() -> datetime:
    return datetime.now(UTC)


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    clock: Callable[[], datetime] = _utcnow,
    drafts: bool = False,
) -> DeliveryError:
    """Map one non-202 Graph answer to the relay's error (DESIGN §5). Pure; no I/O.

    `drafts`: the request was a step of the large-message path that needs Mail.ReadWrite
    (create the draft, create an upload session), so a plain 403 names that permission.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    parsed = parse_graph_error(body)
    request_id = lowered.get("request-id") or parsed.request_id
    codes = set(parsed.codes)
    code = parsed.code
    shown = _safe(code) or f"HTTP {status}"
    rid = _safe(request_id)
    suffix = f"; request-id {rid}" if rid else ""
    message = f"Graph answered HTTP {status}" + (f" {code}" if code else "")
    message += f": {parsed.message}" if parsed.message else ""
    common: dict[str, Any] = {"code": code, "http_status": status, "request_id": request_id}

    def permanent(reply_code: int, enhanced: str, what: str, remedy: str) -> DeliveryError:
        reply = SmtpReply(reply_code, enhanced, f"{what} ({shown}{suffix})")
        return PermanentDeliveryError(message, reply=reply, remedy=remedy, **common)

    def transient(enhanced: str, what: str, remedy: str) -> DeliveryError:
        return TransientDeliveryError(
            message,
            reply=SmtpReply(451, enhanced, f"{what} ({shown}{suffix}), try again later"),
            retry_after=parse_retry_after(lowered.get("retry-after"), now=clock),
            remedy=remedy,
            **common,
        )

    if status == 413 or "ErrorMessageSizeExceeded" in codes:
        return permanent(552, "5.3.4", "Message too large for Microsoft 365", _REMEDY_SIZE)
    if status == 429 or status >= 500:
        return transient("4.4.2", "Microsoft 365 is busy or unavailable", _REMEDY_THROTTLED)
    if status == 401:
        return transient("4.7.0", "Microsoft 365 refused the relay's token", _REMEDY_401)
    if status == 403:
        if "ErrorSendAsDenied" in codes:
            return permanent(550, "5.7.1", "Mailbox may not send as this sender", _REMEDY_SEND_AS)
        if drafts:
            what = (
                "Message needs Mail.ReadWrite to be sent in parts: grant Mail.ReadWrite or set "
                "large_messages: reject"
            )
            return permanent(550, "5.7.1", what, _REMEDY_READ_WRITE)
        return permanent(550, "5.7.1", "Microsoft 365 denied access to the mailbox", _REMEDY_ACCESS)
    if status == 404:
        if "MailboxNotEnabledForRESTAPI" in codes:
            return permanent(550, "5.1.1", "Mailbox cannot send through Graph", _REMEDY_NO_REST)
        return permanent(550, "5.1.1", "Mailbox not found in Microsoft 365", _REMEDY_NO_MAILBOX)
    if status == 400:
        if "ErrorInvalidRecipients" in codes:
            return permanent(
                550, "5.1.3", "Microsoft 365 refused the recipients", _REMEDY_RECIPIENTS
            )
        return permanent(554, "5.6.0", "Microsoft 365 could not read the message", _REMEDY_MIME)
    if status in _TRANSIENT_4XX:
        return transient("4.4.2", "Microsoft 365 could not be reached", _REMEDY_NETWORK)
    if 400 <= status < 500:
        return permanent(554, "5.0.0", "Microsoft 365 refused the message", _REMEDY_OTHER)
    # 1xx/2xx/3xx other than 202: nothing says the message was accepted, so do not drop it.
    return transient("4.4.2", "Unexpected answer from Microsoft 365", _REMEDY_OTHER)


def error_from_network(exc: BaseException, *, timeout: float) -> TransientDeliveryError:
    """Map a failure to talk to Graph at all (aiohttp, asyncio, ssl) to a transient error."""
    reply = SmtpReply(451, "4.4.2", "Microsoft 365 could not be reached, try again later")
    detail = _one_line(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):  # incl. ClientConnectorCertificateError
        return TransientDeliveryError(
            f"TLS verification of Graph failed: {detail}",
            reply=reply,
            alert=True,  # does not heal by itself
            remedy=_REMEDY_TLS,
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return TransientDeliveryError(
            f"TLS with Graph failed: {detail}", reply=reply, remedy=_REMEDY_TLS
        )
    if isinstance(exc, TimeoutError):  # asyncio's total timeout and aiohttp's ServerTimeoutError
        return TransientDeliveryError(
            f"Graph did not answer within {timeout:g}s: {detail}",
            reply=reply,
            remedy="Graph or the network is slow; nothing to fix unless it persists",
        )
    return TransientDeliveryError(
        f"cannot reach Graph: {detail}", reply=reply, remedy=_REMEDY_NETWORK
    )


class GraphClient:
    """Sends messages through Graph; one aiohttp session for the whole process."""

    def __init__(
        self,
        tokens: TokenSource,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = tokens
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._clock = clock
        self._monotonic = monotonic
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[Path | None, ssl.SSLContext] = {}
        # Pause before re-sending a failed upload chunk (tests shorten it).
        self.chunk_retry_delay = 1.0
        self._background: set[asyncio.Task[None]] = set()  # drafts deleted after a cancellation

    def reconfigure(self, tokens: TokenSource) -> None:
        """After a config reload: use new token source; rebuild TLS trust from ca_files.

        Requests already running keep what they started with; the session (and its pooled
        connections) stays.
        """
        self._tokens = tokens
        self._contexts = {}

    async def start(self) -> None:
        """Create the session on the running loop (also done on first use)."""
        if self._session is None or self._session.closed:
            # trust_env stays off: with it aiohttp would also turn a ~/.netrc login into auth=
            # and then refuse our Authorization header (ValueError). HTTPS_PROXY / NO_PROXY are
            # applied per request by proxy_for instead, with the same rules as the token client.
            self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send_mime(
        self,
        auth: AuthObjectConfig,
        auth_name: str,
        mailbox: str,
        mime: bytes,
        *,
        client_request_id: str,
    ) -> SendResult:
        """Send `mime` as `mailbox`. 202 -> SendResult; otherwise raise a DeliveryError.

        A 401 is retried once with a fresh token (the refused one passed as `stale`).
        """
        started = self._monotonic()
        headers, _ = await self.graph_request(
            auth,
            auth_name,
            "POST",
            f"/users/{quote(mailbox, safe='@')}/sendMail",
            body=base64.b64encode(mime),  # standard alphabet, no line breaks
            expect=202,
            step="sendMail",
            client_request_id=client_request_id,
            mailbox=mailbox,
        )
        return SendResult(
            status=202, request_id=headers.get("request-id"), duration=self._monotonic() - started
        )

    async def send_large_mime(
        self,
        auth: AuthObjectConfig,
        auth_name: str,
        mailbox: str,
        mime: bytes,
        *,
        client_request_id: str,
    ) -> SendResult:
        """Send a message over the 4 MB request limit: draft, upload sessions, send (relay.large).

        Needs Mail.ReadWrite besides Mail.Send. Raises a DeliveryError like `send_mime`.
        """
        started = self._monotonic()
        request_id = await send_large(
            self,
            auth,
            auth_name,
            mailbox,
            mime,
            client_request_id=client_request_id,
            background=self._background,
            retry_delay=self.chunk_retry_delay,
        )
        return SendResult(status=202, request_id=request_id, duration=self._monotonic() - started)

    async def send_json(
        self,
        auth: AuthObjectConfig,
        auth_name: str,
        mailbox: str,
        message_json: Mapping[str, Any],
        save_to_sent_items: bool,
        *,
        client_request_id: str,
    ) -> SendResult:
        """Send Graph's `message` resource as JSON (user-sendmail.md, application/json).

        `saveToSentItems` is written only when false, as the documentation asks. Answers map to
        errors exactly as for `send_mime`.
        """
        document: dict[str, Any] = {"message": dict(message_json)}
        if not save_to_sent_items:
            document["saveToSentItems"] = False
        started = self._monotonic()
        headers, _ = await self.graph_request(
            auth,
            auth_name,
            "POST",
            f"/users/{quote(mailbox, safe='@')}/sendMail",
            body=json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
            expect=202,
            step="sendMail",
            client_request_id=client_request_id,
            mailbox=mailbox,
            content_type="application/json",
        )
        return SendResult(
            status=202, request_id=headers.get("request-id"), duration=self._monotonic() - started
        )

    async def graph_request(
        self,
        auth: AuthObjectConfig,
        auth_name: str,
        method: str,
        path: str,
        *,
        body: bytes | None,
        expect: int,
        step: str,
        client_request_id: str,
        mailbox: str,
        content_type: str | None = "text/plain",
    ) -> tuple[Mapping[str, str], bytes]:
        """One authenticated Graph call to `{graph_base_url}{path}`: the headers and (at most
        64 KiB of) body of the `expect`ed answer; any other answer raises its DeliveryError.

        A 401 is retried once with a fresh token. `step` names the call in logs; the steps of
        the large-message path that need Mail.ReadWrite ("draft", "uploadSession") say so on 403.
        """
        url = URL(f"{auth.graph_base_url}{path}", encoded=True)
        context = self._context(auth, auth_name)
        send = _Exchange(auth_name, mailbox, client_request_id, step)
        token = await self._tokens.get_token(auth_name)
        headers = {"client-request-id": client_request_id}
        if content_type is not None:
            headers["Content-Type"] = content_type
        answer = await self._request(method, url, body, headers, auth, context, send, token)
        if answer[0] == 401:
            _LOG.info(
                "graph answered 401, retrying once with a fresh token auth_object=%s mailbox=%s",
                auth_name,
                mailbox,
            )
            token = await self._tokens.get_token(auth_name, stale=token)
            answer = await self._request(method, url, body, headers, auth, context, send, token)
        status, answer_headers, payload = answer
        if status == expect:
            return answer_headers, payload
        error = self.map_error(status, answer_headers, payload, step=step)
        send.log(error)
        raise error

    async def upload_chunk(
        self,
        auth: AuthObjectConfig,
        auth_name: str,
        upload_url: str,
        chunk: bytes,
        *,
        start: int,
        total: int,
        client_request_id: str,
        mailbox: str,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """PUT one byte range to an upload session's pre-authenticated URL, without the
        Authorization header (outlook-large-attachments.md). Returns the raw answer; only
        network failures raise (TransientDeliveryError)."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{total}",
            "client-request-id": client_request_id,
        }
        send = _Exchange(auth_name, mailbox, client_request_id, "upload")
        context = self._context(auth, auth_name)
        url = URL(upload_url, encoded=True)
        return await self._request("PUT", url, chunk, headers, auth, context, send, None)

    def map_error(
        self, status: int, headers: Mapping[str, str], payload: bytes, *, step: str
    ) -> DeliveryError:
        """`error_from_response` with this client's clock, for the steps of relay.large."""
        drafts = step in ("draft", "uploadSession")
        return error_from_response(status, headers, payload, clock=self._clock, drafts=drafts)

    async def _request(
        self,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str],
        auth: AuthObjectConfig,
        context: ssl.SSLContext,
        send: _Exchange,
        token: str | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP exchange; every aiohttp/ssl exception is converted here, and only here."""
        await self.start()
        assert self._session is not None
        sent = dict(headers)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            async with self._session.request(
                method,
                url,
                # A file-like body is streamed in chunks; raw bytes over 1 MiB would make aiohttp
                # warn that the loop may block. A fresh stream per attempt (the 401 retry).
                data=io.BytesIO(body) if body is not None else None,
                headers=sent,
                ssl=context,
                proxy=proxy_for(str(url), auth.proxy),
                allow_redirects=False,
            ) as response:
                payload = await response.content.read(_ERROR_BODY_LIMIT)
                return response.status, response.headers, payload
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = error_from_network(exc, timeout=self._timeout.total or 0.0)
            send.log(error)
            raise error from exc

    def _context(self, auth: AuthObjectConfig, auth_name: str) -> ssl.SSLContext:
        """The TLS trust for this auth object's ca_file, built once and cached."""
        context = self._contexts.get(auth.ca_file)
        if context is None:
            try:
                context = ssl_context_for(auth.ca_file)
            except OSError as exc:  # missing, unreadable or not PEM (ssl.SSLError)
                error = TransientDeliveryError(
                    f"cannot load ca_file {auth.ca_file}: {type(exc).__name__}: {exc}",
                    alert=True,
                    remedy="check that the auth object's ca_file exists and holds PEM certificates",
                )
                _LOG.error("graph TLS setup failed auth_object=%s %s", auth_name, error.describe())
                raise error from exc
            self._contexts[auth.ca_file] = context
        return context


@dataclass(frozen=True, slots=True)
class _Exchange:
    """Who a Graph call was for and which step it was, for the log lines about it."""

    auth_name: str
    mailbox: str
    client_request_id: str
    step: str = "sendMail"

    def log(self, error: DeliveryError) -> None:
        quiet = isinstance(error, TransientDeliveryError) and not error.alert
        _LOG.log(
            logging.WARNING if quiet else logging.ERROR,
            "graph %s failed auth_object=%s mailbox=%s client_request_id=%s %s",
            self.step,
            self.auth_name,
            self.mailbox,
            self.client_request_id,
            error.describe(),
        )
