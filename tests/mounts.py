"""Real file-system faults for tests: a tmpfs of a chosen size, which a test may fill or remount.

Why this module exists: a full disk (ENOSPC) and a read-only remount (EROFS) are the two faults a
spool meets in production, and only a real mount produces the kernel's own errors at the moment
they happen. Mounting needs root; without it (or where the sandbox forbids mount) the test is
skipped with the reason, which pytest prints in its summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["run", "tmpfs_mount"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@contextmanager
def tmpfs_mount(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax, e.g. "20m") at `mountpoint`; lazily unmounted after,
    writable again first if a test left it read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not installed")
    mountpoint.mkdir(exist_ok=True)
    mounted = run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        run("mount", "-o", "remount,rw", str(mountpoint))
        run("umount", "-l", str(mountpoint))
