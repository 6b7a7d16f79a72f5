"""Fuzzing the pure core with hypothesis: arbitrary bytes in, only documented exceptions out.

Targets: `relay.mime.limits` (the DATA decoder and the content checks), `relay.message`
(`prepare_for_graph`, `read_authors`), `relay.policy` and `relay.proxy`. Inputs are built
from a vocabulary of the bytes that matter (line breaks, dots, NULs, MIME boundaries, address
punctuation) mixed with random bytes, so the interesting paths are reached quickly.

Bounded for CI by the `relay-fuzz-ci` profile (about 20 s for the module); set
RELAY_FUZZ_PROFILE=relay-fuzz-deep for a long run. tests/fuzz/atheris_harness.py drives the same
targets with libFuzzer when atheris is installed.
"""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.config.load import parse_config
from relay.config.schema import Config
from relay.core.errors import PolicyError
from relay.core.message.addresses import canonical_address, fold_ascii
from relay.core.message.headers import split_header_from_body
from relay.core.message.limits import ContentLimits, ContentRefusedError, DataDecoder, check_content
from relay.core.message.prepare import (
    Envelope,
    TraceInfo,
    UnparseableMessageError,
    UnreadableAuthorError,
    prepare_for_graph,
    read_authors,
)
from relay.core.policy import (
    check_authors,
    check_envelope_sender,
    check_recipient,
    choose_route,
    effective_sender,
    identify_client,
    matches_any,
)
from relay.smtp.proxy import ProxyHeader, ProxyHeaderError, client_endpoint, is_trusted_proxy

settings.register_profile(
    "relay-fuzz-ci",
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "relay-fuzz-deep",
    max_examples=25_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile(os.environ.get("RELAY_FUZZ_PROFILE", "relay-fuzz-ci"))

TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"<",
    b">",
    b"@",
    b'"',
    b"(",
    b")",
    b"\\",
    b"\xff",
    "ö".encode(),
    b"x",
    b"From: ",
    b"To: ",
    b"Cc: ",
    b"Bcc: ",
    b"Sender: ",
    b"Subject: ",
    b"Message-ID: ",
    b"Date: ",
    b"bob@partner.example",
    b"scanner@contoso.com",
    b"Undisclosed-recipients:;",
    b"Content-Type: multipart/mixed; boundary=b",
    b'Content-Type: multipart/digest; boundary="d"',
    b"Content-Type: message/rfc822",
    b"Content-Transfer-Encoding: base64",
    b"--b",
    b"--b--",
    b"--d",
    b"=?utf-8?B?SsO2cmc=?=",
    b"MAIL FROM:<ceo@contoso.com>",
]
LIMITS = [
    ContentLimits(max_size=4000, max_header_bytes=600, max_mime_depth=3),
    ContentLimits(
        max_size=4000, max_header_bytes=600, max_mime_depth=3, bare_line_endings="normalize"
    ),
    ContentLimits(),
]

soup = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=6), max_size=80).map(b"".join)


@st.composite
def wire_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """DATA as the listener reads it: pieces up to each CRLF, and lines longer than the reader's
    limit in fragments that never split a CRLF (as asyncio's readuntil leaves them); and the
    whole stream up to the terminator."""
    stream = draw(soup) + b"\r\n.\r\n"
    limit = draw(st.integers(min_value=3, max_value=40))
    pieces: list[bytes] = []
    pos = 0
    while pos < len(stream):
        end = stream.find(b"\r\n", pos) + 2
        line = stream[pos:end]
        pos = end
        if len(line) <= limit:
            pieces.append(line)
            continue
        text = line[:-2]
        fragments = [text[i : i + limit] for i in range(0, len(text), limit)]
        pieces.extend(fragments)
        pieces.append(b"\r\n")
    return pieces, stream


def ambiguous_dot(stream: bytes) -> bool:
    """An independent oracle: is there a "." (NULs around it ignored) that a lenient server
    could read as a line of its own, other than a real CRLF "." CRLF?"""
    for match in re.finditer(rb"\x00*\.\x00*", stream):
        before, after = stream[: match.start()], stream[match.end() :]
        if before and before[-1:] not in (b"\r", b"\n"):
            continue
        if after[:1] not in (b"\r", b"\n"):
            continue
        strict_before = not before or before.endswith(b"\r\n")
        if strict_before and after.startswith(b"\r\n") and match.group() == b".":
            continue  # the real end of DATA (only reachable as the terminator itself)
        return True
    return False


def decode(pieces: list[bytes], limits: ContentLimits) -> tuple[bytes | None, int]:
    """Feed until the end of DATA: (content or None if refused, number of pieces used)."""
    decoder = DataDecoder(limits)
    for used, piece in enumerate(pieces, start=1):
        if decoder.feed(piece):
            if decoder.refusal is not None:
                assert decoder.refusal.code in (550, 552, 554)
                return None, used
            return decoder.content(), used
    raise AssertionError("the terminator was never recognised")


@FUZZ
@given(wire_streams(), st.sampled_from(LIMITS))
@example(([b"a\n.\nMAIL FROM:<x>\r\n", b".\r\n"], b"a\n.\nMAIL FROM:<x>\r\n.\r\n"), LIMITS[0])
@example(([b".\rx\r\n", b".\r\n"], b".\rx\r\n.\r\n"), LIMITS[0])
def test_data_decoder_ends_only_at_crlf_dot_crlf_and_never_accepts_smuggling(
    stream: tuple[list[bytes], bytes], limits: ContentLimits
) -> None:
    """DATA ends at the first CRLF "." CRLF of the stream and nowhere else; with `reject`, a
    stream the oracle calls ambiguous is never accepted; with `normalize`, accepted content
    has no bare CR or LF; accepted content has no NUL and respects max_size."""
    pieces, whole = stream
    content, used = decode(pieces, limits)
    consumed = b"".join(pieces[:used])
    first_end = (b"\r\n" + whole).find(b"\r\n.\r\n")
    assert len(consumed) == first_end + 3
    body = consumed[:-3]
    if content is None:
        return
    assert b"\0" not in content
    assert limits.max_size is None or len(content) <= limits.max_size
    if limits.bare_line_endings == "reject":
        assert not ambiguous_dot(body)
    else:
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", content) is None


def dot_stuff(content: bytes) -> bytes:
    """What an RFC 5321 client sends for `content` (CRLF lines): dots doubled, terminator."""
    lines = content.split(b"\r\n")[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


crlf_messages = st.lists(
    st.lists(st.sampled_from([t for t in TOKENS if t not in (b"\r\n", b"\n", b"\r", b"\x00")])).map(
        b"".join
    ),
    max_size=30,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@FUZZ
@given(crlf_messages)
@example(b".\r\n..\r\n")
def test_transparency_round_trips(content: bytes) -> None:
    """Dot-stuffed by a client and decoded by the relay, a CRLF message comes back unchanged,
    and `check_content` agrees with the decoder on every limit."""
    limits = ContentLimits(max_size=5000, max_header_bytes=300, max_mime_depth=2)
    wire = dot_stuff(content) + b".\r\n"
    pieces = [line + b"\r\n" for line in wire.split(b"\r\n")[:-1]]
    decoded, used = decode(pieces, limits)
    assert used == len(pieces)
    try:
        check_content(content, limits)
    except ContentRefusedError:
        assert decoded is None
    else:
        assert decoded == content


@FUZZ
@given(soup, st.sampled_from(LIMITS))
def test_check_content_raises_only_content_refused(raw: bytes, limits: ContentLimits) -> None:
    """Any bytes: accepted, or ContentRefusedError with a 5xx enhanced reply."""
    status = "accepted"
    try:
        check_content(raw, limits)
    except ContentRefusedError as refused:
        status = refused.reply.status
    assert status == "accepted" or status.startswith("5.")


# --- the message core ------------------------------------------------------------------------

RECIPIENTS = st.lists(
    st.sampled_from(
        ["bob@partner.example", "Carol@Contoso.com", "x@y.example", "jörg@contoso.com"]
    ),
    min_size=1,
    max_size=3,
    unique=True,
)
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def whitespace_message_id(raw: bytes) -> bool:
    """The input of a prepare_for_graph bug fuzzing found (see the test at the end of this file):
    a Message-ID whose value is only characters str.split() takes for whitespace (\x1c-\x1f,
    \x0b, \x0c, \x85, ...) but bytes.strip(b" \t\r\n") does not."""
    return any(
        field.key == "message-id"
        and field.value.strip(b" \t\r\n")
        and not field.value.decode("utf-8", "replace").split()
        for field in split_header_from_body(raw).fields
    )


@FUZZ
@given(soup, RECIPIENTS)
@example(b"To: bob@partner.example\r\n\r\nbody", ["bob@partner.example"])
@example(b"To: \xff\r\n\nFrom: (\r\n\r\n", ["bob@partner.example"])
@example(b"Message-ID:\x1c\r\n\r\nbody", ["bob@partner.example"])
def test_prepare_for_graph_keeps_the_body_and_names_exactly_the_envelope(
    raw: bytes, recipients: list[str]
) -> None:
    """Any bytes: UnparseableMessageError or a message that starts with Received:, ends with
    the original body byte for byte, and whose To/Cc/Bcc name exactly the envelope."""
    trace = TraceInfo("relay.test", "192.0.2.1", None, "device", "ESMTP", "Q1", NOW)
    try:
        prepared = prepare_for_graph(
            split_header_from_body(raw),
            Envelope("scanner@contoso.com", tuple(recipients)),
            trace,
            message_id_local="Q1",
        )
    except UnparseableMessageError:
        return
    assert prepared.mime.startswith(b"Received: from device (unknown [192.0.2.1])")
    assert prepared.mime.endswith(split_header_from_body(raw).body)
    named = {canonical_address(a) for a in prepared.header_recipients}
    assert named == {canonical_address(r) for r in recipients}
    assert prepared.message_id.startswith("<")


@FUZZ
@given(soup)
def test_author_addresses_are_lowercase_or_unreadable(raw: bytes) -> None:
    """Any bytes: UnreadableAuthorError or a tuple of ASCII-lowercased, distinct addresses."""
    try:
        authors = _authors(raw)
    except UnreadableAuthorError:
        return
    assert all(a == fold_ascii(a) for a in authors)
    assert len(set(authors)) == len(authors)


# --- policy and proxy ------------------------------------------------------------------------

CONFIG_TEXT = """\
clients:
  - {name: printers, networks: [10.0.5.0/24, "2001:db8::/64"], senders: ["scan*@contoso.com"]}
  - {name: erp, networks: [192.0.2.7/32], senders: ["*@contoso.com"], recipients: ["*@x.example"]}
auth_objects:
  contoso:
    tenant_id: 3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f
    client_id: 9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d
    client_secret_env: SECRET
routes:
  - {senders: ["*@contoso.com"], auth_object: contoso}
"""


def config() -> Config:
    return parse_config(CONFIG_TEXT, base_dir=Path.cwd(), environ={"SECRET": "fuzz-secret"})


CONFIG = config()
# The SMTP layer refuses envelope addresses with control characters, line separators or
# invalid UTF-8 (smtp._address_refusal) before policy sees them; policy's contract starts there.
screened_text = st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=40)
# Peer addresses come from the socket or a validated PROXY header: an IP, or at worst junk
# without control characters.
ips = (
    st.ip_addresses().map(str)
    | st.sampled_from(["10.0.5.9", "::ffff:10.0.5.9", "2001:db8::1", "192.0.2.7", ""])
    | screened_text
)
addresses = screened_text | st.sampled_from(
    ["scanner@contoso.com", "SCANNER@CONTOSO.COM", "a@x.example", "<>", "*", "[", "jörg@c.om"]
)


@FUZZ
@given(ips, addresses, st.lists(addresses, max_size=3))
def test_policy_decides_or_refuses_with_550(ip: str, address: str, authors: list[str]) -> None:
    """identify_client finds a client whose networks hold the address, or refuses with
    550 5.7.1; the sender and recipient checks and routing only ever raise PolicyError."""
    try:
        client = identify_client(CONFIG.clients, ip)
    except PolicyError as refused:
        assert str(refused.reply).startswith("550 5.7.1 Relay access denied")  # noqa: PT017
        return
    parsed = ipaddress.ip_address(ip)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    assert any(parsed in network for network in client.networks)
    for check in (
        lambda: check_envelope_sender(client, address),
        lambda: check_recipient(client, address),
        lambda: check_authors(client, authors),
        lambda: choose_route(CONFIG.routes, effective_sender(address, authors)),
    ):
        try:
            check()
        except PolicyError as refused:
            assert refused.reply.code == 550  # noqa: PT017 - one of several calls per example
    assert isinstance(matches_any(address, [*authors, "*"]), bool)


@FUZZ
@given(
    st.integers(1, 2),
    st.booleans(),
    st.sampled_from(["inet", "inet6", "unix", "unspec"]),
    st.booleans(),
    st.none() | ips,
    st.none() | st.integers(0, 65535),
)
def test_proxy_header_gives_an_ip_endpoint_or_is_refused(
    version: int,
    relayed: bool,
    family: str,
    stream: bool,
    source: str | None,
    port: int | None,
) -> None:
    """client_endpoint returns the peer or a parseable IP with a port, or ProxyHeaderError."""
    header = ProxyHeader(version, relayed, family, stream, source, port)  # type: ignore[arg-type]
    try:
        ip, endpoint_port = client_endpoint(header, ("10.0.0.1", 5000))
    except ProxyHeaderError:
        return
    ipaddress.ip_address(ip)
    assert 0 <= endpoint_port <= 65535
    assert isinstance(is_trusted_proxy(ip, [ipaddress.ip_network("10.0.0.0/8")]), bool)


def test_refusing_a_folded_author_address_is_a_policy_error() -> None:
    """From: "a<CRLF> b"@fabrikam.example tokenizes to an address with CRLF in it; the refusal
    is still a one-line 550 5.7.1 (found by fuzzing: it used to be a 451 4.3.0 crash)."""
    authors = _authors(b'From: "a\r\n b"@fabrikam.example\r\n\r\nbody\r\n')
    assert authors == ('"a\r\n b"@fabrikam.example',)
    with pytest.raises(PolicyError):
        check_authors(CONFIG.clients[0], authors)


def test_message_id_of_unicode_whitespace_is_not_a_crash() -> None:
    """The crash input atheris wrote: b"Message-ID:\\x1c" is treated as a missing Message-ID
    and replaced (it used to raise IndexError, so the client got 451 4.3.0 for ever)."""
    trace = TraceInfo("relay.test", "192.0.2.1", None, "device", "ESMTP", "Q1", NOW)
    envelope = Envelope("scanner@contoso.com", ("bob@partner.example",))
    raw = b"From: scanner@contoso.com\r\nMessage-ID:\x1c\r\n\r\nbody\r\n"
    assert whitespace_message_id(raw)
    prepared = prepare_for_graph(
        split_header_from_body(raw), envelope, trace, message_id_local="Q1"
    )
    assert prepared.message_id == "<Q1@relay.test>"
    assert prepared.mime.count(b"Message-ID:") == 1


def _authors(raw: bytes) -> tuple[str, ...]:
    """The author addresses the SMTP layer checks, from the one header split of a DATA."""
    return read_authors(split_header_from_body(raw).fields).addresses
