"""The gates every value from outside passes before a DSN (`relay.core.message.dsn`) writes it.

Why this module exists: a DSN quotes addresses from the SMTP session, diagnostics from Microsoft
and the reason from the delivery engine, and none of them may add a header field, a line or a MIME
part. These functions make each kind of value safe for the place it goes, and choose the transfer
encoding of a part. Pure: strings in, strings out.
"""

# Theory of operation
# ===================
#
# Everything a DSN says about the failure comes from outside: addresses from the SMTP session,
# diagnostics from Microsoft, the reason from the delivery engine. None of it may shape the DSN's
# structure. So every interpolated value passes one of three gates before it is written:
#
#   * `one_line`: for text. Characters that are not printable (CR, LF, NEL, U+2028, NUL, tabs, lone
#     surrogates...) become spaces and whitespace runs collapse, so a value is one line of text.
#   * `address`: for addresses. Unprintable characters and angle brackets are removed, the result
#     is capped at RFC 5321's 256 octets. Non-ASCII addresses are written in the delivery report as
#     RFC 6533 `utf-8` addresses in the 7-bit utf-8-addr-xtext form; in To/From only the address
#     itself can carry them, as UTF-8 (RFC 6532), since an address has no encoded form. Such an
#     address only reaches the relay through an SMTPUTF8 session, whose mail is UTF-8 anyway.
#   * `token`: for host names and the queue id: printable ASCII without specials, capped.
#
# Header lines the module generates are ASCII apart from that one case; the human-readable part is
# UTF-8 in quoted-printable when it is not plain ASCII. The delivery report is 7-bit by definition
# (RFC 3464 §2.1), so non-ASCII characters of a diagnostic are written there as RFC 6533 `\x{HEX}`
# escapes; the text part carries the diagnostic unescaped.

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "address",
    "ascii_text",
    "diagnostic",
    "encoded_body",
    "fold_report_field",
    "is_7bit",
    "one_line",
    "quoted_printable",
    "token",
    "typed_address",
    "xtext",
]

# RFC 3464 §2.3.6: Diagnostic-Code = diagnostic-type ";" *text, the type an atom ("smtp", "X-...").
_DIAGNOSTIC_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*[ \t]*;")
_DEFAULT_DIAGNOSTIC_TYPE = "X-Relay"
_ADDRESS_OCTETS = 256  # RFC 5321 §4.5.3.1.3: the longest path
_TOKEN_LIMIT = 255  # a DNS name's length
_DIAGNOSTIC_LIMIT = 998  # characters of a diagnostic kept: one RFC 5322 line's worth
_FOLD_AT = 78  # RFC 5322 §2.1.1: SHOULD
_LINE_LIMIT = 998  # RFC 5322 §2.1.1: MUST
_TOKEN_FORBIDDEN = frozenset(' ()<>;:,@"\\[]')
_PLAIN_LINE = re.compile(rb"[\t -~]*")


# --- the gates every interpolated value passes -------------------------------------------------


def one_line(value: str) -> str:
    """`value` as one line of printable text: no CR, LF or other control or separator character."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in value).split())


def address(value: str) -> str:
    """An address safe inside `<...>`: printable, no angle brackets, at most 256 UTF-8 octets."""
    cleaned = "".join(ch for ch in value if ch.isprintable() and ch not in "<>").strip()
    octets = cleaned.encode("utf-8")
    if len(octets) <= _ADDRESS_OCTETS:
        return cleaned
    return octets[:_ADDRESS_OCTETS].decode("utf-8", "ignore")


def token(value: str, fallback: str = "unknown") -> str:
    """A host name or id as one printable ASCII token without specials."""
    cleaned = "".join(
        ch for ch in value if ch.isascii() and ch.isprintable() and ch not in _TOKEN_FORBIDDEN
    )
    return cleaned[:_TOKEN_LIMIT] or fallback


def xtext(value: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: QCHARs as they are, anything else as `\\x{HEX}`."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "\\+=" else f"\\x{{{ord(ch):02X}}}" for ch in value
    )


def ascii_text(value: str) -> str:
    """Text for the 7-bit report: non-ASCII characters as RFC 6533 `\\x{HEX}` escapes."""
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):02X}}}" for ch in value)


def typed_address(address: str) -> str:
    """An RFC 3464 address-type and address: `rfc822; a@b`, or RFC 6533 `utf-8; <xtext>`."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {xtext(address)}"


def diagnostic(value: str) -> str:
    """The diagnostic as one line of at most 998 characters, with a diagnostic-type."""
    text = one_line(value)
    if len(text) > _DIAGNOSTIC_LIMIT:
        text = text[: _DIAGNOSTIC_LIMIT - 3].rstrip() + "..."
    if text and not _DIAGNOSTIC_TYPE.match(text):
        text = f"{_DEFAULT_DIAGNOSTIC_TYPE}; {text}"
    return text


def fold_report_field(name: str, value: str) -> list[str]:
    """`name: value` as lines folded at spaces (RFC 5322 §2.2.3), none over 998 characters.

    Lines stay within 78 characters where the words allow; a word too long for any line (only
    possible in a diagnostic) is cut, because an over-long line is worse than an extra space.
    """
    size = _LINE_LIMIT - len(name) - 2  # what fits after "name: " and after the folding space
    words: list[str] = []
    for word in value.split(" "):
        words.extend(word[i : i + size] for i in range(0, len(word), size))
    lines = [f"{name}:"]
    for word in words:
        if len(lines[-1]) + 1 + len(word) > _FOLD_AT and lines[-1].strip() != f"{name}:":
            lines.append(f" {word}")
        else:
            lines[-1] += f" {word}"
    return lines


# --- transfer encodings -----------------------------------------------------------------------


def quoted_printable(lines: Iterable[bytes]) -> bytes:
    """Lines (without line endings) as quoted-printable (RFC 2045 §6.7), CRLF line endings."""
    out = bytearray()
    for line in lines:
        # istext=False also encodes a bare CR; soft line breaks come out as LF and become CRLF.
        encoded = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        out += encoded.replace(b"\n", b"\r\n") + b"\r\n"
    return bytes(out)


def is_7bit(lines: Sequence[bytes]) -> bool:
    """Whether `lines` can go as 7bit content (RFC 2045 §2.7) that every parser reads alike.

    Stricter than §2.7: control characters other than TAB are encoded too, because parsers
    disagree on whether VT, FF or FS end a line (Python's does).
    """
    return all(_PLAIN_LINE.fullmatch(line) and len(line) <= _LINE_LIMIT for line in lines)


def encoded_body(lines: Sequence[bytes]) -> tuple[str, bytes]:
    """The transfer encoding and the encoded body for `lines` (without line endings)."""
    if is_7bit(lines):
        return "7bit", b"".join(line + b"\r\n" for line in lines)
    return "quoted-printable", quoted_printable(lines)
