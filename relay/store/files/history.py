"""The delivery history of the file store: `history.jsonl` and its rotated segments.

Why this module exists: the embedded store keeps each message's final outcome
(`relay.core.history`) beside the spool, where the `history` CLI can read it while the relay
runs, and it must stay bounded on a relay that sends for years.

Format: one JSON object per line, appended with one `write` on an O_APPEND descriptor, as the
send ledger is (`ledger.py`): lines never interleave, a line survives the process being killed,
a torn last line is skipped when read. Not fsynced per record: a power cut may lose the last
seconds of history, never a message.

Bound: when `history.jsonl` holds `segment_records` lines it is renamed to `history.1.jsonl`
(each older segment moves one number up, the one past `segments` is dropped), so the store keeps
at most (segments + 1) x segment_records records: 11 x 20,000 = 220,000 by default, about
100 MB at a generous 450 bytes a record. Age: `prune` rewrites (temp file, fsync, rename) or
removes every segment holding records settled before the cut-off. Only the relay writes; the
CLI and the status page only read, newest segment first, stopping once they have enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from relay.core.history import HistoryQuery, HistoryRecord, select
from relay.store.protocol import StoreUnavailableError

__all__ = ["HISTORY_FILE", "SEGMENTS", "SEGMENT_RECORDS", "FileHistory", "HistoryFiles"]

HISTORY_FILE: Final = "history.jsonl"
SEGMENT_RECORDS: Final = 20_000
SEGMENTS: Final = 10


def _line(record: HistoryRecord) -> bytes:
    body = record.to_dict()
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def _parse(line: bytes) -> HistoryRecord | None:
    try:
        body: Any = json.loads(line)
        return HistoryRecord.from_dict(body) if isinstance(body, dict) else None
    except (ValueError, TypeError):  # a torn or foreign line: not a record we can show
        return None


class FileHistory:
    """The history files under `root` (blocking: run off the loop)."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        segment_records: int = SEGMENT_RECORDS,
        segments: int = SEGMENTS,
    ) -> None:
        if segment_records < 1 or segments < 0:
            raise ValueError("segment_records must be at least 1 and segments at least 0")
        self.root = root
        self.path = root / HISTORY_FILE
        self._fsync = fsync
        self._segment_records = segment_records
        self._segments = segments
        self._lock = threading.Lock()
        self._lines: int | None = None  # lines in the current segment; None: not counted yet

    def segment(self, number: int) -> Path:
        """Segment 0 is `history.jsonl` (appended to); 1..segments are older, 1 the newest."""
        return self.path if number == 0 else self.root / f"history.{number}.jsonl"

    def append(self, records: Sequence[HistoryRecord]) -> None:
        """Add `records`, rotating when the current segment is full; StoreUnavailableError
        when the disk refuses."""
        with self._lock:
            try:
                for start in range(0, len(records), self._segment_records):
                    self._append_locked(records[start : start + self._segment_records])
            except OSError as exc:
                raise StoreUnavailableError(f"cannot append to the history: {exc}") from exc

    def _append_locked(self, records: Sequence[HistoryRecord]) -> None:
        if self._lines is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lines = len(self._read(self.path))
        if self._lines + len(records) > self._segment_records:
            self._rotate_locked()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(_line(r) for r in records))
        finally:
            os.close(fd)
        self._lines += len(records)

    def _rotate_locked(self) -> None:
        """Each segment one number older; the oldest is overwritten (dropped)."""
        if not self._segments:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for number in range(self._segments, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.segment(number - 1), self.segment(number))
        self._lines = 0

    def search(self, query: HistoryQuery) -> list[HistoryRecord]:
        """What `query` matches, newest first; reads the newest segments first and stops once
        a whole segment has been read with `query.limit` matches in hand."""
        found: list[HistoryRecord] = []
        for number in range(self._segments + 1):
            try:
                records = self._read(self.segment(number))
            except OSError as exc:
                raise StoreUnavailableError(f"cannot read the history: {exc}") from exc
            found.extend(r for r in records if query.matches(r))
            if len(found) >= query.limit:
                break
        return select(found, query)

    def prune(self, before: float) -> int:
        """Drop every record settled before `before`; how many."""
        dropped = 0
        with self._lock:
            try:
                for number in range(self._segments + 1):
                    dropped += self._prune_locked(self.segment(number), before)
            except OSError as exc:
                raise StoreUnavailableError(f"cannot prune the history: {exc}") from exc
        return dropped

    def _prune_locked(self, path: Path, before: float) -> int:
        records = self._read(path)
        kept = [r for r in records if r.settled >= before]
        if len(kept) == len(records):
            return 0
        if not kept and path != self.path:
            path.unlink()
            return len(records)
        temp = path.with_name(path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(_line(r) for r in kept))
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(temp, path)  # readers see the old segment or the new one, never half
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        if path == self.path:
            self._lines = len(kept)
        return len(records) - len(kept)

    @staticmethod
    def _read(path: Path) -> list[HistoryRecord]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        parsed = (_parse(line) for line in data.splitlines() if line.strip())
        return [r for r in parsed if r is not None]


class HistoryFiles:
    """`FileHistory` as a `relay.store.protocol.HistoryLog` on its own: for a direct-mode
    relay (no spool, no `FileStore`) and for the `history` CLI."""

    def __init__(self, files: FileHistory) -> None:
        self.files = files

    async def record_history(self, records: Sequence[HistoryRecord]) -> None:
        if records:
            await asyncio.to_thread(self.files.append, records)

    async def history(self, query: HistoryQuery) -> Sequence[HistoryRecord]:
        return await asyncio.to_thread(self.files.search, query)

    async def prune_history(self, before: float) -> int:
        return await asyncio.to_thread(self.files.prune, before)
