"""Specification of the durable spool (relay/spool.py, DESIGN §6), on the real file system.

Crashes are simulated with a fault-injection seam: the spool's file-system steps (`os.open`,
`write`, `fsync`, `rename`, `replace`, `unlink`) are counted, and the process "dies" before step
N: that step and every later one raise `Crash`, a BaseException no handler in the spool catches,
as with kill -9. A new `Spool` on the same directory then recovers, like a restarted relay.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from relay.core.errors import RelayError
from relay.core.values import EntryMeta, State
from relay.store.files.spool import (
    MAX_CRASHES,
    EntryNotFoundError,
    RecoveryReport,
    Spool,
    SpoolLockedError,
    SpoolStats,
    SpoolUnavailableError,
)
from relay.store.integrity import digest

NOW = 1_700_000_000.0
DATA = b"From: scanner@contoso.com\r\nSubject: scan\r\n\r\nbody\r\n"
STATES: tuple[State, ...] = ("queue", "active", "dead", "quarantine")


def entry(queue_id: str = "Q1", **changes: Any) -> EntryMeta:
    base = EntryMeta(
        queue_id=queue_id,
        created=NOW,
        mail_from="scanner@contoso.com",
        recipients=("alice@contoso.com", "bob@partner.example"),
        client="printers",
        client_ip="10.0.5.7",
        auth_object="contoso",
        mailbox="scanner@contoso.com",
        route="routes[0]",
        message_id="<Q1@relay.example.com>",
        size=len(DATA),
        sha256=digest(DATA),  # what the spool records; a test that stores other bytes says so
    )
    return replace(base, **changes)


class Spools:
    """Opens spools and closes them at teardown; `restart` plays a relay that died and started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opened: list[Spool] = []

    def open(self, root: Path | None = None, *, reserve_bytes: int = 0) -> Spool:
        spool = Spool(root or self.root, reserve_bytes=reserve_bytes)
        self.opened.append(spool)
        spool.open()
        return spool

    def restart(self, dead: Spool) -> tuple[Spool, RecoveryReport]:
        dead.close()  # the kernel drops a dead process's flock
        fresh = Spool(dead.root, reserve_bytes=0)
        self.opened.append(fresh)
        return fresh, fresh.open()


@pytest.fixture
def spools(tmp_path: Path) -> Iterator[Spools]:
    made = Spools(tmp_path / "spool")
    yield made
    for spool in made.opened:
        spool.close()


@pytest.fixture
def spool(spools: Spools) -> Spool:
    return spools.open()


def files_of(root: Path, queue_id: str) -> set[str]:
    """Every file under the spool that belongs to `queue_id`, as 'dir/name'."""
    return {
        f"{p.parent.name}/{p.name}"
        for p in root.rglob("*")
        if p.is_file() and p.name.startswith(f"{queue_id}.")
    }


def stored(
    spool: Spool, queue_id: str = "Q1", *, state: State = "queue", **changes: Any
) -> EntryMeta:
    """Put an entry into `state` through the public operations; return what was stored."""
    meta = entry(queue_id, **changes)
    spool.store(meta, DATA)
    if state != "queue":
        assert spool.claim(queue_id) == meta
    if state == "dead":
        spool.bury(meta, "550 5.1.1 unknown user")
    elif state == "quarantine":
        for _ in range(MAX_CRASHES):
            spool.close()  # the worker dies holding it, and the relay starts again
            spool.open()
            spool.claim(queue_id)  # None once quarantined
    return meta


# --- the fault-injection seam ---------------------------------------------------------------


Steps = list[tuple[str, tuple[Any, ...]]]


class Crash(BaseException):
    """kill -9: not an Exception; and once raised, every later step raises it too, so no
    clean-up code in the spool reaches the disk."""


SYSCALLS = ("open", "write", "fsync", "rename", "replace", "unlink")


@dataclass
class Faults:
    """Counts file-system steps; dies before step `crash_at`, or makes step `fail_at` fail."""

    crash_at: int | None = None
    fail_at: int | None = None
    error: int = errno.EIO
    only: str | None = None  # count only this call when set
    steps: Steps = field(default_factory=list)
    dead: bool = False

    def run(self, operation: Callable[[], object]) -> bool:
        """Run `operation` under the seam; True if it crashed."""
        with pytest.MonkeyPatch.context() as mp:
            for name in SYSCALLS:
                mp.setattr(os, name, self._wrap(name, getattr(os, name)))
            try:
                operation()
            except Crash:
                return True
        return False

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            if self.only is not None and name != self.only:
                return real(*args, **kwargs)
            if self.dead or len(self.steps) == self.crash_at:
                self.dead = True
                raise Crash(f"killed before {name}{args}")
            self.steps.append((name, args))
            if len(self.steps) - 1 == self.fail_at:
                raise OSError(self.error, os.strerror(self.error))
            return real(*args, **kwargs)

        return step


def after(steps: Steps, n: int, name: str, target: str) -> bool:
    """Whether a crash before step `n` comes after the `name` step on `target` ('queue/Q1.json')."""
    index = next(i for i, (c, a) in enumerate(steps) if c == name and str(a[-1]).endswith(target))
    return n > index


# --- EntryMeta ------------------------------------------------------------------------------


def test_metadata_round_trips_through_json_including_surrogates() -> None:
    """to_json/from_json are inverse, even for 8-bit header bytes decoded with surrogateescape."""
    meta = entry(message_id="<caf\udce9@x>", mail_from="", is_bounce=True, next_attempt=NOW)
    assert EntryMeta.from_json(meta.to_json()) == meta
    assert json.loads(meta.to_json())["version"] == 3


def test_version_1_metadata_reads_with_no_sender_and_no_digest() -> None:
    """Entries written before `sender` and `sha256` existed are still delivered after an upgrade."""
    body = json.loads(entry().to_json())
    del body["sender"], body["sha256"], body["waited"], body["waited_to"]
    body["version"] = 1
    meta = EntryMeta.from_json(json.dumps(body).encode())
    assert (meta.sender, meta.sha256) == ("", "")
    assert meta.queue_id == entry().queue_id


def test_version_1_metadata_with_version_2_fields_is_refused() -> None:
    """A version 1 file cannot carry fields that only version 2 has: it is corrupt."""
    body = json.loads(entry().to_json())
    body["version"] = 1
    with pytest.raises(ValueError, match="version 1"):
        EntryMeta.from_json(json.dumps(body).encode())


def _json_with(**changes: Any) -> bytes:
    body = json.loads(entry().to_json())
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(entry().to_json()[:40], id="truncated"),
        pytest.param(b"\x00\xff garbage", id="garbage"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
        pytest.param(_json_with(version=4), id="future-version"),
        pytest.param(_json_with(version=True), id="bool-version"),
        pytest.param(_json_with(version=...), id="no-version"),
        pytest.param(_json_with(size=...), id="missing-key"),
        pytest.param(_json_with(extra=1), id="unknown-key"),
        pytest.param(_json_with(size="52"), id="string-for-int"),
        pytest.param(_json_with(attempts=True), id="bool-for-int"),
        pytest.param(_json_with(recipients="a@b"), id="string-for-list"),
        pytest.param(_json_with(recipients=[1]), id="non-string-recipient"),
        pytest.param(_json_with(recipients=[]), id="no-recipients"),
        pytest.param(_json_with(crashes=-1), id="negative"),
        pytest.param(_json_with(queue_id="../etc"), id="traversal-id"),
        pytest.param(_json_with(created=float("nan")), id="nan"),
        pytest.param(_json_with(next_attempt=float("inf")), id="infinity"),
        pytest.param(entry().to_json().replace(b": 0.0", b": 1e999"), id="overflow"),
    ],
)
def test_from_json_rejects_anything_malformed_with_value_error(raw: bytes) -> None:
    """Strict parsing: one ValueError for every kind of damage, never another exception."""
    with pytest.raises(ValueError):  # noqa: PT011 - the contract is exactly "ValueError"
        EntryMeta.from_json(raw)


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/b", ".hidden", "..", "a b", "é", "a\x00b", "x" * 65]
)
def test_path_traversal_and_odd_queue_ids_are_rejected(spool: Spool, bad: str) -> None:
    """Queue ids become file names, so anything but [A-Za-z0-9._-]{1,64} (no leading dot) fails."""
    with pytest.raises(ValueError, match="invalid queue id"):
        entry(bad)
    for operation in (spool.claim, spool.find, spool.data_path, spool.retry, spool.delete):
        with pytest.raises(ValueError, match="invalid queue id"):
            operation(bad)


# --- storing and reading --------------------------------------------------------------------


def test_store_then_find_list_and_read_data(spool: Spool) -> None:
    """A stored entry is queued, listed, found and its bytes read back unchanged."""
    meta = stored(spool)
    assert spool.find("Q1") == ("queue", meta)
    assert spool.list("queue") == [meta]
    assert spool.read_data("Q1") == DATA
    assert spool.data_path("Q1").read_bytes() == DATA
    assert files_of(spool.root, "Q1") == {"queue/Q1.json", "data/Q1.eml"}


def test_store_claimed_puts_the_entry_straight_into_active(spool: Spool) -> None:
    """store(claimed=True) hands the entry to the inline attempt: no worker can claim it."""
    spool.store(entry(), DATA, claimed=True)
    assert spool.find("Q1") == ("active", entry())
    assert spool.claim("Q1") is None


def test_files_are_0600_and_directories_0700(spool: Spool) -> None:
    """Messages are private to the relay's user."""
    stored(spool)
    for path in [spool.root, *spool.root.rglob("*")]:
        want = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) & ~want == 0, path


def test_storing_an_id_twice_is_refused(spool: Spool) -> None:
    """A second message under an existing id would overwrite the first: ValueError instead."""
    stored(spool)
    with pytest.raises(ValueError, match="already in the spool"):
        spool.store(entry(size=0, sha256=""), b"other")
    assert spool.read_data("Q1") == DATA


def test_relay_operations_need_open(tmp_path: Path) -> None:
    """Only a spool that has recovered (and holds the lock) may take or move mail."""
    with pytest.raises(RuntimeError, match="open"):
        Spool(tmp_path, reserve_bytes=0).store(entry(), DATA)


def test_a_second_relay_on_the_same_spool_is_refused(spools: Spools) -> None:
    """Recovery by a second process would steal the first one's claims, so the lock forbids it."""
    first = spools.open()
    with pytest.raises(SpoolLockedError):
        Spool(first.root, reserve_bytes=0).open()
    first.close()
    spools.open()


# --- transitions ----------------------------------------------------------------------------


def test_claim_moves_queue_to_active_once(spool: Spool) -> None:
    """Claim is a rename: the first caller gets the entry, the next gets None."""
    meta = stored(spool)
    assert spool.claim("Q1") == meta
    assert spool.find("Q1") == ("active", meta)
    assert spool.claim("Q1") is None
    assert spool.claim("NOPE") is None


def test_complete_removes_metadata_and_data(spool: Spool) -> None:
    """Delivered: nothing of the entry remains."""
    stored(spool, state="active")
    spool.complete("Q1")
    assert files_of(spool.root, "Q1") == set()
    assert spool.find("Q1") is None


def test_defer_rewrites_the_attempt_and_requeues(spool: Spool) -> None:
    """Defer stores the new attempt count, time and error, and puts the entry back in queue/."""
    meta = stored(spool, state="active")
    later = replace(meta, attempts=1, next_attempt=NOW + 60, last_error="429 throttled")
    spool.defer(later)
    assert spool.find("Q1") == ("queue", later)
    assert spool.due(NOW) == []
    assert spool.due(NOW + 60) == [later]


def test_release_requeues_unchanged_without_counting_a_crash(spools: Spools, spool: Spool) -> None:
    """Graceful shutdown gives the entry back as it was; a restart does not count a crash."""
    meta = stored(spool, state="active")
    spool.release("Q1")
    assert spool.find("Q1") == ("queue", meta)
    fresh, report = spools.restart(spool)
    assert report.requeued == 0
    assert fresh.find("Q1") == ("queue", meta)


def test_bury_moves_to_dead_with_the_reason_and_keeps_the_data(spool: Spool) -> None:
    """A dead entry keeps its message for the operator."""
    meta = stored(spool, state="active")
    spool.bury(meta, "expired after 5d")
    assert spool.find("Q1") == ("dead", replace(meta, dead_reason="expired after 5d"))
    assert spool.read_data("Q1") == DATA


@pytest.mark.parametrize("state", STATES)
def test_discard_removes_the_entry_from_any_state(spool: Spool, state: State) -> None:
    """Discard works from active/ (the inline attempt's permanent failure) and everywhere else."""
    stored(spool, state=state)
    spool.discard("Q1")
    assert files_of(spool.root, "Q1") == set()
    spool.discard("Q1")  # gone already: no error


@pytest.mark.parametrize("operation", ["complete", "defer", "release", "bury"])
def test_transitions_need_a_claimed_entry(spool: Spool, operation: str) -> None:
    """Moving an unclaimed entry out of active/ is a bug: EntryNotFoundError, nothing changes."""
    meta = stored(spool)
    calls: dict[str, Callable[[], object]] = {
        "complete": lambda: spool.complete("Q1"),
        "defer": lambda: spool.defer(meta),
        "release": lambda: spool.release("Q1"),
        "bury": lambda: spool.bury(meta, "x"),
    }
    with pytest.raises(EntryNotFoundError):
        calls[operation]()
    assert spool.find("Q1") == ("queue", meta)


def test_due_orders_by_next_attempt_and_claim_due_honours_the_limit(spool: Spool) -> None:
    """Due lists what may be tried now, earliest first; next_due_time is the earliest of all."""
    stored(spool, "LATE", next_attempt=NOW + 5)
    stored(spool, "SOON", next_attempt=NOW - 5)
    stored(spool, "NOW", next_attempt=0.0)
    stored(spool, "FUTURE", next_attempt=NOW + 3600)
    assert [m.queue_id for m in spool.due(NOW + 10)] == ["NOW", "SOON", "LATE"]
    assert spool.next_due_time() == 0.0
    assert [m.queue_id for m in spool.claim_due(NOW + 10, limit=2)] == ["NOW", "SOON"]
    assert spool.stats(NOW + 10).active == 2


def test_next_due_time_is_none_for_an_empty_queue(spool: Spool) -> None:
    """Nothing queued, nothing to wake up for."""
    assert spool.next_due_time() is None


# --- recovery -------------------------------------------------------------------------------


def test_an_entry_left_in_active_is_requeued_with_one_more_crash(spools: Spools) -> None:
    """A claim held by a process that died is retried, and the crash is counted."""
    spool = spools.open()
    meta = stored(spool, state="active")
    fresh, report = spools.restart(spool)
    assert report == RecoveryReport(1, 0, 0, 0, 0)
    assert fresh.find("Q1") == ("queue", replace(meta, crashes=1))


def test_the_third_crash_quarantines_the_entry(spools: Spools) -> None:
    """A message that kills the worker three times stops being retried but is kept."""
    spool = spools.open()
    meta = stored(spool)
    for crash in range(1, MAX_CRASHES + 1):
        assert spool.claim("Q1") is not None
        spool, report = spools.restart(spool)
        assert report.quarantined == int(crash == MAX_CRASHES)
    held = replace(
        meta, crashes=MAX_CRASHES, dead_reason="the relay died 3 times while handling it"
    )
    assert spool.find("Q1") == ("quarantine", held)
    assert spool.read_data("Q1") == DATA
    assert spool.due(NOW) == []


def _damage(root: Path, how: str) -> None:
    path = root / "queue" / "BAD.json"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:30])
    elif how == "garbage":
        path.write_bytes(os.urandom(64))
    elif how == "wrong-version":
        path.write_bytes(path.read_bytes().replace(b'"version": 3', b'"version": 99'))
    elif how == "wrong-id":
        path.write_bytes(entry("OTHER").to_json())
    elif how == "missing-data":
        (root / "data" / "BAD.eml").unlink()
    elif how == "directory":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize(
    "how", ["truncated", "garbage", "wrong-version", "wrong-id", "missing-data", "directory"]
)
def test_unreadable_entries_move_to_corrupt_and_recovery_carries_on(
    spools: Spools, how: str
) -> None:
    """A bad entry goes to corrupt/ with its data; the good entries around it are recovered."""
    spool = spools.open()
    good = stored(spool, "A", state="active")
    stored(spool, "BAD")
    other = stored(spool, "Z")
    _damage(spool.root, how)
    fresh, report = spools.restart(spool)
    assert (report.requeued, report.corrupt) == (1, 1)
    assert fresh.list("queue") == [replace(good, crashes=1), other]
    assert fresh.corrupt_ids() == ["BAD"]
    assert files_of(fresh.root, "BAD") <= {"corrupt/BAD.json", "corrupt/BAD.eml"}
    assert ("corrupt/BAD.eml" in files_of(fresh.root, "BAD")) == (how != "missing-data")
    assert fresh.stats(NOW).corrupt == 1


def test_a_corrupt_entry_found_while_running_is_set_aside(spool: Spool) -> None:
    """Claim and the queue scans move damaged entries aside instead of failing."""
    stored(spool, "BAD")
    stored(spool, "BAD2")
    (spool.root / "queue" / "BAD.json").write_bytes(b"{")
    (spool.root / "queue" / "BAD2.json").write_bytes(b"{")
    assert spool.claim("BAD") is None
    assert spool.due(NOW) == []
    assert spool.corrupt_ids() == ["BAD", "BAD2"]


def test_a_second_corrupt_copy_never_overwrites_the_first(spool: Spool) -> None:
    """Setting aside picks a free name, so earlier evidence stays."""
    for _ in range(2):
        stored(spool, "BAD")
        (spool.root / "queue" / "BAD.json").write_bytes(b"{")
        assert spool.claim("BAD") is None
    assert files_of(spool.root, "BAD") == {
        "corrupt/BAD.json",
        "corrupt/BAD.json.1",
        "corrupt/BAD.eml",
        "corrupt/BAD.eml.1",
    }


def test_orphan_data_and_stale_temp_files_are_removed(spools: Spools) -> None:
    """Leftovers of a store that never reached its commit point (never acknowledged) go."""
    spool = spools.open()
    meta = stored(spool)
    (spool.root / "data" / "ORPHAN.eml").write_bytes(DATA)
    (spool.root / "tmp" / "X.abc.tmp").write_bytes(DATA)
    fresh, report = spools.restart(spool)
    assert (report.orphans_removed, report.temp_removed) == (1, 1)
    assert files_of(fresh.root, "ORPHAN") == set()
    assert list((fresh.root / "tmp").iterdir()) == []
    assert fresh.find("Q1") == ("queue", meta)


@pytest.mark.parametrize(
    ("states", "winner"),
    [
        (("queue", "active"), "queue"),
        (("dead", "active"), "dead"),
        (("quarantine", "active"), "quarantine"),
        (("queue", "dead"), "queue"),
        (("queue", "quarantine"), "queue"),
    ],
)
def test_one_id_in_two_states_keeps_the_destination_copy(
    spools: Spools, states: tuple[State, State], winner: State
) -> None:
    """After a rename half-lost to power failure, the copy that still delivers the mail wins."""
    spool = spools.open()
    meta = stored(spool)
    for state in states:
        if state != "queue":
            shutil.copy(spool.root / "queue" / "Q1.json", spool.root / state / "Q1.json")
    if "queue" not in states:
        (spool.root / "queue" / "Q1.json").unlink()
    fresh, report = spools.restart(spool)
    assert report == RecoveryReport(0, 0, 0, 0, 0)
    assert files_of(fresh.root, "Q1") == {f"{winner}/Q1.json", "data/Q1.eml"}
    assert fresh.find("Q1") == (winner, meta)


def test_a_readable_duplicate_beats_a_corrupt_preferred_copy(spools: Spools) -> None:
    """Recovery keeps the best copy that can be read, not just the best directory."""
    spool = spools.open()
    meta = stored(spool)
    shutil.copy(spool.root / "queue" / "Q1.json", spool.root / "active" / "Q1.json")
    (spool.root / "queue" / "Q1.json").write_bytes(b"garbage")
    fresh, report = spools.restart(spool)
    assert report.requeued == 1
    assert fresh.find("Q1") == ("queue", replace(meta, crashes=1))
    assert files_of(fresh.root, "Q1") == {"queue/Q1.json", "data/Q1.eml"}


# --- crash at every step --------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """An operation on Q1 after `setup`, and what recovery must make of a crash before step n."""

    name: str
    setup: Callable[[Spool], None]
    operation: Callable[[Spool], object]
    expect: Callable[[Steps, int], tuple[State, EntryMeta] | None]


DEFERRED = replace(entry(), attempts=1, next_attempt=NOW + 60, last_error="503")
CRASHED = replace(entry(), crashes=1)


def _nothing(spool: Spool) -> None:
    pass


def _queued(spool: Spool) -> None:
    stored(spool, next_attempt=NOW)


def _claimed(spool: Spool) -> None:
    stored(spool, state="active")


def _dead(spool: Spool) -> None:
    stored(spool, state="dead")


SCENARIOS = [
    Scenario(
        "store",
        _nothing,
        lambda spool: spool.store(entry(), DATA),
        lambda steps, n: ("queue", entry()) if after(steps, n, "rename", "queue/Q1.json") else None,
    ),
    Scenario(
        "claim",
        _queued,
        lambda spool: spool.claim("Q1"),
        lambda steps, n: (
            "queue",
            entry(next_attempt=NOW, crashes=int(after(steps, n, "rename", "active/Q1.json"))),
        ),
    ),
    Scenario(
        "defer",
        _claimed,
        lambda spool: spool.defer(DEFERRED),
        lambda steps, n: (
            ("queue", DEFERRED)
            if after(steps, n, "rename", "queue/Q1.json")
            else ("queue", replace(DEFERRED, crashes=1))
            if after(steps, n, "replace", "active/Q1.json")
            else ("queue", CRASHED)
        ),
    ),
    Scenario(
        "complete",
        _claimed,
        lambda spool: spool.complete("Q1"),
        lambda steps, n: (
            None if after(steps, n, "unlink", "active/Q1.json") else ("queue", CRASHED)
        ),
    ),
    Scenario(
        "release",
        _claimed,
        lambda spool: spool.release("Q1"),
        lambda steps, n: (
            ("queue", entry()) if after(steps, n, "rename", "queue/Q1.json") else ("queue", CRASHED)
        ),
    ),
    Scenario(
        "bury",
        _claimed,
        lambda spool: spool.bury(entry(), "expired"),
        lambda steps, n: (
            ("dead", entry(dead_reason="expired"))
            if after(steps, n, "rename", "dead/Q1.json")
            else ("queue", CRASHED)
        ),
    ),
    Scenario(
        "discard",
        _claimed,
        lambda spool: spool.discard("Q1"),
        lambda steps, n: (
            None if after(steps, n, "unlink", "active/Q1.json") else ("queue", CRASHED)
        ),
    ),
    Scenario(
        "delete-dead",
        _dead,
        lambda spool: spool.delete("Q1"),
        lambda steps, n: (
            None
            if after(steps, n, "unlink", "dead/Q1.json")
            else ("dead", entry(dead_reason="550 5.1.1 unknown user"))
        ),
    ),
    Scenario(
        "retry-dead",
        _dead,
        lambda spool: spool.retry("Q1"),
        lambda steps, n: (
            ("queue", entry())
            if after(steps, n, "rename", "queue/Q1.json")
            else ("dead", entry())
            if after(steps, n, "replace", "dead/Q1.json")
            else ("dead", entry(dead_reason="550 5.1.1 unknown user"))
        ),
    ),
    Scenario(
        "retry-queued",
        _queued,
        lambda spool: spool.retry("Q1"),
        lambda steps, n: (
            ("queue", entry())
            if after(steps, n, "rename", "queue/Q1.json")
            else ("queue", CRASHED)
            if after(steps, n, "replace", "active/Q1.json")
            else ("queue", entry(next_attempt=NOW, crashes=1))
            if after(steps, n, "rename", "active/Q1.json")
            else ("queue", entry(next_attempt=NOW))
        ),
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_a_crash_at_every_step_leaves_the_entry_whole_once_or_cleanly_absent(
    spools: Spools, tmp_path: Path, scenario: Scenario
) -> None:
    """kill -9 before any step of the operation, then restart: the entry is present exactly once
    with its data (in the state the crash point implies) or, before a commit point / after the
    removal point, absent with nothing left behind."""
    rehearsal = spools.open(tmp_path / "rehearsal")
    scenario.setup(rehearsal)
    trace = Faults()
    assert not trace.run(lambda: scenario.operation(rehearsal))
    assert trace.steps, "the operation touched no file"
    for n in range(len(trace.steps) + 1):
        spool = spools.open(tmp_path / f"crash-{n}")
        scenario.setup(spool)
        crashed = Faults(crash_at=n).run(partial(scenario.operation, spool))
        assert crashed == (n < len(trace.steps))
        fresh, _report = spools.restart(spool)
        want = scenario.expect(trace.steps, n)
        assert fresh.find("Q1") == want, f"crash before step {n}: {trace.steps[n : n + 1]}"
        leftovers = files_of(fresh.root, "Q1")
        assert leftovers == ({f"{want[0]}/Q1.json", "data/Q1.eml"} if want else set()), n
        assert list((fresh.root / "tmp").iterdir()) == []
        if want:
            assert fresh.read_data("Q1") == DATA


def test_a_crash_during_recovery_is_recovered_by_the_next_start(
    spools: Spools, tmp_path: Path
) -> None:
    """Recovery is itself crash-safe: a crash at any of its steps loses nothing (a crash between
    its rewrite and rename counts the worker crash twice, the documented conservative side)."""

    def prepare(root: Path) -> Spool:
        spool = spools.open(root)
        stored(spool, state="active")
        stored(spool, "BAD")
        (root / "queue" / "BAD.json").write_bytes(b"{")
        (root / "data" / "ORPHAN.eml").write_bytes(b"x")
        (root / "tmp" / "Q9.x.tmp").write_bytes(b"x")
        spool.close()
        return Spool(root, reserve_bytes=0)

    trace = Faults()
    assert not trace.run(prepare(tmp_path / "rehearsal").open)
    for n in range(len(trace.steps)):
        spool = prepare(tmp_path / f"crash-{n}")
        assert Faults(crash_at=n).run(spool.open)
        fresh, _report = spools.restart(spool)
        found = fresh.find("Q1")
        assert found is not None, n
        assert found[0] == "queue"
        assert found[1].crashes in (1, 2)
        assert fresh.read_data("Q1") == DATA
        assert fresh.corrupt_ids() == ["BAD"]
        assert "corrupt/BAD.eml" in files_of(fresh.root, "BAD")
        assert files_of(fresh.root, "ORPHAN") == set()
        assert list((fresh.root / "tmp").iterdir()) == []


# --- write failures -------------------------------------------------------------------------


def test_a_failure_at_any_step_of_store_cleans_up_and_reports_unavailable(
    spools: Spools, tmp_path: Path
) -> None:
    """EIO at any step: SpoolUnavailableError, no temp file, no data, no metadata, and the spool
    takes the next message."""
    trace = Faults()
    rehearsal = spools.open(tmp_path / "rehearsal")
    trace.run(lambda: rehearsal.store(entry(), DATA))
    for n in range(len(trace.steps)):
        spool = spools.open(tmp_path / f"fail-{n}")
        with pytest.raises(SpoolUnavailableError):
            Faults(fail_at=n).run(partial(spool.store, entry(), DATA))
        assert files_of(spool.root, "Q1") == set(), n
        assert list((spool.root / "tmp").iterdir()) == []
        stored(spool)


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("write", errno.ENOSPC),
        ("write", errno.EIO),
        ("open", errno.EROFS),
        ("fsync", errno.EIO),
        ("rename", errno.ENOSPC),
    ],
)
def test_enospc_erofs_eio_become_spool_unavailable(spool: Spool, call: str, code: int) -> None:
    """The SMTP layer sees one error class (-> 451 4.3.0), never a bare OSError, and earlier
    entries are untouched."""
    earlier = stored(spool, "EARLIER")
    with pytest.raises(SpoolUnavailableError) as caught:
        Faults(fail_at=0, only=call, error=code).run(lambda: spool.store(entry(), DATA))
    assert isinstance(caught.value, RelayError)
    assert caught.value.__cause__ is not None
    assert getattr(caught.value.__cause__, "errno", None) == code
    assert files_of(spool.root, "Q1") == set()
    assert list((spool.root / "tmp").iterdir()) == []
    assert spool.find("EARLIER") == ("queue", earlier)


def test_state_changes_report_io_errors_as_spool_unavailable(spool: Spool) -> None:
    """An I/O error while deferring is a SpoolError the engine can log; the entry stays put."""
    meta = stored(spool, state="active")
    with pytest.raises(SpoolUnavailableError):
        Faults(fail_at=0, only="rename").run(lambda: spool.defer(meta))
    found = spool.find("Q1")
    assert found is not None
    assert found[0] == "active"


def test_no_room_below_the_reserve(spools: Spools) -> None:
    """With a reserve larger than the free space, has_room_for is False and store refuses."""
    spool = spools.open(reserve_bytes=10**18)
    assert not spool.has_room_for(1)
    with pytest.raises(SpoolUnavailableError, match="reserve"):
        spool.store(entry(), DATA)
    assert files_of(spool.root, "Q1") == set()
    roomy = Spool(spool.root, reserve_bytes=0)
    assert roomy.has_room_for(len(DATA))


# --- operator operations --------------------------------------------------------------------


def test_retry_of_a_dead_entry_queues_it_due_now(spool: Spool) -> None:
    """Retry clears the reason and makes it due now."""
    meta = stored(spool, state="dead", next_attempt=NOW + 999)
    assert spool.retry("Q1")
    assert spool.find("Q1") == ("queue", replace(meta, next_attempt=0.0))


def test_retry_of_a_quarantined_entry_resets_its_crashes(spool: Spool) -> None:
    """The operator decided the crashes were not the message's fault."""
    meta = stored(spool, state="quarantine")
    found = spool.find("Q1")
    assert found is not None
    assert found[1].crashes == MAX_CRASHES
    assert spool.retry("Q1")
    assert spool.find("Q1") == ("queue", meta)


def test_retry_of_a_queued_entry_makes_it_due_now(spool: Spool) -> None:
    """Deferred entries can be pushed forward."""
    meta = stored(spool, next_attempt=NOW + 3600, attempts=2)
    assert spool.retry("Q1")
    assert spool.find("Q1") == ("queue", replace(meta, next_attempt=0.0))


def test_retry_refuses_active_and_unknown_entries(spool: Spool) -> None:
    """An entry a worker holds is left alone."""
    stored(spool, state="active")
    assert not spool.retry("Q1")
    assert not spool.retry("UNKNOWN")
    assert spool.find("Q1") is not None


@pytest.mark.parametrize("state", ["queue", "dead", "quarantine"])
def test_delete_removes_an_entry_that_is_not_active(spool: Spool, state: State) -> None:
    """Delete takes metadata and data, from any state but active/."""
    stored(spool, state=state)
    assert spool.find("Q1") is not None
    assert spool.delete("Q1")
    assert files_of(spool.root, "Q1") == set()
    assert not spool.delete("Q1")


def test_delete_leaves_active_entries_alone(spool: Spool) -> None:
    """The worker holding the entry decides its fate."""
    stored(spool, state="active")
    assert not spool.delete("Q1")
    assert files_of(spool.root, "Q1") == {"active/Q1.json", "data/Q1.eml"}


def test_delete_and_purge_clear_corrupt_entries(spool: Spool) -> None:
    """corrupt/ is emptied by id or all at once."""
    for qid in ("B1", "B2"):
        stored(spool, qid)
        (spool.root / "queue" / f"{qid}.json").write_bytes(b"{")
        spool.claim(qid)
    assert spool.delete("B1")
    assert spool.corrupt_ids() == ["B2"]
    assert spool.purge("corrupt") == 1
    assert list((spool.root / "corrupt").iterdir()) == []
    with pytest.raises(ValueError, match="corrupt_ids"):
        spool.list("corrupt")


def test_purge_dead_removes_only_dead_entries(spool: Spool) -> None:
    """purge('dead') is the CLI's `purge --dead`; active entries can never be purged."""
    for qid in ("D1", "D2"):
        meta = stored(spool, qid, state="active")
        spool.bury(meta, "gone")
    kept = stored(spool, "Q1")
    assert spool.purge("dead") == 2
    assert spool.list("dead") == []
    assert spool.list("queue") == [kept]
    with pytest.raises(ValueError, match="running relay"):
        spool.purge("active")


def test_cli_operations_work_without_open_and_on_a_missing_spool(tmp_path: Path) -> None:
    """The CLI reads a spool the relay holds (no lock) and copes with one never created."""
    cli = Spool(tmp_path / "nowhere", reserve_bytes=0)
    assert cli.find("Q1") is None
    assert cli.list("queue") == []
    assert not cli.delete("Q1")
    assert cli.purge("dead") == 0
    assert cli.stats(NOW).queued == 0


def test_stats_count_states_and_report_the_oldest_undelivered(spool: Spool) -> None:
    """oldest_created spans queue/ and active/, not dead/; due counts what is due now."""
    stored(spool, "OLD_ACTIVE", state="active", created=NOW - 300)
    stored(spool, "NEW", created=NOW - 10, next_attempt=NOW + 60)
    stored(spool, "DUE", created=NOW - 20)
    stored(spool, "ANCIENT_DEAD", state="dead", created=NOW - 9999)
    assert spool.stats(NOW) == SpoolStats(2, 1, 1, 0, 0, oldest_created=NOW - 300, due=1)


def test_stats_of_an_empty_spool_has_no_oldest(spool: Spool) -> None:
    """No undelivered message, no age."""
    assert spool.stats(NOW).oldest_created is None
