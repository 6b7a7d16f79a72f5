"""The `Store` protocol: everything the delivery engine and the operator tools may ask of a queue.

Why this module exists: the delivery engine (`relay.delivery`) must work the same on the embedded
file spool (`relay.store.files`) and on a queue shared by several relays (PostgreSQL, DESIGN §6).
So it talks to this protocol and to nothing beyond it, and every implementation passes one
contract test suite (`tests/store/contract.py`). A new backend plugs in without touching
`relay.delivery`.

Theory of operation
-------------------
An entry (`relay.core.values.EntryMeta`) is in exactly one state at every instant:

    queue       waiting; due when next_attempt <= now (0 = now)
    active      claimed by one attempt of one relay; nobody else may claim it
    dead        given up (permanent failure, expired): kept for the operator with its reason
    quarantine  its handling crashed the relay CRASH_LIMIT times: kept for the operator
    corrupt     unreadable or mismatching (size, SHA-256): set aside, never delivered
    hold        put on hold by the operator (`postsuper -h`): never due until released

The moves, each atomic and durable before the call returns:

    put(claimed=False)   -> queue      the commit point: a 250 may follow it, never precede it
    put(claimed=True)    -> active     hybrid mode's inline attempt owns it from the start
    claim                queue -> active, only if still queued (a lost race returns None)
    complete             active -> gone (delivered)
    defer                active -> queue, with the new attempts / next_attempt / last_error
    bury                 active -> dead, with the reason
    quarantine           active -> quarantine, with the reason
    release              active -> queue unchanged (shutdown interrupted the attempt; no crash)
    discard              any -> gone (hybrid: the waiting client was told the 5xx itself)
    retry (operator)     dead | quarantine | queue -> queue, due now
    delete (operator)    any but active -> gone
    hold (operator)      queue -> hold, only if still queued (an active entry is refused)
    unhold (operator)    hold -> queue unchanged (due when its next_attempt says)
    recover (at start)   active entries left by a dead process -> queue with crashes+1, or
                         quarantine once crashes reaches CRASH_LIMIT

Errors: a store that cannot take or record something raises `StoreUnavailableError` (the SMTP
layer answers 451 4.3.0, the engine keeps an unrecorded outcome and retries it); an operation on
an entry that is not where it needs to be raises `EntryNotFoundError`. Nothing else escapes.

Beside the entries, a store keeps the send ledger (`relay.core.budgets.SendRecord`): what each
mailbox sent over the last 24 hours, so that Exchange Online's rolling budgets survive a restart.
`record_sends` appends, `sends_since` reads back; records older than the ledger span may be
forgotten.

Beside them, the paused mailboxes (`queue pause`): a durable set of `MailboxKey` the workers
leave out of `due`, read again at every `refresh`, so a pause made by the CLI in another process
takes effect within one rescan.

Beside both, a store keeps the delivery history (`relay.core.history.HistoryRecord`): each
message's final outcome. `record_history` appends, `history` answers a `HistoryQuery` newest
first, `prune_history` forgets what settled before a time (the relay calls it with now minus
`history.retention`); each store also bounds how many records it keeps, whatever their age.
A direct-mode relay has no queue but keeps a history, so these three are their own protocol,
`HistoryLog`, which every `Store` includes.

`due` is a hint, not a claim: it lists candidates in order; the caller claims each one it can
start, and a concurrent claimer (another worker, another relay, the CLI) simply wins the race.
`refresh` picks up what other processes changed (the file store rescans its directories, a
database store has nothing to do); `stats` must be cheap enough for every /metrics scrape.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.core.budgets import SendRecord
from relay.core.errors import RelayError
from relay.core.history import HistoryQuery, HistoryRecord
from relay.core.message.addresses import fold_ascii
from relay.core.values import EntryMeta, State

__all__ = [
    "EntryNotFoundError",
    "HistoryLog",
    "MailboxKey",
    "RecoveryReport",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailableError",
    "crash_reason",
    "mailbox_key",
]

# (auth object name, mailbox with ASCII letters lowered): the unit Graph counts concurrency and
# budgets in. Built only by `mailbox_key`, so every store and the delivery slots agree.
MailboxKey = tuple[str, str]


def mailbox_key(auth_object: str, mailbox: str) -> MailboxKey:
    """The mailbox compared as Exchange compares addresses: A-Z without case, nothing else folded
    (`straße@` and `strasse@` are two mailboxes, with two budgets)."""
    return (auth_object, fold_ascii(mailbox))


def crash_reason(crashes: int) -> str:
    """The dead_reason `recover` gives an entry it quarantines (the operator reads it)."""
    return f"the relay died {crashes} times while handling it"


class StoreError(RelayError):
    """The store could not do what was asked."""


class StoreUnavailableError(StoreError):
    """The store cannot take or record anything now (read-only, full, I/O error, database down):
    answer 451 4.3.0 to a client, keep an outcome and try to record it again."""


class EntryNotFoundError(StoreError):
    """The entry is not where the operation needs it (e.g. not active)."""


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What `recover` found at start."""

    requeued: int
    quarantined: int
    corrupt: int
    orphans_removed: int
    temp_removed: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts per state, kept up to date incrementally (never a scan per call)."""

    queued: int
    active: int
    dead: int
    quarantined: int
    corrupt: int
    oldest_created: float | None  # oldest undelivered entry (queue and active)
    due: int = 0  # queued entries with next_attempt <= now
    held: int = 0  # entries the operator put on hold


class HistoryLog(Protocol):
    """The delivery history's part of a store (module docstring)."""

    async def record_history(self, records: Sequence[HistoryRecord]) -> None:
        """Append final outcomes. Raises StoreUnavailableError."""
        ...

    async def history(self, query: HistoryQuery) -> Sequence[HistoryRecord]:
        """The records `query` matches, newest first, at most `query.limit`."""
        ...

    async def prune_history(self, before: float) -> int:
        """Forget the records settled before `before`; how many. Raises StoreUnavailableError."""
        ...


class Store(HistoryLog, Protocol):
    """A durable queue of messages; see the module docstring for the states and moves."""

    async def recover(self) -> RecoveryReport:
        """Open the store for this relay and recover what a dead process left. Once, at start,
        before any listener accepts mail."""
        ...

    async def close(self) -> None:
        """Release what `recover` took (locks, connections)."""
        ...

    async def put(self, entry: EntryMeta, message: bytes, *, claimed: bool = False) -> None:
        """Store a new message durably (the commit point). Raises StoreUnavailableError.

        The store records the size and SHA-256 of `message`, whatever `entry` states
        (`relay.store.integrity.sealed`). A queue id already stored is a caller's bug:
        ValueError."""
        ...

    async def due(
        self, now: float, limit: int, exclude: Collection[MailboxKey] = ()
    ) -> Sequence[EntryMeta]:
        """Up to `limit` queued entries with next_attempt <= now, earliest first, leaving out
        the mailboxes in `exclude` (busy or paused). A hint: claim each before using it."""
        ...

    async def next_due(self) -> float | None:
        """The earliest next_attempt of any queued entry, None when nothing is queued."""
        ...

    async def claim(self, queue_id: str) -> EntryMeta | None:
        """queue -> active; None when it is no longer queued (claimed, deleted, set aside)."""
        ...

    async def read_message(self, queue_id: str) -> bytes:
        """The message as stored; a mismatch with its recorded size or SHA-256 sets the entry
        aside as corrupt and raises EntryNotFoundError."""
        ...

    async def complete(self, queue_id: str) -> None:
        """Delivered: active -> gone."""
        ...

    async def defer(self, entry: EntryMeta) -> None:
        """active -> queue with `entry`'s attempts, next_attempt, last_error and crashes."""
        ...

    async def bury(self, entry: EntryMeta, reason: str) -> None:
        """active -> dead with `reason`; the message stays for the operator."""
        ...

    async def quarantine(self, entry: EntryMeta, reason: str) -> None:
        """active -> quarantine with `reason`; the message stays for the operator."""
        ...

    async def release(self, queue_id: str) -> None:
        """active -> queue unchanged: shutdown interrupted the attempt, not counted as a crash."""
        ...

    async def discard(self, queue_id: str) -> None:
        """Remove the entry in any state; no-op when it is gone."""
        ...

    async def refresh(self) -> None:
        """Take in what other processes (the queue CLI, other relays) changed."""
        ...

    async def stats(self, now: float) -> StoreStats:
        """Counts per state; cheap (no scan)."""
        ...

    async def waiting(self) -> Mapping[MailboxKey, Sequence[int]]:
        """Per mailbox, the recipient counts of its queued entries in due order (what the
        budgets' drain estimate needs); from the index, no scan of the durable records."""
        ...

    # --- the send ledger ---------------------------------------------------------------------

    async def record_sends(self, records: Sequence[SendRecord]) -> None:
        """Append finished sends to the ledger. Raises StoreUnavailableError."""
        ...

    async def sends_since(self, since: float) -> Sequence[SendRecord]:
        """The ledger's sends at or after `since`, oldest first."""
        ...

    # --- operator commands (the `queue` CLI), safe while relays run --------------------------

    async def list(self, state: State) -> Sequence[EntryMeta]:
        """Every entry in `state`, oldest first; ValueError for "corrupt" (no readable
        metadata: `stats().corrupt` counts them, `delete`/`purge` remove them)."""
        ...

    async def find(self, queue_id: str) -> tuple[State, EntryMeta] | None:
        """Where the entry is, and its envelope; None when absent or corrupt."""
        ...

    async def retry(self, queue_id: str) -> bool:
        """dead | quarantine | queue -> queue, due now; False when absent or active."""
        ...

    async def delete(self, queue_id: str) -> bool:
        """Remove the entry from any state but active; False when there is none."""
        ...

    async def purge(self, state: State) -> int:
        """Delete every entry in `state` (never active); the number deleted."""
        ...

    # --- hold and pause (the `queue hold|release|pause|resume` CLI), safe while relays run ------

    async def hold(self, queue_id: str) -> bool:
        """queue -> hold; False when it is not queued (absent, active, dead, already held)."""
        ...

    async def unhold(self, queue_id: str) -> bool:
        """hold -> queue unchanged; False when it is not held."""
        ...

    async def paused_mailboxes(self) -> frozenset[MailboxKey]:
        """The mailboxes whose delivery the operator paused (as of the last `refresh`)."""
        ...

    async def pause_mailbox(self, key: MailboxKey) -> None:
        """Add `key` to the paused set, durably. Raises StoreUnavailableError."""
        ...

    async def resume_mailbox(self, key: MailboxKey) -> None:
        """Remove `key` from the paused set, durably; no-op when it is not paused."""
        ...
