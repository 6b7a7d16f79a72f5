"""The send ledger of the file store: what each mailbox sent in the last 24 hours.

Why this module exists: Exchange Online counts a mailbox's recipients over a rolling 24 hours
(`relay.core.budgets`). If the relay forgot its count at every restart, a restart would open a
fresh day's budget and the relay would overrun the real one. So every finished send is appended
here, and `recover` reads the last 24 hours back.

Format: one JSON object per line, appended with a single `write` on an O_APPEND descriptor, so
lines from one process never interleave and a line survives the process being killed (the
kernel has it). It is not fsynced per send: after a power cut the last seconds of sends may be
missing, which lets the relay send those few again too early; everything else about a message
(the spool) is fsynced. A torn last line is skipped when read. `compact` rewrites the file with
only the lines still inside the ledger span (temp file, fsync, rename), at start and whenever the
file has grown to twice what it keeps; it keeps one span before its newest line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from relay.core.budgets import LEDGER_SPAN, SendRecord
from relay.store.protocol import StoreUnavailableError

__all__ = ["LEDGER_FILE", "SendLedger"]

LEDGER_FILE: Final = "sends.jsonl"
_FIELDS: Final = ("at", "auth_object", "mailbox", "messages", "recipients", "requests", "upload")


def _line(record: SendRecord) -> bytes:
    body = {name: getattr(record, name) for name in _FIELDS}
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def _parse(line: bytes) -> SendRecord | None:
    try:
        body: Any = json.loads(line)
        if not isinstance(body, dict) or set(body) != set(_FIELDS):
            return None
        return SendRecord(**body)
    except (ValueError, TypeError):  # a torn or foreign line: not a send we can count
        return None


class SendLedger:
    """Appends and reads `SendRecord`s in `root / LEDGER_FILE` (blocking; run off the loop)."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.path = root / LEDGER_FILE
        self._fsync = fsync
        self._lock = threading.Lock()
        self._lines = 0  # lines in the file (as far as this process knows)
        self._kept = 0  # lines the last compaction kept

    def append(self, records: Sequence[SendRecord]) -> None:
        """Add `records`; StoreUnavailableError when the disk refuses."""
        if not records:
            return
        data = b"".join(_line(r) for r in records)
        with self._lock:
            try:
                fd = os.open(
                    self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise StoreUnavailableError(f"cannot append to the send ledger: {exc}") from exc
            self._lines += len(records)

    def read_since(self, since: float) -> list[SendRecord]:
        """Every readable record with `at >= since`, in file order."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read the send ledger: {exc}") from exc
        records = [_parse(line) for line in data.splitlines() if line.strip()]
        return [r for r in records if r is not None and r.at >= since]

    def compact_if_grown(self) -> None:
        """`compact` once the file holds twice the lines the last compaction kept (and some)."""
        if self._lines > max(1000, 2 * self._kept):
            self.compact()

    def compact(self) -> None:
        """Rewrite the file keeping the sends of one ledger span before its newest send (no
        clock: a ledger left by a relay stopped for days keeps sends no window counts now)."""
        with self._lock:
            every = self.read_since(-math.inf)
            newest = max((r.at for r in every), default=0.0)
            kept = [r for r in every if r.at >= newest - LEDGER_SPAN]
            temp = self.path.with_name(self.path.name + ".tmp")
            try:
                with open(temp, "wb") as out:
                    out.write(b"".join(_line(r) for r in kept))
                    out.flush()
                    if self._fsync:
                        os.fsync(out.fileno())
                os.replace(temp, self.path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise StoreUnavailableError(f"cannot compact the send ledger: {exc}") from exc
            self._lines = self._kept = len(kept)
