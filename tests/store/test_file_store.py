"""FileStore (relay/store/files/store.py) passes the Store contract on a real directory, and
keeps the promises only a file store has to make: the lock, operator use beside a running relay,
rescans that take in what the CLI changed, stats that never scan (hardening #7), and a damaged
data file that is set aside instead of delivered."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.core.budgets import SendRecord
from relay.core.values import EntryMeta, State
from relay.store.files import FileStore, StoreLockedError
from relay.store.integrity import digest
from relay.store.protocol import EntryNotFoundError, Store, StoreUnavailableError
from tests.store.contract import MESSAGE, NOW, StoreContract, counts, entry


class TestFileStoreContract(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        self.opened: list[FileStore] = [FileStore(tmp_path / "spool", reserve_bytes=0)]
        await self.opened[0].recover()
        yield self.opened[0]
        for store in self.opened:
            await store.close()

    async def restart(self, store: Store) -> Store:
        assert isinstance(store, FileStore)
        await store.close()  # the kernel drops a dead process's flock; the files stay
        again = FileStore(store.root, reserve_bytes=0)
        self.opened.append(again)
        return again

    def damage(self, store: Store, queue_id: str, message: bytes) -> None:
        assert isinstance(store, FileStore)
        (store.root / "data" / f"{queue_id}.eml").write_bytes(message)

    async def bounded_history(self, store: Store) -> tuple[Store, int]:
        assert isinstance(store, FileStore)
        small = FileStore(store.root.parent / "bounded", reserve_bytes=0, history_bound=(4, 2))
        self.opened.append(small)
        await small.recover()
        return small, 12  # (2 old segments + the current one) x 4 records


async def test_a_second_relay_on_the_same_spool_is_refused(relay: FileStore) -> None:
    other = FileStore(relay.root, reserve_bytes=0)
    with pytest.raises(StoreLockedError):
        await other.recover()
    await other.close()


async def test_operator_use_takes_no_lock_and_runs_no_recovery(relay: FileStore) -> None:
    await relay.put(entry(), MESSAGE, claimed=True)
    cli = FileStore(relay.root, reserve_bytes=0)
    await cli.open_for_operator()
    found = await cli.find("Q1")
    assert found is not None
    assert (found[0], found[1].crashes) == ("active", 0)  # recovery would have requeued it
    assert counts(await cli.stats(NOW)) == (0, 1, 0, 0, 0)
    with pytest.raises(RuntimeError, match="recover"):
        await cli.claim("Q1")
    await cli.close()


async def test_operator_use_of_a_missing_spool_finds_nothing(tmp_path: Path) -> None:
    cli = FileStore(tmp_path / "nowhere", reserve_bytes=0)
    await cli.open_for_operator()
    assert counts(await cli.stats(NOW)) == (0, 0, 0, 0, 0)
    assert await cli.find("Q1") is None
    assert await cli.list("dead") == []
    assert not (tmp_path / "nowhere").exists()
    await cli.close()


async def test_refresh_takes_in_what_the_cli_retried(relay: FileStore, cli: FileStore) -> None:
    await relay.put(entry(), MESSAGE)
    got = await relay.claim("Q1")
    assert got is not None
    await relay.bury(got, "550 5.1.1 no such user")
    assert await cli.retry("Q1") is True
    assert counts(await relay.stats(NOW)) == (0, 0, 1, 0, 0)  # not yet looked
    await relay.refresh()
    assert counts(await relay.stats(NOW)) == (1, 0, 0, 0, 0)
    assert [e.queue_id for e in await relay.due(NOW, 10)] == ["Q1"]


async def test_refresh_takes_in_a_queued_entry_the_cli_made_due_now(
    relay: FileStore, cli: FileStore
) -> None:
    await relay.put(entry(next_attempt=NOW + 3600), MESSAGE)
    assert await cli.retry("Q1") is True
    assert await relay.due(NOW, 10) == []
    await relay.refresh()
    assert [e.next_attempt for e in await relay.due(NOW, 10)] == [0.0]


async def test_an_entry_the_cli_deleted_fails_to_claim_and_leaves_due(
    relay: FileStore, cli: FileStore
) -> None:
    await relay.put(entry(), MESSAGE)
    assert await cli.delete("Q1") is True
    assert [e.queue_id for e in await relay.due(NOW, 10)] == ["Q1"]  # a hint, not a claim
    assert await relay.claim("Q1") is None
    assert await relay.due(NOW, 10) == []
    assert counts(await relay.stats(NOW)) == (0, 0, 0, 0, 0)


async def test_stats_due_and_next_due_never_touch_the_disk(tmp_path: Path) -> None:
    """Hardening #7: a scrape at a large backlog costs no directory listing and no file read."""
    store = FileStore(tmp_path / "spool", reserve_bytes=0, fsync=False)
    await store.recover()
    for n in range(2000):
        await store.put(entry(f"Q{n:05}", created=NOW + n, next_attempt=NOW + n % 7), MESSAGE)
    before = (store.layout.scans, store.layout.reads)
    for _ in range(50):
        stats = await store.stats(NOW + 3)
        await store.due(NOW + 3, 100)
        await store.next_due()
    assert (store.layout.scans, store.layout.reads) == before
    assert (stats.queued, stats.due, stats.oldest_created) == (
        2000,
        sum(n % 7 <= 3 for n in range(2000)),
        NOW,
    )
    await store.close()


async def test_a_rescan_reads_only_metadata_it_has_not_seen(relay: FileStore) -> None:
    for n in range(20):
        await relay.put(entry(f"Q{n}"), MESSAGE)
    await relay.refresh()  # puts were recorded, not read: this rescan reads them once
    reads = relay.layout.reads
    await relay.refresh()
    assert relay.layout.reads == reads
    meta = json.loads((relay.root / "queue" / "Q3.json").read_bytes())
    meta["next_attempt"] = NOW + 60  # an operator's edit: a new file, so a new inode
    (relay.root / "tmp" / "edit").write_text(json.dumps(meta))
    os.replace(relay.root / "tmp" / "edit", relay.root / "queue" / "Q3.json")
    await relay.refresh()
    assert relay.layout.reads == reads + 1
    assert "Q3" not in [e.queue_id for e in await relay.due(NOW, 100)]


async def test_refresh_sets_aside_and_counts_unreadable_metadata(relay: FileStore) -> None:
    await relay.put(entry(), MESSAGE)
    (relay.root / "queue" / "Q2.json").write_bytes(b"{not json")
    await relay.refresh()
    stats = await relay.stats(NOW)
    assert (stats.queued, stats.corrupt) == (1, 1)
    assert sorted(p.name for p in (relay.root / "corrupt").iterdir()) == ["Q2.json"]


async def test_a_truncated_data_file_is_set_aside_not_delivered(relay: FileStore) -> None:
    """Hardening #7: power loss cut the data file short; Graph must not get half a message."""
    await relay.put(entry(), MESSAGE)
    got = await relay.claim("Q1")
    assert got is not None
    os.truncate(relay.root / "data" / "Q1.eml", len(MESSAGE) // 2)
    with pytest.raises(EntryNotFoundError, match="corrupt"):
        await relay.read_message("Q1")
    assert sorted(p.name for p in (relay.root / "corrupt").iterdir()) == ["Q1.eml", "Q1.json"]
    assert list((relay.root / "active").iterdir()) == []
    assert counts(await relay.stats(NOW)) == (0, 0, 0, 0, 1)


async def test_a_version_1_entry_without_a_digest_is_checked_by_size(relay: FileStore) -> None:
    await relay.put(entry(), MESSAGE)
    path = relay.root / "queue" / "Q1.json"
    body = json.loads(path.read_bytes())
    del body["sender"], body["sha256"], body["waited"], body["waited_to"]
    path.write_text(json.dumps({**body, "version": 1}))
    assert await relay.read_message("Q1") == MESSAGE
    (relay.root / "data" / "Q1.eml").write_bytes(MESSAGE.replace(b"body", b"bodY"))
    assert await relay.read_message("Q1") == MESSAGE.replace(b"body", b"bodY")  # same size
    (relay.root / "data" / "Q1.eml").write_bytes(MESSAGE + b"tail")
    with pytest.raises(EntryNotFoundError, match="corrupt"):
        await relay.read_message("Q1")


async def test_put_writes_the_digest_into_the_metadata_file(relay: FileStore) -> None:
    await relay.put(entry(), MESSAGE)
    stored = EntryMeta.from_json((relay.root / "queue" / "Q1.json").read_bytes())
    assert (stored.size, stored.sha256) == (len(MESSAGE), digest(MESSAGE))


async def test_a_claim_cancelled_while_its_thread_runs_still_updates_the_index(
    tmp_path: Path,
) -> None:
    """Shutdown cancels waiting tasks; a rename already under way happens anyway, and the index
    must say so (work not yet started is cancelled with the task and changes nothing)."""
    store = FileStore(tmp_path / "spool", reserve_bytes=0, threads=1)
    await store.recover()
    await store.put(entry(), MESSAGE)
    started, gate = threading.Event(), threading.Event()
    real = store.spool.claim

    def slow_claim(queue_id: str) -> EntryMeta | None:
        started.set()
        gate.wait(10)
        return real(queue_id)

    store.spool.claim = slow_claim  # type: ignore[method-assign]
    claim = asyncio.create_task(store.claim("Q1"))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, started.wait, 10)
    claim.cancel()
    gate.set()
    await loop.run_in_executor(store._threads, lambda: None)  # the one thread is done with it
    assert claim.cancelled()
    assert (store.root / "active" / "Q1.json").exists()
    assert counts(await store.stats(NOW)) == (0, 1, 0, 0, 0)
    assert await store.due(NOW, 10) == []
    await store.close()


async def test_the_store_runs_file_io_on_its_own_threads(relay: FileStore) -> None:
    names: list[str] = []
    real = relay.spool.store

    def spy(meta: EntryMeta, data: bytes, *, claimed: bool = False) -> EntryMeta:
        names.append(threading.current_thread().name)
        return real(meta, data, claimed=claimed)

    relay.spool.store = spy  # type: ignore[method-assign]
    await relay.put(replace(entry()), MESSAGE)
    assert names[0].startswith("store")


async def test_a_claim_made_while_a_rescan_runs_is_not_undone_by_it(relay: FileStore) -> None:
    """The rescan lists queue/ before the claim and active/ after it, so it sees Q1 as queued;
    the claim's own record must win, or the entry would be listed as due while claimed."""
    await relay.put(entry(), MESSAGE)
    listed_queue, gate = threading.Event(), threading.Event()
    real = relay.layout.scan

    def paused_scan(state: State) -> list[tuple[str, int]]:
        if state == "quarantine":  # queue/ has been listed
            listed_queue.set()
            gate.wait(10)
        return real(state)

    relay.layout.scan = paused_scan  # type: ignore[method-assign]
    rescan = asyncio.create_task(relay.refresh())
    await asyncio.get_running_loop().run_in_executor(None, listed_queue.wait, 10)
    assert await relay.claim("Q1") is not None
    gate.set()
    await rescan
    assert counts(await relay.stats(NOW)) == (0, 1, 0, 0, 0)
    assert await relay.due(NOW, 10) == []
    relay.layout.scan = real  # type: ignore[method-assign]
    await relay.refresh()  # and the next rescan, with nothing racing it, agrees
    assert counts(await relay.stats(NOW)) == (0, 1, 0, 0, 0)


# --- the send ledger (relay/store/files/ledger.py) ---------------------------------------------


def _send(at: float, recipients: int = 1) -> SendRecord:
    return SendRecord(at, "contoso", "scanner@contoso.com", 1, recipients, 1, 0)


async def test_a_torn_last_ledger_line_is_skipped(relay: FileStore) -> None:
    """kill -9 in the middle of an append leaves half a line; the sends before it still count."""
    await relay.record_sends([_send(NOW - 2), _send(NOW - 1)])
    path = relay.ledger.path
    path.write_bytes(path.read_bytes() + b'{"at":1700000000.0,"auth_obj')
    assert [r.at for r in await relay.sends_since(0.0)] == [NOW - 2, NOW - 1]


async def test_compaction_keeps_one_day_before_the_newest_send(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "spool", reserve_bytes=0)
    await store.recover()
    await store.record_sends([_send(NOW - 90_000), _send(NOW - 80_000), _send(NOW)])
    await store.close()
    again = FileStore(tmp_path / "spool", reserve_bytes=0)
    await again.recover()  # compacts
    assert [r.at for r in await again.sends_since(0.0)] == [NOW - 80_000, NOW]
    assert len(again.ledger.path.read_bytes().splitlines()) == 2
    await again.close()


async def test_a_ledger_that_cannot_be_written_is_a_store_unavailable_error(
    relay: FileStore,
) -> None:
    relay.ledger.path.unlink()
    relay.ledger.path.mkdir()  # an append now fails with EISDIR, as EROFS/ENOSPC would
    with pytest.raises(StoreUnavailableError, match="send ledger"):
        await relay.record_sends([_send(NOW)])


def test_a_version_2_entry_is_read_with_nothing_waited() -> None:
    body = json.loads(entry().to_json())
    del body["waited"], body["waited_to"]
    body["version"] = 2
    assert EntryMeta.from_json(json.dumps(body).encode()) == entry()
    body["waited"] = 5.0
    with pytest.raises(ValueError, match="version 2 metadata cannot have"):
        EntryMeta.from_json(json.dumps(body).encode())
