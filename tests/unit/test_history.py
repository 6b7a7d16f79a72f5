"""The delivery history's value and query (relay/core/history.py) and its background recorder
(relay/delivery/history.py) over MemoryStore: which decisions are final, what each record
holds, and that a store that refuses never loses a record, never blocks, and is logged once."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from relay.config.schema import Config
from relay.core.errors import PermanentDeliveryError, SmtpReply
from relay.core.history import HistoryQuery, HistoryRecord, select, subject_of
from relay.core.lifecycle import Bury, Complete, Defer, Discard, NoRoute, Quarantine
from relay.core.values import Accepted, Delivered, EntryMeta, Refused
from relay.delivery.engine import DeliveryEngine
from relay.delivery.history import NO_ROUTE_REMEDY, PRUNE_EVERY, DeliveryHistory
from relay.testing.fake_graph import Answer, FakeGraph
from relay.testing.memory_store import MemoryStore
from tests.store.contract import settled
from tests.unit.delivery_parts import SLOW, Clock, Parts, make_config

MIME = b"From: app@contoso.com\r\nSubject: =?utf-8?b?w5xiZXJ3ZWlzdW5n?=\r\n\r\nbody\r\n"
REFUSED = PermanentDeliveryError(
    "Graph answered HTTP 404 ErrorInvalidUser",
    reply=SmtpReply(550, "5.1.1", "Mailbox not found"),
    code="ErrorInvalidUser",
    http_status=404,
    request_id="req-404",
    remedy="check the route's mailbox",
)


def entry(**changes: Any) -> EntryMeta:
    values: dict[str, Any] = {
        "queue_id": "Q1",
        "created": 1000.0,
        "mail_from": "app@contoso.com",
        "recipients": ("bob@partner.example", "eve@partner.example"),
        "client": "local",
        "client_ip": "127.0.0.1",
        "auth_object": "contoso",
        "mailbox": "pool:a@contoso.com,b@contoso.com",
        "route": "apps",
        "message_id": "<m1@contoso.com>",
        "size": len(MIME),
        **changes,
    }
    return EntryMeta(**values)


def config(tmp_path: Path, history: str = "") -> Config:
    delivery = "{mode: queue}" + (f"\nhistory: {history}" if history else "")
    return make_config(tmp_path, delivery=delivery)


@pytest.fixture
async def store() -> MemoryStore:
    memory = MemoryStore()
    await memory.recover()
    return memory


def recorder(
    tmp_path: Path, store: MemoryStore, clock: Clock, history: str = "", **kwargs: Any
) -> DeliveryHistory:
    loaded = config(tmp_path, history)
    return DeliveryHistory(config=lambda: loaded, store=store, clock=clock, **kwargs)


async def recorded(history: DeliveryHistory, store: MemoryStore) -> list[HistoryRecord]:
    await history.flush()
    return list(await store.history(HistoryQuery(limit=1000)))


# --- the value and the query ---------------------------------------------------------------


def test_a_record_survives_its_dict_form() -> None:
    record = settled("Q1", 5.0, subject="Scan", error="x", remedy="y", http_status=None)
    assert HistoryRecord.from_dict(record.to_dict()) == record


@pytest.mark.parametrize(
    "change",
    [
        {"outcome": "lost"},
        {"path": "carrier-pigeon"},
        {"recipients": -1},
        {"http_status": "202"},
        {"attempts": True},
        {"surprise": 1},
    ],
)
def test_a_foreign_dict_is_not_a_record(change: dict[str, Any]) -> None:
    body = {**settled("Q1", 5.0).to_dict(), **change}
    with pytest.raises((ValueError, TypeError)):
        HistoryRecord.from_dict(body)


def test_select_is_newest_first_and_limited() -> None:
    records = [settled(f"Q{i}", float(i)) for i in (3, 1, 4, 2)]
    assert [r.queue_id for r in select(records, HistoryQuery(limit=3))] == ["Q4", "Q3", "Q2"]


def test_a_query_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        HistoryQuery(limit=0)


def test_the_subject_is_decoded_from_the_header_block_only() -> None:
    assert subject_of(MIME) == "Überweisung"
    assert subject_of(b"From: a@b.c\r\n\r\nSubject: not a header\r\n") == ""


def test_a_long_error_and_subject_are_shortened() -> None:
    record = settled("Q1", 5.0, error="e" * 5000, subject="s" * 5000).shortened()
    assert len(record.error) == 500
    assert record.subject is not None
    assert len(record.subject) == 200


# --- which decisions are recorded, with what ---------------------------------------------


async def test_complete_is_recorded_as_delivered_by_the_member_that_sent(
    tmp_path: Path, store: MemoryStore
) -> None:
    clock = Clock(1005.0)
    history = recorder(tmp_path, store, clock)
    sent = Delivered(202, "req-1", 120, sent_as="b@contoso.com", path="upload")
    history.settled(Complete(entry(attempts=2)), sent, MIME)
    [record] = await recorded(history, store)
    assert record == HistoryRecord(
        queue_id="Q1",
        message_id="<m1@contoso.com>",
        accepted=1000.0,
        settled=1005.0,
        client="local",
        client_ip="127.0.0.1",
        sender="app@contoso.com",
        recipients=2,
        route="apps",
        mailbox="b@contoso.com",
        path="upload",
        http_status=202,
        request_id="req-1",
        attempts=3,
        outcome="delivered",
    )


async def test_bury_and_discard_are_recorded_with_the_error_and_its_remedy(
    tmp_path: Path, store: MemoryStore
) -> None:
    history = recorder(tmp_path, store, Clock())
    history.settled(Bury(entry(queue_id="F1", attempts=1), "refused: 550", None), REFUSED, MIME)
    history.settled(Bury(entry(queue_id="E1"), "expired", None, expired=True), REFUSED, None)
    history.settled(
        Discard(entry(queue_id="R1", attempts=1), "refused while waiting"), REFUSED, MIME
    )
    history.settled(
        Bury(entry(queue_id="N1"), "no route", None, expired=True), NoRoute("x@y"), None
    )
    found = {r.queue_id: r for r in await recorded(history, store)}
    assert {q: r.outcome for q, r in found.items()} == {
        "F1": "failed",
        "E1": "expired",
        "R1": "refused",
        "N1": "expired",
    }
    assert (found["F1"].http_status, found["F1"].request_id) == (404, "req-404")
    assert (found["F1"].error, found["F1"].remedy) == ("refused: 550", "check the route's mailbox")
    assert found["F1"].path == ""
    assert (found["N1"].http_status, found["N1"].remedy) == (None, NO_ROUTE_REMEDY)


async def test_a_deferral_or_a_quarantine_is_not_final(tmp_path: Path, store: MemoryStore) -> None:
    history = recorder(tmp_path, store, Clock())
    history.settled(Defer(entry(), 2000.0, "busy"), REFUSED, MIME)
    history.settled(Quarantine(entry(), "crashed"), REFUSED, MIME)
    assert await recorded(history, store) == []


async def test_the_subject_is_kept_only_with_history_subjects(
    tmp_path: Path, store: MemoryStore
) -> None:
    sent = Delivered(202, "req-1", 10)
    quiet = recorder(tmp_path, store, Clock())
    quiet.settled(Complete(entry(queue_id="Q1")), sent, MIME)
    told = recorder(tmp_path, store, Clock(), history="{subjects: true}")
    told.settled(Complete(entry(queue_id="Q2")), sent, MIME)
    found = {r.queue_id: r.subject for r in await recorded(told, store)}
    await quiet.flush()
    found.update({r.queue_id: r.subject for r in await store.history(HistoryQuery())})
    assert found == {"Q1": None, "Q2": "Überweisung"}


# --- a store that refuses ------------------------------------------------------------------


async def test_a_refusing_store_keeps_the_records_logs_once_and_gets_them_later(
    tmp_path: Path, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "relay.delivery")
    clock = Clock()
    history = recorder(tmp_path, store, clock)
    store.fail_writes = True
    for n in range(3):
        clock.now += 1
        history.settled(Complete(entry(queue_id=f"Q{n}")), Delivered(202, None, 1), None)
        await history.flush()
    assert await store.history(HistoryQuery()) == []
    shown = await history.search(HistoryQuery())  # the page still shows them
    assert [r.queue_id for r in shown] == ["Q2", "Q1", "Q0"]
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events.count("history_unsaved") == 1
    store.fail_writes = False
    history.settled(Complete(entry(queue_id="Q3")), Delivered(202, None, 1), None)
    assert sorted(r.queue_id for r in await recorded(history, store)) == ["Q0", "Q1", "Q2", "Q3"]
    assert [getattr(r, "event", "") for r in caplog.records].count("history_saved") == 1
    assert len(await history.search(HistoryQuery())) == 4  # not twice


async def test_at_most_max_unsaved_records_wait_the_oldest_go_first(
    tmp_path: Path, store: MemoryStore
) -> None:
    history = recorder(tmp_path, store, Clock(), max_unsaved=2)
    store.fail_writes = True
    for n in range(4):
        history.settled(Complete(entry(queue_id=f"Q{n}")), Delivered(202, None, 1), None)
    await history.flush()
    store.fail_writes = False
    assert sorted(r.queue_id for r in await recorded(history, store)) == ["Q2", "Q3"]


async def test_records_past_the_retention_are_pruned_at_most_once_per_interval(
    tmp_path: Path, store: MemoryStore
) -> None:
    clock = Clock(100_000.0)
    history = recorder(tmp_path, store, clock, history="{retention: 1h}")
    await store.record_history([settled("OLD", clock.now - 7200), settled("NEW", clock.now - 60)])
    history.settled(Complete(entry(queue_id="Q1")), Delivered(202, None, 1), None)
    assert sorted(r.queue_id for r in await recorded(history, store)) == ["NEW", "Q1"]
    await store.record_history([settled("OLD2", clock.now - 7200)])
    clock.now += PRUNE_EVERY / 2
    history.settled(Complete(entry(queue_id="Q2")), Delivered(202, None, 1), None)
    assert "OLD2" in {r.queue_id for r in await recorded(history, store)}
    clock.now += PRUNE_EVERY
    history.settled(Complete(entry(queue_id="Q3")), Delivered(202, None, 1), None)
    assert "OLD2" not in {r.queue_id for r in await recorded(history, store)}


# --- direct mode: the engine records what the waiting client was told -----------------------


async def test_direct_mode_records_delivered_refused_and_unanswered(
    tmp_path: Path, store: MemoryStore
) -> None:
    loaded = make_config(tmp_path, delivery="{mode: direct, inline_timeout: 200ms}")
    graph = FakeGraph()
    engine = DeliveryEngine(config=lambda: loaded, graph=graph, store=None, history=store)
    parts = Parts(loaded, store=None)  # only for its submissions
    hold = asyncio.Event()
    graph.answer(None, SLOW, Answer(hold=hold))
    try:
        outcomes = [await engine.submit(parts.submission(f"D{n}")) for n in range(3)]
    finally:
        hold.set()
    assert isinstance(outcomes[0], Accepted)
    assert all(isinstance(o, Refused) for o in outcomes[1:])
    await engine.stop(grace=1.0)  # writes what waits
    found = {r.queue_id: r for r in await store.history(HistoryQuery())}
    assert {q: (r.outcome, r.http_status, r.attempts) for q, r in found.items()} == {
        "D0": ("delivered", 202, 1),
        "D1": ("refused", 503, 1),
        "D2": ("refused", None, 0),
    }
    assert found["D2"].error == "no answer from Graph in time"
    assert found["D0"].path == "mime"
