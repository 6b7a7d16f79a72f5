"""GraphClient's HTTP behaviour, with Graph simulated by aioresponses (no network)."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from relay.config.schema import AuthObjectConfig
from relay.core.errors import PermanentDeliveryError, TransientDeliveryError
from relay.graph.client import GraphClient

GRAPH = "https://graph.example.test"
MIME = b"From: a@contoso.com\r\nTo: b@contoso.com\r\nSubject: hi\r\n\r\nbody\r\n"


class FakeTokens:
    """An honest TokenSource: numbered tokens; a `stale` current token moves to the next one."""

    def __init__(self) -> None:
        self.generation = 1
        self.calls: list[tuple[str, str | None]] = []

    async def get_token(self, name: str, *, stale: str | None = None) -> str:
        self.calls.append((name, stale))
        if stale is not None and stale == f"token-{self.generation}":
            self.generation += 1
        return f"token-{self.generation}"


def _auth(tmp_path: Path, **extra: Any) -> AuthObjectConfig:
    return AuthObjectConfig.model_validate(
        {
            "tenant_id": "00000000-0000-0000-0000-00000000000a",
            "client_id": "00000000-0000-0000-0000-00000000000b",
            "client_secret": "not-used-here",
            "authority_host": "https://login.example.test",
            "graph_endpoint": GRAPH,
            **extra,
        },
        context={"environ": {}, "base_dir": tmp_path},
    )


def _url(mailbox: str) -> str:
    return f"{GRAPH}/v1.0/users/{mailbox}/sendMail"


@pytest.fixture
def tokens() -> FakeTokens:
    return FakeTokens()


@pytest.fixture
async def client(tokens: FakeTokens) -> AsyncIterator[GraphClient]:
    graph = GraphClient(tokens, timeout=5.0, connect_timeout=2.0)
    await graph.start()
    yield graph
    await graph.close()


@pytest.fixture
def graph() -> Iterator[aioresponses]:
    with aioresponses() as mocked:
        yield mocked


def _sent(graph: aioresponses, url: str) -> list[Any]:
    return list(graph.requests[("POST", URL(url, encoded=True))])


async def test_a_message_is_posted_as_base64_text_with_token_and_request_id(
    client: GraphClient, graph: aioresponses, tmp_path: Path
) -> None:
    """user-sendmail.md: POST /users/{upn}/sendMail, text/plain, base64 MIME; 202 is success."""
    url = _url("scanner@contoso.com")
    graph.post(url, status=202, headers={"request-id": "rid-1"})
    result = await client.send_mime(
        _auth(tmp_path), "contoso", "scanner@contoso.com", MIME, client_request_id="crid-1"
    )
    assert result.status == 202
    assert result.request_id == "rid-1"
    assert result.duration >= 0
    (call,) = _sent(graph, url)
    headers = call.kwargs["headers"]
    assert headers["Authorization"] == "Bearer token-1"
    assert headers["Content-Type"] == "text/plain"
    assert headers["client-request-id"] == "crid-1"
    body = call.kwargs["data"].getvalue()
    assert b"\n" not in body
    assert base64.b64decode(body, validate=True) == MIME
    assert call.kwargs["allow_redirects"] is False


async def test_the_mailbox_is_quoted_into_one_path_segment(
    client: GraphClient, graph: aioresponses, tmp_path: Path
) -> None:
    """Characters such as '/', '#', '?' and spaces cannot escape the users/{id} segment."""
    url = f"{GRAPH}/v1.0/users/odd%2Fname%23EXT%23%3Fx%20y@contoso.com/sendMail"
    graph.post(url, status=202)
    await client.send_mime(
        _auth(tmp_path), "contoso", "odd/name#EXT#?x y@contoso.com", MIME, client_request_id="c"
    )
    assert len(_sent(graph, url)) == 1


async def test_a_401_is_retried_once_with_a_fresh_token(
    client: GraphClient, graph: aioresponses, tokens: FakeTokens, tmp_path: Path
) -> None:
    """Graph's 401 makes the client drop the refused token (stale=) and try once more."""
    url = _url("a@contoso.com")
    graph.post(url, status=401, body=b'{"error":{"code":"InvalidAuthenticationToken"}}')
    graph.post(url, status=202)
    result = await client.send_mime(
        _auth(tmp_path), "contoso", "a@contoso.com", MIME, client_request_id="c"
    )
    assert result.status == 202
    assert tokens.calls == [("contoso", None), ("contoso", "token-1")]
    first, second = _sent(graph, url)
    assert first.kwargs["headers"]["Authorization"] == "Bearer token-1"
    assert second.kwargs["headers"]["Authorization"] == "Bearer token-2"


async def test_a_second_401_is_a_transient_470_with_a_remedy(
    client: GraphClient, graph: aioresponses, tokens: FakeTokens, tmp_path: Path
) -> None:
    """Two 401s in a row: 451 4.7.0, retried later by the queue, not a third time now."""
    url = _url("a@contoso.com")
    graph.post(url, status=401, repeat=True)
    with pytest.raises(TransientDeliveryError) as caught:
        await client.send_mime(
            _auth(tmp_path), "contoso", "a@contoso.com", MIME, client_request_id="c"
        )
    assert (caught.value.reply.code, caught.value.reply.status) == (451, "4.7.0")
    assert caught.value.http_status == 401
    assert caught.value.remedy
    assert len(_sent(graph, url)) == 2
    assert len(tokens.calls) == 2


async def test_a_permanent_graph_error_is_raised_and_logged_with_its_remedy(
    client: GraphClient, graph: aioresponses, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 MailboxNotEnabledForRESTAPI is 550 5.1.1, logged with code, request-id, remedy."""
    url = _url("a@contoso.com")
    graph.post(
        url,
        status=404,
        headers={"request-id": "rid-404"},
        body=b'{"error":{"code":"MailboxNotEnabledForRESTAPI","message":"REST API is not yet '
        b'supported for this mailbox."}}',
    )
    with (
        caplog.at_level(logging.WARNING, logger="relay.graph"),
        pytest.raises(PermanentDeliveryError) as caught,
    ):
        await client.send_mime(
            _auth(tmp_path), "contoso", "a@contoso.com", MIME, client_request_id="c"
        )
    assert str(caught.value.reply).startswith("550 5.1.1")
    (record,) = [r for r in caplog.records if r.name == "relay.graph"]
    line = record.getMessage()
    for part in ("MailboxNotEnabledForRESTAPI", "rid-404", "licence", "a@contoso.com"):
        assert part in line
    assert "token-1" not in line


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectionError("connection refused"),
        aiohttp.ServerDisconnectedError(),
        TimeoutError(),  # what aiohttp raises when ClientTimeout.total expires
        aiohttp.ConnectionTimeoutError("connect timed out"),
    ],
)
async def test_network_failures_become_transient_442_without_aiohttp_leaking(
    client: GraphClient, graph: aioresponses, tmp_path: Path, exc: BaseException
) -> None:
    """Connection errors and timeouts are 451 4.4.2; the aiohttp error is only the cause."""
    graph.post(_url("a@contoso.com"), exception=exc)
    with pytest.raises(TransientDeliveryError) as caught:
        await client.send_mime(
            _auth(tmp_path), "contoso", "a@contoso.com", MIME, client_request_id="c"
        )
    assert (caught.value.reply.code, caught.value.reply.status) == (451, "4.4.2")
    assert caught.value.__cause__ is exc
    assert caught.value.remedy


async def test_a_throttled_answer_carries_retry_after(
    client: GraphClient, graph: aioresponses, tmp_path: Path
) -> None:
    """429 + Retry-After: 451 4.4.2 with the delay for the scheduler."""
    graph.post(_url("a@contoso.com"), status=429, headers={"Retry-After": "17"})
    with pytest.raises(TransientDeliveryError) as caught:
        await client.send_mime(
            _auth(tmp_path), "contoso", "a@contoso.com", MIME, client_request_id="c"
        )
    assert caught.value.retry_after == 17.0


async def test_a_missing_ca_file_is_a_transient_alert_naming_it(
    client: GraphClient, graph: aioresponses, tmp_path: Path
) -> None:
    """A ca_file that cannot be loaded fails the send (retryable) and says which file."""
    ca_file = tmp_path / "missing-ca.pem"
    ca_file.write_text("present at load time, deleted before the send\n")
    auth = _auth(tmp_path, ca_file=str(ca_file))
    ca_file.unlink()
    with pytest.raises(TransientDeliveryError) as caught:
        await client.send_mime(auth, "contoso", "a@contoso.com", MIME, client_request_id="c")
    assert caught.value.alert is True
    assert "missing-ca.pem" in caught.value.message
    assert "ca_file" in caught.value.remedy


async def test_the_session_is_created_on_first_use_and_closed(
    tokens: FakeTokens, tmp_path: Path
) -> None:
    """send_mime works without start(); close() is idempotent."""
    client = GraphClient(tokens)
    with aioresponses() as graph:
        graph.post(_url("a@contoso.com"), status=202)
        await client.send_mime(
            _auth(tmp_path), "contoso", "a@contoso.com", MIME, client_request_id="c"
        )
    await client.close()
    await client.close()
