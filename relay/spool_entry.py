"""One spool entry's metadata: the `EntryMeta` value and its strict on-disk JSON form.

Why this module exists: `relay.spool` moves entries between directories; what an entry *is*,
and what may be read back from a metadata file after a crash, is a separate concern. The JSON
is versioned and checked field by field, because a file that parses into something unexpected
must be set aside as corrupt, never delivered. Queue ids become file names, so their grammar
(`check_queue_id`) lives here too. Pure: values and bytes in, values and bytes out.

Import these names from `relay.spool`, which re-exports them.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

__all__ = [
    "FORMAT_VERSION",
    "QUEUE_ID_PATTERN",
    "QUEUE_ID_RE",
    "EntryMeta",
    "State",
    "check_queue_id",
]

State = Literal["queue", "active", "dead", "quarantine", "corrupt"]
FORMAT_VERSION: Final = 1
QUEUE_ID_PATTERN: Final = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"
QUEUE_ID_RE: Final = re.compile(QUEUE_ID_PATTERN)
_SCHEMA: Final[dict[str, type]] = {
    "queue_id": str, "created": float, "mail_from": str, "recipients": list, "client": str,
    "client_ip": str, "auth_object": str, "mailbox": str, "route": str, "message_id": str,
    "size": int, "attempts": int, "next_attempt": float, "last_error": str, "crashes": int,
    "is_bounce": bool, "dead_reason": str,
}  # fmt: skip


def new_queue_id() -> str:
    """A fresh queue id: 16 upper-case hex digits, random, safe as a file name."""
    return uuid.uuid4().hex[:16].upper()


def check_queue_id(queue_id: str) -> str:
    """Return `queue_id` if it is safe as a file name, else raise ValueError (path traversal)."""
    if not isinstance(queue_id, str) or not QUEUE_ID_RE.fullmatch(queue_id):
        raise ValueError(f"invalid queue id {queue_id!r}: want {QUEUE_ID_PATTERN}")
    return queue_id


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """A spooled message's envelope and delivery state. Times are wall-clock seconds."""

    queue_id: str
    created: float
    mail_from: str  # "" is the null sender <>
    recipients: tuple[str, ...]
    client: str
    client_ip: str
    auth_object: str
    mailbox: str
    route: str
    message_id: str
    size: int
    attempts: int = 0
    next_attempt: float = 0.0  # 0 = now
    last_error: str = ""
    crashes: int = 0
    is_bounce: bool = False  # a DSN we generated: never bounce it
    dead_reason: str = ""

    def __post_init__(self) -> None:
        check_queue_id(self.queue_id)
        if not self.recipients:
            raise ValueError("an entry needs at least one recipient")
        if min(self.size, self.attempts, self.crashes) < 0:
            raise ValueError("size, attempts and crashes cannot be negative")
        if not (math.isfinite(self.created) and math.isfinite(self.next_attempt)):
            raise ValueError("created and next_attempt must be finite")

    def to_json(self) -> bytes:
        """ASCII JSON (lone surrogates from 8-bit headers survive as escapes) with a version."""
        body = {"version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(body, ensure_ascii=True, allow_nan=False, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> EntryMeta:
        """Parse `to_json` output; ValueError on anything else (version, keys, types, values)."""
        try:
            body = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except RecursionError as exc:
            raise ValueError("metadata nested too deeply") from exc
        if not isinstance(body, dict):
            raise ValueError("metadata is not a JSON object")
        version = body.pop("version", None)
        if type(version) is not int or version != FORMAT_VERSION:
            raise ValueError(f"unsupported metadata version {version!r}")
        if body.keys() != _SCHEMA.keys():
            raise ValueError(f"metadata keys differ: {sorted(body.keys() ^ _SCHEMA.keys())}")
        values: dict[str, Any] = {}
        for key, kind in _SCHEMA.items():
            value = body[key]
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:
                raise ValueError(f"metadata field {key!r} must be {kind.__name__}")
            values[key] = value
        if not all(type(r) is str for r in values["recipients"]):
            raise ValueError("metadata field 'recipients' must hold strings")
        values["recipients"] = tuple(values["recipients"])
        return cls(**values)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in metadata")
