"""What the tests of `relay.delivery` share: a config, a clock, submissions and one engine
assembled over `MemoryStore` and `FakeGraph` (honest fakes, no mocks)."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay.config.load import parse_config
from relay.config.schema import Config
from relay.core.errors import PermanentDeliveryError, SmtpReply, TransientDeliveryError
from relay.core.message.prepare import PreparedMessage
from relay.core.policy import choose_route
from relay.core.values import EntryMeta, Submission
from relay.delivery.engine import DeliveryEngine
from relay.testing.fake_graph import FakeGraph
from relay.testing.memory_store import MemoryStore

START = 1_700_000_000.0
SLOW = TransientDeliveryError("Graph answered HTTP 503", http_status=503)
DENIED = PermanentDeliveryError(
    "Graph answered HTTP 403 ErrorSendAsDenied",
    reply=SmtpReply(550, "5.7.1", "Mailbox may not send as this sender"),
    code="ErrorSendAsDenied",
    http_status=403,
)
MIME = (
    b"From: app@contoso.com\r\nTo: bob@partner.example\r\nSubject: hello\r\n"
    b"Message-ID: <m1@contoso.com>\r\n\r\nbody\r\n"
)
ROUTES = """\
- {senders: ["*@contoso.com"], auth_object: contoso, mailbox: sender}
"""


def config_text(*, delivery: str, routes: str = ROUTES, senders: str = '["*@contoso.com"]') -> str:
    auth = textwrap.dedent(
        """\
        tenant_id: 00000000-0000-0000-0000-00000000000a
        client_id: 00000000-0000-0000-0000-00000000000b
        client_secret: not-a-real-secret
        authority_host: https://login.example.test
        graph_endpoint: https://graph.example.test
        """
    )
    return "\n".join(
        [
            "smtp: {hostname: relay.test, listeners: [{address: 127.0.0.1, port: 0}]}",
            "clients:",
            f"  - {{name: local, networks: [127.0.0.1/32], senders: {senders}}}",
            "auth_objects:",
            "  contoso:",
            textwrap.indent(auth, "    "),
            "  other:",
            textwrap.indent(auth, "    "),
            "routes:",
            textwrap.indent(routes, "  "),
            f"delivery: {delivery}",
        ]
    )


def make_config(tmp_path: Path, **kwargs: str) -> Config:
    return parse_config(config_text(**kwargs), base_dir=tmp_path, environ={})


@dataclass
class Clock:
    """Wall-clock time the test moves by hand."""

    now: float = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Parts:
    """One engine over a MemoryStore and a FakeGraph, with the config swappable (a reload)."""

    config: Config
    store: MemoryStore | None = field(default_factory=MemoryStore)
    graph: FakeGraph = field(default_factory=FakeGraph)
    clock: Clock = field(default_factory=Clock)
    engine: DeliveryEngine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = DeliveryEngine(
            config=lambda: self.config,
            graph=self.graph,
            store=self.store,
            clock=self.clock,
            random_fraction=lambda: 0.0,
            rescan_seconds=0.05,
            record_retry=(0.01, 0.05),
        )

    def submission(
        self, queue_id: str = "Q1", *, sender: str = "app@contoso.com", mail_from: str | None = None
    ) -> Submission:
        return Submission(
            queue_id=queue_id,
            client="local",
            client_ip="127.0.0.1",
            mail_from=sender if mail_from is None else mail_from,
            recipients=("bob@partner.example",),
            route=choose_route(self.config.routes, sender),
            message=PreparedMessage(
                mime=MIME,
                message_id="<m1@contoso.com>",
                subject="hello",
                header_recipients=("bob@partner.example",),
                added_headers=(),
            ),
            sender=sender,
        )

    async def where(self, queue_id: str) -> tuple[str, EntryMeta] | None:
        assert self.store is not None
        return await self.store.find(queue_id)

    async def state(self, queue_id: str) -> str | None:
        found = await self.where(queue_id)
        return found[0] if found is not None else None


async def eventually(condition: Callable[[], object], within: float = 5.0) -> None:
    """Poll `condition` until it is true; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def eventually_async(condition: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """`eventually` for a condition that is a coroutine function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
