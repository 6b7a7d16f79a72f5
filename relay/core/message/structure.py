"""The MIME structure of a message in DATA, followed line by line to hold it to its limits.

Why this module exists: `relay.core.message.limits` checks the DATA stream as it arrives, and part
of that check is structural: every header block (the message's and each part's) is held to
`max_header_bytes`, and MIME nesting to `max_mime_depth`. That state machine is this module; the
line-level defences against SMTP smuggling stay in `limits`. Pure: lines in, a verdict out, memory
bounded by the header limit whatever the size of the message.
"""

# Theory of operation
# ===================
#
# Header blocks and MIME nesting are followed with a small state machine over the content's lines
# (LF-terminated, CR optional, as `message.headers` reads them): a header block ends at the
# first empty line, or at a line that is neither a field nor a continuation; a `multipart/*`
# Content-Type with a boundary opens a level, as does a `message/rfc822` or `message/global` part
# (whose body starts with another header block); `--boundary` starts the next part and
# `--boundary--` closes the level (RFC 2046 §5.1.1), closing whatever was nested inside it. Every
# header block (the message's and each part's) is held to `max_header_bytes`.

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from relay.core.errors import RelayError, SmtpReply

__all__ = [
    "BARE_CR_IN_HEADER",
    "BareLineEndings",
    "ContentLimits",
    "ContentRefusedError",
    "MimeStructure",
    "logical_lines",
]

BareLineEndings = Literal["reject", "normalize"]

BARE_CR_IN_HEADER = SmtpReply(
    550, "5.6.0", "Bare CR in the message header is not accepted; end lines with CRLF"
)


@dataclass(frozen=True, slots=True)
class ContentLimits:
    """What the DATA phase accepts. `max_size` counts content bytes; None means no limit."""

    max_size: int | None = None
    max_header_bytes: int = 1024 * 1024
    max_mime_depth: int = 50
    bare_line_endings: BareLineEndings = "reject"

    def __post_init__(self) -> None:
        if self.max_size is not None and self.max_size < 1:
            raise ValueError("max_size must be positive")
        if self.max_header_bytes < 1 or self.max_mime_depth < 1:
            raise ValueError("max_header_bytes and max_mime_depth must be positive")
        if self.bare_line_endings not in ("reject", "normalize"):
            raise ValueError(f"unknown bare_line_endings {self.bare_line_endings!r}")

    def header_too_big(self) -> SmtpReply:
        return SmtpReply(
            554, "5.6.0", f"Message header block exceeds {self.max_header_bytes} bytes"
        )

    def mime_too_deep(self) -> SmtpReply:
        return SmtpReply(554, "5.6.0", f"MIME nesting exceeds {self.max_mime_depth} levels")


class ContentRefusedError(RelayError):
    """The message cannot be accepted; `reply` is the SMTP answer to the end of DATA."""

    def __init__(self, reply: SmtpReply) -> None:
        self.reply = reply
        super().__init__(str(reply))


# --- MIME structure --------------------------------------------------------------------------

_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 §2.2 ftext, as message.headers
_CONTENT_FIELD = re.compile(rb"(?i)content-(type|transfer-encoding)[ \t]*:")
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 2045 §5.1 token
_MEDIA_TYPE = re.compile(rb"\s*(" + _TOKEN + rb")\s*/\s*(" + _TOKEN + rb")")
_BOUNDARY = re.compile(rb'(?i);\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))')
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
_UNFOLD = re.compile(rb"\r?\n")
_OPAQUE_ENCODINGS = (b"base64", b"quoted-printable")  # an encoded message/rfc822 is not followed


@dataclass(frozen=True, slots=True)
class _Multipart:
    delimiter: bytes  # b"--" + boundary
    digest: bool  # RFC 2046 §5.1.5: parts default to message/rfc822


_MESSAGE = None  # a stack entry for an encapsulated message (message/rfc822)


class MimeStructure:
    """Follows header blocks and MIME nesting over the content's lines (each ending in LF)."""

    def __init__(self, limits: ContentLimits) -> None:
        self._limits = limits
        self._stack: list[_Multipart | None] = []
        self._delimiters = 0  # multipart entries in the stack
        self._in_header = True
        self._top = True  # the header block being read is the message's own
        self._first = True
        self._header_bytes = 0
        self._has_field = False
        self._field: bytearray | None = None  # a Content-* field being read
        self._type = b""
        self._encoding = b""
        self._digest_part = False

    def line(self, line: bytes) -> None:
        if self._in_header:
            self._header_line(line)
        elif self._delimiters and line[:2] == b"--":
            self._delimiter(line)

    def _header_line(self, line: bytes) -> None:
        self._header_bytes += len(line)
        if self._header_bytes > self._limits.max_header_bytes:
            raise ContentRefusedError(self._limits.header_too_big())
        first, self._first = self._first, False
        if line in (b"\n", b"\r\n"):
            self._end_header()
            return
        if self._top and self._limits.bare_line_endings == "reject" and b"\r" in _chomp(line):
            raise ContentRefusedError(BARE_CR_IN_HEADER)
        if _FIELD_START.match(line):
            self._keep_field()
            self._has_field = True
            match = _CONTENT_FIELD.match(line)
            self._field = bytearray(line) if match else None
        elif self._has_field and line[:1] in (b" ", b"\t"):
            if self._field is not None:
                self._field += line
        elif first and self._top and line.startswith(b"From "):
            pass  # an mbox separator line is framing, not a header field
        else:
            # Neither a field nor a continuation: the body starts here without an empty line.
            self._end_header()
            self.line(line)

    def _keep_field(self) -> None:
        field, self._field = self._field, None
        if field is None:
            return
        name, _, value = bytes(field).partition(b":")
        value = _UNFOLD.sub(b"", value)
        if name.rstrip(b" \t").lower() == b"content-type":
            self._type = value
        else:
            self._encoding = value.strip().lower()

    def _end_header(self) -> None:
        self._keep_field()
        self._in_header = False
        media = _MEDIA_TYPE.match(self._type)
        if media:
            kind, subtype = media.group(1).lower(), media.group(2).lower()
        elif self._digest_part:
            kind, subtype = b"message", b"rfc822"
        else:
            kind, subtype = b"text", b"plain"
        boundary = _boundary(self._type) if kind == b"multipart" else None
        if boundary:
            self._push(_Multipart(b"--" + boundary, subtype == b"digest"))
        elif (
            kind == b"message"
            and subtype in (b"rfc822", b"global")
            and self._encoding not in _OPAQUE_ENCODINGS
        ):
            self._push(_MESSAGE)
            self._start_header(digest_part=False)

    def _push(self, entry: _Multipart | None) -> None:
        if len(self._stack) >= self._limits.max_mime_depth:
            raise ContentRefusedError(self._limits.mime_too_deep())
        self._stack.append(entry)
        if entry is not None:
            self._delimiters += 1

    def _start_header(self, *, digest_part: bool) -> None:
        self._in_header = True
        self._top = False
        self._header_bytes = 0
        self._has_field = False
        self._field = None
        self._type = b""
        self._encoding = b""
        self._digest_part = digest_part

    def _delimiter(self, line: bytes) -> None:
        text = _chomp(line).rstrip(b" \t")  # RFC 2046 §5.1.1 allows transport padding
        for depth in range(len(self._stack) - 1, -1, -1):
            entry = self._stack[depth]
            if entry is None:
                continue
            if text == entry.delimiter:  # the next part of this multipart
                self._pop_to(depth + 1)
                self._start_header(digest_part=entry.digest)
                return
            if text == entry.delimiter + b"--":  # this multipart ends
                self._pop_to(depth)
                return

    def _pop_to(self, depth: int) -> None:
        del self._stack[depth:]
        self._delimiters = sum(entry is not None for entry in self._stack)


def _chomp(line: bytes) -> bytes:
    """The line without its line ending (LF or CRLF)."""
    if line.endswith(b"\n"):
        line = line[:-1]
    return line[:-1] if line.endswith(b"\r") else line


def _boundary(content_type: bytes) -> bytes | None:
    match = _BOUNDARY.search(content_type)
    if not match:
        return None
    if match.group(1) is not None:
        return _QUOTED_PAIR.sub(rb"\1", match.group(1)) or None
    return match.group(2)


def logical_lines(content: bytes) -> Iterator[bytes]:
    """`content` cut after each LF (the last piece may lack one)."""
    start = 0
    while start < len(content):
        end = content.find(b"\n", start)
        end = len(content) if end < 0 else end + 1
        yield content[start:end]
        start = end
