"""The admin server defends itself, over raw TCP on 127.0.0.1: a client that sends nothing, or a
request head one byte at a time (slowloris), is dropped after the header timeout; a kept-alive
connection is closed after the idle timeout; a Host header naming another server (DNS
rebinding) is refused with 421, a missing or doubled one with 400."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay.config.load import parse_config
from relay.config.schema import AdminConfig
from relay.ops.admin import AdminServer, HealthSources
from relay.ops.http_guard import HEADER_TIMEOUT, IDLE_TIMEOUT
from relay.ops.metrics import RelayMetrics
from relay.service import BoundListener

CONFIG = textwrap.dedent(
    """\
    smtp:
      listeners: [{address: 127.0.0.1, port: 2525}]
    clients: [{name: local, networks: [127.0.0.1/32], senders: ["*@contoso.com"]}]
    auth_objects:
      contoso:
        tenant_id: 00000000-0000-0000-0000-00000000000a
        client_id: 00000000-0000-0000-0000-00000000000b
        client_secret: not-used-here
    routes: [{senders: ["*@contoso.com"], auth_object: contoso}]
    """
)

Start = Callable[..., Awaitable[AdminServer]]


@pytest.fixture
async def start_admin(tmp_path: Path) -> AsyncIterator[Start]:
    """Start healthy admin servers on 127.0.0.1:0 (no spool); all stopped at teardown."""
    config = parse_config(CONFIG, base_dir=tmp_path)
    listeners = tuple(config.smtp.listeners)
    sources = HealthSources(
        config=lambda: config,
        listeners=listeners,
        bound=lambda: [BoundListener(li, li.address, li.port) for li in listeners],
        tokens=dict,
    )
    started: list[AdminServer] = []

    async def start(
        hostnames: tuple[str, ...] = (),
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> AdminServer:
        admin = AdminConfig.model_construct(address="127.0.0.1", port=0, hostnames=hostnames)
        server = AdminServer(
            admin,
            metrics=RelayMetrics(),
            health=sources,
            header_timeout=header_timeout,
            idle_timeout=idle_timeout,
        )
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes (or resets) the connection within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def exchange(port: int, head: bytes) -> tuple[int, bytes]:
    """Send one raw request head, read until the server closes: (status, whole answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read(-1)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


def request(host: str | None, path: str = "/healthz", extra: str = "") -> bytes:
    host_line = "" if host is None else f"Host: {host}\r\n"
    return f"GET {path} HTTP/1.1\r\n{host_line}{extra}Connection: close\r\n\r\n".encode()


# --- timeouts ------------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_dropped_after_the_header_timeout(
    start_admin: Start,
) -> None:
    """Open, send nothing: closed once the header timeout has passed, and not before."""
    server = await start_admin(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    opened = time.monotonic()
    try:
        assert await closed_within(reader, 5.0)
    finally:
        writer.close()
    assert time.monotonic() - opened >= 0.45


async def test_a_slowloris_head_is_dropped_although_bytes_keep_coming(
    start_admin: Start,
) -> None:
    """One header byte every 50 ms does not keep the connection: each byte does not restart
    the clock, the head as a whole must arrive within the header timeout."""
    server = await start_admin(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    opened = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    sent = 0
    try:
        for byte in head:
            writer.write(bytes([byte]))
            sent += 1
            if await closed_within(reader, 0.05):  # the attacker's pace, and the check
                break
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    elapsed = time.monotonic() - opened
    assert sent < len(head), "the server waited for the whole trickled head"
    assert 0.45 <= elapsed < 3.0
    assert sent > 5  # it was receiving bytes when it gave up on the head


async def test_a_prompt_request_is_answered_and_may_keep_its_connection(
    start_admin: Start,
) -> None:
    """The timeouts do not touch an ordinary client: two requests on one connection."""
    server = await start_admin(header_timeout=0.5, idle_timeout=5.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                assert await reader.readexactly(3) == b"ok\n"
    finally:
        writer.close()


async def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(
    start_admin: Start,
) -> None:
    """After a response, a connection without a next request is closed at the idle timeout."""
    server = await start_admin(header_timeout=5.0, idle_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"ok\n")
        answered = time.monotonic()
        assert await closed_within(reader, 5.0)
    finally:
        writer.close()
    assert time.monotonic() - answered >= 0.45


async def test_the_next_head_on_a_kept_connection_has_the_header_timeout_too(
    start_admin: Start,
) -> None:
    """Trickling the second request on a kept-alive connection is cut at the header timeout,
    although the idle timeout is long."""
    server = await start_admin(header_timeout=0.5, idle_timeout=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"ok\n")
        writer.write(b"G")  # the first byte of the next head starts its clock
        started = time.monotonic()
        assert await closed_within(reader, 5.0)
    finally:
        writer.close()
    assert 0.45 <= time.monotonic() - started < 5.0


# --- the Host check ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:{port}",
        "localhost",
        "LocalHost.:{port}",
        "[::1]:{port}",
        "[::1]",
        "admin.relay.example",  # configured in admin.hostnames
        "Admin.Relay.Example:{port}",
    ],
)
async def test_the_host_check_accepts_this_servers_names(start_admin: Start, host: str) -> None:
    """The bind address, localhost, the loopback literals and admin.hostnames, any case and
    with or without a port, are answered."""
    server = await start_admin(hostnames=("admin.relay.example",))
    status, answer = await exchange(server.port, request(host.format(port=server.port)))
    assert status == 200
    assert answer.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/", "/nothing-here"])
@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example", "10.0.0.7"]
)
async def test_a_foreign_host_name_is_refused_with_421_on_every_path(
    start_admin: Start, host: str, path: str
) -> None:
    """DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 gets 421
    Misdirected Request and none of the server's content."""
    server = await start_admin(hostnames=("admin.relay.example",))
    status, answer = await exchange(server.port, request(host.format(port=server.port), path))
    assert status == 421
    assert b"smtp_graph_relay" not in answer
    assert b"<html" not in answer


@pytest.mark.parametrize(
    "head",
    [
        request(None),  # HTTP/1.1 without Host (RFC 9112 §3.2)
        request("127.0.0.1", extra="Host: localhost\r\n"),  # two Host fields
        request("127.0.0.1:abc"),  # not a port
        request("user@127.0.0.1"),
    ],
    ids=["missing", "twice", "bad-port", "userinfo"],
)
async def test_a_missing_or_malformed_host_is_refused_with_400(
    start_admin: Start, head: bytes
) -> None:
    """No single valid Host header: the request is malformed."""
    server = await start_admin()
    status, _ = await exchange(server.port, head)
    assert status == 400


async def test_a_refusal_closes_the_connection(start_admin: Start) -> None:
    """After a 421 the server does not wait for another request on that connection."""
    server = await start_admin(idle_timeout=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 421 ")
        assert await closed_within(reader, 2.0)
    finally:
        writer.close()
