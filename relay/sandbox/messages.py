# Why this module exists: what Graph accepts as a sendMail body is the part of the fake that
# most needs to be right and most needs its own tests. These are pure functions (bytes and a
# mailbox in, a Submission or a GraphError out): base64 MIME or a JSON message resource,
# recipients, Send-As rights, x- headers. No sockets, no clocks.
"""Validation of sendMail request bodies, as Graph does it."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Literal

from .directory import Mailbox, address_key, is_valid_address

__all__ = [
    "GraphError",
    "Submission",
    "check_mime",
    "decode_mime_body",
    "parse_json_submission",
    "parse_mime_submission",
]

MAX_INTERNET_HEADERS = 5
JSON_UNREADABLE = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and payload "
    "is of valid JSON format."
)
NO_RECIPIENTS = (
    "At least one recipient isn't valid., A message can't be sent because it contains no "
    "recipients."
)
SEND_AS_DENIED = (
    "The user account which was used to submit this request does not have the right to send "
    "mail on behalf of the specified sending account., Cannot submit message."
)


class GraphError(Exception):
    """A Graph error answer: status, error code, message and optional Retry-After."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: str | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass(frozen=True, slots=True)
class Submission:
    """A sendMail request body that passed validation."""

    kind: Literal["mime", "json"]
    subject: str
    from_address: str
    recipients: tuple[str, ...]
    save_to_sent_items: bool
    mime: bytes | None
    json_body: dict[str, Any] | None


def decode_mime_body(body: bytes) -> bytes:
    """The MIME of a `Content-Type: text/plain` body (base64 of an RFC 5322 message)."""
    try:
        mime = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GraphError(
            400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
        ) from exc
    if not mime.strip() or not BytesHeaderParser(policy=compat32).parsebytes(mime).keys():
        raise GraphError(400, "ErrorMimeContentInvalid", "The MIME content is invalid.")
    return mime


def parse_mime_submission(body: bytes, mailbox: Mailbox) -> Submission:
    """Validate a `Content-Type: text/plain` body: base64 of an RFC 5322 message."""
    return check_mime(decode_mime_body(body), mailbox)


def check_mime(mime: bytes, mailbox: Mailbox) -> Submission:
    """What sending `mime` from `mailbox` needs: recipients, and the right to send as From."""
    message = BytesHeaderParser(policy=compat32).parsebytes(mime)
    recipients = _check_recipients(_addresses(message, "To", "Cc", "Bcc"))
    senders = _addresses(message, "From")
    sender = address_key(senders[0]) if senders else mailbox.address
    if not mailbox.may_send_as(sender):
        raise GraphError(403, "ErrorSendAsDenied", SEND_AS_DENIED)
    return Submission(
        kind="mime",
        mime=mime,
        json_body=None,
        recipients=recipients,
        from_address=sender,
        # MIME cannot say otherwise: "This method saves the message in the Sent Items folder."
        save_to_sent_items=True,
        subject=_decoded_subject(message),
    )


def parse_json_submission(body: bytes, mailbox: Mailbox) -> Submission:
    """Validate a `Content-Type: application/json` body: `{"message": {...}, "saveToSentItems"}`."""
    if not body.strip():
        raise GraphError(400, "BadRequest", "Empty Payload. JSON content expected.")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraphError(400, "BadRequest", JSON_UNREADABLE) from exc
    if not isinstance(document, dict):
        raise GraphError(400, "BadRequest", JSON_UNREADABLE)
    message = document.get("message")
    if not isinstance(message, dict):
        raise GraphError(400, "ErrorInvalidParameter", "The parameter 'message' is required.")
    save = document.get("saveToSentItems", True)
    if isinstance(save, str) and save.lower() in ("true", "false"):
        save = save.lower() == "true"
    if not isinstance(save, bool):
        raise GraphError(400, "BadRequest", "Invalid value for parameter 'saveToSentItems'.")
    addresses: list[str] = []
    for field in ("toRecipients", "ccRecipients", "bccRecipients"):
        addresses += _json_recipients(_collection(message, field), field)
    recipients = _check_recipients(addresses)
    sender = mailbox.address
    if message.get("from") is not None:
        from_list = _json_recipients([message["from"]], "from")
        sender = address_key(from_list[0]) if from_list and from_list[0] else mailbox.address
    _check_internet_headers(_collection(message, "internetMessageHeaders"))
    _check_body(message.get("body"))
    if not mailbox.may_send_as(sender):
        raise GraphError(403, "ErrorSendAsDenied", SEND_AS_DENIED)
    subject = message.get("subject")
    return Submission(
        kind="json",
        mime=None,
        json_body=document,
        recipients=recipients,
        from_address=sender,
        save_to_sent_items=save,
        subject=subject if isinstance(subject, str) else "",
    )


def _collection(resource: dict[str, Any], name: str) -> object:
    """A collection property; absent and null both mean empty, as in OData."""
    value = resource.get(name)
    return [] if value is None else value


def _addresses(message: Message, *names: str) -> list[str]:
    # compat32 hands back raw header text (or a Header for 8-bit bytes); getaddresses copes with
    # folding, RFC 2047 display names and group syntax ("undisclosed-recipients:;" -> nothing).
    values = [str(value) for name in names for value in message.get_all(name, [])]
    return [address for _, address in getaddresses(values) if address]


def _check_recipients(addresses: Iterable[str]) -> tuple[str, ...]:
    found = tuple(address_key(address) for address in addresses)
    if not found:
        raise GraphError(400, "ErrorInvalidRecipients", NO_RECIPIENTS)
    for address in found:
        if not is_valid_address(address):
            raise GraphError(
                400,
                "ErrorInvalidRecipients",
                f"At least one recipient isn't valid., Recipient '{address}' isn't resolved. "
                "All recipients must be resolved before a message can be submitted.",
            )
    return found


def _json_recipients(value: object, field: str) -> list[str]:
    if not isinstance(value, list):
        raise GraphError(400, "BadRequest", f"Property '{field}' must be a collection.")
    found = []
    for item in value:
        email = item.get("emailAddress") if isinstance(item, dict) else None
        address = email.get("address") if isinstance(email, dict) else None
        found.append(address if isinstance(address, str) else "")
    return found


def _check_internet_headers(value: object) -> None:
    if not isinstance(value, list):
        raise GraphError(
            400, "BadRequest", "Property 'internetMessageHeaders' must be a collection."
        )
    if len(value) > MAX_INTERNET_HEADERS:
        raise GraphError(
            400,
            "InvalidInternetMessageHeaderCollection",
            "Maximum number of headers in one message should be less than or equal to 5.",
        )
    for header in value:
        name = header.get("name") if isinstance(header, dict) else None
        if not isinstance(name, str) or not name.lower().startswith("x-"):
            raise GraphError(
                400,
                "InvalidInternetMessageHeader",
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
            )


def _check_body(value: object) -> None:
    if value is None:
        return
    kind = value.get("contentType", "text") if isinstance(value, dict) else None
    if not isinstance(kind, str) or kind.lower() not in ("text", "html"):
        raise GraphError(
            400,
            "BadRequest",
            f"Cannot convert the literal '{kind}' to the expected type 'microsoft.graph.bodyType'.",
        )


def _decoded_subject(message: Message) -> str:
    raw = message.get("Subject")
    if raw is None:
        return ""
    try:
        return str(make_header(decode_header(str(raw))))
    except (LookupError, UnicodeDecodeError, ValueError):
        return str(raw)
