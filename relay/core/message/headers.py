"""A message cut into header fields, the empty line and the body, without changing a byte.

RFC 5322 §2.2 and §3.5: a field runs from a `name:` line through its continuation lines (starting
with SP or HTAB); the header block ends at the first empty line. Lines end with LF, optionally
preceded by CR (devices that send bare LF are common); a field keeps its own line ending.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Field",
    "HeaderAndBody",
    "decode_header_text",
    "decode_words",
    "fold_field",
    "simple_field",
    "split_header_from_body",
]

_FIELD_START = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass(frozen=True, slots=True)
class Field:
    """One header field exactly as received; `name` as written (any case), `key` lowercased."""

    raw: bytes  # the whole field: continuation lines and line ending included
    name: bytes  # as written
    colon: int  # offset of the value in raw

    @property
    def key(self) -> str:
        return self.name.decode("ascii").lower()

    @property
    def value(self) -> bytes:
        value = self.raw[self.colon :]
        value = value[:-1] if value.endswith(b"\n") else value
        return value[:-1] if value.endswith(b"\r") else value

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class HeaderAndBody:
    """A message as header fields, the empty line after them and the body (never looked at)."""

    fields: tuple[Field, ...]
    separator: bytes  # the empty line ending the header block; b"" when there is none
    raw: bytes  # the whole message as received
    body_start: int
    eol: bytes

    @property
    def body(self) -> bytes:
        """The body as bytes (a copy: for large messages prefer `assemble`, which copies once)."""
        return self.raw[self.body_start :]

    def assemble(self, fields: Iterable[Field]) -> bytes:
        """The message with `fields` as its header block; separator and body unchanged."""
        out = bytearray()
        for field in fields:
            if out and not out.endswith(b"\n"):
                out += self.eol  # a last field without line ending is followed by another one
            out += field.raw
        if self.separator and out and not out.endswith(b"\n"):
            out += self.eol
        out += self.separator
        # One copy of the body, straight from the received bytes: a 100 MB message is then
        # held twice at most (as received and as prepared), not three times.
        return b"".join((out, memoryview(self.raw)[self.body_start :]))


_FOLD_AT = 78  # RFC 5322 §2.1.1: lines SHOULD be no more than 78 characters


def fold_field(name: bytes, pieces: Sequence[str], eol: bytes) -> Field:
    """A new field `name: piece, piece, ...`, folded after a comma when a line would pass 78
    characters, never inside a piece. Pieces are header text decoded with surrogateescape."""
    out = bytearray(name + b":")
    column = len(out)
    for n, piece in enumerate(pieces):
        text = piece.encode("utf-8", "surrogateescape") + (b"," if n + 1 < len(pieces) else b"")
        first_line = len(text.split(b"\n", 1)[0])
        if n and column + 1 + first_line > _FOLD_AT:
            out += eol + b" "
            column = 1
        else:
            out += b" "
            column += 1
        out += text
        column = len(text) - text.rfind(b"\n") - 1 if b"\n" in text else column + len(text)
    return Field(bytes(out + eol), name, len(name) + 1)


def simple_field(name: str, value: str, eol: bytes) -> Field:
    """A new one-line field `name: value`."""
    return Field(f"{name}: {value}".encode() + eol, name.encode("ascii"), len(name) + 1)


def split_header_from_body(raw: bytes) -> HeaderAndBody:
    """Cut a message into header fields, the separating empty line and the untouched body."""
    first_lf = raw.find(b"\n")
    eol = b"\n" if first_lf >= 0 and raw[first_lf - 1 : first_lf] != b"\r" else b"\r\n"
    pos = 0
    if raw.startswith(b"From ") and not _FIELD_START.match(raw):
        # An mbox "From " separator line is framing, not a header field.
        pos = len(raw) if first_lf < 0 else first_lf + 1
    starts: list[tuple[int, re.Match[bytes]]] = []
    separator, header_end, body_start = b"", len(raw), len(raw)
    while pos < len(raw):
        lf = raw.find(b"\n", pos)
        line_end = len(raw) if lf < 0 else lf + 1
        line = raw[pos:line_end]
        match = _FIELD_START.match(line)
        if line in (b"\n", b"\r\n"):
            separator, header_end, body_start = line, pos, line_end
            break
        if match:
            starts.append((pos, match))
        elif not (starts and line[:1] in (b" ", b"\t")):
            # Neither a field nor a continuation: the body starts here without its empty line (as
            # RFC 5322 parsers read it); give it the empty line it is missing.
            separator, header_end, body_start = eol, pos, pos
            break
        pos = line_end
    fields = [
        Field(
            raw[start : starts[n + 1][0] if n + 1 < len(starts) else header_end],
            m.group(1),
            m.end(),
        )
        for n, (start, m) in enumerate(starts)
    ]
    return HeaderAndBody(tuple(fields), separator, raw, body_start, eol)


# --- decoded values for logs ----------------------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def _decode_word(match: re.Match[str], errors: str) -> str:
    charset, encoding, data = match.group(1).split("*")[0], match.group(2).upper(), match.group(3)
    try:
        if encoding == "B":
            octets = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        else:
            octets = binascii.a2b_qp(data.encode("ascii"), header=True)
        return octets.decode(charset, errors)
    except (ValueError, LookupError):  # a malformed word stays as written (RFC 2047 §6.3)
        return match.group(0)


def decode_words(text: str, *, errors: str = "strict") -> str:
    """The one RFC 2047 decoder: encoded words decoded, whitespace between adjacent encoded
    words dropped (§6.2). A word that is malformed, names an unknown charset or (with
    errors="strict") does not decode in its charset stays as written (§6.3)."""
    parts: list[str] = []
    last, previous_was_word = 0, False
    for match in _ENCODED_WORD.finditer(text):
        between = text[last : match.start()]
        if not (previous_was_word and not between.strip(" \t\r\n")):
            parts.append(between)
        parts.append(_decode_word(match, errors))
        last, previous_was_word = match.end(), True
    parts.append(text[last:])
    return "".join(parts)


def decode_header_text(value: bytes) -> str:
    """A header value as display text: unfolded, RFC 2047 encoded words decoded, for logs only."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    decoded = decode_words(text, errors="replace")
    printable = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in decoded)
    return " ".join(printable.split())
