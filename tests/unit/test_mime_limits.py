"""relay.mime.limits: the DATA stream decoded and checked line by line, without I/O."""

from __future__ import annotations

import pytest

from relay.core.message.limits import (
    AMBIGUOUS_END_OF_DATA,
    BARE_CR_IN_HEADER,
    MESSAGE_TOO_BIG,
    NUL_CHARACTER,
    ContentLimits,
    ContentRefusedError,
    DataDecoder,
    check_content,
)

REJECT = ContentLimits()
NORMALIZE = ContentLimits(bare_line_endings="normalize")
HEAD = b"From: scanner@contoso.com\r\nTo: bob@partner.example\r\nSubject: Scan\r\n\r\n"
SMUGGLED = (
    b"MAIL FROM:<ceo@contoso.com>\r\nRCPT TO:<victim@partner.example>\r\nDATA\r\n"
    b"From: ceo@contoso.com\r\n\r\nforged\r\n"
)
# Each ending a lenient SMTP server has been known to take for the end of DATA.
SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\n.\r",
]


def wire_pieces(wire: bytes, chunk: int | None = None) -> list[bytes]:
    """`wire` cut the way the listener reads it: up to each CRLF, long lines in `chunk` pieces."""
    pieces: list[bytes] = []
    pos = 0
    while pos < len(wire):
        end = wire.find(b"\r\n", pos)
        end = len(wire) if end < 0 else end + 2
        line = wire[pos:end]
        while chunk is not None and len(line) > chunk + 2:
            pieces.append(line[:chunk])
            line = line[chunk:]
        pieces.append(line)
        pos = end
    return pieces


def decode(wire: bytes, limits: ContentLimits = REJECT, chunk: int | None = None) -> bytes:
    """Feed `wire` (which must end with CRLF . CRLF) and return the content or raise."""
    decoder = DataDecoder(limits)
    pieces = wire_pieces(wire, chunk)
    for n, piece in enumerate(pieces):
        if decoder.feed(piece):
            assert n == len(pieces) - 1, "DATA ended before the last piece"
            return decoder.content()
    raise AssertionError("DATA never ended")


def refusal(wire: bytes, limits: ContentLimits = REJECT) -> str:
    with pytest.raises(ContentRefusedError) as refused:
        decode(wire, limits)
    return str(refused.value.reply)


# --- end of DATA and transparency ----------------------------------------------------------


def test_crlf_dot_crlf_ends_data_and_the_content_is_what_came_before() -> None:
    """RFC 5321 §4.1.1.4: the end-of-data line is not part of the content."""
    assert decode(HEAD + b"Hello\r\n.\r\n") == HEAD + b"Hello\r\n"


def test_empty_message_is_an_immediate_dot() -> None:
    """A lone "." as the first line ends DATA with no content."""
    assert decode(b".\r\n") == b""


def test_leading_dots_lose_one_dot_of_transparency() -> None:
    """RFC 5321 §4.5.2: "..x" is ".x" and ".." is "." in the content."""
    assert decode(HEAD + b"..hidden\r\n..\r\n...\r\n.\r\n") == HEAD + b".hidden\r\n.\r\n..\r\n"


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS)
def test_bare_line_ending_next_to_a_dot_never_ends_data_and_is_refused(ending: bytes) -> None:
    """SMTP smuggling: the ambiguous ending is content, and with `reject` the message goes."""
    wire = HEAD + b"body" + ending + SMUGGLED + b".\r\n"
    assert refusal(wire) == str(AMBIGUOUS_END_OF_DATA)
    assert str(AMBIGUOUS_END_OF_DATA).startswith("550 5.6.0 ")


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS)
def test_normalize_keeps_the_smuggled_commands_as_text_of_one_message(ending: bytes) -> None:
    """With `normalize` the bare ending becomes CRLF and the "." stays a line of content."""
    content = decode(HEAD + b"body" + ending + SMUGGLED + b".\r\n", NORMALIZE)
    assert content.startswith(HEAD + b"body\r\n")
    assert b"\r\n.\r\n" in content
    assert content.endswith(b"forged\r\n")
    assert b"MAIL FROM:<ceo@contoso.com>\r\n" in content
    assert b"\n" not in content.replace(b"\r\n", b"")
    assert b"\r" not in content.replace(b"\r\n", b"")


def test_nul_next_to_a_dot_is_ambiguous_too() -> None:
    """Some servers drop NUL, so CRLF NUL "." CRLF would end their DATA."""
    assert refusal(HEAD + b"body\r\n\0.\r\n" + SMUGGLED + b".\r\n") == str(AMBIGUOUS_END_OF_DATA)


def test_dot_stuffed_lines_around_bare_lf_are_not_ambiguous() -> None:
    """A ".." or ".x" piece cannot end anyone's DATA; only a lone "." does."""
    wire = HEAD + b"a\n..\nb\n.x\r\n.\r\n"
    assert decode(wire) == HEAD + b"a\n..\nb\n.x\r\n"


# --- bare line endings that cannot end DATA ------------------------------------------------


def test_bare_lf_body_of_a_legacy_device_passes_byte_for_byte() -> None:
    """DESIGN §7: bare LF inside the body of an otherwise valid message is tolerated."""
    body = b"line one\nline two\n\nline four\r\n"
    assert decode(HEAD + body + b".\r\n") == HEAD + body


def test_a_message_with_lf_only_lines_and_a_proper_end_passes_unchanged() -> None:
    """Header block and body in bare LF: `relay.message` handles them; nothing is refused."""
    raw = b"From: scanner@contoso.com\nTo: bob@partner.example\nSubject: x\n\nbody\nmore\r\n"
    assert decode(raw + b".\r\n") == raw


def test_bare_cr_in_the_body_passes_with_reject() -> None:
    """A bare CR in the body cannot split a header field or end DATA."""
    body = b"old mac\rline\r\n"
    assert decode(HEAD + body + b".\r\n") == HEAD + body


@pytest.mark.parametrize(
    "header",
    [
        b"Subject: a\rBcc: hidden@elsewhere.example\r\n",
        b"Subject: a\r\r\n",
        b"To: bob@partner.example\r\n\rBcc: hidden@elsewhere.example\r\n",
    ],
)
def test_bare_cr_in_the_header_block_is_refused(header: bytes) -> None:
    """Another parser could split the header there and see other fields than we do."""
    wire = b"From: scanner@contoso.com\r\n" + header + b"\r\nbody\r\n.\r\n"
    assert refusal(wire) == str(BARE_CR_IN_HEADER)


def test_normalize_turns_a_bare_cr_in_the_header_into_a_line_break() -> None:
    """`normalize` makes the header what a CR-splitting parser sees, for every parser."""
    wire = b"From: scanner@contoso.com\r\nSubject: a\rBcc: x@partner.example\r\n\r\nb\r\n.\r\n"
    assert decode(wire, NORMALIZE) == (
        b"From: scanner@contoso.com\r\nSubject: a\r\nBcc: x@partner.example\r\n\r\nb\r\n"
    )


def test_normalize_applies_transparency_to_each_normalized_line() -> None:
    """Each bare-LF line is handled as if it had come with CRLF: "..x" loses one dot."""
    assert decode(HEAD + b"a\n..x\nb\r\n.\r\n", NORMALIZE) == HEAD + b"a\r\n.x\r\nb\r\n"


# --- NUL, size, long lines -----------------------------------------------------------------


@pytest.mark.parametrize(
    "wire", [HEAD + b"body\0text\r\n.\r\n", b"Subject: a\0b\r\n\r\nbody\r\n.\r\n"]
)
def test_nul_anywhere_is_refused(wire: bytes) -> None:
    """RFC 5322 §2.3 / RFC 6152: no NUL in a message sent without BINARYMIME."""
    assert refusal(wire) == str(NUL_CHARACTER)


def test_content_over_max_size_is_552_534_after_the_end_of_data() -> None:
    """The refusal waits for the end of DATA (RFC 5321 §4.2.5) and keeps nothing."""
    decoder = DataDecoder(ContentLimits(max_size=100))
    assert not decoder.feed(HEAD)  # 77 bytes
    assert not decoder.feed(b"x" * 30 + b"\r\n")
    assert decoder.refusal == MESSAGE_TOO_BIG
    assert not decoder.feed(b"more after the refusal\r\n")
    assert decoder.feed(b".\r\n")
    with pytest.raises(ContentRefusedError) as refused:
        decoder.content()
    assert str(refused.value.reply) == "552 5.3.4 Message size exceeds fixed maximum message size"


def test_content_of_exactly_max_size_is_accepted() -> None:
    """The limit is inclusive."""
    body = b"x" * (100 - len(HEAD) - 2) + b"\r\n"
    assert len(decode(HEAD + body + b".\r\n", ContentLimits(max_size=100))) == 100


def test_a_long_line_arrives_in_fragments_and_is_kept_whole() -> None:
    """DESIGN §7 tolerates long lines: fragments join into one line of content."""
    body = b"y" * 5000 + b"\r\n"
    assert decode(HEAD + body + b".\r\n", chunk=1000) == HEAD + body


def test_dot_line_right_after_a_fragment_is_content_not_the_end() -> None:
    """A CRLF "." CRLF can only end DATA at the start of a line, never inside a long one."""
    decoder = DataDecoder(REJECT)
    decoder.feed(HEAD)
    assert not decoder.feed(b"z" * 2000)  # fragment, no CRLF yet
    assert not decoder.feed(b".\r\n")  # the rest of that same line
    assert decoder.feed(b".\r\n")
    assert decoder.content() == HEAD + b"z" * 2000 + b".\r\n"


def test_a_long_line_over_the_size_limit_is_dropped_while_read() -> None:
    """Fragments are counted as they come: memory stays bounded by max_size."""
    decoder = DataDecoder(ContentLimits(max_size=1000))
    for _ in range(10):
        decoder.feed(b"w" * 500)
    assert decoder.refusal == MESSAGE_TOO_BIG
    assert not decoder.feed(b"\r\n")
    assert decoder.feed(b".\r\n")


def test_decoder_misuse_is_a_programming_error() -> None:
    """content() before the end, or feed() after it, raises RuntimeError."""
    decoder = DataDecoder(REJECT)
    with pytest.raises(RuntimeError):
        decoder.content()
    decoder.feed(b".\r\n")
    with pytest.raises(RuntimeError):
        decoder.feed(b"x\r\n")


# --- header block size ---------------------------------------------------------------------


def header_of(size: int) -> bytes:
    """A header block of exactly `size` bytes, the empty line included."""
    filler = size - len(b"X-Fill: \r\n\r\n")
    return b"X-Fill: " + b"a" * filler + b"\r\n\r\n"


def test_header_block_at_the_limit_passes_and_one_byte_more_is_554() -> None:
    """max_header_bytes counts the whole block, continuation lines and empty line included."""
    limits = ContentLimits(max_header_bytes=4096)
    assert decode(header_of(4096) + b"body\r\n.\r\n", limits)
    assert refusal(header_of(4097) + b"body\r\n.\r\n", limits) == (
        "554 5.6.0 Message header block exceeds 4096 bytes"
    )


def test_folded_header_lines_count_towards_the_header_block() -> None:
    """Continuation lines belong to the header block."""
    folded = b"Subject: x\r\n" + b" more\r\n" * 200 + b"\r\n"
    assert refusal(folded + b".\r\n", ContentLimits(max_header_bytes=1000)).startswith("554 5.6.0")


def test_a_big_body_does_not_count_as_header() -> None:
    """The header block ends at the empty line; the body is not held to the header limit."""
    limits = ContentLimits(max_header_bytes=200)
    assert decode(HEAD + b"b" * 998 + b"\r\n" * 1 + b".\r\n", limits)


def test_a_header_block_ends_at_a_line_that_is_no_field() -> None:
    """Like relay.mime.headers: a body without its empty line still ends the header block."""
    raw = b"Subject: x\r\nthis is the body, no empty line before it\r\n" + b"b" * 500 + b"\r\n"
    assert decode(raw + b".\r\n", ContentLimits(max_header_bytes=100)) == raw


def test_a_mime_part_header_is_held_to_the_same_limit() -> None:
    """Each header block counts, the parts' as well as the message's own."""
    part_header = b"Content-Type: text/plain\r\nX-Pad: " + b"p" * 300 + b"\r\n\r\n"
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        + part_header
        + b"text\r\n--b--\r\n"
    )
    assert refusal(raw + b".\r\n", ContentLimits(max_header_bytes=300)).startswith("554 5.6.0")


def test_an_mbox_from_line_is_not_the_end_of_the_header_block() -> None:
    """A leading "From " separator is framing, as relay.mime.headers reads it."""
    raw = b"From scanner@contoso.com Mon Jan  1 00:00:00 2024\r\n" + HEAD + b"body\r\n"
    assert decode(raw + b".\r\n", ContentLimits(max_header_bytes=200)) == raw


# --- MIME nesting --------------------------------------------------------------------------


def nested(depth: int, *, boundary: bytes = b"b%d") -> bytes:
    """A message whose multiparts nest `depth` levels deep."""
    out = b"From: scanner@contoso.com\r\n"
    for level in range(depth):
        name = boundary % level if b"%d" in boundary else boundary
        out += b'Content-Type: multipart/mixed; boundary="' + name + b'"\r\n\r\n--' + name + b"\r\n"
    out += b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for level in reversed(range(depth)):
        name = boundary % level if b"%d" in boundary else boundary
        out += b"--" + name + b"--\r\n"
    return out


def test_mime_nesting_at_the_limit_passes_and_one_more_level_is_554() -> None:
    """max_mime_depth levels of multipart are fine; one more is refused."""
    limits = ContentLimits(max_mime_depth=50)
    assert decode(nested(50) + b".\r\n", limits)
    assert refusal(nested(51) + b".\r\n", limits) == "554 5.6.0 MIME nesting exceeds 50 levels"


def test_five_hundred_levels_are_refused_without_parsing_the_message() -> None:
    """The refusal comes at level 51; the rest is only scanned for the end of DATA."""
    assert refusal(nested(500) + b".\r\n").startswith("554 5.6.0 MIME nesting exceeds")


def test_sibling_parts_do_not_add_up_to_depth() -> None:
    """Closed multiparts give their level back: 100 siblings of depth 2 are depth 2."""
    inner = (
        b'--o\r\nContent-Type: multipart/alternative; boundary="i"\r\n\r\n--i\r\n\r\nt\r\n--i--\r\n'
    )
    raw = b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n' + inner * 100 + b"--o--\r\n"
    assert decode(raw + b".\r\n", ContentLimits(max_mime_depth=2))


def test_an_outer_boundary_closes_the_levels_nested_inside() -> None:
    """RFC 2046 §5.1.2: a parent's delimiter ends unterminated inner multiparts."""
    unterminated = (
        b'--o\r\nContent-Type: multipart/mixed; boundary="i"\r\n\r\n--i\r\n\r\nno close\r\n'
    )
    raw = b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n' + unterminated * 10 + b"--o--\r\n"
    assert decode(raw + b".\r\n", ContentLimits(max_mime_depth=2))


def test_encapsulated_messages_count_as_levels() -> None:
    """message/rfc822 opens a level: its body is another message with its own header."""
    part = b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n"
    raw = b"Subject: outer\r\n" + part * 5 + b"\r\nbody\r\n"
    assert refusal(raw + b".\r\n", ContentLimits(max_mime_depth=4)).startswith("554 5.6.0")
    assert decode(raw + b".\r\n", ContentLimits(max_mime_depth=5))


def test_base64_encoded_message_rfc822_is_opaque() -> None:
    """An encoded message/rfc822 is not followed (its body is base64, not a header)."""
    part = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    raw = b"Subject: outer\r\n" + part + b"U3ViamVjdDogaW5uZXIK\r\n"
    assert decode(raw + b".\r\n", ContentLimits(max_mime_depth=1))


def test_digest_parts_default_to_message_rfc822() -> None:
    """RFC 2046 §5.1.5: a digest part without Content-Type is an encapsulated message."""
    raw = (
        b'Content-Type: multipart/digest; boundary="d"\r\n\r\n'
        b"--d\r\n\r\nSubject: one\r\n\r\nbody\r\n--d--\r\n"
    )
    assert refusal(raw + b".\r\n", ContentLimits(max_mime_depth=1)).startswith("554 5.6.0")
    assert decode(raw + b".\r\n", ContentLimits(max_mime_depth=2))


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        (b'Content-Type: multipart/mixed; boundary="a\\"b"', b'a"b'),
        (b"Content-Type: Multipart/Mixed; charset=x; BOUNDARY=a.b-c", b"a.b-c"),
        (b'content-type:multipart/mixed;\r\n boundary="a b"', b"a b"),
    ],
)
def test_boundary_parameter_forms(content_type: bytes, boundary: bytes) -> None:
    """Quoted (with quoted-pair) or token boundaries, any case, folded: all are followed."""
    inner = b'Content-Type: multipart/mixed; boundary="z"\r\n\r\n--z\r\n\r\nx\r\n--z--\r\n'
    raw = content_type + b"\r\n\r\n--" + boundary + b"\r\n" + inner + b"--" + boundary + b"--\r\n"
    assert refusal(raw + b".\r\n", ContentLimits(max_mime_depth=1)).startswith("554 5.6.0")
    assert decode(raw + b".\r\n", ContentLimits(max_mime_depth=2))


def test_delimiter_with_transport_padding_is_recognised() -> None:
    """RFC 2046 §5.1.1: spaces or tabs may follow a boundary delimiter."""
    raw = (
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n'
        b'--o \t\r\nContent-Type: multipart/mixed; boundary="i"\r\n\r\n--i\r\n\r\nx\r\n'
    )
    assert refusal(raw + b".\r\n", ContentLimits(max_mime_depth=1)).startswith("554 5.6.0")


def test_multipart_without_boundary_is_a_leaf() -> None:
    """No boundary, no parts to follow: nothing opens."""
    raw = b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: multipart/mixed\r\n\r\n"
    assert decode(raw + b".\r\n", ContentLimits(max_mime_depth=1))


# --- check_content: the same rules over a whole message -------------------------------------


def test_check_content_accepts_an_ordinary_message() -> None:
    """check_content returns None for a message within every limit."""
    check_content(HEAD + b"Hello\r\n", REJECT)


@pytest.mark.parametrize(
    ("raw", "limits", "reply"),
    [
        (HEAD + b"x" * 200, ContentLimits(max_size=100), "552 5.3.4"),
        (HEAD + b"\0", REJECT, "550 5.6.0"),
        (b"Subject: a\rb\r\n\r\n", REJECT, "550 5.6.0"),
        (header_of(500), ContentLimits(max_header_bytes=499), "554 5.6.0"),
        (nested(3), ContentLimits(max_mime_depth=2), "554 5.6.0"),
    ],
)
def test_check_content_refuses_what_the_decoder_refuses(
    raw: bytes, limits: ContentLimits, reply: str
) -> None:
    """Same replies as at the end of DATA."""
    with pytest.raises(ContentRefusedError) as refused:
        check_content(raw, limits)
    assert str(refused.value.reply).startswith(reply)


def test_check_content_with_normalize_leaves_bare_cr_headers_alone() -> None:
    """Under `normalize` the decoder has already made them CRLF; nothing to refuse here."""
    check_content(b"Subject: a\rb\r\n\r\n", NORMALIZE)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_size": 0},
        {"max_header_bytes": 0},
        {"max_mime_depth": 0},
        {"bare_line_endings": "accept"},
    ],
)
def test_limits_are_validated_when_built(kwargs: dict[str, object]) -> None:
    """Nonsense limits are a programming error, caught at construction."""
    with pytest.raises(ValueError, match=r"."):
        ContentLimits(**kwargs)  # type: ignore[arg-type]
