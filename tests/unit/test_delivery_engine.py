"""`DeliveryEngine.submit` in each mode, over MemoryStore and FakeGraph: what the client is told,
what the store keeps, how often Graph is asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.core.values import Accepted, Refused
from relay.testing.fake_graph import Answer
from tests.unit.delivery_parts import DENIED, SLOW, Parts, eventually, make_config

HYBRID = "{mode: hybrid, inline_timeout: 5s, bounces: true}"


@pytest.fixture
async def hybrid(tmp_path: Path) -> AsyncIterator[Parts]:
    parts = Parts(make_config(tmp_path, delivery=HYBRID))
    await parts.engine.start()
    yield parts
    await parts.engine.stop(grace=1.0)


async def test_direct_mode_answers_delivered_after_graph_accepts(tmp_path: Path) -> None:
    parts = Parts(make_config(tmp_path, delivery="{mode: direct}"), store=None)
    outcome = await parts.engine.submit(parts.submission())
    assert outcome == Accepted("Q1", "delivered")
    assert str(outcome.reply) == "250 2.0.0 Ok: delivered Q1"
    assert len(parts.graph.accepted) == 1


async def test_direct_mode_hands_a_transient_failure_back_to_the_client(tmp_path: Path) -> None:
    parts = Parts(make_config(tmp_path, delivery="{mode: direct}"), store=None)
    parts.graph.answer(SLOW)
    outcome = await parts.engine.submit(parts.submission())
    assert outcome == Refused(SLOW.reply)


async def test_direct_mode_answers_451_when_graph_is_too_slow(tmp_path: Path) -> None:
    parts = Parts(
        make_config(tmp_path, delivery="{mode: direct, inline_timeout: 0.05}"), store=None
    )
    parts.graph.answer(Answer(hold=asyncio.Event()))
    outcome = await parts.engine.submit(parts.submission())
    assert isinstance(outcome, Refused)
    assert outcome.reply.code == 451


async def test_queue_mode_answers_queued_and_a_worker_delivers(tmp_path: Path) -> None:
    parts = Parts(make_config(tmp_path, delivery="{mode: queue}"))
    await parts.engine.start()
    try:
        outcome = await parts.engine.submit(parts.submission())
        assert outcome == Accepted("Q1", "queued")
        await eventually(lambda: len(parts.graph.accepted) == 1)
        await eventually(lambda: parts.engine.in_flight == 0)
        assert await parts.state("Q1") is None
    finally:
        await parts.engine.stop(grace=1.0)


async def test_queue_mode_refuses_with_451_when_the_store_cannot_take_the_message(
    tmp_path: Path,
) -> None:
    parts = Parts(make_config(tmp_path, delivery="{mode: queue}"))
    await parts.engine.start()
    assert parts.store is not None
    parts.store.fail_writes = True
    try:
        outcome = await parts.engine.submit(parts.submission())
        assert isinstance(outcome, Refused)
        assert str(outcome.reply).startswith("451 4.3.0")
    finally:
        parts.store.fail_writes = False
        await parts.engine.stop(grace=1.0)


async def test_hybrid_delivered_inline_removes_the_entry(hybrid: Parts) -> None:
    outcome = await hybrid.engine.submit(hybrid.submission())
    assert outcome == Accepted("Q1", "delivered")
    assert await hybrid.state("Q1") is None
    assert len(hybrid.graph.calls) == 1


async def test_hybrid_transient_failure_is_queued_and_deferred(hybrid: Parts) -> None:
    hybrid.graph.answer(SLOW)
    outcome = await hybrid.engine.submit(hybrid.submission())
    assert outcome == Accepted("Q1", "queued")
    found = await hybrid.where("Q1")
    assert found is not None
    assert found[0] == "queue"
    assert found[1].attempts == 1


async def test_hybrid_permanent_refusal_goes_to_the_client_and_is_not_bounced(
    hybrid: Parts,
) -> None:
    """The waiting client hears the 5xx and owns the failure: nothing kept, no DSN."""
    hybrid.graph.answer(DENIED)
    outcome = await hybrid.engine.submit(hybrid.submission())
    assert outcome == Refused(DENIED.reply)
    assert hybrid.store is not None
    assert await hybrid.state("Q1") is None
    assert await hybrid.store.list("queue") == []
    assert await hybrid.store.list("dead") == []


async def test_hybrid_too_slow_answers_queued_and_the_inline_attempt_finishes_once(
    tmp_path: Path,
) -> None:
    """The inline attempt goes on after the client heard `queued`; no worker sends it again."""
    parts = Parts(make_config(tmp_path, delivery="{mode: hybrid, inline_timeout: 0.05}"))
    await parts.engine.start()
    release = asyncio.Event()
    parts.graph.answer(Answer(hold=release))
    try:
        outcome = await parts.engine.submit(parts.submission())
        assert outcome == Accepted("Q1", "queued")
        assert await parts.state("Q1") == "active"
        release.set()
        await eventually(lambda: parts.engine.in_flight == 0)
        assert await parts.state("Q1") is None
        assert len(parts.graph.calls) == 1
    finally:
        await parts.engine.stop(grace=1.0)


async def test_a_refusal_after_the_client_heard_queued_is_buried_and_bounced(
    tmp_path: Path,
) -> None:
    parts = Parts(make_config(tmp_path, delivery="{mode: hybrid, inline_timeout: 0.05}"))
    await parts.engine.start()
    release = asyncio.Event()
    parts.graph.answer(Answer(error=DENIED, hold=release))
    try:
        assert await parts.engine.submit(parts.submission()) == Accepted("Q1", "queued")
        release.set()
        await eventually(lambda: len(parts.graph.calls) == 2)  # the DSN goes out
        assert await parts.state("Q1") == "dead"
        dsn = parts.graph.calls[1]
        assert dsn.mime is not None
        assert b"multipart/report" in dsn.mime
    finally:
        await parts.engine.stop(grace=1.0)


async def test_a_client_hanging_up_does_not_interrupt_the_inline_attempt(hybrid: Parts) -> None:
    """aiosmtpd cancels the DATA hook when the client goes; the attempt completes anyway."""
    release = asyncio.Event()
    hybrid.graph.answer(Answer(hold=release))
    hook = asyncio.create_task(hybrid.engine.submit(hybrid.submission()))
    await hybrid.graph.started.wait()
    hook.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hook
    release.set()
    await eventually(lambda: hybrid.engine.in_flight == 0)
    assert await hybrid.state("Q1") is None
    assert len(hybrid.graph.accepted) == 1


async def test_shutdown_releases_an_inline_attempt_unchanged(tmp_path: Path) -> None:
    """Not a crash and not an attempt: the entry is queued again as it was."""
    parts = Parts(make_config(tmp_path, delivery="{mode: hybrid, inline_timeout: 0.05}"))
    await parts.engine.start()
    parts.graph.answer(Answer(hold=asyncio.Event()))
    assert await parts.engine.submit(parts.submission()) == Accepted("Q1", "queued")
    await parts.engine.stop(grace=0.01)
    found = await parts.where("Q1")
    assert found is not None
    assert found[0] == "queue"
    assert (found[1].attempts, found[1].crashes) == (0, 0)
