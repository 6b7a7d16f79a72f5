"""Start-up failures as one line with the fix: the operating system's errors converted once.

Why this module exists: the composition root binds listeners and opens the spool; when either
fails, the administrator must read which setting is wrong and what to do, not a traceback
(`relay.core.start_problems` words it). This is the thin I/O side of that: it catches the
`OSError` of a bind and the store's errors of opening the spool, and asks who the relay runs as.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

from relay.core.start_problems import Listening, bind_problem, spool_problem
from relay.store.files.store import StoreLockedError
from relay.store.protocol import StoreUnavailableError

__all__ = ["binding", "current_user", "spool_opening"]


@contextlib.contextmanager
def binding(target: Listening) -> Iterator[None]:
    """A failed bind of `target` becomes a CannotStartError naming its key and the fix."""
    try:
        yield
    except OSError as exc:
        raise bind_problem(target, exc.errno, exc.strerror or str(exc)) from None


@contextlib.contextmanager
def spool_opening(spool_dir: Path) -> Iterator[None]:
    """A spool that cannot be opened becomes a CannotStartError naming delivery.spool_dir."""
    try:
        yield
    except StoreLockedError as exc:
        raise spool_problem(
            str(spool_dir), None, str(exc), user=current_user(), locked=True
        ) from None
    except StoreUnavailableError as exc:
        cause = exc.__cause__
        code = cause.errno if isinstance(cause, OSError) else None
        detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
        raise spool_problem(str(spool_dir), code, detail, user=current_user()) from None


def current_user() -> str:
    """The name of the user the relay runs as, for advice about file ownership."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (Docker --user 10025, DynamicUser)
        return f"uid {os.geteuid()}"
