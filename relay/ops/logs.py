"""Logging setup: one event per step of a message's life, as text or one JSON object per line.

Why this module exists: operators read the text form, log shippers want stable JSON fields,
and journald adds its own timestamps. Modules log with the standard `logging` module and pass
structured fields through `extra={...}` (always including `event`); this module decides how
those records are rendered. Field names are part of the operator-facing contract.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


_HANDLER_NAME = "smtp-graph-relay"


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "event", "message", ...fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            body.setdefault(key, value)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines; without timestamps when journald adds its own."""

    def __init__(self, *, timestamps: bool) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(f"%(asctime)s {fmt}" if timestamps else fmt)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    under_journald = "JOURNAL_STREAM" in os.environ
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter(timestamps=not under_journald)
    )
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)  # a second setup (e.g. after reload) replaces only ours
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd ("mail.log") logs every command at INFO and, at DEBUG, what a client sent in
    # AUTH (a LOGIN reply that is not valid base64 is logged as it came: possibly a password).
    # The relay logs its own SMTP events ("relay.smtp", "relay.auth"), so aiosmtpd's stay at
    # WARNING even with `logging.level: debug` (issue #11 item 7).
    logging.getLogger("mail.log").setLevel(logging.WARNING)
