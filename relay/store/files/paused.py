"""The paused mailboxes of a file store: one small JSON file in the spool, replaced atomically.

Why this module exists: `queue pause MAILBOX` runs in another process than the relay, and the
pause must outlive both (a relay restarted during an incident must not start sending again). So
the set is a file, `paused.json`, written as every other spool record is (temp in tmp/, fsync,
rename over, directory fsync): a reader sees the old set or the new one, never half. Two
operators pausing at once are serialised by flock() on `paused.lock`, so neither change is lost.
Blocking calls; `OSError` becomes `StoreUnavailableError`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable

from relay.store.files.layout import Layout, io
from relay.store.protocol import MailboxKey, StoreUnavailableError

__all__ = ["PAUSED_FILE", "change", "read"]

PAUSED_FILE = "paused.json"


def read(layout: Layout) -> frozenset[MailboxKey]:
    """The paused set; empty when no mailbox was ever paused. A damaged file reads as empty
    rather than stopping delivery: it is rewritten whole by the next pause or resume."""
    try:
        raw = (layout.root / PAUSED_FILE).read_bytes()
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        raise StoreUnavailableError(f"cannot read {PAUSED_FILE}: {exc}") from exc
    try:
        rows = json.loads(raw)
    except ValueError:
        return frozenset()
    if not isinstance(rows, list):
        return frozenset()
    return frozenset(
        (str(row[0]), str(row[1])) for row in rows if isinstance(row, list) and len(row) == 2
    )


def change(
    layout: Layout, update: Callable[[frozenset[MailboxKey]], frozenset[MailboxKey]]
) -> frozenset[MailboxKey]:
    """Replace the set with `update(current)` under the lock; the new set."""
    with io(f"cannot write {PAUSED_FILE}"):
        layout.ensure("tmp")
        fd = os.open(layout.root / "paused.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            paused = update(read(layout))
            payload = json.dumps(sorted([list(key) for key in paused])).encode()
            temp = layout.write_temp("paused", payload)
            os.replace(temp, layout.root / PAUSED_FILE)
            layout.sync_dir(layout.root)
        finally:
            os.close(fd)
    return paused
