"""`MemoryStore`: the `Store` protocol kept in a dict, for tests of everything above the store.

Why this module exists: the delivery engine's tests need a store that behaves exactly like the
file store (same states, moves, errors and stats) without a disk, and that can be made to fail on
demand, as a full or read-only disk does. It passes the contract suite every store passes
(`tests/store/contract.py`), so a test that passes against it says something about the real
thing. It is not durable: `restarted()` stands in for a process that died with its records kept.

Failure switch: set `fail_writes = True` (every write raises StoreUnavailableError until reset),
or call `fail_next(n)` (the next n writes raise it). `free_bytes` bounds what `put` accepts and
what `has_room_for` answers. A write that fails changes nothing. Reads never fail.

`damage(queue_id, message)` replaces the stored bytes without updating the record, as a disk that
lost the tail of a file does: the next `read_message` sets the entry aside as corrupt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from relay.core.budgets import SendRecord
from relay.core.history import HistoryQuery, HistoryRecord, select
from relay.core.limits import CRASH_LIMIT
from relay.core.values import EntryMeta, State, check_queue_id
from relay.store.index import StoreIndex
from relay.store.integrity import mismatch, sealed
from relay.store.protocol import (
    EntryNotFoundError,
    MailboxKey,
    RecoveryReport,
    StoreStats,
    StoreUnavailableError,
    crash_reason,
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Record:
    state: State
    entry: EntryMeta
    message: bytes


class MemoryStore:
    """An in-memory `Store`; see the module docstring for the failure switch."""

    def __init__(self, *, free_bytes: int | None = None, history_limit: int = 100_000) -> None:
        self.fail_writes = False
        self.history_limit = history_limit  # the bound: the oldest records go first
        self.free_bytes = free_bytes  # None = unbounded
        self._failures = 0
        self._records: dict[str, _Record] = {}
        self._sends: list[SendRecord] = []
        self._paused: set[MailboxKey] = set()
        self._history: list[HistoryRecord] = []
        self._index = StoreIndex()
        self._open = False

    def fail_next(self, count: int = 1) -> None:
        """Make the next `count` writes raise StoreUnavailableError."""
        self._failures = count

    def damage(self, queue_id: str, message: bytes) -> None:
        """Replace the stored bytes of `queue_id` behind the store's back (see module docstring)."""
        self._records[queue_id].message = message

    def restarted(self) -> MemoryStore:
        """A new store over these records, as after kill -9: call `recover` on it next."""
        self._open = False
        again = MemoryStore(free_bytes=self.free_bytes, history_limit=self.history_limit)
        again._records = self._records
        again._sends = self._sends
        again._paused = self._paused
        again._history = self._history
        return again

    def has_room_for(self, size: int) -> bool:
        """Whether `size` more bytes fit (the SMTP layer's back-pressure check)."""
        return not self.fail_writes and (self.free_bytes is None or size <= self.free_bytes)

    # --- lifecycle ----------------------------------------------------------------------------

    async def recover(self) -> RecoveryReport:
        await self._write("recover")
        if self._open:
            raise RuntimeError("store already open")  # a second recovery would steal our claims
        requeued = quarantined = 0
        for record in self._records.values():
            if record.state != "active":
                continue
            entry = replace(record.entry, crashes=record.entry.crashes + 1, dead_reason="")
            if entry.crashes >= CRASH_LIMIT:
                record.state, quarantined = "quarantine", quarantined + 1
                entry = replace(entry, dead_reason=crash_reason(entry.crashes))
            else:
                record.state, requeued = "queue", requeued + 1
            record.entry = entry
        self._rebuild()
        self._open = True
        return RecoveryReport(requeued, quarantined, 0, orphans_removed=0, temp_removed=0)

    async def close(self) -> None:
        self._open = False

    # --- the relay's operations ---------------------------------------------------------------

    async def put(self, entry: EntryMeta, message: bytes, *, claimed: bool = False) -> None:
        self._require_open()
        entry = sealed(entry, message)
        await self._write(f"cannot store {entry.queue_id}", size=len(message))
        if entry.queue_id in self._records:
            raise ValueError(f"queue id {entry.queue_id} is already in the store")
        self._set(entry, "active" if claimed else "queue", message)

    async def due(
        self, now: float, limit: int, exclude: Collection[MailboxKey] = ()
    ) -> Sequence[EntryMeta]:
        self._require_open()
        await asyncio.sleep(0)
        return self._index.due(now, limit, exclude)

    async def next_due(self) -> float | None:
        self._require_open()
        return self._index.next_due()

    async def claim(self, queue_id: str) -> EntryMeta | None:
        self._require_open()
        await self._write(f"cannot claim {queue_id}")
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state != "queue":
            return None
        self._set(record.entry, "active")
        return record.entry

    async def read_message(self, queue_id: str) -> bytes:
        await asyncio.sleep(0)
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state == "corrupt":
            raise EntryNotFoundError(f"no message for {queue_id}")
        if why := mismatch(record.entry, record.message):
            self._set(record.entry, "corrupt")
            raise EntryNotFoundError(f"{queue_id} set aside as corrupt: {why}")
        return record.message

    async def complete(self, queue_id: str) -> None:
        await self._write(f"cannot complete {queue_id}")
        self._active(queue_id)
        self._drop(queue_id)

    async def defer(self, entry: EntryMeta) -> None:
        await self._move_active(entry, "queue")

    async def bury(self, entry: EntryMeta, reason: str) -> None:
        await self._move_active(replace(entry, dead_reason=reason), "dead")

    async def quarantine(self, entry: EntryMeta, reason: str) -> None:
        await self._move_active(replace(entry, dead_reason=reason), "quarantine")

    async def release(self, queue_id: str) -> None:
        await self._write(f"cannot release {queue_id}")
        record = self._active(queue_id)
        self._set(record.entry, "queue")

    async def discard(self, queue_id: str) -> None:
        self._require_open()
        await self._write(f"cannot discard {queue_id}")
        record = self._records.get(check_queue_id(queue_id))
        if record is not None and record.state != "corrupt":
            self._drop(queue_id)

    async def refresh(self) -> None:
        self._require_open()
        await asyncio.sleep(0)  # nobody else writes these records

    async def stats(self, now: float) -> StoreStats:
        return self._index.stats(now)

    async def waiting(self) -> Mapping[MailboxKey, Sequence[int]]:
        return self._index.waiting()

    # --- the send ledger ----------------------------------------------------------------------

    async def record_sends(self, records: Sequence[SendRecord]) -> None:
        await self._write("cannot record sends")
        self._sends.extend(records)

    async def sends_since(self, since: float) -> Sequence[SendRecord]:
        await asyncio.sleep(0)
        return sorted((r for r in self._sends if r.at >= since), key=lambda r: r.at)

    # --- the delivery history ----------------------------------------------------------------

    async def record_history(self, records: Sequence[HistoryRecord]) -> None:
        await self._write("cannot record history")
        self._history.extend(records)
        del self._history[: max(0, len(self._history) - self.history_limit)]

    async def history(self, query: HistoryQuery) -> Sequence[HistoryRecord]:
        await asyncio.sleep(0)
        return select(self._history, query)

    async def prune_history(self, before: float) -> int:
        await self._write("cannot prune history")
        kept = [r for r in self._history if r.settled >= before]
        dropped, self._history[:] = len(self._history) - len(kept), kept
        return dropped

    # --- operator commands --------------------------------------------------------------------

    async def list(self, state: State) -> Sequence[EntryMeta]:
        if state == "corrupt":
            raise ValueError("corrupt entries have no readable metadata")
        await asyncio.sleep(0)
        found = [r.entry for r in self._records.values() if r.state == state]
        return sorted(found, key=lambda e: (e.created, e.queue_id))

    async def find(self, queue_id: str) -> tuple[State, EntryMeta] | None:
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state == "corrupt":
            return None
        return record.state, record.entry

    async def retry(self, queue_id: str) -> bool:
        await self._write(f"cannot retry {queue_id}")
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state in ("active", "corrupt", "hold"):
            return False
        crashes = 0 if record.state == "quarantine" else record.entry.crashes
        self._set(replace(record.entry, next_attempt=0.0, crashes=crashes, dead_reason=""), "queue")
        return True

    async def delete(self, queue_id: str) -> bool:
        await self._write(f"cannot delete {queue_id}")
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state == "active":
            return False
        self._drop(queue_id)
        return True

    async def purge(self, state: State) -> int:
        if state == "active":
            raise ValueError("active entries belong to the running relay")
        doomed = [qid for qid, r in self._records.items() if r.state == state]
        return sum([await self.delete(qid) for qid in doomed])

    # --- hold and pause -----------------------------------------------------------------------

    async def hold(self, queue_id: str) -> bool:
        await self._write(f"cannot hold {queue_id}")
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state != "queue":
            return False
        self._set(record.entry, "hold")
        return True

    async def unhold(self, queue_id: str) -> bool:
        await self._write(f"cannot release {queue_id}")
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state != "hold":
            return False
        self._set(record.entry, "queue")
        return True

    async def paused_mailboxes(self) -> frozenset[MailboxKey]:
        return frozenset(self._paused)

    async def pause_mailbox(self, key: MailboxKey) -> None:
        await self._write("cannot pause a mailbox")
        self._paused.add(key)

    async def resume_mailbox(self, key: MailboxKey) -> None:
        await self._write("cannot resume a mailbox")
        self._paused.discard(key)

    # --- mechanics ----------------------------------------------------------------------------

    async def _write(self, what: str, size: int = 0) -> None:
        """A checkpoint before every write: other tasks run, and the failure switch applies."""
        await asyncio.sleep(0)
        if self.fail_writes or self._failures > 0:
            self._failures = max(0, self._failures - 1)
            raise StoreUnavailableError(f"{what}: writes are failing (MemoryStore switch)")
        if self.free_bytes is not None and size > self.free_bytes:
            raise StoreUnavailableError(f"{what}: no room for {size} bytes")

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("recover() must run before the relay's operations")

    def _active(self, queue_id: str) -> _Record:
        self._require_open()
        record = self._records.get(check_queue_id(queue_id))
        if record is None or record.state != "active":
            raise EntryNotFoundError(f"{queue_id} is not claimed (not active)")
        return record

    async def _move_active(self, entry: EntryMeta, state: State) -> None:
        await self._write(f"cannot move {entry.queue_id} to {state}")
        record = self._active(entry.queue_id)
        # Size and digest describe the stored bytes: they are the store's, not the caller's.
        self._set(replace(entry, size=record.entry.size, sha256=record.entry.sha256), state)

    def _set(self, entry: EntryMeta, state: State, message: bytes | None = None) -> None:
        record = self._records.get(entry.queue_id)
        if record is None:
            assert message is not None
            record = self._records[entry.queue_id] = _Record(state, entry, message)
        was = record.state
        record.state, record.entry = state, entry
        if state == "corrupt":
            self._index.remove(entry.queue_id)
            self._index.count_corrupt(+1 if was != "corrupt" else 0)
        else:
            self._index.place(entry, state)

    def _drop(self, queue_id: str) -> None:
        if self._records.pop(queue_id).state == "corrupt":
            self._index.count_corrupt(-1)
        self._index.remove(queue_id)

    def _rebuild(self) -> None:
        live = [(r.entry, r.state) for r in self._records.values() if r.state != "corrupt"]
        corrupt = sum(r.state == "corrupt" for r in self._records.values())
        self._index.rebuild(live, corrupt)
