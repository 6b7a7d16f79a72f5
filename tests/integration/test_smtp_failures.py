"""What a client sees when something inside the relay goes wrong: a generic 451 4.3.0, never
aiosmtpd's `500 Error: (Exception) details`, and the session stays usable."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.config.schema import Config
from relay.core.values import Submission, SubmitOutcome
from relay.sandbox import Sandbox
from relay.smtp.connections import ConnectionLimiter
from relay.smtp.handler import RelayHandler
from relay.smtp.session import RelaySMTP
from tests.conftest import MAILBOX, build_config, message, relay_config_text


class ExplodingSubmitter:
    """A delivery engine with a bug: raises with a message that must not reach the client."""

    def __init__(self) -> None:
        self.calls = 0

    async def submit(self, submission: Submission) -> SubmitOutcome:
        self.calls += 1
        raise RuntimeError("secret internal detail /var/lib/relay token=abc")


@pytest.fixture
async def exploding_relay(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[int]:
    config: Config = build_config(relay_config_text(sandbox), tmp_path)
    handler = RelayHandler(config=lambda: config, submitter=ExplodingSubmitter())
    limiter = ConnectionLimiter(total=10, per_client=10)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RelaySMTP(handler, limiter=limiter, hostname="relay.test", loop=loop),
        "127.0.0.1",
        0,
    )
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


def two_transactions(port: int) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("device.test")
        replies = []
        for _ in range(2):
            client.mail(MAILBOX)
            client.rcpt("bob@partner.example")
            replies.append(client.data(message()))
        replies.append(client.noop())
        return replies


async def test_handler_exception_is_a_generic_451_and_the_session_goes_on(
    exploding_relay: int,
) -> None:
    """Both transactions get 451 4.3.0 with no internals; NOOP still works afterwards."""
    replies = await asyncio.to_thread(two_transactions, exploding_relay)
    assert replies[0] == (451, b"4.3.0 Internal error, please try again later")
    assert replies[1] == replies[0]
    assert replies[2][0] == 250
    assert all(b"secret" not in text and b"Error:" not in text for _, text in replies)
