"""Delivery status notifications: build the DSN that `settle` decided is due, as a new entry.

Why this module exists: whether a DSN is due is the core's decision (`relay.core.lifecycle`,
including the backscatter rule); what it says is `relay.core.message.dsn`. This role puts the
two together with what only the shell has (the clock, a fresh queue id, the configured
hostname) and hands back an entry and its bytes for the store. A DSN is itself a queued message
(null sender, `is_bounce`, never bounced) so it gets the same durability and retries, and it is
routed by the failed message's sender, so it leaves through that message's route and mailbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from relay.config.schema import Config
from relay.core.lifecycle import Bounce
from relay.core.message.prepare import BounceRequest, FailedRecipient, build_dsn, is_bounce
from relay.core.values import EntryMeta, pool_members
from relay.store.queue_ids import new_queue_id

__all__ = ["Bouncer", "PendingBounce"]


@dataclass(frozen=True, slots=True)
class PendingBounce:
    """A DSN ready for `Store.put`: built once, so a retried put stores the same message."""

    entry: EntryMeta
    message: bytes


class Bouncer:
    """Builds DSNs; see the module docstring."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_queue_id,
    ) -> None:
        self._config = config
        self._clock = clock
        self._new_id = new_id

    def build(self, failed: EntryMeta, bounce: Bounce, original: bytes) -> PendingBounce | None:
        """The DSN about `failed` to its envelope sender; None when `original` is itself a DSN
        or automatic mail (RFC 3834 §2: no notifications about notifications)."""
        if is_bounce(original):
            return None
        hostname = self._config().smtp.hostname
        now = self._clock()
        queue_id = self._new_id()
        dsn = build_dsn(
            BounceRequest(
                original=original,
                envelope_from=failed.mail_from,
                recipients=tuple(
                    FailedRecipient(
                        address=rcpt, status=bounce.status, diagnostic=bounce.diagnostic
                    )
                    for rcpt in failed.recipients
                ),
                reporting_mta=hostname,
                queue_id=failed.queue_id,
                arrival=datetime.fromtimestamp(failed.created, UTC),
                now=datetime.fromtimestamp(now, UTC),
                # a pool's DSN comes from its first member (the members send as each other)
                from_address=(pool_members(failed.mailbox) or (failed.mailbox,))[0],
                message_id_local=queue_id,
                reason_text=bounce.explanation,
            )
        )
        entry = EntryMeta(
            queue_id=queue_id,
            created=now,
            mail_from="",
            recipients=(failed.mail_from,),
            client="relay",
            client_ip="",
            auth_object=failed.auth_object,
            mailbox=failed.mailbox,
            route=failed.route,
            message_id=f"<{queue_id}@{hostname}>",
            size=len(dsn),
            is_bounce=True,
            sender=failed.sender or failed.mail_from,
        )
        return PendingBounce(entry, dsn)
