"""relay.mime.split: the skeleton keeps every byte but the big attachments, which stream out."""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
from email import message_from_bytes
from email.message import Message
from email.policy import compat32

import pytest

from relay.core.message.split import BigAttachment, iter_decoded, split_off_big_attachments

THRESHOLD = 1000  # small enough to keep the test data small


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 (test data, not secrets)


def b64_lines(data: bytes, eol: bytes = b"\r\n") -> bytes:
    return base64.encodebytes(data).replace(b"\n", eol)


def part(headers: str, body: bytes, eol: bytes = b"\r\n") -> bytes:
    return headers.replace("\n", eol.decode()).encode() + eol + eol + body


def multipart(kind: str, boundary: str, parts: list[bytes], eol: bytes = b"\r\n") -> bytes:
    out = f'Content-Type: multipart/{kind}; boundary="{boundary}"'.encode() + eol + eol
    out += b"preamble" + eol
    for p in parts:
        out += b"--" + boundary.encode() + eol + p + eol
    return out + b"--" + boundary.encode() + b"--" + eol + b"epilogue" + eol


def message(body_entity: bytes, eol: bytes = b"\r\n") -> bytes:
    head = f"From: a@contoso.com{eol.decode()}To: b@partner.example{eol.decode()}Subject: s"
    return head.encode() + eol + body_entity


TEXT = part("Content-Type: text/plain; charset=utf-8", b"Hello\r\n" * 300)
SMALL = part(
    'Content-Type: application/pdf; name="small.pdf"\nContent-Transfer-Encoding: base64\n'
    'Content-Disposition: attachment; filename="small.pdf"',
    b64_lines(blob(500, seed=2)),
)
BIG_DATA = blob(5000, seed=3)
BIG = part(
    'Content-Type: application/zip; name="big.zip"\nContent-Transfer-Encoding: base64\n'
    'Content-Disposition: attachment; filename="big.zip"',
    b64_lines(BIG_DATA),
)


def decoded(source: bytes, attachment: BigAttachment) -> bytes:
    return b"".join(attachment.chunks(source, 777))


def test_a_big_attachment_leaves_the_skeleton_and_the_rest_stays_byte_exact() -> None:
    """Everything but the big part's delimiter, headers and body is copied as it was."""
    source = message(multipart("mixed", "b1", [TEXT, SMALL, BIG]))
    split = split_off_big_attachments(source, threshold=THRESHOLD)
    assert split.skeleton == message(multipart("mixed", "b1", [TEXT, SMALL]))
    (big,) = split.attachments
    assert (big.name, big.content_type, big.size, big.is_inline) == (
        "big.zip",
        "application/zip",
        len(BIG_DATA),
        False,
    )
    assert decoded(source, big) == BIG_DATA


def test_a_message_without_big_attachments_is_its_own_skeleton() -> None:
    source = message(multipart("mixed", "b1", [TEXT, SMALL]))
    assert split_off_big_attachments(source, threshold=THRESHOLD).skeleton == source


def test_an_inline_image_keeps_its_content_id_and_is_inline() -> None:
    image = part(
        "Content-Type: image/png\nContent-Transfer-Encoding: base64\n"
        "Content-ID: <logo@contoso>\nContent-Disposition: inline",
        b64_lines(BIG_DATA),
    )
    html = part("Content-Type: text/html", b'<img src="cid:logo@contoso">' * 100)
    source = message(multipart("related", "r1", [html, image]))
    (found,) = split_off_big_attachments(source, threshold=THRESHOLD).attachments
    assert (found.content_id, found.is_inline, found.content_type) == (
        "logo@contoso",
        True,
        "image/png",
    )
    assert found.name == "attachment"


def test_nested_multiparts_are_walked_and_only_big_leaves_leave() -> None:
    alternative = multipart("alternative", "alt", [TEXT, part("Content-Type: text/html", b"x")])
    related = multipart("related", "rel", [alternative, BIG])
    source = message(multipart("mixed", "mix", [related, SMALL, BIG]))
    split = split_off_big_attachments(source, threshold=THRESHOLD)
    expected = message(
        multipart("mixed", "mix", [multipart("related", "rel", [alternative]), SMALL])
    )
    assert split.skeleton == expected
    assert [a.size for a in split.attachments] == [len(BIG_DATA)] * 2
    skeleton = message_from_bytes(split.skeleton, policy=compat32)
    assert [p.get_content_type() for p in skeleton.walk()][-1] == "application/pdf"


def test_a_multipart_left_empty_gets_an_empty_text_part() -> None:
    source = message(multipart("mixed", "b1", [BIG]))
    split = split_off_big_attachments(source, threshold=THRESHOLD)
    parsed = message_from_bytes(split.skeleton, policy=compat32)
    assert parsed.is_multipart()
    assert [p.get_content_type() for p in parsed.walk()] == ["multipart/mixed", "text/plain"]


def test_a_big_text_body_stays_in_the_skeleton() -> None:
    body = part("Content-Type: text/plain", b"line\r\n" * 1000)
    source = message(multipart("mixed", "b1", [body]))
    assert split_off_big_attachments(source, threshold=THRESHOLD).attachments == ()


def test_a_single_part_message_is_never_split() -> None:
    source = message(part("Content-Type: application/pdf\nContent-Transfer-Encoding: base64",
                          b64_lines(BIG_DATA)))  # fmt: skip
    assert split_off_big_attachments(source, threshold=THRESHOLD).skeleton == source


def test_bare_lf_messages_split_too() -> None:
    eol = b"\n"
    big = part(
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64",
        b64_lines(BIG_DATA, eol),
        eol,
    )
    text = part("Content-Type: text/plain", b"hi\n", eol)
    source = message(multipart("mixed", "lf", [text, big], eol), eol)
    split = split_off_big_attachments(source, threshold=THRESHOLD)
    assert split.skeleton == message(multipart("mixed", "lf", [text], eol), eol)
    assert decoded(source, split.attachments[0]) == BIG_DATA


def test_rfc2231_and_rfc2047_file_names_are_decoded() -> None:
    rfc2231 = part(
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
        "Content-Disposition: attachment; filename*=utf-8''Bericht%20%C3%BC.pdf",
        b64_lines(BIG_DATA),
    )
    rfc2047 = part(
        'Content-Type: application/octet-stream; name="=?utf-8?q?R=C3=A9sum=C3=A9.pdf?="\n'
        "Content-Transfer-Encoding: base64",
        b64_lines(BIG_DATA),
    )
    source = message(multipart("mixed", "n", [TEXT, rfc2231, rfc2047]))
    names = [a.name for a in split_off_big_attachments(source, threshold=THRESHOLD).attachments]
    assert names == ["Bericht ü.pdf", "Résumé.pdf"]


def full_decode(entity: bytes) -> bytes:
    parsed: Message = message_from_bytes(entity, policy=compat32)
    payload = parsed.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 57, 1000, 3 * 1024 * 1024 + 5])
@pytest.mark.parametrize("wrap", [76, 64, 0])
def test_streaming_base64_decode_equals_full_decode(size: int, wrap: int) -> None:
    data = blob(size, seed=size)
    encoded = base64.b64encode(data)
    if wrap:
        encoded = b"\r\n".join(encoded[i : i + wrap] for i in range(0, len(encoded), wrap))
    entity = b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"\r\n"
    start = entity.index(b"\r\n\r\n") + 4
    streamed = b"".join(iter_decoded(entity, start, len(entity), "base64"))
    assert streamed == full_decode(entity) == data


def test_streaming_quoted_printable_decode_equals_full_decode() -> None:
    text = ("Grüße = äöü, a long line " * 40 + "\n") * 20000
    encoded = binascii.b2a_qp(text.encode(), istext=False).replace(b"\n", b"\r\n")
    entity = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    start = entity.index(b"\r\n\r\n") + 4
    streamed = b"".join(iter_decoded(entity, start, len(entity), "quoted-printable"))
    assert streamed == full_decode(entity)


def test_chunks_are_exact_sizes_and_can_resume_at_any_offset() -> None:
    source = message(multipart("mixed", "b1", [TEXT, BIG]))
    (big,) = split_off_big_attachments(source, threshold=THRESHOLD).attachments
    chunks = list(big.chunks(source, 640))
    assert [len(c) for c in chunks[:-1]] == [640] * (len(chunks) - 1)
    assert b"".join(big.chunks(source, 640, skip=1234)) == BIG_DATA[1234:]
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(BIG_DATA).digest()
