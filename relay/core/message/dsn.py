"""Delivery status notifications (bounces): built for mail the relay accepted and then lost, and
recognised so that the relay never bounces one.

After `250` the relay owns the message (DESIGN §5). When Graph refuses it for good, or it expires
after `retry.lifetime`, the envelope sender must be told, in the one form mail software can act on:
an RFC 3464 DSN. That is a `multipart/report; report-type=delivery-status` (RFC 6522) of

  1. text/plain               what happened and what fixes it, for a person;
  2. message/delivery-status  Reporting-MTA, Arrival-Date and, per recipient, Final-Recipient,
                              Action, Status (RFC 3463), Diagnostic-Code, Last-Attempt-Date;
  3. text/rfc822-headers      the original top-level header block (RFC 6522), at most 8 KB, never
                              the body: the sender has the body, and returning it costs size and
                              privacy,

marked `Auto-Submitted: auto-replied` (RFC 3834 §5) so that responders leave it alone.
`relay.core.message.loops.is_bounce` is the other half of loop prevention.

Pure like the rest of the message core: the clock, the ids and the host names arrive in
`BounceRequest`, and the bytes out (MIME boundary included) are a function of it alone.
"""

# Theory of operation
# ===================
#
# Every value from outside passes one of the gates of `relay.core.message.dsn_gates` (its header
# says which and why) before it is written, so none of it can shape the DSN's structure.
#
# The returned header block is byte-exact when it is plain 7-bit text (printable ASCII and TAB,
# lines within 998 octets), its line endings made CRLF (RFC 2046 §4.1.1). A header block with 8-bit
# bytes, control characters, bare CRs or over-long lines is still returned - it is the best clue the
# sender has - but quoted-printable encoded, as the registration of text/rfc822-headers (RFC 6522)
# allows for "broken or extended" headers: the DSN stays 7-bit whatever the client sent, and
# decoding gives the original bytes back. (Graph would take the 8-bit bytes as they are; the next
# hop to the sender might not.)
#
# The boundary is a hash of the queue id, the Message-ID local part and a counter; the counter
# advances until the boundary occurs nowhere in the parts, so content cannot end a part early.

from __future__ import annotations

import hashlib
import itertools
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from relay.core.message import dsn_gates as gates
from relay.core.message.headers import split_header_from_body
from relay.core.message.stdlib_email import rfc5322_date

__all__ = ["MAX_QUOTED_HEADER", "BounceRequest", "FailedRecipient", "build_dsn"]

CRLF = "\r\n"

# RFC 3463 §2: class "." subject "." detail, class 2 (success), 4 (persistent transient), 5.
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# RFC 3464 §2.3.3
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_DOT_ATOM_TEXT = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)

_TEXT_WIDTH = 72
# Ours (issue #11 item 5): at most this much of the original header block is quoted. A forged
# sender with a 74 KB header made a 79 KB DSN; 8 KB holds every real header's useful fields.
MAX_QUOTED_HEADER = 8 * 1024


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the DSN reports on.

    `status` is an RFC 3463 code ("5.1.1"; "4.4.7" for an expired message). `diagnostic` is an
    RFC 3464 Diagnostic-Code value, `type; text` ("smtp; 550 5.1.1 ..." or "X-Graph; ..."); a value
    without a type gets "X-Relay;", an empty one omits the field. `action` is an RFC 3464 action.
    """

    address: str
    status: str
    diagnostic: str
    action: str = "failed"

    def __post_init__(self) -> None:
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"status must be an RFC 3463 code such as 5.1.1: {self.status!r}")
        if self.action not in _ACTIONS:
            raise ValueError(f"action must be one of {sorted(_ACTIONS)}: {self.action!r}")
        if not gates.address(self.address):
            raise ValueError(f"a failed recipient needs an address: {self.address!r}")


@dataclass(frozen=True, slots=True)
class BounceRequest:
    """Everything a DSN says, supplied by the caller (the module reads no clock and no config).

    `original` is the message as the relay held it; only its header block is returned.
    `envelope_from` is the MAIL FROM the DSN goes to; the null reverse-path never gets one (RFC 5321
    §4.5.5), so it is refused here. The DSN is sent as `from_address` (a mailbox Graph lets the
    route send as) with `Message-ID: <{message_id_local}@{reporting_mta}>`. `reason_text` is one
    paragraph for the sender, remedy included.
    """

    original: bytes
    envelope_from: str
    recipients: tuple[FailedRecipient, ...]
    reporting_mta: str
    queue_id: str
    arrival: datetime
    now: datetime
    from_address: str
    message_id_local: str
    reason_text: str

    def __post_init__(self) -> None:
        if not gates.address(self.envelope_from):
            raise ValueError("no DSN for the null reverse-path (RFC 5321 §4.5.5)")
        if not gates.address(self.from_address):
            raise ValueError("from_address must be a mailbox")
        if not self.recipients:
            raise ValueError("a DSN reports on at least one recipient")
        if not _DOT_ATOM_TEXT.fullmatch(self.message_id_local):
            raise ValueError(
                f"message_id_local must be RFC 5322 dot-atom-text: {self.message_id_local!r}"
            )
        for name in ("arrival", "now"):
            moment: datetime = getattr(self, name)
            if moment.tzinfo is None or moment.utcoffset() is None:
                raise ValueError(f"BounceRequest.{name} must be an aware datetime")


# --- the three parts ------------------------------------------------------------------------------


def _human_part(request: BounceRequest, addresses: Sequence[str], *, shortened: bool) -> bytes:
    host = gates.token(request.reporting_mta)
    wrap = textwrap.TextWrapper(width=_TEXT_WIDTH, break_long_words=False, break_on_hyphens=False)
    indented = textwrap.TextWrapper(
        width=_TEXT_WIDTH,
        initial_indent="    ",
        subsequent_indent="      ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    text = [
        f"This is the mail relay at {host}.",
        "",
        *wrap.wrap(
            "Your message could not be delivered to the recipients listed below. "
            "The relay has stopped trying."
        ),
        "",
        *wrap.wrap(gates.one_line(request.reason_text)),
        "",
    ]
    for address, recipient in zip(addresses, request.recipients, strict=True):
        text.append(f"  <{address}>: {recipient.action}, status {recipient.status}")
        text.extend(indented.wrap(gates.diagnostic(recipient.diagnostic)))
    text += [
        "",
        f"Queue ID: {gates.token(request.queue_id)}",
        f"Arrived:  {rfc5322_date(request.arrival)}",
        "",
        *wrap.wrap(
            (
                f"The first {MAX_QUOTED_HEADER // 1024} KB of the header fields of your message "
                "are attached below"
                if shortened
                else "The header fields of your message are attached below"
            )
            + "; its body is not, so keep your copy if you want to send it again."
        ),
    ]
    encoding, body = gates.encoded_body([line.rstrip().encode("utf-8") for line in text])
    head = (
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _report_part(request: BounceRequest, addresses: Sequence[str]) -> bytes:
    fields = [
        f"Reporting-MTA: dns; {gates.token(request.reporting_mta)}",
        f"X-Queue-ID: {gates.token(request.queue_id)}",
        f"Arrival-Date: {rfc5322_date(request.arrival)}",
    ]
    last_attempt = rfc5322_date(request.now)
    for address, recipient in zip(addresses, request.recipients, strict=True):
        fields += [
            "",
            f"Final-Recipient: {gates.typed_address(address)}",
            f"Action: {recipient.action}",
            f"Status: {recipient.status}",
        ]
        diagnostic = gates.ascii_text(gates.diagnostic(recipient.diagnostic))
        if diagnostic:
            fields += gates.fold_report_field("Diagnostic-Code", diagnostic)
        fields.append(f"Last-Attempt-Date: {last_attempt}")
    head = "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
    return (head + "".join(field + CRLF for field in fields)).encode("ascii")


def _quoted_header(original: bytes) -> tuple[bytes, bool]:
    """The original's header block, whole fields only, at most `MAX_QUOTED_HEADER` bytes (a first
    field longer than that is cut at a line); and whether anything was left out."""
    fields = split_header_from_body(original).fields
    block = bytearray()
    for field in fields:
        if len(block) + len(field.raw) <= MAX_QUOTED_HEADER:
            block += field.raw
            continue
        if not block:
            head = field.raw[:MAX_QUOTED_HEADER]
            block += head[: head.rfind(b"\n") + 1] or head
        return bytes(block), True
    return bytes(block), False


def _headers_part(block: bytes) -> bytes:
    lines = re.split(rb"\r?\n", block)
    if lines and lines[-1] == b"":
        lines.pop()  # the block's last line ending, not an empty line of its own
    encoding, body = gates.encoded_body(lines)
    head = (
        "Content-Description: Undelivered message headers\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _boundary(request: BounceRequest, parts: Sequence[bytes]) -> str:
    """A boundary that occurs in none of `parts` (RFC 2046 §5.1.1), derived from the ids only."""
    content = b"\n".join(parts).lower()
    seed = f"{request.queue_id}\0{request.message_id_local}"
    for attempt in itertools.count():
        digest = hashlib.sha256(f"{seed}\0{attempt}".encode("utf-8", "replace")).hexdigest()
        # "=_" never occurs in quoted-printable output, so a clash needs 7bit content to hold it.
        boundary = f"=_dsn_{digest[:40]}"
        if boundary.encode("ascii").lower() not in content:
            return boundary
    raise AssertionError("unreachable")  # pragma: no cover


def build_dsn(request: BounceRequest) -> bytes:
    """The RFC 3464 DSN for `request`, as CRLF-terminated MIME ready for Graph's MIME sendMail.

    Addressed `To: <envelope_from>` from `Mail Delivery System <from_address>`, marked
    `Auto-Submitted: auto-replied`; no value from the request can add a header field or a MIME
    part. The same request always gives the same bytes.
    """
    addresses = [gates.address(recipient.address) for recipient in request.recipients]
    quoted, shortened = _quoted_header(request.original)
    parts = [
        _human_part(request, addresses, shortened=shortened),
        _report_part(request, addresses),
        _headers_part(quoted),
    ]
    boundary = _boundary(request, parts)
    host = gates.token(request.reporting_mta)
    head = [
        f"From: Mail Delivery System <{gates.address(request.from_address)}>",
        f"To: <{gates.address(request.envelope_from)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {rfc5322_date(request.now)}",
        f"Message-ID: <{request.message_id_local}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a delivery status notification (RFC 3464) in MIME format.",
    ]
    out = bytearray("".join(line + CRLF for line in head).encode("utf-8"))
    delimiter = f"{CRLF}--{boundary}{CRLF}".encode("ascii")
    for part in parts:
        # The CRLF before "--boundary" belongs to the delimiter (RFC 2046 §5.1.1), so each part
        # keeps the line ending of its last line.
        out += delimiter + part
    out += f"{CRLF}--{boundary}--{CRLF}".encode("ascii")
    return bytes(out)
