"""What the relay accepts as message content: the DATA stream checked line by line (DESIGN §8).

Why this module exists: the SMTP listener must refuse, before anything else looks at a message,
the content that makes downstream parsers disagree (SMTP smuggling, NUL characters, bare CRs in
the header block) or that costs more than it is worth to parse (a huge header block, MIME nested
hundreds of levels deep). Like the rest of `relay.mime` it is pure: bytes in, a verdict out, no
I/O, no clock. It never parses a message into an object model; it follows the MIME structure line
by line, remembering only the open multipart boundaries and the header field being read, so its
memory is bounded by the header limit, whatever the size of the message.

Replies (RFC 3463 enhanced codes):

- content over `max_size`                                  -> 552 5.3.4
- a header block over `max_header_bytes`                   -> 554 5.6.0
- MIME nesting deeper than `max_mime_depth`                -> 554 5.6.0
- a "." line next to a bare CR or LF (SMTP smuggling)      -> 550 5.6.0  (bare_line_endings: reject)
- a bare CR in the message's own header block              -> 550 5.6.0  (bare_line_endings: reject)
- a NUL character anywhere                                 -> 550 5.6.0
"""

# Theory of operation
# ===================
#
# SMTP ends DATA with CRLF "." CRLF and nothing else (RFC 5321 §4.1.1.4); a "." at the start of
# any other line was doubled by the client and loses one dot here (§4.5.2, "transparency"). The
# listener reads the stream up to each CRLF and hands every piece to `DataDecoder.feed`, so a
# bare CR or bare LF can never end DATA: it is just a byte inside a line.
#
# SMTP smuggling (CVE-2023-51764/51765/51766, aiosmtpd CVE-2024-27305) works the other way round:
# the attacker puts `\n.\n`, `\n.\r\n`, `\r.\r`, `\r\n.\n`, `\r\n.\r` or `\r\n\0.\r\n` inside one
# message, which this relay sees as content, hoping that a later, more lenient SMTP server reads
# it as the end of the message and the bytes after it as a second, forged transaction. So each
# line is cut at its bare CRs and LFs; if one of the pieces is a lone "." (ignoring NULs, which
# some servers drop) next to a bare line break, the line is ambiguous.
#
# Bare line endings, decided (smtp.bare_line_endings):
#
#   reject (default)  Refuse only the ambiguous cases: a "." line next to a bare CR or LF, and a
#                     bare CR in the message's header block (a parser that splits lines at CR
#                     would see other header fields, e.g. a hidden Bcc, than `relay.message`
#                     does). Every other bare LF or CR is passed through byte for byte.
#   normalize         Treat every bare CR and bare LF as if the client had sent CRLF: the line is
#                     cut into lines ending in CRLF, each loses one leading dot of transparency
#                     (a lone "." stays a "." line of content, never the end of DATA). Smuggled
#                     commands become text in the body of the one message.
#
# Why not refuse every bare LF, as Postfix does with smtpd_forbid_bare_newline = reject? Because
# DESIGN §7 promises the legacy devices this relay exists for that "bare LF inside the body of an
# otherwise valid message" is tolerated, and such devices are common (`relay.mime.headers` keeps
# their line endings on purpose). Postfix reaches the same compromise another way: its
# smtpd_forbid_bare_newline_exclusions default to $mynetworks, the LAN clients this relay serves.
# The end-of-DATA ambiguity, which is the attack, is refused either way; a bare LF that cannot end
# anything is harmless to Graph, which gets the message over HTTPS as MIME, not over SMTP.
#
# Header blocks and MIME nesting are followed with a small state machine over the content's lines
# (LF-terminated, CR optional, as `relay.mime.headers` reads them): a header block ends at the
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
    "AMBIGUOUS_END_OF_DATA",
    "BARE_CR_IN_HEADER",
    "MESSAGE_TOO_BIG",
    "NUL_CHARACTER",
    "BareLineEndings",
    "ContentLimits",
    "ContentRefusedError",
    "DataDecoder",
    "check_content",
]

BareLineEndings = Literal["reject", "normalize"]

MESSAGE_TOO_BIG = SmtpReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
AMBIGUOUS_END_OF_DATA = SmtpReply(
    550, "5.6.0", 'A "." line next to a bare CR, LF or NUL is not accepted; end lines with CRLF'
)
BARE_CR_IN_HEADER = SmtpReply(
    550, "5.6.0", "Bare CR in the message header is not accepted; end lines with CRLF"
)
NUL_CHARACTER = SmtpReply(550, "5.6.0", "NUL characters are not accepted in a message")


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

_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 §2.2 ftext, as relay.mime.headers
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


class _Structure:
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


def _logical_lines(content: bytes) -> Iterator[bytes]:
    """`content` cut after each LF (the last piece may lack one)."""
    start = 0
    while start < len(content):
        end = content.find(b"\n", start)
        end = len(content) if end < 0 else end + 1
        yield content[start:end]
        start = end


# --- the DATA phase --------------------------------------------------------------------------

_BARE_BREAK = re.compile(rb"\r|\n")


class DataDecoder:
    """One DATA phase: wire lines in, the message content (or the refusal) out.

    `feed` takes what the stream delivered: a line up to and including CRLF, or a fragment of a
    longer line (no CRLF at its end; the next pieces continue it). It returns True when the piece
    was the end-of-data line. After a refusal the rest of the stream is still read (RFC 5321
    §4.2.5: the reply comes after the end of DATA) but nothing more is kept.
    """

    def __init__(self, limits: ContentLimits) -> None:
        self._limits = limits
        self._structure = _Structure(limits)
        # One growing buffer, not a list of line objects: a 100 MB message would otherwise
        # cost ~1.4x its size in per-line overhead before the join doubles it.
        self._buffer = bytearray()
        self._size = 0
        self._pending = bytearray()
        self._partial = False
        self._refusal: SmtpReply | None = None
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def refusal(self) -> SmtpReply | None:
        """The reply that refuses this message, as soon as it is known."""
        return self._refusal

    def feed(self, piece: bytes) -> bool:
        if self._ended:
            raise RuntimeError("DATA already ended")
        if not piece.endswith(b"\r\n"):
            self._partial = True
            if self._refusal is None:
                self._pending += piece
                if self._over_size(len(self._pending)):
                    self._refuse(MESSAGE_TOO_BIG)
            return False
        if self._partial:
            line = bytes(self._pending) + piece
            self._pending.clear()
            self._partial = False
        elif piece == b".\r\n":
            self._ended = True
            return True
        else:
            line = piece
        if self._refusal is None:
            try:
                self._line(line)
            except ContentRefusedError as refused:
                self._refuse(refused.reply)
        return False

    def content(self) -> bytes:
        """The message as the message core gets it; raises `ContentRefusedError`.

        Call once: the lines are released as they are joined, so a large message is not held
        twice (as lines and as one block) for longer than the join itself.
        """
        if not self._ended:
            raise RuntimeError("DATA has not ended")
        if self._refusal is not None:
            raise ContentRefusedError(self._refusal)
        content = bytes(self._buffer)
        self._buffer = bytearray()
        return content

    def _refuse(self, reply: SmtpReply) -> None:
        self._refusal = reply
        self._buffer = bytearray()
        self._pending.clear()

    def _over_size(self, extra: int) -> bool:
        limit = self._limits.max_size
        return limit is not None and self._size + extra > limit

    def _line(self, line: bytes) -> None:
        end = len(line) - 2
        if line.find(b"\r", 0, end) < 0 and line.find(b"\n", 0, end) < 0:
            if b"\0" in line and line[:end].replace(b"\0", b"") == b".":
                raise ContentRefusedError(AMBIGUOUS_END_OF_DATA)  # "\0.": some servers drop NULs
            self._content(line[1:] if line[:1] == b"." else line)
            return
        pieces = _BARE_BREAK.split(line[:end])
        if self._limits.bare_line_endings == "normalize":
            for piece in pieces:
                unstuffed = piece[1:] if piece[:1] == b"." and piece != b"." else piece
                self._content(unstuffed + b"\r\n")
            return
        if any(piece.replace(b"\0", b"") == b"." for piece in pieces):
            raise ContentRefusedError(AMBIGUOUS_END_OF_DATA)
        self._content(line[1:] if line[:1] == b"." else line)

    def _content(self, content: bytes) -> None:
        if b"\0" in content:
            raise ContentRefusedError(NUL_CHARACTER)
        if self._over_size(len(content)):
            raise ContentRefusedError(MESSAGE_TOO_BIG)
        self._size += len(content)
        if content.find(b"\n", 0, len(content) - 1) < 0:
            self._structure.line(content)
        else:
            for line in _logical_lines(content):
                self._structure.line(line)
        self._buffer += content


def check_content(raw: bytes, limits: ContentLimits) -> None:
    """Apply the content checks to a whole message (already out of DATA); raise on refusal.

    The same checks `DataDecoder` makes on each line, except those about the SMTP stream itself
    (the end-of-data ambiguity): size, NUL characters, header block sizes, MIME nesting and, with
    `bare_line_endings: reject`, a bare CR in the message's own header block.
    """
    if limits.max_size is not None and len(raw) > limits.max_size:
        raise ContentRefusedError(MESSAGE_TOO_BIG)
    if b"\0" in raw:
        raise ContentRefusedError(NUL_CHARACTER)
    structure = _Structure(limits)
    for line in _logical_lines(raw):
        structure.line(line)
