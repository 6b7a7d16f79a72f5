"""The one door to the standard library's `email` package: MIME parameters and RFC 5322 dates.

Why this module exists: the pure core reads Content-Type parameters (RFC 2045, RFC 2231) with the
standard library's compat32 header parser rather than a grammar of its own, but `email.utils`
imports `socket` at module level (for `make_msgid`, which we never call). Importing the package
only when a part's parameters are first read keeps `import relay.core` free of any networking
module (the architecture test checks it), and keeps the stdlib parser's settings in one place.
Dates are formatted here without `email.utils` at all: RFC 5322 §3.3 fixes English names and a
numeric zone, so no locale or library is needed.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from email.message import Message

__all__ = ["collapse_parameter", "parse_mime_headers", "rfc5322_date"]

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_mime_headers(header_bytes: bytes) -> Message:
    """A header block parsed for its parameters (compat32: 8-bit bytes as surrogate escapes)."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    return BytesHeaderParser(policy=compat32).parsebytes(header_bytes)


def collapse_parameter(value: str | tuple[str | None, str | None, str]) -> str:
    """A parameter value as text; an RFC 2231 (charset, language, text) triple decoded."""
    if isinstance(value, str):
        return value
    from email.utils import collapse_rfc2231_value

    return collapse_rfc2231_value(value)


def rfc5322_date(moment: datetime) -> str:
    """`moment` as an RFC 5322 date-time (`Wed, 02 Dec 2026 01:04:23 +0000`); a naive datetime
    is written with the zone `-0000` (§3.3: the local time is not known), as email.utils does."""
    zone = "-0000"
    offset = moment.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return (
        f"{_DAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} "
        f"{moment.year:04d} {moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {zone}"
    )
