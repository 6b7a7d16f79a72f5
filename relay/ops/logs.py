"""Logging setup: one event per step of a message's life, as text or one JSON object per line.

Why this module exists: operators read the text form, log shippers want stable JSON fields,
and journald adds its own timestamps. Modules log with the standard `logging` module and pass
structured fields through `extra={...}` (always including `event`); this module decides how
those records are rendered. Field names are part of the operator-facing contract.

Where they go: standard error by default (journald under systemd, `docker logs` in a container),
or `logging.file` for hosts that ship or scan files (fail2ban, docs/fail2ban.md). A file is
reopened at its path on SIGUSR1 (`reopen_log_files`), so logrotate can rename it and signal the
relay, as it does for nginx; nothing is lost or written to the renamed file after the signal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

__all__ = [
    "JsonFormatter",
    "ReopenableFileHandler",
    "TextFormatter",
    "reopen_log_files",
    "setup_logging",
]

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


class ReopenableFileHandler(logging.FileHandler):
    """Appends to one file; `reopen()` closes it and opens the path again (after logrotate
    renamed it), under the handler's lock so no record is split between the two files."""

    def reopen(self) -> None:
        self.acquire()
        try:
            old, self.stream = self.stream, self._open()
            if old is not None:
                old.close()
        finally:
            self.release()


def setup_logging(
    level: str = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    *,
    file: Path | None = None,
) -> None:
    """Configure the root logger once for the process: to `file` when given (appending, created
    if missing; OSError if it cannot be opened), else to `stream` or standard error."""
    handler: logging.Handler
    if file is not None:
        handler = ReopenableFileHandler(file, encoding="utf-8")
        timestamps = True  # nobody adds them to a file
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        timestamps = "JOURNAL_STREAM" not in os.environ  # journald adds its own
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(timestamps=timestamps))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)  # a second setup (e.g. after reload) replaces only ours
        if isinstance(old, logging.FileHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd ("mail.log") logs every command at INFO and, at DEBUG, what a client sent in
    # AUTH (a LOGIN reply that is not valid base64 is logged as it came: possibly a password).
    # The relay logs its own SMTP events ("relay.smtp", "relay.auth"), so aiosmtpd's stay at
    # WARNING even with `logging.level: debug` (issue #11 item 7).
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def reopen_log_files() -> None:
    """SIGUSR1: open `logging.file` again at its path (logrotate's postrotate step)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            try:
                handler.reopen()
            except OSError as exc:  # e.g. the folder is gone: keep writing where we were
                logging.getLogger("relay.logs").error(
                    "cannot reopen the log file %s: %s; still writing to the old one",
                    handler.baseFilename,
                    exc.strerror,
                    extra={"event": "log_reopen_failed"},
                )
