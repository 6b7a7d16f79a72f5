"""Hosts that are not clients cannot take the connection slots clients need (issue #11 item 4).

Raw sockets bound to 127.0.0.2 and 127.0.0.3 play the outsiders; the one client is
127.0.0.1/32. The relay is the real one (aiosmtpd listener, policy, sandbox Graph).
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from argon2 import PasswordHasher

from relay.service import RelayService
from relay.smtp.auth import hash_password
from relay.smtp.connections import ConnectionLimiter
from tests.conftest import MAILBOX, RelayFactory, TlsFiles, asmtp_send, message

TIMEOUT = 30.0
NOT_A_CLIENT = b"554 5.7.1 Relay access denied: not an allowed client\r\n"
AUTH_LISTENER = "[{address: 127.0.0.1, port: 0, tls: starttls, auth: optional}]"


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def line(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.readline()

    async def command(self, text: str) -> bytes:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()
        while True:
            line = await self.line()
            if line[3:4] != b"-":
                return line

    async def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionResetError):
                return await self.reader.read()
        return b""


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Awaitable[Raw]]]:
    opened: list[Raw] = []

    async def open_from(port: int, source: str) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        raw = Raw(reader, writer)
        opened.append(raw)
        return raw

    yield open_from
    for raw in opened:
        raw.writer.close()
        with contextlib.suppress(ConnectionError):
            await raw.writer.wait_closed()


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def port_of(relay: RelayService) -> int:
    return relay.listeners[0].port


async def test_outsiders_by_the_dozen_do_not_lock_the_client_out(
    start_relay: RelayFactory, connect: Callable[..., Awaitable[Raw]]
) -> None:
    """2 outsider addresses x 12 connections, kept open from their side, against
    max_connections 4: each gets 554 5.7.1 instead of a greeting and is closed, and the real
    client (127.0.0.1) still gets its message through."""
    relay = await start_relay(smtp_extra="max_connections: 4\nmax_connections_per_client: 3")
    outsiders = [await connect(port_of(relay), f"127.0.0.{2 + n % 2}") for n in range(24)]
    for raw in outsiders:
        assert await raw.rest() == NOT_A_CLIENT
    assert relay.limiter.open_connections == 0
    assert (await asmtp_send(port_of(relay), message())).code == 250


async def test_outsiders_are_counted_apart_and_past_their_budget_get_no_reply(
    start_relay: RelayFactory, connect: Callable[..., Awaitable[Raw]]
) -> None:
    """While refused, an outsider takes one of the outsiders' slots, never a client's; with
    that budget spent, the connection is closed without even a reply."""
    relay = await start_relay()
    relay.limiter.outsiders = 0
    raw = await connect(port_of(relay), "127.0.0.2")
    assert await raw.rest() == b""
    relay.limiter.outsiders = 1
    raw = await connect(port_of(relay), "127.0.0.3")
    assert await raw.rest() == NOT_A_CLIENT
    await until(lambda: relay.limiter.outsiders_open == 0)
    assert relay.limiter.open_connections == 0


async def test_an_outsider_may_connect_to_an_auth_listener_to_log_in(
    start_relay: RelayFactory, connect: Callable[..., Awaitable[Raw]]
) -> None:
    """On an AUTH listener an unknown address may still authenticate, so it is greeted."""
    relay = await start_relay(tls=True, listeners=AUTH_LISTENER)
    raw = await connect(port_of(relay), "127.0.0.2")
    assert (await raw.line()).startswith(b"220 ")
    assert (await raw.command("EHLO device.test")).startswith(b"250 ")


async def test_the_third_refused_command_closes_the_session(
    start_relay: RelayFactory, connect: Callable[..., Awaitable[Raw]]
) -> None:
    """After 550 for relay access, one more command is answered; the third refused one gets
    421 4.7.0 and the connection is closed, so NOOP cannot keep a refused client's slot."""
    relay = await start_relay(tls=True, listeners=AUTH_LISTENER)
    raw = await connect(port_of(relay), "127.0.0.2")
    assert (await raw.line()).startswith(b"220 ")
    assert (await raw.command("EHLO device.test")).startswith(b"250 ")
    assert await raw.command(f"MAIL FROM:<{MAILBOX}>") == (
        b"550 5.7.1 Relay access denied: 127.0.0.2 is not an allowed client\r\n"
    )
    assert (await raw.command("NOOP")).startswith(b"250 ")
    assert await raw.command("NOOP") == (
        b"421 4.7.0 Too many refused commands, closing connection\r\n"
    )
    assert await raw.rest() == b""
    await until(lambda: relay.limiter.open_connections == 0)


async def test_a_client_without_refusals_may_noop_as_it_likes(
    start_relay: RelayFactory, connect: Callable[..., Awaitable[Raw]]
) -> None:
    """The refused-command count is for refused sessions only."""
    relay = await start_relay()
    raw = await connect(port_of(relay), "127.0.0.1")
    assert (await raw.line()).startswith(b"220 ")
    assert (await raw.command("EHLO device.test")).startswith(b"250 ")
    for _ in range(5):
        assert (await raw.command("NOOP")).startswith(b"250 ")
    assert (await raw.command(f"MAIL FROM:<{MAILBOX}>")).startswith(b"250 ")


def test_ipv6_clients_are_counted_per_64() -> None:
    """Every address of one /64 is one client for max_connections_per_client; the next /64
    is another client."""
    limiter = ConnectionLimiter(total=100, per_client=2)
    assert limiter.try_acquire("2001:db8::1")
    assert limiter.try_acquire("2001:db8::2")
    assert not limiter.try_acquire("2001:db8::ffff:1")
    assert limiter.try_acquire("2001:db8:0:1::1")
    limiter.release("2001:db8::2")
    assert limiter.try_acquire("2001:db8::abcd")
    assert limiter.open_from("2001:db8::9") == 2


def test_ipv4_clients_are_counted_per_address() -> None:
    limiter = ConnectionLimiter(total=100, per_client=1)
    assert limiter.try_acquire("192.0.2.1")
    assert limiter.try_acquire("192.0.2.2")
    assert not limiter.try_acquire("192.0.2.1")


def test_the_outsiders_budget_is_separate_from_the_clients() -> None:
    limiter = ConnectionLimiter(total=1, per_client=1, outsiders=2)
    assert limiter.try_acquire_outsider()
    assert limiter.try_acquire_outsider()
    assert not limiter.try_acquire_outsider()
    assert limiter.try_acquire("192.0.2.1")  # the client's slot is still free
    limiter.release_outsider()
    assert limiter.try_acquire_outsider()


async def test_a_refused_session_may_still_starttls_and_log_in(
    start_relay: RelayFactory, relay_tls: TlsFiles
) -> None:
    """AUTH, STARTTLS and the EHLO that follows STARTTLS do not count as refused commands:
    a client that forgot to log in can still do so after its 550, and is then a client."""
    password = "Correct-Horse-Battery-7"
    hashed = hash_password(password, PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    clients = (
        "- {name: local, networks: [127.0.0.1/32], senders: ['*@contoso.com']}\n"
        f"- {{name: erp, username: erp, password_hash: '{hashed}', senders: ['*@contoso.com']}}\n"
    )
    relay = await start_relay(tls=True, listeners=AUTH_LISTENER, clients=clients)

    def scenario() -> list[int]:
        with smtplib.SMTP(
            "127.0.0.1", port_of(relay), source_address=("127.0.0.2", 0), timeout=30
        ) as client:
            client.ehlo("device.test")
            codes = [client.mail(MAILBOX)[0]]
            client.starttls(context=relay_tls.client_context())
            client.ehlo("device.test")
            client.login("erp", password)
            codes += [client.noop()[0] for _ in range(3)]
            codes.append(client.mail(MAILBOX)[0])
            return codes

    assert await asyncio.to_thread(scenario) == [550, 250, 250, 250, 250]
