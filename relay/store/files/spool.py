"""`Spool`: the file store's blocking layer, one object over the tree (see `relay.store.files`).

Why this module exists: the relay's own moves (store, claim, complete, defer, release, bury,
quarantine, discard) and the checked read of a message live here, with the operator commands and
recovery delegated to their modules, so that the whole blocking store is one object that tests
can drive step by step under a fault-injection seam. `FileStore` (store.py) runs these calls on
its threads and is what the rest of the relay uses; nothing outside `relay.store.files` should
need `Spool`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Final

from relay.core.limits import CRASH_LIMIT
from relay.core.values import EntryMeta, State, check_queue_id
from relay.store.files import operator, recovery
from relay.store.files.layout import (
    LIVE,
    CorruptEntryError,
    EntrySetAsideError,
    Layout,
    io,
    unlink_quietly,
)
from relay.store.files.recovery import StoreLockedError
from relay.store.integrity import mismatch, sealed
from relay.store.protocol import (
    EntryNotFoundError,
    RecoveryReport,
    StoreError,
    StoreStats,
    StoreUnavailableError,
)

__all__ = [
    "MAX_CRASHES",
    "EntryNotFoundError",
    "RecoveryReport",
    "Spool",
    "SpoolError",
    "SpoolLockedError",
    "SpoolStats",
    "SpoolUnavailableError",
]

MAX_CRASHES: Final = CRASH_LIMIT
# The names this module had before the `Store` protocol: the same classes.
SpoolError = StoreError
SpoolUnavailableError = StoreUnavailableError
SpoolLockedError = StoreLockedError
SpoolStats = StoreStats


class Spool:
    """The spool under `root`. The relay calls `open` first; the CLI may skip it (see header)."""

    def __init__(self, root: Path, *, reserve_bytes: int, fsync: bool = True) -> None:
        self.layout = Layout(root, fsync=fsync)
        self.root = self.layout.root
        self.reserve_bytes = reserve_bytes
        self._lock_fd: int | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def open(self) -> RecoveryReport:
        """Create the directories, take the lock and recover. Safe on every start."""
        if self._lock_fd is not None:
            raise RuntimeError("spool already open")  # a second recovery would steal our claims
        with io(f"cannot open spool {self.root}"):
            self.layout.create()
            self._lock_fd = recovery.lock(self.layout)
            try:
                report = recovery.recover(self.layout)
            except BaseException:
                self.close()
                raise
        return report  # the caller logs the summary; entries were logged one by one

    def close(self) -> None:
        """Release the lock (process exit does the same)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the relay's operations ---------------------------------------------------------------

    def store(self, meta: EntryMeta, data: bytes, *, claimed: bool = False) -> EntryMeta:
        """Make the message durable (commit point) in queue/, or in active/ when `claimed`.
        Records size and SHA-256 (`relay.store.integrity.sealed`) and returns what it stored.
        StoreUnavailableError (own temp files removed) if not durable; ValueError if taken."""
        self._require_open()
        meta = sealed(meta, data)
        qid, layout = meta.queue_id, self.layout
        payload = meta.to_json()
        if not self.has_room_for(len(data) + len(payload)):
            raise StoreUnavailableError(f"free space in {self.root} is below the reserve")
        with io(f"cannot store {qid}"):
            taken = [layout.data_path(qid), *(layout.meta_path(s, qid) for s in LIVE)]
            if any(path.exists() for path in taken):
                raise ValueError(f"queue id {qid} is already in the spool")
        target = layout.meta_path("active" if claimed else "queue", qid)
        placed: list[Path] = []
        try:
            for content, final in ((data, layout.data_path(qid)), (payload, target)):
                temp = layout.write_temp(qid, content)
                try:
                    os.rename(temp, final)
                except OSError:
                    unlink_quietly(temp)
                    raise
                placed.append(final)
                layout.sync_dir(final.parent)
        except OSError as exc:
            for path in reversed(placed):  # metadata first; stop if a worker already took it
                try:
                    os.unlink(path)
                except OSError:
                    break
            raise StoreUnavailableError(f"cannot store {qid}: {exc}") from exc
        return meta

    def claim(self, queue_id: str) -> EntryMeta | None:
        """queue/ -> active/. None if the entry vanished (taken, deleted) or was set aside."""
        self._require_open()
        qid = check_queue_id(queue_id)
        with io(f"cannot claim {qid}"):
            try:
                self.layout.move("queue", "active", qid)
            except FileNotFoundError:
                return None
            try:
                meta = self.layout.load("active", qid)
                if meta is None or not self.layout.data_path(qid).exists():
                    raise CorruptEntryError("data file missing")
            except CorruptEntryError as exc:
                self.layout.set_aside("active", qid, str(exc))
                return None
        return meta

    def claim_due(self, now: float, limit: int) -> list[EntryMeta]:
        """Claim up to `limit` due entries, oldest next_attempt first."""
        claimed: list[EntryMeta] = []
        for meta in self.due(now):
            if len(claimed) >= limit:
                break
            if (got := self.claim(meta.queue_id)) is not None:
                claimed.append(got)
        return claimed

    def due(self, now: float) -> list[EntryMeta]:
        """queue/ entries with next_attempt <= now, oldest next_attempt first (a full scan)."""
        entries = [m for m in self.list("queue") if m.next_attempt <= now]
        return sorted(entries, key=lambda m: (m.next_attempt, m.created, m.queue_id))

    def next_due_time(self) -> float | None:
        """The earliest next_attempt in queue/, None when it is empty (a full scan)."""
        return min((m.next_attempt for m in self.list("queue")), default=None)

    def data_path(self, queue_id: str) -> Path:
        return self.layout.data_path(queue_id)

    def read_data(self, queue_id: str) -> bytes:
        """The message, checked against its recorded size and SHA-256. EntryNotFoundError when
        there is none, or when it does not match: then the entry is set aside in corrupt/."""
        path = self.layout.data_path(queue_id)
        found = self.find(queue_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise EntryNotFoundError(f"no data for {queue_id}") from exc
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read {path}: {exc}") from exc
        if found is None:
            raise EntryNotFoundError(f"no entry for {queue_id}")
        if why := mismatch(found[1], data):
            with io(f"cannot set {queue_id} aside"):
                self.layout.set_aside(found[0], queue_id, why)
            raise EntrySetAsideError(f"{queue_id} set aside as corrupt: {why}")
        return data

    read_message = read_data

    def complete(self, queue_id: str) -> None:
        """Delivered: remove active/ metadata, then the data."""
        self._require_active(queue_id)
        with io(f"cannot complete {queue_id}"):
            self.layout.unlink_meta("active", queue_id)
            self.layout.remove_data(queue_id)

    def defer(self, meta: EntryMeta) -> EntryMeta:
        """Record an attempt (attempts, next_attempt, last_error); active/ -> queue/."""
        return self._settle(meta, "queue")

    def release(self, queue_id: str) -> None:
        """Graceful shutdown: active/ -> queue/ unchanged, not counted as a crash."""
        self._require_active(queue_id)
        with io(f"cannot release {queue_id}"):
            self.layout.move("active", "queue", queue_id)

    def bury(self, meta: EntryMeta, reason: str) -> EntryMeta:
        """Give up: active/ -> dead/ with `reason`; the data stays for the operator."""
        return self._settle(replace(meta, dead_reason=reason), "dead")

    def quarantine(self, meta: EntryMeta, reason: str) -> EntryMeta:
        """Handling it crashed: active/ -> quarantine/ with `reason`; the data stays."""
        return self._settle(replace(meta, dead_reason=reason), "quarantine")

    def discard(self, queue_id: str) -> None:
        """Remove the entry in whatever state, active/ included; no-op if it is gone."""
        self._require_open()
        check_queue_id(queue_id)
        with io(f"cannot discard {queue_id}"):
            for state in LIVE:
                if self.layout.unlink_meta(state, queue_id):
                    self.layout.remove_data(queue_id)
                    return

    def has_room_for(self, size: int) -> bool:
        """Whether `size` more bytes leave at least `reserve_bytes` free for this user."""
        try:
            vfs = os.statvfs(self.root)
        except OSError:
            return False
        return vfs.f_bavail * vfs.f_frsize - size >= self.reserve_bytes

    # --- operator operations (relay.store.files.operator) -------------------------------------

    def find(self, queue_id: str) -> tuple[State, EntryMeta] | None:
        """Where the entry is and its metadata; None if absent or corrupt (see corrupt_ids)."""
        return operator.find(self.layout, queue_id)

    def corrupt_ids(self) -> list[str]:
        return self.layout.corrupt_ids()

    def retry(self, queue_id: str) -> bool:
        """dead/, quarantine/ or queue/ -> queue/ due now. False if not found or active."""
        return operator.retry(self.layout, queue_id) is not None

    def delete(self, queue_id: str) -> bool:
        """Remove the entry from any state but active/ (corrupt/ included). False if none."""
        return operator.delete(self.layout, queue_id) is not None

    def purge(self, state: State) -> int:
        """Delete every entry in `state` (not active); the number deleted."""
        return len(operator.purge(self.layout, state))

    def stats(self, now: float) -> StoreStats:
        """Counts by a full scan (the CLI's summary); `FileStore.stats` is the cheap one."""
        pending = self.list("queue") + self.list("active")
        return StoreStats(
            queued=len(self.layout.ids("queue")),
            active=len(self.layout.ids("active")),
            dead=len(self.layout.ids("dead")),
            quarantined=len(self.layout.ids("quarantine")),
            corrupt=len(self.corrupt_ids()),
            oldest_created=min((m.created for m in pending), default=None),
            due=len(self.due(now)),
            held=len(self.layout.ids("hold")),
        )

    # --- mechanics ----------------------------------------------------------------------------

    def _settle(self, meta: EntryMeta, target: State) -> EntryMeta:
        """Rewrite in active/, then move to `target`; size and digest stay the stored ones."""
        self._require_active(meta.queue_id)
        with io(f"cannot move {meta.queue_id} to {target}/"):
            with contextlib.suppress(CorruptEntryError):  # unreadable: keep the caller's copy
                if (held := self.layout.load("active", meta.queue_id)) is not None:
                    meta = replace(meta, size=held.size, sha256=held.sha256)
            self.layout.rewrite("active", meta)
            self.layout.move("active", target, meta.queue_id)
        return meta

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("recover() (Spool.open) must run before the relay's operations")

    def _require_active(self, queue_id: str) -> None:
        self._require_open()
        with io(f"cannot look up {queue_id}"):
            if not self.layout.meta_path("active", check_queue_id(queue_id)).exists():
                raise EntryNotFoundError(f"{queue_id} is not claimed (not in active/)")

    # Last in the class: from here on `list` in an annotation would mean this method.
    def list(self, state: State) -> list[EntryMeta]:
        """Entries in `state`, oldest first; corrupt ones (outside active/) are set aside."""
        return operator.list_entries(self.layout, state)
