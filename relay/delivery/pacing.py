"""What one send uses of its mailbox's budgets, what Microsoft counted of it, and the pauses.

Why this module exists: `GraphAttempts` makes the request; the bookkeeping around it for the
sending limits (issue #12) is its own concern and is kept here, beside the request rather than
inside it:

- `need_for_large`: what the large-message path uses (many requests, uploaded bytes);
- `counted`: what Microsoft counted of a failed send (a token failure nothing, a refusal its
  requests, no answer everything: it may have gone out);
- `over_budget`: the refusal for a message no empty budget could take (it would wait for ever);
- `no_budget_reply`: what a client waiting in `direct` mode hears when the budget has no room;
- `MailboxPauses`: after a limit answer, the mailbox pauses for Retry-After or a learned back-off
  (`relay.core.pauses`), logged once per pause with the remedy and counted in /metrics.
"""

from __future__ import annotations

import logging
import math

from relay.core.budgets import LimitName, Need
from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)
from relay.core.lifecycle import Postponed
from relay.core.limits import GRAPH_MAX_REQUEST_BYTES, base64_size
from relay.core.pauses import pause_for
from relay.core.values import EntryMeta, Route
from relay.delivery.budget import MailboxBudgets
from relay.delivery.slots import MailboxSlots
from relay.graph.large import CHUNK_SIZE
from relay.ops.metrics import MetricsSink
from relay.store.protocol import MailboxKey, mailbox_key

__all__ = [
    "MailboxPauses",
    "counted",
    "from_graph",
    "need_for_large",
    "need_of",
    "no_budget_reply",
    "over_budget",
]

log = logging.getLogger("relay.delivery")


def from_graph(failure: DeliveryError) -> bool:
    """Whether Graph (or the way to it) produced `failure`, rather than the token step.

    Token failures are 451 4.7.0 (relay.aadsts) and are counted as token acquisitions; the only
    Graph answer mapped to 4.7.0 is its 401.
    """
    return failure.reply.status != "4.7.0" or failure.http_status == 401


def need_for_large(recipients: int, size: int, upload_limit: int) -> Need:
    """The large path's use of the budgets, from above: the decoded attachments are at most 3/4
    of the MIME (base64), sent in CHUNK_SIZE PUTs, plus the draft, a session per attachment
    (at most one per chunk), the send and a clean-up. The upload is capped at the mailbox's
    whole upload budget: the estimate errs high, and a message must not be refused for it."""
    upload = min(size * 3 // 4, upload_limit)
    chunks = -(-upload // CHUNK_SIZE)
    return Need(recipients, requests=3 + 2 * chunks, upload=upload)


def need_of(entry: EntryMeta, large_messages: str, upload_limit: int) -> Need:
    """What `entry` will use of its mailbox's budgets, judged from its size before its message
    is read (the workers' check before a claim: a message without room is never read)."""
    recipients = len(entry.recipients)
    if base64_size(entry.size) > GRAPH_MAX_REQUEST_BYTES and large_messages == "upload":
        return need_for_large(recipients, entry.size, upload_limit)
    return Need(recipients)


def counted(failure: DeliveryError, need: Need) -> Need | None:
    """What Microsoft counted of a send that failed: nothing for a token failure (no request
    went out), its requests for a refusal (Graph answered), everything when no answer came
    (it may have been sent)."""
    if not from_graph(failure):
        return None
    if failure.http_status is None:
        return need
    return Need(recipients=0, requests=need.requests, upload=need.upload, messages=0)


def over_budget(
    route: Route, limit: LimitName, need: Need, budgets: MailboxBudgets
) -> DeliveryError:
    """A message no empty budget of its mailbox could take: refused, it would wait for ever."""
    allowed = budgets.limits(route.auth_object, route.mailbox).limit(limit)
    if limit == "recipients_per_day":
        reply = SmtpReply(
            554,
            "5.5.3",
            f"Too many recipients for the sending limit of {_shown(route.mailbox)}: "
            f"{need.recipients} > {allowed} per day",
        )
    else:
        reply = SmtpReply(
            552, "5.3.4", f"Message too large for the sending limits of {_shown(route.mailbox)}"
        )
    return PermanentDeliveryError(
        f"the message needs more than the whole {limit} budget of {route.mailbox} ({allowed})",
        reply=reply,
        code="OverSendingBudget",
        remedy=f"raise delivery.mailbox_limits {limit} for this mailbox (up to what Exchange "
        "Online allows it), or have the sender split the message",
    )


def no_budget_reply(postponed: Postponed) -> SmtpReply:
    """What a client waiting in `direct` mode hears when the mailbox has no budget now."""
    when = "later" if postponed.wait is None else f"in {max(1, math.ceil(postponed.wait))} s"
    return SmtpReply(
        451, "4.7.0", f"Sending limit of {_shown(postponed.mailbox)} reached, try again {when}"
    )


def _shown(mailbox: str) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in mailbox)
    return cleaned if len(cleaned) <= 200 else cleaned[:197] + "..."


class MailboxPauses:
    """Pauses mailboxes after limit answers; learns the back-off per mailbox."""

    def __init__(self, slots: MailboxSlots, metrics: MetricsSink) -> None:
        self._slots = slots
        self._metrics = metrics
        self._streaks: dict[MailboxKey, int] = {}  # limit answers in a row, per mailbox

    def sent(self, route: Route) -> None:
        """A send as the mailbox went through: the learned back-off starts again."""
        self._streaks.pop(mailbox_key(route.auth_object, route.mailbox), None)

    def limit_reached(self, route: Route, failure: TransientDeliveryError) -> None:
        """The mailbox reached a limit: everyone sending as it waits (logged once a pause)."""
        limit = failure.mailbox_limit or "limit"
        key = mailbox_key(route.auth_object, route.mailbox)
        streak = self._streaks.get(key, 0)
        seconds = pause_for(limit, failure.retry_after, streak)
        was_paused = self._slots.paused_for(route.auth_object, route.mailbox) > 0
        added = self._slots.pause(route.auth_object, route.mailbox, seconds)
        self._streaks[key] = streak + 1
        if added > 0:
            self._metrics.mailbox_paused(route.mailbox, limit, added)
        if was_paused:
            return
        log.warning(
            "mailbox %s paused for %.0f s: %s; %s",
            route.mailbox,
            seconds,
            failure.describe(),
            failure.remedy,
            extra={
                "event": "mailbox_paused",
                "mailbox": route.mailbox,
                "auth_object": route.auth_object,
                "limit": limit,
                "pause_seconds": seconds,
                "graph_status": failure.http_status,
                "graph_code": failure.code,
                "request_id": failure.request_id,
                "remedy": failure.remedy,
            },
        )
