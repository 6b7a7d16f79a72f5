"""`smtp.max_data_memory` against the real relay: DATA waits for room, or gets 452 4.3.1.

Issue #11 item 3. The in-process tests hold part of the relay's own budget object
(`RelayService.data_memory`, the one every session reserves from) as another message would,
so "the budget is full" is a fact, not a race. The last test runs the relay as a process and
measures its peak RSS (VmHWM) while 12 connections send 30 MB each.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.crash_soak import RelayProcess
from relay.sandbox import Sandbox
from relay.service import RelayService
from relay.smtp.memory import COPIES, Reservation
from tests.conftest import MAILBOX, RelayFactory, SmtpOutcome, asmtp_send, message
from tests.integration.test_cli import free_port, write_config

NO_ROOM = SmtpOutcome(452, "4.3.1 insufficient system storage, try again")
MB = 1024 * 1024
BUDGET = "max_data_memory: 4MB\ndata_timeout: 1s"
BODY = ("x" * 998 + "\r\n") * 300  # ~300 KB


def port_of(relay: RelayService) -> int:
    return relay.listeners[0].port


def fill(relay: RelayService, leave: int = 0) -> Reservation:
    """Take all of the relay's DATA budget but `leave` bytes, as a message being received."""
    held = relay.data_memory.open()
    assert held.try_grow((relay.data_memory.limit - leave) // COPIES)
    return held


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_data_without_room_is_answered_452_after_data_timeout_and_a_resend_gets_250(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """While the budget is full the DATA waits; with no room within data_timeout (1 s) the
    rest is read without keeping it and answered 452 4.3.1. Nothing reached Graph. Once
    room is back, the client's resend gets 250."""
    relay = await start_relay(smtp_extra=BUDGET)
    held = fill(relay)
    assert await asmtp_send(port_of(relay), message(body=BODY)) == NO_ROOM
    assert sandbox.received == []
    held.release()
    assert (await asmtp_send(port_of(relay), message(body=BODY))).code == 250
    assert len(sandbox.received) == 1


async def test_data_waits_for_room_and_gets_250_when_room_comes(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """A DATA that finds the budget full waits (reading paused) instead of failing; when the
    other message releases its room the DATA finishes with 250."""
    relay = await start_relay(smtp_extra="max_data_memory: 4MB\ndata_timeout: 60s")
    held = fill(relay)
    sending = asyncio.create_task(asmtp_send(port_of(relay), message(body=BODY)))
    await until(lambda: relay.data_memory.waiting == 1)
    assert not sending.done()
    held.release()
    assert (await sending).code == 250
    await until(lambda: relay.data_memory.reserved == 0)


def send_declared(port: int, data: bytes) -> tuple[int, bytes]:
    """MAIL FROM with SIZE= (RFC 1870), then DATA: the reply to DATA itself."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("device.test")
        assert client.mail(MAILBOX, [f"SIZE={len(data)}"])[0] == 250
        assert client.rcpt("bob@partner.example")[0] == 250
        return client.docmd("DATA")


async def test_a_declared_size_without_room_is_refused_before_354(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """A message that declared its size reserves all of it before 354: without room within
    data_timeout the DATA command itself gets 452 4.3.1 and no byte is sent."""
    relay = await start_relay(smtp_extra=BUDGET)
    held = fill(relay, leave=100_000)
    reply = await asyncio.to_thread(send_declared, port_of(relay), message(body=BODY))
    assert reply == (452, b"4.3.1 insufficient system storage, try again")
    held.release()


async def test_a_hang_up_during_data_gives_the_room_back(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    relay = await start_relay(smtp_extra=BUDGET)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
    for line in (b"EHLO device.test", f"MAIL FROM:<{MAILBOX}>".encode(), b"RCPT TO:<b@x.example>"):
        writer.write(line + b"\r\n")
    writer.write(b"DATA\r\n" + BODY.encode())
    await writer.drain()
    await until(lambda: relay.data_memory.reserved > 0)
    writer.close()
    await until(lambda: relay.data_memory.reserved == 0)
    assert sandbox.received == []


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


SIZE_30MB = 30 * 1000 * 1000


def thirty_mb(n: int) -> bytes:
    line = b"y" * 998 + b"\r\n"
    body = line * (SIZE_30MB // len(line))
    return message(subject=f"big {n}").replace(b"Scanned document attached.\r\n", b"") + body


def send_until_accepted(port: int, data: bytes, declare: bool) -> list[int]:
    """Send `data`; after each 452 send it again (as an MTA would). The replies, in order."""
    replies: list[int] = []
    while not replies or replies[-1] == 452:
        assert len(replies) < 40, replies
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
            client.ehlo("device.test")
            options = [f"SIZE={len(data)}"] if declare else []
            assert client.mail(MAILBOX, options)[0] == 250
            assert client.rcpt("bob@partner.example")[0] == 250
            try:
                code, _ = client.data(data)
            except smtplib.SMTPDataError as refused:  # 452 to DATA itself (declared size)
                code = refused.smtp_code
            replies.append(code)
    return replies


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_12_concurrent_30mb_messages_stay_within_the_budget(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """12 connections send 30 MB each to a relay process with max_data_memory: 128MB (half
    of them declare SIZE=, half do not). Every reply is 250 or 452, every 452 is resent until
    it gets 250, and the relay's peak RSS stays under its idle peak + 2 x 128 MB.

    Delivery is `queue` to a Graph held by the sandbox, so the messages wait in the spool
    and the figure is what SMTP reception costs.
    """
    port, spool = free_port(), tmp_path / "spool"
    config = write_config(
        sandbox,
        tmp_path,
        listeners=f"[{{address: 127.0.0.1, port: {port}}}]",
        smtp_extra="max_data_memory: 128MB\ndata_timeout: 120s",
        delivery=f"{{mode: queue, spool_dir: {spool}, bounces: false}}",
    )
    sandbox.faults.hold_graph()
    relay = RelayProcess(config)
    await relay.start()
    try:
        assert relay.process is not None
        pid = relay.process.pid
        messages = [thirty_mb(n) for n in range(12)]
        idle = vm_hwm(pid)
        results = await asyncio.gather(
            *(
                asyncio.to_thread(send_until_accepted, port, data, n % 2 == 0)
                for n, data in enumerate(messages)
            )
        )
        peak = vm_hwm(pid)
    finally:
        sandbox.faults.release_graph()
        await relay.terminate(timeout=60)
    print(f"\nidle {idle / MB:.0f} MiB, peak {peak / MB:.0f} MiB, replies {results}")
    assert all(set(r) <= {250, 452} and r[-1] == 250 for r in results), results
    assert peak < idle + 2 * 128 * MB, (idle, peak)
