"""INTERIM: today's `Spool` behind the `Store` protocol, until the store helper's `FileStore` lands.

Why this module exists: the delivery engine now talks to `relay.store.protocol.Store` only, and
the service must run (and the integration suite pass) on the branch that made that change,
before `relay.store.files.store.FileStore` (branch `store`) is merged. This adapter is thin on
purpose: blocking spool calls on a thread pool, the spool's errors converted into the protocol's,
and scans where `FileStore` keeps an index. Delete it when `FileStore` is wired in `service.py`
(same constructor shape: `(root, *, reserve_bytes)` and a `.spool` attribute).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from relay.core.values import EntryMeta, State
from relay.store.files import spool as files
from relay.store.protocol import (
    EntryNotFoundError,
    MailboxKey,
    RecoveryReport,
    StoreStats,
    StoreUnavailableError,
)

__all__ = ["InterimFileStore"]

T = TypeVar("T")


@contextmanager
def _converted() -> Iterator[None]:
    try:
        yield
    except files.SpoolUnavailableError as exc:
        raise StoreUnavailableError(str(exc)) from exc
    except files.EntryNotFoundError as exc:
        raise EntryNotFoundError(str(exc)) from exc


class InterimFileStore:
    """`Store` over `Spool` (see the module docstring)."""

    def __init__(self, root: Path, *, reserve_bytes: int, threads: int = 32) -> None:
        self.spool = files.Spool(root, reserve_bytes=reserve_bytes)
        self.root = self.spool.root
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")

    async def _io(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        def run() -> T:
            with _converted():
                return call(*args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._threads, partial(run))

    async def recover(self) -> RecoveryReport:
        report = await self._io(self.spool.open)
        return RecoveryReport(
            report.requeued, report.quarantined, report.corrupt, report.orphans_removed, 0
        )

    async def close(self) -> None:
        self.spool.close()
        self._threads.shutdown(wait=False)

    async def put(self, entry: EntryMeta, message: bytes, *, claimed: bool = False) -> None:
        await self._io(self.spool.store, entry, message, claimed=claimed)

    async def due(
        self, now: float, limit: int, exclude: Collection[MailboxKey] = ()
    ) -> Sequence[EntryMeta]:
        entries = await self._io(self.spool.due, now)
        kept = [e for e in entries if (e.auth_object, e.mailbox.casefold()) not in exclude]
        return kept[:limit]

    async def next_due(self) -> float | None:
        return await self._io(self.spool.next_due_time)

    async def claim(self, queue_id: str) -> EntryMeta | None:
        return await self._io(self.spool.claim, queue_id)

    async def read_message(self, queue_id: str) -> bytes:
        return await self._io(self.spool.read_data, queue_id)

    async def complete(self, queue_id: str) -> None:
        await self._io(self.spool.complete, queue_id)

    async def defer(self, entry: EntryMeta) -> None:
        await self._io(self.spool.defer, entry)

    async def bury(self, entry: EntryMeta, reason: str) -> None:
        await self._io(self.spool.bury, entry, reason)

    async def quarantine(self, entry: EntryMeta, reason: str) -> None:
        def move() -> None:
            spool = self.spool
            spool._require_active(entry.queue_id)
            with files._io(f"cannot quarantine {entry.queue_id}"):
                spool._rewrite("active", replace(entry, dead_reason=reason))
                spool._move("active", "quarantine", entry.queue_id)

        await self._io(move)

    async def release(self, queue_id: str) -> None:
        await self._io(self.spool.release, queue_id)

    async def discard(self, queue_id: str) -> None:
        await self._io(self.spool.discard, queue_id)

    async def refresh(self) -> None:
        """Nothing to do: every call above reads the directories."""

    async def stats(self, now: float) -> StoreStats:
        s = await self._io(self.spool.stats, now)
        return StoreStats(
            s.queued, s.active, s.dead, s.quarantined, s.corrupt, s.oldest_created, s.due
        )

    async def list(self, state: State) -> Sequence[EntryMeta]:
        return await self._io(self.spool.list, state)

    async def find(self, queue_id: str) -> tuple[State, EntryMeta] | None:
        return await self._io(self.spool.find, queue_id)

    async def retry(self, queue_id: str) -> bool:
        return await self._io(self.spool.retry, queue_id)

    async def delete(self, queue_id: str) -> bool:
        return await self._io(self.spool.delete, queue_id)

    async def purge(self, state: State) -> int:
        return await self._io(self.spool.purge, state)
