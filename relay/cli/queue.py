"""`smtp-graph-relay queue ...`: look at and operate on the spool, also while the relay runs.

Why this module exists: at 3 a.m. an operator needs to see what is stuck and why, push a
message again after fixing the setup, hold or remove one, or stop a mailbox: the tools a Postfix
administrator knows as `postqueue`, `postsuper` and `qshape`. Every operation is one of the
store's operator commands (`relay.store.protocol.Store`), atomic renames in the file store, so it
is safe next to the running relay: a retried, held or released entry and a paused mailbox are
picked up by the relay's next rescan (within 10 s), a deleted or held one simply fails to be
claimed. The CLI opens the store for operator use (`FileStore.open_for_operator`): no lock, and
never the crash recovery, which only the relay runs, at its start.

This module reads (list, show, the dispatch); `queue_ops` changes (hold, release, retry, delete,
pause, resume); `queue_shape` draws the qshape table.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from relay.cli import queue_ops
from relay.cli.queue_request import QueueRequest
from relay.cli.queue_shape import shape_table
from relay.config.schema import Config
from relay.core.message.addresses import fold_ascii
from relay.core.values import EntryMeta, State
from relay.delivery.budget import MailboxBudgets
from relay.delivery.mailboxes import mailbox_rows
from relay.graph.aadsts import remedy_for
from relay.graph.errors import remedy_for_code
from relay.store.files import FileStore
from relay.store.index import entry_mailbox
from relay.store.protocol import EntryNotFoundError, MailboxKey, Store

__all__ = ["QueueRequest", "age", "run_queue_command"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_LISTED: tuple[State, ...] = ("active", "queue", "hold", "quarantine", "dead")
_AADSTS_RE = re.compile(r"\bAADSTS\d+\b")


def run_queue_command(config: Config, request: QueueRequest, out: TextIO) -> int:
    if not config.delivery.spool_dir.is_dir():
        out.write(
            f"no spool at {config.delivery.spool_dir} "
            "(has the relay run in hybrid or queue mode?)\n"
        )
        return EXIT_FAILURE
    return asyncio.run(_run(config, request, out))


async def _run(config: Config, request: QueueRequest, out: TextIO) -> int:
    store = FileStore(config.delivery.spool_dir, reserve_bytes=0, threads=2)
    await store.open_for_operator()
    try:
        return await _command(config, store, request, out)
    finally:
        await store.close()


async def _command(config: Config, store: Store, request: QueueRequest, out: TextIO) -> int:
    action = request.action
    if action == "list":
        if request.json:
            return await _list_json(store, request, out)
        code = await _list(store, request, out)
        if not request.dead:
            await _mailboxes(config, store, out)
        return code
    if action == "shape":
        now = time.time()
        rows = [m for s in ("queue", "active", "hold") for m in await store.list(s)]
        out.write(shape_table(rows, now))
        return EXIT_OK
    if action == "purge":
        if not request.dead:
            out.write("purge needs --dead (only dead letters can be purged)\n")
            return EXIT_USAGE
        out.write(f"purged {await store.purge('dead')} dead message(s)\n")
        return EXIT_OK
    if action in ("pause", "resume"):
        return await queue_ops.pause_or_resume(config, store, action, request.target, out)
    if action != "show":
        return await queue_ops.operate(store, request, out)
    if request.target is None:
        out.write("queue show needs a queue id\n")
        return EXIT_USAGE
    found = await queue_ops.resolve(store, request.target, out)
    if isinstance(found, int):
        return found
    state, meta = found
    if request.eml is not None:
        return await _export(store, meta.queue_id, request.eml, out)
    _show(state, meta, out)
    return EXIT_OK


def _matches(meta: EntryMeta, request: QueueRequest, now: float) -> bool:
    """The list filters, combined: ASCII case-insensitive addresses, as the relay compares."""
    if request.mailbox is not None and fold_ascii(meta.mailbox) != fold_ascii(request.mailbox):
        return False
    if request.sender is not None and fold_ascii(meta.mail_from) != fold_ascii(request.sender):
        return False
    return request.older_than is None or now - meta.created >= request.older_than


async def _rows(store: Store, request: QueueRequest, now: float) -> list[tuple[State, EntryMeta]]:
    states: tuple[State, ...] = ("dead",) if request.dead else _LISTED
    rows = [(s, m) for s in states for m in await store.list(s) if _matches(m, request, now)]
    return sorted(rows, key=lambda row: (row[1].created, row[1].queue_id))


async def _list(store: Store, request: QueueRequest, out: TextIO) -> int:
    now = time.time()
    rows = await _rows(store, request, now)
    stats = await store.stats(now)
    out.write(
        f"{stats.queued} queued, {stats.active} in delivery, {stats.dead} dead, "
        f"{stats.quarantined} quarantined, {stats.corrupt} corrupt"
        + (f", {stats.held} held" if stats.held else "")
        + (f"; oldest {age(now - stats.oldest_created)}" if stats.oldest_created else "")
        + "\n"
    )
    paused = await store.paused_mailboxes()
    if paused:
        names = ", ".join(f"{box} ({auth})" for auth, box in sorted(paused))
        out.write(f"delivery paused for: {names} (queue resume MAILBOX)\n")
    if not rows:
        return EXIT_OK
    out.write(
        f"{'QUEUE ID':<18}{'STATE':<12}{'AGE':>7} {'TRIES':>5}  {'NEXT':<8} SENDER -> RCPTS\n"
    )
    for state, meta in rows:
        nxt = age(meta.next_attempt - now) if meta.next_attempt > now and state == "queue" else "-"
        mark = " [mailbox paused]" if entry_mailbox(meta) in paused else ""
        out.write(
            f"{meta.queue_id:<18}{state:<12}{age(now - meta.created):>7} {meta.attempts:>5}  "
            f"{nxt:<8} <{meta.mail_from}> -> {len(meta.recipients)}{mark}\n"
        )
        reason = meta.dead_reason or meta.last_error
        if reason:
            out.write(f"{'':<18}{reason}\n")
    return EXIT_OK


async def _list_json(store: Store, request: QueueRequest, out: TextIO) -> int:
    """A JSON array, one object per entry, for scripts (`jq`)."""
    now = time.time()
    paused = await store.paused_mailboxes()
    items = [_as_json(state, meta, now, paused) for state, meta in await _rows(store, request, now)]
    out.write(json.dumps(items, indent=2) + "\n")
    return EXIT_OK


def _as_json(state: State, meta: EntryMeta, now: float, paused: frozenset[MailboxKey]) -> Any:
    return {
        "queue_id": meta.queue_id,
        "state": state,
        "created": meta.created,
        "age_seconds": round(max(0.0, now - meta.created), 3),
        "next_attempt": meta.next_attempt,
        "next_in_seconds": round(max(0.0, meta.next_attempt - now), 3),
        "attempts": meta.attempts,
        "last_error": meta.last_error,
        "dead_reason": meta.dead_reason,
        "sender": meta.mail_from,
        "recipients": list(meta.recipients),
        "auth_object": meta.auth_object,
        "mailbox": meta.mailbox,
        "mailbox_paused": entry_mailbox(meta) in paused,
        "route": meta.route,
        "message_id": meta.message_id,
        "size": meta.size,
        "client": meta.client,
    }


async def _mailboxes(config: Config, store: Store, out: TextIO) -> None:
    """Per sending mailbox: each budget used / limit (from the store's send ledger: what the
    running relay sent), the messages waiting and when its line is expected to drain."""
    budgets = MailboxBudgets(config=lambda: config, store=store)
    await budgets.load()
    now = time.time()
    rows = await mailbox_rows(budgets, store, now)
    if not rows:
        return
    paused = await store.paused_mailboxes()
    out.write(f"\n{'MAILBOX':<34}{'MSG/MIN':>10}{'RCPTS/DAY':>14}{'WAITING':>9}  DRAINS IN\n")
    for row in rows:
        messages = f"{row.used['messages_per_minute']}/{row.limits['messages_per_minute']}"
        recipients = f"{row.used['recipients_per_day']}/{row.limits['recipients_per_day']}"
        drains = age(row.drain_eta) if row.waiting else "-"
        if (row.auth_object, fold_ascii(row.mailbox)) in paused:
            drains = "paused"
        out.write(f"{row.mailbox:<34}{messages:>10}{recipients:>14}{row.waiting:>9}  {drains}\n")


async def _export(store: Store, queue_id: str, target: str, out: TextIO) -> int:
    """The message bytes exactly as stored (checked against their SHA-256) to a file or stdout."""
    try:
        data = await store.read_message(queue_id)
    except EntryNotFoundError as exc:  # its bytes did not match their SHA-256: set aside
        out.write(f"{queue_id}: cannot export it: {exc}\n")
        return EXIT_FAILURE
    if target != "-":
        await asyncio.to_thread(Path(target).write_bytes, data)
        out.write(f"{queue_id}: {len(data)} bytes written to {target}\n")
        return EXIT_OK
    binary = getattr(out, "buffer", None)
    if binary is None:  # a text stream without bytes underneath (tests' StringIO)
        out.write(data.decode("utf-8", "surrogateescape"))
    else:
        out.flush()
        binary.write(data)
        binary.flush()
    return EXIT_OK


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
        error, remedy = error_and_remedy(meta.last_error)
        out.write(f"last error:   {error}\n")
        if remedy:
            out.write(f"remedy:       {remedy}\n")
    if meta.dead_reason and meta.dead_reason != meta.last_error:
        out.write(f"dead reason:  {meta.dead_reason}\n")
    if state == "hold":
        out.write("on hold: never delivered until `queue release` (or deleted)\n")
    if meta.is_bounce:
        out.write("this is a bounce (DSN) the relay generated\n")


def error_and_remedy(last_error: str) -> tuple[str, str]:
    """`last_error` is the SMTP reply with Graph's or Entra's code appended (the reply usually
    names it already): the text with the code once, and the remedy its AADSTS or Graph code
    has."""
    text = last_error.strip()
    head, _, tail = text.rpartition(" ")
    if head and tail and tail in head:
        text = head
    code = _AADSTS_RE.search(text)
    return text, remedy_for(code.group(0)) if code else remedy_for_code(text)


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
