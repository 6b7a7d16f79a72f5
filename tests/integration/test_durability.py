"""Delivery modes with the durable spool (DESIGN §5, §6), in-process over real sockets:
hybrid and queue replies, workers retrying with Retry-After and backoff, the per-mailbox limit
under a 429 storm, token outages, expiry and permanent failures with bounces, back-pressure
when the spool cannot be written, corrupt entries, and a client that hangs up mid-attempt."""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.core.values import EntryMeta
from relay.sandbox import Sandbox
from relay.service import RelayService
from relay.store.files.spool import Spool
from tests.conftest import MAILBOX, RelayFactory, asmtp_send, message

QUEUE = "{mode: queue, spool_dir: spool, retry: {first: 200ms, max: 1s, lifetime: 1h}}"
HYBRID = (
    "{mode: hybrid, inline_timeout: 5s, spool_dir: spool, "
    "retry: {first: 200ms, max: 1s, lifetime: 1h}}"
)


async def eventually(check: Callable[[], bool], within: float = 15.0) -> None:
    """Wait until `check()` holds, looking every 20 ms; fail after `within` seconds.

    For spool state, which has no event to wait on; the relay's own events are awaited directly.
    """
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polling a file-system condition with a deadline
            await asyncio.sleep(0.02)


def spool_of(relay: RelayService) -> Spool:
    assert relay.spool is not None
    return relay.spool


def port_of(relay: RelayService) -> int:
    return relay.listeners[0].port


def outside_entry(queue_id: str) -> EntryMeta:
    """Metadata for a message put into the spool behind the relay's back (as the CLI might)."""
    return EntryMeta(
        queue_id=queue_id,
        created=time.time(),
        mail_from=MAILBOX,
        recipients=("bob@partner.example",),
        client="local",
        client_ip="127.0.0.1",
        auth_object="contoso",
        mailbox=MAILBOX,
        route="routes[0]",
        message_id=f"<{queue_id.lower()}@relay.test>",
        size=len(message()),
    )


def queue_id_of(text: str) -> str:
    return text.rsplit(" ", 1)[-1]


async def test_hybrid_answers_delivered_after_graphs_202(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Hybrid: durable first, then inline; 202 -> '250 ... delivered' and the spool is empty."""
    relay = await start_relay(delivery=HYBRID)
    outcome = await asmtp_send(port_of(relay), message())
    assert outcome.code == 250
    assert outcome.text.startswith("2.0.0 Ok: delivered ")
    assert len(sandbox.received) == 1
    stats = spool_of(relay).stats(time.time())
    assert (stats.queued, stats.active, stats.dead) == (0, 0, 0)


async def test_hybrid_transient_failure_is_queued_then_delivered_by_a_worker(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Graph 503 inline -> '250 ... queued'; a worker delivers it after the backoff."""
    relay = await start_relay(delivery=HYBRID)
    sandbox.faults.fail_graph(503, "ServiceUnavailable", "busy")
    outcome = await asmtp_send(port_of(relay), message(subject="later"))
    assert outcome.code == 250
    assert outcome.text.startswith("2.0.0 Ok: queued ")
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.subject == "later"
    await eventually(lambda: spool_of(relay).stats(time.time()).queued == 0)


async def test_hybrid_permanent_refusal_is_the_clients_5xx_and_nothing_is_kept(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """A refusal while the client waits is its 5xx; no dead letter, no bounce."""
    relay = await start_relay(delivery=HYBRID)
    sandbox.faults.fail_graph(404, "ErrorInvalidUser", "no such user")
    outcome = await asmtp_send(port_of(relay), message())
    assert (outcome.code, outcome.text[:5]) == (550, "5.1.1")
    stats = spool_of(relay).stats(time.time())
    assert (stats.queued, stats.active, stats.dead) == (0, 0, 0)
    assert sandbox.graph_requests == 1


async def test_hybrid_slow_graph_is_queued_and_delivered_exactly_once(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Past inline_timeout the client hears 'queued'; the same attempt finishes, no resend."""
    relay = await start_relay(
        delivery=HYBRID.replace("inline_timeout: 5s", "inline_timeout: 200ms")
    )
    sandbox.faults.hold_graph()
    outcome = await asmtp_send(port_of(relay), message())
    assert outcome.text.startswith("2.0.0 Ok: queued ")
    sandbox.faults.release_graph()
    await sandbox.wait_for_mail(1)
    await eventually(lambda: relay.delivery.in_flight == 0)
    assert sandbox.graph_requests == 1
    assert spool_of(relay).stats(time.time()).queued == 0


async def test_queue_mode_answers_at_once_and_delivers_in_the_background(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Queue: '250 ... queued' as soon as the spool has it, then a worker delivers."""
    relay = await start_relay(delivery=QUEUE)
    sandbox.faults.hold_graph()
    outcome = await asmtp_send(port_of(relay), message())
    assert outcome.text.startswith("2.0.0 Ok: queued ")
    sandbox.faults.release_graph()
    assert len(await sandbox.wait_for_mail(1)) == 1


async def test_retry_after_is_honoured(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """429 with Retry-After: 2 -> the next attempt is not earlier than 2 s later."""
    relay = await start_relay(delivery=QUEUE)
    sandbox.faults.fail_graph(429, "ApplicationThrottled", "slow down", retry_after="2")
    await asmtp_send(port_of(relay), message())
    await eventually(lambda: sandbox.graph_requests == 1)
    throttled_at = time.time()
    [mail] = await sandbox.wait_for_mail(1, timeout=15)
    assert mail.received_at - throttled_at >= 1.9


async def test_a_429_storm_never_exceeds_four_requests_per_mailbox(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Twelve queued messages to one mailbox under repeated 429s: at most 4 in flight, all go."""
    relay = await start_relay(delivery=QUEUE)
    sandbox.faults.graph_latency(0.05)
    sandbox.faults.fail_graph(
        429, "ApplicationThrottled", "MailboxConcurrency", retry_after="1", times=8
    )
    await asyncio.gather(*(asmtp_send(port_of(relay), message(subject=f"m{i}")) for i in range(12)))
    received = await sandbox.wait_for_mail(12, timeout=30)
    assert sorted(m.subject for m in received) == sorted(f"m{i}" for i in range(12))
    assert sandbox.max_concurrency[MAILBOX] <= 4


async def test_messages_wait_out_a_token_endpoint_outage(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Entra ID down: queued messages are kept and go out once tokens can be had again."""
    relay = await start_relay(delivery=QUEUE)
    sandbox.faults.token_endpoint_down(True)
    for i in range(3):
        assert (await asmtp_send(port_of(relay), message(subject=f"t{i}"))).code == 250
    await eventually(lambda: sum(m.attempts >= 2 for m in spool_of(relay).list("queue")) == 3)
    assert sandbox.received == []
    sandbox.faults.token_endpoint_down(False)
    received = await sandbox.wait_for_mail(3, timeout=30)
    assert sorted(m.subject for m in received) == ["t0", "t1", "t2"]


def dsn_parts(raw: bytes) -> tuple[email.message.EmailMessage, list[email.message.MIMEPart]]:
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(dsn, email.message.EmailMessage)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = list(dsn.iter_parts())
    return dsn, parts


def recipient_status(part: email.message.MIMEPart) -> email.message.Message:
    """The per-recipient field group of a message/delivery-status part."""
    assert part.get_content_type() == "message/delivery-status"
    groups = part.get_payload()
    assert isinstance(groups, list)
    group = groups[1]
    assert isinstance(group, email.message.Message)
    return group


async def test_expired_message_bounces_to_the_envelope_sender(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Past retry.lifetime the message is dead and a 4.4.7 DSN goes to the envelope sender."""
    relay = await start_relay(
        delivery="{mode: queue, spool_dir: spool, retry: {first: 1ms, max: 1ms, lifetime: 1ms}}"
    )
    sandbox.faults.fail_graph(503, "ServiceUnavailable", "down")
    await asmtp_send(port_of(relay), message(subject="doomed"))
    [bounce] = await sandbox.wait_for_mail(1)
    assert bounce.recipients == (MAILBOX,)
    assert bounce.mime is not None
    dsn, parts = dsn_parts(bounce.mime)
    assert MAILBOX in str(dsn["To"])
    assert dsn["Auto-Submitted"] == "auto-replied"
    per_recipient = recipient_status(parts[1])
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "4.4.7"
    assert "Subject: doomed" in str(parts[2].get_payload())
    [dead] = spool_of(relay).list("dead")
    assert "expired" in dead.dead_reason


async def test_permanent_failure_of_a_queued_message_bounces_with_the_graph_code(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """ErrorInvalidUser for a queued message: dead letter plus a 5.1.1 DSN naming the code."""
    relay = await start_relay(delivery=QUEUE)
    sandbox.faults.fail_graph(404, "ErrorInvalidUser", "unknown")
    await asmtp_send(port_of(relay), message())
    [bounce] = await sandbox.wait_for_mail(1)
    assert bounce.mime is not None
    _, parts = dsn_parts(bounce.mime)
    per_recipient = recipient_status(parts[1])
    assert per_recipient["Status"] == "5.1.1"
    assert "ErrorInvalidUser" in str(per_recipient["Diagnostic-Code"])
    assert len(spool_of(relay).list("dead")) == 1


async def test_no_bounce_for_the_null_sender(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """MAIL FROM:<> that fails for good is buried without a DSN."""
    relay = await start_relay(delivery=QUEUE)
    sandbox.faults.fail_graph(404, "ErrorInvalidUser", "unknown")
    await asmtp_send(port_of(relay), message(), sender="<>")
    await eventually(lambda: len(spool_of(relay).list("dead")) == 1)
    await eventually(lambda: relay.delivery.in_flight == 0)
    assert spool_of(relay).stats(time.time()).queued == 0
    assert sandbox.received == []


ANY_SENDER = """\
- name: local
  networks: [127.0.0.1/32]
  senders: ["*"]
"""
ANY_ROUTE = """\
- senders: ["*"]
  auth_object: contoso
  mailbox: scanner@contoso.com
"""


async def test_no_backscatter_to_a_forged_sender_of_a_client_allowed_any_sender(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """Issue #11 item 5: under `senders: ["*"]` a forged MAIL FROM:<victim@external> that Graph
    refuses for good is buried with its reason, and no DSN goes to the victim."""
    sandbox.add_mailbox("scanner@contoso.com", send_as=["victim@external.example"])
    relay = await start_relay(delivery=QUEUE, clients=ANY_SENDER, routes=ANY_ROUTE)
    sandbox.faults.fail_graph(404, "ErrorInvalidUser", "unknown")
    victim = "victim@external.example"
    outcome = await asmtp_send(port_of(relay), message(sender=victim), sender=victim)
    assert outcome.code == 250
    await eventually(lambda: len(spool_of(relay).list("dead")) == 1)
    await eventually(lambda: relay.delivery.in_flight == 0)
    assert spool_of(relay).stats(time.time()).queued == 0
    assert sandbox.graph_requests == 1
    assert sandbox.received == []


async def test_bounces_can_be_turned_off(start_relay: RelayFactory, sandbox: Sandbox) -> None:
    """delivery.bounces: false buries the message and sends nothing."""
    relay = await start_relay(delivery=QUEUE.replace("mode: queue", "mode: queue, bounces: false"))
    sandbox.faults.fail_graph(404, "ErrorInvalidUser", "unknown")
    await asmtp_send(port_of(relay), message())
    await eventually(lambda: len(spool_of(relay).list("dead")) == 1)
    await eventually(lambda: relay.delivery.in_flight == 0)
    assert spool_of(relay).stats(time.time()).queued == 0
    assert sandbox.received == []


async def test_unwritable_spool_answers_451_and_the_relay_keeps_going(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """When the spool cannot be written the client gets 451 4.3.0 (never 250), and the next
    message is accepted once the spool is writable again."""
    relay = await start_relay(delivery=HYBRID)
    temp = tmp_path / "spool" / "tmp"
    shutil.rmtree(temp)
    temp.write_text("not a directory: every write into the spool fails")
    try:
        outcome = await asmtp_send(port_of(relay), message())
        assert (outcome.code, outcome.text[:5]) == (451, "4.3.0")
    finally:
        temp.unlink()
        temp.mkdir(mode=0o700)
    assert (await asmtp_send(port_of(relay), message())).code == 250
    assert len(sandbox.received) == 1


async def test_corrupt_entry_is_moved_aside_and_the_others_are_delivered(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Recovery moves an unreadable entry to corrupt/ and still delivers the rest."""
    spool = Spool(tmp_path / "spool", reserve_bytes=0)
    spool.open()
    for n in (1, 2):
        spool.store(outside_entry(f"PRESET{n}"), message(subject=f"preset {n}"))
    spool.close()
    [bad] = [p for p in (tmp_path / "spool" / "queue").iterdir() if "PRESET1" in p.name]
    bad.write_bytes(b"{ this is not json")
    relay = await start_relay(delivery=QUEUE)
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.subject == "preset 2"
    assert spool_of(relay).stats(time.time()).corrupt == 1


async def test_client_hanging_up_mid_attempt_loses_and_duplicates_nothing(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """The client closes the socket while Graph is still working: the attempt completes,
    the message arrives once and leaves the spool."""
    relay = await start_relay(delivery=HYBRID)
    sandbox.faults.hold_graph()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
    for line in (
        b"EHLO device.test",
        f"MAIL FROM:<{MAILBOX}>".encode(),
        b"RCPT TO:<bob@partner.example>",
        b"DATA",
    ):
        writer.write(line + b"\r\n")
    writer.write(message() + b".\r\n")
    await writer.drain()
    await sandbox.wait_until(lambda: sum(sandbox.in_flight.values()) == 1)
    writer.transport.abort()
    sandbox.faults.release_graph()
    await sandbox.wait_for_mail(1)
    await eventually(lambda: relay.delivery.in_flight == 0)
    assert sandbox.graph_requests == 1
    stats = spool_of(relay).stats(time.time())
    assert (stats.queued, stats.active) == (0, 0)
    del reader


@pytest.mark.parametrize("mode", ["hybrid", "queue"])
async def test_shutdown_requeues_what_is_in_flight_and_a_restart_delivers_it(
    start_relay: RelayFactory, sandbox: Sandbox, mode: str
) -> None:
    """stop() while Graph hangs: the entry goes back to the queue (not counted as a crash)
    and the next relay on the same spool delivers it."""
    relay = await start_relay(
        delivery=(HYBRID if mode == "hybrid" else QUEUE).replace("5s", "200ms")
    )
    sandbox.faults.hold_graph()
    outcome = await asmtp_send(port_of(relay), message())
    assert outcome.text.startswith("2.0.0 Ok: queued ")
    await sandbox.wait_until(lambda: sum(sandbox.in_flight.values()) == 1)
    await relay.stop(grace=0.2)
    [entry] = spool_of(relay).list("queue")
    assert entry.crashes == 0
    sandbox.faults.release_graph()
    again = await start_relay(delivery=QUEUE)
    await eventually(lambda: sandbox.graph_requests == 2)
    await eventually(
        lambda: spool_of(again).stats(time.time()).queued == 0 and again.delivery.in_flight == 0
    )
    # At-least-once: the interrupted request may have landed too; the restart sent it again.
    assert 1 <= len(sandbox.received) <= 2


async def test_an_entry_found_by_the_rescan_is_delivered_at_once(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """An entry the runner was not told about (CLI retry, another process) goes out right after
    the next rescan, not one rescan period later."""
    relay = await start_relay(delivery=QUEUE, rescan_seconds=0.3)
    spool_of(relay).store(outside_entry("FROMOUTSIDE1"), message(subject="from outside"))
    started = time.monotonic()
    [mail] = await sandbox.wait_for_mail(1, timeout=5)
    assert mail.subject == "from outside"
    assert time.monotonic() - started < 2.0


async def test_hybrid_queues_at_once_when_the_mailbox_has_no_free_graph_slot(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """With 4 requests already in flight for a mailbox, a fifth hybrid message is not held
    claimed while it waits: it is queued for the workers and the client hears so at once."""
    relay = await start_relay(delivery=HYBRID)
    sandbox.faults.hold_graph()
    first = [asyncio.create_task(asmtp_send(port_of(relay), message())) for _ in range(4)]
    await sandbox.wait_until(lambda: sum(sandbox.in_flight.values()) == 4)
    fifth = await asmtp_send(port_of(relay), message(subject="fifth"))
    assert fifth.text.startswith("2.0.0 Ok: queued ")
    assert spool_of(relay).stats(time.time()).active == 4
    sandbox.faults.release_graph()
    await asyncio.gather(*first)
    # freeing the slots wakes the workers: no waiting for the next rescan
    received = await sandbox.wait_for_mail(5, timeout=3)
    assert "fifth" in {m.subject for m in received}


async def test_shutdown_says_421_to_idle_sessions(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """A session waiting for its next command hears 421 4.3.2 before the relay closes it."""
    relay = await start_relay(delivery=HYBRID)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
    try:
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(b"HELO device.test\r\n")
        assert (await reader.readline()).startswith(b"250 ")
        await relay.stop(grace=1.0)
        assert await reader.readline() == b"421 4.3.2 Service shutting down, try again later\r\n"
        assert await reader.read() == b""
    finally:
        writer.close()


async def test_shutdown_lets_a_message_in_data_finish(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """SIGTERM while a client is sending its message body: the message is taken (250), then
    the session hears 421 and the relay stops."""
    relay = await start_relay(delivery=HYBRID)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
    try:
        assert (await reader.readline()).startswith(b"220 ")
        for line, code in (
            (b"HELO device.test", b"250"),
            (f"MAIL FROM:<{MAILBOX}>".encode(), b"250"),
            (b"RCPT TO:<bob@partner.example>", b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(line + b"\r\n")
            assert (await reader.readline()).startswith(code)
        body = message(subject="during shutdown")
        writer.write(body[:20])
        stopping = asyncio.create_task(relay.stop(grace=10.0))
        await eventually(lambda: not relay.handler.accepting)  # stop() has begun
        writer.write(body[20:] + b".\r\n")
        assert (await reader.readline()).startswith(b"250 2.0.0 Ok: ")
        assert await reader.readline() == b"421 4.3.2 Service shutting down, try again later\r\n"
        await stopping
        assert [m.subject for m in sandbox.received] == ["during shutdown"]
    finally:
        writer.close()
