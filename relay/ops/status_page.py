"""The admin status page: one self-contained HTML document for people (DESIGN §9).

Why this module exists: the page is presentation only. `relay.ops.admin` gathers a `StatusView`
(version, uptime, listeners, routes, queue counts, token state per auth object, the last
delivery errors with their Graph code, request-id and remedy, and every reason the relay is
not ready, degradations included); this module renders it. Every value from outside is
HTML-escaped, and nothing on the page is a secret (no credential, proxy URL or message
content; addresses only as far as the route configuration names them).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from relay import __version__
from relay.config.schema import Config, ListenerConfig
from relay.core.history import HistoryRecord
from relay.graph.tokens import TokenStatus
from relay.ops.health import BoundListenerView
from relay.ops.mailbox_gauges import MailboxRow
from relay.ops.metrics import ErrorReport
from relay.ops.queue_gauges import QueueReading

__all__ = ["HistoryView", "StatusView", "render_status"]


@dataclass(frozen=True, slots=True)
class HistoryView:
    """The History section: what was searched for (the `q` of `GET /?q=`), the newest
    matching outcomes, and why there are none when the history could not be read."""

    search: str = ""
    records: Sequence[HistoryRecord] = ()
    problem: str = ""


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything the status page shows, gathered before rendering."""

    now: float
    uptime: float
    config: Config
    listeners: Sequence[ListenerConfig]
    bound: Sequence[BoundListenerView]
    tokens: Mapping[str, TokenStatus]
    queue: QueueReading | None  # None: direct mode
    mailboxes: Sequence[MailboxRow]
    errors: Sequence[ErrorReport]
    problems: Sequence[str]
    history: HistoryView = HistoryView()


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin-bottom:1.5em}"
    "th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}"
    "th{background:#f0f0f0}.bad{color:#a00}.ok{color:#070}"
    # Message-IDs and request-ids have no spaces: let them wrap rather than widen the page.
    "table{max-width:100%}td{overflow-wrap:anywhere}"
)


def render_status(view: StatusView) -> str:
    """The status page as one HTML document; every value from outside is escaped."""
    state = (
        '<p class="ok">Ready.</p>'
        if not view.problems
        else '<ul class="bad">' + "".join(f"<li>{_e(p)}</li>" for p in view.problems) + "</ul>"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>smtp-graph-relay</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>smtp-graph-relay {_e(__version__)}</h1>",
        f"<p>Up {_e(_duration(view.uptime))}; page generated {_e(_time(view.now))}.</p>",
        state,
        "<h2>Listeners</h2>",
        _listeners_table(view),
        "<h2>Routes</h2>",
        _table(
            ["Route", "Senders", "Auth object", "Mailbox"],
            [
                [
                    route.label,
                    ", ".join(route.senders),
                    route.auth_object,
                    route.mailbox_shown,
                ]
                for route in view.config.routes
            ],
        ),
        "<h2>Queue</h2>",
        _queue_section(view),
        "<h2>Sending mailboxes</h2>",
        _mailboxes_table(view.mailboxes),
        "<h2>Tokens</h2>",
        _tokens_table(view),
        f"<h2>Last delivery errors ({len(view.errors)})</h2>",
        _errors_table(view.errors),
        *_history_section(view.history, view.config.history.subjects),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _listeners_table(view: StatusView) -> str:
    bound = list(view.bound)
    rows = []
    for listener in view.listeners:
        match = next((b for b in bound if b.config == listener), None)
        if match is not None:
            bound.remove(match)
        rows.append(
            [
                f"{listener.address}:{listener.port}",
                listener.tls,
                listener.auth,
                f"listening on {match.host}:{match.port}" if match else "NOT BOUND",
            ]
        )
    return _table(["Address", "TLS", "AUTH", "State"], rows)


def _queue_section(view: StatusView) -> str:
    if view.queue is None:
        return "<p>Direct mode: no spool, nothing is queued.</p>"
    queue = view.queue.stats
    if queue is None:
        return f'<p class="bad">{_e(view.queue.problem)}</p>'
    oldest = (
        "-"
        if queue.oldest_created is None
        else _duration(max(0.0, view.now - queue.oldest_created))
    )
    return _table(
        ["Queued", "In delivery", "Held", "Oldest waiting", "Dead", "Quarantined", "Corrupt"],
        [
            [
                str(queue.queued),
                str(queue.active),
                str(queue.held),
                oldest,
                str(queue.dead),
                str(queue.quarantined),
                str(queue.corrupt),
            ]
        ],
    )


_BUDGETS = (
    ("messages_per_minute", "Messages / min"),
    ("recipients_per_day", "Recipients / day"),
    ("requests_per_10_minutes", "Requests / 10 min"),
    ("upload_per_5_minutes", "Upload / 5 min"),
    ("concurrent_requests", "In flight"),
)


def _mailboxes_table(rows: Sequence[MailboxRow]) -> str:
    """A row per mailbox: each budget used / limit, its line and when it drains (issue #12)."""
    if not rows:
        return "<p>No mailbox has sent or queued mail lately.</p>"
    head = ["Mailbox", *(title for _, title in _BUDGETS), "Waiting", "Drains in", "Paused"]
    body = [
        [
            row.mailbox,
            *(f"{row.used.get(name, 0)} / {row.limits.get(name, 0)}" for name, _ in _BUDGETS),
            str(row.waiting),
            _duration(row.drain_eta) if row.waiting else "-",
            _duration(row.paused_for) if row.paused_for > 0 else "-",
        ]
        for row in rows
    ]
    return _table(head, body)


def _tokens_table(view: StatusView) -> str:
    rows = []
    for name, auth in view.config.auth_objects.items():
        status = view.tokens.get(name, TokenStatus())
        if status.last_ok is None:
            state, fix = "no token needed yet", ""
        elif status.last_ok:
            valid = f", valid until {_time(status.expires_at)}" if status.expires_at else ""
            state, fix = f"ok at {_time(status.last_at)}{valid}", ""
        else:
            code = f" ({status.code})" if status.code else ""
            state, fix = f"FAILED at {_time(status.last_at)}{code}", status.remedy
        rows.append([name, auth.tenant_id, auth.client_id, state, fix])
    return _table(["Auth object", "Tenant", "Client id", "Last token request", "Remedy"], rows)


_ERROR_COLUMNS = ("Time", "Event", "Queue id", "Route", "Mailbox", "HTTP", "Code", "Request id",
                  "Reply", "Remedy", "Detail")  # fmt: skip


def _errors_table(errors: Sequence[ErrorReport]) -> str:
    if not errors:
        return "<p>None since the relay started.</p>"
    return _table(
        _ERROR_COLUMNS,
        [
            [
                _time(e.at),
                e.event,
                e.queue_id,
                e.route,
                e.mailbox,
                "" if e.http_status is None else str(e.http_status),
                e.code or "",
                e.request_id or "",
                e.reply,
                e.remedy,
                e.message,
            ]
            for e in errors
        ],
    )


def _history_section(history: HistoryView, subjects: bool) -> list[str]:
    """A GET form (the page's CSP allows no script) and the newest outcomes it matches."""
    title = f"History: matching {history.search!r}" if history.search else "History: the last 50"
    form = (
        '<form method="get" action="/"><label>Sender, Message-ID or queue id '
        f'<input type="search" name="q" value="{_e(history.search)}"></label> '
        '<button type="submit">Search</button></form>'
    )
    if history.problem:
        found = f'<p class="bad">{_e(history.problem)}</p>'
    elif not history.records:
        found = "<p>No outcome recorded matches.</p>"
    else:
        columns = [*_HISTORY_COLUMNS, *(["Subject"] if subjects else [])]
        found = _table(columns, [_history_row(r, subjects) for r in history.records])
    return [f"<h2>{_e(title)}</h2>", form, found]


_HISTORY_COLUMNS = (
    "Settled", "Outcome", "Queue id", "Message-ID", "Sender", "Rcpts", "Route / mailbox",
    "Graph (path, status, request-id)", "Attempts", "Last error / remedy",
)  # fmt: skip


def _history_row(r: HistoryRecord, subjects: bool) -> list[str]:
    graph = " ".join(p for p in (r.path, str(r.http_status or ""), r.request_id) if p)
    error = f"{r.error} (remedy: {r.remedy})" if r.remedy else r.error
    row = [
        _time(r.settled),
        r.outcome,
        r.queue_id,
        r.message_id,
        f"<{r.sender}>",
        str(r.recipients),
        f"{r.route} / {r.mailbox}",
        graph,
        str(r.attempts),
        error,
    ]
    return [*row, r.subject or ""] if subjects else row


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _time(when: float | None) -> str:
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"
