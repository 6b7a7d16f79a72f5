"""The sd_notify protocol as systemd receives it: real AF_UNIX datagram sockets, no mocks.

Each test binds the socket systemd would own, points $NOTIFY_SOCKET at it and reads the
datagrams the relay sends. Waiting is always "until a datagram arrives, bounded by a timeout",
never a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ops.systemd import MAX_STATUS_BYTES, SystemdNotifier, run_watchdog

WAIT = 5.0  # upper bound for anything that should happen at once; never reached when green
FAST_WATCHDOG_USEC = "20000"  # WatchdogSec=20ms: a ping every 10 ms


class Manager:
    """The service manager's end: a bound datagram socket that we read."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting (sending is synchronous)."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return messages

    async def receive(self) -> str:
        """The next datagram, waiting for it at most WAIT seconds."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), WAIT)
        return data.decode()


def time_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _bind(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture
def short_tmp(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, unless it is too long for sun_path (108 bytes); then a short temporary dir."""
    if len(os.fsencode(tmp_path / "notify")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="sdn-") as short:
        yield Path(short)


@pytest.fixture
def manager(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    path = str(short_tmp / "notify")
    sock = _bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield Manager(sock, path)
    sock.close()


@pytest.fixture
def notifier(manager: Manager) -> SystemdNotifier:
    return SystemdNotifier.from_environ()


def test_ready_sends_ready_and_status(manager: Manager, notifier: SystemdNotifier) -> None:
    """READY=1 and the status line travel in one datagram, as sd_notify(3) specifies."""
    notifier.ready("accepting mail on 0.0.0.0:25")
    assert manager.pending() == ["READY=1\nSTATUS=accepting mail on 0.0.0.0:25"]


def test_status_sends_only_status(manager: Manager, notifier: SystemdNotifier) -> None:
    notifier.status("3 queued, oldest 2m")
    assert manager.pending() == ["STATUS=3 queued, oldest 2m"]


def test_stopping_sends_stopping_and_status(manager: Manager, notifier: SystemdNotifier) -> None:
    notifier.stopping("finishing 2 deliveries")
    assert manager.pending() == ["STOPPING=1\nSTATUS=finishing 2 deliveries"]


def test_reloading_carries_the_monotonic_time_then_ready_ends_it(manager: Manager) -> None:
    """systemd 253+ (Type=notify-reload) matches RELOADING=1 by its MONOTONIC_USEC=."""
    notifier = SystemdNotifier(manager.notify_socket, monotonic_usec=lambda: 123456789)
    notifier.reloading("reloading configuration")
    notifier.ready("configuration reloaded")
    assert manager.pending() == [
        "RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=reloading configuration",
        "READY=1\nSTATUS=configuration reloaded",
    ]


def test_reloading_uses_clock_monotonic_in_microseconds(
    manager: Manager, notifier: SystemdNotifier
) -> None:
    before = time_usec()
    notifier.reloading()
    after = time_usec()
    [message] = manager.pending()
    first, second = message.split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        ("line one\nline two", "line one line two"),
        ("carriage\r\nreturn", "carriage  return"),
        ("nul\0and\ttab", "nul and tab"),
        ("  padded  \n", "padded"),
    ],
)
def test_status_text_is_one_line(
    manager: Manager, notifier: SystemdNotifier, text: str, sent: str
) -> None:
    """A newline would end STATUS= and smuggle in another assignment (say READY=1)."""
    notifier.status(text)
    assert manager.pending() == [f"STATUS={sent}"]


def test_status_smuggling_another_assignment_is_neutralised(
    manager: Manager, notifier: SystemdNotifier
) -> None:
    notifier.status("error from Graph\nREADY=1")
    [message] = manager.pending()
    assert message.split("\n") == ["STATUS=error from Graph READY=1"]


def test_long_status_is_capped_on_a_character_boundary(
    manager: Manager, notifier: SystemdNotifier
) -> None:
    notifier.status("é" * MAX_STATUS_BYTES)
    [message] = manager.pending()
    text = message.removeprefix("STATUS=")
    assert len(text.encode()) <= MAX_STATUS_BYTES
    assert set(text) == {"é"}


def test_watchdog_ping_when_watchdog_usec_is_ours(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environ()
    assert notifier.watchdog_interval == 15.0
    notifier.watchdog()
    assert manager.pending() == ["WATCHDOG=1"]


def test_watchdog_without_watchdog_pid_applies_to_us(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert SystemdNotifier.from_environ().watchdog_interval == 15.0


def test_watchdog_pid_of_another_process_disables_the_watchdog(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """We inherited the variables from the process systemd supervises: not our watchdog."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = SystemdNotifier.from_environ()
    assert notifier.watchdog_interval is None
    notifier.watchdog()
    notifier.ready("still notifies readiness")
    assert manager.pending() == ["READY=1\nSTATUS=still notifies readiness"]


@pytest.mark.parametrize("value", ["0", "-5", "thirty", ""])
def test_invalid_watchdog_usec_disables_the_watchdog(
    manager: Manager, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", value)
    assert SystemdNotifier.from_environ().watchdog_interval is None


def test_without_notify_socket_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside systemd `serve` behaves the same: nothing sent, nothing logged, no watchdog."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = SystemdNotifier.from_environ()
    with caplog.at_level(logging.DEBUG, logger="relay.systemd"):
        notifier.ready("x")
        notifier.status("x")
        notifier.reloading("x")
        notifier.stopping("x")
        notifier.watchdog()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert caplog.records == []


def test_empty_notify_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": ""})
    assert not notifier.enabled
    notifier.ready("x")


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name means the abstract socket "\\0name" (no file on disk)."""
    name = f"smtp-graph-relay-test-{uuid.uuid4().hex}"
    sock = _bind(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        notifier = SystemdNotifier.from_environ()
        notifier.ready("abstract")
        assert Manager(sock, f"@{name}").pending() == ["READY=1\nSTATUS=abstract"]
    finally:
        sock.close()


def test_a_missing_socket_never_raises_and_is_logged_once(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd gone (or the socket removed) must never stop the relay or flood its log."""
    notifier = SystemdNotifier(str(short_tmp / "gone"), watchdog_usec=30_000_000)
    with caplog.at_level(logging.WARNING, logger="relay.systemd"):
        notifier.ready("x")
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping("x")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [getattr(r, "event", None) for r in warnings] == ["systemd_notify_failed"]


def test_logging_resumes_after_the_manager_comes_back(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_tmp / "later"
    notifier = SystemdNotifier(str(path))
    with caplog.at_level(logging.INFO, logger="relay.systemd"):
        notifier.status("lost")
        sock = _bind(str(path))
        try:
            notifier.status("delivered")
            assert Manager(sock, str(path)).pending() == ["STATUS=delivered"]
        finally:
            sock.close()
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events == ["systemd_notify_failed", "systemd_notify_ok"]


def test_a_full_manager_queue_never_blocks(manager: Manager, notifier: SystemdNotifier) -> None:
    """Nobody reads the socket: sends fail with EAGAIN at once instead of blocking the loop."""
    # Far more than the kernel queues for an AF_UNIX datagram socket (net.unix.max_dgram_qlen).
    for i in range(2000):
        notifier.status(f"update {i}")
    assert 0 < len(manager.pending()) < 2000


def test_unsupported_notify_socket_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.systemd"):
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    notifier.ready("x")
    assert not notifier.enabled
    assert [getattr(r, "event", None) for r in caplog.records] == ["systemd_notify_unsupported"]


# --- run_watchdog --------------------------------------------------------------------------


@pytest.fixture
def fast_watchdog(manager: Manager, monkeypatch: pytest.MonkeyPatch) -> SystemdNotifier:
    monkeypatch.setenv("WATCHDOG_USEC", FAST_WATCHDOG_USEC)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environ()
    assert notifier.watchdog_interval == pytest.approx(0.01)
    return notifier


async def test_run_watchdog_pings_repeatedly_while_healthy(
    manager: Manager, fast_watchdog: SystemdNotifier
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_watchdog(fast_watchdog, lambda: True, stop))
    try:
        pings = [await manager.receive() for _ in range(5)]
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)
    assert pings == ["WATCHDOG=1"] * 5


async def test_run_watchdog_pings_exactly_when_healthy(
    manager: Manager, fast_watchdog: SystemdNotifier
) -> None:
    """Unhealthy checks skip their ping (systemd restarts us after WatchdogSec=); recovery
    resumes them. The health answers are scripted, so the count is exact, not timing-based."""
    answers = [True, True, False, False, False, True]
    stop = asyncio.Event()

    async def healthy() -> bool:
        answer = answers.pop(0)
        if not answers:
            stop.set()
        return answer

    await asyncio.wait_for(run_watchdog(fast_watchdog, healthy, stop), WAIT)
    assert manager.pending() == ["WATCHDOG=1"] * 3


async def test_run_watchdog_logs_skipped_pings(
    manager: Manager, fast_watchdog: SystemdNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    answers = [False, True]
    stop = asyncio.Event()

    def healthy() -> bool:
        answer = answers.pop(0)
        if not answers:
            stop.set()
        return answer

    with caplog.at_level(logging.INFO, logger="relay.systemd"):
        await asyncio.wait_for(run_watchdog(fast_watchdog, healthy, stop), WAIT)
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events == ["watchdog_started", "watchdog_skipped", "watchdog_ok"]


async def test_a_failing_health_check_counts_as_unhealthy(
    manager: Manager, fast_watchdog: SystemdNotifier
) -> None:
    calls = 0
    stop = asyncio.Event()

    def healthy() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            stop.set()
        raise RuntimeError("queue runner died")

    await asyncio.wait_for(run_watchdog(fast_watchdog, healthy, stop), WAIT)
    assert calls == 3
    assert manager.pending() == []


async def test_a_health_check_that_hangs_counts_as_unhealthy(
    manager: Manager, fast_watchdog: SystemdNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    """A check slower than one ping interval must not hold back the verdict forever."""
    calls = 0
    stop = asyncio.Event()

    async def healthy() -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            stop.set()
        await asyncio.Event().wait()  # never answers
        return True

    with caplog.at_level(logging.WARNING, logger="relay.systemd"):
        await asyncio.wait_for(run_watchdog(fast_watchdog, healthy, stop), WAIT)
    assert calls == 2
    assert manager.pending() == []
    events = {getattr(r, "event", None) for r in caplog.records}
    assert events == {"watchdog_health_timeout", "watchdog_skipped"}


async def test_run_watchdog_returns_at_once_without_a_watchdog(manager: Manager) -> None:
    notifier = SystemdNotifier(manager.notify_socket, watchdog_usec=None)
    await asyncio.wait_for(run_watchdog(notifier, lambda: True, asyncio.Event()), WAIT)
    assert manager.pending() == []


async def test_run_watchdog_stops_promptly_when_asked(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WatchdogSec=1h the next ping is 30 min away; stop must not wait for it."""
    notifier = SystemdNotifier(manager.notify_socket, watchdog_usec=3600 * 1_000_000)
    stop = asyncio.Event()
    task = asyncio.create_task(run_watchdog(notifier, lambda: True, stop))
    assert await manager.receive() == "WATCHDOG=1"  # the first ping goes out at once
    stop.set()
    await asyncio.wait_for(task, WAIT)
