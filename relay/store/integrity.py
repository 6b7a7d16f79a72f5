"""What a stored message's size and SHA-256 promise, and the check that keeps the promise.

Why this module exists: a disk that lost the tail of a data file (power loss on a file system
without data journalling, a full disk during a copy, an operator's editor) must not turn into a
truncated message delivered through Graph (hardening #7). Every store records the digest when it
takes a message (`sealed`) and checks it before handing the message out (`mismatch`); a mismatch
sets the entry aside as corrupt. Pure: `hashlib` on bytes, no I/O.

The rule for `put`: size and digest are the store's, not the caller's. Whatever the entry states
(typically 0 and ""), the store records the length and SHA-256 of the bytes it is given, and
keeps them through defer, bury and quarantine. Version 1 entries have no digest ("") and are
checked by size only.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from relay.core.values import EntryMeta

__all__ = ["digest", "mismatch", "sealed"]


def digest(message: bytes) -> str:
    """The hex SHA-256 of `message`, as `EntryMeta.sha256` records it."""
    return hashlib.sha256(message).hexdigest()


def sealed(entry: EntryMeta, message: bytes) -> EntryMeta:
    """`entry` with the size and SHA-256 of `message`, whatever it stated before."""
    return replace(entry, size=len(message), sha256=digest(message))


def mismatch(entry: EntryMeta, message: bytes) -> str | None:
    """Why `message` is not the one `entry` recorded, or None when it is."""
    if len(message) != entry.size:
        return f"message is {len(message)} bytes, {entry.size} were stored"
    if entry.sha256 and digest(message) != entry.sha256:
        return "message does not match its recorded SHA-256"
    return None
