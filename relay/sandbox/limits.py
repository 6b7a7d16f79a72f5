# Why this module exists: the sandbox must be at least as strict as Microsoft, and the relay's
# per-mailbox budgets (DESIGN §5) are only proven right against something that enforces the
# same limits. This is the pure part: the limits as one validated value, the rolling window
# that decides "over or not, and for how long", and the NDR value Exchange hands back when it
# accepts a message it then refuses to send. No sockets, no loop; time comes in as numbers.
"""Exchange Online's and Graph's sending limits, as values and rolling windows."""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "LIMIT_NAMES",
    "NDR_TEXTS",
    "Ndr",
    "RollingWindow",
    "SandboxLimits",
    "replace_limits",
]

# The limits, as documented:
# - microsoftgraph/microsoft-graph-docs-contrib concepts/throttling-limits.md, "Outlook service
#   limits": per app ID and mailbox, "10,000 API requests in a 10 minute period" and "150
#   megabytes (MB) upload (PATCH, POST, PUT) in a 5 minute period"; 4 concurrent requests.
# - Exchange Online limits (sending limits): 30 messages per minute and 10,000 recipients per
#   day per mailbox, whichever app sends.


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """What the sandbox enforces. Windows are in seconds so tests can shrink them."""

    messages_per_minute: int = 30  # per mailbox (Exchange, across all apps), any rolling window
    recipients_per_day: int = 10_000  # per mailbox; To+Cc+Bcc of each accepted message
    concurrent_requests: int = 4  # per (app, mailbox) — Graph MailboxConcurrency
    requests_per_10_minutes: int = 10_000  # per (app, mailbox) — every request on the mailbox
    # per (app, mailbox), bytes in upload-session PUTs: Graph's "150 MB" is binary, like its
    # largest attachment (150 MiB, attachment-createuploadsession.md), which must fit
    upload_per_5_minutes: int = 150 * 1024 * 1024
    messages_window: float = 60.0
    recipients_window: float = 86_400.0
    requests_window: float = 600.0
    upload_window: float = 300.0
    exchange_answer: Literal["error", "ndr"] = "error"  # how messages/recipients limits answer
    ndr_delay: float = 0.0  # ndr mode: seconds until the NDR lands

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check(field.name, getattr(self, field.name))


# The five limits, in the order `violations` and the control API list them.
LIMIT_NAMES = (
    "messages_per_minute",
    "recipients_per_day",
    "concurrent_requests",
    "requests_per_10_minutes",
    "upload_per_5_minutes",
)
_INTS = frozenset(LIMIT_NAMES)
_WINDOWS = frozenset({"messages_window", "recipients_window", "requests_window", "upload_window"})
_FIELDS = tuple(f.name for f in dataclasses.fields(SandboxLimits))


def _check(name: str, value: object) -> None:
    if name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
    elif name in _WINDOWS or name == "ndr_delay":
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a number of seconds, not {value!r}")
        if value < 0 or (value == 0 and name != "ndr_delay"):
            least = "0 or more" if name == "ndr_delay" else "more than 0"
            raise ValueError(f"{name} must be {least} seconds, not {value!r}")
    elif name == "exchange_answer" and value not in ("error", "ndr"):
        raise ValueError(f"exchange_answer must be 'error' or 'ndr', not {value!r}")


def replace_limits(limits: SandboxLimits, changes: Mapping[str, object]) -> SandboxLimits:
    """`limits` with `changes` applied; ValueError naming the field for unknown or bad ones."""
    unknown = sorted(set(changes) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown sandbox limit {', '.join(unknown)}; the limits are {', '.join(_FIELDS)}"
        )
    values = dict(changes)
    for name in _WINDOWS | {"ndr_delay"}:
        if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
            values[name] = float(values[name])  # type: ignore[arg-type]
    return dataclasses.replace(limits, **values)  # type: ignore[arg-type]


class RollingWindow:
    """Weighted events in a rolling window: a limit L over window W is exceeded when a new
    event would make the total of events in (now - W, now] exceed L."""

    __slots__ = ("_events", "_total")

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def wait(self, now: float, weight: int, limit: int, window: float) -> float:
        """0 if an event of `weight` fits now, else seconds until it would (the whole window
        if it never can: the event alone is over the limit)."""
        self._prune(now, window)
        if self._total + weight <= limit:
            return 0.0
        if weight > limit:
            return window
        total = self._total
        for at, size in self._events:
            total -= size
            if total + weight <= limit:
                return max(at + window - now, 0.0)
        return window  # unreachable: removing every event leaves room for weight <= limit

    def add(self, now: float, weight: int) -> None:
        self._events.append((now, weight))
        self._total += weight

    def _prune(self, now: float, window: float) -> None:
        while self._events and self._events[0][0] <= now - window:
            self._total -= self._events.popleft()[1]


# What Exchange writes into the NDR for each Exchange limit (status, full text).
NDR_TEXTS: Mapping[str, tuple[str, str]] = {
    "recipients_per_day": (
        "5.1.90",
        "550 5.1.90 Your message can't be sent because you've reached your daily limit for "
        "message recipients",
    ),
    "messages_per_minute": (
        "5.2.0",
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    ),
}


@dataclass(frozen=True, slots=True)
class Ndr:
    """A non-delivery report that landed in the sending mailbox: Exchange said 202, then did
    not send. `limit` names the SandboxLimits field that refused it."""

    mailbox: str
    limit: str
    status: str
    text: str
    at: float
    message_id: str | None
    subject: str
