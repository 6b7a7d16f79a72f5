"""RFC 5322 address lists (§3.4, with the §4.4 obsolete forms tolerated), tokenized losslessly.

Each item remembers the exact text it was parsed from, so that `relay.message` can drop some items
of a To/Cc/Bcc field and re-emit the others exactly as the client wrote them: quoted display names
with commas or `@`, RFC 2047 encoded words, comments, 8-bit bytes (decoded with surrogateescape).
The stdlib's `email.utils.getaddresses` is not used because it normalises and, for some inputs,
mangles exactly those texts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relay.core.message import UnparseableMessageError

__all__ = [
    "AddressItem",
    "AddressList",
    "canonical_address",
    "parse_address_list",
    "parse_addresses",
]

_DOT_ATOM_TEXT = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)


@dataclass(frozen=True, slots=True)
class AddressItem:
    """One element of an address-list: a mailbox, or a group with its member mailboxes.

    `raw` is the exact text of the item (surrounding whitespace removed, comments kept).
    `addresses` holds the addr-specs it names: one for a mailbox, the members' for a group, none
    for text that is not an address (`<>`, a bare phrase).
    """

    raw: str
    addresses: tuple[str, ...]
    group_name: str | None = None
    members: tuple[AddressItem, ...] = ()


_WSP = " \t\r\n"
_SPECIALS = "<>:;,@."
_ATOM_END = _WSP + _SPECIALS + '()"[]'
_WORDS = ("atom", "quoted")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "atom", "quoted", "literal", or one of _SPECIALS
    text: str
    start: int
    end: int


def _scan_quoted(value: str, i: int, close: str) -> int:
    """Index just past the `close` that ends the quoted-string/domain-literal opening at `i`."""
    j = i + 1
    while j < len(value):
        if value[j] == "\\":
            j += 2
        elif value[j] == close:
            return j + 1
        else:
            j += 1
    raise UnparseableMessageError(f"unterminated {value[i]!r} in address list")


def _skip_comment(value: str, i: int) -> int:
    depth, j = 0, i
    while j < len(value):
        ch = value[j]
        if ch == "\\":
            j += 1
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise UnparseableMessageError("unterminated comment in address list")


def _tokenize(value: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch in _WSP:
            i += 1
            continue
        if ch == "(":
            i = _skip_comment(value, i)
            continue
        if ch in '"[':
            j = _scan_quoted(value, i, '"' if ch == '"' else "]")
            tokens.append(_Token("quoted" if ch == '"' else "literal", value[i:j], i, j))
        elif ch in _SPECIALS:
            j = i + 1
            tokens.append(_Token(ch, ch, i, j))
        elif ch in ")]":
            raise UnparseableMessageError(f"unbalanced {ch!r} in address list")
        else:
            j = i
            while j < n and value[j] not in _ATOM_END:
                j += 1
            tokens.append(_Token("atom", value[i:j], i, j))
        i = j
    return tokens


def _scan_mailbox(tokens: list[_Token], i: int) -> int:
    """Index of the `,`, `;` or `:` that ends the mailbox starting at `i` (or len(tokens))."""
    j = i
    while j < len(tokens) and tokens[j].kind not in ",;:":
        if tokens[j].kind == "<":
            # Commas and colons inside <> belong to an obsolete source route (RFC 5322 §4.4).
            while j < len(tokens) and tokens[j].kind != ">":
                j += 1
            if j == len(tokens):
                raise UnparseableMessageError("unterminated '<' in address list")
        elif tokens[j].kind == ">":
            raise UnparseableMessageError("'>' without '<' in address list")
        j += 1
    return j


def _addr_spec(tokens: Sequence[_Token]) -> str | None:
    """The addr-spec these tokens spell, or None when they are a phrase or junk."""
    kinds = [t.kind for t in tokens]
    if not kinds or kinds.count("@") > 1 or kinds[0] == "@" or kinds[-1] == "@":
        return None
    if any(k not in (*_WORDS, "literal", ".", "@") for k in kinds):
        return None
    if any(a in _WORDS and b in _WORDS for a, b in itertools.pairwise(kinds)):
        return None  # "John Smith": two words in a row are a display name, not an address
    return "".join(t.text for t in tokens)


def _mailbox(value: str, tokens: list[_Token], start: int, end: int, raw: str) -> AddressItem:
    part = tokens[start:end]
    opens = [k for k, t in enumerate(part) if t.kind == "<"]
    if len(opens) > 1:
        raise UnparseableMessageError(f"more than one <address> in one item: {raw!r}")
    if not opens:
        address = _addr_spec(part)
        return AddressItem(raw, (address,) if address else ())
    inner = part[opens[0] + 1 :]
    inner = inner[: [t.kind for t in inner].index(">")]
    if inner and inner[0].kind == "@":  # obs-route "<@a,@b:user@c>"
        colons = [k for k, t in enumerate(inner) if t.kind == ":"]
        inner = inner[colons[0] + 1 :] if colons else []
    address = "".join(t.text for t in inner)
    return AddressItem(raw, (address,) if address else ())


def _region(value: str, begin: int, end: int) -> str:
    return value[begin:end].strip(_WSP)


@dataclass(frozen=True, slots=True)
class AddressList:
    """A parsed address-list; `semicolons` when `;` (wrongly) separated items outside a group."""

    items: tuple[AddressItem, ...]
    semicolons: bool


def parse_addresses(value: str) -> AddressList:
    """Like `parse_address_list`, also telling whether the list used `;` as a separator."""
    tokens = _tokenize(value)
    items: list[AddressItem] = []
    irregular = False
    i, region_start = 0, 0
    while i < len(tokens):
        if tokens[i].kind in ",;":
            irregular |= tokens[i].kind == ";"
            region_start = tokens[i].end
            i += 1
            continue
        j = _scan_mailbox(tokens, i)
        if j == len(tokens) or tokens[j].kind != ":":
            end = tokens[j].start if j < len(tokens) else len(value)
            items.append(_mailbox(value, tokens, i, j, _region(value, region_start, end)))
            i = j
            continue
        group_name = _region(value, region_start, tokens[j].start)
        members: list[AddressItem] = []
        k, member_start = j + 1, tokens[j].end
        while k < len(tokens) and tokens[k].kind != ";":
            if tokens[k].kind == ",":
                k, member_start = k + 1, tokens[k].end
                continue
            m = _scan_mailbox(tokens, k)
            if m < len(tokens) and tokens[m].kind == ":":
                raise UnparseableMessageError(f"group inside a group: {value!r}")
            m_end = tokens[m].start if m < len(tokens) else len(value)
            members.append(_mailbox(value, tokens, k, m, _region(value, member_start, m_end)))
            k = m
        if k < len(tokens):  # the closing ";" (a missing one at the very end is tolerated)
            k += 1
        if k < len(tokens) and tokens[k].kind != ",":
            raise UnparseableMessageError(f"text after a group's ';': {value!r}")
        end = tokens[k].start if k < len(tokens) else len(value)
        addresses = tuple(a for member in members for a in member.addresses)
        raw = _region(value, region_start, end)
        items.append(AddressItem(raw, addresses, group_name, tuple(members)))
        i = k
    return AddressList(tuple(items), irregular)


def parse_address_list(value: str) -> list[AddressItem]:
    """Tokenize an RFC 5322 address-list (a To/Cc/Bcc/From value) into its items.

    Empty items and items made only of comments are skipped. Raises `UnparseableMessageError`
    when the text cannot be split into items unambiguously (unterminated quote, comment or `<`).
    """
    return list(parse_addresses(value).items)


def canonical_address(address: str) -> str:
    """The form in which two addresses are compared: casefolded, needless local-part quotes gone."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    if len(local) > 2 and local[0] == local[-1] == '"' and _DOT_ATOM_TEXT.fullmatch(local[1:-1]):
        local = local[1:-1]
    return (local + at + domain).casefold()
