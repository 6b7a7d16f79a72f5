"""The contract every `Store` passes (relay/store/protocol.py): states, moves, errors, stats.

A backend opts in with a subclass that provides three things:

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def store(self, ...) -> AsyncIterator[Store]: ...   # recovered, empty, closed after
        async def restart(self, store) -> Store: ...              # kill -9 and a new process:
                                                                  #   the records survive, not yet
                                                                  #   recovered
        def damage(self, store, queue_id, message) -> None: ...   # the stored bytes change behind
                                                                  #   the store's back

Every test states one rule of the protocol's docstring. Times are explicit (`NOW`), never read
from a clock.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

import pytest

from relay.core.budgets import SendRecord
from relay.core.history import HistoryQuery, HistoryRecord
from relay.core.limits import CRASH_LIMIT
from relay.core.values import EntryMeta, State
from relay.store.integrity import digest
from relay.store.protocol import EntryNotFoundError, Store, StoreStats, crash_reason, mailbox_key

NOW = 1_700_000_000.0
MESSAGE = b"From: scanner@contoso.com\r\nSubject: scan\r\n\r\nbody\r\n"


def entry(queue_id: str = "Q1", **changes: Any) -> EntryMeta:
    """A queued entry as the SMTP layer hands it to `put` (size and digest left to the store)."""
    base = EntryMeta(
        queue_id=queue_id,
        created=NOW,
        mail_from="scanner@contoso.com",
        recipients=("alice@contoso.com",),
        client="printers",
        client_ip="10.0.5.7",
        auth_object="contoso",
        mailbox="scanner@contoso.com",
        route="routes[0]",
        message_id=f"<{queue_id}@relay.example.com>",
        size=0,
    )
    return replace(base, **changes)


def counts(stats: StoreStats) -> tuple[int, int, int, int, int]:
    return (stats.queued, stats.active, stats.dead, stats.quarantined, stats.corrupt)


class StoreContract(ABC):
    """Subclass with the `store` fixture, `restart` and `damage` (module docstring)."""

    @abstractmethod
    async def restart(self, store: Store) -> Store:
        """The same records in a new, not yet recovered store (the old process died)."""

    @abstractmethod
    def damage(self, store: Store, queue_id: str, message: bytes) -> None:
        """Replace `queue_id`'s stored bytes without telling the store."""

    @abstractmethod
    async def bounded_history(self, store: Store) -> tuple[Store, int]:
        """A new, recovered, empty store (closed by the fixture) that keeps at most the number
        of history records returned with it."""

    async def claimed(self, store: Store, queue_id: str = "Q1", **changes: Any) -> EntryMeta:
        await store.put(entry(queue_id, **changes), MESSAGE)
        got = await store.claim(queue_id)
        assert got is not None
        return got

    async def in_state(self, store: Store, state: State, queue_id: str = "Q1") -> EntryMeta:
        """An entry moved into `state` the way the relay moves it there."""
        if state == "queue":
            await store.put(entry(queue_id), MESSAGE)
            found = await store.find(queue_id)
            assert found is not None
            return found[1]
        got = await self.claimed(store, queue_id)
        if state == "dead":
            await store.bury(got, "550 5.1.1 no such user")
        elif state == "quarantine":
            await store.quarantine(got, "prepare crashed")
        found = await store.find(queue_id)
        assert found is not None
        assert found[0] == state
        return found[1]

    # --- put ----------------------------------------------------------------------------------

    async def test_put_is_visible_to_find_due_and_claim(self, store: Store) -> None:
        await store.put(entry(), MESSAGE)
        assert await store.find("Q1") == (
            "queue",
            replace(entry(), size=len(MESSAGE), sha256=digest(MESSAGE)),
        )
        assert [e.queue_id for e in await store.due(NOW, 10)] == ["Q1"]
        got = await store.claim("Q1")
        assert got is not None
        assert got.queue_id == "Q1"

    async def test_put_records_size_and_sha256_of_the_message(self, store: Store) -> None:
        await store.put(entry(), MESSAGE)
        got = await store.claim("Q1")
        assert got is not None
        assert (got.size, got.sha256) == (len(MESSAGE), digest(MESSAGE))

    async def test_put_records_the_bytes_it_got_not_what_the_entry_says(self, store: Store) -> None:
        await store.put(entry(size=3, sha256=digest(b"other")), MESSAGE)
        found = await store.find("Q1")
        assert found is not None
        assert (found[1].size, found[1].sha256) == (len(MESSAGE), digest(MESSAGE))
        assert await store.read_message("Q1") == MESSAGE

    async def test_put_refuses_a_queue_id_already_stored(self, store: Store) -> None:
        await store.put(entry(), MESSAGE)
        with pytest.raises(ValueError, match="already"):
            await store.put(entry(), MESSAGE)

    async def test_put_claimed_starts_active_and_cannot_be_claimed(self, store: Store) -> None:
        await store.put(entry(), MESSAGE, claimed=True)
        found = await store.find("Q1")
        assert found is not None
        assert found[0] == "active"
        assert await store.claim("Q1") is None
        assert await store.due(NOW, 10) == []

    async def test_read_message_returns_the_bytes_put(self, store: Store) -> None:
        await store.put(entry(), MESSAGE)
        assert await store.read_message("Q1") == MESSAGE

    async def test_read_message_of_an_absent_entry_raises_not_found(self, store: Store) -> None:
        with pytest.raises(EntryNotFoundError):
            await store.read_message("NOPE")

    # --- integrity ----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "stored", [MESSAGE[:-7], MESSAGE.replace(b"body", b"bodY")], ids=["truncated", "flipped"]
    )
    async def test_a_damaged_message_is_set_aside_not_delivered(
        self, store: Store, stored: bytes
    ) -> None:
        await self.claimed(store)
        self.damage(store, "Q1", stored)
        with pytest.raises(EntryNotFoundError, match="corrupt"):
            await store.read_message("Q1")
        assert await store.find("Q1") is None
        assert counts(await store.stats(NOW)) == (0, 0, 0, 0, 1)
        with pytest.raises(EntryNotFoundError):
            await store.read_message("Q1")

    # --- claim --------------------------------------------------------------------------------

    async def test_claim_is_exclusive_between_two_concurrent_claimers(self, store: Store) -> None:
        await store.put(entry(), MESSAGE)
        first, second = await asyncio.gather(store.claim("Q1"), store.claim("Q1"))
        assert [got is not None for got in (first, second)].count(True) == 1

    async def test_claim_of_an_absent_entry_returns_none(self, store: Store) -> None:
        assert await store.claim("NOPE") is None

    @pytest.mark.parametrize("state", ["dead", "quarantine"])
    async def test_claim_leaves_entries_the_operator_holds(
        self, store: Store, state: State
    ) -> None:
        await self.in_state(store, state)
        assert await store.claim("Q1") is None
        found = await store.find("Q1")
        assert found is not None
        assert found[0] == state

    async def test_claim_rejects_a_queue_id_unsafe_as_a_file_name(self, store: Store) -> None:
        with pytest.raises(ValueError, match="invalid queue id"):
            await store.claim("../etc/passwd")

    # --- due / next_due -----------------------------------------------------------------------

    async def test_due_lists_earliest_next_attempt_first_then_oldest(self, store: Store) -> None:
        await store.put(entry("LATE", next_attempt=NOW - 1), MESSAGE)
        await store.put(entry("NEWER", created=NOW + 5), MESSAGE)
        await store.put(entry("OLDER", created=NOW - 5), MESSAGE)
        await store.put(entry("FUTURE", next_attempt=NOW + 60), MESSAGE)
        assert [e.queue_id for e in await store.due(NOW, 10)] == ["OLDER", "NEWER", "LATE"]

    async def test_due_stops_at_limit(self, store: Store) -> None:
        for n in range(5):
            await store.put(entry(f"Q{n}", created=NOW + n), MESSAGE)
        assert [e.queue_id for e in await store.due(NOW, 2)] == ["Q0", "Q1"]

    async def test_due_leaves_out_excluded_mailboxes_without_ascii_case(self, store: Store) -> None:
        await store.put(entry("BUSY", mailbox="Scanner@Contoso.com"), MESSAGE)
        await store.put(entry("OTHER", created=NOW + 1, mailbox="desk@contoso.com"), MESSAGE)
        await store.put(entry("SAME", created=NOW + 2, auth_object="fabrikam"), MESSAGE)
        due = await store.due(NOW, 10, exclude={("contoso", "scanner@contoso.com")})
        assert [e.queue_id for e in due] == ["OTHER", "SAME"]

    async def test_due_keeps_a_unicode_look_alike_mailbox_apart(self, store: Store) -> None:
        """Excluding strasse@ leaves straße@ due: Exchange folds ASCII letters only, so these are
        two mailboxes with their own concurrency and budgets."""
        await store.put(entry("Q1", mailbox="x@straße.de"), b"m1")
        await store.put(entry("Q2", mailbox="x@strasse.de"), b"m2")
        due = await store.due(NOW, 10, exclude={mailbox_key("contoso", "X@Strasse.de")})
        assert [e.queue_id for e in due] == ["Q1"]

    async def test_due_limit_counts_only_entries_not_excluded(self, store: Store) -> None:
        await store.put(entry("BUSY1"), MESSAGE)
        await store.put(entry("BUSY2", created=NOW + 1), MESSAGE)
        await store.put(entry("FREE", created=NOW + 2, mailbox="desk@contoso.com"), MESSAGE)
        due = await store.due(NOW, 1, exclude={("contoso", "scanner@contoso.com")})
        assert [e.queue_id for e in due] == ["FREE"]

    async def test_next_due_is_the_earliest_queued_next_attempt(self, store: Store) -> None:
        assert await store.next_due() is None
        await store.put(entry("A", next_attempt=NOW + 60), MESSAGE)
        await store.put(entry("B", next_attempt=NOW + 30), MESSAGE)
        assert await store.next_due() == NOW + 30
        await store.claim("B")
        assert await store.next_due() == NOW + 60

    # --- the relay's moves --------------------------------------------------------------------

    async def test_complete_removes_the_entry(self, store: Store) -> None:
        await self.claimed(store)
        await store.complete("Q1")
        assert await store.find("Q1") is None
        with pytest.raises(EntryNotFoundError):
            await store.read_message("Q1")

    async def test_defer_requeues_with_the_new_attempt_fields(self, store: Store) -> None:
        got = await self.claimed(store)
        later = replace(got, attempts=1, next_attempt=NOW + 60, last_error="451 busy")
        await store.defer(later)
        assert await store.find("Q1") == ("queue", later)
        assert await store.due(NOW, 10) == []
        assert [e.queue_id for e in await store.due(NOW + 60, 10)] == ["Q1"]
        assert await store.next_due() == NOW + 60

    async def test_defer_keeps_the_stored_size_and_digest(self, store: Store) -> None:
        got = await self.claimed(store)
        await store.defer(replace(got, size=0, sha256="", attempts=1))
        assert await store.read_message("Q1") == MESSAGE

    async def test_bury_keeps_the_message_with_its_reason(self, store: Store) -> None:
        got = await self.claimed(store)
        await store.bury(got, "550 5.1.1 no such user")
        found = await store.find("Q1")
        assert found is not None
        assert (found[0], found[1].dead_reason) == ("dead", "550 5.1.1 no such user")
        assert await store.read_message("Q1") == MESSAGE

    async def test_quarantine_keeps_the_message_with_its_reason(self, store: Store) -> None:
        got = await self.claimed(store)
        await store.quarantine(got, "prepare crashed")
        found = await store.find("Q1")
        assert found is not None
        assert (found[0], found[1].dead_reason) == ("quarantine", "prepare crashed")
        assert await store.read_message("Q1") == MESSAGE

    async def test_release_requeues_unchanged_and_due_again(self, store: Store) -> None:
        got = await self.claimed(store)
        await store.release("Q1")
        assert await store.find("Q1") == ("queue", got)
        assert [e.queue_id for e in await store.due(NOW, 10)] == ["Q1"]

    @pytest.mark.parametrize("state", ["queue", "active", "dead", "quarantine"])
    async def test_discard_removes_the_entry_in_any_state(self, store: Store, state: State) -> None:
        await self.in_state(store, state)
        await store.discard("Q1")
        assert await store.find("Q1") is None
        assert counts(await store.stats(NOW)) == (0, 0, 0, 0, 0)

    async def test_discard_of_an_absent_entry_is_a_no_op(self, store: Store) -> None:
        await store.discard("NOPE")

    @pytest.mark.parametrize("move", ["complete", "defer", "bury", "quarantine", "release"])
    @pytest.mark.parametrize("state", ["queue", "dead", "quarantine", None])
    async def test_moves_out_of_active_need_an_active_entry(
        self, store: Store, move: str, state: State | None
    ) -> None:
        meta = await self.in_state(store, state) if state else entry()
        calls = {
            "complete": lambda: store.complete("Q1"),
            "defer": lambda: store.defer(replace(meta, attempts=1)),
            "bury": lambda: store.bury(meta, "why"),
            "quarantine": lambda: store.quarantine(meta, "why"),
            "release": lambda: store.release("Q1"),
        }
        with pytest.raises(EntryNotFoundError):
            await calls[move]()
        assert await store.find("Q1") == ((state, meta) if state else None)

    # --- stats --------------------------------------------------------------------------------

    async def test_stats_follow_every_move(self, store: Store) -> None:
        assert counts(await store.stats(NOW)) == (0, 0, 0, 0, 0)
        for n in range(4):
            await store.put(entry(f"Q{n}"), MESSAGE)
        assert counts(await store.stats(NOW)) == (4, 0, 0, 0, 0)
        got = [await self.claimed_existing(store, f"Q{n}") for n in range(4)]
        assert counts(await store.stats(NOW)) == (0, 4, 0, 0, 0)
        await store.complete("Q0")
        await store.defer(replace(got[1], next_attempt=NOW + 60))
        await store.bury(got[2], "gone")
        await store.quarantine(got[3], "crash")
        assert counts(await store.stats(NOW)) == (1, 0, 1, 1, 0)
        await store.retry("Q2")
        assert counts(await store.stats(NOW)) == (2, 0, 0, 1, 0)
        await store.delete("Q3")
        assert counts(await store.stats(NOW)) == (2, 0, 0, 0, 0)

    async def claimed_existing(self, store: Store, queue_id: str) -> EntryMeta:
        got = await store.claim(queue_id)
        assert got is not None
        return got

    async def test_stats_count_due_entries_at_now(self, store: Store) -> None:
        await store.put(entry("A"), MESSAGE)
        await store.put(entry("B", next_attempt=NOW), MESSAGE)
        await store.put(entry("C", next_attempt=NOW + 60), MESSAGE)
        assert (await store.stats(NOW)).due == 2
        assert (await store.stats(NOW + 60)).due == 3
        assert (await store.stats(NOW - 1)).due == 1

    async def test_stats_oldest_created_is_over_queued_and_active(self, store: Store) -> None:
        assert (await store.stats(NOW)).oldest_created is None
        await self.claimed(store, "OLD", created=NOW - 100)
        await store.put(entry("NEW", created=NOW), MESSAGE)
        got = await self.claimed(store, "DEAD", created=NOW - 500)
        await store.bury(got, "gone")
        assert (await store.stats(NOW)).oldest_created == NOW - 100
        await store.complete("OLD")
        assert (await store.stats(NOW)).oldest_created == NOW

    # --- recover ------------------------------------------------------------------------------

    async def test_recover_requeues_active_entries_with_one_more_crash(self, store: Store) -> None:
        await self.claimed(store, "HELD")
        await store.put(entry("INLINE"), MESSAGE, claimed=True)
        await store.put(entry("WAITING"), MESSAGE)
        again = await self.restart(store)
        report = await again.recover()
        assert (report.requeued, report.quarantined) == (2, 0)
        for qid, crashes in (("HELD", 1), ("INLINE", 1), ("WAITING", 0)):
            found = await again.find(qid)
            assert found is not None
            assert (found[0], found[1].crashes) == ("queue", crashes)
        assert counts(await again.stats(NOW)) == (3, 0, 0, 0, 0)
        assert await again.read_message("HELD") == MESSAGE

    async def test_recover_quarantines_at_the_crash_limit(self, store: Store) -> None:
        await self.claimed(store, crashes=CRASH_LIMIT - 1)
        again = await self.restart(store)
        report = await again.recover()
        assert (report.requeued, report.quarantined) == (0, 1)
        found = await again.find("Q1")
        assert found is not None
        assert (found[0], found[1].crashes) == ("quarantine", CRASH_LIMIT)
        assert found[1].dead_reason == crash_reason(CRASH_LIMIT)
        assert counts(await again.stats(NOW)) == (0, 0, 0, 1, 0)

    async def test_recover_keeps_dead_and_quarantined_entries_as_they_are(
        self, store: Store
    ) -> None:
        dead = await self.in_state(store, "dead", "D")
        held = await self.in_state(store, "quarantine", "H")
        again = await self.restart(store)
        await again.recover()
        assert await again.find("D") == ("dead", dead)
        assert await again.find("H") == ("quarantine", held)

    async def test_relay_operations_need_recover_first(self, store: Store) -> None:
        await store.put(entry(), MESSAGE)
        again = await self.restart(store)
        with pytest.raises(RuntimeError, match="recover"):
            await again.claim("Q1")
        with pytest.raises(RuntimeError, match="recover"):
            await again.put(entry("Q2"), MESSAGE)

    # --- operator commands --------------------------------------------------------------------

    async def test_list_is_oldest_first_per_state(self, store: Store) -> None:
        await store.put(entry("NEW", created=NOW + 1), MESSAGE)
        await store.put(entry("OLD", created=NOW - 1), MESSAGE)
        await self.claimed(store, "BUSY")
        assert [e.queue_id for e in await store.list("queue")] == ["OLD", "NEW"]
        assert [e.queue_id for e in await store.list("active")] == ["BUSY"]
        assert await store.list("dead") == []

    @pytest.mark.parametrize("state", ["dead", "quarantine", "queue"])
    async def test_retry_requeues_due_now_with_the_reason_cleared(
        self, store: Store, state: State
    ) -> None:
        await self.in_state(store, state)
        if state == "queue":
            got = await self.claimed_existing(store, "Q1")
            await store.defer(replace(got, attempts=2, next_attempt=NOW + 3600))
        assert await store.retry("Q1") is True
        found = await store.find("Q1")
        assert found is not None
        assert (found[0], found[1].next_attempt, found[1].dead_reason) == ("queue", 0.0, "")
        assert [e.queue_id for e in await store.due(NOW, 10)] == ["Q1"]

    async def test_retry_from_quarantine_resets_the_crash_count(self, store: Store) -> None:
        got = await self.claimed(store, crashes=2)
        await store.quarantine(got, "crash")
        await store.retry("Q1")
        found = await store.find("Q1")
        assert found is not None
        assert found[1].crashes == 0

    async def test_retry_of_dead_keeps_the_attempt_count(self, store: Store) -> None:
        got = await self.claimed(store)
        await store.bury(replace(got, attempts=7), "expired")
        await store.retry("Q1")
        found = await store.find("Q1")
        assert found is not None
        assert found[1].attempts == 7

    @pytest.mark.parametrize("state", ["active", None])
    async def test_retry_refuses_active_or_absent(self, store: Store, state: State | None) -> None:
        if state:
            await self.in_state(store, state)
        assert await store.retry("Q1") is False

    @pytest.mark.parametrize("state", ["queue", "dead", "quarantine"])
    async def test_delete_removes_an_entry_not_active(self, store: Store, state: State) -> None:
        await self.in_state(store, state)
        assert await store.delete("Q1") is True
        assert await store.find("Q1") is None
        assert await store.claim("Q1") is None
        with pytest.raises(EntryNotFoundError):
            await store.read_message("Q1")

    async def test_delete_refuses_active_and_absent(self, store: Store) -> None:
        await self.claimed(store)
        assert await store.delete("Q1") is False
        assert await store.delete("NOPE") is False
        found = await store.find("Q1")
        assert found is not None
        assert found[0] == "active"

    async def test_delete_removes_a_corrupt_entry(self, store: Store) -> None:
        await self.claimed(store)
        self.damage(store, "Q1", b"")
        with pytest.raises(EntryNotFoundError):
            await store.read_message("Q1")
        assert await store.delete("Q1") is True
        assert counts(await store.stats(NOW)) == (0, 0, 0, 0, 0)

    async def test_purge_deletes_every_entry_in_the_state_only(self, store: Store) -> None:
        for qid in ("D1", "D2"):
            await self.in_state(store, "dead", qid)
        await self.in_state(store, "queue", "KEEP")
        assert await store.purge("dead") == 2
        assert await store.list("dead") == []
        assert [e.queue_id for e in await store.list("queue")] == ["KEEP"]

    async def test_purge_refuses_active(self, store: Store) -> None:
        await self.claimed(store)
        with pytest.raises(ValueError, match="active"):
            await store.purge("active")

    async def test_refresh_keeps_what_the_store_knows(self, store: Store) -> None:
        await store.put(entry("A"), MESSAGE)
        await self.claimed(store, "B")
        await store.refresh()
        assert counts(await store.stats(NOW)) == (1, 1, 0, 0, 0)
        assert [e.queue_id for e in await store.due(NOW, 10)] == ["A"]

    # --- waiting (the budgets' drain estimate) ------------------------------------------------

    async def test_waiting_lists_recipient_counts_per_mailbox_in_due_order(
        self, store: Store
    ) -> None:
        two = ("a@contoso.com", "b@contoso.com")
        await store.put(entry("LATER", created=NOW + 1, recipients=two), MESSAGE)
        await store.put(entry("FIRST", created=NOW), MESSAGE)
        await store.put(entry("OTHER", mailbox="Alerts@contoso.com"), MESSAGE)
        await self.claimed(store, "BUSY", created=NOW - 5)
        waiting = await store.waiting()
        assert waiting == {
            mailbox_key("contoso", "scanner@contoso.com"): [1, 2],
            mailbox_key("contoso", "alerts@contoso.com"): [1],
        }

    # --- the send ledger ----------------------------------------------------------------------

    async def test_sends_are_read_back_oldest_first_from_since(self, store: Store) -> None:
        first = SendRecord(NOW - 10, "contoso", "scanner@contoso.com", 1, 2, 1, 0)
        second = SendRecord(NOW - 5, "contoso", "alerts@contoso.com", 1, 1, 4, 5_000_000)
        old = SendRecord(NOW - 90_000, "contoso", "scanner@contoso.com", 1, 9, 1, 0)
        await store.record_sends([second])
        await store.record_sends([old, first])
        assert list(await store.sends_since(NOW - 86_400)) == [first, second]
        assert list(await store.sends_since(NOW - 7)) == [second]

    async def test_the_ledger_survives_a_restart(self, store: Store) -> None:
        sent = SendRecord(NOW - 60, "contoso", "scanner@contoso.com", 1, 3, 1, 0)
        await store.record_sends([sent])
        again = await self.restart(store)
        await again.recover()
        assert list(await again.sends_since(NOW - 86_400)) == [sent]

    # --- hold / unhold (the operator's `queue hold|release`) ----------------------------------

    async def held(self, store: Store, queue_id: str = "Q1", **changes: Any) -> EntryMeta:
        await store.put(entry(queue_id, **changes), MESSAGE)
        assert await store.hold(queue_id) is True
        found = await store.find(queue_id)
        assert found is not None
        assert found[0] == "hold"
        return found[1]

    async def test_hold_moves_a_queued_entry_out_of_due_and_claim(self, store: Store) -> None:
        await self.held(store)
        assert await store.due(NOW, 10) == []
        assert await store.next_due() is None
        assert await store.claim("Q1") is None
        assert [e.queue_id for e in await store.list("hold")] == ["Q1"]

    async def test_unhold_puts_it_back_unchanged_and_due_again(self, store: Store) -> None:
        meta = await self.held(store, next_attempt=NOW - 5)
        assert await store.unhold("Q1") is True
        assert await store.find("Q1") == ("queue", meta)
        assert [e.queue_id for e in await store.due(NOW, 10)] == ["Q1"]
        assert await store.claim("Q1") is not None

    @pytest.mark.parametrize("state", ["active", "dead", "quarantine", None])
    async def test_hold_refuses_what_is_not_queued(self, store: Store, state: State | None) -> None:
        if state:
            await self.in_state(store, state)
        assert await store.hold("Q1") is False
        found = await store.find("Q1")
        assert (found[0] if found else None) == state

    async def test_hold_twice_and_unhold_of_what_is_not_held_are_refused(
        self, store: Store
    ) -> None:
        await self.held(store)
        assert await store.hold("Q1") is False
        await self.in_state(store, "queue", "Q2")
        assert await store.unhold("Q2") is False
        assert await store.unhold("NOPE") is False

    async def test_held_entries_are_counted_apart(self, store: Store) -> None:
        await self.held(store, "H1")
        await self.held(store, "H2")
        await store.put(entry("Q3"), MESSAGE)
        stats = await store.stats(NOW)
        assert (stats.held, stats.queued, stats.due) == (2, 1, 1)
        await store.unhold("H1")
        stats = await store.stats(NOW)
        assert (stats.held, stats.queued, stats.due) == (1, 2, 2)

    async def test_retry_leaves_a_held_entry_held(self, store: Store) -> None:
        await self.held(store)
        assert await store.retry("Q1") is False
        assert await store.claim("Q1") is None

    async def test_delete_and_purge_remove_held_entries(self, store: Store) -> None:
        await self.held(store, "H1")
        await self.held(store, "H2")
        assert await store.delete("H1") is True
        assert await store.purge("hold") == 1
        assert (await store.stats(NOW)).held == 0
        with pytest.raises(EntryNotFoundError):
            await store.read_message("H2")

    async def test_recover_leaves_held_entries_held(self, store: Store) -> None:
        meta = await self.held(store)
        again = await self.restart(store)
        await again.recover()
        assert await again.find("Q1") == ("hold", meta)
        assert await again.due(NOW, 10) == []
        assert (await again.stats(NOW)).held == 1

    async def test_refresh_keeps_held_entries_held(self, store: Store) -> None:
        await self.held(store)
        await store.refresh()
        assert (await store.stats(NOW)).held == 1
        assert await store.due(NOW, 10) == []

    # --- paused mailboxes (`queue pause|resume`) ----------------------------------------------

    async def test_pause_and_resume_change_the_paused_set(self, store: Store) -> None:
        scanner = mailbox_key("contoso", "scanner@contoso.com")
        alerts = mailbox_key("contoso", "alerts@contoso.com")
        assert await store.paused_mailboxes() == frozenset()
        await store.pause_mailbox(scanner)
        await store.pause_mailbox(alerts)
        await store.pause_mailbox(scanner)
        assert await store.paused_mailboxes() == {scanner, alerts}
        await store.resume_mailbox(scanner)
        await store.resume_mailbox(scanner)
        assert await store.paused_mailboxes() == {alerts}

    async def test_the_paused_set_survives_a_restart(self, store: Store) -> None:
        scanner = mailbox_key("contoso", "scanner@contoso.com")
        await store.pause_mailbox(scanner)
        again = await self.restart(store)
        await again.recover()
        assert await again.paused_mailboxes() == {scanner}

    async def test_a_paused_mailbox_excluded_from_due_keeps_its_entries(self, store: Store) -> None:
        scanner = mailbox_key("contoso", "Scanner@Contoso.com")
        await store.put(entry("S"), MESSAGE)
        await store.put(entry("A", mailbox="alerts@contoso.com"), MESSAGE)
        await store.pause_mailbox(scanner)
        paused = await store.paused_mailboxes()
        assert [e.queue_id for e in await store.due(NOW, 10, paused)] == ["A"]
        assert (await store.stats(NOW)).queued == 2

    # --- the delivery history -----------------------------------------------------------------

    async def test_history_is_read_back_newest_first(self, store: Store) -> None:
        await store.record_history([settled("Q1", NOW - 30), settled("Q2", NOW - 10)])
        await store.record_history([settled("Q3", NOW - 20)])
        found = await store.history(HistoryQuery())
        assert [r.queue_id for r in found] == ["Q2", "Q3", "Q1"]
        assert found[0] == settled("Q2", NOW - 10)

    async def test_history_filters_by_since_sender_message_id_failed_and_limit(
        self, store: Store
    ) -> None:
        await store.record_history(
            [
                settled("Q1", NOW - 30, sender="scanner@contoso.com"),
                settled("Q2", NOW - 20, sender="erp@contoso.com", outcome="failed"),
                settled("Q3", NOW - 10, sender="ERP@contoso.com", outcome="expired"),
            ]
        )

        async def ids(**query: Any) -> list[str]:
            return [r.queue_id for r in await store.history(HistoryQuery(**query))]

        assert await ids(since=NOW - 20) == ["Q3", "Q2"]
        assert await ids(sender="erp@contoso.com") == ["Q3", "Q2"]
        assert await ids(sender="*@CONTOSO.com", limit=2) == ["Q3", "Q2"]
        assert await ids(message_id="Q1@relay.example.com") == ["Q1"]
        assert await ids(message_id="<q2@relay.example.com>") == ["Q2"]
        assert await ids(failed=True) == ["Q3", "Q2"]
        assert await ids(text="scanner") == ["Q1"]
        assert await ids(text="q3") == ["Q3"]

    async def test_prune_history_forgets_what_settled_before_the_cut(self, store: Store) -> None:
        await store.record_history([settled(f"Q{i}", NOW - 100 + i * 10) for i in range(10)])
        assert await store.prune_history(NOW - 50) == 5
        found = await store.history(HistoryQuery(limit=100))
        assert sorted(r.queue_id for r in found) == ["Q5", "Q6", "Q7", "Q8", "Q9"]
        assert await store.prune_history(NOW - 50) == 0

    async def test_history_keeps_at_most_its_bound_newest_kept(self, store: Store) -> None:
        small, bound = await self.bounded_history(store)
        for i in range(40):
            await small.record_history([settled(f"Q{i:02d}", NOW + i)])
        found = await small.history(HistoryQuery(limit=1000))
        assert bound // 2 <= len(found) <= bound
        assert [r.queue_id for r in found[:4]] == ["Q39", "Q38", "Q37", "Q36"]

    async def test_history_survives_a_restart(self, store: Store) -> None:
        await store.record_history([settled("Q1", NOW)])
        again = await self.restart(store)
        await again.recover()
        assert [r.queue_id for r in await again.history(HistoryQuery())] == ["Q1"]


def settled(queue_id: str, at: float, **changes: Any) -> HistoryRecord:
    """A delivered message's record, settled at `at`."""
    base = HistoryRecord(
        queue_id=queue_id,
        message_id=f"<{queue_id}@relay.example.com>",
        accepted=at - 2,
        settled=at,
        client="printers",
        client_ip="10.0.5.7",
        sender="scanner@contoso.com",
        recipients=1,
        route="routes[0]",
        mailbox="scanner@contoso.com",
        path="mime",
        http_status=202,
        request_id="req-1",
        attempts=1,
        outcome="delivered",
    )
    return replace(base, **changes)
