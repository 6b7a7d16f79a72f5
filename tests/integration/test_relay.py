"""The whole relay over real sockets: aiosmtpd listener -> policy -> message -> msal + aiohttp ->
the sandbox's Entra ID and Graph over TLS. Clients are smtplib; replies are checked verbatim."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging

import pytest

from relay.sandbox import Sandbox
from relay.service import RelayService
from tests.conftest import (
    MAILBOX,
    RelayFactory,
    TlsFiles,
    asmtp_send,
    message,
)


def port_of(relay: RelayService, index: int = 0) -> int:
    return relay.listeners[index].port


async def test_plain_smtp_message_is_delivered_through_graph(
    relay: RelayService, sandbox: Sandbox
) -> None:
    """250 comes only with Graph's 202; Graph got the MIME from the sender's mailbox."""
    outcome = await asmtp_send(port_of(relay), message(subject="Invoice 42"))
    assert outcome.code == 250
    assert outcome.text.startswith("2.0.0 Ok: delivered ")
    [mail] = sandbox.received
    assert mail.kind == "mime"
    assert mail.mailbox == MAILBOX
    assert mail.recipients == ("bob@partner.example",)
    assert mail.mime is not None
    parsed = email.message_from_bytes(mail.mime, policy=email.policy.default)
    assert parsed["Subject"] == "Invoice 42"
    assert parsed["Received"].startswith("from device.test")
    assert "by relay.test (smtp-graph-relay) with ESMTP" in parsed["Received"]
    assert parsed["Message-ID"]
    assert parsed["Date"]
    assert mail.mime.endswith(b"\r\n\r\nScanned document attached.\r\n")


async def test_graph_delivers_to_exactly_the_envelope_recipients(
    relay: RelayService, sandbox: Sandbox
) -> None:
    """A Bcc-only envelope recipient is added; a header recipient not in RCPT TO is removed."""
    data = message(to="bob@partner.example, Eve <eve@elsewhere.example>")
    outcome = await asmtp_send(
        port_of(relay), data, recipients=("bob@partner.example", "audit@contoso.com")
    )
    assert outcome.code == 250
    [mail] = sandbox.received
    assert sorted(mail.recipients) == ["audit@contoso.com", "bob@partner.example"]
    assert mail.mime is not None
    assert b"eve@elsewhere.example" not in mail.mime


async def test_starttls_listener_delivers(
    start_relay: RelayFactory, sandbox: Sandbox, relay_tls: TlsFiles
) -> None:
    """STARTTLS upgrades the session; Received says ESMTPS."""
    relay = await start_relay(tls=True, listeners="[{address: 127.0.0.1, port: 0, tls: starttls}]")
    outcome = await asmtp_send(port_of(relay), message(), starttls=relay_tls.client_context())
    assert outcome.code == 250
    [mail] = sandbox.received
    assert mail.mime is not None
    assert b"with ESMTPS id" in mail.mime


async def test_implicit_tls_listener_delivers(
    start_relay: RelayFactory, sandbox: Sandbox, relay_tls: TlsFiles
) -> None:
    """An implicit-TLS listener (SMTPS) accepts and delivers."""
    relay = await start_relay(tls=True, listeners="[{address: 127.0.0.1, port: 0, tls: implicit}]")
    outcome = await asmtp_send(port_of(relay), message(), implicit=relay_tls.client_context())
    assert outcome.code == 250
    assert len(sandbox.received) == 1


async def test_unknown_client_address_is_refused_at_the_greeting(
    relay: RelayService, sandbox: Sandbox
) -> None:
    """A connection from an address no client lists (on a listener without AUTH) gets
    554 5.7.1 instead of a greeting: not an open relay."""
    outcome = await asmtp_send(port_of(relay), message(), source="127.0.0.2")
    assert outcome.code == 554
    assert outcome.text.startswith("5.7.1 Relay access denied")
    assert sandbox.graph_requests == 0


async def test_disallowed_envelope_sender_is_refused(relay: RelayService, sandbox: Sandbox) -> None:
    """MAIL FROM outside the client's senders gets 550 5.7.1 at MAIL."""
    outcome = await asmtp_send(port_of(relay), message(), sender="ceo@fabrikam.example")
    assert (outcome.code, outcome.text[:5]) == (550, "5.7.1")
    assert sandbox.graph_requests == 0


async def test_forged_header_from_is_refused_at_data(relay: RelayService, sandbox: Sandbox) -> None:
    """An allowed MAIL FROM with a From header outside the allowed senders gets 550 5.7.1."""
    outcome = await asmtp_send(port_of(relay), message(sender="ceo@fabrikam.example"))
    assert outcome.code == 550
    assert "ceo@fabrikam.example" in outcome.text
    assert sandbox.graph_requests == 0


async def test_recipient_cap_answers_452(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """Past smtp.max_recipients each further RCPT gets 452 4.5.3."""
    relay = await start_relay(smtp_extra="max_recipients: 2")
    outcome = await asmtp_send(
        port_of(relay),
        message(),
        recipients=("a@partner.example", "b@partner.example", "c@partner.example"),
    )
    assert (outcome.code, outcome.text[:5]) == (452, "4.5.3")


async def test_two_hundred_messages_cost_one_token_request(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """The token is cached and shared: 8 concurrent connections x 25 messages, 1 token request.
    (Budgets raised: 200 messages a minute from one mailbox is past Exchange's 30.)"""
    relay = await start_relay(
        delivery="{mode: direct, inline_timeout: 5s, mailbox_limits: {messages_per_minute: 1000}}"
    )

    async def connection(n: int) -> list[int]:
        return [
            (await asmtp_send(port_of(relay), message(subject=f"{n}-{i}"))).code for i in range(25)
        ]

    codes = [
        code for batch in await asyncio.gather(*(connection(n) for n in range(8))) for code in batch
    ]
    assert codes == [250] * 200
    assert len(sandbox.received) == 200
    assert sandbox.token_requests == 1


async def test_revoked_token_is_replaced_once_and_mail_still_goes(
    relay: RelayService, sandbox: Sandbox
) -> None:
    """Graph's 401 makes the relay fetch a fresh token and retry once, invisibly to the client."""
    assert (await asmtp_send(port_of(relay), message())).code == 250
    sandbox.revoke_tokens()
    assert (await asmtp_send(port_of(relay), message())).code == 250
    assert sandbox.token_requests == 2
    assert len(sandbox.received) == 2


async def test_wrong_secret_gives_451_470_and_a_log_line_with_the_fix(
    start_relay: RelayFactory, sandbox: Sandbox, log_records: pytest.LogCaptureFixture
) -> None:
    """AADSTS7000215: the client is told to retry later; the log names the code and the fix."""
    relay = await start_relay(secret="not-the-secret")
    outcome = await asmtp_send(port_of(relay), message())
    assert (outcome.code, outcome.text[:5]) == (451, "4.7.0")
    errors = [r for r in log_records.records if r.levelno >= logging.ERROR]
    assert any("AADSTS7000215" in r.getMessage() for r in errors)
    assert any("Certificates & secrets" in r.getMessage() for r in errors)
    assert "not-the-secret" not in log_records.text
    assert sandbox.received == []


@pytest.mark.parametrize(
    ("status", "code", "reply"),
    [
        (429, "ApplicationThrottled", "451 4.4.2"),
        (500, "InternalServerError", "451 4.4.2"),
        (502, "BadGateway", "451 4.4.2"),
        (503, "ServiceUnavailable", "451 4.4.2"),
        (504, "GatewayTimeout", "451 4.4.2"),
        (0, "", "451 4.4.2"),  # connection dropped without a response
        (403, "ErrorSendAsDenied", "550 5.7.1"),
        (403, "ErrorAccessDenied", "550 5.7.1"),
        (404, "ErrorInvalidUser", "550 5.1.1"),
        (404, "MailboxNotEnabledForRESTAPI", "550 5.1.1"),
        (400, "ErrorInvalidRecipients", "550 5.1.3"),
        (400, "ErrorMimeContentInvalid", "554 5.6.0"),
        (413, "RequestEntityTooLarge", "552 5.3.4"),
        (400, "ErrorMessageSizeExceeded", "552 5.3.4"),
    ],
)
async def test_each_graph_answer_maps_to_its_smtp_reply(
    relay: RelayService, sandbox: Sandbox, status: int, code: str, reply: str
) -> None:
    """DESIGN §5: transient Graph trouble is 451 (client retries), refusals are their 5xx."""
    sandbox.faults.fail_graph(status, code, f"injected {code}", retry_after="7")
    outcome = await asmtp_send(port_of(relay), message())
    assert f"{outcome.code} {outcome.text}".startswith(reply)
    assert sandbox.received == []


async def test_persistent_401_is_temporary_470(relay: RelayService, sandbox: Sandbox) -> None:
    """401 twice in a row (fresh token refused too) is 451 4.7.0, not a bounce."""
    sandbox.faults.fail_graph(401, "InvalidAuthenticationToken", "nope", times=2)
    outcome = await asmtp_send(port_of(relay), message())
    assert (outcome.code, outcome.text[:5]) == (451, "4.7.0")


async def test_token_endpoint_down_is_temporary_470(relay: RelayService, sandbox: Sandbox) -> None:
    """With Entra ID unreachable the client gets 451 4.7.0 and can retry later."""
    sandbox.faults.token_endpoint_down(True)
    outcome = await asmtp_send(port_of(relay), message())
    assert (outcome.code, outcome.text[:5]) == (451, "4.7.0")


async def test_graph_slower_than_inline_timeout_is_451(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """No answer within delivery.inline_timeout: 451 4.4.2, never a hanging client."""
    relay = await start_relay(delivery="{mode: direct, inline_timeout: 300ms}")
    sandbox.faults.hold_graph()
    try:
        outcome = await asmtp_send(port_of(relay), message())
    finally:
        sandbox.faults.release_graph()
    assert (outcome.code, outcome.text[:5]) == (451, "4.4.2")


async def test_message_over_the_size_limit_is_refused(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """DATA past smtp.max_message_size is refused with 552 and never reaches Graph."""
    relay = await start_relay(smtp_extra="max_message_size: 10KB")
    outcome = await asmtp_send(port_of(relay), message(body="x" * 76 + "\r\n") * 200)
    assert outcome.code == 552
    assert sandbox.graph_requests == 0


async def test_delivery_log_line_carries_the_message_facts(
    relay: RelayService, sandbox: Sandbox, log_records: pytest.LogCaptureFixture
) -> None:
    """One event per message with queue id, client, sender, count, route, mailbox, request-id."""
    outcome = await asmtp_send(port_of(relay), message())
    queue_id = outcome.text.rsplit(" ", 1)[-1]
    [record] = [r for r in log_records.records if getattr(r, "event", "") == "delivered"]
    facts = vars(record)
    assert facts["queue_id"] == queue_id
    assert facts["client"] == "local"
    assert facts["mail_from"] == MAILBOX
    assert facts["recipients"] == 1
    assert facts["route"] == "*@contoso.com"  # the route's label: its first sender pattern
    assert facts["mailbox"] == MAILBOX
    assert facts["graph_status"] == 202
    assert facts["request_id"] == sandbox.received[0].request_id
    assert isinstance(facts["duration_ms"], int)


async def test_connection_limit_per_client_answers_421(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """A client over max_connections_per_client is greeted with 421 4.7.0 and closed."""
    relay = await start_relay(smtp_extra="max_connections_per_client: 1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
    try:
        assert (await reader.readline()).startswith(b"220 ")
        second_reader, second_writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
        assert (await second_reader.readline()).startswith(b"421 4.7.0")
        assert await second_reader.read() == b""
        second_writer.close()
        await second_writer.wait_closed()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_never_more_than_four_concurrent_requests_per_mailbox(
    relay: RelayService, sandbox: Sandbox
) -> None:
    """Graph's MailboxConcurrency is 4: six waiting clients cause 4 requests, then 2, no 429."""
    sandbox.faults.hold_graph()
    sends = [asyncio.create_task(asmtp_send(port_of(relay), message())) for _ in range(6)]
    await sandbox.wait_until(lambda: sum(sandbox.in_flight.values()) == 4)
    sandbox.faults.release_graph()
    outcomes = await asyncio.gather(*sends)
    assert [o.code for o in outcomes] == [250] * 6
    assert sandbox.max_concurrency[MAILBOX] == 4
    assert 429 not in sandbox.graph_statuses
