"""Why the relay could not start, in one line: the thing, the cause and the fix. PURE.

Why this module exists: a relay that cannot bind its port or open its spool is met at 3 a.m. by
an administrator reading `systemctl status` or a container log. A traceback ending in
`PermissionError ... '/var/lib/smtp-graph-relay'` names neither the setting to change nor the
fix, and "address already in use" does not say which of several listeners. So the composition
root converts the operating system's error, once, into `CannotStartError` worded here: the
configuration key, what went wrong, and what to do. Values in, text out: the errno, the path or
port and the key come from the caller.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from relay.core.errors import RelayError

__all__ = ["CannotStartError", "Listening", "bind_problem", "spool_problem"]

PRIVILEGED_PORTS = 1024  # below this, binding needs root or CAP_NET_BIND_SERVICE


class CannotStartError(RelayError):
    """Fix what the message says, then start again (exit 1, one line, no traceback)."""


@dataclass(frozen=True, slots=True)
class Listening:
    """What was to be bound: `key` is its place in the configuration, `what` its role."""

    what: str  # "SMTP listener", "admin endpoint"
    key: str  # "smtp.listeners[0]", "admin"
    address: str
    port: int


def bind_problem(target: Listening, code: int | None, detail: str) -> CannotStartError:
    """A listener that could not be bound."""
    where = f"{target.what} {target.key} ({target.address}:{target.port})"
    if code == errno.EADDRINUSE:
        fix = (
            f"another program (another relay?) already listens there: stop it, or choose another "
            f"port in {target.key}"
        )
        return CannotStartError(f"cannot start: {where}: the port is taken; {fix}")
    if code in (errno.EACCES, errno.EPERM) and 0 < target.port < PRIVILEGED_PORTS:
        return CannotStartError(
            f"cannot start: {where}: ports below {PRIVILEGED_PORTS} need root or the "
            "CAP_NET_BIND_SERVICE capability; run under the systemd unit (it grants only that "
            f"capability) or Docker's port mapping, or listen on 2525 in {target.key}"
        )
    if code == errno.EADDRNOTAVAIL:
        return CannotStartError(
            f"cannot start: {where}: {target.address} is not an address of this machine; use one "
            f"of its addresses or 0.0.0.0 in {target.key}.address"
        )
    return CannotStartError(f"cannot start: {where}: {detail}")


def spool_problem(
    spool_dir: str, code: int | None, detail: str, *, user: str, locked: bool = False
) -> CannotStartError:
    """The spool (`delivery.spool_dir`) could not be opened for this relay."""
    where = f"delivery.spool_dir {spool_dir}"
    if locked:
        return CannotStartError(
            f"cannot start: {where} is in use by another relay; stop that relay, or give this "
            "one its own delivery.spool_dir"
        )
    if code in (errno.EACCES, errno.EPERM):
        return CannotStartError(
            f"cannot start: {where} is not writable by user {user}; make it that user's "
            f"(chown -R {user} {spool_dir}), or run under the systemd unit, whose "
            "StateDirectory= creates it, or choose another delivery.spool_dir"
        )
    if code == errno.EROFS:
        return CannotStartError(
            f"cannot start: {where} is on a read-only file system; mount a writable volume "
            "there (Docker: -v relay-spool:/var/lib/smtp-graph-relay) or choose another "
            "delivery.spool_dir"
        )
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
        return CannotStartError(
            f"cannot start: {where} cannot be created as a directory ({detail}); create it, "
            "or choose another delivery.spool_dir"
        )
    if code == errno.ENOSPC:
        return CannotStartError(
            f"cannot start: {where}: the file system is full; free space there, or choose "
            "another delivery.spool_dir"
        )
    return CannotStartError(f"cannot start: {where}: {detail}")
