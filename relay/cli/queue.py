"""`smtp-graph-relay queue ...`: look at and operate on the spool, also while the relay runs.

Why this module exists: at 3 a.m. an operator needs to see what is stuck and why, push a
message again after fixing the setup, or remove one. Every operation is one of the store's
operator commands (`relay.store.protocol.Store`), atomic renames in the file store, so it is
safe next to the running relay: a retried entry is picked up by the relay's next rescan (within
10 s), a deleted one simply fails to be claimed. The CLI opens the store for operator use
(`FileStore.open_for_operator`): no lock, and never the crash recovery, which only the relay
runs, at its start.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TextIO

from relay.config.schema import Config
from relay.core.values import EntryMeta, State
from relay.delivery.budget import MailboxBudgets
from relay.delivery.mailboxes import mailbox_rows
from relay.store.files import FileStore
from relay.store.protocol import Store

__all__ = ["run_queue_command"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def run_queue_command(
    config: Config, action: str, queue_id: str | None, dead: bool, out: TextIO
) -> int:
    if not config.delivery.spool_dir.is_dir():
        out.write(
            f"no spool at {config.delivery.spool_dir} "
            "(has the relay run in hybrid or queue mode?)\n"
        )
        return EXIT_FAILURE
    return asyncio.run(_run(config, action, queue_id, dead, out))


async def _run(config: Config, action: str, queue_id: str | None, dead: bool, out: TextIO) -> int:
    store = FileStore(config.delivery.spool_dir, reserve_bytes=0, threads=2)
    await store.open_for_operator()
    try:
        return await _command(config, store, action, queue_id, dead, out)
    finally:
        await store.close()


async def _command(
    config: Config, store: Store, action: str, queue_id: str | None, dead: bool, out: TextIO
) -> int:
    if action == "list":
        code = await _list(store, dead, out)
        if not dead:
            await _mailboxes(config, store, out)
        return code
    if action == "purge":
        if not dead:
            out.write("purge needs --dead (only dead letters can be purged)\n")
            return EXIT_USAGE
        out.write(f"purged {await store.purge('dead')} dead message(s)\n")
        return EXIT_OK
    if queue_id is None:
        out.write(f"queue {action} needs a queue id\n")
        return EXIT_USAGE
    try:
        found = await store.find(queue_id)
    except ValueError:
        out.write(f"{queue_id!r} is not a queue id\n")
        return EXIT_USAGE
    if found is None:
        out.write(f"{queue_id}: not in the spool\n")
        return EXIT_FAILURE
    state, meta = found
    if action == "show":
        _show(state, meta, out)
        return EXIT_OK
    if action == "retry":
        if await store.retry(queue_id):
            out.write(f"{queue_id}: queued for immediate delivery (was {state})\n")
            return EXIT_OK
        out.write(f"{queue_id}: cannot retry while it is {state}\n")
        return EXIT_FAILURE
    if await store.delete(queue_id):
        out.write(f"{queue_id}: deleted (was {state})\n")
        return EXIT_OK
    out.write(f"{queue_id}: cannot delete while it is {state} (being delivered right now)\n")
    return EXIT_FAILURE


async def _list(store: Store, dead: bool, out: TextIO) -> int:
    states: list[State] = ["dead"] if dead else ["active", "queue", "quarantine", "dead"]
    now = time.time()
    rows = [(state, meta) for state in states for meta in await store.list(state)]
    stats = await store.stats(now)
    out.write(
        f"{stats.queued} queued, {stats.active} in delivery, {stats.dead} dead, "
        f"{stats.quarantined} quarantined, {stats.corrupt} corrupt"
        + (f"; oldest {_age(now - stats.oldest_created)}" if stats.oldest_created else "")
        + "\n"
    )
    if not rows:
        return EXIT_OK
    out.write(
        f"{'QUEUE ID':<18}{'STATE':<12}{'AGE':>7} {'TRIES':>5}  {'NEXT':<8} SENDER -> RCPTS\n"
    )
    for state, meta in sorted(rows, key=lambda row: row[1].created):
        nxt = _age(meta.next_attempt - now) if meta.next_attempt > now and state == "queue" else "-"
        out.write(
            f"{meta.queue_id:<18}{state:<12}{_age(now - meta.created):>7} {meta.attempts:>5}  "
            f"{nxt:<8} <{meta.mail_from}> -> {len(meta.recipients)}\n"
        )
        reason = meta.dead_reason or meta.last_error
        if reason:
            out.write(f"{'':<18}{reason}\n")
    return EXIT_OK


async def _mailboxes(config: Config, store: Store, out: TextIO) -> None:
    """Per sending mailbox: each budget used / limit (from the store's send ledger: what the
    running relay sent), the messages waiting and when its line is expected to drain."""
    budgets = MailboxBudgets(config=lambda: config, store=store)
    await budgets.load()
    now = time.time()
    rows = await mailbox_rows(budgets, store, now)
    if not rows:
        return
    out.write(f"\n{'MAILBOX':<34}{'MSG/MIN':>10}{'RCPTS/DAY':>14}{'WAITING':>9}  DRAINS IN\n")
    for row in rows:
        messages = f"{row.used['messages_per_minute']}/{row.limits['messages_per_minute']}"
        recipients = f"{row.used['recipients_per_day']}/{row.limits['recipients_per_day']}"
        drains = _age(row.drain_eta) if row.waiting else "-"
        out.write(f"{row.mailbox:<34}{messages:>10}{recipients:>14}{row.waiting:>9}  {drains}\n")


def _show(state: str, meta: EntryMeta, out: TextIO) -> None:
    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "now"

    out.write(
        f"queue id:     {meta.queue_id}\nstate:        {state}\n"
        f"message-id:   {meta.message_id}\nreceived:     {when(meta.created)} from "
        f"{meta.client} ({meta.client_ip})\nsender:       <{meta.mail_from}>\n"
        f"recipients:   {', '.join(meta.recipients)}\n"
        f"route:        {meta.route} -> {meta.auth_object}, mailbox {meta.mailbox}\n"
        f"size:         {meta.size} bytes\nattempts:     {meta.attempts}\n"
        f"next attempt: {when(meta.next_attempt)}\n"
    )
    if meta.last_error:
        out.write(f"last error:   {meta.last_error}\n")
    if meta.dead_reason:
        out.write(f"dead reason:  {meta.dead_reason}\n")
    if meta.is_bounce:
        out.write("this is a bounce (DSN) the relay generated\n")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
