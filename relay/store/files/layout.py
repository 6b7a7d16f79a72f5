"""The file store's directory tree and its durable steps (see `relay.store.files` for the theory).

Why this module exists: every move of an entry, by the relay or the operator, is built from the
same few steps (fsynced temp file, rename, rewrite in place, unlink, set aside), each followed by
the directory fsyncs that make it survive power loss. Writing them once here keeps the ordering
rules (destination directory first, metadata after data on create and before it on remove) in
one place. Blocking calls; `OSError` becomes `StoreUnavailableError` at `io()`, once.

`scans` counts directory listings and `reads` metadata files read, so a test can prove that an
operation touches no directory (hardening #7: /metrics must not walk the spool) and that a
rescan reads only what changed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from relay.core.values import QUEUE_ID_PATTERN, QUEUE_ID_RE, EntryMeta, State, check_queue_id
from relay.store.protocol import EntryNotFoundError, StoreUnavailableError

__all__ = [
    "CORRUPT_RE",
    "LIVE",
    "CorruptEntryError",
    "EntrySetAsideError",
    "Layout",
    "io",
    "unlink_quietly",
]

log = logging.getLogger("relay.spool")

# Order of preference when one id is found in several states: the copy that still gets the
# message delivered wins; every rename's destination outranks its source.
# hold/ ranks after queue/: a hold or release cut by power loss leaves the entry deliverable.
LIVE: Final[tuple[State, ...]] = ("queue", "hold", "quarantine", "dead", "active")
CORRUPT_RE: Final = re.compile(rf"(?P<id>{QUEUE_ID_PATTERN})\.(?:json|eml)(?:\.[0-9]+)?")
DIRECTORIES: Final[tuple[str, ...]] = ("tmp", "data", *LIVE, "corrupt")


class CorruptEntryError(Exception):
    """An entry's metadata cannot be used (internal: callers set the entry aside)."""


class EntrySetAsideError(EntryNotFoundError):
    """The entry was just moved to corrupt/ (its message did not match): never deliver it."""


@contextlib.contextmanager
def io(what: str) -> Iterator[None]:
    """Convert OSError, once, into the caller's next step."""
    try:
        yield
    except OSError as exc:
        raise StoreUnavailableError(f"{what}: {exc}") from exc


class Layout:
    """Paths under `root` and the durable steps on them."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync  # False only for benchmarks
        self.scans = 0
        self.reads = 0

    def create(self) -> None:
        """Make the tree (0700); safe when it exists."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in DIRECTORIES:
            (self.root / name).mkdir(mode=0o700, exist_ok=True)
        self.sync_dir(self.root)

    def ensure(self, directory: str) -> None:
        """Make one directory of the tree (a spool from before it existed lacks it)."""
        path = self.root / directory
        if not path.is_dir():
            path.mkdir(mode=0o700, exist_ok=True)
            self.sync_dir(self.root)

    def meta_path(self, state: State, queue_id: str) -> Path:
        return self.root / state / f"{queue_id}.json"

    def data_path(self, queue_id: str) -> Path:
        return self.root / "data" / f"{check_queue_id(queue_id)}.eml"

    # --- reading ------------------------------------------------------------------------------

    def names(self, directory: str) -> list[str]:
        self.scans += 1
        try:
            return os.listdir(self.root / directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreUnavailableError(f"cannot list {self.root / directory}: {exc}") from exc

    def scan(self, state: State) -> list[tuple[str, int]]:
        """(queue id, inode) of every metadata file in `state`: one readdir, no stat."""
        self.scans += 1
        try:
            with os.scandir(self.root / state) as found:
                named = [(e.name.removesuffix(".json"), e.inode()) for e in found]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreUnavailableError(f"cannot list {self.root / state}: {exc}") from exc
        return [(qid, ino) for qid, ino in named if QUEUE_ID_RE.fullmatch(qid)]

    def ids(self, state: State) -> list[str]:
        names = (n.removesuffix(".json") for n in self.names(state) if n.endswith(".json"))
        return [qid for qid in names if QUEUE_ID_RE.fullmatch(qid)]

    def corrupt_ids(self) -> list[str]:
        """Queue ids with files in corrupt/."""
        return sorted({m["id"] for n in self.names("corrupt") if (m := CORRUPT_RE.fullmatch(n))})

    def load(self, state: State, qid: str) -> EntryMeta | None:
        """The metadata; None if the file is gone; CorruptEntryError if it cannot be used."""
        self.reads += 1
        try:
            raw = self.meta_path(state, qid).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EISDIR, errno.EACCES):
                raise CorruptEntryError(str(exc)) from exc
            raise StoreUnavailableError(f"cannot read {qid} in {state}/: {exc}") from exc
        try:
            meta = EntryMeta.from_json(raw)
        except ValueError as exc:
            raise CorruptEntryError(str(exc)) from exc
        if meta.queue_id != qid:
            raise CorruptEntryError(f"file {qid}.json holds queue id {meta.queue_id}")
        return meta

    # --- writing ------------------------------------------------------------------------------

    def write_temp(self, qid: str, content: bytes) -> Path:
        """A new fsynced 0600 file in tmp/; removed again if anything fails."""
        fd, name = tempfile.mkstemp(prefix=f"{qid}.", suffix=".tmp", dir=self.root / "tmp")
        try:
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            unlink_quietly(Path(name))
            raise
        return Path(name)

    def rewrite(self, state: State, meta: EntryMeta) -> None:
        """Replace the metadata in `state` atomically (temp, fsync, rename over)."""
        temp = self.write_temp(meta.queue_id, meta.to_json())
        try:
            os.replace(temp, self.meta_path(state, meta.queue_id))
        except OSError:
            unlink_quietly(temp)
            raise
        self.sync_dir(self.root / state)

    def move(self, src: State, dst: State, qid: str) -> None:
        os.rename(self.meta_path(src, qid), self.meta_path(dst, qid))
        self.sync_dir(self.root / dst)  # destination first: at worst two names, never none
        self.sync_dir(self.root / src)

    def unlink_meta(self, state: State, qid: str) -> bool:
        try:
            os.unlink(self.meta_path(state, qid))
        except FileNotFoundError:
            return False
        self.sync_dir(self.root / state)
        return True

    def remove_data(self, qid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_path(qid))
        self.sync_dir(self.root / "data")

    def set_aside(self, state: State, qid: str, why: str) -> None:
        """Move data (first), then metadata, to corrupt/. Never overwrites an earlier one."""
        corrupt = self.root / "corrupt"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.data_path(qid), _free_name(corrupt / f"{qid}.eml"))
            self.sync_dir(corrupt)
            self.sync_dir(self.root / "data")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.meta_path(state, qid), _free_name(corrupt / f"{qid}.json"))
            self.sync_dir(corrupt)
            self.sync_dir(self.root / state)
        log.error(
            "spool entry %s in %s/ moved to corrupt/: %s",
            qid,
            state,
            why,
            extra={"event": "spool_corrupt", "queue_id": qid, "state": state, "reason": why},
        )

    def sync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _free_name(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def unlink_quietly(path: Path) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
