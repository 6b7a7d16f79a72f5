"""The file store against real file-system failures: a full tmpfs and a read-only remount.

These need root (mount/umount); they skip with the reason when not root or when the sandbox
forbids mounting. No fault injection here: the kernel itself says ENOSPC and EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.core.values import EntryMeta
from relay.store.files import FileStore
from relay.store.files.spool import Spool, SpoolUnavailableError
from relay.store.protocol import StoreUnavailableError
from tests.mounts import run, tmpfs_mount

NOW = 1_700_000_000.0


def entry(queue_id: str, size: int) -> EntryMeta:
    return EntryMeta(
        queue_id=queue_id,
        created=NOW,
        mail_from="scanner@contoso.com",
        recipients=("alice@contoso.com",),
        client="printers",
        client_ip="10.0.5.7",
        auth_object="contoso",
        mailbox="scanner@contoso.com",
        route="routes[0]",
        message_id=f"<{queue_id}@relay>",
        size=size,
    )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards."""
    with tmpfs_mount(tmp_path / "mnt", "2m") as mountpoint:
        yield mountpoint


class NoReserveSpool(Spool):
    """A spool whose free-space check always passes, so the write itself meets ENOSPC."""

    def has_room_for(self, size: int) -> bool:
        return True


def test_a_real_enospc_is_spool_unavailable_and_loses_nothing(tmpfs: Path) -> None:
    """The kernel's ENOSPC becomes SpoolUnavailableError, the half-written files are removed,
    earlier entries survive a restart, and the freed space takes the next message."""
    spool = NoReserveSpool(tmpfs / "spool", reserve_bytes=0)
    spool.open()
    earlier = {f"E{i}": os.urandom(100_000) for i in range(5)}
    for qid, data in earlier.items():
        spool.store(entry(qid, len(data)), data)
    with pytest.raises(SpoolUnavailableError) as caught:
        spool.store(entry("BIG", 3 << 20), os.urandom(3 << 20))
    assert getattr(caught.value.__cause__, "errno", None) == errno.ENOSPC
    assert list((tmpfs / "spool" / "tmp").iterdir()) == []
    assert spool.find("BIG") is None
    spool.store(entry("AFTER", 1000), b"x" * 1000)
    spool.close()

    restarted = Spool(tmpfs / "spool", reserve_bytes=0)
    report = restarted.open()
    try:
        assert (report.orphans_removed, report.temp_removed, report.corrupt) == (0, 0, 0)
        for qid, data in earlier.items():
            assert restarted.read_data(qid) == data
        assert {m.queue_id for m in restarted.list("queue")} == {*earlier, "AFTER"}
    finally:
        restarted.close()


def test_the_reserve_refuses_before_the_disk_fills(tmpfs: Path) -> None:
    """With a 1 MiB reserve on a 2 MiB file system, a 1.5 MiB message is refused up front."""
    spool = Spool(tmpfs / "spool", reserve_bytes=1 << 20)
    spool.open()
    try:
        assert spool.has_room_for(100_000)
        assert not spool.has_room_for(1536 << 10)
        with pytest.raises(SpoolUnavailableError, match="reserve"):
            spool.store(entry("BIG", 1536 << 10), b"x" * (1536 << 10))
        assert list((tmpfs / "spool" / "data").iterdir()) == []
    finally:
        spool.close()


def test_a_read_only_spool_refuses_new_mail_and_keeps_the_old(tmpfs: Path) -> None:
    """After a remount read-only (a failing disk), store and claim raise SpoolUnavailableError,
    stored messages stay readable, and the spool works again once writable."""
    spool = Spool(tmpfs / "spool", reserve_bytes=0)
    spool.open()
    try:
        spool.store(entry("OLD", 5), b"hello")
        remounted = run("mount", "-o", "remount,ro", str(tmpfs))
        if remounted.returncode != 0:
            pytest.skip(f"remounting read-only is not permitted: {remounted.stderr.strip()}")
        with pytest.raises(SpoolUnavailableError) as caught:
            spool.store(entry("NEW", 5), b"hello")
        assert getattr(caught.value.__cause__, "errno", None) == errno.EROFS
        with pytest.raises(SpoolUnavailableError):
            spool.claim("OLD")
        assert spool.read_data("OLD") == b"hello"
        found = spool.find("OLD")
        assert found is not None
        assert found[0] == "queue"
        assert run("mount", "-o", "remount,rw", str(tmpfs)).returncode == 0
        spool.store(entry("NEW", 5), b"hello")
        assert spool.claim("OLD") is not None
    finally:
        spool.close()


# --- FileStore: an outcome the disk refuses (hardening #11 item 2, the store's side) ---------

MESSAGE = b"Subject: settle\r\n\r\nbody\r\n"


async def _claimed(tmpfs: Path) -> FileStore:
    store = FileStore(tmpfs / "spool", reserve_bytes=0)
    await store.recover()
    await store.put(entry("HELD", 0), MESSAGE)
    assert await store.claim("HELD") is not None
    return store


async def _still_held(store: FileStore) -> None:
    """The refused settle changed nothing: claimed, not due, counted as active, readable."""
    found = await store.find("HELD")
    assert found is not None
    assert (found[0], found[1].attempts, found[1].crashes) == ("active", 0, 0)
    assert await store.due(NOW + 3600, 10) == []
    stats = await store.stats(NOW)
    assert (stats.queued, stats.active) == (0, 1)
    assert await store.read_message("HELD") == MESSAGE


async def test_a_settle_refused_by_a_read_only_disk_can_be_made_again(tmpfs: Path) -> None:
    """Read-only remount mid-delivery: complete raises StoreUnavailableError and leaves the entry
    claimed; once writable, the same complete succeeds: no restart, no crash counted."""
    store = await _claimed(tmpfs)
    try:
        remounted = run("mount", "-o", "remount,ro", str(tmpfs))
        if remounted.returncode != 0:
            pytest.skip(f"remounting read-only is not permitted: {remounted.stderr.strip()}")
        with pytest.raises(StoreUnavailableError) as caught:
            await store.complete("HELD")
        assert getattr(caught.value.__cause__, "errno", None) == errno.EROFS
        await _still_held(store)
        assert run("mount", "-o", "remount,rw", str(tmpfs)).returncode == 0
        await store.complete("HELD")
        assert await store.find("HELD") is None
        assert (await store.stats(NOW)).active == 0
    finally:
        await store.close()


async def test_a_defer_refused_by_a_full_disk_can_be_made_again(tmpfs: Path) -> None:
    """ENOSPC while recording a deferral: the entry stays claimed with its old fields; once space
    is freed, the same defer lands and the entry is due at its new time."""
    store = await _claimed(tmpfs)
    filler = tmpfs / "filler"
    try:
        with filler.open("wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        held = await store.find("HELD")
        assert held is not None
        later = replace(held[1], attempts=1, next_attempt=NOW + 60, last_error="451 busy")
        with pytest.raises(StoreUnavailableError) as caught:
            await store.defer(later)
        assert getattr(caught.value.__cause__, "errno", None) == errno.ENOSPC
        await _still_held(store)
        filler.unlink()
        await store.defer(later)
        assert [e.queue_id for e in await store.due(NOW + 60, 10)] == ["HELD"]
        assert await store.find("HELD") == ("queue", later)
    finally:
        await store.close()
