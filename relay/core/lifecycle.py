"""What happens to a stored message after one attempt to deliver it. PURE.

Why this module exists: the rules that decide a message's fate (retry when, give up when, bounce
or not, set aside when) used to be spread over the inline path and the queue workers, and each
copy drifted. Here they are one function, `settle`, that takes values and returns a decision;
`relay.delivery` only carries the decision out against the store.

Theory of operation
-------------------
An attempt on a claimed entry ends in one of six results:

    Delivered            Graph answered 202
    Postponed            the mailbox's sending budget had no room: nothing was sent
    TransientDeliveryError   try again later (Retry-After honoured when Graph sent one)
    PermanentDeliveryError   Graph (or the relay's own checks) refused the message for good
    NoRoute              no route of the *current* configuration matches the entry's sender
    Crashed              handling the entry raised an unexpected error (a bug, not Graph)

`settle(entry, result, now, policy)` maps each to exactly one decision:

    Delivered                                   -> Complete
    Postponed                                   -> Defer, unchanged (not an attempt)
    Transient, the mailbox reached a limit      -> Defer, not an attempt (the mailbox pauses)
    Transient, before created + lifetime        -> Defer (Retry-After, else backoff with jitter)
    Transient, at or after the deadline         -> Bury "expired", bounce with 4.4.7
    Permanent, the waiting client was told      -> Discard (the client owns the failure)
    Permanent                                   -> Bury "refused", bounce with its own status
    NoRoute, before created + lifetime          -> Defer with an alert (an administrator can
                                                   still add or fix a route; Postfix defers
                                                   an unknown transport the same way)
    NoRoute, at or after the deadline           -> Bury "no route", bounce with 5.4.4
    Crashed, crashes + 1 <  CRASH_LIMIT         -> Defer by retry.first (not an attempt)
    Crashed, crashes + 1 >= CRASH_LIMIT         -> Quarantine for an operator

Every deferral counts an attempt except a crash, which counts a crash instead (a bug must not
age a message towards its expiry, and Graph never saw it), a postponement and a mailbox limit:
waiting for a sending budget is not failing (issue #12). Neither moves `next_attempt`, so the
message keeps its place in its mailbox's line.

The lifetime counts failing, not waiting for the relay's own pacing: `claimed` credits the
time an entry's mailbox was held back while the entry was due (no budget, paused, every Graph
slot taken: `relay.core.waiting`) to its `waited`, and the deadline is
`created + waited + lifetime`.

Whether a Bury carries a `Bounce` (a DSN is due) is decided here too. A DSN goes to the
envelope sender only when all of these hold: bounces are on; the sender is not `<>`; the entry
is not itself a DSN; and the submitting client's `senders` patterns name that sender
*explicitly* (issue #11, item 5: backscatter). A pattern without a real domain (`*`, `*@*`)
lets a client claim any address, so a forged MAIL FROM would turn the relay into a mail cannon
aimed at the forged address; `*@contoso.com` names the domain, so its senders get DSNs. A
client that is no longer configured names nobody.

Nothing here reads a clock, a file or a random source: `now` and `jitter` come in as values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

from relay.core.errors import DeliveryError, SmtpReply, TransientDeliveryError
from relay.core.limits import CRASH_LIMIT
from relay.core.policy import matches_any
from relay.core.schedule import Backoff, is_expired, next_attempt_at
from relay.core.values import Delivered, EntryMeta

if TYPE_CHECKING:  # annotations only: pydantic loads socket (importlib.metadata, email)
    from relay.config.schema import Config

__all__ = [
    "NO_ROUTE_STATUS",
    "Bounce",
    "Bury",
    "Complete",
    "Crashed",
    "Decision",
    "Defer",
    "Discard",
    "NoRoute",
    "Postponed",
    "Quarantine",
    "Result",
    "SettlePolicy",
    "claimed",
    "names_explicitly",
    "settle",
]

# RFC 3463 X.4.4: "Unable to route"; permanent once the message's lifetime is over.
NO_ROUTE_STATUS: Final = "5.4.4"
EXPIRED_STATUS: Final = "4.4.7"  # RFC 3463: delivery time expired
_WILDCARDS: Final = frozenset("*?")
_ERROR_TEXT_LIMIT: Final = 300


# --- what an attempt came to ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No route of the current configuration matches `sender`."""

    sender: str

    @property
    def reason(self) -> str:
        return f"no route matches the sender <{self.sender}>"


@dataclass(frozen=True, slots=True)
class Crashed:
    """Handling the entry raised an unexpected error (`detail` names its type)."""

    detail: str = "internal error"


@dataclass(frozen=True, slots=True)
class Postponed:
    """The mailbox's sending budget had no room for the message: nothing was sent. `wait` is
    seconds until it frees (None: when a request in flight ends); `limit` names the budget."""

    mailbox: str
    limit: str
    wait: float | None

    @property
    def reason(self) -> str:
        when = "" if self.wait is None else f", room in {self.wait:.0f} s"
        return f"waiting for the {self.limit} budget of {self.mailbox}{when}"


Result = Delivered | DeliveryError | NoRoute | Crashed | Postponed


# --- what to do about it ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bounce:
    """A DSN is due: RFC 3463 `status` for every recipient, `diagnostic` for its
    Diagnostic-Code, `explanation` for the human-readable part."""

    status: str
    diagnostic: str
    explanation: str


@dataclass(frozen=True, slots=True)
class Complete:
    """Delivered: remove the entry."""

    entry: EntryMeta


@dataclass(frozen=True, slots=True)
class Defer:
    """Back to the queue as `entry` (attempts, next_attempt = `at`, last_error updated).
    `alert`: log it as something an administrator must fix."""

    entry: EntryMeta
    at: float
    reason: str
    alert: bool = False


@dataclass(frozen=True, slots=True)
class Bury:
    """Given up: keep `entry` in the dead-letter area with `reason`; send `bounce` if set."""

    entry: EntryMeta
    reason: str
    bounce: Bounce | None
    expired: bool = False


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Its handling keeps crashing the relay: keep it for an operator, attempt it no more."""

    entry: EntryMeta
    reason: str


@dataclass(frozen=True, slots=True)
class Discard:
    """The waiting SMTP client heard the refusal itself: keep nothing, send no DSN."""

    entry: EntryMeta
    reason: str


Decision = Complete | Defer | Bury | Quarantine | Discard


@dataclass(frozen=True, slots=True)
class SettlePolicy:
    """The configuration `settle` needs, as a value: build it with `from_config`."""

    backoff: Backoff
    bounces: bool = True
    # client name -> its `senders` patterns (who may receive a DSN, see the module docstring)
    client_senders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> SettlePolicy:
        retry = config.delivery.retry
        return cls(
            backoff=Backoff(retry.first, retry.max, retry.lifetime),
            bounces=config.delivery.bounces,
            client_senders={c.name: tuple(c.senders) for c in config.clients},
        )


# --- the rules ----------------------------------------------------------------------------


def settle(
    entry: EntryMeta,
    result: Result,
    now: float,
    policy: SettlePolicy,
    *,
    jitter: float = 0.0,
    answered: bool = False,
) -> Decision:
    """The decision for `entry` after an attempt that came to `result` at `now`.

    `jitter` in [0, 1) spreads the backoff; `answered` says that the SMTP client is still
    waiting and hears a permanent refusal itself (hybrid mode's inline attempt).
    """
    if isinstance(result, Delivered):
        return Complete(entry)
    if isinstance(result, Crashed):
        return _crashed(entry, result, now, policy)
    if isinstance(result, Postponed):
        return Defer(entry, entry.next_attempt, result.reason)
    if isinstance(result, TransientDeliveryError) and result.mailbox_limit:
        waiting = replace(entry, last_error=_short(result))
        return Defer(waiting, entry.next_attempt, f"mailbox paused: {result.mailbox_limit}")
    expired = is_expired(entry.created + entry.waited, now, policy.backoff.lifetime)
    if isinstance(result, NoRoute):
        tried = replace(entry, attempts=entry.attempts + 1, last_error=result.reason)
        if not expired:
            return _defer(tried, now, None, policy, jitter, result.reason, alert=True)
        reason = f"{result.reason} for its whole lifetime"
        explanation = (
            f"The relay has no outbound route for the sender <{result.sender}> any more, so it "
            "could not send the message. What an administrator can do: add a route whose "
            "senders match this address."
        )
        bounce = Bounce(NO_ROUTE_STATUS, f"x-local; {reason}", explanation)
        return Bury(tried, reason, _if_due(tried, bounce, policy), expired=True)
    error = _short(result)
    tried = replace(entry, attempts=entry.attempts + 1, last_error=error)
    if result.reply.is_transient:
        if not expired:
            retry_after = result.retry_after if isinstance(result, TransientDeliveryError) else None
            return _defer(tried, now, retry_after, policy, jitter, error, alert=_alert(result))
        reason = f"expired after {tried.attempts} attempts; last error: {error}"
        bounce = Bounce(EXPIRED_STATUS, _diagnostic(result), _explanation(result, expired=True))
        return Bury(tried, reason, _if_due(tried, bounce, policy), expired=True)
    if answered:
        return Discard(tried, f"refused while the client waited: {error}")
    bounce = Bounce(result.reply.status, _diagnostic(result), _explanation(result, expired=False))
    return Bury(tried, f"refused: {error}", _if_due(tried, bounce, policy))


def claimed(entry: EntryMeta, now: float, held: Callable[[float, float], float]) -> EntryMeta:
    """`entry` as a worker claimed it at `now`. `held(since, until)` says how long its mailbox
    was held back in that span; the part since it was due (and since the last credit) is
    credited to `waited`, so it does not count against its lifetime."""
    due = max(entry.created, entry.next_attempt, entry.waited_to)
    credit = held(due, now) if now > due else 0.0
    return replace(entry, waited=entry.waited + credit, waited_to=max(now, due))


def names_explicitly(patterns: Sequence[str], address: str) -> bool:
    """Whether one of `patterns` matches `address` *and* names a domain: `*@contoso.com` and
    `scanner@contoso.com` do, `*`, `*@*` and `?*` do not (they let a client claim anyone)."""
    return any(_names_a_domain(p) and matches_any(address, (p,)) for p in patterns)


def _names_a_domain(pattern: str) -> bool:
    _, at, domain = pattern.rpartition("@")
    return bool(at) and any(c not in _WILDCARDS for c in domain)


def _if_due(entry: EntryMeta, bounce: Bounce, policy: SettlePolicy) -> Bounce | None:
    if not policy.bounces or not entry.mail_from or entry.is_bounce:
        return None
    patterns = policy.client_senders.get(entry.client, ())
    return bounce if names_explicitly(patterns, entry.mail_from) else None


def _defer(
    tried: EntryMeta,
    now: float,
    retry_after: float | None,
    policy: SettlePolicy,
    jitter: float,
    reason: str,
    *,
    alert: bool,
) -> Defer:
    at = next_attempt_at(
        now=now,
        created=tried.created + tried.waited,
        attempts=tried.attempts,
        retry_after=retry_after,
        backoff=policy.backoff,
        random_fraction=jitter,
    )
    return Defer(replace(tried, next_attempt=at), at, reason, alert=alert)


def _crashed(entry: EntryMeta, result: Crashed, now: float, policy: SettlePolicy) -> Decision:
    crashed = replace(entry, crashes=entry.crashes + 1, last_error=result.detail)
    if crashed.crashes >= CRASH_LIMIT:
        return Quarantine(crashed, f"{result.detail} handling it {crashed.crashes} times")
    at = now + policy.backoff.first
    return Defer(replace(crashed, next_attempt=at), at, result.detail, alert=True)


def _alert(failure: DeliveryError) -> bool:
    return isinstance(failure, TransientDeliveryError) and failure.alert


def _short(failure: DeliveryError) -> str:
    code = f" {failure.code}" if failure.code else ""
    return f"{failure.reply}{code}"[:_ERROR_TEXT_LIMIT]


def _diagnostic(failure: DeliveryError) -> str:
    text = f"smtp; {failure.reply}"
    if failure.code:
        text += f" (Graph {failure.code}; request-id {failure.request_id or 'none'})"
    return text


def _explanation(failure: DeliveryError, *, expired: bool) -> str:
    reply: SmtpReply = failure.reply
    if expired:
        text = (
            "Microsoft 365 could not take the message for too long, so the relay gave up. "
            f"The last answer was: {reply.text}."
        )
    else:
        text = f"Microsoft 365 refused the message: {reply.text}."
    if failure.remedy:
        text += f" What an administrator can do: {failure.remedy}."
    return text
