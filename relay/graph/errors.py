"""Graph's answers as the relay's errors: the pure mapping of DESIGN §5's table, with remedies.

Why this module exists: what a Graph answer means for a message (retry later, give up and bounce,
which SMTP reply the waiting client gets, what the administrator must fix) is knowledge, not I/O.
It lives here once, as functions from values to errors, so it can be tested without a network
and read without aiohttp; `relay.graph.client` does the HTTP and calls into it.

- `error_from_response(status, headers, body, clock=...)`: one non-success HTTP answer ->
  `TransientDeliveryError` / `PermanentDeliveryError`, carrying the HTTP status, Graph's error
  code and message, the `request-id` and the remedy for the log.
- `error_from_network(kind, detail, timeout=...)`: a failure to talk to Graph at all, already
  classified by the client (which knows the exception types) into a `NetworkFailure` kind.

Graph facts (microsoftgraph/microsoft-graph-docs-contrib):
- concepts/errors.md: errors are `{"error": {"code", "message", "innerError": {"request-id",
  "date"}}}`; inner errors may nest and carry more specific codes (spelled `innerError` in the
  example, `innererror` in the schema; both are read).
- concepts/throttling.md: 429 carries `Retry-After`; waiting that long is the fastest recovery.
- api-reference/v1.0/api/user-sendmail.md: malformed MIME is `400
  ErrorMimeContentInvalidBase64String`.
"""

from __future__ import annotations

import email.utils
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)

__all__ = [
    "MAILBOX_LIMIT_CODES",
    "MIME_ERROR_CODES",
    "GraphError",
    "NetworkFailure",
    "error_from_network",
    "error_from_response",
    "one_line",
    "parse_graph_error",
    "parse_retry_after",
    "remedy_for_code",
]

_MESSAGE_LIMIT = 300
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
# Graph's and Exchange's answers that a *mailbox* reached a sending limit, whatever the HTTP
# status they come with (429, 403, 503 seen): the mailbox pauses, the message waits, nothing
# bounces (issue #12). Matched against every code level and, for Exchange's NDR-style texts
# carried in a message, the message.
MAILBOX_LIMIT_CODES = frozenset(
    {
        "ErrorExceededMessageLimit",
        "SubmissionQuotaExceeded",
        "SubmissionQuotaExceededException",
        "ErrorSubmissionQuotaExceeded",
        "CommandConcurrencyLimitReached",
        "MailboxConcurrency",
        "ApplicationThrottled",
        "ErrorTooManyObjectsOpened",
    }
)
# In this order of preference; status codes only as whole tokens ("15.2.0" is a version).
_LIMIT_TEXTS = tuple(
    re.compile(p)
    for p in (
        "QuotaExceeded",
        "MailboxConcurrency",
        r"(?<![\w.])5\.2\.0(?![\w.])",
        r"(?<![\w.])5\.1\.90(?![\w.])",
        "sending limit",
    )
)
# 4xx answers that come from the path (a proxy) or a momentary state, not from the message.
_TRANSIENT_4XX = frozenset({407, 408, 423, 425})

_REMEDY_LIMIT = (
    "the mailbox reached Exchange Online's sending limit; lower delivery.mailbox_limits or "
    "spread the route over a pool of mailboxes (another app sending as this mailbox counts "
    "too); its mail waits, not before Retry-After"
)
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
_REMEDY_SLOW = "Graph or the network is slow; nothing to fix unless it persists"

# How the client classified a failure to exchange HTTP with Graph at all.
NetworkFailure = Literal["tls_verify", "tls", "timeout", "connection"]


@dataclass(frozen=True, slots=True)
class GraphError:
    """What a Graph error body says. Every field may be missing from a gateway's HTML page."""

    code: str | None
    message: str
    request_id: str | None
    codes: tuple[str, ...] = ()  # the top-level code first, then nested innerError codes


def one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    """`text` with its whitespace collapsed, shortened to `limit` characters for a log line."""
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


_CODE_REMEDIES = {
    "ErrorSendAsDenied": _REMEDY_SEND_AS,
    "ErrorAccessDenied": _REMEDY_ACCESS,
    "ErrorInvalidUser": _REMEDY_NO_MAILBOX,
    "MailboxNotEnabledForRESTAPI": _REMEDY_NO_REST,
    "ErrorInvalidRecipients": _REMEDY_RECIPIENTS,
    "ErrorMessageSizeExceeded": _REMEDY_SIZE,
    "RequestEntityTooLarge": _REMEDY_SIZE,
    "InvalidAuthenticationToken": _REMEDY_401,
    **{code: _REMEDY_MIME for code in MIME_ERROR_CODES},
    **{code: _REMEDY_LIMIT for code in MAILBOX_LIMIT_CODES},
}


def parse_graph_error(body: bytes) -> GraphError:
    """Read Graph's error JSON; tolerate empty, truncated, non-JSON and HTML bodies."""
    text = body.decode("utf-8", errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return GraphError(code=None, message=one_line(_TAG.sub(" ", text)), request_id=None)
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
        message=one_line(message if isinstance(message, str) else ""),
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


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    clock: Callable[[], datetime],
    drafts: bool = False,
) -> DeliveryError:
    """Map one non-202 Graph answer to the relay's error (DESIGN §5). Pure; no I/O.

    `clock` reads an HTTP-date Retry-After against the caller's idea of now. `drafts`: the
    request was a step of the large-message path that needs Mail.ReadWrite (create the draft,
    create an upload session), so a plain 403 names that permission.
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

    limit = _mailbox_limit(status, codes, parsed.message)
    if limit is not None:
        return TransientDeliveryError(
            message,
            reply=SmtpReply(
                451,
                "4.4.2",
                f"Sending limit of the mailbox reached ({shown}{suffix}), try again later",
            ),
            retry_after=parse_retry_after(lowered.get("retry-after"), now=clock),
            mailbox_limit=limit,
            remedy=_REMEDY_LIMIT,
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


def remedy_for_code(text: str) -> str:
    """The remedy for the first Graph error code `text` names (an entry's last_error, for
    `queue show`), or "" when it names none the relay knows."""
    for code in re.findall(r"[A-Za-z_]+", text):
        if code in _CODE_REMEDIES:
            return _CODE_REMEDIES[code]
    return ""


def _mailbox_limit(status: int, codes: set[str], text: str) -> str | None:
    """Which sending limit the answer says the mailbox reached, or None. Every 429 is one
    (Graph throttles per app and mailbox); so is a known limit code at any status."""
    known = codes & MAILBOX_LIMIT_CODES
    if "MailboxConcurrency" in known or (known and "MailboxConcurrency" in text):
        return "MailboxConcurrency"  # however Graph nests it: a concurrency pause is short
    if known:
        return sorted(known)[0]
    if status in (429, 503):
        for pattern in _LIMIT_TEXTS:
            if (found := pattern.search(text)) is not None:
                return found.group(0)
    if status == 429:
        return next(iter(sorted(codes)), "TooManyRequests")
    return None


def error_from_network(
    kind: NetworkFailure, detail: str, *, timeout: float
) -> TransientDeliveryError:
    """A failure to talk to Graph at all: always transient (451 4.4.2). `detail` names the
    exception; `timeout` is the client's total timeout, quoted for a `timeout`."""
    reply = SmtpReply(451, "4.4.2", "Microsoft 365 could not be reached, try again later")
    detail = one_line(detail)
    if kind == "tls_verify":
        # Does not heal by itself: somebody has to fix the trust.
        message = f"TLS verification of Graph failed: {detail}"
        return TransientDeliveryError(message, reply=reply, alert=True, remedy=_REMEDY_TLS)
    if kind == "tls":
        message = f"TLS with Graph failed: {detail}"
        return TransientDeliveryError(message, reply=reply, remedy=_REMEDY_TLS)
    if kind == "timeout":
        message = f"Graph did not answer within {timeout:g}s: {detail}"
        return TransientDeliveryError(message, reply=reply, remedy=_REMEDY_SLOW)
    message = f"cannot reach Graph: {detail}"
    return TransientDeliveryError(message, reply=reply, remedy=_REMEDY_NETWORK)
