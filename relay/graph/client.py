"""The Microsoft Graph client: send a message as MIME or JSON with `POST /users/{mailbox}/sendMail`,
or, past Graph's 4 MB request limit, as a draft plus upload sessions (`relay.graph.large`).

Why this module exists: it is the relay's only HTTP conversation with Graph. It is the I/O shell
around `relay.graph.errors`, which knows what each answer means:

- every non-success answer becomes the relay's own error through `error_from_response`;
- aiohttp and TLS exceptions are converted at the one place they can occur (`_request`), so
  nobody above this module ever sees an aiohttp exception.

It does not log failures: the delivery layer logs the outcome of each attempt once, with the
code, request-id and remedy the error carries (DESIGN §5), so a failure is never logged twice.

Graph facts this module relies on (microsoftgraph/microsoft-graph-docs-contrib):
- api-reference/v1.0/api/user-sendmail.md: MIME goes as a base64 string in the body with
  `Content-Type: text/plain`; success is `202 Accepted` with an empty body. The example wraps the
  base64 at 76 columns; one unbroken line is equally a base64 string and is what we send. The JSON
  form takes `{"message": ..., "saveToSentItems": false}` as `application/json`.
- concepts/outlook-large-attachments.md: the `uploadUrl` of an upload session is pre-authenticated;
  "Do not specify an Authorization request header" on its PUTs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from relay.config.schema import AuthObjectConfig
from relay.core.errors import DeliveryError, TransientDeliveryError
from relay.core.values import SendTarget
from relay.graph.errors import NetworkFailure, error_from_network, error_from_response
from relay.graph.large import send_large
from relay.graph.transport import proxy_for, ssl_context_for

__all__ = ["GraphClient", "SendResult", "TokenSource", "network_error"]

_LOG = logging.getLogger("relay.graph")
_ERROR_BODY_LIMIT = 64 * 1024
# The large-message steps that need Mail.ReadWrite; a 403 to them names that permission.
_DRAFT_STEPS = frozenset({"draft", "uploadSession"})


class TokenSource(Protocol):
    """Where GraphClient gets bearer tokens (relay.graph.tokens.TokenProvider in production)."""

    async def get_token(self, name: str, *, stale: str | None = None) -> str: ...


@dataclass(frozen=True, slots=True)
class SendResult:
    """Graph accepted the message (202). `duration` covers the HTTP exchange(s) in seconds."""

    status: int
    request_id: str | None
    duration: float


def _utcnow() -> datetime:
    return datetime.now(UTC)


def network_error(exc: BaseException, *, timeout: float) -> TransientDeliveryError:
    """Classify what aiohttp, asyncio or ssl raised and map it (relay.graph.errors)."""
    kind: NetworkFailure = "connection"
    if isinstance(exc, ssl.SSLCertVerificationError):  # incl. ClientConnectorCertificateError
        kind = "tls_verify"
    elif isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        kind = "tls"
    elif isinstance(exc, TimeoutError):  # asyncio's total timeout and aiohttp's ServerTimeoutError
        kind = "timeout"
    return error_from_network(kind, f"{type(exc).__name__}: {exc}", timeout=timeout)


def _user_path(mailbox: str) -> str:
    return f"/users/{quote(mailbox, safe='@')}"


class GraphClient:
    """Sends messages through Graph; one aiohttp session for the whole process."""

    def __init__(
        self,
        tokens: TokenSource,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        chunk_retry_delay: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`chunk_retry_delay`: the pause before re-sending a failed upload chunk, multiplied
        by the number of failures so far (when Graph gives no Retry-After); `sleep` takes it."""
        self._tokens = tokens
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._chunk_retry_delay = chunk_retry_delay
        self._sleep = sleep
        self._clock = clock
        self._monotonic = monotonic
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[Path | None, ssl.SSLContext] = {}
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

    async def send_mime(self, target: SendTarget, mime: bytes) -> SendResult:
        """Send `mime` as `target.mailbox`. 202 -> SendResult; otherwise raise a DeliveryError.

        A 401 is retried once with a fresh token (the refused one passed as `stale`).
        """
        body = base64.b64encode(mime)  # standard alphabet, no line breaks
        return await self._send_mail(target, body, "text/plain")

    async def send_json(
        self, target: SendTarget, message_json: Mapping[str, Any], save_to_sent_items: bool
    ) -> SendResult:
        """Send Graph's `message` resource as JSON (user-sendmail.md, application/json).

        `saveToSentItems` is written only when false, as the documentation asks. Answers map to
        errors exactly as for `send_mime`.
        """
        document: dict[str, Any] = {"message": dict(message_json)}
        if not save_to_sent_items:
            document["saveToSentItems"] = False
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return await self._send_mail(target, body, "application/json")

    async def send_large_mime(self, target: SendTarget, mime: bytes) -> SendResult:
        """Send a message over the 4 MB request limit: draft, upload sessions, send
        (relay.graph.large). Needs Mail.ReadWrite besides Mail.Send. Raises like `send_mime`."""
        started = self._monotonic()
        request_id = await send_large(
            self,
            target,
            mime,
            background=self._background,
            retry_delay=self._chunk_retry_delay,
            sleep=self._sleep,
        )
        return SendResult(status=202, request_id=request_id, duration=self._monotonic() - started)

    async def _send_mail(self, target: SendTarget, body: bytes, content_type: str) -> SendResult:
        started = self._monotonic()
        path = _user_path(target.mailbox) + "/sendMail"
        headers, _ = await self.graph_request(
            target, "POST", path, body=body, expect=202, step="sendMail", content_type=content_type
        )
        duration = self._monotonic() - started
        return SendResult(status=202, request_id=headers.get("request-id"), duration=duration)

    async def graph_request(
        self,
        target: SendTarget,
        method: str,
        path: str,
        *,
        body: bytes | None,
        expect: int,
        step: str,
        content_type: str | None = "text/plain",
    ) -> tuple[Mapping[str, str], bytes]:
        """One authenticated Graph call to `{graph_base_url}{path}`: the headers and (at most
        64 KiB of) body of the `expect`ed answer; any other answer raises its DeliveryError.

        A 401 is retried once with a fresh token. `step` names the call; the steps of the
        large-message path that need Mail.ReadWrite ("draft", "uploadSession") say so on 403.
        """
        auth = target.auth
        url = URL(f"{auth.graph_base_url}{path}", encoded=True)
        context = self._context(auth)
        token = await self._tokens.get_token(target.auth_name)
        headers = {"client-request-id": target.client_request_id}
        if content_type is not None:
            headers["Content-Type"] = content_type
        answer = await self._request(method, url, body, headers, auth, context, token)
        if answer[0] == 401:
            _LOG.debug(
                "graph %s answered 401, retrying once with a fresh token auth_object=%s",
                step,
                target.auth_name,
            )
            token = await self._tokens.get_token(target.auth_name, stale=token)
            answer = await self._request(method, url, body, headers, auth, context, token)
        status, answer_headers, payload = answer
        if status == expect:
            return answer_headers, payload
        raise self.map_error(status, answer_headers, payload, step=step)

    async def upload_chunk(
        self, target: SendTarget, upload_url: str, chunk: bytes, *, start: int, total: int
    ) -> tuple[int, Mapping[str, str], bytes]:
        """PUT one byte range to an upload session's pre-authenticated URL, without the
        Authorization header (outlook-large-attachments.md). Returns the raw answer; only
        network failures raise (TransientDeliveryError)."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{total}",
            "client-request-id": target.client_request_id,
        }
        context = self._context(target.auth)
        url = URL(upload_url, encoded=True)
        return await self._request("PUT", url, chunk, headers, target.auth, context, None)

    def map_error(
        self, status: int, headers: Mapping[str, str], payload: bytes, *, step: str
    ) -> DeliveryError:
        """`error_from_response` with this client's clock, for the steps of relay.graph.large."""
        drafts = step in _DRAFT_STEPS
        return error_from_response(status, headers, payload, clock=self._clock, drafts=drafts)

    async def _request(
        self,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str],
        auth: AuthObjectConfig,
        context: ssl.SSLContext,
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
            raise network_error(exc, timeout=self._timeout.total or 0.0) from exc

    def _context(self, auth: AuthObjectConfig) -> ssl.SSLContext:
        """The TLS trust for this auth object's ca_file, built once and cached."""
        context = self._contexts.get(auth.ca_file)
        if context is None:
            try:
                context = ssl_context_for(auth.ca_file)
            except OSError as exc:  # missing, unreadable or not PEM (ssl.SSLError)
                raise TransientDeliveryError(
                    f"cannot load ca_file {auth.ca_file}: {type(exc).__name__}: {exc}",
                    alert=True,
                    remedy="check that the auth object's ca_file exists and holds PEM certificates",
                ) from exc
            self._contexts[auth.ca_file] = context
        return context
