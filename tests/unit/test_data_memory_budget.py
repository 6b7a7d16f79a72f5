"""The DATA memory budget (relay.smtp.memory) on its own: reservations, waits, spills.

Each received byte costs COPIES bytes of budget; room is taken in chunks. These tests use a
small budget and chunk so the numbers stay readable.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.smtp.memory import COPIES, DataMemoryBudget

CHUNK = 100


def budget(limit: int = 1000) -> DataMemoryBudget:
    return DataMemoryBudget(limit, chunk=CHUNK)


def test_received_bytes_are_reserved_in_chunks_at_copies_per_byte() -> None:
    """10 bytes take one 100-byte chunk (20 used); 50 more fit in it; the next byte needs more."""
    b = budget()
    r = b.open()
    assert r.try_grow(10)
    assert (b.reserved, r.used) == (CHUNK, 10 * COPIES)
    assert r.try_grow(40)
    assert b.reserved == CHUNK
    assert r.try_grow(1)
    assert b.reserved == 2 * CHUNK


def test_release_gives_all_room_back() -> None:
    b = budget()
    r = b.open()
    assert r.try_grow(300)
    r.release()
    assert b.reserved == 0


def test_a_request_past_the_limit_does_not_fit_while_others_hold_room() -> None:
    b = budget(400)
    first, second = b.open(), b.open()
    assert first.try_grow(150)  # 300 of 400
    assert not second.try_grow(100)  # would need 200
    assert b.reserved == 300


def test_one_message_alone_may_exceed_the_budget() -> None:
    """A message larger than the budget still goes through when it is the only one."""
    b = budget(100)
    r = b.open()
    assert r.try_grow(500)
    assert b.reserved == 1000


async def test_a_waiting_reservation_gets_room_when_another_releases() -> None:
    b = budget(400)
    first, second = b.open(), b.open()
    assert first.try_grow(150)
    waiter = asyncio.create_task(second.grow(100, within=30))
    await asyncio.sleep(0)
    assert b.waiting == 1
    assert not waiter.done()
    first.release()
    assert await waiter
    assert b.reserved == 200


async def test_no_room_within_the_wait_spills_the_reservation() -> None:
    """The wait ends after `within` seconds; the reservation then holds nothing."""
    b = budget(400)
    first, second = b.open(), b.open()
    assert first.try_grow(150)
    # second holds a little, and first (not waiting) keeps its room: no deadlock, a timeout
    assert not await second.grow(100, within=0.05)
    assert second.held == 0
    assert b.reserved == first.held
    assert b.spills == 1


async def test_when_every_holder_waits_the_youngest_is_spilled_and_the_oldest_proceeds() -> None:
    """Two messages each hold half and both need more: no room can come, so the younger one
    gives its room back at once (its session answers 452) and the older one gets it."""
    b = budget(400)
    older, younger = b.open(), b.open()
    assert older.try_grow(100)  # 200
    assert younger.try_grow(100)  # 200: the budget is full
    older_wait = asyncio.create_task(older.grow(100, within=30))
    await asyncio.sleep(0)
    assert not older_wait.done()  # younger is still receiving: it may release
    assert not await younger.grow(100, within=30)  # now both would wait: younger spills
    assert await older_wait
    assert younger.held == 0
    assert b.spills == 1


async def test_room_goes_to_the_oldest_waiter_first() -> None:
    b = budget(300)
    holder, older, younger = b.open(), b.open(), b.open()
    assert holder.try_grow(150)  # 300: full
    older_wait = asyncio.create_task(older.grow(100, within=30))  # needs 200
    await asyncio.sleep(0)
    younger_wait = asyncio.create_task(younger.grow(10, within=30))  # needs 100
    await asyncio.sleep(0)
    holder.release()
    assert await older_wait
    await asyncio.sleep(0)
    # younger fits too (200 + 100 <= 300) once older was served
    assert await younger_wait
    assert b.reserved == 300


async def test_a_younger_request_does_not_overtake_an_older_waiter() -> None:
    b = budget(300)
    holder, older, younger = b.open(), b.open(), b.open()
    assert holder.try_grow(100)  # 200
    older_wait = asyncio.create_task(older.grow(100, within=30))  # needs 200: waits
    await asyncio.sleep(0)
    assert not younger.try_grow(10)  # 100 would fit, but older is waiting
    holder.release()
    assert await older_wait


async def test_a_declared_size_is_reserved_whole_before_reading() -> None:
    b = budget(1000)
    r = b.open()
    assert await r.admit(300, within=1)
    assert b.reserved == 300 * COPIES
    assert r.try_grow(300)  # already covered
    assert b.reserved == 300 * COPIES


async def test_a_declared_size_waits_for_room_then_is_refused_after_the_wait() -> None:
    b = budget(1000)
    holder, declared = b.open(), b.open()
    assert holder.try_grow(400)  # 800
    assert not await declared.admit(300, within=0.05)
    assert declared.held == 0
    assert b.reserved == 800


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    """A client that hangs up while waiting: its session's task is cancelled."""
    b = budget(400)
    holder, waiter = b.open(), b.open()
    assert holder.try_grow(200)
    task = asyncio.create_task(waiter.grow(10, within=30))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    waiter.release()
    assert b.waiting == 0
    assert b.reserved == 400


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DataMemoryBudget(0)
