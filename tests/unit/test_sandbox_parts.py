"""The sandbox's building blocks, without a server: certificates, JWTs, request validation,
and the fault plan."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from relay.sandbox.directory import Mailbox
from relay.sandbox.faults import FaultPlan
from relay.sandbox.jose import JoseError, sign_hs256, verify_hs256
from relay.sandbox.messages import GraphError, parse_json_submission, parse_mime_submission
from relay.sandbox.pki import ensure_credentials

BOX = Mailbox(address="scanner@contoso.com", licensed=True, send_as=frozenset({"noreply@x.org"}))


# -- pki -------------------------------------------------------------------------------------


def test_server_certificate_covers_loopback_names_and_chains_to_the_ca(tmp_path: Path) -> None:
    """The server certificate names localhost, 127.0.0.1 and ::1 and is issued by the CA."""
    creds = ensure_credentials(tmp_path)
    ca = x509.load_pem_x509_certificate(creds.ca_file.read_bytes())
    server = x509.load_pem_x509_certificate(creds.cert_file.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert stat.S_IMODE(creds.key_file.stat().st_mode) == 0o600


def test_ca_is_kept_across_starts_but_replaced_when_unusable(tmp_path: Path) -> None:
    """A valid CA is reused (users trust it once); a damaged one is regenerated."""
    first = ensure_credentials(tmp_path).ca_file.read_bytes()
    assert ensure_credentials(tmp_path).ca_file.read_bytes() == first
    (tmp_path / "ca-key.pem").write_text("garbage")
    assert ensure_credentials(tmp_path).ca_file.read_bytes() != first


def test_ca_close_to_expiry_is_replaced(tmp_path: Path) -> None:
    """A CA within 30 days of expiry is not used to mint new server certificates."""
    first = ensure_credentials(tmp_path).ca_file.read_bytes()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3640)
    assert ensure_credentials(tmp_path, now=later).ca_file.read_bytes() != first


# -- jose ------------------------------------------------------------------------------------


def test_hs256_round_trip_and_tamper_detection() -> None:
    """A minted token verifies under its key and fails under another or when edited."""
    token = sign_hs256({"tid": "t", "exp": 1}, b"k" * 32)
    assert verify_hs256(token, b"k" * 32) == {"tid": "t", "exp": 1}
    with pytest.raises(JoseError):
        verify_hs256(token, b"x" * 32)
    head, _, sig = token.split(".")
    body = base64.urlsafe_b64encode(json.dumps({"tid": "evil"}).encode()).rstrip(b"=").decode()
    with pytest.raises(JoseError):
        verify_hs256(f"{head}.{body}.{sig}", b"k" * 32)
    with pytest.raises(JoseError):
        verify_hs256("a.b", b"k" * 32)


# -- Graph request validation --------------------------------------------------------------


def b64(text: str | bytes) -> bytes:
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("To: a@x.org\r\n", ("a@x.org",)),
        ("To: undisclosed-recipients:;\r\nBcc: B@X.org\r\n", ("b@x.org",)),
        ("To: Team: a@x.org, b@x.org;, c@x.org\r\n", ("a@x.org", "b@x.org", "c@x.org")),
        ("To: =?utf-8?q?M=C3=BCller=2C_A?= <a@x.org>\r\n", ("a@x.org",)),
        ('To: "Doe, Jane" <j@x.org>,\r\n\tk@x.org\r\n', ("j@x.org", "k@x.org")),
        ("To: a@x.org\r\nCc: c@x.org\r\nCc: d@x.org\r\n", ("a@x.org", "c@x.org", "d@x.org")),
    ],
    ids=["plain", "group-and-bcc", "named-group", "encoded-name", "folded-quoted", "repeated"],
)
def test_mime_recipients_are_to_cc_bcc_lowercased(headers: str, expected: tuple[str, ...]) -> None:
    """Recipients come from every To/Cc/Bcc field, with groups and display names handled."""
    submission = parse_mime_submission(b64(f"Subject: s\r\n{headers}\r\nbody"), BOX)
    assert submission.recipients == expected


def test_mime_with_8bit_headers_is_accepted() -> None:
    """Raw UTF-8 in headers (a legacy quirk) does not break parsing or the subject."""
    raw = "From: scanner@contoso.com\r\nTo: a@x.org\r\nSubject: Größe\r\n\r\nx".encode()
    submission = parse_mime_submission(b64(raw), BOX)
    assert submission.recipients == ("a@x.org",)
    assert submission.mime == raw


def test_mime_sender_is_checked_against_send_as_rights() -> None:
    """From may be the mailbox or a Send-As address; anything else is ErrorSendAsDenied."""
    ok = parse_mime_submission(b64("From: Someone <NoReply@X.org>\r\nTo: a@x.org\r\n\r\n"), BOX)
    assert ok.from_address == "noreply@x.org"
    with pytest.raises(GraphError) as denied:
        parse_mime_submission(b64("From: boss@x.org\r\nTo: a@x.org\r\n\r\n"), BOX)
    assert (denied.value.status, denied.value.code) == (403, "ErrorSendAsDenied")


@pytest.mark.parametrize("look_alike", ["\u212aeeper@x.org", "\u017fender@x.org"])
def test_a_unicode_look_alike_of_a_send_as_address_is_another_address(look_alike: str) -> None:
    """Exchange folds ASCII letters only: the Kelvin sign and the long s make another address,
    so the sandbox denies Send-As as Exchange would (lower() folds the first, casefold() both)."""
    box = Mailbox(
        "noreply@x.org", licensed=True, send_as=frozenset({"keeper@x.org", "sender@x.org"})
    )
    assert box.may_send_as("KEEPER@X.org")
    assert box.may_send_as("Sender@x.org")
    assert not box.may_send_as(look_alike)


def test_encoded_subject_is_decoded_for_the_index() -> None:
    """The subject recorded for index.html is the decoded RFC 2047 text."""
    raw = "To: a@x.org\r\nSubject: =?utf-8?b?w4RyZ2Vy?=\r\n\r\n"
    assert parse_mime_submission(b64(raw), BOX).subject == "Ärger"


def test_json_save_to_sent_items_accepts_the_documented_string_form() -> None:
    """saveToSentItems defaults to true and may be given as "false" (as Graph's docs do)."""
    message = {"toRecipients": [{"emailAddress": {"address": "a@x.org"}}]}
    default = parse_json_submission(json.dumps({"message": message}).encode(), BOX)
    assert default.save_to_sent_items is True
    document = {"message": message, "saveToSentItems": "false"}
    assert parse_json_submission(json.dumps(document).encode(), BOX).save_to_sent_items is False


@pytest.mark.parametrize(
    ("document", "code"),
    [
        ({}, "ErrorInvalidParameter"),
        ([1, 2], "BadRequest"),
        (
            {
                "message": {"toRecipients": [{"emailAddress": {"address": "a@x.org"}}]},
                "saveToSentItems": "maybe",
            },
            "BadRequest",
        ),
        (
            {
                "message": {
                    "toRecipients": [{"emailAddress": {"address": "a@x.org"}}],
                    "body": {"contentType": "markdown", "content": "*"},
                }
            },
            "BadRequest",
        ),
        ({"message": {"ccRecipients": [{"emailAddress": {}}]}}, "ErrorInvalidRecipients"),
    ],
    ids=["no-message", "not-object", "bad-save-flag", "bad-body-type", "recipient-no-address"],
)
def test_json_shape_errors(document: object, code: str) -> None:
    """Structurally wrong JSON bodies are 400 with the matching Graph code."""
    with pytest.raises(GraphError) as caught:
        parse_json_submission(json.dumps(document).encode(), BOX)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_five_x_headers_are_allowed() -> None:
    """Graph's limit is five internetMessageHeaders; exactly five pass."""
    message = {
        "toRecipients": [{"emailAddress": {"address": "a@x.org"}}],
        "internetMessageHeaders": [{"name": f"X-H{i}", "value": "v"} for i in range(5)],
    }
    parse_json_submission(json.dumps({"message": message}).encode(), BOX)


# -- fault plan -----------------------------------------------------------------------------


def test_graph_faults_are_consumed_in_order_with_mailbox_filter() -> None:
    """Faults fire in queue order; a mailbox-scoped fault is skipped for other mailboxes."""
    plan = FaultPlan()
    plan.fail_graph(500, mailbox="B@x.org")
    plan.fail_graph(503, times=2)
    taken = [plan.take_graph_fault("a@x.org") for _ in range(3)]
    assert [f.status if f else None for f in taken] == [503, 503, None]
    fault = plan.take_graph_fault("b@x.org")
    assert fault is not None
    assert fault.status == 500
    assert plan.take_graph_fault("b@x.org") is None


def test_token_faults_and_clear() -> None:
    """fail_token scripts statuses in order; clear() forgets everything."""
    plan = FaultPlan()
    plan.fail_token(503, times=2)
    plan.fail_token(500)
    assert [plan.take_token_fault() for _ in range(4)] == [503, 503, 500, None]
    plan.fail_graph(503)
    plan.graph_latency(1.5)
    plan.token_endpoint_down(True)
    plan.clear()
    assert (plan.take_graph_fault("a@x.org"), plan.latency, plan.token_down) == (None, 0.0, False)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.fail_graph(503, times=0),
        lambda p: p.fail_graph(999),
        lambda p: p.fail_token(200),
        lambda p: p.graph_latency(-1),
    ],
    ids=["zero-times", "bad-status", "token-success-status", "negative-latency"],
)
def test_fault_plan_rejects_nonsense(call: Callable[[FaultPlan], None]) -> None:
    """Impossible fault scripts are programming errors, reported at once."""
    with pytest.raises(ValueError, match=r"times|status|latency"):
        call(FaultPlan())
