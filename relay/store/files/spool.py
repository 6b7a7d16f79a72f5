"""The durable on-disk queue (DESIGN §6): a 250 is a promise (RFC 5321 §6.1), kept across kill -9.

Why this module exists: the relay answers 250 only after `Spool.store` returns, so the message
must survive any crash from that instant until Graph accepted it or an operator gave up on it.
The shape follows GNU Mailman's switchboard (write temp, fsync, rename; claim by rename; recover
claimed entries at start; quarantine what keeps crashing the worker) plus the directory fsyncs
Mailman lacks. Blocking I/O only: the asyncio engine calls in through a thread. What an entry's
metadata holds, and how strictly it is read back, is `relay.spool_entry`'s; this module
re-exports it, so `relay.spool` stays the one import for callers.

Theory of operation
-------------------
Layout under the root (directories 0700, files 0600)::

    tmp/<id>.<random>.tmp    being written; meaningless after a crash
    data/<id>.eml            message bytes, written once, never modified
    queue/<id>.json          waiting, including deferred entries (next_attempt in the future)
    active/<id>.json         claimed by a worker of the running relay
    dead/<id>.json           given up (permanent failure, expired); kept for the operator
    quarantine/<id>.json     crashed the worker MAX_CRASHES times; kept for the operator
    corrupt/<id>.json[.N]    unreadable metadata moved aside, with its corrupt/<id>.eml[.N]
    lock                     flock()ed by the relay between open() and close(): one relay a spool

The directory holding an entry's metadata is its state. An entry has exactly one metadata file
at every instant: each state change is one rename, or an atomic rewrite in place (tmp, fsync,
rename over) followed by one rename. Metadata is created after its data and removed before it.

Commit point of `store`: the rename of the metadata into queue/ (active/ if `claimed`), made
after the data file was fsynced, renamed into data/ and data/ fsynced. queue/ is fsynced before
`store` returns, so the 250 always follows a durable commit. After every rename the destination
directory is fsynced, then the source: a file system that loses the second leaves the entry
under both names, which recovery resolves, never under neither. Unlinks fsync their directory.

Crash windows (kill -9 after the step named) and what `open` (recovery) makes of them:

    operation        crash after                 left on disk              recovery
    store            tmp file written            tmp/ file                 removed (no 250 given)
    store            data renamed into data/     data without metadata     orphan, removed
    store            metadata renamed (commit)   whole entry, no 250 yet   kept; a resent copy
                                                                           is a duplicate, not loss
    claim, retry of  rename into active/         active/ entry             crashes+1 -> queue/
      a queued entry
    defer, bury      rewrite in active/          active/, new fields       crashes+1 -> queue/
    release, defer,  rename out of active/       queue/ or dead/ entry     kept as is
      bury, retry
    retry (dead/,    rewrite in place            entry, reason cleared     kept as is
      quarantine/)
    complete,        metadata unlinked           data without metadata     orphan, removed
      discard, delete
    open             active/ rewritten, crashes  active/ entry             counted once more:
                     +1, not yet renamed                                   quarantine comes early
    set aside        data moved to corrupt/      metadata without data     set aside too
    any rename       power loss, no journal      same id in two states     keep the first readable
                                                                           of queue > quarantine >
                                                                           dead > active
    (any time)       -                           bad JSON, version or id,  data, then metadata,
                                                 or data file missing      moved to corrupt/

An entry still in active/ at start was held by a process that died: it goes back to queue/ with
crashes+1, or to quarantine/ once crashes reaches MAX_CRASHES (a kill of the whole relay counts
against every entry it held, as in Mailman). Recovery also empties tmp/: a CLI rewrite racing a
relay start then fails cleanly and can be repeated.

Operator operations (the `queue` CLI) run beside the relay without the lock, using the same
renames. A queue/ entry is changed only after claiming it (rename into active/), so a worker that
loses the race sees it vanish rather than a second copy; `delete` unlinks metadata before data and
reports False if the metadata was claimed meanwhile. Workers never touch dead/ or quarantine/.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, get_args

from relay.core.errors import RelayError
from relay.core.limits import CRASH_LIMIT
from relay.core.values import QUEUE_ID_PATTERN, QUEUE_ID_RE, EntryMeta, State, check_queue_id

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

log = logging.getLogger("relay.spool")

MAX_CRASHES: Final = CRASH_LIMIT
# Order of preference when recovery finds one id in several states: the copy that still gets the
# message delivered wins; every rename's destination outranks its source.
_LIVE: Final[tuple[State, ...]] = ("queue", "quarantine", "dead", "active")
_CORRUPT_RE: Final = re.compile(rf"(?P<id>{QUEUE_ID_PATTERN})\.(?:json|eml)(?:\.[0-9]+)?")


class SpoolError(RelayError):
    """The spool could not do what was asked."""


class SpoolUnavailableError(SpoolError):
    """The spool cannot take a message now (read-only, full, I/O error): answer 451 4.3.0."""


class SpoolLockedError(SpoolError):
    """Another relay process has this spool open."""


class EntryNotFoundError(SpoolError):
    """The entry is not where the operation needs it (e.g. not in active/)."""


class _CorruptError(Exception):
    """An entry's metadata cannot be used."""


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    requeued: int
    quarantined: int
    corrupt: int
    orphans_removed: int
    temp_removed: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    queued: int
    active: int
    dead: int
    quarantined: int
    corrupt: int
    oldest_created: float | None  # oldest undelivered entry (queue/ and active/)
    due: int = 0  # queue/ entries with next_attempt <= now


@contextlib.contextmanager
def _io(what: str) -> Iterator[None]:
    """Convert OSError, once, into the caller's next step."""
    try:
        yield
    except OSError as exc:
        raise SpoolUnavailableError(f"{what}: {exc}") from exc


class Spool:
    """The spool under `root`. The relay calls `open` first; the CLI may skip it (see header)."""

    def __init__(self, root: Path, *, reserve_bytes: int, fsync: bool = True) -> None:
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self._fsync = fsync  # False only for benchmarks
        self._lock_fd: int | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> RecoveryReport:
        """Create the directories, take the lock and recover (header). Safe on every start."""
        if self._lock_fd is not None:
            raise RuntimeError("spool already open")  # a second recovery would steal our claims
        with _io(f"cannot open spool {self.root}"):
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in ("tmp", "data", *get_args(State)):
                (self.root / name).mkdir(mode=0o700, exist_ok=True)
            self._sync_dir(self.root)
            fd = os.open(self.root / "lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SpoolLockedError(f"{self.root} is in use by another relay") from None
            self._lock_fd = fd
            try:
                report = self._recover()
            except BaseException:
                self.close()
                raise
        return report  # the caller logs the summary; entries were logged one by one

    def close(self) -> None:
        """Release the lock (process exit does the same)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self) -> RecoveryReport:
        temp_removed = 0
        for name in os.listdir(self.root / "tmp"):
            temp_removed += _unlink_quietly(self.root / "tmp" / name)
        states: dict[str, list[State]] = {}
        for state in _LIVE:
            for qid in self._ids(state):
                states.setdefault(qid, []).append(state)
        counts = {"requeued": 0, "quarantined": 0, "corrupt": 0}
        for qid, found in states.items():
            winner = self._settle(qid, found)
            if winner is None:
                counts["corrupt"] += 1
            elif winner.state == "active":
                meta = replace(winner.meta, crashes=winner.meta.crashes + 1, dead_reason="")
                target: State = "quarantine" if meta.crashes >= MAX_CRASHES else "queue"
                self._rewrite("active", meta)
                self._move("active", target, qid)
                counts["requeued" if target == "queue" else "quarantined"] += 1
                log.warning(
                    "entry %s was held by a worker that died (crash %d), now in %s/",
                    qid,
                    meta.crashes,
                    target,
                    extra={"event": "spool_crashed_entry", "queue_id": qid, "to": target},
                )
        live = {qid for state in _LIVE for qid in self._ids(state)}
        orphans = 0
        for name in os.listdir(self.root / "data"):
            qid = name.removesuffix(".eml")
            if name.endswith(".eml") and QUEUE_ID_RE.fullmatch(qid) and qid not in live:
                os.unlink(self.root / "data" / name)  # a store that never reached its commit
                orphans += 1
        if orphans:
            self._sync_dir(self.root / "data")
        return RecoveryReport(**counts, orphans_removed=orphans, temp_removed=temp_removed)

    def _settle(self, qid: str, found: list[State]) -> _Found | None:
        """Keep the best readable copy of `qid`; set the rest aside or remove them."""
        winner: _Found | None = None
        for state in found:  # in _LIVE order
            try:
                meta = self._load(state, qid)
            except _CorruptError:
                continue
            if meta is not None and self.data_path(qid).exists():
                winner = _Found(state, meta)
                break
        for state in found:
            if winner is None:
                self._set_aside(state, qid, "unreadable metadata or missing data")
            elif state != winner.state:
                os.unlink(self._meta_path(state, qid))
                self._sync_dir(self.root / state)
        return winner

    # --- the relay's operations -------------------------------------------------------------

    def store(self, meta: EntryMeta, data: bytes, *, claimed: bool = False) -> None:
        """Make the message durable (commit point: header) in queue/, or in active/ when
        `claimed` (the inline attempt holds it; a crash then counts like any claim). Durable when
        it returns; SpoolUnavailableError (own temp files removed) if not; ValueError if taken.
        """
        self._require_open()
        qid = meta.queue_id
        payload = meta.to_json()
        if not self.has_room_for(len(data) + len(payload)):
            raise SpoolUnavailableError(f"free space in {self.root} is below the reserve")
        with _io(f"cannot store {qid}"):
            taken = [self.data_path(qid), *(self._meta_path(s, qid) for s in _LIVE)]
            if any(path.exists() for path in taken):
                raise ValueError(f"queue id {qid} is already in the spool")
        target = self._meta_path("active" if claimed else "queue", qid)
        placed: list[Path] = []
        try:
            for content, final in ((data, self.data_path(qid)), (payload, target)):
                temp = self._write_temp(qid, content)
                try:
                    os.rename(temp, final)
                except OSError:
                    _unlink_quietly(temp)
                    raise
                placed.append(final)
                self._sync_dir(final.parent)
        except OSError as exc:
            for path in reversed(placed):  # metadata first; stop if a worker already took it
                try:
                    os.unlink(path)
                except OSError:
                    break
            raise SpoolUnavailableError(f"cannot store {qid}: {exc}") from exc

    def claim(self, queue_id: str) -> EntryMeta | None:
        """queue/ -> active/. None if the entry vanished (taken, deleted) or was set aside."""
        self._require_open()
        qid = check_queue_id(queue_id)
        with _io(f"cannot claim {qid}"):
            try:
                self._move("queue", "active", qid)
            except FileNotFoundError:
                return None
            try:
                meta = self._load("active", qid)
                if meta is None or not self.data_path(qid).exists():
                    raise _CorruptError("data file missing")
            except _CorruptError as exc:
                self._set_aside("active", qid, str(exc))
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
        """The earliest next_attempt in queue/, None when it is empty."""
        return min((m.next_attempt for m in self.list("queue")), default=None)

    def data_path(self, queue_id: str) -> Path:
        return self.root / "data" / f"{check_queue_id(queue_id)}.eml"

    def read_data(self, queue_id: str) -> bytes:
        path = self.data_path(queue_id)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise EntryNotFoundError(f"no data for {queue_id}") from exc
        except OSError as exc:
            raise SpoolUnavailableError(f"cannot read {path}: {exc}") from exc

    def complete(self, queue_id: str) -> None:
        """Delivered: remove active/ metadata, then the data."""
        self._require_active(queue_id)
        with _io(f"cannot complete {queue_id}"):
            os.unlink(self._meta_path("active", queue_id))
            self._sync_dir(self.root / "active")
            self._remove_data(queue_id)

    def defer(self, meta: EntryMeta) -> None:
        """Record an attempt (attempts, next_attempt, last_error); active/ -> queue/."""
        self._require_active(meta.queue_id)
        with _io(f"cannot defer {meta.queue_id}"):
            self._rewrite("active", meta)
            self._move("active", "queue", meta.queue_id)

    def release(self, queue_id: str) -> None:
        """Graceful shutdown: active/ -> queue/ unchanged, not counted as a crash."""
        self._require_active(queue_id)
        with _io(f"cannot release {queue_id}"):
            self._move("active", "queue", queue_id)

    def bury(self, meta: EntryMeta, reason: str) -> None:
        """Give up: active/ -> dead/ with `reason`; the data stays for the operator."""
        self._require_active(meta.queue_id)
        with _io(f"cannot bury {meta.queue_id}"):
            self._rewrite("active", replace(meta, dead_reason=reason))
            self._move("active", "dead", meta.queue_id)

    def discard(self, queue_id: str) -> None:
        """Remove the entry in whatever state, active/ included; no-op if it is gone."""
        self._require_open()
        check_queue_id(queue_id)
        with _io(f"cannot discard {queue_id}"):
            for state in _LIVE:
                if self._unlink_meta(state, queue_id):
                    self._remove_data(queue_id)
                    return

    # --- operator operations ----------------------------------------------------------------

    def find(self, queue_id: str) -> tuple[State, EntryMeta] | None:
        """Where the entry is and its metadata; None if absent or corrupt (see corrupt_ids)."""
        check_queue_id(queue_id)
        for _ in range(2):  # the entry may move from a directory not yet read to one already read
            for state in ("queue", "active", "dead", "quarantine"):
                with contextlib.suppress(_CorruptError):
                    if (meta := self._load(state, queue_id)) is not None:
                        return state, meta
        return None

    def corrupt_ids(self) -> list[str]:
        """Queue ids with files in corrupt/."""
        names = self._names("corrupt")
        return sorted({m["id"] for n in names if (m := _CORRUPT_RE.fullmatch(n))})

    def retry(self, queue_id: str) -> bool:
        """dead/, quarantine/ or queue/ -> queue/ due now (crashes reset from quarantine/).
        False if not found or active."""
        found = self.find(queue_id)
        if found is None or found[0] == "active":
            return False
        state, meta = found
        with _io(f"cannot retry {queue_id}"):
            if state != "queue":  # workers never touch dead/ or quarantine/
                crashes = 0 if state == "quarantine" else meta.crashes
                self._rewrite(
                    state, replace(meta, next_attempt=0.0, crashes=crashes, dead_reason="")
                )
                self._move(state, "queue", queue_id)
                return True
            try:  # take it from the workers first: they see it vanish, never two copies
                self._move("queue", "active", queue_id)
            except FileNotFoundError:
                return False
            try:
                fresh = self._load("active", queue_id) or meta
                self._rewrite("active", replace(fresh, next_attempt=0.0))
            except _CorruptError:
                return False  # back in queue/ below; the next reader sets it aside
            finally:
                self._move("active", "queue", queue_id)
        return True

    def delete(self, queue_id: str) -> bool:
        """Remove the entry from any state but active/ (corrupt/ included). False if none."""
        check_queue_id(queue_id)
        removed = False
        with _io(f"cannot delete {queue_id}"):
            if self._meta_path("active", queue_id).exists():
                return False
            for state in ("queue", "dead", "quarantine"):
                if self._unlink_meta(state, queue_id):
                    self._remove_data(queue_id)  # only after we, not a worker, got the metadata
                    removed = True
                    break
            for name in self._names("corrupt"):
                if (m := _CORRUPT_RE.fullmatch(name)) and m["id"] == queue_id:
                    os.unlink(self.root / "corrupt" / name)
                    self._sync_dir(self.root / "corrupt")
                    removed = True
        return removed

    def purge(self, state: State) -> int:
        """Delete every entry in `state` (not active); the number deleted."""
        if state == "active":
            raise ValueError("active entries belong to the running relay")
        ids = self.corrupt_ids() if state == "corrupt" else self._ids(state)
        return sum(self.delete(qid) for qid in ids)

    def stats(self, now: float) -> SpoolStats:
        pending = self.list("queue") + self.list("active")
        return SpoolStats(
            queued=len(self._ids("queue")),
            active=len(self._ids("active")),
            dead=len(self._ids("dead")),
            quarantined=len(self._ids("quarantine")),
            corrupt=len(self.corrupt_ids()),
            oldest_created=min((m.created for m in pending), default=None),
            due=len(self.due(now)),
        )

    def has_room_for(self, size: int) -> bool:
        """Whether `size` more bytes leave at least `reserve_bytes` free for this user."""
        try:
            vfs = os.statvfs(self.root)
        except OSError:
            return False
        return vfs.f_bavail * vfs.f_frsize - size >= self.reserve_bytes

    # --- mechanics --------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("Spool.open() must run before the relay's operations")

    def _require_active(self, queue_id: str) -> None:
        self._require_open()
        with _io(f"cannot look up {queue_id}"):
            if not self._meta_path("active", check_queue_id(queue_id)).exists():
                raise EntryNotFoundError(f"{queue_id} is not claimed (not in active/)")

    def _meta_path(self, state: State, queue_id: str) -> Path:
        return self.root / state / f"{queue_id}.json"

    def _names(self, state: State) -> list[str]:
        try:
            return os.listdir(self.root / state)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SpoolUnavailableError(f"cannot list {self.root / state}: {exc}") from exc

    def _ids(self, state: State) -> list[str]:
        names = (n.removesuffix(".json") for n in self._names(state) if n.endswith(".json"))
        return [qid for qid in names if QUEUE_ID_RE.fullmatch(qid)]

    def _load(self, state: State, qid: str) -> EntryMeta | None:
        """The metadata; None if the file is gone; _CorruptError if it cannot be used."""
        try:
            raw = self._meta_path(state, qid).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EISDIR, errno.EACCES):
                raise _CorruptError(str(exc)) from exc
            raise SpoolUnavailableError(f"cannot read {qid} in {state}/: {exc}") from exc
        try:
            meta = EntryMeta.from_json(raw)
        except ValueError as exc:
            raise _CorruptError(str(exc)) from exc
        if meta.queue_id != qid:
            raise _CorruptError(f"file {qid}.json holds queue id {meta.queue_id}")
        return meta

    def _set_aside(self, state: State, qid: str, why: str) -> None:
        """Move metadata (and data, first) to corrupt/. Never overwrites an earlier one."""
        corrupt = self.root / "corrupt"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.data_path(qid), _free_name(corrupt / f"{qid}.eml"))
            self._sync_dir(corrupt)
            self._sync_dir(self.root / "data")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._meta_path(state, qid), _free_name(corrupt / f"{qid}.json"))
            self._sync_dir(corrupt)
            self._sync_dir(self.root / state)
        log.error(
            "spool entry %s in %s/ moved to corrupt/: %s",
            qid,
            state,
            why,
            extra={"event": "spool_corrupt", "queue_id": qid, "state": state, "reason": why},
        )

    def _write_temp(self, qid: str, content: bytes) -> Path:
        """A new fsynced 0600 file in tmp/; removed again if anything fails."""
        fd, name = tempfile.mkstemp(prefix=f"{qid}.", suffix=".tmp", dir=self.root / "tmp")
        try:
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(Path(name))
            raise
        return Path(name)

    def _rewrite(self, state: State, meta: EntryMeta) -> None:
        temp = self._write_temp(meta.queue_id, meta.to_json())
        try:
            os.replace(temp, self._meta_path(state, meta.queue_id))
        except OSError:
            _unlink_quietly(temp)
            raise
        self._sync_dir(self.root / state)

    def _move(self, src: State, dst: State, qid: str) -> None:
        os.rename(self._meta_path(src, qid), self._meta_path(dst, qid))
        self._sync_dir(self.root / dst)  # destination first: at worst two names, never none
        self._sync_dir(self.root / src)

    def _unlink_meta(self, state: State, qid: str) -> bool:
        try:
            os.unlink(self._meta_path(state, qid))
        except FileNotFoundError:
            return False
        self._sync_dir(self.root / state)
        return True

    def _remove_data(self, qid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_path(qid))
        self._sync_dir(self.root / "data")

    def _sync_dir(self, path: Path) -> None:
        if not self._fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # Last in the class: from here on `list` in an annotation would mean this method.
    def list(self, state: State) -> list[EntryMeta]:
        """Entries in `state`, oldest first; corrupt ones (outside active/) are set aside."""
        if state == "corrupt":
            raise ValueError("corrupt entries have no readable metadata; use corrupt_ids()")
        entries: list[EntryMeta] = []
        for qid in self._ids(state):
            try:
                meta = self._load(state, qid)
            except _CorruptError as exc:
                if state != "active":  # active/ belongs to the worker holding it
                    with contextlib.suppress(OSError):
                        self._set_aside(state, qid, str(exc))
                continue
            if meta is not None:
                entries.append(meta)
        return sorted(entries, key=lambda m: (m.created, m.queue_id))


@dataclass(frozen=True, slots=True)
class _Found:
    state: State
    meta: EntryMeta


def _free_name(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _unlink_quietly(path: Path) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
