"""The queue tools against a running relay under load: a real relay in queue mode delivers to the
sandbox's Graph (slow, or held so that mail piles up) while a client keeps sending over real
SMTP, and the operator runs hold, release, retry, delete, pause and resume from the CLI
(`main(argv)` in a thread: another store instance, no lock, exactly as a second process).
Every message accepted is delivered exactly once, unless deleted; held ones not before their
release, a paused mailbox's not before its resume. Conditions are waited on, never slept for."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.sandbox import Sandbox
from relay.service import RelayService
from relay.store.protocol import mailbox_key
from tests.conftest import MAILBOX, RelayFactory, asmtp_send, message
from tests.integration.test_cli import run_main, write_config

ALERTS = "alerts@contoso.com"
# Deferred mail would come back only after an hour: what is delivered early was retried by hand.
DELIVERY = "{mode: queue, spool_dir: spool, retry: {first: 1h, max: 1h, lifetime: 5d}}"
RESCAN = 0.2


async def until(condition: Callable[[], Awaitable[bool] | bool], within: float = 30.0) -> None:
    """Poll `condition` (plain or async) until it holds; fail after `within` seconds. For the
    spool and the sandbox's journal seen together, which have no single event to wait on."""
    async with asyncio.timeout(within):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


class Operator:
    """The `queue` CLI pointed at the running relay's spool."""

    def __init__(self, config: Path) -> None:
        self.config = config

    async def __call__(self, *argv: str) -> tuple[int, str]:
        return await run_main("queue", "-c", str(self.config), *argv)

    async def states(self) -> dict[str, str]:
        code, output = await self("list", "--json")
        assert code == 0
        return {item["queue_id"]: item["state"] for item in json.loads(output)}


async def started(start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path) -> RelayService:
    sandbox.add_mailbox(ALERTS)
    return await start_relay(delivery=DELIVERY, rescan_seconds=RESCAN)


def subjects(sandbox: Sandbox) -> Counter[str]:
    return Counter(mail.subject for mail in sandbox.received)


async def send(port: int, sender: str, subject: str) -> str:
    """One message over SMTP; the queue id the relay answered 250 with."""
    outcome = await asmtp_send(port, message(sender=sender, subject=subject), sender=sender)
    assert outcome.code == 250, outcome
    return outcome.text.rsplit(" ", 1)[-1]


async def test_hold_release_delete_pause_resume_while_the_client_keeps_sending(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    relay = await started(start_relay, sandbox, tmp_path)
    assert relay.store is not None
    port = relay.listeners[0].port
    cli = Operator(write_config(sandbox, tmp_path, delivery=DELIVERY))

    # A paused mailbox: the relay takes the pause in at its next rescan.
    assert (await cli("pause", ALERTS))[0] == 0
    paused = mailbox_key("contoso", ALERTS)
    store = relay.store

    async def relay_sees_the_pause() -> bool:
        return paused in await store.paused_mailboxes()

    await until(relay_sees_the_pause)

    # Graph holds every request: scanner mail piles up (a few in flight, the rest queued).
    sandbox.faults.hold_graph()
    sent: dict[str, str] = {}  # queue id -> subject

    async def client() -> None:
        for n in range(16):
            sender = MAILBOX if n % 2 == 0 else ALERTS
            subject = f"load-{n:02d}"
            sent[await send(port, sender, subject)] = subject

    sending = asyncio.create_task(client())
    await until(lambda: len(sent) >= 6)
    assert (await cli("hold", "--all"))[0] == 0  # while the client is still sending
    await sending
    states = await cli.states()
    held = {qid for qid, state in states.items() if state == "hold"}
    active = [qid for qid, state in states.items() if state == "active"]
    assert held, states
    assert active, states  # Graph holds them: in delivery right now
    code, output = await cli("hold", active[0].lower())
    assert code == 1
    assert "being delivered right now" in output

    doomed = sorted(held)[0]
    assert (await cli("delete", doomed)) == (0, f"{doomed}: deleted (was hold)\n")
    sandbox.faults.release_graph()

    # Everything from the scanner that is not held arrives; nothing held, nothing paused.
    def free_scanner() -> set[str]:
        return {sent[qid] for qid in sent if qid not in held and int(sent[qid][-2:]) % 2 == 0}

    await until(lambda: set(subjects(sandbox)) >= free_scanner())
    await until(lambda: _settled(relay))
    got = subjects(sandbox)
    assert not {sent[qid] for qid in held} & set(got)
    assert all(int(subject[-2:]) % 2 == 0 for subject in got)  # no alerts mail: paused
    assert {qid for qid, s in (await cli.states()).items() if s == "hold"} == held - {doomed}

    # Released: the held scanner mail goes out; the alerts mail is still paused.
    assert (await cli("release", "--all"))[0] == 0
    scanner_all = {s for qid, s in sent.items() if qid != doomed and int(s[-2:]) % 2 == 0}
    await until(lambda: set(subjects(sandbox)) >= scanner_all)
    await until(lambda: _settled(relay))
    assert set(subjects(sandbox)) == scanner_all

    # Resumed: the alerts mail goes out too. Every accepted message once, the deleted one never.
    assert (await cli("resume", ALERTS))[0] == 0
    expected = {s for qid, s in sent.items() if qid != doomed}
    await until(lambda: set(subjects(sandbox)) >= expected)
    await until(lambda: _settled(relay, empty=True))
    assert subjects(sandbox) == Counter(expected)
    assert (await cli.states()) == {}


async def _settled(relay: RelayService, *, empty: bool = False) -> bool:
    """Nothing in delivery (and, with `empty`, nothing waiting) in the relay's own index."""
    assert relay.store is not None
    stats = await relay.store.stats(time.time())
    return stats.active == 0 and (not empty or stats.queued + stats.held == 0)


async def test_retry_delivers_a_deferred_message_now_beside_new_mail(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A 503 defers a message for an hour; `queue retry ID` gets it out within one rescan while
    new mail keeps flowing; retry --mailbox does the same for a whole mailbox."""
    relay = await started(start_relay, sandbox, tmp_path)
    port = relay.listeners[0].port
    cli = Operator(write_config(sandbox, tmp_path, delivery=DELIVERY))
    sandbox.faults.fail_graph(503, "ServiceUnavailable", times=2)
    first = await send(port, MAILBOX, "deferred-1")
    second = await send(port, ALERTS, "deferred-2")

    async def both_deferred() -> bool:
        states = await cli.states()
        return states.get(first) == states.get(second) == "queue"

    await until(both_deferred)
    assert sandbox.received == []
    for n in range(3):
        await send(port, MAILBOX, f"new-{n}")
    assert (await cli("retry", first.lower()))[0] == 0
    await until(lambda: {"deferred-1", "new-0", "new-1", "new-2"} <= set(subjects(sandbox)))
    assert "deferred-2" not in subjects(sandbox)
    assert (await cli("retry", "--mailbox", ALERTS)) == (
        0,
        "1 message(s) queued for immediate delivery\n",
    )
    await until(lambda: "deferred-2" in subjects(sandbox))
    await until(lambda: _settled(relay, empty=True))
    assert subjects(sandbox) == Counter(["deferred-1", "deferred-2", "new-0", "new-1", "new-2"])


HYBRID = "{mode: hybrid, inline_timeout: 5s, spool_dir: spool}"


async def test_a_paused_mailbox_gets_no_inline_attempt_in_hybrid_mode(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Hybrid's inline attempt respects a pause too: the client hears 'queued', the mail waits
    in the spool until resume, and the other mailbox is still delivered inline."""
    sandbox.add_mailbox(ALERTS)
    relay = await start_relay(delivery=HYBRID, rescan_seconds=RESCAN)
    assert relay.store is not None
    store, port = relay.store, relay.listeners[0].port
    cli = Operator(write_config(sandbox, tmp_path, delivery=HYBRID))
    assert (await cli("pause", MAILBOX))[0] == 0

    async def relay_sees_the_pause() -> bool:
        return mailbox_key("contoso", MAILBOX) in await store.paused_mailboxes()

    await until(relay_sees_the_pause)
    waiting = await asmtp_send(port, message(subject="paused"))
    assert (waiting.code, waiting.text.split()[1]) == (250, "Ok:"), waiting
    assert "queued" in waiting.text
    flowing = await asmtp_send(port, message(sender=ALERTS, subject="flowing"), sender=ALERTS)
    assert flowing.code == 250
    assert "delivered" in flowing.text
    assert set(subjects(sandbox)) == {"flowing"}
    assert list((await cli.states()).values()) == ["queue"]
    assert (await cli("resume", MAILBOX))[0] == 0
    await until(lambda: "paused" in subjects(sandbox))
    await until(lambda: _settled(relay, empty=True))
    assert subjects(sandbox) == Counter(["flowing", "paused"])
