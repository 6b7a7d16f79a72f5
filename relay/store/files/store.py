"""`FileStore`: the `Store` protocol over the durable file spool, for the asyncio relay.

Why this module exists: the delivery engine and the SMTP layer are asyncio code and talk to a
`relay.store.protocol.Store`; the spool (`Spool`, spool.py) is blocking, fsync-bound code. This
class runs every spool call on the store's own thread pool (the loop's default pool is small and
shared with DNS and MSAL) and keeps the in-memory index (`relay.store.index.StoreIndex`) that
answers `due`, `next_due` and `stats` without touching the disk (hardening #7).

Theory of operation
-------------------
The disk is the truth; the index is this process's view of it. Each call does its disk work and
then updates the index in the same worker thread, under one lock, so a caller cancelled while the
thread runs (shutdown, a timeout) cannot leave the index behind the disk. Other processes (the
`queue` CLI, an operator's `mv`) change the disk behind our back: `refresh` (the engine calls it
every few seconds) rescans the five directories with one readdir each and reads only metadata it
has not seen (a rewrite is a new inode), so a 20k backlog costs five listings, not 20k reads.
Entries this process moved while a rescan ran keep what the move recorded: the rescan may have
looked before the move. Between rescans the index can only be stale in one direction that
matters (an entry the CLI deleted is still listed as due): `claim` then finds nothing, returns
None and drops it.

Opening: `recover()` for the relay (takes the lock, runs recovery, then a full rescan), or
`open_for_operator()` for the CLI (no lock, no recovery: the relay may be running; the relay's
moves raise RuntimeError, the operator commands work).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, ParamSpec, TypeVar

from relay.core.budgets import SendRecord
from relay.core.history import HistoryQuery, HistoryRecord
from relay.core.values import EntryMeta, State
from relay.store.files import operator, paused
from relay.store.files.history import SEGMENT_RECORDS, SEGMENTS, FileHistory, HistoryFiles
from relay.store.files.layout import LIVE, CorruptEntryError, EntrySetAsideError, Layout
from relay.store.files.ledger import SendLedger
from relay.store.files.recovery import StoreLockedError
from relay.store.files.spool import Spool
from relay.store.index import StoreIndex
from relay.store.protocol import MailboxKey, RecoveryReport, StoreStats, StoreUnavailableError

__all__ = ["FileStore", "StoreLockedError"]

_log = logging.getLogger("relay.store")
P = ParamSpec("P")
T = TypeVar("T")
_Seen = tuple[State, int, EntryMeta]  # where, the inode read, what it said
_UNREAD = -1  # an inode no metadata file has: read it again at the next rescan


class FileStore:
    """The embedded store under `root` (layout and rules: `relay.store.files`)."""

    def __init__(
        self,
        root: Path,
        *,
        reserve_bytes: int,
        fsync: bool = True,
        threads: int = 32,
        history_bound: tuple[int, int] = (SEGMENT_RECORDS, SEGMENTS),  # records per segment, old
    ) -> None:
        self.spool = Spool(root, reserve_bytes=reserve_bytes, fsync=fsync)
        self.root = self.spool.root
        self.layout: Layout = self.spool.layout
        self.ledger = SendLedger(self.root, fsync=fsync)
        records, segments = history_bound
        self.history_files = FileHistory(
            self.root, fsync=fsync, segment_records=records, segments=segments
        )
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store")
        self._lock = threading.Lock()
        self._index = StoreIndex()
        self._seen: dict[str, _Seen] = {}
        self._touched: set[str] | None = None  # ids moved while a rescan runs
        self._rescanning = asyncio.Lock()  # one rescan at a time: they share `_touched`
        self._mode: Literal["closed", "relay", "operator"] = "closed"
        self._paused: frozenset[MailboxKey] = frozenset()  # paused.json as of the last refresh

    def has_room_for(self, size: int) -> bool:
        """Whether `size` more bytes leave the reserve free (the SMTP back-pressure check)."""
        return self.spool.has_room_for(size)

    # --- lifecycle ----------------------------------------------------------------------------

    async def recover(self) -> RecoveryReport:
        """Take the lock, recover (StoreLockedError if another relay holds it), rescan."""
        if self._mode != "closed":
            raise RuntimeError("store already open")
        report = await self._run(self.spool.open)
        self._mode = "relay"
        await self.refresh()
        try:
            await self._run(self.ledger.compact)
        except StoreUnavailableError as exc:  # read-only: the ledger is still readable
            _log.warning("cannot compact the send ledger: %s", exc, extra={"event": "ledger"})
        return report

    async def open_for_operator(self) -> None:
        """Open for the `queue` CLI beside a running relay: no lock, no recovery."""
        if self._mode != "closed":
            raise RuntimeError("store already open")
        self._mode = "operator"
        await self.refresh()

    async def close(self) -> None:
        self.spool.close()
        self._mode = "closed"
        self._threads.shutdown(wait=False)  # every call awaited its thread: none is running

    # --- the relay's operations ---------------------------------------------------------------

    async def put(self, entry: EntryMeta, message: bytes, *, claimed: bool = False) -> None:
        def put() -> None:
            stored = self.spool.store(entry, message, claimed=claimed)
            self._place(stored, "active" if claimed else "queue")

        await self._run(put)

    async def due(
        self, now: float, limit: int, exclude: Collection[MailboxKey] = ()
    ) -> Sequence[EntryMeta]:
        with self._lock:
            return self._index.due(now, limit, exclude)

    async def next_due(self) -> float | None:
        with self._lock:
            return self._index.next_due()

    async def claim(self, queue_id: str) -> EntryMeta | None:
        def claim() -> EntryMeta | None:
            got = self.spool.claim(queue_id)
            if got is not None:
                self._place(got, "active")
            else:
                with self._lock:  # gone from queue/ (taken, deleted, set aside): stop listing it
                    if self._index.state_of(queue_id) == "queue":
                        self._forget_locked(queue_id)
            return got

        return await self._run(claim)

    async def read_message(self, queue_id: str) -> bytes:
        def read() -> bytes:
            try:
                return self.spool.read_data(queue_id)
            except EntrySetAsideError:
                with self._lock:
                    self._forget_locked(queue_id)
                    self._index.count_corrupt(+1)
                raise

        return await self._run(read)

    async def complete(self, queue_id: str) -> None:
        await self._run(self._then_forget, self.spool.complete, queue_id)

    async def defer(self, entry: EntryMeta) -> None:
        await self._run(lambda: self._place(self.spool.defer(entry), "queue"))

    async def bury(self, entry: EntryMeta, reason: str) -> None:
        await self._run(lambda: self._place(self.spool.bury(entry, reason), "dead"))

    async def quarantine(self, entry: EntryMeta, reason: str) -> None:
        await self._run(lambda: self._place(self.spool.quarantine(entry, reason), "quarantine"))

    async def release(self, queue_id: str) -> None:
        def release() -> None:
            self.spool.release(queue_id)
            with self._lock:
                seen = self._seen.get(queue_id)
            found = (seen[0], seen[2]) if seen else self.spool.find(queue_id)
            if found is not None:
                self._place(found[1], "queue")

        await self._run(release)

    async def discard(self, queue_id: str) -> None:
        await self._run(self._then_forget, self.spool.discard, queue_id)

    async def refresh(self) -> None:
        """Rescan the directories (module docstring): one readdir each, unseen metadata read."""
        if self._mode == "closed":
            raise RuntimeError("recover() or open_for_operator() must run first")
        async with self._rescanning:
            await self._run(self._rescan)
        self._paused = await self._run(paused.read, self.layout)

    async def stats(self, now: float) -> StoreStats:
        """From the index: no file-system call at all."""
        with self._lock:
            return self._index.stats(now)

    async def waiting(self) -> Mapping[MailboxKey, Sequence[int]]:
        with self._lock:
            return self._index.waiting()

    # --- the send ledger (ledger.py) ----------------------------------------------------------

    async def record_sends(self, records: Sequence[SendRecord]) -> None:
        def record() -> None:
            self.ledger.append(records)
            self.ledger.compact_if_grown()

        if records:
            await self._run(record)

    async def sends_since(self, since: float) -> Sequence[SendRecord]:
        found = await self._run(self.ledger.read_since, since)
        return sorted(found, key=lambda r: r.at)

    # --- the delivery history (history.py) ---------------------------------------------------

    @staticmethod
    def history_only(root: Path) -> HistoryFiles:
        """The history files under `root` without the spool: a direct-mode relay's history."""
        return HistoryFiles(FileHistory(root))

    async def record_history(self, records: Sequence[HistoryRecord]) -> None:
        if records:
            await self._run(self.history_files.append, records)

    async def history(self, query: HistoryQuery) -> Sequence[HistoryRecord]:
        return await self._run(self.history_files.search, query)

    async def prune_history(self, before: float) -> int:
        return await self._run(self.history_files.prune, before)

    # --- operator commands --------------------------------------------------------------------

    async def list(self, state: State) -> Sequence[EntryMeta]:
        return await self._run(self.spool.list, state)

    async def find(self, queue_id: str) -> tuple[State, EntryMeta] | None:
        return await self._run(self.spool.find, queue_id)

    async def retry(self, queue_id: str) -> bool:
        def retry() -> bool:
            done = operator.retry(self.layout, queue_id)
            if done is not None:
                self._place(done[1], "queue")
            return done is not None

        return await self._run(retry)

    async def delete(self, queue_id: str) -> bool:
        def delete() -> bool:
            return self._deleted([(queue_id, operator.delete(self.layout, queue_id))]) == 1

        return await self._run(delete)

    async def purge(self, state: State) -> int:
        return await self._run(lambda: self._deleted(operator.purge(self.layout, state)))

    # --- hold and pause (operator.py, paused.py) -----------------------------------------------

    async def hold(self, queue_id: str) -> bool:
        def hold() -> bool:
            held = operator.hold(self.layout, queue_id)
            if held is not None:
                self._place(held, "hold")
            return held is not None

        return await self._run(hold)

    async def unhold(self, queue_id: str) -> bool:
        def unhold() -> bool:
            queued = operator.unhold(self.layout, queue_id)
            if queued is not None:
                self._place(queued, "queue")
            return queued is not None

        return await self._run(unhold)

    async def paused_mailboxes(self) -> frozenset[MailboxKey]:
        return self._paused

    async def pause_mailbox(self, key: MailboxKey) -> None:
        self._paused = await self._run(paused.change, self.layout, lambda now: now | {key})

    async def resume_mailbox(self, key: MailboxKey) -> None:
        self._paused = await self._run(paused.change, self.layout, lambda now: now - {key})

    # --- the index (each runs in a worker thread, right after the disk work) ------------------

    async def _run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(call, *args, **kwargs))

    def _place(self, entry: EntryMeta, state: State) -> None:
        with self._lock:
            self._index.place(entry, state)
            self._seen[entry.queue_id] = (state, _UNREAD, entry)
            if self._touched is not None:
                self._touched.add(entry.queue_id)

    def _forget_locked(self, queue_id: str) -> None:
        self._index.remove(queue_id)
        self._seen.pop(queue_id, None)
        if self._touched is not None:
            self._touched.add(queue_id)

    def _then_forget(self, call: Callable[[str], None], queue_id: str) -> None:
        call(queue_id)
        with self._lock:
            self._forget_locked(queue_id)

    def _deleted(self, removed: Iterable[tuple[str, State | None]]) -> int:
        count = 0
        with self._lock:
            for queue_id, was in removed:
                if was is None:
                    continue
                count += 1
                if was == "corrupt":
                    self._index.count_corrupt(-1)
                self._forget_locked(queue_id)
        return count

    def _rescan(self) -> None:
        with self._lock:
            known, self._touched = dict(self._seen), set()
        try:
            found, corrupt = self._scan(known)
        finally:
            with self._lock:
                touched, self._touched = self._touched or set(), None
        with self._lock:
            seen = {qid: hit for qid, hit in found.items() if qid not in touched}
            seen.update((qid, self._seen[qid]) for qid in touched if qid in self._seen)
            self._seen = seen
            self._index.rebuild(((entry, state) for state, _, entry in seen.values()), corrupt)

    def _scan(self, known: dict[str, _Seen]) -> tuple[dict[str, _Seen], int]:
        """Every live entry on disk, reading only metadata not seen before; corrupt ids."""
        found: dict[str, _Seen] = {}
        for state in LIVE:  # the preferred copy of an id found twice (mid-rename) comes first
            for qid, inode in self.layout.scan(state):
                if qid in found:
                    continue
                hit = known.get(qid)
                if hit is not None and hit[:2] == (state, inode):
                    found[qid] = hit
                    continue
                try:
                    entry = self.layout.load(state, qid)
                except CorruptEntryError as exc:
                    if state != "active":  # active/ belongs to the worker holding it
                        with contextlib.suppress(OSError):
                            self.layout.set_aside(state, qid, str(exc))
                    continue
                if entry is not None:  # None: moved since the listing; the next rescan sees it
                    found[qid] = (state, inode, entry)
        return found, len(self.layout.corrupt_ids())
