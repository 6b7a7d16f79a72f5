"""The message core as a specification: what the relay changes before Graph sees a message."""

from __future__ import annotations

import email
from datetime import datetime, timedelta, timezone
from email.policy import compat32
from email.utils import getaddresses

import pytest

from relay.core.errors import RelayError
from relay.core.message.headers import decode_header_text, decode_words, split_header_from_body
from relay.core.message.prepare import (
    AddressItem,
    Envelope,
    PreparedMessage,
    TraceInfo,
    UnparseableMessageError,
    UnreadableAuthorError,
    parse_address_list,
    prepare_for_graph,
    read_authors,
    reconcile_recipients,
    trace_protocol,
)

NOW = datetime(2024, 3, 5, 14, 30, 7, tzinfo=timezone(timedelta(hours=1)))
NOW_TEXT = "Tue, 05 Mar 2024 14:30:07 +0100"
CRLF = b"\r\n"


def msg(*lines: str | bytes, body: bytes = b"Hello.\r\n", eol: bytes = CRLF) -> bytes:
    """A message from header lines (str is UTF-8), an empty line and `body`."""
    encoded = [line.encode() if isinstance(line, str) else line for line in lines]
    return eol.join(encoded) + eol + eol + body


def trace(**changes: object) -> TraceInfo:
    values: dict[str, object] = {
        "relay_hostname": "relay.contoso.com",
        "client_ip": "10.0.5.7",
        "client_hostname": "scanner.lan",
        "helo": "SCANNER01",
        "protocol": "ESMTP",
        "queue_id": "Q1A2B3",
        "now": NOW,
    }
    values.update(changes)
    return TraceInfo(**values)  # type: ignore[arg-type]


def prepare(raw: bytes, *recipients: str, **trace_changes: object) -> PreparedMessage:
    return prepare_for_graph(
        split_header_from_body(raw),
        Envelope("scanner@contoso.com", recipients),
        trace(**trace_changes),
        message_id_local="m1.Q1A2B3",
    )


def fields(raw: bytes, name: str) -> list[bytes]:
    """The raw bytes of each top-level field called `name` (any case), in order."""
    return [f.raw for f in split_header_from_body(raw).fields if f.key == name.lower()]


def header_addresses(raw: bytes) -> list[str]:
    """To/Cc/Bcc addresses as the stdlib reads them: an independent cross-check."""
    parsed = email.message_from_bytes(raw, policy=compat32)
    values = [str(v) for name in ("to", "cc", "bcc") for v in parsed.get_all(name, [])]
    return sorted(addr.lower() for _, addr in getaddresses(values) if addr)


def body(raw: bytes) -> bytes:
    return split_header_from_body(raw).body


# --- recipient reconciliation ---------------------------------------------------------------------


def test_envelope_recipient_missing_from_headers_is_added_in_a_new_bcc_field() -> None:
    """An envelope-only recipient (a Bcc the client kept out of the header) gets a Bcc field."""
    raw = msg("From: scanner@contoso.com", "To: alice@contoso.com", "Subject: x")
    out = reconcile_recipients(raw, ["alice@contoso.com", "hidden@contoso.com"])
    assert out == msg(
        "From: scanner@contoso.com",
        "To: alice@contoso.com",
        "Subject: x",
        "Bcc: hidden@contoso.com",
    )


def test_missing_recipient_is_appended_to_a_remaining_bcc_field() -> None:
    """When a Bcc field survives the rewrite, missing recipients join it instead of a second one."""
    raw = msg("To: alice@contoso.com", "Bcc: bob@contoso.com", "Subject: x")
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com"])
    assert fields(out, "bcc") == [b"Bcc: bob@contoso.com, carol@contoso.com\r\n"]


@pytest.mark.parametrize("name", ["To", "Cc", "Bcc"])
def test_header_recipient_not_in_envelope_is_removed(name: str) -> None:
    """Graph must not deliver to a header recipient the client did not RCPT TO."""
    raw = msg(f"{name}: alice@contoso.com, stranger@example.net", "Subject: x")
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert fields(out, name) == [f"{name}: alice@contoso.com\r\n".encode()]


@pytest.mark.parametrize(("emptied", "other"), [("To", "Cc"), ("Cc", "To"), ("Bcc", "To")])
def test_field_left_without_addresses_is_removed_entirely(emptied: str, other: str) -> None:
    """A recipient field whose every address was removed disappears instead of staying empty."""
    raw = msg(
        f"{other}: alice@contoso.com",
        f"{emptied}: stranger@example.net,",
        " (a comment) Other <other@example.net>",
        "Subject: x",
    )
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert out == msg(f"{other}: alice@contoso.com", "Subject: x")


@pytest.mark.parametrize(
    "field",
    [
        b"To: alice@contoso.com,bob@contoso.com",
        b'To:   "Doe, Alice"  <alice@contoso.com> (desk),\r\n\t bob@contoso.com',
        b"TO: =?iso-8859-1?Q?J=F6rg?= <alice@contoso.com>,\r\n  Bob <bob@contoso.com>  ",
        b"To: Alice <alice@contoso.com>,, , bob@contoso.com",
        b"To: team: alice@contoso.com, bob@contoso.com;",
    ],
)
def test_recipient_field_that_keeps_all_its_addresses_is_byte_identical(field: bytes) -> None:
    """Odd spacing, folding, comments and empty items survive when nothing has to be removed."""
    raw = msg(b"From: scanner@contoso.com", field, b"Subject: x")
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com"])
    assert out == raw


def test_undisclosed_recipients_group_stays_as_it_is() -> None:
    """`undisclosed-recipients:;` names nobody; everyone is delivered through Bcc."""
    raw = msg("To: undisclosed-recipients:;", "Subject: x")
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com"])
    assert fields(out, "to") == [b"To: undisclosed-recipients:;\r\n"]
    assert fields(out, "bcc") == [b"Bcc: alice@contoso.com, bob@contoso.com\r\n"]


def test_named_group_keeps_its_name_and_only_envelope_members() -> None:
    """Members of a named group that are not envelope recipients are removed; the group stays."""
    raw = msg('To: Team: "Doe, Alice" <alice@contoso.com>, eve@example.net, bob@contoso.com;')
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com"])
    assert fields(out, "to") == [
        b'To: Team: "Doe, Alice" <alice@contoso.com>, bob@contoso.com;\r\n'
    ]


def test_named_group_without_any_envelope_member_becomes_an_empty_group() -> None:
    """A group keeps `name:;` when all its members go, like `undisclosed-recipients:;`."""
    raw = msg("To: Team: eve@example.net;, alice@contoso.com")
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert fields(out, "to") == [b"To: Team:;, alice@contoso.com\r\n"]


@pytest.mark.parametrize(
    "kept",
    [
        '"Doe, Alice" <alice@contoso.com>',
        '"alice@contoso.com" <alice@contoso.com>',
        "=?iso-8859-1?Q?J=F6rg?= <alice@contoso.com>",
        "=?utf-8?B?SsO2cmcsIERvZQ==?= <alice@contoso.com>",
        "alice@contoso.com (Alice, at her desk)",
        '"Jörg \\"JJ\\" Müller" <alice@contoso.com>',
        "<@relay1.example,@relay2.example:alice@contoso.com>",
    ],
)
def test_kept_item_keeps_its_exact_text_when_its_field_is_rewritten(kept: str) -> None:
    """Display names, encoded words, comments and obsolete routes are copied, not re-encoded."""
    raw = msg(f"To: eve@example.net, {kept}, mallory@example.net")
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert fields(out, "to") == [f"To: {kept}\r\n".encode()]


def test_to_folded_across_three_lines_is_filtered_per_item() -> None:
    """Folded fields are unfolded for parsing; items are found across line breaks."""
    raw = msg(
        'To: "Doe, Alice" <alice@contoso.com>,',
        " eve@example.net,",
        "\tBob <bob@contoso.com>",
        "Subject: x",
    )
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com"])
    assert fields(out, "to") == [b'To: "Doe, Alice" <alice@contoso.com>, Bob <bob@contoso.com>\r\n']


def test_rewritten_field_is_folded_between_items_within_78_characters() -> None:
    """Re-emitted lines stay within RFC 5322's 78 characters, folding only after a comma."""
    keep = [f"Person Number {n} <person{n}@contoso.com>" for n in range(8)]
    raw = msg("To: " + ", ".join([*keep, "eve@example.net"]))
    out = reconcile_recipients(raw, [f"person{n}@contoso.com" for n in range(8)])
    (to,) = fields(out, "to")
    lines = to.split(CRLF)[:-1]
    assert len(lines) > 1
    assert all(len(line) <= 78 for line in lines)
    assert all(line.endswith(b",") for line in lines[:-1])
    assert b" ".join(line.strip() for line in lines) == b"To: " + ", ".join(keep).encode()


def test_item_longer_than_a_line_is_never_split() -> None:
    """An item that alone exceeds 78 characters gets a line of its own, unbroken."""
    long_item = '"' + "Very Long Display Name " * 5 + '" <alice@contoso.com>'
    raw = msg(f"To: eve@example.net, bob@contoso.com, {long_item}")
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com"])
    assert fields(out, "to") == [f"To: bob@contoso.com,\r\n {long_item}\r\n".encode()]


@pytest.mark.parametrize(
    ("header", "envelope"),
    [
        ("Alice@Contoso.COM", "alice@contoso.com"),
        ("alice@contoso.com", "ALICE@CONTOSO.COM"),
        ('"alice"@contoso.com', "alice@contoso.com"),
        ("jörg@contoso.com", "jörg@CONTOSO.com"),
    ],
)
def test_addresses_match_case_insensitively(header: str, envelope: str) -> None:
    """ASCII letters compare without case; the header keeps its own spelling."""
    raw = msg(f"To: {header}")
    assert reconcile_recipients(raw, [envelope]) == raw


@pytest.mark.parametrize(
    ("header", "envelope"),
    [
        ("x@straße.de", "x@strasse.de"),
        ("jörg@contoso.com", "JÖRG@contoso.com"),
        ("\u017fcanner@contoso.com", "scanner@contoso.com"),  # LATIN SMALL LETTER LONG S
        ("\u212aim@contoso.com", "kim@contoso.com"),  # KELVIN SIGN
    ],
)
def test_unicode_case_variants_are_other_recipients(header: str, envelope: str) -> None:
    """Exchange folds ASCII case only: a header address that only Unicode folding makes equal
    to the envelope one is another mailbox, removed, and the envelope one goes to Bcc."""
    out = reconcile_recipients(msg(f"To: {header}"), [envelope])
    assert fields(out, "to") == []
    assert fields(out, "bcc") == [f"Bcc: {envelope}\r\n".encode()]


def test_duplicate_envelope_recipients_count_once() -> None:
    """RCPT TO the same mailbox twice (in any case) adds it to Bcc once."""
    raw = msg("To: alice@contoso.com")
    out = reconcile_recipients(raw, ["bob@contoso.com", "BOB@contoso.com", "alice@contoso.com"])
    assert fields(out, "bcc") == [b"Bcc: bob@contoso.com\r\n"]


def test_repeated_header_mention_keeps_only_the_first() -> None:
    """Each envelope recipient is named exactly once, so Graph sees each recipient once."""
    raw = msg("To: alice@contoso.com", "Cc: Alice <ALICE@contoso.com>, bob@contoso.com")
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com"])
    assert fields(out, "to") == [b"To: alice@contoso.com\r\n"]
    assert fields(out, "cc") == [b"Cc: bob@contoso.com\r\n"]


@pytest.mark.parametrize("name", ["TO", "to", "cc", "CC", "bCC"])
def test_recipient_field_names_match_in_any_case(name: str) -> None:
    """`TO:` and `cc:` are recipient fields too; a rewrite keeps the name as written."""
    raw = msg(f"{name}: alice@contoso.com, eve@example.net")
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert out.startswith(f"{name}: alice@contoso.com\r\n\r\n".encode())


def test_semicolon_separated_list_is_rewritten_with_commas() -> None:
    """`a; b` (a common script mistake) is read as two items and re-emitted as RFC 5322 wants."""
    raw = msg("To: alice@contoso.com; bob@contoso.com")
    out = reconcile_recipients(raw, ["alice@contoso.com", "bob@contoso.com"])
    assert fields(out, "to") == [b"To: alice@contoso.com, bob@contoso.com\r\n"]


@pytest.mark.parametrize(
    "junk", ["Undisclosed Recipients", "<>", "root@", "John Smith alice@contoso.com"]
)
def test_item_that_is_not_an_address_is_removed(junk: str) -> None:
    """Text Graph might misread as a recipient is dropped; the envelope goes through Bcc."""
    raw = msg(f"To: {junk}")
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert fields(out, "to") == []
    assert fields(out, "bcc") == [b"Bcc: alice@contoso.com\r\n"]


def test_unquoted_comma_in_a_display_name_splits_it_into_two_items() -> None:
    """`Doe, John <j@...>` is two items by RFC 5322; the stray "Doe" names nobody and goes."""
    raw = msg("To: Doe, John <alice@contoso.com>")
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert fields(out, "to") == [b"To: John <alice@contoso.com>\r\n"]


@pytest.mark.parametrize("to", ["To:", "To: ", "To: (nobody)"])
def test_to_without_addresses_stays_and_recipients_go_to_bcc(to: str) -> None:
    """An empty To written by the client is left alone; it names nobody."""
    raw = msg(to, "Subject: x")
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert fields(out, "to") == [to.encode() + CRLF]
    assert header_addresses(out) == ["alice@contoso.com"]


def test_message_without_any_recipient_field_gets_bcc() -> None:
    """No To at all (cron, devices): every envelope recipient is delivered through Bcc."""
    out = reconcile_recipients(msg("Subject: x"), ["alice@contoso.com"])
    assert out == msg("Subject: x", "Bcc: alice@contoso.com")


def test_smtputf8_address_in_header_matches_envelope() -> None:
    """An 8-bit (UTF-8) addr-spec compares equal to the same address from RCPT TO."""
    raw = msg("To: Jörg <jörg@bücher.example>, eve@example.net")
    out = reconcile_recipients(raw, ["jörg@bücher.example"])
    assert fields(out, "to") == ["To: Jörg <jörg@bücher.example>\r\n".encode()]


def test_smtputf8_envelope_recipient_is_added_to_bcc_as_utf8() -> None:
    """RFC 6532: an internationalised address goes into the header as raw UTF-8."""
    out = reconcile_recipients(msg("Subject: x"), ["jörg@bücher.example"])
    assert fields(out, "bcc") == ["Bcc: jörg@bücher.example\r\n".encode()]


@pytest.mark.parametrize(
    "value",
    [
        '"unterminated <alice@contoso.com>',
        "Alice <alice@contoso.com",
        "Alice (unterminated comment <alice@contoso.com>",
        "alice@contoso.com>",
        "<alice@contoso.com> <bob@contoso.com>",
        "g1: g2: alice@contoso.com;;",
    ],
)
def test_recipient_field_that_cannot_be_tokenized_is_refused(value: str) -> None:
    """Faithful delivery is impossible when the items cannot be told apart: 554 5.6.0."""
    with pytest.raises(UnparseableMessageError) as caught:
        reconcile_recipients(msg(f"To: {value}"), ["alice@contoso.com"])
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, RelayError)
    assert (caught.value.reply.code, caught.value.reply.status) == (554, "5.6.0")


# --- fidelity -------------------------------------------------------------------------------------

MULTIPART_BODY = CRLF.join(
    [
        b"This is a multi-part message in MIME format.",
        b"--BOUNDARY",
        b"Content-Type: text/plain; charset=iso-8859-1",
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        b"Gr=FC=DFe aus dem Scanner, this line is soft=",
        b" broken across lines=",
        b"and continues =3D here.",
        b"--BOUNDARY",
        b'Content-Type: application/pdf; name="scan.pdf"',
        b"Content-Transfer-Encoding: base64",
        b'Content-Disposition: attachment; filename="scan.pdf"',
        b"",
        b"JVBERi0xLjQKJcTl8uXrp/Og0MTGCjQgMCBvYmoKPDwvTGVuZ3RoIDUgMCBSL0ZpbHRlci9GbGF0ZURl",
        b"Y29kZT4+CnN0cmVhbQp4nCvkMlAwUDC1NNUzMlGwMDHUszRSKErlCtfiyuMCAFLDBTgKZW5kc3RyZWFt",
        b"--BOUNDARY",
        b"Content-Type: text/plain; charset=utf-8",
        b"",
        b"x" * 5000,
        b"bare\nLF\nlines from a legacy device\n\nand an empty one",
        b"--BOUNDARY",
        b"Content-Type: message/rfc822",
        b"",
        b"From: inner@example.net",
        b"To: inner-to@example.net",
        b"Bcc: inner-bcc@example.net",
        b"Subject: the forwarded message",
        b"",
        b"inner body",
        b"--BOUNDARY--",
        b"",
    ]
)
MULTIPART = msg(
    "From: Scanner <scanner@contoso.com>",
    "To: Alice <alice@contoso.com>, eve@example.net",
    "Subject: Scan",
    "MIME-Version: 1.0",
    'Content-Type: multipart/mixed; boundary="BOUNDARY"',
    body=MULTIPART_BODY,
)


def test_body_is_passed_through_byte_for_byte() -> None:
    """QP soft breaks, base64, a 5000-character line and bare LF lines arrive unchanged."""
    prepared = prepare(MULTIPART, "alice@contoso.com", "bob@contoso.com")
    assert prepared.mime.endswith(CRLF + CRLF + MULTIPART_BODY)
    assert body(prepared.mime) == MULTIPART_BODY


def test_headers_of_a_nested_message_are_not_touched() -> None:
    """Only the top-level header block is reconciled; a forwarded message/rfc822 part is body."""
    prepared = prepare(MULTIPART, "alice@contoso.com")
    assert b"To: inner-to@example.net\r\nBcc: inner-bcc@example.net\r\n" in prepared.mime
    assert prepared.header_recipients == ("alice@contoso.com",)


@pytest.mark.parametrize(
    "field",
    [
        "Subject: Grüße aus Köln".encode("iso-8859-1"),
        "Subject: スキャン完了のお知らせ".encode("shift_jis"),
        "Subject: Отчёт о сканировании".encode("koi8-r"),  # noqa: RUF001 - Cyrillic on purpose
        "X-Device: Büro-Drucker ÄÖÜ".encode("iso-8859-1"),
        "From: Jörg Müller <scanner@contoso.com>".encode("iso-8859-1"),
    ],
)
def test_eight_bit_bytes_in_other_fields_are_preserved(field: bytes) -> None:
    """Raw 8-bit header bytes in any charset pass through untouched, even next to a rewrite."""
    raw = msg(field, b"To: alice@contoso.com, eve@example.net", b"X-Tail: " + field[-10:])
    prepared = prepare(raw, "alice@contoso.com")
    assert field + CRLF + b"To: alice@contoso.com\r\nX-Tail: " + field[-10:] + CRLF in prepared.mime


def test_very_long_header_line_is_preserved() -> None:
    """A 2000-character header line (legacy devices) is not refolded."""
    long_field = b"X-Job: " + b"A" * 2000
    prepared = prepare(msg(long_field, "To: alice@contoso.com"), "alice@contoso.com")
    assert long_field + CRLF in prepared.mime


def test_bare_lf_message_gets_bare_lf_in_new_and_rewritten_lines() -> None:
    """A device that ends lines with LF alone gets LF in every line the relay writes."""
    raw = msg("To: alice@contoso.com, eve@example.net", "Subject: x", eol=b"\n", body=b"a\nb\n")
    prepared = prepare(raw, "alice@contoso.com", "bob@contoso.com")
    assert b"\r" not in prepared.mime
    assert prepared.mime.startswith(b"Received: from SCANNER01 (scanner.lan [10.0.5.7])\n\tby ")
    assert prepared.mime.endswith(
        b"To: alice@contoso.com\nSubject: x\nBcc: bob@contoso.com\nDate: "
        + NOW_TEXT.encode()
        + b"\nMessage-ID: <m1.Q1A2B3@relay.contoso.com>\n\na\nb\n"
    )


def test_message_without_body_is_all_header() -> None:
    """No empty line: everything is header; new fields are appended and no body is invented."""
    raw = b"Subject: ping\r\nTo: alice@contoso.com"
    prepared = prepare(raw, "alice@contoso.com", "bob@contoso.com")
    assert prepared.mime.endswith(
        b"Subject: ping\r\nTo: alice@contoso.com\r\nBcc: bob@contoso.com\r\nDate: "
        + NOW_TEXT.encode()
        + b"\r\nMessage-ID: <m1.Q1A2B3@relay.contoso.com>\r\n"
    )


def test_header_block_ending_in_a_bare_empty_line_keeps_it() -> None:
    """A message whose last line is the empty line keeps an empty body."""
    raw = b"Subject: ping\r\nTo: alice@contoso.com\r\n\r\n"
    assert reconcile_recipients(raw, ["alice@contoso.com"]) == raw


def test_body_starting_without_empty_line_gets_one() -> None:
    """A line that is no header field ends the header block; the missing empty line is added."""
    raw = b"Subject: report\r\nTo: alice@contoso.com\r\nDisk usage 93%\r\n"
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert out == b"Subject: report\r\nTo: alice@contoso.com\r\n\r\nDisk usage 93%\r\n"


def test_leading_mbox_from_line_is_dropped() -> None:
    """A Unix mbox `From ` separator some tools prepend is framing, not a header field."""
    raw = b"From scanner@contoso.com Tue Mar  5 14:30:07 2024\r\nTo: alice@contoso.com\r\n\r\nx"
    out = reconcile_recipients(raw, ["alice@contoso.com"])
    assert out == b"To: alice@contoso.com\r\n\r\nx"


# --- trace, Date and Message-ID -------------------------------------------------------------------


def received(prepared: PreparedMessage) -> bytes:
    (field,) = fields(prepared.mime, "received")
    assert prepared.mime.startswith(field)
    return field


def test_received_names_the_single_recipient() -> None:
    """With one envelope recipient the trace field has RFC 5321's `for` clause."""
    prepared = prepare(msg("To: alice@contoso.com"), "alice@contoso.com", "ALICE@contoso.com")
    assert received(prepared) == (
        b"Received: from SCANNER01 (scanner.lan [10.0.5.7])\r\n"
        b"\tby relay.contoso.com (smtp-graph-relay) with ESMTP id Q1A2B3\r\n"
        b"\tfor <alice@contoso.com>; " + NOW_TEXT.encode() + CRLF
    )


def test_received_omits_recipients_when_there_are_several() -> None:
    """Naming one of several recipients would disclose Bcc recipients to the others."""
    prepared = prepare(msg("To: alice@contoso.com"), "alice@contoso.com", "bob@contoso.com")
    assert received(prepared) == (
        b"Received: from SCANNER01 (scanner.lan [10.0.5.7])\r\n"
        b"\tby relay.contoso.com (smtp-graph-relay) with ESMTP id Q1A2B3;\r\n"
        b"\t" + NOW_TEXT.encode() + CRLF
    )


@pytest.mark.parametrize(
    ("tls", "authenticated", "protocol"),
    [
        (False, False, "ESMTP"),
        (True, False, "ESMTPS"),
        (False, True, "ESMTPA"),
        (True, True, "ESMTPSA"),
    ],
)
def test_received_records_the_rfc_3848_protocol(
    tls: bool, authenticated: bool, protocol: str
) -> None:
    """`with ESMTP[S][A]` says whether the session used TLS and AUTH."""
    assert trace_protocol(tls=tls, authenticated=authenticated) == protocol
    prepared = prepare(msg("To: alice@contoso.com"), "alice@contoso.com", protocol=protocol)
    assert f" with {protocol} id Q1A2B3".encode() in received(prepared)


def test_plain_smtp_and_smtputf8_protocols() -> None:
    """HELO sessions are `SMTP`; SMTPUTF8 sessions are `UTF8SMTP*` (RFC 6531)."""
    assert trace_protocol(tls=True, authenticated=True, esmtp=False) == "SMTP"
    assert trace_protocol(tls=True, authenticated=False, utf8=True) == "UTF8SMTPS"


@pytest.mark.parametrize(
    ("helo", "hostname", "expected"),
    [
        (
            "evil\r\nBcc: everyone@contoso.com",
            None,
            b"from evilBcc:?everyone@contoso.com (unknown ",
        ),
        ("a\nb\rc\x00d\x7f", "host\r\nX: y", b"from abcd (hostX:?y "),
        ("fake (localhost [127.0.0.1]);", None, b"from fake??localhost?[127.0.0.1]?? (unknown "),
        (None, None, b"from unknown (unknown "),
        ("", "", b"from unknown (unknown "),
        ("[IPv6:2001:db8::1]", "d\u00fcsseldorf.example", b"from [IPv6:2001:db8::1] (d?sseldorf"),
        ("h" * 1000, None, b"from " + b"h" * 255 + b" (unknown "),
    ],
)
def test_received_sanitises_names_from_the_network(
    helo: str | None, hostname: str | None, expected: bytes
) -> None:
    """HELO and reverse DNS cannot inject lines, comments or a `;`, and are length-limited."""
    prepared = prepare(
        msg("To: alice@contoso.com"), "alice@contoso.com", helo=helo, client_hostname=hostname
    )
    field = received(prepared)
    assert field.startswith(b"Received: " + expected)
    assert field.count(b"\n") == 3
    assert field.count(b";") == 1


@pytest.mark.parametrize("date", ["Date: Mon, 4 Mar 2024 09:00:00 +0000", "DATE: whenever"])
def test_existing_date_is_kept(date: str) -> None:
    """A client's Date (any case, any quality) is the client's business."""
    prepared = prepare(msg(date, "To: alice@contoso.com"), "alice@contoso.com")
    assert fields(prepared.mime, "date") == [date.encode() + CRLF]
    assert "Date" not in prepared.added_headers


def test_missing_date_is_added_from_the_injected_clock() -> None:
    """Devices without a clock or without Date get the relay's time, RFC 5322 §3.3 format."""
    prepared = prepare(msg("To: alice@contoso.com"), "alice@contoso.com")
    assert fields(prepared.mime, "date") == [f"Date: {NOW_TEXT}\r\n".encode()]
    assert prepared.added_headers == ("Received", "Date", "Message-ID")


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("Message-ID: <abc@device.lan>", "<abc@device.lan>"),
        ("message-id: <abc@device.lan>", "<abc@device.lan>"),
        ("MESSAGE-ID:\r\n <abc@device.lan> (comment)", "<abc@device.lan>"),
        ("Message-Id: abc@device.lan", "<abc@device.lan>"),
    ],
)
def test_existing_message_id_is_kept_and_reported(field: str, expected: str) -> None:
    """A Message-ID in any case is kept; the reported id always has angle brackets."""
    prepared = prepare(msg(field, "To: alice@contoso.com"), "alice@contoso.com")
    assert fields(prepared.mime, "message-id") == [field.encode() + CRLF]
    assert prepared.message_id == expected
    assert "Message-ID" not in prepared.added_headers


def test_missing_message_id_is_added_from_the_injected_local_part() -> None:
    """`<{message_id_local}@{relay_hostname}>`, appended at the end of the header block."""
    prepared = prepare(msg("To: alice@contoso.com", "Subject: x"), "alice@contoso.com")
    assert prepared.message_id == "<m1.Q1A2B3@relay.contoso.com>"
    assert prepared.mime.endswith(b"Message-ID: <m1.Q1A2B3@relay.contoso.com>\r\n\r\nHello.\r\n")


@pytest.mark.parametrize("name", ["Date", "Message-ID"])
def test_empty_date_or_message_id_is_replaced(name: str) -> None:
    """An empty field is as good as none, and two would make the message invalid."""
    prepared = prepare(msg(f"{name}:  ", "To: alice@contoso.com"), "alice@contoso.com")
    (field,) = fields(prepared.mime, name)
    assert field.strip() != f"{name}:".encode()
    assert name in prepared.added_headers


def test_added_fields_are_listed_in_order() -> None:
    """`added_headers` lets the log say what the relay wrote into the message."""
    prepared = prepare(msg("Subject: x"), "alice@contoso.com")
    assert prepared.added_headers == ("Received", "Bcc", "Date", "Message-ID")
    assert prepared.header_recipients == ("alice@contoso.com",)


def test_header_recipients_are_what_graph_will_deliver_to() -> None:
    """After preparation the To/Cc/Bcc addresses are exactly the envelope, lowercased."""
    raw = msg("To: Alice <ALICE@contoso.com>, eve@example.net", "Cc: bob@contoso.com")
    prepared = prepare(raw, "alice@contoso.com", "carol@contoso.com", "bob@contoso.com")
    assert prepared.header_recipients == (
        "alice@contoso.com",
        "bob@contoso.com",
        "carol@contoso.com",
    )
    assert header_addresses(prepared.mime) == sorted(prepared.header_recipients)


# --- subject, authors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"Subject: Scan from printer", "Scan from printer"),
        (b"Subject: =?iso-8859-1?Q?Gr=FC=DFe?= =?utf-8?B?IGF1cw==?= Berlin", "Grüße aus Berlin"),
        (b"Subject: Gr\xc3\xbc\xc3\x9fe", "Grüße"),
        (b"Subject: Gr\xfc\xdfe", "Grüße"),
        (b"Subject: folded\r\n\tover two lines", "folded over two lines"),
        (b"Subject: bell\x07 and =?utf-8?Q?tab=09?=x", "bell and tab x"),
        (b"Subject: =?x-unknown?Q?kept?=", "=?x-unknown?Q?kept?="),
        (b"Subject: " + b"y" * 300, "y" * 200),
        (b"X-Other: no subject at all", ""),
    ],
)
def test_subject_is_decoded_for_logs(field: bytes, expected: str) -> None:
    """Encoded words decoded, control characters removed, at most 200 characters."""
    prepared = prepare(msg(field, b"To: alice@contoso.com"), "alice@contoso.com")
    assert prepared.subject == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["From: Scanner <Scanner@Contoso.com>"], ("scanner@contoso.com",)),
        (["From: a@contoso.com", "Sender: b@contoso.com"], ("a@contoso.com", "b@contoso.com")),
        (['From: a@contoso.com, "Doe, B" <b@contoso.com>'], ("a@contoso.com", "b@contoso.com")),
        (["From: =?utf-8?Q?J=C3=B6rg?= <jorg@contoso.com>"], ("jorg@contoso.com",)),
        (['From: "ceo@contoso.com" <eve@example.net>'], ("eve@example.net",)),
        (["FROM: a@contoso.com", "sender: a@contoso.com"], ("a@contoso.com",)),
        (["To: a@contoso.com", "Subject: no author"], ()),
        (["Reply-To: a@contoso.com"], ()),
    ],
)
def test_author_addresses_are_from_and_sender(lines: list[str], expected: tuple[str, ...]) -> None:
    """The sender policy checks every From and Sender address, never a display name."""
    assert author_addresses(msg(*lines)) == expected


def author_addresses(raw: bytes) -> tuple[str, ...]:
    return read_authors(split_header_from_body(raw).fields).addresses


def test_author_addresses_ignore_a_nested_message() -> None:
    """A forwarded message's From is body, not the author."""
    assert author_addresses(MULTIPART) == ("scanner@contoso.com",)


def test_unparseable_from_is_refused_not_guessed() -> None:
    """The sender check must not pass on a From it cannot read."""
    with pytest.raises(UnreadableAuthorError, match="From header"):
        author_addresses(msg('From: "unterminated <ceo@contoso.com>'))


# --- the tokenizer --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@b.example", [AddressItem("a@b.example", ("a@b.example",))]),
        (
            '"Doe, J" <j@x.example>, k@x.example',
            [
                AddressItem('"Doe, J" <j@x.example>', ("j@x.example",)),
                AddressItem("k@x.example", ("k@x.example",)),
            ],
        ),
        ("(only a comment), ,", []),
        ("<>", [AddressItem("<>", (), strict=False)]),
        ("root", [AddressItem("root", ("root",))]),
        ("john.@docomo.ne.jp", [AddressItem("john.@docomo.ne.jp", ("john.@docomo.ne.jp",))]),
        ("u@[192.0.2.1]", [AddressItem("u@[192.0.2.1]", ("u@[192.0.2.1]",))]),
        ("a . b @ c . d", [AddressItem("a . b @ c . d", ("a.b@c.d",))]),
        (
            "undisclosed-recipients:;",
            [AddressItem("undisclosed-recipients:;", (), "undisclosed-recipients")],
        ),
        (
            "G: a@x, (c) <b@y> ; ",
            [
                AddressItem(
                    "G: a@x, (c) <b@y> ;",
                    ("a@x", "b@y"),
                    "G",
                    (AddressItem("a@x", ("a@x",)), AddressItem("(c) <b@y>", ("b@y",))),
                )
            ],
        ),
        ("G: a@x", [AddressItem("G: a@x", ("a@x",), "G", (AddressItem("a@x", ("a@x",)),))]),
    ],
)
def test_parse_address_list_items(value: str, expected: list[AddressItem]) -> None:
    """Items keep their exact text; groups list their members; non-addresses have none."""
    assert parse_address_list(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        'Alice <alice@x.example>, "Bob, Jr." <bob@x.example>',
        '"bob@evil.example" <bob@x.example> (Bob), carol@x.example',
        "team: a@x.example, b@x.example;, c@x.example",
        "=?utf-8?Q?J=C3=B6rg?= <j@x.example>",
        "a@x.example (comment (nested) here)",
        '"quoted\\"escape" <q@x.example>',
    ],
)
def test_parse_address_list_agrees_with_the_stdlib_on_well_formed_lists(value: str) -> None:
    """On inputs `email.utils.getaddresses` handles, both find the same addresses."""
    ours = [a for item in parse_address_list(value) for a in item.addresses]
    assert ours == [a for _, a in getaddresses([value]) if a]


# --- value validation -----------------------------------------------------------------------------


def test_trace_info_needs_an_aware_time() -> None:
    """A naive datetime cannot give the RFC 5322 zone offset."""
    with pytest.raises(ValueError, match="aware"):
        trace(now=datetime(2024, 3, 5, 14, 30))


@pytest.mark.parametrize("protocol", ["", "ESMTP\r\nBcc: x@example.net", "ESMTP SA", "-SMTP"])
def test_trace_info_protocol_must_be_an_atom(protocol: str) -> None:
    """`with` takes one RFC 5321 Attdash-atom; anything else could forge the trace field."""
    with pytest.raises(ValueError, match="protocol"):
        trace(protocol=protocol)


def test_unregistered_protocol_atom_is_written_as_given() -> None:
    """HELO over implicit TLS has no RFC 3848 name; `SMTPS` is recorded rather than refused."""
    prepared = prepare(msg("To: alice@contoso.com"), "alice@contoso.com", protocol="SMTPS")
    assert b" with SMTPS id Q1A2B3" in received(prepared)


def test_envelope_rejects_line_breaks() -> None:
    """An address with CR/LF would be header injection into Bcc."""
    with pytest.raises(ValueError, match="line break"):
        Envelope("a@contoso.com", ("b@contoso.com\r\nX-Evil: 1",))


@pytest.mark.parametrize("local", ["", "has space", "a@b", ".dot", "x\r\ny"])
def test_message_id_local_part_must_be_dot_atom(local: str) -> None:
    """The caller's id must make a valid msg-id."""
    with pytest.raises(ValueError, match="dot-atom"):
        prepare_for_graph(
            split_header_from_body(msg("To: a@contoso.com")),
            Envelope("", ("a@contoso.com",)),
            trace(),
            message_id_local=local,
        )


def test_prepare_needs_a_recipient() -> None:
    """Graph cannot send a message to nobody; the SMTP layer never gets here without RCPT."""
    with pytest.raises(ValueError, match="recipient"):
        prepare_for_graph(
            split_header_from_body(msg("To: a@contoso.com")),
            Envelope("", ()),
            trace(),
            message_id_local="x",
        )


def test_decode_header_text_tolerates_broken_encoded_words() -> None:
    """Bad base64 or charsets stay as written instead of failing the log line."""
    assert decode_header_text(b"=?utf-8?B?!!!?= ok") == "=?utf-8?B?!!!?= ok"


# --- one reading of recipient and author fields (issue #11 item 1) -------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (
            "CC: eve@example.com <frank@example.com>",
            b'CC: "eve@example.com" <frank@example.com>\r\n',
        ),
        ("To: [lab] <frank@example.com>", b'To: "[lab]" <frank@example.com>\r\n'),
        (
            'To: a@b "Frank" <frank@example.com>',
            b'To: "a@b Frank" <frank@example.com>\r\n',
        ),
    ],
)
def test_a_recipient_read_differently_by_a_strict_parser_is_rewritten_canonically(
    field: str, expected: bytes
) -> None:
    """Where a lenient reader could find eve and the strict reading finds frank, the field is
    re-written so that every reader finds frank, the one envelope recipient."""
    out = reconcile_recipients(msg(field), ["frank@example.com"])
    assert fields(out, field.split(":")[0]) == [expected]
    assert fields(out, "bcc") == []


@pytest.mark.parametrize(
    "item", ["<frank@example.com> eve@example.com", "Frank <frank@example.com eve@example.com>"]
)
def test_a_recipient_without_a_strict_reading_is_removed_and_the_envelope_goes_to_bcc(
    item: str,
) -> None:
    """Text in which a reader could find another recipient is not passed on; Graph gets the
    envelope recipient in Bcc instead."""
    out = reconcile_recipients(msg(f"To: {item}"), ["frank@example.com"])
    assert fields(out, "to") == []
    assert fields(out, "bcc") == [b"Bcc: frank@example.com\r\n"]


def test_an_author_with_an_at_in_its_display_name_is_written_canonically() -> None:
    """The policy checked the strict reading (scanner@); Graph must not find ceo@ instead."""
    prepared = prepare(
        msg("From: ceo@contoso.com <scanner@contoso.com>", "To: alice@contoso.com"),
        "alice@contoso.com",
    )
    assert fields(prepared.mime, "from") == [b'From: "ceo@contoso.com" <scanner@contoso.com>\r\n']


def test_an_author_in_canonical_form_is_left_byte_for_byte() -> None:
    """A From with one reading in every parser is not touched."""
    line = 'From: "Scanner, Floor 2" <scanner@contoso.com> (device 7)'
    prepared = prepare(msg(line, "To: alice@contoso.com"), "alice@contoso.com")
    assert fields(prepared.mime, "from") == [line.encode() + b"\r\n"]


def test_the_one_rfc_2047_decoder_keeps_or_replaces_an_undecodable_word() -> None:
    """Strict (the JSON form's subject and names): the word stays as written (RFC 2047 §6.3);
    errors="replace" (the log's subject): it becomes U+FFFD. Adjacent words are joined."""
    assert decode_words("=?utf-8?B?/w==?=") == "=?utf-8?B?/w==?="
    assert decode_words("=?utf-8?B?/w==?=", errors="replace") == "\ufffd"
    assert decode_words("=?utf-8?Q?a?=\r\n =?utf-8?Q?b?= c") == "ab c"
