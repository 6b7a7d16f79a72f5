# Why this module exists: a new administrator judges the relay by the sandbox's mail folder, so
# its index must say how each message reached "Graph" (MIME, JSON, or the large path's draft
# and uploads, which Exchange rebuilds), how big it was, and who it went to as To, Cc and Bcc
# separately, and must list the NDRs Exchange sends back when a sending limit refuses a message.
# Pure rendering: values in, HTML and MIME bytes out.
"""The sandbox mail folder's index.html and its NDR messages."""

from __future__ import annotations

import datetime
import html
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.policy import default as default_policy
from email.utils import format_datetime, getaddresses
from typing import Any

from .limits import Ndr

__all__ = ["IndexRow", "ndr_mime", "ndr_row", "recipients_by_field", "render_index"]


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One line of index.html: an accepted message or an NDR."""

    received_at: float
    mailbox: str
    path: str  # "MIME", "JSON", "upload (rebuilt from draft)" or "NDR"
    size: int
    from_address: str
    to: str
    cc: str
    bcc: str
    subject: str
    file: str


def recipients_by_field(
    mime: bytes | None, json_body: dict[str, Any] | None
) -> tuple[str, str, str]:
    """To, Cc and Bcc of a submitted message, each as a comma-separated address list."""
    if mime is not None:
        headers = BytesHeaderParser(policy=compat32).parsebytes(mime)
        return tuple(  # type: ignore[return-value]
            ", ".join(a for _, a in getaddresses([str(v) for v in headers.get_all(f, [])]) if a)
            for f in ("To", "Cc", "Bcc")
        )
    message = (json_body or {}).get("message")
    message = message if isinstance(message, dict) else {}
    fields = ("toRecipients", "ccRecipients", "bccRecipients")
    return tuple(", ".join(_json_addresses(message.get(f))) for f in fields)  # type: ignore[return-value]


def _json_addresses(value: object) -> list[str]:
    found = []
    for item in value if isinstance(value, list) else []:
        email = item.get("emailAddress") if isinstance(item, dict) else None
        address = email.get("address") if isinstance(email, dict) else None
        if isinstance(address, str) and address:
            found.append(address)
    return found


def ndr_mime(ndr: Ndr) -> bytes:
    """The NDR as a message to the sending mailbox, from its domain's postmaster."""
    message = EmailMessage(policy=default_policy.clone(linesep="\r\n", max_line_length=998))
    domain = ndr.mailbox.rpartition("@")[2] or "localhost"
    message["From"] = f"Microsoft Outlook <postmaster@{domain}>"
    message["To"] = ndr.mailbox
    message["Subject"] = f"Undeliverable: {ndr.subject}" if ndr.subject else "Undeliverable"
    message["Date"] = format_datetime(datetime.datetime.fromtimestamp(ndr.at, datetime.UTC))
    if ndr.message_id:
        message["In-Reply-To"] = ndr.message_id
        message["References"] = ndr.message_id
    original = f"Message-ID: {ndr.message_id}\n" if ndr.message_id else ""
    message.set_content(
        f"Your message couldn't be delivered.\n\n{ndr.text}\n\n{original}"
        f"Status: {ndr.status}\nLimit: {ndr.limit} (smtp-graph-relay sandbox)\n"
    )
    return message.as_bytes()


def ndr_row(ndr: Ndr, name: str) -> IndexRow:
    return IndexRow(
        received_at=ndr.at,
        mailbox=ndr.mailbox,
        path="NDR",
        size=len(ndr_mime(ndr)),
        from_address=f"postmaster@{ndr.mailbox.rpartition('@')[2]}",
        to=ndr.mailbox,
        cc="",
        bcc="",
        subject=f"{ndr.text} ({ndr.message_id or 'no Message-ID'}: {ndr.subject})",
        file=name,
    )


_COLUMNS = ("Received", "Mailbox", "Path", "Size", "From", "To", "Cc", "Bcc", "Subject", "File")


def render_index(rows: list[IndexRow]) -> str:
    lines = []
    for row in reversed(rows):
        when = datetime.datetime.fromtimestamp(row.received_at, datetime.UTC)
        cells = (
            when.strftime("%Y-%m-%d %H:%M:%S UTC"),
            row.mailbox,
            row.path,
            f"{row.size:,} bytes",
            row.from_address,
            row.to,
            row.cc,
            row.bcc,
            row.subject or "(no subject)",
        )
        tds = "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        link = html.escape(row.file, quote=True)
        lines.append(f'<tr>{tds}<td><a href="{link}">{link}</a></td></tr>')
    body = "\n".join(lines) or f'<tr><td colspan="{len(_COLUMNS)}">No mail yet.</td></tr>'
    heads = "".join(f"<th>{name}</th>" for name in _COLUMNS)
    messages = sum(1 for row in rows if row.path != "NDR")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>smtp-graph-relay sandbox: mail received by Graph</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}}</style>
</head><body>
<h1>Mail the sandbox Graph accepted since it started ({messages})</h1>
<p>Newest first. Path MIME: the file is the exact MIME the relay posted to sendMail. JSON: the
message resource it posted. upload (rebuilt from draft): the large-message path; the file is
the message as Exchange rebuilt it from the draft and the uploaded attachments, not bytes the
relay sent. NDR: a sending limit refused the message after Graph answered 202; the file is the
non-delivery report Exchange puts in the sending mailbox.</p>
<table><tr>{heads}</tr>
{body}
</table></body></html>
"""
