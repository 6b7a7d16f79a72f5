"""relay.mime.graph_json: the prepared MIME message as Graph's JSON message resource."""

from __future__ import annotations

import base64
import binascii
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.limits import GRAPH_MAX_REQUEST_BYTES
from relay.core.message.graph_json import (
    CannotConvertError,
    GraphJsonTooLargeError,
    GraphMessage,
    to_graph_message,
)

MAILBOX = "relay@contoso.com"
HEAD = "From: a@contoso.com\nTo: bob@partner.example\n"


def convert(raw: bytes, *recipients: str, rewrite_from: bool = False) -> GraphMessage:
    envelope = recipients or ("bob@partner.example",)
    return to_graph_message(
        raw, envelope_recipients=envelope, mailbox=MAILBOX, rewrite_from=rewrite_from
    )


def plain(headers: str, body: bytes = b"Hello.\r\n") -> bytes:
    return headers.replace("\n", "\r\n").encode() + b"\r\n" + body


def test_subject_and_from_are_decoded() -> None:
    """RFC 2047 words in Subject and in a folded From display name are decoded and joined."""
    raw = plain(
        "From: =?UTF-8?Q?Dr=C3=BCcker?=\n =?UTF-8?Q?_2.OG?= <scanner@contoso.com>\n"
        "To: bob@partner.example\nSubject: =?iso-8859-1?Q?f=FCr_Sie?=\n"
    )
    resource = convert(raw).as_json()
    assert resource["subject"] == "für Sie"
    assert resource["from"] == {
        "emailAddress": {"address": "scanner@contoso.com", "name": "Drücker 2.OG"}
    }


def test_html_alternative_is_the_body() -> None:
    """multipart/alternative: the text/html part wins; the plain alternative is not kept."""
    raw = plain(
        HEAD + 'Content-Type: multipart/alternative; boundary="b"\n',
        b"--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
        b"--b\r\nContent-Type: text/html; charset=windows-1252\r\n\r\n<p>\x80 5</p>\r\n--b--\r\n",
    )
    message = convert(raw)
    assert (message.body_type, message.body) == ("html", "<p>€ 5</p>")
    assert message.attachments == ()


def test_inline_image_keeps_its_content_id() -> None:
    """Parts of multipart/related beside the root are inline attachments with their cid."""
    image = bytes(range(200))
    raw = plain(
        HEAD + 'Content-Type: multipart/related; boundary="r"\n',
        b'--r\r\nContent-Type: text/html\r\n\r\n<img src="cid:i1@x">\r\n'
        b"--r\r\nContent-Type: image/png\r\nContent-ID: <i1@x>\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\n" + base64.encodebytes(image) + b"--r--\r\n",
    )
    [attachment] = convert(raw).as_json()["attachments"]
    assert attachment["contentId"] == "i1@x"
    assert attachment["isInline"] is True
    assert base64.b64decode(attachment["contentBytes"]) == image


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ('multipart/signed; protocol="application/pkcs7-signature"; boundary="s"', "signature"),
        ("application/pkcs7-mime; smime-type=enveloped-data", "S/MIME"),
        ('multipart/encrypted; boundary="s"', "encrypted"),
    ],
)
def test_signed_and_encrypted_messages_are_refused(content_type: str, reason: str) -> None:
    """Converting would break or lose the signature: 554 5.6.0 naming why."""
    raw = plain(HEAD + f"Content-Type: {content_type}\n")
    with pytest.raises(CannotConvertError) as caught:
        convert(raw)
    assert reason in caught.value.reason
    assert (caught.value.reply.code, caught.value.reply.status) == (554, "5.6.0")


def test_calendar_invitation_is_refused() -> None:
    """A text/calendar alternative would arrive as a file, not as a meeting request."""
    raw = plain(
        HEAD + 'Content-Type: multipart/alternative; boundary="c"\n',
        b"--c\r\nContent-Type: text/plain\r\n\r\nx\r\n"
        b"--c\r\nContent-Type: text/calendar; method=REQUEST\r\n\r\nBEGIN:VCALENDAR\r\n--c--\r\n",
    )
    with pytest.raises(CannotConvertError, match="calendar"):
        convert(raw)


def test_unparseable_reply_to_is_refused_not_raised_raw() -> None:
    """Reply-To is not checked at DATA; a broken one is a conversion refusal, not a crash."""
    raw = plain(HEAD + 'Reply-To: "unterminated <a@b.example>\n')
    with pytest.raises(CannotConvertError, match="reply-to"):
        convert(raw)


def test_body_not_valid_in_its_charset_is_refused() -> None:
    """A wrong guess would change the text, so there is none."""
    raw = plain(
        HEAD + "Content-Type: text/plain; charset=us-ascii\n",
        b"caf\xe9\r\n",
    )
    with pytest.raises(CannotConvertError, match="us-ascii"):
        convert(raw)


def test_recipients_are_exactly_the_envelope() -> None:
    """Header-only recipients go; envelope-only recipients become Bcc; names are kept."""
    raw = plain(
        'From: a@contoso.com\nTo: "Bob, B." <bob@partner.example>, eve@elsewhere.example\n'
        "Cc: undisclosed-recipients:;\n"
    )
    message = convert(raw, "BOB@partner.example", "audit@contoso.com")
    resource = message.as_json()
    assert resource["toRecipients"] == [
        {"emailAddress": {"address": "bob@partner.example", "name": "Bob, B."}}
    ]
    assert resource["ccRecipients"] == []
    assert resource["bccRecipients"] == [{"emailAddress": {"address": "audit@contoso.com"}}]


def test_rewrite_from_moves_the_author_to_reply_to() -> None:
    """rewrite_from: From is the route mailbox (name kept), the author goes to replyTo."""
    raw = plain(
        "From: Scanner <scanner@contoso.com>\nSender: scanner@contoso.com\nTo: b@x.example\n"
    )
    resource = convert(raw, "b@x.example", rewrite_from=True).as_json()
    assert resource["from"] == {"emailAddress": {"address": MAILBOX, "name": "Scanner"}}
    assert resource["replyTo"] == [
        {"emailAddress": {"address": "scanner@contoso.com", "name": "Scanner"}}
    ]
    assert "sender" not in resource


def test_rewrite_from_keeps_an_existing_reply_to() -> None:
    """The author's own Reply-To is what replies should reach."""
    raw = plain("From: s@contoso.com\nReply-To: desk@contoso.com\nTo: b@x.example\n")
    resource = convert(raw, "b@x.example", rewrite_from=True).as_json()
    assert [r["emailAddress"]["address"] for r in resource["replyTo"]] == ["desk@contoso.com"]


@pytest.mark.parametrize(
    ("header", "importance"),
    [
        ("Importance: High", "high"),
        ("X-Priority: 5 (Lowest)", "low"),
        ("X-MSMail-Priority: Normal", "normal"),
        ("Priority: urgent", "high"),
    ],
)
def test_importance_comes_from_the_priority_headers(header: str, importance: str) -> None:
    raw = plain(f"From: a@contoso.com\nTo: bob@partner.example\n{header}\n")
    assert convert(raw).as_json()["importance"] == importance


def test_only_the_first_five_x_headers_are_kept() -> None:
    """Graph takes x- headers only, at most five; priority headers became importance."""
    extra = "".join(f"X-Custom-{n}: v{n}\n" for n in range(7))
    raw = plain(
        f"From: a@contoso.com\nTo: bob@partner.example\nX-Priority: 1\nIn-Reply-To: <p@x>\n{extra}"
    )
    message = convert(raw)
    assert [name for name, _ in message.headers] == [f"X-Custom-{n}" for n in range(5)]
    assert message.dropped_headers == ("X-Custom-5", "X-Custom-6")


def test_nested_message_is_an_eml_attachment_with_its_own_octets() -> None:
    inner = b"From: x@y.example\r\nSubject: Original\r\n\r\nbody\r\n"
    raw = plain(
        HEAD + 'Content-Type: multipart/mixed; boundary="m"\n',
        b"--m\r\nContent-Type: text/plain\r\n\r\nsee below\r\n"
        b"--m\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--m--\r\n",
    )
    [attachment] = convert(raw).attachments
    assert (attachment.name, attachment.content_type) == ("Original.eml", "message/rfc822")
    assert attachment.content == inner


def test_too_large_for_one_request() -> None:
    """The JSON request must fit 4 MB: 552 5.3.4 otherwise."""
    blob = base64.encodebytes(b"\0" * (GRAPH_MAX_REQUEST_BYTES * 3 // 4 + 1))
    raw = plain(
        HEAD + 'Content-Type: application/zip; name="a.zip"\nContent-Transfer-Encoding: base64\n',
        blob,
    )
    with pytest.raises(GraphJsonTooLargeError) as caught:
        convert(raw)
    assert (caught.value.reply.code, caught.value.reply.status) == (552, "5.3.4")


def test_request_body_says_save_to_sent_items_only_when_false() -> None:
    message = convert(plain("From: a@contoso.com\nTo: bob@partner.example\n"))
    assert "saveToSentItems" not in json.loads(message.request_body(save_to_sent_items=True))
    assert json.loads(message.request_body(save_to_sent_items=False))["saveToSentItems"] is False


# --- properties -----------------------------------------------------------------------------

_local = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=12)
_local = _local.filter(lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s)
_domain = st.sampled_from(["contoso.com", "partner.example", "Fabrikam.EXAMPLE"])
_address = st.builds(lambda local, domain: f"{local}@{domain}", _local, _domain)
_header_name = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(
    to=st.lists(_address, max_size=5),
    cc=st.lists(_address, max_size=5),
    envelope=st.lists(_address, min_size=1, max_size=6),
)
def test_property_recipients_equal_the_envelope(
    to: list[str], cc: list[str], envelope: list[str]
) -> None:
    """Whatever To/Cc say, Graph gets exactly the envelope recipients, each once."""
    headers = "From: a@contoso.com\n"
    if to:
        headers += "To: " + ", ".join(to) + "\n"
    if cc:
        headers += "Cc: " + ",\n\t".join(f'"N {n}" <{a}>' for n, a in enumerate(cc)) + "\n"
    message = convert(plain(headers), *envelope)
    got = [a.casefold() for a in message.recipients]
    assert sorted(got) == sorted({a.casefold() for a in envelope})


@settings(max_examples=100, deadline=None)
@given(
    blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    encoding=st.sampled_from(["base64", "quoted-printable"]),
)
def test_property_attachment_bytes_are_preserved(blobs: list[bytes], encoding: str) -> None:
    """Decoded attachment bytes equal what was encoded, whatever the transfer encoding."""
    parts = b"--z\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
    for n, blob in enumerate(blobs):
        if encoding == "base64":
            encoded = base64.encodebytes(blob)
        else:
            encoded = binascii.b2a_qp(blob, istext=False).replace(b"\n", b"\r\n") + b"\r\n"
        parts += (
            f'--z\r\nContent-Type: application/octet-stream; name="f{n}.bin"\r\n'
            f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
        ).encode() + encoded
    raw = plain(
        HEAD + 'Content-Type: multipart/mixed; boundary="z"\n',
        parts + b"--z--\r\n",
    )
    resource = convert(raw).as_json()
    got = [base64.b64decode(a["contentBytes"]) for a in resource["attachments"]]
    if encoding == "quoted-printable":  # the line break before the delimiter is not content
        blobs = [b.rstrip(b"\r\n") if b.endswith(b"\r\n") else b for b in blobs]
        got = [g.rstrip(b"\r\n") if g.endswith(b"\r\n") else g for g in got]
    assert got == blobs


@settings(max_examples=150, deadline=None)
@given(names=st.lists(_header_name, max_size=12))
def test_property_internet_headers_are_few_and_x_only(names: list[str]) -> None:
    """Never more than five internetMessageHeaders, all named x-/X-."""
    extra = "".join(f"{name}: value\n" for name in names if name.lower() not in _RESERVED)
    message = convert(plain(f"From: a@contoso.com\nTo: bob@partner.example\n{extra}"))
    headers = message.as_json().get("internetMessageHeaders", [])
    assert len(headers) <= 5
    assert all(h["name"].lower().startswith("x-") for h in headers)


_RESERVED = {
    "from",
    "to",
    "cc",
    "bcc",
    "sender",
    "reply-to",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
}


def test_json_recipients_come_from_the_one_reconciliation() -> None:
    """The JSON form reads the same decision as the MIME form: a Cc with two readings names
    frank (the strict one), and a To no strict reading can read is left to Bcc."""
    raw = plain(
        "From: a@contoso.com\nTo: <bob@partner.example> eve@example.com\n"
        "CC: eve@example.com <frank@example.com>\n"
    )
    message = convert(raw, "bob@partner.example", "frank@example.com")
    assert [(r.address, r.name) for r in message.cc] == [("frank@example.com", "eve@example.com")]
    assert message.to == ()
    assert [r.address for r in message.bcc] == ["bob@partner.example"]
