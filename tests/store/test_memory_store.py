"""MemoryStore (relay/testing/memory_store.py) passes the Store contract, and its failure switch
fails writes the way a full or read-only disk does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.store.protocol import Store, StoreUnavailableError
from relay.testing.memory_store import MemoryStore
from tests.store.contract import MESSAGE, NOW, StoreContract, counts, entry


class TestMemoryStoreContract(StoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        store = MemoryStore()
        await store.recover()
        yield store
        await store.close()

    async def restart(self, store: Store) -> Store:
        assert isinstance(store, MemoryStore)
        return store.restarted()

    def damage(self, store: Store, queue_id: str, message: bytes) -> None:
        assert isinstance(store, MemoryStore)
        store.damage(queue_id, message)

    async def bounded_history(self, store: Store) -> tuple[Store, int]:
        small = MemoryStore(history_limit=12)
        await small.recover()
        return small, 12


@pytest.fixture
async def memory() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    await store.recover()
    yield store
    await store.close()


async def test_fail_writes_makes_put_unavailable_and_stores_nothing(memory: MemoryStore) -> None:
    memory.fail_writes = True
    with pytest.raises(StoreUnavailableError):
        await memory.put(entry(), MESSAGE)
    assert not memory.has_room_for(0)
    memory.fail_writes = False
    assert await memory.find("Q1") is None
    assert counts(await memory.stats(NOW)) == (0, 0, 0, 0, 0)


async def test_fail_next_fails_exactly_that_many_writes(memory: MemoryStore) -> None:
    await memory.put(entry(), MESSAGE)
    got = await memory.claim("Q1")
    assert got is not None
    memory.fail_next(2)
    for _ in range(2):
        with pytest.raises(StoreUnavailableError):
            await memory.complete("Q1")
    found = await memory.find("Q1")
    assert found is not None
    assert found[0] == "active"
    await memory.complete("Q1")
    assert await memory.find("Q1") is None


async def test_free_bytes_bounds_what_put_accepts(memory: MemoryStore) -> None:
    memory.free_bytes = len(MESSAGE) - 1
    assert not memory.has_room_for(len(MESSAGE))
    with pytest.raises(StoreUnavailableError, match="room"):
        await memory.put(entry(), MESSAGE)
    memory.free_bytes = len(MESSAGE)
    await memory.put(entry(), MESSAGE)
    assert await memory.read_message("Q1") == MESSAGE


async def test_a_settle_that_fails_leaves_the_entry_claimed_and_not_due(
    memory: MemoryStore,
) -> None:
    """Hardening #11 item 2: the engine keeps the outcome and tries again; meanwhile nobody may
    attempt the message, and the second try lands as if the first had."""
    await memory.put(entry(), MESSAGE)
    got = await memory.claim("Q1")
    assert got is not None
    memory.fail_next()
    with pytest.raises(StoreUnavailableError):
        await memory.bury(got, "550 5.1.1")
    assert await memory.due(NOW, 10) == []
    assert await memory.claim("Q1") is None
    assert counts(await memory.stats(NOW)) == (0, 1, 0, 0, 0)
    await memory.bury(got, "550 5.1.1")
    assert counts(await memory.stats(NOW)) == (0, 0, 1, 0, 0)
