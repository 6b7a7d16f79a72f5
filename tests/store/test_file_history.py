"""The file store's history files (relay/store/files/history.py) on a real disk: the bound on
disk, rotation after a restart, torn lines, pruning that rewrites or removes segments, and the
direct-mode history that needs no spool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.core.history import HistoryQuery
from relay.store.files import FileStore
from relay.store.files.history import HISTORY_FILE, FileHistory
from relay.store.protocol import StoreUnavailableError
from tests.store.contract import NOW, settled

EVERYTHING = HistoryQuery(limit=10_000)


def ids(files: FileHistory, query: HistoryQuery = EVERYTHING) -> list[str]:
    return [r.queue_id for r in files.search(query)]


def test_the_files_on_disk_stay_within_the_segments(tmp_path: Path) -> None:
    files = FileHistory(tmp_path, segment_records=5, segments=3)
    for i in range(100):
        files.append([settled(f"Q{i:03d}", NOW + i)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["history.1.jsonl", "history.2.jsonl", "history.3.jsonl", HISTORY_FILE]
    kept = ids(files)
    assert 15 < len(kept) <= 20
    assert kept[0] == "Q099"


def test_a_restarted_writer_counts_the_lines_already_there(tmp_path: Path) -> None:
    FileHistory(tmp_path, segment_records=4, segments=1).append(
        [settled(f"A{i}", NOW + i) for i in range(3)]
    )
    again = FileHistory(tmp_path, segment_records=4, segments=1)
    again.append([settled("B0", NOW + 10), settled("B1", NOW + 11)])
    assert (tmp_path / "history.1.jsonl").is_file()  # 3 + 2 > 4: rotated before writing
    assert len((tmp_path / HISTORY_FILE).read_bytes().splitlines()) == 2


def test_a_torn_or_foreign_line_is_skipped(tmp_path: Path) -> None:
    files = FileHistory(tmp_path)
    files.append([settled("Q1", NOW)])
    with open(tmp_path / HISTORY_FILE, "ab") as out:
        out.write(b'{"not": "a record"}\n{"queue_id": "Q2", "mess')
    assert ids(files) == ["Q1"]


def test_prune_rewrites_a_mixed_segment_and_removes_an_old_one(tmp_path: Path) -> None:
    files = FileHistory(tmp_path, segment_records=3, segments=2)
    files.append([settled(f"Q{i}", NOW + i) for i in range(3)])  # all old: history.1
    files.append([settled(f"R{i}", NOW + 100 * i) for i in range(3)])  # R0 old, R1 R2 new
    assert files.prune(NOW + 50) == 4
    assert not (tmp_path / "history.1.jsonl").exists()
    assert ids(files) == ["R2", "R1"]
    files.append([settled("S0", NOW + 500)])  # the line count followed the rewrite
    assert ids(files) == ["S0", "R2", "R1"]


def test_a_search_with_enough_in_the_newest_segment_reads_no_older_one(tmp_path: Path) -> None:
    files = FileHistory(tmp_path, segment_records=3, segments=2)
    files.append([settled(f"Q{i}", NOW + i) for i in range(6)])
    planted = settled("LATER", NOW + 1000).to_dict()  # would come first if it were read
    (tmp_path / "history.1.jsonl").write_text(json.dumps(planted) + "\n")
    assert ids(files, HistoryQuery(limit=2)) == ["Q5", "Q4"]
    assert ids(files, HistoryQuery(limit=4))[0] == "LATER"  # 3 in the newest: read on


async def test_a_direct_mode_history_creates_its_folder(tmp_path: Path) -> None:
    history = FileStore.history_only(tmp_path / "not" / "yet")
    await history.record_history([settled("Q1", NOW)])
    assert [r.queue_id for r in await history.history(EVERYTHING)] == ["Q1"]
    assert await history.prune_history(NOW + 1) == 1


async def test_a_history_that_cannot_be_written_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    history = FileStore.history_only(blocker)
    with pytest.raises(StoreUnavailableError, match="cannot append to the history"):
        await history.record_history([settled("Q1", NOW)])
    with pytest.raises(StoreUnavailableError, match="cannot read the history"):
        await history.history(EVERYTHING)
