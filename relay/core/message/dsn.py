"""Delivery status notifications (bounces): built for mail the relay accepted and then lost, and
recognised so that the relay never bounces one.

After `250` the relay owns the message (DESIGN §5). When Graph refuses it for good, or it expires
after `retry.lifetime`, the envelope sender must be told, in the one form mail software can act on:
an RFC 3464 DSN. That is a `multipart/report; report-type=delivery-status` (RFC 6522) of

  1. text/plain               what happened and what fixes it, for a person;
  2. message/delivery-status  Reporting-MTA, Arrival-Date and, per recipient, Final-Recipient,
                              Action, Status (RFC 3463), Diagnostic-Code, Last-Attempt-Date;
  3. text/rfc822-headers      the original top-level header block (RFC 6522), never the body:
                              the sender has the body, and returning it costs size and privacy,

marked `Auto-Submitted: auto-replied` (RFC 3834 §5) so that responders leave it alone. `is_bounce`
is the other half of loop prevention: nobody sends notifications about notifications (RFC 5321
§4.5.5 and §6.1) or answers automatic mail automatically (RFC 3834 §2).

Pure like the rest of the message core: the clock, the ids and the host names arrive in
`BounceRequest`, and the bytes out (MIME boundary included) are a function of it alone.
"""

# Theory of operation
# ===================
#
# Everything a DSN says about the failure comes from outside: addresses from the SMTP session,
# diagnostics from Microsoft, the reason from the delivery engine. None of it may shape the DSN's
# structure. So every interpolated value passes one of three gates before it is written:
#
#   * `_line`: for text. Characters that are not printable (CR, LF, NEL, U+2028, NUL, tabs, lone
#     surrogates...) become spaces and whitespace runs collapse, so a value is one line of text.
#   * `_address`: for addresses. Unprintable characters and angle brackets are removed, the result
#     is capped at RFC 5321's 256 octets. Non-ASCII addresses are written in the delivery report as
#     RFC 6533 `utf-8` addresses in the 7-bit utf-8-addr-xtext form; in To/From only the address
#     itself can carry them, as UTF-8 (RFC 6532), since an address has no encoded form. Such an
#     address only reaches the relay through an SMTPUTF8 session, whose mail is UTF-8 anyway.
#   * `_token`: for host names and the queue id: printable ASCII without specials, capped.
#
# Header lines the module generates are ASCII apart from that one case; the human-readable part is
# UTF-8 in quoted-printable when it is not plain ASCII. The delivery report is 7-bit by definition
# (RFC 3464 §2.1), so non-ASCII characters of a diagnostic are written there as RFC 6533 `\x{HEX}`
# escapes; the text part carries the diagnostic unescaped.
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

import binascii
import hashlib
import itertools
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from urllib.parse import unquote

from relay.core.message.headers import split_header_from_body

__all__ = ["BounceRequest", "FailedRecipient", "build_dsn", "is_bounce"]

CRLF = "\r\n"

# RFC 3463 §2: class "." subject "." detail, class 2 (success), 4 (persistent transient), 5.
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# RFC 3464 §2.3.3
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_DOT_ATOM_TEXT = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)
# RFC 3464 §2.3.6: Diagnostic-Code = diagnostic-type ";" *text, the type an atom ("smtp", "X-...").
_DIAGNOSTIC_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*[ \t]*;")
_DEFAULT_DIAGNOSTIC_TYPE = "X-Relay"

_ADDRESS_OCTETS = 256  # RFC 5321 §4.5.3.1.3: the longest path
_TOKEN_LIMIT = 255  # a DNS name's length
_DIAGNOSTIC_LIMIT = 998  # characters of a diagnostic kept: one RFC 5322 line's worth
_FOLD_AT = 78  # RFC 5322 §2.1.1: SHOULD
_LINE_LIMIT = 998  # RFC 5322 §2.1.1: MUST
_TEXT_WIDTH = 72
_TOKEN_FORBIDDEN = frozenset(' ()<>;:,@"\\[]')
_PLAIN_LINE = re.compile(rb"[\t -~]*")


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
        if not _address(self.address):
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
        if not _address(self.envelope_from):
            raise ValueError("no DSN for the null reverse-path (RFC 5321 §4.5.5)")
        if not _address(self.from_address):
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


# --- the gates every interpolated value passes -------------------------------------------------


def _line(value: str) -> str:
    """`value` as one line of printable text: no CR, LF or other control or separator character."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in value).split())


def _address(value: str) -> str:
    """An address safe inside `<...>`: printable, no angle brackets, at most 256 UTF-8 octets."""
    cleaned = "".join(ch for ch in value if ch.isprintable() and ch not in "<>").strip()
    octets = cleaned.encode("utf-8")
    if len(octets) <= _ADDRESS_OCTETS:
        return cleaned
    return octets[:_ADDRESS_OCTETS].decode("utf-8", "ignore")


def _token(value: str, fallback: str = "unknown") -> str:
    """A host name or id as one printable ASCII token without specials."""
    cleaned = "".join(
        ch for ch in value if ch.isascii() and ch.isprintable() and ch not in _TOKEN_FORBIDDEN
    )
    return cleaned[:_TOKEN_LIMIT] or fallback


def _xtext(value: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: QCHARs as they are, anything else as `\\x{HEX}`."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "\\+=" else f"\\x{{{ord(ch):02X}}}" for ch in value
    )


def _ascii_text(value: str) -> str:
    """Text for the 7-bit report: non-ASCII characters as RFC 6533 `\\x{HEX}` escapes."""
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):02X}}}" for ch in value)


def _typed_address(address: str) -> str:
    """An RFC 3464 address-type and address: `rfc822; a@b`, or RFC 6533 `utf-8; <xtext>`."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_xtext(address)}"


def _diagnostic(value: str) -> str:
    """The diagnostic as one line of at most 998 characters, with a diagnostic-type."""
    text = _line(value)
    if len(text) > _DIAGNOSTIC_LIMIT:
        text = text[: _DIAGNOSTIC_LIMIT - 3].rstrip() + "..."
    if text and not _DIAGNOSTIC_TYPE.match(text):
        text = f"{_DEFAULT_DIAGNOSTIC_TYPE}; {text}"
    return text


def _fold(name: str, value: str) -> list[str]:
    """`name: value` as lines folded at spaces (RFC 5322 §2.2.3), none over 998 characters.

    Lines stay within 78 characters where the words allow; a word too long for any line (only
    possible in a diagnostic) is cut, because an over-long line is worse than an extra space.
    """
    size = _LINE_LIMIT - len(name) - 2  # what fits after "name: " and after the folding space
    words: list[str] = []
    for word in value.split(" "):
        words.extend(word[i : i + size] for i in range(0, len(word), size))
    lines = [f"{name}:"]
    for word in words:
        if len(lines[-1]) + 1 + len(word) > _FOLD_AT and lines[-1].strip() != f"{name}:":
            lines.append(f" {word}")
        else:
            lines[-1] += f" {word}"
    return lines


# --- transfer encodings -----------------------------------------------------------------------


def _quoted_printable(lines: Iterable[bytes]) -> bytes:
    """Lines (without line endings) as quoted-printable (RFC 2045 §6.7), CRLF line endings."""
    out = bytearray()
    for line in lines:
        # istext=False also encodes a bare CR; soft line breaks come out as LF and become CRLF.
        encoded = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        out += encoded.replace(b"\n", b"\r\n") + b"\r\n"
    return bytes(out)


def _is_7bit(lines: Sequence[bytes]) -> bool:
    """Whether `lines` can go as 7bit content (RFC 2045 §2.7) that every parser reads alike.

    Stricter than §2.7: control characters other than TAB are encoded too, because parsers
    disagree on whether VT, FF or FS end a line (Python's does).
    """
    return all(_PLAIN_LINE.fullmatch(line) and len(line) <= _LINE_LIMIT for line in lines)


def _body(lines: Sequence[bytes]) -> tuple[str, bytes]:
    """The transfer encoding and the encoded body for `lines` (without line endings)."""
    if _is_7bit(lines):
        return "7bit", b"".join(line + b"\r\n" for line in lines)
    return "quoted-printable", _quoted_printable(lines)


# --- the three parts ------------------------------------------------------------------------------


def _human_part(request: BounceRequest, addresses: Sequence[str]) -> bytes:
    host = _token(request.reporting_mta)
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
        *wrap.wrap(_line(request.reason_text)),
        "",
    ]
    for address, recipient in zip(addresses, request.recipients, strict=True):
        text.append(f"  <{address}>: {recipient.action}, status {recipient.status}")
        text.extend(indented.wrap(_diagnostic(recipient.diagnostic)))
    text += [
        "",
        f"Queue ID: {_token(request.queue_id)}",
        f"Arrived:  {format_datetime(request.arrival)}",
        "",
        *wrap.wrap(
            "The header fields of your message are attached below; its body is not, "
            "so keep your copy if you want to send it again."
        ),
    ]
    encoding, body = _body([line.rstrip().encode("utf-8") for line in text])
    head = (
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _report_part(request: BounceRequest, addresses: Sequence[str]) -> bytes:
    fields = [
        f"Reporting-MTA: dns; {_token(request.reporting_mta)}",
        f"X-Queue-ID: {_token(request.queue_id)}",
        f"Arrival-Date: {format_datetime(request.arrival)}",
    ]
    last_attempt = format_datetime(request.now)
    for address, recipient in zip(addresses, request.recipients, strict=True):
        fields += [
            "",
            f"Final-Recipient: {_typed_address(address)}",
            f"Action: {recipient.action}",
            f"Status: {recipient.status}",
        ]
        diagnostic = _ascii_text(_diagnostic(recipient.diagnostic))
        if diagnostic:
            fields += _fold("Diagnostic-Code", diagnostic)
        fields.append(f"Last-Attempt-Date: {last_attempt}")
    head = "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
    return (head + "".join(field + CRLF for field in fields)).encode("ascii")


def _headers_part(original: bytes) -> bytes:
    fields = split_header_from_body(original).fields
    block = b"".join(field.raw for field in fields)
    lines = re.split(rb"\r?\n", block)
    if lines and lines[-1] == b"":
        lines.pop()  # the block's last line ending, not an empty line of its own
    encoding, body = _body(lines)
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
    addresses = [_address(recipient.address) for recipient in request.recipients]
    parts = [
        _human_part(request, addresses),
        _report_part(request, addresses),
        _headers_part(request.original),
    ]
    boundary = _boundary(request, parts)
    host = _token(request.reporting_mta)
    head = [
        f"From: Mail Delivery System <{_address(request.from_address)}>",
        f"To: <{_address(request.envelope_from)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(request.now)}",
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


# --- recognising mail the relay must never bounce -------------------------------------------------

_REPORT_TYPES = frozenset({"delivery-status", "global-delivery-status"})  # RFC 3464, RFC 6533


def _without_comments(text: str) -> str:
    """A structured field value unfolded, with RFC 5322 comments removed (quoted strings kept)."""
    out: list[str] = []
    depth, quoted, escaped = 0, False, False
    for ch in text.replace("\r", "").replace("\n", ""):
        if escaped:
            escaped = False
            if not depth:
                out.append(ch)
        elif ch == "\\":
            escaped = True
            if not depth:
                out.append(ch)
        elif quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            quoted = ch == '"'
            out.append(ch)
    return "".join(out)


def _split_params(text: str) -> list[str]:
    """`text` split at semicolons outside quoted strings."""
    pieces: list[str] = []
    current: list[str] = []
    quoted, escaped = False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            pieces.append("".join(current))
            current = []
            continue
        current.append(ch)
    pieces.append("".join(current))
    return pieces


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _is_report(content_type: str) -> bool:
    """Whether a Content-Type value is multipart/report with a delivery-status report-type."""
    media_type, *params = _split_params(_without_comments(content_type))
    if "".join(media_type.split()).lower() != "multipart/report":
        return False
    for param in params:
        name, _, value = param.partition("=")
        name = name.strip().lower()
        if name == "report-type*":  # RFC 2231 §4 extended value: charset'language'value
            value = unquote(value.strip().split("'", 2)[-1], errors="replace")
        elif name != "report-type":
            continue
        if _unquote(value).lower() in _REPORT_TYPES:
            return True
    return False


def _is_auto_submitted(value: str) -> bool:
    """Whether an Auto-Submitted value says the message was sent automatically (RFC 3834 §5)."""
    keyword = _split_params(_without_comments(value))[0].strip().lower()
    return bool(keyword) and keyword != "no"


def is_bounce(raw: bytes) -> bool:
    """Whether `raw` is mail the relay must never bounce: a DSN or an automatic message.

    True when a top-level Content-Type is multipart/report with report-type delivery-status (or
    RFC 6533's global-delivery-status), in any case, quoting or folding, or when an Auto-Submitted
    field has a value other than "no" (RFC 3834 §5). Only the header block is read; never raises.
    """
    for field in split_header_from_body(raw).fields:
        if field.key == "content-type" and _is_report(field.text):
            return True
        if field.key == "auto-submitted" and _is_auto_submitted(field.text):
            return True
    return False
