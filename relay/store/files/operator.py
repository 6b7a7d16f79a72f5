"""The operator's commands on the file store: find, list, retry, delete, purge, hold, unhold.

Why this module exists: the `queue` CLI runs beside a relay that holds the lock, so it may only
use moves that are safe against a worker racing it (see "Operator operations" in
`relay.store.files`): it changes a queue/ entry only after claiming it by rename, removes
metadata before data, and never touches active/. Needs no lock and no recovery. Blocking calls.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

from relay.core.values import EntryMeta, State, check_queue_id
from relay.store.files.layout import CORRUPT_RE, CorruptEntryError, Layout, io

__all__ = ["delete", "find", "hold", "list_entries", "purge", "retry", "unhold"]

_FIND_ORDER: tuple[State, ...] = ("queue", "active", "hold", "dead", "quarantine")


def find(layout: Layout, queue_id: str) -> tuple[State, EntryMeta] | None:
    """Where the entry is and its metadata; None if absent or corrupt."""
    check_queue_id(queue_id)
    for _ in range(2):  # the entry may move from a directory not yet read to one already read
        for state in _FIND_ORDER:
            with contextlib.suppress(CorruptEntryError):
                if (meta := layout.load(state, queue_id)) is not None:
                    return state, meta
    return None


def list_entries(layout: Layout, state: State) -> list[EntryMeta]:
    """Entries in `state`, oldest first; corrupt ones (outside active/) are set aside."""
    if state == "corrupt":
        raise ValueError("corrupt entries have no readable metadata; use corrupt_ids()")
    entries: list[EntryMeta] = []
    for qid in layout.ids(state):
        try:
            meta = layout.load(state, qid)
        except CorruptEntryError as exc:
            if state != "active":  # active/ belongs to the worker holding it
                with contextlib.suppress(OSError):
                    layout.set_aside(state, qid, str(exc))
            continue
        if meta is not None:
            entries.append(meta)
    return sorted(entries, key=lambda m: (m.created, m.queue_id))


def retry(layout: Layout, queue_id: str) -> tuple[State, EntryMeta] | None:
    """dead/, quarantine/ or queue/ -> queue/ due now (crashes reset from quarantine/).
    Where it was and what is queued now; None if not found or active."""
    found = find(layout, queue_id)
    if found is None or found[0] in ("active", "hold"):  # a held entry waits for its release
        return None
    state, meta = found
    with io(f"cannot retry {queue_id}"):
        if state != "queue":  # workers never touch dead/ or quarantine/
            crashes = 0 if state == "quarantine" else meta.crashes
            meta = replace(meta, next_attempt=0.0, crashes=crashes, dead_reason="")
            layout.rewrite(state, meta)
            layout.move(state, "queue", queue_id)
            return state, meta
        try:  # take it from the workers first: they see it vanish, never two copies
            layout.move("queue", "active", queue_id)
        except FileNotFoundError:
            return None
        try:
            meta = replace(layout.load("active", queue_id) or meta, next_attempt=0.0)
            layout.rewrite("active", meta)
        except CorruptEntryError:
            return None  # back in queue/ below; the next reader sets it aside
        finally:
            layout.move("active", "queue", queue_id)
    return state, meta


def delete(layout: Layout, queue_id: str) -> State | None:
    """Remove the entry from any state but active/ (corrupt/ included): the state it was in,
    None if there was none."""
    check_queue_id(queue_id)
    removed: State | None = None
    with io(f"cannot delete {queue_id}"):
        if layout.meta_path("active", queue_id).exists():
            return None
        for state in ("queue", "hold", "dead", "quarantine"):
            if layout.unlink_meta(state, queue_id):
                layout.remove_data(queue_id)  # only after we, not a worker, got the metadata
                removed = state
                break
        for name in layout.names("corrupt"):
            if (m := CORRUPT_RE.fullmatch(name)) and m["id"] == queue_id:
                os.unlink(layout.root / "corrupt" / name)
                layout.sync_dir(layout.root / "corrupt")
                removed = removed or "corrupt"
    return removed


def purge(layout: Layout, state: State) -> list[tuple[str, State]]:
    """Delete every entry in `state` (not active): each id deleted and the state it was in."""
    if state == "active":
        raise ValueError("active entries belong to the running relay")
    ids = layout.corrupt_ids() if state == "corrupt" else layout.ids(state)
    return [(qid, was) for qid in ids if (was := delete(layout, qid)) is not None]


def hold(layout: Layout, queue_id: str) -> EntryMeta | None:
    """queue/ -> hold/ by one rename: a worker claiming it at the same instant wins or loses
    whole, never both. What is held now; None if it was not in queue/ (active included)."""
    check_queue_id(queue_id)
    with io(f"cannot hold {queue_id}"):
        layout.ensure("hold")
        try:
            layout.move("queue", "hold", queue_id)
        except FileNotFoundError:
            return None
        with contextlib.suppress(CorruptEntryError):
            return layout.load("hold", queue_id)
    return None  # unreadable: the next rescan sets it aside


def unhold(layout: Layout, queue_id: str) -> EntryMeta | None:
    """hold/ -> queue/ unchanged (workers never touch hold/): what is queued now; None if it
    was not held."""
    check_queue_id(queue_id)
    with io(f"cannot release {queue_id}"):
        try:
            layout.move("hold", "queue", queue_id)
        except FileNotFoundError:
            return None
        with contextlib.suppress(CorruptEntryError):
            return layout.load("queue", queue_id)
    return None
