"""Recognising mail the relay must never bounce: delivery reports and other automatic mail.

Why this module exists: it is the other half of loop prevention next to `relay.core.message.dsn`,
which builds the DSNs. Nobody sends notifications about notifications (RFC 5321 §4.5.5 and §6.1)
or answers automatic mail automatically (RFC 3834 §2), so before the delivery engine asks for a
DSN it asks `is_bounce`. Pure: header bytes in, a bool out; never raises.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from relay.core.message.headers import split_header_from_body

__all__ = ["is_bounce"]

_REPORT_TYPES = frozenset({"delivery-status", "global-delivery-status"})  # RFC 3464, RFC 6533


def _without_comments(text: str) -> str:
    """A structured field value unfolded, with RFC 5322 comments removed (quoted strings kept)."""
    out: list[str] = []
    depth, quoted, escaped = 0, False, False
    for ch in text.replace("\r", "").replace("\n", ""):
        if escaped:
            escaped = False
            if not depth:
                out.append(ch)
        elif ch == "\\":
            escaped = True
            if not depth:
                out.append(ch)
        elif quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            quoted = ch == '"'
            out.append(ch)
    return "".join(out)


def _split_params(text: str) -> list[str]:
    """`text` split at semicolons outside quoted strings."""
    pieces: list[str] = []
    current: list[str] = []
    quoted, escaped = False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            pieces.append("".join(current))
            current = []
            continue
        current.append(ch)
    pieces.append("".join(current))
    return pieces


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _is_report(content_type: str) -> bool:
    """Whether a Content-Type value is multipart/report with a delivery-status report-type."""
    media_type, *params = _split_params(_without_comments(content_type))
    if "".join(media_type.split()).lower() != "multipart/report":
        return False
    for param in params:
        name, _, value = param.partition("=")
        name = name.strip().lower()
        if name == "report-type*":  # RFC 2231 §4 extended value: charset'language'value
            value = unquote(value.strip().split("'", 2)[-1], errors="replace")
        elif name != "report-type":
            continue
        if _unquote(value).lower() in _REPORT_TYPES:
            return True
    return False


def _is_auto_submitted(value: str) -> bool:
    """Whether an Auto-Submitted value says the message was sent automatically (RFC 3834 §5)."""
    keyword = _split_params(_without_comments(value))[0].strip().lower()
    return bool(keyword) and keyword != "no"


def is_bounce(raw: bytes) -> bool:
    """Whether `raw` is mail the relay must never bounce: a DSN or an automatic message.

    True when a top-level Content-Type is multipart/report with report-type delivery-status (or
    RFC 6533's global-delivery-status), in any case, quoting or folding, or when an Auto-Submitted
    field has a value other than "no" (RFC 3834 §5). Only the header block is read; never raises.
    """
    for field in split_header_from_body(raw).fields:
        if field.key == "content-type" and _is_report(field.text):
            return True
        if field.key == "auto-submitted" and _is_auto_submitted(field.text):
            return True
    return False
