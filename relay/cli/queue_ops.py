"""`queue hold|release|retry|delete|pause|resume`: the commands that change the spool.

Why this module exists: these are `postsuper -h/-H/-d` and `postqueue -f` for this relay, and
each must be safe beside a running relay and hard to misuse: an entry being delivered right now
is never held or deleted (the store refuses, and we say why), `delete ALL` needs the word in
capitals as postsuper does, and ids are matched without case, since an operator copies them from
a log line, a ticket or a phone call. Reading commands live in `relay.cli.queue`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TextIO

from relay.cli.queue_request import QueueRequest
from relay.config.schema import Config
from relay.core.message.addresses import fold_ascii
from relay.core.values import EntryMeta, State, check_queue_id
from relay.store.protocol import MailboxKey, Store, mailbox_key

__all__ = ["operate", "pause_or_resume", "resolve"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_ALL_STATES: tuple[State, ...] = ("queue", "active", "hold", "dead", "quarantine")
# What `delete ALL` empties: everything but active (being delivered) entries.
_DELETABLE: tuple[State, ...] = ("queue", "hold", "dead", "quarantine", "corrupt")


async def resolve(store: Store, raw: str, out: TextIO) -> tuple[State, EntryMeta] | int:
    """The entry `raw` names, without case (ids are generated in upper-case hex), or the exit
    code after saying why there is none."""
    try:
        check_queue_id(raw)
    except ValueError:
        out.write(f"{raw!r} is not a queue id\n")
        return EXIT_USAGE
    for candidate in dict.fromkeys((raw, raw.upper())):
        if (found := await store.find(candidate)) is not None:
            return found
    folded = raw.casefold()
    for state in _ALL_STATES:
        for meta in await store.list(state):
            if meta.queue_id.casefold() == folded:
                return state, meta
    out.write(f"{raw}: not in the spool\n")
    return EXIT_FAILURE


async def operate(store: Store, request: QueueRequest, out: TextIO) -> int:
    """hold, release, retry, delete: one id, or the many that --all / --mailbox / ALL name."""
    action, target = request.action, request.target
    if action == "delete" and target is not None and target.casefold() == "all":
        if target != "ALL":
            out.write("to delete every message, type ALL in capitals (as postsuper -d ALL)\n")
            return EXIT_USAGE
        return await _delete_all(store, out)
    many = request.all or (action == "retry" and request.mailbox is not None)
    if many and target is not None:
        out.write(f"queue {action}: give a queue id or --all, not both\n")
        return EXIT_USAGE
    if many:
        return await _many(store, request, out)
    if target is None:
        hints = {"delete": "ID or ALL", "retry": "ID, --mailbox M or --all"}
        hint = hints.get(action, "ID or --all")
        out.write(f"queue {action} needs {hint}\n")
        return EXIT_USAGE
    found = await resolve(store, target, out)
    if isinstance(found, int):
        return found
    state, meta = found
    return await _one(store, action, state, meta.queue_id, out)


async def _one(store: Store, action: str, state: State, queue_id: str, out: TextIO) -> int:
    if state == "active" and action != "retry":
        out.write(
            f"{queue_id}: cannot {action} it: it is being delivered right now; "
            "wait for this attempt to end, then try again\n"
        )
        return EXIT_FAILURE
    if action == "hold":
        if await store.hold(queue_id):
            out.write(f"{queue_id}: on hold; it is not delivered until `queue release`\n")
            return EXIT_OK
        out.write(f"{queue_id}: cannot hold it while it is {state} (only queued messages)\n")
        return EXIT_FAILURE
    if action == "release":
        if await store.unhold(queue_id):
            out.write(f"{queue_id}: released; back in the queue\n")
            return EXIT_OK
        out.write(f"{queue_id}: not on hold (it is {state})\n")
        return EXIT_FAILURE
    if action == "retry":
        if await store.retry(queue_id):
            out.write(f"{queue_id}: queued for immediate delivery (was {state})\n")
            return EXIT_OK
        why = ": release it first (queue release)" if state == "hold" else ""
        out.write(f"{queue_id}: cannot retry while it is {state}{why}\n")
        return EXIT_FAILURE
    if await store.delete(queue_id):
        out.write(f"{queue_id}: deleted (was {state})\n")
        return EXIT_OK
    out.write(f"{queue_id}: cannot delete while it is {state} (being delivered right now)\n")
    return EXIT_FAILURE


async def _many(store: Store, request: QueueRequest, out: TextIO) -> int:
    """--all (and retry --mailbox): each entry the action applies to, one store move each."""
    moves: dict[str, tuple[State, Callable[[str], Awaitable[bool]], str]] = {
        "hold": ("queue", store.hold, "put on hold"),
        "release": ("hold", store.unhold, "released"),
        "retry": ("queue", store.retry, "queued for immediate delivery"),
        "delete": ("queue", store.delete, "deleted"),
    }
    if request.action == "delete":
        out.write("queue delete takes an id or ALL (in capitals), not --all\n")
        return EXIT_USAGE
    state, move, done = moves[request.action]
    folded = fold_ascii(request.mailbox) if request.mailbox is not None else None
    count = 0
    for meta in await store.list(state):
        if folded is None or fold_ascii(meta.mailbox) == folded:
            count += await move(meta.queue_id)  # False: a worker claimed it meanwhile
    out.write(f"{count} message(s) {done}\n")
    return EXIT_OK


async def _delete_all(store: Store, out: TextIO) -> int:
    deleted = sum([await store.purge(state) for state in _DELETABLE])
    active = (await store.stats(0.0)).active
    left = f"; {active} being delivered right now were left alone" if active else ""
    out.write(f"deleted {deleted} message(s){left}\n")
    return EXIT_OK


async def pause_or_resume(
    config: Config, store: Store, action: str, mailbox: str | None, out: TextIO
) -> int:
    """Pause or resume a mailbox for every auth object (the address is what the operator
    knows); a resume also lifts a pause made under an auth object since removed."""
    if mailbox is None or "@" not in mailbox:
        out.write(f"queue {action} needs a mailbox address (e.g. scanner@contoso.com)\n")
        return EXIT_USAGE
    keys: set[MailboxKey] = {mailbox_key(name, mailbox) for name in config.auth_objects}
    if action == "pause":
        for key in sorted(keys):
            await store.pause_mailbox(key)
        out.write(
            f"{mailbox}: delivery paused (the relay stops within one rescan); "
            "its mail stays queued until `queue resume`\n"
        )
        return EXIT_OK
    keys |= {key for key in await store.paused_mailboxes() if key[1] == fold_ascii(mailbox)}
    for key in sorted(keys):
        await store.resume_mailbox(key)
    out.write(f"{mailbox}: delivery resumed\n")
    return EXIT_OK
