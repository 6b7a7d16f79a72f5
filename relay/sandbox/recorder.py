# Why this module exists: the sandbox is only useful if one can see what "Microsoft" received.
# Tests read an in-memory journal (messages, counters, concurrency peaks) and wait on it through
# an asyncio.Condition instead of polling; `smtp-graph-relay sandbox` users open a mail folder
# with one file per accepted message and an index.html listing them.
"""What the sandbox saw: accepted messages, counters, and the optional mail folder."""

from __future__ import annotations

import asyncio
import datetime
import html
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Journal", "MailDir", "ReceivedMail", "UploadedAttachment"]


@dataclass(frozen=True, slots=True)
class UploadedAttachment:
    """A file attached to a draft through an upload session; `sha256` of its bytes (hex)."""

    name: str
    content_type: str
    content_id: str | None
    is_inline: bool
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ReceivedMail:
    """One message Graph accepted (202) for delivery.

    `recipients` are the lowercased addresses Graph would deliver to (To + Cc + Bcc);
    `from_address` is the lowercased effective sender (the From header or `from` property,
    else the mailbox itself).
    """

    mailbox: str
    request_id: str
    kind: Literal["mime", "json"]
    mime: bytes | None
    json_body: dict[str, Any] | None
    recipients: tuple[str, ...]
    from_address: str
    save_to_sent_items: bool
    received_at: float
    subject: str = ""
    # Sent as a draft: the attachments that came through upload sessions (also in `mime`).
    attachments: tuple[UploadedAttachment, ...] = ()
    # The caller's `client-request-id` header of the request that sent it, if it had one.
    client_request_id: str | None = None


class Journal:
    """Observations shared by the services, with a condition to wait on any change."""

    def __init__(self) -> None:
        self.received: list[ReceivedMail] = []
        self.token_requests = 0
        self.entra_requests = 0  # discovery, keys and token endpoint together
        self.tokens_issued = 0
        self.graph_requests = 0
        self.graph_statuses: Counter[int] = Counter()
        self.upload_requests = 0
        self.upload_statuses: Counter[int] = Counter()
        self.in_flight: dict[str, int] = {}
        self.max_concurrency: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def notify(self) -> None:
        """Wake every waiter so it re-checks its predicate."""
        async with self._changed:
            self._changed.notify_all()

    # A timeout argument is the contract tests want here (`wait_for_mail(1, timeout=5)`);
    # it is implemented with asyncio.timeout, which is what ASYNC109 asks for.
    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Return once `predicate()` holds; raise TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def enter(self, mailbox: str) -> None:
        count = self.in_flight.get(mailbox, 0) + 1
        self.in_flight[mailbox] = count
        self.max_concurrency[mailbox] = max(self.max_concurrency.get(mailbox, 0), count)

    def leave(self, mailbox: str) -> None:
        count = self.in_flight[mailbox] - 1
        if count:
            self.in_flight[mailbox] = count
        else:
            del self.in_flight[mailbox]


class MailDir:
    """Writes each accepted message as `NNNN-<mailbox>.eml|.json` plus an `index.html`.

    Files are written atomically (temp + rename) from a worker thread; one lock keeps the
    numbering and the index consistent when several requests finish at once.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._entries: list[tuple[ReceivedMail, str]] = []
        self._first_number = 1
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Create the folder and an empty index; number new files after any left by an earlier
        run, so a restarted sandbox never overwrites mail a user may still be looking at."""
        async with self._lock:
            self._first_number = await asyncio.to_thread(self._prepare) + 1

    def _prepare(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name[:4]) for p in self.directory.glob("[0-9][0-9][0-9][0-9]-*")]
        _atomic_write(self.directory / "index.html", _render_index([]).encode("utf-8"))
        return max(numbers, default=0)

    async def add(self, mail: ReceivedMail) -> Path:
        async with self._lock:
            number = self._first_number + len(self._entries)
            safe_mailbox = re.sub(r"[^A-Za-z0-9@._+-]", "_", mail.mailbox)
            suffix = "eml" if mail.kind == "mime" else "json"
            name = f"{number:04d}-{safe_mailbox}.{suffix}"
            if mail.mime is not None:
                payload = mail.mime
            else:
                payload = json.dumps(mail.json_body, indent=2, ensure_ascii=False).encode()
            self._entries.append((mail, name))
            page = _render_index(self._entries).encode("utf-8")
            await asyncio.to_thread(self._write_files, name, payload, page)
            return self.directory / name

    def _write_files(self, name: str, payload: bytes, page: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.directory / name, payload)
        _atomic_write(self.directory / "index.html", page)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _render_index(entries: list[tuple[ReceivedMail, str]]) -> str:
    rows = []
    for mail, name in reversed(entries):
        when = datetime.datetime.fromtimestamp(mail.received_at, datetime.UTC)
        cells = (
            when.strftime("%Y-%m-%d %H:%M:%S UTC"),
            mail.mailbox,
            mail.from_address,
            ", ".join(mail.recipients),
            mail.subject or "(no subject)",
        )
        tds = "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        link = html.escape(name, quote=True)
        rows.append(f'<tr>{tds}<td><a href="{link}">{link}</a></td></tr>')
    body = "\n".join(rows) or '<tr><td colspan="6">No mail yet.</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>smtp-graph-relay sandbox: mail received by Graph</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}}</style>
</head><body>
<h1>Mail the sandbox Graph accepted since it started ({len(entries)})</h1>
<p>Newest first. Each message is the exact MIME (or JSON) the relay posted to sendMail.</p>
<table><tr><th>Received</th><th>Mailbox</th><th>From</th><th>Recipients</th><th>Subject</th>
<th>File</th></tr>
{body}
</table></body></html>
"""
