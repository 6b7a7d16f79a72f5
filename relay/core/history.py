"""The delivery history: one record per message's final outcome, and how it is searched. PURE.

Why this module exists: "did my scanner's mail go out yesterday, and if not, why?" is the first
question an administrator asks (issue 13 item 7). The queue forgets a delivered message at
once, so every message's final outcome is kept as a `HistoryRecord` for `history.retention`:
delivered (Complete), given up (Bury: "failed" or "expired"), refused while the client waited
("refused": hybrid's Discard, and direct mode's refusals). Every store keeps them the same way
(`record_history` / `history` in `relay.store.protocol`); this module holds the value, its
serialised form, and the filter every store and page applies (`select`), so the file store,
the memory store and a database store answer a query alike.

Nothing here reads a clock or a file: times come in as values. The Subject is read from the
message's header block only when `history.subjects` is on (privacy: off by default).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final, Literal

from relay.core.message.headers import decode_header_text, split_header_from_body

__all__ = [
    "OUTCOMES",
    "SEND_PATHS",
    "HistoryOutcome",
    "HistoryQuery",
    "HistoryRecord",
    "SendPath",
    "select",
    "subject_of",
]

HistoryOutcome = Literal["delivered", "failed", "expired", "refused"]
OUTCOMES: Final[tuple[HistoryOutcome, ...]] = ("delivered", "failed", "expired", "refused")
# How a message went to Graph: sendMail with MIME, sendMail with JSON, draft + upload session.
SendPath = Literal["mime", "json", "upload"]
SEND_PATHS: Final[tuple[SendPath, ...]] = ("mime", "json", "upload")
_SUBJECT_LIMIT: Final = 200  # what a search result line can show; the rest is noise
_ERROR_LIMIT: Final = 500


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """A message's final outcome. Times are wall-clock seconds; `path` is "" when no request
    went out as a known path (a failure before or while choosing one); `http_status` None and
    `request_id` "" when Graph never answered; `subject` None unless `history.subjects`."""

    queue_id: str
    message_id: str
    accepted: float
    settled: float
    client: str
    client_ip: str
    sender: str  # the envelope sender, "" for <>
    recipients: int
    route: str
    mailbox: str  # the mailbox that sent (a pool's member), else the route's mailbox
    path: str
    http_status: int | None
    request_id: str
    attempts: int
    outcome: HistoryOutcome
    error: str = ""
    remedy: str = ""
    subject: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}: want one of {OUTCOMES}")
        if self.path and self.path not in SEND_PATHS:
            raise ValueError(f"unknown send path {self.path!r}: want one of {SEND_PATHS}")
        if min(self.recipients, self.attempts) < 0:
            raise ValueError("recipients and attempts cannot be negative")

    @property
    def failed(self) -> bool:
        return self.outcome != "delivered"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (the file store's line, the CLI's --json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> HistoryRecord:
        """Parse `to_dict` output; ValueError or TypeError on anything else."""
        names = {f.name for f in fields(cls)}
        if not set(body) <= names:
            raise ValueError(f"unknown history fields: {sorted(set(body) - names)}")
        record = cls(**body)
        for name, kind in _TYPES.items():
            value = getattr(record, name)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise TypeError(f"history field {name!r} has the wrong type")
        return record

    def shortened(self) -> HistoryRecord:
        """Error and subject cut to what a record keeps (a runaway Graph message stays small)."""
        subject = None if self.subject is None else self.subject[:_SUBJECT_LIMIT]
        return _replace(self, error=self.error[:_ERROR_LIMIT], subject=subject)


_TYPES: Final[dict[str, type | tuple[type, ...]]] = {
    "queue_id": str, "message_id": str, "accepted": (int, float), "settled": (int, float),
    "client": str, "client_ip": str, "sender": str, "recipients": int, "route": str,
    "mailbox": str, "path": str, "http_status": (int, type(None)), "request_id": str,
    "attempts": int, "error": str, "remedy": str, "subject": (str, type(None)),
}  # fmt: skip


def _replace(record: HistoryRecord, **changes: Any) -> HistoryRecord:
    return HistoryRecord(**{**record.to_dict(), **changes})


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """What to look for; every condition given must hold.

    `since`: settled at or after it. `sender`: the envelope sender, a glob without ASCII case
    (`*@contoso.com`). `message_id`: with or without its angle brackets. `text`: the status
    page's search box, a part of the sender, the Message-ID or the queue id. `failed`: every
    outcome but delivered. Results come newest first, at most `limit`."""

    since: float | None = None
    sender: str = ""
    message_id: str = ""
    text: str = ""
    failed: bool = False
    limit: int = 50

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be at least 1")

    def matches(self, record: HistoryRecord) -> bool:
        if self.since is not None and record.settled < self.since:
            return False
        if self.failed and not record.failed:
            return False
        if self.sender and not fnmatch.fnmatchcase(record.sender.lower(), self.sender.lower()):
            return False
        if self.message_id and _bare_id(record.message_id) != _bare_id(self.message_id):
            return False
        if self.text:
            needle = self.text.strip().lower()
            haystack = (record.sender, record.message_id, record.queue_id)
            return any(needle in field.lower() for field in haystack)
        return True


def select(records: Iterable[HistoryRecord], query: HistoryQuery) -> list[HistoryRecord]:
    """The records `query` matches, newest settled first, at most `query.limit`."""
    found = sorted((r for r in records if query.matches(r)), key=lambda r: -r.settled)
    return found[: query.limit]


def subject_of(mime: bytes) -> str:
    """The message's Subject as display text ("" when it has none); the body is not read."""
    for field in split_header_from_body(mime).fields:
        if field.key == "subject":
            return decode_header_text(field.value)[:_SUBJECT_LIMIT]
    return ""


def _bare_id(message_id: str) -> str:
    return message_id.strip().strip("<>").lower()
