"""`logging.file`: the relay appends to a file and reopens it at its path on request (SIGUSR1,
for logrotate). In-process here, with real files; the signal itself is tested against a real
`serve` in tests/integration/test_serve_operations.py."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ops.logs import ReopenableFileHandler, reopen_log_files, setup_logging


@pytest.fixture(autouse=True)
def _close_log_files() -> Iterator[None]:
    """The relay keeps its log file open for the process; a test closes what it opened."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ReopenableFileHandler)]:
        root.removeHandler(handler)
        handler.close()


def test_records_go_to_the_file_with_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "relay.log"
    setup_logging("info", "text", file=path)
    logging.getLogger("relay.test").info("first line")
    [line] = path.read_text().splitlines()
    assert line.endswith(" INFO relay.test: first line")
    assert line[:4].isdigit()  # the asctime: nobody else adds one to a file


def test_reopen_after_a_rename_writes_a_new_file_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "relay.log"
    setup_logging("info", "json", file=path)
    log = logging.getLogger("relay.test")
    log.info("before rotation")
    path.rename(tmp_path / "relay.log.1")
    log.info("after the rename, before the reopen")  # still the renamed file, as logrotate expects
    reopen_log_files()
    log.info("after the reopen")
    assert "after the reopen" in path.read_text()
    rotated = (tmp_path / "relay.log.1").read_text()
    assert "before rotation" in rotated
    assert "before the reopen" in rotated
    assert "after the reopen" not in rotated


def test_a_reopen_that_fails_keeps_the_old_file_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    setup_logging("info", "text", file=folder / "relay.log")
    shutil.rmtree(folder)
    reopen_log_files()
    assert any(
        r.getMessage().startswith(f"cannot reopen the log file {folder / 'relay.log'}: ")
        for r in caplog.records
    )
    logging.getLogger("relay.test").info("still logging")  # no exception: the old stream


def test_a_second_setup_closes_the_file_it_replaces(tmp_path: Path) -> None:
    """A reload that moves logging.file (or drops it) closes the old file."""
    setup_logging("info", "text", file=tmp_path / "a.log")
    [old] = [h for h in logging.getLogger().handlers if isinstance(h, ReopenableFileHandler)]
    setup_logging("info", "text", file=tmp_path / "b.log")
    assert old.stream is None  # closed by FileHandler.close()
    logging.getLogger("relay.test").info("to b")
    assert "to b" in (tmp_path / "b.log").read_text()
    assert "to b" not in (tmp_path / "a.log").read_text()
