"""GraphClient's own HTTP behaviour, against the sandbox's Graph over real TLS (no mocks).

The answer-to-error table itself is tests/unit/test_graph_errors.py (pure); the end-to-end error
cases (throttling, 401s, unknown mailboxes, proxies) are tests/integration/test_graph_sandbox.py.
Here: what the client puts on the wire, the boundary where aiohttp's exceptions end, and that the
client leaves the logging of a failure to the delivery layer.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay.core.errors import PermanentDeliveryError, TransientDeliveryError
from relay.graph.client import GraphClient, network_error
from relay.graph.tokens import TokenProvider
from relay.sandbox import ABORT, Sandbox
from tests.sandbox_auth import CLIENT, MAILBOX, SECRET, TENANT, auth_for, target_for

MIME = b"From: scanner@contoso.com\r\nTo: b@contoso.com\r\nSubject: hi\r\n\r\nbody\r\n"
GUEST = "alice/ops#EXT#?x=1@contoso.com"


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(state_dir=tmp_path / "sandbox") as sb:
        sb.add_app(TENANT, CLIENT, secret=SECRET)
        sb.add_mailbox(MAILBOX)
        yield sb


@pytest.fixture
async def tokens(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[TokenProvider]:
    provider = TokenProvider({"contoso": auth_for(sandbox, tmp_path)})
    yield provider
    provider.close()


@pytest.fixture
async def client(tokens: TokenProvider) -> AsyncIterator[GraphClient]:
    graph = GraphClient(tokens, timeout=5.0, connect_timeout=2.0)
    yield graph
    await graph.close()


async def test_the_message_arrives_byte_for_byte_with_the_client_request_id(
    client: GraphClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    """user-sendmail.md: base64 MIME as text/plain; 202 carries Graph's request-id, and Graph
    sees the caller's client-request-id (for a support case with Microsoft)."""
    target = target_for(auth_for(sandbox, tmp_path), client_request_id="crid-1")
    result = await client.send_mime(target, MIME)
    (mail,) = sandbox.received
    assert (result.status, mail.mime, mail.kind) == (202, MIME, "mime")
    assert result.request_id == mail.request_id
    assert mail.client_request_id == "crid-1"
    assert result.duration >= 0


async def test_the_mailbox_is_quoted_into_one_path_segment(
    client: GraphClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    """'/', '#' and '?' (guest UPNs have #EXT#) cannot escape the users/{id} segment."""
    sandbox.add_mailbox(GUEST, send_as=[MAILBOX])
    await client.send_mime(target_for(auth_for(sandbox, tmp_path), GUEST), MIME)
    (mail,) = sandbox.received
    assert mail.mailbox == GUEST.lower()


async def test_the_json_form_says_save_to_sent_items_only_when_false(
    client: GraphClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    """user-sendmail.md: saveToSentItems defaults to true; the client writes it only as false."""
    message = {
        "subject": "hi",
        "body": {"contentType": "Text", "content": "body"},
        "toRecipients": [{"emailAddress": {"address": "b@contoso.com"}}],
    }
    target = target_for(auth_for(sandbox, tmp_path))
    await client.send_json(target, message, save_to_sent_items=True)
    await client.send_json(target, message, save_to_sent_items=False)
    kept, dropped = sandbox.received
    assert (kept.kind, kept.save_to_sent_items) == ("json", True)
    assert kept.json_body is not None
    assert "saveToSentItems" not in kept.json_body
    assert dropped.save_to_sent_items is False


async def test_a_failed_send_is_raised_and_not_logged_by_the_client(
    client: GraphClient, sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery layer logs each outcome once; the client only raises (with code,
    request-id and remedy for that one log line)."""
    sandbox.add_mailbox("old@contoso.com", licensed=False)
    caplog.set_level(logging.DEBUG, logger="relay.graph")
    with pytest.raises(PermanentDeliveryError) as caught:
        await client.send_mime(target_for(auth_for(sandbox, tmp_path), "old@contoso.com"), MIME)
    failure = caught.value
    assert str(failure.reply).startswith("550 5.1.1")
    assert failure.code == "MailboxNotEnabledForRESTAPI"
    assert failure.request_id
    assert "licence" in failure.remedy
    assert [r for r in caplog.records if r.name == "relay.graph"] == []


async def test_a_network_failure_is_raised_and_not_logged_by_the_client(
    client: GraphClient, sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dropped connection is 451 4.4.2 with the aiohttp error only as its cause."""
    sandbox.faults.fail_graph(ABORT)
    caplog.set_level(logging.DEBUG, logger="relay.graph")
    with pytest.raises(TransientDeliveryError) as caught:
        await client.send_mime(target_for(auth_for(sandbox, tmp_path)), MIME)
    assert str(caught.value.reply).startswith("451 4.4.2")
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)
    assert [r for r in caplog.records if r.name == "relay.graph"] == []


@pytest.mark.parametrize(
    ("exc", "kind_words", "alert"),
    [
        (aiohttp.ClientConnectionError("connection refused"), "cannot reach Graph", False),
        (aiohttp.ServerDisconnectedError(), "cannot reach Graph", False),
        (TimeoutError(), "did not answer within 5s", False),
        (aiohttp.ConnectionTimeoutError("connect timed out"), "did not answer within", False),
        (ssl.SSLCertVerificationError("self-signed"), "TLS verification", True),
        (ssl.SSLError("bad record mac"), "TLS with Graph failed", False),
    ],
)
def test_each_network_exception_becomes_a_transient_442(
    exc: BaseException, kind_words: str, alert: bool
) -> None:
    """The boundary's classification of what aiohttp/asyncio/ssl raise: all 451 4.4.2 with a
    remedy; only an untrusted certificate is an alert (it does not heal by itself)."""
    error = network_error(exc, timeout=5.0)
    assert (error.reply.code, error.reply.status) == (451, "4.4.2")
    assert kind_words in error.message
    assert error.alert is alert
    assert error.remedy


async def test_a_missing_ca_file_is_a_transient_alert_naming_it(
    client: GraphClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A ca_file that cannot be loaded fails the send (retryable) and says which file; Graph
    is not asked."""
    ca_file = tmp_path / "missing-ca.pem"
    ca_file.write_bytes(sandbox.ca_file.read_bytes())
    auth = auth_for(sandbox, tmp_path, ca_file=str(ca_file))
    ca_file.unlink()
    with pytest.raises(TransientDeliveryError) as caught:
        await client.send_mime(target_for(auth), MIME)
    assert caught.value.alert is True
    assert "missing-ca.pem" in caught.value.message
    assert "ca_file" in caught.value.remedy
    assert sandbox.graph_requests == 0


async def test_the_session_is_created_on_first_use_and_close_is_idempotent(
    tokens: TokenProvider, sandbox: Sandbox, tmp_path: Path
) -> None:
    """send_mime works without start(); close() may be called twice; a closed client starts
    a new session when used again."""
    client = GraphClient(tokens)
    target = target_for(auth_for(sandbox, tmp_path))
    await client.send_mime(target, MIME)
    await client.close()
    await client.close()
    await client.send_mime(target, MIME)
    await client.close()
    assert len(sandbox.received) == 2
