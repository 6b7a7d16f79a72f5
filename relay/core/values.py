"""The values that travel down the pipeline: SMTP session -> policy -> store -> delivery -> Graph.

Why this module exists: each stage hands the next one of these frozen values and nothing else, so
no stage imports another for a data type (imports point down the flow, DESIGN §2). Pure: the
standard library and the rest of the core only.

- `Route`: the outbound setup policy chose for a message (auth object and mailbox).
- `Submission`: a message that passed policy, ready for the delivery engine.
- `EntryMeta`: a stored message's envelope and delivery state, as every store keeps it.
- `SendTarget`: the auth object and mailbox one Graph request sends as.
- `Delivered` / `Outcome`: what one attempt to hand a message to Graph came to.
- `Accepted` / `Refused`: what `submit` came to; the SMTP layer turns it into its reply.
"""

from __future__ import annotations

__all__ = [
    "FORMAT_VERSION",
    "POOL_PREFIX",
    "QUEUE_ID_PATTERN",
    "QUEUE_ID_RE",
    "Accepted",
    "Delivered",
    "EntryMeta",
    "Outcome",
    "Refused",
    "Route",
    "SendTarget",
    "State",
    "Submission",
    "SubmitOutcome",
    "check_queue_id",
    "pool_key",
    "pool_members",
]

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal

from relay.core.errors import DeliveryError, SmtpReply
from relay.core.message.prepare import PreparedMessage

if TYPE_CHECKING:  # annotations only: pydantic loads socket (importlib.metadata, email)
    from relay.config.schema import AuthObjectConfig

State = Literal["queue", "active", "dead", "quarantine", "corrupt", "hold"]
FORMAT_VERSION: Final = 3
# Older entries are read with the fields added since at their defaults. Version 1 (before
# `sender` and `sha256`): routed by mail_from, its message not checked against a digest.
# Version 2 (before `waited` and `waited_to`): nothing credited against its lifetime yet.
_V2_DEFAULTS: Final[dict[str, float]] = {"waited": 0.0, "waited_to": 0.0}
_V1_DEFAULTS: Final[dict[str, str | float]] = {"sender": "", "sha256": "", **_V2_DEFAULTS}
_DEFAULTS_SINCE: Final[dict[int, dict[str, Any]]] = {1: _V1_DEFAULTS, 2: _V2_DEFAULTS}
QUEUE_ID_PATTERN: Final = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"
QUEUE_ID_RE: Final = re.compile(QUEUE_ID_PATTERN)
_SCHEMA: Final[dict[str, type]] = {
    "queue_id": str, "created": float, "mail_from": str, "recipients": list, "client": str,
    "client_ip": str, "auth_object": str, "mailbox": str, "route": str, "message_id": str,
    "size": int, "attempts": int, "next_attempt": float, "last_error": str, "crashes": int,
    "is_bounce": bool, "dead_reason": str, "sender": str, "sha256": str, "waited": float,
    "waited_to": float,
}  # fmt: skip
POOL_PREFIX: Final = "pool:"


def pool_key(members: tuple[str, ...]) -> str:
    """What a pooled message's `mailbox` holds while it waits: the pool, not one member (any
    member with budget may send it). Not an address, so it never names a real mailbox."""
    return POOL_PREFIX + ",".join(members)


def pool_members(mailbox: str) -> tuple[str, ...]:
    """The members a `pool_key` names; () for a plain mailbox."""
    if not mailbox.startswith(POOL_PREFIX):
        return ()
    return tuple(mailbox[len(POOL_PREFIX) :].split(","))


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
    # The address routes are resolved by at each attempt: MAIL FROM, or the header From for <>.
    # "" (version 1 entries): use mail_from.
    sender: str = ""
    sha256: str = ""  # hex digest of the stored message; "" = not recorded (version 1)
    # Seconds of its life the message spent waiting in line (for a sending budget, a paused
    # mailbox, a free worker), credited against retry.lifetime up to the time `waited_to`
    # (`relay.core.lifecycle.claimed`): waiting is not failing.
    waited: float = 0.0
    waited_to: float = 0.0

    def __post_init__(self) -> None:
        check_queue_id(self.queue_id)
        if not self.recipients:
            raise ValueError("an entry needs at least one recipient")
        if min(self.size, self.attempts, self.crashes) < 0:
            raise ValueError("size, attempts and crashes cannot be negative")
        times = (self.created, self.next_attempt, self.waited, self.waited_to)
        if not all(math.isfinite(t) for t in times):
            raise ValueError("created, next_attempt, waited and waited_to must be finite")
        if self.waited < 0:
            raise ValueError("waited cannot be negative")

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
        if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"unsupported metadata version {version!r}")
        added = _DEFAULTS_SINCE.get(version, {})
        if body.keys() & added.keys():
            raise ValueError(f"version {version} metadata cannot have {sorted(added)}")
        body.update(added)
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


@dataclass(frozen=True, slots=True)
class Route:
    """The outbound setup resolved for one sender from the current configuration.

    `name` is the route's label (`RouteConfig.label`: its `name`, else its first sender
    pattern) for logs and metrics only: a queued message is routed again by its sender at each
    attempt, never found by its name or position.
    """

    name: str
    auth_object: str
    mailbox: str
    rewrite_from: bool = False
    save_to_sent_items: bool = True
    # A pool route: the members, and `mailbox` is their `pool_key`. `member` picks one.
    pool: tuple[str, ...] = ()

    def member(self, mailbox: str) -> Route:
        """This route sending as one member of its pool."""
        return replace(self, mailbox=mailbox, pool=())

    @property
    def needs_json(self) -> bool:
        """Whether only Graph's JSON form can express this route (MIME cannot set
        saveToSentItems: false, nor move the original From to Reply-To)."""
        return self.rewrite_from or not self.save_to_sent_items


@dataclass(frozen=True, slots=True)
class Submission:
    """A message that passed policy, ready for the delivery engine."""

    queue_id: str
    client: str
    client_ip: str
    mail_from: str
    recipients: tuple[str, ...]
    route: Route
    message: PreparedMessage
    # What the route was chosen by: MAIL FROM, or the header From for a null reverse-path.
    sender: str = ""


@dataclass(frozen=True, slots=True)
class Delivered:
    status: int
    request_id: str | None
    duration_ms: int
    sent_as: str = ""  # the mailbox it went out as (a pool member); "" = the entry's mailbox
    path: str = "mime"  # how: "mime" | "json" | "upload" (relay.core.history.SEND_PATHS)


Outcome = Delivered | DeliveryError


@dataclass(frozen=True, slots=True)
class Accepted:
    """The message is the relay's now: delivered already, or durably queued."""

    queue_id: str
    how: Literal["delivered", "queued"]

    @property
    def reply(self) -> SmtpReply:
        return SmtpReply(250, "2.0.0", f"Ok: {self.how} {self.queue_id}")


@dataclass(frozen=True, slots=True)
class Refused:
    """The client keeps the message: `reply` is a 4xx (try again) or a 5xx (give up)."""

    reply: SmtpReply


SubmitOutcome = Accepted | Refused


@dataclass(frozen=True, slots=True)
class SendTarget:
    """Where and as whom one Graph request sends: the auth object and the mailbox."""

    auth_name: str
    auth: AuthObjectConfig
    mailbox: str
    client_request_id: str


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in metadata")
