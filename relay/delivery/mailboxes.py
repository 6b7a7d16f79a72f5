"""Each sending mailbox's budget, queue and drain estimate, for the people who watch the relay.

Why this module exists: /metrics, the status page and `queue list` all answer the same question
about every mailbox that is sending or has mail waiting (issue #12 item 6): how much of each
budget the windows hold, how many messages wait for it, and when its line is expected to be
empty. The answer comes from two places, the budgets (`MailboxBudgets`, in this process or
loaded from the store's ledger by the CLI) and the store's queue (`Store.waiting`), and is put
together here once, as `relay.ops.mailbox_gauges.MailboxRow` values.

A pool's line drains through all its members: its waiting messages are dealt out to them in
turn, and the estimate is the latest member's.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.core.budgets import WINDOWS, drain_eta
from relay.core.values import pool_members
from relay.delivery.budget import MailboxBudgets
from relay.ops.mailbox_gauges import MailboxRow
from relay.store.protocol import MailboxKey, Store, mailbox_key

__all__ = ["mailbox_rows"]


async def mailbox_rows(
    budgets: MailboxBudgets,
    store: Store | None,
    now: float,
    *,
    paused_for: Callable[[str, str], float] | None = None,
    in_flight: Callable[[str, str], int] | None = None,
) -> list[MailboxRow]:
    """One row per mailbox (or pool) with sends in its windows, requests in flight, or queued
    mail, sorted by auth object and mailbox."""
    waiting = dict(await store.waiting()) if store is not None else {}
    names: dict[MailboxKey, tuple[str, str]] = {}
    for spent in budgets.spent():
        names[mailbox_key(spent.auth_object, spent.mailbox)] = (spent.auth_object, spent.mailbox)
    for key in waiting:
        names.setdefault(key, key)
    rows: list[MailboxRow] = []
    for key, (auth_object, mailbox) in sorted(names.items()):
        line = list(waiting.get(key, ()))
        members = pool_members(mailbox) or (mailbox,)
        limits = budgets.limits(auth_object, members[0])
        eta = max(
            drain_eta(budgets.usage(auth_object, member), limits, line[i :: len(members)], now)
            for i, member in enumerate(members)
        )
        usage = budgets.usage(auth_object, members[0])
        used: dict[str, int] = {name: usage.used(name, now) for name in WINDOWS}
        used["concurrent_requests"] = in_flight(auth_object, mailbox) if in_flight else 0
        shown: dict[str, int] = {name: limits.limit(name) for name in WINDOWS}
        shown["concurrent_requests"] = limits.concurrent_requests
        rows.append(
            MailboxRow(
                auth_object=auth_object,
                mailbox=mailbox,
                used=used,
                limits=shown,
                in_flight=used["concurrent_requests"],
                waiting=len(line),
                drain_eta=eta,
                paused_for=paused_for(auth_object, mailbox) if paused_for else 0.0,
            )
        )
    return rows
