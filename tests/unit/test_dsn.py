"""Bounces as a specification: the RFC 3464 DSN the relay sends, and the mail it never bounces.

DSNs are judged by the standard library's parser (`email`, policy=default), which reads
message/delivery-status into one sub-message per field group, as a receiving client would.
"""

from __future__ import annotations

import dataclasses
import email
import quopri
import re
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage, Message
from email.policy import default

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.core.message.dsn import MAX_QUOTED_HEADER
from relay.core.message.prepare import BounceRequest, FailedRecipient, build_dsn, is_bounce

NOW = datetime(2024, 3, 5, 14, 30, 7, tzinfo=timezone(timedelta(hours=1)))
ARRIVAL = NOW - timedelta(days=5)
CRLF = b"\r\n"

ORIGINAL_HEADERS = (
    b"Received: from SCANNER01 (scanner.lan [10.0.5.7])\r\n"
    b"\tby relay.contoso.com (smtp-graph-relay) with ESMTP id Q1A2B3;\r\n"
    b"\tTue, 29 Feb 2024 14:30:07 +0100\r\n"
    b"From: Scanner <scanner@contoso.com>\r\n"
    b"To: bob@contoso.com\r\n"
    b"Subject: =?utf-8?q?Scan_f=C3=BCr_Bob?=\r\n"
    b"Message-ID: <scan-1@scanner.lan>\r\n"
    b"X-Odd:   trailing spaces  \r\n"
)
BODY = b"CONFIDENTIAL SCAN BODY\r\n"
ORIGINAL = ORIGINAL_HEADERS + CRLF + BODY

INVALID_USER = FailedRecipient(
    "bob@contoso.com",
    "5.1.1",
    "X-Graph; ErrorInvalidUser The requested user 'bob@contoso.com' is invalid."
    " (request-id 4f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f)",
)
REASON = (
    "Microsoft 365 refused the message: the mailbox does not exist (ErrorInvalidUser)."
    " Check the recipient address."
)

TOP_LEVEL_FIELDS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
]
PER_MESSAGE_FIELDS = ["Reporting-MTA", "X-Queue-ID", "Arrival-Date"]
PER_RECIPIENT_FIELDS = [
    "Final-Recipient",
    "Action",
    "Status",
    "Diagnostic-Code",
    "Last-Attempt-Date",
]


def request(**changes: object) -> BounceRequest:
    values: dict[str, object] = {
        "original": ORIGINAL,
        "envelope_from": "scanner@contoso.com",
        "recipients": (INVALID_USER,),
        "reporting_mta": "relay.contoso.com",
        "queue_id": "Q1A2B3",
        "arrival": ARRIVAL,
        "now": NOW,
        "from_address": "relay@contoso.com",
        "message_id_local": "dsn.Q1A2B3",
        "reason_text": REASON,
    }
    values.update(changes)
    return BounceRequest(**values)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=default)
    assert isinstance(message, EmailMessage)
    return message


def parts(raw: bytes) -> tuple[EmailMessage, EmailMessage, EmailMessage]:
    human, report, headers = parse(raw).iter_parts()
    assert isinstance(human, EmailMessage)
    assert isinstance(report, EmailMessage)
    assert isinstance(headers, EmailMessage)
    return human, report, headers


def status_groups(raw: bytes) -> list[Message]:
    """The field groups of the message/delivery-status part: per-message first."""
    groups = parts(raw)[1].get_payload()
    assert isinstance(groups, list)
    assert all(isinstance(group, Message) for group in groups)
    return [group for group in groups if isinstance(group, Message)]


def returned_headers(raw: bytes) -> bytes:
    payload = parts(raw)[2].get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def boundary_of(raw: bytes) -> str:
    boundary = parse(raw).get_boundary()
    assert boundary is not None
    return boundary


# --- structure ------------------------------------------------------------------------------------


def test_dsn_is_a_multipart_report_of_type_delivery_status() -> None:
    """RFC 3464 §2 / RFC 6522: the report-type parameter is what mail software keys on."""
    message = parse(build_dsn(request()))
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert all(not part.defects for part in message.walk())


def test_dsn_has_explanation_report_and_returned_headers_in_that_order() -> None:
    """RFC 6522: human part first, machine-readable second, the returned content third."""
    human, report, headers = parts(build_dsn(request()))
    assert human.get_content_type() == "text/plain"
    assert human.get_content_charset() == "utf-8"
    assert report.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"


def test_dsn_top_level_fields_are_exactly_the_rfc_3464_set() -> None:
    """Nothing more is added: no Received, no X- fields that could leak relay internals."""
    assert parse(build_dsn(request())).keys() == TOP_LEVEL_FIELDS


def test_dsn_goes_to_the_envelope_sender_from_the_delivery_system_mailbox() -> None:
    """The envelope sender, not the From of the original, is who asked to hear about failures."""
    message = parse(build_dsn(request()))
    assert [a.addr_spec for a in message["To"].addresses] == ["scanner@contoso.com"]
    (sender,) = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Mail Delivery System", "relay@contoso.com")


def test_dsn_is_marked_auto_replied_per_rfc_3834() -> None:
    """RFC 3834 §5: responders and vacation scripts must not answer the bounce."""
    assert parse(build_dsn(request()))["Auto-Submitted"] == "auto-replied"


def test_dsn_identity_and_dates_come_from_the_request() -> None:
    """Pure: the clock and the ids are the caller's."""
    message = parse(build_dsn(request()))
    assert message["Message-ID"] == "<dsn.Q1A2B3@relay.contoso.com>"
    assert message["Date"] == "Tue, 05 Mar 2024 14:30:07 +0100"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["MIME-Version"] == "1.0"


def test_dsn_uses_crlf_line_endings_only() -> None:
    """RFC 5322 §2.1: no bare CR or LF anywhere, whatever the original used."""
    raw = build_dsn(request())
    assert raw.endswith(CRLF)
    assert b"\n" not in raw.replace(CRLF, b"")
    assert b"\r" not in raw.replace(CRLF, b"")


def test_dsn_is_7bit_even_for_8bit_headers_and_non_ascii_text() -> None:
    """With ASCII addresses, every byte of the DSN is ASCII and every line fits RFC 5322."""
    raw = build_dsn(
        request(
            original=b"Subject: Gr\xfc\xdfe\r\nFrom: J\xc3\xb6rg <j@contoso.com>\r\n\r\nbody\r\n",
            reason_text="Le destinataire n'existe pas : vérifiez l'adresse. 受信者が存在しません。",
            recipients=(FailedRecipient("bob@contoso.com", "5.1.1", "X-Graph; Empfänger fehlt"),),
        )
    )
    assert raw.isascii()
    assert all(len(line) <= 998 for line in raw.split(CRLF))


# --- the delivery report --------------------------------------------------------------------------


def test_report_per_message_fields_name_the_relay_queue_id_and_arrival() -> None:
    """RFC 3464 §2.2: Reporting-MTA is required; the queue id is an X- extension field."""
    per_message = status_groups(build_dsn(request()))[0]
    assert per_message.keys() == PER_MESSAGE_FIELDS
    assert per_message["Reporting-MTA"] == "dns; relay.contoso.com"
    assert per_message["X-Queue-ID"] == "Q1A2B3"
    assert per_message["Arrival-Date"] == "Thu, 29 Feb 2024 14:30:07 +0100"


def test_report_per_recipient_fields_say_what_failed_and_why() -> None:
    """RFC 3464 §2.3: each recipient gets its own field group after a blank line."""
    groups = status_groups(build_dsn(request()))
    assert len(groups) == 2
    recipient = groups[1]
    assert recipient.keys() == PER_RECIPIENT_FIELDS
    assert recipient["Final-Recipient"] == "rfc822; bob@contoso.com"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Diagnostic-Code"] == INVALID_USER.diagnostic
    assert recipient["Last-Attempt-Date"] == "Tue, 05 Mar 2024 14:30:07 +0100"


def test_report_has_one_field_group_per_failed_recipient_in_order() -> None:
    """A permanent refusal and an expiry can share one DSN."""
    expired = FailedRecipient("carol@partner.example", "4.4.7", "X-Relay; message expired")
    groups = status_groups(build_dsn(request(recipients=(INVALID_USER, expired))))
    assert [g["Final-Recipient"] for g in groups[1:]] == [
        "rfc822; bob@contoso.com",
        "rfc822; carol@partner.example",
    ]
    assert [g["Status"] for g in groups[1:]] == ["5.1.1", "4.4.7"]
    assert [g["Action"] for g in groups[1:]] == ["failed", "failed"]


def test_long_diagnostic_is_folded_and_no_line_passes_998_octets() -> None:
    """Graph error texts can be long; RFC 5322 §2.1.1 forbids lines over 998 octets."""
    words = " ".join(f"word{n}" for n in range(400))
    diagnostic = f"smtp; 550 5.1.1 {words} {'z' * 2000}"
    raw = build_dsn(request(recipients=(FailedRecipient("bob@contoso.com", "5.1.1", diagnostic),)))
    assert all(len(line) <= 998 for line in raw.split(CRLF))
    report = raw.split(b"Diagnostic-Code:", 1)[1].split(b"Last-Attempt-Date:", 1)[0]
    assert report.count(CRLF + b" ") > 5  # folded, not one long line
    unfolded = status_groups(raw)[1]["Diagnostic-Code"]
    assert unfolded.startswith("smtp; 550 5.1.1 word0 word1 word2")
    assert unfolded.endswith("...")
    assert len(unfolded) <= 998 + 2  # the kept text, plus at most one space per forced cut


def test_diagnostic_without_a_type_gets_one() -> None:
    """RFC 3464 §2.3.6 requires a diagnostic-type before the semicolon."""
    recipient = FailedRecipient("bob@contoso.com", "5.1.1", "mailbox not found")
    groups = status_groups(build_dsn(request(recipients=(recipient,))))
    assert groups[1]["Diagnostic-Code"] == "X-Relay; mailbox not found"


def test_empty_diagnostic_leaves_the_optional_field_out() -> None:
    """Diagnostic-Code is optional; an empty one would be invalid."""
    recipient = FailedRecipient("bob@contoso.com", "4.4.7", "")
    groups = status_groups(build_dsn(request(recipients=(recipient,))))
    assert "Diagnostic-Code" not in groups[1]


def test_non_ascii_recipient_is_reported_as_rfc_6533_utf8_xtext() -> None:
    """RFC 6533 §3: the 7-bit form keeps an SMTPUTF8 address recoverable ('+' escaped too)."""
    recipient = FailedRecipient("jörg+tag@contoso.com", "5.1.1", "smtp; 550 no")
    groups = status_groups(build_dsn(request(recipients=(recipient,))))
    assert groups[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}tag@contoso.com"


def test_non_ascii_diagnostic_is_escaped_in_the_report_and_plain_in_the_text() -> None:
    """The report is 7-bit; the person reading part 1 sees the real characters."""
    recipient = FailedRecipient("bob@contoso.com", "5.1.1", "X-Graph; Empfänger unbekannt")
    raw = build_dsn(request(recipients=(recipient,)))
    assert status_groups(raw)[1]["Diagnostic-Code"] == "X-Graph; Empf\\x{E4}nger unbekannt"
    assert "X-Graph; Empfänger unbekannt" in parts(raw)[0].get_content()


# --- the human-readable part ----------------------------------------------------------------------


def test_explanation_lists_recipients_reason_and_queue_id() -> None:
    """The queue id lets the sender's admin find the message in the relay's logs."""
    expired = FailedRecipient("carol@partner.example", "4.4.7", "X-Relay; message expired")
    text = parts(build_dsn(request(recipients=(INVALID_USER, expired))))[0].get_content()
    assert "<bob@contoso.com>" in text
    assert "<carol@partner.example>" in text
    assert "Queue ID: Q1A2B3" in text
    assert " ".join(REASON.split()) in " ".join(text.split())


def test_non_ascii_reason_is_utf8_in_quoted_printable() -> None:
    """Non-ASCII text is encoded, never sent as raw 8-bit bytes."""
    reason = "Le destinataire n'existe pas : vérifiez l'adresse. 受信者が存在しません。"
    raw = build_dsn(request(reason_text=reason))
    human = parts(raw)[0]
    assert human["Content-Transfer-Encoding"] == "quoted-printable"
    assert reason in " ".join(human.get_content().split())
    assert reason.encode() not in raw


def test_ascii_explanation_is_sent_as_7bit() -> None:
    """Plain ASCII needs no encoding and stays readable in the raw message."""
    assert parts(build_dsn(request()))[0]["Content-Transfer-Encoding"] == "7bit"


# --- the returned header block --------------------------------------------------------------------


def test_original_header_block_is_returned_byte_for_byte() -> None:
    """The sender's own header fields, exactly as the relay held them (RFC 6522)."""
    raw = build_dsn(request())
    assert returned_headers(raw) == ORIGINAL_HEADERS
    assert ORIGINAL_HEADERS in raw


def test_original_body_is_not_returned() -> None:
    """Privacy and size: the sender has the body already."""
    raw = build_dsn(request())
    assert b"CONFIDENTIAL" not in raw
    assert len(parse(raw).get_payload()) == 3


def test_bare_lf_header_block_is_returned_with_crlf_line_endings() -> None:
    """Line endings are canonicalised (RFC 2046 §4.1.1); the field text is not touched."""
    original = b"From: scanner@contoso.com\nSubject: scan\n folded\n\nbody\n"
    returned = returned_headers(build_dsn(request(original=original)))
    assert returned == b"From: scanner@contoso.com\r\nSubject: scan\r\n folded\r\n"


def test_8bit_header_block_is_returned_quoted_printable_and_decodes_to_the_same_bytes() -> None:
    """Broken or 8-bit headers are still returned, encoded as RFC 6522 allows."""
    headers = b"From: J\xc3\xb6rg <j@contoso.com>\r\nSubject: Gr\xfc\xdfe \x00 \r\x01\r\n"
    raw = build_dsn(request(original=headers + CRLF + b"body\r\n"))
    part = parts(raw)[2]
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert returned_headers(raw) == headers


def test_a_74_kb_header_is_quoted_only_up_to_8_kb_of_whole_fields() -> None:
    """Backscatter (issue #11 item 5): an attacker's 74 KB header made a 79 KB DSN. The DSN
    quotes whole fields up to MAX_QUOTED_HEADER and says that it is shortened."""
    padding = b"".join(b"X-Pad-%04d: " % n + b"p" * 60 + CRLF for n in range(1100))
    original = ORIGINAL_HEADERS + padding + CRLF + BODY
    assert len(original) > 74 * 1024
    raw = build_dsn(request(original=original))
    returned = returned_headers(raw)
    assert len(returned) <= MAX_QUOTED_HEADER
    assert returned.startswith(ORIGINAL_HEADERS)
    assert returned.endswith(CRLF)
    assert all(
        re.fullmatch(rb"X-Pad-\d{4}: p{60}", line)
        for line in returned[len(ORIGINAL_HEADERS) : -2].split(CRLF)
    )
    assert len(raw) < MAX_QUOTED_HEADER + 4 * 1024
    text = parts(raw)[0].get_content()
    assert "The first 8 KB of the header fields of your message" in " ".join(text.split())


def test_a_single_field_over_8_kb_is_cut_at_a_line() -> None:
    """A first field longer than the limit is quoted up to its last whole line that fits."""
    huge = b"Subject: start" + b"".join(CRLF + b" " + b"w" * 70 for _ in range(200)) + CRLF
    raw = build_dsn(request(original=huge + CRLF + BODY))
    returned = returned_headers(raw)
    assert 0 < len(returned) <= MAX_QUOTED_HEADER
    assert huge.startswith(returned)
    assert returned.endswith(CRLF)


def test_a_header_within_8_kb_is_quoted_whole_without_a_note() -> None:
    """The limit changes nothing for ordinary messages."""
    text = parts(build_dsn(request()))[0].get_content()
    assert "The header fields of your message are attached below" in " ".join(text.split())


def test_mbox_from_line_is_not_returned_as_a_header() -> None:
    """An mbox separator is framing, not a header field."""
    original = b"From scanner@contoso.com Tue Mar  5 14:30:07 2024\r\n" + ORIGINAL
    assert returned_headers(build_dsn(request(original=original))) == ORIGINAL_HEADERS


def test_message_without_header_fields_returns_an_empty_header_part() -> None:
    """A message that is all body still gets a well-formed DSN."""
    assert returned_headers(build_dsn(request(original=b"just a body\r\n"))) == b""


# --- boundary and determinism ---------------------------------------------------------------------


def test_boundary_occurs_only_as_the_delimiter() -> None:
    """RFC 2046 §5.1.1: the boundary must not occur in the encapsulated content."""
    raw = build_dsn(request())
    boundary = boundary_of(raw).encode()
    lines = raw.split(CRLF)
    assert [line for line in lines if boundary in line and not line.startswith(b"\t")] == [
        b"--" + boundary,
        b"--" + boundary,
        b"--" + boundary,
        b"--" + boundary + b"--",
    ]


def test_boundary_changes_when_the_content_contains_it() -> None:
    """A header block that contains the first candidate pushes the boundary to the next one."""
    first = boundary_of(build_dsn(request()))
    trap = ORIGINAL_HEADERS + f"X-Trap: --{first}--\r\n".encode() + CRLF + BODY
    raw = build_dsn(request(original=trap))
    second = boundary_of(raw)
    assert second != first
    assert returned_headers(raw) == trap.split(CRLF + CRLF)[0] + CRLF
    assert len(parse(raw).get_payload()) == 3


def test_same_request_gives_the_same_bytes() -> None:
    """Pure: a retried bounce is the same bounce."""
    assert build_dsn(request()) == build_dsn(request())


def test_boundary_is_derived_from_the_ids() -> None:
    """Different DSNs get different boundaries, within RFC 2046's 70 characters."""
    assert boundary_of(build_dsn(request())) != boundary_of(
        build_dsn(request(message_id_local="dsn.Q9"))
    )
    assert len(boundary_of(build_dsn(request()))) <= 70  # RFC 2046 §5.1.1


# --- injection ------------------------------------------------------------------------------------

INJECTION = "x\r\nBcc: victim@evil.example\r\n\r\n--injected\nX-Evil: 1\r"


def test_line_breaks_in_addresses_cannot_add_header_fields() -> None:
    """CR/LF in MAIL FROM, RCPT TO or the configured mailbox never start a new field."""
    raw = build_dsn(
        request(
            envelope_from=f"scanner@contoso.com{INJECTION}",
            from_address=f"relay@contoso.com{INJECTION}",
            recipients=(FailedRecipient(f"bob@contoso.com{INJECTION}", "5.1.1", "smtp; 550"),),
        )
    )
    message = parse(raw)
    assert message.keys() == TOP_LEVEL_FIELDS
    assert status_groups(raw)[1].keys() == ["Final-Recipient", *PER_RECIPIENT_FIELDS[1:]]
    assert b"\r\nBcc:" not in raw
    assert b"\r\nX-Evil:" not in raw
    assert b"\r\n--injected" not in raw


def test_line_breaks_in_diagnostic_and_reason_cannot_add_fields_or_parts() -> None:
    """Texts from Graph and the delivery engine cannot add fields, groups or MIME parts."""
    recipient = FailedRecipient("bob@contoso.com", "5.1.1", f"smtp; 550 {INJECTION}")
    raw = build_dsn(request(recipients=(recipient,), reason_text=f"Refused. {INJECTION}"))
    assert len(parse(raw).get_payload()) == 3
    assert len(status_groups(raw)) == 2
    assert status_groups(raw)[1].keys() == PER_RECIPIENT_FIELDS
    assert b"\r\nBcc:" not in raw
    assert b"\r\n--injected" not in raw


def test_queue_id_and_host_name_are_reduced_to_tokens() -> None:
    """Even the relay's own values pass the gate: one token, no specials."""
    raw = build_dsn(request(queue_id="Q1\r\nX-Evil: 1", reporting_mta="relay; (x)\r\nX-Evil: 2"))
    message = parse(raw)
    assert message.keys() == TOP_LEVEL_FIELDS
    assert status_groups(raw)[0].keys() == PER_MESSAGE_FIELDS
    assert status_groups(raw)[0]["X-Queue-ID"] == "Q1X-Evil1"


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["550", "5.1", "3.1.1", "5.1.1 ", "5.1.1\r\nX: y", ""])
def test_status_must_be_an_rfc_3463_code(status: str) -> None:
    """A malformed status is a programming error, caught when the value is built."""
    with pytest.raises(ValueError, match="RFC 3463"):
        FailedRecipient("bob@contoso.com", status, "smtp; 550")


def test_action_must_be_an_rfc_3464_action() -> None:
    """RFC 3464 §2.3.3 lists the only valid actions."""
    with pytest.raises(ValueError, match="action"):
        FailedRecipient("bob@contoso.com", "5.1.1", "smtp; 550", action="bounced")


@pytest.mark.parametrize("address", ["", "\r\n", "<>", " "])
def test_failed_recipient_needs_an_address(address: str) -> None:
    """Final-Recipient is required; an address that sanitises to nothing is refused."""
    with pytest.raises(ValueError, match="address"):
        FailedRecipient(address, "5.1.1", "smtp; 550")


@pytest.mark.parametrize("sender", ["", "<>", "\r\n"])
def test_null_reverse_path_never_gets_a_dsn(sender: str) -> None:
    """RFC 5321 §4.5.5: MAIL FROM:<> exists so that notifications are never answered."""
    with pytest.raises(ValueError, match="null reverse-path"):
        request(envelope_from=sender)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"recipients": ()}, "at least one recipient"),
        ({"now": NOW.replace(tzinfo=None)}, "aware"),
        ({"arrival": ARRIVAL.replace(tzinfo=None)}, "aware"),
        ({"message_id_local": "a b"}, "dot-atom-text"),
        ({"message_id_local": "a\r\nX: y"}, "dot-atom-text"),
        ({"from_address": ""}, "mailbox"),
    ],
)
def test_bounce_request_rejects_programming_errors(
    changes: dict[str, object], message: str
) -> None:
    """Caller mistakes fail loudly when the request is built, not half-way through a DSN."""
    with pytest.raises(ValueError, match=message):
        request(**changes)


def test_requests_are_frozen() -> None:
    """Immutable values cross module boundaries (STYLE habit 3)."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        request().queue_id = "other"  # type: ignore[misc]


# --- is_bounce ------------------------------------------------------------------------------------


def headers_only(*lines: str) -> bytes:
    return "\r\n".join(lines).encode() + b"\r\n\r\nbody\r\n"


def test_dsn_built_here_is_recognised_as_a_bounce() -> None:
    """The relay's own DSNs, if they come back, are never bounced again."""
    assert is_bounce(build_dsn(request()))


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/report; report-type=delivery-status; boundary=x",
        'Multipart/Report;\r\n report-type="delivery-status"; boundary="x"',
        "MULTIPART/REPORT; BOUNDARY=x;\r\n\tREPORT-TYPE=Delivery-Status",
        'multipart/report; boundary="a;b"; report-type = "delivery-status"',
        "multipart/report (a bounce); report-type=(type)delivery-status; boundary=x",
        "multipart/report; report-type*=us-ascii'en'delivery%2Dstatus; boundary=x",
        "multipart/report; report-type=global-delivery-status; boundary=x",
    ],
)
def test_delivery_status_reports_are_bounces(content_type: str) -> None:
    """Case, quoting, folding, comments and RFC 2231 forms are all recognised."""
    assert is_bounce(headers_only("From: <>", f"Content-Type: {content_type}", "MIME-Version: 1.0"))


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/mixed; report-type=delivery-status; boundary=x",
        "multipart/report; report-type=disposition-notification; boundary=x",
        'multipart/report; boundary="report-type=delivery-status"',
        'multipart/report; boundary="x; report-type=delivery-status"; report-type=other',
        "multipart/report; boundary=x (report-type=delivery-status)",
        "text/plain; charset=utf-8",
    ],
)
def test_other_content_types_are_not_bounces(content_type: str) -> None:
    """Only a real multipart/report parameter counts, not text inside a quoted value."""
    assert not is_bounce(headers_only("From: a@b.example", f"Content-Type: {content_type}"))


@pytest.mark.parametrize(
    "value",
    ["auto-replied", "auto-generated", "Auto-Generated (cron)", "auto-notified; owner-email=x@y"],
)
def test_auto_submitted_mail_is_never_bounced(value: str) -> None:
    """RFC 3834 §2: automatic mail gets no automatic answer."""
    assert is_bounce(headers_only("From: cron@contoso.com", f"Auto-Submitted: {value}"))


@pytest.mark.parametrize("value", ["no", "No", " no (a person wrote this)", "no; x=y", ""])
def test_auto_submitted_no_is_ordinary_mail(value: str) -> None:
    """RFC 3834 §5: the keyword "no" means a person sent it."""
    assert not is_bounce(headers_only("From: bob@contoso.com", f"Auto-Submitted: {value}"))


def test_ordinary_mail_is_not_a_bounce() -> None:
    """A normal message is bounced when it fails."""
    assert not is_bounce(ORIGINAL)


def test_report_markers_in_the_body_do_not_count() -> None:
    """Only the top-level header block is read."""
    body = b"Content-Type: multipart/report; report-type=delivery-status\r\nAuto-Submitted: yes\r\n"
    assert not is_bounce(ORIGINAL_HEADERS + CRLF + body)


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"garbage", b"\xff\xfe: \x00\r\n\r\n", b"From x\n"])
def test_is_bounce_never_raises_on_junk(raw: bytes) -> None:
    """The check runs on whatever a client sent; it must not fail."""
    assert not is_bounce(raw)


# --- properties -----------------------------------------------------------------------------------

# Printable text mixed with every kind of line break and control character the stdlib parser (or a
# Graph-side one) might treat as the end of a line, plus lone surrogates from surrogateescape.
HOSTILE = st.text(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from('\r\n\t\x00\x0b\x0c\x1c\x1d\x1e\x7f\x85\u2028\u2029:;<>"\\=-'),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]),
    ),
    max_size=300,
)


def failed_recipient(address: str, diagnostic: str) -> FailedRecipient:
    try:
        return FailedRecipient(address, "5.1.1", diagnostic)
    except ValueError:
        assume(False)
        raise


@given(
    addresses=st.lists(HOSTILE, min_size=1, max_size=3),
    diagnostics=st.lists(HOSTILE, min_size=3, max_size=3),
    reason=HOSTILE,
    sender=HOSTILE,
)
def test_no_value_from_outside_can_add_a_field_group_or_part(
    addresses: list[str], diagnostics: list[str], reason: str, sender: str
) -> None:
    """Arbitrary text, control characters and lone surrogates never change the DSN's structure."""
    recipients = tuple(failed_recipient(a, d) for a, d in zip(addresses, diagnostics, strict=False))
    try:
        bounce = request(recipients=recipients, envelope_from=sender, reason_text=reason)
    except ValueError:
        assume(False)
        raise
    raw = build_dsn(bounce)

    head = raw.split(CRLF + CRLF, 1)[0]
    for line in head.split(CRLF):
        assert line[:1] == b"\t" or line.split(b":", 1)[0].decode() in TOP_LEVEL_FIELDS
    assert all(len(line) <= 998 for line in raw.split(CRLF))
    assert b"\n" not in raw.replace(CRLF, b"")
    assert b"\r" not in raw.replace(CRLF, b"")

    message = parse(raw)
    assert message.keys() == TOP_LEVEL_FIELDS
    human, report, headers = parts(raw)
    assert human.keys() == ["Content-Description", "Content-Type", "Content-Transfer-Encoding"]
    assert report.keys() == ["Content-Description", "Content-Type"]
    assert headers.keys() == ["Content-Description", "Content-Type", "Content-Transfer-Encoding"]
    groups = status_groups(raw)
    assert len(groups) == 1 + len(recipients)
    assert groups[0].keys() == PER_MESSAGE_FIELDS
    for group in groups[1:]:
        assert set(group.keys()) <= set(PER_RECIPIENT_FIELDS)
        assert {"Final-Recipient", "Action", "Status", "Last-Attempt-Date"} <= set(group.keys())
        assert group["Action"] == "failed"
    assert returned_headers(raw) == ORIGINAL_HEADERS
    assert is_bounce(raw)


@given(header_block=st.binary(max_size=400))
def test_any_header_bytes_come_back_exactly_after_decoding(header_block: bytes) -> None:
    """Whatever the client sent as header fields returns intact, line endings aside."""
    original = b"X-Test: " + header_block.replace(b"\n", b" ") + CRLF + CRLF + b"body\r\n"
    raw = build_dsn(request(original=original))
    part = parts(raw)[2]
    encoded = part.get_payload()
    assert isinstance(encoded, str)
    expected = original.split(CRLF + CRLF, 1)[0] + CRLF
    if part["Content-Transfer-Encoding"] == "quoted-printable":
        assert quopri.decodestring(encoded.encode("ascii")) == expected
    else:
        assert returned_headers(raw) == expected
    assert re.fullmatch(rb"[\t\r\n -~]*", raw)
