"""What `check-config` can check on this machine without a network: ports, spool, secret files,
the log file.

Why this module exists: a configuration can be valid and still fail at `serve` because port 25
needs a capability, the admin port is taken or the spool directory belongs to another user. The
administrator should learn that from `check-config`, before a restart at 3 a.m., in the same words
`serve` would use (`relay.core.start_problems`). Each check is tried for real, as the user that
runs the command, and leaves nothing behind: a socket bound and closed, a temporary file created
and removed. It creates no directory and takes no lock.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

from relay.config.schema import Config
from relay.core.start_problems import Listening, bind_problem, spool_problem
from relay.ops.startup import current_user

__all__ = ["preflight"]

_PREFIX = "cannot start: "


def preflight(config: Config, *, base_dir: Path) -> list[str]:
    """One line per thing that would stop `serve` from starting here or that exposes a secret,
    in the file's order. Relative paths are relative to `base_dir` (the config file's folder)."""
    targets = [
        Listening("SMTP listener", f"smtp.listeners[{i}]", listener.address, listener.port)
        for i, listener in enumerate(config.smtp.listeners)
    ]
    targets.append(Listening("admin endpoint", "admin", config.admin.address, config.admin.port))
    found = [problem for target in targets if (problem := _bind(target)) is not None]
    if config.delivery.mode != "direct":
        spool = _spool(config.delivery.spool_dir)
        if spool is not None:
            found.append(spool)
    found.extend(_exposed_secret_files(config, base_dir))
    if config.logging.file is not None:
        log_file = _log_file(config.logging.file)
        if log_file is not None:
            found.append(log_file)
    return found


def _log_file(path: Path) -> str | None:
    """Can `serve` append to logging.file (or create it)? Opens nothing that exists for writing
    and leaves nothing behind: an existing file is checked with access(), a missing one by
    creating and removing a temporary file beside it."""
    try:
        if path.exists():
            if path.is_dir() or not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, "not a writable file", str(path))
        else:
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=".check-config-")
            os.close(handle)
            os.unlink(name)
    except OSError as exc:
        return (
            f"logging.file {path}: {exc.strerror}; serve would not start. Create the folder "
            f"and let user {current_user()} write there (systemd: LogsDirectory=), or remove "
            "logging.file to log to standard error"
        )
    return None


def _exposed_secret_files(config: Config, base_dir: Path) -> list[str]:
    """Secret files every user on this machine may read (the secret is as good as public)."""
    found: list[str] = []
    for name, auth in config.auth_objects.items():
        for key, value in (
            ("client_secret_file", auth.client_secret_file),
            ("private_key_file", auth.private_key_file or auth.certificate_file),
        ):
            if value is None:
                continue
            path = Path(value) if Path(value).is_absolute() else base_dir / value
            try:
                mode = path.stat().st_mode
            except OSError:
                continue  # the loader has reported it already
            if mode & 0o004:
                found.append(
                    f"auth_objects.{name}.{key} {path} is readable by every user on this "
                    f"machine; chmod 600 {path} (owned by the relay's user), or hand it over "
                    "with systemd's LoadCredential= / a Docker secret"
                )
    return found


def _bind(target: Listening) -> str | None:
    if target.port == 0:
        return None  # any free port: nothing to check
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as serve binds
        try:
            probe.bind((target.address, target.port))
        except OSError as exc:
            text = str(bind_problem(target, exc.errno, exc.strerror or str(exc)))
            if exc.errno == errno.EADDRINUSE:
                text += " (expected if this relay is already running there)"
            return text.removeprefix(_PREFIX)
    return None


def _spool(spool_dir: Path) -> str | None:
    """Can this user create files in the spool (or, if it does not exist yet, create it)?"""
    where = spool_dir
    while not where.exists() and where != where.parent:
        where = where.parent  # serve creates the missing levels below the first one that exists
    try:
        if not where.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(where))
        handle, name = tempfile.mkstemp(dir=where, prefix=".check-config-")
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        problem = spool_problem(
            str(spool_dir), exc.errno, exc.strerror or str(exc), user=current_user()
        )
        return str(problem).removeprefix(_PREFIX)
    return None
