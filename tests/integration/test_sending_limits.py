"""Exchange Online's sending limits end to end (issue #12): a real relay against the sandbox,
which enforces every limit and counts each violation. The relay keeps to the budgets, keeps
its recipient ledger across a restart, releases waiting mail on a raised budget (SIGHUP), and
answers a limit it ran into anyway with a pause, then delivery, never a DSN."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from pathlib import Path

import pytest

from relay.sandbox import Sandbox
from tests.conftest import MAILBOX, RelayFactory, asmtp_send, message
from tests.integration.test_cli import child_env, free_port, run_main, wait_for_line, write_config

OPS = "ops@contoso.com"
TWO = ("bob@partner.example", "carol@partner.example")


def budget_delivery(recipients_per_day: int) -> str:
    return (
        "{mode: queue, spool_dir: spool, retry: {first: 1m, max: 1h, lifetime: 5d}, "
        f"mailbox_limits: {{recipients_per_day: {recipients_per_day}, messages_per_minute: 1000}}}}"
    )


async def serve(path: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    assert process.stderr is not None
    await wait_for_line(process.stderr, "listening on")
    return process


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await process.wait()


async def test_a_recipient_budget_holds_across_a_restart_and_a_reload_releases_it(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """50 recipients a day, 30 two-recipient messages: 25 go, 5 wait with an ETA about a day
    away; a restart keeps them waiting (the ledger holds); SIGHUP with a raised budget sends
    them. The sandbox, enforcing 50, saw no violation."""
    sandbox.set_limits(recipients_per_day=50, messages_per_minute=1000)
    sandbox.add_mailbox(OPS)
    port = free_port()
    path = write_config(
        sandbox,
        tmp_path,
        listeners=f"[{{address: 127.0.0.1, port: {port}}}]",
        delivery=budget_delivery(50),
    )
    process = await serve(path)
    try:
        for n in range(30):
            sent = await asmtp_send(port, message(subject=f"invoice {n}"), recipients=TWO)
            assert sent.code == 250
        await sandbox.wait_for_mail(25, timeout=60)
        code, listing = await run_main("queue", "-c", str(path), "list")
        assert code == 0
        row = next(line for line in listing.splitlines() if line.startswith(MAILBOX.lower()))
        assert re.search(r"50/50\s+5\s+(2[0-4]h|1d)", row), listing
        await stop(process)
        process = await serve(path)
        # Proof that the restarted workers looked at the queue: mail of another mailbox, queued
        # behind the five, goes; the five (older, due) stay.
        assert (await asmtp_send(port, message(sender=OPS), sender=OPS)).code == 250
        await sandbox.wait_until(lambda: any(m.mailbox == OPS for m in sandbox.received), 30)
        assert len([m for m in sandbox.received if m.mailbox == MAILBOX.lower()]) == 25
        sandbox.set_limits(recipients_per_day=100)
        path.write_text(
            path.read_text().replace("recipients_per_day: 50", "recipients_per_day: 100")
        )
        assert process.stderr is not None
        process.send_signal(signal.SIGHUP)
        await wait_for_line(process.stderr, "configuration reloaded")
        await sandbox.wait_for_mail(31, timeout=60)
    finally:
        await stop(process)
    subjects = sorted(m.subject for m in sandbox.received if m.mailbox == MAILBOX.lower())
    assert subjects == sorted(f"invoice {n}" for n in range(30))  # each once
    assert sum(sandbox.violations.values()) == 0


async def test_hybrid_queues_instead_of_trying_inline_once_the_minute_is_spent(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    sandbox.set_limits(messages_per_minute=2)
    relay = await start_relay(
        delivery="{mode: hybrid, spool_dir: spool, mailbox_limits: {messages_per_minute: 2}}"
    )
    port = relay.listeners[0].port
    texts = [(await asmtp_send(port, message(subject=f"s{n}"))).text for n in range(4)]
    assert [t.split()[2] for t in texts] == ["delivered", "delivered", "queued", "queued"]
    assert len(sandbox.received) == 2
    assert sum(sandbox.violations.values()) == 0


async def test_a_limit_hit_anyway_pauses_the_mailbox_then_delivers_without_a_dsn(
    start_relay: RelayFactory, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay's budget is set too high (1000/min) for the mailbox's real one (the sandbox
    allows 3 per 2-second window): Exchange answers 429 ErrorExceededMessageLimit with
    Retry-After; the relay pauses the mailbox, logs it once, and delivers everything, each
    message once, with no DSN and no attempt counted."""
    caplog.set_level(logging.INFO, logger="relay")
    sandbox.set_limits(messages_per_minute=3, messages_window=2.0)
    relay = await start_relay(
        delivery=(
            "{mode: queue, spool_dir: spool, retry: {first: 1h, max: 1h, lifetime: 5d}, "
            "mailbox_limits: {messages_per_minute: 1000}}"
        )
    )
    port = relay.listeners[0].port
    for n in range(8):
        assert (await asmtp_send(port, message(subject=f"m{n}"))).code == 250
    await sandbox.wait_for_mail(8, timeout=60)
    assert sorted(m.subject for m in sandbox.received) == sorted(f"m{n}" for n in range(8))
    assert all(m.mailbox == MAILBOX.lower() and m.subject.startswith("m") for m in sandbox.received)
    assert sandbox.violations["messages_per_minute"] >= 1
    pauses = [r for r in caplog.records if getattr(r, "event", "") == "mailbox_paused"]
    assert pauses
    assert "ErrorExceededMessageLimit" in pauses[0].getMessage()
    assert "mailbox_limits" in pauses[0].getMessage()
    assert relay.store is not None
    assert await relay.store.list("dead") == []
