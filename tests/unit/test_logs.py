"""Log rendering: stable JSON fields for shippers, readable text for people."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from relay.ops.logs import setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream to log into; the root logger is restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield io.StringIO()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_json_format_is_one_object_per_event_with_the_extra_fields(stream: io.StringIO) -> None:
    """format: json writes ts, level, logger, event, message and every extra field."""
    setup_logging("info", "json", stream)
    logging.getLogger("relay.delivery").info(
        "delivered %s", "Q1", extra={"event": "delivered", "queue_id": "Q1", "recipients": 2}
    )
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "delivered"
    assert record["queue_id"] == "Q1"
    assert record["recipients"] == 2
    assert record["message"] == "delivered Q1"
    assert record["level"] == "info"
    assert record["logger"] == "relay.delivery"
    assert record["ts"].endswith("+00:00")


def test_text_format_omits_timestamps_under_journald(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """journald stamps every line itself; the relay does not repeat the time."""
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    setup_logging("info", "text", stream)
    logging.getLogger("relay.smtp").warning("refused 192.0.2.1")
    assert stream.getvalue() == "WARNING relay.smtp: refused 192.0.2.1\n"


def test_setup_replaces_only_its_own_handler(stream: io.StringIO) -> None:
    """A second setup (reload) does not stack handlers or remove foreign ones."""
    foreign = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(foreign)
    try:
        setup_logging("info", "text", io.StringIO())
        setup_logging("info", "text", stream)
        ours = [h for h in root.handlers if h.get_name() == "smtp-graph-relay"]
        assert len(ours) == 1
        assert foreign in root.handlers
    finally:
        root.removeHandler(foreign)
