"""The pure message core: what the relay changes in a message for Graph, and nothing else.

Bytes and values in, bytes and values out. No I/O, clocks or randomness: the time, the queue id,
the Message-ID local part and the host names are passed in by the caller. Imports only the standard
library, `relay.errors` and its own helpers in `relay.mime`.
"""

# Theory of operation
# ===================
#
# Graph's MIME `sendMail` delivers to the addresses in the To, Cc and Bcc header fields, not to an
# envelope. The relay promises (DESIGN §7) that Graph delivers to exactly the SMTP envelope
# recipients, and that the message otherwise arrives byte for byte as the client sent it. So we
# never parse a message into an object model and serialise it back: that would re-encode headers,
# re-fold lines and re-wrap bodies. Instead the message is cut into three byte strings
# (`relay.mime.headers`):
#
#     header fields (each with its own continuation lines and line ending) | separator | body
#
# The body (everything after the first empty line) is never looked at. Header fields are copied as
# the exact bytes they arrived as, except:
#
#   * To/Cc/Bcc fields whose address list actually changes. Their value is tokenized (RFC 5322
#     §3.4, with the §4.4 obsolete forms tolerated; `relay.mime.addresses`) into items that
#     remember the exact text they came from; a re-emitted field is those kept texts joined by
#     ", " and folded between items. A field that keeps all its items is not re-emitted at all.
#   * New fields: `Received:` at the top (RFC 5321 §4.4), and at the end a `Bcc:` for envelope
#     recipients no header names, `Date:` and `Message-ID:` when the client sent none.
#
# Header bytes are decoded for tokenizing as UTF-8 with errors="surrogateescape": every delimiter of
# the address grammar is ASCII, any byte sequence round-trips exactly, and an SMTPUTF8 address comes
# out as the same `str` the SMTP layer got in RCPT TO, so the two compare directly (casefolded).
# New and re-emitted lines use the line ending the header block already uses (bare LF devices).

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from relay.core.message import UnparseableMessageError
from relay.core.message.addresses import (
    AddressItem,
    canonical_address,
    parse_address_list,
    parse_addresses,
)
from relay.core.message.dsn import BounceRequest, FailedRecipient, build_dsn, is_bounce
from relay.core.message.graph_json import (
    CannotConvertError,
    GraphJsonTooLargeError,
    GraphMessage,
    to_graph_message,
)
from relay.core.message.headers import (
    Field,
    decode_header_text,
    fold_field,
    simple_field,
    split_message,
)

__all__ = [
    "AddressItem",
    "BounceRequest",
    "CannotConvertError",
    "Envelope",
    "FailedRecipient",
    "GraphJsonTooLargeError",
    "GraphMessage",
    "PreparedMessage",
    "TraceInfo",
    "UnparseableMessageError",
    "author_addresses",
    "build_dsn",
    "is_bounce",
    "parse_address_list",
    "prepare_for_graph",
    "reconcile_recipients",
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

_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_SUBJECT_LIMIT = 200


def _group_pieces(item: AddressItem, kept: Sequence[AddressItem]) -> list[str]:
    """A rebuilt group `name: m1, m2;` as pieces that, joined with ", ", give its text."""
    if not kept:
        return [f"{item.group_name}:;"]
    pieces = [member.raw for member in kept]
    pieces[0] = f"{item.group_name}: {pieces[0]}"
    pieces[-1] += ";"
    return pieces


@dataclass(slots=True)
class _Reconciler:
    """Walks the recipient fields once, keeping the first mention of each envelope recipient."""

    wanted: dict[str, str]  # canonical form -> envelope spelling, in envelope order
    seen: set[str]

    def keep(self, item: AddressItem) -> bool:
        canonical = canonical_address(item.addresses[0]) if item.addresses else None
        if canonical is None or canonical not in self.wanted or canonical in self.seen:
            return False
        self.seen.add(canonical)
        return True

    def filter(self, items: Sequence[AddressItem]) -> tuple[list[str], bool]:
        """The pieces to emit for the kept items, and whether anything was dropped."""
        pieces: list[str] = []
        changed = False
        for item in items:
            if item.group_name is None:
                if self.keep(item):
                    pieces.append(item.raw)
                else:
                    changed = True
                continue
            kept = [member for member in item.members if self.keep(member)]
            if len(kept) == len(item.members):
                pieces.append(item.raw)
            else:
                changed = True
                pieces.extend(_group_pieces(item, kept))
        return pieces, changed


def _reconcile(
    fields: Sequence[Field], recipients: Sequence[str], eol: bytes
) -> tuple[list[Field], bool]:
    """The fields with To/Cc/Bcc naming exactly `recipients`; and whether a Bcc field was added."""
    reconciler = _Reconciler({}, set())
    for address in recipients:
        reconciler.wanted.setdefault(canonical_address(address), address)
    out: list[Field] = []
    bcc: tuple[int, list[str]] | None = None  # the first remaining Bcc field: position, pieces
    for field in fields:
        if field.key not in _RECIPIENT_FIELDS:
            out.append(field)
            continue
        parsed = parse_addresses(field.text)
        pieces, changed = reconciler.filter(parsed.items)
        if changed and not pieces:
            continue  # nothing left to name: RFC 5322 has no use for an empty recipient field
        if field.key == "bcc" and bcc is None:
            bcc = (len(out), pieces)
        out.append(fold_field(field.name, pieces, eol) if changed or parsed.semicolons else field)
    missing = [a for c, a in reconciler.wanted.items() if c not in reconciler.seen]
    if not missing:
        return out, False
    if bcc is None:
        out.append(fold_field(b"Bcc", missing, eol))
        return out, True
    position, pieces = bcc
    out[position] = fold_field(out[position].name, [*pieces, *missing], eol)
    return out, False


def reconcile_recipients(header_block: bytes, recipients: Sequence[str]) -> bytes:
    """Rewrite To/Cc/Bcc so that they name exactly `recipients`, each once.

    Header recipients that are not envelope recipients (or repeat an earlier mention) are removed;
    envelope recipients no field names are added to the first remaining Bcc field, or to a new Bcc
    field at the end of the header block. Comparison is case-insensitive. Fields that need no change
    stay byte-identical. `header_block` may be a whole message: everything after the header block
    is returned unchanged.
    """
    message = split_message(header_block)
    fields, _ = _reconcile(message.fields, recipients, message.eol)
    return message.assemble(fields)


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
    date = format_datetime(trace.now)
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
                found.update((address.lower(), None) for address in item.addresses)
    return tuple(found)


def author_addresses(raw: bytes) -> tuple[str, ...]:
    """The addresses in the top-level From and Sender fields, lowercased, first mention first.

    Used by the sender policy (DESIGN §8), so a field that cannot be tokenized raises
    `UnparseableMessageError` rather than yielding a partial answer. `()` when there are none.
    """
    return _header_addresses(split_message(raw).fields, ("from", "sender"))


def prepare_for_graph(
    raw: bytes, envelope: Envelope, trace: TraceInfo, *, message_id_local: str
) -> PreparedMessage:
    """The message as Graph's MIME `sendMail` must get it (DESIGN §7).

    Adds `Received:` at the top; reconciles To/Cc/Bcc with the envelope recipients; appends
    `Date:` and `Message-ID: <{message_id_local}@{relay_hostname}>` when the header block has none
    (an empty one is replaced). Everything else, the body above all, is passed through unchanged.
    """
    if not envelope.recipients:
        raise ValueError("an envelope needs at least one recipient")
    if not _DOT_ATOM_TEXT.fullmatch(message_id_local):
        raise ValueError(f"message_id_local must be RFC 5322 dot-atom-text: {message_id_local!r}")
    message = split_message(raw)
    fields, bcc_added = _reconcile(message.fields, envelope.recipients, message.eol)
    added = ["Received", "Bcc"] if bcc_added else ["Received"]

    fields, date = _existing(fields, "date")
    if date is None:
        fields.append(simple_field("Date", format_datetime(trace.now), message.eol))
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
        header_recipients=_header_addresses(fields, _RECIPIENT_FIELDS),
        added_headers=tuple(added),
    )
