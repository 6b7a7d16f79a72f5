"""The queue workers over MemoryStore and FakeGraph: deferral, expiry, crashes, routes found
again by sender, outcomes the store cannot take yet, and who gets a DSN."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.core.limits import CRASH_LIMIT
from relay.delivery.engine import DeliveryEngine
from relay.store.protocol import StoreUnavailableError
from relay.testing.fake_graph import Answer
from relay.testing.memory_store import MemoryStore
from tests.unit.delivery_parts import (
    DENIED,
    SLOW,
    Clock,
    Parts,
    eventually,
    eventually_async,
    make_config,
)

QUEUE = "{mode: queue, retry: {first: 1m, max: 1h, lifetime: 1d}}"
DAY = 86400.0


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Parts]:
    parts = Parts(make_config(tmp_path, delivery=QUEUE))
    await parts.engine.start()
    yield parts
    await parts.engine.stop(grace=1.0)


async def settled(parts: Parts, calls: int) -> None:
    """Wait until Graph got `calls` requests and no attempt is running."""
    await eventually(lambda: len(parts.graph.calls) >= calls and parts.engine.in_flight == 0)
    assert parts.engine.outcomes is not None
    await eventually(lambda: not parts.engine.degraded_reasons())


async def test_a_transient_failure_is_deferred_by_the_backoff(queue: Parts) -> None:
    queue.graph.answer(SLOW)
    await queue.engine.submit(queue.submission())
    await settled(queue, 1)
    found = await queue.where("Q1")
    assert found is not None
    state, entry = found
    assert (state, entry.attempts) == ("queue", 1)
    assert entry.next_attempt == queue.clock.now + 60.0


async def test_a_deferred_entry_is_tried_again_when_due(queue: Parts) -> None:
    queue.graph.answer(SLOW)
    await queue.engine.submit(queue.submission())
    await settled(queue, 1)
    queue.clock.now += 61.0
    queue.engine.wake()
    await settled(queue, 2)
    assert await queue.state("Q1") is None


async def test_a_transient_failure_after_the_lifetime_buries_and_bounces(queue: Parts) -> None:
    queue.graph.answer(SLOW)
    await queue.engine.submit(queue.submission())
    await settled(queue, 1)
    queue.graph.answer(SLOW)
    queue.clock.now += DAY
    queue.engine.wake()
    await settled(queue, 3)  # the last try, then the DSN
    found = await queue.where("Q1")
    assert found is not None
    assert found[0] == "dead"
    assert found[1].dead_reason.startswith("expired after 2 attempts")
    dsn = queue.graph.calls[2]
    assert dsn.mime is not None
    assert b"4.4.7" in dsn.mime


async def test_a_permanent_failure_buries_and_bounces_to_a_named_sender(queue: Parts) -> None:
    queue.graph.answer(DENIED)
    await queue.engine.submit(queue.submission())
    await settled(queue, 2)
    assert await queue.state("Q1") == "dead"
    dsn = queue.graph.calls[1]
    assert dsn.mime is not None
    assert b"app@contoso.com" in dsn.mime
    assert dsn.target.mailbox == "app@contoso.com"  # through the failed message's route


async def test_a_reload_that_turns_bounces_off_applies_to_the_next_settle(
    queue: Parts, tmp_path: Path
) -> None:
    """The settle policy is built once per configuration, yet a reload still takes effect: with
    `bounces: false` loaded, a refused message is buried without a DSN."""
    queue.graph.answer(DENIED)
    queue.config = make_config(
        tmp_path,
        delivery="{mode: queue, bounces: false, retry: {first: 1m, max: 1h, lifetime: 1d}}",
    )
    await queue.engine.submit(queue.submission())
    await settled(queue, 1)
    assert await queue.state("Q1") == "dead"
    assert queue.store is not None
    stats = await queue.store.stats(queue.clock.now)
    assert (stats.queued, stats.active, stats.dead) == (0, 0, 1)  # no DSN was stored
    assert len(queue.graph.calls) == 1


async def test_no_dsn_to_a_forged_sender_under_senders_star(tmp_path: Path) -> None:
    """Backscatter (#11 item 5): `senders: ["*"]` lets a client claim anyone, so a forged
    MAIL FROM gets no DSN; the message is still buried with its reason."""
    config = make_config(
        tmp_path,
        delivery=QUEUE,
        senders='["*"]',
        routes='- {senders: ["*"], auth_object: contoso, mailbox: relay@contoso.com}\n',
    )
    parts = Parts(config)
    await parts.engine.start()
    try:
        parts.graph.answer(DENIED)
        await parts.engine.submit(parts.submission(sender="victim@external.example"))
        await settled(parts, 1)
        assert await parts.state("Q1") == "dead"
        assert parts.store is not None
        assert await parts.store.list("queue") == []
        assert len(parts.graph.calls) == 1
    finally:
        await parts.engine.stop(grace=1.0)


async def test_an_entry_that_keeps_crashing_the_worker_is_quarantined(queue: Parts) -> None:
    """Each crash defers by retry.first without counting an attempt; the third quarantines."""
    for _ in range(CRASH_LIMIT):
        queue.graph.answer(Answer(bug=KeyError("bug")))
    await queue.engine.submit(queue.submission())
    for crash in range(1, CRASH_LIMIT):
        await settled(queue, crash)
        found = await queue.where("Q1")
        assert found is not None
        assert (found[0], found[1].crashes, found[1].attempts) == ("queue", crash, 0)
        queue.clock.now += 61.0
        queue.engine.wake()
    await settled(queue, CRASH_LIMIT)
    found = await queue.where("Q1")
    assert found is not None
    assert found[0] == "quarantine"
    assert "KeyError" in found[1].dead_reason


async def test_shutdown_releases_a_worker_attempt_unchanged(tmp_path: Path) -> None:
    parts = Parts(make_config(tmp_path, delivery=QUEUE))
    await parts.engine.start()
    parts.graph.answer(Answer(hold=asyncio.Event()))
    await parts.engine.submit(parts.submission())
    await parts.graph.started.wait()
    await parts.engine.stop(grace=0.01)
    found = await parts.where("Q1")
    assert found is not None
    assert found[0] == "queue"
    assert (found[1].attempts, found[1].crashes) == (0, 0)


# --- routes by sender, never by position (#10 item 3) -----------------------------------------

REORDERED = """\
- {senders: ["ops@contoso.com"], name: ops, auth_object: other, mailbox: ops-box@contoso.com}
- {senders: ["*@fabrikam.example"], auth_object: other, mailbox: fab@fabrikam.example}
- {senders: ["*@contoso.com"], name: staff, auth_object: contoso, mailbox: shared@contoso.com,
   save_to_sent_items: false}
"""


async def test_a_queued_message_takes_the_route_its_sender_matches_after_a_reload(
    queue: Parts, tmp_path: Path
) -> None:
    """Inserting and reordering routes sends each waiting message through the route its
    sender matches now, with that route's auth object, mailbox and flags."""
    queue.graph.answer(SLOW, SLOW)
    await queue.engine.submit(queue.submission("Q1", sender="app@contoso.com"))
    await queue.engine.submit(queue.submission("Q2", sender="ops@contoso.com"))
    await settled(queue, 2)
    queue.config = make_config(tmp_path, delivery=QUEUE, routes=REORDERED)
    queue.clock.now += 61.0
    queue.engine.wake()
    await settled(queue, 4)
    by_mailbox = {c.target.mailbox: c for c in queue.graph.calls[2:]}
    staff, ops = by_mailbox["shared@contoso.com"], by_mailbox["ops-box@contoso.com"]
    assert (staff.target.auth_name, staff.kind, staff.save_to_sent_items) == (
        "contoso",
        "json",
        False,
    )
    assert (ops.target.auth_name, ops.kind) == ("other", "mime")


async def test_no_route_any_more_defers_the_message_with_an_alert(
    queue: Parts, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    queue.graph.answer(SLOW)
    await queue.engine.submit(queue.submission())
    await settled(queue, 1)
    queue.config = make_config(
        tmp_path,
        delivery=QUEUE,
        routes='- {senders: ["*@fabrikam.example"], auth_object: other}\n',
    )
    caplog.set_level(logging.ERROR, "relay.delivery")
    queue.clock.now += 61.0
    queue.engine.wake()
    await eventually_async(lambda: _attempts_are(queue, 2))
    assert [r for r in caplog.records if getattr(r, "event", "") == "no_route"]
    assert await queue.state("Q1") == "queue"
    assert len(queue.graph.calls) == 1  # nothing went out through another route


async def _attempts_are(parts: Parts, attempts: int) -> bool:
    found = await parts.where("Q1")
    return found is not None and found[1].attempts == attempts and parts.engine.in_flight == 0


async def test_no_route_for_the_whole_lifetime_buries_with_a_dsn(tmp_path: Path) -> None:
    """After one retry lifetime without a route the message is dead, and the DSN (queued,
    itself waiting for a route) names the cause with 5.4.4."""
    parts = Parts(make_config(tmp_path, delivery=QUEUE))
    await parts.engine.start()
    try:
        parts.graph.answer(SLOW)
        await parts.engine.submit(parts.submission())
        await settled(parts, 1)
        parts.config = make_config(
            tmp_path,
            delivery=QUEUE,
            routes='- {senders: ["*@fabrikam.example"], auth_object: other}\n',
        )
        parts.clock.now += DAY
        parts.engine.wake()
        await eventually_async(lambda: _state_is(parts, "dead"))
        found = await parts.where("Q1")
        assert found is not None
        assert "no route matches the sender <app@contoso.com>" in found[1].dead_reason
        assert parts.store is not None
        [dsn] = await parts.store.list("queue")
        assert dsn.is_bounce
        assert dsn.recipients == ("app@contoso.com",)
        assert b"5.4.4" in await parts.store.read_message(dsn.queue_id)
    finally:
        await parts.engine.stop(grace=1.0)


async def _state_is(parts: Parts, state: str) -> bool:
    return await parts.state("Q1") == state and parts.engine.in_flight == 0


# --- outcomes the store cannot take yet (#11 item 2) ------------------------------------------


async def test_a_delivery_the_store_cannot_record_is_kept_and_never_sent_again(
    queue: Parts,
) -> None:
    assert queue.store is not None
    release = asyncio.Event()
    queue.graph.answer(Answer(hold=release))
    await queue.engine.submit(queue.submission())
    await queue.graph.started.wait()
    queue.store.fail_writes = True
    release.set()
    await eventually(lambda: queue.engine.degraded_reasons() == ["outcomes not recorded: 1"])
    assert await queue.state("Q1") == "active"
    await queue.store.refresh()  # a rescan does not make it due again
    queue.clock.now += DAY
    queue.engine.wake()
    queue.store.fail_writes = False
    await eventually(lambda: not queue.engine.degraded_reasons())
    assert await queue.state("Q1") is None
    assert len(queue.graph.calls) == 1


async def test_a_deferral_the_store_cannot_record_lands_once_it_can(queue: Parts) -> None:
    """No crash counted, one attempt counted, the entry back in the queue."""
    assert queue.store is not None
    release = asyncio.Event()
    queue.graph.answer(Answer(error=SLOW, hold=release))
    await queue.engine.submit(queue.submission())
    await queue.graph.started.wait()
    queue.store.fail_writes = True
    release.set()
    await eventually(lambda: bool(queue.engine.degraded_reasons()))
    queue.store.fail_writes = False
    await eventually(lambda: not queue.engine.degraded_reasons())
    found = await queue.where("Q1")
    assert found is not None
    assert (found[0], found[1].attempts, found[1].crashes) == ("queue", 1, 0)


async def test_an_inline_delivery_the_store_cannot_record_is_kept_too(tmp_path: Path) -> None:
    parts = Parts(make_config(tmp_path, delivery="{mode: hybrid, inline_timeout: 5s}"))
    await parts.engine.start()
    assert parts.store is not None
    release = asyncio.Event()
    parts.graph.answer(Answer(hold=release))
    try:
        hook = asyncio.create_task(parts.engine.submit(parts.submission()))
        await parts.graph.started.wait()
        parts.store.fail_writes = True
        release.set()
        outcome = await hook
        assert str(outcome.reply).startswith("250 2.0.0 Ok: delivered")
        assert parts.engine.degraded_reasons() == ["outcomes not recorded: 1"]
        parts.store.fail_writes = False
        await eventually(lambda: not parts.engine.degraded_reasons())
        assert await parts.state("Q1") is None
        assert len(parts.graph.calls) == 1
    finally:
        await parts.engine.stop(grace=1.0)


# --- a message the store cannot read --------------------------------------------------------


class UnreadableStore(MemoryStore):
    """A MemoryStore whose disk fails reads of the ids in `unreadable` (an honest fake)."""

    def __init__(self) -> None:
        super().__init__()
        self.unreadable: set[str] = set()
        self.reads: Counter[str] = Counter()

    async def read_message(self, queue_id: str) -> bytes:
        self.reads[queue_id] += 1
        if queue_id in self.unreadable:
            raise StoreUnavailableError(f"cannot read {queue_id}: I/O error")
        return await super().read_message(queue_id)


async def test_an_unreadable_message_is_put_back_and_left_alone_for_a_rescan(
    tmp_path: Path,
) -> None:
    """Not an attempt, not a crash: released unchanged, and not read again (no tight loop on a
    failing disk) until one rescan period has passed."""
    store = UnreadableStore()
    store.unreadable.add("Q1")
    ticks = Clock(0.0)
    parts = Parts(make_config(tmp_path, delivery=QUEUE), store=store)
    parts.engine = DeliveryEngine(
        config=lambda: parts.config,
        graph=parts.graph,
        store=store,
        clock=parts.clock,
        monotonic=ticks,
        rescan_seconds=60.0,
    )
    await parts.engine.start()
    try:
        await parts.engine.submit(parts.submission("Q1"))
        await eventually(lambda: store.reads["Q1"] == 1 and parts.engine.in_flight == 0)
        found = await parts.where("Q1")
        assert found is not None
        assert (found[0], found[1].attempts, found[1].crashes) == ("queue", 0, 0)
        parts.clock.now += 1.0
        await parts.engine.submit(parts.submission("Q2"))  # due after Q1, so looked at after it
        await eventually(lambda: len(parts.graph.accepted) == 1 and parts.engine.in_flight == 0)
        assert store.reads["Q1"] == 1
        store.unreadable.clear()
        ticks.now += 60.0
        parts.engine.wake()
        await eventually(lambda: len(parts.graph.accepted) == 2 and parts.engine.in_flight == 0)
        assert await parts.state("Q1") is None
    finally:
        await parts.engine.stop(grace=1.0)
