"""The corpus (tests/corpus/*.eml) through the whole relay to the sandbox's Graph.

MIME path (the default route): DESIGN §7 fidelity. Every body part and attachment arrives
byte-identical, the raw body after the header block is unchanged, the only header edits are
Received, Bcc, Date, Message-ID and the To/Cc fields, and Graph delivers to exactly the envelope.

JSON path (a route with `save_to_sent_items: false`): bodies and attachments survive the
conversion to Graph's message resource (SHA-256 of the decoded bytes), recipients equal the
envelope, and what cannot be converted faithfully is refused with 554 5.6.0, never changed.

Each message goes out as the raw bytes of its file (dot-stuffed), not through smtplib's
`sendmail`, which would normalise bare LF line endings that the corpus contains on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import re
import smtplib
import textwrap
from email.message import Message
from pathlib import Path

import pytest

from relay.core.message.headers import split_header_from_body
from relay.graph.client import GraphClient
from relay.sandbox import Sandbox
from relay.service import RelayService
from tests.conftest import RelayFactory, SmtpOutcome

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
FILES = sorted(CORPUS.glob("*.eml"))
RAW = {path: path.read_bytes() for path in FILES}

# MAIL FROM and RCPT TO per file. Where the envelope differs from To/Cc the relay must add a Bcc
# (01, 14, 17, 18, 23) or remove header recipients (05, 23).
ENVELOPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "01": ("alerts@contoso.com", ("ops@contoso.com", "oncall@contoso.com")),
    "02": ("news@contoso.com", ("staff@contoso.com",)),
    "03": ("rooms@contoso.com", ("dana@partner.example",)),
    "04": ("payroll@contoso.com", ("auditor@partner.example",)),
    "05": ("erp@contoso.com", ("accounting@contoso.com",)),
    "06": ("helpdesk@contoso.com", ("facilities@contoso.com",)),
    "07": ("reception@contoso.com", ("visitors@contoso.com",)),
    "08": ("stock@contoso.com", ("warehouse@contoso.com",)),
    "09": ("backup@contoso.com", ("admins@contoso.com",)),
    "10": ("sales@contoso.com", ("buyer@partner.example",)),
    "11": ("scanner@contoso.com", ("scans@contoso.com",)),
    "12": ("scanner@contoso.com", ("records@contoso.com",)),
    "13": ("scanner@contoso.com", ("helpdesk@contoso.com",)),
    "14": ("cron@contoso.com", ("root@contoso.com", "dba@contoso.com")),
    "15": ("reports@contoso.com", ("management@contoso.com",)),
    "16": ("export@contoso.com", ("bi@contoso.com",)),
    "17": ("announce@contoso.com", ("alice@contoso.com", "guest@partner.example")),
    "18": ("ups@contoso.com", ("noc@contoso.com",)),
    "19": ("legacy@contoso.com", ("it@contoso.com",)),
    "20": ("time@contoso.com", ("hr@contoso.com",)),
    "21": ("tickets@contoso.com", ("dana@partner.example",)),
    "22": ("security@contoso.com", ("all@contoso.com",)),
    "23": ("facility@contoso.com", ("alice@contoso.com", "dave@contoso.com", "eve@contoso.com")),
    "24": ("scanner@contoso.com", ("scans@contoso.com",)),
}
# Not representable as Graph JSON without changing them (relay.mime.graph_json).
UNCONVERTIBLE = {"03", "04"}
EDITABLE = frozenset({"received", "bcc", "to", "cc", "date", "message-id"})
JSON_ROUTE = textwrap.dedent(
    """\
    - senders: ["*@contoso.com"]
      auth_object: contoso
      mailbox: sender
      save_to_sent_items: false
    """
)


def envelope_of(path: Path) -> tuple[str, tuple[str, ...]]:
    return ENVELOPES[path.name[:2]]


def test_corpus_is_complete() -> None:
    """At least 20 messages, each with an envelope."""
    assert len(FILES) >= 20
    assert {p.name[:2] for p in FILES} == set(ENVELOPES)


def send_raw(port: int, data: bytes, sender: str, recipients: tuple[str, ...]) -> SmtpOutcome:
    """DATA with the file's exact bytes: dot-stuffed, ended by CRLF.CRLF (RFC 5321 §4.5.2)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("device.test")
        code, text = client.mail(sender)
        assert code == 250, text
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        client.putcmd("data")
        code, text = client.getreply()
        assert code == 354, text
        stuffed = re.sub(rb"(?m)^\.", b"..", data)
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        client.send(stuffed + b".\r\n")
        code, text = client.getreply()
        return SmtpOutcome(code, text.decode())


async def deliver(
    start_relay: RelayFactory, sandbox: Sandbox, path: Path, **overrides: str
) -> tuple[SmtpOutcome, tuple[str, ...]]:
    sender, recipients = envelope_of(path)
    sandbox.add_mailbox(sender)
    relay: RelayService = await start_relay(**overrides)
    port = relay.listeners[0].port
    outcome = await asyncio.to_thread(send_raw, port, RAW[path], sender, recipients)
    return outcome, recipients


def leaves(message: Message) -> list[tuple[str, bytes]]:
    """Every leaf part's content type and decoded payload, in order (into message/rfc822 too)."""
    found = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            found.append((part.get_content_type(), payload if isinstance(payload, bytes) else b""))
    return found


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
async def test_mime_path_keeps_the_message_byte_for_byte(
    start_relay: RelayFactory, sandbox: Sandbox, path: Path
) -> None:
    """Bodies, parts and untouched headers arrive as sent; recipients are the envelope."""
    original = RAW[path]
    outcome, recipients = await deliver(start_relay, sandbox, path)
    assert (outcome.code, outcome.text[:5]) == (250, "2.0.0"), outcome
    [mail] = sandbox.received
    assert mail.kind == "mime"
    assert mail.mime is not None
    assert sorted(mail.recipients) == sorted(r.lower() for r in recipients)

    sent, got = split_header_from_body(original), split_header_from_body(mail.mime)
    assert got.body == sent.body
    assert leaves(parse(mail.mime)) == leaves(parse(original))

    kept = [f.raw for f in sent.fields if f.key not in EDITABLE]
    assert [f.raw for f in got.fields if f.key not in EDITABLE] == kept
    for key in ("date", "message-id"):
        before = [f.raw for f in sent.fields if f.key == key]
        after = [f.raw for f in got.fields if f.key == key]
        assert after == before if before else len(after) == 1


# --- the JSON path ---------------------------------------------------------------------------


def expected_parts(raw: bytes) -> tuple[str, list[str], list[bytes]]:
    """(body text, SHA-256 of each attachment, message/rfc822 attachments' bodies) as the
    stdlib reads the original: html preferred over plain, each decoded with its charset."""
    texts: list[tuple[str, str]] = []
    digests: list[str] = []
    messages: list[bytes] = []

    def visit(part: Message) -> None:
        kind = part.get_content_type()
        if part.is_multipart() and kind != "message/rfc822":
            for child in part.get_payload():
                assert isinstance(child, Message)
                visit(child)
            return
        if kind == "message/rfc822":
            messages.append(b"")
            return
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        attached = part.get_filename() or part.get_content_disposition() == "attachment"
        if kind in ("text/plain", "text/html") and not attached:
            texts.append((kind, payload.decode(part.get_content_charset() or "utf-8")))
        else:
            digests.append(hashlib.sha256(payload).hexdigest())

    visit(parse(raw))
    html = [t for k, t in texts if k == "text/html"]
    body = html[-1] if html else texts[0][1] if texts else ""
    return body, sorted(digests), messages


@pytest.mark.skipif(not hasattr(GraphClient, "send_json"), reason="JSON send path not wired yet")
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
async def test_json_path_keeps_bodies_and_attachments_or_refuses(
    start_relay: RelayFactory, sandbox: Sandbox, path: Path
) -> None:
    """save_to_sent_items: false sends JSON; content survives, or the relay says 554 5.6.0."""
    original = RAW[path]
    outcome, recipients = await deliver(start_relay, sandbox, path, routes=JSON_ROUTE)
    if path.name[:2] in UNCONVERTIBLE:
        assert (outcome.code, outcome.text[:5]) == (554, "5.6.0"), outcome
        assert sandbox.received == []
        return
    assert (outcome.code, outcome.text[:5]) == (250, "2.0.0"), outcome
    [mail] = sandbox.received
    assert mail.kind == "json"
    assert mail.save_to_sent_items is False
    assert sorted(mail.recipients) == sorted(r.lower() for r in recipients)
    assert mail.json_body is not None
    message = mail.json_body["message"]
    body, digests, rfc822 = expected_parts(original)
    assert message["body"]["content"] == body
    attachments = message.get("attachments", [])
    contents = [base64.b64decode(a["contentBytes"]) for a in attachments]
    embedded = [
        c
        for a, c in zip(attachments, contents, strict=True)
        if a["contentType"] == "message/rfc822"
    ]
    assert len(embedded) == len(rfc822)
    assert all(c in original for c in embedded)  # the forwarded message's own octets
    others = [
        c
        for a, c in zip(attachments, contents, strict=True)
        if a["contentType"] != "message/rfc822"
    ]
    assert sorted(hashlib.sha256(c).hexdigest() for c in others) == digests
    headers = message.get("internetMessageHeaders", [])
    assert len(headers) <= 5
    assert all(h["name"].lower().startswith("x-") for h in headers)


@pytest.mark.skipif(not hasattr(GraphClient, "send_json"), reason="JSON send path not wired yet")
async def test_rewrite_from_sends_as_the_route_mailbox_with_the_author_in_reply_to(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """rewrite_from: true: Graph sends from the route's mailbox; replies go to the author."""
    sandbox.add_mailbox("relay@contoso.com")
    route = textwrap.dedent(
        """\
        - senders: ["*@contoso.com"]
          auth_object: contoso
          mailbox: relay@contoso.com
          rewrite_from: true
        """
    )
    path = CORPUS / "12-two-line-from.eml"
    outcome, _ = await deliver(start_relay, sandbox, path, routes=route)
    assert (outcome.code, outcome.text[:5]) == (250, "2.0.0"), outcome
    [mail] = sandbox.received
    assert (mail.kind, mail.mailbox, mail.from_address) == (
        "json",
        "relay@contoso.com",
        "relay@contoso.com",
    )
    assert mail.save_to_sent_items is True
    assert mail.json_body is not None
    [reply_to] = mail.json_body["message"]["replyTo"]
    assert reply_to["emailAddress"]["address"] == "scanner@contoso.com"
