"""StoreIndex (relay/store/index.py) answers due, next_due and stats exactly as a full scan of
the same entries would, after any sequence of moves."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from relay.core.values import EntryMeta, State
from relay.store.index import StoreIndex, entry_mailbox
from relay.store.protocol import MailboxKey, StoreStats
from tests.store.contract import NOW, entry

STATES: tuple[State, ...] = ("queue", "active", "dead", "quarantine")


def scanned(placed: dict[str, tuple[EntryMeta, State]], now: float) -> StoreStats:
    """What a scan of every entry would report."""
    states = [state for _, state in placed.values()]
    pending = [e.created for e, state in placed.values() if state in ("queue", "active")]
    return StoreStats(
        queued=states.count("queue"),
        active=states.count("active"),
        dead=states.count("dead"),
        quarantined=states.count("quarantine"),
        corrupt=0,
        oldest_created=min(pending, default=None),
        due=sum(state == "queue" and e.next_attempt <= now for e, state in placed.values()),
    )


def scanned_due(
    placed: dict[str, tuple[EntryMeta, State]], now: float, limit: int, exclude: set[MailboxKey]
) -> list[str]:
    due = [
        e
        for e, state in placed.values()
        if state == "queue" and e.next_attempt <= now and entry_mailbox(e) not in exclude
    ]
    due.sort(key=lambda e: (e.next_attempt, e.created, e.queue_id))
    return [e.queue_id for e in due[:limit]]


@pytest.mark.parametrize("seed", range(5))
def test_the_index_agrees_with_a_scan_after_random_moves(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 (a seeded, replayable sequence, not a secret)
    index, placed = StoreIndex(), dict[str, tuple[EntryMeta, State]]()
    boxes = [("contoso", f"box{n}@contoso.com") for n in range(4)] + [("fabrikam", "x@f.example")]
    for step in range(600):
        qid = f"Q{rng.randrange(80)}"
        if rng.random() < 0.2 and qid in placed:
            index.remove(qid)
            del placed[qid]
        else:
            auth, box = rng.choice(boxes)
            meta = entry(
                qid,
                created=NOW + rng.randrange(100),
                next_attempt=rng.choice([0.0, NOW + rng.randrange(-50, 50)]),
                auth_object=auth,
                mailbox=box.upper() if rng.random() < 0.3 else box,
            )
            state = rng.choice(STATES)
            index.place(meta, state)
            placed[qid] = (meta, state)
        now = NOW + rng.randrange(-60, 60)
        exclude = set(rng.sample(boxes, rng.randrange(len(boxes))))
        limit = rng.randrange(1, 30)
        assert index.stats(now) == scanned(placed, now), step
        found = [e.queue_id for e in index.due(now, limit, exclude)]
        assert found == scanned_due(placed, now, limit, exclude), step
        queued = [e.next_attempt for e, state in placed.values() if state == "queue"]
        assert index.next_due() == min(queued, default=None)


def test_rebuild_gives_the_same_answers_as_the_moves_that_led_there() -> None:
    moved, placed = StoreIndex(), []
    for n in range(30):
        meta = entry(f"Q{n}", created=NOW - n, next_attempt=NOW + n % 5, mailbox=f"b{n % 3}@x")
        state = STATES[n % 4]
        moved.place(meta, state)
        placed.append((meta, state))
    rebuilt = StoreIndex()
    rebuilt.rebuild(placed, corrupt=2)
    assert rebuilt.stats(NOW + 2) == replace(moved.stats(NOW + 2), corrupt=2)
    exclude = {("contoso", "b1@x")}
    assert rebuilt.due(NOW + 3, 100, exclude) == moved.due(NOW + 3, 100, exclude)
