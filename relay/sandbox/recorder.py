# Why this module exists: the sandbox is only useful if one can see what "Microsoft" received.
# Tests read an in-memory journal (messages, counters, concurrency peaks) and wait on it through
# an asyncio.Condition instead of polling; `smtp-graph-relay sandbox` users open a mail folder
# with one file per accepted message (and per NDR) and an index.html listing them
# (rendered by `mail_index`).
"""What the sandbox saw: accepted messages, counters, and the optional mail folder."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .limits import Ndr
from .mail_index import IndexRow, ndr_mime, ndr_row, recipients_by_field, render_index

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
    # Sent through the large-message path: `mime` is what Exchange rebuilt from the draft and
    # its uploaded attachments, not bytes the relay posted.
    via_draft: bool = False


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
    """Writes each accepted message as `NNNN-<mailbox>.eml|.json`, each NDR that landed as
    `NNNN-<mailbox>.ndr.eml`, plus an `index.html` listing them all.

    Files are written atomically (temp + rename) from a worker thread; one lock keeps the
    numbering and the index consistent when several requests finish at once.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._rows: list[IndexRow] = []
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
        _atomic_write(self.directory / "index.html", render_index([]).encode("utf-8"))
        return max(numbers, default=0)

    async def add(self, mail: ReceivedMail) -> Path:
        if mail.mime is not None:
            payload = mail.mime
        else:
            payload = json.dumps(mail.json_body, indent=2, ensure_ascii=False).encode()
        suffix = "eml" if mail.kind == "mime" else "json"
        return await self._add(mail.mailbox, suffix, payload, lambda name: mail_row(mail, name))

    async def add_ndr(self, ndr: Ndr) -> Path:
        """File an NDR that landed in the sending mailbox, as Exchange delivers it there."""
        return await self._add(ndr.mailbox, "ndr.eml", ndr_mime(ndr), lambda n: ndr_row(ndr, n))

    async def _add(
        self, mailbox: str, suffix: str, payload: bytes, row: Callable[[str], IndexRow]
    ) -> Path:
        async with self._lock:
            number = self._first_number + len(self._rows)
            safe_mailbox = re.sub(r"[^A-Za-z0-9@._+-]", "_", mailbox)
            name = f"{number:04d}-{safe_mailbox}.{suffix}"
            self._rows.append(row(name))
            page = render_index(self._rows).encode("utf-8")
            await asyncio.to_thread(self._write_files, name, payload, page)
            return self.directory / name

    def _write_files(self, name: str, payload: bytes, page: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.directory / name, payload)
        _atomic_write(self.directory / "index.html", page)


def mail_row(mail: ReceivedMail, name: str) -> IndexRow:
    """The index line of an accepted message: how it came (the send path) and its size."""
    if mail.via_draft:
        path, size = "upload (rebuilt from draft)", len(mail.mime or b"")
    elif mail.kind == "mime":
        path, size = "MIME", len(mail.mime or b"")
    else:
        path = "JSON"
        size = len(json.dumps(mail.json_body, ensure_ascii=False).encode())
    to, cc, bcc = recipients_by_field(mail.mime, mail.json_body)
    return IndexRow(
        received_at=mail.received_at,
        mailbox=mail.mailbox,
        path=path,
        size=size,
        from_address=mail.from_address,
        to=to,
        cc=cc,
        bcc=bcc,
        subject=mail.subject,
        file=name,
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
