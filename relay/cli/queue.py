"""`smtp-graph-relay queue ...`: look at and operate on the spool, also while the relay runs.

Why this module exists: at 3 a.m. an operator needs to see what is stuck and why, push a
message again after fixing the setup, or remove one. Every operation is one of the spool's
atomic renames, so it is safe next to the running relay: a retried entry is picked up by the
relay's next rescan (within 10 s), a deleted one simply fails to be claimed. The CLI never
runs the spool's crash recovery; only the relay does, at its start.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TextIO

from relay.config.schema import Config
from relay.core.values import EntryMeta
from relay.store.files.spool import Spool

__all__ = ["run_queue_command"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def run_queue_command(
    config: Config, action: str, queue_id: str | None, dead: bool, out: TextIO
) -> int:
    spool = Spool(config.delivery.spool_dir, reserve_bytes=0)
    if not config.delivery.spool_dir.is_dir():
        out.write(
            f"no spool at {config.delivery.spool_dir} "
            "(has the relay run in hybrid or queue mode?)\n"
        )
        return EXIT_FAILURE
    if action == "list":
        return _list(spool, dead, out)
    if action == "purge":
        if not dead:
            out.write("purge needs --dead (only dead letters can be purged)\n")
            return EXIT_USAGE
        out.write(f"purged {spool.purge('dead')} dead message(s)\n")
        return EXIT_OK
    if queue_id is None:
        out.write(f"queue {action} needs a queue id\n")
        return EXIT_USAGE
    try:
        found = spool.find(queue_id)
    except ValueError:
        out.write(f"{queue_id!r} is not a queue id\n")
        return EXIT_USAGE
    if found is None:
        out.write(f"{queue_id}: not in the spool\n")
        return EXIT_FAILURE
    state, meta = found
    if action == "show":
        _show(spool, state, meta, out)
        return EXIT_OK
    if action == "retry":
        if spool.retry(queue_id):
            out.write(f"{queue_id}: queued for immediate delivery (was {state})\n")
            return EXIT_OK
        out.write(f"{queue_id}: cannot retry while it is {state}\n")
        return EXIT_FAILURE
    if spool.delete(queue_id):
        out.write(f"{queue_id}: deleted (was {state})\n")
        return EXIT_OK
    out.write(f"{queue_id}: cannot delete while it is {state} (being delivered right now)\n")
    return EXIT_FAILURE


def _list(spool: Spool, dead: bool, out: TextIO) -> int:
    states = ["dead"] if dead else ["active", "queue", "quarantine", "dead"]
    now = time.time()
    rows = [(state, meta) for state in states for meta in spool.list(state)]  # type: ignore[arg-type]
    stats = spool.stats(now)
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


def _show(spool: Spool, state: str, meta: EntryMeta, out: TextIO) -> None:
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
