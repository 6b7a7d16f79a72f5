"""Properties of the recipient rewrite and the author reading, on generated header blocks.

The rewrite is judged by the standard library's parser (`email` + `getaddresses`), not by our own
tokenizer, so the two have to agree on what Graph will deliver to.
"""

from __future__ import annotations

import email
import re
from email.headerregistry import AddressHeader, HeaderRegistry
from email.policy import compat32
from email.utils import getaddresses

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from relay.core.message.addresses import fold_ascii
from relay.core.message.authors import UnreadableAuthorError, read_authors
from relay.core.message.headers import split_header_from_body
from relay.core.message.parts import header_text
from relay.core.message.prepare import (
    UnparseableMessageError,
    parse_address_list,
    reconcile_recipients,
)
from relay.core.message.recipients import canonical_authors

RECIPIENT_FIELDS = {"to", "cc", "bcc"}
LOCALS = ["alice", "bob", "carol", "x.y", "o'neil", "first+tag", "jörg"]
DOMAINS = ["contoso.com", "example.net", "Partner.Example"]
DISPLAY_NAMES = [
    "Alice",
    "Alice Example",
    '"Doe, John"',
    '"bob@evil.example"',
    '"Team; Ops: <x>"',
    "=?utf-8?Q?J=C3=B6rg?=",
    "=?iso-8859-1?Q?J=F6rg_M=FCller?=",
    "=?utf-8?B?SsO2cmcsIERvZQ==?=",
]
SEPARATORS = [", ", ",", ",\r\n ", ",\r\n\t", " , "]


@st.composite
def addresses(draw: st.DrawFn) -> str:
    address = f"{draw(st.sampled_from(LOCALS))}@{draw(st.sampled_from(DOMAINS))}"
    return address.upper() if draw(st.booleans()) else address


@st.composite
def mailboxes(draw: st.DrawFn) -> str:
    address = draw(addresses())
    form = draw(st.sampled_from(["bare", "angle", "named", "comment"]))
    if form == "bare":
        return address
    if form == "angle":
        return f"<{address}>"
    if form == "comment":
        return f"{address} (desk, {draw(st.sampled_from(['2nd', '(nested)', 'floor']))})"
    return f"{draw(st.sampled_from(DISPLAY_NAMES))} <{address}>"


@st.composite
def groups(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(["undisclosed-recipients", "Team", '"Ops, night"']))
    members = draw(st.lists(mailboxes(), max_size=3))
    return f"{name}:{' ' if members else ''}{', '.join(members)};"


@st.composite
def recipient_fields(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A To/Cc/Bcc field (name in any case) and the exact text of each of its items."""
    name = draw(st.sampled_from(["To", "Cc", "Bcc", "TO", "cc", "bcc"]))
    items = draw(st.lists(st.one_of(mailboxes(), mailboxes(), groups()), max_size=4))
    value = ""
    for n, item in enumerate(items):
        value += (draw(st.sampled_from(SEPARATORS)) if n else "") + item
    return f"{name}: {value}".encode(), items


other_fields = st.builds(
    lambda name, value: name + b": " + value.replace(b"\r", b"").replace(b"\n", b""),
    st.sampled_from([b"Subject", b"X-Device", b"Reply-To", b"Resent-To", b"From", b"Comments"]),
    st.binary(max_size=40),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[bytes], bytes, bytes]:
    """A message, its header fields, its line ending and its body (arbitrary bytes)."""
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    recipient = recipient_fields().map(lambda field: field[0])
    fields = draw(st.lists(st.one_of(other_fields, recipient), max_size=7))
    fields = [field.replace(b"\r\n", eol) for field in fields]
    body = draw(st.binary(max_size=200))
    return b"".join(field + eol for field in fields) + eol + body, fields, eol, body


envelopes = st.lists(addresses(), min_size=1, max_size=5)


def split_fields(raw: bytes, eol: bytes) -> tuple[list[bytes], bytes]:
    """An independent splitter: header fields (unfolded boundaries) and the body."""
    header, _, body = raw.partition(eol + eol)
    if raw.startswith(eol):
        header, body = b"", raw[len(eol) :]
    return [f for f in re.split(re.escape(eol) + rb"(?![ \t])", header) if f], body


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode().lower()


def stdlib_recipients(raw: bytes) -> list[str]:
    parsed = email.message_from_bytes(raw, policy=compat32)
    values = [v for name, v in parsed.raw_items() if name.lower() in RECIPIENT_FIELDS]
    decoded = [v.encode("ascii", "surrogateescape").decode("utf-8") for v in values]
    return sorted(fold_ascii(address) for _, address in getaddresses(decoded) if address)


def own_recipients(raw: bytes, eol: bytes) -> list[str]:
    fields, _ = split_fields(raw, eol)
    values = [f.split(b":", 1)[1].decode() for f in fields if field_name(f) in RECIPIENT_FIELDS]
    return sorted(
        fold_ascii(address)
        for value in values
        for item in parse_address_list(value)
        for address in item.addresses
    )


@given(messages(), envelopes)
@example(
    (b"To: undisclosed-recipients:;\r\n\r\n", [b"To: undisclosed-recipients:;"], b"\r\n", b""),
    ["alice@contoso.com"],
)
def test_header_recipients_become_exactly_the_envelope(
    message: tuple[bytes, list[bytes], bytes, bytes], envelope: list[str]
) -> None:
    """Read by the stdlib, To+Cc+Bcc name each envelope recipient once and nobody else."""
    raw, _, _, _ = message
    out = reconcile_recipients(raw, envelope)
    assert stdlib_recipients(out) == sorted({fold_ascii(address) for address in envelope})


@given(messages(), envelopes)
def test_body_is_unchanged(
    message: tuple[bytes, list[bytes], bytes, bytes], envelope: list[str]
) -> None:
    """Whatever the header rewrite does, the body after the empty line is the same bytes."""
    raw, _, eol, body = message
    _, out_body = split_fields(reconcile_recipients(raw, envelope), eol)
    assert out_body == body


@given(messages(), envelopes)
def test_other_fields_are_unchanged_and_in_order(
    message: tuple[bytes, list[bytes], bytes, bytes], envelope: list[str]
) -> None:
    """Every field but To/Cc/Bcc comes out byte-identical, in the original order."""
    raw, fields, eol, _ = message
    out_fields, _ = split_fields(reconcile_recipients(raw, envelope), eol)
    others = [f for f in fields if field_name(f) not in RECIPIENT_FIELDS]
    assert [f for f in out_fields if field_name(f) not in RECIPIENT_FIELDS] == others


@given(messages(), envelopes)
def test_reconciling_twice_is_reconciling_once(
    message: tuple[bytes, list[bytes], bytes, bytes], envelope: list[str]
) -> None:
    """A reconciled message is already reconciled: the rewrite is idempotent."""
    once = reconcile_recipients(message[0], envelope)
    assert reconcile_recipients(once, envelope) == once


@given(messages(), envelopes)
def test_fields_naming_only_envelope_recipients_are_left_alone(
    message: tuple[bytes, list[bytes], bytes, bytes], envelope: list[str]
) -> None:
    """With every header recipient in the envelope (and none twice), nothing but Bcc changes."""
    raw, fields, eol, _ = message
    named = own_recipients(raw, eol)
    assume(len(set(named)) == len(named))
    out = reconcile_recipients(raw, [*named, *envelope])
    out_fields, _ = split_fields(out, eol)
    if not any(field_name(f) == "bcc" for f in fields):
        assert out_fields[: len(fields)] == fields


@given(recipient_fields())
def test_items_keep_their_exact_text(field: tuple[bytes, list[str]]) -> None:
    """The tokenizer finds each generated item with exactly the text it was written as."""
    value = field[0].split(b":", 1)[1].decode()
    assert [item.raw for item in parse_address_list(value)] == field[1]


@given(
    st.text(alphabet='ab@.,;:<>()"\\[] \t=?', max_size=30),
    st.lists(st.sampled_from(["a@b", "b@a", "a", "A@B"]), min_size=1, max_size=3),
)
def test_arbitrary_recipient_text_is_reconciled_or_refused(value: str, envelope: list[str]) -> None:
    """On any To text the rewrite either refuses the message or names exactly the envelope."""
    raw = f"To: {value}\r\nSubject: s\r\n\r\nbody".encode()
    try:
        out = reconcile_recipients(raw, envelope)
    except UnparseableMessageError:
        return
    assert own_recipients(out, b"\r\n") == sorted({fold_ascii(a) for a in envelope})
    assert reconcile_recipients(out, envelope) == out
    assert out.startswith(b"Subject: s\r\n") or b"\r\nSubject: s\r\n" in out
    assert out.endswith(b"\r\n\r\nbody")


# --- author fields: one reading (issue #11 item 1) ------------------------------------------------

_REGISTRY = HeaderRegistry()


def stdlib_authors(value: str) -> tuple[str, ...] | None:
    """The addresses the standard library's parser (email.headerregistry) finds, or None when it
    cannot read the value at all."""
    try:
        header = _REGISTRY("From", value)
        assert isinstance(header, AddressHeader)
        return tuple(dict.fromkeys(fold_ascii(a.addr_spec) for a in header.addresses))
    except Exception:
        return None


@settings(max_examples=2000)
@given(st.text(alphabet='ab@.,;:<>()"\\[] \t', max_size=25))
@example("ceo@a.b scanner@a.b")
@example('"x" ceo@a.b')
@example("ceo@a.b <scanner@a.b>")
@example("a@().a")  # hypothesis found it: a@.a to us, no address to the standard library
def test_an_accepted_author_field_goes_to_graph_naming_what_the_policy_checked(value: str) -> None:
    """On any From text, read_authors refuses it, or the From field as prepared for Graph
    (`canonical_authors`) is read by the standard library's parser as exactly the addresses the
    sender policy checks: no reader finds another author than the policy saw."""
    raw = f"From: {value}\r\n\r\nbody".encode()
    fields = split_header_from_body(raw).fields
    try:
        ours = read_authors(fields).addresses
    except UnreadableAuthorError:
        return
    assert ours
    [sent] = canonical_authors(fields, b"\r\n")
    theirs = stdlib_authors(header_text(sent.value))
    assert theirs is None or theirs == ours
