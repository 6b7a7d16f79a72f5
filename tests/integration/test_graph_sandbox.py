"""GraphClient + TokenProvider (real MSAL, real aiohttp) against the sandbox over TLS."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import pytest

from relay.config.schema import AuthObjectConfig
from relay.core.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from relay.graph.client import GraphClient, SendResult
from relay.graph.tokens import TokenProvider
from relay.sandbox import ABORT, Sandbox
from tests.conftest import RelayFactory, asmtp_send, message
from tests.sandbox_auth import CLIENT, SECRET, TENANT, auth_for, target_for

MAILBOX = "scanner@contoso.com"


def _mime(sender: str = MAILBOX, size: int = 0) -> bytes:
    return (
        f"From: Scanner <{sender}>\r\nTo: Alice <alice@contoso.com>\r\n"
        "Subject: Scan 0001\r\nMessage-ID: <scan-0001@relay.test>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "Scanned document attached.\r\n"
    ).encode() + b"x" * size


@dataclass
class Rig:
    """A started sandbox plus the relay's Graph client and token provider pointed at it."""

    sandbox: Sandbox
    auth: AuthObjectConfig
    tokens: TokenProvider
    graph: GraphClient

    async def send(self, mailbox: str = MAILBOX, mime: bytes | None = None) -> Any:
        target = target_for(self.auth, mailbox, "3f2504e0-4f89-11d3-9a0c-0305e82c3301")
        return await self.graph.send_mime(target, _mime() if mime is None else mime)


@asynccontextmanager
async def _clients(
    auth: AuthObjectConfig, *, total_seconds: float = 10.0, connect_seconds: float = 5.0
) -> AsyncIterator[tuple[TokenProvider, GraphClient]]:
    """The relay's token provider and a started Graph client for `auth` (with those timeouts);
    both are closed on the way out."""
    tokens = TokenProvider({"contoso": auth})
    graph = GraphClient(tokens, timeout=total_seconds, connect_timeout=connect_seconds)
    try:
        await graph.start()
        yield tokens, graph
    finally:
        await graph.close()
        tokens.close()


async def _send_once(auth: AuthObjectConfig, **timeouts: float) -> SendResult:
    """Send the default message as MAILBOX through clients made for this one call."""
    async with _clients(auth, **timeouts) as (_, graph):
        return await graph.send_mime(target_for(auth), _mime())


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with Sandbox(state_dir=tmp_path / "sandbox") as sandbox:
        sandbox.add_app(TENANT, CLIENT, secret=SECRET)
        sandbox.add_mailbox(MAILBOX)
        auth = auth_for(sandbox, tmp_path)
        async with _clients(auth) as (tokens, graph):
            yield Rig(sandbox, auth, tokens, graph)


async def test_a_message_is_delivered_over_tls_and_graph_gets_the_exact_mime(rig: Rig) -> None:
    """202 end to end: the sandbox CA comes from ca_file; the MIME arrives byte for byte."""
    result = await rig.send()
    assert result.status == 202
    (mail,) = await rig.sandbox.wait_for_mail(1)
    assert mail.mime == _mime()
    assert mail.mailbox == MAILBOX
    assert result.request_id == mail.request_id
    assert result.duration > 0


@pytest.mark.parametrize(
    ("status", "code", "kind", "reply"),
    [
        (429, "TooManyRequests", TransientDeliveryError, "451 4.4.2"),
        (500, "InternalServerError", TransientDeliveryError, "451 4.4.2"),
        (502, "BadGateway", TransientDeliveryError, "451 4.4.2"),
        (503, "ServiceUnavailable", TransientDeliveryError, "451 4.4.2"),
        (504, "GatewayTimeout", TransientDeliveryError, "451 4.4.2"),
        (403, "ErrorSendAsDenied", PermanentDeliveryError, "550 5.7.1"),
        (403, "ErrorAccessDenied", PermanentDeliveryError, "550 5.7.1"),
        (404, "ErrorInvalidUser", PermanentDeliveryError, "550 5.1.1"),
        (404, "MailboxNotEnabledForRESTAPI", PermanentDeliveryError, "550 5.1.1"),
        (400, "ErrorInvalidRecipients", PermanentDeliveryError, "550 5.1.3"),
        (400, "ErrorMimeContentInvalid", PermanentDeliveryError, "554 5.6.0"),
        (400, "ErrorInvalidInternetMessageHeader", PermanentDeliveryError, "554 5.6.0"),
        (413, "RequestEntityTooLarge", PermanentDeliveryError, "552 5.3.4"),
        (400, "ErrorMessageSizeExceeded", PermanentDeliveryError, "552 5.3.4"),
        (409, "ErrorItemConflict", PermanentDeliveryError, "554 5.0.0"),
    ],
)
async def test_each_injected_graph_error_gives_the_design_reply(
    rig: Rig, status: int, code: str, kind: type[DeliveryError], reply: str
) -> None:
    """DESIGN §5 row by row, through real HTTP: class, reply, code and request-id recorded."""
    rig.sandbox.faults.fail_graph(status, code, f"Injected {code}.", times=1)
    with pytest.raises(kind) as caught:
        await rig.send()
    error = caught.value
    assert str(error.reply).startswith(reply)
    assert error.code == code
    assert error.http_status == status
    assert error.request_id
    assert error.request_id in error.reply.text
    assert f"Injected {code}." in error.message
    assert error.remedy


async def test_throttling_carries_graphs_retry_after(rig: Rig) -> None:
    """429 with Retry-After: 451 4.4.2 and the delay for the scheduler."""
    rig.sandbox.faults.fail_graph(429, "ApplicationThrottled", retry_after="12")
    with pytest.raises(TransientDeliveryError) as caught:
        await rig.send()
    assert caught.value.retry_after == 12.0


async def test_an_aborted_connection_is_transient(rig: Rig) -> None:
    """Graph hanging up without an answer is a connection error: 451 4.4.2."""
    rig.sandbox.faults.fail_graph(ABORT)
    with pytest.raises(TransientDeliveryError) as caught:
        await rig.send()
    assert str(caught.value.reply).startswith("451 4.4.2")
    assert caught.value.http_status is None


async def test_a_slow_graph_is_a_timeout(tmp_path: Path) -> None:
    """ClientTimeout applies to every request; running out of it is 451 4.4.2."""
    async with Sandbox(state_dir=tmp_path / "sandbox") as sandbox:
        sandbox.add_app(TENANT, CLIENT, secret=SECRET)
        sandbox.add_mailbox(MAILBOX)
        sandbox.faults.graph_latency(2.0)
        with pytest.raises(TransientDeliveryError) as caught:
            await _send_once(auth_for(sandbox, tmp_path), total_seconds=0.5, connect_seconds=0.5)
    assert "did not answer within 0.5s" in caught.value.message


async def test_a_revoked_token_is_replaced_after_one_401(rig: Rig) -> None:
    """Graph's 401 makes the client fetch a fresh token and succeed on the second try."""
    await rig.send()
    rig.sandbox.revoke_tokens()
    result = await rig.send()
    assert result.status == 202
    assert rig.sandbox.token_requests == 2
    assert rig.sandbox.graph_statuses[401] == 1


async def test_a_second_401_is_451_470(rig: Rig) -> None:
    """If the fresh token is refused too, the message waits for an administrator (451 4.7.0)."""
    rig.sandbox.faults.fail_graph(401, "InvalidAuthenticationToken", times=2)
    with pytest.raises(TransientDeliveryError) as caught:
        await rig.send()
    assert str(caught.value.reply).startswith("451 4.7.0")
    assert rig.sandbox.graph_statuses[401] == 2
    assert rig.sandbox.token_requests == 2


async def test_an_unknown_mailbox_is_550_511(rig: Rig) -> None:
    """The sandbox's own 404 ErrorInvalidUser, not an injected one."""
    with pytest.raises(PermanentDeliveryError) as caught:
        await rig.send(mailbox="nobody@contoso.com", mime=_mime("nobody@contoso.com"))
    assert str(caught.value.reply).startswith("550 5.1.1")
    assert caught.value.code == "ErrorInvalidUser"


async def test_an_unlicensed_mailbox_names_the_licence_remedy(rig: Rig) -> None:
    """404 MailboxNotEnabledForRESTAPI from a mailbox without an Exchange Online licence."""
    rig.sandbox.add_mailbox("printer@contoso.com", licensed=False)
    with pytest.raises(PermanentDeliveryError) as caught:
        await rig.send(mailbox="printer@contoso.com", mime=_mime("printer@contoso.com"))
    assert caught.value.code == "MailboxNotEnabledForRESTAPI"
    assert "licence" in caught.value.remedy


async def test_sending_as_someone_else_without_send_as_is_550_571(rig: Rig) -> None:
    """A From address the mailbox holds no Send As right on: 403 ErrorSendAsDenied."""
    with pytest.raises(PermanentDeliveryError) as caught:
        await rig.send(mime=_mime("ceo@contoso.com"))
    assert str(caught.value.reply).startswith("550 5.7.1")
    assert caught.value.code == "ErrorSendAsDenied"
    assert "Send As" in caught.value.remedy


async def test_an_app_without_mail_send_is_550_571_with_the_consent_remedy(
    tmp_path: Path,
) -> None:
    """A token without the Mail.Send role: 403 ErrorAccessDenied, remedy names admin consent."""
    async with Sandbox(state_dir=tmp_path / "sandbox") as sandbox:
        sandbox.add_app(TENANT, CLIENT, secret=SECRET, roles=())
        sandbox.add_mailbox(MAILBOX)
        with pytest.raises(PermanentDeliveryError) as caught:
            await _send_once(auth_for(sandbox, tmp_path))
    assert caught.value.code == "ErrorAccessDenied"
    assert "admin consent" in caught.value.remedy


async def test_a_message_over_graphs_4mb_limit_is_552_534(rig: Rig) -> None:
    """The base64 body passes Graph's 4 MB request limit: 413 -> 552 5.3.4."""
    with pytest.raises(PermanentDeliveryError) as caught:
        await rig.send(mime=_mime(size=3_200_000))
    assert str(caught.value.reply).startswith("552 5.3.4")


async def test_token_failures_reach_the_caller_as_451_470(tmp_path: Path) -> None:
    """A wrong secret surfaces from send_mime as the token provider's 451 4.7.0 alert."""
    async with Sandbox(state_dir=tmp_path / "sandbox") as sandbox:
        sandbox.add_app(TENANT, CLIENT, secret=SECRET)
        with pytest.raises(TransientDeliveryError) as caught:
            await _send_once(auth_for(sandbox, tmp_path, client_secret="wrong~secret"))
    assert caught.value.code == "AADSTS7000215"
    assert sandbox.graph_requests == 0


async def test_graph_is_untrusted_without_ca_file(rig: Rig, tmp_path: Path) -> None:
    """Without the sandbox CA as ca_file, TLS verification of Graph fails: transient alert."""
    token_auth = rig.auth
    bare = auth_for(rig.sandbox, tmp_path, ca_file=None)
    await rig.tokens.get_token("contoso")  # the token provider itself trusts ca_file
    with pytest.raises(TransientDeliveryError) as caught:
        await rig.graph.send_mime(target_for(bare), _mime())
    assert caught.value.alert is True
    assert "ca_file" in caught.value.remedy
    assert token_auth.ca_file is not None
    assert rig.sandbox.graph_requests == 0


async def test_an_unreachable_graph_is_451_442(rig: Rig, tmp_path: Path) -> None:
    """Connection refused: transient, with the network remedy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = auth_for(rig.sandbox, tmp_path, graph_endpoint=f"https://127.0.0.1:{port}")
    with pytest.raises(TransientDeliveryError) as caught:
        await rig.graph.send_mime(target_for(dead), _mime())
    assert str(caught.value.reply).startswith("451 4.4.2")
    assert "cannot reach Graph" in caught.value.message


def _dead_proxy() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_the_auth_objects_proxy_carries_graph_requests(rig: Rig, tmp_path: Path) -> None:
    """auth.proxy is used for sendMail; a dead proxy is a transient connection failure."""
    await rig.tokens.get_token("contoso")
    proxied = auth_for(rig.sandbox, tmp_path, proxy=_dead_proxy())
    with pytest.raises(TransientDeliveryError) as caught:
        await rig.graph.send_mime(target_for(proxied), _mime())
    assert str(caught.value.reply).startswith("451 4.4.2")
    assert rig.sandbox.graph_requests == 0


async def test_https_proxy_applies_to_graph_unless_no_proxy_exempts_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without auth.proxy, HTTPS_PROXY routes sendMail; NO_PROXY exempts the host again."""
    await rig.tokens.get_token("contoso")  # cached, so only Graph sees the proxy settings
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", _dead_proxy())
    with pytest.raises(TransientDeliveryError):
        await rig.send()
    assert rig.sandbox.graph_requests == 0
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert (await rig.send()).status == 202


async def test_a_netrc_default_login_does_not_interfere(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither client reads ~/.netrc: a `default` entry would otherwise add a second login."""
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password elsewhere\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text(netrc.read_text())
    (tmp_path / ".netrc").chmod(0o600)
    assert (await rig.send()).status == 202


@pytest.mark.parametrize(
    ("status", "code", "reply"),
    [
        (404, "MailboxNotEnabledForRESTAPI", 550),
        (503, "ServiceUnavailable", 451),
        (ABORT, "", 451),
    ],
)
async def test_one_failed_delivery_is_logged_exactly_once(
    sandbox: Sandbox,
    start_relay: RelayFactory,
    log_records: pytest.LogCaptureFixture,
    status: int,
    code: str,
    reply: int,
) -> None:
    """#10: a Graph failure is logged once, by the delivery layer, with its code, request-id
    and remedy (DESIGN §5); the client does not log it a second time."""
    relay = await start_relay()  # direct mode: the client waits for Graph's answer
    sandbox.faults.fail_graph(status, code)
    outcome = await asmtp_send(relay.listeners[0].port, message())
    assert outcome.code == reply
    (record,) = [
        r for r in log_records.records if r.name.startswith("relay") and r.levelno >= WARNING
    ]
    assert record.name == "relay.delivery"
    assert getattr(record, "event", None) in ("failed", "deferred")
    assert getattr(record, "remedy", "")
    if status != ABORT:
        assert getattr(record, "graph_code", None) == code
        assert getattr(record, "request_id", None)


async def test_an_entra_outage_costs_log_requests_and_logs_failing_once_then_recovered(
    sandbox: Sandbox, start_relay: RelayFactory, log_records: pytest.LogCaptureFixture
) -> None:
    """#11 item 6 through the whole relay: 20 messages during an Entra outage (each an inline
    attempt, then queue retries) cost O(log t) Entra requests, not one per attempt; the log has
    one "failing" line; when Entra is back every message goes out and "recovered" is logged."""
    sandbox.faults.token_endpoint_down(True)
    began = time.monotonic()
    relay = await start_relay(
        delivery="{mode: hybrid, inline_timeout: 5s, spool_dir: spool, "
        "retry: {first: 200ms, max: 1s, lifetime: 1h}}"
    )
    port = relay.listeners[0].port
    outcomes = await asyncio.gather(
        *(asmtp_send(port, message(subject=f"Scan {n}")) for n in range(20))
    )
    assert all(o.code == 250 and "queued" in o.text for o in outcomes)
    requests_made, elapsed = sandbox.entra_requests, time.monotonic() - began
    assert 1 <= requests_made <= 2 + math.log2(1 + elapsed)
    sandbox.faults.token_endpoint_down(False)
    await sandbox.wait_for_mail(20, timeout=60)
    lines = [r.getMessage() for r in log_records.records if r.name == "relay.tokens"]
    assert len([line for line in lines if line.startswith("token requests failing")]) == 1
    assert not [line for line in lines if line.startswith("token requests still failing")]
    assert len([line for line in lines if line.startswith("token requests recovered")]) == 1
