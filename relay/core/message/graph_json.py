"""The prepared MIME message as Graph's JSON `message` resource, for the routes MIME cannot serve.

Graph's MIME `sendMail` cannot say `saveToSentItems: false`, and the relay will not rewrite a From
header inside MIME (DESIGN §3, §7). Those routes use the JSON form of `sendMail`
(api-reference/v1.0/api/user-sendmail.md), whose body is a `message` resource
(resources/message.md) with `fileAttachment`s (resources/fileattachment.md). The JSON form is a
different representation, not a copy, so this module states exactly what survives and refuses,
loudly, what cannot be carried over without changing what the recipient gets.

Pure like the rest of the message core: bytes and values in, a frozen value out; standard library,
`relay.core.errors` and `relay.core.message` only.
"""

# Theory of operation
# ===================
#
# Reading the MIME tree (splitting, decoding, choosing the body and the attachments) is
# `message.parts`'s; nothing is re-encoded, so attachment bytes are exactly the bytes any MIME
# reader would get. This module maps the result and the top-level header fields onto the resource.
#
# What the JSON form carries:
#   subject              Subject, RFC 2047 words decoded, unfolded.
#   body                 the text/html part of the body (multipart/alternative: html preferred,
#                        else text/plain), decoded strictly with its declared charset.
#   from / sender        From and Sender; with rewrite_from, `from` is the route's mailbox (with
#                        the original display name) and the original From goes to replyTo unless
#                        the message has its own Reply-To, which the author chose and which wins.
#   replyTo              Reply-To.
#   to/cc/bccRecipients  To/Cc/Bcc filtered to the envelope; envelope recipients no field names
#                        go to bccRecipients (DESIGN §7: exactly the envelope, each once).
#   attachments          every other leaf as a fileAttachment; parts of multipart/related other
#                        than its root are inline (`isInline`, `contentId` from Content-ID) so
#                        that `cid:` references in the HTML keep working.
#   importance           Importance, else X-Priority, else X-MSMail-Priority, else Priority.
#   internetMessageId    Message-ID (settable while the message is a draft, which it is).
#   isReadReceiptRequested  Disposition-Notification-To present.
#   internetMessageHeaders  the first five `X-` fields in header order, X-Priority and
#                        X-MSMail-Priority excluded (they became `importance`). Graph refuses
#                        other names and more than five; the rest are listed in `dropped_headers`.
#
# What it does not carry (Exchange writes its own): Date, Received and other trace fields,
# MIME-Version and the multipart structure and boundaries, the text/plain alternative of an HTML
# body, transfer encodings and line lengths, In-Reply-To and References (not settable; a reply
# sent this way does not thread in clients that rely on them), Sensitivity, List-* and any other
# non-X field. Those are representation, not content, for the routes that choose JSON.
#
# What is refused with `CannotConvertError` (554 5.6.0, mostly raised by `relay.core.message.parts`)
# instead of being changed silently: multipart/signed, multipart/encrypted and
# application/pkcs7-mime (a converted message loses or breaks its signature); a text/calendar
# invitation that is not an attachment (it would arrive as an .ics file, not as a meeting
# request); a second body text part (JSON has one body); a body that is not valid in its declared
# charset (or UTF-8 when it declares none); an unknown transfer encoding or a multipart without
# its boundary. A request body over Graph's 4 MB limit raises
# `GraphJsonTooLargeError` (552 5.3.4).

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.core.errors import RelayError, SmtpReply
from relay.core.limits import GRAPH_MAX_REQUEST_BYTES
from relay.core.message import UnparseableMessageError
from relay.core.message.addresses import AddressItem, canonical_address, parse_address_list
from relay.core.message.parts import (
    Attachment,
    CannotConvertError,
    Entity,
    decode_words,
    header_text,
    read_content,
)
from relay.core.message.recipients import RECIPIENT_FIELDS, reconcile_fields

__all__ = [
    "MAX_INTERNET_HEADERS",
    "Attachment",
    "CannotConvertError",
    "GraphJsonTooLargeError",
    "GraphMessage",
    "Recipient",
    "to_graph_message",
]

MAX_INTERNET_HEADERS = 5  # Graph: "should be less than or equal to 5"


class GraphJsonTooLargeError(RelayError, ValueError):
    """The JSON request body would pass Graph's 4 MB request limit."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reply = SmtpReply(
            552, "5.3.4", "Message too large for Microsoft 365 (4 MB per request)"
        )
        super().__init__(
            f"the JSON request body is {size} bytes; Graph accepts {GRAPH_MAX_REQUEST_BYTES}"
        )


@dataclass(frozen=True, slots=True)
class Recipient:
    """A Graph `recipient`: an address with an optional display name."""

    address: str
    name: str = ""

    def as_json(self) -> dict[str, Any]:
        email: dict[str, str] = {"address": self.address}
        if self.name:
            email["name"] = self.name
        return {"emailAddress": email}


def _attachment_json(attachment: Attachment) -> dict[str, Any]:
    """A Graph `fileAttachment` (resources/fileattachment.md) for one MIME leaf."""
    out: dict[str, Any] = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": attachment.name,
        "contentType": attachment.content_type,
        "contentBytes": base64.b64encode(attachment.content).decode("ascii"),
        "isInline": attachment.is_inline,
    }
    if attachment.content_id:
        out["contentId"] = attachment.content_id
    return out


@dataclass(frozen=True, slots=True)
class GraphMessage:
    """Graph's `message` resource for one prepared message; `as_json()` is the resource."""

    subject: str
    body_type: str  # "html" or "text"
    body: str
    to: tuple[Recipient, ...]
    cc: tuple[Recipient, ...]
    bcc: tuple[Recipient, ...]
    from_: Recipient | None = None
    sender: Recipient | None = None
    reply_to: tuple[Recipient, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    importance: str | None = None
    internet_message_id: str | None = None
    read_receipt: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    dropped_headers: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if len(self.headers) > MAX_INTERNET_HEADERS:
            raise ValueError(f"Graph accepts at most {MAX_INTERNET_HEADERS} internet headers")
        if any(not name.lower().startswith("x-") for name, _ in self.headers):
            raise ValueError("Graph accepts only x- internet headers")
        if not (self.to or self.cc or self.bcc):
            raise ValueError("a message needs at least one recipient")

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(r.address for r in (*self.to, *self.cc, *self.bcc))

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "subject": self.subject,
            "body": {"contentType": self.body_type, "content": self.body},
            "toRecipients": [r.as_json() for r in self.to],
            "ccRecipients": [r.as_json() for r in self.cc],
            "bccRecipients": [r.as_json() for r in self.bcc],
        }
        if self.from_ is not None:
            out["from"] = self.from_.as_json()
        if self.sender is not None:
            out["sender"] = self.sender.as_json()
        if self.reply_to:
            out["replyTo"] = [r.as_json() for r in self.reply_to]
        if self.attachments:
            out["attachments"] = [_attachment_json(a) for a in self.attachments]
        if self.importance:
            out["importance"] = self.importance
        if self.internet_message_id:
            out["internetMessageId"] = self.internet_message_id
        if self.read_receipt:
            out["isReadReceiptRequested"] = True
        if self.headers:
            out["internetMessageHeaders"] = [{"name": n, "value": v} for n, v in self.headers]
        return out

    def request_body(self, *, save_to_sent_items: bool) -> bytes:
        """The `sendMail` request body (UTF-8 JSON); `saveToSentItems` only when false."""
        document: dict[str, Any] = {"message": self.as_json()}
        if not save_to_sent_items:
            document["saveToSentItems"] = False
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --- addresses ------------------------------------------------------------------------------------


def _unquote(phrase: str) -> str:
    """A display-name phrase without its quotes and quoted-pair backslashes."""
    out: list[str] = []
    escaped = False
    for ch in phrase:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch != '"':
            out.append(ch)
    return " ".join("".join(out).split())


def _display_name(item: AddressItem) -> str:
    raw = item.raw
    angle = raw.rfind("<")
    if angle >= 0:
        phrase = raw[:angle]
    else:  # "user@host (Name)": the trailing comment is the only name there is
        comment = re.search(r"\(([^()]*)\)\s*$", raw)
        phrase = comment.group(1) if comment else ""
    return _unquote(decode_words(phrase.strip()))


def _recipients(items: Sequence[AddressItem]) -> list[Recipient]:
    found: list[Recipient] = []
    for item in items:
        mailboxes = item.members if item.group_name is not None else (item,)
        found.extend(
            Recipient(mailbox.addresses[0], _display_name(mailbox))
            for mailbox in mailboxes
            if mailbox.addresses
        )
    return found


# --- the MIME tree --------------------------------------------------------------------------------


# --- header-derived properties --------------------------------------------------------------------

_IMPORTANCE = {
    "high": "high",
    "urgent": "high",
    "normal": "normal",
    "low": "low",
    "non-urgent": "low",
}
_X_PRIORITY = {"1": "high", "2": "high", "3": "normal", "4": "low", "5": "low"}
_AS_PROPERTIES = frozenset({"x-priority", "x-msmail-priority"})


def _importance(top: Entity) -> str | None:
    for name in ("importance", "x-priority", "x-msmail-priority", "priority"):
        value = top.header(name)
        if value is None:
            continue
        word = value.strip().lower()
        if name == "x-priority":
            found = _X_PRIORITY.get(word[:1])
        else:
            found = _IMPORTANCE.get(word.split()[0] if word else "")
        if found:
            return found
    return None


def _addresses(top: Entity, name: str) -> list[Recipient]:
    value = top.header(name)
    try:
        return _recipients(parse_address_list(value)) if value else []
    except UnparseableMessageError as exc:  # Reply-To is not checked before delivery
        raise CannotConvertError(f"the {name} field cannot be parsed") from exc


def _envelope_recipients(
    top: Entity, envelope_recipients: Sequence[str]
) -> tuple[list[Recipient], list[Recipient], list[Recipient]]:
    """To/Cc/Bcc naming exactly the envelope recipients, each once (DESIGN §7), as decided by
    the one reconciliation, `relay.core.message.recipients.reconcile_fields`."""
    reconciled = reconcile_fields(top.fields, envelope_recipients, b"\r\n")
    out: dict[str, list[Recipient]] = {key: [] for key in RECIPIENT_FIELDS}
    for f in reconciled.fields:
        if f.key in out:
            out[f.key].extend(_recipients(parse_address_list(header_text(f.value))))
    return out["to"], out["cc"], out["bcc"]


def _internet_headers(top: Entity) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    kept: list[tuple[str, str]] = []
    dropped: list[str] = []
    for f in top.fields:
        name = f.name.decode("ascii")
        if not f.key.startswith("x-") or f.key in _AS_PROPERTIES:
            continue
        if len(kept) < MAX_INTERNET_HEADERS:
            kept.append((name, header_text(f.value)))
        else:
            dropped.append(name)
    return tuple(kept), tuple(dropped)


def to_graph_message(
    prepared_mime: bytes,
    *,
    envelope_recipients: Sequence[str],
    mailbox: str,
    rewrite_from: bool,
) -> GraphMessage:
    """The JSON `message` resource for `prepared_mime` (normally `prepare_for_graph` output).

    Recipients are exactly `envelope_recipients`. With `rewrite_from`, From becomes `mailbox`
    and the original author is put into replyTo. Raises `CannotConvertError` (554 5.6.0) when the
    message cannot be represented without changing it, and `GraphJsonTooLargeError` (552 5.3.4)
    when the request would pass 4 MB. See the theory of operation for what is kept.
    """
    if not envelope_recipients:
        raise ValueError("an envelope needs at least one recipient")
    top = Entity.parse(prepared_mime)
    content = read_content(top)
    body_type, body = content.body or ("text", "")
    to, cc, bcc = _envelope_recipients(top, envelope_recipients)
    authors = _addresses(top, "from")
    reply_to = _addresses(top, "reply-to")
    senders = _addresses(top, "sender")
    from_ = authors[0] if authors else None
    sender = senders[0] if senders else None
    if rewrite_from:
        sender = None
        if from_ is None or canonical_address(from_.address) != canonical_address(mailbox):
            reply_to = reply_to or authors
            from_ = Recipient(mailbox, from_.name if from_ else "")
    message_id = top.header("message-id")
    headers, dropped = _internet_headers(top)
    message = GraphMessage(
        subject=decode_words(top.header("subject") or ""),
        body_type=body_type,
        body=body,
        to=tuple(to),
        cc=tuple(cc),
        bcc=tuple(bcc),
        from_=from_,
        sender=sender,
        reply_to=tuple(reply_to),
        attachments=content.attachments,
        importance=_importance(top),
        internet_message_id=" ".join(message_id.split()) if message_id else None,
        read_receipt=top.header("disposition-notification-to") is not None,
        headers=headers,
        dropped_headers=dropped,
    )
    size = len(message.request_body(save_to_sent_items=False))
    if size > GRAPH_MAX_REQUEST_BYTES:
        raise GraphJsonTooLargeError(size)
    return message
