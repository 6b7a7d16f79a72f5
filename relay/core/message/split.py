"""Cut a MIME message into a small "skeleton" and the big attachments it carries.

Why this module exists: Graph takes at most 4 MB per request, so a message with big attachments
is sent as a draft made from the skeleton (the message with those attachments left out) plus
one upload session per big attachment (concepts/outlook-large-attachments.md: files of 3 MB to
150 MB go through an upload session, smaller ones stay in the draft). Pure: bytes in, values
out; no I/O.
"""

# Theory of operation
# ===================
#
# Like `message.prepare`, this never parses the message into an object model and serialises it
# back. It walks the MIME tree by byte offsets into the one copy of the message the caller
# holds: an entity is `header block | empty line | body`, a multipart body is
# `preamble (delimiter part)* close-delimiter epilogue`, where a delimiter line is `--boundary`
# at the start of a line, and the line break before it belongs to the delimiter (RFC 2046
# §5.1.1). The skeleton is the message with the byte ranges `[delimiter, end of part)` of the
# big attachments skipped; every other byte, including the reconciled top-level header block,
# is copied as it is. Only header blocks are handed to the `email` package (small).
#
# A big attachment is described by its metadata and the offsets of its encoded body; its bytes
# are produced on demand by `iter_decoded`/`BigAttachment.chunks`, which decode base64 or
# quoted-printable one window at a time, so no full decoded or re-encoded copy ever exists.

from __future__ import annotations

import binascii
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from relay.core.message.headers import decode_words
from relay.core.message.multipart import body_parts
from relay.core.message.stdlib_email import collapse_parameter, parse_mime_headers

if TYPE_CHECKING:
    from email.message import Message

__all__ = [
    "BIG_ATTACHMENT",
    "BigAttachment",
    "SkeletonSplit",
    "iter_decoded",
    "split_off_big_attachments",
]

# attachment-createuploadsession.md: "Use this approach to attach a file if the file size is
# between 3 MB and 150 MB"; smaller files are refused (ErrorAttachmentSizeShouldNotBeLess...).
BIG_ATTACHMENT = 3 * 1024 * 1024
MAX_DEPTH = 30
_WINDOW = 1024 * 1024  # encoded bytes decoded at a time (a multiple of 4)
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_B64 = bytes(b for b in range(256) if b not in _B64_ALPHABET)
_FILLER = b"Content-Type: text/plain; charset=us-ascii"

Encoding = Literal["base64", "quoted-printable", "identity"]


@dataclass(frozen=True, slots=True)
class BigAttachment:
    """One attachment left out of the skeleton; `start:end` is its encoded body in the source."""

    name: str
    content_type: str
    content_id: str | None
    is_inline: bool
    size: int  # decoded bytes: the upload session's `size`
    encoding: Encoding
    start: int
    end: int

    def chunks(self, source: bytes, size: int, *, skip: int = 0) -> Iterator[bytes]:
        """The decoded bytes from offset `skip`, in pieces of exactly `size` (the last shorter)."""
        if size <= 0:
            raise ValueError("chunk size must be positive")
        pending = bytearray()
        for piece in iter_decoded(source, self.start, self.end, self.encoding):
            if skip:
                dropped = min(skip, len(piece))
                piece, skip = piece[dropped:], skip - dropped
            pending += piece
            while len(pending) >= size:
                yield bytes(pending[:size])
                del pending[:size]
        if pending:
            yield bytes(pending)


@dataclass(frozen=True, slots=True)
class SkeletonSplit:
    """The skeleton (a complete message) and the attachments to upload separately, in order."""

    skeleton: bytes
    attachments: tuple[BigAttachment, ...]


def iter_decoded(source: bytes, start: int, end: int, encoding: Encoding) -> Iterator[bytes]:
    """Decode `source[start:end]` a window at a time; joined, equals decoding it whole.

    base64 is decoded leniently, as mail readers do: characters outside the alphabet (line
    breaks, spaces) are skipped, decoding stops at padding, a dangling final group is padded.
    """
    view = memoryview(source)
    if encoding == "identity":
        for pos in range(start, end, _WINDOW):
            yield bytes(view[pos : min(pos + _WINDOW, end)])
        return
    if encoding == "quoted-printable":
        carry = b""
        for pos in range(start, end, _WINDOW):
            data = carry + bytes(view[pos : min(pos + _WINDOW, end)])
            cut = data.rfind(b"\n") + 1  # decode whole lines only: "=" may end a line
            carry = data[cut:]
            if cut:
                yield binascii.a2b_qp(data[:cut])
        if carry:
            yield binascii.a2b_qp(carry)
        return
    carry = b""
    for pos in range(start, end, _WINDOW):
        data = carry + bytes(view[pos : min(pos + _WINDOW, end)]).translate(None, _NOT_B64)
        padding = data.find(b"=")
        if padding >= 0:
            carry = data[:padding]
            break
        usable = len(data) - len(data) % 4
        carry = data[usable:]
        if usable:
            yield binascii.a2b_base64(data[:usable])
    if len(carry) % 4 >= 2:  # one leftover character cannot carry a byte; drop it
        yield binascii.a2b_base64(carry + b"=" * (-len(carry) % 4))
    elif len(carry) >= 4:
        usable = len(carry) - len(carry) % 4
        yield binascii.a2b_base64(carry[:usable])


def split_off_big_attachments(source: bytes, *, threshold: int = BIG_ATTACHMENT) -> SkeletonSplit:
    """Leave out of `source` every attachment whose decoded size is at least `threshold`.

    Attachments are leaf parts below a multipart other than text/plain and text/html bodies
    (those without a file name or `attachment` disposition). The top-level entity is never
    left out. A multipart left without parts gets an empty text/plain part, since RFC 2046
    §5.1.1 requires at least one body part.
    """
    walker = _Walker(source, threshold, _eol(source))
    pieces = walker.entity(0, len(source), depth=0, top=True)
    assert pieces is not None
    skeleton = b"".join(p if isinstance(p, bytes) else source[p[0] : p[1]] for p in pieces)
    return SkeletonSplit(skeleton=skeleton, attachments=tuple(walker.found))


# --- the walk --------------------------------------------------------------------------------

_Piece = tuple[int, int] | bytes


def _eol(source: bytes) -> bytes:
    first = source.find(b"\n")
    return b"\r\n" if first > 0 and source[first - 1 : first] == b"\r" else b"\n"


def _header_end(buf: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the entity at `start:end`."""
    for blank in (b"\r\n", b"\n"):
        if buf.startswith(blank, start):
            return start, start + len(blank)
    crlf = buf.find(b"\n\r\n", start, end)
    lf = buf.find(b"\n\n", start, end)
    if crlf < 0 and lf < 0:
        return end, end
    if lf < 0 or 0 <= crlf < lf:
        return crlf + 1, crlf + 3
    return lf + 1, lf + 2


def _text(value: str | None) -> str | None:
    return decode_words(value) if value is not None else None


@dataclass(slots=True)
class _Walker:
    source: bytes
    threshold: int
    eol: bytes
    found: list[BigAttachment] = field(default_factory=list)

    def entity(self, start: int, end: int, *, depth: int, top: bool = False) -> list[_Piece] | None:
        """The skeleton pieces of the entity at `start:end`; None when it is left out."""
        header_end, body = _header_end(self.source, start, end)
        headers = parse_mime_headers(self.source[start:header_end])
        boundary = _param(headers, "boundary")
        if headers.get_content_maintype() == "multipart" and boundary:
            if depth >= MAX_DEPTH:
                return [(start, end)]
            return self.multipart(headers, boundary, start, body, end, depth)
        if top:
            return [(start, end)]
        attachment = self.attachment(headers, body, end)
        if attachment is None:
            return [(start, end)]
        self.found.append(attachment)
        return None

    def multipart(
        self, headers: Message, boundary: str, start: int, body: int, end: int, depth: int
    ) -> list[_Piece]:
        encoded = boundary.encode("utf-8", "surrogateescape")
        parts, close = body_parts(self.source, body, end, encoded)
        if not parts:
            return [(start, end)]
        pieces: list[_Piece] = [(start, parts[0].delimiter)]
        kept = 0
        for part in parts:
            inner = self.entity(part.start, part.end, depth=depth + 1)
            if inner is None:
                continue
            kept += 1
            pieces.append((part.delimiter, part.start))
            pieces.extend(inner)
        if not kept:
            lead = self.eol if parts[0].delimiter != body else b""
            pieces.append(lead + b"--" + encoded + self.eol + _FILLER + self.eol + self.eol)
        pieces.append((close, end))
        return pieces

    def attachment(self, headers: Message, body: int, end: int) -> BigAttachment | None:
        """The part as a big attachment, or None when it stays in the skeleton."""
        if end - body < self.threshold:
            return None  # no encoding makes a part bigger when decoded
        content_type = headers.get_content_type()
        disposition = (headers.get_content_disposition() or "").lower()
        name = _text(headers.get_filename()) or _text(_param(headers, "name"))
        if content_type in ("text/plain", "text/html") and not name and disposition != "attachment":
            return None  # a message body, not an attachment
        cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
        encoding: Encoding = (
            "base64"
            if cte == "base64"
            else "quoted-printable"
            if cte == "quoted-printable"
            else "identity"
        )
        size = sum(len(piece) for piece in iter_decoded(self.source, body, end, encoding))
        if size < self.threshold:
            return None
        raw_id = headers.get("content-id")
        content_id = str(raw_id).strip().strip("<>").strip() or None if raw_id else None
        return BigAttachment(
            name=name or _default_name(content_type),
            content_type=content_type,
            content_id=content_id,
            is_inline=disposition == "inline" or (not disposition and content_id is not None),
            size=size,
            encoding=encoding,
            start=body,
            end=end,
        )


def _param(headers: Message, name: str) -> str | None:
    value = headers.get_param(name)
    if value is None:
        return None
    return collapse_parameter(value)


def _default_name(content_type: str) -> str:
    if content_type == "message/rfc822":
        return "message.eml"
    return "attachment"
