"""The delivery engine within each mailbox's sending budgets (issue #12), over MemoryStore and
FakeGraph: mail waits unsent and unaged for budget, goes out in order, one mailbox never holds
up another, pools spread the load, limit answers pause the mailbox without a DSN, the ledger
outlives a restart, and every mode tells the client the truth."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.core.errors import TransientDeliveryError
from relay.core.values import Accepted, Refused
from relay.testing.memory_store import MemoryStore
from tests.unit.delivery_parts import SLOW, Parts, eventually, eventually_async, make_config

MINUTE = 60.0


def delivery(mode: str = "queue", limits: str = "messages_per_minute: 3", extra: str = "") -> str:
    return (
        f"{{mode: {mode}, inline_timeout: 5s, retry: {{first: 1m, max: 1h, lifetime: 1h}}, "
        f"mailbox_limits: {{{limits}}}{extra}}}"
    )


async def started(parts: Parts) -> Parts:
    await parts.engine.start()
    return parts


@pytest.fixture
async def paced(tmp_path: Path) -> AsyncIterator[Parts]:
    parts = await started(Parts(make_config(tmp_path, delivery=delivery())))
    yield parts
    await parts.engine.stop(grace=1.0)


async def submit_all(
    parts: Parts, count: int, sender: str = "app@contoso.com", prefix: str = "Q"
) -> None:
    for n in range(count):
        outcome = await parts.engine.submit(parts.submission(f"{prefix}{n}", sender=sender))
        assert isinstance(outcome, Accepted)


async def waiting(parts: Parts) -> list[str]:
    assert parts.store is not None
    return [e.queue_id for e in await parts.store.list("queue")]


async def test_past_the_budget_mail_waits_queued_unsent_and_unattempted(paced: Parts) -> None:
    """30/min is Exchange's figure; here 3/min: the 4th and 5th message wait, attempts 0."""
    await submit_all(paced, 5)
    await eventually(lambda: len(paced.graph.accepted) == 3)
    await eventually_async(lambda: _count_queued(paced, 2))
    assert len(paced.graph.calls) == 3  # nothing was sent early and refused
    assert paced.store is not None
    for entry in await paced.store.list("queue"):
        assert (entry.attempts, entry.last_error, entry.next_attempt) == (0, "", 0.0)


async def test_waiting_mail_goes_when_the_window_frees_in_order_of_acceptance(
    paced: Parts,
) -> None:
    await submit_all(paced, 5)
    await eventually(lambda: len(paced.graph.accepted) == 3)
    paced.clock.now += MINUTE
    paced.engine.wake()
    await eventually(lambda: len(paced.graph.accepted) == 5)
    assert await waiting(paced) == []


async def _count_queued(parts: Parts, count: int) -> bool:
    assert parts.store is not None
    return len(await parts.store.list("queue")) == count


async def test_one_mailbox_backlog_never_holds_up_another_mailbox(paced: Parts) -> None:
    """app@ has used its budget and has a backlog; ops@'s mail, accepted later, goes at once."""
    await submit_all(paced, 8, sender="app@contoso.com", prefix="A")
    await eventually(lambda: len(paced.graph.accepted) == 3)
    await submit_all(paced, 2, sender="ops@contoso.com", prefix="B")
    await eventually(lambda: len(paced.graph.accepted) == 5)
    boxes = [call.target.mailbox for call in paced.graph.accepted]
    assert boxes.count("ops@contoso.com") == 2
    assert sorted(await waiting(paced)) == [f"A{n}" for n in range(3, 8)]


async def test_a_mailbox_sends_its_line_head_first(tmp_path: Path) -> None:
    """Within a mailbox the order of acceptance holds across windows."""
    parts = await started(
        Parts(make_config(tmp_path, delivery=delivery(limits="messages_per_minute: 1")))
    )
    try:
        for n in range(3):
            assert isinstance(await parts.engine.submit(parts.submission(f"Q{n}")), Accepted)
        for n in range(3):  # one per window, and always the oldest of those waiting
            await eventually_async(functools.partial(_gone, parts, f"Q{n}"))
            assert await waiting(parts) == [f"Q{m}" for m in range(n + 1, 3)]
            parts.clock.now += MINUTE
            parts.engine.wake()
    finally:
        await parts.engine.stop(grace=1.0)


async def _gone(parts: Parts, queue_id: str) -> bool:
    return await parts.state(queue_id) is None


async def test_hybrid_tries_inline_only_with_budget_left(tmp_path: Path) -> None:
    parts = await started(
        Parts(make_config(tmp_path, delivery=delivery("hybrid", "messages_per_minute: 1")))
    )
    try:
        first = await parts.engine.submit(parts.submission("Q1"))
        second = await parts.engine.submit(parts.submission("Q2"))
        assert first == Accepted("Q1", "delivered")
        assert second == Accepted("Q2", "queued")
        assert len(parts.graph.calls) == 1
    finally:
        await parts.engine.stop(grace=1.0)


async def test_direct_mode_says_451_4_7_0_with_the_wait(tmp_path: Path) -> None:
    parts = Parts(
        make_config(tmp_path, delivery="{mode: direct, mailbox_limits: {messages_per_minute: 1}}"),
        store=None,
    )
    assert isinstance(await parts.engine.submit(parts.submission("Q1")), Accepted)
    parts.clock.now += 15.0
    refused = await parts.engine.submit(parts.submission("Q2"))
    assert isinstance(refused, Refused)
    assert str(refused.reply) == (
        "451 4.7.0 Sending limit of app@contoso.com reached, try again in 45 s"
    )
    assert len(parts.graph.calls) == 1


async def test_more_recipients_than_a_whole_day_allows_is_refused_not_queued_forever(
    tmp_path: Path,
) -> None:
    parts = Parts(
        make_config(tmp_path, delivery="{mode: direct, mailbox_limits: {recipients_per_day: 1}}"),
        store=None,
    )
    wide = replace(parts.submission("Q1"), recipients=("a@partner.example", "b@partner.example"))
    refused = await parts.engine.submit(wide)
    assert isinstance(refused, Refused)
    assert (refused.reply.code, refused.reply.status) == (554, "5.5.3")
    assert "2 > 1 per day" in refused.reply.text
    assert parts.graph.calls == []


async def test_the_recipient_ledger_outlives_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, delivery=delivery(limits="recipients_per_day: 2"))
    parts = await started(Parts(config))
    await submit_all(parts, 3)
    await eventually(lambda: len(parts.graph.accepted) == 2)
    await eventually_async(lambda: _count_queued(parts, 1))
    await parts.engine.stop(grace=1.0)
    assert isinstance(parts.store, MemoryStore)
    again = Parts(config, store=parts.store.restarted(), clock=parts.clock)
    await again.engine.start()
    try:
        parts.clock.now += 3600.0  # an hour later the day's budget is still spent
        again.engine.wake()
        await eventually_async(lambda: _count_queued(again, 1))
        assert again.graph.calls == []
        parts.clock.now += 86_400.0
        again.engine.wake()
        await eventually(lambda: len(again.graph.accepted) == 1)
    finally:
        await again.engine.stop(grace=1.0)


async def test_a_pool_spreads_its_mail_over_the_members_with_budget(tmp_path: Path) -> None:
    routes = (
        '- {senders: ["*@contoso.com"], auth_object: contoso, '
        "mailbox: [noreply1@contoso.com, noreply2@contoso.com]}\n"
    )
    config = make_config(
        tmp_path, delivery=delivery(limits="messages_per_minute: 2"), routes=routes
    )
    parts = await started(Parts(config))
    try:
        await submit_all(parts, 5)
        await eventually(lambda: len(parts.graph.accepted) == 4)
        boxes = sorted(call.target.mailbox for call in parts.graph.accepted)
        assert boxes == ["noreply1@contoso.com"] * 2 + ["noreply2@contoso.com"] * 2
        await eventually_async(lambda: _count_queued(parts, 1))
        parts.clock.now += MINUTE
        parts.engine.wake()
        await eventually(lambda: len(parts.graph.accepted) == 5)
    finally:
        await parts.engine.stop(grace=1.0)


LIMIT_ANSWERS = [
    ("ErrorExceededMessageLimit", 403),
    ("SubmissionQuotaExceeded", 503),
    ("CommandConcurrencyLimitReached", 429),
    ("MailboxConcurrency", 429),
    ("ApplicationThrottled", 429),
]


@pytest.mark.parametrize(("code", "status"), LIMIT_ANSWERS)
async def test_a_limit_answer_pauses_the_mailbox_then_delivers_without_a_dsn(
    tmp_path: Path, code: str, status: int
) -> None:
    parts = await started(
        Parts(make_config(tmp_path, delivery=delivery(limits="messages_per_minute: 30")))
    )
    try:
        limit = TransientDeliveryError(
            f"Graph answered HTTP {status} {code}",
            http_status=status,
            code=code,
            mailbox_limit=code,
            retry_after=0.2,
        )
        parts.graph.answer(limit)
        await parts.engine.submit(parts.submission("Q1"))
        await eventually(
            lambda: parts.engine.attempts.slots.paused_for("contoso", "app@contoso.com") > 0
        )
        found = await parts.where("Q1")
        assert found is not None
        assert (found[0], found[1].attempts) == ("queue", 0)
        await eventually(lambda: len(parts.graph.accepted) == 1)
        await eventually_async(functools.partial(_gone, parts, "Q1"))  # completed, not buried
        assert [c.target.mailbox for c in parts.graph.calls] == ["app@contoso.com"] * 2  # no DSN
    finally:
        await parts.engine.stop(grace=1.0)


async def test_time_waiting_for_budget_does_not_age_a_message_to_expiry(tmp_path: Path) -> None:
    """lifetime 1h; the message waits 2h for the recipient budget, then fails once: deferred,
    not buried (without the credit it would be 'expired after 1 attempts')."""
    config = make_config(tmp_path, delivery=delivery(limits="recipients_per_day: 1"))
    parts = await started(Parts(config))
    try:
        await submit_all(parts, 2)
        await eventually(lambda: len(parts.graph.accepted) == 1)
        await eventually_async(lambda: _count_queued(parts, 1))
        for _ in range(4):  # the workers look now and then; each look sees the mailbox held
            parts.clock.now += 1800.0
            parts.engine.wake()
            await eventually(lambda: parts.engine.workers is not None)
            await _one_fill(parts)
        parts.graph.default = replace(parts.graph.default, error=SLOW)
        parts.config = make_config(tmp_path, delivery=delivery(limits="recipients_per_day: 10"))
        parts.engine.wake()
        await eventually(lambda: len(parts.graph.calls) == 2 and parts.engine.in_flight == 0)
        found = await parts.where("Q1")
        assert found is not None
        state, entry = found
        assert (state, entry.attempts) == ("queue", 1)
        assert entry.waited >= 7200.0 - 1.0
    finally:
        await parts.engine.stop(grace=1.0)


async def _one_fill(parts: Parts) -> None:
    """Let the workers' loop run one look at the queue (it runs on every wake-up)."""
    workers = parts.engine.workers
    assert workers is not None
    seen = workers.fills
    await eventually(lambda: workers.fills > seen)


async def test_a_pool_with_rewrite_from_sends_from_the_member_that_sends(tmp_path: Path) -> None:
    routes = (
        '- {senders: ["*@contoso.com"], auth_object: contoso, rewrite_from: true, '
        "mailbox: [noreply1@contoso.com, noreply2@contoso.com]}\n"
    )
    config = make_config(
        tmp_path, delivery=delivery(limits="messages_per_minute: 1"), routes=routes
    )
    parts = await started(Parts(config))
    try:
        await submit_all(parts, 2)
        await eventually(lambda: len(parts.graph.accepted) == 2)
        for call in parts.graph.accepted:
            assert call.kind == "json"
            assert call.message_json is not None
            sender = call.message_json["from"]["emailAddress"]["address"]
            assert sender == call.target.mailbox
        assert {c.target.mailbox for c in parts.graph.accepted} == {
            "noreply1@contoso.com",
            "noreply2@contoso.com",
        }
    finally:
        await parts.engine.stop(grace=1.0)
