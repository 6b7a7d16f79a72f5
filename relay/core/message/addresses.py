"""RFC 5322 address lists (§3.4, with the §4.4 obsolete forms tolerated), tokenized losslessly.

Each item remembers the exact text it was parsed from, so that `message.prepare` can drop some items
of a To/Cc/Bcc field and re-emit the others exactly as the client wrote them: quoted display names
with commas or `@`, RFC 2047 encoded words, comments, 8-bit bytes (decoded with surrogateescape).
The stdlib's `email.utils.getaddresses` is not used because it normalises and, for some inputs,
mangles exactly those texts.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from relay.core.message import UnparseableMessageError

__all__ = [
    "AddressItem",
    "AddressList",
    "canonical_address",
    "fold_ascii",
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
    # The strict RFC 5322 reading (see `_strict_mailbox`): `strict` when the item is a mailbox
    # that reading accepts, with the same address as `addresses`; `canonical` when it accepts it
    # only with a tolerated display name (`a@b <c@d>`), the text to emit so no reader differs.
    strict: bool = True
    canonical: str | None = None

    @property
    def text(self) -> str:
        """The text to emit for this item: its canonical form where the raw one is ambiguous."""
        return self.canonical if self.canonical is not None else self.raw


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
    else:
        inner = part[opens[0] + 1 :]
        inner = inner[: [t.kind for t in inner].index(">")]
        if inner and inner[0].kind == "@":  # obs-route "<@a,@b:user@c>"
            colons = [k for k, t in enumerate(inner) if t.kind == ":"]
            inner = inner[colons[0] + 1 :] if colons else []
        address = "".join(t.text for t in inner) or None
    strict = _strict_mailbox(value, part)
    agrees = strict is not None and address is not None and strict[0] == address
    return AddressItem(
        raw,
        (address,) if address else (),
        strict=agrees,
        canonical=strict[1] if agrees and strict is not None else None,
    )


# --- the strict reading ---------------------------------------------------------------------------
#
# The lenient reading above finds an address in almost anything, and finds none in some forms a
# mail reader still shows as one (`ceo@contoso.com scanner@contoso.com`, `"x" ceo@contoso.com`).
# Where the sender policy or Graph's own parser could read other addresses than we do, the strict
# reading decides: RFC 5322 §3.4 `mailbox` (name-addr or addr-spec; CFWS between tokens, which the
# tokenizer has already dropped), RFC 6532 UTF-8 in atoms, the obsolete forms of §4.4 that leave
# one reading (obs-phrase's "." in display names, stray dots in a local part, obs-route), and a
# local part without domain. What it refuses is every text in which a reader can find another
# address or another item boundary: two words in a row outside a display name, text after the
# `>`, a second `@`, specials or control characters. One legacy quirk (DESIGN §7) is tolerated
# in a display name before `<addr>`: an unquoted `@` or domain literal. Such an item has one
# reading, but not every reader finds it, so it is emitted as `"display name" <addr>` instead
# (`canonical`).

_ATEXT_CHAR = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]")


def _strict_atom(text: str, *, in_phrase: bool) -> bool:
    """RFC 5322 atext, or RFC 6532 UTF-8; undecodable bytes only in a display name."""
    for ch in text:
        if _ATEXT_CHAR.match(ch):
            continue
        if ord(ch) < 0x80 or (0xD800 <= ord(ch) <= 0xDFFF and not in_phrase):
            return False
    return True


def _strict_dot_atom(tokens: Sequence[_Token]) -> bool:
    """Atoms joined by dots. Stray dots (`john.@docomo.ne.jp`, obs-local-part's habit) are
    tolerated: they leave one reading. Two atoms in a row are not: whitespace or a comment
    separated them, and a reader may take them for two addresses or for a display name."""
    kinds = [t.kind for t in tokens]
    if "atom" not in kinds or any(k not in ("atom", ".") for k in kinds):
        return False
    if any(a == b == "atom" for a, b in itertools.pairwise(kinds)):
        return False
    return all(_strict_atom(t.text, in_phrase=False) for t in tokens if t.kind == "atom")


def _strict_addr_spec(tokens: Sequence[_Token]) -> str | None:
    """`local-part "@" domain` with a dot-atom or quoted-string local part, else None. A local
    part alone (`root`, as cron writes it) is one reading too, and is accepted."""
    ats = [k for k, t in enumerate(tokens) if t.kind == "@"]
    if len(ats) > 1:
        return None
    local = tokens[: ats[0]] if ats else tokens
    quoted_local = bool(ats) and len(local) == 1 and local[0].kind == "quoted"
    if not (quoted_local or _strict_dot_atom(local)):
        return None
    domain = tokens[ats[0] + 1 :] if ats else None
    if domain is not None and not (
        (len(domain) == 1 and domain[0].kind == "literal") or _strict_dot_atom(domain)
    ):
        return None
    return "".join(t.text for t in tokens)


def _obs_route(tokens: Sequence[_Token]) -> bool:
    """`@domain` separated by commas (empty elements allowed, as obs-domain-list does)."""
    groups: list[list[_Token]] = [[]]
    for token in tokens:
        if token.kind == ",":
            groups.append([])
        else:
            groups[-1].append(token)
    return all(not g or (g[0].kind == "@" and _strict_dot_atom(g[1:])) for g in groups) and any(
        groups
    )


def _strict_mailbox(value: str, part: Sequence[_Token]) -> tuple[str, str | None] | None:
    """(address, canonical text or None when the raw text is canonical), or None when the strict
    reading finds no single mailbox in the item."""
    opens = [k for k, t in enumerate(part) if t.kind == "<"]
    if not opens:
        address = _strict_addr_spec(part)
        return None if address is None else (address, None)
    if len(opens) != 1 or part[-1].kind != ">":
        return None  # text after the '>' is a second reading of the item
    inner = part[opens[0] + 1 : -1]
    if inner and inner[0].kind == "@":  # obs-route (RFC 5322 §4.4), which parsers must accept
        colon = next((k for k, t in enumerate(inner) if t.kind == ":"), None)
        if colon is None or not _obs_route(inner[:colon]):
            return None
        inner = inner[colon + 1 :]
    address = _strict_addr_spec(inner)
    if address is None:
        return None
    phrase = part[: opens[0]]
    for token in phrase:
        if token.kind not in ("atom", "quoted", "literal", ".", "@"):
            return None
        if token.kind == "atom" and not _strict_atom(token.text, in_phrase=True):
            return None
    if not phrase or (phrase[0].kind in _WORDS and all(t.kind in (*_WORDS, ".") for t in phrase)):
        return address, None
    return address, f"{_quoted_phrase(value, phrase)} <{address}>"


def _quoted_phrase(value: str, phrase: Sequence[_Token]) -> str:
    """The display name as one quoted-string; comments and quoting inside it are dropped."""
    text = ""
    for n, token in enumerate(phrase):
        if n and value[phrase[n - 1].end : token.start]:
            text += " "
        text += _unquoted(token.text) if token.kind == "quoted" else token.text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _unquoted(quoted: str) -> str:
    """The content of a quoted-string, quoted-pairs resolved."""
    return re.sub(r"\\(.)", r"\1", quoted[1:-1], flags=re.DOTALL)


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
        strict = all(member.strict for member in members)
        items.append(AddressItem(raw, addresses, group_name, tuple(members), strict=strict))
        i = k
    return AddressList(tuple(items), irregular)


def parse_address_list(value: str) -> list[AddressItem]:
    """Tokenize an RFC 5322 address-list (a To/Cc/Bcc/From value) into its items.

    Empty items and items made only of comments are skipped. Raises `UnparseableMessageError`
    when the text cannot be split into items unambiguously (unterminated quote, comment or `<`).
    """
    return list(parse_addresses(value).items)


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def fold_ascii(text: str) -> str:
    """`text` with A-Z lowered and nothing else changed: how Exchange compares addresses.

    Never `str.casefold()` or `str.lower()` for address identity: they fold `ß` to `ss`, the long
    s (U+017F) to `s` and the Kelvin sign (U+212A) to `k`, so `x@straße.de` would match a pattern
    for `x@strasse.de`, which Exchange delivers to another mailbox.
    """
    return text.translate(_ASCII_LOWER)


def canonical_address(address: str) -> str:
    """The form in which two addresses are compared: ASCII-lowercased (`fold_ascii`), needless
    local-part quotes gone."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    if len(local) > 2 and local[0] == local[-1] == '"' and _DOT_ATOM_TEXT.fullmatch(local[1:-1]):
        local = local[1:-1]
    return fold_ascii(local + at + domain)
