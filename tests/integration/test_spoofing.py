"""Sender spoofing through author fields the relay cannot read (issue #11 item 1), end to end.

A client allowed to send only as scanner@contoso.com tries to make Graph deliver its message as
ceo@contoso.com by writing From/Sender/Resent-From in forms the old address parser read as no
address at all. Each attempt goes through the real aiosmtpd listener with smtplib and must get
`550 5.7.1` naming the header, and the sandbox's Graph must receive nothing. A message whose
To/Cc can be read in two ways reaches Graph with the field re-written so only one reading is left.
"""

from __future__ import annotations

import textwrap

import pytest

from relay.sandbox import Sandbox
from tests.conftest import RelayFactory, asmtp_send

SCANNER_ONLY = textwrap.dedent(
    """\
    - name: printers
      networks: [127.0.0.1/32]
      senders: ["scanner@contoso.com"]
    """
)
SCANNER = "scanner@contoso.com"


def mail(*header_lines: str) -> bytes:
    head = "\r\n".join([*header_lines, "To: bob@partner.example", "Subject: Scan"])
    return (head + "\r\n\r\nScanned document attached.\r\n").encode()


@pytest.mark.parametrize(
    ("lines", "header"),
    [
        (["From: ceo@contoso.com\r\n\tscanner@contoso.com"], "From"),
        (['From: "x" ceo@contoso.com'], "From"),
        (["From: ceo@contoso.com scanner@contoso.com"], "From"),
        (["From: <scanner@contoso.com> ceo@contoso.com"], "From"),
        (["From: scanner@contoso.com", "Sender: ceo@contoso.com scanner@contoso.com"], "Sender"),
        (["From: scanner@contoso.com", "Resent-From: x ceo@contoso.com"], "Resent-From"),
    ],
    ids=[
        "folded-words",
        "quoted-then-address",
        "two-addresses",
        "text-after-angle",
        "sender",
        "resent-from",
    ],
)
async def test_an_unreadable_author_field_is_550_571_naming_it_and_nothing_is_sent(
    start_relay: RelayFactory, sandbox: Sandbox, lines: list[str], header: str
) -> None:
    """MAIL FROM is the allowed scanner@; only the header tries to say ceo@."""
    relay = await start_relay(clients=SCANNER_ONLY)
    outcome = await asmtp_send(relay.listeners[0].port, mail(*lines), sender=SCANNER)
    assert (outcome.code, outcome.text[:5]) == (550, "5.7.1"), outcome
    assert f"The {header} header" in outcome.text
    assert sandbox.received == []


async def test_a_unicode_look_alike_of_the_allowed_sender_is_refused(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """From: with a long s (U+017F) is another mailbox than scanner@, whatever casefold says."""
    relay = await start_relay(clients=SCANNER_ONLY)
    raw = mail("From: \u017fcanner@contoso.com")
    outcome = await asmtp_send(relay.listeners[0].port, raw, sender=SCANNER)
    assert (outcome.code, outcome.text[:5]) == (550, "5.7.1"), outcome
    # The relay's own sender policy refused it, not Graph's Send-As check after the fact.
    assert "is not allowed for client printers" in outcome.text
    assert sandbox.received == []


async def test_the_allowed_author_in_any_ascii_case_is_delivered(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """The refusals above are not a refusal of everything: a plain From goes through."""
    relay = await start_relay(clients=SCANNER_ONLY)
    raw = mail("From: Scanner <Scanner@Contoso.COM>")
    outcome = await asmtp_send(relay.listeners[0].port, raw, sender=SCANNER)
    assert (outcome.code, outcome.text[:5]) == (250, "2.0.0"), outcome
    assert len(sandbox.received) == 1


async def test_reply_to_is_not_checked_but_logged(
    start_relay: RelayFactory, sandbox: Sandbox, log_records: pytest.LogCaptureFixture
) -> None:
    """Reply-To is not an author: another domain there is delivered, and the log names it."""
    relay = await start_relay(clients=SCANNER_ONLY)
    raw = mail("From: scanner@contoso.com", "Reply-To: Someone <Else@Fabrikam.example>")
    outcome = await asmtp_send(relay.listeners[0].port, raw, sender=SCANNER)
    assert (outcome.code, outcome.text[:5]) == (250, "2.0.0"), outcome
    assert len(sandbox.received) == 1
    logged = [r for r in log_records.records if getattr(r, "event", None) == "reply_to"]
    assert [r.getMessage() for r in logged] == ["reply-to else@fabrikam.example (not checked)"]
    assert logged[0].name == "relay.smtp"


async def test_a_cc_with_two_readings_reaches_graph_with_one(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """`CC: eve@example.com <frank@example.com>`: Graph gets frank, written canonically."""
    relay = await start_relay(clients=SCANNER_ONLY)
    raw = mail("From: scanner@contoso.com", "CC: eve@example.com <frank@example.com>")
    outcome = await asmtp_send(
        relay.listeners[0].port,
        raw,
        sender=SCANNER,
        recipients=("bob@partner.example", "frank@example.com"),
    )
    assert (outcome.code, outcome.text[:5]) == (250, "2.0.0"), outcome
    [received] = sandbox.received
    assert received.mime is not None
    assert b'\r\nCC: "eve@example.com" <frank@example.com>\r\n' in received.mime
    assert sorted(received.recipients) == ["bob@partner.example", "frank@example.com"]
