"""Opening the file store for a relay: the lock, and what a dead process left behind.

Why this module exists: recovery is the half of the durability argument that runs once, at start
(the crash table in `relay.store.files`): it empties tmp/, settles an id found in two states,
sets unreadable entries aside, gives entries left in active/ back to the queue with one more
crash (or quarantines them at CRASH_LIMIT) and removes data whose store never committed. Only
the process holding the lock may do it: a second recovery would steal a running relay's claims.
Blocking calls.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass, replace

from relay.core.limits import CRASH_LIMIT
from relay.core.values import QUEUE_ID_RE, EntryMeta, State
from relay.store.files.layout import LIVE, CorruptEntryError, Layout, unlink_quietly
from relay.store.protocol import RecoveryReport, StoreError, crash_reason

__all__ = ["StoreLockedError", "lock", "recover"]

log = logging.getLogger("relay.spool")


class StoreLockedError(StoreError):
    """Another relay process has this spool open: stop it, or point this one elsewhere."""


def lock(layout: Layout) -> int:
    """flock() `root/lock` for this process; the fd to close to release it."""
    fd = os.open(layout.root / "lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(f"{layout.root} is in use by another relay") from None
    return fd


def recover(layout: Layout) -> RecoveryReport:
    """Recover under the lock (module docstring); OSError escapes to the caller's `io()`."""
    temp_removed = 0
    for name in os.listdir(layout.root / "tmp"):
        temp_removed += unlink_quietly(layout.root / "tmp" / name)
    states: dict[str, list[State]] = {}
    for state in LIVE:
        for qid in layout.ids(state):
            states.setdefault(qid, []).append(state)
    counts = {"requeued": 0, "quarantined": 0, "corrupt": 0}
    for qid, found in states.items():
        winner = _settle(layout, qid, found)
        if winner is None:
            counts["corrupt"] += 1
        elif winner.state == "active":
            meta = replace(winner.meta, crashes=winner.meta.crashes + 1, dead_reason="")
            target: State = "quarantine" if meta.crashes >= CRASH_LIMIT else "queue"
            if target == "quarantine":
                meta = replace(meta, dead_reason=crash_reason(meta.crashes))
            layout.rewrite("active", meta)
            layout.move("active", target, qid)
            counts["requeued" if target == "queue" else "quarantined"] += 1
            log.warning(
                "entry %s was held by a worker that died (crash %d), now in %s/",
                qid,
                meta.crashes,
                target,
                extra={"event": "spool_crashed_entry", "queue_id": qid, "to": target},
            )
    live = {qid for state in LIVE for qid in layout.ids(state)}
    orphans = 0
    for name in layout.names("data"):
        qid = name.removesuffix(".eml")
        if name.endswith(".eml") and QUEUE_ID_RE.fullmatch(qid) and qid not in live:
            os.unlink(layout.root / "data" / name)  # a store that never reached its commit
            orphans += 1
    if orphans:
        layout.sync_dir(layout.root / "data")
    return RecoveryReport(**counts, orphans_removed=orphans, temp_removed=temp_removed)


@dataclass(frozen=True, slots=True)
class _Found:
    state: State
    meta: EntryMeta


def _settle(layout: Layout, qid: str, found: list[State]) -> _Found | None:
    """Keep the best readable copy of `qid`; set the rest aside or remove them."""
    winner: _Found | None = None
    for state in found:  # in LIVE order
        try:
            meta = layout.load(state, qid)
        except CorruptEntryError:
            continue
        if meta is not None and layout.data_path(qid).exists():
            winner = _Found(state, meta)
            break
    for state in found:
        if winner is None:
            layout.set_aside(state, qid, "unreadable metadata or missing data")
        elif state != winner.state:
            os.unlink(layout.meta_path(state, qid))
            layout.sync_dir(layout.root / state)
    return winner
