"""What the relay accepts as message content: the DATA stream checked line by line (DESIGN §8).

Why this module exists: the SMTP listener must refuse, before anything else looks at a message,
the content that makes downstream parsers disagree (SMTP smuggling, NUL characters, bare CRs in
the header block) or that costs more than it is worth to parse (a huge header block, MIME nested
hundreds of levels deep). Like the rest of the message core it is pure: bytes in, a verdict out, no
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
#                     would see other header fields, e.g. a hidden Bcc, than `message.prepare`
#                     does). Every other bare LF or CR is passed through byte for byte.
#   normalize         Treat every bare CR and bare LF as if the client had sent CRLF: the line is
#                     cut into lines ending in CRLF, each loses one leading dot of transparency
#                     (a lone "." stays a "." line of content, never the end of DATA). Smuggled
#                     commands become text in the body of the one message.
#
# Why not refuse every bare LF, as Postfix does with smtpd_forbid_bare_newline = reject? Because
# DESIGN §7 promises the legacy devices this relay exists for that "bare LF inside the body of an
# otherwise valid message" is tolerated, and such devices are common (`message.headers` keeps
# their line endings on purpose). Postfix reaches the same compromise another way: its
# smtpd_forbid_bare_newline_exclusions default to $mynetworks, the LAN clients this relay serves.
# The end-of-DATA ambiguity, which is the attack, is refused either way; a bare LF that cannot end
# anything is harmless to Graph, which gets the message over HTTPS as MIME, not over SMTP.
#
# Header blocks and MIME nesting are followed by `relay.core.message.structure`.

from __future__ import annotations

import re

from relay.core.errors import SmtpReply
from relay.core.message.structure import (
    BARE_CR_IN_HEADER,
    BareLineEndings,
    ContentLimits,
    ContentRefusedError,
    MimeStructure,
    logical_lines,
)

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


MESSAGE_TOO_BIG = SmtpReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
AMBIGUOUS_END_OF_DATA = SmtpReply(
    550, "5.6.0", 'A "." line next to a bare CR, LF or NUL is not accepted; end lines with CRLF'
)
NUL_CHARACTER = SmtpReply(550, "5.6.0", "NUL characters are not accepted in a message")


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
        self._structure = MimeStructure(limits)
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
            for line in logical_lines(content):
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
    structure = MimeStructure(limits)
    for line in logical_lines(raw):
        structure.line(line)
