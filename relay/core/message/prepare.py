"""The pure message core: what the relay changes in a message for Graph, and nothing else.

Bytes and values in, bytes and values out. No I/O, clocks or randomness: the time, the queue id,
the Message-ID local part and the host names are passed in by the caller. Imports only the standard
library, `relay.core.errors` and its own helpers in `relay.core.message`.
"""

# Theory of operation
# ===================
#
# Graph's MIME `sendMail` delivers to the addresses in the To, Cc and Bcc header fields, not to an
# envelope. The relay promises (DESIGN §7) that Graph delivers to exactly the SMTP envelope
# recipients, and that the message otherwise arrives byte for byte as the client sent it. So we
# never parse a message into an object model and serialise it back: that would re-encode headers,
# re-fold lines and re-wrap bodies. Instead the message is cut into three byte strings
# (`relay.core.message.headers`):
#
#     header fields (each with its own continuation lines and line ending) | separator | body
#
# The body (everything after the first empty line) is never looked at. Header fields are copied as
# the exact bytes they arrived as, except:
#
#   * To/Cc/Bcc fields whose address list actually changes. Their value is tokenized (RFC 5322
#     §3.4, with the §4.4 obsolete forms tolerated; `relay.core.message.addresses`) into items that
#     remember the exact text they came from; a re-emitted field is those kept texts joined by
#     ", " and folded between items. A field that keeps all its items is not re-emitted at all.
#   * New fields: `Received:` at the top (RFC 5321 §4.4), and at the end a `Bcc:` for envelope
#     recipients no header names, `Date:` and `Message-ID:` when the client sent none.
#
# Header bytes are decoded for tokenizing as UTF-8 with errors="surrogateescape": every delimiter of
# the address grammar is ASCII, any byte sequence round-trips exactly, and an SMTPUTF8 address comes
# out as the same `str` the SMTP layer got in RCPT TO, so the two compare directly (ASCII case
# folded only, as Exchange compares them).
# New and re-emitted lines use the line ending the header block already uses (bare LF devices).

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from relay.core.message import UnparseableMessageError
from relay.core.message.addresses import (
    AddressItem,
    canonical_address,
    fold_ascii,
    parse_address_list,
)
from relay.core.message.authors import Authors, UnreadableAuthorError, read_authors
from relay.core.message.dsn import BounceRequest, FailedRecipient, build_dsn
from relay.core.message.graph_json import (
    CannotConvertError,
    GraphJsonTooLargeError,
    GraphMessage,
    to_graph_message,
)
from relay.core.message.headers import (
    Field,
    HeaderAndBody,
    decode_header_text,
    simple_field,
    split_header_from_body,
)
from relay.core.message.loops import is_bounce
from relay.core.message.recipients import RECIPIENT_FIELDS, canonical_authors, reconcile_fields
from relay.core.message.stdlib_email import rfc5322_date

__all__ = [
    "AddressItem",
    "Authors",
    "BounceRequest",
    "CannotConvertError",
    "Envelope",
    "FailedRecipient",
    "GraphJsonTooLargeError",
    "GraphMessage",
    "HeaderAndBody",
    "PreparedMessage",
    "TraceInfo",
    "UnparseableMessageError",
    "UnreadableAuthorError",
    "build_dsn",
    "is_bounce",
    "parse_address_list",
    "prepare_for_graph",
    "read_authors",
    "reconcile_recipients",
    "split_header_from_body",
    "to_graph_message",
    "trace_protocol",
]


# RFC 5321 §4.4 `Protocol = "ESMTP" / "SMTP" / Attdash-atom`; the registered names are those of
# RFC 3848 (ESMTP[S][A]) and RFC 6531 (UTF8SMTP[S][A]), but any atom is valid, so an unusual one
# (e.g. SMTPS for HELO over implicit TLS) is written rather than failing a message at DATA.
_PROTOCOL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_TEXT = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope: MAIL FROM ("" for the null reverse-path) and the RCPT TO addresses."""

    mail_from: str
    recipients: tuple[str, ...]

    def __post_init__(self) -> None:
        for address in (self.mail_from, *self.recipients):
            if any(ch in address for ch in "\r\n\0"):
                raise ValueError(f"envelope address contains a line break or NUL: {address!r}")


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """What the `Received:` trace field records about the SMTP session (RFC 5321 §4.4)."""

    relay_hostname: str
    client_ip: str
    client_hostname: str | None
    helo: str | None
    protocol: str
    queue_id: str
    now: datetime

    def __post_init__(self) -> None:
        if not _PROTOCOL.fullmatch(self.protocol):
            raise ValueError(f"protocol must be an RFC 5321 Attdash-atom: {self.protocol!r}")
        if self.now.tzinfo is None or self.now.utcoffset() is None:
            raise ValueError("TraceInfo.now must be an aware datetime")


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """The message as it goes to Graph, with what the logs and checks need to know about it."""

    mime: bytes
    message_id: str
    subject: str
    header_recipients: tuple[str, ...]
    added_headers: tuple[str, ...]


def trace_protocol(
    *, tls: bool, authenticated: bool, esmtp: bool = True, utf8: bool = False
) -> str:
    """The RFC 3848 / RFC 6531 `with` keyword for a session (e.g. ESMTPSA)."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if utf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


# --- recipient reconciliation ---------------------------------------------------------------------

_SUBJECT_LIMIT = 200


def reconcile_recipients(header_block: bytes, recipients: Sequence[str]) -> bytes:
    """Rewrite To/Cc/Bcc so that they name exactly `recipients`, each once (`reconcile_fields`).

    Fields that need no change stay byte-identical. `header_block` may be a whole message:
    everything after the header block is returned unchanged.
    """
    message = split_header_from_body(header_block)
    return message.assemble(reconcile_fields(message.fields, recipients, message.eol).fields)


# --- trace and identity fields --------------------------------------------------------------------

_TRACE_TOKEN_LIMIT = 255  # a DNS name's length; keeps the Received line far below 998 octets
_TRACE_FORBIDDEN = set(' ()<>;"\\')


def _trace_token(value: str | None, fallback: str = "unknown") -> str:
    """A network-supplied name made safe for the Received field: one printable ASCII token."""
    if not value:
        return fallback
    # Control characters (CR/LF header injection) go; anything else that could end the token or
    # confuse a Received parser (space, comment or angle brackets, ";" before the date) becomes "?".
    cleaned = "".join(
        "?" if ch in _TRACE_FORBIDDEN or not ch.isascii() else ch
        for ch in value
        if ch.isprintable()
    )
    return cleaned[:_TRACE_TOKEN_LIMIT] or fallback


def _dedupe(addresses: Iterable[str]) -> list[str]:
    unique: dict[str, str] = {}
    for address in addresses:
        unique.setdefault(canonical_address(address), address)
    return list(unique.values())


def _received(trace: TraceInfo, envelope: Envelope, eol: bytes) -> Field:
    """The RFC 5321 §4.4 trace field, with the clause names of RFC 5321 and RFC 3848."""
    lines = [
        f"Received: from {_trace_token(trace.helo)}"
        f" ({_trace_token(trace.client_hostname)} [{_trace_token(trace.client_ip)}])",
        f"\tby {_trace_token(trace.relay_hostname)} (smtp-graph-relay)"
        f" with {trace.protocol} id {_trace_token(trace.queue_id)}",
    ]
    date = rfc5322_date(trace.now)
    recipients = _dedupe(envelope.recipients)
    if len(recipients) == 1:  # naming one of several recipients would disclose the others' Bcc
        address = "".join(ch for ch in recipients[0] if ch.isprintable() and ch not in "<>")
        lines.append(f"\tfor <{address[:_TRACE_TOKEN_LIMIT]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    raw = eol.join(line.encode("utf-8") for line in lines) + eol
    return Field(raw, b"Received", len("Received:"))


def _existing(fields: list[Field], key: str) -> tuple[list[Field], Field | None]:
    """The first `key` field with a value; when there is none, the fields without empty ones, so
    that the field the caller adds is the only one (RFC 5322 §3.6 allows one Date, one Message-ID).
    """
    for field in fields:
        # str.split() also drops Unicode whitespace such as \x1c: a value of only that is empty
        if field.key == key and field.value.decode("utf-8", "replace").split():
            return fields, field
    return [f for f in fields if f.key != key], None


def _message_id(field: Field) -> str:
    """The msg-id of an existing Message-ID field, in angle brackets even when the client forgot."""
    text = " ".join(field.value.decode("utf-8", "replace").split())
    bracketed = re.search(r"<[^<>]*>", text)
    if bracketed:
        return "".join(bracketed.group(0).split())
    return f"<{text.split()[0]}>"


# --- the entry points -----------------------------------------------------------------------------


def _header_addresses(fields: Iterable[Field], keys: Sequence[str]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for field in fields:
        if field.key in keys:
            for item in parse_address_list(field.text):
                found.update((fold_ascii(address), None) for address in item.addresses)
    return tuple(found)


def prepare_for_graph(
    message: HeaderAndBody, envelope: Envelope, trace: TraceInfo, *, message_id_local: str
) -> PreparedMessage:
    """The message as Graph's MIME `sendMail` must get it (DESIGN §7).

    `message` is the received message as `split_header_from_body` cut it (once per DATA).
    Adds `Received:` at the top; reconciles To/Cc/Bcc with the envelope recipients; writes author
    items with an ambiguous display name canonically (`relay.core.message.recipients`); appends
    `Date:` and `Message-ID: <{message_id_local}@{relay_hostname}>` when the header block has none
    (an empty one is replaced). Everything else, the body above all, is passed through unchanged.
    """
    if not envelope.recipients:
        raise ValueError("an envelope needs at least one recipient")
    if not _DOT_ATOM_TEXT.fullmatch(message_id_local):
        raise ValueError(f"message_id_local must be RFC 5322 dot-atom-text: {message_id_local!r}")
    reconciled = reconcile_fields(message.fields, envelope.recipients, message.eol)
    fields = canonical_authors(reconciled.fields, message.eol)
    added = ["Received", "Bcc"] if reconciled.bcc_added else ["Received"]

    fields, date = _existing(fields, "date")
    if date is None:
        fields.append(simple_field("Date", rfc5322_date(trace.now), message.eol))
        added.append("Date")
    fields, existing_id = _existing(fields, "message-id")
    if existing_id is None:
        message_id = f"<{message_id_local}@{_trace_token(trace.relay_hostname)}>"
        fields.append(simple_field("Message-ID", message_id, message.eol))
        added.append("Message-ID")
    else:
        message_id = _message_id(existing_id)
    subjects = [f for f in fields if f.key == "subject"]
    subject = decode_header_text(subjects[0].value)[:_SUBJECT_LIMIT] if subjects else ""
    return PreparedMessage(
        mime=message.assemble([_received(trace, envelope, message.eol), *fields]),
        message_id=message_id,
        subject=subject,
        header_recipients=_header_addresses(fields, RECIPIENT_FIELDS),
        added_headers=tuple(added),
    )
