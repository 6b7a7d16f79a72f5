"""The one multipart walker: where the body parts of a multipart body start and end (RFC 2046).

Why this module exists: two readers of the message core cut multipart bodies, the large-message
path (`relay.core.message.split`, which needs byte offsets to copy everything but the big
attachments) and the JSON form (`relay.core.message.parts`, which needs each part's bytes). Both
must agree on the same grammar, so both use this. Pure: bytes and offsets in, offsets out.

RFC 2046 §5.1.1: a delimiter line is `--boundary` at the start of a line, optionally followed by
transport padding; `--boundary--` closes the body. The line break before a delimiter belongs to
the delimiter, so a part ends before it. A boundary that merely starts another, longer one is not
a delimiter. A missing close delimiter is tolerated: the last part runs to the end.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BodyPart", "body_parts"]


@dataclass(frozen=True, slots=True)
class BodyPart:
    """One body part of a multipart body, as offsets into the buffer."""

    delimiter: int  # where the delimiter line (with the line break before it) starts
    start: int
    end: int


def body_parts(buf: bytes, start: int, end: int, boundary: bytes) -> tuple[list[BodyPart], int]:
    """The body parts of a multipart body and where its close delimiter starts (or `end`)."""
    marker = b"--" + boundary
    parts: list[BodyPart] = []
    pos = start
    opened: tuple[int, int] | None = None  # (delimiter start, content start) of the open part
    while True:
        found = buf.find(marker, pos, end)
        if found < 0:
            break
        pos = found + 1
        if found != start and buf[found - 1] != 0x0A:
            continue
        after = found + len(marker)
        closing = buf.startswith(b"--", after)
        line_end = buf.find(b"\n", after, end)
        line_end = end if line_end < 0 else line_end + 1
        rest = buf[after + (2 if closing else 0) : line_end]
        if rest.strip(b" \t\r\n"):
            continue  # a longer boundary that merely starts with ours
        delimiter = found
        if found != start:
            delimiter = found - 2 if buf[found - 2 : found] == b"\r\n" else found - 1
        if opened is not None:
            parts.append(BodyPart(opened[0], opened[1], max(opened[1], delimiter)))
        if closing:
            return parts, delimiter
        opened = (delimiter, line_end)
        pos = line_end
    if opened is not None:
        parts.append(BodyPart(opened[0], opened[1], end))
    return parts, end
