"""The MIME tree of a prepared message, read for the JSON form of `sendMail`: one body, attachments.

Why this module exists: `message.graph_json` maps a message onto Graph's `message` resource,
and most of that work is reading MIME, not writing JSON: splitting multiparts, removing transfer
encodings, decoding charsets and RFC 2047 words, choosing the one body and turning every other
leaf into an attachment. That reading lives here; the mapping of headers and recipients onto the
resource stays in `graph_json`, whose header lists what is carried and what is refused.

Pure like the rest of the message core: bytes in, frozen values out; standard library,
`relay.core.errors` and `message.headers` only. Code outside the message core imports from
`relay.core.message.prepare`.
"""

# Theory of operation
# ===================
#
# The message is cut into its MIME tree without re-encoding anything: `message.headers` splits
# each entity into header fields and body, multipart bodies are split at their boundary lines
# (RFC 2046 §5.1.1: the line ending before a delimiter belongs to the delimiter). Only leaf bodies
# are decoded (base64, quoted-printable, 7bit/8bit/binary), so attachment bytes are exactly the
# bytes any MIME reader would get, and `message/rfc822` parts keep their original octets.
#
# One walk, depth first, fills the body slot and the attachment list (`read_content`): the first
# text/plain or text/html leaf in body position is the body (multipart/alternative: html
# preferred, else text/plain), parts of multipart/related other than its root are inline, every
# other leaf is an attachment. What the JSON form cannot carry unchanged (signatures, encryption,
# a calendar invitation, a second body, an undecodable body) raises `CannotConvertError`.

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.core.errors import RelayError, SmtpReply
from relay.core.message.headers import Field, decode_words, split_header_from_body
from relay.core.message.multipart import body_parts
from relay.core.message.stdlib_email import parse_mime_headers

if TYPE_CHECKING:
    from email.message import Message

__all__ = [
    "Attachment",
    "CannotConvertError",
    "Content",
    "Entity",
    "decode_words",
    "header_text",
    "read_content",
]

_MAX_DEPTH = 32  # deeper MIME nesting is an attack, not a message


class CannotConvertError(RelayError, ValueError):
    """The message cannot be expressed as Graph JSON without changing it; `reason` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(reason.split())
        self.reply = SmtpReply(
            554, "5.6.0", f"Message cannot be sent unchanged on this route: {self.reason}"
        )
        super().__init__(self.reason)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A leaf that is not the body; `content` is its decoded bytes."""

    name: str
    content_type: str
    content: bytes
    content_id: str | None = None
    is_inline: bool = False


@dataclass(frozen=True, slots=True)
class Content:
    """What the walk found: the body as (Graph `contentType`, text), if any, and the attachments."""

    body: tuple[str, str] | None
    attachments: tuple[Attachment, ...]


def read_content(top: Entity) -> Content:
    """Walk the tree under `top` once; `CannotConvertError` when JSON cannot carry it unchanged."""
    walk = _Walk()
    walk.visit(top, body_slot=True, inline=False, depth=0)
    return Content(walk.body, tuple(walk.attachments))


# --- header text ----------------------------------------------------------------------------------

_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def header_text(value: bytes) -> str:
    """A raw header value unfolded (RFC 5322 §2.2.3) and read as UTF-8 (RFC 6532), or as
    Latin-1 when it is not UTF-8: 8-bit headers carry no charset, so this is the best reading."""
    value = _FOLD.sub(b"", value).strip(b" \t\r\n")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _readable(text: str) -> str:
    """Text from the stdlib's compat32 parser, whose 8-bit bytes are surrogate escapes, as
    `header_text` would have read the same bytes."""
    return header_text(text.encode("utf-8", "surrogateescape"))


# --- the MIME tree --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entity:
    """One MIME entity: its header fields (parsed for parameters) and its undecoded body."""

    fields: tuple[Field, ...]
    headers: Message
    body: bytes
    default_type: str = "text/plain"

    @classmethod
    def parse(cls, raw: bytes, default_type: str = "text/plain") -> Entity:
        split = split_header_from_body(raw)
        header_bytes = b"".join(f.raw for f in split.fields)
        headers = parse_mime_headers(header_bytes)
        headers.set_default_type(default_type)
        return cls(split.fields, headers, split.body, default_type)

    @property
    def content_type(self) -> str:
        if self.headers.get("content-type") is None:
            return self.default_type
        return self.headers.get_content_type()

    def header(self, name: str) -> str | None:
        for f in self.fields:
            if f.key == name:
                return header_text(f.value)
        return None

    @property
    def disposition(self) -> str:
        return (self.headers.get_content_disposition() or "").lower()

    @property
    def filename(self) -> str | None:
        name = self.headers.get_filename() or self.headers.get_param("name")
        if isinstance(name, tuple):  # an RFC 2231 value get_param did not collapse
            name = name[2]
        return decode_words(_readable(str(name))) if name else None

    @property
    def content_id(self) -> str | None:
        value = self.header("content-id")
        return value.strip().strip("<>").strip() or None if value else None

    def decoded(self) -> bytes:
        """The body with its Content-Transfer-Encoding removed (RFC 2045 §6)."""
        cte = (self.header("content-transfer-encoding") or "7bit").strip().lower()
        if cte in ("7bit", "8bit", "binary"):
            return self.body
        if cte == "base64":
            try:
                return binascii.a2b_base64(self.body)
            except binascii.Error as exc:
                raise CannotConvertError(f"a {self.content_type} part is not valid base64") from exc
        if cte == "quoted-printable":
            return binascii.a2b_qp(self.body)
        raise CannotConvertError(f"unknown Content-Transfer-Encoding {cte[:40]!r}")

    def children(self) -> list[Entity]:
        boundary = self.headers.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise CannotConvertError(f"{self.content_type} without a boundary")
        default = "message/rfc822" if self.content_type == "multipart/digest" else "text/plain"
        return [Entity.parse(part, default) for part in _split_multipart(self.body, boundary)]


def _split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """The body parts between the delimiter lines (`relay.core.message.multipart`)."""
    parts, close = body_parts(body, 0, len(body), boundary.encode("utf-8", "surrogateescape"))
    if parts and close == len(body) and parts[-1].start >= len(body):
        parts.pop()  # a last delimiter line without close delimiter and without content
    return [body[part.start : part.end] for part in parts]


_REFUSED = {
    "multipart/signed": "it is signed (multipart/signed); converting it would break the signature",
    "multipart/encrypted": "it is encrypted (multipart/encrypted)",
    "application/pkcs7-mime": "it is S/MIME (application/pkcs7-mime)",
    "application/x-pkcs7-mime": "it is S/MIME (application/x-pkcs7-mime)",
}
_EXTENSIONS = {
    "application/pdf": ".pdf",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "message/rfc822": ".eml",
}


@dataclass(slots=True)
class _Walk:
    """Collects the body and the attachments while walking the tree once, depth first."""

    body: tuple[str, str] | None = None  # (contentType, text)
    attachments: list[Attachment] = field(default_factory=list)

    def visit(self, entity: Entity, *, body_slot: bool, inline: bool, depth: int) -> None:
        kind = entity.content_type
        if depth > _MAX_DEPTH:
            raise CannotConvertError("MIME nesting is too deep")
        if kind in _REFUSED:
            raise CannotConvertError(_REFUSED[kind])
        if kind.startswith("multipart/"):
            self._multipart(entity, body_slot=body_slot, depth=depth)
            return
        textual = kind in ("text/plain", "text/html") and entity.disposition != "attachment"
        if textual and entity.filename is None:
            if not body_slot or self.body is not None:
                raise CannotConvertError(f"a second {kind} body part (JSON has one body)")
            self.body = ("html" if kind == "text/html" else "text", _text(entity))
            return
        if kind == "text/calendar" and entity.disposition != "attachment":
            raise CannotConvertError(
                "a calendar invitation would arrive as an .ics file, not as a meeting request"
            )
        self._attach(entity, inline=inline)

    def _multipart(self, entity: Entity, *, body_slot: bool, depth: int) -> None:
        children = entity.children()
        if not children:
            raise CannotConvertError(f"{entity.content_type} without parts")
        kind = entity.content_type
        if kind == "multipart/alternative":
            if not body_slot or self.body is not None:
                raise CannotConvertError("multipart/alternative outside the message body")
            kinds = [c.content_type for c in children]
            if "text/calendar" in kinds:
                raise CannotConvertError(
                    "a calendar invitation would arrive as an .ics file, not as a meeting request"
                )
            html = [c for c in children if c.content_type in ("text/html", "multipart/related")]
            plain = [c for c in children if c.content_type == "text/plain"]
            # RFC 2046 §5.1.4: the last alternative is the preferred one.
            chosen = html[-1] if html else plain[-1] if plain else children[-1]
            self.visit(chosen, body_slot=True, inline=False, depth=depth + 1)
            return
        if kind == "multipart/related":
            start = entity.headers.get_param("start")
            wanted = start.strip("<>") if isinstance(start, str) else None
            root = next((c for c in children if wanted and c.content_id == wanted), children[0])
            self.visit(root, body_slot=body_slot, inline=False, depth=depth + 1)
            for child in children:
                if child is not root:
                    self.visit(child, body_slot=False, inline=True, depth=depth + 1)
            return
        for n, child in enumerate(children):  # mixed, report, digest and unknown: as mixed
            self.visit(child, body_slot=body_slot and n == 0, inline=False, depth=depth + 1)

    def _attach(self, entity: Entity, *, inline: bool) -> None:
        kind = entity.content_type
        content = entity.decoded()
        name = entity.filename
        if not name and kind == "message/rfc822":
            subject = Entity.parse(content).header("subject")
            name = (decode_words(subject).strip() if subject else "") or "message"
            name += ".eml"
        if not name:
            name = f"attachment{len(self.attachments) + 1}{_EXTENSIONS.get(kind, '')}"
        content_id = entity.content_id
        is_inline = bool(content_id) and (inline or entity.disposition == "inline")
        self.attachments.append(
            Attachment(name, kind, content, content_id if is_inline else None, is_inline)
        )


def _text(entity: Entity) -> str:
    """A text part's content, decoded strictly: a wrong guess would change the text."""
    octets = entity.decoded()
    charset = entity.headers.get_content_charset()
    try:
        return octets.decode(charset or "utf-8")
    except LookupError as exc:
        raise CannotConvertError(f"unknown charset {charset!r}") from exc
    except UnicodeDecodeError as exc:
        raise CannotConvertError(
            f"the {entity.content_type} body is not valid {charset or 'UTF-8'}"
        ) from exc
